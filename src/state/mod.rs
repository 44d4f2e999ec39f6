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
mod sync;

pub use sync::request_resync;
pub(crate) use sync::SyncStatus;

pub(crate) use dead_letters::{
    count_dead_letters, db_now, due_dead_letters, note_retry_failure, note_retry_skipped,
    request_retry, retried, set_aside, settle_reread,
};
pub use dead_letters::{list_dead_letters, purge_dead_letters, DeadLetter, Reason};

/// The schema's name. `sql/setup.sql` creates it owned by the connector's
/// role; the connector creates it itself when it may.
pub const SCHEMA: &str = "conveyour_cdc";

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
    /// Makes sure the schema and its tables exist. The existence check comes
    /// first: `CREATE SCHEMA IF NOT EXISTS` needs CREATE on the database
    /// even when the schema is already there.
    pub(crate) async fn open(client: Arc<Client>, slot: &str) -> Result<State, SourceError> {
        let exists = client
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&SCHEMA])
            .await
            .map_err(|e| SourceError::from_sql("looking up the connector's schema", e))?
            .is_some();
        if !exists {
            match client.batch_execute(&format!("CREATE SCHEMA {SCHEMA}")).await {
                Ok(()) => {}
                // Another connector created it just now.
                Err(e) if SourceError::already_exists(&e) => {}
                Err(e) => {
                    return Err(SourceError::from_sql(
                        &format!("creating the connector's schema {SCHEMA} (run sql/setup.sql, or GRANT CREATE ON DATABASE to the role)"),
                        e,
                    ))
                }
            }
        }
        // Created only when one is missing: IF NOT EXISTS on a table that
        // exists makes the server send a NOTICE, logged on every start.
        let present = client
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename IN ('progress', 'snapshot_progress', 'dead_letters')",
                &[&SCHEMA],
            )
            .await
            .map_err(|e| SourceError::from_sql("looking up the connector's tables", e))?
            .get::<_, i64>(0);
        let tables = if present == 3 {
            Ok(())
        } else {
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {SCHEMA}.progress (
                     slot text NOT NULL,
                     lane int NOT NULL,
                     lanes int NOT NULL,
                     system_id text NOT NULL,
                     commit_lsn pg_lsn NOT NULL,
                     change bigint NOT NULL,
                     updated_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (slot, lane)
                 );
                 CREATE TABLE IF NOT EXISTS {SCHEMA}.snapshot_progress (
                     slot text NOT NULL,
                     source_table text NOT NULL,
                     status text NOT NULL,
                     last_key text[],
                     rows_copied bigint NOT NULL DEFAULT 0,
                     rows_total bigint,
                     generation bigint NOT NULL DEFAULT 0,
                     started_at timestamptz,
                     updated_at timestamptz NOT NULL DEFAULT now(),
                     finished_at timestamptz,
                     PRIMARY KEY (slot, source_table)
                 );
                 CREATE TABLE IF NOT EXISTS {SCHEMA}.dead_letters (
                     id bigserial PRIMARY KEY,
                     slot text NOT NULL,
                     endpoint text NOT NULL,
                     source_table text NOT NULL,
                     contact text NOT NULL,
                     lsn pg_lsn NOT NULL,
                     payload jsonb NOT NULL,
                     status int NOT NULL,
                     message text NOT NULL,
                     attempts int NOT NULL,
                     created_at timestamptz NOT NULL DEFAULT now()
                 );"
                ))
                .await
        };
        match tables {
            Ok(()) => {}
            // Two connectors creating the same table at once: the loser's
            // IF NOT EXISTS still trips on the catalog's unique index.
            Err(e) if SourceError::already_exists(&e) => {}
            Err(e) => {
                return Err(SourceError::from_sql(
                    &format!("creating the tables in schema {SCHEMA}"),
                    e,
                ))
            }
        }
        match dead_letters::upgrade(&client).await {
            Ok(()) => {}
            Err(e) if SourceError::already_exists(&e) => {}
            Err(e) => return Err(dead_letters::upgrade_error(&client, e).await),
        }
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
