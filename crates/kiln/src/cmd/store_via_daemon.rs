//! `kiln store …` through the daemon (see `via_daemon`): the commands a person without
//! write access to the store needs, printing what they print on a store of their own.

use std::collections::BTreeSet;
use std::io::{BufWriter, Write};
use std::process::ExitCode;

use anyhow::bail;
use kiln_format::{FileIngestionMethod, HashAlgo, StorePath};
use kiln_protocol::ops::GcAction;
use kiln_store::Layout;

use super::store::{info_json_of, name_for, StoreCmd};
use super::via_daemon::DaemonStore;

fn mib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1 << 20) as f64)
}

pub(super) fn run(mut d: DaemonStore, _layout: &Layout, cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    let sd = d.sd.clone();
    let print = |p: &StorePath| sd.display(p);
    let mut out = BufWriter::new(std::io::stdout().lock());
    match cmd {
        StoreCmd::Add { name, paths } => {
            for p in &paths {
                let sp = d.add_path(
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
                let sp = d.add_path(p, &name_for(p, &None)?, method, algo)?;
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
                let p = d.parse(s)?;
                if d.is_valid(&p)? {
                    set.insert(p);
                } else {
                    invalid.push(p);
                }
            }
            if recursive {
                let named: Vec<StorePath> = set.iter().cloned().collect();
                set = d.closure(&named, false)?;
            }
            let size_of_closure = |d: &mut DaemonStore, p: &StorePath| -> anyhow::Result<u64> {
                let mut total = 0;
                for q in d.closure(std::slice::from_ref(p), false)? {
                    total += d.valid_info(&q)?.nar_size;
                }
                Ok(total)
            };
            if json {
                let mut arr = Vec::new();
                for p in &set {
                    let info = d.valid_info(p)?;
                    let total = if closure_size {
                        Some(size_of_closure(&mut d, p)?)
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
                    let info = d.valid_info(p)?;
                    if closure_size {
                        let total = size_of_closure(&mut d, p)?;
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
                .map(|s| d.parse(s))
                .collect::<anyhow::Result<_>>()?;
            let mut lines: Vec<String> = Vec::new();
            if what.requisites || what.referrers_closure {
                lines = d.closure_in_order(&targets, what.referrers_closure)?;
            } else {
                let mut seen = BTreeSet::new();
                for p in &targets {
                    let items: Vec<String> = if what.references {
                        let i = d.valid_info(p)?;
                        i.references.iter().map(print).collect()
                    } else if what.referrers {
                        d.valid_info(p)?;
                        d.referrers(p)?.iter().map(print).collect()
                    } else if what.deriver {
                        let i = d.valid_info(p)?;
                        vec![i
                            .deriver
                            .map(|x| print(&x))
                            .unwrap_or_else(|| "unknown-deriver".into())]
                    } else if what.valid_derivers {
                        d.valid_derivers(p)?.iter().map(print).collect()
                    } else if what.outputs {
                        if p.is_derivation() {
                            d.output_map(p)?.values().flatten().map(print).collect()
                        } else {
                            vec![print(p)]
                        }
                    } else if what.hash {
                        vec![d.valid_info(p)?.nar_hash.to_string()]
                    } else if what.size {
                        vec![d.valid_info(p)?.nar_size.to_string()]
                    } else {
                        // --roots: the roots whose closure holds p (the daemon lists them).
                        d.valid_info(p)?;
                        let referrers = d.closure(std::slice::from_ref(p), true)?;
                        d.roots()?
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
                for (l, t) in d.roots()? {
                    writeln!(out, "{l} -> {}", print(&t))?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            let action = if print_live {
                GcAction::ReturnLive
            } else if dry_run {
                GcAction::ReturnDead
            } else {
                GcAction::DeleteDead
            };
            let (paths, freed) = d.gc(action, BTreeSet::new(), false, max_freed.unwrap_or(u64::MAX))?;
            if action == GcAction::DeleteDead {
                let mut err = BufWriter::new(std::io::stderr().lock());
                for p in &paths {
                    writeln!(err, "deleting '{p}'")?;
                }
                err.flush()?;
                writeln!(out, "{} store paths deleted, {} MiB freed", paths.len(), mib(freed))?;
            } else {
                for p in &paths {
                    writeln!(out, "{p}")?;
                }
            }
        }
        StoreCmd::Delete {
            paths,
            skip_alive,
            also_referrers,
        } => {
            let ps: BTreeSet<StorePath> = paths
                .iter()
                .map(|s| d.parse(s))
                .collect::<anyhow::Result<_>>()?;
            // Dead ones among those named (skipping the live), or all of them (failing on
            // a live one).
            let action = if skip_alive {
                GcAction::DeleteDead
            } else {
                GcAction::DeleteSpecific
            };
            let (deleted, freed) = d.gc(action, ps, also_referrers, u64::MAX)?;
            for p in &deleted {
                eprintln!("deleting '{p}'");
            }
            writeln!(out, "{} store paths deleted, {} MiB freed", deleted.len(), mib(freed))?;
        }
        StoreCmd::Verify {
            check_contents,
            repair,
        } => {
            // The daemon reports what it found as it goes; the answer says whether
            // anything is left wrong.
            if d.verify(check_contents, repair)? {
                out.flush()?;
                eprintln!("error: the store has problems (see above)");
                return Ok(ExitCode::from(1));
            }
        }
        other => bail!(
            "'kiln store {}' needs write access to the store; through the daemon only add, add-fixed, path-info, query, gc, delete and verify work",
            format!("{other:?}")
                .split([' ', '{', '('])
                .next()
                .unwrap_or("")
                .to_lowercase()
        ),
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
