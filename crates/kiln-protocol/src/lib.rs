//! The Nix/Guix worker protocol, both sides, with no store behind it.
//!
//! * [`version`]: versions, the handshake's negotiation, and every capability that
//!   depends on them ([`Proto`]), with the table of which operations exist for whom.
//! * [`wire`]: bounded reading and writing of integers, strings, store paths, lists and
//!   framed streams, with byte offsets in every error.
//! * [`ops`]: operation numbers, requests and replies in every version's layout.
//! * [`stderr`]: log lines, activities, results and errors sent while an operation runs.
//! * [`server`]: the daemon side of a connection, generic over a [`server::Handler`].
//! * [`client`]: the client side.
//! * [`serve`]: the legacy serve protocol (`ssh://`, `nix-store --serve`).
//!
//! Reference: Nix 2.8.0 – 2.35's `worker-protocol.hh`, `daemon.cc` and `remote-store.cc`, and
//! Guix's `nix-daemon.cc` and `guix/store.scm`; the exact layouts are noted where they are
//! implemented.

#![forbid(unsafe_code)]

pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod ops;
pub mod serve;
pub mod server;
pub mod stderr;
pub mod version;
pub mod wire;

pub use client::{Client, Message};
pub use ops::{
    BuildMode, ClientOptions, DerivedPath, Missing, Op, OutputSpec, Reply, Request,
    SubstitutableInfo, WireBuildResult,
};
pub use server::{serve, Handler, Hello, OpIo, ServerConfig};
pub use stderr::{Field, RemoteError};
pub use version::{Dialect, Feature, Features, Proto, Version};

/// Errors of the protocol crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer sent something that is not valid protocol.
    #[error("malformed data at byte {offset} of the connection: {message}")]
    Malformed { offset: u64, message: String },
    #[error("{0}")]
    Protocol(String),
    /// The handshake refused the client (told to it through the stderr channel).
    #[error("client refused: {0}")]
    Refused(String),
    /// The daemon reported an error for an operation.
    #[error("{0}")]
    Remote(RemoteError),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}
