//! Today's Nix client (2.34.8, Debian sid) against `kiln daemon`, compared with the same
//! commands against nix-daemon 2.34.8 on an identical fresh store at the same path
//! (`tests/fixtures/daemon/scenario-2.34.sh`): builds, failures with `--keep-going`,
//! queries, logs, verification, a binary cache both ways, deletion and collection.
//! Outputs, error lines and exit statuses must agree.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use kiln_testkit::{fixture, remove_tree, run_ok, scenario_steps, DaemonProcess, NixEnv, SidNix};

/// `cmd` with the environment's store, state, log and configuration directories.
fn with_env(mut c: Command, env: &NixEnv) -> Command {
    c.env("NIX_STORE_DIR", env.store_dir())
        .env("NIX_STATE_DIR", env.state_dir())
        .env("NIX_LOG_DIR", env.log_dir())
        .env("NIX_CONF_DIR", env.dir.path().join("conf"))
        .env("HOME", env.dir.path())
        .env("XDG_CACHE_HOME", env.dir.path().join("cache-home"))
        .env_remove("NIX_PATH")
        .env_remove("NIX_CONFIG");
    c
}

fn nix_daemon(sid: &SidNix, env: &NixEnv) -> DaemonProcess {
    let socket = env.dir.path().join("daemon.sock");
    let mut c = with_env(sid.cmd("nix-daemon"), env);
    c.env("NIX_REMOTE", "local")
        .env("NIX_DAEMON_SOCKET_PATH", &socket)
        // Run through the sid root's loader, Nix cannot start itself again as its build
        // hook (`/proc/self/exe` is the loader); with no remote builders it needs none.
        .env("NIX_CONFIG", "build-hook =")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    DaemonProcess::start_then_connect(c, socket)
}

fn kiln_daemon(env: &NixEnv) -> DaemonProcess {
    env.kiln_daemon(
        env!("CARGO_BIN_EXE_kiln"),
        env.dir.path().join("daemon.sock"),
    )
}

/// kiln's daemon or nix-daemon 2.34 on `env`.
fn either_daemon(sid: &SidNix, env: &NixEnv, kiln: bool) -> DaemonProcess {
    if kiln {
        kiln_daemon(env)
    } else {
        nix_daemon(sid, env)
    }
}

/// `nix ARGS` (with `nix-command`) of the sid root against `d`; its standard output and
/// error. Panics with the error if it fails.
fn nix_ok(sid: &SidNix, env: &NixEnv, d: &DaemonProcess, args: &[&str]) -> (String, String) {
    let out = with_env(sid.cmd("nix"), env)
        .env("NIX_REMOTE", format!("unix://{}", d.socket.display()))
        .args(["--extra-experimental-features", "nix-command"])
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}: {err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

fn run_scenario(sid: &SidNix, env: &NixEnv, d: &DaemonProcess, work: &Path) -> String {
    run_script(sid, env, d, work, "daemon/scenario-2.34.sh")
}

/// The fixture `script` run by bash with Nix 2.34's programs first on `PATH`, against `d`;
/// what it printed.
fn run_script(sid: &SidNix, env: &NixEnv, d: &DaemonProcess, work: &Path, script: &str) -> String {
    run_script_with(sid, env, d, work, script, &[])
}

/// [`run_script`] with `vars` in its environment.
fn run_script_with(
    sid: &SidNix,
    env: &NixEnv,
    d: &DaemonProcess,
    work: &Path,
    script: &str,
    vars: &[(&str, &str)],
) -> String {
    std::fs::create_dir_all(work).unwrap();
    let path = format!(
        "{}:{}",
        sid.bin_dir(env.dir.path()).display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = with_env(Command::new("bash"), env);
    let out = c
        .arg(fixture(script))
        .env("PATH", path)
        .env("NIX_REMOTE", format!("unix://{}", d.socket.display()))
        .env("FIXTURES", fixture(""))
        .envs(vars.iter().copied())
        .current_dir(work)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nix_2_34_clients_see_the_same_daemon() {
    let Some(sid) = SidNix::or_skip("nix_2_34_clients_see_the_same_daemon") else {
        return;
    };
    // One directory used twice: store paths depend on the store directory's name.
    let base = std::env::temp_dir().join(format!("kiln-daemon-234-{}", std::process::id()));
    let nix_out = {
        let env = NixEnv::at(&base);
        let d = nix_daemon(&sid, &env);
        run_scenario(&sid, &env, &d, &base.join("work"))
    };
    let kiln_out = {
        let env = NixEnv::at(&base);
        let d = kiln_daemon(&env);
        let out = run_scenario(&sid, &env, &d, &base.join("work"));
        drop(d);
        remove_tree(&base);
        out
    };
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert!(n.len() >= 25, "the scenario did not run: {nix_out}");
    assert!(
        n.iter()
            .any(|(h, b)| h.contains("store info") && b.contains("Trusted: 1")),
        "{nix_out}"
    );
    let mut diffs = Vec::new();
    // The one known difference: nix-daemon leaves the lock files and the unregistered
    // outputs of failed builds in the store for the next collection to find; kiln removes
    // them when the build fails. So the first collection finds that many paths fewer.
    let mut leftovers: Option<usize> = None;
    for ((hn, bn), (hk, bk)) in n.iter().zip(k.iter()) {
        assert_eq!(hn, hk);
        let mut bn = bn.clone();
        if hn.contains("--print-dead") && leftovers.is_none() {
            let kiln_dead: Vec<&str> = bk.lines().collect();
            let (extra, kept): (Vec<&str>, Vec<&str>) =
                bn.lines().partition(|l| !kiln_dead.contains(l));
            for e in &extra {
                assert!(
                    e.ends_with(".lock") || e.ends_with("-failing") || e.ends_with("-bad-hash"),
                    "nix-daemon found a dead path kiln did not: {e}"
                );
            }
            leftovers = Some(extra.len());
            bn = kept.iter().map(|l| format!("{l}\n")).collect();
        }
        if hn == "nix-collect-garbage" {
            if let Some(n) = leftovers.filter(|&n| n > 0) {
                let (count, rest) = bn.split_once(' ').unwrap();
                let count: usize = count.parse().unwrap();
                bn = format!("{} {rest}", count - n);
                leftovers = Some(0);
            }
        }
        let (bn, bk) = (&bn, bk);
        if bn != bk {
            diffs.push(format!("--- {hn}\nnix-daemon 2.34:\n{bn}kiln:\n{bk}"));
        }
    }
    assert_eq!(n.len(), k.len(), "different number of steps");
    assert!(
        diffs.is_empty(),
        "{} steps differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// The attribute matrix (`tests/fixtures/attrs.nix`, run by `daemon/attrs-2.34.sh`): every
/// derivation attribute Nix 2.34 documents that shows without a sandbox, built through
/// nix-daemon 2.34 and through kiln on identical fresh stores at one path. What each
/// builder was given (environment, arguments, build directory and its files), the output
/// paths and contents, exit statuses and error lines must be the same.
#[test]
fn nix_2_34_derivation_attributes_do_what_nix_daemon_does() {
    let Some(sid) = SidNix::or_skip("nix_2_34_derivation_attributes_do_what_nix_daemon_does")
    else {
        return;
    };
    let base = std::env::temp_dir().join(format!("kiln-attrs-234-{}", std::process::id()));
    let (nix_out, kiln_out) = with_both_daemons(&sid, &base, None, "daemon/attrs-2.34.sh");
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert!(n.len() >= 20, "the matrix did not run: {nix_out}");
    assert!(
        n.iter()
            .any(|(h, b)| h.contains("structured") && b.contains(".attrs.json")),
        "{nix_out}"
    );
    assert_eq!(n.len(), k.len(), "different number of steps");
    // The one known difference: Nix 2.34 lists `uid-range` among this machine's features
    // (a build asking for it gets 65,536 ids of its own); kiln cannot give a build a range
    // of ids, so it does not claim the feature (ARCHITECTURE.md, "What kiln does not do").
    let n: Vec<(String, String)> = n
        .into_iter()
        .map(|(h, b)| (h, b.replace(", uid-range}", "}")))
        .collect();
    assert_same_steps(&n, &k, "cases");
}

/// The settings matrix (`tests/fixtures/settings.nix`, run by `daemon/settings-2.34.sh`):
/// each setting a trusted Nix 2.34 client gives (`--option`, or its flag), built through
/// nix-daemon 2.34 and through kiln on identical fresh stores at one path. Outputs, error
/// and warning lines, exit statuses, what hooks are handed, kept build directories, logs,
/// signatures, substitution from a `file://` cache, what a collection would delete: the
/// same.
#[test]
fn nix_2_34_settings_do_what_they_do_with_nix_daemon() {
    let Some(sid) = SidNix::or_skip("nix_2_34_settings_do_what_they_do_with_nix_daemon") else {
        return;
    };
    let base = std::env::temp_dir().join(format!("kiln-settings-234-{}", std::process::id()));
    let conf = "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command configurable-impure-env\n";
    let (nix_out, kiln_out) = with_both_daemons(&sid, &base, Some(conf), "daemon/settings-2.34.sh");
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert!(n.len() >= 50, "the matrix did not run: {nix_out}");
    assert_eq!(
        n.len(),
        k.len(),
        "different number of steps:\n{nix_out}\n----\n{kiln_out}"
    );
    // Nix 2.34 lists `uid-range` among this machine's features; kiln does not claim it
    // (ARCHITECTURE.md, "What kiln does not do").
    let n: Vec<(String, String)> = n
        .into_iter()
        .map(|(h, b)| (h, b.replace(", uid-range}", "}")))
        .collect();
    // nix-daemon 2.34 drops a client's `system-features` without a word (its store's
    // value decides); kiln drops it too, and says so.
    let said =
        "warning: 'system-features' is the daemon's own setting: a client's value has no effect\n";
    let feature = k
        .iter()
        .position(|(h, _)| h.contains("system-features"))
        .unwrap();
    assert!(k[feature].1.contains(said), "{kiln_out}");
    let k: Vec<(String, String)> = k
        .into_iter()
        .map(|(h, b)| (h, b.replace(said, "")))
        .collect();
    assert_same_steps(&n, &k, "cases");
}

/// `use-cgroups` with the sandbox on (`daemon/cgroups-2.34.sh`): a builder sees its own
/// cgroup as the root of a cgroup namespace, and what it leaves running is killed with its
/// cgroup, through nix-daemon 2.34 (with its `cgroups` experimental feature) and through
/// kiln.
#[test]
fn nix_2_34_builds_in_cgroups_are_what_nix_daemon_makes_them() {
    let Some((n, k, nix_out, _)) = sandboxed_with_both(
        "nix_2_34_builds_in_cgroups_are_what_nix_daemon_makes_them",
        "cgroups",
        "use-cgroups = true\nexperimental-features = nix-command cgroups\n",
        "daemon/cgroups-2.34.sh",
    ) else {
        return;
    };
    assert_eq!(n.len(), 2, "the steps did not run: {nix_out}");
    // Every hierarchy's path is the namespace's root (`0::/`, and `N:controllers:/` where
    // cgroup v1 is mounted too).
    assert!(n[0].1.contains("0::/\n"), "{nix_out}");
    assert!(
        n[0].1
            .lines()
            .filter(|l| !l.starts_with("exit="))
            .all(|l| l.ends_with(":/")),
        "{nix_out}"
    );
    assert!(n[1].1.contains("left: 0"), "{nix_out}");
    assert_same_steps(&n, &k, "steps");
}

/// A group and its users made for one test (`groupadd`/`useradd`, once per machine; left
/// in place, as a build users group is): false when the tools are missing.
fn ensure_build_users(group: &str, users: &[&str]) -> bool {
    let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    if !ok(Command::new("getent").args(["group", group]))
        && !ok(Command::new("groupadd").args(["-f", "-r", group]))
    {
        return false;
    }
    for u in users {
        if !ok(Command::new("id").arg(u))
            && !ok(Command::new("useradd").args([
                "-r",
                "-M",
                "-N",
                "-g",
                group,
                "-G",
                group,
                "-d",
                "/var/empty",
                "-s",
                "/usr/sbin/nologin",
                u,
            ]))
        {
            return false;
        }
    }
    true
}

/// `build-users-group` (`daemon/build-users-2.34.sh`, sandbox off): the builder's user,
/// groups, home and build directory, a user per concurrent build, the registered output's
/// owner, and no process left behind by a build user, through nix-daemon 2.34 and through
/// kiln, each with a group of two users made for this test.
#[test]
fn nix_2_34_build_users_are_used_as_nix_daemon_uses_them() {
    let test = "nix_2_34_build_users_are_used_as_nix_daemon_uses_them";
    let Some(sid) = SidNix::or_skip(test) else {
        return;
    };
    let (group, users) = ("kilncmp", ["kilncmp1", "kilncmp2"]);
    if !ensure_build_users(group, &users) {
        assert!(
            std::env::var_os("KILN_REQUIRE_NIX").is_none(),
            "cannot make the build users"
        );
        eprintln!("{test}: skipped, cannot make the build users");
        return;
    }
    let conf = format!(
        "substituters =\nsandbox = false\nbuild-users-group = {group}\nmax-jobs = 2\nexperimental-features = nix-command\n"
    );
    // (Two slots in the daemon's own configuration: kiln's slots are the daemon's, shared
    // by its clients, where each nix-daemon process takes its client's `-j`.)
    let users_var = users.join(" ");
    // Where no directory above is writable by everyone, and readable by the build users.
    let dir = kiln_testkit::tempdir_outside_tmp();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = dir.path().join("users");
    let (nix_out, kiln_out) = with_both_daemons_with(
        &sid,
        &base,
        Some(&conf),
        "daemon/build-users-2.34.sh",
        &[("USERS", &users_var)],
    );
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert_eq!(n.len(), 4, "the steps did not run: {nix_out}");
    // nix-daemon runs the builder as the group's first free user, and two at once as two.
    assert!(n[0].1.contains("user kilncmp1 group kilncmp"), "{nix_out}");
    assert!(
        n[1].1.contains("user kilncmp1") && n[1].1.contains("user kilncmp2"),
        "{nix_out}"
    );
    assert_same_steps(&n, &k, "steps");
    // Under /tmp (writable by everyone, sticky or not), both refuse to build as the users.
    let base = std::env::temp_dir().join(format!("kiln-users-234-{}", std::process::id()));
    let (nix_out, kiln_out) = with_both_daemons_with(
        &sid,
        &base,
        Some(&conf),
        "daemon/build-users-2.34.sh",
        &[("USERS", &users_var)],
    );
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert!(
        n[0].1
            .contains("Path \"/tmp\" is world-writable or a symlink."),
        "{nix_out}"
    );
    // Two builds at once (the second step) both meet the refusal in kiln, whose builds
    // start on their own threads, and kiln reports both; nix-daemon starts them one after
    // the other and stops the second after the first failed. The single builds compare.
    let singles = |v: &[(String, String)]| -> Vec<(String, String)> {
        [0, 2, 3].iter().map(|&i| v[i].clone()).collect()
    };
    assert_same_steps(&singles(&n), &singles(&k), "steps under /tmp");
    assert!(k[1].1.contains("failed"), "{kiln_out}");
}

/// The settings matrix for clients the daemon does not trust or let in (`trusted-users`,
/// `trusted-substituters`, `allowed-users`; `daemon/settings-untrusted-2.34.sh` and
/// `daemon/settings-refused-2.34.sh`), through nix-daemon 2.34 and through kiln.
#[test]
fn nix_2_34_untrusted_and_refused_clients_are_treated_as_by_nix_daemon() {
    let test = "nix_2_34_untrusted_and_refused_clients_are_treated_as_by_nix_daemon";
    let Some(sid) = SidNix::or_skip(test) else {
        return;
    };
    let base = std::env::temp_dir().join(format!("kiln-untrusted-234-{}", std::process::id()));
    let conf = format!(
        "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command\ntrusted-users = kiln-matrix-nobody\ntrusted-substituters = file://{}/tcache\n",
        base.join("work").display()
    );
    let (nix_out, kiln_out) = with_both_daemons(
        &sid,
        &base,
        Some(&conf),
        "daemon/settings-untrusted-2.34.sh",
    );
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert_eq!(n.len(), 6, "the cases did not run: {nix_out}");
    assert!(n[0].1.starts_with("Trusted: 0"), "{nix_out}");
    assert_same_steps(&n, &k, "untrusted cases");

    let conf = "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command\ntrusted-users = kiln-matrix-nobody\nallowed-users = kiln-matrix-nobody\n";
    let (nix_out, kiln_out) =
        with_both_daemons(&sid, &base, Some(conf), "daemon/settings-refused-2.34.sh");
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert_eq!(n.len(), 2, "the cases did not run: {nix_out}");
    assert!(n[0].1.ends_with("exit=1\n"), "{nix_out}");
    assert_same_steps(&n, &k, "refused cases");
}

/// The settings matrix for caches over HTTP (`daemon/settings-http-2.34.sh`, a cache
/// served by `tests/fixtures/faulty-cache.py` that fails, stalls, or gains and loses
/// paths): `download-attempts`, `stalled-download-timeout` and the narinfo cache's TTLs,
/// through nix-daemon 2.34 and through kiln.
#[test]
fn nix_2_34_http_cache_settings_do_what_they_do_with_nix_daemon() {
    let test = "nix_2_34_http_cache_settings_do_what_they_do_with_nix_daemon";
    let Some(sid) = SidNix::or_skip(test) else {
        return;
    };
    let base = std::env::temp_dir().join(format!("kiln-http-234-{}", std::process::id()));
    let root = std::env::temp_dir().join(format!("kiln-http-234-root-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let (child, port) = kiln_testkit::serve_on_free_port(|port| {
        Command::new("python3")
            .arg(fixture("faulty-cache.py"))
            .arg(&root)
            .arg(port.to_string())
            .spawn()
            .unwrap()
    });
    let _server = kiln_testkit::ChildGuard(child);
    let url = format!("http://127.0.0.1:{port}");
    let root_s = root.display().to_string();
    // Credentials for the cache's host, in the daemons' own configuration (`netrc-file`
    // is the daemon's in kiln).
    let netrc = root.with_extension("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login kiln password secret\n").unwrap();
    let conf = format!(
        "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command\nnetrc-file = {}\nmax-substitution-jobs = 1\n",
        netrc.display()
    );
    let (nix_out, kiln_out) = with_both_daemons_with(
        &sid,
        &base,
        Some(&conf),
        "daemon/settings-http-2.34.sh",
        &[("HTTP_URL", &url), ("HTTP_ROOT", &root_s)],
    );
    remove_tree(&root);
    let _ = std::fs::remove_file(&netrc);
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert_eq!(n.len(), 18, "the cases did not run: {nix_out}");
    // The settings act (with nix-daemon, first): one attempt fails, five get through;
    assert!(
        n[1].1.starts_with("cached not valid") && n[3].1.starts_with("cached valid"),
        "{nix_out}"
    );
    // a stalled download is given up after the client's 2 s, not the default 300 s.
    assert!(n[4].1.starts_with("gave up within 30 s"), "{nix_out}");
    // The netrc's credentials open the cache that wants them, not one that wants others.
    assert!(
        n[13].1.starts_with("signed valid") && n[15].1.starts_with("signed not valid"),
        "{nix_out}"
    );
    // One substitution at a time, as the daemons' configuration says.
    assert!(n[17].1.starts_with("1\n"), "{nix_out}");
    assert_same_steps(&n, &k, "cases");
}

/// The steps (and the whole outputs) of `script` run through nix-daemon 2.34 and through
/// kiln with the sandbox on, the host's `/bin /usr /lib /lib64` as sandbox paths and
/// `more` in nix.conf, on fresh stores under `/tmp/kiln-NAME-234-PID`; `None`, said, where
/// there is no sid root or no sandbox.
#[allow(clippy::type_complexity)]
fn sandboxed_with_both(
    test: &str,
    name: &str,
    more: &str,
    script: &str,
) -> Option<(Vec<(String, String)>, Vec<(String, String)>, String, String)> {
    let sid = SidNix::or_skip(test)?;
    if let Err(e) = kiln_sandbox::supported() {
        eprintln!("{test}: skipped, no sandbox here: {e}");
        return None;
    }
    let base = std::env::temp_dir().join(format!("kiln-{name}-234-{}", std::process::id()));
    let conf = format!(
        "substituters =\nsandbox = true\nsandbox-paths = /bin /usr /lib /lib64 /etc/ld.so.cache?\nbuild-users-group =\n{more}"
    );
    let (nix_out, kiln_out) = with_both_daemons(&sid, &base, Some(&conf), script);
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    Some((n, k, nix_out, kiln_out))
}

/// Sandboxed builds (`tests/fixtures/sandbox-probe.nix`, run by `daemon/sandbox-2.34.sh`)
/// through nix-daemon 2.34 and through kiln, both with the sandbox on and the host's
/// `/bin /usr /lib /lib64` as sandbox paths: what a builder sees (ids and their names,
/// host name, build directory, the root and `/etc`, `/dev`, `/tmp`, mount points, network
/// interfaces, limits), what a fixed-output build sees, and the refusals, compared.
#[test]
fn nix_2_34_sandboxed_builders_see_what_nix_daemon_shows_them() {
    let Some((n, k, nix_out, kiln_out)) = sandboxed_with_both(
        "nix_2_34_sandboxed_builders_see_what_nix_daemon_shows_them",
        "sandbox",
        "experimental-features = nix-command\n",
        "daemon/sandbox-2.34.sh",
    ) else {
        return;
    };
    assert_eq!(n.len(), 6, "the probes did not run: {nix_out}");
    assert_eq!(
        k.len(),
        n.len(),
        "kiln's probes did not all run: {kiln_out}"
    );
    assert!(
        n[0].1.contains("hostname: localhost") && n[0].1.contains("exit=0"),
        "{nix_out}"
    );
    // `ssl-cert-file`: nix-daemon shows the given file where Nix puts the bundle.
    assert!(n[4].1.contains("kiln test bundle"), "{nix_out}");
    assert!(!n[5].1.contains("kiln test bundle"), "{nix_out}");
    assert_same_steps(&n, &k, "probes");
}

/// Git hashing (`tests/fixtures/daemon/git-hashing-2.34.sh`, experimental `git-hashing` on):
/// `nix store add --mode git` of a tree and a file with SHA-1 and SHA-256, the recorded
/// content address, verification, a `file://` cache both ways, and fixed-output derivations
/// hashed the Git way (right, wrong, referring to a store path), through nix-daemon 2.34
/// and through kiln on identical fresh stores at one path.
#[test]
fn nix_2_34_git_hashing_is_what_nix_daemon_does() {
    let Some(sid) = SidNix::or_skip("nix_2_34_git_hashing_is_what_nix_daemon_does") else {
        return;
    };
    let base = std::env::temp_dir().join(format!("kiln-git-234-{}", std::process::id()));
    let conf = "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command git-hashing\n";
    let (nix_out, kiln_out) =
        with_both_daemons(&sid, &base, Some(conf), "daemon/git-hashing-2.34.sh");
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert_eq!(n.len(), 17, "the steps did not all run: {nix_out}");
    // The tree's SHA-1 object id as Git gives it, as the content address nix-daemon keeps.
    assert!(
        n.iter().any(|(h, b)| h.starts_with("info")
            && b.contains("\"method\": \"git\"")
            && b.contains("exit=0")),
        "{nix_out}"
    );
    assert!(
        n.iter()
            .any(|(h, b)| h.contains("-A wrong") && b.contains("hash mismatch")),
        "{nix_out}"
    );
    assert_same_steps(&n, &k, "steps");
}

/// Derivations that make derivations (`tests/fixtures/daemon/dyn-drv-2.34.sh`,
/// experimental `dynamic-derivations` and `ca-derivations` on): a text-hashed floating
/// output that is a `.drv` (its path the `.drv`'s own), `nix build 'drv^out^out'`, a
/// producer that fails and one that makes no derivation, and text outputs that are not
/// single files or name themselves, through nix-daemon 2.34 and through kiln on identical
/// fresh stores at one path.
#[test]
fn nix_2_34_dynamic_derivations_are_what_nix_daemon_does() {
    let Some(sid) = SidNix::or_skip("nix_2_34_dynamic_derivations_are_what_nix_daemon_does") else {
        return;
    };
    let base = std::env::temp_dir().join(format!("kiln-dyn-234-{}", std::process::id()));
    let conf = "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command ca-derivations dynamic-derivations\n";
    let (nix_out, kiln_out) = with_both_daemons(&sid, &base, Some(conf), "daemon/dyn-drv-2.34.sh");
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert_eq!(n.len(), 13, "the steps did not all run: {nix_out}");
    // A producer whose output is no derivation: both name the output they could not parse
    // and fail. The rest differs on purpose: parsers word their complaints their own way,
    // and nix-daemon ends the request with the parser's error where kiln reports it as the
    // producer's failure and adds that the derivation could not be obtained.
    let parser_words = |steps: Vec<(String, String)>| -> Vec<(String, String)> {
        steps
            .into_iter()
            .map(|(h, b)| {
                let parse = b
                    .lines()
                    .find(|l| l.starts_with("error: error parsing derivation '"))
                    .and_then(|l| l.split_once("': "));
                match parse {
                    Some((head, _)) => {
                        let exit = b.lines().last().unwrap_or_default();
                        (h, format!("{head}': …\n{exit}"))
                    }
                    None => (h, b),
                }
            })
            .collect()
    };
    let (n, k) = (parser_words(n), parser_words(k));
    assert!(
        n.iter()
            .any(|(_, b)| b.starts_with("error: error parsing derivation") && b.ends_with("exit=1")),
        "{nix_out}"
    );
    assert!(
        n.iter()
            .any(|(h, b)| h == "made" && b.contains("the .drv's own path")),
        "{nix_out}"
    );
    assert!(
        n.iter()
            .any(|(h, b)| h.contains("-A failingWrapper")
                && b.contains("build of resolved derivation")),
        "{nix_out}"
    );
    assert!(
        n.iter()
            .any(|(h, b)| h.starts_with("sh -c head") && b.starts_with("DrvWithVersion(")),
        "{nix_out}"
    );
    assert_same_steps(&n, &k, "steps");
}

/// Floating content-addressed outputs fetched from a `file://` cache by their realisations
/// (`tests/fixtures/daemon/ca-cache-2.34.sh`, experimental `ca-derivations` on): what
/// `--dry-run` says would be fetched, what is fetched instead of built, and only the output
/// asked for of a derivation whose resolved derivation the cache knows, through nix-daemon
/// 2.34 and through kiln on identical fresh stores at one path.
#[test]
fn nix_2_34_realisations_come_from_caches_as_with_nix_daemon() {
    let Some(sid) = SidNix::or_skip("nix_2_34_realisations_come_from_caches_as_with_nix_daemon")
    else {
        return;
    };
    let base = std::env::temp_dir().join(format!("kiln-ca-cache-234-{}", std::process::id()));
    let conf = "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command ca-derivations\n";
    let (nix_out, kiln_out) = with_both_daemons(&sid, &base, Some(conf), "daemon/ca-cache-2.34.sh");
    let (n, k) = (scenario_steps(&nix_out), scenario_steps(&kiln_out));
    assert_eq!(n.len(), 11, "the steps did not all run: {nix_out}");
    assert!(
        n.iter().any(|(h, b)| h.contains("--dry-run")
            && b.contains("will be fetched")
            && !b.contains("will be built")),
        "{nix_out}"
    );
    assert!(n[8].1.ends_with("-ca-dependent\nexit=0\n"), "{nix_out}");
    // The one difference, on purpose: nix-daemon 2.34 lets `--check` of a floating output
    // that came out different pass (and hands out the new path); kiln compares the path the
    // contents give with the recorded realisation's and reports the difference, as
    // `--check` does for every other derivation (ARCHITECTURE.md, deviations).
    assert!(n[9].1.ends_with("-ca-random\nexit=0\n"), "{nix_out}");
    assert!(
        k[9].1.contains("may not be deterministic: output") && k[9].1.ends_with("exit=1\n"),
        "{kiln_out}"
    );
    // Input-addressed, resolving to a cached input-addressed derivation: kiln fetches only
    // the output asked for (and records no realisation for the other, whose path the
    // resolved derivation names all the same). nix-daemon 2.34 fails this request (exit
    // 1, with no message), so only kiln's answer is checked.
    let ia = &k[10].1;
    assert!(
        ia.contains("exit=0")
            && ia.contains("present: ")
            && ia.contains("-ia-multi-first")
            && !ia.contains("-ia-multi-second"),
        "{kiln_out}"
    );
    assert!(n[10].1.contains("exit=1"), "{nix_out}");
    let (n, k) = (&n[..9], &k[..9]);
    // Only the output asked for was fetched.
    let last = &n[7].1;
    assert!(
        last.contains("present: ")
            && last.contains("-ca-multi-first")
            && !last.contains("-ca-multi-second"),
        "{nix_out}"
    );
    assert_same_steps(n, k, "steps");
}

/// Realisations from a cache need a trusted signature when signatures are required
/// (`tests/fixtures/daemon/ca-cache-sigs-2.34.sh`, kiln only: nix-daemon 2.34 takes them
/// unsigned): kiln signs what it builds, the 2.34 client copies outputs and realisations to
/// a `file://` cache, and after a collection the build fetches them only with the key
/// trusted, and builds (here: fails, `max-jobs = 0`) otherwise.
#[test]
fn nix_2_34_realisations_from_caches_need_a_trusted_signature() {
    let Some(sid) = SidNix::or_skip("nix_2_34_realisations_from_caches_need_a_trusted_signature")
    else {
        return;
    };
    let base = std::env::temp_dir().join(format!("kiln-ca-sigs-234-{}", std::process::id()));
    let env = NixEnv::at(&base);
    let key = base.join("key.sec");
    let secret = run_ok(
        with_env(sid.cmd("nix"), &env)
            .args(["--extra-experimental-features", "nix-command"])
            .args(["key", "generate-secret", "--key-name", "kiln-test-1"]),
    );
    std::fs::write(&key, &secret).unwrap();
    let public = kiln_format::signature::SecretKey::parse(&secret)
        .unwrap()
        .public()
        .to_string();
    std::fs::write(
        env.nix_conf(),
        format!(
            "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command ca-derivations\nsecret-key-files = {}\n",
            key.display()
        ),
    )
    .unwrap();
    let d = kiln_daemon(&env);
    std::fs::create_dir_all(base.join("work")).unwrap();
    std::fs::write(base.join("work/trusted-key.pub"), &public).unwrap();
    let out = run_script(
        &sid,
        &env,
        &d,
        &base.join("work"),
        "daemon/ca-cache-sigs-2.34.sh",
    );
    drop(d);
    remove_tree(&base);
    let steps = scenario_steps(&out);
    assert_eq!(steps.len(), 5, "{out}");
    // Signed when built (path and realisation).
    assert!(
        steps[1].1.starts_with("1\n") && steps[1].1.ends_with("exit=0\n"),
        "{out}"
    );
    assert!(steps[2].1.ends_with("exit=0\n"), "{out}");
    // No trusted key: the realisations are refused, so the outputs would be built.
    let untrusted = &steps[3].1;
    assert!(
        untrusted.contains("is not signed by any of the keys")
            && untrusted.contains("will be built")
            && untrusted.contains("error: Cannot build"),
        "{out}"
    );
    // The key trusted: fetched, nothing built.
    let trusted = &steps[4].1;
    assert!(
        trusted.contains("will be fetched")
            && !trusted.contains("will be built")
            && trusted.contains("-ca-dependent\n"),
        "{out}"
    );
}

/// The fixture `script` run against nix-daemon 2.34 and then against kiln, each on a fresh
/// store at `base` (with `conf` as its `nix.conf`, if given): what it printed with each.
fn with_both_daemons(
    sid: &SidNix,
    base: &Path,
    conf: Option<&str>,
    script: &str,
) -> (String, String) {
    with_both_daemons_with(sid, base, conf, script, &[])
}

/// [`with_both_daemons`] with `vars` in the script's environment.
fn with_both_daemons_with(
    sid: &SidNix,
    base: &Path,
    conf: Option<&str>,
    script: &str,
    vars: &[(&str, &str)],
) -> (String, String) {
    let run = |kiln: bool| {
        let env = NixEnv::at(base);
        if let Some(conf) = conf {
            std::fs::write(env.nix_conf(), conf).unwrap();
        }
        let d = either_daemon(sid, &env, kiln);
        let out = run_script_with(sid, &env, &d, &base.join("work"), script, vars);
        drop(d);
        remove_tree(base);
        out
    };
    (run(false), run(true))
}

/// Fails with every step whose output differs between nix-daemon 2.34's run (`n`) and
/// kiln's (`k`), both of the same steps.
fn assert_same_steps(n: &[(String, String)], k: &[(String, String)], what: &str) {
    assert_eq!(n.len(), k.len(), "different numbers of {what}");
    let diffs: Vec<String> = n
        .iter()
        .zip(k.iter())
        .filter(|(a, b)| a != b)
        .map(|((h, bn), (_, bk))| format!("--- {h}\nnix-daemon 2.34:\n{bn}kiln:\n{bk}"))
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} {what} differ:\n{}",
        diffs.len(),
        n.len(),
        diffs.join("\n")
    );
}

/// What a Nix 2.34 client's progress display is made of, from `--log-format
/// internal-json -v`, with ids, timings and repetitions aside: the activities started
/// (type, level, text, fields), the kinds of result each type of activity got, and the last
/// `Progress` of the `Builds` activity (what "[4/4 built]" shows).
fn progress_shape(stderr: &str) -> String {
    use std::collections::{BTreeMap, BTreeSet};
    let mut types: BTreeMap<u64, u64> = BTreeMap::new();
    let mut started: Vec<String> = Vec::new();
    let mut results: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut builds_last = String::new();
    let mut stopped = 0;
    for line in stderr.lines() {
        let Some(json) = line.strip_prefix("@nix ") else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        match v["action"].as_str().unwrap() {
            "start" => {
                let t = v["type"].as_u64().unwrap();
                types.insert(v["id"].as_u64().unwrap(), t);
                started.push(format!(
                    "start type {t} level {} {:?} {}",
                    v["level"], v["text"], v["fields"]
                ));
            }
            "stop" => stopped += 1,
            "result" => {
                let t = types[&v["id"].as_u64().unwrap()];
                let r = v["type"].as_u64().unwrap();
                results.insert((t, r));
                if t == 104 && r == 105 {
                    builds_last = v["fields"].to_string();
                }
            }
            _ => {}
        }
    }
    // Every activity ends.
    assert_eq!(stopped, started.len(), "{stderr}");
    // nix-daemon 2.34 looks for missing paths a second time inside its build (priming a
    // cache), so it shows that activity twice: each distinct activity counts once.
    started.sort();
    started.dedup();
    format!(
        "{}\nresults (activity type, result type): {results:?}\nlast Builds progress (done, expected, running, failed): {builds_last}\n",
        started.join("\n")
    )
}

/// Fails unless two [`progress_shape`]s agree, their last `Builds` progress aside (the
/// callers compare or ignore the counters on their own).
fn assert_same_shape_but_counts(kiln: &str, nix: &str) {
    let strip = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("last Builds progress"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        strip(kiln),
        strip(nix),
        "kiln:\n{kiln}\nnix-daemon 2.34:\n{nix}"
    );
}

#[test]
fn nix_2_34_progress_is_what_nix_daemon_sends() {
    let Some(sid) = SidNix::or_skip("nix_2_34_progress_is_what_nix_daemon_sends") else {
        return;
    };
    let base = std::env::temp_dir().join(format!("kiln-progress-234-{}", std::process::id()));
    let file = fixture("build.nix");
    let run = |kiln: bool| {
        let env = NixEnv::at(&base);
        let d = either_daemon(&sid, &env, kiln);
        let (_, err) = nix_ok(
            &sid,
            &env,
            &d,
            &[
                "build",
                "-f",
                file.to_str().unwrap(),
                "top",
                "--no-link",
                "--log-format",
                "internal-json",
                "-v",
            ],
        );
        drop(d);
        progress_shape(&err)
    };
    let nix = run(false);
    let kiln = run(true);
    remove_tree(&base);
    assert!(nix.contains("start type 104"), "{nix}");
    // The counters' last word agrees on what was built; nix-daemon 2.34's "expected" counts
    // some derivations twice (5 for these 4), kiln's does not.
    let done = |s: &str| {
        s.lines()
            .find_map(|l| {
                l.strip_prefix("last Builds progress (done, expected, running, failed): ")
            })
            .map(|f| {
                let v: Vec<u64> = serde_json::from_str(f).unwrap();
                (v[0], v[2], v[3])
            })
    };
    assert_eq!(
        done(&kiln),
        done(&nix),
        "kiln:\n{kiln}\nnix-daemon 2.34:\n{nix}"
    );
    assert_eq!(done(&nix), Some((4, 0, 0)));
    assert_same_shape_but_counts(&kiln, &nix);
}

/// `json-log-path` (in the daemons' own configuration): the same `nix build` as above, and
/// what each daemon wrote to the file (Nix's JSON log objects, a line each, without the
/// `@nix ` prefix) shows the same activities and results as nix-daemon 2.34's.
#[test]
fn nix_2_34_json_log_path_gets_what_nix_daemon_writes() {
    let Some(sid) = SidNix::or_skip("nix_2_34_json_log_path_gets_what_nix_daemon_writes") else {
        return;
    };
    let base = std::env::temp_dir().join(format!("kiln-json-log-234-{}", std::process::id()));
    let file = fixture("build.nix");
    let run = |kiln: bool| {
        let log = std::env::temp_dir().join(format!(
            "kiln-json-log-234-{}-{kiln}.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&log);
        let env = NixEnv::at(&base);
        std::fs::write(
            env.nix_conf(),
            format!(
                "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command\njson-log-path = {}\n",
                log.display()
            ),
        )
        .unwrap();
        let d = either_daemon(&sid, &env, kiln);
        nix_ok(
            &sid,
            &env,
            &d,
            &["build", "-f", file.to_str().unwrap(), "top", "--no-link"],
        );
        drop(d);
        remove_tree(&base);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        // Each line one object, as `--log-format internal-json` prints them after `@nix `.
        // kiln also writes its own build events there (objects with an `event`, not an
        // `action`: docs/build-events.md); they are left out of the comparison.
        let prefixed: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .map(|v| v.get("action").is_some())
                    .unwrap_or(true)
            })
            .map(|l| format!("@nix {l}\n"))
            .collect();
        progress_shape(&prefixed)
    };
    let nix = run(false);
    let kiln = run(true);
    assert!(nix.contains("start type 105"), "{nix}");
    assert_same_shape_but_counts(&kiln, &nix);
}

/// Substitution progress: the same `nix build` of paths that a `file://` cache has, through
/// nix-daemon 2.34 and through kiln, shows the same activities (the cache's queries,
/// substitute, copy path) and the same kinds of results.
#[test]
fn nix_2_34_substitution_progress_is_what_nix_daemon_sends() {
    substitution_progress(
        "nix_2_34_substitution_progress_is_what_nix_daemon_sends",
        false,
    );
}

/// The same from a cache served over HTTP (Python's `http.server`): the downloads are
/// `FileTransfer` activities with their bytes as progress.
#[test]
fn nix_2_34_http_substitution_progress_is_what_nix_daemon_sends() {
    substitution_progress(
        "nix_2_34_http_substitution_progress_is_what_nix_daemon_sends",
        true,
    );
}

fn substitution_progress(test: &str, http: bool) {
    let Some(sid) = SidNix::or_skip(test) else {
        return;
    };
    let tag = if http { "http" } else { "file" };
    let base = std::env::temp_dir().join(format!("kiln-subst-234-{tag}-{}", std::process::id()));
    let cache =
        std::env::temp_dir().join(format!("kiln-subst-234-{tag}-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let nix = |env: &NixEnv, d: &DaemonProcess, args: &[&str]| nix_ok(&sid, env, d, args);
    let file = fixture("build.nix");
    let file = file.to_str().unwrap();
    // The cache, made once by nix-daemon 2.34.
    {
        let env = NixEnv::at(&base);
        let d = nix_daemon(&sid, &env);
        let (top, _) = nix(
            &env,
            &d,
            &["build", "-f", file, "top", "--no-link", "--print-out-paths"],
        );
        let to = format!("file://{}", cache.display());
        nix(&env, &d, &["copy", "--to", &to, top.trim()]);
    }
    let server = http.then(|| {
        let (child, port) = kiln_testkit::serve_on_free_port(|port| {
            Command::new("python3")
                .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
                .arg(&cache)
                .arg(port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        });
        (kiln_testkit::ChildGuard(child), port)
    });
    let run = |kiln: bool| {
        let env = NixEnv::at(&base);
        // The cache is unsigned (nix-daemon 2.34 does not take `require-sigs` from clients).
        let conf = std::fs::read_to_string(env.nix_conf()).unwrap();
        std::fs::write(env.nix_conf(), format!("{conf}require-sigs = false\n")).unwrap();
        let d = either_daemon(&sid, &env, kiln);
        let from = match &server {
            Some((_, port)) => format!("http://127.0.0.1:{port}"),
            None => format!("file://{}", cache.display()),
        };
        let (_, err) = nix(
            &env,
            &d,
            &[
                "build",
                "-f",
                file,
                "top",
                "--no-link",
                "--substituters",
                &from,
                "--log-format",
                "internal-json",
                "-v",
            ],
        );
        drop(d);
        progress_shape(&err)
    };
    // Not compared: nix-daemon 2.34 also shows its fetches of `nix-cache-info` and of each
    // `.narinfo` as `FileTransfer` activities. kiln shows only the NARs' downloads (its
    // cache information and narinfo lookups are shared by all clients, behind the
    // "querying info" activities both show).
    let lookups = |shape: String| -> String {
        shape
            .lines()
            .filter(|l| {
                !(l.starts_with("start type 101 ")
                    && (l.contains(".narinfo'") || l.contains("/nix-cache-info'")))
            })
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let nix_shape = lookups(run(false));
    let kiln_shape = lookups(run(true));
    drop(server);
    remove_tree(&base);
    let _ = std::fs::remove_dir_all(&cache);
    assert!(nix_shape.contains("start type 108"), "{nix_shape}");
    if http {
        assert!(nix_shape.contains("start type 101"), "{nix_shape}");
    }
    assert_eq!(
        kiln_shape, nix_shape,
        "kiln:\n{kiln_shape}\nnix-daemon 2.34:\n{nix_shape}"
    );
}
