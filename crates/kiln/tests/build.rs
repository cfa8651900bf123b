//! The build engine through `kiln build`: real child processes, real store.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct T {
    dir: tempfile::TempDir,
}

impl T {
    fn new() -> Self {
        T {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn p(&self) -> &Path {
        self.dir.path()
    }
    fn kiln(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--store-dir")
            .arg(self.p().join("store"))
            .arg("--state-dir")
            .arg(self.p().join("var"));
        c.arg("--log-dir").arg(self.p().join("log")).args([
            "--option",
            "gc-runtime-roots",
            "false",
        ]);
        c.args(["--option", "sandbox", "false"])
            .env_remove("KILN_CONFIG")
            .current_dir(self.p());
        c
    }
    fn recipe(&self, name: &str, text: &str) -> PathBuf {
        let f = self.p().join(name);
        std::fs::write(&f, text).unwrap();
        f
    }
    fn build(&self, recipe: &Path, extra: &[&str]) -> Output {
        let mut c = self.kiln();
        c.arg("build").arg(recipe).args(extra);
        c.output().unwrap()
    }
    /// `kiln log` of the derivation that built `path`.
    fn log_of(&self, path: &Path) -> String {
        let o = self.kiln().arg("log").arg(path).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn store_path(&self, out: &Output, name: &str) -> PathBuf {
        let s = String::from_utf8_lossy(&out.stdout);
        let line = s
            .lines()
            .find(|l| l.ends_with(&format!("-{name}")))
            .unwrap_or_else(|| panic!("no output for {name} in {s}"));
        PathBuf::from(line)
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const SH: &str = "builder = \"/bin/sh\"\nenv = { PATH = \"/bin:/usr/bin\" }\n";

#[test]
fn dependency_failure_with_and_without_keep_going() {
    let t = T::new();
    let r = t.recipe(
        "r.toml",
        &format!(
            "[derivations.bad]\n{SH}args = [\"-c\", \"echo failing; exit 1\"]\n\
             [derivations.needs-bad]\n{SH}args = [\"-c\", \"echo ${{bad}} > $out\"]\n\
             [derivations.slow]\n{SH}args = [\"-c\", \"sleep 2; echo ok > $out\"]\n"
        ),
    );
    let o = t.build(&r, &["-j", "2"]);
    assert_eq!(o.status.code(), Some(100), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("builder for") && stderr(&o).contains("failed with exit code 1"),
        "{}",
        stderr(&o)
    );
    // Without keep-going the slow build was cancelled: its output is not there.
    assert!(String::from_utf8_lossy(&o.stdout).is_empty());
    let o = t.build(&r, &["-j", "2", "--keep-going"]);
    assert_eq!(o.status.code(), Some(100));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.lines().any(|l| l.ends_with("-slow")),
        "keep-going builds the independent one: {out}"
    );
    assert!(stderr(&o).contains("failed to build"), "{}", stderr(&o));
}

#[test]
fn two_processes_racing_build_once() {
    let t = T::new();
    let counter = t.p().join("count");
    let r = t.recipe(
        "r.toml",
        &format!("[derivations.once]\n{SH}args = [\"-c\", \"echo x >> {}; sleep 1; echo done > $out\"]\n", counter.display()),
    );
    // Both processes start on a new store: they race on creating it, on writing the .drv
    // and on building it.
    let a = {
        let mut c = t.kiln();
        c.arg("build").arg(&r);
        c.spawn().unwrap()
    };
    let b = {
        let mut c = t.kiln();
        c.arg("build").arg(&r);
        c.spawn().unwrap()
    };
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success());
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap(),
        "x\n",
        "built more than once"
    );
}

#[test]
fn fixed_output_hash_check() {
    let t = T::new();
    // sha256 of "hello\n".
    let good = "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=";
    let bad = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let r = t.recipe("r.toml", &format!("[derivations.f]\n{SH}args = [\"-c\", \"echo hello > $out\"]\noutput-hash = \"{bad}\"\n"));
    let o = t.build(&r, &[]);
    assert_eq!(o.status.code(), Some(102), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("hash mismatch in fixed-output derivation")
            && e.contains(bad)
            && e.contains(good),
        "{e}"
    );
    let r = t.recipe("r2.toml", &format!("[derivations.f]\n{SH}args = [\"-c\", \"echo hello > $out\"]\noutput-hash = \"{good}\"\n"));
    let o = t.build(&r, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = t.store_path(&o, "f");
    let mut c = t.kiln();
    c.args(["store", "path-info", "--json"]).arg(&p);
    let info = String::from_utf8(c.output().unwrap().stdout).unwrap();
    assert!(info.contains("\"ca\":\"fixed:sha256:"), "{info}");
    // A flat fixed output must be a regular, non-executable file.
    let r = t.recipe(
        "r3.toml",
        &format!(
            "[derivations.f-dir]\n{SH}args = [\"-c\", \"mkdir $out\"]\noutput-hash = \"{good}\"\n"
        ),
    );
    let o = t.build(&r, &[]);
    assert!(
        stderr(&o).contains("should be a non-executable regular file"),
        "{}",
        stderr(&o)
    );
}

/// No process whose command line holds `marker` is left (killed processes may take a
/// moment to be gone: up to 10 s is allowed).
fn no_process_left(marker: &str) {
    let start = std::time::Instant::now();
    loop {
        let o = Command::new("pgrep").args(["-f", marker]).output().unwrap();
        if o.stdout.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "processes left behind: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A background process whose command line holds `marker`, for [`no_process_left`]: a
/// shell (named `marker`) that stays to wait for its `sleep`. (`sleep 1000 MARKER` would
/// not do: `sleep` refuses the extra word and exits at once.)
fn lingering(marker: &str) -> String {
    format!("sh -c 'sleep 1000; :' {marker} &")
}

#[test]
fn silence_timeout_and_log_limits_kill_everything() {
    let t = T::new();
    let m1 = format!("kiln-test-silent-{}", std::process::id());
    let r = t.recipe(
        "a.toml",
        &format!(
            "[derivations.silent]\n{SH}args = [\"-c\", \"{} echo started; sleep 1000\"]\n",
            lingering(&m1)
        ),
    );
    let o = t.build(&r, &["--max-silent-time", "1"]);
    assert_eq!(o.status.code(), Some(101), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("timed out after 1 seconds of silence"),
        "{}",
        stderr(&o)
    );
    no_process_left(&m1);

    let m2 = format!("kiln-test-timeout-{}", std::process::id());
    let r = t.recipe("b.toml", &format!("[derivations.chatty]\n{SH}args = [\"-c\", \"{} while true; do echo tick; sleep 0.2; done\"]\n", lingering(&m2)));
    let o = t.build(&r, &["--timeout", "1"]);
    assert_eq!(o.status.code(), Some(101), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("timed out after 1 seconds"),
        "{}",
        stderr(&o)
    );
    no_process_left(&m2);

    let m3 = format!("kiln-test-log-{}", std::process::id());
    let r = t.recipe("c.toml", &format!("[derivations.loud]\n{SH}args = [\"-c\", \"{} while true; do echo 0123456789; done\"]\n", lingering(&m3)));
    let o = t.build(&r, &["--option", "max-log-size", "1000"]);
    // Nix 2.8 reports LogLimitExceeded with exit status 1.
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("killed after writing more than 1000 bytes of log output"),
        "{}",
        stderr(&o)
    );
    no_process_left(&m3);
}

#[test]
fn nondeterminism_is_caught_by_rounds_and_check() {
    let t = T::new();
    let r = t.recipe("r.toml", &format!("[derivations.random]\n{SH}args = [\"-c\", \"head -c 16 /dev/urandom | od -x > $out\"]\n"));
    let o = t.build(&r, &["--rounds", "2"]);
    assert_eq!(o.status.code(), Some(104), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("differs from previous round"),
        "{}",
        stderr(&o)
    );
    let o = t.build(&r, &[]);
    assert!(o.status.success());
    let p = t.store_path(&o, "random");
    let o = t.build(&r, &["--check"]);
    assert_eq!(o.status.code(), Some(104), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("may not be deterministic"),
        "{}",
        stderr(&o)
    );
    // kiln's own report of what differs, in the derivation's log.
    let log = t.log_of(&p);
    assert!(
        log.contains(&format!(
            "kiln: --check: output '{}' differs from the valid one:",
            p.display()
        )),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.starts_with("  (the output itself): first difference at byte ")),
        "{log}"
    );
    let o = t.build(&r, &["--check", "--keep-failed"]);
    assert_eq!(o.status.code(), Some(104));
    let check = PathBuf::from(format!("{}.check", p.display()));
    assert!(check.exists(), "{} kept: {}", check.display(), stderr(&o));
    assert!(stderr(&o).contains(&check.display().to_string()));
    // With run-diff-hook, the diff hook sees the previous and the new output and the
    // derivation (and the new output is kept for it, --keep-failed or not).
    let hook = t.dir.path().join("diff-hook");
    let seen = t.dir.path().join("diff-hook-saw");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$1 $2 $3\" > {}\n", seen.display()),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let _ = std::fs::remove_dir_all(&check);
    let h = hook.to_str().unwrap();
    let o = t.build(
        &r,
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
    assert_eq!(o.status.code(), Some(104), "{}", stderr(&o));
    let saw = std::fs::read_to_string(&seen).unwrap();
    let args: Vec<&str> = saw.split_whitespace().collect();
    assert_eq!(args[0], p.display().to_string(), "{saw}");
    assert_eq!(args[1], check.display().to_string(), "{saw}");
    assert!(args[2].ends_with("-random.drv"), "{saw}");
    assert!(check.exists());
    // Without run-diff-hook, the hook does not run.
    std::fs::remove_file(&seen).unwrap();
    let o = t.build(&r, &["--check", "--option", "diff-hook", h]);
    assert_eq!(o.status.code(), Some(104));
    assert!(!seen.exists());
    // The valid output is untouched by --check.
    let mut c = t.kiln();
    c.args(["store", "verify", "--check-contents"]);
    assert!(c.output().unwrap().status.success());
    // A deterministic build passes --check and --rounds.
    let r = t.recipe(
        "d.toml",
        &format!("[derivations.det]\n{SH}args = [\"-c\", \"echo same > $out\"]\n"),
    );
    assert!(t.build(&r, &["--rounds", "3"]).status.success());
    assert!(t.build(&r, &["--check"]).status.success());
}

#[test]
fn reference_restrictions() {
    let t = T::new();
    let base = format!(
        "[derivations.dep]\n{SH}args = [\"-c\", \"echo dep > $out\"]\n\
         [derivations.mid]\n{SH}args = [\"-c\", \"echo ${{dep}} > $out\"]\n"
    );
    let case = |attrs: &str| {
        let r = t.recipe("r.toml", &format!("{base}[derivations.top]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo ${{mid}} > $out\"]\nenv = {{ PATH = \"/bin:/usr/bin\", {attrs} }}\n"));
        t.build(&r, &["-A", "top"])
    };
    assert!(case("allowedReferences = \"${mid}\"").status.success());
    let o = case("allowedReferences = \"\"");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is not allowed to refer to the following paths:"),
        "{}",
        stderr(&o)
    );
    let o = case("disallowedReferences = \"${mid}\"");
    assert!(
        stderr(&o).contains("is not allowed to refer to the following paths:"),
        "{}",
        stderr(&o)
    );
    // Requisites are transitive: `dep` is reached through `mid`.
    let o = case("disallowedRequisites = \"${dep}\"");
    assert!(
        stderr(&o).contains("is not allowed to refer to the following paths:"),
        "{}",
        stderr(&o)
    );
    assert!(case("allowedRequisites = \"${mid} ${dep}\"")
        .status
        .success());
    let o = case("allowedRequisites = \"${mid}\"");
    assert!(!o.status.success());
    // An output name as specifier.
    assert!(case("allowedReferences = \"out ${mid}\"").status.success());
}

#[test]
fn export_references_graph_contents() {
    let t = T::new();
    let r = t.recipe(
        "r.toml",
        &format!(
            "[derivations.dep]\n{SH}args = [\"-c\", \"echo dep > $out\"]\n\
             [derivations.mid]\n{SH}args = [\"-c\", \"echo ${{dep}} > $out\"]\n\
             [derivations.top]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"cp graph $out\"]\nenv = {{ PATH = \"/bin:/usr/bin\", exportReferencesGraph = \"graph ${{mid}}\" }}\n"
        ),
    );
    let o = t.build(&r, &["-A", "mid", "-A", "dep", "-A", "top"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (dep, mid, top) = (
        t.store_path(&o, "dep"),
        t.store_path(&o, "mid"),
        t.store_path(&o, "top"),
    );
    let got = std::fs::read_to_string(top).unwrap();
    // One entry per path of the closure, in store-path order, as Nix writes it.
    let dep_entry = format!("{}\n\n0\n", dep.display());
    let mid_entry = format!("{}\n\n1\n{}\n", mid.display(), dep.display());
    let base = |p: &PathBuf| p.file_name().unwrap().to_owned();
    let want = if base(&dep) < base(&mid) {
        format!("{dep_entry}{mid_entry}")
    } else {
        format!("{mid_entry}{dep_entry}")
    };
    assert_eq!(got, want);
}

#[test]
fn keep_failed_keeps_a_safe_build_directory() {
    let t = T::new();
    let r = t.recipe("r.toml", &format!("[derivations.fail]\n{SH}args = [\"-c\", \"echo evidence > here; chmod 4755 here; exit 3\"]\n"));
    let o = t.build(&r, &["--keep-failed"]);
    assert_eq!(o.status.code(), Some(100));
    let e = stderr(&o);
    let kept = e
        .lines()
        .find_map(|l| l.strip_prefix("note: keeping build directory '"))
        .unwrap_or_else(|| panic!("{e}"));
    let kept = PathBuf::from(kept.trim_end_matches('\''));
    let f = kept.join("here");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "evidence\n");
    let m = std::fs::metadata(&f).unwrap();
    assert_eq!(
        m.mode() & 0o6000,
        0,
        "setuid bit survived in the kept directory"
    );
    assert_eq!(m.uid(), rustix::process::getuid().as_raw());
    // Without --keep-failed the build directory goes away.
    let o = t.build(&r, &[]);
    assert!(!stderr(&o).contains("keeping build directory"));
    let builds = t.p().join("var/builds");
    let left: Vec<_> = std::fs::read_dir(&builds)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| Some(p.as_path()) != kept.parent())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn wrong_system_is_refused() {
    let t = T::new();
    let r = t.recipe(
        "r.toml",
        &format!("system = \"riscv128-plan9\"\n[derivations.x]\n{SH}args = [\"-c\", \"exit 0\"]\n"),
    );
    let o = t.build(&r, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("a 'riscv128-plan9' with features {} is required to build"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn required_system_features_must_be_offered() {
    let t = T::new();
    let r = t.recipe(
        "r.toml",
        "[derivations.x]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo x > $out\"]\n\
         env = { PATH = \"/bin:/usr/bin\", requiredSystemFeatures = \"gpu big-parallel\" }\n",
    );
    // Nix's default features include big-parallel, not gpu.
    let o = t.build(&r, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("with features {big-parallel, gpu} is required to build")
            && e.contains("with features {benchmark, big-parallel,"),
        "{e}"
    );
    let o = t.build(&r, &["--option", "extra-system-features", "gpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // recursive-nix is offered only with the experimental feature, and needs a daemon.
    let r = t.recipe(
        "rec.toml",
        "[derivations.y]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo y > $out\"]\n\
         env = { PATH = \"/bin:/usr/bin\", requiredSystemFeatures = \"recursive-nix\" }\n",
    );
    let o = t.build(&r, &[]);
    assert!(
        stderr(&o).contains("with features {recursive-nix} is required to build"),
        "{}",
        stderr(&o)
    );
    let o = t.build(&r, &["--option", "experimental-features", "recursive-nix"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("only builds run by 'kiln daemon' get"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn builder_environment_is_the_references() {
    let t = T::new();
    let r = t.recipe(
        "r.toml",
        "[derivations.env]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"/usr/bin/env > $out; echo cwd=$(/bin/pwd) >> $out; /bin/cat $bigPath >> $out\"]\nenv = { FOO = \"bar\", passAsFile = \"big\", big = \"from a file\" }\n",
    );
    let o = t.build(&r, &["--cores", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(t.store_path(&o, "env")).unwrap();
    let vars: std::collections::BTreeMap<&str, &str> =
        text.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(vars["PATH"], "/path-not-set");
    assert_eq!(vars["HOME"], "/homeless-shelter");
    assert_eq!(vars["NIX_STORE"], t.p().join("store").to_str().unwrap());
    assert_eq!(vars["NIX_BUILD_CORES"], "3");
    assert_eq!(vars["FOO"], "bar");
    let top = vars["NIX_BUILD_TOP"];
    for k in ["TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD", "cwd"] {
        assert_eq!(vars[k], top, "{k}");
    }
    assert!(
        top.starts_with(t.p().join("var/builds").to_str().unwrap()),
        "build dir in the state directory: {top}"
    );
    assert!(!vars.contains_key("big"));
    assert!(text.ends_with("from a file"), "{text}");
}

#[test]
fn builtin_fetchurl_fetches_file_and_http() {
    let t = T::new();
    let src = t.p().join("payload");
    std::fs::write(&src, "hello\n").unwrap();
    let good = "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=";
    let r = t.recipe("r.toml", &format!("[derivations.fetched]\nbuilder = \"builtin:fetchurl\"\nenv = {{ url = \"file://{}\" }}\noutput-hash = \"{good}\"\n", src.display()));
    let o = t.build(&r, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(t.store_path(&o, "fetched")).unwrap(),
        "hello\n"
    );
    // Over HTTP from a server on loopback.
    let mut server = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", "0"])
        .current_dir(t.p())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line
        .split("port ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let r = t.recipe("h.toml", &format!("[derivations.fetched-http]\nbuilder = \"builtin:download\"\nenv = {{ url = \"(\\\"http://127.0.0.1:{port}/payload\\\")\" }}\noutput-hash = \"{good}\"\n"));
    let o = t.build(&r, &[]);
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A host that wants credentials: `netrc-file` gives `builtin:fetchurl` that host's entry,
/// as Nix's builtin gets it; without the file, or with an entry for another host only, the
/// download gets its 401 and the build fails.
#[test]
fn builtin_fetchurl_sends_the_hosts_netrc_credentials() {
    use std::io::{BufRead, Write};
    let t = T::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let mut r = std::io::BufReader::new(&s);
            let mut authorized = false;
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("authorization") {
                        // kiln:s3cret
                        authorized = v.trim() == "Basic a2lsbjpzM2NyZXQ=";
                    }
                }
                line.clear();
            }
            let reply: &[u8] = if authorized {
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n"
            } else {
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            let _ = (&s).write_all(reply);
        }
    });
    let good = "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=";
    let recipe = |name: &str| {
        t.recipe(
            &format!("{name}.toml"),
            &format!("[derivations.{name}]\nbuilder = \"builtin:fetchurl\"\nenv = {{ url = \"http://127.0.0.1:{port}/private\" }}\noutput-hash = \"{good}\"\n"),
        )
    };
    let netrc = t.p().join("netrc");
    let with_netrc = ["--option", "netrc-file", netrc.to_str().unwrap()];
    // No file: 401.
    let o = t.build(&recipe("none"), &with_netrc);
    assert!(!o.status.success(), "fetched without credentials");
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));
    // Another host's entry only: 401 again.
    std::fs::write(
        &netrc,
        "machine elsewhere.example login kiln password s3cret\n",
    )
    .unwrap();
    let o = t.build(&recipe("other"), &with_netrc);
    assert!(!o.status.success(), "another host's credentials were sent");
    // The attack on the hand-over: a failed fetch kept with --keep-failed must leave the
    // credentials nowhere the client can read (no file of the kept build directory, not
    // the log), since the client may be anyone allowed to build.
    std::fs::write(
        &netrc,
        "machine 127.0.0.1 login kiln password w0rngsecret\n",
    )
    .unwrap();
    let mut keep = with_netrc.to_vec();
    keep.push("--keep-failed");
    let o = t.build(&recipe("kept"), &keep);
    assert!(!o.status.success(), "fetched with a wrong password");
    let e = stderr(&o);
    assert!(!e.contains("w0rngsecret"), "{e}");
    let kept = e
        .lines()
        .find_map(|l| l.strip_prefix("note: keeping build directory '"))
        .unwrap_or_else(|| panic!("no build directory kept: {e}"));
    let kept = PathBuf::from(kept.trim_end_matches('\''));
    // Every file of the kept directory and of the log directory (the build's log).
    let mut files = 0;
    let mut dirs = vec![kept.clone(), t.p().join("log")];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files += 1;
                let bytes = std::fs::read(&p).unwrap_or_default();
                assert!(
                    !String::from_utf8_lossy(&bytes).contains("w0rngsecret"),
                    "the credentials are in {}",
                    p.display()
                );
            }
        }
    }
    assert!(files > 0, "neither a kept file nor a log to look into");
    // This host's entry: fetched.
    std::fs::write(
        &netrc,
        "machine 127.0.0.1\n  login kiln\n  password s3cret\n",
    )
    .unwrap();
    let o = t.build(&recipe("mine"), &with_netrc);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(t.store_path(&o, "mine")).unwrap(),
        "hello\n"
    );
}

#[test]
fn max_jobs_zero_and_prefer_local_build() {
    let t = T::new();
    let r = t.recipe(
        "r.toml",
        &format!("[derivations.x]\n{SH}args = [\"-c\", \"echo x > $out\"]\n"),
    );
    let o = t.build(&r, &["-j", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unable to start any build"),
        "{}",
        stderr(&o)
    );
    let r = t.recipe("l.toml", "[derivations.local]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo x > $out\"]\nenv = { preferLocalBuild = \"1\" }\n");
    assert!(t.build(&r, &["-j", "0"]).status.success());
}

#[test]
fn failure_caching() {
    let t = T::new();
    let r = t.recipe(
        "r.toml",
        &format!("[derivations.f]\n{SH}args = [\"-c\", \"exit 1\"]\n"),
    );
    let o = t.build(&r, &["--option", "cache-failures", "true"]);
    assert_eq!(o.status.code(), Some(100));
    let o = t.build(&r, &["--option", "cache-failures", "true"]);
    assert_eq!(o.status.code(), Some(100));
    assert!(
        stderr(&o).contains("failed previously (cached)"),
        "{}",
        stderr(&o)
    );
    let mut c = t.kiln();
    c.args(["store", "failed", "--clear"]);
    assert!(c.output().unwrap().status.success());
    let o = t.build(&r, &["--option", "cache-failures", "true"]);
    assert!(!stderr(&o).contains("(cached)"));
}

#[test]
fn build_log_is_written_and_readable() {
    let t = T::new();
    let r = t.recipe("r.toml", &format!("[derivations.logged]\n{SH}args = [\"-c\", \"echo to-stdout; echo to-stderr >&2; echo x > $out\"]\n"));
    let o = t.build(&r, &["-Q"]);
    assert!(o.status.success());
    assert!(!stderr(&o).contains("to-stdout"), "-Q hides the log");
    let p = t.store_path(&o, "logged");
    let mut c = t.kiln();
    c.arg("log").arg(&p);
    let log = c.output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&log.stdout),
        "to-stdout\nto-stderr\n"
    );
    // The file is where Nix looks: drvs/XX/REST.bz2.
    let found: Vec<_> = walk(&t.p().join("log/drvs"))
        .into_iter()
        .filter(|f| f.to_string_lossy().ends_with("-logged.drv.bz2"))
        .collect();
    assert_eq!(found.len(), 1);
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn json_event_stream() {
    let t = T::new();
    let r = t.recipe(
        "r.toml",
        &format!("[derivations.j]\n{SH}args = [\"-c\", \"echo hi; echo x > $out\"]\n"),
    );
    let o = t.build(&r, &["--json"]);
    assert!(o.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|v| v["event"].as_str().unwrap()).collect();
    // Announced (for progress counters), given a slot, then started.
    assert_eq!(kinds[..3], ["build-queued", "phase", "build-started"]);
    assert_eq!(lines[1]["phase"], "setup");
    assert!(kinds.contains(&"log"));
    let fin = lines
        .iter()
        .find(|v| v["event"] == "build-finished")
        .unwrap();
    assert_eq!(fin["status"], "Built");
    let res = lines.last().unwrap();
    assert_eq!(res["event"], "result");
    assert_eq!(res["exit"], 0);
}

#[test]
fn hook_accept_decline_postpone() {
    let t = T::new();
    let state = t.p().join("hook-state");
    let kiln = env!("CARGO_BIN_EXE_kiln");
    // A test agent: the first offer is postponed, drvs named *-remote* are accepted (and
    // "built" by registering the output into the same store), others declined.
    let agent = t.p().join("agent.sh");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\n[ \"$1\" = offload ] || exit 9\nwhile read local system drv features; do\n\
             if [ ! -e {state} ]; then touch {state}; echo '# postpone'; continue; fi\n\
             case \"$drv\" in *-remote*) echo '# accept'; read inputs; read outputs;\n\
               for o in $outputs; do echo built remotely > $o; printf '%s\\n\\n0\\n' $o | {kiln} --store-dir {s} --state-dir {v} --log-dir {l} store register-validity; done;\n\
               echo remote log >&2; exit 0;;\n\
             *) echo '# decline';; esac\ndone\n",
            state = state.display(),
            s = t.p().join("store").display(),
            v = t.p().join("var").display(),
            l = t.p().join("log").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let r = t.recipe(
        "r.toml",
        &format!("[derivations.remote]\n{SH}args = [\"-c\", \"echo local > $out\"]\n[derivations.here]\n{SH}args = [\"-c\", \"echo local > $out\"]\n"),
    );
    let o = t.build(&r, &["--option", "build-hook", agent.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(t.store_path(&o, "remote")).unwrap(),
        "built remotely\n"
    );
    assert_eq!(
        std::fs::read_to_string(t.store_path(&o, "here")).unwrap(),
        "local\n"
    );
    assert!(stderr(&o).contains("remote log"), "{}", stderr(&o));
    assert!(state.exists(), "the postpone happened");
}

/// The README's main job, taken from the README itself and run as written (with the built
/// binary for `cargo run`), in a fresh per-user store and a copy of `examples/`: it builds,
/// prints the one output it names, leaves `result` pointing at it, `result/bin/hello` runs,
/// and the next collection keeps it.
#[test]
fn the_readmes_main_job_builds_and_runs() {
    let root = kiln_testkit::workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.contains("# the main job"))
        .expect("the README names its main job");
    let command = line.split('#').next().unwrap().trim();
    let args = command
        .strip_prefix("cargo run --release -p kiln --")
        .expect("the main job is `cargo run --release -p kiln -- ...`");
    let home = tempfile::tempdir().unwrap();
    // A checkout of our own: the command leaves `result` in its working directory.
    let work = home.path().join("checkout");
    std::fs::create_dir_all(work.join("examples")).unwrap();
    for e in std::fs::read_dir(root.join("examples")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), work.join("examples").join(e.file_name())).unwrap();
    }
    let kiln = |args: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec \"$KILN\" {args}"))
            .env("KILN", env!("CARGO_BIN_EXE_kiln"))
            .env("HOME", home.path())
            .env("XDG_DATA_HOME", home.path().join("data"))
            .env_remove("KILN_CONFIG")
            .current_dir(&work)
            .output()
            .unwrap()
    };
    let o = kiln(args);
    assert!(o.status.success(), "{command}: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one path, the one asked for: {out}");
    let hello = lines[0];
    assert!(hello.ends_with("-hello"), "{hello}");
    let store = home.path().join("data/kiln/store");
    assert!(hello.starts_with(&*store.to_string_lossy()), "{hello}");
    assert_eq!(
        std::fs::read_link(work.join("result")).unwrap(),
        Path::new(hello)
    );
    let hello_says = |bin: &Path| {
        let run = Command::new(bin).output().unwrap();
        assert!(run.status.success());
        String::from_utf8_lossy(&run.stdout).into_owned()
    };
    const SAYS: &str = "Hello from kiln!\nKILN BUILDS WHAT YOU ASK FOR, EXACTLY.\n";
    assert_eq!(hello_says(&work.join("result/bin/hello")), SAYS);
    // `result` is a root: a collection keeps hello and what it refers to.
    let gc = kiln("store gc");
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert_eq!(hello_says(&work.join("result/bin/hello")), SAYS);
    // Without the link, the same collection removes it.
    std::fs::remove_file(work.join("result")).unwrap();
    let gc = kiln("store gc");
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert!(!Path::new(hello).exists(), "collected once unrooted");
}

#[test]
fn verify_repair_rebuilds_a_damaged_output() {
    let t = T::new();
    let r = t.recipe(
        "r.toml",
        &format!("[derivations.fixme]\n{SH}args = [\"-c\", \"echo good contents > $out\"]\n"),
    );
    let o = t.build(&r, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = t.store_path(&o, "fixme");
    let _ = Command::new("chmod").arg("u+w").arg(&p).status();
    std::fs::write(&p, "damaged\n").unwrap();
    // Found, not repaired: an error.
    let mut c = t.kiln();
    c.args(["store", "verify", "--check-contents"]);
    let v = c.output().unwrap();
    assert!(!v.status.success());
    assert!(stderr(&v).contains("was modified"), "{}", stderr(&v));
    // Repaired: no cache has it, so its derivation is built again in repair mode.
    let mut c = t.kiln();
    c.args(["store", "verify", "--check-contents", "--repair"]);
    let v = c.output().unwrap();
    assert!(v.status.success(), "{}", stderr(&v));
    assert!(
        stderr(&v).contains(&format!("repaired '{}'", p.display())),
        "{}",
        stderr(&v)
    );
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "good contents\n");
    let mut c = t.kiln();
    c.args(["store", "verify", "--check-contents"]);
    assert!(c.output().unwrap().status.success());
}

/// `result` links as nix-build names them: `result` and `result-doc` for the first
/// target's outputs, `result-2` for the second's; `-o` renames them; `--no-out-link`
/// leaves none; a recipe's `default` must name one of its derivations.
#[test]
fn result_links_are_named_as_nix_build_names_them() {
    let t = T::new();
    let r = t.recipe(
        "r.toml",
        &format!(
            "[derivations.two]\n{SH}args = [\"-c\", \"echo a > $out; echo b > $doc\"]\noutputs = [\"out\", \"doc\"]\n\
             [derivations.one]\n{SH}args = [\"-c\", \"echo c > $out\"]\n"
        ),
    );
    let o = t.build(&r, &["-A", "two", "-A", "one"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |name: &str| std::fs::read_to_string(t.p().join(name)).unwrap();
    assert_eq!(read("result"), "a\n");
    assert_eq!(read("result-doc"), "b\n");
    assert_eq!(read("result-2"), "c\n");
    let o = t.build(&r, &["-A", "one", "-o", "mine"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read("mine"), "c\n");
    std::fs::remove_file(t.p().join("result-2")).unwrap();
    let o = t.build(&r, &["-A", "one", "--no-out-link"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!t.p().join("result-2").exists() && read("result") == "a\n");
    // Each link is registered as a root under gcroots/auto.
    let auto = t.p().join("var/gcroots/auto");
    let mut roots: Vec<PathBuf> = std::fs::read_dir(&auto)
        .unwrap()
        .map(|e| std::fs::read_link(e.unwrap().path()).unwrap())
        .collect();
    roots.sort();
    assert!(roots.contains(&t.p().join("result")) && roots.contains(&t.p().join("mine")));
    let bad = t.recipe(
        "bad.toml",
        &format!("default = \"nope\"\n[derivations.one]\n{SH}args = [\"-c\", \"echo c > $out\"]\n"),
    );
    let o = t.build(&bad, &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("'default' names 'nope', which is not a derivation of the file"),
        "{}",
        stderr(&o)
    );
}

/// `--timeline`: a Chrome trace of the run that `kiln timeline summary` reads back: two
/// builds side by side in two slots, the third waiting for both, and the critical path
/// through the slower one.
#[test]
fn timeline_of_a_run_and_its_summary() {
    let t = T::new();
    let r = t.recipe(
        "r.toml",
        &format!(
            "default = \"top\"\n\
             [derivations.quick]\n{SH}args = [\"-c\", \"echo q > $out\"]\n\
             [derivations.slow]\n{SH}args = [\"-c\", \"sleep 1; echo s > $out\"]\n\
             [derivations.top]\n{SH}args = [\"-c\", \"cat ${{quick}} ${{slow}} > $out\"]\n"
        ),
    );
    let trace = t.p().join("run.trace.json");
    let o = t.build(
        &r,
        &[
            "-j",
            "2",
            "--no-out-link",
            "--timeline",
            trace.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&trace).unwrap();
    let events: Vec<serde_json::Value> = serde_json::from_str(&text).expect("a closed JSON array");
    let spans = |cat: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|e| e["ph"] == "X" && e["cat"] == cat)
            .collect()
    };
    assert_eq!(spans("build").len(), 3, "{text}");
    let slots: std::collections::BTreeSet<u64> = spans("build")
        .iter()
        .map(|e| e["tid"].as_u64().unwrap())
        .collect();
    assert_eq!(slots.len(), 2, "two slots used: {text}");
    let inputs = spans("inputs");
    assert_eq!(inputs.len(), 1, "{text}");
    assert!(inputs[0]["args"]["drv"]
        .as_str()
        .unwrap()
        .ends_with("-top.drv"));
    assert_eq!(inputs[0]["args"]["inputs"].as_array().unwrap().len(), 2);
    assert_eq!(spans("registering").len(), 3, "{text}");
    // top waited for its inputs at least as long as slow built.
    let slow = spans("build")
        .into_iter()
        .find(|e| e["args"]["drv"].as_str().unwrap().ends_with("-slow.drv"))
        .unwrap();
    // (The builder's sleep began a little before its start was reported: 0.2 s allowed
    // for a busy machine.)
    assert!(slow["dur"].as_u64().unwrap() >= 800_000, "{slow}");
    assert!(inputs[0]["dur"].as_u64().unwrap() >= slow["dur"].as_u64().unwrap());
    let mut c = t.kiln();
    let s = c
        .args(["timeline", "summary"])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", stderr(&s));
    let out = String::from_utf8_lossy(&s.stdout);
    assert!(
        out.contains(": 3 builds, 0 substitutions, 0 failed"),
        "{out}"
    );
    assert!(out.contains("this machine: 2 slots"), "{out}");
    assert!(out.contains("critical path: 2 goals"), "{out}");
    let path: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("critical path"))
        .skip(2)
        .collect();
    assert!(
        path[0].ends_with("-slow.drv") && path[1].ends_with("-top.drv"),
        "{out}"
    );
    let mut c = t.kiln();
    let j = c
        .args(["timeline", "summary", "--json"])
        .arg(&trace)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(v["builds"], 3);
    assert_eq!(v["criticalPath"].as_array().unwrap().len(), 2);
    // A file that is not a timeline is refused, naming it.
    std::fs::write(t.p().join("junk"), "{").unwrap();
    let mut c = t.kiln();
    let bad = c
        .args(["timeline", "summary"])
        .arg(t.p().join("junk"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("not a timeline"), "{}", stderr(&bad));
}

/// The live view, read off a real terminal (tmux): running builds with their elapsed time
/// and last log line and the counts while they run; builders' lines scroll above; at the
/// end only the counts and the output path remain (the status block is erased, not left
/// behind).
#[test]
fn live_view_on_a_terminal() {
    if Command::new("tmux").arg("-V").output().is_err() {
        assert!(
            std::env::var_os("KILN_REQUIRE_NIX").is_none(),
            "tmux is not installed"
        );
        eprintln!("live_view_on_a_terminal: skipped, tmux is not installed");
        return;
    }
    let t = T::new();
    let r = t.recipe(
        "live.toml",
        &format!(
            "default = \"top\"\n\
             [derivations.a]\n{SH}args = [\"-c\", \"for i in 1 2 3 4; do echo step $i of a; sleep 1; done; echo a > $out\"]\n\
             [derivations.b]\n{SH}args = [\"-c\", \"echo compiling b; sleep 3; echo b > $out\"]\n\
             [derivations.top]\n{SH}args = [\"-c\", \"cat ${{a}} ${{b}} > $out\"]\n"
        ),
    );
    let cmd = t.kiln();
    let mut line = format!("'{}'", cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        line.push_str(&format!(" '{}'", a.to_string_lossy()));
    }
    line.push_str(&format!(
        " build -j 2 --no-out-link '{}'; sleep 60",
        r.display()
    ));
    let session = format!("kiln-live-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &session])
            .args(args)
            .output()
            .unwrap()
    };
    let o = tmux(&["new-session", "-d", "-x", "100", "-y", "30", &line]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The terminal goes away with the test, passed or not.
    struct Server(String);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["-L", &self.0, "kill-server"])
                .output();
        }
    }
    let _server = Server(session.clone());
    let screen = || String::from_utf8_lossy(&tmux(&["capture-pane", "-p"]).stdout).into_owned();
    let wait_for = |what: &dyn Fn(&str) -> bool| {
        let start = std::time::Instant::now();
        loop {
            let s = screen();
            if what(&s) {
                return s;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "never shown: {s}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // Both running, one queued, and what each has said so far (the status block is drawn
    // as soon as a build starts, before its builder has printed anything: waited for).
    let status_of_a_shows_its_last_line = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("  building a ("))
            .is_some_and(|l| l.contains("): step "))
    };
    let during = wait_for(&|s| {
        s.contains("  building a (")
            && s.contains("  building b (")
            && s.contains("a> step 1 of a")
            && s.contains("b> compiling b")
            && status_of_a_shows_its_last_line(s)
    });
    assert!(
        during.contains("[0 built, 2 running, 1 queued, 0 failed]"),
        "{during}"
    );
    // The output path is printed after the final counts.
    let end = wait_for(&|s| s.lines().any(|l| l.ends_with("-top")));
    let _ = tmux(&["kill-server"]);
    assert!(
        end.contains("[3 built, 0 running, 0 queued, 0 failed]"),
        "{end}"
    );
    assert!(
        !end.contains("  building "),
        "the status block was erased: {end}"
    );
    assert_eq!(end.matches("a> step 4 of a").count(), 1, "{end}");
}
