//! Same answers as the real thing: derivations instantiated by Nix 2.8 are built by
//! `nix-store --realise` in one store and by kiln in an identical fresh store (same path);
//! the outputs, NAR hashes, references and failure statuses agree, and Nix reads kiln's
//! results (queries, `--verify --check-contents`, `--read-log`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;

use kiln_testkit::{fixture, nix_or_skip, NixEnv};

fn instantiate(env: &NixEnv, attrs: &[&str]) -> BTreeMap<String, String> {
    attrs
        .iter()
        .map(|a| {
            (
                a.to_string(),
                env.run(
                    "nix-instantiate",
                    &[fixture("build.nix").to_str().unwrap(), "-A", a],
                )
                .trim()
                .to_string(),
            )
        })
        .collect()
}

fn facts(env: &NixEnv, paths: &[String]) -> BTreeMap<String, (String, String)> {
    let mut m = BTreeMap::new();
    for p in paths {
        for q in env.lines("nix-store", &["-qR", p]) {
            let hash = env.run("nix-store", &["-q", "--hash", &q]);
            let refs = env.run("nix-store", &["-q", "--references", &q]);
            m.insert(q, (hash, refs));
        }
    }
    m
}

/// Nix's `--verify --check-contents` finds kiln's store intact.
fn assert_nix_verifies(nix: &NixEnv) {
    let v = nix
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    assert!(
        v.status.success() && !String::from_utf8_lossy(&v.stderr).contains("modified"),
        "{}",
        String::from_utf8_lossy(&v.stderr)
    );
}

#[test]
fn kiln_builds_what_nix_builds() {
    if !nix_or_skip("kiln_builds_what_nix_builds") {
        return;
    }
    // One directory, used twice: store paths depend on the store directory's name.
    let path = std::env::temp_dir().join(format!("kiln-oracle-{}", std::process::id()));
    let attrs = ["top", "fixedRec"];
    // Nix builds.
    let nix = NixEnv::at(&path);
    let drvs = instantiate(&nix, &attrs);
    let mut outs = Vec::new();
    for a in attrs {
        outs.extend(nix.lines("nix-store", &["--realise", &drvs[a]]));
    }
    let want = facts(&nix, &outs);
    let nix_fail = nix
        .cmd("nix-store")
        .args(["--realise", &instantiate(&nix, &["failing"])["failing"]])
        .output()
        .unwrap();
    let nix_bad = nix
        .cmd("nix-store")
        .args(["--realise", &instantiate(&nix, &["badHash"])["badHash"]])
        .output()
        .unwrap();
    // Wipe it (store files are read-only) and recreate the same store for kiln.
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(&path)
        .status();
    drop(nix);
    let nix = NixEnv::at(&path);
    let drvs2 = instantiate(&nix, &attrs);
    assert_eq!(drvs, drvs2, "the same .drv paths in the recreated store");
    let kiln = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(nix.kiln_args())
            .args(["--option", "sandbox", "false"])
            .args(args)
            .output()
            .unwrap()
    };
    let mut kouts = Vec::new();
    for a in attrs {
        let o = kiln(&["build", "--no-out-link", &drvs[a]]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        kouts.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string),
        );
    }
    let mut a = outs.clone();
    let mut b = kouts.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b, "output paths");
    // Nix reads kiln's database and finds the same hashes and references.
    assert_eq!(facts(&nix, &kouts), want);
    assert_nix_verifies(&nix);
    let log = nix.run("nix-store", &["--read-log", &drvs["top"]]);
    assert!(log.contains("building top"), "{log}");
    // Failures: same exit statuses.
    let kf = kiln(&[
        "build",
        "--no-out-link",
        &instantiate(&nix, &["failing"])["failing"],
    ]);
    assert_eq!(kf.status.code(), nix_fail.status.code(), "failing builder");
    let kb = kiln(&[
        "build",
        "--no-out-link",
        &instantiate(&nix, &["badHash"])["badHash"],
    ]);
    assert_eq!(
        kb.status.code(),
        nix_bad.status.code(),
        "fixed-output hash mismatch"
    );
}

/// Floating content-addressed derivations (`ca-derivations`): Nix 2.8 builds them in one
/// store, kiln in an identical fresh one; the output paths, their hashes, references and
/// content addresses agree, and Nix, reading kiln's database, finds the same realisations
/// (the paths each derivation's outputs became).
#[test]
fn kiln_builds_content_addressed_derivations_as_nix_does() {
    if !nix_or_skip("kiln_builds_content_addressed_derivations_as_nix_does") {
        return;
    }
    let path = std::env::temp_dir().join(format!("kiln-oracle-ca-{}", std::process::id()));
    let attrs = [
        "root",
        "rootFlat",
        "multi",
        "dependent",
        "dependentNonCA",
        "transitive",
    ];
    let feature = [
        "--option",
        "experimental-features",
        "nix-command ca-derivations",
    ];
    let instantiate = |env: &NixEnv| -> BTreeMap<String, String> {
        attrs
            .iter()
            .map(|a| {
                let file = fixture("ca/ca.nix");
                let mut args = feature.to_vec();
                args.extend([file.to_str().unwrap(), "-A", a]);
                (
                    a.to_string(),
                    env.run("nix-instantiate", &args).trim().to_string(),
                )
            })
            .collect()
    };
    // Realisation and path facts, as Nix reports them, for every derivation in the store:
    // the instantiated ones and the resolved ones the builds wrote.
    let facts = |env: &NixEnv, _: &BTreeMap<String, String>| -> Vec<String> {
        let mut out = Vec::new();
        let mut all: Vec<String> = std::fs::read_dir(env.store_dir())
            .unwrap()
            .map(|e| e.unwrap().path().to_string_lossy().into_owned())
            .filter(|p| p.ends_with(".drv"))
            .collect();
        all.sort();
        for a in &all {
            let mut args = feature.to_vec();
            args.extend(["realisation", "info", "--json", a]);
            let v: serde_json::Value = serde_json::from_str(&env.run("nix", &args)).unwrap();
            for r in v.as_array().unwrap() {
                let p = format!(
                    "{}/{}",
                    env.store_dir().display(),
                    r["outPath"].as_str().unwrap()
                );
                let info = env.run("nix", &["path-info", "--json", &p]);
                let info: serde_json::Value = serde_json::from_str(&info).unwrap();
                let i = &info[0];
                out.push(format!(
                    "{a} {} {p} {} {} {}",
                    r["id"], i["narHash"], i["ca"], i["references"]
                ));
            }
        }
        out.sort();
        out
    };
    let nix = NixEnv::at(&path);
    let drvs = instantiate(&nix);
    let mut args = feature.to_vec();
    args.extend(["--realise"]);
    args.extend(drvs.values().map(String::as_str));
    nix.run("nix-store", &args);
    let want = facts(&nix, &drvs);
    // 7 outputs of the instantiated derivations, 3 of the resolved ones.
    assert_eq!(want.len(), 10, "{want:?}");
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(&path)
        .status();
    drop(nix);
    let nix = NixEnv::at(&path);
    assert_eq!(
        instantiate(&nix),
        drvs,
        "the same .drv paths in the recreated store"
    );
    for a in attrs {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(nix.kiln_args())
            .args(["--option", "sandbox", "false"])
            .args(["build", "--no-out-link", &drvs[a]])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{a}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(facts(&nix, &drvs), want);
    assert_nix_verifies(&nix);
}
