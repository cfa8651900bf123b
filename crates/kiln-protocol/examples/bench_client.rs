//! A small native client for the daemon benchmarks (`bench/run.py daemon`):
//!
//!     bench_client SOCKET STORE_DIR query PATH CONNECTIONS QUERIES_PER_CONNECTION
//!     bench_client SOCKET STORE_DIR connect PATH THREADS CONNECTIONS_PER_THREAD
//!
//! `query` runs `QueryPathInfo` in a loop on each connection; `connect` opens connections
//! (handshake + one `IsValidPath`) and closes them. Prints `operations seconds`.

use std::path::PathBuf;
use std::time::Instant;

use kiln_format::StoreDir;
use kiln_protocol::{Client, Reply, Request};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 7 {
        eprintln!("usage: bench_client SOCKET STORE_DIR query|connect ARG N M");
        std::process::exit(2);
    }
    let socket = PathBuf::from(&a[1]);
    let sd = StoreDir::new(a[2].clone()).expect("store directory");
    let n: usize = a[5].parse().expect("number");
    let m: usize = a[6].parse().expect("number");
    let path = sd.parse_path(&a[4]).expect("store path");
    let start = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (socket, sd, path, mode) = (socket.clone(), sd.clone(), path.clone(), a[3].clone());
            std::thread::spawn(move || {
                if mode == "query" {
                    let mut c = Client::connect(&socket, sd).expect("connect");
                    let q = Request::QueryPathInfo(path);
                    for _ in 0..m {
                        match c.request(&q, None, &mut |_| {}) {
                            Ok(Reply::PathInfo(Some(_))) => {}
                            r => panic!("unexpected answer: {r:?}"),
                        }
                    }
                } else {
                    for _ in 0..m {
                        let mut c = Client::connect(&socket, sd.clone()).expect("connect");
                        match c.request(&Request::IsValidPath(path.clone()), None, &mut |_| {}) {
                            Ok(Reply::Bool(true)) => {}
                            r => panic!("unexpected answer: {r:?}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    println!("{} {:.6}", n * m, start.elapsed().as_secs_f64());
}
