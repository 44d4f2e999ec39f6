//! What the catalog said at startup, for the mapping: column types and the
//! lookups' targets.

use std::collections::HashMap;

use crate::config::{Lookup, TableName};
use crate::decode::value::ValueKind;

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
    /// One per distinct lookup; [`ContactRef::Lookup`](super::ContactRef::Lookup) indexes this.
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
