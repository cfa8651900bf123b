//! Recursive Nix through `kiln daemon`, with the sandbox on: a builder that runs Nix 2.8's
//! own `nix` against the socket kiln gives it, as root and as an ordinary user (rootless:
//! the sandbox made of user namespaces only). Inside, it may see its inputs and what it
//! adds or builds — which must appear in its sandbox, read-only — and nothing else; its
//! output may refer to all of that.

#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{nix_or_skip, NixEnv};

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

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` as `user` (uid, gid) when given.
fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid).env("HOME", "/");
    }
    cmd
}

fn start_daemon(env: &NixEnv, socket: &Path, user: Option<(u32, u32)>) -> Daemon {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--store-dir")
        .arg(env.store_dir())
        .arg("--state-dir")
        .arg(env.state_dir())
        .arg("--log-dir")
        .arg(env.log_dir())
        .arg("--nix-conf")
        .arg(env.dir.path().join("conf/nix.conf"))
        .arg("daemon")
        .arg("--socket")
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child = as_user(&mut c, user).spawn().unwrap();
    let start = Instant::now();
    while !socket.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the daemon exited early: {st}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no daemon socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Daemon(child)
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

fn run(user: Option<(u32, u32)>) {
    let env = NixEnv::new();
    let base = env.dir.path().to_path_buf();
    std::fs::write(
        base.join("conf/nix.conf"),
        "substituters =\nsandbox = true\nsandbox-fallback = false\nbuild-users-group =\n\
         max-jobs = 1\nsandbox-paths = /bin /usr /lib /lib64\n\
         experimental-features = nix-command recursive-nix\n",
    )
    .unwrap();
    std::fs::write(base.join("recursive.nix"), EXPR).unwrap();
    std::fs::write(base.join("secret"), "not for the build").unwrap();
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
    let _d = start_daemon(&env, &socket, user);
    let unreachable = ok(
        &client(&env, &socket, user, "nix-store")
            .arg("--add")
            .arg(base.join("secret"))
            .output()
            .unwrap(),
        "nix-store --add",
    );
    let out = client(&env, &socket, user, "nix-build")
        .arg("--no-out-link")
        // A deadlock (the nested build waiting for the slot the outer one holds) fails
        // the build instead of hanging the test.
        .args(["--option", "timeout", "120"])
        .arg(base.join("recursive.nix"))
        .env("UNREACHABLE", unreachable.trim())
        .output()
        .unwrap();
    let out_path = ok(&out, "nix-build of the recursive derivation");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("recursive-ok"), "{log}");
    let out_path = out_path.trim();
    assert!(out_path.ends_with("-recursive"), "{out_path}");
    // The output's closure holds what the build added and built through its socket.
    let closure = ok(
        &client(&env, &socket, user, "nix-store")
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
        &client(&env, &socket, user, "nix-store")
            .args(["--verify", "--check-contents"])
            .output()
            .unwrap(),
        "nix-store --verify --check-contents",
    );
}

#[test]
fn a_sandboxed_recursive_build_sees_only_its_closure_and_what_it_made() {
    if !nix_or_skip("a_sandboxed_recursive_build_sees_only_its_closure_and_what_it_made") {
        return;
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping: the rootful case needs root");
        return;
    }
    run(None);
}

/// The same as an ordinary user: the daemon, its store and its clients are that user's.
#[test]
fn a_rootless_daemon_serves_sandboxed_recursive_builds() {
    if !nix_or_skip("a_rootless_daemon_serves_sandboxed_recursive_builds") {
        return;
    }
    let user = if rustix::process::geteuid().is_root() {
        Some(test_user())
    } else {
        None
    };
    run(user);
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
