//! `kiln store …` through the daemon (see `via_daemon`): the commands a person without
//! write access to the store needs, printing what they print on a store of their own.

use std::io::{BufWriter, Write};
use std::process::ExitCode;

use anyhow::bail;

use super::store::StoreCmd;
use super::via_daemon::DaemonStore;

pub(super) fn run(mut d: DaemonStore, cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    match cmd {
        cmd @ (StoreCmd::Add { .. }
        | StoreCmd::AddFixed { .. }
        | StoreCmd::PathInfo { .. }
        | StoreCmd::Query { .. }
        | StoreCmd::Gc { .. }
        | StoreCmd::Delete { .. }) => {
            drop(out);
            return super::store::shared(&mut d, cmd);
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
