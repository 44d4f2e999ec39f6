//! `tables:` — what each source table's rows become in ConveYour, as
//! written in the file ([`TableConfig`]) and after validation
//! ([`TableMapping`]).
//!
//! Everything that can be checked without the database is checked here
//! (limits, names, formats, the shape of a row filter); what needs the
//! catalog (columns exist, types convert, indexes) is checked when the
//! connector, `check` or `preview` connects, by `source::Catalog`.

mod mapping;
mod validate;

pub use mapping::{
    ColumnRole, ColumnUse, ContactSource, EventName, FieldMapping, FieldSource, IncrementBy,
    Lookup, MappingKind, OnDelete, Operations, TableMapping,
};
pub(super) use validate::validate_table;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// One entry of `tables:`: a source table and what its rows become.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// `schema.table`, or `table` for the `public` schema.
    pub table: String,
    #[serde(default)]
    pub identify: Option<IdentifyConfig>,
    #[serde(default)]
    pub track: Option<TrackConfig>,
    /// Which row operations count. Default: identify tables
    /// `[insert, update, delete]` (a delete does what `on_delete` says),
    /// track tables `[insert]`.
    #[serde(default)]
    pub operations: Option<Vec<Operation>>,
    /// What a delete sends; default `ignore`.
    #[serde(default)]
    pub on_delete: Option<OnDeleteConfig>,
    /// A row filter in SQL, applied by the publication (Postgres 15+):
    /// only rows it accepts are streamed.
    #[serde(default, rename = "where")]
    pub row_filter: Option<String>,
    /// How NULL values are sent: `send` (JSON null, the default) or `omit`.
    #[serde(default)]
    pub nulls: NullPolicy,
    /// How `date` columns are sent; default `iso8601` (`2024-01-31`).
    #[serde(default)]
    pub date_format: Option<String>,
    /// How `timestamp`/`timestamptz` columns are sent; default `iso8601`.
    #[serde(default)]
    pub timestamp_format: Option<String>,
    /// Whether the table's existing rows are sent on the first run (and may
    /// be re-sent with `resync`): default `initial` for identify tables,
    /// `never` for track tables, whose old rows would fire automations for
    /// years-old events.
    #[serde(default)]
    pub snapshot: Option<SnapshotPolicy>,
}

/// `snapshot:` — whether existing rows are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotPolicy {
    /// Send every existing row once, before (first run) or alongside
    /// (resume, resync) the stream.
    Initial,
    /// Only changes from now on.
    Never,
}

/// Rows become identify calls: the contact and its traits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifyConfig {
    /// Where the contact id comes from.
    pub id: IdConfig,
    /// Trait name → where its value comes from.
    #[serde(default)]
    pub traits: BTreeMap<String, FieldConfig>,
}

/// Rows become track events on the contact.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackConfig {
    /// Where the contact id comes from; it must yield the same id the
    /// identify mapping sends, or ConveYour cannot match the event.
    pub id: IdConfig,
    /// The event name, e.g. `made_sale`, or `{column: kind}`.
    pub event: EventConfig,
    /// Property name → where its value comes from; at most
    /// [`MAX_EVENT_PROPERTIES`], constants included.
    #[serde(default)]
    pub properties: BTreeMap<String, FieldConfig>,
    /// Contact traits bumped with `$inc` by each tracked row: a number, or
    /// the name of a numeric column.
    #[serde(default)]
    pub increment: BTreeMap<String, IncrementConfig>,
}

/// `id:` — a column of the row, or a column of a related row found
/// through a foreign key.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum IdConfig {
    Column(String),
    Lookup(LookupConfig),
}

/// `id: {from: public.employees, key: employee_id, column: email}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// The related table.
    pub from: String,
    /// The column of this table holding the foreign key.
    pub key: String,
    /// The column of `from` holding the contact id.
    pub column: String,
    /// The column of `from` that `key` points at; default: `from`'s
    /// single-column primary key.
    #[serde(default)]
    pub references: Option<String>,
}

/// A trait or property: a column name, or a map with exactly one of
/// `column`, `list` or `value`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FieldConfig {
    Column(String),
    Detailed(FieldDetail),
}

/// The long form of a field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldDetail {
    /// A column, sent as its value.
    #[serde(default)]
    pub column: Option<String>,
    /// An array column (or a delimited text column with `delimiter`), sent
    /// as a ConveYour list operation `{"add": [...], "remove": [...]}`.
    #[serde(default)]
    pub list: Option<String>,
    /// With `list` on a text column: the separator between values.
    #[serde(default)]
    pub delimiter: Option<String>,
    /// A constant, sent as it is; `value: null` is a constant null (it
    /// clears the field), not a missing key.
    #[serde(default, deserialize_with = "present")]
    pub value: Option<Value>,
    /// For a date or timestamp column: overrides the table's format.
    #[serde(default)]
    pub format: Option<String>,
}

/// A key that is present, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// `event:` — a fixed name, or a column holding it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EventConfig {
    Name(String),
    Column(EventColumn),
}

/// `event: {column: kind}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventColumn {
    pub column: String,
}

/// `increment:` values: `sales_count: 1` or `career_sales: amount`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum IncrementConfig {
    By(serde_json::Number),
    Column(String),
}

/// A row operation a mapping may count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Insert,
    Update,
    Delete,
}

/// `on_delete:` as written.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OnDeleteConfig {
    /// `on_delete: ignore`.
    Keyword(String),
    Action(OnDeleteAction),
}

/// `on_delete: {identify: {active: false}}` or
/// `on_delete: {track: {event: left, properties: {...}}}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnDeleteAction {
    /// Traits to set on the contact (constants).
    #[serde(default)]
    pub identify: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    pub track: Option<OnDeleteTrack>,
}

/// A track event sent when a row is deleted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnDeleteTrack {
    pub event: String,
    /// Property name → field, read from the deleted row's old values.
    #[serde(default)]
    pub properties: BTreeMap<String, FieldConfig>,
}

/// What a NULL value becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NullPolicy {
    /// JSON `null`, which clears the field in ConveYour.
    #[default]
    Send,
    /// Leave the key out, so ConveYour keeps what it had.
    Omit,
}

/// How a date or timestamp is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeFormat {
    /// ISO 8601 (`2024-01-31`, `2024-01-31T10:00:00Z`); the default.
    Iso8601,
    /// Whole seconds since 1970-01-01T00:00:00Z (a timestamp without time
    /// zone counts as UTC).
    Unix,
    /// Milliseconds since 1970-01-01T00:00:00Z.
    UnixMs,
    /// A pattern of `%Y %m %d %H %M %S %%` and literal text, e.g.
    /// `%m/%d/%Y`; the time is in UTC.
    Pattern(String),
}

impl TimeFormat {
    /// Parses `iso8601`, `unix`, `unix_ms` or a `%` pattern.
    pub fn parse(text: &str) -> Result<TimeFormat, String> {
        match text {
            "iso8601" => Ok(TimeFormat::Iso8601),
            "unix" => Ok(TimeFormat::Unix),
            "unix_ms" => Ok(TimeFormat::UnixMs),
            p if p.contains('%') => {
                let mut chars = p.chars();
                while let Some(c) = chars.next() {
                    if c == '%' {
                        match chars.next() {
                            Some('Y' | 'm' | 'd' | 'H' | 'M' | 'S' | '%') => {}
                            Some(other) => {
                                return Err(format!(
                                    "`%{other}` is not supported; use %Y %m %d %H %M %S or %%"
                                ))
                            }
                            None => return Err("the pattern ends with a lone %".into()),
                        }
                    }
                }
                Ok(TimeFormat::Pattern(p.to_owned()))
            }
            other => Err(format!(
                "`{other}` is not a format: use iso8601, unix, unix_ms or a pattern such as %m/%d/%Y"
            )),
        }
    }
}
