//! kiln's own commands through a daemon, for people who cannot write the store (a root
//! daemon's `/nix/store`): `kiln build`, `kiln log` and `kiln store
//! path-info|query|add|add-fixed|verify|gc|delete` speak the worker protocol to the
//! daemon's socket, as Nix's `auto` store does, and print what they print on a store of
//! their own.
//!
//! The choice ([`wants_daemon`]): `--store daemon` (or `KILN_STORE=daemon`) always,
//! `--store local` never; by default, the daemon when this user cannot write the store's
//! database directory and the daemon's socket exists.
//!
//! Build progress comes as kiln's own events (the `kiln-events` feature), so the live view,
//! `--json` and `--timeline` work as they do without a daemon.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use kiln_build::Event;
use kiln_format::derivation::DerivationHasher;
use kiln_format::store_path::ContentAddressMethod;
use kiln_format::{Derivation, FileIngestionMethod, HashAlgo, StoreDir, StorePath, ValidPathInfo};
use kiln_protocol::ops::{AddToStore, GcAction, GcRequest};
use kiln_protocol::version::Feature;
use kiln_protocol::{Client, ClientOptions, Message, Reply, Request};
use kiln_store::{DrvFiles, Layout};

/// A closure's paths and its edges (referrer → reference).
type Graph = (Vec<StorePath>, Vec<(StorePath, StorePath)>);

// How a log line from kiln's daemon carries an event.
use kiln_daemon::progress::KILN_EVENT;

/// Whether commands go through the daemon at `socket` rather than opening the store.
pub(super) fn wants_daemon(
    choice: Option<&str>,
    layout: &Layout,
    socket: &Path,
) -> anyhow::Result<bool> {
    match choice {
        Some("daemon") => Ok(true),
        Some("local") => Ok(false),
        Some("auto") | None => {
            // The database's directory, or the state directory that will hold it.
            let db = layout.db_dir();
            let probe = if db.exists() {
                db
            } else {
                layout.state_dir.clone()
            };
            let writable =
                !probe.exists() || rustix::fs::access(&probe, rustix::fs::Access::WRITE_OK).is_ok();
            Ok(!writable && socket.exists())
        }
        Some(other) => bail!("--store must be 'auto', 'daemon' or 'local', not '{other}'"),
    }
}

/// A connection to the daemon, with what commands ask of a store.
pub(super) struct DaemonStore {
    c: Client,
    pub sd: StoreDir,
    real: PathBuf,
    hasher: DerivationHasher<DrvFiles>,
}

impl DaemonStore {
    pub fn connect(socket: &Path, layout: &Layout) -> anyhow::Result<DaemonStore> {
        let c = Client::connect_with_features(
            socket,
            layout.store_dir.clone(),
            kiln_protocol::version::SUPPORTED_FEATURES,
        )
        .with_context(|| format!("connecting to the daemon at '{}'", socket.display()))?;
        Ok(DaemonStore {
            c,
            sd: layout.store_dir.clone(),
            real: layout.real_store_dir.clone(),
            hasher: DerivationHasher::new(DrvFiles::new(layout.real_store_dir.clone())),
        })
    }

    /// Runs `req`; log lines go to standard error, events (from a kiln daemon) to
    /// `on_event`.
    fn ask(
        &mut self,
        req: &Request,
        data: Option<&mut dyn std::io::Read>,
        on_event: &mut dyn FnMut(Event),
    ) -> anyhow::Result<Reply> {
        let sd = self.sd.clone();
        let mut on_message = |m: Message| match m {
            Message::Next(line) => match line.strip_prefix(KILN_EVENT) {
                Some(json) => {
                    if let Some(e) = serde_json::from_str(json.trim_end())
                        .ok()
                        .and_then(|v| Event::from_json(&v, &sd))
                    {
                        on_event(e);
                    }
                }
                None => eprint!("{line}"),
            },
            Message::Write(b) => eprint!("{}", String::from_utf8_lossy(&b)),
            _ => {}
        };
        Ok(self.c.request(req, data, &mut on_message)?)
    }

    fn query(&mut self, req: Request) -> anyhow::Result<Reply> {
        self.ask(&req, None, &mut |_| {})
    }

    /// Whether the daemon sends kiln's events (else only its log lines are shown).
    pub fn has_events(&self) -> bool {
        self.c.proto.has_feature(Feature::KilnEvents)
    }

    /// Sends the build settings a client may send (the daemon decides which it takes).
    pub fn set_options(&mut self, settings: &kiln_store::Settings) -> anyhow::Result<()> {
        let n = |k: &str| settings.get(k).parse::<u64>().ok();
        let mut overrides = Vec::new();
        // Under the names any client may send (Nix's `repeat`, not `build-repeat`); the
        // daemon says which of the others it ignores for an untrusted user.
        for (k, name) in [
            ("timeout", "timeout"),
            ("build-repeat", "repeat"),
            ("sandbox-paths", "sandbox-paths"),
            ("substituters", "substituters"),
        ] {
            let v = settings.get(k);
            if !v.is_empty()
                && v != "0"
                && v != kiln_store::Settings::new(kiln_daemon::CATALOG).get(k)
            {
                overrides.push((name.to_string(), v.to_string()));
            }
        }
        let o = ClientOptions {
            keep_failed: settings.get_bool("keep-failed"),
            keep_going: settings.get_bool("keep-going"),
            try_fallback: settings.get_bool("fallback"),
            verbosity: 3,
            max_build_jobs: n("max-jobs"),
            max_silent_time: n("max-silent-time"),
            use_build_hook: true,
            build_verbosity: 3,
            print_build_trace: false,
            build_cores: n("cores"),
            use_substitutes: settings.get_bool("substitute"),
            overrides,
        };
        self.query(Request::SetOptions(o))?;
        Ok(())
    }

    pub fn is_valid(&mut self, p: &StorePath) -> anyhow::Result<bool> {
        match self.query(Request::IsValidPath(p.clone()))? {
            Reply::Bool(b) => Ok(b),
            _ => bail!("the daemon answered IsValidPath with something else"),
        }
    }

    pub fn path_info(&mut self, p: &StorePath) -> anyhow::Result<Option<ValidPathInfo>> {
        match self.query(Request::QueryPathInfo(p.clone()))? {
            // The answer does not repeat the path.
            Reply::PathInfo(i) => Ok(i.map(|i| ValidPathInfo {
                path: p.clone(),
                ..i
            })),
            _ => bail!("the daemon answered QueryPathInfo with something else"),
        }
    }

    /// The info of a path that must be valid.
    pub fn valid_info(&mut self, p: &StorePath) -> anyhow::Result<ValidPathInfo> {
        self.path_info(p)?
            .with_context(|| format!("path '{}' is not valid", self.sd.display(p)))
    }

    fn paths(&mut self, req: Request) -> anyhow::Result<Vec<StorePath>> {
        match self.query(req)? {
            Reply::Paths(v) => Ok(v),
            _ => bail!("the daemon answered with something else than paths"),
        }
    }

    pub fn referrers(&mut self, p: &StorePath) -> anyhow::Result<Vec<StorePath>> {
        self.paths(Request::QueryReferrers(p.clone()))
    }

    pub fn valid_derivers(&mut self, p: &StorePath) -> anyhow::Result<Vec<StorePath>> {
        self.paths(Request::QueryValidDerivers(p.clone()))
    }

    pub fn output_map(
        &mut self,
        drv: &StorePath,
    ) -> anyhow::Result<BTreeMap<String, Option<StorePath>>> {
        match self.query(Request::QueryDerivationOutputMap(drv.clone()))? {
            Reply::OutputMap(v) => Ok(v.into_iter().collect()),
            _ => bail!("the daemon answered QueryDerivationOutputMap with something else"),
        }
    }

    pub fn roots(&mut self) -> anyhow::Result<Vec<(String, StorePath)>> {
        match self.query(Request::FindRoots)? {
            Reply::Roots(v) => Ok(v),
            _ => bail!("the daemon answered FindRoots with something else"),
        }
    }

    /// The closure of `paths` (with `reverse`, of referrers), each path checked valid;
    /// also its edges (referrer → reference), for ordering.
    pub fn closure_graph(&mut self, paths: &[StorePath], reverse: bool) -> anyhow::Result<Graph> {
        let mut seen: BTreeSet<StorePath> = BTreeSet::new();
        let mut refs: BTreeMap<StorePath, BTreeSet<StorePath>> = BTreeMap::new();
        let mut todo: Vec<StorePath> = paths.to_vec();
        while let Some(p) = todo.pop() {
            if !seen.insert(p.clone()) {
                continue;
            }
            let info = self.valid_info(&p)?;
            let next: Vec<StorePath> = if reverse {
                self.referrers(&p)?
            } else {
                info.references.iter().cloned().collect()
            };
            refs.insert(p, info.references);
            todo.extend(next);
        }
        let mut edges = Vec::new();
        for (p, rs) in &refs {
            for r in rs {
                if seen.contains(r) {
                    edges.push((p.clone(), r.clone()));
                }
            }
        }
        Ok((seen.into_iter().collect(), edges))
    }

    pub fn closure(
        &mut self,
        paths: &[StorePath],
        reverse: bool,
    ) -> anyhow::Result<BTreeSet<StorePath>> {
        Ok(self.closure_graph(paths, reverse)?.0.into_iter().collect())
    }

    /// The closure, dependencies first, as `nix-store -qR` prints it (the local store's
    /// order: the same sort over the same graph).
    pub fn closure_in_order(
        &mut self,
        paths: &[StorePath],
        reverse: bool,
    ) -> anyhow::Result<Vec<String>> {
        let (nodes, edges) = self.closure_graph(paths, reverse)?;
        let names: Vec<String> = nodes.iter().map(|p| self.sd.display(p)).collect();
        let index: BTreeMap<&StorePath, usize> =
            nodes.iter().enumerate().map(|(i, p)| (p, i)).collect();
        let e: Vec<(usize, usize)> = edges.iter().map(|(a, b)| (index[a], index[b])).collect();
        let order = kiln_store::export::topo_order(&names, &e);
        Ok(order.into_iter().map(|i| names[i].clone()).collect())
    }

    /// Adds a file or tree (`AddToStore`), its NAR streamed from disk.
    pub fn add_path(
        &mut self,
        path: &Path,
        name: &str,
        method: FileIngestionMethod,
        algo: HashAlgo,
    ) -> anyhow::Result<StorePath> {
        let req = Request::AddToStore(AddToStore::Ca {
            name: name.to_string(),
            method: ContentAddressMethod::Fixed(method),
            algo,
            refs: BTreeSet::new(),
            repair: false,
        });
        let path_buf = path.to_path_buf();
        let reply = self.c.request_writing(
            &req,
            &mut |w| match method {
                FileIngestionMethod::Recursive => kiln_format::nar::dump(&path_buf, w)
                    .map_err(|e| std::io::Error::other(e.to_string())),
                _ => std::io::copy(&mut std::fs::File::open(&path_buf)?, w).map(|_| ()),
            },
            &mut |m| {
                if let Message::Next(l) = m {
                    eprint!("{l}")
                }
            },
        )?;
        match reply {
            Reply::PathInfoWithPath(i) => Ok(i.path),
            _ => bail!("the daemon answered AddToStore with something else"),
        }
    }

    pub fn add_indirect_root(&mut self, link: &Path) -> anyhow::Result<()> {
        self.query(Request::AddIndirectRoot(
            link.to_string_lossy().into_owned(),
        ))?;
        Ok(())
    }

    /// Builds `targets`, events to `on_event`; the results in the order asked.
    pub fn build(
        &mut self,
        targets: Vec<kiln_protocol::DerivedPath>,
        mode: kiln_protocol::ops::BuildMode,
        on_event: &mut dyn FnMut(Event),
    ) -> anyhow::Result<
        Vec<(
            kiln_protocol::DerivedPath,
            kiln_protocol::ops::WireBuildResult,
        )>,
    > {
        match self.ask(
            &Request::BuildPathsWithResults {
                paths: targets,
                mode,
            },
            None,
            on_event,
        )? {
            Reply::BuildResults(v) => Ok(v),
            _ => bail!("the daemon answered BuildPathsWithResults with something else"),
        }
    }

    pub fn verify(&mut self, check_contents: bool, repair: bool) -> anyhow::Result<bool> {
        match self.query(Request::VerifyStore {
            check_contents,
            repair,
        })? {
            Reply::Bool(errors) => Ok(errors),
            _ => bail!("the daemon answered VerifyStore with something else"),
        }
    }

    /// `CollectGarbage`: the paths it returned or deleted, and the bytes freed.
    pub fn gc(
        &mut self,
        action: GcAction,
        paths: BTreeSet<StorePath>,
        delete_referrers: bool,
        max_freed: u64,
    ) -> anyhow::Result<(Vec<String>, u64)> {
        let whole_store = paths.is_empty();
        match self.query(Request::CollectGarbage(GcRequest {
            action,
            paths,
            whole_store,
            delete_referrers,
            ignore_liveness: false,
            max_freed,
        }))? {
            Reply::Gc { paths, bytes_freed } => Ok((paths, bytes_freed)),
            _ => bail!("the daemon answered CollectGarbage with something else"),
        }
    }

    /// The store's directory on disk.
    pub fn real_store_dir(&self) -> &Path {
        &self.real
    }

    /// A store path named on the command line (see [`PathReader::parse`]).
    pub fn parse(&self, s: &str) -> anyhow::Result<StorePath> {
        PathReader::of(self).parse(s)
    }
}

/// Reads store paths named on the command line as the daemon's store names them.
pub(super) struct PathReader {
    sd: StoreDir,
    real: PathBuf,
}

impl PathReader {
    pub fn of(d: &DaemonStore) -> PathReader {
        PathReader {
            sd: d.sd.clone(),
            real: d.real.clone(),
        }
    }

    /// A path in the store (or below one), in its logical or physical form, as the
    /// local store reads it.
    pub fn parse(&self, s: &str) -> anyhow::Result<StorePath> {
        if let Ok(p) = self.sd.parse_path(s) {
            return Ok(p);
        }
        let abs = std::path::absolute(s)?;
        let logical = match abs.strip_prefix(&self.real) {
            Ok(rest) => format!("{}/{}", self.sd.as_str(), rest.display()),
            Err(_) => abs.to_string_lossy().into_owned(),
        };
        let (p, _) = self
            .sd
            .to_store_path(&logical)
            .with_context(|| format!("'{s}' is not in the store"))?;
        Ok(p)
    }
}

impl kiln_build::recipe::RecipeStore for DaemonStore {
    fn store_dir(&self) -> &StoreDir {
        &self.sd
    }
    fn add_source(&mut self, path: &Path, name: &str) -> kiln_build::Result<StorePath> {
        self.add_path(path, name, FileIngestionMethod::Recursive, HashAlgo::Sha256)
            .map_err(|e| kiln_build::Error::Invalid(format!("{e:#}")))
    }
    fn finalize(&mut self, drv: Derivation) -> kiln_build::Result<Derivation> {
        Ok(drv.finalize(&self.sd, &mut self.hasher)?)
    }
    fn add_drv(
        &mut self,
        name: &str,
        text: &[u8],
        refs: &BTreeSet<StorePath>,
    ) -> kiln_build::Result<StorePath> {
        let req = Request::AddToStore(AddToStore::Ca {
            name: name.to_string(),
            method: ContentAddressMethod::Text,
            algo: HashAlgo::Sha256,
            refs: refs.clone(),
            repair: false,
        });
        let mut data: &[u8] = text;
        match self
            .ask(&req, Some(&mut data), &mut |_| {})
            .map_err(|e| kiln_build::Error::Invalid(format!("{e:#}")))?
        {
            Reply::PathInfoWithPath(i) => Ok(i.path),
            _ => Err(kiln_build::Error::Invalid(
                "the daemon answered AddToStore with something else".into(),
            )),
        }
    }
}
