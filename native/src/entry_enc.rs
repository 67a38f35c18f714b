//! The owner's side of `entry.rs`: one log entry encoded as
//! `mesh.engine_log.entry.encode_entry` encodes it (msgspec, array-like
//! structs), byte for byte, with the [`Entry`] a non-owner's `decode_entry`
//! would read from those bytes built while writing them (no re-parse). The
//! owner appends the bytes to its log and applies the `PackedEntry` to its
//! index without a Python object per block; the wire format stays msgspec's,
//! so a pure-Python replica reads it unchanged.
//!
//! msgspec writes every value in its smallest msgpack form: a non-negative
//! int as positive fixint (< 2^7), uint8, uint16, uint32 or uint64, a
//! negative one as negative fixint (>= -32), int8, int16, int32 or int64
//! (never an unsigned form for a negative or a signed one for a
//! non-negative); a str as fixstr (< 32 bytes), str8, str16 or str32;
//! bytes as bin8, bin16 or bin32; an array's length as fixarray (< 16),
//! array16 or array32. A struct is an array of all its fields, defaults
//! included: a delta `[worker, seq, ops]`, an op `[kind, hashes, ehashes,
//! tier]`.

use crate::entry::{Delta, Entry, Op as EntryOp, OP_CLEAR, OP_STORE};
use crate::events::EHash;
use crate::index::N_TIERS;
use crate::mapper::Op;
use crate::msgpack::Reader;
use pyo3::exceptions::{PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyString, PyTuple};

/// Something msgpack cannot hold or a replica would refuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodeError(pub String);

pub type Result<T> = std::result::Result<T, EncodeError>;

fn too_long(what: &str, n: usize) -> EncodeError {
    EncodeError(format!("{what} of {n} items or bytes is longer than msgpack holds"))
}

#[inline]
pub fn write_uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v <= 0xff {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= 0xffff {
        let b = (v as u16).to_be_bytes();
        out.extend_from_slice(&[0xcd, b[0], b[1]]);
    } else if v <= 0xffff_ffff {
        let b = (v as u32).to_be_bytes();
        out.extend_from_slice(&[0xce, b[0], b[1], b[2], b[3]]);
    } else {
        let b = v.to_be_bytes();
        out.extend_from_slice(&[0xcf, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    }
}

fn out_of_range(v: i128) -> EncodeError {
    EncodeError(format!("can't serialize ints < -2**63 or > 2**64 - 1: {v}"))
}

/// An int in msgspec's form; an error outside [-2^63, 2^64), as msgspec's.
pub fn write_int(out: &mut Vec<u8>, v: i128) -> Result<()> {
    if let Ok(u) = u64::try_from(v) {
        write_uint(out, u);
    } else if v > 0 {
        return Err(out_of_range(v));
    } else if v >= -32 {
        out.push(v as i8 as u8);
    } else if v >= i128::from(i8::MIN) {
        out.extend_from_slice(&[0xd0, v as i8 as u8]);
    } else if v >= i128::from(i16::MIN) {
        out.push(0xd1);
        out.extend_from_slice(&(v as i16).to_be_bytes());
    } else if v >= i128::from(i32::MIN) {
        out.push(0xd2);
        out.extend_from_slice(&(v as i32).to_be_bytes());
    } else if v >= i128::from(i64::MIN) {
        out.push(0xd3);
        out.extend_from_slice(&(v as i64).to_be_bytes());
    } else {
        return Err(out_of_range(v));
    }
    Ok(())
}

/// A length field: the short form's marker base and limit, then the 8-, 16-
/// and 32-bit markers (None where the type has no 8-bit form).
fn write_len(out: &mut Vec<u8>, n: usize, fix: (u8, usize), m8: Option<u8>, m16: u8, m32: u8) -> bool {
    if n < fix.1 {
        out.push(fix.0 | n as u8);
    } else if let (Some(m), true) = (m8, n <= 0xff) {
        out.extend_from_slice(&[m, n as u8]);
    } else if n <= 0xffff {
        out.push(m16);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if let Ok(n) = u32::try_from(n) {
        out.push(m32);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        return false;
    }
    true
}

pub fn write_array_len(out: &mut Vec<u8>, n: usize) -> Result<()> {
    write_len(out, n, (0x90, 16), None, 0xdc, 0xdd).then_some(()).ok_or_else(|| too_long("an array", n))
}

pub fn write_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
    if !write_len(out, s.len(), (0xa0, 32), Some(0xd9), 0xda, 0xdb) {
        return Err(too_long("a str", s.len()));
    }
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

pub fn write_bin(out: &mut Vec<u8>, b: &[u8]) -> Result<()> {
    // bin has no fix form: a limit of 0 never takes it.
    if !write_len(out, b.len(), (0, 0), Some(0xc4), 0xc5, 0xc6) {
        return Err(too_long("bytes", b.len()));
    }
    out.extend_from_slice(b);
    Ok(())
}

/// What `validate_delta` checks of an op (the mapper's ops pass; checked so
/// that no entry a replica would refuse is ever made).
fn check_op(worker: &str, op: &Op) -> Result<()> {
    if op.kind > OP_CLEAR || op.tier >= N_TIERS as u8 {
        return Err(EncodeError(format!("op kind {} on tier {} for worker {worker:?}", op.kind, op.tier)));
    }
    if !op.ehashes.is_empty() {
        if op.kind == OP_CLEAR {
            return Err(EncodeError(format!("CLEAR with engine hashes for worker {worker:?}")));
        }
        if op.kind == OP_STORE && op.ehashes.len() != op.hashes.len() {
            return Err(EncodeError(format!(
                "STORE of {} router and {} engine hashes for worker {worker:?}",
                op.hashes.len(),
                op.ehashes.len()
            )));
        }
    }
    Ok(())
}

/// The seqs a log entry holds (`validate_delta`: -1 is a synthetic reset).
pub fn check_seq(seq: i128) -> Result<()> {
    if seq < -1 || seq > i128::from(u64::MAX) {
        return Err(EncodeError(format!("seq {seq} is outside a log entry's [-1, 2**64)")));
    }
    Ok(())
}

/// `encode_entry([KvDelta(worker, seq, ops)])` and the entry it decodes to.
pub fn encode_delta(worker: &str, seq: i128, ops: &[Op]) -> Result<(Entry, Vec<u8>)> {
    check_seq(seq)?;
    let n_h: usize = ops.iter().map(|op| op.hashes.len()).sum();
    let n_eh: usize = ops.iter().map(|op| op.ehashes.len()).sum();
    // Ints take at most 9 bytes; engine hashes that are bytes grow it once.
    let mut raw = Vec::with_capacity(16 + worker.len() + 9 * (n_h + n_eh) + 24 * ops.len());
    let mut e = Entry {
        deltas: Vec::with_capacity(1),
        ops: Vec::with_capacity(ops.len()),
        hashes: Vec::with_capacity(n_h),
    };
    raw.extend_from_slice(&[0x91, 0x93]); // one delta, of three fields
    write_str(&mut raw, worker)?;
    write_int(&mut raw, seq)?;
    write_array_len(&mut raw, ops.len())?;
    for op in ops {
        check_op(worker, op)?;
        raw.push(0x94); // four fields, the defaults too
        write_uint(&mut raw, u64::from(op.kind));
        write_array_len(&mut raw, op.hashes.len())?;
        for &h in &op.hashes {
            write_uint(&mut raw, h);
        }
        let h0 = e.hashes.len();
        e.hashes.extend_from_slice(&op.hashes);
        write_array_len(&mut raw, op.ehashes.len())?;
        let start = raw.len();
        for eh in &op.ehashes {
            match eh {
                EHash::Int(v) => write_int(&mut raw, *v)?,
                EHash::Bytes(b) => write_bin(&mut raw, b)?,
            }
        }
        let ehashes = start..raw.len();
        write_uint(&mut raw, u64::from(op.tier));
        e.ops.push(EntryOp {
            kind: op.kind,
            tier: op.tier,
            hashes: h0..e.hashes.len(),
            ehashes,
            n_ehashes: op.ehashes.len(),
        });
    }
    e.deltas.push(Delta { worker: worker.to_owned(), seq, ops: 0..e.ops.len() });
    Ok((e, raw))
}

/// The bytes of an entry's array header.
fn header_len(raw: &[u8]) -> Result<usize> {
    let mut r = Reader::new(raw);
    r.array_len().map_err(|_| EncodeError("a packed entry that is not an array".into()))?;
    Ok(r.pos)
}

/// The entries' deltas as one entry, in order: the header of the total
/// count, then each entry's delta items, ranges shifted. Byte-equal to
/// `encode_entry` of all the deltas when each part is (as the owner's are);
/// a part decoded from another writer's longer header still joins into an
/// entry that decodes to the same deltas.
pub fn join(parts: &[(&Entry, &[u8])]) -> Result<(Entry, Vec<u8>)> {
    let n: usize = parts.iter().map(|(e, _)| e.deltas.len()).sum();
    let size: usize = parts.iter().map(|(_, raw)| raw.len()).sum();
    let mut raw = Vec::with_capacity(size + 5);
    write_array_len(&mut raw, n)?;
    let mut out = Entry {
        deltas: Vec::with_capacity(n),
        ops: Vec::with_capacity(parts.iter().map(|(e, _)| e.ops.len()).sum()),
        hashes: Vec::with_capacity(parts.iter().map(|(e, _)| e.hashes.len()).sum()),
    };
    for (e, part) in parts {
        let skip = header_len(part)?;
        // A byte at `b >= skip` of the part lands at `b - skip + base`.
        let base = raw.len();
        raw.extend_from_slice(&part[skip..]);
        let (op0, h0) = (out.ops.len(), out.hashes.len());
        out.hashes.extend_from_slice(&e.hashes);
        out.ops.extend(e.ops.iter().map(|op| EntryOp {
            kind: op.kind,
            tier: op.tier,
            hashes: op.hashes.start + h0..op.hashes.end + h0,
            ehashes: op.ehashes.start - skip + base..op.ehashes.end - skip + base,
            n_ehashes: op.n_ehashes,
        }));
        out.deltas.extend(e.deltas.iter().map(|d| Delta {
            worker: d.worker.clone(),
            seq: d.seq,
            ops: d.ops.start + op0..d.ops.end + op0,
        }));
    }
    Ok((out, raw))
}

// --- Python ---------------------------------------------------------------------

/// `entries`' deltas as one `PackedEntry`, in order (what appending them as
/// one entry writes: `raw` is `encode_entry` of all their deltas); a single
/// entry is returned as it is. ValueError for no entries.
#[pyfunction]
pub fn join_entries(
    py: Python<'_>,
    entries: Vec<Bound<'_, crate::entry::PackedEntry>>,
) -> PyResult<Py<PyAny>> {
    match entries.len() {
        0 => return Err(PyValueError::new_err("join_entries of no entries")),
        1 => return Ok(entries[0].clone().into_any().unbind()),
        _ => {}
    }
    let got: Vec<&crate::entry::PackedEntry> = entries.iter().map(|e| e.get()).collect();
    let parts: Vec<(&Entry, &[u8])> = got.iter().map(|p| (&p.entry, p.raw.bind(py).as_bytes())).collect();
    let (entry, raw) =
        crate::guarded(crate::value_error, || join(&parts).map_err(|e| PyValueError::new_err(e.0)))?;
    let workers: Vec<Py<PyString>> =
        got.iter().flat_map(|p| p.workers.iter().map(|w| w.clone_ref(py))).collect();
    let heads: Vec<Bound<'_, PyAny>> = got.iter().flat_map(|p| p.heads.bind(py).iter()).collect();
    let packed = crate::entry::PackedEntry {
        entry,
        workers,
        heads: PyTuple::new(py, heads)?.unbind(),
        raw: PyBytes::new(py, &raw).unbind(),
    };
    Ok(Bound::new(py, packed)?.into_any().unbind())
}

/// `map_frame_packed`'s entry: one delta of `worker` (a str) at `seq`.
pub fn packed_delta(
    py: Python<'_>,
    worker: &Bound<'_, PyString>,
    seq: i128,
    ops: &[Op],
) -> PyResult<crate::entry::PackedEntry> {
    let name = worker.to_str()?;
    let (entry, raw) = encode_delta(name, seq, ops)
        .map_err(|e| PyRuntimeError::new_err(format!("kvmesh_native: no log entry: {}", e.0)))?;
    crate::entry::PackedEntry::from_parts(py, entry, vec![worker.clone().unbind()], PyBytes::new(py, &raw))
}

/// A seq for `packed_delta`, read before anything changes: an int (never a
/// bool, which msgspec would write as one) in [-1, 2^64).
pub fn seq_of(seq: &Bound<'_, PyAny>) -> PyResult<i128> {
    if seq.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err("seq must be an int, got bool"));
    }
    let v: i128 = seq.extract()?;
    check_seq(v).map_err(|e| PyOverflowError::new_err(e.0))?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::decode;

    fn int(v: i128) -> Vec<u8> {
        let mut out = Vec::new();
        write_int(&mut out, v).expect("in range");
        out
    }

    #[test]
    fn ints_take_msgspecs_smallest_form() {
        let cases: &[(i128, &[u8])] = &[
            (0, &[0x00]),
            (127, &[0x7f]),
            (128, &[0xcc, 0x80]),
            (255, &[0xcc, 0xff]),
            (256, &[0xcd, 0x01, 0x00]),
            (65535, &[0xcd, 0xff, 0xff]),
            (65536, &[0xce, 0x00, 0x01, 0x00, 0x00]),
            (0xffff_ffff, &[0xce, 0xff, 0xff, 0xff, 0xff]),
            (1 << 32, &[0xcf, 0, 0, 0, 1, 0, 0, 0, 0]),
            (i128::from(u64::MAX), &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            (-1, &[0xff]),
            (-32, &[0xe0]),
            (-33, &[0xd0, 0xdf]),
            (-128, &[0xd0, 0x80]),
            (-129, &[0xd1, 0xff, 0x7f]),
            (-32768, &[0xd1, 0x80, 0x00]),
            (-32769, &[0xd2, 0xff, 0xff, 0x7f, 0xff]),
            (i128::from(i32::MIN), &[0xd2, 0x80, 0, 0, 0]),
            (i128::from(i32::MIN) - 1, &[0xd3, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff]),
            (i128::from(i64::MIN), &[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        ];
        for (v, want) in cases {
            assert_eq!(int(*v), *want, "{v}");
            assert_eq!(Reader::new(want).int(), Ok(*v));
        }
        let mut out = Vec::new();
        assert!(write_int(&mut out, i128::from(u64::MAX) + 1).is_err());
        assert!(write_int(&mut out, i128::from(i64::MIN) - 1).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn strs_bins_and_arrays_take_their_smallest_header() {
        // The header alone: what is written before the n bytes of the value.
        let s = |n: usize| {
            let mut o = Vec::new();
            write_str(&mut o, &"a".repeat(n)).expect("fits");
            o.truncate(o.len() - n);
            o
        };
        let b = |n: usize| {
            let mut o = Vec::new();
            write_bin(&mut o, &vec![7u8; n]).expect("fits");
            o.truncate(o.len() - n);
            o
        };
        let a = |n: usize| {
            let mut o = Vec::new();
            write_array_len(&mut o, n).expect("fits");
            o
        };
        assert_eq!(s(0), [0xa0]);
        assert_eq!(s(31), [0xbf]);
        assert_eq!(s(32), [0xd9, 32]);
        assert_eq!(s(255), [0xd9, 0xff]);
        assert_eq!(s(256), [0xda, 0x01, 0x00]);
        assert_eq!(s(65535), [0xda, 0xff, 0xff]);
        assert_eq!(s(65536), [0xdb, 0, 1, 0, 0]);
        assert_eq!(b(0), [0xc4, 0]);
        assert_eq!(b(255), [0xc4, 0xff]);
        assert_eq!(b(256), [0xc5, 0x01, 0x00]);
        assert_eq!(b(65535), [0xc5, 0xff, 0xff]);
        assert_eq!(b(65536), [0xc6, 0, 1, 0, 0]);
        assert_eq!(a(0), [0x90]);
        assert_eq!(a(15), [0x9f]);
        assert_eq!(a(16), [0xdc, 0, 16]);
        assert_eq!(a(65535), [0xdc, 0xff, 0xff]);
        assert_eq!(a(65536), [0xdd, 0, 1, 0, 0]);
        let mut w = Vec::new();
        write_str(&mut w, "é").expect("fits");
        assert_eq!(w, [0xa2, 0xc3, 0xa9]); // a str's length is its UTF-8 bytes
    }

    fn op(kind: u8, tier: u8, hashes: Vec<u64>, ehashes: Vec<EHash>) -> Op {
        Op { kind, tier, hashes, ehashes }
    }

    fn ascii(_: &str) -> bool {
        false
    }

    /// One op as a replica sees it: worker, seq, kind, tier, router hashes,
    /// engine hashes' bytes, their count.
    type OpView = (String, i128, u8, u8, Vec<u64>, Vec<u8>, usize);

    /// What a replica's `decode` reads from `raw`, as comparable values.
    fn view(e: &Entry, raw: &[u8]) -> Vec<OpView> {
        let mut out = Vec::new();
        for d in &e.deltas {
            for o in &e.ops[d.ops.clone()] {
                out.push((
                    d.worker.clone(),
                    d.seq,
                    o.kind,
                    o.tier,
                    e.hashes[o.hashes.clone()].to_vec(),
                    raw[o.ehashes.clone()].to_vec(),
                    o.n_ehashes,
                ));
            }
            if d.ops.is_empty() {
                out.push((d.worker.clone(), d.seq, 9, 9, Vec::new(), Vec::new(), 0));
            }
        }
        out
    }

    #[test]
    fn an_empty_delta_is_one_worker_seq_and_no_ops() {
        let (e, raw) = encode_delta("e", 0, &[]).expect("valid");
        assert_eq!(raw, [0x91, 0x93, 0xa1, b'e', 0x00, 0x90]);
        assert_eq!(e.deltas.len(), 1);
        assert!(e.ops.is_empty() && e.hashes.is_empty());
        let (e, raw) = encode_delta("e#dp1", -1, &[op(OP_CLEAR, 0, vec![], vec![])]).expect("valid");
        assert_eq!(
            raw,
            [0x91, 0x93, 0xa5, b'e', b'#', b'd', b'p', b'1', 0xff, 0x91, 0x94, 0x02, 0x90, 0x90, 0x00]
        );
        assert_eq!(view(&e, &raw), view(&decode(&raw, "e", &ascii).expect("decodes"), &raw));
    }

    #[test]
    fn the_entry_built_is_the_entry_decoded() {
        let ops = vec![
            op(
                OP_STORE,
                0,
                vec![1, 200, 70_000, u64::MAX],
                vec![
                    EHash::Int(-1),
                    EHash::Int(-40_000),
                    EHash::Bytes(vec![3u8; 300].into()),
                    EHash::Int(i128::from(u64::MAX)),
                ],
            ),
            op(1, 2, vec![5], vec![EHash::Bytes(Box::new([])), EHash::Int(7)]),
            op(OP_STORE, 1, (0..20).collect(), vec![]),
            op(OP_CLEAR, 0, vec![], vec![]),
        ];
        let worker = "w".repeat(40);
        let (e, raw) = encode_delta(&worker, 1 << 40, &ops).expect("valid");
        let back = decode(&raw, &worker, &ascii).expect("decodes");
        assert_eq!(view(&e, &raw), view(&back, &raw));
        assert_eq!(e.hashes, back.hashes);
        assert_eq!(raw[..4], [0x91, 0x93, 0xd9, 40]);
    }

    #[test]
    fn refuses_what_a_replica_refuses() {
        assert!(encode_delta("e", -2, &[]).is_err());
        assert!(encode_delta("e", i128::from(u64::MAX) + 1, &[]).is_err());
        assert!(encode_delta("e", 0, &[op(3, 0, vec![], vec![])]).is_err());
        assert!(encode_delta("e", 0, &[op(0, N_TIERS as u8, vec![], vec![])]).is_err());
        assert!(encode_delta("e", 0, &[op(OP_CLEAR, 0, vec![], vec![EHash::Int(1)])]).is_err());
        assert!(encode_delta("e", 0, &[op(OP_STORE, 0, vec![1, 2], vec![EHash::Int(1)])]).is_err());
        assert!(encode_delta("e", 0, &[op(OP_STORE, 0, vec![1], vec![EHash::Int(1 << 64)])]).is_err());
        assert!(encode_delta("e", 0, &[op(1, 0, vec![], vec![EHash::Int(1), EHash::Int(2)])]).is_ok());
    }

    #[test]
    fn joined_entries_are_one_entry_of_all_deltas() {
        let a = encode_delta("e", 1, &[op(OP_STORE, 0, vec![9, 8], vec![EHash::Int(1), EHash::Int(2)])])
            .expect("valid");
        let b = encode_delta("e#dp3", 2, &[op(1, 1, vec![8], vec![EHash::Bytes(vec![1, 2].into())])])
            .expect("valid");
        let c = encode_delta("e", 3, &[]).expect("valid");
        let parts: Vec<(&Entry, &[u8])> = vec![(&a.0, &a.1), (&b.0, &b.1), (&c.0, &c.1)];
        let (e, raw) = join(&parts).expect("joins");
        let mut want = vec![0x93];
        for (_, r) in &parts {
            want.extend_from_slice(&r[1..]);
        }
        assert_eq!(raw, want);
        let back = decode(&raw, "e", &ascii).expect("decodes");
        assert_eq!(view(&e, &raw), view(&back, &raw));
        assert_eq!(e.hashes, vec![9, 8, 8]);
        // 16 deltas need an array16 header.
        let many: Vec<(&Entry, &[u8])> = (0..16).map(|_| (&c.0, &c.1[..])).collect();
        let (e16, raw16) = join(&many).expect("joins");
        assert_eq!(raw16[..3], [0xdc, 0, 16]);
        assert_eq!(e16.deltas.len(), 16);
        let (j, jraw) = join(&[(&a.0, &a.1[..]), (&e16, &raw16[..])]).expect("joins");
        assert_eq!(jraw[..3], [0xdc, 0, 17]);
        assert_eq!(view(&j, &jraw), view(&decode(&jraw, "e", &ascii).expect("decodes"), &jraw));
        // Another writer's longer header (array16 of one delta) is dropped alike.
        let mut wide = vec![0xdc, 0, 1];
        wide.extend_from_slice(&a.1[1..]);
        let wide_e = decode(&wide, "e", &ascii).expect("decodes");
        let (j, jraw) = join(&[(&b.0, &b.1[..]), (&wide_e, &wide[..])]).expect("joins");
        let mut want = vec![0x92];
        want.extend_from_slice(&b.1[1..]);
        want.extend_from_slice(&a.1[1..]);
        assert_eq!(jraw, want);
        assert_eq!(view(&j, &jraw), view(&decode(&jraw, "e", &ascii).expect("decodes"), &jraw));
    }
}
