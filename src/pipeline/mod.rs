//! The running connector: one replication session after another, each a
//! reader (stream → decode → map), delivery (a dispatcher that batches,
//! sends in parallel per contact and confirms) and a feedback loop
//! (standby status updates).
//!
//! The guarantee lives here: the position reported to Postgres moves only
//! to the end of a transaction all of whose actions ConveYour acknowledged,
//! and all transactions before it; when nothing is pending it follows the
//! server's keepalives, so an idle slot holds no WAL.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Notify};

mod dead_letters;
mod delivery;

pub(crate) use dead_letters::set_aside;
pub use dead_letters::{retry_dead_letters, RetryOutcome};
use delivery::{Dispatcher, Replay};

use crate::config::{MappingKind, OnReject, OnUnmappable, Settings};
use crate::decode::{decode, OldTuple, PgOutput, Relation, Tuple};
use crate::event::Event;
use crate::lsn::Lsn;
use crate::mapping::{ContactRef, Mapper, Outcome};
use crate::shutdown::Shutdown;
use crate::sink::Sink;
use crate::snapshot::{self, Carried, Seen, Watermark};
use crate::source::{
    self, connect_sql, Catalog, ReplicationConn, ReplicationMessage, ReplicationReader,
    ReplicationWriter, Resolver,
};
use crate::state::{Progress, State};
use crate::{telemetry, Error};

/// Chunks of decoded events between the reader and delivery. Bounded so a
/// slow ConveYour slows the reader (and, through TCP, the walsender) rather
/// than growing memory: a million-row transaction streams through.
const EVENT_CHUNKS: usize = 16;
/// Events per chunk at most. The reader hands over a chunk when it is full
/// or when no more data is waiting, so a busy stream crosses threads once
/// per chunk rather than once per change, and a quiet one without delay.
const EVENT_CHUNK: usize = 256;

/// While the stream is busy (and so no lull says it went quiet), delivery
/// is told to send what it holds at least this often: a steady stream's
/// changes wait no longer than this plus a request, without a request per
/// transaction.
const BUSY_FLUSH_INTERVAL: Duration = Duration::from_millis(20);

/// Chunks of the first copy in flight at most: enough to keep many
/// requests busy (a chunk holds `sync.chunk_rows` rows), few enough that
/// the copy's memory stays a few chunks.
const FIRST_COPY_CHUNKS: usize = 8;

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

/// First pause before reconnecting to Postgres; doubles up to the cap.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
/// How often a standby connector tries a slot another one holds: the
/// takeover after the holder dies is at most this plus the server noticing.
const SLOT_BUSY_RETRY: Duration = Duration::from_secs(2);

/// Longest pause between reconnection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Streams until asked to stop or until an error a person must fix.
/// Connection losses to Postgres reconnect with backoff and resume from the
/// slot's confirmed position.
pub async fn run(settings: &Settings, shutdown: Shutdown) -> Result<(), Error> {
    let sink = Arc::new(Sink::new(&settings.conveyour).map_err(Error::Setup)?);
    let mut failures: u32 = 0;
    let mut standing_by = false;
    loop {
        let started = Instant::now();
        let ended = session(settings, &sink, shutdown.clone()).await;
        // However the session ended, it holds no connection now.
        telemetry::metrics().connected.set(0);
        let wait = match ended {
            Ok(()) => return Ok(()),
            Err(Error::Source(e))
                if e.kind() == source::SourceErrorKind::SlotBusy && !shutdown.is_set() =>
            {
                if !standing_by {
                    tracing::info!("standing by: {e}");
                    standing_by = true;
                }
                SLOT_BUSY_RETRY
            }
            Err(Error::Source(e)) if e.is_transient() && !shutdown.is_set() => {
                standing_by = false;
                if started.elapsed() > RECONNECT_MAX * 2 {
                    failures = 0;
                }
                let wait = crate::sink::backoff(failures, RECONNECT_MIN, RECONNECT_MAX);
                failures += 1;
                tracing::warn!(
                    retry_in_ms = wait.as_millis() as u64,
                    "replication interrupted, reconnecting: {e}"
                );
                wait
            }
            Err(e) => return Err(e),
        };
        let mut stop = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait() => return Ok(()),
        }
    }
}

/// Makes the slot a failover slot, or no longer one, as
/// `postgres.failover_slot` asks (PostgreSQL 17+): a slot created before an
/// upgrade, or under the other setting, is altered before streaming.
async fn align_failover(
    client: &tokio_postgres::Client,
    conn: &mut ReplicationConn,
    settings: &Settings,
    server_version: i32,
    wanted: bool,
) -> Result<(), Error> {
    if settings.failover_slot == Some(true) && server_version < source::FAILOVER_SLOTS_SINCE {
        tracing::warn!(
            server_version,
            "postgres.failover_slot: PostgreSQL before 17 has no failover slots: a failover loses the slot and its position"
        );
    }
    match source::slot_failover(client, &settings.slot, server_version).await? {
        Some(is) if is != wanted => {
            conn.set_failover(&settings.slot, wanted).await?;
            tracing::info!(slot = %settings.slot, failover = wanted, "changed the slot's failover flag (postgres.failover_slot)");
        }
        _ => {}
    }
    Ok(())
}

/// One replication session, from connecting to the end of the stream.
async fn session(settings: &Settings, sink: &Arc<Sink>, shutdown: Shutdown) -> Result<(), Error> {
    let client = Arc::new(connect_sql(&settings.postgres).await?);
    let schema = Catalog::load(&client, &settings.tables).await?;
    for target in &schema.lookups {
        if !source::lookup_indexed(&client, target).await? {
            tracing::warn!(table = %target.from, column = %target.references, "no index leads with the lookup's column: every uncached lookup scans the table (conveyour-cdc check says how to add one)");
        }
    }
    let publications = source::ensure_publication(&client, settings).await?;
    if publications.state == source::PublicationState::Created {
        tracing::info!(publication = %settings.publication, "created the publication for the mapped tables");
    }
    let mut conn = ReplicationConn::connect(&settings.postgres).await?;
    let system = conn.identify_system().await?;
    let mut state = match State::open(client.clone(), &settings.slot).await {
        Ok(state) => Some(state),
        // A dropped connection: reconnect like any other.
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => {
            if settings.conveyour.on_reject == OnReject::DeadLetter {
                return Err(Error::Setup(format!(
                    "{e}; dead letters need the connector's schema: run sql/setup.sql, or set conveyour.on_reject: stop"
                )));
            }
            tracing::warn!("progress is tracked per transaction only, and existing rows are not copied (the connector's schema is unavailable): {e}");
            None
        }
    };
    if let Some(state) = &mut state {
        state.set_system(&system.system_id);
    }
    if state.is_none() && settings.conveyour.on_unmappable == OnUnmappable::DeadLetter {
        tracing::warn!("a row the mapping cannot send stops the connector, as with conveyour.on_unmappable: stop: dead letters need the connector's schema, which is unavailable");
    }
    let copied: Vec<String> = snapshot::copied_tables(settings)
        .iter()
        .map(|t| t.table.to_string())
        .collect();
    // A new slot is created here, on the replication connection, so that
    // its snapshot can seed the first copy. The sync state starts over
    // first: had it been reset after, a crash in between would leave an
    // earlier slot's "done" marks on tables this slot never copied.
    let server_version = source::server_version_num(&client).await?;
    let failover = source::failover_wanted(settings.failover_slot, server_version);
    let exported = match source::slot_info(&client, &settings.slot).await? {
        None => {
            if let Some(state) = &state {
                state.start_sync(&copied).await?;
            }
            conn.create_slot_exporting(&settings.slot, failover).await?
        }
        Some(_) => None,
    };
    if exported.is_some() {
        tracing::info!(slot = %settings.slot, failover, "created the replication slot");
    }
    source::ensure_slot(&client, &settings.slot, &settings.postgres.dbname).await?;
    align_failover(&client, &mut conn, settings, server_version, failover).await?;
    // Tables new to the mapping (or never copied) are copied too.
    if let Some(state) = &state {
        state.add_sync(&copied).await?;
    }
    let exported = exported.filter(|_| state.is_some());
    let start = source::slot_confirmed(&client, &settings.slot).await?;
    // Rows recorded as delivered are skipped, so a restart resends only
    // what was acknowledged past the record, not everything after the
    // slot's position.
    let replay = match &state {
        Some(state) => Replay::new(&state.lane_progress().await?),
        None => None,
    };

    let (confirmed_tx, confirmed_rx) = watch::channel(start);
    let metrics = telemetry::metrics();
    metrics.confirmed(start, None);
    let (events_tx, events_rx) = mpsc::channel(EVENT_CHUNKS);
    let dispatcher = Dispatcher::new(
        sink.clone(),
        &settings.conveyour,
        state.clone(),
        confirmed_tx,
    );
    // Aborted if this session returns early (an error before streaming):
    // a reconnect must not leave it sending beside the next session's.
    let mut delivery = AbortOnDrop(tokio::spawn(dispatcher.run(events_rx, shutdown.clone())));
    let joined = |r: Result<Result<(), Error>, tokio::task::JoinError>| match r {
        Ok(r) => r,
        Err(e) => Err(Error::Setup(format!("delivery failed: {e}"))),
    };

    // The first run: existing rows, inside the slot's snapshot, delivered
    // before the stream starts at the slot's consistent point.
    if let (Some(exported), Some(state)) = (&exported, &state) {
        // Connected: the slot is held and the copy is the work under way.
        metrics.connected.set(1);
        let copy_client = Arc::new(connect_sql(&settings.postgres).await?);
        let cx = snapshot::CopyContext {
            settings,
            schema: &schema,
            state,
            events: &events_tx,
            chunks_in_flight: settings.conveyour.max_in_flight.min(FIRST_COPY_CHUNKS),
        };
        tokio::select! {
            r = snapshot::copy_exported(cx, copy_client, &exported.snapshot, exported.consistent_point, shutdown.clone()) => r?,
            r = &mut delivery.0 => return joined(r),
            e = watch_slot(&client, &settings.slot, settings.retained_wal_warn_bytes) => return Err(e),
        }
        if shutdown.is_set() {
            drop(events_tx);
            return joined((&mut delivery.0).await);
        }
    }

    // Watermarks are logical decoding messages, which pgoutput sends from
    // Postgres 14 on.
    let messages = server_version >= 140_000;
    let (reader, writer) = conn
        .start_replication(&settings.slot, &publications.names, Lsn::ZERO, messages)
        .await?;
    // Only the slot's holder may tidy its progress: a standby must not
    // erase what the active connector records. Rows of earlier versions
    // (one per lane) were read above; from now on one mark is recorded.
    if let Some(state) = &state {
        state.forget_other_lanes(1).await?;
    }
    tracing::info!(
        slot = %settings.slot,
        confirmed = %start,
        server_wal = %system.xlog_pos,
        timeline = system.timeline,
        "streaming"
    );
    metrics.connected.set(1);
    let reply_now = Arc::new(Notify::new());
    let (stop_feedback, stop_feedback_rx) = oneshot::channel();
    let feedback = tokio::spawn(feedback_loop(
        writer,
        confirmed_rx,
        reply_now.clone(),
        settings.status_interval,
        stop_feedback_rx,
    ));
    let window = Arc::new(Mutex::new(snapshot::Window::default()));
    let wake = Arc::new(Notify::new());
    let retry_window = Arc::new(Mutex::new(snapshot::Window::default()));
    let retry_wake = Arc::new(Notify::new());
    let resolver = Resolver::new(client.clone(), schema.lookups.clone());
    let mapper = Mapper::new(&settings.tables, schema.clone());
    let reader = tokio::spawn(read_loop(
        reader,
        Rows {
            mapper,
            resolver,
            replay,
            set_aside: state
                .clone()
                .filter(|_| settings.conveyour.on_unmappable == OnUnmappable::DeadLetter),
        },
        Sync {
            windows: [window.clone(), retry_window.clone()],
            wake: wake.clone(),
            retry_wake: retry_wake.clone(),
            slot: settings.slot.clone(),
            // Only a copy alongside the stream checks (and forgets) them,
            // and a dead-letter retry re-reading an identify table's rows
            // (copied or not: its read must not win over a streamed commit
            // it does not see yet either).
            copied: match (&state, messages) {
                (Some(_), true) => snapshot::copied_tables(settings)
                    .into_iter()
                    .chain(
                        settings
                            .tables
                            .iter()
                            .filter(|t| matches!(t.kind, MappingKind::Identify)),
                    )
                    .map(|t| (t.table.schema.clone(), t.table.name.clone()))
                    .collect(),
                _ => HashSet::new(),
            },
        },
        events_tx.clone(),
        reply_now,
        shutdown.clone(),
    ));

    // Tables still to copy (a resume, a new table, a resync) are copied
    // in watermarked chunks while the stream flows.
    let mut alongside = Box::pin(async {
        match (&state, messages) {
            (Some(state), true) => {
                let cx = snapshot::CopyContext {
                    settings,
                    schema: &schema,
                    state,
                    events: &events_tx,
                    chunks_in_flight: 1,
                };
                let copy_client = Arc::new(connect_sql(&settings.postgres).await?);
                snapshot::copy_alongside(cx, copy_client, window, wake, shutdown.clone()).await?;
            }
            (Some(_), false) => tracing::warn!(
                "tables left to copy wait: copying alongside the stream needs PostgreSQL 14 or later"
            ),
            (None, _) => {}
        }
        // Done (a stop was asked for): delivery decides when to end.
        std::future::pending::<Result<(), Error>>().await
    });
    // Dead letters due for a retry are sent again alongside too, through
    // their own watermarks.
    let mut redeliver = Box::pin(async {
        if let Some(state) = &state {
            dead_letters::Redeliver {
                settings,
                schema: &schema,
                state,
                sink,
                window: retry_window,
                wake: retry_wake,
                messages,
            }
            .run(shutdown.clone())
            .await?;
        }
        std::future::pending::<Result<(), Error>>().await
    });
    let mut reader = reader;
    let mut reader_done = false;
    let mut delivery_done = false;
    let delivered = loop {
        tokio::select! {
            r = &mut delivery.0 => {
                delivery_done = true;
                break joined(r);
            }
            e = watch_slot(&client, &settings.slot, settings.retained_wal_warn_bytes) => break Err(e),
            e = await_publication(&client, &settings.slot, &settings.publication, publications.waiting_for.as_deref()) => break Err(e),
            r = &mut alongside => break r,
            r = &mut redeliver => break r,
            r = &mut reader, if !reader_done => {
                reader_done = true;
                match r {
                    // Stopped for a stop request: delivery drains and ends.
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(Error::Setup(format!("the replication reader failed: {e}"))),
                }
            }
        }
    };
    // Whatever ended the session, delivery gets its grace period to send
    // what it holds once nothing more can come in.
    drop(alongside);
    drop(redeliver);
    reader.abort();
    drop(events_tx);
    let delivered = if delivery_done {
        delivered
    } else {
        delivered.and(joined((&mut delivery.0).await))
    };

    metrics.connected.set(0);
    let read = match reader_done {
        // Its outcome is already in `delivered`.
        true => Ok(()),
        false => match reader.await {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => Ok(()),
            Err(e) => Err(Error::Setup(format!("the replication reader failed: {e}"))),
        },
    };
    let _ = stop_feedback.send(());
    if let Ok(Err(e)) = feedback.await {
        tracing::debug!("final status update not sent: {e}");
    }
    delivered.and(read)
}

/// A task that ends with the value holding it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How the reader turns rows into actions: the mapping, its lookups, and
/// what a restart knows was delivered already.
struct Rows {
    mapper: Mapper,
    resolver: Resolver,
    replay: Option<Replay>,
    /// Where a row the mapping cannot send is stored (`on_unmappable:
    /// dead_letter` with the connector's schema); None stops at it.
    set_aside: Option<State>,
}

/// What the reader shares with a copy running alongside the stream.
struct Sync {
    /// The copy's window, and the dead-letter retries'.
    windows: [Arc<Mutex<snapshot::Window>>; 2],
    /// Woken by a resync request read from the stream.
    wake: Arc<Notify>,
    /// Woken by a dead-letter retry request read from the stream.
    retry_wake: Arc<Notify>,
    /// Watermarks name the slot they are for.
    slot: String,
    /// Tables a copy alongside the stream or a dead-letter retry may read
    /// (schema, name): the transactions changing them are recorded for
    /// their chunks ([`snapshot::Window::carried`]). Empty when neither
    /// can run.
    copied: HashSet<(String, String)>,
}

/// Ends the session once the slot can decode with `waiting_for`, the
/// insert-only publication created after the slot's position, so the next
/// session streams it too (and publishes the tables waiting for it).
/// Pending forever when nothing waits.
async fn await_publication(
    client: &tokio_postgres::Client,
    slot: &str,
    main: &str,
    waiting_for: Option<&str>,
) -> Error {
    let Some(publication) = waiting_for else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(SLOT_CHECK_INTERVAL).await;
        match source::visible_to_slot(client, slot, main, publication).await {
            Ok(true) => {
                return Error::Source(source::SourceError::transient(format!(
                    "the slot has passed the creation of publication {publication}: reconnecting to stream it too"
                )))
            }
            Ok(false) => {}
            Err(e) => return e.into(),
        }
    }
}

/// How often the slot's retained WAL and health are read while streaming.
const SLOT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Watches the slot while streaming: exports the WAL it retains, and stops
/// the connector at once if the server invalidates or drops it, since the
/// changes it would have kept are gone.
async fn watch_slot(client: &tokio_postgres::Client, slot: &str, warn_bytes: u64) -> Error {
    let mut tick = tokio::time::interval(SLOT_CHECK_INTERVAL);
    let mut warned = false;
    loop {
        tick.tick().await;
        let row = client
            .query_opt(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::int8, wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        match row {
            Ok(Some(row)) => {
                let retained: Option<i64> = row.get(0);
                let retained = retained.unwrap_or(0).max(0) as u64;
                telemetry::metrics()
                    .slot_retained_wal_bytes
                    .set(retained as f64);
                if retained > warn_bytes && !warned {
                    tracing::warn!(
                        retained_bytes = retained,
                        threshold_bytes = warn_bytes,
                        "the slot holds more WAL than postgres.retained_wal_warn_mb; the database disk fills while delivery lags"
                    );
                }
                warned = retained > warn_bytes;
                if row.get::<_, Option<String>>(1).as_deref() == Some("lost") {
                    return match source::slot_invalidation(client, slot).await {
                        Ok(Some((why, reported))) => {
                            Error::Source(source::invalidated(slot, why, reported.as_deref()))
                        }
                        Ok(None) => Error::Source(source::invalidated(
                            slot,
                            source::Invalidation::WalRemoved,
                            None,
                        )),
                        Err(e) => Error::Source(e),
                    };
                }
            }
            Ok(None) => {
                return Error::Source(source::SourceError::config(format!(
                    "postgres.slot: slot {slot} was dropped while streaming"
                )))
            }
            Err(e) => return Error::Source(source::SourceError::from_sql("checking the slot", e)),
        }
    }
}

async fn read_loop(
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
                                        dead_letters::set_aside(state, &mapper, relation, row, &e)
                                            .await?;
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
                                            commit_time: source::pg_now(),
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
type RowChange = (u32, &'static str, Option<OldTuple>, Option<Tuple>);

/// A row change taken apart, or the message back when it is not one.
fn row_change(message: PgOutput) -> Result<RowChange, PgOutput> {
    match message {
        PgOutput::Insert { relation, new } => Ok((relation, "insert", None, Some(new))),
        PgOutput::Update { relation, old, new } => Ok((relation, "update", old, Some(new))),
        PgOutput::Delete { relation, old } => Ok((relation, "delete", Some(old), None)),
        other => Err(other),
    }
}

/// What a streamed change means for a sync chunk's copy of its row.
fn seen_by(outcome: &Outcome) -> Seen {
    match outcome {
        Outcome::Send(m) if m.complete => Seen::Superseded,
        Outcome::Send(_) => Seen::Partial,
        Outcome::Nothing | Outcome::Skip { .. } => Seen::Unchanged,
    }
}

/// Ordinals a row change takes in its transaction: one per action it can
/// become (a `$inc` identify, then its event), whatever it became this
/// time, so the numbering of later rows is the same on every replay.
const ROW_ORDINALS: u64 = 2;

/// Turns a row's outcome into events: resolves a looked-up contact, skips
/// what a restart knows was delivered, logs and counts what cannot be sent.
/// `at` is the row's last ordinal; its actions take the ones before it.
async fn deliver(
    outcome: Outcome,
    lsn: Lsn,
    at: Progress,
    resolver: &mut Resolver,
    replay: Option<&Replay>,
    chunk: &mut Vec<Event>,
) -> Result<(), Error> {
    let skip = |table: &str, column: &str, reason: &str, label: &str| {
        tracing::warn!(%lsn, table, column, "row not sent: {reason}");
        telemetry::metrics()
            .rows_skipped
            .with_label_values(&[table, label])
            .inc();
    };
    let mut mapped = match outcome {
        Outcome::Nothing => return Ok(()),
        Outcome::Skip {
            table,
            column,
            reason,
        } => {
            skip(&table, &column, &reason, "unsendable");
            return Ok(());
        }
        Outcome::Send(mapped) => mapped,
    };
    // A known contact is moved into the actions, not copied.
    let contact = match std::mem::replace(&mut mapped.contact, ContactRef::Known(String::new())) {
        ContactRef::Known(c) => c,
        lookup => match resolver.contact(&lookup).await? {
            Ok(c) => c,
            Err(reason) => {
                skip(&mapped.table, "", &reason, "contact_not_found");
                return Ok(());
            }
        },
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
struct ChangeCounters(Vec<((u32, &'static str), Option<prometheus::IntCounter>)>);

impl ChangeCounters {
    fn new() -> ChangeCounters {
        ChangeCounters::default()
    }

    /// Forgets a relation's counters (its id may now stand for another table).
    fn forget(&mut self, relation: u32) {
        self.0.retain(|((id, _), _)| *id != relation);
    }
}

fn count_change(mapper: &Mapper, counters: &mut ChangeCounters, relation: u32, op: &'static str) {
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

/// Sends standby status updates: whenever the confirmed position moves, when
/// the server asks, and at least every `interval`. On stop, sends the final
/// position and ends the stream.
async fn feedback_loop(
    mut writer: ReplicationWriter,
    mut confirmed: watch::Receiver<Lsn>,
    reply_now: Arc<Notify>,
    interval: Duration,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), source::SourceError> {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut delivery_gone = false;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            // Delivery ended: keep the stream open until told to stop, so
            // the reader is not cut off mid-message.
            changed = confirmed.changed(), if !delivery_gone => if changed.is_err() { delivery_gone = true; continue },
            _ = tick.tick() => {}
            _ = reply_now.notified() => {}
        }
        let lsn = *confirmed.borrow_and_update();
        writer.send_status(lsn).await?;
    }
    let lsn = *confirmed.borrow();
    let sent = writer.send_status(lsn).await;
    writer.close().await;
    tracing::info!(confirmed = %lsn, "replication stream closed");
    sent
}
