//! Byte-exact store formats of Nix and Guix, with no file-system policy and no database.
//!
//! * [`hash`] and [`base32`]: digests and their printed forms (base16, Nix base32, base64, SRI).
//! * [`store_path`]: store directories, store paths, content addresses and every path
//!   computation (input-addressed outputs, fixed outputs, text, sources).
//! * [`derivation`]: the `.drv` ATerm format, `hashDerivationModulo`, output path checks and
//!   the `nix show-derivation` JSON.
//! * [`git`]: Git object ids of file system objects (the `git` content-address method).
//! * [`nar`]: the NAR archive format: bounded streaming parser, exclusive restore, dump.
//! * [`refscan`]: finding references (hash parts) in streamed bytes.
//! * [`narinfo`] and [`signature`]: binary-cache metadata and ed25519 signatures.
//! * [`realisation`]: which path an output of a content-addressed derivation became.
//!
//! Everything that reads untrusted bytes (ATerm, NAR, narinfo) is bounded and reports the
//! problem with its position; nothing here panics on bad input.

#![forbid(unsafe_code)]

pub mod base32;
pub mod derivation;
#[doc(hidden)]
pub mod fuzzing;
pub mod git;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod path_info;
pub mod realisation;
pub mod refscan;
pub mod signature;
pub mod store_path;
pub mod unix_socket;
pub mod wire;

use std::path::PathBuf;

pub use derivation::Derivation;
pub use hash::{Hash, HashAlgo};
pub use path_info::ValidPathInfo;
pub use store_path::{ContentAddress, FileIngestionMethod, StoreDir, StorePath};

/// Errors of the format library. Every message names the object and, for parsers, the
/// position of the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid base32: {0}")]
    Base32(String),
    #[error("{0}")]
    Hash(String),
    #[error("{0}")]
    StorePath(String),
    #[error("{0}")]
    Derivation(String),
    #[error("bad archive at byte {offset}: {message}")]
    Nar { offset: u64, message: String },
    #[error("{0}")]
    NarInfo(String),
    #[error("{0}")]
    Signature(String),
    #[error("{0}")]
    Wire(String),
    #[error("cannot {action} '{}': {source}", path.display())]
    Io {
        path: PathBuf,
        action: String,
        #[source]
        source: std::io::Error,
    },
}
