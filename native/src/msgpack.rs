//! A small zero-copy MessagePack reader over one payload.
//!
//! The KV-event decoder needs more control than a serde model gives: the
//! exact acceptance rules of the Python reference decoder (msgspec with
//! kvmesh's structs), spans of raw values, and no allocation for values it
//! skips. Every read is bounds-checked and returns an error instead of
//! panicking; [`Reader::skip`] is iterative, so nesting depth is bounded by
//! [`MAX_DEPTH`] and never by the thread's stack.

use std::fmt;

/// Nesting deeper than this is refused as malformed (msgspec's reader
/// stops near Python's recursion limit, 1000 by default).
pub const MAX_DEPTH: usize = 1024;

/// What a marker byte starts, named as the reference decoder names it in
/// its type errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nil,
    Bool,
    Int,
    Float,
    Str,
    Bin,
    Array,
    Map,
    Ext,
    Reserved,
}

impl Kind {
    pub fn of(marker: u8) -> Kind {
        match marker {
            0x00..=0x7f | 0xcc..=0xd3 | 0xe0..=0xff => Kind::Int,
            0x80..=0x8f | 0xde | 0xdf => Kind::Map,
            0x90..=0x9f | 0xdc | 0xdd => Kind::Array,
            0xa0..=0xbf | 0xd9..=0xdb => Kind::Str,
            0xc0 => Kind::Nil,
            0xc1 => Kind::Reserved,
            0xc2 | 0xc3 => Kind::Bool,
            0xc4..=0xc6 => Kind::Bin,
            0xc7..=0xc9 | 0xd4..=0xd8 => Kind::Ext,
            0xca | 0xcb => Kind::Float,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Nil => "null",
            Kind::Bool => "bool",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Str => "str",
            Kind::Bin => "bytes",
            Kind::Array => "array",
            Kind::Map => "object",
            Kind::Ext => "ext",
            Kind::Reserved => "reserved byte",
        }
    }
}

/// A decoding failure, with a message in the reference decoder's style.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

pub fn malformed(what: &str, at: usize) -> Error {
    Error(format!("MessagePack data is malformed: {what} (byte {at})"))
}

pub fn expected(want: &str, got: Kind, path: &str) -> Error {
    if path.is_empty() {
        Error(format!("Expected `{want}`, got `{}`", got.name()))
    } else {
        Error(format!("Expected `{want}`, got `{}` - at `{path}`", got.name()))
    }
}

#[derive(Clone)]
pub struct Reader<'a> {
    pub buf: &'a [u8],
    pub pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn eof(&self) -> Error {
        malformed("truncated", self.buf.len())
    }

    pub fn peek(&self) -> Result<u8> {
        self.buf.get(self.pos).copied().ok_or_else(|| self.eof())
    }

    pub fn peek_kind(&self) -> Result<Kind> {
        Ok(Kind::of(self.peek()?))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.eof())?;
        let s = self.buf.get(self.pos..end).ok_or_else(|| self.eof())?;
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn be(&mut self, n: usize) -> Result<u64> {
        let s = self.take(n)?;
        Ok(s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// The length that follows a marker whose length field is `n` bytes.
    fn len(&mut self, n: usize) -> Result<usize> {
        usize::try_from(self.be(n)?).map_err(|_| self.eof())
    }

    /// An int (any of the int markers), or the kind found instead (nothing consumed).
    #[inline]
    pub fn int(&mut self) -> std::result::Result<i128, Kind> {
        let buf = self.buf;
        let p = self.pos;
        let Some(&m) = buf.get(p) else { return Err(Kind::Reserved) };
        // The n bytes after the marker, big-endian, as an array (a truncated
        // int is malformed: reported as such by the caller's skip).
        fn be<const N: usize>(buf: &[u8], p: usize) -> Option<[u8; N]> {
            buf.get(p + 1..p + 1 + N).and_then(|s| s.try_into().ok())
        }
        let (v, len): (i128, usize) = match m {
            0x00..=0x7f => (i128::from(m), 1),
            0xe0..=0xff => (i128::from(m as i8), 1),
            0xcc => (be::<1>(buf, p).map(|b| i128::from(b[0])).ok_or(Kind::Reserved)?, 2),
            0xcd => (be::<2>(buf, p).map(|b| i128::from(u16::from_be_bytes(b))).ok_or(Kind::Reserved)?, 3),
            0xce => (be::<4>(buf, p).map(|b| i128::from(u32::from_be_bytes(b))).ok_or(Kind::Reserved)?, 5),
            0xcf => (be::<8>(buf, p).map(|b| i128::from(u64::from_be_bytes(b))).ok_or(Kind::Reserved)?, 9),
            0xd0 => (be::<1>(buf, p).map(|b| i128::from(b[0] as i8)).ok_or(Kind::Reserved)?, 2),
            0xd1 => (be::<2>(buf, p).map(|b| i128::from(i16::from_be_bytes(b))).ok_or(Kind::Reserved)?, 3),
            0xd2 => (be::<4>(buf, p).map(|b| i128::from(i32::from_be_bytes(b))).ok_or(Kind::Reserved)?, 5),
            0xd3 => (be::<8>(buf, p).map(|b| i128::from(i64::from_be_bytes(b))).ok_or(Kind::Reserved)?, 9),
            _ => return Err(Kind::of(m)),
        };
        self.pos = p + len;
        Ok(v)
    }

    /// A token id in the encodings an engine uses for one that fits a u32
    /// (fixint, uint8/16/32); None (nothing consumed) for anything else,
    /// which the caller reads with [`Reader::int`].
    #[inline(always)]
    pub fn small_uint(&mut self) -> Option<u32> {
        let buf = self.buf;
        let p = self.pos;
        let m = *buf.get(p)?;
        let (v, len) = match m {
            0x00..=0x7f => (u32::from(m), 1),
            0xcc => (u32::from(*buf.get(p + 1)?), 2),
            0xcd => (u32::from(u16::from_be_bytes(buf.get(p + 1..p + 3)?.try_into().ok()?)), 3),
            0xce => (u32::from_be_bytes(buf.get(p + 1..p + 5)?.try_into().ok()?), 5),
            _ => return None,
        };
        self.pos = p + len;
        Some(v)
    }

    /// Up to `n` token ids in a row, each as [`Reader::small_uint`] reads
    /// one, appended to `out`; stops early at an item of another encoding
    /// or within 5 bytes of the end (the caller reads the rest one by
    /// one). The number read. One bounds check per item instead of one
    /// per encoding, for arrays of thousands of ids.
    #[inline]
    pub fn small_uints(&mut self, n: usize, out: &mut Vec<u32>) -> usize {
        let buf = self.buf;
        let mut p = self.pos;
        let mut k = 0;
        while k < n {
            // Four ids of one width at once where the array has runs of
            // them: no step then waits on the width of the id before it.
            if k + 4 <= n {
                if let Some(w) = buf.get(p..p + 20) {
                    if w[0] == 0xce && w[5] == 0xce && w[10] == 0xce && w[15] == 0xce {
                        for o in [1, 6, 11, 16] {
                            out.push(u32::from_be_bytes([w[o], w[o + 1], w[o + 2], w[o + 3]]));
                        }
                        p += 20;
                        k += 4;
                        continue;
                    }
                    if w[0] == 0xcd && w[3] == 0xcd && w[6] == 0xcd && w[9] == 0xcd {
                        for o in [1, 4, 7, 10] {
                            out.push(u32::from(u16::from_be_bytes([w[o], w[o + 1]])));
                        }
                        p += 12;
                        k += 4;
                        continue;
                    }
                }
            }
            let Some(w) = buf.get(p..p + 5) else { break };
            let (v, len) = match w[0] {
                m @ 0x00..=0x7f => (u32::from(m), 1),
                0xcc => (u32::from(w[1]), 2),
                0xcd => (u32::from(u16::from_be_bytes([w[1], w[2]])), 3),
                0xce => (u32::from_be_bytes([w[1], w[2], w[3], w[4]]), 5),
                _ => break,
            };
            out.push(v);
            p += len;
            k += 1;
        }
        self.pos = p;
        k
    }

    /// A float, or an int read as one (as the reference decoder accepts for
    /// a float field).
    pub fn float(&mut self) -> std::result::Result<f64, Kind> {
        let m = self.peek().map_err(|_| Kind::Reserved)?;
        match m {
            0xca => {
                self.pos += 1;
                let v = self.be(4).map_err(|_| Kind::Reserved)?;
                Ok(f64::from(f32::from_bits(v as u32)))
            }
            0xcb => {
                self.pos += 1;
                let v = self.be(8).map_err(|_| Kind::Reserved)?;
                Ok(f64::from_bits(v))
            }
            _ => self.int().map(|v| v as f64),
        }
    }

    /// A str's raw bytes (not checked for UTF-8), or the kind found instead.
    pub fn str_bytes(&mut self) -> std::result::Result<&'a [u8], Kind> {
        let m = self.peek().map_err(|_| Kind::Reserved)?;
        let save = self.pos;
        let r = match m {
            0xa0..=0xbf => {
                self.pos += 1;
                self.take(usize::from(m & 0x1f))
            }
            0xd9..=0xdb => {
                self.pos += 1;
                let n = match m {
                    0xd9 => 1,
                    0xda => 2,
                    _ => 4,
                };
                self.len(n).and_then(|l| self.take(l))
            }
            _ => return Err(Kind::of(m)),
        };
        r.map_err(|_| {
            self.pos = save;
            Kind::Reserved
        })
    }

    /// A str checked for UTF-8.
    pub fn str(&mut self, path: &str) -> Result<&'a str> {
        match self.str_bytes() {
            Ok(b) => std::str::from_utf8(b).map_err(|_| Error("Invalid UTF-8 encoded string".into())),
            Err(k) => Err(expected("str", k, path)),
        }
    }

    /// A bin's bytes, or the kind found instead.
    pub fn bin(&mut self) -> std::result::Result<&'a [u8], Kind> {
        let m = self.peek().map_err(|_| Kind::Reserved)?;
        let n = match m {
            0xc4 => 1,
            0xc5 => 2,
            0xc6 => 4,
            _ => return Err(Kind::of(m)),
        };
        let save = self.pos;
        self.pos += 1;
        self.len(n).and_then(|l| self.take(l)).map_err(|_| {
            self.pos = save;
            Kind::Reserved
        })
    }

    /// An array's length, or the kind found instead.
    pub fn array_len(&mut self) -> std::result::Result<usize, Kind> {
        self.container_len(0x90, 0xdc, 0xdd)
    }

    /// A map's number of pairs, or the kind found instead.
    pub fn map_len(&mut self) -> std::result::Result<usize, Kind> {
        self.container_len(0x80, 0xde, 0xdf)
    }

    /// The length of a container whose fix form is `fix..=fix + 15` and
    /// whose 16- and 32-bit forms are the markers `m16` and `m32`; nothing
    /// consumed when it is another kind or truncated.
    fn container_len(&mut self, fix: u8, m16: u8, m32: u8) -> std::result::Result<usize, Kind> {
        let m = self.peek().map_err(|_| Kind::Reserved)?;
        let save = self.pos;
        let width = match m {
            _ if (fix..=fix + 0x0f).contains(&m) => {
                self.pos += 1;
                return Ok(usize::from(m & 0x0f));
            }
            _ if m == m16 => 2,
            _ if m == m32 => 4,
            _ => return Err(Kind::of(m)),
        };
        self.pos += 1;
        self.len(width).map_err(|_| {
            self.pos = save;
            Kind::Reserved
        })
    }

    pub fn nil(&mut self) -> bool {
        if self.peek() == Ok(0xc0) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// The header of a scalar or of a container, consumed: how many values
    /// follow inside it (0 for a scalar).
    fn header(&mut self) -> Result<usize> {
        let at = self.pos;
        let m = self.byte()?;
        let skip = |r: &mut Self, n: usize| r.take(n).map(|_| 0usize);
        match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => Ok(0),
            0x80..=0x8f => Ok(usize::from(m & 0x0f) * 2),
            0x90..=0x9f => Ok(usize::from(m & 0x0f)),
            0xa0..=0xbf => skip(self, usize::from(m & 0x1f)),
            0xc1 => Err(malformed("invalid opcode '\\xc1'", at)),
            0xc4 | 0xd9 => {
                let n = self.len(1)?;
                skip(self, n)
            }
            0xc5 | 0xda => {
                let n = self.len(2)?;
                skip(self, n)
            }
            0xc6 | 0xdb => {
                let n = self.len(4)?;
                skip(self, n)
            }
            0xc7 => {
                let n = self.len(1)?;
                skip(self, n + 1)
            }
            0xc8 => {
                let n = self.len(2)?;
                skip(self, n + 1)
            }
            0xc9 => {
                let n = self.len(4)?;
                skip(self, n.checked_add(1).ok_or_else(|| self.eof())?)
            }
            0xca => skip(self, 4),
            0xcb => skip(self, 8),
            0xcc | 0xd0 => skip(self, 1),
            0xcd | 0xd1 => skip(self, 2),
            0xce | 0xd2 => skip(self, 4),
            0xcf | 0xd3 => skip(self, 8),
            0xd4 => skip(self, 2),
            0xd5 => skip(self, 3),
            0xd6 => skip(self, 5),
            0xd7 => skip(self, 9),
            0xd8 => skip(self, 17),
            0xdc => self.len(2),
            0xdd => self.len(4),
            0xde => self.len(2).map(|n| n * 2),
            0xdf => self.len(4).map(|n| n * 2),
        }
    }

    /// Skips one value, checking its structure (markers, lengths, depth),
    /// not its contents: what the reference decoder checks of a value it
    /// ignores. `depth` is the nesting already around it.
    pub fn skip_at(&mut self, depth: usize) -> Result<()> {
        // Values still to read at each open level; iterative, so a deep
        // value cannot overflow the stack.
        let mut pending: Vec<usize> = Vec::new();
        let mut todo = 1usize;
        loop {
            if todo == 0 {
                match pending.pop() {
                    Some(t) => {
                        todo = t;
                        continue;
                    }
                    None => return Ok(()),
                }
            }
            todo -= 1;
            let at = self.pos;
            let inner = self.header()?;
            if inner > 0 {
                if depth + pending.len() + 1 > MAX_DEPTH {
                    return Err(malformed("nested deeper than the reader allows", at));
                }
                // A length no payload could hold is truncated, not an allocation.
                if inner > self.buf.len() - self.pos {
                    return Err(self.eof());
                }
                pending.push(todo);
                todo = inner;
            }
        }
    }

    pub fn skip(&mut self) -> Result<()> {
        self.skip_at(0)
    }

    /// The raw bytes of the next value, skipped.
    pub fn raw(&mut self) -> Result<&'a [u8]> {
        let start = self.pos;
        self.skip()?;
        Ok(&self.buf[start..self.pos])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_of_every_width() {
        let cases: &[(&[u8], i128)] = &[
            (&[0x05], 5),
            (&[0xff], -1),
            (&[0xe0], -32),
            (&[0xcc, 0xff], 255),
            (&[0xcd, 0x01, 0x00], 256),
            (&[0xce, 0xff, 0xff, 0xff, 0xff], 4294967295),
            (&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], 18446744073709551615),
            (&[0xd0, 0x80], -128),
            (&[0xd1, 0x80, 0x00], -32768),
            (&[0xd2, 0x80, 0, 0, 0], -2147483648),
            (&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0], i128::from(i64::MIN)),
        ];
        for (bytes, want) in cases {
            let mut r = Reader::new(bytes);
            assert_eq!(r.int(), Ok(*want));
            assert!(r.at_end());
        }
        assert_eq!(Reader::new(&[0xc3]).int(), Err(Kind::Bool));
        assert_eq!(Reader::new(&[0xcb, 0, 0, 0, 0, 0, 0, 0, 0]).int(), Err(Kind::Float));
    }

    /// msgpack's smallest encoding of a u32, as engines write token ids.
    fn enc_u32(x: u32, out: &mut Vec<u8>) {
        match x {
            0..=0x7f => out.push(x as u8),
            0x80..=0xff => out.extend([0xcc, x as u8]),
            0x100..=0xffff => out.push(0xcd),
            _ => out.push(0xce),
        }
        if (0x100..=0xffff).contains(&x) {
            out.extend((x as u16).to_be_bytes());
        } else if x > 0xffff {
            out.extend(x.to_be_bytes());
        }
    }

    #[test]
    fn small_uints_reads_runs_and_mixes_of_every_width_and_stops_where_int_must_go_on() {
        // Runs of one width (the four-at-once path), mixes, and tails shorter than a run.
        let widths: [&[u32]; 6] = [&[70_000], &[300], &[5], &[200], &[70_000, 5], &[300, 70_000, 200]];
        let mut seed = 7u32;
        for len in [0usize, 1, 3, 4, 5, 7, 8, 9, 17, 64] {
            for pattern in widths {
                let mut ids = Vec::new();
                for i in 0..len {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    let base = pattern[i % pattern.len()];
                    ids.push(base + (seed >> 28) % 16);
                }
                let mut buf = Vec::new();
                ids.iter().for_each(|&x| enc_u32(x, &mut buf));
                buf.push(0xd3); // an int small_uints leaves to Reader::int
                buf.extend([0xff; 8]);
                let mut r = Reader::new(&buf);
                let mut got = Vec::new();
                // Nine bytes follow the ids: it reads every one of them
                // and stops at the int it leaves to Reader::int.
                assert_eq!(r.small_uints(len + 1, &mut got), len);
                assert_eq!(got, ids);
                assert_eq!(r.small_uint(), None);
                assert_eq!(r.int(), Ok(-1));
                assert!(r.at_end());
            }
        }
    }

    #[test]
    fn small_uints_stops_within_five_bytes_of_the_end_and_the_rest_reads_one_by_one() {
        let mut r = Reader::new(&[0x01, 0xcd, 0x01, 0x00]);
        let mut got = Vec::new();
        assert_eq!(r.small_uints(2, &mut got), 0);
        assert_eq!((r.small_uint(), r.small_uint(), r.at_end()), (Some(1), Some(256), true));
    }

    #[test]
    fn skip_checks_structure_and_depth() {
        assert!(Reader::new(&[0x92, 0x01, 0xc1]).skip().is_err());
        assert!(Reader::new(&[0x92, 0x01]).skip().is_err());
        assert!(Reader::new(&[0xdd, 0xff, 0xff, 0xff, 0xff]).skip().is_err());
        let mut deep = vec![0x91u8; MAX_DEPTH + 1];
        deep.push(0x01);
        assert!(Reader::new(&deep).skip().is_err());
        let ok = &deep[1..];
        let mut r = Reader::new(ok);
        assert!(r.skip().is_ok() && r.at_end());
        let mut r = Reader::new(&[0x82, 0xa1, b'a', 0xc0, 0xa1, b'b', 0xd4, 0x01, 0x02, 0x07]);
        assert_eq!(r.raw().map(|s| s.len()), Ok(9));
    }
}
