//! The mapper: plans per relation id, and a row change to its actions.

use std::collections::HashMap;
use std::sync::Arc;

use super::plan::{error_at, plan_for, ActPlan, ContactPlan, DeletePlan, KeyPlan, Plan, Watch};
use super::row::{build, changed, contact_of, write_field};
use super::{
    text_at, ActionBody, CacheChange, Fields, LookupTarget, MapError, MapFault, Mapped, Op,
    Outcome, RowKey, Schema,
};
use crate::config::{NullPolicy, TableMapping, TableName};
use crate::decode::value::ValueKind;
use crate::decode::{Datum, OldTuple, Relation, Tuple};
use crate::lsn::Lsn;

/// Turns decoded row changes into actions. Knows the mapping and the
/// column types; learns relation ids from the stream's Relation messages.
pub struct Mapper {
    pub(super) mappings: HashMap<TableName, TableMapping>,
    pub(super) schema: Schema,
    pub(super) plans: Plans,
}

/// Plans by relation id. A publication holds a handful of tables, and every
/// change looks its plan up twice: a short list searched in order beats
/// hashing the id (SipHash showed in profiles).
#[derive(Default)]
pub(super) struct Plans(Vec<(u32, Option<Plan>)>);

impl Plans {
    pub(super) fn get(&self, relation: &u32) -> Option<&Option<Plan>> {
        self.0.iter().find(|(id, _)| id == relation).map(|(_, p)| p)
    }

    /// Sets a relation's plan, replacing what the id stood for before.
    pub(super) fn insert(&mut self, relation: u32, plan: Option<Plan>) {
        match self.0.iter_mut().find(|(id, _)| *id == relation) {
            Some(slot) => slot.1 = plan,
            None => self.0.push((relation, plan)),
        }
    }
}

impl Mapper {
    pub fn new(mappings: &[TableMapping], schema: Schema) -> Mapper {
        Mapper {
            mappings: mappings
                .iter()
                .map(|m| (m.table.clone(), m.clone()))
                .collect(),
            schema,
            plans: Plans::default(),
        }
    }

    /// Learns (or relearns) a relation. A mapped column that is gone or has
    /// another type than at startup is an error: sending rows without it,
    /// or with values of another shape, would silently corrupt ConveYour.
    /// Columns the mapping does not read may come and go.
    pub fn relation(&mut self, rel: &Relation, lsn: Lsn) -> Result<(), MapError> {
        let name = TableName {
            schema: rel.namespace.clone(),
            name: rel.name.clone(),
        };
        let mapping = self.mappings.get(&name);
        let watched: Vec<(usize, &LookupTarget)> = self
            .schema
            .lookups
            .iter()
            .enumerate()
            .filter(|(_, t)| t.from == name)
            .collect();
        if mapping.is_none() && watched.is_empty() {
            self.plans.insert(rel.id, None);
            return Ok(());
        }
        let table: Arc<str> = Arc::from(name.to_string());
        let known = self.schema.columns.get(&name);
        let mut find = |column: &str, key: &str| -> Result<(usize, ValueKind), MapError> {
            let error = |problem: String| MapError {
                table: table.to_string(),
                column: Some(column.to_owned()),
                lsn,
                problem,
                fault: MapFault::Shape,
            };
            let index = rel.columns.iter().position(|c| c.name == column).ok_or_else(|| {
                error(format!(
                    "the column ({key}) was dropped or renamed; nothing after this point was sent. Fix the mapping or the table, then restart"
                ))
            })?;
            let oid = rel.columns[index].type_oid;
            if let Some(was) = known.and_then(|k| k.get(column)) {
                if *was != oid {
                    return Err(error(format!(
                        "the column ({key}) changed type (OID {was} → {oid}); nothing after this point was sent. Check the mapping against the new type, then restart"
                    )));
                }
            }
            let kind = ValueKind::from_builtin_oid(oid)
                .or_else(|| self.schema.kinds.get(&oid).cloned())
                .unwrap_or(ValueKind::Text);
            Ok((index, kind))
        };

        let mut watches = Vec::new();
        for (lookup, target) in &watched {
            let key = format!("lookup {}.{}", target.from, target.references);
            let (references, _) = find(&target.references, &key)?;
            let (column, _) = find(&target.column, &key)?;
            watches.push(Watch {
                lookup: *lookup,
                references,
                column,
            });
        }

        let act = match mapping {
            None => None,
            Some(m) => Some(plan_for(m, &self.schema, &mut find)?),
        };
        let key = self.schema.keys.get(&name).and_then(|columns| {
            let indexes = columns
                .iter()
                .map(|k| rel.columns.iter().position(|c| c.name == *k))
                .collect::<Option<Vec<usize>>>()?;
            Some(KeyPlan {
                columns: columns.iter().cloned().collect(),
                indexes,
            })
        });
        self.plans.insert(
            rel.id,
            Some(Plan {
                table,
                key,
                act,
                watches,
            }),
        );
        Ok(())
    }

    /// The mapped (or looked-up) table a relation id stands for, if any.
    pub fn table(&self, relation: u32) -> Option<&Arc<str>> {
        self.plans.get(&relation)?.as_ref().map(|p| &p.table)
    }

    /// A row's primary key, when its table has one the relation carries.
    pub fn key_of(&self, relation: u32, tuple: &Tuple) -> Option<RowKey> {
        let plan = self.plans.get(&relation)?.as_ref()?;
        plan.key.as_ref().map(|k| k.of(tuple))
    }

    /// Whether a relation's rows become track events (else identifies).
    pub fn is_track(&self, relation: u32) -> bool {
        matches!(self.plans.get(&relation), Some(Some(Plan { act: Some(a), .. })) if a.event.is_some())
    }

    /// The contact id in a row, if its own column holds one (not a
    /// lookup): to name a row the mapping could not send.
    pub fn contact_text(&self, relation: u32, tuple: &Tuple) -> Option<String> {
        let act = self.plans.get(&relation)?.as_ref()?.act.as_ref()?;
        match act.contact {
            ContactPlan::Column { index, .. } => text_at(tuple, index),
            ContactPlan::Lookup { .. } => None,
        }
    }

    pub(super) fn plan(&self, relation: u32, lsn: Lsn) -> Result<Option<&Plan>, MapError> {
        match self.plans.get(&relation) {
            Some(p) => Ok(p.as_ref()),
            None => Err(MapError {
                table: format!("relation {relation}"),
                column: None,
                lsn,
                problem: "row for a relation the stream never described (no Relation message)"
                    .into(),
                fault: MapFault::Shape,
            }),
        }
    }

    /// The lookup caches a change to a related table updates: the new row's
    /// key now resolves to its contact id; an old key that changed, or a
    /// deleted row's key, resolves to nothing known.
    pub fn observe(
        &self,
        relation: u32,
        old: Option<&OldTuple>,
        new: Option<&Tuple>,
        out: &mut Vec<CacheChange>,
    ) {
        let Some(Some(plan)) = self.plans.get(&relation) else {
            return;
        };
        for w in &plan.watches {
            let new_key = new.and_then(|t| text_at(t, w.references));
            let old_key = old.and_then(|o| {
                let (OldTuple::Key(t) | OldTuple::Full(t)) = o;
                text_at(t, w.references)
            });
            if let Some(k) = old_key {
                if new_key.as_deref() != Some(k.as_str()) {
                    out.push(CacheChange::Forget {
                        lookup: w.lookup,
                        key: k,
                    });
                }
            }
            if let (Some(key), Some(t)) = (new_key, new) {
                match t.0.get(w.column) {
                    Some(Datum::Text(b)) => match std::str::from_utf8(b) {
                        Ok(c) if !c.is_empty() => out.push(CacheChange::Set {
                            lookup: w.lookup,
                            key,
                            contact: c.to_owned(),
                        }),
                        _ => out.push(CacheChange::Forget {
                            lookup: w.lookup,
                            key,
                        }),
                    },
                    // Unchanged large value: the cached id still holds.
                    Some(Datum::UnchangedToast) => {}
                    _ => out.push(CacheChange::Forget {
                        lookup: w.lookup,
                        key,
                    }),
                }
            }
        }
    }

    /// What an inserted row becomes.
    pub fn insert(&self, relation: u32, new: &Tuple, lsn: Lsn) -> Result<Outcome, MapError> {
        let Some((plan, act)) = self.act(relation, lsn)? else {
            return Ok(Outcome::Nothing);
        };
        if !act.operations.insert {
            return Ok(Outcome::Nothing);
        }
        build(plan, act, new, None, Op::Insert, lsn)
    }

    /// What an updated row becomes. When the old row is known in full
    /// (REPLICA IDENTITY FULL) and no mapped column changed (`updated_at`,
    /// `last_login_ip` …), nothing; list traits send what was added and
    /// removed.
    pub fn update(
        &self,
        relation: u32,
        old: Option<&OldTuple>,
        new: &Tuple,
        lsn: Lsn,
    ) -> Result<Outcome, MapError> {
        let Some((plan, act)) = self.act(relation, lsn)? else {
            return Ok(Outcome::Nothing);
        };
        if !act.operations.update {
            return Ok(Outcome::Nothing);
        }
        let full = match old {
            Some(OldTuple::Full(t)) => Some(t),
            _ => None,
        };
        if let Some(old) = full {
            if !act.reads().any(|i| changed(old, new, i)) {
                return Ok(Outcome::Nothing);
            }
        }
        build(plan, act, new, full, Op::Update, lsn)
    }

    /// What a deleted row becomes: what `on_delete` says, for the contact
    /// in the old row. The old row holds the contact id only when it is in
    /// the replica identity (or the identity is FULL).
    pub fn delete(
        &self,
        relation: u32,
        old: Option<&OldTuple>,
        lsn: Lsn,
    ) -> Result<Outcome, MapError> {
        let Some((plan, act)) = self.act(relation, lsn)? else {
            return Ok(Outcome::Nothing);
        };
        if !act.operations.delete || matches!(act.delete, DeletePlan::Ignore) {
            return Ok(Outcome::Nothing);
        }
        let (tuple, full) = match old {
            Some(OldTuple::Full(t)) => (t, true),
            Some(OldTuple::Key(t)) => (t, false),
            None => {
                return Ok(Outcome::Skip {
                    table: plan.table.clone(),
                    column: act.contact.column().to_owned(),
                    reason: "the delete carries no old row (REPLICA IDENTITY NOTHING); set REPLICA IDENTITY FULL".into(),
                })
            }
        };
        // A key-only old row carries NULL for every column outside the
        // key: a NULL contact id there is unknown, not a broken row.
        if !full && matches!(tuple.0.get(act.contact.index()), Some(Datum::Null)) {
            return Ok(Outcome::Skip {
                table: plan.table.clone(),
                column: act.contact.column().to_owned(),
                reason: "the deleted row's contact id is not in its replica identity; set REPLICA IDENTITY FULL".into(),
            });
        }
        let error = error_at(plan, lsn);
        let contact = match contact_of(&plan.table, act, tuple, &error)? {
            Ok(c) => c,
            Err(_) if !full => {
                return Ok(Outcome::Skip {
                    table: plan.table.clone(),
                    column: act.contact.column().to_owned(),
                    reason: "the deleted row's contact id is not in its replica identity; set REPLICA IDENTITY FULL".into(),
                })
            }
            Err(skip) => return Ok(skip),
        };
        let first = match &act.delete {
            DeletePlan::Ignore => return Ok(Outcome::Nothing),
            DeletePlan::Identify(traits) => ActionBody::Identify {
                traits: traits.clone(),
            },
            DeletePlan::Track { event, fields } => {
                // A key-only old row carries NULL for every other column:
                // those are unknown, not null, so leave them out.
                let nulls = if full { act.nulls } else { NullPolicy::Omit };
                let mut properties = Fields::writer();
                for f in fields {
                    properties.field(&f.key, |out| {
                        write_field(f, tuple, None, Op::Insert, nulls, &error, out)
                    })?;
                }
                ActionBody::Track {
                    event: event.clone(),
                    properties: properties.finish(),
                }
            }
        };
        Ok(Outcome::Send(Mapped {
            table: plan.table.clone(),
            contact,
            first,
            then: None,
            key: None,
            complete: true,
        }))
    }

    pub(super) fn act(
        &self,
        relation: u32,
        lsn: Lsn,
    ) -> Result<Option<(&Plan, &ActPlan)>, MapError> {
        Ok(self
            .plan(relation, lsn)?
            .and_then(|p| p.act.as_ref().map(|a| (p, a))))
    }
}
