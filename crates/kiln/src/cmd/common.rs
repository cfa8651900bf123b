//! Options every store-touching command takes, and how they resolve.
//!
//! Sources, lowest to highest: defaults, `kiln.toml` (`--config`, `$KILN_CONFIG`, or
//! `$XDG_CONFIG_HOME/kiln/kiln.toml` if present), a `nix.conf` given with `--nix-conf` (with
//! the nix layout and none given: `$NIX_CONF_DIR/nix.conf`, default `/etc/nix/nix.conf`, if
//! present, then `$NIX_CONFIG`, as nix-daemon reads them), the environment (`KILN_LAYOUT`, `KILN_ROOT`, `KILN_STORE_DIR`, `KILN_STATE_DIR`,
//! `KILN_LOG_DIR`, and `KILN_<SETTING>` such as `KILN_MAX_JOBS`), then flags.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kiln_store::config::ConfigFile;
use kiln_store::{Layout, LayoutSpec, LocalStore, Preset, Settings, StoreOptions};

#[derive(Debug, Args, Clone, Default)]
pub struct StoreArgs {
    /// The store directory (logical: what paths print as), e.g. /gnu/store.
    #[arg(long, global = true, value_name = "DIR")]
    pub store_dir: Option<String>,
    /// The state directory (database, roots, locks).
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The log directory.
    #[arg(long, global = true, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Keep the store, state and log directories under ROOT (a "chroot store").
    #[arg(long, global = true, value_name = "ROOT")]
    pub root: Option<PathBuf>,
    /// Directory preset: guix (/gnu/store, /var/guix), nix (/nix/store, /nix/var/nix) or
    /// user (~/.local/share/kiln; the default).
    #[arg(long, global = true, value_name = "guix|nix|user")]
    pub layout: Option<String>,
    /// Set a setting, as Nix's `--option NAME VALUE`.
    #[arg(long = "option", global = true, num_args = 2, value_names = ["NAME", "VALUE"], action = clap::ArgAction::Append)]
    pub options: Vec<String>,
    /// A kiln.toml to read.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A nix.conf to read (its settings carry over).
    #[arg(long, global = true, value_name = "FILE")]
    pub nix_conf: Option<PathBuf>,
    /// Where `build`, `log` and `store` commands act: `local` (open the store),
    /// `daemon` (through the daemon's socket, `KILN_DAEMON_SOCKET` or the layout's), or
    /// `auto`: the daemon when this user cannot write the store's database.
    #[arg(
        long,
        global = true,
        env = "KILN_STORE",
        value_name = "auto|daemon|local"
    )]
    pub store: Option<String>,
}

impl StoreArgs {
    /// Resolves the layout and settings.
    pub fn resolve(&self) -> anyhow::Result<(Layout, Settings)> {
        let mut spec = LayoutSpec::default();
        let mut settings = Settings::new(kiln_daemon::CATALOG);
        let config = self
            .config
            .clone()
            .or_else(|| std::env::var_os("KILN_CONFIG").map(PathBuf::from))
            .or_else(|| {
                let base = std::env::var_os("XDG_CONFIG_HOME")
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config"))
                    })?;
                let p = base.join("kiln/kiln.toml");
                p.exists().then_some(p)
            });
        if let Some(c) = &config {
            let cf = ConfigFile::load(c)?;
            spec = spec.merge(cf.layout);
            for (k, v) in cf.settings {
                settings
                    .set(&k, &v)
                    .with_context(|| format!("in '{}'", c.display()))?;
            }
        }
        spec = spec.merge(LayoutSpec::from_env()?);
        let flags = LayoutSpec {
            preset: self
                .layout
                .as_deref()
                .map(str::parse::<Preset>)
                .transpose()?,
            root: self.root.clone(),
            store_dir: self.store_dir.clone(),
            state_dir: self.state_dir.clone(),
            log_dir: self.log_dir.clone(),
        };
        spec = spec.merge(flags);
        match &self.nix_conf {
            Some(nc) => settings.load_nix_conf(nc)?,
            // Where nix-daemon looks, for a daemon that stands in for it.
            None if spec.preset == Some(Preset::Nix) => {
                kiln_daemon::settings::load_default_nix_conf(&mut settings)?
            }
            None => {}
        }
        for d in kiln_daemon::CATALOG.defs() {
            let var = format!("KILN_{}", d.name.to_uppercase().replace('-', "_"));
            if let Some(v) = std::env::var_os(&var) {
                settings
                    .set(d.name, &v.to_string_lossy())
                    .with_context(|| format!("in ${var}"))?;
            }
        }
        for (k, v) in every_option(&self.options) {
            settings.set(&k, &v)?;
        }
        for name in settings.not_implemented_in_use() {
            tracing::warn!("{}", kiln_store::config::not_implemented_warning(name));
        }
        let guix = spec.preset == Some(Preset::Guix);
        if settings.get("require-store-builder") == "auto" {
            settings.set("require-store-builder", if guix { "true" } else { "false" })?;
        }
        if settings.get("ssl-cert-file") == "auto" {
            let ca = if guix {
                String::new()
            } else {
                std::env::var("NIX_SSL_CERT_FILE")
                    .ok()
                    .filter(|f| !f.is_empty())
                    .or_else(|| {
                        let system = "/etc/ssl/certs/ca-certificates.crt";
                        std::path::Path::new(system)
                            .exists()
                            .then(|| system.to_string())
                    })
                    .unwrap_or_default()
            };
            settings.set("ssl-cert-file", &ca)?;
        }
        // Build logs as the daemon the layout stands in for writes them.
        if settings.get("log-compression") == "auto" {
            settings.set("log-compression", if guix { "gzip" } else { "bzip2" })?;
        }
        Ok((spec.resolve()?, settings))
    }

    /// A connection to the daemon, when commands go through it (see `via_daemon`).
    pub(super) fn daemon(
        &self,
    ) -> anyhow::Result<Option<(super::via_daemon::DaemonStore, Settings, Layout)>> {
        let (layout, settings) = self.resolve()?;
        let socket = std::env::var_os("KILN_DAEMON_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| layout.daemon_socket_path());
        if !super::via_daemon::wants_daemon(self.store.as_deref(), &layout, &socket)? {
            return Ok(None);
        }
        let d = super::via_daemon::DaemonStore::connect(&socket, &layout)?;
        Ok(Some((d, settings, layout)))
    }

    /// Opens the store.
    pub fn open(&self) -> anyhow::Result<(LocalStore, Settings)> {
        let (layout, settings) = self.resolve()?;
        let opts = StoreOptions::from_settings(&settings, &layout);
        let store = LocalStore::open(layout.clone(), opts).with_context(|| {
            format!("opening the store at '{}'", layout.real_store_dir.display())
        })?;
        Ok((store, settings))
    }
}

/// Every `--option NAME VALUE` of the command line, in order. clap keeps only the last level's
/// occurrences of a global argument (`kiln --option a 1 build --option b 2` would lose `a`),
/// so the arguments are read again here; `parsed` is used when they are not this process's
/// (tests).
fn every_option(parsed: &[String]) -> Vec<(String, String)> {
    let args: Vec<String> = std::env::args().collect();
    let mut out = Vec::new();
    let mut i = 1;
    while i < args.len() {
        if args[i] == "--" {
            break;
        }
        if args[i] == "--option" && i + 2 < args.len() {
            out.push((args[i + 1].clone(), args[i + 2].clone()));
            i += 3;
            continue;
        }
        i += 1;
    }
    let from_clap: Vec<(String, String)> = parsed
        .chunks(2)
        .filter_map(|p| match p {
            [k, v] => Some((k.clone(), v.clone())),
            _ => None,
        })
        .collect();
    // Every parsed pair must be among those found, else the arguments are not ours.
    if from_clap.iter().all(|p| out.contains(p)) {
        out
    } else {
        from_clap
    }
}
