//! How far the copy is: a log line every so often, and a progress bar
//! on a terminal.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::telemetry;

/// How often progress is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the progress bar is redrawn on a terminal.
const DRAW_EVERY: Duration = Duration::from_millis(250);

/// Progress shared by the copy and its reporter.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(super) table: String,
    pub(super) rows: i64,
    pub(super) total: i64,
    pub(super) started: Option<Instant>,
    /// Rows at `started`, so the rate counts this run only.
    pub(super) rows_at_start: i64,
    pub(super) tables_left: usize,
}

impl Tally {
    /// Rows per second this run, and seconds left at that rate (None
    /// before any row).
    fn pace(&self) -> (f64, Option<f64>) {
        let elapsed = self
            .started
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let done = (self.rows - self.rows_at_start).max(0) as f64;
        let rate = if elapsed > 0.0 { done / elapsed } else { 0.0 };
        let left = (self.total - self.rows).max(0) as f64;
        (rate, (rate > 0.0).then(|| left / rate))
    }

    /// Exports the estimate and the ETA.
    fn export(&self) {
        let m = telemetry::metrics();
        m.snapshot_rows_estimate.set(self.total);
        m.snapshot_eta_seconds.set(self.pace().1.unwrap_or(0.0));
    }

    fn line(&self) -> String {
        let (rate, eta) = self.pace();
        let eta = match eta {
            Some(secs) => format!("{secs:.0}s"),
            None => "?".into(),
        };
        format!(
            "sync {}: {}/{} rows ({:.0}%), {:.0} rows/s, ETA {eta}, {} table(s) left",
            self.table,
            self.rows,
            self.total.max(self.rows),
            if self.total > 0 {
                100.0 * self.rows as f64 / self.total as f64
            } else {
                100.0
            },
            rate,
            self.tables_left
        )
    }
}

/// Reports a copy's progress until `done`: a bar redrawn on stderr when it
/// is a terminal, a log line every few seconds otherwise.
pub(super) async fn report(tally: Arc<Mutex<Tally>>, mut done: oneshot::Receiver<()>) {
    let terminal = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(if terminal { DRAW_EVERY } else { LOG_EVERY });
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut done => break,
            _ = tick.tick() => {}
        }
        let line = tally
            .lock()
            .map(|t| {
                t.export();
                t.line()
            })
            .unwrap_or_default();
        if terminal {
            eprint!("\r\x1b[2K{line}");
        } else {
            tracing::info!("{line}");
        }
    }
    if terminal {
        eprintln!();
    }
    if let Ok(t) = tally.lock() {
        tracing::info!("{}", t.line());
    }
    let m = telemetry::metrics();
    m.snapshot_rows_estimate.set(0);
    m.snapshot_eta_seconds.set(0.0);
}
