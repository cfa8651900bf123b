//! The seam between the scheduler and the machines it sends builds to.
//!
//! The scheduler decides *where* a derivation builds (`placement`); a
//! [`RemoteBuilder`] knows *how* to build on one of the `builders` machines (kiln-remote
//! implements it over SSH with the worker and serve protocols). Local builds run as
//! [`crate::job`]s; the build hook (`build-hook`, Guix's offload) stays a third way.

use std::collections::BTreeSet;
use std::sync::Arc;

use kiln_format::{Derivation, StorePath, ValidPathInfo};
use kiln_store::LocalStore;

use crate::job::{JobControl, JobEvent};
use crate::machines::Machine;
use crate::result::BuildResult;
use crate::settings::BuildSettings;

/// One build to run on a machine.
pub struct RemoteJob {
    pub store: Arc<LocalStore>,
    pub drv_path: StorePath,
    pub drv: Arc<Derivation>,
    /// The input closure: what the machine must have before it builds.
    pub inputs: BTreeSet<StorePath>,
    pub settings: Arc<BuildSettings>,
    /// Progress for the scheduler (started, log lines, warnings).
    pub events: Arc<dyn Fn(JobEvent) + Send + Sync>,
    /// The output paths whose locks the build goal holds while the job runs (its
    /// input-addressed and fixed outputs; floating outputs' paths are not known before).
    pub locked: BTreeSet<StorePath>,
    /// Set when nobody wants the build any more (its goal's locks may be gone).
    pub control: Arc<JobControl>,
}

impl RemoteJob {
    /// Whether the build was cancelled.
    pub fn cancelled(&self) -> bool {
        self.control.is_cancelled()
    }
}

impl std::fmt::Debug for RemoteJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteJob({})", self.drv_path)
    }
}

/// How a remote build ended.
#[derive(Debug)]
pub enum RemoteOutcome {
    /// The machine built it (or the build failed there): the result, and the outputs'
    /// infos once copied back and registered here.
    Finished(Box<BuildResult>, Vec<ValidPathInfo>),
    /// The machine failed, not the build: unreachable, refused, disconnected, spoke
    /// nonsense, or sent an output whose hash does not match. The scheduler leaves the
    /// machine out for a while and places the build again.
    MachineFailed(String),
}

/// Builds derivations on build machines.
pub trait RemoteBuilder: Send + Sync {
    /// Runs `job` on `machine`, blocking until it ends. `ctl.is_cancelled()` is set when
    /// nobody wants the build any more; the builder must then give up (dropping the
    /// connection cancels the remote build) and return.
    fn build(&self, machine: &Machine, job: RemoteJob, ctl: &JobControl) -> RemoteOutcome;
}
