//! The initial sync's state per table (pending, copying, done; the last
//! key copied) and resync requests.

use crate::source::SourceError;
use tokio_postgres::Client;

use super::{State, SCHEMA, WATERMARK_PREFIX};

/// Where one table's copy stands, as `snapshot_progress` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyncRow {
    pub table: String,
    pub status: SyncStatus,
    /// The primary key (as text) of the last row whose chunk ConveYour
    /// acknowledged; None before the first.
    pub last_key: Option<Vec<Option<String>>>,
    pub rows_copied: i64,
    /// Bumped by each resync request: a copy records its progress only
    /// while the generation it started with is current.
    pub generation: i64,
}

/// A table's copy: to do, under way, or finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncStatus {
    Pending,
    Copying,
    Done,
}

impl SyncStatus {
    fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Pending => "pending",
            SyncStatus::Copying => "copying",
            SyncStatus::Done => "done",
        }
    }
}

impl State {
    /// The slot's copy state, one row per table that has one.
    pub(crate) async fn sync_rows(&self) -> Result<Vec<SyncRow>, SourceError> {
        let rows = self
            .client
            .query(
                &format!("SELECT source_table, status, last_key, rows_copied, generation FROM {SCHEMA}.snapshot_progress WHERE slot = $1 ORDER BY source_table"),
                &[&self.slot],
            )
            .await
            .map_err(|e| SourceError::from_sql("reading the sync state", e))?;
        Ok(rows
            .iter()
            .map(|r| SyncRow {
                table: r.get(0),
                status: match r.get::<_, &str>(1) {
                    "done" => SyncStatus::Done,
                    "copying" => SyncStatus::Copying,
                    _ => SyncStatus::Pending,
                },
                last_key: r.get(2),
                rows_copied: r.get(3),
                generation: r.get(4),
            })
            .collect())
    }

    /// A new slot: its copy starts over for `tables`, and nothing recorded
    /// for an earlier slot of the same name counts.
    pub(crate) async fn start_sync(&self, tables: &[String]) -> Result<(), SourceError> {
        self.client
            .execute(
                &format!("DELETE FROM {SCHEMA}.snapshot_progress WHERE slot = $1"),
                &[&self.slot],
            )
            .await
            .map_err(|e| SourceError::from_sql("resetting the sync state", e))?;
        self.add_sync(tables).await
    }

    /// Marks `tables` pending unless they already have a state (a table
    /// added to the mapping since the first run is copied too).
    pub(crate) async fn add_sync(&self, tables: &[String]) -> Result<(), SourceError> {
        for t in tables {
            self.client
                .execute(
                    &format!("INSERT INTO {SCHEMA}.snapshot_progress (slot, source_table, status) VALUES ($1, $2, 'pending') ON CONFLICT DO NOTHING"),
                    &[&self.slot, t],
                )
                .await
                .map_err(|e| SourceError::from_sql("recording the sync state", e))?;
        }
        Ok(())
    }

    /// Records a table's copy after a chunk was acknowledged (or its end),
    /// if `generation` is still current. Durable when it returns. False
    /// when a resync was asked for meanwhile: the table starts over.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn save_sync(
        &self,
        table: &str,
        generation: i64,
        status: SyncStatus,
        last_key: Option<&[Option<String>]>,
        rows_copied: i64,
        rows_total: Option<i64>,
    ) -> Result<bool, SourceError> {
        let n = self
            .client
            .execute(
                &format!(
                    "UPDATE {SCHEMA}.snapshot_progress
                        SET status = $3, last_key = $4, rows_copied = $5, rows_total = COALESCE($6, rows_total),
                            started_at = COALESCE(started_at, now()), updated_at = now(),
                            finished_at = CASE WHEN $3 = 'done' THEN now() END
                      WHERE slot = $1 AND source_table = $2 AND generation = $7"
                ),
                &[&self.slot, &table, &status.as_str(), &last_key, &rows_copied, &rows_total, &generation],
            )
            .await
            .map_err(|e| SourceError::from_sql("recording the sync state", e))?;
        Ok(n == 1)
    }
}

/// Asks for one table's rows to be sent again: the running connector (or
/// the next to start) copies it in chunks alongside the stream. The
/// message wakes a running connector at once; the row makes the request
/// survive until some connector acts on it.
pub async fn request_resync(client: &Client, slot: &str, table: &str) -> Result<(), SourceError> {
    client
        .execute(
            &format!(
                "INSERT INTO {SCHEMA}.snapshot_progress (slot, source_table, status) VALUES ($1, $2, 'pending')
                 ON CONFLICT (slot, source_table) DO UPDATE
                    SET status = 'pending', last_key = NULL, rows_copied = 0, started_at = NULL, finished_at = NULL,
                        generation = snapshot_progress.generation + 1, updated_at = now()"
            ),
            &[&slot, &table],
        )
        .await
        .map_err(|e| SourceError::from_sql("recording the resync request", e))?;
    client
        .execute(
            "SELECT pg_logical_emit_message(false, $1, $2)",
            &[&WATERMARK_PREFIX, &format!("resync:{slot}")],
        )
        .await
        .map_err(|e| SourceError::from_sql("waking the running connector", e))?;
    Ok(())
}
