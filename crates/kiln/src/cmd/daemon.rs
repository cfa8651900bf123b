//! `kiln daemon`: serve the worker protocol.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use kiln_daemon::{Daemon, DaemonConfig};

use super::StoreArgs;

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The socket to listen on (default: `<state-dir>/daemon-socket/socket`). With systemd
    /// socket activation (`LISTEN_FDS`), the passed socket is used instead.
    #[arg(long, env = "KILN_DAEMON_SOCKET")]
    socket: Option<PathBuf>,
    /// Serve one client on standard input and output (as `nix-daemon --stdio`, for
    /// `ssh-ng://` stores); that client is trusted.
    #[arg(long)]
    stdio: bool,
    /// Connections served at once; more wait until one ends.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (e.g. `127.0.0.1:9184`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

pub fn run(args: &StoreArgs, a: DaemonArgs) -> anyhow::Result<ExitCode> {
    let files = kiln_sandbox::raise_descriptor_limit();
    tracing::debug!("open files allowed: {files:?}");
    let (store, settings) = args.open()?;
    let layout = store.layout().clone();
    // A machines entry that cannot be used stops the daemon here, naming it.
    let machines = kiln_remote::setup(
        &settings,
        &kiln_build::BuildSettings::from_settings(&settings).system,
    )?;
    if !machines.machines.is_empty() {
        tracing::info!("{} build machines", machines.machines.len());
    }
    let daemon = Daemon::new(
        Arc::new(store),
        settings,
        DaemonConfig {
            max_connections: a.max_connections,
            ..Default::default()
        },
    );
    if let Some(addr) = &a.metrics {
        let bound = daemon.serve_metrics(addr)?;
        tracing::info!("metrics at http://{bound}/metrics");
    }
    if a.stdio {
        daemon.serve_stdio()?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut fds = listenfd::ListenFd::from_env();
    let (listener, socket) = match fds
        .take_unix_listener(0)
        .context("taking the socket passed by the service manager")?
    {
        Some(l) => (l, None),
        None => {
            let path = a.socket.unwrap_or_else(|| layout.daemon_socket_path());
            (kiln_daemon::bind_socket(&path)?, Some(path))
        }
    };
    // SIGTERM and SIGINT: kill running builders (they are in their own sessions and would
    // outlive us), remove the socket unless another daemon has taken its path over since,
    // exit.
    let placed = socket
        .as_deref()
        .and_then(kiln_format::unix_socket::identity);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    {
        let daemon = daemon.clone();
        let socket = socket.clone();
        std::thread::Builder::new()
            .name("kiln-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!("signal {sig}: stopping");
                    daemon.stop();
                    if let Some(s) = socket {
                        kiln_format::unix_socket::remove_if_same(&s, placed);
                    }
                    std::process::exit(0);
                }
            })
            .context("starting the signal thread")?;
    }
    match &socket {
        Some(s) => tracing::info!(
            "kiln {} listening on {} (Nix clients see {})",
            env!("CARGO_PKG_VERSION"),
            s.display(),
            kiln_protocol::version::NIX_COMPAT_VERSION
        ),
        None => tracing::info!("listening on the socket passed by the service manager"),
    }
    daemon.run(listener)?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln store serve [--write]`: the serve protocol on standard input and output.
pub fn serve_legacy(args: &StoreArgs, write: bool) -> anyhow::Result<ExitCode> {
    let (store, settings) = args.open()?;
    let daemon = Daemon::new(Arc::new(store), settings, DaemonConfig::default());
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    daemon.serve_legacy(
        Box::new(std::io::stdin()),
        Box::new(std::io::stdout()),
        write,
        Some(stdin.as_fd()),
    )?;
    Ok(ExitCode::SUCCESS)
}
