//! The compressions binary caches use, as streams: nothing is held whole in memory.

use std::io::{Read, Write};

use crate::transport::Stream;
use crate::{Error, Result};

/// Compressions kiln reads and writes, by their narinfo names.
pub const METHODS: &[&str] = &["none", "xz", "bzip2", "zstd", "br", "gzip"];

/// The file extension of a compressed NAR (`nar/HASH.nar.EXT`), as Nix names them.
pub fn extension(method: &str) -> &'static str {
    match method {
        "xz" => ".xz",
        "bzip2" => ".bz2",
        "zstd" => ".zst",
        "br" => ".br",
        "gzip" => ".gz",
        _ => "",
    }
}

fn unsupported(method: &str) -> Error {
    Error::Corrupt(format!(
        "unsupported compression '{}' (kiln reads {})",
        method.escape_default(),
        METHODS.join(", ")
    ))
}

/// Marks errors of the underlying transfer, so the decoder does not take them for its own.
pub const TRANSFER_ERROR: &str = "download failed: ";

/// Names the compression in the decoder's own errors ("xz data is corrupt: premature
/// eof" rather than a bare "premature eof").
struct Named {
    inner: Stream,
    method: &'static str,
}

impl Read for Named {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if e.to_string().starts_with(TRANSFER_ERROR) {
                e
            } else {
                std::io::Error::new(e.kind(), format!("{} data is corrupt: {e}", self.method))
            }
        })
    }
}

/// Wraps a compressed stream in its decoder.
pub fn decoder(method: &str, r: Stream) -> Result<Stream> {
    let name: &'static str = match method {
        "xz" => "xz",
        "bzip2" => "bzip2",
        "zstd" => "zstd",
        "br" => "brotli",
        "gzip" => "gzip",
        _ => "",
    };
    let d = raw_decoder(method, r)?;
    Ok(if name.is_empty() {
        d
    } else {
        Box::new(Named {
            inner: d,
            method: name,
        })
    })
}

fn raw_decoder(method: &str, r: Stream) -> Result<Stream> {
    Ok(match method {
        "none" | "" => r,
        // Multi-stream: parallel xz compressors concatenate streams.
        "xz" => Box::new(xz2::read::XzDecoder::new_multi_decoder(r)),
        "bzip2" => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        "zstd" => Box::new(
            zstd::stream::read::Decoder::new(r)
                .map_err(|e| Error::Corrupt(format!("cannot start zstd decoder: {e}")))?,
        ),
        "br" => Box::new(brotli::Decompressor::new(r, 64 * 1024)),
        "gzip" => Box::new(flate2::read::MultiGzDecoder::new(r)),
        other => return Err(unsupported(other)),
    })
}

/// Compresses what `body` writes into `out` with `method` and returns `out`.
/// `level` is the method's own scale (Nix's `compression-level`); `None` is its default.
pub fn compress<W: Write>(
    method: &str,
    level: Option<i32>,
    out: W,
    body: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<W> {
    let io = |e: std::io::Error| Error::Corrupt(format!("{method} compression failed: {e}"));
    Ok(match method {
        "none" | "" => {
            let mut out = out;
            body(&mut out)?;
            out
        }
        "xz" => {
            let mut e = xz2::write::XzEncoder::new(out, level.unwrap_or(6).clamp(0, 9) as u32);
            body(&mut e)?;
            e.finish().map_err(io)?
        }
        "bzip2" => {
            let l = bzip2::Compression::new(level.unwrap_or(9).clamp(1, 9) as u32);
            let mut e = bzip2::write::BzEncoder::new(out, l);
            body(&mut e)?;
            e.finish().map_err(io)?
        }
        "zstd" => {
            let mut e = zstd::stream::write::Encoder::new(out, level.unwrap_or(3)).map_err(io)?;
            body(&mut e)?;
            e.finish().map_err(io)?
        }
        "br" => {
            let q = level.unwrap_or(6).clamp(0, 11) as u32;
            let mut e = brotli::CompressorWriter::new(out, 64 * 1024, q, 22);
            body(&mut e)?;
            e.flush().map_err(io)?;
            e.into_inner()
        }
        "gzip" => {
            let l = flate2::Compression::new(level.unwrap_or(6).clamp(0, 9) as u32);
            let mut e = flate2::write::GzEncoder::new(out, l);
            body(&mut e)?;
            e.finish().map_err(io)?
        }
        other => return Err(unsupported(other)),
    })
}

/// Reads `r` to its end, failing if it yields any byte: used after a NAR was parsed, to
/// refuse trailing data and to let the decoder check its own end (xz and zstd checksums).
pub fn expect_end(r: &mut dyn Read, what: &str) -> Result<()> {
    let mut b = [0u8; 4096];
    loop {
        match r.read(&mut b) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                return Err(Error::Corrupt(format!(
                    "{what} has data after the end of its NAR"
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Corrupt(format!("{what}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_round_trips() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for m in METHODS {
            let packed = compress(m, None, Vec::new(), |w| {
                w.write_all(&data)
                    .map_err(|e| Error::Corrupt(e.to_string()))
            })
            .unwrap();
            let mut r = decoder(m, Box::new(std::io::Cursor::new(packed))).unwrap();
            let mut back = Vec::new();
            r.read_to_end(&mut back).unwrap();
            assert_eq!(back, data, "{m}");
        }
    }

    #[test]
    fn truncated_streams_fail() {
        let data = vec![42u8; 100_000];
        for m in ["xz", "bzip2", "zstd", "br", "gzip"] {
            let packed = compress(m, None, Vec::new(), |w| {
                w.write_all(&data)
                    .map_err(|e| Error::Corrupt(e.to_string()))
            })
            .unwrap();
            let cut = packed[..packed.len() - 4].to_vec();
            let mut r = decoder(m, Box::new(std::io::Cursor::new(cut))).unwrap();
            let mut back = Vec::new();
            let res = r.read_to_end(&mut back);
            assert!(
                res.is_err() || back != data,
                "{m}: a truncated stream decoded to the whole data"
            );
        }
    }

    #[test]
    fn unknown_method_is_named() {
        let e = decoder("lzip", Box::new(std::io::empty())).err().unwrap();
        assert!(e.to_string().contains("unsupported compression 'lzip'"));
    }
}
