//! The replication stream once started: XLogData and keepalives read in
//! batches from the socket, and standby status updates written back.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use super::wire::{
    closed, parse_frame, proto, read_failed, reserve, server_error, unexpected, Frame, Io,
    READ_CHUNK,
};
use super::SourceError;
use crate::lsn::Lsn;
use crate::pg_time::pg_now;

/// The stream's two halves over the connection `io` once replication has
/// started, keeping what was already read into `buf`; `tcp` is the socket,
/// for batched reads.
pub(super) fn split(
    io: Box<dyn Io>,
    buf: BytesMut,
    tcp: Option<RawFd>,
) -> (ReplicationReader, ReplicationWriter) {
    let (rd, wr) = tokio::io::split(io);
    (
        ReplicationReader {
            rd,
            buf,
            batching: tcp.map(Batching::new),
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
    )
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

/// Socket low-water mark while the stream is busy: the reader wakes once
/// this much has arrived rather than once per change. A quarter of the
/// kernel's usual starting receive buffer (128 KiB), so setting it never
/// has the kernel clamp the TCP window to it.
pub(super) const BATCH_BYTES: i32 = 32 * 1024;
/// Longest a busy stream's bytes wait for [`BATCH_BYTES`] before the reader
/// takes what there is. Bounds the latency batching adds at the end of a
/// burst; tokio's timer rounds it up to the next millisecond.
pub(super) const BATCH_WAIT: Duration = Duration::from_millis(1);
/// How often the reader decides whether the stream is busy.
pub(super) const RATE_WINDOW: Duration = Duration::from_millis(10);
/// Bytes per [`RATE_WINDOW`] from which the stream counts as busy: 2 MB/s,
/// some 13,000 changes a second. Below it every change wakes the reader at
/// once, so a trickle of changes sees no added latency.
pub(super) const BUSY_BYTES: u64 = 20 * 1024;
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
pub(super) struct Batching {
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
