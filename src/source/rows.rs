//! A mapped table's current rows, read as the stream would carry them: a
//! [`Relation`] built from the catalog and [`Tuple`]s of values in
//! Postgres's text output format. The initial sync and `preview` both read
//! through here, so what they map is what an insert in the stream maps.
//!
//! Values come through the simple query protocol, which returns each as
//! its type's output function prints it, as pgoutput does (a `::text` cast
//! would differ: it trims `char(n)` padding). Only rows the table's row
//! filter (`where:`) accepts are read, as only those are streamed.

use bytes::Bytes;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::Schema;
use super::SourceError;
use crate::config::{TableMapping, TableName};
use crate::decode::{Column, Datum, Relation, Tuple};
use crate::sql::quote_ident;
use crate::sql::quote_literal;

/// A row's key in text form, one entry per key column.
pub(crate) type Key = Vec<Option<String>>;

/// One mapped table, described for reading in key order.
pub(crate) struct TableReader {
    table: TableName,
    /// The columns read: the primary key, every column the mapping reads,
    /// and the columns lookups read from this table, each once.
    relation: Relation,
    /// Indexes into `relation.columns` of the key: the primary key, or
    /// every column read when the table has none.
    key: Vec<usize>,
    /// SQL types of the primary key's columns, for keyset reads.
    key_types: Vec<String>,
    /// The mapping's `where:`, as config key and SQL.
    filter: Option<(String, String)>,
}

impl TableReader {
    /// Describes a mapped table from the catalog (`schema` holds the type
    /// of every column it reads, as `Catalog::load` found them).
    pub(crate) async fn describe(
        client: &Client,
        m: &TableMapping,
        schema: &Schema,
    ) -> Result<TableReader, SourceError> {
        let primary_key = super::catalog::primary_key(client, &m.table).await?;
        let key_names: Vec<String> = primary_key.iter().map(|(n, _)| n.clone()).collect();
        let key_types: Vec<String> = primary_key.into_iter().map(|(_, t)| t).collect();
        let mut names = key_names.clone();
        let used = m.columns().into_iter().map(|u| u.column);
        let watched = schema
            .lookups
            .iter()
            .filter(|t| t.from == m.table)
            .flat_map(|t| [t.references.clone(), t.column.clone()]);
        for c in used.chain(watched) {
            if !names.contains(&c) {
                names.push(c);
            }
        }
        let types = schema.columns.get(&m.table);
        let mut columns = Vec::with_capacity(names.len());
        for name in names {
            let Some(&type_oid) = types.and_then(|t| t.get(&name)) else {
                return Err(SourceError::config(format!(
                    "{}.table: column `{name}` of {} is not in the catalog read at startup (dropped meanwhile?)",
                    m.key, m.table
                )));
            };
            columns.push(Column {
                key: key_names.contains(&name),
                name,
                type_oid,
                type_modifier: -1,
            });
        }
        let key = if key_names.is_empty() {
            (0..columns.len()).collect()
        } else {
            (0..key_names.len()).collect()
        };
        Ok(TableReader {
            table: m.table.clone(),
            relation: Relation {
                id: 0,
                namespace: m.table.schema.clone(),
                name: m.table.name.clone(),
                replica_identity: b'd',
                columns,
            },
            key,
            key_types,
            filter: m
                .row_filter
                .as_ref()
                .map(|f| (format!("{}.where", m.key), f.clone())),
        })
    }

    /// The relation the rows' tuples follow.
    pub(crate) fn relation(&self) -> &Relation {
        &self.relation
    }

    /// Whether the table has a primary key (else rows are ordered by the
    /// text of every column read, and cannot be read after a key).
    pub(crate) fn has_primary_key(&self) -> bool {
        !self.key_types.is_empty()
    }

    /// The key's columns, in key order.
    pub(crate) fn key_columns(&self) -> impl Iterator<Item = (usize, &Column)> {
        self.key.iter().map(|i| (*i, &self.relation.columns[*i]))
    }

    /// Up to `limit` rows in key order, after `after` (from the start when
    /// None; only with a primary key), each with its key.
    pub(crate) async fn read(
        &self,
        client: &Client,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Key, Tuple)>, SourceError> {
        let condition = match after {
            None => None,
            Some(after) => Some(format!(
                "({}) > ({})",
                self.order().join(", "),
                self.key_literals(after)?
            )),
        };
        self.query(client, condition, Some(limit)).await
    }

    /// The rows with these keys (those that still exist and pass the row
    /// filter), in key order.
    pub(crate) async fn read_keys(
        &self,
        client: &Client,
        keys: &[Key],
    ) -> Result<Vec<(Key, Tuple)>, SourceError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut tuples = Vec::with_capacity(keys.len());
        for k in keys {
            tuples.push(format!("({})", self.key_literals(k)?));
        }
        let condition = format!("({}) IN ({})", self.order().join(", "), tuples.join(", "));
        self.query(client, Some(condition), None).await
    }

    /// The ORDER BY terms: the primary key's columns, or the text of every
    /// column read. Qualified: a bare name could mean an output column.
    fn order(&self) -> Vec<String> {
        let qualified = |c: &Column| format!("src.{}", quote_ident(&c.name));
        if self.has_primary_key() {
            self.key_columns().map(|(_, c)| qualified(c)).collect()
        } else {
            self.relation
                .columns
                .iter()
                .map(|c| format!("{}::text COLLATE \"C\"", qualified(c)))
                .collect()
        }
    }

    /// A key as SQL literals of the key columns' types.
    fn key_literals(&self, key: &Key) -> Result<String, SourceError> {
        if !self.has_primary_key() || key.len() != self.key_types.len() {
            return Err(SourceError::config(format!(
                "table {} has no primary key, and reading it in chunks needs one; add one, or set snapshot: never for it",
                self.table
            )));
        }
        Ok(key
            .iter()
            .zip(&self.key_types)
            .map(|(v, ty)| match v {
                Some(v) => format!("{}::{ty}", quote_literal(v)),
                None => format!("NULL::{ty}"),
            })
            .collect::<Vec<_>>()
            .join(", "))
    }

    async fn query(
        &self,
        client: &Client,
        condition: Option<String>,
        limit: Option<usize>,
    ) -> Result<Vec<(Key, Tuple)>, SourceError> {
        let columns = &self.relation.columns;
        let list: Vec<String> = columns
            .iter()
            .map(|c| format!("src.{}", quote_ident(&c.name)))
            .collect();
        let conditions: Vec<String> = self
            .filter
            .iter()
            .map(|(_, f)| format!("({f})"))
            .chain(condition)
            .collect();
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        let limit = limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default();
        let sql = format!(
            "SELECT {} FROM {} AS src{filter} ORDER BY {}{limit}",
            list.join(", "),
            self.table.quoted(),
            self.order().join(", ")
        );
        let context = match &self.filter {
            Some((key, _)) => format!("reading {} with its row filter {key}", self.table),
            None => format!("reading {}", self.table),
        };
        let messages = client
            .simple_query(&sql)
            .await
            .map_err(|e| SourceError::from_sql(&context, e))?;
        Ok(messages
            .iter()
            .filter_map(|message| match message {
                SimpleQueryMessage::Row(row) => {
                    let tuple = Tuple(
                        (0..columns.len())
                            .map(|i| match row.get(i) {
                                Some(text) => Datum::Text(Bytes::copy_from_slice(text.as_bytes())),
                                None => Datum::Null,
                            })
                            .collect(),
                    );
                    Some((self.key_of(&tuple), tuple))
                }
                _ => None,
            })
            .collect())
    }

    /// A tuple's key.
    fn key_of(&self, tuple: &Tuple) -> Key {
        key_at(tuple, &self.key)
    }

    /// Rows the filter accepts now, to estimate a copy's length.
    pub(crate) async fn count(&self, client: &Client) -> Result<i64, SourceError> {
        let filter = match &self.filter {
            Some((_, f)) => format!(" WHERE ({f})"),
            None => String::new(),
        };
        client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} AS src{filter}",
                    self.table.quoted()
                ),
                &[],
            )
            .await
            .map(|r| r.get(0))
            .map_err(|e| SourceError::from_sql(&format!("counting {}", self.table), e))
    }
}

/// The key of a tuple whose key columns are at `indexes`.
pub(crate) fn key_at(tuple: &Tuple, indexes: &[usize]) -> Key {
    indexes
        .iter()
        .map(|i| match tuple.0.get(*i) {
            Some(Datum::Text(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}
