//! Many clients on one daemon: untrusted clients limited as Nix limits them (run as a
//! different user), a client that hangs up cancels its build unless another still wants
//! it, and concurrent clients share builds.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kiln_format::{Hash, StorePath, ValidPathInfo};
use kiln_protocol::{BuildMode, DerivedPath, OutputSpec, Reply, Request};

const NOBODY: u32 = 65534;

fn build_req(drv: &StorePath, mode: BuildMode) -> Request {
    Request::BuildPaths {
        paths: vec![DerivedPath::Built {
            drv: drv.clone(),
            outputs: OutputSpec::All,
        }],
        mode,
    }
}

/// The part of this test that runs as `nobody`, re-executed by
/// `untrusted_clients_are_limited` (does nothing when run directly).
#[test]
fn untrusted_client_side() {
    let Ok(socket) = std::env::var("KILN_TEST_SOCKET") else {
        return;
    };
    assert_eq!(rustix::process::getuid().as_raw(), NOBODY);
    let sd = kiln_format::StoreDir::new(std::env::var("KILN_TEST_STORE").unwrap()).unwrap();
    let drv_path = sd
        .parse_path(&std::env::var("KILN_TEST_DRV").unwrap())
        .unwrap();
    let mut c = kiln_protocol::Client::connect(Path::new(&socket), sd.clone()).unwrap();
    let err = |c: &mut kiln_protocol::Client, q: Request, data: Option<&mut dyn std::io::Read>| {
        c.request(&q, data, &mut |_| {}).unwrap_err().to_string()
    };
    // Content-addressed additions are fine for anyone.
    assert!(matches!(
        c.request(
            &Request::AddTextToStore {
                name: "mine".into(),
                text: b"x".to_vec(),
                refs: BTreeSet::new()
            },
            None,
            &mut |_| {}
        )
        .unwrap(),
        Reply::OptPath(Some(_))
    ));
    let e = err(
        &mut c,
        Request::AddSignatures {
            path: drv_path.clone(),
            sigs: vec!["k:c2ln".into()],
        },
        None,
    );
    assert!(e.contains("not privileged to add signatures"), "{e}");
    let e = err(
        &mut c,
        Request::AddPermRoot {
            path: drv_path.clone(),
            root: "/tmp/kiln-untrusted-perm-root".into(),
        },
        None,
    );
    assert!(e.contains("not privileged to create perm roots"), "{e}");
    assert!(!Path::new("/tmp/kiln-untrusted-perm-root").exists());
    let e = err(&mut c, build_req(&drv_path, BuildMode::Repair), None);
    assert!(e.contains("not in 'trusted-users'"), "{e}");
    let e = err(
        &mut c,
        Request::VerifyStore {
            check_contents: false,
            repair: true,
        },
        None,
    );
    assert!(e.contains("not privileged to repair"), "{e}");
    // An unsigned input-addressed path: refused even though the client says not to check.
    let nar = nar_file(b"payload");
    let p = StorePath::from_base_name(&format!("{:032}-forged", 5)).unwrap();
    let mut info = ValidPathInfo::new(p.clone(), Hash::sha256(&nar), nar.len() as u64);
    info.ultimate = true;
    let e = err(
        &mut c,
        Request::AddToStoreNar {
            info,
            repair: false,
            dont_check_sigs: true,
        },
        Some(&mut nar.as_slice()),
    );
    assert!(e.contains("lacks a valid signature"), "{e}");
    assert!(matches!(
        c.request(&Request::IsValidPath(p), None, &mut |_| {})
            .unwrap(),
        Reply::Bool(false)
    ));
    // An unsigned realisation would decide which path another user's content-addressed
    // build uses: refused (Nix 2.8 would record it), in the hash-keyed form (1.37) and in
    // Nix 2.35's form keyed by derivation path.
    let mut old = kiln_protocol::Client::connect_as(
        Path::new(&socket),
        sd.clone(),
        kiln_protocol::Version(0x125),
    )
    .unwrap();
    let id = kiln_format::realisation::DrvOutput::new(Hash::sha256(b"some drv"), "out");
    let r = kiln_format::realisation::Realisation::new(id.clone(), drv_path.clone());
    let e = err(
        &mut old,
        Request::RegisterDrvOutput {
            realisation: r.to_json(),
            out_path: None,
        },
        None,
    );
    assert!(e.contains("lacks a valid signature"), "{e}");
    assert!(matches!(
        old.request(&Request::QueryRealisation(id.to_string()), None, &mut |_| {})
            .unwrap(),
        Reply::Strings(v) if v.is_empty()
    ));
    let e = err(
        &mut c,
        Request::RegisterBuildTrace {
            drv: drv_path.clone(),
            output: "out".into(),
            out_path: drv_path.clone(),
            signatures: Default::default(),
        },
        None,
    );
    assert!(e.contains("lacks a valid signature"), "{e}");
    // Building is allowed, and so is asking for roots, which come censored.
    assert!(matches!(
        c.request(&build_req(&drv_path, BuildMode::Normal), None, &mut |_| {})
            .unwrap(),
        Reply::Int(1)
    ));
    match c.request(&Request::FindRoots, None, &mut |_| {}).unwrap() {
        Reply::Roots(r) => {
            assert!(r.iter().all(|(l, _)| !l.starts_with("{temp:")), "{r:?}");
        }
        r => panic!("{r:?}"),
    }
}

/// Whether this test process may run clients as another user.
fn can_switch_users(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("{test}: skipped, needs root to run a client as another user");
    false
}

#[test]
fn untrusted_clients_are_limited() {
    if !can_switch_users("untrusted_clients_are_limited") {
        return;
    }
    let d = TestDaemon::start();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let drv_path = drv(&d, "for-nobody", "echo hi > $out");
    let st = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "untrusted_client_side", "--nocapture"])
        .env("KILN_TEST_SOCKET", &d.socket)
        .env("KILN_TEST_STORE", d.store_dir().as_str())
        .env("KILN_TEST_DRV", d.store_dir().display(&drv_path))
        .uid(NOBODY)
        .gid(NOBODY)
        .status()
        .unwrap();
    assert!(st.success(), "the untrusted client's checks failed");
}

#[test]
fn users_outside_allowed_users_are_refused() {
    if !can_switch_users("users_outside_allowed_users_are_refused") {
        return;
    }
    let d = TestDaemon::with_settings(&[("allowed-users", "root")]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            // The daemon may close before the magic is even sent (a broken pipe) or while
            // it is (a reset): both mean refused.
            "python3 -c \"import socket,struct\ns=socket.socket(socket.AF_UNIX); s.connect('{}')\ntry:\n  s.sendall(struct.pack('<Q',0x6e697863)); print(len(s.recv(100)))\nexcept (BrokenPipeError, ConnectionResetError): print(0)\"",
            d.socket.display()
        ))
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    // Closed before the handshake: the client reads nothing.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
    // root (trusted) still gets in.
    let _ = d.nix();
}

fn pid_of_builder(marker: &Path) -> Option<i32> {
    std::fs::read_to_string(marker).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    // A zombie counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Sends a build request on a raw connection (which the caller then drops).
fn raw_build(d: &TestDaemon, drv_path: &StorePath) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let mut raw = d.raw();
    let mut req = Vec::new();
    build_req(drv_path, BuildMode::Normal)
        .write(kiln_protocol::Proto::nix(0x122), &d.store_dir(), &mut req)
        .unwrap();
    raw.write_all(&[nix_hello(), req].concat()).unwrap();
    raw
}

/// A builder that records its pid and waits for `go` to appear.
fn waiting_builder(
    d: &TestDaemon,
    name: &str,
) -> (StorePath, std::path::PathBuf, std::path::PathBuf) {
    let marker = d.dir.path().join(format!("{name}.pid"));
    let go = d.dir.path().join(format!("{name}.go"));
    let drv_path = drv(
        d,
        name,
        &format!(
            "echo $$ > {m}; while [ ! -e {g} ]; do sleep 0.05; done; echo done > $out",
            m = marker.display(),
            g = go.display()
        ),
    );
    (drv_path, marker, go)
}

#[test]
fn a_client_that_hangs_up_cancels_its_build() {
    let d = TestDaemon::start();
    let (drv_path, marker, _go) = waiting_builder(&d, "abandoned");
    let raw = raw_build(&d, &drv_path);
    wait_until("builder started", || pid_of_builder(&marker).is_some());
    let pid = pid_of_builder(&marker).unwrap();
    assert!(alive(pid));
    drop(raw);
    // Nobody else wants it: the builder is killed at once, not at its next output.
    wait_until("builder killed", || !alive(pid));
}

#[test]
fn a_build_another_client_waits_for_survives_a_hang_up() {
    let d = TestDaemon::start();
    let (drv_path, marker, go) = waiting_builder(&d, "shared");
    // The first client starts the build and waits for it.
    let sd = d.store_dir();
    let socket = d.socket.clone();
    let dp = drv_path.clone();
    let first = std::thread::spawn(move || {
        let mut c = kiln_protocol::Client::connect(&socket, sd).unwrap();
        c.request(&build_req(&dp, BuildMode::Normal), None, &mut |_| {})
            .map(|r| matches!(r, Reply::Int(1)))
    });
    wait_until("builder started", || pid_of_builder(&marker).is_some());
    let pid = pid_of_builder(&marker).unwrap();
    // A second client asks for the same derivation and hangs up.
    drop(raw_build(&d, &drv_path));
    // Its goal was the first client's too: the build goes on and finishes for it.
    std::fs::write(&go, b"").unwrap();
    assert!(
        first.join().unwrap().unwrap(),
        "the shared build did not finish for the client still waiting"
    );
    assert!(!alive(pid));
    let out = d.daemon.store().read_derivation(&drv_path).unwrap();
    assert!(d
        .daemon
        .store()
        .is_valid(out.output_path("out").unwrap())
        .unwrap());
}

/// Goals are shared between clients: one client asking for no local builds
/// (`--max-jobs 0`) must not fail another client's build of the same derivation.
#[test]
fn one_clients_max_jobs_0_does_not_fail_anothers_build() {
    let d = TestDaemon::start();
    let (slow, marker, go) = waiting_builder(&d, "slow-input");
    let top = drv_on(&d, "on-top", "echo top > $out", &[&slow]);
    let request = |drv: StorePath, max_jobs: Option<u64>| {
        let (sd, socket) = (d.store_dir(), d.socket.clone());
        std::thread::spawn(move || {
            let mut c = kiln_protocol::Client::connect(&socket, sd).unwrap();
            if let Some(j) = max_jobs {
                let o = kiln_protocol::ClientOptions {
                    max_build_jobs: Some(j),
                    ..Default::default()
                };
                c.request(&Request::SetOptions(o), None, &mut |_| {})
                    .unwrap();
            }
            c.request(&build_req(&drv, BuildMode::Normal), None, &mut |_| {})
                .map_err(|e| e.to_string())
        })
    };
    // Someone builds the input; it waits until told to finish.
    let input = request(slow.clone(), None);
    wait_until("input builder started", || {
        pid_of_builder(&marker).is_some()
    });
    // A client that allows no local builds asks for `top` first: its goal waits for the
    // input. (Its request is given time to arrive before the next; were it later, the
    // goal would be the other client's and this test would check less.)
    let no_local = request(top.clone(), Some(0));
    std::thread::sleep(Duration::from_millis(300));
    // Another client, allowing local builds, asks for the same `top`.
    let local = request(top.clone(), None);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&go, b"").unwrap();
    assert!(input.join().unwrap().is_ok());
    let r = local.join().unwrap();
    assert!(matches!(r, Ok(Reply::Int(1))), "{r:?}");
    let built = d.daemon.store().read_derivation(&top).unwrap();
    assert!(d
        .daemon
        .store()
        .is_valid(built.output_path("out").unwrap())
        .unwrap());
    // The first client shared the build it was waiting on.
    let _ = no_local.join().unwrap();
}

/// A connection's cached path info never outlives a change: after another client deletes
/// the path, and after it is added again, the first connection sees the store as it is.
#[test]
fn cached_path_info_follows_changes_made_by_other_clients() {
    let d = TestDaemon::start();
    let store = d.daemon.store();
    let add = || {
        store
            .add_text("x", b"same text", &BTreeSet::new(), Default::default())
            .unwrap()
            .path
    };
    let p = add();
    let mut c1 = d.nix();
    let info = |c: &mut kiln_protocol::Client| match c
        .request(&Request::QueryPathInfo(p.clone()), None, &mut |_| {})
        .unwrap()
    {
        Reply::PathInfo(i) => i,
        r => panic!("unexpected answer: {r:?}"),
    };
    let first = info(&mut c1).expect("valid");
    assert_eq!(info(&mut c1).as_ref(), Some(&first), "asked twice");
    // The in-process add left a temporary root on it.
    store.remove_temp_root(&p);
    let mut c2 = d.nix();
    let gc = Request::CollectGarbage(kiln_protocol::ops::GcRequest {
        action: kiln_protocol::ops::GcAction::DeleteSpecific,
        paths: BTreeSet::from([p.clone()]),
        whole_store: false,
        delete_referrers: false,
        ignore_liveness: false,
        max_freed: u64::MAX,
    });
    c2.request(&gc, None, &mut |_| {}).unwrap();
    assert_eq!(info(&mut c1), None, "a deleted path is reported invalid");
    assert_eq!(add(), p);
    assert!(info(&mut c1).is_some(), "a path added again is valid again");
}
