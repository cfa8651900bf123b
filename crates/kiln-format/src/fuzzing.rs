//! Invariants checked by the fuzz targets (`fuzz/`) and replayed on every committed crash
//! artifact by `tests/fuzz_regressions.rs`. Each function panics when an invariant breaks;
//! that is their purpose, and why they are hidden from the documented API.

use crate::nar::{self, tree::Node};
use crate::narinfo::NarInfo;
use crate::{Derivation, StoreDir};

/// The NAR parser and restorer: no panic; what parses prints back to the archive itself;
/// restoring never creates anything outside its target.
pub fn check_nar(data: &[u8], scratch: &std::path::Path) {
    if let Ok(tree) = Node::from_nar(data) {
        let again = tree.to_nar();
        assert_eq!(
            &data[..again.len()],
            again.as_slice(),
            "parsed NAR does not print back"
        );
    }
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).expect("create scratch dir");
    let _ = nar::restore(&scratch.join("t"), data);
    for e in std::fs::read_dir(scratch).expect("list scratch dir") {
        let name = e.expect("entry").file_name();
        assert_eq!(name, "t", "restore created {name:?} outside its target");
    }
    let _ = std::fs::remove_dir_all(scratch);
}

/// The `.drv` parser: no panic; what parses re-prints to text that parses to the same
/// derivation. The platform prints unescaped (as Nix does), so a platform holding `"` or `\`
/// is exempt.
pub fn check_aterm(data: &[u8]) {
    let sd = StoreDir::new("/nix/store").expect("valid store dir");
    if let Ok(drv) = Derivation::parse(&sd, "fuzz", data) {
        let text = drv.to_aterm(&sd);
        let _ = drv.to_json(&sd);
        if drv.platform.contains(['"', '\\']) {
            return;
        }
        let again = Derivation::parse(&sd, "fuzz", &text).expect("printed derivation parses");
        assert_eq!(again, drv, "derivation changed through print + parse");
        assert_eq!(again.to_aterm(&sd), text);
    }
}

/// The narinfo parser: no panic; what parses prints and re-parses equal.
pub fn check_narinfo(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sd = StoreDir::new("/nix/store").expect("valid store dir");
    if let Ok(ni) = NarInfo::parse(&sd, text, "fuzz") {
        let printed = ni.to_text(&sd);
        let again = NarInfo::parse(&sd, &printed, "fuzz").expect("printed narinfo parses");
        assert_eq!(again, ni, "narinfo changed through print + parse");
    }
}
