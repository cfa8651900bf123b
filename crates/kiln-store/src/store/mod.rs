//! The local store.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kiln_format::derivation::{DerivationHasher, DerivationReader, MAX_DRV_SIZE};
use kiln_format::hash::{HashSink, Hasher};
use kiln_format::nar::{self, HashingReader, RestoreOptions};
use kiln_format::realisation::{DrvOutput, Realisation};
use kiln_format::store_path::FileIngestionMethod;
use kiln_format::{ContentAddress, Derivation, Hash, HashAlgo, StoreDir, StorePath, ValidPathInfo};
use rustix::fs::{openat, Mode, OFlags, CWD};

use crate::config::{Layout, Settings};
use crate::db::{Db, NewSchema};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::lock::{open_lock_file, FdLock, LockKind, LockRegistry, PathLock};

mod ingestion;
pub mod optimise;
mod queries;
mod realisations;
mod registration;
mod temp_roots;

pub(crate) use temp_roots::GcShared;
pub use temp_roots::TempRoots;

pub(crate) use ingestion::nar_hash_of;
pub use queries::topo_order;

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
            new_schema: if layout.guix {
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
    /// Whether this is a Guix store (its database has guix-daemon's schema): where the two
    /// daemons differ in what a store keeps or how a result counts, this decides.
    pub fn is_guix_store(&self) -> bool {
        self.db.flavor == crate::db::Flavor::Guix
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
}
