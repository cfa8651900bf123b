//! One SSH session to a machine, run by the system's OpenSSH client.
//!
//! The command line is Nix's: the options in `NIX_SSHOPTS` first (ssh keeps the first
//! value it sees of an option, so the user's win), no X11 or agent forwarding, the
//! machines file's identity file, and its host key, when it gives one, as the only key
//! accepted for the host. kiln adds `BatchMode` (a daemon has no terminal: a machine that
//! asks for a password is refused at once instead of hanging) and a connection timeout,
//! so that an unreachable machine is skipped in seconds.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use kiln_build::machines::Machine;

use crate::Error;

/// Where a session's standard error goes while a build runs (the serve protocol's build
/// log arrives there).
pub(crate) type LogSink = Arc<Mutex<Option<Box<dyn Fn(&[u8]) + Send>>>>;

/// Lines of ssh's standard error kept for error messages.
const TAIL_LINES: usize = 10;

/// A running `ssh HOST COMMAND`.
pub(crate) struct Session {
    child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    tail: Arc<Mutex<VecDeque<String>>>,
    pub log: LogSink,
    /// When ssh last wrote to its standard error (see [`Session::settle_log`]).
    last_stderr: Arc<Mutex<std::time::Instant>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
    /// Holds the known-hosts file with the machine's host key while ssh runs.
    _known_hosts: Option<tempfile::NamedTempFile>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session(pid {})", self.child.id())
    }
}

/// Splits `NIX_SSHOPTS` as a shell would split simple words: whitespace separates,
/// single and double quotes group.
pub(crate) fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut any = false;
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Quotes `s` for the remote shell that runs the command.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@+,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl Session {
    /// Starts `ssh` to `machine` running `command` (words) there.
    pub fn open(machine: &Machine, ssh_opts: &str, command: &[String]) -> Result<Session, Error> {
        // `user@host:port`: ssh takes the port apart, as Nix passes it.
        let full = machine.host();
        let (host, port) = match full.rsplit_once(':') {
            Some((h, p))
                if !h.contains(':') && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) =>
            {
                (h.to_string(), Some(p.to_string()))
            }
            _ => (full.to_string(), None),
        };
        let mut cmd = Command::new("ssh");
        // The limit on open files the daemon started with, not its raised one.
        kiln_sandbox::limits::restore_for(&mut cmd);
        cmd.args(split_opts(ssh_opts));
        // No forwarding; no prompts (a daemon has no terminal: a machine asking for a
        // password is refused at once); an unreachable machine is given up on in seconds,
        // and a connection that dies during a long, silent build is noticed.
        cmd.args(["-x", "-a", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]);
        cmd.args([
            "-o",
            "ServerAliveInterval=30",
            "-o",
            "ServerAliveCountMax=4",
        ]);
        if let Some(p) = &port {
            cmd.arg("-p").arg(p);
        }
        if !machine.ssh_key.is_empty() {
            cmd.arg("-i").arg(&machine.ssh_key);
        }
        let mut known_hosts = None;
        if !machine.host_key.is_empty() {
            // Only this key is accepted for the host (a machine that presents another is
            // refused: no man in the middle, and no trust-on-first-use prompt).
            let key = base64::engine::general_purpose::STANDARD
                .decode(&machine.host_key)
                .map_err(|e| Error::Machine {
                    machine: machine.uri.clone(),
                    message: format!("its host key is not base64: {e}"),
                })?;
            let key = String::from_utf8_lossy(&key).trim().to_string();
            let alias = "kiln-build-machine";
            let f = tempfile::Builder::new()
                .prefix("kiln-known-hosts")
                .tempfile()
                .map_err(|e| Error::Machine {
                    machine: machine.uri.clone(),
                    message: format!("cannot write its host key to a file: {e}"),
                })?;
            std::fs::write(f.path(), format!("{alias} {key}\n")).map_err(|e| Error::Machine {
                machine: machine.uri.clone(),
                message: format!("cannot write its host key to a file: {e}"),
            })?;
            cmd.arg("-o")
                .arg(format!("UserKnownHostsFile={}", f.path().display()))
                .args(["-o", "StrictHostKeyChecking=yes"])
                .arg("-o")
                .arg(format!("HostKeyAlias={alias}"));
            known_hosts = Some(f);
        }
        let remote: Vec<String> = command.iter().map(|w| shell_quote(w)).collect();
        // `--`: nothing after it is an option, whatever the host is called.
        cmd.arg("--").arg(&host).arg(remote.join(" "));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: cancelling the build kills ssh (and the remote ends
            // the build when the connection drops).
            .process_group(0);
        tracing::debug!("running {cmd:?}");
        let mut child = cmd.spawn().map_err(|e| Error::Machine {
            machine: machine.uri.clone(),
            message: format!("cannot run ssh: {e}"),
        })?;
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let log: LogSink = Arc::default();
        let stderr = child.stderr.take();
        let last_stderr = Arc::new(Mutex::new(std::time::Instant::now()));
        let (t2, l2, w2) = (tail.clone(), log.clone(), last_stderr.clone());
        let stderr_thread = stderr.map(|e| {
            std::thread::spawn(move || {
                let mut r = BufReader::new(e);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.by_ref().take(1 << 20).read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if let Ok(g) = l2.lock() {
                        if let Some(f) = g.as_ref() {
                            f(&line);
                        }
                    }
                    if let Ok(mut w) = w2.lock() {
                        *w = std::time::Instant::now();
                    }
                    if let Ok(mut t) = t2.lock() {
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(String::from_utf8_lossy(&line).trim_end().to_string());
                    }
                }
            })
        });
        Ok(Session {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            child,
            tail,
            log,
            last_stderr,
            stderr_thread,
            _known_hosts: known_hosts,
        })
    }

    /// Waits, up to half a second, until ssh's standard error has been quiet for 20 ms
    /// since the call: the serve protocol's build log arrives there, on another pipe than
    /// the result, so its last lines may still be on their way when the result is read
    /// (the serve protocol has no marker for the log's end; ssh-ng:// does not need this).
    pub fn settle_log(&self) {
        use std::time::{Duration, Instant};
        let start = Instant::now();
        let deadline = start + Duration::from_millis(500);
        loop {
            let last = self
                .last_stderr
                .lock()
                .map(|w| *w)
                .unwrap_or(start)
                .max(start);
            let now = Instant::now();
            if now.duration_since(last) >= Duration::from_millis(20) || now >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Ends the session and returns what ssh (or the remote program) last said on its
    /// standard error, for an error message.
    pub fn close(mut self) -> String {
        drop(self.stdin.take());
        drop(self.stdout.take());
        // Give ssh a moment to report why it stopped, then make sure it has.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
        while std::time::Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        // The whole group: a ProxyCommand or a control master holding ssh's stderr must
        // not keep the reader below waiting.
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.stderr_thread.take() {
            // Joined only once it has ended (bounded): what it read so far is in the tail.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        let tail = self.tail.lock().map(|t| t.clone()).unwrap_or_default();
        tail.into_iter()
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_sshopts_split_like_words() {
        assert_eq!(
            split_opts(" -p 2222  -o 'ProxyCommand=nc %h %p' -o\"A=b c\" \"\""),
            ["-p", "2222", "-o", "ProxyCommand=nc %h %p", "-oA=b c", ""]
        );
        assert!(split_opts("").is_empty());
    }

    #[test]
    fn remote_command_words_are_quoted() {
        assert_eq!(shell_quote("/opt/kiln/bin/kiln"), "/opt/kiln/bin/kiln");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
