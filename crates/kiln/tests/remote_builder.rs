//! kiln as a remote builder for Nix: a real `sshd` (Debian's openssh-server) on loopback
//! with keys made for the run, Nix offloading a build to it through its machines setting,
//! over `ssh://` (the serve protocol: `kiln store serve --write`) and `ssh-ng://` (the worker
//! protocol: `kiln daemon --stdio`). Nix 2.8 runs here; Nix 2.34 runs in the sid root (a
//! chroot, so that its build hook, which is Nix itself, can start). The remote's store is at
//! the same logical path as the client's but elsewhere on disk (`--root`), as on another
//! machine, and builds there in kiln's sandbox.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{nix_or_skip, nix_required, sid_root, BindMount};

struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have_sshd(test: &str) -> bool {
    let ok = Path::new("/usr/sbin/sshd").exists() && rustix::process::geteuid().is_root();
    if !ok {
        assert!(
            !nix_required(),
            "{test}: KILN_REQUIRE_NIX is set but there is no /usr/sbin/sshd (openssh-server) or this is not root"
        );
        eprintln!("{test}: skipped, needs root and openssh-server");
    }
    ok
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Writes an executable script.
fn executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `kiln store path-info PATH` on the kiln machine's store (at `store` under `root`).
fn path_info_on(root: &Path, store: &Path, path: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root)
        .arg("--store-dir")
        .arg(store)
        .args(["store", "path-info", path])
        .output()
        .unwrap()
}

/// An sshd on a free loopback port that lets the run's key log in as root.
fn sshd(dir: &Path) -> Sshd {
    std::fs::create_dir_all("/run/sshd").unwrap();
    keygen(&dir.join("hostkey"));
    keygen(&dir.join("clientkey"));
    std::fs::copy(dir.join("clientkey.pub"), dir.join("authorized_keys")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             PidFile {d}/sshd.pid\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .arg("-D")
        .arg("-f")
        .arg(&config)
        .arg("-E")
        .arg(dir.join("sshd.log"))
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "sshd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Sshd {
        child,
        port,
        key: dir.join("clientkey"),
    }
}

/// The programs the machines' entries run on the remote: kiln on the remote's store, in
/// its sandbox (the store's files are not at its logical path there).
fn remote_programs(dir: &Path, remote_root: &Path, store: &Path) -> (PathBuf, PathBuf) {
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let common = format!(
        "{kiln} --root {} --store-dir {} --option sandbox true --option sandbox-paths '/bin /usr /lib /lib64?'",
        remote_root.display(),
        store.display()
    );
    let serve = dir.join("remote-serve");
    executable(
        &serve,
        &format!(
            "#!/bin/sh\n# Run as 'remote-serve --serve --write' for ssh:// stores.\n\
             w=; for a in \"$@\"; do [ \"$a\" = --write ] && w=--write; done\n\
             exec {common} store serve $w\n"
        ),
    );
    let stdio = dir.join("remote-daemon");
    executable(
        &stdio,
        &format!("#!/bin/sh\n# Run as 'remote-daemon --stdio' for ssh-ng:// stores.\nexec {common} daemon --stdio\n"),
    );
    (serve, stdio)
}

const DRV: &str = r#"derivation {
  name = "offloaded-TAG";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo TAG built remotely > $out; echo a line from the TAG builder" ];
}"#;

fn nix_conf(dir: &Path) -> PathBuf {
    let conf = dir.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("nix.conf"),
        "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command\n",
    )
    .unwrap();
    conf
}

/// Checks one offloaded build: the client has the output, the remote (kiln) built and
/// holds it, the builder's output reached the client's terminal.
fn check(out: &std::process::Output, tag: &str, remote_root: &Path, kiln_store: &Path) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{tag}: {stdout}\n{stderr}");
    let path = stdout.trim();
    assert!(path.ends_with(&format!("-offloaded-{tag}")), "{stdout}");
    assert!(
        stderr.contains(&format!("a line from the {tag} builder")),
        "{stderr}"
    );
    let base = Path::new(path).file_name().unwrap();
    let remote_copy = remote_root
        .join(kiln_store.strip_prefix("/").unwrap())
        .join(base);
    assert_eq!(
        std::fs::read_to_string(&remote_copy).unwrap(),
        format!("{tag} built remotely\n")
    );
    // Registered in the remote's database, not only on its disk.
    let st = path_info_on(remote_root, kiln_store, path);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// A client's machine and a kiln machine reached through sshd, in one temporary directory:
/// the client's store at `store`, kiln's at the same logical path on disk under `remote`.
struct Machines {
    dir: tempfile::TempDir,
    sshd: Sshd,
    store: PathBuf,
    remote_root: PathBuf,
    conf: PathBuf,
    serve: PathBuf,
    stdio: PathBuf,
}

impl Machines {
    fn new(prefix: &str) -> Machines {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let sshd = sshd(&d);
        let store = d.join("store");
        let remote_root = d.join("remote");
        let (serve, stdio) = remote_programs(&d, &remote_root, &store);
        let conf = nix_conf(&d);
        Machines {
            dir,
            sshd,
            store,
            remote_root,
            conf,
            serve,
            stdio,
        }
    }

    fn sshopts(&self) -> String {
        format!(
            "-p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            self.sshd.port
        )
    }

    /// Builds one derivation per transport (`ssh://` to `kiln store serve`, `ssh-ng://` to
    /// `kiln daemon --stdio`) with `run(file, builders)`, and checks each was built by kiln.
    fn offload_both(&self, suffix: &str, run: impl Fn(&Path, &str) -> std::process::Output) {
        for (transport, program) in [("ssh", &self.serve), ("ssh-ng", &self.stdio)] {
            let tag = format!("{transport}{suffix}");
            let file = self.dir.path().join(format!("{tag}.nix"));
            std::fs::write(&file, DRV.replace("TAG", &tag)).unwrap();
            let builders = format!(
                "{transport}://root@127.0.0.1?remote-program={} x86_64-linux {} 1",
                program.display(),
                self.sshd.key.display()
            );
            let out = run(&file, &builders);
            check(&out, &tag, &self.remote_root, &self.store);
        }
    }
}

#[test]
fn nix_2_8_offloads_to_kiln_over_ssh_and_ssh_ng() {
    if !nix_or_skip("nix_2_8_offloads_to_kiln_over_ssh_and_ssh_ng")
        || !have_sshd("nix_2_8_offloads_to_kiln_over_ssh_and_ssh_ng")
    {
        return;
    }
    let m = Machines::new("kiln-remote-");
    let d = m.dir.path();
    m.offload_both("", |file, builders| {
        Command::new("nix-build")
            .arg(file)
            .args(["--no-out-link", "--max-jobs", "0", "--builders", builders])
            .env("NIX_STORE_DIR", &m.store)
            .env("NIX_STATE_DIR", d.join("state"))
            .env("NIX_LOG_DIR", d.join("log"))
            .env("NIX_CONF_DIR", &m.conf)
            .env("NIX_REMOTE", "local")
            .env("NIX_SSHOPTS", m.sshopts())
            .env_remove("NIX_PATH")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
}

#[test]
fn nix_2_34_offloads_to_kiln_over_ssh_and_ssh_ng() {
    let test = "nix_2_34_offloads_to_kiln_over_ssh_and_ssh_ng";
    if !have_sshd(test) {
        return;
    }
    let root = sid_root();
    if !root.join("usr/bin/nix-build").exists() || !root.join("usr/bin/ssh").exists() {
        assert!(
            !nix_required(),
            "{test}: KILN_REQUIRE_NIX is set but the sid root lacks Nix 2.34 or ssh"
        );
        eprintln!("{test}: skipped, no sid root with Nix 2.34 and ssh");
        return;
    }
    // Nix 2.34 runs in the root (its build hook is Nix itself, which must be able to start
    // again); the directory is seen there at the same path, so the client's store is this
    // directory's `store` and kiln's stays on disk under `remote`.
    let m = Machines::new("kiln-remote-234-");
    let d = m.dir.path();
    let mount = BindMount::new(&root, d);
    m.offload_both("-234", |file, builders| {
        Command::new("chroot")
            .arg(&root)
            .arg("env")
            .arg(format!("NIX_STORE_DIR={}", m.store.display()))
            .arg(format!("NIX_STATE_DIR={}", d.join("state").display()))
            .arg(format!("NIX_LOG_DIR={}", d.join("log").display()))
            .arg(format!("NIX_CONF_DIR={}", m.conf.display()))
            .arg("NIX_REMOTE=local")
            .arg(format!("HOME={}", d.display()))
            .arg(format!("NIX_SSHOPTS={}", m.sshopts()))
            .arg("nix-build")
            .arg(file)
            .args(["--no-out-link", "--max-jobs", "0", "--builders", builders])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
    drop(mount);
}

// ---- kiln offloading to build machines ------------------------------------------------

/// A derivation built on a machine whose input was built here (`preferLocalBuild`) and a
/// source: kiln must copy both there, build, and copy the output back.
const DRV_WITH_INPUTS: &str = r#"let
  dep = derivation {
    name = "dep-TAG";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    preferLocalBuild = true;
    args = [ "-c" "echo dep of TAG > $out" ];
  };
  src = builtins.toFile "src-TAG" "a source of TAG";
in derivation {
  name = "offloaded-TAG";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "/bin/cat ${dep} ${src} > $out; echo; echo a line from the TAG builder" ];
}"#;

/// Programs that run Nix as a build machine: in its own mount namespace, with its own
/// store (under `dir/NAME`) mounted at the shared logical store path, as on another
/// machine. `bin` holds Nix's programs (none: Nix 2.8 from `PATH`). Returns `(serve, stdio,
/// the machine's directory)` as for kiln.
fn nix_machine_programs(
    dir: &Path,
    store: &Path,
    name: &str,
    bin: Option<&Path>,
) -> (PathBuf, PathBuf, PathBuf) {
    let m = dir.join(name);
    for sub in ["store", "state", "log", "conf"] {
        std::fs::create_dir_all(m.join(sub)).unwrap();
    }
    // No build hook on the machine (it would offload again, and Nix 2.34's hook is Nix
    // itself, which cannot start again through the sid root's loader).
    std::fs::write(
        m.join("conf/nix.conf"),
        "substituters =\nsandbox = false\nbuild-users-group =\nbuild-hook =\n",
    )
    .unwrap();
    let mut out = Vec::new();
    for (suffix, prog) in [("serve", "nix-store"), ("daemon", "nix-daemon")] {
        let prog = match bin {
            Some(b) => b.join(prog).display().to_string(),
            None => prog.to_string(),
        };
        let p = dir.join(format!("{name}-{suffix}"));
        executable(
            &p,
            &format!(
                "#!/bin/sh\nexec unshare -m --propagation private sh -c 'mount --bind {m}/store {store} && \
                 exec env NIX_STORE_DIR={store} NIX_STATE_DIR={m}/state NIX_LOG_DIR={m}/log \
                 NIX_CONF_DIR={m}/conf NIX_REMOTE=local HOME={m} {prog} \"$@\"' {prog} \"$@\"\n",
                m = m.display(),
                store = store.display(),
            ),
        );
        out.push(p);
    }
    (out[0].clone(), out[1].clone(), m)
}

impl Machines {
    /// The machines-file entry for a program reached through this run's sshd, with its
    /// identity file and the host key (so ssh accepts that key and no other).
    fn entry(&self, transport: &str, program: &Path, host: &str, jobs: u32, speed: u32) -> String {
        use base64::Engine as _;
        let pubkey = std::fs::read_to_string(self.dir.path().join("hostkey.pub")).unwrap();
        let key = base64::engine::general_purpose::STANDARD.encode(pubkey.trim());
        format!(
            "{transport}://root@{host}?remote-program={} x86_64-linux {} {jobs} {speed} - - {key}",
            program.display(),
            self.sshd.key.display()
        )
    }

    /// A kiln daemon on the client's store whose builds go to `builders` (`max-jobs` here
    /// as given), with `NIX_SSHOPTS` giving sshd's port only.
    fn kiln_daemon(&self, builders: &str, max_jobs: u32) -> kiln_testkit::DaemonProcess {
        self.kiln_daemon_with(builders, max_jobs, "")
    }

    /// [`Machines::kiln_daemon`] with more `nix.conf` lines.
    fn kiln_daemon_with(
        &self,
        builders: &str,
        max_jobs: u32,
        more: &str,
    ) -> kiln_testkit::DaemonProcess {
        let d = self.dir.path();
        let conf = d.join("kiln-local.conf");
        std::fs::write(
            &conf,
            format!(
                "substituters =\nsandbox = false\nbuild-users-group =\nmax-jobs = {max_jobs}\nbuilders = {builders}\n{more}"
            ),
        )
        .unwrap();
        let socket = d.join("kiln.sock");
        let _ = std::fs::remove_file(&socket);
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--store-dir")
            .arg(&self.store)
            .arg("--state-dir")
            .arg(d.join("state"))
            .arg("--log-dir")
            .arg(d.join("log"))
            .arg("--nix-conf")
            .arg(&conf)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .env("NIX_SSHOPTS", format!("-p {}", self.sshd.port))
            .env("KILN_LOG", "info,kiln_remote=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("kiln-daemon.log")).unwrap());
        kiln_testkit::DaemonProcess::start(c, socket)
    }

    /// `nix-store ARGS` (Nix 2.8) on the client's store, read directly (no daemon needed).
    fn nix_store(&self, args: &[&str]) -> String {
        let d = self.dir.path();
        let out = Command::new("nix-store")
            .args(args)
            .env("NIX_REMOTE", "local")
            .env("NIX_STORE_DIR", &self.store)
            .env("NIX_STATE_DIR", d.join("state"))
            .env("NIX_LOG_DIR", d.join("log"))
            .env("NIX_CONF_DIR", &self.conf)
            .output()
            .unwrap();
        assert!(out.status.success(), "nix-store {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// `nix-build` (Nix 2.8) of `DRV_WITH_INPUTS` tagged `tag` through `daemon`, with
    /// `args`.
    fn nix_build(
        &self,
        daemon: &kiln_testkit::DaemonProcess,
        tag: &str,
        args: &[&str],
    ) -> std::process::Output {
        let file = self.dir.path().join(format!("{tag}.nix"));
        std::fs::write(&file, DRV_WITH_INPUTS.replace("TAG", tag)).unwrap();
        self.client(daemon, "nix-build")
            .arg(&file)
            .arg("--no-out-link")
            .args(args)
            .output()
            .unwrap()
    }

    /// A Nix 2.8 `program` of the client's machine, talking to `daemon`.
    fn client(&self, daemon: &kiln_testkit::DaemonProcess, program: &str) -> Command {
        let d = self.dir.path();
        let mut c = Command::new(program);
        c.env("NIX_REMOTE", format!("unix://{}", daemon.socket.display()))
            .env("NIX_STORE_DIR", &self.store)
            .env("NIX_STATE_DIR", d.join("state"))
            .env("NIX_LOG_DIR", d.join("log"))
            .env("NIX_CONF_DIR", &self.conf)
            .env_remove("NIX_PATH")
            .stdin(Stdio::null());
        c
    }
}

/// The client's side of an offloaded build: it succeeded, its output is here with the
/// contents only its inputs give, and its log and the machine reached the client.
fn check_offloaded(out: &std::process::Output, tag: &str, machine: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{tag}: {stdout}\n{stderr}");
    let path = stdout.trim().to_string();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("dep of {tag}\na source of {tag}"),
        "{tag}"
    );
    assert!(
        stderr.contains(&format!("a line from the {tag} builder")),
        "{tag}: the build log did not reach the client:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("on '{machine}")),
        "{tag}: the client was not told where it built:\n{stderr}"
    );
    path
}

#[test]
fn kiln_offloads_to_kiln_and_nix_machines_over_ssh_and_ssh_ng() {
    let test = "kiln_offloads_to_kiln_and_nix_machines_over_ssh_and_ssh_ng";
    if !nix_or_skip(test) || !have_sshd(test) || !Path::new("/usr/bin/unshare").exists() {
        return;
    }
    let m = Machines::new("kiln-offload-");
    let d = m.dir.path().to_path_buf();
    let (nix_serve, nix_stdio, nix_machine) =
        nix_machine_programs(&d, &m.store, "nix-machine", None);
    let kiln_path_info = |path: &str| {
        path_info_on(&m.remote_root, &m.store, path)
            .status
            .success()
    };
    for (transport, program, far) in [
        ("ssh-ng", &m.stdio, "kiln"),
        ("ssh", &m.serve, "kiln"),
        ("ssh-ng", &nix_stdio, "nix"),
        ("ssh", &nix_serve, "nix"),
    ] {
        let tag = format!("{far}-{transport}");
        let entry = m.entry(transport, program, "127.0.0.1", 2, 1);
        // max-jobs 0: everything builds on the machine, but `preferLocalBuild` here. Once
        // the machine is the (trusted) client's own `--builders` and its `--max-jobs 0`.
        let out = if far == "nix" && transport == "ssh-ng" {
            let daemon = m.kiln_daemon("", 1);
            m.nix_build(&daemon, &tag, &["--builders", &entry, "--max-jobs", "0"])
        } else {
            let daemon = m.kiln_daemon(&entry, 0);
            m.nix_build(&daemon, &tag, &[])
        };
        let path = check_offloaded(&out, &tag, &format!("{transport}://root@127.0.0.1"));
        // The machine's build log is kept here too.
        let drv = m.nix_store(&["-q", "--deriver", &path]);
        let log = m.nix_store(&["-l", drv.trim()]);
        assert!(
            log.contains(&format!("a line from the {tag} builder")),
            "{tag}: log {log:?}"
        );
        let base = Path::new(&path).file_name().unwrap();
        match far {
            "kiln" => assert!(
                kiln_path_info(&path),
                "{tag}: not registered on the kiln machine"
            ),
            _ => {
                let on_machine = nix_machine.join("store").join(base);
                assert!(on_machine.exists(), "{tag}: not built on the Nix machine");
            }
        }
    }
}

#[test]
fn an_unreachable_machine_is_skipped_for_the_next() {
    let test = "an_unreachable_machine_is_skipped_for_the_next";
    if !nix_or_skip(test) || !have_sshd(test) {
        return;
    }
    let m = Machines::new("kiln-offload-fault-");
    // sshd listens on 127.0.0.1 only: 127.0.0.2 refuses. It is the faster machine, so it
    // is tried first.
    let dead = m.entry("ssh-ng", &m.stdio, "127.0.0.2", 1, 10);
    let good = m.entry("ssh-ng", &m.stdio, "127.0.0.1", 1, 1);
    let daemon = m.kiln_daemon(&format!("{dead} ; {good}"), 0);
    let out = m.nix_build(&daemon, "fault", &[]);
    check_offloaded(&out, "fault", "ssh-ng://root@127.0.0.1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot build") && stderr.contains("ssh-ng://root@127.0.0.2"),
        "no warning naming the unreachable machine:\n{stderr}"
    );
    drop(daemon);
    // A machine that presents another host key than its entry's is refused by ssh.
    let other = m.dir.path().join("otherkey");
    keygen(&other);
    use base64::Engine as _;
    let wrong = base64::engine::general_purpose::STANDARD.encode(
        std::fs::read_to_string(other.with_extension("pub"))
            .unwrap()
            .trim(),
    );
    let good_key = good.rsplit(' ').next().unwrap().to_string();
    let impostor = good
        .replace(&good_key, &wrong)
        .replace("?remote-program", "/?remote-program");
    let daemon = m.kiln_daemon(
        &format!("{} ; {good}", impostor.replace(" 1 1 ", " 1 10 ")),
        0,
    );
    let out = m.nix_build(&daemon, "hostkey", &[]);
    check_offloaded(&out, "hostkey", "ssh-ng://root@127.0.0.1?");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Host key verification failed"),
        "no warning about the host key:\n{stderr}"
    );
}

/// Lines of sshd's log saying a client logged in.
fn logins(m: &Machines) -> usize {
    std::fs::read_to_string(m.dir.path().join("sshd.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Accepted publickey"))
        .count()
}

#[test]
fn one_ssh_session_serves_successive_builds() {
    let test = "one_ssh_session_serves_successive_builds";
    if !nix_or_skip(test) || !have_sshd(test) {
        return;
    }
    let m = Machines::new("kiln-offload-kept-");
    for transport in ["ssh-ng", "ssh"] {
        let program = if transport == "ssh" {
            &m.serve
        } else {
            &m.stdio
        };
        let daemon = m.kiln_daemon(&m.entry(transport, program, "127.0.0.1", 1, 1), 0);
        let before = logins(&m);
        let mut built = Vec::new();
        for n in 0..3 {
            let tag = format!("kept-{transport}-{n}");
            let out = m.nix_build(&daemon, &tag, &[]);
            built.push(check_offloaded(&out, &tag, &format!("{transport}://")));
        }
        assert_eq!(
            logins(&m) - before,
            1,
            "{transport}: one login for three builds"
        );
        // Its clients gone, the daemon holds no root for what it copied back: the outputs
        // can be deleted while it runs (it kept every one until it restarted). A client's
        // own roots go when the daemon has seen it leave, a moment after it exits.
        let mut tries = 0;
        let out = loop {
            let out = m
                .client(&daemon, "nix-store")
                .arg("--delete")
                .args(&built)
                .output()
                .unwrap();
            tries += 1;
            if out.status.success() || tries == 50 {
                break out;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert!(
            out.status.success(),
            "{transport}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for p in &built {
            assert!(!Path::new(p).exists(), "{transport}: {p} is still there");
        }
    }
}

/// A machines entry for the lying machine (`tests/fixtures/remote/lying-machine.py MODE`,
/// the serve protocol with a twist) reached through this run's sshd.
fn lying_entry(m: &Machines, mode: &str, speed: u32) -> String {
    let program = kiln_testkit::fixture("remote/lying-machine.py");
    // `remote-program` is words: the script and its mode.
    let e = m.entry("ssh", &program, "127.0.0.1", 1, speed);
    e.replacen(
        &program.display().to_string(),
        &format!("{}%20{mode}", program.display()),
        1,
    )
}

#[test]
fn a_machine_that_lies_or_dies_is_left_out_and_its_output_never_registered() {
    let test = "a_machine_that_lies_or_dies_is_left_out_and_its_output_never_registered";
    if !nix_or_skip(test) || !have_sshd(test) {
        return;
    }
    let m = Machines::new("kiln-offload-liar-");
    let good = m.entry("ssh-ng", &m.stdio, "127.0.0.1", 1, 1);
    for (mode, said) in [("hash", "hash mismatch"), ("die", "dies mid-build")] {
        // The liar is faster: tried first.
        let liar = lying_entry(&m, mode, 10);
        let daemon = m.kiln_daemon(&format!("{liar} ; {good}"), 0);
        let tag = format!("liar-{mode}");
        let out = m.nix_build(&daemon, &tag, &[]);
        // The good machine's output, not the liar's.
        check_offloaded(&out, &tag, "ssh-ng://root@127.0.0.1");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cannot build")
                && stderr.contains(said)
                && stderr.contains("lying-machine.py"),
            "{mode}: no warning naming the machine and what it did:\n{stderr}"
        );
    }
    // The liar alone: the build fails, and the path it sent is not valid here.
    let daemon = m.kiln_daemon(&lying_entry(&m, "hash", 1), 0);
    let out = m.nix_build(&daemon, "liar-alone", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("hash mismatch"), "{stderr}");
    assert!(
        stderr.contains("No build machine can build it either")
            && stderr.contains("failed this build"),
        "{stderr}"
    );
    let names: Vec<String> = std::fs::read_dir(&m.store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-offloaded-liar-alone"))
        .collect();
    assert!(names.is_empty(), "the liar's output is on disk: {names:?}");
    let drv = std::fs::read_dir(&m.store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-offloaded-liar-alone.drv"))
        .unwrap();
    let q = m
        .client(&daemon, "nix-store")
        .args(["-q", "--outputs"])
        .arg(&drv)
        .output()
        .unwrap();
    let output = String::from_utf8_lossy(&q.stdout).trim().to_string();
    assert!(output.ends_with("-offloaded-liar-alone"), "{q:?}");
    let valid = m
        .client(&daemon, "nix-store")
        .arg("--check-validity")
        .arg(&output)
        .output()
        .unwrap();
    assert!(!valid.status.success(), "the liar's output is valid here");
}

#[test]
fn kiln_offloads_to_nix_2_34_machines_over_ssh_and_ssh_ng() {
    let test = "kiln_offloads_to_nix_2_34_machines_over_ssh_and_ssh_ng";
    if !nix_or_skip(test) || !have_sshd(test) || !Path::new("/usr/bin/unshare").exists() {
        return;
    }
    let Some(sid) = kiln_testkit::SidNix::or_skip(test) else {
        return;
    };
    let m = Machines::new("kiln-offload-234-");
    let d = m.dir.path().to_path_buf();
    let bin = sid.bin_dir(&d.join("sid-bin"));
    let (serve, stdio, machine) = nix_machine_programs(&d, &m.store, "nix234-machine", Some(&bin));
    for (transport, program) in [("ssh-ng", &stdio), ("ssh", &serve)] {
        let tag = format!("nix234-{transport}");
        let daemon = m.kiln_daemon(&m.entry(transport, program, "127.0.0.1", 2, 1), 0);
        let out = m.nix_build(&daemon, &tag, &[]);
        let path = check_offloaded(&out, &tag, &format!("{transport}://root@127.0.0.1"));
        let base = Path::new(&path).file_name().unwrap();
        assert!(
            machine.join("store").join(base).exists(),
            "{tag}: not built on the Nix 2.34 machine"
        );
    }
}

#[test]
fn an_output_referring_beyond_its_inputs_and_outputs_is_refused() {
    let test = "an_output_referring_beyond_its_inputs_and_outputs_is_refused";
    if !nix_or_skip(test) || !have_sshd(test) {
        return;
    }
    let m = Machines::new("kiln-offload-refs-");
    // A machine whose output refers to a path this store lacks (and offers to send it, with
    // a hash of its own saying): that path would arrive unchecked, so nothing is taken.
    let daemon = m.kiln_daemon(&lying_entry(&m, "refs", 1), 0);
    let out = m.nix_build(&daemon, "refs", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("which is neither an input nor an output of"),
        "{stderr}"
    );
    let extra = m.store.join("00000000000000000000000000000000-extra-dep");
    assert!(!extra.exists());
    let built: Vec<String> = std::fs::read_dir(&m.store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-offloaded-refs"))
        .collect();
    assert!(built.is_empty(), "{built:?}");
}

#[test]
fn an_untrusted_connection_builds_from_drv_files() {
    let test = "an_untrusted_connection_builds_from_drv_files";
    if !nix_or_skip(test) || !have_sshd(test) || !Path::new("/usr/bin/setpriv").exists() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let m = Machines::new("kiln-offload-untrusted-");
    let d = m.dir.path();
    // The machine's daemon serves a socket; its ssh-ng program reaches it as nobody, whom
    // it does not trust (as `nix-daemon --stdio` forwarding to a system daemon does for an
    // ordinary user).
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = d.join("machine.sock");
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--root")
        .arg(&m.remote_root)
        .arg("--store-dir")
        .arg(&m.store)
        .args(["--option", "sandbox", "true"])
        .args(["--option", "sandbox-paths", "/bin /usr /lib /lib64?"])
        .args(["--option", "build-users-group", ""])
        .args(["daemon", "--socket"])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let machine = kiln_testkit::DaemonProcess::start(c, sock.clone());
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let proxy = d.join("as-nobody");
    executable(
        &proxy,
        &format!(
            "#!/bin/sh\n# Run as 'as-nobody --stdio'.\nexec setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 {} {}\n",
            kiln_testkit::fixture("remote/socket-proxy.py").display(),
            sock.display()
        ),
    );
    let daemon = m.kiln_daemon(&m.entry("ssh-ng", &proxy, "127.0.0.1", 1, 1), 0);
    // Only content-addressed inputs (a source): an untrusted client may add those.
    let file = d.join("untrusted.nix");
    std::fs::write(
        &file,
        r#"derivation {
  name = "offloaded-untrusted";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "/bin/cat ${builtins.toFile "src-untrusted" "a source"} > $out; echo a line from the untrusted builder" ];
}"#,
    )
    .unwrap();
    let out = m
        .client(&daemon, "nix-build")
        .arg(&file)
        .arg("--no-out-link")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("a line from the untrusted builder"),
        "{stderr}"
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "a source");
    // Built there from its .drv file, which the machine now has.
    let drv = m.nix_store(&["-q", "--deriver", &path]);
    let on_machine = |p: &str| path_info_on(&m.remote_root, &m.store, p).status.success();
    assert!(
        on_machine(drv.trim()),
        "the .drv was not sent to the machine"
    );
    assert!(on_machine(&path), "not built on the machine");
    drop(machine);
}

#[test]
fn with_builders_use_substitutes_the_machine_substitutes_inputs_itself() {
    let test = "with_builders_use_substitutes_the_machine_substitutes_inputs_itself";
    if !nix_or_skip(test) || !have_sshd(test) {
        return;
    }
    let m = Machines::new("kiln-offload-subst-");
    let d = m.dir.path();
    // The machine's daemon substitutes from a file:// cache (unsigned paths accepted).
    let cache = d.join("cache");
    let program = d.join("remote-daemon-subst");
    let wrapper = std::fs::read_to_string(&m.stdio).unwrap().replace(
        " daemon --stdio",
        &format!(
            " --option substituters file://{} --option require-sigs false daemon --stdio",
            cache.display()
        ),
    );
    executable(&program, &wrapper);
    let daemon = m.kiln_daemon_with(
        &m.entry("ssh-ng", &program, "127.0.0.1", 1, 1),
        0,
        "builders-use-substitutes = true\n",
    );
    // An input here that the cache has too.
    std::fs::write(d.join("input.txt"), "an input from the cache\n").unwrap();
    let add = m
        .client(&daemon, "nix-store")
        .arg("--add")
        .arg(d.join("input.txt"))
        .output()
        .unwrap();
    assert!(add.status.success(), "{add:?}");
    let input = String::from_utf8(add.stdout).unwrap().trim().to_string();
    let copy = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--store-dir")
        .arg(&m.store)
        .arg("--state-dir")
        .arg(d.join("state"))
        .args(["copy", "--to"])
        .arg(format!("file://{}", cache.display()))
        .arg(&input)
        .output()
        .unwrap();
    assert!(copy.status.success(), "{copy:?}");
    let file = d.join("subst.nix");
    std::fs::write(
        &file,
        format!(
            r#"derivation {{
  name = "offloaded-subst";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "/bin/cat ${{builtins.storePath "{input}"}} > $out" ];
}}"#
        ),
    )
    .unwrap();
    let out = m
        .client(&daemon, "nix-build")
        .arg(&file)
        .arg("--no-out-link")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "an input from the cache\n"
    );
    drop(daemon);
    // kiln sent none of the input closure: the machine had it from the cache.
    let log = std::fs::read_to_string(d.join("kiln-daemon.log")).unwrap();
    assert!(log.contains("sent 0 of 1 paths"), "{log}");
}

#[test]
fn post_build_hook_runs_for_builds_done_elsewhere() {
    let test = "post_build_hook_runs_for_builds_done_elsewhere";
    if !nix_or_skip(test) || !have_sshd(test) {
        return;
    }
    let m = Machines::new("kiln-offload-hook-");
    let d = m.dir.path();
    let hook = d.join("post-hook");
    let seen = d.join("hook-saw");
    executable(
        &hook,
        &format!(
            "#!/bin/sh\necho \"$DRV_PATH $OUT_PATHS\" >> {}\necho the hook ran\n",
            seen.display()
        ),
    );
    let daemon = m.kiln_daemon_with(
        &m.entry("ssh-ng", &m.stdio, "127.0.0.1", 1, 1),
        0,
        &format!("post-build-hook = {}\n", hook.display()),
    );
    let out = m.nix_build(&daemon, "hooked", &[]);
    let path = check_offloaded(&out, "hooked", "ssh-ng://root@127.0.0.1");
    let saw = std::fs::read_to_string(&seen).unwrap();
    // Once for the dependency built here, once for the derivation built on the machine.
    let remote_line = saw
        .lines()
        .find(|l| l.ends_with(&path))
        .unwrap_or_else(|| panic!("the hook did not see {path}: {saw}"));
    assert!(remote_line
        .split(' ')
        .next()
        .unwrap()
        .ends_with("-offloaded-hooked.drv"));
    assert_eq!(saw.lines().count(), 2, "{saw}");
}
