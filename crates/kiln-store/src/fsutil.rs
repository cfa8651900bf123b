//! File-system operations on trees the store owns or is about to own.
//!
//! Everything walks through directory file descriptors with `O_NOFOLLOW`: a tree that a
//! builder could still be changing (a build directory, an output before registration) can
//! swap a directory for a symlink at any moment, and a walk by path name would follow it out
//! of the tree (CVE-2025-46415). Walks are iterative (explicit stacks), never recursive.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    chownat, fchmod, fchown, fstat, futimens, openat, statat, unlinkat, utimensat, AtFlags, Dir,
    FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, CWD,
};

use crate::error::{Error, Result};

/// Modification time of everything in the store.
pub const STORE_MTIME: Timestamps = Timestamps {
    last_access: Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    },
    last_modification: Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    },
};

fn open_dir_at(dir: impl AsFd, name: &CStr, path: &Path) -> Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(path, "open directory", e))
}

fn entries(fd: &OwnedFd, path: &Path) -> Result<Vec<(CString, FileType)>> {
    let mut v = Vec::new();
    for e in Dir::read_from(fd).map_err(|e| Error::io(path, "read directory", e))? {
        let e = e.map_err(|e| Error::io(path, "read directory", e))?;
        let n = e.file_name();
        if n.to_bytes() == b"." || n.to_bytes() == b".." {
            continue;
        }
        v.push((n.to_owned(), e.file_type()));
    }
    Ok(v)
}

fn split(path: &Path) -> Result<(OwnedFd, CString)> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("'{}' has no file name", path.display())))?;
    let pfd = openat(
        CWD,
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(parent, "open directory", e))?;
    let c = CString::new(name.as_bytes())
        .map_err(|_| Error::Invalid(format!("'{}' contains NUL", path.display())))?;
    Ok((pfd, c))
}

/// Removes `path` and everything below it, making directories writable as needed, without
/// ever following a symlink. Returns the bytes freed (sizes of regular files whose last
/// link was removed). A missing path is not an error.
pub fn remove_tree(path: &Path) -> Result<u64> {
    let (pfd, name) = split(path)?;
    remove_tree_at(&pfd, &name, path)
}

/// Opens a directory its owner made unreadable (mode 0000: a daemon that is not root has
/// no override): a path-only descriptor (no symlink followed) pins the inode, its mode is
/// set to 0700 through that descriptor's `/proc` link (the very inode, whatever the name
/// points to by then), and it is reopened from the pinned descriptor.
fn open_unreadable_dir_at(dir: &OwnedFd, name: &CStr, path: &Path) -> Result<OwnedFd> {
    let pinned = openat(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(path, "open directory", e))?;
    use std::os::fd::AsRawFd;
    let link = format!("/proc/self/fd/{}", pinned.as_raw_fd());
    rustix::fs::chmod(link.as_str(), Mode::from_raw_mode(0o700))
        .map_err(|e| Error::io(path, "make readable", e))?;
    openat(
        &pinned,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(path, "open directory", e))
}

/// Removes a build directory. Its top directory is first given to the daemon and made 0000
/// through a descriptor (no symlink followed), so that while the tree is deleted nobody but
/// the daemon can enter it: not another user, not a later build running under the same uid
/// (the CVE-2025-52992 hardening, as Nix's `cleanupBuild`).
pub fn remove_build_tree(path: &Path) -> Result<u64> {
    let (pfd, name) = split(path)?;
    if let Ok(fd) = open_dir_at(&pfd, &name, path) {
        // Taken from the build user first (where it was theirs), so that the 0700 the
        // deletion then sets opens it to the daemon only.
        let _ = rustix::fs::fchown(
            &fd,
            Some(rustix::process::geteuid()),
            Some(rustix::process::getegid()),
        );
        fchmod(&fd, Mode::empty()).map_err(|e| Error::io(path, "seal", e))?;
    }
    remove_tree_at(&pfd, &name, path)
}

/// [`remove_tree`] relative to a directory descriptor.
pub fn remove_tree_at(parent: &OwnedFd, name: &CStr, path: &Path) -> Result<u64> {
    let st = match statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(0),
        Err(e) => return Err(Error::io(path, "stat", e)),
    };
    let mut freed = 0u64;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile && st.st_nlink == 1 {
            freed += st.st_size as u64;
        }
        unlinkat(parent, name, AtFlags::empty()).map_err(|e| Error::io(path, "remove", e))?;
        return Ok(freed);
    }
    // Frames: (directory fd, its path, pending entries).
    struct Frame {
        fd: OwnedFd,
        path: PathBuf,
        pending: Vec<(CString, FileType)>,
    }
    let open = |dir: &OwnedFd, name: &CStr, p: PathBuf| -> Result<Frame> {
        let fd = match open_dir_at(dir, name, &p) {
            Ok(fd) => fd,
            Err(e) => open_unreadable_dir_at(dir, name, &p).map_err(|_| e)?,
        };
        // Entries can only be removed from a writable directory.
        fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(|e| Error::io(&p, "make writable", e))?;
        let pending = entries(&fd, &p)?;
        Ok(Frame {
            fd,
            path: p,
            pending,
        })
    };
    let mut stack = vec![open(parent, name, path.to_path_buf())?];
    while let Some(top) = stack.last_mut() {
        let Some((n, ty)) = top.pending.pop() else {
            let done = stack.pop().expect("non-empty stack");
            let (dir, name) = match stack.last() {
                Some(up) => (
                    &up.fd,
                    CString::new(
                        done.path
                            .file_name()
                            .map(|f| f.as_bytes())
                            .unwrap_or_default(),
                    )
                    .unwrap_or_default(),
                ),
                None => (parent, name.to_owned()),
            };
            unlinkat(dir, &name, AtFlags::REMOVEDIR)
                .map_err(|e| Error::io(&done.path, "remove directory", e))?;
            continue;
        };
        let p = top.path.join(OsStr::from_bytes(n.to_bytes()));
        let ty = if ty == FileType::Unknown {
            match statat(&top.fd, &n, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => FileType::from_raw_mode(st.st_mode),
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(Error::io(&p, "stat", e)),
            }
        } else {
            ty
        };
        if ty == FileType::Directory {
            let f = open(&top.fd, &n, p)?;
            stack.push(f);
        } else {
            if ty == FileType::RegularFile {
                if let Ok(st) = statat(&top.fd, &n, AtFlags::SYMLINK_NOFOLLOW) {
                    if st.st_nlink == 1 {
                        freed += st.st_size as u64;
                    }
                }
            }
            match unlinkat(&top.fd, &n, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(Error::io(&p, "remove", e)),
            }
        }
    }
    Ok(freed)
}

/// A file under `root` that is hard-linked to a file outside it (its link count is higher
/// than the number of its links within the tree), if any. Nothing is followed.
///
/// A tree someone else wrote must not carry such a link into the store: canonicalising it
/// would change the outside file's owner, mode and time, and publish its contents.
pub fn hard_link_out_of(root: &Path) -> Result<Option<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let mut seen: std::collections::HashMap<(u64, u64), (u64, u64, PathBuf)> =
        std::collections::HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).map_err(|e| Error::io(&p, "stat", e))?;
        if m.is_dir() {
            for e in std::fs::read_dir(&p).map_err(|e| Error::io(&p, "read directory", e))? {
                stack.push(e.map_err(|e| Error::io(&p, "read directory", e))?.path());
            }
        } else if m.nlink() > 1 {
            let entry = seen
                .entry((m.dev(), m.ino()))
                .or_insert((0, m.nlink(), p.clone()));
            entry.0 += 1;
        }
    }
    Ok(seen
        .into_values()
        .find(|(within, total, _)| within < total)
        .map(|(_, _, p)| p))
}

/// How [`canonicalise`] treats ownership.
#[derive(Debug, Clone, Copy)]
pub struct Ownership {
    /// Files must be owned by this uid (the build user), or by the target owner already.
    pub expected_uid: Option<u32>,
    /// Chown everything to this owner (the daemon's uid and gid).
    pub target: (u32, u32),
}

/// Gives a store path its canonical metadata, as the reference's `canonicalisePathMetaData`:
/// permissions 0444 / 0555 (no setuid, setgid or sticky bits, no group or world write),
/// modification time 1, no extended attributes or ACLs, owner set to `own.target`. Refuses
/// files of other types (devices, sockets, FIFOs) and files owned by anyone but the build
/// user (that is how a hard link into another user's file is caught). Hard links within the
/// tree are tolerated: an inode already fixed is not checked again.
pub fn canonicalise(path: &Path, own: Ownership) -> Result<()> {
    let (pfd, name) = split(path)?;
    canonicalise_at(&pfd, &name, path, own)
}

/// [`canonicalise`] of `name` in the directory `pfd` (`path` names it in messages).
pub fn canonicalise_at(pfd: &OwnedFd, name: &CStr, path: &Path, own: Ownership) -> Result<()> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    // Open directories: fd, path, entries still to visit.
    type Frame = (OwnedFd, PathBuf, Vec<(CString, FileType)>);
    let mut stack: Vec<Frame> = Vec::new();

    // Handles one node given its parent; returns a directory fd to descend into.
    let mut node = |dir: &OwnedFd, n: &CStr, p: &Path| -> Result<Option<OwnedFd>> {
        let st = statat(dir, n, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| Error::io(p, "stat", e))?;
        let ty = FileType::from_raw_mode(st.st_mode);
        let key = (st.st_dev, st.st_ino);
        if ty != FileType::Directory && st.st_nlink > 1 && !seen.insert(key) {
            return Ok(None); // another link to an inode already canonicalised
        }
        if let Some(uid) = own.expected_uid {
            if st.st_uid != uid && st.st_uid != own.target.0 {
                return Err(Error::Invalid(format!(
                    "invalid ownership on file '{}': owned by uid {}, expected {uid}",
                    p.display(),
                    st.st_uid
                )));
            }
        }
        match ty {
            FileType::Symlink => {
                if st.st_uid != own.target.0 || st.st_gid != own.target.1 {
                    chownat(dir, n, Some(Uid::from_raw(own.target.0)), Some(Gid::from_raw(own.target.1)), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| Error::io(p, "change the owner of", e))?;
                }
                utimensat(dir, n, &STORE_MTIME, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| Error::io(p, "set the modification time of", e))?;
                Ok(None)
            }
            FileType::RegularFile | FileType::Directory => {
                let flags = if ty == FileType::Directory {
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
                } else {
                    // O_PATH would not allow fchmod; a read-only open of a 0000 file fails for
                    // non-root, so open with O_PATH-free read as the owner can.
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK
                };
                let fd = match openat(dir, n, flags, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(rustix::io::Errno::ACCESS) => {
                        // Unreadable file of ours: make it readable first (by name, relative to
                        // the directory descriptor, without following links).
                        rustix::fs::chmodat(dir, n, Mode::from_raw_mode(0o400), AtFlags::empty())
                            .map_err(|e| Error::io(p, "make readable", e))?;
                        openat(dir, n, flags, Mode::empty()).map_err(|e| Error::io(p, "open", e))?
                    }
                    Err(e) => return Err(Error::io(p, "open", e)),
                };
                let st2 = fstat(&fd).map_err(|e| Error::io(p, "stat", e))?;
                if (st2.st_dev, st2.st_ino) != key {
                    return Err(Error::Invalid(format!("'{}' changed while being canonicalised", p.display())));
                }
                remove_xattrs(&fd, p)?;
                if st.st_uid != own.target.0 || st.st_gid != own.target.1 {
                    fchown(&fd, Some(Uid::from_raw(own.target.0)), Some(Gid::from_raw(own.target.1)))
                        .map_err(|e| Error::io(p, "change the owner of", e))?;
                }
                if ty == FileType::Directory {
                    // Mode and time are set after the entries (creating entries needs write
                    // access and changes the mtime); see the caller's second pass.
                    fchmod(&fd, Mode::from_raw_mode(0o755)).map_err(|e| Error::io(p, "set the mode of", e))?;
                    Ok(Some(fd))
                } else {
                    let mode = if st.st_mode & 0o100 != 0 { 0o555 } else { 0o444 };
                    fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| Error::io(p, "set the mode of", e))?;
                    futimens(&fd, &STORE_MTIME).map_err(|e| Error::io(p, "set the modification time of", e))?;
                    Ok(None)
                }
            }
            _ => Err(Error::Invalid(format!(
                "file '{}' has an unsupported type (only regular files, directories and symlinks may be in the store)",
                p.display()
            ))),
        }
    };

    if let Some(fd) = node(pfd, name, path)? {
        let ents = entries(&fd, path)?;
        stack.push((fd, path.to_path_buf(), ents));
    }
    while let Some((fd, p, pending)) = stack.last_mut() {
        match pending.pop() {
            Some((n, _)) => {
                let child = p.join(OsStr::from_bytes(n.to_bytes()));
                if let Some(cfd) = node(fd, &n, &child)? {
                    let ents = entries(&cfd, &child)?;
                    stack.push((cfd, child, ents));
                }
            }
            None => {
                let (fd, p, _) = stack.pop().expect("non-empty stack");
                fchmod(&fd, Mode::from_raw_mode(0o555))
                    .map_err(|e| Error::io(&p, "set the mode of", e))?;
                futimens(&fd, &STORE_MTIME)
                    .map_err(|e| Error::io(&p, "set the modification time of", e))?;
            }
        }
    }
    Ok(())
}

fn remove_xattrs(fd: &OwnedFd, p: &Path) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::flistxattr(fd, &mut buf[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            // File systems without xattrs: nothing to remove.
            Err(rustix::io::Errno::NOTSUP) => return Ok(()),
            Err(e) => return Err(Error::io(p, "list extended attributes of", e)),
        }
        if buf.len() > 1 << 20 {
            return Err(Error::Invalid(format!(
                "'{}' has more than 1 MiB of extended attribute names",
                p.display()
            )));
        }
    };
    for name in buf[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        // Security labels are managed by the kernel/LSM, not by the build: Nix ignores them too.
        if name.starts_with(b"security.selinux") {
            continue;
        }
        let c = CString::new(name).map_err(|_| Error::Invalid("bad xattr name".into()))?;
        rustix::fs::fremovexattr(fd, &c).map_err(|e| {
            Error::io(
                p,
                &format!(
                    "remove extended attribute '{}' of",
                    String::from_utf8_lossy(name)
                ),
                e,
            )
        })?;
    }
    Ok(())
}

/// Makes a tree safe to leave where other users may see it, without canonicalising it:
/// strips setuid, setgid and world-write bits everywhere (CVE-2024-52867, CVE-2025-52992:
/// the outputs of a failed build must not hand anyone a setuid-to-build-user binary or a
/// writable store file). Refuses unsupported file types. Walks by descriptor, never following
/// symlinks.
pub fn make_safe(path: &Path) -> Result<()> {
    let (pfd, name) = split(path)?;
    let mut stack: Vec<(OwnedFd, CString, PathBuf)> = vec![(pfd, name, path.to_path_buf())];
    while let Some((dir, n, p)) = stack.pop() {
        let st = match statat(&dir, &n, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(Error::io(&p, "stat", e)),
        };
        let ty = FileType::from_raw_mode(st.st_mode);
        match ty {
            FileType::Symlink => continue,
            FileType::RegularFile | FileType::Directory => {}
            _ => {
                return Err(Error::Invalid(format!(
                    "file '{}' has an unsupported type",
                    p.display()
                )))
            }
        }
        let safe = st.st_mode & 0o7777 & !(0o4000 | 0o2000 | 0o002);
        rustix::fs::chmodat(&dir, &n, Mode::from_raw_mode(safe), AtFlags::empty())
            .map_err(|e| Error::io(&p, "make safe", e))?;
        if ty == FileType::Directory {
            let fd = open_dir_at(&dir, &n, &p)?;
            for (c, _) in entries(&fd, &p)? {
                let child = p.join(OsStr::from_bytes(c.to_bytes()));
                let dup = rustix::io::fcntl_dupfd_cloexec(&fd, 0)
                    .map_err(|e| Error::io(&p, "duplicate", e))?;
                stack.push((dup, c, child));
            }
        }
    }
    Ok(())
}

/// Creates a directory (and parents) with `mode` if missing.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::io(path, "create directory", e)),
    }
}

/// The size on disk of a tree (sum of regular-file sizes), for statistics.
pub fn tree_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else if m.is_file() {
            total += m.len();
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn remove_tree_handles_readonly_and_does_not_follow_links() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("keep"), "precious").unwrap();
        let t = d.path().join("t");
        std::fs::create_dir_all(t.join("a/b")).unwrap();
        std::fs::write(t.join("a/b/f"), "12345").unwrap();
        std::os::unix::fs::symlink(&victim, t.join("a/link")).unwrap();
        for p in [t.join("a/b"), t.join("a"), t.clone()] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        assert_eq!(remove_tree(&t).unwrap(), 5);
        assert!(!t.exists());
        assert_eq!(
            std::fs::read_to_string(victim.join("keep")).unwrap(),
            "precious"
        );
        assert_eq!(remove_tree(&t).unwrap(), 0);
        // A symlink at the top is removed, not followed.
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&victim, &l).unwrap();
        remove_tree(&l).unwrap();
        assert!(victim.join("keep").exists());
    }

    #[test]
    fn build_trees_with_unreadable_directories_are_removed_and_symlinks_not_followed() {
        // Also as an unprivileged owner (a rootless daemon), who has no override for 0000
        // directories: the test binary runs this test again as `nobody` in a directory
        // it owns.
        const CHILD: &str = "KILN_FSUTIL_TEST_DIR";
        if let Some(dir) = std::env::var_os(CHILD) {
            return remove_build_tree_cases(Path::new(&dir));
        }
        let d = tempfile::tempdir().unwrap();
        remove_build_tree_cases(d.path());
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(d.path(), Some(65534), Some(65534)).unwrap();
        use std::os::unix::process::CommandExt;
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "fsutil::tests::build_trees_with_unreadable_directories_are_removed_and_symlinks_not_followed",
            ])
            .env(CHILD, d.path())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains("1 passed"), "{out}");
    }

    fn remove_build_tree_cases(dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let top = dir.join("build");
        std::fs::create_dir_all(top.join("a/b")).unwrap();
        std::fs::write(top.join("a/b/f"), "x").unwrap();
        let victim = dir.join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("keep"), "k").unwrap();
        let victim_mode = std::fs::metadata(&victim).unwrap().permissions().mode();
        std::os::unix::fs::symlink(&victim, top.join("a/link")).unwrap();
        for p in ["a/b", "a", ""] {
            std::fs::set_permissions(top.join(p), std::fs::Permissions::from_mode(0o000)).unwrap();
        }
        remove_build_tree(&top).unwrap();
        assert!(std::fs::symlink_metadata(&top).is_err());
        // A symlink in its place is removed, not followed.
        std::os::unix::fs::symlink(&victim, &top).unwrap();
        remove_build_tree(&top).unwrap();
        assert!(std::fs::symlink_metadata(&top).is_err());
        let mode = std::fs::metadata(&victim).unwrap().permissions().mode();
        assert_eq!(mode, victim_mode);
        assert_eq!(std::fs::read_to_string(victim.join("keep")).unwrap(), "k");
    }

    #[test]
    fn canonicalise_fixes_metadata() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        std::fs::create_dir_all(t.join("sub")).unwrap();
        std::fs::write(t.join("sub/f"), "x").unwrap();
        std::fs::set_permissions(t.join("sub/f"), std::fs::Permissions::from_mode(0o6777)).unwrap();
        std::fs::write(t.join("g"), "y").unwrap();
        std::fs::set_permissions(t.join("g"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::hard_link(t.join("g"), t.join("g2")).unwrap();
        std::os::unix::fs::symlink("g", t.join("l")).unwrap();
        let me = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        canonicalise(
            &t,
            Ownership {
                expected_uid: Some(me.0),
                target: me,
            },
        )
        .unwrap();
        let m = |p: &str| std::fs::symlink_metadata(t.join(p)).unwrap();
        assert_eq!(m("sub/f").mode() & 0o7777, 0o555);
        assert_eq!(m("g").mode() & 0o7777, 0o444);
        assert_eq!(m("sub").mode() & 0o7777, 0o555);
        assert_eq!(m("").mode() & 0o7777, 0o555);
        for p in ["", "sub", "sub/f", "g", "l"] {
            assert_eq!(m(p).mtime(), 1, "{p}");
        }
        remove_tree(&t).unwrap();
    }

    #[test]
    fn canonicalise_refuses_special_files() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        std::fs::create_dir(&t).unwrap();
        nix::unistd::mkfifo(
            &t.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let me = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        let e = canonicalise(
            &t,
            Ownership {
                expected_uid: None,
                target: me,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unsupported type"), "{e}");
    }
}
