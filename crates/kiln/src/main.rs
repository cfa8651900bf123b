//! `kiln`: the command-line front end of the kiln build daemon.

#![forbid(unsafe_code)]

mod cmd;

use std::process::ExitCode;

use clap::Parser;

/// kiln: a build daemon and store for functional package managers (Guix and Nix compatible).
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
struct Cli {
    /// Log verbosity for diagnostics on stderr (overridden by KILN_LOG, e.g. `KILN_LOG=debug`).
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    store: cmd::StoreArgs,
    #[command(subcommand)]
    command: cmd::Command,
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    let r = cmd::run(&cli.store, cli.command);
    // What this process registered is made durable before it ends, whether or not its
    // store was dropped (a thread may still hold it): the next opening then has nothing
    // to check.
    let durable = kiln_store::flush_durability();
    match r {
        Ok(code) => match durable {
            Ok(()) => code,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            // Broken pipes (e.g. `kiln nar dump x | head`) end quietly, like other tools.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::from(141);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(cmd::exit_code_of(&e))
        }
    }
}
