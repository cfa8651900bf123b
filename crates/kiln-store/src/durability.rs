//! Durability without a flush per path (`fsync-store-paths`, on by default).
//!
//! The promise: after a power loss, no path is valid whose contents are missing or
//! partial. Nix makes no such promise (it never syncs); kiln used to keep it by syncing the
//! store's file system before every registration, one device flush per added path, which
//! made adding `.drv` files 3–4 times slower than Nix.
//!
//! Now a path is registered at once, and in the same database transaction it gets a
//! *durability mark* (a row of `KilnUnsynced`, numbered in registration order). A syncer
//! thread makes everything written so far durable with one `syncfs` of the store's file
//! system, then deletes the marks numbered up to where it started: every path registered
//! while a sync runs waits for the next one, and registrations within 50 ms of each other
//! share one, so a burst of registrations costs a few flushes, not one each, and nobody
//! waits for them.
//!
//! Why it is safe:
//! * a registration and its mark commit together (one SQLite transaction), so no valid
//!   path exists without a mark unless a sync that *started after* its registration
//!   finished: marks are cleared only up to the number taken before the `syncfs`, and the
//!   contents were written before the registration;
//! * a power loss can lose recent transactions, never reorder them (SQLite's WAL is
//!   replayed in order): a lost clear leaves marks that did not need to be there, never
//!   the reverse;
//! * a path's references are registered before it, so a path without a mark has no
//!   reference with one (marks are cleared in number order);
//! * after an unclean end (marks left, no live process owning them: see below), the store's
//!   next writable opening syncs, then checks the NAR hash of each still-marked valid path
//!   and invalidates every one that does not match, with everything that refers to it,
//!   before the store is used. What a crash of the process alone (no power loss) left in
//!   the page cache is intact and passes; what a power loss lost fails and goes.
//!
//! Ownership: every process that may write marks holds `kiln-durability.lock` (next to the
//! database) shared while its store is open; recovery runs only when the lock can be taken
//! exclusively, so one process never "recovers" the marks of another that is still
//! syncing them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rusqlite::Connection;

use crate::error::{Error, Result};

/// The marks' table: a registration inserts one row per path in its own transaction.
pub(crate) const MARKS_SCHEMA: &str = "create table if not exists KilnUnsynced (id integer primary key autoincrement not null, path text not null);";

/// How long the syncer lets registrations gather before a sync. Measured on an ext4 image
/// (1,000 `.drv` files added through the socket): 0.65 s with no window, 0.54 s with
/// 10 ms, 0.50 s with 50 ms; 0.44–0.49 s without syncing at all.
const GROUP_WINDOW: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
struct State {
    /// The highest mark committed.
    marked: i64,
    /// Marks up to this one are cleared (their paths are durable).
    cleared: i64,
    stop: bool,
    /// Someone waits for the marks to clear (`flush`): no group window.
    hurry: bool,
    /// The last sync's error, if it failed (the marks then stay: recovery checks them).
    failed: Option<String>,
    /// Marks up to this one were pending when a sync failed: a later sync that succeeds
    /// says nothing of them (the kernel reports a write-back error once), so this process
    /// never clears them; the next opening after this process ends checks their paths.
    failed_upto: i64,
}

/// Every syncer of this process (see [`flush_all`]).
static ALL: Mutex<Vec<std::sync::Weak<Shared>>> = Mutex::new(Vec::new());

/// Makes everything this process registered durable and clears its marks: for a command
/// that ends without dropping its store (a thread may still hold it), so that the next
/// opening has nothing to check. Waits at most 10 s per store.
pub fn flush_all() -> Result<()> {
    let all: Vec<Arc<Shared>> = ALL
        .lock()
        .map(|a| a.iter().filter_map(std::sync::Weak::upgrade).collect())
        .unwrap_or_default();
    let mut problem = None;
    for s in all {
        let Ok(mut st) = s.state.lock() else { continue };
        st.hurry = true;
        s.cv.notify_all();
        let target = st.marked;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while st.cleared < target && std::time::Instant::now() < deadline {
            st = match s.cv.wait_timeout(st, Duration::from_millis(50)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        // What a command registered and could not make durable is not done: it must not
        // end as if it were (a caller would count on paths a power cut can take).
        if st.cleared < target {
            problem = Some(Error::Corrupt(
                "the store's writes were not made durable within 60 s (the paths registered since are checked when the store is next opened)".into(),
            ));
        } else if target > 0 && st.failed_upto >= target {
            problem = Some(Error::Corrupt(format!(
                "syncing the store failed: {} (the paths registered since are checked when the store is next opened)",
                st.failed.clone().unwrap_or_default()
            )));
        }
    }
    match problem {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

/// The syncer of one open store.
#[derive(Debug)]
pub(crate) struct Syncer {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Syncer {
    /// Starts the thread that syncs `store_fd`'s file system and clears marks in the
    /// database at `db_path`.
    pub fn start(store_fd: std::os::fd::OwnedFd, db_path: PathBuf, store_dir: PathBuf) -> Syncer {
        let shared = Arc::new(Shared::default());
        if let Ok(mut all) = ALL.lock() {
            all.retain(|w| w.strong_count() > 0);
            all.push(Arc::downgrade(&shared));
        }
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-syncer".into())
            .spawn(move || run(&s, &store_fd, &db_path, &store_dir))
            .ok();
        Syncer {
            shared,
            thread: Mutex::new(thread),
        }
    }

    /// A registration committed marks up to `id`.
    pub fn marked(&self, id: i64) {
        if let Ok(mut st) = self.shared.state.lock() {
            if id > st.marked {
                st.marked = id;
                self.shared.cv.notify_all();
            }
        }
    }

    /// Waits until every mark committed so far is cleared (or a sync failed).
    pub fn flush(&self) -> Result<()> {
        let mut st = self
            .shared
            .state
            .lock()
            .map_err(|_| Error::Corrupt("syncer lock poisoned".into()))?;
        st.hurry = true;
        self.shared.cv.notify_all();
        let target = st.marked;
        while st.cleared < target {
            if self.thread.lock().map(|t| t.is_none()).unwrap_or(true) {
                return Err(Error::Corrupt("the store's syncer is not running".into()));
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, Duration::from_millis(100))
                .map_err(|_| Error::Corrupt("syncer lock poisoned".into()))?
                .0;
        }
        if target > 0 && st.failed_upto >= target {
            let e = st.failed.clone().unwrap_or_default();
            return Err(Error::Corrupt(format!(
                "syncing the store failed: {e} (the paths registered since are checked when the store is next opened)"
            )));
        }
        Ok(())
    }

    /// Syncs what is marked and stops the thread (a clean close leaves no marks).
    pub fn stop(&self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.stop = true;
            self.shared.cv.notify_all();
        }
        let t = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(s: &Shared, fd: &std::os::fd::OwnedFd, db_path: &Path, store_dir: &Path) {
    let mut conn: Option<Connection> = None;
    loop {
        let target = {
            let Ok(mut st) = s.state.lock() else { return };
            while st.marked <= st.cleared && !st.stop {
                st = match s.cv.wait(st) {
                    Ok(g) => g,
                    Err(_) => return,
                };
            }
            if st.marked <= st.cleared {
                return;
            }
            // Group commit: registrations arriving within a moment share the flush (off
            // every client's path: nobody waits for it). Stopping cuts the moment short.
            let deadline = std::time::Instant::now() + GROUP_WINDOW;
            while !st.stop && !st.hurry {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                st = match s.cv.wait_timeout(st, left) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                };
            }
            st.marked
        };
        let keep_upto = s.state.lock().map(|st| st.failed_upto).unwrap_or(i64::MAX);
        let r = rustix::fs::syncfs(fd)
            .map_err(|e| Error::io(store_dir, "sync", e))
            .and_then(|()| clear(&mut conn, db_path, keep_upto, target));
        let Ok(mut st) = s.state.lock() else { return };
        match r {
            Ok(()) => {
                st.cleared = st.cleared.max(target);
                st.failed = None;
                st.hurry = false;
            }
            Err(e) => {
                // The marks stay (recovery will check those paths); try again later.
                tracing::error!("making the store durable: {e}");
                st.failed = Some(e.to_string());
                st.failed_upto = st.failed_upto.max(target);
                st.cleared = st.cleared.max(target);
                if st.stop {
                    s.cv.notify_all();
                    return;
                }
                drop(st);
                s.cv.notify_all();
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        }
        s.cv.notify_all();
    }
}

/// Deletes the marks after `keep_upto` up to `target`, on a connection of the syncer's
/// own.
fn clear(conn: &mut Option<Connection>, db_path: &Path, keep_upto: i64, target: i64) -> Result<()> {
    let ctx = || Error::db("clearing durability marks");
    let c = match conn {
        Some(c) => c,
        None => {
            let c = Connection::open(db_path).map_err(ctx())?;
            c.busy_timeout(Duration::from_secs(60)).map_err(ctx())?;
            c.pragma_update(None, "synchronous", "normal")
                .map_err(ctx())?;
            conn.insert(c)
        }
    };
    c.execute(
        "delete from KilnUnsynced where id > ? and id <= ?",
        [keep_upto, target],
    )
    .map_err(ctx())?;
    Ok(())
}
