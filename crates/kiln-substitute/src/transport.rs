//! Reading and writing the files of a cache, local or over HTTP.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::url::{CacheUrl, Location};
use crate::{Error, Result};

/// Network limits, and the credentials (`netrc-file`) of the hosts that need some.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// Establishing a connection.
    pub connect: Duration,
    /// Longest wait for the next bytes of an answer (Nix's `stalled-download-timeout`):
    /// a cache that stops sending mid-NAR fails the download instead of hanging it.
    pub stalled: Duration,
    /// Attempts for a request that failed before its body started (connection refused or
    /// reset, 5xx): transient failures of a busy cache are retried, with a growing pause.
    pub attempts: u32,
    pub netrc: Option<std::sync::Arc<crate::netrc::Netrc>>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            stalled: Duration::from_secs(300),
            attempts: 3,
            netrc: None,
        }
    }
}

/// A readable byte stream from a cache.
pub type Stream = Box<dyn Read + Send>;

/// Access to one cache's files.
#[derive(Debug)]
pub struct Transport {
    location: Location,
    base: String,
    agent: Option<ureq::Agent>,
    attempts: u32,
    /// `Authorization` for this cache's host, from `netrc-file`.
    auth: Option<String>,
}

/// Checks a path taken from a narinfo (`URL:`), which the cache controls: it must stay
/// inside the cache (no `..`, not absolute), or a file:// cache could hand out any file
/// of this machine as a NAR.
pub fn check_relative(rel: &str) -> Result<()> {
    if rel.is_empty()
        || rel.starts_with('/')
        || rel.contains("://")
        || rel.contains('\0')
        || rel.split('/').any(|c| c == ".." || c == ".")
    {
        return Err(Error::Corrupt(format!(
            "refusing file name '{}' in a binary cache: it must be a relative path inside the cache",
            rel.escape_default()
        )));
    }
    Ok(())
}

/// Statuses that mean "not in this cache" (Nix treats 403 like 404).
fn absent(status: u16) -> bool {
    matches!(status, 404 | 403 | 410)
}

impl Transport {
    pub fn new(url: &CacheUrl, timeouts: Timeouts) -> Transport {
        let agent = match url.location {
            Location::Http(_) => {
                let cfg = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_connect(Some(timeouts.connect))
                    .timeout_per_read(Some(timeouts.stalled))
                    .timeout_recv_response(Some(timeouts.stalled))
                    .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
                    // A cache's credentials (netrc) go to that cache only: a redirect to
                    // another place must not collect them.
                    .redirect_auth_headers(ureq::config::RedirectAuthHeaders::Never)
                    .build();
                Some(ureq::Agent::new_with_config(cfg))
            }
            Location::File(_) => None,
        };
        let auth = match (&url.location, &timeouts.netrc) {
            (Location::Http(base), Some(n)) => {
                crate::netrc::host_of(base).and_then(|h| n.authorization(h))
            }
            _ => None,
        };
        Transport {
            location: url.location.clone(),
            base: url.base.clone(),
            agent,
            attempts: timeouts.attempts.max(1),
            auth,
        }
    }

    /// How messages name a file of the cache.
    pub fn describe(&self, rel: &str) -> String {
        format!("{}/{rel}", self.base)
    }

    fn local(&self, rel: &str) -> Option<PathBuf> {
        match &self.location {
            Location::File(d) => Some(d.join(rel)),
            Location::Http(_) => None,
        }
    }

    /// Opens a file of the cache; `None` if the cache does not have it.
    pub fn get(&self, rel: &str) -> Result<Option<Stream>> {
        Ok(self.get_sized(rel)?.map(|(s, _)| s))
    }

    /// [`Transport::get`], with the file's length where the cache tells it (a local
    /// file's size, HTTP's `Content-Length`).
    pub fn get_sized(&self, rel: &str) -> Result<Option<(Stream, Option<u64>)>> {
        check_relative(rel)?;
        let fail = |why: String| Error::Transfer {
            url: self.describe(rel),
            action: "download",
            why,
        };
        if let Some(p) = self.local(rel) {
            return match std::fs::File::open(&p) {
                Ok(f) => {
                    let len = f.metadata().ok().map(|m| m.len());
                    Ok(Some((Box::new(f), len)))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(fail(e.to_string())),
            };
        }
        let (Some(agent), Location::Http(base)) = (&self.agent, &self.location) else {
            return Err(fail("no transport".into()));
        };
        let url = format!("{base}/{rel}");
        let mut pause = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let mut req = agent.get(&url);
            if let Some(a) = &self.auth {
                req = req.header("Authorization", a);
            }
            let transient = match req.call() {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match status {
                        200..=299 => {
                            let len = resp
                                .headers()
                                .get("content-length")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.trim().parse().ok());
                            return Ok(Some((Box::new(resp.into_body().into_reader()), len)));
                        }
                        st if absent(st) => return Ok(None),
                        500..=599 | 429 => format!("HTTP error {status}"),
                        _ => return Err(fail(format!("HTTP error {status}"))),
                    }
                }
                Err(e) => e.to_string(),
            };
            if attempt >= self.attempts {
                return Err(fail(transient));
            }
            tracing::debug!("{url}: {transient}; retrying in {pause:?}");
            std::thread::sleep(pause);
            pause *= 4;
            attempt += 1;
        }
    }

    /// Reads a small file whole, refusing more than `limit` bytes.
    pub fn get_small(&self, rel: &str, limit: usize) -> Result<Option<Vec<u8>>> {
        let Some(r) = self.get(rel)? else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        r.take(limit as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::Transfer {
                url: self.describe(rel),
                action: "download",
                why: e.to_string(),
            })?;
        if buf.len() > limit {
            return Err(Error::Corrupt(format!(
                "'{}' is larger than {limit} bytes",
                self.describe(rel)
            )));
        }
        Ok(Some(buf))
    }

    /// Whether the cache has a file.
    pub fn exists(&self, rel: &str) -> Result<bool> {
        check_relative(rel)?;
        if let Some(p) = self.local(rel) {
            return Ok(p.exists());
        }
        let (Some(agent), Location::Http(base)) = (&self.agent, &self.location) else {
            return Ok(false);
        };
        // HEAD: asking whether a NAR is there must not download it.
        let mut req = agent.head(&format!("{base}/{rel}"));
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let resp = req.call().map_err(|e| Error::Transfer {
            url: self.describe(rel),
            action: "query",
            why: e.to_string(),
        })?;
        match resp.status().as_u16() {
            200..=299 => Ok(true),
            st if absent(st) => Ok(false),
            st => Err(Error::Transfer {
                url: self.describe(rel),
                action: "query",
                why: format!("HTTP error {st}"),
            }),
        }
    }

    /// Stores `data` (a file on this machine) as `rel`: a local cache gets it by an
    /// atomic rename (readers never see half a file), an HTTP cache by `PUT`.
    pub fn put(&self, rel: &str, data: &Path, content_type: &str) -> Result<()> {
        check_relative(rel)?;
        let fail = |why: String| Error::Transfer {
            url: self.describe(rel),
            action: "upload",
            why,
        };
        if let Some(dest) = self.local(rel) {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
            }
            return std::fs::rename(data, &dest).map_err(|e| fail(e.to_string()));
        }
        let (Some(agent), Location::Http(base)) = (&self.agent, &self.location) else {
            return Err(fail("no transport".into()));
        };
        let f = std::fs::File::open(data).map_err(|e| fail(e.to_string()))?;
        let len = f.metadata().map_err(|e| fail(e.to_string()))?.len();
        // With a length, not chunked: servers that store uploads (WebDAV, S3 gateways)
        // often refuse chunked request bodies, and Nix sends the length too.
        let mut req = agent.put(&format!("{base}/{rel}"));
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let resp = req
            .header("Content-Type", content_type)
            .header("Content-Length", len.to_string())
            .send(ureq::SendBody::from_owned_reader(f))
            .map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP error {}", resp.status().as_u16())));
        }
        Ok(())
    }

    /// Stores a small text file.
    pub fn put_bytes(&self, rel: &str, bytes: &[u8], content_type: &str) -> Result<()> {
        let tmp = self.scratch_file()?;
        {
            let mut f = std::fs::File::create(&tmp.0).map_err(|e| Error::Transfer {
                url: tmp.0.display().to_string(),
                action: "create",
                why: e.to_string(),
            })?;
            f.write_all(bytes).map_err(|e| Error::Transfer {
                url: tmp.0.display().to_string(),
                action: "write",
                why: e.to_string(),
            })?;
        }
        self.put(rel, &tmp.0, content_type)
    }

    /// A file to stage an upload in: inside a local cache (same file system, so the final
    /// rename is atomic), else in the temporary directory. Removed when dropped unless
    /// renamed away.
    pub fn scratch_file(&self) -> Result<Scratch> {
        let dir = match &self.location {
            Location::File(d) => d.clone(),
            Location::Http(_) => std::env::temp_dir(),
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::Transfer {
            url: dir.display().to_string(),
            action: "create",
            why: e.to_string(),
        })?;
        let n: u64 = rand::random();
        Ok(Scratch(dir.join(format!(".kiln-upload-{n:016x}"))))
    }
}

/// A staging file, removed on drop if it still exists.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narinfo_urls_stay_inside_the_cache() {
        for ok in ["nar/abc.nar.xz", "nar/x/y.nar"] {
            check_relative(ok).unwrap();
        }
        for bad in [
            "../etc/shadow",
            "nar/../../x",
            "/etc/passwd",
            "",
            "http://other/x",
            "./x",
        ] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_get_and_put() {
        let d = tempfile::tempdir().unwrap();
        let url = CacheUrl::parse(&format!("file://{}", d.path().display())).unwrap();
        let t = Transport::new(&url, Timeouts::default());
        assert!(t.get("nar/none").unwrap().is_none());
        t.put_bytes("nar/a.nar", b"hello", "application/x-nix-nar")
            .unwrap();
        assert_eq!(t.get_small("nar/a.nar", 10).unwrap().unwrap(), b"hello");
        assert!(t.get_small("nar/a.nar", 3).is_err());
        assert!(t.exists("nar/a.nar").unwrap());
        // No staging files are left behind.
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".kiln-upload"))
            .collect();
        assert!(left.is_empty());
    }
}
