//! Bad input on one connection ends that connection with a clear error and nothing else:
//! the daemon keeps serving other clients, stalled clients hold nothing others need, and
//! lengths from the wire never turn into allocations.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use kiln_format::{Hash, StorePath, ValidPathInfo};
use kiln_protocol::stderr::{STDERR_ERROR, STDERR_LAST};
use kiln_protocol::{Error, Reply, Request};

/// Reads everything until the daemon closes the connection.
fn read_all(mut c: std::os::unix::net::UnixStream) -> Vec<u8> {
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut v = Vec::new();
    c.read_to_end(&mut v).unwrap();
    v
}

/// Skips the handshake reply (magic, version, version string, STDERR_LAST).
fn after_handshake(v: &[u8]) -> &[u8] {
    let n = u64::from_le_bytes(v[16..24].try_into().unwrap()) as usize;
    let start = 24 + n.div_ceil(8) * 8;
    assert_eq!(&v[start..start + 8], &STDERR_LAST.to_le_bytes());
    &v[start + 8..]
}

fn error_message(v: &[u8]) -> String {
    assert_eq!(&v[..8], &STDERR_ERROR.to_le_bytes(), "not an error frame");
    // "Error", level, "Error", message …
    let mut off = 8;
    let next_str = |off: &mut usize| {
        let n = u64::from_le_bytes(v[*off..*off + 8].try_into().unwrap()) as usize;
        let s = String::from_utf8_lossy(&v[*off + 8..*off + 8 + n]).into_owned();
        *off += 8 + n.div_ceil(8) * 8;
        s
    };
    next_str(&mut off);
    off += 8;
    next_str(&mut off);
    next_str(&mut off)
}

#[test]
fn unknown_operations_and_bad_magic_close_only_their_connection() {
    let d = TestDaemon::start();
    let mut c = d.raw();
    c.write_all(&[nix_hello(), u64(99)].concat()).unwrap();
    let v = read_all(c);
    let msg = error_message(after_handshake(&v));
    assert!(
        msg.contains("invalid operation \x1b[35;1m99\x1b[0m"),
        "{msg}"
    );

    let mut c = d.raw();
    c.write_all(&u64(0xdead_beef)).unwrap();
    assert!(read_all(c).is_empty());
    still_serving(&d);
}

#[test]
fn huge_length_prefixes_are_refused_without_allocating() {
    let d = TestDaemon::start();
    // A store path "of 2^60 bytes": refused from the prefix alone.
    let mut c = d.raw();
    c.write_all(&[nix_hello(), u64(1), u64(1 << 60)].concat())
        .unwrap();
    let v = read_all(c);
    let msg = error_message(after_handshake(&v));
    assert!(msg.contains("exceeds the limit"), "{msg}");
    assert!(
        msg.contains("byte 40"),
        "the offset of the bad length: {msg}"
    );

    // A list "of 2^50 paths".
    let mut c = d.raw();
    c.write_all(&[nix_hello(), u64(31), u64(1 << 50)].concat())
        .unwrap();
    let msg = error_message(after_handshake(&read_all(c)));
    assert!(msg.contains("items exceed the limit"), "{msg}");

    // Text claimed to be 200 MiB that never arrives: the connection just ends.
    let mut c = d.raw();
    c.write_all(
        &[
            nix_hello(),
            u64(8),
            s(b"name"),
            u64(200 << 20),
            b"abc".to_vec(),
        ]
        .concat(),
    )
    .unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let v = read_all(c);
    let msg = error_message(after_handshake(&v));
    assert!(msg.contains("unexpected end"), "{msg}");
    still_serving(&d);
}

#[test]
fn truncated_frames_and_stalled_clients_hold_nothing() {
    let d = TestDaemon::start();
    // A client that stops in the middle of a framed NAR and stays connected.
    let mut stalled = d.raw();
    stalled
        .write_all(
            &[
                nix_hello(),
                u64(7),
                s(b"x"),
                s(b"fixed:r:sha256"),
                u64(0),
                u64(0),
                u64(1000),
                b"nix-arch".to_vec(),
            ]
            .concat(),
        )
        .unwrap();
    // Others are served meanwhile, including writers.
    for i in 0..4 {
        let mut c = d.nix();
        let r = c
            .request(
                &Request::AddTextToStore {
                    name: format!("t{i}"),
                    text: b"text".to_vec(),
                    refs: BTreeSet::new(),
                },
                None,
                &mut |_| {},
            )
            .unwrap();
        assert!(matches!(r, Reply::OptPath(Some(_))));
    }
    // The stalled client gives up half-way: its connection ends, nothing is registered.
    stalled.shutdown(std::net::Shutdown::Write).unwrap();
    let v = read_all(stalled);
    let msg = error_message(after_handshake(&v));
    assert!(
        msg.contains("middle of a frame") || msg.contains("end"),
        "{msg}"
    );
    still_serving(&d);
}

#[test]
fn a_bad_archive_fails_its_operation_and_the_connection_goes_on() {
    let d = TestDaemon::start();
    let mut c = d.nix();
    let nar = nar_file(b"hello\n");
    let p = StorePath::from_base_name(&format!("{:032}-claimed", 7)).unwrap();
    // The claimed hash is wrong: refused, and nothing becomes valid.
    let mut info = ValidPathInfo::new(p.clone(), Hash::sha256(b"not the nar"), nar.len() as u64);
    info.ca = None;
    let e = c
        .request(
            &Request::AddToStoreNar {
                info,
                repair: false,
                dont_check_sigs: true,
            },
            Some(&mut nar.as_slice()),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        matches!(&e, Error::Remote(r) if r.message.contains("hash mismatch")),
        "{e}"
    );
    // Same connection: a corrupt archive (bad padding) in a framed stream.
    let mut bad = nar.clone();
    let n = bad.len();
    bad[n - 9] = 1;
    let e = c
        .request(
            &Request::AddToStore(kiln_protocol::ops::AddToStore::Ca {
                name: "bad".into(),
                method: kiln_format::store_path::ContentAddressMethod::Fixed(
                    kiln_format::FileIngestionMethod::Recursive,
                ),
                algo: kiln_format::HashAlgo::Sha256,
                refs: BTreeSet::new(),
                repair: false,
            }),
            Some(&mut bad.as_slice()),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("padding") || e.to_string().contains("archive"),
        "{e}"
    );
    // And the connection is still in step.
    assert!(matches!(
        c.request(&Request::IsValidPath(p), None, &mut |_| {})
            .unwrap(),
        Reply::Bool(false)
    ));
}
