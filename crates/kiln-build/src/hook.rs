//! The build hook: an external agent that may build a derivation elsewhere, spoken to with
//! the reference's offload protocol.
//!
//! The agent runs as `<build-hook> offload <system> <max-silent-time> <print-build-trace>
//! <timeout>`. For each candidate build kiln writes `<can-build-locally 0|1> <system> <drv>
//! <feature,…>`; the agent answers `# accept`, `# decline` or `# postpone` (other lines are
//! log). On accept kiln writes the input paths, then the missing outputs, each as one
//! space-separated line, and closes the agent's input; the agent's output is the build log and
//! its exit status the result (0 success, 100 build failure, 101 timeout). An idle agent is
//! kept for the next candidate.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use kiln_format::StorePath;

use crate::error::{Error, Result};

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// Idle agents, reused across candidates.
pub type AgentSlot = Arc<Mutex<Option<Agent>>>;

/// What the agent said.
#[derive(Debug)]
pub enum Reply {
    Accept(Agent),
    Decline,
    Postpone,
}

fn spawn(program: &str, system: &str, max_silent: u64, trace: bool, timeout: u64) -> Result<Agent> {
    let mut cmd = Command::new(program);
    // The limit on open files the daemon started with, not its raised one.
    kiln_sandbox::limits::restore_for(&mut cmd);
    let mut child = cmd
        .args([
            "offload",
            system,
            &max_silent.to_string(),
            if trace { "1" } else { "0" },
            &timeout.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(program, "start the build hook", e))?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::Invalid("build hook has no stdin".into()))?;
    let stdout = BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| Error::Invalid("build hook has no stdout".into()))?,
    );
    Ok(Agent {
        child,
        stdin,
        stdout,
    })
}

/// Offers a build to the agent.
#[allow(clippy::too_many_arguments)]
pub fn offer(
    slot: &AgentSlot,
    program: &str,
    system: &str,
    settings: (u64, bool, u64),
    can_build_locally: bool,
    platform: &str,
    drv: &str,
    features: &[String],
    log: &dyn Fn(&str),
) -> Result<Reply> {
    let existing = slot
        .lock()
        .map_err(|_| Error::Invalid("hook lock poisoned".into()))?
        .take();
    let mut agent = match existing {
        Some(a) => a,
        None => spawn(program, system, settings.0, settings.1, settings.2)?,
    };
    let line = format!(
        "{} {platform} {drv} {}\n",
        if can_build_locally { 1 } else { 0 },
        features.join(",")
    );
    agent
        .stdin
        .write_all(line.as_bytes())
        .and_then(|_| agent.stdin.flush())
        .map_err(|e| Error::io(program, "write to the build hook", e))?;
    loop {
        let mut l = String::new();
        let n = agent
            .stdout
            .read_line(&mut l)
            .map_err(|e| Error::io(program, "read from the build hook", e))?;
        if n == 0 {
            return Err(Error::Invalid(
                "the build hook exited without answering".into(),
            ));
        }
        let l = l.trim_end_matches('\n');
        let Some(reply) = l.strip_prefix("# ") else {
            log(l);
            continue;
        };
        return match reply {
            "accept" => Ok(Reply::Accept(agent)),
            "decline" | "postpone" => {
                if let Ok(mut s) = slot.lock() {
                    *s = Some(agent);
                }
                Ok(if reply == "decline" {
                    Reply::Decline
                } else {
                    Reply::Postpone
                })
            }
            other => Err(Error::Invalid(format!("bad hook reply '{other}'"))),
        };
    }
}

impl Agent {
    /// Hands the agent the inputs and missing outputs, relays its output to `log` until it
    /// exits, and returns its exit code.
    pub fn run(
        mut self,
        inputs: &[String],
        outputs: &[String],
        log: &(dyn Fn(&[u8]) + Sync),
    ) -> Result<i32> {
        let mut l1: String = inputs.iter().map(|i| format!("{i} ")).collect();
        l1.push('\n');
        let mut l2: String = outputs.iter().map(|o| format!("{o} ")).collect();
        l2.push('\n');
        self.stdin
            .write_all(l1.as_bytes())
            .and_then(|_| self.stdin.write_all(l2.as_bytes()))
            .map_err(|e| Error::io("build hook", "write to", e))?;
        drop(self.stdin);
        let mut stderr = self.child.stderr.take();
        let mut stdout = self.stdout;
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = vec![0u8; 16384];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log(&buf[..n]);
                }
            });
            if let Some(e) = stderr.as_mut() {
                let mut buf = vec![0u8; 16384];
                while let Ok(n) = e.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log(&buf[..n]);
                }
            }
        });
        let st = self
            .child
            .wait()
            .map_err(|e| Error::io("build hook", "wait for", e))?;
        Ok(st.code().unwrap_or(-1))
    }
}

/// Inputs to send: the input closure and the derivation's own closure.
pub fn input_list(
    store: &kiln_store::LocalStore,
    drv: &StorePath,
    inputs: &std::collections::BTreeSet<StorePath>,
) -> Result<Vec<String>> {
    let mut all = inputs.clone();
    all.extend(store.closure([drv], false)?);
    Ok(all.iter().map(|p| store.print(p)).collect())
}
