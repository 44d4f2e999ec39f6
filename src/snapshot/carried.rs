//! Transactions the stream carried on copied tables, kept (as the keys
//! they touched) until a snapshot of the copy's is seen to include them.

use std::sync::Arc;

use crate::config::TableName;
use crate::decode::{Datum, Relation, Tuple};
use crate::source::Key;

/// What a change the stream carried during a window means for the chunk's
/// copy of its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Sent in full, or deleted: the copy is older, drop it.
    Superseded,
    /// Sent in part: read the row again in a later chunk.
    Partial,
    /// Nothing mapped changed (or the operation does not count): the copy
    /// holds what the stream would, keep it.
    Unchanged,
}

/// Changes of carried transactions kept row by row, in one transaction and
/// in all: beyond, the oldest keep only which tables they changed, and a
/// chunk of such a table whose snapshot does not see them is read again
/// whole. Bounds memory under a large transaction or a long idle spell.
pub(super) const CARRIED_CHANGES: usize = 8192;

/// A transaction the stream carried, with its changes to copied tables.
///
/// A chunk only needs to know which keys each change touched, so only the
/// values of the replica identity's key columns are kept, back to back in
/// one buffer per transaction: no allocation per change. A chunk keyed on
/// columns the replica identity does not hold (`REPLICA IDENTITY USING
/// INDEX` on another index) cannot tell which rows changed, and is read
/// again whole if its snapshot missed the transaction.
#[derive(Default, Clone)]
pub(crate) struct Carried {
    pub(super) xid: u32,
    /// The tables it changed; a change names its own by index.
    pub(super) tables: Vec<Arc<Relation>>,
    /// Its changes a chunk may need, unless `whole`.
    pub(super) changes: Vec<CarriedChange>,
    /// The changes' key values (see [`Carried::put_key`]).
    pub(super) keys: Vec<u8>,
    /// Its changes were too many to keep: any row of `tables` may be one.
    pub(super) whole: bool,
}

/// One row change of a [`Carried`] transaction.
#[derive(Clone, Copy)]
pub(super) struct CarriedChange {
    /// Index into [`Carried::tables`].
    pub(super) table: u32,
    /// The old row's key, for a delete or an update of the key.
    pub(super) old: Option<KeySpan>,
    pub(super) new: Option<KeySpan>,
    pub(super) seen: Seen,
}

/// Where one row's key values are in [`Carried::keys`].
#[derive(Clone, Copy)]
pub(super) struct KeySpan {
    start: u32,
    end: u32,
}

/// Key bytes one transaction keeps before it keeps only its tables.
const CARRIED_KEY_BYTES: usize = 4 << 20;

impl Carried {
    /// A transaction begins.
    pub(crate) fn begin(&mut self, xid: u32) {
        self.xid = xid;
        self.changes.clear();
        self.tables.clear();
        self.keys.clear();
        self.whole = false;
    }

    /// Notes a change to a copied table, as [`Window::saw`] takes it:
    /// which table, and the keys of its rows.
    pub(crate) fn push(
        &mut self,
        relation: &Arc<Relation>,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
        seen: Seen,
    ) {
        // Nothing for a chunk to drop or read again (see `note_keys`).
        if seen == Seen::Unchanged && old.is_none() {
            return;
        }
        if !self.whole
            && (self.changes.len() >= CARRIED_CHANGES || self.keys.len() >= CARRIED_KEY_BYTES)
        {
            self.forget_rows();
        }
        let table = match self.tables.iter().position(|r| Arc::ptr_eq(r, relation)) {
            Some(i) => i,
            None => {
                self.tables.push(relation.clone());
                self.tables.len() - 1
            }
        };
        if self.whole {
            return;
        }
        let old = old.map(|t| self.put_key(relation, t));
        let new = new.map(|t| self.put_key(relation, t));
        self.changes.push(CarriedChange {
            table: table as u32,
            old,
            new,
            seen,
        });
    }

    /// Appends the values of `relation`'s key columns in `tuple`: per
    /// column a tag (0 no value, 1 text), then for text its length (4 bytes,
    /// little-endian) and bytes.
    fn put_key(&mut self, relation: &Relation, tuple: &Tuple) -> KeySpan {
        let start = self.keys.len() as u32;
        for (i, c) in relation.columns.iter().enumerate() {
            if !c.key {
                continue;
            }
            match tuple.0.get(i) {
                Some(Datum::Text(b)) => {
                    self.keys.push(1);
                    self.keys.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    self.keys.extend_from_slice(b);
                }
                _ => self.keys.push(0),
            }
        }
        KeySpan {
            start,
            end: self.keys.len() as u32,
        }
    }

    /// The key at `span` in the columns `positions` name (indexes among the
    /// relation's key columns).
    pub(super) fn key(&self, span: KeySpan, positions: &[usize]) -> Key {
        let mut values: Vec<Option<&[u8]>> = Vec::new();
        let mut at = span.start as usize;
        let end = span.end as usize;
        while at < end {
            let tag = self.keys[at];
            at += 1;
            if tag == 1 {
                let mut len = [0u8; 4];
                len.copy_from_slice(&self.keys[at..at + 4]);
                let len = u32::from_le_bytes(len) as usize;
                at += 4;
                values.push(Some(&self.keys[at..at + len]));
                at += len;
            } else {
                values.push(None);
            }
        }
        positions
            .iter()
            .map(|p| {
                values
                    .get(*p)
                    .copied()
                    .flatten()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            })
            .collect()
    }

    /// Whether it holds nothing a chunk could need: then it is not
    /// recorded at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Keeps only which tables its changes were to.
    pub(super) fn forget_rows(&mut self) {
        self.changes = Vec::new();
        self.keys = Vec::new();
        self.whole = true;
    }

    /// Whether it changed `table` (known once `whole`).
    pub(super) fn changed(&self, table: &TableName) -> bool {
        self.tables
            .iter()
            .any(|r| r.namespace == table.schema && r.name == table.name)
    }
}
