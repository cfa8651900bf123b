//! Writing the NAR of a path on disk.
//!
//! The walk goes through directory file descriptors (`openat`/`O_NOFOLLOW`), so a tree that
//! changes underneath it (a symlink swapped in for a directory) makes the dump fail instead
//! of following the link out of the tree. Directory entries are emitted in byte order.

use std::ffi::CStr;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{fstat, openat, readlinkat, statat, AtFlags, Dir, FileType, Mode, OFlags, CWD};

use super::parse::Limits;
use super::write::NarWriter;
use crate::Error;

const BUF_SIZE: usize = 256 * 1024;

fn io_err(path: &Path, what: &str, e: impl Into<std::io::Error>) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        action: what.to_string(),
        source: e.into(),
    }
}

struct Frame {
    fd: OwnedFd,
    names: Vec<(Vec<u8>, Option<FileType>)>,
    next: usize,
}

struct Dumper<W: Write> {
    w: NarWriter<BufWriter<W>>,
    buf: Vec<u8>,
    path: PathBuf,
}

impl<W: Write> Dumper<W> {
    fn out(&mut self, r: std::io::Result<()>) -> Result<(), Error> {
        r.map_err(|e| io_err(&self.path, "write the archive of", e))
    }

    fn file(&mut self, dir: &impl std::os::fd::AsFd, name: &[u8]) -> Result<(), Error> {
        let fd = openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(&self.path, "open", e))?;
        let st = fstat(&fd).map_err(|e| io_err(&self.path, "stat", e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(io_err(
                &self.path,
                "dump",
                std::io::Error::other("file changed type while being dumped"),
            ));
        }
        let size = st.st_size as u64;
        let executable = st.st_mode & 0o100 != 0;
        let r = self.w.file_start(executable, size);
        self.out(r)?;
        let mut f = File::from(fd);
        let mut left = size;
        // Grown to the largest file seen, up to BUF_SIZE: an output of small files should not
        // pay for zeroing a large buffer.
        let want_buf = size.min(BUF_SIZE as u64) as usize;
        if self.buf.len() < want_buf {
            self.buf
                .resize(want_buf.next_power_of_two().min(BUF_SIZE), 0);
        }
        while left > 0 {
            let want = self.buf.len().min(left.min(usize::MAX as u64) as usize);
            let n = match f.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(io_err(
                        &self.path,
                        "dump",
                        std::io::Error::other("file shrank while being dumped"),
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(&self.path, "read", e)),
            };
            let r = self.w.file_data(&self.buf[..n]);
            self.out(r)?;
            left -= n as u64;
        }
        let r = self.w.file_end(size);
        self.out(r)
    }

    fn symlink(&mut self, dir: &impl std::os::fd::AsFd, name: &[u8]) -> Result<(), Error> {
        let target =
            readlinkat(dir, name, Vec::new()).map_err(|e| io_err(&self.path, "read symlink", e))?;
        let r = self.w.symlink(target.as_bytes());
        self.out(r)
    }

    fn open_dir(
        &mut self,
        dir: &impl std::os::fd::AsFd,
        name: &[u8],
        limits: &Limits,
        depth: usize,
    ) -> Result<Frame, Error> {
        if depth >= limits.max_depth {
            return Err(io_err(
                &self.path,
                "dump",
                std::io::Error::other(format!(
                    "directories nested deeper than {} levels",
                    limits.max_depth
                )),
            ));
        }
        let fd = openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(&self.path, "open directory", e))?;
        let mut names = Vec::new();
        let d = Dir::read_from(&fd).map_err(|e| io_err(&self.path, "read directory", e))?;
        for ent in d {
            let ent = ent.map_err(|e| io_err(&self.path, "read directory", e))?;
            let n: &CStr = ent.file_name();
            let b = n.to_bytes();
            if b == b"." || b == b".." {
                continue;
            }
            let ty = ent.file_type();
            let ty = if ty == FileType::Unknown {
                None
            } else {
                Some(ty)
            };
            names.push((b.to_vec(), ty));
        }
        names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let r = self.w.directory_start();
        self.out(r)?;
        Ok(Frame { fd, names, next: 0 })
    }
}

/// Writes the NAR of `path` (a file, symlink or directory) to `out`.
pub fn dump<W: Write>(path: &Path, out: W) -> Result<(), Error> {
    let limits = Limits::default();
    let w = NarWriter::new(BufWriter::with_capacity(64 * 1024, out))
        .map_err(|e| io_err(path, "write the archive of", e))?;
    let mut d = Dumper {
        w,
        buf: Vec::new(),
        path: path.to_path_buf(),
    };
    let st = statat(CWD, path, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io_err(path, "stat", e))?;
    let root = path.as_os_str().as_bytes();
    let mut stack: Vec<Frame> = Vec::new();
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => d.file(&CWD, root)?,
        FileType::Symlink => d.symlink(&CWD, root)?,
        FileType::Directory => {
            let f = d.open_dir(&CWD, root, &limits, 0)?;
            stack.push(f);
        }
        _ => {
            return Err(io_err(
                path,
                "dump",
                std::io::Error::other("unsupported file type (not a file, directory or symlink)"),
            ))
        }
    }
    while let Some(top) = stack.last_mut() {
        if top.next == top.names.len() {
            stack.pop();
            let r = d.w.directory_end();
            d.out(r)?;
            if !stack.is_empty() {
                let r = d.w.entry_end();
                d.out(r)?;
                d.path.pop();
            }
            continue;
        }
        let (name, ty) = std::mem::take(&mut top.names[top.next]);
        top.next += 1;
        d.path.push(std::ffi::OsStr::from_bytes(&name));
        let r = d.w.entry_start(&name);
        d.out(r)?;
        let ty = match ty {
            Some(t) => t,
            None => {
                let st = statat(&top.fd, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io_err(&d.path, "stat", e))?;
                FileType::from_raw_mode(st.st_mode)
            }
        };
        match ty {
            FileType::RegularFile => {
                let fd = &stack.last().expect("frame just used").fd;
                d.file(fd, &name)?;
            }
            FileType::Symlink => {
                let fd = &stack.last().expect("frame just used").fd;
                d.symlink(fd, &name)?;
            }
            FileType::Directory => {
                let depth = stack.len();
                let fd = &stack.last().expect("frame just used").fd;
                let f = d.open_dir(fd, &name, &limits, depth)?;
                stack.push(f);
                continue; // the entry is closed when this directory ends
            }
            _ => {
                return Err(io_err(
                    &d.path,
                    "dump",
                    std::io::Error::other(
                        "unsupported file type (not a file, directory or symlink)",
                    ),
                ))
            }
        }
        let r = d.w.entry_end();
        d.out(r)?;
        d.path.pop();
    }
    let mut bw = d.w.into_inner();
    bw.flush()
        .map_err(|e| io_err(path, "write the archive of", e))?;
    Ok(())
}

/// The NAR of `path` as bytes (for small trees and tests).
pub fn dump_to_vec(path: &Path) -> Result<Vec<u8>, Error> {
    let mut v = Vec::new();
    dump(path, &mut v)?;
    Ok(v)
}
