//! One client's connection: its trust, its settings, the temporary roots it holds, and
//! every operation it can ask for.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use kiln_build::recursive::RecursiveBuild;
use kiln_build::{BuildResult, BuildSettings, Event, RequestResult, Target};
use kiln_format::nar::{self, NarSink};
use kiln_format::realisation::{DrvOutput, Realisation};
use kiln_format::store_path::ContentAddressMethod;
use kiln_format::{
    ContentAddress, Derivation, FileIngestionMethod, HashAlgo, StorePath, ValidPathInfo,
};
use kiln_protocol::ops::{AddToStore, GcAction as WireGc, GcRequest};
use kiln_protocol::stderr::level;
use kiln_protocol::wire::WireReader;
use kiln_protocol::{
    BuildMode, ClientOptions, DerivedPath, Hello, Missing, OpIo, OutputSpec, RemoteError, Reply,
    Request, WireBuildResult,
};
use kiln_store::gc::{self, GcAction, GcOptions};
use kiln_store::{AddOptions, LocalStore, Settings};
use kiln_substitute::SubstitutableInfo;

use crate::client_settings;
use crate::peer::{Peer, Trust};
use crate::progress::Progress;
use crate::{remote, Backend, Daemon};

mod restricted;

/// Largest text (`AddTextToStore`, `text:` `AddToStore`) taken into memory: `.drv` files
/// and the like; anything bigger is refused rather than buffered.
const MAX_TEXT: u64 = 64 << 20;

/// A connection's state.
pub struct Session<'d> {
    d: &'d Daemon,
    b: Arc<Backend>,
    peer: Peer,
    trust: Trust,
    /// What the connection speaks (from the handshake).
    proto: kiln_protocol::Proto,
    options: ClientOptions,
    settings: Settings,
    build: Arc<BuildSettings>,
    /// Temporary roots held for this client, released when it disconnects (Nix's worker
    /// process held them until it exited).
    roots: Vec<StorePath>,
    /// Path info this connection asked for, kept while the store's generation stays the
    /// same (no write by this process since). Nix's daemon keeps it for the connection's
    /// whole life; clients ask for the same paths again and again.
    info_cache: InfoCache,
    /// A recursive build's connection: it sees only what that build may see.
    restricted: Option<Arc<RecursiveBuild>>,
}

/// See `Session::info_cache`.
#[derive(Default)]
struct InfoCache {
    generation: u64,
    entries: std::collections::HashMap<StorePath, Arc<CachedInfo>>,
}

/// A valid path's info, and the `QueryPathInfo` reply to this connection's client
/// encoded once (repeated queries then cost no allocation and no hash or path printing).
struct CachedInfo {
    info: ValidPathInfo,
    reply: Arc<[u8]>,
}

/// Entries a connection keeps at most (about 1 KiB each).
const INFO_CACHE_MAX: usize = 4096;

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({}, {:?})", self.peer.shown(), self.trust)
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        for p in self.roots.drain(..) {
            self.b.store.remove_temp_root(&p);
        }
    }
}

enum ConnMsg {
    Event(Event),
    /// The request's result, with its outputs' roots (released if undelivered).
    Done(RequestResult),
    Hangup,
}

fn not_privileged(what: &str) -> RemoteError {
    remote(format!("you are not privileged to {what}"))
}

impl<'d> Session<'d> {
    pub(crate) fn new(
        d: &'d Daemon,
        b: Arc<Backend>,
        peer: Peer,
        trust: Trust,
        hello: Hello,
    ) -> Session<'d> {
        let mut build = (*d.base).clone();
        build.client = Some((peer.uid, peer.gid));
        Session {
            d,
            b,
            peer,
            trust,
            proto: hello.proto,
            options: ClientOptions::default(),
            settings: d.settings.clone(),
            build: Arc::new(build),
            roots: Vec::new(),
            info_cache: InfoCache::default(),
            restricted: None,
        }
    }

    /// A session of a recursive build's builder (see [`crate::recursive`]): untrusted, and
    /// restricted to what the build may see.
    pub(crate) fn restricted(
        d: &'d Daemon,
        b: Arc<Backend>,
        peer: Peer,
        hello: Hello,
        build: Arc<RecursiveBuild>,
    ) -> Session<'d> {
        let mut s = Session::new(d, b, peer, Trust::Untrusted, hello);
        s.restricted = Some(build);
        s
    }

    fn trusted(&self) -> bool {
        self.trust == Trust::Trusted
    }

    fn store(&self) -> &LocalStore {
        &self.b.store
    }

    /// Records a temporary root an `add_*` left for us.
    fn keep(&mut self, p: &StorePath) {
        self.roots.push(p.clone());
    }

    fn set_options(&mut self, o: ClientOptions, io: &mut OpIo<'_>) -> Result<Reply, RemoteError> {
        let a = client_settings::apply(&self.d.settings, &o, self.trust, self.proto.is_guix());
        for w in &a.warnings {
            io.log(level::WARN, &format!("warning: {w}"))
                .map_err(remote)?;
        }
        for n in &a.notes {
            io.log(level::DEBUG, n).map_err(remote)?;
        }
        let mut build = a.build;
        build.client = Some((self.peer.uid, self.peer.gid));
        self.settings = a.settings;
        self.build = Arc::new(build);
        self.options = o;
        Ok(Reply::Nothing)
    }

    /// [`LocalStore::query_path_info`] through the connection's cache. Only valid paths
    /// are kept: a path becoming valid is a write, and so is one becoming invalid.
    fn cached_path_info(
        &mut self,
        store: &LocalStore,
        p: &StorePath,
        v: kiln_protocol::Proto,
    ) -> Result<Option<Arc<CachedInfo>>, RemoteError> {
        let generation = store.generation();
        let c = &mut self.info_cache;
        if c.generation != generation || c.entries.len() >= INFO_CACHE_MAX {
            c.entries.clear();
            c.generation = generation;
        }
        if let Some(i) = c.entries.get(p) {
            return Ok(Some(i.clone()));
        }
        let Some(info) = store.query_path_info(p).map_err(remote)? else {
            return Ok(None);
        };
        let reply = kiln_protocol::ops::found_path_info(v, store.store_dir(), &info);
        let cached = Arc::new(CachedInfo { info, reply });
        // Kept only if nothing was written while it was read.
        if store.generation() == generation {
            c.entries.insert(p.clone(), cached.clone());
        }
        Ok(Some(cached))
    }

    fn path_info(&self, p: &StorePath) -> Result<ValidPathInfo, RemoteError> {
        self.store()
            .query_path_info(p)
            .map_err(remote)?
            .ok_or_else(|| remote(format!("path '{}' is not valid", self.store().print(p))))
    }

    /// Whether `info` may be added without a trusted signature check failing.
    /// The keys of `trusted-public-keys` (unparsable entries were reported and left out).
    fn trusted_keys(&self) -> &[kiln_format::signature::PublicKey] {
        &self.build.subst.keys
    }

    fn check_signatures(&self, info: &ValidPathInfo, check: bool) -> Result<(), RemoteError> {
        if !check || !self.build.subst.require_sigs {
            return Ok(());
        }
        let sd = self.store().store_dir();
        if info.is_content_addressed(sd) {
            return Ok(());
        }
        if info.is_signed_by(sd, self.trusted_keys()) {
            return Ok(());
        }
        Err(remote(format!(
            "cannot add path '{}' because it lacks a valid signature",
            sd.display(&info.path)
        )))
    }

    /// What a build request names, checked as Nix checks it when it makes the goals: a
    /// derivation in the store must have every output named.
    fn to_targets(&self, paths: &[DerivedPath]) -> Result<Vec<Target>, RemoteError> {
        let sd = self.store().store_dir();
        paths
            .iter()
            .map(|p| match p {
                DerivedPath::Opaque(p) => Ok(Target::Path(p.clone())),
                DerivedPath::Built { drv, outputs } => {
                    let outputs = match outputs {
                        OutputSpec::All => BTreeSet::new(),
                        OutputSpec::Names(n) => n.clone(),
                    };
                    if !outputs.is_empty() {
                        // One that is not there yet is the scheduler's to report.
                        if let Ok(d) = self.store().read_derivation(drv) {
                            if let Some(o) = outputs.iter().find(|o| !d.outputs.contains_key(*o)) {
                                return Err(remote(format!(
                                    "derivation '{}' does not have output '{o}'",
                                    sd.display(drv)
                                )));
                            }
                        }
                    }
                    Ok(Target::Derivation {
                        drv: drv.clone(),
                        outputs,
                    })
                }
                DerivedPath::Dynamic { .. } => Err(remote(format!(
                    "'{}' names a derivation no build has made yet",
                    p.to_wire(sd)
                ))),
            })
            .collect()
    }

    /// Builds the derivations that make the derivations `paths` name (experimental
    /// `dynamic-derivations`: `drv!out!out` is output `out` of the `.drv` that output `out`
    /// of `drv` is), one link of each chain after the other, and names what they made:
    /// the request then holds only derivations in the store. A producer that fails ends
    /// the request with its failure.
    fn resolve_dynamic(
        &mut self,
        paths: &[DerivedPath],
        io: &mut OpIo<'_>,
    ) -> Result<Vec<DerivedPath>, RemoteError> {
        let sd = self.store().store_dir().clone();
        let mut resolved = Vec::with_capacity(paths.len());
        for p in paths {
            let DerivedPath::Dynamic {
                producer,
                chain,
                outputs,
            } = p
            else {
                resolved.push(p.clone());
                continue;
            };
            let mut drv = producer.clone();
            for output in chain {
                let link = format!("{}^{output}", sd.display(&drv));
                let target = Target::Derivation {
                    drv: drv.clone(),
                    outputs: [output.clone()].into(),
                };
                let r = self.realise(vec![target], BuildMode::Normal, io)?;
                if !r.success() {
                    // As nix-daemon 2.34: the producer's failure is logged as an error of
                    // its own, and the request fails for want of the derivation.
                    let e = self.build_error(&r);
                    if !io.proto().is_guix() {
                        let _ = io.log(
                            level::ERROR,
                            &format!("error: {}", e.message.replace('\n', "\n       ")),
                        );
                    }
                    return Err(RemoteError {
                        message: format!("failed to obtain derivation of '{link}'"),
                        status: e.status,
                    });
                }
                let made = r
                    .results
                    .first()
                    .and_then(|(_, res)| res.outputs.get(output))
                    .ok_or_else(|| remote(format!("building '{link}' named no output path")))?
                    .clone();
                // What a build made is untrusted: it must parse as a derivation (its
                // outputs' paths are then checked when it is built, as for any other).
                if let Err(e) = self.store().read_derivation(&made) {
                    return Err(remote(format!(
                        "error parsing derivation '{}': {e}",
                        sd.display(&made)
                    )));
                }
                drv = made;
            }
            resolved.push(DerivedPath::Built {
                drv,
                outputs: outputs.clone(),
            });
        }
        Ok(resolved)
    }

    /// Runs a build request, relaying its progress until it ends or the client hangs up.
    fn realise(
        &mut self,
        targets: Vec<Target>,
        mode: BuildMode,
        io: &mut OpIo<'_>,
    ) -> Result<RequestResult, RemoteError> {
        let sd = self.store().store_dir().clone();
        let shown: BTreeSet<String> = targets.iter().map(|t| sd.display(t.path())).collect();
        let (tx, rx): (Sender<ConnMsg>, Receiver<ConnMsg>) = channel();
        let events = tx.clone();
        let watch = self.d.watch.clone();
        let client = (self.peer.pid, self.peer.uid);
        let kiln_client = io
            .proto()
            .has_feature(kiln_protocol::version::Feature::KilnEvents);
        let sink = Arc::new(move |e: &Event| match e {
            // Phases are for timelines and logs (the scheduler's observer) and kiln's own
            // commands, not Nix's or Guix's clients.
            Event::Phase { .. } if !kiln_client => {}
            Event::BuildQueued { drv } | Event::BuildStarted { drv, .. } => {
                // Who waits for it, for the list of active builds.
                watch.active.note_client(drv, client);
                let _ = events.send(ConnMsg::Event(e.clone()));
            }
            _ => {
                let _ = events.send(ConnMsg::Event(e.clone()));
            }
        });
        let done = tx.clone();
        let id = self
            .b
            .scheduler
            .submit_with(
                kiln_build::Request {
                    targets,
                    mode: match mode {
                        BuildMode::Normal => kiln_build::BuildMode::Normal,
                        BuildMode::Repair => kiln_build::BuildMode::Repair,
                        BuildMode::Check => kiln_build::BuildMode::Check,
                    },
                    settings: self.build.clone(),
                    sink,
                    nested: self.restricted.as_ref().map(|r| r.id()),
                },
                Box::new(move |r| {
                    // Undelivered, the message (and with it the result's roots) is dropped.
                    let _ = done.send(ConnMsg::Done(r));
                }),
            )
            .map_err(remote)?;
        let watch = io.fd().and_then(|fd| HangupWatch::start(fd, tx).ok());
        let mut progress = Progress::new(self.d, shown);
        progress.nix_command = self.nix_command();
        progress.trace = self.build.print_build_trace;
        progress.extended_trace = self.build.print_extended_build_trace;
        progress.multiplexed = self.build.multiplexed_build_output;
        progress.build_verbosity = self.options.build_verbosity;
        let mut gone = progress.begin(io).is_err();
        let outcome = loop {
            if gone {
                self.b.scheduler.cancel(id);
                break Err(remote("the client disconnected"));
            }
            match rx.recv() {
                Ok(ConnMsg::Event(e)) => {
                    if progress.event(io, &e).is_err() {
                        // The client is gone: nobody reads the answer.
                        self.b.scheduler.cancel(id);
                        break Err(remote("the client disconnected"));
                    }
                }
                Ok(ConnMsg::Done(mut r)) => {
                    // The outputs were rooted for this request as each target finished,
                    // before its goal let go of its own (a collection in between cannot
                    // take what the client is told was built); they are this
                    // connection's now, released with its other roots when it ends, as
                    // Nix's worker kept every root it took.
                    for p in std::mem::take(&mut r.roots).take() {
                        self.keep(&p);
                    }
                    break Ok(r);
                }
                Ok(ConnMsg::Hangup) | Err(_) => {
                    // Its goals are cancelled unless another client still wants them.
                    self.b.scheduler.cancel(id);
                    break Err(remote("the client disconnected"));
                }
            }
        };
        drop(watch);
        if outcome.is_ok() {
            gone = progress.end(io).is_err();
        }
        let r = outcome?;
        if gone {
            return Err(remote("the client disconnected"));
        }
        Ok(r)
    }

    /// The error Nix 2.8's `buildPaths` raises for a failed request.
    fn build_error(&self, r: &RequestResult) -> RemoteError {
        let sd = self.store().store_dir();
        // One entry per failed derivation or path (two targets naming different outputs of
        // one derivation are one goal in Nix, so one failure).
        let mut failed: Vec<(&Target, &BuildResult)> = r
            .results
            .iter()
            .filter(|(_, x)| !x.success())
            .map(|(t, x)| (t, x))
            .collect();
        failed.sort_by(|a, b| a.0.path().cmp(b.0.path()));
        failed.dedup_by(|a, b| a.0.path() == b.0.path());
        let status = r.exit_code() as u64;
        let status = if status == 0 { 1 } else { status };
        // guix-daemon names what failed, in its own quotes; why is in the build traces and
        // the log it has sent already.
        if self.proto.is_guix() {
            // Except a `--check` that found a difference: guix-daemon raises that as an
            // error of the whole request (status 1), in its words, naming the kept copy.
            let check = failed.iter().find_map(|(t, x)| match &x.detail {
                Some(kiln_build::FailureDetail::NotDeterministic { output, kept }) => {
                    Some((t, output, kept))
                }
                _ => None,
            });
            if let Some((t, output, kept)) = check {
                let from = kept
                    .as_ref()
                    .map(|k| format!(" from `{k}'"))
                    .unwrap_or_default();
                return RemoteError {
                    message: format!(
                        "derivation `{}' may not be deterministic: output `{output}' differs{from}",
                        sd.display(t.path())
                    ),
                    status: 1,
                };
            }
            let names: Vec<String> = failed
                .iter()
                .map(|(t, _)| format!("`{}'", sd.display(t.path())))
                .collect();
            return RemoteError {
                message: format!("build of {} failed", names.join(", ")),
                status,
            };
        }
        if let [(target, one)] = failed[..] {
            if !one.error.is_empty() {
                return RemoteError {
                    message: self.failure_text(target, one),
                    status,
                };
            }
        }
        let names: Vec<String> = failed
            .iter()
            .map(|(t, _)| format!("'{}'", sd.display(t.path())))
            .collect();
        RemoteError {
            message: format!("build of {} failed", names.join(", ")),
            status,
        }
    }

    /// The error text of a failed build of `target` for this client.
    fn failure_text(&self, target: &Target, r: &BuildResult) -> String {
        crate::messages::failure_text(
            self.proto,
            self.store(),
            target.path(),
            r,
            self.nix_command(),
        )
    }

    /// Whether the daemon has Nix's `nix-command` feature (its messages suggest `nix log`).
    fn nix_command(&self) -> bool {
        self.build.experimental_features.contains("nix-command")
    }

    fn wire_result(&self, target: &Target, r: &BuildResult) -> WireBuildResult {
        let mut w = WireBuildResult {
            status: r.status as u64,
            error_msg: if r.success() {
                String::new()
            } else {
                self.failure_text(target, r)
            },
            times_built: r.times_built as u64,
            is_non_deterministic: r.non_deterministic,
            start_time: r.start_time,
            stop_time: r.stop_time,
            cpu_user: r.cpu_user.map(micros),
            cpu_system: r.cpu_system.map(micros),
            built_outputs: Vec::new(),
        };
        // As Nix: only the outputs the client asked for (all when it named none).
        let (drv, wanted) = match target {
            Target::Derivation { drv, outputs } => (Some(drv), Some(outputs)),
            Target::Basic { drv_path, .. } => (Some(drv_path), None),
            Target::Path(_) => (None, None),
        };
        let wanted = |name: &String| wanted.is_none_or(|w| w.is_empty() || w.contains(name));
        if let (Some(drv), true) = (drv, r.success()) {
            // Ids carry the derivation's masked modulo hash (`staticOutputHashes`).
            let hash = self
                .store()
                .read_derivation(drv)
                .and_then(|d| self.store().output_hash(drv, &d));
            if let Ok(h) = hash {
                for (name, p) in r.outputs.iter().filter(|(n, _)| wanted(n)) {
                    let id = DrvOutput::new(h, name);
                    // The registered realisation (with its dependencies and signatures)
                    // where there is one, as Nix reports it.
                    let real = self
                        .store()
                        .query_realisation(&id)
                        .ok()
                        .flatten()
                        .filter(|real| &real.out_path == p)
                        .unwrap_or_else(|| Realisation::new(id.clone(), p.clone()));
                    let real = if self
                        .proto
                        .has_feature(kiln_protocol::Feature::RealisationWithPathNotHash)
                    {
                        // Its signatures sign the old form; the client checks the new one.
                        Realisation::new(id.clone(), real.out_path)
                    } else {
                        real
                    };
                    w.built_outputs.push((id.to_string(), real.to_json()));
                }
            }
        }
        w
    }

    fn add_to_store(&mut self, a: AddToStore, io: &mut OpIo<'_>) -> Result<Reply, RemoteError> {
        let store = self.b.store.clone();
        match a {
            AddToStore::Ca {
                name,
                method,
                algo,
                refs,
                repair,
            } => {
                let opts = AddOptions {
                    repair,
                    ..Default::default()
                };
                let info = match method {
                    ContentAddressMethod::Text => {
                        if algo != HashAlgo::Sha256 {
                            return Err(remote(format!(
                                "text content addresses use sha256, not {algo}"
                            )));
                        }
                        let text = read_bounded(&mut io.data(), MAX_TEXT)?;
                        store.add_text(&name, &text, &refs, opts)
                    }
                    ContentAddressMethod::Fixed(m) => {
                        store.add_from_dump(&name, m, algo, &mut io.data(), &refs, opts)
                    }
                }
                .map_err(remote)?;
                self.keep(&info.path);
                Ok(Reply::PathInfoWithPath(info))
            }
            AddToStore::Legacy { name, method, algo } => {
                let mut data = io.data();
                let info = match method {
                    FileIngestionMethod::Recursive | FileIngestionMethod::Git => store
                        .add_from_dump(
                            &name,
                            method,
                            algo,
                            &mut data,
                            &BTreeSet::new(),
                            AddOptions::default(),
                        )
                        .map_err(remote)?,
                    FileIngestionMethod::Flat => {
                        // A NAR of one regular file: its contents are the data.
                        let mut sink = FlatAdd {
                            store: &store,
                            name: &name,
                            algo,
                            added: None,
                        };
                        nar::parse(&mut data, &mut sink, nar::Limits::default()).map_err(remote)?;
                        sink.added
                            .ok_or_else(|| remote("regular file expected"))?
                            .map_err(remote)?
                    }
                };
                self.keep(&info.path);
                Ok(Reply::OptPath(Some(info.path)))
            }
        }
    }

    /// The paths the client's caches say the floating outputs `names` of `drv` became
    /// (their realisations), for those they know (nothing when substitution is off).
    /// Warnings go to the client.
    fn cached_realisations(
        &self,
        drv_path: &StorePath,
        drv: &Derivation,
        names: &[String],
        io: &mut OpIo<'_>,
    ) -> Result<Vec<StorePath>, RemoteError> {
        // Impure outputs are never reused: not looked up.
        if !self.build.use_substitutes || self.build.subst.is_empty() || drv.is_impure() {
            return Ok(Vec::new());
        }
        if !kiln_build::attrs::Attrs::of(drv).flag("allowSubstitutes", true) {
            return Ok(Vec::new());
        }
        let Ok(h) = self.store().output_hash(drv_path, drv) else {
            return Ok(Vec::new());
        };
        let ids: Vec<kiln_format::realisation::DrvOutput> = names
            .iter()
            .map(|n| kiln_format::realisation::DrvOutput::new(h, n))
            .collect();
        let lines = std::sync::Mutex::new(Vec::new());
        let log = |l: &str| {
            if let Ok(mut v) = lines.lock() {
                v.push(l.to_string());
            }
        };
        let found = self
            .b
            .caches
            .query_realisations(&self.build.subst, &ids, &log)
            .unwrap_or_else(|e| {
                log(&format!("warning: {e}"));
                BTreeMap::new()
            });
        for l in lines.into_inner().unwrap_or_default() {
            io.log(level::WARN, &l).map_err(remote)?;
        }
        Ok(found.into_values().map(|r| r.out_path).collect())
    }

    /// Asks the client's caches about `paths` (nothing when substitution is off). Warnings
    /// (an unreachable or unsigned cache) go to the client.
    fn query_substitutes(
        &self,
        paths: &BTreeMap<StorePath, Option<ContentAddress>>,
        io: &mut OpIo<'_>,
    ) -> Result<BTreeMap<StorePath, SubstitutableInfo>, RemoteError> {
        if !self.build.use_substitutes || self.build.subst.is_empty() || paths.is_empty() {
            return Ok(BTreeMap::new());
        }
        let lines = std::sync::Mutex::new(Vec::new());
        let found = self
            .b
            .caches
            .query(&self.build.subst, paths, &|l: &str| {
                if let Ok(mut v) = lines.lock() {
                    v.push(l.to_string());
                }
            })
            .unwrap_or_else(|e| {
                if let Ok(mut v) = lines.lock() {
                    v.push(format!("warning: {e}"));
                }
                BTreeMap::new()
            });
        for l in lines.into_inner().unwrap_or_default() {
            io.log(level::WARN, &l).map_err(remote)?;
        }
        Ok(found)
    }

    /// What realising `paths` would do (Nix's `queryMissing`): paths to build, to
    /// substitute (with their download and unpacked sizes) and unknown ones. Caches are
    /// asked once per level of the graph, for all of that level's paths at once.
    fn query_missing(
        &self,
        paths: &[DerivedPath],
        io: &mut OpIo<'_>,
    ) -> Result<Missing, RemoteError> {
        let store = self.b.store.clone();
        let mut m = Missing::default();
        let mut seen = BTreeSet::new();
        let mut todo: Vec<DerivedPath> = paths.to_vec();
        while !todo.is_empty() {
            // Paths to ask the caches about, and derivations waiting for the answer.
            let mut ask: BTreeMap<StorePath, Option<ContentAddress>> = BTreeMap::new();
            let mut opaque = Vec::new();
            let mut drvs: Vec<(StorePath, Derivation, Vec<StorePath>)> = Vec::new();
            for p in std::mem::take(&mut todo) {
                if !seen.insert(p.clone()) {
                    continue;
                }
                match p {
                    // What must be built first: the producer's output.
                    DerivedPath::Dynamic {
                        producer, chain, ..
                    } => todo.push(DerivedPath::Built {
                        drv: producer,
                        outputs: OutputSpec::Names(chain.into_iter().take(1).collect()),
                    }),
                    DerivedPath::Opaque(p) => {
                        if !store.is_valid(&p).map_err(remote)? {
                            ask.insert(p.clone(), None);
                            opaque.push(p);
                        }
                    }
                    DerivedPath::Built { drv, outputs } => {
                        if !store.is_valid(&drv).map_err(remote)? {
                            m.unknown.insert(drv);
                            continue;
                        }
                        let d = store.read_derivation(&drv).map_err(remote)?;
                        let mut missing = Vec::new();
                        // Outputs whose paths are not known before they are built
                        // (floating content-addressed) are built, unless the caches know
                        // what they became.
                        let mut unknown = Vec::new();
                        for (name, out) in store.output_map_of(&drv, &d).map_err(remote)? {
                            let wanted = match &outputs {
                                OutputSpec::All => true,
                                OutputSpec::Names(n) => n.contains(&name),
                            };
                            match out {
                                _ if !wanted => {}
                                None => unknown.push(name),
                                Some(out) if !store.is_valid(&out).map_err(remote)? => {
                                    missing.push(out)
                                }
                                Some(_) => {}
                            }
                        }
                        if !unknown.is_empty() {
                            let known = self.cached_realisations(&drv, &d, &unknown, io)?;
                            if known.len() == unknown.len() {
                                for p in known {
                                    if !store.is_valid(&p).map_err(remote)? {
                                        missing.push(p);
                                    }
                                }
                                unknown.clear();
                            }
                        }
                        let unknown_output = !unknown.is_empty();
                        if missing.is_empty() && !unknown_output {
                            continue;
                        }
                        let allowed =
                            kiln_build::attrs::Attrs::of(&d).flag("allowSubstitutes", true);
                        if allowed && !unknown_output {
                            let ca = d
                                .fixed_output()
                                .map(|f| ContentAddress::Fixed(f.method, f.hash));
                            for o in &missing {
                                ask.insert(o.clone(), ca);
                            }
                        } else {
                            missing.clear();
                        }
                        drvs.push((drv, d, missing));
                    }
                }
            }
            let found = self.query_substitutes(&ask, io)?;
            let substitute = |p: &StorePath, m: &mut Missing, todo: &mut Vec<DerivedPath>| {
                if let Some(i) = found.get(p) {
                    if m.will_substitute.insert(p.clone()) {
                        m.download_size += i.download_size;
                        m.nar_size += i.nar_size;
                    }
                    todo.extend(i.references.iter().cloned().map(DerivedPath::Opaque));
                }
            };
            for p in opaque {
                if found.contains_key(&p) {
                    substitute(&p, &mut m, &mut todo);
                } else {
                    m.unknown.insert(p);
                }
            }
            for (drv, d, missing) in drvs {
                if !missing.is_empty() && missing.iter().all(|o| found.contains_key(o)) {
                    for o in &missing {
                        substitute(o, &mut m, &mut todo);
                    }
                    continue;
                }
                m.will_build.insert(drv.clone());
                for (input, outs) in &d.input_drvs {
                    todo.push(DerivedPath::Built {
                        drv: input.clone(),
                        outputs: OutputSpec::Names(outs.clone()),
                    });
                }
                for src in &d.input_srcs {
                    todo.push(DerivedPath::Opaque(src.clone()));
                }
            }
        }
        Ok(m)
    }

    fn add_multiple(
        &mut self,
        repair: bool,
        check_sigs: bool,
        io: &mut OpIo<'_>,
    ) -> Result<Reply, RemoteError> {
        let store = self.b.store.clone();
        let sd = store.store_dir().clone();
        // One layout inside the frames whatever the connection's version: count, then
        // (info with path, ultimate, signatures and content address; NAR) × count.
        let v = kiln_protocol::Proto::nix(kiln_protocol::version::NIX_VERSION);
        let mut r = WireReader::new(BufReader::new(io.data()));
        let n = r.u64("path count").map_err(remote)?;
        for _ in 0..n {
            let mut info =
                kiln_protocol::ops::read_path_info(v, &sd, None, &mut r).map_err(remote)?;
            if !self.trusted() {
                info.ultimate = false;
            }
            self.check_signatures(&info, check_sigs)?;
            let added = store
                .add_nar(
                    &info,
                    &mut r,
                    AddOptions {
                        repair,
                        ..Default::default()
                    },
                )
                .map_err(remote)?;
            self.roots.push(added.path);
        }
        Ok(Reply::Nothing)
    }
}

fn read_bounded(r: &mut impl Read, max: u64) -> Result<Vec<u8>, RemoteError> {
    let mut v = Vec::new();
    r.take(max + 1).read_to_end(&mut v).map_err(remote)?;
    if v.len() as u64 > max {
        return Err(remote(format!("the data exceeds the limit of {max} bytes")));
    }
    Ok(v)
}

/// Adds the single regular file of a NAR as a flat content-addressed path.
struct FlatAdd<'a> {
    store: &'a LocalStore,
    name: &'a str,
    algo: HashAlgo,
    added: Option<kiln_store::Result<ValidPathInfo>>,
}

impl NarSink for FlatAdd<'_> {
    fn file(
        &mut self,
        name: Option<&[u8]>,
        _executable: bool,
        _size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), kiln_format::Error> {
        if name.is_some() {
            return Err(kiln_format::Error::Wire("regular file expected".into()));
        }
        self.added = Some(self.store.add_from_dump(
            self.name,
            FileIngestionMethod::Flat,
            self.algo,
            contents,
            &BTreeSet::new(),
            AddOptions::default(),
        ));
        Ok(())
    }
    fn symlink(&mut self, _: Option<&[u8]>, _: &[u8]) -> Result<(), kiln_format::Error> {
        Err(kiln_format::Error::Wire("regular file expected".into()))
    }
    fn enter_directory(&mut self, _: Option<&[u8]>) -> Result<(), kiln_format::Error> {
        Err(kiln_format::Error::Wire("regular file expected".into()))
    }
    fn leave_directory(&mut self) -> Result<(), kiln_format::Error> {
        Ok(())
    }
}

/// Watches a connection for the client hanging up while a long operation runs, so that
/// its builds are cancelled at once rather than when their output next fails to send.
struct HangupWatch {
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HangupWatch {
    fn start(fd: std::os::fd::BorrowedFd<'_>, tx: Sender<ConnMsg>) -> std::io::Result<Self> {
        let sock = rustix::io::fcntl_dupfd_cloexec(fd, 0)?;
        let (stop_r, stop_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let thread = std::thread::Builder::new()
            .name("kiln-hangup".into())
            .spawn(move || {
                use rustix::event::{poll, PollFd, PollFlags};
                loop {
                    let mut fds = [
                        PollFd::new(&sock, PollFlags::RDHUP),
                        PollFd::new(&stop_r, PollFlags::IN),
                    ];
                    if poll(&mut fds, None).is_err() {
                        continue;
                    }
                    if !fds[1].revents().is_empty() {
                        return;
                    }
                    let ev = fds[0].revents();
                    if ev.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR) {
                        let _ = tx.send(ConnMsg::Hangup);
                        return;
                    }
                }
            })?;
        Ok(HangupWatch {
            stop: Some(stop_w),
            thread: Some(thread),
        })
    }
}

impl Drop for HangupWatch {
    fn drop(&mut self) {
        if let Some(w) = self.stop.take() {
            let _ = rustix::io::write(&w, b"x");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl kiln_protocol::Handler for Session<'_> {
    fn handle(&mut self, req: Request, io: &mut OpIo<'_>) -> Result<Reply, RemoteError> {
        match self.restricted.clone() {
            Some(rb) => self.handle_restricted(&rb, req, io),
            None => self.dispatch(req, io),
        }
    }

    /// As nix-daemon: trusted or not, from the same rules that decide what it may do.
    fn trusted(&self) -> Option<bool> {
        Some(Session::trusted(self))
    }
}

impl Session<'_> {
    fn dispatch(&mut self, req: Request, io: &mut OpIo<'_>) -> Result<Reply, RemoteError> {
        let store = self.b.store.clone();
        let sd = store.store_dir();
        let sorted = |s: BTreeSet<StorePath>| Reply::Paths(s.into_iter().collect());
        match req {
            Request::SetOptions(o) => self.set_options(o, io),
            Request::IsValidPath(p) => Ok(Reply::Bool(store.is_valid(&p).map_err(remote)?)),
            Request::QueryValidPaths { paths, substitute } => {
                if substitute && self.build.use_substitutes {
                    let targets: Vec<Target> = paths.iter().cloned().map(Target::Path).collect();
                    let _ = self.realise(targets, BuildMode::Normal, io)?;
                }
                Ok(sorted(store.query_valid_paths(&paths).map_err(remote)?))
            }
            Request::QueryPathInfo(p) => match self.cached_path_info(&store, &p, io.proto())? {
                Some(c) => Ok(Reply::Encoded(c.reply.clone())),
                None if !io.proto().path_info_found_flag() => {
                    Err(remote(format!("path '{}' is not valid", sd.display(&p))))
                }
                None => Ok(Reply::PathInfo(None)),
            },
            Request::QueryPathHash(p) => {
                Ok(Reply::String(self.path_info(&p)?.nar_hash.to_base16()))
            }
            Request::QueryReferences(p) => Ok(sorted(self.path_info(&p)?.references)),
            Request::QueryReferrers(p) => Ok(sorted(store.query_referrers(&p).map_err(remote)?)),
            Request::QueryValidDerivers(p) => {
                Ok(sorted(store.query_valid_derivers(&p).map_err(remote)?))
            }
            Request::QueryDerivationOutputs(p) => Ok(sorted(
                store
                    .query_derivation_outputs(&p)
                    .map_err(remote)?
                    .into_values()
                    .collect(),
            )),
            Request::QueryDerivationOutputNames(p) => Ok(Reply::Strings(
                store
                    .read_derivation(&p)
                    .map_err(remote)?
                    .outputs
                    .into_keys()
                    .collect(),
            )),
            Request::QueryDerivationOutputMap(p) => {
                // Outputs known only once built come from their realisations.
                Ok(Reply::OutputMap(
                    store
                        .derivation_output_map(&p)
                        .map_err(remote)?
                        .into_iter()
                        .collect(),
                ))
            }
            Request::QueryDeriver(p) => Ok(Reply::String(
                self.path_info(&p)?
                    .deriver
                    .map(|d| sd.display(&d))
                    .unwrap_or_default(),
            )),
            Request::QueryPathFromHashPart(h) => Ok(Reply::String(
                store
                    .query_path_from_hash_part(&h)
                    .map_err(remote)?
                    .map(|p| sd.display(&p))
                    .unwrap_or_default(),
            )),
            Request::QueryAllValidPaths => {
                Ok(sorted(store.query_all_valid_paths().map_err(remote)?))
            }
            // No substituters yet: nothing is substitutable.
            Request::HasSubstitutes(p) => {
                let found = self.query_substitutes(&BTreeMap::from([(p, None)]), io)?;
                Ok(Reply::Bool(!found.is_empty()))
            }
            Request::QuerySubstitutablePaths(paths) => {
                let ask = paths.into_iter().map(|p| (p, None)).collect();
                Ok(Reply::Paths(
                    self.query_substitutes(&ask, io)?.into_keys().collect(),
                ))
            }
            Request::QuerySubstitutablePathInfo(p) => {
                let found = self.query_substitutes(&BTreeMap::from([(p, None)]), io)?;
                Ok(Reply::SubstitutablePathInfo(
                    found.into_values().next().map(wire_subst_info),
                ))
            }
            Request::QuerySubstitutablePathInfos(ask) => {
                let found = self.query_substitutes(&ask, io)?;
                Ok(Reply::SubstitutablePathInfos(
                    found
                        .into_iter()
                        .map(|(p, i)| (p, wire_subst_info(i)))
                        .collect(),
                ))
            }
            Request::AddToStore(a) => self.add_to_store(a, io),
            Request::AddTextToStore { name, text, refs } => {
                let info = store
                    .add_text(&name, &text, &refs, AddOptions::default())
                    .map_err(remote)?;
                self.keep(&info.path);
                Ok(Reply::OptPath(Some(info.path)))
            }
            Request::AddToStoreNar {
                mut info,
                repair,
                dont_check_sigs,
            } => {
                let check = !(dont_check_sigs && self.trusted());
                if !self.trusted() {
                    info.ultimate = false;
                }
                // The archive is read in full even when the path is refused, so that the
                // connection stays usable.
                if let Err(e) = self.check_signatures(&info, check) {
                    let _ = std::io::copy(&mut io.data(), &mut std::io::sink());
                    return Err(e);
                }
                let added = store
                    .add_nar(
                        &info,
                        &mut io.data(),
                        AddOptions {
                            repair,
                            ..Default::default()
                        },
                    )
                    .map_err(remote)?;
                self.keep(&added.path);
                Ok(Reply::Nothing)
            }
            Request::AddMultipleToStore {
                repair,
                dont_check_sigs,
            } => {
                let check = !(dont_check_sigs && self.trusted());
                self.add_multiple(repair, check, io)
            }
            Request::ImportPaths => {
                if !self.trusted() {
                    return Err(not_privileged("import unsigned paths"));
                }
                let paths =
                    kiln_store::export::import_paths(&store, &mut io.data()).map_err(remote)?;
                for p in &paths {
                    self.keep(p);
                }
                Ok(Reply::Paths(paths))
            }
            Request::ExportPath { path, .. } => {
                let mut w = StderrWriter {
                    io,
                    buf: Vec::new(),
                };
                kiln_store::export::export_path(&store, &path, &mut w).map_err(remote)?;
                w.flush().map_err(remote)?;
                Ok(Reply::Int(1))
            }
            Request::NarFromPath(p) => {
                if !store.is_valid(&p).map_err(remote)? {
                    return Err(remote(format!("path '{}' is not valid", sd.display(&p))));
                }
                let real = store.real_path(&p);
                Ok(Reply::Stream(Box::new(move |w| {
                    nar::dump(&real, w).map_err(|e| std::io::Error::other(e.to_string()))
                })))
            }
            Request::BuildPaths { paths, mode } => {
                if mode == BuildMode::Repair && !self.trusted() {
                    return Err(remote(
                        "repairing is not allowed because you are not in 'trusted-users'",
                    ));
                }
                let resolved = self.resolve_dynamic(&paths, io)?;
                let targets = self.to_targets(&resolved)?;
                let r = self.realise(targets, mode, io)?;
                if r.success() {
                    Ok(Reply::Int(1))
                } else {
                    Err(self.build_error(&r))
                }
            }
            Request::BuildPathsWithResults { paths, mode } => {
                if mode == BuildMode::Repair && !self.trusted() {
                    return Err(remote(
                        "repairing is not allowed because you are not in 'trusted-users'",
                    ));
                }
                let resolved = self.resolve_dynamic(&paths, io)?;
                let targets = self.to_targets(&resolved)?;
                let r = self.realise(targets, mode, io)?;
                // As nix-daemon 2.34: goals given up after another failed (no keep-going)
                // have no result, so the client reports the failure that happened, not a
                // "cancelled" error for each of the others.
                Ok(Reply::BuildResults(
                    paths
                        .into_iter()
                        .zip(r.results.iter())
                        .filter(|(_, (_, res))| !(res.cancelled && self.proto.nix_2_34_messages()))
                        .map(|(p, (t, res))| (p, self.wire_result(t, res)))
                        .collect(),
                ))
            }
            Request::BuildDerivation {
                drv_path,
                drv,
                mode,
            } => {
                // Output paths of an input-addressed derivation cannot be checked without
                // its input derivations: only a trusted client may claim them (as Nix).
                if !self.trusted() {
                    return Err(not_privileged("build input-addressed derivations"));
                }
                let target = Target::Basic {
                    drv_path,
                    drv: Arc::new(drv),
                };
                let r = self.realise(vec![target], mode, io)?;
                let (t, res) = r
                    .results
                    .first()
                    .ok_or_else(|| remote("the build produced no result"))?;
                Ok(Reply::BuildDerivation(self.wire_result(t, res)))
            }
            Request::EnsurePath(p) => {
                if store.is_valid(&p).map_err(remote)? {
                    return Ok(Reply::Int(1));
                }
                let r = self.realise(vec![Target::Path(p.clone())], BuildMode::Normal, io)?;
                if r.success() {
                    Ok(Reply::Int(1))
                } else {
                    Err(RemoteError {
                        message: format!(
                            "path '{}' does not exist and cannot be created",
                            sd.display(&p)
                        ),
                        status: r.exit_code().max(1) as u64,
                    })
                }
            }
            Request::QueryMissing(paths) => {
                // As nix-daemon: an activity (shown with -vvv) while it looks.
                let act = (!io.proto().is_guix()).then(|| self.d.next_activity());
                if let Some(a) = act {
                    io.start_activity(
                        a,
                        kiln_protocol::stderr::level::DEBUG,
                        kiln_protocol::stderr::activity::UNKNOWN,
                        "querying info about missing paths",
                        &[],
                        0,
                    )
                    .map_err(remote)?;
                }
                let m = self.query_missing(&paths, io);
                if let Some(a) = act {
                    io.stop_activity(a).map_err(remote)?;
                }
                Ok(Reply::Missing(m?))
            }
            Request::AddTempRoot(p) => {
                store.add_temp_root(&p).map_err(remote)?;
                self.keep(&p);
                Ok(Reply::Int(1))
            }
            Request::AddPermRoot { path, root } => {
                if !self.trusted() {
                    return Err(remote(
                        "you are not privileged to create perm roots\n\nhint: you can just do this client-side without special privileges, and probably want to do that instead.",
                    ));
                }
                // A temporary root first, as Nix's `addPermRoot` does: a collection already
                // running read the permanent roots at its start and would not see the new
                // one, but it does see temporary roots added meanwhile.
                store.add_temp_root(&path).map_err(remote)?;
                self.keep(&path);
                let link = kiln_store::roots::add_perm_root(
                    store.layout(),
                    &path,
                    std::path::Path::new(&root),
                )
                .map_err(remote)?;
                Ok(Reply::String(link.display().to_string()))
            }
            Request::AddIndirectRoot(link) => {
                kiln_store::roots::add_indirect_root(store.layout(), std::path::Path::new(&link))
                    .map_err(remote)?;
                Ok(Reply::Int(1))
            }
            Request::SyncWithGc => Ok(Reply::Int(1)),
            Request::FindRoots => {
                let runtime = store.options().runtime_roots;
                let roots = gc::find_roots(&store, runtime).map_err(remote)?;
                let trusted = self.trusted();
                Ok(Reply::Roots(
                    roots
                        .into_iter()
                        .map(|(link, p)| {
                            // Other processes' temporary and runtime roots reveal what they
                            // have open: only trusted clients see where they come from.
                            let private = link.starts_with('{') || link.starts_with("/proc/");
                            if private && !trusted {
                                ("{censored}".to_string(), p)
                            } else {
                                (link, p)
                            }
                        })
                        .collect(),
                ))
            }
            Request::CollectGarbage(g) => self.collect_garbage(g, io.proto()),
            Request::OptimiseStore => {
                kiln_store::optimise::optimise_store(&store).map_err(remote)?;
                Ok(Reply::Int(1))
            }
            Request::VerifyStore {
                check_contents,
                repair,
            } => {
                if repair && !self.trusted() {
                    return Err(not_privileged("repair paths"));
                }
                // Damaged paths are substituted again, or rebuilt, by this daemon's
                // scheduler (as Nix's repairPath).
                let repairer = kiln_build::repair::SchedulerRepairer {
                    scheduler: &self.b.scheduler,
                    settings: self.build.clone(),
                };
                let report = kiln_store::verify::verify_store(
                    &store,
                    kiln_store::verify::VerifyOptions {
                        check_contents,
                        repair,
                    },
                    repair.then_some(&repairer as &dyn kiln_store::verify::Repairer),
                )
                .map_err(remote)?;
                for p in &report.problems {
                    io.log(level::ERROR, &p.to_string()).map_err(remote)?;
                }
                Ok(Reply::Bool(!report.is_clean()))
            }
            Request::AddSignatures { path, sigs } => {
                if !self.trusted() {
                    return Err(not_privileged("add signatures"));
                }
                store.add_signatures(&path, &sigs).map_err(remote)?;
                Ok(Reply::Int(1))
            }
            Request::AddBuildLog(drv) => {
                if !self.trusted() {
                    return Err(not_privileged("add logs"));
                }
                let (mut w, _) = kiln_build::log::LogWriter::create(
                    &store.layout().log_dir,
                    &drv,
                    self.build.log_compression,
                )
                .map_err(remote)?;
                let mut data = io.data();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = data.read(&mut buf).map_err(remote)?;
                    if n == 0 {
                        break;
                    }
                    w.write(&buf[..n]).map_err(remote)?;
                }
                w.finish().map_err(remote)?;
                Ok(Reply::Int(1))
            }
            Request::RegisterDrvOutput {
                realisation,
                out_path,
            } => {
                let r = match out_path {
                    // Before 1.31: the id, then the output path's base name.
                    Some(p) => Realisation::new(
                        DrvOutput::parse(&realisation).map_err(remote)?,
                        StorePath::from_base_name(&p).map_err(remote)?,
                    ),
                    None => Realisation::from_json(&realisation, "the client").map_err(remote)?,
                };
                // Nix 2.8 registers whatever any client sends. A realisation decides which
                // path every later build of that output uses, so from an untrusted client
                // kiln requires what it requires of paths: a trusted signature (unless
                // `require-sigs` is off). Otherwise one user could point another user's
                // content-addressed build at a path of their choosing.
                if !self.trusted()
                    && self.build.subst.require_sigs
                    && !r.verify(self.trusted_keys())
                {
                    return Err(remote(format!(
                        "cannot register realisation '{}' because it lacks a valid signature",
                        r.out_path
                    )));
                }
                store.register_realisation(&r).map_err(remote)?;
                Ok(Reply::Nothing)
            }
            // Nix 2.35's build traces, keyed by derivation path: kiln keys its
            // realisations by the derivation's hash modulo, which the derivation in the
            // store gives.
            Request::RegisterBuildTrace {
                drv,
                output,
                out_path,
                signatures,
            } => {
                // As for realisations (below): from an untrusted client only with a
                // trusted signature, here over Nix 2.35's build-trace fingerprint.
                if !self.trusted()
                    && self.build.subst.require_sigs
                    && !Realisation::verify_build_trace(
                        &drv,
                        &output,
                        &out_path,
                        self.trusted_keys(),
                        &signatures,
                    )
                {
                    return Err(remote(format!(
                        "cannot register realisation '{}' because it lacks a valid signature",
                        out_path
                    )));
                }
                let d = store.read_derivation(&drv).map_err(remote)?;
                let h = store.output_hash(&drv, &d).map_err(remote)?;
                // The signatures sign the 2.35 form, not the record kiln keeps (whose
                // fingerprint is the old JSON): kept, they would be invalid there.
                let r = Realisation::new(DrvOutput::new(h, &output), out_path);
                store.register_realisation(&r).map_err(remote)?;
                Ok(Reply::Nothing)
            }
            Request::QueryBuildTrace { drv, output } => {
                let found = match store.read_derivation(&drv) {
                    Ok(d) => {
                        let h = store.output_hash(&drv, &d).map_err(remote)?;
                        store
                            .query_realisation(&DrvOutput::new(h, &output))
                            .map_err(remote)?
                    }
                    // A derivation kiln does not have has no recorded outputs.
                    Err(_) => None,
                };
                Ok(Reply::BuildTrace(
                    found.map(|r| (r.out_path, Default::default())),
                ))
            }
            Request::QueryRealisation(id) => {
                let id = DrvOutput::parse(&id).map_err(remote)?;
                let found = store.query_realisation(&id).map_err(remote)?;
                // Before 1.31 the reply is the set of output paths, then the JSON.
                Ok(Reply::Strings(match found {
                    None => Vec::new(),
                    Some(r) if !io.proto().realisation_json() => vec![sd.display(&r.out_path)],
                    Some(r) => vec![r.to_json()],
                }))
            }
            Request::QueryFailedPaths => {
                Ok(Reply::Strings(store.query_failed_paths().map_err(remote)?))
            }
            Request::ClearFailedPaths(paths) => {
                let v: Vec<StorePath> = paths.into_iter().collect();
                store.clear_failed_paths(Some(&v)).map_err(remote)?;
                Ok(Reply::Int(1))
            }
            Request::BuiltinBuilders => Ok(Reply::Strings(vec!["download".into()])),
            // Any client may list the builds, as with Nix's `nix ps`: what runs on the
            // machine (derivation names, argv) is what `ps` already shows local users.
            Request::QueryActiveBuilds => {
                let queued = io
                    .proto()
                    .has_feature(kiln_protocol::version::Feature::KilnQueuedBuilds);
                Ok(Reply::String(self.d.watch.active.to_json(queued)))
            }
            Request::SubstituteUrls => Ok(Reply::Strings(if self.build.use_substitutes {
                self.build.subst.urls.clone()
            } else {
                Vec::new()
            })),
        }
    }
}

impl Session<'_> {
    fn collect_garbage(
        &mut self,
        g: GcRequest,
        proto: kiln_protocol::Proto,
    ) -> Result<Reply, RemoteError> {
        if g.ignore_liveness {
            return Err(remote("you are not allowed to ignore liveness"));
        }
        let paths: Vec<StorePath> = g.paths.into_iter().collect();
        let among = |skip_alive| GcAction::DeleteAmong {
            paths: paths.clone(),
            skip_alive,
            delete_referrers: g.delete_referrers,
        };
        let action = match g.action {
            WireGc::ReturnLive => GcAction::ReturnLive,
            WireGc::ReturnDead => GcAction::ReturnDead,
            WireGc::DeleteDead if g.whole_store => GcAction::DeleteDead,
            // Dead paths among those named (`nix store delete --skip-alive`).
            WireGc::DeleteDead => {
                if !proto.has_feature(kiln_protocol::Feature::DeleteDeadSpecificReferrers) {
                    return Err(remote(
                        "Garbage collecting specific paths requested but it is not supported by the negotiated protocol",
                    ));
                }
                among(true)
            }
            WireGc::DeleteSpecific if g.whole_store => {
                return Err(remote("Cannot delete the entire store"))
            }
            WireGc::DeleteSpecific => among(false),
        };
        // guix-daemon serves each connection from a process of its own, whose temporary
        // roots its own deletion requests do not see: a Guix client may delete a path it
        // added on this very connection. kiln's roots are the process's, shared by every
        // connection, so this connection's claims on the named paths are dropped for the
        // deletion (another connection's still protect them) and taken again for those
        // that stay.
        let released: Vec<StorePath> = if proto.is_guix()
            && matches!(
                action,
                GcAction::DeleteAmong { .. } | GcAction::DeleteSpecific(_)
            ) {
            let named: std::collections::HashSet<&StorePath> = paths.iter().collect();
            let (mine, keep): (Vec<StorePath>, Vec<StorePath>) =
                self.roots.drain(..).partition(|p| named.contains(p));
            self.roots = keep;
            for p in &mine {
                self.b.store.remove_temp_root(p);
            }
            mine
        } else {
            Vec::new()
        };
        // This client's `keep-outputs` and `keep-derivations`, as nix-daemon applies them.
        let mine = kiln_store::StoreOptions::from_settings(&self.settings, self.b.store.layout());
        let r = gc::collect_garbage(
            &self.b.store,
            &GcOptions {
                action,
                max_freed: g.max_freed,
                keep_outputs: Some(mine.keep_outputs),
                keep_derivations: Some(mine.keep_derivations),
            },
        );
        for p in released {
            if self.b.store.is_valid(&p).unwrap_or(false) && self.b.store.add_temp_root(&p).is_ok()
            {
                self.roots.push(p);
            }
        }
        let r = r.map_err(|e| match e {
            // As nix-daemon says it, with the commands its clients have.
            kiln_store::Error::Alive { .. } => remote(format!(
                "{e} To find out why, use: nix-store --query --roots and nix-store --query --referrers"
            )),
            e => remote(e),
        })?;
        Ok(Reply::Gc {
            paths: r.paths,
            bytes_freed: r.bytes_freed,
        })
    }
}

/// Sends what is written as `STDERR_WRITE` chunks of up to 64 KiB (`ExportPath`).
struct StderrWriter<'a, 'b> {
    io: &'a mut OpIo<'b>,
    buf: Vec<u8>,
}

impl Write for StderrWriter<'_, '_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.io.write_data(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// A substituter's answer as the protocol sends it.
fn wire_subst_info(i: SubstitutableInfo) -> kiln_protocol::ops::SubstitutableInfo {
    kiln_protocol::ops::SubstitutableInfo {
        deriver: i.deriver,
        references: i.references,
        download_size: i.download_size,
        nar_size: i.nar_size,
    }
}

/// A duration as the protocol's microseconds.
fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
