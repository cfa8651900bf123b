//! Network namespaces made ahead of time, so that creating one is not on a build's path.
//!
//! A new network namespace is the dearest part of a sandbox to create: `unshare` takes
//! about 0.9 ms for it on the machines kiln is measured on, against about 0.1 ms for the
//! mount, PID, IPC, UTS and user namespaces together. A builder that gets
//! only loopback needs nothing from its namespace but that it is new and has `lo` up, so a
//! thread of its own makes a few of them while builds run, each with `lo` already up, and
//! [`spawn`](crate::spawn) clones the builder inside one instead of with `CLONE_NEWNET`.
//!
//! Each namespace is handed out once and its last descriptor is closed once the builder
//! is running, so the builder is the only process ever in it: a namespace reused by a
//! second build would let the first leave a listening socket or an abstract Unix socket
//! there for the second to talk to, a channel between builds the sandbox exists to rule
//! out. The namespaces belong to the daemon's user namespace, not to the builder's: the
//! builder (never root inside, with every capability dropped) cannot change its
//! interfaces either way.
//!
//! Only a daemon that may create network namespaces without a user namespace of its own
//! (root) uses the pool; where the first attempt fails, builds go on creating their own.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};

static LENT: AtomicU64 = AtomicU64::new(0);

/// How many builders this process has started in a namespace from the pool.
pub fn lent() -> u64 {
    LENT.load(Ordering::Relaxed)
}

/// Namespaces kept ready: enough for the builds started between two refills.
const KEEP: usize = 4;

struct Pool {
    /// The namespace the daemon's threads are in, for [`Lent`] to return to.
    host: OwnedFd,
    state: Mutex<State>,
    taken: Condvar,
}

#[derive(Default)]
struct State {
    ready: Vec<OwnedFd>,
    /// The refill thread stopped (making a namespace failed): builds make their own.
    stopped: bool,
}

/// The pool, made and its refill thread started on first use (`None`: not root, or no
/// descriptor for the host's namespace).
fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    *POOL.get_or_init(|| {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        let host = open_own()
            .map_err(|e| tracing::debug!("no network namespace pool: {e}"))
            .ok()?;
        // One per process, for its whole life.
        let p: &'static Pool = Box::leak(Box::new(Pool {
            host,
            state: Mutex::new(State::default()),
            taken: Condvar::new(),
        }));
        let spawned = std::thread::Builder::new()
            .name("kiln-netns".into())
            .spawn(move || refill(p));
        if let Err(e) = spawned {
            tracing::debug!("no network namespace pool: {e}");
            p.lock().stopped = true;
        }
        Some(p)
    })
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn refill(p: &Pool) {
    loop {
        {
            let mut s = p.lock();
            while s.ready.len() >= KEEP {
                s = p.taken.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
        }
        match make(p) {
            Ok(ns) => p.lock().ready.push(ns),
            Err(e) => {
                tracing::debug!("network namespaces are made per build: {e}");
                p.lock().stopped = true;
                return;
            }
        }
    }
}

/// This thread's network namespace, as a descriptor.
fn open_own() -> std::io::Result<OwnedFd> {
    let fd = rustix::fs::open(
        "/proc/thread-self/ns/net",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    Ok(fd)
}

/// A new network namespace with `lo` up, made on the calling (refill) thread, which then
/// goes back to the host's namespace so that it holds none of the namespaces it made.
fn make(p: &Pool) -> std::io::Result<OwnedFd> {
    // SAFETY: unshare only changes this thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let made = open_own().and_then(|ns| {
        loopback_up()?;
        Ok(ns)
    });
    if let Err(e) = enter(p.host.as_raw_fd()) {
        // A daemon thread left in a build's network would be worse than no daemon.
        tracing::error!("cannot return to the host's network namespace: {e}");
        std::process::abort();
    }
    made
}

/// `ip link set lo up` in this thread's namespace.
fn loopback_up() -> std::io::Result<()> {
    let s = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?;
    let mut req = crate::namespace::IfReq::loopback_up();
    // SAFETY: SIOCSIFFLAGS reads a `struct ifreq`, which `IfReq` lays out.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req as *mut _) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn enter(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: setns on a namespace descriptor we own; it changes this thread only.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A fresh namespace the calling thread is in until this is dropped: a child cloned
/// meanwhile (without `CLONE_NEWNET`) starts in it.
pub(crate) struct Lent {
    host: RawFd,
}

impl Lent {
    /// Moves this thread into a namespace from the pool, if one is ready (and starts the
    /// pool on first use). `None`: the caller creates one with `CLONE_NEWNET`.
    pub(crate) fn take() -> Option<Lent> {
        let p = pool()?;
        let ns = {
            let mut s = p.lock();
            if s.stopped {
                return None;
            }
            let ns = s.ready.pop();
            p.taken.notify_one();
            ns?
        };
        enter(ns.as_raw_fd()).ok()?;
        LENT.fetch_add(1, Ordering::Relaxed);
        // `ns` is closed here: the thread (and then the child) hold the only references.
        Some(Lent {
            host: p.host.as_raw_fd(),
        })
    }
}

/// Dropping returns the thread to the host's namespace: one raw system call, which touches
/// `errno` only when it fails (and then the process aborts), so it may run while a
/// `CLONE_VM` child shares them.
impl Drop for Lent {
    fn drop(&mut self) {
        // SAFETY: setns on the pool's descriptor of the host namespace, which lives as
        // long as the process; it changes this thread only.
        if unsafe { libc::setns(self.host, libc::CLONE_NEWNET) } != 0 {
            // This thread would serve clients from inside a build's network.
            std::process::abort();
        }
    }
}
