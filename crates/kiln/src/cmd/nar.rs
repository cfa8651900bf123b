use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use kiln_format::nar;

#[derive(Debug, Subcommand)]
pub enum NarCmd {
    /// Write the NAR serialisation of PATH to standard output (like `nix-store --dump`).
    Dump { path: PathBuf },
    /// Read a NAR from standard input and restore it to DIR, which must not exist
    /// (like `nix-store --restore`).
    Restore { dir: PathBuf },
    /// List the contents of a NAR read from standard input.
    Ls {
        /// Show types, sizes and executable bits.
        #[arg(long, short)]
        long: bool,
    },
}

pub fn run(cmd: NarCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        NarCmd::Dump { path } => {
            let stdout = std::io::stdout().lock();
            let mut out = BufWriter::with_capacity(256 * 1024, stdout);
            nar::dump(&path, &mut out)?;
            out.flush().context("writing to standard output")?;
        }
        NarCmd::Restore { dir } => {
            let mut input = BufReader::with_capacity(256 * 1024, std::io::stdin().lock());
            let res = nar::restore(&dir, &mut input)
                .and_then(|stats| nar::expect_eof(&mut input, stats.size));
            if let Err(e) = res {
                // Leave nothing half-restored behind (the target did not exist before).
                if dir.symlink_metadata().is_ok() {
                    let _ = std::fs::remove_dir_all(&dir).or_else(|_| std::fs::remove_file(&dir));
                }
                return Err(e).with_context(|| format!("restoring to '{}'", dir.display()));
            }
        }
        NarCmd::Ls { long } => {
            let input = BufReader::with_capacity(256 * 1024, std::io::stdin().lock());
            let mut lister = Lister {
                path: Vec::new(),
                long,
                out: BufWriter::new(std::io::stdout().lock()),
            };
            nar::parse(input, &mut lister, nar::Limits::default())?;
            lister.out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

struct Lister<W: Write> {
    path: Vec<Vec<u8>>,
    long: bool,
    out: W,
}

impl<W: Write> Lister<W> {
    fn line(&mut self, name: Option<&[u8]>, desc: &str) -> Result<(), kiln_format::Error> {
        let mut p = Vec::new();
        for c in self.path.iter().map(Vec::as_slice).chain(name) {
            p.push(b'/');
            p.extend_from_slice(c);
        }
        if p.is_empty() {
            p.push(b'/');
        }
        let r = if self.long {
            writeln!(self.out, "{desc}\t{}", String::from_utf8_lossy(&p))
        } else {
            writeln!(self.out, "{}", String::from_utf8_lossy(&p))
        };
        r.map_err(|e| kiln_format::Error::Io {
            path: "<stdout>".into(),
            action: "write".into(),
            source: e,
        })
    }
}

impl<W: Write> nar::NarSink for Lister<W> {
    fn file(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
        _: &mut dyn std::io::Read,
    ) -> Result<(), kiln_format::Error> {
        self.line(
            name,
            &format!(
                "{}{size:>12}",
                if executable {
                    "-r-xr-xr-x"
                } else {
                    "-r--r--r--"
                }
            ),
        )
    }
    fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), kiln_format::Error> {
        self.line(
            name,
            &format!("lrwxrwxrwx{:>12} -> {}", 0, String::from_utf8_lossy(target)),
        )
    }
    fn enter_directory(&mut self, name: Option<&[u8]>) -> Result<(), kiln_format::Error> {
        self.line(name, &format!("dr-xr-xr-x{:>12}", 0))?;
        if let Some(n) = name {
            self.path.push(n.to_vec());
        }
        Ok(())
    }
    fn leave_directory(&mut self) -> Result<(), kiln_format::Error> {
        self.path.pop();
        Ok(())
    }
}
