//! Recipes: a small TOML format for named derivations, turned into real `.drv` files.
//!
//! ```toml
//! system = "x86_64-linux"          # optional; default: this machine
//! default = "hello"                 # optional: what `kiln build FILE` builds (default: all)
//! sandbox-paths = ["/bin", "/usr"]  # optional: host paths the builders need (see below)
//!
//! [derivations.greeting]
//! builder = "/bin/sh"
//! args = ["-c", "echo hello > $out"]
//! env = { PATH = "/bin:/usr/bin" }
//!
//! [derivations.hello]
//! builder = "/bin/sh"
//! args = ["-c", "cat ${greeting} ${./message.txt} > $out"]
//! outputs = ["out", "doc"]         # default ["out"]
//!
//! [derivations.fetched]             # a fixed-output derivation
//! builder = "builtin:fetchurl"
//! env = { url = "file:///etc/hostname" }
//! output-hash = "sha256-…"          # any form Nix accepts (SRI, base16, base32)
//! output-hash-mode = "flat"         # or "recursive"
//! ```
//!
//! `${name}` is the `out` path of another derivation of the file, `${name.dev}` another of its
//! outputs, `${./file}` a file or directory next to the recipe, added to the store. Each
//! reference also makes the dependency, as Nix's string context does. The environment
//! gets `name`, `system`, `builder` and (with several outputs) `outputs`, like Nix's
//! `derivation`, and the output paths are computed exactly as Nix and Guix compute them.
//!
//! `sandbox-paths` is not part of any derivation: it is added to the `sandbox-paths`
//! setting of the `kiln build` run that builds the file, as `--option sandbox-paths` would
//! be, because a recipe's builders are host programs. It is the recipe's author's say, so
//! only a command run by the person holding the file honours it; a daemon never reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_format::derivation::{DerivationOutput, FixedOutputHash};
use kiln_format::{Derivation, FileIngestionMethod, Hash, HashAlgo, StorePath};
use kiln_store::{AddOptions, LocalStore};

use crate::error::{Error, Result};

fn bad(file: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("recipe '{}': {msg}", file.display()))
}

/// One derivation of a recipe file.
#[derive(Debug, Clone)]
struct Entry {
    builder: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    outputs: Vec<String>,
    system: Option<String>,
    output_hash: Option<String>,
    output_hash_mode: Option<String>,
    output_hash_algo: Option<String>,
}

/// A parsed recipe file.
#[derive(Debug)]
pub struct Recipe {
    file: PathBuf,
    system: Option<String>,
    entries: BTreeMap<String, Entry>,
    default: Vec<String>,
    sandbox_paths: Vec<String>,
}

fn str_list(file: &Path, v: &toml::Value, what: &str) -> Result<Vec<String>> {
    v.as_array()
        .ok_or_else(|| bad(file, format!("'{what}' must be a list of strings")))?
        .iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(file, format!("'{what}' must be a list of strings")))
        })
        .collect()
}

impl Recipe {
    pub fn load(file: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, "read recipe", e))?;
        Recipe::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Recipe> {
        let table: toml::Table = text.parse().map_err(|e| bad(file, e))?;
        let mut system = None;
        let mut entries = BTreeMap::new();
        let mut default = Vec::new();
        let mut sandbox_paths = Vec::new();
        for (k, v) in &table {
            match k.as_str() {
                "default" => {
                    default = match v {
                        toml::Value::String(s) => vec![s.clone()],
                        _ => str_list(file, v, "default")?,
                    }
                }
                "sandbox-paths" => sandbox_paths = str_list(file, v, "sandbox-paths")?,
                "system" => {
                    system = Some(
                        v.as_str()
                            .ok_or_else(|| bad(file, "'system' must be a string"))?
                            .to_string(),
                    )
                }
                "derivations" => {
                    let t = v
                        .as_table()
                        .ok_or_else(|| bad(file, "[derivations] must be a table"))?;
                    for (name, d) in t {
                        kiln_format::store_path::check_name(name, name)
                            .map_err(|e| bad(file, e))?;
                        let d = d.as_table().ok_or_else(|| {
                            bad(file, format!("derivation '{name}' must be a table"))
                        })?;
                        let mut e = Entry {
                            builder: String::new(),
                            args: Vec::new(),
                            env: BTreeMap::new(),
                            outputs: vec!["out".into()],
                            system: None,
                            output_hash: None,
                            output_hash_mode: None,
                            output_hash_algo: None,
                        };
                        for (dk, dv) in d {
                            let s = || {
                                dv.as_str().map(str::to_string).ok_or_else(|| {
                                    bad(file, format!("'{name}.{dk}' must be a string"))
                                })
                            };
                            match dk.as_str() {
                                "builder" => e.builder = s()?,
                                "args" => e.args = str_list(file, dv, dk)?,
                                "outputs" => e.outputs = str_list(file, dv, dk)?,
                                "system" => e.system = Some(s()?),
                                "output-hash" => e.output_hash = Some(s()?),
                                "output-hash-mode" => e.output_hash_mode = Some(s()?),
                                "output-hash-algo" => e.output_hash_algo = Some(s()?),
                                "env" => {
                                    let t = dv.as_table().ok_or_else(|| {
                                        bad(file, format!("'{name}.env' must be a table"))
                                    })?;
                                    for (ek, ev) in t {
                                        let v = match ev {
                                            toml::Value::String(x) => x.clone(),
                                            toml::Value::Integer(i) => i.to_string(),
                                            toml::Value::Boolean(b) => {
                                                if *b {
                                                    "1".into()
                                                } else {
                                                    String::new()
                                                }
                                            }
                                            toml::Value::Array(_) => {
                                                str_list(file, ev, ek)?.join(" ")
                                            }
                                            _ => {
                                                return Err(bad(
                                                    file,
                                                    format!(
                                                        "'{name}.env.{ek}' has an unsupported type"
                                                    ),
                                                ))
                                            }
                                        };
                                        e.env.insert(ek.clone(), v);
                                    }
                                }
                                other => {
                                    return Err(bad(
                                        file,
                                        format!("derivation '{name}' has an unknown key '{other}'"),
                                    ))
                                }
                            }
                        }
                        if e.builder.is_empty() {
                            return Err(bad(file, format!("derivation '{name}' has no builder")));
                        }
                        if e.outputs.is_empty() {
                            return Err(bad(file, format!("derivation '{name}' has no outputs")));
                        }
                        entries.insert(name.clone(), e);
                    }
                }
                other => return Err(bad(file, format!("unknown key '{other}'"))),
            }
        }
        if entries.is_empty() {
            return Err(bad(file, "no [derivations.NAME] tables"));
        }
        for d in &default {
            if !entries.contains_key(d) {
                return Err(bad(
                    file,
                    format!("'default' names '{d}', which is not a derivation of the file"),
                ));
            }
        }
        Ok(Recipe {
            file: file.to_path_buf(),
            system,
            entries,
            default,
            sandbox_paths,
        })
    }

    /// The derivation names, in file order (sorted).
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// The derivations built when none is named: the file's `default`, or all of them.
    pub fn default_names(&self) -> Vec<String> {
        if self.default.is_empty() {
            self.names()
        } else {
            self.default.clone()
        }
    }

    /// Host paths the recipe's builders need in the sandbox (its `sandbox-paths`, in the
    /// setting's syntax: `PATH`, `INSIDE=OUTSIDE`, a trailing `?` for optional ones).
    pub fn sandbox_paths(&self) -> &[String] {
        &self.sandbox_paths
    }

    /// Writes every derivation (in dependency order) to the store; returns name → `.drv`.
    pub fn instantiate(
        &self,
        store: &mut dyn RecipeStore,
        default_system: &str,
    ) -> Result<BTreeMap<String, StorePath>> {
        let mut done: BTreeMap<String, (StorePath, Derivation)> = BTreeMap::new();
        let mut visiting = BTreeSet::new();
        let mut sources: BTreeMap<String, StorePath> = BTreeMap::new();
        for name in self.entries.keys() {
            self.visit(
                name,
                store,
                default_system,
                &mut done,
                &mut visiting,
                &mut sources,
            )?;
        }
        Ok(done.into_iter().map(|(n, (p, _))| (n, p)).collect())
    }

    fn visit(
        &self,
        name: &str,
        store: &mut dyn RecipeStore,
        default_system: &str,
        done: &mut BTreeMap<String, (StorePath, Derivation)>,
        visiting: &mut BTreeSet<String>,
        sources: &mut BTreeMap<String, StorePath>,
    ) -> Result<()> {
        if done.contains_key(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Err(bad(
                &self.file,
                format!("derivation '{name}' depends on itself"),
            ));
        }
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| bad(&self.file, format!("no derivation named '{name}'")))?;
        // First pass: find the derivations this one refers to, and build them first.
        let mut texts: Vec<&str> = e.args.iter().map(String::as_str).collect();
        texts.extend(e.env.values().map(String::as_str));
        texts.push(&e.builder);
        for t in &texts {
            for r in refs_in(&self.file, t)? {
                if let Ref::Drv(dep, _) = r {
                    self.visit(&dep, store, default_system, done, visiting, sources)?;
                }
            }
        }
        let mut drv = Derivation {
            name: name.to_string(),
            platform: e
                .system
                .clone()
                .or_else(|| self.system.clone())
                .unwrap_or_else(|| default_system.to_string()),
            ..Default::default()
        };
        let sd = store.store_dir().clone();
        let mut expand = |t: &str, drv: &mut Derivation| -> Result<String> {
            let mut out = String::new();
            let mut rest = t;
            while let Some(i) = rest.find("${") {
                out.push_str(&rest[..i]);
                let close = rest[i..]
                    .find('}')
                    .ok_or_else(|| bad(&self.file, format!("unterminated '${{' in '{t}'")))?;
                let inner = &rest[i + 2..i + close];
                match parse_ref(&self.file, inner)? {
                    Ref::Drv(dep, output) => {
                        let (dp, dd) = &done[&dep];
                        let op = dd.output_path(&output).map_err(|_| {
                            bad(&self.file, format!("'{name}' refers to output '{output}' of '{dep}', which it does not have"))
                        })?;
                        out.push_str(&sd.display(op));
                        drv.input_drvs.entry(dp.clone()).or_default().insert(output);
                    }
                    Ref::Source(rel) => {
                        let src = self.file.parent().unwrap_or(Path::new(".")).join(&rel);
                        let key = src.to_string_lossy().into_owned();
                        let p = match sources.get(&key) {
                            Some(p) => p.clone(),
                            None => {
                                let base = src
                                    .file_name()
                                    .map(|f| f.to_string_lossy().into_owned())
                                    .unwrap_or_else(|| "source".into());
                                let path = store.add_source(&src, &base)?;
                                sources.insert(key, path.clone());
                                path
                            }
                        };
                        out.push_str(&sd.display(&p));
                        drv.input_srcs.insert(p);
                    }
                }
                rest = &rest[i + close + 1..];
            }
            out.push_str(rest);
            Ok(out)
        };
        drv.builder = expand(&e.builder, &mut drv)?;
        let mut args = Vec::new();
        for a in &e.args {
            args.push(expand(a, &mut drv)?);
        }
        drv.args = args;
        for (k, v) in &e.env {
            let v = expand(v, &mut drv)?;
            drv.env.insert(k.clone(), v);
        }
        // As Nix's `derivation`: the attributes become environment variables too.
        drv.env.insert("name".into(), name.into());
        drv.env.insert("system".into(), drv.platform.clone());
        drv.env.insert("builder".into(), drv.builder.clone());
        if e.outputs != ["out"] {
            drv.env.insert("outputs".into(), e.outputs.join(" "));
        }
        let fixed = match &e.output_hash {
            None => None,
            Some(h) => {
                let algo = e
                    .output_hash_algo
                    .as_deref()
                    .map(str::parse::<HashAlgo>)
                    .transpose()
                    .map_err(|er| bad(&self.file, er))?;
                let hash = Hash::parse_any(h, algo)
                    .map_err(|er| bad(&self.file, format!("'{name}': {er}")))?;
                let method = match e.output_hash_mode.as_deref().unwrap_or("flat") {
                    "flat" => FileIngestionMethod::Flat,
                    "recursive" => FileIngestionMethod::Recursive,
                    other => {
                        return Err(bad(
                            &self.file,
                            format!("invalid value '{other}' for 'output-hash-mode'"),
                        ))
                    }
                };
                if e.outputs != ["out"] {
                    return Err(bad(
                        &self.file,
                        format!(
                            "fixed-output derivation '{name}' must have exactly the output 'out'"
                        ),
                    ));
                }
                drv.env.insert("outputHash".into(), h.clone());
                drv.env.insert(
                    "outputHashAlgo".into(),
                    e.output_hash_algo.clone().unwrap_or_default(),
                );
                drv.env.insert(
                    "outputHashMode".into(),
                    e.output_hash_mode.clone().unwrap_or_else(|| "flat".into()),
                );
                Some(FixedOutputHash { method, hash })
            }
        };
        for o in &e.outputs {
            kiln_format::store_path::check_name(o, o).map_err(|er| bad(&self.file, er))?;
            drv.outputs.insert(
                o.clone(),
                DerivationOutput {
                    path: None,
                    fixed,
                    floating: None,
                },
            );
        }
        let drv = store.finalize(drv)?;
        let text = drv.to_aterm(&sd);
        let path = store.add_drv(&format!("{name}.drv"), &text, &drv.references())?;
        visiting.remove(name);
        done.insert(name.to_string(), (path, drv));
        Ok(())
    }
}

/// Where a recipe's derivations and sources are written: the local store, or a daemon's
/// (`kiln build` through the daemon).
pub trait RecipeStore {
    fn store_dir(&self) -> &kiln_format::StoreDir;
    /// Adds a source file or tree (recursive, SHA-256, as `nix-store --add`).
    fn add_source(&mut self, path: &Path, name: &str) -> Result<StorePath>;
    /// Fills in a derivation's output paths (`hashDerivationModulo` of its inputs).
    fn finalize(&mut self, drv: Derivation) -> Result<Derivation>;
    /// Adds a `.drv` file's text with its references.
    fn add_drv(&mut self, name: &str, text: &[u8], refs: &BTreeSet<StorePath>)
        -> Result<StorePath>;
}

impl RecipeStore for &LocalStore {
    fn store_dir(&self) -> &kiln_format::StoreDir {
        LocalStore::store_dir(self)
    }
    fn add_source(&mut self, path: &Path, name: &str) -> Result<StorePath> {
        Ok(self
            .add_path(path, name, FileIngestionMethod::Recursive, HashAlgo::Sha256)?
            .path)
    }
    fn finalize(&mut self, drv: Derivation) -> Result<Derivation> {
        Ok(self.finalize_derivation(drv)?)
    }
    fn add_drv(
        &mut self,
        name: &str,
        text: &[u8],
        refs: &BTreeSet<StorePath>,
    ) -> Result<StorePath> {
        Ok(self.add_text(name, text, refs, AddOptions::default())?.path)
    }
}

enum Ref {
    Drv(String, String),
    Source(String),
}

fn parse_ref(file: &Path, inner: &str) -> Result<Ref> {
    if inner.starts_with("./") || inner.starts_with("../") {
        return Ok(Ref::Source(inner.to_string()));
    }
    let (dep, out) = inner.split_once('.').unwrap_or((inner, "out"));
    if dep.is_empty() || out.is_empty() {
        return Err(bad(file, format!("invalid reference '${{{inner}}}'")));
    }
    Ok(Ref::Drv(dep.to_string(), out.to_string()))
}

fn refs_in(file: &Path, t: &str) -> Result<Vec<Ref>> {
    let mut v = Vec::new();
    let mut rest = t;
    while let Some(i) = rest.find("${") {
        let close = rest[i..]
            .find('}')
            .ok_or_else(|| bad(file, format!("unterminated '${{' in '{t}'")))?;
        v.push(parse_ref(file, &rest[i + 2..i + close])?);
        rest = &rest[i + close + 1..];
    }
    Ok(v)
}
