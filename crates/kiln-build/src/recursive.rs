//! Recursive Nix (the experimental `recursive-nix` feature): a build that lists
//! `recursive-nix` in `requiredSystemFeatures` gets a daemon socket of its own, at
//! `$NIX_BUILD_TOP/.nix-socket` (`NIX_REMOTE` points there), through which the builder may
//! query, add and build store paths — but only see the closure of its inputs and what it
//! added or built itself, as Nix's `RestrictedStore`.
//!
//! The engine does not speak the protocol: whoever runs the scheduler (`kiln daemon`)
//! gives it a [`RecursiveServer`], which serves the socket and reports every path it lets
//! the builder have through [`RecursiveBuild::add_dependency`]. Those paths then
//! * stay alive (a temporary root each) until the build's outputs are registered;
//! * become candidates of the reference scan, so outputs may refer to them;
//! * appear inside a running sandbox, read-only (bind-mounted into its mount namespace),
//!   since the builder's view of the store holds only its inputs otherwise.

use std::collections::BTreeSet;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, PoisonError};

use kiln_format::{Derivation, StorePath};
use kiln_store::LocalStore;

use crate::settings::BuildSettings;

/// The socket's name in the build directory (Nix's).
pub const SOCKET_NAME: &str = ".nix-socket";

/// The system feature that asks for a daemon socket in the build.
pub const FEATURE: &str = "recursive-nix";

/// Serves the worker protocol to one build's builder. Dropping the returned guard stops
/// serving: the listener is shut down and every connection ended and waited for.
pub trait RecursiveServer: Send + Sync {
    fn serve(
        &self,
        listener: UnixListener,
        build: Arc<RecursiveBuild>,
    ) -> Result<Box<dyn Send>, String>;
}

/// What one recursive build may see, and what it was given.
pub struct RecursiveBuild {
    id: u64,
    store: Arc<LocalStore>,
    drv_path: StorePath,
    inputs: BTreeSet<StorePath>,
    settings: Arc<BuildSettings>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Paths added or built through the socket (each holding a temporary root).
    added: BTreeSet<StorePath>,
    /// The running sandbox, while there is one.
    sandbox: Option<SandboxView>,
}

/// A running sandbox's store: what puts paths into the host directory its builder sees as
/// the store directory, and the builder's namespaces.
pub(crate) struct SandboxView {
    pub(crate) linker: crate::sandbox::InputLinker,
    pub(crate) ns: kiln_sandbox::Namespaces,
}

impl std::fmt::Debug for RecursiveBuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecursiveBuild({})", self.drv_path)
    }
}

/// Whether `drv` asks for recursive Nix.
pub fn wanted(drv: &Derivation) -> bool {
    crate::settings::required_system_features(drv).contains(FEATURE)
}

impl RecursiveBuild {
    pub(crate) fn new(
        store: Arc<LocalStore>,
        drv_path: StorePath,
        inputs: BTreeSet<StorePath>,
        settings: Arc<BuildSettings>,
    ) -> RecursiveBuild {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        RecursiveBuild {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            store,
            drv_path,
            inputs,
            settings,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Unique in this process: nested requests name the build they come from.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The derivation being built.
    pub fn drv_path(&self) -> &StorePath {
        &self.drv_path
    }

    /// The settings of the request that started the build (nested requests build with
    /// them).
    pub fn settings(&self) -> &Arc<BuildSettings> {
        &self.settings
    }

    /// Whether the builder may see `p`: an input (or in their closure), or given to it.
    pub fn is_allowed(&self, p: &StorePath) -> bool {
        self.inputs.contains(p) || self.state().added.contains(p)
    }

    /// Everything the builder may see.
    pub fn allowed(&self) -> BTreeSet<StorePath> {
        let mut all = self.inputs.clone();
        all.extend(self.state().added.iter().cloned());
        all
    }

    /// Paths given to the builder through the socket.
    pub(crate) fn added(&self) -> Vec<StorePath> {
        self.state().added.iter().cloned().collect()
    }

    /// Lets the builder have the valid path `p`: kept alive until the build ends, a
    /// candidate of the reference scan, and mounted into its sandbox if it has one.
    pub fn add_dependency(&self, p: &StorePath) -> Result<(), String> {
        if self.inputs.contains(p) {
            return Ok(());
        }
        let mut st = self.state();
        if st.added.contains(p) {
            return Ok(());
        }
        self.store
            .add_temp_root(p)
            .map_err(|e| format!("protecting '{}': {e}", self.store.print(p)))?;
        if let Some(view) = &st.sandbox {
            if let Err(e) = crate::sandbox::materialise(&self.store, view, p) {
                self.store.remove_temp_root(p);
                return Err(e);
            }
        }
        st.added.insert(p.clone());
        Ok(())
    }

    /// The sandbox of the round now running (`None` once it has ended).
    pub(crate) fn set_sandbox(&self, view: Option<SandboxView>) {
        self.state().sandbox = view;
    }
}

impl Drop for RecursiveBuild {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        for p in &st.added {
            self.store.remove_temp_root(p);
        }
    }
}
