//! kiln opens a store that Nix 2.8 built, in place, and answers as `nix-store` does; what
//! kiln writes, Nix reads and verifies; closures move both ways through export/import.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use kiln_format::{FileIngestionMethod, HashAlgo, StoreDir};
use kiln_store::verify::{verify_store, VerifyOptions};
use kiln_store::{export, AddOptions, Layout, LocalStore, StoreOptions};
use kiln_testkit::{fixture, nix_or_skip, NixEnv};

fn open_nix_store(env: &NixEnv) -> LocalStore {
    let sd = StoreDir::new(env.store_dir().to_str().unwrap()).unwrap();
    let layout = Layout::new(sd, env.state_dir(), env.log_dir());
    LocalStore::open(layout, StoreOptions::default()).unwrap()
}

fn set(v: Vec<String>) -> BTreeSet<String> {
    v.into_iter().collect()
}

#[test]
fn kiln_reads_a_nix_store_like_nix_store_q() {
    if !nix_or_skip("kiln_reads_a_nix_store_like_nix_store_q") {
        return;
    }
    let env = NixEnv::new();
    let tops = env.build(&fixture("store.nix"), "top");
    let src = env.run(
        "nix-store",
        &["--add", fixture("store.nix").to_str().unwrap()],
    );
    let mut all = set(env.lines("nix-store", &["-qR", &tops[0]]));
    all.insert(src.trim().to_string());
    let drv = env.run("nix-store", &["-qd", &tops[0]]).trim().to_string();
    let store = open_nix_store(&env);
    let sd = store.store_dir().clone();
    for abs in &all {
        let p = sd.parse_path(abs).unwrap();
        let info = store.path_info(&p).unwrap();
        assert_eq!(
            info.nar_hash.to_string(),
            env.run("nix-store", &["-q", "--hash", abs]).trim(),
            "{abs}"
        );
        assert_eq!(
            info.nar_size.to_string(),
            env.run("nix-store", &["-q", "--size", abs]).trim()
        );
        let refs: BTreeSet<String> = info.references.iter().map(|r| sd.display(r)).collect();
        assert_eq!(
            refs,
            set(env.lines("nix-store", &["-q", "--references", abs])),
            "{abs}"
        );
        let referrers: BTreeSet<String> = store
            .query_referrers(&p)
            .unwrap()
            .iter()
            .map(|r| sd.display(r))
            .collect();
        assert_eq!(
            referrers,
            set(env.lines("nix-store", &["-q", "--referrers", abs])),
            "{abs}"
        );
        let deriver = info
            .deriver
            .map(|d| sd.display(&d))
            .unwrap_or_else(|| "unknown-deriver".into());
        assert_eq!(
            deriver,
            env.run("nix-store", &["-q", "--deriver", abs]).trim()
        );
        let closure: BTreeSet<String> = store
            .closure([&p], false)
            .unwrap()
            .iter()
            .map(|r| sd.display(r))
            .collect();
        assert_eq!(closure, set(env.lines("nix-store", &["-qR", abs])), "{abs}");
    }
    // Derivation outputs and derivers.
    let d = sd.parse_path(&drv).unwrap();
    let outs: BTreeSet<String> = store
        .query_derivation_outputs(&d)
        .unwrap()
        .values()
        .map(|p| sd.display(p))
        .collect();
    assert_eq!(
        outs,
        set(env.lines("nix-store", &["-q", "--outputs", &drv]))
    );
    let top = sd.parse_path(&tops[0]).unwrap();
    assert_eq!(
        store
            .query_valid_derivers(&top)
            .unwrap()
            .iter()
            .map(|p| sd.display(p))
            .collect::<Vec<_>>(),
        vec![drv.clone()]
    );
    let drv_closure: BTreeSet<String> = store
        .closure([&d], false)
        .unwrap()
        .iter()
        .map(|r| sd.display(r))
        .collect();
    assert_eq!(drv_closure, set(env.lines("nix-store", &["-qR", &drv])));
    // Hash-part lookup.
    assert_eq!(
        store.query_path_from_hash_part(top.hash_part()).unwrap(),
        Some(top.clone())
    );
    // Verification agrees the store is intact.
    let r = verify_store(
        &store,
        VerifyOptions {
            check_contents: true,
            repair: false,
        },
        None,
    )
    .unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    assert!(r.checked as usize >= all.len());
}

#[test]
fn nix_reads_and_verifies_what_kiln_writes() {
    if !nix_or_skip("nix_reads_and_verifies_what_kiln_writes") {
        return;
    }
    let env = NixEnv::new();
    env.build(&fixture("store.nix"), "leaf");
    let store = open_nix_store(&env);
    let sd = store.store_dir().clone();
    let text = store
        .add_text(
            "kiln-text",
            b"written by kiln\n",
            &BTreeSet::new(),
            AddOptions::default(),
        )
        .unwrap();
    let refs: BTreeSet<_> = [text.path.clone()].into();
    let text2 = store
        .add_text(
            "kiln-ref",
            format!("see {}\n", sd.display(&text.path)).as_bytes(),
            &refs,
            AddOptions::default(),
        )
        .unwrap();
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir(tree.path().join("d")).unwrap();
    std::fs::write(tree.path().join("d/f"), "contents").unwrap();
    std::os::unix::fs::symlink("f", tree.path().join("d/l")).unwrap();
    let added = store
        .add_path(
            tree.path(),
            "kiln-tree",
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
        )
        .unwrap();
    let flat = store
        .add_path(
            &tree.path().join("d/f"),
            "kiln-flat",
            FileIngestionMethod::Flat,
            HashAlgo::Sha1,
        )
        .unwrap();
    drop(store);
    // Nix computes the same paths for the same operations (and finds them already valid).
    let nix_tree = env.run("nix-store", &["--add", tree.path().to_str().unwrap()]);
    let kiln_tree_again = {
        let store = open_nix_store(&env);
        let name = tree
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let i = store
            .add_path(
                tree.path(),
                &name,
                FileIngestionMethod::Recursive,
                HashAlgo::Sha256,
            )
            .unwrap();
        sd.display(&i.path)
    };
    assert_eq!(nix_tree.trim(), kiln_tree_again);
    let nix_flat = env.run(
        "nix-store",
        &[
            "--add-fixed",
            "sha1",
            tree.path().join("d/f").to_str().unwrap(),
        ],
    );
    let flat_named_f = {
        let store = open_nix_store(&env);
        let i = store
            .add_path(
                &tree.path().join("d/f"),
                "f",
                FileIngestionMethod::Flat,
                HashAlgo::Sha1,
            )
            .unwrap();
        sd.display(&i.path)
    };
    assert_eq!(nix_flat.trim(), flat_named_f);
    // Nix checks every path's contents against kiln's database entries.
    let out = env
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-store --verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("modified"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for info in [&text, &text2, &added, &flat] {
        let abs = sd.display(&info.path);
        assert_eq!(
            env.run("nix-store", &["-q", "--hash", &abs]).trim(),
            info.nar_hash.to_string()
        );
        let refs: BTreeSet<String> = info.references.iter().map(|r| sd.display(r)).collect();
        assert_eq!(
            set(env.lines("nix-store", &["-q", "--references", &abs])),
            refs
        );
    }
    let ca = env.run("nix", &["path-info", "--json", &sd.display(&text2.path)]);
    assert!(ca.contains("\"ca\":\"text:sha256:"), "{ca}");
}

#[test]
fn export_import_both_ways() {
    if !nix_or_skip("export_import_both_ways") {
        return;
    }
    // Nix → kiln.
    let nix = NixEnv::new();
    let top = nix.build(&fixture("store.nix"), "top");
    let closure = nix.lines("nix-store", &["-qR", &top[0]]);
    let mut args = vec!["--export"];
    args.extend(closure.iter().map(String::as_str));
    let stream = nix.cmd("nix-store").args(&args).output().unwrap();
    assert!(stream.status.success());
    let kdir = tempfile::tempdir().unwrap();
    let sd = StoreDir::new(nix.store_dir().to_str().unwrap()).unwrap();
    let layout = Layout {
        store_dir: sd.clone(),
        real_store_dir: kdir.path().join("store"),
        state_dir: kdir.path().join("var"),
        log_dir: kdir.path().join("log"),
        guix: false,
    };
    let store = LocalStore::open(layout, StoreOptions::default()).unwrap();
    let imported = export::import_paths(&store, &mut stream.stdout.as_slice()).unwrap();
    assert_eq!(imported.len(), closure.len());
    for abs in &closure {
        let info = store.path_info(&sd.parse_path(abs).unwrap()).unwrap();
        assert_eq!(
            info.nar_hash.to_string(),
            nix.run("nix-store", &["-q", "--hash", abs]).trim()
        );
    }
    // kiln → Nix (a fresh Nix store with the same store directory name).
    let mut out = Vec::new();
    let set: BTreeSet<_> = imported.iter().cloned().collect();
    export::export_paths(&store, &set, &mut out).unwrap();
    assert_eq!(
        out, stream.stdout,
        "kiln's export of the same closure is byte-identical to Nix's"
    );
    let nix2 = NixEnv::new();
    let root = nix2.dir.path().join("root");
    let chroot = format!("local?root={}&store={}", root.display(), sd.as_str());
    let mut child = nix2
        .cmd("nix-store")
        .args(["--store", &chroot, "--import"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &out).unwrap();
    drop(child.stdin.take());
    let res = child.wait_with_output().unwrap();
    assert!(res.status.success());
    assert_eq!(
        String::from_utf8_lossy(&res.stdout).lines().count(),
        closure.len()
    );
    for abs in &closure {
        assert_eq!(
            nix2.run("nix-store", &["--store", &chroot, "-q", "--hash", abs])
                .trim(),
            nix.run("nix-store", &["-q", "--hash", abs]).trim()
        );
    }
    // Importing into a store with another store directory is refused.
    let k2 = tempfile::tempdir().unwrap();
    let store2 =
        LocalStore::open(Layout::under(k2.path()).unwrap(), StoreOptions::default()).unwrap();
    let e = export::import_paths(&store2, &mut out.as_slice())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not in the Nix store"), "{e}");
}
