//! Build logs: `<log-dir>/drvs/<first two characters>/<rest of the .drv base name>[.bz2|.gz|.zst]`,
//! where `nix log`, `nix-store -l` and `guix build --log-file` look for them.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use kiln_format::StorePath;

use crate::error::{Error, Result};
use crate::settings::LogCompression;

/// The log file name of a derivation (without compression suffix).
pub fn log_path(log_dir: &Path, drv: &StorePath) -> PathBuf {
    let base = drv.base_name();
    log_dir.join("drvs").join(&base[..2]).join(&base[2..])
}

/// A log being written.
pub enum LogWriter {
    Plain(BufWriter<File>),
    Bzip2(bzip2::write::BzEncoder<File>),
    Gzip(flate2::write::GzEncoder<File>),
    Zstd(zstd::Encoder<'static, File>),
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogWriter")
    }
}

impl LogWriter {
    /// Creates (truncating) the log of `drv`; returns it with its file name.
    pub fn create(
        log_dir: &Path,
        drv: &StorePath,
        c: LogCompression,
    ) -> Result<(LogWriter, PathBuf)> {
        let base = log_path(log_dir, drv);
        let file = PathBuf::from(format!("{}{}", base.display(), c.suffix()));
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create log directory", e))?;
        }
        // A stale log in another compression would shadow the new one for readers.
        for other in ["", ".bz2", ".gz", ".zst"] {
            if other != c.suffix() {
                let _ = std::fs::remove_file(format!("{}{other}", base.display()));
            }
        }
        let f = File::create(&file).map_err(|e| Error::io(&file, "create log file", e))?;
        Ok((LogWriter::over(f, c, &file)?, file))
    }

    /// A writer compressing with `c` into `f` (named `file` in errors).
    fn over(f: File, c: LogCompression, file: &Path) -> Result<LogWriter> {
        Ok(match c {
            LogCompression::None => LogWriter::Plain(BufWriter::new(f)),
            // Level 1: small logs of many builds should not pay bzip2's largest block size.
            LogCompression::Bzip2 => {
                LogWriter::Bzip2(bzip2::write::BzEncoder::new(f, bzip2::Compression::new(1)))
            }
            LogCompression::Gzip => LogWriter::Gzip(flate2::write::GzEncoder::new(
                f,
                flate2::Compression::fast(),
            )),
            LogCompression::Zstd => LogWriter::Zstd(
                zstd::Encoder::new(f, 3).map_err(|e| Error::io(file, "compress", e))?,
            ),
        })
    }

    /// Adds to the log of `drv` written with `c` (a further compressed stream, which the
    /// readers take as the continuation); `None` if it has no such log.
    pub fn append(log_dir: &Path, drv: &StorePath, c: LogCompression) -> Result<Option<LogWriter>> {
        let file = PathBuf::from(format!(
            "{}{}",
            log_path(log_dir, drv).display(),
            c.suffix()
        ));
        let f = match std::fs::OpenOptions::new().append(true).open(&file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&file, "open log file", e)),
        };
        Ok(Some(LogWriter::over(f, c, &file)?))
    }

    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            LogWriter::Plain(w) => w.write_all(data),
            LogWriter::Bzip2(w) => w.write_all(data),
            LogWriter::Gzip(w) => w.write_all(data),
            LogWriter::Zstd(w) => w.write_all(data),
        }
    }

    pub fn finish(self) -> std::io::Result<()> {
        match self {
            LogWriter::Plain(mut w) => w.flush(),
            LogWriter::Bzip2(w) => w.finish().map(|_| ()),
            LogWriter::Gzip(w) => w.finish().map(|_| ()),
            LogWriter::Zstd(w) => w.finish().map(|_| ()),
        }
    }
}

/// Reads the log of `drv`, whichever compression it was written with (also Nix's and
/// Guix's older flat layout `drvs/<base name>`).
pub fn read_log(log_dir: &Path, drv: &StorePath) -> Result<Option<Vec<u8>>> {
    let nested = log_path(log_dir, drv);
    let flat = log_dir.join("drvs").join(drv.base_name());
    for base in [nested, flat] {
        for suffix in ["", ".bz2", ".gz", ".zst"] {
            let p = PathBuf::from(format!("{}{suffix}", base.display()));
            let f = match File::open(&p) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&p, "open log", e)),
            };
            let mut out = Vec::new();
            let r = match suffix {
                "" => {
                    let mut f = f;
                    f.read_to_end(&mut out)
                }
                ".bz2" => bzip2::read::MultiBzDecoder::new(f).read_to_end(&mut out),
                ".gz" => flate2::read::MultiGzDecoder::new(f).read_to_end(&mut out),
                _ => zstd::Decoder::new(f).and_then(|mut d| d.read_to_end(&mut out)),
            };
            r.map_err(|e| Error::io(&p, "read log", e))?;
            return Ok(Some(out));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_compression() {
        let d = tempfile::tempdir().unwrap();
        let drv = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv").unwrap();
        for c in [
            LogCompression::None,
            LogCompression::Bzip2,
            LogCompression::Gzip,
            LogCompression::Zstd,
        ] {
            let (mut w, p) = LogWriter::create(d.path(), &drv, c).unwrap();
            assert!(p
                .to_string_lossy()
                .contains("drvs/7h/7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv"));
            w.write(b"line 1\n").unwrap();
            w.write(b"line 2\n").unwrap();
            w.finish().unwrap();
            assert_eq!(
                read_log(d.path(), &drv).unwrap().unwrap(),
                b"line 1\nline 2\n"
            );
        }
        let other = StorePath::from_base_name("0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-y.drv").unwrap();
        assert!(read_log(d.path(), &other).unwrap().is_none());
    }
}
