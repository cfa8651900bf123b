//! Golden tests: kiln's formats against values produced by the real Nix 2.8
//! (`tests/fixtures/generate.sh`). These run without Nix installed.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_format::derivation::DerivationHasher;
use kiln_format::hash::{Encoding, HashSink};
use kiln_format::nar::{self, tree::Node};
use kiln_format::{Derivation, FileIngestionMethod, Hash, HashAlgo, StoreDir, StorePath};
use kiln_testkit::{fixture, read_fixture};

fn tsv(rel: &str) -> Vec<Vec<String>> {
    String::from_utf8(read_fixture(rel))
        .unwrap()
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

fn nar_hash(nar: &[u8], algo: HashAlgo) -> Hash {
    Hash::of(algo, nar)
}

#[test]
fn nar_round_trips_match_nix() {
    for name in ["file", "exec", "empty-file", "symlink", "dir", "deep"] {
        let bytes = read_fixture(&format!("nar/{name}.nar"));
        // Parse to a tree and print it back.
        let tree = Node::from_nar(bytes.as_slice()).unwrap();
        assert_eq!(tree.to_nar(), bytes, "{name}: tree round trip");
        // Restore to disk and dump again.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let stats = nar::restore(&target, bytes.as_slice()).unwrap();
        assert_eq!(stats.size, bytes.len() as u64);
        assert_eq!(
            nar::dump_to_vec(&target).unwrap(),
            bytes,
            "{name}: restore + dump"
        );
    }
}

#[test]
fn nar_hashes_match_nix_in_every_encoding() {
    let rows = tsv("nar/hashes.tsv");
    assert!(rows.len() >= 24);
    for r in rows {
        let (name, algo) = (&r[0], r[1].parse::<HashAlgo>().unwrap());
        let bytes = read_fixture(&format!("nar/{name}.nar"));
        let h = nar_hash(&bytes, algo);
        assert_eq!(
            h.encode(Encoding::Base16, false),
            r[2],
            "{name} {algo} base16"
        );
        assert_eq!(
            h.encode(Encoding::Base32, false),
            r[3],
            "{name} {algo} base32"
        );
        assert_eq!(
            h.encode(Encoding::Base64, false),
            r[4],
            "{name} {algo} base64"
        );
        assert_eq!(h.encode(Encoding::Sri, true), r[5], "{name} {algo} sri");
        for s in &r[2..] {
            assert_eq!(Hash::parse_any(s, Some(algo)).unwrap(), h);
        }
        // Dumping a restored tree straight into a hash sink gives the same hash.
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        nar::restore(&t, bytes.as_slice()).unwrap();
        let mut sink = HashSink::new(algo);
        nar::dump(&t, &mut sink).unwrap();
        assert_eq!(sink.finish(), (h, bytes.len() as u64));
    }
}

#[test]
fn flat_hashes_match_nix() {
    for r in tsv("nar/flat-hashes.tsv") {
        let algo: HashAlgo = r[1].parse().unwrap();
        let data = read_fixture(&format!("nar/files/{}", r[0]));
        let h = Hash::of(algo, &data);
        assert_eq!(h.to_base32(), r[2]);
        assert_eq!(h.to_sri(), r[3]);
    }
}

fn nar_of(path: &Path) -> Vec<u8> {
    nar::dump_to_vec(path).unwrap()
}

#[test]
fn store_paths_match_nix() {
    let rows = tsv("paths/paths.tsv");
    assert!(rows.len() > 40);
    // Git keeps no empty directories, but the tree `generate.sh` hashed with
    // Nix had two; recreate them so a fresh clone hashes the same tree.
    for empty in ["dir/Upper", "dir/empty-dir"] {
        std::fs::create_dir_all(fixture(&format!("paths/{empty}"))).unwrap();
    }
    for r in rows {
        let (kind, sd) = (r[0].as_str(), StoreDir::new(r[1].clone()).unwrap());
        let algo: HashAlgo = r[3].parse().unwrap();
        let name = &r[4];
        let want = sd.parse_path(&r[6]).unwrap();
        let got = match kind {
            "fixed" | "source" => {
                let src = fixture(&format!("paths/{}", r[5]));
                let (method, h) = if r[2] == "flat" {
                    (
                        FileIngestionMethod::Flat,
                        Hash::of(algo, &std::fs::read(&src).unwrap()),
                    )
                } else {
                    (
                        FileIngestionMethod::Recursive,
                        Hash::of(algo, &nar_of(&src)),
                    )
                };
                sd.make_fixed_output_path(method, &h, name, &BTreeSet::new(), false)
                    .unwrap()
            }
            "text" => {
                let mut refs = BTreeSet::new();
                let text = if r[2] == "-" {
                    read_fixture(&format!("paths/{}", r[5]))
                } else {
                    refs.insert(sd.parse_path(&r[2]).unwrap());
                    format!("refers to {}\n", r[2]).into_bytes()
                };
                sd.text_path_for(name, &text, &refs).unwrap()
            }
            other => panic!("unknown kind {other}"),
        };
        assert_eq!(got, want, "{r:?}");
    }
}

struct DirReader(PathBuf);

impl kiln_format::derivation::DerivationReader for DirReader {
    fn read_derivation(
        &self,
        sd: &StoreDir,
        p: &StorePath,
    ) -> Result<Derivation, kiln_format::Error> {
        let text = std::fs::read(self.0.join(p.base_name())).unwrap();
        Derivation::parse(sd, p.derivation_name().unwrap(), &text)
    }
}

fn drv_dirs() -> Vec<(StoreDir, PathBuf)> {
    vec![
        (
            StoreDir::new("/nix/store").unwrap(),
            fixture("drv/_nix_store"),
        ),
        (
            StoreDir::new("/gnu/store").unwrap(),
            fixture("drv/_gnu_store"),
        ),
    ]
}

#[test]
fn derivations_reprint_identically_and_outputs_check() {
    for (sd, dir) in drv_dirs() {
        let mut hasher = DerivationHasher::new(DirReader(dir.clone()));
        let mut n = 0;
        for ent in std::fs::read_dir(&dir).unwrap() {
            let p = ent.unwrap().path();
            let base = p.file_name().unwrap().to_str().unwrap().to_string();
            if !base.ends_with(".drv") {
                continue;
            }
            n += 1;
            let sp = StorePath::from_base_name(&base).unwrap();
            let text = std::fs::read(&p).unwrap();
            let drv = Derivation::parse(&sd, sp.derivation_name().unwrap(), &text).unwrap();
            assert_eq!(drv.to_aterm(&sd), text, "{base}: re-print");
            drv.check_output_paths(&sd, &mut hasher)
                .unwrap_or_else(|e| panic!("{base}: {e}"));
            assert_eq!(drv.drv_path(&sd).unwrap(), sp, "{base}: .drv path");
            // Rebuilding from scratch (outputs cleared) gives the same derivation.
            let mut blank = drv.clone();
            for o in blank.outputs.values_mut() {
                o.path = None;
            }
            for name in drv.outputs.keys() {
                blank.env.insert(name.clone(), String::new());
            }
            assert_eq!(
                blank.finalize(&sd, &mut hasher).unwrap(),
                drv,
                "{base}: finalize"
            );
            let json_path = dir.join(format!("{base}.json"));
            if json_path.exists() {
                let mut top = serde_json::Map::new();
                top.insert(sd.display(&sp), drv.to_json(&sd));
                let printed =
                    serde_json::to_string_pretty(&serde_json::Value::Object(top)).unwrap() + "\n";
                assert_eq!(
                    printed,
                    std::fs::read_to_string(&json_path).unwrap(),
                    "{base}: show-derivation JSON"
                );
            }
        }
        assert!(
            n >= 20,
            "expected the generated derivations in {}",
            dir.display()
        );
    }
}

#[test]
fn fixed_output_inputs_hash_modulo_their_builder() {
    // `dep` and `depB` differ only in how their fixed-output input is built: different .drv
    // paths, same output paths.
    for (sd, dir) in drv_dirs() {
        let top: BTreeMap<String, String> = tsv(&format!(
            "drv/{}/top.tsv",
            dir.file_name().unwrap().to_str().unwrap()
        ))
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
        let read = |a: &str| {
            let p = sd.parse_path(&top[a]).unwrap();
            Derivation::parse(
                &sd,
                p.derivation_name().unwrap(),
                &std::fs::read(dir.join(p.base_name())).unwrap(),
            )
            .unwrap()
        };
        assert_ne!(top["dep"], top["depB"]);
        assert_eq!(read("dep").outputs, read("depB").outputs);
    }
}

#[test]
fn tampered_derivations_fail_the_check() {
    let (sd, dir) = drv_dirs().remove(0);
    let mut hasher = DerivationHasher::new(DirReader(dir.clone()));
    let top = tsv("drv/_nix_store/top.tsv");
    let dep = top.iter().find(|r| r[0] == "dep").unwrap();
    let sp = sd.parse_path(&dep[1]).unwrap();
    let mut drv = Derivation::parse(
        &sd,
        "dep",
        &std::fs::read(dir.join(sp.base_name())).unwrap(),
    )
    .unwrap();
    drv.env.insert("extra".into(), "changes the hash".into());
    let e = drv
        .check_output_paths(&sd, &mut hasher)
        .unwrap_err()
        .to_string();
    assert!(e.contains("incorrect output 'out'"), "{e}");
    // A fixed output declared at the wrong path.
    let fixed = top.iter().find(|r| r[0] == "fixedRec256").unwrap();
    let fp = sd.parse_path(&fixed[1]).unwrap();
    let mut f = Derivation::parse(
        &sd,
        "fixed-rec-sha256",
        &std::fs::read(dir.join(fp.base_name())).unwrap(),
    )
    .unwrap();
    f.outputs.get_mut("out").unwrap().path = Some(sp);
    assert!(f.check_output_paths(&sd, &mut hasher).is_err());
}

#[test]
fn canonical_restore_sets_store_metadata_in_one_pass() {
    use std::os::unix::fs::MetadataExt;
    let bytes = read_fixture("nar/dir.nar");
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    let opts = nar::RestoreOptions {
        canonical: true,
        ..Default::default()
    };
    nar::restore_into(&t, bytes.as_slice(), opts).unwrap();
    let mut seen = 0;
    let mut stack = vec![t.clone()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        seen += 1;
        assert_eq!(m.mtime(), 1, "{}", p.display());
        let ft = m.file_type();
        if ft.is_dir() {
            assert_eq!(m.mode() & 0o7777, 0o555, "{}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if ft.is_file() {
            let mode = m.mode() & 0o7777;
            assert!(mode == 0o444 || mode == 0o555, "{}: {mode:o}", p.display());
        }
    }
    assert!(seen > 10);
    assert_eq!(nar::dump_to_vec(&t).unwrap(), bytes);
    // Clean up a read-only tree.
    let _ = std::process::Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(&t)
        .status();
}
