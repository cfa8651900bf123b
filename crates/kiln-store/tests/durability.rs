//! Durability marks (see `kiln_store`'s `durability` module): registered paths are made
//! durable in the background; after an unclean end the paths still marked are checked
//! against their NAR hashes before the store is used, and those whose contents did not
//! reach the disk go, with what refers to them. Here the unclean end is made by hand: the
//! marks a crash would leave are written into the database, and the contents a power loss
//! would lose are truncated.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use kiln_format::{StoreDir, StorePath};
use kiln_store::{AddOptions, Layout, LocalStore, StoreOptions};

fn layout(d: &std::path::Path) -> Layout {
    let sd = StoreDir::new(d.join("store").to_str().unwrap()).unwrap();
    Layout::new(sd, d.join("state"), d.join("log"))
}

fn marks(l: &Layout) -> Vec<String> {
    let c = rusqlite::Connection::open(l.db_dir().join("db.sqlite")).unwrap();
    let mut st = c
        .prepare("select path from KilnUnsynced order by id")
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn mark(l: &Layout, paths: &[&str]) {
    let c = rusqlite::Connection::open(l.db_dir().join("db.sqlite")).unwrap();
    for p in paths {
        c.execute("insert into KilnUnsynced (path) values (?)", [p])
            .unwrap();
    }
}

fn add(s: &LocalStore, name: &str, text: &str, refs: &[&StorePath]) -> StorePath {
    let refs: BTreeSet<StorePath> = refs.iter().map(|r| (*r).clone()).collect();
    s.add_text(name, text.as_bytes(), &refs, AddOptions::default())
        .unwrap()
        .path
}

#[test]
fn registered_paths_are_made_durable_and_their_marks_cleared() {
    let d = tempfile::tempdir().unwrap();
    let l = layout(d.path());
    let s = LocalStore::open(l.clone(), StoreOptions::default()).unwrap();
    for i in 0..50 {
        add(&s, &format!("p{i}"), &format!("contents {i}"), &[]);
    }
    s.flush_durability().unwrap();
    assert!(marks(&l).is_empty(), "{:?}", marks(&l));
    drop(s);
    // Closing cleanly leaves none either.
    let s = LocalStore::open(l.clone(), StoreOptions::default()).unwrap();
    add(&s, "last", "the last one", &[]);
    drop(s);
    assert!(marks(&l).is_empty());
}

#[test]
fn after_an_unclean_end_paths_whose_contents_were_lost_go_with_their_referrers() {
    let d = tempfile::tempdir().unwrap();
    let l = layout(d.path());
    let s = LocalStore::open(l.clone(), StoreOptions::default()).unwrap();
    let kept = add(&s, "kept", "made it to the disk", &[]);
    let lost = add(&s, "lost", "did not make it", &[]);
    let referrer = add(
        &s,
        "referrer",
        &format!("refers to {}", s.print(&lost)),
        &[&lost],
    );
    let old = add(&s, "old", "made durable long ago", &[]);
    drop(s);
    // What a power loss between registration and sync leaves: the marks, and a file whose
    // contents never reached the disk.
    let p = |x: &StorePath| l.store_dir.display(x);
    mark(&l, &[&p(&kept), &p(&lost), &p(&referrer)]);
    std::fs::write(l.real_path(&lost), "").unwrap();
    let s = LocalStore::open(l.clone(), StoreOptions::default()).unwrap();
    assert!(s.is_valid(&kept).unwrap());
    assert!(s.is_valid(&old).unwrap());
    assert!(!s.is_valid(&lost).unwrap());
    assert!(
        !s.is_valid(&referrer).unwrap(),
        "a referrer of a lost path goes too"
    );
    assert!(!l.real_path(&lost).exists());
    assert!(!l.real_path(&referrer).exists());
    assert!(marks(&l).is_empty());
    // The store is whole again: every valid path's contents match.
    let report = kiln_store::verify::verify_store(
        &s,
        kiln_store::verify::VerifyOptions {
            check_contents: true,
            repair: false,
        },
        None,
    )
    .unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn marks_of_a_live_process_are_not_recovered_by_another() {
    let d = tempfile::tempdir().unwrap();
    let l = layout(d.path());
    let owner = LocalStore::open(l.clone(), StoreOptions::default()).unwrap();
    let p = add(&owner, "in-flight", "written, not yet durable", &[]);
    owner.flush_durability().unwrap();
    // As if the owner had marked it and not synced yet, and another process opens the
    // store meanwhile (with contents that do not match, it would invalidate the path).
    mark(&l, &[&l.store_dir.display(&p)]);
    std::fs::write(l.real_path(&p), "changed under the owner's feet").unwrap();
    let other = LocalStore::open(l.clone(), StoreOptions::default()).unwrap();
    assert!(
        other.is_valid(&p).unwrap(),
        "another process took the owner's marks"
    );
    drop(other);
    drop(owner);
    // The owner gone, the next opening checks the marks it left.
    let next = LocalStore::open(l.clone(), StoreOptions::default()).unwrap();
    assert!(!next.is_valid(&p).unwrap());
}
