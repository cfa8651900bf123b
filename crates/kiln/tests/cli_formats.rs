//! Drives the `kiln` binary's format commands and compares them with the real Nix 2.8
//! (live, when installed) and with the committed golden fixtures.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use kiln_testkit::{fixture, nix_or_skip, NixEnv};

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// A tree with the awkward cases: sort order, padding sizes, symlinks, executables, nesting.
fn make_tree(root: &Path, seed: u64) {
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    std::fs::create_dir_all(root).unwrap();
    let mut dirs = vec![root.to_path_buf()];
    for i in 0..60 {
        let parent = dirs[(rnd() % dirs.len() as u64) as usize].clone();
        let name = format!(
            "{}{}",
            ["a", "B", "_x", "z z", "ü", ".h"][(rnd() % 6) as usize],
            i
        );
        let p = parent.join(name);
        match rnd() % 5 {
            0 => {
                std::fs::create_dir(&p).unwrap();
                dirs.push(p);
            }
            1 => std::os::unix::fs::symlink(format!("target-{i}"), &p).unwrap(),
            _ => {
                let len = (rnd() % 40) as usize;
                std::fs::write(&p, vec![b'k'; len]).unwrap();
                if rnd() % 3 == 0 {
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
                }
            }
        }
    }
}

#[test]
fn nar_dump_and_hash_match_nix_live() {
    if !nix_or_skip("nar_dump_and_hash_match_nix_live") {
        return;
    }
    let nix = NixEnv::new();
    for seed in 1..6 {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("tree");
        make_tree(&t, seed);
        let ours = kiln().args(["nar", "dump"]).arg(&t).output().unwrap();
        let theirs = nix.cmd("nix-store").arg("--dump").arg(&t).output().unwrap();
        assert!(ours.status.success() && theirs.status.success());
        assert_eq!(ours.stdout, theirs.stdout, "NAR of seed {seed}");
        for (algo, enc) in [
            ("sha256", "--base32"),
            ("sha1", "--base16"),
            ("sha512", "--base32"),
            ("md5", "--base16"),
        ] {
            let k = ok(kiln()
                .args(["hash", "path", "--type", algo, enc])
                .arg(&t)
                .output()
                .unwrap());
            // nix-hash prints base16 by default and has no --base16 flag.
            let mut args = vec!["--type", algo, t.to_str().unwrap()];
            if enc == "--base32" {
                args.push("--base32");
            }
            let n = nix.run("nix-hash", &args);
            assert_eq!(k, n, "{algo} {enc} of seed {seed}");
        }
        // Restoring Nix's NAR with kiln gives a tree Nix dumps identically.
        let r = dir.path().join("restored");
        let out = run_with_stdin(kiln().args(["nar", "restore"]).arg(&r), &theirs.stdout);
        ok(out);
        let again = nix.cmd("nix-store").arg("--dump").arg(&r).output().unwrap();
        assert_eq!(again.stdout, theirs.stdout);
    }
}

#[test]
fn store_paths_match_nix_live() {
    if !nix_or_skip("store_paths_match_nix_live") {
        return;
    }
    let nix = NixEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("item");
    make_tree(&t, 42);
    let f = dir.path().join("file.txt");
    std::fs::write(&f, "flat contents\n").unwrap();
    let sd = nix.store_dir();
    let sd = sd.to_str().unwrap();
    let want = nix.run("nix-store", &["--add", t.to_str().unwrap()]);
    let got = ok(kiln()
        .args(["store-path", "source", "--store-dir", sd])
        .arg(&t)
        .output()
        .unwrap());
    assert_eq!(got, want);
    for algo in ["md5", "sha1", "sha256", "sha512"] {
        let want = nix.run("nix-store", &["--add-fixed", algo, f.to_str().unwrap()]);
        let got = ok(kiln()
            .args(["store-path", "fixed", "--type", algo, "--store-dir", sd])
            .arg(&f)
            .output()
            .unwrap());
        assert_eq!(got, want, "flat {algo}");
        let want = nix.run(
            "nix-store",
            &["--add-fixed", "--recursive", algo, t.to_str().unwrap()],
        );
        let got = ok(kiln()
            .args([
                "store-path",
                "fixed",
                "-r",
                "--type",
                algo,
                "--store-dir",
                sd,
            ])
            .arg(&t)
            .output()
            .unwrap());
        assert_eq!(got, want, "recursive {algo}");
    }
}

#[test]
fn drv_show_matches_golden_json() {
    for sd in ["_nix_store", "_gnu_store"] {
        let dir = fixture(&format!("drv/{sd}"));
        let store = sd.replace('_', "/");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "json") {
                let drv = p.with_extension("");
                let got = ok(kiln()
                    .args(["drv", "show", "--store-dir", &store])
                    .arg(&drv)
                    .output()
                    .unwrap());
                assert_eq!(
                    got,
                    std::fs::read_to_string(&p).unwrap(),
                    "{}",
                    drv.display()
                );
                n += 1;
            }
        }
        assert!(n > 10);
    }
}

#[test]
fn drv_check_passes_nix_drvs_and_names_what_is_wrong() {
    let dir = fixture("drv/_nix_store");
    let drvs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "drv"))
        .collect();
    ok(kiln()
        .args(["drv", "check", "--store-dir", "/nix/store"])
        .args(&drvs)
        .output()
        .unwrap());

    // A tampered copy: an env change makes the declared outputs wrong.
    let tmp = tempfile::tempdir().unwrap();
    let simple = drvs
        .iter()
        .find(|p| p.to_str().unwrap().ends_with("-simple.drv"))
        .unwrap();
    let text = std::fs::read_to_string(simple)
        .unwrap()
        .replace("\"simple\"", "\"simpla\"");
    let bad = tmp.path().join(simple.file_name().unwrap());
    std::fs::write(&bad, text).unwrap();
    let out = kiln()
        .args(["drv", "check", "--store-dir", "/nix/store"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("incorrect output 'out'"), "{err}");

    // Non-canonical text (a reordered env) does not re-print identically.
    let text = std::fs::read_to_string(simple).unwrap();
    let swapped = text.replacen("[(\"args\"", "[(\"zzz\",\"1\"),(\"args\"", 1);
    if swapped != text {
        std::fs::write(&bad, swapped).unwrap();
        let out = kiln()
            .args(["drv", "check", "--store-dir", "/nix/store"])
            .arg(&bad)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stderr).contains("re-print"));
    }
}

#[test]
fn nar_restore_refuses_garbage_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    // A valid NAR followed by trailing bytes.
    let mut nar = std::fs::read(fixture("nar/dir.nar")).unwrap();
    nar.extend_from_slice(b"trailing");
    let out = run_with_stdin(kiln().args(["nar", "restore"]).arg(&target), &nar);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("trailing data"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!target.exists(), "partial restore left behind");
    // Truncated.
    let nar = std::fs::read(fixture("nar/dir.nar")).unwrap();
    let out = run_with_stdin(
        kiln().args(["nar", "restore"]).arg(&target),
        &nar[..nar.len() / 2],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected end of archive"));
    assert!(!target.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn hash_convert_and_file() {
    let f = fixture("nar/files/file");
    let b32 = ok(kiln()
        .args(["hash", "file", "--type", "sha256"])
        .arg(&f)
        .output()
        .unwrap());
    let sri = ok(kiln()
        .args(["hash", "convert", "--sri"])
        .arg(b32.trim())
        .output()
        .unwrap());
    let want = std::fs::read_to_string(fixture("nar/flat-hashes.tsv")).unwrap();
    let line = want
        .lines()
        .find(|l| l.starts_with("file\tsha256\t"))
        .unwrap();
    let cols: Vec<&str> = line.split('\t').collect();
    assert_eq!(b32.trim(), cols[2]);
    assert_eq!(sri.trim(), cols[3]);
    let out = kiln()
        .args(["hash", "convert", "sha256:nonsense"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong length"));
}
