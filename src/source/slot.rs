//! The replication slots: every query of `pg_replication_slots`, in one
//! place: the connector's own slot on the primary, its copy on a standby,
//! and the physical slots failover depends on. What the rows mean is
//! judged elsewhere (`invalidation`, `failover`, `check`).

use tokio_postgres::Client;

use super::invalidation::{invalidated, Invalidation};
use super::SourceError;
use crate::lsn::Lsn;

/// The first version whose logical slots can be synchronized to a
/// physical standby (`failover`, `sync_replication_slots`).
pub(crate) const FAILOVER_SLOTS_SINCE: i32 = 170_000;

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub(crate) struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    /// Why the server invalidated it, and its word for it (17+); None
    /// while it is valid.
    pub invalidation: Option<(Invalidation, Option<String>)>,
}

pub(crate) async fn slot_info(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotInfo>, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::from_sql("looking up the replication slot", e))?;
    let Some(r) = row else {
        return Ok(None);
    };
    Ok(Some(SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active_pid: r.get(2),
        invalidation: slot_invalidation(client, slot).await?,
    }))
}

/// Makes sure the slot exists, is a pgoutput slot of this database, and has
/// not been invalidated. Never creates it: the session creates a missing
/// slot on its replication connection, so one missing here was dropped
/// after the session found or made it.
pub(crate) async fn require_slot(
    client: &Client,
    slot: &str,
    dbname: &str,
) -> Result<(), SourceError> {
    let info = slot_info(client, slot)
        .await?
        .ok_or_else(|| SourceError::slot_dropped(slot, "as the connector started to stream"))?;
    check_slot(slot, dbname, &info)
}

/// Refuses a slot the connector cannot use.
pub(crate) fn check_slot(slot: &str, dbname: &str, info: &SlotInfo) -> Result<(), SourceError> {
    if info.plugin.as_deref() != Some("pgoutput") {
        return Err(SourceError::config(format!(
            "postgres.slot: slot {slot} uses plugin {:?}, not pgoutput; pick another slot name or drop it",
            info.plugin.as_deref().unwrap_or("none (a physical slot)")
        )));
    }
    if info.database.as_deref() != Some(dbname) {
        return Err(SourceError::config(format!(
            "postgres.slot: slot {slot} belongs to database {:?}, not {dbname}; pick another slot name",
            info.database.as_deref().unwrap_or("?")
        )));
    }
    if let Some((why, reported)) = &info.invalidation {
        return Err(invalidated(slot, *why, reported.as_deref()));
    }
    Ok(())
}

/// The slot's confirmed position; status updates never report less.
pub(crate) async fn slot_confirmed(client: &Client, slot: &str) -> Result<Lsn, SourceError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading the slot's position", e))?
        .ok_or_else(|| SourceError::slot_dropped(slot, "while the connector started"))?;
    let text: Option<String> = row.get(0);
    Ok(text.and_then(|t| t.parse().ok()).unwrap_or_default())
}

/// Whether a session streams from the slot now (None: no such slot).
pub(crate) async fn slot_active(client: &Client, slot: &str) -> Result<Option<bool>, SourceError> {
    let row = client
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::from_sql("looking up the slot", e))?;
    Ok(row.map(|r| r.get(0)))
}

/// The WAL the slot holds back, in bytes, and its `wal_status` (None: no
/// such slot).
pub(crate) async fn slot_retention(
    client: &Client,
    slot: &str,
) -> Result<Option<(Option<i64>, Option<String>)>, SourceError> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::int8, wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::from_sql("checking the slot", e))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// How many more replication slots the server allows.
pub(crate) async fn free_slots(client: &Client) -> Result<i32, SourceError> {
    let row = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int",
            &[],
        )
        .await
        .map_err(|e| SourceError::from_sql("counting replication slots", e))?;
    Ok(row.get(0))
}

/// The slot's row as `status` shows it.
pub(crate) struct SlotState {
    pub active: bool,
    pub active_pid: Option<i32>,
    pub plugin: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    /// WAL written since the confirmed position, in bytes.
    pub lag_bytes: Option<i64>,
    /// WAL the slot holds back, in bytes.
    pub retained_wal_bytes: Option<i64>,
    pub wal_status: Option<String>,
}

/// The slot's row (None: no such slot).
pub(crate) async fn slot_state(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotState>, SourceError> {
    let row = client
        .query_opt(
            "SELECT active, active_pid, plugin::text, confirmed_flush_lsn::text,
                    (pg_current_wal_lsn() - confirmed_flush_lsn)::int8,
                    (pg_current_wal_lsn() - restart_lsn)::int8, wal_status
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading the slot", e))?;
    Ok(row.map(|r| SlotState {
        active: r.get(0),
        active_pid: r.get(1),
        plugin: r.get(2),
        confirmed_flush_lsn: r.get(3),
        lag_bytes: r.get(4),
        retained_wal_bytes: r.get(5),
        wal_status: r.get(6),
    }))
}

/// The slot's invalidation as the server reports it: the reason, and the
/// server's own word for it (17+). Works on every version: the columns a
/// version lacks read as NULL.
pub(crate) async fn slot_invalidation(
    client: &Client,
    slot: &str,
) -> Result<Option<(Invalidation, Option<String>)>, SourceError> {
    let row = client
        .query_opt(
            "SELECT to_jsonb(s) ->> 'invalidation_reason', pg_is_in_recovery(), wal_status
               FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading the slot's invalidation", e))?;
    Ok(row.and_then(|r| {
        let reason: Option<String> = r.get(0);
        Invalidation::from_slot(reason.as_deref(), r.get(1), r.get(2)).map(|why| (why, reason))
    }))
}

/// The slot's `failover` flag; None before PostgreSQL 17 or when the slot
/// does not exist.
pub(crate) async fn slot_failover(
    client: &Client,
    slot: &str,
    server_version: i32,
) -> Result<Option<bool>, SourceError> {
    if server_version < FAILOVER_SLOTS_SINCE {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading the slot's failover flag", e))?;
    Ok(row.map(|r| r.get(0)))
}

/// Where the slot stands against a publication's creation.
pub(crate) struct Horizon {
    pub slot_exists: bool,
    /// The slot's catalog horizon is past the publication's creation, so
    /// its decoding sees the publication.
    pub older: bool,
    /// Another session streams from the slot, or it is not a pgoutput slot
    /// of this database: it cannot be read ahead from here.
    pub unreadable: bool,
}

/// The slot against the publication `publication` (which must exist).
pub(crate) async fn horizon(
    client: &Client,
    slot: &str,
    publication: &str,
) -> Result<Horizon, SourceError> {
    let row = client
        .query_one(
            "SELECT s.slot_name IS NOT NULL,
                    s.catalog_xmin IS NOT NULL AND age(p.xmin) > age(s.catalog_xmin),
                    coalesce(s.active OR s.plugin <> 'pgoutput' OR s.database <> current_database(), false)
               FROM pg_publication p
               LEFT JOIN pg_replication_slots s ON s.slot_name = $2
              WHERE p.pubname = $1",
            &[&publication, &slot],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading the slot's catalog horizon", e))?;
    Ok(Horizon {
        slot_exists: row.get(0),
        older: row.get(1),
        unreadable: row.get(2),
    })
}

/// The physical slots a standby streams through now.
pub(crate) async fn active_physical_slots(client: &Client) -> Result<Vec<String>, SourceError> {
    let rows = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots
              WHERE slot_type = 'physical' AND active ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading the physical slots", e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Whether a standby streams through the physical slot `name` now (None:
/// no such physical slot).
pub(crate) async fn physical_slot_active(
    client: &Client,
    name: &str,
) -> Result<Option<bool>, SourceError> {
    let row = client
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1 AND slot_type = 'physical'",
            &[&name],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading synchronized_standby_slots' slots", e))?;
    Ok(row.map(|r| r.get(0)))
}

/// The standby's copy of the slot, from its `pg_replication_slots`.
#[derive(Debug, Clone)]
pub(crate) struct SyncedSlot {
    /// Created by slot sync from the primary's slot.
    pub synced: bool,
    /// Still temporary: dropped at promotion. It turns permanent (Postgres
    /// logs "is sync-ready now") once the primary's slot has passed what
    /// the standby has replayed.
    pub temporary: bool,
    pub confirmed_flush_lsn: Option<String>,
}

impl SyncedSlot {
    /// Survives a promotion: a synchronized, permanent copy.
    pub(crate) fn ready(&self) -> bool {
        self.synced && !self.temporary
    }
}

/// A standby's copy of the slot (17+; None when it has none), read from a
/// session on the standby.
pub(crate) async fn synced_copy(
    client: &Client,
    slot: &str,
) -> Result<Option<SyncedSlot>, SourceError> {
    let row = client
        .query_opt(
            "SELECT synced, temporary, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading the standby's copy of the slot", e))?;
    Ok(row.map(|r| SyncedSlot {
        synced: r.get(0),
        temporary: r.get(1),
        confirmed_flush_lsn: r.get(2),
    }))
}
