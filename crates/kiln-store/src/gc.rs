//! The garbage collector.
//!
//! The reference graph is loaded from the database in one read (three queries), and
//! liveness is a breadth-first search in memory: no per-path SQL. Dead paths are deleted in
//! topological order (referrers before references) in batches of invalidations, so the
//! database's `on delete restrict` never fires and a crash mid-way leaves a consistent store.
//!
//! Roots: `gcroots/` and `profiles/`, the temporary roots of every live process, this
//! process's own roots, and (optionally) paths open in running processes. While it runs, the
//! collector holds `gc.lock` exclusively and serves `gc-socket/socket`, where other
//! processes hand it roots they add meanwhile ("late roots"); a late root, and everything it
//! refers to, is spared even if it was found dead.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_format::StorePath;

use crate::db::Db;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::lock::{open_lock_file, FdLock, LockKind};
use crate::roots;
use crate::store::{GcShared, LocalStore};

/// What the collector does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcAction {
    /// List live paths.
    ReturnLive,
    /// List dead paths (a dry run).
    ReturnDead,
    /// Delete every dead path.
    DeleteDead,
    /// Delete these paths, each only if it is dead.
    DeleteSpecific(Vec<StorePath>),
    /// Delete these paths as Nix 2.35 does (`nix store delete`): with `skip_alive`, the
    /// live ones (or those a path outside the set still refers to) are skipped instead of
    /// failing the whole request (`--skip-alive`); with `delete_referrers`, each path's
    /// dead referrers go with it (`--also-referrers`).
    DeleteAmong {
        paths: Vec<StorePath>,
        skip_alive: bool,
        delete_referrers: bool,
    },
}

#[derive(Debug, Clone)]
pub struct GcOptions {
    pub action: GcAction,
    /// Stop after freeing this many bytes (`u64::MAX`: no limit).
    pub max_freed: u64,
    /// `keep-outputs` and `keep-derivations` for this collection (a trusted client's own
    /// values, as nix-daemon applies them); `None`: the store's.
    pub keep_outputs: Option<bool>,
    pub keep_derivations: Option<bool>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            action: GcAction::DeleteDead,
            max_freed: u64::MAX,
            keep_outputs: None,
            keep_derivations: None,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct GcResults {
    /// Live, dead or deleted paths (by action), absolute, sorted.
    pub paths: Vec<String>,
    pub bytes_freed: u64,
}

/// The store's graph in memory.
struct Graph {
    paths: Vec<StorePath>,
    index: HashMap<StorePath, usize>,
    refs: Vec<Vec<usize>>,
    referrers: Vec<Vec<usize>>,
    deriver: Vec<Option<usize>>,
    outputs: Vec<Vec<usize>>,
}

fn load_graph(store: &LocalStore) -> Result<Graph> {
    let sd = store.store_dir().clone();
    store.db.read_tx(|c| {
        let mut ids: HashMap<i64, usize> = HashMap::new();
        let mut paths = Vec::new();
        let mut derivers_raw = Vec::new();
        {
            let mut st = c
                .prepare("select id, path, deriver from ValidPaths")
                .map_err(Error::db("loading the graph"))?;
            let mut rows = st.query([]).map_err(Error::db("loading the graph"))?;
            while let Some(r) = rows.next().map_err(Error::db("loading the graph"))? {
                let id: i64 = r.get(0).map_err(Error::db("loading the graph"))?;
                let p: String = r.get(1).map_err(Error::db("loading the graph"))?;
                let d: Option<String> = r.get(2).map_err(Error::db("loading the graph"))?;
                // A row naming another store directory means the store was moved or the wrong
                // --store-dir was given: everything would look dead. Refuse rather than delete.
                let sp = sd.parse_path(&p).map_err(|_| {
                    Error::Corrupt(format!(
                        "the database lists '{p}', which is not a path of the store '{sd}'; was the store moved, \
                         or is --store-dir wrong? Refusing to collect garbage"
                    ))
                })?;
                ids.insert(id, paths.len());
                paths.push(sp);
                derivers_raw.push(d);
            }
        }
        let n = paths.len();
        let index: HashMap<StorePath, usize> = paths
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, p)| (p, i))
            .collect();
        let mut refs = vec![Vec::new(); n];
        let mut referrers = vec![Vec::new(); n];
        {
            let mut st = c
                .prepare("select referrer, reference from Refs")
                .map_err(Error::db("loading the graph"))?;
            let mut rows = st.query([]).map_err(Error::db("loading the graph"))?;
            while let Some(r) = rows.next().map_err(Error::db("loading the graph"))? {
                let a: i64 = r.get(0).map_err(Error::db("loading the graph"))?;
                let b: i64 = r.get(1).map_err(Error::db("loading the graph"))?;
                if let (Some(&a), Some(&b)) = (ids.get(&a), ids.get(&b)) {
                    if a != b {
                        refs[a].push(b);
                        referrers[b].push(a);
                    }
                }
            }
        }
        let deriver = derivers_raw
            .iter()
            .map(|d| {
                d.as_ref()
                    .and_then(|d| sd.parse_path(d).ok())
                    .and_then(|p| index.get(&p).copied())
            })
            .collect();
        let mut outputs = vec![Vec::new(); n];
        {
            let mut st = c
                .prepare("select drv, path from DerivationOutputs")
                .map_err(Error::db("loading the graph"))?;
            let mut rows = st.query([]).map_err(Error::db("loading the graph"))?;
            while let Some(r) = rows.next().map_err(Error::db("loading the graph"))? {
                let d: i64 = r.get(0).map_err(Error::db("loading the graph"))?;
                let p: String = r.get(1).map_err(Error::db("loading the graph"))?;
                if let (Some(&d), Some(&o)) = (
                    ids.get(&d),
                    sd.parse_path(&p).ok().and_then(|p| index.get(&p)),
                ) {
                    outputs[d].push(o);
                }
            }
        }
        Ok(Graph {
            paths,
            index,
            refs,
            referrers,
            deriver,
            outputs,
        })
    })
}

/// Serves `gc-socket/socket` until dropped.
struct RootServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl RootServer {
    fn start(store: &LocalStore) -> Result<RootServer> {
        let path = store.layout().gc_socket_path();
        if let Some(dir) = path.parent() {
            fsutil::ensure_dir(dir, 0o755)?;
        }
        // In place and listening before it appears: a process handing over a root would
        // otherwise be refused by a socket that exists, and back off and try again.
        let listener = kiln_format::unix_socket::bind_in_place(&path, 0o666)
            .map_err(|e| Error::io(&path, "listen on", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io(&path, "configure", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, shared, sd) = (stop.clone(), store.gc.clone(), store.store_dir().clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                        let mut r = BufReader::new(&s);
                        let mut line = String::new();
                        if r.read_line(&mut line).is_ok() {
                            if let Ok(p) = sd.parse_path(line.trim_end()) {
                                shared.note_roots(std::slice::from_ref(&p));
                                tracing::debug!("received late root '{}'", line.trim_end());
                            }
                            let _ = (&s).write_all(b"1");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(RootServer {
            stop,
            thread: Some(thread),
            path,
        })
    }
}

impl Drop for RootServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A collection in progress. When it ends (an error included), paths still claimed are
/// released first (roots waiting for them go on: the root server's thread may be one),
/// then the root server is stopped, then the collector stops counting as running. (Stopping
/// to count as running while the server still listens would send this process's own new
/// roots to a socket nobody answers any more.)
struct Collecting {
    server: Option<RootServer>,
    running: Running,
}

impl Drop for Collecting {
    fn drop(&mut self) {
        self.running.0.release_all();
        drop(self.server.take());
        // `running` is dropped after this.
    }
}

/// Marks the collector as running in this process until dropped.
struct Running(GcShared);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut g) = (self.0).0 .0.lock() {
            g.running = false;
            g.late_roots.clear();
            g.doomed.clear();
        }
        (self.0).0 .1.notify_all();
    }
}

/// All roots: `link → path` (several links may name one path).
pub fn find_roots(store: &LocalStore, runtime: bool) -> Result<BTreeSet<(String, StorePath)>> {
    let layout = store.layout();
    let mut out: BTreeSet<(String, StorePath)> =
        roots::find_gc_roots(layout)?.into_iter().collect();
    out.extend(roots::other_temp_roots(layout, store.store_dir())?);
    for p in store.temp_roots.snapshot() {
        out.insert((format!("{{temp:{}}}", std::process::id()), p));
    }
    if runtime {
        out.extend(roots::find_runtime_roots(store.store_dir()));
    }
    Ok(out)
}

/// The paths a specific deletion takes: each named path that is dead, with its referrers
/// (which must be named too unless `delete_referrers`). A path that cannot go fails the
/// request, or is skipped with `skip_alive`. Named paths that are not valid have their
/// leftovers removed at once.
fn choose_among(
    store: &LocalStore,
    graph: &Graph,
    live: &[bool],
    paths: &[StorePath],
    skip_alive: bool,
    delete_referrers: bool,
    results: &mut GcResults,
) -> Result<Vec<usize>> {
    let sd = store.store_dir();
    let wanted: HashSet<usize> = paths
        .iter()
        .filter_map(|p| graph.index.get(p).copied())
        .collect();
    let mut chosen: Vec<usize> = Vec::new();
    let mut taken: HashSet<usize> = HashSet::new();
    for p in paths {
        let Some(&i) = graph.index.get(p) else {
            // Not valid: remove an invalid leftover if there is one.
            results.bytes_freed += delete_invalid(store, p)?;
            continue;
        };
        if live[i] {
            if skip_alive {
                tracing::debug!("cannot delete '{}' because it's still alive", sd.display(p));
                continue;
            }
            return Err(Error::Alive {
                path: sd.display(p),
            });
        }
        // Its referrers, transitively: dead too, since it is.
        let mut closure = vec![i];
        let mut seen: HashSet<usize> = HashSet::from([i]);
        let mut k = 0;
        let mut outside = None;
        while k < closure.len() {
            let c = closure[k];
            k += 1;
            for &r in &graph.referrers[c] {
                if !delete_referrers && !wanted.contains(&r) {
                    outside = Some((c, r));
                }
                if seen.insert(r) {
                    closure.push(r);
                }
            }
        }
        if let Some((c, r)) = outside {
            if skip_alive {
                continue;
            }
            return Err(Error::StillAlive(format!(
                "cannot delete path '{}' because it is in use by '{}'",
                sd.display(&graph.paths[c]),
                sd.display(&graph.paths[r])
            )));
        }
        for c in closure {
            if taken.insert(c) {
                chosen.push(c);
            }
        }
    }
    Ok(chosen)
}

/// Runs the collector.
pub fn collect_garbage(store: &LocalStore, opts: &GcOptions) -> Result<GcResults> {
    if store.db.is_read_only()
        && !matches!(opts.action, GcAction::ReturnLive | GcAction::ReturnDead)
    {
        return Err(Error::ReadOnly("collect garbage".into()));
    }
    let lock_path = store.layout().gc_lock_path();
    let fd = open_lock_file(&lock_path)?;
    let _lock = match FdLock::acquire(fd, LockKind::Exclusive, false, &lock_path)? {
        Ok(l) => l,
        Err(fd) => {
            tracing::warn!("waiting for the big garbage collector lock...");
            FdLock::acquire(fd, LockKind::Exclusive, true, &lock_path)?
                .map_err(|_| Error::Corrupt("blocking lock returned nothing".into()))?
        }
    };
    if let Ok(mut g) = store.gc.0 .0.lock() {
        g.running = true;
        g.late_roots.clear();
    }
    let running = Running(store.gc.clone());
    let server = if store.db.is_read_only() {
        None
    } else {
        Some(RootServer::start(store)?)
    };
    let _collecting = Collecting { server, running };

    let graph = load_graph(store)?;
    let n = graph.paths.len();
    let roots = find_roots(store, store.options().runtime_roots)?;
    let mut live = vec![false; n];
    let mut queue: VecDeque<usize> = roots
        .iter()
        .filter_map(|(_, p)| graph.index.get(p).copied())
        .collect();
    let (keep_outputs, keep_derivations) = (
        opts.keep_outputs.unwrap_or(store.options().keep_outputs),
        opts.keep_derivations
            .unwrap_or(store.options().keep_derivations),
    );
    while let Some(i) = queue.pop_front() {
        if live[i] {
            continue;
        }
        live[i] = true;
        queue.extend(graph.refs[i].iter().copied().filter(|&j| !live[j]));
        if keep_derivations {
            if let Some(d) = graph.deriver[i] {
                if !live[d] {
                    queue.push_back(d);
                }
            }
        }
        if keep_outputs {
            queue.extend(graph.outputs[i].iter().copied().filter(|&j| !live[j]));
        }
    }
    let sd = store.store_dir();
    let mut results = GcResults::default();
    match &opts.action {
        GcAction::ReturnLive => {
            results.paths = (0..n)
                .filter(|&i| live[i])
                .map(|i| sd.display(&graph.paths[i]))
                .collect();
            results.paths.sort();
            return Ok(results);
        }
        GcAction::ReturnDead => {
            results.paths = (0..n)
                .filter(|&i| !live[i])
                .map(|i| sd.display(&graph.paths[i]))
                .collect();
            results.paths.sort();
            return Ok(results);
        }
        _ => {}
    }
    // The candidates, in deletion order.
    let mut candidates: Vec<usize> = match &opts.action {
        GcAction::DeleteSpecific(ps) => {
            choose_among(store, &graph, &live, ps, false, false, &mut results)?
        }
        GcAction::DeleteAmong {
            paths,
            skip_alive,
            delete_referrers,
        } => choose_among(
            store,
            &graph,
            &live,
            paths,
            *skip_alive,
            *delete_referrers,
            &mut results,
        )?,
        _ => (0..n).filter(|&i| !live[i]).collect(),
    };
    candidates = topo_referrers_first(&graph, candidates);

    // Decide what goes, in order, sparing late roots and everything they refer to.
    let mut keep = vec![false; n];
    let limited = opts.max_freed != u64::MAX;
    // With a byte limit, small batches let the collector stop close to it; without one,
    // big batches mean fewer commits rewriting the same database pages.
    let batch_size = if limited { 64 } else { 4096 };
    let mut deleted: Vec<String> = Vec::new();
    let mut pending: Vec<usize> = Vec::new();
    // Paths spared at the last moment (a referrer registered meanwhile).
    let mut spared: Vec<StorePath> = Vec::new();
    std::thread::scope(|scope| -> Result<()> {
        // Files are removed on a second thread while the next batch is invalidated: a crash
        // between the two steps leaves invalid paths on disk (swept later), never valid paths
        // without contents, because a batch reaches this thread only after its commit.
        let (tx, rx) = std::sync::mpsc::channel::<Vec<StorePath>>();
        let remover = (!limited).then(|| {
            scope.spawn(move || -> Result<u64> {
                let mut freed = 0;
                for batch in rx {
                    for p in &batch {
                        freed += store.remove_path_files(p)?;
                    }
                    store.gc.release(&batch);
                }
                Ok(freed)
            })
        });
        {
            let mut flush = |batch: &mut Vec<usize>, results: &mut GcResults| -> Result<()> {
                if batch.is_empty() {
                    return Ok(());
                }
                let batch_paths: Vec<StorePath> =
                    batch.iter().map(|&i| graph.paths[i].clone()).collect();
                let gone = invalidate_batch(store, &batch_paths)?;
                // The invalidations are durable before any file goes.
                store.sync_database()?;
                // Those that stayed are no longer the collector's to delete.
                if gone.len() != batch_paths.len() {
                    let went: HashSet<&StorePath> = gone.iter().map(|(p, _)| p).collect();
                    let kept: Vec<StorePath> = batch_paths
                        .iter()
                        .filter(|p| !went.contains(p))
                        .cloned()
                        .collect();
                    store.gc.release(&kept);
                    spared.extend(kept);
                }
                let (paths, abs): (Vec<StorePath>, Vec<String>) = gone.into_iter().unzip();
                if limited {
                    for p in &paths {
                        results.bytes_freed += store.remove_path_files(p)?;
                    }
                    store.gc.release(&paths);
                } else {
                    let _ = tx.send(paths);
                }
                deleted.extend(abs);
                batch.clear();
                Ok(())
            };
            for i in candidates {
                let p = &graph.paths[i];
                // This process's own temporary roots were read with the other roots; any
                // added since went through `note_roots`, which `claim` consults. (Locking
                // the temp roots here could deadlock with an add that holds them while it
                // waits, through the root socket, for a path claimed in this loop.)
                if keep[i] || !store.gc.claim(p) {
                    // Spared: so is everything it refers to (they come later in the order).
                    let mut stack = vec![i];
                    while let Some(k) = stack.pop() {
                        for &r in &graph.refs[k] {
                            if !keep[r] {
                                keep[r] = true;
                                stack.push(r);
                            }
                        }
                    }
                    continue;
                }
                pending.push(i);
                if pending.len() >= batch_size {
                    flush(&mut pending, &mut results)?;
                    if results.bytes_freed >= opts.max_freed {
                        break;
                    }
                }
            }
            if results.bytes_freed < opts.max_freed {
                flush(&mut pending, &mut results)?;
            }
        }
        drop(tx);
        if let Some(r) = remover {
            results.bytes_freed += r
                .join()
                .map_err(|_| Error::Corrupt("file removal thread panicked".into()))??;
        }
        Ok(())
    })?;
    if opts.action == GcAction::DeleteDead && results.bytes_freed < opts.max_freed {
        let valid: HashSet<&StorePath> = graph.paths.iter().collect();
        results.bytes_freed += sweep_invalid(store, &valid)?;
        // Not counted: deleting the paths counted each file with two links (the other in
        // `.links`) already, as Nix counts it; counting the `.links` entry again would
        // report twice what was freed.
        crate::optimise::remove_unused_links(store)?;
    }
    // A path the caller named and could not have deleted is an error, as when it was alive
    // from the start (unless the caller asked to skip those).
    let named: Option<&Vec<StorePath>> = match &opts.action {
        GcAction::DeleteSpecific(ps) => Some(ps),
        GcAction::DeleteAmong {
            paths,
            skip_alive: false,
            ..
        } => Some(paths),
        _ => None,
    };
    if let Some(p) = named.and_then(|ps| spared.iter().find(|s| ps.contains(s))) {
        return Err(Error::Alive {
            path: sd.display(p),
        });
    }
    deleted.sort();
    results.paths = deleted;
    Ok(results)
}

/// Orders `set` so every path comes before the paths it refers to.
fn topo_referrers_first(graph: &Graph, set: Vec<usize>) -> Vec<usize> {
    let member: HashSet<usize> = set.iter().copied().collect();
    let mut pending: HashMap<usize, usize> = set
        .iter()
        .map(|&i| {
            (
                i,
                graph.referrers[i]
                    .iter()
                    .filter(|r| member.contains(r))
                    .count(),
            )
        })
        .collect();
    let mut ready: VecDeque<usize> = set.iter().copied().filter(|i| pending[i] == 0).collect();
    let mut out = Vec::with_capacity(set.len());
    while let Some(i) = ready.pop_front() {
        out.push(i);
        for &r in &graph.refs[i] {
            if let Some(c) = pending.get_mut(&r) {
                *c -= 1;
                if *c == 0 {
                    ready.push_back(r);
                }
            }
        }
    }
    out
}

/// Removes a batch of dead paths from the database in one transaction; returns their names.
/// Invalidates a batch (referrers first) in one transaction, returning the paths that went.
/// A path that a path outside the collection refers to by now (a build registered it after
/// the collector judged the path dead) is skipped, not an error: the collection goes on
/// and the path stays, as does anything later in the batch that it refers to.
fn invalidate_batch(store: &LocalStore, paths: &[StorePath]) -> Result<Vec<(StorePath, String)>> {
    let abs: Vec<String> = paths.iter().map(|p| store.print(p)).collect();
    let gone = store.db.write("deleting dead paths", |c| {
        let mut gone = Vec::new();
        let mut referred = c
            .prepare_cached(
                "select 1 from Refs r join ValidPaths v on v.id = r.reference \
                 where v.path = ? and r.referrer != r.reference limit 1",
            )
            .map_err(Error::db("looking for referrers"))?;
        for (i, a) in abs.iter().enumerate() {
            let alive = referred
                .exists([a])
                .map_err(Error::db("looking for referrers"))?;
            if alive {
                tracing::info!("not deleting '{a}': a path registered meanwhile refers to it");
                continue;
            }
            Db::invalidate(c, a)?;
            gone.push(i);
        }
        Ok(gone)
    })?;
    let out: Vec<(StorePath, String)> = gone
        .into_iter()
        .map(|i| (paths[i].clone(), abs[i].clone()))
        .collect();
    for (_, a) in &out {
        tracing::debug!("deleting '{a}'");
    }
    Ok(out)
}

/// Deletes an invalid leftover if nobody is working on it (its lock is free).
fn delete_invalid(store: &LocalStore, p: &StorePath) -> Result<u64> {
    let real = store.real_path(p);
    if std::fs::symlink_metadata(&real).is_err()
        || store.temp_roots.contains(p)
        || store.gc.is_late_root(p)
    {
        return Ok(0);
    }
    let Some(mut lock) = store.lock_path(p, false)? else {
        return Ok(0);
    };
    if store.is_valid(p)? {
        return Ok(0);
    }
    tracing::info!("deleting invalid path '{}'", store.print(p));
    let freed = fsutil::remove_tree(&real)?;
    lock.set_delete(true);
    Ok(freed)
}

/// Removes entries of the store directory that are not valid paths (leftovers of crashed
/// or failed operations), skipping any whose lock is held or that someone roots.
fn sweep_invalid(store: &LocalStore, valid: &HashSet<&StorePath>) -> Result<u64> {
    let dir = &store.layout().real_store_dir;
    let others: BTreeMap<StorePath, ()> =
        roots::other_temp_roots(store.layout(), store.store_dir())?
            .into_iter()
            .map(|(_, p)| (p, ()))
            .collect();
    let mut freed = 0;
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "read", e))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if let Some(locked) = name.strip_suffix(".lock") {
            // A lock file nobody holds is a leftover (of a crashed builder, or of Nix,
            // which keeps them after failed builds). Taking it and deleting it through the
            // lock protocol marks it stale for anyone who opened it meanwhile.
            if let Ok(p) = StorePath::from_base_name(locked) {
                if let Ok(Some(mut l)) = store.lock_path(&p, false) {
                    l.set_delete(true);
                }
            }
            continue;
        }
        let Ok(p) = StorePath::from_base_name(&name) else {
            continue;
        };
        if valid.contains(&p) || others.contains_key(&p) {
            continue;
        }
        freed += delete_invalid(store, &p)?;
    }
    Ok(freed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{AddOptions, Layout, StoreOptions};
    use kiln_format::StoreDir;

    /// A build registers a referrer of a path after the collector judged it dead: the
    /// collector skips that path (and goes on) instead of failing.
    #[test]
    fn a_path_referred_to_since_it_was_judged_dead_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        let sd = StoreDir::new(d.path().join("store").to_str().unwrap()).unwrap();
        let layout = Layout::new(sd, d.path().join("state"), d.path().join("log"));
        let s = LocalStore::open(layout, StoreOptions::default()).unwrap();
        let add = |name: &str, refs: &[&StorePath]| {
            let refs: BTreeSet<StorePath> = refs.iter().map(|r| (*r).clone()).collect();
            s.add_text(name, name.as_bytes(), &refs, AddOptions::default())
                .unwrap()
                .path
        };
        let dead = add("dead", &[]);
        let judged = add("judged-dead", &[]);
        let other = add("also-dead", &[]);
        // Registered after the judgement, by a build: it refers to `judged`.
        let late = add("late-referrer", &[&judged]);
        let gone = invalidate_batch(&s, &[dead.clone(), judged.clone(), other.clone()]).unwrap();
        let gone: Vec<&StorePath> = gone.iter().map(|(p, _)| p).collect();
        assert_eq!(gone, [&dead, &other]);
        assert!(s.is_valid(&judged).unwrap());
        assert!(s.is_valid(&late).unwrap());
        assert!(!s.is_valid(&dead).unwrap());
    }
}
