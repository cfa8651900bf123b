//! Typed, bounded reading and writing of protocol values on a connection.
//!
//! Every length a peer sends is checked against a limit before anything is allocated, and
//! strings grow only as their bytes arrive. Errors name the field and the byte offset on the
//! connection where it started.

use std::collections::BTreeSet;
use std::io::{self, BufRead, Read, Write};

use kiln_format::wire as fw;
use kiln_format::{StoreDir, StorePath};

use crate::Error;

/// Longest string that names something (a path, a setting, a hash, an output name).
pub const MAX_NAME: usize = 64 * 1024;
/// Longest setting value, error message, log line or `.drv` text sent inline.
pub const MAX_TEXT: usize = 256 * 1024 * 1024;
/// Most items in one list (paths, settings, outputs).
pub const MAX_ITEMS: usize = 1 << 24;
/// Feature lists in the handshake: far more than any peer names, far less than harm.
pub const MAX_FEATURES: usize = 1024;
/// A feature's name.
pub const MAX_FEATURE_NAME: usize = 1024;

/// The reading side of a connection: buffered, counting bytes for error messages.
#[derive(Debug)]
pub struct WireReader<R> {
    inner: R,
    pos: u64,
}

impl<R: BufRead> WireReader<R> {
    pub fn new(inner: R) -> Self {
        WireReader { inner, pos: 0 }
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    fn bad(&self, start: u64, e: kiln_format::Error) -> Error {
        Error::Malformed {
            offset: start,
            message: e.to_string(),
        }
    }

    /// Reads a u64; `Ok(None)` at a clean end of stream (between operations).
    pub fn u64_or_eof(&mut self, what: &str) -> Result<Option<u64>, Error> {
        let start = self.pos;
        if self.inner.fill_buf().map_err(Error::Io)?.is_empty() {
            return Ok(None);
        }
        fw::read_u64(self, what)
            .map(Some)
            .map_err(|e| self.bad(start, e))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, Error> {
        let start = self.pos;
        fw::read_u64(self, what).map_err(|e| self.bad(start, e))
    }

    /// A boolean; like Nix, any non-zero value is true.
    pub fn bool(&mut self, what: &str) -> Result<bool, Error> {
        Ok(self.u64(what)? != 0)
    }

    pub fn blob(&mut self, max: usize, what: &str) -> Result<Vec<u8>, Error> {
        let start = self.pos;
        fw::read_bytes(self, max, what).map_err(|e| self.bad(start, e))
    }

    pub fn string(&mut self, max: usize, what: &str) -> Result<String, Error> {
        let start = self.pos;
        fw::read_string(self, max, what).map_err(|e| self.bad(start, e))
    }

    pub fn strings(&mut self, what: &str) -> Result<Vec<String>, Error> {
        let start = self.pos;
        fw::read_strings(self, MAX_ITEMS, MAX_NAME, what).map_err(|e| self.bad(start, e))
    }

    /// At most `max_items` strings of at most `max_len` bytes each.
    pub fn strings_bounded(
        &mut self,
        max_items: usize,
        max_len: usize,
        what: &str,
    ) -> Result<Vec<String>, Error> {
        let start = self.pos;
        fw::read_strings(self, max_items, max_len, what).map_err(|e| self.bad(start, e))
    }

    /// A full store path in `sd`.
    pub fn path(&mut self, sd: &StoreDir, what: &str) -> Result<StorePath, Error> {
        let start = self.pos;
        let s = self.string(MAX_NAME, what)?;
        sd.parse_path(&s).map_err(|e| self.bad(start, e))
    }

    /// A store path or `""` for none.
    pub fn opt_path(&mut self, sd: &StoreDir, what: &str) -> Result<Option<StorePath>, Error> {
        let start = self.pos;
        let s = self.string(MAX_NAME, what)?;
        if s.is_empty() {
            return Ok(None);
        }
        sd.parse_path(&s).map(Some).map_err(|e| self.bad(start, e))
    }

    pub fn paths(&mut self, sd: &StoreDir, what: &str) -> Result<BTreeSet<StorePath>, Error> {
        let start = self.pos;
        let n = self.u64(what)?;
        if n > MAX_ITEMS as u64 {
            return Err(Error::Malformed {
                offset: start,
                message: format!("{what}: {n} items exceed the limit of {MAX_ITEMS}"),
            });
        }
        let mut out = BTreeSet::new();
        for _ in 0..n {
            out.insert(self.path(sd, what)?);
        }
        Ok(out)
    }

    /// Count-prefixed items read by `item`.
    pub fn list<T>(
        &mut self,
        what: &str,
        mut item: impl FnMut(&mut Self) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        let start = self.pos;
        let n = self.u64(what)?;
        if n > MAX_ITEMS as u64 {
            return Err(Error::Malformed {
                offset: start,
                message: format!("{what}: {n} items exceed the limit of {MAX_ITEMS}"),
            });
        }
        let mut out = Vec::with_capacity((n as usize).min(1024));
        for _ in 0..n {
            out.push(item(self)?);
        }
        Ok(out)
    }

    /// An error at the current position (for checks of values just read).
    pub fn invalid(&self, message: impl Into<String>) -> Error {
        Error::Malformed {
            offset: self.pos,
            message: message.into(),
        }
    }
}

impl<R: BufRead> Read for WireReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for WireReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.pos += amt as u64;
        self.inner.consume(amt)
    }
}

/// Writing helpers (infallible formats; only I/O can fail).
pub trait WireWrite: Write {
    fn u64(&mut self, v: u64) -> io::Result<()> {
        fw::write_u64(self, v)
    }
    fn bool(&mut self, v: bool) -> io::Result<()> {
        fw::write_u64(self, v as u64)
    }
    fn str(&mut self, s: &str) -> io::Result<()> {
        fw::write_bytes(self, s.as_bytes())
    }
    fn bytes(&mut self, s: &[u8]) -> io::Result<()> {
        fw::write_bytes(self, s)
    }
    fn strs<'a, I: IntoIterator<Item = &'a str>>(&mut self, items: I) -> io::Result<()>
    where
        I::IntoIter: ExactSizeIterator,
    {
        fw::write_strings(self, items.into_iter())
    }
    fn path(&mut self, sd: &StoreDir, p: &StorePath) -> io::Result<()> {
        self.str(&sd.display(p))
    }
    fn opt_path(&mut self, sd: &StoreDir, p: Option<&StorePath>) -> io::Result<()> {
        match p {
            Some(p) => self.path(sd, p),
            None => self.str(""),
        }
    }
    fn paths<'a, I: IntoIterator<Item = &'a StorePath>>(
        &mut self,
        sd: &StoreDir,
        items: I,
    ) -> io::Result<()>
    where
        I::IntoIter: ExactSizeIterator,
    {
        let it = items.into_iter();
        self.u64(it.len() as u64)?;
        for p in it {
            self.path(sd, p)?;
        }
        Ok(())
    }
}

impl<W: Write + ?Sized> WireWrite for W {}

/// Reads a framed stream (`u64 length` + that many bytes, no padding, …, `u64 0`) as one
/// byte stream. Frame lengths are the peer's claims: they bound reads, never allocations.
#[derive(Debug)]
pub struct FramedReader<'a, R> {
    inner: &'a mut WireReader<R>,
    left: u64,
    done: bool,
}

impl<'a, R: BufRead> FramedReader<'a, R> {
    pub fn new(inner: &'a mut WireReader<R>) -> Self {
        FramedReader {
            inner,
            left: 0,
            done: false,
        }
    }

    /// Whether the terminating empty frame has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Reads and discards the rest of the stream, so the connection stays in step.
    pub fn drain(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        while self.read(&mut buf)? > 0 {}
        Ok(())
    }
}

impl<R: BufRead> Read for FramedReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.left == 0 {
            if self.done {
                return Ok(0);
            }
            let n = self
                .inner
                .u64("frame length")
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if n == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = n;
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a frame",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Writes a framed stream: buffered into frames of up to 32 KiB; `finish` writes the
/// terminating empty frame.
#[derive(Debug)]
pub struct FramedWriter<'a, W: Write> {
    inner: &'a mut W,
    buf: Vec<u8>,
}

const FRAME: usize = 32 * 1024;

impl<'a, W: Write> FramedWriter<'a, W> {
    pub fn new(inner: &'a mut W) -> Self {
        FramedWriter {
            inner,
            buf: Vec::with_capacity(FRAME),
        }
    }

    fn flush_frame(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.u64(self.buf.len() as u64)?;
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<()> {
        self.flush_frame()?;
        self.inner.u64(0)
    }
}

impl<W: Write> Write for FramedWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(FRAME - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == FRAME {
            self.flush_frame()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_drain() {
        let mut v = Vec::new();
        {
            let mut w = FramedWriter::new(&mut v);
            w.write_all(&vec![7u8; 70_000]).unwrap();
            w.finish().unwrap();
        }
        v.u64(42).unwrap(); // what follows the stream
        let mut r = WireReader::new(v.as_slice());
        let mut got = Vec::new();
        FramedReader::new(&mut r).read_to_end(&mut got).unwrap();
        assert_eq!(got, vec![7u8; 70_000]);
        assert_eq!(r.u64("after").unwrap(), 42);

        // Draining a half-read stream leaves the reader after its end.
        let mut r = WireReader::new(v.as_slice());
        {
            let mut f = FramedReader::new(&mut r);
            let mut b = [0u8; 10];
            f.read_exact(&mut b).unwrap();
            f.drain().unwrap();
        }
        assert_eq!(r.u64("after").unwrap(), 42);
    }

    #[test]
    fn huge_frame_claims_do_not_allocate_and_truncation_is_an_error() {
        let mut v = Vec::new();
        v.u64(u64::MAX).unwrap();
        v.extend_from_slice(b"abc");
        let mut r = WireReader::new(v.as_slice());
        let mut got = Vec::new();
        let e = FramedReader::new(&mut r).read_to_end(&mut got).unwrap_err();
        assert!(e.to_string().contains("middle of a frame"), "{e}");
        assert_eq!(got, b"abc");
    }

    #[test]
    fn errors_name_the_field_and_offset() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let mut v = Vec::new();
        v.u64(5).unwrap();
        v.str("/tmp/foo").unwrap();
        let mut r = WireReader::new(v.as_slice());
        r.u64("op").unwrap();
        let e = r.path(&sd, "path to query").unwrap_err().to_string();
        assert!(e.contains("byte 8"), "{e}");
        assert!(e.contains("/tmp/foo"), "{e}");
    }
}
