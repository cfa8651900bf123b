//! Store verification (`kiln store verify`, `nix-store --verify`).

use kiln_format::{HashAlgo, StorePath};

use crate::db::Db;
use crate::error::{Error, Result};
use crate::lock::{open_lock_file, FdLock, LockKind};
use crate::store::LocalStore;

/// Rebuilds or re-substitutes a damaged path; the build engine provides one.
pub trait Repairer {
    fn repair(&self, store: &LocalStore, path: &StorePath) -> Result<()>;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// Rehash every path and compare with its recorded NAR hash and size.
    pub check_contents: bool,
    pub repair: bool,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Valid in the database, absent on disk, and nothing refers to it: it was invalidated.
    Disappeared(String),
    /// Absent on disk while valid paths still refer to it.
    Missing(String),
    /// Its contents do not match the recorded hash or size.
    Modified {
        path: String,
        expected: String,
        actual: String,
    },
    /// A repair was attempted and failed.
    RepairFailed { path: String, error: String },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Disappeared(p) => {
                write!(f, "path '{p}' disappeared, removing from database...")
            }
            Problem::Missing(p) => write!(
                f,
                "path '{p}' disappeared, but it still has valid referrers!"
            ),
            Problem::Modified {
                path,
                expected,
                actual,
            } => {
                write!(
                    f,
                    "path '{path}' was modified! expected hash '{expected}', got '{actual}'"
                )
            }
            Problem::RepairFailed { path, error } => {
                write!(f, "cannot repair path '{path}': {error}")
            }
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    pub checked: u64,
    pub problems: Vec<Problem>,
    pub repaired: Vec<String>,
}

impl VerifyReport {
    /// Whether the store is consistent now (disappeared-and-removed paths are fixed, and
    /// so are repaired ones).
    pub fn is_clean(&self) -> bool {
        self.problems.iter().all(|p| match p {
            Problem::Disappeared(_) => true,
            Problem::Missing(path) | Problem::Modified { path, .. } => self.repaired.contains(path),
            Problem::RepairFailed { .. } => false,
        })
    }
}

/// NAR hash and size of a path on disk.
pub fn hash_path(store: &LocalStore, p: &StorePath) -> Result<(kiln_format::Hash, u64)> {
    crate::store::nar_hash_of(&store.real_path(p), HashAlgo::Sha256)
}

/// Checks every valid path.
pub fn verify_store(
    store: &LocalStore,
    opts: VerifyOptions,
    repairer: Option<&dyn Repairer>,
) -> Result<VerifyReport> {
    // Keep a collector from deleting paths under us (as Nix does).
    let lp = store.layout().gc_lock_path();
    let _gc = if store.db.is_read_only() {
        None
    } else {
        FdLock::acquire(open_lock_file(&lp)?, LockKind::Shared, true, &lp)?.ok()
    };
    let mut report = VerifyReport::default();
    let sd = store.store_dir().clone();
    for p in store.query_all_valid_paths()? {
        report.checked += 1;
        let abs = sd.display(&p);
        if std::fs::symlink_metadata(store.real_path(&p)).is_err() {
            let referrers: Vec<String> = store
                .db
                .read(|c| Db::query_referrers(c, &abs))?
                .into_iter()
                .filter(|r| r != &abs)
                .collect();
            if referrers.is_empty() && !opts.repair {
                if !store.db.is_read_only() {
                    store
                        .db
                        .write("invalidating a missing path", |c| Db::invalidate(c, &abs))?;
                }
                report.problems.push(Problem::Disappeared(abs));
            } else {
                report.problems.push(Problem::Missing(abs.clone()));
                try_repair(store, &p, opts, repairer, &mut report);
            }
            continue;
        }
        if opts.check_contents {
            let info = store.path_info(&p)?;
            let (h, n) = match hash_path(store, &p) {
                Ok(x) => x,
                Err(e) => {
                    report.problems.push(Problem::Modified {
                        path: abs.clone(),
                        expected: info.nar_hash.to_string(),
                        actual: e.to_string(),
                    });
                    try_repair(store, &p, opts, repairer, &mut report);
                    continue;
                }
            };
            if h != info.nar_hash || (info.nar_size != 0 && n != info.nar_size) {
                report.problems.push(Problem::Modified {
                    path: abs,
                    expected: format!("{} ({} bytes)", info.nar_hash, info.nar_size),
                    actual: format!("{h} ({n} bytes)"),
                });
                try_repair(store, &p, opts, repairer, &mut report);
            } else if info.nar_size == 0 && !store.db.is_read_only() {
                // Old databases lack sizes: fill them in.
                let mut info = info;
                info.nar_size = n;
                store.db.write("recording a NAR size", |c| {
                    store.db.update_path(c, &sd, &info)
                })?;
            }
        }
    }
    Ok(report)
}

fn try_repair(
    store: &LocalStore,
    p: &StorePath,
    opts: VerifyOptions,
    repairer: Option<&dyn Repairer>,
    report: &mut VerifyReport,
) {
    if !opts.repair {
        return;
    }
    let abs = store.print(p);
    match repairer {
        Some(r) => match r.repair(store, p) {
            Ok(()) => report.repaired.push(abs),
            Err(e) => report.problems.push(Problem::RepairFailed {
                path: abs,
                error: e.to_string(),
            }),
        },
        None => report.problems.push(Problem::RepairFailed {
            path: abs,
            error: Error::Invalid(
                "no substituter or build recipe is available to repair it".into(),
            )
            .to_string(),
        }),
    }
}
