//! conveyour-cdc streams a Postgres database's row changes into ConveYour.

pub mod lsn;
