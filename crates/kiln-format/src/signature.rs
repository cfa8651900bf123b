//! Ed25519 keys and signatures in Nix's `name:base64` format.
//!
//! A secret key file holds `name:base64(seed ‖ public key)` (libsodium's 64-byte form), a
//! public key `name:base64(public key)`, a signature `name:base64(64-byte signature)`.

use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use crate::Error;

fn split<'a>(s: &'a str, what: &str) -> Result<(&'a str, Vec<u8>), Error> {
    let s = s.trim();
    let (name, b64) = s
        .split_once(':')
        .ok_or_else(|| Error::Signature(format!("{what} is corrupt: expected 'name:base64'")))?;
    if name.is_empty() || b64.is_empty() {
        return Err(Error::Signature(format!(
            "{what} is corrupt: empty name or key"
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| Error::Signature(format!("{what} '{name}' is not valid base64: {e}")))?;
    Ok((name, bytes))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A named signing key.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.name)
    }
}

impl SecretKey {
    /// Parses `name:base64(64 bytes)`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let (name, bytes) = split(s, "secret key")?;
        let arr: [u8; 64] = bytes.as_slice().try_into().map_err(|_| {
            Error::Signature(format!(
                "secret key '{name}' is not valid: {} bytes instead of 64",
                bytes.len()
            ))
        })?;
        let key = SigningKey::from_keypair_bytes(&arr).map_err(|_| {
            Error::Signature(format!(
                "secret key '{name}' is not valid: public half does not match"
            ))
        })?;
        Ok(SecretKey {
            name: name.to_string(),
            key,
        })
    }

    /// A fresh random key.
    pub fn generate(name: &str) -> Result<Self, Error> {
        if name.is_empty() || name.contains(':') {
            return Err(Error::Signature(format!("invalid key name '{name}'")));
        }
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        Ok(SecretKey {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs `data`, giving `name:base64(signature)`.
    pub fn sign(&self, data: &[u8]) -> String {
        format!("{}:{}", self.name, b64(&self.key.sign(data).to_bytes()))
    }
}

impl std::fmt::Display for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, b64(&self.key.to_keypair_bytes()))
    }
}

/// A named verification key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self)
    }
}

impl PublicKey {
    /// Parses `name:base64(32 bytes)`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let (name, bytes) = split(s, "public key")?;
        let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            Error::Signature(format!(
                "public key '{name}' is not valid: {} bytes instead of 32",
                bytes.len()
            ))
        })?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| {
            Error::Signature(format!(
                "public key '{name}' is not valid: not a curve point"
            ))
        })?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` (`name:base64`) is this key's valid signature of `data`.
    pub fn verify(&self, data: &[u8], sig: &str) -> bool {
        let Some((name, b)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b) else {
            return false;
        };
        let Ok(arr) = <[u8; 64]>::try_from(bytes.as_slice()) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&arr);
        self.key.verify_strict(data, &sig).is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, b64(self.key.as_bytes()))
    }
}

/// Whether any of `sigs` is a valid signature of `data` by any of `keys`.
pub fn verify_any<'a>(
    keys: &[PublicKey],
    data: &[u8],
    sigs: impl IntoIterator<Item = &'a String>,
) -> bool {
    sigs.into_iter()
        .any(|s| keys.iter().any(|k| k.verify(data, s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let sk = SecretKey::generate("cache.example-1").unwrap();
        let pk = sk.public();
        let sig = sk.sign(b"1;/nix/store/x;sha256:y;1;");
        assert!(pk.verify(b"1;/nix/store/x;sha256:y;1;", &sig));
        assert!(!pk.verify(b"1;/nix/store/x;sha256:y;2;", &sig));
        // Same key, other name: refused.
        let other = PublicKey::parse(&pk.to_string().replace("cache.example-1", "other")).unwrap();
        assert!(!other.verify(b"1;/nix/store/x;sha256:y;1;", &sig));
        // Round trips.
        let sk2 = SecretKey::parse(&sk.to_string()).unwrap();
        assert_eq!(sk2.public(), pk);
        assert_eq!(PublicKey::parse(&pk.to_string()).unwrap(), pk);
    }

    #[test]
    fn bad_keys_are_refused() {
        for s in ["", "nocolon", ":AAAA", "name:", "name:!!!", "name:AAAA"] {
            assert!(PublicKey::parse(s).is_err(), "{s}");
            assert!(SecretKey::parse(s).is_err(), "{s}");
        }
        assert!(!SecretKey::generate("x")
            .unwrap()
            .public()
            .verify(b"d", "x:notbase64!"));
    }
}
