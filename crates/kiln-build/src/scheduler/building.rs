//! Building: output locks, where the build runs (this machine's slots, a build machine, the
//! build hook), the local job or the remote build, its events and its end.

use super::*;

impl Worker {
    /// Build slots: `max-jobs`, plus one lent by each recursive build with nested requests
    /// running (it waits for their builds, which would otherwise need the slot it holds:
    /// with `max-jobs = 1`, a deadlock). One per build, however many requests it sends, so
    /// a builder cannot multiply the daemon's slots.
    pub(super) fn max_jobs(&self) -> usize {
        self.cfg.max_jobs + self.lenders.len()
    }

    /// Wakes a goal waiting for a free slot, if any. Returns whether one was woken.
    pub(super) fn dispatch_slots(&mut self) -> bool {
        if self.placement.has_machines() {
            if self.slots_changed {
                if let Some(id) = self.next_placeable() {
                    self.wake(id);
                    return true;
                }
                self.slots_changed = false;
            }
        } else {
            let max = self.max_jobs();
            if self.building.len() < max {
                // The next goal in key order, whichever queue it is in.
                let next = match (self.wanting_to_build.first(), self.wanting_local.first()) {
                    (Some(a), Some(b)) if b < a => self.wanting_local.pop_first(),
                    (Some(_), _) => self.wanting_to_build.pop_first(),
                    (None, Some(_)) => self.wanting_local.pop_first(),
                    (None, None) => None,
                };
                if let Some((_, id)) = next {
                    self.wait_needs.remove(&id);
                    self.wake(id);
                    return true;
                }
            } else if self.building.is_empty() {
                if let Some((_, id)) = self.wanting_local.pop_first() {
                    self.wait_needs.remove(&id);
                    self.wake(id);
                    return true;
                }
            }
        }
        if !self.wanting_to_substitute.is_empty()
            && self.substituting.len() < self.cfg.max_substitution_jobs.max(1)
        {
            if let Some((_, id)) = self.wanting_to_substitute.pop_first() {
                self.wake(id);
                return true;
            }
        }
        false
    }

    /// With build machines: the first waiting goal, in key order, that some machine (this
    /// one included) can take now, taken out of its queue.
    pub(super) fn next_placeable(&mut self) -> Option<GoalId> {
        let local_running = self.building.len();
        let slots = self.max_jobs();
        let first = |q: &BTreeSet<(String, GoalId)>| {
            q.iter()
                .find(|(_, id)| {
                    self.wait_needs.get(id).is_none_or(|n| {
                        self.placement.choose(n, local_running, slots)
                            != crate::placement::Choice::Wait
                    })
                })
                .cloned()
        };
        let next = match (first(&self.wanting_to_build), first(&self.wanting_local)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        self.wanting_to_build.remove(&next);
        self.wanting_local.remove(&next);
        self.wait_needs.remove(&next.1);
        Some(next.1)
    }

    /// Nothing runs and nothing can start: fail the goals that wait for a build slot
    /// (the reference's "unable to start any build").
    pub(super) fn detect_stall(&mut self) {
        if !self.awake.is_empty()
            || !self.building.is_empty()
            || !self.remote_building.is_empty()
            || !self.substituting.is_empty()
            || self.in_flight > 0
        {
            return;
        }
        let stuck: Vec<GoalId> = self.wanting_to_build.iter().map(|(_, id)| *id).collect();
        let disabled = self.max_jobs() == 0;
        for id in stuck {
            self.wanting_to_build.retain(|(_, g)| *g != id);
            self.wait_needs.remove(&id);
            let msg = "unable to start any build; either increase '--max-jobs' or enable distributed builds";
            if disabled {
                self.fail_drv_with(
                    id,
                    BuildStatus::MiscFailure,
                    msg.into(),
                    Some(crate::result::FailureDetail::LocalBuildsDisabled),
                );
            } else {
                self.fail_drv(id, BuildStatus::MiscFailure, msg.into());
            }
        }
        let waiting: Vec<GoalId> = std::mem::take(&mut self.waiting_for_any_goal);
        for id in waiting {
            self.wake(id);
        }
    }

    pub(super) fn try_to_build(&mut self, id: GoalId) {
        let store = self.store().clone();
        let Some(d) = self.drv_mut(id) else { return };
        let drv = d.drv.clone().expect("loaded");
        // Another goal of ours holds an output lock: sleep until some goal finishes.
        if drv.output_paths().any(|(_, p)| store.is_locked_by_me(p)) {
            self.waiting_for_any_goal.push(id);
            return;
        }
        if d.locks.is_empty() {
            let mut paths: Vec<StorePath> = drv.output_paths().map(|(_, p)| p.clone()).collect();
            paths.sort();
            let mut locks = Vec::new();
            for p in &paths {
                match store.lock_path(p, false) {
                    Ok(Some(l)) => locks.push(l),
                    Ok(None) => {
                        // Held by another process: wait for it in the kernel, on a thread
                        // (no polling), then come back here with the locks.
                        drop(locks);
                        d.state = DrvState::WaitingForLocks;
                        let drv = store.print(&d.drv_path);
                        self.emit(
                            id,
                            Event::Phase {
                                drv,
                                phase: crate::event::Phase::Lock,
                            },
                        );
                        self.in_flight += 1;
                        let tx = self.tx.clone();
                        let st = store.clone();
                        std::thread::spawn(move || {
                            let mut got = Vec::new();
                            for p in &paths {
                                match st.lock_path(p, true) {
                                    Ok(Some(l)) => got.push(l),
                                    Ok(None) => {}
                                    Err(e) => {
                                        let _ = tx.send(Msg::Locks(id, Err(e.to_string())));
                                        return;
                                    }
                                }
                            }
                            let _ = tx.send(Msg::Locks(id, Ok(got)));
                        });
                        return;
                    }
                    Err(e) => return self.fail_drv(id, BuildStatus::MiscFailure, e.to_string()),
                }
            }
            self.drv_mut(id).expect("goal exists").locks = locks;
        }
        self.try_to_build_locked(id);
    }

    pub(super) fn locks_acquired(
        &mut self,
        id: GoalId,
        r: std::result::Result<Vec<PathLock>, String>,
    ) {
        let Some(d) = self.drv_mut(id) else { return };
        match r {
            Ok(locks) => {
                d.locks = locks;
                d.state = DrvState::TryToBuild;
                self.try_to_build_locked(id);
            }
            Err(e) => self.fail_drv(id, BuildStatus::MiscFailure, e),
        }
    }

    pub(super) fn try_to_build_locked(&mut self, id: GoalId) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let Some(d) = self.drv_mut(id) else { return };
        let drv = d.drv.clone().expect("loaded");
        let mode = d.mode;
        let abs = store.print(&d.drv_path);
        let valid: BTreeSet<String> = drv
            .output_paths()
            .filter(|(_, p)| {
                store.is_valid(p).unwrap_or(false)
                    && (mode != BuildMode::Repair || contents_good(&store, p))
            })
            .map(|(n, _)| n.to_string())
            .collect();
        // Someone else (another process) built it while we waited for the locks.
        if mode != BuildMode::Check && valid.len() == drv.outputs.len() {
            for l in d.locks.iter_mut() {
                l.set_delete(true);
            }
            d.locks.clear();
            let r = self.output_result(id, BuildStatus::AlreadyValid);
            return self.done(id, Exit::Success, r);
        }
        let outputs: Vec<StorePath> = drv.output_paths().map(|(_, p)| p.clone()).collect();
        for p in &outputs {
            if self.path_failed(id, p) {
                return;
            }
        }
        // Build slots: a derivation that prefers local building may take one even at
        // max-jobs 0 when nothing else runs.
        let prefer_local = crate::attrs::Attrs::of(&drv).flag("preferLocalBuild", false);
        // Offer the build to the hook first, unless it must be local (check and repair
        // modes, `preferLocalBuild`) or the hook already declined it: another machine may
        // have the platform or the features this one lacks.
        if let Some(program) = settings.build_hook.clone() {
            if mode == BuildMode::Normal
                && settings.use_build_hook
                && !prefer_local
                && !self.hook_declined.contains(&id)
            {
                return self.offer_to_hook(id, program);
            }
        }
        // Where it builds: here, or on a build machine (normal builds only: checks and
        // repairs compare with or replace what is here). Slots are the daemon's, shared by
        // every client, so a client's own max-jobs only ever forbids local builds; and it
        // decides for its own requests only: one client's 0 must not fail another's build.
        let local_error = settings.check_can_build(&drv, &abs).err();
        let local_allowed = prefer_local || self.local_builds_wanted(id);
        let remote = mode == BuildMode::Normal
            && settings.use_build_hook
            && self.cfg.remote.is_some()
            && !settings.builders.trim().is_empty();
        let mut allowed = BTreeSet::new();
        if remote {
            match crate::machines::parse_builders(&settings.builders, &settings.system) {
                Ok(ms) => {
                    for m in ms {
                        allowed.insert(self.placement.register(m));
                    }
                }
                Err(e) => return self.fail_drv(id, BuildStatus::MiscFailure, e.to_string()),
            }
        }
        let d = self.drv_mut(id).expect("goal exists");
        let needs = crate::placement::Needs {
            system: drv.platform.clone(),
            features: crate::settings::required_system_features(&drv),
            local: local_error.is_none() && local_allowed,
            prefer_local: prefer_local && local_error.is_none(),
            remote,
            allowed,
            excluded: d.failed_machines.clone(),
        };
        match self
            .placement
            .choose(&needs, self.building.len(), self.max_jobs())
        {
            crate::placement::Choice::Local => self.start_job(id, valid),
            crate::placement::Choice::Remote(i) => self.start_remote(id, i),
            crate::placement::Choice::Wait => {
                let d = self.drv_mut(id).expect("goal exists");
                d.locks.clear();
                let drv = abs.clone();
                self.emit(
                    id,
                    Event::Phase {
                        drv,
                        phase: crate::event::Phase::Slot,
                    },
                );
                let key = self.goals[&id].key.clone();
                if needs.prefer_local {
                    self.wanting_local.insert((key, id));
                } else {
                    self.wanting_to_build.insert((key, id));
                }
                self.wait_needs.insert(id, needs);
                self.slots_changed = true;
            }
            crate::placement::Choice::Nowhere => {
                let d = self.drv_mut(id).expect("goal exists");
                d.locks.clear();
                let machines = self.placement.why_nowhere(&needs);
                let with_machines = |msg: String| match &machines {
                    Some(why) => format!("{msg}\nNo build machine can build it either: {why}."),
                    None => msg,
                };
                let disabled = "unable to start any build; either increase '--max-jobs' or enable distributed builds";
                match (local_error, machines.is_some()) {
                    (Some((msg, _)), true) => {
                        self.fail_drv(id, BuildStatus::MiscFailure, with_machines(msg))
                    }
                    (Some((msg, detail)), false) => {
                        self.fail_drv_with(id, BuildStatus::MiscFailure, msg, Some(detail))
                    }
                    // Machines were named but none can take it: say why, rather than
                    // Nix's "local builds are disabled" alone.
                    (None, true) => {
                        self.fail_drv(id, BuildStatus::MiscFailure, with_machines(disabled.into()))
                    }
                    (None, false) => self.fail_drv_with(
                        id,
                        BuildStatus::MiscFailure,
                        disabled.into(),
                        Some(crate::result::FailureDetail::LocalBuildsDisabled),
                    ),
                }
            }
        }
    }

    /// Whether some request that wants goal `id` (directly or through the goals waiting
    /// for it) allows local builds.
    pub(super) fn local_builds_wanted(&self, id: GoalId) -> bool {
        let Some(g) = self.goals.get(&id) else {
            return true;
        };
        g.interested.is_empty()
            || g.interested
                .iter()
                .any(|r| self.requests.get(r).is_none_or(|q| q.local_builds))
    }

    pub(super) fn offer_to_hook(&mut self, id: GoalId, program: String) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        // Nix's `amWilling`: a machine that is busy is then waited for, not declined.
        let can_local = self.local_builds_wanted(id) && self.building.len() < self.max_jobs();
        let tx = self.tx.clone();
        let slot = self.hook_agents.clone();
        let d = self.drv_mut(id).expect("goal exists");
        d.state = DrvState::WaitingForHook;
        let drv = d.drv.clone().expect("loaded");
        let drv_path = d.drv_path.clone();
        let inputs = d.input_paths.clone();
        self.in_flight += 1;
        std::thread::spawn(move || {
            let abs = store.print(&drv_path);
            let features: Vec<String> = crate::settings::required_system_features(&drv)
                .into_iter()
                .collect();
            let log = line_logger(tx.clone(), id);
            let trace = (
                settings.max_silent_time,
                settings.print_build_trace,
                settings.timeout,
            );
            let reply = crate::hook::offer(
                &slot,
                &program,
                &settings.system,
                trace,
                can_local,
                &drv.platform,
                &abs,
                &features,
                &log,
            );
            let msg = match reply {
                Ok(crate::hook::Reply::Decline) => HookMsg::Declined,
                Ok(crate::hook::Reply::Postpone) => HookMsg::Postponed,
                Err(e) => HookMsg::Failed(e.to_string()),
                Ok(crate::hook::Reply::Accept(agent)) => {
                    let start = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let _ = tx.send(Msg::JobEvent(
                        id,
                        JobEvent::Started {
                            pid: 0,
                            log_file: String::new(),
                            round: 1,
                            rounds: 1,
                            machine: String::new(),
                        },
                    ));
                    let outputs: Vec<String> =
                        drv.output_paths().map(|(_, p)| store.print(p)).collect();
                    let tx_log = tx.clone();
                    let log = move |b: &[u8]| {
                        let _ = tx_log.send(Msg::JobEvent(id, JobEvent::Log(Arc::from(b))));
                    };
                    let inputs =
                        crate::hook::input_list(&store, &drv_path, &inputs).unwrap_or_default();
                    let mut r = match agent.run(&inputs, &outputs, &log) {
                        Ok(0) => {
                            let missing: Vec<&StorePath> = drv
                                .output_paths()
                                .map(|(_, p)| p)
                                .filter(|p| !store.is_valid(p).unwrap_or(false))
                                .collect();
                            if missing.is_empty() {
                                let mut r = BuildResult::new(BuildStatus::Built);
                                r.times_built = 1;
                                for (n, p) in drv.output_paths() {
                                    r.outputs.insert(n.to_string(), p.clone());
                                }
                                r
                            } else {
                                BuildResult::failed(
                                    BuildStatus::MiscFailure,
                                    format!(
                                        "the build hook did not produce output path '{}'",
                                        store.print(missing[0])
                                    ),
                                )
                            }
                        }
                        Ok(100) => BuildResult::failed(
                            BuildStatus::PermanentFailure,
                            format!("builder for '{abs}' failed with exit code 100"),
                        ),
                        Ok(101) => BuildResult::failed(
                            BuildStatus::TimedOut,
                            format!("building '{abs}' timed out"),
                        ),
                        Ok(c) => BuildResult::failed(
                            BuildStatus::MiscFailure,
                            format!("the build hook for '{abs}' failed with exit code {c}"),
                        ),
                        Err(e) => BuildResult::failed(BuildStatus::MiscFailure, e.to_string()),
                    };
                    r.start_time = start;
                    r.stop_time = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    HookMsg::Done(r)
                }
            };
            let _ = tx.send(Msg::Hook(id, msg));
        });
    }

    pub(super) fn hook_reply(&mut self, id: GoalId, m: HookMsg) {
        if !self.goals.contains_key(&id) {
            return;
        }
        match m {
            HookMsg::Declined => {
                self.hook_declined.insert(id);
                self.set_state(id, DrvState::TryToBuild);
                self.try_to_build_locked(id);
            }
            HookMsg::Postponed => {
                // Not now: release the locks and ask again in a moment (or when a goal ends).
                if let Some(d) = self.drv_mut(id) {
                    d.locks.clear();
                    d.state = DrvState::TryToBuild;
                }
                self.in_flight += 1;
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    let _ = tx.send(Msg::Wake(id));
                });
            }
            HookMsg::Failed(e) => self.fail_drv(id, BuildStatus::MiscFailure, e),
            HookMsg::Done(r) => {
                self.hook_declined.remove(&id);
                self.build_done(id, r, Vec::new());
            }
        }
    }

    pub(super) fn start_job(&mut self, id: GoalId, valid: BTreeSet<String>) {
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let tx = self.tx.clone();
        let tx2 = tx.clone();
        let d = self.drv_mut(id).expect("goal exists");
        let drv_shown = store.print(&d.drv_path);
        d.state = DrvState::Building;
        let setup = Event::Phase {
            drv: drv_shown.clone(),
            phase: crate::event::Phase::Setup,
        };
        let ctl = Arc::new(JobControl::default());
        d.job = Some(ctl.clone());
        let spec = JobSpec {
            store,
            drv_path: d.drv_path.clone(),
            drv: d.drv.clone().expect("loaded"),
            settings,
            mode: d.mode,
            valid_outputs: valid,
            input_paths: d.input_paths.clone(),
            recursive: self.cfg.recursive.clone(),
            events: Box::new(move |e| {
                let _ = tx2.send(Msg::JobEvent(id, e));
            }),
        };
        self.building.insert(id);
        self.emit(id, setup);
        let tx3 = tx.clone();
        let started = self.jobs.execute(move || {
            // A panic must still end the goal and free the slot (or the build would hang).
            let (r, infos) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job::run(spec, &ctl)))
                    .unwrap_or_else(|_| {
                        (
                            BuildResult::failed(
                                BuildStatus::MiscFailure,
                                "the build's thread panicked",
                            ),
                            Vec::new(),
                        )
                    });
            let _ = tx.send(Msg::JobDone(id, r, infos));
        });
        if let Err(e) = started {
            let r = BuildResult::failed(
                BuildStatus::MiscFailure,
                format!(
                    "cannot start a thread for the build of '{}': {e}",
                    drv_shown
                ),
            );
            let _ = tx3.send(Msg::JobDone(id, r, Vec::new()));
        }
    }

    /// Sends the build to machine `i` (see [`crate::remote`]); it holds the output locks
    /// here meanwhile, as a local build does.
    pub(super) fn start_remote(&mut self, id: GoalId, i: usize) {
        let Some(remote) = self.cfg.remote.clone() else {
            return self.fail_drv(id, BuildStatus::MiscFailure, "no remote builder".into());
        };
        let store = self.store().clone();
        let settings = self.goals[&id].settings.clone();
        let machine = self.placement.machine(i).clone();
        let tx = self.tx.clone();
        let tx2 = tx.clone();
        let d = self.drv_mut(id).expect("goal exists");
        d.state = DrvState::Building;
        let ctl = Arc::new(JobControl::default());
        d.job = Some(ctl.clone());
        let job = crate::remote::RemoteJob {
            store,
            drv_path: d.drv_path.clone(),
            drv: d.drv.clone().expect("loaded"),
            inputs: d.input_paths.clone(),
            settings,
            events: Arc::new(move |e| {
                let _ = tx2.send(Msg::JobEvent(id, e));
            }),
            locked: d
                .drv
                .as_ref()
                .map(|drv| drv.output_paths().map(|(_, p)| p.clone()).collect())
                .unwrap_or_default(),
            control: ctl.clone(),
        };
        self.placement.start(i);
        self.remote_building.insert(id, i);
        let tx3 = tx.clone();
        let started = self.jobs.execute(move || {
            // A panic must still end the goal and free the slot (or the build would hang).
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                remote.build(&machine, job, &ctl)
            }))
            .unwrap_or_else(|_| {
                crate::remote::RemoteOutcome::MachineFailed(
                    "the remote build's thread panicked".into(),
                )
            });
            let _ = tx.send(Msg::RemoteDone(id, i, outcome));
        });
        if let Err(e) = started {
            let outcome = crate::remote::RemoteOutcome::MachineFailed(format!(
                "cannot start a thread for the remote build: {e}"
            ));
            let _ = tx3.send(Msg::RemoteDone(id, i, outcome));
        }
    }

    /// A build on machine `i` ended. When the machine failed (not the build), the build is
    /// placed again without it, at most [`MAX_REMOTE_ATTEMPTS`] times.
    pub(super) fn remote_done(
        &mut self,
        id: GoalId,
        i: usize,
        outcome: crate::remote::RemoteOutcome,
    ) {
        self.remote_building.remove(&id);
        self.slots_changed = true;
        let failed = matches!(outcome, crate::remote::RemoteOutcome::MachineFailed(_));
        let left_out = self.placement.finish(i, failed);
        let (r, infos) = match outcome {
            crate::remote::RemoteOutcome::Finished(r, infos) => (*r, infos),
            crate::remote::RemoteOutcome::MachineFailed(e) => {
                let uri = self.placement.machine(i).uri.clone();
                let secs = left_out.map(|d| d.as_secs()).unwrap_or(0);
                tracing::warn!("cannot build on '{uri}': {e}");
                let store = self.store().clone();
                let Some(d) = self.drv_mut(id) else { return };
                d.job = None;
                d.failed_machines.insert(i);
                d.remote_attempts += 1;
                let attempts = d.remote_attempts;
                let drv = store.print(&d.drv_path);
                if attempts >= MAX_REMOTE_ATTEMPTS {
                    // The output locks go now, with their files (nothing was built).
                    for l in d.locks.iter_mut() {
                        l.set_delete(true);
                    }
                    d.locks.clear();
                    let msg = format!(
                        "building '{drv}' failed on {attempts} build machines; the last, '{uri}': {e}"
                    );
                    return self.fail_drv(id, BuildStatus::MiscFailure, msg);
                }
                self.emit(
                    id,
                    Event::Message {
                        level: 1,
                        text: format!(
                            "warning: cannot build '{drv}' on '{uri}': {e}; trying elsewhere (the machine is left out for {secs} s)"
                        ),
                    },
                );
                self.set_state(id, DrvState::TryToBuild);
                return self.try_to_build_locked(id);
            }
        };
        self.build_done(id, r, infos);
    }

    pub(super) fn job_event(&mut self, id: GoalId, e: JobEvent) {
        // A substitution's lines are messages (an unsigned or unreachable cache).
        if let (Some(Kind::Subst(_)), JobEvent::Log(data)) =
            (self.goals.get(&id).map(|g| &g.kind), &e)
        {
            let text = String::from_utf8_lossy(data).trim_end().to_string();
            return self.emit(id, Event::Message { level: 1, text });
        }
        if let (Some(Kind::Subst(s)), JobEvent::Download(download)) =
            (self.goals.get(&id).map(|g| &g.kind), &e)
        {
            let path = self.store().print(&s.path);
            let download = download.clone();
            return self.emit(id, Event::Download { path, download });
        }
        let Some(Goal {
            kind: Kind::Drv(d), ..
        }) = self.goals.get(&id)
        else {
            return;
        };
        let drv = self.store().print(&d.drv_path);
        let system = d
            .drv
            .as_ref()
            .map(|x| x.platform.clone())
            .unwrap_or_default();
        let ev = match e {
            JobEvent::Started {
                pid,
                log_file,
                round,
                rounds,
                machine,
            } => Event::BuildStarted {
                drv,
                system,
                log_file,
                pid,
                round,
                rounds,
                machine,
            },
            JobEvent::Log(data) => {
                let pid = 0;
                Event::BuildLog { drv, pid, data }
            }
            JobEvent::Warning(text) => Event::Message {
                level: 1,
                text: format!("warning: {text}"),
            },
            JobEvent::HookOutput(text) => Event::HookOutput { text },
            // Only substitutions download (see above).
            JobEvent::Download(_) => return,
            JobEvent::Registering => Event::Phase {
                drv,
                phase: crate::event::Phase::Registering,
            },
        };
        self.emit(id, ev);
    }

    pub(super) fn build_done(&mut self, id: GoalId, mut r: BuildResult, infos: Vec<ValidPathInfo>) {
        for i in infos {
            self.refs.insert(i.path, i.references.into_iter().collect());
        }
        let store = self.store().clone();
        // Roots the job took for this goal: its own from here, or released if it cannot
        // take them (gone, or failed after all).
        let handed = std::mem::take(&mut r.handed_roots);
        let release = |store: &LocalStore, roots: &[StorePath]| {
            for p in roots {
                store.remove_temp_root(p);
            }
        };
        let settings = match self.goals.get(&id) {
            Some(g) => g.settings.clone(),
            None => return release(&store, &handed),
        };
        let Some(d) = self.drv_mut(id) else {
            return release(&store, &handed);
        };
        d.job = None;
        let drv = d.drv.clone().expect("loaded");
        let success = r.success();
        for l in d.locks.iter_mut() {
            // The lock files go either way: once the outputs are valid later lockers never
            // need them, and after a failure a later locker makes a fresh one (the deletion
            // protocol marks the old file stale for anyone already waiting on it). Nix 2.8
            // keeps them after failures, for its collector to find as garbage.
            l.set_delete(true);
        }
        d.locks.clear();
        if !success {
            release(&store, &handed);
            if r.status == BuildStatus::PermanentFailure
                && settings.cache_failures
                && !drv.is_fixed_output()
            {
                for (_, p) in drv.output_paths() {
                    let _ = store.register_failed(p);
                }
            }
            self.emit(
                id,
                Event::Message {
                    level: 0,
                    text: r.error.clone(),
                },
            );
            return self.done(id, Exit::Failed, r);
        }
        // A floating build rooted its outputs' final paths for this goal (see `job`).
        match self.goals.get_mut(&id) {
            Some(g) => g.roots.extend(handed),
            None => release(&store, &handed),
        }
        self.done(id, Exit::Success, r);
    }
}
