//! Build results, with Nix's status numbering and exit statuses.

use std::collections::BTreeMap;

use kiln_format::StorePath;

/// The outcome of one goal, numbered as the worker protocol numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildStatus {
    Built = 0,
    Substituted = 1,
    AlreadyValid = 2,
    PermanentFailure = 3,
    InputRejected = 4,
    OutputRejected = 5,
    TransientFailure = 6,
    CachedFailure = 7,
    TimedOut = 8,
    MiscFailure = 9,
    DependencyFailed = 10,
    LogLimitExceeded = 11,
    NotDeterministic = 12,
    ResolvesToAlreadyValid = 13,
    NoSubstituters = 14,
}

impl BuildStatus {
    /// All statuses, in their wire numbering.
    pub const ALL: [BuildStatus; 15] = [
        BuildStatus::Built,
        BuildStatus::Substituted,
        BuildStatus::AlreadyValid,
        BuildStatus::PermanentFailure,
        BuildStatus::InputRejected,
        BuildStatus::OutputRejected,
        BuildStatus::TransientFailure,
        BuildStatus::CachedFailure,
        BuildStatus::TimedOut,
        BuildStatus::MiscFailure,
        BuildStatus::DependencyFailed,
        BuildStatus::LogLimitExceeded,
        BuildStatus::NotDeterministic,
        BuildStatus::ResolvesToAlreadyValid,
        BuildStatus::NoSubstituters,
    ];

    /// The status numbered `n` on the wire (an unknown number is a failure of the
    /// machine or daemon that sent it).
    pub fn from_wire(n: u64) -> BuildStatus {
        BuildStatus::ALL
            .get(n as usize)
            .copied()
            .unwrap_or(BuildStatus::MiscFailure)
    }

    /// The status called `name` ([`BuildStatus::name`]).
    pub fn from_name(name: &str) -> Option<BuildStatus> {
        BuildStatus::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }

    /// The name used in JSON output and messages.
    pub fn name(self) -> &'static str {
        match self {
            BuildStatus::Built => "Built",
            BuildStatus::Substituted => "Substituted",
            BuildStatus::AlreadyValid => "AlreadyValid",
            BuildStatus::PermanentFailure => "PermanentFailure",
            BuildStatus::InputRejected => "InputRejected",
            BuildStatus::OutputRejected => "OutputRejected",
            BuildStatus::TransientFailure => "TransientFailure",
            BuildStatus::CachedFailure => "CachedFailure",
            BuildStatus::TimedOut => "TimedOut",
            BuildStatus::MiscFailure => "MiscFailure",
            BuildStatus::DependencyFailed => "DependencyFailed",
            BuildStatus::LogLimitExceeded => "LogLimitExceeded",
            BuildStatus::NotDeterministic => "NotDeterministic",
            BuildStatus::ResolvesToAlreadyValid => "ResolvesToAlreadyValid",
            BuildStatus::NoSubstituters => "NoSubstituters",
        }
    }
}

/// What went wrong beyond the status, for the exit code (Nix's `Worker::exitStatus` flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureKinds {
    pub permanent: bool,
    pub timed_out: bool,
    pub hash_mismatch: bool,
    pub check_mismatch: bool,
}

impl FailureKinds {
    pub fn merge(&mut self, o: FailureKinds) {
        self.permanent |= o.permanent;
        self.timed_out |= o.timed_out;
        self.hash_mismatch |= o.hash_mismatch;
        self.check_mismatch |= o.check_mismatch;
    }

    /// Nix 2.8's exit status: 100 build failure, 101 timeout, 102 hash mismatch, 104
    /// not deterministic (bits combine), 1 for anything else.
    pub fn exit_code(self) -> u8 {
        let mut mask = 0u8;
        if self.permanent || self.timed_out || self.hash_mismatch {
            mask |= 0x04;
        }
        if self.timed_out {
            mask |= 0x01;
        }
        if self.hash_mismatch {
            mask |= 0x02;
        }
        if self.check_mismatch {
            mask |= 0x08;
        }
        if mask != 0 {
            mask | 0x60
        } else {
            1
        }
    }
}

/// What made a derivation fail, kept apart from the message so that each client gets the
/// wording of the daemon it knows (Nix 2.8's `builder for '…' failed …; last N log lines`
/// or Nix 2.34's `Cannot build '…'. Reason: …`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureDetail {
    /// The builder ended badly: how (`failed with exit code 1`), and its log's last lines.
    Builder {
        status: String,
        log_tail: Vec<String>,
    },
    /// This many of its inputs could not be built or substituted.
    Dependencies(usize),
    /// It could only be built here, and `max-jobs` is 0.
    LocalBuildsDisabled,
    /// It is for another system than this machine's (and no build machine took it).
    PlatformMismatch { required: String, current: String },
    /// It requires features this machine lacks (and no build machine took it).
    MissingFeatures {
        required: Vec<String>,
        available: Vec<String>,
    },
    /// The builder succeeded but left output `output` missing at `path`.
    MissingOutput { output: String, path: String },
    /// A floating flat or text output at `path` is not a single non-executable file.
    NotAFlatFile { path: String },
    /// The derivation built in its place once its inputs were (`resolved`) failed.
    ResolvedFailed { resolved: String },
    /// The builder was killed for `max-silent-time` or `timeout`, of this many seconds.
    TimedOut { seconds: u64 },
    /// The builder was killed for writing more than `max-build-log-size` bytes.
    LogLimit { bytes: u64 },
    /// `--check` found the rebuilt output differing from the valid `output`; the rebuilt
    /// copy was kept at `kept`, if it was.
    NotDeterministic {
        output: String,
        kept: Option<String>,
    },
}

impl FailureDetail {
    /// Whether this detail only rewords a failure for Nix 2.34's clients (a timeout, a log
    /// limit, a `--check` mismatch), with nothing guix-daemon words otherwise.
    pub fn is_nix_2_34_wording(&self) -> bool {
        matches!(
            self,
            FailureDetail::TimedOut { .. }
                | FailureDetail::LogLimit { .. }
                | FailureDetail::NotDeterministic { .. }
        )
    }
}

/// The result of building (or substituting) one derivation or path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error: String,
    pub times_built: u32,
    pub non_deterministic: bool,
    /// Seconds since the epoch; 0 when not built.
    pub start_time: u64,
    pub stop_time: u64,
    /// Output name → path, for derivations.
    pub outputs: BTreeMap<String, StorePath>,
    pub failure: FailureKinds,
    /// What failed, when the message above has a structure clients render.
    pub detail: Option<FailureDetail>,
    /// Never finished: its request was given up (another build failed, without
    /// `keep-going`), so there is nothing to report of it.
    pub cancelled: bool,
    /// CPU time of the build's processes (sent to Nix clients from protocol 1.37 on).
    pub cpu_user: Option<std::time::Duration>,
    pub cpu_system: Option<std::time::Duration>,
    /// Peak memory in bytes: of the whole build where its cgroup accounts memory, else of
    /// its largest process.
    pub memory_peak: Option<u64>,
    /// Temporary roots a job took for its goal (a floating derivation's outputs, known
    /// only once built): the goal takes them over, or they are released when it cannot
    /// (it failed, or is gone). Never sent to clients.
    pub handed_roots: Vec<StorePath>,
}

impl BuildResult {
    pub fn new(status: BuildStatus) -> Self {
        BuildResult {
            status,
            error: String::new(),
            times_built: 0,
            non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            outputs: BTreeMap::new(),
            failure: FailureKinds::default(),
            detail: None,
            cancelled: false,
            cpu_user: None,
            cpu_system: None,
            memory_peak: None,
            handed_roots: Vec::new(),
        }
    }

    pub fn failed(status: BuildStatus, error: impl Into<String>) -> Self {
        let mut r = BuildResult::new(status);
        r.error = error.into();
        r.failure.permanent = matches!(
            status,
            BuildStatus::PermanentFailure | BuildStatus::CachedFailure
        );
        r.failure.timed_out = status == BuildStatus::TimedOut;
        r
    }

    pub fn success(&self) -> bool {
        self.status.is_success()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_match_nix() {
        let k = |p, t, h, c| {
            FailureKinds {
                permanent: p,
                timed_out: t,
                hash_mismatch: h,
                check_mismatch: c,
            }
            .exit_code()
        };
        assert_eq!(k(false, false, false, false), 1);
        assert_eq!(k(true, false, false, false), 100);
        assert_eq!(k(false, true, false, false), 101);
        assert_eq!(k(false, false, true, false), 102);
        assert_eq!(k(false, false, false, true), 104);
        assert_eq!(k(false, true, true, false), 103);
    }
}
