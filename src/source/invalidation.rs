//! Why the server invalidated the connector's slot, and what to do about
//! each reason.
//!
//! PostgreSQL 17 names the reason in `pg_replication_slots.invalidation_reason`
//! (18 adds `idle_timeout`). Before that, an invalidated slot shows only
//! `wal_status = lost` (16's `conflicting` is true for every invalidated
//! logical slot, so it tells nothing more). On a primary that can only be
//! `wal_removed`; 16's slots on a standby can also lose to recovery, and
//! then the reason is unknown.

use super::SourceError;

/// Why the server invalidated a slot. Whatever the reason, the changes the
/// slot held are gone: it must be dropped, and the next start creates a new
/// one and copies the `snapshot: initial` tables again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// `wal_removed`: the slot held more WAL than `max_slot_wal_keep_size`
    /// allows, and the WAL it needed was removed.
    WalRemoved,
    /// `rows_removed` (a slot on a standby): the primary vacuumed away
    /// catalog rows the slot still needed.
    RowsRemoved,
    /// `wal_level_insufficient` (a slot on a standby): the primary's
    /// `wal_level` went below `logical`.
    WalLevelInsufficient,
    /// `idle_timeout` (18+): no one streamed from the slot for longer than
    /// `idle_replication_slot_timeout`.
    IdleTimeout,
    /// Before 17, on a standby: `wal_removed`, `rows_removed` or
    /// `wal_level_insufficient`, and the server does not say which.
    OnStandby,
    /// A reason this version does not know.
    Other,
}

impl Invalidation {
    /// The reason from the slot's row: `invalidation_reason` (17+), else
    /// `wal_status` and whether the server is a standby. None when the
    /// slot is valid.
    pub(crate) fn from_slot(
        reason: Option<&str>,
        in_recovery: bool,
        wal_status: Option<&str>,
    ) -> Option<Invalidation> {
        Some(match reason {
            Some("wal_removed") => Invalidation::WalRemoved,
            Some("rows_removed") => Invalidation::RowsRemoved,
            Some("wal_level_insufficient") => Invalidation::WalLevelInsufficient,
            Some("idle_timeout") => Invalidation::IdleTimeout,
            Some(_) => Invalidation::Other,
            None if wal_status != Some("lost") => return None,
            None if in_recovery => Invalidation::OnStandby,
            // On a primary only max_slot_wal_keep_size invalidates a slot.
            None => Invalidation::WalRemoved,
        })
    }

    /// The reason as `invalidation_reason` spells it (`unknown` when the
    /// server does not say, or says something this version does not know).
    pub fn reason(self) -> &'static str {
        match self {
            Invalidation::WalRemoved => "wal_removed",
            Invalidation::RowsRemoved => "rows_removed",
            Invalidation::WalLevelInsufficient => "wal_level_insufficient",
            Invalidation::IdleTimeout => "idle_timeout",
            Invalidation::OnStandby | Invalidation::Other => "unknown",
        }
    }

    /// What happened.
    pub fn cause(self) -> &'static str {
        match self {
            Invalidation::WalRemoved => "it held more WAL than max_slot_wal_keep_size allows (the connector was stopped or fell behind), and the server removed WAL it still needed",
            Invalidation::RowsRemoved => "the slot is on a standby, and the primary vacuumed away catalog rows the slot still needed",
            Invalidation::WalLevelInsufficient => "the slot is on a standby, and the primary's wal_level went below logical",
            Invalidation::IdleTimeout => "no connector streamed from it for longer than idle_replication_slot_timeout",
            Invalidation::OnStandby => "the slot is on a standby, and PostgreSQL before 17 does not say why (max_slot_wal_keep_size, catalog rows the primary vacuumed away, or the primary's wal_level below logical)",
            Invalidation::Other => "the server gave a reason this version does not know",
        }
    }

    /// What happened to `slot`, and how to recover.
    pub fn recovery(self, slot: &str) -> String {
        format!(
            "{}; the changes it held are gone. Drop it with SELECT pg_drop_replication_slot('{slot}') and start again: the new slot copies every `snapshot: initial` table again, but changes to the other tables since the slot's position are not sent",
            self.cause()
        )
    }

    /// How to keep it from happening again (after dropping the slot).
    pub fn prevention(self) -> &'static str {
        match self {
            Invalidation::WalRemoved => "raise max_slot_wal_keep_size (or set it to -1) above the WAL the database writes during the longest connector outage to ride out, and alert on slot_retained_wal_bytes (postgres.retained_wal_warn_mb)",
            Invalidation::RowsRemoved => "turn on hot_standby_feedback on the standby, with a physical slot between primary and standby (primary_slot_name)",
            Invalidation::WalLevelInsufficient => "set wal_level = logical on the primary (ALTER SYSTEM SET wal_level = logical; then restart it)",
            Invalidation::IdleTimeout => "raise idle_replication_slot_timeout above the longest connector outage to ride out, or set it to 0 to turn it off",
            Invalidation::OnStandby => "check max_slot_wal_keep_size and hot_standby_feedback (with a physical slot between primary and standby) on the standby, and wal_level = logical on the primary",
            Invalidation::Other => "look the reason up in the PostgreSQL documentation of pg_replication_slots",
        }
    }
}

/// The error that stops the connector (and fails `check`) on an invalidated
/// slot: names the slot, the reason, what happened, and the recovery; its
/// hint is [`Invalidation::prevention`].
pub(crate) fn invalidated(slot: &str, why: Invalidation, reported: Option<&str>) -> SourceError {
    let how = match reported {
        Some(r) => format!("invalidation_reason = {r}"),
        None => "wal_status = lost".to_owned(),
    };
    SourceError::invalidated(
        why,
        format!(
            "postgres.slot: slot {slot} was invalidated by the server ({how}): {}",
            why.recovery(slot),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_comes_from_invalidation_reason_or_is_inferred() {
        use Invalidation::*;
        let lost = Some("lost");
        assert_eq!(Invalidation::from_slot(None, false, Some("reserved")), None);
        assert_eq!(Invalidation::from_slot(None, true, None), None);
        // Before 17, on a primary only max_slot_wal_keep_size invalidates.
        assert_eq!(Invalidation::from_slot(None, false, lost), Some(WalRemoved));
        // On a standby it may be recovery too.
        assert_eq!(Invalidation::from_slot(None, true, lost), Some(OnStandby));
        // 17+: the server says.
        for (word, why) in [
            ("wal_removed", WalRemoved),
            ("rows_removed", RowsRemoved),
            ("wal_level_insufficient", WalLevelInsufficient),
            ("idle_timeout", IdleTimeout),
            ("something_new", Other),
        ] {
            assert_eq!(Invalidation::from_slot(Some(word), true, lost), Some(why));
        }
    }

    #[test]
    fn each_reason_has_its_own_fix() {
        use Invalidation::*;
        let all = [
            WalRemoved,
            RowsRemoved,
            WalLevelInsufficient,
            IdleTimeout,
            OnStandby,
            Other,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.prevention(), b.prevention(), "{a:?} and {b:?}");
            }
        }
        assert!(WalRemoved.prevention().contains("max_slot_wal_keep_size"));
        assert!(RowsRemoved.prevention().contains("hot_standby_feedback"));
        assert!(WalLevelInsufficient
            .prevention()
            .contains("wal_level = logical"));
        assert!(IdleTimeout
            .prevention()
            .contains("idle_replication_slot_timeout"));
        let e = invalidated("s1", IdleTimeout, Some("idle_timeout"));
        let text = e.to_string();
        assert!(
            text.contains("(invalidation_reason = idle_timeout)")
                && text.contains("SELECT pg_drop_replication_slot('s1')")
                && text.contains("longer than idle_replication_slot_timeout"),
            "{text}"
        );
        assert_eq!(e.hint(), IdleTimeout.prevention());
    }
}
