//! Failover slots (PostgreSQL 17+): whether the slot is one, and what the
//! primary and each standby of a multi-host URL say about carrying it
//! across a promotion. `check` judges these facts; `status` shows them.

use tokio_postgres::Client;

use super::catalog::connect_sql_host;
use super::slot::{self, SyncedSlot, FAILOVER_SLOTS_SINCE};
use super::SourceError;
use crate::config::{ConnParams, TargetSessionAttrs};

/// Whether the slot should be a failover slot: `postgres.failover_slot`,
/// by default yes on a server that has them.
pub(crate) fn failover_wanted(setting: Option<bool>, server_version: i32) -> bool {
    server_version >= FAILOVER_SLOTS_SINCE && setting.unwrap_or(true)
}

/// What the primary knows about failover.
#[derive(Debug, Clone)]
pub(crate) struct PrimaryFailover {
    /// The slot's `failover` flag; None before 17 or without the slot.
    pub slot_failover: Option<bool>,
    /// `synchronized_standby_slots`' physical slots (17+; empty when unset).
    pub standby_slots: Vec<StandbySlot>,
    /// The physical slots a standby streams through now.
    pub physical_slots: Vec<String>,
}

/// A physical slot named in `synchronized_standby_slots`.
#[derive(Debug, Clone)]
pub(crate) struct StandbySlot {
    pub name: String,
    pub exists: bool,
    /// A standby streams through it now.
    pub active: bool,
}

impl PrimaryFailover {
    /// Reads it from a session on the primary.
    pub(crate) async fn read(
        client: &Client,
        slot: &str,
        server_version: i32,
    ) -> Result<PrimaryFailover, SourceError> {
        let sql_err = |what: &'static str| move |e| SourceError::from_sql(what, e);
        // Slot sync needs the standby on a physical slot (primary_slot_name),
        // and pg_replication_slots is readable by any role, unlike the
        // details of pg_stat_replication.
        let physical_slots = slot::active_physical_slots(client).await?;
        let mut standby_slots = Vec::new();
        if server_version >= FAILOVER_SLOTS_SINCE {
            let names: String = client
                .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
                .await
                .map_err(sql_err("reading synchronized_standby_slots"))?
                .get(0);
            for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let name = name.trim_matches('"').to_owned();
                let active = slot::physical_slot_active(client, &name).await?;
                standby_slots.push(StandbySlot {
                    name,
                    exists: active.is_some(),
                    active: active.unwrap_or(false),
                });
            }
        }
        Ok(PrimaryFailover {
            slot_failover: slot::slot_failover(client, slot, server_version).await?,
            standby_slots,
            physical_slots,
        })
    }
}

/// A standby of a multi-host URL: its slot sync settings and its copy of
/// the slot.
#[derive(Debug, Clone)]
pub(crate) struct StandbyFailover {
    pub sync_replication_slots: bool,
    pub hot_standby_feedback: bool,
    /// Empty when unset.
    pub primary_slot_name: String,
    /// Whether `primary_conninfo` names a database, as slot sync needs;
    /// None when this role may not read it (it needs pg_read_all_settings).
    pub conninfo_has_dbname: Option<bool>,
    /// The standby's copy of the slot; None when it has none.
    pub slot: Option<SyncedSlot>,
}

/// Each host of a multi-host URL: `Ok(Some(..))` for a standby (a server in
/// recovery), `Ok(None)` for the primary, `Err` when it could not be read.
/// Empty for a single-host URL: the primary cannot see its standbys'
/// settings.
pub(crate) async fn standbys(
    params: &ConnParams,
    slot: &str,
) -> Vec<(String, Result<Option<StandbyFailover>, SourceError>)> {
    if !params.is_multi_host() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for mut one in params.each_host() {
        one.target_session_attrs = TargetSessionAttrs::Any;
        let read = async {
            let client = connect_sql_host(&one).await?;
            read_standby(&client, slot).await
        };
        out.push((one.address(), read.await));
    }
    out
}

async fn read_standby(client: &Client, slot: &str) -> Result<Option<StandbyFailover>, SourceError> {
    let sql_err = |what: &'static str| move |e| SourceError::from_sql(what, e);
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int",
            &[],
        )
        .await
        .map_err(sql_err("asking whether the server is a standby"))?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    if row.get::<_, i32>(1) < FAILOVER_SLOTS_SINCE {
        return Ok(Some(StandbyFailover {
            sync_replication_slots: false,
            hot_standby_feedback: false,
            primary_slot_name: String::new(),
            conninfo_has_dbname: None,
            slot: None,
        }));
    }
    let settings = client
        .query_one(
            "SELECT current_setting('sync_replication_slots')::bool,
                    current_setting('hot_standby_feedback')::bool,
                    current_setting('primary_slot_name')",
            &[],
        )
        .await
        .map_err(sql_err("reading the standby's slot sync settings"))?;
    // primary_conninfo is readable by superusers and pg_read_all_settings.
    let conninfo_has_dbname = match client
        .query_one("SELECT current_setting('primary_conninfo')", &[])
        .await
    {
        Ok(row) => Some(conninfo_names_dbname(&row.get::<_, String>(0))),
        Err(_) => None,
    };
    let copy = slot::synced_copy(client, slot).await?;
    Ok(Some(StandbyFailover {
        sync_replication_slots: settings.get(0),
        hot_standby_feedback: settings.get(1),
        primary_slot_name: settings.get(2),
        conninfo_has_dbname,
        slot: copy,
    }))
}

/// Whether a libpq connection string (`key=value …` or a URL) names a
/// database.
fn conninfo_names_dbname(conninfo: &str) -> bool {
    if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        let rest = conninfo.split_once("://").map(|(_, r)| r).unwrap_or("");
        let path = rest.split_once('/').map(|(_, p)| p).unwrap_or("");
        let db = path.split(['?', '#']).next().unwrap_or("");
        return !db.is_empty() || conninfo.contains("dbname=");
    }
    conninfo
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .any(|(k, v)| k == "dbname" && !v.trim_matches('\'').is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_slots_are_the_default_from_17() {
        assert!(!failover_wanted(None, 160_004));
        assert!(!failover_wanted(Some(true), 160_004));
        assert!(failover_wanted(None, 170_000));
        assert!(failover_wanted(Some(true), 180_001));
        assert!(!failover_wanted(Some(false), 180_001));
    }

    #[test]
    fn finds_the_dbname_in_a_conninfo() {
        assert!(conninfo_names_dbname(
            "user=postgres host=10.0.0.1 port=5432 dbname=app"
        ));
        assert!(!conninfo_names_dbname("user=postgres host=10.0.0.1"));
        assert!(!conninfo_names_dbname("user=postgres dbname=''"));
        assert!(conninfo_names_dbname("postgres://rep@db1:5432/app"));
        assert!(!conninfo_names_dbname("postgres://rep@db1:5432"));
    }
}
