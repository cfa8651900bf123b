//! The bounded, streaming NAR parser.
//!
//! Every length read from the stream is checked against a bound before anything is
//! allocated for it, and the nesting of directories is tracked on an explicit stack, so a
//! hostile archive can neither exhaust memory nor overflow the stack (CVE-2026-44028).
//! Entry names are validated and must be strictly increasing, which rules out duplicates
//! and the symlink-then-write-through trick of CVE-2024-45593.

use std::io::{self, Read};

use crate::Error;

/// Bounds applied to untrusted archives.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest entry name (`NAME_MAX`).
    pub max_name: usize,
    /// Longest symlink target (`PATH_MAX - 1`).
    pub max_target: usize,
    /// Deepest directory nesting.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_name: 255,
            max_target: 4095,
            max_depth: 256,
        }
    }
}

/// Longest tag (`nix-archive-1`, `executable`, …); longer lengths are refused unread.
const MAX_TAG: usize = 32;

/// What a parsed archive contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NarStats {
    /// Bytes of NAR consumed (the NAR size).
    pub size: u64,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Sum of regular file sizes.
    pub file_bytes: u64,
}

/// Receives the nodes of an archive in order. `name` is `None` for the root node and the
/// entry name (already validated) for nodes inside the current directory.
pub trait NarSink {
    /// A regular file; `contents` yields exactly `size` bytes (the parser drains what the
    /// sink leaves unread).
    fn file(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), Error>;
    /// A symbolic link with a non-empty target without NUL bytes.
    fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), Error>;
    /// A directory; its entries follow until [`NarSink::leave_directory`].
    fn enter_directory(&mut self, name: Option<&[u8]>) -> Result<(), Error>;
    /// The end of the current directory.
    fn leave_directory(&mut self) -> Result<(), Error>;
}

/// A sink that accepts everything: parse only to validate (and, with a hashing reader, hash).
impl NarSink for () {
    fn file(&mut self, _: Option<&[u8]>, _: bool, _: u64, _: &mut dyn Read) -> Result<(), Error> {
        Ok(())
    }
    fn symlink(&mut self, _: Option<&[u8]>, _: &[u8]) -> Result<(), Error> {
        Ok(())
    }
    fn enter_directory(&mut self, _: Option<&[u8]>) -> Result<(), Error> {
        Ok(())
    }
    fn leave_directory(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

struct Input<R> {
    r: R,
    pos: u64,
}

impl<R: Read> Input<R> {
    fn err(at: u64, msg: impl Into<String>) -> Error {
        Error::Nar {
            offset: at,
            message: msg.into(),
        }
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        let at = self.pos;
        let mut done = 0;
        while done < buf.len() {
            match self.r.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(Self::err(
                        self.pos,
                        format!(
                            "unexpected end of archive (needed {} more bytes)",
                            buf.len() - done
                        ),
                    ))
                }
                Ok(n) => {
                    done += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Self::err(at, format!("read error: {e}"))),
            }
        }
        Ok(())
    }

    fn u64(&mut self) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64) -> Result<(), Error> {
        let pad = ((8 - len % 8) % 8) as usize;
        if pad > 0 {
            let at = self.pos;
            let mut b = [0u8; 8];
            self.fill(&mut b[..pad])?;
            if b[..pad].iter().any(|&x| x != 0) {
                return Err(Self::err(at, "non-zero padding"));
            }
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes into `buf` (cleared first).
    fn bounded(&mut self, buf: &mut Vec<u8>, max: usize, what: &str) -> Result<u64, Error> {
        let at = self.pos;
        let len = self.u64()?;
        if len > max as u64 {
            return Err(Self::err(
                at,
                format!("{what} of {len} bytes exceeds the limit of {max}"),
            ));
        }
        buf.clear();
        buf.resize(len as usize, 0);
        self.fill(buf)?;
        self.padding(len)?;
        Ok(at)
    }

    /// Reads a tag and returns it with its offset.
    fn tag(&mut self, buf: &mut Vec<u8>) -> Result<u64, Error> {
        self.bounded(buf, MAX_TAG, "tag")
    }

    fn expect(&mut self, buf: &mut Vec<u8>, want: &str) -> Result<(), Error> {
        let at = self.tag(buf)?;
        if buf.as_slice() != want.as_bytes() {
            return Err(Self::err(
                at,
                format!(
                    "expected '{want}', got '{}'",
                    String::from_utf8_lossy(buf).escape_default()
                ),
            ));
        }
        Ok(())
    }
}

/// Yields a file's contents and notes whether the stream ended early.
struct Contents<'a, R> {
    input: &'a mut Input<R>,
    remaining: u64,
    failed: Option<Error>,
}

impl<R: Read> Read for Contents<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        loop {
            match self.input.r.read(&mut buf[..want]) {
                Ok(0) => {
                    let e = Input::<R>::err(
                        self.input.pos,
                        format!(
                            "unexpected end of archive inside file contents ({} bytes missing)",
                            self.remaining
                        ),
                    );
                    let msg = e.to_string();
                    self.failed = Some(e);
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, msg));
                }
                Ok(n) => {
                    self.input.pos += n as u64;
                    self.remaining -= n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let err = Input::<R>::err(self.input.pos, format!("read error: {e}"));
                    self.failed = Some(err);
                    return Err(e);
                }
            }
        }
    }
}

fn check_name(name: &[u8], at: u64) -> Result<(), Error> {
    let bad = |why: &str| {
        Err(Error::Nar {
            offset: at,
            message: format!(
                "invalid entry name '{}': {why}",
                String::from_utf8_lossy(name).escape_default()
            ),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name == b"." || name == b".." {
        return bad("'.' and '..' are not allowed");
    }
    if name.contains(&b'/') {
        return bad("contains '/'");
    }
    if name.contains(&0) {
        return bad("contains NUL");
    }
    Ok(())
}

/// Parses one NAR from `r`, feeding `sink`. Reads exactly the archive and nothing after it
/// (NARs are embedded in protocol and export streams); see [`expect_eof`] for files.
pub fn parse<R: Read>(r: R, sink: &mut dyn NarSink, limits: Limits) -> Result<NarStats, Error> {
    let mut input = Input { r, pos: 0 };
    let mut buf = Vec::with_capacity(64);
    let mut stats = NarStats::default();
    let at = input.tag(&mut buf).map_err(|e| match e {
        // A first token that is not a short tag: this is not a NAR at all.
        Error::Nar { offset: 0, message } if message.starts_with("tag of") => Error::Nar {
            offset: 0,
            message: "not a NAR: missing 'nix-archive-1' magic".into(),
        },
        e => e,
    })?;
    if buf != super::MAGIC.as_bytes() {
        return Err(Input::<R>::err(
            at,
            "not a NAR: missing 'nix-archive-1' magic",
        ));
    }

    // One entry per open directory: the previous entry name, for ordering.
    let mut dirs: Vec<Option<Vec<u8>>> = Vec::new();
    let mut name = Vec::with_capacity(64);
    node(
        &mut input, &mut buf, sink, None, &mut dirs, limits, &mut stats,
    )?;
    while !dirs.is_empty() {
        let at = input.tag(&mut buf)?;
        match buf.as_slice() {
            b")" => {
                dirs.pop();
                sink.leave_directory()?;
                if !dirs.is_empty() {
                    input.expect(&mut buf, ")")?; // closes the entry holding this directory
                }
            }
            b"entry" => {
                input.expect(&mut buf, "(")?;
                input.expect(&mut buf, "name")?;
                let at = input.bounded(&mut name, limits.max_name, "entry name")?;
                check_name(&name, at)?;
                let prev = dirs
                    .last_mut()
                    .expect("directory stack is non-empty in the loop");
                if let Some(p) = prev {
                    if name.as_slice() <= p.as_slice() {
                        let why = if name == *p {
                            "duplicate entry"
                        } else {
                            "entries not sorted"
                        };
                        return Err(Input::<R>::err(
                            at,
                            format!(
                                "{why}: '{}' after '{}'",
                                String::from_utf8_lossy(&name).escape_default(),
                                String::from_utf8_lossy(p).escape_default()
                            ),
                        ));
                    }
                    p.clear();
                    p.extend_from_slice(&name);
                } else {
                    *prev = Some(name.clone());
                }
                input.expect(&mut buf, "node")?;
                let depth = dirs.len();
                node(
                    &mut input,
                    &mut buf,
                    sink,
                    Some(&name),
                    &mut dirs,
                    limits,
                    &mut stats,
                )?;
                if dirs.len() == depth {
                    input.expect(&mut buf, ")")?; // a file or symlink entry ends here
                }
            }
            other => {
                return Err(Input::<R>::err(
                    at,
                    format!(
                        "expected 'entry' or ')', got '{}'",
                        String::from_utf8_lossy(other).escape_default()
                    ),
                ))
            }
        }
    }
    stats.size = input.pos;
    Ok(stats)
}

/// Parses the node starting at the stream position. Files and symlinks are consumed whole;
/// a directory is opened (pushed on `dirs`) and its entries are read by the caller.
fn node<R: Read>(
    input: &mut Input<R>,
    buf: &mut Vec<u8>,
    sink: &mut dyn NarSink,
    name: Option<&[u8]>,
    dirs: &mut Vec<Option<Vec<u8>>>,
    limits: Limits,
    stats: &mut NarStats,
) -> Result<(), Error> {
    input.expect(buf, "(")?;
    input.expect(buf, "type")?;
    let at = input.tag(buf)?;
    match buf.as_slice() {
        b"regular" => {
            let mut at = input.tag(buf)?;
            let mut executable = false;
            if buf.as_slice() == b"executable" {
                let v = input.tag(buf)?;
                if !buf.is_empty() {
                    return Err(Input::<R>::err(
                        v,
                        "the 'executable' marker must be followed by an empty string",
                    ));
                }
                executable = true;
                at = input.tag(buf)?;
            }
            if buf.as_slice() != b"contents" {
                return Err(Input::<R>::err(
                    at,
                    format!(
                        "expected 'contents', got '{}'",
                        String::from_utf8_lossy(buf).escape_default()
                    ),
                ));
            }
            let size = input.u64()?;
            let mut contents = Contents {
                input: &mut *input,
                remaining: size,
                failed: None,
            };
            let res = sink.file(name, executable, size, &mut contents);
            if let Some(e) = contents.failed.take() {
                return Err(e);
            }
            res?;
            // Drain whatever the sink left unread.
            if contents.remaining > 0 {
                let drained = io::copy(&mut contents, &mut io::sink());
                if let Some(e) = contents.failed.take() {
                    return Err(e);
                }
                let pos = contents.input.pos;
                drained.map_err(|e| Input::<R>::err(pos, format!("read error: {e}")))?;
            }
            input.padding(size)?;
            stats.files += 1;
            stats.file_bytes += size;
            input.expect(buf, ")")
        }
        b"symlink" => {
            input.expect(buf, "target")?;
            let mut target = Vec::new();
            let at = input.bounded(&mut target, limits.max_target, "symlink target")?;
            if target.is_empty() {
                return Err(Input::<R>::err(at, "empty symlink target"));
            }
            if target.contains(&0) {
                return Err(Input::<R>::err(at, "symlink target contains NUL"));
            }
            sink.symlink(name, &target)?;
            stats.symlinks += 1;
            input.expect(buf, ")")
        }
        b"directory" => {
            if dirs.len() >= limits.max_depth {
                return Err(Input::<R>::err(
                    at,
                    format!("directories nested deeper than {} levels", limits.max_depth),
                ));
            }
            sink.enter_directory(name)?;
            dirs.push(None);
            stats.directories += 1;
            Ok(())
        }
        other => Err(Input::<R>::err(
            at,
            format!(
                "unknown file type '{}'",
                String::from_utf8_lossy(other).escape_default()
            ),
        )),
    }
}

/// Fails unless `r` is at its end: for whole-file archives, where trailing bytes mean a
/// corrupt or concatenated file.
pub fn expect_eof<R: Read>(mut r: R, nar_size: u64) -> Result<(), Error> {
    let mut b = [0u8; 1];
    loop {
        return match r.read(&mut b) {
            Ok(0) => Ok(()),
            Ok(_) => Err(Error::Nar {
                offset: nar_size,
                message: "trailing data after the archive".into(),
            }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(Error::Nar {
                offset: nar_size,
                message: format!("read error: {e}"),
            }),
        };
    }
}
