//! `kiln store …` through the daemon (see `via_daemon`): the commands a person without
//! write access to the store needs, printing what they print on a store of their own.

use std::collections::BTreeSet;
use std::io::{BufWriter, Write};
use std::process::ExitCode;

use anyhow::bail;
use kiln_format::StorePath;
use kiln_protocol::ops::GcAction;

use super::store::{print_collected, StoreCmd};
use super::via_daemon::DaemonStore;

pub(super) fn run(mut d: DaemonStore, cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    let sd = d.sd.clone();
    let print = |p: &StorePath| sd.display(p);
    let mut out = BufWriter::new(std::io::stdout().lock());
    match cmd {
        cmd @ (StoreCmd::Add { .. }
        | StoreCmd::AddFixed { .. }
        | StoreCmd::PathInfo { .. }
        | StoreCmd::Query { .. }) => {
            drop(out);
            return super::store::shared(&mut d, cmd);
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
            print_collected(&mut out, &paths, freed, action == GcAction::DeleteDead)?;
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
            print_collected(&mut out, &deleted, freed, true)?;
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
