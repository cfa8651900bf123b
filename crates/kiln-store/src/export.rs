//! The `nix-store --export` / `--import` format, so closures move between kiln, Nix and Guix.
//!
//! ```text
//! per path:  u64 1 · NAR · u64 0x4558494e ("NIXE") · path · refs · deriver ("" = none) · u64 0
//! end:       u64 0
//! ```
//!
//! Importing streams each NAR straight into a temporary store path (never into memory),
//! then moves it into place and registers it with the hash computed on the way.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};

use kiln_format::hash::HashSink;
use kiln_format::{nar, wire, HashAlgo, StorePath, ValidPathInfo};

use crate::error::{Error, Result};
use crate::store::LocalStore;

/// The marker after each NAR.
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Longest path, deriver or signature string accepted in an export stream.
const MAX_STR: usize = 4096;
/// Most references one path may list.
const MAX_REFS: usize = 1 << 20;

struct Tee<'a, W: Write> {
    out: &'a mut W,
    hash: HashSink,
}

impl<W: Write> Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Orders `paths` so each comes after the paths of the set it refers to, in exactly the
/// order Nix uses for `--export` and `-qR`: a depth-first post-order, starting points and
/// references taken in store-path order.
pub fn topo_sort(store: &LocalStore, paths: &BTreeSet<StorePath>) -> Result<Vec<StorePath>> {
    let mut refs: HashMap<StorePath, Vec<StorePath>> = HashMap::new();
    for p in paths {
        let info = store.path_info(p)?;
        // BTreeSet iteration: references in store-path order.
        refs.insert(
            p.clone(),
            info.references
                .into_iter()
                .filter(|r| r != p && paths.contains(r))
                .collect(),
        );
    }
    let mut out = Vec::with_capacity(paths.len());
    let mut visited: BTreeSet<&StorePath> = BTreeSet::new();
    for start in paths {
        if !visited.insert(start) {
            continue;
        }
        let mut stack: Vec<(&StorePath, usize)> = vec![(start, 0)];
        while let Some((p, next)) = stack.last_mut() {
            let children = &refs[*p];
            if *next < children.len() {
                let c = &children[*next];
                *next += 1;
                if visited.insert(c) {
                    stack.push((c, 0));
                }
            } else {
                out.push((*p).clone());
                stack.pop();
            }
        }
    }
    Ok(out)
}

pub use crate::store::topo_order;

/// Writes the export stream of `paths` (dependencies first).
pub fn export_paths(
    store: &LocalStore,
    paths: &BTreeSet<StorePath>,
    out: &mut impl Write,
) -> Result<()> {
    let werr = |e: std::io::Error| Error::io("<export stream>", "write", e);
    for p in topo_sort(store, paths)? {
        wire::write_u64(out, 1).map_err(werr)?;
        export_path(store, &p, out)?;
    }
    wire::write_u64(out, 0).map_err(werr)?;
    out.flush().map_err(werr)
}

/// Writes one path's entry of the export stream, without the `1` before it (what the
/// worker protocol's `ExportPath` sends): its NAR (checked against the recorded hash),
/// the export magic, the path, its references, its deriver and `0` (no signature).
pub fn export_path(store: &LocalStore, p: &StorePath, out: &mut impl Write) -> Result<()> {
    let werr = |e: std::io::Error| Error::io("<export stream>", "write", e);
    let info = store.path_info(p)?;
    let mut tee = Tee {
        out,
        hash: HashSink::new(HashAlgo::Sha256),
    };
    nar::dump(&store.real_path(p), &mut tee)?;
    let (h, _) = tee.hash.finish();
    if h != info.nar_hash {
        return Err(Error::HashMismatch {
            path: store.print(p),
            expected: info.nar_hash.to_string(),
            actual: h.to_string(),
        });
    }
    wire::write_u64(out, EXPORT_MAGIC).map_err(werr)?;
    wire::write_bytes(out, store.print(p).as_bytes()).map_err(werr)?;
    let refs: Vec<String> = info.references.iter().map(|r| store.print(r)).collect();
    wire::write_strings(out, refs.iter().map(String::as_str)).map_err(werr)?;
    let deriver = info
        .deriver
        .as_ref()
        .map(|d| store.print(d))
        .unwrap_or_default();
    wire::write_bytes(out, deriver.as_bytes()).map_err(werr)?;
    wire::write_u64(out, 0).map_err(werr)
}

/// Reads an export stream, adding every path; returns them in stream order.
pub fn import_paths(store: &LocalStore, input: &mut dyn Read) -> Result<Vec<StorePath>> {
    let sd = store.store_dir().clone();
    let mut imported = Vec::new();
    loop {
        match wire::read_u64(input, "export marker")? {
            0 => return Ok(imported),
            1 => {}
            n => {
                return Err(Error::Invalid(format!(
                    "input doesn't look like something created by 'nix-store --export' (marker {n})"
                )))
            }
        }
        let (tmp, nar_hash, nar_size) = store.restore_temp(input)?;
        if wire::read_u64(input, "export magic")? != EXPORT_MAGIC {
            return Err(Error::Invalid(
                "Nix archive cannot be imported; wrong format".into(),
            ));
        }
        let path = sd.parse_path(&wire::read_string(input, MAX_STR, "store path")?)?;
        let refs = wire::read_strings(input, MAX_REFS, MAX_STR, "references")?;
        let deriver = wire::read_string(input, MAX_STR, "deriver")?;
        if wire::read_u64(input, "signature flag")? == 1 {
            // Legacy signatures (Guix's canonical s-expressions) are not used.
            let _ = wire::read_bytes(input, 1 << 16, "signature")?;
        }
        let mut info = ValidPathInfo::new(path.clone(), nar_hash, nar_size);
        for r in refs {
            info.references.insert(sd.parse_path(&r)?);
        }
        if !deriver.is_empty() {
            info.deriver = Some(sd.parse_path(&deriver)?);
        }
        for r in &info.references {
            if r != &path && !store.is_valid(r)? {
                return Err(Error::NotValid(format!(
                    "{} (a reference of imported path '{}')",
                    sd.display(r),
                    sd.display(&path)
                )));
            }
        }
        store.install_temp(tmp, info)?;
        imported.push(path);
    }
}
