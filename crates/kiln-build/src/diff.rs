//! kiln's file-level report of how a rebuilt output differs from the valid one (`--check`):
//! which files were added or removed, changed type or mode, and for regular files their
//! sizes and the first byte that differs; symbolic links by target. It is appended to the
//! derivation's build log, so `kiln log DRV` shows it (the `diff-hook` still runs too).
//!
//! Both trees are walked without following symbolic links, to a bounded depth and number of
//! entries: the new tree is the builder's, and it may be shaped to make a walk costly.

use std::collections::BTreeMap;
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Entries looked at per tree, at most.
const MAX_ENTRIES: usize = 100_000;
/// Directory depth followed, at most.
const MAX_DEPTH: usize = 256;
/// Lines of the report, at most.
const MAX_LINES: usize = 200;

#[derive(Debug)]
enum Kind {
    File { size: u64, exec: bool },
    Dir,
    Link(PathBuf),
    Other,
}

fn kind_of(p: &Path, m: &Metadata) -> Kind {
    let t = m.file_type();
    if t.is_file() {
        Kind::File {
            size: m.len(),
            exec: m.permissions().mode() & 0o111 != 0,
        }
    } else if t.is_dir() {
        Kind::Dir
    } else if t.is_symlink() {
        Kind::Link(std::fs::read_link(p).unwrap_or_default())
    } else {
        Kind::Other
    }
}

/// Every entry below `root` (relative name → kind), `root` itself as "".
fn walk(root: &Path) -> (BTreeMap<String, Kind>, bool) {
    let mut out = BTreeMap::new();
    let mut cut = false;
    let mut todo = vec![(root.to_path_buf(), String::new(), 0usize)];
    while let Some((p, rel, depth)) = todo.pop() {
        if out.len() >= MAX_ENTRIES {
            cut = true;
            break;
        }
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let k = kind_of(&p, &m);
        if matches!(k, Kind::Dir) {
            if depth >= MAX_DEPTH {
                cut = true;
            } else if let Ok(rd) = std::fs::read_dir(&p) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let r = if rel.is_empty() {
                        name
                    } else {
                        format!("{rel}/{name}")
                    };
                    todo.push((e.path(), r, depth + 1));
                }
            }
        }
        out.insert(rel, k);
    }
    (out, cut)
}

/// The offset of the first byte where two files differ, if they do.
fn first_difference(a: &Path, b: &Path) -> std::io::Result<Option<u64>> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(off + i as u64));
        }
        if na != nb {
            return Ok(Some(off + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        off += n as u64;
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn shown(rel: &str) -> &str {
    if rel.is_empty() {
        "(the output itself)"
    } else {
        rel
    }
}

/// How `new` differs from `old`, a line per difference (empty when they are the same).
pub fn report(old: &Path, new: &Path) -> Vec<String> {
    let ((a, cut_a), (b, cut_b)) = (walk(old), walk(new));
    let mut lines = Vec::new();
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for rel in names {
        if lines.len() >= MAX_LINES {
            lines.push(format!(
                "… (more differences; at most {MAX_LINES} are listed)"
            ));
            break;
        }
        let line = match (a.get(rel), b.get(rel)) {
            (Some(_), None) => Some("removed".to_string()),
            (None, Some(_)) => Some("added".to_string()),
            (Some(x), Some(y)) => match (x, y) {
                (Kind::Dir, Kind::Dir) | (Kind::Other, Kind::Other) => None,
                (Kind::Link(t1), Kind::Link(t2)) => (t1 != t2).then(|| {
                    format!(
                        "symbolic link to '{}', now to '{}'",
                        t1.display(),
                        t2.display()
                    )
                }),
                (Kind::File { size: s1, exec: e1 }, Kind::File { size: s2, exec: e2 }) => {
                    let mut what = Vec::new();
                    if e1 != e2 {
                        what.push(
                            if *e2 {
                                "now executable"
                            } else {
                                "no longer executable"
                            }
                            .to_string(),
                        );
                    }
                    if s1 != s2 {
                        what.push(format!("{s1} bytes, now {s2}"));
                    }
                    let at = |root: &Path| {
                        if rel.is_empty() {
                            root.to_path_buf()
                        } else {
                            root.join(rel)
                        }
                    };
                    let (pa, pb) = (at(old), at(new));
                    match first_difference(&pa, &pb) {
                        Ok(Some(off)) => what.push(format!("first difference at byte {off}")),
                        Ok(None) => {}
                        Err(e) => what.push(format!("cannot compare: {e}")),
                    }
                    (!what.is_empty()).then(|| what.join(", "))
                }
                (x, y) => Some(format!("was {}, now {}", name(x), name(y))),
            },
            (None, None) => None,
        };
        if let Some(l) = line {
            lines.push(format!("  {}: {l}", shown(rel)));
        }
    }
    if cut_a || cut_b {
        lines.push(format!(
            "  (a tree has more than {MAX_ENTRIES} entries or {MAX_DEPTH} levels: the rest is not compared)"
        ));
    }
    lines
}

fn name(k: &Kind) -> &'static str {
    match k {
        Kind::File { .. } => "a file",
        Kind::Dir => "a directory",
        Kind::Link(_) => "a symbolic link",
        Kind::Other => "something else",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_by_kind() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d.join("sub")).unwrap();
            std::fs::write(d.join("same"), "same\n").unwrap();
        }
        std::fs::write(a.join("t"), "time 1234\n").unwrap();
        std::fs::write(b.join("t"), "time 1299\n").unwrap();
        std::fs::write(a.join("grown"), "ab").unwrap();
        std::fs::write(b.join("grown"), "abc").unwrap();
        std::fs::write(a.join("gone"), "x").unwrap();
        std::fs::write(b.join("sub/new"), "y").unwrap();
        std::os::unix::fs::symlink("same", a.join("l")).unwrap();
        std::os::unix::fs::symlink("t", b.join("l")).unwrap();
        std::fs::write(a.join("run"), "#!").unwrap();
        std::fs::write(b.join("run"), "#!").unwrap();
        std::fs::set_permissions(b.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let r = report(&a, &b);
        // A single file as the output.
        let (fa, fb) = (t.path().join("fa"), t.path().join("fb"));
        std::fs::write(&fa, "abc").unwrap();
        std::fs::write(&fb, "abd").unwrap();
        assert_eq!(
            report(&fa, &fb),
            vec!["  (the output itself): first difference at byte 2"]
        );
        assert_eq!(
            r,
            vec![
                "  gone: removed",
                "  grown: 2 bytes, now 3, first difference at byte 2",
                "  l: symbolic link to 'same', now to 't'",
                "  run: now executable",
                "  sub/new: added",
                "  t: first difference at byte 7",
            ]
        );
        assert!(report(&a, &a).is_empty());
    }
}
