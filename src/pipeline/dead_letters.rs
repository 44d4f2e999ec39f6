//! Dead letters, set aside and sent again.
//!
//! A row the mapping cannot send is stored by its primary key
//! ([`set_aside`]). A retry sends an identify table's entry as the row is
//! *now*, read by that key through the mapping (plan, traits, row filter),
//! never the stored payload, which may be older than a change delivered
//! since; a row gone by then (deleted, or out of the row filter) sends
//! nothing, since its delete reached ConveYour through the stream as
//! `on_delete` says. Events, counters and deletes' entries are sent as
//! stored: they do not go stale.
//!
//! **No stale overwrite.** The running connector reads the rows between a
//! low and a high watermark written into the WAL, as a resync's chunk is
//! read ([`WatermarkedChunks`]): the reader drops every row the stream
//! changed in full between the two and hands the rest to delivery at the
//! high watermark's place in the stream. A change committed after the read
//! comes after the high watermark, so delivery, which sends each contact's
//! requests in stream order, sends it after the retried entry; a change
//! before the read was either seen by the read or dropped
//! the row from the chunk. So a retried entry never lands after a newer
//! change of its row. `dead-letters retry` hands such entries to the
//! running connector for this reason; with no connector streaming it sends
//! only stored events itself and leaves the rest for the connector's next
//! start.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::Client;

use crate::config::{MappingKind, Settings, TableMapping, DEAD_LETTER_RETRY_MAX_MS};
use crate::mapping::Schema;
use crate::shutdown::Shutdown;
use crate::sink::{Endpoint, Request, Sink, SinkError};
use crate::snapshot::{self, WatermarkedChunks, Window};
use crate::source::{connect_sql, Key, SourceError, TableReader};
use crate::state::{self, DeadLetter, Reason, State, WATERMARK_PREFIX};
use crate::{telemetry, Error};

/// How often the running connector reads the dead-letter count for the
/// depth gauge (and looks for retry requests whose wake-up it missed)
/// when automatic retries are off or rarer: a `purge` from the CLI shows
/// within this.
const DEPTH_REFRESH: Duration = Duration::from_secs(30);

/// How many times a retry reads again the rows the stream changed only in
/// part between its watermarks, before leaving them for the next retry.
const REREAD_ROUNDS: usize = 3;

/// At most this many due entries are taken per pass, so a table of
/// millions of them is retried a slice at a time, not loaded whole; a
/// full slice is followed by the next at once.
const DUE_PER_PASS: i64 = 10_000;

/// How long `dead-letters retry` waits for the running connector beyond
/// three request timeouts: its retry waits for what is queued ahead of it
/// in the stream.
const HANDOVER_SLACK: Duration = Duration::from_secs(60);

/// An entry's message with why its retry was not made: the failure it was
/// stored for, and only the latest such note (each retry would otherwise
/// add one, without end).
fn noted(message: &str, note: &str) -> String {
    let stored = message.split(" (retry: ").next().unwrap_or(message);
    format!("{stored} (retry: {note})")
}

/// How an entry is sent again.
enum Route<'a> {
    /// Read the row by its key and send it as it is now.
    Reread(&'a TableMapping),
    /// Send the stored payload.
    Stored(Endpoint),
    /// Cannot be sent: why, for the entry's message.
    Stuck(String),
}

/// Whether an entry stands for an insert that never reached ConveYour, so
/// a retry sends the row's counters with its event: an unmappable row the
/// stream (not a copy, LSN 0/0) set aside from a track table that maps
/// inserts only. (With updates mapped too, the entry does not tell an
/// insert from an update: only the event goes, as for a copied row.)
fn never_sent_insert(m: &TableMapping, l: &DeadLetter) -> bool {
    l.reason == Reason::Unmappable.code()
        && l.lsn != "0/0"
        && matches!(m.kind, MappingKind::Track { .. })
        && m.operations.insert
        && !m.operations.update
}

fn route<'a>(settings: &'a Settings, l: &DeadLetter) -> Route<'a> {
    let mapping = settings
        .tables
        .iter()
        .find(|t| t.table.to_string() == l.table);
    let unmappable = l.reason == Reason::Unmappable.code();
    match mapping {
        Some(m) if l.key.is_some() && (unmappable || matches!(m.kind, MappingKind::Identify)) => {
            return Route::Reread(m)
        }
        _ => {}
    }
    if unmappable {
        return Route::Stuck(noted(
            &l.message,
            "cannot be read again: the table has no primary key or is no longer mapped; fix the row, then purge this entry",
        ));
    }
    let endpoint = match l.endpoint.as_str() {
        "identify" => Endpoint::Identify,
        "track" => Endpoint::Track,
        other => return Route::Stuck(format!("unknown endpoint {other}")),
    };
    if endpoint == Endpoint::Identify
        && mapping.is_some_and(|m| matches!(m.kind, MappingKind::Identify))
    {
        // Stored before keys were kept: the contact id does not find the
        // row reliably (it need not be unique, nor indexed).
        tracing::warn!(id = l.id, table = %l.table, "dead letter stored without its row's key: sent as stored, which may be older than what ConveYour has now");
    }
    Route::Stored(endpoint)
}

/// What sending a stored payload came to.
enum Sent {
    Delivered,
    Rejected,
    /// No answer in time (None), or an answer no entry is to blame for
    /// (credentials, URL): later entries would fare no better.
    Unreachable(Option<SinkError>),
    /// Being sent by another process (or gone meanwhile): left to it.
    Elsewhere,
}

/// Sends an entry's stored payload; removes it once acknowledged, records
/// a rejection on it. The entry is locked while it is sent: a connector
/// starting while `dead-letters retry` sends it (or the reverse) skips it
/// rather than send it twice (an event or a counter twice).
async fn send_stored(
    sink: &Sink,
    client: &Client,
    slot: &str,
    l: &DeadLetter,
    endpoint: Endpoint,
    limit: Duration,
) -> Result<Sent, Error> {
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| SourceError::from_sql("claiming a dead letter", e))?;
    let sent = claimed_send(sink, client, slot, l, endpoint, limit).await;
    let end = match sent {
        Ok(_) => "COMMIT",
        Err(_) => "ROLLBACK",
    };
    client
        .batch_execute(end)
        .await
        .map_err(|e| SourceError::from_sql("ending a dead letter's retry", e))?;
    sent
}

async fn claimed_send(
    sink: &Sink,
    client: &Client,
    slot: &str,
    l: &DeadLetter,
    endpoint: Endpoint,
    limit: Duration,
) -> Result<Sent, Error> {
    let claimed = client
        .query_opt(
            &format!(
                "SELECT 1 FROM {}.dead_letters WHERE id = $1 FOR UPDATE SKIP LOCKED",
                state::SCHEMA
            ),
            &[&l.id],
        )
        .await
        .map_err(|e| SourceError::from_sql("claiming a dead letter", e))?;
    if claimed.is_none() {
        return Ok(Sent::Elsewhere);
    }
    let request = Request::stored(endpoint, bytes::Bytes::from(l.payload.clone()));
    match tokio::time::timeout(limit, sink.deliver(&request)).await {
        Ok(Ok(())) => {
            state::purge_dead_letters(client, slot, Some(l.id)).await?;
            Ok(Sent::Delivered)
        }
        Ok(Err(e)) if e.is_content_rejection() => {
            state::note_retry_failure(client, l.id, &e).await?;
            Ok(Sent::Rejected)
        }
        Ok(Err(e)) => {
            state::note_retry_skipped(client, l.id, &noted(&l.message, &e.to_string())).await?;
            Ok(Sent::Unreachable(Some(e)))
        }
        Err(_) => {
            state::note_retry_skipped(
                client,
                l.id,
                &noted(
                    &l.message,
                    &format!("ConveYour did not acknowledge within {limit:?}"),
                ),
            )
            .await?;
            Ok(Sent::Unreachable(None))
        }
    }
}

/// Outcome of `dead-letters retry`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetryOutcome {
    /// Acknowledged by ConveYour (or found obsolete: the row is gone, or
    /// a newer change of it was delivered) and removed from the table.
    pub delivered: usize,
    /// Rejected again, or not sendable yet; kept, with the new message.
    pub rejected: usize,
    /// Left for the connector, which is not streaming: rows are read
    /// again only by a running connector (see the module's doc).
    pub waiting: usize,
    /// Handed to the connector streaming the slot, which had not retried
    /// them when the wait ended; they stay marked, and it retries them when
    /// it gets to them.
    pub pending: usize,
}

/// `dead-letters retry`: sends stored dead letters again (all, or one by
/// `id`). With a connector streaming the slot, asks it to retry them and
/// waits for the outcome; else sends stored events and counters itself
/// and leaves rows to read again for the connector's next start.
pub async fn retry_dead_letters(
    settings: &Settings,
    id: Option<i64>,
) -> Result<RetryOutcome, Error> {
    let client = connect_sql(&settings.postgres).await?;
    let limit = settings.conveyour.request_timeout * 3;
    let streaming = crate::source::slot_active(&client, &settings.slot)
        .await?
        .unwrap_or(false);
    if streaming {
        return hand_over(&client, &settings.slot, id, limit + HANDOVER_SLACK).await;
    }
    let sink = Sink::new(&settings.conveyour)?;
    let mut outcome = RetryOutcome::default();
    for l in state::list_dead_letters(&client, &settings.slot, id).await? {
        match route(settings, &l) {
            Route::Reread(_) => {
                state::request_retry(&client, &settings.slot, Some(l.id)).await?;
                outcome.waiting += 1;
            }
            Route::Stuck(why) => {
                state::note_retry_skipped(&client, l.id, &why).await?;
                outcome.rejected += 1;
            }
            Route::Stored(endpoint) => {
                match send_stored(&sink, &client, &settings.slot, &l, endpoint, limit).await? {
                    Sent::Delivered => outcome.delivered += 1,
                    Sent::Rejected => outcome.rejected += 1,
                    Sent::Elsewhere => outcome.waiting += 1,
                    // Who sent it or where is wrong: the sink's own error
                    // names it (credentials, URL, 501).
                    Sent::Unreachable(Some(e)) => return Err(Error::Sink(e)),
                    Sent::Unreachable(None) => {
                        return Err(Error::Setup(format!(
                            "dead letter {}: ConveYour did not acknowledge it within {limit:?}; it stays a dead letter: is ConveYour reachable from here (conveyour.url)?",
                            l.id
                        )))
                    }
                }
            }
        }
    }
    Ok(outcome)
}

/// Asks the connector streaming the slot to retry entries now, and waits
/// until it has.
async fn hand_over(
    client: &Client,
    slot: &str,
    id: Option<i64>,
    limit: Duration,
) -> Result<RetryOutcome, Error> {
    let ids = state::request_retry(client, slot, id).await?;
    if ids.is_empty() {
        return Ok(RetryOutcome::default());
    }
    client
        .execute(
            "SELECT pg_logical_emit_message(false, $1, $2)",
            &[&WATERMARK_PREFIX, &format!("retry:{slot}")],
        )
        .await
        .map_err(|e| SourceError::from_sql("waking the running connector", e))?;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (gone, kept) = state::retried(client, &ids).await?;
        if gone + kept == ids.len() {
            return Ok(RetryOutcome {
                delivered: gone,
                rejected: kept,
                ..RetryOutcome::default()
            });
        }
        if tokio::time::Instant::now() > deadline {
            return Ok(RetryOutcome {
                delivered: gone,
                rejected: kept,
                pending: ids.len() - gone - kept,
                ..RetryOutcome::default()
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The running connector's retries: due entries (automatic, with backoff
/// per entry, when `dead_letters.retry_every_ms` is set) and those
/// `dead-letters retry` asked for.
pub(super) struct Redeliver<'a> {
    pub settings: &'a Settings,
    pub schema: &'a Schema,
    pub state: &'a State,
    pub sink: &'a Sink,
    /// The reader's second sync window, for this task's watermarks.
    pub window: Arc<Mutex<Window>>,
    /// Woken by a retry request read from the stream.
    pub wake: Arc<Notify>,
    /// Whether the stream carries watermarks (Postgres 14 on).
    pub messages: bool,
}

impl Redeliver<'_> {
    /// Retries until a stop (or an error, which ends the session).
    pub(super) async fn run(self, mut shutdown: Shutdown) -> Result<(), Error> {
        let client = Arc::new(connect_sql(&self.settings.postgres).await?);
        let mut chunks = WatermarkedChunks::new(&client, &self.window, &self.settings.slot, "dl");
        let tick = self
            .settings
            .dead_letter_retry_every
            .map_or(DEPTH_REFRESH, |every| every.min(DEPTH_REFRESH));
        loop {
            let Some(full) = self.pass(&client, &mut chunks, &mut shutdown).await? else {
                return Ok(());
            };
            // Transactions the stream carried that a snapshot taken now
            // sees need no longer be kept for this window's chunks.
            let now = snapshot::current_snapshot(&client).await?;
            if let Ok(mut w) = self.window.lock() {
                w.settle(&now);
            }
            if full {
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.wait() => return Ok(()),
            }
        }
    }

    /// Retries up to [`DUE_PER_PASS`] entries due; whether it took that
    /// many (more may be due), or None on a stop.
    async fn pass(
        &self,
        client: &Arc<Client>,
        chunks: &mut WatermarkedChunks<'_>,
        shutdown: &mut Shutdown,
    ) -> Result<Option<bool>, Error> {
        let settings = self.settings;
        let due = state::due_dead_letters(
            client,
            &settings.slot,
            settings.dead_letter_retry_every,
            Duration::from_millis(DEAD_LETTER_RETRY_MAX_MS),
            DUE_PER_PASS,
        )
        .await?;
        let full = due.len() as i64 == DUE_PER_PASS;
        let limit = settings.conveyour.request_timeout * 3;
        let mut rereads: BTreeMap<(String, bool), (&TableMapping, Vec<DeadLetter>)> =
            BTreeMap::new();
        let mut reachable = true;
        for l in due {
            match route(settings, &l) {
                Route::Reread(m) => rereads
                    .entry((l.table.clone(), never_sent_insert(m, &l)))
                    .or_insert_with(|| (m, Vec::new()))
                    .1
                    .push(l),
                Route::Stuck(why) => state::note_retry_skipped(client, l.id, &why).await?,
                Route::Stored(endpoint) if reachable => {
                    let sent =
                        send_stored(self.sink, client, &settings.slot, &l, endpoint, limit).await?;
                    reachable = !matches!(sent, Sent::Unreachable(_));
                }
                // ConveYour did not answer the last one: the rest wait for
                // the next pass.
                Route::Stored(_) => state::note_retry_skipped(client, l.id, &l.message).await?,
            }
        }
        for ((_, new_rows), (m, mut letters)) in rereads {
            // A chunk's rows wait in memory for the high watermark: read
            // as many at a time as a copy's chunk.
            while !letters.is_empty() {
                let rest = letters.split_off(letters.len().min(settings.sync_chunk_rows.max(1)));
                if !self
                    .reread(client, chunks, m, letters, new_rows, shutdown)
                    .await?
                {
                    return Ok(None);
                }
                letters = rest;
            }
        }
        let n = state::count_dead_letters(client, &settings.slot).await?;
        telemetry::metrics().dead_letters_stored.set(n);
        Ok(Some(full))
    }

    /// Reads one table's rows of `letters` again between watermarks and
    /// hands what they map to to delivery (with their counters for
    /// `new_rows`, see [`never_sent_insert`]); then removes the entries not
    /// stored again meanwhile. False on a stop.
    async fn reread(
        &self,
        client: &Arc<Client>,
        chunks: &mut WatermarkedChunks<'_>,
        m: &TableMapping,
        letters: Vec<DeadLetter>,
        new_rows: bool,
        shutdown: &mut Shutdown,
    ) -> Result<bool, Error> {
        if !self.messages {
            for l in &letters {
                state::note_retry_skipped(client, l.id, &noted(&l.message, "a retry reads the row again between watermarks, which needs PostgreSQL 14 or later")).await?;
            }
            return Ok(true);
        }
        let reader = TableReader::describe(client, m, self.schema).await?;
        let key_columns: Vec<String> = reader.key_columns().map(|(_, c)| c.name.clone()).collect();
        let mut ids = Vec::new();
        let mut keys: Vec<(i64, Key)> = Vec::new();
        for l in &letters {
            let stored: Option<Vec<&String>> =
                l.key.as_ref().map(|k| k.iter().map(|(c, _)| c).collect());
            match (reader.has_primary_key(), stored, l.key_values()) {
                (true, Some(columns), Some(values))
                    if columns.iter().copied().eq(key_columns.iter()) =>
                {
                    ids.push(l.id);
                    keys.push((l.id, values));
                }
                _ => {
                    state::note_retry_skipped(client, l.id, &noted(&l.message, "the table's primary key is not the one stored with the entry: fix the row, then purge this entry")).await?;
                }
            }
        }
        if ids.is_empty() {
            return Ok(true);
        }
        let since = state::db_now(client).await?;
        let mut todo: Vec<Key> = keys.iter().map(|(_, k)| k.clone()).collect();
        todo.dedup();
        let mut round = 0;
        loop {
            // A row still unmappable is stored again, so kept.
            let read = || async {
                let rows = reader.read_keys(client, &todo).await?;
                snapshot::map_rows(
                    m,
                    self.schema,
                    &reader,
                    client,
                    rows,
                    Some(self.state),
                    new_rows,
                )
                .await
            };
            let Some((_, (redo, unsure))) =
                chunks.chunk(&m.table, &key_columns, read, shutdown).await?
            else {
                return Ok(false);
            };
            todo = redo;
            if todo.is_empty() {
                break;
            }
            if unsure {
                // A transaction the read did not see yet changed the table
                // in rows not known: wait for it to turn visible, however
                // many rounds that takes (as a copy does).
                tokio::select! {
                    _ = tokio::time::sleep(snapshot::UNSURE_PAUSE) => {}
                    _ = shutdown.wait() => return Ok(false),
                }
                continue;
            }
            round += 1;
            if round == REREAD_ROUNDS {
                break;
            }
        }
        // Rows the stream kept changing in part: not sent this time.
        let unsent: Vec<i64> = keys
            .iter()
            .filter(|(_, k)| todo.contains(k))
            .map(|(id, _)| *id)
            .collect();
        let resolved = state::settle_reread(client, &ids, &unsent, since).await?;
        tracing::info!(table = %m.table, retried = ids.len(), resolved, "dead letters: rows read again and sent");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn settings() -> Settings {
        Config::from_yaml(
            "postgres:\n  url: postgres://u:p@127.0.0.1:5432/app\n\
             conveyour:\n  url: https://acme.conveyour.com\n  appkey: a\n  token: t\n\
             tables:\n  - table: employees\n    identify: {id: email, traits: {first_name: first_name}}\n\
             \x20 - table: sales\n    track: {id: employee_email, event: made_sale}\n",
        )
        .unwrap()
        .validate(&|_| None)
        .unwrap()
    }

    fn letter(reason: Reason, endpoint: &str, table: &str, keyed: bool) -> DeadLetter {
        DeadLetter {
            id: 1,
            reason: reason.code().into(),
            endpoint: endpoint.into(),
            table: table.into(),
            contact: "a@x.test".into(),
            lsn: "0/1".into(),
            key: keyed.then(|| vec![("id".into(), Some("7".into()))]),
            status: 400,
            message: "refused".into(),
            attempts: 1,
            retries: 0,
            created_at: String::new(),
            payload: "null".into(),
        }
    }

    #[test]
    fn identify_rows_are_read_again_and_events_sent_as_stored() {
        let s = settings();
        let route = |l: DeadLetter| match route(&s, &l) {
            Route::Reread(m) => format!("reread {}", m.table),
            Route::Stored(e) => format!("stored {}", e.name()),
            Route::Stuck(_) => "stuck".into(),
        };
        let (rejected, unmappable) = (Reason::Rejected, Reason::Unmappable);
        let employees = "public.employees";
        let sales = "public.sales";
        assert_eq!(
            route(letter(rejected, "identify", employees, true)),
            "reread public.employees"
        );
        // Stored before keys were kept: sent as stored.
        assert_eq!(
            route(letter(rejected, "identify", employees, false)),
            "stored identify"
        );
        // Events and counters do not go stale.
        assert_eq!(
            route(letter(rejected, "track", sales, false)),
            "stored track"
        );
        assert_eq!(
            route(letter(rejected, "identify", sales, false)),
            "stored identify"
        );
        // An unmappable row is read again whatever its table's kind, and
        // cannot be sent without its key.
        assert_eq!(
            route(letter(unmappable, "track", sales, true)),
            "reread public.sales"
        );
        assert_eq!(
            route(letter(unmappable, "identify", employees, false)),
            "stuck"
        );
        assert_eq!(
            route(letter(rejected, "identify", "public.gone", true)),
            "stored identify"
        );
        // Codes are stable: dead-letters list and scripts read them.
        assert_eq!(
            (rejected.code(), unmappable.code()),
            ("rejected", "unmappable")
        );
    }
}
