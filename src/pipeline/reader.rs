//! The reader: the replication stream decoded, mapped and handed to
//! delivery in chunks, with the sync windows told what it carried.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use super::delivery::Replay;
use crate::decode::{decode, OldTuple, PgOutput, Relation, Tuple};
use crate::event::Event;
use crate::lsn::Lsn;
use crate::mapping::{Mapper, Outcome};
use crate::sendable::{self, Sendable};
use crate::shutdown::Shutdown;
use crate::snapshot::{self, Carried, Seen, Watermark};
use crate::source::{self, ReplicationMessage, ReplicationReader, Resolver};
use crate::state::{self, Progress, State};
use crate::{telemetry, Error};

/// Events per chunk at most. The reader hands over a chunk when it is full
/// or when no more data is waiting, so a busy stream crosses threads once
/// per chunk rather than once per change, and a quiet one without delay.
const EVENT_CHUNK: usize = 256;

/// While the stream is busy (and so no lull says it went quiet), delivery
/// is told to send what it holds at least this often: a steady stream's
/// changes wait no longer than this plus a request, without a request per
/// transaction.
const BUSY_FLUSH_INTERVAL: Duration = Duration::from_millis(20);

/// A commit the server sends this long (by its own clock) after it
/// happened means the walsender is working through a backlog. Its short
/// pauses between transactions are then decoding, not a quiet stream:
/// delivery fills its batches instead of sending a request per
/// transaction (about a third fewer requests and progress writes in the
/// benchmark), and the reader batches from the start of each burst. Live
/// changes arrive within a few milliseconds of their commit, far below
/// this, so their latency is unchanged.
const CATCH_UP_LAG_US: i64 = 100_000;

/// While catching up, a pause counts as quiet once it lasts this long: a
/// backlog's pauses while the walsender decodes a transaction of a few
/// thousand rows are shorter, and the end of a backlog is sent this soon
/// rather than after `batch_wait_ms`. The reader ends its busy spell after
/// the same pause.
const CATCH_UP_SETTLE: Duration = source::CATCH_UP_PAUSE;

/// How the reader turns rows into actions: the mapping, its lookups, and
/// what a restart knows was delivered already.
pub(super) struct Rows {
    pub(super) mapper: Mapper,
    pub(super) resolver: Resolver,
    pub(super) replay: Option<Replay>,
    /// Where a row the mapping cannot send is stored (`on_unmappable:
    /// dead_letter` with the connector's schema); None stops at it.
    pub(super) set_aside: Option<State>,
}

/// What the reader shares with a copy running alongside the stream.
pub(super) struct Sync {
    /// The copy's window, and the dead-letter retries'.
    pub(super) windows: [Arc<Mutex<snapshot::Window>>; 2],
    /// Woken by a resync request read from the stream.
    pub(super) wake: Arc<Notify>,
    /// Woken by a dead-letter retry request read from the stream.
    pub(super) retry_wake: Arc<Notify>,
    /// Watermarks name the slot they are for.
    pub(super) slot: String,
    /// Tables a copy alongside the stream or a dead-letter retry may read
    /// (schema, name): the transactions changing them are recorded for
    /// their chunks ([`snapshot::Window::carried`]). Empty when neither
    /// can run.
    pub(super) copied: HashSet<(String, String)>,
}

pub(super) async fn read_loop(
    mut reader: ReplicationReader,
    rows: Rows,
    sync: Sync,
    events: mpsc::Sender<Vec<Event>>,
    reply_now: Arc<Notify>,
    mut shutdown: Shutdown,
) -> Result<(), Error> {
    let Rows {
        mut mapper,
        mut resolver,
        replay,
        set_aside,
    } = rows;
    // Relations as last announced, for the sync window's keys.
    let mut relations: HashMap<u32, Relation> = HashMap::new();
    // Those of copied tables, kept with the changes recorded for the sync.
    let mut copied_relations: HashMap<u32, Arc<Relation>> = HashMap::new();
    // The current transaction's changes to copied tables.
    let mut carried = Carried::default();
    // Whether a sync chunk is between its watermarks. Only this loop opens
    // and closes the window, so it knows without taking the lock per change.
    let mut window_open = false;
    // Notes a change for the open sync window.
    let saw = |window_open: bool,
               relations: &HashMap<u32, Relation>,
               relation: u32,
               old: Option<&OldTuple>,
               new: Option<&Tuple>,
               seen: Seen| {
        if !window_open {
            return;
        }
        let Some(rel) = relations.get(&relation) else {
            return;
        };
        let old = old.map(|(OldTuple::Key(t) | OldTuple::Full(t))| t);
        for window in &sync.windows {
            if let Ok(mut w) = window.lock() {
                w.saw(rel, old, new, seen);
            }
        }
    };
    // Where the reader is: the transaction (by its commit LSN) and the
    // ordinal of the last row change in it.
    let mut at = Progress::default();
    let mut cache_changes = Vec::new();
    let mut counters = ChangeCounters::new();
    let mut chunk = Vec::with_capacity(EVENT_CHUNK);
    // Whether events went over since delivery last heard the stream was
    // quiet.
    let mut quiet_owed = false;
    let mut last_quiet = Instant::now();
    // Whether the last commit came well after it happened (see
    // CATCH_UP_LAG_US): the stream's pauses are then not quiet.
    let mut catching_up = false;
    // While catching up: when the pause the reader is waiting in counts as
    // quiet.
    let mut settle: Option<tokio::time::Instant> = None;
    loop {
        // Hand over what was decoded before waiting on the network; unless
        // a busy stream is sure to bring more soon, say it went quiet.
        let waiting = !reader.has_buffered_message();
        if waiting
            && (quiet_owed || !chunk.is_empty())
            && !matches!(chunk.last(), Some(Event::Quiet))
            && (!reader.is_batching() || last_quiet.elapsed() >= BUSY_FLUSH_INTERVAL)
        {
            if !catching_up {
                chunk.push(Event::Quiet);
            } else if settle.is_none() {
                settle = Some(tokio::time::Instant::now() + CATCH_UP_SETTLE);
            }
        }
        if matches!(chunk.last(), Some(Event::Quiet)) {
            last_quiet = Instant::now();
        }
        if !chunk.is_empty() && (chunk.len() >= EVENT_CHUNK || waiting) {
            quiet_owed = !matches!(chunk.last(), Some(Event::Quiet));
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(EVENT_CHUNK));
            if events.send(full).await.is_err() {
                return Ok(());
            }
        }
        let message = if reader.has_buffered_message() {
            reader.next().await?
        } else {
            tokio::select! {
                m = reader.next() => m?,
                _ = tokio::time::sleep_until(settle.unwrap_or_else(tokio::time::Instant::now)), if settle.is_some() => {
                    settle = None;
                    chunk.push(Event::Quiet);
                    continue;
                }
                _ = shutdown.wait() => return Ok(()),
            }
        };
        if !matches!(message, ReplicationMessage::Lull) {
            settle = None;
        }
        let event = match message {
            // A busy stream paused: send what is batched, unless the
            // pause may be the walsender decoding a backlog.
            ReplicationMessage::Lull if catching_up => continue,
            ReplicationMessage::Lull => Event::Quiet,
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            } => {
                if reply_requested {
                    reply_now.notify_one();
                }
                Event::Keepalive { wal_end }
            }
            ReplicationMessage::XLogData {
                wal_start,
                sent_at,
                data,
            } => {
                match row_change(decode(wal_start, data)?) {
                    Ok((relation, op, old, new)) => {
                        count_change(&mapper, &mut counters, relation, op);
                        mapper.observe(relation, old.as_ref(), new.as_ref(), &mut cache_changes);
                        let outcome = match (&old, &new) {
                            (_, Some(new)) if op == "insert" => {
                                mapper.insert(relation, new, wal_start)
                            }
                            (_, Some(new)) => mapper.update(relation, old.as_ref(), new, wal_start),
                            (Some(old), None) => mapper.delete(relation, Some(old), wal_start),
                            (None, None) => Ok(Outcome::Nothing),
                        };
                        // A row whose values cannot be sent is stored as a
                        // dead letter and the stream goes on; a table that
                        // no longer fits the mapping stops it.
                        let (outcome, set_aside_row) = match outcome {
                            Ok(outcome) => (outcome, false),
                            Err(e) => match (&set_aside, e.is_row_fault()) {
                                (Some(state), true) => {
                                    let row = new.as_ref().or(old
                                        .as_ref()
                                        .map(|(OldTuple::Key(t) | OldTuple::Full(t))| t));
                                    if let Some(row) = row {
                                        state::set_aside(state, &mapper, relation, row, &e).await?;
                                    }
                                    (Outcome::Nothing, true)
                                }
                                _ => return Err(e.into()),
                            },
                        };
                        // A delete supersedes a chunk's copy whatever it
                        // sends, and so does a row set aside (the copy is
                        // older than the row's news).
                        let seen = match new {
                            Some(_) if !set_aside_row => seen_by(&outcome),
                            _ => Seen::Superseded,
                        };
                        saw(
                            window_open,
                            &relations,
                            relation,
                            old.as_ref(),
                            new.as_ref(),
                            seen,
                        );
                        // Only the rows' keys are kept.
                        if let Some(rel) = copied_relations.get(&relation) {
                            let old = old.as_ref().map(|(OldTuple::Key(t) | OldTuple::Full(t))| t);
                            carried.push(rel, old, new.as_ref(), seen);
                        }
                        for c in cache_changes.drain(..) {
                            resolver.apply(c);
                        }
                        at.change += ROW_ORDINALS;
                        deliver(
                            outcome,
                            wal_start,
                            at,
                            &mut resolver,
                            replay.as_ref(),
                            &mut chunk,
                        )
                        .await?;
                        continue;
                    }
                    Err(message) => match message {
                        PgOutput::Begin { final_lsn, xid, .. } => {
                            carried.begin(xid);
                            resolver.reading(xid);
                            at = Progress {
                                commit_lsn: final_lsn,
                                change: 0,
                            };
                            Event::Begin
                        }
                        PgOutput::Commit {
                            end_lsn,
                            commit_time,
                            ..
                        } => {
                            if !carried.is_empty() {
                                // Each window checks its own chunks against
                                // it, and forgets it on its own snapshots.
                                let [copy, retry] = &sync.windows;
                                if let Ok(mut w) = retry.lock() {
                                    w.carried(&mut carried.clone());
                                }
                                if let Ok(mut w) = copy.lock() {
                                    w.carried(&mut carried);
                                }
                            }
                            catching_up = sent_at.saturating_sub(commit_time) > CATCH_UP_LAG_US;
                            reader.set_catching_up(catching_up);
                            Event::Commit {
                                end_lsn,
                                commit_time,
                            }
                        }
                        PgOutput::Relation(rel) => {
                            mapper.relation(&rel, wal_start)?;
                            if sync
                                .copied
                                .contains(&(rel.namespace.clone(), rel.name.clone()))
                            {
                                copied_relations.insert(rel.id, Arc::new(rel.clone()));
                            } else {
                                copied_relations.remove(&rel.id);
                            }
                            relations.insert(rel.id, rel.clone());
                            // The relation id may now stand for another table.
                            counters.forget(rel.id);
                            continue;
                        }
                        PgOutput::Insert { .. }
                        | PgOutput::Update { .. }
                        | PgOutput::Delete { .. } => {
                            // Taken apart by `row_change` above.
                            continue;
                        }
                        PgOutput::Truncate { relations, .. } => {
                            for r in &relations {
                                count_change(&mapper, &mut counters, *r, "truncate");
                            }
                            tracing::warn!(lsn = %wal_start, relations = ?relations, "TRUNCATE of a published table: nothing is sent to ConveYour for it");
                            continue;
                        }
                        PgOutput::Message {
                            transactional: false,
                            lsn,
                            prefix,
                            content,
                        } => {
                            match snapshot::watermark(&prefix, &content, &sync.slot) {
                                Some(Watermark::Low(id)) => {
                                    window_open = false;
                                    for window in &sync.windows {
                                        if let Ok(mut w) = window.lock() {
                                            w.low(&id);
                                            window_open |= w.is_open();
                                        }
                                    }
                                }
                                Some(Watermark::High(id)) => {
                                    let mut copied = None;
                                    window_open = false;
                                    for window in &sync.windows {
                                        if let Ok(mut w) = window.lock() {
                                            if copied.is_none() {
                                                copied = w.high(&id);
                                            }
                                            window_open |= w.is_open();
                                        }
                                    }
                                    if let Some((actions, done)) = copied {
                                        // The chunk's rows take the high
                                        // watermark's place in the stream.
                                        chunk.push(Event::Begin);
                                        for (i, action) in actions.into_iter().enumerate() {
                                            let at = Progress {
                                                commit_lsn: lsn,
                                                change: i as u64 + 1,
                                            };
                                            chunk.push(Event::Action { action, at });
                                        }
                                        chunk.push(Event::Commit {
                                            end_lsn: lsn,
                                            commit_time: crate::pg_time::pg_now(),
                                        });
                                        chunk.push(Event::Marker(done));
                                    }
                                }
                                Some(Watermark::Resync) => sync.wake.notify_one(),
                                Some(Watermark::RetryDeadLetters) => sync.retry_wake.notify_one(),
                                None => {}
                            }
                            continue;
                        }
                        PgOutput::Origin { .. }
                        | PgOutput::Type { .. }
                        | PgOutput::Message { .. } => continue,
                    },
                }
            }
        };
        chunk.push(event);
    }
}

/// A row change's parts: relation, operation, old row, new row.
pub(super) type RowChange = (u32, &'static str, Option<OldTuple>, Option<Tuple>);

/// A row change taken apart, or the message back when it is not one.
pub(super) fn row_change(message: PgOutput) -> Result<RowChange, PgOutput> {
    match message {
        PgOutput::Insert { relation, new } => Ok((relation, "insert", None, Some(new))),
        PgOutput::Update { relation, old, new } => Ok((relation, "update", old, Some(new))),
        PgOutput::Delete { relation, old } => Ok((relation, "delete", Some(old), None)),
        other => Err(other),
    }
}

/// What a streamed change means for a sync chunk's copy of its row.
pub(super) fn seen_by(outcome: &Outcome) -> Seen {
    match outcome {
        Outcome::Send(m) if m.complete => Seen::Superseded,
        Outcome::Send(_) => Seen::Partial,
        Outcome::Nothing | Outcome::Skip { .. } => Seen::Unchanged,
    }
}

/// Ordinals a row change takes in its transaction: one per action it can
/// become (a `$inc` identify, then its event), whatever it became this
/// time, so the numbering of later rows is the same on every replay.
pub(super) const ROW_ORDINALS: u64 = 2;

/// Turns a row's outcome into events: resolves a looked-up contact, skips
/// what a restart knows was delivered, logs and counts what cannot be sent.
/// `at` is the row's last ordinal; its actions take the ones before it.
pub(super) async fn deliver(
    outcome: Outcome,
    lsn: Lsn,
    at: Progress,
    resolver: &mut Resolver,
    replay: Option<&Replay>,
    chunk: &mut Vec<Event>,
) -> Result<(), Error> {
    let (mapped, contact) = match sendable::resolve(outcome, resolver).await? {
        Sendable::Nothing => return Ok(()),
        Sendable::Skip(skip) => {
            skip.report("row not sent", lsn);
            return Ok(());
        }
        Sendable::Send { mapped, contact } => (mapped, contact),
    };
    let first = at.change + 1 - ROW_ORDINALS;
    for (i, action) in mapped.into_actions(contact, lsn).enumerate() {
        let at = Progress {
            commit_lsn: at.commit_lsn,
            change: first + i as u64,
        };
        if replay.is_some_and(|r| r.covers(at)) {
            continue;
        }
        chunk.push(Event::Action { action, at });
    }
    Ok(())
}

/// `changes_received_total` counters by relation and operation, looked up
/// once rather than per change. A few tables times a few operations: a
/// scan is cheaper than hashing per change.
#[derive(Default)]
pub(super) struct ChangeCounters(Vec<((u32, &'static str), Option<prometheus::IntCounter>)>);

impl ChangeCounters {
    fn new() -> ChangeCounters {
        ChangeCounters::default()
    }

    /// Forgets a relation's counters (its id may now stand for another table).
    fn forget(&mut self, relation: u32) {
        self.0.retain(|((id, _), _)| *id != relation);
    }
}

pub(super) fn count_change(
    mapper: &Mapper,
    counters: &mut ChangeCounters,
    relation: u32,
    op: &'static str,
) {
    let known = counters
        .0
        .iter()
        .position(|(key, _)| *key == (relation, op));
    let at = known.unwrap_or_else(|| {
        let counter = mapper.table(relation).map(|table| {
            telemetry::metrics()
                .changes_received
                .with_label_values(&[table.as_ref(), op])
        });
        counters.0.push(((relation, op), counter));
        counters.0.len() - 1
    });
    if let Some((_, Some(c))) = counters.0.get(at) {
        c.inc();
    }
}
