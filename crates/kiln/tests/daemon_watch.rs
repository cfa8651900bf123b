//! Watching a daemon's builds from outside, with a real Nix 2.8 client building through
//! `kiln daemon`: `kiln ps` (the daemon's `QueryActiveBuilds`) lists the running build
//! with its processes and the queued one with what it waits for; `--metrics` serves
//! Prometheus text that follows the builds; `json-log-path` (a listening Unix socket)
//! receives every event as a JSON line; `timeline-file` holds a timeline that
//! `kiln timeline summary` reads, even though the daemon was killed.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{nix_or_skip, NixEnv};

/// Two builds of at least 2 s each, which go on only once `GO_FILE` (replaced by a path)
/// exists: what is asserted while one runs and one waits cannot be outrun by the builds.
const EXPR: &str = r#"
let
  slow = name: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "PATH=/bin:/usr/bin; echo building ${name}; sleep 2; while [ ! -e GO_FILE ]; do sleep 0.1; done; echo ${name} > $out" ];
  };
in { first = slow "first"; second = slow "second"; }
"#;

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    text
}

/// A port nothing listens on now (the daemon binds it a moment later).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn ps_metrics_json_log_and_timeline_follow_the_builds() {
    if !nix_or_skip("ps_metrics_json_log_and_timeline_follow_the_builds") {
        return;
    }
    let env = NixEnv::new();
    env.run("nix-store", &["--init"]);
    let dir = env.dir.path();
    let socket = dir.join("kiln.sock");
    let log_socket = dir.join("events.sock");
    let timeline = dir.join("timeline.json");
    // The JSON log's reader: a listening socket, as Nix's json-log-path connects to one.
    let listener = UnixListener::bind(&log_socket).unwrap();
    let reader = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        BufReader::new(conn)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap())
            .collect::<Vec<_>>()
    });
    let port = free_port();
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let daemon = env.kiln_daemon_with(
        kiln,
        socket.clone(),
        &[
            "--option".into(),
            "max-jobs".into(),
            "1".into(),
            "--option".into(),
            "json-log-path".into(),
            log_socket.clone().into_os_string(),
            "--option".into(),
            "timeline-file".into(),
            timeline.clone().into_os_string(),
        ],
        &["--metrics".into(), format!("127.0.0.1:{port}").into()],
    );
    let expr = dir.join("slow.nix");
    let go = dir.join("go");
    std::fs::write(
        &expr,
        EXPR.replace("GO_FILE", go.to_str().expect("a UTF-8 path")),
    )
    .unwrap();
    let build = env
        .cmd("nix-build")
        .env("NIX_REMOTE", format!("unix://{}", socket.display()))
        .arg(&expr)
        .arg("--no-out-link")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ps = |json: bool| {
        let mut c = Command::new(kiln);
        c.args(env.kiln_args())
            .arg("ps")
            .arg("--socket")
            .arg(&socket);
        if json {
            c.arg("--json");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    // Wait until one build runs its `sleep` and the other waits for the one slot.
    let start = Instant::now();
    let (running, queued) = loop {
        let v: serde_json::Value = serde_json::from_str(&ps(true)).unwrap();
        let list = v.as_array().unwrap().clone();
        let running = list.iter().find(|b| {
            b["type"] == "build"
                && b["processes"].as_array().is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p["argv"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|x| x == "sleep"))
                    })
                })
        });
        let queued = list.iter().find(|b| b["type"] == "queued");
        if let (Some(r), Some(q)) = (running, queued) {
            break (r.clone(), q.clone());
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never saw both: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(running["mainPid"].as_i64().unwrap() > 0, "{running}");
    assert_eq!(running["nixPid"], daemon.child.id());
    assert!(running["derivation"].as_str().unwrap().ends_with(".drv"));
    assert!(!running["derivation"].as_str().unwrap().contains('/'));
    assert_eq!(running["clientUid"], rustix::process::getuid().as_raw());
    assert!(running["startTime"].as_f64().unwrap() > 1.7e9);
    assert_eq!(queued["waitingFor"], "slot", "{queued}");
    let table = ps(false);
    assert!(
        table.contains("building here") && table.contains("waiting: slot"),
        "{table}"
    );
    let m = scrape(port);
    assert_eq!(metric(&m, "kiln_builds_running"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "kiln_builds_queued"), Some(1.0), "{m}");
    assert!(metric(&m, "kiln_clients_connected").unwrap() >= 1.0, "{m}");
    std::fs::write(&go, "").unwrap();
    let out = build.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = scrape(port);
    assert_eq!(metric(&m, "kiln_builds_running"), Some(0.0), "{m}");
    assert_eq!(
        metric(&m, "kiln_builds_finished_total{status=\"Built\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "kiln_build_duration_seconds_count"),
        Some(2.0),
        "{m}"
    );
    // Both builds slept 2 s: neither is in the buckets below 1 s.
    assert_eq!(
        metric(&m, "kiln_build_duration_seconds_bucket{le=\"1\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(ps(false).trim(), "No active builds.");
    // Killed, not stopped: the log's reader sees its end, the timeline is left unclosed.
    drop(daemon);
    let events = reader.join().unwrap();
    let count = |name: &str| events.iter().filter(|e| e["event"] == name).count();
    assert_eq!(count("build-started"), 2, "{events:?}");
    assert_eq!(count("build-finished"), 2, "{events:?}");
    assert!(events
        .iter()
        .any(|e| e["event"] == "phase" && e["phase"] == "slot"));
    assert!(events
        .iter()
        .any(|e| e["event"] == "log" && e["text"] == "building first\n"));
    let s = Command::new(kiln)
        .args(["timeline", "summary", "--json"])
        .arg(&timeline)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let v: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
    assert_eq!(v["builds"], 2, "{v}");
    // One slot: the second build waited about as long as the first built.
    assert!(v["phases"]["slot"].as_f64().unwrap() >= 1.5, "{v}");
    assert!(v["wall"].as_f64().unwrap() >= 4.0, "{v}");
}

/// A client that goes away mid-build cancels its builds: they leave `kiln ps` and the
/// running gauge, and count as cancelled (a daemon that runs for months must not keep
/// them).
#[test]
fn cancelled_builds_leave_the_lists() {
    if !nix_or_skip("cancelled_builds_leave_the_lists") {
        return;
    }
    let env = NixEnv::new();
    env.run("nix-store", &["--init"]);
    let dir = env.dir.path();
    let socket = dir.join("kiln.sock");
    let port = free_port();
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let _daemon = env.kiln_daemon_with(
        kiln,
        socket.clone(),
        &[],
        &["--metrics", &format!("127.0.0.1:{port}")],
    );
    let expr = dir.join("slow.nix");
    std::fs::write(
        &expr,
        EXPR.replace("sleep 2", "sleep 30").replace("GO_FILE", "/"),
    )
    .unwrap();
    let mut build = env
        .cmd("nix-build")
        .env("NIX_REMOTE", format!("unix://{}", socket.display()))
        .arg(&expr)
        .args(["-A", "first", "--no-out-link"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ps = || {
        let o = Command::new(kiln)
            .args(env.kiln_args())
            .args(["ps", "--socket"])
            .arg(&socket)
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    let start = Instant::now();
    while !ps().contains("building here") {
        assert!(start.elapsed() < Duration::from_secs(30), "never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = build.kill();
    let _ = build.wait();
    let start = Instant::now();
    while ps().trim() != "No active builds." {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still listed: {}",
            ps()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = scrape(port);
    assert_eq!(metric(&m, "kiln_builds_running"), Some(0.0), "{m}");
    assert_eq!(
        metric(&m, "kiln_builds_finished_total{status=\"Cancelled\"}"),
        Some(1.0),
        "{m}"
    );
}
