//! The build engine's error type.

/// Errors of the build engine that are not build results (those are [`crate::BuildResult`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] kiln_store::Error),
    #[error(transparent)]
    Format(#[from] kiln_format::Error),
    #[error(transparent)]
    Sandbox(#[from] kiln_sandbox::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot {action} '{}': {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the build scheduler has stopped")]
    SchedulerGone,
}

impl Error {
    pub(crate) fn io(
        path: impl Into<std::path::PathBuf>,
        action: &str,
        source: impl Into<std::io::Error>,
    ) -> Self {
        Error::Io {
            path: path.into(),
            action: action.to_string(),
            source: source.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
