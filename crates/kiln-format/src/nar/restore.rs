//! Restoring a NAR onto disk.
//!
//! Every node is created relative to the file descriptor of the directory that holds it,
//! with `O_CREAT | O_EXCL | O_NOFOLLOW`, `mkdirat` or `symlinkat`, all of which fail if the
//! name exists. Names were validated by the parser (no `/`, `.`, `..`, NUL) and are strictly
//! increasing, so no entry can name an earlier one and nothing is written through a symlink
//! (CVE-2024-45593). On error, whatever was created stays under the target for the caller
//! to remove; nothing is ever created outside it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    fchmod, futimens, mkdirat, openat, symlinkat, utimensat, AtFlags, Mode, OFlags, Timespec,
    Timestamps, CWD,
};

use super::parse::{parse, Limits, NarSink, NarStats};
use crate::Error;

const BUF_SIZE: usize = 256 * 1024;

/// How to restore.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Give every node the store's canonical metadata while restoring: files 0444 (0555 when
    /// executable), directories 0555, modification time 1 (symlinks too). This saves a second
    /// walk over the tree before registration.
    pub canonical: bool,
    pub limits: Limits,
}

/// Modification time of store objects (1 second after the epoch, as Nix and Guix use).
const STORE_MTIME: Timestamps = Timestamps {
    last_access: Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    },
    last_modification: Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    },
};

struct RestoreSink {
    canonical: bool,
    parent: OwnedFd,
    root_name: Vec<u8>,
    /// Open directories, innermost last.
    dirs: Vec<OwnedFd>,
    /// Path of the current directory, for messages.
    cur: PathBuf,
    buf: Vec<u8>,
}

fn io_err(path: &Path, what: &str, e: impl Into<std::io::Error>) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        action: what.to_string(),
        source: e.into(),
    }
}

impl RestoreSink {
    /// Directory fd and name for a node, plus its path for messages.
    fn place<'a>(&'a self, name: Option<&'a [u8]>) -> (&'a OwnedFd, &'a [u8], PathBuf) {
        match name {
            None => (&self.parent, &self.root_name, self.cur.clone()),
            Some(n) => {
                let fd = self.dirs.last().unwrap_or(&self.parent);
                (fd, n, self.cur.join(OsStr::from_bytes(n)))
            }
        }
    }
}

impl NarSink for RestoreSink {
    fn file(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), Error> {
        let (dir, n, path) = self.place(name);
        let mode = match (executable, self.canonical) {
            (true, true) => 0o555,
            (false, true) => 0o444,
            (true, false) => 0o755,
            (false, false) => 0o644,
        };
        let fd = openat(
            dir,
            n,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| io_err(&path, "create file", e))?;
        let mut f = File::from(fd);
        if size > 0 {
            if self.buf.is_empty() {
                self.buf.resize(BUF_SIZE, 0);
            }
            loop {
                let n = match contents.read(&mut self.buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // The parser replaces this with its own positioned error.
                    Err(e) => return Err(io_err(&path, "read contents for", e)),
                };
                f.write_all(&self.buf[..n])
                    .map_err(|e| io_err(&path, "write", e))?;
            }
        }
        if self.canonical {
            futimens(&f, &STORE_MTIME)
                .map_err(|e| io_err(&path, "set the modification time of", e))?;
        }
        Ok(())
    }

    fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), Error> {
        let (dir, n, path) = self.place(name);
        symlinkat(target, dir, n).map_err(|e| io_err(&path, "create symlink", e))?;
        if self.canonical {
            utimensat(dir, n, &STORE_MTIME, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| io_err(&path, "set the modification time of", e))?;
        }
        Ok(())
    }

    fn enter_directory(&mut self, name: Option<&[u8]>) -> Result<(), Error> {
        let (dir, n, path) = self.place(name);
        mkdirat(dir, n, Mode::from_raw_mode(0o755))
            .map_err(|e| io_err(&path, "create directory", e))?;
        let fd = openat(
            dir,
            n,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(&path, "open directory", e))?;
        self.dirs.push(fd);
        self.cur = path;
        Ok(())
    }

    fn leave_directory(&mut self) -> Result<(), Error> {
        let fd = self.dirs.pop();
        if let (true, Some(fd)) = (self.canonical, fd) {
            // Only now: creating the entries needed write permission and changed the mtime.
            fchmod(&fd, Mode::from_raw_mode(0o555))
                .map_err(|e| io_err(&self.cur, "set the mode of", e))?;
            futimens(&fd, &STORE_MTIME)
                .map_err(|e| io_err(&self.cur, "set the modification time of", e))?;
        }
        if !self.dirs.is_empty() {
            self.cur.pop();
        }
        Ok(())
    }
}

/// Restores the NAR read from `r` to `target`, which must not exist (its parent must).
/// Reads exactly one archive. Returns what was restored, including the NAR size.
pub fn restore<R: Read>(target: &Path, r: R) -> Result<NarStats, Error> {
    restore_into(target, r, RestoreOptions::default())
}

/// [`restore`] with options.
pub fn restore_into<R: Read>(target: &Path, r: R, opts: RestoreOptions) -> Result<NarStats, Error> {
    let name = target.file_name().ok_or_else(|| {
        io_err(
            target,
            "restore to",
            std::io::Error::other("target has no file name"),
        )
    })?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let pfd = openat(
        CWD,
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(parent, "open directory", e))?;
    let mut sink = RestoreSink {
        canonical: opts.canonical,
        parent: pfd,
        root_name: name.as_bytes().to_vec(),
        dirs: Vec::new(),
        cur: target.to_path_buf(),
        buf: Vec::new(),
    };
    parse(r, &mut sink, opts.limits)
}
