//! The kernel's floor for the `QueryPathInfo` benchmark (`bench/run.py daemon`): a server
//! that does no work at all, to show how much of a daemon's CPU per query is the socket
//! round trip itself.
//!
//!     floor_server LISTEN_SOCKET DAEMON_SOCKET STORE_DIR PATH
//!
//! It asks the real daemon at DAEMON_SOCKET once for PATH's info, then listens on
//! LISTEN_SOCKET: a thread per connection, as kiln's daemon has, does the handshake and
//! answers every request with that same reply, encoded once, after one `recv` — no
//! parsing, no lookup, no allocation. A client that sends one request per write (as
//! `bench_client query` does) gets the answers a daemon would give, byte for byte.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use kiln_format::StoreDir;
use kiln_protocol::stderr::STDERR_LAST;
use kiln_protocol::version::{DAEMON_VERSION, WORKER_MAGIC_1, WORKER_MAGIC_2};
use kiln_protocol::wire::WireWrite;
use kiln_protocol::{Client, Proto, Reply, Request, Version};

fn read_u64(s: &mut UnixStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn serve(
    mut s: UnixStream,
    sd: &StoreDir,
    info: &kiln_format::ValidPathInfo,
) -> std::io::Result<()> {
    if read_u64(&mut s)? != WORKER_MAGIC_1 {
        return Ok(());
    }
    let mut hello = Vec::new();
    hello.u64(WORKER_MAGIC_2)?;
    hello.u64(DAEMON_VERSION)?;
    s.write_all(&hello)?;
    let Ok(v) = Proto::for_client(Version(read_u64(&mut s)?)) else {
        return Ok(());
    };
    let mut out = Vec::new();
    if v.feature_exchange() {
        // The client's features (ignored), then none of ours.
        for _ in 0..read_u64(&mut s)? {
            let n = read_u64(&mut s)?;
            if n > 1024 {
                return Ok(());
            }
            let mut skip = vec![0u8; (n as usize).div_ceil(8) * 8];
            s.read_exact(&mut skip)?;
        }
        // The client waits for this list before it sends the rest of its handshake.
        let mut none = Vec::new();
        none.u64(0)?;
        s.write_all(&none)?;
    }
    if v.cpu_affinity() && read_u64(&mut s)? != 0 {
        read_u64(&mut s)?;
    }
    if v.reserve_space() {
        read_u64(&mut s)?;
    }
    if v.daemon_version_string() {
        out.str("floor")?;
    }
    if v.trust_flag() {
        out.u64(1)?;
    }
    out.u64(STDERR_LAST)?;
    s.write_all(&out)?;
    let mut reply = Vec::new();
    reply.u64(STDERR_LAST)?;
    reply.extend_from_slice(&kiln_protocol::ops::found_path_info(v, sd, info));
    let mut buf = [0u8; 4096];
    loop {
        if s.read(&mut buf)? == 0 {
            return Ok(());
        }
        s.write_all(&reply)?;
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 5 {
        eprintln!("usage: floor_server LISTEN_SOCKET DAEMON_SOCKET STORE_DIR PATH");
        std::process::exit(2);
    }
    let sd = StoreDir::new(a[3].clone()).expect("store directory");
    let path = sd.parse_path(&a[4]).expect("store path");
    let mut c = Client::connect(&PathBuf::from(&a[2]), sd.clone()).expect("connect");
    let info = match c.request(&Request::QueryPathInfo(path), None, &mut |_| {}) {
        Ok(Reply::PathInfo(Some(i))) => Arc::new(i),
        r => panic!("unexpected answer: {r:?}"),
    };
    drop(c);
    let _ = std::fs::remove_file(&a[1]);
    let l = UnixListener::bind(&a[1]).expect("bind");
    for s in l.incoming() {
        let (s, sd, info) = (s.expect("accept"), sd.clone(), info.clone());
        std::thread::spawn(move || {
            let _ = serve(s, &sd, &info);
        });
    }
}
