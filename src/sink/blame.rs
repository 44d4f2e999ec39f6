//! Telling an entry ConveYour refuses from a ConveYour that refuses
//! everything.
//!
//! ConveYour refuses whole requests, and in the same ways whether the
//! request is at fault or ConveYour is failing: a 2xx whose body is not
//! `"status":"ok"`, or a 4xx. So a refusal alone blames nothing. A request
//! is held at fault only on this evidence: it was refused, then ConveYour
//! acknowledged another request sent after that refusal, then the request
//! was sent again and refused again. ConveYour demonstrably worked between
//! the two refusals, so the second is about the request. Anything short of
//! that is an outage: the request is held and sent again, forever, and the
//! position does not move past it.
//!
//! The witness is whatever ConveYour acknowledges: any other request, or a
//! probe sent for the held request when none came on its own (an identify
//! with empty traits of a contact ConveYour acknowledged before: a no-op;
//! see [`probe_contact`]). Halving finds a bad entry among good ones, and the
//! good ones' acknowledgements make probes rarely needed then.

use std::time::Instant;

use super::request::Request;
use super::Endpoint;
use crate::mapping::ActionBody;

/// Whom a refusal blames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blame {
    /// ConveYour acknowledged something between two refusals of the
    /// request: the request is at fault.
    Request,
    /// No evidence either way yet: look for a witness, hold, send again.
    Unproven,
}

/// One refused request on trial. Times are when replies came back and
/// when acknowledged requests were sent (see
/// [`super::Sink::last_ack_sent`]), so only a request sent after a refusal
/// was seen can witness it.
#[derive(Debug, Clone)]
pub(crate) struct Trial {
    /// When the last refusal came back.
    refused: Instant,
    /// A witness of the last refusal was seen before the request was sent
    /// again.
    witnessed: bool,
}

impl Trial {
    /// A trial of a request whose refusal came back at `refused`.
    pub(crate) fn new(refused: Instant) -> Trial {
        Trial {
            refused,
            witnessed: false,
        }
    }

    /// Whether ConveYour acknowledged a request sent after the last
    /// refusal: `last_ack_sent` is when the latest acknowledged request was
    /// sent.
    pub(crate) fn witnessed(&self, last_ack_sent: Option<Instant>) -> bool {
        last_ack_sent.is_some_and(|sent| sent > self.refused)
    }

    /// The request is about to be sent again.
    pub(crate) fn resending(&mut self, last_ack_sent: Option<Instant>) {
        self.witnessed = self.witnessed(last_ack_sent);
    }

    /// The request was refused again; the reply came back at `now`.
    pub(crate) fn refused(&mut self, now: Instant) -> Blame {
        if self.witnessed {
            return Blame::Request;
        }
        self.refused = now;
        Blame::Unproven
    }
}

/// The contact a probe identifies: one ConveYour acknowledged an identify
/// of (it exists, so empty traits change nothing), newest first, and not
/// one of the refused request's own contacts if another is known (a
/// contact id ConveYour refuses would fail the probe too, and look like an
/// outage); before any, the request's own first identify contact, which
/// the request itself creates or updates anyway. A track event is never the
/// reason to identify its contact: that would create a contact the mapping
/// never asked for. `None` when there is nothing safe to probe with.
pub(crate) fn probe_contact(acknowledged: &[String], request: &Request) -> Option<String> {
    let in_request = |c: &String| request.items.iter().any(|(_, a)| a.contact == *c);
    if let Some(contact) = acknowledged
        .iter()
        .find(|c| !in_request(c))
        .or(acknowledged.first())
    {
        return Some(contact.clone());
    }
    if request.endpoint != Endpoint::Identify {
        return None;
    }
    request
        .items
        .iter()
        .find(|(_, a)| matches!(a.body, ActionBody::Identify { .. }))
        .map(|(_, a)| a.contact.clone())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::lsn::Lsn;
    use crate::mapping::{Action, Fields};

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn an_outage_never_blames_the_request() {
        // Refused over and over, nothing acknowledged meanwhile (or only
        // requests sent before the refusals).
        let t0 = Instant::now();
        let mut trial = Trial::new(at(t0, 10));
        for i in 1..100 {
            let last_ack = Some(at(t0, 5));
            assert!(!trial.witnessed(last_ack));
            trial.resending(last_ack);
            assert_eq!(trial.refused(at(t0, 10 + i * 100)), Blame::Unproven);
        }
    }

    #[test]
    fn an_acknowledgement_between_two_refusals_blames_the_request() {
        let t0 = Instant::now();
        let mut trial = Trial::new(at(t0, 10));
        // A probe sent after the refusal is acknowledged.
        assert!(trial.witnessed(Some(at(t0, 11))));
        trial.resending(Some(at(t0, 11)));
        assert_eq!(trial.refused(at(t0, 30)), Blame::Request);
    }

    #[test]
    fn an_outage_that_ends_between_refusals_still_needs_a_second_witness() {
        let t0 = Instant::now();
        let mut trial = Trial::new(at(t0, 10));
        // Resent without a witness: refused again, unproven.
        trial.resending(None);
        assert_eq!(trial.refused(at(t0, 500)), Blame::Unproven);
        // An acknowledgement of a request sent before this last refusal
        // proves nothing about it.
        trial.resending(Some(at(t0, 400)));
        assert_eq!(trial.refused(at(t0, 900)), Blame::Unproven);
        // One sent after it does.
        trial.resending(Some(at(t0, 901)));
        assert_eq!(trial.refused(at(t0, 950)), Blame::Request);
    }

    #[test]
    fn an_acknowledgement_after_the_resend_is_not_evidence_for_it() {
        // The witness must come before the resend: an acknowledgement seen
        // only after the resend's refusal may mean the outage just ended.
        let t0 = Instant::now();
        let mut trial = Trial::new(at(t0, 10));
        trial.resending(None);
        assert_eq!(trial.refused(at(t0, 20)), Blame::Unproven);
        assert!(!trial.witnessed(Some(at(t0, 15))));
        assert!(trial.witnessed(Some(at(t0, 21))));
    }

    fn action(contact: &str, body: ActionBody) -> (u64, Action) {
        (
            0,
            Action {
                table: Arc::from("public.t"),
                lsn: Lsn(1),
                contact: contact.into(),
                key: None,
                body,
            },
        )
    }

    #[test]
    fn a_probe_uses_an_acknowledged_contact_else_the_requests_own_identify() {
        let fields = Fields::from_map(&serde_json::Map::new());
        let identify = super::super::request::build(
            Endpoint::Identify,
            vec![action(
                "a@x.test",
                ActionBody::Identify {
                    traits: fields.clone(),
                },
            )],
            Vec::new(),
        );
        let track = super::super::request::build(
            Endpoint::Track,
            vec![action(
                "b@x.test",
                ActionBody::Track {
                    event: Arc::from("e"),
                    properties: fields,
                },
            )],
            Vec::new(),
        );
        let known = ["known@x.test".to_owned()];
        assert_eq!(
            probe_contact(&known, &track).as_deref(),
            Some("known@x.test")
        );
        assert_eq!(
            probe_contact(&known, &identify).as_deref(),
            Some("known@x.test")
        );
        assert_eq!(probe_contact(&[], &identify).as_deref(), Some("a@x.test"));
        assert_eq!(probe_contact(&[], &track), None);
        // The refused request's own contact is the last resort: its id may
        // be what ConveYour refuses.
        let both = ["a@x.test".to_owned(), "known@x.test".to_owned()];
        assert_eq!(
            probe_contact(&both, &identify).as_deref(),
            Some("known@x.test")
        );
        assert_eq!(
            probe_contact(&both[..1], &identify).as_deref(),
            Some("a@x.test")
        );
    }
}
