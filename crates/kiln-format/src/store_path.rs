//! Store directories, store paths and the path computations of Nix and Guix.
//!
//! A store path is `<store-dir>/<hash>-<name>` where `<hash>` is 32 Nix-base32 characters
//! (20 bytes, a SHA-256 folded by XOR) and `<name>` follows Nix's character rules. Every
//! computation takes the store directory as a value: `/gnu/store`, `/nix/store` and any
//! other directory produce different paths for the same content, exactly as Nix does.

use std::collections::BTreeSet;
use std::fmt;

use crate::base32;
use crate::hash::{Hash, HashAlgo};
use crate::Error;

/// Length of the hash part of a store path in characters.
pub const HASH_PART_LEN: usize = 32;
/// Length of the hash part in bytes.
pub const HASH_BYTES: usize = 20;
/// Longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

/// The logical store directory (`/gnu/store`, `/nix/store`, …): absolute, normalised,
/// without a trailing slash.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreDir(String);

impl StoreDir {
    /// Validates a store directory.
    pub fn new(dir: impl Into<String>) -> Result<Self, Error> {
        let dir = dir.into();
        let bad = |why: &str| {
            Err(Error::StorePath(format!(
                "invalid store directory '{dir}': {why}"
            )))
        };
        if !dir.starts_with('/') {
            return bad("not absolute");
        }
        if dir.len() == 1 {
            return bad("the root directory cannot be a store");
        }
        if dir.ends_with('/') {
            return bad("trailing slash");
        }
        if dir.contains('\0') {
            return bad("contains NUL");
        }
        for comp in dir[1..].split('/') {
            if comp.is_empty() || comp == "." || comp == ".." {
                return bad("not in canonical form");
            }
        }
        Ok(StoreDir(dir))
    }

    /// The directory as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Prints a store path as an absolute path in this directory.
    pub fn display(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path)
    }

    /// Parses an absolute store path that must lie directly in this directory.
    pub fn parse_path(&self, abs: &str) -> Result<StorePath, Error> {
        let base = abs
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| {
                Error::StorePath(format!("path '{abs}' is not in the Nix store '{}'", self.0))
            })?;
        StorePath::from_base_name(base).map_err(|e| match e {
            Error::StorePath(m) => Error::StorePath(format!("{m} (in '{abs}')")),
            other => other,
        })
    }

    /// Parses a path inside the store (maybe a file below a store path) and returns the
    /// store path it belongs to, like Nix's `toStorePath`.
    pub fn to_store_path(&self, abs: &str) -> Result<(StorePath, String), Error> {
        let rest = abs
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| {
                Error::StorePath(format!("path '{abs}' is not in the Nix store '{}'", self.0))
            })?;
        let (base, sub) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, String::new()),
        };
        Ok((StorePath::from_base_name(base)?, sub))
    }

    /// Whether a string is an absolute path directly in this store (no validation of the name).
    pub fn is_in_store(&self, abs: &str) -> bool {
        abs.strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|r| !r.is_empty() && !r.contains('/'))
    }

    /// `makeStorePath`: `<type>:<algo>:<base16>:<storedir>:<name>`, SHA-256, folded to 20 bytes.
    pub fn make_store_path(&self, ty: &str, hash: &Hash, name: &str) -> Result<StorePath, Error> {
        let s = format!(
            "{ty}:{}:{}:{}:{name}",
            hash.algo(),
            hash.to_base16(),
            self.0
        );
        let digest = Hash::sha256(s.as_bytes()).compress(HASH_BYTES);
        StorePath::from_parts(&digest, name)
    }

    /// `makeType`: the type string with each reference and `self` appended.
    pub fn make_type<'a>(
        &self,
        ty: &str,
        references: impl IntoIterator<Item = &'a StorePath>,
        self_reference: bool,
    ) -> String {
        let mut s = ty.to_string();
        // Nix sorts references (a std::set of StorePath, ordered by base name).
        let refs: BTreeSet<&StorePath> = references.into_iter().collect();
        for r in refs {
            s.push(':');
            s.push_str(&self.display(r));
        }
        if self_reference {
            s.push_str(":self");
        }
        s
    }

    /// Output path of an input-addressed derivation output (`makeOutputPath`).
    pub fn make_output_path(
        &self,
        output: &str,
        drv_hash: &Hash,
        drv_name: &str,
    ) -> Result<StorePath, Error> {
        self.make_store_path(
            &format!("output:{output}"),
            drv_hash,
            &output_path_name(drv_name, output),
        )
    }

    /// Path of a fixed-output (content-addressed, non-text) item (`makeFixedOutputPath`).
    /// SHA-256 recursive hashes use the `source` type and may carry references; every other
    /// combination (Git's included) is hashed through `fixed:out:` and may not.
    pub fn make_fixed_output_path(
        &self,
        method: FileIngestionMethod,
        hash: &Hash,
        name: &str,
        references: &BTreeSet<StorePath>,
        self_reference: bool,
    ) -> Result<StorePath, Error> {
        if method == FileIngestionMethod::Git {
            crate::git::check_algo(hash.algo())?;
        }
        if hash.algo() == HashAlgo::Sha256 && method == FileIngestionMethod::Recursive {
            self.make_store_path(
                &self.make_type("source", references, self_reference),
                hash,
                name,
            )
        } else {
            if !references.is_empty() || self_reference {
                return Err(Error::StorePath(format!(
                    "fixed-output path '{name}' with hash {hash} cannot have references"
                )));
            }
            let inner = format!(
                "fixed:out:{}{}:",
                method.prefix(),
                hash.encode(crate::hash::Encoding::Base16, true)
            );
            self.make_store_path("output:out", &Hash::sha256(inner.as_bytes()), name)
        }
    }

    /// Path of a text item (`makeTextPath`): `hash` is the SHA-256 of its contents.
    pub fn make_text_path(
        &self,
        name: &str,
        hash: &Hash,
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, Error> {
        if hash.algo() != HashAlgo::Sha256 {
            return Err(Error::StorePath(format!(
                "text path '{name}' must use sha256, not {}",
                hash.algo()
            )));
        }
        self.make_store_path(&self.make_type("text", references, false), hash, name)
    }

    /// `computeStorePathForText`: the path `addTextToStore` gives `text`.
    pub fn text_path_for(
        &self,
        name: &str,
        text: &[u8],
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, Error> {
        self.make_text_path(name, &Hash::sha256(text), references)
    }

    /// The path of a content-addressed item.
    pub fn ca_path(
        &self,
        name: &str,
        ca: &ContentAddress,
        references: &BTreeSet<StorePath>,
        self_reference: bool,
    ) -> Result<StorePath, Error> {
        match ca {
            ContentAddress::Text(h) => {
                if self_reference {
                    return Err(Error::StorePath(format!(
                        "text path '{name}' cannot refer to itself"
                    )));
                }
                self.make_text_path(name, h, references)
            }
            ContentAddress::Fixed(m, h) => {
                self.make_fixed_output_path(*m, h, name, references, self_reference)
            }
        }
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreDir({:?})", self.0)
    }
}

/// `<drvname>` for `out`, `<drvname>-<output>` otherwise.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_string()
    } else {
        format!("{drv_name}-{output}")
    }
}

/// Checks a store path name against Nix's rules; `context` names what is being checked.
pub fn check_name(name: &str, context: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::StorePath(format!(
            "store path '{context}' has an empty name"
        )));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::StorePath(format!(
            "store path '{context}' has a name longer than {MAX_NAME_LEN} characters"
        )));
    }
    // `.` and `..` are refused as current Nix does: a name that is a path-traversal
    // component must never be accepted anywhere a name is turned into a file name.
    if name == "." || name == ".." {
        return Err(Error::StorePath(format!(
            "store path '{context}' has the name '{name}'"
        )));
    }
    if let Some(c) = name.chars().find(|&c| !is_name_char(c)) {
        return Err(Error::StorePath(format!(
            "store path '{context}' contains illegal character '{}'",
            c.escape_default()
        )));
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_' | '?' | '=')
}

/// A store path without its directory: a 20-byte digest and a name.
#[derive(Clone, PartialEq, Eq)]
pub struct StorePath {
    digest: [u8; HASH_BYTES],
    /// The base name, `<hash32>-<name>`, kept for cheap printing and ordering.
    base: String,
}

impl StorePath {
    /// Builds from a digest and a name, validating the name.
    pub fn from_parts(digest: &[u8], name: &str) -> Result<Self, Error> {
        let digest: [u8; HASH_BYTES] = digest.try_into().map_err(|_| {
            Error::StorePath(format!("store path digest must be {HASH_BYTES} bytes"))
        })?;
        check_name(name, name)?;
        let base = format!("{}-{name}", base32::encode(&digest));
        Ok(StorePath { digest, base })
    }

    /// Parses `<hash32>-<name>`.
    pub fn from_base_name(base: &str) -> Result<Self, Error> {
        if base.len() < HASH_PART_LEN + 2 {
            return Err(Error::StorePath(format!(
                "'{base}' is too short to be a valid store path"
            )));
        }
        let bytes = base.as_bytes();
        if bytes[HASH_PART_LEN] != b'-' {
            return Err(Error::StorePath(format!(
                "'{base}' is not a valid store path: no '-' after the hash"
            )));
        }
        let mut digest = [0u8; HASH_BYTES];
        base32::decode_into(&bytes[..HASH_PART_LEN], &mut digest).map_err(|e| {
            Error::StorePath(format!("store path '{base}' has an invalid hash part: {e}"))
        })?;
        // `base` has a '-' at byte 32, so index 33 is on a char boundary.
        check_name(&base[HASH_PART_LEN + 1..], base)?;
        Ok(StorePath {
            digest,
            base: base.to_string(),
        })
    }

    /// The 20-byte digest.
    pub fn digest(&self) -> &[u8; HASH_BYTES] {
        &self.digest
    }

    /// The 32-character hash part.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_PART_LEN]
    }

    /// The name after the hash.
    pub fn name(&self) -> &str {
        &self.base[HASH_PART_LEN + 1..]
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// Whether this is a derivation (`.drv`).
    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }

    /// For a `.drv` path, the derivation name without the extension.
    pub fn derivation_name(&self) -> Option<&str> {
        self.name().strip_suffix(".drv")
    }
}

/// Hashes only the digest: it determines the path up to its name and is already uniformly
/// distributed, so hashing the 40-odd bytes of the base name as well buys nothing.
impl std::hash::Hash for StorePath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(&self.digest);
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base)
    }
}

/// Ordered by base name, as Nix orders `StorePath` (and hence sets of references).
impl Ord for StorePath {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.base.cmp(&other.base)
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// How a file system object is hashed for a content address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileIngestionMethod {
    /// The bytes of a single regular file.
    Flat,
    /// The NAR serialisation.
    Recursive,
    /// The Git object id (experimental `git-hashing`; SHA-1 or SHA-256), see [`crate::git`].
    /// Sent over the wire as a NAR, as Nix does.
    Git,
}

impl FileIngestionMethod {
    /// `r:` for recursive, `git:` for Git, nothing for flat.
    pub fn prefix(self) -> &'static str {
        match self {
            FileIngestionMethod::Flat => "",
            FileIngestionMethod::Recursive => "r:",
            FileIngestionMethod::Git => "git:",
        }
    }

    /// Splits a method prefix (`r:`, `git:` or none) off `s`.
    pub fn split_prefix(s: &str) -> (Self, &str) {
        if let Some(r) = s.strip_prefix("r:") {
            (FileIngestionMethod::Recursive, r)
        } else if let Some(r) = s.strip_prefix("git:") {
            (FileIngestionMethod::Git, r)
        } else {
            (FileIngestionMethod::Flat, s)
        }
    }
}

/// A content address as stored in the database's `ca` column and narinfo `CA:` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentAddress {
    /// `text:sha256:<base32>`: `addTextToStore` items and `.drv` files.
    Text(Hash),
    /// `fixed:[r:]<algo>:<base32>`.
    Fixed(FileIngestionMethod, Hash),
}

impl ContentAddress {
    /// Parses `text:sha256:…` or `fixed:[r:]algo:…`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Hash(format!("invalid content address '{s}': {why}"));
        if let Some(rest) = s.strip_prefix("text:") {
            let h = Hash::parse_any(rest, None).map_err(|e| bad(&e.to_string()))?;
            if h.algo() != HashAlgo::Sha256 {
                return Err(bad("text hashes must be sha256"));
            }
            Ok(ContentAddress::Text(h))
        } else if let Some(rest) = s.strip_prefix("fixed:") {
            let (method, rest) = FileIngestionMethod::split_prefix(rest);
            let h = Hash::parse_any(rest, None).map_err(|e| bad(&e.to_string()))?;
            if method == FileIngestionMethod::Git {
                crate::git::check_algo(h.algo()).map_err(|e| bad(&e.to_string()))?;
            }
            Ok(ContentAddress::Fixed(method, h))
        } else {
            Err(bad("expected 'text:' or 'fixed:'"))
        }
    }

    /// The hash.
    pub fn hash(&self) -> &Hash {
        match self {
            ContentAddress::Text(h) | ContentAddress::Fixed(_, h) => h,
        }
    }

    /// The method part as the worker protocol sends it: `text:sha256`, `fixed:r:sha256`, …
    pub fn method_algo(&self) -> String {
        match self {
            ContentAddress::Text(h) => format!("text:{}", h.algo()),
            ContentAddress::Fixed(m, h) => format!("fixed:{}{}", m.prefix(), h.algo()),
        }
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentAddress::Text(h) => write!(f, "text:{h}"),
            ContentAddress::Fixed(m, h) => write!(f, "fixed:{}{h}", m.prefix()),
        }
    }
}

/// The method half of a content address, as `wopAddToStore` (≥ 1.25) sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentAddressMethod {
    Text,
    Fixed(FileIngestionMethod),
}

impl ContentAddressMethod {
    /// The method as a derivation's output writes it before the algorithm: `text:`, `r:`,
    /// `git:` or nothing (flat).
    pub fn prefix(self) -> &'static str {
        match self {
            ContentAddressMethod::Text => "text:",
            ContentAddressMethod::Fixed(m) => m.prefix(),
        }
    }

    /// Splits a derivation output's method prefix (`text:`, `r:`, `git:` or none) off `s`.
    pub fn split_prefix(s: &str) -> (Self, &str) {
        match s.strip_prefix("text:") {
            Some(r) => (ContentAddressMethod::Text, r),
            None => {
                let (m, r) = FileIngestionMethod::split_prefix(s);
                (ContentAddressMethod::Fixed(m), r)
            }
        }
    }

    /// How the contents are hashed: text is hashed as a flat file.
    pub fn file_ingestion(self) -> FileIngestionMethod {
        match self {
            ContentAddressMethod::Text => FileIngestionMethod::Flat,
            ContentAddressMethod::Fixed(m) => m,
        }
    }

    /// The content address of contents with this method and `hash`.
    pub fn address(self, hash: Hash) -> ContentAddress {
        match self {
            ContentAddressMethod::Text => ContentAddress::Text(hash),
            ContentAddressMethod::Fixed(m) => ContentAddress::Fixed(m, hash),
        }
    }

    /// Parses `text:sha256`, `fixed:r:sha256`, `fixed:sha1`, … into a method and algorithm.
    pub fn parse_with_algo(s: &str) -> Result<(Self, HashAlgo), Error> {
        let bad = || Error::Hash(format!("invalid content address method '{s}'"));
        if let Some(a) = s.strip_prefix("text:") {
            return Ok((ContentAddressMethod::Text, a.parse().map_err(|_| bad())?));
        }
        let rest = s.strip_prefix("fixed:").ok_or_else(bad)?;
        let (method, algo) = FileIngestionMethod::split_prefix(rest);
        let algo: HashAlgo = algo.parse().map_err(|_| bad())?;
        if method == FileIngestionMethod::Git {
            crate::git::check_algo(algo)?;
        }
        Ok((ContentAddressMethod::Fixed(method), algo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nix() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    #[test]
    fn store_dir_rules() {
        assert!(StoreDir::new("/gnu/store").is_ok());
        for bad in [
            "gnu/store",
            "/",
            "/nix/store/",
            "/nix//store",
            "/nix/./store",
            "/a/../b",
        ] {
            assert!(StoreDir::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_and_print() {
        let s = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-konsole-18.12.3";
        let p = nix().parse_path(s).unwrap();
        assert_eq!(p.name(), "konsole-18.12.3");
        assert_eq!(p.hash_part(), "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz");
        assert_eq!(nix().display(&p), s);
        let (sp, sub) = nix().to_store_path(&format!("{s}/bin/konsole")).unwrap();
        assert_eq!(sp, p);
        assert_eq!(sub, "/bin/konsole");
    }

    #[test]
    fn bad_paths_are_refused_with_reasons() {
        let cases = [
            ("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz", "too short"),
            ("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-", "too short"),
            (
                "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxle-x",
                "invalid hash part",
            ),
            ("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz_x", "no '-'"),
            (
                "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a b",
                "illegal character ' '",
            ),
            (
                "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-..",
                "name '..'",
            ),
            (
                "/gnu/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x",
                "not in the Nix store",
            ),
        ];
        for (p, want) in cases {
            let e = nix().parse_path(p).unwrap_err().to_string();
            assert!(e.contains(want), "{p}: {e}");
        }
        let long = format!(
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-{}",
            "a".repeat(212)
        );
        assert!(nix()
            .parse_path(&long)
            .unwrap_err()
            .to_string()
            .contains("longer than 211"));
        let ok = format!(
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-{}",
            "a".repeat(211)
        );
        assert!(nix().parse_path(&ok).is_ok());
        // Multi-byte characters are refused without slicing through them.
        assert!(nix()
            .parse_path("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-é")
            .is_err());
        assert!(StorePath::from_base_name("ééééééééééééééééééééééééé-x").is_err());
    }

    #[test]
    fn content_address_round_trip() {
        for s in [
            "text:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            "fixed:sha1:kpcd173cq987hw957sx6m0868wv3x6d9",
            "fixed:git:sha1:wdh6nwjqvsm0chkxm0q4njx635ghs2lq",
            "fixed:git:sha256:04qdvff4wy3zcslcm5sdjmg0fdkg7rbw2j3sa0mk1ydnbz0cxdgm",
        ] {
            assert_eq!(ContentAddress::parse(s).unwrap().to_string(), s);
        }
        assert!(ContentAddress::parse("text:sha1:kpcd173cq987hw957sx6m0868wv3x6d9").is_err());
        assert!(ContentAddress::parse("nar:sha256:abc").is_err());
        assert!(
            ContentAddress::parse("fixed:git:md5:00000000000000000000000000")
                .unwrap_err()
                .to_string()
                .contains("must use SHA-1 or SHA-256")
        );
        assert_eq!(
            ContentAddressMethod::parse_with_algo("fixed:git:sha1").unwrap(),
            (
                ContentAddressMethod::Fixed(FileIngestionMethod::Git),
                HashAlgo::Sha1
            )
        );
        let (m, a) = ContentAddressMethod::parse_with_algo("fixed:r:sha512").unwrap();
        assert_eq!(
            (m, a),
            (
                ContentAddressMethod::Fixed(FileIngestionMethod::Recursive),
                HashAlgo::Sha512
            )
        );
    }
}
