//! Requests and the goal graph: who wants which goal, goals waiting for goals, a goal's end
//! passed to its waiters and requesters, goals nobody wants any more cancelled.

use super::*;

impl Worker {
    // ---- requests --------------------------------------------------------------------

    pub(super) fn submit(&mut self, id: RequestId, req: Request, reply: Completion) {
        let mut targets = Vec::new();
        for t in &req.targets {
            let gid = match t {
                Target::Derivation { drv, outputs } => {
                    self.make_drv_goal(drv, outputs, req.mode, &req.settings)
                }
                Target::Basic { drv_path, drv } => {
                    let id =
                        self.make_drv_goal(drv_path, &BTreeSet::new(), req.mode, &req.settings);
                    if let Some(d) = self.drv_mut(id) {
                        if d.drv.is_none() && d.state == DrvState::Init {
                            d.drv = Some(drv.clone());
                        }
                    }
                    id
                }
                Target::Path(p) => {
                    self.make_subst_goal(p, req.mode == BuildMode::Repair, &req.settings)
                }
            };
            targets.push((t.clone(), gid));
        }
        let n = targets.len();
        self.requests.insert(
            id,
            Req {
                targets: targets.clone(),
                results: vec![None; n],
                pending: n,
                reply: Some(reply),
                sink: req.sink.clone(),
                keep_going: req.settings.keep_going,
                failure: FailureKinds::default(),
                nested: req.nested,
                local_builds: req.settings.max_jobs != 0,
                roots: Vec::new(),
            },
        );
        if let Some(b) = req.nested {
            *self.lenders.entry(b).or_default() += 1;
            // A lent slot is a free slot for a waiting goal.
            self.slots_changed = true;
        }
        for (_, gid) in &targets {
            if let Some(g) = self.goals.get_mut(gid) {
                g.requests.insert(id);
            }
            self.add_interest(*gid, id);
        }
        if n == 0 {
            self.finish_request(id);
        }
    }

    pub(super) fn add_interest(&mut self, root: GoalId, req: RequestId) {
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            if let Some(g) = self.goals.get_mut(&id) {
                if g.interested.insert(req) {
                    stack.extend(g.waitees.iter().copied());
                }
            }
        }
    }

    pub(super) fn target_done(&mut self, req: RequestId, goal: GoalId, result: BuildResult) {
        // The outputs are rooted for the requester now, while the goal still holds its own
        // roots: a collection between its end and the request's cannot take them.
        let outputs: Vec<StorePath> = if result.success() {
            result.outputs.values().cloned().collect()
        } else {
            Vec::new()
        };
        let rooted = !outputs.is_empty()
            && self.requests.contains_key(&req)
            && self.cfg.store.add_temp_roots(&outputs).is_ok();
        let Some(r) = self.requests.get_mut(&req) else {
            return;
        };
        if rooted {
            r.roots.extend(outputs);
        }
        let mut failed = false;
        for (i, (_, g)) in r.targets.iter().enumerate() {
            if *g == goal && r.results[i].is_none() {
                failed |= !result.success();
                r.failure.merge(result.failure);
                r.results[i] = Some(result.clone());
                r.pending -= 1;
            }
        }
        if failed && !r.keep_going {
            // First failure: give up on the rest of this request.
            self.cancel_request(req, Some("build was cancelled after another build failed"));
            return;
        }
        if r.pending == 0 {
            self.finish_request(req);
        }
    }

    pub(super) fn finish_request(&mut self, id: RequestId) {
        let Some(r) = self.requests.remove(&id) else {
            return;
        };
        if let Some(b) = r.nested {
            if let Some(n) = self.lenders.get_mut(&b) {
                *n -= 1;
                if *n == 0 {
                    self.lenders.remove(&b);
                    self.slots_changed = true;
                }
            }
        }
        let results = r
            .targets
            .into_iter()
            .zip(r.results)
            .map(|((t, _), res)| {
                (
                    t,
                    res.unwrap_or_else(|| {
                        BuildResult::failed(BuildStatus::MiscFailure, "build was cancelled")
                    }),
                )
            })
            .collect();
        let roots = HeldRoots {
            store: Some(self.cfg.store.clone()),
            paths: r.roots,
        };
        // Unanswered (no reply), the roots go with `roots`.
        if let Some(reply) = r.reply {
            reply(RequestResult {
                results,
                failure: r.failure,
                roots,
            });
        }
    }

    /// Drops a request's claim on its goals (cancelling those nobody else wants) and
    /// answers it with what finished so far.
    pub(super) fn cancel_request(&mut self, id: RequestId, reason: Option<&str>) {
        let Some(r) = self.requests.get(&id) else {
            return;
        };
        let goals: Vec<GoalId> = r.targets.iter().map(|(_, g)| *g).collect();
        for g in goals {
            if let Some(goal) = self.goals.get_mut(&g) {
                goal.requests.remove(&id);
            }
            self.remove_interest(g, id);
            self.maybe_cancel(g);
        }
        if let Some(r) = self.requests.get_mut(&id) {
            for res in r.results.iter_mut().filter(|x| x.is_none()) {
                *res = Some(BuildResult {
                    cancelled: true,
                    ..BuildResult::failed(
                        BuildStatus::MiscFailure,
                        reason.unwrap_or("build was cancelled"),
                    )
                });
            }
        }
        self.finish_request(id);
    }

    pub(super) fn remove_interest(&mut self, root: GoalId, req: RequestId) {
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            let Some(g) = self.goals.get(&id) else {
                continue;
            };
            let still = g.requests.contains(&req)
                || g.waiters.iter().any(|w| {
                    self.goals
                        .get(w)
                        .is_some_and(|w| w.interested.contains(&req))
                });
            if !still {
                if let Some(g) = self.goals.get_mut(&id) {
                    if g.interested.remove(&req) {
                        stack.extend(g.waitees.iter().copied());
                    }
                }
            }
        }
    }

    pub(super) fn emit(&self, goal: GoalId, e: Event) {
        let Some(g) = self.goals.get(&goal) else {
            return;
        };
        if let Some(o) = &self.cfg.observer {
            o.event(&e);
        }
        for r in &g.interested {
            if let Some(req) = self.requests.get(r) {
                req.sink.event(&e);
            }
        }
    }

    // ---- goal bookkeeping ------------------------------------------------------------

    pub(super) fn new_goal(
        &mut self,
        key: String,
        kind: Kind,
        settings: &Arc<BuildSettings>,
    ) -> GoalId {
        let id = self.next_goal;
        self.next_goal += 1;
        self.goals.insert(
            id,
            Goal {
                key,
                kind,
                waitees: HashSet::new(),
                waiters: HashSet::new(),
                requests: HashSet::new(),
                interested: BTreeSet::new(),
                nr_failed: 0,
                nr_no_substituters: 0,
                nr_incomplete_closure: 0,
                settings: settings.clone(),
                result: None,
                roots: Vec::new(),
                inherited: Vec::new(),
                announced: false,
            },
        );
        self.wake(id);
        id
    }

    pub(super) fn make_drv_goal(
        &mut self,
        drv: &StorePath,
        outputs: &BTreeSet<String>,
        mode: BuildMode,
        settings: &Arc<BuildSettings>,
    ) -> GoalId {
        if let Some(&id) = self.drv_goals.get(drv) {
            if let Some(Goal {
                kind: Kind::Drv(d), ..
            }) = self.goals.get_mut(&id)
            {
                // More wanted outputs for a running goal: it restarts (reference's
                // `addWantedOutputs`).
                if !d.wanted.is_empty() {
                    if outputs.is_empty() {
                        d.wanted.clear();
                        d.need_restart = true;
                    } else {
                        for o in outputs {
                            if d.wanted.insert(o.clone()) {
                                d.need_restart = true;
                            }
                        }
                    }
                } else if !d.resolve_wanted.is_empty() {
                    // Building already: its resolved derivation is asked for these too.
                    if outputs.is_empty() {
                        d.resolve_wanted.clear();
                    } else {
                        d.resolve_wanted.extend(outputs.iter().cloned());
                    }
                }
            }
            return id;
        }
        let abs = self.store().print(drv);
        let key = drv_key(drv, &abs);
        let goal = DrvGoal {
            drv_path: drv.clone(),
            wanted: outputs.clone(),
            need_restart: false,
            retry_substitution: false,
            mode,
            drv: None,
            state: DrvState::Init,
            locks: Vec::new(),
            input_paths: BTreeSet::new(),
            job: None,
            resolved: None,
            resolved_result: None,
            input_outputs: BTreeMap::new(),
            dynamic_asked: BTreeSet::new(),
            cache_realisations: None,
            resolve_wanted: BTreeSet::new(),
            failed_machines: BTreeSet::new(),
            remote_attempts: 0,
        };
        let id = self.new_goal(key, Kind::Drv(Box::new(goal)), settings);
        self.drv_goals.insert(drv.clone(), id);
        id
    }

    pub(super) fn make_subst_goal(
        &mut self,
        p: &StorePath,
        repair: bool,
        settings: &Arc<BuildSettings>,
    ) -> GoalId {
        if let Some(&id) = self.subst_goals.get(p) {
            return id;
        }
        let abs = self.store().print(p);
        let goal = SubstGoal {
            path: p.clone(),
            ca: None,
            repair,
            state: SubstState::Init,
            info: None,
        };
        let id = self.new_goal(subst_key(p, &abs), Kind::Subst(Box::new(goal)), settings);
        self.subst_goals.insert(p.clone(), id);
        id
    }

    /// Whether `from` is `target` or waits for it, directly or through other goals.
    pub(super) fn waits_for(&self, from: GoalId, target: GoalId) -> bool {
        let mut seen = HashSet::new();
        let mut todo = vec![from];
        while let Some(g) = todo.pop() {
            if g == target {
                return true;
            }
            if seen.insert(g) {
                if let Some(goal) = self.goals.get(&g) {
                    todo.extend(goal.waitees.iter().copied());
                }
            }
        }
        false
    }

    pub(super) fn add_waitee(&mut self, waiter: GoalId, waitee: GoalId) {
        let interested = match self.goals.get_mut(&waiter) {
            Some(g) => {
                g.waitees.insert(waitee);
                g.interested.clone()
            }
            None => return,
        };
        if let Some(g) = self.goals.get_mut(&waitee) {
            g.waiters.insert(waiter);
        }
        for r in interested {
            self.add_interest(waitee, r);
        }
    }

    pub(super) fn wake(&mut self, id: GoalId) {
        if let Some(g) = self.goals.get(&id) {
            self.awake.insert((g.key.clone(), id));
        }
    }

    /// Takes a goal just removed from `goals` out of every queue and index, releases its
    /// temporary roots, and lets go of its waitees (cancelling those nobody else wants).
    fn forget(&mut self, id: GoalId, g: Goal) {
        self.awake.remove(&(g.key.clone(), id));
        self.wanting_to_build.remove(&(g.key.clone(), id));
        self.wanting_local.remove(&(g.key.clone(), id));
        self.wanting_to_substitute.remove(&(g.key.clone(), id));
        self.wait_needs.remove(&id);
        match &g.kind {
            Kind::Drv(d) => {
                if self.drv_goals.get(&d.drv_path) == Some(&id) {
                    self.drv_goals.remove(&d.drv_path);
                }
            }
            Kind::Subst(s) => {
                if self.subst_goals.get(&s.path) == Some(&id) {
                    self.subst_goals.remove(&s.path);
                }
            }
        }
        for r in g.roots.iter().chain(&g.inherited) {
            self.cfg.store.remove_temp_root(r);
        }
        for w in g.waitees {
            if let Some(wg) = self.goals.get_mut(&w) {
                wg.waiters.remove(&id);
            }
            self.maybe_cancel(w);
        }
    }

    /// A goal nobody waits for and no request wants is cancelled.
    pub(super) fn maybe_cancel(&mut self, id: GoalId) {
        let Some(g) = self.goals.get(&id) else { return };
        if !g.waiters.is_empty() || !g.requests.is_empty() || g.result.is_some() {
            return;
        }
        if g.announced {
            // Nobody asks any more, but watchers saw it start.
            let end = match &g.kind {
                Kind::Drv(d) => {
                    let mut r = BuildResult::failed(BuildStatus::MiscFailure, "cancelled");
                    r.cancelled = true;
                    Event::BuildFinished {
                        drv: self.store().print(&d.drv_path),
                        result: r,
                    }
                }
                Kind::Subst(s) => Event::SubstitutionFinished {
                    path: self.store().print(&s.path),
                    ok: false,
                    error: "cancelled".into(),
                },
            };
            if let Some(o) = &self.cfg.observer {
                o.event(&end);
            }
        }
        let g = self.goals.remove(&id).expect("present");
        if let Kind::Drv(d) = &g.kind {
            if let Some(j) = &d.job {
                j.cancel();
            }
        }
        self.forget(id, g);
    }

    pub(super) fn done(&mut self, id: GoalId, exit: Exit, result: BuildResult) {
        let event = match self.goals.get(&id) {
            None => return,
            Some(g) if g.result.is_some() => return,
            Some(g) => match &g.kind {
                Kind::Drv(d) => Some(Event::BuildFinished {
                    drv: self.store().print(&d.drv_path),
                    result: result.clone(),
                }),
                // An announced substitution ends, whether fetched or found valid meanwhile.
                Kind::Subst(s)
                    if exit != Exit::Success
                        || result.status == BuildStatus::Substituted
                        || g.announced =>
                {
                    Some(Event::SubstitutionFinished {
                        path: self.store().print(&s.path),
                        ok: exit == Exit::Success,
                        // Nothing failed when no cache had the path: whoever wanted it
                        // builds it, and nix-daemon says nothing of it either.
                        error: if exit == Exit::NoSubstituters {
                            String::new()
                        } else {
                            result.error.clone()
                        },
                    })
                }
                Kind::Subst(_) => None,
            },
        };
        if let Some(e) = event {
            self.emit(id, e);
        }
        let Some(g) = self.goals.get_mut(&id) else {
            return;
        };
        g.result = Some(result.clone());
        // What failed counts for every request that wanted it, directly or through the goals
        // waiting for it: a build failing because its dependency's builder failed exits
        // 100, as Nix's worker-wide failure status does.
        if !result.success() {
            let interested: Vec<RequestId> = g.interested.iter().copied().collect();
            for r in interested {
                if let Some(q) = self.requests.get_mut(&r) {
                    q.failure.merge(result.failure);
                }
            }
        }
        self.hook_declined.remove(&id);
        let Some(g) = self.goals.get_mut(&id) else {
            return;
        };
        let waiters: Vec<GoalId> = g.waiters.drain().collect();
        let requests: Vec<RequestId> = g.requests.iter().copied().collect();
        // What it made (or found) is its waiters' input: its roots pass to them before its
        // own go, or a collection between its end and their builds takes their inputs (a
        // collection racing 8 clients' builds of one graph failed their builds so). Nix's
        // daemon keeps every temporary root for a connection's whole life instead.
        let handed: Vec<StorePath> = if exit == Exit::Success {
            g.roots.clone()
        } else {
            Vec::new()
        };
        let finished_drv = match self.goals.get(&id).map(|g| &g.kind) {
            Some(Kind::Drv(d)) => Some(d.drv_path.clone()),
            _ => None,
        };
        for w in waiters {
            if !handed.is_empty() && self.goals.contains_key(&w) {
                // Counted roots: the count goes up here before this goal's go down.
                if self.cfg.store.add_temp_roots(&handed).is_ok() {
                    if let Some(wg) = self.goals.get_mut(&w) {
                        wg.inherited.extend(handed.iter().cloned());
                    }
                }
            }
            if let Some(d) = self.drv_mut(w) {
                if d.state == DrvState::Resolved {
                    d.resolved_result = Some(result.clone());
                }
                if let Some(input) = &finished_drv {
                    for (name, p) in &result.outputs {
                        d.input_outputs
                            .insert((input.clone(), name.clone()), p.clone());
                    }
                }
            }
            self.waitee_done(w, id, exit);
        }
        for r in requests {
            self.target_done(r, id, result.clone());
        }
        // Remove the goal; later requests for the same path start a fresh one.
        if let Some(g) = self.goals.remove(&id) {
            self.forget(id, g);
        }
        // The reference wakes every goal that waits for "any goal" when one finishes.
        for w in std::mem::take(&mut self.waiting_for_any_goal) {
            self.wake(w);
        }
    }

    pub(super) fn waitee_done(&mut self, waiter: GoalId, waitee: GoalId, exit: Exit) {
        let Some(g) = self.goals.get_mut(&waiter) else {
            return;
        };
        if g.result.is_some() || !g.waitees.remove(&waitee) {
            return;
        }
        if matches!(
            exit,
            Exit::Failed | Exit::NoSubstituters | Exit::IncompleteClosure
        ) {
            g.nr_failed += 1;
        }
        if exit == Exit::NoSubstituters {
            g.nr_no_substituters += 1;
        }
        if exit == Exit::IncompleteClosure {
            g.nr_incomplete_closure += 1;
        }
        if g.waitees.is_empty() || (exit == Exit::Failed && !g.settings.keep_going) {
            let rest: Vec<GoalId> = g.waitees.drain().collect();
            for w in rest {
                if let Some(wg) = self.goals.get_mut(&w) {
                    wg.waiters.remove(&waiter);
                }
                self.maybe_cancel(w);
            }
            self.wake(waiter);
        }
    }
}
