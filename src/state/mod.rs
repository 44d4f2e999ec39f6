//! The connector's own schema in the source database: acknowledged progress
//! at row grain (here: a restart resends only what was in flight, not
//! everything after the slot's position), the initial sync's progress
//! (`sync.rs`), and dead letters (`dead_letters.rs`: entries ConveYour
//! rejected for good, rows the mapping could not send).
//!
//! Writes are autocommitted, so what is recorded survives a crash of the
//! connector the moment the call returns.

use std::sync::Arc;

use tokio_postgres::{Client, Statement};

use crate::lsn::Lsn;
use crate::source::SourceError;

mod dead_letters;
mod schema;
mod sync;

pub use schema::SCHEMA;

pub use sync::request_resync;
pub(crate) use sync::SyncStatus;

pub(crate) use dead_letters::{
    count_dead_letters, db_now, due_dead_letters, note_retry_failure, note_retry_skipped,
    request_retry, retried, set_aside, settle_reread,
};
pub use dead_letters::{list_dead_letters, purge_dead_letters, DeadLetter, Reason};

/// A row change's place in the stream: transactions in commit order, then
/// changes in their order within the transaction. Ordering follows the
/// stream. The ordinal, not the row's LSN, tells changes apart: one
/// multi-insert WAL record (COPY) decodes into many changes with the same
/// LSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Progress {
    /// The LSN of the transaction's commit record (Begin's final LSN).
    pub commit_lsn: Lsn,
    /// The change's ordinal within the transaction, from 1, counting every
    /// row change the stream carries for it.
    pub change: u64,
}

/// The schema's tables, opened for one slot.
#[derive(Clone)]
pub(crate) struct State {
    client: Arc<Client>,
    slot: String,
    /// The server's system identifier (IDENTIFY_SYSTEM): progress recorded
    /// on another cluster (a restored dump) means nothing here, since its
    /// positions are another history's.
    system_id: String,
    /// The progress upsert, prepared once: delivery records its mark as it
    /// moves, and an unprepared statement costs a second round trip.
    save_progress: Statement,
}

impl State {
    /// Makes sure the schema and its tables exist ([`schema::create`]), and
    /// prepares the progress statement.
    pub(crate) async fn open(client: Arc<Client>, slot: &str) -> Result<State, SourceError> {
        schema::create(&client).await?;
        let save_progress = client
            .prepare(&format!(
                "INSERT INTO {SCHEMA}.progress (slot, lane, lanes, system_id, commit_lsn, change) VALUES ($1, $2, $3, $6, $4::text::pg_lsn, $5)
                 ON CONFLICT (slot, lane) DO UPDATE SET lanes = excluded.lanes, system_id = excluded.system_id,
                     commit_lsn = excluded.commit_lsn, change = excluded.change, updated_at = now()"
            ))
            .await
            .map_err(|e| SourceError::from_sql("preparing the progress statement", e))?;
        Ok(State {
            client,
            slot: slot.to_owned(),
            system_id: String::new(),
            save_progress,
        })
    }

    /// Ties progress to the cluster the replication connection reports.
    pub(crate) fn set_system(&mut self, system_id: &str) {
        self.system_id = system_id.to_owned();
    }

    /// Recorded progress: `(lane, lanes, progress)` for each row, where
    /// `lanes` is how many rows the connector that wrote it kept. This
    /// version keeps one (lane 0 of 1); versions before adaptive
    /// concurrency kept one per delivery lane.
    pub(crate) async fn lane_progress(&self) -> Result<Vec<(usize, usize, Progress)>, SourceError> {
        let rows = self
            .client
            .query(
                &format!("SELECT lane, lanes, commit_lsn::text, change FROM {SCHEMA}.progress WHERE slot = $1 AND system_id = $2"),
                &[&self.slot, &self.system_id],
            )
            .await
            .map_err(|e| SourceError::from_sql("reading progress", e))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some((
                    usize::try_from(r.try_get::<_, i32>(0).ok()?).ok()?,
                    usize::try_from(r.try_get::<_, i32>(1).ok()?).ok()?,
                    Progress {
                        commit_lsn: r.try_get::<_, String>(2).ok()?.parse().ok()?,
                        change: u64::try_from(r.try_get::<_, i64>(3).ok()?).ok()?,
                    },
                ))
            })
            .collect())
    }

    /// Forgets progress written with another lane count, once it has been
    /// read: from then on only this version's rows are recorded.
    pub(crate) async fn forget_other_lanes(&self, lanes: usize) -> Result<(), SourceError> {
        self.client
            .execute(
                &format!(
                    "DELETE FROM {SCHEMA}.progress WHERE slot = $1 AND (lanes <> $2 OR lane >= $2 OR system_id <> $3)"
                ),
                &[&self.slot, &(lanes as i32), &self.system_id],
            )
            .await
            .map_err(|e| SourceError::from_sql("resetting progress", e))?;
        Ok(())
    }

    /// Records that everything up to `p` is acknowledged, in row `lane`
    /// (of `lanes`; delivery writes lane 0 of 1). Durable when it returns.
    pub(crate) async fn save_lane_progress(
        &self,
        lane: usize,
        lanes: usize,
        p: Progress,
    ) -> Result<(), SourceError> {
        self.client
            .execute(
                &self.save_progress,
                &[
                    &self.slot,
                    &(lane as i32),
                    &(lanes as i32),
                    &p.commit_lsn.to_string(),
                    &(p.change as i64),
                    &self.system_id,
                ],
            )
            .await
            .map_err(|e| SourceError::from_sql("recording progress", e))?;
        Ok(())
    }
}

/// The prefix of the connector's own logical decoding messages (sync
/// watermarks, resync requests); others' messages are ignored.
pub(crate) const WATERMARK_PREFIX: &str = "conveyour_cdc";
