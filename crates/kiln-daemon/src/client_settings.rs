//! A client's `SetOptions`, applied to a copy of the daemon's settings for that client's
//! requests only (Nix 2.8 applies them to its forked per-client process; kiln serves
//! every client from one process, so nothing global changes).

use kiln_build::BuildSettings;
use kiln_protocol::ClientOptions;
use kiln_store::Settings;

use crate::peer::Trust;

/// The outcome of applying options: the client's settings and what to tell the client.
#[derive(Debug)]
pub struct Applied {
    pub settings: Settings,
    pub build: BuildSettings,
    /// Warnings for the client (`warning: …`).
    pub warnings: Vec<String>,
    /// Notes at debug level (ignored restricted settings).
    pub notes: Vec<String>,
}

/// Settings of the daemon as a whole, read when it starts: one client's value cannot
/// change them (it would change every client's daemon), so a client sending one is told.
const DAEMON_WIDE: &[&str] = &[
    "min-free",
    "max-free",
    "min-free-check-interval",
    "json-log-path",
    "timeline-file",
    // The caches are the daemon's, opened once for every client.
    "netrc-file",
    // What this machine can do is the daemon's to say (nix-daemon 2.34 takes the store's
    // value too, and silently drops a client's).
    "system-features",
    // Substitution slots are the daemon's, shared by every client, as its build slots are
    // (nix-daemon, a process per client, takes each client's value for that client).
    "max-substitution-jobs",
];

/// Settings an untrusted Nix client may still set (Nix 2.8's `ClientSettings::apply`).
const NIX_ANYONE: &[&str] = &["timeout", "repeat", "connect-timeout"];
/// Settings a Guix daemon takes from any client.
const GUIX_ANYONE: &[&str] = &[
    "build-timeout",
    "build-max-silent-time",
    "build-max-jobs",
    "build-cores",
    "build-repeat",
    "multiplexed-build-output",
    "print-extended-build-trace",
];

/// Applies `o` (from a client with `trust`, speaking Guix's dialect or not) on top of the
/// daemon's `base` settings. Nix clients are answered in nix-daemon 2.34's words, as kiln
/// answers them everywhere (`Proto::nix_2_34_messages`): a restricted setting an untrusted
/// client sent draws a warning (nix-daemon 2.8 noted it in its debug output, as kiln does
/// for Guix clients).
pub fn apply(base: &Settings, o: &ClientOptions, trust: Trust, guix: bool) -> Applied {
    let mut s = base.clone();
    let mut warnings = Vec::new();
    let mut notes = Vec::new();
    let trusted = trust == Trust::Trusted;
    let set = |s: &mut Settings, name: &str, value: &str, warnings: &mut Vec<String>| {
        if let Err(e) = s.set(name, value) {
            warnings.push(e.to_string());
        }
    };
    set(&mut s, "keep-failed", bool_s(o.keep_failed), &mut warnings);
    set(&mut s, "keep-going", bool_s(o.keep_going), &mut warnings);
    set(&mut s, "fallback", bool_s(o.try_fallback), &mut warnings);
    set(
        &mut s,
        "substitute",
        bool_s(o.use_substitutes),
        &mut warnings,
    );
    if let Some(t) = o.max_silent_time {
        set(&mut s, "max-silent-time", &t.to_string(), &mut warnings);
    }
    // Any client's, as Nix applies it; it decides only whether its builds may run here at
    // all (0), since the daemon's slots are shared by every client.
    if let Some(j) = o.max_build_jobs.filter(|_| !guix) {
        set(&mut s, "max-jobs", &j.to_string(), &mut warnings);
    }
    if let Some(c) = o.build_cores {
        set(&mut s, "cores", &c.to_string(), &mut warnings);
    }
    if guix {
        set(
            &mut s,
            "print-build-trace",
            bool_s(o.print_build_trace),
            &mut warnings,
        );
    }
    let trusted_subs: Vec<String> = base
        .get_list("trusted-substituters")
        .into_iter()
        .chain(base.get_list("substituters"))
        .collect();
    for (name, value) in &o.overrides {
        let name = name.as_str();
        if name == "ssh-auth-sock" || name == "experimental-features" {
            // Obsolete, and never forwarded (as Nix).
            continue;
        }
        if guix && (name == "user-name" || name == "terminal-columns" || name == "locale") {
            continue;
        }
        let anyone = if guix {
            GUIX_ANYONE.contains(&name)
        } else {
            NIX_ANYONE.contains(&name) || (name == "builders" && value.is_empty())
        };
        let canonical = s.canonical_name(name).unwrap_or(name);
        if trusted && DAEMON_WIDE.contains(&canonical) {
            // A client sends what its own nix.conf says, often the daemon's file too: only
            // a value that would change something is worth a warning.
            // A list (`system-features`) is compared as a set of words, its order meaning
            // nothing; other values (paths may hold spaces) as they are.
            let list = matches!(
                crate::CATALOG.find(canonical).map(|d| &d.kind),
                Some(kiln_store::config::Kind::List)
            );
            let words = |v: &str| {
                if !list {
                    return vec![v.to_string()];
                }
                let mut w: Vec<String> = v.split_whitespace().map(str::to_string).collect();
                w.sort_unstable();
                w.dedup();
                w
            };
            let mut probe = base.clone();
            let same = probe.set(name, value).is_ok()
                && words(probe.get(canonical)) == words(base.get(canonical));
            if !same {
                warnings.push(format!(
                    "'{name}' is the daemon's own setting: a client's value has no effect"
                ));
            }
            continue;
        }
        if trusted || anyone {
            match s.set(name, value) {
                Ok(())
                    if kiln_store::config::NOT_IMPLEMENTED
                        .iter()
                        .any(|n| s.canonical_name(name) == Some(*n)) =>
                {
                    warnings.push(kiln_store::config::not_implemented_warning(name))
                }
                Ok(()) => {}
                Err(e) if e.to_string().starts_with("unknown setting") && guix => {
                    notes.push(format!("ignoring unknown setting '{name}'"))
                }
                Err(e) => warnings.push(e.to_string()),
            }
            continue;
        }
        if s.canonical_name(name) == Some("substituters") {
            // An untrusted client may choose among the substituters the daemon trusts.
            let mut chosen = Vec::new();
            for u in value.split_whitespace() {
                if trusted_subs.iter().any(|t| t == u) {
                    chosen.push(u.to_string());
                } else if !u.ends_with('/') && trusted_subs.iter().any(|t| *t == format!("{u}/")) {
                    chosen.push(format!("{u}/"));
                } else if !guix {
                    warnings.push(format!(
                        "ignoring untrusted substituter '{u}', you are not a trusted user.\nRun `man nix.conf` for more information on the `substituters` configuration option."
                    ));
                } else {
                    warnings.push(format!("ignoring untrusted substituter '{u}'"));
                }
            }
            set(&mut s, "substituters", &chosen.join(" "), &mut warnings);
            continue;
        }
        let restricted = format!(
            "ignoring the client-specified setting '{name}', because it is a restricted setting and you are not a trusted user"
        );
        if !guix {
            warnings.push(restricted);
        } else {
            notes.push(restricted);
        }
    }
    let mut build = BuildSettings::from_settings(&s);
    build.use_build_hook = o.use_build_hook;
    Applied {
        settings: s,
        build,
        warnings,
        notes,
    }
}

fn bool_s(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(overrides: &[(&str, &str)]) -> ClientOptions {
        ClientOptions {
            keep_going: true,
            max_silent_time: Some(30),
            build_cores: Some(3),
            use_substitutes: true,
            overrides: overrides
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn untrusted_clients_set_only_what_nix_lets_them() {
        let mut base = Settings::new(crate::CATALOG);
        base.set("substituters", "https://cache.example").unwrap();
        base.set("trusted-substituters", "https://other.example")
            .unwrap();
        let o = opts(&[
            ("timeout", "7"),
            ("sandbox", "false"),
            ("substituters", "https://other.example https://evil.example"),
            ("no-such-setting", "1"),
        ]);
        let a = apply(&base, &o, Trust::Untrusted, false);
        assert_eq!(a.settings.get("timeout"), "7");
        assert_eq!(a.settings.get("sandbox"), base.get("sandbox"));
        assert_eq!(a.settings.get("substituters"), "https://other.example");
        assert!(a.warnings.iter().any(|w| w.contains("evil.example")));
        assert!(a.build.keep_going);
        assert_eq!(a.build.max_silent_time, 30);
        assert_eq!(a.build.cores, 3);
        // The daemon's own settings are untouched.
        assert_eq!(base.get("timeout"), "0");

        let t = apply(&base, &o, Trust::Trusted, false);
        assert_eq!(t.settings.get("sandbox"), "false");
        assert!(t.warnings.iter().any(|w| w.contains("no-such-setting")));
        // An untrusted client cannot send builds to machines of its choosing (where its
        // builders could read them, or answer with outputs of their own); it may only
        // clear the daemon's, keeping its builds here.
        let mut with_machines = base.clone();
        with_machines
            .set("builders", "ssh://trusted-builder")
            .unwrap();
        let evil = apply(
            &with_machines,
            &opts(&[("builders", "ssh://evil.example")]),
            Trust::Untrusted,
            false,
        );
        assert_eq!(evil.build.builders, "ssh://trusted-builder");
        let none = apply(
            &with_machines,
            &opts(&[("builders", "")]),
            Trust::Untrusted,
            false,
        );
        assert_eq!(none.build.builders, "");
        let trusted = apply(
            &with_machines,
            &opts(&[("builders", "ssh://mine")]),
            Trust::Trusted,
            false,
        );
        assert_eq!(trusted.build.builders, "ssh://mine");
        // Nor run programs of its choosing as the daemon's hooks.
        let hooks = apply(
            &base,
            &opts(&[
                ("pre-build-hook", "/tmp/x"),
                ("post-build-hook", "/tmp/x"),
                ("diff-hook", "/tmp/x"),
                ("run-diff-hook", "true"),
            ]),
            Trust::Untrusted,
            false,
        );
        assert_eq!(hooks.build.pre_build_hook, None);
        assert_eq!(hooks.build.post_build_hook, None);
        assert_eq!(hooks.build.diff_hook, None);
        // Nor hand a host file of its choosing to fixed-output builds, which have the
        // network: `ssl-cert-file=/etc/shadow` would let its builder send the file away.
        for guix in [false, true] {
            let ca = apply(
                &base,
                &opts(&[
                    ("ssl-cert-file", "/etc/shadow"),
                    ("netrc-file", "/etc/shadow"),
                ]),
                Trust::Untrusted,
                guix,
            );
            assert_eq!(ca.build.ssl_cert_file, None, "guix: {guix}");
            assert_eq!(ca.build.netrc_file, None, "guix: {guix}");
        }
        let trusted_ca = apply(
            &base,
            &opts(&[("ssl-cert-file", "/etc/ssl/mine.pem")]),
            Trust::Trusted,
            false,
        );
        assert_eq!(
            trusted_ca.build.ssl_cert_file.as_deref(),
            Some(std::path::Path::new("/etc/ssl/mine.pem"))
        );
        // A daemon-wide setting a client cannot change is not taken in silence.
        let m = apply(&base, &opts(&[("min-free", "1000")]), Trust::Trusted, false);
        assert_eq!(
            m.warnings,
            ["'min-free' is the daemon's own setting: a client's value has no effect"]
        );
        assert_eq!(m.settings.get("min-free"), "0");
        // The daemon's substitution slots, likewise.
        let m = apply(
            &base,
            &opts(&[("max-substitution-jobs", "1")]),
            Trust::Trusted,
            false,
        );
        assert_eq!(
            m.warnings,
            ["'max-substitution-jobs' is the daemon's own setting: a client's value has no effect"]
        );
        // Unless it is the daemon's own value (a client sends what its nix.conf says,
        // often the daemon's file too).
        let same = apply(&base, &opts(&[("min-free", "0")]), Trust::Trusted, false);
        assert!(same.warnings.is_empty(), "{:?}", same.warnings);
        // A client's system features are not the machine's.
        let f = apply(
            &base,
            &opts(&[("extra-system-features", "kvm gpu")]),
            Trust::Trusted,
            false,
        );
        assert_eq!(f.build.system_features, base_features(&base));
        assert_eq!(f.warnings.len(), 1, "{:?}", f.warnings);
        // The daemon's own features in another order, with one repeated, change nothing.
        let mut own: Vec<String> = base
            .get("system-features")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        assert!(own.len() > 1, "{own:?}");
        own.reverse();
        own.push(own[0].clone());
        let reordered = apply(
            &base,
            &opts(&[("system-features", &own.join(" "))]),
            Trust::Trusted,
            false,
        );
        assert!(reordered.warnings.is_empty(), "{:?}", reordered.warnings);
        // Nix clients are told, in 2.34's words, what an untrusted client may not set.
        assert!(a.warnings.iter().any(|w| w
            == "ignoring the client-specified setting 'sandbox', because it is a restricted setting and you are not a trusted user"));
        assert!(a.warnings.iter().any(|w| w.starts_with(
            "ignoring untrusted substituter 'https://evil.example', you are not a trusted user.\nRun `man nix.conf`"
        )));
        assert!(a.notes.is_empty(), "{:?}", a.notes);
    }

    fn base_features(base: &Settings) -> std::collections::BTreeSet<String> {
        BuildSettings::from_settings(base).system_features
    }

    #[test]
    fn guix_clients_set_build_limits_under_their_names() {
        let base = Settings::new(crate::CATALOG);
        let mut o = opts(&[
            ("build-timeout", "9"),
            ("build-repeat", "1"),
            ("sandbox", "false"),
        ]);
        o.max_silent_time = None;
        o.build_cores = None;
        o.print_build_trace = true;
        let a = apply(&base, &o, Trust::Untrusted, true);
        // A restricted setting is noted at debug level for Guix clients, as nix-daemon 2.8
        // did; not applied.
        assert!(
            a.notes.iter().any(|n| n.contains("'sandbox'")),
            "{:?}",
            a.notes
        );
        assert_eq!(a.settings.get("sandbox"), base.get("sandbox"));
        assert_eq!(a.build.timeout, 9);
        assert_eq!(a.build.build_repeat, 1);
        assert!(a.build.print_build_trace);
    }
}
