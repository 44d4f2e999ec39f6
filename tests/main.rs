//! The integration tests, compiled as one binary so they share one throwaway
//! PostgreSQL cluster (see `support::pg`).
//!
//! One module per area (`spine`, `faults`, `dead_letters`, `sync`, ...); each
//! test gets a database of its own in that cluster (`support::setup::world`).

mod support;

mod auth;
mod ci;
mod cli;
mod concurrency;
mod dead_letters;
mod docs;
mod failover;
mod faults;
mod harness;
mod layout;
mod mapping;
mod observe;
mod preview;
mod publication;
mod reliability;
mod slots;
mod spine;
mod sql;
mod sync;
