//! Binary caches: the format the Nix and Guix ecosystems share for distributing build
//! results, read and written by kiln.
//!
//! * [`url`]: cache URLs (`file://DIR`, `http://…`, `https://…`) and their parameters
//!   (`priority`, `trusted`, `store`, `compression`, `secret-key`).
//! * [`transport`]: fetching and storing files of a cache; HTTP through a pooled agent with
//!   per-read timeouts, retries for transient failures.
//! * [`compression`]: streaming decoders and encoders for `none`, `xz`, `bzip2`, `zstd`,
//!   `br` and `gzip`.
//! * [`cache`]: one cache: `nix-cache-info`, narinfo lookup with positive and negative
//!   caching (in memory and, for HTTP caches, in a SQLite file that survives restarts),
//!   and NAR streams verified against `FileHash`/`FileSize`.
//! * [`caches`]: [`Caches`], the [`Substituter`] the build engine uses: several caches in
//!   priority order, signature checks, streaming into the store (restore + hash in one
//!   pass, nothing valid before it is verified).
//! * [`agent`]: the reference's external substituter protocol (`guix substitute`), as
//!   another [`Substituter`] (`substitute-agent`).
//! * [`write`]: copying store paths into a cache (`kiln copy --to`).
//! * [`serve`]: serving a store as a binary cache over HTTP (`kiln serve`).
//!
//! Every byte a cache sends is untrusted: narinfo files are bounded and parsed strictly,
//! NARs go through the bounded NAR parser into a temporary store path, and a path becomes
//! valid only after its NAR hash and size (and content address, if it claims one) matched.
#![forbid(unsafe_code)]

pub mod agent;
pub mod cache;
pub mod caches;
pub mod compression;
mod error;
pub mod netrc;
pub mod serve;
pub mod settings;
pub mod transport;
pub mod url;
pub mod write;

use std::collections::{BTreeMap, BTreeSet};

use kiln_format::realisation::{DrvOutput, Realisation};
use kiln_format::signature::PublicKey;
use kiln_format::{ContentAddress, StorePath};
use kiln_store::LocalStore;

pub use agent::Agent;
pub use caches::Caches;
pub use error::{Error, Result};

/// What a substituter knows about a path it can provide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubstitutableInfo {
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub nar_size: u64,
    pub download_size: u64,
    /// The cache that has it (its URL as configured; empty when the substituter does not
    /// say, as an external agent does not).
    pub source: String,
}

/// Which caches a request may use and whom it trusts (from its settings: `substituters`,
/// `trusted-public-keys`, `require-sigs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubstConfig {
    pub urls: Vec<String>,
    pub keys: Vec<PublicKey>,
    pub require_sigs: bool,
    /// How this request's transfers and lookups behave (a trusted client's own
    /// `download-attempts`, `stalled-download-timeout`, narinfo TTLs…); `None`: as the
    /// caches were set up.
    pub limits: Option<Limits>,
}

/// The per-request knobs of cache access: `connect-timeout`, `stalled-download-timeout`,
/// `download-attempts`, `narinfo-cache-positive-ttl` and `narinfo-cache-negative-ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    pub connect: std::time::Duration,
    pub stalled: std::time::Duration,
    pub attempts: u32,
    pub positive_ttl: std::time::Duration,
    pub negative_ttl: std::time::Duration,
}

impl Limits {
    /// The limits `s` sets (a zero timeout meaning the default, as in Nix). Each is
    /// bounded: any client may set `connect-timeout`, and a deadline past what a clock can
    /// hold would make the HTTP client panic (a timeout of `u64::MAX` seconds), so
    /// timeouts stop at a week and TTLs at a century.
    pub fn from_settings(s: &kiln_store::Settings) -> Limits {
        const WEEK: u64 = 7 * 24 * 3600;
        const CENTURY: u64 = 100 * 365 * 24 * 3600;
        let secs = |n: &str, dflt: u64| {
            let v = Some(s.get_u64(n)).filter(|v| *v > 0).unwrap_or(dflt);
            std::time::Duration::from_secs(v.min(WEEK))
        };
        let ttl = |n: &str| std::time::Duration::from_secs(s.get_u64(n).min(CENTURY));
        Limits {
            connect: secs("connect-timeout", 30),
            stalled: secs("stalled-download-timeout", 300),
            attempts: s.get_u64("download-attempts").clamp(1, 100) as u32,
            positive_ttl: ttl("narinfo-cache-positive-ttl"),
            negative_ttl: ttl("narinfo-cache-negative-ttl"),
        }
    }
}

impl SubstConfig {
    /// Parses the keys (`name:base64`); a key that does not parse is reported in the
    /// returned warnings and left out.
    pub fn new(urls: Vec<String>, keys: &[String], require_sigs: bool) -> (Self, Vec<String>) {
        let mut warnings = Vec::new();
        let keys = keys
            .iter()
            .filter_map(|k| match PublicKey::parse(k) {
                Ok(k) => Some(k),
                Err(e) => {
                    warnings.push(format!("ignoring trusted public key '{k}': {e}"));
                    None
                }
            })
            .collect();
        (
            SubstConfig {
                urls,
                keys,
                require_sigs,
                limits: None,
            },
            warnings,
        )
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }
}

/// Runs `f` on every item, on up to `workers` threads (at most 64) taking the next item
/// as they finish one; `f` returning `false` stops every worker before its next item.
pub(crate) fn for_each_parallel<T: Sync>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> bool + Sync,
) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, 64).min(items.len()) {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    if !f(item) {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
    });
}

/// A download's course, for clients that show it (Guix's `@ download-started`,
/// `@ download-progress` and `@ download-succeeded` traces). `size` is what the cache
/// announced for the file (its length, or the NAR's size when it is not compressed), if
/// anything; `transferred` counts the file's bytes as they arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Download {
    Started {
        url: String,
        size: Option<u64>,
    },
    /// At most every [`PROGRESS_INTERVAL`] while bytes arrive.
    Progress {
        url: String,
        size: Option<u64>,
        transferred: u64,
    },
    /// The file arrived whole and checked; `size` is the announced size, or else the
    /// bytes that arrived.
    Succeeded {
        url: String,
        size: u64,
    },
}

/// Where a download's progress goes.
pub type ProgressSink = std::sync::Arc<dyn Fn(Download) + Send + Sync>;

/// How often a download reports its progress (Guix's `%progress-interval`).
pub const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Fetches store paths from elsewhere. The scheduler's substitution goals use it.
pub trait Substituter: Send + Sync {
    /// Information about the paths it can provide. `paths` maps each path to its content
    /// address when the caller knows it (a fixed output), which lets a cache for another
    /// store directory provide it.
    fn query(
        &self,
        cfg: &SubstConfig,
        paths: &BTreeMap<StorePath, Option<ContentAddress>>,
        log: &dyn Fn(&str),
    ) -> Result<BTreeMap<StorePath, SubstitutableInfo>>;

    /// [`Substituter::query`] of one path by a goal about to fetch it: a substituter may
    /// then say why it refuses an offer (a cache's unsigned path), as nix-daemon's goal
    /// does, where a mere query stays silent.
    fn query_to_fetch(
        &self,
        cfg: &SubstConfig,
        path: &StorePath,
        ca: Option<&ContentAddress>,
        log: &dyn Fn(&str),
    ) -> Result<Option<SubstitutableInfo>> {
        let mut found = self.query(cfg, &BTreeMap::from([(path.clone(), ca.cloned())]), log)?;
        Ok(found.remove(path))
    }

    /// The realisations the caches hold for `ids` (floating content-addressed outputs),
    /// each from the first cache by priority that has it. A substituter that cannot say
    /// (an external agent) finds none.
    fn query_realisations(
        &self,
        _cfg: &SubstConfig,
        _ids: &[DrvOutput],
        _log: &dyn Fn(&str),
    ) -> Result<BTreeMap<DrvOutput, Realisation>> {
        Ok(BTreeMap::new())
    }

    /// Fetches `path` into `store` (verified, registered). With `repair`, replaces a valid
    /// copy after verifying the new one. Its references must be valid already. The
    /// download's course goes to `progress` (an external agent reports its own, in its
    /// log).
    #[allow(clippy::too_many_arguments)]
    fn fetch(
        &self,
        cfg: &SubstConfig,
        store: &LocalStore,
        path: &StorePath,
        ca: Option<&ContentAddress>,
        repair: bool,
        log: &dyn Fn(&str),
        progress: &ProgressSink,
    ) -> Result<()>;
}

/// The substituter a store's settings ask for: the external agent named by
/// `substitute-agent` if set, else kiln's own binary-cache client.
pub fn for_store(store: &LocalStore, s: &kiln_store::Settings) -> std::sync::Arc<dyn Substituter> {
    let program = s.get("substitute-agent");
    if program.is_empty() {
        return std::sync::Arc::new(Caches::for_store(store, s));
    }
    let stalled = std::time::Duration::from_secs(
        Some(s.get_u64("stalled-download-timeout"))
            .filter(|v| *v > 0)
            .unwrap_or(300),
    );
    std::sync::Arc::new(Agent::new(
        program.into(),
        store.store_dir().clone(),
        stalled,
    ))
}
