//! The legacy "serve" protocol (`ssh://` stores): what `nix-store --serve [--write]` speaks
//! on standard input and output, version 2.7 as Nix 2.8 – 2.34 and Lix speak it.
//!
//! The client sends `SERVE_MAGIC_1` and its version, the server answers `SERVE_MAGIC_2`
//! and its own; then commands follow, each a number and its arguments, each answered
//! without a stderr channel (the server's standard error is the log the client shows).
//! Layouts depend on the client's minor: 2.2 adds `maxLogSize` to build options, 2.3
//! `repeat` and `enforceDeterminism` and the result's times, 2.4 path infos' NAR hash,
//! content address and signatures, 2.6 built outputs, 2.7 `keepFailed`.
//!
//! Reference: Nix 2.8's `serve-protocol.hh` and `nix-store.cc` (`opServe`), Nix 2.34's
//! `serve-protocol.cc`.

use std::collections::BTreeSet;
use std::io::{self, BufRead, Write};

use kiln_format::{ContentAddress, Derivation, Hash, HashAlgo, StoreDir, StorePath, ValidPathInfo};

use crate::ops::{
    read_build_times, read_derivation_to_build, read_path_info, write_basic_derivation,
    write_build_times, write_path_info, DerivedPath, WireBuildResult,
};
use crate::version::Proto;
use crate::wire::{WireReader, WireWrite, MAX_NAME, MAX_TEXT};
use crate::Error;

/// The client's greeting.
pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
/// The server's greeting.
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// The version kiln speaks: 2.7.
pub const SERVE_VERSION: u64 = 0x207;

/// Build settings a client sends with `BuildPaths` and `BuildDerivation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeBuildOptions {
    pub max_silent_time: u64,
    pub build_timeout: u64,
    /// From 2.2.
    pub max_log_size: Option<u64>,
    /// From 2.3: extra rounds and whether they must agree.
    pub repeat: Option<(u64, bool)>,
    /// From 2.7.
    pub keep_failed: Option<bool>,
}

impl ServeBuildOptions {
    fn read<R: BufRead>(minor: u64, r: &mut WireReader<R>) -> Result<Self, Error> {
        let mut o = ServeBuildOptions {
            max_silent_time: r.u64("max silent time")?,
            build_timeout: r.u64("build timeout")?,
            ..Default::default()
        };
        if minor >= 2 {
            o.max_log_size = Some(r.u64("max log size")?);
        }
        if minor >= 3 {
            o.repeat = Some((r.u64("repeat")?, r.bool("enforce determinism")?));
        }
        if minor >= 7 {
            o.keep_failed = Some(r.bool("keep failed")?);
        }
        Ok(o)
    }

    fn write(&self, minor: u64, w: &mut impl Write) -> io::Result<()> {
        w.u64(self.max_silent_time)?;
        w.u64(self.build_timeout)?;
        if minor >= 2 {
            w.u64(self.max_log_size.unwrap_or(0))?;
        }
        if minor >= 3 {
            let (n, enforce) = self.repeat.unwrap_or((0, false));
            w.u64(n)?;
            w.bool(enforce)?;
        }
        if minor >= 7 {
            w.bool(self.keep_failed.unwrap_or(false))?;
        }
        Ok(())
    }
}

/// A command, fully read (`AddToStoreNar`'s and `ImportPaths`' data follow on the stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeCommand {
    QueryValidPaths {
        lock: bool,
        substitute: bool,
        paths: BTreeSet<StorePath>,
    },
    QueryPathInfos(BTreeSet<StorePath>),
    DumpStorePath(StorePath),
    /// An export stream (`nix-store --export`) follows.
    ImportPaths,
    ExportPaths(BTreeSet<StorePath>),
    BuildPaths {
        paths: Vec<DerivedPath>,
        options: ServeBuildOptions,
    },
    QueryClosure {
        include_outputs: bool,
        paths: BTreeSet<StorePath>,
    },
    BuildDerivation {
        drv_path: StorePath,
        drv: Derivation,
        options: ServeBuildOptions,
    },
    /// The NAR (`info.nar_size` bytes) follows.
    AddToStoreNar(ValidPathInfo),
}

impl ServeCommand {
    pub fn number(&self) -> u64 {
        match self {
            ServeCommand::QueryValidPaths { .. } => 1,
            ServeCommand::QueryPathInfos(_) => 2,
            ServeCommand::DumpStorePath(_) => 3,
            ServeCommand::ImportPaths => 4,
            ServeCommand::ExportPaths(_) => 5,
            ServeCommand::BuildPaths { .. } => 6,
            ServeCommand::QueryClosure { .. } => 7,
            ServeCommand::BuildDerivation { .. } => 8,
            ServeCommand::AddToStoreNar(_) => 9,
        }
    }

    /// Reads the next command of a client of minor `minor`; `None` at a clean end.
    pub fn read<R: BufRead>(
        minor: u64,
        sd: &StoreDir,
        r: &mut WireReader<R>,
    ) -> Result<Option<ServeCommand>, Error> {
        let Some(n) = r.u64_or_eof("serve command")? else {
            return Ok(None);
        };
        Ok(Some(match n {
            1 => ServeCommand::QueryValidPaths {
                lock: r.bool("lock")?,
                substitute: r.bool("substitute")?,
                paths: r.paths(sd, "paths")?,
            },
            2 => ServeCommand::QueryPathInfos(r.paths(sd, "paths")?),
            3 => ServeCommand::DumpStorePath(r.path(sd, "path")?),
            4 => ServeCommand::ImportPaths,
            5 => {
                r.u64("obsolete")?;
                ServeCommand::ExportPaths(r.paths(sd, "paths")?)
            }
            6 => ServeCommand::BuildPaths {
                paths: r.list("paths", |r| {
                    let s = r.string(MAX_NAME, "path")?;
                    DerivedPath::parse_legacy(sd, &s).map_err(|e| r.invalid(e.to_string()))
                })?,
                options: ServeBuildOptions::read(minor, r)?,
            },
            7 => ServeCommand::QueryClosure {
                include_outputs: r.bool("include outputs")?,
                paths: r.paths(sd, "paths")?,
            },
            8 => {
                let (drv_path, drv) = read_derivation_to_build(sd, r)?;
                ServeCommand::BuildDerivation {
                    drv_path,
                    drv,
                    options: ServeBuildOptions::read(minor, r)?,
                }
            }
            9 => {
                // A path info in the worker protocol's own layout (with ultimate,
                // signatures and content address); the NAR follows.
                let info = read_path_info(path_info_layout(), sd, None, r)?;
                if info.nar_size == 0 {
                    return Err(r.invalid("narInfo is too old and missing the narSize field"));
                }
                ServeCommand::AddToStoreNar(info)
            }
            n => return Err(r.invalid(format!("unknown serve command {n}"))),
        }))
    }

    /// Writes the command as a client of minor `minor` does (its data is the caller's).
    pub fn write(&self, minor: u64, sd: &StoreDir, w: &mut impl Write) -> io::Result<()> {
        w.u64(self.number())?;
        match self {
            ServeCommand::QueryValidPaths {
                lock,
                substitute,
                paths,
            } => {
                w.bool(*lock)?;
                w.bool(*substitute)?;
                w.paths(sd, paths)?;
            }
            ServeCommand::QueryPathInfos(paths) => w.paths(sd, paths)?,
            ServeCommand::DumpStorePath(p) => w.path(sd, p)?,
            ServeCommand::ImportPaths => {}
            ServeCommand::ExportPaths(paths) => {
                w.u64(0)?;
                w.paths(sd, paths)?;
            }
            ServeCommand::BuildPaths { paths, options } => {
                w.u64(paths.len() as u64)?;
                for p in paths {
                    w.str(&legacy(sd, p))?;
                }
                options.write(minor, w)?;
            }
            ServeCommand::QueryClosure {
                include_outputs,
                paths,
            } => {
                w.bool(*include_outputs)?;
                w.paths(sd, paths)?;
            }
            ServeCommand::BuildDerivation {
                drv_path,
                drv,
                options,
            } => {
                w.path(sd, drv_path)?;
                write_basic_derivation(sd, drv, w)?;
                options.write(minor, w)?;
            }
            ServeCommand::AddToStoreNar(info) => {
                write_path_info(path_info_layout(), sd, info, true, w)?
            }
        }
        Ok(())
    }
}

/// `AddToStoreNar` carries a `ValidPathInfo` laid out as the worker protocol (≥ 1.16) lays
/// it out.
fn path_info_layout() -> Proto {
    Proto::nix(crate::version::NIX_VERSION)
}

/// `path` or `drv!out1,out2` (all outputs: the bare `.drv`), as the serve protocol names
/// what to build.
fn legacy(sd: &StoreDir, p: &DerivedPath) -> String {
    match p {
        DerivedPath::Opaque(p) => sd.display(p),
        DerivedPath::Built {
            drv,
            outputs: crate::ops::OutputSpec::All,
        } => sd.display(drv),
        DerivedPath::Built {
            drv,
            outputs: crate::ops::OutputSpec::Names(n),
        } => format!(
            "{}!{}",
            sd.display(drv),
            n.iter().cloned().collect::<Vec<_>>().join(",")
        ),
        // The serve protocol has no form for it: never sent there (the remote flow sends
        // only what it resolved).
        DerivedPath::Dynamic { .. } => p.to_wire(sd),
    }
}

/// The answer to `QueryPathInfos`: for each valid path its info (downloadSize = narSize;
/// from 2.4 the NAR hash as `sha256:<base32>`, the content address and signatures), then
/// an empty string.
pub fn write_path_infos(
    minor: u64,
    sd: &StoreDir,
    infos: &[ValidPathInfo],
    w: &mut impl Write,
) -> io::Result<()> {
    for info in infos {
        w.path(sd, &info.path)?;
        w.opt_path(sd, info.deriver.as_ref())?;
        w.paths(sd, &info.references)?;
        w.u64(info.nar_size)?;
        w.u64(info.nar_size)?;
        if minor >= 4 {
            w.str(&info.nar_hash.to_string())?;
            w.str(&info.ca.map(|c| c.to_string()).unwrap_or_default())?;
            w.strs(info.sigs.iter().map(String::as_str))?;
        }
    }
    w.str("")
}

/// Reads what [`write_path_infos`] writes.
pub fn read_path_infos<R: BufRead>(
    minor: u64,
    sd: &StoreDir,
    r: &mut WireReader<R>,
) -> Result<Vec<ValidPathInfo>, Error> {
    let mut out = Vec::new();
    loop {
        let p = r.string(MAX_NAME, "path")?;
        if p.is_empty() {
            return Ok(out);
        }
        if out.len() >= crate::wire::MAX_ITEMS {
            return Err(r.invalid("too many path infos"));
        }
        let path = sd.parse_path(&p).map_err(|e| r.invalid(e.to_string()))?;
        let deriver = r.opt_path(sd, "deriver")?;
        let references = r.paths(sd, "references")?;
        let _download = r.u64("download size")?;
        let nar_size = r.u64("NAR size")?;
        let mut info = ValidPathInfo::new(path, Hash::sha256(b""), nar_size);
        info.deriver = deriver;
        info.references = references;
        if minor >= 4 {
            let h = r.string(MAX_NAME, "NAR hash")?;
            info.nar_hash = Hash::parse_any(&h, Some(HashAlgo::Sha256))
                .map_err(|e| r.invalid(e.to_string()))?;
            let ca = r.string(MAX_NAME, "content address")?;
            if !ca.is_empty() {
                info.ca = Some(ContentAddress::parse(&ca).map_err(|e| r.invalid(e.to_string()))?);
            }
            info.sigs = r.strings("signatures")?.into_iter().collect();
        }
        out.push(info);
    }
}

/// The answer to `BuildDerivation`: status and error, from 2.3 the times, then the built
/// outputs (`id` → realisation JSON; Nix 2.8 writes them to every client, whatever its
/// minor, through a misplaced parenthesis, and clients at 2.6 and later read them).
pub fn write_build_result(minor: u64, r: &WireBuildResult, w: &mut dyn Write) -> io::Result<()> {
    w.u64(r.status)?;
    w.str(&r.error_msg)?;
    if minor >= 3 {
        write_build_times(r, w)?;
    }
    if minor >= 6 {
        crate::ops::write_built_outputs(&r.built_outputs, w)?;
    }
    Ok(())
}

/// Reads what [`write_build_result`] writes.
pub fn read_build_result<R: BufRead>(
    minor: u64,
    r: &mut WireReader<R>,
) -> Result<WireBuildResult, Error> {
    let mut b = WireBuildResult {
        status: r.u64("status")?,
        error_msg: r.string(MAX_TEXT, "error")?,
        ..Default::default()
    };
    if minor >= 3 {
        read_build_times(&mut b, r)?;
    }
    if minor >= 6 {
        b.built_outputs = crate::ops::read_built_outputs(r)?;
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    fn p(name: &str) -> StorePath {
        let h = Hash::sha256(name.as_bytes());
        StorePath::from_parts(&h.compress(20), name).unwrap()
    }

    #[test]
    fn commands_round_trip_at_each_minor() {
        let mut info = ValidPathInfo::new(p("n"), Hash::sha256(b"nar"), 1234);
        info.deriver = Some(p("n.drv"));
        info.references = [p("a")].into();
        info.ultimate = true;
        info.sigs = ["k:c2ln".to_string()].into();
        for minor in [0u64, 2, 3, 4, 5, 6, 7] {
            let options = ServeBuildOptions {
                max_silent_time: 5,
                build_timeout: 6,
                max_log_size: (minor >= 2).then_some(7),
                repeat: (minor >= 3).then_some((1, true)),
                keep_failed: (minor >= 7).then_some(true),
            };
            let cmds = vec![
                ServeCommand::QueryValidPaths {
                    lock: true,
                    substitute: false,
                    paths: [p("a"), p("b")].into(),
                },
                ServeCommand::QueryPathInfos([p("a")].into()),
                ServeCommand::DumpStorePath(p("a")),
                ServeCommand::ImportPaths,
                ServeCommand::ExportPaths([p("a")].into()),
                ServeCommand::BuildPaths {
                    paths: vec![DerivedPath::Opaque(p("a"))],
                    options: options.clone(),
                },
                ServeCommand::QueryClosure {
                    include_outputs: true,
                    paths: [p("a")].into(),
                },
                ServeCommand::AddToStoreNar(info.clone()),
            ];
            for c in cmds {
                let mut b = Vec::new();
                c.write(minor, &sd(), &mut b).unwrap();
                let mut r = WireReader::new(BufReader::new(b.as_slice()));
                let back = ServeCommand::read(minor, &sd(), &mut r).unwrap().unwrap();
                assert_eq!(back, c, "2.{minor}");
                assert_eq!(r.position() as usize, b.len());
            }
            let mut b = Vec::new();
            write_path_infos(minor, &sd(), std::slice::from_ref(&info), &mut b).unwrap();
            let back = read_path_infos(
                minor,
                &sd(),
                &mut WireReader::new(BufReader::new(b.as_slice())),
            )
            .unwrap();
            assert_eq!(back[0].references, info.references);
            if minor >= 4 {
                assert_eq!(back[0].nar_hash, info.nar_hash);
                assert_eq!(back[0].sigs, info.sigs);
            }
        }
    }

    #[test]
    fn bad_commands_are_refused_by_name() {
        let b = 99u64.to_le_bytes();
        let e =
            ServeCommand::read(7, &sd(), &mut WireReader::new(BufReader::new(&b[..]))).unwrap_err();
        assert!(e.to_string().contains("unknown serve command 99"), "{e}");
        // A NAR of no size (a very old client) is refused before anything is read.
        let info = ValidPathInfo::new(p("n"), Hash::sha256(b"nar"), 0);
        let mut b = Vec::new();
        ServeCommand::AddToStoreNar(info)
            .write(7, &sd(), &mut b)
            .unwrap();
        let e = ServeCommand::read(7, &sd(), &mut WireReader::new(BufReader::new(b.as_slice())))
            .unwrap_err();
        assert!(e.to_string().contains("missing the narSize"), "{e}");
    }
}
