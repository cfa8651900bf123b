//! Real sandboxes: a shell started in one, asked what it can see.

#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::io::Read;
use std::path::Path;

use kiln_sandbox::spawn::{exit_code, pipe_cloexec, wait};
use kiln_sandbox::{spawn, Cgroup, ChildSpec, Entry, IdMap, Sandbox};

fn cs(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn host_tools() -> Vec<Entry> {
    ["/bin", "/usr", "/lib", "/lib64", "/sbin"]
        .iter()
        .map(|p| Entry::Bind {
            source: p.into(),
            path: p.to_string(),
            writable: false,
            optional: true,
        })
        .collect()
}

/// A sandbox at `root` with `entries`, for whoever runs the tests (root or not), the build
/// seeing itself as Nix's build user; with `net`, a network namespace of its own.
fn sandbox(root: std::path::PathBuf, net: bool, entries: Vec<Entry>) -> Sandbox {
    Sandbox {
        root,
        network: if net {
            kiln_sandbox::Network::Loopback
        } else {
            kiln_sandbox::Network::Host
        },
        ids: IdMap::nix(
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        ),
        unprivileged: rustix::process::geteuid().as_raw() != 0,
        entries,
        seccomp: true,
    }
}

/// Runs `script` with `sh -c` in a sandbox; returns (exit code, output).
fn run(root: &Path, entries: Vec<Entry>, net: bool, script: &str) -> (Option<i32>, String) {
    let (child, r) = start(root, entries, net, script);
    let mut s = String::new();
    std::fs::File::from(r).read_to_string(&mut s).unwrap();
    (exit_code(wait(child.pid).unwrap()), s)
}

/// Starts `script` with `sh -c` in a sandbox; returns the child and its output's read end.
fn start(
    root: &Path,
    entries: Vec<Entry>,
    net: bool,
    script: &str,
) -> (kiln_sandbox::Spawned, std::os::fd::OwnedFd) {
    let (r, w) = pipe_cloexec().unwrap();
    let sandbox = sandbox(root.to_path_buf(), net, entries);
    let child = spawn(ChildSpec {
        program: cs("/bin/sh"),
        args: vec![cs("sh"), cs("-c"), cs(script)],
        env: vec![cs("PATH=/bin:/usr/bin")],
        cwd: cs("/"),
        output: w,
        personality: None,
        uname26: false,
        user: None,
        oom_score_adj: true,
        sandbox: Some(sandbox),
        cgroup: None,
        seccomp: false,
        no_new_privs: false,
    })
    .unwrap();
    (child, r)
}

#[test]
fn a_shell_in_a_sandbox_sees_only_what_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut entries = host_tools();
    entries.push(Entry::Dir {
        path: "/etc".into(),
        mode: 0o755,
    });
    entries.push(Entry::File {
        path: "/etc/passwd".into(),
        contents: b"nixbld:x:1000:100:Nix build user:/build:/noshell\n".to_vec(),
        mode: 0o444,
    });
    entries.push(Entry::Proc {
        path: "/proc".into(),
    });
    entries.push(Entry::Tmpfs {
        path: "/tmp".into(),
        options: "mode=1777".into(),
    });
    let (code, out) = run(
        &root,
        entries,
        true,
        "id -u; id -g; hostname; ls /; ls /proc | grep -c '^[0-9]'; cat /etc/passwd; \
         touch /tmp/x && echo tmp-ok; touch /x 2>/dev/null || echo root-ro; \
         touch /bin/x 2>/dev/null || echo bin-ro; \
         chmod 4755 /tmp/x 2>/dev/null || echo no-setuid; chmod 755 /tmp/x && echo chmod-ok",
    );
    assert_eq!(code, Some(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000", "{out}");
    assert_eq!(lines[1], "100", "{out}");
    assert_eq!(lines[2], "localhost", "{out}");
    for want in ["bin", "etc", "proc", "tmp", "usr"] {
        assert!(lines.contains(&want), "{want} missing: {out}");
    }
    assert!(
        !lines.contains(&"home") && !lines.contains(&"root"),
        "{out}"
    );
    // Only the shell and its children are in the PID namespace.
    let procs: u32 = lines
        .iter()
        .skip_while(|l| **l != "usr")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(procs <= 4, "{out}");
    for want in [
        "nixbld:x:1000:100:Nix build user:/build:/noshell",
        "tmp-ok",
        "root-ro",
        "bin-ro",
        "no-setuid",
        "chmod-ok",
    ] {
        assert!(lines.contains(&want), "{want} missing: {out}");
    }
    // Nothing leaked onto the host's directory.
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
}

#[test]
fn a_failing_entry_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let (r, w) = pipe_cloexec().unwrap();
    drop(r);
    let e = spawn(ChildSpec {
        sandbox: Some(sandbox(
            root,
            true,
            vec![Entry::Bind {
                source: "/nonexistent/kiln-source".into(),
                path: "/x".into(),
                writable: false,
                optional: false,
            }],
        )),
        ..ChildSpec::new(cs("/bin/sh"), vec![cs("sh")], w)
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("bind-mounting '/nonexistent/kiln-source' on '/x'")
            && e.contains("No such file"),
        "{e}"
    );
}

/// Starts `script` in a fresh cgroup (sandboxed or not); returns the cgroup, the shell's
/// pid and the first line it printed.
fn in_cgroup(sandboxed: bool, name: &str, script: &str) -> Option<(Cgroup, i32, String)> {
    let cg = Cgroup::create(name).unwrap()?;
    let dir = tempfile::tempdir().unwrap();
    let (r, w) = pipe_cloexec().unwrap();
    let mut spec = ChildSpec::new(cs("/bin/sh"), vec![cs("sh"), cs("-c"), cs(script)], w);
    spec.env = vec![cs("PATH=/bin:/usr/bin")];
    spec.cgroup = Some(cg.procs_fd().unwrap());
    if sandboxed {
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        spec.sandbox = Some(sandbox(root, true, host_tools()));
    }
    let child = spawn(spec).unwrap();
    // What the script leaves behind holds the pipe open: read one line only.
    let mut out = String::new();
    let mut f = std::io::BufReader::new(std::fs::File::from(r));
    std::io::BufRead::read_line(&mut f, &mut out).unwrap();
    Some((cg, child.pid, out))
}

fn procs(cg: &Cgroup) -> Vec<i32> {
    std::fs::read_to_string(cg.path().join("cgroup.procs"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

#[test]
fn a_build_cgroup_holds_every_process_and_kills_them_at_the_end() {
    for sandboxed in [false, true] {
        let name = format!("kiln-cg-test-{}-{sandboxed}", std::process::id());
        // Spins for a while (CPU time to account), leaves a detached process behind, and
        // waits for a moment before it exits.
        let script = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
             setsid sleep 1000 & echo started; sleep 0.2";
        let Some((cg, pid, out)) = in_cgroup(sandboxed, &name, script) else {
            eprintln!("no writable cgroup v2 hierarchy here: skipped");
            return;
        };
        assert_eq!(out.trim(), "started");
        // The shell, its detached child and its `sleep 0.2` all joined (inside a sandbox
        // too, from within its user and PID namespaces).
        let during = procs(&cg);
        assert!(during.len() >= 2, "{sandboxed}: {during:?}");
        assert_eq!(exit_code(wait(pid).unwrap()), Some(0));
        let mut after = procs(&cg);
        if sandboxed {
            // The PID namespace ends with its first process: the kernel kills the rest,
            // and they leave the cgroup as they finish exiting, which can come a moment
            // after the first process was reaped (CI saw one still listed).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !after.is_empty() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
                after = procs(&cg);
            }
            assert!(after.is_empty(), "{after:?}");
        } else {
            // Detached from the process group, but still in the cgroup.
            assert_eq!(after.len(), 1, "{after:?}");
        }
        let path = cg.path().to_path_buf();
        let used = cg.finish();
        for p in &after {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            assert!(
                stat.is_empty() || stat.contains(") Z "),
                "process {p} survived"
            );
        }
        assert!(!path.exists(), "the cgroup was removed");
        assert!(
            used.cpu_user + used.cpu_system > std::time::Duration::ZERO,
            "{used:?}"
        );
    }
}

/// A network helper that fails is reported with what it said, and the builder never runs.
#[test]
fn a_failing_network_helper_is_reported_and_the_builder_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let helper = dir.path().join("helper");
    std::fs::write(
        &helper,
        "#!/bin/sh\necho \"cannot open /dev/net/tun: nope\" >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let marker = dir.path().join("ran");
    let mut entries = host_tools();
    entries.push(Entry::Bind {
        source: dir.path().to_path_buf(),
        path: dir.path().display().to_string(),
        writable: true,
        optional: false,
    });
    let mut sb = sandbox(root, true, entries);
    sb.network = kiln_sandbox::Network::User(kiln_sandbox::UserNet {
        program: helper,
        isolate_host_loopback: false,
    });
    let (_r, w) = pipe_cloexec().unwrap();
    let e = spawn(ChildSpec {
        sandbox: Some(sb),
        ..ChildSpec::new(
            cs("/bin/sh"),
            vec![
                cs("sh"),
                cs("-c"),
                cs(&format!("touch {}", marker.display())),
            ],
            w,
        )
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("exited before the network was up")
            && e.contains("exit status: 3")
            && e.contains("cannot open /dev/net/tun: nope"),
        "{e}"
    );
    assert!(!marker.exists());
}

/// Builds running side by side each have a network namespace of their own, with loopback
/// working, none of them the host's; a root daemon gives most of them one made ahead of
/// time (`netns`), never the same one twice.
#[test]
fn every_build_has_a_network_namespace_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let lent_before = kiln_sandbox::netns::lent();
    let host = std::fs::read_link("/proc/self/ns/net").unwrap();
    let script = "readlink /proc/self/ns/net; \
        python3 -c \"import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); \
        socket.create_connection(s.getsockname()); print('lo-ok')\"; \
        sleep 2";
    let mut running = Vec::new();
    for i in 0..8 {
        let root = dir.path().join(format!("root{i}"));
        std::fs::create_dir(&root).unwrap();
        let mut entries = host_tools();
        entries.push(Entry::Proc {
            path: "/proc".into(),
        });
        running.push(start(&root, entries, true, script));
        // Time for the pool to make more.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (child, r) in running {
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(exit_code(wait(child.pid).unwrap()), Some(0), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.get(1), Some(&"lo-ok"), "{out}");
        assert_ne!(Path::new(lines[0]), host, "{out}");
        // All eight are alive at once, so their namespaces' numbers cannot be reused.
        assert!(seen.insert(lines[0].to_string()), "shared: {out}");
    }
    if rustix::process::geteuid().is_root() {
        assert!(
            kiln_sandbox::netns::lent() > lent_before,
            "no build got a namespace from the pool"
        );
    }
}
