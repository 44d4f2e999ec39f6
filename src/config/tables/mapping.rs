//! `tables:` after validation: what the rest of the connector reads.

use serde_json::Value;

use super::super::TableName;
use super::{NullPolicy, SnapshotPolicy, TimeFormat};
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
