//! Real Nix 2.8 clients against `kiln daemon`, compared with the same commands against
//! Nix 2.8's own daemon on an identical fresh store at the same path
//! (`tests/fixtures/daemon/scenario.sh`): builds, queries, adds, export/import, a binary
//! cache copy, garbage collection. Outputs and exit statuses must agree.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use kiln_testkit::{fixture, nix_or_skip, scenario_steps, DaemonProcess, NixEnv};

fn nix_daemon(env: &NixEnv) -> DaemonProcess {
    let socket = env.dir.path().join("nix-daemon.sock");
    let mut c = env.cmd("nix-daemon");
    c.env("NIX_DAEMON_SOCKET_PATH", &socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    DaemonProcess::start_then_connect(c, socket)
}

fn kiln_daemon(env: &NixEnv) -> DaemonProcess {
    env.kiln_daemon(
        env!("CARGO_BIN_EXE_kiln"),
        env.dir.path().join("kiln-daemon.sock"),
    )
}

fn run_scenario(env: &NixEnv, d: &DaemonProcess, work: &Path) -> String {
    std::fs::create_dir_all(work).unwrap();
    let out = env
        .cmd("bash")
        .arg(fixture("daemon/scenario.sh"))
        .env("NIX_REMOTE", format!("unix://{}", d.socket.display()))
        .env("FIXTURES", fixture(""))
        .current_dir(work)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fresh(path: &Path) -> NixEnv {
    let env = NixEnv::at(path);
    // Initialise the store as `nix-store --init` does, so both daemons start from the
    // same empty database.
    env.run("nix-store", &["--init"]);
    env
}

#[test]
fn nix_clients_see_the_same_daemon() {
    if !nix_or_skip("nix_clients_see_the_same_daemon") {
        return;
    }
    // One directory used twice: store paths depend on the store directory's name.
    let base = std::env::temp_dir().join(format!("kiln-daemon-e2e-{}", std::process::id()));
    let nix_out = {
        let env = fresh(&base);
        let d = nix_daemon(&env);
        run_scenario(&env, &d, &base.join("work"))
    };
    let kiln_out = {
        let env = fresh(&base);
        let d = kiln_daemon(&env);
        let out = run_scenario(&env, &d, &base.join("work"));
        drop(d);
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(&base)
            .status();
        out
    };
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert!(n.len() > 40, "the scenario did not run: {nix_out}");
    let mut diffs = Vec::new();
    let mut first_gc = true;
    for ((hn, bn), (hk, bk)) in n.iter().zip(k.iter()) {
        assert_eq!(hn, hk);
        let mut bn = bn.clone();
        // The one known difference: Nix 2.8 leaves the lock files of failed builds in the
        // store for the next collection to find; kiln removes them when the build fails.
        // So the first collection after the failures finds two paths fewer. (Both keep the
        // output of the fixed-output build with the wrong hash, valid under its real hash.)
        if hn.contains("--print-dead") && first_gc {
            bn = bn
                .lines()
                .filter(|l| !l.ends_with(".lock"))
                .map(|l| format!("{l}\n"))
                .collect();
        }
        if hn == "nix-store --gc" && first_gc {
            first_gc = false;
            bn = bn.replacen("9 store paths deleted", "7 store paths deleted", 1);
        }
        let (bn, bk) = (&bn, bk);
        if bn != bk {
            diffs.push(format!("--- {hn}\nNix 2.8:\n{bn}kiln:\n{bk}"));
        }
    }
    assert_eq!(n.len(), k.len(), "different number of steps");
    assert!(
        diffs.is_empty(),
        "{} steps differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
