//! Temporary roots: this process's (counted per path, published in its
//! `<state>/temproots/<pid>` file for other processes' collectors) and the late roots a
//! collector running in this process learns of while it runs ([`GcShared`]). They are the
//! store core's side of collection: adding a path takes a root first, and the collectors
//! (`crate::gc`) read these; the core knows nothing of how a collection goes.
//!
//! Temporary roots use the files Nix and Guix use: full store paths each followed by a NUL
//! byte, the file write-locked by its owner for as long as it lives. A root is appended
//! while holding `gc.lock` shared; when a collector holds it exclusively, the root is
//! handed to the collector over `<state>/gc-socket/socket` (path, newline; the collector
//! answers `1`) as Nix 2.8 does, and still appended to the file.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kiln_format::StorePath;

use crate::config::Layout;
use crate::error::{Error, Result};
use crate::lock::{lock_fd, open_lock_file, unlock_fd, LockKind};

use super::LocalStore;

#[derive(Debug, Default)]
pub(crate) struct GcInner {
    pub(crate) running: bool,
    pub(crate) late_roots: HashSet<StorePath>,
    /// Paths the collector has decided to delete whose files are not gone yet.
    pub(crate) doomed: HashSet<StorePath>,
}

/// State shared between a running collector and roots added meanwhile.
#[derive(Debug, Default, Clone)]
pub struct GcShared(pub(crate) Arc<(Mutex<GcInner>, Condvar)>);

impl GcShared {
    /// Records roots added while this process's collector runs; returns whether it runs.
    ///
    /// A root whose path the collector is deleting right now waits until the files are
    /// gone, so the caller then finds the path invalid and makes it afresh. Answering at
    /// once would let the caller see it still valid (or find its files and remove them as
    /// a leftover) while the collector's removal runs behind it: a valid path without
    /// contents, or the collector failing on files someone else removed. The caller must
    /// hold no lock the collector needs (it waits for the collector's removal thread).
    pub(crate) fn note_roots(&self, paths: &[StorePath]) -> bool {
        let (m, cv) = &*self.0;
        let Ok(mut g) = m.lock() else {
            return false;
        };
        if !g.running {
            return false;
        }
        g.late_roots.extend(paths.iter().cloned());
        while g.running && paths.iter().any(|p| g.doomed.contains(p)) {
            g = match cv.wait(g) {
                Ok(g) => g,
                Err(_) => return true,
            };
        }
        true
    }

    /// Atomically: unless `p` became a late root, marks it as being deleted (late roots
    /// for it then wait for [`GcShared::release`]). Returns whether it may be deleted.
    pub(crate) fn claim(&self, p: &StorePath) -> bool {
        let Ok(mut g) = self.0 .0.lock() else {
            return false;
        };
        if g.late_roots.contains(p) {
            return false;
        }
        g.doomed.insert(p.clone());
        true
    }

    /// Nothing more will be deleted: every root waiting for a claimed path may go on.
    pub(crate) fn release_all(&self) {
        if let Ok(mut g) = self.0 .0.lock() {
            g.doomed.clear();
        }
        self.0 .1.notify_all();
    }

    /// The files of `paths` are gone: roots waiting for them may go on.
    pub(crate) fn release(&self, paths: &[StorePath]) {
        if let Ok(mut g) = self.0 .0.lock() {
            for p in paths {
                g.doomed.remove(p);
            }
        }
        self.0 .1.notify_all();
    }

    pub(crate) fn is_late_root(&self, p: &StorePath) -> bool {
        self.0 .0.lock().is_ok_and(|g| g.late_roots.contains(p))
    }
}

#[derive(Debug, Default)]
struct TempRootsInner {
    file: Option<File>,
    /// `gc.lock`, kept open: it is locked shared while the file is compacted.
    gc_lock: Option<std::os::fd::OwnedFd>,
    /// `gc.lock` again, on a description of its own: locked shared and released at once
    /// to learn whether a collector runs (not the one compaction holds its lock on, which
    /// another thread's probe would release).
    probe: Option<std::os::fd::OwnedFd>,
    counts: HashMap<StorePath, usize>,
    /// Roots removed since the file was last rewritten (still listed in it).
    stale: usize,
}

/// This process's temporary roots.
#[derive(Debug)]
pub struct TempRoots {
    dir: PathBuf,
    gc_lock: PathBuf,
    gc_socket: PathBuf,
    inner: Mutex<TempRootsInner>,
}

impl TempRoots {
    pub(crate) fn new(layout: &Layout) -> Self {
        TempRoots {
            dir: layout.temproots_dir(),
            gc_lock: layout.gc_lock_path(),
            gc_socket: layout.gc_socket_path(),
            inner: Mutex::new(TempRootsInner::default()),
        }
    }

    fn file_path(&self) -> PathBuf {
        self.dir.join(std::process::id().to_string())
    }

    fn open_file(&self) -> Result<File> {
        let p = self.file_path();
        loop {
            // A file with our pid is a leftover of a dead process that had our pid.
            let _ = std::fs::remove_file(&p);
            let fd = open_lock_file(&p)?;
            lock_fd(&fd, LockKind::Exclusive, true).map_err(|e| Error::io(&p, "lock", e))?;
            // A collector that found the old file unlocked may have marked ours stale.
            let st = rustix::fs::fstat(&fd).map_err(|e| Error::io(&p, "stat", e))?;
            if st.st_size == 0 {
                return Ok(File::from(fd));
            }
            unlock_fd(&fd);
        }
    }

    /// Adds a root (counted: each add needs a matching remove).
    pub(crate) fn add(&self, store: &LocalStore, p: &StorePath) -> Result<()> {
        self.add_many(store, std::slice::from_ref(p))
    }

    /// Adds several roots with one handshake with any running collector and one write.
    ///
    /// The roots are published first (this process's file, for other processes'
    /// collectors, and the in-memory counts, for its own), and only then is a collector
    /// that is running told of them: one that starts later reads them, and one that was
    /// already running (and may have read the roots before) learns of them as late roots.
    /// The other order — asking first, then publishing — left a window in which a collector
    /// could start, read every root but these, and delete a path the caller was about to
    /// use (found by `adding_a_path_the_collector_is_deleting_waits_and_recreates_it` with
    /// collectors running back to back).
    pub(crate) fn add_many(&self, store: &LocalStore, paths: &[StorePath]) -> Result<()> {
        let (new, probe) = {
            let mut inner = self
                .inner
                .lock()
                .map_err(|_| Error::Corrupt("temp roots lock poisoned".into()))?;
            let mut new = Vec::new();
            for p in paths {
                match inner.counts.get_mut(p) {
                    // Already a root: every collector knows it.
                    Some(n) => *n += 1,
                    None => new.push(p.clone()),
                }
            }
            if new.is_empty() {
                // Already roots, so every collector knows them — but one in this process
                // may be deleting such a path right now: it became a (late) root for
                // another caller after the collector had claimed it, and that caller waits
                // for the files to go before it makes the path again. This caller must
                // wait too, or it finds the path invalid with its old files still there,
                // puts new ones in place and registers them, and the collector then removes
                // those (a valid path without contents: found by 8 clients adding the same
                // `.drv` files while collections ran).
                drop(inner);
                store.gc.note_roots(paths);
                return Ok(());
            }
            if store.db.is_read_only() {
                for p in new {
                    *inner.counts.entry(p).or_default() += 1;
                }
                return Ok(());
            }
            if inner.file.is_none() {
                inner.file = Some(self.open_file()?);
            }
            if inner.gc_lock.is_none() {
                inner.gc_lock = Some(open_lock_file(&self.gc_lock)?);
            }
            if inner.probe.is_none() {
                inner.probe = Some(open_lock_file(&self.gc_lock)?);
            }
            let mut text = Vec::new();
            for p in &new {
                text.extend_from_slice(store.print(p).as_bytes());
                text.push(0);
            }
            if let Some(f) = inner.file.as_mut() {
                f.write_all(&text)
                    .map_err(|e| Error::io(self.file_path(), "write", e))?;
            }
            // Counted once per occurrence, as every add needs a matching remove.
            for p in &new {
                *inner.counts.entry(p.clone()).or_default() += 1;
            }
            let probe = inner
                .probe
                .as_ref()
                .map(|f| f.try_clone())
                .transpose()
                .map_err(|e| Error::io(&self.gc_lock, "duplicate", e))?;
            (new, probe)
        };
        // Our own collector, if one runs, learns of the roots directly (it may make us wait
        // for a deletion in progress: not while holding `inner`, which it reads). All of
        // `paths`, not only the new ones: one that was already a root may be the collector's
        // to delete right now (see above).
        if store.gc.note_roots(paths) {
            return Ok(());
        }
        if let Some(fd) = probe {
            self.coordinate_with_collector(
                &fd,
                &new.iter().map(|p| store.print(p)).collect::<Vec<_>>(),
            )?;
        }
        Ok(())
    }

    /// Waits until no other process's collector can miss the new roots, which are already
    /// published: either no collector runs now (we get `gc.lock` shared: one that starts
    /// later reads them) or the running one acknowledged them over its socket.
    fn coordinate_with_collector(&self, fd: &std::os::fd::OwnedFd, abs: &[String]) -> Result<()> {
        let mut delay = Duration::from_millis(1);
        loop {
            if lock_fd(fd, LockKind::Shared, false)
                .map_err(|e| Error::io(&self.gc_lock, "lock", e))?
            {
                unlock_fd(fd);
                return Ok(());
            }
            let handed_over = abs.iter().all(|a| {
                let Ok(mut s) = kiln_format::unix_socket::connect(&self.gc_socket) else {
                    return false;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                let mut ack = [0u8; 1];
                s.write_all(format!("{a}\n").as_bytes()).is_ok()
                    && s.read_exact(&mut ack).is_ok()
                    && ack[0] == b'1'
            });
            if handed_over {
                return Ok(());
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    pub(crate) fn remove(&self, store: &LocalStore, p: &StorePath) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if let Some(n) = inner.counts.get_mut(p) {
            *n -= 1;
            if *n == 0 {
                inner.counts.remove(p);
                inner.stale += 1;
            }
        }
        // A long-lived process (the daemon) would otherwise keep every root it ever had in
        // its file, and other processes' collectors would never free those paths (Nix's
        // per-client process took its file with it when the client left). Rewriting once
        // stale entries are as many as live ones costs O(1) per removal, amortised, and
        // leaves an idle daemon's file empty.
        if inner.stale > 0 && inner.stale >= inner.counts.len() {
            self.compact(store, &mut inner);
        }
    }

    /// Replaces the file with one listing the live roots only: written and locked under a
    /// hidden name (collectors skip dot files), then renamed over the old one, so a
    /// collector sees either the old file or the complete new one, locked either way.
    /// Only while no collector runs (`gc.lock` held shared): collectors take `gc.lock`
    /// before they read any roots file, so none can hold the old file half-read.
    fn compact(&self, store: &LocalStore, inner: &mut TempRootsInner) {
        let Some(lock) = inner.gc_lock.take() else {
            return;
        };
        if lock_fd(&lock, LockKind::Shared, false).unwrap_or(false) {
            self.replace_file(store, inner);
            unlock_fd(&lock);
        }
        inner.gc_lock = Some(lock);
    }

    fn replace_file(&self, store: &LocalStore, inner: &mut TempRootsInner) {
        let tmp = self.dir.join(format!(".compact-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let fresh = (|| -> Result<File> {
            let fd = open_lock_file(&tmp)?;
            lock_fd(&fd, LockKind::Exclusive, true).map_err(|e| Error::io(&tmp, "lock", e))?;
            let mut f = File::from(fd);
            let mut text = Vec::new();
            for p in inner.counts.keys() {
                text.extend_from_slice(store.print(p).as_bytes());
                text.push(0);
            }
            f.write_all(&text)
                .map_err(|e| Error::io(&tmp, "write", e))?;
            std::fs::rename(&tmp, self.file_path())
                .map_err(|e| Error::io(self.file_path(), "replace", e))?;
            Ok(f)
        })();
        match fresh {
            Ok(f) => {
                // The old file stays locked until the new one has replaced it.
                let _old = inner.file.replace(f);
                inner.stale = 0;
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!("could not compact the temporary roots file: {e}");
            }
        }
    }

    /// The number of entries in this process's file that are no longer roots.
    pub fn stale_entries(&self) -> usize {
        self.inner.lock().map(|i| i.stale).unwrap_or(0)
    }

    /// Whether this process holds a temp root on `p`.
    pub fn contains(&self, p: &StorePath) -> bool {
        self.inner.lock().is_ok_and(|i| i.counts.contains_key(p))
    }

    /// This process's roots.
    pub fn snapshot(&self) -> Vec<StorePath> {
        self.inner
            .lock()
            .map(|i| i.counts.keys().cloned().collect())
            .unwrap_or_default()
    }
}

impl Drop for TempRoots {
    fn drop(&mut self) {
        if let Ok(inner) = self.inner.get_mut() {
            if inner.file.take().is_some() {
                let _ = std::fs::remove_file(self.file_path());
            }
        }
    }
}
