//! The subcommands.

mod access;
mod build;
pub mod buildenv;
mod builtin;
mod cache;
mod common;
mod config;
mod daemon;
mod drv;
mod hash;
mod live;
mod nar;
mod ps;
mod sandbox;
mod store;
mod store_path;
mod store_via_daemon;
mod timeline;
pub mod unpack_channel;
mod via_daemon;

pub use common::StoreArgs;

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with NAR archives.
    #[command(subcommand)]
    Nar(nar::NarCmd),
    /// Compute hashes of files and paths as `nix-hash` and `nix hash` do.
    #[command(subcommand)]
    Hash(hash::HashCmd),
    /// Inspect and check `.drv` files.
    #[command(subcommand)]
    Drv(drv::DrvCmd),
    /// Compute the store path an item would get, without adding it.
    #[command(subcommand, name = "store-path")]
    StorePath(store_path::StorePathCmd),
    /// Work with the local store (add, query, export/import, gc, optimise, verify).
    #[command(subcommand)]
    Store(store::StoreCmd),
    /// Build derivations, store paths or recipes; prints the output paths.
    Build(build::BuildArgs),
    /// Print the build log of a derivation (or of the derivation that built a path).
    Log(build::LogArgs),
    /// Serve the worker protocol on a Unix socket, for Nix and Guix clients.
    Daemon(daemon::DaemonArgs),
    /// Copy store paths (with their closures) to a binary cache, or substitute them from
    /// one.
    Copy(cache::CopyArgs),
    /// Serve the store as a binary cache over HTTP.
    Serve(cache::ServeArgs),
    /// Signing keys for binary caches.
    #[command(subcommand)]
    Key(cache::KeyCmd),
    /// Show the effective settings.
    #[command(subcommand)]
    Config(config::ConfigCmd),
    /// List the builds a daemon runs and queues (as `nix ps`).
    Ps(ps::PsArgs),
    /// Read build timelines (`kiln build --timeline FILE`).
    #[command(subcommand)]
    Timeline(timeline::TimelineCmd),
    /// Report the build sandbox's features on this machine (`check`).
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCmd),
    /// Run a built-in builder (used as the builder process of `builtin:*` derivations).
    #[command(name = "__builtin", hide = true)]
    Builtin { name: String },
}

pub fn run(args: &StoreArgs, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Store(c) => store::run(args, c),
        Command::Build(b) => build::build(args, b),
        Command::Daemon(d) => daemon::run(args, d),
        Command::Log(l) => build::log(args, l),
        Command::Sandbox(c) => sandbox::run(args, c),
        Command::Config(c) => config::run(args, c),
        Command::Copy(c) => cache::copy(args, c),
        Command::Serve(s) => cache::serve(args, s),
        Command::Key(k) => cache::key(k),
        Command::Timeline(c) => timeline::run(c),
        Command::Ps(p) => ps::run(args, p),
        Command::Builtin { name } => builtin::run(&name),
        Command::Nar(c) => nar::run(c),
        Command::Hash(c) => hash::run(c),
        Command::Drv(c) => drv::run(args.store_dir.clone(), c),
        Command::StorePath(c) => store_path::run(args.resolve()?.0.store_dir, c),
    }
}

/// The process exit status for an error (1 unless a command says otherwise).
pub fn exit_code_of(_e: &anyhow::Error) -> u8 {
    1
}
