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
use kiln_format::hash::{HashModuloSink, HashSink, Hasher, ParallelHashSink};
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
        Ok((infos, times, outputs)) => {
            let mut r = BuildResult::new(BuildStatus::Built);
            r.times_built = times;
            r.outputs = outputs;
            if let Err(msg) = run_post_build_hook(&spec, &r.outputs) {
                // As Nix: the outputs stay valid, the build is reported failed.
                r = BuildResult::new(BuildStatus::MiscFailure);
                r.error = msg;
            }
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

/// Appends to the derivation's build log how the rebuilt output `new` differs from the
/// valid `previous` one, file by file ([`crate::diff::report`]).
fn append_diff_report(
    spec: &JobSpec,
    previous: &std::path::Path,
    new: &std::path::Path,
    out: &str,
) {
    if !spec.settings.keep_build_log {
        return;
    }
    let lines = crate::diff::report(previous, new);
    let mut text = format!("kiln: --check: output '{out}' differs from the valid one:\n");
    for l in &lines {
        text.push_str(l);
        text.push('\n');
    }
    if lines.is_empty() {
        text.push_str(
            "  (same files and contents: the difference is in their metadata or references)\n",
        );
    }
    match crate::log::LogWriter::append(
        &spec.store.layout().log_dir,
        &spec.drv_path,
        spec.settings.log_compression,
    ) {
        Ok(Some(mut w)) => {
            if let Err(e) = w.write(text.as_bytes()).and_then(|()| w.finish()) {
                tracing::warn!("writing the --check report to the build log: {e}");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("writing the --check report to the build log: {e}"),
    }
}

/// Runs `diff-hook` as Nix does when `--check` found `new` differing from `previous`:
/// `HOOK PREVIOUS NEW DRV BUILD-DIR`, from `/`; what it prints goes to the daemon's log,
/// not to the client, and its failure is logged, not the build's. (Nix runs it as the build
/// user and names the build directory, which exists with `--keep-failed`; kiln runs it as
/// the daemon's user and passes an empty fourth argument.)
fn run_diff_hook(hook: &str, previous: &std::path::Path, new: &std::path::Path, drv: &str) {
    let out = std::process::Command::new(hook)
        .arg(previous)
        .arg(new)
        .arg(drv)
        .arg("")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            if !text.trim().is_empty() {
                tracing::error!("{}", text.trim_end());
            }
        }
        Ok(o) => tracing::error!(
            "diff hook execution failed: diff-hook program '{hook}' {}",
            match o.status.code() {
                Some(c) => format!("failed with exit code {c}"),
                None => "was killed by a signal".to_string(),
            }
        ),
        Err(e) => tracing::error!("diff hook execution failed: running '{hook}': {e}"),
    }
}

/// Runs `pre-build-hook` as Nix does: `HOOK DRV [SANDBOX-DIR]` (the directory only for a
/// sandboxed build); its output may name sandbox paths for this build:
///
/// ```text
/// extra-sandbox-paths      (or extra-chroot-dirs)
/// /dev/kvm
/// /run/secret=/etc/secret
///                          (an empty line ends the list)
/// ```
///
/// Anything else it prints is an error, as is its failure. It is the administrator's (or
/// a trusted client's) program: only trusted settings name it.
fn run_pre_build_hook(hook: &str, drv: &str, chroot: Option<&str>) -> Result<Vec<String>, Failure> {
    let mut c = std::process::Command::new(hook);
    c.arg(drv);
    if let Some(dir) = chroot {
        c.arg(dir);
    }
    let out = c
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Failure::misc(format!("running pre-build-hook '{hook}': {e}")))?;
    if !out.status.success() {
        return Err(Failure::misc(format!(
            "program '{hook}' {}",
            match out.status.code() {
                Some(c) => format!("failed with exit code {c}"),
                None => "was killed by a signal".to_string(),
            }
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut paths = Vec::new();
    let mut in_list = false;
    for line in text.split_terminator('\n') {
        if in_list {
            if line.is_empty() {
                in_list = false;
            } else {
                paths.push(line.to_string());
            }
        } else if line == "extra-sandbox-paths" || line == "extra-chroot-dirs" {
            in_list = true;
        } else {
            return Err(Failure::misc(format!(
                "unknown pre-build hook command '{line}'"
            )));
        }
    }
    Ok(paths)
}

/// Runs `post-build-hook` (configured by the administrator or a trusted client) after a
/// successful build, with `DRV_PATH` and `OUT_PATHS` (space-separated) in the daemon's
/// environment; its output goes to the build log.
fn run_post_build_hook(
    spec: &JobSpec,
    outputs: &BTreeMap<String, StorePath>,
) -> Result<(), String> {
    post_build_hook(
        &spec.settings,
        &spec.store,
        &spec.drv_path,
        outputs,
        &*spec.events,
    )
}

/// `post-build-hook` for a build of `drv_path` that produced `outputs` (here or on a build
/// machine: Nix runs it for both).
pub fn post_build_hook(
    settings: &BuildSettings,
    store: &LocalStore,
    drv_path: &StorePath,
    outputs: &BTreeMap<String, StorePath>,
    events: &dyn Fn(JobEvent),
) -> Result<(), String> {
    let Some(hook) = &settings.post_build_hook else {
        return Ok(());
    };
    let sd = store.store_dir();
    let outs: Vec<String> = outputs.values().map(|p| sd.display(p)).collect();
    events(JobEvent::Log(Arc::from(
        format!("running post-build-hook '{hook}'\n").into_bytes(),
    )));
    let out = std::process::Command::new(hook)
        .env("DRV_PATH", sd.display(drv_path))
        .env("OUT_PATHS", outs.join(" "))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running post-build-hook '{hook}': {e}"))?;
    for chunk in [&out.stdout, &out.stderr] {
        if !chunk.is_empty() {
            events(JobEvent::Log(Arc::from(chunk.as_slice())));
        }
    }
    if !out.status.success() {
        return Err(format!(
            "program '{hook}' {}",
            match out.status.code() {
                Some(c) => format!("failed with exit code {c}"),
                None => "was killed by a signal".to_string(),
            }
        ));
    }
    Ok(())
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
type Built = (Vec<ValidPathInfo>, u32, BTreeMap<String, StorePath>);

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
    if floating && spec.mode != BuildMode::Normal {
        return Err(Failure::misc(format!(
            "'{}' is a floating content-addressed derivation; '--check' and '--repair' builds of those are not supported",
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
    for round in 1..=rounds {
        let infos = build_round(
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
    }
    // Register what was built (all at once, so cycles between outputs are refused).
    let mut to_register = Vec::new();
    let mut outputs = BTreeMap::new();
    for (plan, info) in plans.iter().zip(last) {
        outputs.insert(plan.name.clone(), info.path.clone());
        match spec.mode {
            BuildMode::Check => {
                let valid = store.path_info(&plan.path).map_err(Failure::misc)?;
                let built_at = store.real_path(&plan.build_path);
                if valid.nar_hash != info.nar_hash {
                    // kiln's own account of what differs, for `kiln log`.
                    append_diff_report(
                        spec,
                        &store.real_path(&plan.path),
                        &built_at,
                        &sd.display(&plan.path),
                    );
                    let check =
                        PathBuf::from(format!("{}-check", store.real_path(&plan.path).display()));
                    let msg = if spec.settings.keep_failed || spec.settings.diff_hook.is_some() {
                        let _ = fsutil::remove_tree(&check);
                        std::fs::rename(&built_at, &check).map_err(|e| {
                            Failure::misc(format!("keeping '{}': {e}", check.display()))
                        })?;
                        if let Some(hook) = &spec.settings.diff_hook {
                            run_diff_hook(
                                hook,
                                &store.real_path(&plan.path),
                                &check,
                                &sd.display(&spec.drv_path),
                            );
                        }
                        format!(
                            "derivation '{}' may not be deterministic: output '{}' differs from '{}'",
                            sd.display(&spec.drv_path),
                            sd.display(&plan.path),
                            check.display()
                        )
                    } else {
                        let _ = fsutil::remove_tree(&built_at);
                        format!(
                            "derivation '{}' may not be deterministic: output '{}' differs",
                            sd.display(&spec.drv_path),
                            sd.display(&plan.path)
                        )
                    };
                    let mut f = Failure::new(BuildStatus::NotDeterministic, msg);
                    f.kinds.check_mismatch = true;
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
    // Impure outputs are never reused, so nothing records them.
    if floating && !drv.is_impure() {
        register_realisations(spec, &outputs)?;
    }
    held.hand_over();
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
    Ok((to_register, rounds, outputs))
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
    let wanted = crate::sandbox::wanted(&spec.settings, &spec.drv).map_err(|e| {
        let mut f = Failure::new(
            BuildStatus::InputRejected,
            format!("{e} ('{}')", spec.store.store_dir().display(&spec.drv_path)),
        );
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

/// A build's directory, `<builds>/kiln-build-<drv name>.drv-<pid>-<n>-<random>/build`.
///
/// The builder owns `build` (its `NIX_BUILD_TOP`, or what the sandbox mounts at its fixed
/// path); its parent, the top, is the daemon's and 0700 (the reference's `top/` trick, and
/// Nix's answer to CVE-2024-38531): a sandboxed builder that opens its own directory to the
/// world (`chmod 777 $NIX_BUILD_TOP`) opens it to nobody, since nobody else can pass through
/// the top, and it cannot change the top. `<builds>` itself is the daemon's, in the state
/// directory (CVE-2025-52991: no predictable names in a shared `/tmp`).
///
/// A build user outside the sandbox must reach its directory by path: its top, and
/// `<builds>`, are then traversable but unlistable (0711), and every top's name carries 64
/// random bits. Such a builder runs on the host, where its path can be seen (in its
/// processes' command lines, say): opening its own directory up is then its own doing, as
/// with Nix outside the sandbox; other builds' directories stay out of reach.
struct BuildDir {
    top: PathBuf,
    dir: PathBuf,
}

fn make_build_dir(spec: &JobSpec, for_user: bool) -> Result<BuildDir, Failure> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let parent = builds_parent(spec);
    fsutil::ensure_dir(&parent, 0o700).map_err(Failure::misc)?;
    let meta = std::fs::symlink_metadata(&parent)
        .map_err(|e| Failure::misc(format!("'{}': {e}", parent.display())))?;
    if !meta.is_dir() || meta.uid() != daemon_ids().0 || meta.mode() & 0o022 != 0 {
        return Err(Failure::misc(format!(
            "the build directory '{}' is not a directory that only the daemon's user can write \
             (mode {:o}, owner {}); refusing to build in it",
            parent.display(),
            meta.mode() & 0o7777,
            meta.uid()
        )));
    }
    if for_user && meta.mode() & 0o011 != 0o011 {
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| Failure::misc(format!("'{}': {e}", parent.display())))?;
    }
    let secret = format!("-{:016x}", rand::random::<u64>());
    let name = spec
        .drv_path
        .derivation_name()
        .unwrap_or(spec.drv_path.name());
    loop {
        let n = BUILD_COUNTER.fetch_add(1, Ordering::Relaxed);
        let top = parent.join(format!(
            "kiln-build-{name}.drv-{}-{n}{secret}",
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&top) {
            Ok(()) => {
                let dir = top.join("build");
                let made = (|| {
                    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o700))?;
                    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
                    if for_user {
                        std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o711))?;
                    }
                    Ok::<_, std::io::Error>(())
                })();
                if let Err(e) = made {
                    let _ = fsutil::remove_build_tree(&top);
                    return Err(Failure::misc(format!(
                        "creating build directory '{}': {e}",
                        dir.display()
                    )));
                }
                return Ok(BuildDir { top, dir });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Failure::misc(format!(
                    "creating build directory '{}': {e}",
                    top.display()
                )))
            }
        }
    }
}

/// Where build directories are made: `build-dir`, else `<state>/builds`.
fn builds_parent(spec: &JobSpec) -> PathBuf {
    spec.settings
        .build_dir
        .clone()
        .unwrap_or_else(|| spec.store.layout().builds_dir())
}

/// Makes the real store directory writable by the build users' group, sticky (so that no
/// build user can remove or rename another's paths), as Nix does when `build-users-group`
/// is set: unsandboxed builders create their outputs there.
fn let_build_users_create_outputs(store: &LocalStore, gid: u32) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = &store.layout().real_store_dir;
    let m = std::fs::metadata(dir).map_err(|e| format!("'{}': {e}", dir.display()))?;
    if m.gid() != gid || m.uid() != 0 {
        std::os::unix::fs::chown(dir, Some(0), Some(gid))
            .map_err(|e| format!("changing the group of '{}': {e}", dir.display()))?;
    }
    if m.mode() & 0o7777 != 0o1775 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1775))
            .map_err(|e| format!("changing the mode of '{}': {e}", dir.display()))?;
    }
    Ok(())
}

/// Writes a file into the build directory exclusively, without following symlinks.
fn write_build_file(
    dir: &Path,
    name: &str,
    contents: &[u8],
    builder: (u32, u32),
) -> Result<(), Failure> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(Failure::new(
            BuildStatus::InputRejected,
            format!("invalid build file name '{name}'"),
        ));
    }
    let dfd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| Failure::misc(format!("opening '{}': {e}", dir.display())))?;
    let fd = rustix::fs::openat(
        &dfd,
        name,
        rustix::fs::OFlags::WRONLY
            | rustix::fs::OFlags::CREATE
            | rustix::fs::OFlags::EXCL
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .map_err(|e| Failure::misc(format!("creating '{}/{name}': {e}", dir.display())))?;
    // The builder's, as Nix hands them over (through the descriptor: CVE-2025-52993).
    if builder != daemon_ids() {
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(builder.0)),
            Some(rustix::fs::Gid::from_raw(builder.1)),
        )
        .map_err(|e| {
            Failure::misc(format!(
                "handing '{}/{name}' to the builder: {e}",
                dir.display()
            ))
        })?;
    }
    std::fs::File::from(fd)
        .write_all(contents)
        .map_err(|e| Failure::misc(format!("writing '{}/{name}': {e}", dir.display())))
}

/// Closure for `exportReferencesGraph`: the closure of `p`, plus the output closures of
/// derivations in it.
fn export_graph(store: &LocalStore, p: &StorePath) -> crate::Result<crate::env::Graph> {
    if !store.is_valid(p)? {
        return Err(crate::Error::Invalid(format!(
            "'exportReferencesGraph' contains an invalid path '{}'",
            store.print(p)
        )));
    }
    let mut set = store.closure([p], false)?;
    let drvs: Vec<StorePath> = set.iter().filter(|q| q.is_derivation()).cloned().collect();
    for d in drvs {
        let outs: Vec<StorePath> = store
            .read_derivation(&d)?
            .output_paths()
            .map(|(_, o)| o.clone())
            .collect();
        let valid: Vec<StorePath> = outs
            .into_iter()
            .filter(|o| store.is_valid(o).unwrap_or(false))
            .collect();
        set.extend(store.closure(&valid, false)?);
    }
    let mut out = Vec::new();
    for q in set {
        out.push(store.path_info(&q)?);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn build_round(
    spec: &JobSpec,
    ctl: &JobControl,
    plans: &[OutputPlan],
    to_tmp: &BTreeMap<String, String>,
    from_tmp: &BTreeMap<String, String>,
    fixed: bool,
    sandboxed: bool,
    round: u32,
    rounds: u32,
    held: &mut Finalized<'_>,
    recursive: Option<&Arc<crate::recursive::RecursiveBuild>>,
) -> Result<Vec<ValidPathInfo>, Failure> {
    let store = &spec.store;
    let sd = store.store_dir();
    let drv = &spec.drv;
    let drv_abs = sd.display(&spec.drv_path);
    // Leftovers of earlier attempts (never valid) go first.
    for p in plans {
        let real = store.real_path(&p.build_path);
        if std::fs::symlink_metadata(&real).is_ok()
            && (p.redirected || !store.is_valid(&p.build_path).unwrap_or(true))
        {
            tracing::info!("removing invalid path '{}'", real.display());
            fsutil::remove_tree(&real).map_err(Failure::misc)?;
        }
    }
    // Outside the sandbox (which maps ids of its own), a root daemon with build users runs
    // the builder as one of them, as the reference does: never as root.
    let build_user = if !sandboxed
        && rustix::process::geteuid().is_root()
        && !spec.settings.build_users_group.is_empty()
    {
        let ids = crate::sandbox::BuildIds::acquire(store, &spec.settings)
            .map_err(|e| Failure::misc(format!("acquiring a build user: {e}")))?;
        let_build_users_create_outputs(store, ids.gid).map_err(Failure::misc)?;
        Some(ids)
    } else {
        None
    };
    let bd = make_build_dir(spec, build_user.is_some())?;
    let build_dir = bd.dir.clone();
    // Whose inodes the builder makes, as the host sees them.
    let (mut builder_uid, mut builder_gid) = match &build_user {
        Some(u) => (u.uid, u.gid),
        None => daemon_ids(),
    };
    if let Some(u) = &build_user {
        std::os::unix::fs::chown(&build_dir, Some(u.uid), Some(u.gid))
            .map_err(|e| Failure::misc(format!("'{}': {e}", build_dir.display())))?;
    }
    let mut keep_dir = false;
    let result = (|| {
        // `pre-build-hook`: its paths join the sandbox's for this build.
        let with_hook;
        let settings: &BuildSettings = match &spec.settings.pre_build_hook {
            Some(hook) => {
                let chroot = sandboxed
                    .then(|| format!("{}.chroot", store.real_path(&spec.drv_path).display()));
                let extra =
                    run_pre_build_hook(hook, &store.print(&spec.drv_path), chroot.as_deref())?;
                let mut s = (*spec.settings).clone();
                s.sandbox_paths.extend(extra);
                with_hook = s;
                &with_hook
            }
            None => &spec.settings,
        };
        let sandbox = if sandboxed {
            Some(
                crate::sandbox::BuildSandbox::prepare(&crate::sandbox::Contents {
                    store,
                    drv_path: &spec.drv_path,
                    drv,
                    settings,
                    inputs: &spec.input_paths,
                    build_dir: &build_dir,
                    fixed_output: fixed,
                })
                .map_err(|e| Failure::misc(format!("setting up the sandbox: {e}")))?,
            )
        } else {
            None
        };
        if let Some(sb) = &sandbox {
            (builder_uid, builder_gid) = (sb.ids.uid, sb.ids.gid);
        }
        let top = match &sandbox {
            Some(sb) => sb.build_top.clone(),
            None => build_dir.to_string_lossy().into_owned(),
        };
        let outputs: BTreeMap<String, String> = plans
            .iter()
            .map(|p| (p.name.clone(), sd.display(&p.build_path)))
            .collect();
        // What the builder sees: `builtins.placeholder` strings become the outputs' paths
        // (placeholders sort before hash parts, so a redirected output's placeholder turns
        // into its final path and then into the redirected one).
        let mut rw = to_tmp.clone();
        for p in plans {
            rw.insert(
                kiln_format::derivation::output_placeholder(&p.name),
                sd.display(&p.path),
            );
        }
        if !spec.settings.impure_env.is_empty()
            && !drv.is_sandboxed()
            && !spec
                .settings
                .experimental_features
                .contains("configurable-impure-env")
        {
            return Err(Failure::new(
                BuildStatus::MiscFailure,
                "experimental Nix feature 'configurable-impure-env' is disabled; use '--extra-experimental-features configurable-impure-env' to override",
            ));
        }
        let impure = |v: &str| {
            spec.settings
                .impure_env
                .get(v)
                .cloned()
                .or_else(|| std::env::var(v).ok())
        };
        let graph = |p: &StorePath| export_graph(store, p);
        let prepared = prepare_env(&EnvInputs {
            drv,
            store_dir: sd,
            build_top: &top,
            cores: spec.settings.cores,
            outputs: &outputs,
            impure: &impure,
            graph: &graph,
        })
        .map_err(|e| {
            let mut f = Failure::new(BuildStatus::InputRejected, e.to_string());
            f.kinds.permanent = true;
            f
        })?;
        for w in &prepared.warnings {
            (spec.events)(JobEvent::Warning(w.clone()));
        }
        for f in &prepared.files {
            let contents =
                rewrite::rewrite_str(&String::from_utf8_lossy(&f.contents), &rw).into_bytes();
            write_build_file(
                &build_dir,
                &f.name,
                if rw.is_empty() {
                    &f.contents
                } else {
                    &contents
                },
                (builder_uid, builder_gid),
            )?;
        }
        let mut env = prepared.env;
        // Recursive Nix: the socket is bound now (connections wait in its backlog) and
        // served once the builder runs, so that paths given to it can be mounted into its
        // sandbox. Only the builder's user may connect.
        let recursive_socket = match recursive {
            Some(_) => {
                let owner = match (&sandbox, &build_user) {
                    (Some(sb), _) => Some((sb.ids.uid, sb.ids.gid)),
                    (None, Some(u)) => Some((u.uid, u.gid)),
                    (None, None) => None,
                };
                let l = bind_recursive_socket(&build_dir, owner)?;
                env.insert(
                    "NIX_REMOTE".into(),
                    format!("unix://{top}/{}", crate::recursive::SOCKET_NAME),
                );
                Some(l)
            }
            None => None,
        };
        // `builtin:fetchurl` refuses to fetch for a derivation whose output nothing checks
        // (neither fixed-output nor impure), as Nix's does; it learns which from here.
        if drv.builder.starts_with("builtin:") {
            let kind = if drv.is_fixed_output() {
                "fixed-output"
            } else if drv.is_impure() {
                "impure"
            } else {
                "input-addressed"
            };
            env.insert("KILN_DERIVATION_KIND".into(), kind.into());
        }
        // `builtin:fetchurl` (kiln's own code) learns the hashed mirrors from the daemon.
        if drv.builder.starts_with("builtin:") && !spec.settings.hashed_mirrors.is_empty() {
            env.insert(
                "KILN_HASHED_MIRRORS".into(),
                spec.settings.hashed_mirrors.join(" "),
            );
        }
        // `netrc-file` for `builtin:fetchurl` of a derivation whose output a hash checks (or
        // an impure one), as Nix hands it over: its contents, read here (the builder cannot
        // read the daemon's files), in the builtin's environment rather than in a file of
        // the build directory, so that `--keep-failed` cannot leave the credentials behind
        // for the client. The builtin sends each host only its own entry.
        if drv.builder.starts_with("builtin:") && (drv.is_fixed_output() || drv.is_impure()) {
            if let Some(f) = &spec.settings.netrc_file {
                match kiln_substitute::netrc::Netrc::load(f) {
                    Ok(Some(_)) => {
                        if let Ok(text) = std::fs::read_to_string(f) {
                            env.insert("KILN_NETRC".into(), text);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("{e}; builtin:fetchurl gets no credentials"),
                }
            }
        }
        let env: Vec<CString> = env
            .iter()
            .map(|(k, v)| CString::new(rewrite::rewrite_str(&format!("{k}={v}"), &rw)))
            .collect::<Result<_, _>>()
            .map_err(|_| {
                Failure::new(
                    BuildStatus::InputRejected,
                    "an environment variable contains a NUL byte",
                )
            })?;
        let (mut program, mut args) = builder_command(drv)?;
        if let Some(sb) = sandbox
            .as_ref()
            .filter(|_| drv.builder.starts_with("builtin:"))
        {
            program = sb.builtin_exe.clone();
        }
        args = args
            .into_iter()
            .map(|a| rewrite::rewrite_str(&a, &rw))
            .collect();
        let args: Vec<CString> = args
            .into_iter()
            .map(CString::new)
            .collect::<Result<_, _>>()
            .map_err(|_| {
                Failure::new(
                    BuildStatus::InputRejected,
                    "a builder argument contains a NUL byte",
                )
            })?;
        let personality = (drv.platform == "i686-linux" && spec.settings.system == "x86_64-linux"
            || drv.platform == "armhf-linux" && spec.settings.system == "aarch64-linux")
            .then_some(0x0008u64);
        let mut log = if spec.settings.keep_build_log {
            Some(
                LogWriter::create(
                    &store.layout().log_dir,
                    &spec.drv_path,
                    spec.settings.log_compression,
                )
                .map_err(Failure::misc)?,
            )
        } else {
            None
        };
        let (read_end, write_end) = kiln_sandbox::spawn::pipe_cloexec().map_err(Failure::misc)?;
        // Every process of the build, however it detaches, stays in this cgroup.
        let cgroup = if spec.settings.use_cgroups {
            let n = BUILD_COUNTER.fetch_add(1, Ordering::Relaxed);
            kiln_sandbox::Cgroup::create(&format!("kiln-build-{}-{n}", std::process::id()))
                .map_err(Failure::misc)?
        } else {
            None
        };
        let cgroup_procs = match &cgroup {
            Some(c) => Some(c.procs_fd().map_err(Failure::misc)?),
            None => None,
        };
        // guix-daemon 1.5 refuses a builder outside the store (resolving symbolic links
        // first: `/bin/sh` is `/usr/bin/dash` there), as a failure of the builder's start.
        if spec.settings.require_store_builder && !drv.builder.starts_with("builtin:") {
            let real = std::fs::canonicalize(&drv.builder)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| drv.builder.clone());
            if !real.starts_with(&format!("{}/", store.store_dir().as_str())) {
                let line = format!(
                    "while setting up the child process: in phase exec: derivation builder `{real}' is outside the store"
                );
                return Err(failed_to_start(spec, &mut log, &drv_abs, line));
            }
        }
        let child = kiln_sandbox::spawn(kiln_sandbox::ChildSpec {
            program: CString::new(program).map_err(|_| {
                Failure::new(
                    BuildStatus::InputRejected,
                    "the builder contains a NUL byte",
                )
            })?,
            args,
            env,
            cwd: CString::new(top.as_bytes()).map_err(Failure::misc)?,
            output: write_end,
            personality,
            uname26: spec.settings.impersonate_linux_26
                && matches!(drv.platform.as_str(), "i686-linux" | "x86_64-linux"),
            user: build_user.as_ref().map(|u| kiln_sandbox::UserSpec {
                uid: u.uid,
                gid: u.gid,
                groups: u.groups.clone(),
            }),
            oom_score_adj: true,
            sandbox: sandbox.as_ref().map(|sb| sb.sandbox.clone()),
            cgroup: cgroup_procs,
            seccomp: spec.settings.filter_syscalls,
            no_new_privs: !spec.settings.allow_new_privileges,
        });
        let child = match child {
            Ok(c) => c,
            // As Nix: a builder that cannot be executed is a builder that failed (exit
            // code 1, the reason in its log), not a fault of the daemon's set-up.
            Err(kiln_sandbox::Error::Setup { step, source }) if step == "executing the builder" => {
                let why = source.to_string();
                let why = why.split(" (os error").next().unwrap_or(&why).to_string();
                let line = format!("error: executing '{}': {why}", drv.builder);
                keep_dir = spec.settings.keep_failed;
                return Err(failed_to_start(spec, &mut log, &drv_abs, line));
            }
            Err(e) => return Err(Failure::misc(e)),
        };
        ctl.pid.store(child.pid, Ordering::SeqCst);
        let serving = match (recursive, recursive_socket, &spec.recursive) {
            (Some(rb), Some(listener), Some(server)) => serve_recursive(
                spec,
                rb,
                listener,
                server.as_ref(),
                sandbox.as_ref(),
                child.pid,
            ),
            _ => None,
        };
        let log_file = log
            .as_ref()
            .map(|(_, p)| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        (spec.events)(JobEvent::Started {
            pid: child.pid,
            log_file,
            round,
            rounds,
            machine: String::new(),
        });
        let (outcome, rusage) = monitor(spec, ctl, child.pid, read_end, log.map(|(w, _)| w));
        ctl.pid.store(0, Ordering::SeqCst);
        // A build user's processes die now, before anything the builder wrote is looked
        // at: whatever it left running (without a cgroup to kill it) could otherwise race
        // what follows, swapping names under the checks of its outputs or of a kept tree.
        let killed = match &build_user {
            Some(u) => kiln_sandbox::spawn::kill_user(u.uid).map_err(Failure::misc),
            None => Ok(()),
        };
        // The builder is gone: so is its daemon (its connections are ended and waited for).
        drop(serving);
        if let Some(rb) = recursive {
            rb.set_sandbox(None);
        }
        // Nothing of the build runs past this point; its cgroup's figures cover every
        // process it had, the wait status's only those that were waited for.
        ctl.add_usage(match cgroup.map(kiln_sandbox::Cgroup::finish) {
            // Peak memory: of the whole build where its cgroup accounts memory, else of
            // its largest process.
            Some(u) => Usage {
                memory_peak: u.memory_peak.or(rusage.memory_peak),
                ..u
            },
            None => rusage,
        });
        // A build user whose processes could not be killed must not have its files looked
        // at (reported now that the rest is cleaned up).
        killed?;
        (spec.events)(JobEvent::Registering);
        // Whatever the builder left in the sandbox's store comes out (made safe), so that
        // what follows handles outputs at their real paths, sandbox or not.
        if let Some(sb) = &sandbox {
            for p in plans {
                sb.take_output(store, &p.build_path)
                    .map_err(Failure::misc)?;
            }
        }
        let (status, tail) = match outcome {
            Monitor::Exited(st, tail) => (st, tail),
            Monitor::Stopped(f) => return Err(f),
        };
        if kiln_sandbox::spawn::exit_code(status) != Some(0) {
            let disk_full =
                disk_nearly_full(&store.layout().real_store_dir) || disk_nearly_full(&build_dir);
            if disk_full {
                (spec.events)(JobEvent::Log(Arc::from(
                    &b"note: build failure may have been caused by lack of free disk space\n"[..],
                )));
            }
            let status_text = kiln_sandbox::spawn::describe_status(status);
            let kind = if fixed || disk_full {
                BuildStatus::TransientFailure
            } else {
                BuildStatus::PermanentFailure
            };
            keep_dir = spec.settings.keep_failed;
            let log_tail = tail.lines();
            let mut f = Failure::new(
                kind,
                format!("builder for '{drv_abs}' {status_text}{}", suffix(&log_tail)),
            );
            f.detail = Some(crate::result::FailureDetail::Builder {
                status: status_text,
                log_tail,
            });
            return Err(f);
        }
        // Collect the outputs.
        let mut all_paths: Vec<StorePath> = spec.input_paths.iter().cloned().collect();
        all_paths.extend(plans.iter().map(|p| p.path.clone()));
        // Outputs may refer to what a recursive build added or built through its socket.
        if let Some(rb) = recursive {
            all_paths.extend(rb.added());
        }
        let mut infos = Vec::new();
        for p in plans {
            infos.push(
                register_output(spec, p, from_tmp, &all_paths, builder_uid).inspect_err(|_| {
                    keep_dir = spec.settings.keep_failed;
                })?,
            );
        }
        check_references(spec, plans, &infos)?;
        finalize_floating(spec, plans, infos, held).inspect_err(|_| {
            keep_dir = spec.settings.keep_failed;
        })
    })();
    match &result {
        Err(f) if f.status != BuildStatus::NotDeterministic || keep_dir => {
            if keep_dir {
                keep_build_dir(spec, &bd, builder_uid);
            } else {
                let _ = fsutil::remove_build_tree(&bd.top);
            }
            // Outputs of a failed build are not kept in the store unless asked for, and even
            // then never setuid or world-writable (CVE-2024-52867, CVE-2025-52992).
            for p in plans {
                let real = store.real_path(&p.build_path);
                if std::fs::symlink_metadata(&real).is_ok()
                    && !store.is_valid(&p.build_path).unwrap_or(true)
                {
                    // Kept: made safe and taken from the builder's ids (a later build may
                    // run as them), or else not kept at all.
                    let kept = spec.settings.keep_failed
                        && fsutil::hand_over(&real, builder_uid, daemon_ids()).is_ok();
                    if !kept {
                        let _ = fsutil::remove_tree(&real);
                    }
                }
            }
        }
        _ => {
            let _ = fsutil::remove_build_tree(&bd.top);
        }
    }
    result
}

/// Binds a recursive build's daemon socket in its build directory, 0600 and owned by the
/// builder's host ids (`owner`; the daemon's own when `None`).
fn bind_recursive_socket(
    build_dir: &Path,
    owner: Option<(u32, u32)>,
) -> Result<std::os::unix::net::UnixListener, Failure> {
    let path = build_dir.join(crate::recursive::SOCKET_NAME);
    let fail = |what: &str, e: std::io::Error| {
        Failure::misc(format!(
            "{what} the daemon socket '{}': {e}",
            path.display()
        ))
    };
    // A socket address holds at most 107 bytes, which deep state directories exceed.
    let l = kiln_format::unix_socket::bind(&path).map_err(|e| fail("binding", e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail("protecting", e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
            .map_err(|e| fail("handing over", e))?;
    }
    Ok(l)
}

/// Starts serving a recursive build's socket once its builder runs (and, sandboxed, once
/// its namespaces are known, so that what it is given can be mounted in). A failure is
/// the builder's to see: its connections are refused.
fn serve_recursive(
    spec: &JobSpec,
    rb: &Arc<crate::recursive::RecursiveBuild>,
    listener: std::os::unix::net::UnixListener,
    server: &dyn crate::recursive::RecursiveServer,
    sandbox: Option<&crate::sandbox::BuildSandbox>,
    pid: i32,
) -> Option<Box<dyn Send>> {
    let warn = |e: String| {
        (spec.events)(JobEvent::Log(Arc::from(
            format!("kiln: cannot serve the recursive Nix socket: {e}\n").as_bytes(),
        )));
    };
    if let Some(sb) = sandbox {
        let view = kiln_sandbox::Namespaces::of(pid)
            .map_err(|e| e.to_string())
            .and_then(|ns| {
                Ok(crate::recursive::SandboxView {
                    linker: sb.linker(&spec.store)?,
                    ns,
                })
            });
        match view {
            Ok(view) => rb.set_sandbox(Some(view)),
            Err(e) => {
                warn(e);
                return None;
            }
        }
    }
    match server.serve(listener, rb.clone()) {
        Ok(guard) => Some(guard),
        Err(e) => {
            warn(e);
            None
        }
    }
}

/// `keep-failed`: the build directory stays, handed to whoever asked (else to the daemon's
/// user, away from the build's ids, which a later build may get).
///
/// The builder's processes are gone by now (its PID namespace, its cgroup, or its build
/// user's processes were killed). The top is sealed (0700, the daemon's) so that nobody
/// reaches the tree by path while it changes hands; the hand-over then goes through
/// descriptors and gives away only the builder's own inodes, stripped of setuid, setgid and
/// world-write bits (CVE-2024-52867), so that neither a descriptor smuggled out of the build
/// nor a hard link to a root-owned file (CVE-2021-27851) can turn it into a chown of
/// something else. Only then is the top opened (0711, unlistable) for the client to reach
/// `build` by its name. A tree that cannot be handed over whole is removed, not kept.
fn keep_build_dir(spec: &JobSpec, bd: &BuildDir, builder_uid: u32) {
    use std::os::unix::fs::PermissionsExt;
    // A daemon that is not root can give nothing away: its builder's files are its own.
    let to = match spec.settings.client {
        Some((u, g)) if u != 0 && rustix::process::geteuid().is_root() => (u, g),
        _ => daemon_ids(),
    };
    let kept = (|| {
        std::fs::set_permissions(&bd.top, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("sealing '{}': {e}", bd.top.display()))?;
        fsutil::hand_over(&bd.dir, builder_uid, to).map_err(|e| e.to_string())?;
        let parent = builds_parent(spec);
        for (p, m) in [(&parent, 0o711), (&bd.top, 0o711)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
                .map_err(|e| format!("opening '{}' to its user: {e}", p.display()))?;
        }
        Ok::<_, String>(())
    })();
    let note = match kept {
        Ok(()) => format!("note: keeping build directory '{}'\n", bd.dir.display()),
        Err(e) => {
            let _ = fsutil::remove_build_tree(&bd.top);
            format!("note: not keeping the build directory: {e}\n")
        }
    };
    (spec.events)(JobEvent::Log(Arc::from(note.into_bytes())));
}

/// The builder program and its argv. `builtin:…` builders run as `kiln __builtin NAME`.
fn builder_command(drv: &Derivation) -> Result<(String, Vec<String>), Failure> {
    if let Some(name) = drv.builder.strip_prefix("builtin:") {
        let exe = std::env::current_exe()
            .map_err(|e| Failure::misc(format!("cannot find kiln's own executable: {e}")))?;
        let exe = exe.to_string_lossy().into_owned();
        return Ok((exe.clone(), vec![exe, "__builtin".into(), name.into()]));
    }
    let base = Path::new(&drv.builder)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut args = vec![base];
    args.extend(drv.args.iter().cloned());
    Ok((drv.builder.clone(), args))
}

fn disk_nearly_full(p: &Path) -> bool {
    rustix::fs::statvfs(p).is_ok_and(|s| s.f_bavail.saturating_mul(s.f_frsize) < 8 << 20)
}

enum Monitor {
    Exited(i32, LogTail),
    Stopped(Failure),
}

/// The last lines of a build's output, for its error message (`log-lines`).
#[derive(Debug, Default)]
struct LogTail {
    max: usize,
    lines: std::collections::VecDeque<String>,
    current: Vec<u8>,
    /// Where the next byte goes in `current` (a carriage return rewinds to 0, as terminals
    /// and Nix do).
    pos: usize,
}

impl LogTail {
    fn new(max: usize) -> Self {
        LogTail {
            max,
            ..Default::default()
        }
    }

    fn feed(&mut self, data: &[u8]) {
        if self.max == 0 {
            return;
        }
        for &b in data {
            match b {
                b'\r' => self.pos = 0,
                b'\n' => self.flush(),
                _ => {
                    // Bounded: one overlong line does not grow without limit.
                    if self.pos < 4096 {
                        if self.pos < self.current.len() {
                            self.current[self.pos] = b;
                        } else {
                            self.current.push(b);
                        }
                        self.pos += 1;
                    }
                }
            }
        }
    }

    fn flush(&mut self) {
        let line = String::from_utf8_lossy(&self.current).into_owned();
        self.current.clear();
        self.pos = 0;
        // Structured messages (`@nix {json}` on $NIX_LOG_FD) are not log lines: Nix leaves
        // them out of the tail it shows.
        if line.starts_with("@nix ") {
            return;
        }
        self.lines.push_back(line);
        if self.lines.len() > self.max {
            self.lines.pop_front();
        }
    }

    /// The last lines, the unfinished one included.
    fn lines(mut self) -> Vec<String> {
        if !self.current.is_empty() {
            self.flush();
        }
        self.lines.into()
    }
}

/// `;\nlast N log lines:\n> …` as Nix 2.8 appends it to a builder failure, or nothing.
fn suffix(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = format!(";\nlast {} log lines:", lines.len());
    for l in lines {
        s.push_str("\n> ");
        s.push_str(l);
    }
    s
}

/// Relays the builder's output until it is done, enforcing the limits.
fn monitor(
    spec: &JobSpec,
    ctl: &JobControl,
    pid: i32,
    pipe: OwnedFd,
    mut log: Option<LogWriter>,
) -> (Monitor, Usage) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let drv_abs = spec.store.print(&spec.drv_path);
    let s = &spec.settings;
    let start = Instant::now();
    let mut last_output = Instant::now();
    let mut log_size = 0u64;
    let mut pipe = std::fs::File::from(pipe);
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid).expect("positive pid"),
        rustix::process::PidfdFlags::empty(),
    )
    .ok();
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail = LogTail::new(s.log_lines);
    let mut stop: Option<Failure> = None;
    let mut exited_at: Option<Instant> = None;
    loop {
        let mut wait_ms: i64 = 1000;
        if s.max_silent_time > 0 {
            let left = Duration::from_secs(s.max_silent_time).saturating_sub(last_output.elapsed());
            wait_ms = wait_ms.min(left.as_millis() as i64);
        }
        if s.timeout > 0 {
            let left = Duration::from_secs(s.timeout).saturating_sub(start.elapsed());
            wait_ms = wait_ms.min(left.as_millis() as i64);
        }
        if let Some(t) = exited_at {
            // The builder is gone; stragglers were killed. Drain briefly, then give up on a
            // descendant that escaped the process group while holding the pipe.
            let left = Duration::from_secs(1).saturating_sub(t.elapsed());
            if left.is_zero() {
                break;
            }
            wait_ms = wait_ms.min(left.as_millis() as i64);
        }
        let ts = Timespec {
            tv_sec: wait_ms / 1000,
            tv_nsec: (wait_ms % 1000) * 1_000_000,
        };
        let mut fds = vec![PollFd::new(&pipe, PollFlags::IN)];
        if let (Some(p), None) = (&pidfd, exited_at) {
            fds.push(PollFd::new(p, PollFlags::IN));
        }
        let _ = poll(&mut fds, Some(&ts));
        let pipe_ready = !fds[0].revents().is_empty();
        let child_done = fds.get(1).is_some_and(|f| !f.revents().is_empty());
        drop(fds);
        if pipe_ready {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    last_output = Instant::now();
                    log_size += n as u64;
                    if s.max_log_size > 0 && log_size > s.max_log_size {
                        stop = Some(Failure::new(
                            BuildStatus::LogLimitExceeded,
                            format!("building '{drv_abs}' killed after writing more than {} bytes of log output", s.max_log_size),
                        ));
                        kiln_sandbox::spawn::kill_group(pid, SIGKILL);
                        break;
                    }
                    if let Some(l) = log.as_mut() {
                        let _ = l.write(&buf[..n]);
                    }
                    tail.feed(&buf[..n]);
                    (spec.events)(JobEvent::Log(Arc::from(&buf[..n])));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if child_done && exited_at.is_none() {
            // Kill whatever the builder left running in its process group (it is still a
            // zombie, so its pid cannot have been reused).
            kiln_sandbox::spawn::kill_group(pid, SIGKILL);
            exited_at = Some(Instant::now());
        }
        if ctl.is_cancelled() {
            kiln_sandbox::spawn::kill_group(pid, SIGKILL);
            stop = Some(Failure::misc(format!("build of '{drv_abs}' was cancelled")));
            break;
        }
        if exited_at.is_none()
            && s.max_silent_time > 0
            && last_output.elapsed() >= Duration::from_secs(s.max_silent_time)
        {
            stop = Some(Failure::new(
                BuildStatus::TimedOut,
                format!(
                    "building '{drv_abs}' timed out after {} seconds of silence",
                    s.max_silent_time
                ),
            ));
            kiln_sandbox::spawn::kill_group(pid, SIGKILL);
            break;
        }
        if exited_at.is_none() && s.timeout > 0 && start.elapsed() >= Duration::from_secs(s.timeout)
        {
            stop = Some(Failure::new(
                BuildStatus::TimedOut,
                format!("building '{drv_abs}' timed out after {} seconds", s.timeout),
            ));
            kiln_sandbox::spawn::kill_group(pid, SIGKILL);
            break;
        }
    }
    kiln_sandbox::spawn::kill_group(pid, SIGKILL);
    let (status, used) = kiln_sandbox::spawn::wait_usage(pid).unwrap_or((-1, Default::default()));
    if let Some(l) = log {
        let _ = l.finish();
    }
    let usage = Usage {
        cpu_user: used.user,
        cpu_system: used.system,
        memory_peak: (used.max_rss > 0).then_some(used.max_rss),
    };
    let outcome = match stop {
        Some(f) => Monitor::Stopped(f),
        None => Monitor::Exited(status, tail),
    };
    (outcome, usage)
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

/// Canonicalises an output for registration, owned by `owner`; `builder`: the uid whose
/// inodes the tree must hold (see [`fsutil::Ownership`]), where that is not `owner`'s.
fn canonicalise_for(
    path: &Path,
    owner: (u32, u32),
    builder: Option<u32>,
) -> kiln_store::Result<()> {
    fsutil::canonicalise(
        path,
        fsutil::Ownership {
            expected_uid: builder,
            target: owner,
        },
    )
}

/// What a fixed-output derivation produced under a wrong hash is kept as Nix 2.8 keeps it:
/// moved to the path its actual hash gives and registered there (deriver and `ca` set), so
/// that correcting the hash in the expression finds the result instead of fetching again.
/// Best effort: the build fails either way, so any problem here only leaves the output to
/// be deleted with the failed build. An output with references is not kept (its path
/// would have to name them; fixed outputs normally have none).
fn keep_mismatched_fixed_output(
    spec: &JobSpec,
    plan: &OutputPlan,
    actual: &Path,
    method: FileIngestionMethod,
    got: &kiln_format::Hash,
) {
    let store = &spec.store;
    let sd = store.store_dir();
    let Ok(path) =
        sd.make_fixed_output_path(method, got, plan.path.name(), &BTreeSet::new(), false)
    else {
        return;
    };
    if store.is_valid(&path).unwrap_or(true) {
        return;
    }
    // Whoever holds the lock is producing this path; let them.
    let Ok(Some(_lock)) = store.lock_path(&path, false) else {
        return;
    };
    let kept = (|| -> Result<(), String> {
        if store.is_valid(&path).map_err(|e| e.to_string())? {
            return Ok(());
        }
        canonicalise_for(actual, daemon_ids(), None).map_err(|e| e.to_string())?;
        let all: Vec<StorePath> = spec.input_paths.iter().cloned().collect();
        let mut scanner = RefScanner::new(all.iter().map(|p| p.hash_part()));
        let mut sink = ParallelHashSink::new(HashAlgo::Sha256);
        nar::dump(actual, &mut Tee(&mut sink, &mut scanner)).map_err(|e| e.to_string())?;
        let (nar_hash, nar_size) = sink.finish().map_err(|e| e.to_string())?;
        if scanner.found().next().is_some() {
            return Ok(());
        }
        let real = store.real_path(&path);
        // An invalid leftover at the path (we hold its lock): replace it.
        if std::fs::symlink_metadata(&real).is_ok() {
            fsutil::remove_tree(&real).map_err(|e| e.to_string())?;
        }
        std::fs::rename(actual, &real).map_err(|e| e.to_string())?;
        let mut info = ValidPathInfo::new(path.clone(), nar_hash, nar_size);
        info.deriver = Some(spec.drv_path.clone());
        info.ultimate = true;
        info.ca = Some(ContentAddress::Fixed(method, *got));
        let registered = store
            .sync()
            .and_then(|()| store.register_valid_paths(&[info]));
        if let Err(e) = registered {
            let _ = fsutil::remove_tree(&real);
            return Err(e.to_string());
        }
        Ok(())
    })();
    if let Err(e) = kept {
        tracing::debug!(
            "not keeping the mismatched output as '{}': {e}",
            sd.display(&path)
        );
    }
}

/// Checks, rewrites back, canonicalises, hashes and scans one output.
fn register_output(
    spec: &JobSpec,
    plan: &OutputPlan,
    from_tmp: &BTreeMap<String, String>,
    all_paths: &[StorePath],
    builder_uid: u32,
) -> Result<ValidPathInfo, Failure> {
    let store = &spec.store;
    let sd = store.store_dir();
    let drv_abs = sd.display(&spec.drv_path);
    let mut actual = store.real_path(&plan.build_path);
    let meta = match std::fs::symlink_metadata(&actual) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(rejected(format!(
                "builder for '{drv_abs}' failed to produce output path '{}'",
                sd.display(&plan.path)
            )))
        }
        Err(e) => {
            return Err(Failure::misc(format!(
                "getting attributes of '{}': {e}",
                actual.display()
            )))
        }
    };
    use std::os::unix::fs::MetadataExt;
    // A group- or world-writable output could have been changed by someone else meanwhile.
    if !meta.file_type().is_symlink() && meta.mode() & 0o022 != 0 {
        return Err(rejected(format!(
            "suspicious ownership or permission on '{}'; rejecting this build output",
            sd.display(&plan.path)
        )));
    }
    let fixed = spec.drv.fixed_output().copied();
    let me = daemon_ids();
    // A builder running under other ids than the daemon's must have made every inode of
    // its output itself (or linked a canonical input).
    let mut builder = (builder_uid != me.0).then_some(builder_uid);
    // Redirected outputs are rewritten back, and so is any output of the same build (a
    // sibling may refer to a redirected output by its temporary path); fixed outputs are
    // copied to fresh inodes so that no descriptor the builder passed on can reach the
    // registered path (CVE-2024-27297).
    if plan.redirected || fixed.is_some() || !from_tmp.is_empty() {
        if builder.is_some() {
            // Checked before the daemon reads the tree to copy it: a hard link to a file
            // the builder could not read would otherwise have its contents copied into
            // the store (and, under a wrong hash, kept there).
            canonicalise_for(&actual, me, builder).map_err(|e| rejected(e.to_string()))?;
            builder = None;
        }
        let mut scratch = store
            .scratch_path(plan.path.name())
            .map_err(Failure::misc)?;
        let rewrites = from_tmp.clone();
        rewrite::copy_tree(&actual, scratch.real(), &rewrites).map_err(Failure::misc)?;
        fsutil::remove_tree(&actual).map_err(Failure::misc)?;
        std::fs::rename(scratch.real(), &actual)
            .map_err(|e| Failure::misc(format!("moving '{}': {e}", actual.display())))?;
        scratch.keep();
        actual = store.real_path(&plan.build_path);
    }
    if let Some(f) = fixed {
        let got = match f.method {
            FileIngestionMethod::Flat => {
                let m = std::fs::symlink_metadata(&actual).map_err(Failure::misc)?;
                if !m.is_file() || m.mode() & 0o100 != 0 {
                    return Err(rejected(format!(
                        "output path '{}' should be a non-executable regular file",
                        sd.display(&plan.path)
                    )));
                }
                let mut h = Hasher::new(f.hash.algo());
                let mut file = std::fs::File::open(&actual).map_err(Failure::misc)?;
                std::io::copy(&mut file, &mut h).map_err(Failure::misc)?;
                h.finish()
            }
            FileIngestionMethod::Recursive => {
                let mut h = HashSink::new(f.hash.algo());
                nar::dump(&actual, &mut h).map_err(Failure::misc)?;
                h.finish().0
            }
        };
        if got != f.hash {
            // Nix makes the output's path from what was built, references included, before
            // it compares hashes, and only `sha256` recursive outputs may have references:
            // an output that refers to store paths is that error, not a hash mismatch.
            if !(f.method == FileIngestionMethod::Recursive && f.hash.algo() == HashAlgo::Sha256) {
                let mut refs = RefScanner::new(all_paths.iter().map(|p| p.hash_part()));
                nar::dump(&actual, &mut refs).map_err(Failure::misc)?;
                if refs.found().next().is_some() {
                    return Err(rejected(format!(
                        "fixed output derivation '{}' is not allowed to refer to other store paths.\nYou may need to use the 'unsafeDiscardReferences' derivation attribute, see the manual for more details.",
                        plan.path.name()
                    )));
                }
            }
            keep_mismatched_fixed_output(spec, plan, &actual, f.method, &got);
            let mut fl = rejected(format!(
                "hash mismatch in fixed-output derivation '{drv_abs}':\n  specified: {}\n     got:    {}",
                f.hash.to_sri(),
                got.to_sri()
            ));
            fl.kinds.hash_mismatch = true;
            return Err(fl);
        }
    }
    let t0 = std::time::Instant::now();
    let canonicalise = || {
        let r = canonicalise_for(&actual, me, builder).map_err(|e| rejected(e.to_string()));
        (r, t0.elapsed())
    };
    // NAR hash and references in one pass over the NAR: reading and scanning on this thread,
    // hashing on a helper once the output is large.
    let mut scanner = RefScanner::new(all_paths.iter().map(|p| p.hash_part()));
    let hash = |scanner: &mut RefScanner| {
        let mut sink = ParallelHashSink::new(HashAlgo::Sha256);
        nar::dump(&actual, &mut Tee(&mut sink, scanner)).map_err(Failure::misc)?;
        sink.finish().map_err(Failure::misc)
    };
    // Canonicalisation only changes metadata the archive does not record (the owner's
    // execute bit decides both the archive's `executable` and the canonical mode), so for a
    // directory it runs beside the hashing pass; its verdict still gates registration. A
    // single file is not worth a thread. Without root's permission override the pass must
    // wait: canonicalisation is what makes a builder's mode-0 files readable.
    let ((canonical, canonicalised), hashed) = if meta.is_dir() && me.0 == 0 {
        std::thread::scope(|sc| {
            let c = sc.spawn(canonicalise);
            let h = hash(&mut scanner);
            let c = c.join().unwrap_or_else(|_| {
                (
                    Err(Failure::misc("canonicalisation panicked")),
                    t0.elapsed(),
                )
            });
            (c, h)
        })
    } else {
        let c = canonicalise();
        (c, hash(&mut scanner))
    };
    canonical?;
    let (nar_hash, nar_size) = hashed?;
    tracing::debug!(
        output = %sd.display(&plan.path),
        nar_size,
        canonicalise_ms = canonicalised.as_secs_f64() * 1e3,
        total_ms = t0.elapsed().as_secs_f64() * 1e3,
        "output canonicalised, hashed and scanned"
    );
    // `unsafeDiscardReferences.<output> = true` (structured attributes): registered with no
    // references, whatever the scan found (for outputs such as disk images whose bytes
    // happen to contain store paths).
    let discard = crate::attrs::Attrs::of(&spec.drv)
        .discard_references(&plan.name)
        .map_err(rejected)?;
    let references: BTreeSet<StorePath> = if discard {
        tracing::debug!("discarding references of output '{}'", plan.name);
        BTreeSet::new()
    } else {
        scanner.found().map(|i| all_paths[i].clone()).collect()
    };
    let mut info = ValidPathInfo::new(plan.path.clone(), nar_hash, nar_size);
    info.references = references;
    info.deriver = Some(spec.drv_path.clone());
    info.ultimate = true;
    if let Some(f) = fixed {
        info.ca = Some(ContentAddress::Fixed(f.method, f.hash));
    }
    Ok(info)
}

struct Tee<'a>(&'a mut ParallelHashSink, &'a mut RefScanner);

impl Write for Tee<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.1.feed(b);
        self.0.write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Moves floating content-addressed outputs from their scratch paths to the paths their
/// contents give (Nix's `registerOutputs` for `CAFloating`): each output's hash is taken
/// *modulo* its scratch hash part (self-references do not feed into it), its references to
/// sibling outputs are rewritten to their final paths first (siblings in dependency order),
/// and its own scratch hash part is rewritten to the final one. An output whose path is
/// already valid (another derivation produced the same contents) is not touched. Locks on
/// the final paths go to `held`, to be released after registration, with a temporary root on
/// each (a collector must not take an output between its registration and its client's
/// root).
fn finalize_floating(
    spec: &JobSpec,
    plans: &[OutputPlan],
    infos: Vec<ValidPathInfo>,
    held: &mut Finalized<'_>,
) -> Result<Vec<ValidPathInfo>, Failure> {
    if plans.iter().all(|p| p.floating.is_none()) {
        return Ok(infos);
    }
    let store = &spec.store;
    let sd = store.store_dir();
    let index: BTreeMap<&StorePath, usize> = plans
        .iter()
        .enumerate()
        .map(|(i, p)| (&p.path, i))
        .collect();
    // Dependency order between the outputs (a cycle between two outputs is refused).
    let mut order = Vec::new();
    let mut mark = vec![0u8; plans.len()];
    fn visit(
        i: usize,
        infos: &[ValidPathInfo],
        index: &BTreeMap<&StorePath, usize>,
        mark: &mut [u8],
        order: &mut Vec<usize>,
    ) -> Result<(), usize> {
        match mark[i] {
            2 => return Ok(()),
            1 => return Err(i),
            _ => {}
        }
        mark[i] = 1;
        for r in &infos[i].references {
            match index.get(r) {
                Some(&j) if j != i => visit(j, infos, index, mark, order)?,
                _ => {}
            }
        }
        mark[i] = 2;
        order.push(i);
        Ok(())
    }
    for i in 0..plans.len() {
        visit(i, &infos, &index, &mut mark, &mut order).map_err(|j| {
            rejected(format!(
                "cycle detected in the references of '{}'",
                sd.display(&plans[j].path)
            ))
        })?;
    }
    let mut finals: Vec<Option<ValidPathInfo>> = vec![None; plans.len()];
    let mut rewrites: BTreeMap<String, String> = BTreeMap::new();
    for i in order {
        let (plan, info) = (&plans[i], &infos[i]);
        let Some(f) = plan.floating else {
            finals[i] = Some(info.clone());
            continue;
        };
        let actual = store.real_path(&plan.build_path);
        let siblings = info
            .references
            .iter()
            .any(|r| r != &plan.path && index.contains_key(r));
        if siblings {
            replace_tree(store, &actual, &rewrites)?;
        }
        let got = match f.method {
            FileIngestionMethod::Flat => {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::symlink_metadata(&actual).map_err(Failure::misc)?;
                if !m.is_file() || m.mode() & 0o100 != 0 {
                    return Err(rejected(format!(
                        "output path '{}' should be a non-executable regular file since recursive hashing is not enabled (outputHashMode=flat)",
                        sd.display(&plan.path)
                    )));
                }
                let mut h = HashModuloSink::new(f.algo, plan.path.hash_part());
                let mut file = std::fs::File::open(&actual).map_err(Failure::misc)?;
                std::io::copy(&mut file, &mut h).map_err(Failure::misc)?;
                h.finish().0
            }
            FileIngestionMethod::Recursive => {
                let mut h = HashModuloSink::new(f.algo, plan.path.hash_part());
                nar::dump(&actual, &mut h).map_err(Failure::misc)?;
                h.finish().0
            }
        };
        let mut others = BTreeSet::new();
        let mut self_ref = false;
        for r in &info.references {
            if r == &plan.path {
                self_ref = true;
            } else if let Some(&j) = index.get(r) {
                let sib = finals[j]
                    .as_ref()
                    .ok_or_else(|| Failure::misc("output order"))?;
                others.insert(sib.path.clone());
            } else {
                others.insert(r.clone());
            }
        }
        let plain = f.method == FileIngestionMethod::Recursive && f.algo == HashAlgo::Sha256;
        if !plain && (self_ref || !others.is_empty()) {
            return Err(rejected(format!(
                "output '{}' refers to store paths, which only a recursive SHA-256 content-addressed output may do",
                sd.display(&plan.path)
            )));
        }
        let path = sd
            .make_fixed_output_path(f.method, &got, plan.path.name(), &others, self_ref)
            .map_err(Failure::misc)?;
        rewrites.insert(
            plan.path.hash_part().to_string(),
            path.hash_part().to_string(),
        );
        if let Ok(Some(mut l)) = store.lock_path(&path, true) {
            // As for other output locks, the file goes when the lock is released.
            l.set_delete(true);
            held.locks.push(l);
        }
        store.add_temp_root(&path).map_err(Failure::misc)?;
        held.roots.push(path.clone());
        if store.is_valid(&path).map_err(Failure::misc)? {
            // Produced before (by this derivation or another): keep what is there.
            fsutil::remove_tree(&actual).map_err(Failure::misc)?;
            finals[i] = Some(store.path_info(&path).map_err(Failure::misc)?);
            continue;
        }
        let real = store.real_path(&path);
        // Whatever is at the final path is not valid: garbage, replaced.
        if std::fs::symlink_metadata(&real).is_ok() {
            tracing::info!("removing invalid path '{}'", real.display());
            fsutil::remove_tree(&real).map_err(Failure::misc)?;
        }
        let own: BTreeMap<String, String> = [(
            plan.path.hash_part().to_string(),
            path.hash_part().to_string(),
        )]
        .into();
        replace_tree(store, &actual, &own)?;
        std::fs::rename(&actual, &real)
            .map_err(|e| Failure::misc(format!("moving into '{}': {e}", real.display())))?;
        let mut sink = HashSink::new(HashAlgo::Sha256);
        nar::dump(&real, &mut sink).map_err(Failure::misc)?;
        let (nar_hash, nar_size) = sink.finish();
        let mut new = ValidPathInfo::new(path.clone(), nar_hash, nar_size);
        new.references = others;
        if self_ref {
            new.references.insert(path.clone());
        }
        new.deriver = Some(spec.drv_path.clone());
        new.ultimate = true;
        new.ca = Some(ContentAddress::Fixed(f.method, got));
        finals[i] = Some(new);
    }
    finals
        .into_iter()
        .map(|f| f.ok_or_else(|| Failure::misc("an output was not finalized")))
        .collect()
}

/// Locks and temporary roots of floating outputs' final paths. The locks go when it is
/// dropped; so do the roots unless the build succeeded, in which case the scheduler's goal
/// owns them (see `Worker::build_done`).
struct Finalized<'a> {
    store: &'a LocalStore,
    locks: Vec<kiln_store::lock::PathLock>,
    roots: Vec<StorePath>,
}

impl Finalized<'_> {
    fn hand_over(&mut self) {
        self.roots.clear();
    }
}

impl Drop for Finalized<'_> {
    fn drop(&mut self) {
        for p in &self.roots {
            self.store.remove_temp_root(p);
        }
    }
}

/// Rewrites hash parts throughout the tree at `at` (a fresh copy replaces it).
fn replace_tree(
    store: &LocalStore,
    at: &Path,
    rewrites: &BTreeMap<String, String>,
) -> Result<(), Failure> {
    if rewrites.is_empty() {
        return Ok(());
    }
    let name = at
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut scratch = store.scratch_path(&name).map_err(Failure::misc)?;
    rewrite::copy_tree(at, scratch.real(), rewrites).map_err(Failure::misc)?;
    fsutil::remove_tree(at).map_err(Failure::misc)?;
    std::fs::rename(scratch.real(), at)
        .map_err(|e| Failure::misc(format!("moving '{}': {e}", at.display())))?;
    scratch.keep();
    Ok(())
}

/// The output checks, as Nix 2.34's `checkOutputs`: `allowedReferences`,
/// `allowedRequisites`, `disallowedReferences`, `disallowedRequisites` (each a list of
/// store paths or output names), and with structured attributes, per output under
/// `outputChecks`, also `maxSize` and `maxClosureSize` (see [`crate::attrs`]).
fn check_references(
    spec: &JobSpec,
    plans: &[OutputPlan],
    infos: &[ValidPathInfo],
) -> Result<(), Failure> {
    let store = &spec.store;
    let sd = store.store_dir();
    let checks = crate::attrs::Attrs::of(&spec.drv)
        .output_checks()
        .map_err(rejected)?;
    // Output names stand for the paths the outputs were built at.
    let output_path = |name: &str| {
        plans
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.path.clone())
    };
    let by_path: BTreeMap<&StorePath, &ValidPathInfo> =
        infos.iter().map(|i| (&i.path, i)).collect();
    let output_names: Vec<&str> = {
        let mut v: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        v.sort_unstable();
        v
    };
    // An output's closure (itself included) and its size; sibling outputs are not valid
    // yet: their registered infos stand in.
    let closure = |start: &StorePath| -> Result<(BTreeSet<StorePath>, u64), Failure> {
        let mut done = BTreeSet::new();
        let mut size = 0u64;
        let mut todo = vec![start.clone()];
        while let Some(p) = todo.pop() {
            if !done.insert(p.clone()) {
                continue;
            }
            if let Some(i) = by_path.get(&p) {
                size += i.nar_size;
                todo.extend(i.references.iter().cloned());
            } else {
                let i = store.path_info(&p).map_err(Failure::misc)?;
                size += i.nar_size;
                todo.extend(i.references.iter().cloned());
            }
        }
        Ok((done, size))
    };
    // Outputs are checked in name order, as Nix does (its first complaint is the same).
    // `infos` are the registered outputs, one per plan, in the plans' order.
    let mut named: Vec<(&str, &ValidPathInfo)> = plans
        .iter()
        .map(|p| p.name.as_str())
        .zip(infos.iter())
        .collect();
    named.sort_by_key(|(n, _)| *n);
    for (checked, info) in named {
        let Some(c) = checks.for_output(checked) else {
            continue;
        };
        if let Some(max) = c.max_size {
            if info.nar_size > max {
                return Err(rejected(format!(
                    "path '{}' is too large at {} bytes; limit is {max} bytes",
                    sd.display(&info.path),
                    info.nar_size
                )));
            }
        }
        if let Some(max) = c.max_closure_size {
            let (_, size) = closure(&info.path)?;
            if size > max {
                return Err(rejected(format!(
                    "closure of path '{}' is too large at {size} bytes; limit is {max} bytes",
                    sd.display(&info.path)
                )));
            }
        }
        let check = |tokens: &[String], allowed: bool, recursive: bool| -> Result<(), Failure> {
            let mut set = BTreeSet::new();
            for tok in tokens {
                if let Ok(p) = sd.parse_path(tok) {
                    set.insert(p);
                } else if let Some(o) = output_path(tok) {
                    set.insert(o);
                } else {
                    return Err(rejected(format!(
                        "derivation '{}' output check for '{checked}' contains output name '{tok}', but this is not a valid output of this derivation. (Valid outputs are [{}].)",
                        sd.display(&spec.drv_path),
                        output_names.join(", ")
                    )));
                }
            }
            let mut used = if recursive {
                closure(&info.path)?.0
            } else {
                info.references.clone()
            };
            if recursive && c.ignore_self_refs {
                used.remove(&info.path);
            }
            // Every offending path is named, as Nix does.
            let bad: String = used
                .iter()
                .filter(|u| set.contains(*u) != allowed)
                .map(|u| format!("\n  {}", sd.display(u)))
                .collect();
            if bad.is_empty() {
                Ok(())
            } else {
                Err(rejected(format!(
                    "output '{}' is not allowed to refer to the following paths:{bad}",
                    sd.display(&info.path),
                )))
            }
        };
        // An absent allow-list and an empty one differ; an empty deny-list checks nothing.
        if let Some(l) = &c.allowed_references {
            check(l, true, false)?;
        }
        if let Some(l) = &c.allowed_requisites {
            check(l, true, true)?;
        }
        if !c.disallowed_references.is_empty() {
            check(&c.disallowed_references, false, false)?;
        }
        if !c.disallowed_requisites.is_empty() {
            check(&c.disallowed_requisites, false, true)?;
        }
    }
    Ok(())
}
