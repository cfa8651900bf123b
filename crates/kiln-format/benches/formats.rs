//! Throughput of the format hot paths, in process (run with `cargo bench -p kiln-format`).
//!
//! * reference scanning of 1 GiB against 1,000 candidate hash parts, on three kinds of data:
//!   random bytes (binaries, compressed data), English-like text, and text dense with store
//!   paths (the worst case: long runs of base32 characters);
//! * NAR parsing + SHA-256 of an in-memory archive (the restore/verify path without disk).
//!
//! Prints one line per case: bytes, seconds, GiB/s. No assertions: numbers go to BENCHMARKS.md.

use std::time::Instant;

use kiln_format::base32;
use kiln_format::hash::HashAlgo;
use kiln_format::nar::{self, tree::Node, HashingReader, Limits};
use kiln_format::refscan::RefScanner;

const GIB: usize = 1 << 30;

/// xorshift: fast deterministic pseudo-random bytes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    fn hash_part(&mut self) -> String {
        let mut b = [0u8; 20];
        self.fill(&mut b);
        base32::encode(&b)
    }
}

fn report(name: &str, bytes: usize, secs: f64) {
    println!(
        "{name:<40} {:>6.2} GiB in {secs:>6.3} s = {:>6.2} GiB/s",
        bytes as f64 / GIB as f64,
        bytes as f64 / GIB as f64 / secs
    );
}

fn scan_case(name: &str, data: &[u8], candidates: &[String]) {
    let mut best = f64::MAX;
    let mut found = 0;
    for _ in 0..3 {
        let mut s = RefScanner::new(candidates.iter().map(String::as_str));
        let t = Instant::now();
        for chunk in data.chunks(64 * 1024) {
            s.feed(chunk);
        }
        best = best.min(t.elapsed().as_secs_f64());
        found = s.found().count();
    }
    report(&format!("refscan {name} ({found} found)"), data.len(), best);
}

fn main() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let candidates: Vec<String> = (0..1000).map(|_| rng.hash_part()).collect();

    // Random bytes.
    let mut data = vec![0u8; GIB];
    rng.fill(&mut data);
    scan_case("random bytes", &data, &candidates);

    // English-like text: words of base32-ish letters separated by spaces and newlines.
    let words = [
        "the",
        "build",
        "of",
        "a",
        "derivation",
        "is",
        "pure",
        "function",
        "inputs",
        "and",
        "output",
        "store",
    ];
    let mut pos = 0;
    while pos < data.len() {
        let w = words[(rng.next() % words.len() as u64) as usize].as_bytes();
        let end = (pos + w.len()).min(data.len());
        data[pos..end].copy_from_slice(&w[..end - pos]);
        pos = end;
        if pos < data.len() {
            data[pos] = if rng.next().is_multiple_of(12) {
                b'\n'
            } else {
                b' '
            };
            pos += 1;
        }
    }
    scan_case("text", &data, &candidates);

    // Store-path-dense text: `/nix/store/<hash>-name:` with random (non-candidate) hashes and
    // a candidate every ~10 MB.
    let mut pos = 0;
    let mut n = 0u64;
    while pos + 64 < data.len() {
        n += 1;
        let h = if n.is_multiple_of(150_000) {
            candidates[(n / 150_000) as usize % 1000].clone()
        } else {
            rng.hash_part()
        };
        let line = format!("/nix/store/{h}-pkg-1.0/bin:");
        data[pos..pos + line.len()].copy_from_slice(line.as_bytes());
        pos += line.len();
    }
    scan_case("store-path dense", &data, &candidates);

    // NAR parse + SHA-256 of an in-memory archive of ~1 GiB in ~20k files.
    drop(data);
    let mut entries = std::collections::BTreeMap::new();
    let per = GIB / 20_000;
    for i in 0..20_000 {
        let mut c = vec![0u8; per];
        rng.fill(&mut c[..64]);
        entries.insert(format!("f{i:05}").into_bytes(), Node::file(c));
    }
    let nar_bytes = Node::Directory(entries).to_nar();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut r = HashingReader::new(nar_bytes.as_slice(), HashAlgo::Sha256);
        nar::parse(&mut r, &mut (), Limits::default()).expect("valid NAR");
        let _ = r.finish();
        best = best.min(t.elapsed().as_secs_f64());
    }
    report("NAR parse + sha256 (in memory)", nar_bytes.len(), best);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let _ = kiln_format::Hash::sha256(&nar_bytes);
        best = best.min(t.elapsed().as_secs_f64());
    }
    report("sha256 alone (in memory)", nar_bytes.len(), best);
}
