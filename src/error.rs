//! The connector's one error, over the layers' own: why it stopped, and
//! what the operator should do about it.

use std::fmt;

use crate::{config, decode, mapping, sink, source};

/// Why the connector stopped. Each variant says whether waiting helps and
/// what the operator should look at.
#[derive(Debug)]
pub enum Error {
    Config(config::ConfigError),
    Source(source::SourceError),
    Decode(decode::DecodeError),
    Map(mapping::MapError),
    Sink(sink::SinkError),
    /// A setup problem found outside the layers above: the connector's
    /// own surroundings (its metrics address, the runtime, the output).
    Setup(String),
    /// A command was given an argument it cannot act on (an unknown table,
    /// a malformed name): nothing was changed.
    Usage(String),
    /// A task of the connector ended in a way it never should (a panic):
    /// a bug. Nothing past what ConveYour acknowledged was confirmed.
    Internal(String),
}

impl Error {
    /// A task that ended without its result (it panicked, or was cancelled
    /// where nothing cancels it): `what` names the task.
    pub(crate) fn task_failed(what: &str, e: tokio::task::JoinError) -> Error {
        Error::Internal(format!("{what} ended unexpectedly: {e}"))
    }

    /// A hint for the operator, shown after the error.
    pub fn hint(&self) -> &'static str {
        match self {
            Error::Config(e) => e.hint(),
            Error::Source(e) => e.hint(),
            Error::Decode(_) => "this is a bug or an unsupported server; report it with the LSN, the position was not advanced",
            Error::Map(_) => "fix the row or the mapping, then restart; the position was not advanced, so nothing is lost",
            Error::Sink(e) => e.hint(),
            Error::Setup(_) => "fix the setup named above, then restart",
            Error::Usage(_) => "nothing was changed; fix the argument named above (see --help)",
            Error::Internal(_) => "this is a bug, please report it with the log above; restarting resumes from the last confirmed position, so nothing is lost",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => e.fmt(f),
            Error::Source(e) => e.fmt(f),
            Error::Decode(e) => e.fmt(f),
            Error::Map(e) => e.fmt(f),
            Error::Sink(e) => e.fmt(f),
            Error::Setup(e) | Error::Usage(e) | Error::Internal(e) => f.write_str(e),
        }
    }
}

/// Transparent: the layer's error is what `Display` shows, and its cause
/// (a source error's tokio-postgres error) is this one's.
impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Source(e) => std::error::Error::source(e),
            _ => None,
        }
    }
}

impl From<config::ConfigError> for Error {
    fn from(e: config::ConfigError) -> Self {
        Error::Config(e)
    }
}
impl From<source::SourceError> for Error {
    fn from(e: source::SourceError) -> Self {
        Error::Source(e)
    }
}
impl From<decode::DecodeError> for Error {
    fn from(e: decode::DecodeError) -> Self {
        Error::Decode(e)
    }
}
impl From<mapping::MapError> for Error {
    fn from(e: mapping::MapError) -> Self {
        Error::Map(e)
    }
}
impl From<sink::SinkError> for Error {
    fn from(e: sink::SinkError) -> Self {
        Error::Sink(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_that_panics_is_reported_as_a_bug_not_a_setup_problem() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let joined = rt.block_on(async { tokio::spawn(async { panic!("boom") }).await });
        let e = Error::task_failed("the replication reader", joined.unwrap_err());
        assert!(matches!(e, Error::Internal(_)));
        assert!(
            e.to_string()
                .starts_with("the replication reader ended unexpectedly"),
            "{e}"
        );
        assert!(
            e.hint().starts_with("this is a bug, please report it"),
            "{}",
            e.hint()
        );
    }
}
