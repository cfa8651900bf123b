use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;
use kiln_format::derivation::{DerivationHasher, DerivationReader, MAX_DRV_SIZE};
use kiln_format::{Derivation, StoreDir, StorePath};

#[derive(Debug, Subcommand)]
pub enum DrvCmd {
    /// Print derivations as Nix 2.8's `nix show-derivation` JSON.
    /// The store directory is `--store-dir`, or else the directory holding the first file.
    Show {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Check that each file re-prints byte-identically and that its output paths are the
    /// ones Nix computes. Input derivations are read from the store directory on disk, or
    /// from the directory holding the file.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn store_dir_for(explicit: Option<String>, first: &Path) -> anyhow::Result<StoreDir> {
    if let Some(s) = explicit {
        return Ok(StoreDir::new(s)?);
    }
    let abs = std::path::absolute(first)?;
    let parent = abs
        .parent()
        .context("derivation file has no parent directory")?;
    StoreDir::new(parent.to_string_lossy().into_owned()).with_context(|| {
        format!(
            "cannot infer the store directory from '{}'; pass --store-dir",
            first.display()
        )
    })
}

fn base_of(file: &Path) -> anyhow::Result<StorePath> {
    let base = file
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("'{}' has no usable file name", file.display()))?;
    let sp = StorePath::from_base_name(base)
        .with_context(|| format!("'{}' is not named like a store path", file.display()))?;
    if !sp.is_derivation() {
        bail!("'{}' is not a .drv file", file.display());
    }
    Ok(sp)
}

fn read_limited(path: &Path) -> anyhow::Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading '{}'", path.display()))?;
    if meta.len() > MAX_DRV_SIZE as u64 {
        bail!(
            "'{}' is {} bytes, more than the {MAX_DRV_SIZE}-byte limit for derivations",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("reading '{}'", path.display()))
}

fn load(sd: &StoreDir, file: &Path) -> anyhow::Result<(StorePath, Vec<u8>, Derivation)> {
    let sp = base_of(file)?;
    let text = read_limited(file)?;
    let name = sp.derivation_name().unwrap_or(sp.name()).to_string();
    let drv = Derivation::parse(sd, &name, &text)?;
    Ok((sp, text, drv))
}

/// Reads input derivations from the store directory, then from the checked file's directory.
struct DiskReader {
    dirs: Vec<PathBuf>,
}

impl DerivationReader for DiskReader {
    fn read_derivation(
        &self,
        sd: &StoreDir,
        p: &StorePath,
    ) -> Result<Derivation, kiln_format::Error> {
        let name = p.derivation_name().unwrap_or(p.name());
        let mut last = None;
        for d in &self.dirs {
            let f = d.join(p.base_name());
            match std::fs::read(&f) {
                Ok(text) => return Derivation::parse(sd, name, &text),
                Err(e) => last = Some((f, e)),
            }
        }
        let (f, e) = last.unwrap_or_else(|| {
            (
                PathBuf::from(p.base_name()),
                std::io::Error::other("no directory to search"),
            )
        });
        Err(kiln_format::Error::Io {
            path: f,
            action: "read input derivation".into(),
            source: e,
        })
    }
}

pub fn run(store_dir: Option<String>, cmd: DrvCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        DrvCmd::Show { files } => {
            let sd = store_dir_for(store_dir, &files[0])?;
            let mut top = serde_json::Map::new();
            let mut all: Vec<(StorePath, Derivation)> = Vec::new();
            for f in &files {
                let (sp, _, drv) = load(&sd, f)?;
                all.push((sp, drv));
            }
            all.sort_by(|a, b| a.0.cmp(&b.0));
            for (sp, drv) in all {
                top.insert(sd.display(&sp), drv.to_json(&sd));
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::Value::Object(top))?
            );
            Ok(ExitCode::SUCCESS)
        }
        DrvCmd::Check { files } => {
            let sd = store_dir_for(store_dir, &files[0])?;
            let mut failed = 0;
            for f in &files {
                let mut dirs = vec![PathBuf::from(sd.as_str())];
                if let Some(parent) = std::path::absolute(f)?.parent() {
                    dirs.push(parent.to_path_buf());
                }
                let mut hasher = DerivationHasher::new(DiskReader { dirs });
                let res = (|| -> anyhow::Result<()> {
                    let (sp, text, drv) = load(&sd, f)?;
                    let printed = drv.to_aterm(&sd);
                    if printed != text {
                        let at = printed
                            .iter()
                            .zip(&text)
                            .position(|(a, b)| a != b)
                            .unwrap_or(printed.len().min(text.len()));
                        bail!("does not re-print identically (first difference at byte {at}): it is not in Nix's canonical form");
                    }
                    drv.check_output_paths(&sd, &mut hasher)?;
                    let want = drv.drv_path(&sd)?;
                    if want != sp {
                        bail!(
                            "its contents belong at '{}', not '{}'",
                            sd.display(&want),
                            sd.display(&sp)
                        );
                    }
                    Ok(())
                })();
                match res {
                    Ok(()) => println!("{}: ok", f.display()),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{}: {e:#}", f.display());
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} derivations failed the check", files.len());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
