//! Generated columns the config reads. pgoutput leaves them out of the
//! stream, so a mapping reading one would see it vanish at the first
//! change (the initial copy's SELECT reads it, the stream does not):
//!
//! - from PostgreSQL 18, a *stored* generated column is sent when the
//!   publication says `publish_generated_columns = stored`, which the
//!   connector sets on its publications when, and only when, a mapped
//!   column needs it;
//! - before 18 no generated column is ever sent, and a *virtual* one (new
//!   in 18, and its default) never is: `check` and `run` refuse such a
//!   mapping, naming the table, the column and its config key.

use tokio_postgres::Client;

use super::SourceError;
use crate::config::{ContactSource, TableMapping, TableName};
use crate::sql::quote_ident;

/// `server_version_num` of the first release whose pgoutput publishes
/// stored generated columns (`publish_generated_columns`).
pub(crate) const PUBLISH_GENERATED_SINCE: i32 = 180_000;

/// How a column is generated (`pg_attribute.attgenerated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Generation {
    /// `s`: computed on write and stored.
    Stored,
    /// `v`: computed on read (18+); never published.
    Virtual,
}

/// A generated column the config reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GeneratedColumn {
    pub table: TableName,
    pub column: String,
    /// The config key that names it.
    pub key: String,
    pub generation: Generation,
}

/// Every column the config reads from a table, with its config key: each
/// mapping's columns, and each lookup's columns of its related table,
/// whose stream keeps the lookup cache fresh.
fn read_columns(mappings: &[TableMapping]) -> Vec<(TableName, String, String)> {
    let mut out = Vec::new();
    for m in mappings {
        for usage in m.columns() {
            out.push((m.table.clone(), usage.column, usage.key));
        }
        if let ContactSource::Lookup(l) = &m.contact {
            let key = format!("{}.{}.id", m.key, m.section());
            out.push((l.from.clone(), l.column.clone(), format!("{key}.column")));
            if let Some(r) = &l.references {
                out.push((l.from.clone(), r.clone(), format!("{key}.references")));
            }
        }
    }
    out
}

/// The generated columns among those the config reads, in config order.
pub(crate) async fn generated_columns(
    client: &Client,
    mappings: &[TableMapping],
) -> Result<Vec<GeneratedColumn>, SourceError> {
    let read = read_columns(mappings);
    let tables: Vec<String> = read.iter().map(|(t, _, _)| t.quoted()).collect();
    let columns: Vec<&str> = read.iter().map(|(_, c, _)| c.as_str()).collect();
    let rows = client
        .query(
            "SELECT u.i::int8, a.attgenerated::text
               FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(t, c, i)
               JOIN pg_attribute a ON a.attrelid = to_regclass(u.t) AND a.attname = u.c
              WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated <> ''
              ORDER BY u.i",
            &[&tables, &columns],
        )
        .await
        .map_err(|e| SourceError::from_sql("looking up generated columns", e))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let (table, column, key) = read.get(r.get::<_, i64>(0) as usize - 1)?.clone();
            let generation = match r.get::<_, &str>(1) {
                "s" => Generation::Stored,
                _ => Generation::Virtual,
            };
            Some(GeneratedColumn {
                table,
                column,
                key,
                generation,
            })
        })
        .collect())
}

/// Refuses a generated column the stream cannot carry on this server:
/// a virtual one always, a stored one before 18.
pub(crate) fn refuse_unpublishable(
    version_num: i32,
    columns: &[GeneratedColumn],
) -> Result<(), SourceError> {
    for c in columns {
        let problem = match c.generation {
            Generation::Virtual => "a virtual generated column, which logical replication never sends; make it STORED (PostgreSQL 18 publishes stored generated columns), or map the columns it is computed from".to_owned(),
            Generation::Stored if version_num < PUBLISH_GENERATED_SINCE => format!(
                "a generated column, which logical replication sends only from PostgreSQL 18 on (publish_generated_columns), and this server is older (server_version_num {version_num}); map the columns it is computed from, or upgrade"
            ),
            Generation::Stored => continue,
        };
        return Err(SourceError::config(format!(
            "{}: column `{}` of table {} is {problem}",
            c.key, c.column, c.table
        )));
    }
    Ok(())
}

/// The tables among `tables` whose stored generated columns the config
/// reads: a publication holding one of them must publish them.
pub(crate) fn needing_publish<'a>(
    columns: &'a [GeneratedColumn],
    tables: &[&TableName],
) -> Vec<&'a GeneratedColumn> {
    columns
        .iter()
        .filter(|c| c.generation == Generation::Stored && tables.contains(&&c.table))
        .collect()
}

/// Whether `publication` publishes stored generated columns (18+); None
/// when it does not exist.
pub(crate) async fn publishes_generated(
    client: &Client,
    publication: &str,
) -> Result<Option<bool>, SourceError> {
    let row = client
        .query_opt(
            "SELECT pubgencols::text = 's' FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| SourceError::from_sql(&format!("looking up publication {publication}"), e))?;
    Ok(row.map(|r| r.get(0)))
}

/// The statement that makes `publication` publish stored generated columns.
pub(crate) fn publish_statement(publication: &str) -> String {
    format!(
        "ALTER PUBLICATION {} SET (publish_generated_columns = stored);",
        quote_ident(publication)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(generation: Generation) -> GeneratedColumn {
        GeneratedColumn {
            table: TableName::parse("public.employees").unwrap(),
            column: "full_name".into(),
            key: "tables[0].identify.traits.name".into(),
            generation,
        }
    }

    #[test]
    fn a_generated_column_is_refused_where_the_stream_cannot_carry_it() {
        let stored = [column(Generation::Stored)];
        assert!(refuse_unpublishable(180_000, &stored).is_ok());
        let e = refuse_unpublishable(170_004, &stored)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("tables[0].identify.traits.name: column `full_name` of table public.employees is a generated column")
                && e.contains("only from PostgreSQL 18")
                && e.contains("map the columns it is computed from, or upgrade"),
            "{e}"
        );
        let e = refuse_unpublishable(180_000, &[column(Generation::Virtual)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a virtual generated column") && e.contains("STORED"),
            "{e}"
        );
    }
}
