//! The daemon's own settings (who may connect and be trusted, what it writes for tools),
//! and [`CATALOG`]: every layer's settings, as kiln reads a configuration.

use std::path::PathBuf;

use kiln_store::config::{Catalog, Def, Kind};
use kiln_store::Settings;

/// The settings the daemon itself acts on.
pub const SETTINGS: &[Def] = &[
    Def {
        name: "trusted-users",
        aliases: &[],
        kind: Kind::List,
        default: "root",
        machine_default: None,
        help: "users (and @groups) with full daemon rights",
    },
    Def {
        name: "allowed-users",
        aliases: &[],
        kind: Kind::List,
        default: "*",
        machine_default: None,
        help: "users (and @groups) allowed to connect",
    },
    Def {
        name: "json-log-path",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        machine_default: None,
        help: "a file (appended to) or a listening Unix socket to which the daemon writes every build's events as JSON lines (docs/build-events.md); read at the daemon's start",
    },
    Def {
        name: "timeline-file",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        machine_default: None,
        help: "a file the daemon writes a timeline of every build to (a Chrome trace, replaced at each start; `kiln timeline summary` reads it)",
    },
    Def {
        name: "allow-import-from-derivation",
        aliases: &[],
        kind: Kind::Bool,
        default: "true",
        machine_default: None,
        help: "(evaluator setting; accepted)",
    },
];

/// The daemon's own settings, typed, read once from the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Who is trusted (`trusted-users`: names, `@group`, `*`).
    pub trusted_users: Vec<String>,
    /// Who may connect (`allowed-users`).
    pub allowed_users: Vec<String>,
    /// Where every build's events go as Nix's JSON log lines (`json-log-path`).
    pub json_log_path: Option<PathBuf>,
    /// Where a Chrome trace of every build's phases goes (`timeline-file`).
    pub timeline_file: Option<PathBuf>,
}

impl DaemonSettings {
    pub fn from_settings(s: &Settings) -> Self {
        let path = |n: &str| Some(s.get(n)).filter(|v| !v.is_empty()).map(PathBuf::from);
        DaemonSettings {
            trusted_users: s.get_list("trusted-users"),
            allowed_users: s.get_list("allowed-users"),
            json_log_path: path("json-log-path"),
            timeline_file: path("timeline-file"),
        }
    }
}

/// Every setting kiln knows: the store's, the substituter's, the build engine's, remote
/// builds' and the daemon's, each defined by the layer that acts on it.
pub const CATALOG: Catalog = Catalog(&[
    kiln_store::config::SETTINGS,
    kiln_substitute::settings::SETTINGS,
    kiln_build::settings::SETTINGS,
    kiln_remote::settings::SETTINGS,
    SETTINGS,
]);

/// Where nix-daemon reads its configuration when none is named: `$NIX_CONF_DIR/nix.conf`
/// (default `/etc/nix/nix.conf`), then the text of `$NIX_CONFIG`. A missing file is not an
/// error.
pub fn load_default_nix_conf(settings: &mut Settings) -> kiln_store::Result<()> {
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

#[cfg(test)]
mod tests {
    use kiln_store::Settings;

    use super::CATALOG;

    #[test]
    fn settings_validate_and_alias() {
        let mut s = Settings::new(CATALOG);
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
        let mut s = Settings::new(CATALOG);
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
    fn the_daemons_own_settings_are_typed() {
        let mut s = Settings::new(CATALOG);
        let d = super::DaemonSettings::from_settings(&s);
        assert_eq!(d.trusted_users, ["root"]);
        assert_eq!(d.allowed_users, ["*"]);
        assert_eq!((d.json_log_path, d.timeline_file), (None, None));
        s.set("trusted-users", "root @wheel").unwrap();
        s.set("json-log-path", "/run/kiln/log.json").unwrap();
        let d = super::DaemonSettings::from_settings(&s);
        assert_eq!(d.trusted_users, ["root", "@wheel"]);
        assert_eq!(
            d.json_log_path.as_deref(),
            Some(std::path::Path::new("/run/kiln/log.json"))
        );
    }

    #[test]
    fn every_name_is_known_once() {
        let mut seen = std::collections::BTreeSet::new();
        for d in CATALOG.defs() {
            for n in std::iter::once(&d.name).chain(d.aliases) {
                assert!(seen.insert(*n), "'{n}' is defined twice");
            }
        }
        assert_eq!(CATALOG.defs().count(), 72);
    }
}
