//! Versions, the handshake's negotiation, and what a connection can do: the one place
//! where protocol versions, dialects and features are compared.
//!
//! A version is `major << 8 | minor`. The daemon must send its version before it reads
//! the client's — except from Nix ≥ 2.23, whose clients send their magic and version in
//! one write, so both are already in the daemon's buffer when it answers. kiln answers
//! those with Nix's own 1.38 (so a client announcing a newer 1.x settles on 1.38, and the
//! bytes match nix-daemon's), and everyone else with Guix's current `0x164`: Nix clients
//! before 2.23 take min(theirs, the daemon's), which is theirs, and Guix clients gate their
//! `SetOptions` layout on the daemon's minor (`≥ 0x61`) and see what their own daemon
//! sends. Guix clients announce minors ≥ 0x60, which is how the dialects are told apart.
//!
//! Everything that depends on the version is a named capability of [`Proto`], computed
//! once at the handshake from the dialect, the negotiated version and the features both
//! sides named (1.38). Which operations exist for whom is the table [`OPS`]. Adding a
//! version or a feature touches this file and the layout that changes, nothing else.

use crate::ops::Op;

/// The client's greeting.
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// The daemon's greeting.
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// The version kiln's daemon advertises to clients it cannot see yet (Guix's current).
pub const DAEMON_VERSION: u64 = 0x164;
/// The newest Nix protocol minor kiln speaks (Nix 2.24 – 2.35's 1.38).
pub const NIX_MAX_MINOR: u64 = 38;
/// What kiln's daemon advertises to a Nix client whose version it has already read, and
/// what kiln's client announces by default.
pub const NIX_VERSION: u64 = 0x100 | NIX_MAX_MINOR;
/// The oldest Nix client kiln serves: 1.18 (Nix 2.0), Nix's own floor since 2.32.
pub const NIX_MIN_CLIENT_MINOR: u64 = 18;
/// The oldest daemon kiln's client talks to (1.10), as Nix's client.
pub const MIN_DAEMON_VERSION: u64 = 0x10a;
/// Guix's minors start here.
pub const GUIX_MIN_MINOR: u64 = 0x60;
/// What Nix 2.8's client sends.
pub const NIX_2_8_CLIENT_VERSION: u64 = 0x122;
/// What current Guix clients send.
pub const GUIX_CLIENT_VERSION: u64 = 0x164;
/// The Nix release whose behaviour kiln reproduces, for the version string Nix clients
/// display (`nix store info`).
pub const NIX_COMPAT_VERSION: &str = "2.34.8";

/// Which family a client belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Nix,
    Guix,
}

/// A peer's protocol version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u64);

impl Version {
    pub fn major(self) -> u64 {
        self.0 >> 8
    }
    pub fn minor(self) -> u64 {
        self.0 & 0xff
    }
    /// The dialect a peer announcing this version speaks.
    pub fn dialect(self) -> Dialect {
        if self.minor() >= GUIX_MIN_MINOR {
            Dialect::Guix
        } else {
            Dialect::Nix
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{} ({:#x})", self.major(), self.minor(), self.0)
    }
}

/// A feature named in the 1.38 handshake (Nix ≥ 2.35).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `CollectGarbage` carries "whole store" or specific paths with a delete-referrers
    /// flag (`nix store delete --skip-alive`, `--also-referrers`).
    DeleteDeadSpecificReferrers,
    /// Build results and realisations keyed by output name and store path instead of by
    /// `sha256:<hash modulo>!out`.
    RealisationWithPathNotHash,
    /// `QueryActiveBuilds` (op 48, `nix ps`): the running builds as a JSON string
    /// (Determinate Nix 3.14; reserved upstream by NixOS/nix#15979).
    QueryActiveBuilds,
    /// kiln's own: `QueryActiveBuilds` also lists the builds still waiting, as entries of
    /// type `queued` (which Nix's `nix ps` would refuse, so only clients that ask get them).
    KilnQueuedBuilds,
    /// kiln's own: build progress as kiln's JSON events (`docs/build-events.md`), one
    /// `@kiln-event {json}` log line each, instead of Nix's activities, so `kiln build`
    /// through a daemon shows what it shows building alone.
    KilnEvents,
}

impl Feature {
    pub const ALL: [Feature; 5] = [
        Feature::DeleteDeadSpecificReferrers,
        Feature::RealisationWithPathNotHash,
        Feature::QueryActiveBuilds,
        Feature::KilnQueuedBuilds,
        Feature::KilnEvents,
    ];

    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Feature::DeleteDeadSpecificReferrers => "delete-dead-specific-referrers",
            Feature::RealisationWithPathNotHash => "realisation-with-path-not-hash",
            Feature::QueryActiveBuilds => "queryActiveBuilds",
            Feature::KilnQueuedBuilds => "kiln-queued-builds",
            Feature::KilnEvents => "kiln-events",
        }
    }

    pub fn from_name(s: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.name() == s)
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// A set of features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features(u32);

impl Features {
    pub const NONE: Features = Features(0);

    pub fn of(fs: &[Feature]) -> Features {
        Features(fs.iter().fold(0, |b, f| b | f.bit()))
    }

    pub fn contains(self, f: Feature) -> bool {
        self.0 & f.bit() != 0
    }

    /// The known features among `names` (unknown names are other peers' business).
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Features {
        Features(
            names
                .into_iter()
                .filter_map(Feature::from_name)
                .fold(0, |b, f| b | f.bit()),
        )
    }

    /// The names, sorted as Nix's `std::set<std::string>` sends them.
    pub fn names(self) -> Vec<&'static str> {
        let mut v: Vec<&str> = Feature::ALL
            .into_iter()
            .filter(|f| self.contains(*f))
            .map(Feature::name)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn intersect(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }
}

/// The features of Nix's protocol that kiln implements: what its client names by default
/// (a connection to another machine's daemon, which must not get kiln's own forms).
pub const NIX_FEATURES: Features = Features(
    (1 << Feature::DeleteDeadSpecificReferrers as u32)
        | (1 << Feature::RealisationWithPathNotHash as u32)
        | (1 << Feature::QueryActiveBuilds as u32),
);

/// The features kiln implements as a daemon: exactly those it advertises. Its own
/// commands name them all as clients.
pub const SUPPORTED_FEATURES: Features = Features(
    (1 << Feature::DeleteDeadSpecificReferrers as u32)
        | (1 << Feature::RealisationWithPathNotHash as u32)
        | (1 << Feature::QueryActiveBuilds as u32)
        | (1 << Feature::KilnQueuedBuilds as u32)
        | (1 << Feature::KilnEvents as u32),
);

/// Where an operation exists: the Nix minor that introduced it and the one whose daemons
/// (Nix 2.34 for 1.38) no longer have it, and whether Guix has it.
#[derive(Debug, Clone, Copy)]
pub struct OpAvailability {
    pub op: Op,
    pub number: u64,
    pub name: &'static str,
    /// `None`: not in Nix at all.
    pub nix_since: Option<u64>,
    /// The first minor at which Nix's daemon answers "invalid operation".
    pub nix_removed: Option<u64>,
    pub guix: bool,
    /// The feature both sides must have named for it to exist (1.38).
    pub feature: Option<Feature>,
}

const fn op(
    op: Op,
    name: &'static str,
    nix_since: Option<u64>,
    nix_removed: Option<u64>,
    guix: bool,
) -> OpAvailability {
    OpAvailability {
        op,
        number: op as u64,
        name,
        nix_since,
        nix_removed,
        guix,
        feature: None,
    }
}

/// An operation of Nix clients that exists where both sides named `feature`.
const fn feature_op(op: Op, name: &'static str, feature: Feature) -> OpAvailability {
    OpAvailability {
        op,
        number: op as u64,
        name,
        nix_since: Some(38),
        nix_removed: None,
        guix: false,
        feature: Some(feature),
    }
}

/// Every operation kiln knows, and who has it. Nix 2.32 removed `ExportPath` and
/// `ImportPaths`, Nix 2.34 `HasSubstitutes`, `QueryPathHash` and `QueryReferences`; a
/// client at 1.38 gets Nix 2.34's "invalid operation" for them. Guix has 1–35 and its own
/// 80 and 81; Nix 2.8 never had 24, 25, 80 or 81.
pub const OPS: &[OpAvailability] = &[
    op(Op::IsValidPath, "IsValidPath", Some(0), None, true),
    op(
        Op::HasSubstitutes,
        "HasSubstitutes",
        Some(0),
        Some(38),
        true,
    ),
    op(Op::QueryPathHash, "QueryPathHash", Some(0), Some(38), true),
    op(
        Op::QueryReferences,
        "QueryReferences",
        Some(0),
        Some(38),
        true,
    ),
    op(Op::QueryReferrers, "QueryReferrers", Some(0), None, true),
    op(Op::AddToStore, "AddToStore", Some(0), None, true),
    op(Op::AddTextToStore, "AddTextToStore", Some(0), None, true),
    op(Op::BuildPaths, "BuildPaths", Some(0), None, true),
    op(Op::EnsurePath, "EnsurePath", Some(0), None, true),
    op(Op::AddTempRoot, "AddTempRoot", Some(0), None, true),
    op(Op::AddIndirectRoot, "AddIndirectRoot", Some(0), None, true),
    op(Op::SyncWithGc, "SyncWithGC", Some(0), None, true),
    op(Op::FindRoots, "FindRoots", Some(0), None, true),
    op(Op::ExportPath, "ExportPath", Some(0), Some(38), true),
    op(Op::QueryDeriver, "QueryDeriver", Some(0), None, true),
    op(Op::SetOptions, "SetOptions", Some(0), None, true),
    op(Op::CollectGarbage, "CollectGarbage", Some(0), None, true),
    op(
        Op::QuerySubstitutablePathInfo,
        "QuerySubstitutablePathInfo",
        Some(0),
        None,
        true,
    ),
    op(
        Op::QueryDerivationOutputs,
        "QueryDerivationOutputs",
        Some(0),
        None,
        true,
    ),
    op(
        Op::QueryAllValidPaths,
        "QueryAllValidPaths",
        Some(0),
        None,
        true,
    ),
    op(Op::QueryFailedPaths, "QueryFailedPaths", None, None, true),
    op(Op::ClearFailedPaths, "ClearFailedPaths", None, None, true),
    op(Op::QueryPathInfo, "QueryPathInfo", Some(0), None, true),
    op(Op::ImportPaths, "ImportPaths", Some(0), Some(38), true),
    op(
        Op::QueryDerivationOutputNames,
        "QueryDerivationOutputNames",
        Some(0),
        None,
        true,
    ),
    op(
        Op::QueryPathFromHashPart,
        "QueryPathFromHashPart",
        Some(0),
        None,
        true,
    ),
    op(
        Op::QuerySubstitutablePathInfos,
        "QuerySubstitutablePathInfos",
        Some(0),
        None,
        true,
    ),
    op(Op::QueryValidPaths, "QueryValidPaths", Some(0), None, true),
    op(
        Op::QuerySubstitutablePaths,
        "QuerySubstitutablePaths",
        Some(0),
        None,
        true,
    ),
    op(
        Op::QueryValidDerivers,
        "QueryValidDerivers",
        Some(0),
        None,
        true,
    ),
    op(Op::OptimiseStore, "OptimiseStore", Some(0), None, true),
    op(Op::VerifyStore, "VerifyStore", Some(0), None, true),
    op(Op::BuildDerivation, "BuildDerivation", Some(0), None, false),
    op(Op::AddSignatures, "AddSignatures", Some(0), None, false),
    op(Op::NarFromPath, "NarFromPath", Some(0), None, false),
    op(Op::AddToStoreNar, "AddToStoreNar", Some(0), None, false),
    op(Op::QueryMissing, "QueryMissing", Some(0), None, false),
    op(
        Op::QueryDerivationOutputMap,
        "QueryDerivationOutputMap",
        Some(0),
        None,
        false,
    ),
    op(
        Op::RegisterDrvOutput,
        "RegisterDrvOutput",
        Some(0),
        None,
        false,
    ),
    op(
        Op::QueryRealisation,
        "QueryRealisation",
        Some(0),
        None,
        false,
    ),
    op(
        Op::AddMultipleToStore,
        "AddMultipleToStore",
        Some(0),
        None,
        false,
    ),
    op(Op::AddBuildLog, "AddBuildLog", Some(0), None, false),
    op(
        Op::BuildPathsWithResults,
        "BuildPathsWithResults",
        Some(0),
        None,
        false,
    ),
    op(Op::AddPermRoot, "AddPermRoot", Some(36), None, false),
    feature_op(
        Op::QueryActiveBuilds,
        "QueryActiveBuilds",
        Feature::QueryActiveBuilds,
    ),
    op(Op::BuiltinBuilders, "BuiltinBuilders", None, None, true),
    op(Op::SubstituteUrls, "SubstituteURLs", None, None, true),
];

/// What a connection speaks: the dialect, the negotiated version and the features both
/// sides named. Computed once at the handshake; every layout decision asks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proto {
    dialect: Dialect,
    /// Nix: min(client, daemon). Guix: the client's version (guix-daemon gates on it).
    version: Version,
    features: Features,
}

impl Proto {
    /// A Nix connection at `version`, without features.
    pub fn nix(version: u64) -> Proto {
        Proto {
            dialect: Dialect::Nix,
            version: Version(version),
            features: Features::NONE,
        }
    }

    /// A Guix connection with a client of `version`.
    pub fn guix(version: u64) -> Proto {
        Proto {
            dialect: Dialect::Guix,
            version: Version(version),
            features: Features::NONE,
        }
    }

    /// The same connection with `features` negotiated.
    pub fn with_features(self, features: Features) -> Proto {
        Proto { features, ..self }
    }

    /// The daemon's side: the connection a client announcing `client` gets, or why it
    /// gets none.
    pub fn for_client(client: Version) -> Result<Proto, String> {
        if client.major() != 1 {
            return Err(format!(
                "the client speaks protocol {client}, whose major version kiln does not speak (1.x)"
            ));
        }
        if client.dialect() == Dialect::Guix {
            return Ok(Proto::guix(client.0));
        }
        if client.minor() < NIX_MIN_CLIENT_MINOR {
            return Err(format!(
                "the Nix client version is too old: it speaks protocol 1.{}, and kiln needs at least 1.{NIX_MIN_CLIENT_MINOR} (Nix 2.0)",
                client.minor()
            ));
        }
        Ok(Proto::nix(client.0.min(NIX_VERSION)))
    }

    /// The client's side: the connection with a daemon announcing `daemon`, for a client
    /// announcing `own`.
    pub fn for_daemon(own: Version, daemon: Version) -> Result<Proto, String> {
        if daemon.major() != 1 {
            return Err(format!("daemon protocol version {daemon} not supported"));
        }
        if daemon.0 < MIN_DAEMON_VERSION {
            return Err(format!("the daemon's protocol version {daemon} is too old"));
        }
        Ok(match own.dialect() {
            Dialect::Guix => Proto::guix(own.0),
            Dialect::Nix => Proto::nix(own.0.min(daemon.0)),
        })
    }

    pub fn dialect(self) -> Dialect {
        self.dialect
    }
    pub fn version(self) -> Version {
        self.version
    }
    pub fn features(self) -> Features {
        self.features
    }
    pub fn is_guix(self) -> bool {
        self.dialect == Dialect::Guix
    }
    pub fn has_feature(self, f: Feature) -> bool {
        self.features.contains(f)
    }

    fn nix_at_least(self, minor: u64) -> bool {
        self.dialect == Dialect::Nix && self.version.minor() >= minor
    }
    /// Both dialects: Guix's minors are above every Nix gate below 1.34.
    fn at_least(self, minor: u64) -> bool {
        self.version.minor() >= minor
    }

    // --- The handshake ---

    /// The client sends `reserveSpace` (1.11).
    pub fn reserve_space(self) -> bool {
        self.at_least(11)
    }
    /// The client sends a CPU-affinity flag (1.14); non-zero means one more number.
    pub fn cpu_affinity(self) -> bool {
        self.at_least(14)
    }
    /// The daemon sends its version string (Nix 1.33).
    pub fn daemon_version_string(self) -> bool {
        self.nix_at_least(33)
    }
    /// The daemon tells the client whether it trusts it (Nix 1.35).
    pub fn trust_flag(self) -> bool {
        self.nix_at_least(35)
    }
    /// Both sides exchange feature lists (Nix 1.38).
    pub fn feature_exchange(self) -> bool {
        self.nix_at_least(38)
    }

    // --- The stderr channel ---

    /// Activities and results instead of plain log lines (Nix 1.20).
    pub fn activities(self) -> bool {
        self.nix_at_least(20)
    }
    /// Errors in the structured form (Nix 1.26).
    pub fn structured_errors(self) -> bool {
        self.nix_at_least(26)
    }
    /// Failures are described as nix-daemon 2.34 describes them (`Cannot build '…'.
    /// Reason: …`, `invalid operation N`, with its colours) rather than as Nix 2.8 did
    /// (`builder for '…' failed …`). Not a wire change: the words of the daemon kiln
    /// stands in for, which today's nix-daemon sends to every Nix client, old ones too
    /// (recorded at 1.35, 1.37 and 1.38). Guix clients keep their own.
    pub fn nix_2_34_messages(self) -> bool {
        self.dialect == Dialect::Nix
    }

    // --- Operations' layouts ---

    /// `SetOptions` ends with overridden settings (1.12).
    pub fn option_overrides(self) -> bool {
        self.at_least(12)
    }
    /// `SetOptions` carries max-jobs, max-silent-time and cores as numbers (all Nix;
    /// Guix clients stop sending them to daemons ≥ 0x61, and kiln advertises 0x164).
    pub fn options_jobs_and_cores(self) -> bool {
        !self.is_guix() || self.version.minor() < 0x61
    }
    /// `BuildPaths` carries a build mode (1.15).
    pub fn build_mode(self) -> bool {
        self.at_least(15)
    }
    /// Path infos carry ultimate, signatures and content address (Nix 1.16).
    pub fn path_info_ca(self) -> bool {
        self.nix_at_least(16)
    }
    /// `QueryPathInfo` answers with a found flag; an invalid path is not an error (Nix
    /// 1.17).
    pub fn path_info_found_flag(self) -> bool {
        self.nix_at_least(17)
    }
    /// `AddToStoreNar` data is pulled with `STDERR_READ` (1.21 – 1.22).
    pub fn nar_data_tunnelled(self) -> bool {
        self.at_least(21) && !self.nar_data_framed()
    }
    /// `AddToStoreNar` data is framed (1.23).
    pub fn nar_data_framed(self) -> bool {
        self.at_least(23)
    }
    /// `QuerySubstitutablePathInfos` names a content address per path (Nix 1.22).
    pub fn substitutable_infos_with_ca(self) -> bool {
        self.nix_at_least(22)
    }
    /// `AddToStore` is name, content-address method, references, repair, framed data;
    /// its reply a path info (Nix 1.25).
    pub fn add_to_store_ca(self) -> bool {
        self.nix_at_least(25)
    }
    /// `QueryValidPaths` ends with a substitute flag (Nix 1.27).
    pub fn valid_paths_substitute_flag(self) -> bool {
        self.nix_at_least(27)
    }
    /// Build results carry the built outputs (1.28).
    pub fn built_outputs(self) -> bool {
        self.at_least(28)
    }
    /// Build results carry times built, non-determinism, start and stop (1.29).
    pub fn build_times(self) -> bool {
        self.at_least(29)
    }
    /// Derived paths are `drv!out` with `*` for all (Nix 1.30); before, `drv[!outs]`.
    pub fn modern_derived_paths(self) -> bool {
        self.nix_at_least(30)
    }
    /// Realisations travel as JSON (1.31).
    pub fn realisation_json(self) -> bool {
        self.at_least(31)
    }
    /// Build results carry the builder's user and system CPU time (Nix 1.37).
    pub fn cpu_times(self) -> bool {
        self.nix_at_least(37)
    }

    /// Whether the operation numbered `n` exists on this connection.
    pub fn op(self, n: u64) -> Option<Op> {
        let a = OPS.iter().find(|a| a.number == n)?;
        let has = match self.dialect {
            Dialect::Guix => a.guix,
            Dialect::Nix => {
                let minor = self.version.minor();
                a.nix_since.is_some_and(|s| minor >= s)
                    && a.nix_removed.is_none_or(|r| minor < r)
                    && a.feature.is_none_or(|f| self.has_feature(f))
            }
        };
        has.then_some(a.op)
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = match self.dialect {
            Dialect::Nix => "Nix",
            Dialect::Guix => "Guix",
        };
        write!(f, "{d} {}", self.version)?;
        let names = self.features.names();
        if !names.is_empty() {
            write!(f, " [{}]", names.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        let p = Proto::for_client(Version(0x126)).unwrap();
        assert_eq!((p.dialect(), p.version()), (Dialect::Nix, Version(0x126)));
        // A newer 1.x client settles on kiln's maximum.
        assert_eq!(
            Proto::for_client(Version(0x12b)).unwrap().version(),
            Version(0x126)
        );
        assert_eq!(
            Proto::for_client(Version(0x122)).unwrap().version(),
            Version(0x122)
        );
        assert_eq!(
            Proto::for_client(Version(0x112)).unwrap().version(),
            Version(0x112)
        );
        let e = Proto::for_client(Version(0x111)).unwrap_err();
        assert!(e.contains("too old") && e.contains("1.17"), "{e}");
        let e = Proto::for_client(Version(0x222)).unwrap_err();
        assert!(e.contains("major"), "{e}");
        let g = Proto::for_client(Version(0x163)).unwrap();
        assert_eq!((g.dialect(), g.version()), (Dialect::Guix, Version(0x163)));
        // The client side.
        let c = Proto::for_daemon(Version(0x126), Version(0x164)).unwrap();
        assert_eq!(c.version(), Version(0x126));
        let c = Proto::for_daemon(Version(0x126), Version(0x122)).unwrap();
        assert_eq!(c.version(), Version(0x122));
        assert!(!c.trust_flag() && c.daemon_version_string());
        assert!(Proto::for_daemon(Version(0x126), Version(0x109)).is_err());
    }

    #[test]
    fn capabilities_per_minor() {
        let at = |m: u64| Proto::nix(0x100 | m);
        assert!(!at(34).trust_flag() && at(35).trust_flag());
        assert!(!at(36).cpu_times() && at(37).cpu_times());
        assert!(!at(37).feature_exchange() && at(38).feature_exchange());
        assert!(at(22).nar_data_tunnelled() && !at(23).nar_data_tunnelled());
        let g = Proto::guix(0x164);
        assert!(!g.trust_flag() && !g.activities() && !g.structured_errors());
        assert!(g.build_mode() && !g.options_jobs_and_cores());
        assert!(Proto::guix(0x160).options_jobs_and_cores());
    }

    #[test]
    fn op_table() {
        let nix = |m: u64| Proto::nix(0x100 | m);
        assert_eq!(nix(34).op(3), Some(Op::HasSubstitutes));
        assert_eq!(nix(38).op(3), None);
        assert_eq!(nix(37).op(27), Some(Op::ImportPaths));
        assert_eq!(nix(38).op(27), None);
        assert_eq!(nix(35).op(47), None);
        assert_eq!(nix(36).op(47), Some(Op::AddPermRoot));
        assert_eq!(nix(34).op(24), None);
        assert_eq!(nix(38).op(80), None);
        // QueryActiveBuilds exists only where both sides named its feature.
        assert_eq!(nix(38).op(48), None);
        let ps = nix(38).with_features(Features::of(&[Feature::QueryActiveBuilds]));
        assert_eq!(ps.op(48), Some(Op::QueryActiveBuilds));
        let g = Proto::guix(0x164);
        assert_eq!(g.op(24), Some(Op::QueryFailedPaths));
        assert_eq!(g.op(80), Some(Op::BuiltinBuilders));
        assert_eq!(g.op(36), None);
        assert_eq!(g.op(47), None);
        assert_eq!(g.op(2), None);
        // Every operation is in the table once, under its own number.
        for (i, a) in OPS.iter().enumerate() {
            assert_eq!(a.op as u64, a.number);
            assert!(OPS[i + 1..].iter().all(|b| b.number != a.number));
        }
    }

    #[test]
    fn features() {
        let f = Features::from_names(["realisation-with-path-not-hash", "frobnicate"]);
        assert!(f.contains(Feature::RealisationWithPathNotHash));
        assert!(!f.contains(Feature::DeleteDeadSpecificReferrers));
        assert_eq!(f.names(), vec!["realisation-with-path-not-hash"]);
        let all = Features::of(&Feature::ALL);
        assert_eq!(
            all.names(),
            // Sorted bytewise, as Nix sends its std::set<std::string>.
            vec![
                "delete-dead-specific-referrers",
                "kiln-events",
                "kiln-queued-builds",
                "queryActiveBuilds",
                "realisation-with-path-not-hash"
            ]
        );
        assert_eq!(all.intersect(f), f);
    }
}
