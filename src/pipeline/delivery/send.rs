//! One request's way to an acknowledgement: sent until ConveYour
//! acknowledges it; when refused, halved to the entries at fault, which
//! are dead-lettered (or stop the connector) only once shown at fault.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::sink::{probe_contact, Blame, Permit, Request, Sink, SinkError, Trial};
use crate::state::State;
use crate::{telemetry, Error};

/// What every request task shares.
pub(super) struct Sender {
    pub sink: Arc<Sink>,
    /// Where rejected entries are stored, if the connector's schema is
    /// available.
    pub state: Option<State>,
    /// Store rejected entries (else stop the connector).
    pub dead_letter: bool,
    /// Sequence numbers acknowledged (or durably dead-lettered), as parts
    /// of a request are.
    pub acks: mpsc::UnboundedSender<Vec<u64>>,
}

impl Sender {
    /// Delivers a request, its first attempt in `slot`. When ConveYour
    /// refuses it and dead-lettering is on, halves it until single entries
    /// are refused, and puts each on trial ([`Self::settle`]): only an
    /// entry shown at fault is stored as a dead letter. Without dead
    /// letters the whole request is on trial, and one shown at fault stops
    /// the connector. Refusals that blame no entry (credentials, URL) stop
    /// it at once.
    pub(super) async fn send(&self, request: Request, slot: Permit) -> Result<(), Error> {
        let store = self.state.as_ref().filter(|_| self.dead_letter);
        let mut slot = Some(slot);
        let mut todo = vec![request];
        while let Some(request) = todo.pop() {
            let sent = match slot.take() {
                Some(slot) => self.sink.deliver_in(&request, slot).await,
                None => self.sink.deliver(&request).await,
            };
            let refusal = match sent {
                Ok(()) => {
                    let _ = self.acks.send(request.seqs());
                    continue;
                }
                Err(e) if !e.is_content_rejection() => return Err(e.into()),
                Err(e) => e,
            };
            let request = if store.is_some() {
                match request.split() {
                    Ok((left, right)) => {
                        // Left first: the contact order within is kept.
                        todo.push(right);
                        todo.push(left);
                        continue;
                    }
                    Err(single) => single,
                }
            } else {
                request
            };
            let Some(fault) = self.settle(&request, refusal).await? else {
                let _ = self.acks.send(request.seqs());
                continue;
            };
            let Some(state) = store else {
                return Err(fault.into());
            };
            let added = state.dead_letter(&request, &fault).await?;
            let m = telemetry::metrics();
            m.dead_letters.inc();
            // Not counted per entry (a table scan each): the retry task
            // sets the exact depth on every pass.
            if added {
                m.dead_letters_stored.inc();
            }
            m.requests
                .with_label_values(&[request.endpoint.name(), "dead_lettered"])
                .inc();
            tracing::warn!(
                endpoint = request.endpoint.name(),
                "stored a rejected entry as a dead letter: {fault}"
            );
            let _ = self.acks.send(request.seqs());
        }
        Ok(())
    }

    /// Sends a refused request again until ConveYour acknowledges it
    /// (`None`) or it is shown at fault (its last refusal): ConveYour
    /// acknowledged another request sent after one refusal of it, and then
    /// refused it again ([`Trial`]). The witness is any request's
    /// acknowledgement, else a probe ([`Sink::probe`]). Without one it is
    /// an outage: the request holds, backs off and tries again, forever.
    ///
    /// Before ConveYour has acknowledged any identify since the start, the
    /// probe identifies the request's own contact (which the request would
    /// create anyway); a track event refused then, or an entry whose
    /// contact id itself is refused, waits for a witness from other
    /// traffic: held, never dead-lettered on a guess.
    async fn settle(
        &self,
        request: &Request,
        refusal: SinkError,
    ) -> Result<Option<SinkError>, Error> {
        let mut trial = Trial::new(Instant::now());
        let mut refusal = refusal;
        let mut held: u32 = 0;
        loop {
            if !trial.witnessed(self.sink.last_ack_sent()) {
                let contact = probe_contact(&self.sink.acknowledged_contacts(), request);
                if let Some(contact) = contact {
                    self.sink.probe(&contact).await?;
                }
            }
            if trial.witnessed(self.sink.last_ack_sent()) {
                tracing::debug!(
                    endpoint = request.endpoint.name(),
                    "ConveYour acknowledged another request since refusing this one; sending it again to see whether it is at fault"
                );
            } else {
                self.sink.hold(&refusal);
                held += 1;
                tokio::time::sleep(self.sink.backoff(held)).await;
            }
            trial.resending(self.sink.last_ack_sent());
            match self.sink.deliver(request).await {
                Ok(()) => return Ok(None),
                Err(e) if !e.is_content_rejection() => return Err(e.into()),
                Err(e) => {
                    if trial.refused(Instant::now()) == Blame::Request {
                        return Ok(Some(e));
                    }
                    refusal = e;
                }
            }
        }
    }
}
