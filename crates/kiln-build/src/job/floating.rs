//! Floating content-addressed outputs: hashed modulo their scratch path, rewritten to
//! their final path, moved into place.

use super::*;
use kiln_format::store_path::ContentAddressMethod;

/// Moves floating content-addressed outputs from their scratch paths to the paths their
/// contents give (Nix's `registerOutputs` for `CAFloating`): each output's hash is taken
/// *modulo* its scratch hash part (self-references do not feed into it), its references to
/// sibling outputs are rewritten to their final paths first (siblings in dependency order),
/// and its own scratch hash part is rewritten to the final one. An output whose path is
/// already valid (another derivation produced the same contents) is not touched. Locks on
/// the final paths go to `held`, to be released after registration, with a temporary root on
/// each (a collector must not take an output between its registration and its client's
/// root).
pub(super) fn finalize_floating(
    spec: &JobSpec,
    plans: &[OutputPlan],
    infos: Vec<ValidPathInfo>,
    held: &mut Finalized<'_>,
) -> Result<Vec<ValidPathInfo>, Failure> {
    if plans.iter().all(|p| p.floating.is_none()) {
        return Ok(infos);
    }
    let store = &spec.store;
    let sd = store.store_dir();
    let index: BTreeMap<&StorePath, usize> = plans
        .iter()
        .enumerate()
        .map(|(i, p)| (&p.path, i))
        .collect();
    // Dependency order between the outputs (a cycle between two outputs is refused).
    let mut order = Vec::new();
    let mut mark = vec![0u8; plans.len()];
    fn visit(
        i: usize,
        infos: &[ValidPathInfo],
        index: &BTreeMap<&StorePath, usize>,
        mark: &mut [u8],
        order: &mut Vec<usize>,
    ) -> Result<(), usize> {
        match mark[i] {
            2 => return Ok(()),
            1 => return Err(i),
            _ => {}
        }
        mark[i] = 1;
        for r in &infos[i].references {
            match index.get(r) {
                Some(&j) if j != i => visit(j, infos, index, mark, order)?,
                _ => {}
            }
        }
        mark[i] = 2;
        order.push(i);
        Ok(())
    }
    for i in 0..plans.len() {
        visit(i, &infos, &index, &mut mark, &mut order).map_err(|j| {
            rejected(format!(
                "cycle detected in the references of '{}'",
                sd.display(&plans[j].path)
            ))
        })?;
    }
    let mut finals: Vec<Option<ValidPathInfo>> = vec![None; plans.len()];
    let mut rewrites: BTreeMap<String, String> = BTreeMap::new();
    for i in order {
        let (plan, info) = (&plans[i], &infos[i]);
        let Some(f) = plan.floating else {
            finals[i] = Some(info.clone());
            continue;
        };
        let actual = store.real_path(&plan.build_path);
        let siblings = info
            .references
            .iter()
            .any(|r| r != &plan.path && index.contains_key(r));
        if siblings {
            replace_tree(store, &actual, &rewrites)?;
        }
        // Hashed modulo the placeholder path's hash part (a Git object names no path, so
        // nothing is hashed modulo there).
        let got = super::outputs::output_hash(
            &actual,
            f.method.file_ingestion(),
            f.algo,
            plan.path.hash_part(),
        )?;
        let got = match got {
            Some(h) => h,
            None => {
                let mut fl = rejected(format!(
                    "output path '{}' should be a non-executable regular file since recursive hashing is not enabled (outputHashMode=flat)",
                    sd.display(&plan.path)
                ));
                fl.detail = Some(crate::result::FailureDetail::NotAFlatFile {
                    path: sd.display(&plan.path).to_string(),
                });
                return Err(fl);
            }
        };
        let mut others = BTreeSet::new();
        let mut self_ref = false;
        for r in &info.references {
            if r == &plan.path {
                self_ref = true;
            } else if let Some(&j) = index.get(r) {
                let sib = finals[j]
                    .as_ref()
                    .ok_or_else(|| Failure::misc("output order"))?;
                others.insert(sib.path.clone());
            } else {
                others.insert(r.clone());
            }
        }
        let path = match f.method {
            // A text path (a `.drv` a derivation made) may name other paths, never itself.
            ContentAddressMethod::Text => {
                if self_ref {
                    // Nix's words, which do not name the output.
                    return Err(rejected("self-reference not allowed with text hashing".into()));
                }
                sd.make_text_path(plan.path.name(), &got, &others)
            }
            ContentAddressMethod::Fixed(m) => {
                if !(m == FileIngestionMethod::Recursive && f.algo == HashAlgo::Sha256)
                    && (self_ref || !others.is_empty())
                {
                    return Err(rejected(format!(
                        "output '{}' refers to store paths, which only a recursive SHA-256 content-addressed output may do",
                        sd.display(&plan.path)
                    )));
                }
                sd.make_fixed_output_path(m, &got, plan.path.name(), &others, self_ref)
            }
        }
        .map_err(Failure::misc)?;
        rewrites.insert(
            plan.path.hash_part().to_string(),
            path.hash_part().to_string(),
        );
        if let Ok(Some(mut l)) = store.lock_path(&path, true) {
            // As for other output locks, the file goes when the lock is released.
            l.set_delete(true);
            held.locks.push(l);
        }
        store.add_temp_root(&path).map_err(Failure::misc)?;
        held.roots.push(path.clone());
        if store.is_valid(&path).map_err(Failure::misc)? {
            // Produced before (by this derivation or another): keep what is there.
            fsutil::remove_tree(&actual).map_err(Failure::misc)?;
            finals[i] = Some(store.path_info(&path).map_err(Failure::misc)?);
            continue;
        }
        let real = store.real_path(&path);
        // Whatever is at the final path is not valid: garbage, replaced.
        if std::fs::symlink_metadata(&real).is_ok() {
            tracing::info!("removing invalid path '{}'", real.display());
            fsutil::remove_tree(&real).map_err(Failure::misc)?;
        }
        let own: BTreeMap<String, String> = [(
            plan.path.hash_part().to_string(),
            path.hash_part().to_string(),
        )]
        .into();
        replace_tree(store, &actual, &own)?;
        std::fs::rename(&actual, &real)
            .map_err(|e| Failure::misc(format!("moving into '{}': {e}", real.display())))?;
        let mut sink = HashSink::new(HashAlgo::Sha256);
        nar::dump(&real, &mut sink).map_err(Failure::misc)?;
        let (nar_hash, nar_size) = sink.finish();
        let mut new = ValidPathInfo::new(path.clone(), nar_hash, nar_size);
        new.references = others;
        if self_ref {
            new.references.insert(path.clone());
        }
        new.deriver = Some(spec.drv_path.clone());
        new.ultimate = true;
        new.ca = Some(f.method.address(got));
        finals[i] = Some(new);
    }
    finals
        .into_iter()
        .map(|f| f.ok_or_else(|| Failure::misc("an output was not finalized")))
        .collect()
}

/// Locks and temporary roots of floating outputs' final paths. The locks go when it is
/// dropped; so do the roots unless the build succeeded, in which case the scheduler's goal
/// owns them (see `Worker::build_done`).
pub(super) struct Finalized<'a> {
    pub(super) store: &'a LocalStore,
    pub(super) locks: Vec<kiln_store::lock::PathLock>,
    pub(super) roots: Vec<StorePath>,
}

impl Finalized<'_> {
    /// The roots, now the caller's (the goal's) to release.
    pub(super) fn hand_over(&mut self) -> Vec<StorePath> {
        std::mem::take(&mut self.roots)
    }
}

impl Drop for Finalized<'_> {
    fn drop(&mut self) {
        for p in &self.roots {
            self.store.remove_temp_root(p);
        }
    }
}

/// Rewrites hash parts throughout the tree at `at` (a fresh copy replaces it).
pub(super) fn replace_tree(
    store: &LocalStore,
    at: &Path,
    rewrites: &BTreeMap<String, String>,
) -> Result<(), Failure> {
    if rewrites.is_empty() {
        return Ok(());
    }
    let name = at
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut scratch = store.scratch_path(&name).map_err(Failure::misc)?;
    rewrite::copy_tree(at, scratch.real(), rewrites).map_err(Failure::misc)?;
    fsutil::remove_tree(at).map_err(Failure::misc)?;
    std::fs::rename(scratch.real(), at)
        .map_err(|e| Failure::misc(format!("moving '{}': {e}", at.display())))?;
    scratch.keep();
    Ok(())
}
