//! The integration tests, compiled as one binary so they share one throwaway
//! PostgreSQL cluster (see `support::pg`).
//!
//! Test modules are added here per area (replication, delivery, config, ...).

mod support;

mod auth;
mod cli;
mod dead_letters;
mod docs;
mod faults;
mod harness;
mod mapping;
mod observe;
mod preview;
mod publication;
mod reliability;
mod spine;
mod sql;
mod sync;
