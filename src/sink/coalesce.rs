//! Folding a contact's later identify into an earlier one still waiting:
//! traits merged, list operations and counters combined, as ConveYour
//! would apply them one after the other.

use serde_json::{Map, Value};

/// The traits of two identifies of one contact folded into one entry with
/// the same effect as sending both in order, or None when they do not fold:
/// - a plain value replaces whatever came before;
/// - `{"$inc": b}` after `{"$inc": a}` is `{"$inc": a+b}` (integers only,
///   so no precision is lost), after a plain integer `v` it is `v+b`;
/// - list operations combine: `{add: (A1 − R2) ∪ A2, remove: (R1 − A2) ∪ R2}`,
///   disjoint, so the result does not depend on whether ConveYour removes
///   or adds first.
pub(super) fn fold_traits(
    earlier: &Map<String, Value>,
    later: &Map<String, Value>,
) -> Option<Map<String, Value>> {
    let mut out = earlier.clone();
    for (key, next) in later {
        let folded = match out.get(key) {
            None => Some(next.clone()),
            Some(prev) => fold_value(prev, next)?,
        };
        match folded {
            Some(v) => out.insert(key.clone(), v),
            None => out.remove(key),
        };
    }
    Some(out)
}

/// One trait value with the effect of `prev` then `next`: Some(None) when
/// they cancel out, None when they do not fold.
pub(super) fn fold_value(prev: &Value, next: &Value) -> Option<Option<Value>> {
    let Value::Object(op) = next else {
        return Some(Some(next.clone()));
    };
    if let Some(by) = op.get("$inc") {
        let by = by.as_i64()?;
        return Some(Some(match prev {
            Value::Object(p) => {
                serde_json::json!({"$inc": p.get("$inc")?.as_i64()?.checked_add(by)?})
            }
            Value::Number(n) => Value::from(n.as_i64()?.checked_add(by)?),
            _ => return None,
        }));
    }
    let Value::Object(p) = prev else { return None };
    if p.contains_key("$inc") {
        return None;
    }
    let list = |m: &Map<String, Value>, k: &str| -> Vec<Value> {
        m.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let (a2, r2) = (list(op, "add"), list(op, "remove"));
    let mut add: Vec<Value> = list(p, "add")
        .into_iter()
        .filter(|v| !r2.contains(v))
        .collect();
    let mut remove: Vec<Value> = list(p, "remove")
        .into_iter()
        .filter(|v| !a2.contains(v))
        .collect();
    for v in a2 {
        if !add.contains(&v) {
            add.push(v);
        }
    }
    for v in r2 {
        if !remove.contains(&v) {
            remove.push(v);
        }
    }
    let mut m = Map::new();
    if !add.is_empty() {
        m.insert("add".into(), Value::Array(add));
    }
    if !remove.is_empty() {
        m.insert("remove".into(), Value::Array(remove));
    }
    Some((!m.is_empty()).then_some(Value::Object(m)))
}
