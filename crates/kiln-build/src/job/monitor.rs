//! Watching a running builder: its log (with the size limit and the last lines kept for
//! errors), silence and wall-clock timeouts, a disk filling up.

use super::*;

pub(super) fn disk_nearly_full(p: &Path) -> bool {
    rustix::fs::statvfs(p).is_ok_and(|s| s.f_bavail.saturating_mul(s.f_frsize) < 8 << 20)
}

pub(super) enum Monitor {
    Exited(i32, LogTail),
    Stopped(Failure),
}

/// The last lines of a build's output, for its error message (`log-lines`).
#[derive(Debug, Default)]
pub(super) struct LogTail {
    max: usize,
    lines: std::collections::VecDeque<String>,
    current: Vec<u8>,
    /// Where the next byte goes in `current` (a carriage return rewinds to 0, as terminals
    /// and Nix do).
    pos: usize,
}

impl LogTail {
    fn new(max: usize) -> Self {
        LogTail {
            max,
            ..Default::default()
        }
    }

    fn feed(&mut self, data: &[u8]) {
        if self.max == 0 {
            return;
        }
        for &b in data {
            match b {
                b'\r' => self.pos = 0,
                b'\n' => self.flush(),
                _ => {
                    // Bounded: one overlong line does not grow without limit.
                    if self.pos < 4096 {
                        if self.pos < self.current.len() {
                            self.current[self.pos] = b;
                        } else {
                            self.current.push(b);
                        }
                        self.pos += 1;
                    }
                }
            }
        }
    }

    fn flush(&mut self) {
        let line = String::from_utf8_lossy(&self.current).into_owned();
        self.current.clear();
        self.pos = 0;
        // Structured messages (`@nix {json}` on $NIX_LOG_FD) are not log lines: Nix leaves
        // them out of the tail it shows.
        if line.starts_with("@nix ") {
            return;
        }
        self.lines.push_back(line);
        if self.lines.len() > self.max {
            self.lines.pop_front();
        }
    }

    /// The last lines, the unfinished one included.
    pub(super) fn lines(mut self) -> Vec<String> {
        if !self.current.is_empty() {
            self.flush();
        }
        self.lines.into()
    }
}

/// `;\nlast N log lines:\n> …` as Nix 2.8 appends it to a builder failure, or nothing.
pub(super) fn suffix(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = format!(";\nlast {} log lines:", lines.len());
    for l in lines {
        s.push_str("\n> ");
        s.push_str(l);
    }
    s
}

/// Relays the builder's output until it is done, enforcing the limits.
pub(super) fn monitor(
    spec: &JobSpec,
    ctl: &JobControl,
    pid: i32,
    pipe: OwnedFd,
    mut log: Option<LogWriter>,
) -> (Monitor, Usage) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let drv_abs = spec.store.print(&spec.drv_path);
    let s = &spec.settings;
    let start = Instant::now();
    let mut last_output = Instant::now();
    let mut log_size = 0u64;
    let mut pipe = std::fs::File::from(pipe);
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid).expect("positive pid"),
        rustix::process::PidfdFlags::empty(),
    )
    .ok();
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail = LogTail::new(s.log_lines);
    let mut stop: Option<Failure> = None;
    let mut exited_at: Option<Instant> = None;
    loop {
        let mut wait_ms: i64 = 1000;
        if s.max_silent_time > 0 {
            let left = Duration::from_secs(s.max_silent_time).saturating_sub(last_output.elapsed());
            wait_ms = wait_ms.min(left.as_millis() as i64);
        }
        if s.timeout > 0 {
            let left = Duration::from_secs(s.timeout).saturating_sub(start.elapsed());
            wait_ms = wait_ms.min(left.as_millis() as i64);
        }
        if let Some(t) = exited_at {
            // The builder is gone; stragglers were killed. Drain briefly, then give up on a
            // descendant that escaped the process group while holding the pipe.
            let left = Duration::from_secs(1).saturating_sub(t.elapsed());
            if left.is_zero() {
                break;
            }
            wait_ms = wait_ms.min(left.as_millis() as i64);
        }
        let ts = Timespec {
            tv_sec: wait_ms / 1000,
            tv_nsec: (wait_ms % 1000) * 1_000_000,
        };
        let mut fds = vec![PollFd::new(&pipe, PollFlags::IN)];
        if let (Some(p), None) = (&pidfd, exited_at) {
            fds.push(PollFd::new(p, PollFlags::IN));
        }
        let _ = poll(&mut fds, Some(&ts));
        let pipe_ready = !fds[0].revents().is_empty();
        let child_done = fds.get(1).is_some_and(|f| !f.revents().is_empty());
        drop(fds);
        if pipe_ready {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    last_output = Instant::now();
                    log_size += n as u64;
                    if s.max_log_size > 0 && log_size > s.max_log_size {
                        let mut f = Failure::new(
                            BuildStatus::LogLimitExceeded,
                            format!("building '{drv_abs}' killed after writing more than {} bytes of log output", s.max_log_size),
                        );
                        f.detail = Some(crate::result::FailureDetail::LogLimit {
                            bytes: s.max_log_size,
                        });
                        stop = Some(f);
                        kiln_sandbox::spawn::kill_group(pid, SIGKILL);
                        break;
                    }
                    if let Some(l) = log.as_mut() {
                        let _ = l.write(&buf[..n]);
                    }
                    tail.feed(&buf[..n]);
                    (spec.events)(JobEvent::Log(Arc::from(&buf[..n])));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if child_done && exited_at.is_none() {
            // Kill whatever the builder left running in its process group (it is still a
            // zombie, so its pid cannot have been reused).
            kiln_sandbox::spawn::kill_group(pid, SIGKILL);
            exited_at = Some(Instant::now());
        }
        if ctl.is_cancelled() {
            kiln_sandbox::spawn::kill_group(pid, SIGKILL);
            stop = Some(Failure::misc(format!("build of '{drv_abs}' was cancelled")));
            break;
        }
        if exited_at.is_none()
            && s.max_silent_time > 0
            && last_output.elapsed() >= Duration::from_secs(s.max_silent_time)
        {
            let mut f = Failure::new(
                BuildStatus::TimedOut,
                format!(
                    "building '{drv_abs}' timed out after {} seconds of silence",
                    s.max_silent_time
                ),
            );
            f.detail = Some(crate::result::FailureDetail::TimedOut {
                seconds: s.max_silent_time,
            });
            stop = Some(f);
            kiln_sandbox::spawn::kill_group(pid, SIGKILL);
            break;
        }
        if exited_at.is_none() && s.timeout > 0 && start.elapsed() >= Duration::from_secs(s.timeout)
        {
            let mut f = Failure::new(
                BuildStatus::TimedOut,
                format!("building '{drv_abs}' timed out after {} seconds", s.timeout),
            );
            f.detail = Some(crate::result::FailureDetail::TimedOut { seconds: s.timeout });
            stop = Some(f);
            kiln_sandbox::spawn::kill_group(pid, SIGKILL);
            break;
        }
    }
    kiln_sandbox::spawn::kill_group(pid, SIGKILL);
    let (status, used) = kiln_sandbox::spawn::wait_usage(pid).unwrap_or((-1, Default::default()));
    if let Some(l) = log {
        let _ = l.finish();
    }
    let usage = Usage {
        cpu_user: used.user,
        cpu_system: used.system,
        memory_peak: (used.max_rss > 0).then_some(used.max_rss),
    };
    let outcome = match stop {
        Some(f) => Monitor::Stopped(f),
        None => Monitor::Exited(status, tail),
    };
    (outcome, usage)
}
