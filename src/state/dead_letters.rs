//! Dead letters: entries ConveYour rejected for good, and rows the mapping
//! could not send, stored in `conveyour_cdc.dead_letters` so the stream
//! goes on. Storage only; retrying them (HTTP, the mapping) is the
//! pipeline's.
//!
//! An entry that names a row (its primary key) is kept once per row: a
//! later failure of the same row replaces its message and payload rather
//! than adding an entry, since a retry sends the row's current values
//! anyway.

use std::time::Duration;

use tokio_postgres::Client;

use super::schema::SCHEMA;
use super::State;
use crate::decode::Tuple;
use crate::mapping::{MapError, Mapper, RowKey};
use crate::sink::{Endpoint, Request, SinkError};
use crate::source::SourceError;
use crate::{telemetry, Error};

/// Stores a row the mapping could not send (its values, not the table's
/// shape, are at fault) as an `unmappable` dead letter, then logs and
/// counts it once. Durable when it returns, so the stream may go past it.
pub(crate) async fn set_aside(
    state: &State,
    mapper: &Mapper,
    relation: u32,
    tuple: &Tuple,
    e: &MapError,
) -> Result<(), Error> {
    let endpoint = match mapper.is_track(relation) {
        true => Endpoint::Track,
        false => Endpoint::Identify,
    };
    let contact = mapper.contact_text(relation, tuple).unwrap_or_default();
    let key = mapper.key_of(relation, tuple);
    let added = state
        .dead_letter_row(
            endpoint.name(),
            &e.table,
            &contact,
            e.lsn,
            key.as_ref(),
            &e.to_string(),
        )
        .await?;
    let m = telemetry::metrics();
    m.dead_letters.inc();
    // Not counted per row (a table scan each, for every row of a copy full
    // of them): the retry task sets the exact depth on every pass.
    if added {
        m.dead_letters_stored.inc();
    }
    tracing::warn!(table = %e.table, lsn = %e.lsn, "stored an unmappable row as a dead letter (see dead-letters list): {e}");
    Ok(())
}

/// Why an entry is stored: its `reason` column, shown by
/// `dead-letters list`. Codes are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// ConveYour refused the entry for its content (a 4xx other than
    /// credentials, or a body that never said ok).
    Rejected,
    /// The mapping could not make an entry of the row (a NULL or empty
    /// contact id, a value that does not convert).
    Unmappable,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Unmappable => "unmappable",
        }
    }
}

/// One row to store.
struct NewLetter<'a> {
    endpoint: &'a str,
    table: &'a str,
    contact: &'a str,
    lsn: String,
    payload: &'a str,
    status: i32,
    message: &'a str,
    attempts: i32,
    reason: Reason,
    key: Option<&'a RowKey>,
}

impl State {
    /// Stores one rejected entry (a single-entry request) durably. An
    /// identify entry carries its row's key, and replaces the row's
    /// earlier entry if there is one. True when an entry was added (not
    /// replaced).
    pub(crate) async fn dead_letter(
        &self,
        req: &Request,
        err: &SinkError,
    ) -> Result<bool, SourceError> {
        let Some(first) = req.first() else {
            return Ok(false);
        };
        let payload = std::str::from_utf8(&req.body).unwrap_or("null");
        store(
            &self.client,
            &self.slot,
            NewLetter {
                endpoint: req.endpoint.name(),
                table: &first.table,
                contact: &first.contact,
                lsn: first.lsn.to_string(),
                payload,
                status: i32::from(err.status()),
                message: err.message(),
                attempts: err.attempts() as i32,
                reason: Reason::Rejected,
                key: first.key.as_ref(),
            },
        )
        .await
    }

    /// Stores a row the mapping could not send, by its key (nothing to
    /// send is stored: a retry reads the row again). Durable when it
    /// returns; true when an entry was added (not replaced).
    pub(crate) async fn dead_letter_row(
        &self,
        endpoint: &str,
        table: &str,
        contact: &str,
        lsn: crate::lsn::Lsn,
        key: Option<&RowKey>,
        message: &str,
    ) -> Result<bool, SourceError> {
        store(
            &self.client,
            &self.slot,
            NewLetter {
                endpoint,
                table,
                contact,
                lsn: lsn.to_string(),
                payload: "null",
                status: 0,
                message,
                attempts: 0,
                reason: Reason::Unmappable,
                key,
            },
        )
        .await
    }
}

/// Inserts an entry, or for a row already stored, replaces that entry's
/// content (its id, creation time and retry count stay; so does its LSN
/// when the row was read, not streamed, this time: a retry that still
/// cannot map the row keeps the change it stands for). True when an entry
/// was inserted.
async fn store(client: &Client, slot: &str, l: NewLetter<'_>) -> Result<bool, SourceError> {
    let (columns, values) = match l.key {
        Some(k) => (Some(k.columns.to_vec()), Some(k.values.clone())),
        None => (None, None),
    };
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 12] = [
        &slot,
        &l.endpoint,
        &l.table,
        &l.contact,
        &l.lsn,
        &l.payload,
        &l.status,
        &l.message,
        &l.attempts,
        &l.reason.code(),
        &columns,
        &values,
    ];
    if l.key.is_some() {
        let replaced = client
            .execute(
                &format!(
                    "UPDATE {SCHEMA}.dead_letters
                        SET endpoint = $2, contact = $4,
                            lsn = CASE WHEN $5::text::pg_lsn = '0/0' THEN lsn ELSE $5::text::pg_lsn END,
                            payload = $6::text::jsonb,
                            status = $7, message = $8, attempts = attempts + $9, reason = $10,
                            updated_at = now()
                      WHERE slot = $1 AND source_table = $3 AND key_columns = $11 AND key_values = $12"
                ),
                &params,
            )
            .await
            .map_err(|e| SourceError::from_sql("storing a dead letter", e))?;
        if replaced > 0 {
            return Ok(false);
        }
    }
    client
        .execute(
            &format!(
                "INSERT INTO {SCHEMA}.dead_letters
                    (slot, endpoint, source_table, contact, lsn, payload, status, message, attempts, reason, key_columns, key_values)
                 VALUES ($1, $2, $3, $4, $5::text::pg_lsn, $6::text::jsonb, $7, $8, $9, $10, $11, $12)"
            ),
            &params,
        )
        .await
        .map_err(|e| SourceError::from_sql("storing a dead letter", e))?;
    Ok(true)
}

/// One stored dead letter, as `dead-letters list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    /// `rejected` or `unmappable` (see [`Reason`]).
    pub reason: String,
    pub endpoint: String,
    pub table: String,
    pub contact: String,
    pub lsn: String,
    /// The row's primary key, `column=value` pairs; None for entries
    /// stored without one (events, deletes, tables without a primary key,
    /// entries from before keys were stored).
    pub key: Option<Vec<(String, Option<String>)>>,
    /// ConveYour's HTTP status; 0 for a row never sent.
    pub status: i32,
    pub message: String,
    pub attempts: i32,
    /// Retries that failed since the entry was stored.
    pub retries: i32,
    pub created_at: String,
    #[serde(skip)]
    pub payload: String,
}

impl DeadLetter {
    /// The key as the table reads it: values in key order.
    pub(crate) fn key_values(&self) -> Option<Vec<Option<String>>> {
        self.key
            .as_ref()
            .map(|k| k.iter().map(|(_, v)| v.clone()).collect())
    }
}

const COLUMNS: &str = "id, reason, endpoint, source_table, contact, lsn::text, key_columns, key_values, status, message, attempts, retries,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), payload::text";

fn letter(r: &tokio_postgres::Row) -> DeadLetter {
    let columns: Option<Vec<String>> = r.get(6);
    let values: Option<Vec<Option<String>>> = r.get(7);
    DeadLetter {
        id: r.get(0),
        reason: r.get(1),
        endpoint: r.get(2),
        table: r.get(3),
        contact: r.get(4),
        lsn: r.get(5),
        key: columns
            .zip(values)
            .map(|(c, v)| c.into_iter().zip(v).collect()),
        status: r.get(8),
        message: r.get(9),
        attempts: r.get(10),
        retries: r.get(11),
        created_at: r.get(12),
        payload: r.get(13),
    }
}

/// The slot's dead letters, oldest first (`id` limits to one).
pub async fn list_dead_letters(
    client: &Client,
    slot: &str,
    id: Option<i64>,
) -> Result<Vec<DeadLetter>, SourceError> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM {SCHEMA}.dead_letters WHERE slot = $1 AND ($2::int8 IS NULL OR id = $2) ORDER BY id"
            ),
            &[&slot, &id],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading dead letters", e))?;
    Ok(rows.iter().map(letter).collect())
}

/// Entries due for a retry, oldest first, at most `limit`: those
/// `dead-letters retry` asked for, and with `every` set, those whose wait
/// is over. The wait after the entry's last failure is `every` doubled per
/// failed retry, up to `max`.
pub(crate) async fn due_dead_letters(
    client: &Client,
    slot: &str,
    every: Option<Duration>,
    max: Duration,
    limit: i64,
) -> Result<Vec<DeadLetter>, SourceError> {
    let every_ms = every.map(|d| d.as_millis() as f64);
    let max_ms = max.as_millis() as f64;
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM {SCHEMA}.dead_letters
                  WHERE slot = $1
                    AND (retry_requested
                         OR ($2::float8 IS NOT NULL
                             AND updated_at + least($2 * power(2, least(retries, 30)), $3) * interval '1 millisecond' <= now()))
                  ORDER BY id LIMIT $4"
            ),
            &[&slot, &every_ms, &max_ms, &limit],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading dead letters due for a retry", e))?;
    Ok(rows.iter().map(letter).collect())
}

/// Marks entries (all, or one by `id`) for the running connector to retry
/// now; returns their ids.
pub(crate) async fn request_retry(
    client: &Client,
    slot: &str,
    id: Option<i64>,
) -> Result<Vec<i64>, SourceError> {
    let rows = client
        .query(
            &format!("UPDATE {SCHEMA}.dead_letters SET retry_requested = true WHERE slot = $1 AND ($2::int8 IS NULL OR id = $2) RETURNING id"),
            &[&slot, &id],
        )
        .await
        .map_err(|e| SourceError::from_sql("asking for a retry of dead letters", e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Of entries asked to be retried: how many are gone (delivered or found
/// obsolete), and how many were retried and kept. Entries still waiting
/// for their retry count in neither.
pub(crate) async fn retried(client: &Client, ids: &[i64]) -> Result<(usize, usize), SourceError> {
    let rows = client
        .query(
            &format!("SELECT retry_requested FROM {SCHEMA}.dead_letters WHERE id = ANY($1)"),
            &[&ids],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading dead letters", e))?;
    let kept = rows.iter().filter(|r| !r.get::<_, bool>(0)).count();
    Ok((ids.len() - rows.len(), kept))
}

/// The database's clock now: what a retry pass compares `updated_at` with
/// to tell entries stored again during it.
pub(crate) async fn db_now(client: &Client) -> Result<std::time::SystemTime, SourceError> {
    client
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .map(|r| r.get(0))
        .map_err(|e| SourceError::from_sql("reading the server's clock", e))
}

/// Ends a retry of entries whose rows were read again and sent: each not
/// stored again since `since` (so delivered, superseded by a newer change
/// the stream delivered, or its row gone) is deleted, except those in
/// `unsent`; the rest count one more failed retry. Returns how many were
/// deleted.
pub(crate) async fn settle_reread(
    client: &Client,
    ids: &[i64],
    unsent: &[i64],
    since: std::time::SystemTime,
) -> Result<u64, SourceError> {
    let deleted = client
        .execute(
            &format!("DELETE FROM {SCHEMA}.dead_letters WHERE id = ANY($1) AND NOT id = ANY($2) AND updated_at < $3"),
            &[&ids, &unsent, &since],
        )
        .await
        .map_err(|e| SourceError::from_sql("removing retried dead letters", e))?;
    client
        .execute(
            &format!(
                "UPDATE {SCHEMA}.dead_letters
                    SET retries = retries + CASE WHEN updated_at >= $2 THEN 1 ELSE 0 END, retry_requested = false
                  WHERE id = ANY($1)"
            ),
            &[&ids, &since],
        )
        .await
        .map_err(|e| SourceError::from_sql("updating retried dead letters", e))?;
    Ok(deleted)
}

/// Records a failed retry of a dead letter.
pub(crate) async fn note_retry_failure(
    client: &Client,
    id: i64,
    err: &SinkError,
) -> Result<(), SourceError> {
    client
        .execute(
            &format!(
                "UPDATE {SCHEMA}.dead_letters
                    SET attempts = attempts + $2, status = $3, message = $4, retries = retries + 1,
                        retry_requested = false, updated_at = now()
                  WHERE id = $1"
            ),
            &[
                &id,
                &(err.attempts() as i32),
                &i32::from(err.status()),
                &err.message(),
            ],
        )
        .await
        .map_err(|e| SourceError::from_sql("updating a dead letter", e))?;
    Ok(())
}

/// Records that a retry could not be made, with why (the entry waits for
/// its next turn).
pub(crate) async fn note_retry_skipped(
    client: &Client,
    id: i64,
    message: &str,
) -> Result<(), SourceError> {
    client
        .execute(
            &format!(
                "UPDATE {SCHEMA}.dead_letters
                    SET message = $2, retries = retries + 1, retry_requested = false, updated_at = now()
                  WHERE id = $1"
            ),
            &[&id, &message],
        )
        .await
        .map_err(|e| SourceError::from_sql("updating a dead letter", e))?;
    Ok(())
}

/// Deletes dead letters (`id` limits to one); returns how many.
pub async fn purge_dead_letters(
    client: &Client,
    slot: &str,
    id: Option<i64>,
) -> Result<u64, SourceError> {
    client
        .execute(
            &format!("DELETE FROM {SCHEMA}.dead_letters WHERE slot = $1 AND ($2::int8 IS NULL OR id = $2)"),
            &[&slot, &id],
        )
        .await
        .map_err(|e| SourceError::from_sql("purging dead letters", e))
}

/// How many dead letters the slot has.
pub(crate) async fn count_dead_letters(client: &Client, slot: &str) -> Result<i64, SourceError> {
    client
        .query_one(
            &format!("SELECT count(*) FROM {SCHEMA}.dead_letters WHERE slot = $1"),
            &[&slot],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|e| SourceError::from_sql("counting dead letters", e))
}
