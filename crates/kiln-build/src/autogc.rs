//! Automatic garbage collection while building (`min-free`, `max-free`,
//! `min-free-check-interval`), as Nix's `autoGC`: while a scheduler has goals, a thread
//! looks at the free space of the store's file system every interval; when it is below
//! `min-free`, it collects until `max-free` is free (or nothing dead is left). Builds go on
//! meanwhile: what they use is protected as from any collection (their goals' temporary
//! roots, the collector's late roots), so only what nothing holds is deleted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kiln_store::gc::{collect_garbage, GcAction, GcOptions};
use kiln_store::LocalStore;

/// When to collect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoGcConfig {
    /// Collect when fewer bytes than this are free (0: never).
    pub min_free: u64,
    /// Collect until this many bytes are free.
    pub max_free: u64,
    pub interval: Duration,
}

impl AutoGcConfig {
    /// From the settings; `None` when `min-free` is 0.
    pub fn from_settings(s: &kiln_store::Settings) -> Option<AutoGcConfig> {
        let min_free = s.get_u64("min-free");
        (min_free > 0).then(|| AutoGcConfig {
            min_free,
            max_free: s.get_u64("max-free"),
            interval: Duration::from_secs(s.get_u64("min-free-check-interval").max(1)),
        })
    }
}

/// Bytes available to unprivileged users on the file system holding `path`.
pub fn free_space(path: &std::path::Path) -> std::io::Result<u64> {
    let v = rustix::fs::statvfs(path)?;
    Ok(v.f_bavail.saturating_mul(v.f_frsize))
}

/// The collecting thread; stopped when dropped.
#[derive(Debug)]
pub struct AutoGc {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AutoGc {
    /// Starts watching `store` for a scheduler whose number of goals is `active`.
    pub fn start(store: Arc<LocalStore>, cfg: AutoGcConfig, active: Arc<AtomicUsize>) -> AutoGc {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-auto-gc".into())
            .spawn(move || loop {
                {
                    let (m, cv) = &*s;
                    let g = m.lock().unwrap_or_else(|e| e.into_inner());
                    let (g, _) = cv
                        .wait_timeout_while(g, cfg.interval, |stopped| !*stopped)
                        .unwrap_or_else(|e| e.into_inner());
                    if *g {
                        return;
                    }
                }
                if active.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                collect_if_needed(&store, &cfg);
            })
            .ok();
        AutoGc { stop, thread }
    }
}

/// One look at the free space, and a collection if it is short.
pub fn collect_if_needed(store: &LocalStore, cfg: &AutoGcConfig) {
    let dir = &store.layout().real_store_dir;
    let free = match free_space(dir) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(
                "auto-GC: cannot read the free space of '{}': {e}",
                dir.display()
            );
            return;
        }
    };
    if free >= cfg.min_free {
        return;
    }
    let want = cfg.max_free.saturating_sub(free);
    tracing::info!(
        "running auto-GC to free {want} bytes ({free} bytes free, min-free {})",
        cfg.min_free
    );
    match collect_garbage(
        store,
        &GcOptions {
            action: GcAction::DeleteDead,
            max_freed: want.max(1),
            ..Default::default()
        },
    ) {
        Ok(r) => tracing::info!(
            "auto-GC deleted {} paths, {} bytes freed",
            r.paths.len(),
            r.bytes_freed
        ),
        Err(e) => tracing::warn!("auto-GC: {e}"),
    }
}

impl Drop for AutoGc {
    fn drop(&mut self) {
        let (m, cv) = &*self.stop;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
