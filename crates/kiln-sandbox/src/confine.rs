//! Confinement for a helper program the daemon starts on a build's behalf: the user-mode
//! network helper `slirp4netns` ([`crate::usernet`]), which parses every packet a
//! fixed-output builder sends.
//!
//! Every such helper gets `no_new_privs` and a filter refusing `socket(AF_UNIX, …)`
//! ([`crate::seccomp::no_unix_sockets`]): it runs as root or as the daemon's user, so
//! through a Unix socket with a path (the daemon's own, the user's or systemd's bus) a
//! compromised helper would act with those credentials, and neither slirp4netns's own
//! sandbox (which keeps `/run`) nor Landlock covers `connect` on such sockets.
//!
//! As root, slirp4netns confines itself too (`--enable-sandbox`: a mount namespace of its
//! own, capabilities dropped). For an unprivileged caller that needs uid 0 mapped in the
//! build's user namespace, which an unprivileged daemon cannot map (it maps only its own
//! uid, to Nix's 1000); run without it, a compromised helper would hold the daemon's uid —
//! the store's owner. So a rootless daemon's helper is also put in a Landlock domain: it may
//! read the system's directories (`/usr`, `/lib*`, `/etc`, `/run`, `/proc`, a Nix or Guix
//! store its program may live in), execute what is there, and open `/dev/net/tun`, and
//! write nothing; it cannot signal or trace a process outside the domain, nor reach an
//! abstract Unix socket outside it (Linux 6.12+).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::{sys, Result};

const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;

const EXECUTE: u64 = 1 << 0;
const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
/// Every file-system right of ABI 1 (execute, write, read, readdir, remove and make *).
const ABI1_FS: u64 = (1 << 13) - 1;
const REFER: u64 = 1 << 13;
const TRUNCATE: u64 = 1 << 14;
const IOCTL_DEV: u64 = 1 << 15;
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// A ruleset, made by the daemon and entered by the helper's child process before `exec`
/// (through [`Confinement`]).
#[derive(Debug)]
pub struct Ruleset {
    fd: OwnedFd,
}

impl Ruleset {
    /// The helper's ruleset, or `None` where the kernel has no Landlock (then the helper
    /// must not run unconfined: the caller decides what to do instead).
    pub fn for_helper(program: &Path) -> Result<Option<Ruleset>> {
        let Some(abi) = crate::landlock_abi() else {
            return Ok(None);
        };
        let mut handled = ABI1_FS;
        if abi >= 2 {
            handled |= REFER;
        }
        if abi >= 3 {
            handled |= TRUNCATE;
        }
        if abi >= 5 {
            handled |= IOCTL_DEV;
        }
        let attr = RulesetAttr {
            handled_access_fs: handled,
            handled_access_net: 0,
            scoped: if abi >= 6 {
                SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
            } else {
                0
            },
        };
        // The kernel takes the structure as long as its ABI knows it (the scopes from 6,
        // the network rights from 4).
        let size = match abi {
            1..=3 => 8,
            4 | 5 => 16,
            _ => std::mem::size_of::<RulesetAttr>(),
        };
        // SAFETY: `attr` is a valid `landlock_ruleset_attr` prefix of `size` bytes.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size,
                0u32,
            )
        };
        if fd < 0 {
            return Err(sys(
                "create a Landlock ruleset",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: a descriptor the kernel just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let rs = Ruleset { fd };
        let read_exec = READ_FILE | READ_DIR | EXECUTE;
        // A program (and its libraries) may live in a Nix or Guix store, reached through
        // symlinks from its directory in PATH: Landlock judges the file a path resolves to.
        let mut dirs: Vec<std::path::PathBuf> = [
            "/usr",
            "/lib",
            "/lib64",
            "/lib32",
            "/bin",
            "/sbin",
            "/etc",
            "/run",
            "/nix/store",
            "/gnu/store",
        ]
        .iter()
        .map(std::path::PathBuf::from)
        .collect();
        dirs.extend(program.parent().map(Path::to_path_buf));
        if let Ok(real) = std::fs::canonicalize(program) {
            dirs.extend(real.parent().map(Path::to_path_buf));
        }
        for d in dirs {
            rs.allow(&d, read_exec & handled)?;
        }
        // Namespaces of the build (`/proc/PID/ns/*`) and the helper's own records.
        rs.allow(Path::new("/proc"), (READ_FILE | READ_DIR) & handled)?;
        rs.allow(
            Path::new("/dev/net/tun"),
            (READ_FILE | WRITE_FILE | IOCTL_DEV) & handled,
        )?;
        Ok(Some(rs))
    }

    /// Lets the domain do `access` beneath `path` (skipped if `path` does not exist).
    fn allow(&self, path: &Path, access: u64) -> Result<()> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| crate::Error::Invalid(format!("'{}' contains NUL", path.display())))?;
        let fd = match rustix::fs::open(
            c.as_c_str(),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(sys(&format!("open '{}'", path.display()), e.into())),
        };
        // Directory-only rights are refused on a file.
        let is_dir = rustix::fs::fstat(&fd)
            .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir())
            .unwrap_or(false);
        let access = if is_dir { access } else { access & !READ_DIR };
        let rule = PathBeneathAttr {
            allowed_access: access,
            parent_fd: fd.as_raw_fd(),
        };
        // SAFETY: a valid `landlock_path_beneath_attr` and two live descriptors.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd.as_raw_fd(),
                LANDLOCK_RULE_PATH_BENEATH,
                &rule as *const PathBeneathAttr,
                0u32,
            )
        };
        if r < 0 {
            return Err(sys(
                &format!("allow '{}' in a Landlock ruleset", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// What a helper enters before `exec`: `no_new_privs`, a Landlock domain (a rootless
/// daemon's helper), and the filter against Unix sockets (where this build has one).
#[derive(Debug)]
pub struct Confinement {
    landlock: Option<Ruleset>,
    filter: Option<Vec<crate::seccomp::Insn>>,
}

impl Confinement {
    /// The helper's confinement, with the Landlock domain `landlock` if given.
    pub fn for_helper(landlock: Option<Ruleset>) -> Confinement {
        Confinement {
            landlock,
            filter: crate::seccomp::no_unix_sockets(),
        }
    }

    /// Makes `cmd`'s child enter this confinement before it executes.
    pub fn apply(self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook runs in the forked child before exec and makes only the raw
        // system calls of `enter`; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || self.enter());
        }
    }

    /// For a child between `fork` and `exec`: raw system calls only, nothing allocated.
    fn enter(&self) -> std::io::Result<()> {
        // SAFETY: prctl on this process; an async-signal-safe system call.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if let Some(l) = &self.landlock {
            // SAFETY: landlock_restrict_self on this process, with a descriptor alive as
            // long as `self`; an async-signal-safe system call.
            if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, l.fd.as_raw_fd(), 0u32) }
                < 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        if let Some(f) = &self.filter {
            // SAFETY: the program points into `f`, alive for the call.
            if !unsafe { crate::seccomp::install(&crate::seccomp::fprog(f)) } {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program in the helper's confinement reads the system's files and runs its
    /// programs, makes Internet sockets, and can neither write nor read anything else, nor
    /// make a Unix socket (the abstract ones outside are out of reach as well, by the
    /// Landlock scope the attack test shows).
    #[test]
    fn the_helper_s_confinement_reads_the_system_and_writes_nothing() {
        let Some(rules) = Ruleset::for_helper(Path::new("/bin/sh")).unwrap() else {
            eprintln!("skipped: no Landlock");
            return;
        };
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("private"), "secret").unwrap();
        let script = format!(
            "test -s /etc/passwd && echo read-etc; \
             cat {0}/private 2>/dev/null || echo no-read; \
             echo x > {0}/new 2>/dev/null || echo no-write; \
             python3 -c \"import socket; socket.socket(socket.AF_INET6)\" && echo inet-ok; \
             python3 -c \"import socket; socket.socket(socket.AF_UNIX)\" 2>/dev/null \
               && echo unix-socket || echo no-unix-socket",
            d.path().display()
        );
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", &script]);
        Confinement::for_helper(Some(rules)).apply(&mut cmd);
        let o = cmd.output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("read-etc"), "{out}");
        assert!(out.contains("no-read") && !out.contains("secret"), "{out}");
        assert!(out.contains("no-write"), "{out}");
        assert!(!d.path().join("new").exists());
        assert!(out.contains("inet-ok"), "{out}");
        if crate::seccomp::no_unix_sockets().is_some() {
            assert!(out.contains("no-unix-socket"), "{out}");
        }
    }
}
