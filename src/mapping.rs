//! Rows to ConveYour actions: which tables are mapped, which columns feed
//! the contact id, traits and properties, and how each value becomes JSON.
//!
//! Pure: no I/O, so every rule is unit-tested on its own.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::{MappingKind, TableMapping, TableName};
use crate::decode::value::{to_json, ValueKind};
use crate::decode::{Datum, OldTuple, Relation, Tuple};
use crate::lsn::Lsn;

/// One thing to tell ConveYour about one row change.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// The source table, for error messages and metrics.
    pub table: Arc<str>,
    /// Where the change is in the WAL.
    pub lsn: Lsn,
    /// The ConveYour contact id.
    pub contact: String,
    pub body: ActionBody,
}

/// What the action says about the contact.
#[derive(Debug, Clone, PartialEq)]
pub enum ActionBody {
    /// Set traits on the contact (an identify entry).
    Identify { traits: Map<String, Value> },
    /// Record an event on the contact.
    Track {
        event: Arc<str>,
        properties: Map<String, Value>,
    },
}

/// A row that cannot become an action, with where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct MapError {
    pub table: String,
    pub column: Option<String>,
    pub lsn: Lsn,
    pub problem: String,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "table {}", self.table)?;
        if let Some(c) = &self.column {
            write!(f, ", column {c}")?;
        }
        write!(f, ", row at LSN {}: {}", self.lsn, self.problem)
    }
}

impl std::error::Error for MapError {}

/// One mapped field: where its value is in the tuple and how it converts.
#[derive(Debug, Clone)]
struct Field {
    name: String,
    column: String,
    index: usize,
    kind: ValueKind,
}

/// How one relation's tuples become actions, built from its Relation
/// message.
#[derive(Debug, Clone)]
struct Plan {
    table: Arc<str>,
    id_index: usize,
    id_column: String,
    fields: Vec<Field>,
    event: Option<Arc<str>>,
}

/// Turns decoded row changes into actions. Knows the mapping and the
/// column types; learns relation ids from the stream's Relation messages.
pub struct Mapper {
    mappings: HashMap<TableName, TableMapping>,
    kinds: HashMap<u32, ValueKind>,
    plans: HashMap<u32, Option<Plan>>,
}

impl Mapper {
    /// `kinds` holds the JSON conversion of every non-built-in column type
    /// (domains, enums, arrays) the catalog reported at startup.
    pub fn new(mappings: &[TableMapping], kinds: HashMap<u32, ValueKind>) -> Mapper {
        Mapper {
            mappings: mappings
                .iter()
                .map(|m| (m.table.clone(), m.clone()))
                .collect(),
            kinds,
            plans: HashMap::new(),
        }
    }

    /// Learns (or relearns) a relation. A mapped column missing from it is
    /// an error: sending rows without it would silently drop data.
    pub fn relation(&mut self, rel: &Relation, lsn: Lsn) -> Result<(), MapError> {
        let name = TableName {
            schema: rel.namespace.clone(),
            name: rel.name.clone(),
        };
        let Some(mapping) = self.mappings.get(&name) else {
            self.plans.insert(rel.id, None);
            return Ok(());
        };
        let table: Arc<str> = Arc::from(name.to_string());
        let find = |column: &str| -> Result<(usize, ValueKind), MapError> {
            let index = rel.columns.iter().position(|c| c.name == column).ok_or_else(|| MapError {
                table: table.to_string(),
                column: Some(column.to_owned()),
                lsn,
                problem: format!(
                    "the mapped column is no longer in the table (config {}); fix the mapping or the table, then restart",
                    mapping.key
                ),
            })?;
            let oid = rel.columns[index].type_oid;
            let kind = ValueKind::from_builtin_oid(oid)
                .or_else(|| self.kinds.get(&oid).cloned())
                .unwrap_or(ValueKind::Text);
            Ok((index, kind))
        };
        let (id_index, _) = find(&mapping.id_column)?;
        let (pairs, event) = match &mapping.kind {
            MappingKind::Identify { traits } => (traits, None),
            MappingKind::Track { event, properties } => {
                (properties, Some(Arc::from(event.as_str())))
            }
        };
        let mut fields = Vec::with_capacity(pairs.len());
        for (field, column) in pairs {
            let (index, kind) = find(column)?;
            fields.push(Field {
                name: field.clone(),
                column: column.clone(),
                index,
                kind,
            });
        }
        self.plans.insert(
            rel.id,
            Some(Plan {
                table,
                id_index,
                id_column: mapping.id_column.clone(),
                fields,
                event,
            }),
        );
        Ok(())
    }

    /// The mapped table a relation id stands for, if any.
    pub fn table(&self, relation: u32) -> Option<&Arc<str>> {
        self.plans.get(&relation)?.as_ref().map(|p| &p.table)
    }

    /// The action for an inserted row, if its table is mapped.
    pub fn insert(&self, relation: u32, new: &Tuple, lsn: Lsn) -> Result<Option<Action>, MapError> {
        self.row(relation, new, lsn, true)
    }

    /// The action for an updated row: identify tables send the new values;
    /// track tables record events for inserts only. When the old row is
    /// known in full (REPLICA IDENTITY FULL) and no mapped column changed
    /// (`updated_at`, `last_login_ip` …), there is nothing to send.
    pub fn update(
        &self,
        relation: u32,
        old: Option<&OldTuple>,
        new: &Tuple,
        lsn: Lsn,
    ) -> Result<Option<Action>, MapError> {
        if let (Some(OldTuple::Full(old)), Some(Some(plan))) = (old, self.plans.get(&relation)) {
            let same = |i: usize| match (old.0.get(i), new.0.get(i)) {
                // Postgres resends a large value only when it changed.
                (_, Some(Datum::UnchangedToast)) => true,
                (Some(a), Some(b)) => a == b,
                _ => false,
            };
            if same(plan.id_index) && plan.fields.iter().all(|f| same(f.index)) {
                return Ok(None);
            }
        }
        self.row(relation, new, lsn, false)
    }

    fn plan(&self, relation: u32, lsn: Lsn) -> Result<Option<&Plan>, MapError> {
        match self.plans.get(&relation) {
            Some(p) => Ok(p.as_ref()),
            None => Err(MapError {
                table: format!("relation {relation}"),
                column: None,
                lsn,
                problem: "row for a relation the stream never described (no Relation message)"
                    .into(),
            }),
        }
    }

    fn row(
        &self,
        relation: u32,
        tuple: &Tuple,
        lsn: Lsn,
        insert: bool,
    ) -> Result<Option<Action>, MapError> {
        let Some(plan) = self.plan(relation, lsn)? else {
            return Ok(None);
        };
        if plan.event.is_some() && !insert {
            return Ok(None);
        }
        let error = |column: &str, problem: String| MapError {
            table: plan.table.to_string(),
            column: Some(column.to_owned()),
            lsn,
            problem,
        };
        let contact = match tuple.0.get(plan.id_index) {
            Some(Datum::Text(bytes)) => std::str::from_utf8(bytes)
                .map_err(|_| error(&plan.id_column, "the contact id is not valid UTF-8".into()))?
                .to_owned(),
            Some(Datum::Null) => {
                return Err(error(
                    &plan.id_column,
                    "the contact id is NULL, so ConveYour cannot tell which contact this is".into(),
                ))
            }
            Some(Datum::UnchangedToast) => return Err(error(
                &plan.id_column,
                "the contact id was not sent (unchanged TOAST value); use REPLICA IDENTITY FULL"
                    .into(),
            )),
            None => {
                return Err(error(
                    &plan.id_column,
                    "the row has fewer columns than its relation".into(),
                ))
            }
        };
        if contact.is_empty() {
            return Err(error(&plan.id_column, "the contact id is empty".into()));
        }
        let mut values = Map::new();
        for f in &plan.fields {
            let value = match tuple.0.get(f.index) {
                Some(Datum::Text(bytes)) => {
                    to_json(&f.kind, bytes).map_err(|e| error(&f.column, e.to_string()))?
                }
                Some(Datum::Null) => Value::Null,
                // Unchanged large value: leave it out rather than send it
                // as null or empty, which would erase it in ConveYour.
                Some(Datum::UnchangedToast) => continue,
                None => {
                    return Err(error(
                        &f.column,
                        "the row has fewer columns than its relation".into(),
                    ))
                }
            };
            values.insert(f.name.clone(), value);
        }
        let body = match &plan.event {
            None => ActionBody::Identify { traits: values },
            Some(event) => ActionBody::Track {
                event: event.clone(),
                properties: values,
            },
        };
        Ok(Some(Action {
            table: plan.table.clone(),
            lsn,
            contact,
            body,
        }))
    }
}
