//! Every request kiln's client writes is read back identically by kiln's server, for each
//! protocol version either dialect uses; so is every reply.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufReader;

use kiln_format::store_path::ContentAddressMethod;
use kiln_format::{
    ContentAddress, FileIngestionMethod, Hash, HashAlgo, StoreDir, StorePath, ValidPathInfo,
};
use kiln_protocol::ops::{AddToStore, GcAction, GcRequest};
use kiln_protocol::wire::WireReader;
use kiln_protocol::{
    BuildMode, ClientOptions, DerivedPath, Dialect, Feature, Features, Missing, Op, OutputSpec,
    Proto, Reply, Request, SubstitutableInfo, Version, WireBuildResult,
};

fn sd() -> StoreDir {
    StoreDir::new("/gnu/store").unwrap()
}

fn p(name: &str) -> StorePath {
    let h = Hash::sha256(name.as_bytes());
    StorePath::from_parts(&h.compress(20), name).unwrap()
}

const VERSIONS: [u64; 11] = [
    0x10a, 0x110, 0x118, 0x11a, 0x11e, 0x122, 0x123, 0x125, 0x126, 0x163, 0x164,
];

/// A connection at `raw` (encodings exist below Nix's 1.18 floor too: kiln's client may
/// meet an old daemon).
fn proto(raw: u64) -> Proto {
    match Version(raw).dialect() {
        Dialect::Guix => Proto::guix(raw),
        Dialect::Nix => Proto::nix(raw),
    }
}

/// Every version, and 1.38 with every feature kiln knows.
fn protos() -> Vec<Proto> {
    let mut v: Vec<Proto> = VERSIONS.iter().map(|&r| proto(r)).collect();
    v.push(proto(0x126).with_features(Features::of(&Feature::ALL)));
    v
}

fn requests(v: Proto) -> Vec<Request> {
    let guix = v.is_guix();
    let drv = p("x.drv");
    let mut q = vec![
        Request::IsValidPath(p("a")),
        Request::QueryReferrers(p("a")),
        Request::AddTextToStore {
            name: "t".into(),
            text: b"some\0text".to_vec(),
            refs: [p("a"), p("b")].into(),
        },
        Request::BuildPaths {
            paths: vec![
                DerivedPath::Opaque(p("a")),
                DerivedPath::Built {
                    drv: drv.clone(),
                    outputs: OutputSpec::Names(["dev".to_string(), "out".to_string()].into()),
                },
                DerivedPath::Built {
                    drv: drv.clone(),
                    outputs: OutputSpec::All,
                },
            ],
            mode: if v.version().minor() >= 15 {
                BuildMode::Check
            } else {
                BuildMode::Normal
            },
        },
        Request::AddIndirectRoot("/home/u/result".into()),
        Request::FindRoots,
        Request::ExportPath {
            path: p("a"),
            sign: false,
        },
        Request::CollectGarbage(GcRequest {
            action: GcAction::DeleteSpecific,
            paths: [p("a")].into(),
            whole_store: false,
            delete_referrers: false,
            ignore_liveness: false,
            max_freed: u64::MAX,
        }),
        Request::QuerySubstitutablePathInfos(BTreeMap::from([(p("a"), None)])),
        Request::QueryValidPaths {
            paths: [p("a"), p("b")].into(),
            substitute: false,
        },
        Request::VerifyStore {
            check_contents: true,
            repair: false,
        },
        Request::AddToStore(AddToStore::Legacy {
            name: "f".into(),
            method: FileIngestionMethod::Flat,
            algo: HashAlgo::Sha1,
        }),
        Request::SetOptions(ClientOptions {
            keep_going: true,
            verbosity: 4,
            max_build_jobs: if guix && v.version().minor() >= 0x61 {
                None
            } else {
                Some(3)
            },
            max_silent_time: if guix && v.version().minor() >= 0x61 {
                None
            } else {
                Some(60)
            },
            build_cores: if guix && v.version().minor() >= 0x61 {
                None
            } else {
                Some(2)
            },
            use_substitutes: true,
            print_build_trace: guix,
            overrides: if v.version().minor() >= 12 {
                vec![("timeout".into(), "7".into())]
            } else {
                vec![]
            },
            ..Default::default()
        }),
    ];
    if guix {
        q.push(Request::QueryFailedPaths);
        q.push(Request::ClearFailedPaths([p("a")].into()));
        q.push(Request::BuiltinBuilders);
        q.push(Request::SubstituteUrls);
    } else {
        if v.version().minor() >= 25 {
            q.retain(|r| !matches!(r, Request::AddToStore(_)));
            q.push(Request::AddToStore(AddToStore::Ca {
                name: "f".into(),
                method: ContentAddressMethod::Fixed(FileIngestionMethod::Recursive),
                algo: HashAlgo::Sha256,
                refs: [p("a")].into(),
                repair: true,
            }));
        }
        if v.version().minor() >= 22 {
            q.push(Request::QuerySubstitutablePathInfos(BTreeMap::from([
                (p("a"), None),
                (
                    p("b"),
                    Some(ContentAddress::Fixed(
                        FileIngestionMethod::Flat,
                        Hash::sha256(b"x"),
                    )),
                ),
            ])));
        }
        if v.version().minor() >= 27 {
            q.push(Request::QueryValidPaths {
                paths: [p("a")].into(),
                substitute: true,
            });
        }
        let mut info = ValidPathInfo::new(p("n"), Hash::sha256(b"nar"), 1234);
        info.deriver = Some(drv.clone());
        info.references = [p("a")].into();
        info.registration_time = 1_700_000_000;
        if v.version().minor() >= 16 {
            info.ultimate = true;
            info.sigs = BTreeSet::from(["k:c2ln".to_string()]);
            info.ca = Some(ContentAddress::Text(Hash::sha256(b"t")));
        }
        q.push(Request::AddToStoreNar {
            info,
            repair: false,
            dont_check_sigs: true,
        });
        q.push(Request::AddMultipleToStore {
            repair: false,
            dont_check_sigs: false,
        });
        q.push(Request::AddBuildLog(drv.clone()));
        q.push(Request::QueryDerivationOutputMap(drv.clone()));
        q.push(Request::BuildPathsWithResults {
            paths: vec![DerivedPath::Opaque(p("a"))],
            mode: BuildMode::Normal,
        });
        q.push(Request::AddPermRoot {
            path: p("a"),
            root: "/home/u/result".into(),
        });
    }
    if v.has_feature(Feature::RealisationWithPathNotHash) {
        q.push(Request::RegisterBuildTrace {
            drv: drv.clone(),
            output: "out".into(),
            out_path: p("o"),
            signatures: BTreeSet::from(["k:c2ln".to_string()]),
        });
        q.push(Request::QueryBuildTrace {
            drv: drv.clone(),
            output: "dev".into(),
        });
    }
    if v.has_feature(Feature::DeleteDeadSpecificReferrers) {
        q.push(Request::CollectGarbage(GcRequest {
            action: GcAction::DeleteDead,
            paths: [p("a"), p("b")].into(),
            whole_store: false,
            delete_referrers: true,
            ignore_liveness: false,
            max_freed: 7,
        }));
        q.push(Request::CollectGarbage(GcRequest {
            action: GcAction::DeleteDead,
            paths: BTreeSet::new(),
            whole_store: true,
            delete_referrers: false,
            ignore_liveness: false,
            max_freed: u64::MAX,
        }));
    }
    // Only what the connection has (Nix 1.38 lost `ExportPath`, 1.36 gained
    // `AddPermRoot`); the table's own test checks which those are.
    q.retain(|r| v.op(r.op() as u64) == Some(r.op()));
    q
}

#[test]
fn requests_round_trip_in_every_version() {
    for v in protos() {
        for q in requests(v) {
            let mut b = Vec::new();
            q.write(v, &sd(), &mut b).unwrap();
            let mut r = WireReader::new(BufReader::new(b.as_slice()));
            let op = Op::from_wire(r.u64("op").unwrap(), v).unwrap();
            let back = Request::read(op, v, &sd(), &mut r)
                .unwrap_or_else(|e| panic!("{v}: {:?}: {e}", q.op()));
            assert_eq!(back, q, "{v}");
            assert_eq!(
                r.position() as usize,
                b.len(),
                "{v}: {:?} left bytes",
                q.op()
            );
        }
    }
}

#[test]
fn replies_round_trip_in_every_version() {
    for v in protos() {
        let mut info = ValidPathInfo::new(p("n"), Hash::sha256(b"nar"), 99);
        info.references = [p("a")].into();
        info.registration_time = 5;
        if v.path_info_ca() {
            info.sigs = BTreeSet::from(["k:c2ln".to_string()]);
        }
        let cases: Vec<(Op, Reply)> = vec![
            (Op::IsValidPath, Reply::Bool(true)),
            // Path lists travel sorted (Nix writes sets).
            (
                Op::QueryReferrers,
                Reply::Paths(BTreeSet::from([p("a"), p("b")]).into_iter().collect()),
            ),
            (
                Op::FindRoots,
                Reply::Roots(vec![("/x/result".into(), p("a"))]),
            ),
            (
                Op::CollectGarbage,
                Reply::Gc {
                    paths: vec!["/gnu/store/x".into()],
                    bytes_freed: 4096,
                },
            ),
            (
                Op::QuerySubstitutablePathInfo,
                Reply::SubstitutablePathInfo(Some(SubstitutableInfo {
                    deriver: None,
                    references: [p("a")].into(),
                    download_size: 1,
                    nar_size: 2,
                })),
            ),
            (Op::QueryPathInfo, Reply::PathInfo(Some(info.clone()))),
            (Op::VerifyStore, Reply::Bool(false)),
        ];
        let mut cases = cases;
        if !v.is_guix() {
            cases.push((
                Op::QueryMissing,
                Reply::Missing(Missing {
                    will_build: [p("a")].into(),
                    ..Default::default()
                }),
            ));
            cases.push((
                Op::QueryDerivationOutputMap,
                Reply::OutputMap(vec![("out".into(), Some(p("o"))), ("x".into(), None)]),
            ));
            cases.push((
                Op::BuildPathsWithResults,
                Reply::BuildResults(vec![(
                    DerivedPath::Opaque(p("a")),
                    WireBuildResult {
                        status: 3,
                        error_msg: "failed".into(),
                        times_built: 1,
                        cpu_user: v.cpu_times().then_some(1_500_000),
                        built_outputs: vec![(
                            "sha256:00!out".into(),
                            format!(
                                r#"{{"dependentRealisations":{{}},"id":"sha256:{}!out","outPath":"{}","signatures":["k:c2ln"]}}"#,
                                "0".repeat(64),
                                p("o").base_name()
                            ),
                        )],
                        ..Default::default()
                    },
                )]),
            ));
        }
        if v.has_feature(Feature::RealisationWithPathNotHash) {
            cases.push((Op::QueryRealisation, Reply::BuildTrace(None)));
            cases.push((
                Op::QueryRealisation,
                Reply::BuildTrace(Some((p("o"), BTreeSet::from(["k:c2ln".to_string()])))),
            ));
        }
        for (op, reply) in cases {
            let mut b = Vec::new();
            let shown = format!("{reply:?}");
            reply.write(v, &sd(), &mut b).unwrap();
            let mut r = WireReader::new(BufReader::new(b.as_slice()));
            let back =
                Reply::read(op, v, &sd(), &mut r).unwrap_or_else(|e| panic!("{v} {op:?}: {e}"));
            assert_eq!(r.position() as usize, b.len(), "{v} {op:?}");
            let mut again = Vec::new();
            back.write(v, &sd(), &mut again).unwrap();
            assert_eq!(again, b, "{v} {op:?} {shown}");
        }
        // A `QueryPathInfo` answer encoded once and kept (the daemon's per-connection
        // cache) is the same bytes, and reads back as the same info.
        let mut direct = Vec::new();
        Reply::PathInfo(Some(info.clone()))
            .write(v, &sd(), &mut direct)
            .unwrap();
        let mut kept = Vec::new();
        Reply::Encoded(kiln_protocol::ops::found_path_info(v, &sd(), &info))
            .write(v, &sd(), &mut kept)
            .unwrap();
        assert_eq!(kept, direct, "{v}");
        let mut r = WireReader::new(BufReader::new(kept.as_slice()));
        match Reply::read(Op::QueryPathInfo, v, &sd(), &mut r) {
            // The reply does not carry the path itself: the reader puts a placeholder there.
            Ok(Reply::PathInfo(Some(mut back))) => {
                back.path = info.path.clone();
                assert_eq!(back, info, "{v}");
            }
            other => panic!("{v}: {other:?}"),
        }
    }
}

/// Derived paths as Nix 2.34 writes them, dynamic derivations' `drv!out!outs` included,
/// parse and print back; a chain link that is no output name is refused with the path.
#[test]
fn derived_paths_with_chains_round_trip() {
    let sd = sd();
    let drv = "/gnu/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-make.drv.drv";
    for s in [
        format!("{drv}!out"),
        format!("{drv}!*"),
        format!("{drv}!dev,out"),
        format!("{drv}!out!out"),
        format!("{drv}!out!bin!*"),
    ] {
        let p = DerivedPath::parse(&sd, &s).unwrap();
        assert_eq!(p.to_wire(&sd), s);
    }
    match DerivedPath::parse(&sd, &format!("{drv}!out!bin!dev,out")).unwrap() {
        DerivedPath::Dynamic {
            producer,
            chain,
            outputs,
        } => {
            assert_eq!(sd.display(&producer), drv);
            assert_eq!(chain, ["out", "bin"]);
            assert_eq!(
                outputs,
                kiln_protocol::ops::OutputSpec::Names(["dev".into(), "out".into()].into())
            );
        }
        other => panic!("{other:?}"),
    }
    for bad in [format!("{drv}!!out"), format!("{drv}!a b!out")] {
        let e = DerivedPath::parse(&sd, &bad).unwrap_err().to_string();
        assert!(
            e.contains("is not an output name") && e.contains(drv),
            "{bad}: {e}"
        );
    }
}
