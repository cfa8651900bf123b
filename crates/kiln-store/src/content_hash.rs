//! The hash a content address is made of, taken from a tree on disk by its ingestion
//! method: what a fixed-output build is checked against, what names a floating
//! content-addressed output, and what a path's claimed content address is verified with.
//!
//! One function for the three, so that they read a tree alike: a flat file is opened
//! without following a symlink and without blocking, and refused unless it is a regular
//! file (a symlink would make the contents live outside the store and change with them; a
//! FIFO or a device would block the reader or never end).

use std::path::Path;

use kiln_format::hash::{Hash, HashAlgo, HashModuloSink};
use kiln_format::store_path::FileIngestionMethod;
use rustix::fs::{openat, Mode, OFlags, CWD};

use crate::{Error, Result};

/// What [`content_hash`] found.
#[derive(Debug, Clone)]
pub struct ContentHash {
    /// The hash modulo the given hash part, with the self-references' positions hashed
    /// too (Nix before 2.17, and kiln's content addresses).
    pub hash: Hash,
    /// The same without the positions (Nix from 2.17 on). Equal to `hash` where nothing
    /// is hashed modulo (Git, an empty modulus or no occurrence).
    pub without_positions: Hash,
}

/// Why a tree cannot be hashed flat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotFlat {
    Symlink,
    NotRegular,
    /// Its owner's execute bit is set, and the caller refuses that (a build output hashed
    /// flat must not be executable; a path added flat may be).
    Executable,
}

/// Hashes the tree at `real` with `algo` as `method` ingests it, modulo `modulo` (a path's
/// hash part; empty for none). A tree that flat ingestion cannot take (an executable file
/// too, unless `executable_ok`) is `Ok(Err(NotFlat))`, for the caller to word; it is
/// refused before it is read.
pub fn content_hash(
    real: &Path,
    method: FileIngestionMethod,
    algo: HashAlgo,
    modulo: &str,
    executable_ok: bool,
) -> Result<std::result::Result<ContentHash, NotFlat>> {
    let (hash, without_positions) = match method {
        FileIngestionMethod::Recursive => {
            let mut h = HashModuloSink::new(algo, modulo);
            kiln_format::nar::dump(real, &mut h)?;
            let (with, without, _) = h.finish_both();
            (with, without)
        }
        // A Git object names no store path, its own included: nothing to hash modulo.
        FileIngestionMethod::Git => {
            let h = kiln_format::git::hash_path(real, algo)?;
            (h, h)
        }
        FileIngestionMethod::Flat => {
            let fd = match openat(
                CWD,
                real,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::LOOP) => return Ok(Err(NotFlat::Symlink)),
                Err(e) => return Err(Error::io(real, "open", e)),
            };
            let st = rustix::fs::fstat(&fd).map_err(|e| Error::io(real, "stat", e))?;
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile
            {
                return Ok(Err(NotFlat::NotRegular));
            }
            if st.st_mode & 0o100 != 0 && !executable_ok {
                return Ok(Err(NotFlat::Executable));
            }
            let mut f = std::fs::File::from(fd);
            let mut h = HashModuloSink::new(algo, modulo);
            std::io::copy(&mut f, &mut h).map_err(|e| Error::io(real, "read", e))?;
            let (with, without, _) = h.finish_both();
            (with, without)
        }
    };
    Ok(Ok(ContentHash {
        hash,
        without_positions,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_recursive_and_git_of_a_file_and_what_flat_refuses() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"hello\n").unwrap();
        let flat = content_hash(&f, FileIngestionMethod::Flat, HashAlgo::Sha256, "", false)
            .unwrap()
            .unwrap();
        assert_eq!(flat.hash, Hash::of(HashAlgo::Sha256, b"hello\n"));
        assert_eq!(flat.without_positions, flat.hash);
        let nar = content_hash(
            &f,
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
            "",
            true,
        )
        .unwrap()
        .unwrap();
        let mut bytes = Vec::new();
        kiln_format::nar::dump(&f, &mut bytes).unwrap();
        assert_eq!(nar.hash, Hash::of(HashAlgo::Sha256, &bytes));
        // Git's blob hash of "hello\n" (`git hash-object`).
        let git = content_hash(&f, FileIngestionMethod::Git, HashAlgo::Sha1, "", true)
            .unwrap()
            .unwrap();
        assert_eq!(
            git.hash.to_base16(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            content_hash(&f, FileIngestionMethod::Flat, HashAlgo::Sha256, "", false)
                .unwrap()
                .unwrap_err(),
            NotFlat::Executable
        );
        let exec = content_hash(&f, FileIngestionMethod::Flat, HashAlgo::Sha256, "", true)
            .unwrap()
            .unwrap();
        assert_eq!(exec.hash, flat.hash);
        let l = t.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert_eq!(
            content_hash(&l, FileIngestionMethod::Flat, HashAlgo::Sha256, "", true)
                .unwrap()
                .unwrap_err(),
            NotFlat::Symlink
        );
        assert_eq!(
            content_hash(
                t.path(),
                FileIngestionMethod::Flat,
                HashAlgo::Sha256,
                "",
                true
            )
            .unwrap()
            .unwrap_err(),
            NotFlat::NotRegular
        );
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("fifo");
        rustix::fs::mknodat(
            CWD,
            &p,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert_eq!(
            content_hash(&p, FileIngestionMethod::Flat, HashAlgo::Sha256, "", true)
                .unwrap()
                .unwrap_err(),
            NotFlat::NotRegular
        );
    }
}
