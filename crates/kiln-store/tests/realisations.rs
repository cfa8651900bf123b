//! Realisations (content-addressed derivations) in the store: Nix's tables and marker file,
//! what a second registration may and may not change, dependencies that must exist, and
//! rows that go with the path they name.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use kiln_format::realisation::{DrvOutput, Realisation};
use kiln_format::signature::SecretKey;
use kiln_format::{Hash, StorePath};
use kiln_store::{AddOptions, Layout, LocalStore, StoreOptions};

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

fn text(s: &LocalStore, name: &str, refs: &[&StorePath]) -> StorePath {
    let refs: BTreeSet<StorePath> = refs.iter().map(|p| (*p).clone()).collect();
    s.add_text(name, name.as_bytes(), &refs, AddOptions::default())
        .unwrap()
        .path
}

fn id(n: u8, out: &str) -> DrvOutput {
    DrvOutput::new(Hash::sha256(&[n]), out)
}

#[test]
fn realisations_are_recorded_once_and_never_changed() {
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    // Nix's marker: the realisations schema is version 3.
    let marker = s.layout().state_dir.join("db/ca-schema");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "3");
    let a = text(&s, "a", &[]);
    let b = text(&s, "b", &[&a]);
    assert_eq!(s.query_realisation(&id(1, "out")).unwrap(), None);

    let ra = Realisation::new(id(1, "out"), a.clone());
    s.register_realisation(&ra).unwrap();
    assert_eq!(
        s.query_realisation(&id(1, "out")).unwrap(),
        Some(ra.clone())
    );

    // Another path for the same output is refused, naming both.
    let e = s
        .register_realisation(&Realisation::new(id(1, "out"), b.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already have another one") && e.contains("-b"),
        "{e}"
    );
    // The same one again, signed: the signature is added.
    let key = SecretKey::generate("test-1").unwrap();
    let mut signed = ra.clone();
    signed.sign(&key);
    s.register_realisation(&signed).unwrap();
    let got = s.query_realisation(&id(1, "out")).unwrap().unwrap();
    assert!(got.verify(&[key.public()]), "{got:?}");

    // Dependencies must be known, with the same path.
    let mut rb = Realisation::new(id(2, "out"), b.clone());
    rb.dependent.insert(id(3, "out"), a.clone());
    let e = s.register_realisation(&rb).unwrap_err().to_string();
    assert!(e.contains("non existent"), "{e}");
    rb.dependent.clear();
    rb.dependent.insert(id(1, "out"), b.clone());
    let e = s.register_realisation(&rb).unwrap_err().to_string();
    assert!(e.contains("depends on"), "{e}");
    rb.dependent.clear();
    rb.dependent.insert(id(1, "out"), a.clone());
    s.register_realisation(&rb).unwrap();
    assert_eq!(s.query_realisation(&id(2, "out")).unwrap(), Some(rb));

    // An output that is not valid cannot be realised.
    let missing = StorePath::from_parts(&[7u8; 20], "missing").unwrap();
    let e = s
        .register_realisation(&Realisation::new(id(4, "out"), missing))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not valid"), "{e}");

    // A realisation goes with its path.
    s.delete_paths(std::slice::from_ref(&b)).unwrap();
    assert_eq!(s.query_realisation(&id(2, "out")).unwrap(), None);
    assert!(s.query_realisation(&id(1, "out")).unwrap().is_some());
}
