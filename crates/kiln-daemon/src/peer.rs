//! Who is on the other end of a connection, and what they may do.

use std::os::fd::AsFd;

/// A connected client's credentials (`SO_PEERCRED`) and names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: Option<u32>,
    pub uid: u32,
    pub gid: u32,
    pub user: Option<String>,
    /// The user's primary and supplementary group names.
    pub groups: Vec<String>,
}

impl Peer {
    /// The credentials of the process on the other end of a Unix socket.
    pub fn of_socket(fd: impl AsFd) -> std::io::Result<Peer> {
        let c = rustix::net::sockopt::socket_peercred(fd)?;
        Ok(Peer::from_ids(
            Some(c.pid.as_raw_nonzero().get() as u32),
            c.uid.as_raw(),
            c.gid.as_raw(),
        ))
    }

    /// A peer from its ids, with names looked up (through NSS, so LDAP users work too).
    pub fn from_ids(pid: Option<u32>, uid: u32, gid: u32) -> Peer {
        let user = uzers::get_user_by_uid(uid).map(|u| u.name().to_string_lossy().into_owned());
        let mut groups = Vec::new();
        if let Some(g) = uzers::get_group_by_gid(gid) {
            groups.push(g.name().to_string_lossy().into_owned());
        }
        if let Some(name) = &user {
            if let Some(gs) = uzers::get_user_groups(name, gid) {
                for g in gs {
                    let n = g.name().to_string_lossy().into_owned();
                    if !groups.contains(&n) {
                        groups.push(n);
                    }
                }
            }
        }
        Peer {
            pid,
            uid,
            gid,
            user,
            groups,
        }
    }

    /// A name for logs: the user name, or `uid N`.
    pub fn shown(&self) -> String {
        match &self.user {
            Some(u) => u.clone(),
            None => format!("uid {}", self.uid),
        }
    }

    /// Whether `list` (`trusted-users`/`allowed-users` syntax: user names, `@group`, `*`)
    /// matches this peer.
    pub fn matches(&self, list: &[String]) -> bool {
        list.iter().any(|e| {
            if e == "*" {
                return true;
            }
            if let Some(g) = e.strip_prefix('@') {
                return self.groups.iter().any(|x| x == g);
            }
            self.user.as_deref() == Some(e.as_str())
        })
    }
}

/// What a peer may do, decided once at connection time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    Trusted,
    Untrusted,
}

/// Decides whether `peer` may connect and whether it is trusted, as nix-daemon does:
/// trusted exactly when `trusted-users` matches (the default, `root`, trusts root; a
/// daemon run by an ordinary user trusts that user only if listed, as nix-daemon, so a
/// configuration that leaves its own user out gets what it asked for); refused if neither
/// list matches, or if the peer's primary group is the build-users group (a builder must
/// not talk to the daemon that runs it: it could ask for builds with its own output paths).
pub fn authorize(
    peer: &Peer,
    trusted_users: &[String],
    allowed_users: &[String],
    build_users_group: &str,
    daemon_uid: u32,
) -> Result<Trust, String> {
    let trusted = peer.matches(trusted_users);
    if !build_users_group.is_empty()
        && peer.groups.first().map(String::as_str) == Some(build_users_group)
        && peer.uid != daemon_uid
    {
        return Err(format!(
            "user '{}' is not allowed to connect to the kiln daemon (a build user)",
            peer.shown()
        ));
    }
    if !trusted && !peer.matches(allowed_users) {
        return Err(format!(
            "user '{}' is not allowed to connect to the kiln daemon",
            peer.shown()
        ));
    }
    Ok(if trusted {
        Trust::Trusted
    } else {
        Trust::Untrusted
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(user: &str, groups: &[&str]) -> Peer {
        Peer {
            pid: None,
            uid: 1000,
            gid: 100,
            user: Some(user.into()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn l(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn trust_rules() {
        let alice = peer("alice", &["users", "wheel"]);
        assert_eq!(
            authorize(&alice, &l(&["root", "@wheel"]), &l(&["*"]), "nixbld", 0),
            Ok(Trust::Trusted)
        );
        assert_eq!(
            authorize(&alice, &l(&["root"]), &l(&["*"]), "nixbld", 0),
            Ok(Trust::Untrusted)
        );
        assert!(
            authorize(&alice, &l(&["root"]), &l(&["bob", "@admins"]), "nixbld", 0)
                .unwrap_err()
                .contains("not allowed")
        );
        // A build user is refused even when everyone is allowed.
        let builder = peer("nixbld1", &["nixbld"]);
        assert!(authorize(&builder, &l(&["root"]), &l(&["*"]), "nixbld", 0).is_err());
        // The daemon's own user is trusted only if listed, as by nix-daemon (Nix 2.34's
        // impure-env test removes its user from `trusted-users` and expects that).
        assert_eq!(
            authorize(&alice, &l(&[]), &l(&["*"]), "", 1000),
            Ok(Trust::Untrusted)
        );
        assert_eq!(
            authorize(&alice, &l(&["alice"]), &l(&[]), "", 1000),
            Ok(Trust::Trusted)
        );
    }
}
