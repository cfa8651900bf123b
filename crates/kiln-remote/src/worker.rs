//! `ssh-ng://`: the worker protocol to a daemon run on the machine with `--stdio`.

use std::collections::BTreeSet;
use std::io::Read;

use kiln_build::machines::Machine;
use kiln_build::remote::RemoteJob;
use kiln_format::{Derivation, StoreDir, StorePath, ValidPathInfo};
use kiln_protocol::ops::{
    BuildMode, ClientOptions, DerivedPath, OutputSpec, Reply, Request, WireBuildResult,
};
use kiln_protocol::version::NIX_VERSION;
use kiln_protocol::{Client, Field, Message, Version};
use kiln_store::LocalStore;

use crate::flow::{LogFn, Remote};
use crate::ssh::Session;
use crate::{Error, Result};

/// Nix's result type of a build log line, and of a post-build hook's.
const RES_BUILD_LOG_LINE: u64 = 101;
const RES_POST_BUILD_LOG_LINE: u64 = 107;

pub(crate) struct WorkerConn {
    pub client: Client,
    pub session: Session,
    /// The options sent at the handshake (each build sends them again with its limits).
    options: ClientOptions,
}

impl WorkerConn {
    /// Sends the build's limits (`max-silent-time`, `timeout`, `max-log-size`) before it
    /// starts: the machine enforces them, as for a client of its own.
    fn send_limits(&mut self, job: &RemoteJob) -> Result<()> {
        let s = &job.settings;
        let mut o = self.options.clone();
        o.max_silent_time = Some(s.max_silent_time);
        for (name, v) in [("timeout", s.timeout), ("max-log-size", s.max_log_size)] {
            if v != 0 {
                o.overrides.push((name.to_string(), v.to_string()));
            }
        }
        self.client
            .request(&Request::SetOptions(o), None, &mut |_| {})?;
        Ok(())
    }

    /// A log callback for the daemon's messages during a build.
    fn on_log(log: &LogFn) -> impl FnMut(Message) + '_ {
        move |m: Message| match m {
            Message::Next(s) => log(s.as_bytes()),
            Message::Result { kind, fields, .. }
                if kind == RES_BUILD_LOG_LINE || kind == RES_POST_BUILD_LOG_LINE =>
            {
                if let Some(Field::String(line)) = fields.first() {
                    let mut b = line.clone().into_bytes();
                    b.push(b'\n');
                    log(&b);
                }
            }
            _ => {}
        }
    }
}

impl WorkerConn {
    /// Greets the daemon and sends the options builds need.
    pub fn handshake(
        mut session: Session,
        sd: StoreDir,
        machine: &Machine,
        use_substitutes: bool,
    ) -> std::result::Result<WorkerConn, crate::Failed> {
        let (Some(stdout), Some(stdin)) = (session.stdout.take(), session.stdin.take()) else {
            return Err(Box::new((
                Error::Machine {
                    machine: machine.uri.clone(),
                    message: "ssh has no pipes".into(),
                },
                session,
            )));
        };
        let mut client =
            match Client::handshake(Box::new(stdout), Box::new(stdin), sd, Version(NIX_VERSION)) {
                Ok(c) => c,
                Err(e) => return Err(Box::new((e.into(), session))),
            };
        tracing::debug!(
            "connected to '{}': {:?} ({:?}, trusted: {:?})",
            machine.uri,
            client,
            client.daemon_version_string,
            client.trusted
        );
        // As Nix's remote store sends them. Its max-jobs is the machine's slots (sending
        // this machine's, which may be 0 with remote-only building, would forbid the build
        // there); no build hook there, so that a build never travels on from machine to
        // machine (or back).
        let opts = ClientOptions {
            keep_failed: false,
            keep_going: false,
            try_fallback: false,
            verbosity: 3,
            max_build_jobs: Some(machine.max_jobs.max(1) as u64),
            max_silent_time: Some(0),
            use_build_hook: false,
            build_verbosity: 0,
            print_build_trace: false,
            build_cores: Some(0),
            // What it may substitute is `builders-use-substitutes`' to say: with it off,
            // the machine gets every input from here.
            use_substitutes,
            overrides: Vec::new(),
        };
        if let Err(e) = client.request(&Request::SetOptions(opts.clone()), None, &mut |_| {}) {
            return Err(Box::new((e.into(), session)));
        }
        Ok(WorkerConn {
            client,
            session,
            options: opts,
        })
    }
}

/// How adding an output from the machine failed: the machine's fault (a corrupt or
/// mislabelled archive) or this store's.
pub(crate) fn output_error(path: &str, e: kiln_store::Error) -> Error {
    use kiln_store::Error as E;
    match e {
        // A reference the machine claims but did not send is its fault too.
        E::HashMismatch { .. } | E::Invalid(_) | E::Format(_) | E::NotValid(_) => {
            Error::BadOutput {
                path: path.to_string(),
                message: e.to_string(),
            }
        }
        e => Error::Local(e),
    }
}

impl Remote for WorkerConn {
    fn valid(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>> {
        let req = Request::QueryValidPaths {
            paths: paths.clone(),
            substitute,
        };
        match self.client.request(&req, None, &mut |_| {})? {
            Reply::Paths(v) => Ok(v.into_iter().collect()),
            other => Err(unexpected("QueryValidPaths", &other)),
        }
    }

    fn add(&mut self, store: &LocalStore, info: &ValidPathInfo) -> Result<()> {
        let req = Request::AddToStoreNar {
            info: info.clone(),
            repair: false,
            dont_check_sigs: true,
        };
        // The NAR is dumped straight into the connection's frames.
        let real = store.real_path(&info.path);
        let mut local: Option<String> = None;
        let r = self.client.request_writing(
            &req,
            &mut |w| {
                kiln_format::nar::dump(&real, w).map_err(|e| {
                    let msg = format!("cannot read '{}' to send it: {e}", real.display());
                    local = Some(msg.clone());
                    std::io::Error::other(msg)
                })
            },
            &mut |_| {},
        );
        // This store failing to read the path is not the machine's fault.
        if let Some(e) = local {
            return Err(Error::Local(kiln_store::Error::Invalid(e)));
        }
        r?;
        Ok(())
    }

    fn build(&mut self, job: &RemoteJob, drv: &Derivation, log: LogFn) -> Result<WireBuildResult> {
        self.send_limits(job)?;
        let req = Request::BuildDerivation {
            drv_path: job.drv_path.clone(),
            drv: drv.clone(),
            mode: BuildMode::Normal,
        };
        match self.client.request(&req, None, &mut Self::on_log(&log))? {
            Reply::BuildDerivation(w) => Ok(w),
            other => Err(unexpected("BuildDerivation", &other)),
        }
    }

    fn needs_drv_files(&self) -> bool {
        self.client.trusted == Some(false)
    }

    fn build_drv(&mut self, job: &RemoteJob, log: LogFn) -> Result<WireBuildResult> {
        self.send_limits(job)?;
        let req = Request::BuildPathsWithResults {
            paths: vec![DerivedPath::Built {
                drv: job.drv_path.clone(),
                outputs: OutputSpec::All,
            }],
            mode: BuildMode::Normal,
        };
        match self.client.request(&req, None, &mut Self::on_log(&log))? {
            Reply::BuildResults(mut v) if v.len() == 1 => Ok(v.remove(0).1),
            other => Err(unexpected("BuildPathsWithResults", &other)),
        }
    }

    fn infos(&mut self, paths: &BTreeSet<StorePath>) -> Result<Vec<ValidPathInfo>> {
        let mut out = Vec::new();
        for p in paths {
            match self
                .client
                .request(&Request::QueryPathInfo(p.clone()), None, &mut |_| {})?
            {
                // The reply leaves the path out: it is the one asked for.
                Reply::PathInfo(Some(mut info)) => {
                    info.path = p.clone();
                    out.push(info)
                }
                Reply::PathInfo(_) => {}
                other => return Err(unexpected("QueryPathInfo", &other)),
            }
        }
        Ok(out)
    }

    fn nar_stream(&mut self, path: &StorePath) -> Result<&mut dyn Read> {
        self.client
            .request(&Request::NarFromPath(path.clone()), None, &mut |_| {})?;
        Ok(self.client.stream())
    }
}

fn unexpected(op: &str, r: &Reply) -> Error {
    Error::Protocol(kiln_protocol::Error::Protocol(format!(
        "unexpected reply to {op}: {r:?}"
    )))
}
