//! `builtin:buildenv`: assembles a user environment (a profile generation, as `nix-env`
//! builds them) out of a forest of symlinks into the installed packages.
//!
//! The derivation (Nix's `corepkgs/buildenv.nix`) passes:
//!
//! * `out`: the directory to create;
//! * `manifest`: a store path that becomes the `$out/manifest.nix` symlink;
//! * `derivations`: whitespace-separated groups `ACTIVE PRIORITY N PATH₁ … PATHₙ`, one per
//!   package, where `ACTIVE` is `false` for a disabled package (anything else means active),
//!   `PRIORITY` an integer (lower wins) and the paths the package's outputs.
//!
//! Packages are linked in order of (priority, path). Directories present in several packages
//! become real directories whose entries are linked in turn; a symlink to a directory is
//! replaced by a real directory when a second package needs to put entries into it. A file
//! present in two packages goes to the one with the lower priority number; equal priorities
//! are an error. Packages listed in a package's `nix-support/propagated-user-env-packages`
//! are added afterwards, round by round, with priorities 1000, 1001, … so they lose every
//! collision with an explicitly installed package. Hidden entries and a few files that only
//! cause pointless collisions (`nix-support`, `log`, `info/dir`, …) are left out.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::ErrorKind;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};

/// One output of a package to link into the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub path: OsString,
    pub active: bool,
    pub priority: i32,
}

/// Priorities of propagated packages start here, below any ordinary priority.
const PROPAGATED_PRIORITY: i32 = 1000;

/// Files and directories (matched as a suffix of the source path) never linked into a profile.
const IGNORED_SUFFIXES: &[&str] = &[
    "/propagated-build-inputs",
    "/nix-support",
    "/perllocal.pod",
    "/info/dir",
    "/log",
    "/manifest.nix",
    "/manifest.json",
];

/// The builder entry point: reads `out`, `manifest` and `derivations` from the environment.
pub fn run() -> anyhow::Result<ExitCode> {
    let attr =
        |name: &str| std::env::var_os(name).ok_or_else(|| anyhow!("attribute '{name}' missing"));
    let out = attr("out")?;
    let derivations = attr("derivations")?;
    let manifest = attr("manifest")?;
    let pkgs = parse_derivations(derivations.as_bytes())?;
    build_env(Path::new(&out), Path::new(&manifest), pkgs)?;
    Ok(ExitCode::SUCCESS)
}

/// Builds the environment at `out` from `pkgs` and links `out/manifest.nix` to `manifest`.
pub fn build_env(out: &Path, manifest: &Path, pkgs: Vec<Package>) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating directory '{}'", out.display()))?;
    let links = build_profile(out.as_os_str(), pkgs)?;
    tracing::debug!("created {links} symlinks in user environment");
    let link = join(out.as_os_str(), OsStr::new("manifest.nix"));
    symlink(manifest.as_os_str(), &link)
}

/// Splits `s` at any of the bytes in `seps`, dropping empty pieces.
fn tokens<'a>(s: &'a [u8], seps: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    s.split(move |b| seps.contains(b)).filter(|t| !t.is_empty())
}

/// An integer as C++'s `std::stoi` reads it: an optional sign and digits, anything after
/// them ignored.
fn parse_int(tok: &[u8], what: &str) -> anyhow::Result<i32> {
    let text = String::from_utf8_lossy(tok);
    let (neg, rest) = match tok.first() {
        Some(b'-') => (true, &tok[1..]),
        Some(b'+') => (false, &tok[1..]),
        _ => (false, tok),
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        bail!("invalid {what} '{text}' in attribute 'derivations'");
    }
    let magnitude = rest[..digits]
        .iter()
        .try_fold(0i64, |acc, d| {
            acc.checked_mul(10)?.checked_add(i64::from(d - b'0'))
        })
        .filter(|m| *m <= i64::from(i32::MAX) + 1);
    let value = magnitude
        .and_then(|m| i32::try_from(if neg { -m } else { m }).ok())
        .ok_or_else(|| anyhow!("{what} '{text}' in attribute 'derivations' is out of range"))?;
    Ok(value)
}

/// Parses the `derivations` attribute: groups of `ACTIVE PRIORITY N PATH…`.
pub fn parse_derivations(spec: &[u8]) -> anyhow::Result<Vec<Package>> {
    let mut toks = tokens(spec, b" \t\n\r");
    let mut pkgs = Vec::new();
    while let Some(active) = toks.next() {
        let mut next = |what: &str| {
            toks.next().ok_or_else(|| {
                anyhow!("attribute 'derivations' ends where the {what} of a package was expected")
            })
        };
        let priority = parse_int(next("priority")?, "priority")?;
        let outputs = parse_int(next("number of outputs")?, "number of outputs")?;
        for _ in 0..outputs {
            let path = next("output path")?;
            pkgs.push(Package {
                path: OsString::from_vec(path.to_vec()),
                active: active != b"false",
                priority,
            });
        }
    }
    Ok(pkgs)
}

/// `dir/name`, joined as plain strings (no normalisation), so link targets keep the exact
/// spelling of the package paths.
fn join(dir: &OsStr, name: &OsStr) -> OsString {
    let mut p = dir.to_os_string();
    p.push("/");
    p.push(name);
    p
}

fn show(p: &OsStr) -> std::path::Display<'_> {
    Path::new(p).display()
}

fn symlink(target: &OsStr, link: &OsStr) -> anyhow::Result<()> {
    std::os::unix::fs::symlink(target, link).with_context(|| {
        format!(
            "creating symlink from '{}' to '{}'",
            show(link),
            show(target)
        )
    })
}

fn lstat(p: &OsStr) -> anyhow::Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(p) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("getting status of '{}'", show(p))),
    }
}

#[derive(Debug, Default)]
struct State {
    /// The priority of the package each symlink we made belongs to.
    priorities: HashMap<OsString, i32>,
    links: u64,
}

impl State {
    fn priority_of(&self, dst: &OsStr) -> i32 {
        self.priorities.get(dst).copied().unwrap_or(0)
    }

    /// Links the entries of `src_dir` into `dst_dir` on behalf of a package of `priority`.
    fn link_dir(&mut self, src_dir: &OsStr, dst_dir: &OsStr, priority: i32) -> anyhow::Result<()> {
        let entries = match std::fs::read_dir(src_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotADirectory => {
                eprintln!(
                    "warning: not including '{}' in the user environment because it's not a directory",
                    show(src_dir)
                );
                return Ok(());
            }
            Err(e) => {
                return Err(e).with_context(|| format!("opening directory '{}'", show(src_dir)))
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("reading directory '{}'", show(src_dir)))?;
            names.push(entry.file_name());
        }
        names.sort();

        for name in names {
            if name.as_bytes().first() == Some(&b'.') {
                continue;
            }
            let src = join(src_dir, &name);
            let dst = join(dst_dir, &name);
            self.link_entry(&src, &dst, priority)?;
        }
        Ok(())
    }

    fn link_entry(&mut self, src: &OsStr, dst: &OsStr, priority: i32) -> anyhow::Result<()> {
        let src_meta = match std::fs::metadata(src) {
            Ok(m) => m,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                eprintln!("warning: skipping dangling symlink '{}'", show(dst));
                return Ok(());
            }
            Err(e) => return Err(e).with_context(|| format!("getting status of '{}'", show(src))),
        };
        if IGNORED_SUFFIXES
            .iter()
            .any(|s| src.as_bytes().ends_with(s.as_bytes()))
        {
            return Ok(());
        }

        let existing = lstat(dst)?;
        if let Some(dst_meta) = existing {
            let kind = dst_meta.file_type();
            if src_meta.is_dir() {
                if kind.is_dir() {
                    return self.link_dir(src, dst, priority);
                }
                if kind.is_symlink() {
                    // Another package's directory is linked here: turn the link into a real
                    // directory holding the entries of both.
                    let target = std::fs::canonicalize(dst)
                        .with_context(|| format!("resolving symlink '{}'", show(dst)))?;
                    let target_is_dir = std::fs::symlink_metadata(&target)
                        .with_context(|| format!("getting status of '{}'", target.display()))?
                        .is_dir();
                    if !target_is_dir {
                        bail!(
                            "collision between '{}' and non-directory '{}'",
                            show(src),
                            target.display()
                        );
                    }
                    std::fs::remove_file(dst)
                        .with_context(|| format!("unlinking '{}'", show(dst)))?;
                    std::fs::DirBuilder::new()
                        .mode(0o755)
                        .create(dst)
                        .with_context(|| format!("creating directory '{}'", show(dst)))?;
                    let previous = self.priority_of(dst);
                    self.link_dir(target.as_os_str(), dst, previous)?;
                    return self.link_dir(src, dst, priority);
                }
            } else if kind.is_symlink() {
                let previous = self.priority_of(dst);
                if previous == priority {
                    let other = std::fs::read_link(dst)
                        .with_context(|| format!("reading symbolic link '{}'", show(dst)))?;
                    bail!(
                        "packages '{}' and '{}' have the same priority {}; use 'nix-env --set-flag \
                         priority NUMBER INSTALLED_PKGNAME' to change the priority of one of the \
                         conflicting packages (0 being the highest priority)",
                        show(src),
                        other.display(),
                        priority
                    );
                }
                if previous < priority {
                    return Ok(());
                }
                std::fs::remove_file(dst).with_context(|| format!("unlinking '{}'", show(dst)))?;
            } else if kind.is_dir() {
                bail!(
                    "collision between non-directory '{}' and directory '{}'",
                    show(src),
                    show(dst)
                );
            }
        }

        symlink(src, dst)?;
        self.priorities.insert(dst.to_os_string(), priority);
        self.links += 1;
        Ok(())
    }
}

/// The packages `pkg` asks to be installed along with it.
fn propagated(pkg: &OsStr) -> anyhow::Result<Vec<OsString>> {
    let file = join(pkg, OsStr::new("nix-support/propagated-user-env-packages"));
    match std::fs::read(&file) {
        Ok(text) => Ok(tokens(&text, b" \n")
            .map(|t| OsString::from_vec(t.to_vec()))
            .collect()),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
            Ok(Vec::new())
        }
        Err(e) => Err(e).with_context(|| format!("reading file '{}'", show(&file))),
    }
}

/// Links the active packages and, after them, everything they propagate into `out`.
/// Returns the number of symlinks made.
fn build_profile(out: &OsStr, mut pkgs: Vec<Package>) -> anyhow::Result<u64> {
    let mut state = State::default();
    let mut done: HashSet<OsString> = HashSet::new();
    let mut postponed: BTreeSet<OsString> = BTreeSet::new();

    let mut add =
        |state: &mut State, pkg: &OsStr, priority: i32, postponed: &mut BTreeSet<OsString>| {
            if !done.insert(pkg.to_os_string()) {
                return Ok(());
            }
            state.link_dir(pkg, out, priority)?;
            for p in propagated(pkg)? {
                if !done.contains(&p) {
                    postponed.insert(p);
                }
            }
            anyhow::Ok(())
        };

    // Lowest priority number first, so that fewer links get replaced later.
    pkgs.sort_by(|a, b| (a.priority, a.path.as_bytes()).cmp(&(b.priority, b.path.as_bytes())));
    for pkg in pkgs.iter().filter(|p| p.active) {
        add(&mut state, &pkg.path, pkg.priority, &mut postponed)?;
    }

    let mut priority = PROPAGATED_PRIORITY;
    while !postponed.is_empty() {
        let round = std::mem::take(&mut postponed);
        for pkg in round {
            add(&mut state, &pkg, priority, &mut postponed)?;
            priority = priority.saturating_add(1);
        }
    }
    Ok(state.links)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    fn write(root: &Path, rel: &str, text: &str) -> anyhow::Result<()> {
        let p = root.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, text)?;
        Ok(())
    }

    fn pkg(path: &Path, priority: i32) -> Package {
        Package {
            path: path.as_os_str().to_os_string(),
            active: true,
            priority,
        }
    }

    fn link_target(p: &Path) -> anyhow::Result<PathBuf> {
        let meta = fs::symlink_metadata(p).with_context(|| format!("{}", p.display()))?;
        anyhow::ensure!(
            meta.file_type().is_symlink(),
            "{} is not a symlink",
            p.display()
        );
        Ok(fs::read_link(p)?)
    }

    fn is_real_dir(p: &Path) -> bool {
        fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
    }

    #[test]
    fn parses_derivations_attribute() -> anyhow::Result<()> {
        let pkgs = parse_derivations(b"true 5 1 /s/a  false -3 2 /s/b /s/c\n1 7x 0 true 0 1 /s/d")?;
        let want = vec![
            Package {
                path: "/s/a".into(),
                active: true,
                priority: 5,
            },
            Package {
                path: "/s/b".into(),
                active: false,
                priority: -3,
            },
            Package {
                path: "/s/c".into(),
                active: false,
                priority: -3,
            },
            Package {
                path: "/s/d".into(),
                active: true,
                priority: 0,
            },
        ];
        assert_eq!(pkgs, want);
        assert!(parse_derivations(b"true 5 2 /s/a").is_err());
        assert!(parse_derivations(b"true five 1 /s/a").is_err());
        assert!(parse_derivations(b"true 99999999999 1 /s/a").is_err());
        assert!(parse_derivations(b"").is_ok_and(|p| p.is_empty()));
        Ok(())
    }

    #[test]
    fn merges_trees_and_resolves_priorities() -> anyhow::Result<()> {
        let guard = tempfile::tempdir()?;
        let root = &fs::canonicalize(guard.path())?;
        let a = root.join("a-1.0");
        let b = root.join("b-2.0");
        let c = root.join("c-prop");
        let d = root.join("d-prop2");
        write(&a, "bin/tool", "a")?;
        write(&a, "bin/shared", "a")?;
        write(&a, "share/a/doc", "a")?;
        write(&a, "share/info/dir", "a")?;
        write(&a, ".hidden", "a")?;
        write(
            &a,
            "nix-support/propagated-user-env-packages",
            &format!("{} \n", c.display()),
        )?;
        write(&b, "bin/other", "b")?;
        write(&b, "bin/shared", "b")?;
        write(&b, "lib/libb.so", "b")?;
        write(&b, "log", "b")?;
        write(&b, "share/info/dir", "b")?;
        write(&b, "share/info/b.info", "b")?;
        write(&a, "share/info/a.info", "a")?;
        std::os::unix::fs::symlink(root.join("nowhere"), b.join("dangling"))?;
        // A propagated package loses against explicitly installed ones, even with a
        // smaller priority number of its own, and propagates further.
        write(&c, "bin/tool", "c")?;
        write(&c, "lib/libc.so", "c")?;
        write(
            &c,
            "nix-support/propagated-user-env-packages",
            &format!("{}\n{}", d.display(), a.display()),
        )?;
        write(&d, "share/d/doc", "d")?;

        let out = root.join("out");
        let manifest = root.join("env-manifest.nix");
        // `b` has the better priority: its bin/shared wins over `a`'s.
        let mut inactive = pkg(&root.join("missing"), 0);
        inactive.active = false;
        build_env(&out, &manifest, vec![pkg(&a, 5), pkg(&b, 3), inactive])?;

        assert!(
            is_real_dir(&out.join("bin")),
            "bin should be merged into a real directory"
        );
        assert_eq!(link_target(&out.join("bin/tool"))?, a.join("bin/tool"));
        assert_eq!(link_target(&out.join("bin/other"))?, b.join("bin/other"));
        assert_eq!(link_target(&out.join("bin/shared"))?, b.join("bin/shared"));
        assert_eq!(fs::read_to_string(out.join("bin/shared"))?, "b");
        // lib: first a symlink to b's lib, then expanded when c brings its own lib.
        assert!(is_real_dir(&out.join("lib")));
        assert_eq!(
            link_target(&out.join("lib/libb.so"))?,
            b.join("lib/libb.so")
        );
        assert_eq!(
            link_target(&out.join("lib/libc.so"))?,
            c.join("lib/libc.so")
        );
        // share: a real directory from a, gaining d's entry; info/dir is left out.
        assert_eq!(link_target(&out.join("share/a"))?, a.join("share/a"));
        assert_eq!(link_target(&out.join("share/d"))?, d.join("share/d"));
        // share/info is in a and b: merged, without their `dir` files.
        assert!(is_real_dir(&out.join("share/info")));
        assert_eq!(
            link_target(&out.join("share/info/a.info"))?,
            a.join("share/info/a.info")
        );
        assert_eq!(
            link_target(&out.join("share/info/b.info"))?,
            b.join("share/info/b.info")
        );
        assert!(fs::symlink_metadata(out.join("share/info/dir")).is_err());
        for skipped in [".hidden", "nix-support", "log", "dangling"] {
            assert!(
                fs::symlink_metadata(out.join(skipped)).is_err(),
                "{skipped} should be skipped"
            );
        }
        assert_eq!(link_target(&out.join("manifest.nix"))?, manifest);
        Ok(())
    }

    #[test]
    fn info_subdirectory_of_single_package_stays_a_link() -> anyhow::Result<()> {
        let guard = tempfile::tempdir()?;
        let tmp = fs::canonicalize(guard.path())?;
        let a = tmp.join("a");
        write(&a, "share/info/dir", "x")?;
        write(&a, "share/info/a.info", "x")?;
        let out = tmp.join("out");
        build_env(&out, Path::new("/m"), vec![pkg(&a, 5)])?;
        // The top-level `share` is simply linked: nothing needs merging.
        assert_eq!(link_target(&out.join("share"))?, a.join("share"));
        Ok(())
    }

    #[test]
    fn equal_priorities_collide() -> anyhow::Result<()> {
        let guard = tempfile::tempdir()?;
        let tmp = fs::canonicalize(guard.path())?;
        let a = tmp.join("foo-1.0");
        let b = tmp.join("foo-2.0");
        write(&a, "bin/foo", "1")?;
        write(&b, "bin/foo", "2")?;
        let out = tmp.join("out");
        let err = build_env(&out, Path::new("/m"), vec![pkg(&b, 5), pkg(&a, 5)])
            .err()
            .ok_or_else(|| anyhow!("a collision was expected"))?;
        // Sorted by path: foo-1.0 is linked first, foo-2.0 collides with it.
        let want = format!(
            "packages '{}' and '{}' have the same priority 5; use 'nix-env --set-flag priority \
             NUMBER INSTALLED_PKGNAME' to change the priority of one of the conflicting packages \
             (0 being the highest priority)",
            b.join("bin/foo").display(),
            a.join("bin/foo").display()
        );
        assert_eq!(format!("{err:#}"), want);
        Ok(())
    }

    #[test]
    fn file_against_directory_collides() -> anyhow::Result<()> {
        let guard = tempfile::tempdir()?;
        let tmp = fs::canonicalize(guard.path())?;
        let a = tmp.join("a");
        let a2 = tmp.join("a2");
        let b = tmp.join("b");
        let c = tmp.join("c");
        write(&a2, "etc/x/q", "dir")?;
        write(&a, "etc/x/y", "dir")?;
        write(&a, "etc/z", "a")?;
        write(&b, "etc/x", "file")?;
        write(&b, "etc/w", "b")?;
        write(&c, "etc/x/y", "c")?;
        let out = tmp.join("out");
        let err = build_env(
            &out,
            Path::new("/m"),
            vec![pkg(&a, 1), pkg(&a2, 1), pkg(&b, 2)],
        )
        .err()
        .ok_or_else(|| anyhow!("a collision was expected"))?;
        assert_eq!(
            format!("{err:#}"),
            format!(
                "collision between non-directory '{}' and directory '{}'",
                b.join("etc/x").display(),
                out.join("etc/x").display()
            )
        );

        // The other way round: a directory against a link to a file.
        let out2 = tmp.join("out2");
        let err = build_env(&out2, Path::new("/m"), vec![pkg(&b, 1), pkg(&c, 2)])
            .err()
            .ok_or_else(|| anyhow!("a collision was expected"))?;
        let target = fs::canonicalize(b.join("etc/x"))?;
        assert_eq!(
            format!("{err:#}"),
            format!(
                "collision between '{}' and non-directory '{}'",
                c.join("etc/x").display(),
                target.display()
            )
        );
        Ok(())
    }

    #[test]
    fn non_directory_package_is_skipped() -> anyhow::Result<()> {
        let guard = tempfile::tempdir()?;
        let tmp = fs::canonicalize(guard.path())?;
        let file = tmp.join("just-a-file");
        fs::write(&file, "x")?;
        let a = tmp.join("a");
        write(&a, "bin/a", "a")?;
        let out = tmp.join("out");
        build_env(&out, Path::new("/m"), vec![pkg(&file, 5), pkg(&a, 5)])?;
        assert_eq!(link_target(&out.join("bin"))?, a.join("bin"));
        Ok(())
    }
}
