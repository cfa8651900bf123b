//! `ssh://`: the serve protocol to `nix-store --serve --write` on the machine. There is
//! no stderr channel: the build's log is the program's standard error, which ssh passes
//! on, and kiln forwards it while the build runs.

use std::collections::BTreeSet;
use std::io::{BufReader, BufWriter, Read, Write};
use std::process::{ChildStdin, ChildStdout};

use kiln_build::remote::RemoteJob;
use kiln_format::{Derivation, StoreDir, StorePath, ValidPathInfo};
use kiln_protocol::ops::WireBuildResult;
use kiln_protocol::serve::{
    read_build_result, read_path_infos, ServeBuildOptions, ServeCommand, SERVE_MAGIC_1,
    SERVE_MAGIC_2, SERVE_VERSION,
};
use kiln_protocol::wire::{WireReader, WireWrite};
use kiln_store::LocalStore;

use crate::flow::{LogFn, Remote};
use crate::ssh::Session;
use crate::{Error, Result};

/// `AddToStoreNar` arrived in 2.5 (Nix 2.3); older servers would need the export format.
const MIN_MINOR: u64 = 5;

pub(crate) struct ServeConn {
    r: WireReader<BufReader<ChildStdout>>,
    w: BufWriter<ChildStdin>,
    minor: u64,
    sd: StoreDir,
    pub session: Session,
}

impl ServeConn {
    pub fn handshake(
        mut session: Session,
        sd: StoreDir,
    ) -> std::result::Result<ServeConn, crate::Failed> {
        let (Some(stdout), Some(stdin)) = (session.stdout.take(), session.stdin.take()) else {
            let e = Error::Protocol(kiln_protocol::Error::Protocol("ssh has no pipes".into()));
            return Err(Box::new((e, session)));
        };
        let mut r = WireReader::new(BufReader::with_capacity(64 * 1024, stdout));
        let mut w = BufWriter::with_capacity(64 * 1024, stdin);
        let greet = |r: &mut WireReader<BufReader<ChildStdout>>,
                     w: &mut BufWriter<ChildStdin>|
         -> Result<u64> {
            w.u64(SERVE_MAGIC_1)?;
            w.u64(SERVE_VERSION)?;
            w.flush()?;
            if r.u64("serve magic")? != SERVE_MAGIC_2 {
                return Err(proto("it does not speak the serve protocol"));
            }
            let v = r.u64("serve version")?;
            if v >> 8 != SERVE_VERSION >> 8 {
                return Err(proto(&format!(
                    "it speaks serve protocol {}.{}, not 2",
                    v >> 8,
                    v & 0xff
                )));
            }
            let minor = (v & 0xff).min(SERVE_VERSION & 0xff);
            if minor < MIN_MINOR {
                return Err(proto(&format!(
                    "it speaks serve protocol 2.{minor}; kiln needs 2.{MIN_MINOR} or later"
                )));
            }
            Ok(minor)
        };
        match greet(&mut r, &mut w) {
            Ok(minor) => Ok(ServeConn {
                r,
                w,
                minor,
                sd,
                session,
            }),
            Err(e) => Err(Box::new((e, session))),
        }
    }

    /// Ends the session (pipes first, so that ssh sees the end), returning what it said.
    pub fn close(self) -> String {
        let ServeConn { r, w, session, .. } = self;
        drop(w);
        drop(r);
        session.close()
    }

    fn send(&mut self, c: &ServeCommand, sd: &StoreDir) -> Result<()> {
        c.write(self.minor, sd, &mut self.w)?;
        Ok(())
    }
}

fn proto(msg: &str) -> Error {
    Error::Protocol(kiln_protocol::Error::Protocol(msg.to_string()))
}

impl Remote for ServeConn {
    fn valid(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>> {
        let cmd = ServeCommand::QueryValidPaths {
            lock: false,
            substitute,
            paths: paths.clone(),
        };
        let sd = self.sd.clone();
        self.send(&cmd, &sd)?;
        self.w.flush()?;
        Ok(self.r.paths(&sd, "valid paths")?)
    }

    fn add(&mut self, store: &LocalStore, info: &ValidPathInfo) -> Result<()> {
        let sd = self.sd.clone();
        self.send(&ServeCommand::AddToStoreNar(info.clone()), &sd)?;
        kiln_format::nar::dump(&store.real_path(&info.path), &mut self.w)
            .map_err(|e| Error::Local(kiln_store::Error::Format(e)))?;
        self.w.flush()?;
        match self.r.u64("import result")? {
            1 => Ok(()),
            n => Err(proto(&format!(
                "importing '{}' answered {n}, not 1",
                store.print(&info.path)
            ))),
        }
    }

    fn build(&mut self, job: &RemoteJob, drv: &Derivation, log: LogFn) -> Result<WireBuildResult> {
        let s = &job.settings;
        let cmd = ServeCommand::BuildDerivation {
            drv_path: job.drv_path.clone(),
            drv: drv.clone(),
            options: ServeBuildOptions {
                max_silent_time: s.max_silent_time,
                build_timeout: s.timeout,
                max_log_size: Some(s.max_log_size),
                repeat: Some((0, false)),
                keep_failed: Some(false),
            },
        };
        let sd = self.sd.clone();
        self.send(&cmd, &sd)?;
        self.w.flush()?;
        if let Ok(mut g) = self.session.log.lock() {
            let log = log.clone();
            *g = Some(Box::new(move |b: &[u8]| log(b)));
        }
        let r = read_build_result(self.minor, &mut self.r);
        self.session.settle_log();
        if let Ok(mut g) = self.session.log.lock() {
            *g = None;
        }
        Ok(r?)
    }

    fn infos(&mut self, paths: &BTreeSet<StorePath>) -> Result<Vec<ValidPathInfo>> {
        let sd = self.sd.clone();
        self.send(&ServeCommand::QueryPathInfos(paths.clone()), &sd)?;
        self.w.flush()?;
        Ok(read_path_infos(self.minor, &sd, &mut self.r)?
            .into_iter()
            .filter(|i| paths.contains(&i.path))
            .collect())
    }

    fn nar_stream(&mut self, path: &StorePath) -> Result<&mut dyn Read> {
        let sd = self.sd.clone();
        self.send(&ServeCommand::DumpStorePath(path.clone()), &sd)?;
        self.w.flush()?;
        Ok(&mut self.r)
    }
}
