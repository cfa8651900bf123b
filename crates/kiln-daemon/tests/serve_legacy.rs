//! The serve protocol front end (`kiln store serve`) on its own: adding a NAR, querying it
//! back, dumping it, refusing writes without `--write`, and bad input ending the session
//! with an error that names the problem while nothing is added.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;

use common::*;
use kiln_format::{Hash, StorePath, ValidPathInfo};
use kiln_protocol::serve::{self as sp, ServeCommand};
use kiln_protocol::wire::WireReader;

/// Starts a serve session on a socket pair; returns the client's end and the session.
fn session(
    d: &TestDaemon,
    write: bool,
) -> (
    UnixStream,
    std::thread::JoinHandle<Result<(), kiln_daemon::Error>>,
) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let daemon = d.daemon.clone();
    let h = std::thread::spawn(move || {
        let r = theirs.try_clone().unwrap();
        daemon.serve_legacy(Box::new(r), Box::new(theirs), write, None)
    });
    let mut c = ours;
    c.write_all(&[u64(sp::SERVE_MAGIC_1), u64(0x207)].concat())
        .unwrap();
    let mut hello = [0u8; 16];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(hello[..8], u64(sp::SERVE_MAGIC_2)[..]);
    assert_eq!(hello[8..], u64(0x207)[..]);
    (c, h)
}

fn info_of(nar: &[u8], name: &str) -> ValidPathInfo {
    let hash = Hash::sha256(nar);
    let p = StorePath::from_parts(&Hash::sha256(name.as_bytes()).compress(20), name).unwrap();
    ValidPathInfo::new(p, hash, nar.len() as u64)
}

#[test]
fn add_query_and_dump_through_the_serve_protocol() {
    let d = TestDaemon::start();
    let sd = d.store_dir();
    let nar = nar_file(b"served\n");
    // A path added as Nix's ssh:// store adds one: any name, trusted (NoCheckSigs), the
    // NAR checked against its hash and size.
    let info = info_of(&nar, "served");
    let (mut c, h) = session(&d, true);
    let mut b = Vec::new();
    ServeCommand::AddToStoreNar(info.clone())
        .write(7, &sd, &mut b)
        .unwrap();
    b.extend_from_slice(&nar);
    ServeCommand::QueryValidPaths {
        lock: false,
        substitute: false,
        paths: [info.path.clone()].into(),
    }
    .write(7, &sd, &mut b)
    .unwrap();
    ServeCommand::QueryPathInfos([info.path.clone()].into())
        .write(7, &sd, &mut b)
        .unwrap();
    ServeCommand::DumpStorePath(info.path.clone())
        .write(7, &sd, &mut b)
        .unwrap();
    c.write_all(&b).unwrap();
    let mut r = WireReader::new(BufReader::new(c.try_clone().unwrap()));
    assert_eq!(r.u64("added").unwrap(), 1);
    assert_eq!(r.paths(&sd, "valid").unwrap(), [info.path.clone()].into());
    let infos = sp::read_path_infos(7, &sd, &mut r).unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].nar_hash, info.nar_hash);
    assert_eq!(infos[0].nar_size, info.nar_size);
    let mut dumped = vec![0u8; nar.len()];
    r.read_exact(&mut dumped).unwrap();
    assert_eq!(dumped, nar);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    h.join().unwrap().unwrap();
    assert!(d.daemon.store().is_valid(&info.path).unwrap());
}

#[test]
fn writes_need_write_and_bad_input_adds_nothing() {
    let d = TestDaemon::start();
    let sd = d.store_dir();
    let nar = nar_file(b"never\n");
    let info = info_of(&nar, "never");
    // Without --write: refused, as `nix-store --serve` refuses it.
    let (mut c, h) = session(&d, false);
    let mut b = Vec::new();
    ServeCommand::AddToStoreNar(info.clone())
        .write(7, &sd, &mut b)
        .unwrap();
    b.extend_from_slice(&nar);
    c.write_all(&b).unwrap();
    let e = h.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("not allowed"), "{e}");
    // Nor importing or building.
    let drv_path = drv(&d, "never-built", "echo x > $out");
    for cmd in [
        sp::ServeCommand::ImportPaths,
        sp::ServeCommand::BuildPaths {
            paths: vec![kiln_protocol::DerivedPath::Opaque(drv_path.clone())],
            options: Default::default(),
        },
        sp::ServeCommand::BuildDerivation {
            drv_path: drv_path.clone(),
            drv: d.daemon.store().read_derivation(&drv_path).unwrap(),
            options: Default::default(),
        },
    ] {
        let (mut c, h) = session(&d, false);
        let mut b = Vec::new();
        cmd.write(7, &sd, &mut b).unwrap();
        c.write_all(&b).unwrap();
        let e = h.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("not allowed"), "{e}");
    }
    // A NAR whose hash is not the one claimed: an error naming it; nothing registered.
    let mut bad = info.clone();
    bad.nar_hash = Hash::sha256(b"something else");
    let (mut c, h) = session(&d, true);
    let mut b = Vec::new();
    ServeCommand::AddToStoreNar(bad)
        .write(7, &sd, &mut b)
        .unwrap();
    b.extend_from_slice(&nar);
    c.write_all(&b).unwrap();
    let e = h.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("hash"), "{e}");
    // An unknown command, and a huge path list: refused by name, nothing allocated.
    for (bytes, want) in [
        (u64(42), "unknown serve command 42"),
        ([u64(2), u64(1 << 50)].concat(), "exceed the limit"),
    ] {
        let (mut c, h) = session(&d, true);
        c.write_all(&bytes).unwrap();
        let e = h.join().unwrap().unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    assert!(!d.daemon.store().is_valid(&info.path).unwrap());
}
