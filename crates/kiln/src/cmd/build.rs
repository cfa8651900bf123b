//! `kiln build` and `kiln log`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use clap::Args;
use kiln_build::recipe::Recipe;
use kiln_build::{BuildMode, BuildSettings, Event, Request, Scheduler, SchedulerConfig, Target};
use kiln_format::StorePath;
use kiln_store::LocalStore;

use super::common::StoreArgs;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// `.drv` paths (optionally `DRV!out1,out2`), store paths, or recipe files (`.toml`).
    #[arg(required = true)]
    targets: Vec<String>,
    /// Only these derivations of recipe files (repeatable).
    #[arg(short = 'A', long = "attr")]
    attrs: Vec<String>,
    /// Builds run at once.
    #[arg(long, short = 'j')]
    max_jobs: Option<String>,
    /// NIX_BUILD_CORES given to each build (0: all).
    #[arg(long)]
    cores: Option<u64>,
    /// Keep building after a failure.
    #[arg(long, short = 'k')]
    keep_going: bool,
    /// Rebuild valid outputs and compare them (non-determinism check).
    #[arg(long, conflicts_with = "repair")]
    check: bool,
    /// Rebuild corrupt outputs and replace them.
    #[arg(long)]
    repair: bool,
    /// Build each derivation N times and compare the results.
    #[arg(long, value_name = "N")]
    rounds: Option<u32>,
    /// Keep the build directory of failed builds.
    #[arg(long, short = 'K')]
    keep_failed: bool,
    /// Kill builds silent for this many seconds.
    #[arg(long, value_name = "SECONDS")]
    max_silent_time: Option<u64>,
    /// Kill builds running for this many seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Do not show build logs.
    #[arg(long, short = 'Q')]
    no_build_output: bool,
    /// Print one JSON object per line on standard output instead of paths.
    #[arg(long)]
    json: bool,
    /// Print Guix's `@ build-started …` trace lines on standard error.
    #[arg(long)]
    print_build_trace: bool,
    /// Name of the garbage collector roots left pointing at the outputs: `result` for the
    /// first target's `out`, `result-dev` for its `dev`, `result-2` for the second target's,
    /// as `nix-build` names them.
    #[arg(long, short = 'o', value_name = "NAME", default_value = "result")]
    out_link: PathBuf,
    /// Leave no `result` links (the outputs may then be collected by the next GC).
    #[arg(long)]
    no_out_link: bool,
    /// Write a timeline of the run to FILE: every goal's waits, builds and downloads, as a
    /// Chrome trace that Perfetto opens (`kiln timeline summary FILE` reads it).
    #[arg(long, value_name = "FILE")]
    timeline: Option<PathBuf>,
    /// Plain lines even on a terminal (no live status block).
    #[arg(long)]
    no_live: bool,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// A derivation, or an output whose deriver is known.
    path: String,
}

pub(super) fn parse_store_path(store: &LocalStore, s: &str) -> anyhow::Result<StorePath> {
    if let Ok(p) = store.parse_path(s) {
        return Ok(p);
    }
    let abs = std::path::absolute(s)?;
    let (p, _) = store
        .store_dir()
        .to_store_path(&abs.to_string_lossy())
        .with_context(|| format!("'{s}' is not a store path"))?;
    Ok(p)
}

/// Renders events for a terminal (or as JSON lines).
pub(super) struct Reporter {
    pub json: bool,
    pub quiet: bool,
    pub trace: bool,
    pub out: Mutex<()>,
    /// The live view on a terminal (then nothing else is printed).
    pub live: Option<Arc<super::live::LiveView>>,
    /// For paths in JSON.
    pub store_dir: kiln_format::StoreDir,
}

pub(super) fn json_line(v: serde_json::Value) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{v}");
}

impl kiln_build::EventSink for Reporter {
    fn event(&self, e: &Event) {
        let _g = self.out.lock();
        let mut err = std::io::stderr().lock();
        if self.json {
            json_line(e.to_json(&self.store_dir));
            return;
        }
        if let Some(l) = &self.live {
            return l.event(e);
        }
        if self.trace {
            if let Some(line) = e.trace_line() {
                let _ = writeln!(err, "{line}");
            }
        }
        match e {
            Event::BuildStarted {
                drv,
                round,
                rounds,
                machine,
                ..
            } => {
                if !machine.is_empty() {
                    let _ = writeln!(err, "building '{drv}' on '{machine}'...");
                } else if *rounds > 1 {
                    let _ = writeln!(err, "building '{drv}' (round {round}/{rounds})...");
                } else {
                    let _ = writeln!(err, "building '{drv}'...");
                }
            }
            Event::BuildLog { data, .. } => {
                if !self.quiet {
                    let _ = err.write_all(data);
                }
            }
            Event::SubstitutionStarted { path, .. } => {
                let _ = writeln!(err, "copying path '{path}' from a substituter...");
            }
            Event::Message { level, text } => {
                if *level == 0 {
                    let _ = writeln!(err, "error: {text}");
                } else {
                    let _ = writeln!(err, "{text}");
                }
            }
            Event::SubstitutionFinished {
                ok: false,
                error,
                path,
            } => {
                let e = kiln_build::event::substitution_error(path, error);
                let _ = writeln!(err, "error: {e}");
            }
            Event::HookOutput { text } => {
                let _ = writeln!(err, "{text}");
            }
            Event::BuildFinished { .. }
            | Event::SubstitutionFinished { .. }
            | Event::HashMismatch { .. }
            | Event::BuildQueued { .. }
            | Event::SubstitutionQueued { .. }
            | Event::Phase { .. }
            | Event::Download { .. } => {}
        }
    }
}

/// Realises `targets` with a scheduler of this process, substituting from the caches the
/// settings name; events go to `reporter`.
pub(super) fn realise(
    store: &Arc<LocalStore>,
    settings: &kiln_store::Settings,
    bs: BuildSettings,
    targets: Vec<Target>,
    mode: BuildMode,
    reporter: Reporter,
    observer: Option<Arc<dyn kiln_build::EventSink>>,
) -> anyhow::Result<kiln_build::RequestResult> {
    let machines = kiln_remote::setup(settings, &bs.system)?;
    let sched = Scheduler::start(SchedulerConfig {
        store: store.clone(),
        max_jobs: bs.max_jobs,
        max_substitution_jobs: bs.max_substitution_jobs,
        substituter: Some(kiln_substitute::for_store(store, settings)),
        // Recursive Nix needs a daemon: `kiln build` refuses such derivations, saying so.
        recursive: None,
        remote: machines.remote,
        local_speed_factor: machines.local_speed_factor,
        observer,
        auto_gc: kiln_build::autogc::AutoGcConfig::from_settings(settings),
    });
    let result = sched.build(Request {
        targets,
        mode,
        settings: Arc::new(bs),
        sink: Arc::new(reporter),
        nested: None,
    })?;
    drop(sched);
    // Sandboxes' host directories are removed in the background: not left behind.
    kiln_build::sandbox::trash::wait();
    Ok(result)
}

/// A recipe file on the command line, with the derivations asked of it.
struct RecipeTarget {
    recipe: Recipe,
    file: String,
    names: Vec<String>,
}

/// The command line's build flags, as settings; then its recipes, whose host paths join
/// the run's `sandbox-paths`.
fn apply_flags(
    b: &BuildArgs,
    settings: &mut kiln_store::Settings,
) -> anyhow::Result<Vec<RecipeTarget>> {
    if let Some(j) = &b.max_jobs {
        settings.set("max-jobs", j)?;
    }
    if let Some(c) = b.cores {
        settings.set("cores", &c.to_string())?;
    }
    if b.keep_going {
        settings.set("keep-going", "true")?;
    }
    if b.keep_failed {
        settings.set("keep-failed", "true")?;
    }
    if let Some(r) = b.rounds {
        if r == 0 {
            bail!("--rounds must be at least 1");
        }
        settings.set("build-repeat", &(r - 1).to_string())?;
    }
    if let Some(t) = b.max_silent_time {
        settings.set("max-silent-time", &t.to_string())?;
    }
    if let Some(t) = b.timeout {
        settings.set("timeout", &t.to_string())?;
    }
    if b.print_build_trace {
        settings.set("print-build-trace", "true")?;
    }
    let mut recipes = Vec::new();
    for t in b.targets.iter().filter(|t| t.ends_with(".toml")) {
        let recipe = Recipe::load(&PathBuf::from(t))?;
        let names = if b.attrs.is_empty() {
            recipe.default_names()
        } else {
            b.attrs.clone()
        };
        if !recipe.sandbox_paths().is_empty() {
            settings.set("extra-sandbox-paths", &recipe.sandbox_paths().join(" "))?;
        }
        recipes.push(RecipeTarget {
            recipe,
            file: t.clone(),
            names,
        });
    }
    Ok(recipes)
}

/// The targets of the command line: recipes' derivations (written to the store through
/// `rs`), `.drv` paths (`DRV!out1,out2`) and store paths, read by `parse`.
fn targets_of(
    b: &BuildArgs,
    recipes: Vec<RecipeTarget>,
    rs: &mut dyn kiln_build::recipe::RecipeStore,
    system: &str,
    parse: &dyn Fn(&str) -> anyhow::Result<StorePath>,
) -> anyhow::Result<Vec<Target>> {
    let mut targets = Vec::new();
    let mut recipes = recipes.into_iter();
    for t in &b.targets {
        if t.ends_with(".toml") {
            let Some(r) = recipes.next() else {
                continue;
            };
            let drvs = r.recipe.instantiate(rs, system)?;
            for n in &r.names {
                let drv = drvs
                    .get(n)
                    .with_context(|| format!("recipe '{}' has no derivation '{n}'", r.file))?;
                targets.push(Target::Derivation {
                    drv: drv.clone(),
                    outputs: BTreeSet::new(),
                });
            }
            continue;
        }
        let (path, outs) = match t.split_once('!') {
            Some((p, o)) => (
                p,
                o.split(',')
                    .filter(|x| !x.is_empty() && *x != "*")
                    .map(str::to_string)
                    .collect(),
            ),
            None => (t.as_str(), BTreeSet::new()),
        };
        let p = parse(path)?;
        if p.is_derivation() {
            targets.push(Target::Derivation {
                drv: p,
                outputs: outs,
            });
        } else {
            targets.push(Target::Path(p));
        }
    }
    Ok(targets)
}

fn mode_of(b: &BuildArgs) -> BuildMode {
    if b.check {
        BuildMode::Check
    } else if b.repair {
        BuildMode::Repair
    } else {
        BuildMode::Normal
    }
}

/// A timeline being written: fed from a thread of its own (it writes a file; the
/// scheduler thread must not wait for that).
struct TimelineRun {
    timeline: Arc<kiln_build::timeline::Timeline>,
    feed: Arc<kiln_build::event::Detached>,
}

impl TimelineRun {
    /// All events handed over, the array closed.
    fn finish(&self) -> std::io::Result<()> {
        self.feed.close();
        self.timeline.finish()
    }
}

fn timeline_of(b: &BuildArgs) -> anyhow::Result<Option<TimelineRun>> {
    Ok(match &b.timeline {
        Some(f) => {
            let timeline = Arc::new(
                kiln_build::timeline::Timeline::create(f)
                    .with_context(|| format!("creating the timeline '{}'", f.display()))?,
            );
            let feed = Arc::new(kiln_build::event::Detached::new(
                "timeline",
                timeline.clone(),
                256 << 20,
            ));
            Some(TimelineRun { timeline, feed })
        }
        None => None,
    })
}

/// The live view on a terminal, unless a machine reads the output.
fn live_of(b: &BuildArgs, trace: bool) -> Option<Arc<super::live::LiveView>> {
    if b.json || trace || b.no_live {
        None
    } else {
        super::live::LiveView::start(b.no_build_output)
    }
}

/// What ends a run, built here or through a daemon: the live view and timeline closed,
/// the output paths printed (or the JSON result), `result` links left by `link`, the
/// failures said, the exit status.
fn finish(
    b: &BuildArgs,
    sd: &kiln_format::StoreDir,
    result: &kiln_build::RequestResult,
    live: Option<&Arc<super::live::LiveView>>,
    timeline: Option<&TimelineRun>,
    link: &mut dyn FnMut(&StorePath, &Path) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<ExitCode> {
    if let Some(l) = live {
        l.finish();
    }
    if let (Some(t), Some(f)) = (timeline, &b.timeline) {
        t.finish()
            .with_context(|| format!("writing the timeline '{}'", f.display()))?;
    }
    let code = result.exit_code();
    // (link name suffix, path) per output asked for, in nix-build's order and naming.
    let mut built: Vec<(String, StorePath)> = Vec::new();
    for (i, (t, r)) in result.results.iter().enumerate() {
        if !r.success() {
            continue;
        }
        let target_suffix = if i == 0 {
            String::new()
        } else {
            format!("-{}", i + 1)
        };
        match t {
            Target::Derivation { outputs, .. } => {
                for (n, p) in &r.outputs {
                    if outputs.is_empty() || outputs.contains(n) {
                        let out_suffix = if n == "out" {
                            String::new()
                        } else {
                            format!("-{n}")
                        };
                        built.push((format!("{target_suffix}{out_suffix}"), p.clone()));
                    }
                }
            }
            Target::Path(p) | Target::Basic { drv_path: p, .. } => {
                built.push((target_suffix, p.clone()))
            }
        }
    }
    let paths: Vec<String> = built.iter().map(|(_, p)| sd.display(p)).collect();
    let mut links = Vec::new();
    if !b.no_out_link {
        for (suffix, p) in &built {
            let mut name = b.out_link.clone().into_os_string();
            name.push(suffix);
            let l = link(p, Path::new(&name))
                .with_context(|| format!("leaving the link '{}'", name.to_string_lossy()))?;
            links.push(l.to_string_lossy().into_owned());
        }
    }
    if b.json {
        json_line(
            serde_json::json!({"event": "result", "exit": code, "outputs": paths, "links": links}),
        );
    } else {
        let mut o = std::io::stdout().lock();
        for p in &paths {
            writeln!(o, "{p}")?;
        }
    }
    if code != 0 {
        let failed: Vec<String> = result
            .results
            .iter()
            .filter(|(_, r)| !r.success())
            .map(|(t, _)| sd.display(t.path()))
            .collect();
        if !b.json {
            eprintln!(
                "error: build of {} failed",
                failed
                    .iter()
                    .map(|f| format!("'{f}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        return Ok(ExitCode::from(code));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn build(args: &StoreArgs, b: BuildArgs) -> anyhow::Result<ExitCode> {
    if let Some((d, settings, _)) = args.daemon()? {
        return build_via_daemon(d, settings, &b);
    }
    let (store, mut settings) = args.open()?;
    let recipes = apply_flags(&b, &mut settings)?;
    let mut bs = BuildSettings::from_settings(&settings);
    // The person running the command owns a kept build directory.
    bs.client = Some((
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    ));
    let store = Arc::new(store);
    let system = bs.system.clone();
    let targets = targets_of(&b, recipes, &mut &*store, &system, &|s| {
        parse_store_path(&store, s)
    })?;
    let trace = bs.print_build_trace;
    let timeline = timeline_of(&b)?;
    let live = live_of(&b, trace);
    let result = realise(
        &store,
        &settings,
        bs,
        targets,
        mode_of(&b),
        Reporter {
            json: b.json,
            quiet: b.no_build_output,
            trace,
            out: Mutex::new(()),
            live: live.clone(),
            store_dir: store.store_dir().clone(),
        },
        timeline
            .as_ref()
            .map(|t| t.feed.clone() as Arc<dyn kiln_build::EventSink>),
    )?;
    // `result` links, registered as indirect roots (as nix-build's): what was just built
    // stays until the link is removed.
    finish(
        &b,
        store.store_dir(),
        &result,
        live.as_ref(),
        timeline.as_ref(),
        &mut |p, name| Ok(kiln_store::roots::add_perm_root(store.layout(), p, name)?),
    )
}

/// `kiln build` through the daemon: the same targets, progress and outcome, with the
/// daemon building and the `result` links registered by it as indirect roots.
fn build_via_daemon(
    mut d: super::via_daemon::DaemonStore,
    mut settings: kiln_store::Settings,
    b: &BuildArgs,
) -> anyhow::Result<ExitCode> {
    let recipes = apply_flags(b, &mut settings)?;
    d.set_options(&settings)?;
    let system = BuildSettings::from_settings(&settings).system;
    let sd = d.sd.clone();
    let real = d.real_store_dir().to_path_buf();
    // Paths are read as the daemon's store names them (no database needed for that).
    let reader = super::via_daemon::PathReader::of(&d);
    let parse = |s: &str| reader.parse(s);
    let targets = targets_of(b, recipes, &mut d, &system, &parse)?;
    let trace = settings.get_bool("print-build-trace");
    let timeline = timeline_of(b)?;
    let live = live_of(b, trace);
    let reporter = Reporter {
        json: b.json,
        quiet: b.no_build_output,
        trace,
        out: Mutex::new(()),
        live: live.clone(),
        store_dir: sd.clone(),
    };
    if !d.has_events() {
        tracing::warn!("the daemon does not send kiln's build events: progress is its log only");
    }
    let wire_targets: Vec<kiln_protocol::DerivedPath> = targets
        .iter()
        .map(|t| match t {
            Target::Derivation { drv, outputs } => kiln_protocol::DerivedPath::Built {
                drv: drv.clone(),
                outputs: if outputs.is_empty() {
                    kiln_protocol::OutputSpec::All
                } else {
                    kiln_protocol::OutputSpec::Names(outputs.clone())
                },
            },
            Target::Path(p) | Target::Basic { drv_path: p, .. } => {
                kiln_protocol::DerivedPath::Opaque(p.clone())
            }
        })
        .collect();
    let mode = match mode_of(b) {
        BuildMode::Normal => kiln_protocol::BuildMode::Normal,
        BuildMode::Repair => kiln_protocol::BuildMode::Repair,
        BuildMode::Check => kiln_protocol::BuildMode::Check,
    };
    let wire = d.build(wire_targets, mode, &mut |e| {
        if let Some(t) = &timeline {
            kiln_build::EventSink::event(t.feed.as_ref(), &e);
        }
        kiln_build::EventSink::event(&reporter, &e);
    })?;
    let mut failure = kiln_build::FailureKinds::default();
    let mut results = Vec::new();
    for (t, (_, w)) in targets.into_iter().zip(wire) {
        let status = kiln_build::BuildStatus::from_wire(w.status);
        let mut r = if status.is_success() {
            kiln_build::BuildResult::new(status)
        } else {
            kiln_build::BuildResult::failed(status, w.error_msg.clone())
        };
        r.times_built = w.times_built as u32;
        if r.success() {
            if let Target::Derivation { drv, .. } = &t {
                for (name, p) in d.output_map(drv)? {
                    if let Some(p) = p {
                        r.outputs.insert(name, p);
                    }
                }
            }
        } else {
            failure.merge(r.failure);
            // A kiln daemon said it already, as an event.
            if !d.has_events() {
                eprintln!("error: {}", w.error_msg.replace('\n', "\n       "));
            }
        }
        results.push((t, r));
    }
    let result = kiln_build::RequestResult {
        results,
        failure,
        roots: Default::default(),
    };
    finish(
        b,
        &sd,
        &result,
        live.as_ref(),
        timeline.as_ref(),
        &mut |p, name| {
            // As nix-build through a daemon: the link here (with the local checks),
            // registered there as an indirect root.
            let link = kiln_store::roots::make_root_link(&sd, &real, p, name)?;
            d.add_indirect_root(&link)?;
            Ok(link)
        },
    )
}

pub fn log(args: &StoreArgs, l: LogArgs) -> anyhow::Result<ExitCode> {
    // Through the daemon: the deriver from it, the log from the log directory (readable
    // by all, as Nix keeps it).
    if let Some((mut d, _, layout)) = args.daemon()? {
        let sd = d.sd.clone();
        let p = d.parse(&l.path)?;
        let drv = if p.is_derivation() {
            p
        } else {
            d.valid_info(&p)?
                .deriver
                .with_context(|| format!("path '{}' has no known deriver", sd.display(&p)))?
        };
        return match kiln_build::log::read_log(&layout.log_dir, &drv)? {
            Some(data) => {
                std::io::stdout().lock().write_all(&data)?;
                Ok(ExitCode::SUCCESS)
            }
            None => bail!("build log of '{}' is not available", sd.display(&drv)),
        };
    }
    let (store, _) = args.open()?;
    let p = parse_store_path(&store, &l.path)?;
    let drv = if p.is_derivation() {
        p
    } else {
        let info = store.path_info(&p)?;
        info.deriver
            .with_context(|| format!("path '{}' has no known deriver", store.print(&p)))?
    };
    match kiln_build::log::read_log(&store.layout().log_dir, &drv)? {
        Some(data) => {
            std::io::stdout().lock().write_all(&data)?;
            Ok(ExitCode::SUCCESS)
        }
        None => bail!("build log of '{}' is not available", store.print(&drv)),
    }
}
