//! What the daemon shows of all builds at once, whichever client asked for them: the
//! active builds ([`crate::active`]), metrics ([`Metrics`], served by `--metrics`), the
//! JSON event log (`json-log-path`) and the timeline (`timeline-file`).
//!
//! [`Watch`] is the scheduler's observer: it sees each event once, on the scheduler
//! thread, so nothing here blocks. The JSON log is written by a thread of its own through
//! a bounded queue: a reader that stops reading a `json-log-path` socket costs events
//! (counted, and warned about once), never a stalled scheduler.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_build::timeline::Timeline;
use kiln_build::{Event, EventSink};

use crate::active::ActiveBuilds;

/// Bytes of JSON lines the log may have queued before it drops further ones (a noisy
/// build and a slow reader must not grow the daemon without bound).
const JSON_LOG_QUEUE_BYTES: usize = 64 << 20;

/// The daemon's observer of every build.
pub struct Watch {
    pub active: ActiveBuilds,
    pub metrics: Metrics,
    json_log: Option<JsonLog>,
    /// The timeline, and the thread that writes it.
    timeline: Option<(Arc<Timeline>, kiln_build::event::Detached)>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Watch(json log: {}, timeline: {})",
            self.json_log.is_some(),
            self.timeline.is_some()
        )
    }
}

impl Watch {
    /// From the daemon's settings: `json-log-path` and `timeline-file`. A log or timeline
    /// that cannot be opened is warned about, and the daemon runs without it, as
    /// nix-daemon does with its JSON log.
    pub fn new(own: &crate::settings::DaemonSettings, sd: &kiln_format::StoreDir) -> Watch {
        let json_log = match &own.json_log_path {
            None => None,
            Some(p) => match JsonLog::open(p, sd.clone()) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(
                        "json-log-path '{}': {e}; no JSON log is written",
                        p.display()
                    );
                    None
                }
            },
        };
        let timeline = match &own.timeline_file {
            None => None,
            Some(p) => match Timeline::create(p) {
                Ok(t) => {
                    let t = Arc::new(t);
                    let feed = kiln_build::event::Detached::new("timeline", t.clone(), 64 << 20);
                    Some((t, feed))
                }
                Err(e) => {
                    tracing::warn!(
                        "timeline-file '{}': {e}; no timeline is written",
                        p.display()
                    );
                    None
                }
            },
        };
        Watch {
            active: ActiveBuilds::default(),
            metrics: Metrics::default(),
            json_log,
            timeline,
        }
    }

    /// Closes the timeline's array (at the daemon's stop).
    pub fn finish(&self) {
        if let Some((t, feed)) = &self.timeline {
            feed.close();
            if let Err(e) = t.finish() {
                tracing::warn!("timeline: {e}");
            }
        }
    }
}

impl EventSink for Watch {
    fn event(&self, e: &Event) {
        self.active.event(e);
        self.metrics.event(e);
        if let Some((_, feed)) = &self.timeline {
            feed.event(e);
        }
        if let Some(l) = &self.json_log {
            l.send(e);
        }
    }
}

/// `json-log-path`: events as JSON lines (`docs/build-events.md`), to a file (appended to,
/// created 0644) or to a Unix socket someone listens on, as Nix's setting of that name.
struct JsonLog {
    tx: std::sync::mpsc::Sender<String>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    dropped: Arc<AtomicU64>,
    store_dir: kiln_format::StoreDir,
}

impl JsonLog {
    fn open(path: &Path, store_dir: kiln_format::StoreDir) -> std::io::Result<JsonLog> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let out: Box<dyn Write + Send> = match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                Box::new(kiln_format::unix_socket::connect(path)?)
            }
            _ => Box::new(
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o644)
                    .open(path)?,
            ),
        };
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let q = queued.clone();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("kiln-json-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(out);
                while let Ok(line) = rx.recv() {
                    let mut ok = out.write_all(line.as_bytes()).is_ok();
                    q.fetch_sub(line.len(), Ordering::Relaxed);
                    // Flush when nothing else waits: lines reach a reader promptly.
                    let mut more = rx.try_iter();
                    for l in more.by_ref() {
                        ok &= out.write_all(l.as_bytes()).is_ok();
                        q.fetch_sub(l.len(), Ordering::Relaxed);
                    }
                    ok &= out.flush().is_ok();
                    if !ok {
                        tracing::warn!(
                            "json-log-path '{shown}': disabling the JSON log after a write error"
                        );
                        return;
                    }
                }
            })?;
        Ok(JsonLog {
            tx,
            queued,
            dropped: Arc::new(AtomicU64::new(0)),
            store_dir,
        })
    }

    fn send(&self, e: &Event) {
        let mut line = e.to_json(&self.store_dir).to_string();
        line.push('\n');
        let len = line.len();
        if self.queued.load(Ordering::Relaxed) + len > JSON_LOG_QUEUE_BYTES {
            if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!("json-log-path: its reader is behind; events are dropped");
            }
            return;
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        if self.tx.send(line).is_err() {
            // The writer stopped after a write error; nothing queues any more.
            self.queued.fetch_sub(len, Ordering::Relaxed);
        }
    }
}

/// Upper bounds (seconds) of the duration histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct MetricsInner {
    started: HashMap<String, Instant>,
    fetching: HashMap<String, Instant>,
    /// NAR sizes announced for queued substitutions (counted once they succeed).
    nar_sizes: HashMap<String, u64>,
    finished: BTreeMap<&'static str, u64>,
    substitutions: BTreeMap<&'static str, u64>,
    substituted_bytes: u64,
    build_seconds: Histogram,
    substitution_seconds: Histogram,
}

/// Counters and histograms of the daemon's builds, rendered as Prometheus text.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<MetricsInner>,
}

impl Metrics {
    fn event(&self, e: &Event) {
        // Build logs and messages, by far the most frequent, cost no lock.
        if matches!(
            e,
            Event::BuildLog { .. } | Event::Message { .. } | Event::Phase { .. }
        ) {
            return;
        }
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match e {
            Event::BuildStarted { drv, round, .. } if *round <= 1 => {
                m.started.insert(drv.clone(), Instant::now());
            }
            Event::BuildFinished { drv, result } => {
                if let Some(t) = m.started.remove(drv) {
                    m.build_seconds.observe(t.elapsed().as_secs_f64());
                }
                let status = if result.cancelled {
                    "Cancelled"
                } else {
                    result.status.name()
                };
                *m.finished.entry(status).or_default() += 1;
            }
            Event::SubstitutionQueued { path, nar_size, .. } => {
                m.nar_sizes.insert(path.clone(), *nar_size);
            }
            Event::SubstitutionStarted { path, .. } => {
                m.fetching.insert(path.clone(), Instant::now());
            }
            Event::SubstitutionFinished { path, ok, .. } => {
                if let Some(t) = m.fetching.remove(path) {
                    m.substitution_seconds.observe(t.elapsed().as_secs_f64());
                }
                let size = m.nar_sizes.remove(path).unwrap_or(0);
                if *ok {
                    m.substituted_bytes += size;
                }
                *m.substitutions
                    .entry(if *ok { "ok" } else { "failed" })
                    .or_default() += 1;
            }
            _ => {}
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, active: &ActiveBuilds, clients: usize) -> String {
        use std::fmt::Write as _;
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (running, queued) = active.counts();
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            "kiln_builds_running",
            "Builds running now, here or on build machines.",
            "gauge",
            running as u64,
        );
        gauge(
            "kiln_builds_queued",
            "Builds waiting for their inputs, a lock or a slot.",
            "gauge",
            queued as u64,
        );
        gauge(
            "kiln_clients_connected",
            "Client connections being served.",
            "gauge",
            clients as u64,
        );
        gauge(
            "kiln_db_busy_retries_total",
            "Database write transactions retried because another process held the database.",
            "counter",
            kiln_store::db::busy_retries(),
        );
        gauge(
            "kiln_substituted_bytes_total",
            "NAR bytes of the paths substituted.",
            "counter",
            m.substituted_bytes,
        );
        let _ = writeln!(
            out,
            "# HELP kiln_builds_finished_total Derivation goals ended, by status.\n# TYPE kiln_builds_finished_total counter"
        );
        for (s, n) in &m.finished {
            let _ = writeln!(out, "kiln_builds_finished_total{{status=\"{s}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP kiln_substitutions_finished_total Substitutions ended, by result.\n# TYPE kiln_substitutions_finished_total counter"
        );
        for (s, n) in &m.substitutions {
            let _ = writeln!(
                out,
                "kiln_substitutions_finished_total{{result=\"{s}\"}} {n}"
            );
        }
        m.build_seconds.render(
            "kiln_build_duration_seconds",
            "Time from a builder's start to its goal's end.",
            &mut out,
        );
        m.substitution_seconds.render(
            "kiln_substitution_duration_seconds",
            "Time to fetch a path.",
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_build::result::{BuildResult, BuildStatus};

    #[test]
    fn metrics_count_and_bucket() {
        let m = Metrics::default();
        let a = ActiveBuilds::default();
        let drv = "/s/abc-x.drv".to_string();
        for e in [
            Event::BuildQueued { drv: drv.clone() },
            Event::BuildStarted {
                drv: drv.clone(),
                system: "x86_64-linux".into(),
                log_file: String::new(),
                pid: 0,
                round: 1,
                rounds: 1,
                machine: "ssh://m".into(),
            },
        ] {
            m.event(&e);
            a.event(&e);
        }
        assert!(m.render(&a, 3).contains("\nkiln_builds_running 1\n"));
        let done = Event::BuildFinished {
            drv,
            result: BuildResult::new(BuildStatus::Built),
        };
        m.event(&done);
        a.event(&done);
        let text = m.render(&a, 3);
        assert!(text.contains("\nkiln_builds_running 0\n"), "{text}");
        assert!(text.contains("kiln_clients_connected 3\n"), "{text}");
        assert!(
            text.contains("kiln_builds_finished_total{status=\"Built\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kiln_build_duration_seconds_bucket{le=\"0.01\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kiln_build_duration_seconds_count 1\n"),
            "{text}"
        );
    }
}
