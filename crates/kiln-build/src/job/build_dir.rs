//! The build directory's life: made (private, owned by the builder), filled (the
//! derivation's files, exported reference graphs), kept for `--keep-failed` (made safe and
//! handed to the client).

use super::*;

/// A build's directory, `<builds>/kiln-build-<drv name>.drv-<pid>-<n>-<random>/build`.
///
/// The builder owns `build` (its `NIX_BUILD_TOP`, or what the sandbox mounts at its fixed
/// path); its parent, the top, is the daemon's and 0700 (the reference's `top/` trick, and
/// Nix's answer to CVE-2024-38531): a sandboxed builder that opens its own directory to the
/// world (`chmod 777 $NIX_BUILD_TOP`) opens it to nobody, since nobody else can pass through
/// the top, and it cannot change the top. `<builds>` itself is the daemon's, in the state
/// directory (CVE-2025-52991: no predictable names in a shared `/tmp`).
///
/// A build user outside the sandbox must reach its directory by path: its top, and
/// `<builds>`, are then traversable but unlistable (0711), and every top's name carries 64
/// random bits. Such a builder runs on the host, where its path can be seen (in its
/// processes' command lines, say): opening its own directory up is then its own doing, as
/// with Nix outside the sandbox; other builds' directories stay out of reach.
pub(super) struct BuildDir {
    pub(super) top: PathBuf,
    pub(super) dir: PathBuf,
}

pub(super) fn make_build_dir(spec: &JobSpec, for_user: bool) -> Result<BuildDir, Failure> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let parent = builds_parent(spec);
    fsutil::ensure_dir(&parent, 0o700).map_err(Failure::misc)?;
    if rustix::process::geteuid().is_root() && !spec.settings.build_users_group.is_empty() {
        not_world_writable(&parent)?;
    }
    let meta = std::fs::symlink_metadata(&parent)
        .map_err(|e| Failure::misc(format!("'{}': {e}", parent.display())))?;
    if !meta.is_dir() || meta.uid() != daemon_ids().0 || meta.mode() & 0o022 != 0 {
        return Err(Failure::misc(format!(
            "the build directory '{}' is not a directory that only the daemon's user can write \
             (mode {:o}, owner {}); refusing to build in it",
            parent.display(),
            meta.mode() & 0o7777,
            meta.uid()
        )));
    }
    if for_user && meta.mode() & 0o011 != 0o011 {
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| Failure::misc(format!("'{}': {e}", parent.display())))?;
    }
    let secret = format!("-{:016x}", rand::random::<u64>());
    let name = spec
        .drv_path
        .derivation_name()
        .unwrap_or(spec.drv_path.name());
    loop {
        let n = BUILD_COUNTER.fetch_add(1, Ordering::Relaxed);
        let top = parent.join(format!(
            "kiln-build-{name}.drv-{}-{n}{secret}",
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&top) {
            Ok(()) => {
                let dir = top.join("build");
                let made = (|| {
                    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o700))?;
                    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
                    if for_user {
                        std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o711))?;
                    }
                    Ok::<_, std::io::Error>(())
                })();
                if let Err(e) = made {
                    let _ = fsutil::remove_build_tree(&top);
                    return Err(Failure::misc(format!(
                        "creating build directory '{}': {e}",
                        dir.display()
                    )));
                }
                return Ok(BuildDir { top, dir });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Failure::misc(format!(
                    "creating build directory '{}': {e}",
                    top.display()
                )))
            }
        }
    }
}

/// Refuses `dir` if it or a directory above it is writable by everyone or a symlink, as
/// nix-daemon 2.34 does (in its words) when builds run as the build users: a build user
/// who can rename a directory on the way could put a symlink in its place, and the daemon,
/// which works in the build directory as root, would follow it (a sticky bit does not
/// count: nix-daemon refuses `/tmp` too).
pub(super) fn not_world_writable(dir: &Path) -> Result<(), Failure> {
    use std::os::unix::fs::MetadataExt;
    for d in dir.ancestors() {
        let m = std::fs::symlink_metadata(d)
            .map_err(|e| Failure::misc(format!("'{}': {e}", d.display())))?;
        if m.mode() & 0o002 != 0 {
            return Err(Failure::misc(format!(
                "Path \"{}\" is world-writable or a symlink. That's not allowed for security.",
                d.display()
            )));
        }
    }
    Ok(())
}

/// Where build directories are made: `build-dir`, else `<state>/builds`.
pub(super) fn builds_parent(spec: &JobSpec) -> PathBuf {
    spec.settings
        .build_dir
        .clone()
        .unwrap_or_else(|| spec.store.layout().builds_dir())
}

/// Makes the real store directory writable by the build users' group, sticky (so that no
/// build user can remove or rename another's paths), as Nix does when `build-users-group`
/// is set: unsandboxed builders create their outputs there.
pub(super) fn let_build_users_create_outputs(store: &LocalStore, gid: u32) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = &store.layout().real_store_dir;
    let m = std::fs::metadata(dir).map_err(|e| format!("'{}': {e}", dir.display()))?;
    if m.gid() != gid || m.uid() != 0 {
        std::os::unix::fs::chown(dir, Some(0), Some(gid))
            .map_err(|e| format!("changing the group of '{}': {e}", dir.display()))?;
    }
    if m.mode() & 0o7777 != 0o1775 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1775))
            .map_err(|e| format!("changing the mode of '{}': {e}", dir.display()))?;
    }
    Ok(())
}

/// Writes a file into the build directory exclusively, without following symlinks.
pub(super) fn write_build_file(
    dir: &Path,
    name: &str,
    contents: &[u8],
    builder: (u32, u32),
) -> Result<(), Failure> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(Failure::new(
            BuildStatus::InputRejected,
            format!("invalid build file name '{name}'"),
        ));
    }
    let dfd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| Failure::misc(format!("opening '{}': {e}", dir.display())))?;
    let fd = rustix::fs::openat(
        &dfd,
        name,
        rustix::fs::OFlags::WRONLY
            | rustix::fs::OFlags::CREATE
            | rustix::fs::OFlags::EXCL
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .map_err(|e| Failure::misc(format!("creating '{}/{name}': {e}", dir.display())))?;
    // The builder's, as Nix hands them over (through the descriptor: CVE-2025-52993).
    if builder != daemon_ids() {
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(builder.0)),
            Some(rustix::fs::Gid::from_raw(builder.1)),
        )
        .map_err(|e| {
            Failure::misc(format!(
                "handing '{}/{name}' to the builder: {e}",
                dir.display()
            ))
        })?;
    }
    std::fs::File::from(fd)
        .write_all(contents)
        .map_err(|e| Failure::misc(format!("writing '{}/{name}': {e}", dir.display())))
}

/// Closure for `exportReferencesGraph`: the closure of `p`, plus the output closures of
/// derivations in it.
pub(super) fn export_graph(store: &LocalStore, p: &StorePath) -> crate::Result<crate::env::Graph> {
    if !store.is_valid(p)? {
        return Err(crate::Error::Invalid(format!(
            "'exportReferencesGraph' contains an invalid path '{}'",
            store.print(p)
        )));
    }
    let mut set = store.closure([p], false)?;
    let drvs: Vec<StorePath> = set.iter().filter(|q| q.is_derivation()).cloned().collect();
    for d in drvs {
        let outs: Vec<StorePath> = store
            .read_derivation(&d)?
            .output_paths()
            .map(|(_, o)| o.clone())
            .collect();
        let valid: Vec<StorePath> = outs
            .into_iter()
            .filter(|o| store.is_valid(o).unwrap_or(false))
            .collect();
        set.extend(store.closure(&valid, false)?);
    }
    let mut out = Vec::new();
    for q in set {
        out.push(store.path_info(&q)?);
    }
    Ok(out)
}

/// `keep-failed`: the build directory stays, handed to whoever asked (else to the daemon's
/// user, away from the build's ids, which a later build may get).
///
/// The builder's processes are gone by now (its PID namespace, its cgroup, or its build
/// user's processes were killed). The top is sealed (0700, the daemon's) so that nobody
/// reaches the tree by path while it changes hands; the hand-over then goes through
/// descriptors and gives away only the builder's own inodes, stripped of setuid, setgid and
/// world-write bits (CVE-2024-52867), so that neither a descriptor smuggled out of the build
/// nor a hard link to a root-owned file (CVE-2021-27851) can turn it into a chown of
/// something else. Only then is the top opened (0711, unlistable) for the client to reach
/// `build` by its name. A tree that cannot be handed over whole is removed, not kept.
pub(super) fn keep_build_dir(spec: &JobSpec, bd: &BuildDir, builder_uid: u32) {
    use std::os::unix::fs::PermissionsExt;
    // A daemon that is not root can give nothing away: its builder's files are its own.
    let to = match spec.settings.client {
        Some((u, g)) if u != 0 && rustix::process::geteuid().is_root() => (u, g),
        _ => daemon_ids(),
    };
    let kept = (|| {
        std::fs::set_permissions(&bd.top, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("sealing '{}': {e}", bd.top.display()))?;
        fsutil::hand_over(&bd.dir, builder_uid, to).map_err(|e| e.to_string())?;
        let parent = builds_parent(spec);
        for (p, m) in [(&parent, 0o711), (&bd.top, 0o711)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
                .map_err(|e| format!("opening '{}' to its user: {e}", p.display()))?;
        }
        Ok::<_, String>(())
    })();
    let note = match kept {
        Ok(()) => format!("note: keeping build directory '{}'\n", bd.dir.display()),
        Err(e) => {
            let _ = fsutil::remove_build_tree(&bd.top);
            format!("note: not keeping the build directory: {e}\n")
        }
    };
    (spec.events)(JobEvent::Log(Arc::from(note.into_bytes())));
}
