//! Where settings come from: nix-daemon's own files for the nix layout.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn show(
    root: &std::path::Path,
    conf_dir: &std::path::Path,
    nix_config: Option<&str>,
    args: &[&str],
) -> (String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--root").arg(root).args(args);
    c.env("NIX_CONF_DIR", conf_dir).env_remove("NIX_CONFIG");
    for v in ["KILN_CONFIG", "KILN_LAYOUT", "KILN_MAX_JOBS", "KILN_CORES"] {
        c.env_remove(v);
    }
    c.env("XDG_CONFIG_HOME", root.join("no-xdg"));
    if let Some(t) = nix_config {
        c.env("NIX_CONFIG", t);
    }
    let o = c.arg("config").arg("show").arg("--json").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

fn value(json: &str, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v[name].as_str().unwrap().to_string()
}

#[test]
fn the_nix_layout_reads_nix_conf_dir_includes_and_nix_config() {
    let d = tempfile::tempdir().unwrap();
    let conf = d.path().join("etc-nix");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("nix.conf"),
        "max-jobs = 7\ninclude more.conf\n!include absent.conf\nplugin-files = /x.so\n",
    )
    .unwrap();
    std::fs::write(conf.join("more.conf"), "cores = 3\nplugin-files = /y.so\n").unwrap();
    let root = d.path().join("root");

    // With the nix layout: the file, its include, then $NIX_CONFIG over them.
    let (json, err) = show(
        &root,
        &conf,
        Some("cores = 5\nkeep-failed = true"),
        &["--layout", "nix"],
    );
    assert_eq!(value(&json, "max-jobs"), "7");
    assert_eq!(value(&json, "cores"), "5");
    assert_eq!(value(&json, "keep-failed"), "true");
    // An unknown setting (the evaluator's) is warned about once, wherever it appears.
    assert_eq!(
        err.matches("unknown setting 'plugin-files'").count(),
        1,
        "{err}"
    );
    // `--option` beats every file.
    let (json, _) = show(
        &root,
        &conf,
        None,
        &["--layout", "nix", "--option", "max-jobs", "2"],
    );
    assert_eq!(value(&json, "max-jobs"), "2");
    assert_eq!(value(&json, "cores"), "3");

    // A missing file is not an error.
    let (json, err) = show(&root, &d.path().join("nowhere"), None, &["--layout", "nix"]);
    assert_eq!(value(&json, "max-jobs"), "1");
    assert!(!err.contains("error"), "{err}");

    // Other layouts do not read nix-daemon's files.
    let (json, _) = show(&root, &conf, Some("cores = 5"), &["--layout", "user"]);
    assert_eq!(value(&json, "max-jobs"), "1");
    assert_eq!(value(&json, "cores"), "0");
}

/// No setting is a silent no-op: every one in kiln's tables is read somewhere outside the
/// tables (by name, as a string literal in the non-test sources of some crate other than
/// the protocol's, whose literals name wire fields: a `"verbosity"` there once passed for a
/// reader of a setting nothing read), except the
/// few listed here with the reason they have nothing to do in a daemon. A setting added to
/// a table and never wired in fails this test; so does one whose last reader goes.
#[test]
fn every_setting_in_the_table_is_read_somewhere() {
    const NOTHING_TO_DO: &[(&str, &str)] = &[(
        "allow-import-from-derivation",
        "the evaluator's: a daemon never evaluates (nix-daemon ignores it too)",
    )];
    fn sources(dir: &std::path::Path, out: &mut String) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let mut text = std::fs::read_to_string(&p).unwrap();
                // Unit tests name settings without acting on them.
                if let Some(at) = text.find("#[cfg(test)]\nmod tests") {
                    text.truncate(at);
                }
                // Each layer's table of its settings (`pub const SETTINGS: &[…] = &[…];`).
                while let Some(at) = text.find("pub const SETTINGS: &[") {
                    let end = text[at..].find("\n];").map_or(text.len(), |e| at + e + 3);
                    text.replace_range(at..end, "");
                }
                out.push_str(&text);
            }
        }
    }
    let root = kiln_testkit::workspace_root().join("crates");
    let mut text = String::new();
    for krate in std::fs::read_dir(&root).unwrap().flatten() {
        let src = krate.path().join("src");
        if src.is_dir() && !krate.path().ends_with("kiln-protocol") {
            sources(&src, &mut text);
        }
    }
    assert!(text.len() > 100_000, "the sources were not found");
    let unread: Vec<&str> = kiln_daemon::CATALOG
        .defs()
        .map(|d| d.name)
        .filter(|n| !NOTHING_TO_DO.iter().any(|(m, _)| m == n))
        .filter(|n| !text.contains(&format!("\"{n}\"")))
        .collect();
    assert!(
        unread.is_empty(),
        "settings in the table that nothing reads (wire them in, or list them with the reason): {unread:?}"
    );
    // The exceptions are still in the table (else the list is stale).
    for (n, why) in NOTHING_TO_DO {
        assert!(
            kiln_daemon::CATALOG.defs().any(|d| d.name == *n),
            "'{n}' ({why}) is no longer a setting"
        );
    }
}
