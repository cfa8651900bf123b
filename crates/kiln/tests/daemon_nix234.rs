//! Today's Nix client (2.34.8, Debian sid) against `kiln daemon`, compared with the same
//! commands against nix-daemon 2.34.8 on an identical fresh store at the same path
//! (`tests/fixtures/daemon/scenario-2.34.sh`): builds, failures with `--keep-going`,
//! queries, logs, verification, a binary cache both ways, deletion and collection.
//! Outputs, error lines and exit statuses must agree.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use kiln_testkit::{fixture, scenario_steps, DaemonProcess, NixEnv, SidNix};

/// `cmd` with the environment's store, state, log and configuration directories.
fn with_env(mut c: Command, env: &NixEnv) -> Command {
    c.env("NIX_STORE_DIR", env.store_dir())
        .env("NIX_STATE_DIR", env.state_dir())
        .env("NIX_LOG_DIR", env.log_dir())
        .env("NIX_CONF_DIR", env.dir.path().join("conf"))
        .env("HOME", env.dir.path())
        .env("XDG_CACHE_HOME", env.dir.path().join("cache-home"))
        .env_remove("NIX_PATH")
        .env_remove("NIX_CONFIG");
    c
}

fn nix_daemon(sid: &SidNix, env: &NixEnv) -> DaemonProcess {
    let socket = env.dir.path().join("daemon.sock");
    let mut c = with_env(sid.cmd("nix-daemon"), env);
    c.env("NIX_REMOTE", "local")
        .env("NIX_DAEMON_SOCKET_PATH", &socket)
        // Run through the sid root's loader, Nix cannot start itself again as its build
        // hook (`/proc/self/exe` is the loader); with no remote builders it needs none.
        .env("NIX_CONFIG", "build-hook =")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    DaemonProcess::start(c, socket)
}

fn kiln_daemon(env: &NixEnv) -> DaemonProcess {
    env.kiln_daemon(
        env!("CARGO_BIN_EXE_kiln"),
        env.dir.path().join("daemon.sock"),
    )
}

fn run_scenario(sid: &SidNix, env: &NixEnv, d: &DaemonProcess, work: &Path) -> String {
    std::fs::create_dir_all(work).unwrap();
    let path = format!(
        "{}:{}",
        sid.bin_dir(env.dir.path()).display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = with_env(Command::new("bash"), env);
    let out = c
        .arg(fixture("daemon/scenario-2.34.sh"))
        .env("PATH", path)
        .env("NIX_REMOTE", format!("unix://{}", d.socket.display()))
        .env("FIXTURES", fixture(""))
        .current_dir(work)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nix_2_34_clients_see_the_same_daemon() {
    let Some(sid) = SidNix::or_skip("nix_2_34_clients_see_the_same_daemon") else {
        return;
    };
    // One directory used twice: store paths depend on the store directory's name.
    let base = std::env::temp_dir().join(format!("kiln-daemon-234-{}", std::process::id()));
    let nix_out = {
        let env = NixEnv::at(&base);
        let d = nix_daemon(&sid, &env);
        run_scenario(&sid, &env, &d, &base.join("work"))
    };
    let kiln_out = {
        let env = NixEnv::at(&base);
        let d = kiln_daemon(&env);
        let out = run_scenario(&sid, &env, &d, &base.join("work"));
        drop(d);
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(&base)
            .status();
        let _ = std::fs::remove_dir_all(&base);
        out
    };
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert!(n.len() >= 25, "the scenario did not run: {nix_out}");
    assert!(
        n.iter()
            .any(|(h, b)| h.contains("store info") && b.contains("Trusted: 1")),
        "{nix_out}"
    );
    let mut diffs = Vec::new();
    // The one known difference: nix-daemon leaves the lock files and the unregistered
    // outputs of failed builds in the store for the next collection to find; kiln removes
    // them when the build fails. So the first collection finds that many paths fewer.
    let mut leftovers: Option<usize> = None;
    for ((hn, bn), (hk, bk)) in n.iter().zip(k.iter()) {
        assert_eq!(hn, hk);
        let mut bn = bn.clone();
        if hn.contains("--print-dead") && leftovers.is_none() {
            let kiln_dead: Vec<&str> = bk.lines().collect();
            let (extra, kept): (Vec<&str>, Vec<&str>) =
                bn.lines().partition(|l| !kiln_dead.contains(l));
            for e in &extra {
                assert!(
                    e.ends_with(".lock") || e.ends_with("-failing") || e.ends_with("-bad-hash"),
                    "nix-daemon found a dead path kiln did not: {e}"
                );
            }
            leftovers = Some(extra.len());
            bn = kept.iter().map(|l| format!("{l}\n")).collect();
        }
        if hn == "nix-collect-garbage" {
            if let Some(n) = leftovers.filter(|&n| n > 0) {
                let (count, rest) = bn.split_once(' ').unwrap();
                let count: usize = count.parse().unwrap();
                bn = format!("{} {rest}", count - n);
                leftovers = Some(0);
            }
        }
        let (bn, bk) = (&bn, bk);
        if bn != bk {
            diffs.push(format!("--- {hn}\nnix-daemon 2.34:\n{bn}kiln:\n{bk}"));
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
