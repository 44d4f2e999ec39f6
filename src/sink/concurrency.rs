//! How many requests may be at ConveYour at once: adaptive request
//! concurrency, in the manner of TCP's congestion control and Vector's
//! adaptive request concurrency (AIMD).
//!
//! - The limit starts at 1 and doubles every round trip while requests
//!   come back acknowledged, round-trip times stay near their baseline and
//!   the limit is in use ("slow start"), up to 16; beyond, and after any
//!   cut, it grows by one per round trip.
//! - It is cut by a tenth, at most once per round trip, on 408, 5xx,
//!   timeouts and connection failures.
//! - On 429 it is cut by a tenth and further, to just under what ConveYour
//!   acknowledged per round trip over the last second (the concurrency its
//!   rate limit let through), when that is lower: a burst of 429s lands the
//!   limit just under the rate in one step rather than a tenth per round
//!   trip. More 429s within the `Retry-After` are the same episode. Above
//!   that concurrency it then grows by one per second, not per round trip:
//!   a limit counted per second answers late.
//! - It is cut by a tenth when a round trip's mean time climbs well above
//!   the baseline (ConveYour queueing requests).
//! - It never exceeds the ceiling, `conveyour.max_in_flight`, and never
//!   goes below 1. With `conveyour.concurrency: fixed` it stays at the
//!   ceiling.
//!
//! The limit counts attempts on the wire: a request waiting out a backoff
//! or a `Retry-After` holds no slot. After a 429 the limit does not grow
//! until its `Retry-After` has passed, so a rate limit is approached from
//! below rather than probed every round trip.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::telemetry;

/// The cut on a congestion signal: multiplicative, gentle enough that a
/// rate limit found at 20 requests in flight is held near 18 to 20.
const DECREASE: f64 = 0.9;
/// A round trip whose mean exceeds the baseline by this factor, plus
/// [`RTT_SLACK`], counts as climbing.
const RTT_TOLERANCE: f64 = 1.5;
/// Absolute slack on the climb test, so the scheduling noise of a receiver
/// that answers in microseconds is not read as queueing.
const RTT_SLACK: Duration = Duration::from_millis(5);
/// How fast the baseline follows round trips: it catches up with a lasting
/// change in ConveYour's latency within about ten round trips, so a slower
/// API is not mistaken for congestion forever.
const BASELINE_WEIGHT: f64 = 0.1;
/// How far back acknowledgements count toward the sustained rate (at
/// least; two round trips when those are longer). A rate limit is
/// typically counted per second.
const DELIVERY_HORIZON: Duration = Duration::from_secs(1);
/// The share of the sustained concurrency a congestion cut keeps: just
/// under what got through, so a rate limit is not hit again at once.
const SUSTAINED_SHARE: f64 = 1.0;
/// Slow start doubles the limit up to here, then it grows by one per round
/// trip: at a typical 100 ms round trip, 16 is 160 requests/s, under the
/// rate limits APIs commonly set, so the first probe past one comes in
/// steps of one rather than a doubling that floods the limit's window
/// (whose refusals then last a second).
const SLOW_START_UNTIL: f64 = 16.0;
/// Shortest round trip used as a window, so a receiver on the same host
/// does not make the limit move every microsecond.
const MIN_WINDOW: Duration = Duration::from_millis(1);

/// What one attempt said about ConveYour's capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Signal {
    /// Acknowledged; the round trip it took.
    Ack(Duration),
    /// Failed or unanswered: 408, 5xx, a timeout, a reset.
    Failed,
    /// Throttled (429); the limit does not grow for `retry_after`.
    Throttled { retry_after: Duration },
    /// Says nothing about capacity (a refused entry, a cancelled attempt).
    Neutral,
}

/// The shared limit. Cheap to consult: one uncontended mutex per attempt.
pub(crate) struct Limiter {
    ceiling: usize,
    adaptive: bool,
    state: Mutex<State>,
    /// Wakes attempts waiting for a slot.
    freed: Notify,
    /// Wakes the one dispatcher that waits for room to start a request
    /// (stores a wake-up when it is not waiting, so none is lost).
    room: Notify,
}

struct State {
    limit: f64,
    /// Attempts on the wire.
    active: usize,
    /// Attempts waiting for a slot.
    queued: usize,
    /// Slow start below this.
    threshold: f64,
    /// Smoothed round trip of acknowledged attempts.
    baseline: Option<Duration>,
    window_start: Instant,
    rtt_sum: Duration,
    samples: u32,
    /// The limit was reached during the window: more might help.
    saturated: bool,
    last_cut: Option<Instant>,
    /// No growth before this (ConveYour asked to wait).
    hold_until: Option<Instant>,
    /// When recent attempts were acknowledged, oldest first, within the
    /// delivery horizon.
    acked: std::collections::VecDeque<Instant>,
    /// The concurrency a rate limit let through when it last throttled.
    probe_above: Option<f64>,
    last_growth: Option<Instant>,
}

impl Limiter {
    /// A limit of at most `ceiling`; `adaptive: false` holds it there.
    pub(crate) fn new(ceiling: usize, adaptive: bool) -> Arc<Limiter> {
        let ceiling = ceiling.max(1);
        let limit = if adaptive { 1.0 } else { ceiling as f64 };
        telemetry::metrics().concurrency_limit.set(limit as i64);
        Arc::new(Limiter {
            ceiling,
            adaptive,
            state: Mutex::new(State {
                limit,
                active: 0,
                queued: 0,
                threshold: (ceiling as f64).min(SLOW_START_UNTIL),
                baseline: None,
                window_start: Instant::now(),
                rtt_sum: Duration::ZERO,
                samples: 0,
                saturated: false,
                last_cut: None,
                hold_until: None,
                acked: std::collections::VecDeque::new(),
                probe_above: None,
                last_growth: None,
            }),
            freed: Notify::new(),
            room: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current limit.
    #[cfg(test)]
    fn limit(&self) -> usize {
        self.state().effective()
    }

    /// Whether the limit is as low as it goes: only a pause slows the
    /// sender further.
    pub(crate) fn at_floor(&self) -> bool {
        !self.adaptive || self.state().effective() <= 1
    }

    /// A slot now, if one is free and no attempt waits for one.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut s = self.state();
        if s.queued == 0 && s.active < s.effective() {
            s.active += 1;
            if s.active >= s.effective() {
                s.saturated = true;
            }
            Some(Permit::new(self))
        } else {
            s.saturated = true;
            None
        }
    }

    /// Waits for a slot.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Permit {
        let mut queued = false;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.state();
                if queued {
                    s.queued -= 1;
                }
                if s.active < s.effective() {
                    s.active += 1;
                    if s.active >= s.effective() {
                        s.saturated = true;
                    }
                    return Permit::new(self);
                }
                s.saturated = true;
                s.queued += 1;
                queued = true;
            }
            // Dropped while queued (the request was cancelled): not queued.
            let guard = Unqueue(self, &mut queued);
            freed.await;
            std::mem::forget(guard);
        }
    }

    /// Waits until a request could start: a slot was freed or the limit
    /// grew since the last call.
    pub(crate) async fn room(&self) {
        self.room.notified().await
    }

    /// Takes in what an attempt started at `started` showed.
    fn observe(&self, started: Instant, signal: Signal) {
        if !self.adaptive {
            return;
        }
        let mut s = self.state();
        let before = s.effective();
        s.observe(Instant::now(), started, signal, self.ceiling);
        let after = s.effective();
        drop(s);
        if after != before {
            tracing::debug!(
                limit = after,
                ?signal,
                "ConveYour concurrency limit {before} -> {after}"
            );
            telemetry::metrics().concurrency_limit.set(after as i64);
            // A larger limit is room for waiting attempts.
            self.freed.notify_waiters();
            self.room.notify_one();
        }
    }

    fn release(&self) {
        let mut s = self.state();
        s.active = s.active.saturating_sub(1);
        drop(s);
        self.freed.notify_waiters();
        self.room.notify_one();
    }
}

/// Takes a waiter off the queue count when its future is dropped.
struct Unqueue<'a>(&'a Limiter, &'a mut bool);

impl Drop for Unqueue<'_> {
    fn drop(&mut self) {
        if *self.1 {
            self.0.state().queued -= 1;
            *self.1 = false;
        }
    }
}

impl State {
    fn effective(&self) -> usize {
        (self.limit as usize).max(1)
    }

    fn window(&self) -> Duration {
        self.baseline.unwrap_or(MIN_WINDOW).max(MIN_WINDOW)
    }

    fn observe(&mut self, now: Instant, started: Instant, signal: Signal, ceiling: usize) {
        let window = self.window();
        match signal {
            Signal::Ack(rtt) => {
                self.rtt_sum += rtt;
                self.acked.push_back(now);
                let horizon = self.horizon();
                while self.acked.front().is_some_and(|t| now - *t > horizon) {
                    self.acked.pop_front();
                }
                self.samples += 1;
            }
            Signal::Failed | Signal::Throttled { .. } => {
                // Once per round trip: one burst of 429s is one signal. An
                // attempt sent before the last cut says nothing new; nor
                // does a 429 within the Retry-After of the one that cut
                // (the rate limit's window has not moved on yet).
                let holding = self.hold_until.is_some_and(|h| now < h);
                let recent = self
                    .last_cut
                    .is_some_and(|c| now - c < window || started < c);
                if let Signal::Throttled { retry_after } = signal {
                    if !recent && !holding {
                        let sustained = self.sustained(now);
                        self.cut(now);
                        if let Some(c) = sustained {
                            self.limit = self.limit.min(c * SUSTAINED_SHARE).max(1.0);
                            self.threshold = self.limit;
                            // A cut while the limit's window still holds
                            // an earlier burst measures low: what got
                            // through before counts, fading.
                            self.probe_above =
                                Some(self.probe_above.map_or(c, |p| c.max(p * DECREASE)));
                        }
                    }
                    let until = now + retry_after;
                    self.hold_until = Some(self.hold_until.map_or(until, |h| h.max(until)));
                } else if !recent {
                    self.cut(now);
                }
                return;
            }
            Signal::Neutral => return,
        }
        if now - self.window_start < window || self.samples == 0 {
            return;
        }
        let mean = self.rtt_sum / self.samples;
        let climbing = self
            .baseline
            .is_some_and(|b| mean > b.mul_f64(RTT_TOLERANCE) + RTT_SLACK);
        // The round trip right after a cut holds: its attempts were mostly
        // sent before it.
        let fresh_cut = self.last_cut.is_some_and(|c| c >= self.window_start);
        let held = self.hold_until.is_some_and(|h| now < h);
        if climbing {
            self.cut(now);
        } else if self.saturated && !fresh_cut && !held && !self.probing_slowly(now) {
            self.limit = if self.limit < self.threshold {
                (self.limit * 2.0).min(self.threshold)
            } else {
                self.limit + 1.0
            }
            .min(ceiling as f64);
            self.last_growth = Some(now);
            // Well past the rate that was throttled: it has been raised.
            if self.probe_above.is_some_and(|p| self.limit >= p * 1.5) {
                self.probe_above = None;
            }
        }
        self.baseline = Some(match self.baseline {
            None => mean,
            Some(b) => b.mul_f64(1.0 - BASELINE_WEIGHT) + mean.mul_f64(BASELINE_WEIGHT),
        });
        telemetry::metrics()
            .request_rtt_seconds
            .set(self.window().as_secs_f64());
        self.next_window(now);
    }

    fn horizon(&self) -> Duration {
        DELIVERY_HORIZON.max(self.window() * 2)
    }

    /// At or above the concurrency a rate limit let through: grow by one
    /// per horizon (a second) rather than per round trip, since a limit
    /// counted per second refuses only once a second's worth is over it.
    fn probing_slowly(&self, now: Instant) -> bool {
        self.probe_above.is_some_and(|p| self.limit >= p)
            && self.last_growth.is_some_and(|g| now - g < DELIVERY_HORIZON)
    }

    /// Acknowledged attempts per round trip, averaged over the horizon:
    /// the concurrency ConveYour sustained. Over the whole horizon even
    /// when the history is shorter, and an average, not a peak: a rate
    /// limit counted per second lets a second's budget through as fast as
    /// it comes, then refuses, and that budget per second is its rate.
    fn sustained(&self, now: Instant) -> Option<f64> {
        let baseline = self.baseline?;
        let horizon = self.horizon();
        let recent = self.acked.iter().filter(|t| now - **t <= horizon).count();
        Some(recent as f64 * baseline.as_secs_f64() / horizon.as_secs_f64())
    }

    fn cut(&mut self, now: Instant) {
        self.limit = (self.limit * DECREASE).max(1.0);
        self.threshold = self.limit;
        self.last_cut = Some(now);
        self.next_window(now);
    }

    fn next_window(&mut self, now: Instant) {
        self.window_start = now;
        self.rtt_sum = Duration::ZERO;
        self.samples = 0;
        self.saturated = false;
    }
}

/// One slot, held for one attempt; freed when dropped.
pub(crate) struct Permit {
    limiter: Option<Arc<Limiter>>,
    started: Instant,
}

impl Permit {
    fn new(limiter: &Arc<Limiter>) -> Permit {
        Permit {
            limiter: Some(limiter.clone()),
            started: Instant::now(),
        }
    }

    /// Restarts the clock: the attempt begins now (a permit taken before
    /// the request was handed over).
    pub(crate) fn start(&mut self) {
        self.started = Instant::now();
    }

    /// Tells the limit what the attempt showed.
    pub(crate) fn observe(&self, signal: Signal) {
        if let Some(l) = &self.limiter {
            l.observe(self.started, signal);
        }
    }

    /// Tells the limit what the attempt showed and frees the slot.
    #[cfg(test)]
    fn finish(self, signal: Signal) {
        self.observe(signal);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(l) = self.limiter.take() {
            l.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `rounds` round trips of `rtt` each, with every slot in use,
    /// each attempt answered as `answer` says; returns the limit after each.
    fn rounds(
        l: &Arc<Limiter>,
        rtt: Duration,
        rounds: usize,
        answer: impl Fn(usize) -> Signal,
        clock: &mut Instant,
    ) -> Vec<usize> {
        let mut seen = Vec::new();
        for r in 0..rounds {
            let n = l.limit();
            let permits: Vec<Permit> = (0..n).filter_map(|_| l.try_acquire()).collect();
            assert_eq!(permits.len(), n);
            assert!(l.try_acquire().is_none(), "the limit admits no more");
            *clock += rtt;
            for mut p in permits {
                p.started = *clock - rtt;
                let signal = match answer(r) {
                    Signal::Ack(_) => Signal::Ack(rtt),
                    s => s,
                };
                let mut s = l.state();
                s.active -= 1;
                s.observe(*clock, p.started, signal, l.ceiling);
                drop(s);
                p.limiter = None;
            }
            seen.push(l.limit());
        }
        seen
    }

    #[test]
    fn it_starts_at_one_doubles_to_16_then_grows_by_one_up_to_the_ceiling() {
        let l = Limiter::new(64, true);
        let mut clock = Instant::now();
        l.state().window_start = clock;
        let seen = rounds(
            &l,
            Duration::from_millis(100),
            60,
            |_| Signal::Ack(Duration::ZERO),
            &mut clock,
        );
        assert_eq!(seen[..7], [2, 4, 8, 16, 17, 18, 19], "{seen:?}");
        assert_eq!(seen[51..], [64; 9], "{seen:?}");
    }

    #[test]
    fn congestion_cuts_once_per_round_trip_then_growth_is_additive() {
        let l = Limiter::new(64, true);
        let mut clock = Instant::now();
        l.state().window_start = clock;
        let rtt = Duration::from_millis(100);
        rounds(&l, rtt, 20, |_| Signal::Ack(Duration::ZERO), &mut clock);
        assert_eq!(l.limit(), 32);
        // One round of 429s on every attempt: one cut, not 32.
        let seen = rounds(&l, rtt, 1, |_| Signal::Failed, &mut clock);
        assert_eq!(seen, [28]);
        // Then +1 per round trip, not doubling.
        let seen = rounds(&l, rtt, 3, |_| Signal::Ack(Duration::ZERO), &mut clock);
        assert_eq!(seen, [28, 29, 30], "{seen:?}");
    }

    #[test]
    fn after_a_retry_after_the_limit_does_not_grow_until_it_has_passed() {
        // At a ceiling of 32 for a second: 32 per round trip get through.
        let l = Limiter::new(32, true);
        let mut clock = Instant::now();
        l.state().window_start = clock;
        let rtt = Duration::from_millis(100);
        let ack = |_| Signal::Ack(Duration::ZERO);
        rounds(&l, rtt, 25, ack, &mut clock);
        assert_eq!(l.limit(), 32);
        let hold = Duration::from_secs(1);
        let seen = rounds(
            &l,
            rtt,
            1,
            |_| Signal::Throttled { retry_after: hold },
            &mut clock,
        );
        assert_eq!(seen, [28]);
        let seen = rounds(&l, rtt, 13, ack, &mut clock);
        assert_eq!(seen[..9], [28; 9], "grew within Retry-After: {seen:?}");
        assert!(seen.iter().all(|n| *n <= 32));
        assert!(seen[12] > 28, "never grew again: {seen:?}");
    }

    #[test]
    fn a_rate_limit_lands_the_limit_at_its_rate_not_a_tenth_at_a_time() {
        // ConveYour answers in 100 ms and accepts 200 requests in any one
        // second, answering the rest 429 (Retry-After: 1) at once.
        let l = Limiter::new(64, true);
        let mut clock = Instant::now();
        l.state().window_start = clock;
        let rtt = Duration::from_millis(100);
        let retry_after = Duration::from_secs(1);
        let mut accepted: std::collections::VecDeque<Instant> = Default::default();
        let mut limits = Vec::new();
        for _ in 0..100 {
            let n = l.limit();
            let permits: Vec<Permit> = (0..n).filter_map(|_| l.try_acquire()).collect();
            let sent = clock;
            while accepted
                .front()
                .is_some_and(|t| sent - *t >= Duration::from_secs(1))
            {
                accepted.pop_front();
            }
            let mut answers = Vec::new();
            for _ in 0..permits.len() {
                if accepted.len() < 200 {
                    accepted.push_back(sent);
                    answers.push(Signal::Ack(rtt));
                } else {
                    answers.push(Signal::Throttled { retry_after });
                }
            }
            clock += rtt;
            // 429s come back at once, acknowledgements a round trip later.
            for (mut p, signal) in permits.into_iter().zip(answers) {
                p.started = sent;
                let at = match signal {
                    Signal::Ack(_) => clock,
                    _ => sent,
                };
                let mut s = l.state();
                s.active -= 1;
                s.observe(at, p.started, signal, l.ceiling);
                drop(s);
                p.limiter = None;
            }
            limits.push(l.limit());
        }
        // From two seconds on, the limit stays near the 20 in flight that
        // 200/s at 100 ms allows: never far over it, 19 or more on average.
        let after = &limits[20..];
        assert!(after.iter().all(|n| (16..=23).contains(n)), "{limits:?}");
        let mean = after.iter().sum::<usize>() as f64 / after.len() as f64;
        assert!((19.0..=21.5).contains(&mean), "{mean}: {limits:?}");
    }

    #[test]
    fn climbing_round_trips_cut_the_limit_and_it_recovers_when_they_settle() {
        let l = Limiter::new(64, true);
        let mut clock = Instant::now();
        l.state().window_start = clock;
        let fast = Duration::from_millis(50);
        rounds(&l, fast, 60, |_| Signal::Ack(Duration::ZERO), &mut clock);
        assert_eq!(l.limit(), 64);
        let slow = Duration::from_millis(400);
        let down = rounds(&l, slow, 6, |_| Signal::Ack(Duration::ZERO), &mut clock);
        assert!(down[5] < 50, "the limit did not come down: {down:?}");
        let low = *down.last().unwrap();
        let up = rounds(&l, fast, 80, |_| Signal::Ack(Duration::ZERO), &mut clock);
        assert!(*up.last().unwrap() > low + 10, "no recovery: {up:?}");
    }

    #[test]
    fn a_fixed_limit_stays_at_the_ceiling() {
        let l = Limiter::new(8, false);
        assert_eq!(l.limit(), 8);
        for _ in 0..3 {
            let p = l.try_acquire().unwrap();
            p.finish(Signal::Failed);
        }
        assert_eq!(l.limit(), 8);
        assert!(l.at_floor(), "a fixed limit cannot adapt, so 429 pauses");
    }

    #[tokio::test]
    async fn a_waiter_gets_the_freed_slot_and_a_dropped_waiter_leaves_no_trace() {
        let l = Limiter::new(1, false);
        let p = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        // A waiter that gives up does not count as queued.
        let gave_up = tokio::time::timeout(Duration::from_millis(20), l.acquire()).await;
        assert!(gave_up.is_err());
        assert_eq!(l.state().queued, 0);
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire().await.finish(Signal::Neutral) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        p.finish(Signal::Ack(Duration::from_millis(1)));
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter got the slot")
            .unwrap();
        assert_eq!(l.state().active, 0);
    }
}
