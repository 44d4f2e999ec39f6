//! Contact ids that live in a related table: a foreign key on the row, an
//! indexed query on the related table, and a bounded cache that the
//! related table's own stream keeps fresh.
//!
//! The cache is filled two ways: from the stream (every insert or update of
//! the related table sets its key's contact id, as of that point in the
//! WAL; a delete or key change forgets it), and on a miss by a query. The
//! stream is read in commit order, so once a change to an employee's email
//! has been read, no later sale can be given the old email from the cache.
//! A query answers as of a snapshot that sees the streamed transaction
//! being read (it is asked again until it does), so a related row written
//! in that same transaction is never missed for its commit not yet being
//! visible.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, Statement};

use super::{LookupTarget, SourceError, Visibility};
use crate::sql::quote_ident;

/// Whose change it is: known from the row, or to be looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactRef {
    Known(String),
    /// Look up `key` in [`Schema::lookups`](super::Schema::lookups)`[lookup]`.
    Lookup {
        lookup: usize,
        key: String,
    },
}

/// A change to a lookup's cache, seen in the related table's own stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheChange {
    /// `key` now resolves to this contact id.
    Set {
        lookup: usize,
        key: String,
        contact: String,
    },
    /// `key` resolves to nothing known any more.
    Forget { lookup: usize, key: String },
}

/// Contact ids cached per lookup. 100,000 covers a large roster whole
/// (about 10 MiB of short emails), so steady streaming seldom queries.
pub(crate) const LOOKUP_CACHE_ENTRIES: usize = 100_000;

/// A bounded map that forgets the least recently used half at a time: two
/// generations, the young one taking every hit, the old one dropped when
/// the young one fills. O(1), no per-entry bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct BoundedCache {
    young: HashMap<String, String>,
    old: HashMap<String, String>,
    /// Entries per generation; the cache holds at most twice this.
    half: usize,
}

impl BoundedCache {
    pub(crate) fn new(capacity: usize) -> BoundedCache {
        BoundedCache {
            young: HashMap::new(),
            old: HashMap::new(),
            half: (capacity / 2).max(1),
        }
    }

    pub(crate) fn get(&mut self, key: &str) -> Option<&String> {
        if !self.young.contains_key(key) {
            let (k, v) = self.old.remove_entry(key)?;
            self.insert(k, v);
        }
        self.young.get(key)
    }

    pub(crate) fn insert(&mut self, key: String, value: String) {
        if self.young.len() >= self.half && !self.young.contains_key(&key) {
            self.old = std::mem::take(&mut self.young);
        }
        self.old.remove(&key);
        self.young.insert(key, value);
    }

    pub(crate) fn remove(&mut self, key: &str) {
        self.young.remove(key);
        self.old.remove(key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

/// Resolves lookup keys to contact ids: cache first, then one indexed
/// query per miss.
pub(crate) struct Resolver {
    client: Arc<Client>,
    targets: Vec<LookupTarget>,
    statements: Vec<Option<Statement>>,
    caches: Vec<BoundedCache>,
    /// The streamed transaction whose rows are being resolved: a query
    /// must see it, or it could miss (or read the old state of) a related
    /// row that transaction wrote. None outside the stream.
    reading: Option<u32>,
}

/// First pause before a lookup is asked again because its snapshot did not
/// yet see the transaction being read; doubles up to [`NOT_VISIBLE_MAX`].
/// A commit turns visible moments after it is in the WAL (longer only while
/// a synchronous standby holds it back).
const NOT_VISIBLE_PAUSE: Duration = Duration::from_millis(2);
const NOT_VISIBLE_MAX: Duration = Duration::from_millis(200);
/// How long a lookup waits for the transaction to turn visible before it
/// says so in the log (it keeps waiting: the answer would otherwise be
/// wrong).
const NOT_VISIBLE_WARN: Duration = Duration::from_secs(5);

impl Resolver {
    pub(crate) fn new(client: Arc<Client>, targets: Vec<LookupTarget>) -> Resolver {
        let n = targets.len();
        Resolver {
            client,
            targets,
            statements: vec![None; n],
            caches: (0..n)
                .map(|_| BoundedCache::new(LOOKUP_CACHE_ENTRIES))
                .collect(),
            reading: None,
        }
    }

    /// The streamed transaction `xid` begins: lookups from now on answer
    /// as of a snapshot that sees it.
    pub(crate) fn reading(&mut self, xid: u32) {
        self.reading = Some(xid);
    }

    /// Applies what the stream said about a related row.
    pub(crate) fn apply(&mut self, change: CacheChange) {
        match change {
            CacheChange::Set {
                lookup,
                key,
                contact,
            } => {
                if let Some(c) = self.caches.get_mut(lookup) {
                    c.insert(key, contact);
                }
            }
            CacheChange::Forget { lookup, key } => {
                if let Some(c) = self.caches.get_mut(lookup) {
                    c.remove(&key);
                }
            }
        }
    }

    /// The contact id for `key`, or None when no related row has it (or
    /// its contact column is NULL or empty).
    pub(crate) async fn resolve(
        &mut self,
        lookup: usize,
        key: &str,
    ) -> Result<Option<String>, SourceError> {
        let metrics = crate::telemetry::metrics();
        if let Some(hit) = self.caches[lookup].get(key) {
            metrics.lookups.with_label_values(&["cached"]).inc();
            return Ok(Some(hit.clone()));
        }
        let target = &self.targets[lookup];
        let statement = match &self.statements[lookup] {
            Some(s) => s.clone(),
            None => {
                // The key arrives as text and is cast to the referenced
                // column's own type, so the comparison can use its index.
                // The statement's snapshot comes with the answer: one
                // statement, one snapshot.
                let sql = format!(
                    "SELECT (SELECT {}::text FROM {} WHERE {} = $1::text::{}), \
                     pg_current_snapshot()::text",
                    quote_ident(&target.column),
                    target.from.quoted(),
                    quote_ident(&target.references),
                    target.key_type
                );
                let s = self.client.prepare(&sql).await.map_err(|e| {
                    SourceError::from_sql(&format!("preparing the lookup into {}", target.from), e)
                })?;
                self.statements[lookup] = Some(s.clone());
                s
            }
        };
        let started = Instant::now();
        let mut pause = NOT_VISIBLE_PAUSE;
        let mut warned = false;
        let row = loop {
            let row = self
                .client
                .query_one(&statement, &[&key])
                .await
                .map_err(|e| {
                    SourceError::from_sql(&format!("looking up a contact in {}", target.from), e)
                })?;
            let seen = match (self.reading, row.get::<_, Option<String>>(1)) {
                (Some(xid), Some(snapshot)) => {
                    Visibility::parse(&snapshot).is_none_or(|v| v.sees(xid))
                }
                _ => true,
            };
            if seen {
                break row;
            }
            // The transaction is in the WAL (this change came from it) but
            // not yet visible: its related rows may be missing or old.
            if !warned && started.elapsed() >= NOT_VISIBLE_WARN {
                warned = true;
                tracing::warn!(
                    xid = self.reading,
                    table = %target.from,
                    "a lookup waits for the streamed transaction to turn visible (a synchronous standby holding commits back?)"
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(NOT_VISIBLE_MAX);
        };
        let contact: Option<String> = row
            .get::<_, Option<String>>(0)
            .filter(|c: &String| !c.is_empty());
        match &contact {
            Some(c) => {
                metrics.lookups.with_label_values(&["queried"]).inc();
                self.caches[lookup].insert(key.to_owned(), c.clone());
            }
            None => metrics.lookups.with_label_values(&["missing"]).inc(),
        }
        Ok(contact)
    }

    /// The contact of a mapped row: as the row gave it, or looked up.
    /// `Err` says why a lookup found none, for the row to be skipped.
    pub(crate) async fn contact(
        &mut self,
        contact: &ContactRef,
    ) -> Result<Result<String, String>, SourceError> {
        let (lookup, key) = match contact {
            ContactRef::Known(c) => return Ok(Ok(c.clone())),
            ContactRef::Lookup { lookup, key } => (*lookup, key),
        };
        Ok(match self.resolve(lookup, key).await? {
            Some(c) => Ok(c),
            None => {
                let t = &self.targets[lookup];
                Err(format!(
                    "no row of {} has {} = {key} (or its {} is empty), so the row belongs to no contact",
                    t.from, t.references, t.column
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_stays_bounded_and_keeps_what_is_used() {
        let mut c = BoundedCache::new(4);
        for i in 0..10 {
            c.insert(format!("k{i}"), format!("v{i}"));
            // k0 is used after every insert, so it is never the one dropped.
            assert_eq!(c.get("k0").map(String::as_str), Some("v0"));
            assert!(c.len() <= 4, "{} entries", c.len());
        }
        assert_eq!(c.get("k9").map(String::as_str), Some("v9"));
        assert_eq!(c.get("k1"), None);
    }

    #[test]
    fn a_newer_value_replaces_and_remove_forgets() {
        let mut c = BoundedCache::new(4);
        c.insert("a".into(), "1".into());
        c.insert("b".into(), "2".into());
        c.insert("c".into(), "3".into());
        // "a" is now in the old generation; a new value must win.
        c.insert("a".into(), "9".into());
        assert_eq!(c.get("a").map(String::as_str), Some("9"));
        c.remove("a");
        assert_eq!(c.get("a"), None);
    }
}
