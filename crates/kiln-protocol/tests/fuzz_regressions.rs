//! Replays the protocol fuzz target's committed seeds and crashes (`fuzz/seeds/protocol`,
//! `fuzz/artifacts/protocol`) through its invariants on every test run.

use kiln_testkit::workspace_root;

#[test]
fn protocol_inputs() {
    let mut n = 0;
    for kind in ["seeds", "artifacts"] {
        let dir = workspace_root().join("fuzz").join(kind).join("protocol");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd {
            let p = e.expect("dir entry").path();
            let data = std::fs::read(&p).expect("read input");
            eprintln!("{}", p.display());
            kiln_protocol::fuzzing::check_requests(&data);
            kiln_protocol::fuzzing::check_connection(&data);
            n += 1;
        }
    }
    assert!(n >= 6, "no protocol seeds found");
}
