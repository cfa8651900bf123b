//! One remote build, whichever protocol carries it: inputs there, build, outputs back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kiln_build::job::JobEvent;
use kiln_build::machines::Machine;
use kiln_build::remote::RemoteJob;
use kiln_build::{BuildResult, BuildStatus};
use kiln_format::realisation::Realisation;
use kiln_format::{Derivation, StorePath, ValidPathInfo};
use kiln_protocol::ops::WireBuildResult;
use kiln_store::LocalStore;

use crate::{Conn, Error, Result};

/// Where a build's log goes.
pub(crate) type LogFn = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// What a protocol offers a build.
pub(crate) trait Remote {
    /// Which of `paths` the machine has (after substituting, with `substitute`).
    fn valid(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>>;
    /// Sends `info.path` from `store`.
    fn add(&mut self, store: &LocalStore, info: &ValidPathInfo) -> Result<()>;
    /// Builds; `log` gets the build's output as it comes.
    fn build(&mut self, job: &RemoteJob, drv: &Derivation, log: LogFn) -> Result<WireBuildResult>;
    /// Whether the machine builds only derivations it has as `.drv` files: a daemon builds
    /// a basic derivation (whose output paths it cannot check) for trusted clients only.
    fn needs_drv_files(&self) -> bool {
        false
    }
    /// Builds `job.drv_path` from its `.drv` file there (which must be valid there).
    fn build_drv(&mut self, job: &RemoteJob, log: LogFn) -> Result<WireBuildResult> {
        let _ = (job, log);
        Err(Error::Protocol(kiln_protocol::Error::Protocol(
            "this protocol builds basic derivations only".into(),
        )))
    }
    /// The infos of `paths` on the machine.
    fn infos(&mut self, paths: &BTreeSet<StorePath>) -> Result<Vec<ValidPathInfo>>;
    /// Asks for the NAR of `path`, which then follows on the returned stream.
    fn nar_stream(&mut self, path: &StorePath) -> Result<&mut dyn std::io::Read>;
    /// Copies `info.path` here, checked against `info`, registered as valid; `locked`: the
    /// build goal holds the path's lock (its own output), so it is not taken again.
    fn fetch(
        &mut self,
        store: &LocalStore,
        info: &ValidPathInfo,
        locked: bool,
    ) -> Result<ValidPathInfo> {
        use std::io::Read as _;
        if info.nar_size == 0 {
            return Err(Error::BadOutput {
                path: store.print(&info.path),
                message: "the machine gave no NAR size".into(),
            });
        }
        // The archive follows, as long as the info says: read no more (a machine that
        // lies about the size fails the hash check, and the connection is dropped).
        let mut nar = self.nar_stream(&info.path)?.take(info.nar_size);
        let opts = kiln_store::AddOptions {
            caller_holds_lock: locked,
            ..Default::default()
        };
        store
            .add_nar(info, &mut nar, opts)
            .map_err(|e| crate::worker::output_error(&store.print(&info.path), e))
    }
}

fn remote(c: &mut Conn) -> &mut dyn Remote {
    match c {
        Conn::Worker(w) => w,
        Conn::Serve(s) => s,
    }
}

/// Runs `job` on the connection. Errors are the machine's unless they are
/// [`Error::Local`].
pub(crate) fn run(
    conn: &mut Conn,
    machine: &Machine,
    job: &RemoteJob,
    use_substitutes: bool,
) -> Result<(BuildResult, Vec<ValidPathInfo>)> {
    let store = &job.store;
    let r = remote(conn);
    // An untrusted connection builds from `.drv` files only, unless the derivation is
    // content-addressed (its outputs check themselves), as Nix decides.
    let content_addressed =
        job.drv.is_fixed_output() || job.drv.is_floating() || job.drv.is_impure();
    let from_drv_files = r.needs_drv_files() && !content_addressed;
    // 1. The input closure the machine lacks (and with `.drv` files, the derivation's own
    //    closure), dependencies first.
    let mut to_send = job.inputs.clone();
    if from_drv_files {
        to_send.extend(store.closure([&job.drv_path], false)?);
    }
    let have = r.valid(&to_send, use_substitutes)?;
    let order = store.closure_in_order(to_send.iter(), false)?;
    let mut sent = 0usize;
    for abs in order {
        let p = store.parse_path(&abs)?;
        if have.contains(&p) || !to_send.contains(&p) {
            continue;
        }
        let info = store.path_info(&p)?;
        r.add(store, &info)?;
        sent += 1;
    }
    tracing::debug!(
        "sent {sent} of {} paths for '{}' to '{}'",
        to_send.len(),
        store.print(&job.drv_path),
        machine.uri
    );
    // 2. Build it as a basic derivation: the inputs' outputs stand for its input
    //    derivations (left alone when it has none: that would change a content-addressed
    //    derivation's output ids).
    let mut drv = (*job.drv).clone();
    if !drv.input_drvs.is_empty() {
        drv.input_srcs = job.inputs.clone();
        drv.input_drvs.clear();
    }
    // The log is kept here as for a local build (`nix log` reads it), and goes to the
    // waiting clients as it comes.
    let file = if job.settings.keep_build_log {
        match kiln_build::log::LogWriter::create(
            &store.layout().log_dir,
            &job.drv_path,
            job.settings.log_compression,
        ) {
            Ok((w, _)) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "cannot keep the log of '{}': {e}",
                    store.print(&job.drv_path)
                );
                None
            }
        }
    } else {
        None
    };
    let file = Arc::new(std::sync::Mutex::new(file));
    let events = job.events.clone();
    let file2 = file.clone();
    let log: LogFn = Arc::new(move |b: &[u8]| {
        if let Ok(mut f) = file2.lock() {
            if let Some(w) = f.as_mut() {
                let _ = w.write(b);
            }
        }
        events(JobEvent::Log(Arc::from(b)))
    });
    let built = if from_drv_files {
        r.build_drv(job, log)
    } else {
        r.build(job, &drv, log)
    };
    if let Some(w) = file.lock().ok().and_then(|mut f| f.take()) {
        let _ = w.finish();
    }
    let w = built?;
    let mut result = BuildResult::new(BuildStatus::from_wire(w.status));
    result.error = w.error_msg.clone();
    result.times_built = w.times_built as u32;
    result.non_deterministic = w.is_non_deterministic;
    result.start_time = w.start_time;
    result.stop_time = w.stop_time;
    let micros = |v: i64| std::time::Duration::from_micros(v.max(0) as u64);
    result.cpu_user = w.cpu_user.map(micros);
    result.cpu_system = w.cpu_system.map(micros);
    if !result.success() {
        if result.error.is_empty() {
            result.error = format!(
                "build of '{}' on '{}' failed",
                store.print(&job.drv_path),
                machine.uri
            );
        }
        return Ok((result, Vec::new()));
    }
    // 3. The outputs: their paths (from the built outputs' realisations when the
    //    derivation's outputs are floating), then the ones missing here, copied back.
    let bad = |message: String| Error::Machine {
        machine: machine.uri.clone(),
        message,
    };
    let shown = store.print(&job.drv_path);
    let mut outputs: BTreeMap<String, StorePath> = BTreeMap::new();
    let mut realisations = Vec::new();
    if job.drv.is_floating() {
        // A realisation must be of this derivation's output (its hash modulo and the
        // output's name), and name a path of that output's name: a machine cannot make
        // this store believe another derivation resolved to a path of its choosing.
        let modulo = store.output_hash(&job.drv_path, &job.drv)?;
        for (id, json) in &w.built_outputs {
            let real = Realisation::from_json(json, &machine.uri)
                .map_err(|e| bad(format!("its built output '{id}' is invalid: {e}")))?;
            let name = real.id.output.clone();
            let expected = kiln_format::realisation::DrvOutput::new(modulo, &name);
            let suffix = if name == "out" {
                job.drv.name.clone()
            } else {
                format!("{}-{name}", job.drv.name)
            };
            if real.id != expected
                || !job.drv.outputs.contains_key(&name)
                || real.out_path.name() != suffix
                || outputs
                    .insert(name.clone(), real.out_path.clone())
                    .is_some()
            {
                return Err(bad(format!(
                    "its built output '{id}' is not one of '{shown}''s outputs"
                )));
            }
            realisations.push(real);
        }
    } else {
        for (name, p) in job.drv.output_paths() {
            outputs.insert(name.to_string(), p.clone());
        }
    }
    for name in job.drv.outputs.keys() {
        if !outputs.contains_key(name) {
            return Err(bad(format!(
                "it built '{shown}' but did not report its output '{name}'"
            )));
        }
    }
    // A floating derivation's goal cannot root its outputs before they are known: one root
    // per output is taken here and handed to the goal with a successful result (it takes
    // over the roots of a floating build's outputs); any other end gives them back.
    let handed = Handed::take(store, job.drv.is_floating(), outputs.values())?;
    let missing: BTreeSet<StorePath> = outputs
        .values()
        .filter(|p| !store.is_valid(p).unwrap_or(false))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let mut infos: BTreeMap<StorePath, ValidPathInfo> = BTreeMap::new();
        for i in r.infos(&missing)? {
            if !missing.contains(&i.path) {
                return Err(bad(format!(
                    "it sent '{}', which was not asked for",
                    i.path
                )));
            }
            // An output refers to its inputs and its siblings, nothing else: a path it
            // claims beyond those would arrive unchecked (its hash is the machine's word).
            if let Some(r) = i
                .references
                .iter()
                .find(|r| !job.inputs.contains(*r) && !outputs.values().any(|o| o == *r))
            {
                return Err(bad(format!(
                    "its output '{}' refers to '{}', which is neither an input nor an output of '{shown}'",
                    store.print(&i.path),
                    store.print(r)
                )));
            }
            // Floating outputs are content-addressed: their address is checked as they
            // are added.
            if job.drv.is_floating() && i.ca.is_none() {
                return Err(bad(format!(
                    "its output '{}' of floating derivation '{shown}' has no content address",
                    store.print(&i.path)
                )));
            }
            infos.insert(i.path.clone(), i);
        }
        if infos.len() != missing.len() {
            return Err(bad(format!(
                "it built '{shown}' but has only {} of its {} outputs",
                infos.len(),
                missing.len()
            )));
        }
        for info in references_first(infos.into_values().collect(), &missing) {
            if job.cancelled() {
                return Err(bad("the build was cancelled".into()));
            }
            // The add leaves a temporary root for its caller; the output already has the
            // goal's (a known path) or the one taken above (floating), so this one goes
            // (kept, a daemon held every output copied back until it restarted).
            r.fetch(store, &info, job.locked.contains(&info.path))?;
            store.remove_temp_root(&info.path);
        }
    }
    for real in &realisations {
        store.register_realisation(real)?;
    }
    let mut infos = Vec::new();
    for p in outputs.values() {
        infos.push(store.path_info(p)?);
    }
    // As for a local build (and as Nix does for builds done elsewhere): the outputs stay
    // valid, a failing hook fails the build.
    let events = job.events.clone();
    if let Err(msg) =
        kiln_build::job::post_build_hook(&job.settings, store, &job.drv_path, &outputs, &move |e| {
            events(e)
        })
    {
        let mut r = BuildResult::failed(BuildStatus::MiscFailure, msg);
        r.start_time = result.start_time;
        r.stop_time = result.stop_time;
        return Ok((r, infos));
    }
    result.outputs = outputs;
    result.handed_roots = handed.keep();
    Ok((result, infos))
}

/// Temporary roots of a floating derivation's outputs, taken for the goal: released when
/// dropped unless [`Handed::keep`] hands them to the goal.
struct Handed<'a> {
    store: &'a LocalStore,
    paths: Vec<StorePath>,
}

impl<'a> Handed<'a> {
    fn take<'p>(
        store: &'a LocalStore,
        floating: bool,
        outputs: impl Iterator<Item = &'p StorePath>,
    ) -> Result<Handed<'a>> {
        let paths: Vec<StorePath> = if floating {
            outputs.cloned().collect()
        } else {
            Vec::new()
        };
        store.add_temp_roots(&paths)?;
        Ok(Handed { store, paths })
    }

    /// The roots, now the goal's (through the result's `handed_roots`).
    fn keep(mut self) -> Vec<StorePath> {
        std::mem::take(&mut self.paths)
    }
}

impl Drop for Handed<'_> {
    fn drop(&mut self) {
        for p in &self.paths {
            self.store.remove_temp_root(p);
        }
    }
}

/// `infos` ordered so that each comes after the others of `set` it refers to (outputs
/// cannot refer to each other in a cycle; any left over keep their order).
fn references_first(
    mut infos: Vec<ValidPathInfo>,
    set: &BTreeSet<StorePath>,
) -> Vec<ValidPathInfo> {
    let mut done: BTreeSet<StorePath> = BTreeSet::new();
    let mut out = Vec::with_capacity(infos.len());
    while !infos.is_empty() {
        let before = infos.len();
        let mut rest = Vec::new();
        for i in infos {
            let ready = i
                .references
                .iter()
                .all(|r| *r == i.path || !set.contains(r) || done.contains(r));
            if ready {
                done.insert(i.path.clone());
                out.push(i);
            } else {
                rest.push(i);
            }
        }
        if rest.len() == before {
            out.extend(rest);
            break;
        }
        infos = rest;
    }
    out
}
