//! Build timelines: every goal's waits and work as a Chrome trace (the JSON array format),
//! which Perfetto (<https://ui.perfetto.dev>) and `chrome://tracing` open.
//!
//! A [`Timeline`] is an [`EventSink`]: fed a scheduler's events, it writes one complete
//! span (`"ph": "X"`) per phase of each goal as the phase ends:
//!
//! | `cat` | track | from … to |
//! |---|---|---|
//! | `queued` | the goal's own track under "waiting" | it was found to need building or substituting … its next phase |
//! | `inputs` | the goal's | … its input derivations' goals ended (`args.inputs` names them) |
//! | `lock` | the goal's | … another process released its outputs' lock |
//! | `slot` | the goal's | … a build slot was free |
//! | `setup` | a slot of this machine | … its build directory and sandbox were ready |
//! | `build` | a slot of the machine that builds it ("this machine" or the machine's URI) | … its builder ended |
//! | `registering` | the same slot | … its outputs were checked and registered |
//! | `substitute` | a download slot under "substitutions" | … the path was fetched |
//!
//! Every span's `args` has `drv` (or `path`) and the last span of a goal its `status`.
//! Spans are written as they end and the array's closing `]` only by [`Timeline::finish`]:
//! the format allows it to be missing, so a daemon's timeline file is readable while the
//! daemon runs and after it was killed. [`summarize`] reads such a file back.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value};

use crate::event::{Event, EventSink, Phase};

/// Track groups ("processes" in the trace format).
const WAITING: u64 = 1;
const SUBSTITUTIONS: u64 = 2;
const THIS_MACHINE: u64 = 3;

struct Open {
    cat: &'static str,
    start: u64,
    pid: u64,
    tid: u64,
    args: Value,
}

struct Inner {
    out: Box<dyn Write + Send>,
    t0: Instant,
    /// Whether anything was written after the opening `[`.
    any: bool,
    /// Set once a write failed: the timeline stops rather than fail builds.
    broken: bool,
    /// Set by `finish`: nothing may follow the closing `]`.
    closed: bool,
    /// When the event being taken happened (else: now).
    at: Option<Instant>,
    open: HashMap<String, Open>,
    /// Track of each waiting goal (released when the goal ends, for reuse).
    goal_tids: HashMap<String, u64>,
    free_goal_tids: Vec<u64>,
    next_goal_tid: u64,
    /// Track group of each machine, by URI ("" is this machine).
    machines: HashMap<String, u64>,
    /// Busy slots per track group; the slot a goal's build holds.
    busy: HashMap<u64, Vec<bool>>,
    slot_of: HashMap<String, (u64, u64)>,
    named: std::collections::HashSet<(u64, u64)>,
}

/// Writes a Chrome trace of the events it is given; see the module's documentation.
pub struct Timeline {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Timeline")
    }
}

/// The name part of a store path or `.drv` (`/s/abc…-hello.drv` → `hello`).
pub fn short(p: &str) -> &str {
    let base = p.rsplit('/').next().unwrap_or(p);
    let name = base.split_once('-').map(|(_, n)| n).unwrap_or(base);
    name.strip_suffix(".drv").unwrap_or(name)
}

impl Timeline {
    /// A timeline written to `out`, starting now.
    pub fn new(out: Box<dyn Write + Send>) -> Timeline {
        let mut inner = Inner {
            out,
            t0: Instant::now(),
            any: false,
            broken: false,
            closed: false,
            at: None,
            open: HashMap::new(),
            goal_tids: HashMap::new(),
            free_goal_tids: Vec::new(),
            next_goal_tid: 1,
            machines: HashMap::new(),
            busy: HashMap::new(),
            slot_of: HashMap::new(),
            named: Default::default(),
        };
        inner.write_raw(b"[\n");
        for (pid, name) in [
            (WAITING, "waiting"),
            (SUBSTITUTIONS, "substitutions"),
            (THIS_MACHINE, "this machine"),
        ] {
            inner.record(json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}}));
            inner.record(json!({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}));
        }
        inner.machines.insert(String::new(), THIS_MACHINE);
        Timeline {
            inner: Mutex::new(inner),
        }
    }

    /// A timeline in a new file at `path` (replacing what was there).
    pub fn create(path: &std::path::Path) -> std::io::Result<Timeline> {
        let f = std::fs::File::create(path)?;
        Ok(Timeline::new(Box::new(std::io::BufWriter::new(f))))
    }

    /// Ends the spans still open (a cancelled run) and closes the array.
    pub fn finish(&self) -> std::io::Result<()> {
        let mut i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if i.closed {
            return Ok(());
        }
        let keys: Vec<String> = i.open.keys().cloned().collect();
        for k in keys {
            i.close(&k, Some("unfinished"));
        }
        i.write_raw(b"\n]\n");
        i.closed = true;
        i.out.flush()?;
        if i.broken {
            return Err(std::io::Error::other("writing the timeline failed"));
        }
        Ok(())
    }
}

impl Inner {
    fn now(&self) -> u64 {
        let at = self.at.unwrap_or_else(Instant::now);
        at.saturating_duration_since(self.t0).as_micros() as u64
    }

    fn write_raw(&mut self, b: &[u8]) {
        if !self.broken && self.out.write_all(b).is_err() {
            self.broken = true;
            tracing::warn!("writing the build timeline failed; it stops here");
        }
    }

    fn record(&mut self, v: Value) {
        let sep: &[u8] = if self.any { b",\n" } else { b"" };
        self.any = true;
        let mut line = sep.to_vec();
        line.extend_from_slice(v.to_string().as_bytes());
        self.write_raw(&line);
    }

    fn name_thread(&mut self, pid: u64, tid: u64, name: String) {
        if self.named.insert((pid, tid)) {
            self.record(json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}));
        }
    }

    fn goal_tid(&mut self, key: &str) -> u64 {
        if let Some(t) = self.goal_tids.get(key) {
            return *t;
        }
        let t = self.free_goal_tids.pop().unwrap_or_else(|| {
            self.next_goal_tid += 1;
            self.next_goal_tid - 1
        });
        self.goal_tids.insert(key.to_string(), t);
        self.name_thread(WAITING, t, format!("goal {t}"));
        t
    }

    fn take_slot(&mut self, pid: u64, key: &str) -> u64 {
        let slots = self.busy.entry(pid).or_default();
        let i = match slots.iter().position(|b| !b) {
            Some(i) => i,
            None => {
                slots.push(false);
                slots.len() - 1
            }
        };
        slots[i] = true;
        self.slot_of.insert(key.to_string(), (pid, i as u64 + 1));
        let what = if pid == SUBSTITUTIONS {
            "download"
        } else {
            "slot"
        };
        self.name_thread(pid, i as u64 + 1, format!("{what} {}", i + 1));
        i as u64 + 1
    }

    fn free_slot(&mut self, key: &str) {
        if let Some((pid, tid)) = self.slot_of.remove(key) {
            if let Some(s) = self
                .busy
                .get_mut(&pid)
                .and_then(|v| v.get_mut(tid as usize - 1))
            {
                *s = false;
            }
        }
    }

    fn machine(&mut self, uri: &str) -> u64 {
        if let Some(p) = self.machines.get(uri) {
            return *p;
        }
        let pid = THIS_MACHINE + self.machines.len() as u64;
        self.machines.insert(uri.to_string(), pid);
        self.record(
            json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": uri}}),
        );
        self.record(json!({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}));
        pid
    }

    /// Ends `key`'s open span now, with `status` when it is the goal's last.
    fn close(&mut self, key: &str, status: Option<&str>) {
        let Some(o) = self.open.remove(key) else {
            return;
        };
        let end = self.now();
        let mut args = o.args;
        if let Some(s) = status {
            args["status"] = json!(s);
        }
        self.record(json!({
            "name": format!("{} {}", o.cat, short(key)),
            "cat": o.cat,
            "ph": "X",
            "ts": o.start,
            "dur": end.saturating_sub(o.start),
            "pid": o.pid,
            "tid": o.tid,
            "args": args,
        }));
    }

    fn open(&mut self, key: &str, cat: &'static str, pid: u64, tid: u64, mut args: Value) {
        self.close(key, None);
        let field = if key.ends_with(".drv") { "drv" } else { "path" };
        args[field] = json!(key);
        let start = self.now();
        self.open.insert(
            key.to_string(),
            Open {
                cat,
                start,
                pid,
                tid,
                args,
            },
        );
    }

    fn waiting(&mut self, key: &str, cat: &'static str, args: Value) {
        let tid = self.goal_tid(key);
        self.open(key, cat, WAITING, tid, args);
    }

    fn ended(&mut self, key: &str, status: &str) {
        self.close(key, Some(status));
        self.free_slot(key);
        if let Some(t) = self.goal_tids.remove(key) {
            self.free_goal_tids.push(t);
        }
        // Each ended goal reaches the file: a daemon's timeline is readable while it runs
        // and after it was killed.
        if !self.broken && self.out.flush().is_err() {
            self.broken = true;
            tracing::warn!("writing the build timeline failed; it stops here");
        }
    }

    fn event(&mut self, e: &Event) {
        match e {
            Event::BuildQueued { drv } => self.waiting(drv, "queued", json!({})),
            Event::Phase { drv, phase } => match phase {
                Phase::Inputs { inputs } => {
                    self.waiting(drv, "inputs", json!({ "inputs": inputs }))
                }
                Phase::Lock => self.waiting(drv, "lock", json!({})),
                Phase::Slot => self.waiting(drv, "slot", json!({})),
                Phase::Setup => {
                    let tid = self.take_slot(THIS_MACHINE, drv);
                    self.open(drv, "setup", THIS_MACHINE, tid, json!({}));
                }
                Phase::Registering => {
                    if let Some(&(pid, tid)) = self.slot_of.get(drv.as_str()) {
                        self.open(drv, "registering", pid, tid, json!({}));
                    }
                }
            },
            Event::BuildStarted {
                drv,
                pid,
                round,
                machine,
                ..
            } => {
                let (mpid, tid) = match self.slot_of.get(drv.as_str()) {
                    // A further round keeps its slot.
                    Some(&s) => s,
                    None => {
                        let m = self.machine(machine);
                        (m, self.take_slot(m, drv))
                    }
                };
                self.open(
                    drv,
                    "build",
                    mpid,
                    tid,
                    json!({"pid": pid, "round": round, "machine": machine}),
                );
            }
            Event::BuildFinished { drv, result } => self.ended(
                drv,
                if result.cancelled {
                    "Cancelled"
                } else {
                    result.status.name()
                },
            ),
            Event::SubstitutionQueued { path, .. } => self.waiting(path, "queued", json!({})),
            Event::SubstitutionStarted { path, .. } => {
                let tid = self.take_slot(SUBSTITUTIONS, path);
                self.open(path, "substitute", SUBSTITUTIONS, tid, json!({}));
            }
            Event::SubstitutionFinished { path, ok, .. } => {
                self.ended(path, if *ok { "Substituted" } else { "Failed" })
            }
            Event::BuildLog { .. }
            | Event::Message { .. }
            | Event::HookOutput { .. }
            | Event::HashMismatch { .. }
            | Event::Download { .. } => {}
        }
    }
}

impl EventSink for Timeline {
    fn event(&self, e: &Event) {
        crate::event::TimedSink::event_at(self, e, Instant::now());
    }
}

impl crate::event::TimedSink for Timeline {
    /// Takes `e` as it happened at `at` (its spans' times), however late it arrives.
    fn event_at(&self, e: &Event, at: Instant) {
        let mut i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !i.broken && !i.closed {
            i.at = Some(at);
            i.event(e);
            i.at = None;
        }
    }
}

/// One goal as a timeline file shows it.
#[derive(Debug, Clone, Default)]
pub struct GoalSpans {
    pub key: String,
    pub start: u64,
    /// When its work (set-up, build or download) began; its start if it had none.
    pub work_start: Option<u64>,
    pub end: u64,
    pub status: String,
    pub inputs: Vec<String>,
    /// Microseconds by phase (`cat`).
    pub phases: BTreeMap<String, u64>,
    /// The track group and slot it built or downloaded in.
    pub slot: Option<(u64, u64)>,
}

/// What a timeline file says: goals, the tracks' names, and its time span.
#[derive(Debug, Default)]
pub struct Summary {
    pub goals: BTreeMap<String, GoalSpans>,
    pub track_names: BTreeMap<u64, String>,
    /// Slots seen per track group.
    pub slots: BTreeMap<u64, u64>,
    pub start: u64,
    pub end: u64,
}

/// Reads a timeline written by [`Timeline`] (closed or not: a missing `]` and a trailing
/// comma are accepted, as trace viewers accept them).
pub fn summarize(text: &str) -> crate::Result<Summary> {
    let t = text.trim_end();
    let t = t.strip_suffix(',').unwrap_or(t);
    let owned;
    let t = if t.ends_with(']') {
        t
    } else {
        owned = format!("{t}]");
        &owned
    };
    let events: Vec<Value> = serde_json::from_str(t).map_err(|e| {
        crate::Error::Invalid(format!(
            "not a timeline (a JSON array of trace events): {e}"
        ))
    })?;
    let mut s = Summary {
        start: u64::MAX,
        ..Default::default()
    };
    for (index, e) in events.iter().enumerate() {
        let bad =
            |what: &str| crate::Error::Invalid(format!("trace event {index} is malformed: {what}"));
        let ph = e["ph"].as_str().ok_or_else(|| bad("no 'ph'"))?;
        let pid = e["pid"].as_u64().ok_or_else(|| bad("no numeric 'pid'"))?;
        if ph == "M" {
            if e["name"] == "process_name" {
                if let Some(n) = e["args"]["name"].as_str() {
                    s.track_names.insert(pid, n.to_string());
                }
            }
            continue;
        }
        if ph != "X" {
            continue;
        }
        let ts = e["ts"].as_u64().ok_or_else(|| bad("no numeric 'ts'"))?;
        let dur = e["dur"].as_u64().ok_or_else(|| bad("no numeric 'dur'"))?;
        let tid = e["tid"].as_u64().ok_or_else(|| bad("no numeric 'tid'"))?;
        let cat = e["cat"].as_str().ok_or_else(|| bad("no 'cat'"))?;
        let key = e["args"]["drv"]
            .as_str()
            .or_else(|| e["args"]["path"].as_str())
            .ok_or_else(|| bad("no 'args.drv' or 'args.path'"))?;
        let g = s.goals.entry(key.to_string()).or_insert_with(|| GoalSpans {
            key: key.to_string(),
            start: ts,
            ..Default::default()
        });
        g.start = g.start.min(ts);
        g.end = g.end.max(ts.saturating_add(dur));
        if !matches!(cat, "queued" | "inputs" | "lock" | "slot") {
            g.work_start = Some(g.work_start.map_or(ts, |w| w.min(ts)));
        }
        *g.phases.entry(cat.to_string()).or_default() += dur;
        if let Some(st) = e["args"]["status"].as_str() {
            g.status = st.to_string();
        }
        if let Some(inputs) = e["args"]["inputs"].as_array() {
            g.inputs = inputs
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
        }
        if pid != WAITING {
            g.slot = Some((pid, tid));
            let n = s.slots.entry(pid).or_default();
            *n = (*n).max(tid);
        }
        s.start = s.start.min(ts);
        s.end = s.end.max(ts.saturating_add(dur));
    }
    if s.goals.is_empty() {
        s.start = 0;
    }
    Ok(s)
}

impl Summary {
    /// The chain of goals that decided the run's length: from the goal that ended last,
    /// back through the input that each waited for longest (the one that ended last),
    /// earliest first.
    pub fn critical_path(&self) -> Vec<&GoalSpans> {
        let mut path = Vec::new();
        let mut cur = self.goals.values().max_by_key(|g| (g.end, g.key.clone()));
        while let Some(g) = cur {
            path.push(g);
            if path.len() > self.goals.len() {
                break;
            }
            cur = g
                .inputs
                .iter()
                .filter_map(|i| self.goals.get(i))
                .max_by_key(|i| (i.end, i.key.clone()));
        }
        path.reverse();
        path
    }

    /// Microseconds by phase over all goals.
    pub fn time_by_phase(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for g in self.goals.values() {
            for (k, v) in &g.phases {
                *m.entry(k.clone()).or_default() += v;
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::{BuildResult, BuildStatus};

    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn finished(drv: &str) -> Event {
        Event::BuildFinished {
            drv: drv.into(),
            result: BuildResult::new(BuildStatus::Built),
        }
    }
    fn started(drv: &str) -> Event {
        Event::BuildStarted {
            drv: drv.into(),
            system: "x86_64-linux".into(),
            log_file: String::new(),
            pid: 7,
            round: 1,
            rounds: 1,
            machine: String::new(),
        }
    }

    #[test]
    fn spans_slots_and_the_critical_path() {
        let buf = Buf::default();
        let t = Timeline::new(Box::new(buf.clone()));
        let (a, b, c) = ("/s/1-a.drv", "/s/2-b.drv", "/s/3-c.drv");
        let sleep = || std::thread::sleep(std::time::Duration::from_millis(2));
        for d in [a, b, c] {
            t.event(&Event::BuildQueued { drv: d.into() });
        }
        t.event(&Event::Phase {
            drv: c.into(),
            phase: Phase::Inputs {
                inputs: vec![a.into(), b.into()],
            },
        });
        t.event(&started(a));
        t.event(&started(b));
        sleep();
        t.event(&finished(a));
        sleep();
        t.event(&Event::Phase {
            drv: b.into(),
            phase: Phase::Registering,
        });
        t.event(&finished(b));
        t.event(&started(c));
        sleep();
        t.event(&finished(c));
        // Written while running: readable before `finish`.
        let partial = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let s = summarize(&partial).unwrap();
        assert_eq!(s.goals.len(), 3);
        t.finish().unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.trim_end().ends_with(']'));
        let s = summarize(&text).unwrap();
        // a and b built side by side in two slots; c reused the first free one.
        assert_eq!(s.goals[a].slot, Some((THIS_MACHINE, 1)));
        assert_eq!(s.goals[b].slot, Some((THIS_MACHINE, 2)));
        assert_eq!(s.goals[c].slot, Some((THIS_MACHINE, 1)));
        assert_eq!(s.slots[&THIS_MACHINE], 2);
        assert!(s.goals[b].phases.contains_key("registering"));
        assert_eq!(s.goals[c].status, "Built");
        // b ended after a: the path is b then c.
        let path: Vec<&str> = s.critical_path().iter().map(|g| g.key.as_str()).collect();
        assert_eq!(path, vec![b, c]);
        assert!(s.time_by_phase()["inputs"] >= 4000);
    }

    #[test]
    fn malformed_files_are_refused_with_the_event() {
        let e = summarize("{").unwrap_err().to_string();
        assert!(e.starts_with("not a timeline"), "{e}");
        let e = summarize(r#"[{"ph":"X","pid":3,"tid":1,"ts":0,"dur":5,"cat":"build","args":{}}]"#)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "trace event 0 is malformed: no 'args.drv' or 'args.path'"
        );
    }
}
