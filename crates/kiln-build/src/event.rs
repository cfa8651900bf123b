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
    },
    /// A chunk of a builder's output.
    BuildLog {
        drv: String,
        pid: i32,
        data: Arc<[u8]>,
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
