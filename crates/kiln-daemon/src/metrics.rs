//! `kiln daemon --metrics ADDR`: Prometheus's text format at `GET /metrics`, over a plain
//! HTTP/1.1 listener on a thread of its own.
//!
//! Requests are answered one at a time, each with 5 seconds in all to send its head (not
//! per read: a client sending a byte now and then cannot hold the listener longer) and 5 to
//! take the answer. A scraper asks every few seconds. Only the request line is looked at;
//! nothing a client sends is stored or echoed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Reads a request's head (up to its blank line, at most `MAX_HEAD` bytes) before
/// `deadline`.
fn read_head(mut s: &TcpStream, deadline: Instant) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || head.len() as u64 >= MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request head too slow or too long",
            ));
        }
        s.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

fn answer(daemon: &Daemon, s: TcpStream) -> std::io::Result<()> {
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let head = read_head(&s, Instant::now() + Duration::from_secs(5))?;
    let mut line = String::new();
    BufReader::new(&head[..]).read_line(&mut line)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// A connected pair: what the client writes, the listener's side reads.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    #[test]
    fn heads_are_bounded_in_size_and_time() {
        // A whole head is read.
        let (mut c, s) = pair();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let h = read_head(&s, Instant::now() + Duration::from_secs(5)).unwrap();
        assert!(h.starts_with(b"GET /metrics"));
        // A head that never ends is refused at MAX_HEAD bytes.
        let (mut c, s) = pair();
        let line = vec![b'a'; 1024];
        let writer = std::thread::spawn(move || {
            for _ in 0..(MAX_HEAD / 1024 + 2) {
                if c.write_all(&line).is_err() {
                    break;
                }
            }
            c
        });
        let e = read_head(&s, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        drop(writer.join());
        // A client sending a byte now and then is cut at the deadline, not per read.
        let (mut c, s) = pair();
        // (It trickles for 10 s; the deadline is 300 ms, and 5 s of slack for a busy
        // machine still tells a whole-request deadline from one per read.)
        let trickle = std::thread::spawn(move || {
            for _ in 0..200 {
                if c.write_all(b"G").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let start = Instant::now();
        let e = read_head(&s, Instant::now() + Duration::from_millis(300)).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ),
            "{e}"
        );
        drop(s);
        let _ = trickle.join();
    }
}
