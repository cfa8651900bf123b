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
    /// No configured cache could provide the path.
    #[error("{0}")]
    Failed(String),
    #[error("narinfo cache '{path}': {source}")]
    Db {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
