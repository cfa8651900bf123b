//! Realisations of content-addressed derivations' outputs, and the checks of a
//! derivation's output paths.

use super::*;

impl LocalStore {
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
}
