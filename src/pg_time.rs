//! Postgres's clock: commit times and the replication protocol's
//! timestamps are microseconds since 2000-01-01 UTC.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds from the Unix epoch to Postgres's epoch, 2000-01-01 UTC.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Now, as microseconds since 2000-01-01 UTC, the protocol's clock.
pub(crate) fn pg_now() -> i64 {
    let us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    us - PG_EPOCH_OFFSET_US
}

/// A protocol timestamp (µs since 2000-01-01 UTC) as Unix milliseconds.
pub(crate) fn unix_ms(us: i64) -> u64 {
    (us.saturating_add(PG_EPOCH_OFFSET_US) / 1000).max(0) as u64
}
