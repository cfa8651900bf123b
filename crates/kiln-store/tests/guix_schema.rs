//! A Guix database (schema 7: no `ultimate`, `sigs`, `ca`; with `FailedPaths`) is opened and
//! written in place and stays a valid Guix database.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use kiln_format::{Hash, StoreDir, StorePath};
use kiln_store::db::{Flavor, GUIX_SCHEMA};
use kiln_store::{AddOptions, Layout, LocalStore, StoreOptions};

#[test]
fn a_guix_database_is_used_in_place() {
    let d = tempfile::tempdir().unwrap();
    let sd = StoreDir::new(d.path().join("gnu/store").to_str().unwrap()).unwrap();
    let layout = Layout::new(
        sd.clone(),
        d.path().join("var/guix"),
        d.path().join("var/log/guix"),
    );
    std::fs::create_dir_all(&layout.real_store_dir).unwrap();
    std::fs::create_dir_all(layout.db_dir()).unwrap();
    // The database as guix-daemon creates it, with one path registered the way Guix does.
    let existing = StorePath::from_parts(&[5u8; 20], "guix-made").unwrap();
    std::fs::write(layout.real_path(&existing), "made by guix").unwrap();
    let mut nar = Vec::new();
    kiln_format::nar::dump(&layout.real_path(&existing), &mut nar).unwrap();
    {
        let c = rusqlite::Connection::open(layout.db_dir().join("db.sqlite")).unwrap();
        c.execute_batch(GUIX_SCHEMA).unwrap();
        c.execute(
            "insert into ValidPaths (path, hash, registrationTime, deriver, narSize) values (?, ?, 1700000000, null, ?)",
            rusqlite::params![sd.display(&existing), format!("sha256:{}", Hash::sha256(&nar).to_base16()), nar.len() as i64],
        )
        .unwrap();
    }
    std::fs::write(layout.db_dir().join("schema"), "7").unwrap();

    let store = LocalStore::open(
        layout.clone(),
        StoreOptions {
            runtime_roots: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(store.db().flavor, Flavor::Guix);
    assert_eq!(store.db().schema_version, 7);
    let info = store.path_info(&existing).unwrap();
    assert_eq!(info.nar_size, nar.len() as u64);
    assert!(info.ca.is_none() && info.sigs.is_empty() && !info.ultimate);
    // Writes work without the Nix-only columns.
    let t = store
        .add_text(
            "from-kiln",
            b"hi",
            &[existing.clone()].into(),
            AddOptions::default(),
        )
        .unwrap();
    assert!(store.is_valid(&t.path).unwrap());
    // Failure caching uses Guix's own table.
    store.register_failed(&existing).unwrap();
    assert!(store.has_failed(&existing).unwrap());
    store.clear_failed_paths(None).unwrap();
    assert!(!store.has_failed(&existing).unwrap());
    drop(store);
    // Still schema 7, and no column was added.
    assert_eq!(
        std::fs::read_to_string(layout.db_dir().join("schema")).unwrap(),
        "7"
    );
    let c = rusqlite::Connection::open(layout.db_dir().join("db.sqlite")).unwrap();
    let cols: BTreeSet<String> = c
        .prepare("pragma table_info(ValidPaths)")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(1))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        cols,
        [
            "deriver",
            "hash",
            "id",
            "narSize",
            "path",
            "registrationTime"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    );
}

#[test]
fn a_new_guix_layout_store_gets_the_guix_schema() {
    let d = tempfile::tempdir().unwrap();
    let layout = Layout::new(
        StoreDir::new("/gnu/store").unwrap(),
        d.path().join("var"),
        d.path().join("log"),
    );
    let layout = Layout {
        real_store_dir: d.path().join("store"),
        ..layout
    };
    let opts = StoreOptions::from_settings(
        &kiln_store::Settings::new(kiln_store::config::STORE_CATALOG),
        &layout,
    );
    let store = LocalStore::open(layout.clone(), opts).unwrap();
    assert_eq!(store.db().flavor, Flavor::Guix);
    assert_eq!(
        std::fs::read_to_string(layout.db_dir().join("schema")).unwrap(),
        "7"
    );
}

#[test]
fn schema_versions_kiln_cannot_use_are_refused() {
    for (v, want) in [
        ("5", "before Nix 1.0"),
        ("11", "only supports versions 7"),
        ("x", "is corrupt"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::under(d.path()).unwrap();
        std::fs::create_dir_all(layout.db_dir()).unwrap();
        std::fs::write(layout.db_dir().join("schema"), v).unwrap();
        let e = LocalStore::open(layout, StoreOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{v}: {e}");
    }
}
