//! The sandbox through `kiln daemon`, as root and as an ordinary user (rootless: a
//! sandbox made of user namespaces only, the daemon, its store and its clients all that
//! user's), driven by Nix 2.8's clients:
//! * recursive Nix: a builder runs Nix's own `nix` against the socket kiln gives it.
//!   Inside, it may see its inputs and what it adds or builds — which must appear in its
//!   sandbox, read-only — and nothing else; its output may refer to all of that;
//! * escapes tried by a rootless daemon's builder (network, the daemon user's files,
//!   undeclared store paths, writes outside, host processes, setuid files, the hostname,
//!   a process left behind), each shown to work without the sandbox.

#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_testkit::{nix_or_skip, DaemonProcess, NixEnv};

/// What the outer builder does; every step that must fail is checked to fail.
const EXPR: &str = r#"
derivation {
  name = "recursive";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  requiredSystemFeatures = [ "recursive-nix" ];
  PATH = "/usr/bin:/bin";
  dummy = builtins.toFile "dummy" "bla bla";
  # A string without context: the path is valid, but not in the build's closure.
  unreachable = builtins.getEnv "UNREACHABLE";
  args = [ "-c" ''
    set -e
    refuse() { if "$@"; then echo "unexpectedly succeeded: $*"; exit 1; fi; }
    opts="--experimental-features nix-command"
    mkdir $out
    nix $opts path-info $dummy
    nix $opts build $dummy
    test -n "$unreachable"
    refuse nix $opts path-info $unreachable
    refuse nix $opts build $unreachable
    refuse test -e $unreachable
    echo foobar > foobar
    foobar=$(nix $opts store add-path ./foobar)
    test "$(cat $foobar)" = foobar
    refuse sh -c "echo tampered >> $foobar"
    refuse chmod u+w $foobar
    mkdir d
    echo inside > d/f
    dir=$(nix $opts store add-path ./d)
    test "$(cat $dir/f)" = inside
    refuse touch $dir/new
    refuse chmod u+w $dir
    ln -s $foobar $out/foobar
    ln -s $dir $out/dir
    nix $opts build --impure -o inner --expr '
      derivation {
        name = "inner";
        system = builtins.currentSystem;
        builder = "/bin/sh";
        args = [ "-c" "echo $fnord blaat > $out" ];
        fnord = builtins.toFile "fnord" "fnord";
      }'
    inner=$(nix $opts path-info ./inner)
    grep -q blaat $inner
    ln -s $inner $out/inner
    test $(nix $opts path-info --all | wc -l) -ge 6
    echo recursive-ok
  '' ];
}
"#;

/// Runs `cmd` as `user` (uid, gid) when given.
fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid).env("HOME", "/");
    }
    cmd
}

fn start_daemon(env: &NixEnv, socket: &Path, user: Option<(u32, u32)>) -> DaemonProcess {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(env.kiln_args())
        .arg("--nix-conf")
        .arg(env.nix_conf())
        .arg("daemon")
        .arg("--socket")
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    as_user(&mut c, user);
    DaemonProcess::start(c, socket.to_path_buf())
}

fn client(env: &NixEnv, socket: &Path, user: Option<(u32, u32)>, program: &str) -> Command {
    let mut c = env.cmd(program);
    c.env("NIX_REMOTE", format!("unix://{}", socket.display()));
    as_user(&mut c, user);
    c
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A store, its daemon and its clients, all `user`'s when given.
struct Setup {
    env: NixEnv,
    socket: PathBuf,
    user: Option<(u32, u32)>,
    daemon: DaemonProcess,
}

impl Setup {
    /// A daemon (as `user`, if given) on a fresh store; the rootless user is trusted, as a
    /// per-user daemon's user must be listed in `trusted-users` (nix-daemon's rule).
    fn new(user: Option<(u32, u32)>, files: &[(&str, &str)]) -> Setup {
        let env = NixEnv::new();
        let base = env.dir.path().to_path_buf();
        std::fs::write(
            base.join("conf/nix.conf"),
            "substituters =\nsandbox = true\nsandbox-fallback = false\nbuild-users-group =\n\
             max-jobs = 1\nsandbox-paths = /bin /usr /lib /lib64\n\
             experimental-features = nix-command recursive-nix\n\
             trusted-users = root kilnrootless\n",
        )
        .unwrap();
        for (name, text) in files {
            std::fs::write(base.join(name), text).unwrap();
        }
        if let Some((uid, gid)) = user {
            let st = Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(&base)
                .status()
                .unwrap();
            assert!(st.success());
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut init = env.cmd("nix-store");
        ok(
            &as_user(&mut init, user).arg("--init").output().unwrap(),
            "nix-store --init",
        );
        let socket = base.join("kiln.sock");
        let daemon = start_daemon(&env, &socket, user);
        Setup {
            env,
            socket,
            user,
            daemon,
        }
    }

    fn base(&self) -> &Path {
        self.env.dir.path()
    }

    /// The contents of the store file `path` (as a client printed it).
    fn read(&self, path: &str) -> String {
        let name = Path::new(path.trim()).file_name().unwrap();
        std::fs::read_to_string(self.env.store_dir().join(name)).unwrap()
    }

    fn client(&self, program: &str) -> Command {
        client(&self.env, &self.socket, self.user, program)
    }

    /// `nix-store --add FILE` (of a file in the base directory).
    fn add(&self, file: &str) -> String {
        ok(
            &self
                .client("nix-store")
                .arg("--add")
                .arg(self.base().join(file))
                .output()
                .unwrap(),
            "nix-store --add",
        )
        .trim()
        .to_string()
    }
}

fn run(user: Option<(u32, u32)>) {
    let t = Setup::new(
        user,
        &[("recursive.nix", EXPR), ("secret", "not for the build")],
    );
    let (env, base) = (&t.env, t.base());
    let unreachable = t.add("secret");
    let out = t
        .client("nix-build")
        .arg("--no-out-link")
        // A deadlock (the nested build waiting for the slot the outer one holds) fails
        // the build instead of hanging the test.
        .args(["--option", "timeout", "120"])
        .arg(base.join("recursive.nix"))
        .env("UNREACHABLE", &unreachable)
        .output()
        .unwrap();
    let out_path = ok(&out, "nix-build of the recursive derivation");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("recursive-ok"), "{log}");
    let out_path = out_path.trim();
    assert!(out_path.ends_with("-recursive"), "{out_path}");
    // The output's closure holds what the build added and built through its socket.
    let closure = ok(
        &t.client("nix-store")
            .args(["-qR", out_path])
            .output()
            .unwrap(),
        "nix-store -qR",
    );
    for name in ["-foobar", "-d", "-inner", "-fnord"] {
        assert!(
            closure.lines().any(|l| l.ends_with(name)),
            "{name} not in the closure:\n{closure}"
        );
    }
    assert!(!closure.contains("-secret"), "{closure}");
    // Nothing the builder was given could be changed through its sandbox.
    let real = |link: &str| PathBuf::from(out_path).join(link).canonicalize().unwrap();
    let physical = |p: PathBuf| {
        env.store_dir()
            .join(p.file_name().unwrap())
            .to_string_lossy()
            .into_owned()
    };
    assert_eq!(
        std::fs::read_to_string(physical(real("foobar"))).unwrap(),
        "foobar\n"
    );
    assert!(!Path::new(&physical(real("dir"))).join("new").exists());
    ok(
        &t.client("nix-store")
            .args(["--verify", "--check-contents"])
            .output()
            .unwrap(),
        "nix-store --verify --check-contents",
    );
}

#[test]
fn a_sandboxed_recursive_build_sees_only_its_closure_and_what_it_made() {
    if !nix_and_root_or_skip("a_sandboxed_recursive_build_sees_only_its_closure_and_what_it_made") {
        return;
    }
    run(None);
}

/// Whether `test`, which needs Nix 2.8 and root, can run here (if not, it says why).
fn nix_and_root_or_skip(test: &str) -> bool {
    if !nix_or_skip(test) {
        return false;
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping {test}: needs root");
        return false;
    }
    true
}

/// The same as an ordinary user: the daemon, its store and its clients are that user's.
#[test]
fn a_rootless_daemon_serves_sandboxed_recursive_builds() {
    if !nix_or_skip("a_rootless_daemon_serves_sandboxed_recursive_builds") {
        return;
    }
    let user = rootless_user();
    run(user);
}

/// The user rootless tests run as: an ordinary one created for them when we are root, else
/// ourselves (`None`).
fn rootless_user() -> Option<(u32, u32)> {
    rustix::process::geteuid().is_root().then(test_user)
}

/// An ordinary user for rootless tests, created if missing.
fn test_user() -> (u32, u32) {
    let name = "kilnrootless";
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, name])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    if id("-u").is_none() {
        let st = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/bin/sh", name])
            .status()
            .unwrap();
        assert!(st.success() || id("-u").is_some(), "useradd {name} failed");
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

/// A builder trying to escape; it writes one line per attempt to `$out`:
/// `NAME escaped` or `NAME blocked`. `mode` only tells its two builds apart.
const ESCAPES: &str = r#"
{ mode }:
derivation {
  name = "escape-${mode}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  secret = builtins.getEnv "SECRET";
  unreachable = builtins.getEnv "UNREACHABLE";
  port = builtins.getEnv "PORT";
  daemonPid = builtins.getEnv "DAEMON_PID";
  marker = builtins.getEnv "MARKER";
  args = [ "-c" ''
    try() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "$name escaped"; else echo "$name blocked"; fi; }
    {
      try network python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 3)"
      try daemon-user-file cat $secret
      try undeclared-path cat $unreachable
      try write-outside sh -c "echo planted > $(dirname $secret)/planted"
      try host-process test -e /proc/$daemonPid/cmdline
      touch f
      try setuid chmod u+s f
    } > $out
    try hostname hostname kiln-escaped
    # A process of its own session, left running (once it has detached).
    setsid python3 -c 'import sys, time; open(sys.argv[1], "w").close(); time.sleep(600)' \
      started $marker > /dev/null 2>&1 < /dev/null &
    while ! test -e started; do sleep 0.01; done
  '' ];
}
"#;

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(marker) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_rootless_daemons_builds_cannot_escape_the_sandbox() {
    if !nix_or_skip("a_rootless_daemons_builds_cannot_escape_the_sandbox") {
        return;
    }
    let user = rootless_user();
    let t = Setup::new(
        user,
        &[("escapes.nix", ESCAPES), ("shared", "any store path")],
    );
    // The daemon user's private file outside the store.
    let private = t.base().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::write(private.join("secret"), "the daemon user's").unwrap();
    if let Some((uid, gid)) = user {
        for p in [&private, &private.join("secret")] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let unreachable = t.add("shared");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let build = |mode: &str, sandbox: &str| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let marker = format!("kiln-escape-{}-{mode}", std::process::id());
        let out = t
            .client("nix-build")
            .arg("--no-out-link")
            .args(["--option", "sandbox", sandbox])
            // Outside the sandbox the filter still refuses setuid bits (as Nix's
            // `filter-syscalls` does): the run without it shows the attempts work.
            .args(["--option", "filter-syscalls", sandbox])
            .args(["--argstr", "mode", mode])
            .arg(t.base().join("escapes.nix"))
            .env("SECRET", private.join("secret"))
            .env("UNREACHABLE", &unreachable)
            .env("PORT", listener.local_addr().unwrap().port().to_string())
            .env("DAEMON_PID", t.daemon.child.id().to_string())
            .env("MARKER", &marker)
            .output()
            .unwrap();
        let out = ok(&out, "nix-build of the escapes");
        let report = t.read(&out);
        let connected = listener.accept().is_ok();
        let left = processes_with(&marker);
        for pid in &left {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        (report, connected, !left.is_empty())
    };
    let attempts = [
        "network",
        "daemon-user-file",
        "undeclared-path",
        "write-outside",
        "host-process",
        "setuid",
    ];
    // Without the sandbox every attempt works: the test can tell.
    let (report, connected, left) = build("unsandboxed", "false");
    for a in attempts {
        assert!(report.contains(&format!("{a} escaped")), "{a}:\n{report}");
    }
    assert!(
        connected && left,
        "connected {connected}, left {left}: {report}"
    );
    assert!(private.join("planted").exists());
    std::fs::remove_file(private.join("planted")).unwrap();
    let (report, connected, left) = build("sandboxed", "true");
    for a in attempts {
        assert!(report.contains(&format!("{a} blocked")), "{a}:\n{report}");
    }
    assert!(
        !connected,
        "the sandboxed build reached the host's loopback"
    );
    assert!(!left, "a process of the sandboxed build survived it");
    assert!(!private.join("planted").exists());
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        hostname
    );
}

/// A recursive builder speaking the protocol itself (no Nix client would send such
/// requests): a derivation named `name` whose Python `body` runs after the helpers below
/// (`u64`, `string`, `r64`, `rstring`, `stderr` — the last returns an error's message or
/// `None`), with its socket `s` connected; what it prints is its output.
fn recursive_client(name: &str, body: &str) -> String {
    const EXPR: &str = r#"
derivation {
  name = "@NAME@";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  requiredSystemFeatures = [ "recursive-nix" ];
  PATH = "/usr/bin:/bin";
  drvText = builtins.getEnv "DRV_TEXT";
  script = ''
import os, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["NIX_REMOTE"][len("unix://"):])
def u64(n): s.sendall(struct.pack("<Q", n))
def string(b):
    u64(len(b)); s.sendall(b + b"\0" * (-len(b) % 8))
def read(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: sys.exit("closed")
        b += c
    return b
def r64(): return struct.unpack("<Q", read(8))[0]
def rstring():
    n = r64(); b = read(n); read(-n % 8); return b
def stderr():
    while True:
        t = r64()
        if t == 0x616c7473: return None
        if t == 0x6f6c6d67: rstring(); continue
        if t == 0x63787470:
            rstring(); r64(); rstring(); msg = rstring(); r64()
            for _ in range(r64()): r64(); rstring()
            return msg
        sys.exit("unexpected stderr message %x" % t)
@BODY@
'';
  args = [ "-c" "python3 -c \"$script\" > $out" ];
}
"#;
    EXPR.replace("@NAME@", name).replace("@BODY@", body)
}

/// It adds a `.drv` claiming no references although it has an input derivation the build
/// cannot see, then asks for it to be built, which would bring that derivation's outputs
/// into the build's closure. It must be refused.
const SNEAKY: &str = r#"u64(0x6e697863); assert r64() == 0x6478696f; r64()
u64(0x122); u64(0); u64(0); rstring(); stderr()
u64(8); string(b"f.drv"); string(os.environ["drvText"].encode()); u64(0)
err = stderr()
if err: sys.exit("adding failed: " + err.decode())
path = rstring().decode()
u64(9); u64(1); string((path + "!out").encode()); u64(0)
err = stderr()
print("build:", err.decode() if err else "accepted")"#;

/// It adds a derivation (allowed: the build made it) and asks for the outputs of the
/// derivation that derivation's output is (`drv!out!out`): what a made `.drv` names as its
/// inputs is known only once made, past every check of the build's closure. It must be
/// refused.
const DYNAMIC: &str = r#"u64(0x6e697863); assert r64() == 0x6478696f; r64()
u64(0x122); u64(0); u64(0); rstring(); stderr()
u64(8); string(b"p.drv"); string(os.environ["drvText"].encode()); u64(0)
err = stderr()
if err: sys.exit("adding failed: " + err.decode())
path = rstring().decode()
u64(9); u64(1); string((path + "!out!out").encode()); u64(0)
err = stderr()
print("build:", err.decode() if err else "accepted")"#;

/// It negotiates 1.38 with the `queryActiveBuilds` feature and asks what other builds run
/// (`QueryActiveBuilds`, `nix ps`): their derivations, users and arguments would leak
/// between builds that the sandbox keeps apart. It must be refused.
const PEEK: &str = r#"u64(0x6e697863); assert r64() == 0x6478696f; r64()
u64(0x126)
u64(1); string(b"queryActiveBuilds")
for _ in range(r64()): rstring()
u64(0); u64(0); rstring(); r64(); stderr()
u64(48)
err = stderr()
print("ps:", err.decode() if err else "answered " + rstring().decode())"#;

#[test]
fn a_recursive_build_cannot_list_other_builds() {
    if !nix_and_root_or_skip("a_recursive_build_cannot_list_other_builds") {
        return;
    }
    let peek = recursive_client("peek", PEEK);
    let t = Setup::new(None, &[("peek.nix", &peek)]);
    let out = t
        .client("nix-build")
        .arg("--no-out-link")
        .arg(t.base().join("peek.nix"))
        .output()
        .unwrap();
    let out = ok(&out, "nix-build of the peeking derivation");
    let report = t.read(&out);
    assert_eq!(
        report.trim(),
        "ps: operation 'QueryActiveBuilds' is not supported in recursive Nix",
        "{report}"
    );
}

#[test]
fn a_recursive_build_cannot_reach_inputs_a_derivation_hides() {
    if !nix_and_root_or_skip("a_recursive_build_cannot_reach_inputs_a_derivation_hides") {
        return;
    }
    let inner = r#"
      let x = derivation { name = "x"; system = builtins.currentSystem; builder = "/bin/sh";
                           args = [ "-c" "echo x > $out" ]; };
      in derivation { name = "f"; system = builtins.currentSystem; builder = "/bin/sh";
                      inherit x; args = [ "-c" "cat $x > $out" ]; outputHashMode = "flat";
                      outputHashAlgo = "sha256";
                      outputHash = "73cb3858a687a8494ca3323053016282f3dad39d42cf62ca4e79dda2aac7d9ac"; }
    "#;
    // The inner derivation, instantiated outside: its input x.drv is valid in the store
    // but not in the sneaky build's closure.
    let report = recursive_report("sneaky", SNEAKY, inner, |text| {
        assert!(text.contains("-x.drv"), "{text}")
    });
    assert!(
        report.contains("build: cannot build") && report.contains("-x.drv' is unknown"),
        "{report}"
    );
}

#[test]
fn a_recursive_build_cannot_build_what_derivations_make() {
    if !nix_and_root_or_skip("a_recursive_build_cannot_build_what_derivations_make") {
        return;
    }
    let producer = r#"
      derivation { name = "p"; system = builtins.currentSystem; builder = "/bin/sh";
                   args = [ "-c" "echo > $out" ]; }
    "#;
    let report = recursive_report("dynamic", DYNAMIC, producer, |_| {});
    assert!(
        report.contains("build: cannot build '")
            && report.contains("-p.drv!out!out' in recursive Nix: the outputs of derivations that derivations make cannot be built there"),
        "{report}"
    );
}

/// Builds a recursive-Nix client derivation running `script` (`recursive_client`), given the
/// `.drv` text of `inner` (a Nix expression instantiated outside, checked by `check`) in
/// `DRV_TEXT`; what the client reported.
fn recursive_report(name: &str, script: &str, inner: &str, check: impl Fn(&str)) -> String {
    let client = recursive_client(name, script);
    let file = format!("{name}.nix");
    let t = Setup::new(None, &[(file.as_str(), &client), ("inner.nix", inner)]);
    let drv = ok(
        &t.client("nix-instantiate")
            .arg(t.base().join("inner.nix"))
            .output()
            .unwrap(),
        "nix-instantiate",
    );
    let text = t.read(&drv);
    check(&text);
    let out = t
        .client("nix-build")
        .arg("--no-out-link")
        .arg(t.base().join(&file))
        .env("DRV_TEXT", &text)
        .output()
        .unwrap();
    let out = ok(&out, &format!("nix-build of the {name} derivation"));
    t.read(&out)
}
