//! What `kiln store add|add-fixed|path-info|query|gc|delete` ask of a store, answered by
//! the store itself ([`Local`]) or by a daemon ([`super::via_daemon::DaemonStore`]): one
//! implementation of those commands' output for both.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use kiln_format::{FileIngestionMethod, HashAlgo, StoreDir, StorePath, ValidPathInfo};
use kiln_store::gc::{self, GcAction, GcOptions};
use kiln_store::LocalStore;

/// What `kiln store gc` asks of a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Collect {
    /// List the live paths (`--print-live`).
    Live,
    /// List the dead paths (`--dry-run`).
    Dead,
    /// Delete the dead paths.
    Delete,
}

pub(super) trait Access {
    fn store_dir(&self) -> &StoreDir;
    /// A path named on the command line (in the store or below a store path).
    fn parse(&self, s: &str) -> anyhow::Result<StorePath>;
    fn is_valid(&mut self, p: &StorePath) -> anyhow::Result<bool>;
    /// The info of a valid path (an error naming it otherwise).
    fn info(&mut self, p: &StorePath) -> anyhow::Result<ValidPathInfo>;
    fn references(&mut self, p: &StorePath) -> anyhow::Result<Vec<StorePath>>;
    fn referrers(&mut self, p: &StorePath) -> anyhow::Result<Vec<StorePath>>;
    fn valid_derivers(&mut self, p: &StorePath) -> anyhow::Result<Vec<StorePath>>;
    fn output_map(
        &mut self,
        drv: &StorePath,
    ) -> anyhow::Result<BTreeMap<String, Option<StorePath>>>;
    /// The closure of `paths` (with `reverse`, of their referrers).
    fn closure(
        &mut self,
        paths: &[StorePath],
        reverse: bool,
    ) -> anyhow::Result<BTreeSet<StorePath>>;
    /// The same, dependencies first, as `nix-store -qR` prints it.
    fn closure_in_order(
        &mut self,
        paths: &[StorePath],
        reverse: bool,
    ) -> anyhow::Result<Vec<String>>;
    /// The garbage collector's roots (`link -> path`).
    fn roots(&mut self) -> anyhow::Result<Vec<(String, StorePath)>>;
    fn add(
        &mut self,
        path: &Path,
        name: &str,
        method: FileIngestionMethod,
        algo: HashAlgo,
    ) -> anyhow::Result<StorePath>;
    /// A collection of the whole store: the paths it listed or deleted, the bytes freed.
    fn collect(&mut self, what: Collect, max_freed: u64) -> anyhow::Result<(Vec<String>, u64)>;
    /// Deletes `paths` if dead (with `skip_alive`, skipping the live ones instead of
    /// failing; with `also_referrers`, with their dead referrers).
    fn delete(
        &mut self,
        paths: Vec<StorePath>,
        skip_alive: bool,
        also_referrers: bool,
    ) -> anyhow::Result<(Vec<String>, u64)>;
}

/// The store opened by this process.
pub(super) struct Local<'a>(pub &'a LocalStore);

impl Access for Local<'_> {
    fn store_dir(&self) -> &StoreDir {
        self.0.store_dir()
    }
    fn parse(&self, s: &str) -> anyhow::Result<StorePath> {
        super::store::parse(self.0, s)
    }
    fn is_valid(&mut self, p: &StorePath) -> anyhow::Result<bool> {
        Ok(self.0.is_valid(p)?)
    }
    fn info(&mut self, p: &StorePath) -> anyhow::Result<ValidPathInfo> {
        Ok(self.0.path_info(p)?)
    }
    fn references(&mut self, p: &StorePath) -> anyhow::Result<Vec<StorePath>> {
        Ok(self.0.query_references(p)?.into_iter().collect())
    }
    fn referrers(&mut self, p: &StorePath) -> anyhow::Result<Vec<StorePath>> {
        Ok(self.0.query_referrers(p)?.into_iter().collect())
    }
    fn valid_derivers(&mut self, p: &StorePath) -> anyhow::Result<Vec<StorePath>> {
        Ok(self.0.query_valid_derivers(p)?.into_iter().collect())
    }
    fn output_map(
        &mut self,
        drv: &StorePath,
    ) -> anyhow::Result<BTreeMap<String, Option<StorePath>>> {
        Ok(self.0.derivation_output_map(drv)?.into_iter().collect())
    }
    fn closure(
        &mut self,
        paths: &[StorePath],
        reverse: bool,
    ) -> anyhow::Result<BTreeSet<StorePath>> {
        Ok(self.0.closure(paths, reverse)?)
    }
    fn closure_in_order(
        &mut self,
        paths: &[StorePath],
        reverse: bool,
    ) -> anyhow::Result<Vec<String>> {
        Ok(self.0.closure_in_order(paths, reverse)?)
    }
    fn roots(&mut self) -> anyhow::Result<Vec<(String, StorePath)>> {
        Ok(kiln_store::gc::find_roots(self.0, true)?
            .into_iter()
            .collect())
    }
    fn add(
        &mut self,
        path: &Path,
        name: &str,
        method: FileIngestionMethod,
        algo: HashAlgo,
    ) -> anyhow::Result<StorePath> {
        Ok(self.0.add_path(path, name, method, algo)?.path)
    }
    fn collect(&mut self, what: Collect, max_freed: u64) -> anyhow::Result<(Vec<String>, u64)> {
        let action = match what {
            Collect::Live => GcAction::ReturnLive,
            Collect::Dead => GcAction::ReturnDead,
            Collect::Delete => GcAction::DeleteDead,
        };
        let r = gc::collect_garbage(
            self.0,
            &GcOptions {
                action,
                max_freed,
                ..Default::default()
            },
        )?;
        Ok((r.paths, r.bytes_freed))
    }
    fn delete(
        &mut self,
        paths: Vec<StorePath>,
        skip_alive: bool,
        also_referrers: bool,
    ) -> anyhow::Result<(Vec<String>, u64)> {
        let r = gc::collect_garbage(
            self.0,
            &GcOptions {
                action: GcAction::DeleteAmong {
                    paths,
                    skip_alive,
                    delete_referrers: also_referrers,
                },
                max_freed: u64::MAX,
                ..Default::default()
            },
        )
        .map_err(|e| match e {
            kiln_store::Error::Alive { ref path } => {
                anyhow::anyhow!("{e} To find out why, use: kiln store query --roots {path}")
            }
            e => e.into(),
        })?;
        Ok((r.paths, r.bytes_freed))
    }
}

impl Access for super::via_daemon::DaemonStore {
    fn store_dir(&self) -> &StoreDir {
        &self.sd
    }
    fn parse(&self, s: &str) -> anyhow::Result<StorePath> {
        super::via_daemon::DaemonStore::parse(self, s)
    }
    fn is_valid(&mut self, p: &StorePath) -> anyhow::Result<bool> {
        super::via_daemon::DaemonStore::is_valid(self, p)
    }
    fn info(&mut self, p: &StorePath) -> anyhow::Result<ValidPathInfo> {
        self.valid_info(p)
    }
    fn references(&mut self, p: &StorePath) -> anyhow::Result<Vec<StorePath>> {
        Ok(self.valid_info(p)?.references.into_iter().collect())
    }
    fn referrers(&mut self, p: &StorePath) -> anyhow::Result<Vec<StorePath>> {
        super::via_daemon::DaemonStore::referrers(self, p)
    }
    fn valid_derivers(&mut self, p: &StorePath) -> anyhow::Result<Vec<StorePath>> {
        super::via_daemon::DaemonStore::valid_derivers(self, p)
    }
    fn output_map(
        &mut self,
        drv: &StorePath,
    ) -> anyhow::Result<BTreeMap<String, Option<StorePath>>> {
        super::via_daemon::DaemonStore::output_map(self, drv)
    }
    fn closure(
        &mut self,
        paths: &[StorePath],
        reverse: bool,
    ) -> anyhow::Result<BTreeSet<StorePath>> {
        super::via_daemon::DaemonStore::closure(self, paths, reverse)
    }
    fn closure_in_order(
        &mut self,
        paths: &[StorePath],
        reverse: bool,
    ) -> anyhow::Result<Vec<String>> {
        super::via_daemon::DaemonStore::closure_in_order(self, paths, reverse)
    }
    fn roots(&mut self) -> anyhow::Result<Vec<(String, StorePath)>> {
        super::via_daemon::DaemonStore::roots(self)
    }
    fn add(
        &mut self,
        path: &Path,
        name: &str,
        method: FileIngestionMethod,
        algo: HashAlgo,
    ) -> anyhow::Result<StorePath> {
        self.add_path(path, name, method, algo)
    }
    fn collect(&mut self, what: Collect, max_freed: u64) -> anyhow::Result<(Vec<String>, u64)> {
        use kiln_protocol::ops::GcAction as Wire;
        let action = match what {
            Collect::Live => Wire::ReturnLive,
            Collect::Dead => Wire::ReturnDead,
            Collect::Delete => Wire::DeleteDead,
        };
        self.gc(action, BTreeSet::new(), false, max_freed)
    }
    fn delete(
        &mut self,
        paths: Vec<StorePath>,
        skip_alive: bool,
        also_referrers: bool,
    ) -> anyhow::Result<(Vec<String>, u64)> {
        use kiln_protocol::ops::GcAction as Wire;
        // Dead ones among those named (skipping the live), or all of them (failing on a
        // live one).
        let action = if skip_alive {
            Wire::DeleteDead
        } else {
            Wire::DeleteSpecific
        };
        self.gc(
            action,
            paths.into_iter().collect(),
            also_referrers,
            u64::MAX,
        )
    }
}
