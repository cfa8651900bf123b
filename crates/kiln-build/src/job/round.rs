//! One round of a build: the environment, the sandbox or the plain child, the builder's
//! process, the recursive-Nix socket it may use.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) fn build_round(
    spec: &JobSpec,
    ctl: &JobControl,
    plans: &[OutputPlan],
    to_tmp: &BTreeMap<String, String>,
    from_tmp: &BTreeMap<String, String>,
    fixed: bool,
    sandboxed: bool,
    round: u32,
    rounds: u32,
    held: &mut Finalized<'_>,
    recursive: Option<&Arc<crate::recursive::RecursiveBuild>>,
) -> Result<(Vec<ValidPathInfo>, Option<LeftBuildDir>), Failure> {
    let store = &spec.store;
    let sd = store.store_dir();
    let drv = &spec.drv;
    let drv_abs = sd.display(&spec.drv_path);
    // Leftovers of earlier attempts (never valid) go first.
    for p in plans {
        let real = store.real_path(&p.build_path);
        if std::fs::symlink_metadata(&real).is_ok()
            && (p.redirected || !store.is_valid(&p.build_path).unwrap_or(true))
        {
            tracing::info!("removing invalid path '{}'", real.display());
            fsutil::remove_tree(&real).map_err(Failure::misc)?;
        }
    }
    // Outside the sandbox (which maps ids of its own), a root daemon with build users runs
    // the builder as one of them, as the reference does: never as root.
    let build_user = if !sandboxed
        && rustix::process::geteuid().is_root()
        && !spec.settings.build_users_group.is_empty()
    {
        let ids = crate::sandbox::BuildIds::acquire(store, &spec.settings)
            .map_err(|e| Failure::misc(format!("acquiring a build user: {e}")))?;
        let_build_users_create_outputs(store, ids.gid).map_err(Failure::misc)?;
        Some(ids)
    } else {
        None
    };
    let bd = make_build_dir(spec, build_user.is_some())?;
    let build_dir = bd.dir.clone();
    // Whose inodes the builder makes, as the host sees them.
    let (mut builder_uid, mut builder_gid) = match &build_user {
        Some(u) => (u.uid, u.gid),
        None => daemon_ids(),
    };
    if let Some(u) = &build_user {
        std::os::unix::fs::chown(&build_dir, Some(u.uid), Some(u.gid))
            .map_err(|e| Failure::misc(format!("'{}': {e}", build_dir.display())))?;
    }
    let mut keep_dir = false;
    let result = (|| {
        // `pre-build-hook`: its paths join the sandbox's for this build. Only sandboxed
        // builds run it, as with nix-daemon (2.8 and 2.34): it exists to add sandbox paths.
        let with_hook;
        let settings: &BuildSettings = match &spec.settings.pre_build_hook {
            Some(hook) if sandboxed => {
                let chroot = format!("{}.chroot", store.real_path(&spec.drv_path).display());
                let extra = run_pre_build_hook(hook, &store.print(&spec.drv_path), Some(&chroot))?;
                let mut s = (*spec.settings).clone();
                s.sandbox_paths.extend(extra);
                with_hook = s;
                &with_hook
            }
            _ => &spec.settings,
        };
        let sandbox = if sandboxed {
            Some(
                crate::sandbox::BuildSandbox::prepare(&crate::sandbox::Contents {
                    store,
                    drv_path: &spec.drv_path,
                    drv,
                    settings,
                    inputs: &spec.input_paths,
                    build_dir: &build_dir,
                    fixed_output: fixed,
                })
                .map_err(|e| Failure::misc(format!("setting up the sandbox: {e}")))?,
            )
        } else {
            None
        };
        if let Some(sb) = &sandbox {
            (builder_uid, builder_gid) = (sb.ids.uid, sb.ids.gid);
        }
        let top = match &sandbox {
            Some(sb) => sb.build_top.clone(),
            None => build_dir.to_string_lossy().into_owned(),
        };
        let outputs: BTreeMap<String, String> = plans
            .iter()
            .map(|p| (p.name.clone(), sd.display(&p.build_path)))
            .collect();
        // What the builder sees: `builtins.placeholder` strings become the outputs' paths
        // (placeholders sort before hash parts, so a redirected output's placeholder turns
        // into its final path and then into the redirected one).
        let mut rw = to_tmp.clone();
        for p in plans {
            rw.insert(
                kiln_format::derivation::output_placeholder(&p.name),
                sd.display(&p.path),
            );
        }
        if !spec.settings.impure_env.is_empty()
            && !drv.is_sandboxed()
            && !spec
                .settings
                .experimental_features
                .contains("configurable-impure-env")
        {
            return Err(Failure::new(
                BuildStatus::MiscFailure,
                "experimental Nix feature 'configurable-impure-env' is disabled; use '--extra-experimental-features configurable-impure-env' to override",
            ));
        }
        let impure = |v: &str| {
            spec.settings
                .impure_env
                .get(v)
                .cloned()
                .or_else(|| std::env::var(v).ok())
        };
        let graph = |p: &StorePath| export_graph(store, p);
        let prepared = prepare_env(&EnvInputs {
            drv,
            store_dir: sd,
            build_top: &top,
            cores: spec.settings.cores,
            outputs: &outputs,
            impure: &impure,
            graph: &graph,
        })
        .map_err(|e| {
            let mut f = Failure::new(BuildStatus::InputRejected, e.to_string());
            f.kinds.permanent = true;
            f
        })?;
        for w in &prepared.warnings {
            (spec.events)(JobEvent::Warning(w.clone()));
        }
        for f in &prepared.files {
            let contents =
                rewrite::rewrite_str(&String::from_utf8_lossy(&f.contents), &rw).into_bytes();
            write_build_file(
                &build_dir,
                &f.name,
                if rw.is_empty() {
                    &f.contents
                } else {
                    &contents
                },
                (builder_uid, builder_gid),
            )?;
        }
        let mut env = prepared.env;
        // Recursive Nix: the socket is bound now (connections wait in its backlog) and
        // served once the builder runs, so that paths given to it can be mounted into its
        // sandbox. Only the builder's user may connect.
        let recursive_socket = match recursive {
            Some(_) => {
                let owner = match (&sandbox, &build_user) {
                    (Some(sb), _) => Some((sb.ids.uid, sb.ids.gid)),
                    (None, Some(u)) => Some((u.uid, u.gid)),
                    (None, None) => None,
                };
                let l = bind_recursive_socket(&build_dir, owner)?;
                env.insert(
                    "NIX_REMOTE".into(),
                    format!("unix://{top}/{}", crate::recursive::SOCKET_NAME),
                );
                Some(l)
            }
            None => None,
        };
        // `builtin:fetchurl` refuses to fetch for a derivation whose output nothing checks
        // (neither fixed-output nor impure), as Nix's does; it learns which from here.
        if drv.builder.starts_with("builtin:") {
            let kind = if drv.is_fixed_output() {
                "fixed-output"
            } else if drv.is_impure() {
                "impure"
            } else {
                "input-addressed"
            };
            env.insert("KILN_DERIVATION_KIND".into(), kind.into());
        }
        // `builtin:fetchurl` (kiln's own code) learns the hashed mirrors from the daemon.
        if drv.builder.starts_with("builtin:") && !spec.settings.hashed_mirrors.is_empty() {
            env.insert(
                "KILN_HASHED_MIRRORS".into(),
                spec.settings.hashed_mirrors.join(" "),
            );
        }
        // `netrc-file` for `builtin:fetchurl` of a derivation whose output a hash checks (or
        // an impure one), as Nix hands it over: its contents, read here (the builder cannot
        // read the daemon's files), in the builtin's environment rather than in a file of
        // the build directory, so that `--keep-failed` cannot leave the credentials behind
        // for the client. The builtin sends each host only its own entry.
        if drv.builder.starts_with("builtin:") && (drv.is_fixed_output() || drv.is_impure()) {
            if let Some(f) = &spec.settings.netrc_file {
                match kiln_substitute::netrc::Netrc::load(f) {
                    Ok(Some(_)) => match std::fs::read_to_string(f) {
                        // One environment string holds at most 128 KiB (`MAX_ARG_STRLEN`):
                        // a bigger file would make every such builder fail to start.
                        Ok(text) if text.len() <= 64 << 10 => {
                            env.insert("KILN_NETRC".into(), text);
                        }
                        Ok(_) => tracing::warn!(
                            "'{}' is larger than 64 KiB: builtin:fetchurl gets no credentials",
                            f.display()
                        ),
                        Err(_) => {}
                    },
                    Ok(None) => {}
                    Err(e) => tracing::warn!("{e}; builtin:fetchurl gets no credentials"),
                }
            }
        }
        let env: Vec<CString> = env
            .iter()
            .map(|(k, v)| CString::new(rewrite::rewrite_str(&format!("{k}={v}"), &rw)))
            .collect::<Result<_, _>>()
            .map_err(|_| {
                Failure::new(
                    BuildStatus::InputRejected,
                    "an environment variable contains a NUL byte",
                )
            })?;
        let (mut program, mut args) = builder_command(drv)?;
        if let Some(sb) = sandbox
            .as_ref()
            .filter(|_| drv.builder.starts_with("builtin:"))
        {
            program = sb.builtin_exe.clone();
        }
        args = args
            .into_iter()
            .map(|a| rewrite::rewrite_str(&a, &rw))
            .collect();
        let args: Vec<CString> = args
            .into_iter()
            .map(CString::new)
            .collect::<Result<_, _>>()
            .map_err(|_| {
                Failure::new(
                    BuildStatus::InputRejected,
                    "a builder argument contains a NUL byte",
                )
            })?;
        let personality = (drv.platform == "i686-linux" && spec.settings.system == "x86_64-linux"
            || drv.platform == "armhf-linux" && spec.settings.system == "aarch64-linux")
            .then_some(0x0008u64);
        let mut log = if spec.settings.keep_build_log {
            Some(
                LogWriter::create(
                    &store.layout().log_dir,
                    &spec.drv_path,
                    spec.settings.log_compression,
                )
                .map_err(Failure::misc)?,
            )
        } else {
            None
        };
        let (read_end, write_end) = kiln_sandbox::spawn::pipe_cloexec().map_err(Failure::misc)?;
        // Every process of the build, however it detaches, stays in this cgroup.
        let cgroup = if spec.settings.use_cgroups {
            let n = BUILD_COUNTER.fetch_add(1, Ordering::Relaxed);
            kiln_sandbox::Cgroup::create(&format!("kiln-build-{}-{n}", std::process::id()))
                .map_err(Failure::misc)?
        } else {
            None
        };
        let cgroup_procs = match &cgroup {
            Some(c) => Some(c.procs_fd().map_err(Failure::misc)?),
            None => None,
        };
        // guix-daemon 1.5 refuses a builder outside the store (resolving symbolic links
        // first: `/bin/sh` is `/usr/bin/dash` there), as a failure of the builder's start.
        if spec.settings.require_store_builder && !drv.builder.starts_with("builtin:") {
            let real = std::fs::canonicalize(&drv.builder)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| drv.builder.clone());
            if !real.starts_with(&format!("{}/", store.store_dir().as_str())) {
                let line = format!(
                    "while setting up the child process: in phase exec: derivation builder `{real}' is outside the store"
                );
                return Err(failed_to_start(spec, &mut log, &drv_abs, line));
            }
        }
        let child = kiln_sandbox::spawn(kiln_sandbox::ChildSpec {
            program: CString::new(program).map_err(|_| {
                Failure::new(
                    BuildStatus::InputRejected,
                    "the builder contains a NUL byte",
                )
            })?,
            args,
            env,
            cwd: CString::new(top.as_bytes()).map_err(Failure::misc)?,
            output: write_end,
            personality,
            uname26: spec.settings.impersonate_linux_26
                && matches!(drv.platform.as_str(), "i686-linux" | "x86_64-linux"),
            user: build_user.as_ref().map(|u| kiln_sandbox::UserSpec {
                uid: u.uid,
                gid: u.gid,
                groups: u.groups.clone(),
            }),
            oom_score_adj: true,
            sandbox: sandbox.as_ref().map(|sb| sb.sandbox.clone()),
            cgroup: cgroup_procs,
            seccomp: spec.settings.filter_syscalls,
            no_new_privs: !spec.settings.allow_new_privileges,
        });
        let child = match child {
            Ok(c) => c,
            // As Nix: a builder that cannot be executed is a builder that failed (exit
            // code 1, the reason in its log), not a fault of the daemon's set-up.
            Err(kiln_sandbox::Error::Setup { step, source }) if step == "executing the builder" => {
                let why = source.to_string();
                let why = why.split(" (os error").next().unwrap_or(&why).to_string();
                let line = format!("error: executing '{}': {why}", drv.builder);
                keep_dir = spec.settings.keep_failed;
                return Err(failed_to_start(spec, &mut log, &drv_abs, line));
            }
            Err(e) => return Err(Failure::misc(e)),
        };
        ctl.pid.store(child.pid, Ordering::SeqCst);
        let serving = match (recursive, recursive_socket, &spec.recursive) {
            (Some(rb), Some(listener), Some(server)) => serve_recursive(
                spec,
                rb,
                listener,
                server.as_ref(),
                sandbox.as_ref(),
                child.pid,
            ),
            _ => None,
        };
        let log_file = log
            .as_ref()
            .map(|(_, p)| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        (spec.events)(JobEvent::Started {
            pid: child.pid,
            log_file,
            round,
            rounds,
            machine: String::new(),
        });
        let (outcome, rusage) = monitor(spec, ctl, child.pid, read_end, log.map(|(w, _)| w));
        ctl.pid.store(0, Ordering::SeqCst);
        // A build user's processes die now, before anything the builder wrote is looked
        // at: whatever it left running (without a cgroup to kill it) could otherwise race
        // what follows, swapping names under the checks of its outputs or of a kept tree.
        let killed = match &build_user {
            Some(u) => kiln_sandbox::spawn::kill_user(u.uid).map_err(Failure::misc),
            None => Ok(()),
        };
        // The builder is gone: so is its daemon (its connections are ended and waited for).
        drop(serving);
        if let Some(rb) = recursive {
            rb.set_sandbox(None);
        }
        // Nothing of the build runs past this point; its cgroup's figures cover every
        // process it had, the wait status's only those that were waited for.
        ctl.add_usage(match cgroup.map(kiln_sandbox::Cgroup::finish) {
            // Peak memory: of the whole build where its cgroup accounts memory, else of
            // its largest process.
            Some(u) => Usage {
                memory_peak: u.memory_peak.or(rusage.memory_peak),
                ..u
            },
            None => rusage,
        });
        // A build user whose processes could not be killed must not have its files looked
        // at (reported now that the rest is cleaned up).
        killed?;
        (spec.events)(JobEvent::Registering);
        // Whatever the builder left in the sandbox's store comes out (made safe), so that
        // what follows handles outputs at their real paths, sandbox or not.
        if let Some(sb) = &sandbox {
            for p in plans {
                sb.take_output(store, &p.build_path)
                    .map_err(Failure::misc)?;
            }
        }
        let (status, tail) = match outcome {
            Monitor::Exited(st, tail) => (st, tail),
            Monitor::Stopped(f) => return Err(f),
        };
        if kiln_sandbox::spawn::exit_code(status) != Some(0) {
            let disk_full =
                disk_nearly_full(&store.layout().real_store_dir) || disk_nearly_full(&build_dir);
            if disk_full {
                (spec.events)(JobEvent::Log(Arc::from(
                    &b"note: build failure may have been caused by lack of free disk space\n"[..],
                )));
            }
            let status_text = kiln_sandbox::spawn::describe_status(status);
            let kind = if fixed || disk_full {
                BuildStatus::TransientFailure
            } else {
                BuildStatus::PermanentFailure
            };
            keep_dir = spec.settings.keep_failed;
            let log_tail = tail.lines();
            let mut f = Failure::new(
                kind,
                format!("builder for '{drv_abs}' {status_text}{}", suffix(&log_tail)),
            );
            f.detail = Some(crate::result::FailureDetail::Builder {
                status: status_text,
                log_tail,
            });
            return Err(f);
        }
        // Collect the outputs.
        let mut all_paths: Vec<StorePath> = spec.input_paths.iter().cloned().collect();
        all_paths.extend(plans.iter().map(|p| p.path.clone()));
        // Outputs may refer to what a recursive build added or built through its socket.
        if let Some(rb) = recursive {
            all_paths.extend(rb.added());
        }
        let mut infos = Vec::new();
        for p in plans {
            infos.push(
                register_output(spec, p, from_tmp, &all_paths, builder_uid).inspect_err(|_| {
                    keep_dir = spec.settings.keep_failed;
                })?,
            );
        }
        check_references(spec, plans, &infos)?;
        finalize_floating(spec, plans, infos, held).inspect_err(|_| {
            keep_dir = spec.settings.keep_failed;
        })
    })();
    match &result {
        Err(f) if f.status != BuildStatus::NotDeterministic || keep_dir => {
            if keep_dir {
                keep_build_dir(spec, &bd, builder_uid);
            } else {
                let _ = fsutil::remove_build_tree(&bd.top);
            }
            // Outputs of a failed build are not kept in the store unless asked for, and even
            // then never setuid or world-writable (CVE-2024-52867, CVE-2025-52992).
            for p in plans {
                let real = store.real_path(&p.build_path);
                if std::fs::symlink_metadata(&real).is_ok()
                    && !store.is_valid(&p.build_path).unwrap_or(true)
                {
                    // Kept: made safe and taken from the builder's ids (a later build may
                    // run as them), or else not kept at all.
                    let kept = spec.settings.keep_failed
                        && fsutil::hand_over(&real, builder_uid, daemon_ids()).is_ok();
                    if !kept {
                        let _ = fsutil::remove_tree(&real);
                    }
                }
            }
        }
        // A check that may find a difference keeps the directory for the `diff-hook`,
        // which is given it as Nix gives it: the caller removes it when done.
        Ok(_) if spec.mode == BuildMode::Check && spec.settings.diff_hook.is_some() => {
            let left = LeftBuildDir {
                top: bd.top.clone(),
                dir: bd.dir.clone(),
                owner: (builder_uid, builder_gid),
            };
            return result.map(|infos| (infos, Some(left)));
        }
        _ => {
            let _ = fsutil::remove_build_tree(&bd.top);
        }
    }
    result.map(|infos| (infos, None))
}

/// A successful round's build directory, left for the caller (`--check` with a
/// `diff-hook`); removed when dropped.
pub(super) struct LeftBuildDir {
    top: PathBuf,
    pub(super) dir: PathBuf,
    /// The host ids the builder ran as, who own what is in `dir`.
    pub(super) owner: (u32, u32),
}

impl LeftBuildDir {
    /// Lets its owner reach `dir` by path (the top, and the directory of builds, become
    /// traversable but unlistable, as for a build user outside the sandbox): for a hook
    /// run as the build's user once the builder is gone.
    pub(super) fn open_to_owner(&self, spec: &JobSpec) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        for p in [builds_parent(spec), self.top.clone()] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| format!("opening '{}' to the build's user: {e}", p.display()))?;
        }
        Ok(())
    }
}

impl Drop for LeftBuildDir {
    fn drop(&mut self) {
        let _ = fsutil::remove_build_tree(&self.top);
    }
}

/// Binds a recursive build's daemon socket in its build directory, 0600 and owned by the
/// builder's host ids (`owner`; the daemon's own when `None`).
pub(super) fn bind_recursive_socket(
    build_dir: &Path,
    owner: Option<(u32, u32)>,
) -> Result<std::os::unix::net::UnixListener, Failure> {
    let path = build_dir.join(crate::recursive::SOCKET_NAME);
    let fail = |what: &str, e: std::io::Error| {
        Failure::misc(format!(
            "{what} the daemon socket '{}': {e}",
            path.display()
        ))
    };
    // A socket address holds at most 107 bytes, which deep state directories exceed.
    let l = kiln_format::unix_socket::bind(&path).map_err(|e| fail("binding", e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail("protecting", e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
            .map_err(|e| fail("handing over", e))?;
    }
    Ok(l)
}

/// Starts serving a recursive build's socket once its builder runs (and, sandboxed, once
/// its namespaces are known, so that what it is given can be mounted in). A failure is
/// the builder's to see: its connections are refused.
pub(super) fn serve_recursive(
    spec: &JobSpec,
    rb: &Arc<crate::recursive::RecursiveBuild>,
    listener: std::os::unix::net::UnixListener,
    server: &dyn crate::recursive::RecursiveServer,
    sandbox: Option<&crate::sandbox::BuildSandbox>,
    pid: i32,
) -> Option<Box<dyn Send>> {
    let warn = |e: String| {
        (spec.events)(JobEvent::Log(Arc::from(
            format!("kiln: cannot serve the recursive Nix socket: {e}\n").as_bytes(),
        )));
    };
    if let Some(sb) = sandbox {
        let view = kiln_sandbox::Namespaces::of(pid)
            .map_err(|e| e.to_string())
            .and_then(|ns| {
                Ok(crate::recursive::SandboxView {
                    linker: sb.linker(&spec.store)?,
                    ns,
                })
            });
        match view {
            Ok(view) => rb.set_sandbox(Some(view)),
            Err(e) => {
                warn(e);
                return None;
            }
        }
    }
    match server.serve(listener, rb.clone()) {
        Ok(guard) => Some(guard),
        Err(e) => {
            warn(e);
            None
        }
    }
}

/// The builder program and its argv. `builtin:…` builders run as `kiln __builtin NAME`.
pub(super) fn builder_command(drv: &Derivation) -> Result<(String, Vec<String>), Failure> {
    if let Some(name) = drv.builder.strip_prefix("builtin:") {
        let exe = std::env::current_exe()
            .map_err(|e| Failure::misc(format!("cannot find kiln's own executable: {e}")))?;
        let exe = exe.to_string_lossy().into_owned();
        return Ok((exe.clone(), vec![exe, "__builtin".into(), name.into()]));
    }
    let base = Path::new(&drv.builder)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut args = vec![base];
    args.extend(drv.args.iter().cloned());
    Ok((drv.builder.clone(), args))
}
