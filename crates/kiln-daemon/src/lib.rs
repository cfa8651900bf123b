//! `kiln daemon`: the worker protocol on a Unix socket, served by one process for every
//! client.
//!
//! * [`Daemon`] holds what all connections share: the store, the one scheduler (two
//!   clients asking for the same derivation share its build), the daemon's settings and
//!   its trust lists. When the store's database is deleted or replaced under the running
//!   daemon (a wiped state directory, a restored backup), the next client gets a freshly
//!   opened store and scheduler; clients already connected finish on the old ones.
//! * Each connection runs on a pooled thread: credentials from `SO_PEERCRED` decide
//!   whether it may connect and whether it is trusted ([`peer`]); its `SetOptions` apply to
//!   its own requests only ([`client_settings`]); [`session`] performs its operations on
//!   the store and the scheduler and turns build progress into the client's dialect
//!   ([`progress`]).
//! * [`serve_legacy`] speaks the serve protocol (`kiln store serve`, for `ssh://` stores) as
//!   a front end over a trusted worker-protocol session of the same daemon.
//! * Recursive builds (`recursive-nix`) get a socket of their own in the build, served by
//!   the same daemon but restricted to what the build may see (`recursive`).
//!
//! Why threads and not an async runtime: every operation ends in the store (SQLite, file
//! system) or the scheduler, which are synchronous; an async server would hand each one to
//! a blocking pool, paying two cross-thread wake-ups per query where a thread per
//! connection pays none. A thread blocked reading a stalled client holds no lock, and the
//! number of connections is bounded (`max-connections`).

#![forbid(unsafe_code)]

mod active;
pub mod client_settings;
mod messages;
mod metrics;
pub mod peer;
pub mod progress;
mod recursive;
pub mod serve_legacy;
pub mod session;
pub mod settings;
pub mod watch;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock, Weak};

use kiln_build::pool::Pool;
use kiln_build::{BuildSettings, Scheduler, SchedulerConfig};
use kiln_protocol::{RemoteError, ServerConfig};
use kiln_store::{LocalStore, Settings};
use kiln_substitute::Substituter;

pub use peer::{Peer, Trust};
pub use settings::CATALOG;

/// Errors of the daemon crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action} '{path}': {source}")]
    Io {
        path: String,
        action: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] kiln_protocol::Error),
    #[error(transparent)]
    Store(#[from] kiln_store::Error),
}

/// How the daemon serves.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Connections served at once; further clients wait in the socket's backlog.
    pub max_connections: usize,
    /// Shown to Nix clients (`nix store ping`).
    pub version_string: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            max_connections: 1024,
            // The Nix version whose protocol and behaviour kiln reproduces, as one word:
            // clients and Nix's own tests read it as a version (`nix store info --json`);
            // kiln names itself in its log and in `kiln --version`.
            version_string: kiln_protocol::version::NIX_COMPAT_VERSION.to_string(),
        }
    }
}

/// The store and the scheduler building into it.
pub(crate) struct Backend {
    pub(crate) store: Arc<LocalStore>,
    pub(crate) scheduler: Scheduler,
    /// The binary caches (shared by every client; each request names its own), or the
    /// external substitute agent.
    pub(crate) caches: Arc<dyn Substituter>,
}

impl Backend {
    fn start(
        store: Arc<LocalStore>,
        base: &BuildSettings,
        settings: &Settings,
        daemon: Weak<Daemon>,
        watch: Arc<watch::Watch>,
    ) -> Arc<Backend> {
        let caches = kiln_substitute::for_store(&store, settings);
        // `kiln daemon` checked the machines and the speed factor as it started.
        let machines = kiln_remote::setup(settings, &base.system).unwrap_or_else(|e| {
            tracing::error!("build machines: {e}");
            kiln_remote::Setup {
                machines: Vec::new(),
                remote: Some(Arc::new(kiln_remote::SshBuilder::from_env(settings))),
                local_speed_factor: 1.0,
            }
        });
        Arc::new_cyclic(|backend| {
            let scheduler = Scheduler::start(SchedulerConfig {
                store: store.clone(),
                max_jobs: base.max_jobs,
                max_substitution_jobs: base.max_substitution_jobs,
                substituter: Some(caches.clone()),
                // Recursive builds' sockets are served by this daemon, on this backend.
                recursive: Some(Arc::new(recursive::Service {
                    daemon,
                    backend: backend.clone(),
                })),
                remote: machines.remote,
                local_speed_factor: machines.local_speed_factor,
                observer: Some(watch),
                auto_gc: kiln_build::autogc::AutoGcConfig::from_settings(settings),
            });
            Backend {
                store,
                scheduler,
                caches,
            }
        })
    }
}

/// What every connection shares.
pub struct Daemon {
    backend: RwLock<Arc<Backend>>,
    pub(crate) settings: Settings,
    /// The daemon's own settings, typed.
    pub(crate) own: settings::DaemonSettings,
    pub(crate) base: Arc<BuildSettings>,
    pub(crate) uid: u32,
    activity: AtomicU64,
    pub(crate) protocol: ServerConfig,
    cfg: DaemonConfig,
    live: Mutex<usize>,
    slot_freed: Condvar,
    /// Since when taking new connections fails (out of descriptors or memory), if it does:
    /// said once in the log when it starts, and once when it passes.
    trouble: Mutex<Option<std::time::Instant>>,
    pool: Pool,
    /// This daemon, for the backends it starts (their recursive builds' sessions).
    me: Weak<Daemon>,
    /// Every build's events: active builds, metrics, JSON log, timeline.
    pub(crate) watch: Arc<watch::Watch>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Daemon({})", self.store().store_dir().as_str())
    }
}

impl Daemon {
    /// A daemon serving `store` with `settings` (the daemon's own: `nix.conf`, `kiln.toml`,
    /// `--option`).
    pub fn new(store: Arc<LocalStore>, settings: Settings, cfg: DaemonConfig) -> Arc<Daemon> {
        let base = BuildSettings::from_settings(&settings);
        let protocol = ServerConfig {
            store_dir: store.store_dir().clone(),
            version_string: cfg.version_string.clone(),
        };
        let own = settings::DaemonSettings::from_settings(&settings);
        let watch = Arc::new(watch::Watch::new(&own, store.store_dir()));
        Arc::new_cyclic(|me| Daemon {
            backend: RwLock::new(Backend::start(
                store,
                &base,
                &settings,
                me.clone(),
                watch.clone(),
            )),
            watch,
            settings,
            own,
            base: Arc::new(base),
            uid: rustix::process::geteuid().as_raw(),
            activity: AtomicU64::new((std::process::id() as u64) << 32),
            protocol,
            cfg,
            live: Mutex::new(0),
            slot_freed: Condvar::new(),
            trouble: Mutex::new(None),
            pool: Pool::new("kiln-conn"),
            me: me.clone(),
        })
    }

    /// The store clients are served from now.
    pub fn store(&self) -> Arc<LocalStore> {
        self.current().store.clone()
    }

    fn current(&self) -> Arc<Backend> {
        self.backend
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The backend for a new connection: the current one, or a freshly opened store and
    /// scheduler if the database was deleted or replaced since (one `stat` per
    /// connection).
    pub(crate) fn backend_for_connection(&self) -> Result<Arc<Backend>, Error> {
        let b = self.current();
        if !b.store.database_replaced() {
            return Ok(b);
        }
        let mut w = self.backend.write().unwrap_or_else(PoisonError::into_inner);
        if w.store.database_replaced() {
            tracing::info!(
                "the database in {} was replaced; reopening the store",
                w.store.layout().db_dir().display()
            );
            let store = Arc::new(w.store.reopen()?);
            // The old scheduler stops when its last connection drops it.
            *w = Backend::start(
                store,
                &self.base,
                &self.settings,
                self.me.clone(),
                self.watch.clone(),
            );
        }
        Ok(w.clone())
    }

    /// The client's profile and GC-root directories (Nix's `createUser`, run for every
    /// connection); a failure is the daemon's problem, not a reason to refuse the client.
    fn ensure_user_dirs(&self, b: &Backend, peer: &Peer) {
        if let Some(user) = &peer.user {
            if let Err(e) = b.store.ensure_user_dirs(user, peer.uid) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Stops building: running builders are killed, waiting clients get errors.
    pub fn stop(&self) {
        let b = self.current();
        b.scheduler.stop();
        // What was registered is made durable before the process ends (the next start
        // would otherwise check those paths' contents again).
        if let Err(e) = b.store.flush_durability() {
            tracing::error!("{e}");
        }
        self.watch.finish();
    }

    /// The metrics in Prometheus's text format (what `--metrics` serves).
    pub fn metrics_text(&self) -> String {
        let clients = *self.live.lock().unwrap_or_else(PoisonError::into_inner);
        self.watch.metrics.render(&self.watch.active, clients)
    }

    /// Serves [`Daemon::metrics_text`] over HTTP at `GET /metrics` on `addr` (a thread of
    /// its own); returns the address bound.
    pub fn serve_metrics(self: &Arc<Self>, addr: &str) -> Result<std::net::SocketAddr, Error> {
        metrics::serve(self.clone(), addr)
    }

    /// A fresh activity id (unique within this daemon, like Nix's pid-prefixed ids).
    pub(crate) fn next_activity(&self) -> u64 {
        self.activity.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Accepts connections until the listener fails; each is served on a pooled thread.
    pub fn run(self: &Arc<Self>, listener: UnixListener) -> Result<(), Error> {
        loop {
            self.wait_for_slot();
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    self.release_slot();
                    continue;
                }
                Err(e) => {
                    self.release_slot();
                    // Keep serving the connections we have; new clients wait in the
                    // socket's backlog (as beyond `max-connections`) rather than fail: a
                    // Nix client fails its whole command on a refused connection, and the
                    // condition passes as soon as a connection ends.
                    self.trouble("accepting a connection", &e);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            self.trouble_over();
            let d = self.clone();
            let spawned = self.pool.execute(move || {
                match d.serve_connection(&stream) {
                    Err(Error::Protocol(e @ kiln_protocol::Error::Refused(_))) => {
                        tracing::info!("{e}")
                    }
                    Err(e) => tracing::debug!("connection ended: {e}"),
                    Ok(()) => {}
                }
                d.release_slot();
            });
            if let Err(e) = spawned {
                self.release_slot();
                tracing::error!("no thread for a new connection: {e}");
            }
        }
    }

    /// Taking new connections fails: said once per episode.
    fn trouble(&self, what: &str, e: &std::io::Error) {
        let mut t = self.trouble.lock().unwrap_or_else(PoisonError::into_inner);
        if t.is_none() {
            tracing::error!("{what}: {e}; new clients wait until it passes");
            *t = Some(std::time::Instant::now());
        }
    }

    fn trouble_over(&self) {
        let mut t = self.trouble.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(since) = t.take() {
            tracing::warn!(
                "accepting connections again, after {} ms",
                since.elapsed().as_millis()
            );
        }
    }

    /// Runs `f` again while the process or the system is out of file descriptors (for at
    /// most a minute): a connection accepted with the last descriptor then waits for one,
    /// as a client in the backlog does, instead of being dropped without a word.
    fn while_out_of_descriptors<T>(
        &self,
        what: &str,
        mut f: impl FnMut() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match f() {
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(n) if n == rustix::io::Errno::MFILE.raw_os_error()
                            || n == rustix::io::Errno::NFILE.raw_os_error()
                    ) && std::time::Instant::now() < deadline =>
                {
                    self.trouble(what, &e);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                r => {
                    if r.is_ok() {
                        self.trouble_over();
                    }
                    return r;
                }
            }
        }
    }

    fn wait_for_slot(&self) {
        let mut n = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        while *n >= self.cfg.max_connections.max(1) {
            n = self
                .slot_freed
                .wait(n)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *n += 1;
    }

    fn release_slot(&self) {
        let mut n = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        *n = n.saturating_sub(1);
        self.slot_freed.notify_one();
    }

    /// Serves one client on a Unix socket: checks who it is, then speaks the protocol.
    pub fn serve_connection(&self, stream: &UnixStream) -> Result<(), Error> {
        let peer = Peer::of_socket(stream).map_err(|e| Error::Io {
            path: "<connection>".into(),
            action: "get the credentials of",
            source: e,
        })?;
        let b = &self.base;
        let trust = match peer::authorize(
            &peer,
            &self.own.trusted_users,
            &self.own.allowed_users,
            &b.build_users_group,
            self.uid,
        ) {
            Ok(t) => t,
            Err(msg) => {
                // As Nix: refused before the handshake; the reason goes to the daemon's log.
                tracing::warn!("{msg}");
                return Ok(());
            }
        };
        tracing::debug!(
            "accepted connection from {} (pid {:?}, {:?})",
            peer.shown(),
            peer.pid,
            trust
        );
        let backend = self.backend_for_connection()?;
        self.ensure_user_dirs(&backend, &peer);
        let summary = self.speak(stream, |hello| {
            session::Session::new(self, backend.clone(), peer.clone(), trust, hello)
        })?;
        tracing::debug!("{} operations from {}", summary.ops, peer.shown());
        Ok(())
    }

    /// Speaks the worker protocol on `stream` with the session `session` makes from the
    /// client's handshake.
    pub(crate) fn speak<'d>(
        &'d self,
        stream: &UnixStream,
        session: impl FnOnce(kiln_protocol::Hello) -> session::Session<'d>,
    ) -> Result<kiln_protocol::server::Summary, Error> {
        let dup = || {
            self.while_out_of_descriptors("setting up a connection", || stream.try_clone())
                .map_err(|e| Error::Io {
                    path: "<connection>".into(),
                    action: "duplicate",
                    source: e,
                })
        };
        use std::os::fd::AsFd;
        Ok(kiln_protocol::serve(
            Box::new(dup()?),
            Box::new(dup()?),
            Some(stream.as_fd()),
            &self.protocol,
            |hello| Ok(session(hello)),
        )?)
    }

    /// Serves one client on standard input and output (`kiln daemon --stdio`, as
    /// `nix-daemon --stdio` for `ssh-ng://`): the client is whoever started us, trusted.
    pub fn serve_stdio(&self) -> Result<(), Error> {
        self.serve_trusted(
            Box::new(std::io::stdin()),
            Box::new(std::io::stdout()),
            None,
        )
    }

    /// Serves one client, trusted as whoever started this process, on a reader and a
    /// writer (standard input and output, or one end of a socket pair).
    pub(crate) fn serve_trusted(
        &self,
        reader: Box<dyn std::io::Read + Send>,
        writer: Box<dyn std::io::Write + Send>,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), Error> {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let peer = Peer::from_ids(Some(std::process::id()), uid, gid);
        let backend = self.backend_for_connection()?;
        self.ensure_user_dirs(&backend, &peer);
        let summary = kiln_protocol::serve(reader, writer, fd, &self.protocol, |hello| {
            Ok(session::Session::new(
                self,
                backend.clone(),
                peer.clone(),
                Trust::Trusted,
                hello,
            ))
        })?;
        tracing::debug!("{} operations from the trusted client", summary.ops);
        Ok(())
    }
}

/// Binds the daemon socket at `path` (replacing a stale one, in one step), readable and
/// writable by everyone: who may connect is decided per connection by `allowed-users`.
pub fn bind_socket(path: &Path) -> Result<UnixListener, Error> {
    let io = |action, e| Error::Io {
        path: path.display().to_string(),
        action,
        source: e,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
    }
    // Made listening, then put in place: a client (or a service script) that connects as
    // soon as the path exists is never refused by a socket that is not listening yet.
    kiln_format::unix_socket::bind_in_place(path, 0o666).map_err(|e| io("bind", e))
}

pub(crate) fn remote(e: impl std::fmt::Display) -> RemoteError {
    RemoteError {
        message: e.to_string(),
        status: 1,
    }
}
