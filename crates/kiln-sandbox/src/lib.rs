//! Linux isolation for kiln builds.
//!
//! [`spawn`] starts a builder process from a [`ChildSpec`] (plain data prepared in full
//! before the fork): its own session and process group, the log pipe on stdout and stderr,
//! `/dev/null` on stdin, every other descriptor closed at exec, the requested personality,
//! `oom_score_adj`, user and groups, default signal dispositions. The child reports a
//! failed set-up step (and its errno) through a close-on-exec pipe, so the parent learns of
//! it before any build output.
//!
//! This is the only crate of kiln with `unsafe` code; each block says why it is sound.
//! After `fork`, the child calls only async-signal-safe functions (raw system calls on data
//! prepared before the fork): no allocation, no locks, no formatting.

pub mod spawn;

pub use spawn::{spawn, ChildSpec, Spawned, UserSpec};

/// Errors of the sandbox crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot {action}: {source}")]
    Sys {
        action: String,
        #[source]
        source: std::io::Error,
    },
    /// The child failed while setting up the build environment, before exec.
    #[error("while setting up the build environment: {step}: {source}")]
    Setup {
        step: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn sys(action: &str, e: std::io::Error) -> Error {
    Error::Sys {
        action: action.to_string(),
        source: e,
    }
}
