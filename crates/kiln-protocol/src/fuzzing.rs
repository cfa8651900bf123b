//! Invariants the protocol fuzz target checks (`fuzz/fuzz_targets/protocol.rs`), kept here
//! so that tests replay committed inputs through them without a fuzzer.

use std::io::{BufReader, Cursor};

use kiln_format::StoreDir;

use crate::ops::{Op, Reply, Request};
use crate::server::{serve, Handler, OpIo, ServerConfig};
use crate::stderr::RemoteError;
use crate::version::{Feature, Features, Proto, Version};
use crate::wire::WireReader;

const VERSIONS: [u64; 9] = [
    0x10a, 0x118, 0x11e, 0x122, 0x163, 0x164, 0x123, 0x125, 0x126,
];

/// The connection a selector byte picks: a version, and for 1.38 all features or none.
fn proto(sel: u8) -> Proto {
    let v = Version(VERSIONS[sel as usize % VERSIONS.len()]);
    match Proto::for_client(v) {
        Ok(p) if p.feature_exchange() && sel >= 128 => p.with_features(Features::of(&Feature::ALL)),
        Ok(p) => p,
        Err(_) => Proto::nix(v.0),
    }
}

fn store_dir() -> StoreDir {
    // A constant that is a valid store directory.
    StoreDir::new("/nix/store").unwrap_or_else(|_| unreachable!("valid store directory"))
}

/// Reads requests from `data` (the first byte picks the client version) until the input
/// ends or is refused. Every request that parses must survive a round trip: written back
/// and read again, it is the same request.
pub fn check_requests(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let v = proto(sel);
    let sd = store_dir();
    let mut r = WireReader::new(BufReader::new(rest));
    while let Ok(Some(n)) = r.u64_or_eof("op") {
        let Some(op) = Op::from_wire(n, v) else {
            return;
        };
        let Ok(q) = Request::read(op, v, &sd, &mut r) else {
            return;
        };
        let mut again = Vec::new();
        if q.write(v, &sd, &mut again).is_err() {
            return;
        }
        let mut r2 = WireReader::new(BufReader::new(again.as_slice()));
        let op2 = r2.u64("op").ok().and_then(|n| Op::from_wire(n, v));
        assert_eq!(op2, Some(op), "operation changed in a round trip");
        let q2 = Request::read(op, v, &sd, &mut r2);
        assert!(
            matches!(&q2, Ok(x) if *x == q),
            "request changed in a round trip: {q:?} vs {q2:?}"
        );
        // Replies to this operation, read from the rest of the input, round-trip too.
        if let Ok(reply) = Reply::read(op, v, &sd, &mut r) {
            if matches!(reply, Reply::Stream(_)) {
                continue;
            }
            let mut b = Vec::new();
            if reply.write(v, &sd, &mut b).is_ok() {
                let back = Reply::read(
                    op,
                    v,
                    &sd,
                    &mut WireReader::new(BufReader::new(b.as_slice())),
                );
                assert!(back.is_ok(), "a written reply does not read back");
            }
        }
    }
}

/// A handler that answers without a store: enough for the server loop to run.
struct Null;

impl Handler for Null {
    fn handle(&mut self, req: Request, io: &mut OpIo<'_>) -> Result<Reply, RemoteError> {
        // Consume data streams as a real handler would.
        let _ = std::io::copy(&mut io.data(), &mut std::io::sink());
        Ok(match req {
            Request::IsValidPath(_) => Reply::Bool(false),
            Request::QueryPathInfo(_) => Reply::PathInfo(None),
            _ => Reply::Nothing,
        })
    }
}

/// Feeds `data` to the server as a whole connection: it must end (with an error or not)
/// without panicking, whatever the bytes.
pub fn check_connection(data: &[u8]) {
    let cfg = ServerConfig {
        store_dir: store_dir(),
        version_string: "fuzz".into(),
    };
    let input = Cursor::new(data.to_vec());
    let _ = serve(
        Box::new(input),
        Box::new(std::io::sink()),
        None,
        &cfg,
        |_| Ok(Null),
    );
}
