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

/// Listens on a new socket that appears at `path` already listening and with `mode`,
/// replacing whatever socket was there.
///
/// `bind` creates the file before `listen` makes it accept connections, so a client that
/// waits for the file to appear (a service script, a test, a process looking for the
/// collector's socket) can connect in between and be refused, and a Nix client fails its
/// whole command on that. Here the socket is made in a new private directory beside
/// `path` (mode 0700, a name no other process can have taken: `mkdir` refuses an existing
/// one), set listening and given its mode there, then renamed over `path` in one step: the
/// path names either the old socket or a listening new one, never one that refuses. The
/// private directory also keeps another local user from swapping the socket for a symlink
/// between `bind` and `chmod` (which would have the daemon change the mode of the file it
/// points to) in a directory others may write to.
pub fn bind_in_place(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let step = |what: &str, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} '{}': {e}", path.display()))
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let dir = private_dir_beside(path).map_err(|e| step("making a directory beside", e))?;
    let tmp = dir.join(name);
    let made = bind(&tmp)
        .map_err(|e| step("binding a socket for", e))
        .and_then(|l| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                .map_err(|e| step("setting the mode of the socket for", e))?;
            std::fs::rename(&tmp, path).map_err(|e| step("putting in place", e))?;
            Ok(l)
        });
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let _ = std::fs::remove_dir(&dir);
    made
}

/// Which file `path` names now (device and inode, not following a symlink).
pub fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes the socket at `path` if it is still the file `id` (from [`identity`]): a
/// daemon that stops must not remove the socket of another one that took the path over.
pub fn remove_if_same(path: &Path, id: Option<(u64, u64)>) {
    if id.is_some() && identity(path) == id {
        let _ = std::fs::remove_file(path);
    }
}

/// A new directory (mode 0700) beside `path`, named after it.
fn private_dir_beside(path: &Path) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut last = None;
    for _ in 0..16 {
        let dir = path.with_file_name(format!(
            ".{name}.{}.{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
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
        // In place, at a long path too, replacing the old socket.
        drop(l);
        let l = bind_in_place(&path, 0o640).unwrap();
        let mut c = connect(&path).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"ho").unwrap();
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ho");
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("socket")],
            "no temporary left"
        );
        // A short path is used as it is.
        let short = t.path().join("s");
        let _l = bind(&short).unwrap();
        assert!(connect(&short).is_ok());
    }
}

#[cfg(test)]
mod in_place {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A client that connects as soon as the path exists is never refused, while the
    /// socket is made again and again. (Made with remove and `bind` instead, as before,
    /// this test failed on each of six runs: the watcher was refused.)
    #[test]
    fn the_path_never_names_a_socket_that_refuses() {
        use std::sync::atomic::AtomicU32;
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("socket");
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicU32::new(0));
        // At most this many connections, so that they never fill a listener's backlog
        // (nothing accepts them; a full backlog would block the watcher for good).
        const MOST: u32 = 100;
        let watcher = {
            let (path, stop, connected) = (path.clone(), stop.clone(), connected.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && connected.load(Ordering::Relaxed) < MOST {
                    if path.exists() {
                        match connect(&path) {
                            Ok(_) => {
                                connected.fetch_add(1, Ordering::Relaxed);
                            }
                            // Removed between the check and the connect: not a refusal by
                            // a socket that exists.
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => panic!("refused by {}: {e}", path.display()),
                        }
                    }
                }
            })
        };
        // Every listener stays open, so a client that reached an old one (preempted
        // between finding the path and connecting) is not refused either. Sockets are made
        // until the watcher has connected 50 times while they were (it may start late on a
        // busy machine), or 800 have been (descriptors are limited).
        let mut held = Vec::new();
        while held.len() < 800 && (held.len() < 300 || connected.load(Ordering::Relaxed) < 50) {
            held.push(bind_in_place(&path, 0o666).unwrap());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while connected.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        watcher.join().unwrap();
        assert!(
            connected.load(Ordering::Relaxed) > 0,
            "the watcher never connected"
        );
    }
}
