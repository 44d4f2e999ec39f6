//! Preflight: everything `run` needs from the database, checked one by one,
//! each with the fix when it fails.

use std::fmt;

use crate::config::{quote_ident, Settings};
use crate::source::{self, connect_sql, Catalog, ReplicationConn};

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    /// What was found, or the problem and its fix.
    pub detail: String,
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.ok { "ok  " } else { "FAIL" };
        write!(f, "{mark} {}: {}", self.name, self.detail)
    }
}

fn pass(name: &str, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        name: name.to_owned(),
        ok: true,
        detail: detail.into(),
    }
}

fn fail(name: &str, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        name: name.to_owned(),
        ok: false,
        detail: detail.into(),
    }
}

/// Runs every check that can run; a check that needs a failed one is left
/// out rather than reported as a second failure.
pub async fn run_checks(settings: &Settings) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let client = match connect_sql(&settings.postgres).await {
        Ok(c) => c,
        Err(e) => {
            out.push(fail(
                "server reachable",
                format!("{e}; check postgres.url, the network and pg_hba.conf"),
            ));
            return out;
        }
    };
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or_else(|_| "?".into());
    out.push(pass(
        "server reachable",
        format!("{} (PostgreSQL {version})", settings.postgres),
    ));

    match client.query_one("SHOW wal_level", &[]).await {
        Ok(row) => {
            let level: String = row.get(0);
            out.push(if level == "logical" {
                pass("wal_level", "logical")
            } else {
                fail(
                    "wal_level",
                    format!("is {level}; run ALTER SYSTEM SET wal_level = logical; and restart Postgres"),
                )
            });
        }
        Err(e) => out.push(fail("wal_level", e.to_string())),
    }

    let user = &settings.postgres.user;
    match client
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        Ok(row) if row.get::<_, bool>(0) => out.push(pass(
            "replication privilege",
            format!("role {user} may replicate"),
        )),
        Ok(_) => out.push(fail(
            "replication privilege",
            format!(
                "role {user} lacks REPLICATION; run ALTER ROLE {} REPLICATION;",
                quote_ident(user)
            ),
        )),
        Err(e) => out.push(fail("replication privilege", e.to_string())),
    }

    match ReplicationConn::connect(&settings.postgres).await {
        Ok(mut conn) => match conn.identify_system().await {
            Ok(sys) => out.push(pass(
                "replication connection",
                format!("system {} at WAL {}", sys.system_id, sys.xlog_pos),
            )),
            Err(e) => out.push(fail("replication connection", e.to_string())),
        },
        Err(e) => out.push(fail(
            "replication connection",
            format!(
                "{e}; pg_hba.conf must let this role connect to database {}",
                settings.postgres.dbname
            ),
        )),
    }

    let catalog_ok = match Catalog::load(&client, &settings.tables).await {
        Ok(_) => {
            out.push(pass(
                "tables and columns",
                format!(
                    "all {} mapped tables and their columns exist",
                    settings.tables.len()
                ),
            ));
            true
        }
        Err(e) => {
            out.push(fail("tables and columns", e.to_string()));
            false
        }
    };

    if catalog_ok {
        for m in &settings.tables {
            let name = format!("read {}", m.table);
            match client
                .query_one(
                    "SELECT has_table_privilege($1, 'SELECT')",
                    &[&m.table.quoted()],
                )
                .await
            {
                Ok(row) if row.get::<_, bool>(0) => out.push(pass(&name, "SELECT granted")),
                Ok(_) => out.push(fail(
                    &name,
                    format!(
                        "role {user} cannot read it; run GRANT SELECT ON {} TO {};",
                        m.table.quoted(),
                        quote_ident(user)
                    ),
                )),
                Err(e) => out.push(fail(&name, e.to_string())),
            }
        }
    }

    let tables = settings.published_tables();
    let publication = &settings.publication;
    match client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
    {
        Ok(Some(_)) => {
            match source::missing_from_publication(&client, publication, &tables).await {
                Ok(missing) if missing.is_empty() => out.push(pass(
                    "publication",
                    format!("{publication} holds every mapped table"),
                )),
                Ok(missing) => out.push(fail(
                    "publication",
                    format!(
                        "{publication} lacks {}; run ALTER PUBLICATION {} ADD TABLE {};",
                        missing
                            .iter()
                            .map(|t| t.to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        quote_ident(publication),
                        missing
                            .iter()
                            .map(|t| t.quoted())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
                Err(e) => out.push(fail("publication", e.to_string())),
            }
        }
        Ok(None) => {
            let can_create = client
                .query_one(
                    "SELECT bool_and(pg_has_role(c.relowner, 'USAGE')) OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                    &[
                        &tables.iter().map(|t| t.schema.clone()).collect::<Vec<_>>(),
                        &tables.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
                    ],
                )
                .await
                .map(|r| r.get::<_, Option<bool>>(0).unwrap_or(false))
                .unwrap_or(false);
            let statement = format!(
                "CREATE PUBLICATION {} FOR TABLE {};",
                quote_ident(publication),
                tables
                    .iter()
                    .map(|t| t.quoted())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            out.push(if can_create {
                pass("publication", format!("{publication} does not exist yet; run will create it"))
            } else {
                fail(
                    "publication",
                    format!("{publication} does not exist and role {user} may not create it; as a table owner run {statement}"),
                )
            });
        }
        Err(e) => out.push(fail("publication", e.to_string())),
    }

    out.push(state_schema(&client, settings).await);

    let slot = &settings.slot;
    match source::slot_info(&client, slot).await {
        Ok(Some(info)) => match source::check_slot(slot, &settings.postgres.dbname, &info) {
            Ok(()) => out.push(pass(
                "replication slot",
                match info.active_pid {
                    Some(pid) => format!("{slot} exists and is in use by process {pid} (another connector?)"),
                    None => format!("{slot} exists and is free"),
                },
            )),
            Err(e) => out.push(fail("replication slot", e.to_string())),
        },
        Ok(None) => match client
            .query_one(
                "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int",
                &[],
            )
            .await
        {
            Ok(row) if row.get::<_, i32>(0) > 0 => out.push(pass(
                "replication slot",
                format!("{slot} does not exist yet; run will create it ({} free)", row.get::<_, i32>(0)),
            )),
            Ok(_) => out.push(fail(
                "replication slot",
                "no free replication slots; raise max_replication_slots or drop an unused slot",
            )),
            Err(e) => out.push(fail("replication slot", e.to_string())),
        },
        Err(e) => out.push(fail("replication slot", e.to_string())),
    }
    out
}

/// The connector's own schema: dead letters and row-grain progress live
/// there. It must exist and be usable by the role, or be creatable.
async fn state_schema(client: &tokio_postgres::Client, settings: &Settings) -> CheckResult {
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
