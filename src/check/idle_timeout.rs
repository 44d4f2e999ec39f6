//! PostgreSQL 18's `idle_replication_slot_timeout`: a slot no one streams
//! from for that long is invalidated at the next checkpoint, and its
//! changes are gone. A connector that is down longer than that (a crash
//! over a weekend, a broken deploy) loses its slot.

use super::result::{pass, warn, CheckResult};

const NAME: &str = "idle_replication_slot_timeout";

/// The shortest timeout `check` accepts without a warning: three days, a
/// connector down from a Friday evening until someone looks on Monday
/// (about 64 hours) keeps its slot.
pub(super) const OUTAGE_TO_RIDE_OUT_SECS: i64 = 3 * 24 * 3600;

/// None when the server has no such setting (before 18), or it is 0 (off).
pub(super) async fn idle_timeout(client: &tokio_postgres::Client) -> Option<CheckResult> {
    let row = client
        .query_opt(
            "SELECT setting::int8, unit FROM pg_settings WHERE name = 'idle_replication_slot_timeout'",
            &[],
        )
        .await
        .ok()??;
    let (setting, unit): (i64, Option<String>) = (row.get(0), row.get(1));
    let seconds = setting
        * match unit.as_deref() {
            Some("min") => 60,
            Some("h") => 3600,
            Some("d") => 86_400,
            _ => 1,
        };
    judge(seconds)
}

fn judge(seconds: i64) -> Option<CheckResult> {
    if seconds <= 0 {
        return None;
    }
    let shown = human(seconds);
    Some(if seconds < OUTAGE_TO_RIDE_OUT_SECS {
        warn(
            NAME,
            format!("is {shown}: a connector stopped for longer (a crash over a weekend, a broken deploy) finds its slot invalidated (idle_timeout) and the changes it held gone; raise it to 3 days or more (ALTER SYSTEM SET idle_replication_slot_timeout = '3d'; SELECT pg_reload_conf();), or set it to 0"),
        )
    } else {
        pass(
            NAME,
            format!("is {shown}: a connector stopped for longer loses its slot (idle_timeout)"),
        )
    })
}

/// Seconds in the largest whole unit: `90s`, `30min`, `2h`, `3d`.
fn human(seconds: i64) -> String {
    for (unit, size) in [("d", 86_400), ("h", 3600), ("min", 60)] {
        if seconds % size == 0 {
            return format!("{}{unit}", seconds / size);
        }
    }
    format!("{seconds}s")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Mark;

    #[test]
    fn a_timeout_shorter_than_a_weekend_outage_warns() {
        assert!(judge(0).is_none());
        let short = judge(3600).unwrap();
        assert_eq!(short.mark, Mark::Warn);
        assert!(short.detail.starts_with("is 1h:"), "{}", short.detail);
        assert_eq!(
            judge(OUTAGE_TO_RIDE_OUT_SECS - 60).unwrap().mark,
            Mark::Warn
        );
        let long = judge(OUTAGE_TO_RIDE_OUT_SECS).unwrap();
        assert_eq!(long.mark, Mark::Ok);
        assert!(long.detail.starts_with("is 3d:"), "{}", long.detail);
        assert_eq!(human(90), "90s");
        assert_eq!(human(1800), "30min");
    }
}
