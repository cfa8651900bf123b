//! The settings the substituter (binary caches, their keys and downloads) acts on (its part of `nix.conf`; see
//! `kiln_store::config::Catalog`).

use kiln_store::config::{Def, Kind};

/// The settings the substituter (binary caches, their keys and downloads) acts on.
pub const SETTINGS: &[Def] = &[
    Def {
        name: "substituters",
        aliases: &["binary-caches", "substitute-urls"],
        kind: Kind::List,
        default: "",
        machine_default: None,
        help: "binary caches to substitute from",
    },
    Def {
        name: "trusted-substituters",
        aliases: &["trusted-binary-caches"],
        kind: Kind::List,
        default: "",
        machine_default: None,
        help: "caches untrusted users may use",
    },
    Def {
        name: "trusted-public-keys",
        aliases: &["binary-cache-public-keys"],
        kind: Kind::List,
        default: "",
        machine_default: None,
        help: "keys whose signatures are trusted",
    },
    Def {
        name: "require-sigs",
        aliases: &[],
        kind: Kind::Bool,
        default: "true",
        machine_default: None,
        help: "refuse unsigned substitutes",
    },
    Def {
        name: "substitute",
        aliases: &["use-substitutes", "build-use-substitutes"],
        kind: Kind::Bool,
        default: "true",
        machine_default: None,
        help: "use substitutes",
    },
    Def {
        name: "narinfo-cache-negative-ttl",
        aliases: &[],
        kind: Kind::Int,
        default: "3600",
        machine_default: None,
        help: "seconds a missing narinfo is remembered",
    },
    Def {
        name: "narinfo-cache-positive-ttl",
        aliases: &[],
        kind: Kind::Int,
        default: "2592000",
        machine_default: None,
        help: "seconds a narinfo is remembered",
    },
    Def {
        name: "substitute-agent",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        machine_default: None,
        help: "substitute through an external agent: PROGRAM is run as `PROGRAM substitute --query` and `--substitute` (guix-daemon's protocol; e.g. the `guix` program), with `substituters` as its substitute-urls",
    },
    Def {
        name: "netrc-file",
        aliases: &[],
        kind: Kind::Str,
        default: "",
        machine_default: None,
        help: "a .netrc file with credentials for HTTP binary caches (the nix layout's default: $NIX_CONF_DIR/netrc)",
    },
    Def {
        name: "connect-timeout",
        aliases: &[],
        kind: Kind::Int,
        default: "0",
        machine_default: None,
        help: "seconds to wait for a connection (0: default)",
    },
    Def {
        name: "stalled-download-timeout",
        aliases: &[],
        kind: Kind::Int,
        default: "300",
        machine_default: None,
        help: "seconds a download may receive nothing before it fails",
    },
    Def {
        name: "download-attempts",
        aliases: &[],
        kind: Kind::Int,
        default: "5",
        machine_default: None,
        help: "attempts of a request to a binary cache that failed transiently",
    },
];
