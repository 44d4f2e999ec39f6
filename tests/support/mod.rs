//! Shared integration-test harness: a real throwaway Postgres cluster
//! ([`pg`]), a strict stand-in for ConveYour's HTTP API ([`receiver`]) and a
//! runner for the real `conveyour-cdc` binary ([`connector`]).
#![allow(dead_code)]

pub mod connector;
pub mod pg;
pub mod receiver;
pub mod setup;
pub mod standby;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh, unique scratch directory name (not yet created) under the system
/// temporary directory, tagged with this process's id.
pub(crate) fn scratch_path(prefix: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base_tmp().join(format!("{prefix}-{}-{n}-{nanos:x}", std::process::id()))
}

/// Where scratch directories go. As root the server runs as `postgres`, which
/// must be able to traverse every parent directory, so use `/tmp` there.
pub(crate) fn base_tmp() -> PathBuf {
    if pg::running_as_root() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    }
}

/// The last `max_lines` lines of a text file, or a note that it could not be read.
pub(crate) fn tail_of(path: &std::path::Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            lines[start..].join("\n")
        }
        Err(e) => format!("<could not read {}: {e}>", path.display()),
    }
}
