//! Git hashing against Git itself: random trees (files, executables, links, nested
//! directories, names that sort differently as directories) hashed by `kiln_format::git`
//! and by `git add` + `git rev-parse HEAD:tree` in SHA-1 and SHA-256 repositories.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use kiln_format::{git, HashAlgo};
use proptest::prelude::*;

fn has_git() -> bool {
    Command::new("git")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["-c", "user.name=kiln", "-c", "user.email=kiln@localhost"])
        .args(["-c", "core.fileMode=true", "-c", "core.symlinks=true"])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A file system tree to make: Git cannot hold an empty directory, so none is made.
#[derive(Debug, Clone)]
enum Node {
    File(Vec<u8>, bool),
    Link(String),
    Dir(Vec<(String, Node)>),
}

fn name() -> impl Strategy<Value = String> {
    // Names that Git orders differently as directories (compared as if ending in `/`,
    // which sorts after `-` and `.` and before `0`), so that they meet as both.
    proptest::sample::select(vec!["a", "a.b", "a-b", "a0", "a.", "ab", "b"]).prop_map(String::from)
}

fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (proptest::collection::vec(any::<u8>(), 0..64), any::<bool>())
            .prop_map(|(b, x)| Node::File(b, x)),
        "[a-z./]{1,12}".prop_map(Node::Link),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        proptest::collection::btree_map(name(), inner, 1..5)
            .prop_map(|m| Node::Dir(m.into_iter().collect()))
    })
}

fn make(path: &Path, n: &Node) {
    match n {
        Node::File(b, x) => {
            std::fs::write(path, b).unwrap();
            let mode = if *x { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        Node::Link(t) => std::os::unix::fs::symlink(t, path).unwrap(),
        Node::Dir(entries) => {
            std::fs::create_dir(path).unwrap();
            for (name, child) in entries {
                make(&path.join(name), child);
            }
        }
    }
}

/// A directory holding only directories that end empty would be no tree to Git.
fn has_leaf(n: &Node) -> bool {
    match n {
        Node::Dir(e) => e.iter().all(|(_, c)| has_leaf(c)),
        _ => true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn object_ids_are_gits(top in node().prop_filter("no empty directory", has_leaf)) {
        if !has_git() {
            // CI has Git (it cloned the repository); elsewhere the test says it skipped.
            assert!(std::env::var_os("KILN_REQUIRE_NIX").is_none(), "no git here");
            eprintln!("object_ids_are_gits: skipped, no git here");
            return Ok(());
        }
        for (algo, format) in [(HashAlgo::Sha1, "sha1"), (HashAlgo::Sha256, "sha256")] {
            let dir = tempfile::tempdir().unwrap();
            let repo = dir.path().join("repo");
            std::fs::create_dir(&repo).unwrap();
            run_git(&repo, &["init", "-q", &format!("--object-format={format}")]);
            let tree = repo.join("tree");
            make(&tree, &top);
            run_git(&repo, &["add", "tree"]);
            run_git(&repo, &["commit", "-q", "-m", "x"]);
            let want = run_git(&repo, &["rev-parse", "HEAD:tree"]);
            let got = git::hash_path(&tree, algo).unwrap().to_base16();
            prop_assert_eq!(got, want, "{:?} with {}", &top, format);
        }
    }
}

/// A FIFO has no Git object: refused, not waited on.
#[test]
fn special_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    std::fs::create_dir(&t).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        t.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let e = git::hash_path(&t, HashAlgo::Sha1).unwrap_err().to_string();
    assert!(
        e.contains("/t/fifo")
            && e.contains("can only be a regular file, a symbolic link or a directory"),
        "{e}"
    );
}

/// A tree deeper than any NAR may be is refused, not walked until the stack runs out.
#[test]
fn absurdly_deep_trees_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = dir.path().join("t");
    std::fs::create_dir(&p).unwrap();
    let top = p.clone();
    for _ in 0..=git::MAX_DEPTH {
        p.push("d");
        std::fs::create_dir(&p).unwrap();
    }
    std::fs::write(p.join("f"), "x").unwrap();
    let e = git::hash_path(&top, HashAlgo::Sha1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nested more than 256 deep"), "{e}");
}
