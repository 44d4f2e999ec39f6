//! The sink's error: a request ConveYour would not take, with what the
//! operator should do about it.

use std::fmt;

use super::Endpoint;

/// A request ConveYour will not accept as it is. The position does not
/// move past it.
#[derive(Debug, Clone)]
pub struct SinkError {
    pub(super) endpoint: Endpoint,
    pub(super) count: usize,
    pub(super) first: Option<(String, String, crate::lsn::Lsn)>,
    /// The HTTP status; 2xx when the body did not say ok.
    pub(super) status: u16,
    /// ConveYour's message.
    pub(super) message: String,
    pub(super) attempts: u32,
}

impl SinkError {
    /// What the operator should do.
    pub fn hint(&self) -> &'static str {
        if self.status == UNTRUSTED_CERTIFICATE {
            "the certificate ConveYour's address presented is not trusted here: if a TLS-inspecting proxy or a private endpoint serves it, give its CA certificate (PEM) in conveyour.ca_file; otherwise check conveyour.url; the position was not advanced, so nothing is lost"
        } else if self.status == 501 {
            "ConveYour answered 501 Not Implemented: conveyour.url must be the account's address (https://SUBDOMAIN.conveyour.com), without a path; the position was not advanced, so nothing is lost"
        } else if self.is_content_rejection() {
            "fix the row or the mapping named above (or what ConveYour's message says), then restart; the position was not advanced, so nothing is lost"
        } else {
            "check conveyour.url, conveyour.appkey and conveyour.token; the position was not advanced, so nothing is lost"
        }
    }

    /// Whether ConveYour refused what the request says (a bad entry, or
    /// ConveYour failing in a way that looks the same), as opposed to who
    /// sent it or where (credentials, URL, 501), which no entry can be
    /// blamed for and which stops the connector.
    pub fn is_content_rejection(&self) -> bool {
        matches!(self.status, 200..=299 | 400..=499)
            && !matches!(self.status, 401 | 403 | 404 | 405 | 407)
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.endpoint {
            Endpoint::Identify => "identify entries",
            Endpoint::Track => "track events",
        };
        write!(f, "ConveYour rejected a request of {} {what}", self.count)?;
        if let Some((table, contact, lsn)) = &self.first {
            let lead = if self.count > 1 { "first: " } else { "" };
            write!(f, " ({lead}table {table}, id {contact}, LSN {lsn})")?;
        }
        if self.status == UNTRUSTED_CERTIFICATE {
            return write!(
                f,
                " after {} attempt(s): no reply, the TLS handshake refused its certificate: {}",
                self.attempts, self.message
            );
        }
        write!(
            f,
            " after {} attempt(s): HTTP {}: {}",
            self.attempts, self.status, self.message
        )
    }
}

impl std::error::Error for SinkError {}

/// The status a [`SinkError`] carries when no reply came because the TLS
/// handshake refused ConveYour's certificate: no HTTP status is 1.
pub(super) const UNTRUSTED_CERTIFICATE: u16 = 1;
