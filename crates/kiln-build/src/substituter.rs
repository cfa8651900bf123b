//! The interface between the scheduler's substitution goals and whatever fetches paths:
//! defined in `kiln-substitute`, whose [`kiln_substitute::Caches`] implements it for binary
//! caches.

pub use kiln_substitute::{SubstConfig, SubstitutableInfo, Substituter};
