//! Derivations: the ATerm `.drv` format, `hashDerivationModulo`, output path computation and
//! the JSON shape of `nix show-derivation`.
//!
//! Parsing keeps everything needed to print the file again; printing a parsed canonical file
//! yields the identical bytes, so `kiln drv check` can compare the two.

mod aterm;
mod hash_modulo;
mod json;

use std::collections::{BTreeMap, BTreeSet};

pub use aterm::MAX_DRV_SIZE;
pub use hash_modulo::{DerivationHasher, DerivationReader};

use crate::hash::{Hash, HashAlgo};
use crate::store_path::{
    output_path_name, ContentAddressMethod, FileIngestionMethod, StoreDir, StorePath,
};
use crate::Error;

/// The hash a fixed-output derivation's single output must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedOutputHash {
    pub method: FileIngestionMethod,
    pub hash: Hash,
}

impl FixedOutputHash {
    /// `r:sha256` or `sha256`, as printed in the `.drv` and by `show-derivation`.
    pub fn method_algo(&self) -> String {
        format!("{}{}", self.method.prefix(), self.hash.algo())
    }
}

/// How a floating content-addressed output (experimental `ca-derivations`) will be hashed:
/// its path is computed from its contents once it is built. The `text` method (experimental
/// `dynamic-derivations`: `outputHashMode = "text"`) makes a text path, as `.drv` files are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloatingOutput {
    pub method: ContentAddressMethod,
    pub algo: HashAlgo,
    /// An impure output (experimental `impure-derivations`): built afresh every time, never
    /// reused, and with the network, like a fixed-output derivation.
    pub impure: bool,
}

impl FloatingOutput {
    /// `r:sha256`, `text:sha256` or `sha256`, as printed in the `.drv` and by
    /// `show-derivation`.
    pub fn method_algo(&self) -> String {
        format!("{}{}", self.method.prefix(), self.algo)
    }
}

/// What a derivation uses of a derivation that another derivation made: some of its
/// outputs, and (deeper still) outputs of the derivations its own outputs are.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DynamicInput {
    pub outputs: BTreeSet<String>,
    pub children: BTreeMap<String, DynamicInput>,
}

/// Nesting of dynamic inputs a `.drv` may have: real ones have one or two levels; the bound
/// keeps a hostile file from exhausting the parser's stack.
pub const MAX_DYNAMIC_DEPTH: usize = 32;

/// The placeholder a derivation holds for output `output` of the derivation that the
/// output `placeholder` stands for is (`DownstreamPlaceholder::unknownDerivation`): `/` and
/// the base-32 SHA-256 of `nix-computed-output:<placeholder's hash, compressed to 20
/// bytes>:<output>`.
pub fn dynamic_placeholder(placeholder: &str, output: &str) -> Result<String, Error> {
    let digest = placeholder
        .strip_prefix('/')
        .ok_or_else(|| Error::Derivation(format!("'{placeholder}' is not a placeholder")))
        .and_then(|h| Hash::parse_digest(HashAlgo::Sha256, h))?;
    let compressed = crate::base32::encode(&digest.compress(20));
    let clear = format!("nix-computed-output:{compressed}:{output}");
    Ok(format!("/{}", Hash::sha256(clear.as_bytes()).to_base32()))
}

/// One output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DerivationOutput {
    /// Its path. `None` for a floating content-addressed output, for an input-addressed
    /// output whose path is deferred until inputs that are floating are built, and while a
    /// derivation is being constructed (printed as `""` in all cases).
    pub path: Option<StorePath>,
    /// For fixed-output derivations, the expected hash.
    pub fixed: Option<FixedOutputHash>,
    /// For floating content-addressed derivations, how the output will be hashed.
    pub floating: Option<FloatingOutput>,
}

/// A parsed `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// The derivation's name (the `.drv` file name without hash and extension).
    pub name: String,
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    /// Outputs of derivations that input derivations make (experimental
    /// `dynamic-derivations`), by input derivation and the output of it that is a `.drv`.
    /// Each key is also a key of `input_drvs` (whose set may then be empty). A derivation
    /// with any is written in the versioned form, `DrvWithVersion("xp-dyn-drv",…)`.
    pub dynamic_inputs: BTreeMap<StorePath, BTreeMap<String, DynamicInput>>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

impl Derivation {
    /// Parses ATerm text; `name` is the derivation name (from its `.drv` path).
    pub fn parse(store_dir: &StoreDir, name: &str, text: &[u8]) -> Result<Self, Error> {
        aterm::parse(store_dir, name, text)
    }

    /// Prints the ATerm text exactly as Nix writes the file.
    pub fn to_aterm(&self, store_dir: &StoreDir) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        aterm::write(self, store_dir, &mut out, false, None);
        out
    }

    /// The fixed-output hash if this is a fixed-output derivation: exactly one output, named
    /// `out`, with a hash.
    pub fn fixed_output(&self) -> Option<&FixedOutputHash> {
        if self.outputs.len() != 1 {
            return None;
        }
        self.outputs.get("out").and_then(|o| o.fixed.as_ref())
    }

    /// Whether this is a fixed-output derivation.
    pub fn is_fixed_output(&self) -> bool {
        self.fixed_output().is_some()
    }

    /// Whether this is a floating content-addressed derivation (every output floating).
    pub fn is_floating(&self) -> bool {
        !self.outputs.is_empty() && self.outputs.values().all(|o| o.floating.is_some())
    }

    /// Whether this is an impure derivation (experimental `impure-derivations`).
    pub fn is_impure(&self) -> bool {
        self.outputs
            .values()
            .any(|o| o.floating.is_some_and(|f| f.impure))
    }

    /// Whether its build is isolated from the network and the caller's environment: not
    /// fixed-output (whose result is checked against a hash) and not impure.
    pub fn is_sandboxed(&self) -> bool {
        !self.is_fixed_output() && !self.is_impure()
    }

    /// Whether building this derivation first needs its inputs' outputs substituted in
    /// (Nix's "resolution"): it has input derivations and is floating, or some outputs have
    /// no path yet (deferred until floating inputs are built).
    pub fn needs_resolution(&self) -> bool {
        !self.input_drvs.is_empty()
            && !self.is_fixed_output()
            && (self.is_floating() || self.outputs.values().any(|o| o.path.is_none()))
    }

    /// Checks the structural rules Nix enforces on outputs: a hash only on a single `out`.
    pub fn check_outputs_shape(&self) -> Result<(), Error> {
        let floating = self
            .outputs
            .values()
            .filter(|o| o.floating.is_some())
            .count();
        if floating > 0 && floating != self.outputs.len() {
            return Err(Error::Derivation(format!(
                "derivation '{}' mixes floating content-addressed outputs with other outputs",
                self.name
            )));
        }
        let impure = self
            .outputs
            .values()
            .filter(|o| o.floating.is_some_and(|f| f.impure))
            .count();
        if impure > 0 && impure != self.outputs.len() {
            return Err(Error::Derivation(format!(
                "derivation '{}' mixes impure outputs with other outputs",
                self.name
            )));
        }
        let fixed = self.outputs.values().filter(|o| o.fixed.is_some()).count();
        if fixed > 0 && self.outputs.len() > 1 {
            return Err(Error::Derivation(format!(
                "derivation '{}' has a fixed output and other outputs; only one fixed output named 'out' is allowed",
                self.name
            )));
        }
        if fixed == 1 && !self.outputs.contains_key("out") {
            return Err(Error::Derivation(format!(
                "derivation '{}': a single fixed output must be named 'out'",
                self.name
            )));
        }
        if self.outputs.is_empty() {
            return Err(Error::Derivation(format!(
                "derivation '{}' has no outputs",
                self.name
            )));
        }
        Ok(())
    }

    /// The path of an output, or an error naming the derivation.
    pub fn output_path(&self, output: &str) -> Result<&StorePath, Error> {
        self.outputs
            .get(output)
            .and_then(|o| o.path.as_ref())
            .ok_or_else(|| {
                Error::Derivation(format!(
                    "derivation '{}' has no output '{output}'",
                    self.name
                ))
            })
    }

    /// Every output path, by output name.
    pub fn output_paths(&self) -> impl Iterator<Item = (&str, &StorePath)> {
        self.outputs
            .iter()
            .filter_map(|(n, o)| o.path.as_ref().map(|p| (n.as_str(), p)))
    }

    /// The path of a fixed output computed from its hash (`DerivationOutputCAFixed::path`).
    pub fn fixed_output_path(
        &self,
        store_dir: &StoreDir,
        fixed: &FixedOutputHash,
    ) -> Result<StorePath, Error> {
        store_dir.make_fixed_output_path(
            fixed.method,
            &fixed.hash,
            &self.name,
            &BTreeSet::new(),
            false,
        )
    }

    /// Store paths this derivation refers to when added to the store: its input sources and
    /// input derivations (`.drv` references, as `writeDerivation` computes them).
    pub fn references(&self) -> BTreeSet<StorePath> {
        let mut refs = self.input_srcs.clone();
        refs.extend(self.input_drvs.keys().cloned());
        refs
    }

    /// The store path the `.drv` file itself has (`writeDerivation`: a text path).
    pub fn drv_path(&self, store_dir: &StoreDir) -> Result<StorePath, Error> {
        let text = self.to_aterm(store_dir);
        store_dir.text_path_for(&format!("{}.drv", self.name), &text, &self.references())
    }

    /// Whether this derivation's `system` can run on a host of type `host`
    /// (plus `i686-linux` on `x86_64-linux`, and the builtin pseudo-platform).
    pub fn platform_matches(&self, host: &str, extra: &[String]) -> bool {
        self.platform == host
            || self.platform == "builtin"
            || extra.iter().any(|e| e == &self.platform)
            || (host == "x86_64-linux" && self.platform == "i686-linux")
    }

    /// The environment value as a boolean the way Nix reads derivation attributes (`"1"`).
    pub fn env_bool(&self, key: &str, default: bool) -> bool {
        match self.env.get(key).map(String::as_str) {
            Some("1") => true,
            Some(_) => false,
            None => default,
        }
    }

    /// Whitespace-separated tokens of an environment value.
    pub fn env_tokens(&self, key: &str) -> Option<Vec<&str>> {
        self.env
            .get(key)
            .map(|v| v.split_ascii_whitespace().collect())
    }

    /// Builds a new input-addressed or fixed-output derivation: computes every output path
    /// from `hashDerivationModulo` and sets the output environment variables, as
    /// `derivationStrict` (Nix) and `derivation` (Guix) do.
    pub fn finalize<R: DerivationReader>(
        mut self,
        store_dir: &StoreDir,
        hasher: &mut DerivationHasher<R>,
    ) -> Result<Self, Error> {
        self.check_outputs_shape()?;
        if let Some(fixed) = self.fixed_output().copied() {
            let p = self.fixed_output_path(store_dir, &fixed)?;
            self.env.insert("out".into(), store_dir.display(&p));
            if let Some(o) = self.outputs.get_mut("out") {
                o.path = Some(p);
            }
            return Ok(self);
        }
        for (name, o) in self.outputs.iter_mut() {
            o.path = None;
            self.env.insert(name.clone(), String::new());
        }
        let (h, deferred) = hasher.hash_modulo_kind(store_dir, &self, true)?;
        if deferred {
            // Floating, or depending on a floating input: the builder sees placeholders
            // that are replaced once the paths are known.
            for name in self.outputs.keys() {
                self.env.insert(name.clone(), output_placeholder(name));
            }
            return Ok(self);
        }
        let names: Vec<String> = self.outputs.keys().cloned().collect();
        for name in names {
            let p = store_dir.make_output_path(&name, &h, &self.name)?;
            self.env.insert(name.clone(), store_dir.display(&p));
            if let Some(o) = self.outputs.get_mut(&name) {
                o.path = Some(p);
            }
        }
        Ok(self)
    }

    /// Checks that every declared output path is the one Nix computes (and, for fixed-output
    /// derivations, the one the hash gives). Errors name the output and both paths.
    pub fn check_output_paths<R: DerivationReader>(
        &self,
        store_dir: &StoreDir,
        hasher: &mut DerivationHasher<R>,
    ) -> Result<(), Error> {
        self.check_outputs_shape()?;
        let mismatch = |out: &str, declared: &StorePath, want: &StorePath| {
            Error::Derivation(format!(
                "derivation '{}' has incorrect output '{out}' path '{}', should be '{}'",
                self.name,
                store_dir.display(declared),
                store_dir.display(want)
            ))
        };
        if let Some(fixed) = self.fixed_output() {
            let want = self.fixed_output_path(store_dir, fixed)?;
            let declared = self.output_path("out")?;
            if declared != &want {
                return Err(mismatch("out", declared, &want));
            }
            return Ok(());
        }
        let (h, deferred) = hasher.hash_modulo_kind(store_dir, self, true)?;
        if deferred {
            // Floating outputs, or outputs deferred until floating inputs are built: no
            // path can be checked before the build, and none may be declared.
            if let Some((name, _)) = self.outputs.iter().find(|(_, o)| o.path.is_some()) {
                return Err(Error::Derivation(format!(
                    "derivation '{}' declares a path for output '{name}', which depends on floating content-addressed outputs and so cannot have one yet",
                    self.name
                )));
            }
            return Ok(());
        }
        for (name, o) in &self.outputs {
            let declared = o.path.as_ref().ok_or_else(|| {
                Error::Derivation(format!(
                    "derivation '{}' output '{name}' has no path",
                    self.name
                ))
            })?;
            let want = store_dir.make_output_path(name, &h, &self.name)?;
            if declared != &want {
                return Err(mismatch(name, declared, &want));
            }
        }
        Ok(())
    }

    /// The `nix show-derivation` JSON value for this derivation (without the outer key).
    pub fn to_json(&self, store_dir: &StoreDir) -> serde_json::Value {
        json::to_json(self, store_dir)
    }
}

/// Parses the method and algorithm field of an output (`r:sha256`, `sha1`).
fn parse_method_algo(algo: &str) -> Result<FloatingOutput, Error> {
    let (method, algo) = ContentAddressMethod::split_prefix(algo);
    let algo: HashAlgo = algo.parse()?;
    match method {
        ContentAddressMethod::Text if algo != HashAlgo::Sha256 => {
            return Err(Error::Derivation(format!(
                "text-hashed outputs must use sha256, not {algo}"
            )))
        }
        ContentAddressMethod::Fixed(FileIngestionMethod::Git) => crate::git::check_algo(algo)?,
        _ => {}
    }
    Ok(FloatingOutput {
        method,
        algo,
        impure: false,
    })
}

/// Parses the hash fields of an output (`r:sha256`, `<hex>`).
fn parse_fixed(algo: &str, hash: &str) -> Result<FixedOutputHash, Error> {
    let FloatingOutput { method, algo, .. } = parse_method_algo(algo)?;
    // A fixed text-hashed output (`outputHashMode = "text"` with a hash) is not built by
    // kiln: said so, rather than taken for a flat file.
    let ContentAddressMethod::Fixed(method) = method else {
        return Err(Error::Derivation(
            "fixed-output text-hashed outputs (outputHashMode = \"text\" with outputHash) are not supported by kiln".into(),
        ));
    };
    let hash = Hash::parse_digest(algo, hash)?;
    Ok(FixedOutputHash { method, hash })
}

/// The string a derivation holds for output `output` of its input derivation `drv_path`
/// when that output's path is not known before it is built (a floating content-addressed
/// input): `/` and the base-32 SHA-256 of `nix-upstream-output:<hash part>:<output name>`.
/// Resolution replaces it with the output's real path.
pub fn downstream_placeholder(drv_path: &StorePath, output: &str) -> String {
    let name = drv_path.derivation_name().unwrap_or(drv_path.name());
    let clear = format!(
        "nix-upstream-output:{}:{}",
        drv_path.hash_part(),
        output_path_name(name, output)
    );
    format!("/{}", crate::Hash::sha256(clear.as_bytes()).to_base32())
}

impl Derivation {
    /// The derivation built in place of one that needs resolution: every input derivation's
    /// output replaced by its path in the inputs, builder, arguments and environment, and
    /// the deferred outputs' paths computed (Nix's `tryResolve`). `realised` gives a path by
    /// input `.drv` and chain of outputs: `[out]` for its output `out`, `[out, bin]` for
    /// output `bin` of the derivation its output `out` is (dynamic inputs). Errors name the
    /// missing input output.
    pub fn resolve(
        &self,
        store_dir: &StoreDir,
        realised: impl Fn(&StorePath, &[&str]) -> Option<StorePath>,
    ) -> Result<Derivation, Error> {
        let mut rewrites: BTreeMap<String, String> = BTreeMap::new();
        let mut resolved = self.clone();
        resolved.input_drvs.clear();
        resolved.dynamic_inputs.clear();
        let missing = |input: &StorePath, chain: &[&str]| {
            Error::Derivation(format!(
                "cannot resolve derivation '{}': output '{}' of input '{}' is not built",
                self.name,
                chain.join("^"),
                store_dir.display(input)
            ))
        };
        for (input, outs) in &self.input_drvs {
            for o in outs {
                let path = realised(input, &[o]).ok_or_else(|| missing(input, &[o]))?;
                rewrites.insert(downstream_placeholder(input, o), store_dir.display(&path));
                resolved.input_srcs.insert(path);
            }
        }
        // Outputs of made derivations: their placeholders are chained from the producer's
        // (`unknownDerivation` of `unknownCaOutput`); the made `.drv`s themselves are not
        // inputs of the resolved derivation, only the outputs used.
        let mut todo: Vec<(&StorePath, Vec<&str>, String, &DynamicInput)> = Vec::new();
        for (input, children) in &self.dynamic_inputs {
            for (o, node) in children {
                todo.push((
                    input,
                    vec![o.as_str()],
                    downstream_placeholder(input, o),
                    node,
                ));
            }
        }
        while let Some((input, chain, placeholder, node)) = todo.pop() {
            for v in &node.outputs {
                let mut full = chain.clone();
                full.push(v);
                let path = realised(input, &full).ok_or_else(|| missing(input, &full))?;
                rewrites.insert(
                    dynamic_placeholder(&placeholder, v)?,
                    store_dir.display(&path),
                );
                resolved.input_srcs.insert(path);
            }
            for (o, child) in &node.children {
                let mut deeper = chain.clone();
                deeper.push(o);
                todo.push((input, deeper, dynamic_placeholder(&placeholder, o)?, child));
            }
        }
        let rewrite = |s: &str| {
            let mut s = s.to_string();
            for (from, to) in &rewrites {
                if s.contains(from.as_str()) {
                    s = s.replace(from.as_str(), to);
                }
            }
            s
        };
        resolved.builder = rewrite(&resolved.builder);
        resolved.args = resolved.args.iter().map(|a| rewrite(a)).collect();
        resolved.env = resolved
            .env
            .iter()
            .map(|(k, v)| (rewrite(k), rewrite(v)))
            .collect();
        // No input derivations are left, so the modulo hash needs no other file.
        let no_inputs = |_: &StoreDir, p: &StorePath| -> Result<Derivation, Error> {
            Err(Error::Derivation(format!(
                "resolved derivation unexpectedly refers to '{p}'"
            )))
        };
        let h = DerivationHasher::new(no_inputs).hash_modulo(store_dir, &resolved, true)?;
        let deferred: Vec<String> = resolved
            .outputs
            .iter()
            .filter(|(_, o)| o.path.is_none() && o.floating.is_none() && o.fixed.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        for name in deferred {
            let p = store_dir.make_output_path(&name, &h, &resolved.name)?;
            resolved.env.insert(name.clone(), store_dir.display(&p));
            if let Some(o) = resolved.outputs.get_mut(&name) {
                o.path = Some(p);
            }
        }
        Ok(resolved)
    }
}

/// The string `builtins.placeholder NAME` puts into a derivation for its output `NAME`
/// (`/` and the base-32 SHA-256 of `nix-output:NAME`); the daemon replaces it with the
/// output's path in the builder's arguments and environment.
pub fn output_placeholder(output: &str) -> String {
    format!(
        "/{}",
        crate::Hash::sha256(format!("nix-output:{output}").as_bytes()).to_base32()
    )
}

#[cfg(test)]
mod placeholder_tests {
    use super::*;

    const SD: &str = "/nix/store";

    fn parse(text: &str) -> Result<Derivation, Error> {
        Derivation::parse(&StoreDir::new(SD).unwrap(), "x", text.as_bytes())
    }

    #[test]
    fn impure_and_floating_outputs_print_back_and_hash_as_nix() {
        let sd = StoreDir::new(SD).unwrap();
        let impure = r#"Derive([("out","","r:sha256","impure"),("stuff","","r:sha256","impure")],[],[],"x86_64-linux","/bin/sh",[],[("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9")])"#;
        let d = parse(impure).unwrap();
        assert!(d.is_impure() && d.is_floating() && !d.is_sandboxed());
        assert_eq!(d.to_aterm(&sd), impure.as_bytes());
        assert_eq!(d.to_json(&sd)["outputs"]["out"]["impure"], true);
        // Nix's `impureOutputHash`, deferred, whatever the derivation holds.
        let none = |_: &StoreDir, p: &StorePath| -> Result<Derivation, Error> {
            Err(Error::Derivation(format!("unexpected read of {p}")))
        };
        let (h, deferred) = DerivationHasher::new(none)
            .hash_modulo_kind(&sd, &d, true)
            .unwrap();
        assert_eq!((h, deferred), (Hash::sha256(b"impure"), true));

        let floating = r#"Derive([("out","","sha256","")],[],[],"x86_64-linux","/bin/sh",[],[])"#;
        let d = parse(floating).unwrap();
        assert!(d.is_floating() && !d.is_impure() && d.is_sandboxed());
        assert_eq!(d.to_aterm(&sd), floating.as_bytes());
        assert_eq!(d.to_json(&sd)["outputs"]["out"]["hashAlgo"], "sha256");

        // Text-hashed (dynamic derivations) and Git-hashed floating outputs.
        for (algo, method) in [
            ("text:sha256", ContentAddressMethod::Text),
            (
                "git:sha1",
                ContentAddressMethod::Fixed(FileIngestionMethod::Git),
            ),
        ] {
            let text = format!(r#"Derive([("out","","{algo}","")],[],[],"s","b",[],[])"#);
            let d = parse(&text).unwrap();
            let f = d.outputs["out"].floating.unwrap();
            assert_eq!((f.method, f.method_algo()), (method, algo.to_string()));
            assert_eq!(d.to_aterm(&sd), text.as_bytes());
        }

        // Shapes Nix refuses, and the fixed text outputs kiln does not build.
        for (text, want) in [
            (
                r#"Derive([("out","/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x","r:sha256","")],[],[],"s","b",[],[])"#,
                "has a path",
            ),
            (
                r#"Derive([("out","/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x","r:sha256","impure")],[],[],"s","b",[],[])"#,
                "has a path",
            ),
            (
                r#"Derive([("out","","r:sha999","")],[],[],"s","b",[],[])"#,
                "sha999",
            ),
            (
                r#"Derive([("out","","text:sha1","")],[],[],"s","b",[],[])"#,
                "must use sha256",
            ),
            (
                r#"Derive([("out","","git:md5","")],[],[],"s","b",[],[])"#,
                "must use SHA-1 or SHA-256",
            ),
            (
                r#"Derive([("out","/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x","text:sha256","1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s")],[],[],"s","b",[],[])"#,
                "not supported by kiln",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let mixed = parse(r#"Derive([("dev","/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x-dev","",""),("out","","r:sha256","")],[],[],"s","b",[],[])"#).unwrap();
        let e = mixed.check_outputs_shape().unwrap_err().to_string();
        assert!(e.contains("mixes floating"), "{e}");
    }

    #[test]
    fn placeholder_matches_nix() {
        // `nix eval --raw --expr 'builtins.placeholder "out"'` with Nix 2.8.
        assert_eq!(
            super::output_placeholder("out"),
            "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
        );
    }
}
