//! Store layout and settings.
//!
//! A [`Layout`] says where things are: the logical store directory (what paths print as), the
//! physical directory holding it, the state directory (database, roots, locks) and the log
//! directory. [`Settings`] holds the options Nix and guix-daemon users know by name
//! (`max-jobs`, `sandbox`, `substituters`, …), read from `kiln.toml`, a `nix.conf`, the
//! environment and `--option NAME VALUE`, lowest to highest.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_format::{StoreDir, StorePath};

use crate::error::{Error, Result};

/// Where a store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The logical store directory: what store paths print as.
    pub store_dir: StoreDir,
    /// The physical directory holding the store (differs with `--root`).
    pub real_store_dir: PathBuf,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
}

impl Layout {
    /// A layout whose directories are used as they are.
    pub fn new(store_dir: StoreDir, state_dir: PathBuf, log_dir: PathBuf) -> Self {
        let real_store_dir = PathBuf::from(store_dir.as_str());
        Layout {
            store_dir,
            real_store_dir,
            state_dir,
            log_dir,
        }
    }

    /// Everything under a throw-away directory (tests, benchmarks): store `DIR/store`,
    /// state `DIR/var`, logs `DIR/log`.
    pub fn under(dir: &Path) -> Result<Self> {
        let store = dir.join("store");
        let sd = StoreDir::new(store.to_string_lossy().into_owned())?;
        Ok(Layout::new(sd, dir.join("var"), dir.join("log")))
    }

    /// The physical path of a store path.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        self.real_store_dir.join(p.base_name())
    }

    /// Physical path for a logical path inside the store (maybe below a store path).
    pub fn to_real(&self, logical: &str) -> PathBuf {
        match logical.strip_prefix(self.store_dir.as_str()) {
            Some(rest) => PathBuf::from(format!("{}{rest}", self.real_store_dir.display())),
            None => PathBuf::from(logical),
        }
    }

    pub fn db_dir(&self) -> PathBuf {
        self.state_dir.join("db")
    }
    pub fn gcroots_dir(&self) -> PathBuf {
        self.state_dir.join("gcroots")
    }
    pub fn profiles_dir(&self) -> PathBuf {
        self.state_dir.join("profiles")
    }
    pub fn temproots_dir(&self) -> PathBuf {
        self.state_dir.join("temproots")
    }
    pub fn userpool_dir(&self) -> PathBuf {
        self.state_dir.join("userpool")
    }
    pub fn gc_lock_path(&self) -> PathBuf {
        self.state_dir.join("gc.lock")
    }
    pub fn gc_socket_path(&self) -> PathBuf {
        self.state_dir.join("gc-socket").join("socket")
    }
    pub fn daemon_socket_path(&self) -> PathBuf {
        self.state_dir.join("daemon-socket").join("socket")
    }
    /// Where build directories are created: a root-only directory in the state directory,
    /// never a predictable name in world-writable `/tmp` (CVE-2025-52991).
    pub fn builds_dir(&self) -> PathBuf {
        self.state_dir.join("builds")
    }
}

/// A layout preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// `/gnu/store`, `/var/guix`, `/var/log/guix`.
    Guix,
    /// `/nix/store`, `/nix/var/nix`, `/nix/var/log/nix`.
    Nix,
    /// A per-user store under `$XDG_DATA_HOME/kiln` (default `~/.local/share/kiln`).
    User,
}

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "guix" => Ok(Preset::Guix),
            "nix" => Ok(Preset::Nix),
            "user" => Ok(Preset::User),
            _ => Err(Error::Config(format!(
                "unknown layout '{s}' (expected guix, nix or user)"
            ))),
        }
    }
}

/// The parts of a layout given by flags, environment or config file; unset parts come
/// from the preset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayoutSpec {
    pub preset: Option<Preset>,
    pub root: Option<PathBuf>,
    pub store_dir: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub log_dir: Option<PathBuf>,
}

impl LayoutSpec {
    /// Fields set in `over` replace those in `self`.
    pub fn merge(mut self, over: LayoutSpec) -> LayoutSpec {
        if over.preset.is_some() {
            self.preset = over.preset;
        }
        if over.root.is_some() {
            self.root = over.root;
        }
        if over.store_dir.is_some() {
            self.store_dir = over.store_dir;
        }
        if over.state_dir.is_some() {
            self.state_dir = over.state_dir;
        }
        if over.log_dir.is_some() {
            self.log_dir = over.log_dir;
        }
        self
    }

    /// From `KILN_LAYOUT`, `KILN_ROOT`, `KILN_STORE_DIR`, `KILN_STATE_DIR`, `KILN_LOG_DIR`.
    pub fn from_env() -> Result<LayoutSpec> {
        let var = |n: &str| std::env::var_os(n).filter(|v| !v.is_empty());
        Ok(LayoutSpec {
            preset: var("KILN_LAYOUT")
                .map(|v| v.to_string_lossy().parse())
                .transpose()?,
            root: var("KILN_ROOT").map(PathBuf::from),
            store_dir: var("KILN_STORE_DIR").map(|v| v.to_string_lossy().into_owned()),
            state_dir: var("KILN_STATE_DIR").map(PathBuf::from),
            log_dir: var("KILN_LOG_DIR").map(PathBuf::from),
        })
    }

    /// Resolves to a layout. With `root`, the (logical) directories of the preset — Nix's
    /// unless another is named, as `nix --store ROOT` does — live under ROOT. Without it,
    /// directories are used as they are.
    pub fn resolve(&self) -> Result<Layout> {
        let preset = self.preset.unwrap_or(if self.root.is_some() {
            Preset::Nix
        } else {
            Preset::User
        });
        let (store, state, log) = match preset {
            Preset::Guix => (
                "/gnu/store".to_string(),
                PathBuf::from("/var/guix"),
                PathBuf::from("/var/log/guix"),
            ),
            Preset::Nix => (
                "/nix/store".to_string(),
                PathBuf::from("/nix/var/nix"),
                PathBuf::from("/nix/var/log/nix"),
            ),
            Preset::User => {
                let base = xdg_data_home()?.join("kiln");
                (
                    base.join("store").to_string_lossy().into_owned(),
                    base.join("var"),
                    base.join("log"),
                )
            }
        };
        let store = self.store_dir.clone().unwrap_or(store);
        let state = self.state_dir.clone().unwrap_or(state);
        let log = self.log_dir.clone().unwrap_or(log);
        let store_dir = StoreDir::new(store)?;
        for (what, p) in [("state", &state), ("log", &log)] {
            if !p.is_absolute() {
                return Err(Error::Config(format!(
                    "the {what} directory '{}' must be absolute",
                    p.display()
                )));
            }
        }
        match &self.root {
            None => Ok(Layout::new(store_dir, state, log)),
            Some(root) => {
                if !root.is_absolute() {
                    return Err(Error::Config(format!(
                        "the root '{}' must be absolute",
                        root.display()
                    )));
                }
                let under = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
                Ok(Layout {
                    real_store_dir: under(Path::new(store_dir.as_str())),
                    store_dir,
                    state_dir: under(&state),
                    log_dir: under(&log),
                })
            }
        }
    }
}

fn xdg_data_home() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        let p = PathBuf::from(d);
        if p.is_absolute() {
            return Ok(p);
        }
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            Error::Config(
                "neither XDG_DATA_HOME nor HOME is set; pass --store-dir or --layout".into(),
            )
        })?;
    Ok(PathBuf::from(home).join(".local/share"))
}

/// The type of a setting's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    /// A non-negative integer.
    Int,
    /// A non-negative integer or `auto` (the number of CPUs).
    IntOrAuto,
    Str,
    /// Whitespace-separated words; `extra-NAME` appends.
    List,
    /// One of the listed words.
    Enum(&'static [&'static str]),
}

/// A known setting.
#[derive(Debug)]
pub struct Def {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub kind: Kind,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every setting kiln understands. Names follow `nix.conf`; aliases cover the old Nix names
/// and guix-daemon's.
pub const SETTINGS: &[Def] = &[
    Def {
        name: "max-jobs",
        aliases: &["build-max-jobs"],
        kind: Kind::IntOrAuto,
        default: "1",
        help: "builds run at once",
    },
    Def {
        name: "cores",
        aliases: &["build-cores"],
        kind: Kind::IntOrAuto,
        default: "0",
        help: "NIX_BUILD_CORES for each build; 0 means all CPUs",
    },
    Def {
        name: "sandbox",
        aliases: &["build-use-sandbox", "build-use-chroot"],
        kind: Kind::Enum(&["true", "false", "relaxed"]),
        default: "true",
        help: "run builds in the Linux sandbox",
    },
    Def {
        name: "sandbox-paths",
        aliases: &["build-sandbox-paths", "chroot-dirs", "build-chroot-dirs"],
        kind: Kind::List,
        default: "",
        help: "extra paths visible in the sandbox (target=source)",
    },
    Def {
        name: "use-cgroups",
        aliases: &[],
        kind: Kind::Bool,
        default: "true",
        help: "run each build in its own cgroup v2 where one can be made (all its processes killed at the end; CPU time and peak memory reported)",
    },
    Def {
        name: "fixed-output-network",
        aliases: &[],
        kind: Kind::Enum(&["auto", "slirp4netns", "host"]),
        default: "auto",
        help: "how sandboxed fixed-output builds reach the network: their own namespace through slirp4netns (auto: where it is installed and /dev/net/tun opens), or the host's namespace, whose abstract Unix sockets they then share",
    },
    Def {
        name: "isolate-host-loopback",
        aliases: &[],
        kind: Kind::Bool,
        default: "false",
        help: "keep fixed-output builds behind slirp4netns from the host's loopback services",
    },
    Def {
        name: "sandbox-fallback",
        aliases: &[],
        kind: Kind::Bool,
        default: "true",
        help: "build without the sandbox, with a warning, where it cannot be set up",
    },
    Def {
        name: "filter-syscalls",
        aliases: &[],
        kind: Kind::Bool,
        default: "true",
        help: "run every builder, sandboxed or not, under the system-call filter (chmod-family calls with setuid or setgid bits, extended attributes and io_uring refused)",
    },
    Def {
        name: "allow-new-privileges",
        aliases: &[],
        kind: Kind::Bool,
        default: "false",
        help: "let builders outside the sandbox gain privileges through setuid programs (no_new_privs is not set; sandboxed builders never can)",
    },
    Def {
        name: "build-users-group",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "group whose members run builds",
    },
    Def {
        name: "substituters",
        aliases: &["binary-caches", "substitute-urls"],
        kind: Kind::List,
        default: "",
        help: "binary caches to substitute from",
    },
    Def {
        name: "trusted-substituters",
        aliases: &["trusted-binary-caches"],
        kind: Kind::List,
        default: "",
        help: "caches untrusted users may use",
    },
    Def {
        name: "trusted-public-keys",
        aliases: &["binary-cache-public-keys"],
        kind: Kind::List,
        default: "",
        help: "keys whose signatures are trusted",
    },
    Def {
        name: "require-sigs",
        aliases: &[],
        kind: Kind::Bool,
        default: "true",
        help: "refuse unsigned substitutes",
    },
    Def {
        name: "substitute",
        aliases: &["use-substitutes", "build-use-substitutes"],
        kind: Kind::Bool,
        default: "true",
        help: "use substitutes",
    },
    Def {
        name: "fallback",
        aliases: &["build-fallback"],
        kind: Kind::Bool,
        default: "false",
        help: "build when substitution fails",
    },
    Def {
        name: "max-substitution-jobs",
        aliases: &[],
        kind: Kind::Int,
        default: "16",
        help: "substitutions run at once",
    },
    Def {
        name: "narinfo-cache-negative-ttl",
        aliases: &[],
        kind: Kind::Int,
        default: "3600",
        help: "seconds a missing narinfo is remembered",
    },
    Def {
        name: "narinfo-cache-positive-ttl",
        aliases: &[],
        kind: Kind::Int,
        default: "2592000",
        help: "seconds a narinfo is remembered",
    },
    Def {
        name: "keep-failed",
        aliases: &["build-keep-failed"],
        kind: Kind::Bool,
        default: "false",
        help: "keep the build directory of failed builds",
    },
    Def {
        name: "keep-going",
        aliases: &["build-keep-going"],
        kind: Kind::Bool,
        default: "false",
        help: "keep building after a failure",
    },
    Def {
        name: "max-silent-time",
        aliases: &["build-max-silent-time"],
        kind: Kind::Int,
        default: "0",
        help: "seconds of builder silence before it is killed (0: no limit)",
    },
    Def {
        name: "timeout",
        aliases: &["build-timeout"],
        kind: Kind::Int,
        default: "0",
        help: "wall-clock seconds a build may take (0: no limit)",
    },
    Def {
        name: "max-log-size",
        aliases: &["build-max-log-size", "max-build-log-size"],
        kind: Kind::Int,
        default: "0",
        help: "bytes of log before the build is killed (0: no limit)",
    },
    Def {
        name: "log-lines",
        aliases: &[],
        kind: Kind::Int,
        default: "10",
        help: "lines of a failed build's log shown in its error",
    },
    Def {
        name: "build-repeat",
        aliases: &["repeat"],
        kind: Kind::Int,
        default: "0",
        help: "extra rounds to check determinism",
    },
    Def {
        name: "cache-failures",
        aliases: &["build-cache-failure"],
        kind: Kind::Bool,
        default: "false",
        help: "remember failed builds",
    },
    Def {
        name: "log-compression",
        aliases: &[],
        kind: Kind::Enum(&["auto", "none", "gzip", "bzip2", "zstd"]),
        default: "auto",
        help: "compression of build logs (auto: gzip with the guix layout, as guix-daemon; bzip2 otherwise, as Nix)",
    },
    Def {
        name: "compress-build-log",
        aliases: &["build-compress-log"],
        kind: Kind::Bool,
        default: "true",
        help: "compress build logs (Nix's switch; see log-compression)",
    },
    Def {
        name: "keep-build-log",
        aliases: &["build-keep-log"],
        kind: Kind::Bool,
        default: "true",
        help: "write build logs",
    },
    Def {
        name: "auto-optimise-store",
        aliases: &["auto-optimize-store"],
        kind: Kind::Bool,
        default: "false",
        help: "deduplicate files by hard links as they are added",
    },
    Def {
        name: "fsync-store-paths",
        aliases: &[],
        kind: Kind::Bool,
        default: "true",
        help: "sync contents to disk before a path becomes valid",
    },
    Def {
        name: "keep-outputs",
        aliases: &["gc-keep-outputs"],
        kind: Kind::Bool,
        default: "false",
        help: "GC keeps the outputs of live derivations",
    },
    Def {
        name: "keep-derivations",
        aliases: &["gc-keep-derivations"],
        kind: Kind::Bool,
        default: "true",
        help: "GC keeps the derivations of live outputs",
    },
    Def {
        name: "gc-runtime-roots",
        aliases: &[],
        kind: Kind::Bool,
        default: "true",
        help: "GC treats paths used by running processes (/proc) as roots",
    },
    Def {
        name: "trusted-users",
        aliases: &[],
        kind: Kind::List,
        default: "root",
        help: "users (and @groups) with full daemon rights",
    },
    Def {
        name: "allowed-users",
        aliases: &[],
        kind: Kind::List,
        default: "*",
        help: "users (and @groups) allowed to connect",
    },
    Def {
        name: "builders",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "build machines: machines-file entries separated by ';' or newlines, '@FILE' to read a file (default with the nix layout: @$NIX_CONF_DIR/machines)",
    },
    Def {
        name: "diff-hook",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "program run when --check finds a build's output differs: PREVIOUS NEW DRV BUILD-DIR",
    },
    Def {
        name: "run-diff-hook",
        aliases: &[],
        kind: Kind::Bool,
        default: "false",
        help: "run diff-hook",
    },
    Def {
        name: "require-store-builder",
        aliases: &[],
        kind: Kind::Enum(&["auto", "true", "false"]),
        default: "auto",
        help: "refuse a builder outside the store, as guix-daemon 1.5 does (auto: with the guix layout)",
    },
    Def {
        name: "builders-use-substitutes",
        aliases: &[],
        kind: Kind::Bool,
        default: "false",
        help: "let build machines substitute the inputs they lack before kiln copies them",
    },
    Def {
        name: "local-speed-factor",
        aliases: &[],
        kind: Kind::Str,
        default: "1",
        help: "this machine's speed factor against the build machines' (kiln)",
    },
    Def {
        name: "build-hook",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "offload agent program",
    },
    Def {
        name: "system",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "this machine's platform (default: detected)",
    },
    Def {
        name: "extra-platforms",
        aliases: &[],
        kind: Kind::List,
        default: "",
        help: "other platforms this machine can build for",
    },
    Def {
        name: "system-features",
        aliases: &[],
        kind: Kind::List,
        // Nix's default; `kvm` is added where /dev/kvm can be opened (Settings::default).
        default: "nixos-test benchmark big-parallel",
        help: "features builds may require (requiredSystemFeatures)",
    },
    Def {
        name: "impersonate-linux-26",
        aliases: &["build-impersonate-linux-26"],
        kind: Kind::Bool,
        default: "false",
        help: "report Linux 2.6 to builders",
    },
    Def {
        name: "json-log-path",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "a file (appended to) or a listening Unix socket to which the daemon writes every build's events as JSON lines (docs/build-events.md); read at the daemon's start",
    },
    Def {
        name: "timeline-file",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "a file the daemon writes a timeline of every build to (a Chrome trace, replaced at each start; `kiln timeline summary` reads it)",
    },
    Def {
        name: "post-build-hook",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "program run after each successful build",
    },
    Def {
        name: "build-dir",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "where build directories go (default: STATE/builds)",
    },
    Def {
        name: "print-build-trace",
        aliases: &[],
        kind: Kind::Bool,
        default: "false",
        help: "emit Guix '@ build-…' trace lines",
    },
    Def {
        name: "print-extended-build-trace",
        aliases: &[],
        kind: Kind::Bool,
        default: "false",
        help: "with print-build-trace, also Guix's '@ download-…' lines of substitutions (a Guix client asks for them)",
    },
    Def {
        name: "multiplexed-build-output",
        aliases: &[],
        kind: Kind::Bool,
        default: "false",
        help: "prefix build output with '@ build-log PID LEN'",
    },
    Def {
        name: "read-only",
        aliases: &[],
        kind: Kind::Bool,
        default: "false",
        help: "open the store read-only",
    },
    Def {
        name: "substitute-agent",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "substitute through an external agent: PROGRAM is run as `PROGRAM substitute --query` and `--substitute` (guix-daemon's protocol; e.g. the `guix` program), with `substituters` as its substitute-urls",
    },
    Def {
        name: "verbosity",
        aliases: &[],
        kind: Kind::Int,
        default: "3",
        help: "log level",
    },
    Def {
        name: "secret-key-files",
        aliases: &[],
        kind: Kind::List,
        default: "",
        help: "keys to sign locally built paths with",
    },
    Def {
        name: "impure-env",
        aliases: &[],
        kind: Kind::List,
        default: "",
        help: "NAME=VALUE pairs given to fixed-output builds that list NAME in impureEnvVars (experimental configurable-impure-env)",
    },
    Def {
        name: "hashed-mirrors",
        aliases: &[],
        kind: Kind::List,
        default: "",
        help: "mirrors builtin:fetchurl tries first for fixed-output downloads (URL/ALGO/HASH)",
    },
    Def {
        name: "min-free",
        aliases: &[],
        kind: Kind::Int,
        default: "0",
        help: "while building, collect garbage when fewer bytes than this are free on the store's file system (0: never)",
    },
    Def {
        name: "max-free",
        aliases: &[],
        kind: Kind::Int,
        default: "18446744073709551615",
        help: "an automatic collection (min-free) stops once this many bytes are free",
    },
    Def {
        name: "min-free-check-interval",
        aliases: &[],
        kind: Kind::Int,
        default: "5",
        help: "seconds between looks at the free space while building (min-free)",
    },
    Def {
        name: "experimental-features",
        aliases: &[],
        kind: Kind::List,
        default: "",
        help: "Nix's experimental features the build engine honours: recursive-nix and ca-derivations (each also a system feature then), configurable-impure-env",
    },
    Def {
        name: "netrc-file",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "a .netrc file with credentials for HTTP binary caches (the nix layout's default: $NIX_CONF_DIR/netrc)",
    },
    Def {
        name: "ssl-cert-file",
        aliases: &[],
        kind: Kind::Str,
        default: "auto",
        help: "the certificate authorities fixed-output builds see at /etc/ssl/certs/ca-certificates.crt in the sandbox, as Nix's; empty: none. auto: $NIX_SSL_CERT_FILE, else /etc/ssl/certs/ca-certificates.crt if it exists (none with the guix layout, as guix-daemon gives none)",
    },
    Def {
        name: "connect-timeout",
        aliases: &[],
        kind: Kind::Int,
        default: "0",
        help: "seconds to wait for a connection (0: default)",
    },
    Def {
        name: "stalled-download-timeout",
        aliases: &[],
        kind: Kind::Int,
        default: "300",
        help: "seconds a download may receive nothing before it fails",
    },
    Def {
        name: "download-attempts",
        aliases: &[],
        kind: Kind::Int,
        default: "5",
        help: "attempts of a request to a binary cache that failed transiently",
    },
    Def {
        name: "pre-build-hook",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        help: "a program run before each build with the derivation's path (and the sandbox's root): the paths it prints after `extra-sandbox-paths` are added to that build's sandbox, as Nix's hook",
    },
    Def {
        name: "allow-import-from-derivation",
        aliases: &[],
        kind: Kind::Bool,
        default: "true",
        help: "(evaluator setting; accepted)",
    },
];

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    values: BTreeMap<&'static str, String>,
}

impl Default for Settings {
    fn default() -> Self {
        let mut values: BTreeMap<&'static str, String> = SETTINGS
            .iter()
            .map(|d| (d.name, d.default.to_string()))
            .collect();
        // As Nix: a machine whose /dev/kvm this process may use offers the `kvm` feature.
        let kvm = rustix::fs::access(
            "/dev/kvm",
            rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
        );
        if let (Ok(()), Some(v)) = (kvm, values.get_mut("system-features")) {
            v.push_str(" kvm");
        }
        Settings { values }
    }
}

fn def_of(name: &str) -> Option<&'static Def> {
    SETTINGS
        .iter()
        .find(|d| d.name == name || d.aliases.contains(&name))
}

/// Whether `name` appends to a list setting (`extra-NAME`), and the setting's name. A
/// setting whose own name starts with `extra-` (`extra-platforms`) is itself, and
/// `extra-extra-platforms` appends to it.
/// Settings accepted but not implemented (see [`Settings::not_implemented_in_use`]):
/// none now (the mechanism stays for the next one).
pub const NOT_IMPLEMENTED: &[&str] = &[];

/// The warning for a setting in [`NOT_IMPLEMENTED`].
pub fn not_implemented_warning(name: &str) -> String {
    format!("kiln does not implement the setting '{name}' yet: it has no effect")
}

fn split_extra(name: &str) -> (bool, &str) {
    // guix-daemon's name for directories added to the chroot, beside `build-chroot-dirs`.
    if name == "build-extra-chroot-dirs" {
        return (true, "sandbox-paths");
    }
    match name.strip_prefix("extra-") {
        Some(base) if def_of(name).is_none() => (true, base),
        _ => (false, name),
    }
}

impl Settings {
    /// Sets `name` (or `extra-name` to append to a list) from text, validating it.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let (extra, base) = split_extra(name);
        let def = def_of(base).ok_or_else(|| Error::Config(format!("unknown setting '{name}'")))?;
        let value = value.trim();
        let norm = match def.kind {
            Kind::Bool => match value {
                "true" | "1" | "yes" => "true".to_string(),
                "false" | "0" | "no" | "" => "false".to_string(),
                _ => {
                    return Err(Error::Config(format!(
                        "setting '{name}': '{value}' is not a boolean"
                    )))
                }
            },
            Kind::Int => {
                value.parse::<u64>().map_err(|_| {
                    Error::Config(format!("setting '{name}': '{value}' is not a number"))
                })?;
                value.to_string()
            }
            Kind::IntOrAuto => {
                if value != "auto" {
                    value.parse::<u64>().map_err(|_| {
                        Error::Config(format!(
                            "setting '{name}': '{value}' is not a number or 'auto'"
                        ))
                    })?;
                }
                value.to_string()
            }
            Kind::Str => value.to_string(),
            Kind::List => value.split_whitespace().collect::<Vec<_>>().join(" "),
            Kind::Enum(words) => {
                if !words.contains(&value) {
                    return Err(Error::Config(format!(
                        "setting '{name}': '{value}' is not one of {}",
                        words.join(", ")
                    )));
                }
                value.to_string()
            }
        };
        if extra {
            if def.kind != Kind::List {
                return Err(Error::Config(format!(
                    "'{name}': only list settings take 'extra-'"
                )));
            }
            let cur = self.values.entry(def.name).or_default();
            if !norm.is_empty() {
                if !cur.is_empty() {
                    cur.push(' ');
                }
                cur.push_str(&norm);
            }
        } else {
            self.values.insert(def.name, norm);
        }
        Ok(())
    }

    /// The canonical name of a setting, if known.
    pub fn canonical_name(name: &str) -> Option<&'static str> {
        def_of(split_extra(name).1).map(|d| d.name)
    }

    fn raw(&self, name: &str) -> &str {
        match def_of(name) {
            Some(d) => self
                .values
                .get(d.name)
                .map(String::as_str)
                .unwrap_or(d.default),
            None => "",
        }
    }

    /// The text value (as set or default).
    pub fn get(&self, name: &str) -> &str {
        self.raw(name)
    }

    /// Settings kiln accepts (Nix's configurations name them) but does not implement, set
    /// here to something other than their default: each deserves a warning, not silence.
    pub fn not_implemented_in_use(&self) -> Vec<&'static str> {
        NOT_IMPLEMENTED
            .iter()
            .copied()
            .filter(|n| def_of(n).is_some_and(|d| self.raw(n) != d.default))
            .collect()
    }

    pub fn get_bool(&self, name: &str) -> bool {
        self.raw(name) == "true"
    }

    /// A number; `auto` (or an unset `cores`) means the number of CPUs.
    pub fn get_u64(&self, name: &str) -> u64 {
        match self.raw(name) {
            "auto" => std::thread::available_parallelism()
                .map(|n| n.get() as u64)
                .unwrap_or(1),
            v => v.parse().unwrap_or(0),
        }
    }

    pub fn get_list(&self, name: &str) -> Vec<String> {
        self.raw(name)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// Reads a `nix.conf`: `name = value` lines, `#` comments, `include FILE` (an error if
    /// missing) and `!include FILE` (ignored if missing), relative to the including file.
    pub fn load_nix_conf(&mut self, path: &Path) -> Result<()> {
        self.load_nix_conf_depth(path, 0)
    }

    /// Reads configuration text as `NIX_CONFIG` carries it (`nix.conf` lines; includes are
    /// relative to the working directory). `origin` names it in messages.
    pub fn load_nix_conf_text(&mut self, text: &str, origin: &str) -> Result<()> {
        self.apply_nix_conf(text, origin, Path::new("."), 0)
    }

    fn load_nix_conf_depth(&mut self, path: &Path, depth: u32) -> Result<()> {
        if depth > 16 {
            return Err(Error::Config(format!(
                "'{}': includes nested too deeply",
                path.display()
            )));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io(path, "read configuration", e))?;
        let dir = path.parent().unwrap_or(Path::new("/"));
        self.apply_nix_conf(&text, &path.display().to_string(), dir, depth)
    }

    fn apply_nix_conf(&mut self, text: &str, origin: &str, dir: &Path, depth: u32) -> Result<()> {
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if words[0] == "include" || words[0] == "!include" {
                let [_, file] = words[..] else {
                    return Err(Error::Config(format!(
                        "{origin}:{}: illegal configuration line '{line}'",
                        n + 1
                    )));
                };
                let p = dir.join(file);
                if words[0] == "!include" && !p.exists() {
                    continue;
                }
                self.load_nix_conf_depth(&p, depth + 1)?;
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                return Err(Error::Config(format!(
                    "{origin}:{}: illegal configuration line '{line}'",
                    n + 1
                )));
            };
            let name = name.trim();
            match self.set(name, value) {
                Ok(()) => {}
                // Settings of the evaluator or of other Nix components: warned about once
                // per process whichever file or variable names them, as Nix does.
                Err(Error::Config(m)) if m.starts_with("unknown setting") => {
                    warn_unknown_once(name, &format!("{origin}:{}", n + 1))
                }
                Err(Error::Config(m)) => {
                    return Err(Error::Config(format!("{origin}:{}: {m}", n + 1)))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Every setting with its current value, for `kiln config show`.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> + '_ {
        SETTINGS.iter().map(|d| (d.name, self.raw(d.name)))
    }
}

/// Warns that `name` is not a setting kiln knows, the first time this process meets it.
pub fn warn_unknown_once(name: &str, origin: &str) {
    static SEEN: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if seen.insert(name.to_string()) {
        tracing::warn!("{origin}: unknown setting '{name}'");
    }
}

/// Where nix-daemon reads its configuration when none is named: `$NIX_CONF_DIR/nix.conf`
/// (default `/etc/nix/nix.conf`), then the text of `$NIX_CONFIG`. A missing file is not an
/// error.
pub fn load_default_nix_conf(settings: &mut Settings) -> Result<()> {
    let dir = std::env::var_os("NIX_CONF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/nix"));
    // nix-daemon's default machines file and netrc, unless the configuration names others.
    settings.set("builders", &format!("@{}", dir.join("machines").display()))?;
    settings.set("netrc-file", &dir.join("netrc").display().to_string())?;
    let file = dir.join("nix.conf");
    if file.exists() {
        settings.load_nix_conf(&file)?;
    }
    if let Some(text) = std::env::var_os("NIX_CONFIG") {
        settings.load_nix_conf_text(&text.to_string_lossy(), "$NIX_CONFIG")?;
    }
    Ok(())
}

/// The contents of a `kiln.toml`: layout keys at the top level and a `[settings]` table.
#[derive(Debug, Default)]
pub struct ConfigFile {
    pub layout: LayoutSpec,
    pub settings: Vec<(String, String)>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io(path, "read configuration", e))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| Error::Config(format!("'{}': {e}", path.display())))?;
        let mut cf = ConfigFile::default();
        let s = |k: &str, v: &toml::Value| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                Error::Config(format!("'{}': '{k}' must be a string", path.display()))
            })
        };
        for (k, v) in &table {
            match k.as_str() {
                "layout" => cf.layout.preset = Some(s(k, v)?.parse()?),
                "root" => cf.layout.root = Some(PathBuf::from(s(k, v)?)),
                "store-dir" => cf.layout.store_dir = Some(s(k, v)?),
                "state-dir" => cf.layout.state_dir = Some(PathBuf::from(s(k, v)?)),
                "log-dir" => cf.layout.log_dir = Some(PathBuf::from(s(k, v)?)),
                "settings" => {
                    let t = v.as_table().ok_or_else(|| {
                        Error::Config(format!("'{}': [settings] must be a table", path.display()))
                    })?;
                    for (name, val) in t {
                        let text = match val {
                            toml::Value::String(x) => x.clone(),
                            toml::Value::Integer(i) => i.to_string(),
                            toml::Value::Boolean(b) => b.to_string(),
                            toml::Value::Array(a) => a
                                .iter()
                                .map(|x| {
                                    x.as_str()
                                        .map(str::to_string)
                                        .unwrap_or_else(|| x.to_string())
                                })
                                .collect::<Vec<_>>()
                                .join(" "),
                            other => {
                                return Err(Error::Config(format!(
                                    "'{}': setting '{name}' has an unsupported value {other}",
                                    path.display()
                                )))
                            }
                        };
                        cf.settings.push((name.clone(), text));
                    }
                }
                other => {
                    return Err(Error::Config(format!(
                        "'{}': unknown key '{other}'",
                        path.display()
                    )))
                }
            }
        }
        Ok(cf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_root() {
        let g = LayoutSpec {
            preset: Some(Preset::Guix),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(g.store_dir.as_str(), "/gnu/store");
        assert_eq!(g.state_dir, PathBuf::from("/var/guix"));
        let r = LayoutSpec {
            root: Some("/tmp/r".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(r.store_dir.as_str(), "/nix/store");
        assert_eq!(r.real_store_dir, PathBuf::from("/tmp/r/nix/store"));
        assert_eq!(r.state_dir, PathBuf::from("/tmp/r/nix/var/nix"));
        let s = LayoutSpec {
            store_dir: Some("/x/store".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(s.real_store_dir, PathBuf::from("/x/store"));
        assert!(LayoutSpec {
            store_dir: Some("rel".into()),
            ..Default::default()
        }
        .resolve()
        .is_err());
        assert!(LayoutSpec {
            root: Some("rel".into()),
            ..Default::default()
        }
        .resolve()
        .is_err());
        let m = LayoutSpec {
            preset: Some(Preset::Nix),
            ..Default::default()
        }
        .merge(LayoutSpec {
            store_dir: Some("/s".into()),
            ..Default::default()
        });
        assert_eq!(m.preset, Some(Preset::Nix));
        assert_eq!(m.store_dir.as_deref(), Some("/s"));
    }

    #[test]
    fn settings_validate_and_alias() {
        let mut s = Settings::default();
        s.set("build-max-jobs", "4").unwrap();
        assert_eq!(s.get_u64("max-jobs"), 4);
        s.set("chroot-dirs", "/bin  /usr=/x").unwrap();
        s.set("extra-sandbox-paths", "/etc").unwrap();
        assert_eq!(s.get_list("sandbox-paths"), vec!["/bin", "/usr=/x", "/etc"]);
        s.set("build-extra-chroot-dirs", "/lib").unwrap();
        assert_eq!(
            s.get_list("sandbox-paths"),
            vec!["/bin", "/usr=/x", "/etc", "/lib"]
        );
        assert!(s
            .set("max-jobs", "many")
            .unwrap_err()
            .to_string()
            .contains("not a number"));
        assert!(s
            .set("sandbox", "maybe")
            .unwrap_err()
            .to_string()
            .contains("not one of"));
        assert!(s
            .set("no-such", "1")
            .unwrap_err()
            .to_string()
            .contains("unknown setting"));
        assert!(s.set("extra-max-jobs", "1").is_err());
        // A setting named extra-…, set and appended to.
        s.set("extra-platforms", "i686-linux").unwrap();
        s.set("extra-extra-platforms", "armv7l-linux").unwrap();
        assert_eq!(
            s.get_list("extra-platforms"),
            vec!["i686-linux", "armv7l-linux"]
        );
        s.set("max-jobs", "auto").unwrap();
        assert!(s.get_u64("max-jobs") >= 1);
        assert!(s.get_bool("require-sigs"));
    }

    #[test]
    fn nix_conf_parsing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("inc.conf"), "keep-going = true\n").unwrap();
        std::fs::write(
            d.path().join("nix.conf"),
            "# comment\nmax-jobs = 3 # trailing\nsubstituters = a  b\nextra-substituters = c\ninclude inc.conf\n!include missing.conf\nplugin-files = x\n",
        )
        .unwrap();
        let mut s = Settings::default();
        s.load_nix_conf(&d.path().join("nix.conf")).unwrap();
        assert_eq!(s.get_u64("max-jobs"), 3);
        assert_eq!(s.get_list("substituters"), vec!["a", "b", "c"]);
        assert!(s.get_bool("keep-going"));
        std::fs::write(d.path().join("bad.conf"), "include missing.conf\n").unwrap();
        assert!(s.load_nix_conf(&d.path().join("bad.conf")).is_err());
        std::fs::write(d.path().join("bad2.conf"), "just words\n").unwrap();
        let e = s
            .load_nix_conf(&d.path().join("bad2.conf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad2.conf:1: illegal configuration line"), "{e}");
    }

    #[test]
    fn kiln_toml() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kiln.toml");
        std::fs::write(&p, "layout = \"guix\"\nroot = \"/r\"\n[settings]\nmax-jobs = 8\nkeep-going = true\nsubstituters = [\"http://a\", \"http://b\"]\n").unwrap();
        let cf = ConfigFile::load(&p).unwrap();
        assert_eq!(cf.layout.preset, Some(Preset::Guix));
        assert_eq!(cf.settings.len(), 3);
        std::fs::write(&p, "bogus = 1\n").unwrap();
        assert!(ConfigFile::load(&p)
            .unwrap_err()
            .to_string()
            .contains("unknown key 'bogus'"));
    }
}
