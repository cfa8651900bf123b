//! The daemon-to-client side channel that runs while an operation works: log lines,
//! activities with their results, data requests (`STDERR_READ`), data for the client
//! (`STDERR_WRITE`), and the end of the operation (`STDERR_LAST` or `STDERR_ERROR`).

use std::io::{self, Write};

use kiln_format::wire::{write_bytes, write_u64};

use crate::version::Proto;

pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_READ: u64 = 0x6461_7461;
pub const STDERR_WRITE: u64 = 0x6461_7416;
pub const STDERR_LAST: u64 = 0x616c_7473;
pub const STDERR_ERROR: u64 = 0x6378_7470;
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Nix's verbosity levels.
pub mod level {
    pub const ERROR: u64 = 0;
    pub const WARN: u64 = 1;
    pub const NOTICE: u64 = 2;
    pub const INFO: u64 = 3;
    pub const TALKATIVE: u64 = 4;
    pub const CHATTY: u64 = 5;
    pub const DEBUG: u64 = 6;
    pub const VOMIT: u64 = 7;
}

/// Activity types (`ActivityType` in Nix's `logging.hh`).
pub mod activity {
    pub const UNKNOWN: u64 = 0;
    pub const COPY_PATH: u64 = 100;
    pub const FILE_TRANSFER: u64 = 101;
    pub const REALISE: u64 = 102;
    pub const COPY_PATHS: u64 = 103;
    pub const BUILDS: u64 = 104;
    pub const BUILD: u64 = 105;
    pub const OPTIMISE_STORE: u64 = 106;
    pub const VERIFY_PATHS: u64 = 107;
    pub const SUBSTITUTE: u64 = 108;
    pub const QUERY_PATH_INFO: u64 = 109;
    pub const POST_BUILD_HOOK: u64 = 110;
    pub const BUILD_WAITING: u64 = 111;
}

/// Result types (`ResultType`).
pub mod result {
    pub const FILE_LINKED: u64 = 100;
    pub const BUILD_LOG_LINE: u64 = 101;
    pub const UNTRUSTED_PATH: u64 = 102;
    pub const CORRUPTED_PATH: u64 = 103;
    pub const SET_PHASE: u64 = 104;
    pub const PROGRESS: u64 = 105;
    pub const SET_EXPECTED: u64 = 106;
    pub const POST_BUILD_LOG_LINE: u64 = 107;
}

/// A field of an activity or result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    String(String),
}

impl From<u64> for Field {
    fn from(v: u64) -> Self {
        Field::Int(v)
    }
}

impl From<&str> for Field {
    fn from(v: &str) -> Self {
        Field::String(v.to_string())
    }
}

impl From<String> for Field {
    fn from(v: String) -> Self {
        Field::String(v)
    }
}

pub(crate) fn write_fields(w: &mut impl Write, fields: &[Field]) -> io::Result<()> {
    write_u64(w, fields.len() as u64)?;
    for f in fields {
        match f {
            Field::Int(i) => {
                write_u64(w, 0)?;
                write_u64(w, *i)?;
            }
            Field::String(s) => {
                write_u64(w, 1)?;
                write_bytes(w, s.as_bytes())?;
            }
        }
    }
    Ok(())
}

/// An error as a daemon reports it to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub message: String,
    /// The exit status it implies (1 unless a build failure says otherwise: 100, 101, …).
    pub status: u64,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Writes `STDERR_ERROR` in the form the client understands:
/// * Guix: the message, then the status only if it is not 0;
/// * Nix ≥ 1.26: the structured form (`"Error"`, level, name, message, no position, no
///   traces);
/// * older Nix: the message with Nix's `error:` prefix, then the status.
pub fn write_error(w: &mut impl Write, v: Proto, e: &RemoteError) -> io::Result<()> {
    write_u64(w, STDERR_ERROR)?;
    if v.is_guix() {
        write_bytes(w, e.message.as_bytes())?;
        if e.status != 0 {
            write_u64(w, e.status)?;
        }
    } else if v.structured_errors() {
        write_bytes(w, b"Error")?;
        write_u64(w, level::ERROR)?;
        write_bytes(w, b"Error")?;
        write_bytes(w, e.message.as_bytes())?;
        write_u64(w, 0)?; // no position
        write_u64(w, 0)?; // no traces
    } else {
        write_bytes(w, format!("error: {}", e.message).as_bytes())?;
        write_u64(w, e.status)?;
    }
    Ok(())
}
