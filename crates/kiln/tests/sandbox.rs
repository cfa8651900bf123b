//! The attack suite: each test is a real builder trying to escape the sandbox, built with
//! `kiln build`, and assertions that it failed. Where the attack is one the sandbox alone
//! stops, the same builder is also run without the sandbox (or as a fixed-output build) to
//! show the attempt itself works, so a passing test means the sandbox stopped it.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct T {
    dir: tempfile::TempDir,
    /// Run kiln as this user (a rootless daemon), not as the test's.
    user: Option<(u32, u32)>,
}

/// Host tools are visible read-only so builders can be shell and Python scripts.
const TOOLS: &str = "/bin /usr /lib /lib64?";
const SH: &str = "builder = \"/bin/sh\"\nenv = { PATH = \"/bin:/usr/bin\" }\n";
/// sha256 of "hello\n".
const HELLO: &str = "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=";

impl T {
    fn new() -> Self {
        T {
            dir: tempfile::tempdir().unwrap(),
            user: None,
        }
    }
    /// For builds as build users, which are refused under a world-writable `/tmp`.
    fn outside_tmp() -> Self {
        T {
            dir: kiln_testkit::tempdir_outside_tmp(),
            user: None,
        }
    }
    /// kiln run as the ordinary user `(uid, gid)`, with a store of that user's.
    fn rootless(uid: u32, gid: u32) -> Self {
        let t = T {
            dir: tempfile::tempdir().unwrap(),
            user: Some((uid, gid)),
        };
        std::os::unix::fs::chown(t.p(), Some(uid), Some(gid)).unwrap();
        t
    }
    fn p(&self) -> &Path {
        self.dir.path()
    }
    fn kiln(&self, sandbox: bool) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
        }
        c.arg("--store-dir")
            .arg(self.p().join("store"))
            .arg("--state-dir")
            .arg(self.p().join("var"))
            .arg("--log-dir")
            .arg(self.p().join("log"))
            .args(["--option", "gc-runtime-roots", "false"])
            .args([
                "--option",
                "sandbox",
                if sandbox { "true" } else { "false" },
            ])
            .current_dir(self.p())
            .args(["--option", "sandbox-fallback", "false"])
            .args(["--option", "sandbox-paths", TOOLS])
            .env_remove("KILN_CONFIG");
        c
    }
    fn build(&self, name: &str, text: &str, sandbox: bool, extra: &[&str]) -> Output {
        let f = self.p().join(name);
        std::fs::write(&f, text).unwrap();
        let mut c = self.kiln(sandbox);
        // No `result` roots: tests delete what they built.
        c.arg("build").arg("--no-out-link").arg(&f).args(extra);
        c.output().unwrap()
    }
    /// The build log of `path`'s deriver.
    fn log(&self, path: &Path) -> String {
        let o = self.kiln(false).arg("log").arg(path).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn out_path(&self, o: &Output, name: &str) -> PathBuf {
        let s = String::from_utf8_lossy(&o.stdout);
        let line = s
            .lines()
            .find(|l| l.ends_with(&format!("-{name}")))
            .unwrap_or_else(|| panic!("no output for {name}: {s}\n{}", stderr(o)));
        PathBuf::from(line)
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn drv(name: &str, script: &str) -> String {
    let script = script.replace('\\', "\\\\").replace('"', "\\\"");
    format!("[derivations.{name}]\n{SH}args = [\"-c\", \"{script}\"]\n")
}

/// A builder that tries a TCP connection to `address:port` and prints whether it worked.
fn tcp_probe(address: &str, port: u16) -> String {
    format!(
        "python3 -c 'import socket; socket.create_connection((\"{address}\", {port}), 3); \
         print(\"connected\")' || echo blocked"
    )
}

/// Whether `listener` (non-blocking) has a connection waiting, taking it.
fn accepted(listener: &std::net::TcpListener) -> bool {
    listener.accept().is_ok()
}

#[test]
fn network_is_private_except_for_fixed_output_builds() {
    let t = T::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    // Neither the host's loopback nor the address under which slirp4netns offers it.
    let probes = format!(
        "({}; {})",
        tcp_probe("127.0.0.1", port),
        tcp_probe("10.0.2.2", port)
    );
    let o = t.build(
        "a.toml",
        &drv("net", &format!("{probes} > $out 2>/dev/null")),
        true,
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let seen = std::fs::read_to_string(t.out_path(&o, "net")).unwrap();
    assert_eq!(seen, "blocked\nblocked\n");
    assert!(!accepted(&listener), "a sandboxed build reached the host");
    // A fixed-output build reaches the host: in its namespace when told to share it...
    let fetch = |name: &str, address: &str, options: &[&str]| {
        t.build(
            &format!("{name}.toml"),
            &format!(
                "{}output-hash = \"{HELLO}\"\n",
                drv(
                    name,
                    &format!("({}) >&2; echo hello > $out", tcp_probe(address, port))
                )
            ),
            true,
            options,
        )
    };
    let o = fetch(
        "host",
        "127.0.0.1",
        &["--option", "fixed-output-network", "host"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(accepted(&listener), "{}", stderr(&o));
    // ...and through slirp4netns, whose gateway is the host's loopback...
    let slirp = ["--option", "fixed-output-network", "slirp4netns"];
    let o = fetch("slirp", "10.0.2.2", &slirp);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(accepted(&listener), "{}", stderr(&o));
    // ...unless the host's loopback is isolated.
    let o = fetch(
        "isolated",
        "10.0.2.2",
        &[
            slirp[0],
            slirp[1],
            slirp[2],
            "--option",
            "isolate-host-loopback",
            "true",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("blocked"), "{}", stderr(&o));
    assert!(!accepted(&listener), "{}", stderr(&o));
}

/// CVE-2025-46416: in the host's network namespace a fixed-output build shares the host's
/// abstract Unix sockets; Landlock keeps it from connecting out, but a process outside can
/// still connect *in* to a socket the build listens on and be handed descriptors (of a
/// failed build's writable outputs, or of a setuid-to-build-user program). Behind
/// slirp4netns it has a namespace of its own: no abstract socket is reachable either way,
/// while TCP to the world still works.
#[test]
fn fixed_output_builds_share_no_abstract_socket_with_the_host() {
    no_abstract_socket_is_shared(&T::new());
}

/// The same for a rootless daemon: its `slirp4netns` cannot sandbox itself (that needs uid
/// 0 mapped in the build's user namespace) and runs confined by Landlock instead.
#[test]
fn a_rootless_daemon_s_fixed_output_builds_share_no_abstract_socket_with_the_host() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run kiln as an ordinary user");
        return;
    }
    let (_held, users) = build_users();
    let (uid, gid) = (users[0].1, users[0].1);
    let gid = group_of(uid).unwrap_or(gid);
    // As distributions ship it (0666); .ci/run makes it so where a machine does not.
    let tun = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "test",
            "-r",
            "/dev/net/tun",
            "-a",
            "-w",
            "/dev/net/tun",
        ])
        .status()
        .unwrap();
    if !tun.success() {
        eprintln!("skipped: /dev/net/tun is not open to ordinary users here");
        return;
    }
    no_abstract_socket_is_shared(&T::rootless(uid, gid));
}

/// The primary group of `uid`, from `id`.
fn group_of(uid: u32) -> Option<u32> {
    let o = Command::new("id")
        .args(["-g", &uid.to_string()])
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout).trim().parse().ok()
}

fn no_abstract_socket_is_shared(t: &T) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
    let scripts = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        scripts.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let name = format!(
        "kiln-fod-abstract-{}-{}",
        std::process::id(),
        t.user.map_or(0, |u| u.0)
    );
    let host_side = UnixListener::bind_addr(
        &SocketAddr::from_abstract_name(format!("{name}-host").as_bytes()).unwrap(),
    )
    .unwrap();
    host_side.set_nonblocking(true).unwrap();
    // Serves "hello\n" over TCP: the fixed output, fetched.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in server.incoming().flatten() {
            use std::io::Write;
            let _ = (&c).write_all(b"hello\n");
        }
    });
    let fod = format!(
        "import os, socket, sys\n\
         seen = []\n\
         try:\n\
         \x20   socket.socket(socket.AF_UNIX).connect('\\0{name}-host')\n\
         \x20   seen.append('connected out')\n\
         except OSError:\n\
         \x20   seen.append('no way out')\n\
         l = socket.socket(socket.AF_UNIX)\n\
         l.bind('\\0{name}-build')\n\
         l.listen(1)\n\
         l.settimeout(3)\n\
         try:\n\
         \x20   l.accept()\n\
         \x20   seen.append('someone came in')\n\
         except socket.timeout:\n\
         \x20   seen.append('nobody came in')\n\
         print('abstract sockets: ' + ', '.join(seen), file=sys.stderr)\n\
         c = socket.create_connection((sys.argv[1], {port}), 5)\n\
         open(os.environ['out'], 'wb').write(c.recv(100))\n"
    );
    std::fs::write(scripts.path().join("fod.py"), fod).unwrap();
    let build = |address: &str, network: &str| {
        // Knocks on the build's socket from outside for as long as the build runs.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let knocker = {
            let stop = stop.clone();
            let addr = SocketAddr::from_abstract_name(format!("{name}-build").as_bytes()).unwrap();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if UnixStream::connect_addr(&addr).is_ok() {
                        return true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                false
            })
        };
        let recipe = format!(
            "[derivations.fod-{network}]\nbuilder = \"/usr/bin/python3\"\n\
             args = [\"{}\", \"{address}\"]\noutput-hash = \"{HELLO}\"\n",
            scripts.path().join("fod.py").display()
        );
        let o = t.build(
            &format!("{network}.toml"),
            &recipe,
            true,
            &[
                "--option",
                "sandbox-paths",
                &format!("{TOOLS} {}", scripts.path().display()),
                "--option",
                "fixed-output-network",
                network,
            ],
        );
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let got_in = knocker.join().unwrap();
        let came_out = host_side.accept().is_ok();
        (o, got_in, came_out)
    };
    let (o, got_in, came_out) = build("10.0.2.2", "slirp4netns");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("abstract sockets: no way out, nobody came in"),
        "{}",
        stderr(&o)
    );
    assert!(!got_in && !came_out);
    assert_eq!(
        std::fs::read_to_string(t.out_path(&o, "fod-slirp4netns")).unwrap(),
        "hello\n"
    );
    // In the host's namespace the way in is open (the way out is closed only by Landlock,
    // where the kernel has it): the test can see what it asserts against.
    let (o, got_in, _) = build("127.0.0.1", "host");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        got_in && stderr(&o).contains("someone came in"),
        "{}",
        stderr(&o)
    );
}

/// A sandbox path that is a symbolic link is a link in the sandbox too (Nix copies it), and
/// nothing may be set up beneath it: the set-up would follow the link to wherever it points
/// on the host before the sandbox's root is entered.
#[test]
fn symbolic_link_sandbox_paths_are_links_and_nothing_goes_beneath_them() {
    let t = T::new();
    let link = t.p().join("tools-link");
    std::os::unix::fs::symlink("usr/bin", &link).unwrap();
    let inside = link.to_str().unwrap().to_string();
    let o = t.build(
        "l.toml",
        &drv("link", &format!("readlink {inside} > $out")),
        true,
        &["--option", "extra-sandbox-paths", &inside],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = t.out_path(&o, "link");
    assert_eq!(std::fs::read_to_string(out).unwrap(), "usr/bin\n");
    let beneath = format!("{inside}/sh=/bin/sh");
    let o = t.build(
        "b.toml",
        &drv("beneath", "echo > $out"),
        true,
        &[
            "--option",
            "extra-sandbox-paths",
            &format!("{inside} {beneath}"),
        ],
    );
    assert!(!o.status.success(), "a path beneath a link was set up");
    assert!(
        stderr(&o).contains("is beneath") && stderr(&o).contains("a symbolic link in the sandbox"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn host_files_and_undeclared_store_paths_are_invisible() {
    let t = T::new();
    let o = t.build("s.toml", &drv("secret", "echo s3cret > $out"), false, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let secret = t.out_path(&o, "secret");
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let probe = format!(
        "for f in /etc/shadow /etc/passwd- {home} {s} {store}; do \
         if ls $f >/dev/null 2>&1; then echo \"visible $f\"; fi; done > $out; \
         ls {store} >> $out",
        s = secret.display(),
        store = t.p().join("store").display()
    );
    let o = t.build("p.toml", &drv("probe", &probe), true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = t.out_path(&o, "probe");
    let seen = std::fs::read_to_string(&out).unwrap();
    let store = t.p().join("store");
    assert_eq!(
        seen,
        format!(
            "visible {}\n{}\n",
            store.display(),
            out.file_name().unwrap().to_string_lossy()
        ),
        "the store shows nothing but the output being written"
    );
    // Reading an undeclared store path: succeeds without the sandbox, fails inside it.
    let reader = drv("reader", &format!("cat {} > $out", secret.display()));
    let o = t.build("r.toml", &reader, true, &[]);
    assert_eq!(o.status.code(), Some(100), "{}", stderr(&o));
    assert!(stderr(&o).contains("No such file"), "{}", stderr(&o));
    let o = t.build("r.toml", &reader, false, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = t.out_path(&o, "reader");
    assert_eq!(std::fs::read_to_string(out).unwrap(), "s3cret\n");
}

#[test]
fn writes_outside_the_outputs_and_build_directory_fail() {
    let t = T::new();
    let recipe = format!(
        "{}{}",
        drv("dep", "echo dep > $out"),
        drv(
            "writer",
            "for f in /etc/passwd /x /bin/kiln-x /usr/kiln-x ${dep} /proc/sys/kernel/core_pattern /proc/sys/vm/drop_caches; do \
             (echo evil >> $f) 2>/dev/null && echo \"wrote $f\"; done > $NIX_BUILD_TOP/log; \
             echo evil > $(dirname $out)/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-smuggled; \
             hostname evil 2>/dev/null && echo 'set hostname' >> $NIX_BUILD_TOP/log; \
             echo ok > /tmp/t && echo ok > $NIX_BUILD_TOP/t && cp $NIX_BUILD_TOP/log $out"
        )
    );
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let o = t.build("w.toml", &recipe, true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(t.out_path(&o, "writer")).unwrap();
    assert_eq!(log, "", "writes that succeeded");
    assert_eq!(
        std::fs::read_to_string(t.out_path(&o, "dep")).unwrap(),
        "dep\n"
    );
    assert!(!t
        .p()
        .join("store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-smuggled")
        .exists());
    assert!(!Path::new("/bin/kiln-x").exists() && !Path::new("/x").exists());
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        host_name
    );
}

/// Inputs that are regular files are hard links to the store's inode in the sandbox (and
/// symbolic links copies): none of the ways a builder could change or move one works.
#[test]
fn inputs_linked_into_the_sandbox_cannot_be_changed() {
    let t = T::new();
    let recipe = format!(
        "{}{}{}",
        drv("dep", "echo dep > $out"),
        drv("link", "ln -s /nowhere $out"),
        drv(
            "tamper",
            "test \"$(cat ${dep})\" = dep; test \"$(readlink ${link})\" = /nowhere; \
             for a in 'chmod u+w ${dep}' 'chmod 0777 ${dep}' 'rm -f ${dep}' 'mv ${dep} ${dep}.x' \
                      'touch -d 2001-01-01 ${dep}' 'chown 1000 ${dep}' 'ln ${dep} $NIX_BUILD_TOP/l' \
                      'rm -f ${link}' 'ln -sfn /etc ${link}'; do \
               sh -c \"$a\" 2>/dev/null && echo \"did: $a\"; done > $NIX_BUILD_TOP/log; \
             stat -c 'links %h' ${dep} >> $NIX_BUILD_TOP/log; cp $NIX_BUILD_TOP/log $out"
        )
    );
    let o = t.build("t.toml", &recipe, true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(t.out_path(&o, "tamper")).unwrap();
    // A root daemon links the file in (the store's inode: two links while the sandbox
    // exists); a rootless one mounts it (its builder owns the store's files).
    let links = if rustix::process::geteuid().is_root() {
        2
    } else {
        1
    };
    assert_eq!(log, format!("links {links}\n"), "changes that succeeded");
    let dep = t.out_path(&o, "dep");
    let m = std::fs::symlink_metadata(&dep).unwrap();
    assert_eq!(std::fs::read_to_string(&dep).unwrap(), "dep\n");
    assert_eq!((m.mode() & 0o7777, m.mtime(), m.uid()), (0o444, 1, 0));
    // The sandbox's link is gone with the sandbox.
    assert_eq!(m.nlink(), 1);
    assert_eq!(
        std::fs::read_link(t.out_path(&o, "link")).unwrap(),
        Path::new("/nowhere")
    );
}

/// Sandboxes' host trees leave nothing behind, and what a dead process left in the trash
/// is removed by the next one (a live process's is its own to remove).
#[test]
fn sandbox_trees_are_removed_and_dead_processes_trash_swept() {
    let t = T::new();
    let trash = t.p().join("store/.kiln-trash");
    std::fs::create_dir_all(trash.join("4294967295-0/deep")).unwrap();
    std::fs::write(trash.join("4294967295-0/deep/f"), "x").unwrap();
    let live = trash.join("1-0");
    std::fs::create_dir_all(&live).unwrap();
    let o = t.build("a.toml", &drv("a", "echo a > $out"), true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!trash.join("4294967295-0").exists());
    assert!(live.exists(), "pid 1's trash was taken");
    let left: Vec<_> = std::fs::read_dir(t.p().join("store"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".chroot"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let entries: Vec<_> = std::fs::read_dir(&trash).unwrap().flatten().collect();
    assert_eq!(entries.len(), 1, "only pid 1's entry is left");
}

fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(marker) {
                found.push(format!("{}: {c}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn no_process_survives_the_build() {
    let t = T::new();
    let marker = format!("kiln-sandbox-bg-{}", std::process::id());
    let script = format!(
        "cp /bin/sleep $NIX_BUILD_TOP/{marker}; \
         $NIX_BUILD_TOP/{marker} 1000 & \
         setsid $NIX_BUILD_TOP/{marker} 1001 & \
         (setsid sh -c '$NIX_BUILD_TOP/{marker} 1002 &' &); \
         sleep 0.3; echo done > $out"
    );
    let o = t.build("b.toml", &drv("bg", &script), true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let left = processes_with(&marker);
    assert!(left.is_empty(), "left behind: {left:?}");
    // Without the sandbox's PID namespace, the build's cgroup is what catches them (where
    // this machine has a cgroup v2 hierarchy; without one, only the process group is).
    if kiln_sandbox::cgroup::own_cgroup_dir().is_some() {
        let script = script.replace("echo done", "echo done-unsandboxed");
        let o = t.build("u.toml", &drv("bgu", &script), false, &["--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let left = processes_with(&marker);
        assert!(left.is_empty(), "left behind without the sandbox: {left:?}");
        // The build's CPU time and memory are reported.
        let finished = String::from_utf8_lossy(&o.stderr)
            .lines()
            .chain(String::from_utf8_lossy(&o.stdout).lines())
            .find(|l| l.contains("\"build-finished\""))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no build-finished event: {}", stderr(&o)));
        let v: serde_json::Value = serde_json::from_str(&finished).unwrap();
        assert!(v["cpuUser"].as_f64().is_some(), "{finished}");
        assert!(
            v["memoryPeak"].as_u64().is_some_and(|m| m > 0),
            "{finished}"
        );
    }
    // Other processes of the machine are invisible, the daemon's (here: the test's) too.
    let me = std::process::id();
    let script = format!(
        "ls /proc | grep -c '^[0-9]' > $out; \
         (kill -0 {me} || cat /proc/{me}/environ) >/dev/null 2>&1 && echo reached >> $out; true"
    );
    let o = t.build("p.toml", &drv("pids", &script), true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let seen = std::fs::read_to_string(t.out_path(&o, "pids")).unwrap();
    let n: u32 = seen.lines().next().unwrap().parse().unwrap();
    assert!(n <= 5, "{seen}");
    assert!(!seen.contains("reached"), "{seen}");
}

fn walk(p: &Path, out: &mut Vec<(PathBuf, u32)>) {
    let m = std::fs::symlink_metadata(p).unwrap();
    out.push((p.to_path_buf(), m.mode()));
    if m.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            walk(&e.unwrap().path(), out);
        }
    }
}

#[test]
fn setuid_files_cannot_be_made_or_kept() {
    let t = T::new();
    let script = "mkdir $out; cp /bin/true $out/a; \
        chmod 4755 $out/a 2>/dev/null && echo chmod-allowed >&2; \
        chmod g+s $out/a 2>/dev/null && echo chmod-allowed >&2; \
        python3 -c 'import os; os.close(os.open(os.environ[\"out\"] + \"/b\", os.O_CREAT | os.O_WRONLY, 0o6755))'; \
        mkdir $out/d; chmod 777 $out/d; \
        setfattr -n user.x -v 1 $out/a 2>/dev/null && echo xattr-allowed >&2; true";
    let o = t.build("s.toml", &drv("suid", script), true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("allowed"), "{}", stderr(&o));
    let mut files = Vec::new();
    walk(&t.out_path(&o, "suid"), &mut files);
    assert_eq!(files.len(), 4, "{files:?}");
    for (p, mode) in files {
        assert_eq!(mode & 0o6002, 0, "{} has mode {mode:o}", p.display());
    }
}

#[test]
fn kept_failed_build_directories_are_safe_and_hold_no_links_out() {
    let t = T::new();
    let recipe = format!(
        "{}{}",
        drv("dep", "echo dep > $out"),
        drv(
            "fails",
            "chmod 777 $NIX_BUILD_TOP; ln ${dep} $NIX_BUILD_TOP/link 2>/dev/null; \
             ln /etc/passwd $NIX_BUILD_TOP/passwd 2>/dev/null; \
             cp /bin/true $NIX_BUILD_TOP/x; chmod 4755 $NIX_BUILD_TOP/x 2>/dev/null; \
             mkdir $out; chmod 777 $out; exit 1"
        )
    );
    let o = t.build("k.toml", &recipe, true, &["-K"]);
    assert_eq!(o.status.code(), Some(100), "{}", stderr(&o));
    let e = stderr(&o);
    let kept = e
        .split("keeping build directory '")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .unwrap_or_else(|| panic!("{e}"));
    let mut files = Vec::new();
    walk(Path::new(kept), &mut files);
    let dep = t.out_path(
        &t.build("k.toml", &recipe.replace("exit 1", "true"), true, &[]),
        "dep",
    );
    let dep_ino = std::fs::metadata(&dep).unwrap().ino();
    for (p, mode) in &files {
        assert_eq!(mode & 0o6002, 0, "{} has mode {mode:o}", p.display());
        let m = std::fs::symlink_metadata(p).unwrap();
        // Handed over whole: nothing is left to the builder's ids, which a later build
        // may get.
        assert_eq!(
            m.uid(),
            rustix::process::getuid().as_raw(),
            "{}",
            p.display()
        );
        assert_ne!(
            m.ino(),
            dep_ino,
            "{} is a hard link to an input",
            p.display()
        );
        assert!(m.nlink() == 1 || m.is_dir(), "{} has links", p.display());
    }
    assert_eq!(std::fs::metadata("/etc/passwd").unwrap().nlink(), 1);
    // The builder made its directory world-writable; above it, the daemon's top lets the
    // user through and nobody list it.
    let top = std::fs::metadata(Path::new(kept).parent().unwrap()).unwrap();
    assert_eq!(
        (top.uid(), top.mode() & 0o7777),
        (rustix::process::geteuid().as_raw(), 0o711)
    );
}

/// What the reference sets up, seen from inside a sandboxed build, and the filter tried
/// for real through every call it covers (`fchmodat2` by number: Linux 6.6's, which
/// slipped past Nix's first filter).
#[test]
fn the_sandbox_is_what_the_reference_sets_up_and_filters_what_it_must() {
    let t = T::new();
    let script = r#"
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def call(*a):
    r = libc.syscall(*a)
    return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
os.mkdir(os.environ["out"])
f = os.environ["out"] + "/f"
open(f, "w").close()
r = lambda p: open(p).read().strip()
status = dict(l.split(":\t", 1) for l in r("/proc/self/status").splitlines())
print("dev", " ".join(sorted(os.listdir("/dev"))))
print("pts", " ".join(sorted(os.listdir("/dev/pts"))))
print("uts", r("/proc/sys/kernel/hostname"), r("/proc/sys/kernel/domainname"))
print("oom", r("/proc/self/oom_score_adj"))
print("nnp", status["NoNewPrivs"], "seccomp", status["Seccomp"])
print("personality", r("/proc/self/personality"))
print("top", os.environ["NIX_BUILD_TOP"], os.getcwd())
AT_FDCWD = -100
print("fchmodat2", call(452, AT_FDCWD, f.encode(), 0o4755, 0))
print("fchmodat2-plain", call(452, AT_FDCWD, f.encode(), 0o755, 0))
print("setxattr", call(188, f.encode(), b"user.x", b"1", 1, 0))
print("io_uring_setup", call(425, 1, ctypes.create_string_buffer(120)))
try:
    os.chmod(os.path.dirname(os.environ["NIX_BUILD_TOP"]), 0o777)
    print("parent", "changed")
except OSError as e:
    print("parent", errno.errorcode[e.errno])
"#;
    let recipe = format!(
        "[derivations.report]\nbuilder = \"/usr/bin/python3\"\nargs = [\"-c\", '''{script}''']\n"
    );
    let o = t.build("r.toml", &recipe, true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = t.log(&t.out_path(&o, "report"));
    let line = |k: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("no '{k}' in {log}"))
            .to_string()
    };
    let mut dev: Vec<&str> =
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
            .split(' ')
            .collect();
    if std::fs::File::open("/dev/kvm").is_ok() {
        dev.push("kvm");
        dev.sort();
    }
    assert_eq!(line("dev"), dev.join(" "));
    // A devpts instance of its own: its ptmx, and no terminal of the host's.
    assert_eq!(line("pts"), "ptmx");
    assert_eq!(line("uts"), "localhost (none)");
    assert_eq!(line("oom"), "1000");
    assert_eq!(line("nnp"), "1 seccomp 2");
    // ADDR_NO_RANDOMIZE.
    assert_eq!(line("personality"), "00040000");
    assert_eq!(line("top"), "/build /build");
    assert_eq!(line("fchmodat2"), "EPERM");
    assert_eq!(line("fchmodat2-plain"), "ok");
    assert_eq!(line("setxattr"), "ENOTSUP");
    assert_eq!(line("io_uring_setup"), "ENOSYS");
    // The build directory's parent is not the builder's to open up.
    assert!(
        ["EPERM", "EROFS"].contains(&line("parent").as_str()),
        "{log}"
    );
}

/// CVE-2024-27297: a fixed-output build shares the host's network namespace, so it can hand
/// a descriptor of its output to a process outside, which writes through it once the path
/// is valid. The output must be registered as a copy the descriptor does not reach.
#[test]
fn fixed_output_cannot_keep_a_handle_on_its_output() {
    let t = T::new();
    let scripts = tempfile::tempdir().unwrap();
    let name = format!("kiln-fod-leak-{}", std::process::id());
    let done = t.p().join("build-done");
    // The FOD: writes its output, listens on an abstract socket, passes an O_RDWR
    // descriptor of the output to whoever connects.
    let fod = format!(
        "import os, socket\n\
         out = os.environ['out']\n\
         open(out, 'w').write('hello\\n')\n\
         fd = os.open(out, os.O_RDWR)\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.bind('\\0{name}')\n\
         s.listen(1)\n\
         s.settimeout(20)\n\
         c, _ = s.accept()\n\
         socket.send_fds(c, [b'x'], [fd])\n\
         c.close()\n"
    );
    std::fs::write(scripts.path().join("fod.py"), fod).unwrap();
    // The accomplice outside: takes the descriptor, waits for the build to end, writes.
    let outside = format!(
        "import os, socket, time\n\
         for _ in range(400):\n\
         \x20   try:\n\
         \x20       s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         \x20       s.connect('\\0{name}')\n\
         \x20       break\n\
         \x20   except OSError:\n\
         \x20       time.sleep(0.05)\n\
         else:\n\
         \x20   print('no connection'); raise SystemExit(0)\n\
         _, fds, _, _ = socket.recv_fds(s, 1, 1)\n\
         while not os.path.exists('{done}'):\n\
         \x20   time.sleep(0.05)\n\
         os.pwrite(fds[0], b'EVIL!\\n', 0)\n\
         print('wrote')\n",
        done = done.display()
    );
    let accomplice = Command::new("python3")
        .arg("-c")
        .arg(outside)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let recipe = format!(
        "[derivations.leak]\nbuilder = \"/usr/bin/python3\"\nargs = [\"{}\"]\n\
         output-hash = \"{HELLO}\"\n",
        scripts.path().join("fod.py").display()
    );
    let o = t.build(
        "l.toml",
        &recipe,
        true,
        &[
            "--option",
            "sandbox-paths",
            &format!("{TOOLS} {}", scripts.path().display()),
            // Behind slirp4netns the descriptor could not get out at all (see the test
            // above); in the host's namespace the fresh copy is what protects the store.
            "--option",
            "fixed-output-network",
            "host",
        ],
    );
    std::fs::write(&done, "").unwrap();
    let said = accomplice.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let said = String::from_utf8_lossy(&said.stdout);
    // The descriptor did get out (this is what the kernel allows a fixed-output build)...
    assert_eq!(said.trim(), "wrote");
    // ...and the store did not change.
    let out = t.out_path(&o, "leak");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "hello\n");
    let mut c = t.kiln(true);
    let v = c
        .args(["store", "verify", "--check-contents"])
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", stderr(&v));
}

#[test]
fn pure_builds_give_the_same_outputs_with_and_without_the_sandbox() {
    let t = T::new();
    let recipe = format!(
        "{}{}",
        drv("a", "echo a > $out"),
        drv(
            "b",
            "mkdir $out; cat ${a} > $out/copy; echo ${a} > $out/ref; ln -s ${a} $out/l"
        )
    );
    let o = t.build("r.toml", &recipe, true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let b = t.out_path(&o, "b");
    let info = |t: &T| {
        let mut c = t.kiln(false);
        c.args(["store", "path-info", "--json"]).arg(&b);
        String::from_utf8(c.output().unwrap().stdout).unwrap()
    };
    let sandboxed = info(&t);
    assert!(sandboxed.contains("narHash"), "{sandboxed}");
    // Rebuild without the sandbox, checking that the result is the same.
    let o = t.build("r.toml", &recipe, false, &["--check"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(info(&t), sandboxed);
}

/// A store kept under `--root` (files at ROOT/nix/store, paths named /nix/store) can only be
/// built in the sandbox, where the real paths are mounted at their logical places.
#[test]
fn a_store_under_a_root_is_built_at_its_logical_paths() {
    let t = T::new();
    let recipe = t.p().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "{}{}",
            drv("dep", "echo dep > $out"),
            drv("main", "cat ${dep} > $out; echo $out >> $out")
        ),
    )
    .unwrap();
    let root = t.p().join("root");
    let run = |sandbox: &str| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .current_dir(t.p())
            .arg("--root")
            .arg(&root)
            .args(["--option", "sandbox", sandbox])
            .args(["--option", "sandbox-fallback", "false"])
            .args(["--option", "sandbox-paths", TOOLS])
            .args(["--option", "gc-runtime-roots", "false"])
            .arg("build")
            .arg(&recipe)
            .env_remove("KILN_CONFIG")
            .output()
            .unwrap()
    };
    let o = run("false");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("without the sandbox"), "{}", stderr(&o));
    let o = run("true");
    assert!(o.status.success(), "{}", stderr(&o));
    let main = t.out_path(&o, "main");
    assert!(main.starts_with("/nix/store"), "{}", main.display());
    let real = root.join(main.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read_to_string(real).unwrap(),
        format!("dep\n{}\n", main.display())
    );
}

#[test]
fn processes_outside_the_build_cannot_be_traced() {
    let t = T::new();
    let scripts = tempfile::tempdir().unwrap();
    // A process of the machine's (standing in for the daemon, which `kiln build` is here):
    // the builder knows its host pid and tries to attach to it, and to its own parent.
    let mut victim = Command::new("sleep").arg("60").spawn().unwrap();
    let script = format!(
        "import ctypes, os\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         said = []\n\
         for pid in [{victim}, os.getppid()]:\n\
         \x20   if pid <= 0:\n\
         \x20       said.append('no-such-process'); continue\n\
         \x20   if libc.ptrace(16, pid, 0, 0) == 0:\n\
         \x20       os.waitpid(pid, 0x40000000)\n\
         \x20       libc.ptrace(17, pid, 0, 0)\n\
         \x20       said.append('attached')\n\
         \x20   else:\n\
         \x20       said.append(os.strerror(ctypes.get_errno()))\n\
         open(os.environ['out'], 'w').write(' '.join(said) + '\\n')\n",
        victim = victim.id()
    );
    std::fs::write(scripts.path().join("trace.py"), script).unwrap();
    let recipe = format!(
        "[derivations.tracer]\nbuilder = \"/usr/bin/python3\"\nargs = [\"{}\"]\n",
        scripts.path().join("trace.py").display()
    );
    let paths = format!("{TOOLS} {}", scripts.path().display());
    let run = |sandbox: bool| {
        let o = t.build(
            "t.toml",
            &recipe,
            sandbox,
            &["--option", "sandbox-paths", &paths],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let said = std::fs::read_to_string(t.out_path(&o, "tracer")).unwrap();
        // Gone from the store, so the second run builds again.
        let mut c = t.kiln(false);
        let out = t.out_path(&o, "tracer");
        c.args(["store", "delete"]).arg(&out).output().unwrap();
        said
    };
    let inside = run(true);
    // Not even visible from the sandbox: no such process, and no parent to attach to.
    assert_eq!(inside.trim(), "No such process no-such-process", "{inside}");
    if rustix::process::geteuid().is_root() {
        // The attempt itself works: without the sandbox, root's builder attaches.
        let outside = run(false);
        assert!(outside.starts_with("attached "), "{outside}");
    }
    let _ = victim.kill();
    let _ = victim.wait();
}

/// The build users' group of the tests, `kilnbld`, with members `kilnbld1` and `kilnbld2`
/// (also in `kilnbldx`, a supplementary group as `kvm` would be); made if missing.
/// Held while a test uses the build users: each test has a store (and user pool) of its
/// own, so two of them could take the same user at once, and taking one kills whatever
/// runs as it — the other test's builder included.
static BUILD_USERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn build_users() -> (std::sync::MutexGuard<'static, ()>, Vec<(String, u32)>) {
    let guard = BUILD_USERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let run = |args: &[&str]| {
        let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    for g in ["kilnbld", "kilnbldx"] {
        run(&["groupadd", "-f", "--system", g]);
    }
    let users = ["kilnbld1", "kilnbld2"]
        .iter()
        .map(|u| {
            if !Command::new("id").arg(u).output().unwrap().status.success() {
                run(&[
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "-g",
                    "kilnbld",
                    "-G",
                    "kilnbld,kilnbldx",
                    u,
                ]);
            }
            let id = Command::new("id").args(["-u", u]).output().unwrap();
            (
                u.to_string(),
                String::from_utf8_lossy(&id.stdout).trim().parse().unwrap(),
            )
        })
        .collect();
    (guard, users)
}

/// Live (not zombie) processes whose real uid is `uid`, once those already sent `SIGKILL`
/// have had up to five seconds to die (the signal is delivered asynchronously).
fn processes_of(uid: u32) -> Vec<String> {
    let scan = || {
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(status) = std::fs::read_to_string(e.path().join("status")) {
                let field = |k: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(k))
                        .and_then(|l| l.split_whitespace().next().map(str::to_string))
                };
                if field("Uid:").and_then(|u| u.parse::<u32>().ok()) == Some(uid)
                    && field("State:").as_deref() != Some("Z")
                {
                    found.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        found
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let found = scan();
        if found.is_empty() || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Outside the sandbox, a root daemon with `build-users-group` never builds as root: the
/// builder runs as a free member of the group (with its supplementary groups), whose other
/// processes are killed before the build and whose leftovers are killed after it; the
/// output ends up root's, canonical.
#[test]
fn unsandboxed_builds_run_as_build_users_whose_processes_are_killed() {
    use std::os::unix::process::CommandExt;
    let (_held, users) = build_users();
    let t = T::outside_tmp();
    // The store must be reachable by the build users (a tempdir is 0700).
    std::fs::set_permissions(t.p(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Something already running as each build user, e.g. left by an earlier build.
    let mut strays: Vec<_> = users
        .iter()
        .map(|(_, uid)| {
            Command::new("sleep")
                .arg("300")
                .uid(*uid)
                .gid(0)
                .spawn()
                .unwrap()
        })
        .collect();
    let recipe = drv(
        "who",
        "echo $(id -u) $(id -g) > $out; id -Gn >> $out; setsid sleep 300 </dev/null >/dev/null 2>&1 &",
    );
    let o = t.build(
        "u.toml",
        &recipe,
        false,
        &[
            "--option",
            "build-users-group",
            "kilnbld",
            // Without a cgroup, what the builder left running is the build user's to kill.
            "--option",
            "use-cgroups",
            "false",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = t.out_path(&o, "who");
    let seen = std::fs::read_to_string(&out).unwrap();
    let mut lines = seen.lines();
    let ids: Vec<u32> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (used, other) = match users.iter().position(|(_, u)| *u == ids[0]) {
        Some(i) => (i, 1 - i),
        None => panic!("built as uid {} ({seen}), not a build user", ids[0]),
    };
    let groups = lines.next().unwrap();
    assert!(
        groups.contains("kilnbldx"),
        "supplementary groups: {groups}"
    );
    // The build user's processes, before and after, are gone; the other user's are not.
    assert!(
        strays[used].try_wait().unwrap().is_some(),
        "a stray process survived"
    );
    assert!(
        processes_of(ids[0]).is_empty(),
        "{:?}",
        processes_of(ids[0])
    );
    assert!(strays[other].try_wait().unwrap().is_none());
    strays[other].kill().unwrap();
    let _ = strays[other].wait();
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o444));
}

/// A build user outside the sandbox may hard-link any file it can read and write, a
/// root-owned 0666 one included (hard-link protection allows that). Such a link must
/// neither be published in an output (canonicalising it would change the root's file and
/// put its contents in the store) nor be touched when a failed build's directory is kept
/// (CVE-2021-27851: `-K` once chowned a hard link to `/etc/shadow`). What the builder
/// made itself is kept, handed over, with no setuid bit.
#[test]
fn build_users_cannot_pass_off_other_files_as_outputs_or_kept_files() {
    use std::os::unix::fs::PermissionsExt;
    let (_held, _) = build_users();
    let t = T::outside_tmp();
    std::fs::set_permissions(t.p(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let victim = t.p().join("victim");
    std::fs::write(&victim, "root's\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o666)).unwrap();
    let before = std::fs::metadata(&victim).unwrap();
    let unchanged = || {
        let m = std::fs::metadata(&victim).unwrap();
        assert_eq!(
            (m.uid(), m.mode(), m.mtime(), m.mtime_nsec()),
            (0, before.mode(), before.mtime(), before.mtime_nsec())
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's\n");
    };
    let opts = ["--option", "build-users-group", "kilnbld"];
    let v = victim.display();
    let o = t.build(
        "o.toml",
        &drv(
            "linked",
            &format!("mkdir $out; echo mine > $out/a; ln {v} $out/b"),
        ),
        false,
        &opts,
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("invalid ownership"), "{}", stderr(&o));
    unchanged();

    let o = t.build(
        "k.toml",
        &drv(
            "kept",
            &format!(
                "ln {v} link; cp /bin/true x; chmod 4755 x; ln x x2; mkdir d; chmod 777 d . ; \
                 test -u x || echo setuid-refused >&2; exit 1"
            ),
        ),
        false,
        // Without the filter, so that the setuid bit is there for the hand-over to strip.
        &[&opts[..], &["-K", "--option", "filter-syscalls", "false"]].concat(),
    );
    assert_eq!(o.status.code(), Some(100), "{}", stderr(&o));
    let e = stderr(&o);
    let kept = PathBuf::from(
        e.split("keeping build directory '")
            .nth(1)
            .and_then(|s| s.split('\'').next())
            .unwrap_or_else(|| panic!("{e}")),
    );
    unchanged();
    let m = |p: &str| std::fs::symlink_metadata(kept.join(p)).unwrap();
    assert!(!e.contains("setuid-refused"), "{e}");
    // Handed to the user who asked (root here), stripped of setuid and world-write bits; a
    // file of the builder's with two links is stripped too (and left to the builder).
    assert_eq!(m("x").mode() & 0o7777, 0o755);
    assert_eq!(m("x2").ino(), m("x").ino());
    assert_eq!((m("d").uid(), m("d").mode() & 0o7777), (0, 0o775));
    assert_eq!((m("").uid(), m("").mode() & 0o7777), (0, 0o775));
    // The link is still the root's file, as it was.
    assert_eq!(m("link").ino(), before.ino());
    // The top above it is the daemon's: nobody lists it, the user passes through.
    let top = std::fs::metadata(kept.parent().unwrap()).unwrap();
    assert_eq!((top.uid(), top.mode() & 0o7777), (0, 0o711));
}

/// `sandbox-paths` entries as Nix writes them: `target=source` puts a host path at another
/// place, a trailing `?` skips a missing one; `sandbox = relaxed` lets a derivation with
/// `__noChroot` out of the sandbox, and `sandbox = true` refuses it.
#[test]
fn sandbox_paths_and_relaxed_mode_behave_as_nix_s() {
    let t = T::new();
    let data = t.p().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("f"), "from the host\n").unwrap();
    let paths = format!("/opt/kiln-data={} /nonexistent/kiln-x?", data.display());
    let o = t.build(
        "p.toml",
        &drv(
            "mapped",
            "cat /opt/kiln-data/f > $out; touch /opt/kiln-data/g || true",
        ),
        true,
        &["--option", "extra-sandbox-paths", &paths],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(t.out_path(&o, "mapped")).unwrap(),
        "from the host\n"
    );
    // Read-only: the builder could not write through it.
    assert!(!data.join("g").exists());

    let host_file = data.join("f");
    let recipe = format!(
        "[derivations.out]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"cat {} > $out\"]\n\
         env = {{ PATH = \"/bin:/usr/bin\", __noChroot = \"1\" }}\n",
        host_file.display()
    );
    let o = t.build("n.toml", &recipe, true, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("__noChroot"), "{}", stderr(&o));
    let o = t.build("n.toml", &recipe, true, &["--option", "sandbox", "relaxed"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(t.out_path(&o, "out")).unwrap(),
        "from the host\n"
    );
}

/// `kiln sandbox check --json` reports what this machine gives builds, and follows the
/// settings: turned off, each feature says so.
#[test]
fn sandbox_check_reports_the_machine_and_the_settings() {
    let t = T::new();
    let check = |extra: &[&str]| -> serde_json::Value {
        let o = t
            .kiln(true)
            .args(extra)
            .args(["sandbox", "check", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&o)))
    };
    let ok = |v: &serde_json::Value, prefix: &str| {
        let (_, c) = v
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| k.starts_with(prefix))
            .unwrap_or_else(|| panic!("no '{prefix}' in {v}"));
        c["ok"].as_bool().unwrap()
    };
    let on = check(&[]);
    // The other tests here build in the sandbox on this machine: it must say it works.
    assert!(ok(&on, "namespaces"), "{on}");
    assert!(ok(&on, "system-call filter"), "{on}");
    assert!(ok(&on, "sandbox setting"), "{on}");
    let off = check(&[
        "--option",
        "use-cgroups",
        "false",
        "--option",
        "filter-syscalls",
        "false",
        "--option",
        "fixed-output-network",
        "host",
        "--option",
        "sandbox",
        "false",
    ]);
    for k in [
        "a cgroup v2",
        "system-call filter",
        "fixed-output builds",
        "sandbox setting",
    ] {
        assert!(!ok(&off, k), "{k}: {off}");
    }
}

/// A root daemon with `build-users-group` builds in the sandbox as a member of the group:
/// seen from the host, the builder runs as one of them (uid 1000 inside, as Nix's).
#[test]
fn sandboxed_builds_run_as_build_users() {
    use std::os::unix::fs::PermissionsExt;
    let (_held, users) = build_users();
    let t = T::outside_tmp();
    std::fs::set_permissions(t.p(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = format!("kiln-sandboxed-build-user-{}", std::process::id());
    let f = t.p().join("u.toml");
    std::fs::write(
        &f,
        drv(
            "who",
            &format!("id -u > $out; python3 -c 'import time; time.sleep(2)' {marker}"),
        ),
    )
    .unwrap();
    let build = t
        .kiln(true)
        .args(["--option", "build-users-group", "kilnbld", "build"])
        .arg(&f)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let host_uid = loop {
        let seen = processes_with(&marker);
        if let Some(pid) = seen.first().and_then(|l| l.split(':').next()) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let uid: u32 = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next())
                .unwrap()
                .parse()
                .unwrap();
            break uid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the builder never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let o = build.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        users.iter().any(|(_, u)| *u == host_uid),
        "built as host uid {host_uid}, not a member of kilnbld: {users:?}"
    );
    let out = t.out_path(&o, "who");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "1000\n");
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o444));
}

#[test]
fn a_pre_build_hook_adds_sandbox_paths_for_the_build() {
    use std::os::unix::fs::PermissionsExt;
    let t = T::new();
    let shared = t.p().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("file"), "from the hook\n").unwrap();
    let hook = t.p().join("hook");
    let args = t.p().join("hook-args");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$@\" >> {args}\nprintf 'extra-sandbox-paths\\n/hooked={shared}\\n\\n'\n",
            args = args.display(),
            shared = shared.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let reader = drv("hooked", "cat /hooked/file > $out");
    let h = hook.to_str().unwrap();
    let o = t.build("h.toml", &reader, true, &["--option", "pre-build-hook", h]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = t.out_path(&o, "hooked");
    assert_eq!(std::fs::read_to_string(out).unwrap(), "from the hook\n");
    // It was given the derivation and the sandbox's directory.
    let seen = std::fs::read_to_string(&args).unwrap();
    let words: Vec<&str> = seen.split_whitespace().collect();
    assert_eq!(words.len(), 2, "{seen}");
    assert!(words[0].ends_with("-hooked.drv"), "{seen}");
    assert!(words[1].ends_with("-hooked.drv.chroot"), "{seen}");
    // Without the hook the path is not there.
    let again = drv("unhooked", "cat /hooked/file > $out");
    let o = t.build("u.toml", &again, true, &[]);
    assert!(!o.status.success());
    // A hook that fails, or says something it should not, fails the build.
    std::fs::write(&hook, "#!/bin/sh\nexit 3\n").unwrap();
    let o = t.build(
        "f.toml",
        &drv("failhook", "echo > $out"),
        true,
        &["--option", "pre-build-hook", h],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("failed with exit code 3"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&hook, "#!/bin/sh\necho make-coffee\n").unwrap();
    let o = t.build(
        "c.toml",
        &drv("coffee", "echo > $out"),
        true,
        &["--option", "pre-build-hook", h],
    );
    assert!(
        stderr(&o).contains("unknown pre-build hook command 'make-coffee'"),
        "{}",
        stderr(&o)
    );
}

/// The `diff-hook` of a sandboxed `--check` runs as the build's host user, as Nix runs it,
/// and is handed the build directory, which that user owns: never as the daemon's root
/// (the directory is the builder's, and a root hook would follow the links it left, say
/// to `/etc/shadow`). The directory is gone once the hook is done.
#[test]
fn a_sandboxed_checks_diff_hook_runs_as_the_builds_user_with_its_directory() {
    use std::os::unix::fs::PermissionsExt;
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: the daemon must be root to run builds as other users");
        return;
    }
    let t = T::new();
    std::fs::set_permissions(t.p(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let said = t.p().join("said");
    std::fs::create_dir(&said).unwrap();
    std::fs::set_permissions(&said, std::fs::Permissions::from_mode(0o777)).unwrap();
    let hook = t.p().join("diff-hook");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\n{{ id -u; [ -f \"$4/left-by-builder\" ] && echo build-directory; echo \"$4\"; }} > {}/out\n",
            said.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = drv(
        "unsteady",
        "echo x > left-by-builder; cat /proc/sys/kernel/random/uuid > $out",
    );
    let o = t.build("u.toml", &text, true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let h = hook.to_str().unwrap();
    let o = t.build(
        "u.toml",
        &text,
        true,
        &[
            "--check",
            "--option",
            "run-diff-hook",
            "true",
            "--option",
            "diff-hook",
            h,
        ],
    );
    assert!(!o.status.success(), "{}", stderr(&o));
    let out = std::fs::read_to_string(said.join("out")).unwrap();
    let mut lines = out.lines();
    let uid: u32 = lines.next().unwrap().parse().unwrap();
    assert_ne!(uid, 0, "{out}");
    assert_eq!(lines.next(), Some("build-directory"), "{out}");
    let dir = lines.next().unwrap();
    assert!(!Path::new(dir).exists(), "{dir} outlived the hook");
}
