//! The running connector: one replication session after another, each a
//! reader (stream → decode → map), delivery (a dispatcher that batches,
//! sends in parallel per contact and confirms) and a feedback loop
//! (standby status updates).
//!
//! The guarantee lives here: the position reported to Postgres moves only
//! to the end of a transaction all of whose actions ConveYour acknowledged,
//! and all transactions before it; when nothing is pending it follows the
//! server's keepalives, so an idle slot holds no WAL.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod dead_letters;
mod delivery;
mod reader;
mod session;

pub use dead_letters::{retry_dead_letters, RetryOutcome};

use crate::config::Settings;
use crate::shutdown::Shutdown;
use crate::sink::Sink;
use crate::source;
use crate::{telemetry, Error};

/// First pause before reconnecting to Postgres; doubles up to the cap.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
/// How often a standby connector tries a slot another one holds: the
/// takeover after the holder dies is at most this plus the server noticing.
const SLOT_BUSY_RETRY: Duration = Duration::from_secs(2);

/// Longest pause between reconnection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Streams until asked to stop or until an error a person must fix.
/// Connection losses to Postgres reconnect with backoff and resume from the
/// slot's confirmed position.
pub async fn run(settings: &Settings, shutdown: Shutdown) -> Result<(), Error> {
    let sink = Arc::new(Sink::new(&settings.conveyour)?);
    let mut failures: u32 = 0;
    let mut standing_by = false;
    // The timeline on which a session of this run last found the slot:
    // from then on a missing slot was lost, not never made.
    let mut slot_seen = None;
    loop {
        let started = Instant::now();
        let ended = session::session(settings, &sink, shutdown.clone(), &mut slot_seen).await;
        // However the session ended, it holds no connection now.
        telemetry::metrics().connected.set(0);
        let wait = match ended {
            Ok(()) => return Ok(()),
            Err(Error::Source(e))
                if e.kind() == source::SourceErrorKind::SlotBusy && !shutdown.is_set() =>
            {
                if !standing_by {
                    tracing::info!("standing by: {e}");
                    standing_by = true;
                }
                SLOT_BUSY_RETRY
            }
            Err(Error::Source(e)) if e.is_transient() && !shutdown.is_set() => {
                standing_by = false;
                if started.elapsed() > RECONNECT_MAX * 2 {
                    failures = 0;
                }
                let wait = crate::sink::backoff(failures, RECONNECT_MIN, RECONNECT_MAX);
                failures += 1;
                tracing::warn!(
                    retry_in_ms = wait.as_millis() as u64,
                    "replication interrupted, reconnecting: {e}"
                );
                wait
            }
            Err(e) => return Err(e),
        };
        let mut stop = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait() => return Ok(()),
        }
    }
}
