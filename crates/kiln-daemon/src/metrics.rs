//! `kiln daemon --metrics ADDR`: Prometheus's text format at `GET /metrics`, over a plain
//! HTTP/1.1 listener on a thread of its own.
//!
//! Requests are answered one at a time, each with a 5-second limit to send its head: a
//! scraper asks every few seconds, and a client that sends nothing cannot hold the
//! listener longer than that. Only the request line is looked at; nothing a client sends
//! is stored or echoed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::{Daemon, Error};

/// The longest request head read.
const MAX_HEAD: u64 = 8 * 1024;

pub(crate) fn serve(daemon: Arc<Daemon>, addr: &str) -> Result<std::net::SocketAddr, Error> {
    let io = |action, source| Error::Io {
        path: addr.to_string(),
        action,
        source,
    };
    let listener = TcpListener::bind(addr).map_err(|e| io("listen on", e))?;
    let local = listener.local_addr().map_err(|e| io("listen on", e))?;
    std::thread::Builder::new()
        .name("kiln-metrics".into())
        .spawn(move || {
            for s in listener.incoming() {
                match s {
                    Ok(s) => {
                        if let Err(e) = answer(&daemon, s) {
                            tracing::debug!("metrics request: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("metrics listener: {e}"),
                }
            }
        })
        .map_err(|e| io("start the metrics thread for", e))?;
    Ok(local)
}

fn answer(daemon: &Daemon, s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new((&s).take(MAX_HEAD));
    let mut line = String::new();
    r.read_line(&mut line)?;
    // The rest of the head, up to the blank line.
    let mut h = String::new();
    while r.read_line(&mut h)? > 0 && h.trim_end() != "" {
        h.clear();
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", daemon.metrics_text()),
        ("GET" | "HEAD", _) => ("404 Not Found", "not found: try /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "only GET\n".to_string()),
    };
    let mut w = &s;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        w.write_all(body.as_bytes())?;
    }
    w.flush()
}
