//! [`Caches`]: the substituter over every configured binary cache.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kiln_format::narinfo::NarInfo;
use kiln_format::realisation::{DrvOutput, Realisation};
use kiln_format::{ContentAddress, StoreDir, StorePath, ValidPathInfo};
use kiln_store::{AddOptions, LocalStore};

use crate::cache::{BinaryCache, DiskCache, Ttl};
use crate::compression;
use crate::transport::Timeouts;
use crate::{Error, Result, SubstConfig, SubstitutableInfo, Substituter};

/// How caches are reached and remembered.
#[derive(Debug, Clone, Default)]
pub struct CachesOptions {
    pub timeouts: Timeouts,
    pub ttl: Ttl,
    /// Where HTTP caches' narinfo lookups are remembered across runs (`None`: memory only).
    pub disk_cache: Option<PathBuf>,
    /// Lookups run at once for a batch query.
    pub query_threads: usize,
}

/// Every cache any request named, opened once and shared (their lookups are cached), and
/// the [`Substituter`] implementation over them.
#[derive(Debug)]
pub struct Caches {
    store_dir: StoreDir,
    opts: CachesOptions,
    /// By URL and the limits it is accessed with.
    open: Mutex<HashMap<CacheKey, Arc<BinaryCache>>>,
    disk: Option<Arc<DiskCache>>,
}

/// Handles on caches kept open at most (beyond those with the caches' own limits).
const MAX_HANDLES: usize = 256;

/// A cache's URL and the limits it is accessed with.
type CacheKey = (String, crate::Limits);

/// A path as one cache offers it, already translated to the local store.
#[derive(Debug, Clone)]
pub struct Offer {
    pub cache: Arc<BinaryCache>,
    pub narinfo: Arc<NarInfo>,
    /// What will be registered: the narinfo's claims about the local path.
    pub info: ValidPathInfo,
}

impl Caches {
    pub fn new(store_dir: StoreDir, opts: CachesOptions) -> Caches {
        let disk = opts
            .disk_cache
            .as_ref()
            .and_then(|p| match DiskCache::open(p) {
                Ok(d) => Some(Arc::new(d)),
                Err(e) => {
                    tracing::warn!("narinfo lookups are not remembered across runs: {e}");
                    None
                }
            });
        Caches {
            store_dir,
            opts,
            open: Mutex::new(HashMap::new()),
            disk,
        }
    }

    /// The caches of a store, set up from its settings (`connect-timeout`,
    /// `stalled-download-timeout`, `download-attempts`, the narinfo TTLs); HTTP lookups are
    /// remembered in `<state>/substituter-cache.sqlite` when the state directory is
    /// writable.
    pub fn for_store(store: &LocalStore, s: &kiln_store::Settings) -> Caches {
        let limits = crate::Limits::from_settings(s);
        let state = &store.layout().state_dir;
        let writable = rustix::fs::access(state, rustix::fs::Access::WRITE_OK).is_ok();
        Caches::new(
            store.store_dir().clone(),
            CachesOptions {
                timeouts: Timeouts {
                    connect: limits.connect,
                    stalled: limits.stalled,
                    attempts: limits.attempts,
                    netrc: match s.get("netrc-file") {
                        "" => None,
                        f => match crate::netrc::Netrc::load(std::path::Path::new(f)) {
                            Ok(n) => n.map(Arc::new),
                            Err(e) => {
                                tracing::warn!("{e}; caches get no credentials");
                                None
                            }
                        },
                    },
                },
                ttl: Ttl {
                    positive: limits.positive_ttl,
                    negative: limits.negative_ttl,
                },
                disk_cache: writable.then(|| state.join("substituter-cache.sqlite")),
                query_threads: 16,
            },
        )
    }

    /// The limits the caches were set up with.
    fn own_limits(&self) -> crate::Limits {
        crate::Limits {
            connect: self.opts.timeouts.connect,
            stalled: self.opts.timeouts.stalled,
            attempts: self.opts.timeouts.attempts,
            positive_ttl: self.opts.ttl.positive,
            negative_ttl: self.opts.ttl.negative,
        }
    }

    /// The cache at `url`, opened on first use.
    pub fn cache(&self, url: &str) -> Result<Arc<BinaryCache>> {
        self.cache_with(url, None)
    }

    /// The cache at `url` accessed with `limits` (`None`: the caches' own). Each set of
    /// limits has its own handle on the cache, opened on first use, so that one client's
    /// `download-attempts` or narinfo TTLs never change another's; all share the lookups
    /// remembered on disk (each reading them with its own TTLs).
    pub fn cache_with(
        &self,
        url: &str,
        limits: Option<&crate::Limits>,
    ) -> Result<Arc<BinaryCache>> {
        let own = self.own_limits();
        let l = limits.copied().unwrap_or(own);
        let key = (url.to_string(), l);
        let mut open = self
            .open
            .lock()
            .map_err(|_| Error::Corrupt("cache table poisoned".into()))?;
        if let Some(c) = open.get(&key) {
            return Ok(c.clone());
        }
        let timeouts = Timeouts {
            connect: l.connect,
            stalled: l.stalled,
            attempts: l.attempts,
            netrc: self.opts.timeouts.netrc.clone(),
        };
        let ttl = Ttl {
            positive: l.positive_ttl,
            negative: l.negative_ttl,
        };
        let c = Arc::new(BinaryCache::open(
            url,
            &self.store_dir,
            timeouts,
            ttl,
            self.disk.clone(),
        )?);
        // Any client may choose its own `connect-timeout`: once there are many handles, one
        // opened for limits other than the caches' own is let go for each new one, rather
        // than all kept for ever (a client sending ever new values would otherwise grow
        // this table without end). Their users hold them meanwhile; the next request opens
        // one again.
        if open.len() >= MAX_HANDLES {
            let other = open.keys().find(|(_, l)| *l != own).cloned();
            if let Some(k) = other {
                open.remove(&k);
            }
        }
        open.insert(key, c.clone());
        Ok(c)
    }

    /// The usable caches of `cfg`, by priority (then in the order given). A cache that
    /// cannot be used is reported through `log` and left out.
    pub fn ordered(&self, cfg: &SubstConfig, log: &dyn Fn(&str)) -> Vec<Arc<BinaryCache>> {
        let mut v = Vec::new();
        for url in &cfg.urls {
            match self
                .cache_with(url, cfg.limits.as_ref())
                .and_then(|c| Ok((c.info()?.priority, c)))
            {
                Ok(pc) => v.push(pc),
                Err(e) => log(&format!("warning: ignoring substituter '{url}': {e}")),
            }
        }
        v.sort_by_key(|(p, _)| *p);
        v.into_iter().map(|(_, c)| c).collect()
    }

    /// What `cache` offers for `path` (`ca`: its content address when known, which lets
    /// a cache of another store directory provide it), if it is trustworthy. An unsigned
    /// offer is reported through `log` only when `fetching` (as nix-daemon warns once, when
    /// it would have substituted, not when it is asked what could be).
    pub fn offer(
        &self,
        cfg: &SubstConfig,
        cache: &Arc<BinaryCache>,
        path: &StorePath,
        ca: Option<&ContentAddress>,
        fetching: bool,
        log: &dyn Fn(&str),
    ) -> Result<Option<Offer>> {
        let sub_sd = cache.store_dir();
        let sub_path = if *sub_sd == self.store_dir {
            path.clone()
        } else if let Some(ca) = ca {
            sub_sd.ca_path(path.name(), ca, &BTreeSet::new(), false)?
        } else {
            // Only content-addressed paths can move between store directories.
            return Ok(None);
        };
        let Some(ni) = cache.narinfo(&sub_path)? else {
            return Ok(None);
        };
        if sub_path != *path && (!ni.references.is_empty() || ni.ca.is_none()) {
            log(&format!(
                "warning: '{}' offers '{}' for '{}', but it is not content-addressed without references",
                cache.url.base,
                sub_sd.display(&sub_path),
                self.store_dir.display(path)
            ));
            return Ok(None);
        }
        let info = ValidPathInfo {
            path: path.clone(),
            deriver: ni.deriver.clone(),
            nar_hash: ni.nar_hash,
            references: ni.references.clone(),
            registration_time: 0,
            nar_size: ni.nar_size,
            ultimate: false,
            sigs: if sub_path == *path {
                ni.sigs.clone()
            } else {
                BTreeSet::new()
            },
            ca: ni.ca,
        };
        // A content address is verified against the contents when the NAR arrives, so
        // it needs no signature; anything else must be signed by a key the user trusts
        // (a cache serving unsigned paths, or a man in the middle, could otherwise hand
        // out arbitrary binaries).
        let trusted = cache.trusted
            || !cfg.require_sigs
            || info.is_content_addressed(&self.store_dir)
            || ni.verify(sub_sd, &cfg.keys);
        if !trusted {
            if fetching {
                log(&format!(
                    "warning: ignoring substitute for '{}' from '{}', as it's not signed by any of the keys in 'trusted-public-keys'",
                    self.store_dir.display(path),
                    cache.url.base
                ));
            }
            return Ok(None);
        }
        Ok(Some(Offer {
            cache: cache.clone(),
            narinfo: ni,
            info,
        }))
    }

    /// Downloads an offer into the store: streamed through decompression, NAR restore
    /// and hashing in one pass; valid only after NarHash, NarSize, the content address
    /// and FileHash/FileSize all matched.
    pub fn download(
        &self,
        store: &LocalStore,
        offer: &Offer,
        repair: bool,
        progress: Option<&crate::ProgressSink>,
    ) -> Result<()> {
        let (mut stream, check) = offer.cache.nar_reporting(&offer.narinfo, progress)?;
        let what = offer.cache.transport().describe(&offer.narinfo.url);
        store.add_nar_checked(
            &offer.info,
            &mut stream,
            AddOptions {
                repair,
                ..Default::default()
            },
            &mut |rest| {
                compression::expect_end(rest, &what)
                    .and_then(|()| check.verify(&offer.narinfo))
                    .map_err(|e| kiln_store::Error::Invalid(e.to_string()))
            },
        )?;
        if let Some(sink) = progress {
            sink(crate::Download::Succeeded {
                url: what,
                size: check.size(),
            });
        }
        // The add leaves a temporary root for its caller; the goal that asked for the path
        // holds its own. Kept, it would make a daemon hold every path it ever substituted
        // alive until it restarts (`nix-store --delete` refused them, GC skipped them).
        store.remove_temp_root(&offer.info.path);
        Ok(())
    }

    /// What the first cache offering `path` offers; `fetching`: asked by a goal about to
    /// fetch it (which says why a cache's offer is refused), not by a query.
    fn query_one(
        &self,
        cfg: &SubstConfig,
        caches: &[Arc<BinaryCache>],
        path: &StorePath,
        ca: Option<&ContentAddress>,
        fetching: bool,
        log: &dyn Fn(&str),
    ) -> std::result::Result<Option<SubstitutableInfo>, String> {
        let mut failures = Vec::new();
        for c in caches {
            match self.offer(cfg, c, path, ca, fetching, log) {
                Ok(Some(o)) => {
                    return Ok(Some(SubstitutableInfo {
                        references: o.info.references,
                        deriver: o.info.deriver,
                        nar_size: o.narinfo.nar_size,
                        download_size: o.narinfo.file_size.unwrap_or(o.narinfo.nar_size),
                        source: c.url.base.clone(),
                    }))
                }
                Ok(None) => {}
                Err(e) => {
                    log(&format!(
                        "warning: cannot query '{}' in '{}': {e}",
                        self.store_dir.display(path),
                        c.url.base
                    ));
                    failures.push(e.to_string());
                }
            }
        }
        if failures.is_empty() {
            Ok(None)
        } else {
            Err(failures.join("; "))
        }
    }
}

impl Caches {
    /// The realisation `cache` holds for `id` (`realisations/<id>.doi`), if it has one this
    /// store can use: of this store directory, for `id`, and (with `require-sigs`) signed
    /// by a trusted key. Nix 2.34 takes any; kiln asks for a signature because a
    /// realisation decides which path a derivation's output is: an unsigned one would let
    /// a cache (or whoever sits between) point the output at any path it holds, however
    /// well that path itself is signed.
    fn realisation(
        &self,
        cfg: &SubstConfig,
        cache: &BinaryCache,
        id: &DrvOutput,
        log: &dyn Fn(&str),
    ) -> Result<Option<Realisation>> {
        if *cache.store_dir() != self.store_dir {
            return Ok(None);
        }
        let rel = format!("realisations/{id}.doi");
        let what = cache.transport().describe(&rel);
        let Some(bytes) = cache
            .transport()
            .get_small(&rel, kiln_format::realisation::MAX_REALISATION_JSON)?
        else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        let r = Realisation::from_json(&text, &what).map_err(|e| Error::Corrupt(e.to_string()))?;
        if r.id != *id {
            return Err(Error::Corrupt(format!(
                "'{what}' is the realisation of '{}', not of '{id}'",
                r.id
            )));
        }
        if cfg.require_sigs && !cache.trusted && !r.verify(&cfg.keys) {
            log(&format!(
                "warning: the realisation '{id}' from '{}' is not signed by any of the keys in 'trusted-public-keys'",
                cache.url.base
            ));
            return Ok(None);
        }
        Ok(Some(r))
    }
}

impl Substituter for Caches {
    fn query_realisations(
        &self,
        cfg: &SubstConfig,
        ids: &[DrvOutput],
        log: &dyn Fn(&str),
    ) -> Result<BTreeMap<DrvOutput, Realisation>> {
        let caches = self.ordered(cfg, log);
        let mut found = BTreeMap::new();
        for id in ids {
            for c in &caches {
                match self.realisation(cfg, c, id, log) {
                    Ok(Some(r)) => {
                        found.insert(id.clone(), r);
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => log(&format!(
                        "warning: looking up the realisation '{id}' in '{}': {e}",
                        c.url.base
                    )),
                }
            }
        }
        Ok(found)
    }

    fn query_to_fetch(
        &self,
        cfg: &SubstConfig,
        path: &StorePath,
        ca: Option<&ContentAddress>,
        log: &dyn Fn(&str),
    ) -> Result<Option<SubstitutableInfo>> {
        let caches = self.ordered(cfg, log);
        self.query_one(cfg, &caches, path, ca, true, log)
            .map_err(Error::Failed)
    }

    /// Looks every path up in the caches in priority order, several lookups at once. A
    /// path a cache failed to answer for (and no other cache has) is left out, except in
    /// a query for one path, where the failure is the error: a substitution goal must tell
    /// a broken cache (fail, unless `--fallback`) from a missing path (build it).
    fn query(
        &self,
        cfg: &SubstConfig,
        paths: &BTreeMap<StorePath, Option<ContentAddress>>,
        log: &dyn Fn(&str),
    ) -> Result<BTreeMap<StorePath, SubstitutableInfo>> {
        let caches = self.ordered(cfg, log);
        if caches.is_empty() || paths.is_empty() {
            return Ok(BTreeMap::new());
        }
        let items: Vec<(&StorePath, &Option<ContentAddress>)> = paths.iter().collect();
        if items.len() == 1 {
            let (p, ca) = items[0];
            return match self.query_one(cfg, &caches, p, ca.as_ref(), false, log) {
                Ok(Some(i)) => Ok(BTreeMap::from([(p.clone(), i)])),
                Ok(None) => Ok(BTreeMap::new()),
                Err(e) => Err(Error::Failed(e)),
            };
        }
        // Lines logged by worker threads are collected and passed on in order.
        let lines = Mutex::new(Vec::new());
        let found = Mutex::new(BTreeMap::new());
        crate::for_each_parallel(&items, self.opts.query_threads, |(p, ca)| {
            let note = |l: &str| {
                if let Ok(mut v) = lines.lock() {
                    v.push(l.to_string());
                }
            };
            if let Ok(Some(info)) = self.query_one(cfg, &caches, p, ca.as_ref(), false, &note) {
                if let Ok(mut f) = found.lock() {
                    f.insert((*p).clone(), info);
                }
            }
            true
        });
        for l in lines.into_inner().unwrap_or_default() {
            log(&l);
        }
        Ok(found.into_inner().unwrap_or_default())
    }

    /// Tries each cache that offers the path, in priority order, until one download is
    /// verified and registered; a failed download leaves nothing in the store and moves
    /// on to the next cache.
    fn fetch(
        &self,
        cfg: &SubstConfig,
        store: &LocalStore,
        path: &StorePath,
        ca: Option<&ContentAddress>,
        repair: bool,
        log: &dyn Fn(&str),
        progress: &crate::ProgressSink,
    ) -> Result<()> {
        let mut failures = Vec::new();
        for c in self.ordered(cfg, log) {
            // The goal's `query_to_fetch` has said why an unsigned offer is refused.
            let offer = match self.offer(cfg, &c, path, ca, false, log) {
                Ok(Some(o)) => o,
                Ok(None) => continue,
                Err(e) => {
                    log(&format!(
                        "error: querying '{}' in '{}' failed: {e}",
                        store.print(path),
                        c.url.base
                    ));
                    failures.push(format!("{}: {e}", c.url.base));
                    continue;
                }
            };
            match self.download(store, &offer, repair, Some(progress)) {
                Ok(()) => return Ok(()),
                // Not a failure: this cache does not have the path after all.
                Err(e @ Error::NarGone { .. }) => log(&format!("warning: {e}")),
                Err(e) => {
                    log(&format!(
                        "error: substituting '{}' from '{}' failed: {e}",
                        store.print(path),
                        c.url.base
                    ));
                    failures.push(format!("{}: {e}", c.url.base));
                }
            }
        }
        // Each failure was said above; the end is worded as nix-daemon words it.
        let msg = format!(
            "path '{}' is required, but there is no substituter that can build it",
            store.print(path)
        );
        Err(if failures.is_empty() {
            Error::Unavailable(msg)
        } else {
            Error::Failed(msg)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use kiln_format::signature::SecretKey;
    use kiln_format::Hash;

    fn id(n: u8, output: &str) -> DrvOutput {
        DrvOutput::new(Hash::sha256(&[n]), output)
    }

    /// Each client's own limits get a handle on a cache, but ever new limits (any client
    /// may choose its `connect-timeout`) do not grow the table of handles without end, and
    /// the handles with the caches' own limits stay.
    #[test]
    fn handles_for_client_limits_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
        let url = format!("file://{}", d.path().display());
        let caches = Caches::new(
            StoreDir::new("/nix/store").unwrap(),
            CachesOptions::default(),
        );
        let own = caches.cache(&url).unwrap();
        let base = crate::Limits {
            connect: std::time::Duration::from_secs(30),
            stalled: std::time::Duration::from_secs(300),
            attempts: 3,
            positive_ttl: std::time::Duration::from_secs(60),
            negative_ttl: std::time::Duration::from_secs(60),
        };
        let first = caches.cache_with(&url, Some(&base)).unwrap();
        assert!(Arc::ptr_eq(
            &first,
            &caches.cache_with(&url, Some(&base)).unwrap()
        ));
        for i in 0..(3 * MAX_HANDLES as u64) {
            let l = crate::Limits {
                connect: std::time::Duration::from_secs(1000 + i),
                ..base
            };
            caches.cache_with(&url, Some(&l)).unwrap();
            assert!(caches.open.lock().unwrap().len() <= MAX_HANDLES);
        }
        assert!(Arc::ptr_eq(&own, &caches.cache(&url).unwrap()));
    }

    /// A client's limits are bounded: `connect-timeout = 18446744073709551615` (which any
    /// client may send) would otherwise make every HTTP connection's deadline overflow the
    /// clock, and the HTTP client panic in the substitution thread.
    #[test]
    fn limits_past_what_a_clock_holds_are_bounded() {
        const CATALOG: kiln_store::config::Catalog =
            kiln_store::config::Catalog(&[crate::settings::SETTINGS]);
        let mut s = kiln_store::Settings::new(CATALOG);
        for n in [
            "connect-timeout",
            "stalled-download-timeout",
            "narinfo-cache-positive-ttl",
            "narinfo-cache-negative-ttl",
        ] {
            s.set(n, &u64::MAX.to_string()).unwrap();
        }
        let l = crate::Limits::from_settings(&s);
        let now = std::time::Instant::now();
        for d in [l.connect, l.stalled, l.positive_ttl, l.negative_ttl] {
            assert!(now.checked_add(d).is_some(), "{d:?}");
            assert!(d.as_secs() < i64::MAX as u64 / 2, "{d:?}");
        }
        assert_eq!(l.connect, std::time::Duration::from_secs(7 * 24 * 3600));
    }

    /// What a cache says an output became is believed only when it is the realisation of
    /// the output asked for, parses, and (with `require-sigs`) is signed by a trusted key:
    /// a cache cannot point an output at a path of its choosing.
    #[test]
    fn realisations_from_a_cache_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        std::fs::create_dir_all(dir.join("realisations")).unwrap();
        std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
        let sd = StoreDir::new("/nix/store").unwrap();
        let out = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello").unwrap();
        let write = |file: &DrvOutput, r: &Realisation| {
            std::fs::write(dir.join(format!("realisations/{file}.doi")), r.to_json()).unwrap();
        };
        let key = SecretKey::generate("test-1").unwrap();
        // One unsigned and one signed, each in its own output's file.
        let (plain, signed, wrong, garbage) =
            (id(1, "out"), id(2, "out"), id(3, "out"), id(4, "out"));
        write(&plain, &Realisation::new(plain.clone(), out.clone()));
        let mut s = Realisation::new(signed.clone(), out.clone());
        s.sign(&key);
        write(&signed, &s);
        // The file of one output holding the realisation of another.
        write(&wrong, &Realisation::new(plain.clone(), out.clone()));
        std::fs::write(dir.join(format!("realisations/{garbage}.doi")), "{\"id\":").unwrap();
        let caches = Caches::new(sd, CachesOptions::default());
        let ask = |require_sigs: bool| {
            let cfg = SubstConfig {
                urls: vec![format!("file://{}", dir.display())],
                keys: vec![key.public()],
                require_sigs,
                limits: None,
            };
            let lines = Mutex::new(Vec::new());
            let found = caches
                .query_realisations(
                    &cfg,
                    &[
                        plain.clone(),
                        signed.clone(),
                        wrong.clone(),
                        garbage.clone(),
                    ],
                    &|l: &str| lines.lock().unwrap().push(l.to_string()),
                )
                .unwrap();
            (found, lines.into_inner().unwrap().join("\n"))
        };
        let (found, log) = ask(false);
        assert_eq!(
            found.keys().cloned().collect::<Vec<_>>(),
            [plain.clone(), signed.clone()],
            "{log}"
        );
        assert!(
            log.contains(&format!(
                "is the realisation of '{plain}', not of '{wrong}'"
            )),
            "{log}"
        );
        assert!(
            log.contains(&format!("looking up the realisation '{garbage}'")),
            "{log}"
        );
        // Signatures required: only the signed one.
        let (found, log) = ask(true);
        assert_eq!(found.keys().collect::<Vec<_>>(), [&signed], "{log}");
        assert_eq!(found[&signed].out_path, out);
        assert!(
            log.contains(&format!("the realisation '{plain}' from '"))
                && log.contains("is not signed"),
            "{log}"
        );
    }
}
