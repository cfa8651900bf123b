//! `kiln __builtin NAME`: the built-in builders, run as the builder process of derivations
//! whose builder is `builtin:NAME`, so they are isolated like any other builder
//! (CVE-2024-51481 was a builtin running outside the sandbox).
//!
//! * `fetchurl` (Nix) and `download` (Guix): fetch `url` (or each of `urls`/a Guix URL list,
//!   first that works) over `http://`, `https://` (certificates verified: CVE-2024-47174) or
//!   `file://` into `$out`; `executable=1` makes it executable; `unpack=1` restores a NAR (xz-compressed if the URL ends in `.xz`).
//!   The daemon checks the fixed-output hash afterwards. Each host gets its own
//!   credentials from `netrc-file` (handed over by the daemon in `KILN_NETRC`), as Nix's
//!   builtin does, and none follow a redirect.
//! * `buildenv` (Nix): assemble a `nix-env` user environment; see [`super::buildenv`].

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::ExitCode;

use anyhow::{bail, Context};

/// URLs from `url`/`urls`: a plain URL, whitespace-separated URLs, or a Guix list such as
/// `("https://a" "https://b")`.
fn urls() -> anyhow::Result<Vec<String>> {
    let raw = std::env::var("urls")
        .or_else(|_| std::env::var("url"))
        .context("the derivation has no 'url'")?;
    let quoted: Vec<String> = raw
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    let list = if quoted.is_empty() {
        raw.trim_matches(|c| c == '(' || c == ')')
            .split_whitespace()
            .map(str::to_string)
            .collect()
    } else {
        quoted
    };
    if list.is_empty() {
        bail!("the derivation's 'url' is empty");
    }
    Ok(list)
}

fn fetch(
    url: &str,
    netrc: Option<&kiln_substitute::netrc::Netrc>,
) -> anyhow::Result<Box<dyn Read>> {
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Box::new(
            std::fs::File::open(path).with_context(|| format!("opening '{path}'"))?,
        ));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        let cfg = ureq::Agent::config_builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            // A host's credentials go to that host only: a redirect elsewhere must not
            // collect them.
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::Never)
            .build();
        let mut req = ureq::Agent::new_with_config(cfg).get(url);
        if let Some(auth) = netrc
            .zip(kiln_substitute::netrc::host_of(url))
            .and_then(|(n, host)| n.authorization(host))
        {
            req = req.header("Authorization", auth);
        }
        let resp = req.call().with_context(|| format!("downloading '{url}'"))?;
        return Ok(Box::new(resp.into_body().into_reader()));
    }
    bail!("unsupported URL scheme in '{url}'")
}

/// `MIRROR/ALGO/BASE16-HASH` for each hashed mirror the daemon passed (Nix's
/// `hashed-mirrors`), tried first for a flat fixed-output download.
fn hashed_mirror_urls() -> Vec<String> {
    let (Ok(mirrors), Ok(hash)) = (
        std::env::var("KILN_HASHED_MIRRORS"),
        std::env::var("outputHash"),
    ) else {
        return Vec::new();
    };
    if std::env::var("outputHashMode").is_ok_and(|m| m != "flat") {
        return Vec::new();
    }
    let algo = std::env::var("outputHashAlgo")
        .ok()
        .and_then(|a| a.parse::<kiln_format::HashAlgo>().ok());
    let Ok(h) = kiln_format::Hash::parse_any(&hash, algo) else {
        return Vec::new();
    };
    mirrors
        .split_whitespace()
        .map(|m| format!("{}/{}/{}", m.trim_end_matches('/'), h.algo(), h.to_base16()))
        .collect()
}

pub fn run(name: &str) -> anyhow::Result<ExitCode> {
    match name {
        "fetchurl" | "download" => {}
        "buildenv" => return super::buildenv::run(),
        "unpack-channel" => return super::unpack_channel::run(),
        other => bail!("unsupported builtin function '{other}'"),
    }
    // What it fetches is trusted only because a hash checks it afterwards (or the
    // derivation is impure, so nothing depends on its being reproducible).
    if let Ok(kind) = std::env::var("KILN_DERIVATION_KIND") {
        if kind != "fixed-output" && kind != "impure" {
            bail!("'builtin:fetchurl' must be a fixed-output or impure derivation");
        }
    }
    let out = std::env::var("out").context("the derivation has no 'out'")?;
    // `netrc-file`'s contents, from the daemon (see kiln-build's `job`).
    let netrc = std::env::var("KILN_NETRC")
        .ok()
        .map(|t| kiln_substitute::netrc::Netrc::parse(&t));
    let mut last = None;
    let mirrors = hashed_mirror_urls();
    let n_mirrors = mirrors.len();
    for (i, url) in mirrors.into_iter().chain(urls()?).enumerate() {
        let mirror = i < n_mirrors;
        if !mirror {
            eprintln!("downloading '{url}'...");
        }
        let mut r = match fetch(&url, netrc.as_ref()) {
            Ok(r) => r,
            // A mirror without the file is normal: quietly on to the next URL.
            Err(e) if mirror => {
                tracing::debug!("{e:#}");
                continue;
            }
            Err(e) => {
                eprintln!("{e:#}");
                last = Some(e);
                continue;
            }
        };
        if std::env::var("unpack").is_ok_and(|v| v == "1") {
            // As Nix's builtin: a URL ending in `.xz` is an xz-compressed NAR.
            if url.ends_with(".xz") {
                r = Box::new(xz2::read::XzDecoder::new_multi_decoder(r));
            }
            kiln_format::nar::restore(std::path::Path::new(&out), &mut r)?;
        } else {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out)
                .with_context(|| format!("creating '{out}'"))?;
            std::io::copy(&mut r, &mut f).with_context(|| format!("writing '{out}'"))?;
            f.flush()?;
            if std::env::var("executable").is_ok_and(|v| v == "1") {
                std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("nothing to download")))
}
