//! Git hashing (Nix's experimental `git-hashing`): the content address of a file system
//! object is the object id Git gives it, with SHA-1 or SHA-256.
//!
//! * A regular file is a blob: the hash of `blob <size>\0` and its bytes. Its tree entry's
//!   mode is `100755` if any execute bit is set, `100644` otherwise.
//! * A symbolic link is a blob of its target, mode `120000`.
//! * A directory is a tree: the hash of `tree <size>\0` and its entries, each
//!   `<mode in octal> <name>\0` and the child's raw digest, mode `40000`. Entries are ordered
//!   as Git orders them: by name bytes, a directory's name compared as if it ended in `/`.
//!
//! Anything else (a FIFO, a device, a socket) has no Git object and is refused.

use std::fs::File;
use std::path::Path;

use crate::hash::{Hash, HashAlgo, Hasher};
use crate::Error;

/// The Git object kinds a tree entry can have, with their modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Directory,
    Regular,
    Executable,
    Symlink,
}

impl Mode {
    /// The mode as a tree entry writes it (octal, no leading zero).
    fn octal(self) -> &'static str {
        match self {
            Mode::Directory => "40000",
            Mode::Regular => "100644",
            Mode::Executable => "100755",
            Mode::Symlink => "120000",
        }
    }
}

/// Refuses an algorithm Git objects are not named with.
pub fn check_algo(algo: HashAlgo) -> Result<(), Error> {
    match algo {
        HashAlgo::Sha1 | HashAlgo::Sha256 => Ok(()),
        other => Err(Error::Hash(format!(
            "Git file ingestion must use SHA-1 or SHA-256 hash, but instead using: {other}"
        ))),
    }
}

/// Deepest directory nesting hashed (as deep as a NAR may nest, see `nar::Limits`): the
/// walk recurses, and a tree deeper than any real one must not exhaust the stack.
pub const MAX_DEPTH: usize = 256;

/// The Git object id of the file, link or tree at `path` (not followed if a link).
pub fn hash_path(path: &Path, algo: HashAlgo) -> Result<Hash, Error> {
    check_algo(algo)?;
    Ok(object(path, algo, 0)?.1)
}

fn io<'a>(path: &'a Path, action: &str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    let action = action.to_string();
    move |source| Error::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

fn object(path: &Path, algo: HashAlgo, depth: usize) -> Result<(Mode, Hash), Error> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).map_err(io(path, "stat"))?;
    let ft = meta.file_type();
    if ft.is_file() {
        // O_NOFOLLOW: what was a file when looked at must not become a link to elsewhere
        // between the look and the read.
        let fd = rustix::fs::open(
            path,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| io(path, "open")(e.into()))?;
        let mut f = File::from(fd);
        let size = f.metadata().map_err(io(path, "stat"))?.len();
        let mut h = Hasher::new(algo);
        h.update(format!("blob {size}\0").as_bytes());
        let copied = std::io::copy(&mut f, &mut h).map_err(io(path, "read"))?;
        if copied != size {
            return Err(Error::Io {
                path: path.to_path_buf(),
                action: "hash".into(),
                source: std::io::Error::other(format!(
                    "the file changed size while it was read ({size} bytes, then {copied})"
                )),
            });
        }
        // As Git: the owner's execute bit decides.
        let mode = if meta.mode() & 0o100 != 0 {
            Mode::Executable
        } else {
            Mode::Regular
        };
        Ok((mode, h.finish()))
    } else if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(io(path, "read the link"))?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
        let mut h = Hasher::new(algo);
        h.update(format!("blob {}\0", bytes.len()).as_bytes());
        h.update(bytes);
        Ok((Mode::Symlink, h.finish()))
    } else if ft.is_dir() {
        if depth >= MAX_DEPTH {
            return Err(Error::Io {
                path: path.to_path_buf(),
                action: "hash".into(),
                source: std::io::Error::other(format!(
                    "directories nested more than {MAX_DEPTH} deep"
                )),
            });
        }
        let mut entries: Vec<(Vec<u8>, Mode, Hash)> = Vec::new();
        for e in std::fs::read_dir(path).map_err(io(path, "read the directory"))? {
            let e = e.map_err(io(path, "read the directory"))?;
            let name = std::os::unix::ffi::OsStrExt::as_bytes(e.file_name().as_os_str()).to_vec();
            let (mode, hash) = object(&e.path(), algo, depth + 1)?;
            entries.push((name, mode, hash));
        }
        // Git's order: a directory sorts as if its name ended in '/'.
        let key = |(name, mode, _): &(Vec<u8>, Mode, Hash)| {
            let mut k = name.clone();
            if *mode == Mode::Directory {
                k.push(b'/');
            }
            k
        };
        entries.sort_by_cached_key(key);
        let mut body = Vec::new();
        for (name, mode, hash) in &entries {
            body.extend_from_slice(mode.octal().as_bytes());
            body.push(b' ');
            body.extend_from_slice(name);
            body.push(0);
            body.extend_from_slice(hash.digest());
        }
        let mut h = Hasher::new(algo);
        h.update(format!("tree {}\0", body.len()).as_bytes());
        h.update(&body);
        Ok((Mode::Directory, h.finish()))
    } else {
        Err(Error::Io {
            path: path.to_path_buf(),
            action: "hash".into(),
            source: std::io::Error::other(
                "a Git object can only be a regular file, a symbolic link or a directory",
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Object ids `git hash-object` and `git write-tree` give (Git 2.39, SHA-1).
    #[test]
    fn blobs_and_trees_match_git() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("hello");
        std::fs::write(&f, "Hello World\n").unwrap();
        assert_eq!(
            hash_path(&f, HashAlgo::Sha1).unwrap().to_base16(),
            "557db03de997c86a4a028e1ebd3a1ceb225be238"
        );
        let t = d.path().join("t");
        std::fs::create_dir(&t).unwrap();
        std::fs::write(t.join("hello"), "Hello World\n").unwrap();
        std::fs::write(t.join("executable"), "Run Hello World\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(t.join("executable"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        assert_eq!(
            hash_path(&t, HashAlgo::Sha1).unwrap().to_base16(),
            "e5c0a11a556801a5c9dcf330ca9d7e2c572697f4"
        );
        assert!(hash_path(&t, HashAlgo::Sha512)
            .unwrap_err()
            .to_string()
            .contains("must use SHA-1 or SHA-256"));
    }
}
