//! kiln's local store: where build results live, compatible in place with Nix and Guix.
//!
//! * [`config`]: layouts (Guix, Nix, per-user, `--root` chroot stores) and settings.
//! * [`db`]: the SQLite database, schema-compatible with Nix (10) and Guix (7).
//! * [`LocalStore`]: queries, crash-safe adding (NAR, flat, text, import) and registration.
//! * [`lock`]: path locks and file locks both Nix (`flock`) and Guix (`fcntl`) respect.
//! * [`roots`], [`gc`]: temporary and permanent GC roots, the garbage collector.
//! * [`optimise`], [`verify`], [`export`]: hard-link deduplication, verification, and the
//!   `nix-store --export` format.
//! * [`fsutil`]: fd-anchored tree removal and canonicalisation.
//!
//! Crash safety: new contents are written under a temporary store path (itself a temp root,
//! so no concurrent collector takes it), synced, renamed into place under the path's lock,
//! and only then registered, in one transaction with its references. Killed at any point,
//! the store holds at worst invalid leftovers, which the next add of the same path or the
//! garbage collector removes.

#![forbid(unsafe_code)]

pub mod config;
pub mod content_hash;
pub mod db;
mod durability;
mod error;
pub mod export;
pub mod fsutil;
pub mod gc;
pub mod lock;
pub mod roots;
mod store;
pub mod verify;

pub use config::{Layout, LayoutSpec, Preset, Settings};
pub use durability::flush_all as flush_durability;
pub use error::{Error, Result};
pub use store::{optimise, AddOptions, DrvFiles, LocalStore, ScratchPath, StoreOptions};
