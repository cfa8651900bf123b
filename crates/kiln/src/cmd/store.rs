//! `kiln store …`: the local store from the command line (the `nix-store` operations).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;
use kiln_format::{FileIngestionMethod, Hash, HashAlgo, StorePath, ValidPathInfo};
use kiln_store::verify::{VerifyOptions, VerifyReport};
use kiln_store::{export, optimise, roots, verify, LocalStore};

use super::access::{Access, Collect};
use super::common::StoreArgs;

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Add files or trees to the store (content-addressed, like `nix-store --add`); prints
    /// their store paths.
    Add {
        /// Name of the item (default: the file name).
        #[arg(long)]
        name: Option<String>,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Add files as fixed-output paths (`nix-store --add-fixed [--recursive] ALGO PATH...`).
    AddFixed {
        #[arg(long, short)]
        recursive: bool,
        algo: HashAlgo,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show what the store knows about paths.
    PathInfo {
        /// Print JSON (the shape of `nix path-info --json`).
        #[arg(long)]
        json: bool,
        /// Also show the closure size (`-S`).
        #[arg(long, short = 'S')]
        closure_size: bool,
        /// Show the whole closure of the paths.
        #[arg(long, short)]
        recursive: bool,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Query references, referrers, closures, derivers, hashes (`nix-store -q`).
    Query {
        #[command(flatten)]
        what: QueryWhat,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Write paths in `nix-store --export` format to standard output.
    Export {
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Read a `nix-store --export` stream from standard input; prints the imported paths.
    Import,
    /// Collect garbage.
    Gc {
        /// Stop after freeing this many bytes.
        #[arg(long, value_name = "BYTES")]
        max_freed: Option<u64>,
        /// Only print what would be deleted.
        #[arg(long, alias = "print-dead")]
        dry_run: bool,
        /// Print the live paths instead.
        #[arg(long)]
        print_live: bool,
        /// Print the roots (`link -> path`).
        #[arg(long)]
        print_roots: bool,
    },
    /// Delete specific paths if nothing keeps them alive (`nix-store --delete`).
    Delete {
        #[arg(required = true)]
        paths: Vec<String>,
        /// Skip the paths that are still alive instead of failing (`nix store delete
        /// --skip-alive`).
        #[arg(long)]
        skip_alive: bool,
        /// Delete the paths' dead referrers too (`nix store delete --also-referrers`).
        #[arg(long)]
        also_referrers: bool,
    },
    /// Speak the serve protocol on standard input and output, as `nix-store --serve` does
    /// for `ssh://` stores and remote builders (point a machines-file entry's
    /// `remote-program` at a wrapper that runs this).
    Serve {
        /// Allow adding paths and building (`--write`).
        #[arg(long)]
        write: bool,
    },
    /// Deduplicate identical files with hard links.
    Optimise,
    /// Check the store: missing paths, and with --check-contents, modified ones.
    Verify {
        #[arg(long)]
        check_contents: bool,
        #[arg(long)]
        repair: bool,
    },
    /// Make LINK a garbage-collector root for PATH.
    AddRoot {
        #[arg(long)]
        link: PathBuf,
        path: String,
    },
    /// Print the database in `nix-store --dump-db` format.
    DumpDb { paths: Vec<String> },
    /// Register paths from a `nix-store --dump-db` stream on standard input (`--load-db`).
    LoadDb,
    /// Register paths already on disk, from `nix-store --register-validity` input.
    RegisterValidity {
        /// The input gives each path's hash and size (else they are computed).
        #[arg(long)]
        hash_given: bool,
        /// Re-register paths that are already valid.
        #[arg(long)]
        reregister: bool,
    },
    /// List or clear cached build failures.
    Failed {
        /// Clear these (or, with none given, all) cached failures.
        #[arg(long)]
        clear: bool,
        paths: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct QueryWhat {
    #[arg(long)]
    pub(super) references: bool,
    #[arg(long)]
    pub(super) referrers: bool,
    /// The closure (`-R`).
    #[arg(long, short = 'R')]
    pub(super) requisites: bool,
    #[arg(long)]
    pub(super) referrers_closure: bool,
    /// The deriver recorded for each path.
    #[arg(long, short = 'd')]
    pub(super) deriver: bool,
    #[arg(long)]
    pub(super) valid_derivers: bool,
    /// The outputs of derivations.
    #[arg(long)]
    pub(super) outputs: bool,
    /// The NAR hash.
    #[arg(long)]
    pub(super) hash: bool,
    /// The NAR size.
    #[arg(long)]
    pub(super) size: bool,
    /// The roots that keep each path alive.
    #[arg(long)]
    pub(super) roots: bool,
}

pub(super) fn parse(store: &LocalStore, s: &str) -> anyhow::Result<StorePath> {
    // Accept paths below a store path (and the physical form of a --root store), like Nix.
    let logical =
        if let Ok(rest) = std::path::Path::new(s).strip_prefix(&store.layout().real_store_dir) {
            format!("{}/{}", store.store_dir(), rest.display())
        } else {
            s.to_string()
        };
    if let Ok(p) = store.parse_path(&logical) {
        return Ok(p);
    }
    let abs = std::path::absolute(&logical)?;
    let (p, _) = store
        .store_dir()
        .to_store_path(&abs.to_string_lossy())
        .with_context(|| format!("'{s}' is not in the store"))?;
    Ok(p)
}

fn parse_valid(store: &LocalStore, s: &str) -> anyhow::Result<StorePath> {
    let p = parse(store, s)?;
    if !store.is_valid(&p)? {
        bail!("path '{}' is not valid", store.print(&p));
    }
    Ok(p)
}

fn name_for(p: &std::path::Path, name: &Option<String>) -> anyhow::Result<String> {
    if let Some(n) = name {
        return Ok(n.clone());
    }
    let abs = std::path::absolute(p)?;
    Ok(abs
        .file_name()
        .context("path has no file name")?
        .to_string_lossy()
        .into_owned())
}

/// `nix path-info --json` for one path, its closure's size given.
fn info_json_of(
    sd: &kiln_format::StoreDir,
    info: &ValidPathInfo,
    closure_size: Option<u64>,
) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let print = |p: &StorePath| sd.display(p);
    let mut m = Map::new();
    m.insert("path".into(), json!(print(&info.path)));
    m.insert("narHash".into(), json!(info.nar_hash.to_sri()));
    m.insert("narSize".into(), json!(info.nar_size));
    m.insert(
        "references".into(),
        Value::Array(info.references.iter().map(|r| json!(print(r))).collect()),
    );
    if let Some(ca) = &info.ca {
        m.insert("ca".into(), json!(ca.to_string()));
    }
    if let Some(total) = closure_size {
        m.insert("closureSize".into(), json!(total));
    }
    if let Some(d) = &info.deriver {
        m.insert("deriver".into(), json!(print(d)));
    }
    if info.registration_time != 0 {
        m.insert("registrationTime".into(), json!(info.registration_time));
    }
    if info.ultimate {
        m.insert("ultimate".into(), json!(true));
    }
    if !info.sigs.is_empty() {
        m.insert(
            "signatures".into(),
            Value::Array(info.sigs.iter().map(|s| json!(s)).collect()),
        );
    }
    Value::Object(m)
}

fn print_report(r: &VerifyReport) {
    for p in &r.problems {
        eprintln!("{p}");
    }
    for p in &r.repaired {
        eprintln!("repaired '{p}'");
    }
}

/// What a collection did, as `nix-store --gc` says it: each deleted path on standard error
/// and the total on standard output, or the paths it found (a dry run, `--print-live`).
fn print_collected(
    out: &mut impl Write,
    paths: &[String],
    bytes_freed: u64,
    deleting: bool,
) -> anyhow::Result<()> {
    if !deleting {
        for p in paths {
            writeln!(out, "{p}")?;
        }
        return Ok(());
    }
    let mut err = BufWriter::new(std::io::stderr().lock());
    for p in paths {
        writeln!(err, "deleting '{p}'")?;
    }
    err.flush()?;
    writeln!(
        out,
        "{} store paths deleted, {:.2} MiB freed",
        paths.len(),
        bytes_freed as f64 / (1 << 20) as f64
    )?;
    Ok(())
}

/// The commands that read, add or collect paths, the same whether the store is this
/// process's or a daemon's: `add`, `add-fixed`, `path-info`, `query`, `gc`, `delete`.
pub(super) fn shared(a: &mut dyn Access, cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    let sd = a.store_dir().clone();
    let print = |p: &StorePath| sd.display(p);
    let mut out = BufWriter::new(std::io::stdout().lock());
    match cmd {
        StoreCmd::Add { name, paths } => {
            for p in &paths {
                let sp = a.add(
                    p,
                    &name_for(p, &name)?,
                    FileIngestionMethod::Recursive,
                    HashAlgo::Sha256,
                )?;
                writeln!(out, "{}", print(&sp))?;
            }
        }
        StoreCmd::AddFixed {
            recursive,
            algo,
            paths,
        } => {
            let method = if recursive {
                FileIngestionMethod::Recursive
            } else {
                FileIngestionMethod::Flat
            };
            for p in &paths {
                let sp = a.add(p, &name_for(p, &None)?, method, algo)?;
                writeln!(out, "{}", print(&sp))?;
            }
        }
        StoreCmd::PathInfo {
            json,
            closure_size,
            recursive,
            paths,
        } => {
            let mut set = BTreeSet::new();
            let mut invalid = Vec::new();
            for s in &paths {
                let p = a.parse(s)?;
                if a.is_valid(&p)? {
                    set.insert(p);
                } else {
                    invalid.push(p);
                }
            }
            if recursive {
                let named: Vec<StorePath> = set.iter().cloned().collect();
                set = a.closure(&named, false)?;
            }
            let size_of_closure = |a: &mut dyn Access, p: &StorePath| -> anyhow::Result<u64> {
                let mut total = 0;
                for q in a.closure(std::slice::from_ref(p), false)? {
                    total += a.info(&q)?.nar_size;
                }
                Ok(total)
            };
            if json {
                let mut arr = Vec::new();
                for p in &set {
                    let info = a.info(p)?;
                    let total = if closure_size {
                        Some(size_of_closure(a, p)?)
                    } else {
                        None
                    };
                    arr.push(info_json_of(&sd, &info, total));
                }
                for p in &invalid {
                    arr.push(serde_json::json!({"path": print(p), "valid": false}));
                }
                writeln!(out, "{}", serde_json::Value::Array(arr))?;
            } else {
                for p in &set {
                    let info = a.info(p)?;
                    if closure_size {
                        let total = size_of_closure(a, p)?;
                        writeln!(out, "{}\t{}\t{}", print(p), info.nar_size, total)?;
                    } else {
                        writeln!(out, "{}\t{}", print(p), info.nar_size)?;
                    }
                }
            }
            if !invalid.is_empty() {
                out.flush()?;
                for p in &invalid {
                    eprintln!("error: path '{}' is not valid", print(p));
                }
                return Ok(ExitCode::from(1));
            }
        }
        StoreCmd::Query { what, paths } => {
            let targets: Vec<StorePath> = paths
                .iter()
                .map(|s| a.parse(s))
                .collect::<anyhow::Result<_>>()?;
            let valid = |a: &mut dyn Access, p: &StorePath| -> anyhow::Result<()> {
                if !a.is_valid(p)? {
                    bail!("path '{}' is not valid", print(p));
                }
                Ok(())
            };
            let mut lines: Vec<String> = Vec::new();
            if what.requisites || what.referrers_closure {
                // Dependencies first, as `nix-store -qR` prints them.
                lines = a.closure_in_order(&targets, what.referrers_closure)?;
            } else {
                let mut seen = BTreeSet::new();
                for p in &targets {
                    let items: Vec<String> = if what.references {
                        a.references(p)?.iter().map(print).collect()
                    } else if what.referrers {
                        valid(a, p)?;
                        a.referrers(p)?.iter().map(print).collect()
                    } else if what.deriver {
                        vec![a
                            .info(p)?
                            .deriver
                            .map(|d| print(&d))
                            .unwrap_or_else(|| "unknown-deriver".into())]
                    } else if what.valid_derivers {
                        a.valid_derivers(p)?.iter().map(print).collect()
                    } else if what.outputs {
                        if p.is_derivation() {
                            a.output_map(p)?.values().flatten().map(print).collect()
                        } else {
                            vec![print(p)]
                        }
                    } else if what.hash {
                        vec![a.info(p)?.nar_hash.to_string()]
                    } else if what.size {
                        vec![a.info(p)?.nar_size.to_string()]
                    } else {
                        // --roots: roots whose closure contains p.
                        valid(a, p)?;
                        let referrers = a.closure(std::slice::from_ref(p), true)?;
                        a.roots()?
                            .into_iter()
                            .filter(|(_, t)| referrers.contains(t))
                            .map(|(l, t)| format!("{l} -> {}", print(&t)))
                            .collect()
                    };
                    for i in items {
                        if what.hash || what.size || what.deriver || seen.insert(i.clone()) {
                            lines.push(i);
                        }
                    }
                }
            }
            for l in lines {
                writeln!(out, "{l}")?;
            }
        }
        StoreCmd::Gc {
            max_freed,
            dry_run,
            print_live,
            print_roots,
        } => {
            if print_roots {
                for (l, t) in a.roots()? {
                    writeln!(out, "{l} -> {}", print(&t))?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            let what = if print_live {
                Collect::Live
            } else if dry_run {
                Collect::Dead
            } else {
                Collect::Delete
            };
            let (paths, freed) = a.collect(what, max_freed.unwrap_or(u64::MAX))?;
            print_collected(&mut out, &paths, freed, what == Collect::Delete)?;
        }
        StoreCmd::Delete {
            paths,
            skip_alive,
            also_referrers,
        } => {
            let ps: Vec<StorePath> = paths
                .iter()
                .map(|s| a.parse(s))
                .collect::<anyhow::Result<_>>()?;
            let (deleted, freed) = a.delete(ps, skip_alive, also_referrers)?;
            print_collected(&mut out, &deleted, freed, true)?;
        }
        _ => unreachable!("only the shared commands come here"),
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: &StoreArgs, cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    if let StoreCmd::Serve { write } = cmd {
        return super::daemon::serve_legacy(args, write);
    }
    if let Some((d, _, _)) = args.daemon()? {
        return super::store_via_daemon::run(d, cmd);
    }
    let (store, settings) = args.open()?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    match cmd {
        cmd @ (StoreCmd::Add { .. }
        | StoreCmd::AddFixed { .. }
        | StoreCmd::PathInfo { .. }
        | StoreCmd::Query { .. }
        | StoreCmd::Gc { .. }
        | StoreCmd::Delete { .. }) => {
            drop(out);
            return shared(&mut super::access::Local(&store), cmd);
        }
        StoreCmd::Export { paths } => {
            let set: BTreeSet<StorePath> = paths
                .iter()
                .map(|s| parse_valid(&store, s))
                .collect::<anyhow::Result<_>>()?;
            export::export_paths(&store, &set, &mut out)?;
        }
        StoreCmd::Import => {
            let mut input = BufReader::with_capacity(256 * 1024, std::io::stdin().lock());
            for p in export::import_paths(&store, &mut input)? {
                writeln!(out, "{}", store.print(&p))?;
            }
        }
        StoreCmd::Serve { .. } => unreachable!("served above"),
        StoreCmd::Optimise => {
            let s = optimise::optimise_store(&store)?;
            writeln!(
                out,
                "{:.2} MiB freed by hard-linking {} files",
                s.bytes_freed as f64 / (1 << 20) as f64,
                s.files_linked
            )?;
        }
        StoreCmd::Verify {
            check_contents,
            repair,
        } => {
            // With --repair, damaged paths are substituted again (the configured caches)
            // or rebuilt, by a scheduler of this process.
            let store = std::sync::Arc::new(store);
            let bs = std::sync::Arc::new(kiln_build::BuildSettings::from_settings(&settings));
            let scheduler = repair.then(|| {
                kiln_build::Scheduler::start(kiln_build::SchedulerConfig {
                    max_substitution_jobs: bs.max_substitution_jobs,
                    substituter: Some(kiln_substitute::for_store(&store, &settings)),
                    ..kiln_build::SchedulerConfig::local(store.clone(), bs.max_jobs)
                })
            });
            let repairer = scheduler
                .as_ref()
                .map(|s| kiln_build::repair::SchedulerRepairer {
                    scheduler: s,
                    settings: bs.clone(),
                });
            let r = verify::verify_store(
                &store,
                VerifyOptions {
                    check_contents,
                    repair,
                },
                repairer
                    .as_ref()
                    .map(|r| r as &dyn kiln_store::verify::Repairer),
            )?;
            drop(repairer);
            drop(scheduler);
            print_report(&r);
            if !r.is_clean() {
                return Ok(ExitCode::from(1));
            }
        }
        StoreCmd::AddRoot { link, path } => {
            // A temporary root first, then the check that the path is still there: a
            // collection already running read the roots at its start and would not see
            // the new link, but it does see temporary roots added meanwhile (the power-cut
            // test, which collects beside adds, found a path deleted under its new root).
            let p = parse(&store, &path)?;
            store.add_temp_root(&p)?;
            if !store.is_valid(&p)? {
                bail!("path '{}' is not valid", store.print(&p));
            }
            let l = roots::add_perm_root(store.layout(), &p, &link)?;
            writeln!(out, "{}", l.display())?;
        }
        StoreCmd::DumpDb { paths } => {
            let set: BTreeSet<StorePath> = if paths.is_empty() {
                store.query_all_valid_paths()?
            } else {
                paths
                    .iter()
                    .map(|s| parse_valid(&store, s))
                    .collect::<anyhow::Result<_>>()?
            };
            for p in set {
                let i = store.path_info(&p)?;
                writeln!(
                    out,
                    "{}\n{}\n{}",
                    store.print(&p),
                    i.nar_hash.to_base16(),
                    i.nar_size
                )?;
                writeln!(
                    out,
                    "{}",
                    i.deriver.map(|d| store.print(&d)).unwrap_or_default()
                )?;
                writeln!(out, "{}", i.references.len())?;
                for r in &i.references {
                    writeln!(out, "{}", store.print(r))?;
                }
            }
        }
        StoreCmd::LoadDb => register_validity(&store, true, true, false)?,
        StoreCmd::RegisterValidity {
            hash_given,
            reregister,
        } => register_validity(&store, hash_given, reregister, true)?,
        StoreCmd::Failed { clear, paths } => {
            if clear {
                if paths.is_empty() {
                    store.clear_failed_paths(None)?;
                } else {
                    let ps: Vec<StorePath> = paths
                        .iter()
                        .map(|s| parse(&store, s))
                        .collect::<anyhow::Result<_>>()?;
                    store.clear_failed_paths(Some(&ps))?;
                }
            } else {
                for p in store.query_failed_paths()? {
                    writeln!(out, "{p}")?;
                }
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `--load-db` / `--register-validity`: path, [hash, size,] deriver, count, references.
fn register_validity(
    store: &LocalStore,
    hash_given: bool,
    reregister: bool,
    canonicalise: bool,
) -> anyhow::Result<()> {
    let stdin = std::io::stdin().lock();
    let mut lines = stdin.lines();
    let mut next = |what: &str| -> anyhow::Result<String> {
        lines
            .next()
            .transpose()?
            .with_context(|| format!("missing input: expected {what}"))
    };
    let mut infos = Vec::new();
    let me = (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    );
    let store_fd = rustix::fs::open(
        &store.layout().real_store_dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .with_context(|| format!("opening '{}'", store.layout().real_store_dir.display()))?;
    loop {
        let path_line = match lines_next_or_end(&mut next)? {
            Some(l) => l,
            None => break,
        };
        let p = store.parse_path(&path_line)?;
        let (hash, size) = if hash_given {
            let h = Hash::parse_any(&next("a hash")?, Some(HashAlgo::Sha256))?;
            let n: u64 = next("a size")?.trim().parse().context("bad size")?;
            (Some(h), n)
        } else {
            (None, 0)
        };
        let deriver = next("a deriver")?;
        let count: usize = next("a reference count")?
            .trim()
            .parse()
            .context("bad reference count")?;
        let mut refs = BTreeSet::new();
        for _ in 0..count {
            refs.insert(store.parse_path(&next("a reference")?)?);
        }
        let real = store.real_path(&p);
        if canonicalise {
            let name = std::ffi::CString::new(p.base_name())?;
            let own = kiln_store::fsutil::Ownership {
                expected_uid: None,
                target: me,
            };
            kiln_store::fsutil::canonicalise_at(&store_fd, &name, &real, own)?;
        }
        let (hash, size) = match hash {
            Some(h) => (h, size),
            None => verify::hash_path(store, &p)?,
        };
        let mut info = ValidPathInfo::new(p, hash, size);
        info.references = refs;
        if !deriver.is_empty() {
            info.deriver = Some(store.parse_path(&deriver)?);
        }
        infos.push(info);
    }
    if !reregister {
        let valid = store.query_valid_paths(infos.iter().map(|i| &i.path))?;
        infos.retain(|i| !valid.contains(&i.path));
    }
    store.register_valid_paths(&infos)?;
    Ok(())
}

fn lines_next_or_end(
    next: &mut impl FnMut(&str) -> anyhow::Result<String>,
) -> anyhow::Result<Option<String>> {
    match next("a path") {
        Ok(l) if l.is_empty() => Ok(None),
        Ok(l) => Ok(Some(l)),
        Err(e) if e.to_string().contains("missing input") => Ok(None),
        Err(e) => Err(e),
    }
}
