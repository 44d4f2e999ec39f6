//! From `tables:` as written to [`TableMapping`]: every check that needs
//! no database.

use std::collections::BTreeMap;

use serde_json::Value;

use super::super::{err, ConfigError, TableName, MAX_EVENT_PROPERTIES};
use super::mapping::{
    ContactSource, EventName, FieldMapping, FieldSource, IncrementBy, Lookup, MappingKind,
    OnDelete, Operations, TableMapping,
};
use super::{
    EventConfig, FieldConfig, IdConfig, IncrementConfig, OnDeleteConfig, Operation, SnapshotPolicy,
    TableConfig, TimeFormat,
};
/// Validates one `tables[i]` entry (without the database). Every error
/// past the table's name names the table too, so it can be found without
/// counting entries.
pub(in crate::config) fn validate_table(
    key: &str,
    t: &TableConfig,
) -> Result<TableMapping, ConfigError> {
    let table = TableName::parse(&t.table).ok_or_else(|| {
        err(
            format!("{key}.table"),
            format!("`{}` is not a table name of the form schema.table", t.table),
        )
    })?;
    let name = table.to_string();
    validate_mapping(key, t, table).map_err(|mut e| {
        e.problem = format!("{} (table {name})", e.problem);
        e
    })
}

fn validate_mapping(
    key: &str,
    t: &TableConfig,
    table: TableName,
) -> Result<TableMapping, ConfigError> {
    let (section, id) = match (&t.identify, &t.track) {
        (Some(m), None) => ("identify", &m.id),
        (None, Some(m)) => ("track", &m.id),
        (Some(_), Some(_)) => {
            return Err(err(
                key,
                "give either identify or track, not both; map the table twice under different roles is not supported",
            ))
        }
        (None, None) => return Err(err(key, "missing identify or track: say what the rows become")),
    };
    let base = format!("{key}.{section}");
    let contact = match id {
        IdConfig::Column(c) => {
            check_column(&format!("{base}.id"), c)?;
            ContactSource::Column(c.clone())
        }
        IdConfig::Lookup(l) => {
            let from = TableName::parse(&l.from).ok_or_else(|| {
                err(
                    format!("{base}.id.from"),
                    format!("`{}` is not a table name of the form schema.table", l.from),
                )
            })?;
            check_column(&format!("{base}.id.key"), &l.key)?;
            check_column(&format!("{base}.id.column"), &l.column)?;
            if let Some(r) = &l.references {
                check_column(&format!("{base}.id.references"), r)?;
            }
            ContactSource::Lookup(Lookup {
                from,
                key: l.key.clone(),
                column: l.column.clone(),
                references: l.references.clone(),
            })
        }
    };

    let date_format = time_format(&format!("{key}.date_format"), t.date_format.as_deref())?;
    let timestamp_format = time_format(
        &format!("{key}.timestamp_format"),
        t.timestamp_format.as_deref(),
    )?;

    let (kind, fields) = match (&t.identify, &t.track) {
        (Some(m), _) => {
            let fields = field_mappings(&format!("{base}.traits"), &m.traits, true)?;
            (MappingKind::Identify, fields)
        }
        (_, Some(m)) => {
            let event = match &m.event {
                EventConfig::Name(name) if name.trim().is_empty() => {
                    return Err(err(format!("{base}.event"), "must not be empty"))
                }
                EventConfig::Name(name) => EventName::Fixed(name.clone()),
                EventConfig::Column(c) => {
                    check_column(&format!("{base}.event.column"), &c.column)?;
                    EventName::Column(c.column.clone())
                }
            };
            let fields = field_mappings(&format!("{base}.properties"), &m.properties, false)?;
            if fields.len() > MAX_EVENT_PROPERTIES {
                return Err(err(
                    format!("{base}.properties"),
                    format!(
                        "{} properties (constants included), but ConveYour blocks events with more than {MAX_EVENT_PROPERTIES}",
                        fields.len()
                    ),
                ));
            }
            let mut increments = Vec::new();
            for (name, by) in &m.increment {
                let k = format!("{base}.increment.{name}");
                check_key(&k, name)?;
                let by = match by {
                    IncrementConfig::By(n) => IncrementBy::Const(n.clone()),
                    IncrementConfig::Column(c) => {
                        check_column(&k, c)?;
                        IncrementBy::Column(c.clone())
                    }
                };
                increments.push((name.clone(), by));
            }
            (MappingKind::Track { event, increments }, fields)
        }
        _ => unreachable!("checked above"),
    };

    let identify = matches!(kind, MappingKind::Identify);
    let operations = match &t.operations {
        None => Operations {
            insert: true,
            update: identify,
            delete: identify,
        },
        Some(list) => {
            if list.is_empty() {
                return Err(err(
                    format!("{key}.operations"),
                    "list at least one of insert, update, delete",
                ));
            }
            Operations {
                insert: list.contains(&Operation::Insert),
                update: list.contains(&Operation::Update),
                delete: list.contains(&Operation::Delete),
            }
        }
    };

    let on_delete = match &t.on_delete {
        None => OnDelete::Ignore,
        Some(OnDeleteConfig::Keyword(k)) if k == "ignore" => OnDelete::Ignore,
        Some(OnDeleteConfig::Keyword(k)) => {
            return Err(err(
                format!("{key}.on_delete"),
                format!(
                "`{k}`: use ignore, {{identify: {{trait: value}}}} or {{track: {{event: name}}}}"
            ),
            ))
        }
        Some(OnDeleteConfig::Action(a)) => match (&a.identify, &a.track) {
            (Some(traits), None) => {
                if traits.is_empty() {
                    return Err(err(
                        format!("{key}.on_delete.identify"),
                        "name at least one trait to set, e.g. {active: false}",
                    ));
                }
                for name in traits.keys() {
                    check_key(&format!("{key}.on_delete.identify.{name}"), name)?;
                }
                OnDelete::Identify(traits.clone().into_iter().collect())
            }
            (None, Some(track)) => {
                if track.event.trim().is_empty() {
                    return Err(err(
                        format!("{key}.on_delete.track.event"),
                        "must not be empty",
                    ));
                }
                let properties = field_mappings(
                    &format!("{key}.on_delete.track.properties"),
                    &track.properties,
                    false,
                )?;
                if properties.len() > MAX_EVENT_PROPERTIES {
                    return Err(err(
                        format!("{key}.on_delete.track.properties"),
                        format!(
                            "{} properties, but ConveYour blocks events with more than {MAX_EVENT_PROPERTIES}",
                            properties.len()
                        ),
                    ));
                }
                OnDelete::Track {
                    event: track.event.clone(),
                    properties,
                }
            }
            _ => {
                return Err(err(
                    format!("{key}.on_delete"),
                    "give exactly one of identify or track",
                ))
            }
        },
    };
    if on_delete != OnDelete::Ignore && !operations.delete {
        return Err(err(
            format!("{key}.on_delete"),
            "deletes are not among this table's operations; add delete to operations",
        ));
    }

    let row_filter = match &t.row_filter {
        None => None,
        Some(f) => Some(check_row_filter(&format!("{key}.where"), f)?),
    };

    Ok(TableMapping {
        table,
        key: key.to_owned(),
        contact,
        kind,
        fields,
        operations,
        on_delete,
        row_filter,
        nulls: t.nulls,
        date_format,
        timestamp_format,
        snapshot: t.snapshot.unwrap_or(if identify {
            SnapshotPolicy::Initial
        } else {
            SnapshotPolicy::Never
        }),
    })
}

fn time_format(field: &str, text: Option<&str>) -> Result<TimeFormat, ConfigError> {
    match text {
        None => Ok(TimeFormat::Iso8601),
        Some(t) => TimeFormat::parse(t).map_err(|p| err(field, p)),
    }
}

fn field_mappings(
    base: &str,
    specs: &BTreeMap<String, FieldConfig>,
    lists_allowed: bool,
) -> Result<Vec<FieldMapping>, ConfigError> {
    let mut out = Vec::with_capacity(specs.len());
    for (name, spec) in specs {
        let k = format!("{base}.{name}");
        check_key(&k, name)?;
        let source = match spec {
            FieldConfig::Column(c) => {
                check_column(&k, c)?;
                FieldSource::Column {
                    column: c.clone(),
                    format: None,
                }
            }
            FieldConfig::Detailed(d) => {
                let given = [d.column.is_some(), d.list.is_some(), d.value.is_some()]
                    .iter()
                    .filter(|g| **g)
                    .count();
                if given != 1 {
                    let mut what = Vec::new();
                    if let Some(c) = &d.column {
                        what.push(format!("column `{c}`"));
                    }
                    if let Some(c) = &d.list {
                        what.push(format!("list `{c}`"));
                    }
                    if d.value.is_some() {
                        what.push("value".to_owned());
                    }
                    let found = if what.is_empty() {
                        "none".to_owned()
                    } else {
                        what.join(" and ")
                    };
                    return Err(err(
                        &k,
                        format!("give exactly one of column, list or value, not {found}"),
                    ));
                }
                if d.delimiter.is_some() && d.list.is_none() {
                    return Err(err(
                        format!("{k}.delimiter"),
                        "only a list field takes a delimiter",
                    ));
                }
                if d.format.is_some() && d.column.is_none() {
                    return Err(err(
                        format!("{k}.format"),
                        "only a column field takes a format",
                    ));
                }
                if let Some(c) = &d.column {
                    check_column(&k, c)?;
                    let format = match &d.format {
                        None => None,
                        Some(f) => {
                            Some(TimeFormat::parse(f).map_err(|p| err(format!("{k}.format"), p))?)
                        }
                    };
                    FieldSource::Column {
                        column: c.clone(),
                        format,
                    }
                } else if let Some(c) = &d.list {
                    if !lists_allowed {
                        return Err(err(
                            &k,
                            "list operations are for identify traits; an event property takes the array as it is (use column)",
                        ));
                    }
                    check_column(&k, c)?;
                    if d.delimiter.as_deref() == Some("") {
                        return Err(err(format!("{k}.delimiter"), "must not be empty"));
                    }
                    FieldSource::List {
                        column: c.clone(),
                        delimiter: d.delimiter.clone(),
                    }
                } else {
                    let v = d.value.clone().unwrap_or_default();
                    if let Value::Object(_) = v {
                        if lists_allowed {
                            // An object trait is a list operation or a
                            // counter to ConveYour; let it through only as
                            // one of those.
                            if !is_trait_operation(&v) {
                                return Err(err(
                                    format!("{k}.value"),
                                    "an object value must be a list operation {add: [...], remove: [...]} or {$inc: n}",
                                ));
                            }
                        } else {
                            return Err(err(
                                format!("{k}.value"),
                                "an event property must be a plain value or array, not an object",
                            ));
                        }
                    }
                    FieldSource::Const(v)
                }
            }
        };
        out.push(FieldMapping {
            name: name.clone(),
            source,
        });
    }
    Ok(out)
}

/// Whether a JSON object is one ConveYour reads as a trait operation.
fn is_trait_operation(v: &Value) -> bool {
    let Value::Object(op) = v else { return false };
    if op.len() == 1 {
        if let Some(n) = op.get("$inc") {
            return n.is_number();
        }
    }
    !op.is_empty()
        && op
            .iter()
            .all(|(k, v)| (k == "add" || k == "remove") && v.is_array())
}

/// What can be told of a row filter without a server: Postgres parses and
/// checks it for real when the publication is created or altered (and
/// `check` asks it first), but some mistakes are plain from the text.
/// Postgres allows only a single expression over the table's own columns,
/// with immutable built-in functions and operators: no subqueries, no
/// statement separators, no user-defined functions.
fn check_row_filter(field: &str, filter: &str) -> Result<String, ConfigError> {
    let f = filter.trim();
    if f.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    // Walk the text outside string literals and quoted identifiers.
    let mut depth: i32 = 0;
    let mut outside = String::with_capacity(f.len());
    let mut chars = f.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let mut closed = false;
                while let Some(d) = chars.next() {
                    if d == c {
                        if chars.peek() == Some(&c) {
                            chars.next();
                            continue;
                        }
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    return Err(err(field, format!("unterminated {c}-quoted text")));
                }
                outside.push(' ');
            }
            '(' => {
                depth += 1;
                outside.push(c);
            }
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(err(field, "a ) without its ("));
                }
                outside.push(c);
            }
            ';' => {
                return Err(err(
                    field,
                    "a row filter is one expression; `;` is not allowed",
                ))
            }
            _ => outside.push(c.to_ascii_lowercase()),
        }
    }
    if depth != 0 {
        return Err(err(field, "a ( without its )"));
    }
    let words: Vec<&str> = outside
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    if words.contains(&"select") {
        return Err(err(
            field,
            "Postgres does not allow subqueries in a publication row filter",
        ));
    }
    Ok(f.to_owned())
}

pub(in crate::config) fn check_column(field: &str, column: &str) -> Result<(), ConfigError> {
    if column.is_empty() || column.len() > 63 {
        return Err(err(field, "must name a column (1 to 63 characters)"));
    }
    Ok(())
}

pub(in crate::config) fn check_key(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(err(field, "the name must not be empty"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::{ColumnRole, Config, ConfigError};

    fn validate(tables: &str) -> Result<Vec<TableMapping>, ConfigError> {
        let yaml = format!(
            "postgres:\n  url: postgres://u:p@127.0.0.1:5432/app\n\
             conveyour:\n  url: https://acme.conveyour.com\n  appkey: a\n  token: t\n{tables}"
        );
        Ok(Config::from_yaml(&yaml)?.validate(&|_| None)?.tables)
    }

    fn refused(tables: &str) -> String {
        validate(tables)
            .expect_err("the mapping should be refused")
            .to_string()
    }

    const SALES: &str = "
tables:
  - table: public.sales
    track:
      id: employee_email
      event: made_sale
";

    #[test]
    fn a_null_constant_is_a_value_not_a_missing_one() {
        let m = validate(
            "
tables:
  - table: people
    identify: {id: email, traits: {manager: {value: null}}}
",
        )
        .unwrap();
        assert_eq!(
            m[0].fields[0].source,
            FieldSource::Const(Value::Null),
            "{:?}",
            m[0].fields
        );
    }

    #[test]
    fn time_formats_parse_or_say_what_is_allowed() {
        assert_eq!(TimeFormat::parse("iso8601"), Ok(TimeFormat::Iso8601));
        assert_eq!(TimeFormat::parse("unix"), Ok(TimeFormat::Unix));
        assert_eq!(TimeFormat::parse("unix_ms"), Ok(TimeFormat::UnixMs));
        assert_eq!(
            TimeFormat::parse("%m/%d/%Y %%"),
            Ok(TimeFormat::Pattern("%m/%d/%Y %%".into()))
        );
        assert!(TimeFormat::parse("%Q").unwrap_err().contains("`%Q`"));
        assert!(TimeFormat::parse("%Y%").unwrap_err().contains("lone %"));
        assert!(TimeFormat::parse("epoch").unwrap_err().contains("`epoch`"));
    }

    #[test]
    fn a_field_takes_exactly_one_source_and_errors_name_key_table_and_column() {
        let e = refused(&format!(
            "{SALES}      properties: {{amount: {{column: amount, value: 5}}}}\n"
        ));
        assert!(
            e.contains("tables[0].track.properties.amount")
                && e.contains("not column `amount` and value")
                && e.contains("(table public.sales)"),
            "{e}"
        );
        let e = refused(&format!("{SALES}      properties: {{amount: {{}}}}\n"));
        assert!(e.contains("not none"), "{e}");
        let e = refused(&format!(
            "{SALES}      properties: {{amount: {{column: amount, delimiter: \",\"}}}}\n"
        ));
        assert!(e.contains("properties.amount.delimiter"), "{e}");
        let e = refused(&format!(
            "{SALES}      properties: {{amount: {{value: 1, format: unix}}}}\n"
        ));
        assert!(e.contains("properties.amount.format"), "{e}");
        let e = refused(&format!(
            "{SALES}      properties: {{sold: {{column: sold_at, format: \"%Q\"}}}}\n"
        ));
        assert!(
            e.contains("properties.sold.format") && e.contains("%Q"),
            "{e}"
        );
        // Lists are trait operations, not event properties.
        let e = refused(&format!(
            "{SALES}      properties: {{tags: {{list: tags}}}}\n"
        ));
        assert!(
            e.contains("properties.tags") && e.contains("identify traits"),
            "{e}"
        );
        // A constant object must be a trait operation, and only on a trait.
        let e = refused(&format!(
            "{SALES}      properties: {{meta: {{value: {{a: 1}}}}}}\n"
        ));
        assert!(e.contains("properties.meta.value"), "{e}");
        let ok = validate(
            "tables:\n  - table: e\n    identify:\n      id: email\n      traits: {seen: {value: {$inc: 1}}, t: {value: {add: [x]}}}\n",
        )
        .unwrap();
        assert_eq!(
            ok[0].fields[0].source,
            FieldSource::Const(json!({"$inc": 1}))
        );
        let e = refused(
            "tables:\n  - table: e\n    identify:\n      id: email\n      traits: {t: {value: {add: x}}}\n",
        );
        assert!(e.contains("traits.t.value"), "{e}");
    }

    #[test]
    fn sixteen_properties_fail_counting_constants_and_fifteen_pass() {
        let props = |n: usize| {
            let mut p: Vec<String> = (1..n).map(|i| format!("p{i}: amount")).collect();
            p.push("c: {value: 1}".into());
            format!("{SALES}      properties: {{{}}}\n", p.join(", "))
        };
        assert_eq!(validate(&props(15)).unwrap()[0].fields.len(), 15);
        let e = refused(&props(16));
        assert!(
            e.contains("tables[0].track.properties: 16 properties (constants included)")
                && e.contains("public.sales"),
            "{e}"
        );
        let deleted: Vec<String> = (1..=16).map(|i| format!("p{i}: amount")).collect();
        let e = refused(&format!(
            "tables:\n  - table: e\n    identify: {{id: email}}\n    on_delete: {{track: {{event: left, properties: {{{}}}}}}}\n",
            deleted.join(", ")
        ));
        assert!(e.contains("tables[0].on_delete.track.properties"), "{e}");
    }

    #[test]
    fn operations_default_by_role_and_on_delete_needs_deletes() {
        let m = validate(&format!(
            "{SALES}  - table: employees\n    identify: {{id: email}}\n"
        ))
        .unwrap();
        assert_eq!(
            m[0].operations,
            Operations {
                insert: true,
                update: false,
                delete: false
            }
        );
        assert_eq!(
            m[1].operations,
            Operations {
                insert: true,
                update: true,
                delete: true
            }
        );
        let e = refused(
            "tables:\n  - table: e\n    identify: {id: email}\n    operations: [insert, update]\n    on_delete: {identify: {active: false}}\n",
        );
        assert!(
            e.contains("tables[0].on_delete") && e.contains("add delete to operations"),
            "{e}"
        );
        let e = refused("tables:\n  - table: e\n    identify: {id: email}\n    operations: []\n");
        assert!(e.contains("tables[0].operations"), "{e}");
        let e =
            refused("tables:\n  - table: e\n    identify: {id: email}\n    on_delete: forget\n");
        assert!(
            e.contains("tables[0].on_delete") && e.contains("`forget`"),
            "{e}"
        );
        let e = refused(
            "tables:\n  - table: e\n    identify: {id: email}\n    on_delete: {identify: {active: false}, track: {event: x}}\n",
        );
        assert!(e.contains("exactly one of identify or track"), "{e}");
    }

    #[test]
    fn columns_lists_every_column_read_with_its_key_and_role() {
        let m = validate(
            "
tables:
  - table: sales
    track:
      id: {from: employees, key: employee_id, column: email}
      event: {column: kind}
      properties: {amount: amount, channel: {value: web}, day: {column: sold_at, format: unix}}
      increment: {sales_count: 1, career_sales: amount}
    operations: [insert, delete]
    on_delete: {track: {event: refunded, properties: {amount: amount}}}
",
        )
        .unwrap();
        let uses: Vec<(String, String, ColumnRole)> = m[0]
            .columns()
            .into_iter()
            .map(|u| (u.key, u.column, u.role))
            .collect();
        let k = |s: &str| format!("tables[0].{s}");
        assert_eq!(
            uses,
            vec![
                (k("track.id.key"), "employee_id".into(), ColumnRole::Text),
                (
                    k("track.properties.amount"),
                    "amount".into(),
                    ColumnRole::Value
                ),
                (
                    k("track.properties.day"),
                    "sold_at".into(),
                    ColumnRole::Value
                ),
                (k("track.event.column"), "kind".into(), ColumnRole::Text),
                (
                    k("track.increment.career_sales"),
                    "amount".into(),
                    ColumnRole::Number
                ),
                (
                    k("on_delete.track.properties.amount"),
                    "amount".into(),
                    ColumnRole::Value
                ),
            ]
        );
        let lists = validate(
            "tables:\n  - table: e\n    identify:\n      id: email\n      traits: {tags: {list: tags}, skills: {list: skills, delimiter: \";\"}}\n",
        )
        .unwrap();
        let roles: Vec<ColumnRole> = lists[0].columns().into_iter().map(|u| u.role).collect();
        assert_eq!(
            roles,
            vec![
                ColumnRole::Text,
                ColumnRole::List { delimited: true },
                ColumnRole::List { delimited: false }
            ]
        );
    }

    #[test]
    fn full_identity_is_asked_for_only_where_it_changes_what_is_sent() {
        let m = validate(&format!(
            "{SALES}  - table: employees\n    identify: {{id: email, traits: {{tags: {{list: tags}}}}}}\n    on_delete: {{identify: {{active: false}}}}\n  - table: plain\n    identify: {{id: email}}\n    operations: [insert]\n"
        ))
        .unwrap();
        // Track tables default to inserts: nothing to gain.
        assert!(m[0].needs_full_identity().is_empty());
        let why = m[1].needs_full_identity().join("\n");
        assert!(
            why.contains("updates that change no mapped column")
                && why.contains("list trait tags")
                && why.contains("a delete carries only the replica identity's columns"),
            "{why}"
        );
        assert!(m[2].needs_full_identity().is_empty());
    }
}
