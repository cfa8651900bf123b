//! What the store knows about a valid path (`ValidPathInfo`).

use std::collections::BTreeSet;

use crate::hash::Hash;
use crate::narinfo::fingerprint;
use crate::signature::{verify_any, PublicKey, SecretKey};
use crate::store_path::{ContentAddress, StoreDir, StorePath};
use crate::Error;

/// Metadata of a valid store path, as the database and the worker protocol carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathInfo {
    pub path: StorePath,
    pub deriver: Option<StorePath>,
    /// SHA-256 of the NAR serialisation.
    pub nar_hash: Hash,
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch; 0 means "now" when registering.
    pub registration_time: i64,
    pub nar_size: u64,
    /// Built locally (trusted without signatures).
    pub ultimate: bool,
    pub sigs: BTreeSet<String>,
    pub ca: Option<ContentAddress>,
}

impl ValidPathInfo {
    /// A minimal info: no deriver, references, signatures or content address.
    pub fn new(path: StorePath, nar_hash: Hash, nar_size: u64) -> Self {
        ValidPathInfo {
            path,
            deriver: None,
            nar_hash,
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }

    /// The fingerprint signatures cover.
    pub fn fingerprint(&self, store_dir: &StoreDir) -> String {
        fingerprint(
            store_dir,
            &self.path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds a signature.
    pub fn sign(&mut self, store_dir: &StoreDir, key: &SecretKey) {
        self.sigs
            .insert(key.sign(self.fingerprint(store_dir).as_bytes()));
    }

    /// Whether a trusted key signed it.
    pub fn is_signed_by(&self, store_dir: &StoreDir, keys: &[PublicKey]) -> bool {
        verify_any(keys, self.fingerprint(store_dir).as_bytes(), &self.sigs)
    }

    /// Whether the path is what its content address says it must be (so it needs no
    /// signature: anyone can check it).
    pub fn is_content_addressed(&self, store_dir: &StoreDir) -> bool {
        self.check_content_address(store_dir).is_ok_and(|ok| ok)
    }

    /// `Ok(true)` if the content address is present and matches the path, `Ok(false)` if
    /// there is none; an error if it is present and does not match.
    pub fn check_content_address(&self, store_dir: &StoreDir) -> Result<bool, Error> {
        let Some(ca) = &self.ca else { return Ok(false) };
        let self_ref = self.references.contains(&self.path);
        let mut refs = self.references.clone();
        refs.remove(&self.path);
        let want = store_dir.ca_path(self.path.name(), ca, &refs, self_ref)?;
        if want != self.path {
            return Err(Error::StorePath(format!(
                "path '{}' claims content address '{ca}', which gives '{}'",
                store_dir.display(&self.path),
                store_dir.display(&want)
            )));
        }
        Ok(true)
    }
}
