//! The scheduler with build machines, against a real store (SQLite, files, locks) and fake
//! machines: a [`RemoteBuilder`] that "builds" by writing the outputs into the local store
//! itself (as a real one copies them back), or fails as a dead machine does. What is tested
//! is the scheduler's side of the seam: where each build goes, slots counted across
//! requests, goals joined, retries after a failed machine, cancellation.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_build::job::{JobControl, JobEvent};
use kiln_build::machines::{parse_builders, Machine};
use kiln_build::remote::{RemoteBuilder, RemoteJob, RemoteOutcome};
use kiln_build::{
    BuildMode, BuildResult, BuildSettings, BuildStatus, Event, Request, Scheduler, SchedulerConfig,
    Target,
};
use kiln_format::derivation::DerivationOutput;
use kiln_format::{Derivation, Hash, StoreDir, StorePath, ValidPathInfo};
use kiln_store::{AddOptions, Layout, LocalStore, StoreOptions};

struct Env {
    _dir: tempfile::TempDir,
    store: Arc<LocalStore>,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sd = StoreDir::new(dir.path().join("store").to_str().unwrap()).unwrap();
    let layout = Layout::new(sd, dir.path().join("state"), dir.path().join("log"));
    let store = Arc::new(LocalStore::open(layout, StoreOptions::default()).unwrap());
    Env { _dir: dir, store }
}

/// Adds a derivation for `system` requiring `features`, with `inputs`' `out` as inputs.
fn drv(e: &Env, name: &str, system: &str, features: &str, inputs: &[&StorePath]) -> StorePath {
    let mut env = BTreeMap::new();
    if !features.is_empty() {
        env.insert("requiredSystemFeatures".to_string(), features.to_string());
    }
    let d = Derivation {
        name: name.into(),
        outputs: BTreeMap::from([(
            "out".to_string(),
            DerivationOutput {
                path: None,
                fixed: None,
                floating: None,
            },
        )]),
        platform: system.into(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), "echo -n built here > $out".into()],
        env,
        input_drvs: inputs
            .iter()
            .map(|i| ((*i).clone(), BTreeSet::from(["out".to_string()])))
            .collect(),
        ..Default::default()
    };
    let d = e.store.finalize_derivation(d).unwrap();
    let text = d.to_aterm(e.store.store_dir());
    let refs: BTreeSet<StorePath> = inputs.iter().map(|i| (*i).clone()).collect();
    e.store
        .add_text(&format!("{name}.drv"), &text, &refs, AddOptions::default())
        .unwrap()
        .path
}

/// What a fake machine does with a build.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    Build,
    /// Unreachable: fails at once, as a refused connection does.
    Dead,
    /// Builds, but only once released (for concurrency and cancellation tests).
    Hold,
}

#[derive(Default)]
struct FakeMachines {
    behaviour: Mutex<HashMap<String, Behaviour>>,
    /// (machine URI, derivation name) of every build started, in order.
    log: Mutex<Vec<(String, String)>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    release: Mutex<bool>,
    released: std::sync::Condvar,
    cancelled: AtomicUsize,
}

impl FakeMachines {
    fn set(&self, uri: &str, b: Behaviour) {
        self.behaviour.lock().unwrap().insert(uri.into(), b);
    }
    fn builds(&self) -> Vec<(String, String)> {
        self.log.lock().unwrap().clone()
    }
    fn release(&self) {
        *self.release.lock().unwrap() = true;
        self.released.notify_all();
    }
}

/// Writes `path` into the store with contents naming the machine, as a machine's output
/// arrives (the scheduler holds the output's lock).
fn deliver(store: &LocalStore, path: &StorePath, machine: &str) -> ValidPathInfo {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("f");
    std::fs::write(&f, format!("built on {machine}")).unwrap();
    let nar = kiln_format::nar::dump_to_vec(&f).unwrap();
    let info = ValidPathInfo::new(path.clone(), Hash::sha256(&nar), nar.len() as u64);
    let opts = AddOptions {
        caller_holds_lock: store.is_locked_by_me(path),
        ..Default::default()
    };
    store.add_nar(&info, &mut nar.as_slice(), opts).unwrap()
}

impl RemoteBuilder for FakeMachines {
    fn build(&self, machine: &Machine, job: RemoteJob, ctl: &JobControl) -> RemoteOutcome {
        let b = self
            .behaviour
            .lock()
            .unwrap()
            .get(&machine.uri)
            .copied()
            .unwrap_or(Behaviour::Build);
        self.log
            .lock()
            .unwrap()
            .push((machine.uri.clone(), job.drv.name.clone()));
        if b == Behaviour::Dead {
            return RemoteOutcome::MachineFailed("connection refused".into());
        }
        // Every input is valid here before the build is sent.
        for p in &job.inputs {
            assert!(job.store.is_valid(p).unwrap(), "input {p} not valid");
        }
        (job.events)(JobEvent::Started {
            pid: 0,
            log_file: String::new(),
            round: 1,
            rounds: 1,
            machine: machine.uri.clone(),
        });
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        if b == Behaviour::Hold {
            let mut g = self.release.lock().unwrap();
            while !*g && !ctl.is_cancelled() {
                g = self
                    .released
                    .wait_timeout(g, Duration::from_millis(20))
                    .unwrap()
                    .0;
            }
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        if ctl.is_cancelled() {
            self.cancelled.fetch_add(1, Ordering::SeqCst);
            let mut r = BuildResult::failed(BuildStatus::MiscFailure, "cancelled");
            r.cancelled = true;
            return RemoteOutcome::Finished(Box::new(r), Vec::new());
        }
        let mut r = BuildResult::new(BuildStatus::Built);
        let mut infos = Vec::new();
        for (name, p) in job.drv.output_paths() {
            infos.push(deliver(&job.store, p, &machine.uri));
            r.outputs.insert(name.to_string(), p.clone());
        }
        RemoteOutcome::Finished(Box::new(r), infos)
    }
}

/// A scheduler with `local_jobs` slots here whose requests' machines are `builders`
/// (see [`settings`]).
fn scheduler(e: &Env, local_jobs: usize, builders: &str, fake: &Arc<FakeMachines>) -> Farm {
    parse_builders(builders, &kiln_build::settings::native_system()).unwrap();
    let mut cfg = SchedulerConfig::local(e.store.clone(), local_jobs);
    cfg.remote = Some(fake.clone());
    Farm {
        sched: Scheduler::start(cfg),
        builders: builders.to_string(),
    }
}

/// A scheduler and the machines its requests name.
struct Farm {
    sched: Scheduler,
    builders: String,
}

impl std::ops::Deref for Farm {
    type Target = Scheduler;
    fn deref(&self) -> &Scheduler {
        &self.sched
    }
}

impl Farm {
    fn settings(&self, max_jobs: usize) -> Arc<BuildSettings> {
        settings_with(max_jobs, &self.builders)
    }
}

/// A request's settings: its client's max-jobs (0: no local builds) and machines.
fn settings_with(max_jobs: usize, builders: &str) -> Arc<BuildSettings> {
    let mut s =
        BuildSettings::from_settings(&kiln_store::Settings::new(kiln_build::settings::CATALOG));
    s.max_jobs = max_jobs;
    s.sandbox = kiln_build::SandboxMode::Off;
    s.builders = builders.to_string();
    Arc::new(s)
}

fn request(
    targets: &[&StorePath],
    s: Arc<BuildSettings>,
    events: Arc<Mutex<Vec<String>>>,
) -> Request {
    Request {
        targets: targets
            .iter()
            .map(|d| Target::Derivation {
                drv: (*d).clone(),
                outputs: BTreeSet::new(),
            })
            .collect(),
        mode: BuildMode::Normal,
        settings: s,
        sink: Arc::new(move |e: &Event| {
            if let Event::Message { text, .. } = e {
                events.lock().unwrap().push(text.clone());
            }
        }),
        nested: None,
    }
}

fn output(e: &Env, d: &StorePath) -> String {
    let drv = e.store.read_derivation(d).unwrap();
    let p = drv.output_paths().next().unwrap().1.clone();
    std::fs::read_to_string(e.store.real_path(&p)).unwrap()
}

const X86: &str = "x86_64-linux";

#[test]
fn builds_go_to_the_machine_whose_system_and_features_fit() {
    let e = env();
    let fake = Arc::new(FakeMachines::default());
    let s = scheduler(
        &e,
        0,
        "ssh://arm aarch64-linux - 2; ssh://kvm x86_64-linux - 1 1 kvm; ssh://big x86_64-linux - 1 1 - big",
        &fake,
    );
    let arm = drv(&e, "arm", "aarch64-linux", "", &[]);
    let kvm = drv(&e, "kvm", X86, "kvm", &[]);
    let big = drv(&e, "big", X86, "big", &[]);
    let riscv = drv(&e, "riscv", "riscv64-linux", "", &[]);
    let msgs = Arc::new(Mutex::new(Vec::new()));
    let r = s
        .build(request(&[&arm, &kvm, &big], s.settings(1), msgs.clone()))
        .unwrap();
    assert!(r.success(), "{:?}", r.results);
    assert_eq!(output(&e, &arm), "built on ssh://arm");
    assert_eq!(output(&e, &kvm), "built on ssh://kvm");
    assert_eq!(output(&e, &big), "built on ssh://big");
    // Nowhere to build it: the error says why each machine would not.
    let r = s.build(request(&[&riscv], s.settings(1), msgs)).unwrap();
    assert!(!r.success());
    let err = &r.results[0].1.error;
    assert!(
        err.contains("'ssh://arm' builds only aarch64-linux"),
        "{err}"
    );
    assert!(err.contains("a 'riscv64-linux'"), "{err}");
}

#[test]
fn slots_are_counted_across_requests_and_a_goal_is_built_once() {
    let e = env();
    let fake = Arc::new(FakeMachines::default());
    fake.set("ssh://one", Behaviour::Hold);
    let s = Arc::new(scheduler(&e, 0, "ssh://one x86_64-linux - 1", &fake));
    let a = drv(&e, "a", X86, "", &[]);
    let b = drv(&e, "b", X86, "", &[]);
    let msgs = Arc::new(Mutex::new(Vec::new()));
    // Two clients, three requests: one wants a, one wants a and b, one wants b.
    let t1 = s
        .submit(request(&[&a], s.settings(1), msgs.clone()))
        .unwrap();
    let t2 = s
        .submit(request(&[&a, &b], s.settings(1), msgs.clone()))
        .unwrap();
    let t3 = s
        .submit(request(&[&b], s.settings(1), msgs.clone()))
        .unwrap();
    // Once one build holds the machine's slot, a while longer for a second to start (it
    // must not).
    let start = std::time::Instant::now();
    while fake.running.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        fake.running.load(Ordering::SeqCst),
        1,
        "one slot on the machine"
    );
    fake.release();
    for t in [t1, t2, t3] {
        assert!(t.wait().unwrap().success());
    }
    assert_eq!(fake.max_running.load(Ordering::SeqCst), 1);
    let mut built: Vec<String> = fake.builds().into_iter().map(|(_, d)| d).collect();
    built.sort();
    assert_eq!(built, ["a", "b"], "each derivation built once");
}

#[test]
fn inputs_are_valid_here_before_a_build_is_sent() {
    let e = env();
    let fake = Arc::new(FakeMachines::default());
    let s = scheduler(&e, 0, "ssh://fast x86_64-linux - 1 4", &fake);
    let dep = drv(&e, "dep", X86, "", &[]);
    let top = drv(&e, "top", X86, "", &[&dep]);
    let r = s
        .build(request(&[&top], s.settings(1), Arc::default()))
        .unwrap();
    assert!(r.success(), "{:?}", r.results);
    // (The fake machine asserts that every input is valid before it "builds".)
    assert_eq!(
        fake.builds(),
        [
            ("ssh://fast".to_string(), "dep".to_string()),
            ("ssh://fast".to_string(), "top".to_string())
        ]
    );
}

#[test]
fn this_machine_takes_part_with_its_own_slots() {
    let e = env();
    let fake = Arc::new(FakeMachines::default());
    fake.set("ssh://m", Behaviour::Hold);
    // One slot here, one there, equal speed: the first build goes here (a tie goes to the
    // machine with nothing to copy), the second there, not queued behind the first.
    let s = scheduler(&e, 1, "ssh://m x86_64-linux - 1 1", &fake);
    let a = drv(&e, "a", X86, "", &[]);
    let b = drv(&e, "b", X86, "", &[]);
    let t = s
        .submit(request(&[&a, &b], s.settings(1), Arc::default()))
        .unwrap();
    let start = std::time::Instant::now();
    while fake.running.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nothing sent to the machine"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    fake.release();
    assert!(t.wait().unwrap().success());
    assert_eq!(output(&e, &a), "built here");
    assert_eq!(output(&e, &b), "built on ssh://m");
}

#[test]
fn a_failed_machine_is_left_out_and_the_build_retried_elsewhere() {
    let e = env();
    let fake = Arc::new(FakeMachines::default());
    fake.set("ssh://dead", Behaviour::Dead);
    let s = scheduler(
        &e,
        0,
        "ssh://dead x86_64-linux - 1 10; ssh://good x86_64-linux - 1 1",
        &fake,
    );
    let a = drv(&e, "a", X86, "", &[]);
    let b = drv(&e, "b", X86, "", &[&a]);
    let msgs = Arc::new(Mutex::new(Vec::new()));
    let r = s
        .build(request(&[&b], s.settings(1), msgs.clone()))
        .unwrap();
    assert!(r.success(), "{:?}", r.results);
    assert_eq!(output(&e, &a), "built on ssh://good");
    // dead was tried once (for a), then left out (b went straight to good).
    assert_eq!(
        fake.builds(),
        [
            ("ssh://dead".to_string(), "a".to_string()),
            ("ssh://good".to_string(), "a".to_string()),
            ("ssh://good".to_string(), "b".to_string())
        ]
    );
    let msgs = msgs.lock().unwrap();
    assert!(
        msgs.iter().any(|m| m.contains("cannot build")
            && m.contains("'ssh://dead'")
            && m.contains("connection refused")),
        "{msgs:?}"
    );
}

#[test]
fn retries_on_other_machines_are_bounded() {
    let e = env();
    let fake = Arc::new(FakeMachines::default());
    for m in ["ssh://d1", "ssh://d2", "ssh://d3", "ssh://d4"] {
        fake.set(m, Behaviour::Dead);
    }
    let s = scheduler(&e, 0, "ssh://d1; ssh://d2; ssh://d3; ssh://d4", &fake);
    let a = drv(&e, "a", X86, "", &[]);
    let r = s
        .build(request(&[&a], s.settings(1), Arc::default()))
        .unwrap();
    assert!(!r.success());
    assert_eq!(
        fake.builds().len(),
        3,
        "three machines tried, then it fails"
    );
    let err = &r.results[0].1.error;
    assert!(err.contains("failed on 3 build machines"), "{err}");
    // Its output's lock is released, its file gone.
    let out = e
        .store
        .read_derivation(&a)
        .unwrap()
        .output_paths()
        .next()
        .unwrap()
        .1
        .clone();
    let lock = format!("{}.lock", e.store.real_path(&out).display());
    assert!(!std::path::Path::new(&lock).exists(), "{lock} left behind");
}

#[test]
fn a_remote_build_nobody_wants_is_cancelled() {
    let e = env();
    let fake = Arc::new(FakeMachines::default());
    fake.set("ssh://one", Behaviour::Hold);
    let s = scheduler(&e, 0, "ssh://one x86_64-linux - 1", &fake);
    let a = drv(&e, "a", X86, "", &[]);
    let t = s
        .submit(request(&[&a], s.settings(1), Arc::default()))
        .unwrap();
    let start = std::time::Instant::now();
    while fake.running.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.cancel(t.id);
    let r = t.wait().unwrap();
    assert!(!r.success());
    let start = std::time::Instant::now();
    while fake.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the machine's build was not told to stop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn checks_stay_local() {
    let e = env();
    let fake = Arc::new(FakeMachines::default());
    let s = scheduler(&e, 0, "ssh://one", &fake);
    let a = drv(&e, "a", X86, "", &[]);
    assert!(s
        .build(request(&[&a], s.settings(1), Arc::default()))
        .unwrap()
        .success());
    let mut req = request(&[&a], s.settings(1), Arc::default());
    req.mode = BuildMode::Check;
    let r = s.build(req).unwrap();
    // With no local slots a check cannot run; it is not sent to the machine.
    assert!(!r.success());
    assert_eq!(fake.builds().len(), 1);
}

#[test]
fn each_request_uses_the_machines_it_names() {
    let e = env();
    let fake = Arc::new(FakeMachines::default());
    let s = scheduler(&e, 1, "", &fake);
    let a = drv(&e, "a", X86, "", &[]);
    let b = drv(&e, "b", X86, "", &[]);
    let c = drv(&e, "c", X86, "", &[]);
    // A trusted client's own machines (four times as fast as here: preferred).
    let r = s
        .build(request(
            &[&a],
            settings_with(1, "ssh://mine - - 1 4"),
            Arc::default(),
        ))
        .unwrap();
    assert!(r.success(), "{:?}", r.results);
    assert_eq!(output(&e, &a), "built on ssh://mine");
    // None named (an untrusted client may clear them): here.
    let r = s
        .build(request(&[&b], settings_with(1, ""), Arc::default()))
        .unwrap();
    assert!(r.success(), "{:?}", r.results);
    assert_eq!(output(&e, &b), "built here");
    // A client that turned the build hook off (kiln's own remote client does, so that a
    // build does not travel on): here, whatever the machines.
    let mut st = (*settings_with(1, "ssh://mine - - 1 4")).clone();
    st.use_build_hook = false;
    let r = s
        .build(request(&[&c], Arc::new(st), Arc::default()))
        .unwrap();
    assert!(r.success(), "{:?}", r.results);
    assert_eq!(output(&e, &c), "built here");
    assert_eq!(fake.builds().len(), 1);
    // A malformed entry fails the build, naming the field.
    let d = drv(&e, "d", X86, "", &[]);
    let r = s
        .build(request(
            &[&d],
            settings_with(1, "ssh://x - - lots"),
            Arc::default(),
        ))
        .unwrap();
    assert!(!r.success());
    assert!(
        r.results[0].1.error.contains("field 4 (maximum jobs)"),
        "{:?}",
        r.results
    );
}

#[test]
fn with_nowhere_left_the_error_names_each_machine() {
    let e = env();
    let fake = Arc::new(FakeMachines::default());
    fake.set("ssh://dead", Behaviour::Dead);
    let s = scheduler(&e, 0, "ssh://dead", &fake);
    let a = drv(&e, "a", X86, "", &[]);
    let r = s
        .build(request(&[&a], s.settings(1), Arc::default()))
        .unwrap();
    assert!(!r.success());
    let err = &r.results[0].1.error;
    assert!(
        err.contains("No build machine can build it either: 'ssh://dead' failed this build"),
        "{err}"
    );
}
