use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_format::hash::HashSink;
use kiln_format::{nar, FileIngestionMethod, Hash, HashAlgo, StoreDir};

#[derive(Debug, Args)]
pub struct Common {
    /// The name of the item (default: the file name).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum StorePathCmd {
    /// The path `nix-store --add-fixed [--recursive] ALGO PATH` gives.
    Fixed {
        #[command(flatten)]
        common: Common,
        #[arg(long = "type", default_value = "sha256")]
        algo: HashAlgo,
        #[arg(long, short)]
        recursive: bool,
        /// Use this hash instead of hashing PATH (then --name is required).
        #[arg(long)]
        hash: Option<String>,
        path: Option<PathBuf>,
    },
    /// The path `nix-store --add PATH` (or `guix`'s `add-to-store`) gives.
    Source {
        #[command(flatten)]
        common: Common,
        path: PathBuf,
    },
    /// The path `addTextToStore` gives FILE's contents, with references.
    Text {
        #[command(flatten)]
        common: Common,
        /// A store path the text refers to (repeatable).
        #[arg(long = "ref")]
        refs: Vec<String>,
        file: PathBuf,
    },
}

fn name_of(common: &Common, path: Option<&PathBuf>) -> anyhow::Result<String> {
    if let Some(n) = &common.name {
        return Ok(n.clone());
    }
    let p = path.context("--name is required")?;
    let abs = std::path::absolute(p)?;
    Ok(abs
        .file_name()
        .context("path has no file name")?
        .to_string_lossy()
        .into_owned())
}

fn nar_hash(path: &std::path::Path, algo: HashAlgo) -> anyhow::Result<Hash> {
    let mut sink = HashSink::new(algo);
    nar::dump(path, &mut sink)?;
    Ok(sink.finish().0)
}

/// The store directory comes from the layout options (`--store-dir`, `--layout`, …).
pub fn run(sd: StoreDir, cmd: StorePathCmd) -> anyhow::Result<ExitCode> {
    let path = match cmd {
        StorePathCmd::Fixed {
            common,
            algo,
            recursive,
            hash,
            path,
        } => {
            let name = name_of(&common, path.as_ref())?;
            let method = if recursive {
                FileIngestionMethod::Recursive
            } else {
                FileIngestionMethod::Flat
            };
            let h = match (hash, &path) {
                (Some(h), _) => Hash::parse_any(&h, Some(algo))?,
                (None, Some(p)) if recursive => nar_hash(p, algo)?,
                (None, Some(p)) => Hash::of(
                    algo,
                    &std::fs::read(p).with_context(|| format!("reading '{}'", p.display()))?,
                ),
                (None, None) => anyhow::bail!("give a PATH or --hash"),
            };
            sd.display(&sd.make_fixed_output_path(method, &h, &name, &BTreeSet::new(), false)?)
        }
        StorePathCmd::Source { common, path } => {
            let name = name_of(&common, Some(&path))?;
            let h = nar_hash(&path, HashAlgo::Sha256)?;
            sd.display(&sd.make_fixed_output_path(
                FileIngestionMethod::Recursive,
                &h,
                &name,
                &BTreeSet::new(),
                false,
            )?)
        }
        StorePathCmd::Text { common, refs, file } => {
            let name = name_of(&common, Some(&file))?;
            let refs = refs
                .iter()
                .map(|r| sd.parse_path(r))
                .collect::<Result<BTreeSet<_>, _>>()?;
            let text =
                std::fs::read(&file).with_context(|| format!("reading '{}'", file.display()))?;
            sd.display(&sd.text_path_for(&name, &text, &refs)?)
        }
    };
    println!("{path}");
    Ok(ExitCode::SUCCESS)
}
