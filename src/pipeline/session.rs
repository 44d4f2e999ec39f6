//! One replication session: connecting, the slot and publications, the
//! first copy, then the reader, delivery, the copy alongside and retries
//! running together until one ends; and the loops beside them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::dead_letters;
use super::delivery::{Dispatcher, Replay};
use super::reader::{read_loop, Rows, Sync};
use crate::config::{MappingKind, OnReject, OnUnmappable, Settings};
use crate::lsn::Lsn;
use crate::mapping::Mapper;
use crate::shutdown::Shutdown;
use crate::sink::Sink;
use crate::snapshot;
use crate::source::{self, connect_sql, Catalog, ReplicationConn, ReplicationWriter, Resolver};
use crate::state::State;
use crate::{telemetry, Error};

/// Chunks of decoded events between the reader and delivery. Bounded so a
/// slow ConveYour slows the reader (and, through TCP, the walsender) rather
/// than growing memory: a million-row transaction streams through.
const EVENT_CHUNKS: usize = 16;

/// Chunks of the first copy in flight at most: enough to keep many
/// requests busy (a chunk holds `sync.chunk_rows` rows), few enough that
/// the copy's memory stays a few chunks.
const FIRST_COPY_CHUNKS: usize = 8;

/// A task that ends with the value holding it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Makes the slot a failover slot, or no longer one, as
/// `postgres.failover_slot` asks (PostgreSQL 17+): a slot created before an
/// upgrade, or under the other setting, is altered before streaming.
pub(super) async fn align_failover(
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
///
/// `slot_seen` is set, to the server's timeline, once the slot is there. A
/// later session that finds it gone stops ([`slot_gone`]) instead of
/// creating a new slot, which would silently skip every change made
/// meanwhile.
pub(super) async fn session(
    settings: &Settings,
    sink: &Arc<Sink>,
    shutdown: Shutdown,
    slot_seen: &mut Option<u32>,
) -> Result<(), Error> {
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
                return Err(e
                    .with_advice("dead letters need the connector's schema: run sql/setup.sql, or set conveyour.on_reject: stop")
                    .into());
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
    let found = source::slot_info(&client, &settings.slot).await?;
    let exported = match &found {
        None => {
            if let Some(timeline) = *slot_seen {
                return Err(slot_gone(&client, &settings.slot, timeline, system.timeline).await);
            }
            // Progress recorded for a slot that is gone: what that cost is
            // said once the new slot exists.
            let recorded = match &state {
                Some(state) => (state.lane_progress().await?.iter())
                    .map(|(_, _, p)| p.commit_lsn)
                    .min(),
                None => None,
            };
            if let Some(state) = &state {
                state.start_sync(&copied).await?;
            }
            let exported = conn.create_slot_exporting(&settings.slot, failover).await?;
            if let (Some(_), Some(mark)) = (&exported, recorded) {
                tracing::warn!(slot = %settings.slot, recorded = %mark, "the slot was missing although progress up to {mark} is recorded for it: it was dropped, or the database was restored or failed over without it. Changes after that position that were not yet delivered are lost; a new slot is created and tables with snapshot: initial are copied again");
            }
            exported
        }
        Some(_) => None,
    };
    if exported.is_some() {
        tracing::info!(slot = %settings.slot, failover, "created the replication slot");
    }
    match &found {
        Some(info) => source::check_slot(&settings.slot, &settings.postgres.dbname, info)?,
        // Made just now (here or by another connector): read it once more.
        None => source::require_slot(&client, &settings.slot, &settings.postgres.dbname).await?,
    }
    *slot_seen = Some(system.timeline);
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
        Err(e) => Err(Error::task_failed("delivery", e)),
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
                    Err(e) => break Err(Error::task_failed("the replication reader", e)),
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
            Err(e) => Err(Error::task_failed("the replication reader", e)),
        },
    };
    let _ = stop_feedback.send(());
    if let Ok(Err(e)) = feedback.await {
        tracing::debug!("final status update not sent: {e}");
    }
    delivered.and(read)
}

/// Ends the session once the slot can decode with `waiting_for`, the
/// insert-only publication created after the slot's position, so the next
/// session streams it too (and publishes the tables waiting for it).
/// Pending forever when nothing waits.
pub(super) async fn await_publication(
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
pub(super) const SLOT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Watches the slot while streaming: exports the WAL it retains, and stops
/// the connector at once if the server invalidates or drops it, since the
/// changes it would have kept are gone.
pub(super) async fn watch_slot(
    client: &tokio_postgres::Client,
    slot: &str,
    warn_bytes: u64,
) -> Error {
    let mut tick = tokio::time::interval(SLOT_CHECK_INTERVAL);
    let mut warned = false;
    loop {
        tick.tick().await;
        match source::slot_retention(client, slot).await {
            Ok(Some((retained, wal_status))) => {
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
                if wal_status.as_deref() == Some("lost") {
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
                return Error::Source(source::SourceError::slot_dropped(slot, "while streaming"))
            }
            Err(e) => return Error::Source(e),
        }
    }
}

/// Why the slot a session of this run streamed from is missing from the
/// server a reconnect reached (seen on timeline `seen`, now `now`).
async fn slot_gone(client: &tokio_postgres::Client, slot: &str, seen: u32, now: u32) -> Error {
    match source::in_recovery(client).await {
        Err(e) => e.into(),
        // Not the server to stream from: the primary may be back soon.
        Ok(true) => source::SourceError::transient(format!(
            "postgres.url led to a standby, which has no slot {slot}; reconnecting (add target_session_attrs=read-write to postgres.url to reach only the primary)"
        ))
        .into(),
        Ok(false) if now != seen => source::SourceError::slot_gone(
            slot,
            &format!(
                "is missing on the server reached after a failover (timeline {seen} to {now}): it was not carried over (PostgreSQL before 17, postgres.failover_slot: false, or a standby copy not yet sync-ready)"
            ),
        )
        .into(),
        Ok(false) => source::SourceError::slot_gone(
            slot,
            "was dropped while the connector was reconnecting",
        )
        .into(),
    }
}

/// Sends standby status updates: whenever the confirmed position moves, when
/// the server asks, and at least every `interval`. On stop, sends the final
/// position and ends the stream.
pub(super) async fn feedback_loop(
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
