//! Build progress in the client's dialect.
//!
//! Nix clients (≥ 1.20) get what Nix 2.8's daemon sends: a `Build` activity per builder
//! ("building '…drv'", fields drv, machine, round, rounds) whose output arrives line by
//! line as `BuildLogLine` results, a `Substitute` activity per download, and the errors of
//! goals that are not the request's own targets as log lines (a target's error becomes the
//! operation's error). Guix clients get the builder's output as it comes (prefixed with
//! `@ build-log PID LEN` when they asked for multiplexed output) and, when they asked for
//! build traces, the `@ build-started …` lines.

use std::collections::{BTreeSet, HashMap};

use kiln_build::Event;
use kiln_protocol::stderr::{activity, level, result};
use kiln_protocol::{Feature, Field, OpIo};

/// How an event starts as a log line for a client with the `kiln-events` feature.
pub const KILN_EVENT: &str = "@kiln-event ";

use crate::Daemon;

/// One operation's progress state.
#[derive(Debug)]
pub struct Progress<'d> {
    daemon: &'d Daemon,
    /// The request's own derivations and paths (absolute): their failures are reported
    /// as the operation's error, not as log lines.
    targets: BTreeSet<String>,
    /// Running builds: activity id and the unfinished last line.
    builds: HashMap<String, (u64, Vec<u8>)>,
    /// Running substitutions: the `Substitute` activity and its `CopyPath` one.
    substitutions: HashMap<String, (u64, Option<u64>)>,
    /// NAR sizes of queued substitutions (their copies' progress).
    nar_sizes: HashMap<String, u64>,
    /// Running downloads of substitutions' files: their `FileTransfer` activities.
    downloads: HashMap<String, u64>,
    /// Bytes of a build's log that end in the middle of a UTF-8 character (kiln clients).
    utf8_tails: HashMap<String, Vec<u8>>,
    /// The store's directory, for kiln clients' events (read once, not per event).
    store_dir: kiln_format::StoreDir,
    pub trace: bool,
    /// Guix's extended trace: with `trace`, downloads' `@ download-*` lines too.
    pub extended_trace: bool,
    pub multiplexed: bool,
    pub build_verbosity: u64,
    /// Whether the daemon has `nix-command` (failure messages suggest `nix log`).
    pub nix_command: bool,
    /// Nix's counters (`[N/M built, K copied (X MiB)]`), once started.
    counters: Option<Counters>,
}

/// What nix-daemon's worker counts for a client's progress bar: its `Realise`, `Builds` and
/// `CopyPaths` activities, with `Progress` results (done, expected, running, failed) and
/// the expected download and unpacked sizes (`SetExpected` of `FileTransfer` and
/// `CopyPath` on `Realise`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Counters {
    ids: (u64, u64, u64),
    builds: [u64; 4],
    copies: [u64; 4],
    download: u64,
    nar: u64,
    queued_builds: BTreeSet<String>,
    started_builds: BTreeSet<String>,
    queued_copies: BTreeSet<String>,
    started_copies: BTreeSet<String>,
}

impl<'d> Progress<'d> {
    pub fn new(daemon: &'d Daemon, targets: BTreeSet<String>) -> Self {
        Progress {
            daemon,
            targets,
            builds: HashMap::new(),
            substitutions: HashMap::new(),
            nar_sizes: HashMap::new(),
            downloads: HashMap::new(),
            utf8_tails: HashMap::new(),
            store_dir: daemon.store().store_dir().clone(),
            trace: false,
            extended_trace: false,
            multiplexed: false,
            build_verbosity: 0,
            nix_command: false,
            counters: None,
        }
    }

    /// Starts the counters' activities (Nix clients), as nix-daemon's worker does for
    /// every operation that builds or substitutes.
    pub fn begin(&mut self, io: &mut OpIo<'_>) -> std::io::Result<()> {
        if io.proto().is_guix() || io.proto().has_feature(Feature::KilnEvents) {
            return Ok(());
        }
        let mut c = Counters {
            ids: (
                self.daemon.next_activity(),
                self.daemon.next_activity(),
                self.daemon.next_activity(),
            ),
            ..Default::default()
        };
        io.start_activity(c.ids.0, level::ERROR, activity::REALISE, "", &[], 0)?;
        io.start_activity(c.ids.1, level::ERROR, activity::BUILDS, "", &[], 0)?;
        io.start_activity(c.ids.2, level::ERROR, activity::COPY_PATHS, "", &[], 0)?;
        send_counters(io, &mut c)?;
        self.counters = Some(c);
        Ok(())
    }

    /// Stops the counters' activities.
    pub fn end(&mut self, io: &mut OpIo<'_>) -> std::io::Result<()> {
        if let Some(c) = self.counters.take() {
            io.stop_activity(c.ids.2)?;
            io.stop_activity(c.ids.1)?;
            io.stop_activity(c.ids.0)?;
        }
        Ok(())
    }

    /// Counts `e`; sends the counters if they changed.
    fn count(&mut self, io: &mut OpIo<'_>, e: &Event) -> std::io::Result<()> {
        let Some(c) = self.counters.as_mut() else {
            return Ok(());
        };
        let before = (c.builds, c.copies, c.download, c.nar);
        match e {
            Event::BuildQueued { drv } if c.queued_builds.insert(drv.clone()) => {
                c.builds[1] += 1;
            }
            Event::BuildStarted { drv, round, .. }
                if *round <= 1 && c.started_builds.insert(drv.clone()) =>
            {
                c.builds[2] += 1;
            }
            Event::BuildFinished { drv, result } => {
                if c.started_builds.remove(drv) {
                    c.builds[2] -= 1;
                }
                if c.queued_builds.remove(drv) {
                    if result.success() {
                        c.builds[0] += 1;
                    } else if !result.cancelled {
                        c.builds[3] += 1;
                    }
                }
            }
            Event::SubstitutionQueued {
                path,
                download_size,
                nar_size,
                ..
            } if c.queued_copies.insert(path.clone()) => {
                c.copies[1] += 1;
                c.download += download_size;
                c.nar += nar_size;
            }
            Event::SubstitutionStarted { path, .. } if c.started_copies.insert(path.clone()) => {
                c.copies[2] += 1;
            }
            Event::SubstitutionFinished { path, ok, .. } => {
                if c.started_copies.remove(path) {
                    c.copies[2] -= 1;
                }
                if c.queued_copies.remove(path) {
                    c.copies[if *ok { 0 } else { 3 }] += 1;
                }
            }
            _ => {}
        }
        if (c.builds, c.copies, c.download, c.nar) != before {
            send_counters(io, c)?;
        }
        Ok(())
    }

    /// Relays one event. Errors mean the client is gone.
    pub fn event(&mut self, io: &mut OpIo<'_>, e: &Event) -> std::io::Result<()> {
        if io.proto().is_guix() {
            self.guix(io, e)
        } else if io.proto().has_feature(Feature::KilnEvents) {
            self.kiln(io, e)
        } else {
            self.nix(io, e)
        }
    }

    /// kiln's own commands: the event itself, as a JSON log line.
    fn kiln(&mut self, io: &mut OpIo<'_>, e: &Event) -> std::io::Result<()> {
        let send = |io: &mut OpIo<'_>, e: &Event, sd: &kiln_format::StoreDir| {
            io.next_raw(format!("{KILN_EVENT}{}\n", e.to_json(sd)).as_bytes())
        };
        match e {
            // Log text travels as JSON strings: a character cut between two chunks waits
            // for its end rather than become U+FFFD.
            Event::BuildLog { drv, pid, data } => {
                let mut bytes = self.utf8_tails.remove(drv).unwrap_or_default();
                bytes.extend_from_slice(data);
                let keep = match std::str::from_utf8(&bytes) {
                    Err(err) if err.error_len().is_none() => bytes.len() - err.valid_up_to(),
                    _ => 0,
                };
                let tail = bytes.split_off(bytes.len() - keep);
                if !tail.is_empty() {
                    self.utf8_tails.insert(drv.clone(), tail);
                }
                if bytes.is_empty() {
                    return Ok(());
                }
                let whole = Event::BuildLog {
                    drv: drv.clone(),
                    pid: *pid,
                    data: std::sync::Arc::from(bytes),
                };
                send(io, &whole, &self.store_dir)
            }
            // Whatever was held back of the log goes before the end.
            Event::BuildFinished { drv, .. } => {
                if let Some(tail) = self.utf8_tails.remove(drv) {
                    let rest = Event::BuildLog {
                        drv: drv.clone(),
                        pid: 0,
                        data: std::sync::Arc::from(tail),
                    };
                    send(io, &rest, &self.store_dir)?;
                }
                send(io, e, &self.store_dir)
            }
            _ => send(io, e, &self.store_dir),
        }
    }

    fn failure_line(&self, io: &mut OpIo<'_>, what: &str, error: &str) -> std::io::Result<()> {
        if self.targets.contains(what) || error.is_empty() {
            return Ok(());
        }
        // As Nix prints errors: continuation lines aligned under the message.
        io.log(
            level::ERROR,
            &format!("error: {}", error.replace('\n', "\n       ")),
        )
    }

    fn nix(&mut self, io: &mut OpIo<'_>, e: &Event) -> std::io::Result<()> {
        self.count(io, e)?;
        match e {
            Event::BuildStarted {
                drv,
                round,
                rounds,
                machine,
                ..
            } => {
                let id = self.daemon.next_activity();
                // As nix-daemon words them; the machine is the activity's second field.
                let text = if !machine.is_empty() {
                    format!("building '{drv}' on '{machine}'")
                } else if *rounds > 1 {
                    format!("building '{drv}' (round {round}/{rounds})")
                } else {
                    format!("building '{drv}'")
                };
                io.start_activity(
                    id,
                    level::INFO,
                    activity::BUILD,
                    &text,
                    &[
                        Field::from(drv.as_str()),
                        Field::from(machine.as_str()),
                        Field::Int(*round as u64),
                        Field::Int(*rounds as u64),
                    ],
                    0,
                )?;
                self.builds.insert(drv.clone(), (id, Vec::new()));
            }
            Event::BuildLog { drv, data, .. } => {
                let Some((id, line)) = self.builds.get_mut(drv) else {
                    return Ok(());
                };
                let id = *id;
                let mut done = Vec::new();
                for &b in data.iter() {
                    match b {
                        b'\n' => done.push(std::mem::take(line)),
                        // A carriage return starts the line over, as on a terminal.
                        b'\r' => line.clear(),
                        _ if line.len() < 1 << 20 => line.push(b),
                        _ => {}
                    }
                }
                for l in done {
                    // Structured messages from the builder (`@nix {json}` on $NIX_LOG_FD)
                    // are not log lines.
                    if let Some(json) = l.strip_prefix(b"@nix ") {
                        builder_message(io, json)?;
                        continue;
                    }
                    io.result(
                        id,
                        result::BUILD_LOG_LINE,
                        &[Field::String(String::from_utf8_lossy(&l).into_owned())],
                    )?;
                }
            }
            Event::BuildFinished { drv, result: r } => {
                if let Some((id, line)) = self.builds.remove(drv) {
                    if !line.is_empty() {
                        io.result(
                            id,
                            result::BUILD_LOG_LINE,
                            &[Field::String(String::from_utf8_lossy(&line).into_owned())],
                        )?;
                    }
                    io.stop_activity(id)?;
                }
                if !r.success() && !r.cancelled {
                    let text = match self.daemon.store().store_dir().parse_path(drv) {
                        Ok(p) => crate::messages::failure_text(
                            io.proto(),
                            &self.daemon.store(),
                            &p,
                            r,
                            self.nix_command,
                        ),
                        Err(_) => r.error.clone(),
                    };
                    self.failure_line(io, drv, &text)?;
                }
            }
            // As nix-daemon 2.34: the query that found the path in its cache.
            Event::SubstitutionQueued {
                path,
                nar_size,
                source,
                ..
            } => {
                self.nar_sizes.insert(path.clone(), *nar_size);
                if !source.is_empty() {
                    let id = self.daemon.next_activity();
                    io.start_activity(
                        id,
                        level::TALKATIVE,
                        activity::QUERY_PATH_INFO,
                        &format!("querying info about '{path}' on '{source}'"),
                        &[Field::from(path.as_str()), Field::from(source.as_str())],
                        0,
                    )?;
                    io.stop_activity(id)?;
                }
            }
            // A `Substitute` activity for the goal and, within it, a `CopyPath` one whose
            // progress is the NAR's bytes, as nix-daemon 2.34 shows a download.
            Event::SubstitutionStarted { path, source } if !source.is_empty() => {
                let goal = self.daemon.next_activity();
                let f = [Field::from(path.as_str()), Field::from(source.as_str())];
                io.start_activity(goal, level::ERROR, activity::SUBSTITUTE, "", &f, 0)?;
                let copy = self.daemon.next_activity();
                io.start_activity(
                    copy,
                    level::INFO,
                    activity::COPY_PATH,
                    &format!("copying path '{path}' from '{source}'"),
                    &[
                        Field::from(path.as_str()),
                        Field::from(source.as_str()),
                        Field::from("local"),
                    ],
                    goal,
                )?;
                let size = self.nar_sizes.get(path).copied().unwrap_or(0);
                io.result(copy, result::PROGRESS, &progress(0, size))?;
                self.substitutions.insert(path.clone(), (goal, Some(copy)));
            }
            Event::SubstitutionStarted { path, .. } => {
                let id = self.daemon.next_activity();
                io.start_activity(
                    id,
                    level::INFO,
                    activity::SUBSTITUTE,
                    &format!("copying path '{path}' from a substituter"),
                    &[Field::from(path.as_str()), Field::from("")],
                    0,
                )?;
                self.substitutions.insert(path.clone(), (id, None));
            }
            Event::SubstitutionFinished { path, ok, error } => {
                if let Some(id) = self.downloads.remove(path) {
                    io.stop_activity(id)?;
                }
                if let Some((goal, copy)) = self.substitutions.remove(path) {
                    if let Some(copy) = copy {
                        if *ok {
                            let size = self.nar_sizes.get(path).copied().unwrap_or(0);
                            io.result(copy, result::PROGRESS, &progress(size, size))?;
                        }
                        io.stop_activity(copy)?;
                    }
                    io.stop_activity(goal)?;
                }
                self.nar_sizes.remove(path);
                if !ok {
                    self.failure_line(io, path, error)?;
                }
            }
            // Level-0 messages repeat goal failures, reported above.
            Event::Message { level: 0, .. } => {}
            Event::Message { level, text } => io.log(*level as u64, text)?,
            Event::HookOutput { text } => io.log(level::ERROR, text)?,
            // A download is a `FileTransfer` activity inside the path's `CopyPath`, with
            // the file's bytes as progress, as nix-daemon 2.34 shows a NAR it fetches over
            // HTTP (a `file://` cache's NAR is read, not transferred: no activity).
            Event::Download { path, download } => match download {
                kiln_substitute::Download::Started { url, .. } if url.starts_with("file:") => {}
                kiln_substitute::Download::Started { url, size } => {
                    // A download that failed before, from another cache, ends here.
                    if let Some(old) = self.downloads.remove(path) {
                        io.stop_activity(old)?;
                    }
                    let id = self.daemon.next_activity();
                    let parent = self
                        .substitutions
                        .get(path)
                        .and_then(|(goal, copy)| copy.or(Some(*goal)))
                        .unwrap_or(0);
                    io.start_activity(
                        id,
                        level::TALKATIVE,
                        activity::FILE_TRANSFER,
                        &format!("downloading '{url}'"),
                        &[Field::from(url.as_str())],
                        parent,
                    )?;
                    io.result(id, result::PROGRESS, &progress(0, size.unwrap_or(0)))?;
                    self.downloads.insert(path.clone(), id);
                }
                kiln_substitute::Download::Progress {
                    size, transferred, ..
                } => {
                    if let Some(id) = self.downloads.get(path) {
                        io.result(
                            *id,
                            result::PROGRESS,
                            &progress(*transferred, size.unwrap_or(0)),
                        )?;
                    }
                }
                kiln_substitute::Download::Succeeded { size, .. } => {
                    if let Some(id) = self.downloads.remove(path) {
                        io.result(id, result::PROGRESS, &progress(*size, *size))?;
                        io.stop_activity(id)?;
                    }
                }
            },
            Event::HashMismatch { .. } | Event::BuildQueued { .. } | Event::Phase { .. } => {}
        }
        Ok(())
    }

    fn guix(&mut self, io: &mut OpIo<'_>, e: &Event) -> std::io::Result<()> {
        // guix-daemon says why a build failed before its trace line, whatever was asked.
        if let Event::BuildFinished { drv, result: r } = e {
            let guix_words = r.detail.as_ref().is_some_and(|d| !d.is_nix_2_34_wording());
            if !r.success() && !r.cancelled && guix_words {
                io.log(
                    level::ERROR,
                    &kiln_build::event::guix_failure_message(drv, r),
                )?;
            }
        }
        // Downloads are traced only when the client asked for the extended trace, as
        // Guix's substituter writes them only then.
        if self.trace && (self.extended_trace || !matches!(e, Event::Download { .. })) {
            if let Some(line) = e.trace_line() {
                io.next_raw(format!("{line}\n").as_bytes())?;
            }
        }
        match e {
            Event::BuildStarted { drv, .. } if !self.trace => {
                io.log(level::INFO, &format!("building {drv}..."))?;
            }
            Event::BuildLog { pid, data, .. } if io.verbosity() >= self.build_verbosity => {
                if self.multiplexed {
                    let mut b = format!("@ build-log {pid} {}\n", data.len()).into_bytes();
                    b.extend_from_slice(data);
                    io.next_raw(&b)?;
                } else {
                    io.next_raw(data)?;
                }
            }
            // Said above when guix-daemon has words for it.
            Event::BuildFinished { drv, result: r }
                if !r.success() && r.detail.as_ref().is_none_or(|d| d.is_nix_2_34_wording()) =>
            {
                self.failure_line(io, drv, &r.error)?;
            }
            Event::SubstitutionFinished {
                path,
                ok: false,
                error,
            } => self.failure_line(
                io,
                path,
                &kiln_build::event::substitution_error(path, error),
            )?,
            Event::Message { level, text } if *level > 0 => io.log(*level as u64, text)?,
            Event::HookOutput { text } => io.log(level::ERROR, text)?,
            _ => {}
        }
        Ok(())
    }
}

/// A `Progress` result's fields: done, expected, running, failed.
fn progress(done: u64, expected: u64) -> [Field; 4] {
    [
        Field::Int(done),
        Field::Int(expected),
        Field::Int(0),
        Field::Int(0),
    ]
}

fn send_counters(io: &mut OpIo<'_>, c: &mut Counters) -> std::io::Result<()> {
    let ints = |v: &[u64]| v.iter().map(|n| Field::Int(*n)).collect::<Vec<_>>();
    io.result(c.ids.1, result::PROGRESS, &ints(&c.builds))?;
    io.result(c.ids.2, result::PROGRESS, &ints(&c.copies))?;
    io.result(
        c.ids.0,
        result::SET_EXPECTED,
        &ints(&[activity::FILE_TRANSFER, c.download]),
    )?;
    io.result(
        c.ids.0,
        result::SET_EXPECTED,
        &ints(&[activity::COPY_PATH, c.nar]),
    )
}

/// A builder's `@nix` message. Its messages (`msg`) reach the client at their level; the
/// activities it reports are not relayed yet; anything else is warned about, in Nix's
/// words, and the build goes on.
fn builder_message(io: &mut OpIo<'_>, json: &[u8]) -> std::io::Result<()> {
    use serde_json::Value;
    let problem = match serde_json::from_slice::<Value>(json) {
        Err(e) => Some(e.to_string()),
        Ok(Value::Object(m)) => match m.get("action") {
            Some(Value::String(a)) if a == "msg" => {
                let level = m
                    .get("level")
                    .and_then(Value::as_u64)
                    .unwrap_or(level::INFO);
                match m.get("msg").and_then(Value::as_str) {
                    Some(text) => return io.log(level, text),
                    None => Some("'msg' is not a string".to_string()),
                }
            }
            Some(Value::String(a))
                if matches!(a.as_str(), "start" | "stop" | "result" | "setPhase") =>
            {
                None
            }
            Some(Value::String(a)) => Some(format!("unknown action '{a}'")),
            Some(other) => Some(format!("type must be string, but is {}", json_kind(other))),
            None => Some("it has no 'action'".to_string()),
        },
        Ok(other) => Some(format!("type must be object, but is {}", json_kind(&other))),
    };
    match problem {
        Some(why) => io.log(
            level::WARN,
            &format!("warning: Unable to handle a JSON message from the derivation builder: {why}"),
        ),
        None => Ok(()),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}
