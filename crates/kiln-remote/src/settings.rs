//! The settings remote builds acts on (its part of `nix.conf`; see
//! `kiln_store::config::Catalog`).

use kiln_store::config::{Def, Kind};

/// The settings remote builds acts on.
pub const SETTINGS: &[Def] = &[
    Def {
        name: "builders-use-substitutes",
        aliases: &[],
        kind: Kind::Bool,
        default: "false",
        machine_default: None,
        help: "let build machines substitute the inputs they lack before kiln copies them",
    },
    Def {
        name: "local-speed-factor",
        aliases: &[],
        kind: Kind::Str,
        default: "1",
        machine_default: None,
        help: "this machine's speed factor against the build machines' (kiln)",
    },
];
