//! `hashDerivationModulo`: the hash that input-addressed output paths are computed from.
//!
//! A fixed-output derivation hashes as `fixed:out:<method+algo>:<hex>:<path>`, so changing
//! how it is fetched does not change its dependents. Any other derivation hashes as its own
//! ATerm with each input derivation replaced by that input's modulo hash. Results are cached
//! per `.drv` path, so a DAG of n derivations is hashed in O(n) file reads.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{aterm, Derivation};
use crate::hash::Hash;
use crate::store_path::{StoreDir, StorePath};
use crate::Error;

/// Where input `.drv` files come from (the store on disk, an in-memory map in tests, …).
pub trait DerivationReader {
    /// Reads and parses the derivation at `path`.
    fn read_derivation(&self, store_dir: &StoreDir, path: &StorePath) -> Result<Derivation, Error>;
}

impl<F> DerivationReader for F
where
    F: Fn(&StoreDir, &StorePath) -> Result<Derivation, Error>,
{
    fn read_derivation(&self, store_dir: &StoreDir, path: &StorePath) -> Result<Derivation, Error> {
        self(store_dir, path)
    }
}

/// Computes modulo hashes, caching those of input derivations.
#[derive(Debug)]
pub struct DerivationHasher<R> {
    reader: R,
    /// Unmasked modulo hash of each input derivation, and whether it is deferred.
    cache: HashMap<StorePath, (Hash, bool)>,
}

impl<R: DerivationReader> DerivationHasher<R> {
    pub fn new(reader: R) -> Self {
        DerivationHasher {
            reader,
            cache: HashMap::new(),
        }
    }

    /// The reader, for callers that want to read more derivations through it.
    pub fn reader(&self) -> &R {
        &self.reader
    }

    /// Remembers the modulo hash of a derivation known by other means.
    pub fn remember(&mut self, path: StorePath, hash: Hash, deferred: bool) {
        self.cache.insert(path, (hash, deferred));
    }

    /// Bounds the cache: beyond `max` entries it is cleared (valid derivations never change,
    /// so forgetting only costs re-reading them).
    pub fn trim_cache(&mut self, max: usize) {
        if self.cache.len() > max {
            self.cache.clear();
        }
    }

    /// The modulo hash of a derivation in the store (unmasked), as its dependents use it.
    pub fn hash_of_path(&mut self, store_dir: &StoreDir, path: &StorePath) -> Result<Hash, Error> {
        self.input_hash(store_dir, path).map(|(h, _)| h)
    }

    /// `hashDerivationModulo(drv, mask_outputs)`.
    pub fn hash_modulo(
        &mut self,
        store_dir: &StoreDir,
        drv: &Derivation,
        mask_outputs: bool,
    ) -> Result<Hash, Error> {
        self.hash_modulo_kind(store_dir, drv, mask_outputs)
            .map(|(h, _)| h)
    }

    /// `hashDerivationModulo` and whether the hash is *deferred*: the derivation is floating
    /// content-addressed or depends on one that is, so its output paths are only known once
    /// those inputs are built.
    pub fn hash_modulo_kind(
        &mut self,
        store_dir: &StoreDir,
        drv: &Derivation,
        mask_outputs: bool,
    ) -> Result<(Hash, bool), Error> {
        if let Some(fixed) = drv.fixed_output() {
            let path = drv.fixed_output_path(store_dir, fixed)?;
            let s = format!(
                "fixed:out:{}:{}:{}",
                fixed.method_algo(),
                fixed.hash.to_base16(),
                store_dir.display(&path)
            );
            return Ok((Hash::sha256(s.as_bytes()), false));
        }
        // Impure derivations: one constant hash, whatever they hold, since what they
        // produce says nothing about their inputs.
        if drv.is_impure() {
            return Ok((Hash::sha256(b"impure"), true));
        }
        let mut deferred = drv.is_floating();
        let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (path, outs) in &drv.input_drvs {
            let (h, d) = self.input_hash(store_dir, path)?;
            deferred |= d;
            // Nix 2.34 hashes an input by the outputs it is used for: one used only for
            // the derivations it makes (dynamic inputs) is not in the hashed text.
            if outs.is_empty() && drv.dynamic_inputs.contains_key(path) {
                continue;
            }
            inputs
                .entry(h.to_base16())
                .or_default()
                .extend(outs.iter().cloned());
        }
        let mut buf = Vec::with_capacity(1024);
        aterm::write(drv, store_dir, &mut buf, mask_outputs, Some(&inputs));
        Ok((Hash::sha256(&buf), deferred))
    }

    /// The modulo hash of an input derivation (unmasked), iteratively so that a deep chain
    /// of inputs cannot overflow the stack.
    fn input_hash(
        &mut self,
        store_dir: &StoreDir,
        root: &StorePath,
    ) -> Result<(Hash, bool), Error> {
        if let Some(h) = self.cache.get(root) {
            return Ok(*h);
        }
        // Depth-first with an explicit stack: a derivation is hashed once all its inputs are.
        let mut stack: Vec<(StorePath, Derivation)> = Vec::new();
        let first = self.reader.read_derivation(store_dir, root)?;
        stack.push((root.clone(), first));
        let mut in_progress: BTreeSet<StorePath> = BTreeSet::new();
        in_progress.insert(root.clone());
        while let Some((path, drv)) = stack.last() {
            let missing = drv
                .input_drvs
                .keys()
                .find(|p| !self.cache.contains_key(*p))
                .cloned();
            match missing {
                Some(next) => {
                    if !in_progress.insert(next.clone()) {
                        return Err(Error::Derivation(format!(
                            "derivation '{path}' depends on itself through '{next}'"
                        )));
                    }
                    let d = self.reader.read_derivation(store_dir, &next)?;
                    stack.push((next, d));
                }
                None => {
                    let h = self.hash_modulo_kind(store_dir, drv, false)?;
                    let path = path.clone();
                    in_progress.remove(&path);
                    self.cache.insert(path, h);
                    stack.pop();
                }
            }
        }
        self.cache
            .get(root)
            .copied()
            .ok_or_else(|| Error::Derivation(format!("could not hash derivation '{root}'")))
    }
}
