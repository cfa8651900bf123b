//! Load on one `kiln daemon`: 64 clients querying while 8 `nix-build`s of overlapping DAGs
//! run at once. No client sees an error, every shared derivation is built exactly once,
//! and the store verifies clean afterwards.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::{Client, Reply, Request};
use kiln_testkit::{nix_or_skip, run_ok, NixEnv};

/// 6 layers of 8 derivations; each depends on two of the layer below. Builders append
/// their name to `counter` (sandbox off), so double builds show.
fn dag(counter: &std::path::Path) -> String {
    salted_dag(counter, "")
}

/// [`dag`] with `salt` in every derivation, so that each salt gives 48 new paths.
fn salted_dag(counter: &std::path::Path, salt: &str) -> String {
    let mut s = format!(
        "let sys = builtins.currentSystem;\nmk = name: deps: derivation {{ inherit name; system = sys; builder = \"/bin/sh\"; PATH = \"/bin:/usr/bin\"; salt = \"{salt}\";\n",
    );
    s.push_str(&format!(
        "  args = [ \"-c\" (\"echo ${{name}} >> {} ; sleep 0.0$RANDOM; echo \" + builtins.concatStringsSep \" \" (map toString deps) + \" > $out\") ]; }};\nin rec {{\n",
        counter.display()
    ));
    for l in 0..6 {
        for i in 0..8 {
            let deps = if l == 0 {
                String::new()
            } else {
                format!("n{}x{} n{}x{}", l - 1, i, l - 1, (i + 3) % 8)
            };
            s.push_str(&format!("n{l}x{i} = mk \"n{l}x{i}\" [ {deps} ];\n"));
        }
    }
    s.push_str("}\n");
    s
}

/// A fresh, initialised Nix store served by a kiln daemon with `global` arguments
/// (`--option NAME VALUE`…) and `daemon` arguments: (environment, daemon, its socket).
fn served(
    global: &[&str],
    daemon: &[&str],
) -> (NixEnv, kiln_testkit::DaemonProcess, std::path::PathBuf) {
    let env = NixEnv::new();
    env.run("nix-store", &["--init"]);
    let socket = env.dir.path().join("socket");
    let d = env.kiln_daemon_with(env!("CARGO_BIN_EXE_kiln"), socket.clone(), global, daemon);
    (env, d, socket)
}

/// A fresh Nix store served by a kiln daemon with 4 build slots, and the DAG (`dag`) in a
/// file: (environment, daemon, socket, the DAG's file, the builders' counter file).
fn dag_daemon() -> (
    NixEnv,
    kiln_testkit::DaemonProcess,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let (env, daemon, socket) = served(&["--option", "max-jobs", "4"], &[]);
    let counter = env.dir.path().join("built");
    let file = env.dir.path().join("dag.nix");
    std::fs::write(&file, dag(&counter)).unwrap();
    (env, daemon, socket, file, counter)
}

#[test]
fn many_clients_and_overlapping_builds() {
    if !nix_or_skip("many_clients_and_overlapping_builds") {
        return;
    }
    let (env, daemon, socket, file, counter) = dag_daemon();
    let sd = kiln_format::StoreDir::new(env.store_dir().to_string_lossy().into_owned()).unwrap();

    // 64 query clients, hammering until the builds end.
    let stop = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..64)
        .map(|i| {
            let (stop, queries, socket, sd) =
                (stop.clone(), queries.clone(), socket.clone(), sd.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket, sd.clone()).unwrap();
                let p = kiln_format::StorePath::from_base_name(&format!("{i:032}-q")).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match c.request(&Request::QueryPathInfo(p.clone()), None, &mut |_| {}) {
                        Ok(Reply::PathInfo(None)) => {}
                        r => panic!("client {i}: {r:?}"),
                    }
                    match c.request(&Request::QueryAllValidPaths, None, &mut |_| {}) {
                        Ok(Reply::Paths(_)) => {}
                        r => panic!("client {i}: {r:?}"),
                    }
                    queries.fetch_add(2, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // 8 builds of overlapping tops (each top pulls in most of the lower layers).
    let builds: Vec<_> = (0..8)
        .map(|i| {
            env.cmd("nix-build")
                .arg(&file)
                .args(["-A", &format!("n5x{i}"), "--no-out-link"])
                .env("NIX_REMOTE", format!("unix://{}", socket.display()))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for b in builds {
        let out = b.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nix-build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(queries.load(Ordering::Relaxed) > 64);
    drop(daemon);

    // Every derivation once: 48 names, no repeats.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for l in std::fs::read_to_string(&counter).unwrap().lines() {
        *seen.entry(l.to_string()).or_default() += 1;
    }
    assert_eq!(seen.len(), 48, "{seen:?}");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "built more than once: {twice:?}");

    let v = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--store-dir")
        .arg(env.store_dir())
        .arg("--state-dir")
        .arg(env.state_dir())
        .args(["store", "verify", "--check-contents"])
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

/// kill -9 of the daemon at random points while it builds a DAG for a Nix client (the
/// client adding `.drv` files, builds registering outputs): after every kill the store
/// verifies clean once the durability marks the daemon left are checked, a restarted daemon
/// serves, and the client's next run completes. Every round builds a new DAG (a salt per
/// round), so every round has registrations to interrupt; every other round the kill comes
/// the moment the database holds durability marks, so the recovery is exercised whatever the
/// machine's speed (a random kill alone missed them on a slower machine).
#[test]
fn killing_the_daemon_mid_build_leaves_a_store_that_verifies_and_serves() {
    let test = "killing_the_daemon_mid_build_leaves_a_store_that_verifies_and_serves";
    if !nix_or_skip(test) {
        return;
    }
    let env = NixEnv::new();
    let d = env.dir.path();
    let counter = d.join("built");
    let expr = d.join("dag.nix");
    let socket = d.join("daemon.sock");
    let db = env.state_dir().join("db/db.sqlite");
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let verify = || {
        let out = Command::new(kiln)
            .args(env.kiln_args())
            .args(["store", "verify", "--check-contents"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "verify failed after a kill: {err}");
        err
    };
    // Whether the daemon's database holds durability marks now (read-only, beside it).
    let marks_pending = || {
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| {
                c.query_row("select count(*) from KilnUnsynced", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .is_ok_and(|n| n > 0)
    };
    let mut rng = 0x9e37_79b9u64;
    let (mut recovered, mut at_marks) = (0, 0);
    for round in 0..8 {
        std::fs::write(&expr, salted_dag(&counter, &format!("round {round}"))).unwrap();
        let _ = std::fs::remove_file(&socket);
        let mut daemon = env.kiln_daemon(kiln, socket.clone());
        let mut client = env
            .cmd("nix-build")
            .arg(&expr)
            .arg("--no-out-link")
            .env("NIX_REMOTE", format!("unix://{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if round % 2 == 0 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            std::thread::sleep(Duration::from_millis(30 + rng % 400));
        } else {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !marks_pending() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: no durability mark seen in 60 s"
                );
                assert!(
                    client.try_wait().unwrap().is_none(),
                    "round {round}: the client ended before the daemon registered anything"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            at_marks += 1;
        }
        let _ = daemon.child.kill();
        let _ = daemon.child.wait();
        let _ = client.kill();
        let _ = client.wait();
        if verify().contains("was not closed cleanly") {
            recovered += 1;
        }
    }
    // Kills that found marks pending left them, and verify checked them. (A mark seen can
    // still be cleared by the daemon's syncer in the instant before the kill lands, so
    // this asks for one of the four, not all.)
    assert_eq!(at_marks, 4);
    assert!(recovered >= 1, "no kill left durability marks to check");
    // A last, uninterrupted run completes.
    let _ = std::fs::remove_file(&socket);
    let daemon = env.kiln_daemon(kiln, socket.clone());
    let out = env
        .cmd("nix-build")
        .arg(&expr)
        .arg("--no-out-link")
        .env("NIX_REMOTE", format!("unix://{}", socket.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 48);
    drop(daemon);
    verify();
}

/// Users' most reported daemon failure: clients dropped because SQLite was busy. 64 Nix
/// clients add paths through the daemon at once while another process takes the database's
/// write lock again and again (holding it a second each time) and a `kiln store gc` runs
/// beside them: every client's every add succeeds, and every path is valid after.
#[test]
fn sixty_four_writers_while_another_process_holds_the_database() {
    if !nix_or_skip("sixty_four_writers_while_another_process_holds_the_database") {
        return;
    }
    let (env, daemon, socket) = served(&[], &[]);
    let db = env.state_dir().join("db/db.sqlite");
    // The other process: the write lock, a second at a time, eight times.
    let mut locker = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys, time\n\
             c = sqlite3.connect(sys.argv[1], timeout=120, isolation_level=None)\n\
             for _ in range(8):\n\
             \x20   c.execute('begin immediate')\n\
             \x20   time.sleep(1.0)\n\
             \x20   c.execute('commit')\n\
             \x20   time.sleep(0.2)\n",
        )
        .arg(&db)
        .spawn()
        .unwrap();
    let files = env.dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let mut c = env.cmd("sh");
            let script = format!(
                "set -e; for j in 1 2 3; do echo \"client {i} file $j\" > {dir}/f{i}-$j; nix-store --add {dir}/f{i}-$j; done",
                dir = files.display()
            );
            c.arg("-c")
                .arg(script)
                .env("NIX_REMOTE", format!("unix://{}", socket.display()))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let gc = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(env.kiln_args())
        .args(["store", "gc", "--dry-run"])
        .output()
        .unwrap();
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let mut added = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "client {i} was dropped: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        added.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>(),
        );
    }
    assert!(locker.wait().unwrap().success());
    assert_eq!(added.len(), 64 * 3);
    drop(daemon);
    for p in &added {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(env.kiln_args())
            .args(["store", "path-info", p])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{p}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Beyond `max-connections`, a client waits for a slot instead of failing: with 2 slots
/// held by idle clients, a Nix client's add waits, and completes once one of them leaves.
#[test]
fn clients_beyond_max_connections_wait_for_a_slot() {
    if !nix_or_skip("clients_beyond_max_connections_wait_for_a_slot") {
        return;
    }
    let (env, _daemon, socket) = served(&[], &["--max-connections", "2"]);
    let sd = kiln_format::StoreDir::new(env.store_dir().to_string_lossy().into_owned()).unwrap();
    let first = Client::connect(&socket, sd.clone()).unwrap();
    let _second = Client::connect(&socket, sd).unwrap();
    let file = env.dir.path().join("f");
    std::fs::write(&file, "waits for a slot\n").unwrap();
    let mut third = env
        .cmd("nix-store")
        .arg("--add")
        .arg(&file)
        .env("NIX_REMOTE", format!("unix://{}", socket.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        third.try_wait().unwrap().is_none(),
        "the third client was served (or failed) while both slots were taken"
    );
    drop(first);
    let out = third.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(std::fs::read_to_string(p).unwrap(), "waits for a slot\n");
}

/// Out of file descriptors (a daemon limited to 96): the daemon says so once in its log,
/// keeps serving the connections it has, lets new clients wait (in the backlog, or with
/// their connection accepted and waiting for a descriptor) instead of dropping them, and
/// serves them once descriptors are free.
#[test]
fn running_out_of_descriptors_is_logged_and_passes() {
    if !nix_or_skip("running_out_of_descriptors_is_logged_and_passes") {
        return;
    }
    let env = NixEnv::new();
    env.run("nix-store", &["--init"]);
    let socket = env.dir.path().join("socket");
    let log = env.dir.path().join("daemon.log");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n 96 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(env.kiln_args())
        .arg("--nix-conf")
        .arg(env.nix_conf())
        .args(["daemon", "--socket"])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let _daemon = kiln_testkit::DaemonProcess::start(cmd, socket.clone());
    let sd = kiln_format::StoreDir::new(env.store_dir().to_string_lossy().into_owned()).unwrap();
    // Connect until a handshake does not finish: the daemon cannot accept any more.
    let connect = |socket: std::path::PathBuf, sd: kiln_format::StoreDir| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(Client::connect(&socket, sd));
        });
        rx
    };
    // A handshake that has not finished counts as waiting once the daemon has said it is
    // out of descriptors (a slow one, on a busy machine, is waited for).
    let mut held = Vec::new();
    let out_of_descriptors =
        || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("Too many open files"));
    let waiting = 'outer: loop {
        assert!(
            held.len() < 200,
            "200 connections and the daemon still accepts"
        );
        let rx = connect(socket.clone(), sd.clone());
        let asked = std::time::Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(c) => {
                    held.push(c.unwrap_or_else(|e| {
                        panic!(
                            "connection {} failed instead of waiting: {e}; the daemon said: {}",
                            held.len(),
                            std::fs::read_to_string(&log).unwrap()
                        )
                    }));
                    break;
                }
                Err(_) if out_of_descriptors() => break 'outer rx,
                Err(_) => assert!(
                    asked.elapsed() < Duration::from_secs(60),
                    "connection {} neither served nor said to wait",
                    held.len()
                ),
            }
        }
    };
    let said = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        said.matches("Too many open files").count(),
        1,
        "after {} connections, the daemon said (once, expected): {said}",
        held.len()
    );
    // The connections it has are served meanwhile.
    let p = kiln_format::StorePath::from_base_name(&format!("{:032}-q", 0)).unwrap();
    let mut c = held.pop().unwrap();
    assert!(matches!(
        c.request(&Request::QueryPathInfo(p), None, &mut |_| {}),
        Ok(Reply::PathInfo(None))
    ));
    // Descriptors free again: the waiting client is served, and so is a Nix client.
    held.truncate(held.len() / 2);
    drop(c);
    let waited = waiting
        .recv_timeout(Duration::from_secs(30))
        .expect("the waiting client was not served once descriptors were free");
    assert!(waited.is_ok(), "{:?}", waited.err());
    let file = env.dir.path().join("f");
    std::fs::write(&file, "served again\n").unwrap();
    let out = env
        .cmd("nix-store")
        .arg("--add")
        .arg(&file)
        .env("NIX_REMOTE", format!("unix://{}", socket.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("accepting connections again"));
}

/// The daemon raises its own limit on open files to the hard limit (a busy daemon needs
/// them), but its builders and hooks get the limit it started with, as Nix's do: what a
/// builder sees of `ulimit -n` (and may record in its output) is what the machine's
/// administrator set, not the daemon's raised figure. And builders still start while the
/// daemon holds more descriptors than that limit (here 250 idle connections, which any
/// local user may open): the limit is put back only at the builder's `exec`.
#[test]
fn builders_and_hooks_get_the_limit_on_open_files_the_daemon_started_with() {
    if !nix_or_skip("builders_and_hooks_get_the_limit_on_open_files_the_daemon_started_with") {
        return;
    }
    let env = NixEnv::new();
    env.run("nix-store", &["--init"]);
    let socket = env.dir.path().join("socket");
    let hooked = env.dir.path().join("hook-saw");
    let hook = env.dir.path().join("hook");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\nulimit -n > {}\n", hooked.display()),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -S -n 200 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(env.kiln_args())
        .arg("--nix-conf")
        .arg(env.nix_conf())
        .args(["daemon", "--option", "post-build-hook"])
        .arg(&hook)
        .arg("--socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let daemon = kiln_testkit::DaemonProcess::start(cmd, socket.clone());
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.child.id())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3], open_files[4],
        "the daemon did not raise its soft limit to the hard one: {limits}"
    );
    assert_ne!(open_files[3], "200", "{limits}");
    let sd = kiln_format::StoreDir::new(env.store_dir().to_string_lossy().into_owned()).unwrap();
    let held: Vec<Client> = (0..250)
        .map(|i| {
            Client::connect(&socket, sd.clone()).unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    let fds = std::fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
        .unwrap()
        .count();
    assert!(fds > 250, "the daemon holds only {fds} descriptors");
    let file = env.dir.path().join("limit.nix");
    std::fs::write(
        &file,
        "derivation { name = \"limit\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"ulimit -n > $out\" ]; }",
    )
    .unwrap();
    let path = run_ok(
        env.cmd("nix-build")
            .arg(&file)
            .arg("--no-out-link")
            .env("NIX_REMOTE", format!("unix://{}", socket.display())),
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "200\n",
        "the builder's limit"
    );
    assert_eq!(
        std::fs::read_to_string(&hooked).unwrap(),
        "200\n",
        "the hook's limit"
    );
    drop(held);
}

/// Collections racing builds (the load run: 8 clients realising one graph while
/// `nix-store --gc` runs again and again): a path a build makes alive after the collector
/// judged it dead is skipped, never a failure — every collection and every build succeeds,
/// and the store verifies clean after.
#[test]
fn collections_racing_builds_neither_fail() {
    if !nix_or_skip("collections_racing_builds_neither_fail") {
        return;
    }
    let (env, daemon, socket, file, _counter) = dag_daemon();
    let remote = format!("unix://{}", socket.display());
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let (stop, mut gc) = (stop.clone(), env.cmd("nix-store"));
        gc.arg("--gc").env("NIX_REMOTE", &remote);
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                let out = gc.output().unwrap();
                assert!(
                    out.status.success(),
                    "a collection failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                runs += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            runs
        })
    };
    for round in 0..3 {
        let builds: Vec<_> = (0..8)
            .map(|_| {
                env.cmd("nix-build")
                    .arg(&file)
                    .arg("--no-out-link")
                    .env("NIX_REMOTE", &remote)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for b in builds {
            let out = b.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "round {round}: nix-build failed: {err}"
            );
            assert!(!err.contains("database is locked"), "{err}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let runs = collector.join().unwrap();
    assert!(runs >= 3, "only {runs} collections ran beside the builds");
    drop(daemon);
    let v = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(env.kiln_args())
        .args(["store", "verify", "--check-contents"])
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

/// One request, two targets: the first builds at once, the second waits. A collection
/// while the second runs must not take the first's output: the client will be told it was
/// built. (The request's roots are taken as each target finishes, before its goal lets go
/// of its own; rooted only at the request's end, the first output was garbage meanwhile.)
#[test]
fn a_finished_target_survives_a_collection_while_its_request_runs() {
    if !nix_or_skip("a_finished_target_survives_a_collection_while_its_request_runs") {
        return;
    }
    let (env, _daemon, socket) = served(&["--option", "max-jobs", "2"], &[]);
    let started = env.dir.path().join("second-started");
    let go = env.dir.path().join("go");
    let file = env.dir.path().join("two.nix");
    std::fs::write(
        &file,
        format!(
            "let mk = name: script: derivation {{ inherit name; system = builtins.currentSystem; builder = \"/bin/sh\"; PATH = \"/bin:/usr/bin\"; args = [ \"-c\" script ]; }};\n\
             in {{ first = mk \"first\" \"echo first > $out\"; second = mk \"second\" \"touch {started}; while [ ! -e {go} ]; do sleep 0.05; done; echo second > $out\"; }}",
            started = started.display(),
            go = go.display()
        ),
    )
    .unwrap();
    let remote = format!("unix://{}", socket.display());
    let build = env
        .cmd("nix-build")
        .arg(&file)
        .args(["-A", "first", "-A", "second", "--no-out-link"])
        .env("NIX_REMOTE", &remote)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !started.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the second build never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first is built by now (it had no reason to wait); collect.
    std::thread::sleep(Duration::from_millis(300));
    run_ok(env.cmd("nix-store").arg("--gc").env("NIX_REMOTE", &remote));
    std::fs::write(&go, "").unwrap();
    let out = build.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paths = String::from_utf8(out.stdout).unwrap();
    let first = paths.lines().find(|l| l.ends_with("-first")).unwrap();
    assert_eq!(
        std::fs::read_to_string(first).unwrap_or_default(),
        "first\n",
        "the collection took {first}, which the client was told was built"
    );
}
