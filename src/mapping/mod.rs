//! Rows to ConveYour actions: which tables are mapped, which columns feed
//! the contact id, traits and properties, and how each value becomes JSON.
//!
//! Pure: no I/O, so every rule is unit-tested on its own. A contact id that
//! lives in another table comes out as [`ContactRef::Lookup`]; the caller
//! resolves it (`source::lookup`'s resolver) and keeps its cache fresh from the
//! related table's own changes ([`Mapper::observe`]).

use std::fmt;
use std::sync::Arc;

use crate::decode::{Datum, Tuple};
use crate::lsn::Lsn;

mod fields;
mod mapper;
mod plan;
mod row;
mod time;

pub use mapper::Mapper;

pub use crate::source::{CacheChange, ContactRef, LookupTarget, Schema};
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

/// The row operation being mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
}

/// The text of column `i`, when it is sent as text (not NULL, unchanged
/// TOAST or binary).
fn text_at(t: &Tuple, i: usize) -> Option<String> {
    match t.0.get(i) {
        Some(Datum::Text(b)) => std::str::from_utf8(b).ok().map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use serde_json::Value;

    use super::*;
    use crate::config::{Config, TableMapping, TableName};
    use crate::decode::{Column, Datum, OldTuple, Relation, Tuple};

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
