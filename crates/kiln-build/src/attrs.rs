//! Derivation attributes as Nix reads them: from the environment, or with
//! `__structuredAttrs` from the JSON in `__json` — one accessor for both, so that no
//! attribute is honoured in one form and silently ignored in the other.
//!
//! The forms differ as in Nix 2.34 (`derivation-options.cc`): a flag is `"1"` in the
//! environment and a JSON boolean in structured attributes; a list is whitespace-separated
//! words or a JSON list of strings. Output checks are top-level attributes
//! (`allowedReferences`, …) without structured attributes, and per output under
//! `outputChecks` with them (where `maxSize` and `maxClosureSize` also live, and top-level
//! ones are ignored with a warning); `unsafeDiscardReferences` exists only in structured
//! attributes.

use std::collections::BTreeMap;

use kiln_format::Derivation;
use serde_json::Value;

/// A derivation's attributes.
#[derive(Debug)]
pub struct Attrs<'a> {
    env: &'a BTreeMap<String, String>,
    /// The structured attributes, if any (`None` also when `__json` does not parse: the
    /// environment's own keys are what is left).
    json: Option<serde_json::Map<String, Value>>,
}

/// Restrictions on one output's references and size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputChecks {
    pub max_size: Option<u64>,
    pub max_closure_size: Option<u64>,
    /// Absent and empty differ: an empty list allows nothing.
    pub allowed_references: Option<Vec<String>>,
    pub allowed_requisites: Option<Vec<String>>,
    pub disallowed_references: Vec<String>,
    pub disallowed_requisites: Vec<String>,
    /// Whether an output's own path is left out of its requisites (the environment form;
    /// with `outputChecks` an output is its own requisite, as in Nix 2.34).
    pub ignore_self_refs: bool,
}

/// The checks, for all outputs alike (environment form) or per output name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checks {
    All(OutputChecks),
    PerOutput(BTreeMap<String, OutputChecks>),
}

impl Checks {
    /// The checks that apply to output `name`.
    pub fn for_output(&self, name: &str) -> Option<&OutputChecks> {
        match self {
            Checks::All(c) => Some(c),
            Checks::PerOutput(m) => m.get(name),
        }
    }
}

impl<'a> Attrs<'a> {
    pub fn of(drv: &'a Derivation) -> Self {
        let json = drv
            .env
            .get("__json")
            .and_then(|j| match serde_json::from_str(j) {
                Ok(Value::Object(m)) => Some(m),
                _ => None,
            });
        Attrs {
            env: &drv.env,
            json,
        }
    }

    /// Whether the derivation has structured attributes.
    pub fn structured(&self) -> bool {
        self.json.is_some()
    }

    /// A flag (`preferLocalBuild`, `allowSubstitutes`, `__noChroot`, …); `default` when
    /// absent. A structured value that is not a boolean counts as absent.
    pub fn flag(&self, name: &str, default: bool) -> bool {
        match &self.json {
            Some(j) => j.get(name).and_then(Value::as_bool).unwrap_or(default),
            None => self.env.get(name).map_or(default, |v| v == "1"),
        }
    }

    /// A list of strings (`impureEnvVars`, `requiredSystemFeatures`, …), if present.
    pub fn strings(&self, name: &str) -> Option<Vec<String>> {
        match &self.json {
            Some(j) => j.get(name).and_then(Value::as_array).map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            }),
            None => self
                .env
                .get(name)
                .map(|v| v.split_whitespace().map(str::to_string).collect()),
        }
    }

    /// Per output: whether its references are discarded (`unsafeDiscardReferences.<out> =
    /// true`, structured attributes only).
    pub fn discard_references(&self, output: &str) -> Result<bool, String> {
        let Some(j) = &self.json else {
            return Ok(false);
        };
        let Some(v) = j.get("unsafeDiscardReferences") else {
            return Ok(false);
        };
        let m = v
            .as_object()
            .ok_or("attribute 'unsafeDiscardReferences' is not a JSON object")?;
        match m.get(output) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(format!(
                "attribute 'unsafeDiscardReferences.\"{output}\"' is not a Boolean"
            )),
        }
    }

    /// Top-level output-check attributes that structured attributes make ineffective
    /// (Nix warns about each).
    pub fn ignored_top_level_checks(&self) -> Vec<&'static str> {
        let Some(j) = &self.json else {
            return Vec::new();
        };
        [
            "allowedReferences",
            "allowedRequisites",
            "disallowedRequisites",
            "disallowedReferences",
            "maxSize",
            "maxClosureSize",
        ]
        .into_iter()
        .filter(|n| j.contains_key(*n))
        .collect()
    }

    /// The output checks; an error names the attribute that is malformed.
    pub fn output_checks(&self) -> Result<Checks, String> {
        let Some(j) = &self.json else {
            let list = |n: &str| self.strings(n);
            return Ok(Checks::All(OutputChecks {
                max_size: None,
                max_closure_size: None,
                allowed_references: list("allowedReferences"),
                allowed_requisites: list("allowedRequisites"),
                disallowed_references: list("disallowedReferences").unwrap_or_default(),
                disallowed_requisites: list("disallowedRequisites").unwrap_or_default(),
                ignore_self_refs: true,
            }));
        };
        let mut per = BTreeMap::new();
        let Some(oc) = j.get("outputChecks") else {
            return Ok(Checks::PerOutput(per));
        };
        let oc = oc
            .as_object()
            .ok_or("attribute 'outputChecks' is not a JSON object")?;
        for (out, v) in oc {
            let o = v.as_object().ok_or_else(|| {
                format!("attribute 'outputChecks.\"{out}\"' is not a JSON object")
            })?;
            let list = |name: &str| -> Result<Option<Vec<String>>, String> {
                let Some(v) = o.get(name) else {
                    return Ok(None);
                };
                let bad = || {
                    format!("attribute 'outputChecks.\"{out}\".{name}' is not a list of strings")
                };
                let a = v.as_array().ok_or_else(bad)?;
                a.iter()
                    .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            };
            let size = |name: &str| -> Result<Option<u64>, String> {
                match o.get(name) {
                    None => Ok(None),
                    Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                        format!("attribute 'outputChecks.\"{out}\".{name}' is not a non-negative integer")
                    }),
                }
            };
            per.insert(
                out.clone(),
                OutputChecks {
                    max_size: size("maxSize")?,
                    max_closure_size: size("maxClosureSize")?,
                    allowed_references: list("allowedReferences")?,
                    allowed_requisites: list("allowedRequisites")?,
                    disallowed_references: list("disallowedReferences")?.unwrap_or_default(),
                    disallowed_requisites: list("disallowedRequisites")?.unwrap_or_default(),
                    // Nix 2.34 reads no `ignoreSelfRefs` here: an output is its own
                    // requisite.
                    ignore_self_refs: false,
                },
            );
        }
        Ok(Checks::PerOutput(per))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn drv(env: &[(&str, &str)]) -> Derivation {
        Derivation {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn flags_and_lists_in_both_forms() {
        let d = drv(&[
            ("preferLocalBuild", "1"),
            ("allowSubstitutes", ""),
            ("impureEnvVars", "A  B"),
        ]);
        let a = Attrs::of(&d);
        assert!(!a.structured());
        assert!(a.flag("preferLocalBuild", false));
        assert!(!a.flag("allowSubstitutes", true));
        assert!(a.flag("absent", true));
        assert_eq!(a.strings("impureEnvVars").unwrap(), ["A", "B"]);
        let d = drv(&[(
            "__json",
            r#"{"preferLocalBuild":true,"allowSubstitutes":false,"__noChroot":true,"impureEnvVars":["A","B"]}"#,
        )]);
        let a = Attrs::of(&d);
        assert!(a.structured());
        assert!(a.flag("preferLocalBuild", false));
        assert!(!a.flag("allowSubstitutes", true));
        assert!(a.flag("__noChroot", false));
        assert_eq!(a.strings("impureEnvVars").unwrap(), ["A", "B"]);
    }

    #[test]
    fn output_checks_in_both_forms() {
        let d = drv(&[
            ("allowedReferences", "out /s/x"),
            ("disallowedRequisites", ""),
        ]);
        let c = Attrs::of(&d).output_checks().unwrap();
        let all = c.for_output("anything").unwrap();
        assert_eq!(all.allowed_references.as_deref().unwrap(), ["out", "/s/x"]);
        assert_eq!(all.allowed_requisites, None);
        assert!(all.ignore_self_refs);
        let d = drv(&[(
            "__json",
            r#"{"allowedReferences":[],"outputChecks":{"out":{"allowedReferences":[],"maxSize":10,"maxClosureSize":20,"disallowedRequisites":["dev"]}},"unsafeDiscardReferences":{"out":true}}"#,
        )]);
        let a = Attrs::of(&d);
        let c = a.output_checks().unwrap();
        let out = c.for_output("out").unwrap();
        assert_eq!(out.allowed_references, Some(vec![]));
        assert_eq!(out.max_size, Some(10));
        assert_eq!(out.max_closure_size, Some(20));
        assert_eq!(out.disallowed_requisites, ["dev"]);
        assert!(!out.ignore_self_refs);
        assert!(c.for_output("dev").is_none());
        assert!(a.discard_references("out").unwrap());
        assert!(!a.discard_references("dev").unwrap());
        assert_eq!(a.ignored_top_level_checks(), ["allowedReferences"]);
        let bad = drv(&[("__json", r#"{"outputChecks":{"out":{"maxSize":"big"}}}"#)]);
        let e = Attrs::of(&bad).output_checks().unwrap_err();
        assert!(e.contains("outputChecks.\"out\".maxSize"), "{e}");
    }
}
