//! The sandbox of one build: what goes into it, where its outputs are written, and how they
//! come out. `kiln-sandbox` does the system calls; this module decides the contents.
//!
//! On the host, each sandboxed build has `<store>/<drv>.chroot/` (Nix's name, which Nix's
//! and kiln's garbage collectors leave alone while the build runs), mode 0700 and the
//! daemon's: nobody else can reach what is inside (CVE-2024-38531). It holds `root/`, the
//! empty directory the builder's root `tmpfs` is mounted on in its own mount namespace, and
//! `store/`, the builder's view of the store: the inputs are bind-mounted into it read-only
//! and the builder creates its outputs there. Because `store/` is on the store's file
//! system, finished outputs are renamed into the real store, after being made safe (no
//! setuid, setgid or world-writable file ever appears in the store, CVE-2024-52867).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kiln_format::{Derivation, StorePath};
use kiln_sandbox::{Entry, IdMap, Network, Sandbox, UserNet};
use kiln_store::{fsutil, LocalStore};

use crate::settings::{BuildSettings, SandboxMode};

/// Whether this derivation (`shown`) is built in the sandbox under these settings; the
/// refusal is in Nix's words.
pub fn wanted(settings: &BuildSettings, drv: &Derivation, shown: &str) -> Result<bool, String> {
    let no_chroot = crate::attrs::Attrs::of(drv).flag("__noChroot", false);
    match settings.sandbox {
        SandboxMode::Off => Ok(false),
        SandboxMode::Relaxed => Ok(!no_chroot),
        SandboxMode::On if no_chroot => Err(format!(
            "derivation '{shown}' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'"
        )),
        SandboxMode::On => Ok(true),
    }
}

/// The build directory as the builder sees it: Nix's `/build`, or Guix's
/// `/tmp/guix-build-NAME.drv-0` for a Guix store, so builds hash the same as there.
pub fn build_top_inside(store: &LocalStore, drv_path: &StorePath) -> String {
    if store.store_dir().as_str() == "/gnu/store" {
        let name = drv_path.derivation_name().unwrap_or(drv_path.name());
        format!("/tmp/guix-build-{name}.drv-0")
    } else {
        "/build".to_string()
    }
}

/// A prepared sandbox and its host directories; removed when dropped.
#[derive(Debug)]
pub struct BuildSandbox {
    top: PathBuf,
    /// The builder's store directory on the host: outputs appear here.
    pub store: PathBuf,
    pub sandbox: Sandbox,
    /// Where the build directory is inside.
    pub build_top: String,
    /// Where a `builtin:` builder's executable is inside.
    pub builtin_exe: String,
    /// Held until the build's processes are gone (the sandbox is dropped after them).
    pub ids: BuildIds,
}

/// What a sandbox is made from.
#[derive(Debug)]
pub struct Contents<'a> {
    pub store: &'a LocalStore,
    pub drv_path: &'a StorePath,
    pub drv: &'a Derivation,
    pub settings: &'a BuildSettings,
    /// The closure of the inputs.
    pub inputs: &'a BTreeSet<StorePath>,
    pub build_dir: &'a Path,
    pub fixed_output: bool,
}

fn err(what: &str, p: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} '{}': {e}", p.display())
}

/// Appends `Dir` entries for every ancestor of `path` not made yet.
fn parents(entries: &mut Vec<Entry>, made: &mut BTreeSet<String>, path: &str) {
    let mut cur = String::new();
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        cur.push('/');
        cur.push_str(c);
        if made.insert(cur.clone()) {
            entries.push(Entry::Dir {
                path: cur.clone(),
                mode: 0o755,
            });
        }
    }
}

/// Parses `sandbox-paths`: `PATH`, `TARGET=SOURCE`, either with a trailing `?` for
/// "optional".
pub fn parse_sandbox_path(item: &str) -> (String, PathBuf, bool) {
    let (item, optional) = match item.strip_suffix('?') {
        Some(s) => (s, true),
        None => (item, false),
    };
    match item.split_once('=') {
        Some((t, s)) => (t.to_string(), PathBuf::from(s), optional),
        None => (item.to_string(), PathBuf::from(item), optional),
    }
}

/// How the build reaches the network: only loopback, unless it is fixed-output (see
/// [`kiln_sandbox::usernet`] for why those are not simply given the host's namespace).
fn network(c: &Contents<'_>) -> Result<Network, String> {
    if !c.fixed_output {
        return Ok(Network::Loopback);
    }
    // kiln's own fetchers run no code of the derivation's, so nothing in them would use
    // the host's abstract sockets; in the host's namespace they can fetch from mirrors on
    // its loopback, as the reference's built-in downloader can.
    if c.drv.builder.starts_with("builtin:") {
        return Ok(Network::Host);
    }
    let s = c.settings;
    match s.fixed_output_network.as_str() {
        "host" => Ok(Network::Host),
        "slirp4netns" => UserNet::find(s.isolate_host_loopback)
            .map(Network::User)
            .ok_or_else(|| {
                "fixed-output-network is slirp4netns, but slirp4netns is not in PATH or \
                 /dev/net/tun cannot be opened"
                    .to_string()
            }),
        _ => Ok(match UserNet::find(s.isolate_host_loopback) {
            Some(net) => Network::User(net),
            None => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        "slirp4netns is not installed (or /dev/net/tun cannot be opened): \
                         fixed-output builds share the host's network namespace, kept \
                         from its abstract Unix sockets only by Landlock where the kernel \
                         has it (6.12 or later)"
                    )
                });
                Network::Host
            }
        }),
    }
}

impl BuildSandbox {
    pub fn prepare(c: &Contents<'_>) -> Result<BuildSandbox, String> {
        let store = c.store;
        let network = network(c)?;
        let ids = BuildIds::acquire(store, c.settings)?;
        let (uid, gid) = (ids.uid, ids.gid);
        let unprivileged = rustix::process::geteuid().as_raw() != 0;
        let top = PathBuf::from(format!("{}.chroot", store.real_path(c.drv_path).display()));
        if std::fs::symlink_metadata(&top).is_ok() {
            fsutil::remove_tree(&top).map_err(|e| err("removing", &top, e))?;
        }
        std::fs::create_dir(&top).map_err(|e| err("creating", &top, e))?;
        // From here on, dropping `guard` removes `top`.
        let mut guard = BuildSandbox {
            top: top.clone(),
            store: top.join("store"),
            sandbox: Sandbox {
                root: top.join("root"),
                network,
                ids: IdMap::nix(uid, gid),
                unprivileged,
                entries: Vec::new(),
                seccomp: c.settings.filter_syscalls,
            },
            build_top: build_top_inside(store, c.drv_path),
            builtin_exe: "/.kiln/kiln".into(),
            ids,
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err("protecting", &top, e))?;
        std::fs::create_dir(&guard.sandbox.root).map_err(|e| err("creating", &top, e))?;
        std::fs::create_dir(&guard.store).map_err(|e| err("creating", &guard.store, e))?;
        let tmp = top.join("tmp");
        std::fs::create_dir(&tmp).map_err(|e| err("creating", &tmp, e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))
            .map_err(|e| err("protecting", &tmp, e))?;
        // The builder (whose host ids are the daemon's, or a build user's) creates its
        // outputs here; sticky, so that it cannot rename the mount points of the inputs.
        std::fs::set_permissions(&guard.store, std::fs::Permissions::from_mode(0o1775))
            .map_err(|e| err("protecting", &guard.store, e))?;
        if !unprivileged {
            // The builder writes its outputs here and its files in the build directory, as
            // its own host ids; both are below directories only root can enter.
            std::os::unix::fs::chown(&guard.store, Some(0), Some(gid))
                .map_err(|e| err("changing the owner of", &guard.store, e))?;
            std::os::unix::fs::chown(c.build_dir, Some(uid), Some(gid))
                .map_err(|e| err("changing the owner of", c.build_dir, e))?;
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
                .map_err(|e| err("changing the owner of", &tmp, e))?;
        }
        guard.sandbox.entries = guard.entries(c)?;
        Ok(guard)
    }

    fn entries(&self, c: &Contents<'_>) -> Result<Vec<Entry>, String> {
        let store = c.store;
        let sd = store.store_dir();
        let ids = self.sandbox.ids;
        let mut e = Vec::new();
        let mut made = BTreeSet::new();
        let dir = |e: &mut Vec<Entry>, made: &mut BTreeSet<String>, p: &str, mode: u32| {
            parents(e, made, p);
            if made.insert(p.to_string()) {
                e.push(Entry::Dir {
                    path: p.to_string(),
                    mode,
                });
            }
        };
        // `/tmp` is writable by everyone in the sandbox (Guix's build directory lives in it).
        // A directory beside the sandbox on the store's file system, as Nix's is in its
        // chroot, not a tmpfs: a builder that ignores TMPDIR and fills /tmp fills a disk,
        // not the machine's memory.
        let tmp = self.top.join("tmp");
        e.push(Entry::Bind {
            source: tmp,
            path: "/tmp".into(),
            writable: true,
            optional: false,
        });
        made.insert("/tmp".into());
        dir(&mut e, &mut made, "/etc", 0o755);
        e.push(Entry::File {
            path: "/etc/passwd".into(),
            contents: format!(
                "root:x:0:0:Nix build user:{0}:/noshell\n\
                 nixbld:x:{1}:{2}:Nix build user:{0}:/noshell\n\
                 nobody:x:65534:65534:Nobody:/:/noshell\n",
                self.build_top, ids.inside_uid, ids.inside_gid
            )
            .into_bytes(),
            mode: 0o444,
        });
        e.push(Entry::File {
            path: "/etc/group".into(),
            contents: format!(
                "root:x:0:\nnixbld:!:{}:\nnogroup:x:65534:\n",
                ids.inside_gid
            )
            .into_bytes(),
            mode: 0o444,
        });
        if c.fixed_output {
            // Fixed-output builds fetch: they get the host's name resolution, and only that.
            e.push(Entry::File {
                path: "/etc/nsswitch.conf".into(),
                contents: b"hosts: files dns\nservices: files\n".to_vec(),
                mode: 0o444,
            });
            let mut host_files = vec!["/etc/services", "/etc/hosts"];
            if let Network::User(_) = self.sandbox.network {
                // The helper's DNS forwarder: the host's resolvers may be loopback
                // addresses, which mean the build's own namespace in here.
                e.push(Entry::File {
                    path: "/etc/resolv.conf".into(),
                    contents: format!("nameserver {}\n", kiln_sandbox::usernet::DNS_ADDRESS)
                        .into_bytes(),
                    mode: 0o444,
                });
            } else {
                host_files.push("/etc/resolv.conf");
            }
            for f in host_files {
                e.push(Entry::Bind {
                    source: f.into(),
                    path: f.into(),
                    writable: false,
                    optional: true,
                });
            }
            // The certificate authorities, where Nix puts them, for fetchers that check
            // TLS (the host's bundle by default; a fixed output checks its own hash). Only
            // the daemon's configuration or a trusted client names the file: an untrusted
            // client naming `/etc/shadow` here would have a networked builder send it away
            // (kiln-daemon's `client_settings` refuses it).
            // A file that does not exist gets nothing, `/etc/ssl/certs` included, as with
            // Nix (the sandbox comparison with nix-daemon 2.34 found kiln making the
            // empty directories).
            if let Some(ca) = c.settings.ssl_cert_file.as_ref().filter(|ca| ca.exists()) {
                let path = "/etc/ssl/certs/ca-certificates.crt";
                parents(&mut e, &mut made, path);
                e.push(Entry::Bind {
                    source: ca.clone(),
                    path: path.into(),
                    writable: false,
                    optional: true,
                });
            }
        } else {
            e.push(Entry::File {
                path: "/etc/hosts".into(),
                contents: b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
                mode: 0o444,
            });
        }
        // A minimal /dev.
        dir(&mut e, &mut made, "/dev", 0o755);
        for d in ["full", "null", "random", "tty", "urandom", "zero", "kvm"] {
            e.push(Entry::Bind {
                source: PathBuf::from(format!("/dev/{d}")),
                path: format!("/dev/{d}"),
                writable: true,
                optional: d == "kvm",
            });
        }
        e.push(Entry::Tmpfs {
            path: "/dev/shm".into(),
            options: "mode=1777,size=50%".into(),
        });
        e.push(Entry::Devpts {
            path: "/dev/pts".into(),
        });
        for (target, link) in [
            ("/dev/pts/ptmx", "/dev/ptmx"),
            ("/proc/self/fd", "/dev/fd"),
            ("/proc/self/fd/0", "/dev/stdin"),
            ("/proc/self/fd/1", "/dev/stdout"),
            ("/proc/self/fd/2", "/dev/stderr"),
        ] {
            e.push(Entry::Symlink {
                target: target.into(),
                path: link.into(),
            });
        }
        e.push(Entry::Proc {
            path: "/proc".into(),
        });
        // The store: outputs are written in `store/`, the inputs' closure is mounted in it.
        let mut inputs = c.inputs.clone();
        let mut extra = Vec::new();
        for item in &c.settings.sandbox_paths {
            let (target, source, optional) = parse_sandbox_path(item);
            // A store path given as a sandbox path brings its closure with it.
            if let Ok((p, _)) = sd.to_store_path(&source.to_string_lossy()) {
                if store.is_valid(&p).unwrap_or(false) {
                    if let Ok(cl) = store.closure([&p], false) {
                        inputs.extend(cl);
                    }
                }
            }
            extra.push((
                target,
                store.layout().to_real(&source.to_string_lossy()),
                optional,
            ));
        }
        let sd_str = sd.as_str().trim_end_matches('/').to_string();
        dir(&mut e, &mut made, &sd_str, 0o755);
        e.push(Entry::Bind {
            source: self.store.clone(),
            path: sd_str.clone(),
            writable: true,
            optional: false,
        });
        let outputs: BTreeSet<&StorePath> = c.drv.output_paths().map(|(_, o)| o).collect();
        let linker = self.linker(store)?;
        let todo: Vec<&StorePath> = inputs.iter().filter(|p| !outputs.contains(p)).collect();
        for p in linker.link_all(&todo)? {
            e.push(Entry::Bind {
                source: store.real_path(p),
                path: format!("{sd_str}/{}", p.base_name()),
                writable: false,
                optional: false,
            });
        }
        dir(&mut e, &mut made, &self.build_top, 0o755);
        e.push(Entry::Bind {
            source: c.build_dir.to_path_buf(),
            path: self.build_top.clone(),
            writable: true,
            optional: false,
        });
        // Guix's daemon mounts what a link points to; Nix's copies the link.
        let copy_links = sd.as_str() != "/gnu/store";
        // Each path's link target, read once; the links found first, so that no entry
        // beneath one is set up whatever the order given.
        let extra: Vec<_> = extra
            .into_iter()
            .map(|(target, source, optional)| {
                let link = copy_links
                    .then(|| std::fs::read_link(&source).ok())
                    .flatten();
                (target, source, optional, link)
            })
            .collect();
        let links: Vec<String> = extra
            .iter()
            .filter(|x| x.3.is_some())
            .map(|x| x.0.clone())
            .collect();
        for (target, source, optional, link) in extra {
            if !target.starts_with('/') {
                return Err(format!("sandbox path '{target}' is not absolute"));
            }
            // Nothing is set up beneath a copied link: the child would follow the link,
            // before `pivot_root`, to wherever it points on the host.
            if let Some(l) = links.iter().find(|l| target.starts_with(&format!("{l}/"))) {
                return Err(format!(
                    "sandbox path '{target}' is beneath '{l}', a symbolic link in the sandbox"
                ));
            }
            parents(&mut e, &mut made, &target);
            // A symbolic link is copied, as Nix does (a link cannot be mounted): on a
            // merged-/usr system `/bin` is then `usr/bin` in the sandbox too, and resolves
            // only where `/usr` is given as well.
            if let Some(link) = link {
                made.insert(target.clone());
                e.push(Entry::Symlink {
                    target: link.to_string_lossy().into_owned(),
                    path: target,
                });
                continue;
            }
            e.push(Entry::Bind {
                source,
                path: target,
                writable: false,
                optional,
            });
        }
        // `builtin:` builders are kiln's own executable: it and the system libraries it
        // links are visible to them, read-only.
        if c.drv.builder.starts_with("builtin:") {
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot find kiln's own executable: {e}"))?;
            parents(&mut e, &mut made, &self.builtin_exe);
            e.push(Entry::Bind {
                source: exe,
                path: self.builtin_exe.clone(),
                writable: false,
                optional: false,
            });
            for lib in ["/lib", "/lib64", "/usr/lib", "/usr/lib64"] {
                if made.contains(lib) || links.iter().any(|l| lib.starts_with(&format!("{l}/"))) {
                    continue;
                }
                parents(&mut e, &mut made, lib);
                e.push(Entry::Bind {
                    source: lib.into(),
                    path: lib.into(),
                    writable: false,
                    optional: true,
                });
            }
        }
        Ok(e)
    }

    /// Moves what the builder wrote at `build_path` out of the sandbox to its real place in
    /// the store, made safe first. Absent outputs are left absent. (Fixed outputs are then
    /// copied to fresh inodes by registration, sandbox or not: CVE-2024-27297.)
    pub fn take_output(&self, store: &LocalStore, build_path: &StorePath) -> Result<(), String> {
        let from = self.store.join(build_path.base_name());
        if std::fs::symlink_metadata(&from).is_err() {
            return Ok(());
        }
        fsutil::make_safe(&from, Some(self.ids.uid)).map_err(|e| err("making safe", &from, e))?;
        let to = store.real_path(build_path);
        std::fs::rename(&from, &to).map_err(|e| err("moving the output to", &to, e))
    }
}

impl BuildSandbox {
    /// Puts store paths into this sandbox's store directory (before the build, or while it
    /// runs: the builder sees the directory itself).
    pub(crate) fn linker(&self, store: &LocalStore) -> Result<InputLinker, String> {
        InputLinker::open(store, &self.store, self.ids.uid, self.sandbox.unprivileged)
    }
}

impl Drop for BuildSandbox {
    fn drop(&mut self) {
        // The builder's mount namespace is gone with its last process: here the mount
        // points are empty directories and files, and the inputs' links. Removing them
        // (one unlink per input) is not the next build's business: the tree is moved aside
        // and removed off the build's path.
        trash::discard(&self.top);
    }
}

/// Trees removed in the background: a sandbox's host directory is renamed into
/// `<store>/.kiln-trash/` (same file system; a name no collector takes for a store path)
/// and a thread of its own removes it. Whatever a crashed process left there is removed
/// by the next one to use it.
pub mod trash {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Condvar, Mutex, OnceLock, PoisonError};

    use kiln_store::fsutil;

    struct Remover {
        tx: Mutex<Sender<PathBuf>>,
        pending: Mutex<usize>,
        idle: Condvar,
    }

    fn remover() -> Option<&'static Remover> {
        static R: OnceLock<Option<Remover>> = OnceLock::new();
        R.get_or_init(|| {
            let (tx, rx) = channel::<PathBuf>();
            let spawned = std::thread::Builder::new()
                .name("kiln-trash".into())
                .spawn(move || {
                    for p in rx {
                        if let Err(e) = fsutil::remove_tree(&p) {
                            tracing::warn!("removing '{}': {e}", p.display());
                        }
                        if let Some(r) = remover() {
                            let mut n = r.pending.lock().unwrap_or_else(PoisonError::into_inner);
                            *n = n.saturating_sub(1);
                            r.idle.notify_all();
                        }
                    }
                });
            spawned.ok().map(|_| Remover {
                tx: Mutex::new(tx),
                pending: Mutex::new(0),
                idle: Condvar::new(),
            })
        })
        .as_ref()
    }

    fn queue(r: &Remover, p: PathBuf) -> Result<(), PathBuf> {
        *r.pending.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        let sent =
            r.tx.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .send(p)
                .map_err(|e| e.0);
        if sent.is_err() {
            let mut n = r.pending.lock().unwrap_or_else(PoisonError::into_inner);
            *n = n.saturating_sub(1);
        }
        sent
    }

    /// Removes the tree at `top` (a directory directly in the store directory), now or
    /// soon.
    pub fn discard(top: &Path) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        static SWEPT: std::sync::Once = std::sync::Once::new();
        // Where the tree is if it is still this thread's to remove (`None`: queued).
        let left = (|| {
            let Some(r) = remover() else {
                return Some(top.to_path_buf());
            };
            let Some(dir) = top.parent().map(|p| p.join(".kiln-trash")) else {
                return Some(top.to_path_buf());
            };
            if fsutil::ensure_dir(&dir, 0o700).is_err() || !ours(&dir) {
                return Some(top.to_path_buf());
            }
            // Leftovers of processes that died before removing theirs (a live one, a daemon
            // beside this command, removes its own).
            SWEPT.call_once(|| {
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let owner = name.split('-').next().unwrap_or_default();
                        if !Path::new("/proc").join(owner).exists() {
                            let _ = queue(r, e.path());
                        }
                    }
                }
            });
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let to = dir.join(format!("{}-{n}", std::process::id()));
            if std::fs::rename(top, &to).is_err() {
                return Some(top.to_path_buf());
            }
            queue(r, to).err()
        })();
        if let Some(p) = left.filter(|p| std::fs::symlink_metadata(p).is_ok()) {
            if let Err(e) = fsutil::remove_tree(&p) {
                tracing::warn!("removing '{}': {e}", p.display());
            }
        }
    }

    /// Whether the trash directory is a directory of the daemon's own, closed to others.
    ///
    /// The store directory is group-writable (sticky) when build users build outside the
    /// sandbox, so one of them could have made `.kiln-trash` first, as a symlink to `/etc`
    /// say: the trees moved there, and the sweep of what it holds, would then go through
    /// it and delete as root whatever it points to. Once the directory is the daemon's,
    /// the sticky bit keeps anyone else from replacing it.
    fn ours(dir: &Path) -> bool {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let ok = std::fs::symlink_metadata(dir).is_ok_and(|m| {
            m.is_dir()
                && m.uid() == rustix::process::geteuid().as_raw()
                && (m.mode() & 0o077 == 0
                    || std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                        .is_ok())
        });
        if !ok {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "'{}' is not a directory of the daemon's own; not using it",
                    dir.display()
                )
            });
        }
        ok
    }

    /// Waits until every tree handed to [`discard`] so far is removed (a command that
    /// exits after its builds leaves no trash behind).
    pub fn wait() {
        let Some(r) = remover() else { return };
        let mut n = r.pending.lock().unwrap_or_else(PoisonError::into_inner);
        while *n > 0 {
            n = r.idle.wait(n).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Puts inputs that are not directories into the builder's store directory without a
/// mount, as Nix 2.8 and the reference do (a mount each is the dearest part of a sandbox
/// with a large closure: ~60 µs per input, made and torn down): a symbolic link is copied
/// (it has no contents to protect), and a regular file is hard-linked when that is safe.
///
/// A hard link is safe only when the builder cannot change the shared inode: the file must
/// be writable by its owner alone (as every canonical store file is) and not be the
/// builder's host uid's (a rootless daemon's builder *is* the store's owner, and could
/// `chmod u+w` the store's file through the link: those keep their read-only bind mount),
/// and the builder holds no capability (it runs as a non-root uid inside, mapped to a
/// non-root uid outside; a nested user namespace cannot map the file's owner). The store
/// directory it sees is sticky, so it cannot remove or replace the link either.
pub(crate) struct InputLinker {
    real_store: std::os::fd::OwnedFd,
    view: std::os::fd::OwnedFd,
    builder_uid: u32,
    hard_links: bool,
}

impl InputLinker {
    fn open(
        store: &LocalStore,
        view: &Path,
        builder_uid: u32,
        unprivileged: bool,
    ) -> Result<InputLinker, String> {
        use rustix::fs::{Mode, OFlags};
        let dir = |p: &Path| {
            rustix::fs::open(
                p,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| err("opening", p, e))
        };
        Ok(InputLinker {
            real_store: dir(&store.layout().real_store_dir)?,
            view: dir(view)?,
            builder_uid,
            hard_links: !unprivileged,
        })
    }

    /// Puts `paths` in place; returns those that need a bind mount, in order. (One
    /// thread: links into one directory take its lock, a second thread gained 4%.)
    fn link_all<'p>(&self, paths: &[&'p StorePath]) -> Result<Vec<&'p StorePath>, String> {
        let mut mounted = Vec::new();
        for p in paths {
            if !self.link(p)? {
                mounted.push(*p);
            }
        }
        Ok(mounted)
    }

    /// Whether `p` was put in place (otherwise it needs a bind mount). A name already taken
    /// in the builder's store directory is an error.
    fn link(&self, p: &StorePath) -> Result<bool, String> {
        use rustix::fs::{AtFlags, FileType};
        let name = p.base_name();
        let shown = |e| placing_failed(name, e);
        let st =
            rustix::fs::statat(&self.real_store, name, AtFlags::SYMLINK_NOFOLLOW).map_err(shown)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {
                let target =
                    rustix::fs::readlinkat(&self.real_store, name, Vec::new()).map_err(shown)?;
                rustix::fs::symlinkat(target.as_c_str(), &self.view, name).map_err(shown)?;
                Ok(true)
            }
            FileType::RegularFile
                if self.hard_links && st.st_uid != self.builder_uid && st.st_mode & 0o022 == 0 =>
            {
                // Another file system or a full link count: mounted instead.
                match rustix::fs::linkat(&self.real_store, name, &self.view, name, AtFlags::empty())
                {
                    Ok(()) => Ok(true),
                    Err(rustix::io::Errno::EXIST) => Err(shown(rustix::io::Errno::EXIST)),
                    Err(_) => Ok(false),
                }
            }
            _ => Ok(false),
        }
    }
}

/// First host id given to sandboxed builds of a root daemon without build users (Nix's
/// `start-id` for automatically allocated ids).
pub const AUTO_ID_START: u32 = 872_415_232;
/// How many such ids there are (concurrent builds).
pub const AUTO_ID_COUNT: u32 = 4096;

/// The host ids a sandboxed builder runs as, reserved for the build's duration.
///
/// A root daemon never lets a builder run as host root, even mapped: a process whose host
/// uid is 0 passes the owner check of every global `/proc/sys` file without any capability,
/// and `kernel.core_pattern` alone turns that into root on the host. So a root daemon uses
/// a member of `build-users-group` (Nix's and Guix's pool, one lock file per user), or else
/// an unused id of its own range, one per concurrent build so that builds cannot touch each
/// other's files. A rootless daemon has only its own ids.
#[derive(Debug)]
pub struct BuildIds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups of a build user (e.g. `kvm`), kept as the reference keeps them.
    pub groups: Vec<u32>,
    /// A member of `build-users-group`: its processes are killed when the build ends (and
    /// were killed before it started), before its lock is released.
    member: bool,
    _lock: Option<std::os::fd::OwnedFd>,
}

impl Drop for BuildIds {
    fn drop(&mut self) {
        if self.member {
            if let Err(e) = kiln_sandbox::spawn::kill_user(self.uid) {
                tracing::warn!("{e}");
            }
        }
    }
}

fn lines_of(file: &str) -> Result<Vec<Vec<String>>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("reading '{file}': {e}"))?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect())
}

/// The `(uid, gid)` of every member of `group`, from `/etc/group` and `/etc/passwd`.
pub fn group_members(group: &str) -> Result<Vec<(u32, u32)>, String> {
    let groups = lines_of("/etc/group")?;
    let entry = groups
        .iter()
        .find(|f| f.first().map(String::as_str) == Some(group))
        .ok_or_else(|| {
            format!("the group '{group}' specified in 'build-users-group' does not exist")
        })?;
    let gid: u32 = entry
        .get(2)
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| format!("the group '{group}' has no valid id"))?;
    let names: Vec<&str> = entry
        .get(3)
        .map(|m| m.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let users = lines_of("/etc/passwd")?;
    let mut out = Vec::new();
    for n in names {
        if let Some(uid) = users
            .iter()
            .find(|f| f.first().map(String::as_str) == Some(n))
            .and_then(|f| f.get(2)?.parse::<u32>().ok())
        {
            // A build user must never be root.
            if uid != 0 {
                out.push((uid, gid));
            }
        }
    }
    if out.is_empty() {
        return Err(format!("the build users group '{group}' has no members"));
    }
    Ok(out)
}

/// The groups other than `gid` that list the user with id `uid` as a member.
fn supplementary_groups(uid: u32, gid: u32) -> Result<Vec<u32>, String> {
    let users = lines_of("/etc/passwd")?;
    let Some(name) = users
        .iter()
        .find(|f| f.get(2).and_then(|u| u.parse::<u32>().ok()) == Some(uid))
        .and_then(|f| f.first())
    else {
        return Ok(Vec::new());
    };
    Ok(lines_of("/etc/group")?
        .iter()
        .filter(|f| {
            f.get(3)
                .is_some_and(|m| m.split(',').any(|n| n == name.as_str()))
        })
        .filter_map(|f| f.get(2)?.parse::<u32>().ok())
        .filter(|g| *g != gid)
        .collect())
}

impl BuildIds {
    pub fn acquire(store: &LocalStore, settings: &BuildSettings) -> Result<BuildIds, String> {
        let uid = rustix::process::geteuid().as_raw();
        if uid != 0 {
            return Ok(BuildIds {
                uid,
                gid: rustix::process::getegid().as_raw(),
                groups: Vec::new(),
                member: false,
                _lock: None,
            });
        }
        let pool = store.layout().userpool_dir();
        fsutil::ensure_dir(&pool, 0o700).map_err(|e| err("creating", &pool, e))?;
        let member = !settings.build_users_group.is_empty();
        let candidates: Vec<(String, u32, u32)> = if !member {
            (0..AUTO_ID_COUNT)
                .map(|n| (format!("auto-{n}"), AUTO_ID_START + n, AUTO_ID_START + n))
                .collect()
        } else {
            group_members(&settings.build_users_group)?
                .into_iter()
                .map(|(u, g)| (u.to_string(), u, g))
                .collect()
        };
        for (name, uid, gid) in candidates {
            let path = pool.join(name);
            let fd = kiln_store::lock::open_lock_file(&path).map_err(|e| e.to_string())?;
            if kiln_store::lock::lock_fd(&fd, kiln_store::lock::LockKind::Exclusive, false)
                .map_err(|e| err("locking", &path, e))?
            {
                let groups = if member {
                    // Whatever runs as this user now (left by an earlier build, or started
                    // by someone who shares the account) could tamper with this build.
                    kiln_sandbox::spawn::kill_user(uid).map_err(|e| e.to_string())?;
                    supplementary_groups(uid, gid)?
                } else {
                    Vec::new()
                };
                return Ok(BuildIds {
                    uid,
                    gid,
                    groups,
                    member,
                    _lock: Some(fd),
                });
            }
        }
        Err("all build users are busy".into())
    }
}

/// The error of putting the store path `shown` into a sandbox's store directory: a name
/// the builder already took, or another failure.
fn placing_failed(shown: &str, e: rustix::io::Errno) -> String {
    if e == rustix::io::Errno::EXIST {
        format!("store path '{shown}' already exists in the sandbox")
    } else {
        format!("putting '{shown}' in the sandbox: {e}")
    }
}

/// Makes the valid path `p` appear, read-only, in a running sandbox's store (recursive Nix:
/// the builder added or built it through its socket): linked in as an input would be, or
/// else bind-mounted onto a mount point the daemon creates in the builder's store directory
/// with `O_EXCL` semantics (a name the builder already took is refused, as Nix refuses
/// it), inside the builder's mount namespace.
pub(crate) fn materialise(
    store: &LocalStore,
    view: &crate::recursive::SandboxView,
    p: &StorePath,
) -> Result<(), String> {
    use rustix::fs::{Mode, OFlags};
    if view.linker.link(p)? {
        return Ok(());
    }
    let source = store.real_path(p);
    let shown = store.print(p);
    let name = p.base_name();
    let exists = |e| placing_failed(&shown, e);
    let meta = std::fs::symlink_metadata(&source).map_err(|e| err("reading", &source, e))?;
    if meta.is_dir() {
        rustix::fs::mkdirat(&view.linker.view, name, Mode::from_raw_mode(0o555)).map_err(exists)?;
    } else {
        rustix::fs::openat(
            &view.linker.view,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        )
        .map_err(exists)?;
    }
    let inside = format!(
        "{}/{name}",
        store.store_dir().as_str().trim_end_matches('/')
    );
    view.ns
        .attach(&source, &inside)
        .map_err(|e| format!("putting '{shown}' in the sandbox: {e}"))
}

#[cfg(test)]
mod tests {
    /// A `.kiln-trash` someone else made first, as a symlink to a directory of theirs
    /// choosing, is neither used nor swept: what it points to keeps its entries (the
    /// sweep would remove those of dead processes' names) and gains none.
    #[test]
    fn a_planted_trash_symlink_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("store");
        let victim = d.path().join("victim");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::create_dir_all(victim.join("999999999-0")).unwrap();
        std::os::unix::fs::symlink(&victim, store.join(".kiln-trash")).unwrap();
        let top = store.join("x.drv.chroot");
        std::fs::create_dir_all(top.join("root")).unwrap();
        super::trash::discard(&top);
        super::trash::wait();
        assert!(
            std::fs::symlink_metadata(&top).is_err(),
            "the tree is removed"
        );
        let left: Vec<_> = std::fs::read_dir(&victim)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["999999999-0"]);
    }
}
