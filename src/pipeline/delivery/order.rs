//! Each contact's requests in commit order, while requests for different
//! contacts go out together.
//!
//! Every request claims its contacts when it is formed. A request may be
//! sent once every earlier request holding one of its contacts has
//! finished (acknowledged, or its entries dead-lettered), so ConveYour
//! sees one contact's requests one after another, in the order the
//! batcher formed them, which is commit order (an identify before the
//! same contact's later events included). Nothing else waits.

use std::collections::{HashMap, VecDeque};

use crate::sink::{contact_key, ContactKeyHash, Request};

/// A request's number, in the order requests are formed.
pub(super) type RequestId = u64;

#[derive(Default)]
pub(super) struct Order {
    /// Each contact with an unfinished request → the latest such request.
    /// Keys are [`contact_key`]s: two contacts sharing one only wait for
    /// each other, which is safe.
    claims: HashMap<u64, RequestId, ContactKeyHash>,
    /// Whether each request from `base` on has finished.
    finished: VecDeque<bool>,
    base: RequestId,
}

/// A request's claim: its number, its contacts, and the earlier requests
/// it must wait for.
pub(super) struct Claim {
    pub id: RequestId,
    pub contacts: Vec<u64>,
    pub after: Vec<RequestId>,
}

impl Order {
    /// Registers a request formed now.
    pub(super) fn claim(&mut self, request: &Request) -> Claim {
        let id = self.base + self.finished.len() as u64;
        self.finished.push_back(false);
        let mut contacts = Vec::new();
        let mut after = Vec::new();
        for (_, action) in &request.items {
            let key = contact_key(&action.contact);
            match self.claims.insert(key, id) {
                Some(earlier) if earlier == id => continue,
                Some(earlier) if !after.contains(&earlier) => after.push(earlier),
                Some(_) | None => {}
            }
            contacts.push(key);
        }
        Claim {
            id,
            contacts,
            after,
        }
    }

    /// Whether a request may be sent: what it waits for has finished.
    pub(super) fn ready(&self, claim: &Claim) -> bool {
        claim.after.iter().all(|id| self.is_finished(*id))
    }

    fn is_finished(&self, id: RequestId) -> bool {
        id < self.base
            || self
                .finished
                .get((id - self.base) as usize)
                .copied()
                .unwrap_or(false)
    }

    /// A request finished: its contacts are free unless a later request
    /// claimed them.
    pub(super) fn finish(&mut self, id: RequestId, contacts: &[u64]) {
        for key in contacts {
            if self.claims.get(key) == Some(&id) {
                self.claims.remove(key);
            }
        }
        if let Some(f) = id
            .checked_sub(self.base)
            .and_then(|i| self.finished.get_mut(i as usize))
        {
            *f = true;
        }
        while self.finished.front() == Some(&true) {
            self.finished.pop_front();
            self.base += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::lsn::Lsn;
    use crate::mapping::{Action, ActionBody, Fields};
    use crate::sink::Batcher;

    fn action(contact: &str, body: ActionBody) -> Action {
        Action {
            table: Arc::from("public.t"),
            lsn: Lsn(1),
            contact: contact.into(),
            body,
            key: None,
        }
    }

    fn identify(contact: &str) -> Action {
        let traits = serde_json::json!({"n": 1});
        let traits = Fields::from_map(traits.as_object().unwrap());
        action(contact, ActionBody::Identify { traits })
    }

    fn track(contact: &str) -> Action {
        let properties = serde_json::json!({"amount": 1});
        let properties = Fields::from_map(properties.as_object().unwrap());
        let event = Arc::from("made_sale");
        action(contact, ActionBody::Track { event, properties })
    }

    fn requests(actions: Vec<Action>) -> Vec<Request> {
        let mut b = Batcher::new(500, false);
        for (i, a) in actions.into_iter().enumerate() {
            b.push(i as u64, a);
        }
        b.take()
    }

    #[test]
    fn a_contacts_later_request_waits_and_others_do_not() {
        let mut order = Order::default();
        // Identify a and b, then a's event: one identify request (a, b) and
        // one track request (a).
        let first = requests(vec![identify("a"), identify("b"), track("a")]);
        let claims: Vec<Claim> = first.iter().map(|r| order.claim(r)).collect();
        assert_eq!(claims.len(), 2);
        assert!(order.ready(&claims[0]));
        assert!(!order.ready(&claims[1]), "a's event waits for a's identify");
        // A later request for c alone does not wait.
        let c = order.claim(&requests(vec![track("c")])[0]);
        assert!(order.ready(&c));
        order.finish(claims[0].id, &claims[0].contacts);
        assert!(order.ready(&claims[1]));
        // b is free again, a is still held by the track request.
        let b = order.claim(&requests(vec![track("b")])[0]);
        assert!(order.ready(&b));
        let a = order.claim(&requests(vec![track("a")])[0]);
        assert!(!order.ready(&a));
        order.finish(claims[1].id, &claims[1].contacts);
        assert!(order.ready(&a));
        for cl in [c, b, a] {
            order.finish(cl.id, &cl.contacts);
        }
        assert!(order.claims.is_empty(), "finished requests hold nothing");
        assert!(order.finished.is_empty());
    }
}
