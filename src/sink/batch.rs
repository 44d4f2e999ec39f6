//! Groups actions into ConveYour requests while keeping each contact's
//! actions in commit order.
//!
//! Identify entries share array requests; track events go one contact per
//! request (the API documents no multi-contact track call). A flush sends
//! the identify requests first, then the track requests, so a contact's
//! identify is never overtaken by its later events. The one order that
//! flush order cannot keep, an identify after an event for the same
//! contact, makes [`Batcher::must_flush_before`] ask for a flush first.

use std::collections::HashMap;
#[cfg(test)]
use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use super::coalesce::fold_traits;
use super::request::{build, Item, Request};
use super::Endpoint;
use crate::mapping::{Action, ActionBody, Fields};

/// Pending actions, grouped into requests.
pub(crate) struct Batcher {
    batch_size: usize,
    /// Fold a contact's identifies within one batch into one entry.
    coalesce: bool,
    identify: Vec<Item>,
    /// With coalescing: each pending identify's contact → its index, and
    /// the identifies folded into each entry.
    identify_index: ContactIndex,
    identify_merged: Vec<Vec<u64>>,
    /// Track events by contact, in order of each contact's first event.
    tracks: Vec<(String, Vec<Item>)>,
    track_index: ContactIndex,
    track_count: usize,
}

/// Pending entries by contact, keyed by a 64-bit hash of the contact id
/// so that indexing an action copies nothing (a `String` key meant an
/// allocation per identify). The entry's own contact settles whether a
/// hit is the contact or another with the same hash.
struct ContactIndex {
    entries: HashMap<u64, usize, ContactKeyHash>,
    /// [`contact_key`]; tests put a colliding one here.
    key: fn(&str) -> u64,
}

impl Default for ContactIndex {
    fn default() -> ContactIndex {
        ContactIndex {
            entries: HashMap::default(),
            key: contact_key,
        }
    }
}

/// Where a contact stands in a [`ContactIndex`].
enum Slot {
    Found(usize),
    /// Another contact holds the key.
    Taken,
    Absent,
}

impl ContactIndex {
    /// Looks `contact` up; `contact_at` gives the contact of an entry.
    fn find<'a>(&self, contact: &str, contact_at: impl Fn(usize) -> &'a String) -> Slot {
        match self.entries.get(&(self.key)(contact)) {
            Some(&i) if contact_at(i) == contact => Slot::Found(i),
            Some(_) => Slot::Taken,
            None => Slot::Absent,
        }
    }

    fn set(&mut self, contact: &str, at: usize) {
        self.entries.insert((self.key)(contact), at);
    }

    fn clear(&mut self) {
        self.entries.clear();
    }
}

/// FNV-1a of a contact id: a few cycles for a short id. Keys the
/// batcher's pending entries and delivery's per-contact claims
/// (`pipeline::delivery::order`); both live in memory only, and a
/// collision costs no correctness (the batcher checks the contact, and
/// two claims sharing a key only wait for each other).
pub(crate) fn contact_key(contact: &str) -> u64 {
    fnv1a(0xcbf2_9ce4_8422_2325, contact.as_bytes())
}

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Builds the hasher of maps keyed by [`contact_key`]s: the key, already a
/// hash, goes to the map unchanged (no SipHash per lookup).
pub(crate) type ContactKeyHash = BuildHasherDefault<KeyHasher>;

/// Hands a [`contact_key`], already a hash, to the map unchanged.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    /// Not used for the map's `u64` keys; any bytes still hash.
    fn write(&mut self, bytes: &[u8]) {
        self.0 = fnv1a(self.0, bytes);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Batcher {
    pub(crate) fn new(batch_size: usize, coalesce: bool) -> Batcher {
        Batcher {
            batch_size,
            coalesce,
            identify: Vec::new(),
            identify_index: ContactIndex::default(),
            identify_merged: Vec::new(),
            tracks: Vec::new(),
            track_index: ContactIndex::default(),
            track_count: 0,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.identify.is_empty() && self.track_count == 0
    }

    /// Enough for a full request: send now rather than wait.
    pub(crate) fn is_full(&self) -> bool {
        self.identify.len() >= self.batch_size || self.track_count >= self.batch_size
    }

    /// Whether the pending actions must go out before this one to keep its
    /// contact's order: an identify may not join a batch that already holds
    /// an event for the same contact, since identifies are sent first.
    pub(crate) fn must_flush_before(&self, action: &Action) -> bool {
        // A contact whose key is taken by another may have events too:
        // flush then as well.
        matches!(action.body, ActionBody::Identify { .. })
            && !matches!(
                self.track_index
                    .find(&action.contact, |i| &self.tracks[i].0),
                Slot::Absent
            )
    }

    /// Adds an action. With coalescing, an identify for a contact that
    /// already has one pending merges into it when the two fold into one
    /// entry with the same effect ([`fold_traits`]): a plain value replaces,
    /// counters add up, list operations combine. Otherwise it becomes a new
    /// entry after the first. (Order is safe: `must_flush_before` already
    /// flushed any event of the contact that came between.)
    pub(crate) fn push(&mut self, seq: u64, action: Action) {
        match action.body {
            ActionBody::Identify { .. } if self.coalesce => {
                let slot = self
                    .identify_index
                    .find(&action.contact, |i| &self.identify[i].1.contact);
                if let Slot::Found(i) = slot {
                    if let (
                        ActionBody::Identify { traits },
                        ActionBody::Identify { traits: later },
                    ) = (&mut self.identify[i].1.body, &action.body)
                    {
                        let folded = traits
                            .to_map()
                            .zip(later.to_map())
                            .and_then(|(earlier, later)| fold_traits(&earlier, &later));
                        if let Some(folded) = folded {
                            *traits = Fields::from_map(&folded);
                            self.identify_merged[i].push(seq);
                            return;
                        }
                    }
                }
                // The newest entry of its contact takes the key (from
                // another contact too, which then just does not coalesce).
                self.identify_index
                    .set(&action.contact, self.identify.len());
                self.identify.push((seq, action));
                self.identify_merged.push(Vec::new());
            }
            ActionBody::Identify { .. } => self.identify.push((seq, action)),
            ActionBody::Track { .. } => {
                self.track_count += 1;
                match self
                    .track_index
                    .find(&action.contact, |i| &self.tracks[i].0)
                {
                    Slot::Found(i) => self.tracks[i].1.push((seq, action)),
                    // A contact whose key another holds starts a group of its
                    // own; its groups go out in order, so its events do too.
                    Slot::Absent | Slot::Taken => {
                        self.track_index.set(&action.contact, self.tracks.len());
                        self.tracks
                            .push((action.contact.clone(), vec![(seq, action)]));
                    }
                }
            }
        }
    }

    /// Takes everything pending as requests, identify requests first.
    pub(crate) fn take(&mut self) -> Vec<Request> {
        let mut out = Vec::new();
        let mut identify = std::mem::take(&mut self.identify);
        let mut merged = std::mem::take(&mut self.identify_merged);
        self.identify_index.clear();
        while !identify.is_empty() {
            let at = identify.len().min(self.batch_size);
            let rest = identify.split_off(at);
            let merged_rest = if merged.is_empty() {
                Vec::new()
            } else {
                merged.split_off(at)
            };
            out.push(build(
                Endpoint::Identify,
                std::mem::replace(&mut identify, rest),
                std::mem::replace(&mut merged, merged_rest),
            ));
        }
        self.track_index.clear();
        self.track_count = 0;
        for (_, mut events) in std::mem::take(&mut self.tracks) {
            while !events.is_empty() {
                let rest = events.split_off(events.len().min(self.batch_size));
                out.push(build(
                    Endpoint::Track,
                    std::mem::replace(&mut events, rest),
                    Vec::new(),
                ));
            }
        }
        out
    }

    /// Takes the full identify requests, leaving the rest to fill up, when
    /// only identifies are pending; otherwise everything, as
    /// [`Self::take`] (an event left behind could not keep its contact's
    /// order with the identifies taken). A busy stream that forms requests
    /// as batches fill then sends `batch_size` entries per request rather
    /// than a full one and a remainder.
    pub(crate) fn take_full(&mut self) -> Vec<Request> {
        let full = self.identify.len() / self.batch_size.max(1) * self.batch_size.max(1);
        if self.track_count > 0 || full == 0 || full == self.identify.len() {
            return self.take();
        }
        let rest = self.identify.split_off(full);
        let rest_merged = if self.identify_merged.is_empty() {
            Vec::new()
        } else {
            self.identify_merged.split_off(full)
        };
        let out = self.take();
        for (i, (_, action)) in rest.iter().enumerate() {
            if self.coalesce {
                self.identify_index.set(&action.contact, i);
            }
        }
        self.identify = rest;
        self.identify_merged = rest_merged;
        out
    }

    /// Contacts with pending actions, for tests of ordering.
    #[cfg(test)]
    fn contacts(&self) -> HashSet<&str> {
        self.identify
            .iter()
            .map(|(_, a)| a.contact.as_str())
            .chain(self.tracks.iter().map(|(c, _)| c.as_str()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::{body_hash, single_body};
    use serde_json::Value;

    use super::*;
    use std::sync::Arc;

    use crate::lsn::Lsn;
    use serde_json::json;

    fn identify(contact: &str, lsn: u64, traits: Value) -> Action {
        Action {
            table: Arc::from("public.employees"),
            lsn: Lsn(lsn),
            contact: contact.into(),
            body: ActionBody::Identify {
                traits: Fields::from_map(traits.as_object().unwrap()),
            },
            key: None,
        }
    }

    fn track(contact: &str, lsn: u64, amount: i64) -> Action {
        Action {
            table: Arc::from("public.sales"),
            lsn: Lsn(lsn),
            contact: contact.into(),
            body: ActionBody::Track {
                event: Arc::from("made_sale"),
                properties: Fields::from_map(json!({ "amount": amount }).as_object().unwrap()),
            },
            key: None,
        }
    }

    fn body(r: &Request) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn taking_full_requests_leaves_the_remainder_to_fill() {
        let mut b = Batcher::new(3, true);
        for i in 0..7u64 {
            b.push(i, identify(&format!("c{i}"), i, json!({"n": i})));
        }
        let out = b.take_full();
        assert_eq!(out.iter().map(Request::count).collect::<Vec<_>>(), [3, 3]);
        assert_eq!(b.contacts(), ["c6"].into_iter().collect());
        // The remainder still coalesces with a later identify of its contact.
        b.push(7, identify("c6", 7, json!({"n": 70})));
        let out = b.take();
        assert_eq!(out.len(), 1);
        assert_eq!(body(&out[0]), json!([{"id": "c6", "traits": {"n": 70}}]));
        assert_eq!(out[0].seqs(), [6, 7]);
        // With an event pending, everything goes.
        b.push(8, identify("a", 8, json!({})));
        b.push(9, identify("b", 9, json!({})));
        b.push(10, identify("c", 10, json!({})));
        b.push(11, identify("d", 11, json!({})));
        b.push(12, track("d", 12, 1));
        assert_eq!(b.take_full().len(), 3);
        assert!(b.is_empty());
    }

    #[test]
    fn identify_entries_share_array_requests_of_batch_size() {
        let mut b = Batcher::new(2, false);
        for (i, c) in ["a", "b", "c"].iter().enumerate() {
            b.push(i as u64, identify(c, i as u64, json!({ "n": i })));
        }
        assert!(b.is_full());
        let reqs = b.take();
        assert!(b.is_empty());
        assert_eq!(reqs.len(), 2);
        assert_eq!(
            body(&reqs[0]),
            json!([{"id": "a", "traits": {"n": 0}}, {"id": "b", "traits": {"n": 1}}])
        );
        assert_eq!(body(&reqs[1]), json!([{"id": "c", "traits": {"n": 2}}]));
        assert_eq!(reqs[0].count(), 2);
        assert_eq!(reqs[0].endpoint, Endpoint::Identify);
    }

    #[test]
    fn track_events_go_one_contact_per_request_after_identifies() {
        let mut b = Batcher::new(10, false);
        b.push(1, track("a", 1, 10));
        b.push(2, identify("a", 2, json!({ "x": 1 })));
        b.push(3, track("b", 3, 20));
        b.push(4, track("a", 4, 30));
        let reqs = b.take();
        let endpoints: Vec<_> = reqs.iter().map(|r| r.endpoint).collect();
        assert_eq!(
            endpoints,
            [Endpoint::Identify, Endpoint::Track, Endpoint::Track]
        );
        assert_eq!(
            body(&reqs[1]),
            json!({"id": "a", "events": [
                {"event": "made_sale", "properties": {"amount": 10}},
                {"event": "made_sale", "properties": {"amount": 30}}
            ]})
        );
        assert_eq!(body(&reqs[2])["id"], "b");
    }

    #[test]
    fn identify_after_an_event_of_the_same_contact_asks_for_a_flush() {
        let mut b = Batcher::new(10, false);
        b.push(1, track("a", 1, 10));
        assert!(b.must_flush_before(&identify("a", 2, json!({}))));
        assert!(!b.must_flush_before(&identify("b", 2, json!({}))));
        assert!(!b.must_flush_before(&track("a", 2, 1)));
        b.take();
        assert!(!b.must_flush_before(&identify("a", 2, json!({}))));
        assert!(b.contacts().is_empty());
    }

    #[test]
    fn idempotency_key_is_deterministic() {
        let mut b = Batcher::new(10, false);
        b.push(1, identify("a", 0x10, json!({})));
        b.push(2, identify("b", 0x20, json!({})));
        let r = b.take().remove(0);
        let key = r.idempotency_key();
        assert!(key.starts_with("identify-10-"), "{key}");
        assert_eq!(key, r.clone().idempotency_key(), "deterministic");
        // Same position, other content: another key.
        let mut b = Batcher::new(10, false);
        b.push(1, identify("a", 0x10, json!({ "x": 1 })));
        b.push(2, identify("b", 0x20, json!({})));
        assert_ne!(b.take().remove(0).idempotency_key(), key);
    }

    #[test]
    fn the_body_hash_tells_apart_bodies_that_differ_anywhere() {
        let base: Vec<u8> = (0..37u8).collect();
        let h = body_hash(&base);
        assert_eq!(h, body_hash(&base.clone()), "deterministic");
        for i in 0..base.len() {
            let mut other = base.clone();
            other[i] ^= 1;
            assert_ne!(body_hash(&other), h, "byte {i}");
        }
        // Trailing zeros and a shorter body differ too.
        let mut longer = base.clone();
        longer.push(0);
        assert_ne!(body_hash(&longer), h);
        assert_ne!(body_hash(&base[..36]), h);
        assert_ne!(body_hash(b""), body_hash(&[0]));
    }

    #[test]
    fn coalescing_adds_counters_and_combines_list_operations() {
        let traits = |v: Value| v.as_object().unwrap().clone();
        let fold = |a: Value, b: Value| fold_traits(&traits(a), &traits(b)).map(Value::Object);
        assert_eq!(
            fold(
                json!({"n": {"$inc": 2}, "x": 1}),
                json!({"n": {"$inc": 3}, "x": 2})
            ),
            Some(json!({"n": {"$inc": 5}, "x": 2}))
        );
        assert_eq!(
            fold(json!({"n": 10}), json!({"n": {"$inc": 3}})),
            Some(json!({"n": 13}))
        );
        assert_eq!(
            fold(json!({"n": {"$inc": 1}}), json!({"n": 7})),
            Some(json!({"n": 7}))
        );
        // Fractions are not added up here: they stay two entries.
        assert_eq!(
            fold(json!({"n": {"$inc": 1.5}}), json!({"n": {"$inc": 1}})),
            None
        );
        assert_eq!(
            fold(json!({"n": {"$inc": 1}}), json!({"n": {"$inc": 0.5}})),
            None
        );
        assert_eq!(fold(json!({"n": "text"}), json!({"n": {"$inc": 1}})), None);
        // add a, then remove a and add b: a is gone, b is there.
        assert_eq!(
            fold(
                json!({"t": {"add": ["a"]}}),
                json!({"t": {"add": ["b"], "remove": ["a"]}})
            ),
            Some(json!({"t": {"add": ["b"], "remove": ["a"]}}))
        );
        // remove a, then add it back: only the add remains.
        assert_eq!(
            fold(
                json!({"t": {"remove": ["a"]}}),
                json!({"t": {"add": ["a"]}})
            ),
            Some(json!({"t": {"add": ["a"]}}))
        );
        assert_eq!(
            fold(json!({"t": {"add": ["a"]}}), json!({"t": {"$inc": 1}})),
            None
        );
        assert_eq!(
            fold(json!({"t": ["a"]}), json!({"t": {"add": ["b"]}})),
            None
        );

        // Through the batcher: two sales' counters become one entry.
        let mut b = Batcher::new(10, true);
        let inc = |n: i64| Action {
            table: Arc::from("public.sales"),
            lsn: Lsn(1),
            contact: "jill".into(),
            body: ActionBody::Identify {
                traits: Fields::from_map(&traits(json!({"sales_count": {"$inc": n}}))),
            },
            key: None,
        };
        b.push(1, inc(1));
        b.push(2, inc(1));
        let reqs = b.take();
        assert_eq!(reqs.len(), 1);
        let body: Value = serde_json::from_slice(&reqs[0].body).unwrap();
        assert_eq!(
            body,
            json!([{"id": "jill", "traits": {"sales_count": {"$inc": 2}}}])
        );
        assert_eq!(reqs[0].seqs(), vec![1, 2]);
    }

    #[test]
    fn coalescing_folds_a_contacts_identifies_last_value_wins() {
        let mut b = Batcher::new(10, true);
        b.push(1, identify("a", 1, json!({ "x": 1, "y": 1 })));
        b.push(2, identify("b", 2, json!({ "x": 5 })));
        b.push(3, identify("a", 3, json!({ "y": 2, "z": 3 })));
        let reqs = b.take();
        assert_eq!(reqs.len(), 1);
        assert_eq!(
            body(&reqs[0]),
            json!([{"id": "a", "traits": {"x": 1, "y": 2, "z": 3}}, {"id": "b", "traits": {"x": 5}}])
        );
        let mut seqs = reqs[0].seqs();
        seqs.sort();
        assert_eq!(seqs, [1, 2, 3], "the folded identify is acknowledged too");
        // Off by default: both entries go out.
        let mut b = Batcher::new(10, false);
        b.push(1, identify("a", 1, json!({ "x": 1 })));
        b.push(2, identify("a", 2, json!({ "x": 2 })));
        assert_eq!(body(&b.take()[0]).as_array().unwrap().len(), 2);
    }

    /// Contacts whose keys collide (here every key does) neither share an
    /// entry nor lose their order.
    #[test]
    fn a_contact_whose_key_another_holds_keeps_its_own_entries() {
        let mut b = Batcher::new(10, true);
        b.track_index.key = |_| 7;
        b.identify_index.key = |_| 7;
        b.push(1, identify("a", 1, json!({ "x": 1 })));
        b.push(2, identify("b", 2, json!({ "y": 2 })));
        b.push(3, identify("a", 3, json!({ "x": 3 })));
        b.push(4, track("a", 4, 40));
        // "b" may have events under the taken key: flush to be safe.
        assert!(b.must_flush_before(&identify("b", 5, json!({}))));
        b.push(5, track("b", 5, 50));
        b.push(6, track("a", 6, 60));
        let reqs = b.take();
        assert_eq!(
            body(&reqs[0]),
            json!([
                {"id": "a", "traits": {"x": 1}},
                {"id": "b", "traits": {"y": 2}},
                {"id": "a", "traits": {"x": 3}}
            ])
        );
        let tracks: Vec<Value> = reqs[1..].iter().map(body).collect();
        let sale = |n: i64| json!({"event": "made_sale", "properties": {"amount": n}});
        assert_eq!(
            tracks,
            [
                json!({"id": "a", "events": [sale(40)]}),
                json!({"id": "b", "events": [sale(50)]}),
                json!({"id": "a", "events": [sale(60)]}),
            ]
        );
    }

    #[test]
    fn a_single_body_is_what_a_one_action_request_carries() {
        let a = identify("a", 1, json!({ "x": 1 }));
        let (endpoint, body) = single_body(&a);
        assert_eq!(endpoint, Endpoint::Identify);
        assert_eq!(&body[..], br#"[{"id":"a","traits":{"x":1}}]"#);
        let t = track("b", 2, 10);
        let (endpoint, body) = single_body(&t);
        assert_eq!(endpoint, Endpoint::Track);
        assert_eq!(
            &body[..],
            br#"{"id":"b","events":[{"event":"made_sale","properties":{"amount":10}}]}"#
        );
        let mut batcher = Batcher::new(10, false);
        batcher.push(7, t.clone());
        assert_eq!(
            batcher.take()[0].body,
            body,
            "the same bytes as the batcher's"
        );
    }

    #[test]
    fn splitting_halves_a_request_and_keeps_order() {
        let mut b = Batcher::new(10, false);
        for i in 0..5u64 {
            b.push(i, identify(&format!("c{i}"), i, json!({ "n": i })));
        }
        let r = b.take().remove(0);
        let (left, right) = r.split().unwrap();
        assert_eq!(
            body(&left),
            json!([{"id": "c0", "traits": {"n": 0}}, {"id": "c1", "traits": {"n": 1}}])
        );
        assert_eq!(
            right.items.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        let (one, _) = left.split().unwrap();
        assert!(one.split().is_err());
    }
}
