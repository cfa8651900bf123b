//! The ATerm text of `.drv` files:
//! `Derive([outputs],[inputDrvs],[inputSrcs],"system","builder",[args],[env])`, and the
//! versioned form of derivations with dynamic inputs,
//! `DrvWithVersion("xp-dyn-drv",[outputs],…)`, where an input derivation's outputs may be
//! `([outputs],[(output,node),…])`: outputs of the derivations its outputs are.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    parse_fixed, parse_method_algo, Derivation, DerivationOutput, DynamicInput, MAX_DYNAMIC_DEPTH,
};
use crate::store_path::{StoreDir, StorePath};
use crate::Error;

/// Largest `.drv` file kiln reads. Real derivations are kilobytes; the biggest seen in
/// nixpkgs are a few MiB. The bound keeps a hostile file from exhausting memory.
pub const MAX_DRV_SIZE: usize = 64 << 20;

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    name: &'a str,
    store_dir: &'a StoreDir,
}

impl<'a> Parser<'a> {
    fn err(&self, what: impl std::fmt::Display) -> Error {
        Error::Derivation(format!(
            "invalid derivation '{}': {what} at byte {}",
            self.name, self.pos
        ))
    }

    fn expect(&mut self, lit: &str) -> Result<(), Error> {
        if self.s[self.pos..].starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(self.err(format_args!("expected '{lit}'")))
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    /// A quoted string with Nix's escapes: `\n`, `\r`, `\t`, and `\x` for any other x.
    fn string(&mut self) -> Result<String, Error> {
        self.expect("\"")?;
        let start = self.pos;
        let mut out = Vec::new();
        loop {
            // Copy a run of ordinary bytes at once.
            let run = memchr::memchr2(b'"', b'\\', &self.s[self.pos..]).ok_or_else(|| {
                Error::Derivation(format!(
                    "invalid derivation '{}': unterminated string starting at byte {}",
                    self.name,
                    start - 1
                ))
            })?;
            out.extend_from_slice(&self.s[self.pos..self.pos + run]);
            self.pos += run;
            let c = self.s[self.pos];
            self.pos += 1;
            if c == b'"' {
                break;
            }
            let Some(&e) = self.s.get(self.pos) else {
                return Err(self.err("unterminated escape"));
            };
            self.pos += 1;
            out.push(match e {
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                other => other,
            });
        }
        String::from_utf8(out).map_err(|e| {
            Error::Derivation(format!(
                "invalid derivation '{}': string at byte {} is not valid UTF-8 (offset {} in the string)",
                self.name,
                start - 1,
                e.utf8_error().valid_up_to()
            ))
        })
    }

    fn path(&mut self) -> Result<StorePath, Error> {
        let at = self.pos;
        let s = self.string()?;
        self.store_dir.parse_path(&s).map_err(|e| {
            Error::Derivation(format!(
                "invalid derivation '{}': bad path at byte {at}: {e}",
                self.name
            ))
        })
    }

    /// `[item,item,…]`.
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        self.expect("[")?;
        let mut v = Vec::new();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(v);
        }
        loop {
            v.push(item(self)?);
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(v);
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn strings(&mut self) -> Result<Vec<String>, Error> {
        self.list(|p| p.string())
    }

    /// Output names (of an input derivation), each a valid store path name.
    fn output_names(&mut self, input: &StorePath) -> Result<BTreeSet<String>, Error> {
        let at = self.pos;
        let outs: BTreeSet<String> = self.strings()?.into_iter().collect();
        if let Some(bad) = outs
            .iter()
            .find(|o| crate::store_path::check_name(o, o).is_err())
        {
            return Err(Error::Derivation(format!(
                "invalid derivation '{}': input '{input}' at byte {at} names output '{}', which is not a valid store path name",
                self.name,
                bad.escape_default()
            )));
        }
        Ok(outs)
    }

    /// An input derivation's node in the versioned form: `[outputs]`, or
    /// `([outputs],[(output,node),…])`.
    fn dynamic_node(&mut self, input: &StorePath, depth: usize) -> Result<DynamicInput, Error> {
        if self.peek() == Some(b'[') {
            return Ok(DynamicInput {
                outputs: self.output_names(input)?,
                children: BTreeMap::new(),
            });
        }
        if depth >= MAX_DYNAMIC_DEPTH {
            return Err(self.err(format_args!(
                "dynamic inputs nested more than {MAX_DYNAMIC_DEPTH} deep"
            )));
        }
        self.expect("(")?;
        let outputs = self.output_names(input)?;
        self.expect(",")?;
        let items = self.list(|p| {
            let at = p.pos;
            p.expect("(")?;
            let name = p.string()?;
            p.expect(",")?;
            let node = p.dynamic_node(input, depth + 1)?;
            p.expect(")")?;
            Ok((at, name, node))
        })?;
        self.expect(")")?;
        let mut children = BTreeMap::new();
        for (at, name, node) in items {
            if crate::store_path::check_name(&name, &name).is_err() {
                return Err(Error::Derivation(format!(
                    "invalid derivation '{}': input '{input}' at byte {at} names output '{}', which is not a valid store path name",
                    self.name,
                    name.escape_default()
                )));
            }
            if children.insert(name.clone(), node).is_some() {
                return Err(Error::Derivation(format!(
                    "invalid derivation '{}': input '{input}' names output '{name}' twice at byte {at}",
                    self.name
                )));
            }
        }
        Ok(DynamicInput { outputs, children })
    }
}

/// Parses a `.drv` file.
pub(super) fn parse(store_dir: &StoreDir, name: &str, text: &[u8]) -> Result<Derivation, Error> {
    if text.len() > MAX_DRV_SIZE {
        return Err(Error::Derivation(format!(
            "derivation '{name}' is {} bytes, more than the limit of {MAX_DRV_SIZE}",
            text.len()
        )));
    }
    let mut p = Parser {
        s: text,
        pos: 0,
        name,
        store_dir,
    };
    let versioned = text.starts_with(b"DrvWithVersion(");
    if versioned {
        p.expect("DrvWithVersion(")?;
        let at = p.pos;
        let version = p.string()?;
        if version != "xp-dyn-drv" {
            return Err(Error::Derivation(format!(
                "invalid derivation '{name}': unknown derivation ATerm format version '{}' at byte {at}",
                version.escape_default()
            )));
        }
        p.expect(",")?;
    } else {
        p.expect("Derive(")?;
    }

    let mut outputs = BTreeMap::new();
    let outs = p.list(|p| {
        let at = p.pos;
        p.expect("(")?;
        let id = p.string()?;
        p.expect(",")?;
        let path_at = p.pos;
        let path = p.string()?;
        p.expect(",")?;
        let algo = p.string()?;
        p.expect(",")?;
        let hash = p.string()?;
        p.expect(")")?;
        // Output names become part of store path names (`<name>-<output>`) and Nix prints
        // them unescaped, so only store-name characters can ever be valid.
        crate::store_path::check_name(&id, &id).map_err(|_| {
            Error::Derivation(format!(
                "invalid derivation '{name}': output name '{}' at byte {at} is not a valid store path name",
                id.escape_default()
            ))
        })?;
        let bad = |e: Error| {
            Error::Derivation(format!("invalid derivation '{name}': output '{id}' at byte {at}: {e}"))
        };
        let (fixed, floating) = match (algo.is_empty(), hash.is_empty()) {
            (true, true) => (None, None),
            (false, false) if hash == "impure" && !path.is_empty() => {
                return Err(Error::Derivation(format!(
                    "invalid derivation '{name}': impure output '{id}' at byte {at} has a path"
                )))
            }
            (false, false) if hash == "impure" => {
                let mut f = parse_method_algo(&algo).map_err(bad)?;
                f.impure = true;
                (None, Some(f))
            }
            (false, false) => (Some(parse_fixed(&algo, &hash).map_err(bad)?), None),
            (false, true) if !path.is_empty() => {
                return Err(Error::Derivation(format!(
                    "invalid derivation '{name}': floating content-addressed output '{id}' at byte {at} has a path"
                )))
            }
            (false, true) => (None, Some(parse_method_algo(&algo).map_err(bad)?)),
            (true, false) => {
                return Err(Error::Derivation(format!(
                    "invalid derivation '{name}': output '{id}' at byte {at} has a hash but no hash algorithm"
                )))
            }
        };
        let path = if path.is_empty() {
            None
        } else {
            Some(store_dir.parse_path(&path).map_err(|e| {
                Error::Derivation(format!("invalid derivation '{name}': bad path at byte {path_at}: {e}"))
            })?)
        };
        Ok((at, id, DerivationOutput { path, fixed, floating }))
    })?;
    for (at, id, o) in outs {
        if outputs.insert(id.clone(), o).is_some() {
            return Err(Error::Derivation(format!(
                "invalid derivation '{name}': duplicate output '{id}' at byte {at}"
            )));
        }
    }
    p.expect(",")?;

    let mut input_drvs = BTreeMap::new();
    let mut dynamic_inputs = BTreeMap::new();
    let ins = p.list(|p| {
        let at = p.pos;
        p.expect("(")?;
        let path = p.path()?;
        p.expect(",")?;
        // Only the versioned form may hold dynamic inputs.
        let node = if versioned {
            p.dynamic_node(&path, 0)?
        } else {
            DynamicInput {
                outputs: p.output_names(&path)?,
                children: BTreeMap::new(),
            }
        };
        p.expect(")")?;
        Ok((at, path, node))
    })?;
    for (at, path, node) in ins {
        if input_drvs.insert(path.clone(), node.outputs).is_some() {
            return Err(Error::Derivation(format!(
                "invalid derivation '{name}': duplicate input derivation '{path}' at byte {at}"
            )));
        }
        if !node.children.is_empty() {
            dynamic_inputs.insert(path, node.children);
        }
    }
    p.expect(",")?;
    let input_srcs: BTreeSet<StorePath> = p.list(|p| p.path())?.into_iter().collect();
    p.expect(",")?;
    let platform = p.string()?;
    p.expect(",")?;
    let builder = p.string()?;
    p.expect(",")?;
    let args = p.strings()?;
    p.expect(",")?;
    let mut env = BTreeMap::new();
    let pairs = p.list(|p| {
        p.expect("(")?;
        let k = p.string()?;
        p.expect(",")?;
        let v = p.string()?;
        p.expect(")")?;
        Ok((k, v))
    })?;
    for (k, v) in pairs {
        env.insert(k, v);
    }
    p.expect(")")?;
    if p.pos != text.len() {
        return Err(p.err("trailing data after the derivation"));
    }
    Ok(Derivation {
        name: name.to_string(),
        outputs,
        input_drvs,
        dynamic_inputs,
        input_srcs,
        platform,
        builder,
        args,
        env,
    })
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let b = s.as_bytes();
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&b[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

/// Nix prints output names, paths, hash fields, input derivation outputs and the platform
/// without escaping (`printUnquotedString`); kiln does the same to stay byte-identical.
fn write_unquoted(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn write_unquoted_list<'a>(out: &mut Vec<u8>, items: impl IntoIterator<Item = &'a str>) {
    out.push(b'[');
    for (i, s) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_unquoted(out, s);
    }
    out.push(b']');
}

/// `([outputs],[(output,node),…])`, or `[outputs]` where nothing is made of a made one.
fn write_dynamic_node(
    out: &mut Vec<u8>,
    outputs: &BTreeSet<String>,
    children: &BTreeMap<String, DynamicInput>,
) {
    if children.is_empty() {
        return write_unquoted_list(out, outputs.iter().map(String::as_str));
    }
    out.push(b'(');
    write_unquoted_list(out, outputs.iter().map(String::as_str));
    out.extend_from_slice(b",[");
    for (i, (name, node)) in children.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'(');
        write_unquoted(out, name);
        out.push(b',');
        write_dynamic_node(out, &node.outputs, &node.children);
        out.push(b')');
    }
    out.extend_from_slice(b"])");
}

fn write_strings<'a>(out: &mut Vec<u8>, items: impl IntoIterator<Item = &'a str>) {
    out.push(b'[');
    for (i, s) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, s);
    }
    out.push(b']');
}

/// Prints the ATerm. With `mask_outputs`, output paths and the environment variables named
/// after outputs print as `""` (the form hashed for input-addressed output paths). With
/// `input_hashes`, the input derivations are replaced by their modulo hashes (base16).
pub(super) fn write(
    drv: &Derivation,
    store_dir: &StoreDir,
    out: &mut Vec<u8>,
    mask_outputs: bool,
    input_hashes: Option<&BTreeMap<String, BTreeSet<String>>>,
) {
    // As Nix: the older form whenever it can say it, for wider compatibility.
    if drv.dynamic_inputs.is_empty() {
        out.extend_from_slice(b"Derive([");
    } else {
        out.extend_from_slice(b"DrvWithVersion(\"xp-dyn-drv\",[");
    }
    for (i, (name, o)) in drv.outputs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'(');
        write_unquoted(out, name);
        out.push(b',');
        let path = match (&o.path, mask_outputs) {
            (Some(p), false) => store_dir.display(p),
            _ => String::new(),
        };
        write_unquoted(out, &path);
        out.push(b',');
        match (&o.fixed, &o.floating) {
            (Some(f), _) => {
                write_unquoted(out, &f.method_algo());
                out.push(b',');
                write_unquoted(out, &f.hash.to_base16());
            }
            (None, Some(f)) => {
                write_unquoted(out, &f.method_algo());
                out.extend_from_slice(if f.impure { b",\"impure\"" } else { b",\"\"" });
            }
            (None, None) => out.extend_from_slice(b"\"\",\"\""),
        }
        out.push(b')');
    }
    out.extend_from_slice(b"],[");
    match input_hashes {
        Some(map) => {
            for (i, (h, outs)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.push(b'(');
                write_unquoted(out, h);
                out.push(b',');
                write_unquoted_list(out, outs.iter().map(String::as_str));
                out.push(b')');
            }
        }
        None => {
            for (i, (p, outs)) in drv.input_drvs.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.push(b'(');
                write_unquoted(out, &store_dir.display(p));
                out.push(b',');
                match drv.dynamic_inputs.get(p) {
                    Some(children) => write_dynamic_node(out, outs, children),
                    None => write_unquoted_list(out, outs.iter().map(String::as_str)),
                }
                out.push(b')');
            }
        }
    }
    out.extend_from_slice(b"],");
    let srcs: Vec<String> = drv
        .input_srcs
        .iter()
        .map(|p| store_dir.display(p))
        .collect();
    write_unquoted_list(out, srcs.iter().map(String::as_str));
    out.push(b',');
    write_unquoted(out, &drv.platform);
    out.push(b',');
    write_string(out, &drv.builder);
    out.push(b',');
    write_strings(out, drv.args.iter().map(String::as_str));
    out.extend_from_slice(b",[");
    for (i, (k, v)) in drv.env.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'(');
        write_string(out, k);
        out.push(b',');
        let masked = mask_outputs && drv.outputs.contains_key(k);
        write_string(out, if masked { "" } else { v });
        out.push(b')');
    }
    out.extend_from_slice(b"])");
}
