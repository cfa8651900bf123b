//! The garbage collector: roots of every kind, deletion order, specific deletion, limits,
//! leftovers, and roots that arrive while it runs.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};

use kiln_format::StorePath;
use kiln_store::gc::{collect_garbage, GcAction, GcOptions};
use kiln_store::{roots, AddOptions, Layout, LocalStore, StoreOptions};

fn new_store(dir: &std::path::Path) -> LocalStore {
    let opts = StoreOptions {
        runtime_roots: false,
        ..Default::default()
    };
    LocalStore::open(Layout::under(dir).unwrap(), opts).unwrap()
}

fn text(store: &LocalStore, name: &str, body: &str, refs: &[&StorePath]) -> StorePath {
    let refs: BTreeSet<StorePath> = refs.iter().map(|r| (*r).clone()).collect();
    let p = store
        .add_text(name, body.as_bytes(), &refs, AddOptions::default())
        .unwrap()
        .path;
    // Drop the caller's temp root: these tests decide liveness by other roots.
    store.remove_temp_root(&p);
    p
}

fn gc(store: &LocalStore, action: GcAction) -> Vec<String> {
    collect_garbage(
        store,
        &GcOptions {
            action,
            max_freed: u64::MAX,
            ..Default::default()
        },
    )
    .unwrap()
    .paths
}

#[test]
fn permanent_and_indirect_roots_keep_closures() {
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let a = text(&s, "a", "a", &[]);
    let b = text(&s, "b", &format!("b -> {}", s.print(&a)), &[&a]);
    let c = text(&s, "c", "c", &[]);
    let e = text(&s, "e", "e", &[]);
    roots::add_perm_root(s.layout(), &b, &s.layout().gcroots_dir().join("my-root")).unwrap();
    // An indirect root: a `result`-style link outside the state directory.
    let result = d.path().join("result");
    roots::add_perm_root(s.layout(), &e, &result).unwrap();
    let dead = gc(&s, GcAction::ReturnDead);
    assert_eq!(dead, vec![s.print(&c)]);
    let live = gc(&s, GcAction::ReturnLive);
    assert_eq!(live.len(), 3);
    let deleted = gc(&s, GcAction::DeleteDead);
    assert_eq!(deleted, vec![s.print(&c)]);
    assert!(!s.real_path(&c).exists());
    for p in [&a, &b, &e] {
        assert!(s.is_valid(p).unwrap() && s.real_path(p).exists());
    }
    // Removing the indirect root's link makes `e` collectable and the stale auto link goes.
    std::fs::remove_file(&result).unwrap();
    assert_eq!(gc(&s, GcAction::DeleteDead), vec![s.print(&e)]);
    assert_eq!(
        std::fs::read_dir(s.layout().gcroots_dir().join("auto"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn own_temp_roots_and_other_processes_temp_roots_are_respected() {
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let mine = text(&s, "mine", "1", &[]);
    s.add_temp_root(&mine).unwrap();
    let theirs = text(&s, "theirs", "2", &[]);
    // Another process holds a temp-roots file, locked as Nix and Guix do.
    let f = s.layout().temproots_dir().join("999999");
    std::fs::write(&f, format!("{}\0", s.print(&theirs))).unwrap();
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg("import fcntl,sys,time; f=open(sys.argv[1],'r+'); fcntl.flock(f, fcntl.LOCK_EX); print('ok', flush=True); time.sleep(60)")
        .arg(&f)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(gc(&s, GcAction::DeleteDead).is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    // The owner is gone: its file is stale and removed, its roots no longer count.
    assert_eq!(gc(&s, GcAction::DeleteDead), vec![s.print(&theirs)]);
    assert!(!f.exists());
    s.remove_temp_root(&mine);
    assert_eq!(gc(&s, GcAction::DeleteDead), vec![s.print(&mine)]);
}

#[test]
fn delete_specific_refuses_live_and_referenced_paths() {
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let a = text(&s, "a", "a", &[]);
    let b = text(&s, "b", &s.print(&a), &[&a]);
    let r = text(&s, "rooted", "r", &[]);
    roots::add_perm_root(s.layout(), &r, &s.layout().gcroots_dir().join("r")).unwrap();
    let e = collect_garbage(
        &s,
        &GcOptions {
            action: GcAction::DeleteSpecific(vec![r.clone()]),
            max_freed: u64::MAX,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("since it is still alive"), "{e}");
    let e = collect_garbage(
        &s,
        &GcOptions {
            action: GcAction::DeleteSpecific(vec![a.clone()]),
            max_freed: u64::MAX,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("in use by '{}'", s.print(&b))),
        "{e}"
    );
    let done = gc(&s, GcAction::DeleteSpecific(vec![a.clone(), b.clone()]));
    assert_eq!(done.len(), 2);
    assert!(s.is_valid(&r).unwrap());
}

#[test]
fn delete_among_skips_the_alive_and_takes_referrers_when_asked() {
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    // a <- b <- c (c refers to b, b to a); x is rooted; y is dead and alone.
    let a = text(&s, "a", "a", &[]);
    let b = text(&s, "b", &s.print(&a), &[&a]);
    let c = text(&s, "c", &s.print(&b), &[&b]);
    let x = text(&s, "x", "x", &[]);
    let y = text(&s, "y", "y", &[]);
    roots::add_perm_root(s.layout(), &x, &s.layout().gcroots_dir().join("x")).unwrap();
    let among = |paths: Vec<StorePath>, skip_alive, delete_referrers| GcAction::DeleteAmong {
        paths,
        skip_alive,
        delete_referrers,
    };
    // --skip-alive: the rooted path and the referenced one stay, the dead loner goes.
    let done = gc(
        &s,
        among(vec![x.clone(), a.clone(), y.clone()], true, false),
    );
    assert_eq!(done, vec![s.print(&y)]);
    assert!(s.is_valid(&x).unwrap() && s.is_valid(&a).unwrap());
    // Without it, the same request fails and deletes nothing.
    let e = collect_garbage(
        &s,
        &GcOptions {
            action: among(vec![a.clone()], false, false),
            max_freed: u64::MAX,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("in use by"), "{e}");
    assert!(s.is_valid(&a).unwrap());
    // --also-referrers: a goes with b and c, referrers first.
    let mut done = gc(&s, among(vec![a.clone()], false, true));
    done.sort();
    let mut want = vec![s.print(&a), s.print(&b), s.print(&c)];
    want.sort();
    assert_eq!(done, want);
    for p in [&a, &b, &c] {
        assert!(!s.is_valid(p).unwrap() && !s.real_path(p).exists());
    }
    // A referrer that is alive keeps the whole chain, even with --also-referrers.
    let a2 = text(&s, "a2", "a2", &[]);
    let b2 = text(&s, "b2", &s.print(&a2), &[&a2]);
    roots::add_perm_root(s.layout(), &b2, &s.layout().gcroots_dir().join("b2")).unwrap();
    assert!(gc(&s, among(vec![a2.clone()], true, true)).is_empty());
    assert!(s.is_valid(&a2).unwrap() && s.is_valid(&b2).unwrap());
    assert!(s.is_valid(&x).unwrap());
}

#[test]
fn max_freed_stops_early_and_invalid_leftovers_are_swept() {
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let big = "x".repeat(300_000);
    let mut paths = Vec::new();
    for i in 0..1200 {
        paths.push(text(&s, &format!("t{i}"), &format!("{i}{big}"), &[]));
    }
    let r = collect_garbage(
        &s,
        &GcOptions {
            action: GcAction::DeleteDead,
            max_freed: 1,
            ..Default::default()
        },
    )
    .unwrap();
    // With a byte limit, deletion happens in batches of 64: the first batch exceeds it.
    assert_eq!(r.paths.len(), 64);
    assert!(r.bytes_freed >= 64 * 300_000);
    // A leftover that was never registered (a crashed add) is removed; a locked one is not.
    let junk = StorePath::from_parts(&[7u8; 20], "leftover").unwrap();
    std::fs::create_dir(s.real_path(&junk)).unwrap();
    std::fs::write(s.real_path(&junk).join("f"), "partial").unwrap();
    let busy = StorePath::from_parts(&[8u8; 20], "being-built").unwrap();
    std::fs::write(s.real_path(&busy), "in progress").unwrap();
    let lock = s.lock_path(&busy, true).unwrap().unwrap();
    gc(&s, GcAction::DeleteDead);
    assert!(!s.real_path(&junk).exists());
    assert!(s.real_path(&busy).exists());
    drop(lock);
    gc(&s, GcAction::DeleteDead);
    assert!(!s.real_path(&busy).exists());
    assert!(s.query_all_valid_paths().unwrap().is_empty());
}

#[test]
fn keep_derivations_and_keep_outputs() {
    use kiln_format::ValidPathInfo;
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let drv = text(&s, "x.drv-like", "not parsed", &[]);
    // An "output" whose deriver is `drv` (registered directly).
    let out = StorePath::from_parts(&[3u8; 20], "out").unwrap();
    std::fs::write(s.real_path(&out), "o").unwrap();
    let mut nar = Vec::new();
    kiln_format::nar::dump(&s.real_path(&out), &mut nar).unwrap();
    let mut info = ValidPathInfo::new(
        out.clone(),
        kiln_format::Hash::sha256(&nar),
        nar.len() as u64,
    );
    info.deriver = Some(drv.clone());
    s.register_valid_paths(&[info]).unwrap();
    roots::add_perm_root(s.layout(), &out, &s.layout().gcroots_dir().join("o")).unwrap();
    // keep-derivations (the default): the deriver of a live output is live.
    assert!(gc(&s, GcAction::ReturnDead).is_empty());
    drop(s);
    let s = LocalStore::open(
        Layout::under(d.path()).unwrap(),
        StoreOptions {
            keep_derivations: false,
            runtime_roots: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(gc(&s, GcAction::ReturnDead), vec![s.print(&drv)]);
}

#[test]
fn roots_added_while_collecting_go_through_the_socket() {
    // A collector elsewhere holds gc.lock: adding a root must hand it over the socket.
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let p = text(&s, "p", "p", &[]);
    let lock_path = s.layout().gc_lock_path();
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg("import fcntl,sys,time; f=open(sys.argv[1],'a+'); fcntl.flock(f, fcntl.LOCK_EX); print('ok', flush=True); time.sleep(60)")
        .arg(&lock_path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let sock = s.layout().gc_socket_path();
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let expect = s.print(&p);
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut r = BufReader::new(&conn);
        let mut got = String::new();
        r.read_line(&mut got).unwrap();
        (&conn).write_all(b"1").unwrap();
        got
    });
    s.add_temp_root(&p).unwrap();
    assert_eq!(server.join().unwrap(), format!("{expect}\n"));
    child.kill().unwrap();
    child.wait().unwrap();
    // And the root is in our temp-roots file for collectors that start later.
    let file = std::fs::read(
        s.layout()
            .temproots_dir()
            .join(std::process::id().to_string()),
    )
    .unwrap();
    assert!(file.windows(expect.len()).any(|w| w == expect.as_bytes()));
}

#[test]
fn a_moved_store_is_not_collected() {
    // Pointing the collector at a copy of a store under another directory would make every
    // entry look invalid; it must refuse instead of deleting the store.
    let d = tempfile::tempdir().unwrap();
    {
        let s = new_store(&d.path().join("a"));
        text(&s, "x", "x", &[]);
    }
    let copy = d.path().join("b");
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(d.path().join("a"))
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    let s = new_store(&copy);
    let before = std::fs::read_dir(&s.layout().real_store_dir)
        .unwrap()
        .count();
    let e = collect_garbage(&s, &GcOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("was the store moved"), "{e}");
    assert_eq!(
        std::fs::read_dir(&s.layout().real_store_dir)
            .unwrap()
            .count(),
        before
    );
}

#[test]
fn a_long_lived_process_compacts_its_temp_roots_file() {
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let paths: Vec<StorePath> = (0..3000)
        .map(|i| StorePath::from_base_name(&format!("{i:032}-p{i}")).unwrap())
        .collect();
    s.add_temp_roots(&paths).unwrap();
    let file = s
        .layout()
        .temproots_dir()
        .join(std::process::id().to_string());
    let listed = || -> BTreeSet<String> {
        std::fs::read(&file)
            .unwrap()
            .split(|&b| b == 0)
            .filter(|x| !x.is_empty())
            .map(|x| String::from_utf8(x.to_vec()).unwrap())
            .collect()
    };
    assert_eq!(listed().len(), 3000);
    for p in &paths[10..] {
        s.remove_temp_root(p);
    }
    // Other processes' collectors read this file: once most entries are stale it lists
    // the live roots only, and still every one of them.
    let live: BTreeSet<String> = paths[..10].iter().map(|p| s.print(p)).collect();
    let now = listed();
    assert!(now.is_superset(&live));
    assert!(now.len() <= 20, "file still lists {} roots", now.len());
    assert!(s.temp_roots_stale_entries() <= 10);
    // The file is still locked by this process (a collector must not take it for stale).
    let fd = std::fs::File::open(&file).unwrap();
    assert!(rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err());
    // Once no root is left (a daemon whose clients have all gone), the file lists none.
    for p in &paths[..10] {
        s.remove_temp_root(p);
    }
    assert!(listed().is_empty(), "{:?}", listed());
}

#[test]
fn free_lock_files_are_swept_and_held_ones_kept() {
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let dir = &s.layout().real_store_dir;
    let stale = StorePath::from_base_name(&format!("{:032}-stale", 1)).unwrap();
    let held = StorePath::from_base_name(&format!("{:032}-held", 2)).unwrap();
    std::fs::write(dir.join(format!("{}.lock", stale.base_name())), b"").unwrap();
    let lock = s.lock_path(&held, false).unwrap().unwrap();
    assert!(dir.join(format!("{}.lock", held.base_name())).exists());
    gc(&s, GcAction::DeleteDead);
    assert!(!dir.join(format!("{}.lock", stale.base_name())).exists());
    // A lock someone holds (a running build) is not touched.
    assert!(dir.join(format!("{}.lock", held.base_name())).exists());
    drop(lock);
}

#[test]
fn adding_a_path_the_collector_is_deleting_waits_and_recreates_it() {
    // Collectors run back to back while another thread keeps adding the very paths they
    // find dead. An add must never return a path that then loses its files, and the
    // collector must never fail on files the adder replaced.
    let d = tempfile::tempdir().unwrap();
    let s = new_store(d.path());
    let bodies: Vec<String> = (0..400)
        .map(|i| format!("body {i}\n").repeat(200))
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let collector = scope.spawn(|| {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                collect_garbage(&s, &GcOptions::default()).unwrap();
                runs += 1;
            }
            runs
        });
        // Stops the collector however this thread leaves (a failed assertion included).
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let stopper = StopOnDrop(&stop);
        for round in 0..8 {
            let mut held = Vec::new();
            for (i, b) in bodies.iter().enumerate() {
                let p = s
                    .add_text(
                        &format!("t{i}"),
                        b.as_bytes(),
                        &BTreeSet::new(),
                        AddOptions::default(),
                    )
                    .unwrap()
                    .path;
                held.push((p, b));
            }
            // Held by our temp roots: valid, with their contents, until we drop them.
            for (p, b) in &held {
                let real = s.layout().real_store_dir.join(p.base_name());
                assert_eq!(
                    std::fs::read_to_string(&real).ok().as_deref(),
                    Some(b.as_str()),
                    "round {round}: '{}' lost its contents",
                    real.display()
                );
                assert!(s.is_valid(p).unwrap());
            }
            for (p, _) in &held {
                s.remove_temp_root(p);
            }
        }
        drop(stopper);
        assert!(collector.join().unwrap() > 0);
    });
}
