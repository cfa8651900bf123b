//! Failure messages in the words of the daemon each client knows.
//!
//! kiln's engine records what failed ([`FailureDetail`]) beside Nix 2.8's sentence. Clients
//! at protocol 1.38 get nix-daemon 2.34's text instead, colours included (their client
//! strips them when its output is not a terminal):
//!
//! ```text
//! Cannot build '/nix/store/…-failing.drv'.
//! Reason: builder failed with exit code 1.
//! Output paths:
//!   /nix/store/…-failing
//! Last 1 log lines:
//! > oops
//! For full logs, run:
//!   nix log /nix/store/…-failing.drv
//! ```

use kiln_build::{BuildResult, FailureDetail};
use kiln_format::StorePath;
use kiln_protocol::Proto;
use kiln_store::LocalStore;

const NORMAL: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
const RED: &str = "\x1b[31;1m";
const MAGENTA: &str = "\x1b[35;1m";

/// The message for `r`, a failed build of `drv`, as the client of `proto` expects it.
/// `nix_command`: whether the daemon has the `nix-command` experimental feature (Nix then
/// suggests `nix log`, else `nix-store -l`).
pub(crate) fn failure_text(
    proto: Proto,
    store: &LocalStore,
    drv: &StorePath,
    r: &BuildResult,
    nix_command: bool,
) -> String {
    let Some(detail) = r.detail.as_ref().filter(|_| proto.nix_2_34_messages()) else {
        return r.error.clone();
    };
    let abs = store.print(drv);
    // The messages of their own shape are whole here; a failed builder or dependencies
    // give the reason of a `Cannot build` with output paths and the log's tail below.
    let reason = match detail {
        FailureDetail::Builder { status, .. } => format!("builder {status}"),
        FailureDetail::Dependencies(n) => format!(
            "{n} {} failed",
            if *n == 1 {
                "dependency"
            } else {
                "dependencies"
            }
        ),
        FailureDetail::LocalBuildsDisabled => {
            return format!(
                "Cannot build '{MAGENTA}{abs}{NORMAL}'.\nReason: {RED}local builds are disabled{NORMAL} (max-jobs = 0)\nHint: set 'max-jobs' to a non-zero value to enable local builds, or configure remote builders via 'builders'"
            );
        }
        FailureDetail::PlatformMismatch { required, current } => {
            return format!(
                "Cannot build '{MAGENTA}{abs}{NORMAL}'.\nReason: {RED}platform mismatch{NORMAL}\nRequired system: '{MAGENTA}{required}{NORMAL}'\nCurrent system: '{MAGENTA}{current}{NORMAL}'"
            );
        }
        FailureDetail::MissingFeatures {
            required,
            available,
        } => {
            return format!(
                "Cannot build '{MAGENTA}{abs}{NORMAL}'.\nReason: {RED}missing system features{NORMAL}\nRequired features: {{{}}}\nAvailable features: {{{}}}",
                required.join(", "),
                available.join(", ")
            );
        }
        FailureDetail::MissingOutput { output, path } => {
            return format!(
                "builder for '{MAGENTA}{abs}{NORMAL}' failed to produce output path for output '{MAGENTA}{output}{NORMAL}' at {MAGENTA}\"{path}\"{NORMAL}"
            );
        }
        FailureDetail::ResolvedFailed { resolved } => {
            return format!("build of resolved derivation '{MAGENTA}{resolved}{NORMAL}' failed");
        }
        FailureDetail::TimedOut { seconds } => {
            return format!("timed out after {MAGENTA}{seconds}{NORMAL} seconds");
        }
        FailureDetail::LogLimit { bytes } => {
            return format!(
                "{MAGENTA}building derivation '{abs}'{NORMAL} killed after writing more than {MAGENTA}{bytes}{NORMAL} bytes of log output"
            );
        }
        FailureDetail::NotDeterministic { output, kept } => {
            let from = kept
                .as_ref()
                .map(|k| format!(" from {MAGENTA}\"{k}\"{NORMAL}"))
                .unwrap_or_default();
            return format!(
                "derivation '{MAGENTA}{abs}{NORMAL}' may not be deterministic: output {MAGENTA}\"{output}\"{NORMAL} differs{from}"
            );
        }
        FailureDetail::NotAFlatFile { path } => {
            return format!(
                "output path {MAGENTA}\"{path}\"{NORMAL} should be a non-executable regular file since recursive hashing is not enabled (one of outputHashMode={{flat,text}} is true)"
            );
        }
    };
    let mut msg = format!("Cannot build '{MAGENTA}{abs}{NORMAL}'.\nReason: {RED}{reason}");
    msg.push_str(NORMAL);
    msg.push('.');
    // The output paths the derivation names (none for floating outputs), in Nix's order.
    if let Ok(d) = store.read_derivation(drv) {
        let mut outs: Vec<&StorePath> =
            d.outputs.values().filter_map(|o| o.path.as_ref()).collect();
        outs.sort();
        outs.dedup();
        if !outs.is_empty() {
            msg.push_str("\nOutput paths:");
            for p in outs {
                msg.push_str(&format!("\n  {MAGENTA}{}{NORMAL}", store.print(p)));
            }
        }
    }
    if let FailureDetail::Builder { log_tail, .. } = detail {
        if !log_tail.is_empty() {
            msg.push_str(&format!("\nLast {} log lines:\n", log_tail.len()));
            for l in log_tail {
                msg.push_str("> ");
                msg.push_str(l);
                msg.push('\n');
            }
            let cmd = if nix_command {
                "nix log"
            } else {
                "nix-store -l"
            };
            msg.push_str(&format!("For full logs, run:\n  {BOLD}{cmd} {abs}{NORMAL}"));
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kiln_build::BuildStatus;
    use kiln_store::{Layout, StoreOptions};

    /// The refusals' bytes as nix-daemon 2.34.8 sends them (read off a terminal through
    /// `script`, colours included: the features are not coloured, the rest are).
    #[test]
    fn refusals_are_worded_and_coloured_as_nix_daemon_2_34_sends_them() {
        let d = tempfile::tempdir().unwrap();
        let sd = kiln_format::StoreDir::new(d.path().join("store").to_str().unwrap()).unwrap();
        let store = LocalStore::open(
            Layout::new(sd, d.path().join("state"), d.path().join("log")),
            StoreOptions::default(),
        )
        .unwrap();
        let drv = StorePath::from_base_name("yz0n2mx947w4dffnck3bybsjdfkvmk1x-x.drv").unwrap();
        let abs = store.print(&drv);
        let text = |detail: FailureDetail| {
            let r = BuildResult {
                detail: Some(detail),
                ..BuildResult::failed(BuildStatus::MiscFailure, "Nix 2.8's words")
            };
            (
                failure_text(Proto::nix(0x126), &store, &drv, &r, true),
                failure_text(Proto::guix(0x163), &store, &drv, &r, true),
            )
        };
        let (nix, guix) = text(FailureDetail::PlatformMismatch {
            required: "mips64-linux".into(),
            current: "x86_64-linux".into(),
        });
        assert_eq!(
            nix,
            format!("Cannot build '\x1b[35;1m{abs}\x1b[0m'.\nReason: \x1b[31;1mplatform mismatch\x1b[0m\nRequired system: '\x1b[35;1mmips64-linux\x1b[0m'\nCurrent system: '\x1b[35;1mx86_64-linux\x1b[0m'")
        );
        assert_eq!(guix, "Nix 2.8's words");
        let (nix, _) = text(FailureDetail::MissingFeatures {
            required: vec!["no-such-feature".into()],
            available: vec!["benchmark".into(), "kvm".into()],
        });
        assert_eq!(
            nix,
            format!("Cannot build '\x1b[35;1m{abs}\x1b[0m'.\nReason: \x1b[31;1mmissing system features\x1b[0m\nRequired features: {{no-such-feature}}\nAvailable features: {{benchmark, kvm}}")
        );
        let (nix, _) = text(FailureDetail::MissingOutput {
            output: "out".into(),
            path: "/s/p-no-output".into(),
        });
        assert_eq!(
            nix,
            format!("builder for '\x1b[35;1m{abs}\x1b[0m' failed to produce output path for output '\x1b[35;1mout\x1b[0m' at \x1b[35;1m\"/s/p-no-output\"\x1b[0m")
        );
    }
}
