//! Delivery: actions fan out to lanes by contact; each lane batches and
//! sends its own requests one after another, so a contact's actions reach
//! ConveYour in commit order while several requests are in flight. The
//! coordinator confirms positions at the low-water mark: a transaction's
//! end is confirmed once every action up to its last one is acknowledged
//! (or durably dead-lettered).
//!
//! Each lane also records, after every flush, the last row it has
//! delivered. A lane handles its contacts' rows in stream order, so on a
//! restart every row of that lane up to the record is known delivered and
//! skipped ([`Replay`]): what repeats after a crash is at most what the
//! lanes had in flight.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::Shutdown;
use crate::config::{OnReject, SinkSettings};
use crate::lsn::Lsn;
use crate::mapping::Action;
use crate::sink::{contact_key, probe_contact, Batcher, Blame, Request, Sink, SinkError, Trial};
use crate::state::{Progress, State};
use crate::{telemetry, Error};

/// Hand-overs queued per lane before the reader waits. A hand-over holds
/// the lane's actions from one chunk of the reader's events (at most two
/// per event), so with the batch being filled and the request in flight
/// this bounds memory per lane. Room to spare keeps a flush request, which
/// is never waited for, from finding the queue full.
const LANE_QUEUE: usize = 16;

/// What the reader hands the delivery coordinator, in stream order.
#[derive(Debug)]
pub(crate) enum Event {
    /// A transaction starts.
    Begin,
    /// A row change to deliver, and its place in the stream.
    Action {
        action: Action,
        at: Progress,
    },
    Commit {
        end_lsn: Lsn,
        commit_time: i64,
    },
    /// The server has sent everything up to here.
    Keepalive {
        wal_end: Lsn,
    },
    /// Fires once every action before it is acknowledged (or durably
    /// dead-lettered): a sync chunk's rows are delivered.
    Marker(oneshot::Sender<()>),
    /// Nothing more is due soon: lanes send what they batched, if a
    /// transaction ended since they last did, rather than wait for their
    /// batches to fill.
    Quiet,
}

/// The lane of a contact among `lanes`, by [`contact_key`]: stable across
/// restarts and versions, since recorded progress is per lane.
pub(super) fn lane_for(contact: &str, lanes: usize) -> usize {
    (contact_key(contact) % lanes.max(1) as u64) as usize
}

/// What a restart may skip: rows each lane recorded as delivered.
#[derive(Debug, Clone)]
pub(super) struct Replay {
    /// Per lane; a single entry applies to every lane (the lane count
    /// changed, so only what every lane had delivered is known).
    per_lane: Vec<Progress>,
}

impl Replay {
    /// From recorded `(lane, lanes, progress)` rows, for `lanes` lanes now.
    pub(super) fn new(rows: &[(usize, usize, Progress)], lanes: usize) -> Option<Replay> {
        if rows.is_empty() {
            return None;
        }
        if rows.iter().all(|(lane, n, _)| *n == lanes && *lane < lanes) {
            let mut per_lane = vec![Progress::default(); lanes];
            for (lane, _, p) in rows {
                per_lane[*lane] = *p;
            }
            return Some(Replay { per_lane });
        }
        // Written with another lane count: only a row every old lane had
        // passed is surely delivered.
        let old_lanes = rows.iter().map(|(_, n, _)| *n).max().unwrap_or(0);
        let common = if rows.len() < old_lanes {
            Progress::default()
        } else {
            rows.iter().map(|(_, _, p)| *p).min().unwrap_or_default()
        };
        Some(Replay {
            per_lane: vec![common],
        })
    }

    /// Whether every lane had delivered past this place: true of a row
    /// whatever its contact.
    pub(super) fn covers_every_lane(&self, at: Progress) -> bool {
        self.per_lane.iter().all(|p| at <= *p)
    }

    /// Whether this row of this contact was delivered before.
    pub(super) fn covers(&self, contact: &str, at: Progress) -> bool {
        let lane = if self.per_lane.len() == 1 {
            0
        } else {
            lane_for(contact, self.per_lane.len())
        };
        at <= self.per_lane[lane]
    }
}

/// Runs delivery until the events end or a stop is asked for; then lets
/// the lanes finish within the grace period.
pub(super) struct Coordinator {
    lanes: Vec<mpsc::Sender<LaneMsg>>,
    /// Actions bound for each lane from the chunk being handled: a lane is
    /// handed them together, one queue operation and one wake-up per chunk
    /// rather than per action.
    pending: Vec<Vec<LaneItem>>,
    lane_tasks: JoinSet<Result<(), Error>>,
    acks: mpsc::UnboundedReceiver<Vec<u64>>,
    next_seq: u64,
    /// Dispatched actions not yet below the low-water mark: acknowledged?
    /// Sequence numbers are dense, so entry `i` is action `window_start + i`.
    window: VecDeque<bool>,
    /// The sequence number of the window's first entry: the low-water mark.
    window_start: u64,
    /// Transactions whose commit has been seen: confirmed once every
    /// action before `seq` is acknowledged.
    commits: VecDeque<(u64, Lsn, i64)>,
    /// Markers waiting for every action before `seq` to be acknowledged.
    markers: VecDeque<(u64, oneshot::Sender<()>)>,
    in_transaction: bool,
    confirmed: watch::Sender<Lsn>,
    grace: Duration,
}

/// An action, with its sequence number and its place in the stream.
pub(super) type LaneItem = (u64, Progress, Action);

/// What a lane is told.
pub(super) enum LaneMsg {
    /// Actions, in stream order.
    Items(Vec<LaneItem>),
    /// Send what is batched now: the stream went quiet after a commit.
    Flush,
}

impl Coordinator {
    pub(super) fn new(
        sink: Arc<Sink>,
        settings: &SinkSettings,
        state: Option<State>,
        confirmed: watch::Sender<Lsn>,
    ) -> Coordinator {
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let mut lanes = Vec::new();
        let mut lane_tasks = JoinSet::new();
        for index in 0..settings.max_in_flight {
            let (tx, rx) = mpsc::channel(LANE_QUEUE);
            lanes.push(tx);
            let lane = Lane {
                index,
                lanes: settings.max_in_flight,
                sink: sink.clone(),
                batcher: Batcher::new(settings.batch_size, settings.coalesce),
                batch_wait: settings.batch_wait,
                acks: ack_tx.clone(),
                state: state.clone(),
                dead_letter: settings.on_reject == OnReject::DeadLetter,
                last: None,
            };
            lane_tasks.spawn(lane.run(rx));
        }
        Coordinator {
            pending: lanes.iter().map(|_| Vec::new()).collect(),
            lanes,
            lane_tasks,
            acks,
            next_seq: 0,
            window: VecDeque::new(),
            window_start: 0,
            commits: VecDeque::new(),
            markers: VecDeque::new(),
            in_transaction: false,
            confirmed,
            grace: settings.shutdown_grace,
        }
    }

    pub(super) async fn run(
        mut self,
        mut events: mpsc::Receiver<Vec<Event>>,
        mut shutdown: Shutdown,
    ) -> Result<(), Error> {
        // A commit handed over since the lanes were last told to send.
        let mut unsent_commit = false;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                Some(result) = self.lane_tasks.join_next() => return Err(lane_failed(result)),
                Some(seqs) = self.acks.recv() => self.acked(seqs),
                chunk = events.recv() => match chunk {
                    Some(chunk) => {
                        let mut quiet = false;
                        for e in chunk {
                            unsent_commit |= matches!(e, Event::Commit { .. });
                            quiet |= matches!(e, Event::Quiet);
                            self.handle(e);
                        }
                        if !self.dispatch(&mut shutdown).await? {
                            break;
                        }
                        // The stream has gone quiet after a commit: send
                        // now rather than wait for batches to fill.
                        if quiet && unsent_commit && events.is_empty() {
                            for lane in &self.lanes {
                                let _ = lane.try_send(LaneMsg::Flush);
                            }
                            unsent_commit = false;
                        }
                    }
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

    /// Takes one event; actions wait in `pending` for [`Self::dispatch`].
    fn handle(&mut self, event: Event) {
        match event {
            Event::Begin => self.in_transaction = true,
            Event::Commit {
                end_lsn,
                commit_time,
            } => {
                self.in_transaction = false;
                // Transactions without actions share the slot of the last
                // one, so a long outage does not grow the queue per commit.
                match self.commits.back_mut() {
                    Some(last) if last.0 == self.next_seq => {
                        *last = (self.next_seq, end_lsn, commit_time)
                    }
                    _ => self
                        .commits
                        .push_back((self.next_seq, end_lsn, commit_time)),
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
                self.window.push_back(false);
                let lane = lane_for(&action.contact, self.lanes.len());
                self.pending[lane].push((seq, at, action));
            }
        }
    }

    /// Hands each lane its pending actions. Returns `false` once a stop
    /// was asked for while a lane's queue was full: those actions were not
    /// dispatched, so nothing after them may be either (the lane would
    /// record progress past them, and a restart would skip them). Other
    /// lanes' actions are independent: each lane records its own progress.
    async fn dispatch(&mut self, shutdown: &mut Shutdown) -> Result<bool, Error> {
        for lane in 0..self.lanes.len() {
            if self.pending[lane].is_empty() {
                continue;
            }
            let items = std::mem::take(&mut self.pending[lane]);
            telemetry::metrics()
                .buffered_actions
                .add(items.len() as i64);
            let msg = match self.lanes[lane].try_send(LaneMsg::Items(items)) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(self.lane_error().await),
                Err(mpsc::error::TrySendError::Full(msg)) => msg,
            };
            // A full lane makes the reader wait; acknowledgements and
            // lane failures are still taken meanwhile.
            let sender = self.lanes[lane].clone();
            let send = sender.send(msg);
            tokio::pin!(send);
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => return Ok(false),
                    sent = &mut send => {
                        if sent.is_err() {
                            return Err(self.lane_error().await);
                        }
                        break;
                    }
                    Some(seqs) = self.acks.recv() => self.acked(seqs),
                    Some(result) = self.lane_tasks.join_next() => return Err(lane_failed(result)),
                }
            }
        }
        Ok(true)
    }

    /// The error of a lane that stopped, for when its queue turns out
    /// closed.
    async fn lane_error(&mut self) -> Error {
        match self.lane_tasks.join_next().await {
            Some(result) => lane_failed(result),
            None => Error::Setup("every delivery lane stopped".into()),
        }
    }

    fn acked(&mut self, seqs: Vec<u64>) {
        telemetry::metrics().buffered_actions.sub(seqs.len() as i64);
        for seq in seqs {
            let at = seq.checked_sub(self.window_start).map(|i| i as usize);
            if let Some(acked) = at.and_then(|i| self.window.get_mut(i)) {
                *acked = true;
            }
        }
        self.advance();
    }

    /// Moves the low-water mark over acknowledged actions and confirms
    /// every transaction now wholly acknowledged.
    fn advance(&mut self) {
        while self.window.front() == Some(&true) {
            self.window.pop_front();
            self.window_start += 1;
        }
        // Every action before it is acknowledged (next_seq when all are).
        let low_water = self.window_start;
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
    index: usize,
    lanes: usize,
    sink: Arc<Sink>,
    batcher: Batcher,
    batch_wait: Duration,
    acks: mpsc::UnboundedSender<Vec<u64>>,
    /// Where progress is recorded and rejected entries stored, if the
    /// connector's schema is available.
    state: Option<State>,
    /// Store rejected entries (else stop the connector).
    dead_letter: bool,
    /// The place of the last row pushed into the batch.
    last: Option<Progress>,
}

impl Lane {
    async fn run(mut self, mut actions: mpsc::Receiver<LaneMsg>) -> Result<(), Error> {
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            // The deadline first: a lane that is always sent to still
            // sends a batch that coalescing keeps from filling.
            let first = tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    self.flush().await?;
                    deadline = None;
                    continue;
                }
                a = actions.recv() => a,
            };
            // Take what else is waiting without going back to the select:
            // it sets up a timer per pass, which showed in profiles when
            // taken per action.
            let mut next = first;
            loop {
                match next {
                    Some(LaneMsg::Flush) => {
                        self.flush().await?;
                        deadline = None;
                    }
                    Some(LaneMsg::Items(items)) => {
                        for (seq, at, action) in items {
                            if self.batcher.must_flush_before(&action) {
                                self.flush().await?;
                                deadline = None;
                            }
                            if self.batcher.is_empty() {
                                deadline = Some(tokio::time::Instant::now() + self.batch_wait);
                            }
                            self.last = Some(at);
                            self.batcher.push(seq, action);
                            if self.batcher.is_full() {
                                self.flush().await?;
                                deadline = None;
                            }
                        }
                    }
                    None => {
                        self.flush().await?;
                        return Ok(());
                    }
                }
                if deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
                    self.flush().await?;
                    deadline = None;
                }
                next = match actions.try_recv() {
                    Ok(msg) => Some(msg),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                };
            }
        }
    }

    /// Delivers everything batched, then records the lane's progress, so
    /// a restart skips it.
    async fn flush(&mut self) -> Result<(), Error> {
        let requests = self.batcher.take();
        if requests.is_empty() {
            return Ok(());
        }
        for request in requests {
            self.deliver(request).await?;
        }
        if let (Some(state), Some(last)) = (&self.state, self.last) {
            state
                .save_lane_progress(self.index, self.lanes, last)
                .await?;
        }
        Ok(())
    }

    /// Delivers a request. When ConveYour refuses it and dead-lettering is
    /// on, halves it until single entries are refused, and puts each on
    /// trial ([`Self::settle`]): only an entry shown at fault is stored as
    /// a dead letter. Without dead letters the whole request is on trial,
    /// and one shown at fault stops the connector. Refusals that blame no
    /// entry (credentials, URL) stop it at once.
    async fn deliver(&self, request: Request) -> Result<(), Error> {
        let store = self.state.as_ref().filter(|_| self.dead_letter);
        let mut todo = vec![request];
        while let Some(request) = todo.pop() {
            let refusal = match self.sink.deliver(&request).await {
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
                        // Left first: order within the lane is kept.
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
    /// refused it again ([`Trial`]). The witness is any lane's
    /// acknowledgement, else a probe ([`Sink::probe`]). Without one it is
    /// an outage: the lane holds, backs off and tries again, forever.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(commit: u64, change: u64) -> Progress {
        Progress {
            commit_lsn: Lsn(commit),
            change,
        }
    }

    #[test]
    fn lanes_are_stable_and_spread() {
        assert_eq!(lane_for("jill@acme.test", 4), lane_for("jill@acme.test", 4));
        let mut used = [0usize; 4];
        for i in 0..1000 {
            used[lane_for(&format!("c{i}@x.test"), 4)] += 1;
        }
        assert!(used.iter().all(|n| *n > 150), "{used:?}");
        // Pinned: recorded progress depends on it across versions.
        assert_eq!(lane_for("a", 7), (0xaf63_dc4c_8601_ec8c_u64 % 7) as usize);
        assert_eq!(
            lane_for("a", 1000),
            (0xaf63_dc4c_8601_ec8c_u64 % 1000) as usize
        );
    }

    #[test]
    fn replay_skips_per_lane_with_the_same_lane_count() {
        let a = "a@x.test";
        let la = lane_for(a, 2);
        let rows = vec![(la, 2, at(100, 50)), (1 - la, 2, at(90, 10))];
        let r = Replay::new(&rows, 2).unwrap();
        assert!(r.covers(a, at(100, 50)));
        assert!(r.covers(a, at(99, 999)));
        assert!(!r.covers(a, at(100, 51)));
        assert!(!r.covers(a, at(101, 1)));
        // A contact of the other lane only up to that lane's record.
        let b = (0..100)
            .map(|i| format!("b{i}"))
            .find(|c| lane_for(c, 2) != la)
            .unwrap();
        assert!(r.covers(&b, at(90, 10)));
        assert!(!r.covers(&b, at(95, 1)));
    }

    #[test]
    fn replay_after_a_lane_count_change_uses_what_every_lane_passed() {
        let rows = vec![(0, 2, at(100, 5)), (1, 2, at(80, 9))];
        let r = Replay::new(&rows, 4).unwrap();
        assert!(r.covers("anyone", at(80, 9)));
        assert!(!r.covers("anyone", at(80, 10)));
        // An old lane that never recorded anything: nothing is known.
        let r = Replay::new(&[(0, 2, at(100, 5))], 3).unwrap();
        assert!(!r.covers("anyone", at(1, 1)));
        assert!(Replay::new(&[], 4).is_none());
    }
}
