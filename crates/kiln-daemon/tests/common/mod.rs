//! An in-process daemon on a temporary store and socket, for the daemon's tests.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_daemon::{Daemon, DaemonConfig};
use kiln_format::derivation::DerivationOutput;
use kiln_format::{Derivation, StoreDir, StorePath};
use kiln_protocol::{Client, Version};
use kiln_store::{Layout, LocalStore, Settings, StoreOptions};

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub daemon: Arc<Daemon>,
}

impl TestDaemon {
    pub fn start() -> TestDaemon {
        TestDaemon::with_settings(&[])
    }

    pub fn with_settings(extra: &[(&str, &str)]) -> TestDaemon {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::under(dir.path()).unwrap();
        TestDaemon::with_layout(dir, layout, extra)
    }

    /// A daemon whose store, state and logs are under `root` exactly (`root/store`,
    /// `root/var`, `root/log`; removed first): to answer with the store paths of a
    /// recording made at that path.
    pub fn at(root: &std::path::Path, extra: &[(&str, &str)]) -> TestDaemon {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root).unwrap();
        let layout = Layout::under(root).unwrap();
        let dir = tempfile::tempdir().unwrap();
        TestDaemon::with_layout(dir, layout, extra)
    }

    fn with_layout(dir: tempfile::TempDir, layout: Layout, extra: &[(&str, &str)]) -> TestDaemon {
        let mut settings = Settings::new(kiln_daemon::CATALOG);
        settings.set("sandbox", "false").unwrap();
        settings.set("fsync-store-paths", "false").unwrap();
        for (k, v) in extra {
            settings.set(k, v).unwrap();
        }
        let opts = StoreOptions {
            fsync: false,
            runtime_roots: false,
            ..StoreOptions::from_settings(&settings, &layout)
        };
        let store = Arc::new(LocalStore::open(layout, opts).unwrap());
        let daemon = Daemon::new(store, settings, DaemonConfig::default());
        let socket = dir.path().join("socket");
        let listener = kiln_daemon::bind_socket(&socket).unwrap();
        let d = daemon.clone();
        std::thread::spawn(move || d.run(listener));
        TestDaemon {
            dir,
            socket,
            daemon,
        }
    }

    pub fn store_dir(&self) -> StoreDir {
        self.daemon.store().store_dir().clone()
    }

    /// A Nix 2.8 client.
    pub fn nix(&self) -> Client {
        Client::connect(&self.socket, self.store_dir()).unwrap()
    }

    /// A Guix client (0x164).
    pub fn guix(&self) -> Client {
        Client::connect_as(&self.socket, self.store_dir(), Version(0x164)).unwrap()
    }

    pub fn raw(&self) -> UnixStream {
        UnixStream::connect(&self.socket).unwrap()
    }
}

pub fn u64(n: u64) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

pub fn s(b: &[u8]) -> Vec<u8> {
    let mut v = u64(b.len() as u64);
    v.extend_from_slice(b);
    v.extend(std::iter::repeat_n(0u8, (8 - b.len() % 8) % 8));
    v
}

/// The bytes of a Nix 2.8 client's handshake.
pub fn nix_hello() -> Vec<u8> {
    [u64(0x6e69_7863), u64(0x122), u64(0), u64(0)].concat()
}

/// A NAR of one regular file.
pub fn nar_file(contents: &[u8]) -> Vec<u8> {
    [
        s(b"nix-archive-1"),
        s(b"("),
        s(b"type"),
        s(b"regular"),
        s(b"contents"),
        s(contents),
        s(b")"),
    ]
    .concat()
}

/// A derivation whose builder runs `script` with `/bin/sh`: its file name and text.
pub fn drv_text(d: &TestDaemon, name: &str, script: &str) -> (String, Vec<u8>) {
    drv_text_on(d, name, script, &[])
}

/// [`drv_text`] for a derivation with the `out` outputs of `inputs` as its inputs.
fn drv_text_on(
    d: &TestDaemon,
    name: &str,
    script: &str,
    inputs: &[&StorePath],
) -> (String, Vec<u8>) {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), "/bin:/usr/bin".to_string());
    let drv = Derivation {
        name: name.into(),
        outputs: BTreeMap::from([(
            "out".to_string(),
            DerivationOutput {
                path: None,
                fixed: None,
                floating: None,
            },
        )]),
        platform: kiln_build::settings::native_system(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env,
        input_drvs: inputs
            .iter()
            .map(|i| ((*i).clone(), BTreeSet::from(["out".to_string()])))
            .collect(),
        ..Default::default()
    };
    let drv = d.daemon.store().finalize_derivation(drv).unwrap();
    (format!("{name}.drv"), drv.to_aterm(&d.store_dir()))
}

/// Adds the derivation [`drv_text`] makes to the store.
pub fn drv(d: &TestDaemon, name: &str, script: &str) -> StorePath {
    drv_on(d, name, script, &[])
}

/// Adds a derivation whose inputs are the `out` outputs of the derivations `inputs`.
pub fn drv_on(d: &TestDaemon, name: &str, script: &str, inputs: &[&StorePath]) -> StorePath {
    let (file, text) = drv_text_on(d, name, script, inputs);
    let refs: BTreeSet<StorePath> = inputs.iter().map(|i| (*i).clone()).collect();
    d.daemon
        .store()
        .add_text(&file, &text, &refs, Default::default())
        .unwrap()
        .path
}

/// The daemon still answers a well-behaved client.
pub fn still_serving(d: &TestDaemon) {
    let mut c = d.nix();
    let p = StorePath::from_base_name(&format!("{:032}-x", 0)).unwrap();
    assert!(matches!(
        c.request(&kiln_protocol::Request::IsValidPath(p), None, &mut |_| {})
            .unwrap(),
        kiln_protocol::Reply::Bool(false)
    ));
}
