//! Derivation goals up to the build: the derivation read, outputs substituted, inputs
//! realised (and resolved, for content-addressed inputs), the input closure.

use super::*;
use kiln_format::derivation::DynamicInput;

impl Worker {
    // ---- derivation goals --------------------------------------------------------------

    pub(super) fn work(&mut self, id: GoalId) {
        let state = match self.goals.get(&id).map(|g| &g.kind) {
            Some(Kind::Drv(d)) => Ok(d.state),
            Some(Kind::Subst(s)) => Err(s.state),
            None => return,
        };
        match state {
            Ok(DrvState::Init) => self.drv_init(id),
            Ok(DrvState::HaveDerivation) => self.have_derivation(id),
            Ok(DrvState::OutputsSubstituted) => self.outputs_substituted(id),
            Ok(DrvState::InputsRealised) => self.inputs_realised(id),
            Ok(DrvState::TryToBuild) => self.try_to_build(id),
            Ok(DrvState::Resolved) => self.resolved_finished(id),
            Ok(DrvState::WaitingForLocks)
            | Ok(DrvState::WaitingForHook)
            | Ok(DrvState::Building)
            | Ok(DrvState::QueryingRealisations) => {}
            Err(SubstState::Init) => self.subst_init(id),
            Err(SubstState::ReferencesValid) => self.references_valid(id),
            Err(SubstState::TryToRun) => self.try_to_run(id),
            Err(SubstState::Querying) | Err(SubstState::Fetching) => {}
        }
    }

    pub(super) fn drv_mut(&mut self, id: GoalId) -> Option<&mut DrvGoal> {
        match self.goals.get_mut(&id).map(|g| &mut g.kind) {
            Some(Kind::Drv(d)) => Some(d),
            _ => None,
        }
    }

    pub(super) fn set_state(&mut self, id: GoalId, s: DrvState) {
        if let Some(d) = self.drv_mut(id) {
            d.state = s;
        }
    }

    pub(super) fn fail_drv(&mut self, id: GoalId, status: BuildStatus, msg: String) {
        self.fail_drv_with(id, status, msg, None)
    }

    pub(super) fn fail_drv_with(
        &mut self,
        id: GoalId,
        status: BuildStatus,
        msg: String,
        detail: Option<crate::result::FailureDetail>,
    ) {
        if let Some(d) = self.drv_mut(id) {
            d.locks.clear();
            let drv = d.drv_path.clone();
            let abs = self.store().print(&drv);
            self.emit(
                id,
                Event::Message {
                    level: 0,
                    text: msg.clone(),
                },
            );
            tracing::debug!("{abs}: {msg}");
        }
        let r = BuildResult {
            detail,
            ..BuildResult::failed(status, msg)
        };
        self.done(id, Exit::Failed, r);
    }

    pub(super) fn output_result(&self, id: GoalId, status: BuildStatus) -> BuildResult {
        let mut r = BuildResult::new(status);
        if let Some(Goal {
            kind: Kind::Drv(d), ..
        }) = self.goals.get(&id)
        {
            if let Some(drv) = &d.drv {
                for (n, p) in self.output_map(&d.drv_path, drv) {
                    if let Some(p) = p {
                        r.outputs.insert(n, p);
                    }
                }
            }
        }
        r
    }

    pub(super) fn drv_init(&mut self, id: GoalId) {
        let store = self.store().clone();
        let Some(d) = self.drv_mut(id) else { return };
        let (drv_path, mode) = (d.drv_path.clone(), d.mode);
        if store.db().is_read_only() {
            let msg = format!(
                "cannot build derivation '{}' - no write access to the store",
                store.print(&drv_path)
            );
            return self.fail_drv(id, BuildStatus::MiscFailure, msg);
        }
        // Given in full (`Target::Basic`), or already in the store.
        if d.drv.is_some()
            || (mode == BuildMode::Normal && store.is_valid(&drv_path).unwrap_or(false))
        {
            return self.have_derivation(id);
        }
        let settings = self.goals[&id].settings.clone();
        let sub = self.make_subst_goal(&drv_path, false, &settings);
        self.add_waitee(id, sub);
        self.set_state(id, DrvState::HaveDerivation);
    }

    /// Output name → path where known: the derivation's own paths, or for outputs known
    /// only once built (floating content-addressed, deferred), their realisations.
    pub(super) fn output_map(
        &self,
        drv_path: &StorePath,
        drv: &Derivation,
    ) -> BTreeMap<String, Option<StorePath>> {
        if drv.outputs.values().all(|o| o.path.is_some()) {
            return drv
                .outputs
                .iter()
                .map(|(n, o)| (n.clone(), o.path.clone()))
                .collect();
        }
        self.store()
            .output_map_of(drv_path, drv)
            .unwrap_or_else(|e| {
                tracing::warn!(
                    "looking up the outputs of '{}': {e}",
                    self.store().print(drv_path)
                );
                drv.outputs.keys().map(|n| (n.clone(), None)).collect()
            })
    }

    /// Invalid wanted outputs: their paths, or `None` for an output whose path is not known
    /// before it is built.
    pub(super) fn invalid_outputs(&self, d: &DrvGoal, drv: &Derivation) -> Vec<Option<StorePath>> {
        let store = self.store();
        self.output_map(&d.drv_path, drv)
            .into_iter()
            .filter(|(n, _)| d.wanted.is_empty() || d.wanted.contains(n))
            .filter(|(_, p)| match p {
                None => true,
                Some(p) => {
                    let valid = store.is_valid(p).unwrap_or(false);
                    let good = valid && (d.mode != BuildMode::Repair || contents_good(store, p));
                    !good
                }
            })
            .map(|(_, p)| p)
            .collect()
    }

    pub(super) fn have_derivation(&mut self, id: GoalId) {
        let store = self.store().clone();
        let nr_failed = self.goals.get(&id).map(|g| g.nr_failed).unwrap_or(0);
        let Some(d) = self.drv_mut(id) else { return };
        let drv_path = d.drv_path.clone();
        let abs = store.print(&drv_path);
        if nr_failed != 0 {
            return self.fail_drv(
                id,
                BuildStatus::MiscFailure,
                format!("cannot build missing derivation '{abs}'"),
            );
        }
        let drv = match &d.drv {
            Some(drv) => drv.clone(),
            None => match store.read_derivation(&drv_path) {
                Ok(drv) => {
                    let drv = Arc::new(drv);
                    d.drv = Some(drv.clone());
                    drv
                }
                Err(e) => {
                    return self.fail_drv(
                        id,
                        BuildStatus::MiscFailure,
                        format!("cannot read derivation '{abs}': {e}"),
                    )
                }
            },
        };
        // The derivation and its outputs must survive a concurrent collection, whether it
        // was read from the store or given in full (a `BuildDerivation`): an output fetched
        // back from a build machine is protected by this root alone once its add's own is
        // released.
        let mut roots = vec![drv_path.clone()];
        roots.extend(drv.output_paths().map(|(_, p)| p.clone()));
        if store.add_temp_roots(&roots).is_ok() {
            self.goals
                .get_mut(&id)
                .expect("goal exists")
                .roots
                .extend(roots);
        }
        let d = match self.goals.get(&id).map(|g| &g.kind) {
            Some(Kind::Drv(d)) => d,
            _ => return,
        };
        let drv = d.drv.clone().expect("loaded");
        let invalid = self.invalid_outputs(d, &drv);
        let mode = d.mode;
        let asked = d.cache_realisations.clone();
        if invalid.is_empty() && mode == BuildMode::Normal {
            let r = self.output_result(id, BuildStatus::AlreadyValid);
            return self.done(id, Exit::Success, r);
        }
        let settings = self.goals[&id].settings.clone();
        for p in invalid.iter().flatten() {
            if self.path_failed(id, p) {
                return;
            }
        }
        let allow = crate::attrs::Attrs::of(&drv).flag("allowSubstitutes", true);
        if settings.use_substitutes
            && allow
            && self.cfg.substituter.is_some()
            && !settings.subst.is_empty()
            && mode != BuildMode::Check
        {
            // Outputs whose paths are known only once built: the caches may know what
            // they became (Nix's `DrvOutputSubstitutionGoal`), asked once.
            // (Impure outputs are never reused: not looked up.)
            if invalid.iter().any(Option::is_none) && asked.is_none() && !drv.is_impure() {
                return self.query_realisations(id, &drv);
            }
            let ca = drv
                .fixed_output()
                .map(|f| ContentAddress::Fixed(f.method, f.hash));
            let from_caches = asked
                .into_iter()
                .flat_map(|m| m.into_values())
                .map(|r| r.out_path)
                .filter(|p| !store.is_valid(p).unwrap_or(false));
            for p in invalid.into_iter().flatten().chain(from_caches) {
                let sub = self.make_subst_goal(&p, mode == BuildMode::Repair, &settings);
                if let (Some(ca), Some(s)) = (&ca, self.subst_mut(sub)) {
                    s.ca.get_or_insert(*ca);
                }
                self.add_waitee(id, sub);
            }
        }
        if self.goals[&id].waitees.is_empty() {
            self.outputs_substituted(id);
        } else {
            self.set_state(id, DrvState::OutputsSubstituted);
        }
    }

    /// Asks the caches for the realisations of the wanted outputs whose paths are not known
    /// before they are built; the answer comes back as [`Msg::Realisations`].
    fn query_realisations(&mut self, id: GoalId, drv: &Derivation) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let Some(d) = self.drv_mut(id) else { return };
        let (drv_path, wanted) = (d.drv_path.clone(), d.wanted.clone());
        d.cache_realisations = Some(BTreeMap::new());
        let names: Vec<String> = self
            .output_map(&drv_path, drv)
            .into_iter()
            .filter(|(n, p)| p.is_none() && (wanted.is_empty() || wanted.contains(n)))
            .map(|(n, _)| n)
            .collect();
        let (Some(sub), Ok(h)) = (
            self.cfg.substituter.clone(),
            store.output_hash(&drv_path, drv),
        ) else {
            return self.have_derivation(id);
        };
        let ids: Vec<DrvOutput> = names.iter().map(|n| DrvOutput::new(h, n)).collect();
        self.set_state(id, DrvState::QueryingRealisations);
        self.in_flight += 1;
        let tx = self.tx.clone();
        let log = line_logger(self.tx.clone(), id);
        std::thread::spawn(move || {
            let r = sub
                .query_realisations(&settings.subst, &ids, &log)
                .map_err(|e| e.to_string());
            let _ = tx.send(Msg::Realisations(id, r));
        });
    }

    /// The caches answered: what they know is substituted next (a failed lookup is only
    /// a warning: the outputs are built).
    pub(super) fn realisations_queried(
        &mut self,
        id: GoalId,
        r: std::result::Result<BTreeMap<DrvOutput, kiln_format::realisation::Realisation>, String>,
    ) {
        let found = match r {
            Ok(m) => m,
            Err(e) => {
                self.emit(
                    id,
                    Event::Message {
                        level: 1,
                        text: format!("warning: looking up realisations: {e}"),
                    },
                );
                BTreeMap::new()
            }
        };
        let Some(d) = self.drv_mut(id) else { return };
        d.cache_realisations = Some(found.into_iter().map(|(k, r)| (k.output, r)).collect());
        self.have_derivation(id);
    }

    /// Failure caching: an output that failed before fails again, without building.
    pub(super) fn path_failed(&mut self, id: GoalId, p: &StorePath) -> bool {
        let g = &self.goals[&id];
        if !g.settings.cache_failures || !self.store().has_failed(p).unwrap_or(false) {
            return false;
        }
        let msg = format!(
            "builder for '{}' failed previously (cached)",
            self.store().print(p)
        );
        let mut r = BuildResult::failed(BuildStatus::CachedFailure, msg.clone());
        r.failure.permanent = true;
        self.emit(
            id,
            Event::Message {
                level: 0,
                text: msg,
            },
        );
        self.done(id, Exit::Failed, r);
        true
    }

    pub(super) fn outputs_substituted(&mut self, id: GoalId) {
        let store = self.store().clone();
        let g = &self.goals[&id];
        let (nr_failed, nr_ns, nr_ic, settings) = (
            g.nr_failed,
            g.nr_no_substituters,
            g.nr_incomplete_closure,
            g.settings.clone(),
        );
        let Some(d) = self.drv_mut(id) else { return };
        let abs = store.print(&d.drv_path);
        if nr_failed > 0 && nr_failed > nr_ns + nr_ic && !settings.fallback {
            return self.fail_drv(
                id,
                BuildStatus::MiscFailure,
                format!("some substitutes for the outputs of derivation '{abs}' failed (usually happens due to networking issues); try '--fallback' to build derivation from source "),
            );
        }
        if nr_ic > 0 && !d.retry_substitution {
            d.retry_substitution = true;
        }
        if let Some(g) = self.goals.get_mut(&id) {
            g.nr_failed = 0;
            g.nr_no_substituters = 0;
            g.nr_incomplete_closure = 0;
        }
        let d = self.drv_mut(id).expect("goal exists");
        // Realisations from the caches whose paths are valid now are recorded: the outputs
        // are then known, here and to every later build.
        for r in d.cache_realisations.iter().flat_map(|m| m.values()) {
            if store.is_valid(&r.out_path).unwrap_or(false) {
                if let Err(e) = store.register_realisation(r) {
                    tracing::warn!("recording the realisation '{}': {e}", r.id);
                }
            }
        }
        if d.need_restart {
            d.need_restart = false;
            return self.have_derivation(id);
        }
        let drv = d.drv.clone().expect("loaded");
        let mode = d.mode;
        let d_ref = match self.goals.get(&id).map(|g| &g.kind) {
            Some(Kind::Drv(d)) => d,
            _ => return,
        };
        let nr_invalid = self.invalid_outputs(d_ref, &drv).len();
        if mode == BuildMode::Normal && nr_invalid == 0 {
            let r = self.output_result(id, BuildStatus::Substituted);
            return self.done(id, Exit::Success, r);
        }
        if mode == BuildMode::Repair && nr_invalid == 0 {
            let r = self.output_result(id, BuildStatus::AlreadyValid);
            return self.done(id, Exit::Success, r);
        }
        if mode == BuildMode::Check && nr_invalid > 0 {
            return self.fail_drv(
                id,
                BuildStatus::MiscFailure,
                format!("'{abs}' is missing outputs; build it normally before using '--check'"),
            );
        }
        // Build: all outputs from now on, after the inputs.
        self.emit(id, Event::BuildQueued { drv: abs.clone() });
        if let Some(g) = self.goals.get_mut(&id) {
            g.announced = true;
        }
        let d = self.drv_mut(id).expect("goal exists");
        d.resolve_wanted = std::mem::take(&mut d.wanted);
        let input_mode = if mode == BuildMode::Repair {
            BuildMode::Repair
        } else {
            BuildMode::Normal
        };
        // A pure derivation may not depend on an impure one, and that is refused before the
        // impure one is built. Only a derivation whose outputs wait for its inputs can
        // (an impure input's hash defers them), so no other derivation's inputs are read.
        if drv.needs_resolution() && drv.is_sandboxed() {
            for p in drv.input_drvs.keys() {
                if store.read_derivation(p).is_ok_and(|i| i.is_impure()) {
                    let msg = format!(
                        "pure derivation '{abs}' depends on impure derivation '{}'",
                        store.print(p)
                    );
                    return self.fail_drv(id, BuildStatus::MiscFailure, msg);
                }
            }
        }
        for (p, outs) in &drv.input_drvs {
            // An input used only for the derivations it makes: those outputs are asked for
            // with the dynamic inputs, once the inputs are in.
            if outs.is_empty() && drv.dynamic_inputs.contains_key(p) {
                continue;
            }
            let sub = self.make_drv_goal(p, outs, input_mode, &settings);
            self.add_waitee(id, sub);
        }
        for p in &drv.input_srcs {
            let sub = self.make_subst_goal(p, false, &settings);
            self.add_waitee(id, sub);
        }
        if self.goals[&id].waitees.is_empty() {
            self.inputs_realised(id);
        } else {
            let inputs = drv.input_drvs.keys().map(|p| store.print(p)).collect();
            self.emit(
                id,
                Event::Phase {
                    drv: abs,
                    phase: crate::event::Phase::Inputs { inputs },
                },
            );
            self.set_state(id, DrvState::InputsRealised);
        }
    }

    pub(super) fn inputs_realised(&mut self, id: GoalId) {
        let store = self.store().clone();
        let nr_failed = self.goals[&id].nr_failed;
        let Some(d) = self.drv_mut(id) else { return };
        let abs = store.print(&d.drv_path);
        if nr_failed != 0 {
            let msg = format!("{nr_failed} dependencies of derivation '{abs}' failed to build");
            self.emit(
                id,
                Event::Message {
                    level: 0,
                    text: msg.clone(),
                },
            );
            return self.done(
                id,
                Exit::Failed,
                BuildResult {
                    detail: Some(crate::result::FailureDetail::Dependencies(
                        nr_failed as usize,
                    )),
                    ..BuildResult::failed(BuildStatus::DependencyFailed, msg)
                },
            );
        }
        if d.retry_substitution {
            d.retry_substitution = false;
            return self.have_derivation(id);
        }
        let drv = d.drv.clone().expect("loaded");
        let mode = d.mode;
        // Dynamic inputs: each chain is followed as far as it is known; what is missing is
        // built (its waitees wake this goal again) before anything else happens.
        let mut dynamic_realised = BTreeMap::new();
        if !drv.dynamic_inputs.is_empty() {
            match self.dynamic_inputs_known(id, &drv) {
                Err(msg) => return self.fail_drv(id, BuildStatus::MiscFailure, msg),
                Ok((needed, _)) if !needed.is_empty() => {
                    let settings = self.goals[&id].settings.clone();
                    let input_mode = if mode == BuildMode::Repair {
                        BuildMode::Repair
                    } else {
                        BuildMode::Normal
                    };
                    for (p, outs) in needed {
                        let sub = self.make_drv_goal(&p, &outs, input_mode, &settings);
                        // A made derivation may name the one waiting for it (directly or
                        // through others): waiting would never end.
                        if self.waits_for(sub, id) {
                            return self.fail_drv(
                                id,
                                BuildStatus::MiscFailure,
                                format!(
                                    "derivation '{abs}' depends on itself through '{}', which a derivation made",
                                    store.print(&p)
                                ),
                            );
                        }
                        self.add_waitee(id, sub);
                    }
                    if self.goals[&id].waitees.is_empty() {
                        return self.fail_drv(
                            id,
                            BuildStatus::MiscFailure,
                            format!("the dynamic inputs of '{abs}' could not be asked for"),
                        );
                    }
                    return self.set_state(id, DrvState::InputsRealised);
                }
                Ok((_, known)) => dynamic_realised = known,
            }
        }
        // The input closure: outputs the derivation asks for from each input, and sources.
        let mut roots = Vec::new();
        let mut realised: BTreeMap<(StorePath, String), StorePath> = BTreeMap::new();
        let mut dynamic_inputs = false;
        for (p, outs) in &drv.input_drvs {
            // The input's goal has it parsed already, unless it was valid from the start.
            let loaded = self
                .drv_goals
                .get(p)
                .and_then(|g| match &self.goals.get(g)?.kind {
                    Kind::Drv(d) => d.drv.clone(),
                    Kind::Subst(_) => None,
                });
            let input = match loaded.map_or_else(|| store.read_derivation(p).map(Arc::new), Ok) {
                Ok(x) => x,
                Err(e) => return self.fail_drv(id, BuildStatus::MiscFailure, e.to_string()),
            };
            // A pure derivation's result must not depend on an impure one's (a fixed-output
            // derivation's may: its hash is checked).
            if input.is_impure() && !drv.is_impure() && !drv.is_fixed_output() {
                let msg = format!(
                    "pure derivation '{abs}' depends on impure derivation '{}'",
                    store.print(p)
                );
                return self.fail_drv(id, BuildStatus::MiscFailure, msg);
            }
            let mut known = self.output_map(p, &input);
            if known.values().any(Option::is_none) {
                if let Some(Kind::Drv(d)) = self.goals.get(&id).map(|g| &g.kind) {
                    for (o, path) in known.iter_mut().filter(|(_, x)| x.is_none()) {
                        *path = d.input_outputs.get(&(p.clone(), o.clone())).cloned();
                    }
                }
            }
            // A fixed-output derivation holds placeholders for inputs known only once built.
            dynamic_inputs |= outs
                .iter()
                .any(|o| input.outputs.get(o).is_some_and(|x| x.path.is_none()));
            for o in outs {
                match known.get(o).cloned().flatten() {
                    Some(op) => {
                        realised.insert((p.clone(), o.clone()), op.clone());
                        roots.push(op);
                    }
                    None => {
                        return self.fail_drv(
                            id,
                            BuildStatus::MiscFailure,
                            format!("derivation '{abs}' requires non-existent output '{o}' from input derivation '{}'", store.print(p)),
                        )
                    }
                }
            }
        }
        if drv.needs_resolution()
            || !drv.dynamic_inputs.is_empty()
            || (dynamic_inputs && drv.is_fixed_output())
        {
            return self.resolve(id, &drv, &realised, &dynamic_realised);
        }
        roots.extend(drv.input_srcs.iter().cloned());
        let closure = match self.closure(roots) {
            Ok(c) => c,
            Err(e) => return self.fail_drv(id, BuildStatus::MiscFailure, e.to_string()),
        };
        let d = self.drv_mut(id).expect("goal exists");
        d.input_paths = closure;
        d.state = DrvState::TryToBuild;
        self.wake(id);
    }

    /// Follows this derivation's dynamic inputs (outputs of derivations its inputs make) as
    /// far as they are known: an output is known once a goal reported it or, when the
    /// derivation is built already, from the store. Returns the goals still needed (the
    /// next link of a chain, or the outputs used of a made derivation) and, for what is
    /// known, the paths by input and chain of outputs (`[out, bin]`: output `bin` of the
    /// derivation that the input's `out` is).
    #[allow(clippy::type_complexity)]
    fn dynamic_inputs_known(
        &mut self,
        id: GoalId,
        drv: &Derivation,
    ) -> Result<
        (
            BTreeMap<StorePath, BTreeSet<String>>,
            BTreeMap<(StorePath, Vec<String>), StorePath>,
        ),
        String,
    > {
        let store = self.store().clone();
        let Some(Kind::Drv(d)) = self.goals.get(&id).map(|g| &g.kind) else {
            return Err("the goal is gone".into());
        };
        let lookup = |p: &StorePath, o: &str| -> Result<Option<StorePath>, String> {
            if let Some(x) = d.input_outputs.get(&(p.clone(), o.to_string())) {
                return Ok(Some(x.clone()));
            }
            let made = store.read_derivation(p).map_err(|e| e.to_string())?;
            match self.output_map(p, &made).get(o) {
                None => Err(format!(
                    "derivation '{}' does not have output '{o}'",
                    store.print(p)
                )),
                Some(Some(x)) if store.is_valid(x).map_err(|e| e.to_string())? => {
                    Ok(Some(x.clone()))
                }
                Some(_) => Ok(None),
            }
        };
        let mut needed: BTreeMap<StorePath, BTreeSet<String>> = BTreeMap::new();
        let mut known = BTreeMap::new();
        let mut todo: Vec<(
            &StorePath,
            Vec<String>,
            StorePath,
            &BTreeMap<String, DynamicInput>,
        )> = drv
            .dynamic_inputs
            .iter()
            .map(|(root, children)| (root, Vec::new(), root.clone(), children))
            .collect();
        while let Some((root, chain, current, children)) = todo.pop() {
            for (o, node) in children {
                let Some(made) = lookup(&current, o)? else {
                    needed.entry(current.clone()).or_default().insert(o.clone());
                    continue;
                };
                if !made.is_derivation() {
                    return Err(format!(
                        "output '{o}' of '{}' is '{}', which is not a derivation",
                        store.print(&current),
                        store.print(&made)
                    ));
                }
                let mut deeper = chain.clone();
                deeper.push(o.clone());
                for v in &node.outputs {
                    match lookup(&made, v)? {
                        Some(x) => {
                            let mut full = deeper.clone();
                            full.push(v.clone());
                            known.insert((root.clone(), full), x);
                        }
                        None => {
                            needed.entry(made.clone()).or_default().insert(v.clone());
                        }
                    }
                }
                todo.push((root, deeper, made, &node.children));
            }
        }
        let d = self.drv_mut(id).ok_or("the goal is gone")?;
        for (p, outs) in &needed {
            for o in outs {
                if !d.dynamic_asked.insert((p.clone(), o.clone())) {
                    return Err(format!(
                        "output '{o}' of '{}' was built but its path is not known",
                        store.print(p)
                    ));
                }
            }
        }
        Ok((needed, known))
    }

    /// Builds, in this derivation's place, the derivation it resolves to now that its inputs
    /// are built (their outputs' paths substituted for the input derivations), as Nix does
    /// for content-addressed inputs. The resolved `.drv` is written to the store.
    pub(super) fn resolve(
        &mut self,
        id: GoalId,
        drv: &Derivation,
        realised: &BTreeMap<(StorePath, String), StorePath>,
        dynamic_realised: &BTreeMap<(StorePath, Vec<String>), StorePath>,
    ) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let Some(d) = self.drv_mut(id) else { return };
        let abs = store.print(&d.drv_path);
        let (mode, wanted) = (d.mode, d.resolve_wanted.clone());
        let resolved = drv
            .resolve(store.store_dir(), |p, chain| match chain {
                [o] => realised.get(&(p.clone(), o.to_string())).cloned(),
                _ => {
                    let chain = chain.iter().map(|c| c.to_string()).collect();
                    dynamic_realised.get(&(p.clone(), chain)).cloned()
                }
            })
            .map_err(|e| e.to_string())
            .and_then(|r| {
                let text = r.to_aterm(store.store_dir());
                let path = store
                    .add_text(
                        &format!("{}.drv", r.name),
                        &text,
                        &r.references(),
                        kiln_store::AddOptions::default(),
                    )
                    .map_err(|e| e.to_string())?
                    .path;
                Ok((path, r))
            });
        let (path, resolved) = match resolved {
            Ok(x) => x,
            Err(e) => return self.fail_drv(id, BuildStatus::MiscFailure, e),
        };
        self.emit(
            id,
            Event::Message {
                level: 3,
                text: format!("resolved derivation: '{abs}' -> '{}'", store.print(&path)),
            },
        );
        // `add_text` made the resolved derivation a temporary root; it is this goal's, and
        // goes when the goal ends.
        if let Some(g) = self.goals.get_mut(&id) {
            g.roots.push(path.clone());
        }
        let resolved = Arc::new(resolved);
        let d = self.drv_mut(id).expect("goal exists");
        d.resolved = Some((path.clone(), resolved.clone()));
        d.state = DrvState::Resolved;
        let sub = self.make_drv_goal(&path, &wanted, mode, &settings);
        if let Some(rd) = self.drv_mut(sub) {
            rd.drv.get_or_insert(resolved);
        }
        self.add_waitee(id, sub);
    }

    /// The resolved derivation is built: its outputs are this derivation's, recorded as
    /// realisations of this derivation's outputs (with the input realisations they refer
    /// to), so that the next build of it finds them without resolving again.
    pub(super) fn resolved_finished(&mut self, id: GoalId) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let Some(d) = self.drv_mut(id) else { return };
        let (drv_path, drv) = (d.drv_path.clone(), d.drv.clone().expect("loaded"));
        let Some((rpath, rdrv)) = d.resolved.clone() else {
            return self.fail_drv(id, BuildStatus::MiscFailure, "resolution lost".into());
        };
        let result = d.resolved_result.take().unwrap_or_else(|| {
            BuildResult::failed(
                BuildStatus::MiscFailure,
                format!("building '{}' failed", store.print(&rpath)),
            )
        });
        if !result.success() {
            // Nix 2.34 says that the resolved derivation failed (its own failure was told
            // when it ended); older clients get the resolved build's message.
            let result = BuildResult {
                detail: Some(crate::result::FailureDetail::ResolvedFailed {
                    resolved: store.print(&rpath),
                }),
                ..result
            };
            return self.done(id, Exit::Failed, result);
        }
        // What the resolved build reported (impure outputs are recorded nowhere else).
        let mut outputs: BTreeMap<String, Option<StorePath>> = self.output_map(&rpath, &rdrv);
        for (name, p) in &result.outputs {
            outputs.insert(name.clone(), Some(p.clone()));
        }
        let registered = (|| -> std::result::Result<BTreeMap<String, StorePath>, String> {
            let h = store
                .output_hash(&drv_path, &drv)
                .map_err(|e| e.to_string())?;
            let keys = crate::job::secret_keys(&settings)?;
            // The resolved derivation's own outputs are recorded too when its build did not
            // do it (it is not floating), as Nix does for every build once resolution is
            // in play.
            let rhash = (!rdrv.is_floating())
                .then(|| store.output_hash(&rpath, &rdrv))
                .transpose()
                .map_err(|e| e.to_string())?;
            let mut out = BTreeMap::new();
            for (name, p) in outputs {
                let Some(p) = p else { continue };
                // Only what is there: the resolved derivation may have been asked for some
                // of its outputs only (an input-addressed one names the others' paths all
                // the same), and a realisation of a missing path would be a lie.
                if !store.is_valid(&p).map_err(|e| e.to_string())? {
                    continue;
                }
                out.insert(name.clone(), p.clone());
                // Impure outputs are never reused, so nothing records them.
                if drv.is_impure() {
                    continue;
                }
                if let Some(rh) = rhash {
                    let id = DrvOutput::new(rh, &name);
                    if store
                        .query_realisation(&id)
                        .map_err(|e| e.to_string())?
                        .is_none()
                    {
                        job::record_realisation(&store, id, &p, None, &keys)?;
                    }
                }
                let inputs_of = (!drv.is_fixed_output()).then_some(&*drv);
                job::record_realisation(&store, DrvOutput::new(h, &name), &p, inputs_of, &keys)?;
            }
            Ok(out)
        })();
        match registered {
            Ok(outputs) => {
                let mut r = result;
                if r.status == BuildStatus::AlreadyValid {
                    r.status = BuildStatus::ResolvesToAlreadyValid;
                }
                r.outputs = outputs;
                self.done(id, Exit::Success, r)
            }
            Err(e) => self.fail_drv(
                id,
                BuildStatus::MiscFailure,
                format!(
                    "registering the outputs of '{}': {e}",
                    store.print(&drv_path)
                ),
            ),
        }
    }

    /// The closure of valid `roots` (see `refs`); fails if one of them is not valid.
    pub(super) fn closure(
        &mut self,
        roots: Vec<StorePath>,
    ) -> kiln_store::Result<BTreeSet<StorePath>> {
        let mut seen = BTreeSet::new();
        let mut todo = roots;
        while let Some(p) = todo.pop() {
            if seen.contains(&p) {
                continue;
            }
            let refs = match self.refs.get(&p) {
                Some(r) => r.clone(),
                None => {
                    let r: Arc<[StorePath]> =
                        self.store().query_references(&p)?.into_iter().collect();
                    self.refs.insert(p.clone(), r.clone());
                    r
                }
            };
            todo.extend(refs.iter().filter(|r| !seen.contains(*r)).cloned());
            seen.insert(p);
        }
        Ok(seen)
    }
}
