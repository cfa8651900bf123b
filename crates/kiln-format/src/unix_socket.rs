//! Unix-domain sockets at paths of any length.
//!
//! A socket address holds at most 107 bytes of path, which a store's state directory can
//! exceed (a chroot store, a deep temporary directory): the daemon's socket, the collector's
//! `gc-socket/socket` and a build's recursive-Nix socket all live there. Nix works around
//! it by binding or connecting from a child process that changed into the directory;
//! kiln, whose daemon is multi-threaded (so cannot change its working directory), names the
//! directory through an `O_PATH` descriptor of its own instead: `/proc/self/fd/N/NAME` is
//! short whatever the directory's path.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// The longest path a `sockaddr_un` holds (its 108 bytes, less the terminating NUL).
const MAX_PATH: usize = 107;

/// Runs `f` on an address for `path` no longer than a socket address holds: `path`
/// itself when it fits, else `/proc/self/fd/N/NAME` through a descriptor of its directory
/// (open while `f` runs).
fn with_short_address<T>(
    path: &Path,
    f: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().as_bytes().len() <= MAX_PATH {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return f(path);
    };
    let dir: OwnedFd = rustix::fs::open(
        if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        },
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    f(&short)
}

/// Listens on a new socket at `path` (which must not exist).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    with_short_address(path, |p| UnixListener::bind(p))
}

/// Connects to the socket at `path`.
pub fn connect(path: &Path) -> std::io::Result<UnixStream> {
    with_short_address(path, |p| UnixStream::connect(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn sockets_at_paths_longer_than_an_address_holds_work() {
        let t = tempfile::tempdir().unwrap();
        let mut dir = t.path().to_path_buf();
        while dir.as_os_str().len() < 150 {
            dir.push("a-rather-long-directory-name");
        }
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("socket");
        // Plainly, the address does not fit.
        assert!(UnixListener::bind(&path).is_err());
        let l = bind(&path).unwrap();
        assert!(path.exists(), "the socket is at its own path");
        let mut c = connect(&path).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        // A short path is used as it is.
        let short = t.path().join("s");
        let _l = bind(&short).unwrap();
        assert!(connect(&short).is_ok());
    }
}
