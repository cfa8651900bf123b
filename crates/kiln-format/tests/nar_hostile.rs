//! Hostile NARs: every rejection the parser promises, and proof that restoring one never
//! creates anything outside the target (CVE-2024-45593, CVE-2026-44028).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use kiln_format::nar::{self, tree::Node, Limits};
use proptest::prelude::*;

/// A NAR assembled token by token.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn nar() -> Self {
        let mut r = Raw::default();
        r.s(b"nix-archive-1");
        r
    }
    fn s(&mut self, b: &[u8]) -> &mut Self {
        self.n(b.len() as u64);
        self.0.extend_from_slice(b);
        self.0.resize(self.0.len() + (8 - b.len() % 8) % 8, 0);
        self
    }
    fn n(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn toks(&mut self, toks: &[&str]) -> &mut Self {
        for t in toks {
            self.s(t.as_bytes());
        }
        self
    }
    fn file(&mut self, contents: &[u8]) -> &mut Self {
        self.toks(&["(", "type", "regular", "contents"])
            .s(contents)
            .toks(&[")"])
    }
    fn entry_file(&mut self, name: &[u8], contents: &[u8]) -> &mut Self {
        self.toks(&["entry", "(", "name"])
            .s(name)
            .toks(&["node"])
            .file(contents)
            .toks(&[")"])
    }
    fn entry_symlink(&mut self, name: &[u8], target: &[u8]) -> &mut Self {
        self.toks(&["entry", "(", "name"])
            .s(name)
            .toks(&["node", "(", "type", "symlink", "target"])
            .s(target)
            .toks(&[")", ")"])
    }
    fn dir(&mut self) -> &mut Self {
        self.toks(&["(", "type", "directory"])
    }
    fn end(&mut self) -> &mut Self {
        self.toks(&[")"])
    }
}

fn reject(nar: &[u8], want: &str) {
    let e = Node::from_nar(nar)
        .expect_err("parser accepted a bad NAR")
        .to_string();
    assert!(e.contains(want), "expected {want:?} in {e:?}");
    assert!(e.contains("at byte"), "error must carry the position: {e}");
    // Restoring must refuse it too, and create nothing beside the target.
    let dir = tempfile::tempdir().unwrap();
    let before = listing(dir.path());
    assert!(nar::restore(&dir.path().join("t"), nar).is_err());
    let after: Vec<String> = listing(dir.path())
        .into_iter()
        .filter(|p| !p.starts_with("t"))
        .collect();
    assert_eq!(
        before, after,
        "restore created something outside its target"
    );
}

fn listing(p: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    v.sort();
    v
}

#[test]
fn bad_entry_names() {
    for (name, want) in [
        (&b""[..], "empty"),
        (b".", "'.' and '..'"),
        (b"..", "'.' and '..'"),
        (b"a/b", "contains '/'"),
        (b"../../etc", "contains '/'"),
        (b"a\0b", "contains NUL"),
    ] {
        let mut r = Raw::nar();
        r.dir().entry_file(name, b"x").end();
        reject(&r.0, want);
    }
}

#[test]
fn duplicate_and_unsorted_entries() {
    let mut r = Raw::nar();
    r.dir().entry_file(b"a", b"1").entry_file(b"a", b"2").end();
    reject(&r.0, "duplicate entry");
    let mut r = Raw::nar();
    r.dir().entry_file(b"b", b"1").entry_file(b"a", b"2").end();
    reject(&r.0, "entries not sorted");
    // Byte order: "B" (0x42) sorts before "a" (0x61).
    let mut r = Raw::nar();
    r.dir().entry_file(b"a", b"1").entry_file(b"B", b"2").end();
    reject(&r.0, "entries not sorted");
}

#[test]
fn symlink_then_write_through_is_impossible() {
    // CVE-2024-45593: `x -> <outside>`, then a second `x` (a directory with a file in it).
    let outside = tempfile::tempdir().unwrap();
    let mut r = Raw::nar();
    r.dir()
        .entry_symlink(b"x", outside.path().to_str().unwrap().as_bytes());
    r.toks(&["entry", "(", "name"])
        .s(b"x")
        .toks(&["node"])
        .dir()
        .entry_file(b"pwned", b"!")
        .end()
        .end();
    r.end();
    reject(&r.0, "duplicate entry");
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "wrote through the symlink"
    );
}

#[test]
fn restore_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    std::fs::write(&t, "precious").unwrap();
    let nar = Node::file("new").to_nar();
    assert!(nar::restore(&t, nar.as_slice()).is_err());
    assert_eq!(std::fs::read_to_string(&t).unwrap(), "precious");
    // A symlink planted at the target is not followed.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let l = dir.path().join("l");
    std::os::unix::fs::symlink(&victim, &l).unwrap();
    assert!(nar::restore(&l, nar.as_slice()).is_err());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}

#[test]
fn unknown_and_misplaced_tags() {
    let mut r = Raw::nar();
    r.toks(&["(", "type", "fifo", ")"]);
    reject(&r.0, "unknown file type 'fifo'");
    let mut r = Raw::nar();
    r.toks(&["(", "kind", "regular"]);
    reject(&r.0, "expected 'type'");
    let mut r = Raw::nar();
    r.toks(&["(", "type", "regular", "executable", "yes", "contents"])
        .s(b"")
        .end();
    reject(&r.0, "'executable' marker");
    let mut r = Raw::nar();
    r.dir().toks(&["entri"]);
    reject(&r.0, "expected 'entry' or ')'");
    let mut r = Raw::default();
    r.s(b"nix-archive-2").file(b"x");
    reject(&r.0, "not a NAR");
}

#[test]
fn padding_must_be_zero() {
    let mut r = Raw::nar();
    r.file(b"abc");
    // Contents "abc" are at the end minus ")" token (16 bytes) minus 5 padding bytes.
    let n = r.0.len();
    r.0[n - 16 - 1] = 1;
    reject(&r.0, "non-zero padding");
    let mut r = Raw::nar();
    r.dir().entry_file(b"abc", b"").end();
    let pos = r.0.windows(3).position(|w| w == b"abc").unwrap();
    r.0[pos + 3] = 0xff;
    reject(&r.0, "non-zero padding");
}

#[test]
fn truncation_anywhere_is_an_error() {
    let mut tree = BTreeMap::new();
    tree.insert(b"f".to_vec(), Node::file("some contents"));
    tree.insert(
        b"l".to_vec(),
        Node::Symlink {
            target: b"f".to_vec(),
        },
    );
    let nar = Node::Directory(tree).to_nar();
    for cut in 0..nar.len() {
        let e = Node::from_nar(&nar[..cut]).unwrap_err().to_string();
        assert!(e.contains("unexpected end"), "cut {cut}: {e}");
    }
}

#[test]
fn absurd_lengths_are_refused_before_allocating() {
    // A name claiming 2^64 - 8 bytes (the Lix overflow) and a 10 MiB name.
    for len in [u64::MAX - 7, 10 << 20, 256] {
        let mut r = Raw::nar();
        r.dir().toks(&["entry", "(", "name"]).n(len);
        reject(&r.0, "entry name of");
    }
    // A 1 GiB symlink target, and one just over PATH_MAX.
    for len in [1u64 << 30, 4096] {
        let mut r = Raw::nar();
        r.toks(&["(", "type", "symlink", "target"]).n(len);
        reject(&r.0, "symlink target of");
    }
    // A huge first tag.
    let mut r = Raw::default();
    r.n(u64::MAX);
    reject(&r.0, "not a NAR");
    let mut r = Raw::nar();
    r.toks(&["("]).n(1 << 40);
    reject(&r.0, "tag of");
    // File contents longer than the stream.
    let mut r = Raw::nar();
    r.toks(&["(", "type", "regular", "contents"]).n(u64::MAX);
    r.0.extend_from_slice(b"short");
    reject(&r.0, "unexpected end of archive inside file contents");
}

#[test]
fn bad_symlink_targets() {
    let mut r = Raw::nar();
    r.toks(&["(", "type", "symlink", "target"]).s(b"").end();
    reject(&r.0, "empty symlink target");
    let mut r = Raw::nar();
    r.toks(&["(", "type", "symlink", "target"]).s(b"a\0b").end();
    reject(&r.0, "symlink target contains NUL");
}

#[test]
fn deep_nesting_is_bounded() {
    // 100,000 nested directories: refused at the limit, no stack overflow.
    let mut r = Raw::nar();
    for _ in 0..100_000 {
        r.dir().toks(&["entry", "(", "name", "d", "node"]);
    }
    reject(&r.0, "nested deeper than 256");
    // Exactly at the limit is fine.
    let limits = Limits::default();
    let mut r = Raw::nar();
    for _ in 0..limits.max_depth - 1 {
        r.dir().toks(&["entry", "(", "name", "d", "node"]);
    }
    r.dir().end();
    for _ in 0..limits.max_depth - 1 {
        r.toks(&[")", ")"]);
    }
    assert!(Node::from_nar(r.0.as_slice()).is_ok());
}

#[test]
fn trailing_data_is_detected() {
    let mut nar = Node::file("x").to_nar();
    let len = nar.len() as u64;
    nar.extend_from_slice(b"garbage!");
    let mut r = nar.as_slice();
    let stats = nar::parse(&mut r, &mut (), Limits::default()).unwrap();
    assert_eq!(stats.size, len);
    let e = nar::expect_eof(r, stats.size).unwrap_err().to_string();
    assert!(
        e.contains("trailing data") && e.contains(&format!("at byte {len}")),
        "{e}"
    );
}

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 1..12).prop_filter("valid name", |n| {
        n != b"." && n != b".." && !n.contains(&b'/') && !n.contains(&0)
    })
}

fn arb_tree() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40)).prop_map(
            |(executable, contents)| Node::File {
                executable,
                contents
            }
        ),
        proptest::collection::vec(1u8..=255, 1..30).prop_map(|target| Node::Symlink { target }),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        proptest::collection::btree_map(arb_name(), inner, 0..6).prop_map(Node::Directory)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn nar_round_trip(tree in arb_tree()) {
        let nar = tree.to_nar();
        prop_assert_eq!(Node::from_nar(nar.as_slice()).unwrap(), tree.clone());
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        let stats = nar::restore(&t, nar.as_slice()).unwrap();
        prop_assert_eq!(stats.size, nar.len() as u64);
        prop_assert_eq!(nar::dump_to_vec(&t).unwrap(), nar);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Node::from_nar(bytes.as_slice());
    }

    #[test]
    fn mutated_nars_never_panic(tree in arb_tree(), pos in any::<usize>(), val in any::<u8>()) {
        let mut nar = tree.to_nar();
        let i = pos % nar.len();
        nar[i] = val;
        let _ = Node::from_nar(nar.as_slice());
    }
}
