//! Floating content-addressed derivations against what Nix 2.8 produced for the same
//! expression (`tests/fixtures/ca/`, made with `ca-derivations` enabled; see its
//! `README.txt`): the `.drv` files, the realisation ids (masked modulo hashes), the
//! resolved derivations Nix wrote, the scratch path a builder sees, and the final output
//! paths computed from the outputs' archives.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use kiln_format::derivation::{downstream_placeholder, output_placeholder, DerivationHasher};
use kiln_format::hash::{Hash, HashAlgo, HashModuloSink};
use kiln_format::refscan::RefScanner;
use kiln_format::store_path::{output_path_name, ContentAddressMethod};
use kiln_format::{Derivation, FileIngestionMethod, StoreDir, StorePath};
use kiln_testkit::read_fixture;

const SD: &str = "/tmp/ca-fixture/store";

fn sd() -> StoreDir {
    StoreDir::new(SD).unwrap()
}

fn text(name: &str) -> String {
    String::from_utf8(read_fixture(&format!("ca/{name}"))).unwrap()
}

/// `attr path` lines (and `attr output path` for outputs).
fn table(name: &str) -> Vec<Vec<String>> {
    text(name)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

struct Fixture {
    /// Every derivation of the fixture, originals and resolved, by path.
    drvs: BTreeMap<StorePath, (Vec<u8>, Derivation)>,
    by_attr: BTreeMap<String, StorePath>,
    outputs: BTreeMap<(String, String), StorePath>,
}

fn load() -> Fixture {
    let sd = sd();
    let mut drvs = BTreeMap::new();
    let mut by_attr = BTreeMap::new();
    let mut add = |file: &str, path: &StorePath| {
        let bytes = read_fixture(&format!("ca/{file}"));
        let d = Derivation::parse(&sd, path.derivation_name().unwrap(), &bytes).unwrap();
        drvs.insert(path.clone(), (bytes, d));
    };
    for row in table("drv-paths.txt") {
        let p = sd.parse_path(&row[1]).unwrap();
        add(&format!("{}.drv", row[0]), &p);
        by_attr.insert(row[0].clone(), p);
    }
    for row in table("resolved-map.txt") {
        let p = sd.parse_path(&row[1]).unwrap();
        add(&format!("resolved-{}", p.base_name()), &p);
    }
    let outputs = table("outputs.txt")
        .into_iter()
        .map(|r| ((r[0].clone(), r[1].clone()), sd.parse_path(&r[2]).unwrap()))
        .collect();
    Fixture {
        drvs,
        by_attr,
        outputs,
    }
}

impl Fixture {
    fn hasher(
        &self,
    ) -> DerivationHasher<
        impl Fn(&StoreDir, &StorePath) -> Result<Derivation, kiln_format::Error> + '_,
    > {
        DerivationHasher::new(move |_: &StoreDir, p: &StorePath| {
            Ok(self.drvs.get(p).map(|(_, d)| d.clone()).unwrap())
        })
    }
    fn drv(&self, attr: &str) -> (&StorePath, &Derivation) {
        let p = &self.by_attr[attr];
        (p, &self.drvs[p].1)
    }
    fn attr_of(&self, p: &StorePath) -> String {
        self.by_attr
            .iter()
            .find(|(_, q)| *q == p)
            .map(|(a, _)| a.clone())
            .unwrap()
    }
}

#[test]
fn derivations_print_back_byte_for_byte_with_their_paths() {
    let f = load();
    let sd = sd();
    for (path, (bytes, d)) in &f.drvs {
        assert_eq!(&d.to_aterm(&sd), bytes, "{path}");
        assert_eq!(&d.drv_path(&sd).unwrap(), path);
    }
    // Floating outputs have no path and a method; the builder sees placeholders.
    let (_, root) = f.drv("root");
    assert!(root.is_floating());
    assert_eq!(root.env["out"], output_placeholder("out"));
    // The input-addressed dependent of a floating derivation has its path deferred.
    let (_, dep) = f.drv("dependentNonCA");
    assert!(!dep.is_floating() && dep.needs_resolution());
    assert!(dep.outputs["out"].path.is_none());
    let mut h = f.hasher();
    dep.check_output_paths(&sd, &mut h).unwrap();
}

#[test]
fn realisation_ids_are_nix_masked_modulo_hashes() {
    let f = load();
    let sd = sd();
    let mut h = f.hasher();
    let mut checked = 0;
    for row in table("hash-modulo-map.txt") {
        let p = sd.parse_path(&row[2]).unwrap();
        let d = &f.drvs[&p].1;
        let got = h.hash_modulo(&sd, d, true).unwrap();
        assert_eq!(format!("sha256:{}", got.to_base16()), row[0], "{p}");
        checked += 1;
    }
    assert_eq!(checked, 9);
}

#[test]
fn resolution_gives_the_derivations_nix_wrote() {
    let f = load();
    let sd = sd();
    for row in table("resolved-map.txt") {
        let orig = sd.parse_path(&row[0]).unwrap();
        let want = sd.parse_path(&row[1]).unwrap();
        let d = &f.drvs[&orig].1;
        // Each input placeholder is in the original and replaced in the resolved one.
        for (input, outs) in &d.input_drvs {
            for o in outs {
                let ph = downstream_placeholder(input, o);
                assert!(
                    d.args.iter().any(|a| a.contains(&ph)),
                    "{orig}: no placeholder for {input}!{o}"
                );
            }
        }
        let resolved = d
            .resolve(&sd, |input, chain| {
                f.outputs
                    .get(&(f.attr_of(input), chain[0].to_string()))
                    .cloned()
            })
            .unwrap();
        assert_eq!(resolved.to_aterm(&sd), f.drvs[&want].0, "{orig}");
        assert_eq!(resolved.drv_path(&sd).unwrap(), want);
    }
    // An unbuilt input is named.
    let (_, dep) = f.drv("dependent");
    let e = dep.resolve(&sd, |_, _| None).unwrap_err().to_string();
    assert!(
        e.contains("output 'out' of input") && e.contains("root.drv"),
        "{e}"
    );
}

#[test]
fn the_builder_sees_nix_scratch_path() {
    let f = load();
    let sd = sd();
    let zero = Hash::parse_digest(HashAlgo::Sha256, &"0".repeat(64)).unwrap();
    // What the builders recorded (reversed, so that rewriting left it alone).
    for (attr, output, want) in [
        ("root", "out", "ch4i1slhlgrj43yyzb427i16lwvr78cv-root"),
        ("multi", "out", "4adkbz2m0m0hxzqn341qmk45rsswjda8-multi"),
        ("multi", "dev", "v57xx87v67k2ivirpwyyg0ynkbhxk02h-multi-dev"),
    ] {
        let (p, d) = f.drv(attr);
        let scratch = sd
            .make_store_path(
                &format!("rewrite:{}:name:{output}", p.base_name()),
                &zero,
                &output_path_name(&d.name, output),
            )
            .unwrap();
        assert_eq!(scratch.base_name(), want);
    }
}

#[test]
fn final_paths_follow_from_contents_modulo_self_references() {
    let f = load();
    let sd = sd();
    let all: Vec<StorePath> = f.outputs.values().cloned().collect();
    for ((attr, output), path) in &f.outputs {
        let nar = read_fixture(&format!("ca/{attr}-{output}.nar"));
        let (_, d) = f.drv(attr);
        // The builder's output for a resolved derivation: the method is the original's.
        let method = match d.outputs[output].floating {
            Some(fl) => match fl.method {
                ContentAddressMethod::Fixed(m) => m,
                ContentAddressMethod::Text => unreachable!("the fixture has no text outputs"),
            },
            None => continue, // input-addressed (dependentNonCA)
        };
        let got = match method {
            FileIngestionMethod::Recursive => {
                let mut h = HashModuloSink::new(HashAlgo::Sha256, path.hash_part());
                h.update(&nar);
                h.finish().0
            }
            FileIngestionMethod::Flat => {
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("f");
                kiln_format::nar::restore_into(&file, &mut nar.as_slice(), Default::default())
                    .unwrap();
                Hash::sha256(&std::fs::read(&file).unwrap())
            }
            FileIngestionMethod::Git => unreachable!("the fixture has no Git outputs"),
        };
        let mut scan = RefScanner::new(all.iter().map(|p| p.hash_part()));
        scan.feed(&nar);
        let refs: BTreeSet<StorePath> = scan.found().map(|i| all[i].clone()).collect();
        let self_ref = refs.contains(path);
        let others: BTreeSet<StorePath> = refs.into_iter().filter(|r| r != path).collect();
        let want = sd
            .make_fixed_output_path(method, &got, path.name(), &others, self_ref)
            .unwrap();
        assert_eq!(&want, path, "{attr}.{output}");
    }
}
