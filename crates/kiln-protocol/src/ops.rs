//! Operations: their numbers, their requests as each client version sends them, and their
//! replies as each client version expects them. Both directions are here (the daemon
//! reads requests and writes replies; kiln's client does the opposite), so every layout is
//! written once and round-trip tests cover each version.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, Write};
use std::sync::Arc;

use kiln_format::derivation::{DerivationOutput, FixedOutputHash};
use kiln_format::store_path::ContentAddressMethod;
use kiln_format::{
    ContentAddress, Derivation, FileIngestionMethod, Hash, HashAlgo, StoreDir, StorePath,
    ValidPathInfo,
};

use crate::version::{Feature, Proto};
use crate::wire::{WireReader, WireWrite, MAX_NAME, MAX_TEXT};
use crate::Error;

/// The longest `QueryActiveBuilds` answer a client reads (a few KiB per build).
const MAX_ACTIVE_BUILDS_JSON: usize = 16 * 1024 * 1024;

/// Operation numbers (`WorkerOp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u64)]
pub enum Op {
    IsValidPath = 1,
    HasSubstitutes = 3,
    QueryPathHash = 4,
    QueryReferences = 5,
    QueryReferrers = 6,
    AddToStore = 7,
    AddTextToStore = 8,
    BuildPaths = 9,
    EnsurePath = 10,
    AddTempRoot = 11,
    AddIndirectRoot = 12,
    SyncWithGc = 13,
    FindRoots = 14,
    ExportPath = 16,
    QueryDeriver = 18,
    SetOptions = 19,
    CollectGarbage = 20,
    QuerySubstitutablePathInfo = 21,
    QueryDerivationOutputs = 22,
    QueryAllValidPaths = 23,
    QueryFailedPaths = 24,
    ClearFailedPaths = 25,
    QueryPathInfo = 26,
    ImportPaths = 27,
    QueryDerivationOutputNames = 28,
    QueryPathFromHashPart = 29,
    QuerySubstitutablePathInfos = 30,
    QueryValidPaths = 31,
    QuerySubstitutablePaths = 32,
    QueryValidDerivers = 33,
    OptimiseStore = 34,
    VerifyStore = 35,
    BuildDerivation = 36,
    AddSignatures = 37,
    NarFromPath = 38,
    AddToStoreNar = 39,
    QueryMissing = 40,
    QueryDerivationOutputMap = 41,
    RegisterDrvOutput = 42,
    QueryRealisation = 43,
    AddMultipleToStore = 44,
    AddBuildLog = 45,
    BuildPathsWithResults = 46,
    AddPermRoot = 47,
    QueryActiveBuilds = 48,
    BuiltinBuilders = 80,
    SubstituteUrls = 81,
}

impl Op {
    /// The operation numbered `n`, if the connection has it (see [`crate::version::OPS`]).
    pub fn from_wire(n: u64, p: Proto) -> Option<Op> {
        p.op(n)
    }

    pub fn name(self) -> &'static str {
        crate::version::OPS
            .iter()
            .find(|a| a.op == self)
            .map_or("unknown operation", |a| a.name)
    }
}

/// `BuildMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildMode {
    Normal,
    Repair,
    Check,
}

impl BuildMode {
    fn read<R: BufRead>(r: &mut WireReader<R>) -> Result<Self, Error> {
        match r.u64("build mode")? {
            0 => Ok(BuildMode::Normal),
            1 => Ok(BuildMode::Repair),
            2 => Ok(BuildMode::Check),
            n => Err(r.invalid(format!("unknown build mode {n}"))),
        }
    }
    fn to_wire(self) -> u64 {
        match self {
            BuildMode::Normal => 0,
            BuildMode::Repair => 1,
            BuildMode::Check => 2,
        }
    }
}

/// Which outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum OutputSpec {
    All,
    Names(BTreeSet<String>),
}

/// What a build request names: a store path to make valid, or outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum DerivedPath {
    Opaque(StorePath),
    Built {
        drv: StorePath,
        outputs: OutputSpec,
    },
    /// Outputs of a derivation that another derivation makes (experimental
    /// `dynamic-derivations`, `drv!out!out`): output `chain[0]` of `producer` is a `.drv`,
    /// output `chain[1]` of that one the next, and so on; `outputs` are the last one's.
    Dynamic {
        producer: StorePath,
        chain: Vec<String>,
        outputs: OutputSpec,
    },
}

impl DerivedPath {
    /// Parses `path`, `drv!*`, `drv!out1,out2` (Nix ≥ 1.30) or `drv!out!…!outs` (a
    /// derivation made by a derivation).
    pub fn parse(sd: &StoreDir, s: &str) -> Result<Self, kiln_format::Error> {
        let mut parts = s.split('!');
        let path = sd.parse_path(parts.next().unwrap_or_default())?;
        let rest: Vec<&str> = parts.collect();
        let Some((outs, chain)) = rest.split_last() else {
            return Ok(DerivedPath::Opaque(path));
        };
        let outputs = if *outs == "*" {
            OutputSpec::All
        } else {
            OutputSpec::Names(
                outs.split(',')
                    .filter(|o| !o.is_empty())
                    .map(str::to_string)
                    .collect(),
            )
        };
        if chain.is_empty() {
            return Ok(DerivedPath::Built { drv: path, outputs });
        }
        for c in chain {
            kiln_format::store_path::check_name(c, c).map_err(|_| {
                kiln_format::Error::StorePath(format!(
                    "invalid derived path '{s}': '{c}' is not an output name"
                ))
            })?;
        }
        Ok(DerivedPath::Dynamic {
            producer: path,
            chain: chain.iter().map(|c| c.to_string()).collect(),
            outputs,
        })
    }

    /// The derivation or path named first: what must exist before anything is built.
    pub fn root(&self) -> &StorePath {
        match self {
            DerivedPath::Opaque(p) => p,
            DerivedPath::Built { drv, .. } => drv,
            DerivedPath::Dynamic { producer, .. } => producer,
        }
    }

    /// Parses the older `path[!out1,out2]` form (Nix < 1.30, Guix): a `.drv` without
    /// outputs means all of them.
    pub fn parse_legacy(sd: &StoreDir, s: &str) -> Result<Self, kiln_format::Error> {
        let (p, outs) = match s.split_once('!') {
            None => (s, BTreeSet::new()),
            Some((p, o)) => (
                p,
                o.split(',')
                    .filter(|o| !o.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
        };
        let path = sd.parse_path(p)?;
        if outs.is_empty() && !path.is_derivation() {
            return Ok(DerivedPath::Opaque(path));
        }
        Ok(DerivedPath::Built {
            drv: path,
            outputs: if outs.is_empty() {
                OutputSpec::All
            } else {
                OutputSpec::Names(outs)
            },
        })
    }

    pub fn to_wire(&self, sd: &StoreDir) -> String {
        let outs = |outputs: &OutputSpec| match outputs {
            OutputSpec::All => "*".to_string(),
            OutputSpec::Names(n) => n.iter().cloned().collect::<Vec<_>>().join(","),
        };
        match self {
            DerivedPath::Opaque(p) => sd.display(p),
            DerivedPath::Built { drv, outputs } => {
                format!("{}!{}", sd.display(drv), outs(outputs))
            }
            DerivedPath::Dynamic {
                producer,
                chain,
                outputs,
            } => format!(
                "{}!{}!{}",
                sd.display(producer),
                chain.join("!"),
                outs(outputs)
            ),
        }
    }

    fn to_legacy(&self, sd: &StoreDir) -> String {
        match self {
            DerivedPath::Opaque(p) => sd.display(p),
            DerivedPath::Built {
                drv,
                outputs: OutputSpec::All,
            } => sd.display(drv),
            DerivedPath::Built {
                drv,
                outputs: OutputSpec::Names(n),
            } => format!(
                "{}!{}",
                sd.display(drv),
                n.iter().cloned().collect::<Vec<_>>().join(",")
            ),
            // No older form exists; such a client never sends one.
            DerivedPath::Dynamic { .. } => self.to_wire(sd),
        }
    }
}

/// `SetOptions`: the client's settings for its requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientOptions {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    pub verbosity: u64,
    /// Not sent by Guix clients talking to a daemon ≥ 0x61 (they use overrides).
    pub max_build_jobs: Option<u64>,
    pub max_silent_time: Option<u64>,
    pub use_build_hook: bool,
    pub build_verbosity: u64,
    pub print_build_trace: bool,
    pub build_cores: Option<u64>,
    pub use_substitutes: bool,
    /// Overridden settings, in the order sent.
    pub overrides: Vec<(String, String)>,
}

/// The two layouts of `AddToStore`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddToStore {
    /// Nix ≥ 1.25: a content-address method; the data follows framed (file contents for
    /// `text:` and flat, a NAR for recursive).
    Ca {
        name: String,
        method: ContentAddressMethod,
        algo: HashAlgo,
        refs: BTreeSet<StorePath>,
        repair: bool,
    },
    /// Older Nix and Guix: a NAR follows inline (for flat, a NAR of one regular file).
    Legacy {
        name: String,
        method: FileIngestionMethod,
        algo: HashAlgo,
    },
}

/// `CollectGarbage` actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcAction {
    ReturnLive,
    ReturnDead,
    DeleteDead,
    DeleteSpecific,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcRequest {
    pub action: GcAction,
    /// The paths to collect among (empty with `whole_store`).
    pub paths: BTreeSet<StorePath>,
    /// Collect in the whole store rather than among `paths`. With the feature
    /// `delete-dead-specific-referrers` a tag says which; without it, as Nix 2.35 reads
    /// old clients: no paths named, and the action is not `DeleteSpecific`.
    pub whole_store: bool,
    /// Dead referrers of `paths` go with them (`nix store delete --also-referrers`; only
    /// with the feature).
    pub delete_referrers: bool,
    pub ignore_liveness: bool,
    pub max_freed: u64,
}

/// A request, fully read (any data stream that follows it is read by the handler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    IsValidPath(StorePath),
    HasSubstitutes(StorePath),
    QueryPathHash(StorePath),
    QueryReferences(StorePath),
    QueryReferrers(StorePath),
    AddToStore(AddToStore),
    AddTextToStore {
        name: String,
        text: Vec<u8>,
        refs: BTreeSet<StorePath>,
    },
    BuildPaths {
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    },
    EnsurePath(StorePath),
    AddTempRoot(StorePath),
    AddIndirectRoot(String),
    SyncWithGc,
    FindRoots,
    ExportPath {
        path: StorePath,
        sign: bool,
    },
    QueryDeriver(StorePath),
    SetOptions(ClientOptions),
    CollectGarbage(GcRequest),
    QuerySubstitutablePathInfo(StorePath),
    QueryDerivationOutputs(StorePath),
    QueryAllValidPaths,
    QueryFailedPaths,
    ClearFailedPaths(BTreeSet<StorePath>),
    QueryPathInfo(StorePath),
    ImportPaths,
    QueryDerivationOutputNames(StorePath),
    QueryPathFromHashPart(String),
    QuerySubstitutablePathInfos(BTreeMap<StorePath, Option<ContentAddress>>),
    QueryValidPaths {
        paths: BTreeSet<StorePath>,
        substitute: bool,
    },
    QuerySubstitutablePaths(BTreeSet<StorePath>),
    QueryValidDerivers(StorePath),
    OptimiseStore,
    VerifyStore {
        check_contents: bool,
        repair: bool,
    },
    BuildDerivation {
        drv_path: StorePath,
        /// Without input derivations (a `BasicDerivation`).
        drv: Derivation,
        mode: BuildMode,
    },
    AddSignatures {
        path: StorePath,
        sigs: Vec<String>,
    },
    NarFromPath(StorePath),
    AddToStoreNar {
        info: ValidPathInfo,
        repair: bool,
        dont_check_sigs: bool,
    },
    QueryMissing(Vec<DerivedPath>),
    QueryDerivationOutputMap(StorePath),
    /// The realisation (JSON from 1.31 on, an output id before, followed by the output
    /// path's base name).
    RegisterDrvOutput {
        realisation: String,
        out_path: Option<String>,
    },
    QueryRealisation(String),
    /// `RegisterDrvOutput` with the feature `realisation-with-path-not-hash` (Nix 2.35):
    /// the output keyed by derivation path and name, its path and signatures (over Nix
    /// 2.35's build-trace fingerprint).
    RegisterBuildTrace {
        drv: StorePath,
        output: String,
        out_path: StorePath,
        signatures: BTreeSet<String>,
    },
    /// `QueryRealisation` with that feature: the output of `drv` named `output`.
    QueryBuildTrace {
        drv: StorePath,
        output: String,
    },
    AddMultipleToStore {
        repair: bool,
        dont_check_sigs: bool,
    },
    AddBuildLog(StorePath),
    BuildPathsWithResults {
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    },
    /// Makes `root` (an absolute path) a GC root pointing to `path` (Nix 1.36, trusted
    /// clients only).
    AddPermRoot {
        path: StorePath,
        root: String,
    },
    /// The builds running (and with kiln's feature, waiting), as a JSON array.
    QueryActiveBuilds,
    BuiltinBuilders,
    SubstituteUrls,
}

/// How the data of an operation travels, if it has any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataStream {
    None,
    /// Framed (`u64 len` + bytes, …, `u64 0`).
    Framed,
    /// Raw bytes that the handler must consume exactly (an inline NAR).
    Inline,
    /// Pulled with `STDERR_READ` requests.
    Tunnel,
}

impl Request {
    /// Where this request's data comes from, for a client of version `v`.
    pub fn data_stream(&self, v: Proto) -> DataStream {
        match self {
            Request::AddToStore(AddToStore::Ca { .. }) => DataStream::Framed,
            Request::AddToStore(AddToStore::Legacy { .. }) => DataStream::Inline,
            Request::AddToStoreNar { .. } if v.nar_data_framed() => DataStream::Framed,
            Request::AddToStoreNar { .. } if v.nar_data_tunnelled() => DataStream::Tunnel,
            Request::AddToStoreNar { .. } => DataStream::Inline,
            Request::AddMultipleToStore { .. } | Request::AddBuildLog(_) => DataStream::Framed,
            Request::ImportPaths => DataStream::Tunnel,
            _ => DataStream::None,
        }
    }

    /// Reads the request of operation `op` as a client of version `v` sends it.
    pub fn read<R: BufRead>(
        op: Op,
        v: Proto,
        sd: &StoreDir,
        r: &mut WireReader<R>,
    ) -> Result<Request, Error> {
        use Request as Q;
        Ok(match op {
            Op::IsValidPath => Q::IsValidPath(r.path(sd, "path")?),
            Op::HasSubstitutes => Q::HasSubstitutes(r.path(sd, "path")?),
            Op::QueryPathHash => Q::QueryPathHash(r.path(sd, "path")?),
            Op::QueryReferences => Q::QueryReferences(r.path(sd, "path")?),
            Op::QueryReferrers => Q::QueryReferrers(r.path(sd, "path")?),
            Op::AddToStore => {
                if v.add_to_store_ca() {
                    let name = r.string(MAX_NAME, "name")?;
                    let cam = r.string(MAX_NAME, "content-address method")?;
                    let (method, algo) = ContentAddressMethod::parse_with_algo(&cam)
                        .map_err(|e| r.invalid(e.to_string()))?;
                    let refs = r.paths(sd, "references")?;
                    let repair = r.bool("repair")?;
                    Q::AddToStore(AddToStore::Ca {
                        name,
                        method,
                        algo,
                        refs,
                        repair,
                    })
                } else {
                    let name = r.string(MAX_NAME, "name")?;
                    let fixed = r.bool("fixed")?;
                    let recursive = r.u64("recursive")?;
                    let algo_s = r.string(MAX_NAME, "hash algorithm")?;
                    let method = match recursive {
                        0 => FileIngestionMethod::Flat,
                        1 => FileIngestionMethod::Recursive,
                        n => {
                            return Err(r.invalid(format!("unsupported file ingestion method {n}")))
                        }
                    };
                    // Nix's compatibility rule: not fixed means recursive SHA-256.
                    let (method, algo_s) = if fixed {
                        (method, algo_s)
                    } else {
                        (FileIngestionMethod::Recursive, "sha256".to_string())
                    };
                    let algo: HashAlgo = algo_s
                        .parse()
                        .map_err(|_| r.invalid(format!("unknown hash algorithm '{algo_s}'")))?;
                    Q::AddToStore(AddToStore::Legacy { name, method, algo })
                }
            }
            Op::AddTextToStore => Q::AddTextToStore {
                name: r.string(MAX_NAME, "name")?,
                text: r.blob(MAX_TEXT, "text")?,
                refs: r.paths(sd, "references")?,
            },
            Op::BuildPaths => {
                let paths = read_derived_paths(v, sd, r)?;
                let mode = if v.build_mode() {
                    BuildMode::read(r)?
                } else {
                    BuildMode::Normal
                };
                Q::BuildPaths { paths, mode }
            }
            Op::EnsurePath => Q::EnsurePath(r.path(sd, "path")?),
            Op::AddTempRoot => Q::AddTempRoot(r.path(sd, "path")?),
            Op::AddIndirectRoot => Q::AddIndirectRoot(r.string(MAX_NAME, "root")?),
            Op::SyncWithGc => Q::SyncWithGc,
            Op::FindRoots => Q::FindRoots,
            Op::ExportPath => Q::ExportPath {
                path: r.path(sd, "path")?,
                sign: r.bool("sign")?,
            },
            Op::QueryDeriver => Q::QueryDeriver(r.path(sd, "path")?),
            Op::SetOptions => Q::SetOptions(read_options(v, r)?),
            Op::CollectGarbage => {
                let action = match r.u64("garbage collector action")? {
                    0 => GcAction::ReturnLive,
                    1 => GcAction::ReturnDead,
                    2 => GcAction::DeleteDead,
                    3 => GcAction::DeleteSpecific,
                    n => return Err(r.invalid(format!("unknown garbage collector action {n}"))),
                };
                let (paths, whole_store, delete_referrers) =
                    if v.has_feature(Feature::DeleteDeadSpecificReferrers) {
                        match r.u64("whole-store tag")? {
                            1 => (BTreeSet::new(), true, false),
                            0 => {
                                let paths = r.paths(sd, "paths to delete")?;
                                (paths, false, r.bool("delete referrers")?)
                            }
                            n => return Err(r.invalid(format!("invalid whole-store tag {n}"))),
                        }
                    } else {
                        let paths = r.paths(sd, "paths to delete")?;
                        let whole = paths.is_empty() && action != GcAction::DeleteSpecific;
                        (paths, whole, false)
                    };
                let ignore_liveness = r.bool("ignore liveness")?;
                let max_freed = r.u64("max freed")?;
                for _ in 0..3 {
                    r.u64("obsolete field")?;
                }
                Q::CollectGarbage(GcRequest {
                    action,
                    paths,
                    whole_store,
                    delete_referrers,
                    ignore_liveness,
                    max_freed,
                })
            }
            Op::QuerySubstitutablePathInfo => Q::QuerySubstitutablePathInfo(r.path(sd, "path")?),
            Op::QueryDerivationOutputs => Q::QueryDerivationOutputs(r.path(sd, "path")?),
            Op::QueryAllValidPaths => Q::QueryAllValidPaths,
            Op::QueryFailedPaths => Q::QueryFailedPaths,
            Op::ClearFailedPaths => Q::ClearFailedPaths(r.paths(sd, "paths")?),
            Op::QueryPathInfo => Q::QueryPathInfo(r.path(sd, "path")?),
            Op::ImportPaths => Q::ImportPaths,
            Op::QueryDerivationOutputNames => Q::QueryDerivationOutputNames(r.path(sd, "path")?),
            Op::QueryPathFromHashPart => Q::QueryPathFromHashPart(r.string(MAX_NAME, "hash part")?),
            Op::QuerySubstitutablePathInfos => {
                let mut m = BTreeMap::new();
                if v.substitutable_infos_with_ca() {
                    for (p, ca) in r.list("paths", |r| {
                        let p = r.path(sd, "path")?;
                        let ca = r.string(MAX_NAME, "content address")?;
                        let ca = if ca.is_empty() {
                            None
                        } else {
                            Some(ContentAddress::parse(&ca).map_err(|e| r.invalid(e.to_string()))?)
                        };
                        Ok((p, ca))
                    })? {
                        m.insert(p, ca);
                    }
                } else {
                    for p in r.paths(sd, "paths")? {
                        m.insert(p, None);
                    }
                }
                Q::QuerySubstitutablePathInfos(m)
            }
            Op::QueryValidPaths => {
                let paths = r.paths(sd, "paths")?;
                let substitute = if v.valid_paths_substitute_flag() {
                    r.bool("substitute")?
                } else {
                    false
                };
                Q::QueryValidPaths { paths, substitute }
            }
            Op::QuerySubstitutablePaths => Q::QuerySubstitutablePaths(r.paths(sd, "paths")?),
            Op::QueryValidDerivers => Q::QueryValidDerivers(r.path(sd, "path")?),
            Op::OptimiseStore => Q::OptimiseStore,
            Op::VerifyStore => Q::VerifyStore {
                check_contents: r.bool("check contents")?,
                repair: r.bool("repair")?,
            },
            Op::BuildDerivation => {
                let (drv_path, drv) = read_derivation_to_build(sd, r)?;
                let mode = BuildMode::read(r)?;
                Q::BuildDerivation {
                    drv_path,
                    drv,
                    mode,
                }
            }
            Op::AddSignatures => Q::AddSignatures {
                path: r.path(sd, "path")?,
                sigs: r.strings("signatures")?,
            },
            Op::NarFromPath => Q::NarFromPath(r.path(sd, "path")?),
            Op::AddToStoreNar => {
                let path = r.path(sd, "path")?;
                let info = read_path_info_rest(path, v, sd, r)?;
                Q::AddToStoreNar {
                    info,
                    repair: r.bool("repair")?,
                    dont_check_sigs: r.bool("don't check signatures")?,
                }
            }
            Op::QueryMissing => Q::QueryMissing(read_derived_paths(v, sd, r)?),
            Op::QueryDerivationOutputMap => Q::QueryDerivationOutputMap(r.path(sd, "path")?),
            Op::RegisterDrvOutput if v.has_feature(Feature::RealisationWithPathNotHash) => {
                Q::RegisterBuildTrace {
                    drv: r.path(sd, "derivation")?,
                    output: r.string(MAX_NAME, "output name")?,
                    out_path: r.path(sd, "output path")?,
                    signatures: r.strings("signatures")?.into_iter().collect(),
                }
            }
            Op::RegisterDrvOutput => {
                let realisation = r.string(MAX_TEXT, "realisation")?;
                let out_path = if v.realisation_json() {
                    None
                } else {
                    Some(r.string(MAX_NAME, "output path")?)
                };
                Q::RegisterDrvOutput {
                    realisation,
                    out_path,
                }
            }
            Op::QueryRealisation if v.has_feature(Feature::RealisationWithPathNotHash) => {
                Q::QueryBuildTrace {
                    drv: r.path(sd, "derivation")?,
                    output: r.string(MAX_NAME, "output name")?,
                }
            }
            Op::QueryRealisation => Q::QueryRealisation(r.string(MAX_NAME, "output id")?),
            Op::AddMultipleToStore => Q::AddMultipleToStore {
                repair: r.bool("repair")?,
                dont_check_sigs: r.bool("don't check signatures")?,
            },
            Op::AddBuildLog => {
                // Nix sends the derivation's base name here.
                let s = r.string(MAX_NAME, "derivation")?;
                let base = s.rsplit('/').next().unwrap_or(&s);
                Q::AddBuildLog(
                    StorePath::from_base_name(base).map_err(|e| r.invalid(e.to_string()))?,
                )
            }
            Op::BuildPathsWithResults => Q::BuildPathsWithResults {
                paths: read_derived_paths(v, sd, r)?,
                mode: BuildMode::read(r)?,
            },
            Op::AddPermRoot => Q::AddPermRoot {
                path: r.path(sd, "path")?,
                root: r.string(MAX_NAME, "GC root")?,
            },
            Op::BuiltinBuilders => Q::BuiltinBuilders,
            Op::QueryActiveBuilds => Q::QueryActiveBuilds,
            Op::SubstituteUrls => Q::SubstituteUrls,
        })
    }

    /// The operation number.
    pub fn op(&self) -> Op {
        use Request as Q;
        match self {
            Q::IsValidPath(_) => Op::IsValidPath,
            Q::HasSubstitutes(_) => Op::HasSubstitutes,
            Q::QueryPathHash(_) => Op::QueryPathHash,
            Q::QueryReferences(_) => Op::QueryReferences,
            Q::QueryReferrers(_) => Op::QueryReferrers,
            Q::AddToStore(_) => Op::AddToStore,
            Q::AddTextToStore { .. } => Op::AddTextToStore,
            Q::BuildPaths { .. } => Op::BuildPaths,
            Q::EnsurePath(_) => Op::EnsurePath,
            Q::AddTempRoot(_) => Op::AddTempRoot,
            Q::AddIndirectRoot(_) => Op::AddIndirectRoot,
            Q::SyncWithGc => Op::SyncWithGc,
            Q::FindRoots => Op::FindRoots,
            Q::ExportPath { .. } => Op::ExportPath,
            Q::QueryDeriver(_) => Op::QueryDeriver,
            Q::SetOptions(_) => Op::SetOptions,
            Q::CollectGarbage(_) => Op::CollectGarbage,
            Q::QuerySubstitutablePathInfo(_) => Op::QuerySubstitutablePathInfo,
            Q::QueryDerivationOutputs(_) => Op::QueryDerivationOutputs,
            Q::QueryAllValidPaths => Op::QueryAllValidPaths,
            Q::QueryFailedPaths => Op::QueryFailedPaths,
            Q::ClearFailedPaths(_) => Op::ClearFailedPaths,
            Q::QueryPathInfo(_) => Op::QueryPathInfo,
            Q::ImportPaths => Op::ImportPaths,
            Q::QueryDerivationOutputNames(_) => Op::QueryDerivationOutputNames,
            Q::QueryPathFromHashPart(_) => Op::QueryPathFromHashPart,
            Q::QuerySubstitutablePathInfos(_) => Op::QuerySubstitutablePathInfos,
            Q::QueryValidPaths { .. } => Op::QueryValidPaths,
            Q::QuerySubstitutablePaths(_) => Op::QuerySubstitutablePaths,
            Q::QueryValidDerivers(_) => Op::QueryValidDerivers,
            Q::OptimiseStore => Op::OptimiseStore,
            Q::VerifyStore { .. } => Op::VerifyStore,
            Q::BuildDerivation { .. } => Op::BuildDerivation,
            Q::AddSignatures { .. } => Op::AddSignatures,
            Q::NarFromPath(_) => Op::NarFromPath,
            Q::AddToStoreNar { .. } => Op::AddToStoreNar,
            Q::QueryMissing(_) => Op::QueryMissing,
            Q::QueryDerivationOutputMap(_) => Op::QueryDerivationOutputMap,
            Q::RegisterDrvOutput { .. } => Op::RegisterDrvOutput,
            Q::QueryRealisation(_) | Q::QueryBuildTrace { .. } => Op::QueryRealisation,
            Q::RegisterBuildTrace { .. } => Op::RegisterDrvOutput,
            Q::AddMultipleToStore { .. } => Op::AddMultipleToStore,
            Q::AddBuildLog(_) => Op::AddBuildLog,
            Q::BuildPathsWithResults { .. } => Op::BuildPathsWithResults,
            Q::AddPermRoot { .. } => Op::AddPermRoot,
            Q::BuiltinBuilders => Op::BuiltinBuilders,
            Q::QueryActiveBuilds => Op::QueryActiveBuilds,
            Q::SubstituteUrls => Op::SubstituteUrls,
        }
    }

    /// Writes the request (with its operation number) as a client of version `v` does.
    /// Data streams are written separately by the caller.
    pub fn write(&self, v: Proto, sd: &StoreDir, w: &mut impl Write) -> io::Result<()> {
        use Request as Q;
        w.u64(self.op() as u64)?;
        match self {
            Q::IsValidPath(p)
            | Q::HasSubstitutes(p)
            | Q::QueryPathHash(p)
            | Q::QueryReferences(p)
            | Q::QueryReferrers(p)
            | Q::EnsurePath(p)
            | Q::AddTempRoot(p)
            | Q::QueryDeriver(p)
            | Q::QuerySubstitutablePathInfo(p)
            | Q::QueryDerivationOutputs(p)
            | Q::QueryPathInfo(p)
            | Q::QueryDerivationOutputNames(p)
            | Q::QueryValidDerivers(p)
            | Q::NarFromPath(p)
            | Q::QueryDerivationOutputMap(p) => w.path(sd, p)?,
            Q::AddToStore(AddToStore::Ca {
                name,
                method,
                algo,
                refs,
                repair,
            }) => {
                w.str(name)?;
                w.str(&match method {
                    ContentAddressMethod::Text => format!("text:{algo}"),
                    ContentAddressMethod::Fixed(m) => format!("fixed:{}{algo}", m.prefix()),
                })?;
                w.paths(sd, refs)?;
                w.bool(*repair)?;
            }
            Q::AddToStore(AddToStore::Legacy { name, method, algo }) => {
                w.str(name)?;
                w.u64(1)?;
                w.u64(matches!(method, FileIngestionMethod::Recursive) as u64)?;
                w.str(&algo.to_string())?;
            }
            Q::AddTextToStore { name, text, refs } => {
                w.str(name)?;
                w.bytes(text)?;
                w.paths(sd, refs)?;
            }
            Q::BuildPaths { paths, mode } => {
                write_derived_paths(v, sd, paths, w)?;
                if v.build_mode() {
                    w.u64(mode.to_wire())?;
                }
            }
            Q::AddIndirectRoot(s) => w.str(s)?,
            Q::SyncWithGc
            | Q::FindRoots
            | Q::QueryAllValidPaths
            | Q::QueryFailedPaths
            | Q::ImportPaths
            | Q::OptimiseStore
            | Q::BuiltinBuilders
            | Q::QueryActiveBuilds
            | Q::SubstituteUrls => {}
            Q::ExportPath { path, sign } => {
                w.path(sd, path)?;
                w.bool(*sign)?;
            }
            Q::SetOptions(o) => write_options(v, o, w)?,
            Q::CollectGarbage(g) => {
                w.u64(match g.action {
                    GcAction::ReturnLive => 0,
                    GcAction::ReturnDead => 1,
                    GcAction::DeleteDead => 2,
                    GcAction::DeleteSpecific => 3,
                })?;
                if v.has_feature(Feature::DeleteDeadSpecificReferrers) {
                    if g.whole_store {
                        w.u64(1)?;
                    } else {
                        w.u64(0)?;
                        w.paths(sd, &g.paths)?;
                        w.bool(g.delete_referrers)?;
                    }
                } else {
                    w.paths(sd, &g.paths)?;
                }
                w.bool(g.ignore_liveness)?;
                w.u64(g.max_freed)?;
                for _ in 0..3 {
                    w.u64(0)?;
                }
            }
            Q::ClearFailedPaths(ps) | Q::QuerySubstitutablePaths(ps) => w.paths(sd, ps)?,
            Q::QueryPathFromHashPart(h) => w.str(h)?,
            Q::QuerySubstitutablePathInfos(m) => {
                if v.substitutable_infos_with_ca() {
                    w.u64(m.len() as u64)?;
                    for (p, ca) in m {
                        w.path(sd, p)?;
                        w.str(&ca.map(|c| c.to_string()).unwrap_or_default())?;
                    }
                } else {
                    w.paths(sd, m.keys())?;
                }
            }
            Q::QueryValidPaths { paths, substitute } => {
                w.paths(sd, paths)?;
                if v.valid_paths_substitute_flag() {
                    w.bool(*substitute)?;
                }
            }
            Q::VerifyStore {
                check_contents,
                repair,
            } => {
                w.bool(*check_contents)?;
                w.bool(*repair)?;
            }
            Q::BuildDerivation {
                drv_path,
                drv,
                mode,
            } => {
                w.path(sd, drv_path)?;
                write_basic_derivation(sd, drv, w)?;
                w.u64(mode.to_wire())?;
            }
            Q::AddSignatures { path, sigs } => {
                w.path(sd, path)?;
                w.strs(sigs.iter().map(String::as_str))?;
            }
            Q::AddToStoreNar {
                info,
                repair,
                dont_check_sigs,
            } => {
                write_path_info(v, sd, info, true, w)?;
                w.bool(*repair)?;
                w.bool(*dont_check_sigs)?;
            }
            Q::QueryMissing(paths) => write_derived_paths(v, sd, paths, w)?,
            Q::RegisterDrvOutput {
                realisation,
                out_path,
            } => {
                w.str(realisation)?;
                if !v.realisation_json() {
                    w.str(out_path.as_deref().unwrap_or(""))?;
                }
            }
            Q::QueryRealisation(s) => w.str(s)?,
            Q::RegisterBuildTrace {
                drv,
                output,
                out_path,
                signatures,
            } => {
                w.path(sd, drv)?;
                w.str(output)?;
                w.path(sd, out_path)?;
                w.strs(signatures.iter().map(String::as_str))?;
            }
            Q::QueryBuildTrace { drv, output } => {
                w.path(sd, drv)?;
                w.str(output)?;
            }
            Q::AddMultipleToStore {
                repair,
                dont_check_sigs,
            } => {
                w.bool(*repair)?;
                w.bool(*dont_check_sigs)?;
            }
            Q::AddBuildLog(p) => w.str(p.base_name())?,
            Q::BuildPathsWithResults { paths, mode } => {
                write_derived_paths(v, sd, paths, w)?;
                w.u64(mode.to_wire())?;
            }
            Q::AddPermRoot { path, root } => {
                w.path(sd, path)?;
                w.str(root)?;
            }
        }
        Ok(())
    }
}

fn read_derived_paths<R: BufRead>(
    v: Proto,
    sd: &StoreDir,
    r: &mut WireReader<R>,
) -> Result<Vec<DerivedPath>, Error> {
    let modern = v.modern_derived_paths();
    r.list("derived paths", |r| {
        let s = r.string(MAX_NAME, "derived path")?;
        let p = if modern {
            DerivedPath::parse(sd, &s)
        } else {
            DerivedPath::parse_legacy(sd, &s)
        };
        p.map_err(|e| r.invalid(e.to_string()))
    })
}

fn write_derived_paths(
    v: Proto,
    sd: &StoreDir,
    paths: &[DerivedPath],
    w: &mut impl Write,
) -> io::Result<()> {
    let modern = v.modern_derived_paths();
    w.u64(paths.len() as u64)?;
    for p in paths {
        w.str(&if modern {
            p.to_wire(sd)
        } else {
            p.to_legacy(sd)
        })?;
    }
    Ok(())
}

fn read_options<R: BufRead>(v: Proto, r: &mut WireReader<R>) -> Result<ClientOptions, Error> {
    let mut o = ClientOptions {
        keep_failed: r.bool("keep-failed")?,
        keep_going: r.bool("keep-going")?,
        try_fallback: r.bool("fallback")?,
        verbosity: r.u64("verbosity")?,
        ..Default::default()
    };
    // Guix clients stop sending these once the daemon is ≥ 0x61; kiln advertises 0x164.
    if v.options_jobs_and_cores() {
        o.max_build_jobs = Some(r.u64("max-jobs")?);
        o.max_silent_time = Some(r.u64("max-silent-time")?);
    }
    o.use_build_hook = r.bool("use build hook")?;
    o.build_verbosity = r.u64("build verbosity")?;
    r.u64("log type")?;
    o.print_build_trace = r.bool("print build trace")?;
    if v.options_jobs_and_cores() {
        o.build_cores = Some(r.u64("cores")?);
    }
    o.use_substitutes = r.bool("use substitutes")?;
    if v.option_overrides() {
        o.overrides = r.list("settings", |r| {
            Ok((
                r.string(MAX_NAME, "setting name")?,
                r.string(MAX_TEXT, "setting value")?,
            ))
        })?;
    }
    Ok(o)
}

fn write_options(v: Proto, o: &ClientOptions, w: &mut impl Write) -> io::Result<()> {
    w.bool(o.keep_failed)?;
    w.bool(o.keep_going)?;
    w.bool(o.try_fallback)?;
    w.u64(o.verbosity)?;
    if v.options_jobs_and_cores() {
        w.u64(o.max_build_jobs.unwrap_or(1))?;
        w.u64(o.max_silent_time.unwrap_or(0))?;
    }
    w.bool(o.use_build_hook)?;
    w.u64(o.build_verbosity)?;
    w.u64(0)?;
    w.bool(o.print_build_trace)?;
    if v.options_jobs_and_cores() {
        w.u64(o.build_cores.unwrap_or(0))?;
    }
    w.bool(o.use_substitutes)?;
    if v.option_overrides() {
        w.u64(o.overrides.len() as u64)?;
        for (k, val) in &o.overrides {
            w.str(k)?;
            w.str(val)?;
        }
    }
    Ok(())
}

/// The fields of a `ValidPathInfo` after its path, as `AddToStoreNar` and replies carry
/// them (ultimate, signatures and content address from 1.16 on).
fn read_path_info_rest<R: BufRead>(
    path: StorePath,
    v: Proto,
    sd: &StoreDir,
    r: &mut WireReader<R>,
) -> Result<ValidPathInfo, Error> {
    let deriver = r.opt_path(sd, "deriver")?;
    let hash_s = r.string(MAX_NAME, "NAR hash")?;
    let nar_hash =
        Hash::parse_any(&hash_s, Some(HashAlgo::Sha256)).map_err(|e| r.invalid(e.to_string()))?;
    let references = r.paths(sd, "references")?;
    let registration_time = r.u64("registration time")? as i64;
    let nar_size = r.u64("NAR size")?;
    let mut info = ValidPathInfo::new(path, nar_hash, nar_size);
    info.deriver = deriver;
    info.references = references;
    info.registration_time = registration_time;
    if v.path_info_ca() {
        info.ultimate = r.bool("ultimate")?;
        info.sigs = r.strings("signatures")?.into_iter().collect();
        let ca = r.string(MAX_NAME, "content address")?;
        if !ca.is_empty() {
            info.ca = Some(ContentAddress::parse(&ca).map_err(|e| r.invalid(e.to_string()))?);
        }
    }
    Ok(info)
}

/// Writes a `ValidPathInfo` in the layout of client `v` (with or without its path first).
pub fn write_path_info<W: Write + ?Sized>(
    v: Proto,
    sd: &StoreDir,
    info: &ValidPathInfo,
    with_path: bool,
    w: &mut W,
) -> io::Result<()> {
    if with_path {
        w.path(sd, &info.path)?;
    }
    w.opt_path(sd, info.deriver.as_ref())?;
    w.str(&info.nar_hash.to_base16())?;
    w.paths(sd, &info.references)?;
    w.u64(info.registration_time.max(0) as u64)?;
    w.u64(info.nar_size)?;
    if v.path_info_ca() {
        w.bool(info.ultimate)?;
        w.strs(info.sigs.iter().map(String::as_str))?;
        w.str(&info.ca.map(|c| c.to_string()).unwrap_or_default())?;
    }
    Ok(())
}

/// The reply to a `QueryPathInfo` of a valid path: Nix ≥ 1.17 gets a found flag first,
/// Guix and older Nix the info alone.
fn write_found_path_info<W: Write + ?Sized>(
    v: Proto,
    sd: &StoreDir,
    info: &ValidPathInfo,
    w: &mut W,
) -> io::Result<()> {
    if v.path_info_found_flag() {
        w.u64(1)?;
    }
    write_path_info(v, sd, info, false, w)
}

/// [`Reply::PathInfo`] of a valid path, encoded for client `v` once, to be sent as
/// [`Reply::Encoded`] as often as it is asked for.
pub fn found_path_info(v: Proto, sd: &StoreDir, info: &ValidPathInfo) -> Arc<[u8]> {
    let mut out = Vec::with_capacity(256);
    // Writing into a vector cannot fail.
    let _ = write_found_path_info(v, sd, info, &mut out);
    out.into()
}

/// Reads a `ValidPathInfo` written by [`write_path_info`].
pub fn read_path_info<R: BufRead>(
    v: Proto,
    sd: &StoreDir,
    path: Option<StorePath>,
    r: &mut WireReader<R>,
) -> Result<ValidPathInfo, Error> {
    let path = match path {
        Some(p) => p,
        None => r.path(sd, "path")?,
    };
    read_path_info_rest(path, v, sd, r)
}

/// What `BuildDerivation` names (in the worker and the serve protocol alike): the
/// derivation's path, then the derivation itself, named after the path.
pub(crate) fn read_derivation_to_build<R: BufRead>(
    sd: &StoreDir,
    r: &mut WireReader<R>,
) -> Result<(StorePath, Derivation), Error> {
    let drv_path = r.path(sd, "derivation path")?;
    let name = drv_path
        .derivation_name()
        .ok_or_else(|| r.invalid("the derivation path does not end in .drv"))?
        .to_string();
    let drv = read_basic_derivation(sd, name, r)?;
    Ok((drv_path, drv))
}

/// A `BasicDerivation` as `BuildDerivation` carries it: outputs as (name, path, method and
/// algorithm, base16 hash), input sources, platform, builder, arguments, environment. No
/// input derivations.
pub(crate) fn read_basic_derivation<R: BufRead>(
    sd: &StoreDir,
    name: String,
    r: &mut WireReader<R>,
) -> Result<Derivation, Error> {
    let mut drv = Derivation {
        name,
        ..Default::default()
    };
    for (oname, path, algo, hash) in r.list("outputs", |r| {
        Ok((
            r.string(MAX_NAME, "output name")?,
            r.string(MAX_NAME, "output path")?,
            r.string(MAX_NAME, "output hash algorithm")?,
            r.string(MAX_NAME, "output hash")?,
        ))
    })? {
        if path.is_empty() {
            return Err(r.invalid(format!(
                "output '{oname}' has no path (content-addressed derivations are not supported)"
            )));
        }
        let path = sd.parse_path(&path).map_err(|e| r.invalid(e.to_string()))?;
        let fixed = if algo.is_empty() {
            None
        } else {
            let (method, a) = FileIngestionMethod::split_prefix(&algo);
            let a: HashAlgo = a
                .parse()
                .map_err(|_| r.invalid(format!("unknown hash algorithm '{algo}'")))?;
            if method == FileIngestionMethod::Git {
                kiln_format::git::check_algo(a).map_err(|e| r.invalid(e.to_string()))?;
            }
            let hash = Hash::parse_digest(a, &hash).map_err(|e| r.invalid(e.to_string()))?;
            Some(FixedOutputHash { method, hash })
        };
        drv.outputs.insert(
            oname,
            DerivationOutput {
                path: Some(path),
                fixed,
                floating: None,
            },
        );
    }
    drv.input_srcs = r.paths(sd, "input sources")?;
    drv.platform = r.string(MAX_NAME, "platform")?;
    drv.builder = r.string(MAX_TEXT, "builder")?;
    drv.args = r.list("arguments", |r| r.string(MAX_TEXT, "argument"))?;
    for (k, val) in r.list("environment", |r| {
        Ok((
            r.string(MAX_NAME, "variable")?,
            r.string(MAX_TEXT, "value")?,
        ))
    })? {
        drv.env.insert(k, val);
    }
    Ok(drv)
}

pub(crate) fn write_basic_derivation(
    sd: &StoreDir,
    drv: &Derivation,
    w: &mut impl Write,
) -> io::Result<()> {
    w.u64(drv.outputs.len() as u64)?;
    for (name, o) in &drv.outputs {
        w.str(name)?;
        w.opt_path(sd, o.path.as_ref())?;
        match &o.fixed {
            Some(f) => {
                w.str(&f.method_algo())?;
                w.str(&f.hash.to_base16())?;
            }
            None => {
                w.str("")?;
                w.str("")?;
            }
        }
    }
    w.paths(sd, &drv.input_srcs)?;
    w.str(&drv.platform)?;
    w.str(&drv.builder)?;
    w.strs(drv.args.iter().map(String::as_str))?;
    w.u64(drv.env.len() as u64)?;
    for (k, val) in &drv.env {
        w.str(k)?;
        w.str(val)?;
    }
    Ok(())
}

/// What a substituter knows about a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubstitutableInfo {
    pub deriver: Option<StorePath>,
    pub references: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}

/// `QueryMissing`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Missing {
    pub will_build: BTreeSet<StorePath>,
    pub will_substitute: BTreeSet<StorePath>,
    pub unknown: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}

/// A build's result on the wire (`BuildResult`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WireBuildResult {
    pub status: u64,
    pub error_msg: String,
    pub times_built: u64,
    pub is_non_deterministic: bool,
    pub start_time: u64,
    pub stop_time: u64,
    /// The builder's user and system CPU time in microseconds, if measured (sent from
    /// Nix 1.37 on).
    pub cpu_user: Option<i64>,
    pub cpu_system: Option<i64>,
    /// `DrvOutput` id (`sha256:<hash modulo>!<output>`) → `Realisation` JSON.
    pub built_outputs: Vec<(String, String)>,
}

/// Writes raw bytes after `STDERR_LAST` (for [`Reply::Stream`]).
pub type StreamFn = Box<dyn FnOnce(&mut dyn Write) -> io::Result<()> + Send>;

/// A reply, written after `STDERR_LAST`.
pub enum Reply {
    /// No payload.
    Nothing,
    Bool(bool),
    Int(u64),
    String(String),
    OptPath(Option<StorePath>),
    /// A path list, in the order given (handlers sort as Nix does).
    Paths(Vec<StorePath>),
    Strings(Vec<String>),
    /// `QueryPathInfo`: Nix ≥ 1.17 gets a found flag; Guix and older Nix get the info
    /// (an absent path is an error for them, raised by the handler).
    PathInfo(Option<ValidPathInfo>),
    /// `AddToStore` from Nix ≥ 1.25: the info with its path.
    PathInfoWithPath(ValidPathInfo),
    Roots(Vec<(String, StorePath)>),
    Gc {
        paths: Vec<String>,
        bytes_freed: u64,
    },
    SubstitutablePathInfo(Option<SubstitutableInfo>),
    SubstitutablePathInfos(Vec<(StorePath, SubstitutableInfo)>),
    Missing(Missing),
    /// Output name → path (or none), sorted by name.
    OutputMap(Vec<(String, Option<StorePath>)>),
    BuildDerivation(WireBuildResult),
    /// `QueryRealisation` with `realisation-with-path-not-hash`: the output's path and
    /// signatures, if it is known.
    BuildTrace(Option<(StorePath, BTreeSet<String>)>),
    BuildResults(Vec<(DerivedPath, WireBuildResult)>),
    /// Raw bytes streamed after `STDERR_LAST` (`NarFromPath`).
    Stream(StreamFn),
    /// A reply already in the client's layout, encoded once and kept (a connection's
    /// cached `QueryPathInfo` answers: see [`found_path_info`]).
    Encoded(Arc<[u8]>),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Stream(_) => f.write_str("Reply::Stream"),
            Reply::Nothing => f.write_str("Reply::Nothing"),
            Reply::Bool(b) => write!(f, "Reply::Bool({b})"),
            Reply::Int(n) => write!(f, "Reply::Int({n})"),
            Reply::String(s) => write!(f, "Reply::String({s:?})"),
            Reply::Paths(p) => write!(f, "Reply::Paths({} paths)", p.len()),
            _ => f.write_str("Reply::…"),
        }
    }
}

impl Reply {
    /// Writes the payload for client `v` (everything but [`Reply::Stream`]).
    pub fn write(self, v: Proto, sd: &StoreDir, w: &mut dyn Write) -> io::Result<()> {
        match self {
            Reply::Nothing => {}
            Reply::Bool(b) => w.bool(b)?,
            Reply::Int(n) => w.u64(n)?,
            Reply::String(s) => w.str(&s)?,
            Reply::OptPath(p) => w.opt_path(sd, p.as_ref())?,
            Reply::Paths(ps) => w.paths(sd, &ps)?,
            Reply::Strings(ss) => w.strs(ss.iter().map(String::as_str))?,
            Reply::PathInfo(Some(i)) => write_found_path_info(v, sd, &i, w)?,
            Reply::PathInfo(None) => w.u64(0)?,
            Reply::PathInfoWithPath(i) => write_path_info(v, sd, &i, true, w)?,
            Reply::Roots(roots) => {
                w.u64(roots.len() as u64)?;
                for (link, p) in &roots {
                    w.str(link)?;
                    w.path(sd, p)?;
                }
            }
            Reply::Gc { paths, bytes_freed } => {
                w.strs(paths.iter().map(String::as_str))?;
                w.u64(bytes_freed)?;
                w.u64(0)?;
            }
            Reply::SubstitutablePathInfo(None) => w.u64(0)?,
            Reply::SubstitutablePathInfo(Some(i)) => {
                w.u64(1)?;
                w.opt_path(sd, i.deriver.as_ref())?;
                w.paths(sd, &i.references)?;
                w.u64(i.download_size)?;
                w.u64(i.nar_size)?;
            }
            Reply::SubstitutablePathInfos(infos) => {
                w.u64(infos.len() as u64)?;
                for (p, i) in &infos {
                    w.path(sd, p)?;
                    w.opt_path(sd, i.deriver.as_ref())?;
                    w.paths(sd, &i.references)?;
                    w.u64(i.download_size)?;
                    w.u64(i.nar_size)?;
                }
            }
            Reply::Missing(m) => {
                w.paths(sd, &m.will_build)?;
                w.paths(sd, &m.will_substitute)?;
                w.paths(sd, &m.unknown)?;
                w.u64(m.download_size)?;
                w.u64(m.nar_size)?;
            }
            Reply::OutputMap(m) => {
                w.u64(m.len() as u64)?;
                for (name, p) in &m {
                    w.str(name)?;
                    w.opt_path(sd, p.as_ref())?;
                }
            }
            Reply::BuildDerivation(r) => write_build_result(v, sd, &r, w)?,
            Reply::BuildResults(rs) => {
                w.u64(rs.len() as u64)?;
                for (p, r) in &rs {
                    w.str(&p.to_wire(sd))?;
                    write_build_result(v, sd, r, w)?;
                }
            }
            Reply::BuildTrace(None) => w.u64(0)?,
            Reply::BuildTrace(Some((p, sigs))) => {
                w.u64(1)?;
                w.path(sd, &p)?;
                w.strs(sigs.iter().map(String::as_str))?;
            }
            Reply::Stream(f) => f(w)?,
            Reply::Encoded(bytes) => w.write_all(&bytes)?,
        }
        Ok(())
    }

    /// Reads the reply to `op` as client `v` (the client half). `NarFromPath`'s stream is
    /// not read here.
    pub fn read<R: BufRead>(
        op: Op,
        v: Proto,
        sd: &StoreDir,
        r: &mut WireReader<R>,
    ) -> Result<Reply, Error> {
        use Op::*;
        Ok(match op {
            IsValidPath | HasSubstitutes => Reply::Bool(r.bool("answer")?),
            QueryPathHash | QueryDeriver | QueryPathFromHashPart | AddPermRoot => {
                Reply::String(r.string(MAX_NAME, "answer")?)
            }
            QueryActiveBuilds => Reply::String(r.string(MAX_ACTIVE_BUILDS_JSON, "active builds")?),
            QueryReferences
            | QueryReferrers
            | QueryDerivationOutputs
            | QueryAllValidPaths
            | QueryValidPaths
            | QuerySubstitutablePaths
            | QueryValidDerivers
            | QueryFailedPaths
            | ImportPaths => Reply::Paths(r.paths(sd, "paths")?.into_iter().collect()),
            QueryRealisation if v.has_feature(Feature::RealisationWithPathNotHash) => {
                Reply::BuildTrace(match r.u64("build trace tag")? {
                    0 => None,
                    1 => Some((
                        r.path(sd, "output path")?,
                        r.strings("signatures")?.into_iter().collect(),
                    )),
                    n => return Err(r.invalid(format!("invalid optional build trace tag {n}"))),
                })
            }
            QueryDerivationOutputNames | BuiltinBuilders | SubstituteUrls | QueryRealisation => {
                Reply::Strings(r.strings("strings")?)
            }
            AddToStore if v.add_to_store_ca() => {
                Reply::PathInfoWithPath(read_path_info(v, sd, None, r)?)
            }
            AddToStore | AddTextToStore => Reply::OptPath(r.opt_path(sd, "path")?),
            BuildPaths | EnsurePath | AddTempRoot | AddIndirectRoot | SyncWithGc | ExportPath
            | OptimiseStore | AddSignatures | AddBuildLog | ClearFailedPaths => {
                Reply::Int(r.u64("answer")?)
            }
            VerifyStore => Reply::Bool(r.bool("errors remain")?),
            SetOptions | AddToStoreNar | AddMultipleToStore | RegisterDrvOutput | NarFromPath => {
                Reply::Nothing
            }
            FindRoots => Reply::Roots(r.list("roots", |r| {
                Ok((r.string(MAX_NAME, "link")?, r.path(sd, "root")?))
            })?),
            CollectGarbage => {
                let paths = r.strings("paths")?;
                let bytes_freed = r.u64("bytes freed")?;
                r.u64("obsolete")?;
                Reply::Gc { paths, bytes_freed }
            }
            QuerySubstitutablePathInfo => {
                if r.bool("found")? {
                    Reply::SubstitutablePathInfo(Some(read_subst_info(sd, r)?))
                } else {
                    Reply::SubstitutablePathInfo(None)
                }
            }
            QuerySubstitutablePathInfos => Reply::SubstitutablePathInfos(r.list("infos", |r| {
                Ok((r.path(sd, "path")?, read_subst_info(sd, r)?))
            })?),
            QueryPathInfo => {
                let found = if v.path_info_found_flag() {
                    r.bool("found")?
                } else {
                    true
                };
                Reply::PathInfo(if found {
                    // The path is the one asked for; the caller fills it in.
                    let placeholder =
                        StorePath::from_base_name("00000000000000000000000000000000-unknown")
                            .map_err(|e| r.invalid(e.to_string()))?;
                    Some(read_path_info_rest(placeholder, v, sd, r)?)
                } else {
                    None
                })
            }
            QueryMissing => Reply::Missing(Missing {
                will_build: r.paths(sd, "will build")?,
                will_substitute: r.paths(sd, "will substitute")?,
                unknown: r.paths(sd, "unknown")?,
                download_size: r.u64("download size")?,
                nar_size: r.u64("NAR size")?,
            }),
            QueryDerivationOutputMap => Reply::OutputMap(r.list("outputs", |r| {
                Ok((r.string(MAX_NAME, "output")?, r.opt_path(sd, "path")?))
            })?),
            BuildDerivation => Reply::BuildDerivation(read_build_result(v, sd, r)?),
            BuildPathsWithResults => Reply::BuildResults(r.list("results", |r| {
                let s = r.string(MAX_NAME, "derived path")?;
                let p = DerivedPath::parse(sd, &s).map_err(|e| r.invalid(e.to_string()))?;
                Ok((p, read_build_result(v, sd, r)?))
            })?),
        })
    }
}

fn read_subst_info<R: BufRead>(
    sd: &StoreDir,
    r: &mut WireReader<R>,
) -> Result<SubstitutableInfo, Error> {
    Ok(SubstitutableInfo {
        deriver: r.opt_path(sd, "deriver")?,
        references: r.paths(sd, "references")?,
        download_size: r.u64("download size")?,
        nar_size: r.u64("NAR size")?,
    })
}

/// A `BuildResult`: status, error, then what the version adds (1.29 times, 1.37 CPU
/// times, 1.28 built outputs, in that order on the wire).
fn write_build_result(
    v: Proto,
    sd: &StoreDir,
    r: &WireBuildResult,
    w: &mut dyn Write,
) -> io::Result<()> {
    w.u64(r.status)?;
    w.str(&r.error_msg)?;
    if v.build_times() {
        write_build_times(r, w)?;
    }
    if v.cpu_times() {
        write_opt_micros(r.cpu_user, w)?;
        write_opt_micros(r.cpu_system, w)?;
    }
    if v.has_feature(Feature::RealisationWithPathNotHash) {
        write_built_outputs_by_name(sd, &r.built_outputs, w)?;
    } else if v.built_outputs() {
        write_built_outputs(&r.built_outputs, w)?;
    }
    Ok(())
}

/// Built outputs as Nix 2.35 sends them with `realisation-with-path-not-hash`: output name
/// → (path, signatures), from the `(id, realisation JSON)` pairs kiln keeps.
fn write_built_outputs_by_name(
    sd: &StoreDir,
    outs: &[(String, String)],
    w: &mut dyn Write,
) -> io::Result<()> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut by_name = BTreeMap::new();
    for (id, json) in outs {
        let name = id
            .rsplit_once('!')
            .map(|(_, n)| n)
            .ok_or_else(|| bad(format!("output id '{id}' has no output name")))?;
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(format!("realisation of '{id}': {e}")))?;
        let out = v
            .get("outPath")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| bad(format!("realisation of '{id}' has no outPath")))?;
        let out = StorePath::from_base_name(out).map_err(|e| bad(e.to_string()))?;
        let sigs: BTreeSet<String> = v
            .get("signatures")
            .and_then(serde_json::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(serde_json::Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        by_name.insert(name, (out, sigs));
    }
    w.u64(by_name.len() as u64)?;
    for (name, (out, sigs)) in by_name {
        w.str(name)?;
        w.path(sd, &out)?;
        w.strs(sigs.iter().map(String::as_str))?;
    }
    Ok(())
}

/// The inverse of [`write_built_outputs_by_name`]: ids with Nix's dummy hash, as Nix 2.35
/// gives old clients (the derivation's hash no longer travels).
fn read_built_outputs_by_name<R: BufRead>(
    sd: &StoreDir,
    r: &mut WireReader<R>,
) -> Result<Vec<(String, String)>, Error> {
    r.list("built outputs", |r| {
        let name = r.string(MAX_NAME, "output name")?;
        let out = r.path(sd, "output path")?;
        let sigs = r.strings("signatures")?;
        let id = format!("sha256:{}!{name}", "0".repeat(64));
        let json = serde_json::json!({
            "dependentRealisations": {},
            "id": id,
            "outPath": out.base_name(),
            "signatures": sigs,
        });
        Ok((id, json.to_string()))
    })
}

fn read_build_result<R: BufRead>(
    v: Proto,
    sd: &StoreDir,
    r: &mut WireReader<R>,
) -> Result<WireBuildResult, Error> {
    let mut b = WireBuildResult {
        status: r.u64("status")?,
        error_msg: r.string(MAX_TEXT, "error")?,
        ..Default::default()
    };
    if v.build_times() {
        read_build_times(&mut b, r)?;
    }
    if v.cpu_times() {
        b.cpu_user = read_opt_micros(r, "user CPU time")?;
        b.cpu_system = read_opt_micros(r, "system CPU time")?;
    }
    if v.has_feature(Feature::RealisationWithPathNotHash) {
        b.built_outputs = read_built_outputs_by_name(sd, r)?;
    } else if v.built_outputs() {
        b.built_outputs = read_built_outputs(r)?;
    }
    Ok(b)
}

/// Times built, non-determinism, start and stop: what both protocols add to a build result
/// (worker 1.29, serve 2.3).
pub(crate) fn write_build_times(r: &WireBuildResult, w: &mut dyn Write) -> io::Result<()> {
    w.u64(r.times_built)?;
    w.bool(r.is_non_deterministic)?;
    w.u64(r.start_time)?;
    w.u64(r.stop_time)
}

pub(crate) fn read_build_times<R: BufRead>(
    b: &mut WireBuildResult,
    r: &mut WireReader<R>,
) -> Result<(), Error> {
    b.times_built = r.u64("times built")?;
    b.is_non_deterministic = r.bool("non-deterministic")?;
    b.start_time = r.u64("start time")?;
    b.stop_time = r.u64("stop time")?;
    Ok(())
}

/// An optional duration in microseconds: a tag (0 none, 1 some), then the value.
fn write_opt_micros(d: Option<i64>, w: &mut dyn Write) -> io::Result<()> {
    match d {
        None => w.u64(0),
        Some(us) => {
            w.u64(1)?;
            w.u64(us as u64)
        }
    }
}

fn read_opt_micros<R: BufRead>(r: &mut WireReader<R>, what: &str) -> Result<Option<i64>, Error> {
    match r.u64(what)? {
        0 => Ok(None),
        1 => Ok(Some(r.u64(what)? as i64)),
        n => Err(r.invalid(format!("{what}: invalid optional tag {n}"))),
    }
}

pub(crate) fn write_built_outputs(outs: &[(String, String)], w: &mut dyn Write) -> io::Result<()> {
    w.u64(outs.len() as u64)?;
    for (id, json) in outs {
        w.str(id)?;
        w.str(json)?;
    }
    Ok(())
}

pub(crate) fn read_built_outputs<R: BufRead>(
    r: &mut WireReader<R>,
) -> Result<Vec<(String, String)>, Error> {
    r.list("built outputs", |r| {
        Ok((
            r.string(MAX_NAME, "output id")?,
            r.string(MAX_TEXT, "realisation")?,
        ))
    })
}
