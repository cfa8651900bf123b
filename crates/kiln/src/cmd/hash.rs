use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_format::hash::{Encoding, HashSink};
use kiln_format::{nar, Hash, HashAlgo};

#[derive(Debug, Args)]
pub struct Format {
    /// Hash algorithm: md5, sha1, sha256 or sha512.
    #[arg(long = "type", default_value = "sha256")]
    algo: HashAlgo,
    /// Print in base16 (hex).
    #[arg(long, group = "enc")]
    base16: bool,
    /// Print in Nix base32 (the default).
    #[arg(long, group = "enc")]
    base32: bool,
    /// Print in base64.
    #[arg(long, group = "enc")]
    base64: bool,
    /// Print in SRI form (`sha256-<base64>`).
    #[arg(long, group = "enc")]
    sri: bool,
    /// Prefix the digest with `<algo>:`.
    #[arg(long)]
    with_type: bool,
}

impl Format {
    fn encoding(&self) -> Encoding {
        if self.base16 {
            Encoding::Base16
        } else if self.base64 {
            Encoding::Base64
        } else if self.sri {
            Encoding::Sri
        } else {
            Encoding::Base32
        }
    }
    fn print(&self, h: &Hash) {
        println!("{}", h.encode(self.encoding(), self.with_type));
    }
}

#[derive(Debug, Subcommand)]
pub enum HashCmd {
    /// Hash the NAR serialisation of each PATH (like `nix-hash --type sha256 --base32 PATH`).
    Path {
        #[command(flatten)]
        format: Format,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Hash the contents of each regular FILE (like `nix-hash --flat`).
    File {
        #[command(flatten)]
        format: Format,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Convert hashes between encodings; input may be base16, base32, base64 or SRI.
    Convert {
        #[command(flatten)]
        format: Format,
        #[arg(required = true)]
        hashes: Vec<String>,
    },
}

pub fn run(cmd: HashCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        HashCmd::Path { format, paths } => {
            for p in paths {
                let mut sink = HashSink::new(format.algo);
                nar::dump(&p, &mut sink)?;
                format.print(&sink.finish().0);
            }
        }
        HashCmd::File { format, files } => {
            for p in files {
                let mut f = std::fs::File::open(&p)
                    .with_context(|| format!("opening '{}'", p.display()))?;
                let mut sink = HashSink::new(format.algo);
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = f
                        .read(&mut buf)
                        .with_context(|| format!("reading '{}'", p.display()))?;
                    if n == 0 {
                        break;
                    }
                    sink.update(&buf[..n]);
                }
                format.print(&sink.finish().0);
            }
        }
        HashCmd::Convert { format, hashes } => {
            for s in hashes {
                let h = Hash::parse_any(&s, Some(format.algo))
                    .or_else(|_| Hash::parse_any(&s, None))?;
                format.print(&h);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
