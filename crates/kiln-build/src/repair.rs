//! Repairing a valid path whose contents are damaged or missing (`verify --repair`), as Nix
//! does: substitute it again, and if no cache has it, rebuild its deriver in repair mode.
//! Either way the new contents are checked before they replace the old ones (the
//! scheduler's repair never destroys a path before its replacement is verified).

use std::collections::BTreeSet;
use std::sync::Arc;

use kiln_format::StorePath;
use kiln_store::verify::Repairer;
use kiln_store::LocalStore;

use crate::job::BuildMode;
use crate::scheduler::{Request, Scheduler, Target};
use crate::settings::BuildSettings;

/// A [`Repairer`] that asks a scheduler.
#[derive(Debug)]
pub struct SchedulerRepairer<'a> {
    pub scheduler: &'a Scheduler,
    pub settings: Arc<BuildSettings>,
}

impl SchedulerRepairer<'_> {
    fn realise(&self, target: Target) -> Result<(), String> {
        let r = self
            .scheduler
            .build(Request {
                targets: vec![target],
                mode: BuildMode::Repair,
                settings: self.settings.clone(),
                sink: Arc::new(crate::NoEvents),
                nested: None,
            })
            .map_err(|e| e.to_string())?;
        match r.results.first() {
            Some((_, res)) if res.success() => Ok(()),
            Some((_, res)) => Err(res.error.clone()),
            None => Err("nothing was done".into()),
        }
    }
}

impl Repairer for SchedulerRepairer<'_> {
    fn repair(&self, store: &LocalStore, path: &StorePath) -> kiln_store::Result<()> {
        let substituted = self.realise(Target::Path(path.clone()));
        let Err(why) = substituted else {
            return Ok(());
        };
        let deriver = store
            .query_path_info(path)?
            .and_then(|i| i.deriver)
            .filter(|d| store.is_valid(d).unwrap_or(false));
        let Some(drv) = deriver else {
            return Err(kiln_store::Error::Invalid(format!(
                "no substituter has it ({why}) and its derivation is not in the store"
            )));
        };
        self.realise(Target::Derivation {
            drv,
            outputs: BTreeSet::new(),
        })
        .map_err(|e| {
            kiln_store::Error::Invalid(format!(
                "no substituter has it ({why}), and rebuilding it failed: {e}"
            ))
        })
    }
}
