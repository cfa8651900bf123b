//! The local store.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kiln_format::derivation::{DerivationHasher, DerivationReader, MAX_DRV_SIZE};
use kiln_format::hash::{HashModuloSink, HashSink, Hasher};
use kiln_format::nar::{self, HashingReader, RestoreOptions};
use kiln_format::realisation::{DrvOutput, Realisation};
use kiln_format::store_path::FileIngestionMethod;
use kiln_format::{ContentAddress, Derivation, Hash, HashAlgo, StoreDir, StorePath, ValidPathInfo};
use rustix::fs::{openat, Mode, OFlags, CWD};

use crate::config::{Layout, Settings};
use crate::db::{Db, NewSchema};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::gc::GcShared;
use crate::lock::{open_lock_file, FdLock, LockKind, LockRegistry, PathLock};
use crate::roots::TempRoots;

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub read_only: bool,
    /// Schema of a database created from scratch.
    pub new_schema: NewSchema,
    /// Sync contents to disk before a path becomes valid.
    pub fsync: bool,
    pub auto_optimise: bool,
    pub keep_outputs: bool,
    pub keep_derivations: bool,
    /// The garbage collector also treats paths used by running processes as roots.
    pub runtime_roots: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            read_only: false,
            new_schema: NewSchema::Nix,
            fsync: true,
            auto_optimise: false,
            keep_outputs: false,
            keep_derivations: true,
            runtime_roots: true,
        }
    }
}

impl StoreOptions {
    pub fn from_settings(s: &Settings, layout: &Layout) -> Self {
        StoreOptions {
            read_only: s.get_bool("read-only"),
            new_schema: if layout.store_dir.as_str() == "/gnu/store" {
                NewSchema::Guix
            } else {
                NewSchema::Nix
            },
            fsync: s.get_bool("fsync-store-paths"),
            auto_optimise: s.get_bool("auto-optimise-store"),
            keep_outputs: s.get_bool("keep-outputs"),
            keep_derivations: s.get_bool("keep-derivations"),
            runtime_roots: s.get_bool("gc-runtime-roots"),
        }
    }
}

/// Options of one add.
#[derive(Debug, Clone, Copy, Default)]
pub struct AddOptions {
    /// Replace the path even if it is valid (after checking the new contents).
    pub repair: bool,
    /// The caller holds the path's lock already (a build goal whose output arrives from a
    /// build machine): taking it again would wait for ourselves.
    pub caller_holds_lock: bool,
}

/// Reads `.drv` files from the physical store directory.
#[derive(Debug, Clone)]
pub struct DrvFiles {
    real_store_dir: PathBuf,
}

impl DrvFiles {
    /// Reads `.drv` files from the store's directory on disk (readable without the
    /// database: `kiln` commands that go through a daemon hash derivations with it).
    pub fn new(real_store_dir: PathBuf) -> DrvFiles {
        DrvFiles { real_store_dir }
    }
}

impl DerivationReader for DrvFiles {
    fn read_derivation(
        &self,
        sd: &StoreDir,
        p: &StorePath,
    ) -> std::result::Result<Derivation, kiln_format::Error> {
        read_drv_file(&self.real_store_dir.join(p.base_name()), sd, p)
    }
}

fn read_drv_file(
    file: &Path,
    sd: &StoreDir,
    p: &StorePath,
) -> std::result::Result<Derivation, kiln_format::Error> {
    let io = |e: std::io::Error| kiln_format::Error::Io {
        path: file.to_path_buf(),
        action: "read derivation".into(),
        source: e,
    };
    let f = std::fs::File::open(file).map_err(io)?;
    let mut text = Vec::new();
    f.take(MAX_DRV_SIZE as u64 + 1)
        .read_to_end(&mut text)
        .map_err(io)?;
    let name = p
        .derivation_name()
        .ok_or_else(|| kiln_format::Error::Derivation(format!("'{p}' is not a derivation")))?;
    Derivation::parse(sd, name, &text)
}

/// A temporary store path being filled; removed on drop unless kept. It is a temp root
/// while it lives, so no collector (of this or another process) removes it.
pub struct ScratchPath<'a> {
    store: &'a LocalStore,
    path: StorePath,
    real: PathBuf,
    armed: bool,
}

impl ScratchPath<'_> {
    /// Where it is on disk.
    pub fn real(&self) -> &Path {
        &self.real
    }
    /// Keeps the contents (they were moved elsewhere or are wanted).
    pub fn keep(&mut self) {
        self.armed = false;
    }
}

impl std::fmt::Debug for ScratchPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScratchPath({})", self.real.display())
    }
}

impl Drop for ScratchPath<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = fsutil::remove_tree(&self.real) {
                tracing::warn!(
                    "cannot remove temporary path '{}': {e}",
                    self.real.display()
                );
            }
        }
        self.store.remove_temp_root(&self.path);
    }
}

/// The local store.
#[derive(Debug)]
pub struct LocalStore {
    layout: Layout,
    pub(crate) db: Db,
    opts: StoreOptions,
    locks: LockRegistry,
    pub(crate) temp_roots: TempRoots,
    pub(crate) gc: GcShared,
    hasher: Mutex<DerivationHasher<DrvFiles>>,
    counter: AtomicU64,
    store_fd: OwnedFd,
    _big_lock: Option<FdLock>,
    /// Device and inode of `db.sqlite` when it was opened (see `database_replaced`).
    db_identity: Option<(u64, u64)>,
    /// Makes registered paths durable in the background (see [`crate::durability`]);
    /// dropped before the lock below.
    syncer: Option<crate::durability::Syncer>,
    /// `kiln-durability.lock`, held shared while this store may write marks.
    _durability_lock: Option<FdLock>,
}

/// Creates the store's directories that are missing (as Nix does each time it opens a
/// store, so that a deleted `profiles/` or `.links` comes back).
fn ensure_state_dirs(layout: &Layout) -> Result<()> {
    fsutil::ensure_dir(&layout.real_store_dir, 0o755)?;
    for d in [
        layout.real_store_dir.join(".links"),
        layout.state_dir.clone(),
        layout.gcroots_dir().join("auto"),
        layout.gcroots_dir().join("per-user"),
        layout.temproots_dir(),
        layout.profiles_dir().join("per-user"),
        layout.log_dir.join("drvs"),
    ] {
        fsutil::ensure_dir(&d, 0o755)?;
    }
    let link = layout.gcroots_dir().join("profiles");
    if std::fs::symlink_metadata(&link).is_err() {
        let _ = std::os::unix::fs::symlink(layout.profiles_dir(), &link);
    }
    Ok(())
}

/// Device and inode of a file, if it exists.
fn file_identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl LocalStore {
    /// Opens the store, creating its directories and database if needed.
    pub fn open(layout: Layout, opts: StoreOptions) -> Result<LocalStore> {
        if !opts.read_only {
            ensure_state_dirs(&layout)?;
        }
        let store_fd = openat(
            CWD,
            &layout.real_store_dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(&layout.real_store_dir, "open store directory", e))?;
        // Nix holds `big-lock` exclusively while it creates or upgrades the schema and shared
        // while it uses the store. kiln does the same: two processes opening a new store at
        // once cannot race on creating the database, and a Nix upgrade cannot run under us.
        let big_lock = if opts.read_only {
            None
        } else {
            fsutil::ensure_dir(&layout.db_dir(), 0o755)?;
            let p = layout.db_dir().join("big-lock");
            // Exclusive only to create or upgrade the schema: an existing, current database
            // is opened under the shared lock (another kiln or Nix may hold it shared).
            let current = std::fs::read_to_string(layout.db_dir().join("schema"))
                .is_ok_and(|v| matches!(v.trim(), "7" | "10"));
            let init = if current {
                None
            } else {
                FdLock::acquire(open_lock_file(&p)?, LockKind::Exclusive, true, &p)?.ok()
            };
            let db = Db::open(&layout.db_dir(), opts.new_schema, opts.read_only);
            drop(init);
            let shared = FdLock::acquire(open_lock_file(&p)?, LockKind::Shared, true, &p)?.ok();
            Some((db?, shared))
        };
        let (db, big_lock) = match big_lock {
            Some((db, l)) => (db, l),
            None => (
                Db::open(&layout.db_dir(), opts.new_schema, opts.read_only)?,
                None,
            ),
        };
        let hasher = Mutex::new(DerivationHasher::new(DrvFiles {
            real_store_dir: layout.real_store_dir.clone(),
        }));
        let store = LocalStore {
            temp_roots: TempRoots::new(&layout),
            gc: GcShared::default(),
            layout,
            db,
            opts,
            locks: LockRegistry::default(),
            hasher,
            counter: AtomicU64::new(0),
            store_fd,
            _big_lock: big_lock,
            db_identity: None,
            syncer: None,
            _durability_lock: None,
        };
        let mut store = store;
        store.db_identity = file_identity(&store.layout.db_dir().join("db.sqlite"));
        if !store.opts.read_only {
            store.start_durability()?;
        }
        Ok(store)
    }

    /// Whether the database this store opened has since been deleted or replaced (the
    /// state directory wiped, a backup restored). A long-lived process (the daemon) checks
    /// this when a client connects and reopens the store: Nix's daemon reopened the store
    /// for every client, so clients expect to see the store as it is on disk now.
    pub fn database_replaced(&self) -> bool {
        !self.opts.read_only
            && file_identity(&self.layout.db_dir().join("db.sqlite")) != self.db_identity
    }

    /// Makes sure the store's directories and `user`'s own profile and GC-root directories
    /// (`profiles/per-user/USER`, `gcroots/per-user/USER`, owned by `uid` when we are root)
    /// exist, as Nix's daemon does for every client: `nix-env` takes its profile lock
    /// there. Two `stat`s when everything is in place.
    pub fn ensure_user_dirs(&self, user: &str, uid: u32) -> Result<()> {
        if self.opts.read_only || user.is_empty() || user.contains('/') || user.starts_with('.') {
            return Ok(());
        }
        let dirs = [
            self.layout.profiles_dir().join("per-user").join(user),
            self.layout.gcroots_dir().join("per-user").join(user),
        ];
        if dirs.iter().all(|d| d.is_dir()) && self.layout.real_store_dir.join(".links").is_dir() {
            return Ok(());
        }
        ensure_state_dirs(&self.layout)?;
        let root = rustix::process::geteuid().is_root();
        for d in dirs {
            fsutil::ensure_dir(&d, 0o755)?;
            if root {
                std::os::unix::fs::chown(&d, Some(uid), None)
                    .map_err(|e| Error::io(&d, "change the owner of", e))?;
            }
        }
        Ok(())
    }

    /// Opens this store again, with the same layout and options.
    pub fn reopen(&self) -> Result<LocalStore> {
        LocalStore::open(self.layout.clone(), self.opts.clone())
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn store_dir(&self) -> &StoreDir {
        &self.layout.store_dir
    }
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }
    pub fn db(&self) -> &Db {
        &self.db
    }
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        self.layout.real_path(p)
    }
    pub fn print(&self, p: &StorePath) -> String {
        self.layout.store_dir.display(p)
    }
    /// Parses an absolute store path of this store.
    pub fn parse_path(&self, s: &str) -> Result<StorePath> {
        Ok(self.layout.store_dir.parse_path(s)?)
    }
    pub fn lock_registry(&self) -> &LockRegistry {
        &self.locks
    }

    /// Removes a store path's files (after it was invalidated), relative to the store
    /// directory's descriptor. Returns bytes freed.
    pub fn remove_path_files(&self, p: &StorePath) -> Result<u64> {
        let name = std::ffi::CString::new(p.base_name())
            .map_err(|_| Error::Invalid("NUL in path".into()))?;
        fsutil::remove_tree_at(&self.store_fd, &name, &self.real_path(p))
    }

    // ---- queries ------------------------------------------------------------------------

    pub fn is_valid(&self, p: &StorePath) -> Result<bool> {
        let abs = self.print(p);
        self.db.read(|c| Db::is_valid(c, &abs))
    }

    /// Which of `paths` are valid.
    pub fn query_valid_paths<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a StorePath>,
    ) -> Result<BTreeSet<StorePath>> {
        let paths: Vec<&StorePath> = paths.into_iter().collect();
        self.db.read(|c| {
            let mut out = BTreeSet::new();
            for p in paths {
                if Db::is_valid(c, &self.print(p))? {
                    out.insert(p.clone());
                }
            }
            Ok(out)
        })
    }

    pub fn query_path_info(&self, p: &StorePath) -> Result<Option<ValidPathInfo>> {
        // One snapshot for the row and its references (and one lock cycle for both): one
        // statement, or a transaction around two.
        if self.db.path_info_in_one_statement() {
            self.db
                .read(|c| self.db.query_path_info(c, self.store_dir(), p))
        } else {
            self.db
                .read_tx(|c| self.db.query_path_info(c, self.store_dir(), p))
        }
    }

    /// Changes whenever this process has written to the store's database ([`Db::generation`]).
    pub fn generation(&self) -> u64 {
        self.db.generation()
    }

    /// Path info of a path that must be valid.
    pub fn path_info(&self, p: &StorePath) -> Result<ValidPathInfo> {
        self.query_path_info(p)?
            .ok_or_else(|| Error::NotValid(self.print(p)))
    }

    pub fn query_references(&self, p: &StorePath) -> Result<BTreeSet<StorePath>> {
        Ok(self.path_info(p)?.references)
    }

    pub fn query_referrers(&self, p: &StorePath) -> Result<BTreeSet<StorePath>> {
        let abs = self.print(p);
        let v = self.db.read(|c| Db::query_referrers(c, &abs))?;
        Ok(v.iter()
            .filter_map(|s| self.store_dir().parse_path(s).ok())
            .collect())
    }

    pub fn query_valid_derivers(&self, p: &StorePath) -> Result<BTreeSet<StorePath>> {
        let abs = self.print(p);
        let v = self.db.read(|c| Db::query_valid_derivers(c, &abs))?;
        Ok(v.iter()
            .filter_map(|s| self.store_dir().parse_path(s).ok())
            .collect())
    }

    /// Output name → path of a valid derivation, from the database.
    pub fn query_derivation_outputs(&self, drv: &StorePath) -> Result<BTreeMap<String, StorePath>> {
        let abs = self.print(drv);
        let v = self.db.read(|c| {
            if !Db::is_valid(c, &abs)? {
                return Err(Error::NotValid(abs.clone()));
            }
            Db::query_derivation_outputs(c, &abs)
        })?;
        Ok(v.into_iter()
            .filter_map(|(n, p)| self.store_dir().parse_path(&p).ok().map(|p| (n, p)))
            .collect())
    }

    /// Output name → path where it is known: from the `.drv` file itself (works for any
    /// derivation in the store, as `QueryDerivationOutputMap` needs), or for outputs whose
    /// path is only known once built (floating content-addressed, deferred) from their
    /// realisations.
    pub fn derivation_output_map(
        &self,
        drv_path: &StorePath,
    ) -> Result<BTreeMap<String, Option<StorePath>>> {
        let d = self.read_derivation(drv_path)?;
        self.output_map_of(drv_path, &d)
    }

    /// [`LocalStore::derivation_output_map`] of a derivation already read.
    pub fn output_map_of(
        &self,
        drv_path: &StorePath,
        d: &Derivation,
    ) -> Result<BTreeMap<String, Option<StorePath>>> {
        let mut out = BTreeMap::new();
        let mut hash = None;
        for (name, o) in &d.outputs {
            let p = match &o.path {
                Some(p) => Some(p.clone()),
                // Impure outputs are never reused: not known until built again.
                None if o.floating.is_some_and(|f| f.impure) => None,
                None => {
                    let h = match hash {
                        Some(h) => h,
                        None => *hash.insert(self.output_hash(drv_path, d)?),
                    };
                    self.query_realisation(&DrvOutput::new(h, name))?
                        .map(|r| r.out_path)
                }
            };
            out.insert(name.clone(), p);
        }
        Ok(out)
    }

    pub fn query_path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>> {
        let p = self
            .db
            .read(|c| Db::query_path_from_hash_part(c, self.store_dir(), hash_part))?;
        Ok(p.and_then(|s| self.store_dir().parse_path(&s).ok()))
    }

    pub fn query_all_valid_paths(&self) -> Result<BTreeSet<StorePath>> {
        let v = self.db.read(Db::all_valid_paths)?;
        Ok(v.iter()
            .filter_map(|s| self.store_dir().parse_path(s).ok())
            .collect())
    }

    /// Forward (`reverse = false`) or reverse closure of valid paths.
    pub fn closure<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a StorePath>,
        reverse: bool,
    ) -> Result<BTreeSet<StorePath>> {
        let abs: Vec<String> = paths.into_iter().map(|p| self.print(p)).collect();
        for a in &abs {
            if !self.db.read(|c| Db::is_valid(c, a))? {
                return Err(Error::NotValid(a.clone()));
            }
        }
        let v = self.db.read(|c| Db::closure(c, &abs, reverse))?;
        Ok(v.iter()
            .filter_map(|s| self.store_dir().parse_path(s).ok())
            .collect())
    }

    /// The closure of valid paths as absolute paths, dependencies first, in exactly the order
    /// `nix-store -qR` prints (one query for the whole graph).
    pub fn closure_in_order<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a StorePath>,
        reverse: bool,
    ) -> Result<Vec<String>> {
        let abs: Vec<String> = paths.into_iter().map(|p| self.print(p)).collect();
        let (names, edges) = self.db.read(|c| {
            for a in &abs {
                if !Db::is_valid(c, a)? {
                    return Err(Error::NotValid(a.clone()));
                }
            }
            Db::closure_graph(c, &abs, reverse)
        })?;
        let order = crate::export::topo_order(&names, &edges);
        Ok(order.into_iter().map(|i| names[i].clone()).collect())
    }

    /// Reads a derivation from the store.
    pub fn read_derivation(&self, drv: &StorePath) -> Result<Derivation> {
        Ok(read_drv_file(&self.real_path(drv), self.store_dir(), drv)?)
    }

    /// `hashDerivationModulo` of a valid derivation (cached across calls).
    pub fn derivation_hash(&self, drv: &StorePath) -> Result<Hash> {
        let mut h = self
            .hasher
            .lock()
            .map_err(|_| Error::Corrupt("hasher lock poisoned".into()))?;
        h.trim_cache(200_000);
        Ok(h.hash_of_path(self.store_dir(), drv)?)
    }

    /// The hash that identifies a derivation's outputs in realisations (Nix's
    /// `staticOutputHashes`: the modulo hash with the derivation's own outputs masked,
    /// inputs by their cached modulo hashes).
    pub fn output_hash(&self, drv_path: &StorePath, drv: &Derivation) -> Result<Hash> {
        let mut h = self
            .hasher
            .lock()
            .map_err(|_| Error::Corrupt("hasher lock poisoned".into()))?;
        h.trim_cache(200_000);
        h.hash_modulo(self.store_dir(), drv, true).map_err(|e| {
            Error::Invalid(format!(
                "hashing derivation '{}': {e}",
                self.print(drv_path)
            ))
        })
    }

    /// The realisation of a derivation output, if this store has one.
    pub fn query_realisation(&self, id: &DrvOutput) -> Result<Option<Realisation>> {
        if !self.db.has_realisations() {
            return Ok(None);
        }
        let hash = id.hash_string();
        let row = self.db.read_tx(|c| {
            let Some((row, path, sigs)) = Db::query_realisation(c, &hash, &id.output)? else {
                return Ok(None);
            };
            let deps = Db::realisation_references(c, row)?;
            let mut dependent = Vec::new();
            for (h, o) in deps {
                if let Some((_, p, _)) = Db::query_realisation(c, &h, &o)? {
                    dependent.push((format!("{h}!{o}"), p));
                }
            }
            Ok(Some((path, sigs, dependent)))
        })?;
        let Some((path, sigs, deps)) = row else {
            return Ok(None);
        };
        let mut r = Realisation::new(id.clone(), self.store_dir().parse_path(&path)?);
        r.signatures = sigs.split_whitespace().map(str::to_string).collect();
        for (d, p) in deps {
            r.dependent
                .insert(DrvOutput::parse(&d)?, self.store_dir().parse_path(&p)?);
        }
        Ok(Some(r))
    }

    /// Records a realisation (Nix's `registerDrvOutput`): its output path must be valid and
    /// every realisation it depends on known with the same path. A second realisation of
    /// the same output must agree with the first (its signatures are then added); one that
    /// names another path is refused, so a realisation, once known, never changes.
    pub fn register_realisation(&self, r: &Realisation) -> Result<()> {
        self.require_writable("register realisations")?;
        if !self.db.has_realisations() {
            return Err(Error::Invalid(format!(
                "cannot register the realisation of '{}': this store's database has no realisations (a Guix store)",
                r.id
            )));
        }
        let hash = r.id.hash_string();
        let out = self.print(&r.out_path);
        let sd = self.store_dir().clone();
        self.db.write("registering a realisation", |c| {
            match Db::query_realisation(c, &hash, &r.id.output)? {
                Some((row, path, sigs)) => {
                    let mut deps = BTreeMap::new();
                    for (h, o) in Db::realisation_references(c, row)? {
                        if let Some((_, p, _)) = Db::query_realisation(c, &h, &o)? {
                            deps.insert(format!("{h}!{o}"), p);
                        }
                    }
                    let theirs: BTreeMap<String, String> = r
                        .dependent
                        .iter()
                        .map(|(k, v)| (k.to_string(), sd.display(v)))
                        .collect();
                    let compatible = path == out
                        && (deps.is_empty() || theirs.is_empty() || deps == theirs);
                    if !compatible {
                        return Err(Error::Invalid(format!(
                            "Trying to register a realisation of '{}', but we already have another one locally.\nLocal:  {path}\nRemote: {out}",
                            r.id
                        )));
                    }
                    let mut all: BTreeSet<String> =
                        sigs.split_whitespace().map(str::to_string).collect();
                    all.extend(r.signatures.iter().cloned());
                    let all: Vec<String> = all.into_iter().collect();
                    Db::update_realisation_signatures(c, &hash, &r.id.output, &all.join(" "))?;
                }
                None => {
                    let sigs: Vec<&str> = r.signatures.iter().map(String::as_str).collect();
                    Db::insert_realisation(c, &hash, &r.id.output, &out, &sigs.join(" "))
                        .map_err(|e| match e {
                            Error::NotValid(p) => Error::Invalid(format!(
                                "cannot register the realisation of '{}': its output '{p}' is not valid",
                                r.id
                            )),
                            e => e,
                        })?;
                }
            }
            for (dep, p) in &r.dependent {
                let dh = dep.hash_string();
                match Db::query_realisation(c, &dh, &dep.output)? {
                    Some((_, local, _)) if local == sd.display(p) => {}
                    Some((_, local, _)) => {
                        return Err(Error::Invalid(format!(
                            "unable to register the derivation '{}' as it depends on '{dep}' with path '{}', but that is '{local}' here",
                            r.id,
                            sd.display(p)
                        )))
                    }
                    None => {
                        return Err(Error::Invalid(format!(
                            "unable to register the derivation '{}' as it depends on the non existent '{dep}'",
                            r.id
                        )))
                    }
                }
                Db::add_realisation_reference(c, (&hash, &r.id.output), (&dh, &dep.output))?;
            }
            Ok(())
        })
    }

    /// The realisations of `drv`'s inputs (and, through their dependencies, of their inputs)
    /// whose paths `references` names: the `dependentRealisations` of an output of `drv`
    /// (Nix's `drvOutputReferences`). Inputs without a realisation are skipped.
    pub fn dependent_realisations(
        &self,
        drv: &Derivation,
        references: &BTreeSet<StorePath>,
    ) -> Result<BTreeMap<DrvOutput, StorePath>> {
        let mut todo: Vec<Realisation> = Vec::new();
        for (input, outs) in &drv.input_drvs {
            let d = self.read_derivation(input)?;
            let h = self.output_hash(input, &d)?;
            for o in outs {
                if let Some(r) = self.query_realisation(&DrvOutput::new(h, o))? {
                    todo.push(r);
                }
            }
        }
        let mut seen = BTreeSet::new();
        let mut out = BTreeMap::new();
        while let Some(r) = todo.pop() {
            if !seen.insert(r.id.clone()) {
                continue;
            }
            for dep in r.dependent.keys() {
                if !seen.contains(dep) {
                    if let Some(d) = self.query_realisation(dep)? {
                        todo.push(d);
                    }
                }
            }
            if references.contains(&r.out_path) {
                out.insert(r.id, r.out_path);
            }
        }
        Ok(out)
    }

    /// Checks a derivation's output paths (reading its inputs from the store).
    pub fn check_derivation_outputs(&self, drv: &Derivation) -> Result<()> {
        let mut h = self
            .hasher
            .lock()
            .map_err(|_| Error::Corrupt("hasher lock poisoned".into()))?;
        h.trim_cache(200_000);
        Ok(drv.check_output_paths(self.store_dir(), &mut h)?)
    }

    /// Computes output paths for a new derivation (see [`Derivation::finalize`]).
    pub fn finalize_derivation(&self, drv: Derivation) -> Result<Derivation> {
        let mut h = self
            .hasher
            .lock()
            .map_err(|_| Error::Corrupt("hasher lock poisoned".into()))?;
        Ok(drv.finalize(self.store_dir(), &mut h)?)
    }

    // ---- locks and temp roots -------------------------------------------------------------

    /// Locks a store path (its `.lock` file).
    pub fn lock_path(&self, p: &StorePath, wait: bool) -> Result<Option<PathLock>> {
        PathLock::acquire(&self.real_path(p), wait, &self.locks)
    }

    /// Whether this process holds the lock of `p`.
    pub fn is_locked_by_me(&self, p: &StorePath) -> bool {
        let mut l = self.real_path(p).into_os_string();
        l.push(".lock");
        self.locks.is_locked_by_me(Path::new(&l))
    }

    /// Protects `p` from garbage collection for the life of this process (or until
    /// [`LocalStore::remove_temp_root`] is called as often as this was).
    pub fn add_temp_root(&self, p: &StorePath) -> Result<()> {
        self.temp_roots.add(self, p)
    }

    /// [`LocalStore::add_temp_root`] for several paths at once.
    pub fn add_temp_roots(&self, paths: &[StorePath]) -> Result<()> {
        self.temp_roots.add_many(self, paths)
    }

    /// Entries of this process's temporary-roots file that are no longer roots.
    pub fn temp_roots_stale_entries(&self) -> usize {
        self.temp_roots.stale_entries()
    }

    pub fn remove_temp_root(&self, p: &StorePath) {
        self.temp_roots.remove(self, p)
    }

    /// A fresh scratch location in the store (for build outputs being rewritten or copied).
    pub fn scratch_path(&self, name: &str) -> Result<ScratchPath<'_>> {
        self.temp_path(name)
    }

    // ---- registration ---------------------------------------------------------------------

    /// Makes the contents of everything written so far durable.
    /// Sets up durability marks (see [`crate::durability`]): the marks' table, recovery
    /// of marks an unclean end left (when no live process owns them), the shared lock that
    /// says this process owns marks, and the syncer.
    fn start_durability(&mut self) -> Result<()> {
        self.db.write("creating the durability marks' table", |c| {
            c.execute_batch(crate::durability::MARKS_SCHEMA)
                .map_err(Error::db("creating KilnUnsynced"))
        })?;
        let p = self.layout.db_dir().join("kiln-durability.lock");
        if let Ok(exclusive) = FdLock::acquire(open_lock_file(&p)?, LockKind::Exclusive, false, &p)?
        {
            // Nobody else may own marks: those left are an unclean end's.
            let r = self.recover_unsynced();
            drop(exclusive);
            r?;
        }
        self._durability_lock =
            FdLock::acquire(open_lock_file(&p)?, LockKind::Shared, true, &p)?.ok();
        if self.opts.fsync {
            let fd = self
                .store_fd
                .try_clone()
                .map_err(|e| Error::io(&self.layout.real_store_dir, "duplicate", e))?;
            self.syncer = Some(crate::durability::Syncer::start(
                fd,
                self.layout.db_dir().join("db.sqlite"),
                self.layout.real_store_dir.clone(),
            ));
        }
        Ok(())
    }

    /// After an unclean end: makes what is on disk durable, checks every still-marked
    /// valid path against its NAR hash, invalidates (and removes) those that do not match
    /// and everything that refers to them, and clears the marks. Returns how many paths
    /// were invalidated.
    pub(crate) fn recover_unsynced(&self) -> Result<usize> {
        let marked: Vec<String> = self.db.read(|c| {
            let mut st = c
                .prepare("select distinct path from KilnUnsynced")
                .map_err(Error::db("reading durability marks"))?;
            let rows = st
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(Error::db("reading durability marks"))?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(Error::db("reading durability marks"))
        })?;
        if marked.is_empty() {
            return Ok(0);
        }
        tracing::warn!(
            "the store was not closed cleanly: checking the {} paths registered since it was last made durable",
            marked.len()
        );
        rustix::fs::syncfs(&self.store_fd)
            .map_err(|e| Error::io(&self.layout.real_store_dir, "sync", e))?;
        let mut bad = Vec::new();
        for abs in &marked {
            let Ok(p) = self.parse_path(abs) else {
                continue;
            };
            let Some(info) = self.query_path_info(&p)? else {
                continue;
            };
            let good = crate::verify::hash_path(self, &p).is_ok_and(|(h, n)| {
                h == info.nar_hash && (info.nar_size == 0 || n == info.nar_size)
            });
            if !good {
                tracing::error!("'{abs}' was registered but its contents did not reach the disk: it is no longer valid");
                bad.push(p);
            }
        }
        let mut gone = 0;
        if !bad.is_empty() {
            // Referrers first (a reference cannot go while a valid path refers to it).
            let mut doomed: Vec<StorePath> = self.closure(bad.iter(), true)?.into_iter().collect();
            while !doomed.is_empty() {
                let before = doomed.len();
                let mut rest = Vec::new();
                for p in doomed {
                    let referrers = self.query_referrers(&p)?;
                    if referrers.iter().any(|r| *r != p) {
                        rest.push(p);
                        continue;
                    }
                    let abs = self.print(&p);
                    self.db
                        .write("invalidating a path that did not reach the disk", |c| {
                            Db::invalidate(c, &abs)
                        })?;
                    let _ = fsutil::remove_tree(&self.real_path(&p));
                    gone += 1;
                }
                if rest.len() == before {
                    return Err(Error::Corrupt(format!(
                        "cannot invalidate {} paths whose contents did not reach the disk: they refer to each other",
                        rest.len()
                    )));
                }
                doomed = rest;
            }
        }
        self.db.write("clearing durability marks", |c| {
            c.execute("delete from KilnUnsynced", [])
                .map_err(Error::db("clearing durability marks"))
                .map(|_| ())
        })?;
        Ok(gone)
    }

    /// Waits until every path registered so far is durable (with `fsync-store-paths`).
    pub fn flush_durability(&self) -> Result<()> {
        match &self.syncer {
            Some(s) => s.flush(),
            None => Ok(()),
        }
    }

    pub fn sync(&self) -> Result<()> {
        if self.opts.fsync {
            rustix::fs::syncfs(&self.store_fd)
                .map_err(|e| Error::io(&self.layout.real_store_dir, "sync", e))?;
        }
        Ok(())
    }

    /// Registers paths whose contents are in place, in one transaction: references must be
    /// valid or in the batch, derivations must have correct output paths, and the batch may
    /// not contain reference cycles (other than self-references).
    pub fn register_valid_paths(&self, infos: &[ValidPathInfo]) -> Result<()> {
        self.require_writable("register paths")?;
        if infos.is_empty() {
            return Ok(());
        }
        let sd = self.store_dir().clone();
        // Derivations: parse now (outside the transaction) and check their outputs.
        let mut drvs: HashMap<StorePath, Derivation> = HashMap::new();
        for i in infos.iter().filter(|i| i.path.is_derivation()) {
            let d = self.read_derivation(&i.path)?;
            drvs.insert(i.path.clone(), d);
        }
        let batch: HashSet<&StorePath> = infos.iter().map(|i| &i.path).collect();
        check_no_cycles(&sd, infos)?;
        for d in drvs.values() {
            // Inputs of a derivation in the batch may be in the batch too: check after.
            if d.input_drvs.keys().all(|p| !batch.contains(p)) {
                self.check_derivation_outputs(d)?;
            }
        }
        // Durable before valid: with the syncer, a mark in the same transaction (cleared
        // once a sync has covered the contents); without one, a sync now.
        if self.syncer.is_none() {
            self.sync()?;
        }
        let t = now();
        let mut last_mark = 0i64;
        self.db.write("registering valid paths", |c| {
            let mut ids: HashMap<&StorePath, i64> = HashMap::new();
            if self.syncer.is_some() {
                let mut st = c
                    .prepare_cached("insert into KilnUnsynced (path) values (?)")
                    .map_err(Error::db("marking paths to sync"))?;
                for info in infos {
                    st.execute([sd.display(&info.path)])
                        .map_err(Error::db("marking paths to sync"))?;
                }
                last_mark = c.last_insert_rowid();
            }
            for info in infos {
                let abs = sd.display(&info.path);
                let id = match Db::path_id(c, &abs)? {
                    Some(id) => {
                        self.db.update_path(c, &sd, info)?;
                        id
                    }
                    None => self.db.insert_path(c, &sd, info, t)?,
                };
                ids.insert(&info.path, id);
                if let Some(d) = drvs.get(&info.path) {
                    for (name, p) in d.output_paths() {
                        Db::add_derivation_output(c, id, name, &sd.display(p))?;
                    }
                }
            }
            for info in infos {
                let from = ids[&info.path];
                for r in &info.references {
                    let to = match ids.get(r) {
                        Some(id) => *id,
                        None => Db::path_id(c, &sd.display(r))?.ok_or_else(|| {
                            Error::NotValid(format!(
                                "{} (referenced by '{}')",
                                sd.display(r),
                                sd.display(&info.path)
                            ))
                        })?,
                    };
                    Db::add_reference(c, from, to)?;
                }
            }
            Ok(())
        })?;
        if let Some(sy) = &self.syncer {
            sy.marked(last_mark);
        }
        for d in drvs.values() {
            if d.input_drvs.keys().any(|p| batch.contains(p)) {
                if let Err(e) = self.check_derivation_outputs(d) {
                    // Undo: a derivation with wrong outputs must not stay valid.
                    let abs: Vec<String> = infos.iter().map(|i| sd.display(&i.path)).collect();
                    let _ = self.db.write("undoing a bad registration", |c| {
                        for a in abs.iter().rev() {
                            let _ = Db::invalidate(c, a);
                        }
                        Ok(())
                    });
                    return Err(e);
                }
            }
        }
        if self.opts.auto_optimise {
            for i in infos {
                if let Err(e) = crate::optimise::optimise_path(self, &i.path) {
                    tracing::warn!("cannot optimise '{}': {e}", self.print(&i.path));
                }
            }
        }
        Ok(())
    }

    /// Records that building `path` failed (failure caching).
    /// Adds signatures to a valid path's metadata (`nix store sign`, `AddSignatures`).
    pub fn add_signatures(&self, p: &StorePath, sigs: &[String]) -> Result<()> {
        self.require_writable("add signatures")?;
        let sd = self.store_dir().clone();
        self.db.write("adding signatures", |c| {
            let mut info = self
                .db
                .query_path_info(c, &sd, p)?
                .ok_or_else(|| Error::NotValid(sd.display(p)))?;
            info.sigs.extend(sigs.iter().cloned());
            self.db.update_path(c, &sd, &info)
        })
    }

    pub fn register_failed(&self, p: &StorePath) -> Result<()> {
        let abs = self.print(p);
        self.db
            .write("caching a failure", |c| Db::register_failed(c, &abs, now()))
    }
    pub fn has_failed(&self, p: &StorePath) -> Result<bool> {
        let abs = self.print(p);
        self.db.read(|c| Db::has_failed(c, &abs))
    }
    pub fn query_failed_paths(&self) -> Result<Vec<String>> {
        self.db.read(Db::query_failed)
    }
    /// Clears cached failures; `None` clears all.
    pub fn clear_failed_paths(&self, paths: Option<&[StorePath]>) -> Result<()> {
        let items: Vec<String> = match paths {
            None => vec!["*".into()],
            Some(ps) => ps.iter().map(|p| self.print(p)).collect(),
        };
        self.db.write("clearing failures", |c| {
            for i in &items {
                Db::clear_failed(c, i)?;
            }
            Ok(())
        })
    }

    // ---- adding ---------------------------------------------------------------------------

    fn require_writable(&self, what: &str) -> Result<()> {
        if self.db.is_read_only() {
            return Err(Error::ReadOnly(what.to_string()));
        }
        Ok(())
    }

    /// A fresh temporary store path (a temp root until dropped) named after `name`.
    fn temp_path(&self, name: &str) -> Result<ScratchPath<'_>> {
        // Refuse before anything is written into the store directory.
        self.require_writable(&format!("add '{name}'"))?;
        let mut digest = [0u8; 20];
        rand::Rng::fill(&mut rand::thread_rng(), &mut digest);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let base: String = name.chars().take(150).collect();
        let p = StorePath::from_parts(&digest, &format!("{base}-kiln-tmp{n}"))?;
        self.add_temp_root(&p)?;
        let real = self.real_path(&p);
        Ok(ScratchPath {
            store: self,
            path: p,
            real,
            armed: true,
        })
    }

    /// Moves a filled temporary path to `final_path` and registers it, unless someone made
    /// it valid meanwhile. With `repair`, a valid path is replaced atomically.
    ///
    /// Every `add_*` method leaves exactly one temp root on the path it returns, owned by the
    /// caller (a daemon session releases it with `remove_temp_root` when the client leaves;
    /// a command-line process keeps it until it exits).
    fn install(
        &self,
        mut tmp: ScratchPath<'_>,
        info: ValidPathInfo,
        opts: AddOptions,
    ) -> Result<ValidPathInfo> {
        let final_real = self.real_path(&info.path);
        self.add_temp_root(&info.path)?;
        let mut lock = if opts.caller_holds_lock {
            None
        } else {
            Some(
                self.lock_path(&info.path, true)?
                    .ok_or_else(|| Error::Corrupt("blocking lock returned nothing".into()))?,
            )
        };
        let valid = self.is_valid(&info.path)?;
        if valid && !opts.repair {
            if let Some(l) = lock.as_mut() {
                l.set_delete(true);
            }
            return self.path_info(&info.path);
        }
        if valid {
            // Repair: the new contents are verified; swap them in atomically, then drop the old.
            rustix::fs::renameat_with(
                &self.store_fd,
                tmp.path.base_name(),
                &self.store_fd,
                info.path.base_name(),
                rustix::fs::RenameFlags::EXCHANGE,
            )
            .map_err(|e| Error::io(&final_real, "replace", e))?;
        } else {
            // Leftover of a crashed or failed attempt: it was never valid, remove it.
            if std::fs::symlink_metadata(&final_real).is_ok() {
                tracing::info!("removing invalid path '{}'", self.print(&info.path));
                fsutil::remove_tree(&final_real)?;
            }
            std::fs::rename(&tmp.real, &final_real)
                .map_err(|e| Error::io(&final_real, "move into place", e))?;
            tmp.armed = false;
        }
        self.register_valid_paths(std::slice::from_ref(&info))?;
        if let Some(l) = lock.as_mut() {
            l.set_delete(true);
        }
        drop(lock);
        drop(tmp);
        Ok(info)
    }

    /// Adds a path whose NAR arrives on `nar`, checking its hash and size against `info`
    /// (and its content address, if any) before it becomes valid. The whole archive is read
    /// even when the path is already valid (protocol streams carry it).
    pub fn add_nar(
        &self,
        info: &ValidPathInfo,
        nar: &mut dyn Read,
        opts: AddOptions,
    ) -> Result<ValidPathInfo> {
        self.add_nar_checked(info, nar, opts, &mut |_| Ok(()))
    }

    /// [`LocalStore::add_nar`] with one more check before the path becomes valid:
    /// `before_install` gets the stream after the archive (a substituter reads it to its
    /// end and compares the compressed file's hash with the narinfo's `FileHash`); an
    /// error leaves nothing behind.
    pub fn add_nar_checked(
        &self,
        info: &ValidPathInfo,
        nar: &mut dyn Read,
        opts: AddOptions,
        before_install: &mut dyn FnMut(&mut dyn Read) -> Result<()>,
    ) -> Result<ValidPathInfo> {
        let sd = self.store_dir();
        if info.nar_hash.algo() != HashAlgo::Sha256 {
            return Err(Error::Invalid(format!(
                "NAR hash of '{}' must be sha256",
                sd.display(&info.path)
            )));
        }
        info.check_content_address(sd)?;
        if !opts.repair {
            self.add_temp_root(&info.path)?;
            if self.is_valid(&info.path)? {
                nar::parse(nar, &mut (), nar::Limits::default())?;
                return self.path_info(&info.path);
            }
            self.remove_temp_root(&info.path);
        }
        let tmp = self.temp_path(info.path.name())?;
        let mut r = HashingReader::new(&mut *nar, HashAlgo::Sha256);
        nar::restore_into(
            &tmp.real,
            &mut r,
            RestoreOptions {
                canonical: true,
                ..Default::default()
            },
        )
        .map_err(|e| Error::Adding {
            path: sd.display(&info.path),
            source: Box::new(e.into()),
        })?;
        let (hash, size) = r.finish();
        check_nar(sd, info, hash, size)?;
        self.check_contents_match_ca(info, &tmp.real, hash)?;
        before_install(nar)?;
        let mut info = info.clone();
        info.nar_size = size;
        self.install(tmp, info, opts)
    }

    /// Adds a tree something else wrote into a scratch path (an external substituter):
    /// its metadata is made canonical, its NAR hash (of any algorithm) and size (unless 0)
    /// must be `info`'s, and its contents its content address if it has one, before it is
    /// moved into place and registered with its SHA-256 NAR hash.
    /// An error leaves nothing behind.
    pub fn add_restored(
        &self,
        tmp: ScratchPath<'_>,
        info: &ValidPathInfo,
        opts: AddOptions,
    ) -> Result<ValidPathInfo> {
        let sd = self.store_dir();
        info.check_content_address(sd)?;
        if std::fs::symlink_metadata(&tmp.real).is_err() {
            return Err(Error::Invalid(format!(
                "nothing was written to '{}' for '{}'",
                tmp.real.display(),
                sd.display(&info.path)
            )));
        }
        if let Some(p) = fsutil::hard_link_out_of(&tmp.real)? {
            return Err(Error::Invalid(format!(
                "'{}' for '{}' is a hard link to a file outside it",
                p.display(),
                sd.display(&info.path)
            )));
        }
        fsutil::canonicalise(
            &tmp.real,
            fsutil::Ownership {
                expected_uid: None,
                target: (
                    rustix::process::geteuid().as_raw(),
                    rustix::process::getegid().as_raw(),
                ),
            },
        )?;
        let (hash, size) = nar_hash_of(&tmp.real, HashAlgo::Sha256)?;
        // The expected hash may be of another algorithm (the database keeps SHA-256).
        let got = match info.nar_hash.algo() {
            HashAlgo::Sha256 => hash,
            algo => nar_hash_of(&tmp.real, algo)?.0,
        };
        check_nar(sd, info, got, size)?;
        self.check_contents_match_ca(info, &tmp.real, hash)?;
        let mut info = info.clone();
        info.nar_hash = hash;
        info.nar_size = size;
        self.install(tmp, info, opts)
    }

    /// A content address is a claim about the contents, not only about the path name: a
    /// source that pairs one path's CA with another path's contents (its NAR hash matching
    /// those contents) must not make the wrong contents valid under the claimed path.
    fn check_contents_match_ca(
        &self,
        info: &ValidPathInfo,
        real: &Path,
        nar_hash: Hash,
    ) -> Result<()> {
        let Some(ca) = &info.ca else {
            return Ok(());
        };
        let sd = self.store_dir();
        let (method, want) = match ca {
            ContentAddress::Text(h) => (FileIngestionMethod::Flat, h),
            ContentAddress::Fixed(m, h) => (*m, h),
        };
        // A fixed content address is a hash *modulo* the path's own hash part (Nix's
        // `hashCAPath`): a floating content-addressed output refers to itself, and its hash
        // was taken with those self-references zeroed. Without a self-reference the NAR
        // hash is that hash already.
        let modulo = matches!(ca, ContentAddress::Fixed(..)).then(|| info.path.hash_part());
        let self_ref = info.references.contains(&info.path);
        // Nix ≥ 2.17 no longer hashes the self-references' positions (see
        // `HashModuloSink::finish_both`): a path made content-addressed by today's Nix
        // (`nix store make-content-addressed`, its floating outputs) has the other hash.
        // Either is the content's: the two inputs cannot be confused (a NAR ends in a NUL
        // byte, the positions in a digit).
        let mut newer = None;
        let got = match method {
            FileIngestionMethod::Recursive if want.algo() == HashAlgo::Sha256 && !self_ref => {
                nar_hash
            }
            FileIngestionMethod::Recursive => {
                let mut h = HashModuloSink::new(want.algo(), modulo.unwrap_or_default());
                kiln_format::nar::dump(real, &mut h)?;
                let (with, without, _) = h.finish_both();
                newer = Some(without);
                with
            }
            FileIngestionMethod::Flat => {
                // The bytes of a regular file, nothing else: following a symlink here would
                // accept a path whose contents live outside the store (and change with
                // them), and opening a FIFO or device would block or never end.
                let fd = openat(
                    CWD,
                    real,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| match e {
                    rustix::io::Errno::LOOP => Error::Invalid(format!(
                        "'{}' claims a flat content address but is a symlink",
                        sd.display(&info.path)
                    )),
                    e => Error::io(real, "open", e),
                })?;
                let st = rustix::fs::fstat(&fd).map_err(|e| Error::io(real, "stat", e))?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    != rustix::fs::FileType::RegularFile
                {
                    return Err(Error::Invalid(format!(
                        "'{}' claims a flat content address but is not a regular file",
                        sd.display(&info.path)
                    )));
                }
                let mut f = std::fs::File::from(fd);
                let mut h = HashModuloSink::new(want.algo(), modulo.unwrap_or_default());
                std::io::copy(&mut f, &mut h).map_err(|e| Error::io(real, "read", e))?;
                let (with, without, _) = h.finish_both();
                newer = Some(without);
                with
            }
        };
        if &got != want && newer.as_ref() != Some(want) {
            return Err(Error::Invalid(format!(
                "ca hash mismatch importing path '{}';\n  specified: {}\n  got:       {}",
                sd.display(&info.path),
                want,
                got
            )));
        }
        Ok(())
    }

    /// Adds content-addressed data (`addToStoreFromDump`): `data` is a NAR for recursive
    /// ingestion or the file's bytes for flat ingestion; the path follows from its hash.
    pub fn add_from_dump(
        &self,
        name: &str,
        method: FileIngestionMethod,
        algo: HashAlgo,
        data: &mut dyn Read,
        references: &BTreeSet<StorePath>,
        opts: AddOptions,
    ) -> Result<ValidPathInfo> {
        kiln_format::store_path::check_name(name, name)?;
        let tmp = self.temp_path(name)?;
        let (ca_hash, nar_hash, nar_size) = match method {
            FileIngestionMethod::Recursive => {
                // One pass: restore, NAR-hash (sha256) and CA-hash (the requested algorithm).
                let mut tee = TeeHash {
                    inner: data,
                    extra: (algo != HashAlgo::Sha256).then(|| Hasher::new(algo)),
                };
                let mut r = HashingReader::new(&mut tee, HashAlgo::Sha256);
                nar::restore_into(
                    &tmp.real,
                    &mut r,
                    RestoreOptions {
                        canonical: true,
                        ..Default::default()
                    },
                )?;
                let (nar_hash, nar_size) = r.finish();
                let ca = match tee.extra.take() {
                    Some(h) => h.finish(),
                    None => nar_hash,
                };
                (ca, nar_hash, nar_size)
            }
            FileIngestionMethod::Flat => {
                let f = openat(
                    CWD,
                    &tmp.real,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o444),
                )
                .map_err(|e| Error::io(&tmp.real, "create", e))?;
                let mut f = std::fs::File::from(f);
                let mut h = Hasher::new(algo);
                let mut size = 0u64;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = match data.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(Error::io(&tmp.real, "read data for", e)),
                    };
                    h.update(&buf[..n]);
                    f.write_all(&buf[..n])
                        .map_err(|e| Error::io(&tmp.real, "write", e))?;
                    size += n as u64;
                }
                rustix::fs::futimens(&f, &fsutil::STORE_MTIME)
                    .map_err(|e| Error::io(&tmp.real, "set time of", e))?;
                drop(f);
                let (nar_hash, nar_size) = flat_nar_hash(&tmp.real, size)?;
                (h.finish(), nar_hash, nar_size)
            }
        };
        let ca = ContentAddress::Fixed(method, ca_hash);
        let path = self.store_dir().ca_path(name, &ca, references, false)?;
        let mut info = ValidPathInfo::new(path, nar_hash, nar_size);
        info.references = references.clone();
        info.ca = Some(ca);
        self.install(tmp, info, opts)
    }

    /// Adds a text file (`addTextToStore`), e.g. a `.drv`.
    pub fn add_text(
        &self,
        name: &str,
        text: &[u8],
        references: &BTreeSet<StorePath>,
        opts: AddOptions,
    ) -> Result<ValidPathInfo> {
        let sd = self.store_dir();
        let path = sd.text_path_for(name, text, references)?;
        if !opts.repair {
            self.add_temp_root(&path)?;
            if self.is_valid(&path)? {
                return self.path_info(&path);
            }
            self.remove_temp_root(&path);
        }
        let tmp = self.temp_path(name)?;
        let f = openat(
            CWD,
            &tmp.real,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        )
        .map_err(|e| Error::io(&tmp.real, "create", e))?;
        let mut f = std::fs::File::from(f);
        f.write_all(text)
            .map_err(|e| Error::io(&tmp.real, "write", e))?;
        rustix::fs::futimens(&f, &fsutil::STORE_MTIME)
            .map_err(|e| Error::io(&tmp.real, "set time of", e))?;
        drop(f);
        let mut nar = HashSink::new(HashAlgo::Sha256);
        let mut w = nar::NarWriter::new(&mut nar).map_err(|e| Error::io(&tmp.real, "hash", e))?;
        w.file(false, text)
            .map_err(|e| Error::io(&tmp.real, "hash", e))?;
        let (nar_hash, nar_size) = nar.finish();
        let mut info = ValidPathInfo::new(path, nar_hash, nar_size);
        info.references = references.clone();
        info.ca = Some(ContentAddress::Text(Hash::sha256(text)));
        self.install(tmp, info, opts)
    }

    /// Adds a file or tree from the file system (`nix-store --add`, `--add-fixed`).
    pub fn add_path(
        &self,
        src: &Path,
        name: &str,
        method: FileIngestionMethod,
        algo: HashAlgo,
    ) -> Result<ValidPathInfo> {
        match method {
            FileIngestionMethod::Flat => {
                let meta = std::fs::symlink_metadata(src).map_err(|e| Error::io(src, "stat", e))?;
                if !meta.is_file() {
                    return Err(Error::Invalid(format!(
                        "'{}' is not a regular file; flat hashing needs one",
                        src.display()
                    )));
                }
                let mut f = std::fs::File::open(src).map_err(|e| Error::io(src, "open", e))?;
                self.add_from_dump(
                    name,
                    method,
                    algo,
                    &mut f,
                    &BTreeSet::new(),
                    AddOptions::default(),
                )
            }
            FileIngestionMethod::Recursive => {
                let (mut reader, writer) =
                    std::io::pipe().map_err(|e| Error::io(src, "create a pipe for", e))?;
                std::thread::scope(|s| {
                    let dumper = s.spawn(move || {
                        let mut w = std::io::BufWriter::with_capacity(256 * 1024, writer);
                        nar::dump(src, &mut w)?;
                        w.flush().map_err(|e| kiln_format::Error::Io {
                            path: src.to_path_buf(),
                            action: "dump".into(),
                            source: e,
                        })
                    });
                    let added = self.add_from_dump(
                        name,
                        method,
                        algo,
                        &mut reader,
                        &BTreeSet::new(),
                        AddOptions::default(),
                    );
                    drop(reader);
                    let dumped = dumper
                        .join()
                        .map_err(|_| Error::Corrupt("dump thread panicked".into()))?;
                    match (added, dumped) {
                        (Ok(info), Ok(())) => Ok(info),
                        // The adder stopped reading (it refused the add): its reason counts,
                        // not the dumper's broken pipe.
                        (Err(e), Err(kiln_format::Error::Io { source, .. }))
                            if source.kind() == std::io::ErrorKind::BrokenPipe =>
                        {
                            Err(e)
                        }
                        // A dump error explains a truncated archive better than the parser's.
                        (_, Err(d)) => Err(d.into()),
                        (Err(e), Ok(())) => Err(e),
                    }
                })
            }
        }
    }

    /// Adds a NAR whose path is not known until it has been read (import): restores it to a
    /// temporary path and returns it with the NAR's hash and size, for [`Self::install_temp`].
    pub(crate) fn restore_temp(&self, nar: &mut dyn Read) -> Result<(TempNar<'_>, Hash, u64)> {
        let tmp = self.temp_path("kiln-import")?;
        let mut r = HashingReader::new(nar, HashAlgo::Sha256);
        nar::restore_into(
            &tmp.real,
            &mut r,
            RestoreOptions {
                canonical: true,
                ..Default::default()
            },
        )?;
        let (h, n) = r.finish();
        Ok((TempNar(tmp), h, n))
    }

    pub(crate) fn install_temp(
        &self,
        tmp: TempNar<'_>,
        info: ValidPathInfo,
    ) -> Result<ValidPathInfo> {
        self.install(tmp.0, info, AddOptions::default())
    }

    /// Removes paths from the database and the disk. Each must be unreferenced by valid paths
    /// outside the set (checked by the database).
    pub fn delete_paths(&self, paths: &[StorePath]) -> Result<u64> {
        let abs: Vec<String> = paths.iter().map(|p| self.print(p)).collect();
        self.db.write("invalidating paths", |c| {
            for a in &abs {
                Db::invalidate(c, a)?;
            }
            Ok(())
        })?;
        let mut freed = 0;
        for p in paths {
            freed += self.remove_path_files(p)?;
        }
        Ok(freed)
    }
}

/// The NAR hash and size found must be those `info` records (a size of 0: unknown).
fn check_nar(sd: &StoreDir, info: &ValidPathInfo, hash: Hash, size: u64) -> Result<()> {
    if hash != info.nar_hash {
        return Err(Error::HashMismatch {
            path: sd.display(&info.path),
            expected: info.nar_hash.to_string(),
            actual: hash.to_string(),
        });
    }
    if info.nar_size != 0 && size != info.nar_size {
        return Err(Error::Invalid(format!(
            "size mismatch for '{}': expected {} bytes of NAR, got {size}",
            sd.display(&info.path),
            info.nar_size
        )));
    }
    Ok(())
}

/// The NAR hash and size of the tree at `path`.
pub(crate) fn nar_hash_of(path: &Path, algo: HashAlgo) -> Result<(Hash, u64)> {
    let mut sink = HashSink::new(algo);
    nar::dump(path, &mut sink)?;
    Ok(sink.finish())
}

/// A restored archive waiting for its final path.
pub(crate) struct TempNar<'a>(ScratchPath<'a>);

/// NAR hash and size of a regular non-executable file already written at `path`.
fn flat_nar_hash(path: &Path, size: u64) -> Result<(Hash, u64)> {
    let mut sink = HashSink::new(HashAlgo::Sha256);
    let mut w = nar::NarWriter::new(&mut sink).map_err(|e| Error::io(path, "hash", e))?;
    w.file_start(false, size)
        .map_err(|e| Error::io(path, "hash", e))?;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    std::io::copy(&mut (&mut f).take(size), w.get_mut()).map_err(|e| Error::io(path, "read", e))?;
    w.file_end(size).map_err(|e| Error::io(path, "hash", e))?;
    Ok(sink.finish())
}

/// Feeds what passes through to an extra hasher.
struct TeeHash<'a> {
    inner: &'a mut dyn Read,
    extra: Option<Hasher>,
}

impl Read for TeeHash<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.extra {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Refuses reference cycles inside a registration batch (self-references are fine).
fn check_no_cycles(sd: &StoreDir, infos: &[ValidPathInfo]) -> Result<()> {
    let index: HashMap<&StorePath, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, info)| (&info.path, i))
        .collect();
    let edges: Vec<Vec<usize>> = infos
        .iter()
        .enumerate()
        .map(|(i, info)| {
            info.references
                .iter()
                .filter_map(|r| index.get(r).copied())
                .filter(|&j| j != i)
                .collect()
        })
        .collect();
    // 0 = unvisited, 1 = on the stack, 2 = done.
    let mut state = vec![0u8; infos.len()];
    for start in 0..infos.len() {
        if state[start] != 0 {
            continue;
        }
        state[start] = 1;
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        while let Some((node, next)) = stack.last_mut() {
            let n = *node;
            if let Some(&r) = edges[n].get(*next) {
                *next += 1;
                match state[r] {
                    0 => {
                        state[r] = 1;
                        stack.push((r, 0));
                    }
                    1 => {
                        return Err(Error::Invalid(format!(
                            "cycle detected in the references of '{}' from '{}'",
                            sd.display(&infos[r].path),
                            sd.display(&infos[n].path)
                        )))
                    }
                    _ => {}
                }
            } else {
                state[n] = 2;
                stack.pop();
            }
        }
    }
    Ok(())
}
