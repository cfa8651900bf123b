//! Registration: durability marks and their recovery, registering valid paths (with
//! their references and derivation outputs), signatures, failed paths, invalidation.

use super::*;

impl LocalStore {
    /// Makes the contents of everything written so far durable.
    /// Sets up durability marks (see [`crate::durability`]): the marks' table, recovery
    /// of marks an unclean end left (when no live process owns them), the shared lock that
    /// says this process owns marks, and the syncer.
    pub(super) fn start_durability(&mut self) -> Result<()> {
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
            let good = nar_hash_of(&self.real_path(&p), HashAlgo::Sha256).is_ok_and(|(h, n)| {
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
                    self.sync_database()?;
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

    /// Makes the database's committed transactions durable (its write-ahead log), before
    /// the files of paths just invalidated are removed. With `synchronous=normal` a commit
    /// reaches the disk only with a later sync, while the file system may journal the
    /// removal of the files first: a power cut in between left a path valid without its
    /// contents (the power-cut test found it when a collection's commit had not been
    /// synced before the cut). No-op without `fsync-store-paths`.
    pub fn sync_database(&self) -> Result<()> {
        if !self.opts.fsync {
            return Ok(());
        }
        let wal = self.layout.db_dir().join("db.sqlite-wal");
        match std::fs::File::open(&wal) {
            Ok(f) => f.sync_data().map_err(|e| Error::io(&wal, "sync", e)),
            // No log: every commit is in the database file, which a checkpoint synced.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&wal, "open", e)),
        }
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
            // A build may make a `.drv` (dynamic derivations): what it made must parse.
            let d = self.read_derivation(&i.path).map_err(|e| {
                Error::Invalid(format!(
                    "error parsing derivation '{}': {e}",
                    sd.display(&i.path)
                ))
            })?;
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
                if let Err(e) = super::optimise::optimise_path(self, &i.path) {
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
        self.sync_database()?;
        let mut freed = 0;
        for p in paths {
            freed += self.remove_path_files(p)?;
        }
        Ok(freed)
    }
}

/// Refuses reference cycles inside a registration batch (self-references are fine).
pub(super) fn check_no_cycles(sd: &StoreDir, infos: &[ValidPathInfo]) -> Result<()> {
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
