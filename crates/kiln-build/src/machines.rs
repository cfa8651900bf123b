//! Build machines: the `builders` setting and machines files (`/etc/nix/machines`), read
//! as Nix reads them.
//!
//! An entry is one line (or one `;`-separated part of a line) of up to eight
//! whitespace-separated fields, `-` or absent meaning the default:
//!
//! 1. the store URI (`ssh://host`, `ssh-ng://user@host?remote-program=…`; a bare host
//!    name means `ssh://host`);
//! 2. systems, comma-separated (default: this machine's system);
//! 3. the SSH identity file;
//! 4. maximum parallel builds (default 1);
//! 5. speed factor (default 1; 0 means 1);
//! 6. supported features, comma-separated;
//! 7. mandatory features (the machine takes only derivations that require all of them);
//! 8. the machine's SSH host key, base64-encoded (as `base64 -w0 /etc/ssh/ssh_host_…pub`).
//!
//! `#` starts a comment; `@FILE` includes a machines file (a missing one is skipped, as
//! Nix does). Unlike Nix, a malformed entry is reported with where it came from: the file
//! and line, and the field by name.

use std::collections::BTreeSet;
use std::path::Path;

use base64::Engine as _;

/// One build machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// The store URI, with `ssh://` added to a bare host name.
    pub uri: String,
    pub systems: BTreeSet<String>,
    /// The SSH identity file (empty: ssh's default).
    pub ssh_key: String,
    pub max_jobs: usize,
    pub speed_factor: f64,
    pub supported_features: BTreeSet<String>,
    pub mandatory_features: BTreeSet<String>,
    /// The host's public key, base64-encoded as in the machines file (empty: ssh's known
    /// hosts decide).
    pub host_key: String,
}

/// A machines entry that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad machine specification ({origin}): {problem}: '{entry}'")]
pub struct MachinesError {
    /// Where the entry is: `the builders setting` or `FILE line N`.
    pub origin: String,
    pub entry: String,
    pub problem: String,
}

/// How many `@FILE` inclusions deep a machines file may go (a file that includes itself
/// must not recurse forever).
const MAX_INCLUDE_DEPTH: usize = 8;

/// The largest machines file read (1 MiB: thousands of entries).
const MAX_MACHINES_FILE: u64 = 1 << 20;

impl Machine {
    /// Whether this machine builds `system` (every machine builds `builtin`).
    pub fn supports_system(&self, system: &str) -> bool {
        system == "builtin" || self.systems.contains(system)
    }

    /// Whether this machine may build a derivation requiring `features`: it has them all,
    /// and they include every feature it makes mandatory.
    pub fn accepts(&self, system: &str, features: &BTreeSet<String>) -> bool {
        self.supports_system(system)
            && features
                .iter()
                .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.is_subset(features)
    }

    /// What tells machines apart: the URI with the identity file and host key (two entries
    /// for one host with other keys are two machines: a client's `--builders` must not
    /// change the key or the slots the daemon's entry has).
    pub fn identity(&self) -> String {
        format!("{} {} {}", self.uri, self.ssh_key, self.host_key)
    }

    /// The host part of the URI (`user@host`), for ssh.
    pub fn host(&self) -> &str {
        let rest = self
            .uri
            .split_once("://")
            .map(|(_, r)| r)
            .unwrap_or(&self.uri);
        rest.split(['?', '/']).next().unwrap_or(rest)
    }

    /// The URI's scheme (`ssh`, `ssh-ng`, …).
    pub fn scheme(&self) -> &str {
        self.uri.split_once("://").map(|(s, _)| s).unwrap_or("")
    }

    /// A query parameter of the URI (`remote-program`, `remote-store`, …).
    pub fn param(&self, name: &str) -> Option<String> {
        let (_, q) = self.uri.split_once('?')?;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| kiln_substitute::url::percent_decode(v))
        })
    }
}

/// Reads the `builders` setting's value: entries inline, `@FILE` includes. `system` is
/// this machine's, the default for entries that name none.
pub fn parse_builders(value: &str, system: &str) -> Result<Vec<Machine>, MachinesError> {
    let mut out = Vec::new();
    expand(value, "the builders setting", system, 0, &mut out)?;
    Ok(out)
}

/// Reads a machines file (`/etc/nix/machines`); a missing file means no machines.
pub fn read_machines_file(path: &Path, system: &str) -> Result<Vec<Machine>, MachinesError> {
    let mut out = Vec::new();
    include(path, system, 0, &mut out)?;
    Ok(out)
}

fn include(
    path: &Path,
    system: &str,
    depth: usize,
    out: &mut Vec<Machine>,
) -> Result<(), MachinesError> {
    let origin = path.display().to_string();
    if depth > MAX_INCLUDE_DEPTH {
        return Err(MachinesError {
            origin,
            entry: format!("@{}", path.display()),
            problem: format!("machines files are included more than {MAX_INCLUDE_DEPTH} deep"),
        });
    }
    // Only a regular file, and a machines file's size at most: the daemon reads it as it
    // places builds, and a FIFO or /dev/zero must not stall or exhaust it.
    let meta = std::fs::metadata(path);
    if let Ok(m) = &meta {
        if !m.is_file() || m.len() > MAX_MACHINES_FILE {
            return Err(MachinesError {
                origin,
                entry: format!("@{}", path.display()),
                problem: format!("not a regular file of at most {MAX_MACHINES_FILE} bytes"),
            });
        }
    }
    match std::fs::read_to_string(path) {
        Ok(text) => expand(&text, &origin, system, depth + 1, out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!("no machines file '{origin}'");
            Ok(())
        }
        Err(e) => Err(MachinesError {
            origin,
            entry: format!("@{}", path.display()),
            problem: format!("cannot read it: {e}"),
        }),
    }
}

fn expand(
    text: &str,
    origin: &str,
    system: &str,
    depth: usize,
    out: &mut Vec<Machine>,
) -> Result<(), MachinesError> {
    for (n, line) in text.split('\n').enumerate() {
        let line = line.split('#').next().unwrap_or("");
        let here = if text.contains('\n') {
            format!("{origin} line {}", n + 1)
        } else {
            origin.to_string()
        };
        for entry in line.split(';') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            if let Some(file) = entry.strip_prefix('@') {
                include(Path::new(file.trim()), system, depth, out)?;
                continue;
            }
            out.push(parse_entry(entry, &here, system)?);
        }
    }
    Ok(())
}

const FIELDS: [&str; 8] = [
    "store URI",
    "systems",
    "SSH identity file",
    "maximum jobs",
    "speed factor",
    "supported features",
    "mandatory features",
    "SSH host key",
];

fn parse_entry(entry: &str, origin: &str, system: &str) -> Result<Machine, MachinesError> {
    let err = |problem: String| MachinesError {
        origin: origin.to_string(),
        entry: entry.to_string(),
        problem,
    };
    let tokens: Vec<&str> = entry.split_whitespace().collect();
    if tokens.len() > FIELDS.len() {
        return Err(err(format!(
            "{} fields, but an entry has at most {} (the extra one is '{}')",
            tokens.len(),
            FIELDS.len(),
            tokens[FIELDS.len()]
        )));
    }
    let field = |i: usize| tokens.get(i).copied().filter(|t| *t != "-");
    let list = |i: usize| -> BTreeSet<String> {
        field(i)
            .map(|t| {
                t.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let Some(uri) = field(0) else {
        return Err(err("the first field (store URI) is missing".into()));
    };
    let bare = !(uri.contains("://")
        || uri.contains('/')
        || ["auto", "daemon", "local"].contains(&uri)
        || ["auto?", "daemon?", "local?", "?"]
            .iter()
            .any(|p| uri.starts_with(p)));
    let uri = if bare {
        format!("ssh://{uri}")
    } else {
        uri.to_string()
    };
    // ssh would read a host starting with '-' as an option (`-oProxyCommand=…`).
    if uri
        .split_once("://")
        .is_some_and(|(_, rest)| rest.starts_with('-'))
    {
        return Err(err("the host of the store URI starts with '-'".into()));
    }
    let max_jobs = match field(3) {
        None => 1,
        Some(t) => t.parse::<u32>().map_err(|_| {
            err(format!(
                "field 4 ({}) is '{t}', not a non-negative integer",
                FIELDS[3]
            ))
        })? as usize,
    };
    let speed_factor = match field(4) {
        None => 1.0,
        Some(t) => {
            let v = t
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| err(format!("field 5 ({}) is '{t}', not a number", FIELDS[4])))?;
            if v < 0.0 {
                return Err(err(format!(
                    "field 5 ({}) is '{t}', but it must be >= 0",
                    FIELDS[4]
                )));
            }
            if v == 0.0 {
                1.0
            } else {
                v
            }
        }
    };
    let host_key = match field(7) {
        None => String::new(),
        Some(t) => {
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .map_err(|e| err(format!("field 8 ({}) is not valid base64: {e}", FIELDS[7])))?;
            t.to_string()
        }
    };
    let mut systems = list(1);
    if field(1).is_none() {
        systems.insert(system.to_string());
    }
    Ok(Machine {
        uri,
        systems,
        ssh_key: field(2).unwrap_or("").to_string(),
        max_jobs,
        speed_factor,
        supported_features: list(5),
        mandatory_features: list(6),
        host_key,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn set(s: &[&str]) -> BTreeSet<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn all_eight_fields_and_defaults() {
        let key = base64::engine::general_purpose::STANDARD.encode("ssh-ed25519 AAAA host");
        let ms = parse_builders(
            &format!(
                "ssh-ng://a x86_64-linux,i686-linux /k 4 2.5 kvm,big-parallel kvm {key}; b - - - 0\n\
                 # a comment\n  c  # trailing comment"
            ),
            "x86_64-linux",
        )
        .unwrap();
        assert_eq!(ms.len(), 3);
        assert_eq!(ms[0].uri, "ssh-ng://a");
        assert_eq!(ms[0].systems, set(&["i686-linux", "x86_64-linux"]));
        assert_eq!(ms[0].ssh_key, "/k");
        assert_eq!(ms[0].max_jobs, 4);
        assert_eq!(ms[0].speed_factor, 2.5);
        assert_eq!(ms[0].supported_features, set(&["big-parallel", "kvm"]));
        assert_eq!(ms[0].mandatory_features, set(&["kvm"]));
        assert_eq!(ms[0].host_key, key);
        assert_eq!(ms[1].uri, "ssh://b");
        assert_eq!(ms[1].systems, set(&["x86_64-linux"]));
        assert_eq!(ms[1].max_jobs, 1);
        assert_eq!(ms[1].speed_factor, 1.0, "0 means 1");
        assert_eq!(ms[2].uri, "ssh://c");
        assert_eq!(ms[2].host(), "c");
    }

    #[test]
    fn includes_files_and_skips_missing_ones() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("machines");
        std::fs::write(&f, "ssh://x aarch64-linux\n\nssh://y\n").unwrap();
        let ms = parse_builders(
            &format!("@{} ; @{}/absent", f.display(), d.path().display()),
            "x86_64-linux",
        )
        .unwrap();
        let uris: Vec<&str> = ms.iter().map(|m| m.uri.as_str()).collect();
        assert_eq!(uris, ["ssh://x", "ssh://y"]);
        assert!(read_machines_file(&d.path().join("none"), "x")
            .unwrap()
            .is_empty());
        // A file that includes itself stops, with an error.
        std::fs::write(&f, format!("@{}\n", f.display())).unwrap();
        let e = read_machines_file(&f, "x").unwrap_err();
        assert!(e.problem.contains("more than"), "{e}");
    }

    #[test]
    fn malformed_entries_name_the_line_and_field() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("machines");
        std::fs::write(&f, "ssh://ok\nssh://bad x86_64-linux - many\n").unwrap();
        let e = read_machines_file(&f, "x86_64-linux").unwrap_err();
        assert_eq!(e.origin, format!("{} line 2", f.display()));
        assert!(
            e.to_string().contains("field 4 (maximum jobs) is 'many'"),
            "{e}"
        );
        for (line, want) in [
            ("h - - 1 fast", "field 5 (speed factor) is 'fast'"),
            ("h - - 1 -2", "must be >= 0"),
            ("h - - 1 1 - - not*base64", "field 8 (SSH host key)"),
            ("h a b c d e f g extra", "the extra one is 'extra'"),
            ("- x86_64-linux", "store URI"),
            ("ssh://-oProxyCommand=x", "starts with '-'"),
        ] {
            let e = parse_builders(line, "x86_64-linux").unwrap_err();
            assert!(e.to_string().contains(want), "{line}: {e}");
            assert_eq!(e.origin, "the builders setting");
        }
    }

    #[test]
    fn features_and_mandatory_features() {
        let m = &parse_builders("h x86_64-linux - 1 1 kvm,nixos-test big", "x").unwrap()[0];
        assert!(!m.accepts("x86_64-linux", &set(&[])), "big is mandatory");
        assert!(m.accepts("x86_64-linux", &set(&["big"])));
        assert!(m.accepts("x86_64-linux", &set(&["big", "kvm"])));
        assert!(!m.accepts("x86_64-linux", &set(&["big", "cuda"])));
        assert!(!m.accepts("aarch64-linux", &set(&["big"])));
        assert!(m.accepts("builtin", &set(&["big"])));
    }

    #[test]
    fn uri_parts() {
        let m = &parse_builders(
            "ssh-ng://root@h:22/?remote-program=/opt/kiln%20x&remote-store=/s",
            "x",
        )
        .unwrap()[0];
        assert_eq!(m.scheme(), "ssh-ng");
        assert_eq!(m.host(), "root@h:22");
        assert_eq!(m.param("remote-program").as_deref(), Some("/opt/kiln x"));
        assert_eq!(m.param("remote-store").as_deref(), Some("/s"));
        assert_eq!(m.param("absent"), None);
        // A percent sign before a multi-byte character is taken as it is.
        let m = &parse_builders("ssh://h?remote-program=%a\u{20ac}", "x").unwrap()[0];
        assert_eq!(m.param("remote-program").as_deref(), Some("%a\u{20ac}"));
    }
}
