//! One request's body, encoded once: identify entries as one array,
//! a contact's track events as one batch; and its idempotency key.

use bytes::Bytes;

use super::Endpoint;
use crate::json;
use crate::mapping::{Action, ActionBody, Fields};

/// An action with its place in the stream, so acknowledgements can be
/// matched back to positions.
pub(crate) type Item = (u64, Action);

/// One HTTP request, body already encoded so retries resend the same bytes.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub endpoint: Endpoint,
    pub body: Bytes,
    /// The identify entries or track events in the body, in order.
    pub items: Vec<Item>,
    /// Per item, the sequence numbers of later identifies folded into it
    /// by coalescing (empty when nothing was folded); they are
    /// acknowledged with it.
    pub merged: Vec<Vec<u64>>,
}

impl Request {
    /// A request with a body stored earlier (a dead letter sent again).
    pub(crate) fn stored(endpoint: Endpoint, body: Bytes) -> Request {
        Request {
            endpoint,
            body,
            items: Vec::new(),
            merged: Vec::new(),
        }
    }

    /// Every sequence number this request acknowledges.
    pub(crate) fn seqs(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self.items.iter().map(|(seq, _)| *seq).collect();
        seqs.extend(self.merged.iter().flatten());
        seqs
    }

    /// Identify entries or track events in the body.
    pub(crate) fn count(&self) -> usize {
        self.items.len()
    }

    /// The first action, for error messages.
    pub(crate) fn first(&self) -> Option<&Action> {
        self.items.first().map(|(_, a)| a)
    }

    /// Deterministic for the request's content and position, so a receiver
    /// that deduplicates can recognise a retry, also after a restart.
    pub(crate) fn idempotency_key(&self) -> String {
        // A hash of the body: changes from one multi-row WAL record share
        // an LSN, so positions alone would collide.
        let h = body_hash(&self.body);
        let first = self.items.first().map(|(_, a)| a.lsn.0).unwrap_or_default();
        format!("{}-{first:X}-{h:016x}", self.endpoint.name())
    }

    /// Halves the request, to find the entries ConveYour rejects (it
    /// rejects whole requests). A single entry comes back as it is.
    pub(crate) fn split(self) -> Result<(Request, Request), Request> {
        if self.items.len() < 2 {
            return Err(self);
        }
        let mid = self.items.len() / 2;
        let mut left = self.items;
        let right = left.split_off(mid);
        let mut left_merged = self.merged;
        let right_merged = if left_merged.is_empty() {
            Vec::new()
        } else {
            left_merged.split_off(mid)
        };
        Ok((
            build(self.endpoint, left, left_merged),
            build(self.endpoint, right, right_merged),
        ))
    }
}

/// A 64-bit hash of a request body for its idempotency key: FNV-1a's
/// constants taken eight bytes at a time, the length mixed in, and a final
/// avalanche. Every body is hashed once; byte-at-a-time FNV-1a was 6% of
/// the connector's CPU at full speed. Not for security: a receiver uses
/// the key only to recognise a retry of the same request.
pub(super) fn body_hash(body: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ body.len() as u64;
    let mut words = body.chunks_exact(8);
    for w in &mut words {
        let w = <[u8; 8]>::try_from(w).unwrap_or_default();
        h = (h ^ u64::from_le_bytes(w))
            .wrapping_mul(PRIME)
            .rotate_left(29);
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(PRIME);
    // Every input bit reaches every output bit.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// The body the sink sends for this one action in a request of its own,
/// byte for byte: an identify as a one-entry array of `{id, traits}`, a
/// track event as `{id, events: [..]}`. `preview` prints these, so what it
/// shows is what `run` encodes.
pub(crate) fn single_body(action: &Action) -> (Endpoint, Bytes) {
    let endpoint = match action.body {
        ActionBody::Identify { .. } => Endpoint::Identify,
        ActionBody::Track { .. } => Endpoint::Track,
    };
    let request = build(endpoint, vec![(0, action.clone())], Vec::new());
    (endpoint, request.body)
}

/// Encodes a request. Identify: an array of `{id, traits}`. Track: one
/// contact (every item has the same) with its `events`, each
/// `{event, properties}`. The fields were rendered when the rows were
/// mapped; their bytes are copied in.
pub(crate) fn build(endpoint: Endpoint, items: Vec<Item>, merged: Vec<Vec<u64>>) -> Request {
    let size: usize = items
        .iter()
        .map(|(_, a)| {
            let fields = match &a.body {
                ActionBody::Identify { traits: f } | ActionBody::Track { properties: f, .. } => f,
            };
            fields.as_bytes().len() + a.contact.len() + 32
        })
        .sum();
    let mut body = Vec::with_capacity(size + 32);
    match endpoint {
        Endpoint::Identify => {
            let traits = items.iter().filter_map(|(_, a)| match &a.body {
                ActionBody::Identify { traits } => Some((a.contact.as_str(), traits)),
                ActionBody::Track { .. } => None,
            });
            write_entries(&mut body, b"id", b"traits", traits);
        }
        Endpoint::Track => {
            let id = items
                .first()
                .map(|(_, a)| a.contact.as_str())
                .unwrap_or_default();
            body.extend_from_slice(b"{\"id\":");
            json::write_str(&mut body, id);
            body.extend_from_slice(b",\"events\":");
            let events = items.iter().filter_map(|(_, a)| match &a.body {
                ActionBody::Track { event, properties } => Some((&**event, properties)),
                ActionBody::Identify { .. } => None,
            });
            write_entries(&mut body, b"event", b"properties", events);
            body.push(b'}');
        }
    }
    Request {
        endpoint,
        body: Bytes::from(body),
        items,
        merged,
    }
}

/// Appends a JSON array of `{"<name>": string, "<fields>": object}`.
pub(super) fn write_entries<'a>(
    body: &mut Vec<u8>,
    name: &[u8],
    fields: &[u8],
    entries: impl Iterator<Item = (&'a str, &'a Fields)>,
) {
    body.push(b'[');
    for (i, (value, object)) in entries.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"");
        body.extend_from_slice(name);
        body.extend_from_slice(b"\":");
        json::write_str(body, value);
        body.extend_from_slice(b",\"");
        body.extend_from_slice(fields);
        body.extend_from_slice(b"\":");
        body.extend_from_slice(object.as_bytes());
        body.push(b'}');
    }
    body.push(b']');
}
