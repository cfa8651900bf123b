//! Binary caches from the command line: `kiln copy`, `kiln serve`, `kiln key generate`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kiln_build::{BuildMode, BuildSettings, Target};
use kiln_format::signature::SecretKey;
use kiln_substitute::serve::{ServeOptions, Server};
use kiln_substitute::write::{copy_to, WriteOptions};

use super::build::{json_line, parse_store_path, realise, Reporter};
use super::common::StoreArgs;

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Write the closures of PATHS into this cache (`file:///dir`, `http://…`).
    #[arg(
        long,
        value_name = "URL",
        conflicts_with = "from",
        required_unless_present = "from"
    )]
    to: Option<String>,
    /// Substitute PATHS (and their closures) from this cache into the store.
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    /// Store paths.
    #[arg(required = true)]
    paths: Vec<String>,
    /// With --to: compression of the NARs (xz, zstd, bzip2, br, gzip, none).
    #[arg(long, default_value = "xz")]
    compression: String,
    /// With --to: compression level (the method's own scale).
    #[arg(long)]
    compression_level: Option<i32>,
    /// With --to: sign the narinfo files with this secret key (repeatable); the
    /// `secret-key-files` setting is used too.
    #[arg(long, value_name = "FILE")]
    secret_key_file: Vec<PathBuf>,
    /// With --from: accept paths without a trusted signature.
    #[arg(long)]
    no_check_sigs: bool,
    /// With --to: paths compressed at once (default: the number of CPUs).
    #[arg(long, short = 'j')]
    jobs: Option<usize>,
    /// Print one JSON object per line on standard output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
    listen: String,
    /// Sign narinfo files with this secret key (repeatable).
    #[arg(long, value_name = "FILE")]
    secret_key_file: Vec<PathBuf>,
    /// Compress NARs on the fly (none, zstd, xz, bzip2, br, gzip). `none` lets clients
    /// resume downloads.
    #[arg(long, default_value = "none")]
    compression: String,
    /// Priority announced in nix-cache-info (lower is preferred).
    #[arg(long, default_value_t = 30)]
    priority: u64,
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Make an ed25519 key pair for signing caches (as `nix-store
    /// --generate-binary-cache-key NAME SECRET PUBLIC`).
    Generate {
        /// The key's name, usually the cache's host name followed by `-1`.
        name: String,
        /// Where to write the secret key (mode 0600).
        #[arg(long, value_name = "FILE")]
        secret_key_file: PathBuf,
        /// Where to write the public key (`name:base64`, for `trusted-public-keys`).
        #[arg(long, value_name = "FILE")]
        public_key_file: PathBuf,
    },
}

fn read_keys(files: &[PathBuf]) -> anyhow::Result<Vec<SecretKey>> {
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading secret key '{}'", f.display()))?;
            SecretKey::parse(text.trim()).with_context(|| format!("secret key '{}'", f.display()))
        })
        .collect()
}

pub fn copy(args: &StoreArgs, c: CopyArgs) -> anyhow::Result<ExitCode> {
    let (store, mut settings) = args.open()?;
    let store = Arc::new(store);
    let paths = c
        .paths
        .iter()
        .map(|p| parse_store_path(&store, p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(url) = &c.to {
        let mut key_files = c.secret_key_file.clone();
        key_files.extend(
            settings
                .get_list("secret-key-files")
                .iter()
                .map(PathBuf::from),
        );
        let opts = WriteOptions {
            compression: c.compression.clone(),
            level: c.compression_level,
            keys: read_keys(&key_files)?,
            jobs: c
                .jobs
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        };
        let out = Mutex::new(());
        let report = |p: &kiln_format::StorePath, copied: bool| {
            let _g = out.lock();
            let abs = store.print(p);
            if c.json {
                json_line(serde_json::json!({"event": "copied", "path": abs, "new": copied}));
            } else if copied {
                eprintln!("copying path '{abs}' to '{url}'...");
            }
        };
        let stats = copy_to(&store, url, &paths, &opts, &report)?;
        if c.json {
            json_line(serde_json::json!({
                "event": "result", "copied": stats.copied, "present": stats.present,
                "narBytes": stats.nar_bytes, "fileBytes": stats.file_bytes
            }));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(url) = &c.from else {
        bail!("give --to URL or --from URL");
    };
    settings.set("substituters", url)?;
    settings.set("substitute", "true")?;
    if c.no_check_sigs {
        settings.set("require-sigs", "false")?;
    }
    let bs = BuildSettings::from_settings(&settings);
    let targets: Vec<Target> = paths.iter().cloned().map(Target::Path).collect();
    let result = realise(
        &store,
        &settings,
        bs,
        targets,
        BuildMode::Normal,
        Reporter {
            json: c.json,
            quiet: false,
            trace: false,
            out: Mutex::new(()),
            live: None,
            store_dir: store.store_dir().clone(),
        },
        None,
    )?;
    // Each failure was reported as it happened.
    let failed: BTreeSet<String> = result
        .results
        .iter()
        .filter(|(_, r)| !r.success())
        .map(|(t, _)| store.print(t.path()))
        .collect();
    if c.json {
        json_line(
            serde_json::json!({"event": "result", "exit": result.exit_code(), "failed": failed}),
        );
    }
    if !failed.is_empty() {
        if !c.json {
            let names: Vec<String> = failed.iter().map(|f| format!("'{f}'")).collect();
            eprintln!("error: cannot copy {} from '{url}'", names.join(", "));
        }
        return Ok(ExitCode::from(result.exit_code()));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn serve(args: &StoreArgs, s: ServeArgs) -> anyhow::Result<ExitCode> {
    let (store, _) = args.open()?;
    let opts = ServeOptions {
        compression: s.compression,
        keys: read_keys(&s.secret_key_file)?,
        priority: s.priority,
        ..Default::default()
    };
    let server = Server::start(Arc::new(store), &s.listen, opts)?;
    eprintln!(
        "serving the store as a binary cache at http://{}/",
        server.addr
    );
    server.wait();
    Ok(ExitCode::SUCCESS)
}

pub fn key(cmd: KeyCmd) -> anyhow::Result<ExitCode> {
    let KeyCmd::Generate {
        name,
        secret_key_file,
        public_key_file,
    } = cmd;
    let key = SecretKey::generate(&name)?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Created 0600 from the start: the secret is never readable by others, not even
        // for a moment.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret_key_file)
            .with_context(|| format!("creating '{}'", secret_key_file.display()))?;
        f.write_all(key.to_string().as_bytes())?;
    }
    std::fs::write(&public_key_file, key.public().to_string())
        .with_context(|| format!("writing '{}'", public_key_file.display()))?;
    Ok(ExitCode::SUCCESS)
}
