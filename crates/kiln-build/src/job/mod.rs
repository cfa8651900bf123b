//! One build, on its own thread: from an empty build directory to registered outputs.
//!
//! The scheduler holds the output locks and a build slot; the job creates the build
//! directory, computes the environment, starts the builder, relays its output with the
//! limits applied (silence, wall clock, log size), then checks and registers what it
//! produced. Nothing here blocks the scheduler.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_format::derivation::FloatingOutput;
use kiln_format::hash::{HashSink, ParallelHashSink};
use kiln_format::realisation::{DrvOutput, Realisation};
use kiln_format::refscan::RefScanner;
use kiln_format::signature::SecretKey;
use kiln_format::{
    nar, ContentAddress, Derivation, FileIngestionMethod, HashAlgo, StorePath, ValidPathInfo,
};
use kiln_sandbox::cgroup::Usage;
use kiln_store::{fsutil, LocalStore};

use crate::env::{prepare_env, EnvInputs};
use crate::log::LogWriter;
use crate::result::{BuildResult, BuildStatus, FailureKinds};
use crate::rewrite;
use crate::settings::BuildSettings;

mod build_dir;
mod floating;
mod hooks;
mod monitor;
mod outputs;
mod round;

use build_dir::*;
use floating::*;
pub use hooks::post_build_hook;
use hooks::*;
use monitor::*;
use outputs::*;
use round::*;

/// How a derivation is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildMode {
    Normal,
    /// Rebuild (or re-substitute) corrupt paths and replace them.
    Repair,
    /// Rebuild valid outputs and compare.
    Check,
}

/// What a job reports while it runs.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// A warning for the clients waiting for the build (not part of its log).
    Warning(String),
    /// What the `diff-hook` printed, for them too (not part of the log either).
    HookOutput(String),
    Started {
        pid: i32,
        log_file: String,
        round: u32,
        rounds: u32,
        /// The build machine's URI (empty: this machine).
        machine: String,
    },
    Log(Arc<[u8]>),
    /// The builder ended; its outputs are being checked and registered.
    Registering,
    /// A substitution's download went on (substitution goals only).
    Download(kiln_substitute::Download),
}

/// Shared between the scheduler and a running job.
#[derive(Debug, Default)]
pub struct JobControl {
    pid: AtomicI32,
    cancelled: AtomicBool,
    /// What the build's processes used, summed over its rounds.
    usage: std::sync::Mutex<Option<Usage>>,
}

impl BuildResult {
    fn set_usage(&mut self, u: Option<Usage>) {
        if let Some(u) = u {
            self.cpu_user = Some(u.cpu_user);
            self.cpu_system = Some(u.cpu_system);
            self.memory_peak = u.memory_peak;
        }
    }
}

impl JobControl {
    fn add_usage(&self, u: Usage) {
        if let Ok(mut g) = self.usage.lock() {
            let t = g.get_or_insert_with(Usage::default);
            t.cpu_user += u.cpu_user;
            t.cpu_system += u.cpu_system;
            t.memory_peak = t.memory_peak.max(u.memory_peak);
        }
    }
    fn usage(&self) -> Option<Usage> {
        self.usage.lock().ok().and_then(|g| *g)
    }
}

impl JobControl {
    /// Stops the build: kills the builder's process group; the job then ends.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        kiln_sandbox::spawn::kill_group(self.pid.load(Ordering::SeqCst), SIGKILL);
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
    /// Records the process group that stands for a job run elsewhere (a remote build's
    /// `ssh`), killed on cancellation like a builder's; 0 when it has ended.
    pub fn set_process_group(&self, pid: i32) {
        self.pid.store(pid, Ordering::SeqCst);
        if pid > 0 && self.is_cancelled() {
            kiln_sandbox::spawn::kill_group(pid, SIGKILL);
        }
    }
}

const SIGKILL: i32 = 9;

/// Everything a job needs.
pub struct JobSpec {
    pub store: Arc<LocalStore>,
    pub drv_path: StorePath,
    pub drv: Arc<Derivation>,
    pub settings: Arc<BuildSettings>,
    pub mode: BuildMode,
    /// Outputs (by name) that were valid when the locks were taken.
    pub valid_outputs: BTreeSet<String>,
    /// The closure of the inputs.
    pub input_paths: BTreeSet<StorePath>,
    /// Serves the daemon socket of a `recursive-nix` build.
    pub recursive: Option<Arc<dyn crate::recursive::RecursiveServer>>,
    pub events: Box<dyn Fn(JobEvent) + Send>,
}

impl std::fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobSpec({})", self.drv_path)
    }
}

/// A failed step.
struct Failure {
    status: BuildStatus,
    msg: String,
    kinds: FailureKinds,
    detail: Option<crate::result::FailureDetail>,
}

impl Failure {
    fn new(status: BuildStatus, msg: impl Into<String>) -> Self {
        let kinds = FailureKinds {
            permanent: status == BuildStatus::PermanentFailure,
            timed_out: status == BuildStatus::TimedOut,
            ..Default::default()
        };
        Failure {
            status,
            msg: msg.into(),
            kinds,
            detail: None,
        }
    }
    fn misc(e: impl std::fmt::Display) -> Self {
        Failure::new(BuildStatus::MiscFailure, e.to_string())
    }
}

/// Per-output plan for this build.
#[derive(Debug, Clone)]
struct OutputPlan {
    name: String,
    path: StorePath,
    /// Where the builder writes it: the real path, or a redirected path (hash rewriting).
    build_path: StorePath,
    redirected: bool,
    /// A floating content-addressed output: `path` and `build_path` are a scratch path, and
    /// the real path is computed from the contents after the build.
    floating: Option<FloatingOutput>,
}

static BUILD_COUNTER: AtomicU64 = AtomicU64::new(0);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs the build; never panics on bad input, always returns a result.
pub fn run(spec: JobSpec, ctl: &JobControl) -> (BuildResult, Vec<ValidPathInfo>) {
    let start = now();
    let out = run_inner(&spec, ctl);
    let mut res = match out {
        Ok((infos, times, outputs, handed)) => {
            let mut r = BuildResult::new(BuildStatus::Built);
            r.times_built = times;
            r.outputs = outputs;
            if let Err(msg) = run_post_build_hook(&spec, &r.outputs) {
                // As Nix: the outputs stay valid, the build is reported failed.
                r = BuildResult::new(BuildStatus::MiscFailure);
                r.error = msg;
            }
            r.handed_roots = handed;
            r.start_time = start;
            r.stop_time = now();
            r.set_usage(ctl.usage());
            return (r, infos);
        }
        Err(f) => {
            let mut r = BuildResult::new(f.status);
            r.error = f.msg;
            r.failure = f.kinds;
            r.detail = f.detail;
            r.non_deterministic = f.status == BuildStatus::NotDeterministic;
            r
        }
    };
    res.start_time = start;
    res.stop_time = now();
    res.set_usage(ctl.usage());
    (res, Vec::new())
}

/// A builder that could not start is a builder that failed (exit code 1, the reason in its
/// log), not a fault of the daemon's set-up, as in Nix.
fn failed_to_start(
    spec: &JobSpec,
    log: &mut Option<(LogWriter, std::path::PathBuf)>,
    drv_abs: &str,
    line: String,
) -> Failure {
    if let Some((w, _)) = log.as_mut() {
        let _ = w.write(format!("{line}\n").as_bytes());
    }
    (spec.events)(JobEvent::Log(Arc::from(format!("{line}\n").into_bytes())));
    let status = "failed with exit code 1".to_string();
    let log_tail = vec![line];
    let mut f = Failure::new(
        BuildStatus::PermanentFailure,
        format!("builder for '{drv_abs}' {status}{}", suffix(&log_tail)),
    );
    f.detail = Some(crate::result::FailureDetail::Builder { status, log_tail });
    f
}

/// The path the builder writes instead of a valid output: same length, another hash
/// (the reference's `addHashRewrite`).
fn redirect(spec: &JobSpec, path: &StorePath) -> Result<StorePath, Failure> {
    let sd = spec.store.store_dir();
    let h = kiln_format::Hash::sha256(
        format!(
            "rewrite:{}:{}",
            sd.display(&spec.drv_path),
            sd.display(path)
        )
        .as_bytes(),
    );
    let h32 = &h.to_base32()[..32];
    StorePath::from_base_name(&format!("{h32}-{}", path.name())).map_err(Failure::misc)
}

/// Where a floating output is built: the path Nix 2.8 uses (`makeFallbackPath`), so that a
/// builder that records its own path sees the same string under both daemons.
fn scratch_path(spec: &JobSpec, output: &str) -> Result<StorePath, Failure> {
    let sd = spec.store.store_dir();
    let zero = kiln_format::Hash::parse_digest(HashAlgo::Sha256, &"0".repeat(64))
        .map_err(Failure::misc)?;
    sd.make_store_path(
        &format!("rewrite:{}:name:{output}", spec.drv_path.base_name()),
        &zero,
        &kiln_format::store_path::output_path_name(&spec.drv.name, output),
    )
    .map_err(Failure::misc)
}

/// Runs the build; the infos to register (already registered), the number of rounds, and
/// every output's path.
/// Registered outputs' infos, rounds, outputs by name, and the roots handed to the goal.
type Built = (
    Vec<ValidPathInfo>,
    u32,
    BTreeMap<String, StorePath>,
    Vec<StorePath>,
);

fn run_inner(spec: &JobSpec, ctl: &JobControl) -> Result<Built, Failure> {
    let store = &spec.store;
    let sd = store.store_dir();
    let layout = store.layout();
    let sandboxed = use_sandbox(spec)?;
    if !sandboxed && layout.real_store_dir != Path::new(sd.as_str()) {
        return Err(Failure::misc(format!(
            "cannot build '{}' without the sandbox: the store's files are at '{}', not at its logical location '{}'",
            sd.display(&spec.drv_path),
            layout.real_store_dir.display(),
            sd
        )));
    }
    let drv = &spec.drv;
    let fixed = drv.fixed_output().copied();
    let floating = drv.is_floating();
    if floating && spec.mode == BuildMode::Repair {
        return Err(Failure::misc(format!(
            "'{}' is a floating content-addressed derivation; '--repair' builds of those are not supported",
            sd.display(&spec.drv_path)
        )));
    }
    // Recursive Nix: what the builder may see and was given through its socket, kept (with
    // the temporary roots of what it was given) until the outputs are registered.
    let recursive = if crate::recursive::wanted(drv) {
        if !spec
            .settings
            .experimental_features
            .contains(crate::recursive::FEATURE)
        {
            return Err(Failure::misc(
                "experimental Nix feature 'recursive-nix' is disabled; use '--extra-experimental-features recursive-nix' to override",
            ));
        }
        if spec.recursive.is_none() {
            return Err(Failure::misc(format!(
                "cannot build '{}': recursive Nix needs a daemon socket in the build, which only builds run by 'kiln daemon' get",
                sd.display(&spec.drv_path)
            )));
        }
        Some(Arc::new(crate::recursive::RecursiveBuild::new(
            store.clone(),
            spec.drv_path.clone(),
            spec.input_paths.clone(),
            spec.settings.clone(),
        )))
    } else {
        None
    };
    // Repeated rounds of a floating build would each move their output to its final path.
    let rounds = if fixed.is_some() || floating || spec.mode == BuildMode::Check {
        1
    } else {
        spec.settings.build_repeat + 1
    };
    // Plan outputs: valid ones (and every one when checking or repairing) are redirected.
    let mut plans = Vec::new();
    let mut to_tmp: BTreeMap<String, String> = BTreeMap::new();
    let mut from_tmp: BTreeMap<String, String> = BTreeMap::new();
    for (name, o) in &drv.outputs {
        if let Some(f) = o.floating {
            let scratch = scratch_path(spec, name)?;
            plans.push(OutputPlan {
                name: name.clone(),
                path: scratch.clone(),
                build_path: scratch,
                redirected: false,
                floating: Some(f),
            });
            continue;
        }
        let Some(path) = &o.path else {
            return Err(Failure::misc(format!(
                "output '{name}' of '{}' has no path: its inputs must be built and the derivation resolved first",
                sd.display(&spec.drv_path)
            )));
        };
        let redirected = spec.mode != BuildMode::Normal || spec.valid_outputs.contains(name);
        let build_path = if redirected {
            let r = redirect(spec, path)?;
            to_tmp.insert(path.hash_part().to_string(), r.hash_part().to_string());
            from_tmp.insert(r.hash_part().to_string(), path.hash_part().to_string());
            r
        } else {
            path.clone()
        };
        plans.push(OutputPlan {
            name: name.to_string(),
            path: path.clone(),
            build_path,
            redirected,
            floating: None,
        });
    }
    let mut prev: Option<Vec<ValidPathInfo>> = None;
    let mut last = Vec::new();
    // Locks of floating outputs' final paths, held until they are registered, and their
    // temporary roots, which the scheduler's goal takes over once the build succeeds.
    let mut held = Finalized {
        store,
        locks: Vec::new(),
        roots: Vec::new(),
    };
    let mut left_dir = None;
    for round in 1..=rounds {
        let (infos, left) = build_round(
            spec,
            ctl,
            &plans,
            &to_tmp,
            &from_tmp,
            // Fixed-output and impure builds get the network and impure variables.
            !drv.is_sandboxed(),
            sandboxed,
            round,
            rounds,
            &mut held,
            recursive.as_ref(),
        )?;
        if let Some(p) = &prev {
            for (a, b) in p.iter().zip(&infos) {
                if a.nar_hash != b.nar_hash || a.references != b.references {
                    let mut f = Failure::new(
                        BuildStatus::NotDeterministic,
                        format!(
                            "output '{}' of '{}' differs from previous round",
                            sd.display(&a.path),
                            sd.display(&spec.drv_path)
                        ),
                    );
                    f.kinds.check_mismatch = true;
                    discard_outputs(spec, &plans);
                    return Err(f);
                }
            }
        }
        if round < rounds {
            // The next round writes the same paths: move this round's outputs away.
            discard_outputs(spec, &plans);
        }
        prev = Some(infos.clone());
        last = infos;
        left_dir = left;
    }
    // Register what was built (all at once, so cycles between outputs are refused).
    let mut to_register = Vec::new();
    let mut outputs = BTreeMap::new();
    for (plan, info) in plans.iter().zip(last) {
        outputs.insert(plan.name.clone(), info.path.clone());
        match spec.mode {
            BuildMode::Check if plan.floating.is_some() => {
                let bd = left_dir.as_ref();
                if let Err(f) = check_floating_output(spec, &plan.name, &info.path, bd) {
                    discard_outputs(spec, &plans);
                    return Err(f);
                }
            }
            BuildMode::Check => {
                let valid = store.path_info(&plan.path).map_err(Failure::misc)?;
                let built_at = store.real_path(&plan.build_path);
                if valid.nar_hash != info.nar_hash {
                    // Where the differing copy is kept: Nix's `<out>.check`, guix-daemon's
                    // `<out>-check`.
                    let suffix = if store.is_guix_store() {
                        "-check"
                    } else {
                        ".check"
                    };
                    let check =
                        PathBuf::from(format!("{}{suffix}", store.real_path(&plan.path).display()));
                    let f = check_mismatch(
                        spec,
                        &store.real_path(&plan.path),
                        &sd.display(&plan.path),
                        &built_at,
                        Some(check),
                        left_dir.as_ref(),
                    )?;
                    discard_outputs(spec, &plans);
                    return Err(f);
                }
                let _ = fsutil::remove_tree(&built_at);
            }
            BuildMode::Repair => {
                // Swap the rebuilt, verified contents in for the damaged ones.
                let real = store.real_path(&plan.path);
                let built_at = store.real_path(&plan.build_path);
                if std::fs::symlink_metadata(&real).is_ok() {
                    rustix::fs::renameat_with(
                        rustix::fs::CWD,
                        &built_at,
                        rustix::fs::CWD,
                        &real,
                        rustix::fs::RenameFlags::EXCHANGE,
                    )
                    .map_err(|e| Failure::misc(format!("replacing '{}': {e}", real.display())))?;
                    let _ = fsutil::remove_tree(&built_at);
                } else {
                    std::fs::rename(&built_at, &real).map_err(|e| {
                        Failure::misc(format!("moving into '{}': {e}", real.display()))
                    })?;
                }
                to_register.push(info);
            }
            BuildMode::Normal if plan.redirected => {
                // Was already valid: the rebuilt copy is not needed.
                let _ = fsutil::remove_tree(&store.real_path(&plan.build_path));
            }
            // A floating output whose contents another build already produced.
            BuildMode::Normal
                if plan.floating.is_some() && store.is_valid(&info.path).unwrap_or(false) => {}
            BuildMode::Normal => to_register.push(info),
        }
    }
    // Signed with the configured keys before they become valid, as Nix does.
    for key in secret_keys(&spec.settings).map_err(Failure::misc)? {
        for info in &mut to_register {
            info.sign(store.store_dir(), &key);
        }
    }
    store.register_valid_paths(&to_register).map_err(|e| {
        let mut f = Failure::new(BuildStatus::OutputRejected, e.to_string());
        f.kinds = FailureKinds::default();
        f
    })?;
    // Impure outputs are never reused, so nothing records them; a check records nothing.
    if floating && !drv.is_impure() && spec.mode != BuildMode::Check {
        register_realisations(spec, &outputs)?;
    }
    let handed = held.hand_over();
    if spec.settings.auto_optimise && !store.options().auto_optimise {
        for info in &to_register {
            if let Err(e) = kiln_store::optimise::optimise_path(store, &info.path) {
                tracing::warn!(
                    "optimising '{}': {e}",
                    store.store_dir().display(&info.path)
                );
            }
        }
    }
    Ok((to_register, rounds, outputs, handed))
}

/// `--check` of a floating output: its path follows from its contents (modulo its own
/// hash part), so the rebuilt output is the recorded one exactly when it got the path the
/// output's realisation names. A differing output was moved to a path of its own, which is
/// not registered: kept for `--keep-failed` or the `diff-hook`, removed otherwise.
fn check_floating_output(
    spec: &JobSpec,
    name: &str,
    built: &StorePath,
    build_dir: Option<&round::LeftBuildDir>,
) -> Result<(), Failure> {
    let store = &spec.store;
    let sd = store.store_dir();
    let h = store
        .output_hash(&spec.drv_path, &spec.drv)
        .map_err(Failure::misc)?;
    let recorded = store
        .query_realisation(&DrvOutput::new(h, name))
        .map_err(Failure::misc)?
        .ok_or_else(|| {
            Failure::misc(format!(
                "'{}' has no recorded output '{name}'; build it normally before using '--check'",
                sd.display(&spec.drv_path)
            ))
        })?;
    if recorded.out_path == *built {
        return Ok(());
    }
    let new = store.real_path(built);
    // A differing output already valid (another derivation made it) is not the check's to
    // keep or remove.
    let own = (!store.is_valid(built).unwrap_or(false)).then(|| new.clone());
    Err(check_mismatch(
        spec,
        &store.real_path(&recorded.out_path),
        &sd.display(&recorded.out_path),
        &new,
        own,
        build_dir,
    )?)
}

/// The failure of a `--check` that found the valid output at `old` (`shown`) differing from
/// the rebuilt copy at `built`: kiln's own account of what differs goes to the build log
/// (for `kiln log`); with `--keep-failed` or a `diff-hook` the copy is kept at `keep_at`
/// (and the hook run on the two and the build's directory, `build_dir`), otherwise
/// removed. With `keep_at` `None` the copy is not the check's: neither kept nor removed.
fn check_mismatch(
    spec: &JobSpec,
    old: &Path,
    shown: &str,
    built: &Path,
    keep_at: Option<PathBuf>,
    build_dir: Option<&round::LeftBuildDir>,
) -> Result<Failure, Failure> {
    let sd = spec.store.store_dir();
    append_diff_report(spec, old, built, shown);
    let keep = spec.settings.keep_failed || spec.settings.diff_hook.is_some();
    let kept = match keep_at {
        Some(at) if keep => {
            if at != built {
                let _ = fsutil::remove_tree(&at);
                std::fs::rename(built, &at)
                    .map_err(|e| Failure::misc(format!("keeping '{}': {e}", at.display())))?;
            }
            if let Some(hook) = &spec.settings.diff_hook {
                run_diff_hook(spec, hook, old, &at, build_dir);
            }
            Some(at)
        }
        Some(_) => {
            let _ = fsutil::remove_tree(built);
            None
        }
        None => None,
    };
    let kept = kept.map(|at| at.display().to_string());
    let mut f = Failure::new(
        BuildStatus::NotDeterministic,
        format!(
            "derivation '{}' may not be deterministic: output '{shown}' differs{}",
            sd.display(&spec.drv_path),
            kept.as_ref()
                .map(|at| format!(" from '{at}'"))
                .unwrap_or_default()
        ),
    );
    f.detail = Some(crate::result::FailureDetail::NotDeterministic {
        output: shown.to_string(),
        kept,
    });
    f.kinds.check_mismatch = true;
    Ok(f)
}

/// Records which paths a floating derivation's outputs became (signed with the configured
/// keys), so that the next build of it — or of anything resolving to it — finds them.
fn register_realisations(
    spec: &JobSpec,
    outputs: &BTreeMap<String, StorePath>,
) -> Result<(), Failure> {
    let store = &spec.store;
    let h = store
        .output_hash(&spec.drv_path, &spec.drv)
        .map_err(Failure::misc)?;
    let keys = secret_keys(&spec.settings).map_err(Failure::misc)?;
    for (name, p) in outputs {
        record_realisation(store, DrvOutput::new(h, name), p, Some(&spec.drv), &keys)
            .map_err(Failure::misc)?;
    }
    Ok(())
}

/// Records that output `id` is `path`, signed with `keys`. With `inputs_of`, the
/// realisation also names the realisations of that derivation's inputs its path refers to.
pub(crate) fn record_realisation(
    store: &LocalStore,
    id: DrvOutput,
    path: &StorePath,
    inputs_of: Option<&Derivation>,
    keys: &[SecretKey],
) -> Result<(), String> {
    let mut r = Realisation::new(id, path.clone());
    if let Some(drv) = inputs_of {
        let refs = store.query_references(path).map_err(|e| e.to_string())?;
        r.dependent = store
            .dependent_realisations(drv, &refs)
            .map_err(|e| e.to_string())?;
    }
    for k in keys {
        r.sign(k);
    }
    store.register_realisation(&r).map_err(|e| e.to_string())
}

/// The keys of `secret-key-files`, which sign what builds produce.
pub(crate) fn secret_keys(settings: &BuildSettings) -> Result<Vec<SecretKey>, String> {
    settings
        .secret_key_files
        .iter()
        .map(|file| {
            let k = std::fs::read_to_string(file)
                .map_err(|e| format!("reading secret key '{file}': {e}"))?;
            SecretKey::parse(k.trim()).map_err(|e| format!("secret key '{file}': {e}"))
        })
        .collect()
}

/// Removes outputs of a round that is not kept.
fn discard_outputs(spec: &JobSpec, plans: &[OutputPlan]) {
    for p in plans {
        if p.redirected || !spec.store.is_valid(&p.path).unwrap_or(true) {
            let _ = fsutil::remove_tree(&spec.store.real_path(&p.build_path));
        }
    }
}

/// Whether this build runs in the sandbox: wanted by the settings and the derivation, and
/// possible here (else, with `sandbox-fallback`, a warning and no sandbox, as Nix does).
fn use_sandbox(spec: &JobSpec) -> Result<bool, Failure> {
    let shown = spec.store.store_dir().display(&spec.drv_path);
    let wanted = crate::sandbox::wanted(&spec.settings, &spec.drv, &shown).map_err(|e| {
        let mut f = Failure::new(BuildStatus::InputRejected, e);
        f.kinds.permanent = true;
        f
    })?;
    if !wanted {
        return Ok(false);
    }
    match kiln_sandbox::supported() {
        Ok(()) => Ok(true),
        Err(e) if spec.settings.sandbox_fallback => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!("the build sandbox is not available here ({e}); building without it")
            });
            Ok(false)
        }
        Err(e) => Err(Failure::misc(format!(
            "the build sandbox is not available here ({e}); set 'sandbox = false' or \
             'sandbox-fallback = true' to build without it"
        ))),
    }
}

fn rejected(msg: String) -> Failure {
    Failure {
        status: BuildStatus::OutputRejected,
        msg,
        kinds: FailureKinds::default(),
        detail: None,
    }
}

/// The daemon's effective user and group: outputs end up owned by them.
fn daemon_ids() -> (u32, u32) {
    (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    )
}
