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
    BuildQueued { drv: String },
    /// A path will be substituted, with the sizes its cache announced (for "copied (X
    /// MiB)" and download counters).
    SubstitutionQueued {
        path: String,
        download_size: u64,
        nar_size: u64,
        /// The cache that has it (empty: not known).
        source: String,
    },
    /// A derivation goal finished (successfully or not).
    BuildFinished { drv: String, result: BuildResult },
    SubstitutionStarted {
        path: String,
        /// The cache it comes from (empty: not known).
        source: String,
    },
    SubstitutionFinished {
        path: String,
        ok: bool,
        /// Why it failed; empty when no cache had the path (nothing failed: whoever wanted
        /// it builds it instead, and nix-daemon says nothing of it). See
        /// [`substitution_error`].
        error: String,
    },
    /// A substitution's download went on: Guix's `@ download-*` traces.
    Download {
        path: String,
        download: kiln_substitute::Download,
    },
    /// A message for the user (`level` as Nix's verbosity: 0 error … 7 vomit).
    Message { level: u8, text: String },
    /// What a hook run for a build (the `diff-hook`) printed: shown to the clients as an
    /// error-level message, as nix-daemon shows it (unlike level-0 `Message`s, it repeats
    /// no failure reported otherwise).
    HookOutput { text: String },
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
    Phase { drv: String, phase: Phase },
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

/// The error of a failed substitution of `path` as a user reads it: `error`, or when no
/// cache had the path (`error` empty), that there was none.
pub fn substitution_error(path: &str, error: &str) -> String {
    if error.is_empty() {
        format!("path '{path}' is required, but there is no substituter that can build it")
    } else {
        error.to_string()
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

/// How much memory an event holds (for bounded queues): its log data, or a little.
pub fn event_size(e: &Event) -> usize {
    match e {
        Event::BuildLog { data, .. } => data.len() + 64,
        _ => 256,
    }
}

/// Receives events with the moment they happened (for sinks that run behind, on a thread
/// of their own).
pub trait TimedSink: Send + Sync {
    fn event_at(&self, e: &Event, at: std::time::Instant);
}

/// Hands events to `sink` on a thread of its own, each with the moment it was given,
/// through a queue of at most `max_bytes` (by [`event_size`]): for sinks that write files
/// (a timeline), which must not make the scheduler thread wait. When the queue is full,
/// events are dropped, counted, and warned about once, rather than held without bound or
/// waited for.
pub struct Detached {
    tx: std::sync::Mutex<Option<std::sync::mpsc::Sender<(Event, std::time::Instant)>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    dropped: std::sync::atomic::AtomicU64,
    max_bytes: usize,
    name: &'static str,
}

impl std::fmt::Debug for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Detached({})", self.name)
    }
}

impl Detached {
    pub fn new(
        name: &'static str,
        sink: std::sync::Arc<dyn TimedSink>,
        max_bytes: usize,
    ) -> Detached {
        let (tx, rx) = std::sync::mpsc::channel::<(Event, std::time::Instant)>();
        let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let q = queued.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kiln-{name}"))
            .spawn(move || {
                for (e, at) in rx {
                    sink.event_at(&e, at);
                    q.fetch_sub(event_size(&e), std::sync::atomic::Ordering::Relaxed);
                }
            })
            .ok();
        Detached {
            tx: std::sync::Mutex::new(Some(tx)),
            thread: std::sync::Mutex::new(thread),
            queued,
            dropped: Default::default(),
            max_bytes,
            name,
        }
    }

    /// Waits until every queued event was handed over; later events are dropped.
    pub fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl EventSink for Detached {
    fn event(&self, e: &Event) {
        use std::sync::atomic::Ordering;
        let size = event_size(e);
        if self.queued.load(Ordering::Relaxed) + size > self.max_bytes {
            if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!("{}: its writer is behind; events are dropped", self.name);
            }
            return;
        }
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref() {
            self.queued.fetch_add(size, Ordering::Relaxed);
            if tx.send((e.clone(), std::time::Instant::now())).is_err() {
                self.queued.fetch_sub(size, Ordering::Relaxed);
            }
        }
    }
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
            Event::SubstitutionStarted { path, .. } => {
                Some(format!("@ substituter-started {path} substitute"))
            }
            Event::SubstitutionFinished { path, ok: true, .. } => {
                Some(format!("@ substituter-succeeded {path}"))
            }
            Event::SubstitutionFinished { path, error, .. } => Some(format!(
                "@ substituter-failed {path} - {}",
                substitution_error(path, error)
            )),
            Event::HashMismatch {
                path,
                algo,
                expected,
                actual,
            } => Some(format!("@ hash-mismatch {path} {algo} {expected} {actual}")),
            // As Guix's substituter writes them (`progress-reporter/trace`): an unknown
            // size is `-`; the end repeats the whole size as progress first.
            Event::Download { path, download } => {
                let size = |s: &Option<u64>| s.map_or("-".to_string(), |n| n.to_string());
                Some(match download {
                    kiln_substitute::Download::Started { url, size: s } => {
                        format!("@ download-started {path} {url} {}", size(s))
                    }
                    kiln_substitute::Download::Progress {
                        url,
                        size: s,
                        transferred,
                    } => format!("@ download-progress {path} {url} {} {transferred}", size(s)),
                    kiln_substitute::Download::Succeeded { url, size: s } => format!(
                        "@ download-progress {path} {url} {s} {s}\n@ download-succeeded {path} {url} {s}"
                    ),
                })
            }
            Event::BuildLog { .. }
            | Event::Message { .. }
            | Event::HookOutput { .. }
            | Event::BuildQueued { .. }
            | Event::SubstitutionQueued { .. }
            | Event::Phase { .. } => None,
        }
    }

    /// The event [`Event::to_json`] printed (how kiln's daemon sends events to `kiln`
    /// commands that build through it); `None` for what is not one. Output paths are
    /// read in `sd`.
    pub fn from_json(v: &serde_json::Value, sd: &kiln_format::StoreDir) -> Option<Event> {
        let s = |k: &str| v[k].as_str().map(str::to_string);
        let n = |k: &str| v[k].as_u64();
        Some(match v["event"].as_str()? {
            "build-started" => Event::BuildStarted {
                drv: s("drv")?,
                system: s("system")?,
                log_file: s("log")?,
                pid: v["pid"].as_i64()? as i32,
                round: n("round")? as u32,
                rounds: n("rounds")? as u32,
                machine: s("machine")?,
            },
            "log" => Event::BuildLog {
                drv: s("drv")?,
                pid: 0,
                data: std::sync::Arc::from(s("text")?.into_bytes()),
            },
            "build-queued" => Event::BuildQueued { drv: s("drv")? },
            "substitution-queued" => Event::SubstitutionQueued {
                path: s("path")?,
                download_size: n("downloadSize")?,
                nar_size: n("narSize")?,
                source: s("source").unwrap_or_default(),
            },
            "build-finished" => {
                let status = crate::result::BuildStatus::from_name(v["status"].as_str()?)?;
                let mut result = if status.is_success() {
                    BuildResult::new(status)
                } else {
                    BuildResult::failed(status, s("error")?)
                };
                result.times_built = n("timesBuilt").unwrap_or(0) as u32;
                result.cancelled = v["cancelled"].as_bool().unwrap_or(false);
                let secs = |k: &str| v[k].as_f64().map(std::time::Duration::from_secs_f64);
                result.cpu_user = secs("cpuUser");
                result.cpu_system = secs("cpuSystem");
                result.memory_peak = n("memoryPeak");
                if let Some(outs) = v["outputs"].as_object() {
                    for (k, p) in outs {
                        let (p, _) = sd.to_store_path(p.as_str()?).ok()?;
                        result.outputs.insert(k.clone(), p);
                    }
                }
                Event::BuildFinished {
                    drv: s("drv")?,
                    result,
                }
            }
            "substitution-started" => Event::SubstitutionStarted {
                path: s("path")?,
                source: s("source").unwrap_or_default(),
            },
            "substitution-finished" => Event::SubstitutionFinished {
                path: s("path")?,
                ok: v["ok"].as_bool()?,
                error: s("error")?,
            },
            "message" => Event::Message {
                level: n("level")? as u8,
                text: s("text")?,
            },
            "hook-output" => Event::HookOutput { text: s("text")? },
            "hash-mismatch" => Event::HashMismatch {
                path: s("path")?,
                algo: s("algo")?,
                expected: s("expected")?,
                actual: s("actual")?,
            },
            "download" => Event::Download {
                path: s("path")?,
                download: match v["state"].as_str()? {
                    "started" => kiln_substitute::Download::Started {
                        url: s("url")?,
                        size: n("size"),
                    },
                    "progress" => kiln_substitute::Download::Progress {
                        url: s("url")?,
                        size: n("size"),
                        transferred: n("transferred")?,
                    },
                    "succeeded" => kiln_substitute::Download::Succeeded {
                        url: s("url")?,
                        size: n("size")?,
                    },
                    _ => return None,
                },
            },
            "phase" => Event::Phase {
                drv: s("drv")?,
                phase: match v["phase"].as_str()? {
                    "inputs" => Phase::Inputs {
                        inputs: v["inputs"]
                            .as_array()?
                            .iter()
                            .filter_map(|i| i.as_str().map(str::to_string))
                            .collect(),
                    },
                    "lock" => Phase::Lock,
                    "slot" => Phase::Slot,
                    "setup" => Phase::Setup,
                    "registering" => Phase::Registering,
                    _ => return None,
                },
            },
            _ => return None,
        })
    }

    /// The event as `kiln build --json` prints it (`docs/build-events.md`); the daemon's
    /// `json-log-path` writes the same objects.
    pub fn to_json(&self, sd: &kiln_format::StoreDir) -> serde_json::Value {
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
                "outputs": result.outputs.iter().map(|(k, v)| (k.clone(), sd.display(v)))
                    .collect::<std::collections::BTreeMap<_, _>>(),
                "cpuUser": result.cpu_user.map(|d| d.as_secs_f64()),
                "cpuSystem": result.cpu_system.map(|d| d.as_secs_f64()),
                "memoryPeak": result.memory_peak,
                "cancelled": result.cancelled
            }),
            Event::SubstitutionStarted { path, source } => {
                json!({"event": "substitution-started", "path": path, "source": source})
            }
            Event::BuildQueued { drv } => json!({"event": "build-queued", "drv": drv}),
            Event::SubstitutionQueued {
                path,
                download_size,
                nar_size,
                source,
            } => json!({
                "event": "substitution-queued", "path": path, "downloadSize": download_size,
                "narSize": nar_size, "source": source
            }),
            Event::SubstitutionFinished { path, ok, error } => {
                json!({"event": "substitution-finished", "path": path, "ok": ok, "error": error})
            }
            Event::Message { level, text } => {
                json!({"event": "message", "level": level, "text": text})
            }
            Event::HookOutput { text } => json!({"event": "hook-output", "text": text}),
            Event::HashMismatch {
                path,
                algo,
                expected,
                actual,
            } => json!({
                "event": "hash-mismatch", "path": path, "algo": algo, "expected": expected,
                "actual": actual
            }),
            Event::Download { path, download } => match download {
                kiln_substitute::Download::Started { url, size } => json!({
                    "event": "download", "state": "started", "path": path, "url": url,
                    "size": size
                }),
                kiln_substitute::Download::Progress {
                    url,
                    size,
                    transferred,
                } => json!({
                    "event": "download", "state": "progress", "path": path, "url": url,
                    "size": size, "transferred": transferred
                }),
                kiln_substitute::Download::Succeeded { url, size } => json!({
                    "event": "download", "state": "succeeded", "path": path, "url": url,
                    "size": size
                }),
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::BuildStatus;

    /// What `to_json` writes, `from_json` reads back (kiln's daemon sends events to its
    /// own commands this way).
    #[test]
    fn events_survive_json() {
        let sd = kiln_format::StoreDir::new("/nix/store").unwrap();
        let out = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x";
        let mut built = BuildResult::new(BuildStatus::Built);
        built
            .outputs
            .insert("out".into(), sd.to_store_path(out).unwrap().0);
        built.times_built = 1;
        let mut failed = BuildResult::failed(BuildStatus::PermanentFailure, "no");
        failed.cancelled = true;
        let drv = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv".to_string();
        let events = vec![
            Event::BuildQueued { drv: drv.clone() },
            Event::Phase {
                drv: drv.clone(),
                phase: Phase::Inputs {
                    inputs: vec![drv.clone()],
                },
            },
            Event::Phase {
                drv: drv.clone(),
                phase: Phase::Registering,
            },
            Event::BuildStarted {
                drv: drv.clone(),
                system: "x86_64-linux".into(),
                log_file: "/l".into(),
                pid: 9,
                round: 1,
                rounds: 2,
                machine: "ssh://m".into(),
            },
            Event::BuildLog {
                drv: drv.clone(),
                pid: 0,
                data: std::sync::Arc::from(&b"hi\n"[..]),
            },
            Event::BuildFinished {
                drv: drv.clone(),
                result: built,
            },
            Event::BuildFinished {
                drv: drv.clone(),
                result: failed,
            },
            Event::SubstitutionQueued {
                path: out.into(),
                download_size: 1,
                nar_size: 2,
                source: "file:///c".into(),
            },
            Event::SubstitutionStarted {
                path: out.into(),
                source: "file:///c".into(),
            },
            Event::SubstitutionFinished {
                path: out.into(),
                ok: false,
                error: "gone".into(),
            },
            Event::Message {
                level: 1,
                text: "warning".into(),
            },
            Event::HookOutput {
                text: "files differ".into(),
            },
            Event::HashMismatch {
                path: out.into(),
                algo: "sha256".into(),
                expected: "a".into(),
                actual: "b".into(),
            },
            Event::Download {
                path: out.into(),
                download: kiln_substitute::Download::Started {
                    url: "file:///c/nar/x".into(),
                    size: None,
                },
            },
            Event::Download {
                path: out.into(),
                download: kiln_substitute::Download::Progress {
                    url: "file:///c/nar/x".into(),
                    size: Some(10),
                    transferred: 4,
                },
            },
            Event::Download {
                path: out.into(),
                download: kiln_substitute::Download::Succeeded {
                    url: "file:///c/nar/x".into(),
                    size: 10,
                },
            },
        ];
        for e in events {
            let j = e.to_json(&sd);
            let back = Event::from_json(&j, &sd).unwrap_or_else(|| panic!("{j}"));
            assert_eq!(back.to_json(&sd), j);
        }
        assert!(Event::from_json(&serde_json::json!({"event": "nope"}), &sd).is_none());
        assert!(Event::from_json(&serde_json::json!({"event": "log"}), &sd).is_none());
    }
}
