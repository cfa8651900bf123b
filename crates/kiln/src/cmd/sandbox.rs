//! `kiln sandbox check`: which isolation features this machine gives builds.

use std::process::ExitCode;

use clap::Subcommand;

use super::StoreArgs;

#[derive(Debug, Subcommand)]
pub enum SandboxCmd {
    /// Set up a real, empty sandbox and report what works here.
    Check {
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: &StoreArgs, cmd: SandboxCmd) -> anyhow::Result<ExitCode> {
    let SandboxCmd::Check { json } = cmd;
    let (_, settings) = args.resolve()?;
    let root = rustix::process::geteuid().is_root();
    let sandbox = kiln_sandbox::supported();
    let landlock = kiln_sandbox::landlock_abi();
    let group = settings.get("build-users-group").to_string();
    let ids = if !root {
        "the daemon's own ids, mapped to 1000:100 (rootless)".to_string()
    } else if group.is_empty() {
        format!(
            "a free id from {}..{} per build, mapped to 1000:100",
            kiln_build::sandbox::AUTO_ID_START,
            kiln_build::sandbox::AUTO_ID_START + kiln_build::sandbox::AUTO_ID_COUNT
        )
    } else {
        match kiln_build::sandbox::group_members(&group) {
            Ok(m) => format!("{} members of '{group}', mapped to 1000:100", m.len()),
            Err(e) => format!("unusable: {e}"),
        }
    };
    let checks: Vec<(&str, bool, String)> = vec![
        (
            "namespaces (user, mount, pid, ipc, uts, network), pivot_root, seccomp",
            sandbox.is_ok(),
            sandbox.clone().err().unwrap_or_else(|| "available".into()),
        ),
        (
            "landlock abstract-socket and signal scopes",
            landlock.is_some_and(|v| v >= 6),
            match landlock {
                Some(v) if v >= 6 => format!("ABI {v}"),
                Some(v) => format!("ABI {v}: too old (6 needed); fixed-output builds can reach the host's abstract sockets"),
                None => "not available; fixed-output builds can reach the host's abstract sockets".into(),
            },
        ),
        {
            let mode = settings.get("fixed-output-network").to_string();
            let loopback = settings.get_bool("isolate-host-loopback");
            let found = kiln_sandbox::UserNet::find(loopback);
            (
                "fixed-output builds in their own network namespace (slirp4netns)",
                mode != "host" && found.is_some(),
                match (&found, mode.as_str()) {
                    (_, "host") => "no: fixed-output-network = host".to_string(),
                    (Some(n), _) => format!(
                        "{}{}",
                        n.program.display(),
                        if loopback {
                            ", host loopback isolated"
                        } else {
                            ", host loopback reachable at 10.0.2.2"
                        }
                    ),
                    (None, "slirp4netns") => {
                        "MISSING: slirp4netns not in PATH or /dev/net/tun not openable; \
                         fixed-output builds will fail"
                            .to_string()
                    }
                    (None, _) => {
                        "slirp4netns not in PATH or /dev/net/tun not openable; fixed-output \
                         builds share the host's network namespace"
                            .to_string()
                    }
                },
            )
        },
        ("builder ids", !ids.starts_with("unusable"), ids),
        {
            // A real build cgroup, made and removed again.
            let probe = format!("kiln-check-{}", std::process::id());
            let cg = kiln_sandbox::Cgroup::create(&probe).ok().flatten();
            // Where build cgroups go, and whether they account memory.
            let under = cg.as_ref().map(|c| {
                (
                    c.path().parent().map(|p| p.display().to_string()).unwrap_or_default(),
                    c.path().join("memory.peak").exists(),
                )
            });
            let use_cgroups = settings.get_bool("use-cgroups");
            (
                "a cgroup v2 per build (all its processes killed at the end, CPU time, peak memory)",
                use_cgroups && under.is_some(),
                match under {
                    _ if !use_cgroups => "no: use-cgroups = false".to_string(),
                    Some((dir, true)) => format!("under {dir}"),
                    Some((dir, false)) => format!(
                        "under {dir}; no memory controller there: peak memory is the largest process's"
                    ),
                    None => "no writable cgroup v2 hierarchy: builds end with their PID namespace \
                             or process group, CPU time and peak memory come from wait4"
                        .to_string(),
                },
            )
        },
        (
            "system-call filter and no_new_privs for builds outside the sandbox",
            settings.get_bool("filter-syscalls"),
            format!(
                "filter-syscalls = {}, allow-new-privileges = {}",
                settings.get("filter-syscalls"),
                settings.get("allow-new-privileges")
            ),
        ),
        (
            "sandbox setting",
            settings.get("sandbox") != "false",
            format!(
                "sandbox = {}, sandbox-fallback = {}",
                settings.get("sandbox"),
                settings.get("sandbox-fallback")
            ),
        ),
    ];
    if json {
        let v: serde_json::Map<String, serde_json::Value> = checks
            .iter()
            .map(|(k, ok, d)| (k.to_string(), serde_json::json!({"ok": ok, "detail": d})))
            .collect();
        println!("{}", serde_json::Value::Object(v));
    } else {
        for (k, ok, d) in &checks {
            println!("{} {k}: {d}", if *ok { "ok  " } else { "MISS" });
        }
    }
    Ok(if sandbox.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
