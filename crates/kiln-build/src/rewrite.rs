//! Hash rewriting: equal-length replacement of store-path hash parts in streams and trees.
//!
//! A build that must not overwrite valid outputs (no sandbox, `--check`, partially valid
//! outputs) writes to redirected paths whose hash part differs; afterwards the contents are
//! rewritten back. Replacements keep lengths, so NAR framing is unaffected and the rewrite
//! streams through a dump/restore pair without holding the tree in memory.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Replaces 32-byte keys by 32-byte values in everything written through it.
pub struct Replacer<W: Write> {
    out: W,
    rewrites: Vec<([u8; 32], [u8; 32])>,
    carry: Vec<u8>,
}

impl<W: Write> std::fmt::Debug for Replacer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replacer({} rewrites)", self.rewrites.len())
    }
}

impl<W: Write> Replacer<W> {
    pub fn new(out: W, rewrites: &BTreeMap<String, String>) -> Self {
        let rewrites = rewrites
            .iter()
            .filter_map(|(k, v)| {
                Some((k.as_bytes().try_into().ok()?, v.as_bytes().try_into().ok()?))
            })
            .collect();
        Replacer {
            out,
            rewrites,
            carry: Vec::new(),
        }
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        let rest = std::mem::take(&mut self.carry);
        self.out.write_all(&rest)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Replaces every occurrence in place.
pub fn rewrite_in_place(buf: &mut [u8], rewrites: &[([u8; 32], [u8; 32])]) {
    for (from, to) in rewrites {
        let finder = memchr::memmem::Finder::new(from);
        let mut start = 0;
        while let Some(i) = finder.find(&buf[start..]) {
            buf[start + i..start + i + 32].copy_from_slice(to);
            start += i + 32;
        }
    }
}

impl<W: Write> Write for Replacer<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.carry.extend_from_slice(data);
        rewrite_in_place(&mut self.carry, &self.rewrites);
        // The last 31 bytes may start a match completed by the next write.
        if self.carry.len() > 31 {
            let emit = self.carry.len() - 31;
            self.out.write_all(&self.carry[..emit])?;
            self.carry.drain(..emit);
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Rewrites a string.
pub fn rewrite_str(s: &str, rewrites: &BTreeMap<String, String>) -> String {
    let mut out = s.to_string();
    for (from, to) in rewrites {
        out = out.replace(from.as_str(), to);
    }
    out
}

/// Copies the tree at `src` to `dst` (which must not exist) through a NAR, applying
/// `rewrites`, with canonical store metadata. With no rewrites this makes a fresh copy:
/// new inodes that no descriptor held by anyone else can point to (CVE-2024-27297).
pub fn copy_tree(src: &Path, dst: &Path, rewrites: &BTreeMap<String, String>) -> Result<()> {
    let (mut reader, writer) =
        std::io::pipe().map_err(|e| Error::io(src, "create a pipe for", e))?;
    std::thread::scope(|s| -> Result<()> {
        let dumper = s.spawn(move || -> Result<()> {
            let w = std::io::BufWriter::with_capacity(256 * 1024, writer);
            let mut r = Replacer::new(w, rewrites);
            kiln_format::nar::dump(src, &mut r)?;
            r.finish().map_err(|e| Error::io(src, "copy", e))?;
            Ok(())
        });
        let opts = kiln_format::nar::RestoreOptions {
            canonical: true,
            ..Default::default()
        };
        let restored = kiln_format::nar::restore_into(dst, &mut reader, opts);
        drop(reader);
        let dumped = dumper
            .join()
            .map_err(|_| Error::Invalid("copy thread panicked".into()))?;
        dumped?;
        restored?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_across_write_boundaries() {
        let a = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz";
        let b = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
        let map: BTreeMap<String, String> = [(a.to_string(), b.to_string())].into();
        let text = format!("x/{a}-out y {a}");
        for cut in 0..text.len() {
            let mut r = Replacer::new(Vec::new(), &map);
            r.write_all(&text.as_bytes()[..cut]).unwrap();
            r.write_all(&text.as_bytes()[cut..]).unwrap();
            assert_eq!(
                String::from_utf8(r.finish().unwrap()).unwrap(),
                format!("x/{b}-out y {b}"),
                "cut {cut}"
            );
        }
    }
}
