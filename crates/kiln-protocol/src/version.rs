//! Protocol versions and the two dialects kiln serves on one socket.
//!
//! A version is `major << 8 | minor`. The daemon sends its version before it knows the
//! client's, so kiln advertises one version to everyone: Guix's current `0x164`. Nix 2.8
//! clients gate every feature on "daemon minor ≥ N" with N ≤ 34, so minor 100 gives them
//! exactly what 1.34 gives; Guix clients gate on the daemon's minor too (their `SetOptions`
//! layout changes at 0x61) and see the version their own daemon sends. The daemon side then
//! gates on the client's minor, and the client's minor tells the dialects apart: Guix
//! clients send 0x163/0x164 (minor ≥ 0x60), Nix 2.8 sends 0x122.

/// The client's greeting.
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// The daemon's greeting.
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// The version kiln's daemon advertises.
pub const DAEMON_VERSION: u64 = 0x164;
/// The newest Nix protocol minor kiln speaks (Nix 2.8's 1.34).
pub const NIX_MAX_MINOR: u64 = 34;
/// The oldest client Nix 2.8's daemon accepts (1.10), and so does kiln's.
pub const MIN_CLIENT_VERSION: u64 = 0x10a;
/// Guix's minors start here.
pub const GUIX_MIN_MINOR: u64 = 0x60;
/// What Nix 2.8's client sends.
pub const NIX_2_8_CLIENT_VERSION: u64 = 0x122;
/// What current Guix clients send.
pub const GUIX_CLIENT_VERSION: u64 = 0x164;
/// The Nix release whose protocol and behaviour kiln reproduces, for the version string
/// Nix clients display (`nix store ping`).
pub const NIX_COMPAT_VERSION: &str = "2.8.0";

/// Which family a client belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Nix,
    Guix,
}

/// A peer's protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version(pub u64);

impl Version {
    pub fn major(self) -> u64 {
        self.0 >> 8
    }
    pub fn minor(self) -> u64 {
        self.0 & 0xff
    }
    /// Whether the minor is at least `n`.
    pub fn at_least(self, n: u64) -> bool {
        self.minor() >= n
    }
    pub fn dialect(self) -> Dialect {
        if self.minor() >= GUIX_MIN_MINOR {
            Dialect::Guix
        } else {
            Dialect::Nix
        }
    }
    pub fn is_guix(self) -> bool {
        self.dialect() == Dialect::Guix
    }
    /// Whether kiln can serve a client of this version; the reason if not.
    pub fn check_client(self) -> Result<(), String> {
        if self.0 < MIN_CLIENT_VERSION {
            return Err(format!(
                "the client's protocol version {:#x} is too old (at least {MIN_CLIENT_VERSION:#x})",
                self.0
            ));
        }
        if self.minor() > NIX_MAX_MINOR && self.minor() < GUIX_MIN_MINOR {
            // Nix ≥ 2.9 gates its newer features on the daemon's minor, which kiln cannot
            // lower for one client after advertising it to all.
            return Err(format!(
                "Nix protocol 1.{} is newer than the 1.{NIX_MAX_MINOR} that kiln speaks (Nix {NIX_COMPAT_VERSION})",
                self.minor()
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{} ({:#x})", self.major(), self.minor(), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialects_and_limits() {
        assert_eq!(Version(0x122).dialect(), Dialect::Nix);
        assert_eq!(Version(0x163).dialect(), Dialect::Guix);
        assert_eq!(Version(0x164).minor(), 100);
        assert!(Version(0x122).check_client().is_ok());
        assert!(Version(0x10a).check_client().is_ok());
        assert!(Version(0x109)
            .check_client()
            .unwrap_err()
            .contains("too old"));
        assert!(Version(0x125).check_client().unwrap_err().contains("newer"));
        assert!(Version(0x164).check_client().is_ok());
    }
}
