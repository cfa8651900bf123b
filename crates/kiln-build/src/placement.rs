//! Where a build runs: this machine or one of the build machines (`builders`).
//!
//! The scheduler owns one [`Placement`] for every client of the daemon, so slots are
//! counted across all of them (Nix counts a remote machine's slots with lock files per
//! process, and starves local builds once builders exist). The local machine takes part
//! like any other, with its own slots (`max-jobs`) and speed factor.
//!
//! The choice, among the machines that may build a derivation (system, supported and
//! mandatory features) and have a free slot: the most free slots × speed factor, this
//! machine first on a tie (nothing to copy), then the machines file's order. A machine that
//! could not be reached or failed mid-build is left out for a while, longer each time it
//! fails again, and tried again after that.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::machines::Machine;

/// What a derivation needs of the machine that builds it.
#[derive(Debug, Clone)]
pub(crate) struct Needs {
    pub system: String,
    pub features: BTreeSet<String>,
    /// This machine may build it (its platform and features, and some requester allows
    /// local builds).
    pub local: bool,
    /// `preferLocalBuild` (and this machine can build it): local only, and it may take a
    /// slot even at max-jobs 0 when nothing else builds.
    pub prefer_local: bool,
    /// Build machines may build it (normal builds; checks and repairs are local).
    pub remote: bool,
    /// The machines its request names (`builders`), by index.
    pub allowed: BTreeSet<usize>,
    /// Machines that failed this derivation already (by index).
    pub excluded: BTreeSet<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    Local,
    Remote(usize),
    /// Somewhere can build it, but nowhere has a free slot.
    Wait,
    /// Nowhere can build it.
    Nowhere,
}

#[derive(Debug)]
struct Slots {
    machine: Machine,
    running: usize,
    /// Consecutive failures, and until when the machine is left out.
    failures: u32,
    down_until: Option<Instant>,
}

/// The machines and their busy slots.
#[derive(Debug)]
pub(crate) struct Placement {
    machines: Vec<Slots>,
    local_speed: f64,
}

/// How long a machine that failed is left out: 10 s, doubling with each failure in a row,
/// at most 5 minutes.
fn backoff(failures: u32) -> Duration {
    let secs = 10u64.saturating_mul(1 << failures.saturating_sub(1).min(5));
    Duration::from_secs(secs.min(300))
}

impl Placement {
    pub fn new(local_speed: f64) -> Self {
        Placement {
            machines: Vec::new(),
            local_speed: if local_speed > 0.0 { local_speed } else { 1.0 },
        }
    }

    /// The index of machine `m` (by URI), added if new; its description is updated
    /// (slots, features, … may have been edited), its busy slots and failures are kept.
    pub fn register(&mut self, m: Machine) -> usize {
        if let Some(i) = self
            .machines
            .iter()
            .position(|s| s.machine.identity() == m.identity())
        {
            self.machines[i].machine = m;
            return i;
        }
        self.machines.push(Slots {
            machine: m,
            running: 0,
            failures: 0,
            down_until: None,
        });
        self.machines.len() - 1
    }

    /// Whether any machine was ever named.
    pub fn has_machines(&self) -> bool {
        !self.machines.is_empty()
    }

    pub fn machine(&self, i: usize) -> &Machine {
        &self.machines[i].machine
    }

    /// Machines that may build `needs` now (up, not excluded), free or busy.
    fn candidates<'a>(
        &'a self,
        needs: &'a Needs,
        now: Instant,
    ) -> impl Iterator<Item = usize> + 'a {
        self.machines.iter().enumerate().filter_map(move |(i, s)| {
            (needs.remote
                && needs.allowed.contains(&i)
                && !needs.excluded.contains(&i)
                && s.machine.max_jobs > 0
                && s.down_until.is_none_or(|t| t <= now)
                && s.machine.accepts(&needs.system, &needs.features))
            .then_some(i)
        })
    }

    /// Where a build with `needs` goes now, given this machine's slots.
    pub fn choose(&self, needs: &Needs, local_running: usize, local_slots: usize) -> Choice {
        let now = Instant::now();
        if needs.prefer_local && needs.local {
            return if local_running < local_slots || local_running == 0 {
                Choice::Local
            } else {
                Choice::Wait
            };
        }
        let mut best: Option<(f64, Choice)> = None;
        let mut anywhere = false;
        if needs.local && local_slots > 0 {
            anywhere = true;
            if local_running < local_slots {
                let score = (local_slots - local_running) as f64 * self.local_speed;
                best = Some((score, Choice::Local));
            }
        }
        for i in self.candidates(needs, now) {
            anywhere = true;
            let s = &self.machines[i];
            if s.running < s.machine.max_jobs {
                let score = (s.machine.max_jobs - s.running) as f64 * s.machine.speed_factor;
                if best.is_none_or(|(b, _)| score > b) {
                    best = Some((score, Choice::Remote(i)));
                }
            }
        }
        match best {
            Some((_, c)) => c,
            None if anywhere => Choice::Wait,
            None => Choice::Nowhere,
        }
    }

    /// Why no machine can build `needs` (for the error), or `None` without machines.
    pub fn why_nowhere(&self, needs: &Needs) -> Option<String> {
        if needs.allowed.is_empty() || !needs.remote {
            return None;
        }
        let now = Instant::now();
        let mut reasons = Vec::new();
        for (i, s) in self
            .machines
            .iter()
            .enumerate()
            .filter(|(i, _)| needs.allowed.contains(i))
        {
            let m = &s.machine;
            let why = if needs.excluded.contains(&i) {
                "failed this build".to_string()
            } else if s.down_until.is_some_and(|t| t > now) {
                "is unreachable (left out after failing)".to_string()
            } else if m.max_jobs == 0 {
                "has no build slots".to_string()
            } else if !m.supports_system(&needs.system) {
                format!(
                    "builds only {}",
                    m.systems.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            } else {
                "lacks a required feature or requires one this derivation lacks".to_string()
            };
            reasons.push(format!("'{}' {why}", m.uri));
        }
        Some(reasons.join("; "))
    }

    pub fn start(&mut self, i: usize) {
        self.machines[i].running += 1;
    }

    /// A build on machine `i` ended; `failed` when the machine itself failed (unreachable,
    /// disconnected, protocol error), not the build.
    pub fn finish(&mut self, i: usize, machine_failed: bool) -> Option<Duration> {
        let s = &mut self.machines[i];
        s.running = s.running.saturating_sub(1);
        if machine_failed {
            s.failures = s.failures.saturating_add(1);
            let d = backoff(s.failures);
            s.down_until = Some(Instant::now() + d);
            Some(d)
        } else {
            s.failures = 0;
            s.down_until = None;
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::machines::parse_builders;

    fn needs(system: &str, features: &[&str], local: bool) -> Needs {
        Needs {
            system: system.into(),
            features: features.iter().map(|s| s.to_string()).collect(),
            local,
            prefer_local: false,
            remote: true,
            allowed: (0..8).collect(),
            excluded: BTreeSet::new(),
        }
    }

    fn placement(builders: &str) -> Placement {
        let mut p = Placement::new(1.0);
        for m in parse_builders(builders, "x86_64-linux").unwrap() {
            p.register(m);
        }
        p
    }

    #[test]
    fn free_slots_times_speed_then_local_first() {
        let mut p = placement("ssh://slow x86_64-linux - 2 1; ssh://fast x86_64-linux - 1 4");
        let n = needs("x86_64-linux", &[], true);
        // fast: 1 × 4 beats local 2 × 1 and slow 2 × 1.
        assert_eq!(p.choose(&n, 0, 2), Choice::Remote(1));
        p.start(1);
        // Local (2 × 1) ties slow (2 × 1): local first.
        assert_eq!(p.choose(&n, 0, 2), Choice::Local);
        assert_eq!(p.choose(&n, 1, 2), Choice::Remote(0));
        p.start(0);
        p.start(0);
        assert_eq!(p.choose(&n, 2, 2), Choice::Wait);
        p.finish(1, false);
        assert_eq!(p.choose(&n, 2, 2), Choice::Remote(1));
        assert_eq!(p.machines[0].running + p.machines[1].running, 2);
    }

    #[test]
    fn systems_features_and_remote_only() {
        let p = placement("ssh://arm aarch64-linux - 1; ssh://kvm x86_64-linux - 1 1 kvm big");
        assert_eq!(
            p.choose(&needs("aarch64-linux", &[], false), 0, 1),
            Choice::Remote(0)
        );
        assert_eq!(
            p.choose(&needs("riscv64-linux", &[], false), 0, 1),
            Choice::Nowhere
        );
        // Mandatory "big": only derivations that require it go there.
        assert_eq!(
            p.choose(&needs("x86_64-linux", &["big"], false), 0, 1),
            Choice::Remote(1)
        );
        assert_eq!(
            p.choose(&needs("x86_64-linux", &["kvm"], false), 0, 1),
            Choice::Nowhere
        );
        // max-jobs 0 here: remote only.
        assert_eq!(
            p.choose(&needs("x86_64-linux", &[], true), 0, 0),
            Choice::Nowhere
        );
        let why = p.why_nowhere(&needs("riscv64-linux", &[], false)).unwrap();
        assert!(
            why.contains("'ssh://arm' builds only aarch64-linux"),
            "{why}"
        );
    }

    #[test]
    fn prefer_local_stays_local() {
        let p = placement("ssh://r x86_64-linux - 8 10");
        let mut n = needs("x86_64-linux", &[], true);
        n.prefer_local = true;
        assert_eq!(p.choose(&n, 0, 1), Choice::Local);
        assert_eq!(p.choose(&n, 1, 1), Choice::Wait);
        // Even at max-jobs 0, when nothing builds here.
        assert_eq!(p.choose(&n, 0, 0), Choice::Local);
    }

    #[test]
    fn a_failed_machine_is_left_out_then_retried() {
        let mut p = placement("ssh://a; ssh://b");
        let mut n = needs("x86_64-linux", &[], false);
        assert_eq!(p.choose(&n, 0, 0), Choice::Remote(0));
        p.start(0);
        assert_eq!(p.finish(0, true), Some(Duration::from_secs(10)));
        assert_eq!(p.choose(&n, 0, 0), Choice::Remote(1));
        n.excluded.insert(1);
        assert_eq!(p.choose(&n, 0, 0), Choice::Nowhere);
        // Left out for a while, then back.
        p.machines[0].down_until = Some(Instant::now());
        n.excluded.clear();
        assert_eq!(p.choose(&n, 0, 0), Choice::Remote(0));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(40), Duration::from_secs(300));
    }
}
