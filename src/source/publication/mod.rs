//! The publications the connector streams from: the main one holds every
//! mapped table and every table a lookup reads, each mapped table filtered
//! by its `where:` (Postgres 15+), except the insert-only tables without a
//! usable replica identity, which go through `<publication>_inserts` (see
//! [`placement`]). Both are brought in line with the config on every
//! start.
//!
//! Postgres accepts a row filter that reads columns outside the table's
//! replica identity, and only later refuses every UPDATE and DELETE on the
//! table, which would break the application writing to it. So every
//! publication change made here is checked against that rule inside its
//! transaction, and rolled back when it fails.

use tokio_postgres::Client;

mod filters;
mod identity;
mod info;
mod placement;
mod tables;
mod tx;

pub(crate) use filters::{current_filters, probe_filter, FilterVerdict};
use filters::{filter_refused, sync_filters};
pub(crate) use identity::{identity_problem, replica_identity, ReplicaIdentity};
use info::publication_info;
pub(crate) use info::{publication_exists, published_table_names};
pub(crate) use placement::{insert_publication, plan, visible_to_slot, Plan, Route};
pub(crate) use tables::{published_tables, PublishedTable};
use tx::{begin, finish, is_privilege, pg_message};

use super::generated;
use super::SourceError;
use crate::config::{Settings, TableName};
use crate::sql::quote_ident;

/// `server_version_num` of the first release with publication row filters.
const ROW_FILTERS_SINCE: i32 = 150_000;

/// The server's `server_version_num`, e.g. 150004.
pub(crate) async fn server_version_num(client: &Client) -> Result<i32, SourceError> {
    let row = client
        .query_one("SHOW server_version_num", &[])
        .await
        .map_err(|e| SourceError::from_sql("reading the server version", e))?;
    let text: String = row.get(0);
    text.trim().parse().map_err(|_| {
        SourceError::config(format!(
            "the server reports server_version_num `{text}`, which is not a number"
        ))
    })
}

/// Refuses `where:` on a server without publication row filters, naming
/// the first table that has one.
pub(crate) fn require_row_filters(
    version_num: i32,
    tables: &[PublishedTable<'_>],
) -> Result<(), SourceError> {
    if version_num >= ROW_FILTERS_SINCE {
        return Ok(());
    }
    match tables.iter().find(|t| t.filter.is_some()) {
        None => Ok(()),
        Some(t) => Err(SourceError::config(format!(
            "{}: row filters need PostgreSQL 15 or later, and this server is older (server_version_num {version_num}); remove where: or upgrade",
            t.where_key()
        ))),
    }
}

/// What [`ensure_publication`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PublicationState {
    Created,
    Ready,
}

/// The publications to stream from, once [`ensure_publication`] made them
/// ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Publications {
    pub state: PublicationState,
    /// `publication_names` for START_REPLICATION: the main publication, and
    /// the insert-only one when the slot can decode with it.
    pub names: Vec<String>,
    /// The insert-only publication, when it exists but the slot cannot
    /// decode with it yet (it was created after the slot's position): the
    /// session reconnects once the slot has passed it.
    pub waiting_for: Option<String>,
}

/// Makes sure the publications exist, hold every table they must, and
/// filter each mapped table as its `where:` says.
///
/// First every table is placed ([`placement::plan`], the same judgement
/// `check` prints): a table Postgres would then refuse the application's
/// UPDATEs and DELETEs on is refused, naming the table and the fix, before
/// any publication is created or altered. Creates the main publication when
/// missing, and the insert-only one beside it (even empty, so that it
/// predates the slot). When the main one exists but lacks a table, refuses
/// with the statement to run, since adding tables to a publication others
/// may use is the operator's call; tables moving between the two
/// publications (a mapping that became insert-only, or no longer is) are
/// moved in one transaction, or the statements for the owner are printed.
/// Row filters are changed in one transaction that is rolled back when it
/// would change nothing, so a restart causes no catalog churn. A filter
/// Postgres refuses, or one that reads columns outside the table's replica
/// identity, fails with `tables[i].where` named and the publication
/// untouched.
pub(crate) async fn ensure_publication(
    client: &Client,
    settings: &Settings,
) -> Result<Publications, SourceError> {
    let publication = settings.publication.as_str();
    let version = server_version_num(client).await?;
    require_row_filters(version, &published_tables(settings))?;
    let plan = placement::plan(client, settings).await?;
    let problems = plan.problems();
    if !problems.is_empty() {
        return Err(SourceError::config(format!(
            "{}. No publication was created or changed",
            problems.join("; ")
        )));
    }
    // Filters of tables bound for the insert-only publication are judged
    // before anything is created (those of the main one when added to it).
    for t in plan.routed(Route::Inserts) {
        if let Some(filter) = t.filter {
            if let FilterVerdict::Refused(message) = probe_filter(client, t.table, filter).await? {
                return Err(SourceError::config(format!(
                    "{}: Postgres refuses the row filter ({filter}) on {}: {message}",
                    t.where_key(),
                    t.table
                )));
            }
        }
    }
    let mut state = PublicationState::Ready;
    if plan.main_now.is_none() && create(client, publication, &plan.routed(Route::Main)).await? {
        state = PublicationState::Created;
    }
    // A table the insert-only publication holds is moved back below.
    let wanted: Vec<&TableName> = plan
        .routed(Route::Main)
        .iter()
        .map(|t| t.table)
        .filter(|t| {
            !plan
                .inserts_now
                .as_ref()
                .is_some_and(|p| p.tables.contains(t))
        })
        .collect();
    let missing = missing_from_publication(client, publication, &wanted).await?;
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|t| t.quoted()).collect();
        return Err(SourceError::config(format!(
            "postgres.publication: publication {publication} lacks {}; run: ALTER PUBLICATION {} ADD TABLE {}",
            missing.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "),
            quote_ident(publication),
            list.join(", ")
        )));
    }
    if plan.inserts_now.is_none() {
        create_inserts(client, &plan).await?;
    }
    // Read again: the publications may have just been created.
    let plan = placement::plan(client, settings).await?;
    let listed = match plan.inserts_now {
        Some(_) => {
            placement::visible_to_slot(client, &settings.slot, publication, &plan.inserts).await?
        }
        None => false,
    };
    let moves = plan.moves(listed);
    if !moves.is_empty() {
        apply_moves(client, &plan, &moves).await?;
    }
    let main_tables = plan.routed(Route::Main);
    let insert_tables = plan.routed(Route::Inserts);
    // Nothing needs it: it is streamed from a later start, without a
    // reconnect now.
    let waiting_for = match (&plan.inserts_now, listed) {
        (Some(_), false) if !insert_tables.is_empty() => {
            let held: Vec<String> = insert_tables
                .iter()
                .filter(|t| {
                    plan.inserts_now
                        .as_ref()
                        .is_some_and(|p| p.tables.contains(t.table))
                })
                .map(|t| t.table.to_string())
                .collect();
            let waiting: Vec<String> = insert_tables
                .iter()
                .map(|t| t.table.to_string())
                .filter(|t| !held.contains(t))
                .collect();
            if !held.is_empty() {
                tracing::warn!(publication = %plan.inserts, tables = %held.join(", "), "the slot cannot decode with this insert-only publication yet (it was created after the slot's position): these tables' inserts are not streamed until the slot passes its creation, when the connector reconnects with it");
            }
            if !waiting.is_empty() {
                tracing::warn!(publication = %plan.inserts, tables = %waiting.join(", "), "these tables are published once the slot has passed the insert-only publication's creation, when the connector reconnects with it; their inserts until then are not streamed");
            }
            Some(plan.inserts.clone())
        }
        _ => None,
    };
    if version >= generated::PUBLISH_GENERATED_SINCE {
        let columns = generated::generated_columns(client, &settings.tables).await?;
        for (name, tables) in [(publication, &main_tables), (&plan.inserts, &insert_tables)] {
            let tables: Vec<&TableName> = tables.iter().map(|t| t.table).collect();
            publish_generated(client, name, &generated::needing_publish(&columns, &tables)).await?;
        }
    }
    let Some(info) = publication_info(client, publication).await? else {
        return Err(SourceError::transient(format!(
            "publication {publication} vanished while starting"
        )));
    };
    if version >= ROW_FILTERS_SINCE {
        sync_filters(client, publication, &info, &main_tables).await?;
        if listed {
            if let Some(info) = publication_info(client, &plan.inserts).await? {
                sync_filters(client, &plan.inserts, &info, &insert_tables).await?;
            }
        }
    }
    let mut names = vec![publication.to_owned()];
    if listed {
        names.push(plan.inserts.clone());
    }
    Ok(Publications {
        state,
        names,
        waiting_for,
    })
}

/// Makes `publication` publish stored generated columns (18+) when the
/// config reads one of its tables' (`needing`); a role that may not alter
/// it gets the statement for its owner. Changes nothing otherwise.
async fn publish_generated(
    client: &Client,
    publication: &str,
    needing: &[&generated::GeneratedColumn],
) -> Result<(), SourceError> {
    let Some(first) = needing.first() else {
        return Ok(());
    };
    if generated::publishes_generated(client, publication).await? != Some(false) {
        return Ok(());
    }
    let sql = generated::publish_statement(publication);
    match client.batch_execute(&sql).await {
        Ok(()) => {
            tracing::info!(publication, "the publication now publishes stored generated columns, which the mapping reads");
            Ok(())
        }
        Err(e) if is_privilege(&e) => Err(SourceError::config(format!(
            "{}: column `{}` of table {} is a stored generated column, which publication {publication} does not publish, and this role may not alter it ({}); as its owner run: {sql}",
            first.key,
            first.column,
            first.table,
            pg_message(&e)
        ))),
        Err(e) => Err(SourceError::from_sql(
            &format!("making publication {publication} publish stored generated columns"),
            e,
        )),
    }
}

/// Creates the insert-only publication, empty: tables are added once the
/// slot can decode with it. A role that may not create it is fine as long
/// as no table needs it; otherwise it gets the statements for an owner.
async fn create_inserts(client: &Client, plan: &placement::Plan<'_>) -> Result<(), SourceError> {
    let sql = format!(
        "CREATE PUBLICATION {} WITH (publish = 'insert')",
        quote_ident(&plan.inserts)
    );
    match client.batch_execute(&sql).await {
        Ok(()) => {
            tracing::info!(publication = %plan.inserts, "created the insert-only publication");
            Ok(())
        }
        Err(e) if SourceError::already_exists(&e) => Ok(()),
        Err(e) if is_privilege(&e) && plan.routed(Route::Inserts).is_empty() => Ok(()),
        Err(e) if is_privilege(&e) => Err(SourceError::config(format!(
            "postgres.publication: {} need the insert-only publication {}, and this role may not create it ({}); as a table owner or superuser run: {}",
            plan.routed(Route::Inserts)
                .iter()
                .map(|t| t.table.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            plan.inserts,
            pg_message(&e),
            plan.owner_sql()
        ))),
        Err(e) => Err(SourceError::from_sql(
            &format!("creating publication {}", plan.inserts),
            e,
        )),
    }
}

/// Moves tables between the two publications in one transaction: each
/// table's changes come through one publication or the other, never
/// neither. A role that may not alter them gets the statements to run.
async fn apply_moves(
    client: &Client,
    plan: &placement::Plan<'_>,
    moves: &[String],
) -> Result<(), SourceError> {
    begin(client).await?;
    let outcome = async {
        for sql in moves {
            match client.batch_execute(sql).await {
                Ok(()) => {}
                Err(e) if is_privilege(&e) => {
                    return Err(SourceError::config(format!(
                        "postgres.publication: publications {} and {} must change so that every table goes through the right one ({}), and this role may not alter them; as their owner run: {}",
                        plan.main,
                        plan.inserts,
                        pg_message(&e),
                        plan.owner_sql()
                    )))
                }
                Err(e) => {
                    // Adding a table with its filter: Postgres judged the filter.
                    let filtered = plan.placements.iter().map(|p| p.table).find(|t| {
                        t.filter.is_some() && sql.ends_with(&format!(" ADD TABLE {};", t.clause(None)))
                    });
                    return Err(match filtered {
                        Some(t) if e.as_db_error().is_some() => filter_refused(&t, e),
                        _ => SourceError::from_sql(
                            &format!("moving tables between publications {} and {} ({sql})", plan.main, plan.inserts),
                            e,
                        ),
                    });
                }
            }
        }
        for t in plan.routed(Route::Main).iter().filter(|t| t.filter.is_some()) {
            if let Some(problem) = identity_problem(client, &plan.main, t.table).await? {
                return Err(SourceError::config(format!("{}: {problem}", t.where_key())));
            }
        }
        Ok(())
    }
    .await;
    finish(client, outcome.map(|()| (true, ()))).await?;
    tracing::info!(main = %plan.main, inserts = %plan.inserts, statements = %moves.join(" "), "moved tables between the publications");
    Ok(())
}

/// The statement that creates the publication as the config wants it.
pub(crate) fn create_statement(publication: &str, tables: &[PublishedTable<'_>]) -> String {
    let list: Vec<String> = tables.iter().map(|t| t.clause(None)).collect();
    if list.is_empty() {
        return format!("CREATE PUBLICATION {};", quote_ident(publication));
    }
    format!(
        "CREATE PUBLICATION {} FOR TABLE {};",
        quote_ident(publication),
        list.join(", ")
    )
}

/// Creates the publication in one transaction, a table at a time so an
/// error names the table whose filter Postgres refused. Returns false when
/// another session created it first.
async fn create(
    client: &Client,
    publication: &str,
    tables: &[PublishedTable<'_>],
) -> Result<bool, SourceError> {
    begin(client).await?;
    let outcome = create_inside(client, publication, tables).await;
    finish(client, outcome.map(|created| (created, created))).await
}

async fn create_inside(
    client: &Client,
    publication: &str,
    tables: &[PublishedTable<'_>],
) -> Result<bool, SourceError> {
    let refused = |e: tokio_postgres::Error| {
        SourceError::from_sql(
            &format!(
                "creating publication {publication} (run as a table owner or superuser: {})",
                create_statement(publication, tables)
            ),
            e,
        )
    };
    match client
        .batch_execute(&format!("CREATE PUBLICATION {}", quote_ident(publication)))
        .await
    {
        Ok(()) => {}
        Err(e) if SourceError::already_exists(&e) => return Ok(false),
        Err(e) => return Err(refused(e)),
    }
    for t in tables {
        let sql = format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            quote_ident(publication),
            t.clause(None)
        );
        if let Err(e) = client.batch_execute(&sql).await {
            return Err(if is_privilege(&e) || t.filter.is_none() {
                refused(e)
            } else {
                filter_refused(t, e)
            });
        }
    }
    for t in tables.iter().filter(|t| t.filter.is_some()) {
        if let Some(problem) = identity_problem(client, publication, t.table).await? {
            return Err(SourceError::config(format!("{}: {problem}", t.where_key())));
        }
    }
    Ok(true)
}

/// The tables the publication does not hold.
pub(crate) async fn missing_from_publication<'a>(
    client: &Client,
    publication: &str,
    tables: &[&'a TableName],
) -> Result<Vec<&'a TableName>, SourceError> {
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading the publication's tables", e))?;
    let held: Vec<TableName> = rows
        .iter()
        .map(|r| TableName {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect();
    Ok(tables
        .iter()
        .copied()
        .filter(|t| !held.contains(t))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_on_an_old_server_names_the_key_and_the_version() {
        let a = TableName::parse("public.a").unwrap();
        let b = TableName::parse("public.b").unwrap();
        let tables = [
            PublishedTable {
                table: &a,
                key: Some("tables[0]"),
                filter: None,
                insert_only: false,
                read_by_lookup: false,
            },
            PublishedTable {
                table: &b,
                key: Some("tables[1]"),
                filter: Some("active"),
                insert_only: false,
                read_by_lookup: false,
            },
        ];
        let e = require_row_filters(140_011, &tables).unwrap_err();
        assert!(!e.is_transient());
        assert!(
            e.to_string()
                .starts_with("tables[1].where: row filters need PostgreSQL 15")
                && e.to_string().contains("server_version_num 140011"),
            "{e}"
        );
        assert!(require_row_filters(150_000, &tables).is_ok());
        assert!(require_row_filters(140_011, &tables[..1]).is_ok());
    }

    #[test]
    fn the_create_statement_carries_each_filter() {
        let a = TableName::parse("public.a").unwrap();
        let b = TableName::parse("public.b").unwrap();
        let tables = [
            PublishedTable {
                table: &a,
                key: Some("tables[0]"),
                filter: Some("active AND region = 'eu'"),
                insert_only: false,
                read_by_lookup: false,
            },
            PublishedTable {
                table: &b,
                key: None,
                filter: None,
                insert_only: false,
                read_by_lookup: true,
            },
        ];
        assert_eq!(
            create_statement("p", &tables),
            r#"CREATE PUBLICATION "p" FOR TABLE "public"."a" WHERE (active AND region = 'eu'), "public"."b";"#
        );
        assert_eq!(
            tables[0].clause(Some(&["id".to_owned(), "active".to_owned()])),
            r#""public"."a" ("id", "active") WHERE (active AND region = 'eu')"#
        );
    }
}
