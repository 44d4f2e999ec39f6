//! Row filters (`where:`): keeping each published table's filter in line
//! with the config, and proving a filter cannot break the application's
//! UPDATE and DELETE before it is applied.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::identity::identity_problem;
use super::info::PublicationInfo;
use super::tables::PublishedTable;
use super::tx::{begin, finish, is_privilege, pg_message};
use crate::config::TableName;
use crate::source::SourceError;
use crate::sql::quote_ident;

/// The publication `check` creates (and always rolls back) to let Postgres
/// judge a row filter without touching the real one.
const PROBE_PUBLICATION: &str = "conveyour_cdc_filter_probe";

/// The temporary table a row filter is spelled out on when the role may not
/// change the publication (see [`deparse`]).
const PROBE_TABLE: &str = "conveyour_cdc_filter_probe";
/// A table the publication holds, as `pg_publication_tables` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HeldTable {
    /// Postgres's spelling of the row filter.
    rowfilter: Option<String>,
    /// Listed by name (rather than through `FOR TABLES IN SCHEMA`), so it
    /// can be dropped and added back.
    listed: bool,
    /// The column list, when the publication limits the columns.
    columns: Option<Vec<String>>,
}

/// The tables the publication holds (Postgres 15+), by name.
pub(super) async fn held_tables(
    client: &Client,
    publication: &str,
) -> Result<HashMap<TableName, HeldTable>, SourceError> {
    let rows = client
        .query(
            "SELECT pt.schemaname::text, pt.tablename::text, pt.rowfilter, pr.prrelid IS NOT NULL,
                    CASE WHEN pr.prattrs IS NOT NULL THEN pt.attnames::text[] END
               FROM pg_publication_tables pt
               JOIN pg_publication p ON p.pubname = pt.pubname
               LEFT JOIN pg_publication_rel pr ON pr.prpubid = p.oid
                    AND pr.prrelid = (quote_ident(pt.schemaname) || '.' || quote_ident(pt.tablename))::regclass
              WHERE pt.pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading the publication's row filters", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                TableName {
                    schema: r.get(0),
                    name: r.get(1),
                },
                HeldTable {
                    rowfilter: r.get(2),
                    listed: r.get(3),
                    columns: r.get(4),
                },
            )
        })
        .collect())
}

/// How changing one table's filter went, inside the transaction.
pub(super) enum Alter {
    /// The filters now match the config, and the catalog changed.
    Changed,
    /// They already matched: nothing to commit.
    Unchanged,
    /// The role may not alter the publication.
    NotPermitted,
}

/// Brings each mapped table's row filter in line with its `where:`.
pub(super) async fn sync_filters(
    client: &Client,
    publication: &str,
    info: &PublicationInfo,
    tables: &[PublishedTable<'_>],
) -> Result<(), SourceError> {
    let held = held_tables(client, publication).await?;
    let work: Vec<(PublishedTable<'_>, HeldTable)> = tables
        .iter()
        .filter(|t| t.key.is_some())
        .filter_map(|t| Some((*t, held.get(t.table)?.clone())))
        .filter(|(t, h)| t.filter.is_some() || h.rowfilter.is_some())
        .collect();
    if work.is_empty() {
        return Ok(());
    }
    if info.all_tables {
        let t = work
            .iter()
            .find(|(t, _)| t.filter.is_some())
            .map_or(work[0].0, |(t, _)| *t);
        return Err(SourceError::config(format!(
            "{}: publication {publication} is FOR ALL TABLES, which cannot filter rows; give the connector a publication of its own (postgres.publication) or remove where:",
            t.where_key()
        )));
    }
    begin(client).await?;
    let outcome = alter_filters(client, publication, info, &work).await;
    let commit = matches!(outcome, Ok(Alter::Changed));
    let outcome = finish(client, outcome.map(|a| (commit, a))).await?;
    match outcome {
        Alter::Changed => {
            tracing::info!(
                publication,
                tables = %work.iter().map(|(t, _)| t.table.to_string()).collect::<Vec<_>>().join(", "),
                "brought the publication's row filters in line with the config"
            );
            Ok(())
        }
        Alter::Unchanged => Ok(()),
        Alter::NotPermitted => verify_unaltered(client, publication, info, &work).await,
    }
}

/// Drops and adds back each table with its configured filter, then checks
/// the result against the replica identity rule. Runs inside a
/// transaction the caller commits only on [`Alter::Changed`].
pub(super) async fn alter_filters(
    client: &Client,
    publication: &str,
    info: &PublicationInfo,
    work: &[(PublishedTable<'_>, HeldTable)],
) -> Result<Alter, SourceError> {
    for (t, h) in work {
        let mut statements = Vec::with_capacity(2);
        if h.listed {
            statements.push(format!(
                "ALTER PUBLICATION {} DROP TABLE {}",
                quote_ident(publication),
                t.table.quoted()
            ));
        }
        statements.push(format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            quote_ident(publication),
            t.clause(h.columns.as_deref())
        ));
        for sql in statements {
            match client.batch_execute(&sql).await {
                Ok(()) => {}
                Err(e) if is_privilege(&e) => return Ok(Alter::NotPermitted),
                Err(e) if t.filter.is_some() && e.as_db_error().is_some() => {
                    return Err(filter_refused(t, e))
                }
                Err(e) => {
                    return Err(SourceError::from_sql(
                        &format!("{}: changing publication {publication}", t.where_key()),
                        e,
                    ))
                }
            }
        }
    }
    if info.changes_rows {
        for (t, _) in work.iter().filter(|(t, _)| t.filter.is_some()) {
            if let Some(problem) = identity_problem(client, publication, t.table).await? {
                return Err(SourceError::config(format!("{}: {problem}", t.where_key())));
            }
        }
    }
    let after = held_tables(client, publication).await?;
    let changed = work
        .iter()
        .any(|(t, h)| after.get(t.table).map(|a| &a.rowfilter) != Some(&h.rowfilter));
    Ok(if changed {
        Alter::Changed
    } else {
        Alter::Unchanged
    })
}

/// The role may not alter the publication: fine when every filter already
/// matches the config (and keeps the replica identity rule); otherwise an
/// error naming the first table that differs and the statements to run.
pub(super) async fn verify_unaltered(
    client: &Client,
    publication: &str,
    info: &PublicationInfo,
    work: &[(PublishedTable<'_>, HeldTable)],
) -> Result<(), SourceError> {
    let mut differ = Vec::new();
    for (t, h) in work {
        let wanted = match t.filter {
            None => None,
            Some(filter) => deparse(client, t.table, filter).await?,
        };
        let matches = match (t.filter, &h.rowfilter) {
            (None, None) => true,
            (Some(_), Some(held)) => wanted.as_deref() == Some(held.as_str()),
            _ => false,
        };
        if !matches {
            differ.push((t, h));
        }
    }
    if let Some((first, held)) = differ.first() {
        let mut sql = vec!["BEGIN;".to_owned()];
        for (t, h) in &differ {
            if h.listed {
                sql.push(format!(
                    "ALTER PUBLICATION {} DROP TABLE {};",
                    quote_ident(publication),
                    t.table.quoted()
                ));
            }
            sql.push(format!(
                "ALTER PUBLICATION {} ADD TABLE {};",
                quote_ident(publication),
                t.clause(h.columns.as_deref())
            ));
        }
        sql.push("COMMIT;".to_owned());
        let now = match &held.rowfilter {
            Some(f) => format!("filters {} by {f}", first.table),
            None => format!("does not filter {}", first.table),
        };
        let wanted = match first.filter {
            Some(f) => format!("the configured ({f})"),
            None => "no filter, as configured".to_owned(),
        };
        return Err(SourceError::config(format!(
            "{}: publication {publication} {now}, not {wanted}, and this role may not alter the publication; as its owner run: {}",
            first.where_key(),
            sql.join(" ")
        )));
    }
    if info.changes_rows {
        for (t, _) in work.iter().filter(|(t, _)| t.filter.is_some()) {
            if let Some(problem) = identity_problem(client, publication, t.table).await? {
                return Err(SourceError::config(format!("{}: {problem}", t.where_key())));
            }
        }
    }
    Ok(())
}

/// Postgres's own spelling of `filter` on `table`, as
/// `pg_publication_tables.rowfilter` would show it, found without touching
/// any publication: a CHECK constraint with the filter on a temporary copy
/// of the table's columns is deparsed the same way. None when Postgres
/// refuses it there (the caller then reports a difference).
pub(super) async fn deparse(
    client: &Client,
    table: &TableName,
    filter: &str,
) -> Result<Option<String>, SourceError> {
    begin(client).await?;
    let outcome = async {
        client
            .batch_execute(&format!(
                "CREATE TEMPORARY TABLE {PROBE_TABLE} (LIKE {}); ALTER TABLE {PROBE_TABLE} ADD CHECK ({filter}) NOT VALID",
                table.quoted()
            ))
            .await?;
        client
            .query_opt(
                &format!(
                    "SELECT pg_get_expr(conbin, conrelid) FROM pg_constraint WHERE conrelid = '{PROBE_TABLE}'::regclass AND contype = 'c'"
                ),
                &[],
            )
            .await
    }
    .await;
    finish(client, Ok::<_, SourceError>((false, ()))).await?;
    Ok(outcome.ok().flatten().and_then(|r| r.get(0)))
}

/// What Postgres makes of a configured row filter, found by `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FilterVerdict {
    /// Postgres accepts it in a publication.
    Accepted {
        /// Postgres's spelling of it.
        rowfilter: Option<String>,
        /// Why it would break the table's UPDATEs and DELETEs, if it would.
        identity_problem: Option<String>,
    },
    /// Postgres refuses it: its message.
    Refused(String),
    /// The role may not create publications, so only the expression
    /// itself was checked (with EXPLAIN), not the publication's rules.
    ParsedOnly,
}

/// Asks Postgres about a row filter without changing anything: adds the
/// table with its filter to a probe publication inside a transaction that
/// is always rolled back; when the role may not create publications, falls
/// back to `EXPLAIN SELECT 1 FROM table WHERE (filter)`.
pub(crate) async fn probe_filter(
    client: &Client,
    table: &TableName,
    filter: &str,
) -> Result<FilterVerdict, SourceError> {
    begin(client).await?;
    let created = client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {} WHERE ({filter})",
            quote_ident(PROBE_PUBLICATION),
            table.quoted()
        ))
        .await;
    let verdict = match created {
        Ok(()) => {
            let inside = async {
                let rowfilter = client
                    .query_opt(
                        "SELECT rowfilter FROM pg_publication_tables WHERE pubname = $1",
                        &[&PROBE_PUBLICATION],
                    )
                    .await
                    .map_err(|e| SourceError::from_sql("reading the probe's row filter", e))?
                    .and_then(|r| r.get::<_, Option<String>>(0));
                let identity_problem = identity_problem(client, PROBE_PUBLICATION, table).await?;
                Ok(FilterVerdict::Accepted {
                    rowfilter,
                    identity_problem,
                })
            }
            .await;
            return finish(client, inside.map(|v| (false, v))).await;
        }
        Err(e) if is_privilege(&e) => None,
        Err(e) if e.as_db_error().is_some() => Some(FilterVerdict::Refused(pg_message(&e))),
        Err(e) => {
            finish(client, Ok::<_, SourceError>((false, ()))).await?;
            return Err(SourceError::from_sql("probing a row filter", e));
        }
    };
    finish(client, Ok::<_, SourceError>((false, ()))).await?;
    if let Some(verdict) = verdict {
        return Ok(verdict);
    }
    match client
        .batch_execute(&format!(
            "EXPLAIN SELECT 1 FROM {} WHERE ({filter})",
            table.quoted()
        ))
        .await
    {
        Ok(()) => Ok(FilterVerdict::ParsedOnly),
        Err(e) if e.as_db_error().is_some() => Ok(FilterVerdict::Refused(pg_message(&e))),
        Err(e) => Err(SourceError::from_sql("probing a row filter", e)),
    }
}

/// The filters the publication holds now (Postgres 15+), by table; for
/// `check` to say what `run` would change.
pub(crate) async fn current_filters(
    client: &Client,
    publication: &str,
) -> Result<HashMap<TableName, Option<String>>, SourceError> {
    Ok(held_tables(client, publication)
        .await?
        .into_iter()
        .map(|(t, h)| (t, h.rowfilter))
        .collect())
}

/// Postgres refused a table's row filter: a config error naming
/// `tables[i].where`, with Postgres's reason.
pub(super) fn filter_refused(t: &PublishedTable<'_>, e: tokio_postgres::Error) -> SourceError {
    SourceError::config(format!(
        "{}: Postgres refuses the row filter ({}) on {}: {}",
        t.where_key(),
        t.filter.unwrap_or(""),
        t.table,
        pg_message(&e)
    ))
}
