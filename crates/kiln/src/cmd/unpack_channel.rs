//! `builtin:unpack-channel` (Nix): unpacks the channel tarball `src` into `$out` and names
//! its single top-level entry `channelName`, as `nix-channel --update` expects.

use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context};

/// The tarball's reader with its compression (gzip, bzip2, xz, zstd or none) detected
/// from its first bytes, as libarchive does for Nix.
fn decompressed(path: &Path) -> anyhow::Result<Box<dyn Read>> {
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("opening channel tarball '{}'", path.display()))?;
    let mut magic = [0u8; 6];
    let mut n = 0;
    while n < magic.len() {
        let k = f.read(&mut magic[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    let head = std::io::Cursor::new(magic[..n].to_vec());
    let r = BufReader::new(head.chain(f));
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(r)),
        [b'B', b'Z', b'h', ..] => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        [0xfd, b'7', b'z', b'X', b'Z', 0] => Box::new(xz2::read::XzDecoder::new_multi_decoder(r)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Box::new(zstd::stream::read::Decoder::new(r)?),
        _ => Box::new(r),
    })
}

/// Unpacks `src` into `out` and renames its single entry to `channel_name`.
pub fn unpack(src: &Path, out: &Path, channel_name: &str) -> anyhow::Result<()> {
    if channel_name.is_empty() || channel_name.contains('/') || channel_name.starts_with('.') {
        bail!("invalid channel name '{channel_name}'");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating '{}'", out.display()))?;
    let mut archive = tar::Archive::new(decompressed(src)?);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(false);
    // `unpack` refuses entries that would land outside `out` (`..`, absolute names,
    // writing through a symlink the archive created).
    archive
        .unpack(out)
        .with_context(|| format!("unpacking channel tarball '{}'", src.display()))?;
    let entries: Vec<_> = std::fs::read_dir(out)
        .with_context(|| format!("reading '{}'", out.display()))?
        .collect::<Result<_, _>>()?;
    if entries.len() != 1 {
        bail!(
            "channel tarball '{}' contains more than one file",
            src.display()
        );
    }
    std::fs::rename(entries[0].path(), out.join(channel_name))
        .context("renaming channel directory")?;
    Ok(())
}

pub fn run() -> anyhow::Result<std::process::ExitCode> {
    let attr =
        |name: &str| std::env::var(name).with_context(|| format!("attribute '{name}' missing"));
    let (out, channel_name, src) = (attr("out")?, attr("channelName")?, attr("src")?);
    unpack(Path::new(&src), Path::new(&out), &channel_name)?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(dir: &Path, compress: &str) -> std::path::PathBuf {
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("nixexprs/sub")).unwrap();
        std::fs::write(tree.join("nixexprs/default.nix"), "{ }\n").unwrap();
        std::fs::write(tree.join("nixexprs/sub/x"), "x").unwrap();
        let tar = dir.join(format!("c.tar{compress}"));
        let flag = match compress {
            ".bz2" => "-j",
            ".xz" => "-J",
            ".gz" => "-z",
            _ => "-a",
        };
        let st = std::process::Command::new("tar")
            .args([flag, "-cf"])
            .arg(&tar)
            .arg("-C")
            .arg(&tree)
            .arg("nixexprs")
            .status()
            .unwrap();
        assert!(st.success());
        tar
    }

    #[test]
    fn unpacks_each_compression_and_renames_the_entry() {
        for c in ["", ".gz", ".bz2", ".xz"] {
            let t = tempfile::tempdir().unwrap();
            let src = tarball(t.path(), c);
            let out = t.path().join("out");
            unpack(&src, &out, "mychannel").unwrap();
            assert_eq!(
                std::fs::read_to_string(out.join("mychannel/default.nix")).unwrap(),
                "{ }\n",
                "compression {c:?}"
            );
            assert_eq!(
                std::fs::read_to_string(out.join("mychannel/sub/x")).unwrap(),
                "x"
            );
            assert!(!out.join("nixexprs").exists());
        }
    }

    #[test]
    fn refuses_two_entries_and_bad_names() {
        let t = tempfile::tempdir().unwrap();
        let src = tarball(t.path(), "");
        let out = t.path().join("out");
        std::fs::create_dir_all(out.join("already-here")).unwrap();
        let e = unpack(&src, &out, "c").unwrap_err();
        assert!(e.to_string().contains("contains more than one file"), "{e}");
        let e = unpack(&src, &t.path().join("o2"), "../escape").unwrap_err();
        assert!(e.to_string().contains("invalid channel name"), "{e}");
    }
}
