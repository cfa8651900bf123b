//! Power cuts, simulated for real: the store lives on an ext4 file system whose disk keeps
//! writes in a volatile cache until the file system flushes it
//! (`kiln_testkit::volatile_disk`). While `kiln store add` commands run one after the
//! other and a `kiln build` of a graph runs beside them, the power is cut at a random
//! moment: every write since the last flush is lost (or, in some rounds, a random part of
//! them survives, as a disk cache may have written it out). Then the file system is
//! mounted again from what the disk kept (ext4 replays its journal), and:
//!
//! * no valid path has missing or partial contents (`kiln store verify --check-contents`,
//!   after kiln's recovery of the paths it had not made durable yet);
//! * every path a finished `kiln store add` printed is valid, with its contents: a command
//!   that ended made what it registered durable;
//! * the database is intact (SQLite's `integrity_check`).

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::volatile_disk::VolatileDisk;
use kiln_testkit::{root_with_or_skip, run_ok};

fn prerequisites(test: &str) -> bool {
    Path::new("/dev/fuse").exists() && root_with_or_skip(test, &["losetup", "mkfs.ext4"])
}

/// Unmounts `mnt`, retrying while the killed processes let go of it.
fn umount(mnt: &Path) {
    let start = Instant::now();
    loop {
        let o = Command::new("umount").arg(mnt).output().unwrap();
        if o.status.success() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "umount {}: {}",
            mnt.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const GRAPH: &str = r#"
[derivations.base]
builder = "/bin/sh"
env = { PATH = "/bin:/usr/bin" }
args = ["-c", "mkdir $out; for i in 1 2 3 4 5 6 7 8; do head -c 20000 /dev/urandom > $out/f$i; done"]
"#;

fn graph() -> String {
    let mut s = GRAPH.to_string();
    for i in 0..40 {
        s.push_str(&format!(
            "[derivations.n{i}]\nbuilder = \"/bin/sh\"\nenv = {{ PATH = \"/bin:/usr/bin\" }}\nargs = [\"-c\", \"mkdir $out; cat ${{base}}/f1 > $out/a; head -c {} /dev/urandom > $out/b; echo ${{base}} > $out/ref\"]\n",
            10_000 + i * 3000
        ));
    }
    s
}

/// One power cut during the work: `extra` options for every kiln command, the share of
/// unflushed pages that survive, when the power goes (not before `min_acked` adds were
/// acknowledged). Returns what is wrong afterwards
/// and how many adds were acknowledged.
fn power_cut_round(
    round: usize,
    extra: &[&str],
    keep: u64,
    after_ms: u64,
    min_acked: usize,
) -> (Vec<String>, usize) {
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("image");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(192 << 20)
        .unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
    for sub in ["fuse", "mnt", "src", "roots"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    let mnt = d.join("mnt");
    let kiln_args: Vec<std::ffi::OsString> = {
        let mut v: Vec<std::ffi::OsString> = vec![
            "--store-dir".into(),
            mnt.join("store").into(),
            "--state-dir".into(),
            mnt.join("var").into(),
            "--log-dir".into(),
            mnt.join("log").into(),
            "--option".into(),
            "sandbox".into(),
            "false".into(),
        ];
        v.extend(extra.iter().map(|a| a.into()));
        v
    };
    let kiln_cmd = || {
        let mut c = Command::new(kiln);
        c.args(&kiln_args).env_remove("KILN_CONFIG").current_dir(d);
        c
    };
    let disk = VolatileDisk::start(&image, &d.join("fuse")).unwrap();
    let dev = run_ok(
        Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&disk.file),
    );
    run_ok(Command::new("mount").arg(&dev).arg(&mnt));
    // The store exists before the work starts, and a cache (on the host, which keeps
    // power) holds paths to substitute during it: built here, copied out, deleted.
    run_ok(kiln_cmd().args(["store", "verify"]));
    std::fs::write(d.join("graph.toml"), graph()).unwrap();
    std::fs::write(d.join("cached.toml"), cached()).unwrap();
    let cached: Vec<String> = run_ok(
        kiln_cmd()
            .args(["build", "--no-out-link", "--no-live", "-Q"])
            .arg(d.join("cached.toml")),
    )
    .lines()
    .map(str::to_string)
    .collect();
    let cache = format!("file://{}", d.join("cache").display());
    run_ok(kiln_cmd().args(["copy", "--to", &cache]).args(&cached));
    run_ok(kiln_cmd().args(["store", "delete"]).args(&cached));
    // Adds one after the other, each acknowledged (outside the disk) once it and its
    // root ended; substitutions from the cache; collections. (Between an add and its root
    // nothing holds the path, and a collection may take it first, as with Nix: then its
    // root fails and the add is not acknowledged. That once ended a round's adds.)
    let ack = d.join("acked");
    let script = format!(
        "i=0; while :; do i=$((i+1)); head -c $((1000 + i * 97)) /dev/urandom > {src}/f$i; p=$(\"$@\" store add {src}/f$i) || exit 1; \"$@\" store add-root --link {roots}/r$i $p || continue; echo \"$p {src}/f$i\" >> {ack}; done",
        src = d.join("src").display(),
        roots = d.join("roots").display(),
        ack = ack.display()
    );
    let background = |script: &str, stderr: Stdio| {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(kiln)
            .args(&kiln_args)
            .current_dir(d)
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap()
    };
    // What the adds said, for a round that needs them and got none.
    let adds_said = d.join("adds.err");
    let mut adds = background(&script, std::fs::File::create(&adds_said).unwrap().into());
    let mut substitutions = background(
        &format!(
            "while :; do \"$@\" copy --from {cache} --no-check-sigs {}; \"$@\" store delete {} 2>/dev/null; done",
            cached.join(" "),
            cached.join(" ")
        ),
        Stdio::null(),
    );
    let gc_log = d.join("gc.log");
    let mut collections = background(
        &format!(
            "while :; do \"$@\" store gc >/dev/null 2>> {}; sleep 0.2; done",
            gc_log.display()
        ),
        Stdio::null(),
    );
    let mut build = kiln_cmd();
    build
        .args(["build", "-j", "2", "--no-out-link", "--no-live", "-Q"])
        .arg(d.join("graph.toml"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut build = build.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(after_ms));
    // A round that needs acknowledged adds waits for them (on a busy machine the first
    // can take longer than any fixed delay).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let acked_now = || {
        std::fs::read_to_string(&ack)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    while acked_now() < min_acked && std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = adds.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Said after the cleanup, for a round that needs acknowledged adds and got too few.
    let adds_note = (acked_now() < min_acked).then(|| {
        format!(
            "{} adds acknowledged ({}); the adds said: {}",
            acked_now(),
            match adds.try_wait() {
                Ok(Some(st)) => format!("they stopped: {st}"),
                _ => "still running".to_string(),
            },
            std::fs::read_to_string(&adds_said).unwrap_or_default()
        )
    });
    // The power goes, for the processes and the disk at once: every process is stopped
    // before the disk is cut, and killed after. (Cutting first let a command that ran on
    // in the moment before the kill finish against a disk that silently kept nothing, and
    // acknowledge an add no disk had: 2 of ~630 cuts reported such an add as lost.)
    let groups: Vec<i32> = [&adds, &build, &substitutions, &collections]
        .iter()
        .map(|c| c.id() as i32)
        .collect();
    stop_process_groups(&groups);
    disk.cut_keeping(keep, 0x9e37_79b9 + round as u64);
    for &g in &groups {
        let _ = rustix::process::kill_process_group(
            rustix::process::Pid::from_raw(g).unwrap(),
            rustix::process::Signal::KILL,
        );
    }
    for c in [&mut adds, &mut build, &mut substitutions, &mut collections] {
        let _ = c.wait();
    }
    let flushes = disk.flushes();
    umount(&mnt);
    run_ok(Command::new("losetup").arg("-d").arg(&dev));
    drop(disk);
    // The loop device may let go of the disk's file a moment after `losetup -d`; the
    // FUSE mount it was on must not stay behind (it did, one per run).
    kiln_testkit::unmount(&d.join("fuse"));
    // Back on: the file system from what the disk kept, at the same place.
    run_ok(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt),
    );
    let acked: Vec<(String, PathBuf)> = std::fs::read_to_string(&ack)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(p, s)| (p.to_string(), PathBuf::from(s)))
        .collect();
    let mut problems = Vec::new();
    // What `verify --check-contents` finds, if anything.
    let verify = || {
        let o = kiln_cmd()
            .args(["store", "verify", "--check-contents"])
            .output()
            .unwrap();
        (!o.status.success()).then(|| String::from_utf8_lossy(&o.stderr).into_owned())
    };
    // The first opening after the cut recovers what was not durable; what it says goes
    // with any problem found below.
    let first = kiln_cmd()
        .args(["store", "verify", "--check-contents"])
        .output()
        .unwrap();
    let recovery = String::from_utf8_lossy(&first.stderr).into_owned();
    if !first.status.success() {
        problems.push(format!("verify: {recovery}"));
    }
    for (p, src) in &acked {
        let info = kiln_cmd().args(["store", "path-info", p]).output().unwrap();
        if !info.status.success() {
            let collected = std::fs::read_to_string(&gc_log)
                .unwrap_or_default()
                .contains(&format!("deleting '{p}'"));
            problems.push(format!(
                "acknowledged {p} is not valid (its files {}; a collection before the cut {} it; the first opening said: {recovery})",
                if Path::new(p).exists() {
                    "are there"
                } else {
                    "are gone"
                },
                if collected { "deleted" } else { "did not delete" }
            ));
            continue;
        }
        if std::fs::read(p).ok() != std::fs::read(src).ok() {
            problems.push(format!("acknowledged {p} lost its contents"));
        }
    }
    // Nix's own verdict on the same store, when Nix is here.
    if kiln_testkit::have_nix() {
        let o = Command::new("nix-store")
            .args(["--verify", "--check-contents"])
            .env("NIX_STORE_DIR", mnt.join("store"))
            .env("NIX_STATE_DIR", mnt.join("var"))
            .env("NIX_LOG_DIR", mnt.join("log"))
            .env("NIX_REMOTE", "local")
            .env("NIX_CONF_DIR", d)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        if !o.status.success() || err.contains("was modified") || err.contains("disappeared") {
            problems.push(format!("nix-store --verify --check-contents: {err}"));
        }
    }
    let check = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('pragma integrity_check').fetchone()[0])")
        .arg(mnt.join("var/db/db.sqlite"))
        .output()
        .unwrap();
    let integrity = String::from_utf8_lossy(&check.stdout).trim().to_string();
    if integrity != "ok" {
        problems.push(format!("database: {integrity}"));
    }
    // The store is usable: the graph builds to the end, and verifies.
    let rebuilt = kiln_cmd()
        .args(["build", "-j", "2", "--no-out-link", "--no-live", "-Q"])
        .arg(d.join("graph.toml"))
        .output()
        .unwrap();
    if !rebuilt.status.success() {
        problems.push(format!(
            "the graph does not build after: {}",
            String::from_utf8_lossy(&rebuilt.stderr)
        ));
    }
    if let Some(v) = verify() {
        problems.push(format!("verify after rebuilding: {v}"));
    }
    umount(&mnt);
    let _ = writeln!(
        std::io::stderr(),
        "round {round}: cut after {after_ms} ms keeping {keep}% of unflushed pages; {} adds acknowledged, {flushes} flushes, {} problems",
        acked.len(),
        problems.len()
    );
    if let Some(note) = adds_note {
        problems.push(note);
    }
    (problems, acked.len())
}

/// Stops every process of `groups` (SIGSTOP) and waits until none can run user code any
/// more: each is stopped, or inside the kernel (`D`), from where it returns only to stop.
fn stop_process_groups(groups: &[i32]) {
    for &g in groups {
        let _ = rustix::process::kill_process_group(
            rustix::process::Pid::from_raw(g).unwrap(),
            rustix::process::Signal::STOP,
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut running = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid pgrp …: comm may hold spaces, so split after its ')'.
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let f: Vec<&str> = rest.split(' ').collect();
            let (Some(state), Some(pgrp)) =
                (f.first(), f.get(2).and_then(|p| p.parse::<i32>().ok()))
            else {
                continue;
            };
            if groups.contains(&pgrp) && !matches!(*state, "T" | "t" | "D" | "Z" | "X") {
                running.push(format!("{} {state}", e.file_name().to_string_lossy()));
            }
        }
        if running.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes still running after SIGSTOP: {running:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Paths a cache holds, substituted (and deleted again) during the work.
fn cached() -> String {
    let mut s = String::new();
    for i in 0..3 {
        s.push_str(&format!(
            "[derivations.cached{i}]\nbuilder = \"/bin/sh\"\nenv = {{ PATH = \"/bin:/usr/bin\" }}\nargs = [\"-c\", \"mkdir $out; head -c {} /dev/urandom > $out/data\"]\n",
            200_000 + i * 50_000
        ));
    }
    s
}

/// The cuts: `KILN_POWER_CUTS` of them (3 by default, for CI; 200 for the long run), at
/// moments and with surviving shares drawn from a fixed seed.
///
/// In two long runs of 200 before processes were stopped ahead of the cut, one cut each
/// reported an acknowledged add lost: the test's own doing (the add had finished against
/// the already-dead disk in the moment before the kill; see `stop_process_groups`). A
/// problem still says whether a collection before the cut deleted the path (`gc.log`).
#[test]
fn no_path_is_valid_with_lost_contents_after_a_power_cut() {
    if !prerequisites("no_path_is_valid_with_lost_contents_after_a_power_cut") {
        return;
    }
    let cuts: usize = std::env::var("KILN_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // KILN_POWER_CUTS_FROM: start at that round of the sequence (to look at one again).
    let from: usize = std::env::var("KILN_POWER_CUTS_FROM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut acked_total = 0;
    for round in 0..cuts {
        let keep = [0, 0, 25, 50, 90, 100][(next() % 6) as usize];
        let after_ms = 300 + next() % 1500;
        if round < from {
            continue;
        }
        let (problems, acked) = power_cut_round(round, &[], keep, after_ms, 0);
        acked_total += acked;
        assert!(
            problems.is_empty(),
            "round {round}: {}",
            problems.join("\n")
        );
    }
    assert!(acked_total > 0, "no add finished before any cut");
}

/// The control: with kiln's flushes turned off (`fsync-store-paths false`, which is how
/// Nix writes store paths), the same cut leaves valid paths with lost contents. So the
/// disk really loses what was not flushed, and the test above could fail.
#[test]
fn without_flushes_a_power_cut_loses_registered_contents() {
    if !prerequisites("without_flushes_a_power_cut_loses_registered_contents") {
        return;
    }
    let (problems, acked) =
        power_cut_round(9, &["--option", "fsync-store-paths", "false"], 0, 600, 1);
    assert!(acked > 0, "no add finished before the cut: {problems:?}");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("lost its contents") || p.contains("was modified")),
        "{problems:?}"
    );
}
