//! Substitution goals: query the caches, make the references valid, fetch.

use super::*;

impl Worker {
    // ---- substitution goals ------------------------------------------------------------

    pub(super) fn subst_mut(&mut self, id: GoalId) -> Option<&mut SubstGoal> {
        match self.goals.get_mut(&id).map(|g| &mut g.kind) {
            Some(Kind::Subst(s)) => Some(s),
            _ => None,
        }
    }

    pub(super) fn subst_fail(&mut self, id: GoalId, exit: Exit, msg: String) {
        let status = if exit == Exit::NoSubstituters {
            BuildStatus::NoSubstituters
        } else {
            BuildStatus::MiscFailure
        };
        let r = BuildResult::failed(status, msg);
        self.done(id, exit, r);
    }

    pub(super) fn subst_init(&mut self, id: GoalId) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let sub = self
            .cfg
            .substituter
            .clone()
            .filter(|_| settings.use_substitutes && !settings.subst.is_empty());
        let Some(s) = self.subst_mut(id) else { return };
        let (path, repair, ca) = (s.path.clone(), s.repair, s.ca);
        if store.add_temp_root(&path).is_ok() {
            self.goals
                .get_mut(&id)
                .expect("goal exists")
                .roots
                .push(path.clone());
        }
        if !repair && store.is_valid(&path).unwrap_or(false) {
            return self.done(
                id,
                Exit::Success,
                BuildResult::new(BuildStatus::AlreadyValid),
            );
        }
        let Some(sub) = sub else {
            let msg = format!(
                "path '{}' is required, but there is no substituter that can build it",
                store.print(&path)
            );
            return self.subst_fail(id, Exit::NoSubstituters, msg);
        };
        if let Some(s) = self.subst_mut(id) {
            s.state = SubstState::Querying;
        }
        self.in_flight += 1;
        let tx = self.tx.clone();
        let log = line_logger(self.tx.clone(), id);
        std::thread::spawn(move || {
            // A panic below must still end the goal (else it, and every request joining
            // it, would wait for ever): it becomes the query's error.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                sub.query_to_fetch(&settings.subst, &path, ca.as_ref(), &log)
                    .map_err(|e| e.to_string())
            }))
            .unwrap_or_else(|_| Err(format!("querying the caches for '{}' failed", path)));
            let _ = tx.send(Msg::Queried(id, r));
        });
    }

    pub(super) fn queried(
        &mut self,
        id: GoalId,
        r: std::result::Result<Option<SubstitutableInfo>, String>,
    ) {
        let store = self.store().clone();
        let settings = match self.goals.get(&id) {
            Some(g) => g.settings.clone(),
            None => return,
        };
        let Some(s) = self.subst_mut(id) else { return };
        let path = s.path.clone();
        let info = match r {
            Ok(Some(i)) => i,
            Ok(None) => {
                let msg = format!(
                    "path '{}' is required, but there is no substituter that can build it",
                    store.print(&path)
                );
                return self.subst_fail(id, Exit::NoSubstituters, msg);
            }
            Err(e) => return self.subst_fail(id, Exit::Failed, e),
        };
        s.info = Some(info.clone());
        s.state = SubstState::ReferencesValid;
        let queued = Event::SubstitutionQueued {
            path: store.print(&path),
            download_size: info.download_size,
            nar_size: info.nar_size,
            source: info.source.clone(),
        };
        self.emit(id, queued);
        if let Some(g) = self.goals.get_mut(&id) {
            g.announced = true;
        }
        for r in info.references.iter().filter(|r| **r != path) {
            let sub = self.make_subst_goal(r, false, &settings);
            self.add_waitee(id, sub);
        }
        if self.goals[&id].waitees.is_empty() {
            self.references_valid(id);
        }
    }

    pub(super) fn references_valid(&mut self, id: GoalId) {
        let g = &self.goals[&id];
        if g.nr_failed > 0 {
            let exit = if g.nr_no_substituters > 0 || g.nr_incomplete_closure > 0 {
                Exit::IncompleteClosure
            } else {
                Exit::Failed
            };
            let path = match &g.kind {
                Kind::Subst(s) => self.store().print(&s.path),
                _ => return,
            };
            return self.subst_fail(
                id,
                exit,
                format!("some references of path '{path}' could not be realised"),
            );
        }
        if let Some(s) = self.subst_mut(id) {
            s.state = SubstState::TryToRun;
        }
        self.wake(id);
    }

    pub(super) fn try_to_run(&mut self, id: GoalId) {
        let store = self.store().clone();
        if self.substituting.len() >= self.cfg.max_substitution_jobs.max(1) {
            let key = self.goals[&id].key.clone();
            self.wanting_to_substitute.insert((key, id));
            return;
        }
        let settings = self.goals[&id].settings.clone();
        let Some(s) = self.subst_mut(id) else { return };
        let (path, repair, ca) = (s.path.clone(), s.repair, s.ca);
        if store.is_locked_by_me(&path) {
            self.waiting_for_any_goal.push(id);
            return;
        }
        if !repair && store.is_valid(&path).unwrap_or(false) {
            return self.done(
                id,
                Exit::Success,
                BuildResult::new(BuildStatus::AlreadyValid),
            );
        }
        s.state = SubstState::Fetching;
        let source = s
            .info
            .as_ref()
            .map(|i| i.source.clone())
            .unwrap_or_default();
        let Some(sub) = self.cfg.substituter.clone() else {
            return;
        };
        self.substituting.insert(id);
        self.emit(
            id,
            Event::SubstitutionStarted {
                path: store.print(&path),
                source,
            },
        );
        let tx = self.tx.clone();
        let log = line_logger(self.tx.clone(), id);
        let progress: kiln_substitute::ProgressSink = {
            let tx = std::sync::Mutex::new(self.tx.clone());
            Arc::new(move |d| {
                if let Ok(tx) = tx.lock() {
                    let _ = tx.send(Msg::JobEvent(id, JobEvent::Download(d)));
                }
            })
        };
        // Whether a cache without the path (one naming an archive it lacks) counts as no
        // cache, as nix-daemon counts it (the derivation is built without `--fallback`);
        // guix-daemon counts it as a failed substitution.
        let gone_is_none = !store.is_guix_store();
        std::thread::spawn(move || {
            // As above: a panic ends the goal as a failure.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                sub.fetch(
                    &settings.subst,
                    &store,
                    &path,
                    ca.as_ref(),
                    repair,
                    &log,
                    &progress,
                )
                .map_err(|e| {
                    let gone = gone_is_none && matches!(e, kiln_substitute::Error::Unavailable(_));
                    (gone, e.to_string())
                })
            }))
            .unwrap_or_else(|_| {
                Err((
                    false,
                    format!("substituting '{}' failed", store.print(&path)),
                ))
            });
            let _ = tx.send(Msg::Fetched(id, r));
        });
    }

    pub(super) fn fetched(&mut self, id: GoalId, r: std::result::Result<(), (bool, String)>) {
        match r {
            Ok(()) => self.done(
                id,
                Exit::Success,
                BuildResult::new(BuildStatus::Substituted),
            ),
            // No cache had it after all (one named an archive it lacks): as if none had
            // offered it, so a derivation goes on to build without `--fallback`.
            Err((true, e)) => self.subst_fail(id, Exit::NoSubstituters, e),
            Err((false, e)) => self.subst_fail(id, Exit::Failed, e),
        }
    }
}
