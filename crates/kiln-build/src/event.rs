//! What the scheduler tells the requesters of a build while it runs.

use std::sync::Arc;

use crate::result::BuildResult;

/// Progress of goals.
#[derive(Debug, Clone)]
pub enum Event {
    /// A builder started (Guix's `@ build-started DRV - SYSTEM LOG PID`).
    BuildStarted {
        drv: String,
        system: String,
        log_file: String,
        pid: i32,
        round: u32,
        rounds: u32,
        /// The build machine's URI (empty: this machine).
        machine: String,
    },
    /// A chunk of a builder's output.
    BuildLog {
        drv: String,
        pid: i32,
        data: Arc<[u8]>,
    },
    /// A derivation will be built (its outputs are missing and cannot be substituted):
    /// for progress counters ("N/M built").
    BuildQueued {
        drv: String,
    },
    /// A path will be substituted, with the sizes its cache announced (for "copied (X
    /// MiB)" and download counters).
    SubstitutionQueued {
        path: String,
        download_size: u64,
        nar_size: u64,
    },
    /// A derivation goal finished (successfully or not).
    BuildFinished {
        drv: String,
        result: BuildResult,
    },
    SubstitutionStarted {
        path: String,
    },
    SubstitutionFinished {
        path: String,
        ok: bool,
        error: String,
    },
    /// A message for the user (`level` as Nix's verbosity: 0 error … 7 vomit).
    Message {
        level: u8,
        text: String,
    },
    /// A fixed-output hash mismatch (for `@ hash-mismatch PATH ALGO EXPECTED ACTUAL`).
    HashMismatch {
        path: String,
        algo: String,
        expected: String,
        actual: String,
    },
}

/// Receives events; implemented by the command line's progress display and by daemon
/// sessions. Must not block: it is called from the scheduler thread.
pub trait EventSink: Send + Sync {
    fn event(&self, e: &Event);
}

/// Discards events.
#[derive(Debug, Default)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn event(&self, _: &Event) {}
}

impl<F: Fn(&Event) + Send + Sync> EventSink for F {
    fn event(&self, e: &Event) {
        self(e)
    }
}

impl Event {
    /// The Guix build-trace line for this event (`@ build-started DRV - SYSTEM LOG PID`,
    /// …), without the newline, if it has one.
    pub fn trace_line(&self) -> Option<String> {
        match self {
            Event::BuildStarted {
                drv,
                system,
                log_file,
                pid,
                ..
            } => Some(format!("@ build-started {drv} - {system} {log_file} {pid}")),
            Event::BuildFinished { drv, result } if result.success() => {
                Some(format!("@ build-succeeded {drv} -"))
            }
            Event::BuildFinished { drv, result } => Some(format!(
                "@ build-failed {drv} - {} {}",
                result.status as u8, result.error
            )),
            Event::SubstitutionStarted { path } => {
                Some(format!("@ substituter-started {path} substitute"))
            }
            Event::SubstitutionFinished { path, ok: true, .. } => {
                Some(format!("@ substituter-succeeded {path}"))
            }
            Event::SubstitutionFinished { path, error, .. } => {
                Some(format!("@ substituter-failed {path} - {error}"))
            }
            Event::HashMismatch {
                path,
                algo,
                expected,
                actual,
            } => Some(format!("@ hash-mismatch {path} {algo} {expected} {actual}")),
            Event::BuildLog { .. }
            | Event::Message { .. }
            | Event::BuildQueued { .. }
            | Event::SubstitutionQueued { .. } => None,
        }
    }
}
