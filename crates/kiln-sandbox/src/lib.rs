//! Linux isolation for kiln builds.
//!
//! [`spawn`] starts a builder process from a [`ChildSpec`] (plain data prepared in full
//! before the fork): its own session and process group, the log pipe on stdout and stderr,
//! `/dev/null` on stdin, every other descriptor closed at exec, the requested personality,
//! `oom_score_adj`, user and groups, default signal dispositions. The child reports a
//! failed set-up step (and its errno) through a close-on-exec pipe, so the parent learns of
//! it before any build output.
//!
//! This is the only crate of kiln with `unsafe` code; each block says why it is sound.
//! After `fork`, the child calls only async-signal-safe functions (raw system calls on data
//! prepared before the fork): no allocation, no locks, no formatting.

pub mod attach;
pub mod cgroup;
pub mod confine;
pub mod limits;
pub mod namespace;
pub mod netns;
pub mod seccomp;
pub mod spawn;
pub mod usernet;

pub use attach::Namespaces;
pub use cgroup::Cgroup;
pub use limits::raise_descriptor_limit;
pub use namespace::{Entry, IdMap, Sandbox};
pub use spawn::{spawn, ChildSpec, Spawned, UserSpec};
pub use usernet::{Network, UserNet};

/// Errors of the sandbox crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot {action}: {source}")]
    Sys {
        action: String,
        #[source]
        source: std::io::Error,
    },
    /// The child failed while setting up the build environment, before exec.
    #[error("while setting up the build environment: {step}: {source}")]
    Setup {
        step: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn sys(action: &str, e: std::io::Error) -> Error {
    Error::Sys {
        action: action.to_string(),
        source: e,
    }
}

/// Whether builders can be sandboxed on this machine, found once per process by setting up
/// an empty sandbox for real (every namespace, the id maps, the mounts, `pivot_root`, the
/// system-call filter) and stopping at the exec, which fails on purpose.
pub fn supported() -> std::result::Result<(), String> {
    static RESULT: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    RESULT.get_or_init(probe).clone()
}

fn probe() -> std::result::Result<(), String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let root = std::env::temp_dir().join(format!("kiln-sandbox-probe-{}-{n}", std::process::id()));
    std::fs::create_dir(&root).map_err(|e| format!("creating '{}': {e}", root.display()))?;
    let result = probe_in(&root);
    let _ = std::fs::remove_dir(&root);
    result
}

fn probe_in(root: &std::path::Path) -> std::result::Result<(), String> {
    use std::ffi::CString;
    let (_r, w) = spawn::pipe_cloexec().map_err(|e| e.to_string())?;
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let cs = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let spec = ChildSpec {
        sandbox: Some(Sandbox {
            root: root.to_path_buf(),
            network: Network::Loopback,
            ids: IdMap::nix(uid, gid),
            unprivileged: uid != 0,
            entries: vec![Entry::Proc {
                path: "/proc".into(),
            }],
            seccomp: true,
        }),
        ..ChildSpec::new(cs("/nonexistent-kiln-probe")?, vec![cs("probe")?], w)
    };
    match spawn(spec) {
        Err(Error::Setup { step, source })
            if step == "executing the builder" && source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(e) => Err(e.to_string()),
        Ok(s) => {
            let _ = spawn::wait(s.pid);
            Err("the probe unexpectedly started".into())
        }
    }
}

/// The Landlock ABI version the kernel offers (`None` without Landlock). Version 6 (Linux
/// 6.12) adds the scopes the sandbox uses to keep builders off the host's abstract sockets.
pub fn landlock_abi() -> Option<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with this flag and a null attribute the call only reports the ABI version.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).ok().filter(|v| *v > 0)
}
