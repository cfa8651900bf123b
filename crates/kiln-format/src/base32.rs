//! Nix's base32: its own alphabet (no `e`, `o`, `u`, `t`) and its own bit order
//! (the last character encodes the lowest bits of the first byte).

use crate::Error;

/// The 32 characters of Nix base32, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Value of each byte in the alphabet, or 0xff.
const fn reverse_table() -> [u8; 256] {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 32 {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
}

/// `DECODE[b]` is the value of character `b`, or `0xff` when `b` is not in the alphabet.
pub const DECODE: [u8; 256] = reverse_table();

/// Number of base32 characters for `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 8 - 1) / 5 + 1
    }
}

/// Encodes bytes in Nix base32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = Vec::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = bytes[i] >> j;
        let hi = if i + 1 < bytes.len() {
            // j < 8, so the shift is at most 8; widen to avoid overflow.
            ((bytes[i + 1] as u16) << (8 - j)) as u8
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize]);
    }
    // Every byte pushed comes from ALPHABET, which is ASCII.
    out.into_iter().map(char::from).collect()
}

/// Decodes a Nix base32 string into `out`, whose length fixes the expected input length.
pub fn decode_into(s: &[u8], out: &mut [u8]) -> Result<(), Error> {
    if s.len() != encoded_len(out.len()) {
        return Err(Error::Base32(format!(
            "expected {} characters for {} bytes, got {}",
            encoded_len(out.len()),
            out.len(),
            s.len()
        )));
    }
    out.fill(0);
    for (pos, &c) in s.iter().enumerate() {
        let digit = DECODE[c as usize];
        if digit == 0xff {
            return Err(Error::Base32(format!(
                "invalid character {:?} at position {pos}",
                char::from(c)
            )));
        }
        let n = s.len() - 1 - pos;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= digit << j;
        let carry = ((digit as u16) >> (8 - j)) as u8;
        if i + 1 < out.len() {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(Error::Base32(format!(
                "character {:?} at position {pos} has bits beyond the hash length",
                char::from(c)
            )));
        }
    }
    Ok(())
}

/// Decodes a Nix base32 string of a length that is valid for some byte count.
pub fn decode(s: &str) -> Result<Vec<u8>, Error> {
    // Find the byte length whose encoding has this many characters.
    let chars = s.len();
    let bytes = chars * 5 / 8;
    if encoded_len(bytes) != chars {
        return Err(Error::Base32(format!(
            "{chars} is not a valid base32 length"
        )));
    }
    let mut out = vec![0u8; bytes];
    decode_into(s.as_bytes(), &mut out)?;
    Ok(out)
}

/// True when every byte is a Nix base32 character.
pub fn is_valid(s: &[u8]) -> bool {
    s.iter().all(|&c| DECODE[c as usize] != 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        // sha256 of the empty string, as printed by `nix-hash --type sha256 --to-base32`.
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert_eq!(
            encode(&bytes),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
    }

    #[test]
    fn rejects_bad_input() {
        let mut out = [0u8; 20];
        let e = decode_into(b"e000000000000000000000000000000z", &mut out).unwrap_err();
        assert!(
            e.to_string()
                .contains("invalid character 'e' at position 0"),
            "{e}"
        );
        assert!(decode_into(b"abc", &mut out).is_err());
        // 1 byte = 2 chars; the top char may only carry 3 bits.
        let mut one = [0u8; 1];
        assert!(decode_into(b"z0", &mut one).is_err());
        assert!(decode_into(b"70", &mut one).is_ok());
        assert!(decode("abcd").is_err());
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let s = encode(&bytes);
            prop_assert!(is_valid(s.as_bytes()));
            let mut back = vec![0u8; bytes.len()];
            decode_into(s.as_bytes(), &mut back).unwrap();
            prop_assert_eq!(back, bytes);
        }
    }
}
