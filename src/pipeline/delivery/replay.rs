//! What a restart may skip, and the task that records it.
//!
//! Delivery records a mark after which nothing is known delivered: every
//! action up to it is acknowledged (its low-water mark). On a restart the
//! stream resumes at the slot's confirmed position, which is a commit
//! boundary; rows after it and up to the mark are skipped, so what repeats
//! is only what was acknowledged above the mark when the connector died.
//! Delivery never hands out an action more than its window past the
//! recorded mark, which bounds that.

use tokio::sync::watch;

use crate::state::{Progress, State};
use crate::Error;

/// What a restart may skip: the rows before a recorded mark.
#[derive(Debug, Clone, Copy)]
pub(in crate::pipeline) struct Replay {
    mark: Progress,
}

impl Replay {
    /// From recorded `(lane, lanes, progress)` rows. Versions before
    /// adaptive concurrency recorded one row per lane; only a row every one
    /// of those lanes had passed is surely delivered.
    pub(in crate::pipeline) fn new(rows: &[(usize, usize, Progress)]) -> Option<Replay> {
        if rows.is_empty() {
            return None;
        }
        let lanes = rows.iter().map(|(_, n, _)| *n).max().unwrap_or(0);
        let mark = if rows.len() < lanes {
            Progress::default()
        } else {
            rows.iter().map(|(_, _, p)| *p).min().unwrap_or_default()
        };
        Some(Replay { mark })
    }

    /// Whether this row was delivered before.
    pub(in crate::pipeline) fn covers(&self, at: Progress) -> bool {
        at <= self.mark
    }
}

/// Records marks as delivery hands them over, newest first (a mark
/// superseded while a write runs is never written), and reports the
/// sequence number of each mark once it is durable.
pub(super) async fn record(
    state: State,
    mut marks: watch::Receiver<(u64, Progress)>,
    recorded: watch::Sender<u64>,
) -> Result<(), Error> {
    while marks.changed().await.is_ok() {
        let (seq, at) = *marks.borrow_and_update();
        state.save_lane_progress(0, 1, at).await?;
        recorded.send_replace(seq);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    fn at(commit: u64, change: u64) -> Progress {
        Progress {
            commit_lsn: Lsn(commit),
            change,
        }
    }

    #[test]
    fn one_mark_skips_what_is_at_or_before_it() {
        let r = Replay::new(&[(0, 1, at(100, 50))]).unwrap();
        assert!(r.covers(at(100, 50)));
        assert!(r.covers(at(99, 999)));
        assert!(!r.covers(at(100, 51)));
        assert!(!r.covers(at(101, 1)));
        assert!(Replay::new(&[]).is_none());
    }

    #[test]
    fn lanes_of_an_earlier_version_count_as_far_as_every_one_passed() {
        let rows = vec![(0, 2, at(100, 5)), (1, 2, at(80, 9))];
        let r = Replay::new(&rows).unwrap();
        assert!(r.covers(at(80, 9)));
        assert!(!r.covers(at(80, 10)));
        // A lane that never recorded anything: nothing is known.
        let r = Replay::new(&[(0, 2, at(100, 5))]).unwrap();
        assert!(!r.covers(at(1, 1)));
    }
}
