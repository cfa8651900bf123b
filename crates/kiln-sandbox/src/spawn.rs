//! Starting builder processes.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::namespace::{
    Op, Prepared, LOCKED_FLAGS, MS_BIND, MS_NODEV, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC,
    MS_REMOUNT,
};
use crate::{sys, Error, Result, Sandbox};

/// The user a builder runs as.
#[derive(Debug, Clone)]
pub struct UserSpec {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. `kvm`), kept as the reference keeps them.
    pub groups: Vec<u32>,
}

/// Everything the child needs, prepared before the fork.
#[derive(Debug)]
pub struct ChildSpec {
    pub program: CString,
    /// `argv`, including `argv[0]`.
    pub args: Vec<CString>,
    /// `NAME=value` strings.
    pub env: Vec<CString>,
    pub cwd: CString,
    /// Write end of the log pipe: becomes stdout and stderr.
    pub output: OwnedFd,
    /// `personality(2)` flags to add (e.g. `PER_LINUX32`); `ADDR_NO_RANDOMIZE` is always added.
    pub personality: Option<u64>,
    /// Also report Linux 2.6 (`UNAME26`).
    pub uname26: bool,
    pub user: Option<UserSpec>,
    /// Ask the kernel to kill the builder first when memory runs out (`oom_score_adj` 1000),
    /// to preserve the daemon and the user's processes.
    pub oom_score_adj: bool,
    /// Run inside this sandbox (then `user` is ignored: the sandbox's id map decides, and
    /// `program` and `cwd` are paths inside it).
    pub sandbox: Option<Sandbox>,
    /// `cgroup.procs` of the build's cgroup ([`crate::cgroup::Cgroup::procs_fd`]): the
    /// child joins it first, before it can start any other process.
    pub cgroup: Option<OwnedFd>,
    /// Outside a sandbox (whose own [`Sandbox::seccomp`] says whether it has the filter, and
    /// which always sets `no_new_privs`): load the system-call filter ([`crate::seccomp`]), as
    /// Nix's `filter-syscalls` does for every build.
    pub seccomp: bool,
    /// Outside a sandbox: set `no_new_privs` (Nix's `allow-new-privileges = false`). An
    /// unprivileged process can only load the filter with it, so it is then set anyway.
    pub no_new_privs: bool,
}

impl ChildSpec {
    /// `program` with `args`, output to `output`, run in `/` with an empty environment and
    /// nothing else set: the fields are public, for the rest.
    pub fn new(program: CString, args: Vec<CString>, output: OwnedFd) -> Self {
        ChildSpec {
            program,
            args,
            env: Vec::new(),
            cwd: c"/".to_owned(),
            output,
            personality: None,
            uname26: false,
            user: None,
            oom_score_adj: false,
            sandbox: None,
            cgroup: None,
            seccomp: false,
            no_new_privs: false,
        }
    }
}

/// A started builder.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    /// The user-mode network helper of its namespace ([`crate::usernet`]), to be dropped
    /// once the build is over.
    pub network: Option<crate::usernet::UserNetProcess>,
}

/// Steps the child reports on failure (indices into `STEPS`).
const STEPS: &[&str] = &[
    "creating a new session",
    "redirecting standard input",
    "redirecting standard output",
    "redirecting standard error",
    "changing to the build directory",
    "setting the personality",
    "setting supplementary groups",
    "setting the group id",
    "setting the user id",
    "resetting signal handlers",
    "closing file descriptors",
    "executing the builder",
    "writing oom_score_adj",
    // Sandbox steps.
    "waiting for the user namespace's id maps",
    "making the mounts private",
    "mounting the sandbox's root",
    "setting up the sandbox",
    "bringing up the loopback interface",
    "setting the host name",
    "entering the sandbox's root (pivot_root)",
    "detaching the host's root",
    "making the sandbox's root read-only",
    "dropping supplementary groups",
    "setting no_new_privs",
    "loading the system-call filter",
    "scoping abstract sockets and signals (Landlock)",
    "joining the build's cgroup",
    "restoring the limit on open files",
    "entering a cgroup namespace of its own",
];
const ST_SYNC: usize = 13;
const ST_PRIVATE: usize = 14;
const ST_ROOT: usize = 15;
const ST_ENTRY: usize = 16;
const ST_LO: usize = 17;
const ST_HOSTNAME: usize = 18;
const ST_PIVOT: usize = 19;
const ST_DETACH: usize = 20;
const ST_RDONLY: usize = 21;
const ST_SETGROUPS: usize = 22;
const ST_NNP: usize = 23;
const ST_SECCOMP: usize = 24;
const ST_LANDLOCK: usize = 25;
const ST_CGROUP: usize = 26;
const ST_NOFILE: usize = 27;
const ST_CGROUPNS: usize = 28;
/// Error report: step (1 byte), errno (4), entry index (4).
const REPORT: usize = 9;

const PER_ADDR_NO_RANDOMIZE: u64 = 0x0040000;
const PER_UNAME26: u64 = 0x0020000;

fn cvec_ptrs(v: &[CString]) -> Vec<*const libc::c_char> {
    let mut p: Vec<*const libc::c_char> = v.iter().map(|s| s.as_ptr()).collect();
    p.push(std::ptr::null());
    p
}

/// Writes `(step, errno)` to the error pipe and exits; async-signal-safe.
fn child_fail(err_fd: RawFd, step: usize) -> ! {
    child_fail_at(err_fd, step, u32::MAX)
}

/// As [`child_fail`], naming the sandbox entry being set up.
fn child_fail_at(err_fd: RawFd, step: usize, entry: u32) -> ! {
    // SAFETY: `__errno_location` returns this thread's errno slot; reading it is safe.
    let errno = unsafe { *libc::__errno_location() };
    let mut buf = [0u8; REPORT];
    buf[0] = step as u8;
    buf[1..5].copy_from_slice(&errno.to_le_bytes());
    buf[5..9].copy_from_slice(&entry.to_le_bytes());
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf` lives on this stack.
    unsafe {
        libc::write(err_fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(1);
    }
}

/// Signals whose disposition in this process is not the default (handlers and `SIG_IGN`),
/// found once. Handlers are reset by exec anyway, but `SIG_IGN` survives it, and until exec
/// the child must not run a handler of ours on its stack; so these are the only signals the
/// child needs to reset (instead of 64 system calls per build).
fn non_default_signals() -> &'static [libc::c_int] {
    static SIGS: std::sync::OnceLock<Vec<libc::c_int>> = std::sync::OnceLock::new();
    SIGS.get_or_init(|| {
        let mut v = Vec::new();
        for sig in 1..65 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            // SAFETY: querying (not changing) a disposition into a zeroed struct we own.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: as above; a null new action only reads.
            if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } == 0
                && old.sa_sigaction != libc::SIG_DFL
            {
                v.push(sig);
            }
        }
        v
    })
}

/// What the child needs, by pointer (it shares the parent's memory until exec).
struct ChildData<'a> {
    spec: &'a ChildSpec,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    devnull: *const libc::c_char,
    oom: *const libc::c_char,
    groups: &'a [libc::gid_t],
    personality: u64,
    err_fd: RawFd,
    reset: &'a [libc::c_int],
    sandbox: Option<&'a Prepared>,
    /// Read end of the pipe on which the parent says the id maps are written.
    sync_fd: RawFd,
    fprog: Option<libc::sock_fprog>,
    /// Bring up `lo` in the new network namespace (not for one from [`crate::netns`],
    /// which has it up already and belongs to a user namespace the child has no
    /// capabilities in).
    lo_up: bool,
    /// The limit on open files the daemon had before raising its own ([`crate::limits`]).
    nofile: Option<libc::rlimit>,
}

/// The child side: runs on its own stack in the parent's address space (`CLONE_VM`) while
/// the parent thread is suspended (`CLONE_VFORK`), until exec or `_exit`. Only raw,
/// async-signal-safe system calls; nothing is allocated or written except on this stack.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the `ChildData` in the parent's frame, which stays alive and
    // unmoved because the parent thread is suspended until we exec or exit.
    let d = unsafe { &*(arg as *const ChildData<'_>) };
    let ef = d.err_fd;
    let spec = d.spec;
    // SAFETY: raw system calls on pointers prepared before the clone (see `spawn`).
    unsafe {
        // Default dispositions and the original mask: builders expect SIGPIPE to kill them
        // (the reference's restoreSIGPIPE) and must not inherit blocked signals. Handlers are
        // reset before anything is unblocked, so no parent handler can run here.
        for &sig in d.reset {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) < 0 {
            child_fail(ef, 9);
        }
        if let Some(fd) = &spec.cgroup {
            // "0" is the writer itself, in whatever PID namespace it is.
            if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                child_fail(ef, ST_CGROUP);
            }
        }
        if d.sync_fd >= 0 {
            let mut b = 0u8;
            loop {
                let n = libc::read(d.sync_fd, (&mut b as *mut u8).cast(), 1);
                if n == 1 {
                    break;
                }
                if n < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                child_fail(ef, ST_SYNC);
            }
        }
        if d.sandbox.is_some() && spec.cgroup.is_some() {
            // A sandboxed builder in a cgroup of its own sees that cgroup as the root
            // (`/proc/self/cgroup` says `0::/`, as under nix-daemon with `use-cgroups`): it
            // learns nothing of the host's cgroup tree, and the path, which names the
            // daemon's service and the build, does not reach its output.
            if libc::unshare(libc::CLONE_NEWCGROUP) < 0 {
                child_fail(ef, ST_CGROUPNS);
            }
        }
        if libc::setsid() < 0 {
            child_fail(ef, 0);
        }
        let null = libc::open(d.devnull, libc::O_RDONLY);
        if null < 0 || libc::dup2(null, 0) < 0 {
            child_fail(ef, 1);
        }
        let out_fd = spec.output.as_raw_fd();
        if libc::dup2(out_fd, 1) < 0 {
            child_fail(ef, 2);
        }
        if libc::dup2(out_fd, 2) < 0 {
            child_fail(ef, 3);
        }
        if libc::personality(d.personality as libc::c_ulong) < 0 {
            child_fail(ef, 5);
        }
        if spec.oom_score_adj {
            let fd = libc::open(d.oom, libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, b"1000".as_ptr().cast(), 4);
                libc::close(fd);
            }
        }
        if let Some(p) = d.sandbox {
            enter_sandbox(p, d.lo_up, ef);
        }
        if libc::chdir(spec.cwd.as_ptr()) < 0 {
            child_fail(ef, 4);
        }
        if let Some(p) = d.sandbox {
            // Ids inside the namespace: the daemon has written the maps.
            if !p.unprivileged && libc::setgroups(0, std::ptr::null()) < 0 {
                child_fail(ef, ST_SETGROUPS);
            }
            let (uid, gid) = (p.ids.inside_uid, p.ids.inside_gid);
            if libc::setgid(gid) < 0 || libc::getgid() != gid || libc::getegid() != gid {
                child_fail(ef, 7);
            }
            if libc::setuid(uid) < 0 || libc::getuid() != uid || libc::geteuid() != uid {
                child_fail(ef, 8);
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                child_fail(ef, ST_NNP);
            }
            // Landlock scopes (Linux 6.12): the builder can neither connect to an abstract
            // Unix socket created outside its sandbox nor signal a process outside. This
            // matters for fixed-output builds, which share the host's network namespace and
            // so its abstract sockets (the channel of CVE-2024-27297 and CVE-2025-46416).
            // Older kernels refuse the scopes (EINVAL) or Landlock (ENOSYS, EOPNOTSUPP):
            // then the other defences stand alone.
            let ruleset = libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &p.landlock as *const crate::namespace::LandlockAttr,
                std::mem::size_of::<crate::namespace::LandlockAttr>(),
                0u32,
            );
            if ruleset >= 0 {
                if libc::syscall(
                    libc::SYS_landlock_restrict_self,
                    ruleset as libc::c_int,
                    0u32,
                ) < 0
                {
                    child_fail(ef, ST_LANDLOCK);
                }
                libc::close(ruleset as libc::c_int);
            }
            load_filter(d.fprog.as_ref(), false, ef);
        } else {
            // Outside the sandbox the filter is loaded before the ids change: root may load
            // it without `no_new_privs` (which `allow-new-privileges` leaves unset), and it
            // restricts none of the calls that change them.
            if spec.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                child_fail(ef, ST_NNP);
            }
            load_filter(d.fprog.as_ref(), true, ef);
            if let Some(u) = &spec.user {
                if libc::setgroups(d.groups.len(), d.groups.as_ptr()) < 0 {
                    child_fail(ef, 6);
                }
                if libc::setgid(u.gid) < 0 || libc::getgid() != u.gid || libc::getegid() != u.gid {
                    child_fail(ef, 7);
                }
                if libc::setuid(u.uid) < 0 || libc::getuid() != u.uid || libc::geteuid() != u.uid {
                    child_fail(ef, 8);
                }
            }
        }
        // Every descriptor above stderr is closed when the builder starts, the error pipe
        // included (its closing tells the parent that exec succeeded).
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            child_fail(ef, 10);
        }
        // The daemon's limit on open files goes back to what it started with, last: until
        // here the child holds a copy of the daemon's descriptors (as many as its raised
        // limit allows) and opens more of its own (/dev/null, mount points), which a
        // lowered limit would refuse on a busy daemon. Lowering a soft limit needs no
        // privilege, and the filter allows it.
        if let Some(limit) = &d.nofile {
            if libc::setrlimit(libc::RLIMIT_NOFILE, limit) < 0 {
                child_fail(ef, ST_NOFILE);
            }
        }
        libc::execve(spec.program.as_ptr(), d.argv, d.envp);
        child_fail(ef, 11);
    }
}

/// Loads the system-call filter, if there is one (the child's last step but `exec`
/// inside the sandbox; before the ids change outside it). With `or_no_new_privs`, a refusal
/// for want of privilege (a root without `CAP_SYS_ADMIN`, in a container, asked for no
/// `no_new_privs`) is met by setting `no_new_privs` and trying again: the filter matters
/// more.
///
/// # Safety
/// Only from `child_main`, with `prog` prepared before the clone.
unsafe fn load_filter(prog: Option<&libc::sock_fprog>, or_no_new_privs: bool, ef: RawFd) {
    let Some(prog) = prog else {
        return;
    };
    // SAFETY: `prog` points to a filter that lives in the parent's frame until the child has
    // executed or exited.
    let load = || unsafe { crate::seccomp::install(prog) };
    if load() {
        return;
    }
    // SAFETY: reads this thread's errno, set by the prctl above.
    let denied = unsafe { *libc::__errno_location() } == libc::EACCES;
    if or_no_new_privs
        && denied
        // SAFETY: prctl on this process.
        && unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } >= 0
        && load()
    {
        return;
    }
    child_fail(ef, ST_SECCOMP);
}

/// Builds the sandbox's root from the prepared entries and moves into it. Runs in the child,
/// in its new namespaces, as the rest of `child_main`: raw system calls on prepared data.
///
/// # Safety
/// Only from `child_main`, with `p` prepared before the clone.
unsafe fn enter_sandbox(p: &Prepared, lo_up: bool, ef: RawFd) {
    // SAFETY: every pointer passed below comes from `p`'s C strings and buffers, alive for
    // the whole call; the calls only affect this child's own namespaces.
    unsafe {
        // Mounts made from here on must not propagate back to the host (systemd makes `/`
        // shared, and a shared subtree propagates even across mount namespaces).
        if libc::mount(
            std::ptr::null(),
            p.slash.as_ptr(),
            std::ptr::null(),
            MS_REC | MS_PRIVATE,
            std::ptr::null(),
        ) < 0
        {
            child_fail(ef, ST_PRIVATE);
        }
        if libc::mount(
            p.tmpfs.as_ptr(),
            p.root.as_ptr(),
            p.tmpfs.as_ptr(),
            MS_NOSUID | MS_NODEV,
            p.root_options.as_ptr().cast(),
        ) < 0
        {
            child_fail(ef, ST_ROOT);
        }
        for (i, op) in p.ops.iter().enumerate() {
            if !apply(op) {
                child_fail_at(ef, ST_ENTRY, i as u32);
            }
        }
        if p.private_network && lo_up {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 || libc::ioctl(s, libc::SIOCSIFFLAGS, &p.lo as *const _) < 0 {
                child_fail(ef, ST_LO);
            }
            libc::close(s);
        }
        if libc::sethostname(b"localhost".as_ptr().cast(), 9) < 0
            || libc::setdomainname(b"(none)".as_ptr().cast(), 6) < 0
        {
            child_fail(ef, ST_HOSTNAME);
        }
        // pivot_root(".", "."): the new root goes under the old one, which is then detached,
        // leaving no mount through which the host's files could be reached again.
        if libc::chdir(p.root.as_ptr()) < 0
            || libc::syscall(libc::SYS_pivot_root, p.dot.as_ptr(), p.dot.as_ptr()) < 0
        {
            child_fail(ef, ST_PIVOT);
        }
        if libc::umount2(p.dot.as_ptr(), libc::MNT_DETACH) < 0 || libc::chdir(p.slash.as_ptr()) < 0
        {
            child_fail(ef, ST_DETACH);
        }
        if libc::mount(
            std::ptr::null(),
            p.slash.as_ptr(),
            std::ptr::null(),
            MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV,
            std::ptr::null(),
        ) < 0
        {
            child_fail(ef, ST_RDONLY);
        }
    }
}

/// Creates the mount point `target` as a directory or an empty file, like `source`.
///
/// # Safety
/// Pointers from prepared C strings.
unsafe fn mount_point(target: &CStr, is_dir: bool) -> bool {
    // SAFETY: valid C strings; mkdir/open/close are plain system calls.
    unsafe {
        if is_dir {
            libc::mkdir(target.as_ptr(), 0o755) == 0 || *libc::__errno_location() == libc::EEXIST
        } else {
            let fd = libc::open(
                target.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                0o444,
            );
            fd >= 0 && libc::close(fd) == 0
        }
    }
}

/// Applies one entry; `false` on failure (errno set).
///
/// # Safety
/// Only in the child, from `enter_sandbox`.
unsafe fn apply(op: &Op) -> bool {
    // SAFETY: all pointers come from the prepared op; the structs passed by pointer are
    // locals of this frame.
    unsafe {
        match op {
            Op::Dir { path, mode } => {
                (libc::mkdir(path.as_ptr(), *mode) == 0
                    || *libc::__errno_location() == libc::EEXIST)
                    && libc::chmod(path.as_ptr(), *mode) == 0
            }
            Op::Bind {
                source,
                target,
                writable,
                optional,
            } => {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(source.as_ptr(), &mut st) < 0 {
                    return *optional && *libc::__errno_location() == libc::ENOENT;
                }
                let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                if !mount_point(target, is_dir) {
                    return false;
                }
                if libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    MS_BIND | MS_REC,
                    std::ptr::null(),
                ) < 0
                {
                    return false;
                }
                if *writable {
                    return true;
                }
                // A bind mount's read-only flag needs a remount, which in a user namespace
                // must repeat the flags the kernel locked on the source mount.
                let mut vfs: libc::statvfs = std::mem::zeroed();
                if libc::statvfs(target.as_ptr(), &mut vfs) < 0 {
                    return false;
                }
                let keep = vfs.f_flag & LOCKED_FLAGS;
                libc::mount(
                    std::ptr::null(),
                    target.as_ptr(),
                    std::ptr::null(),
                    MS_REMOUNT | MS_BIND | MS_RDONLY | keep,
                    std::ptr::null(),
                ) == 0
            }
            Op::Mount {
                fstype,
                target,
                flags,
                data,
            } => {
                mount_point(target, true)
                    && libc::mount(
                        fstype.as_ptr(),
                        target.as_ptr(),
                        fstype.as_ptr(),
                        *flags,
                        data.as_ptr().cast(),
                    ) == 0
            }
            Op::Symlink { target, path } => libc::symlink(target.as_ptr(), path.as_ptr()) == 0,
            Op::File {
                path,
                contents,
                mode,
            } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    *mode,
                );
                if fd < 0 {
                    return false;
                }
                let mut off = 0;
                while off < contents.len() {
                    let n = libc::write(fd, contents[off..].as_ptr().cast(), contents.len() - off);
                    if n <= 0 {
                        libc::close(fd);
                        return false;
                    }
                    off += n as usize;
                }
                libc::close(fd) == 0 && libc::chmod(path.as_ptr(), *mode) == 0
            }
        }
    }
}

/// The child's stack between `clone` and `exec`: fresh anonymous pages, touched only as far
/// as the child actually uses them (zero-filling a buffer instead cost a quarter of a
/// millisecond per build in page faults), with a guard page below so that an overflow faults
/// instead of scribbling over the parent's heap, which the child shares.
pub(crate) struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

const CHILD_STACK: usize = 256 * 1024;
const GUARD: usize = 4096;

impl ChildStack {
    pub(crate) fn new() -> Result<ChildStack> {
        let len = CHILD_STACK + GUARD;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(sys(
                "map the builder's stack",
                std::io::Error::last_os_error(),
            ));
        }
        let stack = ChildStack { base, len };
        // SAFETY: the lowest page of the mapping made above.
        if unsafe { libc::mprotect(base, GUARD, libc::PROT_NONE) } != 0 {
            return Err(sys(
                "protect the builder's stack",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(stack)
    }

    /// The initial stack pointer: the end of the mapping (stacks grow down), 16-byte aligned.
    pub(crate) fn top(&self) -> usize {
        (self.base as usize + self.len) & !0xf
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, once the child no longer runs on
        // it (CLONE_VFORK: clone returned after its exec or exit).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Starts the builder described by `spec`. Returns once the child has either executed the
/// builder (set-up succeeded) or failed set-up (reported as [`Error::Setup`]).
///
/// The child is created with `clone(CLONE_VM)`, as `posix_spawn` does: no page tables are
/// copied, which matters for a daemon with a large heap and many threads (a plain `fork` of
/// such a process costs milliseconds and TLB shootdowns on every core). Without a sandbox
/// the parent thread is suspended until the exec (`CLONE_VFORK`). With one, the parent must
/// write the child's id maps first, so it runs alongside the child: it then touches nothing
/// the child uses, makes only raw system calls (no `errno`, which the child shares), and
/// does not return before the child has executed or exited.
pub fn spawn(spec: ChildSpec) -> Result<Spawned> {
    let argv = cvec_ptrs(&spec.args);
    let envp = cvec_ptrs(&spec.env);
    let devnull = CString::new("/dev/null").map_err(|_| Error::Invalid("NUL".into()))?;
    let oom = CString::new("/proc/self/oom_score_adj").map_err(|_| Error::Invalid("NUL".into()))?;
    let prepared = spec.sandbox.as_ref().map(Sandbox::prepare).transpose()?;
    let (err_r, err_w) = pipe_cloexec()?;
    let sync = match &prepared {
        Some(_) => Some(pipe_cloexec()?),
        None => None,
    };
    let groups: Vec<libc::gid_t> = spec
        .user
        .as_ref()
        .map(|u| u.groups.clone())
        .unwrap_or_default();
    let personality = spec.personality.unwrap_or(0)
        | PER_ADDR_NO_RANDOMIZE
        | if spec.uname26 { PER_UNAME26 } else { 0 };
    // The sandbox's filter, or outside one the same filter if asked for.
    let unsandboxed_filter = (prepared.is_none() && spec.seccomp && crate::seccomp::available())
        .then(crate::seccomp::filter);
    let fprog = prepared
        .as_ref()
        .and_then(|p| p.filter.as_ref())
        .or(unsandboxed_filter.as_ref())
        .map(|f| crate::seccomp::fprog(f));
    // A network namespace made ahead of time, if one is ready: this thread is in it until
    // `lent` is dropped right after the clone, and the child starts in it.
    let lent = match &prepared {
        Some(p) if p.pooled_network => crate::netns::Lent::take(),
        _ => None,
    };
    let mut flags = libc::CLONE_VM | libc::SIGCHLD;
    if let Some(p) = &prepared {
        flags |= libc::CLONE_NEWUSER
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS;
        if p.private_network && lent.is_none() {
            flags |= libc::CLONE_NEWNET;
        }
    } else {
        flags |= libc::CLONE_VFORK;
    }
    // Computed before signals are blocked and before the clone.
    let _ = non_default_signals();
    let stack = ChildStack::new()?;
    // Block every signal around the clone so that no handler of ours runs on the child's
    // stack before it has reset the dispositions.
    // SAFETY: plain sigset manipulation on stack values.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to local sigsets.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let data = ChildData {
        spec: &spec,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        devnull: devnull.as_ptr(),
        oom: oom.as_ptr(),
        groups: &groups,
        personality,
        err_fd: err_w.as_raw_fd(),
        reset: non_default_signals(),
        sandbox: prepared.as_ref(),
        sync_fd: sync.as_ref().map(|(r, _)| r.as_raw_fd()).unwrap_or(-1),
        fprog,
        lo_up: lent.is_none(),
        nofile: crate::limits::for_children(),
    };
    let top = stack.top();
    // SAFETY: `child_main` only reads `data` and makes raw system calls on its own stack.
    // Everything it reads (`data`, `spec`, `prepared`, `stack`, ...) lives in this frame
    // until the child has executed or exited: with CLONE_VFORK clone returns only then;
    // otherwise `wait_for_exec` below blocks until then (or until the child is dead).
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            flags,
            &data as *const ChildData<'_> as *mut libc::c_void,
        )
    };
    let clone_err = std::io::Error::last_os_error();
    // Back to the host's network namespace, before anything else (raw system call only).
    drop(lent);
    // SAFETY: restores this thread's mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if pid < 0 {
        drop(stack);
        return Err(sys(
            if prepared.is_some() {
                "create the sandbox's namespaces"
            } else {
                "start the builder"
            },
            clone_err,
        ));
    }
    drop(err_w);
    let mut report = [0u8; REPORT];
    let mut network = None;
    let got = match (&prepared, sync) {
        (Some(p), Some((sync_r, sync_w))) => {
            drop(sync_r);
            let mut maps = write_id_maps(pid, p);
            if let (Ok(()), Some(crate::Network::User(net))) =
                (&maps, spec.sandbox.as_ref().map(|s| &s.network))
            {
                // The helper must have the interface up before the builder runs. It is
                // started from another thread: this one shares its `errno` with the child,
                // and starting a process is full of libc calls that set it.
                maps = std::thread::scope(|sc| {
                    sc.spawn(|| crate::usernet::start(net, pid, p.unprivileged))
                        .join()
                        .unwrap_or_else(|_| {
                            Err(Error::Invalid("the network helper panicked".into()))
                        })
                })
                .map(|helper| network = Some(helper));
            }
            if let Err(e) = maps {
                // The child waits for the go-ahead, holding a copy of the pipe's write end
                // itself (so closing ours would not wake it): it is killed there, and
                // reaped before its stack is freed.
                // SAFETY: kill/waitpid on our own child; no memory involved.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    let mut status = 0;
                    libc::waitpid(pid, &mut status, 0);
                }
                drop(stack);
                return Err(e);
            }
            let _ = rustix::io::write(&sync_w, b"1");
            drop(sync_w);
            wait_for_exec(&err_r, &mut report)
        }
        _ => wait_for_exec(&err_r, &mut report),
    };
    // The child has executed or exited: its stack and data are no longer used.
    drop(stack);
    let _ = &data;
    drop(spec.output);
    if got == 0 {
        return Ok(Spawned { pid, network });
    }
    // Reap the failed child.
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let step_no = report[0] as usize;
    let mut step = STEPS
        .get(step_no)
        .copied()
        .unwrap_or("setting up")
        .to_string();
    let entry = u32::from_le_bytes([report[5], report[6], report[7], report[8]]) as usize;
    if step_no == ST_ENTRY {
        if let Some(d) = prepared.as_ref().and_then(|p| p.descriptions.get(entry)) {
            step = format!("{step}: {d}");
        }
    }
    let errno = i32::from_le_bytes([report[1], report[2], report[3], report[4]]);
    Err(Error::Setup {
        step,
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// Blocks until the error pipe closes (the child executed or died) and returns how many
/// report bytes it carried. Raw reads only: a concurrently running `CLONE_VM` child shares
/// this thread's `errno`.
fn wait_for_exec(err_r: &OwnedFd, report: &mut [u8; REPORT]) -> usize {
    let mut got = 0;
    loop {
        let mut scratch = [0u8; REPORT];
        let buf: &mut [u8] = if got < REPORT {
            &mut report[got..]
        } else {
            &mut scratch
        };
        match rustix::io::read(err_r, buf) {
            Ok(0) => return got,
            Ok(n) => got = (got + n).min(REPORT),
            Err(rustix::io::Errno::INTR) => continue,
            // Cannot happen on a pipe we own; treat as closed rather than return while the
            // child may still run on our memory.
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

/// Writes the child's uid and gid maps (and, unprivileged, denies `setgroups`, which the
/// kernel requires before an unprivileged gid map).
fn write_id_maps(pid: i32, p: &Prepared) -> Result<()> {
    let write = |file: &str, data: &[u8]| -> Result<()> {
        let path = format!("/proc/{pid}/{file}");
        let fd = rustix::fs::open(
            path.as_str(),
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| sys(&format!("open {path}"), e.into()))?;
        rustix::io::write(&fd, data).map_err(|e| sys(&format!("write {path}"), e.into()))?;
        Ok(())
    };
    write("uid_map", &p.uid_map)?;
    if p.unprivileged {
        write("setgroups", b"deny")?;
    }
    write("gid_map", &p.gid_map)
}

/// A pipe whose ends close on exec.
pub fn pipe_cloexec() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(sys("create a pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `sig` to the process group led by `pid` (builders lead their own).
pub fn kill_group(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory involved.
        unsafe { libc::kill(-pid, sig) };
    }
}

/// Kills every process running as `uid` (a build user's, before and after its builds: the
/// reference's `killUser`), so that nothing a previous build left behind — or anything
/// else running under that id — can touch the next build's files. A short-lived child
/// takes on `uid` and sends `SIGKILL` to every process it may signal (`kill(-1)` spares
/// only itself and init); it shares the daemon's memory (`CLONE_VM | CLONE_VFORK`, as
/// [`spawn`]) so that no page tables are copied.
pub fn kill_user(uid: u32) -> Result<()> {
    if uid == 0 {
        return Err(Error::Invalid(
            "refusing to kill the processes of root".into(),
        ));
    }
    extern "C" fn killer(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the uid, passed by value in the pointer; raw system calls only.
        unsafe {
            let uid = arg as usize as libc::uid_t;
            // The raw call changes this task's ids alone (glibc's wrapper would try to
            // change those of every thread, which this child does not have).
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                libc::_exit(2);
            }
            let r = libc::kill(-1, libc::SIGKILL);
            let errno = *libc::__errno_location();
            libc::_exit(if r == 0 || errno == libc::ESRCH { 0 } else { 3 })
        }
    }
    let stack = ChildStack::new()?;
    // SAFETY: `killer` uses only its argument and raw system calls on its own stack, which
    // lives until clone returns (CLONE_VFORK: after the child has exited).
    let pid = unsafe {
        libc::clone(
            killer,
            stack.top() as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            uid as usize as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(sys(
            &format!("start a process to kill those of uid {uid}"),
            std::io::Error::last_os_error(),
        ));
    }
    drop(stack);
    let status = wait(pid)?;
    match exit_code(status) {
        Some(0) => Ok(()),
        Some(2) => Err(Error::Invalid(format!(
            "cannot become uid {uid} to kill its processes"
        ))),
        _ => Err(Error::Invalid(format!(
            "cannot kill the processes of uid {uid}: {}",
            describe_status(status)
        ))),
    }
}

/// CPU time and maximum resident set size of a waited-for process and the descendants it
/// waited for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChildUsage {
    pub user: std::time::Duration,
    pub system: std::time::Duration,
    /// Of the largest single process, in bytes.
    pub max_rss: u64,
}

/// Waits for `pid`; returns the raw wait status and what it used.
pub fn wait_usage(pid: i32) -> Result<(i32, ChildUsage)> {
    let mut status = 0;
    loop {
        // SAFETY: an all-zero rusage is a valid value for the kernel to fill in.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child with valid status and rusage pointers.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            let tv = |t: libc::timeval| {
                std::time::Duration::from_secs(t.tv_sec.max(0) as u64)
                    + std::time::Duration::from_micros(t.tv_usec.max(0) as u64)
            };
            return Ok((
                status,
                ChildUsage {
                    user: tv(ru.ru_utime),
                    system: tv(ru.ru_stime),
                    max_rss: (ru.ru_maxrss.max(0) as u64).saturating_mul(1024),
                },
            ));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(sys("wait for the builder", e));
        }
    }
}

/// Waits for `pid`; returns the raw wait status.
pub fn wait(pid: i32) -> Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(sys("wait for the builder", e));
        }
    }
}

/// `Some(code)` if the process exited normally.
pub fn exit_code(status: i32) -> Option<i32> {
    libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
}

/// Describes a wait status as Nix does (`failed with exit code 1`, `was killed by signal 9`).
pub fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("failed with exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: strsignal returns a pointer to a static (or thread-local) string.
        let name = unsafe { CStr::from_ptr(libc::strsignal(sig)) }
            .to_string_lossy()
            .into_owned();
        format!("failed due to signal {sig} ({name})")
    } else {
        format!("died abnormally (status {status})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn cs(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    /// Outside the sandbox a builder still runs under the filter and `no_new_privs` (Nix's
    /// `filter-syscalls`, `allow-new-privileges = false`): a setuid bit cannot be set, and
    /// without them it can.
    #[test]
    fn unsandboxed_builders_run_under_the_filter() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "").unwrap();
        let run = |filtered: bool| {
            let (r, w) = pipe_cloexec().unwrap();
            let script = format!(
                "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status; \
                 chmod 4755 {0} && echo chmod-allowed; chmod 0644 {0}",
                f.display()
            );
            let spec = ChildSpec {
                seccomp: filtered,
                no_new_privs: filtered,
                ..ChildSpec::new(cs("/bin/sh"), vec![cs("sh"), cs("-c"), cs(&script)], w)
            };
            let child = spawn(spec).unwrap();
            let mut s = String::new();
            std::fs::File::from(r).read_to_string(&mut s).unwrap();
            wait(child.pid).unwrap();
            s
        };
        let already = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .contains("NoNewPrivs:\t1");
        let on = run(true);
        assert!(on.contains("NoNewPrivs:\t1"), "{on}");
        assert!(on.contains("Seccomp:\t2"), "{on}");
        assert!(on.contains("Operation not permitted"), "{on}");
        assert!(!on.contains("chmod-allowed"), "{on}");
        // Where the test itself already runs under no_new_privs (a systemd service with
        // NoNewPrivileges=, a container), there is no "without" to compare with.
        if !already {
            let off = run(false);
            assert!(off.contains("NoNewPrivs:\t0"), "{off}");
            assert!(off.contains("chmod-allowed"), "{off}");
        }
    }

    #[test]
    fn runs_and_reports_setup_failures() {
        let (r, w) = pipe_cloexec().unwrap();
        let spec = ChildSpec {
            program: cs("/bin/sh"),
            args: vec![
                cs("sh"),
                cs("-c"),
                cs("echo out; echo err >&2; echo $FOO; trap"),
            ],
            env: vec![cs("FOO=bar")],
            cwd: cs("/"),
            output: w,
            personality: None,
            uname26: false,
            user: None,
            oom_score_adj: true,
            sandbox: None,
            cgroup: None,
            seccomp: false,
            no_new_privs: false,
        };
        let child = spawn(spec).unwrap();
        let mut s = String::new();
        std::fs::File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(exit_code(wait(child.pid).unwrap()), Some(0));
        assert_eq!(s, "out\nerr\nbar\n");

        let (_r, w) = pipe_cloexec().unwrap();
        let spec = ChildSpec::new(cs("/nonexistent/builder"), vec![cs("x")], w);
        let e = spawn(spec).unwrap_err().to_string();
        assert!(
            e.contains("executing the builder") && e.contains("No such file"),
            "{e}"
        );

        let (_r, w) = pipe_cloexec().unwrap();
        let spec = ChildSpec {
            cwd: cs("/nonexistent-dir"),
            ..ChildSpec::new(cs("/bin/true"), vec![cs("true")], w)
        };
        assert!(spawn(spec)
            .unwrap_err()
            .to_string()
            .contains("changing to the build directory"));
    }

    #[test]
    fn status_descriptions() {
        assert_eq!(describe_status(1 << 8), "failed with exit code 1");
        assert!(describe_status(9).contains("signal 9"));
    }
}
