//! Building one row's actions from its plan: the contact, each field's
//! JSON, list changes, increments.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::plan::{
    error_at, ActPlan, ContactPlan, EventPlan, Field, FieldPlan, IncrementPlan, Plan,
};
use super::time::write_formatted;
use super::{ActionBody, ContactRef, Fields, MapError, Mapped, Op, Outcome};
use crate::config::NullPolicy;
use crate::decode::value::{to_json, ValueKind};
use crate::decode::{Datum, Tuple};
use crate::lsn::Lsn;

/// Whether column `i` differs between the old and new row.
pub(super) fn changed(old: &Tuple, new: &Tuple, i: usize) -> bool {
    match (old.0.get(i), new.0.get(i)) {
        // Postgres resends a large value only when it changed.
        (_, Some(Datum::UnchangedToast)) => false,
        (Some(a), Some(b)) => a != b,
        _ => true,
    }
}

/// The contact of a row: Ok(Ok) known or to look up; Ok(Err) the row
/// cannot be sent (as a Skip outcome); Err a broken row.
pub(super) fn contact_of(
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
pub(super) fn write_field(
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
                Some(Datum::Text(bytes)) => write_formatted(kind, bytes, format, out)
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
pub(super) fn list_change(
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
pub(super) fn dedup<'a>(values: impl Iterator<Item = &'a Value>) -> Vec<Value> {
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
pub(super) fn list_values(
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
pub(super) fn build(
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
