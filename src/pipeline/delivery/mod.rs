//! Delivery: the dispatcher batches actions into ConveYour requests and
//! sends them in parallel, up to the adaptive concurrency limit
//! ([`crate::sink`]), while each contact's requests go one after another
//! in commit order ([`order`]). Positions are confirmed at the low-water
//! mark: a transaction's end once every action up to its last one is
//! acknowledged (or durably dead-lettered).
//!
//! The low-water mark is also recorded in the connector's schema, so a
//! restart skips what was delivered ([`Replay`]). No action is handed to a
//! request more than `max_in_flight × batch_size` actions past the
//! recorded mark, so that is the most a crash can make repeat.

mod order;
mod replay;
mod send;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

pub(super) use replay::Replay;

use self::order::{Claim, Order};
use self::send::Sender;
use crate::config::{OnReject, SinkSettings};
use crate::event::Event;
use crate::lsn::Lsn;
use crate::mapping::Action;
use crate::shutdown::Shutdown;
use crate::sink::{Batcher, Limiter, Request, Sink};
use crate::state::{Progress, State};
use crate::{telemetry, Error};

/// A formed request waiting to be sent.
struct Waiting {
    claim: Claim,
    request: Request,
}

/// What a request task reports when it ends.
type Finished = (order::RequestId, Vec<u64>, Result<(), Error>);

/// Runs delivery until the events end or a stop is asked for; then lets
/// the requests under way finish within the grace period.
pub(super) struct Dispatcher {
    sender: Arc<Sender>,
    limiter: Arc<Limiter>,
    /// Actions not yet in a request.
    batcher: Batcher,
    batch_wait: Duration,
    /// When the batch's oldest action has waited `batch_wait`.
    deadline: Option<Instant>,
    /// Send what is batched now (the stream went quiet after a commit, or
    /// the batch waited long enough).
    flush: bool,
    /// Request tasks at most, in flight or backing off.
    max_requests: usize,
    order: Order,
    waiting: VecDeque<Waiting>,
    requests: JoinSet<Finished>,
    acks: mpsc::UnboundedReceiver<Vec<u64>>,
    next_seq: u64,
    /// Actions not yet below the low-water mark: acknowledged? and their
    /// place in the stream. Entry `i` is action `window_start + i`.
    window: VecDeque<(bool, Progress)>,
    /// The sequence number of the window's first entry: the low-water mark.
    window_start: u64,
    /// How far past the recorded mark an action may be batched.
    window_cap: u64,
    /// Every action before this is recorded as delivered (the low-water
    /// mark itself when nothing is recorded).
    recorded: u64,
    /// Actions past `recorded + window_cap`, waiting for the mark to move.
    parked: VecDeque<(u64, Action)>,
    /// Transactions whose commit has been seen: confirmed once every
    /// action before `seq` is acknowledged. `acted` when it had actions.
    commits: VecDeque<Commit>,
    /// Markers waiting for every action before `seq` to be acknowledged.
    markers: VecDeque<(u64, oneshot::Sender<()>)>,
    in_transaction: bool,
    /// `next_seq` at the last commit.
    last_commit_seq: u64,
    confirmed: watch::Sender<Lsn>,
    /// The low-water mark for the recorder, when there is a schema.
    marks: Option<watch::Sender<(u64, Progress)>>,
    grace: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Commit {
    seq: u64,
    end_lsn: Lsn,
    commit_time: i64,
    acted: bool,
}

impl Dispatcher {
    pub(super) fn new(
        sink: Arc<Sink>,
        settings: &SinkSettings,
        state: Option<State>,
        confirmed: watch::Sender<Lsn>,
    ) -> Dispatcher {
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let limiter = sink.limiter().clone();
        Dispatcher {
            sender: Arc::new(Sender {
                sink,
                state,
                dead_letter: settings.on_reject == OnReject::DeadLetter,
                acks: ack_tx,
            }),
            limiter,
            batcher: Batcher::new(settings.batch_size, settings.coalesce),
            batch_wait: settings.batch_wait,
            deadline: None,
            flush: false,
            max_requests: settings.max_in_flight,
            order: Order::default(),
            waiting: VecDeque::new(),
            requests: JoinSet::new(),
            acks,
            next_seq: 0,
            window: VecDeque::new(),
            window_start: 0,
            window_cap: (settings.max_in_flight * settings.batch_size).max(1) as u64,
            recorded: 0,
            parked: VecDeque::new(),
            commits: VecDeque::new(),
            markers: VecDeque::new(),
            in_transaction: false,
            last_commit_seq: 0,
            confirmed,
            marks: None,
            grace: settings.shutdown_grace,
        }
    }

    pub(super) async fn run(
        mut self,
        mut events: mpsc::Receiver<Vec<Event>>,
        mut shutdown: Shutdown,
    ) -> Result<(), Error> {
        // The recorder writes the low-water mark as it moves, and reports
        // what is durable, which lets the window move.
        let (recorded_tx, mut recorded_rx) = watch::channel(0u64);
        let mut recorder = match self.sender.state.clone() {
            Some(state) => {
                let (marks, rx) = watch::channel((0, Progress::default()));
                self.marks = Some(marks);
                Some(tokio::spawn(replay::record(state, rx, recorded_tx)))
            }
            None => None,
        };
        // A commit handed over since what was batched last went out.
        let mut unsent_commit = false;
        loop {
            self.pump();
            let deadline = self.deadline;
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                Some(seqs) = self.acks.recv() => self.acked(seqs),
                Some(done) = self.requests.join_next() => self.finished(done)?,
                Ok(()) = recorded_rx.changed() => {
                    let seq = *recorded_rx.borrow_and_update();
                    self.recorded_to(seq);
                }
                Some(r) = async {
                    match recorder.as_mut() {
                        Some(task) => Some(task.await),
                        None => None,
                    }
                }, if recorder.is_some() => {
                    return Err(recorder_failed(r));
                }
                () = self.limiter.room(), if !self.waiting.is_empty() => {}
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.deadline = None;
                    self.flush = true;
                }
                chunk = events.recv(), if self.parked.is_empty() => match chunk {
                    Some(chunk) => {
                        let mut quiet = false;
                        for e in chunk {
                            unsent_commit |= matches!(e, Event::Commit { .. });
                            quiet |= matches!(e, Event::Quiet);
                            self.handle(e);
                        }
                        // The stream has gone quiet after a commit: send
                        // now rather than wait for the batch to fill.
                        if quiet && unsent_commit && events.is_empty() {
                            self.flush = true;
                            unsent_commit = false;
                        }
                    }
                    None => break,
                },
            }
        }
        self.stop(recorder.take(), &mut recorded_rx).await
    }

    /// Stopping: no more actions; what is batched goes out, and requests
    /// finish within the grace period while acknowledgements keep moving
    /// the position. The last mark is recorded before returning.
    async fn stop(
        mut self,
        recorder: Option<tokio::task::JoinHandle<Result<(), Error>>>,
        recorded_rx: &mut watch::Receiver<u64>,
    ) -> Result<(), Error> {
        let deadline = tokio::time::sleep(self.grace);
        tokio::pin!(deadline);
        self.flush = true;
        loop {
            self.pump();
            if self.requests.is_empty() && self.waiting.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some(seqs) = self.acks.recv() => self.acked(seqs),
                Some(done) = self.requests.join_next() => {
                    if let Err(e) = self.finished(done) {
                        self.drain_acks();
                        return Err(e);
                    }
                }
                Ok(()) = recorded_rx.changed() => {
                    let seq = *recorded_rx.borrow_and_update();
                    self.recorded_to(seq);
                }
                () = self.limiter.room(), if !self.waiting.is_empty() => {}
                _ = &mut deadline => {
                    tracing::warn!("shutdown grace period over with requests unacknowledged; they are sent again on the next start");
                    self.requests.abort_all();
                    break;
                }
            }
        }
        self.drain_acks();
        // The last mark: the recorder writes it and ends.
        self.marks = None;
        if let Some(recorder) = recorder {
            // A moment past the grace period, if it is over: the mark is
            // one small write, and without it everything since the last
            // one is sent again.
            let until = deadline
                .deadline()
                .max(Instant::now() + Duration::from_secs(1));
            match tokio::time::timeout_at(until, recorder).await {
                Ok(r) => flatten(r)?,
                Err(_) => tracing::warn!(
                    "shutdown grace period over before the delivered position was recorded; what was delivered since the last record is sent again on the next start"
                ),
            }
        }
        Ok(())
    }

    fn drain_acks(&mut self) {
        while let Ok(seqs) = self.acks.try_recv() {
            self.acked(seqs);
        }
    }

    /// Takes one event.
    fn handle(&mut self, event: Event) {
        match event {
            Event::Begin => self.in_transaction = true,
            Event::Commit {
                end_lsn,
                commit_time,
            } => {
                self.in_transaction = false;
                let acted = self.next_seq > self.last_commit_seq;
                self.last_commit_seq = self.next_seq;
                let commit = Commit {
                    seq: self.next_seq,
                    end_lsn,
                    commit_time,
                    acted,
                };
                // Transactions without actions share the slot of the last
                // one, so a long outage does not grow the queue per commit.
                match self.commits.back_mut() {
                    Some(last) if last.seq == self.next_seq && !last.acted => *last = commit,
                    _ => self.commits.push_back(commit),
                }
                self.advance();
            }
            Event::Quiet => {}
            Event::Marker(done) => {
                self.markers.push_back((self.next_seq, done));
                self.advance();
            }
            Event::Keepalive { wal_end } => {
                if !self.in_transaction && self.window.is_empty() && self.commits.is_empty() {
                    self.confirm(wal_end, None);
                }
            }
            Event::Action { action, at } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.window.push_back((false, at));
                telemetry::metrics().buffered_actions.inc();
                if self.parked.is_empty() && seq < self.recorded + self.window_cap {
                    self.admit(seq, action);
                } else {
                    self.parked.push_back((seq, action));
                }
            }
        }
    }

    /// Puts an action into the batch.
    fn admit(&mut self, seq: u64, action: Action) {
        if self.batcher.must_flush_before(&action) {
            self.form();
        }
        if self.batcher.is_empty() {
            self.deadline = Some(Instant::now() + self.batch_wait);
        }
        self.batcher.push(seq, action);
    }

    /// Turns what is batched into requests, each claiming its contacts.
    fn form(&mut self) {
        self.form_from(Batcher::take);
        self.deadline = None;
        self.flush = false;
    }

    fn form_from(&mut self, take: fn(&mut Batcher) -> Vec<Request>) {
        for request in take(&mut self.batcher) {
            let claim = self.order.claim(&request);
            self.waiting.push_back(Waiting { claim, request });
        }
    }

    /// Sends what may be sent, and forms requests from the batch when it
    /// is due and nothing formed could go out instead: while requests wait
    /// for a slot, the batch keeps filling, so a busy connector sends
    /// fuller requests.
    fn pump(&mut self) {
        loop {
            self.send_ready();
            if self.batcher.is_empty() {
                self.flush = false;
                return;
            }
            let urgent = self.flush || !self.parked.is_empty();
            if !(urgent || self.batcher.is_full())
                || self.waiting.iter().any(|w| self.order.ready(&w.claim))
            {
                return;
            }
            if urgent {
                self.form();
            } else {
                // Full batches only; the rest keeps filling.
                self.form_from(Batcher::take_full);
                if self.batcher.is_empty() {
                    self.deadline = None;
                }
                continue;
            }
        }
    }

    /// Starts every waiting request whose contacts are free, oldest first,
    /// while the concurrency limit has room.
    fn send_ready(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() && self.requests.len() < self.max_requests {
            if !self.order.ready(&self.waiting[i].claim) {
                i += 1;
                continue;
            }
            let Some(slot) = self.limiter.try_acquire() else {
                return;
            };
            let Some(Waiting { claim, request }) = self.waiting.remove(i) else {
                return;
            };
            let sender = self.sender.clone();
            self.requests.spawn(async move {
                let result = sender.send(request, slot).await;
                (claim.id, claim.contacts, result)
            });
        }
    }

    /// A request task ended: its contacts are free; an error stops
    /// delivery.
    fn finished(&mut self, done: Result<Finished, tokio::task::JoinError>) -> Result<(), Error> {
        match done {
            Ok((id, contacts, result)) => {
                self.order.finish(id, &contacts);
                result
            }
            Err(e) => Err(Error::task_failed("a delivery request", e)),
        }
    }

    fn acked(&mut self, seqs: Vec<u64>) {
        telemetry::metrics().buffered_actions.sub(seqs.len() as i64);
        for seq in seqs {
            let at = seq.checked_sub(self.window_start).map(|i| i as usize);
            if let Some((acked, _)) = at.and_then(|i| self.window.get_mut(i)) {
                *acked = true;
            }
        }
        self.advance();
    }

    /// Moves the low-water mark over acknowledged actions, confirms every
    /// transaction now wholly acknowledged, and hands the mark to the
    /// recorder.
    fn advance(&mut self) {
        let mut mark = None;
        while let Some(&(true, at)) = self.window.front() {
            self.window.pop_front();
            self.window_start += 1;
            mark = Some(at);
        }
        if let Some(at) = mark {
            match &self.marks {
                Some(marks) => {
                    marks.send_replace((self.window_start, at));
                }
                None => self.recorded_to(self.window_start),
            }
        }
        // Every action before it is acknowledged (next_seq when all are).
        let low_water = self.window_start;
        let mut confirm = None;
        let m = telemetry::metrics();
        while let Some(&c) = self.commits.front() {
            if c.seq > low_water {
                break;
            }
            if c.acted {
                m.transaction_acknowledged(c.commit_time);
            }
            confirm = Some((c.end_lsn, c.commit_time));
            self.commits.pop_front();
        }
        if let Some((end, time)) = confirm {
            self.confirm(end, Some(time));
        }
        while self
            .markers
            .front()
            .is_some_and(|(seq, _)| *seq <= low_water)
        {
            if let Some((_, done)) = self.markers.pop_front() {
                let _ = done.send(());
            }
        }
    }

    /// Everything before `seq` is recorded as delivered: parked actions
    /// within the window now may be batched.
    fn recorded_to(&mut self, seq: u64) {
        self.recorded = self.recorded.max(seq);
        while let Some((seq, _)) = self.parked.front() {
            if *seq >= self.recorded + self.window_cap {
                break;
            }
            if let Some((seq, action)) = self.parked.pop_front() {
                self.admit(seq, action);
            }
        }
    }

    /// Moves the confirmed position forward (never back).
    fn confirm(&self, lsn: Lsn, commit_time: Option<i64>) {
        let moved = self.confirmed.send_if_modified(|current| {
            if lsn > *current {
                *current = lsn;
                true
            } else {
                false
            }
        });
        if moved {
            telemetry::metrics().confirmed(lsn, commit_time);
        }
    }
}

fn flatten(r: Result<Result<(), Error>, tokio::task::JoinError>) -> Result<(), Error> {
    match r {
        Ok(r) => r,
        Err(e) => Err(Error::task_failed("recording delivery progress", e)),
    }
}

fn recorder_failed(r: Result<Result<(), Error>, tokio::task::JoinError>) -> Error {
    match flatten(r) {
        Err(e) => e,
        Ok(()) => Error::Internal("recording delivery progress stopped unexpectedly".into()),
    }
}
