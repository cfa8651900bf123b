//! Garbage-collector roots as collectors find them: other processes' temporary roots
//! (`<state>/temproots/<pid>`, read only while their owners live), permanent roots
//! (symlinks under `gcroots/`), indirect roots (`gcroots/auto/`) and runtime roots (paths
//! open in running processes); and making permanent and indirect roots. This process's own
//! temporary roots, which every add takes, belong to the store core
//! (`crate::store::TempRoots`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_format::{StoreDir, StorePath};

use crate::config::Layout;
use crate::error::{Error, Result};
use crate::lock::{lock_fd, LockKind};

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
