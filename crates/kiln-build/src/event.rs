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
    /// A derivation goal that will build moved on to waiting for something, or to
    /// registering its outputs (for timelines: the spans between `BuildQueued`,
    /// `BuildStarted` and `BuildFinished`).
    Phase {
        drv: String,
        phase: Phase,
    },
}

/// What a derivation goal waits for or does before and after its builder runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Its input derivations' goals (their `.drv` paths), which it waits for.
    Inputs { inputs: Vec<String> },
    /// The lock on its outputs, held by another process.
    Lock,
    /// A free build slot, here or on a build machine.
    Slot,
    /// It has a slot here: its build directory and sandbox are being set up.
    Setup,
    /// Its builder ended: outputs are checked, scanned, hashed and registered.
    Registering,
}

impl Phase {
    /// The phase's name in JSON and timelines.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Inputs { .. } => "inputs",
            Phase::Lock => "lock",
            Phase::Slot => "slot",
            Phase::Setup => "setup",
            Phase::Registering => "registering",
        }
    }
}

/// What guix-daemon says of a failed build of `drv`: "builder for `DRV' failed with exit
/// code N" (without the log's last lines, which Nix appends), "cannot build derivation
/// `DRV': N dependencies couldn't be built", or kiln's own message for other failures.
pub fn guix_failure_message(drv: &str, result: &BuildResult) -> String {
    match &result.detail {
        Some(crate::result::FailureDetail::Builder { status, .. }) => {
            format!("builder for `{drv}' {status}")
        }
        Some(crate::result::FailureDetail::Dependencies(n)) => {
            format!("cannot build derivation `{drv}': {n} dependencies couldn't be built")
        }
        _ => result.error.clone(),
    }
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
            // As guix-daemon: a timeout says so, a failed dependency has no trace (only its
            // message), anything else is status 1 with the message.
            Event::BuildFinished { result, .. } if result.cancelled => None,
            Event::BuildFinished { drv, result } => match result.status {
                crate::result::BuildStatus::TimedOut => {
                    Some(format!("@ build-failed {drv} - timeout"))
                }
                crate::result::BuildStatus::DependencyFailed => None,
                _ => Some(format!(
                    "@ build-failed {drv} - 1 {}",
                    guix_failure_message(drv, result)
                )),
            },
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
            | Event::SubstitutionQueued { .. }
            | Event::Phase { .. } => None,
        }
    }

    /// The event as `kiln build --json` prints it (`docs/build-events.md`); the daemon's
    /// `json-log-path` writes the same objects.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Event::BuildStarted {
                drv,
                system,
                log_file,
                pid,
                round,
                rounds,
                machine,
            } => json!({
                "event": "build-started", "drv": drv, "system": system, "log": log_file,
                "pid": pid, "round": round, "rounds": rounds, "machine": machine
            }),
            Event::BuildLog { drv, data, .. } => json!({
                "event": "log", "drv": drv, "bytes": data.len(), "text": String::from_utf8_lossy(data)
            }),
            Event::BuildFinished { drv, result } => json!({
                "event": "build-finished", "drv": drv, "status": result.status.name(),
                "error": result.error, "timesBuilt": result.times_built,
                "outputs": result.outputs.iter().map(|(k, v)| (k.clone(), v.to_string()))
                    .collect::<std::collections::BTreeMap<_, _>>(),
                "cpuUser": result.cpu_user.map(|d| d.as_secs_f64()),
                "cpuSystem": result.cpu_system.map(|d| d.as_secs_f64()),
                "memoryPeak": result.memory_peak
            }),
            Event::SubstitutionStarted { path } => {
                json!({"event": "substitution-started", "path": path})
            }
            Event::BuildQueued { drv } => json!({"event": "build-queued", "drv": drv}),
            Event::SubstitutionQueued {
                path,
                download_size,
                nar_size,
            } => json!({
                "event": "substitution-queued", "path": path, "downloadSize": download_size,
                "narSize": nar_size
            }),
            Event::SubstitutionFinished { path, ok, error } => {
                json!({"event": "substitution-finished", "path": path, "ok": ok, "error": error})
            }
            Event::Message { level, text } => {
                json!({"event": "message", "level": level, "text": text})
            }
            Event::HashMismatch {
                path,
                algo,
                expected,
                actual,
            } => json!({
                "event": "hash-mismatch", "path": path, "algo": algo, "expected": expected,
                "actual": actual
            }),
            Event::Phase { drv, phase } => {
                let mut v = json!({"event": "phase", "drv": drv, "phase": phase.name()});
                if let Phase::Inputs { inputs } = phase {
                    v["inputs"] = json!(inputs);
                }
                v
            }
        }
    }
}
