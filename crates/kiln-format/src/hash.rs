//! Cryptographic hashes as Nix and Guix print and parse them.
//!
//! A [`Hash`] is an algorithm plus its digest. It prints as base16, Nix base32, base64 or SRI
//! (`sha256-…`), with or without the `algo:` prefix, and parses any of these forms the way
//! Nix's `Hash::parseAny` does: the encoding is told apart by the length of the digest text.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use sha2::Digest as _;

use crate::{base32, Error};

/// Largest digest we hold (SHA-512).
pub const MAX_HASH_SIZE: usize = 64;

/// A hash algorithm Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// All algorithms, in Nix's order.
    pub const ALL: [HashAlgo; 4] = [
        HashAlgo::Md5,
        HashAlgo::Sha1,
        HashAlgo::Sha256,
        HashAlgo::Sha512,
    ];

    /// Digest size in bytes.
    pub const fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// The name Nix prints (`md5`, `sha1`, `sha256`, `sha512`).
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Lengths of the digest in each text encoding.
    const fn base16_len(self) -> usize {
        self.size() * 2
    }
    const fn base32_len(self) -> usize {
        base32::encoded_len(self.size())
    }
    const fn base64_len(self) -> usize {
        (4 * self.size() / 3 + 3) & !3
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "md5" => Ok(HashAlgo::Md5),
            "sha1" => Ok(HashAlgo::Sha1),
            "sha256" => Ok(HashAlgo::Sha256),
            "sha512" => Ok(HashAlgo::Sha512),
            _ => Err(Error::Hash(format!("unknown hash algorithm '{s}'"))),
        }
    }
}

/// Text encodings of a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Base16,
    Base32,
    Base64,
    /// `algo-base64`, the Subresource Integrity form. Always carries the algorithm.
    Sri,
}

/// A digest together with its algorithm.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    bytes: [u8; MAX_HASH_SIZE],
}

impl Hash {
    /// Wraps a digest; fails if its length does not match the algorithm.
    pub fn from_bytes(algo: HashAlgo, digest: &[u8]) -> Result<Self, Error> {
        if digest.len() != algo.size() {
            return Err(Error::Hash(format!(
                "{algo} digest must be {} bytes, got {}",
                algo.size(),
                digest.len()
            )));
        }
        let mut bytes = [0u8; MAX_HASH_SIZE];
        bytes[..digest.len()].copy_from_slice(digest);
        Ok(Hash { algo, bytes })
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The digest bytes.
    pub fn digest(&self) -> &[u8] {
        &self.bytes[..self.algo.size()]
    }

    /// Hashes a byte string.
    pub fn of(algo: HashAlgo, data: &[u8]) -> Hash {
        let mut h = Hasher::new(algo);
        h.update(data);
        h.finish()
    }

    /// SHA-256 of a byte string.
    pub fn sha256(data: &[u8]) -> Hash {
        Hash::of(HashAlgo::Sha256, data)
    }

    /// Base16 (lower-case hex) of the digest, no prefix.
    pub fn to_base16(&self) -> String {
        let mut s = String::with_capacity(self.algo.base16_len());
        for b in self.digest() {
            s.push(char::from(b"0123456789abcdef"[(b >> 4) as usize]));
            s.push(char::from(b"0123456789abcdef"[(b & 15) as usize]));
        }
        s
    }

    /// Nix base32 of the digest, no prefix.
    pub fn to_base32(&self) -> String {
        base32::encode(self.digest())
    }

    /// Standard base64 (with padding) of the digest, no prefix.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.digest())
    }

    /// `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }

    /// The digest in an encoding; `with_algo` adds `algo:` (SRI always carries it).
    pub fn encode(&self, enc: Encoding, with_algo: bool) -> String {
        let body = match enc {
            Encoding::Base16 => self.to_base16(),
            Encoding::Base32 => self.to_base32(),
            Encoding::Base64 => self.to_base64(),
            Encoding::Sri => return self.to_sri(),
        };
        if with_algo {
            format!("{}:{}", self.algo, body)
        } else {
            body
        }
    }

    /// Parses `algo:digest`, `algo-base64` (SRI), or a bare digest when `default` is given.
    /// The digest may be base16, base32 or base64, told apart by length.
    pub fn parse_any(s: &str, default: Option<HashAlgo>) -> Result<Hash, Error> {
        if let Some((algo, rest)) = s.split_once(':') {
            let algo: HashAlgo = algo.parse()?;
            if let Some(d) = default {
                if d != algo {
                    return Err(Error::Hash(format!(
                        "hash '{s}' should have type '{d}', not '{algo}'"
                    )));
                }
            }
            return Hash::parse_digest(algo, rest);
        }
        if let Some((algo, rest)) = s.split_once('-') {
            if let Ok(algo) = algo.parse::<HashAlgo>() {
                if let Some(d) = default {
                    if d != algo {
                        return Err(Error::Hash(format!(
                            "hash '{s}' should have type '{d}', not '{algo}'"
                        )));
                    }
                }
                return Hash::decode_base64(algo, rest)
                    .map_err(|e| Error::Hash(format!("invalid SRI hash '{s}': {e}")));
            }
        }
        match default {
            Some(algo) => Hash::parse_digest(algo, s),
            None => Err(Error::Hash(format!(
                "hash '{s}' does not include a type, nor is the type otherwise known"
            ))),
        }
    }

    /// Parses a bare digest of a known algorithm (base16, base32 or base64 by length).
    pub fn parse_digest(algo: HashAlgo, s: &str) -> Result<Hash, Error> {
        let n = s.len();
        if n == algo.base16_len() {
            let mut bytes = [0u8; MAX_HASH_SIZE];
            for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
                let hi = hex_val(pair[0]);
                let lo = hex_val(pair[1]);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => bytes[i] = hi << 4 | lo,
                    _ => {
                        return Err(Error::Hash(format!(
                            "invalid base-16 hash '{s}': bad character at position {}",
                            2 * i + usize::from(hi.is_some())
                        )))
                    }
                }
            }
            Ok(Hash { algo, bytes })
        } else if n == algo.base32_len() {
            let mut bytes = [0u8; MAX_HASH_SIZE];
            base32::decode_into(s.as_bytes(), &mut bytes[..algo.size()])
                .map_err(|e| Error::Hash(format!("invalid base-32 hash '{s}': {e}")))?;
            Ok(Hash { algo, bytes })
        } else if n == algo.base64_len() {
            Hash::decode_base64(algo, s)
                .map_err(|e| Error::Hash(format!("invalid base-64 hash '{s}': {e}")))
        } else {
            Err(Error::Hash(format!(
                "hash '{s}' has wrong length for hash type '{algo}'"
            )))
        }
    }

    fn decode_base64(algo: HashAlgo, s: &str) -> Result<Hash, String> {
        let v = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| e.to_string())?;
        Hash::from_bytes(algo, &v).map_err(|e| e.to_string())
    }

    /// Folds the digest into `size` bytes by XOR, as store paths use (20 bytes).
    pub fn compress(&self, size: usize) -> Vec<u8> {
        let mut out = vec![0u8; size];
        for (i, b) in self.digest().iter().enumerate() {
            out[i % size] ^= b;
        }
        out
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `sha256:<base32>`, Nix's default printed form for hashes in messages.
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_base32())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_base16())
    }
}

/// Incremental hasher over any [`HashAlgo`].
#[derive(Clone)]
pub enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hasher({})", self.algo())
    }
}

impl Hasher {
    /// A fresh hasher.
    pub fn new(algo: HashAlgo) -> Self {
        match algo {
            HashAlgo::Md5 => Hasher::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashAlgo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    /// Its algorithm.
    pub fn algo(&self) -> HashAlgo {
        match self {
            Hasher::Md5(_) => HashAlgo::Md5,
            Hasher::Sha1(_) => HashAlgo::Sha1,
            Hasher::Sha256(_) => HashAlgo::Sha256,
            Hasher::Sha512(_) => HashAlgo::Sha512,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest.
    pub fn finish(self) -> Hash {
        let algo = self.algo();
        let mut bytes = [0u8; MAX_HASH_SIZE];
        match self {
            Hasher::Md5(h) => bytes[..16].copy_from_slice(&h.finalize()),
            Hasher::Sha1(h) => bytes[..20].copy_from_slice(&h.finalize()),
            Hasher::Sha256(h) => bytes[..32].copy_from_slice(&h.finalize()),
            Hasher::Sha512(h) => bytes[..64].copy_from_slice(&h.finalize()),
        }
        Hash { algo, bytes }
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sink that hashes and counts what is written to it: the NAR hash and NAR size in one pass.
#[derive(Debug, Clone)]
pub struct HashSink {
    hasher: Hasher,
    size: u64,
}

impl HashSink {
    pub fn new(algo: HashAlgo) -> Self {
        HashSink {
            hasher: Hasher::new(algo),
            size: 0,
        }
    }
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.size += data.len() as u64;
    }
    /// Bytes seen so far.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The hash and the number of bytes.
    pub fn finish(self) -> (Hash, u64) {
        (self.hasher.finish(), self.size)
    }
}

impl std::io::Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hashes a stream *modulo* a string (Nix's `HashModuloSink`): every occurrence of `modulus`
/// (a store path's hash part) is hashed as NUL bytes, and the positions of the occurrences
/// are hashed after the stream as `|<offset>` each. This is how a floating content-addressed
/// output's self-references are kept out of the hash its path is computed from: the output
/// is built under a scratch path whose hash part is the modulus.
#[derive(Debug, Clone)]
pub struct HashModuloSink {
    hasher: Hasher,
    modulus: Vec<u8>,
    /// The tail of what came so far that could start an occurrence (`modulus.len() - 1`
    /// bytes at most), not yet hashed.
    held: Vec<u8>,
    /// Bytes consumed (hashed) so far.
    pos: u64,
    matches: Vec<u64>,
}

impl HashModuloSink {
    /// An empty `modulus` hashes modulo nothing: the plain hash of the stream.
    pub fn new(algo: HashAlgo, modulus: &str) -> Self {
        HashModuloSink {
            hasher: Hasher::new(algo),
            modulus: modulus.as_bytes().to_vec(),
            held: Vec::new(),
            pos: 0,
            matches: Vec::new(),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        let n = self.modulus.len();
        if n == 0 {
            self.hasher.update(data);
            self.pos += data.len() as u64;
            return;
        }
        let mut s = std::mem::take(&mut self.held);
        s.extend_from_slice(data);
        let finder = memchr::memmem::Finder::new(&self.modulus);
        let mut from = 0;
        while let Some(i) = finder.find(&s[from..]) {
            let at = from + i;
            self.matches.push(self.pos + at as u64);
            s[at..at + n].fill(0);
            from = at + n;
        }
        let keep = if s.len() < n { s.len() } else { n - 1 };
        let consumed = s.len() - keep;
        self.hasher.update(&s[..consumed]);
        self.pos += consumed as u64;
        self.held = s[consumed..].to_vec();
    }

    /// The hash as Nix 2.8 computes it (self-references' positions hashed after the
    /// stream) and as Nix ≥ 2.17 does (their positions no longer recorded: since Nix's
    /// `RewritingSink` took a map of rewrites, its `matches` stay empty), and the length.
    /// They differ only when the modulus occurs.
    pub fn finish_both(mut self) -> (Hash, Hash, u64) {
        let rest = std::mem::take(&mut self.held);
        self.hasher.update(&rest);
        self.pos += rest.len() as u64;
        let without_positions = self.hasher.clone().finish();
        for m in &self.matches {
            self.hasher.update(format!("|{m}").as_bytes());
        }
        (self.hasher.finish(), without_positions, self.pos)
    }

    /// The hash, and the length of the stream.
    pub fn finish(mut self) -> (Hash, u64) {
        let rest = std::mem::take(&mut self.held);
        self.hasher.update(&rest);
        self.pos += rest.len() as u64;
        for m in &self.matches {
            self.hasher.update(format!("|{m}").as_bytes());
        }
        (self.hasher.finish(), self.pos)
    }
}

impl std::io::Write for HashModuloSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A [`HashSink`] that hands the hashing to a helper thread once the stream grows past a few
/// MiB, so that producing the stream (reading files, scanning for references) and hashing it
/// use two cores. Small streams — most build outputs — are hashed inline and never pay for a
/// thread.
#[derive(Debug)]
pub struct ParallelHashSink {
    state: Parallel,
}

#[derive(Debug)]
enum Parallel {
    Inline(HashSink),
    Threaded {
        tx: std::sync::mpsc::SyncSender<Vec<u8>>,
        spare: std::sync::mpsc::Receiver<Vec<u8>>,
        buf: Vec<u8>,
        helper: std::thread::JoinHandle<HashSink>,
    },
    Failed,
}

const PARALLEL_THRESHOLD: u64 = 4 << 20;
const PARALLEL_CHUNK: usize = 1 << 20;
/// Chunks in flight between the producer and the helper: bounds the memory used.
const PARALLEL_DEPTH: usize = 4;

impl ParallelHashSink {
    pub fn new(algo: HashAlgo) -> Self {
        ParallelHashSink {
            state: Parallel::Inline(HashSink::new(algo)),
        }
    }

    fn go_parallel(sink: HashSink) -> Parallel {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(PARALLEL_DEPTH);
        let (spare_tx, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(PARALLEL_DEPTH + 1);
        let (sink_tx, sink_rx) = std::sync::mpsc::channel::<HashSink>();
        let helper = std::thread::Builder::new()
            .name("kiln-hash".into())
            .spawn(move || {
                let Ok(mut sink) = sink_rx.recv() else {
                    return HashSink::new(HashAlgo::Sha256);
                };
                for mut chunk in rx {
                    sink.update(&chunk);
                    chunk.clear();
                    let _ = spare_tx.try_send(chunk);
                }
                sink
            });
        match helper {
            Ok(helper) => match sink_tx.send(sink) {
                Ok(()) => Parallel::Threaded {
                    tx,
                    spare,
                    buf: Vec::with_capacity(PARALLEL_CHUNK),
                    helper,
                },
                // The helper is gone already (it cannot be, it waits for this): give up.
                Err(_) => Parallel::Failed,
            },
            // No thread to be had: keep hashing inline.
            Err(_) => Parallel::Inline(sink),
        }
    }

    /// The hash and the number of bytes.
    pub fn finish(self) -> std::io::Result<(Hash, u64)> {
        match self.state {
            Parallel::Inline(s) => Ok(s.finish()),
            Parallel::Threaded {
                tx, buf, helper, ..
            } => {
                if !buf.is_empty() && tx.send(buf).is_err() {
                    return Err(std::io::Error::other("the hashing thread stopped early"));
                }
                drop(tx);
                helper
                    .join()
                    .map(HashSink::finish)
                    .map_err(|_| std::io::Error::other("the hashing thread panicked"))
            }
            Parallel::Failed => Err(std::io::Error::other("the hashing thread stopped early")),
        }
    }
}

impl std::io::Write for ParallelHashSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match &mut self.state {
            Parallel::Inline(s) => {
                s.update(data);
                if s.size() >= PARALLEL_THRESHOLD {
                    if let Parallel::Inline(s) =
                        std::mem::replace(&mut self.state, Parallel::Failed)
                    {
                        self.state = Self::go_parallel(s);
                    }
                }
            }
            Parallel::Threaded { tx, spare, buf, .. } => {
                let mut rest = data;
                while !rest.is_empty() {
                    let n = rest.len().min(PARALLEL_CHUNK - buf.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    if buf.len() == PARALLEL_CHUNK {
                        let next = spare
                            .try_recv()
                            .unwrap_or_else(|_| Vec::with_capacity(PARALLEL_CHUNK));
                        let full = std::mem::replace(buf, next);
                        if tx.send(full).is_err() {
                            self.state = Parallel::Failed;
                            return Err(std::io::Error::other("the hashing thread stopped early"));
                        }
                    }
                }
            }
            Parallel::Failed => {
                return Err(std::io::Error::other("the hashing thread stopped early"))
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn hash_modulo_zeroes_occurrences_and_hashes_their_offsets() {
        let m = "abcd";
        let data = b"xxabcdyyabcdzz";
        let mut want = Hasher::new(HashAlgo::Sha256);
        want.update(b"xx\0\0\0\0yy\0\0\0\0zz|2|8");
        let want = want.finish();
        // Any split of the stream gives the same result.
        for split in 0..data.len() {
            let mut h = HashModuloSink::new(HashAlgo::Sha256, m);
            h.update(&data[..split]);
            h.update(&data[split..]);
            assert_eq!(h.finish(), (want, data.len() as u64), "split at {split}");
        }
        // Without occurrences it is the plain hash.
        let mut h = HashModuloSink::new(HashAlgo::Sha256, m);
        h.update(b"abc");
        assert_eq!(h.finish().0, Hash::sha256(b"abc"));
        // Nix ≥ 2.17's form: the same zeroed stream, no positions after it.
        let mut h = HashModuloSink::new(HashAlgo::Sha256, m);
        h.update(data);
        let (with, without, len) = h.finish_both();
        assert_eq!(with, want);
        assert_eq!(without, Hash::sha256(b"xx\0\0\0\0yy\0\0\0\0zz"));
        assert_eq!(len, data.len() as u64);
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parallel_sink_matches_inline_hashing() {
        use std::io::Write;
        // Sizes around the threshold and chunk boundaries, written in odd pieces.
        for total in [0usize, 1, 4 << 20, (4 << 20) + 1, (9 << 20) + 12345] {
            let data: Vec<u8> = (0..total).map(|i| (i * 31 % 251) as u8).collect();
            let mut p = ParallelHashSink::new(HashAlgo::Sha256);
            for piece in data.chunks(777_777) {
                p.write_all(piece).unwrap();
            }
            let mut h = HashSink::new(HashAlgo::Sha256);
            h.update(&data);
            assert_eq!(p.finish().unwrap(), h.finish(), "total {total}");
        }
    }

    #[test]
    fn known_digests() {
        let h = Hash::of(HashAlgo::Md5, b"abc");
        assert_eq!(h.to_base16(), "900150983cd24fb0d6963f7d28e17f72");
        let h = Hash::of(HashAlgo::Sha1, b"abc");
        assert_eq!(h.to_base16(), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(h.to_base32(), "kpcd173cq987hw957sx6m0868wv3x6d9");
        let h = Hash::sha256(b"abc");
        assert_eq!(
            h.to_base16(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            h.to_base32(),
            "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
        );
        assert_eq!(
            h.to_sri(),
            "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
        let h = Hash::of(HashAlgo::Sha512, b"abc");
        assert_eq!(&h.to_base16()[..16], "ddaf35a193617aba");
    }

    #[test]
    fn parse_forms() {
        let h = Hash::sha256(b"abc");
        for s in [
            format!("sha256:{}", h.to_base16()),
            format!("sha256:{}", h.to_base32()),
            format!("sha256:{}", h.to_base64()),
            h.to_sri(),
        ] {
            assert_eq!(Hash::parse_any(&s, None).unwrap(), h, "{s}");
        }
        assert_eq!(
            Hash::parse_any(&h.to_base32(), Some(HashAlgo::Sha256)).unwrap(),
            h
        );
        assert_eq!(
            Hash::parse_any(&h.to_base16().to_uppercase(), Some(HashAlgo::Sha256)).unwrap(),
            h
        );
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let e = Hash::parse_any("sha257:abc", None).unwrap_err().to_string();
        assert!(e.contains("unknown hash algorithm 'sha257'"), "{e}");
        let e = Hash::parse_any("sha256:abc", None).unwrap_err().to_string();
        assert!(e.contains("wrong length"), "{e}");
        let e = Hash::parse_any("abc", None).unwrap_err().to_string();
        assert!(e.contains("does not include a type"), "{e}");
        let bad = format!("sha1:{}", "g".repeat(40));
        let e = Hash::parse_any(&bad, None).unwrap_err().to_string();
        assert!(e.contains("position 0"), "{e}");
        let e = Hash::parse_any("sha1:abcd", Some(HashAlgo::Sha256))
            .unwrap_err()
            .to_string();
        assert!(e.contains("should have type 'sha256'"), "{e}");
        assert!(Hash::parse_any("sha256-!!!", None).is_err());
    }

    #[test]
    fn compress_folds_by_xor() {
        let h = Hash::from_bytes(HashAlgo::Sha256, &[1u8; 32]).unwrap();
        let c = h.compress(20);
        assert_eq!(&c[..12], &[0u8; 12]);
        assert_eq!(&c[12..], &[1u8; 8]);
    }

    proptest! {
        #[test]
        fn encodings_round_trip(data in proptest::collection::vec(any::<u8>(), 0..200), algo in 0usize..4) {
            let algo = HashAlgo::ALL[algo];
            let h = Hash::of(algo, &data);
            for enc in [Encoding::Base16, Encoding::Base32, Encoding::Base64, Encoding::Sri] {
                let s = h.encode(enc, true);
                prop_assert_eq!(Hash::parse_any(&s, None).unwrap(), h);
            }
        }
    }
}
