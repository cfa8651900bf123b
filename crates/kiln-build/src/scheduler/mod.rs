//! The scheduler: one thread that owns the goal graph.
//!
//! It keeps the reference's goals and states (derivation goals: have derivation → try
//! substitutes → realise inputs → try to build → build done; substitution goals: query →
//! references → fetch), but:
//!
//! * goals are keyed by path and shared by every requester, across requests from different
//!   clients; a goal nobody waits for any more is cancelled and its builder killed;
//! * the goals to run next are an ordered set keyed as the reference orders them
//!   (substitutions before builds, then by name), so each wake-up is O(log n) and the
//!   order is deterministic; free build slots are handed to one waiter at a time instead of
//!   waking every waiter whenever any build ends;
//! * builds, lock waits, queries and downloads run on their own threads and report back
//!   with messages; nothing slow happens on the scheduler thread.
//!
//! The worker's methods live by concern: `graph` (requests and the goal graph),
//! `derivation` (derivation goals up to the build), `building` (locks, where a build
//! runs: slots here, build machines, the hook; the job and its end), `substitution`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use kiln_format::realisation::DrvOutput;
use kiln_format::{ContentAddress, Derivation, StorePath, ValidPathInfo};
use kiln_store::lock::PathLock;
use kiln_store::LocalStore;

use crate::event::{Event, EventSink};
use crate::job::{self, BuildMode, JobControl, JobEvent, JobSpec};
use crate::result::{BuildResult, BuildStatus, FailureKinds};
use crate::settings::BuildSettings;
use crate::substituter::{SubstitutableInfo, Substituter};
use crate::{Error, Result};

mod building;
mod derivation;
mod graph;
mod substitution;

type GoalId = u64;
/// Identifies a request (a `build` call, a daemon client's operation).
pub type RequestId = u64;

/// What to realise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Outputs of a derivation (empty: all).
    Derivation {
        drv: StorePath,
        outputs: BTreeSet<String>,
    },
    /// A path to make valid (by substitution).
    Path(StorePath),
    /// A derivation given in full rather than read from the store (`BuildDerivation`: a
    /// remote builder's client sends it without its input derivations, whose outputs must
    /// already be valid here). Its outputs are all wanted.
    Basic {
        drv_path: StorePath,
        drv: Arc<Derivation>,
    },
}

impl Target {
    /// The derivation or store path the target names.
    pub fn path(&self) -> &StorePath {
        match self {
            Target::Derivation { drv, .. } => drv,
            Target::Path(p) => p,
            Target::Basic { drv_path, .. } => drv_path,
        }
    }
}

/// A set of targets realised together, with the requester's settings.
pub struct Request {
    pub targets: Vec<Target>,
    pub mode: BuildMode,
    pub settings: Arc<BuildSettings>,
    pub sink: Arc<dyn EventSink>,
    /// Sent by a recursive build through its daemon socket (its
    /// [`crate::recursive::RecursiveBuild::id`]): while such requests run, that build, which
    /// waits for them, lends its slot (see `Worker::max_jobs`).
    pub nested: Option<u64>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Request({:?})", self.targets)
    }
}

/// The outcome of a request.
#[derive(Debug)]
pub struct RequestResult {
    pub results: Vec<(Target, BuildResult)>,
    pub failure: FailureKinds,
    /// Temporary roots of the built outputs, taken as each target finished (before its
    /// goal let go of its own): the requester's to keep ([`HeldRoots::take`]); released
    /// with the result otherwise.
    pub roots: HeldRoots,
}

/// Temporary roots held for a requester; released when dropped unless taken.
#[derive(Debug, Default)]
pub struct HeldRoots {
    store: Option<Arc<LocalStore>>,
    paths: Vec<StorePath>,
}

impl HeldRoots {
    /// The roots, now the caller's to release (`LocalStore::remove_temp_root`).
    pub fn take(mut self) -> Vec<StorePath> {
        std::mem::take(&mut self.paths)
    }
}

impl Drop for HeldRoots {
    fn drop(&mut self) {
        if let Some(store) = &self.store {
            for p in &self.paths {
                store.remove_temp_root(p);
            }
        }
    }
}

impl RequestResult {
    pub fn success(&self) -> bool {
        self.results.iter().all(|(_, r)| r.success())
    }
    /// Nix's exit status for the request (0 on success).
    pub fn exit_code(&self) -> u8 {
        if self.success() {
            0
        } else {
            self.failure.exit_code()
        }
    }
}

/// Receives a request's result.
pub type Completion = Box<dyn FnOnce(RequestResult) + Send>;

/// A submitted request.
#[derive(Debug)]
pub struct Ticket {
    pub id: RequestId,
    rx: Receiver<RequestResult>,
}

impl Ticket {
    /// Waits for the request to finish.
    pub fn wait(self) -> Result<RequestResult> {
        self.rx.recv().map_err(|_| Error::SchedulerGone)
    }
}

/// How the scheduler is set up.
#[derive(Clone)]
pub struct SchedulerConfig {
    pub store: Arc<LocalStore>,
    /// Build slots shared by all requests.
    pub max_jobs: usize,
    pub max_substitution_jobs: usize,
    pub substituter: Option<Arc<dyn Substituter>>,
    /// Serves the daemon socket of recursive builds (`kiln daemon` provides it); without
    /// one, derivations requiring `recursive-nix` fail.
    pub recursive: Option<Arc<dyn crate::recursive::RecursiveServer>>,
    /// What builds on build machines (kiln-remote's SSH builder); without one, builds
    /// stay here. The machines are each request's `builders`; their slots are counted
    /// here, across every request.
    pub remote: Option<Arc<dyn crate::remote::RemoteBuilder>>,
    /// This machine's speed factor against the machines' (`local-speed-factor`).
    pub local_speed_factor: f64,
    /// Sees every event once, whichever requests want its goal (a daemon's timeline,
    /// JSON log, metrics and list of active builds). Called on the scheduler thread: it
    /// must not block.
    pub observer: Option<Arc<dyn EventSink>>,
    /// Collect garbage while goals run when the store's file system is short of space
    /// (`min-free`).
    pub auto_gc: Option<crate::autogc::AutoGcConfig>,
}

impl SchedulerConfig {
    /// A scheduler for `store` with `max_jobs` local slots and nothing else: no
    /// substituter, no recursive builds, no machines.
    pub fn local(store: Arc<LocalStore>, max_jobs: usize) -> Self {
        SchedulerConfig {
            store,
            max_jobs,
            max_substitution_jobs: 1,
            substituter: None,
            recursive: None,
            remote: None,
            local_speed_factor: 1.0,
            observer: None,
            auto_gc: None,
        }
    }
}

impl std::fmt::Debug for SchedulerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SchedulerConfig(max_jobs = {}, remote builds: {})",
            self.max_jobs,
            self.remote.is_some()
        )
    }
}

enum Msg {
    Submit(RequestId, Request, Completion),
    Cancel(RequestId),
    JobEvent(GoalId, JobEvent),
    JobDone(GoalId, BuildResult, Vec<ValidPathInfo>),
    Locks(GoalId, std::result::Result<Vec<PathLock>, String>),
    Queried(
        GoalId,
        std::result::Result<Option<SubstitutableInfo>, String>,
    ),
    /// A substitution ended: an error, and whether it only found the path unavailable.
    Fetched(GoalId, std::result::Result<(), (bool, String)>),
    Realisations(
        GoalId,
        std::result::Result<BTreeMap<DrvOutput, kiln_format::realisation::Realisation>, String>,
    ),
    Hook(GoalId, HookMsg),
    /// A build on machine (index) ended.
    RemoteDone(GoalId, usize, crate::remote::RemoteOutcome),
    Wake(GoalId),
    Shutdown,
}

enum HookMsg {
    Declined,
    Postponed,
    Done(BuildResult),
    Failed(String),
}

/// Handle to the scheduler thread.
#[derive(Debug)]
pub struct Scheduler {
    tx: Sender<Msg>,
    next: std::sync::atomic::AtomicU64,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The automatic collector, if `min-free` asks for one.
    auto_gc: std::sync::Mutex<Option<crate::autogc::AutoGc>>,
}

impl Scheduler {
    /// Starts the scheduler thread.
    pub fn start(cfg: SchedulerConfig) -> Scheduler {
        let (tx, rx) = channel();
        let tx2 = tx.clone();
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let auto_gc = cfg
            .auto_gc
            .map(|c| crate::autogc::AutoGc::start(cfg.store.clone(), c, active.clone()));
        let thread = std::thread::Builder::new()
            .name("kiln-scheduler".into())
            .spawn(move || Worker::new(cfg, tx2, active).run(rx))
            .expect("spawning the scheduler thread");
        Scheduler {
            tx,
            next: std::sync::atomic::AtomicU64::new(1),
            thread: std::sync::Mutex::new(Some(thread)),
            auto_gc: std::sync::Mutex::new(auto_gc),
        }
    }

    /// Submits a request; its result arrives on the ticket.
    pub fn submit(&self, req: Request) -> Result<Ticket> {
        let (tx, rx) = channel();
        let id = self.submit_with(
            req,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        Ok(Ticket { id, rx })
    }

    /// Submits a request; `done` is called with its result (on the scheduler thread: it
    /// must not block).
    pub fn submit_with(&self, req: Request, done: Completion) -> Result<RequestId> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tx
            .send(Msg::Submit(id, req, done))
            .map_err(|_| Error::SchedulerGone)?;
        Ok(id)
    }

    /// Submits and waits.
    pub fn build(&self, req: Request) -> Result<RequestResult> {
        self.submit(req)?.wait()
    }

    /// Abandons a request (its client went away): goals nobody else wants are cancelled.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Msg::Cancel(id));
    }
}

impl Scheduler {
    /// Stops the scheduler: running builders are killed, pending requests end as
    /// cancelled. Returns once the scheduler thread has finished.
    pub fn stop(&self) {
        drop(
            self.auto_gc
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        let _ = self.tx.send(Msg::Shutdown);
        let t = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Success,
    Failed,
    NoSubstituters,
    IncompleteClosure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrvState {
    Init,
    HaveDerivation,
    OutputsSubstituted,
    InputsRealised,
    TryToBuild,
    WaitingForLocks,
    WaitingForHook,
    Building,
    /// Waiting for the resolved derivation built in its place (content-addressed inputs).
    Resolved,
    /// Asking the caches what its floating outputs became (their realisations).
    QueryingRealisations,
}

struct DrvGoal {
    drv_path: StorePath,
    wanted: BTreeSet<String>,
    need_restart: bool,
    retry_substitution: bool,
    mode: BuildMode,
    drv: Option<Arc<Derivation>>,
    state: DrvState,
    locks: Vec<PathLock>,
    input_paths: BTreeSet<StorePath>,
    job: Option<Arc<JobControl>>,
    /// The resolved derivation built in its place, once its inputs are built, and that
    /// build's result.
    resolved: Option<(StorePath, Arc<Derivation>)>,
    resolved_result: Option<BuildResult>,
    /// What the input derivations' goals reported their outputs to be, by input and output
    /// name (the only record of an impure input's outputs).
    input_outputs: BTreeMap<(StorePath, String), StorePath>,
    /// Outputs of made derivations (dynamic inputs) already asked for, by `.drv` and output:
    /// one asked for again was built without becoming known, an error, not a loop.
    dynamic_asked: BTreeSet<(StorePath, String)>,
    /// The outputs asked for when it went on to build (empty: all), which its resolved
    /// derivation is asked for: a resolved derivation whose outputs a cache knows then
    /// fetches only those (Nix's early cut-off), not every output.
    resolve_wanted: BTreeSet<String>,
    /// What the caches said its floating outputs became, by output name (`None` until
    /// they were asked): substituted like any path, then recorded as realisations.
    cache_realisations: Option<BTreeMap<String, kiln_format::realisation::Realisation>>,
    /// Build machines that failed this goal (by index), and how many attempts failed.
    failed_machines: BTreeSet<usize>,
    remote_attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubstState {
    Init,
    Querying,
    ReferencesValid,
    TryToRun,
    Fetching,
}

struct SubstGoal {
    path: StorePath,
    /// Its content address when a fixed-output derivation promised it (lets a cache of
    /// another store directory provide it).
    ca: Option<ContentAddress>,
    repair: bool,
    state: SubstState,
    info: Option<SubstitutableInfo>,
}

enum Kind {
    Drv(Box<DrvGoal>),
    Subst(Box<SubstGoal>),
}

struct Goal {
    key: String,
    kind: Kind,
    waitees: HashSet<GoalId>,
    waiters: HashSet<GoalId>,
    requests: HashSet<RequestId>,
    /// Requests that want this goal, directly or through waiters (for events).
    interested: BTreeSet<RequestId>,
    nr_failed: u32,
    nr_no_substituters: u32,
    nr_incomplete_closure: u32,
    settings: Arc<BuildSettings>,
    result: Option<BuildResult>,
    /// Temp roots this goal holds (released when it ends).
    roots: Vec<StorePath>,
    /// Temp roots the goals it waited for handed over when they succeeded (their outputs,
    /// its inputs), held until it ends too; not handed on further.
    inherited: Vec<StorePath>,
    /// Whether it was announced (`BuildQueued`, `SubstitutionQueued`): then its end is
    /// announced too, even when it is cancelled, so that watchers (active builds, metrics,
    /// timelines) do not keep it forever.
    announced: bool,
}

struct Req {
    targets: Vec<(Target, GoalId)>,
    results: Vec<Option<BuildResult>>,
    pending: usize,
    reply: Option<Completion>,
    sink: Arc<dyn EventSink>,
    keep_going: bool,
    failure: FailureKinds,
    nested: Option<u64>,
    /// Whether its client allows local builds (a client's `max-jobs` 0 does not).
    local_builds: bool,
    /// Roots of the outputs of the targets finished so far, for the requester.
    roots: Vec<StorePath>,
}

struct Worker {
    cfg: SchedulerConfig,
    tx: Sender<Msg>,
    next_goal: GoalId,
    goals: HashMap<GoalId, Goal>,
    drv_goals: HashMap<StorePath, GoalId>,
    subst_goals: HashMap<StorePath, GoalId>,
    requests: HashMap<RequestId, Req>,
    awake: BTreeSet<(String, GoalId)>,
    wanting_to_build: BTreeSet<(String, GoalId)>,
    /// Goals with `preferLocalBuild`, which may build even at max-jobs 0 when no other
    /// build runs.
    wanting_local: BTreeSet<(String, GoalId)>,
    wanting_to_substitute: BTreeSet<(String, GoalId)>,
    waiting_for_any_goal: Vec<GoalId>,
    /// Jobs in build slots, by goal (kept until the job thread reports, even if cancelled).
    building: HashSet<GoalId>,
    /// Builds on build machines, by goal: the machine's index (kept until the build's
    /// thread reports, as `building`).
    remote_building: HashMap<GoalId, usize>,
    /// Where builds go, and the machines' busy slots.
    placement: crate::placement::Placement,
    /// What each goal waiting for a slot needs (to wake one that can start).
    wait_needs: HashMap<GoalId, crate::placement::Needs>,
    /// A slot was freed or a goal began waiting since the waiting goals were last looked
    /// at (with machines, finding one that can start is a scan, not done on every turn).
    slots_changed: bool,
    /// Threads that run build jobs, reused from one build to the next.
    jobs: crate::pool::Pool,
    substituting: HashSet<GoalId>,
    /// Asynchronous operations in flight (lock waits, queries), for deadlock detection.
    in_flight: usize,
    hook_agents: crate::hook::AgentSlot,
    /// Goals whose offer the hook declined (they build locally from then on).
    hook_declined: HashSet<GoalId>,
    /// References of valid paths this scheduler has seen (registered by its builds or read
    /// from the database once), so that input closures cost hash lookups rather than a
    /// database walk per build — a 300-deep chain otherwise re-reads ~45,000 rows. References
    /// of a valid path never change; the cache is dropped whenever no goal is left.
    refs: HashMap<StorePath, Arc<[StorePath]>>,
    /// Recursive builds waiting for nested requests, with how many each has running; see
    /// `max_jobs`.
    lenders: HashMap<u64, usize>,
    /// How many goals exist (read by the automatic collector: it looks only while there
    /// is work).
    active: Arc<std::sync::atomic::AtomicUsize>,
}

/// How many build machines a build is tried on when machines fail (not the build).
const MAX_REMOTE_ATTEMPTS: u32 = 3;

fn drv_key(p: &StorePath, abs: &str) -> String {
    format!("b${}${abs}", p.derivation_name().unwrap_or(p.name()))
}

fn subst_key(p: &StorePath, abs: &str) -> String {
    format!("a${}${abs}", p.name())
}

impl Worker {
    fn new(
        cfg: SchedulerConfig,
        tx: Sender<Msg>,
        active: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Self {
        let placement = crate::placement::Placement::new(cfg.local_speed_factor);
        Worker {
            cfg,
            tx,
            active,
            next_goal: 1,
            goals: HashMap::new(),
            drv_goals: HashMap::new(),
            subst_goals: HashMap::new(),
            requests: HashMap::new(),
            awake: BTreeSet::new(),
            wanting_to_build: BTreeSet::new(),
            wanting_local: BTreeSet::new(),
            wanting_to_substitute: BTreeSet::new(),
            waiting_for_any_goal: Vec::new(),
            building: HashSet::new(),
            remote_building: HashMap::new(),
            placement,
            wait_needs: HashMap::new(),
            slots_changed: false,
            jobs: crate::pool::Pool::new("kiln-build"),
            substituting: HashSet::new(),
            in_flight: 0,
            hook_agents: Default::default(),
            hook_declined: HashSet::new(),
            refs: HashMap::new(),
            lenders: HashMap::new(),
        }
    }

    fn store(&self) -> &Arc<LocalStore> {
        &self.cfg.store
    }

    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            while let Ok(m) = rx.try_recv() {
                if !self.handle(m) {
                    return self.shutdown();
                }
            }
            if let Some((_, id)) = self.awake.pop_first() {
                self.work(id);
                continue;
            }
            if self.dispatch_slots() {
                continue;
            }
            self.detect_stall();
            if !self.awake.is_empty() {
                continue;
            }
            if self.goals.is_empty() {
                self.refs = HashMap::new();
            }
            self.active
                .store(self.goals.len(), std::sync::atomic::Ordering::Relaxed);
            match rx.recv() {
                Ok(m) => {
                    if !self.handle(m) {
                        return self.shutdown();
                    }
                }
                Err(_) => return self.shutdown(),
            }
        }
    }

    fn shutdown(&mut self) {
        let ids: Vec<GoalId> = self.goals.keys().copied().collect();
        for id in ids {
            if let Some(g) = self.goals.get(&id) {
                if let Kind::Drv(d) = &g.kind {
                    if let Some(j) = &d.job {
                        j.cancel();
                    }
                }
            }
        }
    }

    /// Returns false to stop.
    fn handle(&mut self, m: Msg) -> bool {
        match m {
            Msg::Submit(id, req, reply) => self.submit(id, req, reply),
            Msg::Cancel(id) => self.cancel_request(id, None),
            Msg::JobEvent(g, e) => self.job_event(g, e),
            Msg::JobDone(g, r, infos) => {
                self.building.remove(&g);
                self.slots_changed = true;
                self.build_done(g, r, infos);
            }
            Msg::RemoteDone(g, machine, outcome) => self.remote_done(g, machine, outcome),
            Msg::Locks(g, r) => {
                self.in_flight -= 1;
                self.locks_acquired(g, r);
            }
            Msg::Queried(g, r) => {
                self.in_flight -= 1;
                self.queried(g, r);
            }
            Msg::Realisations(g, r) => {
                self.in_flight -= 1;
                self.realisations_queried(g, r);
            }
            Msg::Fetched(g, r) => {
                self.substituting.remove(&g);
                self.fetched(g, r);
            }
            Msg::Hook(g, m) => {
                self.in_flight -= 1;
                self.hook_reply(g, m);
            }
            Msg::Wake(g) => {
                self.in_flight -= 1;
                self.wake(g);
            }
            Msg::Shutdown => return false,
        }
        true
    }
}

/// Passes a helper's lines (hook messages, substituter warnings) to goal `id` as log lines.
fn line_logger(tx: Sender<Msg>, id: GoalId) -> impl Fn(&str) {
    move |line: &str| {
        let _ = tx.send(Msg::JobEvent(
            id,
            JobEvent::Log(Arc::from(format!("{line}\n").into_bytes())),
        ));
    }
}

/// Whether a valid path's contents still match its recorded hash (for repair).
fn contents_good(store: &LocalStore, p: &StorePath) -> bool {
    let Ok(info) = store.path_info(p) else {
        return false;
    };
    kiln_store::verify::hash_path(store, p)
        .is_ok_and(|(h, n)| h == info.nar_hash && (info.nar_size == 0 || n == info.nar_size))
}

/// Results by target, for convenience.
pub fn outputs_of(results: &RequestResult) -> BTreeMap<String, StorePath> {
    let mut m = BTreeMap::new();
    for (_, r) in &results.results {
        for (n, p) in &r.outputs {
            m.insert(n.clone(), p.clone());
        }
    }
    m
}
