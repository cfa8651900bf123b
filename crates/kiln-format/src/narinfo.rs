//! `.narinfo` files: what a binary cache says about one store path.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::hash::Hash;
use crate::signature::{verify_any, PublicKey, SecretKey};
use crate::store_path::{ContentAddress, StoreDir, StorePath};
use crate::Error;

/// Largest narinfo kiln parses.
pub const MAX_NARINFO_SIZE: usize = 16 << 20;

/// A parsed narinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Where the (compressed) NAR is, relative to the cache.
    pub url: String,
    /// `none`, `xz`, `bzip2`, `zstd`, `br`, …; `bzip2` when absent, as in Nix.
    pub compression: String,
    pub file_hash: Option<Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    pub sigs: BTreeSet<String>,
    pub ca: Option<ContentAddress>,
}

/// The signed fingerprint of a path: `1;<path>;<narHash>;<narSize>;<refs,>`.
pub fn fingerprint(
    store_dir: &StoreDir,
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: &BTreeSet<StorePath>,
) -> String {
    let refs: Vec<String> = references.iter().map(|r| store_dir.display(r)).collect();
    format!(
        "1;{};{};{};{}",
        store_dir.display(path),
        nar_hash,
        nar_size,
        refs.join(",")
    )
}

impl NarInfo {
    /// Parses narinfo text. `what` names the source in messages (usually the URL).
    pub fn parse(store_dir: &StoreDir, text: &str, what: &str) -> Result<NarInfo, Error> {
        let corrupt = |line: usize, why: String| {
            Error::NarInfo(format!("narinfo '{what}' is corrupt: line {line}: {why}"))
        };
        if text.len() > MAX_NARINFO_SIZE {
            return Err(Error::NarInfo(format!(
                "narinfo '{what}' is larger than {MAX_NARINFO_SIZE} bytes"
            )));
        }
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = BTreeSet::new();
        let mut deriver = None;
        let mut system = None;
        let mut sigs = BTreeSet::new();
        let mut ca = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.split_once(':'))
                .ok_or_else(|| {
                    corrupt(
                        n,
                        format!("expected 'Key: value', got '{}'", line.escape_default()),
                    )
                })?;
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| corrupt(n, format!("{key} '{v}' is not a number")))
            };
            let hash = |v: &str| Hash::parse_any(v, None).map_err(|e| corrupt(n, e.to_string()));
            let base = |v: &str| {
                StorePath::from_base_name(v).map_err(|e| corrupt(n, format!("{key}: {e}")))
            };
            match key {
                "StorePath" => {
                    store_path = Some(
                        store_dir
                            .parse_path(value)
                            .map_err(|e| corrupt(n, e.to_string()))?,
                    )
                }
                "URL" => {
                    if value.is_empty() {
                        return Err(corrupt(n, "empty URL".into()));
                    }
                    url = Some(value.to_string())
                }
                "Compression" => compression = Some(value.to_string()),
                "FileHash" => file_hash = Some(hash(value)?),
                "FileSize" => file_size = Some(num(value)?),
                "NarHash" => nar_hash = Some(hash(value)?),
                "NarSize" => nar_size = Some(num(value)?),
                "References" => {
                    for r in value.split(' ').filter(|r| !r.is_empty()) {
                        references.insert(base(r)?);
                    }
                }
                "Deriver" if value != "unknown-deriver" && !value.is_empty() => {
                    deriver = Some(base(value)?)
                }
                "System" => system = (!value.is_empty()).then(|| value.to_string()),
                "Sig" => {
                    sigs.insert(value.to_string());
                }
                "CA" => {
                    ca = Some(ContentAddress::parse(value).map_err(|e| corrupt(n, e.to_string()))?)
                }
                _ => {} // Unknown fields are ignored, as Nix does.
            }
        }
        let missing =
            |f: &str| Error::NarInfo(format!("narinfo '{what}' is corrupt: missing '{f}'"));
        let nar_size = nar_size.ok_or_else(|| missing("NarSize"))?;
        if nar_size == 0 {
            return Err(Error::NarInfo(format!(
                "narinfo '{what}' is corrupt: NarSize is 0"
            )));
        }
        Ok(NarInfo {
            store_path: store_path.ok_or_else(|| missing("StorePath"))?,
            url: url.ok_or_else(|| missing("URL"))?,
            compression: compression.unwrap_or_else(|| "bzip2".into()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size,
            references,
            deriver,
            system,
            sigs,
            ca,
        })
    }

    /// Prints in Nix's field order.
    pub fn to_text(&self, store_dir: &StoreDir) -> String {
        let mut s = String::with_capacity(512);
        let _ = writeln!(s, "StorePath: {}", store_dir.display(&self.store_path));
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {h}");
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash);
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        let refs: Vec<&str> = self.references.iter().map(StorePath::base_name).collect();
        let _ = writeln!(s, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {d}");
        }
        if let Some(sys) = &self.system {
            if !sys.is_empty() {
                let _ = writeln!(s, "System: {sys}");
            }
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }

    /// The fingerprint signatures are made over.
    pub fn fingerprint(&self, store_dir: &StoreDir) -> String {
        fingerprint(
            store_dir,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds a signature by `key`.
    pub fn sign(&mut self, store_dir: &StoreDir, key: &SecretKey) {
        self.sigs
            .insert(key.sign(self.fingerprint(store_dir).as_bytes()));
    }

    /// Whether a trusted key signed this narinfo.
    pub fn verify(&self, store_dir: &StoreDir, keys: &[PublicKey]) -> bool {
        verify_any(keys, self.fingerprint(store_dir).as_bytes(), &self.sigs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "StorePath: /nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12
URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz
Compression: xz
FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3
FileSize: 4212
NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73
NarSize: 226560
References: 0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-glibc-2.35 7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12
Deriver: 1b8m03r63zqhnjf7l5wnldhh7c134ap5-hello-2.12.drv
System: x86_64-linux
Sig: cache.nixos.org-1:abc
";

    #[test]
    fn round_trip() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let ni = NarInfo::parse(&sd, SAMPLE, "test").unwrap();
        assert_eq!(ni.references.len(), 2);
        assert_eq!(ni.to_text(&sd), SAMPLE);
        assert!(ni.fingerprint(&sd).starts_with(
            "1;/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12;sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73;226560;/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-glibc-2.35,"
        ));
    }

    #[test]
    fn signing() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let mut ni = NarInfo::parse(&sd, SAMPLE, "test").unwrap();
        ni.sigs.clear();
        let sk = SecretKey::generate("k1").unwrap();
        assert!(!ni.verify(&sd, &[sk.public()]));
        ni.sign(&sd, &sk);
        assert!(ni.verify(&sd, &[sk.public()]));
        ni.nar_size += 1;
        assert!(!ni.verify(&sd, &[sk.public()]));
    }

    #[test]
    fn corrupt_narinfos() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let cases = [
            (SAMPLE.replace("NarSize: 226560\n", ""), "missing 'NarSize'"),
            (
                SAMPLE.replace("NarSize: 226560", "NarSize: 0"),
                "NarSize is 0",
            ),
            (
                SAMPLE.replace("NarSize: 226560", "NarSize: lots"),
                "line 7: NarSize 'lots' is not a number",
            ),
            (
                SAMPLE.replace("/nix/store/7h7", "/gnu/store/7h7"),
                "not in the Nix store",
            ),
            (SAMPLE.replace("glibc-2.35", "glibc 2.35"), "line 8"),
            (
                SAMPLE.replace("URL: nar", "garbage line\nURL: nar"),
                "line 2: expected 'Key: value'",
            ),
            (SAMPLE.replace("sha256:0mdqa", "sha256:Xmdqa"), "line 6"),
        ];
        for (text, want) in cases {
            let e = NarInfo::parse(&sd, &text, "t").unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        }
    }
}
