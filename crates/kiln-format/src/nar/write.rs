//! Low-level NAR token writing.

use std::io::{self, Write};

const ZEROS: [u8; 8] = [0; 8];

/// Writes the zero padding after `len` bytes of data.
pub fn write_padding(out: &mut impl Write, len: u64) -> io::Result<()> {
    let pad = (8 - (len % 8) as usize) % 8;
    out.write_all(&ZEROS[..pad])
}

/// Writes a NAR string: length, bytes, padding.
pub fn write_str(out: &mut impl Write, s: &[u8]) -> io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s)?;
    write_padding(out, s.len() as u64)
}

/// Emits a NAR node by node. The caller is responsible for ordering directory entries.
#[derive(Debug)]
pub struct NarWriter<W> {
    out: W,
}

impl<W: Write> NarWriter<W> {
    /// Writes the magic.
    pub fn new(mut out: W) -> io::Result<Self> {
        write_str(&mut out, super::MAGIC.as_bytes())?;
        Ok(NarWriter { out })
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// A regular file whose contents the caller writes next with [`Self::file_data`] and
    /// finishes with [`Self::file_end`].
    pub fn file_start(&mut self, executable: bool, size: u64) -> io::Result<()> {
        self.token(b"(")?;
        self.token(b"type")?;
        self.token(b"regular")?;
        if executable {
            self.token(b"executable")?;
            self.token(b"")?;
        }
        self.token(b"contents")?;
        self.out.write_all(&size.to_le_bytes())
    }

    pub fn file_data(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)
    }

    pub fn file_end(&mut self, size: u64) -> io::Result<()> {
        write_padding(&mut self.out, size)?;
        self.token(b")")
    }

    /// A whole regular file.
    pub fn file(&mut self, executable: bool, contents: &[u8]) -> io::Result<()> {
        self.file_start(executable, contents.len() as u64)?;
        self.file_data(contents)?;
        self.file_end(contents.len() as u64)
    }

    pub fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.token(b"(")?;
        self.token(b"type")?;
        self.token(b"symlink")?;
        self.token(b"target")?;
        self.token(target)?;
        self.token(b")")
    }

    pub fn directory_start(&mut self) -> io::Result<()> {
        self.token(b"(")?;
        self.token(b"type")?;
        self.token(b"directory")
    }

    /// Opens an entry; the node follows, then [`Self::entry_end`].
    pub fn entry_start(&mut self, name: &[u8]) -> io::Result<()> {
        self.token(b"entry")?;
        self.token(b"(")?;
        self.token(b"name")?;
        self.token(name)?;
        self.token(b"node")
    }

    pub fn entry_end(&mut self) -> io::Result<()> {
        self.token(b")")
    }

    pub fn directory_end(&mut self) -> io::Result<()> {
        self.token(b")")
    }

    fn token(&mut self, s: &[u8]) -> io::Result<()> {
        write_str(&mut self.out, s)
    }
}
