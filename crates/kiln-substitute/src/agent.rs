//! The reference's external substituter: an agent program (`guix substitute`) that kiln
//! asks for paths, as guix-daemon does, for sites that want their existing agent (its
//! authorisation ACL, its discovery of local caches) to keep deciding what is fetched.
//!
//! Enabled with `substitute-agent PROGRAM`; the caches it uses are the `substituters`
//! setting, handed over as `substitute-urls` in `_NIX_OPTIONS` (`name=value` lines).
//!
//! * `PROGRAM substitute --query` stays running. kiln writes `info PATH… \n`; the agent
//!   answers on file descriptor 4, for each path it can provide: the path, its deriver (or
//!   an empty line), the number of references, the references, the download size and the
//!   NAR size, one per line; an empty line ends the answer.
//! * `PROGRAM substitute --substitute` (one per parallel download, reused) gets
//!   `substitute PATH DEST`, restores the path at `DEST` and answers on fd 4 with one
//!   status line: `success ALGO:HASH NAR-SIZE`, `hash-mismatch ALGO EXPECTED ACTUAL` or
//!   `not-found`; exiting without one is a failure too.
//! * Both write progress and errors to their stdout and stderr, which kiln shows.
//!
//! Unlike the reference, kiln checks what the agent wrote. `DEST` is a scratch path, not the
//! final one, and the path becomes valid only after kiln refused any hard link to a file
//! outside the tree, gave the tree canonical metadata, and found its own NAR hash equal to
//! the reported one (and its content address, for fixed outputs). An agent that errs cannot
//! register contents other than it reported, nor leave a half-written path under its final
//! name. For input-addressed paths the expected hash comes from the agent itself, so the
//! agent stays trusted for *what* the contents are, as it is in the reference (it is the
//! agent that checks the narinfo signatures).
//! Every answer is bounded (line length, reference count) and a silent agent is killed
//! after `stalled-download-timeout`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use kiln_format::path_info::ValidPathInfo;
use kiln_format::{ContentAddress, Hash, StoreDir, StorePath};
use kiln_store::{AddOptions, LocalStore};

use crate::{Error, Result, SubstConfig, SubstitutableInfo, Substituter};

/// The longest line an agent may send on its reply channel (a path, a number).
const MAX_REPLY_LINE: usize = 64 * 1024;
/// Progress lines longer than this are cut.
const MAX_LOG_LINE: usize = 4096;
/// The most references one path may list (real paths have at most a few thousand).
const MAX_REFERENCES: u64 = 1 << 16;

/// The external agent, as a [`Substituter`].
pub struct Agent {
    program: PathBuf,
    store_dir: StoreDir,
    stalled: Duration,
    /// The running query agent (one at a time, as in the reference).
    query: Mutex<Option<Proc>>,
    /// Idle substitution agents, reused by the next download with the same options.
    idle: Mutex<Vec<Proc>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Agent({})", self.program.display())
    }
}

impl Agent {
    /// `program` for a store at `store_dir`; an agent silent for `stalled` is killed.
    pub fn new(program: PathBuf, store_dir: StoreDir, stalled: Duration) -> Agent {
        Agent {
            program,
            store_dir,
            stalled,
            query: Mutex::new(None),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// `_NIX_OPTIONS` for a request: `name=value` lines, sorted by name (the reference
    /// packs its settings map that way).
    fn options(&self, cfg: &SubstConfig, substitute: bool) -> Result<String> {
        let urls = cfg.urls.join(" ");
        if urls.contains('\n') {
            return Err(Error::Unusable(
                "a substituter URL contains a newline".into(),
            ));
        }
        let mut o = String::new();
        if substitute {
            // Never asked to hard-link into `.links`: kiln refuses trees linked to files
            // outside them (`LocalStore::add_restored`) and deduplicates by itself
            // (`auto-optimise-store`).
            o.push_str("deduplicate=no\n");
        }
        o.push_str(&format!("substitute-urls={urls}\n"));
        Ok(o)
    }

    fn spawn(&self, mode: &str, options: String, cfg: &SubstConfig) -> Result<Proc> {
        Proc::spawn(&self.program, mode, options, !cfg.require_sigs)
    }

    /// Asks the query agent about `paths`.
    fn info(
        &self,
        cfg: &SubstConfig,
        paths: &BTreeSet<&StorePath>,
        log: &dyn Fn(&str),
    ) -> Result<BTreeMap<StorePath, SubstitutableInfo>> {
        if paths.is_empty() {
            return Ok(BTreeMap::new());
        }
        let options = self.options(cfg, false)?;
        let mut slot = self
            .query
            .lock()
            .map_err(|_| Error::Unusable("substitute agent lock poisoned".into()))?;
        if slot.as_ref().is_some_and(|p| p.options != options) {
            *slot = None;
        }
        let mut proc = match slot.take() {
            Some(p) => p,
            None => self.spawn("--query", options, cfg)?,
        };
        let mut req = String::from("info ");
        for p in paths {
            req.push_str(&self.store_dir.display(p));
            req.push(' ');
        }
        req.push('\n');
        proc.send(&req)?;
        let found = self.read_infos(&mut proc, paths, log)?;
        // Kept for the next query only after a complete answer and nothing more: bytes
        // past the end would be read as the next answer.
        if proc.reply.buf.is_empty() {
            *slot = Some(proc);
        }
        Ok(found)
    }

    fn read_infos(
        &self,
        proc: &mut Proc,
        asked: &BTreeSet<&StorePath>,
        log: &dyn Fn(&str),
    ) -> Result<BTreeMap<StorePath, SubstitutableInfo>> {
        let mut out = BTreeMap::new();
        let prog = self.program.display().to_string();
        let line = |proc: &mut Proc| -> Result<String> {
            proc.line(log, self.stalled)?.ok_or_else(|| {
                Error::Failed(format!("substitute agent '{prog}' died unexpectedly"))
            })
        };
        let num = |s: String, what: &str| -> Result<u64> {
            s.trim().parse().map_err(|_| {
                Error::Corrupt(format!("substitute agent sent '{s}' where {what} belongs"))
            })
        };
        loop {
            let p = line(proc)?;
            if p.is_empty() {
                return Ok(out);
            }
            let path = self.store_dir.parse_path(&p)?;
            if !asked.contains(&path) {
                return Err(Error::Corrupt(format!(
                    "substitute agent answered about '{p}', which was not asked for"
                )));
            }
            let d = line(proc)?;
            let deriver = if d.is_empty() {
                None
            } else {
                Some(self.store_dir.parse_path(&d)?)
            };
            let n = num(line(proc)?, "a number of references")?;
            if n > MAX_REFERENCES {
                return Err(Error::Corrupt(format!(
                    "substitute agent lists {n} references for '{p}'"
                )));
            }
            let mut references = BTreeSet::new();
            for _ in 0..n {
                references.insert(self.store_dir.parse_path(&line(proc)?)?);
            }
            let download_size = num(line(proc)?, "a download size")?;
            let nar_size = num(line(proc)?, "a NAR size")?;
            out.insert(
                path,
                SubstitutableInfo {
                    references,
                    deriver,
                    nar_size,
                    download_size,
                    source: String::new(),
                },
            );
        }
    }

    fn take_fetcher(&self, options: &str) -> Option<Proc> {
        let mut idle = self.idle.lock().ok()?;
        let i = idle.iter().position(|p| p.options == options)?;
        Some(idle.swap_remove(i))
    }

    fn give_back(&self, p: Proc) {
        if let Ok(mut idle) = self.idle.lock() {
            // As many as were ever busy at once; each is one idle process.
            if idle.len() < 64 {
                idle.push(p);
            }
        }
    }
}

impl Substituter for Agent {
    fn query(
        &self,
        cfg: &SubstConfig,
        paths: &BTreeMap<StorePath, Option<ContentAddress>>,
        log: &dyn Fn(&str),
    ) -> Result<BTreeMap<StorePath, SubstitutableInfo>> {
        if cfg.is_empty() {
            return Ok(BTreeMap::new());
        }
        self.info(cfg, &paths.keys().collect(), log)
    }

    fn fetch(
        &self,
        cfg: &SubstConfig,
        store: &LocalStore,
        path: &StorePath,
        ca: Option<&ContentAddress>,
        repair: bool,
        log: &dyn Fn(&str),
        _progress: &crate::ProgressSink,
    ) -> Result<()> {
        let shown = self.store_dir.display(path);
        let info = self
            .info(cfg, &BTreeSet::from([path]), log)?
            .remove(path)
            .ok_or_else(|| Error::Failed(format!("no substitute for '{shown}'")))?;
        let options = self.options(cfg, true)?;
        // Declared before the agent: on an error the agent is killed (dropped) before its
        // destination is removed, so it cannot write there again afterwards.
        let tmp = store.scratch_path(path.name())?;
        let mut proc = match self.take_fetcher(&options) {
            Some(p) => p,
            None => self.spawn("--substitute", options, cfg)?,
        };
        let dest = tmp.real().to_string_lossy().into_owned();
        if dest.contains(['\n', ' ']) {
            return Err(Error::Unusable(format!(
                "cannot hand '{dest}' to a substitute agent (white space in the path)"
            )));
        }
        proc.send(&format!("substitute {shown} {dest}\n"))?;
        let status = proc.line(log, self.stalled)?;
        let words: Vec<&str> = status.as_deref().unwrap_or("").split_whitespace().collect();
        let reported = match words.as_slice() {
            ["success", hash, size] => {
                let hash = Hash::parse_any(hash, None).map_err(|e| {
                    Error::Corrupt(format!("substitute agent reported a bad hash for '{shown}': {e}"))
                })?;
                let size: u64 = size.parse().map_err(|_| {
                    Error::Corrupt(format!("substitute agent reported a bad size for '{shown}': {size}"))
                })?;
                Ok((hash, size))
            }
            ["hash-mismatch", algo, expected, actual] => Err(Error::Failed(format!(
                "hash mismatch for substituted item '{shown}': {algo} expected {expected}, got {actual}"
            ))),
            ["not-found"] => Err(Error::Failed(format!("no substitute for '{shown}'"))),
            [] => Err(Error::Failed(format!("fetching path '{shown}' (empty status)"))),
            _ => Err(Error::Failed(format!(
                "fetching path '{shown}' (status: '{}')",
                status.as_deref().unwrap_or("")
            ))),
        };
        // An agent that answered can take the next download; one that said nothing (it
        // exited, or its state is unknown) is dropped, which kills it.
        if status.is_some() && proc.reply.buf.is_empty() {
            self.give_back(proc);
        }
        let (hash, size) = reported?;
        let mut vi = ValidPathInfo::new(path.clone(), hash, size);
        vi.references = info.references;
        vi.deriver = info.deriver;
        vi.ca = ca.copied();
        store.add_restored(
            tmp,
            &vi,
            AddOptions {
                repair,
                ..Default::default()
            },
        )?;
        // As for a cache's download: the asking goal holds its own root on the path.
        store.remove_temp_root(path);
        Ok(())
    }
}

/// A running agent: its input, its reply channel (fd 4) and its output (stdout + stderr).
struct Proc {
    options: String,
    child: Child,
    stdin: Option<ChildStdin>,
    reply: Chan,
    output: Chan,
}

impl Proc {
    fn spawn(
        program: &std::path::Path,
        mode: &str,
        options: String,
        unsigned: bool,
    ) -> Result<Proc> {
        let fail = |what: &str, e: std::io::Error| Error::Transfer {
            url: program.display().to_string(),
            action: "start the substitute agent",
            why: format!("{what}: {e}"),
        };
        let pipe = || {
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| fail("pipe", e.into()))
        };
        let (out_r, out_w) = pipe()?;
        let (reply_r, reply_w) = pipe()?;
        let out_w2 = out_w.try_clone().map_err(|e| fail("dup", e))?;
        let mut cmd = Command::new(program);
        // The limit on open files the daemon started with, not its raised one.
        kiln_sandbox::limits::restore_for(&mut cmd);
        cmd.args(["substitute", mode])
            .env("_NIX_OPTIONS", &options)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(out_w2))
            // Its own process group, so that dropping it kills whatever it started too.
            .process_group(0)
            .current_dir("/");
        if unsigned {
            // `require-sigs = false`: the agent's own switch for unsigned narinfos.
            cmd.env("GUIX_ALLOW_UNAUTHENTICATED_SUBSTITUTES", "yes");
        }
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: reply_w,
            child_fd: 4,
        }])
        .map_err(|e| fail("fd 4", std::io::Error::other(e)))?;
        let mut child = cmd.spawn().map_err(|e| fail("spawn", e))?;
        // The command holds our copies of the write ends: without dropping it, the reply
        // channel would never report the agent's exit.
        drop(cmd);
        let stdin = child.stdin.take();
        Ok(Proc {
            options,
            child,
            stdin,
            reply: Chan::new(reply_r),
            output: Chan::new(out_r),
        })
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Error::Failed("substitute agent input is closed".into()))?;
        stdin
            .write_all(line.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| Error::Failed(format!("cannot write to the substitute agent: {e}")))
    }

    /// The next reply line (`None`: the agent closed the channel), passing its output to
    /// `log` meanwhile.
    fn line(&mut self, log: &dyn Fn(&str), stalled: Duration) -> Result<Option<String>> {
        let mut deadline = Instant::now() + stalled;
        loop {
            if let Some(l) = self.reply.take_line(MAX_REPLY_LINE)? {
                return Ok(Some(l));
            }
            if self.reply.eof {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Failed(format!(
                    "the substitute agent sent nothing for {} s",
                    stalled.as_secs()
                )));
            }
            let timeout = rustix::event::Timespec {
                tv_sec: left.as_secs().min(i64::MAX as u64) as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            use rustix::event::{PollFd, PollFlags};
            let (reply_ready, output_ready) = {
                let mut fds = vec![PollFd::new(&self.reply.fd, PollFlags::IN)];
                if !self.output.eof {
                    fds.push(PollFd::new(&self.output.fd, PollFlags::IN));
                }
                match rustix::event::poll(&mut fds, Some(&timeout)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        return Err(Error::Failed(format!(
                            "waiting for the substitute agent: {e}"
                        )))
                    }
                }
                (
                    !fds[0].revents().is_empty(),
                    fds.get(1).is_some_and(|f| !f.revents().is_empty()),
                )
            };
            if output_ready {
                self.output.fill();
                while let Some(l) = self.output.take_log_line() {
                    if !l.trim().is_empty() {
                        log(&l);
                    }
                }
                // Progress is a sign of life: a long download is not a stalled one.
                deadline = Instant::now() + stalled;
                if !reply_ready {
                    continue;
                }
            }
            if reply_ready {
                self.reply.fill();
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Closing its input ends a well-behaved agent; the signal ends the rest, with
        // everything it started.
        drop(self.stdin.take());
        if let Ok(pid) = i32::try_from(self.child.id()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
        }
        let _ = self.child.wait();
    }
}

/// One pipe read into a buffer.
struct Chan {
    fd: OwnedFd,
    buf: Vec<u8>,
    eof: bool,
}

impl Chan {
    fn new(fd: OwnedFd) -> Chan {
        Chan {
            fd,
            buf: Vec::new(),
            eof: false,
        }
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        match rustix::io::read(&self.fd, &mut chunk) {
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
            Ok(0) | Err(_) => self.eof = true,
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
        }
    }

    /// A complete line (or what is left at the end of the stream).
    fn take_line(&mut self, max: usize) -> Result<Option<String>> {
        let end = match self.buf.iter().position(|&b| b == b'\n') {
            Some(i) => i,
            None if self.eof && !self.buf.is_empty() => self.buf.len(),
            None if self.buf.len() > max => {
                return Err(Error::Corrupt(format!(
                    "the substitute agent sent a line of more than {max} bytes"
                )))
            }
            None => return Ok(None),
        };
        let line: Vec<u8> = self.buf.drain(..end).collect();
        if !self.buf.is_empty() {
            self.buf.remove(0);
        }
        String::from_utf8(line).map(Some).map_err(|_| {
            Error::Corrupt("the substitute agent sent a line that is not UTF-8".into())
        })
    }

    /// A line of output: ends at `\n` or `\r` (progress bars), cut at a bounded length.
    fn take_log_line(&mut self) -> Option<String> {
        let end = match self.buf.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(i) => i.min(MAX_LOG_LINE),
            None if self.buf.len() > MAX_LOG_LINE => MAX_LOG_LINE,
            None if self.eof && !self.buf.is_empty() => self.buf.len(),
            None => return None,
        };
        let line: Vec<u8> = self.buf.drain(..end).collect();
        if matches!(self.buf.first(), Some(b'\n' | b'\r')) {
            self.buf.remove(0);
        }
        Some(String::from_utf8_lossy(&line).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines_split_on_newlines_and_carriage_returns_and_are_bounded() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        let mut c = Chan::new(r);
        let long = "x".repeat(MAX_LOG_LINE + 10);
        rustix::io::write(&w, format!("one\ntwo\r50%\rthree\n{long}").as_bytes()).unwrap();
        drop(w);
        while !c.eof {
            c.fill();
        }
        let lines: Vec<String> = std::iter::from_fn(|| c.take_log_line()).collect();
        assert_eq!(lines[..4], ["one", "two", "50%", "three"]);
        assert_eq!(lines[4].len(), MAX_LOG_LINE);
        assert_eq!(lines[5], "x".repeat(10));
    }

    /// An agent that answers every request with `reply` (a shell `printf` format) on fd 4
    /// (and then exits, with `exit`).
    fn scripted(dir: &std::path::Path, reply: &str, exit: bool) -> Agent {
        let script = dir.join("agent");
        let then = if exit { "exit 0" } else { "true" };
        std::fs::write(
            &script,
            format!("#!/bin/sh\nwhile read -r line; do printf '{reply}' >&4; {then}; done\n"),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Agent::new(
            script,
            StoreDir::new("/nix/store").unwrap(),
            Duration::from_secs(5),
        )
    }

    #[test]
    fn malformed_answers_are_refused_with_a_message() {
        let d = tempfile::tempdir().unwrap();
        let sd = StoreDir::new("/nix/store").unwrap();
        let asked = sd
            .parse_path("/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-asked")
            .unwrap();
        let other = "/nix/store/11bgd045z0d4icpbc2yyz4gx48ak44la-other";
        let cfg = SubstConfig {
            urls: vec!["file:///nonexistent".into()],
            ..Default::default()
        };
        let paths = BTreeMap::from([(asked.clone(), None)]);
        let a = sd.display(&asked);
        for (reply, want) in [
            (
                format!("{other}\\n\\n0\\n0\\n0\\n\\n"),
                "which was not asked for",
            ),
            (format!("{a}\\n\\n99999999\\n"), "lists 99999999 references"),
            (
                format!("{a}\\n\\nmany\\n"),
                "where a number of references belongs",
            ),
            (format!("{a}\\n\\n1\\nnot-a-path\\n"), "not-a-path"),
            (format!("{a}\\n"), "died unexpectedly"),
            ("y".repeat(MAX_REPLY_LINE + 1), "more than 65536 bytes"),
        ] {
            let agent = scripted(d.path(), &reply, want == "died unexpectedly");
            let e = agent.query(&cfg, &paths, &|_| {}).unwrap_err().to_string();
            assert!(e.contains(want), "{reply}: {e}");
        }
        // A well-formed answer.
        let agent = scripted(
            d.path(),
            &format!("{a}\\n{other}\\n1\\n{other}\\n123\\n456\\n\\n"),
            false,
        );
        let got = agent.query(&cfg, &paths, &|_| {}).unwrap();
        let info = &got[&asked];
        assert_eq!((info.download_size, info.nar_size), (123, 456));
        assert_eq!(
            info.deriver.as_ref().map(|p| sd.display(p)).as_deref(),
            Some(other)
        );
        assert_eq!(info.references.len(), 1);
    }
}
