//! The builds running and waiting in this daemon, for `kiln ps` and Nix's `nix ps`
//! (`QueryActiveBuilds`, op 48).
//!
//! The list is kept from the scheduler's events (one map update per build start and end),
//! not from files per build as Determinate Nix keeps it: one daemon process runs every
//! build, so it knows them all without a directory scan. What the builds' processes are
//! doing is read from `/proc` when someone asks: the descendants of the builder's main
//! process, and the build's cgroup's `cpu.stat` where it has one.
//!
//! The answer is the JSON array Determinate Nix 3.14 sends: per running build `type`
//! ("build"), `nixPid`, `clientPid`, `clientUid`, `mainPid`, `mainUser`, `cgroup`,
//! `startTime`, `derivation` (a base name), `processes` and `utime`/`stime`. kiln adds
//! `machine` (the build machine's URI; empty: here), `memory` (resident bytes) and, for
//! clients that named the `kiln-queued-builds` feature, entries of type `queued`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use kiln_build::{Event, EventSink};
use serde_json::{json, Value};

#[derive(Debug, Clone)]
struct Entry {
    /// 0 while queued, and for builds on another machine.
    pid: i32,
    machine: String,
    queued: SystemTime,
    started: Option<SystemTime>,
    /// What a queued build waits for (`queued`, `inputs`, `lock`, `slot`, `setup`).
    waiting: &'static str,
    /// The clients that asked for it: (pid, uid).
    clients: Vec<(Option<u32>, u32)>,
}

/// The daemon's running and queued builds, by `.drv` path.
#[derive(Debug, Default)]
pub struct ActiveBuilds {
    builds: Mutex<BTreeMap<String, Entry>>,
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl ActiveBuilds {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Entry>) -> T) -> T {
        f(&mut self.builds.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Notes that a client (its pid and uid) wants the build of `drv`.
    pub fn note_client(&self, drv: &str, client: (Option<u32>, u32)) {
        self.with(|m| {
            if let Some(e) = m.get_mut(drv) {
                if !e.clients.contains(&client) {
                    e.clients.push(client);
                }
            }
        })
    }

    /// How many builds run and wait.
    pub fn counts(&self) -> (usize, usize) {
        self.with(|m| {
            let running = m.values().filter(|e| e.started.is_some()).count();
            (running, m.len() - running)
        })
    }

    /// The JSON answer of `QueryActiveBuilds` (with queued builds when asked).
    pub fn to_json(&self, queued: bool) -> String {
        let snapshot: Vec<(String, Entry)> =
            self.with(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        let me = std::process::id();
        let procs = if snapshot.iter().any(|(_, e)| e.pid > 0) {
            proc::table()
        } else {
            Vec::new()
        };
        let mut out = Vec::new();
        for (drv, e) in snapshot {
            let base = drv.rsplit('/').next().unwrap_or(&drv).to_string();
            let client = e.clients.first().copied();
            let Some(started) = e.started else {
                if queued {
                    out.push(json!({
                        "type": "queued",
                        "derivation": base,
                        "queuedSince": epoch(e.queued),
                        "waitingFor": e.waiting,
                        "clientPid": client.and_then(|c| c.0),
                        "clientUid": client.map(|c| c.1),
                    }));
                }
                continue;
            };
            let mut v = json!({
                "type": "build",
                "nixPid": me,
                "clientPid": client.and_then(|c| c.0),
                "clientUid": client.map(|c| c.1),
                "mainPid": e.pid,
                // Nix's `nix ps` needs a user: the daemon's until the builder's is read
                // (a build on another machine, or one whose process just ended).
                "mainUser": proc::user(rustix::process::geteuid().as_raw()),
                "cgroup": Value::Null,
                "startTime": epoch(started),
                "derivation": base,
                "processes": [],
                "utime": Value::Null,
                "stime": Value::Null,
                "machine": e.machine,
                "memory": Value::Null,
            });
            if e.pid > 0 {
                proc::describe(&mut v, e.pid, &procs);
            }
            out.push(v);
        }
        Value::Array(out).to_string()
    }
}

impl Entry {
    fn queued() -> Entry {
        Entry {
            pid: 0,
            machine: String::new(),
            queued: SystemTime::now(),
            started: None,
            waiting: "queued",
            clients: Vec::new(),
        }
    }
}

impl EventSink for ActiveBuilds {
    fn event(&self, e: &Event) {
        match e {
            Event::BuildQueued { drv } => self.with(|m| {
                m.entry(drv.clone()).or_insert_with(Entry::queued);
            }),
            // What a queued build waits for (only queued entries show it).
            Event::Phase { drv, phase } => self.with(|m| {
                if let Some(e) = m.get_mut(drv).filter(|e| e.started.is_none()) {
                    e.waiting = phase.name();
                }
            }),
            Event::BuildStarted {
                drv, pid, machine, ..
            } => self.with(|m| {
                let e = m.entry(drv.clone()).or_insert_with(Entry::queued);
                e.pid = *pid;
                e.machine = machine.clone();
                e.started.get_or_insert_with(SystemTime::now);
            }),
            Event::BuildFinished { drv, .. } => self.with(|m| {
                m.remove(drv);
            }),
            _ => {}
        }
    }
}

/// What `/proc` says of a build's processes.
mod proc {
    use serde_json::{json, Value};

    /// Processes listed per build, at most.
    const MAX_PROCS: usize = 256;
    /// Bytes of a process's arguments listed, at most (compilers' command lines are long).
    const MAX_ARGV: usize = 4096;

    /// One process: pid, parent, uid, argv, CPU ticks (utime, stime, cutime, cstime),
    /// resident bytes.
    pub struct Proc {
        pid: i32,
        ppid: i32,
        uid: u32,
        argv: Vec<String>,
        ticks: [u64; 4],
        rss: u64,
    }

    fn read(pid: i32) -> Option<Proc> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields follow the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        let ppid = f.get(1)?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .unwrap_or(0);
        let mut cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        cmdline.truncate(MAX_ARGV);
        let argv = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // proc(5) numbers the fields from 1 (pid); `f` starts at field 3 (state): utime,
        // stime, cutime and cstime are fields 14–17, the resident set (pages) field 24.
        Some(Proc {
            pid,
            ppid,
            uid,
            argv,
            ticks: [num(11), num(12), num(13), num(14)],
            rss: num(21) * rustix::param::page_size() as u64,
        })
    }

    /// Every process on the machine (read once per query).
    pub fn table() -> Vec<Proc> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(read)
            .collect()
    }

    pub fn user(uid: u32) -> Value {
        let name = uzers::get_user_by_uid(uid).map(|u| u.name().to_string_lossy().into_owned());
        json!({"uid": uid, "name": name})
    }

    /// The build's cgroup (a `kiln-build-…` one) and its user and system seconds.
    fn cgroup(pid: i32) -> Option<(String, f64, f64, Option<u64>)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))?
            .to_string();
        if !path.rsplit('/').next()?.starts_with("kiln-build-") {
            return None;
        }
        let dir = format!("/sys/fs/cgroup{path}");
        let stat = std::fs::read_to_string(format!("{dir}/cpu.stat")).ok()?;
        let field = |n: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(n))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|us| us / 1e6)
        };
        let memory = std::fs::read_to_string(format!("{dir}/memory.current"))
            .ok()
            .and_then(|m| m.trim().parse().ok());
        Some((path, field("user_usec")?, field("system_usec")?, memory))
    }

    /// Fills a build's `mainUser`, `processes`, CPU and memory from the table.
    pub fn describe(v: &mut Value, main: i32, table: &[Proc]) {
        let hz = rustix::param::clock_ticks_per_second() as f64;
        let mut tree: Vec<&Proc> = table.iter().filter(|p| p.pid == main).collect();
        // Each process once (a pid reused during the scan could make a cycle), and at most
        // MAX_PROCS of them.
        let mut seen: std::collections::HashSet<i32> = tree.iter().map(|p| p.pid).collect();
        let mut i = 0;
        while i < tree.len() && tree.len() < MAX_PROCS {
            let parent = tree[i].pid;
            for p in table.iter().filter(|p| p.ppid == parent) {
                if tree.len() < MAX_PROCS && seen.insert(p.pid) {
                    tree.push(p);
                }
            }
            i += 1;
        }
        if let Some(m) = tree.first() {
            v["mainUser"] = user(m.uid);
        }
        let secs = |t: u64| t as f64 / hz;
        v["processes"] = tree
            .iter()
            .map(|p| {
                json!({
                    "pid": p.pid, "parentPid": p.ppid, "user": user(p.uid), "argv": p.argv,
                    "utime": secs(p.ticks[0]), "stime": secs(p.ticks[1]),
                    "cutime": secs(p.ticks[2]), "cstime": secs(p.ticks[3]),
                })
            })
            .collect();
        let rss: u64 = tree.iter().map(|p| p.rss).sum();
        v["memory"] = json!(rss);
        if let Some((path, user_s, system_s, memory)) = cgroup(main) {
            v["cgroup"] = json!(path);
            v["utime"] = json!(user_s);
            v["stime"] = json!(system_s);
            if let Some(m) = memory {
                v["memory"] = json!(m);
            }
        }
    }
}
