//! Ordinary SQL against the source database (tokio-postgres): what the
//! mapped tables look like, and the slot the connector owns.

use std::collections::HashMap;

use tokio_postgres::{Client, NoTls};

use super::session::READ_ONLY_PROBE;
use super::tls::{self, MakeRustls};
use super::SourceError;
use super::{LookupTarget, Schema};
use crate::config::{ColumnRole, ContactSource, Lookup, TableMapping, TableName};
use crate::config::{ConnParams, TargetSessionAttrs};
use crate::decode::value::ValueKind;

/// Opens an SQL session with the same TLS policy as the replication
/// connection, to the first host of the URL that accepts it (and, with
/// `target_session_attrs=read-write`, accepts writes: the primary). The
/// connection's driver runs on its own task.
pub(crate) async fn connect_sql(params: &ConnParams) -> Result<Client, SourceError> {
    let mut failures = Vec::new();
    for one in params.each_host() {
        match connect_sql_host(&one).await {
            Ok(client) if params.target_session_attrs == TargetSessionAttrs::Any => {
                return Ok(client)
            }
            Ok(client) => match read_only(&client).await {
                Ok(None) => return Ok(client),
                Ok(Some(in_recovery)) => failures.push(SourceError::read_only(&one, in_recovery)),
                Err(e) => failures.push(e),
            },
            Err(e) => failures.push(e),
        }
    }
    Err(SourceError::no_host(params, failures))
}

/// None when the session may write; else whether the server is in
/// recovery (a standby).
async fn read_only(client: &Client) -> Result<Option<bool>, SourceError> {
    let row = client
        .query_one(READ_ONLY_PROBE, &[])
        .await
        .map_err(|e| SourceError::from_sql("asking whether the server accepts writes", e))?;
    Ok(row.get::<_, bool>(0).then(|| row.get(1)))
}

/// Whether the server is a standby (in recovery).
pub(crate) async fn in_recovery(client: &Client) -> Result<bool, SourceError> {
    let row = client
        .query_one(READ_ONLY_PROBE, &[])
        .await
        .map_err(|e| SourceError::from_sql("asking whether the server is a standby", e))?;
    Ok(row.get(1))
}

/// Opens an SQL session with the one host `params` names first.
pub(super) async fn connect_sql_host(params: &ConnParams) -> Result<Client, SourceError> {
    let config = super::session::sql_config(params);
    let client = match tls::client_config(params).map_err(SourceError::config)? {
        None => {
            let (client, conn) = config
                .connect(NoTls)
                .await
                .map_err(|e| SourceError::from_connect(params, e))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        Some(tls) => {
            let (client, conn) = config
                .connect(MakeRustls(tls))
                .await
                .map_err(|e| SourceError::from_connect(params, e))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
    };
    Ok(client)
}

/// A table's primary key: each column's name and SQL type, in key order
/// (empty when it has none).
pub(crate) async fn primary_key(
    client: &Client,
    table: &TableName,
) -> Result<Vec<(String, String)>, SourceError> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
               FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = $1::text::regclass AND i.indisprimary
              ORDER BY k.ord",
            &[&table.quoted()],
        )
        .await
        .map_err(|e| SourceError::from_sql(&format!("looking up {table}'s primary key"), e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Resolves column types to JSON conversions, caching by type OID.
#[derive(Debug, Clone, Default)]
pub(crate) struct Catalog {
    /// How each column type's values become JSON, by type OID, including
    /// domains, enums and arrays that are not built in.
    kinds: HashMap<u32, ValueKind>,
}

/// One column as the catalog describes it.
struct ColumnInfo {
    oid: u32,
    /// `pg_type.typtype` of the column's base type (`c` composite, `p` pseudo …).
    typtype: String,
    /// SQL spelling of the type, e.g. `bigint`.
    type_name: String,
}

/// Bytes ConveYour could do nothing with, and row values it would read as
/// list operations: no JSON form is offered for these.
const BYTEA: u32 = 17;

impl Catalog {
    /// Looks up every mapped table, column and lookup target, and checks
    /// each column's type fits its use. Errors name the config key, the
    /// table and the column.
    pub(crate) async fn load(
        client: &Client,
        mappings: &[TableMapping],
    ) -> Result<Schema, SourceError> {
        let mut catalog = Catalog::default();
        let mut schema = Schema::default();
        for m in mappings {
            let columns = table_columns(client, &m.table, &format!("{}.table", m.key)).await?;
            for usage in m.columns() {
                let Some(info) = columns.get(&usage.column) else {
                    return Err(SourceError::config(format!(
                        "{}: column `{}` does not exist in table {}",
                        usage.key, usage.column, m.table
                    )));
                };
                let kind = catalog.resolve_kind(client, info.oid).await?;
                if let Some(problem) = unfit(&kind, info, usage.role) {
                    return Err(SourceError::config(format!(
                        "{}: column `{}` of table {} is of type {}: {problem}",
                        usage.key, usage.column, m.table, info.type_name
                    )));
                }
            }
            schema.columns.insert(
                m.table.clone(),
                columns.iter().map(|(n, c)| (n.clone(), c.oid)).collect(),
            );
            let key: Vec<String> = primary_key(client, &m.table)
                .await?
                .into_iter()
                .map(|(name, _)| name)
                .collect();
            if !key.is_empty() {
                schema.keys.insert(m.table.clone(), key);
            }
            if let ContactSource::Lookup(l) = &m.contact {
                let key = format!("{}.{}.id", m.key, m.section());
                if schema.lookup_index(l).is_some() {
                    continue;
                }
                let target = lookup_target(client, l, &key).await?;
                let from_columns = table_columns(client, &l.from, &format!("{key}.from")).await?;
                schema.columns.entry(l.from.clone()).or_default().extend(
                    [&target.references, &target.column]
                        .into_iter()
                        .filter_map(|c| Some((c.clone(), from_columns.get(c)?.oid))),
                );
                schema.lookups.push(target);
            }
        }
        // After the checks above, so a missing column is named as such.
        super::generated::refuse_unpublishable(
            super::server_version_num(client).await?,
            &super::generated_columns(client, mappings).await?,
        )?;
        schema.kinds = catalog.kinds;
        Ok(schema)
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

/// Why a column of this kind cannot serve this use, if it cannot.
fn unfit(kind: &ValueKind, info: &ColumnInfo, role: ColumnRole) -> Option<String> {
    if info.oid == BYTEA || info.typtype == "c" || info.typtype == "p" {
        return Some(
            "it has no JSON form ConveYour can use; map a text, number, date or array column, or a view's cast of it".into(),
        );
    }
    match (role, kind) {
        (ColumnRole::Value, _) => None,
        (ColumnRole::Text, ValueKind::Array(_) | ValueKind::Json) => {
            Some("an id or event name must be a single value, not an array or JSON".into())
        }
        (ColumnRole::Text, _) => None,
        (ColumnRole::List { delimited: false }, ValueKind::Array(_)) => None,
        (ColumnRole::List { delimited: false }, _) => Some(
            "a list trait needs an array column (text[]), or a delimiter for a text column".into(),
        ),
        (ColumnRole::List { delimited: true }, ValueKind::Text) => None,
        (ColumnRole::List { delimited: true }, _) => {
            Some("a delimited list needs a text column".into())
        }
        (ColumnRole::Number, ValueKind::Int | ValueKind::Float | ValueKind::Numeric) => None,
        (ColumnRole::Number, _) => Some("a $inc amount needs a numeric column".into()),
    }
}

/// A table's live columns by name; an error naming `key` when the table
/// does not exist or cannot be seen.
async fn table_columns(
    client: &Client,
    table: &TableName,
    key: &str,
) -> Result<HashMap<String, ColumnInfo>, SourceError> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8, t.typtype::text, format_type(a.atttypid, a.atttypmod),
                    COALESCE(bt.typtype::text, t.typtype::text)
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               LEFT JOIN pg_type t ON t.oid = a.atttypid
               LEFT JOIN pg_type bt ON bt.oid = t.typbasetype AND t.typtype = 'd'
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| SourceError::from_sql(&format!("looking up {table}"), e))?;
    if rows.is_empty() {
        let suggestion = match close_table(client, table).await {
            Some(close) => format!("; did you mean {close}?"),
            None => String::new(),
        };
        return Err(SourceError::config(format!(
            "{key}: table {table} does not exist (or this role cannot see it){suggestion}"
        )));
    }
    Ok(rows
        .iter()
        .filter_map(|row| {
            Some((
                row.get::<_, Option<String>>(0)?,
                ColumnInfo {
                    oid: row.get::<_, Option<i64>>(1)? as u32,
                    typtype: row.get::<_, Option<String>>(4).unwrap_or_default(),
                    type_name: row.get::<_, Option<String>>(3).unwrap_or_default(),
                },
            ))
        })
        .collect())
}

/// The table whose `schema.name` is nearest to `table`'s, when one is
/// near enough to be a likely misspelling (at most a third of the name's
/// characters differ, and no more than three). None when the catalog
/// cannot be read.
async fn close_table(client: &Client, table: &TableName) -> Option<String> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p')
                AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                AND n.nspname !~ '^pg_'",
            &[],
        )
        .await
        .ok()?;
    let wanted = table.to_string();
    let limit = (wanted.chars().count() / 3).clamp(1, 3);
    rows.iter()
        .map(|r| format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1)))
        .map(|name| (edit_distance(&wanted, &name), name))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, name)| name)
}

/// Levenshtein distance: single-character insertions, deletions and
/// substitutions to turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Resolves a configured lookup against the catalog: the referenced column
/// defaults to the related table's single-column primary key.
async fn lookup_target(
    client: &Client,
    l: &Lookup,
    key: &str,
) -> Result<LookupTarget, SourceError> {
    let columns = table_columns(client, &l.from, &format!("{key}.from")).await?;
    let references = match &l.references {
        Some(r) => r.clone(),
        None => {
            let rows = client
                .query(
                    "SELECT a.attname::text
                       FROM pg_index i
                       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                      WHERE i.indrelid = $1::text::regclass AND i.indisprimary",
                    &[&l.from.quoted()],
                )
                .await
                .map_err(|e| {
                    SourceError::from_sql(&format!("looking up {}'s primary key", l.from), e)
                })?;
            if rows.len() != 1 {
                return Err(SourceError::config(format!(
                    "{key}.references: {} has no single-column primary key; name the column `{}` points at with references:",
                    l.from, l.key
                )));
            }
            rows[0].get(0)
        }
    };
    let Some(referenced) = columns.get(&references) else {
        return Err(SourceError::config(format!(
            "{key}.references: column `{references}` does not exist in table {}",
            l.from
        )));
    };
    match columns.get(&l.column) {
        None => {
            return Err(SourceError::config(format!(
                "{key}.column: column `{}` does not exist in table {}",
                l.column, l.from
            )))
        }
        Some(c) if c.oid == BYTEA || c.typtype == "c" => {
            return Err(SourceError::config(format!(
                "{key}.column: column `{}` of table {} is of type {}, which cannot be a contact id",
                l.column, l.from, c.type_name
            )))
        }
        Some(_) => {}
    }
    Ok(LookupTarget {
        from: l.from.clone(),
        references,
        column: l.column.clone(),
        key_type: referenced.type_name.clone(),
    })
}

/// Whether an index leads with the lookup's referenced column, so each
/// lookup is an index probe rather than a scan.
pub(crate) async fn lookup_indexed(
    client: &Client,
    target: &LookupTarget,
) -> Result<bool, SourceError> {
    let row = client
        .query_one(
            "SELECT EXISTS (
                SELECT 1 FROM pg_index i
                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                 WHERE i.indrelid = $1::text::regclass AND a.attname = $2 AND i.indpred IS NULL)",
            &[&target.from.quoted(), &target.references],
        )
        .await
        .map_err(|e| SourceError::from_sql(&format!("looking up indexes of {}", target.from), e))?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::edit_distance;

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("public.employes", "public.employees"), 1);
        assert_eq!(edit_distance("public.sales", "public.sale"), 1);
        assert_eq!(edit_distance("public.emps", "public.employees"), 5);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
