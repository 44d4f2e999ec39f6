//! `tables:` — what each source table's rows become in ConveYour, as
//! written in the file ([`TableConfig`]) and after validation
//! ([`TableMapping`]).
//!
//! Everything that can be checked without the database is checked here
//! (limits, names, formats, the shape of a row filter); what needs the
//! catalog (columns exist, types convert, indexes) is checked when the
//! connector, `check` or `preview` connects, by `source::Catalog`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::{err, ConfigError, TableName, MAX_EVENT_PROPERTIES};

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

/// Where a validated mapping's contact id comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ContactSource {
    /// A column of the row itself.
    Column(String),
    /// A column of a related row, found through a foreign key.
    Lookup(Lookup),
}

/// A contact id taken from a related table through a foreign key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lookup {
    /// The related table.
    pub from: TableName,
    /// The column of the mapped table holding the foreign key.
    pub key: String,
    /// The column of `from` holding the contact id.
    pub column: String,
    /// The column of `from` that `key` points at; None until the catalog
    /// names `from`'s primary key.
    pub references: Option<String>,
}

/// Where a trait's or property's value comes from, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldSource {
    /// A column's value.
    Column {
        column: String,
        /// Date/timestamp format for this field, else the table's.
        format: Option<TimeFormat>,
    },
    /// A list operation computed from an array (or delimited text)
    /// column's old and new values.
    List {
        column: String,
        delimiter: Option<String>,
    },
    /// A constant.
    Const(Value),
}

impl FieldSource {
    /// The column the field reads, if any.
    pub fn column(&self) -> Option<&str> {
        match self {
            FieldSource::Column { column, .. } | FieldSource::List { column, .. } => Some(column),
            FieldSource::Const(_) => None,
        }
    }
}

/// One trait or property, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldMapping {
    pub name: String,
    pub source: FieldSource,
}

/// A track event's name, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum EventName {
    Fixed(String),
    Column(String),
}

/// A `$inc` on the contact, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum IncrementBy {
    Const(serde_json::Number),
    Column(String),
}

/// What a delete sends, validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum OnDelete {
    /// Nothing (the default): ConveYour has no delete call, and removing a
    /// rep from the roster rarely means erasing their history.
    #[default]
    Ignore,
    /// An identify setting these constant traits, e.g. `active: false`.
    Identify(Vec<(String, Value)>),
    /// A track event, its properties read from the deleted row.
    Track {
        event: String,
        properties: Vec<FieldMapping>,
    },
}

/// Which operations a mapping acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operations {
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
}

/// What one mapped table's rows become, after validation.
#[derive(Debug, Clone, PartialEq)]
pub enum MappingKind {
    /// Identify calls setting `fields` as traits.
    Identify,
    /// Track events with `fields` as properties, and `$inc` on the contact.
    Track {
        event: EventName,
        increments: Vec<(String, IncrementBy)>,
    },
}

/// A validated table mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct TableMapping {
    pub table: TableName,
    /// Where in the file it came from, e.g. `tables[1]`, for error messages.
    pub key: String,
    pub contact: ContactSource,
    pub kind: MappingKind,
    /// Traits (identify) or properties (track), in name order.
    pub fields: Vec<FieldMapping>,
    pub operations: Operations,
    pub on_delete: OnDelete,
    /// The publication row filter, as written.
    pub row_filter: Option<String>,
    pub nulls: NullPolicy,
    pub date_format: TimeFormat,
    pub timestamp_format: TimeFormat,
    /// Whether existing rows are copied (first run) and may be re-synced.
    pub snapshot: SnapshotPolicy,
}

/// A column the mapping reads, with the config key that names it and what
/// the value must be able to become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnUse {
    pub key: String,
    pub column: String,
    pub role: ColumnRole,
}

/// What a mapped column's values are used as; decides which types fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnRole {
    /// A contact id, a lookup key or an event name: any type with a text form.
    Text,
    /// A trait or property value: must become JSON.
    Value,
    /// A list trait: an array, or text with a delimiter.
    List { delimited: bool },
    /// A `$inc` amount: numeric.
    Number,
}

impl TableMapping {
    /// The section name in the file: `identify` or `track`.
    pub fn section(&self) -> &'static str {
        match self.kind {
            MappingKind::Identify => "identify",
            MappingKind::Track { .. } => "track",
        }
    }

    /// Every column of this table the mapping reads, id first, each with
    /// the config key that names it.
    pub fn columns(&self) -> Vec<ColumnUse> {
        let section = self.section();
        let base = format!("{}.{section}", self.key);
        let mut out = Vec::new();
        let mut add = |key: String, column: &str, role: ColumnRole| {
            out.push(ColumnUse {
                key,
                column: column.to_owned(),
                role,
            })
        };
        match &self.contact {
            ContactSource::Column(c) => add(format!("{base}.id"), c, ColumnRole::Text),
            ContactSource::Lookup(l) => add(format!("{base}.id.key"), &l.key, ColumnRole::Text),
        }
        let what = match self.kind {
            MappingKind::Identify => "traits",
            MappingKind::Track { .. } => "properties",
        };
        for f in &self.fields {
            let key = format!("{base}.{what}.{}", f.name);
            match &f.source {
                FieldSource::Column { column, .. } => add(key, column, ColumnRole::Value),
                FieldSource::List { column, delimiter } => add(
                    key,
                    column,
                    ColumnRole::List {
                        delimited: delimiter.is_some(),
                    },
                ),
                FieldSource::Const(_) => {}
            }
        }
        if let MappingKind::Track { event, increments } = &self.kind {
            if let EventName::Column(c) = event {
                add(format!("{base}.event.column"), c, ColumnRole::Text);
            }
            for (name, by) in increments {
                if let IncrementBy::Column(c) = by {
                    add(format!("{base}.increment.{name}"), c, ColumnRole::Number);
                }
            }
        }
        if let OnDelete::Track { properties, .. } = &self.on_delete {
            for f in properties {
                if let Some(c) = f.source.column() {
                    add(
                        format!("{}.on_delete.track.properties.{}", self.key, f.name),
                        c,
                        ColumnRole::Value,
                    );
                }
            }
        }
        out
    }

    /// What the mapping cannot do unless Postgres logs updated and deleted
    /// rows' old values in full (REPLICA IDENTITY FULL), one consequence
    /// each; empty when FULL makes no difference.
    pub fn needs_full_identity(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.operations.update {
            why.push(
                "updates that change no mapped column are sent anyway, because the old row is not known"
                    .to_owned(),
            );
            for f in &self.fields {
                if let FieldSource::List { .. } = f.source {
                    why.push(format!(
                        "list trait {} cannot remove values, because the old row is not known",
                        f.name
                    ));
                }
            }
        }
        if self.operations.delete && self.on_delete != OnDelete::Ignore {
            why.push("a delete carries only the replica identity's columns, so the contact id and other mapped columns are missing unless they are all among them".to_owned());
        }
        why
    }
}

/// Validates one `tables[i]` entry (without the database). Every error
/// past the table's name names the table too, so it can be found without
/// counting entries.
pub(super) fn validate_table(key: &str, t: &TableConfig) -> Result<TableMapping, ConfigError> {
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

pub(super) fn check_column(field: &str, column: &str) -> Result<(), ConfigError> {
    if column.is_empty() || column.len() > 63 {
        return Err(err(field, "must name a column (1 to 63 characters)"));
    }
    Ok(())
}

pub(super) fn check_key(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(err(field, "the name must not be empty"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{Config, ConfigError};
    use super::*;

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
