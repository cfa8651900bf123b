//! Copying store paths into a binary cache (`kiln copy --to`), laid out as Nix lays it
//! out: `nix-cache-info`, `HASH.narinfo`, `nar/FILEHASH.nar.EXT`.

use std::io::{BufWriter, Write};
use std::sync::Mutex;

use kiln_format::hash::{HashSink, Hasher};
use kiln_format::narinfo::NarInfo;
use kiln_format::signature::SecretKey;
use kiln_format::{nar, HashAlgo, StorePath};
use kiln_store::LocalStore;

use crate::cache::CacheInfo;
use crate::compression;
use crate::transport::{Timeouts, Transport};
use crate::url::CacheUrl;
use crate::{Error, Result};

/// How paths are written.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// `xz` (Nix's default), `zstd`, `bzip2`, `br`, `gzip` or `none`; the URL's
    /// `?compression=` wins.
    pub compression: String,
    pub level: Option<i32>,
    /// Narinfo files are signed with each.
    pub keys: Vec<SecretKey>,
    /// Paths compressed at once.
    pub jobs: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            compression: "xz".into(),
            level: None,
            keys: Vec::new(),
            jobs: 2,
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    pub copied: usize,
    /// Already in the cache (its narinfo exists).
    pub present: usize,
    pub nar_bytes: u64,
    pub file_bytes: u64,
}

/// Writes what passes through to `inner` and hashes it.
struct Tee<'a, W: Write> {
    inner: &'a mut W,
    sink: HashSink,
}

impl<W: Write> Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sink.write_all(&buf[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Counts and hashes a compressed file as it is written.
struct FileSink<W: Write> {
    inner: W,
    hasher: Hasher,
    size: u64,
}

impl<W: Write> Write for FileSink<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Copies the closure of `paths` into the cache at `url`. Paths whose narinfo is already
/// there are left alone. Each NAR is written to a staging file, then moved into place, and
/// its narinfo is written last, so a reader never sees a narinfo without its NAR.
pub fn copy_to(
    store: &LocalStore,
    url: &str,
    paths: &[StorePath],
    opts: &WriteOptions,
    progress: &(dyn Fn(&StorePath, bool) + Sync),
) -> Result<CopyStats> {
    let cu = CacheUrl::parse(url)?;
    let transport = Transport::new(&cu, Timeouts::default());
    let method = cu
        .param("compression")
        .unwrap_or(&opts.compression)
        .to_string();
    if !compression::METHODS.contains(&method.as_str()) {
        return Err(Error::Url {
            url: url.to_string(),
            why: format!("unsupported compression '{method}'"),
        });
    }
    let mut keys = opts.keys.clone();
    if let Some(f) = cu.param("secret-key") {
        let text = std::fs::read_to_string(f).map_err(|e| Error::Url {
            url: url.to_string(),
            why: format!("cannot read secret key '{f}': {e}"),
        })?;
        keys.push(SecretKey::parse(text.trim())?);
    }
    let sd = store.store_dir();
    match transport.get_small("nix-cache-info", 64 << 10)? {
        Some(bytes) => {
            let info = CacheInfo::parse(&String::from_utf8_lossy(&bytes), sd, &cu.base)?;
            if info.store_dir != *sd {
                return Err(Error::Unusable(format!(
                    "binary cache '{}' is for Nix stores with prefix '{}', not '{}'",
                    cu.base,
                    info.store_dir.as_str(),
                    sd.as_str()
                )));
            }
        }
        None => transport.put_bytes(
            "nix-cache-info",
            format!("StoreDir: {}\n", sd.as_str()).as_bytes(),
            "text/x-nix-cache-info",
        )?,
    }
    let closure: Vec<StorePath> = store.closure(paths, false)?.into_iter().collect();
    let stats = Mutex::new(CopyStats::default());
    let first_error = Mutex::new(None);
    let job = |p: &StorePath| -> Result<()> {
        let narinfo_rel = format!("{}.narinfo", p.hash_part());
        if transport.exists(&narinfo_rel)? {
            if let Ok(mut s) = stats.lock() {
                s.present += 1;
            }
            progress(p, false);
            return Ok(());
        }
        let ni = write_nar(store, &transport, p, &method, opts.level, &keys)?;
        transport.put_bytes(
            &narinfo_rel,
            ni.to_text(sd).as_bytes(),
            "text/x-nix-narinfo",
        )?;
        if let Ok(mut s) = stats.lock() {
            s.copied += 1;
            s.nar_bytes += ni.nar_size;
            s.file_bytes += ni.file_size.unwrap_or(0);
        }
        progress(p, true);
        Ok(())
    };
    // The first failure stops the copy.
    crate::for_each_parallel(&closure, opts.jobs, |p| match job(p) {
        Ok(()) => true,
        Err(e) => {
            if let Ok(mut f) = first_error.lock() {
                f.get_or_insert(e);
            }
            false
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    stats
        .into_inner()
        .map_err(|_| Error::Corrupt("copy statistics poisoned".into()))
}

/// Dumps, checks, compresses and stores one path's NAR; returns its narinfo.
fn write_nar(
    store: &LocalStore,
    transport: &Transport,
    p: &StorePath,
    method: &str,
    level: Option<i32>,
    keys: &[SecretKey],
) -> Result<NarInfo> {
    let sd = store.store_dir();
    let info = store.path_info(p)?;
    let scratch = transport.scratch_file()?;
    let io = |e: std::io::Error| Error::Transfer {
        url: scratch.0.display().to_string(),
        action: "write",
        why: e.to_string(),
    };
    let file = std::fs::File::create(&scratch.0).map_err(io)?;
    let sink = FileSink {
        inner: BufWriter::with_capacity(256 << 10, file),
        hasher: Hasher::new(HashAlgo::Sha256),
        size: 0,
    };
    let mut nar_sink = None;
    let real = store.real_path(p);
    let sink = compression::compress(method, level, sink, |w| {
        let mut tee = Tee {
            inner: &mut &mut *w,
            sink: HashSink::new(HashAlgo::Sha256),
        };
        nar::dump(&real, &mut tee)?;
        nar_sink = Some(tee.sink.finish());
        Ok(())
    })?;
    let FileSink {
        inner,
        hasher,
        size: file_size,
    } = sink;
    inner
        .into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    let (nar_hash, nar_size) =
        nar_sink.ok_or_else(|| Error::Corrupt("the NAR was not written".into()))?;
    // The cache must get what the database promises; a path damaged on disk is not
    // published under its recorded hash.
    if nar_hash != info.nar_hash {
        return Err(Error::Corrupt(format!(
            "path '{}' was modified in the store: its NAR hash is {nar_hash}, the database says {} (run 'kiln store verify --check-contents')",
            sd.display(p),
            info.nar_hash
        )));
    }
    let file_hash = hasher.finish();
    let rel = format!(
        "nar/{}.nar{}",
        file_hash.to_base32(),
        compression::extension(method)
    );
    if !transport.exists(&rel)? {
        transport.put(&rel, &scratch.0, "application/x-nix-nar")?;
    }
    let mut ni = NarInfo {
        store_path: p.clone(),
        url: rel,
        compression: if method.is_empty() {
            "none".into()
        } else {
            method.to_string()
        },
        file_hash: Some(file_hash),
        file_size: Some(file_size),
        nar_hash,
        nar_size,
        references: info.references.clone(),
        deriver: info.deriver.clone(),
        system: None,
        sigs: info.sigs.clone(),
        ca: info.ca,
    };
    for k in keys {
        ni.sign(sd, k);
    }
    Ok(ni)
}
