//! The replication connection: the Postgres wire protocol's startup,
//! authentication and CopyBoth streaming, built on postgres-protocol's
//! message codecs (tokio-postgres has no replication support).

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use futures_util::FutureExt;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::params::{ConnParams, Host, SslMode, TargetSessionAttrs};
use super::tls;
use super::SourceError;
use crate::lsn::Lsn;

/// Settings every session runs with (replication and SQL alike), so that
/// values in text form are in one known format whatever the server's
/// defaults are: ISO dates, UTC timestamps, floats that round-trip, ISO
/// 8601 intervals. The initial sync and `preview` read rows as text in the
/// same format the stream carries them.
pub(crate) const SESSION_OPTIONS: &str =
    "-c datestyle=ISO,MDY -c timezone=UTC -c extra_float_digits=3 -c intervalstyle=iso_8601";

/// Microseconds from the Unix epoch to Postgres's epoch, 2000-01-01 UTC.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Read buffer growth step; big enough for a typical XLogData burst.
const READ_CHUNK: usize = 64 * 1024;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Now, as microseconds since 2000-01-01 UTC, the protocol's clock.
pub(crate) fn pg_now() -> i64 {
    let us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    us - PG_EPOCH_OFFSET_US
}

/// A protocol timestamp (µs since 2000-01-01 UTC) as Unix milliseconds.
pub(crate) fn pg_time_unix_ms(us: i64) -> u64 {
    (us.saturating_add(PG_EPOCH_OFFSET_US) / 1000).max(0) as u64
}

/// A slot just created with its snapshot exported.
#[derive(Debug, Clone)]
pub(crate) struct ExportedSlot {
    /// Where the slot's stream starts: every change committed after it.
    pub consistent_point: Lsn,
    /// The snapshot's name, for `SET TRANSACTION SNAPSHOT`.
    pub snapshot: String,
}

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Debug, Clone)]
pub(crate) struct SystemId {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
}

/// A connection in replication mode (`replication=database`), before
/// streaming starts.
pub(crate) struct ReplicationConn {
    io: Box<dyn Io>,
    /// The TCP socket under `io`, if it is one.
    tcp: Option<RawFd>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// A frame off the wire: either a message postgres-protocol decodes, or one
/// of the CopyBoth messages it does not know.
enum Frame {
    Message(Message),
    CopyBothResponse,
}

impl ReplicationConn {
    /// Connects, negotiates TLS per `sslmode`, authenticates (trust,
    /// cleartext, md5, SCRAM-SHA-256 with channel binding over TLS) and
    /// waits until the server is ready for commands.
    /// With several hosts, tries each in order; with
    /// `target_session_attrs=read-write`, skips a read-only one (a standby:
    /// from Postgres 16 a standby accepts logical replication connections).
    pub(crate) async fn connect(params: &ConnParams) -> Result<ReplicationConn, SourceError> {
        let mut failures = Vec::new();
        for one in params.each_host() {
            match Self::connect_host(&one).await {
                Ok(conn) if params.target_session_attrs == TargetSessionAttrs::Any => {
                    return Ok(conn)
                }
                Ok(mut conn) => match conn.read_only().await {
                    Ok(None) => return Ok(conn),
                    Ok(Some(in_recovery)) => {
                        failures.push(SourceError::read_only(&one, in_recovery))
                    }
                    Err(e) => failures.push(e),
                },
                Err(e) => failures.push(e),
            }
        }
        Err(SourceError::no_host(params, failures))
    }

    /// None when sessions on this server may write; else whether it is in
    /// recovery (a standby).
    async fn read_only(&mut self) -> Result<Option<bool>, SourceError> {
        let rows = self
            .simple_query(
                "SELECT current_setting('transaction_read_only') = 'on', pg_is_in_recovery()",
            )
            .await?;
        let row = rows.first().filter(|r| r.len() >= 2).ok_or_else(|| {
            SourceError::transient("asking whether the server accepts writes: no row".into())
        })?;
        let yes = |v: &Option<String>| v.as_deref() == Some("t");
        Ok(yes(&row[0]).then(|| yes(&row[1])))
    }

    /// Connects to the one host `params` names first.
    async fn connect_host(params: &ConnParams) -> Result<ReplicationConn, SourceError> {
        tokio::time::timeout(params.connect_timeout, Self::connect_inner(params))
            .await
            .map_err(|_| {
                SourceError::transient(format!(
                    "connecting to {params} timed out after {:?}",
                    params.connect_timeout
                ))
            })?
    }

    async fn connect_inner(params: &ConnParams) -> Result<ReplicationConn, SourceError> {
        let mut tcp = None;
        let (io, binding): (Box<dyn Io>, Option<Vec<u8>>) = match &params.host {
            Host::Socket(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", params.port));
                let s = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|e| SourceError::unreachable(params, &e))?;
                (Box::new(s), None)
            }
            Host::Tcp(host) => {
                let mut s = TcpStream::connect((host.as_str(), params.port))
                    .await
                    .map_err(|e| SourceError::unreachable(params, &e))?;
                let _ = s.set_nodelay(true);
                tcp = Some(s.as_raw_fd());
                match tls::client_config(params).map_err(SourceError::config)? {
                    None => (Box::new(s), None),
                    Some(config) => {
                        let mut buf = BytesMut::new();
                        frontend::ssl_request(&mut buf);
                        s.write_all(&buf).await.map_err(io_err(params))?;
                        let mut answer = [0u8; 1];
                        s.read_exact(&mut answer).await.map_err(io_err(params))?;
                        match answer[0] {
                            b'S' => {
                                let name = tls::server_name(host).map_err(SourceError::config)?;
                                // rustls reads at most 4 KiB per call; the
                                // buffer makes that one system call per
                                // READ_CHUNK on a busy stream, and rustls
                                // takes it in small parts (see `Feed`).
                                let s = tls::Feed(tokio::io::BufReader::with_capacity(READ_CHUNK, s));
                                let stream = tokio_rustls::TlsConnector::from(config)
                                    .connect(name, s)
                                    .await
                                    .map_err(|e| {
                                        SourceError::config(format!(
                                            "TLS handshake with {params} failed (sslmode {:?}): {e}",
                                            params.sslmode
                                        ))
                                    })?;
                                let binding = tls::end_point_binding(stream.get_ref().1);
                                (Box::new(stream), binding)
                            }
                            b'N' if params.sslmode == SslMode::Prefer => (Box::new(s), None),
                            b'N' => {
                                return Err(SourceError::config(format!(
                                    "{params} does not accept TLS, but sslmode is {:?}; enable ssl on the server or lower sslmode",
                                    params.sslmode
                                )))
                            }
                            other => {
                                return Err(SourceError::transient(format!(
                                    "{params} answered the TLS request with unexpected byte {other:#x}"
                                )))
                            }
                        }
                    }
                }
            }
        };
        let mut conn = ReplicationConn {
            io,
            tcp,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::new(),
        };
        conn.startup(params, binding).await?;
        Ok(conn)
    }

    async fn startup(
        &mut self,
        params: &ConnParams,
        binding: Option<Vec<u8>>,
    ) -> Result<(), SourceError> {
        let startup = [
            ("user", params.user.as_str()),
            ("database", params.dbname.as_str()),
            ("replication", "database"),
            ("application_name", params.application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("options", SESSION_OPTIONS),
        ];
        frontend::startup_message(startup.iter().copied(), &mut self.wbuf).map_err(proto)?;
        self.flush().await?;

        let password = || {
            params
                .password
                .as_ref()
                .map(|p| p.expose().as_bytes())
                .ok_or_else(|| SourceError::password_missing(params))
        };
        loop {
            match self.read_message().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?, &mut self.wbuf).map_err(proto)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        params.user.as_bytes(),
                        password()?,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf).map_err(proto)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut plain = false;
                    let mut plus = false;
                    let mut mechanisms = body.mechanisms();
                    while let Some(m) = mechanisms.next().map_err(proto)? {
                        plain |= m == sasl::SCRAM_SHA_256;
                        plus |= m == sasl::SCRAM_SHA_256_PLUS;
                    }
                    let (mechanism, channel) = match (&binding, plus, plain) {
                        (Some(hash), true, _) => (
                            sasl::SCRAM_SHA_256_PLUS,
                            ChannelBinding::tls_server_end_point(hash.clone()),
                        ),
                        (_, _, true) => (sasl::SCRAM_SHA_256, ChannelBinding::unsupported()),
                        _ => {
                            return Err(SourceError::config(format!(
                                "{params} offers no SASL mechanism this connector speaks (SCRAM-SHA-256)"
                            )))
                        }
                    };
                    let mut scram = ScramSha256::new(password()?, channel);
                    frontend::sasl_initial_response(mechanism, scram.message(), &mut self.wbuf)
                        .map_err(proto)?;
                    self.flush().await?;
                    match self.read_message().await? {
                        Message::AuthenticationSaslContinue(body) => {
                            scram.update(body.data()).map_err(auth_failed(params))?
                        }
                        other => return Err(unexpected("SASL continue", &other)),
                    }
                    frontend::sasl_response(scram.message(), &mut self.wbuf).map_err(proto)?;
                    self.flush().await?;
                    match self.read_message().await? {
                        Message::AuthenticationSaslFinal(body) => {
                            scram.finish(body.data()).map_err(auth_failed(params))?
                        }
                        other => return Err(unexpected("SASL final", &other)),
                    }
                }
                Message::AuthenticationGss
                | Message::AuthenticationKerberosV5
                | Message::AuthenticationSspi
                | Message::AuthenticationScmCredential => {
                    return Err(SourceError::config(format!(
                        "{params} asks for an authentication method this connector does not speak; use password, md5 or scram-sha-256 in pg_hba.conf"
                    )))
                }
                Message::ParameterStatus(_) | Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                other => return Err(unexpected("startup", &other)),
            }
        }
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        let buf = self.wbuf.split();
        self.io.write_all(&buf).await.map_err(|e| {
            SourceError::transient(format!("writing to the replication connection: {e}"))
        })?;
        self.io.flush().await.map_err(|e| {
            SourceError::transient(format!("writing to the replication connection: {e}"))
        })
    }

    async fn read_frame(&mut self) -> Result<Frame, SourceError> {
        read_frame(&mut self.io, &mut self.rbuf).await
    }

    /// Reads a message; an ErrorResponse becomes an error.
    async fn read_message(&mut self) -> Result<Message, SourceError> {
        match self.read_frame().await? {
            Frame::Message(Message::ErrorResponse(body)) => Err(server_error(&body)),
            Frame::Message(m) => Ok(m),
            Frame::CopyBothResponse => Err(SourceError::transient(
                "server started streaming before it was asked to".into(),
            )),
        }
    }

    /// Runs a replication command and returns its rows as text.
    pub(crate) async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        frontend::query(sql, &mut self.wbuf).map_err(proto)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            match self.read_frame().await? {
                Frame::Message(Message::DataRow(row)) => {
                    let buf = row.buffer();
                    let mut values = Vec::new();
                    let mut ranges = row.ranges();
                    while let Some(range) = ranges.next().map_err(proto)? {
                        values.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(values);
                }
                Frame::Message(Message::ErrorResponse(body)) => failure = Some(server_error(&body)),
                Frame::Message(Message::ReadyForQuery(_)) => {
                    return match failure {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                Frame::Message(_) => {}
                Frame::CopyBothResponse => {
                    return Err(SourceError::transient(format!(
                        "`{sql}` unexpectedly started streaming"
                    )))
                }
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: the server's identity and current WAL position.
    pub(crate) async fn identify_system(&mut self) -> Result<SystemId, SourceError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .filter(|r| r.len() >= 4)
            .ok_or_else(|| SourceError::transient("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row[i].clone().unwrap_or_default();
        Ok(SystemId {
            system_id: field(0),
            timeline: field(1).parse().unwrap_or(0),
            xlog_pos: field(2)
                .parse()
                .map_err(|e| SourceError::transient(format!("IDENTIFY_SYSTEM: {e}")))?,
        })
    }

    /// `CREATE_REPLICATION_SLOT … LOGICAL pgoutput EXPORT_SNAPSHOT`: a new
    /// slot and a snapshot of the database as of its consistent point, which
    /// another session may import (`SET TRANSACTION SNAPSHOT`) until this
    /// connection runs its next command. With `failover` (PostgreSQL 17+)
    /// the slot is a failover slot, synchronized to standbys with slot sync
    /// on. None when the slot already exists (another connector created it
    /// first).
    pub(crate) async fn create_slot_exporting(
        &mut self,
        slot: &str,
        failover: bool,
    ) -> Result<Option<ExportedSlot>, SourceError> {
        let sql = if failover {
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)",
                crate::config::quote_ident(slot)
            )
        } else {
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                crate::config::quote_ident(slot)
            )
        };
        let rows = match self.simple_query(&sql).await {
            Ok(rows) => rows,
            Err(e) if e.to_string().contains("SQLSTATE 42710") => return Ok(None),
            Err(e) => return Err(e),
        };
        let row = rows.first().filter(|r| r.len() >= 3).ok_or_else(|| {
            SourceError::transient("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let consistent_point = row[1]
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| SourceError::transient(format!("CREATE_REPLICATION_SLOT: {e}")))?;
        let snapshot = row[2].clone().ok_or_else(|| {
            SourceError::transient("CREATE_REPLICATION_SLOT exported no snapshot".into())
        })?;
        Ok(Some(ExportedSlot {
            consistent_point,
            snapshot,
        }))
    }

    /// `ALTER_REPLICATION_SLOT … (FAILOVER …)` (PostgreSQL 17+): makes an
    /// existing slot a failover slot, or no longer one. Fails while another
    /// session streams from the slot.
    pub(crate) async fn set_failover(&mut self, slot: &str, on: bool) -> Result<(), SourceError> {
        let sql = format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER {on})",
            crate::config::quote_ident(slot)
        );
        self.simple_query(&sql).await.map(|_| ())
    }

    /// `START_REPLICATION SLOT … LOGICAL …` with pgoutput protocol version 1
    /// on the given publications (pgoutput sends a table's change when any
    /// of them publishes it), with logical decoding messages (the sync's
    /// watermarks) when `messages` (Postgres 14+). `start` of `0/0` resumes
    /// from the slot's confirmed position. Returns the two halves of the
    /// stream.
    pub(crate) async fn start_replication(
        mut self,
        slot: &str,
        publications: &[String],
        start: Lsn,
        messages: bool,
    ) -> Result<(ReplicationReader, ReplicationWriter), SourceError> {
        let names: Vec<String> = publications
            .iter()
            .map(|p| crate::config::quote_ident(p))
            .collect();
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (\"proto_version\" '1', \"publication_names\" {}{})",
            crate::config::quote_ident(slot),
            start,
            quote_literal(&names.join(",")),
            if messages { ", \"messages\" 'true'" } else { "" },
        );
        frontend::query(&sql, &mut self.wbuf).map_err(proto)?;
        self.flush().await?;
        loop {
            match self.read_frame().await? {
                Frame::CopyBothResponse => break,
                Frame::Message(Message::ErrorResponse(body)) => return Err(server_error(&body)),
                Frame::Message(Message::NoticeResponse(_)) => {}
                Frame::Message(other) => return Err(unexpected("START_REPLICATION", &other)),
            }
        }
        let (rd, wr) = tokio::io::split(self.io);
        Ok((
            ReplicationReader {
                rd,
                buf: self.rbuf,
                batching: self.tcp.map(Batching::new),
                reads: ["batch", "change"].map(|wait| {
                    crate::telemetry::metrics()
                        .stream_reads
                        .with_label_values(&[wait])
                }),
            },
            ReplicationWriter {
                wr,
                buf: BytesMut::new(),
            },
        ))
    }
}

/// One message from the replication stream.
#[derive(Debug)]
pub(crate) enum ReplicationMessage {
    /// A pgoutput message, the WAL position it starts at, and when the
    /// server sent it (its clock, microseconds since 2000-01-01).
    XLogData {
        wal_start: Lsn,
        sent_at: i64,
        data: Bytes,
    },
    /// The server's WAL end, and whether it wants a status update now.
    Keepalive { wal_end: Lsn, reply_requested: bool },
    /// A busy stream paused: nothing arrived within the batching wait.
    Lull,
}

/// The receiving half of a started replication stream.
pub(crate) struct ReplicationReader {
    rd: ReadHalf<Box<dyn Io>>,
    buf: BytesMut,
    /// None over a Unix socket, or once the socket refused the option.
    batching: Option<Batching>,
    /// `stream_reads_total`, by wait: a batch, a change.
    reads: [prometheus::IntCounter; 2],
}

impl ReplicationReader {
    /// Whether a whole message is already buffered, so `next` will not wait
    /// on the network.
    pub(crate) fn has_buffered_message(&self) -> bool {
        self.buf.len() >= 5
            && self.buf.len()
                > u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize
    }

    /// Reads from the connection: waits until something arrives (on a busy
    /// stream, until a batch has gathered; see [`Batching`]), then takes in
    /// whatever else is ready without waiting. TLS hands over one record,
    /// here usually one change, per read: without the second step the
    /// reader would go back to the network once per change.
    ///
    /// False when a busy stream's wait ended with nothing queued: a lull,
    /// which the caller hears of before the reader waits again.
    async fn fill(&mut self) -> Result<bool, SourceError> {
        reserve(&mut self.buf);
        let before = self.buf.len();
        // The mark follows the stream's state; a socket that refuses it is
        // read the plain way from then on.
        let batch = match &mut self.batching {
            Some(b) => {
                let busy = b.busy;
                if b.mark(busy) {
                    busy
                } else {
                    self.batching = None;
                    false
                }
            }
            None => false,
        };
        let read = self.rd.read_buf(&mut self.buf);
        let mut waited_out = false;
        let n = match (batch, &mut self.batching) {
            (true, Some(b)) => {
                tokio::pin!(read);
                match tokio::time::timeout(BATCH_WAIT, &mut read).await {
                    Ok(n) => n,
                    Err(_) => {
                        waited_out = true;
                        // Lowering the mark makes whatever is queued
                        // readable at once. One left raised could hold the
                        // end of a burst back for good: reconnect instead.
                        if !b.mark(false) {
                            return Err(SourceError::transient(format!(
                                "lowering the socket's low-water mark: {}",
                                std::io::Error::last_os_error()
                            )));
                        }
                        if b.queued() == 0 {
                            b.lull();
                            return Ok(false);
                        }
                        read.await
                    }
                }
            }
            _ => read.await,
        };
        if n.map_err(read_failed)? == 0 {
            return Err(closed());
        }
        self.reads[if batch { 0 } else { 1 }].inc();
        while self.buf.capacity() - self.buf.len() >= READ_CHUNK / 4 {
            match self.rd.read_buf(&mut self.buf).now_or_never() {
                Some(Ok(0)) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(read_failed(e)),
            }
        }
        if let Some(b) = &mut self.batching {
            b.account(self.buf.len() - before, waited_out);
        }
        Ok(true)
    }

    /// Tells the reader whether the stream is a backlog (its commits arrive
    /// well after they happened). A backlog is read in batches from the
    /// start, and its short pauses do not end the busy spell; see
    /// [`CATCH_UP_PAUSE`]. The batching wait still bounds every read, and
    /// a [`ReplicationMessage::Lull`] still reports each pause.
    pub(crate) fn set_catching_up(&mut self, on: bool) {
        if let Some(b) = &mut self.batching {
            b.catching_up = on;
            if on && !b.busy {
                b.busy = true;
                b.last_bytes = Instant::now();
            }
        }
    }

    /// Whether the stream is busy enough that the reader waits for bytes to
    /// gather: more is coming, and a [`ReplicationMessage::Lull`] will say
    /// when it stops.
    pub(crate) fn is_batching(&self) -> bool {
        self.batching.as_ref().is_some_and(|b| b.busy)
    }

    /// The next XLogData or keepalive. The end of the stream or a server
    /// error is an error: a logical stream does not end on its own.
    pub(crate) async fn next(&mut self) -> Result<ReplicationMessage, SourceError> {
        loop {
            let frame = match parse_frame(&mut self.buf)? {
                Some(frame) => frame,
                None => {
                    if !self.fill().await? {
                        return Ok(ReplicationMessage::Lull);
                    }
                    continue;
                }
            };
            match frame {
                Frame::Message(Message::CopyData(body)) => {
                    let mut data = body.into_bytes();
                    let short = |what: &str| {
                        SourceError::transient(format!(
                            "replication stream: truncated {what} message"
                        ))
                    };
                    match data.first() {
                        Some(b'w') => {
                            if data.len() < 25 {
                                return Err(short("XLogData"));
                            }
                            data.advance(1);
                            let wal_start = Lsn(data.get_u64());
                            let wal_end = Lsn(data.get_u64());
                            let m = crate::telemetry::metrics();
                            m.server_wal_end(wal_end);
                            m.received_lsn.set(wal_start.0 as f64);
                            let sent_at = data.get_i64();
                            return Ok(ReplicationMessage::XLogData {
                                wal_start,
                                sent_at,
                                data,
                            });
                        }
                        Some(b'k') => {
                            if data.len() < 18 {
                                return Err(short("keepalive"));
                            }
                            data.advance(1);
                            let wal_end = Lsn(data.get_u64());
                            crate::telemetry::metrics().server_wal_end(wal_end);
                            let _send_time = data.get_i64();
                            let reply_requested = data.get_u8() == 1;
                            return Ok(ReplicationMessage::Keepalive {
                                wal_end,
                                reply_requested,
                            });
                        }
                        other => {
                            return Err(SourceError::transient(format!(
                                "replication stream: unknown CopyData kind {:?}",
                                other.map(|b| *b as char)
                            )))
                        }
                    }
                }
                Frame::Message(Message::ErrorResponse(body)) => return Err(server_error(&body)),
                Frame::Message(Message::NoticeResponse(_))
                | Frame::Message(Message::ParameterStatus(_)) => {}
                Frame::Message(Message::CopyDone) => {
                    return Err(SourceError::transient(
                        "the server ended the replication stream".into(),
                    ))
                }
                Frame::Message(other) => return Err(unexpected("replication stream", &other)),
                Frame::CopyBothResponse => {
                    return Err(SourceError::transient(
                        "replication stream: second CopyBothResponse".into(),
                    ))
                }
            }
        }
    }
}

/// The sending half of a started replication stream: standby status
/// updates and the final goodbye.
pub(crate) struct ReplicationWriter {
    wr: WriteHalf<Box<dyn Io>>,
    buf: BytesMut,
}

impl ReplicationWriter {
    /// Sends a standby status update. `flushed` is what the server may treat
    /// as durably handled (the slot's confirmed_flush_lsn moves to it);
    /// written and applied are reported as the same position, since the
    /// connector has no separate stages the server could act on.
    pub(crate) async fn send_status(&mut self, flushed: Lsn) -> Result<(), SourceError> {
        let mut msg = BytesMut::with_capacity(34);
        msg.extend_from_slice(b"r");
        msg.extend_from_slice(&flushed.0.to_be_bytes()); // last WAL byte + 1 received and written
        msg.extend_from_slice(&flushed.0.to_be_bytes()); // ... flushed: the confirmed position
        msg.extend_from_slice(&flushed.0.to_be_bytes()); // ... applied
        msg.extend_from_slice(&pg_now().to_be_bytes()); // client clock, for the server's lag stats
        msg.extend_from_slice(&[0]); // no reply wanted: keepalives come anyway
        frontend::CopyData::new(&msg[..])
            .map_err(proto)?
            .write(&mut self.buf);
        let buf = self.buf.split();
        self.wr
            .write_all(&buf)
            .await
            .map_err(|e| SourceError::transient(format!("sending a status update: {e}")))?;
        self.wr
            .flush()
            .await
            .map_err(|e| SourceError::transient(format!("sending a status update: {e}")))
    }

    /// Ends the stream politely: CopyDone then Terminate.
    pub(crate) async fn close(mut self) {
        frontend::copy_done(&mut self.buf);
        frontend::terminate(&mut self.buf);
        let buf = self.buf.split();
        let _ = self.wr.write_all(&buf).await;
        let _ = self.wr.flush().await;
        let _ = self.wr.shutdown().await;
    }
}

async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, SourceError> {
    loop {
        if let Some(frame) = parse_frame(buf)? {
            return Ok(frame);
        }
        reserve(buf);
        if rd.read_buf(buf).await.map_err(read_failed)? == 0 {
            return Err(closed());
        }
    }
}

/// Takes one whole frame off the front of `buf`, if one is there.
fn parse_frame(buf: &mut BytesMut) -> Result<Option<Frame>, SourceError> {
    if buf.len() >= 5 && buf[0] == b'W' {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() > len {
            buf.advance(len + 1);
            return Ok(Some(Frame::CopyBothResponse));
        }
        return Ok(None);
    }
    Ok(Message::parse(buf).map_err(proto)?.map(Frame::Message))
}

/// Makes room for the next read.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

fn read_failed(e: std::io::Error) -> SourceError {
    SourceError::transient(format!("reading from Postgres: {e}"))
}

fn closed() -> SourceError {
    SourceError::transient("Postgres closed the connection".into())
}

/// Socket low-water mark while the stream is busy: the reader wakes once
/// this much has arrived rather than once per change. A quarter of the
/// kernel's usual starting receive buffer (128 KiB), so setting it never
/// has the kernel clamp the TCP window to it.
const BATCH_BYTES: i32 = 32 * 1024;
/// Longest a busy stream's bytes wait for [`BATCH_BYTES`] before the reader
/// takes what there is. Bounds the latency batching adds at the end of a
/// burst; tokio's timer rounds it up to the next millisecond.
const BATCH_WAIT: Duration = Duration::from_millis(1);
/// How often the reader decides whether the stream is busy.
const RATE_WINDOW: Duration = Duration::from_millis(10);
/// Bytes per [`RATE_WINDOW`] from which the stream counts as busy: 2 MB/s,
/// some 13,000 changes a second. Below it every change wakes the reader at
/// once, so a trickle of changes sees no added latency.
const BUSY_BYTES: u64 = 20 * 1024;
/// While catching up, a pause shorter than this does not end a busy spell.
/// A backlog streams in bursts, one per transaction, with a pause while the
/// walsender decodes the next; leaving the busy state at each pause had the
/// reader wake per change through most of every burst, which cost a third
/// of the connector's CPU on a TLS stream. The pipeline counts a pause this
/// long as the stream going quiet too: a longer silence is the backlog's
/// end.
pub(crate) const CATCH_UP_PAUSE: Duration = Duration::from_millis(10);

/// Lets a busy replication stream gather in the socket before the reader
/// wakes. The walsender writes every change as it decodes it; a reader that
/// keeps up would otherwise wake, read and hand over a chunk for every one
/// or two changes, and on a small machine those wake-ups cost more CPU than
/// the changes. While busy, the socket's `SO_RCVLOWAT` holds readiness back
/// until [`BATCH_BYTES`] are queued, and a [`BATCH_WAIT`] timer lowers it
/// again, so nothing waits longer than that.
struct Batching {
    /// The TCP socket under the stream (and under TLS, if any). The
    /// reader's half of the connection owns it and outlives this.
    fd: RawFd,
    /// Whether the socket's mark is [`BATCH_BYTES`] now (else 1).
    raised: bool,
    busy: bool,
    window_start: Instant,
    window_bytes: u64,
    /// Catching up: pauses shorter than [`CATCH_UP_PAUSE`] do not end a
    /// busy spell.
    catching_up: bool,
    /// When a read last brought bytes.
    last_bytes: Instant,
}

impl Batching {
    fn new(fd: RawFd) -> Batching {
        Batching {
            fd,
            raised: false,
            busy: false,
            window_start: Instant::now(),
            window_bytes: 0,
            catching_up: false,
            last_bytes: Instant::now(),
        }
    }

    /// Sets the socket's low-water mark; false if the socket refused.
    fn mark(&mut self, raised: bool) -> bool {
        if self.raised == raised {
            return true;
        }
        let value: libc::c_int = if raised { BATCH_BYTES } else { 1 };
        // SAFETY: `fd` is the open socket the reader owns (see the field),
        // and the option value is a c_int of the size passed.
        let done = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } == 0;
        if done {
            self.raised = raised;
        }
        done
    }

    /// Bytes queued in the socket (0 if the kernel will not say).
    fn queued(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: `fd` is the open socket the reader owns; FIONREAD writes
        // one c_int through the pointer.
        let done = unsafe { libc::ioctl(self.fd, libc::FIONREAD, &mut n as *mut libc::c_int) } == 0;
        match done {
            true => n.max(0) as usize,
            false => 0,
        }
    }

    /// Counts what a read brought, and decides once per [`RATE_WINDOW`]
    /// whether the stream is busy. A read that had to wait out
    /// [`BATCH_WAIT`] and found under a quarter batch means the stream has
    /// slowed: it is not busy from then on (see [`Batching::lull`]).
    fn account(&mut self, bytes: usize, waited_out: bool) {
        let now = Instant::now();
        if bytes > 0 {
            self.last_bytes = now;
        }
        if waited_out && bytes < BATCH_BYTES as usize / 4 {
            self.lull();
            return;
        }
        self.window_bytes += bytes as u64;
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= RATE_WINDOW {
            // Scaled, so a window stretched by a quiet spell counts its rate.
            let per_window =
                self.window_bytes as u128 * RATE_WINDOW.as_micros() / elapsed.as_micros().max(1);
            self.busy = per_window >= BUSY_BYTES as u128;
            self.window_start = now;
            self.window_bytes = 0;
        }
    }

    /// The stream paused: not busy, and its rate is measured afresh; while
    /// catching up, only once the pause has lasted [`CATCH_UP_PAUSE`].
    fn lull(&mut self) {
        if self.catching_up && self.busy && self.last_bytes.elapsed() < CATCH_UP_PAUSE {
            return;
        }
        self.busy = false;
        self.window_start = Instant::now();
        self.window_bytes = 0;
    }
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn proto<E: std::fmt::Display>(e: E) -> SourceError {
    SourceError::transient(format!("protocol error on the replication connection: {e}"))
}

fn io_err(params: &ConnParams) -> impl Fn(std::io::Error) -> SourceError + '_ {
    move |e| SourceError::transient(format!("talking to {params}: {e}"))
}

fn auth_failed(params: &ConnParams) -> impl Fn(std::io::Error) -> SourceError + '_ {
    move |e| SourceError::config(format!("SCRAM authentication with {params} failed: {e}"))
}

fn unexpected(during: &str, m: &Message) -> SourceError {
    let name = match m {
        Message::CommandComplete(_) => "CommandComplete",
        Message::RowDescription(_) => "RowDescription",
        Message::DataRow(_) => "DataRow",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        _ => "another message",
    };
    SourceError::transient(format!("unexpected {name} from the server during {during}"))
}

/// Turns a server ErrorResponse into an error, classified by SQLSTATE.
fn server_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> SourceError {
    let mut code = String::new();
    let mut message = String::new();
    let mut hint = String::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let text = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => code = text,
            b'M' => message = text,
            b'H' => hint = text,
            _ => {}
        }
    }
    let mut text = format!("Postgres: {message} (SQLSTATE {code})");
    if !hint.is_empty() {
        text.push_str(&format!("; hint: {hint}"));
    }
    SourceError::from_sqlstate(&code, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batching state whose rate window began `ago`.
    fn batching(ago: Duration) -> Batching {
        let mut b = Batching::new(-1);
        b.window_start = Instant::now() - ago;
        b
    }

    #[test]
    fn a_stream_is_busy_from_two_megabytes_a_second() {
        // 30 KiB over 10 ms: 3 MB/s.
        let mut b = batching(RATE_WINDOW);
        b.account(30 * 1024, false);
        assert!(b.busy);
        // 30 KiB over 20 ms: 1.5 MB/s, scaled down to the window.
        let mut b = batching(RATE_WINDOW * 2);
        b.account(30 * 1024, false);
        assert!(!b.busy);
        // Within a window nothing is decided yet.
        let mut b = batching(Duration::ZERO);
        b.account(1 << 20, false);
        assert!(!b.busy);
        assert_eq!(b.window_bytes, 1 << 20);
    }

    #[test]
    fn a_wait_that_finds_little_ends_the_busy_spell() {
        let mut b = batching(RATE_WINDOW);
        b.account(64 * 1024, false);
        assert!(b.busy);
        // Waited out the timer and found a full quarter batch: still busy.
        b.account(BATCH_BYTES as usize / 4, true);
        assert!(b.busy);
        b.account(BATCH_BYTES as usize / 4 - 1, true);
        assert!(!b.busy);
        assert_eq!(b.window_bytes, 0);
    }

    #[test]
    fn catching_up_a_short_pause_keeps_the_stream_busy() {
        let mut b = batching(Duration::ZERO);
        b.catching_up = true;
        b.busy = true;
        b.account(1000, false);
        b.lull();
        assert!(b.busy, "a pause just after bytes arrived");
        b.account(10, true);
        assert!(b.busy, "a small timed-out read just after bytes arrived");
        b.last_bytes = Instant::now() - CATCH_UP_PAUSE;
        b.lull();
        assert!(!b.busy, "a pause as long as CATCH_UP_PAUSE ends it");
        // Live again: the first pause ends the spell.
        b.busy = true;
        b.catching_up = false;
        b.account(1000, false);
        b.lull();
        assert!(!b.busy);
    }

    #[test]
    fn a_socket_that_refuses_the_mark_says_so() {
        let mut b = Batching::new(-1);
        assert!(!b.mark(true));
        assert!(!b.raised);
        // Lowering an unraised mark needs no system call.
        assert!(b.mark(false));
        assert_eq!(b.queued(), 0);
    }
}
