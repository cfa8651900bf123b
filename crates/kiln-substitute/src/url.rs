//! Binary cache URLs: `file:///dir`, `http://host[:port]/path`, `https://…`, each with
//! optional `?name=value&…` parameters as Nix spells them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::{Error, Result};

/// Where a cache lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on this machine.
    File(PathBuf),
    /// `http://` or `https://` base URL, without a trailing slash.
    Http(String),
}

/// A parsed cache URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheUrl {
    /// The URL as configured (without parameters): how messages name the cache.
    pub base: String,
    pub location: Location,
    pub params: BTreeMap<String, String>,
}

impl CacheUrl {
    pub fn parse(url: &str) -> Result<CacheUrl> {
        let bad = |why: &str| Error::Url {
            url: url.to_string(),
            why: why.to_string(),
        };
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let mut params = BTreeMap::new();
        for kv in query.into_iter().flat_map(|q| q.split('&')) {
            if kv.is_empty() {
                continue;
            }
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            params.insert(percent_decode(k), percent_decode(v));
        }
        let location = if let Some(dir) = base.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad("a file:// cache needs an absolute directory"));
            }
            Location::File(PathBuf::from(percent_decode(dir)))
        } else if base.starts_with("http://") || base.starts_with("https://") {
            let host = base.split_once("://").map(|x| x.1).unwrap_or_default();
            if host.is_empty() || host.starts_with('/') {
                return Err(bad("no host"));
            }
            Location::Http(base.trim_end_matches('/').to_string())
        } else {
            return Err(bad(
                "unsupported scheme (kiln reads file://, http:// and https:// caches)",
            ));
        };
        Ok(CacheUrl {
            base: base.trim_end_matches('/').to_string(),
            location,
            params,
        })
    }

    /// A boolean parameter (`1`/`true`).
    pub fn flag(&self, name: &str) -> Option<bool> {
        self.params
            .get(name)
            .map(|v| matches!(v.as_str(), "1" | "true" | "yes"))
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Decodes `%XX` escapes (a `%` not followed by two hex digits stays as it is); bytes
/// that are not UTF-8 become U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations_and_params() {
        let u = CacheUrl::parse("file:///tmp/c?store=/fnord/store&priority=10").unwrap();
        assert_eq!(u.location, Location::File("/tmp/c".into()));
        assert_eq!(u.param("store"), Some("/fnord/store"));
        assert_eq!(u.param("priority"), Some("10"));
        assert_eq!(u.base, "file:///tmp/c");
        let u = CacheUrl::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(u.location, Location::Http("http://127.0.0.1:8080".into()));
        assert_eq!(u.flag("trusted"), None);
        let u = CacheUrl::parse("https://c.example/x?trusted=1").unwrap();
        assert_eq!(u.flag("trusted"), Some(true));
        assert_eq!(
            CacheUrl::parse("file:///a%20b").unwrap().location,
            Location::File("/a b".into())
        );
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in [
            "s3://bucket",
            "file://relative",
            "http://",
            "ssh://host",
            "",
        ] {
            let e = CacheUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains("invalid binary cache URL"), "{bad}: {e}");
        }
    }
}
