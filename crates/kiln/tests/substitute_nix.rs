//! Binary caches both ways with Nix 2.8: caches Nix writes (`nix copy --to`, signed with
//! `nix-store --generate-binary-cache-key`, xz and zstd) are substituted by kiln with the
//! same NAR hashes; caches kiln writes or serves are substituted by Nix (`nix copy --from`,
//! `nix-store --realise`, `nix-build` from `kiln serve`); and a Nix client substitutes
//! through `kiln daemon`.

#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use kiln_testkit::{nix_or_skip, NixEnv};

const EXPR: &str = r#"
let
  sh = { PATH = "/bin:/usr/bin"; system = builtins.currentSystem; builder = "/bin/sh"; };
  src = builtins.toFile "src.txt" "a source file\n";
  dep = derivation (sh // { name = "dep"; args = [ "-c" "echo dependency > $out" ]; });
in derivation (sh // {
  name = "top";
  args = [ "-c" "mkdir $out; echo ${dep} > $out/ref; cp ${src} $out/src; echo ${src} > $out/srcref; seq 1 50000 > $out/big; ln -s ref $out/link" ];
})
"#;

/// The test agent for `substitute-agent` (see `tests/data/substitute-agent`).
const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/substitute-agent");

fn kiln(store_dir: &Path, dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--store-dir")
        .arg(store_dir)
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--state-dir")
        .arg(dir.join("var"))
        .arg("--log-dir")
        .arg(dir.join("log"))
        .args(["--option", "gc-runtime-roots", "false"])
        .env_remove("KILN_CONFIG");
    c
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `path → NAR hash` for a closure, as Nix records it.
fn nix_hashes(env: &NixEnv, top: &str) -> Vec<(String, String)> {
    env.lines("nix-store", &["-qR", top])
        .into_iter()
        .map(|p| {
            let h = env
                .run("nix-store", &["-q", "--hash", &p])
                .trim()
                .to_string();
            (p, h)
        })
        .collect()
}

fn kiln_hash(store_dir: &Path, dir: &Path, p: &str) -> String {
    ok(
        kiln(store_dir, dir)
            .args(["store", "query", "--hash", p])
            .output()
            .unwrap(),
        "kiln store query --hash",
    )
    .trim()
    .to_string()
}

#[test]
fn nix_caches_substitute_into_kiln_and_kiln_caches_into_nix() {
    if !nix_or_skip("nix_caches_substitute_into_kiln_and_kiln_caches_into_nix") {
        return;
    }
    let env = NixEnv::new();
    let work = env.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let expr = work.join("e.nix");
    std::fs::write(&expr, EXPR).unwrap();
    let top = env
        .run("nix-build", &["--no-out-link", expr.to_str().unwrap()])
        .trim()
        .to_string();
    let want = nix_hashes(&env, &top);
    assert_eq!(want.len(), 3, "top, dep and the source: {want:?}");
    let (sk, pkf) = (work.join("sk"), work.join("pk"));
    env.run(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "nix-test-1",
            sk.to_str().unwrap(),
            pkf.to_str().unwrap(),
        ],
    );
    let pk = std::fs::read_to_string(&pkf).unwrap();
    env.run(
        "nix",
        &["store", "sign", "-k", sk.to_str().unwrap(), "-r", &top],
    );
    let store_dir = env.store_dir();

    // Nix writes, kiln reads.
    for comp in ["xz", "zstd"] {
        let cache = work.join(format!("nix-{comp}"));
        env.run(
            "nix",
            &[
                "copy",
                "--to",
                &format!("file://{}?compression={comp}", cache.display()),
                &top,
            ],
        );
        let kdir = work.join(format!("kiln-from-{comp}"));
        ok(
            kiln(&store_dir, &kdir)
                .args(["--option", "trusted-public-keys", &pk])
                .args([
                    "copy",
                    "--from",
                    &format!("file://{}", cache.display()),
                    &top,
                ])
                .output()
                .unwrap(),
            "kiln copy --from a Nix cache",
        );
        for (p, h) in &want {
            assert_eq!(&kiln_hash(&store_dir, &kdir, p), h, "{comp}: {p}");
        }
    }

    // kiln writes (signed, xz and zstd) and serves; Nix reads each back into its emptied
    // store.
    let kdir = work.join("kiln-from-xz");
    let (ksk, kpkf) = (work.join("ksk"), work.join("kpk"));
    ok(
        kiln(&store_dir, &kdir)
            .args(["key", "generate", "kiln-test-1", "--secret-key-file"])
            .arg(&ksk)
            .arg("--public-key-file")
            .arg(&kpkf)
            .output()
            .unwrap(),
        "kiln key generate",
    );
    let kpk = std::fs::read_to_string(&kpkf).unwrap();
    let mut urls = Vec::new();
    for comp in ["xz", "zstd"] {
        let cache = work.join(format!("kiln-{comp}"));
        ok(
            kiln(&store_dir, &kdir)
                .args(["copy", "--compression", comp, "--secret-key-file"])
                .arg(&ksk)
                .arg("--to")
                .arg(format!("file://{}", cache.display()))
                .arg(&top)
                .output()
                .unwrap(),
            "kiln copy --to",
        );
        urls.push(format!("file://{}", cache.display()));
    }
    let mut server = kiln(&store_dir, &kdir)
        .args(["serve", "--listen", "127.0.0.1:0", "--compression", "zstd"])
        .arg("--secret-key-file")
        .arg(&ksk)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let served = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    urls.push(served.clone());
    // Each cache is read back by another Nix command: `nix copy --from`, `nix-store
    // --realise` with `substituters`, and `nix-build` with `substituters = http://...`.
    for (url, how) in urls.iter().zip(["nix copy", "nix-store", "nix-build"]) {
        // Empty the original Nix store of the closure, then substitute it back.
        env.run("nix-store", &["--delete", &top]);
        for (p, _) in &want {
            let _ = env.cmd("nix-store").args(["--delete", p]).output();
        }
        let gone = env
            .cmd("nix-store")
            .args(["-q", "--hash", &top])
            .output()
            .unwrap();
        assert!(!gone.status.success(), "{top} is still valid");
        let mut c = match how {
            "nix copy" => {
                let mut c = env.cmd("nix");
                c.args(["copy", "--from", url, &top]);
                c
            }
            "nix-store" => {
                let mut c = env.cmd("nix-store");
                c.args(["--realise", &top, "--option", "substituters", url]);
                c
            }
            _ => {
                let mut c = env.cmd("nix-build");
                c.args(["--no-out-link", expr.to_str().unwrap()]).args([
                    "--option",
                    "substituters",
                    url,
                ]);
                c
            }
        };
        let o = c
            .args(["--option", "trusted-public-keys", &kpk])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let printed = ok(o, &format!("{how} from {url}"));
        if how == "nix-build" {
            assert_eq!(printed.trim(), top);
            assert!(!err.contains("building '"), "{how} built instead: {err}");
            assert!(err.contains(&format!("copying path '{top}' from")), "{err}");
        }
        assert_eq!(nix_hashes(&env, &top), want, "{how} from {url}");
    }
    let _ = server.kill();
    let _ = server.wait();

    // A Nix client substitutes through kiln's daemon (and sees what will be fetched):
    // with kiln's own cache client, then with the external agent (the guix-daemon agent
    // protocol; the agent is an independent implementation in Python).
    for agent in [None, Some(AGENT)] {
        let ddir = work.join(if agent.is_some() {
            "kiln-daemon-agent"
        } else {
            "kiln-daemon"
        });
        let socket = ddir.join("socket");
        std::fs::create_dir_all(&ddir).unwrap();
        let mut cmd = kiln(&store_dir, &ddir);
        if let Some(a) = agent {
            cmd.args(["--option", "substitute-agent", a])
                .env("AGENT_LOG", ddir.join("agent-log"));
        }
        cmd.args(["--option", "trusted-public-keys", &pk])
            .args(["--option", "substituters"])
            .arg(format!("file://{}", work.join("nix-xz").display()))
            .args(["daemon", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null());
        // Killed when dropped, a failing assertion included.
        let daemon = kiln_testkit::DaemonProcess::start(cmd, socket.clone());
        let client = |args: &[&str]| {
            env.cmd("nix-store")
                .env("NIX_REMOTE", format!("unix://{}", socket.display()))
                .args(args)
                .output()
                .unwrap()
        };
        let dry = client(&["--realise", "--dry-run", &top]);
        let dry_err = String::from_utf8_lossy(&dry.stderr).into_owned();
        assert!(dry.status.success(), "{agent:?}: {dry_err}");
        assert!(
            dry_err.contains("these 3 paths will be fetched"),
            "{agent:?}: {dry_err}"
        );
        let o = client(&["--realise", &top]);
        let printed = ok(o, "nix-store --realise through kiln daemon");
        assert_eq!(printed.trim(), top);
        for (p, h) in &want {
            let o = client(&["-q", "--hash", p]);
            assert_eq!(&ok(o, "query").trim().to_string(), h, "{agent:?}");
        }
        if agent.is_some() {
            let asked = std::fs::read_to_string(ddir.join("agent-log")).unwrap();
            assert_eq!(
                asked.matches("--substitute substitute ").count(),
                3,
                "{asked}"
            );
        }
        // Once the client is gone, nothing holds what was substituted: the same daemon
        // deletes the closure when the next client asks (it used to keep a temporary root
        // on every path it substituted until it restarted).
        let mut closure = want.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>();
        closure.sort_by_key(|p| *p != top.as_str());
        let mut args = vec!["--delete"];
        args.extend(closure.iter().copied());
        ok(
            client(&args),
            &format!("{agent:?}: deleting what was substituted"),
        );
        for p in &closure {
            let real = ddir.join("root").join(p.trim_start_matches('/'));
            assert!(
                !real.exists(),
                "{agent:?}: {} is still there",
                real.display()
            );
            assert!(
                !client(&["--check-validity", p]).status.success(),
                "{agent:?}: {p}"
            );
        }
        drop(daemon);
    }
}
