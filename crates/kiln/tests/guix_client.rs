//! Guix 1.5's own client (`guix repl` with `(guix store)`, from Debian sid) against
//! `kiln daemon`: adds, queries, builds, reads path info and logs, deletes and collects,
//! as a Guix user's tools do. The client runs in the sid root (a chroot, so the test needs
//! root); the daemon runs here, its directory bind-mounted into the root at the same path.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_testkit::{fixture, nix_required, sid_root, BindMount, DaemonProcess};

fn sid_guix(test: &str) -> Option<PathBuf> {
    let root = sid_root();
    let root_user = rustix::process::geteuid().is_root();
    if root.join("usr/bin/guix").exists() && root_user {
        return Some(root);
    }
    if nix_required() {
        panic!("{test}: KILN_REQUIRE_NIX is set but there is no sid root with Guix 1.5, or this is not root");
    }
    eprintln!(
        "{test}: skipped, needs root and the sid root with Guix 1.5 (../shared/tools/sid-root.sh)"
    );
    None
}

/// The fixture `script` run by Guix 1.5's `guix repl` in the sid root against a `kiln
/// daemon` (given `args` before its own, the sandbox off) on a fresh store in a new
/// temporary directory named with `prefix`: the directory (the store is `store` in it) and
/// what the script printed. Fails if the script does.
fn against_kiln(
    root: &Path,
    prefix: &str,
    args: &[&str],
    script: &str,
) -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let d = dir.path();
    let store = d.join("store");
    let socket = d.join("socket");
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args)
        .arg("--store-dir")
        .arg(&store)
        .arg("--state-dir")
        .arg(d.join("state"))
        .arg("--log-dir")
        .arg(d.join("log"))
        .args(["--option", "sandbox", "false"])
        .arg("daemon")
        .arg("--socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let _daemon = DaemonProcess::start(c, socket.clone());
    let name = Path::new(script).file_name().unwrap();
    std::fs::copy(fixture(script), d.join(name)).unwrap();
    let _mount = BindMount::new(root, d);
    let out = Command::new("chroot")
        .arg(root)
        .arg("env")
        .arg(format!("NIX_STORE_DIR={}", store.display()))
        .arg(format!("GUIX_DAEMON_SOCKET={}", socket.display()))
        .arg("HOME=/tmp")
        .args(["guix", "repl", "--"])
        .arg(d.join(name))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "guix repl failed:\n{text}\n{err}");
    (dir, text)
}

#[test]
fn guix_1_5_client_adds_builds_queries_deletes_and_collects() {
    let Some(root) = sid_guix("guix_1_5_client_adds_builds_queries_deletes_and_collects") else {
        return;
    };
    let (dir, text) = against_kiln(&root, "kiln-guix-client-", &[], "guix/client.scm");
    let store = dir.path().join("store");
    let got: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once(' ')).collect();
    // The text's path is the one kiln computes for it (and guix-daemon: its name and
    // contents alone decide it).
    let want = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--store-dir")
        .arg(&store)
        .args(["store-path", "text", "--name", "hello.txt"])
        .arg(fixture("guix/hello.txt"))
        .output()
        .unwrap();
    let want = String::from_utf8(want.stdout).unwrap();
    assert_eq!(got["text"], want.trim(), "{text}");
    assert_eq!(got["valid"], "#t");
    assert_eq!(got["text-nar-size"], "128", "{text}");
    assert_eq!(got["text-refs"], "()");
    assert_eq!(got["built"], "#t");
    assert_eq!(got["out-valid"], "#t");
    assert_eq!(got["out-content"], "hi", "the builder's output");
    assert_eq!(got["deriver"], got["drv"]);
    assert_eq!(got["deleted"], format!("({})", got["text"]));
    assert_eq!(got["valid-after-delete"], "#f");
    // The collector took the build's output and derivation (nothing roots them).
    let n: usize = got["gc-deleted"].parse().unwrap();
    assert!(n >= 2, "{text}");
    assert!(!Path::new(got["out"]).exists());
    assert_eq!(got["failed-paths"], "()");
}

/// `--check` through Guix 1.5's client against `kiln daemon --layout guix` (a Guix store at
/// a path of its own, so guix-daemon's database): a build whose output differs each time
/// fails the request as guix-daemon's `registerOutputs` words it (status 1, naming the copy
/// kept at `<out>-check` with `keep-failed`), and the valid output stays as it was. (The
/// oracle test cannot compare this: guix-daemon, run there without its chroot, overwrites
/// the valid output in place and keeps no copy.)
#[test]
fn guix_1_5_check_finds_a_difference_as_guix_daemon_words_it() {
    let Some(root) = sid_guix("guix_1_5_check_finds_a_difference_as_guix_daemon_words_it") else {
        return;
    };
    let (_dir, text) = against_kiln(
        &root,
        "kiln-guix-check-",
        &[
            "--layout",
            "guix",
            "--option",
            "build-users-group",
            "",
            "--option",
            "substitute",
            "false",
        ],
        "guix/check.scm",
    );
    let got: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once(' ')).collect();
    let (drv, o) = (got["drv"], got["out"]);
    assert_eq!(
        got.get("check-error").copied(),
        Some(
            format!("derivation `{drv}' may not be deterministic: output `{o}' differs from `{o}-check'")
                .as_str()
        ),
        "{text}"
    );
    assert_eq!(got.get("check-status").copied(), Some("1"), "{text}");
    assert_eq!(got["kept-dash"], "#t", "{text}");
    assert_eq!(got["kept-dot"], "#f", "{text}");
    assert_eq!(got["valid"], "#t", "{text}");
    assert_eq!(got["untouched"], "#t", "{text}");
}
