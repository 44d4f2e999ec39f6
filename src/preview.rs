//! `preview`: what the mapping would send for the rows the mapped tables
//! hold now, as if each had just been inserted. Printed, never sent.
//!
//! It runs the connector's own pieces, so what it prints is what `run`
//! would send for an insert of that row: the catalog check
//! (`Catalog::load`), a `Relation` per table built from the catalog,
//! the `Mapper`, the lookup `Resolver` and the sink's request encoding.
//! Values are read in Postgres's text output format with the replication
//! session's settings, which is the text pgoutput carries.
//!
//! Everything is read in one `REPEATABLE READ READ ONLY` transaction: every
//! table and lookup sees one snapshot, and the server refuses any write.

use std::fmt;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use tokio_postgres::Client;

use crate::config::{ContactSource, Settings, TableMapping, TableName};
use crate::decode::value::{to_json, ValueKind};
use crate::decode::{Column, Datum, Relation, Tuple};
use crate::lsn::Lsn;
use crate::mapping::{MapError, Mapper, Schema};
use crate::sendable::{self, Sendable, SkipKind};
use crate::sink::{single_body, Endpoint};
use crate::source::{connect_sql, Catalog, Resolver, SourceError, TableReader};
use crate::Error;

/// Rows shown per table when `--limit` is not given: enough to see every
/// shape a mapping produces, few enough to read.
pub const DEFAULT_LIMIT: u64 = 10;

/// Every transaction of the session read-only too, not only the one
/// preview opens: nothing it runs can write, whatever the row filter says.
const READ_ONLY: &str = "SET default_transaction_read_only = on; \
     BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

/// Said of a rejected row the running connector would not skip but stop
/// at (a mapping error rather than a row that belongs to no contact).
const STOPS: &str = "the connector stops at such a row until it is fixed";

/// What a preview read and printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub tables: usize,
    pub rows: u64,
    /// Request bodies printed.
    pub requests: u64,
    /// Rows flagged as rejected.
    pub rejected: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |count: u64, one: &str, many: &str| {
            format!("{count} {}", if count == 1 { one } else { many })
        };
        write!(
            f,
            "preview: {} read from {}, {}, {} rejected; nothing was sent",
            n(self.rows, "row", "rows"),
            n(self.tables as u64, "table", "tables"),
            n(self.requests, "request", "requests"),
            self.rejected
        )
    }
}

/// The mapped tables to preview: all of them, or the one `only` names
/// (`schema.table`, or `table` for the `public` schema). The error says why
/// `only` names no mapped table, and which tables are mapped.
pub fn select<'a>(
    settings: &'a Settings,
    only: Option<&str>,
) -> Result<Vec<&'a TableMapping>, String> {
    let Some(text) = only else {
        return Ok(settings.tables.iter().collect());
    };
    let name = TableName::parse(text).ok_or_else(|| {
        format!("`{text}` is not a table name: give schema.table, or table for the public schema")
    })?;
    if let Some(m) = settings.tables.iter().find(|m| m.table == name) {
        return Ok(vec![m]);
    }
    let mapped: Vec<String> = settings
        .tables
        .iter()
        .map(|m| m.table.to_string())
        .collect();
    let mapped = mapped.join(", ");
    let reader = settings
        .tables
        .iter()
        .find(|m| matches!(&m.contact, ContactSource::Lookup(l) if l.from == name));
    Err(match reader {
        Some(m) => format!(
            "{name} is not mapped: it is only read by the lookup {}.{}.id.from, and its own rows send nothing; the mapped tables are {mapped}",
            m.key,
            m.section()
        ),
        None => format!("{name} is not a mapped table; the mapped tables are {mapped}"),
    })
}

/// Reads at most `limit` rows of each of `tables`, in primary-key order
/// (all columns read, as text, when there is no primary key), and writes
/// one JSON line per row to `out`: the requests an insert of the row would
/// send, or why it would be rejected. A row that cannot be sent is a
/// flagged line, not an error; a mapping that does not fit the database
/// is an error naming its config key.
pub async fn run(
    settings: &Settings,
    tables: &[&TableMapping],
    limit: u64,
    out: &mut dyn Write,
) -> Result<Summary, Error> {
    let client = Arc::new(connect_sql(&settings.postgres).await?);
    client
        .batch_execute(READ_ONLY)
        .await
        .map_err(|e| SourceError::from_sql("starting the read-only preview transaction", e))?;
    let result = preview(&client, tables, limit, out).await;
    // Nothing was written; end the transaction whatever happened.
    let _ = client.batch_execute("ROLLBACK").await;
    result
}

async fn preview(
    client: &Arc<Client>,
    tables: &[&TableMapping],
    limit: u64,
    out: &mut dyn Write,
) -> Result<Summary, Error> {
    let mappings: Vec<TableMapping> = tables.iter().map(|m| (*m).clone()).collect();
    let schema = Catalog::load(client, &mappings).await?;
    let mut resolver = Resolver::new(client.clone(), schema.lookups.clone());
    let mut mapper = Mapper::new(&mappings, schema.clone());
    let mut summary = Summary {
        tables: mappings.len(),
        ..Summary::default()
    };
    let write_error = |e: std::io::Error| Error::Setup(format!("writing the preview: {e}"));
    for (i, m) in mappings.iter().enumerate() {
        let read = TableReader::describe(client, m, &schema).await?;
        // Each table under a relation id of its own, as in the stream.
        let relation = Relation {
            id: i as u32 + 1,
            ..read.relation().clone()
        };
        mapper
            .relation(&relation, Lsn::ZERO)
            .map_err(|e| Error::Setup(mapping_problem(&e)))?;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        for (_, tuple) in read.read(client, None, limit).await? {
            let verdict = verdict(&mapper, &mut resolver, m, relation.id, &tuple).await?;
            summary.rows += 1;
            match &verdict {
                Ok(requests) => summary.requests += requests.len() as u64,
                Err(_) => summary.rejected += 1,
            }
            out.write_all(&line(
                &m.table,
                &key_json(read.key_columns(), &schema, &tuple),
                &verdict,
            ))
            .map_err(write_error)?;
        }
    }
    out.flush().map_err(write_error)?;
    Ok(summary)
}

/// What an insert of the row would send, in order, or why it would not be
/// sent.
type Verdict = Result<Vec<(Endpoint, Bytes)>, String>;

/// Maps a row exactly as the stream maps an inserted one.
async fn verdict(
    mapper: &Mapper,
    resolver: &mut Resolver,
    m: &TableMapping,
    relation: u32,
    tuple: &Tuple,
) -> Result<Verdict, Error> {
    let outcome = match mapper.insert(relation, tuple, Lsn::ZERO) {
        Ok(outcome) => outcome,
        // Unlike a skip, `run` stops on such a row: say so.
        Err(e) => return Ok(Err(format!("{}; {STOPS}", row_problem(&e)))),
    };
    let (mapped, contact) = match sendable::resolve(outcome, resolver).await? {
        Sendable::Nothing => return Ok(Ok(Vec::new())),
        Sendable::Skip(skip) => {
            // A lookup that found nothing names its key column.
            let column = match (skip.kind, &m.contact) {
                (SkipKind::ContactNotFound, ContactSource::Lookup(l)) => l.key.as_str(),
                (SkipKind::ContactNotFound, ContactSource::Column(c)) => c.as_str(),
                _ => skip.column.as_str(),
            };
            return Ok(Err(format!("column {column}: {}", skip.reason)));
        }
        Sendable::Send { mapped, contact } => (mapped, contact),
    };
    Ok(Ok(mapped
        .into_actions(contact, Lsn::ZERO)
        .map(|a| single_body(&a))
        .collect()))
}

/// A row's mapping error as a rejection reason: the column and the
/// problem (the line names the table; the stream position means nothing
/// here).
fn row_problem(e: &MapError) -> String {
    match &e.column {
        Some(c) => format!("column {c}: {}", e.problem),
        None => e.problem.clone(),
    }
}

/// A mapping that does not fit the table, without the stream position.
fn mapping_problem(e: &MapError) -> String {
    format!("table {}: {}", e.table, row_problem(e))
}

/// The row's key as a JSON object in key column order, values converted
/// as the mapping converts them.
fn key_json<'a>(
    key: impl Iterator<Item = (usize, &'a Column)>,
    schema: &Schema,
    tuple: &Tuple,
) -> String {
    let fields: Vec<String> = key
        .map(|(i, column)| {
            let kind = ValueKind::from_builtin_oid(column.type_oid)
                .or_else(|| schema.kinds.get(&column.type_oid).cloned())
                .unwrap_or(ValueKind::Text);
            let value = match tuple.0.get(i) {
                Some(Datum::Text(b)) => to_json(&kind, b)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned())),
                _ => Value::Null,
            };
            format!("{}:{value}", Value::String(column.name.clone()))
        })
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// One JSON line, keys in a fixed order; request bodies are embedded as
/// the exact bytes the sink would send.
fn line(table: &TableName, key: &str, verdict: &Verdict) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"{\"table\":");
    out.extend_from_slice(Value::String(table.to_string()).to_string().as_bytes());
    out.extend_from_slice(b",\"key\":");
    out.extend_from_slice(key.as_bytes());
    match verdict {
        Ok(requests) => {
            out.extend_from_slice(b",\"requests\":[");
            for (i, (endpoint, body)) in requests.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"endpoint\":");
                out.extend_from_slice(Value::String(endpoint.path().into()).to_string().as_bytes());
                out.extend_from_slice(b",\"body\":");
                out.extend_from_slice(body);
                out.push(b'}');
            }
            out.push(b']');
        }
        Err(reason) => {
            out.extend_from_slice(b",\"rejected\":");
            out.extend_from_slice(Value::String(reason.clone()).to_string().as_bytes());
        }
    }
    out.extend_from_slice(b"}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TableName {
        TableName::parse("public.sales").unwrap()
    }

    #[test]
    fn a_line_embeds_the_bodies_verbatim_in_a_fixed_key_order() {
        let verdict: Verdict = Ok(vec![
            (
                Endpoint::Identify,
                Bytes::from_static(br#"[{"id":"a","traits":{}}]"#),
            ),
            (
                Endpoint::Track,
                Bytes::from_static(br#"{"id":"a","events":[]}"#),
            ),
        ]);
        assert_eq!(
            String::from_utf8(line(&table(), r#"{"id":1}"#, &verdict)).unwrap(),
            "{\"table\":\"public.sales\",\"key\":{\"id\":1},\"requests\":[\
             {\"endpoint\":\"/api/analytics/identify\",\"body\":[{\"id\":\"a\",\"traits\":{}}]},\
             {\"endpoint\":\"/api/analytics/track\",\"body\":{\"id\":\"a\",\"events\":[]}}]}\n"
        );
        let rejected: Verdict = Err("column kind: the \"event\" is NULL".into());
        assert_eq!(
            String::from_utf8(line(&table(), "{}", &rejected)).unwrap(),
            "{\"table\":\"public.sales\",\"key\":{},\"rejected\":\"column kind: the \\\"event\\\" is NULL\"}\n"
        );
    }

    #[test]
    fn the_summary_counts_in_words() {
        let s = Summary {
            tables: 1,
            rows: 2,
            requests: 1,
            rejected: 0,
        };
        assert_eq!(
            s.to_string(),
            "preview: 2 rows read from 1 table, 1 request, 0 rejected; nothing was sent"
        );
    }

    #[test]
    fn a_mapping_problem_drops_the_meaningless_position() {
        let e = MapError {
            table: "public.sales".into(),
            column: Some("email".into()),
            lsn: Lsn::ZERO,
            problem: "the contact id is NULL".into(),
            fault: crate::mapping::MapFault::Row,
        };
        assert_eq!(row_problem(&e), "column email: the contact id is NULL");
        assert_eq!(
            mapping_problem(&e),
            "table public.sales: column email: the contact id is NULL"
        );
    }

    #[test]
    fn keys_keep_their_column_order_and_json_types() {
        let column = |name: &str, type_oid: u32| Column {
            key: true,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        // Key order, not column order: z (int4) first, then a (text).
        let (z, a) = (column("z", 23), column("a", 25));
        let key = || [(1, &z), (0, &a)].into_iter();
        let schema = Schema::default();
        let tuple = Tuple(vec![
            Datum::Text(Bytes::from_static(b"x")),
            Datum::Text(Bytes::from_static(b"7")),
        ]);
        assert_eq!(key_json(key(), &schema, &tuple), r#"{"z":7,"a":"x"}"#);
        let tuple = Tuple(vec![Datum::Null, Datum::Null]);
        assert_eq!(key_json(key(), &schema, &tuple), r#"{"z":null,"a":null}"#);
    }
}
