//! The integration tests, compiled as one binary so they share one throwaway
//! PostgreSQL cluster (see `support::pg`).
//!
//! Test modules are added here per area (replication, delivery, config, ...).

mod support;

mod auth;
mod cli;
mod faults;
mod observe;
mod harness;
mod reliability;
mod spine;
mod sql;
