//! Registering what a build produced: canonical metadata, hashes and references scanned
//! in one pass, fixed-output checks, and every reference restriction.

use super::*;

/// Canonicalises an output for registration, owned by `owner`; `builder`: the uid whose
/// inodes the tree must hold (see [`fsutil::Ownership`]), where that is not `owner`'s.
pub(super) fn canonicalise_for(
    path: &Path,
    owner: (u32, u32),
    builder: Option<u32>,
) -> kiln_store::Result<()> {
    fsutil::canonicalise(
        path,
        fsutil::Ownership {
            expected_uid: builder,
            target: owner,
        },
    )
}

/// What a fixed-output derivation produced under a wrong hash is kept as Nix 2.8 keeps it:
/// moved to the path its actual hash gives and registered there (deriver and `ca` set), so
/// that correcting the hash in the expression finds the result instead of fetching again.
/// Best effort: the build fails either way, so any problem here only leaves the output to
/// be deleted with the failed build. An output with references is not kept (its path
/// would have to name them; fixed outputs normally have none).
pub(super) fn keep_mismatched_fixed_output(
    spec: &JobSpec,
    plan: &OutputPlan,
    actual: &Path,
    method: FileIngestionMethod,
    got: &kiln_format::Hash,
) {
    let store = &spec.store;
    let sd = store.store_dir();
    let Ok(path) =
        sd.make_fixed_output_path(method, got, plan.path.name(), &BTreeSet::new(), false)
    else {
        return;
    };
    if store.is_valid(&path).unwrap_or(true) {
        return;
    }
    // Whoever holds the lock is producing this path; let them.
    let Ok(Some(_lock)) = store.lock_path(&path, false) else {
        return;
    };
    let kept = (|| -> Result<(), String> {
        if store.is_valid(&path).map_err(|e| e.to_string())? {
            return Ok(());
        }
        canonicalise_for(actual, daemon_ids(), None).map_err(|e| e.to_string())?;
        let all: Vec<StorePath> = spec.input_paths.iter().cloned().collect();
        let mut scanner = RefScanner::new(all.iter().map(|p| p.hash_part()));
        let mut sink = ParallelHashSink::new(HashAlgo::Sha256);
        nar::dump(actual, &mut Tee(&mut sink, &mut scanner)).map_err(|e| e.to_string())?;
        let (nar_hash, nar_size) = sink.finish().map_err(|e| e.to_string())?;
        if scanner.found().next().is_some() {
            return Ok(());
        }
        let real = store.real_path(&path);
        // An invalid leftover at the path (we hold its lock): replace it.
        if std::fs::symlink_metadata(&real).is_ok() {
            fsutil::remove_tree(&real).map_err(|e| e.to_string())?;
        }
        std::fs::rename(actual, &real).map_err(|e| e.to_string())?;
        let mut info = ValidPathInfo::new(path.clone(), nar_hash, nar_size);
        info.deriver = Some(spec.drv_path.clone());
        info.ultimate = true;
        info.ca = Some(ContentAddress::Fixed(method, *got));
        let registered = store
            .sync()
            .and_then(|()| store.register_valid_paths(&[info]));
        if let Err(e) = registered {
            let _ = fsutil::remove_tree(&real);
            return Err(e.to_string());
        }
        Ok(())
    })();
    if let Err(e) = kept {
        tracing::debug!(
            "not keeping the mismatched output as '{}': {e}",
            sd.display(&path)
        );
    }
}

/// Checks, rewrites back, canonicalises, hashes and scans one output.
pub(super) fn register_output(
    spec: &JobSpec,
    plan: &OutputPlan,
    from_tmp: &BTreeMap<String, String>,
    all_paths: &[StorePath],
    builder_uid: u32,
) -> Result<ValidPathInfo, Failure> {
    let store = &spec.store;
    let sd = store.store_dir();
    let drv_abs = sd.display(&spec.drv_path);
    let mut actual = store.real_path(&plan.build_path);
    let meta = match std::fs::symlink_metadata(&actual) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut f = rejected(format!(
                "builder for '{drv_abs}' failed to produce output path '{}'",
                sd.display(&plan.path)
            ));
            f.detail = Some(crate::result::FailureDetail::MissingOutput {
                output: plan.name.clone(),
                path: sd.display(&plan.path).to_string(),
            });
            return Err(f);
        }
        Err(e) => {
            return Err(Failure::misc(format!(
                "getting attributes of '{}': {e}",
                actual.display()
            )))
        }
    };
    use std::os::unix::fs::MetadataExt;
    // A group- or world-writable output could have been changed by someone else meanwhile.
    if !meta.file_type().is_symlink() && meta.mode() & 0o022 != 0 {
        return Err(rejected(format!(
            "suspicious ownership or permission on '{}'; rejecting this build output",
            sd.display(&plan.path)
        )));
    }
    let fixed = spec.drv.fixed_output().copied();
    let me = daemon_ids();
    // A builder running under other ids than the daemon's must have made every inode of
    // its output itself (or linked a canonical input).
    let mut builder = (builder_uid != me.0).then_some(builder_uid);
    // Redirected outputs are rewritten back, and so is any output of the same build (a
    // sibling may refer to a redirected output by its temporary path); fixed outputs are
    // copied to fresh inodes so that no descriptor the builder passed on can reach the
    // registered path (CVE-2024-27297).
    if plan.redirected || fixed.is_some() || !from_tmp.is_empty() {
        if builder.is_some() {
            // Checked before the daemon reads the tree to copy it: a hard link to a file
            // the builder could not read would otherwise have its contents copied into
            // the store (and, under a wrong hash, kept there).
            canonicalise_for(&actual, me, builder).map_err(|e| rejected(e.to_string()))?;
            builder = None;
        }
        let mut scratch = store
            .scratch_path(plan.path.name())
            .map_err(Failure::misc)?;
        let rewrites = from_tmp.clone();
        rewrite::copy_tree(&actual, scratch.real(), &rewrites).map_err(Failure::misc)?;
        fsutil::remove_tree(&actual).map_err(Failure::misc)?;
        std::fs::rename(scratch.real(), &actual)
            .map_err(|e| Failure::misc(format!("moving '{}': {e}", actual.display())))?;
        scratch.keep();
        actual = store.real_path(&plan.build_path);
    }
    if let Some(f) = fixed {
        let got = output_hash(&actual, f.method, f.hash.algo(), "")?;
        let got = match got {
            Some(h) => h,
            None => {
                return Err(rejected(format!(
                    "output path '{}' should be a non-executable regular file",
                    sd.display(&plan.path)
                )))
            }
        };
        if got != f.hash {
            // Nix makes the output's path from what was built, references included, before
            // it compares hashes, and only `sha256` recursive outputs may have references:
            // an output that refers to store paths is that error, not a hash mismatch.
            if !(f.method == FileIngestionMethod::Recursive && f.hash.algo() == HashAlgo::Sha256) {
                let mut refs = RefScanner::new(all_paths.iter().map(|p| p.hash_part()));
                nar::dump(&actual, &mut refs).map_err(Failure::misc)?;
                if refs.found().next().is_some() {
                    return Err(rejected(format!(
                        "fixed output derivation '{}' is not allowed to refer to other store paths.\nYou may need to use the 'unsafeDiscardReferences' derivation attribute, see the manual for more details.",
                        plan.path.name()
                    )));
                }
            }
            keep_mismatched_fixed_output(spec, plan, &actual, f.method, &got);
            let mut fl = rejected(format!(
                "hash mismatch in fixed-output derivation '{drv_abs}':\n  specified: {}\n     got:    {}",
                f.hash.to_sri(),
                got.to_sri()
            ));
            fl.kinds.hash_mismatch = true;
            return Err(fl);
        }
    }
    let t0 = std::time::Instant::now();
    let canonicalise = || {
        let r = canonicalise_for(&actual, me, builder).map_err(|e| rejected(e.to_string()));
        (r, t0.elapsed())
    };
    // NAR hash and references in one pass over the NAR: reading and scanning on this thread,
    // hashing on a helper once the output is large.
    let mut scanner = RefScanner::new(all_paths.iter().map(|p| p.hash_part()));
    let hash = |scanner: &mut RefScanner| {
        let mut sink = ParallelHashSink::new(HashAlgo::Sha256);
        nar::dump(&actual, &mut Tee(&mut sink, scanner)).map_err(Failure::misc)?;
        sink.finish().map_err(Failure::misc)
    };
    // Canonicalisation only changes metadata the archive does not record (the owner's
    // execute bit decides both the archive's `executable` and the canonical mode), so for a
    // directory it runs beside the hashing pass; its verdict still gates registration. A
    // single file is not worth a thread. Without root's permission override the pass must
    // wait: canonicalisation is what makes a builder's mode-0 files readable.
    let ((canonical, canonicalised), hashed) = if meta.is_dir() && me.0 == 0 {
        std::thread::scope(|sc| {
            let c = sc.spawn(canonicalise);
            let h = hash(&mut scanner);
            let c = c.join().unwrap_or_else(|_| {
                (
                    Err(Failure::misc("canonicalisation panicked")),
                    t0.elapsed(),
                )
            });
            (c, h)
        })
    } else {
        let c = canonicalise();
        (c, hash(&mut scanner))
    };
    canonical?;
    let (nar_hash, nar_size) = hashed?;
    tracing::debug!(
        output = %sd.display(&plan.path),
        nar_size,
        canonicalise_ms = canonicalised.as_secs_f64() * 1e3,
        total_ms = t0.elapsed().as_secs_f64() * 1e3,
        "output canonicalised, hashed and scanned"
    );
    // `unsafeDiscardReferences.<output> = true` (structured attributes): registered with no
    // references, whatever the scan found (for outputs such as disk images whose bytes
    // happen to contain store paths).
    let discard = crate::attrs::Attrs::of(&spec.drv)
        .discard_references(&plan.name)
        .map_err(rejected)?;
    let references: BTreeSet<StorePath> = if discard {
        tracing::debug!("discarding references of output '{}'", plan.name);
        BTreeSet::new()
    } else {
        scanner.found().map(|i| all_paths[i].clone()).collect()
    };
    let mut info = ValidPathInfo::new(plan.path.clone(), nar_hash, nar_size);
    info.references = references;
    info.deriver = Some(spec.drv_path.clone());
    info.ultimate = true;
    if let Some(f) = fixed {
        info.ca = Some(ContentAddress::Fixed(f.method, f.hash));
    }
    Ok(info)
}

pub(super) struct Tee<'a>(&'a mut ParallelHashSink, &'a mut RefScanner);

impl Write for Tee<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.1.feed(b);
        self.0.write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The output checks, as Nix 2.34's `checkOutputs`: `allowedReferences`,
/// `allowedRequisites`, `disallowedReferences`, `disallowedRequisites` (each a list of
/// store paths or output names), and with structured attributes, per output under
/// `outputChecks`, also `maxSize` and `maxClosureSize` (see [`crate::attrs`]).
pub(super) fn check_references(
    spec: &JobSpec,
    plans: &[OutputPlan],
    infos: &[ValidPathInfo],
) -> Result<(), Failure> {
    let store = &spec.store;
    let sd = store.store_dir();
    let checks = crate::attrs::Attrs::of(&spec.drv)
        .output_checks()
        .map_err(rejected)?;
    // Output names stand for the paths the outputs were built at.
    let output_path = |name: &str| {
        plans
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.path.clone())
    };
    let by_path: BTreeMap<&StorePath, &ValidPathInfo> =
        infos.iter().map(|i| (&i.path, i)).collect();
    let output_names: Vec<&str> = {
        let mut v: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        v.sort_unstable();
        v
    };
    // An output's closure (itself included) and its size; sibling outputs are not valid
    // yet: their registered infos stand in.
    let closure = |start: &StorePath| -> Result<(BTreeSet<StorePath>, u64), Failure> {
        let mut done = BTreeSet::new();
        let mut size = 0u64;
        let mut todo = vec![start.clone()];
        while let Some(p) = todo.pop() {
            if !done.insert(p.clone()) {
                continue;
            }
            if let Some(i) = by_path.get(&p) {
                size += i.nar_size;
                todo.extend(i.references.iter().cloned());
            } else {
                let i = store.path_info(&p).map_err(Failure::misc)?;
                size += i.nar_size;
                todo.extend(i.references.iter().cloned());
            }
        }
        Ok((done, size))
    };
    // Outputs are checked in name order, as Nix does (its first complaint is the same).
    // `infos` are the registered outputs, one per plan, in the plans' order.
    let mut named: Vec<(&str, &ValidPathInfo)> = plans
        .iter()
        .map(|p| p.name.as_str())
        .zip(infos.iter())
        .collect();
    named.sort_by_key(|(n, _)| *n);
    for (checked, info) in named {
        let Some(c) = checks.for_output(checked) else {
            continue;
        };
        if let Some(max) = c.max_size {
            if info.nar_size > max {
                return Err(rejected(format!(
                    "path '{}' is too large at {} bytes; limit is {max} bytes",
                    sd.display(&info.path),
                    info.nar_size
                )));
            }
        }
        if let Some(max) = c.max_closure_size {
            let (_, size) = closure(&info.path)?;
            if size > max {
                return Err(rejected(format!(
                    "closure of path '{}' is too large at {size} bytes; limit is {max} bytes",
                    sd.display(&info.path)
                )));
            }
        }
        let check = |tokens: &[String], allowed: bool, recursive: bool| -> Result<(), Failure> {
            let mut set = BTreeSet::new();
            for tok in tokens {
                if let Ok(p) = sd.parse_path(tok) {
                    set.insert(p);
                } else if let Some(o) = output_path(tok) {
                    set.insert(o);
                } else {
                    return Err(rejected(format!(
                        "derivation '{}' output check for '{checked}' contains output name '{tok}', but this is not a valid output of this derivation. (Valid outputs are [{}].)",
                        sd.display(&spec.drv_path),
                        output_names.join(", ")
                    )));
                }
            }
            let mut used = if recursive {
                closure(&info.path)?.0
            } else {
                info.references.clone()
            };
            if recursive && c.ignore_self_refs {
                used.remove(&info.path);
            }
            // Every offending path is named, as Nix does.
            let bad: String = used
                .iter()
                .filter(|u| set.contains(*u) != allowed)
                .map(|u| format!("\n  {}", sd.display(u)))
                .collect();
            if bad.is_empty() {
                Ok(())
            } else {
                Err(rejected(format!(
                    "output '{}' is not allowed to refer to the following paths:{bad}",
                    sd.display(&info.path),
                )))
            }
        };
        // An absent allow-list and an empty one differ; an empty deny-list checks nothing.
        if let Some(l) = &c.allowed_references {
            check(l, true, false)?;
        }
        if let Some(l) = &c.allowed_requisites {
            check(l, true, true)?;
        }
        if !c.disallowed_references.is_empty() {
            check(&c.disallowed_references, false, false)?;
        }
        if !c.disallowed_requisites.is_empty() {
            check(&c.disallowed_requisites, false, true)?;
        }
    }
    Ok(())
}

/// The content hash of the output tree at `actual` as `method` ingests it (see
/// `kiln_store::content_hash`), modulo `modulo`; `None` for a flat output that is not a
/// non-executable regular file, which each caller refuses in Nix's words for its case.
pub(super) fn output_hash(
    actual: &Path,
    method: FileIngestionMethod,
    algo: HashAlgo,
    modulo: &str,
) -> Result<Option<kiln_format::hash::Hash>, Failure> {
    let got = kiln_store::content_hash::content_hash(actual, method, algo, modulo, false).map_err(
        |e| match e {
            // A tree Git cannot hash is the output's fault; other errors are the daemon's.
            kiln_store::Error::Format(e) if method == FileIngestionMethod::Git => {
                rejected(e.to_string())
            }
            e => Failure::misc(e),
        },
    )?;
    Ok(got.ok().map(|h| h.hash))
}
