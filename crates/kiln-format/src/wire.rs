//! Nix's serialisation primitives: u64 little-endian integers and length-prefixed,
//! zero-padded byte strings. Used by the export format and the worker protocol.
//!
//! Readers take a maximum for every length and check it before allocating; a stream that
//! claims a 2^64-byte string gets an error, not an allocation.

use std::io::{self, Read, Write};

use crate::Error;

fn eof(what: &str) -> Error {
    Error::Wire(format!("unexpected end of stream reading {what}"))
}

fn read_exact<R: Read + ?Sized>(r: &mut R, buf: &mut [u8], what: &str) -> Result<(), Error> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => eof(what),
        _ => Error::Wire(format!("read error reading {what}: {e}")),
    })
}

/// Reads a u64.
pub fn read_u64<R: Read + ?Sized>(r: &mut R, what: &str) -> Result<u64, Error> {
    let mut b = [0u8; 8];
    read_exact(r, &mut b, what)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a boolean (a u64 that must be 0 or 1).
pub fn read_bool<R: Read + ?Sized>(r: &mut R, what: &str) -> Result<bool, Error> {
    match read_u64(r, what)? {
        0 => Ok(false),
        1 => Ok(true),
        n => Err(Error::Wire(format!("{what}: {n} is not a boolean"))),
    }
}

/// Reads a byte string of at most `max` bytes.
pub fn read_bytes<R: Read + ?Sized>(r: &mut R, max: usize, what: &str) -> Result<Vec<u8>, Error> {
    let len = read_u64(r, what)?;
    if len > max as u64 {
        return Err(Error::Wire(format!(
            "{what} of {len} bytes exceeds the limit of {max}"
        )));
    }
    // Grown as bytes arrive: a peer that announces `max` bytes and sends none costs nothing.
    let mut v = Vec::with_capacity((len as usize).min(64 * 1024));
    let got = Read::take(&mut *r, len)
        .read_to_end(&mut v)
        .map_err(|e| Error::Wire(format!("read error reading {what}: {e}")))?;
    if (got as u64) < len {
        return Err(eof(what));
    }
    let pad = ((8 - len % 8) % 8) as usize;
    if pad > 0 {
        let mut p = [0u8; 8];
        read_exact(r, &mut p[..pad], what)?;
        if p[..pad].iter().any(|&b| b != 0) {
            return Err(Error::Wire(format!("{what}: non-zero padding")));
        }
    }
    Ok(v)
}

/// Reads a UTF-8 string of at most `max` bytes.
pub fn read_string<R: Read + ?Sized>(r: &mut R, max: usize, what: &str) -> Result<String, Error> {
    String::from_utf8(read_bytes(r, max, what)?)
        .map_err(|_| Error::Wire(format!("{what} is not valid UTF-8")))
}

/// Reads a list of at most `max_items` strings of at most `max_len` bytes each.
pub fn read_strings<R: Read + ?Sized>(
    r: &mut R,
    max_items: usize,
    max_len: usize,
    what: &str,
) -> Result<Vec<String>, Error> {
    let n = read_u64(r, what)?;
    if n > max_items as u64 {
        return Err(Error::Wire(format!(
            "{what}: {n} items exceed the limit of {max_items}"
        )));
    }
    // Grow as items arrive: the count is the peer's claim, not a reservation.
    let mut v = Vec::with_capacity((n as usize).min(1024));
    for _ in 0..n {
        v.push(read_string(r, max_len, what)?);
    }
    Ok(v)
}

pub fn write_u64<W: Write + ?Sized>(w: &mut W, v: u64) -> io::Result<()> {
    w.write_all(&v.to_le_bytes())
}

pub fn write_bool<W: Write + ?Sized>(w: &mut W, v: bool) -> io::Result<()> {
    write_u64(w, v as u64)
}

pub fn write_bytes<W: Write + ?Sized>(w: &mut W, s: &[u8]) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s)?;
    w.write_all(&[0u8; 8][..(8 - s.len() % 8) % 8])
}

pub fn write_strings<'a, W: Write + ?Sized>(
    w: &mut W,
    items: impl ExactSizeIterator<Item = &'a str>,
) -> io::Result<()> {
    write_u64(w, items.len() as u64)?;
    for s in items {
        write_bytes(w, s.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let mut v = Vec::new();
        write_u64(&mut v, 7).unwrap();
        write_bytes(&mut v, b"hello").unwrap();
        write_strings(&mut v, ["a", "bc"].into_iter()).unwrap();
        let mut r = v.as_slice();
        assert_eq!(read_u64(&mut r, "n").unwrap(), 7);
        assert_eq!(read_string(&mut r, 10, "s").unwrap(), "hello");
        assert_eq!(read_strings(&mut r, 5, 5, "l").unwrap(), vec!["a", "bc"]);
        assert!(read_u64(&mut r, "n")
            .unwrap_err()
            .to_string()
            .contains("unexpected end"));

        let mut v = Vec::new();
        write_u64(&mut v, u64::MAX - 7).unwrap();
        assert!(read_bytes(&mut v.as_slice(), 100, "name")
            .unwrap_err()
            .to_string()
            .contains("exceeds the limit"));
        let mut v = Vec::new();
        write_u64(&mut v, 1 << 40).unwrap();
        assert!(read_strings(&mut v.as_slice(), 1000, 10, "refs")
            .unwrap_err()
            .to_string()
            .contains("exceed"));
        let mut v = Vec::new();
        write_bytes(&mut v, b"abc").unwrap();
        let n = v.len();
        v[n - 1] = 9;
        assert!(read_bytes(&mut v.as_slice(), 10, "s")
            .unwrap_err()
            .to_string()
            .contains("non-zero padding"));
    }
}
