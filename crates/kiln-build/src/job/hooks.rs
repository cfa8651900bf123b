//! The hooks around a build: `pre-build-hook`, `post-build-hook`, `diff-hook`, and the
//! file-level report of a `--check` or rounds mismatch.

use super::*;

/// Appends to the derivation's build log how the rebuilt output `new` differs from the
/// valid `previous` one, file by file ([`crate::diff::report`]).
pub(super) fn append_diff_report(
    spec: &JobSpec,
    previous: &std::path::Path,
    new: &std::path::Path,
    out: &str,
) {
    if !spec.settings.keep_build_log {
        return;
    }
    let lines = crate::diff::report(previous, new);
    let mut text = format!("kiln: --check: output '{out}' differs from the valid one:\n");
    for l in &lines {
        text.push_str(l);
        text.push('\n');
    }
    if lines.is_empty() {
        text.push_str(
            "  (same files and contents: the difference is in their metadata or references)\n",
        );
    }
    match crate::log::LogWriter::append(
        &spec.store.layout().log_dir,
        &spec.drv_path,
        spec.settings.log_compression,
    ) {
        Ok(Some(mut w)) => {
            if let Err(e) = w.write(text.as_bytes()).and_then(|()| w.finish()) {
                tracing::warn!("writing the --check report to the build log: {e}");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("writing the --check report to the build log: {e}"),
    }
}

/// Runs `diff-hook` as Nix does when `--check` found `new` differing from `previous`:
/// `HOOK PREVIOUS NEW DRV BUILD-DIR`, from `/`, as the build's user (who owns the build
/// directory), not the daemon's: the directory's contents are the builder's, and a root
/// hook reading them would follow whatever links the builder left there (to
/// `/etc/shadow`, say) and print what it read to the clients. What it prints goes to the
/// daemon's log and to the clients as an error-level message; its failure is said the
/// same way, and is not the build's.
pub(super) fn run_diff_hook(
    spec: &JobSpec,
    hook: &str,
    previous: &std::path::Path,
    new: &std::path::Path,
    build_dir: Option<&LeftBuildDir>,
) {
    use std::os::unix::process::CommandExt;
    let drv = spec.store.store_dir().display(&spec.drv_path);
    let mut c = std::process::Command::new(hook);
    kiln_sandbox::limits::restore_for(&mut c);
    if let Some(b) = build_dir {
        if rustix::process::geteuid().is_root() && b.owner != daemon_ids() {
            if let Err(e) = b.open_to_owner(spec) {
                tracing::warn!("{e}");
            }
            // Setting the ids also drops the daemon's supplementary groups.
            c.uid(b.owner.0).gid(b.owner.1);
        }
    }
    let out = c
        .arg(previous)
        .arg(new)
        .arg(&drv)
        .arg(build_dir.map_or(std::path::Path::new(""), |b| b.dir.as_path()))
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .output();
    // What it says reaches the clients as an error message, as with nix-daemon.
    let said = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim_end().to_string(),
        Ok(o) => format!(
            "diff hook execution failed: diff-hook program '{hook}' {}",
            match o.status.code() {
                Some(c) => format!("failed with exit code {c}"),
                None => "was killed by a signal".to_string(),
            }
        ),
        Err(e) => format!("diff hook execution failed: running '{hook}': {e}"),
    };
    if !said.is_empty() {
        tracing::error!("{said}");
        (spec.events)(JobEvent::HookOutput(said));
    }
}

/// Runs `pre-build-hook` as Nix does: `HOOK DRV [SANDBOX-DIR]` (the directory only for a
/// sandboxed build); its output may name sandbox paths for this build:
///
/// ```text
/// extra-sandbox-paths      (or extra-chroot-dirs)
/// /dev/kvm
/// /run/secret=/etc/secret
///                          (an empty line ends the list)
/// ```
///
/// Anything else it prints is an error, as is its failure. It is the administrator's (or
/// a trusted client's) program: only trusted settings name it.
pub(super) fn run_pre_build_hook(
    hook: &str,
    drv: &str,
    chroot: Option<&str>,
) -> Result<Vec<String>, Failure> {
    let mut c = std::process::Command::new(hook);
    kiln_sandbox::limits::restore_for(&mut c);
    c.arg(drv);
    if let Some(dir) = chroot {
        c.arg(dir);
    }
    let out = c
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Failure::misc(format!("running pre-build-hook '{hook}': {e}")))?;
    if !out.status.success() {
        return Err(Failure::misc(format!(
            "program '{hook}' {}",
            match out.status.code() {
                Some(c) => format!("failed with exit code {c}"),
                None => "was killed by a signal".to_string(),
            }
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut paths = Vec::new();
    let mut in_list = false;
    for line in text.split_terminator('\n') {
        if in_list {
            if line.is_empty() {
                in_list = false;
            } else {
                paths.push(line.to_string());
            }
        } else if line == "extra-sandbox-paths" || line == "extra-chroot-dirs" {
            in_list = true;
        } else {
            return Err(Failure::misc(format!(
                "unknown pre-build hook command '{line}'"
            )));
        }
    }
    Ok(paths)
}

/// Runs `post-build-hook` (configured by the administrator or a trusted client) after a
/// successful build, with `DRV_PATH` and `OUT_PATHS` (space-separated) in the daemon's
/// environment; its output goes to the build log.
pub(super) fn run_post_build_hook(
    spec: &JobSpec,
    outputs: &BTreeMap<String, StorePath>,
) -> Result<(), String> {
    post_build_hook(
        &spec.settings,
        &spec.store,
        &spec.drv_path,
        outputs,
        &*spec.events,
    )
}

/// `post-build-hook` for a build of `drv_path` that produced `outputs` (here or on a build
/// machine: Nix runs it for both).
pub fn post_build_hook(
    settings: &BuildSettings,
    store: &LocalStore,
    drv_path: &StorePath,
    outputs: &BTreeMap<String, StorePath>,
    events: &dyn Fn(JobEvent),
) -> Result<(), String> {
    let Some(hook) = &settings.post_build_hook else {
        return Ok(());
    };
    let sd = store.store_dir();
    let outs: Vec<String> = outputs.values().map(|p| sd.display(p)).collect();
    events(JobEvent::Log(Arc::from(
        format!("running post-build-hook '{hook}'\n").into_bytes(),
    )));
    let mut c = std::process::Command::new(hook);
    kiln_sandbox::limits::restore_for(&mut c);
    let out = c
        .env("DRV_PATH", sd.display(drv_path))
        .env("OUT_PATHS", outs.join(" "))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running post-build-hook '{hook}': {e}"))?;
    for chunk in [&out.stdout, &out.stderr] {
        if !chunk.is_empty() {
            events(JobEvent::Log(Arc::from(chunk.as_slice())));
        }
    }
    if !out.status.success() {
        return Err(format!(
            "program '{hook}' {}",
            match out.status.code() {
                Some(c) => format!("failed with exit code {c}"),
                None => "was killed by a signal".to_string(),
            }
        ));
    }
    Ok(())
}
