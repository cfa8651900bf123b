//! Garbage-collector roots: temporary roots of running processes, permanent roots
//! (symlinks under `gcroots/`), indirect roots (`gcroots/auto/`) and runtime roots (paths
//! open in running processes).
//!
//! Temporary roots use the files Nix and Guix use: `<state>/temproots/<pid>`, full store
//! paths each followed by a NUL byte, the file write-locked by its owner for as long as it
//! lives. A root is appended while holding `gc.lock` shared; when a collector holds it
//! exclusively, the root is handed to the collector over `<state>/gc-socket/socket` (path,
//! newline; the collector answers `1`) as Nix 2.8 does, and still appended to the file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use kiln_format::{StoreDir, StorePath};

use crate::config::Layout;
use crate::error::{Error, Result};
use crate::lock::{lock_fd, open_lock_file, unlock_fd, LockKind};
use crate::store::LocalStore;

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
        // for a deletion in progress: not while holding `inner`, which it reads).
        if store.gc.note_roots(&new) {
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

/// Roots of other processes (and stale files, removed on the way): `(label, path)`.
pub(crate) fn other_temp_roots(layout: &Layout, sd: &StoreDir) -> Result<Vec<(String, StorePath)>> {
    let dir = layout.temproots_dir();
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(&dir, "read", e)),
    };
    let me = std::process::id().to_string();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == me {
            continue;
        }
        let p = e.path();
        let Ok(fd) = rustix::fs::open(
            &p,
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) else {
            continue;
        };
        // If we can lock it, its owner is gone: the file is stale.
        if lock_fd(&fd, LockKind::Exclusive, false).map_err(|e| Error::io(&p, "lock", e))? {
            tracing::info!("removing stale temporary roots file '{}'", p.display());
            let _ = std::fs::remove_file(&p);
            let mut f = File::from(fd);
            let _ = f.write_all(b"d");
            continue;
        }
        let mut text = Vec::new();
        File::from(fd)
            .read_to_end(&mut text)
            .map_err(|e| Error::io(&p, "read", e))?;
        for item in text.split(|&b| b == 0).filter(|s| !s.is_empty()) {
            if let Ok(sp) = sd.parse_path(&String::from_utf8_lossy(item)) {
                out.push((format!("{{temp:{name}}}"), sp));
            }
        }
    }
    Ok(out)
}

/// Permanent roots: links under `gcroots/` and `profiles/` (`link → store path`). Dangling
/// indirect roots under `gcroots/auto` are removed, as Nix does.
pub fn find_gc_roots(layout: &Layout) -> Result<BTreeMap<String, StorePath>> {
    let sd = &layout.store_dir;
    let mut roots = BTreeMap::new();
    let mut seen_dirs = BTreeSet::new();
    let mut stack = vec![layout.gcroots_dir(), layout.profiles_dir()];
    while let Some(dir) = stack.pop() {
        let canon = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        if !seen_dirs.insert(canon) {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                let Ok(target) = std::fs::read_link(&p) else {
                    continue;
                };
                let target = if target.is_absolute() {
                    target
                } else {
                    dir.join(target)
                };
                let ts = target.to_string_lossy();
                if let Ok((sp, _)) = sd.to_store_path(&ts) {
                    roots.insert(p.to_string_lossy().into_owned(), sp);
                } else if p.starts_with(layout.gcroots_dir().join("auto"))
                    || !ts.starts_with(sd.as_str())
                {
                    // An indirect root: a link to a link (e.g. `result`) that points into the store.
                    match std::fs::read_link(&target) {
                        Ok(t2) => {
                            let t2 = if t2.is_absolute() {
                                t2
                            } else {
                                target.parent().unwrap_or(Path::new("/")).join(t2)
                            };
                            if let Ok((sp, _)) = sd.to_store_path(&t2.to_string_lossy()) {
                                roots.insert(target.to_string_lossy().into_owned(), sp);
                            }
                        }
                        Err(_)
                            if std::fs::symlink_metadata(&target).is_err()
                                && p.starts_with(layout.gcroots_dir().join("auto")) =>
                        {
                            tracing::info!(
                                "removing stale link from '{}' to '{}'",
                                p.display(),
                                target.display()
                            );
                            let _ = std::fs::remove_file(&p);
                        }
                        Err(_) => {
                            if std::fs::metadata(&target).is_ok_and(|m| m.is_dir())
                                && !target.starts_with(sd.as_str())
                            {
                                stack.push(target.clone());
                            }
                        }
                    }
                }
            } else if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                // A regular file named like a store path is a root too.
                let name = e.file_name();
                if let Ok(sp) = StorePath::from_base_name(&name.to_string_lossy()) {
                    roots.insert(p.to_string_lossy().into_owned(), sp);
                }
            }
        }
    }
    Ok(roots)
}

/// Paths used by running processes: `/proc/*/{exe,cwd,fd/*,maps,environ}`.
pub fn find_runtime_roots(sd: &StoreDir) -> Vec<(String, StorePath)> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    let prefix = format!("{}/", sd.as_str());
    for e in procs.flatten() {
        let name = e.file_name();
        if !name.as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let base = e.path();
        let mut push_text = |label: String, text: &[u8]| {
            for sp in scan_store_paths(text, &prefix) {
                out.push((label.clone(), sp));
            }
        };
        for l in ["exe", "cwd"] {
            if let Ok(t) = std::fs::read_link(base.join(l)) {
                push_text(
                    base.join(l).to_string_lossy().into_owned(),
                    t.as_os_str().as_bytes(),
                );
            }
        }
        if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            for fd in fds.flatten() {
                if let Ok(t) = std::fs::read_link(fd.path()) {
                    push_text(
                        fd.path().to_string_lossy().into_owned(),
                        t.as_os_str().as_bytes(),
                    );
                }
            }
        }
        for f in ["maps", "environ"] {
            if let Ok(t) = std::fs::read(base.join(f)) {
                push_text(base.join(f).to_string_lossy().into_owned(), &t);
            }
        }
    }
    out
}

/// Store paths mentioned in `text` (`<store>/<hash>-<name>` followed by a non-name byte).
fn scan_store_paths(text: &[u8], prefix: &str) -> Vec<StorePath> {
    let mut out = Vec::new();
    let p = prefix.as_bytes();
    let mut i = 0;
    while let Some(off) = memfind(&text[i..], p) {
        let start = i + off + p.len();
        let mut end = start;
        while end < text.len()
            && (text[end].is_ascii_alphanumeric() || b"+-._?=".contains(&text[end]))
        {
            end += 1;
        }
        if let Ok(sp) = StorePath::from_base_name(&String::from_utf8_lossy(&text[start..end])) {
            out.push(sp);
        }
        i = end.max(start);
    }
    out
}

fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Makes `link` a permanent root pointing to `path` (`nix-store --add-root` / `AddPermRoot`).
pub fn add_perm_root(layout: &Layout, path: &StorePath, link: &Path) -> Result<PathBuf> {
    let sd = &layout.store_dir;
    let link = make_root_link(sd, &layout.real_store_dir, path, link)?;
    if !link.starts_with(layout.gcroots_dir()) {
        add_indirect_root(layout, &link)?;
    }
    Ok(link)
}

/// Points `link` (made absolute) at `path`, as a root's link is made: never in the store,
/// and never over anything but an older link into the store (a file of the user's named
/// `result` is not replaced). Returns the absolute link; registering it is the caller's.
pub fn make_root_link(
    sd: &kiln_format::StoreDir,
    real_store_dir: &Path,
    path: &StorePath,
    link: &Path,
) -> Result<PathBuf> {
    let link = std::path::absolute(link).map_err(|e| Error::io(link, "resolve", e))?;
    if link.starts_with(sd.as_str()) || link.starts_with(real_store_dir) {
        return Err(Error::Invalid(format!(
            "creating a garbage collector root ({}) in the store is forbidden",
            link.display()
        )));
    }
    if let Ok(meta) = std::fs::symlink_metadata(&link) {
        let points_into_store = meta.file_type().is_symlink()
            && std::fs::read_link(&link).is_ok_and(|t| t.starts_with(sd.as_str()));
        if !points_into_store {
            return Err(Error::Invalid(format!(
                "cannot create symlink '{}'; already exists",
                link.display()
            )));
        }
    }
    replace_symlink(Path::new(&sd.display(path)), &link)?;
    Ok(link)
}

/// Registers `link` as an indirect root: `gcroots/auto/<base32(sha1(link))> → link`.
pub fn add_indirect_root(layout: &Layout, link: &Path) -> Result<()> {
    let h = kiln_format::Hash::of(kiln_format::HashAlgo::Sha1, link.as_os_str().as_bytes());
    let auto = layout.gcroots_dir().join("auto");
    crate::fsutil::ensure_dir(&auto, 0o755)?;
    replace_symlink(link, &auto.join(h.to_base32()))
}

/// Points `link` at `target` atomically (temporary link + rename).
pub fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    let tmp = PathBuf::from(format!(
        "{}.tmp-{}-{}",
        link.display(),
        std::process::id(),
        rand::random::<u32>()
    ));
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| Error::io(&tmp, "create symlink", e))?;
    std::fs::rename(&tmp, link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(link, "create symlink", e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_store_paths_in_text() {
        let t = b"PATH=/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-bash-5/bin:/usr/bin\0X=/nix/store/short\0";
        let v = scan_store_paths(t, "/nix/store/");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name(), "bash-5");
    }
}
