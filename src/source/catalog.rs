//! Ordinary SQL against the source database (tokio-postgres): what the
//! mapped tables look like, and the publication and slot the connector owns.

use std::collections::HashMap;

use tokio_postgres::{Client, NoTls};

use super::params::ConnParams;
use super::tls::{self, MakeRustls};
use super::SourceError;
use crate::config::{quote_ident, TableMapping, TableName};
use crate::decode::value::ValueKind;
use crate::lsn::Lsn;

/// Opens an SQL session with the same TLS policy as the replication
/// connection. The connection's driver runs on its own task.
pub(crate) async fn connect_sql(params: &ConnParams) -> Result<Client, SourceError> {
    let config = params.sql_config();
    let context = format!("connecting to {params}");
    let client = match tls::client_config(params).map_err(SourceError::config)? {
        None => {
            let (client, conn) = config
                .connect(NoTls)
                .await
                .map_err(|e| SourceError::from_sql(&context, e))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        Some(tls) => {
            let (client, conn) = config
                .connect(MakeRustls(tls))
                .await
                .map_err(|e| SourceError::from_sql(&context, e))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
    };
    Ok(client)
}

/// What the catalog says about the mapped tables' column types.
#[derive(Debug, Clone, Default)]
pub(crate) struct Catalog {
    /// How each column type's values become JSON, by type OID, including
    /// domains, enums and arrays that are not built in.
    pub kinds: HashMap<u32, ValueKind>,
}

impl Catalog {
    /// Looks up every mapped table and column. Errors name the config key
    /// of the first table or column that does not exist.
    pub(crate) async fn load(
        client: &Client,
        mappings: &[TableMapping],
    ) -> Result<Catalog, SourceError> {
        let mut catalog = Catalog::default();
        for m in mappings {
            let rows = client
                .query(
                    "SELECT a.attname, a.atttypid::int8
                       FROM pg_class c
                       JOIN pg_namespace n ON n.oid = c.relnamespace
                       LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                      WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                    &[&m.table.schema, &m.table.name],
                )
                .await
                .map_err(|e| SourceError::from_sql(&format!("looking up {}", m.table), e))?;
            if rows.is_empty() {
                return Err(SourceError::config(format!(
                    "{}.table: table {} does not exist (or this role cannot see it)",
                    m.key, m.table
                )));
            }
            let columns: HashMap<String, u32> = rows
                .iter()
                .filter_map(|row| {
                    Some((
                        row.get::<_, Option<String>>(0)?,
                        row.get::<_, i64>(1) as u32,
                    ))
                })
                .collect();
            for (key, column) in m.columns() {
                if !columns.contains_key(column) {
                    return Err(SourceError::config(format!(
                        "{key}: column `{column}` does not exist in table {}",
                        m.table
                    )));
                }
            }
            for type_oid in columns.values() {
                catalog.resolve_kind(client, *type_oid).await?;
            }
        }
        Ok(catalog)
    }

    /// The JSON conversion for a type: built-ins directly, domains by their
    /// base type, arrays by their element, enums and the rest as text.
    async fn resolve_kind(&mut self, client: &Client, oid: u32) -> Result<ValueKind, SourceError> {
        if let Some(kind) = self.kinds.get(&oid) {
            return Ok(kind.clone());
        }
        let kind = match ValueKind::from_builtin_oid(oid) {
            Some(kind) => kind,
            None => {
                let row = client
                    .query_opt(
                        "SELECT typtype::text, typbasetype::int8, typelem::int8, typcategory::text, typndims
                           FROM pg_type WHERE oid = $1::int8::oid",
                        &[&i64::from(oid)],
                    )
                    .await
                    .map_err(|e| SourceError::from_sql("looking up a column type", e))?;
                match row {
                    None => ValueKind::Text,
                    Some(row) => {
                        let typtype: String = row.get(0);
                        let base = row.get::<_, i64>(1) as u32;
                        let elem = row.get::<_, i64>(2) as u32;
                        let category: String = row.get(3);
                        if typtype == "d" && base != 0 {
                            Box::pin(self.resolve_kind(client, base)).await?
                        } else if category == "A" && elem != 0 {
                            ValueKind::Array(Box::new(
                                Box::pin(self.resolve_kind(client, elem)).await?,
                            ))
                        } else {
                            ValueKind::Text
                        }
                    }
                }
            }
        };
        self.kinds.insert(oid, kind.clone());
        Ok(kind)
    }
}

/// What [`ensure_publication`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PublicationState {
    Created,
    Ready,
}

/// Makes sure the publication exists and holds every mapped table: creates
/// it when missing; refuses (with the statement to run) when it exists but
/// lacks a table, since changing a publication others may use is the
/// operator's call.
pub(crate) async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[&TableName],
) -> Result<PublicationState, SourceError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| SourceError::from_sql("looking up the publication", e))?
        .is_some();
    if !exists {
        let list: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote_ident(publication),
            list.join(", ")
        );
        match client.batch_execute(&sql).await {
            Ok(()) => return Ok(PublicationState::Created),
            // Another connector created it just now: check it like any other.
            Err(e) if SourceError::already_exists(&e) => {}
            Err(e) => {
                return Err(SourceError::from_sql(
                    &format!(
                    "creating publication {publication} (run as a table owner or superuser: {sql})"
                ),
                    e,
                ))
            }
        }
    }
    let missing = missing_from_publication(client, publication, tables).await?;
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|t| t.quoted()).collect();
        return Err(SourceError::config(format!(
            "postgres.publication: publication {publication} lacks {}; run: ALTER PUBLICATION {} ADD TABLE {}",
            missing.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "),
            quote_ident(publication),
            list.join(", ")
        )));
    }
    Ok(PublicationState::Ready)
}

/// The mapped tables the publication does not hold.
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

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub(crate) struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub wal_status: Option<String>,
}

pub(crate) async fn slot_info(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotInfo>, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active_pid, wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::from_sql("looking up the replication slot", e))?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active_pid: r.get(2),
        wal_status: r.get(3),
    }))
}

/// Makes sure the slot exists, is a pgoutput slot of this database, and has
/// not been invalidated. Creates it when missing; returns whether it did.
pub(crate) async fn ensure_slot(
    client: &Client,
    slot: &str,
    dbname: &str,
) -> Result<bool, SourceError> {
    if slot_info(client, slot).await?.is_none() {
        let created = client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await;
        match created {
            Ok(_) => return Ok(true),
            // Another connector created it just now: check it below.
            Err(e) if SourceError::already_exists(&e) => {}
            Err(e) => {
                return Err(SourceError::from_sql(
                    &format!("creating replication slot {slot}"),
                    e,
                ))
            }
        }
    }
    let info = slot_info(client, slot)
        .await?
        .ok_or_else(|| SourceError::transient(format!("slot {slot} vanished while starting")))?;
    check_slot(slot, dbname, &info)?;
    Ok(false)
}

/// Refuses a slot the connector cannot use.
pub(crate) fn check_slot(slot: &str, dbname: &str, info: &SlotInfo) -> Result<(), SourceError> {
    if info.plugin.as_deref() != Some("pgoutput") {
        return Err(SourceError::config(format!(
            "postgres.slot: slot {slot} uses plugin {:?}, not pgoutput; pick another slot name or drop it",
            info.plugin.as_deref().unwrap_or("none (a physical slot)")
        )));
    }
    if info.database.as_deref() != Some(dbname) {
        return Err(SourceError::config(format!(
            "postgres.slot: slot {slot} belongs to database {:?}, not {dbname}; pick another slot name",
            info.database.as_deref().unwrap_or("?")
        )));
    }
    if info.wal_status.as_deref() == Some("lost") {
        return Err(SourceError::config(format!(
            "postgres.slot: slot {slot} has been invalidated (wal_status = lost): the WAL it needed is gone. Drop it with SELECT pg_drop_replication_slot('{slot}'), then start again; changes made since are not in the stream"
        )));
    }
    Ok(())
}

/// The slot's confirmed position; status updates never report less.
pub(crate) async fn slot_confirmed(client: &Client, slot: &str) -> Result<Lsn, SourceError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::from_sql("reading the slot's position", e))?
        .ok_or_else(|| SourceError::config(format!("postgres.slot: slot {slot} disappeared")))?;
    let text: Option<String> = row.get(0);
    Ok(text.and_then(|t| t.parse().ok()).unwrap_or_default())
}
