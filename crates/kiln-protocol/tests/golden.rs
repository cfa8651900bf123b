//! The protocol against bytes recorded from the real Nix 2.8 daemon
//! (`tests/fixtures/protocol/generate.py`): kiln reads what Nix's client side sends into
//! the expected requests, reads what Nix's daemon answers, and writes those answers back
//! byte for byte.

#![allow(clippy::unwrap_used)]

use std::io::BufReader;

use kiln_format::store_path::ContentAddressMethod;
use kiln_format::{FileIngestionMethod, HashAlgo, StoreDir};
use kiln_protocol::ops::AddToStore;
use kiln_protocol::stderr::{STDERR_ERROR, STDERR_LAST};
use kiln_protocol::wire::WireReader;
use kiln_protocol::{Op, Proto, Reply, Request, Version};
use kiln_testkit::Transcript;

/// The connection a transcript's client had with a daemon of today.
fn proto(client_version: u64) -> Proto {
    Proto::for_client(Version(client_version)).unwrap()
}

fn reader(b: &[u8]) -> WireReader<BufReader<&[u8]>> {
    WireReader::new(BufReader::new(b))
}

/// Parses the request in a step's client bytes.
fn request(t: &Transcript, label: &str) -> Request {
    let v = proto(t.client_version);
    let sd = StoreDir::new(t.store_dir.clone()).unwrap();
    let step = t.step(label);
    let mut r = reader(&step.client);
    let op = Op::from_wire(r.u64("op").unwrap(), v).unwrap();
    Request::read(op, v, &sd, &mut r).unwrap()
}

/// The offset of the first `STDERR_LAST` or `STDERR_ERROR` in a daemon's answer, after the
/// messages it sent while working.
fn skip_stderr(v: Proto, b: &[u8]) -> usize {
    use kiln_protocol::stderr::*;
    let mut r = reader(b);
    loop {
        let at = r.position() as usize;
        match r.u64("msg").unwrap() {
            STDERR_LAST | STDERR_ERROR => return at,
            STDERR_NEXT => {
                r.string(1 << 20, "line").unwrap();
            }
            STDERR_START_ACTIVITY => {
                r.u64("id").unwrap();
                r.u64("level").unwrap();
                r.u64("type").unwrap();
                r.string(1 << 20, "text").unwrap();
                skip_fields(&mut r);
                r.u64("parent").unwrap();
            }
            STDERR_STOP_ACTIVITY => {
                r.u64("id").unwrap();
            }
            STDERR_RESULT => {
                r.u64("id").unwrap();
                r.u64("type").unwrap();
                skip_fields(&mut r);
            }
            m => panic!("unexpected stderr message {m:#x} (client {v})"),
        }
    }
}

fn skip_fields(r: &mut WireReader<BufReader<&[u8]>>) {
    let n = r.u64("fields").unwrap();
    for _ in 0..n {
        if r.u64("type").unwrap() == 0 {
            r.u64("int").unwrap();
        } else {
            r.string(1 << 20, "string").unwrap();
        }
    }
}

/// Reads a step's successful reply with kiln's client half and writes it again with its
/// server half: the bytes must be Nix's.
fn reply_round_trip(t: &Transcript, label: &str, op: Op) -> Reply {
    let v = proto(t.client_version);
    let sd = StoreDir::new(t.store_dir.clone()).unwrap();
    let step = t.step(label);
    // Skip what the daemon logged while working (activities, log lines).
    let start = skip_stderr(v, &step.daemon);
    let payload = &step.daemon[start..];
    let mut r = reader(payload);
    assert_eq!(r.u64("msg").unwrap(), STDERR_LAST, "{label}: not a success");
    let reply = Reply::read(op, v, &sd, &mut r).unwrap();
    let consumed = r.position() as usize;
    assert_eq!(consumed, payload.len(), "{label}: trailing bytes");
    let again = Reply::read(op, v, &sd, &mut reader(&payload[8..])).unwrap();
    let mut out = STDERR_LAST.to_le_bytes().to_vec();
    again.write(v, &sd, &mut out).unwrap();
    assert_eq!(
        out, payload,
        "{label}: kiln writes different bytes than Nix 2.8"
    );
    reply
}

#[test]
fn nix_2_8_requests_parse_as_expected() {
    let t = Transcript::load("nix-2.8-session-a");
    let sd = StoreDir::new(t.store_dir.clone()).unwrap();
    match request(&t, "SetOptions") {
        Request::SetOptions(o) => {
            assert_eq!(o.verbosity, 3);
            assert_eq!(o.max_build_jobs, Some(1));
            assert_eq!(o.build_cores, Some(2));
            assert!(o.use_substitutes && o.use_build_hook && !o.keep_going);
            assert!(o.overrides.is_empty());
        }
        q => panic!("{q:?}"),
    }
    match request(&t, "AddToStore fixed:r:sha256") {
        Request::AddToStore(AddToStore::Ca {
            name,
            method,
            algo,
            refs,
            repair,
        }) => {
            assert_eq!(name, "hello.txt");
            assert_eq!(
                method,
                ContentAddressMethod::Fixed(FileIngestionMethod::Recursive)
            );
            assert_eq!(algo, HashAlgo::Sha256);
            assert!(refs.is_empty() && !repair);
        }
        q => panic!("{q:?}"),
    }
    match request(&t, "AddTextToStore") {
        Request::AddTextToStore { name, text, refs } => {
            assert_eq!(name, "greeting");
            assert_eq!(text, b"hello world\n");
            assert_eq!(refs.len(), 1);
        }
        q => panic!("{q:?}"),
    }
    match request(&t, "QueryValidPaths") {
        Request::QueryValidPaths { paths, substitute } => {
            assert_eq!(paths.len(), 2);
            assert!(!substitute);
        }
        q => panic!("{q:?}"),
    }
    match request(&t, "QueryMissing") {
        Request::QueryMissing(p) => assert_eq!(p.len(), 1),
        q => panic!("{q:?}"),
    }
    // A path outside the store is refused while reading, naming the problem and where.
    let v = proto(t.client_version);
    let step = t.step("IsValidPath not in store");
    let mut r = reader(&step.client);
    r.u64("op").unwrap();
    let e = Request::read(Op::IsValidPath, v, &sd, &mut r)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/tmp/foo") && e.contains("byte 8"), "{e}");
}

#[test]
fn nix_2_8_replies_are_written_byte_for_byte() {
    let t = Transcript::load("nix-2.8-session-a");
    match reply_round_trip(&t, "AddToStore fixed:r:sha256", Op::AddToStore) {
        Reply::PathInfoWithPath(i) => {
            assert_eq!(i.nar_size, 120);
            assert!(i.ca.is_some());
            assert!(!i.ultimate);
        }
        r => panic!("{r:?}"),
    }
    assert!(matches!(
        reply_round_trip(&t, "IsValidPath", Op::IsValidPath),
        Reply::Bool(true)
    ));
    match reply_round_trip(&t, "QueryPathInfo", Op::QueryPathInfo) {
        Reply::PathInfo(Some(i)) => assert_eq!(i.nar_size, 120),
        r => panic!("{r:?}"),
    }
    assert!(matches!(
        reply_round_trip(&t, "QueryPathInfo invalid", Op::QueryPathInfo),
        Reply::PathInfo(None)
    ));
    reply_round_trip(&t, "AddTextToStore", Op::AddTextToStore);
    reply_round_trip(&t, "AddToStore text:sha256", Op::AddToStore);
    reply_round_trip(&t, "AddToStore fixed:sha1 flat", Op::AddToStore);
    match reply_round_trip(&t, "QueryValidPaths", Op::QueryValidPaths) {
        Reply::Paths(p) => assert_eq!(p.len(), 1),
        r => panic!("{r:?}"),
    }
    reply_round_trip(&t, "QueryPathFromHashPart", Op::QueryPathFromHashPart);
    match reply_round_trip(&t, "QueryReferrers", Op::QueryReferrers) {
        Reply::Paths(p) => assert_eq!(p.len(), 1),
        r => panic!("{r:?}"),
    }
    reply_round_trip(&t, "QueryDeriver", Op::QueryDeriver);
    reply_round_trip(&t, "AddTempRoot", Op::AddTempRoot);
    reply_round_trip(&t, "SyncWithGC", Op::SyncWithGc);
    reply_round_trip(&t, "QueryMissing", Op::QueryMissing);
}

#[test]
fn nix_errors_are_read_in_both_layouts() {
    // Structured (≥ 1.26), from an error raised before the operation's work started: Nix
    // 2.8 sends the frame twice and closes; kiln's client reads the first.
    let t = Transcript::load("nix-2.8-session-a");
    let step = t.step("IsValidPath not in store");
    let mut r = reader(&step.daemon);
    assert_eq!(r.u64("msg").unwrap(), STDERR_ERROR);
    assert_eq!(r.string(100, "type").unwrap(), "Error");
    r.u64("level").unwrap();
    r.string(100, "name").unwrap();
    let msg = r.string(1000, "msg").unwrap();
    assert!(
        msg.contains("/tmp/foo") && msg.contains("is not in the Nix store"),
        "{msg}"
    );
    assert_eq!(r.u64("pos").unwrap(), 0);
    assert_eq!(r.u64("traces").unwrap(), 0);
    // Nix 2.8 sent the same frame a second time.
    assert_eq!(r.position() as usize * 2, step.daemon.len());

    // The old form (< 1.26): message with Nix's prefix, then a status.
    let t = Transcript::load("nix-1.24-legacy-add");
    let step = t.step("IsValidPath not in store (old client)");
    let mut r = reader(&step.daemon);
    assert_eq!(r.u64("msg").unwrap(), STDERR_ERROR);
    let msg = r.string(1000, "msg").unwrap();
    assert!(msg.contains("error:") && msg.contains("/tmp/foo"), "{msg}");
    assert_eq!(r.u64("status").unwrap(), 1);
    // At 1.24 an absent path is still "found: 0", not an error.
    let step = t.step("QueryPathInfo invalid (old client)");
    assert_eq!(step.daemon, [STDERR_LAST.to_le_bytes(), [0; 8]].concat());
}

#[test]
fn legacy_add_to_store_layout() {
    let t = Transcript::load("nix-1.24-legacy-add");
    let v = proto(t.client_version);
    assert!(!v.add_to_store_ca());
    match request(&t, "AddToStore legacy flat") {
        Request::AddToStore(AddToStore::Legacy { name, method, algo }) => {
            assert_eq!(name, "flat.txt");
            assert_eq!(method, FileIngestionMethod::Flat);
            assert_eq!(algo, HashAlgo::Sha256);
        }
        q => panic!("{q:?}"),
    }
    // The reply is a bare path.
    match reply_round_trip(&t, "AddToStore legacy flat", Op::AddToStore) {
        Reply::OptPath(Some(p)) => assert_eq!(p.name(), "flat.txt"),
        r => panic!("{r:?}"),
    }
    // The handshake of a 1.24 client has no version string.
    let hs = t.step("handshake");
    assert_eq!(hs.daemon.len(), 8 + 8 + 8, "magic, version, STDERR_LAST");
}

#[test]
fn unknown_and_foreign_operations_are_refused() {
    let v = proto(0x122);
    assert!(Op::from_wire(99, v).is_none());
    // Guix's failed-path operations are not Nix 2.8's.
    assert!(Op::from_wire(24, v).is_none());
    assert!(Op::from_wire(80, v).is_none());
    let g = proto(0x164);
    assert_eq!(Op::from_wire(80, g), Some(Op::BuiltinBuilders));
    assert!(Op::from_wire(39, g).is_none());
    // What Nix 2.8 says to them.
    for name in ["nix-2.8-unknown-op", "nix-2.8-guix-op"] {
        let t = Transcript::load(name);
        let step = &t.steps[1];
        let mut r = reader(&step.daemon);
        assert_eq!(r.u64("msg").unwrap(), STDERR_ERROR);
        r.string(100, "type").unwrap();
        r.u64("level").unwrap();
        r.string(100, "name").unwrap();
        assert!(r.string(1000, "msg").unwrap().contains("invalid operation"));
    }
}

/// nix-daemon 2.34.8's answers at 1.35, 1.37 and 1.38 (recorded by `generate.py
/// --nix-2.34`): kiln's client half reads every request and reply, and its server half
/// writes the replies again byte for byte (trust flag, CPU times, `AddPermRoot`).
#[test]
fn nix_2_34_transcripts_round_trip() {
    for (name, minor) in [
        ("nix-2.34-at-1.35", 35u64),
        ("nix-2.34-at-1.37", 37),
        ("nix-2.34-at-1.38", 38),
    ] {
        let t = Transcript::load(name);
        let v = proto(t.client_version);
        assert_eq!(v.version().minor(), minor);
        // The handshake: 1.38 for a client that sent its version with the magic, the
        // feature list at 1.38 (nix-daemon 2.34 names none), the version string, the
        // trust flag from 1.35 on (1: trusted), then the end of the startup messages.
        let hs = &t.step("handshake").daemon;
        let mut r = reader(hs);
        assert_eq!(r.u64("magic").unwrap(), 0x6478_696f);
        assert_eq!(r.u64("version").unwrap(), 0x126, "{name}");
        if v.feature_exchange() {
            assert!(r.strings("features").unwrap().is_empty());
        }
        assert_eq!(r.string(100, "version").unwrap(), "2.34.8");
        assert_eq!(r.u64("trust").unwrap(), 1, "{name}");
        assert_eq!(r.u64("last").unwrap(), STDERR_LAST);
        assert_eq!(r.position() as usize, hs.len());

        let sd = StoreDir::new(t.store_dir.clone()).unwrap();
        for (label, op) in [
            ("SetOptions", Op::SetOptions),
            ("QueryPathInfo", Op::QueryPathInfo),
            ("QueryPathInfo invalid", Op::QueryPathInfo),
            ("BuildPathsWithResults ok", Op::BuildPathsWithResults),
            ("BuildPathsWithResults failing", Op::BuildPathsWithResults),
        ] {
            let q = request(&t, label);
            assert_eq!(q.op(), op, "{name}: {label}");
            // Written again by kiln's client half: the same bytes.
            let mut again = Vec::new();
            q.write(v, &sd, &mut again).unwrap();
            assert_eq!(again, t.step(label).client, "{name}: {label}");
            let reply = reply_round_trip(&t, label, op);
            if let Reply::BuildResults(rs) = reply {
                let r = &rs[0].1;
                if label.ends_with("failing") {
                    assert_eq!(r.status, 3, "{name}: a permanent failure");
                    assert!(r.error_msg.contains("exit code 1"), "{}", r.error_msg);
                } else {
                    // Built (0), or already valid (2) from the run at an earlier version.
                    assert!(r.status == 0 || r.status == 2, "{name}: {}", r.status);
                    assert_eq!(r.built_outputs.len(), 1);
                }
            }
        }
        if minor >= 36 {
            match reply_round_trip(&t, "AddPermRoot", Op::AddPermRoot) {
                Reply::String(root) => assert!(root.ends_with(&format!("/root-{minor}"))),
                r => panic!("{r:?}"),
            }
        }
        if minor >= 38 {
            // Removed by Nix 2.34: "invalid operation", as kiln's table says.
            let step = t.step("QueryReferences (removed in 2.34)");
            let text = String::from_utf8_lossy(&step.daemon);
            assert!(
                text.contains("invalid operation \x1b[35;1m5\x1b[0m"),
                "{text}"
            );
            assert_eq!(Op::from_wire(5, v), None);
        }
    }
}
