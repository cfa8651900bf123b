//! The store's error type.

use std::path::PathBuf;

/// Errors of the local store. Messages name the path, the setting or the operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Format(#[from] kiln_format::Error),
    #[error("database error while {context}: {source}")]
    Db {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot {action} '{}': {source}", path.display())]
    Io {
        path: PathBuf,
        action: String,
        #[source]
        source: std::io::Error,
    },
    /// A path that must be valid is not.
    #[error("path '{0}' is not valid")]
    NotValid(String),
    /// Input that does not make sense (from a user, a client, an archive).
    #[error("{0}")]
    Invalid(String),
    #[error("hash mismatch for '{path}': expected {expected}, got {actual}")]
    HashMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Schema(String),
    #[error("the store is opened read-only; cannot {0}")]
    ReadOnly(String),
    /// The store's own data is inconsistent.
    #[error("{0}")]
    Corrupt(String),
    /// A path cannot be deleted because something still needs it.
    #[error("{0}")]
    StillAlive(String),
    /// A path cannot be deleted because a root reaches it (Nix's wording; callers add
    /// how to find out why in their own commands' terms).
    #[error("Cannot delete path '{path}' since it is still alive.")]
    Alive { path: String },
    /// Writing a path's contents failed (a full disk, an I/O error, a bad archive): the
    /// message names the store path, not only the temporary it was being written to.
    #[error("cannot add '{path}' to the store: {source}")]
    Adding {
        path: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        action: &str,
        source: impl Into<std::io::Error>,
    ) -> Self {
        Error::Io {
            path: path.into(),
            action: action.to_string(),
            source: source.into(),
        }
    }

    pub(crate) fn db(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Error {
        let context = context.into();
        move |source| Error::Db { context, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
