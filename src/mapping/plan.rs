//! How one relation's tuples become actions: the plan built from its
//! Relation message and the mapping.

use std::sync::Arc;

use serde_json::Value;

use super::fields::FieldKey;
use super::text_at;
use super::{Fields, MapError, MapFault, RowKey, Schema};
use crate::config::{
    ContactSource, EventName, FieldSource, IncrementBy, MappingKind, NullPolicy, OnDelete,
    Operations, TableMapping, TimeFormat,
};
use crate::decode::value::ValueKind;
use crate::decode::Tuple;
use crate::lsn::Lsn;

/// How a field's value is made.
#[derive(Debug, Clone)]
pub(super) enum FieldPlan {
    Value {
        index: usize,
        kind: ValueKind,
        format: TimeFormat,
    },
    List {
        index: usize,
        /// The array's element kind, or Text for a delimited text column.
        element: ValueKind,
        delimiter: Option<String>,
    },
    Const(Value),
}

#[derive(Debug, Clone)]
pub(super) struct Field {
    pub(super) name: String,
    /// The name as the object's key, encoded once.
    pub(super) key: FieldKey,
    pub(super) column: Option<String>,
    pub(super) plan: FieldPlan,
}

#[derive(Debug, Clone)]
pub(super) enum ContactPlan {
    Column {
        index: usize,
        column: String,
    },
    Lookup {
        lookup: usize,
        index: usize,
        column: String,
    },
}

#[derive(Debug, Clone)]
pub(super) enum EventPlan {
    Fixed(Arc<str>),
    Column { index: usize, column: String },
}

#[derive(Debug, Clone)]
pub(super) enum IncrementPlan {
    Const(serde_json::Number),
    Column {
        index: usize,
        column: String,
        kind: ValueKind,
    },
}

#[derive(Debug, Clone)]
pub(super) enum DeletePlan {
    Ignore,
    Identify(Fields),
    Track { event: Arc<str>, fields: Vec<Field> },
}

/// A lookup fed by this table's rows: which columns hold its key and
/// contact id.
#[derive(Debug, Clone)]
pub(super) struct Watch {
    pub(super) lookup: usize,
    pub(super) references: usize,
    pub(super) column: usize,
}

/// How one relation's tuples become actions, built from its Relation
/// message.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) table: Arc<str>,
    /// Where the primary key's columns are, if the table has one and the
    /// relation carries every key column.
    pub(super) key: Option<KeyPlan>,
    /// None for a table that only feeds lookups.
    pub(super) act: Option<ActPlan>,
    pub(super) watches: Vec<Watch>,
}

#[derive(Debug, Clone)]
pub(super) struct KeyPlan {
    pub(super) columns: Arc<[String]>,
    pub(super) indexes: Vec<usize>,
}

impl KeyPlan {
    pub(super) fn of(&self, t: &Tuple) -> RowKey {
        RowKey {
            columns: self.columns.clone(),
            values: self.indexes.iter().map(|i| text_at(t, *i)).collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct ActPlan {
    pub(super) contact: ContactPlan,
    pub(super) fields: Vec<Field>,
    /// Some for track tables.
    pub(super) event: Option<EventPlan>,
    pub(super) increments: Vec<(String, IncrementPlan)>,
    pub(super) delete: DeletePlan,
    pub(super) operations: Operations,
    pub(super) nulls: NullPolicy,
}

impl ContactPlan {
    pub(super) fn column(&self) -> &str {
        match self {
            ContactPlan::Column { column, .. } | ContactPlan::Lookup { column, .. } => column,
        }
    }

    /// The tuple index of the column holding the contact id or lookup key.
    pub(super) fn index(&self) -> usize {
        match self {
            ContactPlan::Column { index, .. } | ContactPlan::Lookup { index, .. } => *index,
        }
    }
}

impl ActPlan {
    /// Every tuple index whose change matters to an update.
    pub(super) fn reads(&self) -> impl Iterator<Item = usize> + '_ {
        let contact = self.contact.index();
        let event = match &self.event {
            Some(EventPlan::Column { index, .. }) => Some(*index),
            _ => None,
        };
        std::iter::once(contact)
            .chain(event)
            .chain(self.fields.iter().filter_map(|f| match &f.plan {
                FieldPlan::Value { index, .. } | FieldPlan::List { index, .. } => Some(*index),
                FieldPlan::Const(_) => None,
            }))
    }
}

pub(super) fn error_at(plan: &Plan, lsn: Lsn) -> impl Fn(&str, String) -> MapError + '_ {
    move |column: &str, problem: String| MapError {
        table: plan.table.to_string(),
        column: Some(column.to_owned()),
        lsn,
        problem,
        fault: MapFault::Row,
    }
}

/// Finds a column by name in the relation being learnt (the second
/// argument is the config key, for the error): its index and conversion.
pub(super) type ColumnFinder<'a> =
    dyn FnMut(&str, &str) -> Result<(usize, ValueKind), MapError> + 'a;

/// Builds a mapping's plan against a relation's columns.
pub(super) fn plan_for(
    m: &TableMapping,
    schema: &Schema,
    find: &mut ColumnFinder<'_>,
) -> Result<ActPlan, MapError> {
    let section = m.section();
    let base = format!("{}.{section}", m.key);
    let contact = match &m.contact {
        ContactSource::Column(c) => ContactPlan::Column {
            index: find(c, &format!("{base}.id"))?.0,
            column: c.clone(),
        },
        ContactSource::Lookup(l) => ContactPlan::Lookup {
            lookup: schema.lookup_index(l).ok_or_else(|| MapError {
                table: m.table.to_string(),
                column: Some(l.key.clone()),
                lsn: Lsn::ZERO,
                problem: format!(
                    "{base}.id: the lookup into {} was not resolved at startup",
                    l.from
                ),
                fault: MapFault::Shape,
            })?,
            index: find(&l.key, &format!("{base}.id.key"))?.0,
            column: l.key.clone(),
        },
    };
    let what = match m.kind {
        MappingKind::Identify => "traits",
        MappingKind::Track { .. } => "properties",
    };
    let fields = field_plans(&m.fields, &format!("{base}.{what}"), m, find)?;
    let (event, increments) = match &m.kind {
        MappingKind::Identify => (None, Vec::new()),
        MappingKind::Track { event, increments } => {
            let event = match event {
                EventName::Fixed(name) => EventPlan::Fixed(Arc::from(name.as_str())),
                EventName::Column(c) => EventPlan::Column {
                    index: find(c, &format!("{base}.event.column"))?.0,
                    column: c.clone(),
                },
            };
            let mut plans = Vec::with_capacity(increments.len());
            for (name, by) in increments {
                let plan = match by {
                    IncrementBy::Const(n) => IncrementPlan::Const(n.clone()),
                    IncrementBy::Column(c) => {
                        let (index, kind) = find(c, &format!("{base}.increment.{name}"))?;
                        IncrementPlan::Column {
                            index,
                            column: c.clone(),
                            kind,
                        }
                    }
                };
                plans.push((name.clone(), plan));
            }
            (Some(event), plans)
        }
    };
    let delete = match &m.on_delete {
        OnDelete::Ignore => DeletePlan::Ignore,
        OnDelete::Identify(traits) => {
            DeletePlan::Identify(Fields::from_map(&traits.iter().cloned().collect()))
        }
        OnDelete::Track { event, properties } => DeletePlan::Track {
            event: Arc::from(event.as_str()),
            fields: field_plans(
                properties,
                &format!("{}.on_delete.track.properties", m.key),
                m,
                find,
            )?,
        },
    };
    Ok(ActPlan {
        contact,
        fields,
        event,
        increments,
        delete,
        operations: m.operations,
        nulls: m.nulls,
    })
}

pub(super) fn field_plans(
    fields: &[crate::config::FieldMapping],
    base: &str,
    m: &TableMapping,
    find: &mut ColumnFinder<'_>,
) -> Result<Vec<Field>, MapError> {
    let mut out = Vec::with_capacity(fields.len());
    for f in fields {
        let key = format!("{base}.{}", f.name);
        let plan = match &f.source {
            FieldSource::Column { column, format } => {
                let (index, kind) = find(column, &key)?;
                let format = format.clone().unwrap_or_else(|| match kind {
                    ValueKind::Date => m.date_format.clone(),
                    _ => m.timestamp_format.clone(),
                });
                FieldPlan::Value {
                    index,
                    kind,
                    format,
                }
            }
            FieldSource::List { column, delimiter } => {
                let (index, kind) = find(column, &key)?;
                let element = match (kind, delimiter) {
                    (ValueKind::Array(e), None) => *e,
                    (_, Some(_)) => ValueKind::Text,
                    (_, None) => {
                        return Err(MapError {
                            table: m.table.to_string(),
                            column: Some(column.clone()),
                            lsn: Lsn::ZERO,
                            problem: format!(
                                "{key}: a list trait needs an array column, or a delimiter for a text column"
                            ),
                            fault: MapFault::Shape,
                        })
                    }
                };
                FieldPlan::List {
                    index,
                    element,
                    delimiter: delimiter.clone(),
                }
            }
            FieldSource::Const(v) => FieldPlan::Const(v.clone()),
        };
        out.push(Field {
            name: f.name.clone(),
            key: FieldKey::new(&f.name),
            column: f.source.column().map(str::to_owned),
            plan,
        });
    }
    // Written in key order, as a JSON map would be: the bytes sent do not
    // depend on the order of the config's keys.
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
