//! The daemon side of a connection: handshake, then one operation after another.
//!
//! The server reads each request completely before the handler sees it; a request that
//! cannot be read (a bad path, a length over its limit, an unknown operation) gets one
//! `STDERR_ERROR` and the connection is closed, because the stream position is then
//! unknown (Nix 2.8 sends the same error frame twice before closing; clients read one).
//! An error from the handler is reported and the connection stays usable: the request was
//! fully read and any framed data is drained — except after an inline NAR the handler did
//! not finish, whose end cannot be found.

use std::io::{self, BufReader, Read, Write};
use std::os::fd::BorrowedFd;

use kiln_format::StoreDir;

use crate::ops::{DataStream, Op, Reply, Request};
use crate::stderr::{self, write_error, Field, RemoteError};
use crate::version::{
    Dialect, Features, Proto, Version, DAEMON_VERSION, NIX_VERSION, SUPPORTED_FEATURES,
    WORKER_MAGIC_1, WORKER_MAGIC_2,
};
use crate::wire::{WireReader, WireWrite, MAX_FEATURES, MAX_FEATURE_NAME};
use crate::Error;

type Rd = WireReader<BufReader<Box<dyn Read + Send>>>;
type Wr = io::BufWriter<Box<dyn Write + Send>>;

/// Serves one client's operations.
pub trait Handler {
    /// Performs one operation. Log output and data go through `io`; the reply is written
    /// after `STDERR_LAST`.
    fn handle(&mut self, req: Request, io: &mut OpIo<'_>) -> Result<Reply, RemoteError>;

    /// Whether the client is trusted, as Nix ≥ 1.35 clients are told after the
    /// handshake (`None`: unknown).
    fn trusted(&self) -> Option<bool> {
        None
    }
}

/// What the server knows once the client has introduced itself.
#[derive(Debug, Clone, Copy)]
pub struct Hello {
    /// What the client announced.
    pub client_version: Version,
    /// What the connection speaks.
    pub proto: Proto,
}

impl Hello {
    pub fn dialect(&self) -> Dialect {
        self.proto.dialect()
    }
}

/// How a connection ended.
#[derive(Debug, Default)]
pub struct Summary {
    pub ops: u64,
    pub proto: Option<Proto>,
}

/// The daemon's settings for serving connections.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub store_dir: StoreDir,
    /// Sent to Nix clients ≥ 1.33 (`nix store ping` shows it).
    pub version_string: String,
}

/// A handler's view of the connection while an operation runs.
pub struct OpIo<'a> {
    r: &'a mut Rd,
    w: &'a mut Wr,
    proto: Proto,
    verbosity: u64,
    data: DataStream,
    frame_left: u64,
    frame_done: bool,
    data_error: bool,
    fd: Option<BorrowedFd<'a>>,
}

impl std::fmt::Debug for OpIo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpIo({}, {:?})", self.proto, self.data)
    }
}

impl<'a> OpIo<'a> {
    /// What the connection speaks.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// The client's verbosity (from `SetOptions`).
    pub fn verbosity(&self) -> u64 {
        self.verbosity
    }

    /// The connection's descriptor, to watch for the client hanging up during long work.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd
    }

    fn send(&mut self, f: impl FnOnce(&mut Wr) -> io::Result<()>) -> io::Result<()> {
        f(self.w)?;
        self.w.flush()
    }

    /// A log line (`STDERR_NEXT`), if the client's verbosity admits `level`.
    pub fn log(&mut self, level: u64, text: &str) -> io::Result<()> {
        if level > self.verbosity {
            return Ok(());
        }
        self.send(|w| {
            w.u64(stderr::STDERR_NEXT)?;
            let mut line = Vec::with_capacity(text.len() + 1);
            line.extend_from_slice(text.as_bytes());
            line.push(b'\n');
            w.bytes(&line)
        })
    }

    /// Raw text for the client's terminal (`STDERR_NEXT`, unfiltered, as sent).
    pub fn next_raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.send(|w| {
            w.u64(stderr::STDERR_NEXT)?;
            w.bytes(data)
        })
    }

    /// Whether the client understands activities (Nix ≥ 1.20).
    pub fn has_activities(&self) -> bool {
        self.proto.activities()
    }

    /// Starts an activity; older clients get its text as a log line instead.
    pub fn start_activity(
        &mut self,
        id: u64,
        level: u64,
        kind: u64,
        text: &str,
        fields: &[Field],
        parent: u64,
    ) -> io::Result<()> {
        if !self.has_activities() {
            if !text.is_empty() {
                return self.log(level, &format!("{text}..."));
            }
            return Ok(());
        }
        self.send(|w| {
            w.u64(stderr::STDERR_START_ACTIVITY)?;
            w.u64(id)?;
            w.u64(level)?;
            w.u64(kind)?;
            w.str(text)?;
            stderr::write_fields(w, fields)?;
            w.u64(parent)
        })
    }

    pub fn stop_activity(&mut self, id: u64) -> io::Result<()> {
        if !self.has_activities() {
            return Ok(());
        }
        self.send(|w| {
            w.u64(stderr::STDERR_STOP_ACTIVITY)?;
            w.u64(id)
        })
    }

    pub fn result(&mut self, id: u64, kind: u64, fields: &[Field]) -> io::Result<()> {
        if !self.has_activities() {
            return Ok(());
        }
        self.send(|w| {
            w.u64(stderr::STDERR_RESULT)?;
            w.u64(id)?;
            w.u64(kind)?;
            stderr::write_fields(w, fields)
        })
    }

    /// Data for the client's sink (`STDERR_WRITE`, as `ExportPath` sends it).
    pub fn write_data(&mut self, data: &[u8]) -> io::Result<()> {
        self.send(|w| {
            w.u64(stderr::STDERR_WRITE)?;
            w.bytes(data)
        })
    }

    /// The operation's incoming data (framed, inline or pulled from the client).
    pub fn data(&mut self) -> DataReader<'_, 'a> {
        DataReader { io: self }
    }

    fn read_framed(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.frame_left == 0 {
            if self.frame_done {
                return Ok(0);
            }
            let n = self
                .r
                .u64("frame length")
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if n == 0 {
                self.frame_done = true;
                return Ok(0);
            }
            self.frame_left = n;
        }
        let want = buf
            .len()
            .min(self.frame_left.min(usize::MAX as u64) as usize);
        let n = self.r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a frame",
            ));
        }
        self.frame_left -= n as u64;
        Ok(n)
    }

    fn read_tunnel(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(32 * 1024);
        self.send(|w| {
            w.u64(stderr::STDERR_READ)?;
            w.u64(want as u64)
        })?;
        let n = self
            .r
            .u64("data length")
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "unexpected end-of-file",
            ));
        }
        if n > want as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the client sent {n} bytes where at most {want} were asked for"),
            ));
        }
        let n = n as usize;
        self.r.read_exact(&mut buf[..n])?;
        let pad = (8 - n % 8) % 8;
        let mut p = [0u8; 8];
        self.r.read_exact(&mut p[..pad])?;
        if p[..pad].iter().any(|&b| b != 0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "non-zero padding",
            ));
        }
        Ok(n)
    }

    fn drain(&mut self) -> io::Result<()> {
        if self.data == DataStream::Framed {
            let mut buf = [0u8; 16 * 1024];
            while self.read_framed(&mut buf)? > 0 {}
        }
        Ok(())
    }
}

/// Reads an operation's data; see [`OpIo::data`].
pub struct DataReader<'b, 'a> {
    io: &'b mut OpIo<'a>,
}

impl std::fmt::Debug for DataReader<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataReader")
    }
}

impl Read for DataReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = match self.io.data {
            DataStream::None => Ok(0),
            DataStream::Framed => self.io.read_framed(buf),
            DataStream::Inline => self.io.r.read(buf),
            DataStream::Tunnel => self.io.read_tunnel(buf),
        };
        if r.is_err() {
            self.io.data_error = true;
        }
        r
    }
}

/// Serves one connection until the client closes it or it becomes unusable.
///
/// `accept` sees the client's version and returns the handler for the connection, or an
/// error the client is told about before the connection closes.
pub fn serve<H: Handler>(
    reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    fd: Option<BorrowedFd<'_>>,
    cfg: &ServerConfig,
    accept: impl FnOnce(Hello) -> Result<H, RemoteError>,
) -> Result<Summary, Error> {
    let mut r: Rd = WireReader::new(BufReader::with_capacity(32 * 1024, reader));
    let mut w: Wr = io::BufWriter::with_capacity(32 * 1024, writer);
    let mut summary = Summary::default();

    match r.u64_or_eof("magic")? {
        Some(WORKER_MAGIC_1) => {}
        Some(m) => return Err(Error::Protocol(format!("protocol mismatch (magic {m:#x})"))),
        None => return Ok(summary),
    }
    // Nix ≥ 2.23 sends its version in the same write as the magic: then it is in the
    // buffer already, and a Nix client gets Nix's own 1.38 (a newer 1.x client settles
    // on it). Anyone else gets 0x164 before kiln can know who it is (see `version`).
    let early = r.get_ref().buffer().get(..8).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Version(u64::from_le_bytes(a))
    });
    let advertised = match early {
        Some(v) if v.major() == 1 && v.dialect() == Dialect::Nix => NIX_VERSION,
        _ => DAEMON_VERSION,
    };
    w.u64(WORKER_MAGIC_2)?;
    w.u64(advertised)?;
    w.flush()?;
    let client = Version(r.u64("client version")?);
    let mut negotiated = Proto::for_client(client);
    if let Ok(p) = negotiated {
        if p.dialect() == Dialect::Nix
            && client.minor() > p.version().minor()
            && advertised != NIX_VERSION
        {
            // It saw 0x164, so it takes its own version for the connection's, which kiln
            // does not speak: refused, rather than misread from here on. (Every Nix that
            // announces more than 1.38 sends its version with its greeting, so it is
            // answered with 1.38; this is a client that split the two.)
            negotiated = Err(format!(
                "the client announced Nix protocol {client} after kiln had offered {}: kiln speaks up to 1.{}; send the version with the greeting (as Nix does) to settle on that",
                Version(advertised),
                crate::version::NIX_MAX_MINOR
            ));
        }
    }
    // The rest of the handshake in the layout the client will use, so that a refused
    // client still reads its error where it expects the stderr channel.
    let mut p = match negotiated {
        Ok(p) => p,
        Err(_) if client.major() == 1 && client.dialect() == Dialect::Nix => Proto::nix(client.0),
        Err(_) => Proto::nix(0x100),
    };
    if p.feature_exchange() {
        let theirs = match r.strings_bounded(MAX_FEATURES, MAX_FEATURE_NAME, "client features") {
            Ok(t) => t,
            Err(e) => {
                // Told where the daemon's feature list was expected: a client cannot parse
                // it, but the bytes say why to whoever reads them, and the log does.
                let message = format!("bad handshake: {e}");
                let _ = write_error(
                    &mut w,
                    p,
                    &RemoteError {
                        message: message.clone(),
                        status: 1,
                    },
                );
                let _ = w.flush();
                return Err(Error::Refused(message));
            }
        };
        let ours = SUPPORTED_FEATURES;
        w.strs(ours.names())?;
        w.flush()?;
        p = p
            .with_features(ours.intersect(Features::from_names(theirs.iter().map(String::as_str))));
    }
    if p.cpu_affinity() && r.u64("CPU affinity flag")? != 0 {
        // Nix 2.23 sends its version a second time here: a non-zero "flag" followed by
        // the real flag, 0, read as the affinity.
        r.u64("CPU affinity")?;
    }
    if p.reserve_space() {
        r.u64("reserve space")?;
    }
    summary.proto = Some(p);
    let refuse = |w: &mut Wr, e: RemoteError| -> Result<Summary, Error> {
        if p.daemon_version_string() {
            w.str(&cfg.version_string)?;
        }
        if p.trust_flag() {
            w.u64(0)?;
        }
        write_error(w, p, &e)?;
        w.flush()?;
        Err(Error::Refused(e.message))
    };
    if let Err(message) = negotiated {
        return refuse(&mut w, RemoteError { message, status: 1 });
    }
    let mut handler = match accept(Hello {
        client_version: client,
        proto: p,
    }) {
        Ok(h) => h,
        Err(e) => return refuse(&mut w, e),
    };
    if p.daemon_version_string() {
        w.str(&cfg.version_string)?;
    }
    if p.trust_flag() {
        // 0 unknown, 1 trusted, 2 not trusted.
        w.u64(match handler.trusted() {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        })?;
    }
    w.u64(stderr::STDERR_LAST)?;
    w.flush()?;

    let mut verbosity = 0u64;
    loop {
        let Some(n) = r.u64_or_eof("operation")? else {
            return Ok(summary);
        };
        summary.ops += 1;
        let Some(op) = Op::from_wire(n, p) else {
            let e = RemoteError {
                // nix-daemon 2.34 colours the number as it colours every argument.
                message: if p.nix_2_34_messages() {
                    format!("invalid operation \x1b[35;1m{n}\x1b[0m")
                } else {
                    format!("invalid operation {n}")
                },
                status: 1,
            };
            write_error(&mut w, p, &e)?;
            w.flush()?;
            return Err(Error::Protocol(e.message));
        };
        let req = match Request::read(op, p, &cfg.store_dir, &mut r) {
            Ok(q) => q,
            Err(e) => {
                let msg = format!("reading the request of operation {}: {e}", op.name());
                // Best effort: the client may be gone.
                let _ = write_error(
                    &mut w,
                    p,
                    &RemoteError {
                        message: msg.clone(),
                        status: 1,
                    },
                );
                let _ = w.flush();
                return Err(Error::Protocol(msg));
            }
        };
        if let Request::SetOptions(o) = &req {
            verbosity = o.verbosity;
        }
        let data = req.data_stream(p);
        let mut io = OpIo {
            r: &mut r,
            w: &mut w,
            proto: p,
            verbosity,
            data,
            frame_left: 0,
            frame_done: false,
            data_error: false,
            fd,
        };
        let res = handler.handle(req, &mut io);
        let data_error = io.data_error;
        let drained = if data_error { Ok(()) } else { io.drain() };
        if let Err(e) = drained {
            let msg = format!("reading the data of operation {}: {e}", op.name());
            let _ = write_error(
                &mut w,
                p,
                &RemoteError {
                    message: msg.clone(),
                    status: 1,
                },
            );
            let _ = w.flush();
            return Err(Error::Protocol(msg));
        }
        // After a broken data stream, or an inline archive the handler gave up on, where
        // the next operation starts is unknown: report, then close.
        let close = data_error || (res.is_err() && data == DataStream::Inline);
        match res {
            Ok(reply) => {
                w.u64(stderr::STDERR_LAST)?;
                reply.write(p, &cfg.store_dir, &mut w)?;
                w.flush()?;
            }
            Err(e) => {
                write_error(&mut w, p, &e)?;
                w.flush()?;
            }
        }
        if close {
            return Err(Error::Protocol(format!(
                "closing the connection after operation {}: its data could not be read to the end",
                op.name()
            )));
        }
    }
}
