//! Delivery: actions fan out to lanes by contact; each lane batches and
//! sends its own requests one after another, so a contact's actions reach
//! ConveYour in commit order while several requests are in flight. The
//! coordinator confirms positions at the low-water mark: a transaction's
//! end is confirmed once every action up to its last one is acknowledged
//! (or durably dead-lettered).

use std::collections::{BTreeMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::Shutdown;
use crate::config::{OnReject, SinkSettings};
use crate::lsn::Lsn;
use crate::mapping::Action;
use crate::sink::{Batcher, Request, Sink};
use crate::state::{Progress, State};
use crate::{telemetry, Error};

/// Actions queued per lane before the reader waits: with the batch being
/// filled and the request in flight, this bounds memory per lane.
const LANE_QUEUE: usize = 1024;

/// What the reader hands the delivery coordinator, in stream order.
#[derive(Debug)]
pub(super) enum Event {
    /// A transaction starts; its commit record is at `final_lsn`.
    Begin {
        final_lsn: Lsn,
    },
    Action(Action),
    Commit {
        end_lsn: Lsn,
        commit_time: i64,
    },
    /// The server has sent everything up to here.
    Keepalive {
        wal_end: Lsn,
    },
}

/// An action's place, for the low-water mark and row-grain progress.
struct Slot {
    progress: Progress,
    acked: bool,
}

/// Runs delivery until the events end or a stop is asked for; then lets
/// the lanes finish within the grace period.
pub(super) struct Coordinator {
    lanes: Vec<mpsc::Sender<(u64, Action)>>,
    lane_tasks: JoinSet<Result<(), Error>>,
    acks: mpsc::UnboundedReceiver<Vec<u64>>,
    hasher: std::collections::hash_map::RandomState,
    next_seq: u64,
    /// Dispatched actions not yet below the low-water mark.
    window: BTreeMap<u64, Slot>,
    /// Transactions whose commit has been seen: confirmed once every
    /// action before `seq` is acknowledged.
    commits: VecDeque<(u64, Lsn, i64)>,
    in_transaction: bool,
    commit_lsn: Lsn,
    confirmed: watch::Sender<Lsn>,
    progress: Option<watch::Sender<Progress>>,
    grace: Duration,
}

impl Coordinator {
    pub(super) fn new(
        sink: Arc<Sink>,
        settings: &SinkSettings,
        state: Option<State>,
        confirmed: watch::Sender<Lsn>,
        progress: Option<watch::Sender<Progress>>,
    ) -> Coordinator {
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let mut lanes = Vec::new();
        let mut lane_tasks = JoinSet::new();
        let dead_letters = match settings.on_reject {
            OnReject::DeadLetter => state,
            OnReject::Stop => None,
        };
        for _ in 0..settings.max_in_flight {
            let (tx, rx) = mpsc::channel(LANE_QUEUE);
            lanes.push(tx);
            let lane = Lane {
                sink: sink.clone(),
                batcher: Batcher::new(settings.batch_size),
                batch_wait: settings.batch_wait,
                acks: ack_tx.clone(),
                dead_letters: dead_letters.clone(),
            };
            lane_tasks.spawn(lane.run(rx));
        }
        Coordinator {
            lanes,
            lane_tasks,
            acks,
            hasher: Default::default(),
            next_seq: 0,
            window: BTreeMap::new(),
            commits: VecDeque::new(),
            in_transaction: false,
            commit_lsn: Lsn::ZERO,
            confirmed,
            progress,
            grace: settings.shutdown_grace,
        }
    }

    pub(super) async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut shutdown: Shutdown,
    ) -> Result<(), Error> {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                Some(result) = self.lane_tasks.join_next() => return Err(lane_failed(result)),
                Some(seqs) = self.acks.recv() => self.acked(seqs),
                e = events.recv() => match e {
                    Some(e) => self.handle(e, &mut shutdown).await?,
                    None => break,
                },
            }
        }
        // Stopping: no more actions; lanes flush what they hold within the
        // grace period while acknowledgements keep moving the position.
        self.lanes.clear();
        let deadline = tokio::time::sleep(self.grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                Some(seqs) = self.acks.recv() => self.acked(seqs),
                joined = self.lane_tasks.join_next() => match joined {
                    Some(Ok(Ok(()))) => {}
                    Some(other) => {
                        self.drain_acks();
                        return Err(lane_failed(other));
                    }
                    None => break,
                },
                _ = &mut deadline => {
                    tracing::warn!("shutdown grace period over with requests unacknowledged; they are sent again on the next start");
                    self.lane_tasks.abort_all();
                    break;
                }
            }
        }
        self.drain_acks();
        Ok(())
    }

    fn drain_acks(&mut self) {
        while let Ok(seqs) = self.acks.try_recv() {
            self.acked(seqs);
        }
    }

    async fn handle(&mut self, event: Event, shutdown: &mut Shutdown) -> Result<(), Error> {
        match event {
            Event::Begin { final_lsn } => {
                self.in_transaction = true;
                self.commit_lsn = final_lsn;
            }
            Event::Commit {
                end_lsn,
                commit_time,
            } => {
                self.in_transaction = false;
                self.commits
                    .push_back((self.next_seq, end_lsn, commit_time));
                self.advance();
            }
            Event::Keepalive { wal_end } => {
                if !self.in_transaction && self.window.is_empty() && self.commits.is_empty() {
                    self.confirm(wal_end, None);
                }
            }
            Event::Action(action) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.window.insert(
                    seq,
                    Slot {
                        progress: Progress {
                            commit_lsn: self.commit_lsn,
                            row_lsn: action.lsn,
                        },
                        acked: false,
                    },
                );
                let lane = self.lane_of(&action.contact);
                telemetry::metrics().buffered_actions.inc();
                // A full lane makes the reader wait; acknowledgements and
                // lane failures are still taken meanwhile.
                let lane = self.lanes[lane].clone();
                let send = lane.send((seq, action));
                tokio::pin!(send);
                loop {
                    tokio::select! {
                        sent = &mut send => {
                            if sent.is_err() {
                                return Err(Error::Setup("a delivery lane stopped unexpectedly".into()));
                            }
                            break;
                        }
                        Some(seqs) = self.acks.recv() => self.acked(seqs),
                        Some(result) = self.lane_tasks.join_next() => return Err(lane_failed(result)),
                        _ = shutdown.wait() => break,
                    }
                }
            }
        }
        Ok(())
    }

    /// The lane for a contact: always the same one, so its actions stay in
    /// order.
    fn lane_of(&self, contact: &str) -> usize {
        (self.hasher.hash_one(contact) % self.lanes.len() as u64) as usize
    }

    fn acked(&mut self, seqs: Vec<u64>) {
        telemetry::metrics().buffered_actions.sub(seqs.len() as i64);
        for seq in seqs {
            if let Some(slot) = self.window.get_mut(&seq) {
                slot.acked = true;
            }
        }
        self.advance();
    }

    /// Moves the low-water mark over acknowledged actions, records
    /// row-grain progress, and confirms every transaction now wholly
    /// acknowledged.
    fn advance(&mut self) {
        let mut last = None;
        while let Some(entry) = self.window.first_entry() {
            if !entry.get().acked {
                break;
            }
            last = Some(entry.remove().progress);
        }
        if let (Some(p), Some(tx)) = (last, &self.progress) {
            tx.send_if_modified(|cur| {
                let moved = p > *cur;
                if moved {
                    *cur = p;
                }
                moved
            });
        }
        let low_water = self
            .window
            .first_key_value()
            .map(|(s, _)| *s)
            .unwrap_or(self.next_seq);
        let mut confirm = None;
        while let Some(&(seq, end, time)) = self.commits.front() {
            if seq > low_water {
                break;
            }
            confirm = Some((end, time));
            self.commits.pop_front();
        }
        if let Some((end, time)) = confirm {
            self.confirm(end, Some(time));
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

fn lane_failed(result: Result<Result<(), Error>, tokio::task::JoinError>) -> Error {
    match result {
        Ok(Err(e)) => e,
        Ok(Ok(())) => Error::Setup("a delivery lane stopped unexpectedly".into()),
        Err(e) => Error::Setup(format!("a delivery lane failed: {e}")),
    }
}

/// One lane: batches its contacts' actions and sends them in order.
struct Lane {
    sink: Arc<Sink>,
    batcher: Batcher,
    batch_wait: Duration,
    acks: mpsc::UnboundedSender<Vec<u64>>,
    /// Where rejected entries go; `None` stops the connector instead.
    dead_letters: Option<State>,
}

impl Lane {
    async fn run(mut self, mut actions: mpsc::Receiver<(u64, Action)>) -> Result<(), Error> {
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                a = actions.recv() => match a {
                    Some((seq, action)) => {
                        if self.batcher.must_flush_before(&action) {
                            self.flush().await?;
                            deadline = None;
                        }
                        if self.batcher.is_empty() {
                            deadline = Some(tokio::time::Instant::now() + self.batch_wait);
                        }
                        self.batcher.push(seq, action);
                        if self.batcher.is_full() {
                            self.flush().await?;
                            deadline = None;
                        }
                    }
                    None => {
                        self.flush().await?;
                        return Ok(());
                    }
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    self.flush().await?;
                    deadline = None;
                }
            }
        }
    }

    async fn flush(&mut self) -> Result<(), Error> {
        for request in self.batcher.take() {
            self.deliver(request).await?;
        }
        Ok(())
    }

    /// Delivers a request; when ConveYour rejects it for its content and
    /// dead-lettering is on, halves it until the rejected entries are
    /// found, stores those, and delivers the rest.
    async fn deliver(&self, request: Request) -> Result<(), Error> {
        let mut todo = vec![request];
        while let Some(request) = todo.pop() {
            match self.sink.deliver(&request).await {
                Ok(()) => {}
                Err(e) => {
                    let Some(state) = self
                        .dead_letters
                        .as_ref()
                        .filter(|_| e.is_content_rejection())
                    else {
                        return Err(e.into());
                    };
                    match request.split() {
                        Ok((left, right)) => {
                            // Left first: order within the lane is kept.
                            todo.push(right);
                            todo.push(left);
                            continue;
                        }
                        Err(request) => {
                            state.dead_letter(&request, &e).await?;
                            let m = telemetry::metrics();
                            m.dead_letters.inc();
                            m.requests
                                .with_label_values(&[request.endpoint.name(), "dead_lettered"])
                                .inc();
                            tracing::warn!(
                                endpoint = request.endpoint.name(),
                                "stored a rejected entry as a dead letter: {e}"
                            );
                            let _ = self
                                .acks
                                .send(request.items.iter().map(|(seq, _)| *seq).collect());
                            continue;
                        }
                    }
                }
            }
            let _ = self
                .acks
                .send(request.items.iter().map(|(seq, _)| *seq).collect());
        }
        Ok(())
    }
}
