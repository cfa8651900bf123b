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
    /// The store stands in for guix-daemon's (the Guix preset, or a store at `/gnu/store`):
    /// a new database gets Guix's schema, as guix-daemon would make it wherever its store is.
    pub guix: bool,
}

impl Layout {
    /// A layout whose directories are used as they are (Guix's if the store is at
    /// `/gnu/store`).
    pub fn new(store_dir: StoreDir, state_dir: PathBuf, log_dir: PathBuf) -> Self {
        let real_store_dir = PathBuf::from(store_dir.as_str());
        let guix = store_dir.as_str() == "/gnu/store";
        Layout {
            store_dir,
            real_store_dir,
            state_dir,
            log_dir,
            guix,
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
        let guix = preset == Preset::Guix || store_dir.as_str() == "/gnu/store";
        match &self.root {
            None => Ok(Layout {
                guix,
                ..Layout::new(store_dir, state, log)
            }),
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
                    guix,
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
    /// This machine's default, where it depends on the machine (computed from `default`
    /// when settings are made): kiln-build's `system-features` adds `kvm` where
    /// `/dev/kvm` can be used.
    pub machine_default: Option<fn(&'static str) -> String>,
    pub help: &'static str,
}

/// The store layer's own settings. Every layer defines the settings it acts on beside the
/// code that reads them (kiln-substitute, kiln-build, kiln-remote and kiln-daemon each have
/// a `settings::SETTINGS`); a [`Catalog`] names the tables a [`Settings`] knows. Names
/// follow `nix.conf`; aliases cover the old Nix names and guix-daemon's.
pub const SETTINGS: &[Def] = &[
    Def {
        name: "auto-optimise-store",
        aliases: &["auto-optimize-store"],
        kind: Kind::Bool,
        default: "false",
        machine_default: None,
        help: "deduplicate files by hard links as they are added",
    },
    Def {
        name: "fsync-store-paths",
        aliases: &[],
        kind: Kind::Bool,
        default: "true",
        machine_default: None,
        help: "sync contents to disk before a path becomes valid",
    },
    Def {
        name: "keep-outputs",
        aliases: &["gc-keep-outputs"],
        kind: Kind::Bool,
        default: "false",
        machine_default: None,
        help: "GC keeps the outputs of live derivations",
    },
    Def {
        name: "keep-derivations",
        aliases: &["gc-keep-derivations"],
        kind: Kind::Bool,
        default: "true",
        machine_default: None,
        help: "GC keeps the derivations of live outputs",
    },
    Def {
        name: "gc-runtime-roots",
        aliases: &[],
        kind: Kind::Bool,
        default: "true",
        machine_default: None,
        help: "GC treats paths used by running processes (/proc) as roots",
    },
    Def {
        name: "read-only",
        aliases: &[],
        kind: Kind::Bool,
        default: "false",
        machine_default: None,
        help: "open the store read-only",
    },
];

/// The setting tables a [`Settings`] knows, as the program reading a configuration puts
/// them together (`kiln_daemon::CATALOG` has every layer's).
#[derive(Debug, Clone, Copy)]
pub struct Catalog(pub &'static [&'static [Def]]);

impl Catalog {
    /// Every setting of every table.
    pub fn defs(self) -> impl Iterator<Item = &'static Def> {
        self.0.iter().flat_map(|t| t.iter())
    }

    /// The setting `name` names (its own name or an alias).
    pub fn find(self, name: &str) -> Option<&'static Def> {
        self.defs()
            .find(|d| d.name == name || d.aliases.contains(&name))
    }
}

/// The store layer's settings alone.
pub const STORE_CATALOG: Catalog = Catalog(&[SETTINGS]);

/// Resolved settings, of the settings its [`Catalog`] knows.
#[derive(Debug, Clone)]
pub struct Settings {
    values: BTreeMap<&'static str, String>,
    catalog: Catalog,
}

impl Settings {
    /// The defaults of every setting `catalog` knows.
    pub fn new(catalog: Catalog) -> Self {
        let values: BTreeMap<&'static str, String> = catalog
            .defs()
            .map(|d| {
                let v = match d.machine_default {
                    Some(f) => f(d.default),
                    None => d.default.to_string(),
                };
                (d.name, v)
            })
            .collect();
        Settings { values, catalog }
    }
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

impl Settings {
    fn split_extra<'a>(&self, name: &'a str) -> (bool, &'a str) {
        // guix-daemon's name for directories added to the chroot, beside `build-chroot-dirs`.
        if name == "build-extra-chroot-dirs" {
            return (true, "sandbox-paths");
        }
        match name.strip_prefix("extra-") {
            Some(base) if self.catalog.find(name).is_none() => (true, base),
            _ => (false, name),
        }
    }

    /// Sets `name` (or `extra-name` to append to a list) from text, validating it.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let (extra, base) = self.split_extra(name);
        let def = self
            .catalog
            .find(base)
            .ok_or_else(|| Error::Config(format!("unknown setting '{name}'")))?;
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
    pub fn canonical_name(&self, name: &str) -> Option<&'static str> {
        self.catalog.find(self.split_extra(name).1).map(|d| d.name)
    }

    fn raw(&self, name: &str) -> &str {
        match self.catalog.find(name) {
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
            .filter(|n| {
                self.catalog
                    .find(n)
                    .is_some_and(|d| self.raw(n) != d.default)
            })
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
        self.catalog.defs().map(|d| (d.name, self.raw(d.name)))
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
