//! Rows to ConveYour actions: which tables are mapped, which columns feed
//! the contact id, traits and properties, and how each value becomes JSON.
//!
//! Pure: no I/O, so every rule is unit-tested on its own. A contact id that
//! lives in another table comes out as [`ContactRef::Lookup`]; the caller
//! resolves it (`source::lookup`'s resolver) and keeps its cache fresh from the
//! related table's own changes ([`Mapper::observe`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::{
    ContactSource, EventName, FieldSource, IncrementBy, Lookup, MappingKind, NullPolicy, OnDelete,
    Operations, TableMapping, TableName, TimeFormat,
};
use crate::decode::value::{to_json, write_json, ValueKind};
use crate::decode::{Datum, OldTuple, Relation, Tuple};
use crate::lsn::Lsn;

mod fields;

use fields::FieldKey;
pub use fields::Fields;

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
    /// The row's primary key, for an identify table's insert or update:
    /// a dead letter stores it, so a retry can read the row's current
    /// values. None for events and deletes (re-sent as stored).
    pub key: Option<RowKey>,
}

/// A row's primary key in text form, with its columns' names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowKey {
    pub columns: Arc<[String]>,
    pub values: Vec<Option<String>>,
}

/// What the action says about the contact.
#[derive(Debug, Clone, PartialEq)]
pub enum ActionBody {
    /// Set traits on the contact (an identify entry).
    Identify { traits: Fields },
    /// Record an event on the contact.
    Track { event: Arc<str>, properties: Fields },
}

/// A row that cannot become an action, or a table whose shape no longer
/// fits the mapping, with where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct MapError {
    pub table: String,
    pub column: Option<String>,
    pub lsn: Lsn,
    pub problem: String,
    pub fault: MapFault,
}

/// Whose fault a [`MapError`] is, which decides whether the stream may go
/// on past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapFault {
    /// This row's values: a NULL or empty contact id, a value that does
    /// not convert. Other rows map; the row may be set aside.
    Row,
    /// The table or the stream no longer fits the mapping (a mapped
    /// column dropped or retyped, a contact id missing from the WAL, a
    /// row shorter than its relation): every later row would fail or be
    /// sent wrong, so the connector stops.
    Shape,
}

impl MapError {
    /// Whether the fault lies in one row's values, not in the table.
    pub fn is_row_fault(&self) -> bool {
        self.fault == MapFault::Row
    }

    fn shape(mut self) -> MapError {
        self.fault = MapFault::Shape;
        self
    }
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "table {}", self.table)?;
        if let Some(c) = &self.column {
            write!(f, ", column {c}")?;
        }
        write!(f, ", at LSN {}: {}", self.lsn, self.problem)
    }
}

impl std::error::Error for MapError {}

/// A related table's column that holds contact ids, resolved against the
/// catalog: `SELECT column FROM from WHERE references = key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupTarget {
    pub from: TableName,
    /// The indexed column the foreign key points at.
    pub references: String,
    /// The column holding the contact id.
    pub column: String,
    /// `references`' SQL type, to compare the key in its own type (and so
    /// use the index).
    pub key_type: String,
}

impl LookupTarget {
    /// Whether this target serves a configured lookup (whose `references`
    /// may have been left to default to the primary key).
    pub fn serves(&self, l: &Lookup) -> bool {
        self.from == l.from
            && self.column == l.column
            && l.references.as_ref().is_none_or(|r| *r == self.references)
    }
}

/// What the catalog said at startup: the mapped tables' column types and
/// the lookups' targets.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    /// How each non-built-in column type becomes JSON, by type OID.
    pub kinds: HashMap<u32, ValueKind>,
    /// Column name → type OID, per mapped (or looked-up) table.
    pub columns: HashMap<TableName, HashMap<String, u32>>,
    /// One per distinct lookup; [`ContactRef::Lookup`] indexes this.
    pub lookups: Vec<LookupTarget>,
    /// Primary-key columns, in key order, per mapped table that has one.
    pub keys: HashMap<TableName, Vec<String>>,
}

impl Schema {
    /// The index of the target serving `l`.
    pub fn lookup_index(&self, l: &Lookup) -> Option<usize> {
        self.lookups.iter().position(|t| t.serves(l))
    }
}

/// Whose change it is: known from the row, or to be looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactRef {
    Known(String),
    /// Look up `key` in [`Schema::lookups`]`[lookup]`.
    Lookup {
        lookup: usize,
        key: String,
    },
}

/// What one row change becomes before its contact is resolved: one or two
/// bodies (a `$inc` identify, then the track event), in send order.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub table: Arc<str>,
    pub contact: ContactRef,
    pub first: ActionBody,
    pub then: Option<ActionBody>,
    /// The row's key, where its actions carry one (see [`Action::key`]).
    pub key: Option<RowKey>,
    /// Whether the bodies carry the row's whole mapped state, as an insert
    /// does; false for an update whose list traits send only what changed
    /// or whose large values were left out (unchanged TOAST). A sync chunk
    /// may drop its copy of a row only for a complete change.
    pub complete: bool,
}

impl Mapped {
    /// The actions, once the contact is known.
    pub fn into_actions(self, contact: String, lsn: Lsn) -> impl Iterator<Item = Action> {
        let table = self.table;
        let then = self.then.map(|body| Action {
            table: table.clone(),
            lsn,
            contact: contact.clone(),
            body,
            key: self.key.clone(),
        });
        let first = Action {
            table,
            lsn,
            contact,
            body: self.first,
            key: self.key,
        };
        std::iter::once(first).chain(then)
    }
}

/// What the mapper makes of one row change.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The table is not mapped, the operation does not count, or nothing
    /// mapped changed.
    Nothing,
    Send(Mapped),
    /// The row cannot be sent anywhere (no contact, no event name); the
    /// caller logs and counts it. Named by column and reason.
    Skip {
        table: Arc<str>,
        column: String,
        reason: String,
    },
}

/// A change to a lookup's cache, seen in the related table's own stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheChange {
    /// `key` now resolves to this contact id.
    Set {
        lookup: usize,
        key: String,
        contact: String,
    },
    /// `key` resolves to nothing known any more.
    Forget { lookup: usize, key: String },
}

/// How a field's value is made.
#[derive(Debug, Clone)]
enum FieldPlan {
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
struct Field {
    name: String,
    /// The name as the object's key, encoded once.
    key: FieldKey,
    column: Option<String>,
    plan: FieldPlan,
}

#[derive(Debug, Clone)]
enum ContactPlan {
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
enum EventPlan {
    Fixed(Arc<str>),
    Column { index: usize, column: String },
}

#[derive(Debug, Clone)]
enum IncrementPlan {
    Const(serde_json::Number),
    Column {
        index: usize,
        column: String,
        kind: ValueKind,
    },
}

#[derive(Debug, Clone)]
enum DeletePlan {
    Ignore,
    Identify(Fields),
    Track { event: Arc<str>, fields: Vec<Field> },
}

/// A lookup fed by this table's rows: which columns hold its key and
/// contact id.
#[derive(Debug, Clone)]
struct Watch {
    lookup: usize,
    references: usize,
    column: usize,
}

/// How one relation's tuples become actions, built from its Relation
/// message.
#[derive(Debug, Clone)]
struct Plan {
    table: Arc<str>,
    /// Where the primary key's columns are, if the table has one and the
    /// relation carries every key column.
    key: Option<KeyPlan>,
    /// None for a table that only feeds lookups.
    act: Option<ActPlan>,
    watches: Vec<Watch>,
}

#[derive(Debug, Clone)]
struct KeyPlan {
    columns: Arc<[String]>,
    indexes: Vec<usize>,
}

impl KeyPlan {
    fn of(&self, t: &Tuple) -> RowKey {
        RowKey {
            columns: self.columns.clone(),
            values: self.indexes.iter().map(|i| text_at(t, *i)).collect(),
        }
    }
}

#[derive(Debug, Clone)]
struct ActPlan {
    contact: ContactPlan,
    fields: Vec<Field>,
    /// Some for track tables.
    event: Option<EventPlan>,
    increments: Vec<(String, IncrementPlan)>,
    delete: DeletePlan,
    operations: Operations,
    nulls: NullPolicy,
}

/// Turns decoded row changes into actions. Knows the mapping and the
/// column types; learns relation ids from the stream's Relation messages.
pub struct Mapper {
    mappings: HashMap<TableName, TableMapping>,
    schema: Schema,
    plans: Plans,
}

/// Plans by relation id. A publication holds a handful of tables, and every
/// change looks its plan up twice: a short list searched in order beats
/// hashing the id (SipHash showed in profiles).
#[derive(Default)]
struct Plans(Vec<(u32, Option<Plan>)>);

impl Plans {
    fn get(&self, relation: &u32) -> Option<&Option<Plan>> {
        self.0.iter().find(|(id, _)| id == relation).map(|(_, p)| p)
    }

    /// Sets a relation's plan, replacing what the id stood for before.
    fn insert(&mut self, relation: u32, plan: Option<Plan>) {
        match self.0.iter_mut().find(|(id, _)| *id == relation) {
            Some(slot) => slot.1 = plan,
            None => self.0.push((relation, plan)),
        }
    }
}

/// The row operation being mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
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

    fn plan(&self, relation: u32, lsn: Lsn) -> Result<Option<&Plan>, MapError> {
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

    fn act(&self, relation: u32, lsn: Lsn) -> Result<Option<(&Plan, &ActPlan)>, MapError> {
        Ok(self
            .plan(relation, lsn)?
            .and_then(|p| p.act.as_ref().map(|a| (p, a))))
    }
}

impl ContactPlan {
    fn column(&self) -> &str {
        match self {
            ContactPlan::Column { column, .. } | ContactPlan::Lookup { column, .. } => column,
        }
    }

    /// The tuple index of the column holding the contact id or lookup key.
    fn index(&self) -> usize {
        match self {
            ContactPlan::Column { index, .. } | ContactPlan::Lookup { index, .. } => *index,
        }
    }
}

impl ActPlan {
    /// Every tuple index whose change matters to an update.
    fn reads(&self) -> impl Iterator<Item = usize> + '_ {
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

/// Whether column `i` differs between the old and new row.
fn changed(old: &Tuple, new: &Tuple, i: usize) -> bool {
    match (old.0.get(i), new.0.get(i)) {
        // Postgres resends a large value only when it changed.
        (_, Some(Datum::UnchangedToast)) => false,
        (Some(a), Some(b)) => a != b,
        _ => true,
    }
}

fn text_at(t: &Tuple, i: usize) -> Option<String> {
    match t.0.get(i) {
        Some(Datum::Text(b)) => std::str::from_utf8(b).ok().map(str::to_owned),
        _ => None,
    }
}

fn error_at(plan: &Plan, lsn: Lsn) -> impl Fn(&str, String) -> MapError + '_ {
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
type ColumnFinder<'a> = dyn FnMut(&str, &str) -> Result<(usize, ValueKind), MapError> + 'a;

/// Builds a mapping's plan against a relation's columns.
fn plan_for(
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

fn field_plans(
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

/// The contact of a row: Ok(Ok) known or to look up; Ok(Err) the row
/// cannot be sent (as a Skip outcome); Err a broken row.
fn contact_of(
    table: &Arc<str>,
    act: &ActPlan,
    tuple: &Tuple,
    error: &dyn Fn(&str, String) -> MapError,
) -> Result<Result<ContactRef, Outcome>, MapError> {
    let (index, column, lookup) = match &act.contact {
        ContactPlan::Column { index, column } => (*index, column, None),
        ContactPlan::Lookup {
            lookup,
            index,
            column,
        } => (*index, column, Some(*lookup)),
    };
    let text = match tuple.0.get(index) {
        Some(Datum::Text(bytes)) => std::str::from_utf8(bytes)
            .map_err(|_| error(column, "the contact id is not valid UTF-8".into()))?,
        Some(Datum::Null) if lookup.is_some() => {
            return Ok(Err(Outcome::Skip {
                table: table.clone(),
                column: column.clone(),
                reason: "the foreign key is NULL, so the row belongs to no contact".into(),
            }))
        }
        Some(Datum::Null) => {
            return Err(error(
                column,
                "the contact id is NULL, so ConveYour cannot tell which contact this is".into(),
            ))
        }
        Some(Datum::UnchangedToast) => {
            return Err(error(
                column,
                "the contact id was not sent (unchanged TOAST value); use REPLICA IDENTITY FULL"
                    .into(),
            )
            .shape())
        }
        None => {
            return Err(error(column, "the row has fewer columns than its relation".into()).shape())
        }
    };
    Ok(Ok(match lookup {
        Some(lookup) => ContactRef::Lookup {
            lookup,
            key: text.to_owned(),
        },
        None if text.is_empty() => {
            return Err(error(column, "the contact id is empty".into()));
        }
        None => ContactRef::Known(text.to_owned()),
    }))
}

/// Appends a field's value for a row to `out`: Ok(true) when written,
/// Ok(false) to leave the key out (an omitted NULL, an unchanged large
/// value, a list with nothing added or removed).
fn write_field(
    f: &Field,
    new: &Tuple,
    old: Option<&Tuple>,
    op: Op,
    nulls: NullPolicy,
    error: &dyn Fn(&str, String) -> MapError,
    out: &mut Vec<u8>,
) -> Result<bool, MapError> {
    let column = f.column.as_deref().unwrap_or("");
    let encode = |v: &Value, out: &mut Vec<u8>| {
        serde_json::to_writer(out, v)
            .map(|()| true)
            .map_err(|e| error(column, format!("cannot encode the value as JSON ({e})")))
    };
    let value = match &f.plan {
        FieldPlan::Value {
            index,
            kind,
            format,
        } => {
            return match new.0.get(*index) {
                Some(Datum::Text(bytes)) => write_json(kind, bytes, format, out)
                    .map(|()| true)
                    .map_err(|e| error(column, e.to_string())),
                Some(Datum::Null) if nulls == NullPolicy::Omit => Ok(false),
                Some(Datum::Null) => {
                    out.extend_from_slice(b"null");
                    Ok(true)
                }
                // Unchanged large value: leave it out rather than send it
                // as null or empty, which would erase it in ConveYour.
                Some(Datum::UnchangedToast) => Ok(false),
                None => {
                    Err(error(column, "the row has fewer columns than its relation".into()).shape())
                }
            };
        }
        FieldPlan::Const(v) => {
            // Written from the plan's value: no copy per row.
            return encode(v, out);
        }
        FieldPlan::List {
            index,
            element,
            delimiter,
        } => list_change(
            *index,
            element,
            delimiter.as_deref(),
            column,
            new,
            old,
            op,
            error,
        )?,
    };
    let Some(value) = value else {
        return Ok(false);
    };
    encode(&value, out)
}

/// A list trait's operations for a row: `{add, remove}` from the old and
/// new values, or None when nothing was added or removed.
#[allow(clippy::too_many_arguments)]
fn list_change(
    index: usize,
    element: &ValueKind,
    delimiter: Option<&str>,
    column: &str,
    new: &Tuple,
    old: Option<&Tuple>,
    op: Op,
    error: &dyn Fn(&str, String) -> MapError,
) -> Result<Option<Value>, MapError> {
    let list = |t: &Tuple| -> Result<Option<Vec<Value>>, MapError> {
        match t.0.get(index) {
            Some(Datum::Text(bytes)) => {
                list_values(element, delimiter, bytes, column, error).map(Some)
            }
            Some(Datum::Null) => Ok(Some(Vec::new())),
            Some(Datum::UnchangedToast) => Ok(None),
            None => {
                Err(error(column, "the row has fewer columns than its relation".into()).shape())
            }
        }
    };
    let Some(new_values) = list(new)? else {
        return Ok(None);
    };
    let old_values = match (op, old) {
        (Op::Update, Some(old)) => list(old)?.unwrap_or_default(),
        _ => Vec::new(),
    };
    let add: Vec<Value> = dedup(new_values.iter().filter(|v| !old_values.contains(v)));
    let remove: Vec<Value> = dedup(old_values.iter().filter(|v| !new_values.contains(v)));
    if add.is_empty() && remove.is_empty() {
        return Ok(None);
    }
    let mut op = Map::new();
    if !add.is_empty() {
        op.insert("add".into(), Value::Array(add));
    }
    if !remove.is_empty() {
        op.insert("remove".into(), Value::Array(remove));
    }
    Ok(Some(Value::Object(op)))
}

/// The values in order of first appearance, each once.
fn dedup<'a>(values: impl Iterator<Item = &'a Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for v in values {
        if !out.contains(v) {
            out.push(v.clone());
        }
    }
    out
}

/// A list column's values: an array's elements (NULLs dropped), or a
/// delimited text's trimmed, non-empty parts.
fn list_values(
    element: &ValueKind,
    delimiter: Option<&str>,
    bytes: &[u8],
    column: &str,
    error: &dyn Fn(&str, String) -> MapError,
) -> Result<Vec<Value>, MapError> {
    match delimiter {
        Some(d) => {
            let s = std::str::from_utf8(bytes)
                .map_err(|_| error(column, "the value is not valid UTF-8".into()))?;
            Ok(s.split(d)
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| Value::String(p.to_owned()))
                .collect())
        }
        None => {
            let kind = ValueKind::Array(Box::new(element.clone()));
            match to_json(&kind, bytes).map_err(|e| error(column, e.to_string()))? {
                Value::Array(items) => Ok(items.into_iter().filter(|v| !v.is_null()).collect()),
                _ => Err(error(
                    column,
                    "a list trait needs a one-dimensional array; this value is not one".into(),
                )),
            }
        }
    }
}

/// What an inserted or updated row becomes.
fn build(
    plan: &Plan,
    act: &ActPlan,
    new: &Tuple,
    old: Option<&Tuple>,
    op: Op,
    lsn: Lsn,
) -> Result<Outcome, MapError> {
    let error = error_at(plan, lsn);
    let contact = match contact_of(&plan.table, act, new, &error)? {
        Ok(c) => c,
        Err(skip) => return Ok(skip),
    };
    let mut values = Fields::writer();
    for f in &act.fields {
        values.field(&f.key, |out| {
            write_field(f, new, old, op, act.nulls, &error, out)
        })?;
    }
    let values = values.finish();
    let Some(event) = &act.event else {
        // An update whose traits all came out unchanged (lists with
        // nothing added or removed, unchanged large values) says nothing.
        if op == Op::Update && values.is_empty() {
            return Ok(Outcome::Nothing);
        }
        let complete = op == Op::Insert
            || act.fields.iter().all(|f| match &f.plan {
                FieldPlan::List { .. } => false,
                FieldPlan::Value { index, .. } => {
                    !matches!(new.0.get(*index), Some(Datum::UnchangedToast))
                }
                FieldPlan::Const(_) => true,
            });
        return Ok(Outcome::Send(Mapped {
            table: plan.table.clone(),
            contact,
            first: ActionBody::Identify { traits: values },
            then: None,
            key: plan.key.as_ref().map(|k| k.of(new)),
            complete,
        }));
    };
    let event: Arc<str> = match event {
        EventPlan::Fixed(name) => name.clone(),
        EventPlan::Column { index, column } => match new.0.get(*index) {
            Some(Datum::Text(b)) if !b.is_empty() => Arc::from(
                std::str::from_utf8(b)
                    .map_err(|_| error(column, "the event name is not valid UTF-8".into()))?,
            ),
            _ => {
                return Ok(Outcome::Skip {
                    table: plan.table.clone(),
                    column: column.clone(),
                    reason: "the event name is NULL or empty".into(),
                })
            }
        },
    };
    let track = ActionBody::Track {
        event,
        properties: values,
    };
    // Counters move once per tracked row: on insert, not on later edits.
    let mut counters = Map::new();
    if op == Op::Insert {
        for (name, by) in &act.increments {
            let amount = match by {
                IncrementPlan::Const(n) => Value::Number(n.clone()),
                IncrementPlan::Column {
                    index,
                    column,
                    kind,
                } => match new.0.get(*index) {
                    Some(Datum::Text(b)) => match to_json(kind, b) {
                        Ok(v @ Value::Number(_)) => v,
                        Ok(other) => {
                            return Err(error(
                                column,
                                format!(
                                    "the $inc amount {other} is not a number ConveYour can add"
                                ),
                            ))
                        }
                        Err(e) => return Err(error(column, e.to_string())),
                    },
                    // Nothing to add.
                    _ => continue,
                },
            };
            let mut inc = Map::new();
            inc.insert("$inc".into(), amount);
            counters.insert(name.clone(), Value::Object(inc));
        }
    }
    let (first, then) = if counters.is_empty() {
        (track, None)
    } else {
        // The counter first: an automation fired by the event sees the
        // contact's new count.
        (
            ActionBody::Identify {
                traits: Fields::from_map(&counters),
            },
            Some(track),
        )
    };
    Ok(Outcome::Send(Mapped {
        table: plan.table.clone(),
        contact,
        first,
        then,
        key: None,
        complete: true,
    }))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::config::Config;
    use crate::decode::Column;

    const TEXT: u32 = 25;
    const INT4: u32 = 23;
    const NUMERIC: u32 = 1700;
    const TEXT_ARRAY: u32 = 1009;

    /// The validated `tables:` of a config holding `tables`.
    fn mappings(tables: &str) -> Vec<TableMapping> {
        let yaml = format!(
            "postgres:\n  url: postgres://u:p@127.0.0.1:5432/app\n\
             conveyour:\n  url: https://acme.conveyour.com\n  appkey: a\n  token: t\n{tables}"
        );
        Config::from_yaml(&yaml)
            .unwrap()
            .validate(&|_| None)
            .unwrap()
            .tables
    }

    /// A Relation message for `public.name`; `key` marks replica identity
    /// columns.
    fn relation(id: u32, name: &str, columns: &[(&str, u32, bool)]) -> Relation {
        Relation {
            id,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: b'd',
            columns: columns
                .iter()
                .map(|(name, type_oid, key)| Column {
                    key: *key,
                    name: (*name).into(),
                    type_oid: *type_oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    /// A tuple: Some text, None NULL, "\u{0}" unchanged TOAST.
    fn row(values: &[Option<&str>]) -> Tuple {
        Tuple(
            values
                .iter()
                .map(|v| match v {
                    None => Datum::Null,
                    Some("\u{0}") => Datum::UnchangedToast,
                    Some(t) => Datum::Text(Bytes::copy_from_slice(t.as_bytes())),
                })
                .collect(),
        )
    }

    /// The bodies an outcome sends, as JSON: identify `{"traits": ..}`,
    /// track `{"event": .., "properties": ..}`; Nothing and Skip as strings.
    fn sent(outcome: Outcome) -> Value {
        let body = |b: ActionBody| match b {
            ActionBody::Identify { traits } => json!({ "traits": traits.to_map() }),
            ActionBody::Track { event, properties } => {
                json!({"event": &*event, "properties": properties.to_map()})
            }
        };
        match outcome {
            Outcome::Nothing => json!("nothing"),
            Outcome::Skip { column, .. } => json!(format!("skip {column}")),
            Outcome::Send(m) => {
                let contact = match m.contact {
                    ContactRef::Known(c) => json!(c),
                    ContactRef::Lookup { lookup, key } => json!({"lookup": lookup, "key": key}),
                };
                let mut out = vec![contact, body(m.first)];
                out.extend(m.then.map(body));
                Value::Array(out)
            }
        }
    }

    const EMPLOYEES: &[(&str, u32, bool)] = &[
        ("id", INT4, true),
        ("email", TEXT, false),
        ("first_name", TEXT, false),
        ("tags", TEXT_ARRAY, false),
        ("skills", TEXT, false),
        ("updated_at", TEXT, false),
    ];

    fn employees(traits: &str, extra: &str) -> Mapper {
        let tables = format!(
            "tables:\n  - table: employees\n    identify:\n      id: email\n      traits: {traits}\n{extra}"
        );
        let mut m = Mapper::new(&mappings(&tables), Schema::default());
        m.relation(&relation(1, "employees", EMPLOYEES), Lsn(1))
            .unwrap();
        m
    }

    fn lists() -> Mapper {
        employees(
            "{tags: {list: tags}, skills: {list: skills, delimiter: \",\"}}",
            "",
        )
    }

    fn full(values: &[Option<&str>]) -> OldTuple {
        OldTuple::Full(row(values))
    }

    #[test]
    fn an_insert_sends_the_list_as_add_only_once_each_without_nulls() {
        let m = lists();
        let new = row(&[
            Some("1"),
            Some("l@x"),
            None,
            Some("{a,a,NULL,b}"),
            Some(" rust , go,,rust, "),
            None,
        ]);
        assert_eq!(
            sent(m.insert(1, &new, Lsn(2)).unwrap()),
            json!(["l@x", {"traits": {"tags": {"add": ["a", "b"]}, "skills": {"add": ["rust", "go"]}}}])
        );
        // An empty or NULL list adds nothing, so the trait is left out.
        let empty = row(&[Some("1"), Some("l@x"), None, Some("{}"), None, None]);
        assert_eq!(
            sent(m.insert(1, &empty, Lsn(2)).unwrap()),
            json!(["l@x", {"traits": {}}])
        );
    }

    #[test]
    fn an_update_sends_what_was_added_and_what_was_removed() {
        let m = lists();
        let old = |tags: &str, skills: &str| {
            full(&[Some("1"), Some("l@x"), None, Some(tags), Some(skills), None])
        };
        let new = |tags: &str, skills: &str| {
            row(&[Some("1"), Some("l@x"), None, Some(tags), Some(skills), None])
        };
        let update = |o: OldTuple, n: Tuple| sent(m.update(1, Some(&o), &n, Lsn(3)).unwrap());
        assert_eq!(
            update(old("{a,b}", "go"), new("{a,b,c}", "go")),
            json!(["l@x", {"traits": {"tags": {"add": ["c"]}}}])
        );
        assert_eq!(
            update(old("{a,b,c}", "go"), new("{a,c}", "go")),
            json!(["l@x", {"traits": {"tags": {"remove": ["b"]}}}])
        );
        assert_eq!(
            update(old("{a,c}", "rust,go"), new("{c,d,d}", "go , python")),
            json!(["l@x", {"traits": {
                "tags": {"add": ["d"], "remove": ["a"]},
                "skills": {"add": ["python"], "remove": ["rust"]}
            }}])
        );
        // Reordering or repeating values changes nothing ConveYour holds.
        assert_eq!(
            update(old("{a,b}", "go,rust"), new("{b,a,a}", "rust, go")),
            json!("nothing")
        );
        // A list set to NULL removes everything it held.
        let to_null = row(&[Some("1"), Some("l@x"), None, None, Some("go"), None]);
        assert_eq!(
            sent(
                m.update(1, Some(&old("{a,NULL}", "go")), &to_null, Lsn(3))
                    .unwrap()
            ),
            json!(["l@x", {"traits": {"tags": {"remove": ["a"]}}}])
        );
    }

    #[test]
    fn without_the_old_row_an_update_adds_the_current_values() {
        let m = lists();
        let new = row(&[
            Some("1"),
            Some("l@x"),
            None,
            Some("{c,d}"),
            Some("go"),
            None,
        ]);
        assert_eq!(
            sent(m.update(1, None, &new, Lsn(3)).unwrap()),
            json!(["l@x", {"traits": {"tags": {"add": ["c", "d"]}, "skills": {"add": ["go"]}}}])
        );
        // An unchanged TOASTed list is not sent at all.
        let toasted = row(&[
            Some("1"),
            Some("l@x"),
            None,
            Some("\u{0}"),
            Some("go"),
            None,
        ]);
        assert_eq!(
            sent(m.update(1, None, &toasted, Lsn(3)).unwrap()),
            json!(["l@x", {"traits": {"skills": {"add": ["go"]}}}])
        );
    }

    #[test]
    fn an_update_of_unmapped_columns_only_is_nothing_when_the_old_row_is_known() {
        let m = employees("{first_name: first_name}", "");
        let old = full(&[Some("1"), Some("u@x"), Some("Uma"), None, None, Some("t1")]);
        let touched = row(&[Some("1"), Some("u@x"), Some("Uma"), None, None, Some("t2")]);
        assert_eq!(
            m.update(1, Some(&old), &touched, Lsn(4)).unwrap(),
            Outcome::Nothing
        );
        // Without the full old row it cannot tell, and sends.
        let key = OldTuple::Key(row(&[Some("1"), None, None, None, None, None]));
        for old in [None, Some(&key)] {
            assert_eq!(
                sent(m.update(1, old, &touched, Lsn(4)).unwrap()),
                json!(["u@x", {"traits": {"first_name": "Uma"}}])
            );
        }
        // A mapped column that changed is sent; so is a changed contact id.
        let renamed = row(&[Some("1"), Some("u@x"), Some("Una"), None, None, Some("t2")]);
        assert_eq!(
            sent(m.update(1, Some(&old), &renamed, Lsn(4)).unwrap()),
            json!(["u@x", {"traits": {"first_name": "Una"}}])
        );
        let moved = row(&[Some("1"), Some("v@x"), Some("Uma"), None, None, Some("t1")]);
        assert_eq!(
            sent(m.update(1, Some(&old), &moved, Lsn(4)).unwrap()),
            json!(["v@x", {"traits": {"first_name": "Uma"}}])
        );
        // NULL to a value is a change.
        let was_null = full(&[Some("1"), Some("u@x"), None, None, None, Some("t1")]);
        assert_eq!(
            sent(m.update(1, Some(&was_null), &touched, Lsn(4)).unwrap()),
            json!(["u@x", {"traits": {"first_name": "Uma"}}])
        );
    }

    #[test]
    fn nulls_are_sent_as_null_or_left_out_as_configured() {
        let new = row(&[Some("1"), Some("n@x"), None, None, None, None]);
        let send = employees("{first_name: first_name, plan: {value: gold}}", "");
        assert_eq!(
            sent(send.insert(1, &new, Lsn(5)).unwrap()),
            json!(["n@x", {"traits": {"first_name": null, "plan": "gold"}}])
        );
        let omit = employees(
            "{first_name: first_name, plan: {value: gold}}",
            "    nulls: omit\n",
        );
        assert_eq!(
            sent(omit.insert(1, &new, Lsn(5)).unwrap()),
            json!(["n@x", {"traits": {"plan": "gold"}}])
        );
    }

    const SALES: &[(&str, u32, bool)] = &[
        ("id", INT4, true),
        ("employee_email", TEXT, false),
        ("amount", NUMERIC, false),
        ("kind", TEXT, false),
    ];

    fn sales(track_extra: &str) -> Mapper {
        let tables = format!(
            "tables:\n  - table: sales\n    track:\n      id: employee_email\n      event: made_sale\n      properties: {{amount: amount}}\n{track_extra}"
        );
        let mut m = Mapper::new(&mappings(&tables), Schema::default());
        m.relation(&relation(2, "sales", SALES), Lsn(1)).unwrap();
        m
    }

    #[test]
    fn a_tracked_insert_bumps_counters_first_by_a_constant_and_by_a_column() {
        let m = sales("      increment: {sales_count: 1, career_sales: amount}\n");
        let sale = |amount: Option<&str>| row(&[Some("1"), Some("j@x"), amount, None]);
        assert_eq!(
            sent(m.insert(2, &sale(Some("1000")), Lsn(6)).unwrap()),
            json!([
                "j@x",
                {"traits": {"career_sales": {"$inc": 1000}, "sales_count": {"$inc": 1}}},
                {"event": "made_sale", "properties": {"amount": 1000}}
            ])
        );
        assert_eq!(
            sent(m.insert(2, &sale(Some("-2.5")), Lsn(6)).unwrap()),
            json!([
                "j@x",
                {"traits": {"career_sales": {"$inc": -2.5}, "sales_count": {"$inc": 1}}},
                {"event": "made_sale", "properties": {"amount": -2.5}}
            ])
        );
        // A NULL amount adds nothing to its counter; the constant still counts.
        assert_eq!(
            sent(m.insert(2, &sale(None), Lsn(6)).unwrap()),
            json!([
                "j@x",
                {"traits": {"sales_count": {"$inc": 1}}},
                {"event": "made_sale", "properties": {"amount": null}}
            ])
        );
    }

    #[test]
    fn counters_move_on_insert_only_and_a_row_without_counters_is_one_event() {
        let m = sales("      increment: {sales_count: 1}\n    operations: [insert, update]\n");
        let sale = row(&[Some("1"), Some("j@x"), Some("5"), None]);
        assert_eq!(
            sent(m.update(2, None, &sale, Lsn(7)).unwrap()),
            json!(["j@x", {"event": "made_sale", "properties": {"amount": 5}}])
        );
        let plain = sales("");
        assert_eq!(
            sent(plain.insert(2, &sale, Lsn(7)).unwrap()),
            json!(["j@x", {"event": "made_sale", "properties": {"amount": 5}}])
        );
        // Track tables count inserts only unless told otherwise.
        assert_eq!(
            plain.update(2, None, &sale, Lsn(7)).unwrap(),
            Outcome::Nothing
        );
    }

    #[test]
    fn a_delete_with_only_the_key_sends_what_the_key_holds() {
        // members: the contact id is the primary key.
        let tables = "
tables:
  - table: members
    identify: {id: email, traits: {name: name}}
    on_delete:
      track: {event: left, properties: {name: name, reason: {value: resigned}}}
  - table: employees
    identify: {id: email, traits: {first_name: first_name}}
    on_delete: {identify: {active: false}}
";
        let mut m = Mapper::new(&mappings(tables), Schema::default());
        m.relation(
            &relation(
                3,
                "members",
                &[("email", TEXT, true), ("name", TEXT, false)],
            ),
            Lsn(1),
        )
        .unwrap();
        m.relation(&relation(1, "employees", EMPLOYEES), Lsn(1))
            .unwrap();

        let key = OldTuple::Key(row(&[Some("m@x"), None]));
        assert_eq!(
            sent(m.delete(3, Some(&key), Lsn(8)).unwrap()),
            json!(["m@x", {"event": "left", "properties": {"reason": "resigned"}}])
        );
        let whole = OldTuple::Full(row(&[Some("m@x"), None]));
        assert_eq!(
            sent(m.delete(3, Some(&whole), Lsn(8)).unwrap()),
            json!(["m@x", {"event": "left", "properties": {"name": null, "reason": "resigned"}}])
        );

        // employees: the contact id is not in the key; skipped, not fatal.
        let key = OldTuple::Key(row(&[Some("1"), None, None, None, None, None]));
        assert_eq!(
            sent(m.delete(1, Some(&key), Lsn(8)).unwrap()),
            json!("skip email")
        );
        let whole = full(&[Some("1"), Some("e@x"), Some("E"), None, None, None]);
        assert_eq!(
            sent(m.delete(1, Some(&whole), Lsn(8)).unwrap()),
            json!(["e@x", {"traits": {"active": false}}])
        );
        assert_eq!(
            sent(m.delete(1, None, Lsn(8)).unwrap()),
            json!("skip email")
        );
        // With full identity a NULL contact id is still a broken row.
        let no_id = full(&[Some("1"), None, Some("E"), None, None, None]);
        assert!(m.delete(1, Some(&no_id), Lsn(8)).is_err());
    }

    #[test]
    fn observe_keeps_the_lookup_cache_in_step_with_the_related_table() {
        let tables = "
tables:
  - table: employees
    identify: {id: email, traits: {first_name: first_name}}
  - table: sales
    track:
      id: {from: employees, key: employee_id, column: email}
      event: made_sale
";
        let schema = Schema {
            lookups: vec![LookupTarget {
                from: TableName::parse("employees").unwrap(),
                references: "id".into(),
                column: "email".into(),
                key_type: "integer".into(),
            }],
            ..Schema::default()
        };
        let mut m = Mapper::new(&mappings(tables), schema);
        m.relation(&relation(1, "employees", EMPLOYEES), Lsn(1))
            .unwrap();
        m.relation(
            &relation(
                2,
                "sales",
                &[("id", INT4, true), ("employee_id", INT4, false)],
            ),
            Lsn(1),
        )
        .unwrap();
        let emp = |id: &str, email: Option<&str>| row(&[Some(id), email, None, None, None, None]);
        let set = |key: &str, contact: &str| CacheChange::Set {
            lookup: 0,
            key: key.into(),
            contact: contact.into(),
        };
        let forget = |key: &str| CacheChange::Forget {
            lookup: 0,
            key: key.into(),
        };
        let observe = |old: Option<OldTuple>, new: Option<Tuple>| {
            let mut out = Vec::new();
            m.observe(1, old.as_ref(), new.as_ref(), &mut out);
            out
        };

        assert_eq!(
            observe(None, Some(emp("7", Some("a@x")))),
            vec![set("7", "a@x")]
        );
        // An email change (no old row: the key did not change).
        assert_eq!(
            observe(None, Some(emp("7", Some("b@x")))),
            vec![set("7", "b@x")]
        );
        // A key change forgets the old key.
        assert_eq!(
            observe(
                Some(OldTuple::Key(emp("7", None))),
                Some(emp("8", Some("b@x")))
            ),
            vec![forget("7"), set("8", "b@x")]
        );
        // The same key in a full old row is not forgotten.
        assert_eq!(
            observe(
                Some(OldTuple::Full(emp("8", Some("b@x")))),
                Some(emp("8", Some("c@x")))
            ),
            vec![set("8", "c@x")]
        );
        // An email set to NULL or empty resolves to nothing.
        assert_eq!(observe(None, Some(emp("8", None))), vec![forget("8")]);
        assert_eq!(observe(None, Some(emp("8", Some("")))), vec![forget("8")]);
        // An unchanged TOASTed email leaves the cached one alone.
        assert_eq!(observe(None, Some(emp("8", Some("\u{0}")))), vec![]);
        // A delete forgets.
        assert_eq!(
            observe(Some(OldTuple::Key(emp("8", None))), None),
            vec![forget("8")]
        );
        // Other tables change no cache.
        let mut out = Vec::new();
        m.observe(2, None, Some(&row(&[Some("1"), Some("7")])), &mut out);
        assert!(out.is_empty());

        // A sale names its lookup and key; a NULL key is skipped.
        assert_eq!(
            sent(m.insert(2, &row(&[Some("1"), Some("7")]), Lsn(9)).unwrap()),
            json!([{"lookup": 0, "key": "7"}, {"event": "made_sale", "properties": {}}])
        );
        assert_eq!(
            sent(m.insert(2, &row(&[Some("1"), None]), Lsn(9)).unwrap()),
            json!("skip employee_id")
        );
    }

    #[test]
    fn a_dropped_or_retyped_mapped_column_is_an_error_naming_table_column_and_lsn() {
        let tables = "tables:\n  - table: employees\n    identify: {id: email, traits: {first_name: first_name}}\n";
        let mut schema = Schema::default();
        schema.columns.insert(
            TableName::parse("employees").unwrap(),
            EMPLOYEES
                .iter()
                .map(|(n, t, _)| ((*n).to_owned(), *t))
                .collect(),
        );
        let mut m = Mapper::new(&mappings(tables), schema);
        let dropped: Vec<_> = EMPLOYEES
            .iter()
            .copied()
            .filter(|(n, _, _)| *n != "first_name")
            .collect();
        let e = m
            .relation(&relation(1, "employees", &dropped), Lsn(0x1_0000_00A0))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("table public.employees, column first_name, at LSN 1/A0:")
                && e.contains("tables[0].identify.traits.first_name"),
            "{e}"
        );
        let retyped: Vec<_> = EMPLOYEES
            .iter()
            .map(|(n, t, k)| (*n, if *n == "first_name" { 1043 } else { *t }, *k))
            .collect();
        let e = m
            .relation(&relation(1, "employees", &retyped), Lsn(0xB0))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("column first_name") && e.contains("changed type"),
            "{e}"
        );
        // An added or renamed unmapped column is fine.
        let mut added: Vec<_> = EMPLOYEES
            .iter()
            .map(|(n, t, k)| (if *n == "skills" { "talents" } else { *n }, *t, *k))
            .collect();
        added.push(("note", TEXT, false));
        m.relation(&relation(1, "employees", &added), Lsn(0xC0))
            .unwrap();
    }

    #[test]
    fn a_rows_values_are_a_row_fault_and_the_tables_shape_is_not() {
        let tables = "tables:\n  - table: employees\n    identify:\n      id: email\n      traits: {first_name: first_name}\n";
        let schema = Schema {
            keys: [(
                TableName::parse("employees").unwrap(),
                vec!["id".to_owned()],
            )]
            .into(),
            ..Schema::default()
        };
        let mut m = Mapper::new(&mappings(tables), schema);
        m.relation(&relation(1, "employees", EMPLOYEES), Lsn(1))
            .unwrap();
        let fields = |email: Option<&str>| row(&[Some("7"), email, Some("Ada"), None, None, None]);
        for email in [None, Some("")] {
            let e = m.insert(1, &fields(email), Lsn(2)).unwrap_err();
            assert!(e.is_row_fault(), "{e}");
            assert_eq!(e.column.as_deref(), Some("email"));
        }
        // The key goes with the row: on an identify action, and for a row
        // set aside.
        assert_eq!(
            m.key_of(1, &fields(None)),
            Some(RowKey {
                columns: Arc::from(vec!["id".to_owned()]),
                values: vec![Some("7".to_owned())]
            })
        );
        let Outcome::Send(mapped) = m.insert(1, &fields(Some("a@x.test")), Lsn(3)).unwrap() else {
            panic!("sent");
        };
        let action = mapped
            .into_actions("a@x.test".into(), Lsn(3))
            .next()
            .unwrap();
        assert_eq!(action.key.unwrap().values, vec![Some("7".to_owned())]);
        // A contact id missing from the WAL, or a row shorter than its
        // relation, is the table's setup, not the row.
        let toast = row(&[Some("7"), Some("\u{0}"), Some("Ada")]);
        assert!(!m
            .update(1, None, &toast, Lsn(4))
            .unwrap_err()
            .is_row_fault());
        let short = row(&[Some("7"), Some("a@x.test")]);
        assert!(!m.insert(1, &short, Lsn(5)).unwrap_err().is_row_fault());
        // A mapped column dropped: the shape.
        let dropped: Vec<_> = EMPLOYEES
            .iter()
            .copied()
            .filter(|(n, _, _)| *n != "first_name")
            .collect();
        let e = m
            .relation(&relation(1, "employees", &dropped), Lsn(6))
            .unwrap_err();
        assert!(!e.is_row_fault(), "{e}");
    }
}
