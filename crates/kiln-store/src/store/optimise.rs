//! Hard-link deduplication through `<store>/.links`, compatible with Nix and Guix.
//!
//! Each regular file (and symlink) is hashed as a NAR; `.links/<base32 sha256>` is a hard
//! link to the first file with that content, and later copies are replaced by links to it.
//! The replacement goes through a temporary link in the store root and `rename`, so a file
//! is never missing. The hard-link limit (`EMLINK`) simply stops deduplication of that file.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_format::hash::HashSink;
use kiln_format::nar::NarWriter;
use kiln_format::{HashAlgo, StorePath};
use rustix::fs::{
    fchmod, fstat, futimens, linkat, openat, readlinkat, renameat, statat, unlinkat, AtFlags, Dir,
    FileType, Mode, OFlags, CWD,
};

use super::LocalStore;
use crate::error::{Error, Result};
use crate::fsutil::STORE_MTIME;

/// What an optimisation run achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OptimiseStats {
    pub files_linked: u64,
    pub bytes_freed: u64,
}

fn links_dir(store: &LocalStore) -> PathBuf {
    store.layout().real_store_dir.join(".links")
}

fn open_dir(dir: &impl std::os::fd::AsFd, name: &CStr, p: &Path) -> Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(p, "open directory", e))
}

/// Deduplicates the files of every valid path.
pub fn optimise_store(store: &LocalStore) -> Result<OptimiseStats> {
    let mut total = OptimiseStats::default();
    for p in store.query_all_valid_paths()? {
        store.add_temp_root(&p)?;
        let r = optimise_path(store, &p);
        store.remove_temp_root(&p);
        let s = r?;
        total.files_linked += s.files_linked;
        total.bytes_freed += s.bytes_freed;
    }
    Ok(total)
}

/// Deduplicates the files of one path.
pub fn optimise_path(store: &LocalStore, path: &StorePath) -> Result<OptimiseStats> {
    let links = links_dir(store);
    crate::fsutil::ensure_dir(&links, 0o755)?;
    let store_dir = &store.layout().real_store_dir;
    let sfd = openat(
        CWD,
        store_dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(store_dir, "open", e))?;
    let lfd = openat(
        CWD,
        &links,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(&links, "open", e))?;
    let mut stats = OptimiseStats::default();
    let root = CString::new(path.base_name()).map_err(|_| Error::Invalid("NUL in path".into()))?;
    let root_path = store.real_path(path);
    // (parent fd, name, path) of every node still to visit.
    let mut work: Vec<(std::rc::Rc<OwnedFd>, CString, PathBuf)> =
        vec![(std::rc::Rc::new(sfd), root, root_path)];
    let sfd2 = openat(
        CWD,
        store_dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(store_dir, "open", e))?;
    while let Some((parent, name, p)) = work.pop() {
        let st = match statat(&*parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(e) => return Err(Error::io(&p, "stat", e)),
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let dfd = std::rc::Rc::new(open_dir(&*parent, &name, &p)?);
                for e in Dir::read_from(&*dfd).map_err(|e| Error::io(&p, "read", e))? {
                    let e = e.map_err(|e| Error::io(&p, "read", e))?;
                    let n = e.file_name();
                    if n.to_bytes() == b"." || n.to_bytes() == b".." {
                        continue;
                    }
                    let child = p.join(OsStr::from_bytes(n.to_bytes()));
                    work.push((dfd.clone(), n.to_owned(), child));
                }
            }
            FileType::RegularFile | FileType::Symlink => {
                if st.st_mode & 0o200 != 0
                    && FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                {
                    tracing::warn!("skipping suspicious writable file '{}'", p.display());
                    continue;
                }
                link_one(&parent, &name, &p, &st, &lfd, &sfd2, &mut stats)?;
            }
            _ => {}
        }
    }
    Ok(stats)
}

fn nar_hash_of(parent: &OwnedFd, name: &CStr, p: &Path, st: &rustix::fs::Stat) -> Result<String> {
    let mut sink = HashSink::new(HashAlgo::Sha256);
    let mut w = NarWriter::new(&mut sink).map_err(|e| Error::io(p, "hash", e))?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        let t = readlinkat(parent, name, Vec::new()).map_err(|e| Error::io(p, "read link", e))?;
        w.symlink(t.as_bytes())
            .map_err(|e| Error::io(p, "hash", e))?;
    } else {
        let fd = openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(p, "open", e))?;
        let size = st.st_size as u64;
        w.file_start(st.st_mode & 0o100 != 0, size)
            .map_err(|e| Error::io(p, "hash", e))?;
        let mut f = std::fs::File::from(fd);
        std::io::copy(&mut std::io::Read::take(&mut f, size), w.get_mut())
            .map_err(|e| Error::io(p, "read", e))?;
        w.file_end(size).map_err(|e| Error::io(p, "hash", e))?;
    }
    Ok(sink.finish().0.to_base32())
}

fn link_one(
    parent: &OwnedFd,
    name: &CStr,
    p: &Path,
    st: &rustix::fs::Stat,
    links: &OwnedFd,
    store: &OwnedFd,
    stats: &mut OptimiseStats,
) -> Result<()> {
    let h = nar_hash_of(parent, name, p, st)?;
    let hc = CString::new(h.clone()).map_err(|_| Error::Invalid("bad hash".into()))?;
    let lp = PathBuf::from(".links").join(&h);
    loop {
        match statat(links, &hc, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(lst) => {
                if (lst.st_dev, lst.st_ino) == (st.st_dev, st.st_ino) {
                    return Ok(()); // already linked
                }
                if lst.st_size != st.st_size {
                    tracing::warn!("removing corrupted link '{}'", lp.display());
                    let _ = unlinkat(links, &hc, AtFlags::empty());
                    continue;
                }
                break;
            }
            Err(rustix::io::Errno::NOENT) => {
                match linkat(parent, name, links, &hc, AtFlags::empty()) {
                    Ok(()) => return Ok(()), // first copy of this content
                    Err(rustix::io::Errno::EXIST) => continue,
                    Err(rustix::io::Errno::MLINK) | Err(rustix::io::Errno::NOSPC) => return Ok(()),
                    Err(e) => return Err(Error::io(p, "link into .links", e)),
                }
            }
            Err(e) => return Err(Error::io(&lp, "stat", e)),
        }
    }
    // Replace the file by a link to the shared copy: make a temporary link in the store root,
    // then rename it over the file (the directory must be writable for that moment).
    let tmp = CString::new(format!(
        ".tmp-link-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ))
    .map_err(|_| Error::Invalid("bad temp name".into()))?;
    match linkat(links, &hc, store, &tmp, AtFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::MLINK) => return Ok(()),
        Err(e) => return Err(Error::io(&lp, "link", e)),
    }
    let pst = fstat(parent).map_err(|e| Error::io(p, "stat parent of", e))?;
    let restore_parent = pst.st_mode & 0o200 == 0;
    if restore_parent {
        fchmod(parent, Mode::from_raw_mode((pst.st_mode & 0o7777) | 0o200))
            .map_err(|e| Error::io(p, "make writable the parent of", e))?;
    }
    let r = renameat(store, &tmp, parent, name);
    if restore_parent {
        let _ = fchmod(parent, Mode::from_raw_mode(pst.st_mode & 0o7777));
        let _ = futimens(parent, &STORE_MTIME);
    }
    match r {
        Ok(()) => {
            stats.files_linked += 1;
            if st.st_nlink == 1 {
                stats.bytes_freed += st.st_size as u64;
            }
            Ok(())
        }
        Err(e) => {
            let _ = unlinkat(store, &tmp, AtFlags::empty());
            if e == rustix::io::Errno::MLINK {
                Ok(())
            } else {
                Err(Error::io(p, "replace by a link", e))
            }
        }
    }
}

/// Deletes `.links` entries nothing else links to any more; returns bytes freed.
pub fn remove_unused_links(store: &LocalStore) -> Result<u64> {
    let links = links_dir(store);
    let Ok(rd) = std::fs::read_dir(&links) else {
        return Ok(0);
    };
    let mut freed = 0;
    for e in rd.flatten() {
        let Ok(m) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        use std::os::unix::fs::MetadataExt;
        if m.nlink() == 1 && std::fs::remove_file(e.path()).is_ok() && m.is_file() {
            freed += m.len();
        }
    }
    Ok(freed)
}
