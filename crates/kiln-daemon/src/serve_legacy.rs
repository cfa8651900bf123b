//! `kiln store serve [--write]`: the legacy serve protocol (what `nix-store --serve` speaks
//! for `ssh://` stores and remote builders) on standard input and output.
//!
//! It is a front end, not a second implementation: each serve command becomes worker-protocol
//! requests to a session of this very daemon, over a socket pair, as a trusted client (the
//! one who started the process, as `nix-store --serve` runs with its caller's rights). So
//! adding, building and querying go through exactly the code Nix and Guix clients reach,
//! with its checks (NAR hashes and sizes, content addresses, references). Build logs go to
//! standard error, where the serve protocol's client reads them.
//!
//! Without `--write`, commands that change the store are refused, as Nix refuses them
//! ("importing paths is not allowed", "building paths is not allowed").

use std::collections::{BTreeSet, VecDeque};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;

use kiln_format::{StoreDir, StorePath, ValidPathInfo};
use kiln_protocol::serve::{self as sp, ServeBuildOptions, ServeCommand};
use kiln_protocol::stderr::result as result_kind;
use kiln_protocol::wire::{WireReader, WireWrite};
use kiln_protocol::{BuildMode, Client, ClientOptions, Field, Message, Reply, Request, Version};

use crate::{Daemon, Error};

/// The worker protocol version the front end speaks to its session: 1.37, the last with
/// `ImportPaths` (which the serve protocol still carries, for Hydra).
const BRIDGE_VERSION: u64 = 0x125;

fn refused(what: &str) -> Error {
    Error::Protocol(kiln_protocol::Error::Protocol(format!(
        "{what} is not allowed (kiln store serve without --write)"
    )))
}

fn remote(e: kiln_protocol::Error) -> Error {
    Error::Protocol(e)
}

/// Shows what the session says while it works as a remote `nix-store --serve` shows it: log
/// lines and build output on standard error.
fn show(err: &mut dyn Write) -> impl FnMut(Message) + '_ {
    move |m| {
        let _ = match m {
            Message::Next(s) => err.write_all(s.as_bytes()),
            Message::Result {
                kind: result_kind::BUILD_LOG_LINE,
                fields,
                ..
            } => match fields.first() {
                Some(Field::String(line)) => writeln!(err, "{line}"),
                _ => Ok(()),
            },
            _ => Ok(()),
        };
    }
}

impl Daemon {
    /// Speaks the serve protocol on `input`/`output` until the client closes it. With
    /// `hangup`, the descriptor `input` reads from: when the client goes away (ssh ended)
    /// while a build runs, the build is cancelled at once, as `nix-store --serve` stops
    /// its own.
    pub fn serve_legacy(
        &self,
        input: Box<dyn Read + Send>,
        output: Box<dyn Write + Send>,
        write_allowed: bool,
        hangup: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), Error> {
        let io = |action: &'static str| {
            move |e: io::Error| Error::Io {
                path: "<socket pair>".into(),
                action,
                source: e,
            }
        };
        let (ours, theirs) = UnixStream::pair().map_err(io("create"))?;
        let sd = self.store().store_dir().clone();
        let (stop_r, stop_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| io("create a pipe for")(e.into()))?;
        std::thread::scope(|scope| {
            let served = scope.spawn(|| {
                let r = theirs.try_clone().map_err(io("duplicate"))?;
                let w = theirs.try_clone().map_err(io("duplicate"))?;
                use std::os::fd::AsFd;
                self.serve_trusted(Box::new(r), Box::new(w), Some(theirs.as_fd()))
            });
            // The client hanging up ends the session's side of the pair, which the session
            // watches while it builds.
            if let (Some(fd), Ok(end)) = (hangup, ours.try_clone()) {
                let stop_r = &stop_r;
                scope.spawn(move || watch_hangup(fd, stop_r, &end));
            }
            let result = (|| {
                let r = ours.try_clone().map_err(io("duplicate"))?;
                let client = Client::handshake(
                    Box::new(r),
                    Box::new(ours.try_clone().map_err(io("duplicate"))?),
                    sd.clone(),
                    Version(BRIDGE_VERSION),
                )
                .map_err(remote)?;
                Bridge {
                    client,
                    sd,
                    write_allowed,
                    err: Box::new(io::stderr()),
                }
                .run(input, output)
            })();
            // Ends the session: the daemon's side sees the end of its stream.
            let _ = ours.shutdown(std::net::Shutdown::Both);
            let _ = rustix::io::write(&stop_w, b"x");
            let _ = served.join();
            result
        })
    }
}

/// Waits until `fd` reports a hang-up (then shuts `end` down) or `stop` is readable.
fn watch_hangup(fd: std::os::fd::BorrowedFd<'_>, stop: &std::os::fd::OwnedFd, end: &UnixStream) {
    use rustix::event::{poll, PollFd, PollFlags};
    loop {
        let mut fds = [
            PollFd::new(&fd, PollFlags::RDHUP),
            PollFd::new(stop, PollFlags::IN),
        ];
        if poll(&mut fds, None).is_err() {
            continue;
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        if fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
        {
            let _ = end.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

struct Bridge {
    client: Client,
    sd: StoreDir,
    write_allowed: bool,
    err: Box<dyn Write + Send>,
}

impl Bridge {
    fn request(
        &mut self,
        req: &Request,
        data: Option<&mut dyn Read>,
    ) -> Result<Reply, kiln_protocol::Error> {
        let mut err = std::mem::replace(&mut self.err, Box::new(io::sink()));
        let r = self.client.request(req, data, &mut show(&mut err));
        self.err = err;
        r
    }

    fn run(
        mut self,
        input: Box<dyn Read + Send>,
        output: Box<dyn Write + Send>,
    ) -> Result<(), Error> {
        let mut r = WireReader::new(BufReader::with_capacity(64 * 1024, input));
        let mut w = io::BufWriter::with_capacity(64 * 1024, output);
        let wr = |e: io::Error| Error::Io {
            path: "<standard output>".into(),
            action: "write to",
            source: e,
        };
        match r.u64_or_eof("serve magic").map_err(remote)? {
            Some(sp::SERVE_MAGIC_1) => {}
            Some(m) => {
                return Err(remote(kiln_protocol::Error::Protocol(format!(
                    "protocol mismatch (serve magic {m:#x})"
                ))))
            }
            None => return Ok(()),
        }
        w.u64(sp::SERVE_MAGIC_2).map_err(wr)?;
        w.u64(sp::SERVE_VERSION).map_err(wr)?;
        w.flush().map_err(wr)?;
        let client_version = r.u64("client version").map_err(remote)?;
        if client_version >> 8 != 2 {
            return Err(remote(kiln_protocol::Error::Protocol(format!(
                "serve protocol version {}.{} is not supported (kiln speaks 2.7)",
                client_version >> 8,
                client_version & 0xff
            ))));
        }
        let minor = (client_version & 0xff).min(sp::SERVE_VERSION & 0xff);
        loop {
            let Some(cmd) = ServeCommand::read(minor, &self.sd, &mut r).map_err(remote)? else {
                return Ok(());
            };
            self.command(cmd, minor, &mut r, &mut w)?;
            w.flush().map_err(wr)?;
        }
    }

    fn command<R: std::io::BufRead>(
        &mut self,
        cmd: ServeCommand,
        minor: u64,
        r: &mut WireReader<R>,
        w: &mut impl Write,
    ) -> Result<(), Error> {
        let sd = self.sd.clone();
        let wr = |e: io::Error| Error::Io {
            path: "<standard output>".into(),
            action: "write to",
            source: e,
        };
        match cmd {
            ServeCommand::QueryValidPaths {
                lock,
                substitute,
                paths,
            } => {
                if lock && self.write_allowed {
                    for p in &paths {
                        self.request(&Request::AddTempRoot(p.clone()), None)
                            .map_err(remote)?;
                    }
                }
                let reply = self
                    .request(
                        &Request::QueryValidPaths {
                            paths,
                            substitute: substitute && self.write_allowed,
                        },
                        None,
                    )
                    .map_err(remote)?;
                let Reply::Paths(valid) = reply else {
                    return Err(unexpected("QueryValidPaths"));
                };
                w.paths(&sd, &valid).map_err(wr)?;
            }
            ServeCommand::QueryPathInfos(paths) => {
                let mut infos = Vec::new();
                for p in paths {
                    if let Some(i) = self.path_info(&p)? {
                        infos.push(i);
                    }
                }
                sp::write_path_infos(minor, &sd, &infos, w).map_err(wr)?;
            }
            ServeCommand::DumpStorePath(p) => {
                // The archive follows the reply, `nar_size` bytes of it (the session is
                // trusted, the archive already checked when the path was added).
                let size = match self.path_info(&p)? {
                    Some(i) => i.nar_size,
                    None => {
                        return Err(Error::Protocol(kiln_protocol::Error::Protocol(format!(
                            "path '{}' is not valid",
                            sd.display(&p)
                        ))))
                    }
                };
                self.request(&Request::NarFromPath(p.clone()), None)
                    .map_err(remote)?;
                let copied = io::copy(&mut self.client.stream().take(size), w).map_err(wr)?;
                if copied != size {
                    return Err(Error::Protocol(kiln_protocol::Error::Protocol(format!(
                        "the archive of '{}' ended after {copied} of its {size} bytes",
                        sd.display(&p)
                    ))));
                }
            }
            ServeCommand::ImportPaths => {
                if !self.write_allowed {
                    return Err(refused("importing paths"));
                }
                // The client sends nothing after the export stream until it has the
                // answer, so the session can pull the stream straight from ours.
                self.request(&Request::ImportPaths, Some(r))
                    .map_err(remote)?;
                w.u64(1).map_err(wr)?;
            }
            ServeCommand::ExportPaths(_) => {
                // Removed from Nix's serve protocol (2.32); its clients never send it.
                return Err(remote(kiln_protocol::Error::Protocol(
                    "unknown serve command 5 (ExportPaths is not served; use DumpStorePath)".into(),
                )));
            }
            ServeCommand::BuildPaths { paths, options } => {
                if !self.write_allowed {
                    return Err(refused("building paths"));
                }
                self.set_options(&options)?;
                match self.request(
                    &Request::BuildPaths {
                        paths,
                        mode: BuildMode::Normal,
                    },
                    None,
                ) {
                    Ok(_) => w.u64(0).map_err(wr)?,
                    Err(kiln_protocol::Error::Remote(e)) => {
                        w.u64(e.status.max(1)).map_err(wr)?;
                        w.str(&e.message).map_err(wr)?;
                    }
                    Err(e) => return Err(remote(e)),
                }
            }
            ServeCommand::QueryClosure {
                include_outputs,
                paths,
            } => {
                let closure = self.closure(paths, include_outputs)?;
                w.paths(&sd, &closure).map_err(wr)?;
            }
            ServeCommand::BuildDerivation {
                drv_path,
                drv,
                options,
            } => {
                if !self.write_allowed {
                    return Err(refused("building paths"));
                }
                self.set_options(&options)?;
                let reply = self
                    .request(
                        &Request::BuildDerivation {
                            drv_path,
                            drv,
                            mode: BuildMode::Normal,
                        },
                        None,
                    )
                    .map_err(remote)?;
                let Reply::BuildDerivation(res) = reply else {
                    return Err(unexpected("BuildDerivation"));
                };
                sp::write_build_result(minor, &res, w).map_err(wr)?;
            }
            ServeCommand::AddToStoreNar(info) => {
                if !self.write_allowed {
                    return Err(refused("importing paths"));
                }
                let size = info.nar_size;
                let mut nar = r.by_ref().take(size);
                let res = self.request(
                    &Request::AddToStoreNar {
                        info,
                        repair: false,
                        dont_check_sigs: true,
                    },
                    Some(&mut nar),
                );
                // Whatever happened, the stream goes on after the archive.
                io::copy(&mut nar, &mut io::sink()).map_err(|e| Error::Io {
                    path: "<standard input>".into(),
                    action: "read",
                    source: e,
                })?;
                res.map_err(remote)?;
                w.u64(1).map_err(wr)?;
            }
        }
        Ok(())
    }

    fn path_info(&mut self, p: &StorePath) -> Result<Option<ValidPathInfo>, Error> {
        match self
            .request(&Request::QueryPathInfo(p.clone()), None)
            .map_err(remote)?
        {
            Reply::PathInfo(Some(mut i)) => {
                i.path = p.clone();
                Ok(Some(i))
            }
            Reply::PathInfo(None) => Ok(None),
            _ => Err(unexpected("QueryPathInfo")),
        }
    }

    /// The closure of `paths` under references, and with `include_outputs` the valid
    /// outputs of the derivations in it (Nix's `computeFSClosure`).
    fn closure(
        &mut self,
        paths: BTreeSet<StorePath>,
        include_outputs: bool,
    ) -> Result<BTreeSet<StorePath>, Error> {
        let mut seen = BTreeSet::new();
        let mut todo: VecDeque<StorePath> = paths.into_iter().collect();
        while let Some(p) = todo.pop_front() {
            if seen.contains(&p) {
                continue;
            }
            let Some(info) = self.path_info(&p)? else {
                return Err(Error::Protocol(kiln_protocol::Error::Protocol(format!(
                    "path '{}' is not valid",
                    self.sd.display(&p)
                ))));
            };
            todo.extend(info.references.iter().cloned());
            if include_outputs && p.is_derivation() {
                if let Reply::OutputMap(outs) = self
                    .request(&Request::QueryDerivationOutputMap(p.clone()), None)
                    .map_err(remote)?
                {
                    for o in outs.into_iter().filter_map(|(_, o)| o) {
                        if self.path_info(&o)?.is_some() {
                            todo.push_back(o);
                        }
                    }
                }
            }
            seen.insert(p);
        }
        Ok(seen)
    }

    /// The build settings a serve client sends, as `SetOptions` overrides for the session.
    fn set_options(&mut self, o: &ServeBuildOptions) -> Result<(), Error> {
        let mut overrides = vec![
            ("max-silent-time".to_string(), o.max_silent_time.to_string()),
            ("timeout".to_string(), o.build_timeout.to_string()),
        ];
        if let Some(n) = o.max_log_size {
            overrides.push(("max-log-size".into(), n.to_string()));
        }
        if let Some((n, enforce)) = o.repeat {
            overrides.push(("repeat".into(), n.to_string()));
            overrides.push(("enforce-determinism".into(), enforce.to_string()));
        }
        if let Some(k) = o.keep_failed {
            overrides.push(("keep-failed".into(), k.to_string()));
        }
        let opts = ClientOptions {
            keep_failed: o.keep_failed.unwrap_or(false),
            max_silent_time: Some(o.max_silent_time),
            max_build_jobs: None,
            build_cores: None,
            // As `nix-store --serve`: the remote machine builds, it does not substitute.
            use_substitutes: false,
            overrides,
            ..Default::default()
        };
        self.request(&Request::SetOptions(opts), None)
            .map_err(remote)?;
        Ok(())
    }
}

fn unexpected(op: &str) -> Error {
    Error::Protocol(kiln_protocol::Error::Protocol(format!(
        "unexpected reply to {op}"
    )))
}
