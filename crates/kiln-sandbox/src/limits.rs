//! The daemon's limit on open files, raised for itself and put back for what it starts.
//!
//! A daemon serving many clients needs many descriptors (three a connection, more for each
//! running build), so it raises its soft `RLIMIT_NOFILE` to the hard limit: systemd's
//! default soft limit of 1,024 would otherwise cap a busy daemon far below what the system
//! allows. Builders and hooks must not inherit the raised limit: a builder's output can
//! record `ulimit -n` (then it differs from Nix's, which restores the limit too), and a
//! program that still uses `select(2)` breaks on descriptors above 1,023, which a raised
//! limit lets it open. So the limit found at start is kept here, and every child that
//! [`crate::spawn`] starts, or that a [`Command`] passed to [`restore_for`] starts, gets it
//! back before its `exec`.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// The soft limit found before [`raise_descriptor_limit`] raised it; `u64::MAX` while it
/// has not (children then keep whatever this process has).
static ORIGINAL_SOFT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Raises this process's soft limit on open files to its hard limit, remembering the old
/// one for children. Returns the limit now in force.
pub fn raise_descriptor_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        let raised = Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                // `None` is "unlimited", which a soft limit below the hard one never is.
                if let Some(old) = l.current {
                    ORIGINAL_SOFT.store(old, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!("raising the limit on open files: {e}"),
        }
    }
    getrlimit(Resource::Nofile).current
}

/// The limit a child gets back, if this process raised its own: read before a fork, so
/// the child needs nothing but the `setrlimit` call.
pub(crate) fn for_children() -> Option<libc::rlimit> {
    let soft = ORIGINAL_SOFT.load(Ordering::Relaxed);
    if soft == u64::MAX {
        return None;
    }
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) } != 0 {
        return None;
    }
    Some(libc::rlimit {
        rlim_cur: soft.min(now.rlim_max),
        rlim_max: now.rlim_max,
    })
}

/// Makes `cmd` start its program with the limit on open files this process had before it
/// raised its own (hooks, helpers): nothing changes when it never raised it.
pub fn restore_for(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    if let Some(limit) = for_children() {
        // SAFETY: the closure runs in the child between fork and exec, and makes one
        // async-signal-safe system call on a value copied into it before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}
