//! Realisations (experimental `ca-derivations`): which store path an output of a derivation
//! turned out to be, keyed by the derivation's modulo hash and the output's name.
//!
//! The JSON is byte for byte what Nix 2.8 sends over the worker protocol and writes to
//! binary caches (`realisations/<id>.doi`): keys sorted, no spaces, store paths as base
//! names. Signatures sign that JSON without its `signatures` key.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::hash::{Hash, HashAlgo};
use crate::signature::{PublicKey, SecretKey};
use crate::store_path::StorePath;
use crate::Error;

/// Longest realisation JSON accepted from a client or a cache (real ones are a few hundred
/// bytes; a few thousand with many dependencies).
pub const MAX_REALISATION_JSON: usize = 1 << 20;

/// A derivation output's identity: `sha256:<base16 modulo hash>!<output name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DrvOutput {
    pub drv_hash: Hash,
    pub output: String,
}

impl DrvOutput {
    pub fn new(drv_hash: Hash, output: &str) -> Self {
        DrvOutput {
            drv_hash,
            output: output.to_string(),
        }
    }

    /// Parses `<algo>:<hash>!<output>`, naming the problem.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| {
            Error::Derivation(format!(
                "invalid derivation output id '{}': {why}",
                s.escape_default()
            ))
        };
        let (h, output) = s.split_once('!').ok_or_else(|| bad("no '!'"))?;
        if h.split_once(':').is_none() {
            return Err(bad("the hash has no algorithm prefix"));
        }
        let drv_hash = Hash::parse_any(h, None).map_err(|e| bad(&e.to_string()))?;
        crate::store_path::check_name(output, output).map_err(|_| bad("bad output name"))?;
        Ok(DrvOutput {
            drv_hash,
            output: output.to_string(),
        })
    }

    /// The hash part as stored in the database's `drvPath` column (`sha256:<base16>`).
    pub fn hash_string(&self) -> String {
        format!("{}:{}", self.drv_hash.algo(), self.drv_hash.to_base16())
    }
}

impl std::fmt::Display for DrvOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}!{}", self.hash_string(), self.output)
    }
}

/// A realised derivation output.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Realisation {
    pub id: DrvOutput,
    pub out_path: StorePath,
    pub signatures: BTreeSet<String>,
    /// The realisations of inputs this output refers to (their paths are in its references).
    pub dependent: BTreeMap<DrvOutput, StorePath>,
}

impl Realisation {
    pub fn new(id: DrvOutput, out_path: StorePath) -> Self {
        Realisation {
            id,
            out_path,
            signatures: BTreeSet::new(),
            dependent: BTreeMap::new(),
        }
    }

    fn json_value(&self, with_signatures: bool) -> Value {
        let mut deps = Map::new();
        for (id, p) in &self.dependent {
            deps.insert(id.to_string(), Value::String(p.base_name().into()));
        }
        let mut m = Map::new();
        m.insert("dependentRealisations".into(), Value::Object(deps));
        m.insert("id".into(), Value::String(self.id.to_string()));
        m.insert(
            "outPath".into(),
            Value::String(self.out_path.base_name().into()),
        );
        if with_signatures {
            let sigs = self.signatures.iter().cloned().map(Value::String).collect();
            m.insert("signatures".into(), Value::Array(sigs));
        }
        Value::Object(m)
    }

    /// The JSON Nix sends and stores.
    pub fn to_json(&self) -> String {
        self.json_value(true).to_string()
    }

    /// What signatures sign: the JSON without `signatures`.
    pub fn fingerprint(&self) -> String {
        self.json_value(false).to_string()
    }

    /// Signs the realisation. With dependent realisations it is signed twice: as it is
    /// (Nix 2.8 verifies that) and with an empty map of them, as Nix ≥ 2.2x keeps and
    /// copies every realisation (they dropped dependent realisations, so a realisation
    /// that went through one of them arrives with `{}` and only that signature verifies).
    pub fn sign(&mut self, key: &SecretKey) {
        let whole = key.sign(self.fingerprint().as_bytes());
        self.signatures.insert(whole);
        if !self.dependent.is_empty() {
            let bare = Realisation {
                dependent: BTreeMap::new(),
                ..self.clone()
            };
            self.signatures
                .insert(key.sign(bare.fingerprint().as_bytes()));
        }
    }

    /// Whether one of its signatures is valid for one of `keys`.
    pub fn verify(&self, keys: &[PublicKey]) -> bool {
        crate::signature::verify_any(keys, self.fingerprint().as_bytes(), &self.signatures)
    }

    /// What Nix 2.35 signs for the output `output` of `drv` built as `out_path` (a "build
    /// trace" entry, keyed by derivation path rather than by hash):
    /// `{"key":{"drvPath":…,"outputName":…},"value":{"outPath":…}}`, keys sorted, paths as
    /// base names.
    pub fn build_trace_fingerprint(drv: &StorePath, output: &str, out_path: &StorePath) -> String {
        serde_json::json!({
            "key": { "drvPath": drv.base_name(), "outputName": output },
            "value": { "outPath": out_path.base_name() },
        })
        .to_string()
    }

    /// Whether one of `sigs` signs that build trace entry for one of `keys`.
    pub fn verify_build_trace<'a>(
        drv: &StorePath,
        output: &str,
        out_path: &StorePath,
        keys: &[PublicKey],
        sigs: impl IntoIterator<Item = &'a String>,
    ) -> bool {
        let fp = Realisation::build_trace_fingerprint(drv, output, out_path);
        crate::signature::verify_any(keys, fp.as_bytes(), sigs)
    }

    /// Parses the JSON (`whence` names where it came from in errors). Bounded, and strict
    /// about the types of the fields it reads.
    pub fn from_json(text: &str, whence: &str) -> Result<Self, Error> {
        let bad =
            |why: String| Error::Derivation(format!("realisation from {whence} is invalid: {why}"));
        if text.len() > MAX_REALISATION_JSON {
            return Err(bad(format!("{} bytes is more than the limit", text.len())));
        }
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let field = |name: &str| -> Result<&str, Error> {
            v.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("missing string field '{name}'")))
        };
        let id = DrvOutput::parse(field("id")?)?;
        let path = |s: &str| StorePath::from_base_name(s).map_err(|e| bad(e.to_string()));
        let out_path = path(field("outPath")?)?;
        let mut signatures = BTreeSet::new();
        if let Some(sigs) = v.get("signatures") {
            let arr = sigs
                .as_array()
                .ok_or_else(|| bad("'signatures' is not a list".into()))?;
            for s in arr {
                let s = s
                    .as_str()
                    .ok_or_else(|| bad("a signature is not a string".into()))?;
                signatures.insert(s.to_string());
            }
        }
        let mut dependent = BTreeMap::new();
        if let Some(deps) = v.get("dependentRealisations") {
            let obj = deps
                .as_object()
                .ok_or_else(|| bad("'dependentRealisations' is not an object".into()))?;
            for (k, p) in obj {
                let p = p
                    .as_str()
                    .ok_or_else(|| bad(format!("dependency '{k}' is not a path")))?;
                dependent.insert(DrvOutput::parse(k)?, path(p)?);
            }
        }
        Ok(Realisation {
            id,
            out_path,
            signatures,
            dependent,
        })
    }
}

/// The algorithm realisation ids use.
pub const DRV_HASH_ALGO: HashAlgo = HashAlgo::Sha256;

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:ba16eb1ad5d8a8ff6bc1a03bd9c8dbb1d9b6ff3b5fbfbca5a8c2d6e6b1f4c3d2!out";

    #[test]
    fn build_trace_fingerprint_is_nix_2_35s() {
        let drv = StorePath::from_base_name("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-hello.drv").unwrap();
        let out = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello").unwrap();
        assert_eq!(
            Realisation::build_trace_fingerprint(&drv, "out", &out),
            r#"{"key":{"drvPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-hello.drv","outputName":"out"},"value":{"outPath":"7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello"}}"#
        );
        let key = crate::signature::SecretKey::generate("test-1").unwrap();
        let sig = key.sign(Realisation::build_trace_fingerprint(&drv, "out", &out).as_bytes());
        let keys = [key.public()];
        assert!(Realisation::verify_build_trace(
            &drv,
            "out",
            &out,
            &keys,
            [&sig]
        ));
        assert!(!Realisation::verify_build_trace(
            &drv,
            "dev",
            &out,
            &keys,
            [&sig]
        ));
    }

    #[test]
    fn json_round_trips_in_nix_key_order() {
        let id = DrvOutput::parse(ID).unwrap();
        assert_eq!(id.to_string(), ID);
        let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello").unwrap();
        let mut r = Realisation::new(id.clone(), p.clone());
        r.dependent.insert(id.clone(), p.clone());
        let j = r.to_json();
        assert_eq!(
            j,
            format!("{{\"dependentRealisations\":{{\"{ID}\":\"{}\"}},\"id\":\"{ID}\",\"outPath\":\"{}\",\"signatures\":[]}}", p.base_name(), p.base_name())
        );
        assert_eq!(Realisation::from_json(&j, "test").unwrap(), r);
        assert!(!r.fingerprint().contains("signatures"));
    }

    #[test]
    fn signatures_cover_the_path() {
        let key = SecretKey::generate("test-1").unwrap();
        let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello").unwrap();
        let mut r = Realisation::new(DrvOutput::parse(ID).unwrap(), p);
        r.sign(&key);
        assert!(r.verify(&[key.public()]));
        r.out_path = StorePath::from_base_name("0h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello").unwrap();
        assert!(!r.verify(&[key.public()]));
    }

    /// Nix 2.34 keeps no dependent realisations: one that went through it arrives with an
    /// empty map, and must still verify; nothing else about it may change.
    #[test]
    fn signatures_survive_dropping_dependent_realisations() {
        let key = SecretKey::generate("test-1").unwrap();
        let id = DrvOutput::parse(ID).unwrap();
        let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello").unwrap();
        let mut r = Realisation::new(id.clone(), p.clone());
        r.dependent.insert(id, p);
        r.sign(&key);
        assert_eq!(r.signatures.len(), 2);
        assert!(r.verify(&[key.public()]));
        let mut bare = r.clone();
        bare.dependent.clear();
        let bare = Realisation::from_json(&bare.to_json(), "test").unwrap();
        assert!(bare.verify(&[key.public()]));
        let mut moved = bare;
        moved.out_path =
            StorePath::from_base_name("0h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello").unwrap();
        assert!(!moved.verify(&[key.public()]));
    }

    #[test]
    fn malformed_input_is_refused_with_a_reason() {
        for (text, want) in [
            ("[]", "missing string field 'id'"),
            ("{\"id\":\"sha256:00!out\",\"outPath\":\"x\"}", "invalid derivation output id"),
            (&format!("{{\"id\":\"{ID}\"}}"), "missing string field 'outPath'"),
            (&format!("{{\"id\":\"{ID}\",\"outPath\":\"7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a\",\"signatures\":3}}"), "not a list"),
            ("{", "EOF"),
        ] {
            let e = Realisation::from_json(text, "test").unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(DrvOutput::parse("nohash").is_err());
        assert!(DrvOutput::parse("sha256:zz!out").is_err());
    }
}
