//! The builder's environment and the files written into its build directory.

use std::collections::{BTreeMap, BTreeSet};

use kiln_format::{Derivation, Hash, StoreDir, StorePath, ValidPathInfo};
use serde_json::Value;

use crate::error::{Error, Result};

/// A file to create in the build directory before the builder starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildFile {
    /// Name inside the build directory (validated: a single component).
    pub name: String,
    pub contents: Vec<u8>,
}

/// What `prepare_env` decided.
#[derive(Debug, Clone)]
pub struct PreparedEnv {
    pub env: BTreeMap<String, String>,
    pub files: Vec<BuildFile>,
    /// What the client should be warned about (attributes ignored, as Nix warns).
    pub warnings: Vec<String>,
}

/// A closure (each path's info, references included), as `exportReferencesGraph` writes
/// it.
pub type Graph = Vec<ValidPathInfo>;

/// Inputs of environment preparation.
pub struct EnvInputs<'a> {
    pub drv: &'a Derivation,
    pub store_dir: &'a StoreDir,
    /// `NIX_BUILD_TOP` as the builder sees it.
    pub build_top: &'a str,
    pub cores: u64,
    /// The output paths as the builder should see them (after any hash rewriting).
    pub outputs: &'a BTreeMap<String, String>,
    /// Values of the daemon's environment for `impureEnvVars` (fixed-output only).
    pub impure: &'a dyn Fn(&str) -> Option<String>,
    /// Closure information for `exportReferencesGraph`: (path, references) in path order.
    pub graph: &'a dyn Fn(&StorePath) -> Result<Graph>,
}

impl std::fmt::Debug for EnvInputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EnvInputs({})", self.drv.name)
    }
}

/// `'…'` with embedded quotes escaped, as Nix's `shellEscape`.
fn shell_escape(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

fn sh_simple(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(shell_escape(s)),
        Value::Number(n) => n.as_i64().map(|i| i.to_string()).or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0)
                .map(|f| (f as i64).to_string())
        }),
        Value::Null => Some("''".into()),
        Value::Bool(b) => Some(if *b { "1".into() } else { String::new() }),
        _ => None,
    }
}

fn is_sh_name(k: &str) -> bool {
    let mut c = k.chars();
    matches!(c.next(), Some(x) if x.is_ascii_alphabetic() || x == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// `.attrs.sh`: shell declarations of the structured attributes (Nix's
/// `writeStructuredAttrsShell`).
fn attrs_sh(json: &Value) -> String {
    let mut out = String::new();
    let Value::Object(m) = json else { return out };
    for (k, v) in m {
        if !is_sh_name(k) {
            continue;
        }
        if let Some(s) = sh_simple(v) {
            out.push_str(&format!("declare {k}={s}\n"));
        } else if let Value::Array(a) = v {
            let items: Option<Vec<String>> = a.iter().map(sh_simple).collect();
            if let Some(items) = items {
                let s: String = items.iter().map(|i| format!("{i} ")).collect();
                out.push_str(&format!("declare -a {k}=({s})\n"));
            }
        } else if let Value::Object(o) = v {
            let items: Option<Vec<String>> = o
                .iter()
                .map(|(k2, v2)| sh_simple(v2).map(|s| format!("[{}]={s} ", shell_escape(k2))))
                .collect();
            if let Some(items) = items {
                out.push_str(&format!("declare -A {k}=({})\n", items.concat()));
            }
        }
    }
    out
}

/// Path information of every path of `closure` (which holds the references of its
/// members), with `closureSize`, in Nix 2.34's `pathInfoToJSON` shape.
fn closure_json(sd: &StoreDir, closure: &BTreeMap<StorePath, ValidPathInfo>) -> Value {
    let closure_size = |start: &StorePath| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![start];
        let mut size = 0;
        while let Some(p) = todo.pop() {
            if !seen.insert(p) {
                continue;
            }
            if let Some(info) = closure.get(p) {
                size += info.nar_size;
                todo.extend(info.references.iter());
            }
        }
        size
    };
    Value::Array(
        closure
            .values()
            .map(|info| {
                let mut o = serde_json::Map::new();
                o.insert("path".into(), sd.display(&info.path).into());
                o.insert("narHash".into(), info.nar_hash.to_string().into());
                o.insert("narSize".into(), info.nar_size.into());
                let refs: Vec<Value> = info
                    .references
                    .iter()
                    .map(|r| Value::String(sd.display(r)))
                    .collect();
                o.insert("references".into(), Value::Array(refs));
                if let Some(ca) = &info.ca {
                    o.insert("ca".into(), ca.to_string().into());
                }
                o.insert("closureSize".into(), closure_size(&info.path).into());
                // Nix 2.34 marks each entry valid (every path of a closure here is);
                // Nix 2.8 wrote the key only for invalid paths, which never occur here.
                o.insert("valid".into(), true.into());
                Value::Object(o)
            })
            .collect(),
    )
}

/// `cores`, or with 0 the CPUs this process may use (its affinity and cgroup quota
/// considered, as Nix's `getDefaultCores` considers the quota).
pub fn effective_cores(cores: u64) -> u64 {
    if cores != 0 {
        return cores;
    }
    std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1)
}

/// Builds the environment exactly as the reference does, plus Nix's `passAsFile` and
/// structured attributes.
pub fn prepare_env(i: &EnvInputs<'_>) -> Result<PreparedEnv> {
    let drv = i.drv;
    let mut env = BTreeMap::new();
    // Shells fill in a default PATH when none is set; a dummy value keeps them from it.
    env.insert("PATH".into(), "/path-not-set".into());
    // A HOME that does not exist, so tools do not look up the real one in /etc/passwd.
    env.insert("HOME".into(), "/homeless-shelter".into());
    env.insert("NIX_STORE".into(), i.store_dir.as_str().into());
    // 0: this machine's CPUs (as Nix 2.34 counts them; Nix 2.8 passed "0" on).
    env.insert(
        "NIX_BUILD_CORES".into(),
        effective_cores(i.cores).to_string(),
    );
    let mut files = Vec::new();
    let mut warnings = Vec::new();
    let structured = drv.env.get("__json");
    match structured {
        None => {
            let pass_as_file: BTreeSet<&str> = drv
                .env
                .get("passAsFile")
                .map(|s| s.split_whitespace().collect())
                .unwrap_or_default();
            for (k, v) in &drv.env {
                if pass_as_file.contains(k.as_str()) {
                    let name = format!(".attr-{}", Hash::sha256(k.as_bytes()).to_base32());
                    env.insert(format!("{k}Path"), format!("{}/{name}", i.build_top));
                    files.push(BuildFile {
                        name,
                        contents: v.clone().into_bytes(),
                    });
                } else {
                    let v = match i.outputs.get(k) {
                        // Outputs may be redirected (hash rewriting): the builder sees those.
                        Some(redirected) => redirected.clone(),
                        None => v.clone(),
                    };
                    env.insert(k.clone(), v);
                }
            }
        }
        Some(json) => {
            let mut attrs: Value = serde_json::from_str(json).map_err(|e| {
                Error::Invalid(format!("derivation '{}' has invalid __json: {e}", drv.name))
            })?;
            let Value::Object(m) = &mut attrs else {
                return Err(Error::Invalid(format!(
                    "derivation '{}': __json is not an object",
                    drv.name
                )));
            };
            let outs: serde_json::Map<String, Value> = i
                .outputs
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            m.insert("outputs".into(), Value::Object(outs));
            // Top-level output checks do nothing with structured attributes (`outputChecks`
            // holds them): Nix warns, and so does kiln.
            for name in crate::attrs::Attrs::of(drv).ignored_top_level_checks() {
                warnings.push(format!(
                    "'structuredAttrs' disables the effect of the top-level attribute '{name}'; use 'outputChecks' instead"
                ));
            }
            // With structured attributes, `exportReferencesGraph` maps a name to paths, and
            // the name receives the closure's path information (as `nix path-info --json`
            // with closure sizes).
            match m.get("exportReferencesGraph") {
                None | Some(Value::Object(_)) => {}
                Some(_) => warnings.push(
                    "'exportReferencesGraph' in structured attrs is not a JSON object, ignoring"
                        .into(),
                ),
            }
            if let Some(Value::Object(graphs)) = m.get("exportReferencesGraph").cloned() {
                for (name, paths) in graphs {
                    let paths: Vec<&str> = match &paths {
                        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                        Value::String(p) => vec![p.as_str()],
                        _ => Vec::new(),
                    };
                    let mut closure: BTreeMap<StorePath, ValidPathInfo> = BTreeMap::new();
                    for p in paths {
                        let sp = i.store_dir.parse_path(p).map_err(|e| {
                            Error::Invalid(format!("'exportReferencesGraph' of '{name}': {e}"))
                        })?;
                        for info in (i.graph)(&sp)? {
                            closure.insert(info.path.clone(), info);
                        }
                    }
                    m.insert(name, closure_json(i.store_dir, &closure));
                }
            }
            let attrs = sorted(&attrs);
            files.push(BuildFile {
                name: ".attrs.sh".into(),
                contents: attrs_sh(&attrs).into_bytes(),
            });
            files.push(BuildFile {
                name: ".attrs.json".into(),
                contents: attrs.to_string().into_bytes(),
            });
            env.insert(
                "NIX_ATTRS_SH_FILE".into(),
                format!("{}/.attrs.sh", i.build_top),
            );
            env.insert(
                "NIX_ATTRS_JSON_FILE".into(),
                format!("{}/.attrs.json", i.build_top),
            );
        }
    }
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        env.insert(k.into(), i.build_top.into());
    }
    // Only fixed-output (and impure) derivations may see the caller's proxy settings and the like:
    // their output is checked against a known hash, so it stays pure.
    if !drv.is_sandboxed() {
        if let Some(vars) = crate::attrs::Attrs::of(drv).strings("impureEnvVars") {
            for v in vars {
                let value = (i.impure)(&v).unwrap_or_default();
                env.insert(v, value);
            }
        }
    }
    // As Nix (2.8 and 2.34 alike): where builders send structured `@nix` log lines, and
    // coloured output from the tools they run.
    env.insert("NIX_LOG_FD".into(), "2".into());
    env.insert("TERM".into(), "xterm-256color".into());
    if let Some(s) = drv
        .env
        .get("exportReferencesGraph")
        .filter(|_| structured.is_none())
    {
        let toks: Vec<&str> = s.split_whitespace().collect();
        if !toks.len().is_multiple_of(2) {
            return Err(Error::Invalid(format!(
                "odd number of tokens in 'exportReferencesGraph': '{s}'"
            )));
        }
        for pair in toks.chunks(2) {
            let (name, path) = (pair[0], pair[1]);
            kiln_format::store_path::check_name(name, name).map_err(|_| {
                Error::Invalid(format!(
                    "'exportReferencesGraph' has an invalid file name '{name}'"
                ))
            })?;
            if name.starts_with('.') {
                return Err(Error::Invalid(format!(
                    "'exportReferencesGraph' file name '{name}' may not start with '.'"
                )));
            }
            let (sp, _) = i.store_dir.to_store_path(path).map_err(|_| {
                Error::Invalid(format!(
                    "'exportReferencesGraph' contains a non-store path '{path}'"
                ))
            })?;
            let mut text = String::new();
            for info in (i.graph)(&sp)? {
                let refs = &info.references;
                text.push_str(&format!(
                    "{}\n\n{}\n",
                    i.store_dir.display(&info.path),
                    refs.len()
                ));
                for r in refs {
                    text.push_str(&i.store_dir.display(r));
                    text.push('\n');
                }
            }
            files.push(BuildFile {
                name: name.into(),
                contents: text.into_bytes(),
            });
        }
    }
    Ok(PreparedEnv {
        env,
        files,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv(env: &[(&str, &str)], fixed: bool) -> Derivation {
        let mut d = Derivation {
            name: "x".into(),
            platform: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            ..Default::default()
        };
        d.outputs.insert(
            "out".into(),
            kiln_format::derivation::DerivationOutput {
                path: None,
                fixed: fixed.then(|| kiln_format::derivation::FixedOutputHash {
                    method: kiln_format::FileIngestionMethod::Flat,
                    hash: Hash::sha256(b""),
                }),
                floating: None,
            },
        );
        for (k, v) in env {
            d.env.insert(k.to_string(), v.to_string());
        }
        d
    }

    fn prep(d: &Derivation) -> PreparedEnv {
        let sd = StoreDir::new("/gnu/store").unwrap();
        let outs: BTreeMap<String, String> =
            [("out".to_string(), "/gnu/store/aaa-x".to_string())].into();
        let impure = |v: &str| (v == "http_proxy").then(|| "http://proxy".to_string());
        let graph = |_: &StorePath| Ok(vec![]);
        prepare_env(&EnvInputs {
            drv: d,
            store_dir: &sd,
            build_top: "/build",
            cores: 4,
            outputs: &outs,
            impure: &impure,
            graph: &graph,
        })
        .unwrap()
    }

    #[test]
    fn reference_variables() {
        let p = prep(&drv(
            &[
                ("out", "/gnu/store/aaa-x"),
                ("FOO", "bar"),
                ("PATH", "/bin"),
            ],
            false,
        ));
        assert_eq!(p.env["PATH"], "/bin");
        assert_eq!(p.env["HOME"], "/homeless-shelter");
        assert_eq!(p.env["NIX_STORE"], "/gnu/store");
        assert_eq!(p.env["NIX_BUILD_CORES"], "4");
        for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
            assert_eq!(p.env[k], "/build");
        }
        assert_eq!(p.env["FOO"], "bar");
    }

    #[test]
    fn impure_vars_only_for_fixed_outputs() {
        let p = prep(&drv(&[("impureEnvVars", "http_proxy NO_SUCH")], false));
        assert!(!p.env.contains_key("http_proxy"));
        let p = prep(&drv(&[("impureEnvVars", "http_proxy NO_SUCH")], true));
        assert_eq!(p.env["http_proxy"], "http://proxy");
        assert_eq!(p.env["NO_SUCH"], "");
    }

    #[test]
    fn pass_as_file_and_structured_attrs() {
        let p = prep(&drv(&[("passAsFile", "big"), ("big", "lots")], false));
        assert!(!p.env.contains_key("big"));
        let f = &p.files[0];
        assert_eq!(p.env["bigPath"], format!("/build/{}", f.name));
        assert_eq!(f.contents, b"lots");
        let p = prep(&drv(
            &[(
                "__json",
                r#"{"b":[1,"two"],"a":"it's","o":{"k":true},"z":{"n":[1]}}"#,
            )],
            false,
        ));
        let sh = String::from_utf8(p.files[0].contents.clone()).unwrap();
        assert_eq!(
            sh,
            "declare a='it'\\''s'\ndeclare -a b=(1 'two' )\ndeclare -A o=(['k']=1 )\ndeclare -A outputs=(['out']='/gnu/store/aaa-x' )\n"
        );
        let json = String::from_utf8(p.files[1].contents.clone()).unwrap();
        assert_eq!(
            json,
            r#"{"a":"it's","b":[1,"two"],"o":{"k":true},"outputs":{"out":"/gnu/store/aaa-x"},"z":{"n":[1]}}"#
        );
        assert!(!p.env.contains_key("__json"));
    }
}
