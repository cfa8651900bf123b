//! A store on a small file system (a 32 MiB loop-mounted ext4): a build or an add that
//! does not fit fails with the system's words and leaves nothing half-registered, and the
//! store works on; with `min-free` set, a series of builds that would fill the file
//! system collects the garbage it needs while it runs (`autogc`).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_testkit::{root_with_or_skip, run_ok};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh 32 MiB ext4 mounted at `DIR/mnt`; unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(test: &str) -> Option<SmallDisk> {
        if !root_with_or_skip(test, &["mkfs.ext4"]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        std::fs::create_dir(dir.path().join("mnt")).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(dir.path().join("mnt")),
        );
        Some(SmallDisk { dir })
    }
    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
    fn kiln(&self, extra: &[&str]) -> Command {
        let mnt = self.mnt();
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--store-dir")
            .arg(mnt.join("store"))
            .arg("--state-dir")
            .arg(mnt.join("var"))
            .arg("--log-dir")
            .arg(mnt.join("log"))
            .args(["--option", "sandbox", "false"])
            .args(extra)
            .env_remove("KILN_CONFIG")
            .current_dir(self.dir.path());
        c
    }
    fn recipe(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    fn valid(&self, p: &str) -> bool {
        self.kiln(&[])
            .args(["store", "path-info", p])
            .output()
            .unwrap()
            .status
            .success()
    }
    fn verify_clean(&self) {
        run_ok(self.kiln(&[]).args(["store", "verify", "--check-contents"]));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mnt()).status();
    }
}

/// Adds `n` dead files of `mib` MiB each (garbage a collection can take).
fn add_garbage(d: &SmallDisk, n: usize, mib: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let f = d.dir.path().join(format!("garbage{i}"));
            let data: Vec<u8> = (0..mib << 20).map(|j| (j * 31 + i * 7) as u8).collect();
            std::fs::write(&f, data).unwrap();
            let p = run_ok(d.kiln(&[]).args(["store", "add"]).arg(&f));
            std::fs::remove_file(&f).unwrap();
            p
        })
        .collect()
}

/// `n` derivations in a chain, each writing `kib` KiB of its own after a pause.
fn chain(n: usize, kib: usize) -> String {
    let mut s = format!("default = \"c{}\"\n", n - 1);
    for i in 0..n {
        let prev = if i == 0 {
            String::new()
        } else {
            format!("cat ${{c{}}}/marker > $out/prev; ", i - 1)
        };
        s.push_str(&format!(
            "[derivations.c{i}]\nbuilder = \"/bin/sh\"\nenv = {{ PATH = \"/bin:/usr/bin\" }}\nargs = [\"-c\", \"mkdir $out; {prev}echo {i} > $out/marker; head -c {} /dev/urandom > $out/blob; sleep 1.2\"]\n",
            kib * 1024
        ));
    }
    s
}

#[test]
fn what_does_not_fit_fails_cleanly_and_the_store_works_on() {
    let Some(d) = SmallDisk::new("what_does_not_fit_fails_cleanly_and_the_store_works_on") else {
        return;
    };
    run_ok(d.kiln(&[]).args(["store", "verify"]));
    // A build whose output is larger than the disk.
    let big = d.recipe(
        "big.toml",
        "[derivations.big]\nbuilder = \"/bin/sh\"\nenv = { PATH = \"/bin:/usr/bin\" }\nargs = [\"-c\", \"head -c 48000000 /dev/zero > $out\"]\n",
    );
    let o = d
        .kiln(&[])
        .args(["build", "--no-out-link"])
        .arg(&big)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("No space left on device"),
        "{}",
        stderr(&o)
    );
    d.verify_clean();
    // Its partial output is gone: the space is back.
    let free = kiln_build::autogc::free_space(&d.mnt()).unwrap();
    assert!(free > 20 << 20, "{free} bytes free after the failed build");
    // An add that does not fit.
    let f = d.dir.path().join("huge");
    std::fs::write(&f, vec![7u8; 40 << 20]).unwrap();
    let o = d.kiln(&[]).args(["store", "add"]).arg(&f).output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("No space left on device"),
        "{}",
        stderr(&o)
    );
    d.verify_clean();
    // The store works on: a small build and a small add.
    let small = d.recipe(
        "small.toml",
        "[derivations.small]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo fits > $out\"]\n",
    );
    let out = run_ok(d.kiln(&[]).args(["build", "--no-out-link"]).arg(&small));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "fits\n");
    std::fs::write(&f, "small\n").unwrap();
    let p = run_ok(d.kiln(&[]).args(["store", "add"]).arg(&f));
    assert!(d.valid(&p));
    d.verify_clean();
}

#[test]
fn min_free_collects_garbage_while_a_build_series_fills_the_disk() {
    let test = "min_free_collects_garbage_while_a_build_series_fills_the_disk";
    let Some(d) = SmallDisk::new(test) else {
        return;
    };
    let recipe = d.recipe("chain.toml", &chain(8, 2560));
    // Without min-free, the series does not fit beside the garbage.
    let garbage = add_garbage(&d, 7, 2);
    let o = d
        .kiln(&[])
        .args(["build", "--no-out-link", "--no-live"])
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(!o.status.success(), "the series fit without collecting");
    assert!(
        stderr(&o).contains("No space left on device"),
        "{}",
        stderr(&o)
    );
    assert!(garbage.iter().all(|p| d.valid(p)));
    d.verify_clean();
    // With it, the build collects what it needs, while it runs.
    let o = d
        .kiln(&[
            "--option",
            "min-free",
            "9000000",
            "--option",
            "max-free",
            "16000000",
            "--option",
            "min-free-check-interval",
            "1",
        ])
        .args(["build", "--no-out-link", "--no-live"])
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let top = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(
        std::fs::read_to_string(Path::new(&top).join("marker")).unwrap(),
        "7\n"
    );
    let collected = garbage.iter().filter(|p| !d.valid(p)).count();
    assert!(collected > 0, "nothing was collected");
    d.verify_clean();
}

/// Through the daemon, with Nix 2.8's client: a substitution (`nix-store -r` from a
/// `file://` cache), a `nix copy` into the daemon (`AddMultipleToStore`) and an import
/// (`nix-store --import`) of a path that does not fit each fail with the system's words and
/// the path's name, leave nothing valid or half-written, and the same daemon serves all
/// three once a collection has made room.
#[test]
fn substitution_and_imports_that_do_not_fit_fail_cleanly_through_the_daemon() {
    let test = "substitution_and_imports_that_do_not_fit_fail_cleanly_through_the_daemon";
    if !kiln_testkit::nix_or_skip(test) {
        return;
    }
    let Some(d) = SmallDisk::new(test) else {
        return;
    };
    let (mnt, dir) = (d.mnt(), d.dir.path().to_path_buf());
    std::fs::create_dir(dir.join("conf")).unwrap();
    std::fs::write(
        dir.join("conf/nix.conf"),
        "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command\n",
    )
    .unwrap();
    let socket = dir.join("daemon.sock");
    let client = |program: &str| {
        let mut c = Command::new(program);
        c.env("NIX_STORE_DIR", mnt.join("store"))
            .env("NIX_STATE_DIR", mnt.join("var"))
            .env("NIX_LOG_DIR", mnt.join("log"))
            .env("NIX_CONF_DIR", dir.join("conf"))
            .env("NIX_REMOTE", format!("unix://{}", socket.display()))
            .current_dir(&dir);
        c
    };
    let mut daemon = d.kiln(&[]);
    daemon.arg("daemon").arg("--socket").arg(&socket);
    let _daemon = kiln_testkit::DaemonProcess::start(daemon, socket.clone());
    // A 14 MiB path, put in a cache (and an export file) on the host, then deleted.
    let mut data = Vec::with_capacity(14 << 20);
    let mut x = 0x9e37_79b9_u64;
    while data.len() < 14 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(dir.join("blob"), &data).unwrap();
    let p = run_ok(client("nix-store").arg("--add").arg(dir.join("blob")));
    let cache = format!("file://{}", dir.join("cache").display());
    run_ok(client("nix").args(["copy", "--to", &cache, &p]));
    let export = std::fs::File::create(dir.join("blob.export")).unwrap();
    let o = client("nix-store")
        .args(["--export", &p])
        .stdout(export)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    run_ok(client("nix-store").args(["--delete", &p]));
    // Garbage fills the disk so that the path no longer fits.
    let free = kiln_build::autogc::free_space(&mnt).unwrap();
    let garbage = add_garbage(&d, ((free >> 20) as usize).saturating_sub(8) / 2, 2);
    let before = kiln_build::autogc::free_space(&mnt).unwrap();
    assert!(before < 14 << 20, "{before} bytes still free");
    let substitute = || {
        client("nix-store")
            .args(["--realise", &p, "--option", "substituters", &cache])
            .args(["--option", "require-sigs", "false"])
            .output()
            .unwrap()
    };
    let copy_in = || {
        client("nix")
            .args(["copy", "--no-check-sigs", "--from", &cache, "--to"])
            .arg(format!("unix://{}", socket.display()))
            .arg(&p)
            .output()
            .unwrap()
    };
    let import = || {
        client("nix-store")
            .arg("--import")
            .stdin(std::fs::File::open(dir.join("blob.export")).unwrap())
            .output()
            .unwrap()
    };
    let hash = p.rsplit('/').next().unwrap().split('-').next().unwrap();
    for (what, o) in [
        ("substitution", substitute()),
        ("nix copy", copy_in()),
        ("import", import()),
    ] {
        let err = stderr(&o);
        assert!(!o.status.success(), "{what} fit in {before} bytes");
        assert!(err.contains("No space left on device"), "{what}: {err}");
        assert!(
            err.contains(hash),
            "{what}: the error does not name the path: {err}"
        );
        assert!(!d.valid(&p), "{what} left the path valid");
        d.verify_clean();
        // Nothing half-written stays behind (a few blocks of metadata aside).
        let after = kiln_build::autogc::free_space(&mnt).unwrap();
        assert!(
            after + (256 << 10) >= before,
            "{what}: {before} bytes free before, {after} after"
        );
    }
    // Room again: the same daemon serves all three.
    run_ok(client("nix-store").arg("--gc"));
    assert!(garbage.iter().all(|g| !d.valid(g)));
    for (what, o) in [
        ("substitution", &substitute as &dyn Fn() -> Output),
        ("nix copy", &copy_in),
        ("import", &import),
    ] {
        let o = o();
        assert!(
            o.status.success(),
            "{what} after the collection: {}",
            stderr(&o)
        );
        assert!(d.valid(&p), "{what}: the path is not valid");
        assert_eq!(
            std::fs::read(&p).unwrap(),
            data,
            "{what}: the path's contents differ"
        );
        d.verify_clean();
        run_ok(client("nix-store").args(["--delete", &p]));
    }
}
