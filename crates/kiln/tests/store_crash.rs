//! Crash safety: kill real `kiln` processes with SIGKILL at many points while they import,
//! add and collect garbage; after every kill the store must verify clean (no valid path with
//! missing or partial contents), and a garbage collection must leave only valid paths.
//! Also: eight processes adding, querying and collecting at once.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Store {
    dir: PathBuf,
}

impl Store {
    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--store-dir")
            .arg(self.dir.join("store"))
            .arg("--state-dir")
            .arg(self.dir.join("var"))
            .arg("--log-dir")
            .arg(self.dir.join("log"))
            .args(["--option", "gc-runtime-roots", "false"])
            .env_remove("KILN_CONFIG");
        c
    }
    fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd().args(args).output().unwrap()
    }
    /// Verifies, returning what the opening said (a recovery of durability marks says so).
    fn verify_clean(&self, when: &str) -> String {
        let out = self.run(&["store", "verify", "--check-contents"]);
        assert!(
            out.status.success(),
            "{when}: verify failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// An export stream of `n` paths (sizes up to ~200 KiB), made in the target store itself,
/// which is then emptied again by the garbage collector.
fn make_stream(target: &Store, n: usize) -> Vec<u8> {
    let scratch = tempfile::tempdir().unwrap();
    let mut paths: Vec<String> = Vec::new();
    for i in 0..n {
        let d = scratch.path().join(format!("item{i}"));
        std::fs::create_dir(&d).unwrap();
        std::fs::write(
            d.join("data"),
            vec![b'a' + (i % 26) as u8; (i * 2311) % 200_000],
        )
        .unwrap();
        std::fs::write(d.join("small"), format!("{i}")).unwrap();
        let out = target.run(&["store", "add", d.to_str().unwrap()]);
        assert!(out.status.success());
        paths.push(String::from_utf8(out.stdout).unwrap().trim().to_string());
    }
    let mut args = vec!["store", "export"];
    args.extend(paths.iter().map(String::as_str));
    let out = target.run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(target.run(&["store", "gc"]).status.success());
    assert!(entries(&target.dir.join("store")).is_empty());
    out.stdout
}

fn spawn_with_input(s: &Store, args: &[&str], input: Option<Vec<u8>>) -> Child {
    let mut c = s
        .cmd()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    if let Some(data) = input {
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    c
}

fn kill_after(mut c: Child, ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
    let _ = c.kill();
    let _ = c.wait();
}

/// Kills `c` as soon as `started()` holds (polled every millisecond, for at most 30 s), so
/// that the kill lands in the work whatever the machine's speed.
fn kill_when(mut c: Child, started: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !started() && std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && !n.ends_with(".lock"))
        .collect();
    v.sort();
    v
}

#[test]
fn sigkill_at_any_point_leaves_a_consistent_store() {
    let t = tempfile::tempdir().unwrap();
    let s = Store {
        dir: t.path().to_path_buf(),
    };
    let stream = make_stream(&s, 120);
    let mut rng = 0x1234_5678u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let store_prefix = format!("{}/", t.path().join("store").display());
    let valid_count = || {
        let out = s.run(&["store", "dump-db"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(&store_prefix))
            .count()
    };
    let mut partial = 0;
    let mut recovered = 0;
    for round in 0..24 {
        let delay = 5 + next() % 120;
        let importing = round % 3 != 2;
        let before = valid_count();
        if importing && round % 3 == 1 {
            // Every third round kills an import once its first new path is in the store
            // (a random delay alone can miss the work on a slower or busier machine).
            let store = t.path().join("store");
            let had = entries(&store).len();
            kill_when(
                spawn_with_input(&s, &["store", "import"], Some(stream.clone())),
                || entries(&store).len() > had,
            );
        } else if importing {
            kill_after(
                spawn_with_input(&s, &["store", "import"], Some(stream.clone())),
                delay,
            );
        } else {
            kill_after(spawn_with_input(&s, &["store", "gc"], None), delay);
        }
        // The killed process's durability marks, left behind, are checked as the store
        // is next opened (the contents are in the page cache: nothing is lost).
        let said = s.verify_clean(&format!("after kill {round} at {delay} ms"));
        if said.contains("was not closed cleanly") {
            recovered += 1;
        }
        let after = valid_count();
        if (importing && after > before && after < 120)
            || (!importing && after < before && after > 0)
        {
            partial += 1;
        }
    }
    // The kills must land in the middle of the work, not only before or after it.
    assert!(
        partial >= 3,
        "only {partial} of 24 kills interrupted an operation half-way"
    );
    assert!(
        recovered >= 1,
        "no kill left durability marks for the next opening to check"
    );
    // Finishing the import afterwards works, and a GC leaves nothing but valid paths.
    let mut c = s
        .cmd()
        .args(["store", "import"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(&stream).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 120);
    s.verify_clean("after the full import");
    let out = s.run(&["store", "gc"]);
    assert!(out.status.success());
    assert!(
        entries(&t.path().join("store")).is_empty(),
        "leftovers: {:?}",
        entries(&t.path().join("store"))
    );
}

#[test]
fn eight_processes_add_query_and_collect_at_once() {
    let t = tempfile::tempdir().unwrap();
    let s = Store {
        dir: t.path().to_path_buf(),
    };
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..40 {
        std::fs::write(
            src.join(format!("f{i}")),
            format!("file {i}\n").repeat(i * 50 + 1),
        )
        .unwrap();
    }
    // A rooted baseline the queriers can always ask about.
    let out = s.run(&["store", "add", src.join("f0").to_str().unwrap()]);
    let base = String::from_utf8(out.stdout).unwrap().trim().to_string();
    s.run(&[
        "store",
        "add-root",
        "--link",
        t.path().join("var/gcroots/base").to_str().unwrap(),
        &base,
    ]);
    let script = |role: usize| -> Vec<Vec<String>> {
        let mut cmds = Vec::new();
        for i in 0..25 {
            let f = src
                .join(format!("f{}", (i * 7 + role) % 40))
                .to_string_lossy()
                .into_owned();
            cmds.push(match role {
                0..=2 => vec!["store".into(), "add".into(), f],
                3 => vec!["store".into(), "add-fixed".into(), "sha1".into(), f],
                4 | 5 => vec![
                    "store".into(),
                    "path-info".into(),
                    "--json".into(),
                    base.clone(),
                ],
                6 => vec!["store".into(), "query".into(), "-R".into(), base.clone()],
                _ => vec!["store".into(), "gc".into()],
            });
        }
        cmds
    };
    let mut workers = Vec::new();
    for role in 0..8 {
        let cmds = script(role);
        let dir = s.dir.clone();
        workers.push(std::thread::spawn(move || {
            let s = Store { dir };
            let mut failures = Vec::new();
            for c in cmds {
                let args: Vec<&str> = c.iter().map(String::as_str).collect();
                let out = s.run(&args);
                if !out.status.success() {
                    failures.push(format!(
                        "{args:?}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            failures
        }));
    }
    let failures: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "commands failed under concurrency:\n{}",
        failures.join("\n")
    );
    s.verify_clean("after concurrent use");
    assert!(s.run(&["store", "path-info", &base]).status.success());
}
