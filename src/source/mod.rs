//! The source side: connections to Postgres, the publication and slot the
//! connector owns, and the logical replication stream.

mod catalog;
mod failover;
mod generated;
mod invalidation;
mod lookup;
mod publication;
mod replication;
mod rows;
mod schema;
mod session;
mod slot;
mod stream;
mod tls;
mod visibility;
mod wire;

use std::fmt;
use std::sync::Arc;

pub use crate::config::{ConnParams, Host, TargetSessionAttrs};
pub(crate) use catalog::{connect_sql, in_recovery, lookup_indexed, Catalog};
#[cfg(test)]
pub(crate) use failover::StandbySlot;
pub(crate) use failover::{failover_wanted, standbys, PrimaryFailover, StandbyFailover};
pub(crate) use generated::{
    generated_columns, needing_publish, publish_statement, publishes_generated,
    PUBLISH_GENERATED_SINCE,
};
pub(crate) use invalidation::invalidated;
pub use invalidation::Invalidation;
pub(crate) use lookup::Resolver;
pub use lookup::{CacheChange, ContactRef};
pub(crate) use publication::{
    create_statement, current_filters, ensure_publication, insert_publication, plan, probe_filter,
    publication_exists, published_table_names, replica_identity, server_version_num,
    visible_to_slot, FilterVerdict, Plan, PublicationState, ReplicaIdentity, Route,
};
pub(crate) use replication::ReplicationConn;
pub(crate) use rows::{key_at, Key, TableReader};
pub use schema::{LookupTarget, Schema};
#[cfg(test)]
pub(crate) use slot::SyncedSlot;
pub(crate) use slot::{
    check_slot, free_slots, require_slot, slot_active, slot_confirmed, slot_failover, slot_info,
    slot_invalidation, slot_retention, slot_state, FAILOVER_SLOTS_SINCE,
};
pub(crate) use stream::{ReplicationMessage, ReplicationReader, ReplicationWriter, CATCH_UP_PAUSE};
pub(crate) use visibility::{begin_snapshot, current_snapshot, Visibility};

/// Opens an ordinary SQL session to the source database (for the
/// subcommands that read or manage the connector's own tables).
pub async fn connect(params: &ConnParams) -> Result<tokio_postgres::Client, SourceError> {
    connect_sql(params).await
}

/// What to do about a source error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceErrorKind {
    /// The connection broke or the server is busy (restarting, slot still
    /// held by a dying session): reconnect after a pause.
    Transient,
    /// The setup is wrong (credentials, privileges, missing objects, TLS):
    /// a person must fix it; retrying will not help.
    Setup,
    /// Another connector streams from the slot: stand by and try again
    /// soon, to take over quickly when it goes away.
    SlotBusy,
    /// The server invalidated the slot: its changes are gone, and a person
    /// must drop it; the hint says how to keep it from happening again.
    SlotInvalidated(Invalidation),
    /// The slot was dropped under the running connector: its position is
    /// gone with it.
    SlotDropped,
    /// The publication the stream reads does not exist (dropped, or never
    /// made by a role that may not create it).
    PublicationMissing,
}

/// An error from the source database, with what to do about it.
#[derive(Debug, Clone)]
pub struct SourceError {
    kind: SourceErrorKind,
    message: String,
    /// The server's SQLSTATE, when the server refused.
    sqlstate: Option<String>,
    /// What went wrong underneath, for [`std::error::Error::source`].
    cause: Option<Arc<tokio_postgres::Error>>,
}

impl SourceError {
    pub(crate) fn transient(message: String) -> Self {
        SourceError {
            kind: SourceErrorKind::Transient,
            message,
            sqlstate: None,
            cause: None,
        }
    }

    /// The slot was invalidated for `why` (see [`invalidated`]).
    pub(crate) fn invalidated(why: Invalidation, message: String) -> Self {
        SourceError {
            kind: SourceErrorKind::SlotInvalidated(why),
            message,
            sqlstate: None,
            cause: None,
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        SourceError {
            kind: SourceErrorKind::Setup,
            message: message.into(),
            sqlstate: None,
            cause: None,
        }
    }

    /// The slot `slot` was dropped while this connector used it.
    pub(crate) fn slot_dropped(slot: &str, when: &str) -> Self {
        Self::slot_gone(slot, &format!("was dropped {when}"))
    }

    /// The slot `slot`, which this connector used, is gone: `what` says how.
    pub(crate) fn slot_gone(slot: &str, what: &str) -> Self {
        SourceError {
            kind: SourceErrorKind::SlotDropped,
            message: format!("postgres.slot: slot {slot} {what}: its position is gone"),
            sqlstate: None,
            cause: None,
        }
    }

    /// The same error with what to do in this place added to its message;
    /// its kind, SQLSTATE and cause stay.
    pub(crate) fn with_advice(mut self, advice: &str) -> Self {
        self.message = format!("{}; {advice}", self.message);
        self
    }

    /// The server's SQLSTATE, when the server refused.
    pub fn sqlstate(&self) -> Option<&str> {
        self.sqlstate.as_deref()
    }

    /// Classifies a server error by its SQLSTATE.
    pub(crate) fn from_sqlstate(code: &str, message: String) -> Self {
        if code == "55006" {
            // object_in_use: "replication slot … is active for PID …"
            return SourceError {
                kind: SourceErrorKind::SlotBusy,
                message,
                sqlstate: Some(code.to_owned()),
                cause: None,
            };
        }
        if code == "42704" && message.contains("replication slot") {
            // undefined_object, for the slot START_REPLICATION names: it
            // was there a moment ago, when the session checked.
            return SourceError {
                kind: SourceErrorKind::SlotDropped,
                message: format!("{message}: the slot was dropped as the connector started to stream from it, and its position is gone"),
                sqlstate: Some(code.to_owned()),
                cause: None,
            };
        }
        if code == "42704" && message.contains("publication") {
            // undefined_object, for the publication START_REPLICATION names
            return SourceError {
                kind: SourceErrorKind::PublicationMissing,
                message,
                sqlstate: Some(code.to_owned()),
                cause: None,
            };
        }
        let transient = matches!(
            code,
            // admin_shutdown, crash_shutdown, cannot_connect_now
            |"57P01"| "57P02" | "57P03"
            // too_many_connections, configuration_limit_exceeded
            | "53300" | "53400"
            // serialization / deadlock on catalog queries
            | "40001" | "40P01"
        ) || code.starts_with("08");
        SourceError {
            kind: if transient {
                SourceErrorKind::Transient
            } else {
                SourceErrorKind::Setup
            },
            message,
            sqlstate: Some(code.to_owned()),
            cause: None,
        }
    }

    pub(crate) fn from_sql(context: &str, e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => {
                let mut text = format!(
                    "{context}: {} (SQLSTATE {})",
                    db.message(),
                    db.code().code()
                );
                if let Some(hint) = db.hint() {
                    text.push_str(&format!("; hint: {hint}"));
                }
                Self::from_sqlstate(db.code().code(), text).caused_by(e)
            }
            None if e.is_closed() => {
                Self::transient(format!("{context}: the connection closed")).caused_by(e)
            }
            None => Self::transient(format!("{context}: {}", with_causes(&e))).caused_by(e),
        }
    }

    fn caused_by(mut self, e: tokio_postgres::Error) -> Self {
        self.cause = Some(Arc::new(e));
        self
    }

    /// A failed attempt to open an SQL session to `params`. Names the
    /// cause (refused, no password, …) instead of tokio-postgres's bare
    /// "error connecting to server".
    pub(crate) fn from_connect(params: &ConnParams, e: tokio_postgres::Error) -> Self {
        use std::error::Error as _;
        if e.as_db_error().is_none() {
            // tokio-postgres reports a password the server asked for but
            // was not given as a configuration error, "password missing".
            if e.source()
                .is_some_and(|c| c.to_string() == "password missing")
            {
                return Self::password_missing(params);
            }
            // Kind::Connect: the socket could not be opened. Other kinds
            // (TLS, protocol) keep their own wording, with causes.
            let mut cause = e
                .source()
                .filter(|_| e.to_string() == "error connecting to server");
            while let Some(c) = cause {
                if let Some(io) = c.downcast_ref::<std::io::Error>() {
                    return Self::unreachable(params, io);
                }
                cause = c.source();
            }
        }
        Self::from_sql(&format!("connecting to {params}"), e)
    }

    /// The server asked for a password and the config gave none.
    pub(crate) fn password_missing(params: &ConnParams) -> Self {
        Self::config(format!(
            "{params}: the server asked for a password and none was given; put it in postgres.url (postgres://{}:PASSWORD@…) or set PGPASSWORD",
            params.user
        ))
    }

    /// The server's address could not be reached. Transient: a restarting
    /// server refuses connections for a moment.
    pub(crate) fn unreachable(params: &ConnParams, e: &std::io::Error) -> Self {
        let at = params.address();
        let advice = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "; is the server running, and is postgres.url's port right?"
            }
            std::io::ErrorKind::NotFound if matches!(params.host, Host::Socket(_)) => {
                "; is the server running, and are postgres.url's host directory and port right?"
            }
            _ => "",
        };
        Self::transient(format!("cannot connect to {at}: {}{advice}", io_reason(e)))
    }

    /// A host skipped because `target_session_attrs=read-write` asks for
    /// the primary and this server is read-only. Transient: a standby may
    /// be promoted.
    pub(crate) fn read_only(params: &ConnParams, in_recovery: bool) -> Self {
        let why = if in_recovery {
            "a standby in recovery"
        } else {
            "default_transaction_read_only is on"
        };
        Self::transient(format!(
            "{} is read-only ({why}); target_session_attrs=read-write skips it",
            params.address()
        ))
    }

    /// No host of a multi-host URL would do: each one's reason, in order.
    /// A setup error only when every host gave one; otherwise transient, as
    /// a host that is down or still a standby may come back as the primary.
    pub(crate) fn no_host(params: &ConnParams, failures: Vec<SourceError>) -> Self {
        if failures.len() == 1 {
            return failures.into_iter().next().expect("one failure");
        }
        let setup = failures.iter().all(|e| e.kind == SourceErrorKind::Setup);
        let reasons: Vec<String> = failures.iter().map(|e| e.message.clone()).collect();
        let message = format!(
            "no host of {params} would do{}: {}",
            match params.target_session_attrs {
                TargetSessionAttrs::ReadWrite => " (target_session_attrs=read-write)",
                TargetSessionAttrs::Any => "",
            },
            reasons.join("; ")
        );
        if setup {
            Self::config(message)
        } else {
            Self::transient(message)
        }
    }

    pub fn kind(&self) -> SourceErrorKind {
        self.kind
    }

    /// Worth retrying: the connection broke, or the slot is busy.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            SourceErrorKind::Transient | SourceErrorKind::SlotBusy
        )
    }

    /// The SQLSTATE says the object already exists: another connector won
    /// a race to create it.
    pub(crate) fn already_exists(e: &tokio_postgres::Error) -> bool {
        e.as_db_error()
            .is_some_and(|db| matches!(db.code().code(), "42710" | "42P06" | "23505" | "42P07"))
    }

    /// What the operator should look at.
    pub fn hint(&self) -> &'static str {
        match self.kind {
            SourceErrorKind::Transient => "the connector reconnects by itself; check the database's availability if this repeats",
            SourceErrorKind::Setup => "run `conveyour-cdc check --config FILE` to see what the database is missing",
            SourceErrorKind::SlotBusy => "another connector holds the slot; this one takes over when it stops",
            SourceErrorKind::SlotInvalidated(why) => why.prevention(),
            SourceErrorKind::PublicationMissing => "restart: `run` creates the publication when its role may; otherwise create it as sql/setup.sql shows, then restart",
            SourceErrorKind::SlotDropped => "the changes since the last confirmed position are gone with the slot; restart to create a new one (tables with `snapshot: initial` are copied again), and find who dropped it or, after a failover, why the new primary had no copy (docs/operations.md, Failover)",
        }
    }
}

/// An error and each of its causes, `: `-separated: tokio-postgres keeps
/// the reason (e.g. the I/O error) in `source()`, not in its `Display`.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// An I/O error's reason in lower case, without Rust's "(os error N)".
fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_server_refusal_keeps_its_sqlstate_and_a_dropped_slot_says_its_position_is_gone() {
        let e = SourceError::from_sqlstate("42501", "permission denied".into());
        assert_eq!(e.sqlstate(), Some("42501"));
        assert!(!e.is_transient());
        let e = SourceError::from_sqlstate("57P01", "terminating connection".into());
        assert_eq!(e.sqlstate(), Some("57P01"));
        assert!(e.is_transient());
        assert!(SourceError::transient("x".into()).source().is_none());

        let missing = SourceError::from_sqlstate(
            "42704",
            "Postgres: publication \"conveyour_cdc\" does not exist (SQLSTATE 42704)".into(),
        );
        assert_eq!(missing.kind(), SourceErrorKind::PublicationMissing);
        assert!(
            missing.hint().contains("sql/setup.sql"),
            "{}",
            missing.hint()
        );

        let dropped = SourceError::slot_dropped("conveyour_cdc", "while streaming");
        assert!(!dropped.is_transient());
        assert_eq!(dropped.kind(), SourceErrorKind::SlotDropped);
        assert!(dropped.to_string().contains("its position is gone"));
        // Not the setup hint: nothing is missing that `check` would find.
        assert!(!dropped.hint().contains("check"), "{}", dropped.hint());
        assert!(dropped.hint().contains("restart"), "{}", dropped.hint());
    }
}
