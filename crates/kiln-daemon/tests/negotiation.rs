//! The handshake with every client of 2026: versions negotiated as Nix does (1.18 – 1.38,
//! newer 1.x settling on 1.38), refusals told to the client, Nix 2.23's doubled version,
//! feature lists (bounded), and what each minor after 1.34 adds: the trust flag (1.35),
//! `AddPermRoot` (1.36), CPU times (1.37), features (1.38) and Nix 2.34's removed ops.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use kiln_format::StorePath;
use kiln_protocol::ops::{GcAction, GcRequest};
use kiln_protocol::stderr::{STDERR_ERROR, STDERR_LAST};
use kiln_protocol::{BuildMode, Client, DerivedPath, Feature, OutputSpec, Reply, Request, Version};

fn read_u64(c: &mut UnixStream) -> u64 {
    let mut b = [0u8; 8];
    c.read_exact(&mut b).unwrap();
    u64::from_le_bytes(b)
}

fn read_str(c: &mut UnixStream) -> String {
    let n = read_u64(c) as usize;
    let mut b = vec![0u8; n.div_ceil(8) * 8];
    c.read_exact(&mut b).unwrap();
    b.truncate(n);
    String::from_utf8(b).unwrap()
}

fn raw(d: &TestDaemon) -> UnixStream {
    let c = d.raw();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c
}

/// Everything until the daemon closes the connection.
fn rest(c: &mut UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    c.read_to_end(&mut v).unwrap();
    v
}

/// The message of an old-style (before 1.26) error frame: text, then status.
fn old_error(v: &[u8]) -> String {
    assert_eq!(&v[..8], &STDERR_ERROR.to_le_bytes(), "an error frame");
    let n = u64::from_le_bytes(v[8..16].try_into().unwrap()) as usize;
    String::from_utf8_lossy(&v[16..16 + n]).into_owned()
}

#[test]
fn versions_are_negotiated_as_nix_does() {
    let d = TestDaemon::start();
    // A client that sends magic and version in one write (Nix ≥ 2.23) is answered with
    // Nix's own 1.38, as nix-daemon 2.34 answers it.
    let mut c = raw(&d);
    c.write_all(&[u64(0x6e69_7863), u64(0x126)].concat())
        .unwrap();
    assert_eq!(read_u64(&mut c), 0x6478_696f);
    assert_eq!(read_u64(&mut c), 0x126);
    // One that waits for the daemon first (Nix < 2.23, Guix) sees Guix's 0x164.
    let mut c = raw(&d);
    c.write_all(&u64(0x6e69_7863)).unwrap();
    assert_eq!(read_u64(&mut c), 0x6478_696f);
    assert_eq!(read_u64(&mut c), 0x164);

    // kiln's own client at 1.38: trusted (root, the default trusted-users), told so, and
    // the version string follows Nix's.
    let c = d.nix();
    assert_eq!(c.proto.version(), Version(0x126));
    assert_eq!(c.trusted, Some(true));
    assert_eq!(c.daemon_version_string.as_deref(), Some("2.34.8"));
    assert!(c.proto.has_feature(Feature::DeleteDeadSpecificReferrers));
    assert!(c.proto.has_feature(Feature::RealisationWithPathNotHash));
    // A client newer than 1.38 settles on 1.38 and works.
    let mut c = Client::connect_as(&d.socket, d.store_dir(), Version(0x12b)).unwrap();
    assert_eq!(c.daemon_version, Version(0x126));
    assert_eq!(c.proto.version(), Version(0x126));
    let p = StorePath::from_base_name(&format!("{:032}-x", 0)).unwrap();
    assert!(matches!(
        c.request(&Request::IsValidPath(p.clone()), None, &mut |_| {})
            .unwrap(),
        Reply::Bool(false)
    ));
    // 1.35: the trust flag, no features.
    let c = Client::connect_as(&d.socket, d.store_dir(), Version(0x123)).unwrap();
    assert_eq!((c.proto.version(), c.trusted), (Version(0x123), Some(true)));
    assert!(!c.proto.has_feature(Feature::DeleteDeadSpecificReferrers));
    // 1.34 (Nix 2.8): no trust flag.
    let c = Client::connect_as(&d.socket, d.store_dir(), Version(0x122)).unwrap();
    assert_eq!(c.trusted, None);
}

#[test]
fn too_old_and_foreign_clients_are_told_why() {
    let d = TestDaemon::start();
    // 1.17: below Nix's floor since 2.32. It finishes its handshake, then reads the
    // stderr channel, where the reason is.
    let mut c = raw(&d);
    c.write_all(&[u64(0x6e69_7863), u64(0x111), u64(0), u64(0)].concat())
        .unwrap();
    assert_eq!(read_u64(&mut c), 0x6478_696f);
    read_u64(&mut c);
    let msg = old_error(&rest(&mut c));
    assert!(msg.contains("too old") && msg.contains("1.17"), "{msg}");
    // Another major version.
    let mut c = raw(&d);
    c.write_all(&[u64(0x6e69_7863), u64(0x222)].concat())
        .unwrap();
    read_u64(&mut c);
    read_u64(&mut c);
    let msg = old_error(&rest(&mut c));
    assert!(msg.contains("major"), "{msg}");
    still_serving(&d);
}

#[test]
fn a_newer_client_that_did_not_send_its_version_with_its_greeting_is_refused() {
    let d = TestDaemon::start();
    // It waited for the daemon, saw Guix's 0x164, and would use 1.39 layouts.
    let mut c = raw(&d);
    c.write_all(&u64(0x6e69_7863)).unwrap();
    assert_eq!(read_u64(&mut c), 0x6478_696f);
    assert_eq!(read_u64(&mut c), 0x164);
    c.write_all(&[u64(0x127), u64(0), u64(0), u64(0)].concat())
        .unwrap();
    let text = String::from_utf8_lossy(&rest(&mut c)).into_owned();
    assert!(text.contains("kiln speaks up to 1.38"), "{text}");
    still_serving(&d);
}

#[test]
fn nix_2_23_sends_its_version_twice() {
    let d = TestDaemon::start();
    let mut c = raw(&d);
    c.write_all(&[u64(0x6e69_7863), u64(0x125)].concat())
        .unwrap();
    assert_eq!(read_u64(&mut c), 0x6478_696f);
    assert_eq!(read_u64(&mut c), 0x126);
    // Its version again where the affinity flag goes, then 0 (read as the affinity),
    // then reserveSpace.
    c.write_all(&[u64(0x125), u64(0), u64(0)].concat()).unwrap();
    assert_eq!(read_str(&mut c), "2.34.8");
    assert_eq!(read_u64(&mut c), 1, "trusted");
    assert_eq!(read_u64(&mut c), STDERR_LAST);
    // The connection works.
    let p = format!("{}/{:032}-x", d.store_dir().as_str(), 0);
    c.write_all(&[u64(1), s(p.as_bytes())].concat()).unwrap();
    assert_eq!(read_u64(&mut c), STDERR_LAST);
    assert_eq!(read_u64(&mut c), 0, "not valid");
}

#[test]
fn absurd_feature_lists_are_refused_without_allocating() {
    let d = TestDaemon::start();
    for bad in [
        u64(1 << 40),                            // a count
        [u64(1), u64(1 << 40)].concat(),         // a name's length
        [u64(1), s(&vec![b'x'; 2000])].concat(), // a name over the limit
    ] {
        let mut c = raw(&d);
        c.write_all(&[u64(0x6e69_7863), u64(0x126), bad].concat())
            .unwrap();
        read_u64(&mut c);
        read_u64(&mut c);
        let v = rest(&mut c);
        assert_eq!(&v[..8], &STDERR_ERROR.to_le_bytes());
        let text = String::from_utf8_lossy(&v);
        assert!(text.contains("client features"), "{text}");
    }
    still_serving(&d);
}

#[test]
fn removed_operations_are_invalid_at_1_38_and_kept_before() {
    let d = TestDaemon::start();
    let p = StorePath::from_base_name(&format!("{:032}-x", 0)).unwrap();
    // Nix 2.34 answers "invalid operation" to QueryReferences (5) and ExportPath (16)
    // (kiln's client does not even send them at 1.38).
    let mut c = d.nix();
    let e = c
        .request(&Request::QueryReferences(p.clone()), None, &mut |_| {})
        .unwrap_err();
    assert!(
        e.to_string().contains("has no operation QueryReferences"),
        "{e}"
    );
    for op in [5u64, 16] {
        let mut c = raw(&d);
        c.write_all(&[u64(0x6e69_7863), u64(0x126), u64(0), u64(0), u64(0)].concat())
            .unwrap();
        read_u64(&mut c);
        read_u64(&mut c);
        // The daemon names its own features whatever the client named.
        assert_eq!(read_u64(&mut c), 5);
        assert_eq!(read_str(&mut c), "delete-dead-specific-referrers");
        assert_eq!(read_str(&mut c), "kiln-events");
        assert_eq!(read_str(&mut c), "kiln-queued-builds");
        assert_eq!(read_str(&mut c), "queryActiveBuilds");
        assert_eq!(read_str(&mut c), "realisation-with-path-not-hash");
        read_str(&mut c);
        read_u64(&mut c);
        assert_eq!(read_u64(&mut c), STDERR_LAST);
        c.write_all(&[u64(op), s(b"x")].concat()).unwrap();
        let text = String::from_utf8_lossy(&rest(&mut c)).into_owned();
        assert!(
            text.contains(&format!("invalid operation \x1b[35;1m{op}\x1b[0m")),
            "{text}"
        );
    }
    // A 1.37 client still has it (Nix 2.20's daemon did).
    let mut c = Client::connect_as(&d.socket, d.store_dir(), Version(0x125)).unwrap();
    let e = c
        .request(&Request::QueryReferences(p), None, &mut |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("is not valid"), "{e}");
    still_serving(&d);
}

#[test]
fn add_perm_root_and_delete_dead_among_named_paths() {
    let d = TestDaemon::start();
    let store = d.daemon.store();
    let add = |name: &str| {
        let p = store
            .add_text(name, name.as_bytes(), &BTreeSet::new(), Default::default())
            .unwrap()
            .path;
        store.remove_temp_root(&p);
        p
    };
    let (kept, dead) = (add("kept"), add("dead"));
    let mut c = d.nix();
    // 1.36: AddPermRoot makes a root (an indirect one, outside the state directory).
    let link = d.dir.path().join("result");
    let r = c
        .request(
            &Request::AddPermRoot {
                path: kept.clone(),
                root: link.display().to_string(),
            },
            None,
            &mut |_| {},
        )
        .unwrap();
    assert!(
        matches!(&r, Reply::String(s) if *s == link.display().to_string()),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read_link(&link).unwrap().display().to_string(),
        d.store_dir().display(&kept)
    );
    // `nix store delete --skip-alive kept dead`: the dead one goes, the rooted one stays.
    let gc = |paths: &[&StorePath]| {
        Request::CollectGarbage(GcRequest {
            action: GcAction::DeleteDead,
            paths: paths.iter().map(|p| (*p).clone()).collect(),
            whole_store: false,
            delete_referrers: false,
            ignore_liveness: false,
            max_freed: u64::MAX,
        })
    };
    match c.request(&gc(&[&kept, &dead]), None, &mut |_| {}).unwrap() {
        Reply::Gc { paths, .. } => assert_eq!(paths, vec![d.store_dir().display(&dead)]),
        r => panic!("{r:?}"),
    }
    assert!(store.is_valid(&kept).unwrap() && !store.is_valid(&dead).unwrap());
    // Without the feature (1.37), Nix's daemon refuses such a request.
    let mut old = Client::connect_as(&d.socket, d.store_dir(), Version(0x125)).unwrap();
    let e = old.request(&gc(&[&kept]), None, &mut |_| {}).unwrap_err();
    assert!(
        e.to_string()
            .contains("not supported by the negotiated protocol"),
        "{e}"
    );
    assert!(store.is_valid(&kept).unwrap());
}

#[test]
fn build_results_carry_cpu_times_from_1_37() {
    let d = TestDaemon::start();
    let busy = drv(
        &d,
        "busy",
        "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; echo done > $out",
    );
    let req = Request::BuildPathsWithResults {
        paths: vec![DerivedPath::Built {
            drv: busy.clone(),
            outputs: OutputSpec::All,
        }],
        mode: BuildMode::Normal,
    };
    let mut c = d.nix();
    match c.request(&req, None, &mut |_| {}).unwrap() {
        Reply::BuildResults(rs) => {
            let r = &rs[0].1;
            assert_eq!(r.status, 0, "{}", r.error_msg);
            let user = r.cpu_user.expect("user CPU time");
            assert!(user > 0, "the builder counted to 30000: {user} µs");
            assert!(r.cpu_system.is_some());
        }
        r => panic!("{r:?}"),
    }
    // 1.36 has no such fields: the same answer (already built) reads without them.
    let mut c = Client::connect_as(&d.socket, d.store_dir(), Version(0x124)).unwrap();
    match c.request(&req, None, &mut |_| {}).unwrap() {
        Reply::BuildResults(rs) => assert_eq!(rs[0].1.cpu_user, None),
        r => panic!("{r:?}"),
    }
}

#[test]
fn build_traces_keyed_by_derivation_path_with_the_2_35_feature() {
    let d = TestDaemon::start();
    let greet = drv(&d, "greet", "echo hi > $out");
    let req = Request::BuildPathsWithResults {
        paths: vec![DerivedPath::Built {
            drv: greet.clone(),
            outputs: OutputSpec::All,
        }],
        mode: BuildMode::Normal,
    };
    // A 2.35 client: built outputs by name, with their paths.
    let mut c = d.nix();
    let out = match c.request(&req, None, &mut |_| {}).unwrap() {
        Reply::BuildResults(rs) => {
            let (id, json) = &rs[0].1.built_outputs[0];
            assert!(id.ends_with("!out"), "{id}");
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            StorePath::from_base_name(v["outPath"].as_str().unwrap()).unwrap()
        }
        r => panic!("{r:?}"),
    };
    assert!(d.daemon.store().is_valid(&out).unwrap());
    // Nothing recorded yet for this input-addressed output.
    let query = Request::QueryBuildTrace {
        drv: greet.clone(),
        output: "out".into(),
    };
    assert!(matches!(
        c.request(&query, None, &mut |_| {}).unwrap(),
        Reply::BuildTrace(None)
    ));
    // Recorded by a trusted client, keyed by the derivation's path, then found.
    c.request(
        &Request::RegisterBuildTrace {
            drv: greet.clone(),
            output: "out".into(),
            out_path: out.clone(),
            signatures: BTreeSet::new(),
        },
        None,
        &mut |_| {},
    )
    .unwrap();
    match c.request(&query, None, &mut |_| {}).unwrap() {
        Reply::BuildTrace(Some((p, sigs))) => {
            assert_eq!(p, out);
            assert!(sigs.is_empty());
        }
        r => panic!("{r:?}"),
    }
    // The same record, seen by a 1.37 client through the old, hash-keyed query.
    let mut old = Client::connect_as(&d.socket, d.store_dir(), Version(0x125)).unwrap();
    let id = match old.request(&req, None, &mut |_| {}).unwrap() {
        Reply::BuildResults(rs) => rs[0].1.built_outputs[0].0.clone(),
        r => panic!("{r:?}"),
    };
    match old
        .request(&Request::QueryRealisation(id), None, &mut |_| {})
        .unwrap()
    {
        Reply::Strings(s) => assert!(s[0].contains(out.base_name()), "{s:?}"),
        r => panic!("{r:?}"),
    }
    // A derivation the store lacks has no recorded outputs.
    let absent = StorePath::from_base_name(&format!("{:032}-absent.drv", 0)).unwrap();
    assert!(matches!(
        c.request(
            &Request::QueryBuildTrace {
                drv: absent,
                output: "out".into()
            },
            None,
            &mut |_| {}
        )
        .unwrap(),
        Reply::BuildTrace(None)
    ));
}
