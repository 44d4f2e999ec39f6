//! Copying tables: the first copy inside the slot's exported snapshot,
//! and copies alongside the stream in watermarked chunks.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_postgres::Client;

use crate::config::{OnUnmappable, Settings, TableMapping};
use crate::decode::Tuple;
use crate::event::Event;
use crate::lsn::Lsn;
use crate::mapping::{Action, Schema};
use crate::pg_time::pg_now;
use crate::shutdown::Shutdown;
use crate::source::{Key, Resolver, SourceError, TableReader};
use crate::sql::quote_literal;
use crate::state::{Progress, State, SyncStatus};
use crate::{telemetry, Error};

use super::chunks::WatermarkedChunks;
use super::progress::{report, Tally};
use super::window::Window;
use super::{copied_tables, row_actions, table_mapper};
use crate::source::current_snapshot;

/// How often a connector with nothing to copy looks for a resync request
/// that arrived while it was not streaming (the request's message wakes a
/// streaming one at once).
const IDLE_POLL: Duration = Duration::from_secs(10);
/// What a copy needs from the running session.
pub(crate) struct CopyContext<'a> {
    pub settings: &'a Settings,
    pub schema: &'a Schema,
    pub state: &'a State,
    pub events: &'a mpsc::Sender<Vec<Event>>,
    pub chunks_in_flight: usize,
}

impl CopyContext<'_> {
    /// Where unmappable rows go: the dead letters, unless
    /// `on_unmappable: stop` (then a copy skips them).
    fn set_aside(&self) -> Option<&State> {
        (self.settings.conveyour.on_unmappable == OnUnmappable::DeadLetter).then_some(self.state)
    }
}

/// Where one table's copy is recorded: its row in `snapshot_progress`, at
/// the generation the copy started with, and the progress shown.
struct Ledger<'a> {
    state: &'a State,
    tally: &'a Mutex<Tally>,
    table: String,
    generation: i64,
    total: i64,
}

/// How waiting for a chunk ended.
enum Settled {
    Recorded,
    /// A stop was asked for, or delivery ended.
    Stopped,
    /// A resync was asked for meanwhile: the table starts over.
    Superseded,
}

impl Ledger<'_> {
    /// Records an acknowledged chunk (rows so far, last key) and counts it.
    async fn chunk(&self, key: Option<&Key>, rows: i64, status: SyncStatus) -> Result<bool, Error> {
        let before = self.tally.lock().map(|t| t.rows).unwrap_or(0);
        if !self
            .state
            .save_sync(
                &self.table,
                self.generation,
                status,
                key.map(|k| k.as_slice()),
                rows,
                Some(self.total),
            )
            .await?
        {
            return Ok(false);
        }
        let m = telemetry::metrics();
        m.snapshot_rows.inc_by((rows - before).max(0) as u64);
        m.copy_progressed();
        if let Ok(mut t) = self.tally.lock() {
            t.rows = rows;
        }
        Ok(true)
    }

    /// Waits for the oldest chunk in flight to be acknowledged, then
    /// records it.
    async fn settle(
        &self,
        in_flight: &mut VecDeque<(oneshot::Receiver<()>, Key, i64)>,
        shutdown: &mut Shutdown,
    ) -> Result<Settled, Error> {
        let Some((fired, key, rows)) = in_flight.pop_front() else {
            return Ok(Settled::Recorded);
        };
        tokio::select! {
            r = fired => if r.is_err() { return Ok(Settled::Stopped) },
            _ = shutdown.wait() => return Ok(Settled::Stopped),
        }
        Ok(
            match self.chunk(Some(&key), rows, SyncStatus::Copying).await? {
                true => Settled::Recorded,
                false => Settled::Superseded,
            },
        )
    }
}

/// The first run's copy, inside the snapshot the new slot exported: every
/// pending table, chunk by chunk, delivered before the stream starts at
/// `consistent_point`. Returns early (Ok) when a stop is asked for.
pub(crate) async fn copy_exported(
    cx: CopyContext<'_>,
    client: Arc<Client>,
    snapshot: &str,
    consistent_point: Lsn,
    mut shutdown: Shutdown,
) -> Result<(), Error> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .map_err(|e| SourceError::from_sql("importing the slot's snapshot", e))?;
    let pending: HashMap<String, i64> = cx
        .state
        .sync_rows()
        .await?
        .into_iter()
        .filter(|r| r.status != SyncStatus::Done)
        .map(|r| (r.table, r.generation))
        .collect();
    let tables: Vec<(&TableMapping, i64)> = copied_tables(cx.settings)
        .into_iter()
        .filter_map(|t| Some((t, *pending.get(&t.table.to_string())?)))
        .collect();
    let tally = Arc::new(Mutex::new(Tally {
        tables_left: tables.len(),
        ..Tally::default()
    }));
    let metrics = telemetry::metrics();
    metrics.snapshot_tables_remaining.set(tables.len() as i64);
    let (stop_report, report_done) = oneshot::channel();
    let reporter = tokio::spawn(report(tally.clone(), report_done));
    // Lookups read the same snapshot, so a copied row's contact is the one
    // its related row had at that point too.
    let mut resolver = Resolver::new(client.clone(), cx.schema.lookups.clone());
    let mut ordinal = 0u64;
    let result = async {
        for (t, generation) in &tables {
            let reader = TableReader::describe(&client, t, cx.schema).await?;
            if !reader.has_primary_key() {
                skip_keyless(cx.state, t, *generation).await?;
                continue;
            }
            let mapper = table_mapper(t, cx.schema, reader.relation(), consistent_point)?;
            let ledger = Ledger {
                state: cx.state,
                tally: &tally,
                table: t.table.to_string(),
                generation: *generation,
                total: reader.count(&client).await?,
            };
            if let Ok(mut tally) = tally.lock() {
                *tally = Tally {
                    table: ledger.table.clone(),
                    rows: 0,
                    total: ledger.total,
                    started: Some(Instant::now()),
                    rows_at_start: 0,
                    tables_left: tally.tables_left,
                };
            }
            let mut in_flight: VecDeque<(oneshot::Receiver<()>, Key, i64)> = VecDeque::new();
            let mut last: Option<Key> = None;
            let mut rows_read = 0i64;
            let mut superseded = false;
            loop {
                if shutdown.is_set() {
                    return Ok(());
                }
                let rows = reader
                    .read(&client, last.as_ref(), cx.settings.sync_chunk_rows)
                    .await?;
                let Some((key, _)) = rows.last() else { break };
                let key = key.clone();
                let full = rows.len() == cx.settings.sync_chunk_rows;
                let mut events = Vec::with_capacity(rows.len() + 3);
                events.push(Event::Begin);
                for (_, tuple) in &rows {
                    let actions = row_actions(&mapper, &mut resolver, reader.relation().id, tuple, consistent_point, cx.set_aside(), false).await?;
                    for action in actions {
                        ordinal += 1;
                        events.push(Event::Action {
                            action,
                            at: Progress {
                                commit_lsn: consistent_point,
                                change: ordinal,
                            },
                        });
                    }
                }
                events.push(Event::Commit {
                    end_lsn: consistent_point,
                    commit_time: pg_now(),
                });
                let (fire, fired) = oneshot::channel();
                events.push(Event::Marker(fire));
                events.push(Event::Quiet);
                rows_read += rows.len() as i64;
                if cx.events.send(events).await.is_err() {
                    return Ok(());
                }
                in_flight.push_back((fired, key.clone(), rows_read));
                last = Some(key);
                // Several chunks in flight keep many requests busy; each is
                // recorded once acknowledged, oldest first. At the end,
                // every one is, before the table counts as done.
                while in_flight.len() >= cx.chunks_in_flight {
                    match ledger.settle(&mut in_flight, &mut shutdown).await? {
                        Settled::Recorded => {}
                        Settled::Stopped => return Ok(()),
                        Settled::Superseded => superseded = true,
                    }
                }
                if !full || superseded {
                    break;
                }
            }
            while !in_flight.is_empty() {
                match ledger.settle(&mut in_flight, &mut shutdown).await? {
                    Settled::Recorded => {}
                    Settled::Stopped => return Ok(()),
                    Settled::Superseded => superseded = true,
                }
            }
            if superseded {
                // The copy alongside the stream does it over.
                tracing::info!(table = %ledger.table, "sync: a resync was requested during the first copy; the table is copied again alongside the stream");
                continue;
            }
            ledger.chunk(last.as_ref(), rows_read, SyncStatus::Done).await?;
            if let Ok(mut tally) = tally.lock() {
                tally.tables_left = tally.tables_left.saturating_sub(1);
            }
            metrics.snapshot_tables_remaining.dec();
            tracing::info!(table = %ledger.table, rows = rows_read, "sync: table copied");
        }
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| SourceError::from_sql("ending the sync's snapshot", e))?;
        Ok::<(), Error>(())
    }
    .await;
    let _ = stop_report.send(());
    let _ = reporter.await;
    result
}

/// A table without a primary key cannot be read in chunks: it is left out
/// of the copy (its changes still stream), with a warning saying how to
/// have it copied.
async fn skip_keyless(state: &State, t: &TableMapping, generation: i64) -> Result<(), Error> {
    tracing::warn!(
        table = %t.table,
        "sync: not copying existing rows: the table has no primary key to read it in chunks by; add one and run resync, or set {}.snapshot: never to silence this",
        t.key
    );
    state
        .save_sync(
            &t.table.to_string(),
            generation,
            SyncStatus::Done,
            None,
            0,
            None,
        )
        .await?;
    telemetry::metrics().snapshot_tables_remaining.dec();
    Ok(())
}

/// How many times in a row a chunk's rows that the stream keeps changing
/// in part are read again before they are sent as read: a row rewritten
/// that often gets its full state from the stream soon anyway.
const REDO_ROUNDS: usize = 3;

/// The pause before a chunk is read again whole because a large
/// transaction its snapshot did not see changed its table: such a commit
/// turns visible within moments (longer only while a synchronous standby
/// holds it back).
pub(crate) const UNSURE_PAUSE: Duration = Duration::from_millis(100);

/// Copies pending tables (a resume, a table new to the mapping, a resync)
/// alongside the stream, one watermarked chunk at a time; then waits for
/// resync requests. Runs until a stop or an error.
pub(crate) async fn copy_alongside(
    cx: CopyContext<'_>,
    client: Arc<Client>,
    window: Arc<Mutex<Window>>,
    wake: Arc<Notify>,
    mut shutdown: Shutdown,
) -> Result<(), Error> {
    let mut chunks = WatermarkedChunks::new(&client, &window, &cx.settings.slot, "");
    let metrics = telemetry::metrics();
    loop {
        let rows = cx.state.sync_rows().await?;
        let copied = copied_tables(cx.settings);
        let pending: Vec<_> = rows
            .iter()
            .filter(|r| r.status != SyncStatus::Done)
            .filter_map(|r| {
                copied
                    .iter()
                    .find(|t| t.table.to_string() == r.table)
                    .map(|t| (*t, r))
            })
            .collect();
        metrics.snapshot_tables_remaining.set(pending.len() as i64);
        let Some((t, row)) = pending.first() else {
            // Transactions the stream carried that a snapshot taken now
            // sees need no longer be kept for a chunk's check.
            let now = current_snapshot(&client).await?;
            if let Ok(mut w) = window.lock() {
                w.settle(&now);
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = shutdown.wait() => return Ok(()),
            }
            continue;
        };
        let reader = TableReader::describe(&client, t, cx.schema).await?;
        if !reader.has_primary_key() {
            skip_keyless(cx.state, t, row.generation).await?;
            continue;
        }
        let total = reader.count(&client).await?;
        let tally = Arc::new(Mutex::new(Tally {
            table: t.table.to_string(),
            rows: row.rows_copied,
            total,
            started: Some(Instant::now()),
            rows_at_start: row.rows_copied,
            tables_left: pending.len(),
        }));
        let ledger = Ledger {
            state: cx.state,
            tally: &tally,
            table: t.table.to_string(),
            generation: row.generation,
            total,
        };
        let (stop_report, report_done) = oneshot::channel();
        let reporter = tokio::spawn(report(tally.clone(), report_done));
        tracing::info!(table = %ledger.table, from_key = ?row.last_key, "sync: copying alongside the stream");
        let result = copy_table(
            &cx,
            &mut chunks,
            t,
            &reader,
            &ledger,
            row.last_key.clone(),
            row.rows_copied,
            &mut shutdown,
        )
        .await;
        let _ = stop_report.send(());
        let _ = reporter.await;
        match result? {
            Settled::Recorded => {
                tracing::info!(table = %ledger.table, "sync: table copied");
            }
            Settled::Superseded => {
                tracing::info!(table = %ledger.table, "sync: a resync was requested meanwhile; the table starts over");
            }
            Settled::Stopped => return Ok(()),
        }
    }
}

/// Rows read for a chunk, mapped as if inserted, through a fresh lookup
/// cache (the stream keeps only the reader's cache current). A row the
/// mapping cannot send is set aside in `set_aside` when given, else it is
/// skipped or stops the copy as [`row_actions`] says (`new_rows` too).
pub(crate) async fn map_rows(
    t: &TableMapping,
    schema: &Schema,
    reader: &TableReader,
    client: &Arc<Client>,
    rows: Vec<(Key, Tuple)>,
    set_aside: Option<&State>,
    new_rows: bool,
) -> Result<Vec<(Key, Vec<Action>)>, Error> {
    let mapper = table_mapper(t, schema, reader.relation(), Lsn::ZERO)?;
    let mut resolver = Resolver::new(client.clone(), schema.lookups.clone());
    let mut mapped = Vec::with_capacity(rows.len());
    for (key, tuple) in rows {
        let actions = row_actions(
            &mapper,
            &mut resolver,
            reader.relation().id,
            &tuple,
            Lsn::ZERO,
            set_aside,
            new_rows,
        )
        .await?;
        mapped.push((key, actions));
    }
    Ok(mapped)
}

/// Copies one table from `last` on, chunk by chunk alongside the stream;
/// rows the stream changed in part during their chunk are read again.
#[allow(clippy::too_many_arguments)]
async fn copy_table(
    cx: &CopyContext<'_>,
    chunks: &mut WatermarkedChunks<'_>,
    t: &TableMapping,
    reader: &TableReader,
    ledger: &Ledger<'_>,
    mut last: Option<Key>,
    mut rows_copied: i64,
    shutdown: &mut Shutdown,
) -> Result<Settled, Error> {
    let key_columns: Vec<String> = reader.key_columns().map(|(_, c)| c.name.clone()).collect();
    let client = chunks.client;
    let map = |rows| map_rows(t, cx.schema, reader, client, rows, cx.set_aside(), false);
    loop {
        let after = last.clone();
        let read = || async {
            let rows = reader
                .read(client, after.as_ref(), cx.settings.sync_chunk_rows)
                .await?;
            map(rows).await
        };
        let Some((keys, (mut redo, mut unsure))) =
            chunks.chunk(&t.table, &key_columns, read, shutdown).await?
        else {
            return Ok(Settled::Stopped);
        };
        let full = keys.len() == cx.settings.sync_chunk_rows;
        let mut round = 0;
        while !redo.is_empty() {
            if unsure {
                // Not a row's own churn: wait for the transaction to turn
                // visible, however many rounds that takes.
                tokio::select! {
                    _ = tokio::time::sleep(UNSURE_PAUSE) => {}
                    _ = shutdown.wait() => return Ok(Settled::Stopped),
                }
            } else if round == REDO_ROUNDS {
                tracing::warn!(table = %t.table, rows = redo.len(), "sync: rows the stream keeps changing in part were not copied in full; their next full change brings them up to date");
                break;
            } else {
                round += 1;
            }
            let again = std::mem::take(&mut redo);
            let read = || async {
                let rows = reader.read_keys(client, &again).await?;
                map(rows).await
            };
            let Some((_, left)) = chunks.chunk(&t.table, &key_columns, read, shutdown).await?
            else {
                return Ok(Settled::Stopped);
            };
            (redo, unsure) = left;
        }
        rows_copied += keys.len() as i64;
        if let Some(key) = keys.last() {
            last = Some(key.clone());
        }
        let status = if full {
            SyncStatus::Copying
        } else {
            SyncStatus::Done
        };
        if !ledger.chunk(last.as_ref(), rows_copied, status).await? {
            return Ok(Settled::Superseded);
        }
        if !full {
            return Ok(Settled::Recorded);
        }
    }
}
