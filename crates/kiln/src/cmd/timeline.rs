//! `kiln timeline summary`: where the time of a build run went, from its timeline file
//! (`kiln build --timeline FILE`, or the daemon's `timeline-file`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use kiln_build::timeline::{summarize, GoalSpans, Summary};

#[derive(Debug, Subcommand)]
pub enum TimelineCmd {
    /// The run's length, time by phase, how busy each machine's slots were, and the
    /// critical path (the chain of goals that decided the run's length).
    Summary {
        file: std::path::PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn secs(us: u64) -> String {
    format!("{:.2} s", us as f64 / 1e6)
}

/// Time a goal spent waiting (queued, for inputs, a lock or a slot).
fn waited(g: &GoalSpans) -> u64 {
    ["queued", "inputs", "lock", "slot"]
        .iter()
        .filter_map(|p| g.phases.get(*p))
        .sum()
}

fn busy_by_track(s: &Summary) -> Vec<(String, u64, f64)> {
    let wall = s.end.saturating_sub(s.start).max(1);
    s.slots
        .iter()
        .map(|(pid, n)| {
            let busy: u64 = s
                .goals
                .values()
                .filter(|g| g.slot.map(|(p, _)| p) == Some(*pid))
                .map(|g| {
                    ["setup", "build", "registering", "substitute"]
                        .iter()
                        .filter_map(|p| g.phases.get(*p))
                        .sum::<u64>()
                })
                .sum();
            let name = s
                .track_names
                .get(pid)
                .cloned()
                .unwrap_or_else(|| format!("track {pid}"));
            (name, *n, busy as f64 / (*n as f64 * wall as f64))
        })
        .collect()
}

pub fn run(cmd: TimelineCmd) -> anyhow::Result<ExitCode> {
    let TimelineCmd::Summary { file, json } = cmd;
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("reading the timeline '{}'", file.display()))?;
    let s = summarize(&text).with_context(|| format!("in '{}'", file.display()))?;
    let wall = s.end.saturating_sub(s.start);
    let path = s.critical_path();
    let by_phase = s.time_by_phase();
    let builds = s.goals.values().filter(|g| g.phases.contains_key("build"));
    let nr_builds = builds.count();
    let nr_subst = s
        .goals
        .values()
        .filter(|g| g.phases.contains_key("substitute"))
        .count();
    let failed: Vec<&GoalSpans> = s
        .goals
        .values()
        .filter(|g| {
            !matches!(
                g.status.as_str(),
                "Built" | "Substituted" | "AlreadyValid" | ""
            )
        })
        .collect();
    let busy = busy_by_track(&s);
    if json {
        let v = serde_json::json!({
            "wall": wall as f64 / 1e6,
            "builds": nr_builds,
            "substitutions": nr_subst,
            "failed": failed.iter().map(|g| &g.key).collect::<Vec<_>>(),
            "phases": by_phase.iter().map(|(k, v)| (k.clone(), *v as f64 / 1e6)).collect::<std::collections::BTreeMap<_, _>>(),
            "slots": busy.iter().map(|(n, k, b)| serde_json::json!({"track": n, "slots": k, "busy": b})).collect::<Vec<_>>(),
            "criticalPath": path.iter().map(|g| serde_json::json!({
                "goal": g.key,
                "start": g.start.saturating_sub(s.start) as f64 / 1e6,
                "began": g.work_start.unwrap_or(g.start).saturating_sub(s.start) as f64 / 1e6,
                "end": g.end.saturating_sub(s.start) as f64 / 1e6,
                "status": g.status,
                "phases": g.phases.iter().map(|(k, v)| (k.clone(), *v as f64 / 1e6)).collect::<std::collections::BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "run of {}: {nr_builds} builds, {nr_subst} substitutions, {} failed",
        secs(wall),
        failed.len()
    );
    let phases: Vec<String> = by_phase
        .iter()
        .map(|(k, v)| format!("{k} {}", secs(*v)))
        .collect();
    println!("time by phase, summed over goals: {}", phases.join(", "));
    for (name, n, b) in &busy {
        println!("{name}: {n} slots, busy {:.0}% of the run", b * 100.0);
    }
    let span = match (path.first(), path.last()) {
        (Some(a), Some(b)) => b.end.saturating_sub(a.start),
        _ => 0,
    };
    println!(
        "critical path: {} goals, {} of the run's {}",
        path.len(),
        secs(span),
        secs(wall)
    );
    println!(
        "  {:>9} {:>9} {:>9} {:>9} {:>9}  goal",
        "began", "waited", "setup", "built", "register"
    );
    for g in &path {
        let work = g.phases.get("build").or(g.phases.get("substitute"));
        println!(
            "  {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
            secs(g.work_start.unwrap_or(g.start).saturating_sub(s.start)),
            secs(waited(g)),
            secs(g.phases.get("setup").copied().unwrap_or(0)),
            secs(work.copied().unwrap_or(0)),
            secs(g.phases.get("registering").copied().unwrap_or(0)),
            g.key
        );
    }
    for g in &failed {
        println!("failed: {} ({})", g.key, g.status);
    }
    Ok(ExitCode::SUCCESS)
}
