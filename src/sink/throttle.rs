//! One pace for every request to ConveYour: an optional requests-per-second
//! ceiling, and a shared pause when ConveYour answers 429, so the whole
//! sender slows down rather than just the request that was refused.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub(crate) struct Throttle {
    /// Least time between two request starts, from the ceiling.
    interval: Option<Duration>,
    state: Mutex<State>,
}

struct State {
    /// Earliest start of the next request under the ceiling.
    next: Instant,
    /// No request starts before this (ConveYour asked to slow down).
    paused_until: Instant,
}

impl Throttle {
    /// `per_second` of `None` means no ceiling.
    pub(crate) fn new(per_second: Option<f64>) -> Throttle {
        let now = Instant::now();
        Throttle {
            interval: per_second
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            state: Mutex::new(State {
                next: now,
                paused_until: now,
            }),
        }
    }

    /// Waits for this request's turn.
    pub(crate) async fn acquire(&self) {
        let at = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut at = Instant::now().max(s.paused_until);
            if let Some(interval) = self.interval {
                at = at.max(s.next);
                s.next = at + interval;
            }
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// Holds every request back for at least `delay` from now.
    pub(crate) fn pause(&self, delay: Duration) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.paused_until = s.paused_until.max(Instant::now() + delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_ceiling_spaces_requests_out() {
        let t = Throttle::new(Some(10.0));
        let start = Instant::now();
        for _ in 0..5 {
            t.acquire().await;
        }
        // Five starts at 10/s: the fifth no earlier than 400 ms in.
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_everyone_back() {
        let t = Throttle::new(None);
        let start = Instant::now();
        t.acquire().await;
        assert!(start.elapsed() < Duration::from_millis(1));
        t.pause(Duration::from_secs(2));
        t.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(2));
    }
}
