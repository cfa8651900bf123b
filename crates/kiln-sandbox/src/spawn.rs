//! Starting builder processes.

use std::ffi::{CStr, CString};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::{sys, Error, Result};

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
}

/// A started builder.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
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
];

const PER_ADDR_NO_RANDOMIZE: u64 = 0x0040000;
const PER_UNAME26: u64 = 0x0020000;

fn cvec_ptrs(v: &[CString]) -> Vec<*const libc::c_char> {
    let mut p: Vec<*const libc::c_char> = v.iter().map(|s| s.as_ptr()).collect();
    p.push(std::ptr::null());
    p
}

/// Writes `(step, errno)` to the error pipe and exits; async-signal-safe.
fn child_fail(err_fd: RawFd, step: usize) -> ! {
    // SAFETY: `__errno_location` returns this thread's errno slot; reading it is safe.
    let errno = unsafe { *libc::__errno_location() };
    let msg = [step as u8, 0, 0, 0, 0];
    let mut buf = msg;
    buf[1..5].copy_from_slice(&errno.to_le_bytes());
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
        if libc::chdir(spec.cwd.as_ptr()) < 0 {
            child_fail(ef, 4);
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
        libc::execve(spec.program.as_ptr(), d.argv, d.envp);
        child_fail(ef, 11);
    }
}

/// The child's stack between `clone` and `exec`: fresh anonymous pages, touched only as far
/// as the child actually uses them (zero-filling a buffer instead cost a quarter of a
/// millisecond per build in page faults), with a guard page below so that an overflow faults
/// instead of scribbling over the parent's heap, which the child shares.
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

const CHILD_STACK: usize = 256 * 1024;
const GUARD: usize = 4096;

impl ChildStack {
    fn new() -> Result<ChildStack> {
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
    fn top(&self) -> usize {
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
/// The child is created with `clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` does: no page
/// tables are copied, which matters for a daemon with a large heap and many threads (a plain
/// `fork` of such a process costs milliseconds and TLB shootdowns on every core).
pub fn spawn(spec: ChildSpec) -> Result<Spawned> {
    let argv = cvec_ptrs(&spec.args);
    let envp = cvec_ptrs(&spec.env);
    let devnull = CString::new("/dev/null").map_err(|_| Error::Invalid("NUL".into()))?;
    let oom = CString::new("/proc/self/oom_score_adj").map_err(|_| Error::Invalid("NUL".into()))?;
    let (err_r, err_w) = pipe_cloexec()?;
    let groups: Vec<libc::gid_t> = spec
        .user
        .as_ref()
        .map(|u| u.groups.clone())
        .unwrap_or_default();
    let personality = spec.personality.unwrap_or(0)
        | PER_ADDR_NO_RANDOMIZE
        | if spec.uname26 { PER_UNAME26 } else { 0 };
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
    };
    let top = stack.top();
    // SAFETY: `child_main` only reads `data` and makes raw system calls on its own stack
    // (`stack`, alive until clone returns, which with CLONE_VFORK is after exec or exit).
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &data as *const ChildData<'_> as *mut libc::c_void,
        )
    };
    let clone_err = std::io::Error::last_os_error();
    // SAFETY: restores this thread's mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        return Err(sys("start the builder", clone_err));
    }
    drop(err_w);
    drop(spec.output);
    // The pipe closed on exec (success) or carries (step, errno) on failure.
    let mut buf = [0u8; 5];
    let mut f = std::fs::File::from(err_r);
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(sys("read the builder's set-up status", e)),
        }
    }
    if got == 0 {
        return Ok(Spawned { pid });
    }
    // Reap the failed child.
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let step = STEPS.get(buf[0] as usize).copied().unwrap_or("setting up");
    let errno = i32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
    Err(Error::Setup {
        step: step.to_string(),
        source: std::io::Error::from_raw_os_error(errno),
    })
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

    fn cs(s: &str) -> CString {
        CString::new(s).unwrap()
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
        };
        let child = spawn(spec).unwrap();
        let mut s = String::new();
        std::fs::File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(exit_code(wait(child.pid).unwrap()), Some(0));
        assert_eq!(s, "out\nerr\nbar\n");

        let (_r, w) = pipe_cloexec().unwrap();
        let spec = ChildSpec {
            program: cs("/nonexistent/builder"),
            args: vec![cs("x")],
            env: vec![],
            cwd: cs("/"),
            output: w,
            personality: None,
            uname26: false,
            user: None,
            oom_score_adj: false,
        };
        let e = spawn(spec).unwrap_err().to_string();
        assert!(
            e.contains("executing the builder") && e.contains("No such file"),
            "{e}"
        );

        let (_r, w) = pipe_cloexec().unwrap();
        let spec = ChildSpec {
            program: cs("/bin/true"),
            args: vec![cs("true")],
            env: vec![],
            cwd: cs("/nonexistent-dir"),
            output: w,
            personality: None,
            uname26: false,
            user: None,
            oom_score_adj: false,
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
