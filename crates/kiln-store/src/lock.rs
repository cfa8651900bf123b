//! File locks that other daemons on the same store respect.
//!
//! Nix 2.8 locks with `flock(2)`, guix-daemon with `fcntl(F_SETLK)` record locks; the two
//! kinds do not see each other. kiln takes both on every lock file: a `flock` and an
//! open-file-description (`F_OFD_SETLK`) record lock, which conflicts with Guix's POSIX
//! locks but, unlike them, is tied to the file description and not to the process, so one
//! thread closing a descriptor cannot release another thread's lock.
//!
//! Path locks (`<path>.lock`) follow the deletion protocol of Nix and Guix: a holder that
//! removes its lock file unlinks it and then writes a byte into it; a locker that finds a
//! non-empty lock file after acquiring it knows it holds a lock on a deleted file and retries.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg};
use rustix::fs::{flock, fstat, openat, FlockOperation, Mode, OFlags, CWD};

use crate::error::{Error, Result};

/// Shared (read) or exclusive (write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Shared,
    Exclusive,
}

fn ofd_lock(fd: impl AsFd, kind: Option<LockKind>, wait: bool) -> std::io::Result<bool> {
    let l_type = match kind {
        Some(LockKind::Shared) => nix::libc::F_RDLCK,
        Some(LockKind::Exclusive) => nix::libc::F_WRLCK,
        None => nix::libc::F_UNLCK,
    };
    let mut fl = whole_file_flock();
    fl.l_type = l_type as _;
    fl.l_whence = nix::libc::SEEK_SET as _;
    let arg = if wait {
        FcntlArg::F_OFD_SETLKW(&fl)
    } else {
        FcntlArg::F_OFD_SETLK(&fl)
    };
    match fcntl(fd.as_fd(), arg) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) if !wait => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A `struct flock` covering the whole file (start 0, length 0 = to the end).
fn whole_file_flock() -> nix::libc::flock {
    nix::libc::flock {
        l_type: 0,
        l_whence: 0,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// Locks `fd` with both `flock` and an OFD record lock. Returns `false` when `wait` is off
/// and the lock is held elsewhere.
pub fn lock_fd(fd: impl AsFd, kind: LockKind, wait: bool) -> std::io::Result<bool> {
    let fd = fd.as_fd();
    let op = match (kind, wait) {
        (LockKind::Shared, true) => FlockOperation::LockShared,
        (LockKind::Exclusive, true) => FlockOperation::LockExclusive,
        (LockKind::Shared, false) => FlockOperation::NonBlockingLockShared,
        (LockKind::Exclusive, false) => FlockOperation::NonBlockingLockExclusive,
    };
    loop {
        match flock(fd, op) {
            Ok(()) => break,
            Err(rustix::io::Errno::WOULDBLOCK) if !wait => return Ok(false),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    loop {
        match ofd_lock(fd, Some(kind), wait) {
            Ok(true) => return Ok(true),
            Ok(false) => {
                let _ = flock(fd, FlockOperation::Unlock);
                return Ok(false);
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EINTR) => continue,
            Err(e) => {
                let _ = flock(fd, FlockOperation::Unlock);
                return Err(e);
            }
        }
    }
}

/// Releases both locks.
pub fn unlock_fd(fd: impl AsFd) {
    let fd = fd.as_fd();
    let _ = ofd_lock(fd, None, false);
    let _ = flock(fd, FlockOperation::Unlock);
}

/// Opens (creating, mode 0600) a lock file.
pub fn open_lock_file(path: &Path) -> Result<OwnedFd> {
    openat(
        CWD,
        path,
        OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| Error::io(path, "open lock file", e))
}

/// Paths this process holds locks on (the reference's `lockedPaths`): lets the scheduler
/// tell "locked by another process" from "locked by one of our own goals".
#[derive(Debug, Default, Clone)]
pub struct LockRegistry(Arc<Mutex<HashSet<PathBuf>>>);

impl LockRegistry {
    pub fn is_locked_by_me(&self, lock_path: &Path) -> bool {
        self.0.lock().is_ok_and(|s| s.contains(lock_path))
    }
    fn insert(&self, p: &Path) {
        if let Ok(mut s) = self.0.lock() {
            s.insert(p.to_path_buf());
        }
    }
    fn remove(&self, p: &Path) {
        if let Ok(mut s) = self.0.lock() {
            s.remove(p);
        }
    }
}

/// An exclusive lock on `<path>.lock`, released on drop.
#[derive(Debug)]
pub struct PathLock {
    lock_path: PathBuf,
    file: Option<File>,
    delete: bool,
    registry: LockRegistry,
}

impl PathLock {
    /// Locks `target` (creating `target.lock`). With `wait`, blocks until the lock is free;
    /// otherwise returns `None` when someone else holds it.
    pub fn acquire(target: &Path, wait: bool, registry: &LockRegistry) -> Result<Option<PathLock>> {
        let mut lock_path = target.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        loop {
            let fd = open_lock_file(&lock_path)?;
            let got = lock_fd(&fd, LockKind::Exclusive, wait)
                .map_err(|e| Error::io(&lock_path, "lock", e))?;
            if !got {
                return Ok(None);
            }
            // A non-empty lock file was deleted by its previous holder: ours is a lock on a
            // file nobody else will open again. Start over with a fresh one.
            let st = fstat(&fd).map_err(|e| Error::io(&lock_path, "stat lock file", e))?;
            if st.st_size != 0 {
                unlock_fd(&fd);
                continue;
            }
            registry.insert(&lock_path);
            return Ok(Some(PathLock {
                lock_path,
                file: Some(File::from(fd)),
                delete: false,
                registry: registry.clone(),
            }));
        }
    }

    /// Locks, polling with exponential back-off (1 ms … 100 ms) instead of blocking a thread
    /// in the kernel, until `deadline` passes (then returns `None`).
    pub fn acquire_polling(
        target: &Path,
        registry: &LockRegistry,
        deadline: Option<std::time::Instant>,
    ) -> Result<Option<PathLock>> {
        let mut delay = Duration::from_millis(1);
        loop {
            if let Some(l) = PathLock::acquire(target, false, registry)? {
                return Ok(Some(l));
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(None);
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// Deletes the lock file when the lock is released (once the locked path is final).
    pub fn set_delete(&mut self, delete: bool) {
        self.delete = delete;
    }

    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }
}

impl Drop for PathLock {
    fn drop(&mut self) {
        self.registry.remove(&self.lock_path);
        if let Some(mut f) = self.file.take() {
            if self.delete {
                // Unlink first, then mark the file stale for anyone who opened it meanwhile.
                let _ = std::fs::remove_file(&self.lock_path);
                let _ = f.write_all(b"d");
            }
            unlock_fd(&f);
        }
    }
}

/// A lock held on an already open file (the GC lock, a temp-roots file, a build user).
#[derive(Debug)]
pub struct FdLock {
    fd: OwnedFd,
}

impl FdLock {
    pub fn acquire(
        fd: OwnedFd,
        kind: LockKind,
        wait: bool,
        what: &Path,
    ) -> Result<std::result::Result<FdLock, OwnedFd>> {
        match lock_fd(&fd, kind, wait).map_err(|e| Error::io(what, "lock", e))? {
            true => Ok(Ok(FdLock { fd })),
            false => Ok(Err(fd)),
        }
    }
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
    pub fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

impl Drop for FdLock {
    fn drop(&mut self) {
        unlock_fd(&self.fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_between_descriptions_and_stale_retry() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("p");
        let reg = LockRegistry::default();
        let mut l1 = PathLock::acquire(&target, false, &reg).unwrap().unwrap();
        assert!(reg.is_locked_by_me(l1.lock_path()));
        // Same process, other file description: refused.
        assert!(PathLock::acquire(&target, false, &reg).unwrap().is_none());
        // A waiter blocked on the old file gets it after deletion, sees it is stale, retries
        // on a fresh file and wins.
        let t = target.clone();
        let reg2 = reg.clone();
        let h = std::thread::spawn(move || PathLock::acquire(&t, true, &reg2).unwrap().is_some());
        std::thread::sleep(Duration::from_millis(50));
        l1.set_delete(true);
        drop(l1);
        assert!(h.join().unwrap());
    }

    #[test]
    fn fcntl_locks_of_other_processes_are_respected() {
        // A Guix-style POSIX record lock held by another process blocks kiln's lock.
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x.lock");
        std::fs::write(&f, "").unwrap();
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg("import fcntl,sys,time; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)")
            .arg(&f)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "locked");
        let fd = open_lock_file(&f).unwrap();
        assert!(
            !lock_fd(&fd, LockKind::Exclusive, false).unwrap(),
            "POSIX lock of another process ignored"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(lock_fd(&fd, LockKind::Exclusive, false).unwrap());
    }
}
