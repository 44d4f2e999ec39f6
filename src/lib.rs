//! conveyour-cdc streams a Postgres database's row changes into ConveYour:
//! inserts and updates of identify tables become identify calls, rows of
//! track tables become track events, and a replication position is
//! confirmed to Postgres only after ConveYour acknowledged everything up to
//! it.
//!
//! The stages, private, in the order a change goes through them: `source`
//! (connections, slot, replication stream), `decode` (pgoutput and
//! values), `mapping` (rows to actions), `sendable` (the contact
//! resolved), `sink` (requests to ConveYour); `snapshot` (initial sync and
//! resync) and `state` (progress and dead letters in the database) beside
//! them. The public surface is what the binary drives: [`config`],
//! [`pipeline`] (the running connector), [`check`] (preflight),
//! [`preview`] (what the mapping would send, read-only), [`status`],
//! [`telemetry`], [`shutdown`], and the few functions re-exported below.

pub mod check;
pub mod config;
mod decode;
mod error;
pub(crate) mod event;
mod json;
pub mod lsn;
mod mapping;
mod pg_time;
pub mod pipeline;
pub mod preview;
mod sendable;
pub mod shutdown;
mod sink;
mod snapshot;
mod source;
mod sql;
mod state;
pub mod status;
pub mod telemetry;

// What the binary's commands need from the stages, beside the command
// modules above; the stages themselves stay private.
pub use snapshot::request_resync;
pub use source::connect;
pub use state::{list_dead_letters, purge_dead_letters};

pub use error::Error;
