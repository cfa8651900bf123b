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
/// no override): a path-only descriptor (no symlink followed) pins the inode, and
/// [`open_pinned_dir`] opens it up to 0700.
fn open_unreadable_dir_at(dir: &OwnedFd, name: &CStr, path: &Path) -> Result<OwnedFd> {
    let pinned = openat(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(path, "open directory", e))?;
    open_pinned_dir(&pinned, 0o700, path)
}

/// Opens the directory `pinned` (an `O_PATH` descriptor) for reading; if its owner made it
/// unreadable, it is first given mode `readable` through the pinned inode's `/proc` link
/// (the very inode, whatever its name points to by then).
fn open_pinned_dir(pinned: &OwnedFd, readable: u32, path: &Path) -> Result<OwnedFd> {
    let open = || {
        openat(
            pinned,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    match open() {
        Err(rustix::io::Errno::ACCESS) => {
            chmod_pinned(pinned, readable, path)?;
            open()
        }
        r => r,
    }
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

/// What removing a non-directory frees, counted as Nix counts it (so that "N store paths
/// deleted, X KiB freed" agrees): its size (a symlink's is its target's length) when it is
/// the last link, or one of two (an optimised file whose other link is in `.links`).
fn freed_by_unlinking(st: &rustix::fs::Stat) -> u64 {
    match st.st_nlink {
        1 | 2 => st.st_size as u64,
        _ => 0,
    }
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
        freed += freed_by_unlinking(&st);
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
            if let Ok(st) = statat(&top.fd, &n, AtFlags::SYMLINK_NOFOLLOW) {
                freed += freed_by_unlinking(&st);
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
    /// Files must be owned by this uid (the build user), or be canonical store inodes of
    /// the target owner already (hard links to inputs).
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
            // The builder's own inodes, or ones that are already canonical store inodes (a
            // hard link to an input). A hard link to any other file — `/etc/shadow` where
            // hard links are not protected — would otherwise have its owner, mode and time
            // changed and its contents published in the store.
            let canonical = st.st_mtime == 1
                && matches!(
                    (ty, st.st_mode & 0o7777),
                    (FileType::Symlink, _)
                        | (FileType::RegularFile, 0o444 | 0o555)
                        | (FileType::Directory, 0o555)
                );
            if st.st_uid != uid && !(st.st_uid == own.target.0 && canonical) {
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
                        // Unreadable file of ours: made readable through a descriptor that
                        // pins the inode just examined (a `chmod` by name would follow a
                        // symlink swapped in meanwhile), then reopened from it.
                        let pinned = openat(dir, n, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
                            .map_err(|e| Error::io(p, "open", e))?;
                        let st = fstat(&pinned).map_err(|e| Error::io(p, "stat", e))?;
                        if (st.st_dev, st.st_ino) != key {
                            return Err(Error::Invalid(format!("'{}' changed while being canonicalised", p.display())));
                        }
                        chmod_pinned(&pinned, 0o400, p)?;
                        reopen_pinned(&pinned, flags - OFlags::NOFOLLOW, p)?
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
/// strips setuid, setgid and world-write bits (CVE-2024-52867, CVE-2025-52992: the outputs
/// of a failed build must not hand anyone a setuid-to-build-user binary or a writable store
/// file). Refuses unsupported file types.
///
/// With `builder` given, only that uid's inodes are changed: a hard link the builder made to
/// somebody else's file, or a directory it did not make, is left exactly as it is — the
/// tree is the builder's, what it links to is not.
///
/// Every inode is pinned by a descriptor opened without following symlinks and changed
/// through that descriptor, never by name: whoever still holds a descriptor into the tree
/// (a fixed-output builder may have passed one out) can swap an entry for a symlink at any
/// moment, and a `chmod` by name would follow it to a file outside (CVE-2025-52993).
pub fn make_safe(path: &Path, builder: Option<u32>) -> Result<()> {
    secure_tree(path, builder, None)
}

/// Hands a build directory kept for the user (`keep-failed`) over to `to` (uid, gid): what
/// [`make_safe`] does, and the builder's own inodes — single-link ones, and directories —
/// change owner, through descriptors (a builder's file with another link, maybe outside the
/// tree, keeps its owner, stripped of its bits all the same). Nothing else is touched: not a hard link to a file
/// the builder does not own (CVE-2021-27851: `/etc/shadow` linked into a kept tree must not
/// be given to the user), not an entry swapped in by a racer, not what a symlink points to.
/// Sockets and FIFOs (a recursive build's socket) are handed over like files.
pub fn hand_over(path: &Path, builder: u32, to: (u32, u32)) -> Result<()> {
    secure_tree(path, Some(builder), Some(to))
}

fn secure_tree(path: &Path, builder: Option<u32>, to: Option<(u32, u32)>) -> Result<()> {
    use std::rc::Rc;
    let (pfd, name) = split(path)?;
    let mut stack: Vec<(Rc<OwnedFd>, CString, PathBuf)> =
        vec![(Rc::new(pfd), name, path.to_path_buf())];
    while let Some((dir, n, p)) = stack.pop() {
        let pinned = match openat(
            &*dir,
            &n,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(Error::io(&p, "open", e)),
        };
        let st = fstat(&pinned).map_err(|e| Error::io(&p, "stat", e))?;
        let ty = FileType::from_raw_mode(st.st_mode);
        let ours = builder.is_none_or(|uid| st.st_uid == uid);
        // Given away only if it is nowhere else: a builder's file with another link outside
        // the tree is not the tree's to give (its bits are stripped all the same).
        let given = ours && (ty == FileType::Directory || st.st_nlink == 1);
        let to_give = if given { to } else { None };
        match ty {
            FileType::RegularFile | FileType::Directory => {}
            FileType::Symlink | FileType::Socket | FileType::Fifo if to.is_some() => {
                chown_pinned(&pinned, to_give, &p)?;
                continue;
            }
            FileType::Symlink => continue,
            _ => {
                return Err(Error::Invalid(format!(
                    "file '{}' has an unsupported type",
                    p.display()
                )))
            }
        }
        if !ours {
            // Not the builder's: neither changed nor entered.
            continue;
        }
        let safe = st.st_mode & 0o7777 & !(0o4000 | 0o2000 | 0o002);
        if safe != st.st_mode & 0o7777 {
            chmod_pinned(&pinned, safe, &p)?;
        }
        chown_pinned(&pinned, to_give, &p)?;
        if ty == FileType::Directory {
            // A directory its owner made unreadable (a daemon that is not root has no
            // override) is opened up for its owner.
            let fd = Rc::new(open_pinned_dir(&pinned, 0o700 | safe, &p)?);
            for (c, _) in entries(&fd, &p)? {
                let child = p.join(OsStr::from_bytes(c.to_bytes()));
                stack.push((fd.clone(), c, child));
            }
        }
    }
    Ok(())
}

/// `chmod` of the very inode `fd` pins (an `O_PATH` descriptor, which `fchmod` refuses),
/// through its `/proc/self/fd` link: nothing is looked up by name in the tree.
fn chmod_pinned(fd: &OwnedFd, mode: u32, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::chmod(link.as_str(), Mode::from_raw_mode(mode))
        .map_err(|e| Error::io(path, "change the mode of", e))
}

/// Opens the very inode an `O_PATH` descriptor pins, with `flags`, through its `/proc`
/// link (which must then be followed: no `O_NOFOLLOW`).
fn reopen_pinned(fd: &OwnedFd, flags: OFlags, path: &Path) -> Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::open(link.as_str(), flags, Mode::empty()).map_err(|e| Error::io(path, "open", e))
}

/// `chown` of the inode `fd` pins (a symlink itself, not its target), if `to` is given.
fn chown_pinned(fd: &OwnedFd, to: Option<(u32, u32)>, path: &Path) -> Result<()> {
    let Some((uid, gid)) = to else {
        return Ok(());
    };
    chownat(
        fd,
        c"",
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| Error::io(path, "change the owner of", e))
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
        // Counted as Nix counts it: the file's 5 bytes and the link's target length.
        assert_eq!(
            remove_tree(&t).unwrap(),
            5 + victim.as_os_str().len() as u64
        );
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

    /// Runs `cases` in a fresh directory, and, as root, again as `nobody` (an unprivileged
    /// owner, as a rootless daemon is, with no override for 0000 files and directories): the
    /// test binary runs the test named `test` again as that user, in a directory it owns.
    fn also_as_nobody(test: &str, cases: fn(&Path)) {
        const CHILD: &str = "KILN_FSUTIL_TEST_DIR";
        if let Some(dir) = std::env::var_os(CHILD) {
            return cases(Path::new(&dir));
        }
        let d = tempfile::tempdir().unwrap();
        cases(d.path());
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(d.path(), Some(65534), Some(65534)).unwrap();
        use std::os::unix::process::CommandExt;
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("fsutil::tests::{test}")])
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

    #[test]
    fn build_trees_with_unreadable_directories_are_removed_and_symlinks_not_followed() {
        also_as_nobody(
            "build_trees_with_unreadable_directories_are_removed_and_symlinks_not_followed",
            remove_build_tree_cases,
        );
    }

    /// A builder's file it made unreadable (mode 0000) is opened up, through the pinned
    /// inode, and canonicalised.
    #[test]
    fn canonicalise_opens_unreadable_files_of_its_own() {
        also_as_nobody("canonicalise_opens_unreadable_files_of_its_own", |dir| {
            let t = dir.join("out");
            std::fs::create_dir(&t).unwrap();
            std::fs::write(t.join("f"), "x").unwrap();
            std::fs::set_permissions(t.join("f"), std::fs::Permissions::from_mode(0o000)).unwrap();
            canonicalise(&t, mine()).unwrap();
            let m = std::fs::metadata(t.join("f")).unwrap();
            assert_eq!((m.mode() & 0o7777, m.mtime()), (0o444, 1));
            assert_eq!(std::fs::read_to_string(t.join("f")).unwrap(), "x");
        });
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

    /// Files this process made, canonicalised as its own.
    fn mine() -> Ownership {
        let me = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        Ownership {
            expected_uid: Some(me.0),
            target: me,
        }
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
        canonicalise(&t, mine()).unwrap();
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

    /// A tree as a builder (uid 5555) leaves it, with a hard link to a root-owned 0666 file
    /// outside (hard links to files one may write are allowed even where hard links are
    /// protected), a symlink to a root-owned directory, a file of another user moved in,
    /// and setuid and world-writable bits. Needs root (to own files as other uids).
    fn builders_tree(d: &Path) -> Option<PathBuf> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return None;
        }
        let victim = d.join("victim");
        std::fs::write(&victim, "secret").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::create_dir(d.join("vdir")).unwrap();
        std::fs::write(d.join("vdir/keep"), "k").unwrap();
        let t = d.join("t");
        std::fs::create_dir_all(t.join("sub")).unwrap();
        std::fs::write(t.join("a"), "a").unwrap();
        std::fs::write(t.join("sub/f"), "f").unwrap();
        std::fs::write(t.join("foreign"), "x").unwrap();
        std::fs::hard_link(&victim, t.join("link")).unwrap();
        std::os::unix::fs::symlink(d.join("vdir"), t.join("sym")).unwrap();
        nix::unistd::mkfifo(
            &t.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        for p in ["", "sub", "sub/f", "a", "sym", "fifo"] {
            std::os::unix::fs::lchown(t.join(p), Some(5555), Some(5555)).unwrap();
        }
        std::os::unix::fs::lchown(t.join("foreign"), Some(7777), Some(7777)).unwrap();
        let mode = |p: &str, m: u32| {
            std::fs::set_permissions(t.join(p), std::fs::Permissions::from_mode(m)).unwrap()
        };
        mode("a", 0o4755);
        // A setuid file of the builder's with two links.
        std::fs::write(t.join("multi"), "m").unwrap();
        std::os::unix::fs::lchown(t.join("multi"), Some(5555), Some(5555)).unwrap();
        mode("multi", 0o4777);
        std::fs::hard_link(t.join("multi"), t.join("multi2")).unwrap();
        mode("sub", 0o777);
        mode("sub/f", 0o666);
        mode("foreign", 0o4777);
        Some(t)
    }

    fn untouched_outside(d: &Path) {
        let v = std::fs::metadata(d.join("victim")).unwrap();
        assert_eq!((v.uid(), v.mode() & 0o7777, v.nlink()), (0, 0o666, 2));
        let k = std::fs::metadata(d.join("vdir/keep")).unwrap();
        assert_eq!(k.uid(), 0);
    }

    #[test]
    fn hand_over_gives_the_builder_s_inodes_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let Some(t) = builders_tree(d.path()) else {
            return;
        };
        hand_over(&t, 5555, (6666, 6667)).unwrap();
        let m = |p: &str| std::fs::symlink_metadata(t.join(p)).unwrap();
        for p in ["", "sub", "sub/f", "a", "sym", "fifo"] {
            assert_eq!((m(p).uid(), m(p).gid()), (6666, 6667), "{p}");
        }
        assert_eq!(m("a").mode() & 0o7777, 0o755);
        assert_eq!(m("sub").mode() & 0o7777, 0o775);
        assert_eq!(m("sub/f").mode() & 0o7777, 0o664);
        // Another user's file is not the builder's to give or to change.
        assert_eq!(
            (m("foreign").uid(), m("foreign").mode() & 0o7777),
            (7777, 0o4777)
        );
        // The builder's file with two links is made safe but not given away.
        assert_eq!(
            (m("multi").uid(), m("multi").mode() & 0o7777),
            (5555, 0o775)
        );
        untouched_outside(d.path());
    }

    #[test]
    fn make_safe_changes_only_the_builder_s_inodes() {
        let d = tempfile::tempdir().unwrap();
        let Some(t) = builders_tree(d.path()) else {
            return;
        };
        let e = make_safe(&t, Some(5555)).unwrap_err().to_string();
        assert!(e.contains("unsupported type"), "{e}");
        std::fs::remove_file(t.join("fifo")).unwrap();
        make_safe(&t, Some(5555)).unwrap();
        let m = |p: &str| std::fs::symlink_metadata(t.join(p)).unwrap();
        assert_eq!((m("a").uid(), m("a").mode() & 0o7777), (5555, 0o755));
        assert_eq!(m("multi").mode() & 0o7777, 0o775);
        assert_eq!(m("sub").mode() & 0o7777, 0o775);
        assert_eq!(m("foreign").mode() & 0o7777, 0o4777);
        untouched_outside(d.path());
    }

    /// While the hand-over runs, a racer keeps swapping a directory of the tree for a
    /// symlink to a root-owned directory outside: a walk by name would follow it and give
    /// the outside file away (CVE-2025-52993's race). Each round hands the tree back.
    #[test]
    fn hand_over_is_not_led_outside_by_a_racer() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let d = tempfile::tempdir().unwrap();
        let Some(t) = builders_tree(d.path()) else {
            return;
        };
        let (real, sym, spare) = (t.join("d"), t.join("d.sym"), t.join("d.real"));
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::lchown(&real, Some(5555), Some(5555)).unwrap();
        // The same names on both sides: every entry is a window between a check on the
        // builder's file and an act that could land on root's.
        for i in 0..64 {
            let (mine, theirs) = (
                real.join(format!("f{i}")),
                d.path().join(format!("vdir/f{i}")),
            );
            std::fs::write(&mine, "mine").unwrap();
            std::os::unix::fs::lchown(&mine, Some(5555), Some(5555)).unwrap();
            std::fs::write(&theirs, "root's").unwrap();
        }
        std::os::unix::fs::symlink(d.path().join("vdir"), &sym).unwrap();
        let stop = AtomicBool::new(false);
        // Stops the racer however the rounds end (a failed assertion included).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        std::thread::scope(|sc| {
            let _stop = Stop(&stop);
            sc.spawn(|| {
                // d is the directory half the time and the symlink the other half.
                let dwell = || {
                    for _ in 0..200 {
                        std::hint::spin_loop();
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    let _ = std::fs::rename(&real, &spare);
                    let _ = std::fs::rename(&sym, &real);
                    dwell();
                    let _ = std::fs::rename(&real, &sym);
                    let _ = std::fs::rename(&spare, &real);
                    dwell();
                }
            });
            for _ in 0..2000 {
                let _ = hand_over(&t, 5555, (6666, 6666));
                // Back to the builder, by name but never through a symlink: lchown of the
                // names the racer does not touch, and of d's entry only when it is a
                // directory at the moment (the racer never makes `keep` a symlink).
                for p in ["", "sub", "sub/f", "a"] {
                    std::os::unix::fs::lchown(t.join(p), Some(5555), Some(5555)).unwrap();
                }
                // Through a descriptor of the real directory (whichever name it has now),
                // never through the symlink.
                let open = |p: &Path| {
                    openat(
                        CWD,
                        p,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
                        Mode::empty(),
                    )
                };
                if let Ok(dir) = open(&real).or_else(|_| open(&spare)) {
                    use std::os::fd::AsFd;
                    {
                        let _ = fchown(&dir, Some(Uid::from_raw(5555)), Some(Gid::from_raw(5555)));
                        for i in 0..64 {
                            let _ = chownat(
                                dir.as_fd(),
                                format!("f{i}").as_str(),
                                Some(Uid::from_raw(5555)),
                                Some(Gid::from_raw(5555)),
                                AtFlags::SYMLINK_NOFOLLOW,
                            );
                        }
                    }
                }
                untouched_outside(d.path());
            }
        });
        untouched_outside(d.path());
        for e in std::fs::read_dir(d.path().join("vdir")).unwrap() {
            let e = e.unwrap();
            assert_eq!(e.metadata().unwrap().uid(), 0, "{:?}", e.path());
        }
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
