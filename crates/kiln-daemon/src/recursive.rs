//! The daemon socket of recursive builds (experimental `recursive-nix`): the build engine
//! binds `$NIX_BUILD_TOP/.nix-socket` and hands it here once the builder runs; each
//! connection is served like any client's, by this daemon's store and scheduler, but
//! untrusted and restricted to what the build may see (`session::restricted`). Nested
//! builds join the one scheduler, lending the waiting build's slot.
//!
//! The socket's connections end with the build: dropping the guard shuts the listener
//! and every connection down and waits for their threads.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;

use kiln_build::recursive::{RecursiveBuild, RecursiveServer};

use crate::peer::Peer;
use crate::session::Session;
use crate::{Backend, Daemon};

/// Connections one build may have open at once; more are refused (closed at once).
const MAX_CONNECTIONS: usize = 64;

/// Serves recursive builds run by one backend's scheduler.
pub(crate) struct Service {
    pub(crate) daemon: Weak<Daemon>,
    pub(crate) backend: Weak<Backend>,
}

type Conns = Arc<Mutex<Vec<(UnixStream, JoinHandle<()>)>>>;

/// Stops serving when dropped.
struct Serving {
    listener: UnixListener,
    acceptor: Option<JoinHandle<()>>,
    conns: Conns,
}

impl Drop for Serving {
    fn drop(&mut self) {
        // Wakes the acceptor (its `accept` fails) and ends every connection's reads.
        let _ = rustix::net::shutdown(self.listener.as_fd(), rustix::net::Shutdown::Both);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(PoisonError::into_inner));
        for (s, _) in &conns {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for (_, t) in conns {
            let _ = t.join();
        }
    }
}

impl RecursiveServer for Service {
    fn serve(
        &self,
        listener: UnixListener,
        build: Arc<RecursiveBuild>,
    ) -> Result<Box<dyn Send>, String> {
        let (Some(daemon), Some(backend)) = (self.daemon.upgrade(), self.backend.upgrade()) else {
            return Err("the daemon is stopping".into());
        };
        let accepting = listener
            .try_clone()
            .map_err(|e| format!("duplicating the socket: {e}"))?;
        let conns: Conns = Arc::default();
        let list = conns.clone();
        let acceptor = std::thread::Builder::new()
            .name("kiln-recursive".into())
            .spawn(move || {
                accept_loop(accepting, &daemon, &backend, &build, &list);
            })
            .map_err(|e| format!("starting a thread: {e}"))?;
        Ok(Box::new(Serving {
            listener,
            acceptor: Some(acceptor),
            conns,
        }))
    }
}

fn accept_loop(
    listener: UnixListener,
    daemon: &Arc<Daemon>,
    backend: &Arc<Backend>,
    build: &Arc<RecursiveBuild>,
    conns: &Conns,
) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Shut down (EINVAL), or out of descriptors: the build loses its daemon.
            Err(e) => {
                tracing::debug!("recursive Nix socket of {}: {e}", build.drv_path());
                return;
            }
        };
        let mut list = conns.lock().unwrap_or_else(PoisonError::into_inner);
        list.retain(|(_, t)| !t.is_finished());
        if list.len() >= MAX_CONNECTIONS {
            tracing::warn!(
                "recursive Nix: refusing a connection of {}: {MAX_CONNECTIONS} are open",
                build.drv_path()
            );
            continue;
        }
        let Ok(kept) = stream.try_clone() else {
            continue;
        };
        let (d, b, rb) = (daemon.clone(), backend.clone(), build.clone());
        let spawned = std::thread::Builder::new()
            .name("kiln-recursive-conn".into())
            .spawn(move || {
                if let Err(e) = serve_one(&d, b, rb, &stream) {
                    tracing::debug!("recursive Nix connection ended: {e}");
                }
            });
        match spawned {
            Ok(t) => list.push((kept, t)),
            Err(e) => tracing::warn!("recursive Nix: no thread for a connection: {e}"),
        }
    }
}

fn serve_one(
    d: &Daemon,
    backend: Arc<Backend>,
    build: Arc<RecursiveBuild>,
    stream: &UnixStream,
) -> Result<(), crate::Error> {
    let io = |e| crate::Error::Io {
        path: "<recursive Nix connection>".into(),
        action: "use",
        source: e,
    };
    let peer = Peer::of_socket(stream).map_err(io)?;
    d.speak(stream, |hello| {
        Session::restricted(d, backend, peer, hello, build)
    })?;
    Ok(())
}
