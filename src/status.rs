//! `conveyour-cdc status`: where the connector stands, read from the
//! database (the slot, the publication, the connector's own schema), so it
//! works whether or not a connector is running.

use std::fmt::Write as _;

use serde::Serialize;

use crate::config::{Settings, TableName};
use crate::source::{self, connect_sql};
use crate::state::SCHEMA;
use crate::Error;

#[derive(Debug, Serialize)]
pub struct Status {
    pub slot: SlotStatus,
    pub publication: PublicationStatus,
    /// `<publication>_inserts` (publish = 'insert'), which carries
    /// insert-only tables without a usable replica identity; None when it
    /// does not exist.
    pub insert_publication: Option<PublicationStatus>,
    /// Rows in the dead-letter table, when the connector's schema has one.
    pub dead_letters: Option<i64>,
    /// Each copied table's sync state, when the connector's schema holds
    /// one.
    pub sync: Option<Vec<SyncTable>>,
    /// Whether a standby carries the slot; None when it could not be read.
    pub failover: Option<FailoverStatus>,
}

/// The slot's failover flag and each standby's copy of the slot (standbys
/// are read only through a multi-host `postgres.url`).
#[derive(Debug, Serialize)]
pub struct FailoverStatus {
    /// False before PostgreSQL 17, which has no failover slots.
    pub supported: bool,
    /// The slot's `failover` flag; None without the slot or before 17.
    pub slot_failover: Option<bool>,
    pub standbys: Vec<StandbyCopy>,
}

/// One standby's copy of the slot.
#[derive(Debug, Serialize)]
pub struct StandbyCopy {
    /// `host:port` from `postgres.url`.
    pub host: String,
    /// `ready` (synchronized and permanent: survives a promotion),
    /// `temporary` (dropped at promotion until sync-ready), `missing`, or
    /// `unreadable`.
    pub copy: String,
    pub confirmed_flush_lsn: Option<String>,
    /// Why it could not be read.
    pub error: Option<String>,
}

async fn failover_status(
    client: &tokio_postgres::Client,
    settings: &Settings,
) -> Option<FailoverStatus> {
    let version = source::server_version_num(client).await.ok()?;
    let slot_failover = source::slot_failover(client, &settings.slot, version)
        .await
        .ok()?;
    let mut standbys = Vec::new();
    for (host, read) in source::standbys(&settings.postgres, &settings.slot).await {
        let (copy, confirmed_flush_lsn, error) = match read {
            Ok(None) => continue,
            Ok(Some(s)) => match s.slot {
                Some(c) if c.ready() => ("ready", c.confirmed_flush_lsn, None),
                Some(c) if c.synced => ("temporary", c.confirmed_flush_lsn, None),
                _ => ("missing", None, None),
            },
            Err(e) => ("unreadable", None, Some(e.to_string())),
        };
        standbys.push(StandbyCopy {
            host,
            copy: copy.to_owned(),
            confirmed_flush_lsn,
            error,
        });
    }
    Some(FailoverStatus {
        supported: version >= source::FAILOVER_SLOTS_SINCE,
        slot_failover,
        standbys,
    })
}

/// One table's initial sync or resync.
#[derive(Debug, Serialize)]
pub struct SyncTable {
    pub table: String,
    /// `pending`, `copying` or `done`.
    pub status: String,
    pub rows_copied: i64,
    /// Rows in the table when its copy started.
    pub rows_total: Option<i64>,
    pub finished_at: Option<String>,
    /// False for a table recorded under an earlier config that the
    /// current one no longer maps: its record stays in the connector's
    /// schema, but its figures say nothing about this config.
    pub in_config: bool,
}

#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub exists: bool,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub plugin: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    /// Server WAL position minus the confirmed position.
    pub lag_bytes: Option<i64>,
    /// WAL the server keeps for the slot.
    pub retained_wal_bytes: Option<i64>,
    pub wal_status: Option<String>,
    /// Why the server invalidated the slot: `invalidation_reason` (17+),
    /// else inferred from `wal_status` (see `source::Invalidation`).
    /// None while it is valid.
    pub invalidation_reason: Option<String>,
    /// For an invalidated slot: what happened, how to recover, and how to
    /// keep it from happening again.
    pub invalidation_hint: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PublicationStatus {
    pub name: String,
    pub exists: bool,
    pub tables: Vec<String>,
    /// Mapped tables neither publication holds.
    pub missing: Vec<String>,
}

/// Reads the status from the database.
pub async fn read(settings: &Settings) -> Result<Status, Error> {
    let client = connect_sql(&settings.postgres).await?;
    let sql_err = |what: &str| {
        let what = what.to_owned();
        move |e| Error::Source(source::SourceError::from_sql(&what, e))
    };
    let slot = match source::slot_state(&client, &settings.slot).await? {
        Some(r) => SlotStatus {
            name: settings.slot.clone(),
            exists: true,
            active: r.active,
            active_pid: r.active_pid,
            plugin: r.plugin,
            confirmed_flush_lsn: r.confirmed_flush_lsn,
            lag_bytes: r.lag_bytes,
            retained_wal_bytes: r.retained_wal_bytes,
            wal_status: r.wal_status,
            invalidation_reason: None,
            invalidation_hint: None,
        },
        None => SlotStatus {
            name: settings.slot.clone(),
            exists: false,
            active: false,
            active_pid: None,
            plugin: None,
            confirmed_flush_lsn: None,
            lag_bytes: None,
            retained_wal_bytes: None,
            wal_status: None,
            invalidation_reason: None,
            invalidation_hint: None,
        },
    };
    let mut slot = slot;
    // Read apart from the row above: its columns differ by version.
    if let Some((why, reported)) = source::slot_invalidation(&client, &settings.slot).await? {
        slot.invalidation_reason = Some(reported.unwrap_or_else(|| why.reason().to_owned()));
        slot.invalidation_hint = Some(format!(
            "{}; then {}",
            why.recovery(&settings.slot),
            why.prevention()
        ));
    }

    let read_publication = |name: String| {
        let client = &client;
        async move {
            let exists = source::publication_exists(client, &name).await?;
            let tables = source::published_table_names(client, &name).await?;
            Ok::<_, Error>(PublicationStatus {
                name,
                exists,
                tables,
                missing: Vec::new(),
            })
        }
    };
    let mut publication = read_publication(settings.publication.clone()).await?;
    let insert_publication =
        Some(read_publication(source::insert_publication(&settings.publication)).await?)
            .filter(|p| p.exists);
    let mapped: Vec<&TableName> = settings.tables.iter().map(|t| &t.table).collect();
    publication.missing = mapped
        .iter()
        .map(|t| t.to_string())
        .filter(|t| {
            !publication.tables.contains(t)
                && !insert_publication
                    .as_ref()
                    .is_some_and(|p| p.tables.contains(t))
        })
        .collect();

    let count = |table: &'static str| {
        let client = &client;
        async move {
            let exists = client
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL",
                    &[&format!("{SCHEMA}.{table}")],
                )
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false);
            if !exists {
                return None;
            }
            client
                .query_one(
                    &format!("SELECT count(*) FROM {SCHEMA}.{table} WHERE slot = $1"),
                    &[&settings.slot],
                )
                .await
                .ok()
                .map(|r| r.get::<_, i64>(0))
        }
    };
    let failover = failover_status(&client, settings).await;
    Ok(Status {
        failover,
        slot,
        publication,
        insert_publication,
        dead_letters: count("dead_letters").await,
        sync: match count("snapshot_progress").await {
            None => None,
            Some(_) => Some(
                client
                    .query(
                        &format!(
                            "SELECT source_table, status, rows_copied, rows_total, finished_at::text
                               FROM {SCHEMA}.snapshot_progress WHERE slot = $1 ORDER BY source_table"
                        ),
                        &[&settings.slot],
                    )
                    .await
                    .map_err(sql_err("reading the sync state"))?
                    .iter()
                    .map(|r| SyncTable {
                        table: r.get(0),
                        status: r.get(1),
                        rows_copied: r.get(2),
                        rows_total: r.get(3),
                        finished_at: r.get(4),
                        in_config: mapped.iter().any(|t| t.to_string() == r.get::<_, String>(0)),
                    })
                    .collect(),
            ),
        },
    })
}

impl Status {
    /// The human-readable report.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let s = &self.slot;
        if s.exists {
            let _ = writeln!(
                out,
                "slot {}: {}{}, plugin {}, wal_status {}",
                s.name,
                if s.active { "active" } else { "inactive" },
                s.active_pid
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default(),
                s.plugin.as_deref().unwrap_or("?"),
                s.wal_status.as_deref().unwrap_or("?"),
            );
            let _ = writeln!(
                out,
                "  confirmed {}, lag {} bytes, retained WAL {} bytes",
                s.confirmed_flush_lsn.as_deref().unwrap_or("none"),
                s.lag_bytes
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "?".into()),
                s.retained_wal_bytes
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "?".into()),
            );
            if let (Some(reason), Some(hint)) = (&s.invalidation_reason, &s.invalidation_hint) {
                let _ = writeln!(out, "  INVALIDATED ({reason}): {hint}");
            }
        } else {
            let _ = writeln!(out, "slot {}: does not exist (run creates it)", s.name);
        }
        if let Some(f) = &self.failover {
            let _ = writeln!(
                out,
                "  failover: {}",
                match (f.supported, f.slot_failover) {
                    (false, _) => "none before PostgreSQL 17: a failover loses the slot",
                    (true, Some(true)) =>
                        "a failover slot, synchronized to standbys with slot sync on",
                    (true, Some(false)) => "not a failover slot: a failover loses it",
                    (true, None) =>
                        "run creates a failover slot (unless postgres.failover_slot is false)",
                }
            );
            for sb in &f.standbys {
                let _ = writeln!(
                    out,
                    "  standby {}: {}",
                    sb.host,
                    match sb.copy.as_str() {
                        "ready" => format!(
                            "copy ready (survives promotion), confirmed {}",
                            sb.confirmed_flush_lsn.as_deref().unwrap_or("?")
                        ),
                        "temporary" =>
                            "copy still temporary: dropped at promotion until sync-ready".to_owned(),
                        "missing" => "no copy of the slot".to_owned(),
                        _ => format!("unreadable: {}", sb.error.as_deref().unwrap_or("?")),
                    }
                );
            }
        }
        let p = &self.publication;
        if p.exists {
            let _ = writeln!(out, "publication {}: {}", p.name, p.tables.join(", "));
            if !p.missing.is_empty() {
                let _ = writeln!(out, "  lacks mapped tables: {}", p.missing.join(", "));
            }
        } else {
            let _ = writeln!(
                out,
                "publication {}: does not exist (run creates it)",
                p.name
            );
        }
        if let Some(p) = &self.insert_publication {
            let _ = writeln!(
                out,
                "publication {} (inserts only): {}",
                p.name,
                if p.tables.is_empty() {
                    "no tables".to_owned()
                } else {
                    p.tables.join(", ")
                }
            );
        }
        let _ = writeln!(
            out,
            "dead letters: {}",
            self.dead_letters
                .map(|n| n.to_string())
                .unwrap_or_else(|| "none recorded".into())
        );
        match self.sync.as_deref() {
            None | Some([]) => {
                let _ = writeln!(out, "initial sync: nothing recorded");
            }
            Some(tables) => {
                let _ = writeln!(out, "initial sync:");
                for t in tables {
                    if !t.in_config {
                        let _ = writeln!(
                            out,
                            "  {}: not in the config (recorded earlier: {})",
                            t.table, t.status
                        );
                        continue;
                    }
                    let _ = writeln!(
                        out,
                        "  {}: {}, {} of {} rows{}",
                        t.table,
                        t.status,
                        t.rows_copied,
                        t.rows_total
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "?".into()),
                        t.finished_at
                            .as_deref()
                            .map(|at| format!(", finished {at}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        out
    }
}
