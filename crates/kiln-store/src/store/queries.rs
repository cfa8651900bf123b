//! Queries: validity, path info, references and referrers, closures, derivations and
//! their outputs.

use super::*;

impl LocalStore {
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
        if self.db.path_info_in_one_statement(self.store_dir()) {
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
        let order = topo_order(&names, &edges);
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
}

/// Nix's order (`crate::export::topo_sort`'s, as `nix-store --export` and `-qR` list
/// paths) for nodes given by name with edges as index pairs
/// `(referrer, reference)`; returns indices.
pub fn topo_order(names: &[String], edges: &[(usize, usize)]) -> Vec<usize> {
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); names.len()];
    for &(a, b) in edges {
        children[a].push(b);
    }
    for c in &mut children {
        c.sort_unstable_by(|x, y| names[*x].cmp(&names[*y]));
        c.dedup();
    }
    let mut starts: Vec<usize> = (0..names.len()).collect();
    starts.sort_unstable_by(|x, y| names[*x].cmp(&names[*y]));
    let mut visited = vec![false; names.len()];
    let mut out = Vec::with_capacity(names.len());
    for s in starts {
        if visited[s] {
            continue;
        }
        visited[s] = true;
        let mut stack = vec![(s, 0usize)];
        while let Some((n, next)) = stack.last_mut() {
            let node = *n;
            if let Some(&c) = children[node].get(*next) {
                *next += 1;
                if !visited[c] {
                    visited[c] = true;
                    stack.push((c, 0));
                }
            } else {
                out.push(node);
                stack.pop();
            }
        }
    }
    out
}
