//! Replays every committed fuzz crash (`fuzz/artifacts/<target>/`) and seed
//! (`fuzz/seeds/<target>/`) through the fuzz targets' invariants, so a crash once found stays
//! fixed without running a fuzzer.

use kiln_format::fuzzing;
use kiln_testkit::workspace_root;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for kind in ["artifacts", "seeds"] {
        let dir = workspace_root().join("fuzz").join(kind).join(target);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd {
            let p = e.expect("dir entry").path();
            v.push((
                p.display().to_string(),
                std::fs::read(&p).expect("read input"),
            ));
        }
    }
    v
}

#[test]
fn nar_inputs() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let all = inputs("nar");
    assert!(!all.is_empty(), "no NAR seeds found");
    for (name, data) in all {
        eprintln!("{name}");
        fuzzing::check_nar(&data, &scratch.path().join("s"));
    }
}

#[test]
fn aterm_inputs() {
    let all = inputs("aterm");
    assert!(all.len() > 5, "no ATerm seeds found");
    for (name, data) in all {
        eprintln!("{name}");
        fuzzing::check_aterm(&data);
    }
}

#[test]
fn narinfo_inputs() {
    let all = inputs("narinfo");
    assert!(all.len() > 1, "no narinfo seeds or artifacts found");
    for (name, data) in all {
        eprintln!("{name}");
        fuzzing::check_narinfo(&data);
    }
}
