//! The replication connection's wire: frames read off the socket, and the
//! errors the wire itself raises. Shared by the handshake
//! ([`super::replication`]) and the started stream ([`super::stream`]).

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::SourceError;

/// Read buffer growth step; big enough for a typical XLogData burst.
pub(super) const READ_CHUNK: usize = 64 * 1024;

pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A frame off the wire: either a message postgres-protocol decodes, or one
/// of the CopyBoth messages it does not know.
pub(super) enum Frame {
    Message(Message),
    CopyBothResponse,
}

pub(super) async fn read_frame<R: AsyncRead + Unpin>(
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
pub(super) fn parse_frame(buf: &mut BytesMut) -> Result<Option<Frame>, SourceError> {
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
pub(super) fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

pub(super) fn read_failed(e: std::io::Error) -> SourceError {
    SourceError::transient(format!("reading from Postgres: {e}"))
}

pub(super) fn closed() -> SourceError {
    SourceError::transient("Postgres closed the connection".into())
}

pub(super) fn proto<E: std::fmt::Display>(e: E) -> SourceError {
    SourceError::transient(format!("protocol error on the replication connection: {e}"))
}

pub(super) fn unexpected(during: &str, m: &Message) -> SourceError {
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
pub(super) fn server_error(
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> SourceError {
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
