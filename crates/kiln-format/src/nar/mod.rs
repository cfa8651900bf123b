//! NAR (Nix ARchive): the canonical serialisation of a file system object.
//!
//! ```text
//! nar       = str("nix-archive-1") node
//! node      = str("(") str("type") body str(")")
//! body      = str("regular") [str("executable") str("")] str("contents") contents
//!           | str("symlink") str("target") str(target)
//!           | str("directory") { str("entry") str("(") str("name") str(name) str("node") node str(")") }
//! str(s)    = u64le(len(s)) s zero-padding-to-8
//! ```
//!
//! * [`parse`] is a streaming parser with hard bounds (name, target, depth, tag lengths)
//!   checked before anything is allocated; it drives a [`NarSink`].
//! * [`restore`] is the sink that writes a tree to disk through directory file descriptors,
//!   creating every node exclusively and never following symlinks.
//! * [`dump`] writes the NAR of a path, walking it through directory file descriptors.
//! * [`tree`] is an in-memory tree for tests and small archives.

mod dump;
mod parse;
mod restore;
pub mod tree;
mod write;

pub use dump::{dump, dump_to_vec};
pub use parse::{expect_eof, parse, Limits, NarSink, NarStats};
pub use restore::{restore, restore_into, RestoreOptions};
pub use write::{write_padding, write_str, NarWriter};

/// The magic string every NAR starts with.
pub const MAGIC: &str = "nix-archive-1";

/// A reader that hashes and counts every byte it hands out: the NAR hash and NAR size of a
/// stream computed while it is being parsed or restored, in the same pass.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    sink: crate::hash::HashSink,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R, algo: crate::hash::HashAlgo) -> Self {
        HashingReader {
            inner,
            sink: crate::hash::HashSink::new(algo),
        }
    }
    /// Bytes read so far.
    pub fn size(&self) -> u64 {
        self.sink.size()
    }
    /// The hash and size of everything read.
    pub fn finish(self) -> (crate::hash::Hash, u64) {
        self.sink.finish()
    }
    /// The wrapped reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.update(&buf[..n]);
        Ok(n)
    }
}
