//! guix-daemon 1.5 (Debian sid) as the oracle for what a Guix client sees: the same Guix
//! 1.5 client script (`tests/fixtures/guix/oracle.scm`) runs against guix-daemon and
//! against `kiln daemon --layout guix`, each on a fresh store at the same path, and every
//! line of their answers must agree. Both daemons and the client run with the sid root's
//! programs: guix-daemon in the root (a chroot: it builds without its own chroot there),
//! kiln here with its directory bind-mounted into the root at the same path.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_testkit::{fixture, nix_required, sid_root, BindMount, DaemonProcess};

/// The tests share the sid root (and mount a fresh `/var/guix` in it): one at a time.
static ROOT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sid_guix(test: &str) -> Option<PathBuf> {
    let root = sid_root();
    if root.join("usr/bin/guix-daemon").exists() && rustix::process::geteuid().is_root() {
        return Some(root);
    }
    assert!(
        !nix_required(),
        "{test}: KILN_REQUIRE_NIX is set but there is no sid root with Guix 1.5, or this is not root"
    );
    eprintln!("{test}: skipped, needs root and the sid root with Guix 1.5");
    None
}

/// Runs the script against the daemon listening on `socket`, returning its lines.
fn ask(root: &Path, d: &Path, socket: &Path) -> String {
    normalize(&ask_with(root, d, socket, "oracle.scm", &[]))
}

/// Runs the script `d/script` with the environment `env` against the daemon listening on
/// `socket`; what it printed.
fn ask_with(root: &Path, d: &Path, socket: &Path, script: &str, env: &[String]) -> String {
    let out = Command::new("chroot")
        .arg(root)
        .arg("env")
        .arg(format!("NIX_STORE_DIR={}", d.join("store").display()))
        .arg(format!("GUIX_DAEMON_SOCKET={}", socket.display()))
        .arg("HOME=/tmp")
        .args(env)
        .args(["guix", "repl", "--"])
        .arg(d.join(script))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "guix repl failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// What differs by nature between two daemons' traces: a build's pid, and where its log
/// directory is (guix-daemon 1.5 keeps its own, with a doubled slash); the log's file name,
/// compression included, is kept.
fn normalize(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("trace @ build-started ") {
            Some(rest) => {
                let f: Vec<&str> = rest.split(' ').collect();
                let field = |i: usize| f.get(i).copied().unwrap_or("?");
                let log = field(3).rsplit('/').next().unwrap_or("?");
                format!(
                    "trace @ build-started {} {} {} LOG/{log} PID",
                    field(0),
                    field(1),
                    field(2)
                )
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A fresh directory at `base` with an empty store and the script.
/// A database's tables (with their columns: name, type, not null, key) and indexes, one
/// per line, sorted: what two daemons' schemas can be compared by.
fn schema(db: &Path) -> String {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("opening {}: {e}", db.display()));
    let mut out = Vec::new();
    let mut q = c
        .prepare("select type, name, tbl_name from sqlite_master where name not like 'sqlite_%'")
        .unwrap();
    let items: Vec<(String, String, String)> = q
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (kind, name, table) in items {
        if kind == "table" {
            let mut cols = c.prepare(&format!("pragma table_info('{name}')")).unwrap();
            let cols: Vec<String> = cols
                .query_map([], |r| {
                    Ok(format!(
                        "{} {} {} {}",
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?.to_lowercase(),
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(5)?
                    ))
                })
                .unwrap()
                .map(Result::unwrap)
                .collect();
            out.push(format!("table {name}: {}", cols.join(", ")));
        } else {
            out.push(format!("{kind} {name} on {table}"));
        }
    }
    out.sort();
    out.join("\n")
}

fn fresh(base: &Path) {
    if base.exists() {
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(base)
            .status();
        std::fs::remove_dir_all(base).unwrap();
    }
    std::fs::create_dir_all(base.join("store")).unwrap();
    std::fs::copy(fixture("guix/oracle.scm"), base.join("oracle.scm")).unwrap();
}

#[test]
fn guix_clients_see_what_guix_daemon_1_5_would_say() {
    let test = "guix_clients_see_what_guix_daemon_1_5_would_say";
    let Some(root) = sid_guix(test) else {
        return;
    };
    let _one = ROOT.lock().unwrap_or_else(|e| e.into_inner());
    let base = std::env::temp_dir().join(format!("kiln-guix-oracle-{}", std::process::id()));
    fresh(&base);
    // No substitutes: nothing here can reach a cache.
    let guix = with_guix_daemon(&root, &base, &[], &["--no-substitutes".into()], |socket| {
        ask(&root, &base, socket)
    });
    let guix_schema = schema(&base.join("var-guix/db/db.sqlite"));
    fresh(&base);
    let kiln = {
        let socket = base.join("socket");
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(["--layout", "guix", "--store-dir"])
            .arg(base.join("store"))
            .arg("--state-dir")
            .arg(base.join("state"))
            .arg("--log-dir")
            .arg(base.join("log"))
            .args(["--option", "sandbox", "false"])
            .args(["--option", "build-users-group", ""])
            .args(["--option", "substitute", "false"])
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let daemon = DaemonProcess::start(c, socket.clone());
        let _mount = BindMount::new(&root, &base);
        let text = ask(&root, &base, &socket);
        drop(daemon);
        text
    };
    let kiln_schema = schema(&base.join("state/db/db.sqlite"));
    let _ = std::fs::remove_dir_all(&base);
    // A Guix store at a path of its own gets guix-daemon's database: the same tables,
    // columns and indexes, besides kiln's own `Kiln…` tables (what is not yet synced to
    // disk), which guix-daemon never reads.
    assert!(guix_schema.contains("table ValidPaths"), "{guix_schema}");
    let kiln_schema: String = kiln_schema
        .lines()
        .filter(|l| !l.starts_with("table Kiln"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        kiln_schema, guix_schema,
        "kiln's database:\n{kiln_schema}\nguix-daemon 1.5's:\n{guix_schema}"
    );
    assert!(guix.contains("outside-error"), "{guix}");
    assert!(guix.contains("trace @ build-failed "), "{guix}");
    assert!(guix.contains("trace @ build-succeeded "), "{guix}");
    assert_eq!(kiln, guix, "kiln:\n{kiln}\nguix-daemon 1.5:\n{guix}");
}

/// guix-daemon 1.5 in the sid root on a fresh store at `base/store` (and a fresh
/// `/var/guix`: it keeps its database there whatever `NIX_STATE_DIR` says), with `env`
/// and `args` more; what `ask` returns, given its socket.
fn with_guix_daemon(
    root: &Path,
    base: &Path,
    env: &[&str],
    args: &[String],
    ask: impl FnOnce(&Path) -> String,
) -> String {
    let _mount = BindMount::new(root, base);
    let _db = Over::new(&base.join("var-guix"), &root.join("var/guix"));
    let socket = base.join("socket");
    let mut c = Command::new("chroot");
    c.arg(root)
        .arg("env")
        .arg(format!("NIX_STORE_DIR={}", base.join("store").display()))
        .arg(format!("NIX_STATE_DIR={}", base.join("state").display()))
        .arg(format!("NIX_LOG_DIR={}", base.join("log").display()))
        .args(env)
        .args(["guix-daemon", "--disable-chroot", "--build-users-group="])
        .arg(format!("--listen={}", socket.display()))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _daemon = GuixDaemon(DaemonProcess::start_then_connect(c, socket.clone()));
    ask(&socket)
}

/// guix-daemon with its per-client workers and `guix substitute` helpers (which call
/// `setsid`), all killed when dropped — a failed assertion included — before the mounts
/// they use are taken down.
struct GuixDaemon(DaemonProcess);

impl Drop for GuixDaemon {
    fn drop(&mut self) {
        kiln_testkit::kill_tree_and_wait(self.0.child.id());
    }
}

/// A directory mounted over another for as long as this lives (a fresh `/var/guix` in the
/// root: guix-daemon keeps its database there whatever `NIX_STATE_DIR` says).
struct Over(PathBuf);

impl Over {
    fn new(dir: &Path, target: &Path) -> Over {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::create_dir_all(target).unwrap();
        let st = Command::new("mount")
            .arg("--bind")
            .arg(dir)
            .arg(target)
            .status()
            .unwrap();
        assert!(st.success(), "mounting over {}", target.display());
        Over(target.to_path_buf())
    }
}

impl Drop for Over {
    fn drop(&mut self) {
        kiln_testkit::unmount(&self.0);
    }
}

/// The traces of a substitution a client saw (`trace @ …` lines), with a download's
/// progress before its end told as `PARTIAL`: how far the first chunk goes depends on the
/// reader's buffer (Guix's is 1 KiB), and how many reports a download gets on its speed.
fn substitution_traces(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("trace @ ")) {
        let f: Vec<&str> = l.split(' ').collect();
        let line = if f.first() == Some(&"download-progress") && f.len() == 5 && f[3] != f[4] {
            format!("{} {} {} {} PARTIAL", f[0], f[1], f[2], f[3])
        } else {
            l.to_string()
        };
        if out.last() != Some(&line) {
            out.push(line);
        }
    }
    out
}

/// A substitution from an HTTP cache, as a Guix client sees it with extended build traces:
/// guix-daemon 1.5 (through Guix's own `guix substitute`) and kiln (its own cache client)
/// fetch the same 3 MB path from the same cache (`kiln serve`), on fresh stores at one path.
/// Their traces (`@ substituter-started`, `@ download-started`, `@ download-progress`,
/// `@ download-succeeded`, `@ substituter-succeeded`) must agree.
#[test]
fn guix_clients_see_substitutions_as_guix_daemon_1_5_shows_them() {
    let test = "guix_clients_see_substitutions_as_guix_daemon_1_5_shows_them";
    let Some(root) = sid_guix(test) else {
        return;
    };
    let _one = ROOT.lock().unwrap_or_else(|e| e.into_inner());
    let base = std::env::temp_dir().join(format!("kiln-guix-subst-{}", std::process::id()));
    fresh(&base);
    std::fs::copy(fixture("guix/substitute.scm"), base.join("substitute.scm")).unwrap();
    let kiln = env!("CARGO_BIN_EXE_kiln");
    // The cache: a store of its own at the same logical directory, served over HTTP.
    let cache_root = base.join("cache-root");
    let blob = base.join("blob");
    let mut x: u64 = std::process::id() as u64 | 1;
    let bytes: Vec<u8> = (0..3_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&blob, bytes).unwrap();
    let out = Command::new(kiln)
        .arg("--root")
        .arg(&cache_root)
        .arg("--store-dir")
        .arg(base.join("store"))
        .args(["store", "add"])
        .arg(&blob)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (serve, port) = kiln_testkit::serve_on_free_port(|port| {
        Command::new(kiln)
            .arg("--root")
            .arg(&cache_root)
            .arg("--store-dir")
            .arg(base.join("store"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    });
    let _serve = kiln_testkit::ChildGuard(serve);
    let url = format!("http://127.0.0.1:{port}");
    let env = [format!("SUBST_PATH={path}"), format!("CACHE_URL={url}")];
    let fresh_store = || {
        let store = base.join("store");
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(&store)
            .status();
        std::fs::remove_dir_all(&store).unwrap();
        std::fs::create_dir_all(&store).unwrap();
        for d in ["state", "log"] {
            let _ = std::fs::remove_dir_all(base.join(d));
        }
    };
    // The cache signs nothing: Guix's substituter is told to take it unsigned.
    let guix = with_guix_daemon(
        &root,
        &base,
        &["GUIX_ALLOW_UNAUTHENTICATED_SUBSTITUTES=yes"],
        &[format!("--substitute-urls={url}")],
        |socket| ask_with(&root, &base, socket, "substitute.scm", &env),
    );
    fresh_store();
    let kiln_text = {
        let socket = base.join("socket");
        let _ = std::fs::remove_file(&socket);
        let mut c = Command::new(kiln);
        c.args(["--layout", "guix", "--store-dir"])
            .arg(base.join("store"))
            .arg("--state-dir")
            .arg(base.join("state"))
            .arg("--log-dir")
            .arg(base.join("log"))
            .args(["--option", "sandbox", "false"])
            .args(["--option", "build-users-group", ""])
            .args(["--option", "substituters", &url])
            .args(["--option", "require-sigs", "false"])
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let daemon = DaemonProcess::start(c, socket.clone());
        let _mount = BindMount::new(&root, &base);
        let text = ask_with(&root, &base, &socket, "substitute.scm", &env);
        drop(daemon);
        text
    };
    drop(_serve);
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(&base)
        .status();
    let _ = std::fs::remove_dir_all(&base);
    let (g, k) = (substitution_traces(&guix), substitution_traces(&kiln_text));
    assert!(guix.contains("valid #t"), "{guix}");
    assert!(kiln_text.contains("valid #t"), "{kiln_text}");
    assert!(
        g.iter().any(|l| l.starts_with("download-started ")),
        "guix-daemon traced no download:\n{guix}"
    );
    assert_eq!(k, g, "kiln:\n{kiln_text}\nguix-daemon 1.5:\n{guix}");
    eprintln!("{test}: both traced:\n{}", g.join("\n"));
}
