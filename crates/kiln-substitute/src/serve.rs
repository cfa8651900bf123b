//! Serving a store as a binary cache over HTTP (`kiln serve`).
//!
//! * `GET /nix-cache-info`
//! * `GET /HASH.narinfo`: made from the database, signed with the configured keys.
//! * `GET /nar/HASH.nar[.EXT]`: the path dumped on the fly, compressed on the fly, sent
//!   chunked; nothing is staged on disk or held whole in memory. Uncompressed NARs have a
//!   known length and answer `Range` requests (resumed downloads).
//!
//! Everything is read-only; the only input is the request line, and a hash part is
//! checked against the base-32 alphabet before it reaches the database.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_format::narinfo::NarInfo;
use kiln_format::signature::SecretKey;
use kiln_format::{nar, StorePath};
use kiln_store::LocalStore;

use crate::cache::CacheInfo;
use crate::compression;
use crate::{Error, Result};

/// How the store is served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `none` (default: lets clients resume with ranges and costs no CPU), `zstd`, `xz`,
    /// `bzip2`, `br` or `gzip`.
    pub compression: String,
    pub level: Option<i32>,
    pub keys: Vec<SecretKey>,
    /// Reported in `nix-cache-info`.
    pub priority: u64,
    /// Requests answered at once; more wait for a free one.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            compression: "none".into(),
            level: None,
            keys: Vec::new(),
            priority: 30,
            max_connections: 64,
        }
    }
}

/// A running server.
pub struct Server {
    http: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Server({})", self.addr)
    }
}

impl Server {
    /// Listens on `addr` (port 0: any free port) and serves `store` until dropped.
    pub fn start(store: Arc<LocalStore>, addr: &str, opts: ServeOptions) -> Result<Server> {
        if !compression::METHODS.contains(&opts.compression.as_str()) {
            return Err(Error::Unusable(format!(
                "unsupported compression '{}'",
                opts.compression
            )));
        }
        let http = tiny_http::Server::http(addr).map_err(|e| Error::Transfer {
            url: addr.to_string(),
            action: "listen on",
            why: e.to_string(),
        })?;
        let local = http
            .server_addr()
            .to_ip()
            .ok_or_else(|| Error::Unusable(format!("'{addr}' is not an IP address")))?;
        let http = Arc::new(http);
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (http.clone(), stop.clone());
        let opts = Arc::new(opts);
        let thread = std::thread::Builder::new()
            .name("kiln-serve".into())
            .spawn(move || accept_loop(&h, &s, store, opts))
            .map_err(|e| Error::Unusable(format!("cannot start the server thread: {e}")))?;
        Ok(Server {
            http,
            stop,
            thread: Some(thread),
            addr: local,
        })
    }

    /// Serves until the process ends.
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    http: &tiny_http::Server,
    stop: &AtomicBool,
    store: Arc<LocalStore>,
    opts: Arc<ServeOptions>,
) {
    let busy = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        let req = match http.recv_timeout(Duration::from_millis(500)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(_) => break,
        };
        // Bounded concurrency: wait for a slot rather than spawning without limit.
        while busy.load(Ordering::SeqCst) >= opts.max_connections.max(1) {
            std::thread::sleep(Duration::from_millis(2));
        }
        busy.fetch_add(1, Ordering::SeqCst);
        let (store, opts, slot) = (store.clone(), opts.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("kiln-serve-req".into())
            .spawn(move || {
                handle(&store, &opts, req);
                slot.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            // The request was moved into the failed closure and is dropped (the client
            // sees the connection close); the slot is given back.
            busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap_or_else(|_| {
        tiny_http::Header::from_bytes(&b"X-Kiln"[..], &b"1"[..]).expect("static header")
    })
}

fn text(status: u16, body: String, ctype: &str) -> tiny_http::ResponseBox {
    tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", ctype))
        .boxed()
}

fn not_found() -> tiny_http::ResponseBox {
    text(404, "not found\n".into(), "text/plain")
}

/// A hash part: 32 characters of Nix's base-32 alphabet.
fn hash_part(s: &str) -> Option<&str> {
    (s.len() == 32 && kiln_format::base32::is_valid(s.as_bytes())).then_some(s)
}

fn lookup(store: &LocalStore, hash: &str) -> Option<StorePath> {
    store.query_path_from_hash_part(hash).ok().flatten()
}

fn handle(store: &LocalStore, opts: &ServeOptions, req: tiny_http::Request) {
    let get = matches!(
        req.method(),
        tiny_http::Method::Get | tiny_http::Method::Head
    );
    let url = req.url().split('?').next().unwrap_or("").to_string();
    let range = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .map(|h| h.value.as_str().to_string());
    let resp = if !get {
        text(405, "method not allowed\n".into(), "text/plain")
    } else if url == "/nix-cache-info" {
        let info = CacheInfo {
            store_dir: store.store_dir().clone(),
            want_mass_query: true,
            priority: opts.priority,
        };
        text(200, info.to_text(), "text/x-nix-cache-info")
    } else if let Some(h) = url
        .strip_prefix('/')
        .and_then(|u| u.strip_suffix(".narinfo"))
        .and_then(hash_part)
    {
        match narinfo(store, opts, h) {
            Some(ni) => text(200, ni.to_text(store.store_dir()), "text/x-nix-narinfo"),
            None => not_found(),
        }
    } else if let Some(rest) = url.strip_prefix("/nar/") {
        let ext = compression::extension(&opts.compression);
        match rest
            .strip_suffix(&format!(".nar{ext}"))
            .and_then(hash_part)
            .and_then(|h| lookup(store, h))
        {
            Some(p) => nar_response(store, opts, &p, range.as_deref()),
            None => not_found(),
        }
    } else {
        not_found()
    };
    // One request per connection: tiny_http parks a pooled thread on every idle
    // keep-alive connection, and a client that opens many (Nix's curl opens one per
    // parallel transfer) could then stall the server while its requests wait unread.
    let resp = resp.with_header(header("Connection", "close"));
    if let Err(e) = req.respond(resp) {
        tracing::debug!("serving '{url}': {e}");
    }
}

fn narinfo(store: &LocalStore, opts: &ServeOptions, hash: &str) -> Option<NarInfo> {
    let p = lookup(store, hash)?;
    let info = store.query_path_info(&p).ok().flatten()?;
    let ext = compression::extension(&opts.compression);
    let plain = opts.compression == "none";
    let mut ni = NarInfo {
        store_path: p.clone(),
        url: format!("nar/{hash}.nar{ext}"),
        compression: opts.compression.clone(),
        // Compressed on the fly: the compressed file's hash is not known in advance.
        file_hash: plain.then_some(info.nar_hash),
        file_size: plain.then_some(info.nar_size),
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: info.references,
        deriver: info.deriver,
        system: None,
        sigs: info.sigs,
        ca: info.ca,
    };
    for k in &opts.keys {
        ni.sign(store.store_dir(), k);
    }
    Some(ni)
}

/// `bytes=A-B` / `bytes=A-` within `len`; `None` for anything else (served whole).
fn parse_range(h: &str, len: u64) -> Option<(u64, u64)> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = match b.trim() {
        "" => len.checked_sub(1)?,
        e => e.parse::<u64>().ok()?.min(len.checked_sub(1)?),
    };
    (start <= end).then_some((start, end))
}

fn nar_response(
    store: &LocalStore,
    opts: &ServeOptions,
    p: &StorePath,
    range: Option<&str>,
) -> tiny_http::ResponseBox {
    let Ok(Some(info)) = store.query_path_info(p) else {
        return not_found();
    };
    let real = store.real_path(p);
    let (method, level) = (opts.compression.clone(), opts.level);
    let (reader, mut writer) = match std::io::pipe() {
        Ok(rw) => rw,
        Err(e) => return text(500, format!("{e}\n"), "text/plain"),
    };
    // The dump runs beside the response; a client that goes away closes the pipe, which
    // ends the dump with an error that is only logged.
    std::thread::spawn(move || {
        let r = compression::compress(&method, level, &mut writer, |w| {
            nar::dump(&real, w)?;
            Ok(())
        });
        if let Err(e) = r {
            tracing::debug!("serving '{}': {e}", real.display());
        }
    });
    let ctype = header("Content-Type", "application/x-nix-nar");
    if opts.compression != "none" {
        return tiny_http::Response::new(200.into(), vec![ctype], reader, None, None).boxed();
    }
    let len = info.nar_size;
    if let Some((start, end)) = range.and_then(|r| parse_range(r, len)) {
        let mut reader = reader;
        if std::io::copy(&mut (&mut reader).take(start), &mut std::io::sink()).is_err() {
            return text(500, "cannot read the NAR\n".into(), "text/plain");
        }
        let n = end - start + 1;
        let headers = vec![
            ctype,
            header("Content-Range", &format!("bytes {start}-{end}/{len}")),
            header("Accept-Ranges", "bytes"),
        ];
        return tiny_http::Response::new(
            206.into(),
            headers,
            Box::new(reader.take(n)) as Box<dyn Read + Send>,
            Some(n as usize),
            None,
        )
        .with_chunked_threshold(usize::MAX)
        .boxed();
    }
    // A database row without a size (old imports) is sent chunked; otherwise exactly the
    // recorded size goes out, and a dump that differs ends short (the connection closes
    // and the client's hash check fails) rather than running past the declared length.
    let headers = vec![ctype, header("Accept-Ranges", "bytes")];
    tiny_http::Response::new(
        200.into(),
        headers,
        if len > 0 {
            Box::new(reader.take(len)) as Box<dyn Read + Send>
        } else {
            Box::new(reader)
        },
        (len > 0).then_some(len as usize),
        None,
    )
    // A known length is sent as Content-Length (progress, resumption), never chunked.
    .with_chunked_threshold(usize::MAX)
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=90-1000", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-10", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=0-", 0), None);
    }

    #[test]
    fn hash_parts() {
        assert!(hash_part("0123456789abcdfghijklmnpqrsvwxyz").is_some());
        assert!(hash_part("0123456789abcdfghijklmnpqrsvwxye").is_none()); // 'e'
        assert!(hash_part("../../etc/passwd").is_none());
    }
}
