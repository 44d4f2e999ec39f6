//! conveyour-cdc streams a Postgres database's row changes into ConveYour.

pub mod decode;
pub mod lsn;
