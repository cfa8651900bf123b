//! The settings the build engine uses, typed, taken from [`kiln_store::Settings`].

use std::path::PathBuf;

use kiln_store::Settings;

/// How build logs are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogCompression {
    None,
    Gzip,
    Bzip2,
    Zstd,
}

impl LogCompression {
    pub fn suffix(self) -> &'static str {
        match self {
            LogCompression::None => "",
            LogCompression::Gzip => ".gz",
            LogCompression::Bzip2 => ".bz2",
            LogCompression::Zstd => ".zst",
        }
    }
}

/// Sandboxing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    On,
    Off,
    /// Sandbox, but derivations may opt out (`__noChroot`).
    Relaxed,
}

/// Build settings of one request (the command line's, or a daemon client's).
#[derive(Debug, Clone)]
pub struct BuildSettings {
    pub max_jobs: usize,
    pub cores: u64,
    pub keep_going: bool,
    pub keep_failed: bool,
    pub max_silent_time: u64,
    pub timeout: u64,
    pub max_log_size: u64,
    /// Lines of a failed build's log quoted in its error.
    pub log_lines: usize,
    pub build_repeat: u32,
    pub cache_failures: bool,
    pub log_compression: LogCompression,
    pub keep_build_log: bool,
    pub use_substitutes: bool,
    pub fallback: bool,
    pub max_substitution_jobs: usize,
    pub sandbox: SandboxMode,
    pub sandbox_fallback: bool,
    /// The system-call filter for every builder (`filter-syscalls`).
    pub filter_syscalls: bool,
    /// Builders outside the sandbox may gain privileges (`allow-new-privileges`).
    pub allow_new_privileges: bool,
    /// One cgroup v2 per build where possible (`use-cgroups`).
    pub use_cgroups: bool,
    pub sandbox_paths: Vec<String>,
    /// `fixed-output-network`: `auto`, `slirp4netns` or `host`.
    pub fixed_output_network: String,
    pub isolate_host_loopback: bool,
    pub build_users_group: String,
    pub system: String,
    pub extra_platforms: Vec<String>,
    /// Features builds here may require (`system-features`, plus `ca-derivations` and
    /// `recursive-nix` when those experimental features are on, as Nix's store adds them).
    pub system_features: std::collections::BTreeSet<String>,
    /// `experimental-features`.
    pub experimental_features: std::collections::BTreeSet<String>,
    pub impersonate_linux_26: bool,
    pub print_build_trace: bool,
    /// `print-extended-build-trace` (Guix): downloads are traced too.
    pub print_extended_build_trace: bool,
    pub multiplexed_build_output: bool,
    pub build_hook: Option<String>,
    /// Refuse builders outside the store (`require-store-builder`; guix-daemon 1.5's rule:
    /// a build should depend on nothing of the host's).
    pub require_store_builder: bool,
    /// Build machines (`builders`: entries, `@FILE`s), read each time a build is placed,
    /// so that an edited machines file counts without a restart.
    pub builders: String,
    /// Builds may go to build machines and the build hook (a client's `useBuildHook`;
    /// kiln's own remote client turns it off, so that a build never travels on from a
    /// machine).
    pub use_build_hook: bool,
    pub post_build_hook: Option<String>,
    /// Run before each build with its derivation (and sandbox directory); may add sandbox
    /// paths (`pre-build-hook`, as Nix).
    pub pre_build_hook: Option<String>,
    /// Run when `--check` finds an output that differs (`diff-hook`, only with
    /// `run-diff-hook`).
    pub diff_hook: Option<String>,
    pub build_dir: Option<PathBuf>,
    /// Keys (files holding `name:base64` secret keys) locally built outputs are signed with.
    pub secret_key_files: Vec<String>,
    /// Deduplicate outputs by hard links as they are registered (also settable per client,
    /// unlike the store-wide option).
    pub auto_optimise: bool,
    /// Mirrors `builtin:fetchurl` tries first for a fixed-output hash.
    pub hashed_mirrors: Vec<String>,
    /// `netrc-file`: credentials `builtin:fetchurl` sends to the hosts they name, as Nix's
    /// does (read by the daemon, handed to the builtin; see `job`).
    pub netrc_file: Option<PathBuf>,
    /// `ssl-cert-file`: certificate authorities for fixed-output builds, mounted in their
    /// sandbox as Nix does; `$NIX_SSL_CERT_FILE` or the system's bundle by default.
    pub ssl_cert_file: Option<PathBuf>,
    /// `impure-env`: values for the `impureEnvVars` of fixed-output builds, before the
    /// daemon's own environment.
    pub impure_env: std::collections::BTreeMap<String, String>,
    /// Who asked (for `keep-failed` ownership): never root.
    pub client: Option<(u32, u32)>,
    /// The caches this request substitutes from and the keys it trusts.
    pub subst: std::sync::Arc<kiln_substitute::SubstConfig>,
}

/// This machine's platform name (`x86_64-linux`, …).
pub fn native_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        "arm" => "armv7l",
        a => a,
    };
    format!("{arch}-{}", std::env::consts::OS)
}

/// The features `drv` requires of the machine that builds it (`requiredSystemFeatures`,
/// from the structured attributes when it has them).
pub fn required_system_features(
    drv: &kiln_format::Derivation,
) -> std::collections::BTreeSet<String> {
    crate::attrs::Attrs::of(drv)
        .strings("requiredSystemFeatures")
        .unwrap_or_default()
        .into_iter()
        .collect()
}

impl BuildSettings {
    pub fn from_settings(s: &Settings) -> Self {
        let experimental_features: std::collections::BTreeSet<String> =
            s.get_list("experimental-features").into_iter().collect();
        let mut system_features: std::collections::BTreeSet<String> =
            s.get_list("system-features").into_iter().collect();
        for f in ["ca-derivations", "recursive-nix"] {
            if experimental_features.contains(f) {
                system_features.insert(f.to_string());
            }
        }
        let opt = |n: &str| Some(s.get(n).to_string()).filter(|v| !v.is_empty());
        let log_compression = if !s.get_bool("compress-build-log") {
            LogCompression::None
        } else {
            match s.get("log-compression") {
                "none" => LogCompression::None,
                "gzip" => LogCompression::Gzip,
                "zstd" => LogCompression::Zstd,
                // `auto` is resolved with the layout; unresolved, Nix's choice.
                _ => LogCompression::Bzip2,
            }
        };
        BuildSettings {
            max_jobs: s.get_u64("max-jobs") as usize,
            cores: s.get_u64("cores"),
            keep_going: s.get_bool("keep-going"),
            keep_failed: s.get_bool("keep-failed"),
            max_silent_time: s.get_u64("max-silent-time"),
            timeout: s.get_u64("timeout"),
            max_log_size: s.get_u64("max-log-size"),
            log_lines: s.get_u64("log-lines") as usize,
            build_repeat: s.get_u64("build-repeat") as u32,
            cache_failures: s.get_bool("cache-failures"),
            log_compression,
            keep_build_log: s.get_bool("keep-build-log"),
            use_substitutes: s.get_bool("substitute"),
            fallback: s.get_bool("fallback"),
            max_substitution_jobs: (s.get_u64("max-substitution-jobs") as usize).max(1),
            sandbox: match s.get("sandbox") {
                "false" => SandboxMode::Off,
                "relaxed" => SandboxMode::Relaxed,
                _ => SandboxMode::On,
            },
            sandbox_fallback: s.get_bool("sandbox-fallback"),
            filter_syscalls: s.get_bool("filter-syscalls"),
            allow_new_privileges: s.get_bool("allow-new-privileges"),
            use_cgroups: s.get_bool("use-cgroups"),
            sandbox_paths: s.get_list("sandbox-paths"),
            fixed_output_network: s.get("fixed-output-network").to_string(),
            isolate_host_loopback: s.get_bool("isolate-host-loopback"),
            build_users_group: s.get("build-users-group").to_string(),
            system: opt("system").unwrap_or_else(native_system),
            extra_platforms: s.get_list("extra-platforms"),
            system_features,
            experimental_features,
            impersonate_linux_26: s.get_bool("impersonate-linux-26"),
            print_build_trace: s.get_bool("print-build-trace"),
            print_extended_build_trace: s.get_bool("print-extended-build-trace"),
            multiplexed_build_output: s.get_bool("multiplexed-build-output"),
            build_hook: opt("build-hook"),
            require_store_builder: s.get("require-store-builder") == "true",
            builders: s.get("builders").to_string(),
            use_build_hook: true,
            post_build_hook: opt("post-build-hook"),
            pre_build_hook: opt("pre-build-hook"),
            diff_hook: opt("diff-hook").filter(|_| s.get_bool("run-diff-hook")),
            build_dir: opt("build-dir").map(PathBuf::from),
            secret_key_files: s.get_list("secret-key-files"),
            auto_optimise: s.get_bool("auto-optimise-store"),
            hashed_mirrors: s.get_list("hashed-mirrors"),
            netrc_file: opt("netrc-file").map(PathBuf::from),
            // `auto` is resolved by the command's set-up (it knows the layout); left
            // unresolved (a library caller), it means none.
            ssl_cert_file: opt("ssl-cert-file")
                .filter(|f| f != "auto")
                .map(PathBuf::from),
            impure_env: s
                .get_list("impure-env")
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            client: None,
            subst: std::sync::Arc::new(subst_config(s)),
        }
    }

    /// Whether `drv`'s platform and required features are this machine's (Nix's
    /// `canBuildLocally`); if not, the error says why, in Nix 2.8's words and as a
    /// [`crate::result::FailureDetail`] for clients that expect today's.
    pub fn check_can_build(
        &self,
        drv: &kiln_format::Derivation,
        shown: &str,
    ) -> Result<(), (String, crate::result::FailureDetail)> {
        let required = required_system_features(drv);
        let platform_ok = self.can_build(&drv.platform);
        if platform_ok && required.is_subset(&self.system_features) {
            return Ok(());
        }
        let join = |s: &std::collections::BTreeSet<String>| {
            s.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
        };
        let detail = if platform_ok {
            crate::result::FailureDetail::MissingFeatures {
                required: required.iter().cloned().collect(),
                available: self.system_features.iter().cloned().collect(),
            }
        } else {
            crate::result::FailureDetail::PlatformMismatch {
                required: drv.platform.clone(),
                current: self.system.clone(),
            }
        };
        Err((
            format!(
                "a '{}' with features {{{}}} is required to build '{shown}', but I am a '{}' with features {{{}}}",
                drv.platform,
                join(&required),
                self.system,
                join(&self.system_features)
            ),
            detail,
        ))
    }

    /// Whether `platform` builds here (the reference's `canBuildLocally`).
    pub fn can_build(&self, platform: &str) -> bool {
        platform == self.system
            || platform == "builtin"
            || self.extra_platforms.iter().any(|p| p == platform)
            || (platform == "i686-linux" && self.system == "x86_64-linux")
            || (platform == "armhf-linux" && self.system == "aarch64-linux")
    }
}

/// The substitution settings of `s`; a trusted key that does not parse is reported and
/// left out.
fn subst_config(s: &Settings) -> kiln_substitute::SubstConfig {
    let (mut cfg, warnings) = kiln_substitute::SubstConfig::new(
        s.get_list("substituters"),
        &s.get_list("trusted-public-keys"),
        s.get_bool("require-sigs"),
    );
    for w in warnings {
        tracing::warn!("{w}");
    }
    cfg.limits = Some(kiln_substitute::Limits::from_settings(s));
    cfg
}

impl Default for BuildSettings {
    fn default() -> Self {
        BuildSettings::from_settings(&Settings::new(CATALOG))
    }
}

/// The settings of the build engine and the layers below it (store, substituter): what a
/// [`Settings`] needs to make [`BuildSettings`].
pub const CATALOG: kiln_store::config::Catalog = kiln_store::config::Catalog(&[
    kiln_store::config::SETTINGS,
    kiln_substitute::settings::SETTINGS,
    SETTINGS,
]);

/// `system-features` on this machine: `default`, plus `kvm` where this process may open
/// `/dev/kvm` for reading and writing (as Nix decides it).
pub fn with_kvm(default: &'static str) -> String {
    let kvm = rustix::fs::access(
        "/dev/kvm",
        rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
    );
    match kvm {
        Ok(()) => format!("{default} kvm"),
        Err(_) => default.to_string(),
    }
}

/// The settings the build engine acts on (its part of `nix.conf`; see
/// `kiln_store::config::Catalog`).
pub const SETTINGS: &[kiln_store::config::Def] = &[
    kiln_store::config::Def {
        name: "max-jobs",
        aliases: &["build-max-jobs"],
        kind: kiln_store::config::Kind::IntOrAuto,
        default: "1",
        machine_default: None,
        help: "builds run at once",
    },
    kiln_store::config::Def {
        name: "cores",
        aliases: &["build-cores"],
        kind: kiln_store::config::Kind::IntOrAuto,
        default: "0",
        machine_default: None,
        help: "NIX_BUILD_CORES for each build; 0 means all CPUs",
    },
    kiln_store::config::Def {
        name: "sandbox",
        aliases: &["build-use-sandbox", "build-use-chroot"],
        kind: kiln_store::config::Kind::Enum(&["true", "false", "relaxed"]),
        default: "true",
        machine_default: None,
        help: "run builds in the Linux sandbox",
    },
    kiln_store::config::Def {
        name: "sandbox-paths",
        aliases: &["build-sandbox-paths", "chroot-dirs", "build-chroot-dirs"],
        kind: kiln_store::config::Kind::List,
        default: "",
        machine_default: None,
        help: "extra paths visible in the sandbox (target=source)",
    },
    kiln_store::config::Def {
        name: "use-cgroups",
        aliases: &[],
        kind: kiln_store::config::Kind::Bool,
        default: "true",
        machine_default: None,
        help: "run each build in its own cgroup v2 where one can be made (all its processes killed at the end; CPU time and peak memory reported)",
    },
    kiln_store::config::Def {
        name: "fixed-output-network",
        aliases: &[],
        kind: kiln_store::config::Kind::Enum(&["auto", "slirp4netns", "host"]),
        default: "auto",
        machine_default: None,
        help: "how sandboxed fixed-output builds reach the network: their own namespace through slirp4netns (auto: where it is installed and /dev/net/tun opens), or the host's namespace, whose abstract Unix sockets they then share",
    },
    kiln_store::config::Def {
        name: "isolate-host-loopback",
        aliases: &[],
        kind: kiln_store::config::Kind::Bool,
        default: "false",
        machine_default: None,
        help: "keep fixed-output builds behind slirp4netns from the host's loopback services",
    },
    kiln_store::config::Def {
        name: "sandbox-fallback",
        aliases: &[],
        kind: kiln_store::config::Kind::Bool,
        default: "true",
        machine_default: None,
        help: "build without the sandbox, with a warning, where it cannot be set up",
    },
    kiln_store::config::Def {
        name: "filter-syscalls",
        aliases: &[],
        kind: kiln_store::config::Kind::Bool,
        default: "true",
        machine_default: None,
        help: "run every builder, sandboxed or not, under the system-call filter (chmod-family calls with setuid or setgid bits, extended attributes and io_uring refused)",
    },
    kiln_store::config::Def {
        name: "allow-new-privileges",
        aliases: &[],
        kind: kiln_store::config::Kind::Bool,
        default: "false",
        machine_default: None,
        help: "let builders outside the sandbox gain privileges through setuid programs (no_new_privs is not set; sandboxed builders never can)",
    },
    kiln_store::config::Def {
        name: "build-users-group",
        aliases: &[],
        kind: kiln_store::config::Kind::Str,
        default: "",
        machine_default: None,
        help: "group whose members run builds",
    },
    kiln_store::config::Def {
        name: "fallback",
        aliases: &["build-fallback"],
        kind: kiln_store::config::Kind::Bool,
        default: "false",
        machine_default: None,
        help: "build when substitution fails",
    },
    kiln_store::config::Def {
        name: "max-substitution-jobs",
        aliases: &[],
        kind: kiln_store::config::Kind::Int,
        default: "16",
        machine_default: None,
        help: "substitutions run at once",
    },
    kiln_store::config::Def {
        name: "keep-failed",
        aliases: &["build-keep-failed"],
        kind: kiln_store::config::Kind::Bool,
        default: "false",
        machine_default: None,
        help: "keep the build directory of failed builds",
    },
    kiln_store::config::Def {
        name: "keep-going",
        aliases: &["build-keep-going"],
        kind: kiln_store::config::Kind::Bool,
        default: "false",
        machine_default: None,
        help: "keep building after a failure",
    },
    kiln_store::config::Def {
        name: "max-silent-time",
        aliases: &["build-max-silent-time"],
        kind: kiln_store::config::Kind::Int,
        default: "0",
        machine_default: None,
        help: "seconds of builder silence before it is killed (0: no limit)",
    },
    kiln_store::config::Def {
        name: "timeout",
        aliases: &["build-timeout"],
        kind: kiln_store::config::Kind::Int,
        default: "0",
        machine_default: None,
        help: "wall-clock seconds a build may take (0: no limit)",
    },
    kiln_store::config::Def {
        name: "max-log-size",
        aliases: &["build-max-log-size", "max-build-log-size"],
        kind: kiln_store::config::Kind::Int,
        default: "0",
        machine_default: None,
        help: "bytes of log before the build is killed (0: no limit)",
    },
    kiln_store::config::Def {
        name: "log-lines",
        aliases: &[],
        kind: kiln_store::config::Kind::Int,
        // Nix 2.34's (2.8 showed 10).
        default: "25",
        machine_default: None,
        help: "lines of a failed build's log shown in its error",
    },
    kiln_store::config::Def {
        name: "build-repeat",
        aliases: &["repeat"],
        kind: kiln_store::config::Kind::Int,
        default: "0",
        machine_default: None,
        help: "extra rounds to check determinism",
    },
    kiln_store::config::Def {
        name: "cache-failures",
        aliases: &["build-cache-failure"],
        kind: kiln_store::config::Kind::Bool,
        default: "false",
        machine_default: None,
        help: "remember failed builds",
    },
    kiln_store::config::Def {
        name: "log-compression",
        aliases: &[],
        kind: kiln_store::config::Kind::Enum(&["auto", "none", "gzip", "bzip2", "zstd"]),
        default: "auto",
        machine_default: None,
        help: "compression of build logs (auto: gzip with the guix layout, as guix-daemon; bzip2 otherwise, as Nix)",
    },
    kiln_store::config::Def {
        name: "compress-build-log",
        aliases: &["build-compress-log"],
        kind: kiln_store::config::Kind::Bool,
        default: "true",
        machine_default: None,
        help: "compress build logs (Nix's switch; see log-compression)",
    },
    kiln_store::config::Def {
        name: "keep-build-log",
        aliases: &["build-keep-log"],
        kind: kiln_store::config::Kind::Bool,
        default: "true",
        machine_default: None,
        help: "write build logs",
    },
    kiln_store::config::Def {
        name: "builders",
        aliases: &[],
        kind: kiln_store::config::Kind::Str,
        default: "",
        machine_default: None,
        help: "build machines: machines-file entries separated by ';' or newlines, '@FILE' to read a file (default with the nix layout: @$NIX_CONF_DIR/machines)",
    },
    kiln_store::config::Def {
        name: "diff-hook",
        aliases: &[],
        kind: kiln_store::config::Kind::Str,
        default: "",
        machine_default: None,
        help: "program run when --check finds a build's output differs: PREVIOUS NEW DRV BUILD-DIR",
    },
    kiln_store::config::Def {
        name: "run-diff-hook",
        aliases: &[],
        kind: kiln_store::config::Kind::Bool,
        default: "false",
        machine_default: None,
        help: "run diff-hook",
    },
    kiln_store::config::Def {
        name: "require-store-builder",
        aliases: &[],
        kind: kiln_store::config::Kind::Enum(&["auto", "true", "false"]),
        default: "auto",
        machine_default: None,
        help: "refuse a builder outside the store, as guix-daemon 1.5 does (auto: with the guix layout)",
    },
    kiln_store::config::Def {
        name: "build-hook",
        aliases: &[],
        kind: kiln_store::config::Kind::Str,
        default: "",
        machine_default: None,
        help: "offload agent program",
    },
    kiln_store::config::Def {
        name: "system",
        aliases: &[],
        kind: kiln_store::config::Kind::Str,
        default: "",
        machine_default: None,
        help: "this machine's platform (default: detected)",
    },
    kiln_store::config::Def {
        name: "extra-platforms",
        aliases: &[],
        kind: kiln_store::config::Kind::List,
        default: "",
        machine_default: None,
        help: "other platforms this machine can build for",
    },
    kiln_store::config::Def {
        name: "system-features",
        aliases: &[],
        kind: kiln_store::config::Kind::List,
        // Nix's default; `kvm` is added where /dev/kvm can be used (`with_kvm`).
        default: "nixos-test benchmark big-parallel",
        machine_default: Some(crate::settings::with_kvm),
        help: "features builds may require (requiredSystemFeatures)",
    },
    kiln_store::config::Def {
        name: "impersonate-linux-26",
        aliases: &["build-impersonate-linux-26"],
        kind: kiln_store::config::Kind::Bool,
        default: "false",
        machine_default: None,
        help: "report Linux 2.6 to builders",
    },
    kiln_store::config::Def {
        name: "post-build-hook",
        aliases: &[],
        kind: kiln_store::config::Kind::Str,
        default: "",
        machine_default: None,
        help: "program run after each successful build",
    },
    kiln_store::config::Def {
        name: "build-dir",
        aliases: &[],
        kind: kiln_store::config::Kind::Str,
        default: "",
        machine_default: None,
        help: "where build directories go (default: STATE/builds)",
    },
    kiln_store::config::Def {
        name: "print-build-trace",
        aliases: &[],
        kind: kiln_store::config::Kind::Bool,
        default: "false",
        machine_default: None,
        help: "emit Guix '@ build-…' trace lines",
    },
    kiln_store::config::Def {
        name: "print-extended-build-trace",
        aliases: &[],
        kind: kiln_store::config::Kind::Bool,
        default: "false",
        machine_default: None,
        help: "with print-build-trace, also Guix's '@ download-…' lines of substitutions (a Guix client asks for them)",
    },
    kiln_store::config::Def {
        name: "multiplexed-build-output",
        aliases: &[],
        kind: kiln_store::config::Kind::Bool,
        default: "false",
        machine_default: None,
        help: "prefix build output with '@ build-log PID LEN'",
    },
    kiln_store::config::Def {
        name: "secret-key-files",
        aliases: &[],
        kind: kiln_store::config::Kind::List,
        default: "",
        machine_default: None,
        help: "keys to sign locally built paths with",
    },
    kiln_store::config::Def {
        name: "impure-env",
        aliases: &[],
        kind: kiln_store::config::Kind::List,
        default: "",
        machine_default: None,
        help: "NAME=VALUE pairs given to fixed-output builds that list NAME in impureEnvVars (experimental configurable-impure-env)",
    },
    kiln_store::config::Def {
        name: "hashed-mirrors",
        aliases: &[],
        kind: kiln_store::config::Kind::List,
        default: "",
        machine_default: None,
        help: "mirrors builtin:fetchurl tries first for fixed-output downloads (URL/ALGO/HASH)",
    },
    kiln_store::config::Def {
        name: "min-free",
        aliases: &[],
        kind: kiln_store::config::Kind::Int,
        default: "0",
        machine_default: None,
        help: "while building, collect garbage when fewer bytes than this are free on the store's file system (0: never)",
    },
    kiln_store::config::Def {
        name: "max-free",
        aliases: &[],
        kind: kiln_store::config::Kind::Int,
        default: "18446744073709551615",
        machine_default: None,
        help: "an automatic collection (min-free) stops once this many bytes are free",
    },
    kiln_store::config::Def {
        name: "min-free-check-interval",
        aliases: &[],
        kind: kiln_store::config::Kind::Int,
        default: "5",
        machine_default: None,
        help: "seconds between looks at the free space while building (min-free)",
    },
    kiln_store::config::Def {
        name: "experimental-features",
        aliases: &[],
        kind: kiln_store::config::Kind::List,
        default: "",
        machine_default: None,
        help: "Nix's experimental features the build engine honours: recursive-nix and ca-derivations (each also a system feature then), configurable-impure-env",
    },
    kiln_store::config::Def {
        name: "ssl-cert-file",
        aliases: &[],
        kind: kiln_store::config::Kind::Str,
        default: "auto",
        machine_default: None,
        help: "the certificate authorities fixed-output builds see at /etc/ssl/certs/ca-certificates.crt in the sandbox, as Nix's; empty: none. auto: $NIX_SSL_CERT_FILE, else /etc/ssl/certs/ca-certificates.crt if it exists (none with the guix layout, as guix-daemon gives none)",
    },
    kiln_store::config::Def {
        name: "pre-build-hook",
        aliases: &[],
        kind: kiln_store::config::Kind::Str,
        default: "",
        machine_default: None,
        help: "a program run before each build with the derivation's path (and the sandbox's root): the paths it prints after `extra-sandbox-paths` are added to that build's sandbox, as Nix's hook",
    },
];
