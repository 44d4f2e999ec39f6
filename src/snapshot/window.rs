//! A chunk between its watermarks, shared by the copy and the reader:
//! which of the chunk's rows the stream changed meanwhile, and so which
//! of them are sent, dropped or read again.

use std::collections::{HashMap, HashSet, VecDeque};

use tokio::sync::oneshot;

use crate::config::TableName;
use crate::decode::{Relation, Tuple};
use crate::mapping::Action;
use crate::source::{key_at, Key};
use crate::state::WATERMARK_PREFIX;

use super::carried::{Carried, Seen, CARRIED_CHANGES};
use crate::source::Visibility;

/// A chunk between its watermarks, shared by the copy and the reader.
#[derive(Default)]
pub(crate) struct Window {
    /// The chunk the copy is about to read (id, table, key columns): set
    /// before its low watermark is written, so the reader ignores
    /// watermarks of earlier runs.
    expected: Option<(String, TableName, Vec<String>)>,
    /// Set once the reader saw the low watermark.
    open: Option<OpenWindow>,
    /// The chunk's rows, put here before the high watermark is written.
    rows: Option<Chunk>,
    /// Keys of the last chunk to read again: the stream changed them
    /// between its watermarks without carrying their whole state.
    redo: Vec<Key>,
    /// The whole last chunk is to be read again: a transaction too large
    /// to keep row by row changed its table unseen by its snapshot.
    unsure: bool,
    /// Transactions the stream carried with changes to copied tables that
    /// no snapshot of the copy's has yet been seen to include (see
    /// [`Window::carried`]).
    unseen: VecDeque<Carried>,
    /// Changes held in `unseen`, at most [`CARRIED_CHANGES`].
    unseen_changes: usize,
    /// How many of `unseen`'s oldest transactions hold no rows: the cap
    /// sheds rows from here on, so each transaction is visited once, not
    /// once per commit.
    rowless: usize,
    /// Transactions [`Window::carried`] looked at to keep the cap.
    #[cfg(test)]
    shed_visits: usize,
}

struct OpenWindow {
    id: String,
    table: TableName,
    /// Keys whose change the stream sent in full (or deleted) since the
    /// low watermark: the stream's value is newer than the chunk's.
    superseded: HashSet<Key>,
    /// Keys the stream changed but sent only in part (list diffs, large
    /// values left out): the chunk's copy may be older, and the change
    /// alone does not hold the whole row.
    partial: HashSet<Key>,
    /// Key column indexes per relation id, found by name.
    key_columns: Vec<String>,
    indexes: HashMap<u32, Option<Vec<usize>>>,
}

impl OpenWindow {
    /// Notes a change to the chunk's table the stream carried while the
    /// window is open: `new` (absent for a delete) as `seen` says; an `old`
    /// row under another key (a delete, or an update of the key) is gone,
    /// so superseded.
    fn note(&mut self, relation: &Relation, old: Option<&Tuple>, new: Option<&Tuple>, seen: Seen) {
        if relation.namespace != self.table.schema || relation.name != self.table.name {
            return;
        }
        let key_columns = &self.key_columns;
        let indexes = self
            .indexes
            .entry(relation.id)
            .or_insert_with(|| key_indexes(key_columns, relation));
        if let Some(indexes) = indexes {
            note_keys(
                &mut self.superseded,
                &mut self.partial,
                old.map(|t| key_at(t, indexes)),
                new.map(|t| key_at(t, indexes)),
                seen,
            );
        }
    }

    /// Notes the changes of a transaction carried earlier, under each
    /// relation as it was then. True when the chunk cannot tell which of its
    /// rows a change touched (its key columns are not all in that
    /// relation's replica identity): the whole chunk is then read again.
    fn note_carried(&mut self, t: &Carried) -> bool {
        // Per table of the transaction, once: each key column's place among
        // the relation's key columns, or None when one is not there; no
        // entry for another table than the chunk's.
        let positions: Vec<Option<Option<Vec<usize>>>> = t
            .tables
            .iter()
            .map(|relation| {
                if relation.namespace != self.table.schema || relation.name != self.table.name {
                    return None;
                }
                let identity: Vec<&str> = relation
                    .columns
                    .iter()
                    .filter(|c| c.key)
                    .map(|c| c.name.as_str())
                    .collect();
                Some(
                    self.key_columns
                        .iter()
                        .map(|k| identity.iter().position(|c| c == k))
                        .collect(),
                )
            })
            .collect();
        let mut unsure = false;
        for c in &t.changes {
            match positions.get(c.table as usize) {
                Some(Some(Some(positions))) => note_keys(
                    &mut self.superseded,
                    &mut self.partial,
                    c.old.map(|s| t.key(s, positions)),
                    c.new.map(|s| t.key(s, positions)),
                    c.seen,
                ),
                Some(Some(None)) => unsure = true,
                _ => {}
            }
        }
        unsure
    }
}

/// Where the key columns are in `relation`'s tuples (None when one is
/// missing).
fn key_indexes(key_columns: &[String], relation: &Relation) -> Option<Vec<usize>> {
    key_columns
        .iter()
        .map(|k| relation.columns.iter().position(|c| c.name == *k))
        .collect()
}

/// Notes one change's keys; see [`OpenWindow::note`].
fn note_keys(
    superseded: &mut HashSet<Key>,
    partial: &mut HashSet<Key>,
    old_key: Option<Key>,
    new_key: Option<Key>,
    seen: Seen,
) {
    if let Some(old_key) = old_key {
        if new_key.as_ref() != Some(&old_key) {
            superseded.insert(old_key);
        }
    }
    if let Some(key) = new_key {
        match seen {
            Seen::Superseded => superseded.insert(key),
            Seen::Partial => partial.insert(key),
            Seen::Unchanged => false,
        };
    }
}

/// A chunk's rows, mapped, with the marker to fire once delivered.
pub(crate) struct Chunk {
    pub(super) rows: Vec<(Key, Vec<Action>)>,
    /// The snapshot the rows were read in.
    pub(super) snapshot: Visibility,
    pub(super) done: oneshot::Sender<()>,
}

/// What a watermark message asks of the reader.
pub(crate) enum Watermark {
    Low(String),
    High(String),
    Resync,
    /// `dead-letters retry` asked the running connector for a retry.
    RetryDeadLetters,
}

/// Parses one of the connector's messages for this slot.
pub(crate) fn watermark(prefix: &str, content: &[u8], slot: &str) -> Option<Watermark> {
    if prefix != WATERMARK_PREFIX {
        return None;
    }
    let text = std::str::from_utf8(content).ok()?;
    let (kind, rest) = text.split_once(':')?;
    let (for_slot, id) = rest.split_once(':').unwrap_or((rest, ""));
    if for_slot != slot {
        return None;
    }
    match kind {
        "lw" => Some(Watermark::Low(id.to_owned())),
        "hw" => Some(Watermark::High(id.to_owned())),
        "resync" => Some(Watermark::Resync),
        "retry" => Some(Watermark::RetryDeadLetters),
        _ => None,
    }
}

impl Window {
    /// The chunk `id` of `table` (keyed on `key_columns`) is about to be
    /// read: its low watermark follows.
    pub(super) fn expect(&mut self, id: &str, table: &TableName, key_columns: &[String]) {
        self.expected = Some((id.to_owned(), table.clone(), key_columns.to_vec()));
        self.open = None;
        self.rows = None;
        self.redo.clear();
        self.unsure = false;
    }

    /// The chunk's rows, read: they wait here for the high watermark.
    pub(super) fn hold(&mut self, chunk: Chunk) {
        self.rows = Some(chunk);
    }

    /// The low watermark `id` was read: from now on, changes to the
    /// chunk's table are noted.
    pub(crate) fn low(&mut self, id: &str) {
        match &self.expected {
            Some((expected, table, key_columns)) if expected == id => {
                self.open = Some(OpenWindow {
                    id: id.to_owned(),
                    table: table.clone(),
                    superseded: HashSet::new(),
                    partial: HashSet::new(),
                    key_columns: key_columns.clone(),
                    indexes: HashMap::new(),
                });
            }
            _ => {}
        }
    }

    /// Whether a window is open (the reader then reports changes).
    pub(crate) fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Notes a change the stream carried while the window is open.
    pub(crate) fn saw(
        &mut self,
        relation: &Relation,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
        seen: Seen,
    ) {
        if let Some(open) = &mut self.open {
            open.note(relation, old, new, seen);
        }
    }

    /// Records a transaction the stream carried with changes to copied
    /// tables, for every chunk whose snapshot turns out not to include it.
    /// Its commit is in the WAL (and so in the stream) a moment before new
    /// snapshots see it: a chunk read in that moment, even after the low
    /// watermark, holds the older row although the stream already sent the
    /// newer one before the window opened.
    pub(crate) fn carried(&mut self, transaction: &mut Carried) {
        let t = std::mem::take(transaction);
        self.unseen_changes += t.changes.len();
        self.unseen.push_back(t);
        while self.unseen_changes > CARRIED_CHANGES {
            let Some(t) = self.unseen.get_mut(self.rowless) else {
                break;
            };
            #[cfg(test)]
            {
                self.shed_visits += 1;
            }
            self.unseen_changes -= t.changes.len();
            t.forget_rows();
            self.rowless += 1;
        }
    }

    /// Forgets the carried transactions `snapshot` sees: every snapshot
    /// taken after it sees them too.
    pub(crate) fn settle(&mut self, snapshot: &Visibility) {
        self.unseen.retain(|t| !snapshot.sees(t.xid));
        self.unseen_changes = self.unseen.iter().map(|t| t.changes.len()).sum();
        self.rowless = self
            .unseen
            .iter()
            .position(|t| !t.changes.is_empty())
            .unwrap_or(self.unseen.len());
    }

    /// The high watermark `id` was read: the chunk's rows the stream did
    /// not change since the low one, nor in a transaction the chunk's
    /// snapshot does not see, and the marker for when they are delivered.
    /// Rows the stream changed in part are left for the copy to read again
    /// ([`Window::take_redo`]).
    pub(crate) fn high(&mut self, id: &str) -> Option<(Vec<Action>, oneshot::Sender<()>)> {
        let mut open = self.open.take_if(|o| o.id == id)?;
        let chunk = self.rows.take()?;
        self.expected = None;
        // Everything the stream carried so far came before this place, so
        // a change the snapshot does not see is newer than the copy.
        let mut whole = false;
        for t in self.unseen.iter().filter(|t| !chunk.snapshot.sees(t.xid)) {
            whole |= t.whole && t.changed(&open.table);
            whole |= open.note_carried(t);
        }
        self.settle(&chunk.snapshot);
        let mut actions = Vec::new();
        for (key, row) in chunk.rows {
            if open.superseded.contains(&key) {
                continue;
            }
            // Changed or not by a transaction too large to keep row by
            // row: read again.
            if whole || open.partial.contains(&key) {
                self.unsure |= whole;
                self.redo.push(key);
                continue;
            }
            actions.extend(row);
        }
        Some((actions, chunk.done))
    }

    /// Keys the last chunk left to read again, and whether that is every
    /// key of it (see [`Window::unsure`]).
    pub(super) fn take_redo(&mut self) -> (Vec<Key>, bool) {
        (
            std::mem::take(&mut self.redo),
            std::mem::take(&mut self.unsure),
        )
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use std::sync::Arc;

    use super::*;
    use crate::decode::{Column, Datum};
    use crate::lsn::Lsn;
    use crate::mapping::{ActionBody, Fields};

    fn relation() -> Arc<Relation> {
        let column = |name: &str| Column {
            key: name == "id",
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        Arc::new(Relation {
            id: 42,
            namespace: "public".into(),
            name: "employees".into(),
            replica_identity: b'd',
            columns: vec![column("id"), column("email")],
        })
    }

    fn row(id: &str) -> Tuple {
        Tuple(vec![
            Datum::Text(Bytes::from(id.to_owned())),
            Datum::Text(Bytes::from(format!("e{id}@acme.test"))),
        ])
    }

    fn action(id: &str) -> Action {
        Action {
            table: "public.employees".into(),
            lsn: Lsn::ZERO,
            contact: format!("e{id}@acme.test"),
            key: None,
            body: ActionBody::Identify {
                traits: Fields::default(),
            },
        }
    }

    /// A chunk of rows 1..=3 read in `snapshot`, after the stream carried
    /// `carried` (xid, row id, how) before its low watermark.
    fn chunk_after(
        carried: &[(u32, &str, Seen)],
        snapshot: &str,
    ) -> (Vec<String>, Vec<Key>, Window) {
        let mut w = Window::default();
        for (xid, id, seen) in carried {
            let mut t = Carried::default();
            t.begin(*xid);
            t.push(&relation(), None, Some(&row(id)), *seen);
            w.carried(&mut t);
        }
        w.expected = Some((
            "c-1".into(),
            TableName::parse("public.employees").unwrap(),
            vec!["id".into()],
        ));
        w.low("c-1");
        let (done, _) = oneshot::channel();
        w.rows = Some(Chunk {
            rows: ["1", "2", "3"]
                .iter()
                .map(|id| (vec![Some(id.to_string())], vec![action(id)]))
                .collect(),
            snapshot: Visibility::parse(snapshot).unwrap(),
            done,
        });
        let (actions, _) = w.high("c-1").unwrap();
        let sent = actions.into_iter().map(|a| a.contact).collect();
        let (redo, unsure) = w.take_redo();
        assert!(!unsure);
        (sent, redo, w)
    }

    #[test]
    fn a_change_streamed_before_the_window_that_the_chunk_did_not_see_wins() {
        // 100 committed and streamed, but the chunk's snapshot still had it
        // in progress; 90 the chunk saw.
        let (sent, redo, w) = chunk_after(
            &[
                (90, "1", Seen::Superseded),
                (100, "2", Seen::Superseded),
                (101, "3", Seen::Partial),
            ],
            "95:102:100,101",
        );
        assert_eq!(sent, vec!["e1@acme.test".to_owned()]);
        assert_eq!(redo, vec![vec![Some("3".to_owned())]]);
        // What the chunk's snapshot saw is forgotten; the rest is kept for
        // the next chunk.
        let kept: Vec<u32> = w.unseen.iter().map(|t| t.xid).collect();
        assert_eq!(kept, vec![100, 101]);
        assert_eq!(w.unseen_changes, 2);
    }

    #[test]
    fn changes_the_chunk_saw_leave_it_whole_and_are_forgotten() {
        let (sent, redo, w) = chunk_after(
            &[(90, "1", Seen::Superseded), (91, "2", Seen::Partial)],
            "95:102:",
        );
        assert_eq!(sent.len(), 3);
        assert!(redo.is_empty());
        assert!(w.unseen.is_empty());
    }

    #[test]
    fn only_the_replica_identity_key_of_a_carried_row_is_kept() {
        let mut t = Carried::default();
        t.begin(100);
        t.push(
            &relation(),
            Some(&row("1")),
            Some(&row("22")),
            Seen::Superseded,
        );
        t.push(&relation(), None, Some(&row("3")), Seen::Partial);
        // Tag, length and bytes of `id` per row; no email.
        assert_eq!(t.keys.len(), 3 * (1 + 4) + 4);
        let keys: Vec<(Option<Key>, Option<Key>)> = t
            .changes
            .iter()
            .map(|c| (c.old.map(|s| t.key(s, &[0])), c.new.map(|s| t.key(s, &[0]))))
            .collect();
        let k = |id: &str| Some(vec![Some(id.to_owned())]);
        assert_eq!(keys, vec![(k("1"), k("22")), (None, k("3"))]);
    }

    #[test]
    fn a_chunk_keyed_on_columns_outside_the_replica_identity_is_read_again_whole() {
        let mut w = Window::default();
        let mut t = Carried::default();
        t.begin(100);
        t.push(&relation(), None, Some(&row("2")), Seen::Superseded);
        w.carried(&mut t);
        // Keyed on `email`, which the stream's key values do not hold.
        w.expected = Some((
            "c-1".into(),
            TableName::parse("public.employees").unwrap(),
            vec!["email".into()],
        ));
        w.low("c-1");
        let (done, _) = oneshot::channel();
        w.rows = Some(Chunk {
            rows: vec![(vec![Some("e2@acme.test".into())], vec![action("2")])],
            snapshot: Visibility::parse("95:102:100").unwrap(),
            done,
        });
        let (actions, _) = w.high("c-1").unwrap();
        assert!(actions.is_empty());
        let (redo, unsure) = w.take_redo();
        assert!(unsure);
        assert_eq!(redo, vec![vec![Some("e2@acme.test".to_owned())]]);
    }

    #[test]
    fn a_transaction_too_large_to_keep_row_by_row_has_the_whole_chunk_read_again() {
        let mut w = Window::default();
        let mut t = Carried::default();
        t.begin(100);
        for i in 0..CARRIED_CHANGES + 5 {
            t.push(
                &relation(),
                None,
                Some(&row(&(1000 + i).to_string())),
                Seen::Superseded,
            );
        }
        assert!(t.whole && t.changes.is_empty());
        w.carried(&mut t);
        // Later small transactions push the oldest kept rows out instead.
        for xid in 101..111 {
            let mut t = Carried::default();
            t.begin(xid);
            for i in 0..CARRIED_CHANGES / 4 {
                t.push(
                    &relation(),
                    None,
                    Some(&row(&i.to_string())),
                    Seen::Superseded,
                );
            }
            w.carried(&mut t);
        }
        assert!(w.unseen_changes <= CARRIED_CHANGES);
        assert_eq!(w.unseen.len(), 11);
        assert!(w.unseen.iter().take(7).all(|t| t.whole));
        w.expected = Some((
            "c-1".into(),
            TableName::parse("public.employees").unwrap(),
            vec!["id".into()],
        ));
        w.low("c-1");
        let (done, _) = oneshot::channel();
        w.rows = Some(Chunk {
            rows: vec![(vec![Some("1".to_owned())], vec![action("1")])],
            snapshot: Visibility::parse("100:200:100").unwrap(),
            done,
        });
        let (actions, _) = w.high("c-1").unwrap();
        assert!(actions.is_empty());
        assert_eq!(w.take_redo(), (vec![vec![Some("1".to_owned())]], true));
        assert_eq!(w.unseen.len(), 1);
    }

    #[test]
    fn many_small_transactions_past_the_cap_are_each_shed_once() {
        // Single-change transactions well past the cap, with no snapshot
        // settling them meanwhile (a backlog between two idle polls): each
        // commit sheds the oldest rows without walking every transaction
        // shed before it.
        let mut w = Window::default();
        let n = 4 * CARRIED_CHANGES;
        for xid in 0..n {
            let mut t = Carried::default();
            t.begin(1000 + xid as u32);
            t.push(
                &relation(),
                None,
                Some(&row(&xid.to_string())),
                Seen::Superseded,
            );
            w.carried(&mut t);
        }
        assert_eq!(w.unseen.len(), n);
        assert_eq!(w.unseen_changes, CARRIED_CHANGES);
        // The newest keep their rows, the oldest only their tables.
        assert!(w.unseen.iter().take(n - CARRIED_CHANGES).all(|t| t.whole));
        assert!(w.unseen.iter().skip(n - CARRIED_CHANGES).all(|t| !t.whole));
        assert!(
            w.shed_visits <= n,
            "{} transactions looked at to shed {} rows",
            w.shed_visits,
            n - CARRIED_CHANGES
        );
        // Settling keeps the count of rowless ones right.
        w.settle(&Visibility::parse(&format!("{0}:{0}:", 1000 + n - 10)).unwrap());
        assert_eq!(w.unseen.len(), 10);
        assert_eq!(w.rowless, 0);
        assert_eq!(w.unseen_changes, 10);
    }

    #[test]
    fn a_change_that_cannot_touch_a_chunk_is_not_kept() {
        let mut t = Carried::default();
        t.begin(7);
        t.push(&relation(), None, Some(&row("1")), Seen::Unchanged);
        // Nothing a chunk could need: not recorded (no lock, no entry).
        assert!(t.is_empty());
        // Unless its old row is under another key.
        t.push(
            &relation(),
            Some(&row("1")),
            Some(&row("2")),
            Seen::Unchanged,
        );
        assert_eq!(t.changes.len(), 1);
        assert!(!t.is_empty());
    }

    #[test]
    fn settling_forgets_what_a_later_snapshot_sees() {
        let mut w = Window::default();
        for xid in [100, 105] {
            let mut t = Carried::default();
            t.begin(xid);
            t.push(&relation(), None, Some(&row("1")), Seen::Superseded);
            w.carried(&mut t);
        }
        w.settle(&Visibility::parse("100:110:100").unwrap());
        assert_eq!(
            w.unseen.iter().map(|t| t.xid).collect::<Vec<_>>(),
            vec![100]
        );
        assert_eq!(w.unseen_changes, 1);
    }
}
