//! ATerm property tests: printing then parsing is the identity, and hostile text is refused
//! with a position.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use kiln_format::derivation::{DerivationOutput, DynamicInput, FixedOutputHash};
use kiln_format::{Derivation, FileIngestionMethod, Hash, HashAlgo, StoreDir, StorePath};
use proptest::prelude::*;

fn sd() -> StoreDir {
    StoreDir::new("/gnu/store").unwrap()
}

fn arb_path() -> impl Strategy<Value = StorePath> {
    (
        proptest::array::uniform20(any::<u8>()),
        "[a-zA-Z0-9+._?=-]{1,20}",
    )
        .prop_filter("not . or ..", |(_, n)| n != "." && n != "..")
        .prop_map(|(d, n)| StorePath::from_parts(&d, &n).unwrap())
}

fn arb_string() -> impl Strategy<Value = String> {
    proptest::string::string_regex("(.|\n|\r|\t|\"|\\\\){0,30}").unwrap()
}

/// What a derivation uses of derivations an input makes, up to three levels deep.
fn arb_dynamic() -> impl Strategy<Value = BTreeMap<String, DynamicInput>> {
    let leaf =
        proptest::collection::btree_set("[a-z]{1,5}", 0..3).prop_map(|outputs| DynamicInput {
            outputs,
            children: BTreeMap::new(),
        });
    let node = leaf.prop_recursive(2, 8, 3, |inner| {
        (
            proptest::collection::btree_set("[a-z]{1,5}", 0..3),
            proptest::collection::btree_map("[a-z]{1,5}", inner, 0..3),
        )
            .prop_map(|(outputs, children)| DynamicInput { outputs, children })
    });
    proptest::collection::btree_map("[a-z]{1,5}", node, 0..3)
}

fn arb_drv() -> impl Strategy<Value = Derivation> {
    (arb_static_drv(), arb_dynamic()).prop_map(|(mut d, dynamic)| {
        // The first input derivation (if any) is also used for what it makes.
        if let Some(first) = d.input_drvs.keys().next().cloned() {
            if !dynamic.is_empty() {
                d.dynamic_inputs.insert(first, dynamic);
            }
        }
        d
    })
}

fn arb_static_drv() -> impl Strategy<Value = Derivation> {
    (
        proptest::collection::btree_map("[a-z]{1,6}", (arb_path(), any::<bool>()), 1..4),
        proptest::collection::btree_map(
            arb_path(),
            proptest::collection::btree_set("[a-z]{1,5}", 1..3),
            0..3,
        ),
        proptest::collection::btree_set(arb_path(), 0..3),
        "[a-z0-9_-]{1,15}",
        arb_string(),
        proptest::collection::vec(arb_string(), 0..4),
        proptest::collection::btree_map(arb_string(), arb_string(), 0..6),
    )
        .prop_map(
            |(outs, input_drvs, input_srcs, platform, builder, args, env)| {
                let single = outs.len() == 1;
                let outputs: BTreeMap<String, DerivationOutput> = outs
                    .into_iter()
                    .map(|(name, (p, fixed))| {
                        let fixed = (single && fixed).then(|| FixedOutputHash {
                            method: FileIngestionMethod::Recursive,
                            hash: Hash::of(HashAlgo::Sha1, name.as_bytes()),
                        });
                        (
                            name,
                            DerivationOutput {
                                path: Some(p),
                                fixed,
                                floating: None,
                            },
                        )
                    })
                    .collect();
                Derivation {
                    name: "x".into(),
                    outputs,
                    input_drvs,
                    dynamic_inputs: BTreeMap::new(),
                    input_srcs,
                    platform,
                    builder,
                    args,
                    env,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn print_parse_identity(drv in arb_drv()) {
        let text = drv.to_aterm(&sd());
        let back = Derivation::parse(&sd(), "x", &text).unwrap();
        prop_assert_eq!(back.to_aterm(&sd()), text);
        prop_assert_eq!(back, drv);
    }

    #[test]
    fn truncations_and_mutations_never_panic(drv in arb_drv(), cut in any::<usize>(), pos in any::<usize>(), b in any::<u8>()) {
        let text = drv.to_aterm(&sd());
        let _ = Derivation::parse(&sd(), "x", &text[..cut % text.len()]);
        let mut m = text.clone();
        let i = pos % m.len();
        m[i] = b;
        let _ = Derivation::parse(&sd(), "x", &m);
    }
}

#[test]
fn hostile_text_is_refused_with_position() {
    let p = "/gnu/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x";
    let ok = format!("Derive([(\"out\",\"{p}\",\"\",\"\")],[],[],\"sys\",\"/bin/sh\",[],[])");
    assert!(Derivation::parse(&sd(), "x", ok.as_bytes()).is_ok());
    let cases = [
        (ok.replace("Derive(", "Derivx("), "expected 'Derive(' at byte 0"),
        (format!("{ok} "), "trailing data"),
        (ok.replace("\"sys\"", "\"sys"), "expected ','"),
        (ok.replace("/gnu/store/7h7", "/nix/store/7h7"), "bad path at byte 15"),
        (ok.replace("[],[],\"sys\"", "[],[\"relative\"],\"sys\""), "bad path"),
        (ok.replace("\"\",\"\")", "\"r:sha256\",\"\")"), "floating content-addressed"),
        (ok.replace("\"\",\"\")", "\"sha257\",\"abcd\")"), "unknown hash algorithm"),
        (ok.replace("\"\",\"\")", "\"\",\"abcd\")"), "no hash algorithm"),
        (format!("Derive([(\"out\",\"{p}\",\"\",\"\"),(\"out\",\"{p}\",\"\",\"\")],[],[],\"s\",\"b\",[],[])"), "duplicate output 'out'"),
        (ok.replace("[])", "[(\"k\",\"\\"), "unterminated"),
        (
            ok.replace("Derive(", "DrvWithVersion(\"xp-dyn-drv-2\","),
            "unknown derivation ATerm format version 'xp-dyn-drv-2' at byte 15",
        ),
        (
            ok.replace("Derive(", "DrvWithVersion(\"xp-dyn-drv\",")
                .replace("[],[],\"sys\"", &format!("[(\"{p}\",([],[(\"out\",{{}})]))],[],\"sys\"")),
            "expected '('",
        ),
        (
            ok.replace("Derive(", "DrvWithVersion(\"xp-dyn-drv\",").replace(
                "[],[],\"sys\"",
                &format!(
                    "[(\"{p}\",{}[]{})],[],\"sys\"",
                    "([],[(\"out\",".repeat(40),
                    ")]))".repeat(40)
                ),
            ),
            "nested more than 32 deep",
        ),
        // Dynamic inputs only in the versioned form.
        (
            ok.replace("[],[],\"sys\"", &format!("[(\"{p}\",([],[(\"out\",[\"out\"])]))],[],\"sys\"")),
            "expected '['",
        ),
    ];
    for (text, want) in cases {
        let e = Derivation::parse(&sd(), "x", text.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "want {want:?} in {e:?}");
        assert!(e.contains("'x'"), "message names the derivation: {e}");
    }
    let bad_utf8 = ok
        .replace("\"sys\"", "\"s\u{fffd}\"")
        .replace('\u{fffd}', "\u{1}");
    let mut bytes = bad_utf8.into_bytes();
    let i = bytes.iter().position(|&b| b == 1).unwrap();
    bytes[i] = 0xff;
    let e = Derivation::parse(&sd(), "x", &bytes)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not valid UTF-8"), "{e}");
    // Nothing huge is accepted.
    let huge = vec![b' '; kiln_format::derivation::MAX_DRV_SIZE + 1];
    assert!(Derivation::parse(&sd(), "x", &huge)
        .unwrap_err()
        .to_string()
        .contains("limit"));
    let _ = BTreeSet::<u8>::new();
}
