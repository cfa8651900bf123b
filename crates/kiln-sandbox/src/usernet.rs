//! User-mode networking for fixed-output builds.
//!
//! A fixed-output build may fetch from the network, so the reference runs it in the host's
//! network namespace. That namespace also holds the host's *abstract* Unix sockets, which
//! is how CVE-2024-27297 and CVE-2025-46416 smuggled descriptors of a build's output (or of
//! a setuid-to-build-user file) to a process outside. Landlock's scopes (Linux 6.12) stop a
//! builder from connecting *out* to such a socket, but not a host process from connecting
//! *in* to one the builder listens on.
//!
//! So, as Guix (slirp4netns) and Lix (pasta) now do, a fixed-output build gets its own
//! network namespace with a TAP device, and `slirp4netns` — a user-mode TCP/IP stack living
//! in the host's namespace — forwards its TCP and UDP to the world. Only IP crosses the
//! boundary: no abstract socket of either side can be reached from the other. slirp4netns
//! runs in its own mount namespace with all capabilities dropped (`--enable-sandbox`; for an
//! unprivileged daemon, which cannot give it the uid 0 that needs, in a Landlock domain of
//! the daemon's making instead: [`crate::confine`]) and under its own system-call filter
//! (`--enable-seccomp`); with `isolate_host_loopback` the
//! build cannot reach the host's `127.0.0.1` services through the gateway address either.
//!
//! Readiness is reported on a pipe (`--ready-fd`), so the builder starts exactly when its
//! interface is up, with no sleeping; the helper exits when the daemon closes its end of
//! `--exit-fd`, including when the daemon dies.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};

use crate::{sys, Error, Result};

/// The address of the DNS forwarder slirp4netns offers inside (its default network,
/// `10.0.2.0/24`); the build's `/etc/resolv.conf` names it.
pub const DNS_ADDRESS: &str = "10.0.2.3";

/// How a build reaches the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// Its own network namespace with only loopback (every build but fixed-output ones).
    Loopback,
    /// The host's network namespace (fixed-output builds where nothing better works, and
    /// kiln's own `builtin:` fetchers, which run no derivation-supplied code).
    Host,
    /// Its own namespace, connected through a user-mode network helper.
    User(UserNet),
}

impl Network {
    /// Whether the builder gets a network namespace of its own.
    pub fn private(&self) -> bool {
        !matches!(self, Network::Host)
    }
}

/// A user-mode network helper: which program, and how much of the host it may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNet {
    /// The `slirp4netns` executable.
    pub program: PathBuf,
    /// Refuse connections to the host's loopback addresses through the gateway (`10.0.2.2`).
    pub isolate_host_loopback: bool,
}

impl UserNet {
    /// `slirp4netns` from `PATH`, if it is there and this process may open `/dev/net/tun`
    /// (which the helper needs to create the build's interface), and, for an unprivileged
    /// daemon, if the kernel has Landlock to confine the helper with ([`crate::confine`]).
    pub fn find(isolate_host_loopback: bool) -> Option<UserNet> {
        let program = find_in_path("slirp4netns")?;
        rustix::fs::access(
            "/dev/net/tun",
            rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
        )
        .ok()?;
        if !rustix::process::geteuid().is_root() && !confined_runs(&program) {
            return None;
        }
        Some(UserNet {
            program,
            isolate_host_loopback,
        })
    }
}

/// Whether `program --version` runs in the confinement an unprivileged daemon's helper
/// gets (Landlock present, the program and its libraries readable there); probed once.
fn confined_runs(program: &Path) -> bool {
    static PROBED: std::sync::Mutex<Vec<(PathBuf, bool)>> = std::sync::Mutex::new(Vec::new());
    let mut probed = PROBED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, ok)) = probed.iter().find(|(p, _)| p == program) {
        return *ok;
    }
    let ok = (|| {
        let landlock = crate::confine::Ruleset::for_helper(program).ok()??;
        let mut cmd = Command::new(program);
        cmd.arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        crate::confine::Confinement::for_helper(Some(landlock)).apply(&mut cmd);
        Some(cmd.status().ok()?.success())
    })()
    .unwrap_or(false);
    if !ok {
        tracing::warn!(
            "{} does not run in the confinement a rootless daemon gives it (Landlock); \
             fixed-output builds will not use it",
            program.display()
        );
    }
    probed.push((program.to_path_buf(), ok));
    ok
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_ok() && p.is_file()
}

/// How long the helper may take to bring the interface up (it takes a few milliseconds).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How much of the helper's output is quoted when it fails.
const QUOTED_OUTPUT: u64 = 2048;

/// A running helper; dropping it stops it.
#[derive(Debug)]
pub struct UserNetProcess {
    /// Always `Some` until dropped.
    child: Option<Child>,
    /// The write end of `--exit-fd`: the helper exits when it closes, which also happens
    /// when the daemon dies.
    _exit: OwnedFd,
}

impl Drop for UserNetProcess {
    fn drop(&mut self) {
        // The build is over (its namespace may already be gone): nothing of the helper's
        // state is worth a grace period. Its exit takes tens of milliseconds (the kernel
        // unregisters the TAP device), which the build need not wait for: it is reaped on
        // a thread of its own.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = std::thread::Builder::new()
                .name("kiln-usernet-reaper".into())
                .spawn(move || child.wait());
        }
    }
}

/// Starts `net`'s helper for the network namespace of process `pid` (whose user namespace
/// it joins when the daemon is unprivileged) and returns once the build's interface is up.
pub fn start(net: &UserNet, pid: i32, unprivileged: bool) -> Result<UserNetProcess> {
    let what = || format!("start {} for the build's network", net.program.display());
    let (ready_r, ready_w) = crate::spawn::pipe_cloexec()?;
    let (exit_r, exit_w) = crate::spawn::pipe_cloexec()?;
    // The helper's chatter goes to an anonymous file, quoted only if it fails: a pipe left
    // unread would eventually block it, and a build log is no place for it.
    let output = rustix::fs::memfd_create("kiln-usernet", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| sys(&what(), e.into()))?;
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| sys(&what(), e));
    let mut cmd = Command::new(&net.program);
    cmd.arg("--configure")
        .arg("--mtu=65520")
        .arg("--ready-fd=3")
        .arg("--exit-fd=4")
        .arg("--enable-seccomp");
    if net.isolate_host_loopback {
        cmd.arg("--disable-host-loopback");
    }
    let mut fds = vec![
        FdMapping {
            parent_fd: ready_w,
            child_fd: 3,
        },
        FdMapping {
            parent_fd: exit_r,
            child_fd: 4,
        },
    ];
    let landlock = if unprivileged {
        // The namespace belongs to the build's user namespace, in which an unprivileged
        // helper needs its capabilities to create the interface. Both are handed over as
        // descriptors the daemon opened: inside its Landlock domain (below) the helper may
        // not open another process's `/proc/PID/ns`.
        let ns = |kind: &str| {
            let p = format!("/proc/{pid}/ns/{kind}");
            rustix::fs::open(
                p.as_str(),
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| sys(&format!("open '{p}'"), e.into()))
        };
        fds.push(FdMapping {
            parent_fd: ns("user")?,
            child_fd: 5,
        });
        fds.push(FdMapping {
            parent_fd: ns("net")?,
            child_fd: 6,
        });
        cmd.arg("--userns-path=/proc/self/fd/5")
            .arg("--netns-type=path")
            .arg("/proc/self/fd/6");
        // Its own sandbox needs uid 0 mapped in that namespace, which an unprivileged
        // daemon cannot map: it runs in a Landlock domain of the daemon's making instead.
        Some(
            crate::confine::Ruleset::for_helper(&net.program)?.ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: the kernel has no Landlock to confine it with",
                    what()
                ))
            })?,
        )
    } else {
        cmd.arg("--enable-sandbox").arg(pid.to_string());
        None
    };
    crate::confine::Confinement::for_helper(landlock).apply(&mut cmd);
    cmd.arg("tap0")
        .stdin(Stdio::null())
        .stdout(Stdio::from(dup(&output)?))
        .stderr(Stdio::from(dup(&output)?))
        .fd_mappings(fds)
        .map_err(|e| Error::Invalid(format!("{}: {e}", what())))?;
    let child = cmd.spawn().map_err(|e| sys(&what(), e))?;
    // Our copies of the helper's ends go with the command, so that the ready pipe reports
    // end-of-file if the helper dies before it is ready.
    drop(cmd);
    let mut child = child;
    match wait_ready(&ready_r) {
        Ok(()) => Ok(UserNetProcess {
            child: Some(child),
            _exit: exit_w,
        }),
        Err(why) => {
            let _ = child.kill();
            let status = child.wait().ok();
            let said = quote_output(&output);
            Err(Error::Invalid(format!(
                "{}: {why}{}{}",
                what(),
                status.map(|s| format!(" ({s})")).unwrap_or_default(),
                if said.is_empty() {
                    String::new()
                } else {
                    format!("; it said: {said}")
                }
            )))
        }
    }
}

/// Waits for the helper's readiness byte.
fn wait_ready(ready: &OwnedFd) -> std::result::Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("not ready after {} s", READY_TIMEOUT.as_secs()));
        }
        let timeout = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        let mut fds = [rustix::event::PollFd::new(
            ready,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
        let mut b = [0u8; 1];
        return match rustix::io::read(ready, &mut b) {
            Ok(1) => Ok(()),
            Ok(_) => Err("it exited before the network was up".into()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => Err(format!("reading its readiness: {e}")),
        };
    }
}

/// The last lines the helper wrote, on one line.
fn quote_output(output: &OwnedFd) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(fd) = output.try_clone() else {
        return String::new();
    };
    let mut f = std::fs::File::from(fd);
    let len = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let start = len.saturating_sub(QUOTED_OUTPUT);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err()
        || f.take(QUOTED_OUTPUT).read_to_end(&mut buf).is_err()
    {
        return String::new();
    }
    String::from_utf8_lossy(&buf)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("WARNING: Support for seccomp"))
        .collect::<Vec<_>>()
        .join(" / ")
}
