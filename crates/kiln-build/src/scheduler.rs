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
#[derive(Debug, Clone)]
pub struct RequestResult {
    pub results: Vec<(Target, BuildResult)>,
    pub failure: FailureKinds,
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
    Fetched(GoalId, std::result::Result<(), String>),
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
}

impl Scheduler {
    /// Starts the scheduler thread.
    pub fn start(cfg: SchedulerConfig) -> Scheduler {
        let (tx, rx) = channel();
        let tx2 = tx.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-scheduler".into())
            .spawn(move || Worker::new(cfg, tx2).run(rx))
            .expect("spawning the scheduler thread");
        Scheduler {
            tx,
            next: std::sync::atomic::AtomicU64::new(1),
            thread: std::sync::Mutex::new(Some(thread)),
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
    fn new(cfg: SchedulerConfig, tx: Sender<Msg>) -> Self {
        let placement = crate::placement::Placement::new(cfg.local_speed_factor);
        Worker {
            cfg,
            tx,
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

    // ---- requests --------------------------------------------------------------------

    fn submit(&mut self, id: RequestId, req: Request, reply: Completion) {
        let mut targets = Vec::new();
        for t in &req.targets {
            let gid = match t {
                Target::Derivation { drv, outputs } => {
                    self.make_drv_goal(drv, outputs, req.mode, &req.settings)
                }
                Target::Basic { drv_path, drv } => {
                    let id =
                        self.make_drv_goal(drv_path, &BTreeSet::new(), req.mode, &req.settings);
                    if let Some(d) = self.drv_mut(id) {
                        if d.drv.is_none() && d.state == DrvState::Init {
                            d.drv = Some(drv.clone());
                        }
                    }
                    id
                }
                Target::Path(p) => {
                    self.make_subst_goal(p, req.mode == BuildMode::Repair, &req.settings)
                }
            };
            targets.push((t.clone(), gid));
        }
        let n = targets.len();
        self.requests.insert(
            id,
            Req {
                targets: targets.clone(),
                results: vec![None; n],
                pending: n,
                reply: Some(reply),
                sink: req.sink.clone(),
                keep_going: req.settings.keep_going,
                failure: FailureKinds::default(),
                nested: req.nested,
                local_builds: req.settings.max_jobs != 0,
            },
        );
        if let Some(b) = req.nested {
            *self.lenders.entry(b).or_default() += 1;
        }
        for (_, gid) in &targets {
            if let Some(g) = self.goals.get_mut(gid) {
                g.requests.insert(id);
            }
            self.add_interest(*gid, id);
        }
        if n == 0 {
            self.finish_request(id);
        }
    }

    fn add_interest(&mut self, root: GoalId, req: RequestId) {
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            if let Some(g) = self.goals.get_mut(&id) {
                if g.interested.insert(req) {
                    stack.extend(g.waitees.iter().copied());
                }
            }
        }
    }

    fn target_done(&mut self, req: RequestId, goal: GoalId, result: BuildResult) {
        let Some(r) = self.requests.get_mut(&req) else {
            return;
        };
        let mut failed = false;
        for (i, (_, g)) in r.targets.iter().enumerate() {
            if *g == goal && r.results[i].is_none() {
                failed |= !result.success();
                r.failure.merge(result.failure);
                r.results[i] = Some(result.clone());
                r.pending -= 1;
            }
        }
        if failed && !r.keep_going {
            // First failure: give up on the rest of this request.
            self.cancel_request(req, Some("build was cancelled after another build failed"));
            return;
        }
        if r.pending == 0 {
            self.finish_request(req);
        }
    }

    fn finish_request(&mut self, id: RequestId) {
        let Some(r) = self.requests.remove(&id) else {
            return;
        };
        if let Some(b) = r.nested {
            if let Some(n) = self.lenders.get_mut(&b) {
                *n -= 1;
                if *n == 0 {
                    self.lenders.remove(&b);
                }
            }
        }
        let results = r
            .targets
            .into_iter()
            .zip(r.results)
            .map(|((t, _), res)| {
                (
                    t,
                    res.unwrap_or_else(|| {
                        BuildResult::failed(BuildStatus::MiscFailure, "build was cancelled")
                    }),
                )
            })
            .collect();
        if let Some(reply) = r.reply {
            reply(RequestResult {
                results,
                failure: r.failure,
            });
        }
    }

    /// Drops a request's claim on its goals (cancelling those nobody else wants) and
    /// answers it with what finished so far.
    fn cancel_request(&mut self, id: RequestId, reason: Option<&str>) {
        let Some(r) = self.requests.get(&id) else {
            return;
        };
        let goals: Vec<GoalId> = r.targets.iter().map(|(_, g)| *g).collect();
        for g in goals {
            if let Some(goal) = self.goals.get_mut(&g) {
                goal.requests.remove(&id);
            }
            self.remove_interest(g, id);
            self.maybe_cancel(g);
        }
        if let Some(r) = self.requests.get_mut(&id) {
            for res in r.results.iter_mut().filter(|x| x.is_none()) {
                *res = Some(BuildResult {
                    cancelled: true,
                    ..BuildResult::failed(
                        BuildStatus::MiscFailure,
                        reason.unwrap_or("build was cancelled"),
                    )
                });
            }
        }
        self.finish_request(id);
    }

    fn remove_interest(&mut self, root: GoalId, req: RequestId) {
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            let Some(g) = self.goals.get(&id) else {
                continue;
            };
            let still = g.requests.contains(&req)
                || g.waiters.iter().any(|w| {
                    self.goals
                        .get(w)
                        .is_some_and(|w| w.interested.contains(&req))
                });
            if !still {
                if let Some(g) = self.goals.get_mut(&id) {
                    if g.interested.remove(&req) {
                        stack.extend(g.waitees.iter().copied());
                    }
                }
            }
        }
    }

    fn emit(&self, goal: GoalId, e: Event) {
        let Some(g) = self.goals.get(&goal) else {
            return;
        };
        for r in &g.interested {
            if let Some(req) = self.requests.get(r) {
                req.sink.event(&e);
            }
        }
    }

    // ---- goal bookkeeping ------------------------------------------------------------

    fn new_goal(&mut self, key: String, kind: Kind, settings: &Arc<BuildSettings>) -> GoalId {
        let id = self.next_goal;
        self.next_goal += 1;
        self.goals.insert(
            id,
            Goal {
                key,
                kind,
                waitees: HashSet::new(),
                waiters: HashSet::new(),
                requests: HashSet::new(),
                interested: BTreeSet::new(),
                nr_failed: 0,
                nr_no_substituters: 0,
                nr_incomplete_closure: 0,
                settings: settings.clone(),
                result: None,
                roots: Vec::new(),
            },
        );
        self.wake(id);
        id
    }

    fn make_drv_goal(
        &mut self,
        drv: &StorePath,
        outputs: &BTreeSet<String>,
        mode: BuildMode,
        settings: &Arc<BuildSettings>,
    ) -> GoalId {
        if let Some(&id) = self.drv_goals.get(drv) {
            if let Some(Goal {
                kind: Kind::Drv(d), ..
            }) = self.goals.get_mut(&id)
            {
                // More wanted outputs for a running goal: it restarts (reference's
                // `addWantedOutputs`).
                if !d.wanted.is_empty() {
                    if outputs.is_empty() {
                        d.wanted.clear();
                        d.need_restart = true;
                    } else {
                        for o in outputs {
                            if d.wanted.insert(o.clone()) {
                                d.need_restart = true;
                            }
                        }
                    }
                }
            }
            return id;
        }
        let abs = self.store().print(drv);
        let key = drv_key(drv, &abs);
        let goal = DrvGoal {
            drv_path: drv.clone(),
            wanted: outputs.clone(),
            need_restart: false,
            retry_substitution: false,
            mode,
            drv: None,
            state: DrvState::Init,
            locks: Vec::new(),
            input_paths: BTreeSet::new(),
            job: None,
            resolved: None,
            resolved_result: None,
            input_outputs: BTreeMap::new(),
            failed_machines: BTreeSet::new(),
            remote_attempts: 0,
        };
        let id = self.new_goal(key, Kind::Drv(Box::new(goal)), settings);
        self.drv_goals.insert(drv.clone(), id);
        id
    }

    fn make_subst_goal(
        &mut self,
        p: &StorePath,
        repair: bool,
        settings: &Arc<BuildSettings>,
    ) -> GoalId {
        if let Some(&id) = self.subst_goals.get(p) {
            return id;
        }
        let abs = self.store().print(p);
        let goal = SubstGoal {
            path: p.clone(),
            ca: None,
            repair,
            state: SubstState::Init,
            info: None,
        };
        let id = self.new_goal(subst_key(p, &abs), Kind::Subst(Box::new(goal)), settings);
        self.subst_goals.insert(p.clone(), id);
        id
    }

    fn add_waitee(&mut self, waiter: GoalId, waitee: GoalId) {
        let interested = match self.goals.get_mut(&waiter) {
            Some(g) => {
                g.waitees.insert(waitee);
                g.interested.clone()
            }
            None => return,
        };
        if let Some(g) = self.goals.get_mut(&waitee) {
            g.waiters.insert(waiter);
        }
        for r in interested {
            self.add_interest(waitee, r);
        }
    }

    fn wake(&mut self, id: GoalId) {
        if let Some(g) = self.goals.get(&id) {
            self.awake.insert((g.key.clone(), id));
        }
    }

    /// A goal nobody waits for and no request wants is cancelled.
    fn maybe_cancel(&mut self, id: GoalId) {
        let Some(g) = self.goals.get(&id) else { return };
        if !g.waiters.is_empty() || !g.requests.is_empty() || g.result.is_some() {
            return;
        }
        let g = self.goals.remove(&id).expect("present");
        self.awake.remove(&(g.key.clone(), id));
        self.wanting_to_build.remove(&(g.key.clone(), id));
        self.wanting_local.remove(&(g.key.clone(), id));
        self.wanting_to_substitute.remove(&(g.key.clone(), id));
        self.wait_needs.remove(&id);
        match &g.kind {
            Kind::Drv(d) => {
                if self.drv_goals.get(&d.drv_path) == Some(&id) {
                    self.drv_goals.remove(&d.drv_path);
                }
                if let Some(j) = &d.job {
                    j.cancel();
                }
            }
            Kind::Subst(s) => {
                if self.subst_goals.get(&s.path) == Some(&id) {
                    self.subst_goals.remove(&s.path);
                }
            }
        }
        for r in &g.roots {
            self.cfg.store.remove_temp_root(r);
        }
        for w in g.waitees {
            if let Some(wg) = self.goals.get_mut(&w) {
                wg.waiters.remove(&id);
            }
            self.maybe_cancel(w);
        }
    }

    fn done(&mut self, id: GoalId, exit: Exit, result: BuildResult) {
        let event = match self.goals.get(&id) {
            None => return,
            Some(g) if g.result.is_some() => return,
            Some(g) => match &g.kind {
                Kind::Drv(d) => Some(Event::BuildFinished {
                    drv: self.store().print(&d.drv_path),
                    result: result.clone(),
                }),
                Kind::Subst(s)
                    if exit != Exit::Success || result.status == BuildStatus::Substituted =>
                {
                    Some(Event::SubstitutionFinished {
                        path: self.store().print(&s.path),
                        ok: exit == Exit::Success,
                        error: result.error.clone(),
                    })
                }
                Kind::Subst(_) => None,
            },
        };
        if let Some(e) = event {
            self.emit(id, e);
        }
        let Some(g) = self.goals.get_mut(&id) else {
            return;
        };
        g.result = Some(result.clone());
        self.hook_declined.remove(&id);
        let Some(g) = self.goals.get_mut(&id) else {
            return;
        };
        let waiters: Vec<GoalId> = g.waiters.drain().collect();
        let requests: Vec<RequestId> = g.requests.iter().copied().collect();
        let key = g.key.clone();
        let finished_drv = match self.goals.get(&id).map(|g| &g.kind) {
            Some(Kind::Drv(d)) => Some(d.drv_path.clone()),
            _ => None,
        };
        for w in waiters {
            if let Some(d) = self.drv_mut(w) {
                if d.state == DrvState::Resolved {
                    d.resolved_result = Some(result.clone());
                }
                if let Some(input) = &finished_drv {
                    for (name, p) in &result.outputs {
                        d.input_outputs
                            .insert((input.clone(), name.clone()), p.clone());
                    }
                }
            }
            self.waitee_done(w, id, exit);
        }
        for r in requests {
            self.target_done(r, id, result.clone());
        }
        // Remove the goal; later requests for the same path start a fresh one.
        if let Some(g) = self.goals.remove(&id) {
            self.awake.remove(&(key.clone(), id));
            self.wanting_to_build.remove(&(key.clone(), id));
            self.wanting_local.remove(&(key.clone(), id));
            self.wanting_to_substitute.remove(&(key, id));
            match &g.kind {
                Kind::Drv(d) => {
                    if self.drv_goals.get(&d.drv_path) == Some(&id) {
                        self.drv_goals.remove(&d.drv_path);
                    }
                }
                Kind::Subst(s) => {
                    if self.subst_goals.get(&s.path) == Some(&id) {
                        self.subst_goals.remove(&s.path);
                    }
                }
            }
            for r in &g.roots {
                self.cfg.store.remove_temp_root(r);
            }
            for w in g.waitees {
                if let Some(wg) = self.goals.get_mut(&w) {
                    wg.waiters.remove(&id);
                }
                self.maybe_cancel(w);
            }
        }
        // The reference wakes every goal that waits for "any goal" when one finishes.
        for w in std::mem::take(&mut self.waiting_for_any_goal) {
            self.wake(w);
        }
    }

    fn waitee_done(&mut self, waiter: GoalId, waitee: GoalId, exit: Exit) {
        let Some(g) = self.goals.get_mut(&waiter) else {
            return;
        };
        if g.result.is_some() || !g.waitees.remove(&waitee) {
            return;
        }
        if matches!(
            exit,
            Exit::Failed | Exit::NoSubstituters | Exit::IncompleteClosure
        ) {
            g.nr_failed += 1;
        }
        if exit == Exit::NoSubstituters {
            g.nr_no_substituters += 1;
        }
        if exit == Exit::IncompleteClosure {
            g.nr_incomplete_closure += 1;
        }
        if g.waitees.is_empty() || (exit == Exit::Failed && !g.settings.keep_going) {
            let rest: Vec<GoalId> = g.waitees.drain().collect();
            for w in rest {
                if let Some(wg) = self.goals.get_mut(&w) {
                    wg.waiters.remove(&waiter);
                }
                self.maybe_cancel(w);
            }
            self.wake(waiter);
        }
    }

    /// Build slots: `max-jobs`, plus one lent by each recursive build with nested requests
    /// running (it waits for their builds, which would otherwise need the slot it holds:
    /// with `max-jobs = 1`, a deadlock). One per build, however many requests it sends, so
    /// a builder cannot multiply the daemon's slots.
    fn max_jobs(&self) -> usize {
        self.cfg.max_jobs + self.lenders.len()
    }

    /// Wakes a goal waiting for a free slot, if any. Returns whether one was woken.
    fn dispatch_slots(&mut self) -> bool {
        if self.placement.has_machines() {
            if self.slots_changed {
                if let Some(id) = self.next_placeable() {
                    self.wake(id);
                    return true;
                }
                self.slots_changed = false;
            }
        } else {
            let max = self.max_jobs();
            if self.building.len() < max {
                // The next goal in key order, whichever queue it is in.
                let next = match (self.wanting_to_build.first(), self.wanting_local.first()) {
                    (Some(a), Some(b)) if b < a => self.wanting_local.pop_first(),
                    (Some(_), _) => self.wanting_to_build.pop_first(),
                    (None, Some(_)) => self.wanting_local.pop_first(),
                    (None, None) => None,
                };
                if let Some((_, id)) = next {
                    self.wait_needs.remove(&id);
                    self.wake(id);
                    return true;
                }
            } else if self.building.is_empty() {
                if let Some((_, id)) = self.wanting_local.pop_first() {
                    self.wait_needs.remove(&id);
                    self.wake(id);
                    return true;
                }
            }
        }
        if !self.wanting_to_substitute.is_empty()
            && self.substituting.len() < self.cfg.max_substitution_jobs.max(1)
        {
            if let Some((_, id)) = self.wanting_to_substitute.pop_first() {
                self.wake(id);
                return true;
            }
        }
        false
    }

    /// With build machines: the first waiting goal, in key order, that some machine (this
    /// one included) can take now, taken out of its queue.
    fn next_placeable(&mut self) -> Option<GoalId> {
        let local_running = self.building.len();
        let slots = self.max_jobs();
        let first = |q: &BTreeSet<(String, GoalId)>| {
            q.iter()
                .find(|(_, id)| {
                    self.wait_needs.get(id).is_none_or(|n| {
                        self.placement.choose(n, local_running, slots)
                            != crate::placement::Choice::Wait
                    })
                })
                .cloned()
        };
        let next = match (first(&self.wanting_to_build), first(&self.wanting_local)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        self.wanting_to_build.remove(&next);
        self.wanting_local.remove(&next);
        self.wait_needs.remove(&next.1);
        Some(next.1)
    }

    /// Nothing runs and nothing can start: fail the goals that wait for a build slot
    /// (the reference's "unable to start any build").
    fn detect_stall(&mut self) {
        if !self.awake.is_empty()
            || !self.building.is_empty()
            || !self.remote_building.is_empty()
            || !self.substituting.is_empty()
            || self.in_flight > 0
        {
            return;
        }
        let stuck: Vec<GoalId> = self.wanting_to_build.iter().map(|(_, id)| *id).collect();
        let disabled = self.max_jobs() == 0;
        for id in stuck {
            self.wanting_to_build.retain(|(_, g)| *g != id);
            self.wait_needs.remove(&id);
            let msg = "unable to start any build; either increase '--max-jobs' or enable distributed builds";
            if disabled {
                self.fail_drv_with(
                    id,
                    BuildStatus::MiscFailure,
                    msg.into(),
                    Some(crate::result::FailureDetail::LocalBuildsDisabled),
                );
            } else {
                self.fail_drv(id, BuildStatus::MiscFailure, msg.into());
            }
        }
        let waiting: Vec<GoalId> = std::mem::take(&mut self.waiting_for_any_goal);
        for id in waiting {
            self.wake(id);
        }
    }

    // ---- derivation goals --------------------------------------------------------------

    fn work(&mut self, id: GoalId) {
        let state = match self.goals.get(&id).map(|g| &g.kind) {
            Some(Kind::Drv(d)) => Ok(d.state),
            Some(Kind::Subst(s)) => Err(s.state),
            None => return,
        };
        match state {
            Ok(DrvState::Init) => self.drv_init(id),
            Ok(DrvState::HaveDerivation) => self.have_derivation(id),
            Ok(DrvState::OutputsSubstituted) => self.outputs_substituted(id),
            Ok(DrvState::InputsRealised) => self.inputs_realised(id),
            Ok(DrvState::TryToBuild) => self.try_to_build(id),
            Ok(DrvState::Resolved) => self.resolved_finished(id),
            Ok(DrvState::WaitingForLocks)
            | Ok(DrvState::WaitingForHook)
            | Ok(DrvState::Building) => {}
            Err(SubstState::Init) => self.subst_init(id),
            Err(SubstState::ReferencesValid) => self.references_valid(id),
            Err(SubstState::TryToRun) => self.try_to_run(id),
            Err(SubstState::Querying) | Err(SubstState::Fetching) => {}
        }
    }

    fn drv_mut(&mut self, id: GoalId) -> Option<&mut DrvGoal> {
        match self.goals.get_mut(&id).map(|g| &mut g.kind) {
            Some(Kind::Drv(d)) => Some(d),
            _ => None,
        }
    }

    fn set_state(&mut self, id: GoalId, s: DrvState) {
        if let Some(d) = self.drv_mut(id) {
            d.state = s;
        }
    }

    fn fail_drv(&mut self, id: GoalId, status: BuildStatus, msg: String) {
        self.fail_drv_with(id, status, msg, None)
    }

    fn fail_drv_with(
        &mut self,
        id: GoalId,
        status: BuildStatus,
        msg: String,
        detail: Option<crate::result::FailureDetail>,
    ) {
        if let Some(d) = self.drv_mut(id) {
            d.locks.clear();
            let drv = d.drv_path.clone();
            let abs = self.store().print(&drv);
            self.emit(
                id,
                Event::Message {
                    level: 0,
                    text: msg.clone(),
                },
            );
            tracing::debug!("{abs}: {msg}");
        }
        let r = BuildResult {
            detail,
            ..BuildResult::failed(status, msg)
        };
        self.done(id, Exit::Failed, r);
    }

    fn output_result(&self, id: GoalId, status: BuildStatus) -> BuildResult {
        let mut r = BuildResult::new(status);
        if let Some(Goal {
            kind: Kind::Drv(d), ..
        }) = self.goals.get(&id)
        {
            if let Some(drv) = &d.drv {
                for (n, p) in self.output_map(&d.drv_path, drv) {
                    if let Some(p) = p {
                        r.outputs.insert(n, p);
                    }
                }
            }
        }
        r
    }

    fn drv_init(&mut self, id: GoalId) {
        let store = self.store().clone();
        let Some(d) = self.drv_mut(id) else { return };
        let (drv_path, mode) = (d.drv_path.clone(), d.mode);
        if store.db().is_read_only() {
            let msg = format!(
                "cannot build derivation '{}' - no write access to the store",
                store.print(&drv_path)
            );
            return self.fail_drv(id, BuildStatus::MiscFailure, msg);
        }
        // Given in full (`Target::Basic`), or already in the store.
        if d.drv.is_some()
            || (mode == BuildMode::Normal && store.is_valid(&drv_path).unwrap_or(false))
        {
            return self.have_derivation(id);
        }
        let settings = self.goals[&id].settings.clone();
        let sub = self.make_subst_goal(&drv_path, false, &settings);
        self.add_waitee(id, sub);
        self.set_state(id, DrvState::HaveDerivation);
    }

    /// Output name → path where known: the derivation's own paths, or for outputs known
    /// only once built (floating content-addressed, deferred), their realisations.
    fn output_map(
        &self,
        drv_path: &StorePath,
        drv: &Derivation,
    ) -> BTreeMap<String, Option<StorePath>> {
        if drv.outputs.values().all(|o| o.path.is_some()) {
            return drv
                .outputs
                .iter()
                .map(|(n, o)| (n.clone(), o.path.clone()))
                .collect();
        }
        self.store()
            .output_map_of(drv_path, drv)
            .unwrap_or_else(|e| {
                tracing::warn!(
                    "looking up the outputs of '{}': {e}",
                    self.store().print(drv_path)
                );
                drv.outputs.keys().map(|n| (n.clone(), None)).collect()
            })
    }

    /// Invalid wanted outputs: their paths, or `None` for an output whose path is not known
    /// before it is built.
    fn invalid_outputs(&self, d: &DrvGoal, drv: &Derivation) -> Vec<Option<StorePath>> {
        let store = self.store();
        self.output_map(&d.drv_path, drv)
            .into_iter()
            .filter(|(n, _)| d.wanted.is_empty() || d.wanted.contains(n))
            .filter(|(_, p)| match p {
                None => true,
                Some(p) => {
                    let valid = store.is_valid(p).unwrap_or(false);
                    let good = valid && (d.mode != BuildMode::Repair || contents_good(store, p));
                    !good
                }
            })
            .map(|(_, p)| p)
            .collect()
    }

    fn have_derivation(&mut self, id: GoalId) {
        let store = self.store().clone();
        let nr_failed = self.goals.get(&id).map(|g| g.nr_failed).unwrap_or(0);
        let Some(d) = self.drv_mut(id) else { return };
        let drv_path = d.drv_path.clone();
        let abs = store.print(&drv_path);
        if nr_failed != 0 {
            return self.fail_drv(
                id,
                BuildStatus::MiscFailure,
                format!("cannot build missing derivation '{abs}'"),
            );
        }
        if d.drv.is_none() {
            match store.read_derivation(&drv_path) {
                Ok(drv) => {
                    // The derivation and its outputs must survive a concurrent collection.
                    let mut roots = vec![drv_path.clone()];
                    roots.extend(drv.output_paths().map(|(_, p)| p.clone()));
                    if store.add_temp_roots(&roots).is_ok() {
                        self.goals
                            .get_mut(&id)
                            .expect("goal exists")
                            .roots
                            .extend(roots);
                    }
                    let d = self.drv_mut(id).expect("goal exists");
                    d.drv = Some(Arc::new(drv));
                }
                Err(e) => {
                    return self.fail_drv(
                        id,
                        BuildStatus::MiscFailure,
                        format!("cannot read derivation '{abs}': {e}"),
                    )
                }
            }
        }
        let d = match self.goals.get(&id).map(|g| &g.kind) {
            Some(Kind::Drv(d)) => d,
            _ => return,
        };
        let drv = d.drv.clone().expect("loaded");
        let invalid = self.invalid_outputs(d, &drv);
        let mode = d.mode;
        if invalid.is_empty() && mode == BuildMode::Normal {
            let r = self.output_result(id, BuildStatus::AlreadyValid);
            return self.done(id, Exit::Success, r);
        }
        let settings = self.goals[&id].settings.clone();
        for p in invalid.iter().flatten() {
            if self.path_failed(id, p) {
                return;
            }
        }
        let allow = drv
            .env
            .get("allowSubstitutes")
            .map(|v| v == "1")
            .unwrap_or(true);
        if settings.use_substitutes
            && allow
            && self.cfg.substituter.is_some()
            && !settings.subst.is_empty()
            && mode != BuildMode::Check
        {
            let ca = drv
                .fixed_output()
                .map(|f| ContentAddress::Fixed(f.method, f.hash));
            for p in invalid.into_iter().flatten() {
                let sub = self.make_subst_goal(&p, mode == BuildMode::Repair, &settings);
                if let (Some(ca), Some(s)) = (&ca, self.subst_mut(sub)) {
                    s.ca.get_or_insert(*ca);
                }
                self.add_waitee(id, sub);
            }
        }
        if self.goals[&id].waitees.is_empty() {
            self.outputs_substituted(id);
        } else {
            self.set_state(id, DrvState::OutputsSubstituted);
        }
    }

    /// Failure caching: an output that failed before fails again, without building.
    fn path_failed(&mut self, id: GoalId, p: &StorePath) -> bool {
        let g = &self.goals[&id];
        if !g.settings.cache_failures || !self.store().has_failed(p).unwrap_or(false) {
            return false;
        }
        let msg = format!(
            "builder for '{}' failed previously (cached)",
            self.store().print(p)
        );
        let mut r = BuildResult::failed(BuildStatus::CachedFailure, msg.clone());
        r.failure.permanent = true;
        self.emit(
            id,
            Event::Message {
                level: 0,
                text: msg,
            },
        );
        self.done(id, Exit::Failed, r);
        true
    }

    fn outputs_substituted(&mut self, id: GoalId) {
        let store = self.store().clone();
        let g = &self.goals[&id];
        let (nr_failed, nr_ns, nr_ic, settings) = (
            g.nr_failed,
            g.nr_no_substituters,
            g.nr_incomplete_closure,
            g.settings.clone(),
        );
        let Some(d) = self.drv_mut(id) else { return };
        let abs = store.print(&d.drv_path);
        if nr_failed > 0 && nr_failed > nr_ns + nr_ic && !settings.fallback {
            return self.fail_drv(
                id,
                BuildStatus::MiscFailure,
                format!("some substitutes for the outputs of derivation '{abs}' failed (usually happens due to networking issues); try '--fallback' to build derivation from source "),
            );
        }
        if nr_ic > 0 && !d.retry_substitution {
            d.retry_substitution = true;
        }
        if let Some(g) = self.goals.get_mut(&id) {
            g.nr_failed = 0;
            g.nr_no_substituters = 0;
            g.nr_incomplete_closure = 0;
        }
        let d = self.drv_mut(id).expect("goal exists");
        if d.need_restart {
            d.need_restart = false;
            return self.have_derivation(id);
        }
        let drv = d.drv.clone().expect("loaded");
        let mode = d.mode;
        let d_ref = match self.goals.get(&id).map(|g| &g.kind) {
            Some(Kind::Drv(d)) => d,
            _ => return,
        };
        let nr_invalid = self.invalid_outputs(d_ref, &drv).len();
        if mode == BuildMode::Normal && nr_invalid == 0 {
            let r = self.output_result(id, BuildStatus::Substituted);
            return self.done(id, Exit::Success, r);
        }
        if mode == BuildMode::Repair && nr_invalid == 0 {
            let r = self.output_result(id, BuildStatus::AlreadyValid);
            return self.done(id, Exit::Success, r);
        }
        if mode == BuildMode::Check && nr_invalid > 0 {
            return self.fail_drv(
                id,
                BuildStatus::MiscFailure,
                format!("'{abs}' is missing outputs; build it normally before using '--check'"),
            );
        }
        // Build: all outputs from now on, after the inputs.
        self.drv_mut(id).expect("goal exists").wanted.clear();
        let input_mode = if mode == BuildMode::Repair {
            BuildMode::Repair
        } else {
            BuildMode::Normal
        };
        // A pure derivation may not depend on an impure one, and that is refused before the
        // impure one is built. Only a derivation whose outputs wait for its inputs can
        // (an impure input's hash defers them), so no other derivation's inputs are read.
        if drv.needs_resolution() && drv.is_sandboxed() {
            for p in drv.input_drvs.keys() {
                if store.read_derivation(p).is_ok_and(|i| i.is_impure()) {
                    let msg = format!(
                        "pure derivation '{abs}' depends on impure derivation '{}'",
                        store.print(p)
                    );
                    return self.fail_drv(id, BuildStatus::MiscFailure, msg);
                }
            }
        }
        for (p, outs) in &drv.input_drvs {
            let sub = self.make_drv_goal(p, outs, input_mode, &settings);
            self.add_waitee(id, sub);
        }
        for p in &drv.input_srcs {
            let sub = self.make_subst_goal(p, false, &settings);
            self.add_waitee(id, sub);
        }
        if self.goals[&id].waitees.is_empty() {
            self.inputs_realised(id);
        } else {
            self.set_state(id, DrvState::InputsRealised);
        }
    }

    fn inputs_realised(&mut self, id: GoalId) {
        let store = self.store().clone();
        let nr_failed = self.goals[&id].nr_failed;
        let Some(d) = self.drv_mut(id) else { return };
        let abs = store.print(&d.drv_path);
        if nr_failed != 0 {
            let msg = format!("{nr_failed} dependencies of derivation '{abs}' failed to build");
            self.emit(
                id,
                Event::Message {
                    level: 0,
                    text: msg.clone(),
                },
            );
            return self.done(
                id,
                Exit::Failed,
                BuildResult {
                    detail: Some(crate::result::FailureDetail::Dependencies(
                        nr_failed as usize,
                    )),
                    ..BuildResult::failed(BuildStatus::DependencyFailed, msg)
                },
            );
        }
        if d.retry_substitution {
            d.retry_substitution = false;
            return self.have_derivation(id);
        }
        let drv = d.drv.clone().expect("loaded");
        // The input closure: outputs the derivation asks for from each input, and sources.
        let mut roots = Vec::new();
        let mut realised: BTreeMap<(StorePath, String), StorePath> = BTreeMap::new();
        let mut dynamic_inputs = false;
        for (p, outs) in &drv.input_drvs {
            // The input's goal has it parsed already, unless it was valid from the start.
            let loaded = self
                .drv_goals
                .get(p)
                .and_then(|g| match &self.goals.get(g)?.kind {
                    Kind::Drv(d) => d.drv.clone(),
                    Kind::Subst(_) => None,
                });
            let input = match loaded.map_or_else(|| store.read_derivation(p).map(Arc::new), Ok) {
                Ok(x) => x,
                Err(e) => return self.fail_drv(id, BuildStatus::MiscFailure, e.to_string()),
            };
            // A pure derivation's result must not depend on an impure one's (a fixed-output
            // derivation's may: its hash is checked).
            if input.is_impure() && !drv.is_impure() && !drv.is_fixed_output() {
                let msg = format!(
                    "pure derivation '{abs}' depends on impure derivation '{}'",
                    store.print(p)
                );
                return self.fail_drv(id, BuildStatus::MiscFailure, msg);
            }
            let mut known = self.output_map(p, &input);
            if known.values().any(Option::is_none) {
                if let Some(Kind::Drv(d)) = self.goals.get(&id).map(|g| &g.kind) {
                    for (o, path) in known.iter_mut().filter(|(_, x)| x.is_none()) {
                        *path = d.input_outputs.get(&(p.clone(), o.clone())).cloned();
                    }
                }
            }
            // A fixed-output derivation holds placeholders for inputs known only once built.
            dynamic_inputs |= outs
                .iter()
                .any(|o| input.outputs.get(o).is_some_and(|x| x.path.is_none()));
            for o in outs {
                match known.get(o).cloned().flatten() {
                    Some(op) => {
                        realised.insert((p.clone(), o.clone()), op.clone());
                        roots.push(op);
                    }
                    None => {
                        return self.fail_drv(
                            id,
                            BuildStatus::MiscFailure,
                            format!("derivation '{abs}' requires non-existent output '{o}' from input derivation '{}'", store.print(p)),
                        )
                    }
                }
            }
        }
        if drv.needs_resolution() || (dynamic_inputs && drv.is_fixed_output()) {
            return self.resolve(id, &drv, &realised);
        }
        roots.extend(drv.input_srcs.iter().cloned());
        let closure = match self.closure(roots) {
            Ok(c) => c,
            Err(e) => return self.fail_drv(id, BuildStatus::MiscFailure, e.to_string()),
        };
        let d = self.drv_mut(id).expect("goal exists");
        d.input_paths = closure;
        d.state = DrvState::TryToBuild;
        self.wake(id);
    }

    /// Builds, in this derivation's place, the derivation it resolves to now that its inputs
    /// are built (their outputs' paths substituted for the input derivations), as Nix does
    /// for content-addressed inputs. The resolved `.drv` is written to the store.
    fn resolve(
        &mut self,
        id: GoalId,
        drv: &Derivation,
        realised: &BTreeMap<(StorePath, String), StorePath>,
    ) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let Some(d) = self.drv_mut(id) else { return };
        let abs = store.print(&d.drv_path);
        let (mode, wanted) = (d.mode, d.wanted.clone());
        let resolved = drv
            .resolve(store.store_dir(), |p, o| {
                realised.get(&(p.clone(), o.to_string())).cloned()
            })
            .map_err(|e| e.to_string())
            .and_then(|r| {
                let text = r.to_aterm(store.store_dir());
                let path = store
                    .add_text(
                        &format!("{}.drv", r.name),
                        &text,
                        &r.references(),
                        kiln_store::AddOptions::default(),
                    )
                    .map_err(|e| e.to_string())?
                    .path;
                Ok((path, r))
            });
        let (path, resolved) = match resolved {
            Ok(x) => x,
            Err(e) => return self.fail_drv(id, BuildStatus::MiscFailure, e),
        };
        self.emit(
            id,
            Event::Message {
                level: 3,
                text: format!("resolved derivation: '{abs}' -> '{}'", store.print(&path)),
            },
        );
        // `add_text` made the resolved derivation a temporary root; it is this goal's, and
        // goes when the goal ends.
        if let Some(g) = self.goals.get_mut(&id) {
            g.roots.push(path.clone());
        }
        let resolved = Arc::new(resolved);
        let d = self.drv_mut(id).expect("goal exists");
        d.resolved = Some((path.clone(), resolved.clone()));
        d.state = DrvState::Resolved;
        let sub = self.make_drv_goal(&path, &wanted, mode, &settings);
        if let Some(rd) = self.drv_mut(sub) {
            rd.drv.get_or_insert(resolved);
        }
        self.add_waitee(id, sub);
    }

    /// The resolved derivation is built: its outputs are this derivation's, recorded as
    /// realisations of this derivation's outputs (with the input realisations they refer
    /// to), so that the next build of it finds them without resolving again.
    fn resolved_finished(&mut self, id: GoalId) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let Some(d) = self.drv_mut(id) else { return };
        let (drv_path, drv) = (d.drv_path.clone(), d.drv.clone().expect("loaded"));
        let Some((rpath, rdrv)) = d.resolved.clone() else {
            return self.fail_drv(id, BuildStatus::MiscFailure, "resolution lost".into());
        };
        let result = d.resolved_result.take().unwrap_or_else(|| {
            BuildResult::failed(
                BuildStatus::MiscFailure,
                format!("building '{}' failed", store.print(&rpath)),
            )
        });
        if !result.success() {
            return self.done(id, Exit::Failed, result);
        }
        // What the resolved build reported (impure outputs are recorded nowhere else).
        let mut outputs: BTreeMap<String, Option<StorePath>> = self.output_map(&rpath, &rdrv);
        for (name, p) in &result.outputs {
            outputs.insert(name.clone(), Some(p.clone()));
        }
        let registered = (|| -> std::result::Result<BTreeMap<String, StorePath>, String> {
            let h = store
                .output_hash(&drv_path, &drv)
                .map_err(|e| e.to_string())?;
            let keys = crate::job::secret_keys(&settings)?;
            // The resolved derivation's own outputs are recorded too when its build did not
            // do it (it is not floating), as Nix does for every build once resolution is
            // in play.
            let rhash = (!rdrv.is_floating())
                .then(|| store.output_hash(&rpath, &rdrv))
                .transpose()
                .map_err(|e| e.to_string())?;
            let mut out = BTreeMap::new();
            for (name, p) in outputs {
                let Some(p) = p else { continue };
                out.insert(name.clone(), p.clone());
                // Impure outputs are never reused, so nothing records them.
                if drv.is_impure() {
                    continue;
                }
                if let Some(rh) = rhash {
                    let id = DrvOutput::new(rh, &name);
                    if store
                        .query_realisation(&id)
                        .map_err(|e| e.to_string())?
                        .is_none()
                    {
                        job::record_realisation(&store, id, &p, None, &keys)?;
                    }
                }
                let inputs_of = (!drv.is_fixed_output()).then_some(&*drv);
                job::record_realisation(&store, DrvOutput::new(h, &name), &p, inputs_of, &keys)?;
            }
            Ok(out)
        })();
        match registered {
            Ok(outputs) => {
                let mut r = result;
                if r.status == BuildStatus::AlreadyValid {
                    r.status = BuildStatus::ResolvesToAlreadyValid;
                }
                r.outputs = outputs;
                self.done(id, Exit::Success, r)
            }
            Err(e) => self.fail_drv(
                id,
                BuildStatus::MiscFailure,
                format!(
                    "registering the outputs of '{}': {e}",
                    store.print(&drv_path)
                ),
            ),
        }
    }

    /// The closure of valid `roots` (see `refs`); fails if one of them is not valid.
    fn closure(&mut self, roots: Vec<StorePath>) -> kiln_store::Result<BTreeSet<StorePath>> {
        let mut seen = BTreeSet::new();
        let mut todo = roots;
        while let Some(p) = todo.pop() {
            if seen.contains(&p) {
                continue;
            }
            let refs = match self.refs.get(&p) {
                Some(r) => r.clone(),
                None => {
                    let r: Arc<[StorePath]> =
                        self.store().query_references(&p)?.into_iter().collect();
                    self.refs.insert(p.clone(), r.clone());
                    r
                }
            };
            todo.extend(refs.iter().filter(|r| !seen.contains(*r)).cloned());
            seen.insert(p);
        }
        Ok(seen)
    }

    fn try_to_build(&mut self, id: GoalId) {
        let store = self.store().clone();
        let Some(d) = self.drv_mut(id) else { return };
        let drv = d.drv.clone().expect("loaded");
        // Another goal of ours holds an output lock: sleep until some goal finishes.
        if drv.output_paths().any(|(_, p)| store.is_locked_by_me(p)) {
            self.waiting_for_any_goal.push(id);
            return;
        }
        if d.locks.is_empty() {
            let mut paths: Vec<StorePath> = drv.output_paths().map(|(_, p)| p.clone()).collect();
            paths.sort();
            let mut locks = Vec::new();
            for p in &paths {
                match store.lock_path(p, false) {
                    Ok(Some(l)) => locks.push(l),
                    Ok(None) => {
                        // Held by another process: wait for it in the kernel, on a thread
                        // (no polling), then come back here with the locks.
                        drop(locks);
                        d.state = DrvState::WaitingForLocks;
                        self.in_flight += 1;
                        let tx = self.tx.clone();
                        let st = store.clone();
                        std::thread::spawn(move || {
                            let mut got = Vec::new();
                            for p in &paths {
                                match st.lock_path(p, true) {
                                    Ok(Some(l)) => got.push(l),
                                    Ok(None) => {}
                                    Err(e) => {
                                        let _ = tx.send(Msg::Locks(id, Err(e.to_string())));
                                        return;
                                    }
                                }
                            }
                            let _ = tx.send(Msg::Locks(id, Ok(got)));
                        });
                        return;
                    }
                    Err(e) => return self.fail_drv(id, BuildStatus::MiscFailure, e.to_string()),
                }
            }
            self.drv_mut(id).expect("goal exists").locks = locks;
        }
        self.try_to_build_locked(id);
    }

    fn locks_acquired(&mut self, id: GoalId, r: std::result::Result<Vec<PathLock>, String>) {
        let Some(d) = self.drv_mut(id) else { return };
        match r {
            Ok(locks) => {
                d.locks = locks;
                d.state = DrvState::TryToBuild;
                self.try_to_build_locked(id);
            }
            Err(e) => self.fail_drv(id, BuildStatus::MiscFailure, e),
        }
    }

    fn try_to_build_locked(&mut self, id: GoalId) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let Some(d) = self.drv_mut(id) else { return };
        let drv = d.drv.clone().expect("loaded");
        let mode = d.mode;
        let abs = store.print(&d.drv_path);
        let valid: BTreeSet<String> = drv
            .output_paths()
            .filter(|(_, p)| {
                store.is_valid(p).unwrap_or(false)
                    && (mode != BuildMode::Repair || contents_good(&store, p))
            })
            .map(|(n, _)| n.to_string())
            .collect();
        // Someone else (another process) built it while we waited for the locks.
        if mode != BuildMode::Check && valid.len() == drv.outputs.len() {
            for l in d.locks.iter_mut() {
                l.set_delete(true);
            }
            d.locks.clear();
            let r = self.output_result(id, BuildStatus::AlreadyValid);
            return self.done(id, Exit::Success, r);
        }
        let outputs: Vec<StorePath> = drv.output_paths().map(|(_, p)| p.clone()).collect();
        for p in &outputs {
            if self.path_failed(id, p) {
                return;
            }
        }
        // Build slots: a derivation that prefers local building may take one even at
        // max-jobs 0 when nothing else runs.
        let prefer_local = drv.env.get("preferLocalBuild").is_some_and(|v| v == "1");
        // Offer the build to the hook first, unless it must be local (check and repair
        // modes, `preferLocalBuild`) or the hook already declined it: another machine may
        // have the platform or the features this one lacks.
        if let Some(program) = settings.build_hook.clone() {
            if mode == BuildMode::Normal
                && settings.use_build_hook
                && !prefer_local
                && !self.hook_declined.contains(&id)
            {
                return self.offer_to_hook(id, program);
            }
        }
        // Where it builds: here, or on a build machine (normal builds only: checks and
        // repairs compare with or replace what is here). Slots are the daemon's, shared by
        // every client, so a client's own max-jobs only ever forbids local builds; and it
        // decides for its own requests only: one client's 0 must not fail another's build.
        let local_error = settings.check_can_build(&drv, &abs).err();
        let local_allowed = prefer_local || self.local_builds_wanted(id);
        let remote = mode == BuildMode::Normal
            && settings.use_build_hook
            && self.cfg.remote.is_some()
            && !settings.builders.trim().is_empty();
        let mut allowed = BTreeSet::new();
        if remote {
            match crate::machines::parse_builders(&settings.builders, &settings.system) {
                Ok(ms) => {
                    for m in ms {
                        allowed.insert(self.placement.register(m));
                    }
                }
                Err(e) => return self.fail_drv(id, BuildStatus::MiscFailure, e.to_string()),
            }
        }
        let d = self.drv_mut(id).expect("goal exists");
        let needs = crate::placement::Needs {
            system: drv.platform.clone(),
            features: crate::settings::required_system_features(&drv),
            local: local_error.is_none() && local_allowed,
            prefer_local: prefer_local && local_error.is_none(),
            remote,
            allowed,
            excluded: d.failed_machines.clone(),
        };
        match self
            .placement
            .choose(&needs, self.building.len(), self.max_jobs())
        {
            crate::placement::Choice::Local => self.start_job(id, valid),
            crate::placement::Choice::Remote(i) => self.start_remote(id, i),
            crate::placement::Choice::Wait => {
                let d = self.drv_mut(id).expect("goal exists");
                d.locks.clear();
                let key = self.goals[&id].key.clone();
                if needs.prefer_local {
                    self.wanting_local.insert((key, id));
                } else {
                    self.wanting_to_build.insert((key, id));
                }
                self.wait_needs.insert(id, needs);
                self.slots_changed = true;
            }
            crate::placement::Choice::Nowhere => {
                let d = self.drv_mut(id).expect("goal exists");
                d.locks.clear();
                let machines = self.placement.why_nowhere(&needs);
                let with_machines = |msg: String| match &machines {
                    Some(why) => format!("{msg}\nNo build machine can build it either: {why}."),
                    None => msg,
                };
                let disabled = "unable to start any build; either increase '--max-jobs' or enable distributed builds";
                match (local_error, machines.is_some()) {
                    (Some(msg), _) => {
                        self.fail_drv(id, BuildStatus::MiscFailure, with_machines(msg))
                    }
                    // Machines were named but none can take it: say why, rather than
                    // Nix's "local builds are disabled" alone.
                    (None, true) => {
                        self.fail_drv(id, BuildStatus::MiscFailure, with_machines(disabled.into()))
                    }
                    (None, false) => self.fail_drv_with(
                        id,
                        BuildStatus::MiscFailure,
                        disabled.into(),
                        Some(crate::result::FailureDetail::LocalBuildsDisabled),
                    ),
                }
            }
        }
    }

    /// Whether some request that wants goal `id` (directly or through the goals waiting
    /// for it) allows local builds.
    fn local_builds_wanted(&self, id: GoalId) -> bool {
        let Some(g) = self.goals.get(&id) else {
            return true;
        };
        g.interested.is_empty()
            || g.interested
                .iter()
                .any(|r| self.requests.get(r).is_none_or(|q| q.local_builds))
    }

    fn offer_to_hook(&mut self, id: GoalId, program: String) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        // Nix's `amWilling`: a machine that is busy is then waited for, not declined.
        let can_local = self.local_builds_wanted(id) && self.building.len() < self.max_jobs();
        let tx = self.tx.clone();
        let slot = self.hook_agents.clone();
        let d = self.drv_mut(id).expect("goal exists");
        d.state = DrvState::WaitingForHook;
        let drv = d.drv.clone().expect("loaded");
        let drv_path = d.drv_path.clone();
        let inputs = d.input_paths.clone();
        self.in_flight += 1;
        std::thread::spawn(move || {
            let abs = store.print(&drv_path);
            let features: Vec<String> = crate::settings::required_system_features(&drv)
                .into_iter()
                .collect();
            let log = line_logger(tx.clone(), id);
            let trace = (
                settings.max_silent_time,
                settings.print_build_trace,
                settings.timeout,
            );
            let reply = crate::hook::offer(
                &slot,
                &program,
                &settings.system,
                trace,
                can_local,
                &drv.platform,
                &abs,
                &features,
                &log,
            );
            let msg = match reply {
                Ok(crate::hook::Reply::Decline) => HookMsg::Declined,
                Ok(crate::hook::Reply::Postpone) => HookMsg::Postponed,
                Err(e) => HookMsg::Failed(e.to_string()),
                Ok(crate::hook::Reply::Accept(agent)) => {
                    let start = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let _ = tx.send(Msg::JobEvent(
                        id,
                        JobEvent::Started {
                            pid: 0,
                            log_file: String::new(),
                            round: 1,
                            rounds: 1,
                            machine: String::new(),
                        },
                    ));
                    let outputs: Vec<String> =
                        drv.output_paths().map(|(_, p)| store.print(p)).collect();
                    let tx_log = tx.clone();
                    let log = move |b: &[u8]| {
                        let _ = tx_log.send(Msg::JobEvent(id, JobEvent::Log(Arc::from(b))));
                    };
                    let inputs =
                        crate::hook::input_list(&store, &drv_path, &inputs).unwrap_or_default();
                    let mut r = match agent.run(&inputs, &outputs, &log) {
                        Ok(0) => {
                            let missing: Vec<&StorePath> = drv
                                .output_paths()
                                .map(|(_, p)| p)
                                .filter(|p| !store.is_valid(p).unwrap_or(false))
                                .collect();
                            if missing.is_empty() {
                                let mut r = BuildResult::new(BuildStatus::Built);
                                r.times_built = 1;
                                for (n, p) in drv.output_paths() {
                                    r.outputs.insert(n.to_string(), p.clone());
                                }
                                r
                            } else {
                                BuildResult::failed(
                                    BuildStatus::MiscFailure,
                                    format!(
                                        "the build hook did not produce output path '{}'",
                                        store.print(missing[0])
                                    ),
                                )
                            }
                        }
                        Ok(100) => BuildResult::failed(
                            BuildStatus::PermanentFailure,
                            format!("builder for '{abs}' failed with exit code 100"),
                        ),
                        Ok(101) => BuildResult::failed(
                            BuildStatus::TimedOut,
                            format!("building '{abs}' timed out"),
                        ),
                        Ok(c) => BuildResult::failed(
                            BuildStatus::MiscFailure,
                            format!("the build hook for '{abs}' failed with exit code {c}"),
                        ),
                        Err(e) => BuildResult::failed(BuildStatus::MiscFailure, e.to_string()),
                    };
                    r.start_time = start;
                    r.stop_time = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    HookMsg::Done(r)
                }
            };
            let _ = tx.send(Msg::Hook(id, msg));
        });
    }

    fn hook_reply(&mut self, id: GoalId, m: HookMsg) {
        if !self.goals.contains_key(&id) {
            return;
        }
        match m {
            HookMsg::Declined => {
                self.hook_declined.insert(id);
                self.set_state(id, DrvState::TryToBuild);
                self.try_to_build_locked(id);
            }
            HookMsg::Postponed => {
                // Not now: release the locks and ask again in a moment (or when a goal ends).
                if let Some(d) = self.drv_mut(id) {
                    d.locks.clear();
                    d.state = DrvState::TryToBuild;
                }
                self.in_flight += 1;
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    let _ = tx.send(Msg::Wake(id));
                });
            }
            HookMsg::Failed(e) => self.fail_drv(id, BuildStatus::MiscFailure, e),
            HookMsg::Done(r) => {
                self.hook_declined.remove(&id);
                self.build_done(id, r, Vec::new());
            }
        }
    }

    fn start_job(&mut self, id: GoalId, valid: BTreeSet<String>) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let tx = self.tx.clone();
        let tx2 = tx.clone();
        let d = self.drv_mut(id).expect("goal exists");
        let drv_shown = store.print(&d.drv_path);
        d.state = DrvState::Building;
        let ctl = Arc::new(JobControl::default());
        d.job = Some(ctl.clone());
        let spec = JobSpec {
            store,
            drv_path: d.drv_path.clone(),
            drv: d.drv.clone().expect("loaded"),
            settings,
            mode: d.mode,
            valid_outputs: valid,
            input_paths: d.input_paths.clone(),
            recursive: self.cfg.recursive.clone(),
            events: Box::new(move |e| {
                let _ = tx2.send(Msg::JobEvent(id, e));
            }),
        };
        self.building.insert(id);
        let tx3 = tx.clone();
        let started = self.jobs.execute(move || {
            let (r, infos) = job::run(spec, &ctl);
            let _ = tx.send(Msg::JobDone(id, r, infos));
        });
        if let Err(e) = started {
            let r = BuildResult::failed(
                BuildStatus::MiscFailure,
                format!(
                    "cannot start a thread for the build of '{}': {e}",
                    drv_shown
                ),
            );
            let _ = tx3.send(Msg::JobDone(id, r, Vec::new()));
        }
    }

    /// Sends the build to machine `i` (see [`crate::remote`]); it holds the output locks
    /// here meanwhile, as a local build does.
    fn start_remote(&mut self, id: GoalId, i: usize) {
        let Some(remote) = self.cfg.remote.clone() else {
            return self.fail_drv(id, BuildStatus::MiscFailure, "no remote builder".into());
        };
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let machine = self.placement.machine(i).clone();
        let tx = self.tx.clone();
        let tx2 = tx.clone();
        let d = self.drv_mut(id).expect("goal exists");
        d.state = DrvState::Building;
        let ctl = Arc::new(JobControl::default());
        d.job = Some(ctl.clone());
        let job = crate::remote::RemoteJob {
            store,
            drv_path: d.drv_path.clone(),
            drv: d.drv.clone().expect("loaded"),
            inputs: d.input_paths.clone(),
            settings,
            events: Arc::new(move |e| {
                let _ = tx2.send(Msg::JobEvent(id, e));
            }),
        };
        self.placement.start(i);
        self.remote_building.insert(id, i);
        let tx3 = tx.clone();
        let started = self.jobs.execute(move || {
            let outcome = remote.build(&machine, job, &ctl);
            let _ = tx.send(Msg::RemoteDone(id, i, outcome));
        });
        if let Err(e) = started {
            let outcome = crate::remote::RemoteOutcome::MachineFailed(format!(
                "cannot start a thread for the remote build: {e}"
            ));
            let _ = tx3.send(Msg::RemoteDone(id, i, outcome));
        }
    }

    /// A build on machine `i` ended. When the machine failed (not the build), the build is
    /// placed again without it, at most [`MAX_REMOTE_ATTEMPTS`] times.
    fn remote_done(&mut self, id: GoalId, i: usize, outcome: crate::remote::RemoteOutcome) {
        self.remote_building.remove(&id);
        self.slots_changed = true;
        let failed = matches!(outcome, crate::remote::RemoteOutcome::MachineFailed(_));
        let left_out = self.placement.finish(i, failed);
        let (r, infos) = match outcome {
            crate::remote::RemoteOutcome::Finished(r, infos) => (r, infos),
            crate::remote::RemoteOutcome::MachineFailed(e) => {
                let uri = self.placement.machine(i).uri.clone();
                let secs = left_out.map(|d| d.as_secs()).unwrap_or(0);
                tracing::warn!("cannot build on '{uri}': {e}");
                let store = self.store().clone();
                let Some(d) = self.drv_mut(id) else { return };
                d.job = None;
                d.failed_machines.insert(i);
                d.remote_attempts += 1;
                let attempts = d.remote_attempts;
                let drv = store.print(&d.drv_path);
                if attempts >= MAX_REMOTE_ATTEMPTS {
                    let msg = format!(
                        "building '{drv}' failed on {attempts} build machines; the last, '{uri}': {e}"
                    );
                    return self.fail_drv(id, BuildStatus::MiscFailure, msg);
                }
                self.emit(
                    id,
                    Event::Message {
                        level: 1,
                        text: format!(
                            "warning: cannot build '{drv}' on '{uri}': {e}; trying elsewhere (the machine is left out for {secs} s)"
                        ),
                    },
                );
                self.set_state(id, DrvState::TryToBuild);
                return self.try_to_build_locked(id);
            }
        };
        self.build_done(id, r, infos);
    }

    fn job_event(&mut self, id: GoalId, e: JobEvent) {
        // A substitution's lines are messages (an unsigned or unreachable cache).
        if let (Some(Kind::Subst(_)), JobEvent::Log(data)) =
            (self.goals.get(&id).map(|g| &g.kind), &e)
        {
            let text = String::from_utf8_lossy(data).trim_end().to_string();
            return self.emit(id, Event::Message { level: 1, text });
        }
        let Some(Goal {
            kind: Kind::Drv(d), ..
        }) = self.goals.get(&id)
        else {
            return;
        };
        let drv = self.store().print(&d.drv_path);
        let system = d
            .drv
            .as_ref()
            .map(|x| x.platform.clone())
            .unwrap_or_default();
        let ev = match e {
            JobEvent::Started {
                pid,
                log_file,
                round,
                rounds,
                machine,
            } => Event::BuildStarted {
                drv,
                system,
                log_file,
                pid,
                round,
                rounds,
                machine,
            },
            JobEvent::Log(data) => {
                let pid = 0;
                Event::BuildLog { drv, pid, data }
            }
            JobEvent::Warning(text) => Event::Message {
                level: 1,
                text: format!("warning: {text}"),
            },
        };
        self.emit(id, ev);
    }

    fn build_done(&mut self, id: GoalId, r: BuildResult, infos: Vec<ValidPathInfo>) {
        for i in infos {
            self.refs.insert(i.path, i.references.into_iter().collect());
        }
        let store = self.store().clone();
        let settings = match self.goals.get(&id) {
            Some(g) => g.settings.clone(),
            None => return,
        };
        let Some(d) = self.drv_mut(id) else { return };
        d.job = None;
        let drv = d.drv.clone().expect("loaded");
        let success = r.success();
        for l in d.locks.iter_mut() {
            // The lock files go either way: once the outputs are valid later lockers never
            // need them, and after a failure a later locker makes a fresh one (the deletion
            // protocol marks the old file stale for anyone already waiting on it). Nix 2.8
            // keeps them after failures, for its collector to find as garbage.
            l.set_delete(true);
        }
        d.locks.clear();
        if !success {
            if r.status == BuildStatus::PermanentFailure
                && settings.cache_failures
                && !drv.is_fixed_output()
            {
                for (_, p) in drv.output_paths() {
                    let _ = store.register_failed(p);
                }
            }
            self.emit(
                id,
                Event::Message {
                    level: 0,
                    text: r.error.clone(),
                },
            );
            return self.done(id, Exit::Failed, r);
        }
        // A floating build rooted its outputs' final paths for this goal (see `job`).
        if drv.is_floating() {
            if let Some(g) = self.goals.get_mut(&id) {
                g.roots.extend(r.outputs.values().cloned());
            }
        }
        self.done(id, Exit::Success, r);
    }

    // ---- substitution goals ------------------------------------------------------------

    fn subst_mut(&mut self, id: GoalId) -> Option<&mut SubstGoal> {
        match self.goals.get_mut(&id).map(|g| &mut g.kind) {
            Some(Kind::Subst(s)) => Some(s),
            _ => None,
        }
    }

    fn subst_fail(&mut self, id: GoalId, exit: Exit, msg: String) {
        let status = if exit == Exit::NoSubstituters {
            BuildStatus::NoSubstituters
        } else {
            BuildStatus::MiscFailure
        };
        let r = BuildResult::failed(status, msg);
        self.done(id, exit, r);
    }

    fn subst_init(&mut self, id: GoalId) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let sub = self
            .cfg
            .substituter
            .clone()
            .filter(|_| settings.use_substitutes && !settings.subst.is_empty());
        let Some(s) = self.subst_mut(id) else { return };
        let (path, repair, ca) = (s.path.clone(), s.repair, s.ca);
        if store.add_temp_root(&path).is_ok() {
            self.goals
                .get_mut(&id)
                .expect("goal exists")
                .roots
                .push(path.clone());
        }
        if !repair && store.is_valid(&path).unwrap_or(false) {
            return self.done(
                id,
                Exit::Success,
                BuildResult::new(BuildStatus::AlreadyValid),
            );
        }
        let Some(sub) = sub else {
            let msg = format!(
                "path '{}' is required, but there is no substituter that can build it",
                store.print(&path)
            );
            return self.subst_fail(id, Exit::NoSubstituters, msg);
        };
        if let Some(s) = self.subst_mut(id) {
            s.state = SubstState::Querying;
        }
        self.in_flight += 1;
        let tx = self.tx.clone();
        let log = line_logger(self.tx.clone(), id);
        std::thread::spawn(move || {
            let r = sub
                .query(&settings.subst, &BTreeMap::from([(path.clone(), ca)]), &log)
                .map(|mut m| m.remove(&path))
                .map_err(|e| e.to_string());
            let _ = tx.send(Msg::Queried(id, r));
        });
    }

    fn queried(&mut self, id: GoalId, r: std::result::Result<Option<SubstitutableInfo>, String>) {
        let store = self.store().clone();
        let settings = match self.goals.get(&id) {
            Some(g) => g.settings.clone(),
            None => return,
        };
        let Some(s) = self.subst_mut(id) else { return };
        let path = s.path.clone();
        let info = match r {
            Ok(Some(i)) => i,
            Ok(None) => {
                let msg = format!(
                    "path '{}' is required, but there is no substituter that can build it",
                    store.print(&path)
                );
                return self.subst_fail(id, Exit::NoSubstituters, msg);
            }
            Err(e) => return self.subst_fail(id, Exit::Failed, e),
        };
        s.info = Some(info.clone());
        s.state = SubstState::ReferencesValid;
        for r in info.references.iter().filter(|r| **r != path) {
            let sub = self.make_subst_goal(r, false, &settings);
            self.add_waitee(id, sub);
        }
        if self.goals[&id].waitees.is_empty() {
            self.references_valid(id);
        }
    }

    fn references_valid(&mut self, id: GoalId) {
        let g = &self.goals[&id];
        if g.nr_failed > 0 {
            let exit = if g.nr_no_substituters > 0 || g.nr_incomplete_closure > 0 {
                Exit::IncompleteClosure
            } else {
                Exit::Failed
            };
            let path = match &g.kind {
                Kind::Subst(s) => self.store().print(&s.path),
                _ => return,
            };
            return self.subst_fail(
                id,
                exit,
                format!("some references of path '{path}' could not be realised"),
            );
        }
        if let Some(s) = self.subst_mut(id) {
            s.state = SubstState::TryToRun;
        }
        self.wake(id);
    }

    fn try_to_run(&mut self, id: GoalId) {
        let store = self.store().clone();
        if self.substituting.len() >= self.cfg.max_substitution_jobs.max(1) {
            let key = self.goals[&id].key.clone();
            self.wanting_to_substitute.insert((key, id));
            return;
        }
        let settings = self.goals[&id].settings.clone();
        let Some(s) = self.subst_mut(id) else { return };
        let (path, repair, ca) = (s.path.clone(), s.repair, s.ca);
        if store.is_locked_by_me(&path) {
            self.waiting_for_any_goal.push(id);
            return;
        }
        if !repair && store.is_valid(&path).unwrap_or(false) {
            return self.done(
                id,
                Exit::Success,
                BuildResult::new(BuildStatus::AlreadyValid),
            );
        }
        s.state = SubstState::Fetching;
        let Some(sub) = self.cfg.substituter.clone() else {
            return;
        };
        self.substituting.insert(id);
        self.emit(
            id,
            Event::SubstitutionStarted {
                path: store.print(&path),
            },
        );
        let tx = self.tx.clone();
        let log = line_logger(self.tx.clone(), id);
        std::thread::spawn(move || {
            let r = sub
                .fetch(&settings.subst, &store, &path, ca.as_ref(), repair, &log)
                .map_err(|e| e.to_string());
            let _ = tx.send(Msg::Fetched(id, r));
        });
    }

    fn fetched(&mut self, id: GoalId, r: std::result::Result<(), String>) {
        match r {
            Ok(()) => self.done(
                id,
                Exit::Success,
                BuildResult::new(BuildStatus::Substituted),
            ),
            Err(e) => self.subst_fail(id, Exit::Failed, e),
        }
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
