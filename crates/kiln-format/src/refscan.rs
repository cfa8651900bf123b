//! Reference scanning: which of a set of candidate store paths occur in a byte stream.
//!
//! A reference is the 32-character hash part of a store path. Those characters come from a
//! 32-letter alphabet, so a window can only match if all 32 of its bytes are in it. The scan
//! looks at the last byte of each window first and, when it is outside the alphabet, skips a
//! whole window; on random or binary data that is one table lookup per 32 bytes. Windows that
//! consist only of alphabet characters are checked against a bitmap of candidate prefixes
//! before the exact lookup. Matches that straddle chunk boundaries are found by keeping the
//! last 31 bytes of the previous chunk.

use std::collections::HashMap;

use crate::base32::DECODE;
use crate::store_path::HASH_PART_LEN;

/// Bits in the prefix filter: the first three characters, 5 bits each.
const PREFIX_BITS: usize = 15;

/// Finds hash parts of candidate paths in streamed data.
#[derive(Debug, Clone)]
pub struct RefScanner {
    /// Candidate hash part → index in the caller's list.
    candidates: HashMap<[u8; HASH_PART_LEN], usize>,
    /// One bit per possible three-character prefix of a candidate.
    prefixes: Box<[u64]>,
    found: Vec<bool>,
    remaining: usize,
    tail: Vec<u8>,
}

#[inline]
fn in_alphabet(b: u8) -> bool {
    DECODE[b as usize] != 0xff
}

#[inline]
fn prefix_key(w: &[u8]) -> usize {
    (DECODE[w[0] as usize] as usize) << 10
        | (DECODE[w[1] as usize] as usize) << 5
        | DECODE[w[2] as usize] as usize
}

impl RefScanner {
    /// A scanner for the given hash parts (each 32 Nix-base32 characters). Hash parts that
    /// are not valid are ignored: they can never match.
    pub fn new<'a>(hash_parts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut candidates = HashMap::new();
        let mut prefixes = vec![0u64; (1 << PREFIX_BITS) / 64].into_boxed_slice();
        let mut n = 0;
        for h in hash_parts {
            let b = h.as_bytes();
            if let Ok(key) = <[u8; HASH_PART_LEN]>::try_from(b) {
                if key.iter().all(|&c| in_alphabet(c)) {
                    let k = prefix_key(&key);
                    prefixes[k / 64] |= 1 << (k % 64);
                    candidates.insert(key, n);
                }
            }
            n += 1;
        }
        let remaining = candidates.len();
        RefScanner {
            candidates,
            prefixes,
            found: vec![false; n],
            remaining,
            tail: Vec::with_capacity(2 * HASH_PART_LEN),
        }
    }

    /// Scans the next chunk of the stream.
    pub fn feed(&mut self, data: &[u8]) {
        if self.remaining == 0 || data.is_empty() {
            return;
        }
        // Windows that start in the tail of the previous chunk.
        if !self.tail.is_empty() {
            let take = data.len().min(HASH_PART_LEN - 1);
            let mut joined = std::mem::take(&mut self.tail);
            let keep = joined.len();
            joined.extend_from_slice(&data[..take]);
            // Only windows starting inside the old tail; later ones are scanned in `data`.
            let limit = keep + HASH_PART_LEN - 1;
            self.search(&joined[..limit.min(joined.len())]);
            joined.truncate(keep);
            self.tail = joined;
        }
        self.search(data);
        // Keep the last 31 bytes of everything seen.
        let keep = HASH_PART_LEN - 1;
        if data.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - keep..]);
        } else {
            self.tail.extend_from_slice(data);
            let excess = self.tail.len().saturating_sub(keep);
            self.tail.drain(..excess);
        }
    }

    fn search(&mut self, s: &[u8]) {
        let n = s.len();
        if n < HASH_PART_LEN {
            return;
        }
        let mut i = 0;
        'windows: while i + HASH_PART_LEN <= n {
            // Check from the end of the window: a bad byte at offset j rules out every
            // window that contains it, so the next candidate starts after it.
            let mut j = HASH_PART_LEN;
            while j > 0 {
                j -= 1;
                if !in_alphabet(s[i + j]) {
                    i += j + 1;
                    continue 'windows;
                }
            }
            // s[i..i+32] is all alphabet; so are the first 31 bytes of the next window.
            loop {
                let w = &s[i..i + HASH_PART_LEN];
                let k = prefix_key(w);
                if self.prefixes[k / 64] & (1 << (k % 64)) != 0 {
                    self.check(w);
                    if self.remaining == 0 {
                        return;
                    }
                }
                i += 1;
                if i + HASH_PART_LEN > n {
                    return;
                }
                if !in_alphabet(s[i + HASH_PART_LEN - 1]) {
                    i += HASH_PART_LEN;
                    continue 'windows;
                }
            }
        }
    }

    #[cold]
    fn check(&mut self, w: &[u8]) {
        let Ok(key) = <[u8; HASH_PART_LEN]>::try_from(w) else {
            return;
        };
        if let Some(&idx) = self.candidates.get(&key) {
            if !self.found[idx] {
                self.found[idx] = true;
                self.remaining -= 1;
            }
        }
    }

    /// Indices (in the order given to [`RefScanner::new`]) of the candidates seen so far.
    pub fn found(&self) -> impl Iterator<Item = usize> + '_ {
        self.found
            .iter()
            .enumerate()
            .filter(|(_, f)| **f)
            .map(|(i, _)| i)
    }

    /// Whether every candidate has been found (scanning further is pointless).
    pub fn all_found(&self) -> bool {
        self.remaining == 0
    }
}

impl std::io::Write for RefScanner {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: &str = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz";
    const B: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";

    fn scan(chunks: &[&[u8]]) -> Vec<usize> {
        let mut s = RefScanner::new([A, B]);
        for c in chunks {
            s.feed(c);
        }
        s.found().collect()
    }

    #[test]
    fn finds_in_one_chunk() {
        let data = format!("foo /nix/store/{A}-bar\0{B}");
        assert_eq!(scan(&[data.as_bytes()]), vec![0, 1]);
        assert_eq!(scan(&[b"nothing here"]), Vec::<usize>::new());
    }

    #[test]
    fn finds_across_boundaries() {
        let data = format!("xx{A}yy");
        let b = data.as_bytes();
        for cut in 0..b.len() {
            assert_eq!(scan(&[&b[..cut], &b[cut..]]), vec![0], "cut at {cut}");
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(scan(&bytes), vec![0]);
    }

    #[test]
    fn alphabet_runs_are_handled() {
        // A candidate embedded in a long run of alphabet characters.
        let data = format!("{}{A}{}", "a".repeat(100), "z".repeat(50));
        assert_eq!(scan(&[data.as_bytes()]), vec![0]);
        // A near miss (one character changed) is not a match.
        let mut near = A.as_bytes().to_vec();
        near[31] = b'0';
        assert_eq!(scan(&[&near]), Vec::<usize>::new());
    }

    proptest! {
        #[test]
        fn same_as_naive(prefix in proptest::collection::vec(any::<u8>(), 0..100),
                         suffix in proptest::collection::vec(any::<u8>(), 0..100),
                         which in 0usize..3,
                         cuts in proptest::collection::vec(0usize..300, 0..5)) {
            let mut data = prefix.clone();
            if which < 2 { data.extend_from_slice([A, B][which].as_bytes()); }
            data.extend_from_slice(&suffix);
            let naive: Vec<usize> = [A, B].iter().enumerate()
                .filter(|(_, h)| data.windows(32).any(|w| w == h.as_bytes()))
                .map(|(i, _)| i).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort();
            let mut chunks = Vec::new();
            let mut last = 0;
            for c in cuts { chunks.push(&data[last..c]); last = c; }
            chunks.push(&data[last..]);
            prop_assert_eq!(scan(&chunks), naive);
        }
    }
}
