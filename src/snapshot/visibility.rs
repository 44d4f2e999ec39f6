//! Which transactions a snapshot sees (`pg_current_snapshot()`).

use tokio_postgres::Client;

use crate::source::SourceError;

/// Which transactions a snapshot sees, as `pg_current_snapshot()` tells:
/// every one before `xmin`, and those before `xmax` not in `xip` (64-bit
/// transaction ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Visibility {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl Visibility {
    /// Parses `pg_current_snapshot()`'s text form, `xmin:xmax:xip,...`.
    pub(crate) fn parse(text: &str) -> Option<Visibility> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = parts
            .next()?
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().ok())
            .collect::<Option<Vec<u64>>>()?;
        Some(Visibility { xmin, xmax, xip })
    }

    /// Whether the snapshot sees the committed transaction `xid` (the
    /// 32-bit id pgoutput sends, taken in the epoch nearest `xmax`).
    pub(crate) fn sees(&self, xid: u32) -> bool {
        const EPOCH: u64 = 1 << 32;
        let mut full = (self.xmax & !(EPOCH - 1)) | u64::from(xid);
        if full > self.xmax.saturating_add(EPOCH / 2) && full >= EPOCH {
            full -= EPOCH;
        } else if full.saturating_add(EPOCH / 2) < self.xmax {
            full += EPOCH;
        }
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

/// Starts a read-only repeatable-read transaction and returns what its
/// snapshot sees.
pub(super) async fn begin_snapshot(client: &Client) -> Result<Visibility, SourceError> {
    let rows = client
        .simple_query(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT pg_current_snapshot()::text",
        )
        .await
        .map_err(|e| SourceError::from_sql("starting a sync chunk's read", e))?;
    snapshot_of(rows)
}

/// What a snapshot taken now sees.
pub(crate) async fn current_snapshot(client: &Client) -> Result<Visibility, SourceError> {
    let rows = client
        .simple_query("SELECT pg_current_snapshot()::text")
        .await
        .map_err(|e| SourceError::from_sql("reading the current snapshot", e))?;
    snapshot_of(rows)
}

fn snapshot_of(rows: Vec<tokio_postgres::SimpleQueryMessage>) -> Result<Visibility, SourceError> {
    let text = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    text.as_deref()
        .and_then(Visibility::parse)
        .ok_or_else(|| {
            SourceError::config(format!(
                "pg_current_snapshot() returned {text:?}, not xmin:xmax:xip; is the server PostgreSQL 13 or later?"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_sees_what_ended_before_it() {
        let s = Visibility::parse("10:20:12,15").unwrap();
        assert!(s.sees(9));
        assert!(!s.sees(12));
        assert!(s.sees(13));
        assert!(!s.sees(15));
        assert!(s.sees(19));
        assert!(!s.sees(20));
        assert!(!s.sees(25));
        assert_eq!(Visibility::parse("7:7:").unwrap().xip, Vec::<u64>::new());
        assert!(Visibility::parse("7:x:").is_none());
        assert!(Visibility::parse("").is_none());
    }

    #[test]
    fn a_32_bit_id_is_taken_in_the_epoch_nearest_the_snapshot() {
        let epoch = 1u64 << 32;
        let s = Visibility::parse(&format!("{}:{}:{}", epoch - 5, epoch + 5, epoch + 2)).unwrap();
        assert!(s.sees(0xFFFF_FFF0), "the previous epoch's id is long done");
        assert!(s.sees(0xFFFF_FFFC), "before xmin's wrap");
        assert!(!s.sees(2), "in progress across the wrap");
        assert!(s.sees(3));
        assert!(!s.sees(7), "after xmax");
    }
}
