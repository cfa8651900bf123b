//! Helpers shared by kiln's tests: where fixtures live, golden-file comparison, and access
//! to the real Nix 2.8 (Debian's `nix-bin`) as an oracle when it is installed.
//!
//! Golden files are compared byte for byte; run a test with `KILN_ACCEPT=1` to rewrite them
//! (the diff is then reviewed like code).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

pub mod volatile_disk;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root exists")
}

/// `tests/fixtures/<rel>` in the workspace.
pub fn fixture(rel: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(rel)
}

/// Reads a fixture file, panicking with its path if it is missing.
pub fn read_fixture(rel: &str) -> Vec<u8> {
    let p = fixture(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", p.display()))
}

/// Compares `actual` with the golden file `tests/fixtures/<rel>`; with `KILN_ACCEPT=1`
/// writes it instead.
pub fn assert_golden(rel: &str, actual: &[u8]) {
    let p = fixture(rel);
    if std::env::var_os("KILN_ACCEPT").is_some() {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).expect("create fixture dir");
        }
        std::fs::write(&p, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "missing golden file {} ({e}); run with KILN_ACCEPT=1",
            p.display()
        )
    });
    if expected != actual {
        panic!(
            "golden mismatch for {}:\n--- expected\n{}\n--- actual\n{}",
            p.display(),
            String::from_utf8_lossy(&expected),
            String::from_utf8_lossy(actual)
        );
    }
}

/// Whether Nix 2.8's command-line tools are on PATH.
pub fn have_nix() -> bool {
    Command::new("nix-store")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether tests that need Nix must fail (rather than skip) when it is absent: set in CI.
pub fn nix_required() -> bool {
    std::env::var_os("KILN_REQUIRE_NIX").is_some()
}

/// Returns true if a Nix-dependent test should run; prints why it skips otherwise, and
/// panics when Nix is required but missing.
pub fn nix_or_skip(test: &str) -> bool {
    if have_nix() {
        return true;
    }
    if nix_required() {
        panic!("{test}: KILN_REQUIRE_NIX is set but nix-store is not installed");
    }
    eprintln!("{test}: skipped, Nix 2.8 (nix-bin) is not installed");
    false
}

/// Removes a test's tree, store paths (read-only) included.
pub fn remove_tree(path: &Path) {
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(path)
        .status();
    let _ = std::fs::remove_dir_all(path);
}

/// Runs `cmd`; its standard output, trimmed. Panics with its standard error if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().expect("start the command");
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Whether a test that needs root and `tools` (programs that answer `--version` or `-V`)
/// can run here; it skips with a message otherwise, and fails instead when
/// `KILN_REQUIRE_NIX` is set (CI has them).
pub fn root_with_or_skip(test: &str, tools: &[&str]) -> bool {
    let have = |t: &str| {
        Command::new(t).arg("--version").output().is_ok()
            || Command::new(t).arg("-V").output().is_ok()
    };
    let euid = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    });
    let ok = euid.is_ok_and(|u| u == 0) && tools.iter().all(|t| have(t));
    if !ok {
        assert!(
            !nix_required(),
            "{test}: KILN_REQUIRE_NIX is set, but this is not root or lacks {tools:?}"
        );
        eprintln!("{test}: skipped, needs root and {tools:?}");
    }
    ok
}

/// A child process (a server of a test) killed and reaped when dropped, passed or not.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A daemon process (kiln's or Nix's) serving a Unix socket; killed when dropped.
#[derive(Debug)]
pub struct DaemonProcess {
    pub child: Child,
    pub socket: PathBuf,
}

impl DaemonProcess {
    /// Starts `cmd` and waits for `socket` to appear (at most 30 s; panics if the process
    /// exits first).
    pub fn start(mut cmd: Command, socket: PathBuf) -> DaemonProcess {
        let child = cmd.spawn().expect("start the daemon");
        let mut d = DaemonProcess { child, socket };
        let start = std::time::Instant::now();
        let mut delay = std::time::Duration::from_millis(2);
        while !d.socket.exists() {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("the daemon exited early: {st}");
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "no daemon socket at {}",
                d.socket.display()
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(std::time::Duration::from_millis(100));
        }
        d
    }

    /// [`DaemonProcess::start`] for a daemon that creates its socket before it listens on
    /// it (nix-daemon binds, then listens): also waits until a connection is accepted, so
    /// that the test's first client is not refused. kiln's daemon is started with `start`
    /// alone, because its socket appears only once it listens and the tests hold it to that.
    pub fn start_then_connect(cmd: Command, socket: PathBuf) -> DaemonProcess {
        let mut d = DaemonProcess::start(cmd, socket);
        let start = std::time::Instant::now();
        while let Err(e) = kiln_format::unix_socket::connect(&d.socket) {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("the daemon exited early: {st}");
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "the daemon at {} accepts no connection: {e}",
                d.socket.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        d
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The steps of a scenario script's output (`=== command` headings, each followed by what
/// it printed): (heading, body) pairs.
pub fn scenario_steps(out: &str) -> Vec<(String, String)> {
    out.split("=== ")
        .filter(|x| !x.is_empty())
        .map(|x| {
            let (head, body) = x.split_once('\n').unwrap_or((x, ""));
            (head.to_string(), body.to_string())
        })
        .collect()
}

/// A temporary directory no directory above which is writable by everyone, under
/// `/var/lib/kiln-tests` (made 0755): builds that run as build users are refused in
/// `/tmp`, by nix-daemon 2.34 and by kiln alike.
pub fn tempdir_outside_tmp() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let base = Path::new("/var/lib/kiln-tests");
    std::fs::create_dir_all(base).expect("make /var/lib/kiln-tests");
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755))
        .expect("set the mode of /var/lib/kiln-tests");
    tempfile::Builder::new()
        .prefix("t")
        .tempdir_in(base)
        .expect("a temporary directory in /var/lib/kiln-tests")
}

/// Where the Debian sid root with today's Nix and Guix is (whether or not it exists):
/// `$KILN_SID_ROOT`, default `/var/tmp/sid-root` (`.ci/sid-root.sh` makes it).
pub fn sid_root() -> PathBuf {
    std::env::var_os("KILN_SID_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/sid-root"))
}

/// `dir` bind-mounted into `root` at the same path, for as long as this lives (a chroot's
/// programs then see the test's files where the test sees them).
#[derive(Debug)]
pub struct BindMount(PathBuf);

impl BindMount {
    pub fn new(root: &Path, dir: &Path) -> BindMount {
        let target = root.join(dir.strip_prefix("/").expect("an absolute directory"));
        std::fs::create_dir_all(&target).expect("create the mount point");
        let st = Command::new("mount")
            .arg("--bind")
            .arg(dir)
            .arg(&target)
            .status()
            .expect("run mount");
        assert!(st.success(), "bind-mounting {}", dir.display());
        BindMount(target)
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        unmount(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Unmounts `target`, waiting up to 10 s for processes that still use it to go, then
/// detaching it lazily: a test must not leave mounts behind in a shared root.
pub fn unmount(target: &Path) {
    for _ in 0..100 {
        let out = Command::new("umount")
            .arg(target)
            .env("LC_ALL", "C")
            .output();
        match out {
            Ok(o) if o.status.success() => return,
            Ok(o) if String::from_utf8_lossy(&o.stderr).contains("busy") => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            _ => return,
        }
    }
    let _ = Command::new("umount").arg("-l").arg(target).status();
}

/// The live processes below `pid` (children, their children, …), from `/proc`.
fn descendants(pid: u32) -> Vec<u32> {
    // (pid, ppid) of every process that is not a zombie.
    let table: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let p: u32 = e.file_name().to_str()?.parse().ok()?;
                    let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                    // pid (comm) state ppid …: the fields after the last ')'.
                    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
                    let state = rest.next()?;
                    let ppid = rest.next()?.parse().ok()?;
                    (state != "Z").then_some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(parent) = todo.pop() {
        for (p, pp) in &table {
            if *pp == parent && !out.contains(p) {
                out.push(*p);
                todo.push(*p);
            }
        }
    }
    out
}

/// Kills `pid` and every process below it (a daemon with the workers and helpers it forked,
/// whatever sessions or groups they made) and waits until none is left running, at most
/// 10 s. Their ids are read while the parent still lives, so nothing of another tree is
/// signalled.
pub fn kill_tree_and_wait(pid: u32) {
    let mut all = descendants(pid);
    all.push(pid);
    let alive = |p: &u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| {
                let state = s.rsplit_once(')')?.1.split_whitespace().next()?.to_string();
                Some(state != "Z")
            })
            .unwrap_or(false)
    };
    for _ in 0..200 {
        let left: Vec<String> = all
            .iter()
            .filter(|p| alive(p))
            .map(u32::to_string)
            .collect();
        if left.is_empty() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&left)
            .stderr(std::process::Stdio::null())
            .status();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Today's Nix (2.34.8 from Debian sid) in the root `../shared/tools/sid-root.sh` makes:
/// `$KILN_SID_ROOT`, default `/var/tmp/sid-root`. Its programs run on this machine through
/// the root's own loader and libraries, so they see this machine's file system (stores,
/// sockets and temporary directories at the same paths as kiln's) without a chroot.
#[derive(Debug, Clone)]
pub struct SidNix {
    pub root: PathBuf,
}

impl SidNix {
    /// The root, if it holds Nix.
    pub fn find() -> Option<SidNix> {
        let root = sid_root();
        (root.join("usr/bin/nix").exists() && root.join("lib64/ld-linux-x86-64.so.2").exists())
            .then_some(SidNix { root })
    }

    /// The root, or why a test needing it skips (a failure when `KILN_REQUIRE_NIX` is set:
    /// CI makes the root).
    pub fn or_skip(test: &str) -> Option<SidNix> {
        if let Some(s) = SidNix::find() {
            return Some(s);
        }
        if nix_required() {
            panic!("{test}: KILN_REQUIRE_NIX is set but there is no sid root with Nix 2.34 (../shared/tools/sid-root.sh)");
        }
        eprintln!("{test}: skipped, no sid root with Nix 2.34 (../shared/tools/sid-root.sh)");
        None
    }

    /// `program` (`nix`, `nix-build`, `nix-daemon`, …) of the root, run here.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(self.root.join("lib64/ld-linux-x86-64.so.2"));
        c.arg("--library-path")
            .arg(self.library_path())
            .arg("--argv0")
            .arg(program)
            .arg(self.root.join("usr/bin").join(program));
        c
    }

    fn library_path(&self) -> String {
        format!(
            "{}:{}",
            self.root.join("usr/lib/x86_64-linux-gnu").display(),
            self.root.join("lib/x86_64-linux-gnu").display()
        )
    }

    /// A directory of wrappers named like Nix's programs that run the root's, to put first
    /// on `PATH` for scripts.
    pub fn bin_dir(&self, dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("nix-2.34-bin");
        std::fs::create_dir_all(&bin).expect("create the wrapper directory");
        for p in [
            "nix",
            "nix-build",
            "nix-store",
            "nix-instantiate",
            "nix-collect-garbage",
            "nix-daemon",
            "nix-env",
            "nix-hash",
            "nix-shell",
            "nix-copy-closure",
        ] {
            let w = bin.join(p);
            std::fs::write(
                &w,
                format!(
                    "#!/bin/sh
exec {} --library-path {} --argv0 {p} {} \"$@\"\n",
                    self.root.join("lib64/ld-linux-x86-64.so.2").display(),
                    self.library_path(),
                    self.root.join("usr/bin").join(p).display()
                ),
            )
            .expect("write a wrapper");
            std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755))
                .expect("make a wrapper executable");
        }
        bin
    }
}

/// A throw-away Nix store rooted in a temporary directory: `NIX_STORE_DIR`, `NIX_STATE_DIR`,
/// `NIX_LOG_DIR` and `NIX_CONF_DIR` under it, no substituters, sandbox off.
#[derive(Debug)]
pub struct NixEnv {
    pub dir: tempfile::TempDir,
}

impl NixEnv {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-nix-")
            .tempdir()
            .expect("tempdir");
        Self::in_dir(dir)
    }

    /// A fresh environment at exactly `path` (removed first if it exists), e.g. to build
    /// the same derivations in two stores at the same path one after the other.
    pub fn at(path: &Path) -> Self {
        if path.exists() {
            remove_tree(path);
        }
        let parent = path.parent().expect("a parent directory");
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a UTF-8 directory name");
        let t = tempfile::Builder::new()
            .prefix(name)
            .rand_bytes(0)
            .tempdir_in(parent)
            .expect("create the environment directory");
        assert_eq!(t.path(), path);
        Self::in_dir(t)
    }

    /// An environment in a given (empty) directory, e.g. to recreate a store at the same
    /// path after wiping it.
    pub fn in_dir(dir: tempfile::TempDir) -> Self {
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(&conf).expect("mkdir conf");
        std::fs::write(
            conf.join("nix.conf"),
            "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command\n",
        )
        .expect("write nix.conf");
        NixEnv { dir }
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("log")
    }
    /// Its `nix.conf`.
    pub fn nix_conf(&self) -> PathBuf {
        self.dir.path().join("conf/nix.conf")
    }

    /// `kiln`'s global options for this environment's store, state and log directories.
    pub fn kiln_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--store-dir".into(),
            self.store_dir().into(),
            "--state-dir".into(),
            self.state_dir().into(),
            "--log-dir".into(),
            self.log_dir().into(),
        ]
    }

    /// `kiln daemon` (the binary `kiln`) on this environment's store, settings from its
    /// `nix.conf`, serving `socket`.
    pub fn kiln_daemon(&self, kiln: &str, socket: PathBuf) -> DaemonProcess {
        self.kiln_daemon_with::<&str>(kiln, socket, &[], &[])
    }

    /// [`NixEnv::kiln_daemon`] with more global arguments (`--option NAME VALUE`…) and
    /// more arguments of `daemon` (`--metrics ADDR`…).
    pub fn kiln_daemon_with<S: AsRef<std::ffi::OsStr>>(
        &self,
        kiln: &str,
        socket: PathBuf,
        global: &[S],
        daemon: &[S],
    ) -> DaemonProcess {
        let mut c = Command::new(kiln);
        c.args(self.kiln_args())
            .arg("--nix-conf")
            .arg(self.nix_conf())
            .args(global)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .args(daemon)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        DaemonProcess::start(c, socket)
    }

    /// A command with the environment pointing at this store.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_STORE_DIR", self.store_dir())
            .env("NIX_STATE_DIR", self.state_dir())
            .env("NIX_LOG_DIR", self.log_dir())
            .env("NIX_CONF_DIR", self.dir.path().join("conf"))
            .env("NIX_REMOTE", "local")
            .env_remove("NIX_PATH");
        c
    }

    /// Runs a command and returns its stdout, panicking with stderr on failure.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.cmd(program).args(args).output().expect("spawn nix");
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }
}

impl Default for NixEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl NixEnv {
    /// Builds `attr` of a Nix file with `nix-build` (no `result` link) and returns the
    /// output paths it printed.
    pub fn build(&self, file: &Path, attr: &str) -> Vec<String> {
        self.run(
            "nix-build",
            &[
                "--no-out-link",
                file.to_str().expect("utf-8 path"),
                "-A",
                attr,
            ],
        )
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// Lines of a command's output.
    pub fn lines(&self, program: &str, args: &[&str]) -> Vec<String> {
        self.run(program, args)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// One step of a recorded protocol session: what the client sent, what the daemon said.
#[derive(Debug, Clone)]
pub struct TranscriptStep {
    pub label: String,
    pub client: Vec<u8>,
    pub daemon: Vec<u8>,
}

/// A session recorded from the real Nix 2.8 daemon by
/// `tests/fixtures/protocol/generate.py`.
#[derive(Debug, Clone)]
pub struct Transcript {
    pub client_version: u64,
    pub store_dir: String,
    pub steps: Vec<TranscriptStep>,
}

impl Transcript {
    /// Loads `tests/fixtures/protocol/<name>.json`.
    pub fn load(name: &str) -> Transcript {
        let v: serde_json::Value =
            serde_json::from_slice(&read_fixture(&format!("protocol/{name}.json")))
                .expect("transcript is JSON");
        let hex = |s: &serde_json::Value| -> Vec<u8> {
            let s = s.as_str().expect("hex string");
            (0..s.len() / 2)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
                .collect()
        };
        Transcript {
            client_version: v["client_version"].as_u64().expect("client_version"),
            store_dir: v["store_dir"].as_str().expect("store_dir").to_string(),
            steps: v["steps"]
                .as_array()
                .expect("steps")
                .iter()
                .map(|s| TranscriptStep {
                    label: s["step"].as_str().expect("step").to_string(),
                    client: hex(&s["client"]),
                    daemon: hex(&s["daemon"]),
                })
                .collect(),
        }
    }

    /// The step with this label.
    pub fn step(&self, label: &str) -> &TranscriptStep {
        self.steps
            .iter()
            .find(|s| s.label == label)
            .unwrap_or_else(|| panic!("no step '{label}' in the transcript"))
    }
}

/// Whether process `pid` holds the socket listening on loopback `port` (from
/// `/proc/net/tcp` and the process's descriptors), not some other process.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local address "0100007F:PORT" (hex), state 0A = LISTEN, inode in column 9.
            let local_port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            (local_port == port && *f.get(3)? == "0A").then(|| f.get(9).map(|s| s.to_string()))?
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten().any(|e| {
                std::fs::read_link(e.path())
                    .map(|t| {
                        let t = t.to_string_lossy();
                        inodes.iter().any(|i| t == format!("socket:[{i}]"))
                    })
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

/// A server started by `start` on a free loopback port, once it listens there: (the
/// server, its port). The port is found by binding port 0 and letting it go, so another
/// process may take it before the server binds: then the server exits (or never holds
/// the listening socket) and another port is tried, up to 10 times.
pub fn serve_on_free_port(mut start: impl FnMut(u16) -> Child) -> (Child, u16) {
    for _ in 0..10 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind a free port")
            .local_addr()
            .expect("its address")
            .port();
        let mut child = start(port);
        let started = std::time::Instant::now();
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if listens_on(child.id(), port) {
                return (child, port);
            }
            if started.elapsed() > std::time::Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    panic!("no server could be started on a free port in 10 tries");
}
