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
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use super::Endpoint;
use crate::lsn::Lsn;
use crate::mapping::{Action, ActionBody};

/// Which row an entry of a request came from, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub table: Arc<str>,
    pub contact: String,
    pub lsn: Lsn,
}

/// One HTTP request, body already encoded so retries resend the same bytes.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub endpoint: Endpoint,
    pub body: Bytes,
    /// Identify entries or track events in the body.
    pub count: usize,
    pub origins: Vec<Origin>,
}

impl Request {
    /// Deterministic for the request's content and position, so a receiver
    /// that deduplicates can recognise a retry.
    pub(crate) fn idempotency_key(&self) -> String {
        let first = self.origins.first().map(|o| o.lsn).unwrap_or_default();
        let last = self.origins.last().map(|o| o.lsn).unwrap_or_default();
        format!(
            "{}-{:X}-{:X}-{}",
            self.endpoint.name(),
            first.0,
            last.0,
            self.count
        )
    }
}

#[derive(Serialize)]
struct IdentifyEntry<'a> {
    id: &'a str,
    traits: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct TrackEvent<'a> {
    event: &'a str,
    properties: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct TrackBody<'a> {
    id: &'a str,
    events: Vec<TrackEvent<'a>>,
}

/// Pending actions, grouped into requests.
pub(crate) struct Batcher {
    batch_size: usize,
    identify: Vec<Action>,
    /// Track events by contact, in order of each contact's first event.
    tracks: Vec<(String, Vec<Action>)>,
    track_index: HashMap<String, usize>,
    track_count: usize,
}

impl Batcher {
    pub(crate) fn new(batch_size: usize) -> Batcher {
        Batcher {
            batch_size,
            identify: Vec::new(),
            tracks: Vec::new(),
            track_index: HashMap::new(),
            track_count: 0,
        }
    }

    /// Pending actions.
    pub(crate) fn len(&self) -> usize {
        self.identify.len() + self.track_count
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
        matches!(action.body, ActionBody::Identify { .. })
            && self.track_index.contains_key(&action.contact)
    }

    pub(crate) fn push(&mut self, action: Action) {
        match action.body {
            ActionBody::Identify { .. } => self.identify.push(action),
            ActionBody::Track { .. } => {
                self.track_count += 1;
                match self.track_index.get(&action.contact) {
                    Some(&i) => self.tracks[i].1.push(action),
                    None => {
                        self.track_index
                            .insert(action.contact.clone(), self.tracks.len());
                        self.tracks.push((action.contact.clone(), vec![action]));
                    }
                }
            }
        }
    }

    /// Takes everything pending as requests, identify requests first.
    pub(crate) fn take(&mut self) -> Vec<Request> {
        let mut out = Vec::new();
        let identify = std::mem::take(&mut self.identify);
        for chunk in identify.chunks(self.batch_size) {
            out.push(identify_request(chunk));
        }
        self.track_index.clear();
        self.track_count = 0;
        for (contact, events) in std::mem::take(&mut self.tracks) {
            for chunk in events.chunks(self.batch_size) {
                out.push(track_request(&contact, chunk));
            }
        }
        out
    }

    /// Contacts with pending actions, for tests of ordering.
    #[cfg(test)]
    fn contacts(&self) -> HashSet<&str> {
        self.identify
            .iter()
            .map(|a| a.contact.as_str())
            .chain(self.tracks.iter().map(|(c, _)| c.as_str()))
            .collect()
    }
}

fn origin(a: &Action) -> Origin {
    Origin {
        table: a.table.clone(),
        contact: a.contact.clone(),
        lsn: a.lsn,
    }
}

fn identify_request(actions: &[Action]) -> Request {
    let entries: Vec<IdentifyEntry<'_>> = actions
        .iter()
        .filter_map(|a| match &a.body {
            ActionBody::Identify { traits } => Some(IdentifyEntry {
                id: &a.contact,
                traits,
            }),
            ActionBody::Track { .. } => None,
        })
        .collect();
    Request {
        endpoint: Endpoint::Identify,
        body: Bytes::from(serde_json::to_vec(&entries).expect("JSON values always serialise")),
        count: entries.len(),
        origins: actions.iter().map(origin).collect(),
    }
}

fn track_request(contact: &str, actions: &[Action]) -> Request {
    let events: Vec<TrackEvent<'_>> = actions
        .iter()
        .filter_map(|a| match &a.body {
            ActionBody::Track { event, properties } => Some(TrackEvent { event, properties }),
            ActionBody::Identify { .. } => None,
        })
        .collect();
    let count = events.len();
    let body = TrackBody {
        id: contact,
        events,
    };
    Request {
        endpoint: Endpoint::Track,
        body: Bytes::from(serde_json::to_vec(&body).expect("JSON values always serialise")),
        count,
        origins: actions.iter().map(origin).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn identify(contact: &str, lsn: u64, traits: Value) -> Action {
        Action {
            table: Arc::from("public.employees"),
            lsn: Lsn(lsn),
            contact: contact.into(),
            body: ActionBody::Identify {
                traits: traits.as_object().unwrap().clone(),
            },
        }
    }

    fn track(contact: &str, lsn: u64, amount: i64) -> Action {
        Action {
            table: Arc::from("public.sales"),
            lsn: Lsn(lsn),
            contact: contact.into(),
            body: ActionBody::Track {
                event: Arc::from("made_sale"),
                properties: json!({ "amount": amount }).as_object().unwrap().clone(),
            },
        }
    }

    fn body(r: &Request) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn identify_entries_share_array_requests_of_batch_size() {
        let mut b = Batcher::new(2);
        for (i, c) in ["a", "b", "c"].iter().enumerate() {
            b.push(identify(c, i as u64, json!({ "n": i })));
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
        assert_eq!(reqs[0].count, 2);
        assert_eq!(reqs[0].endpoint, Endpoint::Identify);
    }

    #[test]
    fn track_events_go_one_contact_per_request_after_identifies() {
        let mut b = Batcher::new(10);
        b.push(track("a", 1, 10));
        b.push(identify("a", 2, json!({ "x": 1 })));
        b.push(track("b", 3, 20));
        b.push(track("a", 4, 30));
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
        let mut b = Batcher::new(10);
        b.push(track("a", 1, 10));
        assert!(b.must_flush_before(&identify("a", 2, json!({}))));
        assert!(!b.must_flush_before(&identify("b", 2, json!({}))));
        assert!(!b.must_flush_before(&track("a", 2, 1)));
        b.take();
        assert!(!b.must_flush_before(&identify("a", 2, json!({}))));
        assert!(b.contacts().is_empty());
    }

    #[test]
    fn idempotency_key_is_deterministic() {
        let mut b = Batcher::new(10);
        b.push(identify("a", 0x10, json!({})));
        b.push(identify("b", 0x20, json!({})));
        let r = b.take().remove(0);
        assert_eq!(r.idempotency_key(), "identify-10-20-2");
    }
}
