//! Builds on other machines (`builders`), over SSH, as Nix's `ssh://` and `ssh-ng://`
//! stores do.
//!
//! * `ssh-ng://HOST`: the worker protocol, to `nix-daemon --stdio` (or `kiln daemon
//!   --stdio`) on the machine, negotiated as kiln's protocol client negotiates with any
//!   daemon;
//! * `ssh://HOST`: the serve protocol 2.5–2.7, to `nix-store --serve --write` (or `kiln
//!   store serve --write`).
//!
//! `?remote-program=` replaces the program run on the machine (its words split on
//! whitespace, as Nix does), `?remote-store=` adds `--store`.
//!
//! One build: copy the input closure the machine lacks (asking it to substitute first with
//! `builders-use-substitutes`), build the derivation as a basic derivation
//! (`BuildDerivation`: the machine needs the inputs' outputs, not their `.drv` files), then
//! copy the outputs back, each checked against its NAR hash before it becomes valid here.
//! The build's log reaches the waiting clients as it comes.
//!
//! Connections are kept: after a build its SSH session goes back to an idle list for the
//! machine (as many as the machine has slots), and the next build there reuses it, so a
//! build costs no SSH handshake once one is open. A kept session that has died is noticed
//! on its first request and replaced by a fresh one once.

#![forbid(unsafe_code)]

mod flow;
mod serve;
pub mod settings;
mod ssh;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kiln_build::job::{JobControl, JobEvent};
use kiln_build::machines::Machine;
use kiln_build::remote::{RemoteBuilder, RemoteJob, RemoteOutcome};
use kiln_build::{BuildResult, BuildStatus};

/// What can go wrong talking to a build machine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The machine (or the way to it) failed.
    #[error("{message}")]
    Machine { machine: String, message: String },
    #[error(transparent)]
    Protocol(#[from] kiln_protocol::Error),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// An output the machine sent is not what it claimed (its hash or size): never
    /// registered.
    #[error("output '{path}' from the build machine is corrupt: {message}")]
    BadOutput { path: String, message: String },
    /// This store failed (not the machine): the build fails here.
    #[error(transparent)]
    Local(#[from] kiln_store::Error),
    /// The settings name machines that cannot be used.
    #[error(transparent)]
    Machines(#[from] kiln_build::machines::MachinesError),
    #[error("{0}")]
    Config(String),
}

/// What a scheduler needs to build on machines: a builder (each request's `builders`
/// name the machines: a trusted client may name its own), this machine's speed factor,
/// and the machines the settings name now (checked, for the daemon's start).
pub struct Setup {
    pub machines: Vec<Machine>,
    pub remote: Option<std::sync::Arc<dyn RemoteBuilder>>,
    pub local_speed_factor: f64,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Setup({} machines)", self.machines.len())
    }
}

/// Reads `builders`, `builders-use-substitutes` and `local-speed-factor`; `system` is this
/// machine's (the default for entries that name none). `NIX_SSHOPTS` is read now.
pub fn setup(settings: &kiln_store::Settings, system: &str) -> Result<Setup> {
    let machines = kiln_build::machines::parse_builders(settings.get("builders"), system)?;
    let speed = settings.get("local-speed-factor");
    let local_speed_factor = speed
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| {
            Error::Config(format!(
                "local-speed-factor is '{speed}', not a number greater than 0"
            ))
        })?;
    Ok(Setup {
        machines,
        remote: Some(std::sync::Arc::new(SshBuilder::from_env(settings))),
        local_speed_factor,
    })
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A connection that failed to start, with the session (to hear what ssh said).
type Failed = Box<(Error, ssh::Session)>;

/// A connection to a machine, kept between builds.
enum Conn {
    Worker(worker::WorkerConn),
    Serve(serve::ServeConn),
}

impl Conn {
    fn pid(&self) -> i32 {
        match self {
            Conn::Worker(c) => c.session.pid(),
            Conn::Serve(c) => c.session.pid(),
        }
    }

    fn close(self) -> String {
        match self {
            Conn::Worker(c) => {
                // The client owns ssh's pipes: dropped first, so that ssh sees the end.
                let worker::WorkerConn {
                    client, session, ..
                } = c;
                drop(client);
                session.close()
            }
            Conn::Serve(c) => c.close(),
        }
    }
}

/// Builds on machines reached with the system's `ssh`.
pub struct SshBuilder {
    /// `NIX_SSHOPTS` when the daemon started.
    ssh_opts: String,
    /// `builders-use-substitutes`: machines substitute inputs they lack before kiln sends
    /// them.
    use_substitutes: bool,
    /// Kept sessions by machine (its identity: URI, key, host key), with when each went
    /// idle.
    idle: Arc<IdlePool>,
    reaper: std::sync::Once,
}

impl std::fmt::Debug for SshBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SshBuilder(NIX_SSHOPTS = {:?})", self.ssh_opts)
    }
}

impl SshBuilder {
    pub fn new(ssh_opts: String, use_substitutes: bool) -> Self {
        SshBuilder {
            ssh_opts,
            use_substitutes,
            idle: Arc::default(),
            reaper: std::sync::Once::new(),
        }
    }

    /// With `NIX_SSHOPTS` from the environment and `builders-use-substitutes` from
    /// `settings`.
    pub fn from_env(settings: &kiln_store::Settings) -> Self {
        SshBuilder::new(
            std::env::var("NIX_SSHOPTS").unwrap_or_default(),
            settings.get_bool("builders-use-substitutes"),
        )
    }

    fn take_idle(&self, m: &Machine) -> Option<Conn> {
        self.idle
            .lock()
            .ok()?
            .get_mut(&m.identity())?
            .pop()
            .map(|(_, c)| c)
    }

    fn put_idle(&self, m: &Machine, c: Conn) {
        self.reaper
            .call_once(|| start_reaper(Arc::downgrade(&self.idle)));
        if let Ok(mut idle) = self.idle.lock() {
            let list = idle.entry(m.identity()).or_default();
            if list.len() < m.max_jobs.max(1) {
                list.push((Instant::now(), c));
                return;
            }
        }
        let _ = c.close();
    }

    fn open(&self, m: &Machine, job: &RemoteJob) -> Result<Conn> {
        let sd = job.store.store_dir().clone();
        let mut command: Vec<String> = Vec::new();
        let program = m.param("remote-program");
        let program_words = |default: &str| -> Vec<String> {
            program
                .as_deref()
                .unwrap_or(default)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        match m.scheme() {
            "ssh-ng" => {
                command.extend(program_words("nix-daemon"));
                command.push("--stdio".into());
            }
            "ssh" => {
                command.extend(program_words("nix-store"));
                command.extend(["--serve".into(), "--write".into()]);
            }
            other => {
                return Err(Error::Machine {
                    machine: m.uri.clone(),
                    message: format!(
                        "kiln builds on 'ssh://' and 'ssh-ng://' machines, not '{other}://'"
                    ),
                })
            }
        }
        if let Some(s) = m.param("remote-store") {
            command.extend(["--store".into(), s]);
        }
        let session = ssh::Session::open(m, &self.ssh_opts, &command)?;
        let started = if m.scheme() == "ssh-ng" {
            worker::WorkerConn::handshake(session, sd, m, self.use_substitutes).map(Conn::Worker)
        } else {
            serve::ServeConn::handshake(session, sd).map(Conn::Serve)
        };
        started.map_err(|failed| {
            let (e, session) = *failed;
            // What ssh said (`Connection refused`, `Permission denied`, a host key that is
            // not the machines file's) explains more than the protocol's end of stream.
            let said = session.close();
            let message = if said.is_empty() {
                format!("cannot connect: {e}")
            } else {
                format!("cannot connect: {said} ({e})")
            };
            Error::Machine {
                machine: m.uri.clone(),
                message,
            }
        })
    }
}

/// How long a kept session may sit idle: the machine's daemon holds temporary roots for
/// what was sent and built through it while it lives (its collector cannot take them), and
/// a machine dropped from the machines file should not keep a session.
const IDLE_LIMIT: Duration = Duration::from_secs(60);

type IdlePool = Mutex<HashMap<String, Vec<(Instant, Conn)>>>;

/// Closes sessions idle for longer than [`IDLE_LIMIT`], until the builder is gone.
fn start_reaper(pool: Weak<IdlePool>) {
    let _ = std::thread::Builder::new()
        .name("kiln-ssh-reaper".into())
        .spawn(move || loop {
            std::thread::sleep(IDLE_LIMIT / 4);
            let Some(pool) = pool.upgrade() else { return };
            let mut old = Vec::new();
            if let Ok(mut idle) = pool.lock() {
                for list in idle.values_mut() {
                    let (keep, expired): (Vec<_>, Vec<_>) = std::mem::take(list)
                        .into_iter()
                        .partition(|(t, _)| t.elapsed() < IDLE_LIMIT);
                    *list = keep;
                    old.extend(expired.into_iter().map(|(_, c)| c));
                }
                idle.retain(|_, l| !l.is_empty());
            }
            // Closed outside the lock: closing waits for ssh.
            for c in old {
                let _ = c.close();
            }
        });
}

fn with_tail(msg: String, said: &str) -> String {
    if said.is_empty() {
        msg
    } else {
        format!("{msg}; it said:\n{said}")
    }
}

fn cancelled() -> RemoteOutcome {
    let mut r = BuildResult::failed(BuildStatus::MiscFailure, "cancelled");
    r.cancelled = true;
    RemoteOutcome::Finished(Box::new(r), Vec::new())
}

impl RemoteBuilder for SshBuilder {
    fn build(&self, machine: &Machine, job: RemoteJob, ctl: &JobControl) -> RemoteOutcome {
        // A kept connection may have died while idle: then one fresh try.
        let mut fresh_tried = false;
        let mut announced = false;
        loop {
            if ctl.is_cancelled() {
                return cancelled();
            }
            let (mut conn, kept) = match self.take_idle(machine) {
                Some(c) => (c, true),
                None => {
                    fresh_tried = true;
                    match self.open(machine, &job) {
                        Ok(c) => (c, false),
                        Err(e) => return RemoteOutcome::MachineFailed(e.to_string()),
                    }
                }
            };
            // Clients hear of the build once the machine has answered.
            if !announced {
                announced = true;
                (job.events)(JobEvent::Started {
                    pid: 0,
                    log_file: String::new(),
                    round: 1,
                    rounds: 1,
                    machine: machine.uri.clone(),
                });
            }
            ctl.set_process_group(conn.pid());
            let r = flow::run(&mut conn, machine, &job, self.use_substitutes);
            ctl.set_process_group(0);
            match r {
                Ok((result, infos)) => {
                    self.put_idle(machine, conn);
                    return RemoteOutcome::Finished(Box::new(result), infos);
                }
                Err(e) => {
                    let said = conn.close();
                    if ctl.is_cancelled() {
                        return cancelled();
                    }
                    match e {
                        Error::Local(e) => {
                            let msg = format!(
                                "building '{}' on '{}' failed here: {e}",
                                job.store.print(&job.drv_path),
                                machine.uri
                            );
                            return RemoteOutcome::Finished(
                                Box::new(BuildResult::failed(BuildStatus::MiscFailure, msg)),
                                Vec::new(),
                            );
                        }
                        e if kept && !fresh_tried => {
                            tracing::debug!("kept connection to '{}' failed: {e}", machine.uri);
                            continue;
                        }
                        e => return RemoteOutcome::MachineFailed(with_tail(e.to_string(), &said)),
                    }
                }
            }
        }
    }
}
