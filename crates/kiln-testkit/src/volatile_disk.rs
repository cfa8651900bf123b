//! A disk with a volatile write cache, for power-cut tests: a FUSE file system holding one
//! file, `disk`, whose writes are kept in memory until an `fsync` makes them durable in a
//! backing image. [`VolatileDisk::cut`] is the power cut: every write since the last
//! `fsync` is lost (or, with [`VolatileDisk::cut_keeping`], a random part of them, as a
//! real disk's cache may have written out some).
//!
//! A loop device on `disk` turns a file system's flushes (what `fsync`, `fdatasync` and
//! `syncfs` of files on it cause) into `fsync`s of `disk`: the kernel's loop driver
//! flushes its backing file on every flush request. So an ext4 mounted from that loop
//! device behaves as on a real disk whose cache loses power, with nothing in kiln changed
//! for the test. (A FUSE layer under the store itself, as LazyFS is, cannot see `syncfs`:
//! the kernel does not pass it to FUSE file systems, so it would lose data kiln had made
//! durable.) After the cut, mount the backing image (its own loop device): ext4 replays its
//! journal as after a real power loss.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request,
};

const PAGE: u64 = 4096;
const ROOT: u64 = 1;
const DISK: u64 = 2;
const TTL: Duration = Duration::from_secs(3600);

/// What the disk holds: the durable image, and the pages written since the last flush.
struct State {
    image: File,
    size: u64,
    cache: BTreeMap<u64, Vec<u8>>,
    /// After a cut, writes go nowhere (the power is off).
    dead: bool,
    flushes: u64,
}

impl State {
    /// The page at `index` as the disk would answer a read.
    fn page(&self, index: u64) -> std::io::Result<Vec<u8>> {
        if let Some(p) = self.cache.get(&index) {
            return Ok(p.clone());
        }
        let mut buf = vec![0u8; PAGE as usize];
        let off = index * PAGE;
        let n = (self.size.saturating_sub(off)).min(PAGE) as usize;
        self.image.read_exact_at(&mut buf[..n], off)?;
        Ok(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.dead {
            return Ok(());
        }
        for (i, p) in std::mem::take(&mut self.cache) {
            self.image.write_all_at(&p, i * PAGE)?;
        }
        self.image.sync_data()?;
        self.flushes += 1;
        Ok(())
    }
}

struct Fs(Arc<Mutex<State>>);

impl Fs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let size = self.0.lock().ok()?.size;
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o755, 0, 2),
            DISK => (FileType::RegularFile, 0o600, size, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }
}

impl Filesystem for Fs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match (parent, name.to_str()) {
            (ROOT, Some("disk")) => match self.attr(DISK) {
                Some(a) => reply.entry(&TTL, &a, 0),
                None => reply.error(libc_eio()),
            },
            _ => reply.error(2),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(2),
        }
    }

    fn open(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.opened(0, 0);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Ok(s) = self.0.lock() else {
            return reply.error(libc_eio());
        };
        let start = (offset.max(0) as u64).min(s.size);
        let end = (start + size as u64).min(s.size);
        let mut out = Vec::with_capacity((end - start) as usize);
        let mut pos = start;
        while pos < end {
            let (i, within) = (pos / PAGE, pos % PAGE);
            let take = (PAGE - within).min(end - pos);
            match s.page(i) {
                Ok(p) => out.extend_from_slice(&p[within as usize..(within + take) as usize]),
                Err(_) => return reply.error(libc_eio()),
            }
            pos += take;
        }
        reply.data(&out);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Ok(mut s) = self.0.lock() else {
            return reply.error(libc_eio());
        };
        let start = offset.max(0) as u64;
        if start + data.len() as u64 > s.size {
            return reply.error(28); // ENOSPC: the disk has a fixed size
        }
        if s.dead {
            return reply.written(data.len() as u32);
        }
        let mut pos = start;
        let mut rest = data;
        while !rest.is_empty() {
            let (i, within) = (pos / PAGE, pos % PAGE);
            let take = ((PAGE - within) as usize).min(rest.len());
            let mut p = match s.page(i) {
                Ok(p) => p,
                Err(_) => return reply.error(libc_eio()),
            };
            p[within as usize..within as usize + take].copy_from_slice(&rest[..take]);
            s.cache.insert(i, p);
            pos += take as u64;
            rest = &rest[take..];
        }
        reply.written(data.len() as u32);
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a barrier.
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.0.lock().map(|mut s| s.flush()) {
            Ok(Ok(())) => reply.ok(),
            _ => reply.error(libc_eio()),
        }
    }
}

fn libc_eio() -> i32 {
    5
}

/// A mounted volatile disk; unmounted when dropped.
pub struct VolatileDisk {
    state: Arc<Mutex<State>>,
    _session: fuser::BackgroundSession,
    /// The file to put a loop device on.
    pub file: std::path::PathBuf,
}

impl std::fmt::Debug for VolatileDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolatileDisk({})", self.file.display())
    }
}

impl VolatileDisk {
    /// Serves `image` (its current contents are the durable state) as `MOUNTPOINT/disk`.
    pub fn start(image: &Path, mountpoint: &Path) -> std::io::Result<VolatileDisk> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image)?;
        let size = f.metadata()?.len();
        let state = Arc::new(Mutex::new(State {
            image: f,
            size,
            cache: BTreeMap::new(),
            dead: false,
            flushes: 0,
        }));
        let session = fuser::spawn_mount2(
            Fs(state.clone()),
            mountpoint,
            &[
                MountOption::FSName("kiln-volatile-disk".into()),
                MountOption::AllowOther,
            ],
        )?;
        Ok(VolatileDisk {
            state,
            _session: session,
            file: mountpoint.join("disk"),
        })
    }

    /// The power cut: every write since the last flush is lost; nothing written later
    /// arrives.
    pub fn cut(&self) {
        self.cut_keeping(0, 0);
    }

    /// A power cut after which each unflushed page reached the image with probability
    /// `keep_percent` (chosen from `seed`): a disk cache may write out any part of what it
    /// holds, in any order.
    pub fn cut_keeping(&self, keep_percent: u64, seed: u64) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        let mut x = seed | 1;
        let cache = std::mem::take(&mut s.cache);
        for (i, p) in cache {
            // xorshift: a reproducible choice per seed.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 100 < keep_percent {
                let _ = s.image.write_all_at(&p, i * PAGE);
            }
        }
        let _ = s.image.sync_data();
        s.dead = true;
    }

    /// Flushes seen so far (barriers the file system above asked for).
    pub fn flushes(&self) -> u64 {
        self.state.lock().map(|s| s.flushes).unwrap_or(0)
    }

    /// Pages written and not yet flushed.
    pub fn unflushed_pages(&self) -> usize {
        self.state.lock().map(|s| s.cache.len()).unwrap_or(0)
    }
}
