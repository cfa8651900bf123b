//! Making a host path appear in a running sandbox (recursive Nix: a path the builder added
//! or built through its daemon socket must become readable inside).
//!
//! The sandbox's mount namespace belongs to the builder's user namespace, and mounts can
//! only be attached from inside a mount namespace. A short-lived child of the daemon:
//! 1. enters the builder's user namespace (the daemon created it, so it holds every
//!    capability there — rootless daemons too);
//! 2. makes a private copy of the daemon's mount namespace, owned by that user namespace,
//!    so that it may clone a mount there (`open_tree(OPEN_TREE_CLONE)` of the source,
//!    resolved as the daemon sees it);
//! 3. makes the clone read-only, `nosuid` and `nodev` (`mount_setattr`), so the builder
//!    cannot write into the store through it;
//! 4. enters the builder's mount namespace and attaches the clone at the target
//!    (`move_mount`), without following a symlink at the target.
//!
//! The namespaces are held as descriptors taken right after the builder started
//! ([`Namespaces::of`]), so a recycled pid can never point this at another process.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::spawn::{describe_status, exit_code, wait};
use crate::{sys, Error, Result};

/// The user and mount namespaces of a running sandboxed builder.
#[derive(Debug)]
pub struct Namespaces {
    user: OwnedFd,
    mnt: OwnedFd,
}

impl Namespaces {
    /// The namespaces of process `pid` (call while it is known to be alive and unreaped).
    pub fn of(pid: i32) -> Result<Namespaces> {
        let open = |ns: &str| {
            let p = format!("/proc/{pid}/ns/{ns}");
            rustix::fs::open(
                p.as_str(),
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| sys(&format!("open '{p}'"), e.into()))
        };
        Ok(Namespaces {
            user: open("user")?,
            mnt: open("mnt")?,
        })
    }

    /// Bind-mounts `source` (a host path: a directory or a regular file) read-only at
    /// `target` inside the sandbox, whose mount point (an empty directory or file) must
    /// already exist.
    pub fn attach(&self, source: &Path, target: &str) -> Result<()> {
        let cs = |b: &[u8]| {
            CString::new(b).map_err(|_| Error::Invalid("a path contains a NUL byte".into()))
        };
        let src = cs(source.as_os_str().as_bytes())?;
        let dst = cs(target.as_bytes())?;
        let empty = cs(b"")?;
        let mut args = AttachArgs {
            user: self.user.as_raw_fd(),
            mnt: self.mnt.as_raw_fd(),
            source: src.as_ptr(),
            target: dst.as_ptr(),
            empty: empty.as_ptr(),
            failed_step: -1,
            errno: 0,
        };
        let stack = crate::spawn::ChildStack::new()?;
        // SAFETY: `attacher` reads only `args` (alive until clone returns: CLONE_VFORK
        // suspends this thread until the child has exited) and makes raw system calls on
        // its own stack; it never returns into Rust code of the parent.
        let pid = unsafe {
            libc::clone(
                attacher,
                stack.top() as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                &mut args as *mut AttachArgs as *mut libc::c_void,
            )
        };
        if pid < 0 {
            return Err(sys(
                "start a process to mount into the sandbox",
                std::io::Error::last_os_error(),
            ));
        }
        drop(stack);
        let status = wait(pid)?;
        // The child wrote its failing step into `args` (shared memory) before exiting.
        let step = usize::try_from(args.failed_step)
            .ok()
            .and_then(|s| STEPS.get(s));
        match (exit_code(status), step) {
            (Some(0), _) => Ok(()),
            (_, Some(step)) => Err(Error::Setup {
                step: format!(
                    "{step} (making '{}' appear at '{target}')",
                    source.display()
                ),
                source: std::io::Error::from_raw_os_error(args.errno),
            }),
            (_, None) => Err(Error::Invalid(format!(
                "mounting '{}' into the sandbox: {}",
                source.display(),
                describe_status(status)
            ))),
        }
    }
}

const STEPS: [&str; 6] = [
    "entering the builder's user namespace",
    "copying the mount namespace",
    "cloning the source mount",
    "making the mount read-only",
    "entering the builder's mount namespace",
    "attaching the mount",
];

#[repr(C)]
struct AttachArgs {
    user: libc::c_int,
    mnt: libc::c_int,
    source: *const libc::c_char,
    target: *const libc::c_char,
    empty: *const libc::c_char,
    /// Written by the child: the index in `STEPS` of the step that failed, and its errno.
    failed_step: libc::c_int,
    errno: libc::c_int,
}

/// `struct mount_attr`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

extern "C" fn attacher(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the parent's `AttachArgs`, alive until this child exits;
    // only raw system calls follow (no allocation, no locks: the address space is shared).
    unsafe {
        let a = arg as *mut AttachArgs;
        let (user, mnt, source, target, empty) =
            ((*a).user, (*a).mnt, (*a).source, (*a).target, (*a).empty);
        let fail = |step: libc::c_int| -> ! {
            (*a).errno = *libc::__errno_location();
            (*a).failed_step = step;
            libc::_exit(1)
        };
        if libc::setns(user, libc::CLONE_NEWUSER) != 0 {
            fail(0);
        }
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            fail(1);
        }
        let tree = libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source,
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        );
        if tree < 0 {
            fail(2);
        }
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        if libc::syscall(
            libc::SYS_mount_setattr,
            tree as libc::c_int,
            empty,
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) != 0
        {
            fail(3);
        }
        if libc::setns(mnt, libc::CLONE_NEWNS) != 0 {
            fail(4);
        }
        if libc::syscall(
            libc::SYS_move_mount,
            tree as libc::c_int,
            empty,
            libc::AT_FDCWD,
            target,
            MOVE_MOUNT_F_EMPTY_PATH,
        ) != 0
        {
            fail(5);
        }
        libc::_exit(0)
    }
}
