//! `kiln ps`: the builds a daemon runs and queues, asked over its socket
//! (`QueryActiveBuilds`, as Nix's `nix ps`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{bail, Context};
use clap::Args;
use kiln_protocol::version::Feature;
use kiln_protocol::{Client, Reply, Request};
use serde_json::Value;

use super::StoreArgs;

#[derive(Debug, Args)]
pub struct PsArgs {
    /// The daemon's socket (default: the layout's `daemon-socket/socket`).
    #[arg(long, env = "KILN_DAEMON_SOCKET")]
    socket: Option<PathBuf>,
    /// Print the daemon's JSON answer (Nix's `nix ps --json` schema, with kiln's `queued`
    /// entries, `machine` and `memory`).
    #[arg(long)]
    json: bool,
}

fn secs(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn mib(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) => format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0)),
        None => "-".into(),
    }
}

fn user_name(uid: Option<u64>) -> String {
    match uid {
        Some(u) => uzers::get_user_by_uid(u as u32)
            .map(|x| x.name().to_string_lossy().into_owned())
            .unwrap_or_else(|| u.to_string()),
        None => "-".into(),
    }
}

/// CPU seconds of a build: its cgroup's, or its processes' own and children's.
fn cpu(b: &Value) -> Option<f64> {
    if let (Some(u), Some(s)) = (secs(&b["utime"]), secs(&b["stime"])) {
        return Some(u + s);
    }
    let ps = b["processes"].as_array()?;
    if ps.is_empty() {
        return None;
    }
    Some(
        ps.iter()
            .map(|p| {
                ["utime", "stime", "cutime", "cstime"]
                    .iter()
                    .filter_map(|k| secs(&p[*k]))
                    .sum::<f64>()
            })
            .sum(),
    )
}

pub fn run(args: &StoreArgs, a: PsArgs) -> anyhow::Result<ExitCode> {
    let (layout, _) = args.resolve()?;
    let socket = a.socket.unwrap_or_else(|| layout.daemon_socket_path());
    let mut c = Client::connect_with_features(
        &socket,
        layout.store_dir.clone(),
        kiln_protocol::version::SUPPORTED_FEATURES,
    )
    .with_context(|| format!("connecting to the daemon at '{}'", socket.display()))?;
    if !c.proto.has_feature(Feature::QueryActiveBuilds) {
        bail!(
            "the daemon at '{}' ({}) does not list its builds: it did not offer the '{}' feature",
            socket.display(),
            c.proto,
            Feature::QueryActiveBuilds.name()
        );
    }
    let reply = c.request(&Request::QueryActiveBuilds, None, &mut |_| {})?;
    let Reply::String(text) = reply else {
        bail!("the daemon answered QueryActiveBuilds with something else than a string");
    };
    let builds: Value = serde_json::from_str(&text).context("the daemon's answer")?;
    if a.json {
        println!("{builds}");
        return Ok(ExitCode::SUCCESS);
    }
    let list = builds.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("No active builds.");
        return Ok(ExitCode::SUCCESS);
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let sd = layout.store_dir.as_str();
    println!(
        "{:>8} {:<10} {:>9} {:>8} {:>9}  {:<18} {:<10} DERIVATION",
        "PID", "USER", "ELAPSED", "CPU", "MEMORY", "WHERE", "CLIENT"
    );
    let mut rows: Vec<&Value> = list.iter().collect();
    // Running first, then queued; each oldest first.
    rows.sort_by(|x, y| {
        let key = |v: &Value| {
            (
                v["type"] != "build",
                v["startTime"]
                    .as_f64()
                    .or(v["queuedSince"].as_f64())
                    .unwrap_or(0.0),
            )
        };
        let (a, b) = (key(x), key(y));
        a.0.cmp(&b.0).then(a.1.total_cmp(&b.1))
    });
    for b in rows {
        let drv = format!("{sd}/{}", b["derivation"].as_str().unwrap_or("?"));
        let client = match (b["clientPid"].as_u64(), b["clientUid"].as_u64()) {
            (Some(p), u) => format!("{} ({p})", user_name(u)),
            (None, Some(u)) => user_name(Some(u)),
            (None, None) => "-".into(),
        };
        if b["type"] == "build" {
            let machine = b["machine"].as_str().unwrap_or("");
            let pid = b["mainPid"].as_i64().unwrap_or(0);
            println!(
                "{:>8} {:<10} {:>8.1}s {:>8} {:>9}  {:<18} {:<10} {drv}",
                if pid > 0 { pid.to_string() } else { "-".into() },
                b["mainUser"]["name"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| user_name(b["mainUser"]["uid"].as_u64())),
                now - b["startTime"].as_f64().unwrap_or(now),
                cpu(b).map_or("-".into(), |c| format!("{c:.1}s")),
                mib(b["memory"].as_u64()),
                if machine.is_empty() {
                    "building here"
                } else {
                    machine
                },
                client,
            );
        } else {
            println!(
                "{:>8} {:<10} {:>8.1}s {:>8} {:>9}  {:<18} {:<10} {drv}",
                "-",
                "-",
                now - b["queuedSince"].as_f64().unwrap_or(now),
                "-",
                "-",
                format!("waiting: {}", b["waitingFor"].as_str().unwrap_or("?")),
                client,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
