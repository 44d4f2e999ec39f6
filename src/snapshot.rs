//! The initial sync and resyncs: a table's existing rows, read in
//! primary-key order, chunk by chunk, and sent as if each were inserted.
//!
//! Two ways, one guarantee (no row missed, none sent with values older
//! than a change already sent):
//! - **First run** ([`copy_exported`]): the slot is created with its
//!   snapshot exported; every pending table is read inside that snapshot,
//!   and the stream starts at the slot's consistent point only after the
//!   copy is delivered. The seam is exact: a change is either in the
//!   snapshot or after the consistent point.
//! - **Alongside the stream** ([`copy_alongside`]: a resume after a crash,
//!   when the exported snapshot is gone, or a `resync`): each chunk is read
//!   between a low and a high watermark written into the WAL as logical
//!   decoding messages (the DBLog approach). The reader drops from the
//!   chunk every row the stream changed between the two watermarks (the
//!   stream's value is newer) and hands the rest over at the high
//!   watermark's place in the stream, so a row's later changes always come
//!   after its copy. Positions alone are not enough: a commit is in the WAL
//!   (and may be streamed and sent) a moment before new snapshots see it,
//!   so a chunk read after the low watermark can still miss a change the
//!   stream sent before it. Each chunk is therefore read in one snapshot
//!   whose visibility (`pg_current_snapshot()`) goes with the rows, the
//!   reader records the id and changes of every transaction it carries on
//!   a copied table (but changes that leave a row's mapped values and key
//!   as they were) until a snapshot of the copy's sees it, and at the high
//!   watermark treats a change by a transaction the chunk's snapshot did
//!   not see as one made between the watermarks.
//!
//! Progress (table, last key, rows) is recorded after a chunk's rows are
//! acknowledged, so a crash resends at most the chunks in flight.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_postgres::Client;

use crate::config::{OnUnmappable, Settings, SnapshotPolicy, TableMapping, TableName};
use crate::decode::{Datum, Relation, Tuple};
use crate::lsn::Lsn;
use crate::mapping::{Action, Mapped, Mapper, Outcome, Schema};
use crate::pipeline::{Event, Shutdown};
use crate::source::{key_at, Key, Resolver, SourceError, TableReader};
use crate::state::{Progress, State, SyncStatus, WATERMARK_PREFIX};
use crate::{telemetry, Error};

/// How often a connector with nothing to copy looks for a resync request
/// that arrived while it was not streaming (the request's message wakes a
/// streaming one at once).
const IDLE_POLL: Duration = Duration::from_secs(10);
/// How often progress is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the progress bar is redrawn on a terminal.
const DRAW_EVERY: Duration = Duration::from_millis(250);

/// The actions one copied row becomes, through the same mapping as a
/// streamed insert. A row that cannot be sent is logged and counted, as in
/// the stream. With `set_aside` (`on_unmappable: dead_letter`), a row whose
/// values the mapping cannot send is stored as a dead letter. `new_row`:
/// the row's insert never reached ConveYour (a retried unmappable insert),
/// so its counters go too.
pub(crate) async fn row_actions(
    mapper: &Mapper,
    resolver: &mut Resolver,
    relation: u32,
    tuple: &Tuple,
    lsn: Lsn,
    set_aside: Option<&State>,
    new_row: bool,
) -> Result<Vec<Action>, Error> {
    let outcome = match mapper.insert(relation, tuple, lsn) {
        Ok(outcome) => outcome,
        Err(e) if e.is_row_fault() && set_aside.is_some() => {
            if let Some(state) = set_aside {
                crate::pipeline::set_aside(state, mapper, relation, tuple, &e).await?;
            }
            return Ok(Vec::new());
        }
        // An existing row the mapping cannot send (a NULL contact id, a
        // value that does not convert) with `on_unmappable: stop`: a copy
        // goes on without it rather than stop at it on every start; the
        // stream stops at such a row because it is news, this one is not.
        Err(e) => {
            tracing::warn!("row not copied: {e}");
            telemetry::metrics()
                .rows_skipped
                .with_label_values(&[&e.table, "unmappable"])
                .inc();
            return Ok(Vec::new());
        }
    };
    let mapped = match outcome {
        Outcome::Nothing => return Ok(Vec::new()),
        Outcome::Skip {
            table,
            column,
            reason,
        } => {
            tracing::warn!(%table, column, "row not copied: {reason}");
            telemetry::metrics()
                .rows_skipped
                .with_label_values(&[&table, "unsendable"])
                .inc();
            return Ok(Vec::new());
        }
        Outcome::Send(m) => m,
    };
    let contact = match resolver.contact(&mapped.contact).await? {
        Ok(c) => c,
        Err(reason) => {
            tracing::warn!(table = %mapped.table, "row not copied: {reason}");
            telemetry::metrics()
                .rows_skipped
                .with_label_values(&[&mapped.table, "contact_not_found"])
                .inc();
            return Ok(Vec::new());
        }
    };
    // A copied row is an existing row, not a new one: counters were
    // bumped when it was inserted, so only its event (or traits) go.
    let mapped = match new_row {
        true => mapped,
        false => Mapped {
            first: mapped.then.unwrap_or(mapped.first),
            then: None,
            ..mapped
        },
    };
    Ok(mapped.into_actions(contact, lsn).collect())
}

/// The tables the sync copies: mapped with `snapshot: initial`.
pub(crate) fn copied_tables(settings: &Settings) -> Vec<&TableMapping> {
    settings
        .tables
        .iter()
        .filter(|t| t.snapshot == SnapshotPolicy::Initial)
        .collect()
}

/// Progress shared by the copy and its reporter.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    table: String,
    rows: i64,
    total: i64,
    started: Option<Instant>,
    /// Rows at `started`, so the rate counts this run only.
    rows_at_start: i64,
    tables_left: usize,
}

impl Tally {
    /// Rows per second this run, and seconds left at that rate (None
    /// before any row).
    fn pace(&self) -> (f64, Option<f64>) {
        let elapsed = self
            .started
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let done = (self.rows - self.rows_at_start).max(0) as f64;
        let rate = if elapsed > 0.0 { done / elapsed } else { 0.0 };
        let left = (self.total - self.rows).max(0) as f64;
        (rate, (rate > 0.0).then(|| left / rate))
    }

    /// Exports the estimate and the ETA.
    fn export(&self) {
        let m = telemetry::metrics();
        m.snapshot_rows_estimate.set(self.total);
        m.snapshot_eta_seconds.set(self.pace().1.unwrap_or(0.0));
    }

    fn line(&self) -> String {
        let (rate, eta) = self.pace();
        let eta = match eta {
            Some(secs) => format!("{secs:.0}s"),
            None => "?".into(),
        };
        format!(
            "sync {}: {}/{} rows ({:.0}%), {:.0} rows/s, ETA {eta}, {} table(s) left",
            self.table,
            self.rows,
            self.total.max(self.rows),
            if self.total > 0 {
                100.0 * self.rows as f64 / self.total as f64
            } else {
                100.0
            },
            rate,
            self.tables_left
        )
    }
}

/// Reports a copy's progress until `done`: a bar redrawn on stderr when it
/// is a terminal, a log line every few seconds otherwise.
async fn report(tally: Arc<Mutex<Tally>>, mut done: oneshot::Receiver<()>) {
    let terminal = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(if terminal { DRAW_EVERY } else { LOG_EVERY });
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut done => break,
            _ = tick.tick() => {}
        }
        let line = tally
            .lock()
            .map(|t| {
                t.export();
                t.line()
            })
            .unwrap_or_default();
        if terminal {
            eprint!("\r\x1b[2K{line}");
        } else {
            tracing::info!("{line}");
        }
    }
    if terminal {
        eprintln!();
    }
    if let Ok(t) = tally.lock() {
        tracing::info!("{}", t.line());
    }
    let m = telemetry::metrics();
    m.snapshot_rows_estimate.set(0);
    m.snapshot_eta_seconds.set(0.0);
}

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
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
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
                // Several chunks in flight keep every lane busy; each is
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

/// A mapper for one table's copied rows, planned on the table as it is.
pub(crate) fn table_mapper(
    t: &TableMapping,
    schema: &Schema,
    relation: &Relation,
    lsn: Lsn,
) -> Result<Mapper, Error> {
    let mut mapper = Mapper::new(std::slice::from_ref(t), schema.clone());
    mapper.relation(relation, lsn)?;
    Ok(mapper)
}

/// Now, in Postgres's epoch (microseconds since 2000-01-01 UTC), as commit
/// times are.
pub(crate) fn pg_now() -> i64 {
    let unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix_us - 946_684_800_000_000
}

/// A chunk between its watermarks, shared by the copy and the reader.
#[derive(Default)]
pub(crate) struct Window {
    /// The chunk the copy is about to read (id, table, key columns): set
    /// before its low watermark is written, so the reader ignores
    /// watermarks of earlier runs.
    expected: Option<(String, TableName, Vec<String>)>,
    /// Set once the reader saw the low watermark.
    open: Option<OpenWindow>,
    /// The chunk's rows, put here before the high watermark is written.
    rows: Option<Chunk>,
    /// Keys of the last chunk to read again: the stream changed them
    /// between its watermarks without carrying their whole state.
    redo: Vec<Key>,
    /// The whole last chunk is to be read again: a transaction too large
    /// to keep row by row changed its table unseen by its snapshot.
    unsure: bool,
    /// Transactions the stream carried with changes to copied tables that
    /// no snapshot of the copy's has yet been seen to include (see
    /// [`Window::carried`]).
    unseen: VecDeque<Carried>,
    /// Changes held in `unseen`, at most [`CARRIED_CHANGES`].
    unseen_changes: usize,
    /// How many of `unseen`'s oldest transactions hold no rows: the cap
    /// sheds rows from here on, so each transaction is visited once, not
    /// once per commit.
    rowless: usize,
    /// Transactions [`Window::carried`] looked at to keep the cap.
    #[cfg(test)]
    shed_visits: usize,
}

/// Changes of carried transactions kept row by row, in one transaction and
/// in all: beyond, the oldest keep only which tables they changed, and a
/// chunk of such a table whose snapshot does not see them is read again
/// whole. Bounds memory under a large transaction or a long idle spell.
const CARRIED_CHANGES: usize = 8192;

/// A transaction the stream carried, with its changes to copied tables.
///
/// A chunk only needs to know which keys each change touched, so only the
/// values of the replica identity's key columns are kept, back to back in
/// one buffer per transaction: no allocation per change. A chunk keyed on
/// columns the replica identity does not hold (`REPLICA IDENTITY USING
/// INDEX` on another index) cannot tell which rows changed, and is read
/// again whole if its snapshot missed the transaction.
#[derive(Default, Clone)]
pub(crate) struct Carried {
    xid: u32,
    /// The tables it changed; a change names its own by index.
    tables: Vec<Arc<Relation>>,
    /// Its changes a chunk may need, unless `whole`.
    changes: Vec<CarriedChange>,
    /// The changes' key values (see [`Carried::put_key`]).
    keys: Vec<u8>,
    /// Its changes were too many to keep: any row of `tables` may be one.
    whole: bool,
}

/// One row change of a [`Carried`] transaction.
#[derive(Clone, Copy)]
struct CarriedChange {
    /// Index into [`Carried::tables`].
    table: u32,
    /// The old row's key, for a delete or an update of the key.
    old: Option<KeySpan>,
    new: Option<KeySpan>,
    seen: Seen,
}

/// Where one row's key values are in [`Carried::keys`].
#[derive(Clone, Copy)]
struct KeySpan {
    start: u32,
    end: u32,
}

/// Key bytes one transaction keeps before it keeps only its tables.
const CARRIED_KEY_BYTES: usize = 4 << 20;

impl Carried {
    /// A transaction begins.
    pub(crate) fn begin(&mut self, xid: u32) {
        self.xid = xid;
        self.changes.clear();
        self.tables.clear();
        self.keys.clear();
        self.whole = false;
    }

    /// Notes a change to a copied table, as [`Window::saw`] takes it:
    /// which table, and the keys of its rows.
    pub(crate) fn push(
        &mut self,
        relation: &Arc<Relation>,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
        seen: Seen,
    ) {
        // Nothing for a chunk to drop or read again (see `note_keys`).
        if seen == Seen::Unchanged && old.is_none() {
            return;
        }
        if !self.whole
            && (self.changes.len() >= CARRIED_CHANGES || self.keys.len() >= CARRIED_KEY_BYTES)
        {
            self.forget_rows();
        }
        let table = match self.tables.iter().position(|r| Arc::ptr_eq(r, relation)) {
            Some(i) => i,
            None => {
                self.tables.push(relation.clone());
                self.tables.len() - 1
            }
        };
        if self.whole {
            return;
        }
        let old = old.map(|t| self.put_key(relation, t));
        let new = new.map(|t| self.put_key(relation, t));
        self.changes.push(CarriedChange {
            table: table as u32,
            old,
            new,
            seen,
        });
    }

    /// Appends the values of `relation`'s key columns in `tuple`: per
    /// column a tag (0 no value, 1 text), then for text its length (4 bytes,
    /// little-endian) and bytes.
    fn put_key(&mut self, relation: &Relation, tuple: &Tuple) -> KeySpan {
        let start = self.keys.len() as u32;
        for (i, c) in relation.columns.iter().enumerate() {
            if !c.key {
                continue;
            }
            match tuple.0.get(i) {
                Some(Datum::Text(b)) => {
                    self.keys.push(1);
                    self.keys.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    self.keys.extend_from_slice(b);
                }
                _ => self.keys.push(0),
            }
        }
        KeySpan {
            start,
            end: self.keys.len() as u32,
        }
    }

    /// The key at `span` in the columns `positions` name (indexes among the
    /// relation's key columns).
    fn key(&self, span: KeySpan, positions: &[usize]) -> Key {
        let mut values: Vec<Option<&[u8]>> = Vec::new();
        let mut at = span.start as usize;
        let end = span.end as usize;
        while at < end {
            let tag = self.keys[at];
            at += 1;
            if tag == 1 {
                let mut len = [0u8; 4];
                len.copy_from_slice(&self.keys[at..at + 4]);
                let len = u32::from_le_bytes(len) as usize;
                at += 4;
                values.push(Some(&self.keys[at..at + len]));
                at += len;
            } else {
                values.push(None);
            }
        }
        positions
            .iter()
            .map(|p| {
                values
                    .get(*p)
                    .copied()
                    .flatten()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            })
            .collect()
    }

    /// Whether it holds nothing a chunk could need: then it is not
    /// recorded at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Keeps only which tables its changes were to.
    fn forget_rows(&mut self) {
        self.changes = Vec::new();
        self.keys = Vec::new();
        self.whole = true;
    }

    /// Whether it changed `table` (known once `whole`).
    fn changed(&self, table: &TableName) -> bool {
        self.tables
            .iter()
            .any(|r| r.namespace == table.schema && r.name == table.name)
    }
}

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

struct OpenWindow {
    id: String,
    table: TableName,
    /// Keys whose change the stream sent in full (or deleted) since the
    /// low watermark: the stream's value is newer than the chunk's.
    superseded: HashSet<Key>,
    /// Keys the stream changed but sent only in part (list diffs, large
    /// values left out): the chunk's copy may be older, and the change
    /// alone does not hold the whole row.
    partial: HashSet<Key>,
    /// Key column indexes per relation id, found by name.
    key_columns: Vec<String>,
    indexes: HashMap<u32, Option<Vec<usize>>>,
}

impl OpenWindow {
    /// Notes a change to the chunk's table the stream carried while the
    /// window is open: `new` (absent for a delete) as `seen` says; an `old`
    /// row under another key (a delete, or an update of the key) is gone,
    /// so superseded.
    fn note(&mut self, relation: &Relation, old: Option<&Tuple>, new: Option<&Tuple>, seen: Seen) {
        if relation.namespace != self.table.schema || relation.name != self.table.name {
            return;
        }
        let key_columns = &self.key_columns;
        let indexes = self
            .indexes
            .entry(relation.id)
            .or_insert_with(|| key_indexes(key_columns, relation));
        if let Some(indexes) = indexes {
            note_keys(
                &mut self.superseded,
                &mut self.partial,
                old.map(|t| key_at(t, indexes)),
                new.map(|t| key_at(t, indexes)),
                seen,
            );
        }
    }

    /// Notes a change carried earlier, under the relation as it was then.
    /// True when the chunk cannot tell which of its rows the change touched
    /// (its key columns are not all in that relation's replica identity):
    /// the whole chunk is then read again.
    fn note_carried(&mut self, t: &Carried, c: &CarriedChange) -> bool {
        let Some(relation) = t.tables.get(c.table as usize) else {
            return false;
        };
        if relation.namespace != self.table.schema || relation.name != self.table.name {
            return false;
        }
        // Each key column's place among the relation's key columns.
        let identity: Vec<&str> = relation
            .columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.as_str())
            .collect();
        let positions: Option<Vec<usize>> = self
            .key_columns
            .iter()
            .map(|k| identity.iter().position(|c| c == k))
            .collect();
        let Some(positions) = positions else {
            return true;
        };
        note_keys(
            &mut self.superseded,
            &mut self.partial,
            c.old.map(|s| t.key(s, &positions)),
            c.new.map(|s| t.key(s, &positions)),
            c.seen,
        );
        false
    }
}

/// Where the key columns are in `relation`'s tuples (None when one is
/// missing).
fn key_indexes(key_columns: &[String], relation: &Relation) -> Option<Vec<usize>> {
    key_columns
        .iter()
        .map(|k| relation.columns.iter().position(|c| c.name == *k))
        .collect()
}

/// Notes one change's keys; see [`OpenWindow::note`].
fn note_keys(
    superseded: &mut HashSet<Key>,
    partial: &mut HashSet<Key>,
    old_key: Option<Key>,
    new_key: Option<Key>,
    seen: Seen,
) {
    if let Some(old_key) = old_key {
        if new_key.as_ref() != Some(&old_key) {
            superseded.insert(old_key);
        }
    }
    if let Some(key) = new_key {
        match seen {
            Seen::Superseded => superseded.insert(key),
            Seen::Partial => partial.insert(key),
            Seen::Unchanged => false,
        };
    }
}

/// A chunk's rows, mapped, with the marker to fire once delivered.
pub(crate) struct Chunk {
    rows: Vec<(Key, Vec<Action>)>,
    /// The snapshot the rows were read in.
    snapshot: Visibility,
    done: oneshot::Sender<()>,
}

/// What a change the stream carried during a window means for the chunk's
/// copy of its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Sent in full, or deleted: the copy is older, drop it.
    Superseded,
    /// Sent in part: read the row again in a later chunk.
    Partial,
    /// Nothing mapped changed (or the operation does not count): the copy
    /// holds what the stream would, keep it.
    Unchanged,
}

/// What a watermark message asks of the reader.
pub(crate) enum Watermark {
    Low(String),
    High(String),
    Resync,
    /// `dead-letters retry` asked the running connector for a retry.
    RetryDeadLetters,
}

/// Parses one of the connector's messages for this slot.
pub(crate) fn watermark(prefix: &str, content: &[u8], slot: &str) -> Option<Watermark> {
    if prefix != WATERMARK_PREFIX {
        return None;
    }
    let text = std::str::from_utf8(content).ok()?;
    let (kind, rest) = text.split_once(':')?;
    let (for_slot, id) = rest.split_once(':').unwrap_or((rest, ""));
    if for_slot != slot {
        return None;
    }
    match kind {
        "lw" => Some(Watermark::Low(id.to_owned())),
        "hw" => Some(Watermark::High(id.to_owned())),
        "resync" => Some(Watermark::Resync),
        "retry" => Some(Watermark::RetryDeadLetters),
        _ => None,
    }
}

impl Window {
    /// The low watermark `id` was read: from now on, changes to the
    /// chunk's table are noted.
    pub(crate) fn low(&mut self, id: &str) {
        match &self.expected {
            Some((expected, table, key_columns)) if expected == id => {
                self.open = Some(OpenWindow {
                    id: id.to_owned(),
                    table: table.clone(),
                    superseded: HashSet::new(),
                    partial: HashSet::new(),
                    key_columns: key_columns.clone(),
                    indexes: HashMap::new(),
                });
            }
            _ => {}
        }
    }

    /// Whether a window is open (the reader then reports changes).
    pub(crate) fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Notes a change the stream carried while the window is open.
    pub(crate) fn saw(
        &mut self,
        relation: &Relation,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
        seen: Seen,
    ) {
        if let Some(open) = &mut self.open {
            open.note(relation, old, new, seen);
        }
    }

    /// Records a transaction the stream carried with changes to copied
    /// tables, for every chunk whose snapshot turns out not to include it.
    /// Its commit is in the WAL (and so in the stream) a moment before new
    /// snapshots see it: a chunk read in that moment, even after the low
    /// watermark, holds the older row although the stream already sent the
    /// newer one before the window opened.
    pub(crate) fn carried(&mut self, transaction: &mut Carried) {
        let t = std::mem::take(transaction);
        self.unseen_changes += t.changes.len();
        self.unseen.push_back(t);
        while self.unseen_changes > CARRIED_CHANGES {
            let Some(t) = self.unseen.get_mut(self.rowless) else {
                break;
            };
            #[cfg(test)]
            {
                self.shed_visits += 1;
            }
            self.unseen_changes -= t.changes.len();
            t.forget_rows();
            self.rowless += 1;
        }
    }

    /// Forgets the carried transactions `snapshot` sees: every snapshot
    /// taken after it sees them too.
    pub(crate) fn settle(&mut self, snapshot: &Visibility) {
        self.unseen.retain(|t| !snapshot.sees(t.xid));
        self.unseen_changes = self.unseen.iter().map(|t| t.changes.len()).sum();
        self.rowless = self
            .unseen
            .iter()
            .position(|t| !t.changes.is_empty())
            .unwrap_or(self.unseen.len());
    }

    /// The high watermark `id` was read: the chunk's rows the stream did
    /// not change since the low one, nor in a transaction the chunk's
    /// snapshot does not see, and the marker for when they are delivered.
    /// Rows the stream changed in part are left for the copy to read again
    /// ([`Window::take_redo`]).
    pub(crate) fn high(&mut self, id: &str) -> Option<(Vec<Action>, oneshot::Sender<()>)> {
        let mut open = self.open.take_if(|o| o.id == id)?;
        let chunk = self.rows.take()?;
        self.expected = None;
        // Everything the stream carried so far came before this place, so
        // a change the snapshot does not see is newer than the copy.
        let mut whole = false;
        for t in self.unseen.iter().filter(|t| !chunk.snapshot.sees(t.xid)) {
            whole |= t.whole && t.changed(&open.table);
            for c in &t.changes {
                whole |= open.note_carried(t, c);
            }
        }
        self.settle(&chunk.snapshot);
        let mut actions = Vec::new();
        for (key, row) in chunk.rows {
            if open.superseded.contains(&key) {
                continue;
            }
            // Changed or not by a transaction too large to keep row by
            // row: read again.
            if whole || open.partial.contains(&key) {
                self.unsure |= whole;
                self.redo.push(key);
                continue;
            }
            actions.extend(row);
        }
        Some((actions, chunk.done))
    }

    /// Keys the last chunk left to read again, and whether that is every
    /// key of it (see [`Window::unsure`]).
    fn take_redo(&mut self) -> (Vec<Key>, bool) {
        (
            std::mem::take(&mut self.redo),
            std::mem::take(&mut self.unsure),
        )
    }
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

/// Reads chunks between watermarks and hands them to the reader: a chunk's
/// rows are delivered at the high watermark's place in the stream, less
/// those the stream changed in full between the watermarks, so no row is
/// sent with values older than a change already sent.
pub(crate) struct WatermarkedChunks<'a> {
    client: &'a Arc<Client>,
    window: &'a Mutex<Window>,
    slot: &'a str,
    /// Tells this run's watermarks from those of earlier runs still in the
    /// WAL.
    nonce: String,
    count: u64,
}

impl<'a> WatermarkedChunks<'a> {
    /// Chunks through `window` (one the reader watches); `tag` tells this
    /// user's watermarks from another's sharing the stream.
    pub(crate) fn new(
        client: &'a Arc<Client>,
        window: &'a Mutex<Window>,
        slot: &'a str,
        tag: &str,
    ) -> WatermarkedChunks<'a> {
        WatermarkedChunks {
            client,
            window,
            slot,
            nonce: format!("{tag}{:x}", pg_now()),
            count: 0,
        }
    }

    /// One chunk: the low watermark, `read`, the high watermark; waits until
    /// the rows the stream did not supersede are delivered. Returns what was
    /// read and the keys to read again (and whether those are all of them
    /// for want of knowing which), or None on a stop.
    pub(crate) async fn chunk<F, Fut>(
        &mut self,
        table: &TableName,
        key_columns: &[String],
        read: F,
        shutdown: &mut Shutdown,
    ) -> Result<Option<(Vec<Key>, (Vec<Key>, bool))>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<(Key, Vec<Action>)>, Error>>,
    {
        self.count += 1;
        let id = format!("{}-{}", self.nonce, self.count);
        if let Ok(mut w) = self.window.lock() {
            w.expected = Some((id.clone(), table.clone(), key_columns.to_vec()));
            w.open = None;
            w.rows = None;
            w.redo.clear();
            w.unsure = false;
        }
        emit(self.client, &format!("lw:{}:{id}", self.slot)).await?;
        // One snapshot for the rows and their lookups, whose visibility the
        // reader checks the stream's transactions against.
        let snapshot = begin_snapshot(self.client).await?;
        let rows = match read().await {
            Ok(rows) => rows,
            Err(e) => {
                let _ = self.client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        };
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| SourceError::from_sql("ending a sync chunk's read", e))?;
        let keys: Vec<Key> = rows.iter().map(|(k, _)| k.clone()).collect();
        let (done, delivered) = oneshot::channel();
        if let Ok(mut w) = self.window.lock() {
            w.rows = Some(Chunk {
                rows,
                snapshot,
                done,
            });
        }
        emit(self.client, &format!("hw:{}:{id}", self.slot)).await?;
        tokio::select! {
            r = delivered => if r.is_err() { return Ok(None) },
            _ = shutdown.wait() => return Ok(None),
        }
        let redo = self
            .window
            .lock()
            .map(|mut w| w.take_redo())
            .unwrap_or_default();
        Ok(Some((keys, redo)))
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

/// Starts a read-only repeatable-read transaction and returns what its
/// snapshot sees.
async fn begin_snapshot(client: &Client) -> Result<Visibility, SourceError> {
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

/// Writes one of the connector's messages into the WAL, outside any
/// transaction, so the stream carries it at this point.
async fn emit(client: &Client, content: &str) -> Result<(), SourceError> {
    client
        .execute(
            "SELECT pg_logical_emit_message(false, $1, $2)",
            &[&WATERMARK_PREFIX, &content],
        )
        .await
        .map_err(|e| SourceError::from_sql("writing a sync watermark", e))?;
    Ok(())
}

/// `resync`: validates the table and records the request for the running
/// connector (or the next one to start). Returns the table's name.
pub async fn request_resync(settings: &Settings, table: &str) -> Result<TableName, Error> {
    let name = TableName::parse(table).ok_or_else(|| {
        Error::Setup(format!(
            "--table: `{table}` is not a table name of the form schema.table"
        ))
    })?;
    let mapping = settings
        .tables
        .iter()
        .find(|t| t.table == name)
        .ok_or_else(|| {
            Error::Setup(format!(
                "--table: {name} is not a mapped table of this config"
            ))
        })?;
    if mapping.snapshot != SnapshotPolicy::Initial {
        return Err(Error::Setup(format!(
            "--table: {}.snapshot is never for {name}: a resync would send its rows as new events; set snapshot: initial on it to allow this",
            mapping.key
        )));
    }
    let client = crate::source::connect(&settings.postgres).await?;
    crate::state::request_resync(&client, &settings.slot, &name.to_string())
        .await
        .map_err(|e| {
            Error::Setup(format!(
                "{e}; the connector's schema must exist (run the connector once, or sql/setup.sql)"
            ))
        })?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::decode::{Column, Datum};
    use crate::mapping::{ActionBody, Fields};

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

    fn relation() -> Arc<Relation> {
        let column = |name: &str| Column {
            key: name == "id",
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        Arc::new(Relation {
            id: 42,
            namespace: "public".into(),
            name: "employees".into(),
            replica_identity: b'd',
            columns: vec![column("id"), column("email")],
        })
    }

    fn row(id: &str) -> Tuple {
        Tuple(vec![
            Datum::Text(Bytes::from(id.to_owned())),
            Datum::Text(Bytes::from(format!("e{id}@acme.test"))),
        ])
    }

    fn action(id: &str) -> Action {
        Action {
            table: "public.employees".into(),
            lsn: Lsn::ZERO,
            contact: format!("e{id}@acme.test"),
            key: None,
            body: ActionBody::Identify {
                traits: Fields::default(),
            },
        }
    }

    /// A chunk of rows 1..=3 read in `snapshot`, after the stream carried
    /// `carried` (xid, row id, how) before its low watermark.
    fn chunk_after(
        carried: &[(u32, &str, Seen)],
        snapshot: &str,
    ) -> (Vec<String>, Vec<Key>, Window) {
        let mut w = Window::default();
        for (xid, id, seen) in carried {
            let mut t = Carried::default();
            t.begin(*xid);
            t.push(&relation(), None, Some(&row(id)), *seen);
            w.carried(&mut t);
        }
        w.expected = Some((
            "c-1".into(),
            TableName::parse("public.employees").unwrap(),
            vec!["id".into()],
        ));
        w.low("c-1");
        let (done, _) = oneshot::channel();
        w.rows = Some(Chunk {
            rows: ["1", "2", "3"]
                .iter()
                .map(|id| (vec![Some(id.to_string())], vec![action(id)]))
                .collect(),
            snapshot: Visibility::parse(snapshot).unwrap(),
            done,
        });
        let (actions, _) = w.high("c-1").unwrap();
        let sent = actions.into_iter().map(|a| a.contact).collect();
        let (redo, unsure) = w.take_redo();
        assert!(!unsure);
        (sent, redo, w)
    }

    #[test]
    fn a_change_streamed_before_the_window_that_the_chunk_did_not_see_wins() {
        // 100 committed and streamed, but the chunk's snapshot still had it
        // in progress; 90 the chunk saw.
        let (sent, redo, w) = chunk_after(
            &[
                (90, "1", Seen::Superseded),
                (100, "2", Seen::Superseded),
                (101, "3", Seen::Partial),
            ],
            "95:102:100,101",
        );
        assert_eq!(sent, vec!["e1@acme.test".to_owned()]);
        assert_eq!(redo, vec![vec![Some("3".to_owned())]]);
        // What the chunk's snapshot saw is forgotten; the rest is kept for
        // the next chunk.
        let kept: Vec<u32> = w.unseen.iter().map(|t| t.xid).collect();
        assert_eq!(kept, vec![100, 101]);
        assert_eq!(w.unseen_changes, 2);
    }

    #[test]
    fn changes_the_chunk_saw_leave_it_whole_and_are_forgotten() {
        let (sent, redo, w) = chunk_after(
            &[(90, "1", Seen::Superseded), (91, "2", Seen::Partial)],
            "95:102:",
        );
        assert_eq!(sent.len(), 3);
        assert!(redo.is_empty());
        assert!(w.unseen.is_empty());
    }

    #[test]
    fn only_the_replica_identity_key_of_a_carried_row_is_kept() {
        let mut t = Carried::default();
        t.begin(100);
        t.push(
            &relation(),
            Some(&row("1")),
            Some(&row("22")),
            Seen::Superseded,
        );
        t.push(&relation(), None, Some(&row("3")), Seen::Partial);
        // Tag, length and bytes of `id` per row; no email.
        assert_eq!(t.keys.len(), 3 * (1 + 4) + 4);
        let keys: Vec<(Option<Key>, Option<Key>)> = t
            .changes
            .iter()
            .map(|c| (c.old.map(|s| t.key(s, &[0])), c.new.map(|s| t.key(s, &[0]))))
            .collect();
        let k = |id: &str| Some(vec![Some(id.to_owned())]);
        assert_eq!(keys, vec![(k("1"), k("22")), (None, k("3"))]);
    }

    #[test]
    fn a_chunk_keyed_on_columns_outside_the_replica_identity_is_read_again_whole() {
        let mut w = Window::default();
        let mut t = Carried::default();
        t.begin(100);
        t.push(&relation(), None, Some(&row("2")), Seen::Superseded);
        w.carried(&mut t);
        // Keyed on `email`, which the stream's key values do not hold.
        w.expected = Some((
            "c-1".into(),
            TableName::parse("public.employees").unwrap(),
            vec!["email".into()],
        ));
        w.low("c-1");
        let (done, _) = oneshot::channel();
        w.rows = Some(Chunk {
            rows: vec![(vec![Some("e2@acme.test".into())], vec![action("2")])],
            snapshot: Visibility::parse("95:102:100").unwrap(),
            done,
        });
        let (actions, _) = w.high("c-1").unwrap();
        assert!(actions.is_empty());
        let (redo, unsure) = w.take_redo();
        assert!(unsure);
        assert_eq!(redo, vec![vec![Some("e2@acme.test".to_owned())]]);
    }

    #[test]
    fn a_transaction_too_large_to_keep_row_by_row_has_the_whole_chunk_read_again() {
        let mut w = Window::default();
        let mut t = Carried::default();
        t.begin(100);
        for i in 0..CARRIED_CHANGES + 5 {
            t.push(
                &relation(),
                None,
                Some(&row(&(1000 + i).to_string())),
                Seen::Superseded,
            );
        }
        assert!(t.whole && t.changes.is_empty());
        w.carried(&mut t);
        // Later small transactions push the oldest kept rows out instead.
        for xid in 101..111 {
            let mut t = Carried::default();
            t.begin(xid);
            for i in 0..CARRIED_CHANGES / 4 {
                t.push(
                    &relation(),
                    None,
                    Some(&row(&i.to_string())),
                    Seen::Superseded,
                );
            }
            w.carried(&mut t);
        }
        assert!(w.unseen_changes <= CARRIED_CHANGES);
        assert_eq!(w.unseen.len(), 11);
        assert!(w.unseen.iter().take(7).all(|t| t.whole));
        w.expected = Some((
            "c-1".into(),
            TableName::parse("public.employees").unwrap(),
            vec!["id".into()],
        ));
        w.low("c-1");
        let (done, _) = oneshot::channel();
        w.rows = Some(Chunk {
            rows: vec![(vec![Some("1".to_owned())], vec![action("1")])],
            snapshot: Visibility::parse("100:200:100").unwrap(),
            done,
        });
        let (actions, _) = w.high("c-1").unwrap();
        assert!(actions.is_empty());
        assert_eq!(w.take_redo(), (vec![vec![Some("1".to_owned())]], true));
        assert_eq!(w.unseen.len(), 1);
    }

    #[test]
    fn many_small_transactions_past_the_cap_are_each_shed_once() {
        // Single-change transactions well past the cap, with no snapshot
        // settling them meanwhile (a backlog between two idle polls): each
        // commit sheds the oldest rows without walking every transaction
        // shed before it.
        let mut w = Window::default();
        let n = 4 * CARRIED_CHANGES;
        for xid in 0..n {
            let mut t = Carried::default();
            t.begin(1000 + xid as u32);
            t.push(
                &relation(),
                None,
                Some(&row(&xid.to_string())),
                Seen::Superseded,
            );
            w.carried(&mut t);
        }
        assert_eq!(w.unseen.len(), n);
        assert_eq!(w.unseen_changes, CARRIED_CHANGES);
        // The newest keep their rows, the oldest only their tables.
        assert!(w.unseen.iter().take(n - CARRIED_CHANGES).all(|t| t.whole));
        assert!(w.unseen.iter().skip(n - CARRIED_CHANGES).all(|t| !t.whole));
        assert!(
            w.shed_visits <= n,
            "{} transactions looked at to shed {} rows",
            w.shed_visits,
            n - CARRIED_CHANGES
        );
        // Settling keeps the count of rowless ones right.
        w.settle(&Visibility::parse(&format!("{0}:{0}:", 1000 + n - 10)).unwrap());
        assert_eq!(w.unseen.len(), 10);
        assert_eq!(w.rowless, 0);
        assert_eq!(w.unseen_changes, 10);
    }

    #[test]
    fn a_change_that_cannot_touch_a_chunk_is_not_kept() {
        let mut t = Carried::default();
        t.begin(7);
        t.push(&relation(), None, Some(&row("1")), Seen::Unchanged);
        // Nothing a chunk could need: not recorded (no lock, no entry).
        assert!(t.is_empty());
        // Unless its old row is under another key.
        t.push(
            &relation(),
            Some(&row("1")),
            Some(&row("2")),
            Seen::Unchanged,
        );
        assert_eq!(t.changes.len(), 1);
        assert!(!t.is_empty());
    }

    #[test]
    fn settling_forgets_what_a_later_snapshot_sees() {
        let mut w = Window::default();
        for xid in [100, 105] {
            let mut t = Carried::default();
            t.begin(xid);
            t.push(&relation(), None, Some(&row("1")), Seen::Superseded);
            w.carried(&mut t);
        }
        w.settle(&Visibility::parse("100:110:100").unwrap());
        assert_eq!(
            w.unseen.iter().map(|t| t.xid).collect::<Vec<_>>(),
            vec![100]
        );
        assert_eq!(w.unseen_changes, 1);
    }
}
