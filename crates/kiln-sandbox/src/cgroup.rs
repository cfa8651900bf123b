//! One cgroup v2 per build, where the machine has a writable cgroup v2 hierarchy.
//!
//! The builder joins its cgroup before it runs anything (the child writes to
//! `cgroup.procs` through a descriptor the daemon opened, before `exec`), so every process
//! it ever starts is in it: a double fork, `setsid`, or a daemonised helper cannot leave
//! the build alive, which a process group cannot promise (and, without the sandbox's PID
//! namespace, nothing else does). At the end `cgroup.kill` kills them all at once, and the
//! cgroup's own accounting gives the build's CPU time (`cpu.stat`, always kept) and its
//! peak memory (`memory.peak`, when the memory controller is enabled for it).
//!
//! Build cgroups are made under the daemon's own cgroup (as Nix's `use-cgroups` does), so a
//! service manager that delegated that subtree keeps them in its accounting too.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{sys, Result};

/// A build's cgroup; killed and removed when dropped.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    /// Emptied already ([`Cgroup::finish`]): dropping only removes it.
    emptied: bool,
}

/// What a build's processes used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_user: Duration,
    pub cpu_system: Duration,
    /// Peak memory of the whole build (all its processes together), in bytes.
    pub memory_peak: Option<u64>,
}

/// Where this process's cgroup v2 directory is: the `cgroup2` mount from
/// `/proc/self/mountinfo` joined with the `0::` line of `/proc/self/cgroup` (found once).
pub fn own_cgroup_dir() -> Option<PathBuf> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(find_own_cgroup_dir).clone()
}

fn find_own_cgroup_dir() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let own = own.trim().trim_start_matches('/');
    // A cgroup outside this mount namespace's view (" (deleted)", "..") is not usable.
    if own.contains("..") || own.contains(' ') {
        return None;
    }
    Some(mount.join(own))
}

impl Cgroup {
    /// Makes `<own cgroup>/<name>`; `None` where there is no cgroup v2 hierarchy or it is
    /// not writable here (the build then runs without one, as before).
    pub fn create(name: &str) -> Result<Option<Cgroup>> {
        if name.contains('/') || name.starts_with('.') {
            return Err(crate::Error::Invalid(format!("bad cgroup name '{name}'")));
        }
        let Some(parent) = own_cgroup_dir() else {
            return Ok(None);
        };
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| sweep_stale(&parent));
        let path = parent.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => Ok(Some(Cgroup {
                path,
                emptied: false,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A leftover of an earlier kiln process with this pid: emptied and reused.
                let mut cg = Cgroup {
                    path,
                    emptied: false,
                };
                cg.empty();
                cg.emptied = false;
                Ok(Some(cg))
            }
            Err(e) => {
                // No permission, a read-only mount, the hierarchy's limits (EAGAIN from
                // `cgroup.max.descendants`): builds go on without a cgroup of their own.
                tracing::debug!("no cgroup for builds under '{}': {e}", parent.display());
                Ok(None)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A descriptor of `cgroup.procs` for the child to join with (it writes `0`). The
    /// kernel checks the permission against whoever opened it, so the child may do it
    /// from inside its user namespace.
    pub fn procs_fd(&self) -> Result<OwnedFd> {
        let p = self.path.join("cgroup.procs");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| sys(&format!("open '{}'", p.display()), e))?;
        Ok(f.into())
    }

    /// Kills every process in the cgroup: `cgroup.kill` (Linux 5.14), else each listed
    /// process, until none is left.
    pub fn kill(&self) {
        if std::fs::write(self.path.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: kill(2) on a pid read from the cgroup; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn populated(&self) -> bool {
        std::fs::read_to_string(self.path.join("cgroup.events"))
            .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
            .unwrap_or(false)
    }

    /// Waits until the killed processes are gone (they may take a moment to exit).
    fn wait_empty(&self, limit: Duration) -> bool {
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        while self.populated() {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        true
    }

    /// CPU time and peak memory so far.
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.path.join("cpu.stat")) {
            let _ = f.read_to_string(&mut text);
        }
        for l in text.lines() {
            let mut w = l.split_whitespace();
            let (Some(k), Some(v)) = (w.next(), w.next().and_then(|v| v.parse::<u64>().ok()))
            else {
                continue;
            };
            match k {
                "user_usec" => u.cpu_user = Duration::from_micros(v),
                "system_usec" => u.cpu_system = Duration::from_micros(v),
                _ => {}
            }
        }
        u.memory_peak = std::fs::read_to_string(self.path.join("memory.peak"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        u
    }

    /// Kills what is left, waits for it to exit and removes the cgroup; returns the usage
    /// up to then.
    pub fn finish(mut self) -> Usage {
        self.empty();
        self.usage()
        // Dropped here: removed.
    }

    /// Kills what is left and waits for it to exit (usually nothing is left: the
    /// builder's PID namespace or process group took everything with it).
    fn empty(&mut self) {
        if self.populated() {
            self.kill();
            if !self.wait_empty(Duration::from_secs(10)) {
                tracing::warn!(
                    "processes of build cgroup '{}' did not exit",
                    self.path.display()
                );
            }
        }
        self.emptied = true;
    }
}

/// Removes the build cgroups (`kiln-build-PID-N`) of kiln processes that are gone (killed
/// before they could remove them), killing anything still in them.
fn sweep_stale(parent: &Path) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("kiln-build-")
            .and_then(|r| r.split_once('-'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        tracing::info!(
            "removing the cgroup of an earlier build, '{}'",
            e.path().display()
        );
        drop(Cgroup {
            path: e.path(),
            emptied: false,
        });
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.emptied {
            self.empty();
        }
        if let Ok(c) = CString::new(self.path.as_os_str().as_encoded_bytes()) {
            // A cgroup directory is removed with rmdir even though it lists files.
            if let Err(e) = rustix::fs::rmdir(c.as_c_str()) {
                tracing::warn!("cannot remove cgroup '{}': {e}", self.path.display());
            }
        }
    }
}
