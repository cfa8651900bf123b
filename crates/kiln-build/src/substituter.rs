//! The interface between the scheduler's substitution goals and whatever fetches paths
//! (binary caches, an external agent). Implemented in `kiln-substitute`.

use std::collections::{BTreeMap, BTreeSet};

use kiln_format::StorePath;
use kiln_store::LocalStore;

use crate::error::Result;

/// What a substituter knows about a path it can provide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubstitutableInfo {
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub nar_size: u64,
    pub download_size: u64,
}

/// Fetches store paths from elsewhere.
pub trait Substituter: Send + Sync {
    /// Information about the paths it can provide (all at once: caches answer in parallel).
    fn query(&self, paths: &[StorePath]) -> Result<BTreeMap<StorePath, SubstitutableInfo>>;
    /// Fetches `path` into `store` (verified, registered). With `repair`, replaces a valid
    /// copy after verifying the new one.
    fn fetch(
        &self,
        store: &LocalStore,
        path: &StorePath,
        repair: bool,
        log: &dyn Fn(&str),
    ) -> Result<()>;
}
