//! Column values in Postgres's text output format, turned into JSON.
//!
//! A column's [`ValueKind`] is chosen once from its type
//! ([`ValueKind::from_builtin_oid`], or the catalog for domains, enums and
//! user-defined arrays); [`to_json`] then converts each value. The text must
//! be valid UTF-8, and is read as the server prints it with `DateStyle = ISO`
//! and the session time zone UTC (the connector's session settings).
//!
//! | Kind | Types (OID) | JSON |
//! |------|-------------|------|
//! | `Bool` | bool (16) | `t` → `true`, `f` → `false`; anything else is an error |
//! | `Int` | int2 (21), int4 (23), int8 (20), oid (26) | integer; unparsable or out of i64 range is an error |
//! | `Float` | float4 (700), float8 (701) | number; `NaN`, `Infinity`, `-Infinity` → those strings |
//! | `Numeric` | numeric (1700) | integer when integral and within i64 (`1000.00` → `1000`); otherwise a number when the nearest f64, printed shortest, is exactly the same decimal (`1000.50` → `1000.5`, `0.1` → `0.1`); otherwise the string as sent (`12345678901234567890.123`, `NaN`, `Infinity`, `-Infinity`) |
//! | `Text` | text (25), varchar (1043), bpchar (1042, padding kept), name (19), uuid (2950), a few other built-ins printed as strings (bytea, time, timetz, interval, inet, cidr, macaddr, macaddr8, bit, varbit, money, xml, char), and anything else | the string as sent |
//! | `Date` | date (1082) | the string as sent (`2024-01-31`, `infinity`, `2024-01-31 BC`) |
//! | `Timestamp` | timestamp (1114) | the space becomes `T`: `2024-01-31 10:00:00.123` → `2024-01-31T10:00:00.123`; `infinity`, `-infinity` and BC values (ending ` BC`) stay as sent |
//! | `TimestampTz` | timestamptz (1184) | the space becomes `T` and the offset is ISO 8601: `+00` → `Z`, `-08` → `-08:00`, `+05:30` and `+05:30:15` kept; `infinity`, `-infinity` and BC values stay as sent |
//! | `Json` | json (114), jsonb (3802) | parsed; scalars and arrays embedded as JSON, an object as its JSON text (a string, since ConveYour reads object-valued traits as list operations or counters); valid JSON that serde_json cannot represent (a number out of f64 range) as its text; invalid JSON is an error |
//! | `Array(k)` | one-dimensional arrays of the above: bool[] (1000), int2[] (1005), int4[] (1007), int8[] (1016), oid[] (1028), float4[] (1021), float8[] (1022), numeric[] (1231), text[] (1009), varchar[] (1015), bpchar[] (1014), name[] (1003), uuid[] (2951), date[] (1182), timestamp[] (1115), timestamptz[] (1185), json[] (199), jsonb[] (3807), and arrays of the other Text built-ins | a JSON array, each element converted by `k`; unquoted `NULL` → `null` (quoted `"NULL"` is the string); `{}` → `[]`; multi-dimensional arrays and arrays with explicit bounds (`[0:1]={1,2}`) → the text as a string |
//!
//! Errors ([`ValueError`]) say what was wrong with the value; the caller adds
//! table, column and LSN.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

use crate::json;

/// How a column's text value becomes JSON; chosen once per column from its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueKind {
    /// `t`/`f` → true/false.
    Bool,
    /// A JSON integer (i64).
    Int,
    /// A JSON number; NaN and infinities as strings.
    Float,
    /// A JSON number when exact, else the string as sent.
    Numeric,
    /// The string as sent.
    Text,
    /// The ISO date string as sent.
    Date,
    /// ISO 8601 local date-time (`T` separator).
    Timestamp,
    /// ISO 8601 date-time with offset (`Z` for UTC).
    TimestampTz,
    /// Parsed JSON; objects as their JSON text.
    Json,
    /// A one-dimensional array whose elements are of the inner kind.
    Array(Box<ValueKind>),
}

impl ValueKind {
    /// The kind for a built-in type OID, None if the OID is not a built-in this table knows (caller then consults the catalog: domains, enums, user arrays).
    pub fn from_builtin_oid(oid: u32) -> Option<ValueKind> {
        use ValueKind::*;
        let array = |k: ValueKind| Some(Array(Box::new(k)));
        match oid {
            16 => Some(Bool),
            20 | 21 | 23 | 26 => Some(Int),
            700 | 701 => Some(Float),
            1700 => Some(Numeric),
            // text, varchar, bpchar, name, uuid
            25 | 1043 | 1042 | 19 | 2950 => Some(Text),
            // Other built-ins whose text form is best passed on as a string:
            // "char", bytea, time, timetz, interval, inet, cidr, macaddr,
            // macaddr8, bit, varbit, money, xml.
            18 | 17 | 1083 | 1266 | 1186 | 869 | 650 | 829 | 774 | 1560 | 1562 | 790 | 142 => {
                Some(Text)
            }
            1082 => Some(Date),
            1114 => Some(Timestamp),
            1184 => Some(TimestampTz),
            114 | 3802 => Some(Json),
            1000 => array(Bool),
            1005 | 1007 | 1016 | 1028 => array(Int),
            1021 | 1022 => array(Float),
            1231 => array(Numeric),
            1009 | 1015 | 1014 | 1003 | 2951 => array(Text),
            1002 | 1001 | 1183 | 1270 | 1187 | 1041 | 651 | 1040 | 775 | 1561 | 1563 | 791
            | 143 => array(Text),
            1182 => array(Date),
            1115 => array(Timestamp),
            1185 => array(TimestampTz),
            199 | 3807 => array(Json),
            _ => None,
        }
    }
}

/// A column value that could not be converted; says what was wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueError {
    /// What was wrong with the value.
    pub reason: String,
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for ValueError {}

/// Converts one column value in Postgres's text output format to JSON,
/// following the rules in the module documentation.
pub fn to_json(kind: &ValueKind, text: &[u8]) -> Result<Value, ValueError> {
    match kind {
        // Both parse straight from the bytes: valid input is ASCII.
        ValueKind::Bool => bool_value(text),
        ValueKind::Int => int_value(text),
        _ => {
            let s = std::str::from_utf8(text).map_err(|e| ValueError {
                reason: format!("value is not valid UTF-8 ({e})"),
            })?;
            str_to_json(kind, s)
        }
    }
}

fn str_to_json(kind: &ValueKind, s: &str) -> Result<Value, ValueError> {
    match kind {
        ValueKind::Bool => bool_value(s.as_bytes()),
        ValueKind::Int => int_value(s.as_bytes()),
        ValueKind::Float => float_value(s),
        ValueKind::Numeric => numeric_value(s),
        ValueKind::Text | ValueKind::Date => Ok(Value::String(s.to_owned())),
        ValueKind::Timestamp => Ok(timestamp_value(s, false)),
        ValueKind::TimestampTz => Ok(timestamp_value(s, true)),
        ValueKind::Json => json_value(s),
        ValueKind::Array(elem) => array_value(elem, s),
    }
}

/// Appends to `out` the JSON of this value: byte for byte what
/// serde_json writes for [`to_json`]'s value. Booleans,
/// integers, text and ISO 8601 dates and timestamps, the bulk of a roster,
/// are written straight from the text, with no [`Value`] in between; the
/// other kinds go through [`to_json`]. On error `out` may hold
/// part of the value; the caller discards it.
pub fn write_json(kind: &ValueKind, text: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    match kind {
        ValueKind::Bool => out.extend_from_slice(match text {
            b"t" => b"true",
            b"f" => b"false",
            _ => return Err(invalid("a boolean (t or f)", text)),
        }),
        ValueKind::Int if is_plain_int(text) => out.extend_from_slice(text),
        ValueKind::Int => {
            let n = parse_i64(text).ok_or_else(|| invalid("an integer within 64 bits", text))?;
            json::write_i64(out, n);
        }
        ValueKind::Text => write_json_text(out, text)?,
        ValueKind::Numeric if write_plain_numeric(text, out) => {}
        ValueKind::Date => write_json_text(out, text)?,
        ValueKind::Timestamp | ValueKind::TimestampTz => {
            let s = utf8(text)?;
            out.push(b'"');
            iso_timestamp(s, *kind == ValueKind::TimestampTz, |piece| {
                json::escape_into(out, piece.as_bytes())
            });
            out.push(b'"');
        }
        _ => {
            let value = to_json(kind, text)?;
            // Writing into a Vec cannot fail, and a Value always serialises.
            serde_json::to_writer(&mut *out, &value).map_err(|e| ValueError {
                reason: format!("cannot encode the value as JSON ({e})"),
            })?;
        }
    }
    Ok(())
}

/// Whether an integer's text is already its JSON: Postgres's own output
/// for an integer of at most 18 digits (so within i64), without a sign
/// other than `-` or leading zeros. Such text is copied as it is instead
/// of parsed and printed again.
fn is_plain_int(text: &[u8]) -> bool {
    let digits = match text.split_first() {
        Some((b'-', rest)) => rest,
        _ => text,
    };
    match digits {
        [] => false,
        [b'0'] => digits.len() == text.len(),
        [b'0', ..] => false,
        _ => digits.len() <= 18 && digits.iter().all(u8::is_ascii_digit),
    }
}

/// Writes a numeric whose JSON is its own digits, trimmed: an integer
/// within i64, or a decimal of at most 15 significant digits between 0.001
/// and 10^15, which reads back from its nearest f64 unchanged and prints
/// shortest as itself (see [`numeric_value`]). Money and counts, the usual
/// numerics, take this path without a parse and print of an f64. False,
/// with nothing written, for anything else.
fn write_plain_numeric(text: &[u8], out: &mut Vec<u8>) -> bool {
    let (negative, body) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let (int_part, frac_part) = match body.iter().position(|&b| b == b'.') {
        Some(dot) => (&body[..dot], &body[dot + 1..]),
        None => (body, &body[..0]),
    };
    if int_part.is_empty()
        || !int_part.iter().all(u8::is_ascii_digit)
        || !frac_part.iter().all(u8::is_ascii_digit)
    {
        return false;
    }
    let frac =
        &frac_part[..frac_part.len() - frac_part.iter().rev().take_while(|&&b| b == b'0').count()];
    if frac.is_empty() {
        let int_text = &text[..text.len() - body.len() + int_part.len()];
        if is_plain_int(int_text) {
            out.extend_from_slice(int_text);
            return true;
        }
        let Some(n) = parse_i64(int_text) else {
            return false;
        };
        json::write_i64(out, n);
        return true;
    }
    let int = &int_part[int_part.iter().take_while(|&&b| b == b'0').count()..];
    let (significant, small) = if int.is_empty() {
        let zeros = frac.iter().take_while(|&&b| b == b'0').count();
        (frac.len() - zeros, zeros > 2)
    } else {
        (int.len() + frac.len(), false)
    };
    if significant > 15 || small {
        return false;
    }
    if negative {
        out.push(b'-');
    }
    if int.is_empty() {
        out.push(b'0');
    }
    out.extend_from_slice(int);
    out.push(b'.');
    out.extend_from_slice(frac);
    true
}

fn utf8(text: &[u8]) -> Result<&str, ValueError> {
    std::str::from_utf8(text).map_err(|e| ValueError {
        reason: format!("value is not valid UTF-8 ({e})"),
    })
}

/// [`json::write_str`] for a value's text, which must be UTF-8. ASCII, the
/// usual case, is only scanned once: the check that it is ASCII is far
/// cheaper than a full UTF-8 validation of a short string.
fn write_json_text(out: &mut Vec<u8>, text: &[u8]) -> Result<(), ValueError> {
    if !text.is_ascii() {
        utf8(text)?;
    }
    json::write_quoted(out, text);
    Ok(())
}

/// The value for an error message: lossy UTF-8, cut at 40 characters.
fn snippet(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(text);
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("\"{}…\"", &s[..i]),
        None => format!("\"{s}\""),
    }
}

fn invalid(what: &str, text: &[u8]) -> ValueError {
    ValueError {
        reason: format!("{} is not {what}", snippet(text)),
    }
}

fn bool_value(text: &[u8]) -> Result<Value, ValueError> {
    match text {
        b"t" => Ok(Value::Bool(true)),
        b"f" => Ok(Value::Bool(false)),
        _ => Err(invalid("a boolean (t or f)", text)),
    }
}

/// Parses an optionally signed decimal integer without allocating; None when
/// it is malformed or outside i64.
fn parse_i64(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, text),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: i64 = 0;
    for &c in digits {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n.checked_mul(10)?;
        // Accumulating negative values reaches i64::MIN.
        n = if negative {
            n.checked_sub(i64::from(d))?
        } else {
            n.checked_add(i64::from(d))?
        };
    }
    Some(n)
}

fn int_value(text: &[u8]) -> Result<Value, ValueError> {
    parse_i64(text)
        .map(Value::from)
        .ok_or_else(|| invalid("an integer within 64 bits", text))
}

fn float_value(s: &str) -> Result<Value, ValueError> {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return Ok(Value::String(s.to_owned()));
    }
    s.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .ok_or_else(|| invalid("a floating-point number", s.as_bytes()))
}

fn numeric_value(s: &str) -> Result<Value, ValueError> {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return Ok(Value::String(s.to_owned()));
    }
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int_part, frac_part) = body.split_once('.').unwrap_or((body, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int_part.is_empty() || !all_digits(int_part) || !all_digits(frac_part) {
        return Err(invalid("a numeric value", s.as_bytes()));
    }
    if frac_part.bytes().all(|b| b == b'0') {
        if let Some(n) = parse_i64(s.split_once('.').map_or(s, |(i, _)| i).as_bytes()) {
            return Ok(Value::from(n));
        }
    }
    // The decimal's significant digits and exponent E (value = 0.DIGITS × 10^E).
    let digits = int_part.as_bytes().iter().chain(frac_part.as_bytes());
    let total = int_part.len() + frac_part.len();
    let lead = digits.clone().take_while(|&&b| b == b'0').count();
    let trail = digits.clone().rev().take_while(|&&b| b == b'0').count();
    // Not all zero: an all-zero value was handled as an integer above.
    let significant = total - lead - trail;
    let exponent = int_part.len() as i64 - lead as i64;
    // Up to 15 significant digits (f64's DBL_DIG) every decimal within the
    // normal range reads back from its nearest f64 unchanged, and no
    // shorter decimal shares that f64: the shortest print is this value.
    if significant <= 15 {
        if let Some(n) = s
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_normal())
            .and_then(serde_json::Number::from_f64)
        {
            return Ok(Value::Number(n));
        }
    }
    // An f64 printed shortest has at most 17 significant digits.
    if significant <= 17 {
        let mut wanted = [0u8; 17];
        for (slot, &d) in wanted.iter_mut().zip(digits.skip(lead).take(significant)) {
            *slot = d;
        }
        let wanted = &wanted[..significant];
        if let Some(f) = s.parse::<f64>().ok().filter(|f| f.is_finite()) {
            // Shortest round-trip digits in scientific form, e.g. `1.0005e3`.
            let mut buf = StackBuf::default();
            if fmt::write(&mut buf, format_args!("{:e}", f.abs())).is_ok() {
                if let Some((mantissa, exp)) = buf.as_str().split_once('e') {
                    let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
                    let same = exp.parse::<i64>().ok() == Some(exponent - 1)
                        && f.is_sign_negative() == negative
                        && mantissa
                            .bytes()
                            .filter(|&b| b != b'.')
                            .eq(wanted.iter().copied());
                    if same {
                        if let Some(n) = serde_json::Number::from_f64(f) {
                            return Ok(Value::Number(n));
                        }
                    }
                }
            }
        }
    }
    Ok(Value::String(s.to_owned()))
}

/// A small fixed buffer to format an f64 into without allocating.
#[derive(Default)]
struct StackBuf {
    buf: [u8; 32],
    len: usize,
}

impl StackBuf {
    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever appended, so this cannot fail.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dest = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dest.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// ISO 8601 from Postgres's ISO DateStyle output. With `with_offset`, a
/// trailing `±HH` offset becomes `±HH:00` and `+00` becomes `Z`.
fn timestamp_value(s: &str, with_offset: bool) -> Value {
    let mut out = String::with_capacity(s.len() + 3);
    iso_timestamp(s, with_offset, |piece| out.push_str(piece));
    Value::String(out)
}

/// Hands the pieces of [`timestamp_value`]'s string to `push`, in order:
/// infinity, -infinity and BC values as sent, others with the date and
/// time joined by `T` and the offset in ISO 8601.
fn iso_timestamp<'a>(s: &'a str, with_offset: bool, mut push: impl FnMut(&'a str)) {
    let Some((date, time)) = s.split_once(' ').filter(|_| !s.ends_with(" BC")) else {
        push(s);
        return;
    };
    push(date);
    push("T");
    match time.rfind(['+', '-']).filter(|_| with_offset) {
        Some(at) => {
            let (clock, offset) = time.split_at(at);
            push(clock);
            if offset == "+00" {
                push("Z");
            } else {
                push(offset);
                if offset.len() == 3 {
                    push(":00");
                }
            }
        }
        None => push(time),
    }
}

fn json_value(s: &str) -> Result<Value, ValueError> {
    let valid = || serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok();
    if s.trim_start().starts_with('{') {
        // Only validated, not built: it is passed on as its text.
        return if valid() {
            Ok(Value::String(s.to_owned()))
        } else {
            Err(invalid("valid JSON", s.as_bytes()))
        };
    }
    match serde_json::from_str::<Value>(s) {
        Ok(v) => Ok(v),
        // Valid JSON serde_json cannot hold (a number beyond f64): keep the text.
        Err(_) if valid() => Ok(Value::String(s.to_owned())),
        Err(e) => Err(ValueError {
            reason: format!("{} is not valid JSON ({e})", snippet(s.as_bytes())),
        }),
    }
}

/// Postgres's `isspace`: the whitespace array input skips around elements.
fn is_pg_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Parses a one-dimensional array's text form (`{a,"b c",NULL}`), converting
/// each element with `elem`; other array shapes come back as the text.
fn array_value(elem: &ValueKind, s: &str) -> Result<Value, ValueError> {
    let malformed = |what: &str| ValueError {
        reason: format!("{} is not a valid array: {what}", snippet(s.as_bytes())),
    };
    let b = s.as_bytes();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while *i < b.len() && is_pg_space(b[*i]) {
            *i += 1;
        }
    };
    skip_space(&mut i);
    match b.get(i) {
        // Explicit bounds, e.g. [0:1]={1,2}.
        Some(b'[') => return Ok(Value::String(s.to_owned())),
        Some(b'{') => i += 1,
        _ => return Err(malformed("does not start with '{'")),
    }
    let mut out = Vec::new();
    skip_space(&mut i);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            skip_space(&mut i);
            let element: Option<Cow<'_, str>> = match b.get(i) {
                // A nested array: more than one dimension.
                Some(b'{') => return Ok(Value::String(s.to_owned())),
                Some(b'"') => {
                    i += 1;
                    let start = i;
                    // Only built once a backslash is seen; delimiters are ASCII,
                    // so scanning bytes never splits a character.
                    let mut owned: Option<Vec<u8>> = None;
                    loop {
                        match b.get(i) {
                            None => return Err(malformed("unterminated quoted element")),
                            Some(b'"') => break,
                            Some(b'\\') => {
                                let buf = owned.get_or_insert_with(|| b[start..i].to_vec());
                                let &c =
                                    b.get(i + 1).ok_or_else(|| malformed("backslash at end"))?;
                                buf.push(c);
                                i += 2;
                            }
                            Some(&c) => {
                                if let Some(buf) = owned.as_mut() {
                                    buf.push(c);
                                }
                                i += 1;
                            }
                        }
                    }
                    let text = match owned {
                        Some(buf) => {
                            Cow::Owned(String::from_utf8(buf).map_err(|_| malformed("bad escape"))?)
                        }
                        None => Cow::Borrowed(&s[start..i]),
                    };
                    i += 1; // the closing quote
                    Some(text)
                }
                _ => {
                    // Unquoted: up to ',' or '}'; a backslash escapes the next
                    // byte; trailing unescaped whitespace is not part of it.
                    let start = i;
                    let mut owned: Option<Vec<u8>> = None;
                    // Where the content ends: after its last non-space or escaped byte.
                    let mut end = start;
                    let mut owned_end = 0;
                    loop {
                        match b.get(i) {
                            None => return Err(malformed("missing closing '}'")),
                            Some(b',' | b'}') => break,
                            Some(b'"' | b'{') => {
                                return Err(malformed("unexpected quote or brace in element"))
                            }
                            Some(b'\\') => {
                                let buf = owned.get_or_insert_with(|| b[start..i].to_vec());
                                let &c =
                                    b.get(i + 1).ok_or_else(|| malformed("backslash at end"))?;
                                buf.push(c);
                                owned_end = buf.len();
                                i += 2;
                                end = i;
                            }
                            Some(&c) => {
                                if let Some(buf) = owned.as_mut() {
                                    buf.push(c);
                                    if !is_pg_space(c) {
                                        owned_end = buf.len();
                                    }
                                }
                                i += 1;
                                if !is_pg_space(c) {
                                    end = i;
                                }
                            }
                        }
                    }
                    match owned {
                        Some(mut buf) => {
                            buf.truncate(owned_end);
                            Some(Cow::Owned(
                                String::from_utf8(buf).map_err(|_| malformed("bad escape"))?,
                            ))
                        }
                        None if end == start => return Err(malformed("empty element")),
                        None if s[start..end].eq_ignore_ascii_case("NULL") => None,
                        None => Some(Cow::Borrowed(&s[start..end])),
                    }
                }
            };
            out.push(match element {
                None => Value::Null,
                Some(text) => str_to_json(elem, &text).map_err(|e| ValueError {
                    reason: format!("array element {}: {}", out.len() + 1, e.reason),
                })?,
            });
            skip_space(&mut i);
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return Err(malformed("expected ',' or '}' after an element")),
            }
        }
    }
    skip_space(&mut i);
    if i != b.len() {
        return Err(malformed("text after the closing '}'"));
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv(kind: &ValueKind, text: &str) -> Value {
        to_json(kind, text.as_bytes()).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn fails(kind: &ValueKind, text: &[u8]) -> String {
        to_json(kind, text)
            .expect_err("should not convert")
            .to_string()
    }

    fn arr(k: ValueKind) -> ValueKind {
        ValueKind::Array(Box::new(k))
    }

    /// Serialized JSON, to check numbers' exact form.
    fn js(kind: &ValueKind, text: &str) -> String {
        conv(kind, text).to_string()
    }

    #[test]
    fn builtin_oids() {
        use ValueKind::*;
        let cases = [
            (16, Bool),
            (20, Int),
            (21, Int),
            (23, Int),
            (26, Int),
            (700, Float),
            (701, Float),
            (1700, Numeric),
            (25, Text),
            (1043, Text),
            (1042, Text),
            (19, Text),
            (2950, Text),
            (17, Text),
            (1186, Text),
            (1082, Date),
            (1114, Timestamp),
            (1184, TimestampTz),
            (114, Json),
            (3802, Json),
            (1000, arr(Bool)),
            (1005, arr(Int)),
            (1007, arr(Int)),
            (1016, arr(Int)),
            (1021, arr(Float)),
            (1022, arr(Float)),
            (1231, arr(Numeric)),
            (1009, arr(Text)),
            (1015, arr(Text)),
            (1014, arr(Text)),
            (1003, arr(Text)),
            (2951, arr(Text)),
            (1182, arr(Date)),
            (1115, arr(Timestamp)),
            (1185, arr(TimestampTz)),
            (199, arr(Json)),
            (3807, arr(Json)),
        ];
        for (oid, kind) in cases {
            assert_eq!(ValueKind::from_builtin_oid(oid), Some(kind), "OID {oid}");
        }
        // Enums, domains, user types: the caller asks the catalog.
        for oid in [0, 16417, 100_000] {
            assert_eq!(ValueKind::from_builtin_oid(oid), None);
        }
    }

    #[test]
    fn bool_values() {
        assert_eq!(conv(&ValueKind::Bool, "t"), json!(true));
        assert_eq!(conv(&ValueKind::Bool, "f"), json!(false));
        for bad in ["true", "T", "", "tt", "1"] {
            assert_eq!(
                fails(&ValueKind::Bool, bad.as_bytes()),
                format!("\"{bad}\" is not a boolean (t or f)")
            );
        }
    }

    #[test]
    fn int_values() {
        let k = ValueKind::Int;
        assert_eq!(conv(&k, "0"), json!(0));
        assert_eq!(conv(&k, "-32768"), json!(-32768));
        assert_eq!(conv(&k, "2147483647"), json!(2_147_483_647));
        assert_eq!(conv(&k, "4294967295"), json!(4_294_967_295u32)); // oid
        assert_eq!(conv(&k, "9223372036854775807"), json!(i64::MAX));
        assert_eq!(conv(&k, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(js(&k, "-0"), "0");
        for bad in [
            "9223372036854775808",
            "-9223372036854775809",
            "",
            "-",
            "1.0",
            " 1",
            "1e3",
            "abc",
        ] {
            assert_eq!(
                fails(&k, bad.as_bytes()),
                format!("\"{bad}\" is not an integer within 64 bits")
            );
        }
        assert!(fails(&k, b"\xff1").contains("is not an integer"));
    }

    #[test]
    fn float_values() {
        let k = ValueKind::Float;
        assert_eq!(js(&k, "1.5"), "1.5");
        assert_eq!(js(&k, "-0.1"), "-0.1");
        assert_eq!(js(&k, "3.4028235e+38"), "3.4028235e+38");
        assert_eq!(js(&k, "1e-320"), "1e-320");
        assert_eq!(js(&k, "1.7976931348623157e+308"), "1.7976931348623157e+308");
        assert_eq!(conv(&k, "NaN"), json!("NaN"));
        assert_eq!(conv(&k, "Infinity"), json!("Infinity"));
        assert_eq!(conv(&k, "-Infinity"), json!("-Infinity"));
        for bad in ["", "abc", "inf", "1e999", "1,5"] {
            assert!(
                fails(&k, bad.as_bytes()).ends_with("is not a floating-point number"),
                "{bad}"
            );
        }
    }

    /// The short path for up to 15 significant digits trusts f64's DBL_DIG:
    /// check it against the shortest print for many random decimals.
    #[test]
    fn decimals_of_up_to_15_digits_print_shortest_as_themselves() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200_000 {
            let digits = rng.usize(1..=15);
            let mut d: String = (0..digits)
                .map(|_| char::from(b'0' + rng.u8(0..10)))
                .collect();
            d.replace_range(0..1, &rng.u8(1..10).to_string());
            let scale = rng.i32(-300..300);
            let text = format!("{d}e{scale}");
            let f: f64 = text.parse().unwrap();
            if !f.is_normal() {
                continue;
            }
            let printed = format!("{f:e}");
            let (mantissa, exp) = printed.split_once('e').unwrap();
            let mantissa: String = mantissa.chars().filter(|c| *c != '.').collect();
            assert_eq!(mantissa, d.trim_end_matches('0'), "{text}");
            assert_eq!(
                exp.parse::<i32>().unwrap(),
                scale + digits as i32 - 1,
                "{text}"
            );
        }
    }

    /// An integer copied as it is reads as what the parse and print gave.
    #[test]
    fn plain_ints_write_what_the_general_path_writes() {
        let mut rng = fastrand::Rng::with_seed(12);
        let mut taken = 0;
        let general = |text: &str| {
            let mut out = Vec::new();
            parse_i64(text.as_bytes()).map(|n| {
                json::write_i64(&mut out, n);
                String::from_utf8(out).unwrap()
            })
        };
        for i in 0..200_000 {
            let mut text: String = (0..rng.usize(0..=20))
                .map(|_| char::from(b'0' + rng.u8(0..10)))
                .collect();
            if i % 3 == 0 {
                text.insert(0, '-');
            }
            if !is_plain_int(text.as_bytes()) {
                continue;
            }
            taken += 1;
            assert_eq!(general(&text).as_deref(), Some(text.as_str()), "{text}");
        }
        assert!(taken > 20_000, "the plain path took only {taken}");
        for text in ["0", "7", "-7", "999999999999999999", "-999999999999999999"] {
            assert!(is_plain_int(text.as_bytes()), "{text}");
        }
        // Left to the general path: what it rewrites or rejects.
        for text in [
            "",
            "-",
            "-0",
            "007",
            "+7",
            "1e3",
            "9223372036854775807",
            " 1",
        ] {
            assert!(!is_plain_int(text.as_bytes()), "{text}");
        }
    }

    /// The numeric short path writes exactly what the general path does.
    #[test]
    fn plain_numerics_write_what_the_general_path_writes() {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut taken = 0;
        for i in 0..300_000 {
            let int: String = (0..rng.usize(0..=17))
                .map(|_| char::from(b'0' + rng.u8(0..10)))
                .collect();
            let frac: String = (0..rng.usize(0..=12))
                .map(|_| char::from(b'0' + rng.u8(0..10)))
                .collect();
            let sign = if i % 3 == 0 { "-" } else { "" };
            let int = if int.is_empty() { "0".to_owned() } else { int };
            let text = match (frac.is_empty(), i % 5) {
                (true, _) | (_, 0) => format!("{sign}{int}"),
                _ => format!("{sign}{int}.{frac}"),
            };
            let mut fast = Vec::new();
            if !write_plain_numeric(text.as_bytes(), &mut fast) {
                continue;
            }
            taken += 1;
            let general = serde_json::to_string(&conv(&ValueKind::Numeric, &text)).unwrap();
            assert_eq!(String::from_utf8(fast).unwrap(), general, "{text}");
        }
        assert!(taken > 100_000, "the short path took only {taken}");
        for text in [
            "0.001",
            "-0.0012",
            "99999999999999.9",
            "1250.50",
            "-0",
            "0.000",
        ] {
            let mut fast = Vec::new();
            assert!(write_plain_numeric(text.as_bytes(), &mut fast), "{text}");
            let general = serde_json::to_string(&conv(&ValueKind::Numeric, text)).unwrap();
            assert_eq!(String::from_utf8(fast).unwrap(), general, "{text}");
        }
        for text in [
            "0.0001",
            "NaN",
            "1e5",
            "",
            "-",
            ".5",
            "1.2.3",
            "999999999999999.9",
            "0.1234567890123456",
        ] {
            assert!(
                !write_plain_numeric(text.as_bytes(), &mut Vec::new()),
                "{text}"
            );
        }
    }

    #[test]
    fn numeric_values() {
        let k = ValueKind::Numeric;
        let cases = [
            ("0", "0"),
            ("-0", "0"),
            ("0.00", "0"),
            ("42", "42"),
            ("1000.00", "1000"),
            ("-17.000", "-17"),
            ("9223372036854775807", "9223372036854775807"),
            ("-9223372036854775808", "-9223372036854775808"),
            ("1000.50", "1000.5"),
            ("0.1", "0.1"),
            ("-0.001", "-0.001"),
            ("123.456", "123.456"),
            ("0.30000000000000004", "0.30000000000000004"),
            // Integral beyond i64 but exactly an f64 printed shortest.
            ("100000000000000000000", "1e+20"),
        ];
        for (text, want) in cases {
            assert_eq!(js(&k, text), want, "{text}");
        }
        // 10^308 is exactly what the f64 1e308 prints as.
        let big = format!("1{}", "0".repeat(308));
        assert_eq!(js(&k, &big), "1e+308");
        // 10^309 is beyond f64; 1e308 + 1 is not exactly an f64.
        let bigger = format!("1{}", "0".repeat(309));
        assert_eq!(conv(&k, &bigger), json!(bigger));
        let plus_one = format!("1{}1", "0".repeat(307));
        assert_eq!(conv(&k, &plus_one), json!(plus_one));
        let tiny = format!("0.{}1", "0".repeat(306)); // 1e-307
        assert_eq!(js(&k, &tiny), "1e-307");
        // Not exactly representable: the string as sent.
        for text in [
            "12345678901234567890.123",
            "12345678901234567890",
            // 2^63 is an f64, but its shortest form 9.223372036854776e18 is another decimal.
            "9223372036854775808",
            "0.10000000000000001",
            "3.141592653589793238462643383279",
            "NaN",
            "Infinity",
            "-Infinity",
        ] {
            assert_eq!(conv(&k, text), json!(text), "{text}");
        }
        for bad in ["", "-", "1.2.3", "abc", "1e5", ".5", "+1", "1.", " 1"] {
            if bad == "1." {
                // "1." is integral with an empty fraction: accepted as 1.
                assert_eq!(js(&k, bad), "1");
                continue;
            }
            assert!(
                fails(&k, bad.as_bytes()).ends_with("is not a numeric value"),
                "{bad}"
            );
        }
    }

    #[test]
    fn text_and_date_values_are_passed_as_sent() {
        assert_eq!(conv(&ValueKind::Text, "ab "), json!("ab "));
        assert_eq!(conv(&ValueKind::Text, ""), json!(""));
        assert_eq!(conv(&ValueKind::Text, "naïve ✓"), json!("naïve ✓"));
        assert_eq!(
            conv(&ValueKind::Text, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        for d in ["2024-01-31", "infinity", "-infinity", "0044-03-15 BC"] {
            assert_eq!(conv(&ValueKind::Date, d), json!(d));
        }
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        for kind in [
            ValueKind::Text,
            ValueKind::Float,
            ValueKind::Numeric,
            ValueKind::Date,
            ValueKind::Timestamp,
            ValueKind::TimestampTz,
            ValueKind::Json,
            arr(ValueKind::Text),
        ] {
            assert!(fails(&kind, b"ab\xffc").starts_with("value is not valid UTF-8"));
        }
    }

    #[test]
    fn timestamp_values() {
        let k = ValueKind::Timestamp;
        assert_eq!(
            conv(&k, "2024-01-31 10:00:00.123"),
            json!("2024-01-31T10:00:00.123")
        );
        assert_eq!(
            conv(&k, "2024-01-31 10:00:00"),
            json!("2024-01-31T10:00:00")
        );
        for kept in ["infinity", "-infinity", "0044-03-15 12:00:00 BC"] {
            assert_eq!(conv(&k, kept), json!(kept));
        }
    }

    #[test]
    fn timestamptz_values() {
        let k = ValueKind::TimestampTz;
        let cases = [
            ("2024-01-31 10:00:00+00", "2024-01-31T10:00:00Z"),
            ("2024-01-31 10:00:00.5+00", "2024-01-31T10:00:00.5Z"),
            ("2024-01-31 10:00:00+05:30", "2024-01-31T10:00:00+05:30"),
            ("2024-01-31 10:00:00-08", "2024-01-31T10:00:00-08:00"),
            (
                "2024-01-31 10:00:00.123456+02",
                "2024-01-31T10:00:00.123456+02:00",
            ),
            (
                "1900-01-01 00:00:00+05:30:15",
                "1900-01-01T00:00:00+05:30:15",
            ),
            ("infinity", "infinity"),
            ("-infinity", "-infinity"),
            ("0044-03-15 12:00:00+00 BC", "0044-03-15 12:00:00+00 BC"),
        ];
        for (text, want) in cases {
            assert_eq!(conv(&k, text), json!(want), "{text}");
        }
    }

    #[test]
    fn json_values() {
        let k = ValueKind::Json;
        assert_eq!(conv(&k, "1"), json!(1));
        assert_eq!(conv(&k, "-2.5"), json!(-2.5));
        assert_eq!(conv(&k, "\"hi\""), json!("hi"));
        assert_eq!(conv(&k, "true"), json!(true));
        assert_eq!(conv(&k, "null"), Value::Null);
        assert_eq!(conv(&k, r#"[1, "two", null]"#), json!([1, "two", null]));
        assert_eq!(conv(&k, r#"[{"a": 1}]"#), json!([{"a": 1}]));
        // Objects go as their JSON text.
        let obj = r#"{"plan": "pro", "n": 1}"#;
        assert_eq!(conv(&k, obj), json!(obj));
        assert_eq!(conv(&k, " {}"), json!(" {}"));
        // Valid JSON serde_json can't hold as a number: its text.
        assert_eq!(conv(&k, "1e400"), json!("1e400"));
        for bad in ["", "{", r#"{"a": }"#, "[1,]", "tru", "1 2", "{} x"] {
            assert!(
                fails(&k, bad.as_bytes()).contains("is not valid JSON"),
                "{bad}"
            );
        }
    }

    #[test]
    fn arrays_of_scalars() {
        use ValueKind::*;
        assert_eq!(conv(&arr(Int), "{1,NULL,3}"), json!([1, null, 3]));
        assert_eq!(conv(&arr(Int), "{}"), json!([]));
        assert_eq!(conv(&arr(Int), "{ }"), json!([]));
        assert_eq!(conv(&arr(Int), " { 1 , 2 } "), json!([1, 2]));
        assert_eq!(
            conv(&arr(Int), "{-9223372036854775808,9223372036854775807}"),
            json!([i64::MIN, i64::MAX])
        );
        assert_eq!(conv(&arr(Bool), "{t,f,NULL}"), json!([true, false, null]));
        assert_eq!(
            conv(&arr(Float), "{1.5,NaN,-Infinity}"),
            json!([1.5, "NaN", "-Infinity"])
        );
        assert_eq!(
            conv(&arr(Numeric), "{1000.50,12345678901234567890.123}"),
            json!([1000.5, "12345678901234567890.123"])
        );
        assert_eq!(
            conv(&arr(Date), "{2024-01-31,infinity}"),
            json!(["2024-01-31", "infinity"])
        );
        assert_eq!(
            conv(&arr(Timestamp), r#"{"2024-01-31 10:00:00.123",infinity}"#),
            json!(["2024-01-31T10:00:00.123", "infinity"])
        );
        assert_eq!(
            conv(
                &arr(TimestampTz),
                r#"{"2024-01-31 10:00:00+00","2024-01-31 10:00:00-08"}"#
            ),
            json!(["2024-01-31T10:00:00Z", "2024-01-31T10:00:00-08:00"])
        );
        assert_eq!(
            conv(&arr(Json), r#"{"{\"a\": 1}","[1, 2]",3,NULL,null}"#),
            json!([r#"{"a": 1}"#, [1, 2], 3, null, null])
        );
        assert_eq!(conv(&arr(Text), r#"{"ab ","c  "}"#), json!(["ab ", "c  "]));
    }

    #[test]
    fn array_quoting_and_escapes() {
        let k = arr(ValueKind::Text);
        assert_eq!(
            conv(&k, r#"{"a,b","quote\"d",NULL,"NULL"}"#),
            json!(["a,b", "quote\"d", null, "NULL"])
        );
        assert_eq!(
            conv(&k, r#"{"back\\slash","{brace}","",plain,"with space"}"#),
            json!(["back\\slash", "{brace}", "", "plain", "with space"])
        );
        // Unquoted NULL is case-insensitive; escaped or quoted it is a string.
        assert_eq!(
            conv(&k, r#"{null,Null,\NULL,"null"}"#),
            json!([null, null, "NULL", "null"])
        );
        // Unquoted elements: surrounding whitespace dropped, inner kept,
        // backslash escapes (an escaped trailing space stays).
        assert_eq!(
            conv(&k, "{  a b  ,c\\,d, e\\  ,ü}"),
            json!(["a b", "c,d", "e ", "ü"])
        );
        assert_eq!(conv(&k, "{\"é\\\"\"}"), json!(["é\""]));
    }

    #[test]
    fn other_array_shapes_are_text() {
        let k = arr(ValueKind::Int);
        for text in [
            "{{1,2},{3,4}}",
            "{{}}",
            "[0:1]={1,2}",
            "[1:2][1:1]={{1},{2}}",
        ] {
            assert_eq!(conv(&k, text), json!(text));
        }
    }

    #[test]
    fn malformed_arrays_and_bad_elements_are_errors() {
        let k = arr(ValueKind::Int);
        for (text, why) in [
            ("", "does not start with '{'"),
            ("1,2", "does not start with '{'"),
            ("{1,2", "missing closing '}'"),
            ("{1,2}x", "text after the closing '}'"),
            ("{1,,2}", "empty element"),
            ("{1,}", "empty element"),
            ("{\"1\"2}", "expected ',' or '}' after an element"),
            ("{\"1", "unterminated quoted element"),
            ("{\"1\\", "backslash at end"),
            ("{a\"b\"}", "unexpected quote or brace in element"),
        ] {
            let e = fails(&k, text.as_bytes());
            assert!(e.ends_with(why), "{text}: {e}");
            assert!(e.contains("is not a valid array"), "{text}: {e}");
        }
        assert_eq!(
            fails(&k, b"{1,x}"),
            "array element 2: \"x\" is not an integer within 64 bits"
        );
        assert_eq!(
            fails(&arr(ValueKind::Bool), b"{t,\"yes\"}"),
            "array element 2: \"yes\" is not a boolean (t or f)"
        );
    }

    #[test]
    fn error_values_are_shortened() {
        let long = "x".repeat(100);
        let e = fails(&ValueKind::Int, long.as_bytes());
        assert_eq!(
            e,
            format!("\"{}…\" is not an integer within 64 bits", "x".repeat(40))
        );
    }

    #[test]
    fn random_array_text_never_panics() {
        let pieces = [
            "{", "}", ",", "\"", "\\", " ", "a", "1", "ü", "✓", "NULL", "[", "]",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        let kinds = [
            arr(ValueKind::Text),
            arr(ValueKind::Int),
            arr(ValueKind::Json),
        ];
        for _ in 0..20_000 {
            let mut text = String::new();
            if rng.bool() {
                text.push('{');
            }
            for _ in 0..rng.usize(..12) {
                text.push_str(pieces[rng.usize(..pieces.len())]);
            }
            for kind in &kinds {
                let _ = to_json(kind, text.as_bytes());
            }
        }
    }

    /// The writer is the converter's twin: the same bytes serde_json writes
    /// for the converted value, and the same errors.
    #[test]
    fn write_json_writes_what_serde_json_writes_for_to_json() {
        use ValueKind::*;
        let weird: String = (0u8..0x80).map(char::from).collect::<String>() + "é€😀";
        let cases: Vec<(ValueKind, &str)> = vec![
            (Bool, "t"),
            (Bool, "f"),
            (Bool, "true"),
            (Int, "0"),
            (Int, "-1"),
            (Int, "42"),
            (Int, "9223372036854775807"),
            (Int, "-9223372036854775808"),
            (Int, "9223372036854775808"),
            (Int, "+7"),
            (Int, "007"),
            (Int, "x"),
            (Float, "1.5"),
            (Float, "NaN"),
            (Numeric, "1250.50"),
            (Numeric, "0.0000001"),
            (Numeric, "12345678901234567890.123"),
            (Text, ""),
            (Text, "plain"),
            (Text, "quote \" backslash \\ tab \t"),
            (Text, &weird),
            (Date, "2024-01-31"),
            (Date, "infinity"),
            (Timestamp, "2024-01-31 10:00:00.123"),
            (Timestamp, "-infinity"),
            (Timestamp, "2024-01-31 10:00:00 BC"),
            (TimestampTz, "2024-01-31 10:00:00+00"),
            (TimestampTz, "2024-01-31 10:00:00.5-08"),
            (TimestampTz, "2024-01-31 10:00:00+05:30"),
            (Json, r#"{"a":1}"#),
            (Json, "[1,2]"),
            (Array(Box::new(Text)), r#"{a,"b c",NULL}"#),
        ];
        for (kind, text) in &cases {
            let expected = to_json(kind, text.as_bytes()).map(|v| serde_json::to_vec(&v).unwrap());
            let mut out = b"[".to_vec();
            let written = write_json(kind, text.as_bytes(), &mut out).map(|()| out[1..].to_vec());
            assert_eq!(
                written
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned()),
                expected
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned()),
                "{kind:?} {text:?}"
            );
        }
        // Escapes at every place of the eight-byte words, in strings
        // around the word size.
        for len in 1..20 {
            for at in 0..len {
                for special in ["\u{0}", "\u{1f}", "\"", "\\", "\n", " ", "\u{7f}", "é", "~"] {
                    let mut text = "a".repeat(len);
                    text.replace_range(at..at + 1, special);
                    let mut out = Vec::new();
                    json::write_str(&mut out, &text);
                    assert_eq!(
                        String::from_utf8(out).unwrap(),
                        serde_json::to_string(&text).unwrap(),
                        "{text:?}"
                    );
                }
            }
        }
        // A value's text, ASCII or not, the same way; invalid UTF-8 is
        // refused, not passed on.
        for text in ["plain", "tab\there", "café \"ok\"", "日本\u{1}"] {
            let mut out = Vec::new();
            write_json(&Text, text.as_bytes(), &mut out).unwrap();
            assert_eq!(out, serde_json::to_vec(text).unwrap(), "{text:?}");
        }
        for bad in [&b"\xff"[..], b"caf\xc3", b"ok\xed\xa0\x80"] {
            assert!(write_json(&Text, bad, &mut Vec::new()).is_err());
        }
    }
}
