//! The database objects `run` needs: the publications, the connector's
//! own schema, and each mapped table's replica identity, row filter and
//! lookup.

use std::collections::HashMap;

use super::result::{fail, pass, warn, CheckResult};
use crate::config::{ContactSource, Settings, TableMapping, TableName};
use crate::mapping::Schema;
use crate::source::{self, FilterVerdict, Plan, ReplicaIdentity, Route};
use crate::sql::quote_ident;

/// The main publication holds every table that goes through it (or run
/// can create it), and the insert-only one is, or can be made, as the
/// placement wants it ([`source::plan`], the judgement `run` acts on).
pub(super) async fn publications(
    client: &tokio_postgres::Client,
    settings: &Settings,
    plan: Result<&Plan<'_>, &source::SourceError>,
) -> Vec<CheckResult> {
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => return vec![fail("publication", e.to_string())],
    };
    let user = &settings.postgres.user;
    let publication = &settings.publication;
    let main_tables = plan.routed(Route::Main);
    let insert_tables = plan.routed(Route::Inserts);
    let all: Vec<&TableName> = plan.placements.iter().map(|p| p.table.table).collect();
    let owns_tables = client
        .query_one(
            "SELECT bool_and(pg_has_role(c.relowner, 'USAGE')) OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            &[
                &all.iter().map(|t| t.schema.clone()).collect::<Vec<_>>(),
                &all.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
            ],
        )
        .await
        .map(|r| r.get::<_, Option<bool>>(0).unwrap_or(false))
        .unwrap_or(false);
    let owns_publications = client
        .query_one(
            "SELECT coalesce(bool_and(pg_has_role(pubowner, 'USAGE')), true) OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
               FROM pg_publication WHERE pubname = ANY ($1)",
            &[&vec![plan.main.clone(), plan.inserts.clone()]],
        )
        .await
        .map(|r| r.get::<_, Option<bool>>(0).unwrap_or(false))
        .unwrap_or(false);
    let mut out = Vec::new();
    match &plan.main_now {
        Some(main) => {
            // A table the insert-only publication holds is moved back by run.
            let missing: Vec<&TableName> = main_tables
                .iter()
                .map(|t| t.table)
                .filter(|t| {
                    !main.tables.contains(t)
                        && !plan
                            .inserts_now
                            .as_ref()
                            .is_some_and(|p| p.tables.contains(t))
                })
                .collect();
            // Every mapped table exists here: the placement needs them,
            // and "tables and columns" fails (without this line) when one
            // does not, so no ALTER is offered for a misspelled name.
            out.push(if missing.is_empty() {
                pass(
                    "publication",
                    format!("{publication} holds every mapped table and every table a lookup reads that goes through it"),
                )
            } else {
                fail(
                    "publication",
                    format!(
                        "{publication} lacks {}; run ALTER PUBLICATION {} ADD TABLE {};",
                        missing.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "),
                        quote_ident(publication),
                        missing.iter().map(|t| t.quoted()).collect::<Vec<_>>().join(", ")
                    ),
                )
            });
        }
        None => {
            let statement = source::create_statement(publication, &main_tables);
            out.push(if owns_tables {
                pass("publication", format!("{publication} does not exist yet; run will create it"))
            } else {
                fail(
                    "publication",
                    format!("{publication} does not exist and role {user} may not create it; as a table owner run {statement}"),
                )
            });
        }
    }
    const NAME: &str = "insert-only publication";
    let inserts = &plan.inserts;
    let listed: Vec<String> = insert_tables.iter().map(|t| t.table.to_string()).collect();
    let moves = plan.moves(true);
    match &plan.inserts_now {
        None if insert_tables.is_empty() => {}
        None if owns_tables => out.push(pass(
            NAME,
            format!("{inserts} does not exist yet; run will create it (publish = 'insert') for {}", listed.join(", ")),
        )),
        None => out.push(fail(
            NAME,
            format!(
                "{} need {inserts} (publish = 'insert'), which does not exist, and role {user} may not create it; as a table owner run {}",
                listed.join(", "),
                plan.owner_sql()
            ),
        )),
        Some(_) if !moves.is_empty() && (!owns_tables || !owns_publications) => out.push(fail(
            NAME,
            format!(
                "tables must move between {publication} and {inserts} to go through the right one, and role {user} may not alter them; as their owner run {}",
                plan.owner_sql()
            ),
        )),
        Some(_) => {
            let visible = source::visible_to_slot(client, &settings.slot, publication, inserts).await;
            let what = match (moves.is_empty(), listed.is_empty()) {
                (true, true) => format!("{inserts} exists and holds no mapped table"),
                (true, false) => format!("{inserts} holds {}", listed.join(", ")),
                (false, _) => format!("{inserts} exists; run moves tables into place: {}", moves.join(" ")),
            };
            out.push(match visible {
                Ok(true) => pass(NAME, what),
                Ok(false) => warn(
                    NAME,
                    format!("{what}; it was created after slot {}'s position, so the slot cannot stream it yet (PostgreSQL before 18): run streams it, and publishes the tables waiting for it, once the slot has passed its creation; inserts into its tables until then are not sent", settings.slot),
                ),
                Err(e) => fail(NAME, e.to_string()),
            });
        }
    }
    out
}

/// The connector's own schema: dead letters and row-grain progress live
/// there. It must exist and be usable by the role, or be creatable.
pub(super) async fn state_schema(
    client: &tokio_postgres::Client,
    settings: &Settings,
) -> CheckResult {
    const NAME: &str = "connector schema";
    let schema = crate::state::SCHEMA;
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1),
                    has_database_privilege(current_database(), 'CREATE'),
                    CASE WHEN EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)
                         THEN has_schema_privilege($1, 'CREATE') AND has_schema_privilege($1, 'USAGE') END",
            &[&schema],
        )
        .await;
    let needed = if settings.conveyour.on_reject == crate::config::OnReject::DeadLetter {
        "dead letters need it (or set conveyour.on_reject: stop)"
    } else {
        "without it a restart resends everything after the last confirmed transaction"
    };
    match row {
        Ok(r) => match (r.get::<_, bool>(0), r.get::<_, bool>(1), r.get::<_, Option<bool>>(2)) {
            (true, _, Some(true)) => pass(NAME, format!("{schema} exists and the role may use it")),
            (true, _, _) => fail(
                NAME,
                format!("{schema} exists but role {} may not create tables in it; run sql/setup.sql; {needed}", settings.postgres.user),
            ),
            (false, true, _) => pass(NAME, format!("{schema} does not exist yet; run will create it")),
            (false, false, _) => fail(
                NAME,
                format!("{schema} does not exist and role {} may not create it; run sql/setup.sql; {needed}", settings.postgres.user),
            ),
        },
        Err(e) => fail(NAME, e.to_string()),
    }
}

/// Per mapped table: its row filter, its lookup, and whether its replica
/// identity gives the mapping the old rows it needs; then the replica
/// identity of the tables only lookups read.
pub(super) async fn mapped_tables(
    client: &tokio_postgres::Client,
    settings: &Settings,
    schema: &Schema,
    plan: Result<&Plan<'_>, &source::SourceError>,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let route_of = |table: &TableName| match plan {
        Ok(plan) => plan
            .placements
            .iter()
            .find(|p| p.table.table == table)
            .map(|p| p.route.clone()),
        Err(e) => Some(Err(e.to_string())),
    };
    let inserts = source::insert_publication(&settings.publication);
    let version = source::server_version_num(client).await;
    // What the publications filter now, to say what `run` would change.
    let (held, held_inserts) = match &version {
        Ok(v) if *v >= 150_000 => (
            source::current_filters(client, &settings.publication)
                .await
                .unwrap_or_default(),
            source::current_filters(client, &inserts)
                .await
                .unwrap_or_default(),
        ),
        _ => (HashMap::new(), HashMap::new()),
    };
    for m in &settings.tables {
        let route = route_of(&m.table);
        let via_inserts = route == Some(Ok(Route::Inserts));
        let held_filter = if via_inserts { &held_inserts } else { &held }
            .get(&m.table)
            .cloned()
            .flatten();
        match (&m.row_filter, &version) {
            (Some(filter), Ok(v)) => out
                .push(row_filter(client, settings, m, filter, *v, held_filter, via_inserts).await),
            (Some(_), Err(e)) => out.push(fail(&format!("row filter {}", m.table), e.to_string())),
            (None, _) => {
                if let Some(held) = held_filter {
                    out.push(pass(
                        &format!("row filter {}", m.table),
                        format!(
                            "{} has no where:, but publication {} filters it by {held}; run removes that filter",
                            m.key, settings.publication
                        ),
                    ));
                }
            }
        }
        if let ContactSource::Lookup(l) = &m.contact {
            if let Some(target) = schema.lookup_index(l).map(|i| &schema.lookups[i]) {
                let filtered_from = settings
                    .tables
                    .iter()
                    .find(|t| t.table == target.from)
                    .and_then(|t| t.row_filter.as_ref().map(|_| t.key.as_str()));
                out.push(lookup(client, m, target, filtered_from).await);
            }
        }
        out.extend(identity(client, &m.table, Some(m), route.as_ref(), &inserts).await);
    }
    let mapped: Vec<&TableName> = settings.tables.iter().map(|m| &m.table).collect();
    for table in settings.published_tables() {
        if !mapped.contains(&table) {
            let route = route_of(table);
            out.extend(identity(client, table, None, route.as_ref(), &inserts).await);
        }
    }
    out
}

/// Whether Postgres accepts a table's `where:` in a publication, and
/// whether it keeps to the replica identity rule.
async fn row_filter(
    client: &tokio_postgres::Client,
    settings: &Settings,
    m: &TableMapping,
    filter: &str,
    version: i32,
    held: Option<String>,
    via_inserts: bool,
) -> CheckResult {
    let name = format!("row filter {}", m.table);
    let key = format!("{}.where", m.key);
    if version < 150_000 {
        return fail(
            &name,
            format!("{key}: row filters need PostgreSQL 15 or later, and this server is older (server_version_num {version}); remove where: or upgrade"),
        );
    }
    match source::probe_filter(client, &m.table, filter).await {
        // The insert-only publication publishes no updates or deletes, so
        // Postgres holds its filters to no replica identity rule.
        Ok(FilterVerdict::Accepted { .. }) if via_inserts => pass(
            &name,
            format!(
                "{key} is accepted by Postgres; the table goes through the insert-only publication {}, whose filters may read any column",
                source::insert_publication(&settings.publication)
            ),
        ),
        Ok(FilterVerdict::Accepted {
            identity_problem: Some(problem),
            ..
        }) => fail(&name, format!("{key}: {problem}")),
        Ok(FilterVerdict::Accepted {
            rowfilter,
            identity_problem: None,
        }) => {
            let mut detail = format!(
                "{key} is accepted by Postgres and reads only columns of the replica identity"
            );
            match (&held, &rowfilter) {
                (Some(h), Some(r)) if h == r => {
                    detail.push_str(&format!("; publication {} has it", settings.publication))
                }
                (Some(h), _) => detail.push_str(&format!(
                    "; publication {} filters by {h} now, and run changes it (when the role owns the publication)",
                    settings.publication
                )),
                (None, _) => {}
            }
            pass(&name, detail)
        }
        Ok(FilterVerdict::Refused(message)) => fail(
            &name,
            format!("{key}: Postgres refuses the row filter ({filter}): {message}"),
        ),
        Ok(FilterVerdict::ParsedOnly) => warn(
            &name,
            format!(
                "{key} parses, but role {} may not create publications, so Postgres's publication rules (built-in immutable functions only, columns of the replica identity) were not probed; run check as a table owner",
                settings.postgres.user
            ),
        ),
        Err(e) => fail(&name, format!("{key}: {e}")),
    }
}

/// A lookup's columns exist (the catalog load checked them) and an index
/// leads with the referenced column. `filtered_from` is the key of the
/// related table's own mapping when it has a row filter: changes to rows
/// outside it are not streamed, so cached contact ids for them go stale.
async fn lookup(
    client: &tokio_postgres::Client,
    m: &TableMapping,
    target: &crate::mapping::LookupTarget,
    filtered_from: Option<&str>,
) -> CheckResult {
    let name = format!("lookup {} -> {}", m.table, target.from);
    let ContactSource::Lookup(l) = &m.contact else {
        return fail(&name, "not a lookup");
    };
    let key = format!("{}.{}.id", m.key, m.section());
    let path = format!(
        "{key}: {}.{} -> {}.{} -> {}",
        m.table, l.key, target.from, target.references, target.column
    );
    let stale = filtered_from.map(|key| {
        format!(
            "; {key}.where keeps changes to {}'s other rows out of the stream, so a cached {} of such a row is not refreshed when it changes",
            target.from, target.column
        )
    });
    match source::lookup_indexed(client, target).await {
        Ok(true) => match stale {
            None => pass(
                &name,
                format!("{path}; an index leads with {}", target.references),
            ),
            Some(stale) => warn(
                &name,
                format!("{path}; an index leads with {}{stale}", target.references),
            ),
        },
        Ok(false) => warn(
            &name,
            format!(
                "{path}; no index leads with {}, so every lookup the cache misses scans {}; run CREATE INDEX ON {} ({});{}",
                target.references,
                target.from,
                target.from.quoted(),
                quote_ident(&target.references),
                stale.unwrap_or_default()
            ),
        ),
        Err(e) => fail(&name, format!("{key}: {e}")),
    }
}

/// Whether the table's replica identity lets Postgres take UPDATEs and
/// DELETEs once it is published (the placement `run` acts on, see
/// [`source::plan`]), and gives the mapping the old rows it needs
/// (`TableMapping::needs_full_identity`).
async fn identity(
    client: &tokio_postgres::Client,
    table: &TableName,
    m: Option<&TableMapping>,
    route: Option<&Result<Route, String>>,
    inserts: &str,
) -> Option<CheckResult> {
    let name = format!("replica identity {table}");
    let alter = format!("ALTER TABLE {} REPLICA IDENTITY FULL;", table.quoted());
    match route {
        Some(Err(problem)) => return Some(fail(&name, problem.clone())),
        Some(Ok(Route::Inserts)) => {
            return Some(pass(
                &name,
                format!(
                    "{} acts on inserts only, so the table goes through the insert-only publication {inserts} (publish = 'insert'), and Postgres keeps taking the application's UPDATEs and DELETEs on it whatever its replica identity",
                    m.map_or("its mapping", |m| m.key.as_str())
                ),
            ))
        }
        _ => {}
    }
    let identity = match source::replica_identity(client, table).await {
        Ok(identity) => identity,
        Err(e) => return Some(fail(&name, e.to_string())),
    };
    let reasons = m.map(|m| m.needs_full_identity()).unwrap_or_default();
    Some(match identity {
        // Placed in the main publication all the same: it publishes no
        // updates or deletes.
        ReplicaIdentity::Nothing { how } if route.is_some() => pass(
            &name,
            format!("is {how}, and the publication publishes no updates or deletes"),
        ),
        ReplicaIdentity::Nothing { how } => fail(
            &name,
            format!("is {how}: once the table is published, Postgres refuses every UPDATE and DELETE on it; run {alter} (or add a primary key)"),
        ),
        ReplicaIdentity::Full if reasons.is_empty() => return None,
        ReplicaIdentity::Full => pass(
            &name,
            if m.is_some_and(|m| m.operations.update) {
                "is FULL: the old row is known, so updates that change no mapped column are skipped"
            } else {
                "is FULL: the old row is known"
            },
        ),
        ReplicaIdentity::Columns { .. } if reasons.is_empty() => return None,
        identity @ ReplicaIdentity::Columns { .. } => warn(
            &name,
            format!("is {identity}, not FULL: {}; run {alter}", reasons.join("; ")),
        ),
    })
}
