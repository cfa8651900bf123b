//! An ordinary user's `kiln` commands against a root `kiln daemon`: the user cannot write
//! the store's database, so `kiln build`, `kiln log` and `kiln store
//! add|path-info|query|verify|gc` go through the daemon's socket, and print what root's
//! commands print on the store directly.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_testkit::DaemonProcess;

/// nobody/nogroup.
const USER: u32 = 65534;

struct Env {
    _dir: tempfile::TempDir,
    base: PathBuf,
}

impl Env {
    fn kiln(&self, as_user: bool) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--store-dir")
            .arg(self.base.join("store"))
            .arg("--state-dir")
            .arg(self.base.join("state"))
            .arg("--log-dir")
            .arg(self.base.join("log"))
            .env_remove("KILN_CONFIG")
            .env_remove("KILN_STORE")
            .env("HOME", self.base.join("work"))
            .current_dir(self.base.join("work"));
        if as_user {
            c.uid(USER).gid(USER);
        }
        c
    }
    fn run(&self, as_user: bool, args: &[&str]) -> Output {
        self.kiln(as_user).args(args).output().unwrap()
    }
    fn ok(&self, as_user: bool, args: &[&str]) -> String {
        let o = self.run(as_user, args);
        assert!(
            o.status.success(),
            "{args:?} (as {}): {}",
            if as_user { "nobody" } else { "root" },
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn an_ordinary_user_builds_and_queries_through_a_root_daemon() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("an_ordinary_user_builds_and_queries_through_a_root_daemon: skipped, needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    let work = base.join("work");
    std::fs::create_dir(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(USER), Some(USER)).unwrap();
    let env = Env { _dir: dir, base };
    std::fs::write(
        work.join("r.toml"),
        "default = \"top\"\n\
         [derivations.dep]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo dep > $out\"]\n\
         [derivations.top]\nbuilder = \"/bin/sh\"\nenv = { PATH = \"/bin:/usr/bin\" }\nargs = [\"-c\", \"echo building top; cat ${dep} ${./src.txt} > $out\"]\n",
    )
    .unwrap();
    std::fs::write(work.join("src.txt"), "source\n").unwrap();
    // Root's store, created by root's daemon.
    let socket = env.base.join("state/daemon-socket/socket");
    let mut c = env.kiln(false);
    c.args(["--option", "sandbox", "false"])
        .args(["--option", "build-users-group", ""])
        .arg("daemon")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let _daemon = DaemonProcess::start(c, socket);
    for d in ["store", "state", "log"] {
        let p = env.base.join(d);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The user cannot open the store itself.
    let o = env.run(
        true,
        &["--store", "local", "store", "path-info", "/nowhere"],
    );
    assert!(!o.status.success());
    // A build: one path printed, `result` left and registered with the daemon.
    let built = env.ok(true, &["build", "r.toml"]);
    let top = built.trim();
    assert!(top.ends_with("-top"), "{built}");
    assert_eq!(
        std::fs::read_link(work.join("result")).unwrap(),
        Path::new(top)
    );
    assert_eq!(
        std::fs::read_to_string(work.join("result")).unwrap(),
        "dep\nsource\n"
    );
    let auto: Vec<PathBuf> = std::fs::read_dir(env.base.join("state/gcroots/auto"))
        .unwrap()
        .map(|e| std::fs::read_link(e.unwrap().path()).unwrap())
        .collect();
    assert!(auto.contains(&work.join("result")), "{auto:?}");
    // The same answers as root's own commands on the store.
    for args in [
        vec!["store", "path-info", "--json", "-S", "-r", top],
        vec!["store", "path-info", top],
        vec!["store", "query", "-R", top],
        vec!["store", "query", "--references", top],
        vec!["store", "query", "--deriver", top],
        vec!["store", "query", "--hash", top],
        vec!["store", "query", "--roots", top],
        vec!["log", top],
    ] {
        let mine = env.ok(true, &args);
        let roots = env.ok(false, &args);
        assert_eq!(mine, roots, "{args:?}");
    }
    assert!(env.ok(true, &["log", top]).contains("building top"));
    // An added file gets the path root's `add` gives it.
    let added = env.ok(true, &["store", "add", "src.txt"]);
    assert_eq!(added, env.ok(false, &["store", "add", "src.txt"]));
    // --json through the daemon: the same event stream, the builder's words included
    // (a character cut between chunks is not mangled).
    std::fs::write(
        work.join("fresh.toml"),
        "[derivations.fresh]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo 'héllo from fresh'; echo x > $out\"]\n",
    )
    .unwrap();
    let o = env.run(true, &["build", "--json", "--no-out-link", "fresh.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for k in [
        "build-queued",
        "phase",
        "build-started",
        "log",
        "build-finished",
        "result",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    assert!(events
        .iter()
        .any(|e| e["event"] == "log" && e["text"] == "héllo from fresh\n"));
    assert_eq!(events.last().unwrap()["exit"], 0);
    // Verify and collect: the result link keeps top and its closure.
    env.ok(true, &["store", "verify", "--check-contents"]);
    let gc = env.run(true, &["store", "gc"]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert!(String::from_utf8_lossy(&gc.stdout).contains("store paths deleted"));
    assert!(Path::new(top).exists());
    // A failing build exits as Nix's do and names the derivation.
    std::fs::write(
        work.join("bad.toml"),
        "[derivations.bad]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo oops; exit 1\"]\n",
    )
    .unwrap();
    let o = env.run(true, &["build", "bad.toml"]);
    assert_eq!(o.status.code(), Some(100), "{}", stderr(&o));
    assert!(stderr(&o).contains("-bad.drv' failed"), "{}", stderr(&o));
    // What needs the database itself says so.
    let o = env.run(true, &["store", "optimise"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("needs write access to the store"),
        "{}",
        stderr(&o)
    );
}
