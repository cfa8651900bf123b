//! Ingestion: adding paths from archives, dumps, text and the file system, and imports.
//! Content goes to a temporary store path, is checked, then moved into place and
//! registered.

use super::*;

impl LocalStore {
    /// Moves a filled temporary path to `final_path` and registers it, unless someone made
    /// it valid meanwhile. With `repair`, a valid path is replaced atomically.
    ///
    /// Every `add_*` method leaves exactly one temp root on the path it returns, owned by the
    /// caller (a daemon session releases it with `remove_temp_root` when the client leaves;
    /// a command-line process keeps it until it exits).
    pub(super) fn install(
        &self,
        mut tmp: ScratchPath<'_>,
        info: ValidPathInfo,
        opts: AddOptions,
    ) -> Result<ValidPathInfo> {
        let final_real = self.real_path(&info.path);
        self.add_temp_root(&info.path)?;
        let mut lock = if opts.caller_holds_lock {
            None
        } else {
            Some(
                self.lock_path(&info.path, true)?
                    .ok_or_else(|| Error::Corrupt("blocking lock returned nothing".into()))?,
            )
        };
        let valid = self.is_valid(&info.path)?;
        if valid && !opts.repair {
            if let Some(l) = lock.as_mut() {
                l.set_delete(true);
            }
            return self.path_info(&info.path);
        }
        if valid && std::fs::symlink_metadata(&final_real).is_err() {
            // Repair of a path that is gone (valid in the database, missing on disk): the
            // verified contents move into place; nothing is there to swap with.
            rustix::fs::renameat_with(
                &self.store_fd,
                tmp.path.base_name(),
                &self.store_fd,
                info.path.base_name(),
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .map_err(|e| Error::io(&final_real, "move into place", e))?;
            tmp.armed = false;
        } else if valid {
            // Repair: the new contents are verified; swap them in atomically, then drop the old.
            rustix::fs::renameat_with(
                &self.store_fd,
                tmp.path.base_name(),
                &self.store_fd,
                info.path.base_name(),
                rustix::fs::RenameFlags::EXCHANGE,
            )
            .map_err(|e| Error::io(&final_real, "replace", e))?;
        } else {
            // Leftover of a crashed or failed attempt: it was never valid, remove it.
            if std::fs::symlink_metadata(&final_real).is_ok() {
                tracing::info!("removing invalid path '{}'", self.print(&info.path));
                fsutil::remove_tree(&final_real)?;
            }
            std::fs::rename(&tmp.real, &final_real)
                .map_err(|e| Error::io(&final_real, "move into place", e))?;
            tmp.armed = false;
        }
        self.register_valid_paths(std::slice::from_ref(&info))?;
        if let Some(l) = lock.as_mut() {
            l.set_delete(true);
        }
        drop(lock);
        drop(tmp);
        Ok(info)
    }

    /// Adds a path whose NAR arrives on `nar`, checking its hash and size against `info`
    /// (and its content address, if any) before it becomes valid. The whole archive is read
    /// even when the path is already valid (protocol streams carry it).
    pub fn add_nar(
        &self,
        info: &ValidPathInfo,
        nar: &mut dyn Read,
        opts: AddOptions,
    ) -> Result<ValidPathInfo> {
        self.add_nar_checked(info, nar, opts, &mut |_| Ok(()))
    }

    /// [`LocalStore::add_nar`] with one more check before the path becomes valid:
    /// `before_install` gets the stream after the archive (a substituter reads it to its
    /// end and compares the compressed file's hash with the narinfo's `FileHash`); an
    /// error leaves nothing behind.
    pub fn add_nar_checked(
        &self,
        info: &ValidPathInfo,
        nar: &mut dyn Read,
        opts: AddOptions,
        before_install: &mut dyn FnMut(&mut dyn Read) -> Result<()>,
    ) -> Result<ValidPathInfo> {
        let sd = self.store_dir();
        if info.nar_hash.algo() != HashAlgo::Sha256 {
            return Err(Error::Invalid(format!(
                "NAR hash of '{}' must be sha256",
                sd.display(&info.path)
            )));
        }
        info.check_content_address(sd)?;
        if !opts.repair {
            self.add_temp_root(&info.path)?;
            if self.is_valid(&info.path)? {
                nar::parse(nar, &mut (), nar::Limits::default())?;
                return self.path_info(&info.path);
            }
            self.remove_temp_root(&info.path);
        }
        let tmp = self.temp_path(info.path.name())?;
        let mut r = HashingReader::new(&mut *nar, HashAlgo::Sha256);
        nar::restore_into(
            &tmp.real,
            &mut r,
            RestoreOptions {
                canonical: true,
                ..Default::default()
            },
        )
        .map_err(|e| Error::Adding {
            path: sd.display(&info.path),
            source: Box::new(e.into()),
        })?;
        let (hash, size) = r.finish();
        check_nar(sd, info, hash, size)?;
        self.check_contents_match_ca(info, &tmp.real, hash)?;
        before_install(nar)?;
        let mut info = info.clone();
        info.nar_size = size;
        self.install(tmp, info, opts)
    }

    /// Adds a tree something else wrote into a scratch path (an external substituter):
    /// its metadata is made canonical, its NAR hash (of any algorithm) and size (unless 0)
    /// must be `info`'s, and its contents its content address if it has one, before it is
    /// moved into place and registered with its SHA-256 NAR hash.
    /// An error leaves nothing behind.
    pub fn add_restored(
        &self,
        tmp: ScratchPath<'_>,
        info: &ValidPathInfo,
        opts: AddOptions,
    ) -> Result<ValidPathInfo> {
        let sd = self.store_dir();
        info.check_content_address(sd)?;
        if std::fs::symlink_metadata(&tmp.real).is_err() {
            return Err(Error::Invalid(format!(
                "nothing was written to '{}' for '{}'",
                tmp.real.display(),
                sd.display(&info.path)
            )));
        }
        if let Some(p) = fsutil::hard_link_out_of(&tmp.real)? {
            return Err(Error::Invalid(format!(
                "'{}' for '{}' is a hard link to a file outside it",
                p.display(),
                sd.display(&info.path)
            )));
        }
        fsutil::canonicalise(
            &tmp.real,
            fsutil::Ownership {
                expected_uid: None,
                target: (
                    rustix::process::geteuid().as_raw(),
                    rustix::process::getegid().as_raw(),
                ),
            },
        )?;
        let (hash, size) = nar_hash_of(&tmp.real, HashAlgo::Sha256)?;
        // The expected hash may be of another algorithm (the database keeps SHA-256).
        let got = match info.nar_hash.algo() {
            HashAlgo::Sha256 => hash,
            algo => nar_hash_of(&tmp.real, algo)?.0,
        };
        check_nar(sd, info, got, size)?;
        self.check_contents_match_ca(info, &tmp.real, hash)?;
        let mut info = info.clone();
        info.nar_hash = hash;
        info.nar_size = size;
        self.install(tmp, info, opts)
    }

    /// A content address is a claim about the contents, not only about the path name: a
    /// source that pairs one path's CA with another path's contents (its NAR hash matching
    /// those contents) must not make the wrong contents valid under the claimed path.
    pub(super) fn check_contents_match_ca(
        &self,
        info: &ValidPathInfo,
        real: &Path,
        nar_hash: Hash,
    ) -> Result<()> {
        let Some(ca) = &info.ca else {
            return Ok(());
        };
        let sd = self.store_dir();
        let (method, want) = match ca {
            ContentAddress::Text(h) => (FileIngestionMethod::Flat, h),
            ContentAddress::Fixed(m, h) => (*m, h),
        };
        // A fixed content address is a hash *modulo* the path's own hash part (Nix's
        // `hashCAPath`): a floating content-addressed output refers to itself, and its hash
        // was taken with those self-references zeroed. Without a self-reference the NAR
        // hash is that hash already.
        let modulo = matches!(ca, ContentAddress::Fixed(..)).then(|| info.path.hash_part());
        let self_ref = info.references.contains(&info.path);
        // Nix ≥ 2.17 no longer hashes the self-references' positions (see
        // `HashModuloSink::finish_both`): a path made content-addressed by today's Nix
        // (`nix store make-content-addressed`, its floating outputs) has the other hash.
        // Either is the content's: the two inputs cannot be confused (a NAR ends in a NUL
        // byte, the positions in a digit).
        if method == FileIngestionMethod::Recursive && want.algo() == HashAlgo::Sha256 && !self_ref
        {
            if &nar_hash != want {
                return Err(ca_mismatch(sd, info, want, &nar_hash));
            }
            return Ok(());
        }
        let got = crate::content_hash::content_hash(
            real,
            method,
            want.algo(),
            modulo.unwrap_or_default(),
            true,
        )?
        .map_err(|n| {
            Error::Invalid(match n {
                crate::content_hash::NotFlat::Symlink => format!(
                    "'{}' claims a flat content address but is a symlink",
                    sd.display(&info.path)
                ),
                crate::content_hash::NotFlat::NotRegular
                | crate::content_hash::NotFlat::Executable => format!(
                    "'{}' claims a flat content address but is not a regular file",
                    sd.display(&info.path)
                ),
            })
        })?;
        if &got.hash != want && &got.without_positions != want {
            return Err(ca_mismatch(sd, info, want, &got.hash));
        }
        Ok(())
    }

    /// Adds content-addressed data (`addToStoreFromDump`): `data` is a NAR for recursive
    /// and Git ingestion or the file's bytes for flat ingestion; the path follows from its
    /// hash.
    pub fn add_from_dump(
        &self,
        name: &str,
        method: FileIngestionMethod,
        algo: HashAlgo,
        data: &mut dyn Read,
        references: &BTreeSet<StorePath>,
        opts: AddOptions,
    ) -> Result<ValidPathInfo> {
        kiln_format::store_path::check_name(name, name)?;
        let tmp = self.temp_path(name)?;
        let (ca_hash, nar_hash, nar_size) = match method {
            FileIngestionMethod::Recursive | FileIngestionMethod::Git => {
                let git = method == FileIngestionMethod::Git;
                if git {
                    kiln_format::git::check_algo(algo)?;
                }
                // One pass: restore, NAR-hash (sha256) and CA-hash (the requested algorithm;
                // Git's is of the tree as restored, its objects, not the NAR's bytes).
                let mut tee = TeeHash {
                    inner: data,
                    extra: (!git && algo != HashAlgo::Sha256).then(|| Hasher::new(algo)),
                };
                let mut r = HashingReader::new(&mut tee, HashAlgo::Sha256);
                nar::restore_into(
                    &tmp.real,
                    &mut r,
                    RestoreOptions {
                        canonical: true,
                        ..Default::default()
                    },
                )?;
                let (nar_hash, nar_size) = r.finish();
                let ca = match tee.extra.take() {
                    _ if git => kiln_format::git::hash_path(&tmp.real, algo)?,
                    Some(h) => h.finish(),
                    None => nar_hash,
                };
                (ca, nar_hash, nar_size)
            }
            FileIngestionMethod::Flat => {
                let f = openat(
                    CWD,
                    &tmp.real,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o444),
                )
                .map_err(|e| Error::io(&tmp.real, "create", e))?;
                let mut f = std::fs::File::from(f);
                let mut h = Hasher::new(algo);
                let mut size = 0u64;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = match data.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(Error::io(&tmp.real, "read data for", e)),
                    };
                    h.update(&buf[..n]);
                    f.write_all(&buf[..n])
                        .map_err(|e| Error::io(&tmp.real, "write", e))?;
                    size += n as u64;
                }
                rustix::fs::futimens(&f, &fsutil::STORE_MTIME)
                    .map_err(|e| Error::io(&tmp.real, "set time of", e))?;
                drop(f);
                let (nar_hash, nar_size) = flat_nar_hash(&tmp.real, size)?;
                (h.finish(), nar_hash, nar_size)
            }
        };
        let ca = ContentAddress::Fixed(method, ca_hash);
        let path = self.store_dir().ca_path(name, &ca, references, false)?;
        let mut info = ValidPathInfo::new(path, nar_hash, nar_size);
        info.references = references.clone();
        info.ca = Some(ca);
        self.install(tmp, info, opts)
    }

    /// Adds a text file (`addTextToStore`), e.g. a `.drv`.
    pub fn add_text(
        &self,
        name: &str,
        text: &[u8],
        references: &BTreeSet<StorePath>,
        opts: AddOptions,
    ) -> Result<ValidPathInfo> {
        let sd = self.store_dir();
        let path = sd.text_path_for(name, text, references)?;
        if !opts.repair {
            self.add_temp_root(&path)?;
            if self.is_valid(&path)? {
                return self.path_info(&path);
            }
            self.remove_temp_root(&path);
        }
        let tmp = self.temp_path(name)?;
        let f = openat(
            CWD,
            &tmp.real,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        )
        .map_err(|e| Error::io(&tmp.real, "create", e))?;
        let mut f = std::fs::File::from(f);
        f.write_all(text)
            .map_err(|e| Error::io(&tmp.real, "write", e))?;
        rustix::fs::futimens(&f, &fsutil::STORE_MTIME)
            .map_err(|e| Error::io(&tmp.real, "set time of", e))?;
        drop(f);
        let mut nar = HashSink::new(HashAlgo::Sha256);
        let mut w = nar::NarWriter::new(&mut nar).map_err(|e| Error::io(&tmp.real, "hash", e))?;
        w.file(false, text)
            .map_err(|e| Error::io(&tmp.real, "hash", e))?;
        let (nar_hash, nar_size) = nar.finish();
        let mut info = ValidPathInfo::new(path, nar_hash, nar_size);
        info.references = references.clone();
        info.ca = Some(ContentAddress::Text(Hash::sha256(text)));
        self.install(tmp, info, opts)
    }

    /// Adds a file or tree from the file system (`nix-store --add`, `--add-fixed`).
    pub fn add_path(
        &self,
        src: &Path,
        name: &str,
        method: FileIngestionMethod,
        algo: HashAlgo,
    ) -> Result<ValidPathInfo> {
        match method {
            FileIngestionMethod::Flat => {
                let meta = std::fs::symlink_metadata(src).map_err(|e| Error::io(src, "stat", e))?;
                if !meta.is_file() {
                    return Err(Error::Invalid(format!(
                        "'{}' is not a regular file; flat hashing needs one",
                        src.display()
                    )));
                }
                let mut f = std::fs::File::open(src).map_err(|e| Error::io(src, "open", e))?;
                self.add_from_dump(
                    name,
                    method,
                    algo,
                    &mut f,
                    &BTreeSet::new(),
                    AddOptions::default(),
                )
            }
            FileIngestionMethod::Recursive | FileIngestionMethod::Git => {
                let (mut reader, writer) =
                    std::io::pipe().map_err(|e| Error::io(src, "create a pipe for", e))?;
                std::thread::scope(|s| {
                    let dumper = s.spawn(move || {
                        let mut w = std::io::BufWriter::with_capacity(256 * 1024, writer);
                        nar::dump(src, &mut w)?;
                        w.flush().map_err(|e| kiln_format::Error::Io {
                            path: src.to_path_buf(),
                            action: "dump".into(),
                            source: e,
                        })
                    });
                    let added = self.add_from_dump(
                        name,
                        method,
                        algo,
                        &mut reader,
                        &BTreeSet::new(),
                        AddOptions::default(),
                    );
                    drop(reader);
                    let dumped = dumper
                        .join()
                        .map_err(|_| Error::Corrupt("dump thread panicked".into()))?;
                    match (added, dumped) {
                        (Ok(info), Ok(())) => Ok(info),
                        // The adder stopped reading (it refused the add): its reason counts,
                        // not the dumper's broken pipe.
                        (Err(e), Err(kiln_format::Error::Io { source, .. }))
                            if source.kind() == std::io::ErrorKind::BrokenPipe =>
                        {
                            Err(e)
                        }
                        // A dump error explains a truncated archive better than the parser's.
                        (_, Err(d)) => Err(d.into()),
                        (Err(e), Ok(())) => Err(e),
                    }
                })
            }
        }
    }

    /// Adds a NAR whose path is not known until it has been read (import): restores it to a
    /// temporary path and returns it with the NAR's hash and size, for [`Self::install_temp`].
    pub(crate) fn restore_temp(&self, nar: &mut dyn Read) -> Result<(TempNar<'_>, Hash, u64)> {
        let tmp = self.temp_path("kiln-import")?;
        let mut r = HashingReader::new(nar, HashAlgo::Sha256);
        nar::restore_into(
            &tmp.real,
            &mut r,
            RestoreOptions {
                canonical: true,
                ..Default::default()
            },
        )?;
        let (h, n) = r.finish();
        Ok((TempNar(tmp), h, n))
    }

    pub(crate) fn install_temp(
        &self,
        tmp: TempNar<'_>,
        info: ValidPathInfo,
    ) -> Result<ValidPathInfo> {
        self.install(tmp.0, info, AddOptions::default())
    }
}

/// The NAR hash and size found must be those `info` records (a size of 0: unknown).
pub(super) fn check_nar(sd: &StoreDir, info: &ValidPathInfo, hash: Hash, size: u64) -> Result<()> {
    if hash != info.nar_hash {
        return Err(Error::HashMismatch {
            path: sd.display(&info.path),
            expected: info.nar_hash.to_string(),
            actual: hash.to_string(),
        });
    }
    if info.nar_size != 0 && size != info.nar_size {
        return Err(Error::Invalid(format!(
            "size mismatch for '{}': expected {} bytes of NAR, got {size}",
            sd.display(&info.path),
            info.nar_size
        )));
    }
    Ok(())
}

/// The NAR hash and size of the tree at `path`.
pub(crate) fn nar_hash_of(path: &Path, algo: HashAlgo) -> Result<(Hash, u64)> {
    let mut sink = HashSink::new(algo);
    nar::dump(path, &mut sink)?;
    Ok(sink.finish())
}

/// A restored archive waiting for its final path.
pub(crate) struct TempNar<'a>(ScratchPath<'a>);

/// NAR hash and size of a regular non-executable file already written at `path`.
pub(super) fn flat_nar_hash(path: &Path, size: u64) -> Result<(Hash, u64)> {
    let mut sink = HashSink::new(HashAlgo::Sha256);
    let mut w = nar::NarWriter::new(&mut sink).map_err(|e| Error::io(path, "hash", e))?;
    w.file_start(false, size)
        .map_err(|e| Error::io(path, "hash", e))?;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    std::io::copy(&mut (&mut f).take(size), w.get_mut()).map_err(|e| Error::io(path, "read", e))?;
    w.file_end(size).map_err(|e| Error::io(path, "hash", e))?;
    Ok(sink.finish())
}

/// Feeds what passes through to an extra hasher.
pub(super) struct TeeHash<'a> {
    inner: &'a mut dyn Read,
    extra: Option<Hasher>,
}

impl Read for TeeHash<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.extra {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// A content address that the contents do not have (Nix's words).
fn ca_mismatch(sd: &StoreDir, info: &ValidPathInfo, want: &Hash, got: &Hash) -> Error {
    Error::Invalid(format!(
        "ca hash mismatch importing path '{}';\n  specified: {}\n  got:       {}",
        sd.display(&info.path),
        want,
        got
    ))
}
