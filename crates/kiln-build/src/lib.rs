//! kiln's build engine: realise derivations by substituting or building them.
//!
//! * [`scheduler`]: one thread owning the goal graph (derivation and substitution goals,
//!   the reference's states), shared by all requests.
//! * [`job`]: one build on its own thread: environment, builder, limits, registration.
//! * [`env`]: the builder's environment (and `passAsFile`, structured attributes,
//!   `exportReferencesGraph`).
//! * [`log`]: build logs where Nix and Guix look for them.
//! * [`rewrite`]: hash rewriting for builds that must not overwrite valid outputs.
//! * [`substituter`]: the interface substitution goals use.
//! * [`recursive`]: recursive Nix (a daemon socket inside builds), served by the daemon.

#![forbid(unsafe_code)]

pub mod attrs;
pub mod autogc;
pub mod diff;
pub mod env;
mod error;
pub mod event;
pub mod hook;
pub mod job;
pub mod log;
pub mod machines;
mod placement;
pub mod pool;
pub mod recipe;
pub mod recursive;
pub mod remote;
pub mod repair;
pub mod result;
pub mod rewrite;
pub mod sandbox;
pub mod scheduler;
pub mod settings;
pub mod substituter;
pub mod timeline;

pub use error::{Error, Result};
pub use event::{Event, EventSink, NoEvents, Phase};
pub use job::BuildMode;
pub use result::{BuildResult, BuildStatus, FailureDetail, FailureKinds};
pub use scheduler::{
    Completion, HeldRoots, Request, RequestId, RequestResult, Scheduler, SchedulerConfig, Target,
    Ticket,
};
pub use settings::{BuildSettings, LogCompression, SandboxMode};
