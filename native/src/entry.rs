//! One entry of an engine's replicated log (`mesh/engine_log/entry.py`),
//! the msgpack of `list[KvDelta]`, decoded and validated for a non-owner's
//! index without a Python object per block.
//!
//! [`decode`] accepts exactly what `entry.decode_entry` (msgspec's typed
//! decode: strict ints, never a bool or float; `str` workers; op arrays of
//! 2 to 4 items with `ehashes = []` and `tier = 0` as defaults; trailing
//! items of a struct array ignored but checked as msgpack) followed by
//! `validate_delta` on every delta accepts, and refuses the rest whole: a
//! replica skips a bad entry, never part of one. The router hashes of all
//! ops are one flat `Vec<u64>`; engine hashes are only counted and located
//! (the index never reads them) and are read again by `to_deltas`.
//!
//! `PackedEntry` (made by `decode_entry`) is what `mesh` hands the index:
//! `NativeIndex._apply_packed` (`pyindex.rs`) applies it in one call.

use crate::index::N_TIERS;
use crate::msgpack::{expected, malformed, Error, Kind, Reader, Result};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyString, PyTuple, PyType};
use std::ops::Range;

pub const OP_STORE: u8 = 0;
pub const OP_REMOVE: u8 = 1;
pub const OP_CLEAR: u8 = 2;
const DP_SEPARATOR: &str = "#dp"; // blocks/workers.py

pub struct Op {
    pub kind: u8,
    pub tier: u8,
    pub hashes: Range<usize>,  // in `Entry::hashes`
    pub ehashes: Range<usize>, // bytes of the engine hashes' items in the entry
    pub n_ehashes: usize,
}

pub struct Delta {
    pub worker: String,
    pub seq: i128,
    pub ops: Range<usize>, // in `Entry::ops`
}

#[derive(Default)]
pub struct Entry {
    pub deltas: Vec<Delta>,
    pub ops: Vec<Op>,
    pub hashes: Vec<u64>,
}

/// `blocks.workers.engine_of`: the part before the last `#dp` when what
/// follows is a (Python `str.isdecimal`) rank, else the whole worker.
pub fn engine_of<'a>(worker: &'a str, is_decimal: &dyn Fn(&str) -> bool) -> &'a str {
    if let Some(i) = worker.rfind(DP_SEPARATOR) {
        let rank = &worker[i + DP_SEPARATOR.len()..];
        let digits = if rank.is_ascii() {
            !rank.is_empty() && rank.bytes().all(|b| b.is_ascii_digit())
        } else {
            is_decimal(rank) // Unicode digits count too; Python knows which
        };
        if digits {
            return &worker[..i];
        }
    }
    worker
}

/// The error for a value of kind `k` where `want` belongs (truncated when
/// the reader stopped at the end).
fn want(r: &Reader<'_>, what: &str, k: Kind, path: impl FnOnce() -> String) -> Error {
    if k == Kind::Reserved && r.at_end() {
        Error("Input data was truncated".into())
    } else {
        expected(what, k, &path())
    }
}

fn array(r: &mut Reader<'_>, path: impl FnOnce() -> String) -> Result<usize> {
    r.array_len().map_err(|k| want(r, "array", k, path))
}

fn int(r: &mut Reader<'_>, path: impl FnOnce() -> String) -> Result<i128> {
    r.int().map_err(|k| want(r, "int", k, path))
}

/// A struct array of at least `min` items.
fn struct_array(r: &mut Reader<'_>, min: usize, path: impl Fn() -> String) -> Result<usize> {
    let n = array(r, &path)?;
    if n < min {
        return Err(Error(format!("Expected `array` of at least length {min}, got {n} - at `{}`", path())));
    }
    Ok(n)
}

/// An engine hash (`int | bytes`); false for anything else.
fn ehash(r: &mut Reader<'_>) -> bool {
    r.int().is_ok() || r.bin().is_ok()
}

/// Decodes and validates one entry of `engine_id`'s log (see the module
/// docstring). `is_decimal` is Python's `str.isdecimal`, for a non-ASCII rank.
pub fn decode(raw: &[u8], engine_id: &str, is_decimal: &dyn Fn(&str) -> bool) -> Result<Entry> {
    let mut r = Reader::new(raw);
    let mut e = Entry::default();
    let n = array(&mut r, String::new)?;
    // Declared lengths are never trusted for allocation.
    let room = |r: &Reader<'_>, n: usize| n.min(r.buf.len() - r.pos);
    e.deltas.reserve(room(&r, n));
    for i in 0..n {
        let at = || format!("$[{i}]");
        let items = struct_array(&mut r, 3, at)?;
        let worker = r.str(&format!("$[{i}][0]"))?.to_owned();
        let seq = int(&mut r, || format!("$[{i}][1]"))?;
        if engine_of(&worker, is_decimal) != engine_id {
            return Err(Error(format!("worker {worker:?} is not a worker of engine {engine_id:?}")));
        }
        if seq < -1 {
            return Err(Error(format!("bad seq {seq} for worker {worker:?}")));
        }
        let n_ops = array(&mut r, || format!("$[{i}][2]"))?;
        let first_op = e.ops.len();
        e.ops.reserve(room(&r, n_ops));
        for j in 0..n_ops {
            let at = || format!("$[{i}][2][{j}]");
            let fields = struct_array(&mut r, 2, at)?;
            let kind = int(&mut r, || format!("{}[0]", at()))?;
            let n_h = array(&mut r, || format!("{}[1]", at()))?;
            let h0 = e.hashes.len();
            e.hashes.reserve(room(&r, n_h));
            for k in 0..n_h {
                let h = int(&mut r, || format!("{}[1][{k}]", at()))?;
                let h = u64::try_from(h).map_err(|_| {
                    Error(format!("block hash out of unsigned 64-bit range for worker {worker:?}"))
                })?;
                e.hashes.push(h);
            }
            let (mut ehashes, mut n_eh) = (r.pos..r.pos, 0);
            if fields > 2 {
                n_eh = array(&mut r, || format!("{}[2]", at()))?;
                let start = r.pos;
                for k in 0..n_eh {
                    if !ehash(&mut r) {
                        let kind = r.peek_kind().unwrap_or(Kind::Reserved);
                        return Err(want(&r, "int | bytes", kind, || format!("{}[2][{k}]", at())));
                    }
                }
                ehashes = start..r.pos;
            }
            let tier = if fields > 3 { int(&mut r, || format!("{}[3]", at()))? } else { 0 };
            for _ in 4..fields {
                r.skip_at(4)?;
            }
            if !(i128::from(OP_STORE)..=i128::from(OP_CLEAR)).contains(&kind) {
                return Err(Error(format!("unknown op kind {kind} for worker {worker:?}")));
            }
            if !(0..N_TIERS as i128).contains(&tier) {
                return Err(Error(format!("unknown cache tier {tier} for worker {worker:?}")));
            }
            let (kind, tier) = (kind as u8, tier as u8);
            let n_h = e.hashes.len() - h0;
            if n_eh > 0 && kind == OP_CLEAR {
                return Err(Error(format!("CLEAR with engine hashes for worker {worker:?}")));
            }
            if n_eh > 0 && kind == OP_STORE && n_eh != n_h {
                return Err(Error(format!(
                    "STORE of {n_h} router and {n_eh} engine hashes for worker {worker:?}"
                )));
            }
            e.ops.push(Op { kind, tier, hashes: h0..e.hashes.len(), ehashes, n_ehashes: n_eh });
        }
        for _ in 3..items {
            r.skip_at(2)?;
        }
        e.deltas.push(Delta { worker, seq, ops: first_op..e.ops.len() });
    }
    if !r.at_end() {
        return Err(malformed("trailing characters", r.pos));
    }
    Ok(e)
}

// --- Python ---------------------------------------------------------------------

/// A decoded, validated log entry (see the module docstring). Immutable.
#[pyclass(frozen, module = "kvmesh_native")]
pub struct PackedEntry {
    pub(crate) entry: Entry,
    pub(crate) workers: Vec<Py<PyString>>, // per delta
    pub(crate) heads: Py<PyTuple>,         // ((worker, seq), ...)
    pub(crate) raw: Py<PyBytes>,           // the entry, for its engine hashes
}

impl PackedEntry {
    /// An entry from its bytes and what they decode to (`workers`: one per
    /// delta, equal to its `worker`); the caller vouches that `raw` decodes
    /// and validates to `entry` (`decode_entry`, `entry_enc`).
    pub fn from_parts(
        py: Python<'_>,
        entry: Entry,
        workers: Vec<Py<PyString>>,
        raw: Bound<'_, PyBytes>,
    ) -> PyResult<PackedEntry> {
        let heads = entry
            .deltas
            .iter()
            .zip(&workers)
            .map(|(d, w)| PyTuple::new(py, [w.bind(py).clone().into_any(), int_py(py, d.seq)?]))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(PackedEntry { entry, workers, heads: PyTuple::new(py, heads)?.unbind(), raw: raw.unbind() })
    }

    pub fn len(&self) -> usize {
        self.entry.deltas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entry.deltas.is_empty()
    }

    /// Delta `i`'s worker.
    pub fn worker<'py>(&self, py: Python<'py>, i: usize) -> &Bound<'py, PyAny> {
        self.workers[i].bind(py).as_any()
    }

    /// Delta `i`'s ops as (kind, tier, router hashes), in order.
    pub fn ops(&self, i: usize) -> impl Iterator<Item = (u8, usize, &[u64])> {
        let e = &self.entry;
        e.ops[e.deltas[i].ops.clone()]
            .iter()
            .map(|op| (op.kind, usize::from(op.tier), &e.hashes[op.hashes.clone()]))
    }

    /// The decoded entry (its `Op::ehashes` are ranges of `raw_bytes`).
    pub fn decoded(&self) -> &Entry {
        &self.entry
    }

    /// The entry's bytes.
    pub fn raw_bytes<'a>(&'a self, py: Python<'a>) -> &'a [u8] {
        self.raw.bind(py).as_bytes()
    }
}

fn int_py(py: Python<'_>, v: i128) -> PyResult<Bound<'_, PyAny>> {
    Ok(match i64::try_from(v) {
        Ok(i) => i.into_pyobject(py)?.into_any(),
        Err(_) => v.into_pyobject(py)?.into_any(),
    })
}

/// The engine hashes of `op`, read again from the entry (checked when decoded).
fn ehashes_py<'py>(py: Python<'py>, raw: &[u8], op: &Op) -> PyResult<Bound<'py, PyList>> {
    let mut r = Reader::new(&raw[op.ehashes.clone()]);
    let mut out = Vec::with_capacity(op.n_ehashes);
    for _ in 0..op.n_ehashes {
        if let Ok(v) = r.int() {
            out.push(int_py(py, v)?);
        } else {
            let b = r.bin().map_err(|_| PyValueError::new_err("kvmesh_native: engine hash not re-read"))?;
            out.push(PyBytes::new(py, b).into_any());
        }
    }
    PyList::new(py, out)
}

#[pymethods]
impl PackedEntry {
    /// `(worker, seq)` of each delta, in order.
    #[getter]
    fn heads(&self, py: Python<'_>) -> Py<PyTuple> {
        self.heads.clone_ref(py)
    }

    /// Router hashes in all ops (the blocks the index will touch).
    #[getter]
    fn blocks(&self) -> usize {
        self.entry.hashes.len()
    }

    /// The entry's bytes (what the log holds).
    #[getter]
    fn raw(&self, py: Python<'_>) -> Py<PyBytes> {
        self.raw.clone_ref(py)
    }

    fn __len__(&self) -> usize {
        self.len()
    }

    fn __repr__(&self) -> String {
        format!("PackedEntry(deltas={}, blocks={})", self.len(), self.entry.hashes.len())
    }

    /// The entry as `list[KvDelta]`, equal to `mesh.engine_log.entry.decode_entry`'s.
    fn to_deltas<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        static DELTA: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        static OP: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        let delta_cls = DELTA.import(py, "blocks.delta", "KvDelta")?;
        let op_cls = OP.import(py, "blocks.delta", "KvOp")?;
        let raw = self.raw.bind(py).as_bytes();
        let e = &self.entry;
        let mut out = Vec::with_capacity(e.deltas.len());
        for (d, w) in e.deltas.iter().zip(&self.workers) {
            let ops = e.ops[d.ops.clone()]
                .iter()
                .map(|op| {
                    let hs = PyList::new(py, &e.hashes[op.hashes.clone()])?;
                    op_cls.call1((op.kind, hs, ehashes_py(py, raw, op)?, op.tier))
                })
                .collect::<PyResult<Vec<_>>>()?;
            out.push(delta_cls.call1((w.bind(py), int_py(py, d.seq)?, PyList::new(py, ops)?))?);
        }
        PyList::new(py, out)
    }
}

/// Decode and validate one log entry of `engine_id` (see the module
/// docstring): a `PackedEntry`, ValueError for an entry a replica must
/// skip (and for an empty engine id), TypeError for `raw` not bytes.
#[pyfunction]
pub fn decode_entry(py: Python<'_>, engine_id: &str, raw: &Bound<'_, PyAny>) -> PyResult<PackedEntry> {
    let raw: Bound<'_, PyBytes> = if let Ok(b) = raw.cast::<PyBytes>() {
        b.clone()
    } else if let Ok(b) = raw.cast::<PyByteArray>() {
        PyBytes::new(py, &b.to_vec())
    } else {
        return Err(PyTypeError::new_err(format!(
            "a log entry must be bytes, got {}",
            raw.get_type().name()?
        )));
    };
    if engine_id.is_empty() {
        return Err(PyValueError::new_err("engine id must be non-empty"));
    }
    let is_decimal = |s: &str| {
        PyString::new(py, s).call_method0("isdecimal").and_then(|v| v.extract::<bool>()).unwrap_or(false)
    };
    let entry = crate::guarded(crate::value_error, || {
        decode(raw.as_bytes(), engine_id, &is_decimal).map_err(|e| PyValueError::new_err(e.0))
    })?;
    let workers: Vec<Py<PyString>> =
        entry.deltas.iter().map(|d| PyString::new(py, &d.worker).unbind()).collect();
    PackedEntry::from_parts(py, entry, workers, raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ascii(_: &str) -> bool {
        false
    }

    // Hand-written msgpack: [[worker, seq, [[kind, hashes, ehashes, tier], ...]], ...]
    fn fixstr(s: &str) -> Vec<u8> {
        let mut v = vec![0xa0 | s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn delta(worker: &str, seq: u8, ops: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![0x93];
        v.extend(fixstr(worker));
        v.push(seq);
        v.push(0x90 | ops.len() as u8);
        for op in ops {
            v.extend_from_slice(op);
        }
        v
    }

    fn entry(deltas: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![0x90 | deltas.len() as u8];
        for d in deltas {
            v.extend_from_slice(d);
        }
        v
    }

    #[test]
    fn decodes_ops_with_defaults_and_extras() {
        let store = vec![
            0x94, 0x00, 0x92, 0x01, 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x92, 0x07, 0xc4,
            0x01, 0xaa, 0x01,
        ];
        let remove = vec![0x92, 0x01, 0x91, 0x05];
        let clear = vec![0x95, 0x02, 0x90, 0x90, 0x00, 0xc0];
        let raw = entry(&[delta("e", 3, &[store, remove]), delta("e#dp2", 4, &[clear])]);
        let e = decode(&raw, "e", &ascii).expect("valid");
        assert_eq!(e.deltas.len(), 2);
        assert_eq!(e.deltas[1].worker, "e#dp2");
        assert_eq!(e.hashes, vec![1, u64::MAX, 5]);
        let kinds: Vec<_> = e.ops.iter().map(|o| (o.kind, o.tier, o.n_ehashes)).collect();
        assert_eq!(kinds, vec![(OP_STORE, 1, 2), (OP_REMOVE, 0, 0), (OP_CLEAR, 0, 0)]);
    }

    #[test]
    fn refuses_what_validate_delta_refuses() {
        let ok = |ops: &[Vec<u8>]| decode(&entry(&[delta("e", 0, ops)]), "e", &ascii);
        assert!(ok(&[vec![0x92, 0x03, 0x90]]).is_err()); // kind
        assert!(ok(&[vec![0x94, 0x00, 0x90, 0x90, 0x04]]).is_err()); // tier
        assert!(ok(&[vec![0x93, 0x02, 0x90, 0x91, 0x01]]).is_err()); // CLEAR with ehashes
        assert!(ok(&[vec![0x93, 0x00, 0x91, 0x01, 0x92, 0x01, 0x02]]).is_err()); // STORE lengths
        assert!(ok(&[vec![0x92, 0x01, 0x91, 0xff]]).is_err()); // negative hash
        assert!(ok(&[vec![0x92, 0x01, 0x91, 0xc3]]).is_err()); // bool
        assert!(ok(&[vec![0x92, 0x01, 0x91, 0xca, 0, 0, 0, 0]]).is_err()); // float
        assert!(ok(&[vec![0x91, 0x01]]).is_err()); // one item
        assert!(ok(&[vec![0x93, 0x01, 0x90, 0x91, 0xa1, b'x']]).is_err()); // str engine hash
        assert!(ok(&[vec![0x93, 0x01, 0x90, 0x91, 0xc4, 0x01, 0x00]]).is_ok()); // REMOVE lengths free
        assert!(ok(&[vec![0x95, 0x01, 0x90, 0x90, 0x00, 0xc1]]).is_err()); // bad trailing item
        assert!(decode(&entry(&[delta("f", 0, &[])]), "e", &ascii).is_err()); // foreign worker
        assert!(decode(&entry(&[delta("e#dpx", 0, &[])]), "e", &ascii).is_err());
        assert!(decode(&entry(&[delta("e#dp", 0, &[])]), "e", &ascii).is_err());
        assert!(decode(&entry(&[delta("e#dp1", 0, &[])]), "e", &ascii).is_ok());
        let mut raw = entry(&[delta("e", 0, &[])]);
        raw.push(0x00);
        assert!(decode(&raw, "e", &ascii).is_err()); // trailing bytes
        let raw = entry(&[delta("e", 0, &[vec![0x92, 0x00, 0x91, 0x01]])]);
        for end in 0..raw.len() {
            assert!(decode(&raw[..end], "e", &ascii).is_err());
        }
        // A declared length no payload holds is an error, not an allocation.
        assert!(decode(&[0xdd, 0xff, 0xff, 0xff, 0xff], "e", &ascii).is_err());
    }

    #[test]
    fn engine_of_follows_blocks_workers() {
        assert_eq!(engine_of("e#dp12", &ascii), "e");
        assert_eq!(engine_of("e#dp1#dp2", &ascii), "e#dp1");
        assert_eq!(engine_of("e#dp", &ascii), "e#dp");
        assert_eq!(engine_of("e#dp1x", &ascii), "e#dp1x");
        assert_eq!(engine_of("e#dp١", &|_| true), "e");
        assert_eq!(engine_of("e#dp²", &ascii), "e#dp²");
    }
}
