//! kill -9 of `kiln daemon` at random points while Nix 2.8 clients work through it:
//! substituting from a `file://` cache, copying paths in (`nix copy --to` the daemon: one
//! `AddMultipleToStore` stream), and collecting garbage. After every kill, `kiln store
//! verify --check-contents` (which first checks whatever the daemon left unsynced) and Nix's
//! own `nix-store --verify --check-contents` must find nothing valid that is broken, rooted
//! paths must still be valid, and a restarted daemon must carry the clients' work to the end.
//! (Killing the daemon mid-build is in `daemon_load.rs`.)

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_testkit::{nix_or_skip, run_ok, DaemonProcess, NixEnv};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

struct Rig {
    env: NixEnv,
    socket: PathBuf,
    rng: u64,
}

impl Rig {
    fn new(seed: u64) -> Rig {
        let env = NixEnv::new();
        env.run("nix-store", &["--init"]);
        let socket = env.dir.path().join("daemon.sock");
        Rig {
            env,
            socket,
            rng: seed,
        }
    }

    fn daemon(&self) -> DaemonProcess {
        let _ = std::fs::remove_file(&self.socket);
        self.env.kiln_daemon(KILN, self.socket.clone())
    }

    /// A Nix command reaching the daemon.
    fn client(&self, program: &str) -> Command {
        let mut c = self.env.cmd(program);
        c.env("NIX_REMOTE", format!("unix://{}", self.socket.display()));
        c
    }

    /// A Nix command on the store directly (the daemon is dead).
    fn local(&self, program: &str) -> Command {
        self.env.cmd(program)
    }

    fn next(&mut self, lo: u64, hi: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        lo + self.rng % (hi - lo)
    }

    /// Starts a daemon, starts `client` against it, kills the daemon (and then the client)
    /// after `after_ms`. Returns whether the client had already finished, successfully.
    fn kill_during(&self, client: &mut Command, after_ms: u64) -> bool {
        let mut daemon = self.daemon();
        let mut c = client
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(after_ms));
        let _ = daemon.child.kill();
        let _ = daemon.child.wait();
        let finished = matches!(c.try_wait(), Ok(Some(st)) if st.success());
        let _ = c.kill();
        let _ = c.wait();
        finished
    }

    /// Both verdicts on the store the killed daemon left: kiln's (which checks the paths
    /// still marked as not yet durable first) and then Nix's. Returns what kiln said.
    fn verify(&self, after: &str) -> String {
        let out = Command::new(KILN)
            .args(self.env.kiln_args())
            .args(["store", "verify", "--check-contents"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{after}: kiln store verify: {said}");
        let out = self
            .local("nix-store")
            .args(["--verify", "--check-contents"])
            .output()
            .unwrap();
        let nix = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success() && !nix.contains("was modified") && !nix.contains("disappeared"),
            "{after}: nix-store --verify --check-contents: {nix}"
        );
        said
    }

    /// Whether every one of `paths` is valid (asked of the store directly).
    fn all_valid(&self, paths: &[String]) -> bool {
        self.local("nix-store")
            .arg("--check-validity")
            .args(paths)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }
}

/// `n` files of `size` random bytes each, named `f0`… in `dir`.
fn random_files(dir: &Path, n: usize, size: usize, seed: u64) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            let mut data = Vec::with_capacity(size);
            while data.len() < size {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.extend_from_slice(&x.to_le_bytes());
            }
            data.truncate(size);
            let f = dir.join(format!("f{i}"));
            std::fs::write(&f, data).unwrap();
            f
        })
        .collect()
}

/// Adds `files` through a fresh daemon; their store paths, in order.
fn add(rig: &Rig, files: &[PathBuf]) -> Vec<String> {
    let _daemon = rig.daemon();
    let paths: Vec<String> = run_ok(rig.client("nix-store").arg("--add").args(files))
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(paths.len(), files.len());
    paths
}

/// Each store path holds its source file's bytes.
fn assert_contents(paths: &[String], files: &[PathBuf]) {
    for (p, f) in paths.iter().zip(files) {
        assert!(
            std::fs::read(p).unwrap() == std::fs::read(f).unwrap(),
            "{p} does not hold {}",
            f.display()
        );
    }
}

/// 40 paths of 256 KiB in a `file://` cache (copied there through the daemon, then
/// deleted from the store): the cache's URL, the paths, their source files.
fn cached_paths(rig: &Rig) -> (String, Vec<String>, Vec<PathBuf>) {
    let files = random_files(&rig.env.dir.path().join("src"), 40, 256 << 10, 0x5eed);
    let paths = add(rig, &files);
    let cache = format!("file://{}", rig.env.dir.path().join("cache").display());
    let _daemon = rig.daemon();
    run_ok(
        rig.client("nix")
            .args(["copy", "--to", &cache])
            .args(&paths),
    );
    run_ok(rig.client("nix-store").arg("--delete").args(&paths));
    drop(_daemon);
    assert!(!paths.iter().any(|p| Path::new(p).exists()));
    (cache, paths, files)
}

/// Kill rounds of one workload, then one round left to finish: after every kill the store
/// verifies and what is valid holds its bytes; the round's paths are then deleted, so that
/// the next round has the whole work to do again. At the end every path is valid with its
/// source's bytes.
fn rounds(
    rig: &mut Rig,
    what: &str,
    kill_ms: (u64, u64),
    work: &dyn Fn(&Rig) -> Command,
    paths: &[String],
    files: &[PathBuf],
) {
    let mut recovered = 0;
    let mut interrupted = 0;
    for round in 0..8 {
        let after = rig.next(kill_ms.0, kill_ms.1);
        let finished = rig.kill_during(&mut work(rig), after);
        if rig
            .verify(&format!("{what}, round {round} (killed after {after} ms)"))
            .contains("was not closed cleanly")
        {
            recovered += 1;
        }
        if !finished {
            interrupted += 1;
        }
        // Whatever is valid holds its bytes; start the next round from nothing again, so
        // that every round has work to interrupt.
        for (p, f) in paths.iter().zip(files) {
            if rig.all_valid(std::slice::from_ref(p)) {
                assert!(
                    std::fs::read(p).unwrap() == std::fs::read(f).unwrap(),
                    "{what}: valid {p} lost its contents"
                );
            }
        }
        let _daemon = rig.daemon();
        run_ok(
            rig.client("nix-store")
                .arg("--delete")
                .args(paths.iter().filter(|p| Path::new(p).exists())),
        );
    }
    assert!(
        interrupted >= 1,
        "{what}: every round finished before its kill"
    );
    eprintln!(
        "{what}: {interrupted} of 8 rounds interrupted, {recovered} left marks that were checked"
    );
    // Uninterrupted, the work completes.
    let _daemon = rig.daemon();
    run_ok(&mut work(rig));
    drop(_daemon);
    assert!(
        rig.all_valid(paths),
        "{what}: not every path is valid after the last run"
    );
    assert_contents(paths, files);
    rig.verify(&format!("{what}, after the last run"));
}

#[test]
fn killing_the_daemon_while_it_substitutes() {
    if !nix_or_skip("killing_the_daemon_while_it_substitutes") {
        return;
    }
    let mut rig = Rig::new(0x1234_5678);
    let (cache, paths, files) = cached_paths(&rig);
    let work = |rig: &Rig| {
        let mut c = rig.client("nix-store");
        c.arg("--realise")
            .args(&paths)
            .args(["--option", "substituters", &cache])
            .args(["--option", "require-sigs", "false"]);
        c
    };
    rounds(&mut rig, "substitution", (5, 150), &work, &paths, &files);
}

#[test]
fn killing_the_daemon_while_a_client_copies_paths_in() {
    if !nix_or_skip("killing_the_daemon_while_a_client_copies_paths_in") {
        return;
    }
    let mut rig = Rig::new(0x8765_4321);
    let (cache, paths, files) = cached_paths(&rig);
    // The client reads the cache and streams the paths to the daemon: `nix copy` to a
    // daemon at protocol 1.32 and later sends them all in one `AddMultipleToStore`.
    let work = |rig: &Rig| {
        let mut c = rig.client("nix");
        c.args(["copy", "--no-check-sigs", "--from", &cache, "--to"])
            .arg(format!("unix://{}", rig.socket.display()))
            .args(&paths);
        c
    };
    rounds(
        &mut rig,
        "AddMultipleToStore",
        (20, 400),
        &work,
        &paths,
        &files,
    );
}

#[test]
fn killing_the_daemon_while_it_collects_garbage() {
    if !nix_or_skip("killing_the_daemon_while_it_collects_garbage") {
        return;
    }
    let mut rig = Rig::new(0x0bad_cafe);
    let d = rig.env.dir.path().to_path_buf();
    // 100 rooted paths (indirect roots, as `nix-build` makes them), kept throughout.
    let kept_files = random_files(&d.join("kept"), 100, 3000, 7);
    let kept = add(&rig, &kept_files);
    {
        let _daemon = rig.daemon();
        run_ok(
            rig.client("nix-store")
                .args(["--realise", "--indirect", "--add-root"])
                .arg(d.join("roots/r"))
                .args(&kept),
        );
    }
    let (mut garbage_total, mut interrupted) = (0, 0);
    for round in 0..8 {
        // Garbage for this round: 600 new paths.
        let files = random_files(&d.join(format!("g{round}")), 600, 500, 100 + round);
        garbage_total += add(&rig, &files).len();
        let after = rig.next(5, 250);
        let what = format!("collection, round {round} (killed after {after} ms)");
        if !rig.kill_during(rig.client("nix-store").arg("--gc"), after) {
            interrupted += 1;
        }
        rig.verify(&what);
        assert!(
            rig.all_valid(&kept),
            "{what}: a rooted path is no longer valid"
        );
        assert_contents(&kept, &kept_files);
    }
    assert!(
        interrupted >= 1,
        "every collection finished before its kill"
    );
    eprintln!("collection: {interrupted} of 8 rounds interrupted");
    // Uninterrupted, the collection ends with exactly the rooted paths valid.
    let daemon = rig.daemon();
    run_ok(rig.client("nix-store").arg("--gc"));
    drop(daemon);
    let mut valid: Vec<String> = String::from_utf8_lossy(
        &rig.local("nix-store")
            .args(["--query", "--requisites"])
            .args(&kept)
            .output()
            .unwrap()
            .stdout,
    )
    .lines()
    .map(str::to_string)
    .collect();
    valid.sort();
    let db = rusqlite::Connection::open(rig.env.state_dir().join("db/db.sqlite")).unwrap();
    let mut all: Vec<String> = db
        .prepare("select path from ValidPaths")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    all.sort();
    assert_eq!(
        all, valid,
        "after the last collection ({garbage_total} garbage paths made)"
    );
    assert_contents(&kept, &kept_files);
    rig.verify("collection, after the last run");
}
