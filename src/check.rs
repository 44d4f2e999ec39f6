//! Preflight: everything `run` needs from the database, checked one by one,
//! each with the fix when it fails; [`conveyour_checks`] does the same for
//! ConveYour.

use crate::config::Settings;
use crate::source::{self, connect_sql, Catalog, ReplicationConn};
use crate::sql::quote_ident;

mod conveyour;
mod failover;
mod generated;
mod idle_timeout;
mod objects;
mod result;

pub use conveyour::conveyour_checks;
use objects::{mapped_tables, publications, state_schema};
use result::{fail, pass};
pub use result::{CheckResult, Mark};

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

    let schema = match Catalog::load(&client, &settings.tables).await {
        Ok(schema) => {
            out.push(pass(
                "tables and columns",
                format!(
                    "all {} mapped tables and their columns exist",
                    settings.tables.len()
                ),
            ));
            Some(schema)
        }
        Err(e) => {
            out.push(fail("tables and columns", e.to_string()));
            None
        }
    };

    // Where each table goes, as `run` decides it; it needs the tables.
    let plan = match &schema {
        Some(_) => Some(source::plan(&client, settings).await),
        None => None,
    };
    if let (Some(schema), Some(plan)) = (&schema, &plan) {
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
        out.extend(mapped_tables(&client, settings, schema, plan.as_ref()).await);
        out.extend(publications(&client, settings, plan.as_ref()).await);
        if let Ok(plan) = plan {
            out.extend(generated::generated(&client, settings, plan).await);
        }
    }

    out.push(state_schema(&client, settings).await);

    let slot = &settings.slot;
    match source::slot_info(&client, slot).await {
        Ok(Some(info)) => match source::check_slot(slot, &settings.postgres.dbname, &info) {
            Ok(()) => out.push(pass(
                "replication slot",
                match info.active_pid {
                    Some(pid) => {
                        format!("{slot} exists and is in use by process {pid} (another connector?)")
                    }
                    None => format!("{slot} exists and is free"),
                },
            )),
            Err(e) => out.push(fail("replication slot", slot_problem(&e))),
        },
        Ok(None) => match source::free_slots(&client).await {
            Ok(free) if free > 0 => out.push(pass(
                "replication slot",
                format!("{slot} does not exist yet; run will create it ({free} free)"),
            )),
            Ok(_) => out.push(fail(
                "replication slot",
                "no free replication slots; raise max_replication_slots or drop an unused slot",
            )),
            Err(e) => out.push(fail("replication slot", e.to_string())),
        },
        Err(e) => out.push(fail("replication slot", e.to_string())),
    }
    out.extend(idle_timeout::idle_timeout(&client).await);
    out.extend(failover::failover_checks(&client, settings).await);
    out
}

/// What is wrong with the slot; for an invalidated one, also how to keep
/// it from happening again (the hint `run` prints).
fn slot_problem(e: &source::SourceError) -> String {
    match e.kind() {
        source::SourceErrorKind::SlotInvalidated(why) => format!("{e}; then {}", why.prevention()),
        _ => e.to_string(),
    }
}
