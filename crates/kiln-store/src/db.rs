//! The SQLite metadata database, schema-compatible with Nix 2.x (version 10) and Guix
//! (version 7).
//!
//! * A new store gets Nix's schema 10, or Guix's schema 7 for the Guix layout, so the other
//!   daemon can open it. An existing database is kept at its version; Nix's 8 and 9 are
//!   upgraded to 10 exactly as Nix would.
//! * Columns Guix lacks (`ultimate`, `sigs`, `ca`) are detected and left alone.
//! * Failed builds are cached in a `FailedPaths` table: Guix's own table in a Guix database,
//!   the same table added to a Nix database (Nix ignores tables it does not know).
//! * One writer connection (write transactions are `BEGIN IMMEDIATE`, so two writers never
//!   both hold a read snapshot and then deadlock upgrading it) and a pool of reader
//!   connections; WAL lets readers run during a write. `SQLITE_BUSY` from other processes is
//!   waited out by the busy timeout and then retried.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use kiln_format::{ContentAddress, Hash, StoreDir, StorePath, ValidPathInfo};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::error::{Error, Result};

/// Nix 2.8's `schema.sql`, verbatim.
pub const NIX_SCHEMA: &str = r#"create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

-- Paths can refer to themselves, causing a tuple (N, N) in the Refs
-- table.  This causes a deletion of the corresponding row in
-- ValidPaths to cause a foreign key constraint violation (due to `on
-- delete restrict' on the `reference' column).  Therefore, explicitly
-- get rid of self-references.
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"#;

/// Guix's schema (version 7): `ValidPaths` without `ultimate`, `sigs`, `ca`, and `FailedPaths`.
pub const GUIX_SCHEMA: &str = r#"create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);

create table if not exists FailedPaths (
    path text primary key not null,
    time integer not null
);
"#;

/// Nix's `ca-specific-schema.sql` (version 3): realisations of content-addressed
/// derivations' outputs, and which realisations each one depends on.
pub const CA_SCHEMA: &str = r#"create table if not exists Realisations (
    id integer primary key autoincrement not null,
    drvPath text not null,
    outputName text not null, -- symbolic output id, usually "out"
    outputPath integer not null,
    signatures text, -- space-separated list
    foreign key (outputPath) references ValidPaths(id) on delete cascade
);

create index if not exists IndexRealisations on Realisations(drvPath, outputName);

create table if not exists RealisationsRefs (
    referrer integer not null,
    realisationReference integer,
    foreign key (referrer) references Realisations(id) on delete cascade,
    foreign key (realisationReference) references Realisations(id) on delete restrict
);

-- used by QueryRealisationReferences
create index if not exists IndexRealisationsRefs on RealisationsRefs(referrer);
-- used by cascade deletion when ValidPaths is deleted
create index if not exists IndexRealisationsRefsOnOutputPath on Realisations(outputPath);
"#;

/// What Nix 2.34's migration `20220326-ca-derivations` leaves beyond [`CA_SCHEMA`] (its
/// `ca-specific-schema.sql`), and its record of having run.
const CA_MIGRATION_2_34: &str = r#"create trigger if not exists DeleteSelfRefsViaRealisations before delete on ValidPaths
  begin
    delete from RealisationsRefs where realisationReference in (
      select id from Realisations where outputPath = old.id
    );
  end;
create index if not exists IndexRealisationsRefsRealisationReference on RealisationsRefs(realisationReference);
create table if not exists SchemaMigrations (migration text primary key not null);
insert or ignore into SchemaMigrations values ('20220326-ca-derivations');
"#;

/// The version Nix 2.8 writes to `ca-schema` once [`CA_SCHEMA`] is in place.
const CA_SCHEMA_VERSION: u32 = 3;

const FAILED_PATHS: &str = "create table if not exists FailedPaths (path text primary key not null, time integer not null);";

/// Which daemon's schema the database has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Nix schema 10 (ultimate, sigs, ca).
    Nix,
    /// Guix schema 7.
    Guix,
}

/// The schema a new database should get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSchema {
    Nix,
    Guix,
}

/// Which optional columns `ValidPaths` has.
#[derive(Debug, Clone, Copy)]
pub struct Columns {
    pub ultimate: bool,
    pub sigs: bool,
    pub ca: bool,
}

/// The open database.
#[derive(Debug)]
pub struct Db {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    pub flavor: Flavor,
    pub cols: Columns,
    pub schema_version: u32,
    /// Whether the realisations tables exist.
    realisations: bool,
    read_only: bool,
    /// Bumped by every write transaction of this process (see [`Db::generation`]).
    generation: std::sync::atomic::AtomicU64,
}

fn configure(conn: &Connection, path: &Path, writer: bool) -> Result<()> {
    let ctx = |what: &str| {
        Error::db(format!(
            "configuring database '{}' ({what})",
            path.display()
        ))
    };
    conn.busy_timeout(Duration::from_secs(60))
        .map_err(ctx("busy timeout"))?;
    conn.pragma_update(None, "foreign_keys", 1)
        .map_err(ctx("foreign keys"))?;
    conn.pragma_update(None, "synchronous", "normal")
        .map_err(ctx("synchronous"))?;
    // Statement journals (cascading deletes, triggers) in memory, not in temporary files.
    conn.pragma_update(None, "temp_store", "memory")
        .map_err(ctx("temp store"))?;
    // 64 MiB of page cache: closures and the GC graph of big stores stay in memory.
    conn.pragma_update(None, "cache_size", -65536)
        .map_err(ctx("cache size"))?;
    if writer {
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .map_err(ctx("journal mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            let _: String = conn
                .pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
                .map_err(ctx("WAL"))?;
        }
        conn.pragma_update(None, "wal_autocheckpoint", 40000)
            .map_err(ctx("autocheckpoint"))?;
    }
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

fn read_schema_file(p: &Path) -> Result<Option<u32>> {
    match std::fs::read_to_string(p) {
        Ok(s) => s.trim().parse().map(Some).map_err(|_| {
            Error::Schema(format!(
                "'{}' is corrupt: '{}' is not a schema version",
                p.display(),
                s.trim()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(p, "read", e)),
    }
}

/// Writes `contents` to `path` atomically and durably (temporary file, flushed, renamed,
/// directory flushed): a power cut leaves the old file or the new one, never an empty one.
/// (Found by the power-cut test: without the flushes, a store created just before the
/// power went had an empty `schema` file and could not be opened again.) Used for the
/// schema markers, written once per store.
pub(crate) fn write_file_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        std::io::Write::write_all(&mut f, contents).map_err(|e| Error::io(&tmp, "write", e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, "flush", e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, "replace", e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, "flush", e))?;
    }
    Ok(())
}

impl Db {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path, new_schema: NewSchema, read_only: bool) -> Result<Db> {
        let db_path = dir.join("db.sqlite");
        let schema_path = dir.join("schema");
        let mut version = read_schema_file(&schema_path)?;
        if read_only && version.is_none() {
            return Err(Error::Schema(format!(
                "no store database in '{}' (read-only mode cannot create one)",
                dir.display()
            )));
        }
        if !read_only {
            crate::fsutil::ensure_dir(dir, 0o755)?;
        }
        let flags = if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = Connection::open_with_flags(&db_path, flags)
            .map_err(Error::db(format!("opening '{}'", db_path.display())))?;
        configure(&conn, &db_path, !read_only)?;
        match version {
            None => {
                let (sql, v) = match new_schema {
                    NewSchema::Nix => (NIX_SCHEMA, 10),
                    NewSchema::Guix => (GUIX_SCHEMA, 7),
                };
                conn.execute_batch(sql).map_err(Error::db("creating the schema"))?;
                write_file_atomic(&schema_path, v.to_string().as_bytes())?;
                version = Some(v);
            }
            Some(v) if v < 7 => {
                return Err(Error::Schema(format!(
                    "the store database in '{}' has schema version {v}, from before Nix 1.0; it cannot be used",
                    dir.display()
                )))
            }
            Some(v) if v > 10 => {
                return Err(Error::Schema(format!(
                    "current store schema is version {v}, but kiln only supports versions 7 (Guix) to 10 (Nix 2.x)"
                )))
            }
            Some(v @ (8 | 9)) if !read_only => {
                // Nix's upgrades: 8 added ultimate and sigs, 9 dropped FailedPaths, 10 added ca.
                let tx = conn.unchecked_transaction().map_err(Error::db("upgrading the schema"))?;
                if v < 9 {
                    tx.execute_batch("drop table if exists FailedPaths;").map_err(Error::db("upgrading to schema 9"))?;
                }
                tx.execute_batch("alter table ValidPaths add column ca text;").map_err(Error::db("upgrading to schema 10"))?;
                tx.commit().map_err(Error::db("upgrading the schema"))?;
                write_file_atomic(&schema_path, b"10")?;
                version = Some(10);
            }
            Some(_) => {}
        }
        let cols = {
            let mut st = conn
                .prepare("pragma table_info(ValidPaths)")
                .map_err(Error::db("reading the schema"))?;
            let names: Vec<String> = st
                .query_map([], |r| r.get::<_, String>(1))
                .map_err(Error::db("reading the schema"))?
                .collect::<std::result::Result<_, _>>()
                .map_err(Error::db("reading the schema"))?;
            if names.is_empty() {
                return Err(Error::Schema(format!(
                    "'{}' has no ValidPaths table",
                    db_path.display()
                )));
            }
            Columns {
                ultimate: names.iter().any(|n| n == "ultimate"),
                sigs: names.iter().any(|n| n == "sigs"),
                ca: names.iter().any(|n| n == "ca"),
            }
        };
        if !read_only {
            conn.execute_batch(FAILED_PATHS)
                .map_err(Error::db("creating FailedPaths"))?;
        }
        // Realisations (content-addressed derivations) in Nix stores. Nix 2.8 adds these
        // tables only once `ca-derivations` is enabled; kiln always supports realisations,
        // so it adds them to every Nix store it writes, with the same `ca-schema` marker
        // (a Nix with the feature enabled then finds nothing left to migrate).
        let ca_schema = dir.join("ca-schema");
        let ca = if cols.ca {
            match read_schema_file(&ca_schema)? {
                Some(v) if v >= CA_SCHEMA_VERSION => true,
                Some(v) if v < 2 => {
                    return Err(Error::Schema(format!(
                        "'{}' has content-addressed schema version {v}, from before Nix 2.4; open the store once with Nix 2.8 to upgrade it",
                        ca_schema.display()
                    )))
                }
                _ if read_only => conn
                    .query_row(
                        "select 1 from sqlite_master where type = 'table' and name = 'Realisations'",
                        [],
                        |_| Ok(()),
                    )
                    .optional()
                    .map_err(Error::db("reading the schema"))?
                    .is_some(),
                _ => {
                    conn.execute_batch(CA_SCHEMA)
                        .map_err(Error::db("creating the realisations tables"))?;
                    write_file_atomic(&ca_schema, CA_SCHEMA_VERSION.to_string().as_bytes())?;
                    true
                }
            }
        } else {
            false
        };
        // Nix 2.34's own record of the same schema (its `SchemaMigrations`), with what it
        // added since 2.8: a trigger that breaks the loop a self-referencing
        // content-addressed output makes through its realisations (without it, collecting
        // such a path fails: "other valid paths refer to it"), and that trigger's index.
        if ca && !read_only {
            conn.execute_batch(CA_MIGRATION_2_34).map_err(Error::db(
                "migrating the realisations tables as Nix 2.34 does",
            ))?;
        }
        let version = version.unwrap_or(10);
        let flavor = if cols.ca { Flavor::Nix } else { Flavor::Guix };
        Ok(Db {
            path: db_path,
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            flavor,
            cols,
            schema_version: version,
            realisations: ca,
            read_only,
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn reader(&self) -> Result<Connection> {
        if let Some(c) = self.readers.lock().ok().and_then(|mut v| v.pop()) {
            return Ok(c);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let c = Connection::open_with_flags(&self.path, flags)
            .map_err(Error::db(format!("opening '{}'", self.path.display())))?;
        configure(&c, &self.path, false)?;
        Ok(c)
    }

    /// Runs `f` on a reader connection. Each statement sees a consistent snapshot; `f` that
    /// needs several statements to agree should use [`Db::read_tx`].
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.reader()?;
        let r = f(&conn);
        self.give_back(conn);
        r
    }

    /// Like [`Db::read`], inside one read transaction (one snapshot for all statements).
    ///
    /// Cheaper than [`Db::read`] for more than one statement: SQLite takes its locks and
    /// checks the WAL once per transaction rather than once per statement (a handful of
    /// `fcntl` and `fstat` calls). `BEGIN` and `COMMIT` are cached statements, not parsed
    /// each time.
    pub fn read_tx<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.reader()?;
        let step = |sql: &str| -> Result<()> {
            conn.prepare_cached(sql)
                .and_then(|mut st| st.execute([]))
                .map(drop)
                .map_err(|e| Error::Db {
                    context: format!("{sql} (a read)"),
                    source: e,
                })
        };
        if let Err(e) = step("BEGIN") {
            self.give_back(conn);
            return Err(e);
        }
        let r = f(&conn);
        // A read transaction has nothing to keep: COMMIT only ends it. If that fails, the
        // connection is dropped rather than reused mid-transaction.
        match step("COMMIT") {
            Ok(()) => {
                self.give_back(conn);
                r
            }
            Err(e) => r.and(Err(e)),
        }
    }

    fn give_back(&self, conn: Connection) {
        if let Ok(mut pool) = self.readers.lock() {
            if pool.len() < 32 {
                pool.push(conn);
            }
        }
    }

    /// Runs `f` in one immediate write transaction, committing on success. Retried when
    /// another process keeps the database busy past the busy timeout.
    pub fn write<T>(&self, what: &str, f: impl FnMut(&Connection) -> Result<T>) -> Result<T> {
        if self.read_only {
            return Err(Error::ReadOnly(what.to_string()));
        }
        // Bumped after the transaction, whatever its outcome: a cached answer taken before
        // it is never trusted after it.
        let r = self.write_tx(what, f);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        r
    }

    /// A number that changes whenever this process has written to the database: answers
    /// read while it stayed the same can be reused (as Nix's daemon reuses path info for a
    /// connection's lifetime; this also notices the connection's and every other client's
    /// changes made through this process).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn write_tx<T>(&self, what: &str, mut f: impl FnMut(&Connection) -> Result<T>) -> Result<T> {
        let mut conn = self
            .writer
            .lock()
            .map_err(|_| Error::Corrupt("database writer lock poisoned".into()))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
                Ok(tx) => tx,
                Err(e) if is_busy(&e) && attempt < 100 => {
                    BUSY_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 100));
                    continue;
                }
                Err(e) => {
                    return Err(Error::Db {
                        context: what.to_string(),
                        source: e,
                    })
                }
            };
            match f(&tx) {
                Ok(v) => match tx.commit() {
                    Ok(()) => return Ok(v),
                    Err(e) if is_busy(&e) && attempt < 100 => {
                        BUSY_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => {
                        return Err(Error::Db {
                            context: what.to_string(),
                            source: e,
                        })
                    }
                },
                Err(Error::Db { source, .. }) if is_busy(&source) && attempt < 100 => {
                    BUSY_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    // ---- queries (usable inside reads and writes) -------------------------------------

    pub fn path_id(conn: &Connection, path: &str) -> Result<Option<i64>> {
        conn.prepare_cached("select id from ValidPaths where path = ?")
            .and_then(|mut s| s.query_row([path], |r| r.get(0)).optional())
            .map_err(Error::db(format!("looking up '{path}'")))
    }

    pub fn is_valid(conn: &Connection, path: &str) -> Result<bool> {
        Ok(Self::path_id(conn, path)?.is_some())
    }

    /// Whether a path's row and its references come in one statement
    /// ([`Db::query_path_info`]): every column it reads exists (every schema kiln creates,
    /// and Nix's since 2.4), and the store directory `sd` holds no space (the references
    /// come back space-separated). Then no `BEGIN`/`COMMIT` is needed for one snapshot.
    pub fn path_info_in_one_statement(&self, sd: &StoreDir) -> bool {
        self.cols.ultimate && self.cols.sigs && self.cols.ca && !sd.as_str().contains(' ')
    }

    /// A valid path's info. With [`Db::path_info_in_one_statement`], one statement reads
    /// the row and its references (one snapshot, so it needs no transaction around it:
    /// profiled on 80,000 distinct-path queries through the daemon, the second statement
    /// and `BEGIN`/`COMMIT` were a quarter of the store's time); otherwise two, which the
    /// caller runs in one transaction.
    pub fn query_path_info(
        &self,
        conn: &Connection,
        sd: &StoreDir,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>> {
        let abs = sd.display(path);
        let one = self.path_info_in_one_statement(sd);
        let sql = if one {
            "select v.id, v.hash, v.registrationTime, v.deriver, v.narSize, v.ultimate, v.sigs, v.ca, \
             (select group_concat(r.path, ' ') from Refs f join ValidPaths r on f.reference = r.id \
             where f.referrer = v.id) from ValidPaths v where v.path = ?"
        } else {
            let (u, s, c) = (self.cols.ultimate, self.cols.sigs, self.cols.ca);
            &*format!(
                "select id, hash, registrationTime, deriver, narSize, {}, {}, {}, null from ValidPaths where path = ?",
                if u { "ultimate" } else { "null" },
                if s { "sigs" } else { "null" },
                if c { "ca" } else { "null" }
            )
        };
        type Row = (
            i64,
            String,
            i64,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let row: Option<Row> = conn
            .prepare_cached(sql)
            .and_then(|mut s| {
                s.query_row([&abs], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                    ))
                })
                .optional()
            })
            .map_err(|e| Error::Db {
                context: format!("querying path info of '{abs}'"),
                source: e,
            })?;
        let Some((id, hash, time, deriver, size, ultimate, sigs, ca, refs)) = row else {
            return Ok(None);
        };
        let nar_hash =
            Hash::parse_any(&hash, Some(kiln_format::HashAlgo::Sha256)).map_err(|e| {
                Error::Corrupt(format!(
                    "database entry of '{abs}' has a bad hash '{hash}': {e}"
                ))
            })?;
        let mut info = ValidPathInfo::new(path.clone(), nar_hash, size.unwrap_or(0).max(0) as u64);
        info.registration_time = time;
        info.deriver = deriver
            .filter(|d| !d.is_empty())
            .and_then(|d| sd.parse_path(&d).ok());
        info.ultimate = ultimate.unwrap_or(0) != 0;
        if let Some(s) = sigs {
            info.sigs = s.split_whitespace().map(str::to_string).collect();
        }
        info.ca = ca
            .filter(|c| !c.is_empty())
            .and_then(|c| ContentAddress::parse(&c).ok());
        // Store paths hold no spaces: the list splits back exactly.
        let refs = if one {
            refs.map(|r| r.split(' ').map(str::to_string).collect())
                .unwrap_or_default()
        } else {
            Self::references_of_id(conn, id)?
        };
        for r in refs {
            if let Ok(p) = sd.parse_path(&r) {
                info.references.insert(p);
            }
        }
        Ok(Some(info))
    }

    pub fn references_of_id(conn: &Connection, id: i64) -> Result<Vec<String>> {
        let mut st = conn
            .prepare_cached(
                "select path from Refs join ValidPaths on reference = id where referrer = ?",
            )
            .map_err(Error::db("querying references"))?;
        let rows = st
            .query_map([id], |r| r.get(0))
            .map_err(Error::db("querying references"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Error::db("querying references"))
    }

    pub fn query_referrers(conn: &Connection, path: &str) -> Result<Vec<String>> {
        let mut st = conn
            .prepare_cached(
                "select path from Refs join ValidPaths on referrer = id where reference = (select id from ValidPaths where path = ?)",
            )
            .map_err(Error::db("querying referrers"))?;
        let rows = st
            .query_map([path], |r| r.get(0))
            .map_err(Error::db("querying referrers"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Error::db("querying referrers"))
    }

    pub fn query_valid_derivers(conn: &Connection, path: &str) -> Result<Vec<String>> {
        let mut st = conn
            .prepare_cached("select v.path from DerivationOutputs d join ValidPaths v on d.drv = v.id where d.path = ?")
            .map_err(Error::db("querying derivers"))?;
        let rows = st
            .query_map([path], |r| r.get(0))
            .map_err(Error::db("querying derivers"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Error::db("querying derivers"))
    }

    /// Output name → path, from the `DerivationOutputs` table.
    pub fn query_derivation_outputs(conn: &Connection, drv: &str) -> Result<Vec<(String, String)>> {
        let mut st = conn
            .prepare_cached("select id, path from DerivationOutputs where drv = (select id from ValidPaths where path = ?)")
            .map_err(Error::db("querying derivation outputs"))?;
        let rows = st
            .query_map([drv], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(Error::db("querying derivation outputs"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Error::db("querying derivation outputs"))
    }

    pub fn query_path_from_hash_part(
        conn: &Connection,
        sd: &StoreDir,
        hash_part: &str,
    ) -> Result<Option<String>> {
        let prefix = format!("{}/{hash_part}", sd.as_str());
        let p: Option<String> = conn
            .prepare_cached("select path from ValidPaths where path >= ? limit 1")
            .and_then(|mut s| s.query_row([&prefix], |r| r.get(0)).optional())
            .map_err(Error::db("querying by hash part"))?;
        Ok(p.filter(|p| p.starts_with(&prefix) && p.as_bytes().get(prefix.len()) == Some(&b'-')))
    }

    pub fn all_valid_paths(conn: &Connection) -> Result<Vec<String>> {
        let mut st = conn
            .prepare_cached("select path from ValidPaths")
            .map_err(Error::db("listing valid paths"))?;
        let rows = st
            .query_map([], |r| r.get(0))
            .map_err(Error::db("listing valid paths"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Error::db("listing valid paths"))
    }

    /// The closure of `paths` (forward: everything they refer to; reverse: everything that
    /// refers to them), computed by SQLite in one recursive query.
    pub fn closure(conn: &Connection, paths: &[String], reverse: bool) -> Result<Vec<String>> {
        let json = serde_json::to_string(paths).map_err(|e| Error::Invalid(e.to_string()))?;
        let (from, to) = if reverse {
            ("reference", "referrer")
        } else {
            ("referrer", "reference")
        };
        let sql = format!(
            "with recursive c(id) as (
               select id from ValidPaths where path in (select value from json_each(?1))
               union
               select r.{to} from Refs r join c on r.{from} = c.id
             ) select v.path from c join ValidPaths v on v.id = c.id"
        );
        let mut st = conn
            .prepare_cached(&sql)
            .map_err(Error::db("computing a closure"))?;
        let rows = st
            .query_map([json], |r| r.get(0))
            .map_err(Error::db("computing a closure"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Error::db("computing a closure"))
    }

    /// The closure with its internal edges: `(paths, edges)` where edges are index pairs
    /// `(referrer, reference)` into `paths`. One query; nothing is parsed.
    #[allow(clippy::type_complexity)]
    pub fn closure_graph(
        conn: &Connection,
        paths: &[String],
        reverse: bool,
    ) -> Result<(Vec<String>, Vec<(usize, usize)>)> {
        let json = serde_json::to_string(paths).map_err(|e| Error::Invalid(e.to_string()))?;
        let (from, to) = if reverse {
            ("reference", "referrer")
        } else {
            ("referrer", "reference")
        };
        let sql = format!(
            "with recursive c(id) as (
               select id from ValidPaths where path in (select value from json_each(?1))
               union
               select r.{to} from Refs r join c on r.{from} = c.id
             ) select c.id, v.path, x.reference from c join ValidPaths v on v.id = c.id
               left join Refs x on x.referrer = c.id"
        );
        let ctx = || Error::db("computing a closure");
        let mut st = conn.prepare_cached(&sql).map_err(ctx())?;
        let mut rows = st.query([json]).map_err(ctx())?;
        let mut index: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
        let mut names = Vec::new();
        let mut raw_edges: Vec<(usize, i64)> = Vec::new();
        while let Some(r) = rows.next().map_err(ctx())? {
            let id: i64 = r.get(0).map_err(ctx())?;
            let i = match index.get(&id) {
                Some(&i) => i,
                None => {
                    names.push(r.get::<_, String>(1).map_err(ctx())?);
                    index.insert(id, names.len() - 1);
                    names.len() - 1
                }
            };
            if let Some(to) = r.get::<_, Option<i64>>(2).map_err(ctx())? {
                raw_edges.push((i, to));
            }
        }
        let edges = raw_edges
            .into_iter()
            .filter_map(|(a, b)| index.get(&b).map(|&b| (a, b)))
            .filter(|(a, b)| a != b)
            .collect();
        Ok((names, edges))
    }

    /// Inserts a new valid path; returns its id.
    pub fn insert_path(
        &self,
        conn: &Connection,
        sd: &StoreDir,
        info: &ValidPathInfo,
        now: i64,
    ) -> Result<i64> {
        let abs = sd.display(&info.path);
        let time = if info.registration_time == 0 {
            now
        } else {
            info.registration_time
        };
        let deriver = info.deriver.as_ref().map(|d| sd.display(d));
        let size = (info.nar_size != 0).then_some(info.nar_size as i64);
        let hash = format!("sha256:{}", info.nar_hash.to_base16());
        let c = self.cols;
        let res = if c.ultimate && c.sigs && c.ca {
            let sigs = (!info.sigs.is_empty())
                .then(|| info.sigs.iter().cloned().collect::<Vec<_>>().join(" "));
            conn.prepare_cached(
                "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) values (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    abs,
                    hash,
                    time,
                    deriver,
                    size,
                    info.ultimate.then_some(1),
                    sigs,
                    info.ca.map(|c| c.to_string())
                ])
            })
        } else {
            conn.prepare_cached("insert into ValidPaths (path, hash, registrationTime, deriver, narSize) values (?, ?, ?, ?, ?)")
                .and_then(|mut s| s.execute(params![abs, hash, time, deriver, size]))
        };
        res.map_err(Error::db(format!("registering '{abs}'")))?;
        Ok(conn.last_insert_rowid())
    }

    /// Updates the metadata of an already valid path.
    pub fn update_path(
        &self,
        conn: &Connection,
        sd: &StoreDir,
        info: &ValidPathInfo,
    ) -> Result<()> {
        let abs = sd.display(&info.path);
        let size = (info.nar_size != 0).then_some(info.nar_size as i64);
        let hash = format!("sha256:{}", info.nar_hash.to_base16());
        let c = self.cols;
        let res = if c.ultimate && c.sigs && c.ca {
            let sigs = (!info.sigs.is_empty())
                .then(|| info.sigs.iter().cloned().collect::<Vec<_>>().join(" "));
            conn.prepare_cached("update ValidPaths set narSize = ?, hash = ?, ultimate = ?, sigs = ?, ca = ? where path = ?")
                .and_then(|mut s| {
                    s.execute(params![size, hash, info.ultimate.then_some(1), sigs, info.ca.map(|c| c.to_string()), abs])
                })
        } else {
            conn.prepare_cached("update ValidPaths set narSize = ?, hash = ? where path = ?")
                .and_then(|mut s| s.execute(params![size, hash, abs]))
        };
        res.map(|_| ())
            .map_err(Error::db(format!("updating '{abs}'")))
    }

    pub fn add_reference(conn: &Connection, referrer: i64, reference: i64) -> Result<()> {
        // `or ignore` has the effect of Nix's `or replace` on this primary-key pair without
        // the statement journal a REPLACE (which may delete rows) needs.
        conn.prepare_cached("insert or ignore into Refs (referrer, reference) values (?, ?)")
            .and_then(|mut s| s.execute([referrer, reference]))
            .map(|_| ())
            .map_err(Error::db("adding a reference"))
    }

    pub fn add_derivation_output(
        conn: &Connection,
        drv: i64,
        output: &str,
        path: &str,
    ) -> Result<()> {
        conn.prepare_cached(
            "insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?)",
        )
        .and_then(|mut s| s.execute(params![drv, output, path]))
        .map(|_| ())
        .map_err(Error::db("recording a derivation output"))
    }

    /// Removes a path from the database (its outgoing references go with it; the caller
    /// ensures nothing valid refers to it).
    pub fn invalidate(conn: &Connection, path: &str) -> Result<()> {
        conn.prepare_cached("delete from ValidPaths where path = ?")
            .and_then(|mut s| s.execute([path]))
            .map(|_| ())
            .map_err(|e| match &e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Error::StillAlive(format!(
                        "cannot invalidate '{path}': other valid paths refer to it"
                    ))
                }
                _ => Error::Db {
                    context: format!("invalidating '{path}'"),
                    source: e,
                },
            })
    }

    // ---- realisations (content-addressed derivations) ---------------------------------

    /// Whether this database has the realisations tables (Nix stores).
    pub fn has_realisations(&self) -> bool {
        self.realisations
    }

    /// A realisation's row id, output path and space-separated signatures.
    pub fn query_realisation(
        conn: &Connection,
        drv_hash: &str,
        output: &str,
    ) -> Result<Option<(i64, String, String)>> {
        conn.prepare_cached(
            "select Realisations.id, Output.path, Realisations.signatures from Realisations \
             inner join ValidPaths as Output on Output.id = Realisations.outputPath \
             where drvPath = ? and outputName = ?",
        )
        .and_then(|mut s| {
            s.query_row([drv_hash, output], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                ))
            })
            .optional()
        })
        .map_err(Error::db("querying a realisation"))
    }

    /// The realisations (`drvPath`, `outputName`) the realisation with row id `id` depends on.
    pub fn realisation_references(conn: &Connection, id: i64) -> Result<Vec<(String, String)>> {
        let mut st = conn
            .prepare_cached(
                "select drvPath, outputName from Realisations \
                 join RealisationsRefs on realisationReference = Realisations.id \
                 where referrer = ?",
            )
            .map_err(Error::db("querying realisation references"))?;
        let rows = st
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(Error::db("querying realisation references"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Error::db("querying realisation references"))
    }

    pub fn insert_realisation(
        conn: &Connection,
        drv_hash: &str,
        output: &str,
        out_path: &str,
        signatures: &str,
    ) -> Result<()> {
        conn.prepare_cached(
            "insert into Realisations (drvPath, outputName, outputPath, signatures) \
             values (?, ?, (select id from ValidPaths where path = ?), ?)",
        )
        .and_then(|mut s| s.execute([drv_hash, output, out_path, signatures]))
        .map(|_| ())
        .map_err(|e| match &e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Error::NotValid(out_path.to_string())
            }
            _ => Error::Db {
                context: format!("registering the realisation of '{drv_hash}!{output}'"),
                source: e,
            },
        })
    }

    pub fn update_realisation_signatures(
        conn: &Connection,
        drv_hash: &str,
        output: &str,
        signatures: &str,
    ) -> Result<()> {
        conn.prepare_cached(
            "update Realisations set signatures = ? where drvPath = ? and outputName = ?",
        )
        .and_then(|mut s| s.execute([signatures, drv_hash, output]))
        .map(|_| ())
        .map_err(Error::db("updating a realisation's signatures"))
    }

    /// Records that realisation `referrer` depends on realisation `reference` (both given as
    /// `(drvPath, outputName)`).
    pub fn add_realisation_reference(
        conn: &Connection,
        referrer: (&str, &str),
        reference: (&str, &str),
    ) -> Result<()> {
        conn.prepare_cached(
            "insert or replace into RealisationsRefs (referrer, realisationReference) values \
             ((select id from Realisations where drvPath = ? and outputName = ?), \
              (select id from Realisations where drvPath = ? and outputName = ?))",
        )
        .and_then(|mut s| s.execute([referrer.0, referrer.1, reference.0, reference.1]))
        .map(|_| ())
        .map_err(Error::db("recording a realisation's dependency"))
    }

    // ---- failed paths -----------------------------------------------------------------

    pub fn register_failed(conn: &Connection, path: &str, now: i64) -> Result<()> {
        conn.prepare_cached("insert or ignore into FailedPaths (path, time) values (?, ?)")
            .and_then(|mut s| s.execute(params![path, now]))
            .map(|_| ())
            .map_err(Error::db("caching a failure"))
    }

    pub fn has_failed(conn: &Connection, path: &str) -> Result<bool> {
        conn.prepare_cached("select 1 from FailedPaths where path = ?")
            .and_then(|mut s| s.query_row([path], |_| Ok(())).optional())
            .map(|o| o.is_some())
            .map_err(Error::db("querying failures"))
    }

    pub fn query_failed(conn: &Connection) -> Result<Vec<String>> {
        let mut st = conn
            .prepare_cached("select path from FailedPaths")
            .map_err(Error::db("listing failures"))?;
        let rows = st
            .query_map([], |r| r.get(0))
            .map_err(Error::db("listing failures"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(Error::db("listing failures"))
    }

    /// Clears cached failures of `path` (and of the outputs of a derivation), or all with `*`.
    pub fn clear_failed(conn: &Connection, path: &str) -> Result<()> {
        conn.prepare_cached(
            "delete from FailedPaths where ?1 = '*' or path = ?1 or path in (select d.path from DerivationOutputs d join ValidPaths v on d.drv = v.id where v.path = ?1)",
        )
        .and_then(|mut s| s.execute([path]))
        .map(|_| ())
        .map_err(Error::db("clearing failures"))
    }
}

impl Drop for Db {
    /// Folds the write-ahead log back into the database on the way out (when no other
    /// process is reading it), so the next process does not start by reading through a log
    /// of everything written since.
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        if let Ok(mut pool) = self.readers.lock() {
            pool.clear();
        }
        if let Ok(conn) = self.writer.lock() {
            let _ = conn.busy_timeout(Duration::from_millis(0));
            let _ = conn.query_row("pragma wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
    }
}

/// Write transactions retried because another process held the database past the busy
/// timeout, in this process (the daemon's `kiln_db_busy_retries_total`).
static BUSY_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many write transactions this process retried on a busy database.
pub fn busy_retries() -> u64 {
    BUSY_RETRIES.load(std::sync::atomic::Ordering::Relaxed)
}

pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.code == rusqlite::ErrorCode::DatabaseBusy || f.code == rusqlite::ErrorCode::DatabaseLocked)
}
