/// Errors of binary-cache access. Each names the cache URL or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Format(#[from] kiln_format::Error),
    #[error(transparent)]
    Store(#[from] kiln_store::Error),
    /// A URL that is not a cache kiln can use.
    #[error("invalid binary cache URL '{url}': {why}")]
    Url { url: String, why: String },
    /// Fetching or storing a file failed.
    #[error("cannot {action} '{url}': {why}")]
    Transfer {
        url: String,
        action: &'static str,
        why: String,
    },
    /// The cache answered, but with something unusable.
    #[error("{0}")]
    Corrupt(String),
    /// The cache is for another store, or does not look like a cache at all.
    #[error("{0}")]
    Unusable(String),
    /// No configured cache could provide the path: substitution failed.
    #[error("{0}")]
    Failed(String),
    /// No configured cache has the path (none offers it, or one that did lacks its
    /// archive): nothing failed, the path is simply not to be had. A build may go ahead
    /// without `--fallback`.
    #[error("{0}")]
    Unavailable(String),
    /// A narinfo names an archive the cache does not have (`file`, relative to the cache):
    /// the path is not to be had there, as if it had no narinfo.
    #[error("file '{file}' does not exist in binary cache")]
    NarGone { file: String },
    #[error("narinfo cache '{path}': {source}")]
    Db {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
