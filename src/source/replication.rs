//! The replication connection: the Postgres wire protocol's startup,
//! authentication and CopyBoth streaming, built on postgres-protocol's
//! message codecs (tokio-postgres has no replication support).

use std::os::fd::{AsRawFd, RawFd};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::{self, ReplicationReader, ReplicationWriter};
use super::tls;
use super::wire::{proto, read_frame, server_error, unexpected, Frame, Io, READ_CHUNK};
use super::SourceError;
use crate::config::{ConnParams, Host, SslMode, TargetSessionAttrs};
use crate::lsn::Lsn;
use crate::sql::quote_command_literal;

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
        let rows = self.simple_query(super::session::READ_ONLY_PROBE).await?;
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
            ("options", super::session::SESSION_OPTIONS),
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
                crate::sql::quote_ident(slot)
            )
        } else {
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                crate::sql::quote_ident(slot)
            )
        };
        let rows = match self.simple_query(&sql).await {
            Ok(rows) => rows,
            // duplicate_object: the slot exists already.
            Err(e) if e.sqlstate() == Some("42710") => return Ok(None),
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
            crate::sql::quote_ident(slot)
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
            .map(|p| crate::sql::quote_ident(p))
            .collect();
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (\"proto_version\" '1', \"publication_names\" {}{})",
            crate::sql::quote_ident(slot),
            start,
            quote_command_literal(&names.join(",")),
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
        Ok(stream::split(self.io, self.rbuf, self.tcp))
    }
}

fn io_err(params: &ConnParams) -> impl Fn(std::io::Error) -> SourceError + '_ {
    move |e| SourceError::transient(format!("talking to {params}: {e}"))
}

fn auth_failed(params: &ConnParams) -> impl Fn(std::io::Error) -> SourceError + '_ {
    move |e| SourceError::config(format!("SCRAM authentication with {params} failed: {e}"))
}
