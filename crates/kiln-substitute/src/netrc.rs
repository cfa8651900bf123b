//! `netrc-file`: credentials for HTTP binary caches, in the `.netrc` format curl (and so
//! Nix) reads: `machine HOST login NAME password SECRET`, `default login … password …`,
//! tokens separated by any white space, `macdef` bodies skipped to the next blank line.
//!
//! A cache gets the entry of its host (or the default), as a `Basic` authorization on
//! every request to it. The header is never sent elsewhere: not to other caches' hosts,
//! and not after a redirect (ureq drops it), so one cache cannot collect another's
//! credentials.

use std::path::Path;

use base64::Engine as _;

use crate::{Error, Result};

/// The longest netrc file read.
const MAX_NETRC: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// `None`: the `default` entry.
    machine: Option<String>,
    login: String,
    password: String,
}

/// A parsed netrc file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Netrc {
    entries: Vec<Entry>,
}

impl Netrc {
    /// Parses netrc text (unknown tokens are skipped, as curl does).
    pub fn parse(text: &str) -> Netrc {
        let mut entries: Vec<Entry> = Vec::new();
        let mut lines = text.lines();
        let mut words: Vec<String> = Vec::new();
        // Tokens, with `macdef NAME` bodies left out (up to the next empty line).
        while let Some(line) = lines.next() {
            for w in line.split_whitespace() {
                if w == "macdef" {
                    for l in lines.by_ref() {
                        if l.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                words.push(w.to_string());
            }
        }
        let mut i = 0;
        while i < words.len() {
            let start = match words[i].as_str() {
                "machine" if i + 1 < words.len() => {
                    i += 2;
                    Some(Some(words[i - 1].clone()))
                }
                "default" => {
                    i += 1;
                    Some(None)
                }
                _ => {
                    i += 1;
                    None
                }
            };
            let Some(machine) = start else { continue };
            let mut e = Entry {
                machine,
                login: String::new(),
                password: String::new(),
            };
            while i + 1 < words.len() && !matches!(words[i].as_str(), "machine" | "default") {
                match words[i].as_str() {
                    "login" => e.login = words[i + 1].clone(),
                    "password" => e.password = words[i + 1].clone(),
                    _ => {}
                }
                i += 2;
            }
            entries.push(e);
        }
        Netrc { entries }
    }

    /// Reads `path`; `None` if there is no such file (Nix's default names one that usually
    /// does not exist).
    pub fn load(path: &Path) -> Result<Option<Netrc>> {
        let io = |e: std::io::Error| Error::Transfer {
            url: path.display().to_string(),
            action: "read the netrc file",
            why: e.to_string(),
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        if !meta.is_file() || meta.len() > MAX_NETRC {
            return Err(Error::Transfer {
                url: path.display().to_string(),
                action: "read the netrc file",
                why: format!("not a regular file of at most {MAX_NETRC} bytes"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Ok(Some(Netrc::parse(&text)))
    }

    /// The `Authorization` header value for `host` (its entry, else the default).
    pub fn authorization(&self, host: &str) -> Option<String> {
        let e = self
            .entries
            .iter()
            .find(|e| e.machine.as_deref() == Some(host))
            .or_else(|| self.entries.iter().find(|e| e.machine.is_none()))?;
        let pair = format!("{}:{}", e.login, e.password);
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        ))
    }
}

/// The host of an `http(s)://` URL (without user information and port).
pub fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next();
    }
    authority.split(':').next().filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_default_and_macdef() {
        let n = Netrc::parse(
            "machine cache.example.org login alice password s3cret\n\
             macdef init\ncd /pub\nmachine evil login x password y\n\n\
             default\n  login anon password guest\n",
        );
        assert_eq!(
            n.authorization("cache.example.org").as_deref(),
            Some("Basic YWxpY2U6czNjcmV0")
        );
        // The macro body is not an entry; other hosts get the default.
        assert_eq!(
            n.authorization("evil").as_deref(),
            Some("Basic YW5vbjpndWVzdA==")
        );
        assert_eq!(
            Netrc::parse("machine a login b password c").authorization("z"),
            None
        );
        assert_eq!(Netrc::parse("machine").authorization("machine"), None);
        assert_eq!(host_of("https://u:p@h.example:8080/x"), Some("h.example"));
        assert_eq!(host_of("http://[::1]:80/"), Some("::1"));
        assert_eq!(host_of("file:///x"), None);
    }

    #[test]
    fn missing_oversized_and_odd_files() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(Netrc::load(&t.path().join("none")).unwrap(), None);
        let big = t.path().join("big");
        std::fs::write(&big, vec![b' '; (MAX_NETRC + 1) as usize]).unwrap();
        let e = Netrc::load(&big).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
        let e = Netrc::load(t.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
