//! Substitution from binary caches, with real caches: written by kiln (`kiln copy --to`),
//! served by a real HTTP server that misbehaves on purpose, and read back into fresh
//! stores. Each fault must end with a clear message and leave nothing valid or half-written
//! in the store. (Interoperability with Nix 2.8 is in `substitute_nix.rs`.)

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A kiln store at logical directory `store_dir`, physically under `root` when given.
struct K {
    dir: PathBuf,
    store_dir: PathBuf,
    root: Option<PathBuf>,
}

impl K {
    fn kiln(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--store-dir")
            .arg(&self.store_dir)
            .arg("--state-dir")
            .arg(self.dir.join("var"))
            .arg("--log-dir")
            .arg(self.dir.join("log"))
            .args(["--option", "gc-runtime-roots", "false"])
            .args(["--option", "sandbox", "false"])
            .env_remove("KILN_CONFIG");
        // `result` links of builds land beside the stores, not in the source tree.
        if let Some(base) = self.store_dir.parent() {
            c.current_dir(base);
        }
        if let Some(r) = &self.root {
            c.arg("--root").arg(r);
        }
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.kiln().args(args).output().unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "kiln {args:?}: {}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    }
    fn hash(&self, p: &str) -> Option<String> {
        let o = self.run(&["store", "query", "--hash", p]);
        o.status
            .success()
            .then(|| String::from_utf8(o.stdout).unwrap().trim().to_string())
    }
    /// The physical store directory.
    fn real(&self) -> PathBuf {
        match &self.root {
            Some(r) => r.join(self.store_dir.strip_prefix("/").unwrap()),
            None => self.store_dir.clone(),
        }
    }
    /// Nothing half-written: no temporary paths left in the store directory.
    fn assert_no_debris(&self) {
        if let Ok(rd) = std::fs::read_dir(self.real()) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                assert!(!n.contains("kiln-tmp"), "left behind: {n}");
            }
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const RECIPE: &str = r#"
[derivations.dep]
builder = "/bin/sh"
env = { PATH = "/bin:/usr/bin" }
args = ["-c", "echo dependency > $out"]

[derivations.top]
builder = "/bin/sh"
env = { PATH = "/bin:/usr/bin" }
args = ["-c", "mkdir $out; echo ${dep} > $out/ref; head -c 200000 /dev/urandom > $out/blob; ln -s ref $out/link"]
"#;

/// What the fault server does with NAR requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Sends half of the NAR, then closes the connection.
    Drop,
    /// Sends another file in place of the NAR.
    Swap,
    /// Sends the first half of the file as if it were all of it.
    Truncate,
    /// Waits before answering.
    Stall,
    /// Answers 404 for the narinfo of the dependency (the top path lists it).
    MissingRef,
    /// A private cache: 401 without the credentials of user `kiln`, password `s3cret`.
    Auth,
}

/// A real HTTP/1.1 server over a cache directory, with faults.
struct FaultServer {
    addr: String,
    fault: Arc<Mutex<Fault>>,
}

fn serve_one(mut s: TcpStream, dir: &Path, fault: Fault, dep_hash: &str, swap_with: &Path) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut length = 0usize;
    let mut authorization = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                authorization = v.trim().to_string();
            }
        }
    }
    if fault == Fault::Auth && authorization != "Basic a2lsbjpzM2NyZXQ=" {
        let _ = s.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"cache\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let rel = path.trim_start_matches('/');
    if line.starts_with("PUT ") {
        // An upload (`kiln copy --to http://...`): stored under the cache directory.
        let mut body = vec![0; length];
        r.read_exact(&mut body).unwrap();
        let dest = dir.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(dest, body).unwrap();
        let _ =
            s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    let not_found = |s: &mut TcpStream| {
        let _ = s
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    };
    if fault == Fault::MissingRef && rel == format!("{dep_hash}.narinfo") {
        return not_found(&mut s);
    }
    let is_nar = rel.starts_with("nar/");
    let file = if is_nar && fault == Fault::Swap {
        swap_with.to_path_buf()
    } else {
        dir.join(rel)
    };
    let Ok(mut body) = std::fs::read(&file) else {
        return not_found(&mut s);
    };
    if is_nar && fault == Fault::Stall {
        std::thread::sleep(Duration::from_secs(4));
    }
    if is_nar && fault == Fault::Truncate {
        body.truncate(body.len() / 2);
    }
    let header = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(header.as_bytes());
    if is_nar && fault == Fault::Drop {
        let _ = s.write_all(&body[..body.len() / 2]);
        let _ = s.shutdown(std::net::Shutdown::Both);
        return;
    }
    let _ = s.write_all(&body);
}

impl FaultServer {
    fn start(dir: PathBuf, dep_hash: String, swap_with: PathBuf) -> FaultServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let fault = Arc::new(Mutex::new(Fault::None));
        let f = fault.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (dir, dep, swap) = (dir.clone(), dep_hash.clone(), swap_with.clone());
                let fault = *f.lock().unwrap();
                std::thread::spawn(move || serve_one(s, &dir, fault, &dep, &swap));
            }
        });
        FaultServer { addr, fault }
    }
    fn set(&self, f: Fault) {
        *self.fault.lock().unwrap() = f;
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    store_dir: PathBuf,
    pk: String,
    sk: PathBuf,
    dep: String,
    top: String,
    recipe: PathBuf,
}

/// Builds `dep` and `top` in a kiln store and writes two signed caches of them (xz and
/// uncompressed), then removes that store so its directory can be reused.
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    let store_dir = base.join("store");
    let builder = K {
        dir: base.join("k1"),
        store_dir: store_dir.clone(),
        root: None,
    };
    let recipe = base.join("r.toml");
    std::fs::write(&recipe, RECIPE).unwrap();
    let out = builder.ok(&["build", recipe.to_str().unwrap()]);
    let find = |n: &str| {
        out.lines()
            .find(|l| l.ends_with(&format!("-{n}")))
            .unwrap()
            .to_string()
    };
    let (dep, top) = (find("dep"), find("top"));
    let sk = base.join("sk");
    let pkf = base.join("pk");
    builder.ok(&[
        "key",
        "generate",
        "test-cache-1",
        "--secret-key-file",
        sk.to_str().unwrap(),
        "--public-key-file",
        pkf.to_str().unwrap(),
    ]);
    let pk = std::fs::read_to_string(&pkf).unwrap();
    assert!(pk.starts_with("test-cache-1:"), "{pk}");
    for (name, comp) in [("xz", "xz"), ("plain", "none")] {
        builder.ok(&[
            "copy",
            "--to",
            &format!("file://{}", base.join(name).display()),
            "--compression",
            comp,
            "--secret-key-file",
            sk.to_str().unwrap(),
            &top,
        ]);
    }
    // The builder's store goes away; its directory is free for a store that builds.
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(&store_dir)
        .status();
    std::fs::remove_dir_all(&store_dir).unwrap();
    std::fs::remove_dir_all(base.join("k1")).unwrap();
    Setup {
        _tmp: tmp,
        base,
        store_dir,
        pk,
        sk,
        dep,
        top,
        recipe,
    }
}

impl Setup {
    /// A fresh empty store at the cache's store directory, under a root of its own.
    fn fresh(&self, name: &str) -> K {
        K {
            dir: self.base.join(name),
            store_dir: self.store_dir.clone(),
            root: Some(self.base.join(format!("{name}-root"))),
        }
    }
    fn copy_from(&self, k: &K, url: &str, extra: &[&str]) -> Output {
        self.copy_from_stalling_after(k, url, extra, "10")
    }
    /// [`Self::copy_from`] giving a stalled download up after `stall` seconds (10 by
    /// default: a busy machine can be slow to answer without being stalled).
    fn copy_from_stalling_after(&self, k: &K, url: &str, extra: &[&str], stall: &str) -> Output {
        let mut args = vec![
            "--option",
            "trusted-public-keys",
            self.pk.as_str(),
            "--option",
            "stalled-download-timeout",
            stall,
            "--option",
            "download-attempts",
            "1",
            "copy",
            "--from",
            url,
        ];
        args.extend_from_slice(extra);
        args.push(&self.top);
        k.run(&args)
    }
    fn nar_file(&self, cache: &str) -> PathBuf {
        std::fs::read_dir(self.base.join(cache).join("nar"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap()
    }
}

/// `kiln serve` on a free loopback port with `args`: the process and its URL.
fn serve(k: &K, args: &[&str]) -> (std::process::Child, String) {
    let mut child = k
        .kiln()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    (child, url)
}

fn hash_part(p: &str) -> String {
    Path::new(p).file_name().unwrap().to_string_lossy()[..32].to_string()
}

#[test]
fn caches_written_by_kiln_are_read_back_exactly() {
    let s = setup();
    // The layout Nix uses.
    let xz = s.base.join("xz");
    assert_eq!(
        std::fs::read_to_string(xz.join("nix-cache-info")).unwrap(),
        format!("StoreDir: {}\n", s.store_dir.display())
    );
    let ni = std::fs::read_to_string(xz.join(format!("{}.narinfo", hash_part(&s.top)))).unwrap();
    assert!(ni.contains("Compression: xz\n"), "{ni}");
    assert!(ni.contains("URL: nar/") && ni.contains(".nar.xz\n"), "{ni}");
    assert!(ni.contains("Sig: test-cache-1:"), "{ni}");
    assert!(ni.contains(&format!(
        "References: {}",
        Path::new(&s.dep).file_name().unwrap().to_string_lossy()
    )));
    // Copying again finds everything present.
    for cache in ["xz", "plain"] {
        let k = s.fresh(&format!("read-{cache}"));
        let o = s.copy_from(&k, &format!("file://{}", s.base.join(cache).display()), &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let top = k.hash(&s.top).expect("top is valid");
        let dep = k.hash(&s.dep).expect("its reference came along");
        assert!(top.starts_with("sha256:") && dep.starts_with("sha256:"));
        let ni = std::fs::read_to_string(
            s.base
                .join(cache)
                .join(format!("{}.narinfo", hash_part(&s.top))),
        )
        .unwrap();
        assert!(ni.contains(&format!("NarHash: {top}\n")), "{ni}\nvs {top}");
        // The contents verify against the recorded hashes.
        k.ok(&["store", "verify", "--check-contents"]);
        k.assert_no_debris();
    }
}

#[test]
fn unsigned_and_wrongly_signed_paths_are_refused() {
    let s = setup();
    let url = format!("file://{}", s.base.join("xz").display());
    // No trusted key at all.
    let k = s.fresh("nokey");
    let o = k.run(&["copy", "--from", &url, &s.top]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not signed by any of the keys in 'trusted-public-keys'"),
        "{}",
        stderr(&o)
    );
    assert_eq!(k.hash(&s.top), None);
    // Another key.
    let (osk, opk) = (s.base.join("other-sk"), s.base.join("other-pk"));
    k.ok(&[
        "key",
        "generate",
        "other-1",
        "--secret-key-file",
        osk.to_str().unwrap(),
        "--public-key-file",
        opk.to_str().unwrap(),
    ]);
    let other = std::fs::read_to_string(&opk).unwrap();
    let o = k.run(&[
        "--option",
        "trusted-public-keys",
        &other,
        "copy",
        "--from",
        &url,
        &s.top,
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not signed by any of the keys"),
        "{}",
        stderr(&o)
    );
    assert_eq!(k.hash(&s.top), None);
    // The same cache with the right key works, and so does --no-check-sigs.
    let o = s.copy_from(&k, &url, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let k2 = s.fresh("nocheck");
    let o = k2.run(&["copy", "--from", &url, "--no-check-sigs", &s.top]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn faulty_caches_fail_cleanly_and_fall_back() {
    let s = setup();
    // A swapped NAR is the top path's, served for the dependency: a well-formed archive
    // of the wrong contents.
    let xz_server = FaultServer::start(s.base.join("xz"), hash_part(&s.dep), s.nar_file("xz"));
    let plain_server =
        FaultServer::start(s.base.join("plain"), hash_part(&s.dep), s.nar_file("plain"));
    let cases = [
        (&xz_server, Fault::Drop, "disconnected"),
        (&plain_server, Fault::Swap, "hash mismatch"),
        (&xz_server, Fault::Swap, "hash mismatch"),
        (&xz_server, Fault::Truncate, "xz data is corrupt"),
        (&xz_server, Fault::Stall, "download"),
        (&xz_server, Fault::MissingRef, "no substituter"),
    ];
    for (i, (server, fault, want)) in cases.iter().enumerate() {
        server.set(*fault);
        let k = s.fresh(&format!("fault{i}"));
        // The stalled server sleeps 4 s: given up after 1.
        let stall = if *fault == Fault::Stall { "1" } else { "10" };
        let o = s.copy_from_stalling_after(&k, &server.addr, &[], stall);
        let err = stderr(&o);
        assert!(!o.status.success(), "{fault:?} succeeded: {err}");
        assert!(
            err.to_lowercase().contains(want),
            "{fault:?}: expected '{want}' in: {err}"
        );
        assert_eq!(k.hash(&s.top), None, "{fault:?} left the path valid");
        k.assert_no_debris();
        server.set(Fault::None);
    }
    // A broken cache first, a good one second: the good one is used.
    xz_server.set(Fault::Drop);
    let k = s.fresh("two");
    let both = format!(
        "{}?priority=10 file://{}?priority=20",
        xz_server.addr,
        s.base.join("plain").display()
    );
    let o = k.run(&[
        "--option",
        "trusted-public-keys",
        &s.pk,
        "--option",
        "substituters",
        &both,
        "build",
        &s.top,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("from '{}' failed", xz_server.addr)),
        "{}",
        stderr(&o)
    );
    assert!(k.hash(&s.top).is_some());
}

#[test]
fn failed_substitution_builds_only_with_fallback() {
    let s = setup();
    let server = FaultServer::start(s.base.join("xz"), hash_part(&s.dep), s.nar_file("plain"));
    server.set(Fault::Drop);
    // The cache's store directory, not under a root: this store can build.
    let k = K {
        dir: s.base.join("builder2"),
        store_dir: s.store_dir.clone(),
        root: None,
    };
    let args = |fallback: &'static str| -> Vec<String> {
        [
            "--option",
            "trusted-public-keys",
            &s.pk,
            "--option",
            "substituters",
            &server.addr,
            "--option",
            "download-attempts",
            "1",
            "--option",
            "fallback",
            fallback,
            "build",
            s.recipe.to_str().unwrap(),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let a: Vec<String> = args("false");
    let o = k.kiln().args(&a).output().unwrap();
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("--fallback"), "{}", stderr(&o));
    let a: Vec<String> = args("true");
    let o = k.kiln().args(&a).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&s.top));
    k.assert_no_debris();
}

#[test]
fn repair_from_a_bad_substitute_keeps_the_old_contents() {
    // CVE-2026-110450: repair must not destroy the path before the new copy is verified.
    let s = setup();
    let server = FaultServer::start(s.base.join("plain"), hash_part(&s.dep), s.nar_file("xz"));
    let k = s.fresh("repair");
    let o = s.copy_from(&k, &server.addr, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let blob = k
        .real()
        .join(Path::new(&s.top).strip_prefix(&s.store_dir).unwrap())
        .join("blob");
    let good = std::fs::read(&blob).unwrap();
    // Damage it.
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(blob.parent().unwrap())
        .status();
    std::fs::write(&blob, b"damaged").unwrap();
    let repair = |k: &K| {
        k.run(&[
            "--option",
            "trusted-public-keys",
            &s.pk,
            "--option",
            "substituters",
            &server.addr,
            "build",
            "--repair",
            &s.top,
        ])
    };
    server.set(Fault::Swap);
    let o = repair(&k);
    assert!(!o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        b"damaged",
        "the old bytes stay"
    );
    k.assert_no_debris();
    server.set(Fault::None);
    let o = repair(&k);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&blob).unwrap(), good);
    k.ok(&["store", "verify", "--check-contents"]);
}

/// `kiln store verify --check-contents --repair` restores from the caches what it finds
/// damaged (a changed file) or missing (a deleted path), as `nix-store --verify
/// --check-contents --repair` does; the store verifies clean after.
#[test]
fn verify_repair_restores_damaged_and_missing_paths_from_a_cache() {
    let s = setup();
    let k = s.fresh("verify-repair");
    let cache = format!("file://{}", s.base.join("xz").display());
    let o = s.copy_from(&k, &cache, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let real = |p: &str| {
        k.real()
            .join(Path::new(p).strip_prefix(&s.store_dir).unwrap())
    };
    let chmod = |p: &Path| {
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(p).status();
    };
    let blob = real(&s.top).join("blob");
    let good = std::fs::read(&blob).unwrap();
    chmod(&real(&s.top));
    std::fs::write(&blob, b"damaged").unwrap();
    let dep = real(&s.dep);
    let dep_before = tree_of(&dep);
    chmod(&dep);
    if dep.is_dir() {
        std::fs::remove_dir_all(&dep).unwrap();
    } else {
        std::fs::remove_file(&dep).unwrap();
    }
    // Found, not repaired: an error naming both.
    let o = k.run(&["store", "verify", "--check-contents"]);
    assert!(!o.status.success(), "{}", stderr(&o));
    // Repaired from the cache.
    let o = k.run(&[
        "--option",
        "trusted-public-keys",
        &s.pk,
        "--option",
        "substituters",
        &cache,
        "store",
        "verify",
        "--check-contents",
        "--repair",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for p in [&s.top, &s.dep] {
        assert!(
            stderr(&o).contains(&format!("repaired '{p}'")),
            "{p} not reported repaired: {}",
            stderr(&o)
        );
    }
    assert_eq!(std::fs::read(&blob).unwrap(), good);
    assert_eq!(tree_of(&dep), dep_before);
    k.ok(&["store", "verify", "--check-contents"]);
    k.assert_no_debris();
}

/// A path's files and their contents, for comparing a tree before and after.
fn tree_of(p: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![p.to_path_buf()];
    while let Some(q) = todo.pop() {
        if q.is_dir() {
            for e in std::fs::read_dir(&q).unwrap() {
                todo.push(e.unwrap().path());
            }
        } else {
            out.push((q.clone(), std::fs::read(&q).unwrap_or_default()));
        }
    }
    out.sort();
    out
}

#[test]
fn kiln_serve_answers_as_a_cache() {
    let s = setup();
    // Fill a store from the cache, then serve it.
    let k = s.fresh("served");
    let o = s.copy_from(&k, &format!("file://{}", s.base.join("xz").display()), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (mut child, url) = serve(
        &k,
        &[
            "--secret-key-file",
            s.sk.to_str().unwrap(),
            "--compression",
            "zstd",
        ],
    );
    let get = |rel: &str| {
        let (st, _, body) = http(&url, "GET", rel, "");
        (st, body)
    };
    let (st, body) = get("nix-cache-info");
    assert_eq!(st, 200);
    assert!(
        String::from_utf8_lossy(&body).contains(&format!("StoreDir: {}", s.store_dir.display()))
    );
    assert_eq!(get("00000000000000000000000000000000.narinfo").0, 404);
    assert_eq!(get("../../etc/passwd").0, 404);
    // Another store reads it back, checking the server's signatures.
    let k2 = s.fresh("from-serve");
    let o = s.copy_from(&k2, &url, &[]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(k2.hash(&s.top), k.hash(&s.top));
    assert_eq!(k2.hash(&s.dep), k.hash(&s.dep));
}

/// One HTTP/1.1 request on a fresh connection: (status, headers, body).
fn http(addr: &str, method: &str, rel: &str, extra: &str) -> (u16, String, Vec<u8>) {
    let mut c = TcpStream::connect(addr.trim_start_matches("http://")).unwrap();
    write!(
        c,
        "{method} /{rel} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    c.read_to_end(&mut buf).unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head[9..12].parse().unwrap();
    (status, head, buf[split + 4..].to_vec())
}

#[test]
fn kiln_serve_answers_ranges_and_many_clients_at_once() {
    let s = setup();
    let k = s.fresh("served-plain");
    let o = s.copy_from(&k, &format!("file://{}", s.base.join("xz").display()), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (mut child, url) = serve(&k, &["--compression", "none"]);
    // What the NAR must be, byte for byte.
    let real_top = k.real().join(Path::new(&s.top).file_name().unwrap());
    let want = k
        .kiln()
        .args(["nar", "dump"])
        .arg(&real_top)
        .output()
        .unwrap()
        .stdout;
    assert!(
        want.len() > 1000,
        "the top path's NAR is {} bytes",
        want.len()
    );
    let (st, _, ni) = http(&url, "GET", &format!("{}.narinfo", hash_part(&s.top)), "");
    assert_eq!(st, 200);
    let ni = String::from_utf8(ni).unwrap();
    assert!(ni.contains(&format!("NarSize: {}\n", want.len())), "{ni}");
    let nar_url = ni
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();

    // A resumed download: the middle of the archive, then its tail.
    let (st, head, body) = http(&url, "GET", &nar_url, "Range: bytes=100-499\r\n");
    assert_eq!(st, 206, "{head}");
    assert!(
        head.contains(&format!("Content-Range: bytes 100-499/{}", want.len())),
        "{head}"
    );
    assert!(
        body == want[100..500],
        "bytes 100-499: {} bytes differ",
        body.len()
    );
    let (st, head, body) = http(&url, "GET", &nar_url, "Range: bytes=500-\r\n");
    assert_eq!(st, 206);
    assert!(
        head.contains(&format!("Content-Length: {}", want.len() - 500)),
        "{head}"
    );
    assert!(
        body == want[500..],
        "bytes 500-: {} bytes differ",
        body.len()
    );
    // A range it cannot serve gets the whole archive.
    let (st, _, body) = http(&url, "GET", &nar_url, "Range: bytes=0-1,5-9\r\n");
    assert_eq!((st, body.len()), (200, want.len()));
    // Writing is refused.
    assert_eq!(http(&url, "PUT", &nar_url, "Content-Length: 0\r\n").0, 405);

    // Many clients at once (more than the server's 64 request slots), each reading the
    // narinfo and the whole NAR: every one gets exactly the archive.
    let clients: Vec<_> = (0..96)
        .map(|i| {
            let (url, nar_url, top) = (url.clone(), nar_url.clone(), s.top.clone());
            std::thread::spawn(move || {
                let (st, _, ni) = http(&url, "GET", &format!("{}.narinfo", hash_part(&top)), "");
                assert_eq!(st, 200, "client {i}: narinfo");
                assert!(String::from_utf8(ni).unwrap().contains(&nar_url));
                let (st, head, body) = http(&url, "GET", &nar_url, "");
                assert_eq!(st, 200, "client {i}: NAR");
                assert!(head.contains("Content-Length: "), "{head}");
                body
            })
        })
        .collect();
    for c in clients {
        assert!(c.join().unwrap() == want, "a client got another NAR");
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn copy_to_an_http_cache_uploads_what_others_read_back() {
    let s = setup();
    let k = s.fresh("uploader");
    let o = s.copy_from(&k, &format!("file://{}", s.base.join("xz").display()), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let up = s.base.join("uploaded");
    std::fs::create_dir(&up).unwrap();
    let server = FaultServer::start(up.clone(), String::new(), PathBuf::new());
    k.ok(&[
        "copy",
        "--to",
        &server.addr,
        "--secret-key-file",
        s.sk.to_str().unwrap(),
        &s.top,
    ]);
    // Nix's layout, on the server's disk.
    assert_eq!(
        std::fs::read_to_string(up.join("nix-cache-info")).unwrap(),
        format!("StoreDir: {}\n", s.store_dir.display())
    );
    for p in [&s.top, &s.dep] {
        let ni = std::fs::read_to_string(up.join(format!("{}.narinfo", hash_part(p)))).unwrap();
        let url = ni.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
        assert!(up.join(url).is_file(), "{url} was not uploaded");
    }
    // Copying again uploads nothing new: the narinfos are found present.
    let before = std::fs::metadata(up.join(format!("{}.narinfo", hash_part(&s.top))))
        .unwrap()
        .modified()
        .unwrap();
    k.ok(&[
        "copy",
        "--to",
        &server.addr,
        "--secret-key-file",
        s.sk.to_str().unwrap(),
        &s.top,
    ]);
    let after = std::fs::metadata(up.join(format!("{}.narinfo", hash_part(&s.top))))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    // Another store substitutes from it over HTTP, checking the signatures.
    let k2 = s.fresh("downloader");
    let o = s.copy_from(&k2, &server.addr, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(k2.hash(&s.top), k.hash(&s.top));
    assert_eq!(k2.hash(&s.dep), k.hash(&s.dep));
    k2.ok(&["store", "verify", "--check-contents"]);
}

/// The test agent: the guix-daemon agent protocol, implemented independently in Python.
const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/substitute-agent");

#[test]
fn an_external_substitute_agent_is_used_and_checked() {
    let s = setup();
    let cache = format!("file://{}", s.base.join("xz").display());
    let requests = s.base.join("agent-requests");
    // A file of the machine's that a misbehaving agent links into what it restores.
    let outside = s.base.join("outside-secret");
    std::fs::write(&outside, "secret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
    // An agent (a Python program that starts, imports and decompresses) gets 10 s to
    // answer, except the one that goes silent.
    let with_agent = |k: &K, fault: &str| {
        let stall = if fault == "silent" { "2" } else { "10" };
        let mut c = k.kiln();
        c.args(["--option", "substitute-agent", AGENT])
            .args(["--option", "stalled-download-timeout", stall])
            .args(["copy", "--from", &cache, &s.top])
            .env("AGENT_FAULT", fault)
            .env("AGENT_LOG", &requests)
            .env("AGENT_OUTSIDE", &outside);
        c.output().unwrap()
    };
    let k = s.fresh("agent-ok");
    let o = with_agent(&k, "");
    assert!(o.status.success(), "{}", stderr(&o));
    // What the agent was asked, on which channel: queries, then one download per path,
    // references first, each into a scratch path rather than the final one.
    let asked = std::fs::read_to_string(&requests).unwrap();
    assert!(
        asked.contains(&format!("--query info {}", s.top)),
        "{asked}"
    );
    let downloads: Vec<&str> = asked
        .lines()
        .filter_map(|l| l.strip_prefix("--substitute substitute "))
        .collect();
    assert_eq!(downloads.len(), 2, "{asked}");
    assert!(downloads[0].starts_with(&format!("{} ", s.dep)), "{asked}");
    assert!(downloads[1].starts_with(&format!("{} ", s.top)), "{asked}");
    assert!(downloads.iter().all(|d| d.contains("-kiln-tmp")), "{asked}");
    // The agent's progress reached the user.
    assert!(stderr(&o).contains("Downloading "), "{}", stderr(&o));
    // Registered with the cache's hashes and references, contents verified.
    let ni = std::fs::read_to_string(
        s.base
            .join("xz")
            .join(format!("{}.narinfo", hash_part(&s.top))),
    )
    .unwrap();
    let top_hash = k.hash(&s.top).expect("top is valid");
    assert!(ni.contains(&format!("NarHash: {top_hash}\n")), "{ni}");
    assert!(k.hash(&s.dep).is_some());
    k.ok(&["store", "verify", "--check-contents"]);
    let refs = k.ok(&["store", "query", "--references", &s.top]);
    assert!(refs.contains(&s.dep), "{refs}");
    k.assert_no_debris();

    // An agent that misbehaves gets nothing registered.
    for (i, (fault, want)) in [
        ("lie", "hash mismatch"),
        ("mismatch", "hash mismatch for substituted item"),
        ("die", "empty status"),
        ("not-found", "no substitute for"),
        ("silent", "sent nothing for 2 s"),
        ("link", "is a hard link to a file outside it"),
    ]
    .into_iter()
    .enumerate()
    {
        let k = s.fresh(&format!("agent-fault-{i}"));
        let o = with_agent(&k, fault);
        let err = stderr(&o);
        assert!(!o.status.success(), "{fault}: succeeded");
        assert!(err.contains(want), "{fault}: {err}");
        assert_eq!(k.hash(&s.dep), None, "{fault}: the dependency became valid");
        assert_eq!(k.hash(&s.top), None, "{fault}: the top path became valid");
        k.assert_no_debris();
    }
    // The linked file was neither published nor given store metadata.
    let m = std::fs::metadata(&outside).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o600);
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "secret\n");
}

/// A private cache: `netrc-file` gives the credentials of its host, and nothing else does
/// (no file, or an entry for another host, gets its 401).
#[test]
fn netrc_credentials_open_a_private_cache() {
    let s = setup();
    let server = FaultServer::start(s.base.join("xz"), hash_part(&s.dep), s.nar_file("xz"));
    server.set(Fault::Auth);
    let k = s.fresh("no-netrc");
    let o = s.copy_from(&k, &server.addr, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));
    let netrc = s.base.join("netrc");
    std::fs::write(
        &netrc,
        "machine elsewhere.example login kiln password s3cret\n",
    )
    .unwrap();
    let k = s.fresh("other-host");
    let o = s.copy_from(
        &k,
        &server.addr,
        &["--option", "netrc-file", netrc.to_str().unwrap()],
    );
    assert!(
        !o.status.success(),
        "credentials for another host were sent"
    );
    std::fs::write(
        &netrc,
        "# the cache's host\nmachine 127.0.0.1\n  login kiln\n  password s3cret\n",
    )
    .unwrap();
    let k = s.fresh("netrc");
    let o = s.copy_from(
        &k,
        &server.addr,
        &["--option", "netrc-file", netrc.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(k.hash(&s.top).is_some());
}
