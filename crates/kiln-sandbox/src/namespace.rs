//! What a sandboxed builder sees, as plain data, and its translation into the system calls
//! the child makes between `clone` and `exec`.
//!
//! The builder gets new user, mount, PID, IPC and UTS namespaces, and a new network namespace
//! unless the build is fixed-output. Its root is a fresh `tmpfs` mounted (in its own mount
//! namespace only) on an empty directory of the daemon's; [`Entry`] values fill it: the
//! closure of the inputs bind-mounted read-only, the build directory and the output store
//! directory bind-mounted writable, a minimal `/dev`, a new `/proc`, generated `/etc` files.
//! Then `pivot_root` moves the builder into it and the old root is detached, so no path
//! leads back to the host. The root itself is remounted read-only: the builder can write
//! only to its build directory, the outputs, `/tmp` and `/dev/shm`.
//!
//! Ids: the builder always runs in a new user namespace, as uid 1000 and gid 100 inside (as
//! Nix's sandbox does), mapped to one host uid and gid: a build user of the pool when the
//! daemon runs as root, the daemon's own ids when it does not (rootless). The daemon writes
//! the maps from outside while the child waits; the child then drops every supplementary
//! group (it could otherwise keep the daemon's, e.g. root's group 0) unless the kernel
//! already forbids `setgroups` in the namespace (the rootless case).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The ids the builder has inside its user namespace and the host ids they stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub inside_uid: u32,
    pub inside_gid: u32,
    pub outside_uid: u32,
    pub outside_gid: u32,
}

impl IdMap {
    /// Nix's sandbox ids (1000, 100) for the given host ids.
    pub fn nix(outside_uid: u32, outside_gid: u32) -> Self {
        IdMap {
            inside_uid: 1000,
            inside_gid: 100,
            outside_uid,
            outside_gid,
        }
    }
}

/// One thing placed in the sandbox, at `path` inside it (absolute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory (parents must come first).
    Dir {
        path: String,
        mode: u32,
    },
    /// A host file or directory made visible. Read-only unless `writable`; read-only mounts
    /// keep the source mount's `nosuid`/`nodev`/`noexec` (a user namespace may not drop them).
    Bind {
        source: PathBuf,
        path: String,
        writable: bool,
        /// Skip silently if the source does not exist.
        optional: bool,
    },
    /// A fresh `tmpfs` with these mount options (e.g. `mode=1777`).
    Tmpfs {
        path: String,
        options: String,
    },
    /// A new `proc` of the builder's PID namespace.
    Proc {
        path: String,
    },
    /// A new `devpts` instance (its own `ptmx`).
    Devpts {
        path: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    /// A generated file (`/etc/passwd`, …).
    File {
        path: String,
        contents: Vec<u8>,
        mode: u32,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::Bind { path, .. }
            | Entry::Tmpfs { path, .. }
            | Entry::Proc { path }
            | Entry::Devpts { path }
            | Entry::Symlink { path, .. }
            | Entry::File { path, .. } => path,
        }
    }

    fn describe(&self) -> String {
        match self {
            Entry::Dir { path, .. } => format!("creating directory '{path}'"),
            Entry::Bind { source, path, .. } => {
                format!("bind-mounting '{}' on '{path}'", source.display())
            }
            Entry::Tmpfs { path, .. } => format!("mounting a tmpfs on '{path}'"),
            Entry::Proc { path } => format!("mounting proc on '{path}'"),
            Entry::Devpts { path } => format!("mounting devpts on '{path}'"),
            Entry::Symlink { path, .. } => format!("creating symlink '{path}'"),
            Entry::File { path, .. } => format!("writing '{path}'"),
        }
    }
}

/// The sandbox of one build.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// An empty host directory, reachable only by the daemon's user, on which the builder's
    /// root `tmpfs` is mounted inside its mount namespace (the host sees it stay empty).
    pub root: PathBuf,
    /// How the builder reaches the network.
    pub network: crate::usernet::Network,
    pub ids: IdMap,
    /// The daemon is unprivileged: the kernel requires `setgroups` to be denied before a
    /// group map can be written, and supplementary groups cannot be dropped.
    pub unprivileged: bool,
    pub entries: Vec<Entry>,
    /// Load the system-call filter ([`crate::seccomp`]).
    pub seccomp: bool,
}

// Mount flags (values shared by `MS_*` and `ST_*`).
pub(crate) const MS_RDONLY: u64 = 1;
pub(crate) const MS_NOSUID: u64 = 2;
pub(crate) const MS_NODEV: u64 = 4;
pub(crate) const MS_NOEXEC: u64 = 8;
pub(crate) const MS_REMOUNT: u64 = 32;
pub(crate) const MS_NOATIME: u64 = 1024;
pub(crate) const MS_NODIRATIME: u64 = 2048;
pub(crate) const MS_BIND: u64 = 4096;
pub(crate) const MS_REC: u64 = 16384;
pub(crate) const MS_PRIVATE: u64 = 1 << 18;
pub(crate) const MS_RELATIME: u64 = 1 << 21;
/// Flags of a source mount a read-only remount in a user namespace must keep.
pub(crate) const LOCKED_FLAGS: u64 =
    MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME;

/// An entry turned into host paths and C strings before the fork.
#[derive(Debug)]
pub(crate) enum Op {
    Dir {
        path: CString,
        mode: u32,
    },
    Bind {
        source: CString,
        target: CString,
        writable: bool,
        optional: bool,
    },
    Mount {
        fstype: CString,
        target: CString,
        flags: u64,
        data: CString,
    },
    Symlink {
        target: CString,
        path: CString,
    },
    File {
        path: CString,
        contents: Vec<u8>,
        mode: u32,
    },
}

/// A `struct ifreq` for `SIOCSIFFLAGS` on `lo`.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct IfReq {
    pub name: [u8; 16],
    pub flags: i16,
    pub pad: [u8; 22],
}

impl IfReq {
    /// `lo` with IFF_UP | IFF_LOOPBACK | IFF_RUNNING.
    pub(crate) fn loopback_up() -> IfReq {
        let mut name = [0u8; 16];
        name[..2].copy_from_slice(b"lo");
        IfReq {
            name,
            flags: 0x1 | 0x8 | 0x40,
            pad: [0; 22],
        }
    }
}

/// `struct landlock_ruleset_attr` (ABI 6): no file-system or network rights handled, only
/// the scopes.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct LandlockAttr {
    pub handled_access_fs: u64,
    pub handled_access_net: u64,
    pub scoped: u64,
}

/// Landlock's `LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL`.
pub(crate) const LANDLOCK_SCOPES: u64 = 0b11;

/// Everything the child needs for the sandbox, prepared before the fork.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub root: CString,
    pub ops: Vec<Op>,
    pub descriptions: Vec<String>,
    pub private_network: bool,
    /// Loopback only, for a privileged daemon: the network namespace may come from
    /// [`crate::netns`].
    pub pooled_network: bool,
    pub ids: IdMap,
    pub unprivileged: bool,
    pub filter: Option<Vec<crate::seccomp::Insn>>,
    pub lo: IfReq,
    pub tmpfs: CString,
    pub root_options: CString,
    pub dot: CString,
    pub slash: CString,
    pub uid_map: Vec<u8>,
    pub gid_map: Vec<u8>,
    pub landlock: LandlockAttr,
}

/// The map written for the builder. A privileged daemon also maps root to root: the child
/// sets the sandbox up as (namespace) root, which the kernel requires to be a mapped id to
/// create files in the new mounts and which needs root's access to the daemon's 0700
/// directories; it then switches to the builder's ids, dropping every capability for good
/// (and `no_new_privs` keeps setuid-root programs from giving them back).
fn id_map(inside: u32, outside: u32, unprivileged: bool) -> Vec<u8> {
    if unprivileged || outside == 0 || inside == 0 {
        format!("{inside} {outside} 1\n").into_bytes()
    } else {
        format!("0 0 1\n{inside} {outside} 1\n").into_bytes()
    }
}

fn cstr(s: &[u8]) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Invalid("a sandbox path contains a NUL byte".into()))
}

fn inside(root: &Path, path: &str) -> Result<CString> {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(Error::Invalid(format!(
            "sandbox path '{path}' is not absolute and normal"
        )));
    }
    let mut v = root.as_os_str().as_bytes().to_vec();
    v.extend_from_slice(path.trim_end_matches('/').as_bytes());
    cstr(&v)
}

impl Sandbox {
    pub(crate) fn prepare(&self) -> Result<Prepared> {
        let root = &self.root;
        let mut ops = Vec::with_capacity(self.entries.len());
        let mut descriptions = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            descriptions.push(e.describe());
            ops.push(match e {
                Entry::Dir { path, mode } => Op::Dir {
                    path: inside(root, path)?,
                    mode: *mode,
                },
                Entry::Bind {
                    source,
                    path,
                    writable,
                    optional,
                } => Op::Bind {
                    source: cstr(source.as_os_str().as_bytes())?,
                    target: inside(root, path)?,
                    writable: *writable,
                    optional: *optional,
                },
                Entry::Tmpfs { path, options } => Op::Mount {
                    fstype: cstr(b"tmpfs")?,
                    target: inside(root, path)?,
                    flags: MS_NOSUID | MS_NODEV,
                    data: cstr(options.as_bytes())?,
                },
                Entry::Proc { path } => Op::Mount {
                    fstype: cstr(b"proc")?,
                    target: inside(root, path)?,
                    flags: MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    data: cstr(b"")?,
                },
                Entry::Devpts { path } => Op::Mount {
                    fstype: cstr(b"devpts")?,
                    target: inside(root, path)?,
                    flags: MS_NOSUID | MS_NOEXEC,
                    data: cstr(b"newinstance,ptmxmode=0666,mode=0620")?,
                },
                Entry::Symlink { target, path } => Op::Symlink {
                    target: cstr(target.as_bytes())?,
                    path: inside(root, path)?,
                },
                Entry::File {
                    path,
                    contents,
                    mode,
                } => Op::File {
                    path: inside(root, path)?,
                    contents: contents.clone(),
                    mode: *mode,
                },
            });
        }
        let ids = self.ids;
        Ok(Prepared {
            root: cstr(root.as_os_str().as_bytes())?,
            ops,
            descriptions,
            private_network: self.network.private(),
            ids,
            unprivileged: self.unprivileged,
            filter: (self.seccomp && crate::seccomp::available()).then(crate::seccomp::filter),
            lo: IfReq::loopback_up(),
            pooled_network: self.network == crate::usernet::Network::Loopback && !self.unprivileged,
            tmpfs: cstr(b"tmpfs")?,
            root_options: cstr(b"mode=0755")?,
            dot: cstr(b".")?,
            slash: cstr(b"/")?,
            uid_map: id_map(ids.inside_uid, ids.outside_uid, self.unprivileged),
            gid_map: id_map(ids.inside_gid, ids.outside_gid, self.unprivileged),
            landlock: LandlockAttr {
                handled_access_fs: 0,
                handled_access_net: 0,
                scoped: LANDLOCK_SCOPES,
            },
        })
    }
}
