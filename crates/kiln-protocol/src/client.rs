//! The client half: enough of a Nix (or Guix) client to drive a daemon from tests,
//! benchmarks and, later, remote builds.

use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use kiln_format::StoreDir;

use crate::ops::{DataStream, Reply, Request};
use crate::stderr::{self, Field, RemoteError};
use crate::version::{
    Features, Proto, Version, NIX_VERSION, SUPPORTED_FEATURES, WORKER_MAGIC_1, WORKER_MAGIC_2,
};
use crate::wire::{FramedWriter, WireReader, WireWrite, MAX_FEATURES, MAX_FEATURE_NAME, MAX_TEXT};
use crate::Error;

type Rd = WireReader<BufReader<Box<dyn Read + Send>>>;
type Wr = io::BufWriter<Box<dyn Write + Send>>;

/// Something the daemon said while an operation ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Next(String),
    StartActivity {
        id: u64,
        level: u64,
        kind: u64,
        text: String,
        fields: Vec<Field>,
        parent: u64,
    },
    StopActivity(u64),
    Result {
        id: u64,
        kind: u64,
        fields: Vec<Field>,
    },
    Write(Vec<u8>),
}

/// A connection to a daemon.
pub struct Client {
    r: Rd,
    w: Wr,
    /// The version this client announced.
    pub version: Version,
    /// The daemon's advertised version.
    pub daemon_version: Version,
    /// What the connection speaks (negotiated as Nix's client does).
    pub proto: Proto,
    /// The daemon's version string (Nix ≥ 1.33).
    pub daemon_version_string: Option<String>,
    /// Whether the daemon trusts this client (Nix ≥ 1.35; `None` if it did not say).
    pub trusted: Option<bool>,
    pub store_dir: StoreDir,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Client({} → {}: {})",
            self.version, self.daemon_version, self.proto
        )
    }
}

impl Client {
    /// Connects to a Unix socket as a Nix client of today (1.38).
    pub fn connect(socket: &Path, store_dir: StoreDir) -> Result<Client, Error> {
        Client::connect_as(socket, store_dir, Version(NIX_VERSION))
    }

    /// Connects as a client of version `version` (a Guix version speaks Guix's dialect).
    pub fn connect_as(
        socket: &Path,
        store_dir: StoreDir,
        version: Version,
    ) -> Result<Client, Error> {
        let s = kiln_format::unix_socket::connect(socket)?;
        let r = s.try_clone()?;
        Client::handshake(Box::new(r), Box::new(s), store_dir, version)
    }

    /// Connects naming `features` in the 1.38 exchange (kiln's own commands name kiln's
    /// features too; see [`crate::version::NIX_FEATURES`]).
    pub fn connect_with_features(
        socket: &Path,
        store_dir: StoreDir,
        features: Features,
    ) -> Result<Client, Error> {
        let s = kiln_format::unix_socket::connect(socket)?;
        let r = s.try_clone()?;
        Client::handshake_with(
            Box::new(r),
            Box::new(s),
            store_dir,
            Version(NIX_VERSION),
            features,
        )
    }

    /// Performs the handshake over an established stream, naming Nix's features.
    pub fn handshake(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        store_dir: StoreDir,
        version: Version,
    ) -> Result<Client, Error> {
        Client::handshake_with(
            reader,
            writer,
            store_dir,
            version,
            crate::version::NIX_FEATURES,
        )
    }

    /// Performs the handshake over an established stream, naming `features`.
    pub fn handshake_with(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        store_dir: StoreDir,
        version: Version,
        features: Features,
    ) -> Result<Client, Error> {
        let mut r: Rd = WireReader::new(BufReader::with_capacity(32 * 1024, reader));
        let mut w: Wr = io::BufWriter::with_capacity(32 * 1024, writer);
        // Magic and version in one write, as Nix ≥ 2.23 sends them.
        w.u64(WORKER_MAGIC_1)?;
        w.u64(version.0)?;
        w.flush()?;
        if r.u64("daemon magic")? != WORKER_MAGIC_2 {
            return Err(Error::Protocol("protocol mismatch".into()));
        }
        let dv = Version(r.u64("daemon version")?);
        let mut proto = Proto::for_daemon(version, dv).map_err(Error::Protocol)?;
        if proto.feature_exchange() {
            let ours = features.intersect(SUPPORTED_FEATURES);
            w.strs(ours.names())?;
            w.flush()?;
            let theirs = r.strings_bounded(MAX_FEATURES, MAX_FEATURE_NAME, "daemon features")?;
            proto = proto.with_features(
                ours.intersect(Features::from_names(theirs.iter().map(String::as_str))),
            );
        }
        if proto.cpu_affinity() {
            w.u64(0)?; // no CPU affinity
        }
        if proto.reserve_space() {
            w.u64(0)?; // reserve space
        }
        w.flush()?;
        let mut c = Client {
            r,
            w,
            version,
            daemon_version: dv,
            proto,
            daemon_version_string: None,
            trusted: None,
            store_dir,
        };
        if proto.daemon_version_string() {
            c.daemon_version_string = Some(c.r.string(1024, "daemon version string")?);
        }
        if proto.trust_flag() {
            c.trusted = match c.r.u64("trust")? {
                0 => None,
                1 => Some(true),
                2 => Some(false),
                n => return Err(c.r.invalid(format!("invalid trust flag {n}"))),
            };
        }
        c.process_stderr(None, &mut |_| {})?;
        Ok(c)
    }

    /// Runs one operation. `data` is its data stream (framed, inline or tunnelled, as the
    /// request needs); `on_message` sees what the daemon says meanwhile.
    pub fn request(
        &mut self,
        req: &Request,
        data: Option<&mut dyn Read>,
        on_message: &mut dyn FnMut(Message),
    ) -> Result<Reply, Error> {
        self.check(req)?;
        req.write(self.proto, &self.store_dir, &mut self.w)?;
        let kind = req.data_stream(self.proto);
        let mut data = data;
        match (kind, data.as_mut()) {
            (DataStream::Framed, Some(d)) => {
                let mut fw = FramedWriter::new(&mut self.w);
                io::copy(d, &mut fw)?;
                fw.finish()?;
            }
            (DataStream::Framed, None) => {
                self.w.u64(0)?;
            }
            (DataStream::Inline, Some(d)) => {
                io::copy(d, &mut self.w)?;
            }
            _ => {}
        }
        self.w.flush()?;
        let tunnel = if kind == DataStream::Tunnel {
            data
        } else {
            None
        };
        self.process_stderr(tunnel, on_message)?;
        Reply::read(req.op(), self.proto, &self.store_dir, &mut self.r)
    }

    /// [`Client::request`] for an operation whose data is framed or inline (`AddToStoreNar`,
    /// …), written by `write_data` straight into the connection: no pipe and no thread
    /// between a NAR being dumped and the socket. An error of `write_data` leaves the
    /// connection unusable (the stream is cut short): it is returned, and the caller drops
    /// the connection.
    pub fn request_writing(
        &mut self,
        req: &Request,
        write_data: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
        on_message: &mut dyn FnMut(Message),
    ) -> Result<Reply, Error> {
        self.check(req)?;
        req.write(self.proto, &self.store_dir, &mut self.w)?;
        match req.data_stream(self.proto) {
            DataStream::Framed => {
                let mut fw = FramedWriter::new(&mut self.w);
                write_data(&mut fw)?;
                fw.finish()?;
            }
            DataStream::Inline => write_data(&mut self.w)?,
            _ => {
                return Err(Error::Protocol(format!(
                    "{} takes no data stream here",
                    req.op().name()
                )))
            }
        }
        self.w.flush()?;
        self.process_stderr(None, on_message)?;
        Reply::read(req.op(), self.proto, &self.store_dir, &mut self.r)
    }

    /// Refuses what this connection cannot carry (an op or a realisation form it lacks).
    fn check(&self, req: &Request) -> Result<(), Error> {
        if self.proto.op(req.op() as u64) != Some(req.op()) {
            return Err(Error::Protocol(format!(
                "the daemon has no operation {} on this connection ({})",
                req.op().name(),
                self.proto
            )));
        }
        // Realisations travel in one of two forms, decided by the feature negotiated.
        let keyed_by_path = self
            .proto
            .has_feature(crate::version::Feature::RealisationWithPathNotHash);
        let path_form = matches!(
            req,
            Request::RegisterBuildTrace { .. } | Request::QueryBuildTrace { .. }
        );
        let hash_form = matches!(
            req,
            Request::RegisterDrvOutput { .. } | Request::QueryRealisation(_)
        );
        if (path_form && !keyed_by_path) || (hash_form && keyed_by_path) {
            return Err(Error::Protocol(format!(
                "{} in this form needs a connection {} realisation-with-path-not-hash ({})",
                req.op().name(),
                if path_form { "with" } else { "without" },
                self.proto
            )));
        }
        Ok(())
    }

    /// After `NarFromPath`'s reply: the archive follows on the connection.
    pub fn stream(&mut self) -> &mut impl Read {
        &mut self.r
    }

    fn process_stderr(
        &mut self,
        mut data: Option<&mut dyn Read>,
        on_message: &mut dyn FnMut(Message),
    ) -> Result<(), Error> {
        loop {
            match self.r.u64("stderr message")? {
                stderr::STDERR_LAST => return Ok(()),
                stderr::STDERR_ERROR => return Err(Error::Remote(self.read_error()?)),
                stderr::STDERR_NEXT => {
                    let s = self.r.blob(MAX_TEXT, "log line")?;
                    on_message(Message::Next(String::from_utf8_lossy(&s).into_owned()));
                }
                stderr::STDERR_WRITE => {
                    on_message(Message::Write(self.r.blob(MAX_TEXT, "data")?));
                }
                stderr::STDERR_READ => {
                    let n = self.r.u64("read size")?.min(1 << 20) as usize;
                    let mut buf = vec![0u8; n];
                    let got = match data.as_mut() {
                        Some(d) => d.read(&mut buf)?,
                        None => 0,
                    };
                    self.w.bytes(&buf[..got])?;
                    self.w.flush()?;
                }
                stderr::STDERR_START_ACTIVITY => {
                    let id = self.r.u64("activity")?;
                    let level = self.r.u64("level")?;
                    let kind = self.r.u64("activity type")?;
                    let text = self.r.string(MAX_TEXT, "text")?;
                    let fields = self.read_fields()?;
                    let parent = self.r.u64("parent")?;
                    on_message(Message::StartActivity {
                        id,
                        level,
                        kind,
                        text,
                        fields,
                        parent,
                    });
                }
                stderr::STDERR_STOP_ACTIVITY => {
                    on_message(Message::StopActivity(self.r.u64("activity")?));
                }
                stderr::STDERR_RESULT => {
                    let id = self.r.u64("activity")?;
                    let kind = self.r.u64("result type")?;
                    let fields = self.read_fields()?;
                    on_message(Message::Result { id, kind, fields });
                }
                n => return Err(self.r.invalid(format!("unknown stderr message {n:#x}"))),
            }
        }
    }

    fn read_fields(&mut self) -> Result<Vec<Field>, Error> {
        self.r.list("fields", |r| match r.u64("field type")? {
            0 => Ok(Field::Int(r.u64("field")?)),
            1 => Ok(Field::String(r.string(MAX_TEXT, "field")?)),
            n => Err(r.invalid(format!("unknown field type {n}"))),
        })
    }

    fn read_error(&mut self) -> Result<RemoteError, Error> {
        if self.proto.is_guix() {
            let message = self.r.string(MAX_TEXT, "error")?;
            // Guix sends a status only when it is not 0; a client cannot tell from the
            // stream, so (like Guix's) it expects one from daemons ≥ 8.
            let status = self.r.u64("status")?;
            return Ok(RemoteError { message, status });
        }
        if self.proto.structured_errors() {
            let _ = self.r.string(MAX_TEXT, "error type")?;
            let _level = self.r.u64("level")?;
            let _ = self.r.string(MAX_TEXT, "error name")?;
            let message = self.r.string(MAX_TEXT, "error")?;
            if self.r.u64("position")? != 0 {
                return Err(self.r.invalid("error positions are not supported"));
            }
            let traces = self.r.u64("traces")?;
            for _ in 0..traces.min(1 << 16) {
                self.r.u64("trace position")?;
                self.r.string(MAX_TEXT, "trace")?;
            }
            Ok(RemoteError { message, status: 1 })
        } else {
            let message = self.r.string(MAX_TEXT, "error")?;
            let status = self.r.u64("status")?;
            Ok(RemoteError { message, status })
        }
    }
}
