//! Bad input to the store: each is refused with a clear error and leaves the store as it was.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use kiln_format::nar::tree::Node;
use kiln_format::{Hash, StorePath, ValidPathInfo};
use kiln_store::{export, AddOptions, Layout, LocalStore, StoreOptions};

fn new_store(dir: &std::path::Path) -> LocalStore {
    LocalStore::open(
        Layout::under(dir).unwrap(),
        StoreOptions {
            runtime_roots: false,
            ..Default::default()
        },
    )
    .unwrap()
}

fn listing(s: &LocalStore) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&s.layout().real_store_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    v.sort();
    v
}

fn info_for(nar: &[u8], name: &str) -> ValidPathInfo {
    let p = StorePath::from_parts(&[9u8; 20], name).unwrap();
    ValidPathInfo::new(p, Hash::sha256(nar), nar.len() as u64)
}

#[test]
fn corrupt_truncated_and_mismatched_nars() {
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let before = listing(&s);
    let nar = Node::file("hello").to_nar();
    let info = info_for(&nar, "x");
    // Truncated.
    let e = s
        .add_nar(&info, &mut &nar[..nar.len() - 9], AddOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unexpected end of archive"), "{e}");
    // Corrupt (a byte of the type tag changed).
    let mut bad = nar.clone();
    bad[40] ^= 1;
    let e = s
        .add_nar(&info, &mut bad.as_slice(), AddOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad archive at byte"), "{e}");
    // Well-formed but not what the info claims.
    let other = Node::file("goodbye").to_nar();
    let e = s
        .add_nar(&info, &mut other.as_slice(), AddOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hash mismatch for") && e.contains("expected sha256:"),
        "{e}"
    );
    assert!(!s.is_valid(&info.path).unwrap());
    assert_eq!(listing(&s), before, "failed adds left files in the store");
    // The right one works.
    s.add_nar(&info, &mut nar.as_slice(), AddOptions::default())
        .unwrap();
    assert!(s.is_valid(&info.path).unwrap());
}

#[test]
fn repair_verifies_before_replacing() {
    // CVE-2026-110450: a repair with bad contents must not destroy the old path.
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let nar = Node::file("original").to_nar();
    let info = info_for(&nar, "r");
    s.add_nar(&info, &mut nar.as_slice(), AddOptions::default())
        .unwrap();
    let wrong = Node::file("evil").to_nar();
    assert!(s
        .add_nar(
            &info,
            &mut wrong.as_slice(),
            AddOptions {
                repair: true,
                ..Default::default()
            }
        )
        .is_err());
    assert_eq!(
        std::fs::read_to_string(s.real_path(&info.path)).unwrap(),
        "original"
    );
    // A good repair replaces a damaged copy atomically.
    let real = s.real_path(&info.path);
    let _ = std::process::Command::new("chmod")
        .arg("u+w")
        .arg(&real)
        .status();
    std::fs::write(&real, "damaged!").unwrap();
    s.add_nar(
        &info,
        &mut nar.as_slice(),
        AddOptions {
            repair: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(&real).unwrap(), "original");
}

#[test]
fn bad_export_streams() {
    let d = tempfile::tempdir().unwrap();
    let src = new_store(&d.path().join("a"));
    let a = src
        .add_text("a", b"a", &BTreeSet::new(), AddOptions::default())
        .unwrap()
        .path;
    let b = src
        .add_text(
            "b",
            src.print(&a).as_bytes(),
            &[a.clone()].into(),
            AddOptions::default(),
        )
        .unwrap()
        .path;
    let mut stream = Vec::new();
    export::export_paths(&src, &[a.clone(), b.clone()].into(), &mut stream).unwrap();
    // Same store directory, other physical location.
    let dst_layout = Layout {
        real_store_dir: d.path().join("b/store"),
        state_dir: d.path().join("b/var"),
        log_dir: d.path().join("b/log"),
        ..src.layout().clone()
    };
    let dst = LocalStore::open(
        dst_layout,
        StoreOptions {
            runtime_roots: false,
            ..Default::default()
        },
    )
    .unwrap();
    let before = listing(&dst);
    // Only `b`, whose reference `a` is missing: refused.
    let mut only_b = Vec::new();
    export::export_paths(&src, &[b.clone()].into(), &mut only_b).unwrap();
    let e = export::import_paths(&dst, &mut only_b.as_slice())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is not valid") && e.contains("reference of imported path"),
        "{e}"
    );
    // An invalid path name in the trailer.
    let mut renamed = only_b.clone();
    let pos = renamed.windows(2).rposition(|w| w == b"-b").unwrap();
    renamed[pos + 1] = b' ';
    assert!(export::import_paths(&dst, &mut renamed.as_slice()).is_err());
    for cut in [3, 8, 100, stream.len() / 2, stream.len() - 1] {
        assert!(
            export::import_paths(&dst, &mut &stream[..cut]).is_err(),
            "cut {cut}"
        );
    }
    assert!(
        export::import_paths(&dst, &mut &[7u8, 0, 0, 0, 0, 0, 0, 0][..])
            .unwrap_err()
            .to_string()
            .contains("doesn't look like")
    );
    // Entries completed before the damage stay valid, and are complete and correct; nothing
    // else is left behind.
    let valid_now: Vec<_> = dst.query_all_valid_paths().unwrap().into_iter().collect();
    assert!(valid_now.iter().all(|p| p == &a || p == &b));
    let report = kiln_store::verify::verify_store(
        &dst,
        kiln_store::verify::VerifyOptions {
            check_contents: true,
            repair: false,
        },
        None,
    )
    .unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let mut leftover = listing(&dst);
    leftover.retain(|n| !valid_now.iter().any(|p| p.base_name() == n));
    assert_eq!(leftover, before, "failed imports left files in the store");
    export::import_paths(&dst, &mut stream.as_slice()).unwrap();
    assert!(dst.is_valid(&b).unwrap());
}

#[test]
fn registration_checks_references_cycles_and_derivations() {
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let x = StorePath::from_parts(&[1u8; 20], "x").unwrap();
    let y = StorePath::from_parts(&[2u8; 20], "y").unwrap();
    for p in [&x, &y] {
        std::fs::write(s.real_path(p), "z").unwrap();
    }
    let h = Hash::sha256(b"whatever");
    let mut ix = ValidPathInfo::new(x.clone(), h, 1);
    let missing = StorePath::from_parts(&[3u8; 20], "missing").unwrap();
    ix.references.insert(missing.clone());
    let e = s
        .register_valid_paths(&[ix.clone()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is not valid") && e.contains("referenced by"),
        "{e}"
    );
    assert!(!s.is_valid(&x).unwrap());
    // x → y → x.
    ix.references = [y.clone()].into();
    let mut iy = ValidPathInfo::new(y.clone(), h, 1);
    iy.references = [x.clone()].into();
    let e = s.register_valid_paths(&[ix, iy]).unwrap_err().to_string();
    assert!(e.contains("cycle detected"), "{e}");
    assert!(!s.is_valid(&y).unwrap());
    // A .drv whose declared output is wrong cannot become valid.
    let sd = s.store_dir().clone();
    let fake_out = format!("{}/{}", sd, StorePath::from_parts(&[4u8; 20], "d").unwrap());
    let drv = format!("Derive([(\"out\",\"{fake_out}\",\"\",\"\")],[],[],\"x86_64-linux\",\"/bin/sh\",[],[(\"out\",\"{fake_out}\")])");
    let e = s
        .add_text(
            "d.drv",
            drv.as_bytes(),
            &BTreeSet::new(),
            AddOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("incorrect output 'out'"), "{e}");
    assert!(s.query_all_valid_paths().unwrap().is_empty());
}

#[test]
fn invalid_names_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    for name in ["", "a b", "../x", "x/y", &"n".repeat(212)] {
        assert!(
            s.add_text(name, b"t", &BTreeSet::new(), AddOptions::default())
                .is_err(),
            "{name:?}"
        );
    }
    assert!(s
        .parse_path(&format!("{}/not-a-store-path", s.store_dir()))
        .is_err());
}

#[test]
fn content_address_must_match_the_contents() {
    // Nix's substitute-with-invalid-ca: a narinfo with one path's CA and another path's
    // NAR (whose NarHash it carries, so the NAR hash checks out).
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let sd = s.store_dir().clone();
    let before = listing(&s);
    let good = b"I am a good path\n";
    let ca = kiln_format::ContentAddress::Text(Hash::sha256(good));
    let path = sd
        .ca_path("good.txt", &ca, &BTreeSet::new(), false)
        .unwrap();
    let bad_nar = Node::file("I am a bad path\n").to_nar();
    let mut info = ValidPathInfo::new(path.clone(), Hash::sha256(&bad_nar), bad_nar.len() as u64);
    info.ca = Some(ca);
    let e = s
        .add_nar(&info, &mut bad_nar.as_slice(), AddOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca hash mismatch importing path"), "{e}");
    assert!(!s.is_valid(&path).unwrap());
    assert_eq!(
        listing(&s),
        before,
        "the refused path left files in the store"
    );
    // The honest NAR is accepted.
    let good_nar = Node::file(std::str::from_utf8(good).unwrap()).to_nar();
    let mut info = ValidPathInfo::new(path.clone(), Hash::sha256(&good_nar), good_nar.len() as u64);
    info.ca = Some(ca);
    s.add_nar(&info, &mut good_nar.as_slice(), AddOptions::default())
        .unwrap();
    assert!(s.is_valid(&path).unwrap());
}

#[test]
fn a_flat_content_address_is_never_checked_through_a_symlink() {
    // A NAR that is only a symlink to a file outside the store, whose bytes do match the
    // claimed flat hash: accepting it would make the store path's contents whatever that
    // outside file later says.
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let sd = s.store_dir().clone();
    let outside = d.path().join("outside");
    let tarball = b"the real tarball\n";
    std::fs::write(&outside, tarball).unwrap();
    let before = listing(&s);
    for ca in [
        kiln_format::ContentAddress::Fixed(
            kiln_format::FileIngestionMethod::Flat,
            Hash::sha256(tarball),
        ),
        kiln_format::ContentAddress::Text(Hash::sha256(tarball)),
    ] {
        let path = sd.ca_path("src.tar", &ca, &BTreeSet::new(), false).unwrap();
        let nar = Node::Symlink {
            target: outside.to_str().unwrap().as_bytes().to_vec(),
        }
        .to_nar();
        let mut info = ValidPathInfo::new(path.clone(), Hash::sha256(&nar), nar.len() as u64);
        info.ca = Some(ca);
        let e = s
            .add_nar(&info, &mut nar.as_slice(), AddOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a symlink"), "{e}");
        assert!(!s.is_valid(&path).unwrap());
        assert_eq!(listing(&s), before, "the refused path left files behind");
    }
}
