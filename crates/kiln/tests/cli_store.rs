//! `kiln store …` against the real Nix 2.8 on the same store, plus optimise and read-only.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use kiln_testkit::{fixture, nix_or_skip, NixEnv};

fn kiln_on(env: &NixEnv) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--store-dir")
        .arg(env.store_dir())
        .arg("--state-dir")
        .arg(env.state_dir())
        .arg("--log-dir")
        .arg(env.log_dir());
    c
}

fn out(mut c: Command) -> (bool, String, String) {
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn path_info_json_and_queries_match_nix_on_the_same_store() {
    if !nix_or_skip("path_info_json_and_queries_match_nix_on_the_same_store") {
        return;
    }
    let env = NixEnv::new();
    let top = env.build(&fixture("store.nix"), "top").remove(0);
    let nix_json = env.run("nix", &["path-info", "--json", "-rS", &top]);
    let mut c = kiln_on(&env);
    c.args(["store", "path-info", "--json", "-S", "-r", &top]);
    let (ok, kiln_json, err) = out(c);
    assert!(ok, "{err}");
    assert_eq!(kiln_json.trim_end(), nix_json.trim_end());
    for q in [
        ["-q", "--references"],
        ["-q", "--referrers"],
        ["-q", "--deriver"],
        ["-q", "--hash"],
        ["-q", "--size"],
        ["-q", "-R"],
    ] {
        let flag = if q[1] == "-R" { "-R" } else { q[1] };
        let mut c = kiln_on(&env);
        c.args(["store", "query", flag, &top]);
        let (ok, k, err) = out(c);
        assert!(ok, "{flag}: {err}");
        let n = env.run("nix-store", &[q[0], q[1], &top]);
        if flag == "-R" {
            assert_eq!(k, n, "order of -R");
        } else {
            let mut a: Vec<&str> = k.lines().collect();
            let mut b: Vec<&str> = n.lines().collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{flag}");
        }
    }
    // `dump-db` output is what `nix-store --dump-db` prints.
    let mut c = kiln_on(&env);
    c.args(["store", "dump-db"]);
    assert_eq!(out(c).1, env.run("nix-store", &["--dump-db"]));
}

#[test]
fn verify_finds_the_same_corruption_as_nix() {
    if !nix_or_skip("verify_finds_the_same_corruption_as_nix") {
        return;
    }
    let env = NixEnv::new();
    let leaf = env.build(&fixture("store.nix"), "leaf").remove(0);
    let _ = Command::new("chmod").arg("u+w").arg(&leaf).status();
    std::fs::write(&leaf, "tampered\n").unwrap();
    let mut c = kiln_on(&env);
    c.args(["store", "verify", "--check-contents"]);
    let (ok, _, err) = out(c);
    assert!(!ok);
    assert!(
        err.contains(&format!("path '{leaf}' was modified!")),
        "{err}"
    );
    let o = env
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("path '{leaf}' was modified!")));
}

#[test]
fn optimise_links_identical_files_with_nix_link_names() {
    let d = tempfile::tempdir().unwrap();
    let kiln = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--store-dir")
            .arg(d.path().join("store"))
            .arg("--state-dir")
            .arg(d.path().join("var"));
        c.arg("--log-dir").arg(d.path().join("log")).args([
            "--option",
            "gc-runtime-roots",
            "false",
        ]);
        c
    };
    let src = d.path().join("src");
    for (dir, extra) in [("a", "1"), ("b", "2")] {
        std::fs::create_dir_all(src.join(dir)).unwrap();
        std::fs::write(src.join(dir).join("same"), "x\n").unwrap();
        std::fs::write(src.join(dir).join("other"), extra).unwrap();
    }
    let mut paths = Vec::new();
    for dir in ["a", "b"] {
        let mut c = kiln();
        c.args(["store", "add"]).arg(src.join(dir));
        let (ok, p, err) = out(c);
        assert!(ok, "{err}");
        paths.push(p.trim().to_string());
    }
    let mut c = kiln();
    c.args(["store", "optimise"]);
    let (ok, msg, err) = out(c);
    assert!(ok, "{err}");
    assert!(msg.contains("freed by hard-linking 1 files"), "{msg}");
    let a = std::fs::metadata(format!("{}/same", paths[0])).unwrap();
    let b = std::fs::metadata(format!("{}/same", paths[1])).unwrap();
    assert_eq!(a.ino(), b.ino());
    // The link is named as Nix names it: base32 of the SHA-256 of the file's NAR.
    let link = d
        .path()
        .join("store/.links/0hkbia1003qqh0r7fn03drzx5yaw7yp99xs7j6c7qsddnp1w7dpc");
    assert_eq!(std::fs::metadata(&link).unwrap().ino(), a.ino());
    let mut c = kiln();
    c.args(["store", "verify", "--check-contents"]);
    assert!(out(c).0);
    // Collecting both paths also removes the now unused link.
    let mut c = kiln();
    c.args(["store", "gc"]);
    assert!(out(c).0);
    assert!(!link.exists());
}

#[test]
fn read_only_mode_refuses_writes() {
    let d = tempfile::tempdir().unwrap();
    let base = |ro: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--store-dir")
            .arg(d.path().join("store"))
            .arg("--state-dir")
            .arg(d.path().join("var"));
        c.arg("--log-dir").arg(d.path().join("log"));
        if ro {
            c.args(["--option", "read-only", "true"]);
        }
        c
    };
    let f = d.path().join("f");
    std::fs::write(&f, "data").unwrap();
    let mut c = base(false);
    c.args(["store", "add"]).arg(&f);
    let p = out(c).1.trim().to_string();
    let mut c = base(true);
    c.args(["store", "path-info", &p]);
    assert!(out(c).0, "reads work read-only");
    let before: Vec<_> = std::fs::read_dir(d.path().join("store"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut c = base(true);
    c.args(["store", "add"]).arg(d.path().join("var"));
    let (ok, _, err) = out(c);
    assert!(!ok);
    assert!(err.contains("read-only"), "{err}");
    let after: Vec<_> = std::fs::read_dir(d.path().join("store"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "a refused add wrote into the store");
    let mut c = base(true);
    c.args(["store", "gc"]);
    let (ok, _, err) = out(c);
    assert!(!ok && err.contains("read-only"), "{err}");
}
