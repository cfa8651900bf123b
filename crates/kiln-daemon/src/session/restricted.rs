//! The operations a recursive build's builder may use, as Nix's `RestrictedStore` allows
//! them: it sees only the closure of its inputs and what it added or built itself
//! ([`RecursiveBuild::is_allowed`]); everything it adds or builds is given to it
//! ([`RecursiveBuild::add_dependency`]); operations on the store as a whole (roots,
//! collection, verification, signatures, logs, realisations) are refused or do nothing.
//! It is always an untrusted client.

use std::collections::BTreeSet;
use std::sync::Arc;

use kiln_build::recursive::RecursiveBuild;
use kiln_format::realisation::DrvOutput;
use kiln_format::StorePath;
use kiln_protocol::{BuildMode, DerivedPath, OpIo, RemoteError, Reply, Request};

use super::Session;
use crate::remote;

fn unsupported(op: &str) -> RemoteError {
    remote(format!(
        "operation '{op}' is not supported in recursive Nix"
    ))
}

impl Session<'_> {
    pub(super) fn handle_restricted(
        &mut self,
        rb: &Arc<RecursiveBuild>,
        req: Request,
        io: &mut OpIo<'_>,
    ) -> Result<Reply, RemoteError> {
        let sd = self.store().store_dir().clone();
        let unknown = |what: &str, p: &StorePath| {
            remote(format!(
                "cannot {what} unknown path '{}' in recursive Nix",
                sd.display(p)
            ))
        };
        let sorted = |s: BTreeSet<StorePath>| Reply::Paths(s.into_iter().collect());
        match req {
            // What it may not see is, to it, not there.
            Request::IsValidPath(ref p) if !rb.is_allowed(p) => Ok(Reply::Bool(false)),
            Request::QueryValidPaths { paths, .. } => {
                let allowed: BTreeSet<StorePath> =
                    paths.into_iter().filter(|p| rb.is_allowed(p)).collect();
                Ok(sorted(
                    self.store().query_valid_paths(&allowed).map_err(remote)?,
                ))
            }
            Request::QueryPathInfo(p) => {
                if !rb.is_allowed(&p) {
                    if !io.proto().path_info_found_flag() {
                        return Err(remote(format!("path '{}' is not valid", sd.display(&p))));
                    }
                    return Ok(Reply::PathInfo(None));
                }
                // Censored as Nix censors it: nothing about how or when the path came to be.
                let store = self.b.store.clone();
                let cached = self.cached_path_info(&store, &p, io.proto())?;
                let info = cached.map(|c| {
                    let mut i = c.info.clone();
                    i.deriver = None;
                    i.registration_time = 0;
                    i.ultimate = false;
                    i.sigs.clear();
                    i
                });
                Ok(Reply::PathInfo(info))
            }
            Request::QueryPathHash(ref p)
            | Request::QueryReferences(ref p)
            | Request::QueryDeriver(ref p)
            | Request::QueryDerivationOutputs(ref p)
            | Request::QueryDerivationOutputNames(ref p)
            | Request::QueryDerivationOutputMap(ref p)
            | Request::ExportPath { path: ref p, .. }
                if !rb.is_allowed(p) =>
            {
                Err(unknown("query", p))
            }
            Request::QueryDeriver(_) => Ok(Reply::String(String::new())),
            Request::NarFromPath(ref p) if !rb.is_allowed(p) => Err(unknown("dump", p)),
            Request::EnsurePath(p) => {
                if !rb.is_allowed(&p) {
                    return Err(unknown("substitute", &p));
                }
                // Allowed paths are valid already.
                Ok(Reply::Int(1))
            }
            Request::QueryReferrers(_) | Request::QueryValidDerivers(_) => {
                Ok(Reply::Paths(Vec::new()))
            }
            Request::QueryAllValidPaths => Ok(sorted(
                self.store()
                    .query_valid_paths(&rb.allowed())
                    .map_err(remote)?,
            )),
            Request::QueryPathFromHashPart(_) => Err(unsupported("QueryPathFromHashPart")),
            // No substitutes: what it may fetch is what the build itself may.
            Request::HasSubstitutes(_) => Ok(Reply::Bool(false)),
            Request::QuerySubstitutablePaths(_) => Ok(Reply::Paths(Vec::new())),
            Request::QuerySubstitutablePathInfo(_) => Ok(Reply::SubstitutablePathInfo(None)),
            Request::QuerySubstitutablePathInfos(_) => {
                Ok(Reply::SubstitutablePathInfos(Default::default()))
            }
            Request::QueryMissing(targets) => {
                let (allowed, refused): (Vec<DerivedPath>, Vec<DerivedPath>) = targets
                    .into_iter()
                    .partition(|t| rb.is_allowed(derived_path_of(t)));
                let mut m = self.query_missing(&allowed, io)?;
                m.unknown
                    .extend(refused.iter().map(|t| derived_path_of(t).clone()));
                Ok(Reply::Missing(m))
            }
            Request::BuildPaths { ref paths, mode }
            | Request::BuildPathsWithResults { ref paths, mode } => {
                if mode != BuildMode::Normal {
                    return Err(remote("unsupported build mode"));
                }
                if let Some(p) = paths.iter().find(|t| !rb.is_allowed(derived_path_of(t))) {
                    return Err(remote(format!(
                        "cannot build '{}' in recursive Nix because path is unknown",
                        sd.display(derived_path_of(p))
                    )));
                }
                // Past Nix: a derivation's inputs must be visible to the build as well. A
                // `.drv` added with fewer references than its inputs would otherwise bring
                // the outputs of any derivation in the store into the build's closure.
                for t in paths {
                    // Derivations made by derivations (`drv^out^out`, or inputs that are
                    // their outputs): what they name as inputs is only known once made, so
                    // the check below could not see it, and a made `.drv` naming any
                    // derivation in the store would bring its outputs in. Refused here.
                    if let DerivedPath::Dynamic { .. } = t {
                        return Err(remote(format!(
                            "cannot build '{}' in recursive Nix: the outputs of derivations that derivations make cannot be built there",
                            t.to_wire(&sd)
                        )));
                    }
                    if let DerivedPath::Built { drv, .. } = t {
                        let d = self.store().read_derivation(drv).map_err(remote)?;
                        if !d.dynamic_inputs.is_empty() {
                            return Err(remote(format!(
                                "cannot build '{}' in recursive Nix: its inputs include outputs of derivations that derivations make",
                                sd.display(drv)
                            )));
                        }
                        let unseen = d
                            .input_drvs
                            .keys()
                            .chain(d.input_srcs.iter())
                            .find(|i| !rb.is_allowed(i));
                        if let Some(i) = unseen {
                            return Err(remote(format!(
                                "cannot build '{}' in recursive Nix: its input '{}' is unknown",
                                sd.display(drv),
                                sd.display(i)
                            )));
                        }
                    }
                }
                let before = self.roots.len();
                let r = self.dispatch(req, io);
                // What was built, and its closure, is the build's from now on.
                let built: Vec<StorePath> = self.roots[before..].to_vec();
                let closure = self.store().closure(&built, false).map_err(remote)?;
                for p in &closure {
                    rb.add_dependency(p).map_err(remote)?;
                }
                r
            }
            Request::AddToStore(_)
            | Request::AddTextToStore { .. }
            | Request::AddToStoreNar { .. }
            | Request::AddMultipleToStore { .. } => {
                let before = self.roots.len();
                let r = self.dispatch(req, io)?;
                let added: Vec<StorePath> = self.roots[before..].to_vec();
                self.give_added(rb, &added)?;
                Ok(r)
            }
            // Roots and collection belong to the build as a whole: nothing to do here.
            Request::AddTempRoot(_) | Request::AddIndirectRoot(_) | Request::SyncWithGc => {
                Ok(Reply::Int(1))
            }
            Request::FindRoots => Ok(Reply::Roots(Vec::new())),
            Request::CollectGarbage(_) => Ok(Reply::Gc {
                paths: Vec::new(),
                bytes_freed: 0,
            }),
            Request::OptimiseStore => Ok(Reply::Int(1)),
            Request::QueryRealisation(ref id) => {
                // A realisation of an output the build may see.
                let id = DrvOutput::parse(id).map_err(remote)?;
                match self.store().query_realisation(&id).map_err(remote)? {
                    Some(r) if rb.is_allowed(&r.out_path) => self.dispatch(req, io),
                    _ => Ok(Reply::Strings(Vec::new())),
                }
            }
            Request::VerifyStore { .. } => Err(unsupported("VerifyStore")),
            Request::AddSignatures { .. } => Err(unsupported("AddSignatures")),
            Request::AddBuildLog(_) => Err(unsupported("AddBuildLog")),
            Request::BuildDerivation { .. } => Err(unsupported("BuildDerivation")),
            // A builder is never trusted: the main dispatch refuses it as Nix does.
            req @ Request::AddPermRoot { .. } => self.dispatch(req, io),
            Request::RegisterDrvOutput { .. } | Request::RegisterBuildTrace { .. } => {
                Err(unsupported("RegisterDrvOutput"))
            }
            Request::QueryBuildTrace { .. } => match self.dispatch(req, io)? {
                // A recorded output the build may see.
                Reply::BuildTrace(Some((p, sigs))) if rb.is_allowed(&p) => {
                    Ok(Reply::BuildTrace(Some((p, sigs))))
                }
                _ => Ok(Reply::BuildTrace(None)),
            },
            Request::ImportPaths => Err(unsupported("ImportPaths")),
            // A build must not see what other builds run (their names, arguments and
            // users would leak between builds that the sandbox keeps apart).
            Request::QueryActiveBuilds => Err(unsupported("QueryActiveBuilds")),
            Request::QueryFailedPaths | Request::ClearFailedPaths(_) => {
                Err(unsupported("failed-path cache"))
            }
            // The rest is the build's own business or harmless: options, path queries of
            // allowed paths, the daemon's builtins and caches.
            req @ (Request::SetOptions(_)
            | Request::IsValidPath(_)
            | Request::QueryPathHash(_)
            | Request::QueryReferences(_)
            | Request::QueryDerivationOutputs(_)
            | Request::QueryDerivationOutputNames(_)
            | Request::QueryDerivationOutputMap(_)
            | Request::ExportPath { .. }
            | Request::NarFromPath(_)
            | Request::BuiltinBuilders
            | Request::SubstituteUrls) => self.dispatch(req, io),
        }
    }

    /// Gives the paths a client added to the build, once each one refers only to what the
    /// build may see (or to another of them): a path referring to something else would
    /// bring into the build's closure a path it was never allowed to see.
    fn give_added(&mut self, rb: &RecursiveBuild, added: &[StorePath]) -> Result<(), RemoteError> {
        let sd = self.store().store_dir().clone();
        for p in added {
            let info = self.path_info(p)?;
            if let Some(r) = info
                .references
                .iter()
                .find(|r| *r != p && !rb.is_allowed(r) && !added.contains(r))
            {
                return Err(remote(format!(
                    "cannot add '{}' in recursive Nix: it refers to '{}', which the build cannot see",
                    sd.display(p),
                    sd.display(r)
                )));
            }
        }
        for p in added {
            rb.add_dependency(p).map_err(remote)?;
        }
        Ok(())
    }
}

/// The store path a derived path names (the derivation, for a built one).
fn derived_path_of(p: &DerivedPath) -> &StorePath {
    p.root()
}
