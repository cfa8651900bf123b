//! One binary cache: its `nix-cache-info`, narinfo lookups (cached) and NAR streams.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_format::hash::Hasher;
use kiln_format::narinfo::{NarInfo, MAX_NARINFO_SIZE};
use kiln_format::{HashAlgo, StoreDir, StorePath};

use crate::compression;
use crate::transport::{Stream, Timeouts, Transport};
use crate::url::{CacheUrl, Location};
use crate::{Error, Result};

/// What `nix-cache-info` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: StoreDir,
    pub want_mass_query: bool,
    /// Lower is preferred; Nix's default is 50.
    pub priority: u64,
}

impl CacheInfo {
    /// Parses `nix-cache-info` (`Key: value` lines; unknown keys ignored).
    pub fn parse(text: &str, default_store: &StoreDir, what: &str) -> Result<CacheInfo> {
        let mut info = CacheInfo {
            store_dir: default_store.clone(),
            want_mass_query: false,
            priority: 50,
        };
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim() {
                "StoreDir" => {
                    info.store_dir = StoreDir::new(v)
                        .map_err(|e| Error::Corrupt(format!("'{what}' has a bad StoreDir: {e}")))?
                }
                "WantMassQuery" => info.want_mass_query = v == "1",
                "Priority" => {
                    info.priority = v
                        .parse()
                        .map_err(|_| Error::Corrupt(format!("'{what}' has a bad Priority '{v}'")))?
                }
                _ => {}
            }
        }
        Ok(info)
    }

    pub fn to_text(&self) -> String {
        format!(
            "StoreDir: {}\nWantMassQuery: {}\nPriority: {}\n",
            self.store_dir.as_str(),
            u8::from(self.want_mass_query),
            self.priority
        )
    }
}

/// How long lookups are remembered (Nix's `narinfo-cache-positive-ttl` and
/// `narinfo-cache-negative-ttl`).
#[derive(Debug, Clone, Copy)]
pub struct Ttl {
    pub positive: Duration,
    pub negative: Duration,
}

impl Default for Ttl {
    fn default() -> Self {
        Ttl {
            positive: Duration::from_secs(30 * 24 * 3600),
            negative: Duration::from_secs(3600),
        }
    }
}

/// Entries kept in memory per cache before the table is emptied.
const MEMORY_LIMIT: usize = 200_000;

/// When `nix-cache-info` was fetched, and what came of it.
type InfoSlot = (Instant, std::result::Result<Arc<CacheInfo>, String>);
/// When a narinfo was looked up, and what came of it (`None`: not in the cache).
type Remembered = (Instant, Option<Arc<NarInfo>>);

/// One cache.
#[derive(Debug)]
pub struct BinaryCache {
    pub url: CacheUrl,
    transport: Transport,
    /// The store directory the cache is expected to be for (`?store=` or ours).
    expected_store: StoreDir,
    /// Paths from this cache need no signature (`?trusted=1`).
    pub trusted: bool,
    priority_override: Option<u64>,
    info: Mutex<Option<InfoSlot>>,
    ttl: Ttl,
    memory: Mutex<HashMap<String, Remembered>>,
    disk: Option<Arc<DiskCache>>,
}

/// Checks the compressed file against `FileHash`/`FileSize` as it streams past.
#[derive(Debug, Clone)]
pub struct FileCheck {
    state: Arc<Mutex<(Option<Hasher>, u64)>>,
    what: String,
    /// The size announced for the file, if any.
    size: Option<u64>,
}

struct Counting {
    inner: Stream,
    state: Arc<Mutex<(Option<Hasher>, u64)>>,
    /// Where progress goes, and when it last went.
    report: Option<Reporter>,
}

struct Reporter {
    sink: crate::ProgressSink,
    url: String,
    size: Option<u64>,
    /// When progress was last told (never yet: the first bytes are told at once, as
    /// Guix's rate-limited reporter passes its first call).
    last: Option<std::time::Instant>,
}

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| {
            std::io::Error::new(e.kind(), format!("{}{e}", compression::TRANSFER_ERROR))
        })?;
        let mut total = 0;
        if let Ok(mut s) = self.state.lock() {
            if let Some(h) = &mut s.0 {
                h.update(&buf[..n]);
            }
            s.1 += n as u64;
            total = s.1;
        }
        if let Some(r) = &mut self.report {
            if n > 0
                && r.last
                    .is_none_or(|t| t.elapsed() >= crate::PROGRESS_INTERVAL)
            {
                r.last = Some(std::time::Instant::now());
                (r.sink)(crate::Download::Progress {
                    url: r.url.clone(),
                    size: r.size,
                    transferred: total,
                });
            }
        }
        Ok(n)
    }
}

impl FileCheck {
    /// The file's size as a download's end reports it: announced, or else what arrived.
    pub fn size(&self) -> u64 {
        self.size
            .unwrap_or_else(|| self.state.lock().map(|s| s.1).unwrap_or(0))
    }

    /// Compares what went past with the narinfo's claims.
    pub fn verify(&self, ni: &NarInfo) -> Result<()> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| Error::Corrupt("file check poisoned".into()))?;
        if let Some(want) = ni.file_size {
            if s.1 != want {
                return Err(Error::Corrupt(format!(
                    "'{}' has {} bytes, but its narinfo says FileSize {want}",
                    self.what, s.1
                )));
            }
        }
        if let (Some(want), Some(h)) = (&ni.file_hash, s.0.take()) {
            let got = h.finish();
            if &got != want {
                return Err(Error::Corrupt(format!(
                    "hash mismatch in '{}': FileHash says {want}, got {got}",
                    self.what
                )));
            }
        }
        Ok(())
    }
}

impl BinaryCache {
    /// A cache at `url`; `local_store` is the store directory it must be for unless the
    /// URL says otherwise (`?store=`). Nothing is fetched yet.
    pub fn open(
        url: &str,
        local_store: &StoreDir,
        timeouts: Timeouts,
        ttl: Ttl,
        disk: Option<Arc<DiskCache>>,
    ) -> Result<BinaryCache> {
        let url = CacheUrl::parse(url)?;
        let expected_store = match url.param("store") {
            Some(s) => StoreDir::new(s).map_err(|e| Error::Url {
                url: url.base.clone(),
                why: format!("store={s}: {e}"),
            })?,
            None => local_store.clone(),
        };
        let priority_override = url.param("priority").and_then(|p| p.parse().ok());
        // Local caches change under our feet (and reading them is cheap): no disk cache.
        let disk = match url.location {
            Location::Http(_) => disk,
            Location::File(_) => None,
        };
        Ok(BinaryCache {
            transport: Transport::new(&url, timeouts),
            trusted: url.flag("trusted").unwrap_or(false),
            expected_store,
            priority_override,
            info: Mutex::new(None),
            ttl,
            memory: Mutex::new(HashMap::new()),
            disk,
            url,
        })
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// `nix-cache-info`, fetched once (a failure is retried after a minute).
    pub fn info(&self) -> Result<Arc<CacheInfo>> {
        let mut slot = self
            .info
            .lock()
            .map_err(|_| Error::Corrupt("cache info poisoned".into()))?;
        if let Some((at, r)) = &*slot {
            if r.is_ok() || at.elapsed() < Duration::from_secs(60) {
                return r.clone().map_err(Error::Unusable);
            }
        }
        let r = self.fetch_info().map(Arc::new).map_err(|e| e.to_string());
        *slot = Some((Instant::now(), r.clone()));
        r.map_err(Error::Unusable)
    }

    fn fetch_info(&self) -> Result<CacheInfo> {
        let base = &self.url.base;
        let cached = self.disk.as_ref().and_then(|d| d.cache_info(base));
        let mut info = match cached {
            Some(text) => CacheInfo::parse(&text, &self.expected_store, base)?,
            None => match self.transport.get_small("nix-cache-info", 64 << 10)? {
                Some(bytes) => {
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    let info = CacheInfo::parse(&text, &self.expected_store, base)?;
                    if let Some(d) = &self.disk {
                        d.put_cache_info(base, &info.to_text());
                    }
                    info
                }
                // A local directory without it is an empty cache (Nix creates the file
                // when it first writes); a server without it is not a cache.
                None if matches!(self.url.location, Location::File(_)) => CacheInfo {
                    store_dir: self.expected_store.clone(),
                    want_mass_query: false,
                    priority: 50,
                },
                None => {
                    return Err(Error::Unusable(format!(
                        "'{base}' does not appear to be a binary cache (it has no nix-cache-info)"
                    )))
                }
            },
        };
        if info.store_dir != self.expected_store {
            return Err(Error::Unusable(format!(
                "binary cache '{base}' is for Nix stores with prefix '{}', not '{}'",
                info.store_dir.as_str(),
                self.expected_store.as_str()
            )));
        }
        if let Some(p) = self.priority_override {
            info.priority = p;
        }
        Ok(info)
    }

    /// The store directory of the cache's paths.
    pub fn store_dir(&self) -> &StoreDir {
        &self.expected_store
    }

    /// The narinfo of `path` (a path of the cache's store directory), if the cache has it.
    pub fn narinfo(&self, path: &StorePath) -> Result<Option<Arc<NarInfo>>> {
        let hash_part = path.hash_part().to_string();
        let now = Instant::now();
        if let Ok(m) = self.memory.lock() {
            if let Some((at, v)) = m.get(&hash_part) {
                let ttl = if v.is_some() {
                    self.ttl.positive
                } else {
                    self.ttl.negative
                };
                if now.duration_since(*at) < ttl {
                    return Ok(v.clone());
                }
            }
        }
        let rel = format!("{hash_part}.narinfo");
        let what = self.transport.describe(&rel);
        let from_disk = self
            .disk
            .as_ref()
            .and_then(|d| d.narinfo(&self.url.base, &hash_part, self.ttl));
        let text = match from_disk {
            Some(known) => known,
            None => {
                let t = self
                    .transport
                    .get_small(&rel, MAX_NARINFO_SIZE)?
                    .map(|b| String::from_utf8_lossy(&b).into_owned());
                if let Some(d) = &self.disk {
                    d.put_narinfo(&self.url.base, &hash_part, t.as_deref());
                }
                t
            }
        };
        let parsed = match text {
            None => None,
            Some(t) => {
                let ni = NarInfo::parse(&self.expected_store, &t, &what)?;
                if ni.store_path != *path {
                    return Err(Error::Corrupt(format!(
                        "'{what}' is for '{}', not '{}'",
                        self.expected_store.display(&ni.store_path),
                        self.expected_store.display(path)
                    )));
                }
                Some(Arc::new(ni))
            }
        };
        // Only HTTP lookups are remembered in memory: a local cache may change at any
        // time and is cheap to read again.
        if matches!(self.url.location, Location::Http(_)) {
            if let Ok(mut m) = self.memory.lock() {
                if m.len() >= MEMORY_LIMIT {
                    m.clear();
                }
                m.insert(hash_part, (now, parsed.clone()));
            }
        }
        Ok(parsed)
    }

    /// Opens the NAR a narinfo describes: decompressed, with a [`FileCheck`] to call once
    /// the NAR has been read.
    pub fn nar(&self, ni: &NarInfo) -> Result<(Stream, FileCheck)> {
        self.nar_reporting(ni, None)
    }

    /// [`BinaryCache::nar`], telling `progress` that the download started and, as bytes
    /// arrive, how far it is ([`crate::Download`]); its end is the caller's to tell.
    pub fn nar_reporting(
        &self,
        ni: &NarInfo,
        progress: Option<&crate::ProgressSink>,
    ) -> Result<(Stream, FileCheck)> {
        let what = self.transport.describe(&ni.url);
        let (raw, length) = self
            .transport
            .get_sized(&ni.url)?
            .ok_or_else(|| Error::NarGone {
                file: ni.url.clone(),
            })?;
        // As Guix's substituter announces a size: the file's length, or for an
        // uncompressed NAR its size.
        let size = length.or((ni.compression == "none").then_some(ni.nar_size));
        let report = progress.map(|sink| {
            sink(crate::Download::Started {
                url: what.clone(),
                size,
            });
            Reporter {
                sink: sink.clone(),
                url: what.clone(),
                size,
                last: None,
            }
        });
        let hasher = ni
            .file_hash
            .as_ref()
            .map(|h| h.algo())
            .filter(|a| *a != HashAlgo::Md5)
            .map(Hasher::new);
        let state = Arc::new(Mutex::new((hasher, 0u64)));
        let counting = Counting {
            inner: raw,
            state: state.clone(),
            report,
        };
        let decoded = compression::decoder(&ni.compression, Box::new(counting))?;
        Ok((decoded, FileCheck { state, what, size }))
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Narinfo lookups of HTTP caches remembered across processes and restarts, in a SQLite
/// file (kiln's own schema; Nix keeps the same in `~/.cache/nix/binary-cache-v6.sqlite`).
#[derive(Debug)]
pub struct DiskCache {
    path: PathBuf,
    conn: Mutex<rusqlite::Connection>,
}

impl DiskCache {
    pub fn open(path: &Path) -> Result<DiskCache> {
        let err = |source| Error::Db {
            path: path.display().to_string(),
            source,
        };
        let conn = rusqlite::Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS Caches (
                 url TEXT PRIMARY KEY NOT NULL,
                 info TEXT NOT NULL,
                 timestamp INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS NarInfos (
                 cache TEXT NOT NULL,
                 hashPart TEXT NOT NULL,
                 narinfo TEXT,
                 timestamp INTEGER NOT NULL,
                 PRIMARY KEY (cache, hashPart));",
        )
        .map_err(err)?;
        Ok(DiskCache {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn warn(&self, e: rusqlite::Error) {
        tracing::warn!("narinfo cache '{}': {e}", self.path.display());
    }

    /// A cached cache-info (a week, as Nix keeps it).
    fn cache_info(&self, url: &str) -> Option<String> {
        let conn = self.conn.lock().ok()?;
        conn.query_row(
            "SELECT info FROM Caches WHERE url = ?1 AND timestamp > ?2",
            rusqlite::params![url, unix_now() - 7 * 24 * 3600],
            |r| r.get(0),
        )
        .ok()
    }

    fn put_cache_info(&self, url: &str, info: &str) {
        let Ok(conn) = self.conn.lock() else { return };
        if let Err(e) = conn.execute(
            "INSERT OR REPLACE INTO Caches (url, info, timestamp) VALUES (?1, ?2, ?3)",
            rusqlite::params![url, info, unix_now()],
        ) {
            self.warn(e);
        }
    }

    /// `Some(Some(text))` for a fresh positive entry, `Some(None)` for a fresh negative
    /// one, `None` when unknown or stale.
    fn narinfo(&self, url: &str, hash_part: &str, ttl: Ttl) -> Option<Option<String>> {
        let conn = self.conn.lock().ok()?;
        let (text, at): (Option<String>, i64) = conn
            .query_row(
                "SELECT narinfo, timestamp FROM NarInfos WHERE cache = ?1 AND hashPart = ?2",
                rusqlite::params![url, hash_part],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ok()?;
        let ttl = if text.is_some() {
            ttl.positive
        } else {
            ttl.negative
        };
        (unix_now() - at < ttl.as_secs() as i64).then_some(text)
    }

    fn put_narinfo(&self, url: &str, hash_part: &str, text: Option<&str>) {
        let Ok(conn) = self.conn.lock() else { return };
        if let Err(e) = conn.execute(
            "INSERT OR REPLACE INTO NarInfos (cache, hashPart, narinfo, timestamp)
             VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![url, hash_part, text, unix_now()],
        ) {
            self.warn(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_info_parses_and_refuses_nonsense() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let i = CacheInfo::parse(
            "StoreDir: /gnu/store\nWantMassQuery: 1\nPriority: 40\nOther: x\n",
            &sd,
            "c",
        )
        .unwrap();
        assert_eq!(i.store_dir.as_str(), "/gnu/store");
        assert!(i.want_mass_query);
        assert_eq!(i.priority, 40);
        assert_eq!(CacheInfo::parse(&i.to_text(), &sd, "c").unwrap(), i);
        // Defaults: the expected store, priority 50.
        let d = CacheInfo::parse("", &sd, "c").unwrap();
        assert_eq!((d.store_dir.as_str(), d.priority), ("/nix/store", 50));
        let e = CacheInfo::parse("Priority: high\n", &sd, "c").unwrap_err();
        assert!(e.to_string().contains("bad Priority 'high'"), "{e}");
        let e = CacheInfo::parse("StoreDir: relative\n", &sd, "c").unwrap_err();
        assert!(e.to_string().contains("bad StoreDir"), "{e}");
    }

    #[test]
    fn disk_cache_remembers_answers_for_their_ttl() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&d.path().join("c.sqlite")).unwrap();
        let long = Ttl::default();
        assert_eq!(c.narinfo("http://c", "aaa", long), None);
        c.put_narinfo("http://c", "aaa", Some("StorePath: x\n"));
        c.put_narinfo("http://c", "bbb", None);
        assert_eq!(
            c.narinfo("http://c", "aaa", long),
            Some(Some("StorePath: x\n".to_string()))
        );
        assert_eq!(c.narinfo("http://c", "bbb", long), Some(None));
        assert_eq!(c.narinfo("http://other", "aaa", long), None);
        // Expired entries are unknown again.
        let none = Ttl {
            positive: Duration::ZERO,
            negative: Duration::ZERO,
        };
        assert_eq!(c.narinfo("http://c", "aaa", none), None);
        assert_eq!(c.narinfo("http://c", "bbb", none), None);
        // It survives reopening.
        drop(c);
        let c = DiskCache::open(&d.path().join("c.sqlite")).unwrap();
        assert_eq!(c.narinfo("http://c", "bbb", long), Some(None));
        c.put_cache_info("http://c", "StoreDir: /nix/store\n");
        assert_eq!(
            c.cache_info("http://c").as_deref(),
            Some("StoreDir: /nix/store\n")
        );
    }
}
