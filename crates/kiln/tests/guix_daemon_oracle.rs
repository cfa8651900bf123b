//! guix-daemon 1.5 (Debian sid) as the oracle for what a Guix client sees: the same Guix
//! 1.5 client script (`tests/fixtures/guix/oracle.scm`) runs against guix-daemon and
//! against `kiln daemon --layout guix`, each on a fresh store at the same path, and every
//! line of their answers must agree. Both daemons and the client run with the sid root's
//! programs: guix-daemon in the root (a chroot: it builds without its own chroot there),
//! kiln here with its directory bind-mounted into the root at the same path.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_testkit::{fixture, nix_required, sid_root, BindMount, DaemonProcess};

fn sid_guix(test: &str) -> Option<PathBuf> {
    let root = sid_root();
    if root.join("usr/bin/guix-daemon").exists() && rustix::process::geteuid().is_root() {
        return Some(root);
    }
    assert!(
        !nix_required(),
        "{test}: KILN_REQUIRE_NIX is set but there is no sid root with Guix 1.5, or this is not root"
    );
    eprintln!("{test}: skipped, needs root and the sid root with Guix 1.5");
    None
}

/// Runs the script against the daemon listening on `socket`, returning its lines.
fn ask(root: &Path, d: &Path, socket: &Path) -> String {
    let out = Command::new("chroot")
        .arg(root)
        .arg("env")
        .arg(format!("NIX_STORE_DIR={}", d.join("store").display()))
        .arg(format!("GUIX_DAEMON_SOCKET={}", socket.display()))
        .arg("HOME=/tmp")
        .args(["guix", "repl", "--"])
        .arg(d.join("oracle.scm"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "guix repl failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    normalize(&text)
}

/// What differs by nature between two daemons' traces: a build's pid, and where its log
/// directory is (guix-daemon 1.5 keeps its own, with a doubled slash); the log's file name,
/// compression included, is kept.
fn normalize(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("trace @ build-started ") {
            Some(rest) => {
                let f: Vec<&str> = rest.split(' ').collect();
                let field = |i: usize| f.get(i).copied().unwrap_or("?");
                let log = field(3).rsplit('/').next().unwrap_or("?");
                format!(
                    "trace @ build-started {} {} {} LOG/{log} PID",
                    field(0),
                    field(1),
                    field(2)
                )
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A fresh directory at `base` with an empty store and the script.
fn fresh(base: &Path) {
    if base.exists() {
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(base)
            .status();
        std::fs::remove_dir_all(base).unwrap();
    }
    std::fs::create_dir_all(base.join("store")).unwrap();
    std::fs::copy(fixture("guix/oracle.scm"), base.join("oracle.scm")).unwrap();
}

#[test]
fn guix_clients_see_what_guix_daemon_1_5_would_say() {
    let test = "guix_clients_see_what_guix_daemon_1_5_would_say";
    let Some(root) = sid_guix(test) else {
        return;
    };
    let base = std::env::temp_dir().join(format!("kiln-guix-oracle-{}", std::process::id()));
    fresh(&base);
    let guix = {
        let _mount = BindMount::new(&root, &base);
        let socket = base.join("socket");
        let mut c = Command::new("chroot");
        c.arg(&root)
            .arg("env")
            .arg(format!("NIX_STORE_DIR={}", base.join("store").display()))
            .arg(format!("NIX_STATE_DIR={}", base.join("state").display()))
            .arg(format!("NIX_LOG_DIR={}", base.join("log").display()))
            .args(["guix-daemon", "--disable-chroot", "--build-users-group="])
            .arg(format!("--listen={}", socket.display()))
            // No substitutes: nothing here can reach a cache.
            .arg("--no-substitutes")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let daemon = DaemonProcess::start(c, socket.clone());
        let text = ask(&root, &base, &socket);
        drop(daemon);
        text
    };
    fresh(&base);
    let kiln = {
        let socket = base.join("socket");
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(["--layout", "guix", "--store-dir"])
            .arg(base.join("store"))
            .arg("--state-dir")
            .arg(base.join("state"))
            .arg("--log-dir")
            .arg(base.join("log"))
            .args(["--option", "sandbox", "false"])
            .args(["--option", "build-users-group", ""])
            .args(["--option", "substitute", "false"])
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let daemon = DaemonProcess::start(c, socket.clone());
        let _mount = BindMount::new(&root, &base);
        let text = ask(&root, &base, &socket);
        drop(daemon);
        text
    };
    let _ = std::fs::remove_dir_all(&base);
    assert!(guix.contains("outside-error"), "{guix}");
    assert!(guix.contains("trace @ build-failed "), "{guix}");
    assert!(guix.contains("trace @ build-succeeded "), "{guix}");
    assert_eq!(kiln, guix, "kiln:\n{kiln}\nguix-daemon 1.5:\n{guix}");
}
