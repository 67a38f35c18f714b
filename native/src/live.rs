//! The live maps an engine log's owner keeps (`mesh/engine_log/live.py`'s
//! `PyLiveState` is the reference): per worker and cache tier, engine block
//! hash -> router block hash, as `blocks.block_map.BlockMap(refs=False)`
//! keeps them, with the owner's counters (mapped engine blocks, encoded
//! size of the non-identity engine hashes, lower-tier maps held) updated as
//! the maps change.
//!
//! [`Live`] is the core. `apply_entry` applies a decoded log entry
//! (`entry::decode`) straight from its bytes: an engine hash is read from
//! the entry where it is needed and looked up borrowed, so a block costs one
//! table operation and no allocation (but a bytes hash newly bound). Engine
//! hashes in `[0, 2^64)` (what engines send) live in a table of 16-byte
//! entries; any other (negative, wider, bytes) in a second table per tier.
//! `LiveMaps` is the Python class over it.

use crate::entry::{Entry, PackedEntry, OP_CLEAR, OP_REMOVE, OP_STORE};
use crate::events::EHash;
use crate::mapper::{FastHasher, FastMap};
use crate::msgpack::Reader;
use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyList, PySet, PyString, PyTuple};
use pyo3::{intern, IntoPyObjectExt};
use std::collections::{BTreeMap, HashSet};
use std::hash::Hasher;

pub const N_TIERS: usize = 4;
const INT_BYTES: u64 = 9; // `block_map.ehash_bytes` of an int: msgpack's widest int
const OVERFLOW: &str = "can't serialize ints < -2**63 or > 2**64 - 1"; // msgspec's words

/// An engine hash as an op holds it (borrowed: a packed entry's bytes, a
/// Python bytes object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key<'a> {
    Int(i128),
    Bytes(&'a [u8]),
}

impl Key<'_> {
    /// `blocks.block_map.ehash_bytes`: its msgpack size at most.
    pub fn cost(self) -> u64 {
        match self {
            Key::Int(_) => INT_BYTES,
            Key::Bytes(b) => {
                let n = b.len() as u64;
                n + if n < 256 {
                    2
                } else if n < 65536 {
                    3
                } else {
                    5
                }
            }
        }
    }

    fn owned(self) -> EHash {
        match self {
            Key::Int(v) => EHash::Int(v),
            Key::Bytes(b) => EHash::Bytes(b.into()),
        }
    }

    fn is(self, o: &EHash) -> bool {
        match (self, o) {
            (Key::Int(a), EHash::Int(b)) => a == *b,
            (Key::Bytes(a), EHash::Bytes(b)) => a == &b[..],
            _ => false,
        }
    }
}

fn key_of(o: &EHash) -> Key<'_> {
    match o {
        EHash::Int(v) => Key::Int(*v),
        EHash::Bytes(b) => Key::Bytes(b),
    }
}

/// A multiply and a fold: spreads any key set over hashbrown's bucket and
/// tag bits.
#[inline]
fn spread(h: u64) -> u64 {
    let x = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

fn wide_hash(k: Key<'_>) -> u64 {
    match k {
        Key::Int(v) => spread((v as u64) ^ ((v >> 64) as u64).rotate_left(17)),
        Key::Bytes(b) => {
            let mut h = FastHasher::default();
            h.write_u64(b.len() as u64);
            h.write(b);
            spread(h.finish())
        }
    }
}

/// One tier's map of one worker.
#[derive(Default)]
struct TierMap {
    ints: HashTable<(u64, u64)>,   // engine hashes in [0, 2^64) -> router hash
    wide: HashTable<(EHash, u64)>, // every other engine hash -> router hash
    eb: u64,                       // `ebytes`: cost of the non-identity pairs
}

impl TierMap {
    fn len(&self) -> usize {
        self.ints.len() + self.wide.len()
    }

    fn is_empty(&self) -> bool {
        self.ints.is_empty() && self.wide.is_empty()
    }

    /// Map `k` to `rh`, replacing its binding.
    #[inline]
    fn bind(&mut self, k: Key<'_>, rh: u64) {
        if let Key::Int(v) = k {
            if let Ok(e) = u64::try_from(v) {
                match self.ints.entry(spread(e), |p| p.0 == e, |p| spread(p.0)) {
                    Slot::Occupied(mut o) => {
                        let old = std::mem::replace(&mut o.get_mut().1, rh);
                        // Rebinding between an identity and another pair changes the cost.
                        if old == e && rh != e {
                            self.eb += INT_BYTES;
                        } else if old != e && rh == e {
                            self.eb -= INT_BYTES;
                        }
                    }
                    Slot::Vacant(s) => {
                        s.insert((e, rh));
                        if rh != e {
                            self.eb += INT_BYTES;
                        }
                    }
                }
                return;
            }
        }
        // Never equal to a router hash: always a non-identity pair.
        match self.wide.entry(wide_hash(k), |p| k.is(&p.0), |p| wide_hash(key_of(&p.0))) {
            Slot::Occupied(mut o) => o.get_mut().1 = rh,
            Slot::Vacant(s) => {
                s.insert((k.owned(), rh));
                self.eb += k.cost();
            }
        }
    }

    /// Forget `k` (nothing if unknown).
    #[inline]
    fn unbind(&mut self, k: Key<'_>) {
        if let Key::Int(v) = k {
            if let Ok(e) = u64::try_from(v) {
                if let Ok(o) = self.ints.find_entry(spread(e), |p| p.0 == e) {
                    let ((_, rh), _) = o.remove();
                    if rh != e {
                        self.eb -= INT_BYTES;
                    }
                }
                return;
            }
        }
        if let Ok(o) = self.wide.find_entry(wide_hash(k), |p| k.is(&p.0)) {
            o.remove();
            self.eb -= k.cost();
        }
    }

    /// Every pair (engine hash, router hash).
    fn iter(&self) -> impl Iterator<Item = (Key<'_>, u64)> {
        let ints = self.ints.iter().map(|&(e, rh)| (Key::Int(i128::from(e)), rh));
        ints.chain(self.wide.iter().map(|(e, rh)| (key_of(e), *rh)))
    }

    fn live(&self) -> impl Iterator<Item = u64> + '_ {
        self.ints.iter().map(|p| p.1).chain(self.wide.iter().map(|p| p.1))
    }

    fn shrink(&mut self) {
        self.ints.shrink_to_fit(|p| spread(p.0));
        self.wide.shrink_to_fit(|p| wide_hash(key_of(&p.0)));
    }
}

struct Worker {
    name: String,
    gpu: TierMap,
    // The other tiers' maps, from the first op on that tier to a CLEAR (or
    // a compaction that finds it empty), as `BlockMap.lower` holds them.
    lower: [Option<Box<TierMap>>; N_TIERS - 1],
}

impl Worker {
    fn new(name: String) -> Self {
        Worker { name, gpu: TierMap::default(), lower: Default::default() }
    }

    fn tier(&self, t: usize) -> Option<&TierMap> {
        if t == 0 {
            Some(&self.gpu)
        } else {
            self.lower[t - 1].as_deref()
        }
    }

    /// Tier `t`'s map, made on first use (true when made).
    fn tier_mut(&mut self, t: usize) -> (&mut TierMap, bool) {
        if t == 0 {
            return (&mut self.gpu, false);
        }
        let slot = &mut self.lower[t - 1];
        let made = slot.is_none();
        (slot.get_or_insert_with(Default::default), made)
    }

    /// `(tier, map)` of every tier with live blocks, GPU first.
    fn tiers(&self) -> impl Iterator<Item = (usize, &TierMap)> {
        (0..N_TIERS).filter_map(|t| self.tier(t).filter(|m| !m.is_empty()).map(|m| (t, m)))
    }
}

/// The live maps of every worker of one engine log (see the module docstring).
#[derive(Default)]
pub struct Live {
    workers: Vec<Worker>, // first seen first
    by_name: FastMap<String, usize>,
    engine_blocks: usize,
    ehash_bytes: u64,
    lower_maps: usize,
}

impl Live {
    /// Mapped engine blocks, every worker and tier.
    pub fn engine_blocks(&self) -> usize {
        self.engine_blocks
    }

    /// The msgpack size of the engine hashes of every non-identity pair
    /// (what `BlockMap.ebytes` stands for), every worker and tier.
    pub fn ehash_bytes(&self) -> u64 {
        self.ehash_bytes
    }

    /// Lower-tier maps held, every worker.
    pub fn lower_maps(&self) -> usize {
        self.lower_maps
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.workers.iter().map(|w| w.name.as_str())
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The worker's index, its (empty) map made on first sight.
    pub fn worker(&mut self, name: &str) -> usize {
        if let Some(&w) = self.by_name.get(name) {
            return w;
        }
        let w = self.workers.len();
        self.workers.push(Worker::new(name.to_owned()));
        self.by_name.insert(name.to_owned(), w);
        w
    }

    /// A STORE on `tier`: each engine hash bound to its router hash, in order.
    pub fn store<'a>(&mut self, w: usize, tier: usize, pairs: impl IntoIterator<Item = (Key<'a>, u64)>) {
        let (m, made) = self.workers[w].tier_mut(tier);
        let (n0, e0) = (m.len(), m.eb);
        for (k, rh) in pairs {
            m.bind(k, rh);
        }
        self.engine_blocks = self.engine_blocks - n0 + m.len();
        self.ehash_bytes = self.ehash_bytes - e0 + m.eb;
        self.lower_maps += usize::from(made);
    }

    /// A REMOVE on `tier`: each engine hash forgotten (unknown ones ignored).
    pub fn remove<'a>(&mut self, w: usize, tier: usize, keys: impl IntoIterator<Item = Key<'a>>) {
        let (m, made) = self.workers[w].tier_mut(tier);
        let (n0, e0) = (m.len(), m.eb);
        for k in keys {
            m.unbind(k);
        }
        self.engine_blocks = self.engine_blocks - n0 + m.len();
        self.ehash_bytes = self.ehash_bytes - e0 + m.eb;
        self.lower_maps += usize::from(made);
    }

    /// A CLEAR: every tier of the worker emptied, its lower maps dropped.
    pub fn clear(&mut self, w: usize) {
        let wk = &mut self.workers[w];
        let gpu = std::mem::take(&mut wk.gpu);
        self.engine_blocks -= gpu.len();
        self.ehash_bytes -= gpu.eb;
        for m in wk.lower.iter_mut().filter_map(Option::take) {
            self.engine_blocks -= m.len();
            self.ehash_bytes -= m.eb;
            self.lower_maps -= 1;
        }
    }

    /// Apply every delta of a decoded, validated entry (`entry::decode`;
    /// `raw` its bytes), in order.
    pub fn apply_entry(&mut self, e: &Entry, raw: &[u8]) {
        for d in &e.deltas {
            let w = self.worker(&d.worker);
            for op in &e.ops[d.ops.clone()] {
                let hs = &e.hashes[op.hashes.clone()];
                let t = usize::from(op.tier);
                let mut r = Reader::new(&raw[op.ehashes.clone()]);
                match op.kind {
                    OP_STORE if op.n_ehashes == 0 => {
                        self.store(w, t, hs.iter().map(|&h| (Key::Int(i128::from(h)), h)));
                    }
                    OP_STORE => self.store(w, t, hs.iter().map(|&h| (read_key(&mut r), h))),
                    OP_REMOVE if op.n_ehashes == 0 => {
                        self.remove(w, t, hs.iter().map(|&h| Key::Int(i128::from(h))));
                    }
                    OP_REMOVE => self.remove(w, t, (0..op.n_ehashes).map(|_| read_key(&mut r))),
                    _ => self.clear(w),
                }
            }
        }
    }

    /// `(tier, map)` of worker `w`'s tiers with live blocks, GPU first.
    fn tiers(&self, w: usize) -> impl Iterator<Item = (usize, &TierMap)> {
        self.workers[w].tiers()
    }

    /// Every live block of worker `w`: (engine hash, router hash, tier),
    /// GPU first, then in tier order.
    pub fn pairs(&self, w: usize) -> impl Iterator<Item = (Key<'_>, u64, usize)> {
        self.tiers(w).flat_map(|(t, m)| m.iter().map(move |(k, rh)| (k, rh, t)))
    }

    /// The router hashes live on `tier` of worker `w` (repeats included).
    pub fn live(&self, w: usize, tier: usize) -> impl Iterator<Item = u64> + '_ {
        self.workers[w].tier(tier).into_iter().flat_map(TierMap::live)
    }

    /// The tiers of worker `w` with live blocks, GPU first.
    pub fn live_tiers(&self, w: usize) -> impl Iterator<Item = usize> + '_ {
        self.tiers(w).map(|(t, _)| t)
    }

    /// Distinct live router hashes on the GPU, summed over workers (O(live)).
    pub fn live_blocks(&self) -> usize {
        let mut seen = HashSet::new();
        let mut n = 0;
        for w in &self.workers {
            seen.clear();
            seen.extend(w.gpu.live());
            n += seen.len();
        }
        n
    }

    /// Drop empty lower maps; shrink every table to what it holds (churn
    /// leaves tables sized for their peak).
    pub fn compact(&mut self) {
        for w in &mut self.workers {
            w.gpu.shrink();
            for slot in &mut w.lower {
                match slot {
                    Some(m) if m.is_empty() => {
                        *slot = None;
                        self.lower_maps -= 1;
                    }
                    Some(m) => m.shrink(),
                    None => {}
                }
            }
        }
    }

    /// The same workers (in order), no blocks.
    pub fn emptied(&self) -> Live {
        Live {
            workers: self.workers.iter().map(|w| Worker::new(w.name.clone())).collect(),
            by_name: self.by_name.clone(),
            ..Live::default()
        }
    }

    /// The msgpack of `snapshot.snapshot_deltas(live, seqs)` as msgspec
    /// encodes it (see `snapshot_ops`); Err (msgspec's message) for an int
    /// msgpack cannot hold. `seqs`: worker -> last applied seq.
    pub fn snapshot(&self, seqs: &[(&str, i128)]) -> Result<Vec<u8>, &'static str> {
        let mut rows: BTreeMap<&str, (Option<usize>, i128)> = BTreeMap::new();
        for (i, w) in self.workers.iter().enumerate() {
            rows.insert(&w.name, (Some(i), -1));
        }
        for &(name, seq) in seqs {
            rows.entry(name).or_insert((None, -1)).1 = seq;
        }
        let framing = 48 * rows.len() + 24 * self.lower_maps;
        let mut out = Vec::with_capacity(9 * self.engine_blocks + self.ehash_bytes as usize + framing + 8);
        array_len(&mut out, rows.len());
        for (name, (w, seq)) in rows {
            out.push(0x93);
            str_item(&mut out, name);
            int(&mut out, seq)?;
            match w {
                Some(w) => self.snapshot_ops(w, &mut out)?,
                None => {
                    array_len(&mut out, 1);
                    out.extend_from_slice(&CLEAR_OP);
                }
            }
        }
        Ok(out)
    }

    /// `BlockMap.snapshot_ops`: `[CLEAR, STORE...]`, per tier with live
    /// blocks a STORE of its identity pairs (no engine hashes) and one of
    /// the others, each when not empty.
    fn snapshot_ops(&self, w: usize, out: &mut Vec<u8>) -> Result<(), &'static str> {
        let tiers: Vec<(usize, &TierMap, usize)> =
            self.tiers(w).map(|(t, m)| (t, m, m.ints.iter().filter(|p| p.0 == p.1).count())).collect();
        let n_ops: usize = 1 + tiers
            .iter()
            .map(|&(_, m, id)| usize::from(id > 0) + usize::from(m.len() > id))
            .sum::<usize>();
        array_len(out, n_ops);
        out.extend_from_slice(&CLEAR_OP);
        for (t, m, id) in tiers {
            if id > 0 {
                out.extend_from_slice(&[0x94, OP_STORE]);
                array_len(out, id);
                for &(_, rh) in m.ints.iter().filter(|p| p.0 == p.1) {
                    uint(out, rh);
                }
                out.push(0x90);
                uint(out, t as u64);
            }
            let others = m.len() - id;
            if others > 0 {
                let ints = || m.ints.iter().filter(|p| p.0 != p.1);
                out.extend_from_slice(&[0x94, OP_STORE]);
                array_len(out, others);
                for &(_, rh) in ints() {
                    uint(out, rh);
                }
                for (_, rh) in m.wide.iter() {
                    uint(out, *rh);
                }
                array_len(out, others);
                for &(e, _) in ints() {
                    uint(out, e);
                }
                for (e, _) in m.wide.iter() {
                    match e {
                        EHash::Int(v) => int(out, *v)?,
                        EHash::Bytes(b) => bin_item(out, b),
                    }
                }
                uint(out, t as u64);
            }
        }
        Ok(())
    }
}

/// The next engine hash of an op's items (checked when the entry was decoded).
#[inline]
fn read_key<'a>(r: &mut Reader<'a>) -> Key<'a> {
    match r.int() {
        Ok(v) => Key::Int(v),
        Err(_) => Key::Bytes(r.bin().expect("engine hash of a decoded entry")),
    }
}

// --- msgpack, as msgspec writes it (the smallest form of each int, str and length)

const CLEAR_OP: [u8; 5] = [0x94, OP_CLEAR, 0x90, 0x90, 0x00]; // KvOp(OP_CLEAR, [])

fn uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v <= 0xff {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= 0xffff {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= 0xffff_ffff {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn int(out: &mut Vec<u8>, v: i128) -> Result<(), &'static str> {
    if let Ok(u) = u64::try_from(v) {
        uint(out, u);
        return Ok(());
    }
    let v = i64::try_from(v).map_err(|_| OVERFLOW)?;
    if v >= -32 {
        out.push(v as u8);
    } else if v >= -128 {
        out.extend_from_slice(&[0xd0, v as u8]);
    } else if v >= -32768 {
        out.push(0xd1);
        out.extend_from_slice(&(v as i16).to_be_bytes());
    } else if v >= -(1 << 31) {
        out.push(0xd2);
        out.extend_from_slice(&(v as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&v.to_be_bytes());
    }
    Ok(())
}

/// A length after its marker: `fix` (with the length in its low bits)
/// below `fix_max`, else the 8-bit (when `m8` is Some), 16-bit or 32-bit form.
fn len_item(out: &mut Vec<u8>, n: usize, fix: u8, fix_max: usize, m8: Option<u8>, m16: u8, m32: u8) {
    if n < fix_max {
        out.push(fix | n as u8);
    } else if let (Some(m), true) = (m8, n <= 0xff) {
        out.extend_from_slice(&[m, n as u8]);
    } else if n <= 0xffff {
        out.push(m16);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(m32);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

fn array_len(out: &mut Vec<u8>, n: usize) {
    len_item(out, n, 0x90, 16, None, 0xdc, 0xdd);
}

fn str_item(out: &mut Vec<u8>, s: &str) {
    len_item(out, s.len(), 0xa0, 32, Some(0xd9), 0xda, 0xdb);
    out.extend_from_slice(s.as_bytes());
}

fn bin_item(out: &mut Vec<u8>, b: &[u8]) {
    len_item(out, b.len(), 0xc4, 0, Some(0xc4), 0xc5, 0xc6);
    out.extend_from_slice(b);
}

// --- Python ---------------------------------------------------------------------

/// The live maps of every worker of one engine log: `PyLiveState`'s
/// protocol (`mesh/engine_log/live.py`) over [`Live`].
#[pyclass(module = "kvmesh_native")]
#[derive(Default)]
pub struct LiveMaps {
    core: Live,
}

/// An op of a `KvDelta`, read and checked before anything is applied.
struct PyOp<'py> {
    kind: u8,
    tier: usize,
    hashes: Vec<u64>,
    ehashes: Vec<PyKey<'py>>,
}

enum PyKey<'py> {
    Int(i128),
    Bytes(Bound<'py, PyBytes>),
}

impl PyKey<'_> {
    fn key(&self) -> Key<'_> {
        match self {
            PyKey::Int(v) => Key::Int(*v),
            PyKey::Bytes(b) => Key::Bytes(b.as_bytes()),
        }
    }
}

/// An int (never a bool): TypeError for another type, ValueError past i128.
fn int_of(o: &Bound<'_, PyAny>, what: &str) -> PyResult<i128> {
    if o.is_instance_of::<PyBool>() || !o.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!("{what} must be an int, got {}", o.repr()?)));
    }
    match o.extract::<i128>() {
        Ok(v) => Ok(v),
        Err(_) => Err(PyValueError::new_err(format!("{what} out of range: {}", o.repr()?))),
    }
}

fn small_of(o: &Bound<'_, PyAny>, what: &str, below: i128) -> PyResult<u8> {
    let v = int_of(o, what)?;
    if !(0..below).contains(&v) {
        return Err(PyValueError::new_err(format!("unknown {what} {v}")));
    }
    Ok(v as u8)
}

fn read_op<'py>(op: &Bound<'py, PyAny>) -> PyResult<PyOp<'py>> {
    let py = op.py();
    let kind = small_of(&op.getattr(intern!(py, "kind"))?, "KvOp kind", i128::from(OP_CLEAR) + 1)?;
    let tier = usize::from(small_of(&op.getattr(intern!(py, "tier"))?, "cache tier", N_TIERS as i128)?);
    let mut hashes = Vec::new();
    for h in op.getattr(intern!(py, "hashes"))?.try_iter()? {
        let v = int_of(&h?, "block hash")?;
        let v = u64::try_from(v)
            .map_err(|_| PyValueError::new_err(format!("block hash out of unsigned 64-bit range: {v}")))?;
        hashes.push(v);
    }
    let mut ehashes = Vec::new();
    for e in op.getattr(intern!(py, "ehashes"))?.try_iter()? {
        let e = e?;
        ehashes.push(match e.cast_into::<PyBytes>() {
            Ok(b) => PyKey::Bytes(b),
            Err(e) => PyKey::Int(int_of(&e.into_inner(), "engine block hash")?),
        });
    }
    if !ehashes.is_empty() && kind == OP_CLEAR {
        return Err(PyValueError::new_err("CLEAR with engine hashes"));
    }
    if !ehashes.is_empty() && kind == OP_STORE && ehashes.len() != hashes.len() {
        return Err(PyValueError::new_err(format!(
            "STORE of {} router and {} engine hashes",
            hashes.len(),
            ehashes.len()
        )));
    }
    Ok(PyOp { kind, tier, hashes, ehashes })
}

fn key_py<'py>(py: Python<'py>, k: Key<'_>) -> PyResult<Bound<'py, PyAny>> {
    match k {
        Key::Int(v) => match u64::try_from(v) {
            Ok(u) => u.into_bound_py_any(py),
            Err(_) => v.into_bound_py_any(py),
        },
        Key::Bytes(b) => Ok(PyBytes::new(py, b).into_any()),
    }
}

impl LiveMaps {
    fn index(&self, worker: &Bound<'_, PyAny>) -> Option<usize> {
        let s = worker.cast::<PyString>().ok()?;
        self.core.find(s.to_str().ok()?)
    }
}

#[pymethods]
impl LiveMaps {
    #[new]
    fn new() -> Self {
        LiveMaps::default()
    }

    /// Mapped engine blocks, every worker and tier.
    #[getter]
    fn engine_blocks(&self) -> usize {
        self.core.engine_blocks()
    }

    /// Encoded size of the non-identity engine hashes, every worker and tier.
    #[getter]
    fn ehash_bytes(&self) -> u64 {
        self.core.ehash_bytes()
    }

    /// Maps of tiers other than the GPU held, every worker.
    #[getter]
    fn lower_maps(&self) -> usize {
        self.core.lower_maps()
    }

    fn __len__(&self) -> usize {
        self.core.len()
    }

    fn __repr__(&self) -> String {
        format!("LiveMaps(workers={}, engine_blocks={})", self.core.len(), self.core.engine_blocks())
    }

    /// Workers, first seen first.
    fn workers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.core.names())
    }

    /// Apply one validated `KvDelta` (its worker gets a map even without
    /// ops). Every op is read and checked first: TypeError or ValueError,
    /// nothing applied.
    fn apply(&mut self, d: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = d.py();
        let worker = d.getattr(intern!(py, "worker"))?;
        let Ok(name) = worker.cast::<PyString>() else {
            return Err(PyTypeError::new_err(format!("delta worker must be a str, got {}", worker.repr()?)));
        };
        let name = name.to_str()?;
        let ops = d
            .getattr(intern!(py, "ops"))?
            .try_iter()?
            .map(|op| read_op(&op?))
            .collect::<PyResult<Vec<_>>>()?;
        let core = &mut self.core;
        crate::guarded(crate::runtime_error, || {
            let w = core.worker(name);
            for op in &ops {
                let hs = &op.hashes;
                let ident = || hs.iter().map(|&h| Key::Int(i128::from(h)));
                match op.kind {
                    OP_STORE if op.ehashes.is_empty() => {
                        core.store(w, op.tier, ident().zip(hs.iter().copied()))
                    }
                    OP_STORE => {
                        core.store(w, op.tier, op.ehashes.iter().map(PyKey::key).zip(hs.iter().copied()))
                    }
                    OP_REMOVE if op.ehashes.is_empty() => core.remove(w, op.tier, ident()),
                    OP_REMOVE => core.remove(w, op.tier, op.ehashes.iter().map(PyKey::key)),
                    _ => core.clear(w),
                }
            }
            Ok(())
        })
    }

    /// Apply every delta of a `PackedEntry` in order, as `apply` applies each.
    fn apply_packed(&mut self, entry: &Bound<'_, PackedEntry>) -> PyResult<()> {
        let (py, e) = (entry.py(), entry.get());
        let core = &mut self.core;
        crate::guarded(crate::runtime_error, || {
            core.apply_entry(e.decoded(), e.raw_bytes(py));
            Ok(())
        })
    }

    /// `BlockMap.pairs()` of `worker` (GPU pairs, then the other tiers'
    /// triples in tier order); [] for an unknown worker.
    fn pairs<'py>(&self, py: Python<'py>, worker: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        if let Some(w) = self.index(worker) {
            for (k, rh, t) in self.core.pairs(w) {
                let k = key_py(py, k)?;
                let item = if t == 0 {
                    PyTuple::new(py, [k, rh.into_bound_py_any(py)?])?
                } else {
                    (k, rh, t).into_pyobject(py)?
                };
                out.append(item)?;
            }
        }
        Ok(out)
    }

    /// The snapshot entry's bytes: `encode_entry(snapshot_deltas(live, seqs))`
    /// (OverflowError for an int msgpack cannot hold, as msgspec raises).
    fn snapshot_entry<'py>(
        &self,
        py: Python<'py>,
        seqs: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut rows: Vec<(String, i128)> = Vec::new();
        for item in seqs.call_method0(intern!(py, "items"))?.try_iter()? {
            let (w, s): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
            let Ok(w) = w.cast::<PyString>() else {
                return Err(PyTypeError::new_err(format!("seqs keys must be str, got {}", w.repr()?)));
            };
            if s.is_instance_of::<PyBool>() || !s.is_instance_of::<PyInt>() {
                return Err(PyTypeError::new_err(format!("seq must be an int, got {}", s.repr()?)));
            }
            let s = s.extract::<i128>().map_err(|_| PyOverflowError::new_err(OVERFLOW))?;
            rows.push((w.to_str()?.to_owned(), s));
        }
        let core = &self.core;
        let raw = crate::guarded(crate::runtime_error, || {
            let seqs: Vec<(&str, i128)> = rows.iter().map(|(w, s)| (w.as_str(), *s)).collect();
            core.snapshot(&seqs).map_err(PyOverflowError::new_err)
        })?;
        Ok(PyBytes::new(py, &raw))
    }

    /// Per worker (every one), its live router hashes on the GPU.
    fn live_sets<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (w, name) in self.core.names().enumerate() {
            out.set_item(name, PySet::new(py, self.core.live(w, 0))?)?;
        }
        Ok(out)
    }

    /// Per worker, tier -> its live router hashes (tiers with live blocks).
    fn live_sets_by_tier<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (w, name) in self.core.names().enumerate() {
            let d = PyDict::new(py);
            for t in self.core.live_tiers(w) {
                d.set_item(t, PySet::new(py, self.core.live(w, t))?)?;
            }
            out.set_item(name, d)?;
        }
        Ok(out)
    }

    /// Live router hashes on the GPU, every worker (O(live)).
    fn live_blocks(&self) -> usize {
        self.core.live_blocks()
    }

    /// Drop empty lower-tier maps and shrink the tables (a new epoch starts).
    fn compact(&mut self) -> PyResult<()> {
        let core = &mut self.core;
        crate::guarded(crate::runtime_error, || {
            core.compact();
            Ok(())
        })
    }

    /// The same workers, no blocks.
    fn emptied(&self) -> LiveMaps {
        LiveMaps { core: self.core.emptied() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i(v: i128) -> Key<'static> {
        Key::Int(v)
    }

    /// The counters recomputed from the maps.
    fn check(l: &Live) {
        let mut n = 0;
        let mut eb = 0;
        let mut lower = 0;
        for w in &l.workers {
            lower += w.lower.iter().flatten().count();
            for t in 0..N_TIERS {
                if let Some(m) = w.tier(t) {
                    n += m.len();
                    let tier_eb: u64 = m
                        .iter()
                        .filter(|&(k, rh)| k != Key::Int(i128::from(rh)))
                        .map(|(k, _)| k.cost())
                        .sum();
                    assert_eq!(m.eb, tier_eb);
                    eb += tier_eb;
                }
            }
        }
        assert_eq!((l.engine_blocks, l.ehash_bytes, l.lower_maps), (n, eb, lower));
    }

    fn sorted_pairs(l: &Live, w: usize) -> Vec<(EHash, u64, usize)> {
        let mut v: Vec<_> = l.pairs(w).map(|(k, rh, t)| (k.owned(), rh, t)).collect();
        v.sort_by(|a, b| (a.2, format!("{:?}", a.0), a.1).cmp(&(b.2, format!("{:?}", b.0), b.1)));
        v
    }

    #[test]
    fn binds_replaces_and_removes() {
        let mut l = Live::default();
        let w = l.worker("e");
        l.store(w, 0, [(i(1), 10), (i(2), 20), (i(3), 3)]);
        assert_eq!((l.engine_blocks(), l.ehash_bytes()), (3, 18)); // (3, 3) is an identity pair
        l.store(w, 0, [(i(1), 11), (i(1), 12)]); // replaced, last wins
        assert_eq!(l.engine_blocks(), 3);
        assert_eq!(sorted_pairs(&l, w)[0], (EHash::Int(1), 12, 0));
        l.remove(w, 0, [i(2), i(99)]); // unknown ones ignored
        assert_eq!((l.engine_blocks(), l.ehash_bytes()), (2, 9));
        check(&l);
    }

    #[test]
    fn identity_rebinding_changes_the_cost() {
        let mut l = Live::default();
        let w = l.worker("e");
        l.store(w, 0, [(i(5), 5)]);
        assert_eq!(l.ehash_bytes(), 0);
        l.store(w, 0, [(i(5), 7)]);
        assert_eq!(l.ehash_bytes(), 9);
        l.store(w, 0, [(i(5), 5)]);
        assert_eq!(l.ehash_bytes(), 0);
        l.store(w, 0, [(i(5), 7)]);
        l.remove(w, 0, [i(5)]);
        assert_eq!((l.engine_blocks(), l.ehash_bytes()), (0, 0));
        check(&l);
    }

    #[test]
    fn wide_and_bytes_hashes() {
        let mut l = Live::default();
        let w = l.worker("e");
        let long = vec![7u8; 300];
        let huge = vec![1u8; 70000];
        l.store(w, 0, [(i(-1), 1), (i(1 << 100), 2), (Key::Bytes(b"ab"), 3), (Key::Bytes(&long), 4)]);
        l.store(w, 0, [(Key::Bytes(&huge), 5), (Key::Bytes(b""), 0)]);
        assert_eq!(l.ehash_bytes(), 9 + 9 + 4 + 303 + 70005 + 2);
        l.store(w, 0, [(Key::Bytes(b"ab"), 30)]); // replaced: same cost
        assert_eq!(l.engine_blocks(), 6);
        l.remove(w, 0, [i(-1), Key::Bytes(b"ab"), Key::Bytes(b"zz"), i(1 << 100)]);
        assert_eq!((l.engine_blocks(), l.ehash_bytes()), (3, 303 + 70005 + 2));
        // An int and bytes of the same value are distinct keys.
        l.store(w, 0, [(i(0x6162), 1), (Key::Bytes(&[0x61, 0x62]), 2)]);
        assert_eq!(l.engine_blocks(), 5);
        check(&l);
    }

    #[test]
    fn tiers_and_lower_maps() {
        let mut l = Live::default();
        let (a, b) = (l.worker("e"), l.worker("e#dp1"));
        l.store(a, 1, [(i(1), 10)]);
        l.remove(a, 2, [i(1)]); // a REMOVE makes the map too
        l.store(a, 0, [(i(1), 10)]); // the same engine block on another tier
        l.store(b, 3, []);
        assert_eq!((l.lower_maps(), l.engine_blocks()), (3, 2));
        assert_eq!(l.live_tiers(a).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(l.pairs(a).map(|p| p.2).collect::<Vec<_>>(), vec![0, 1]);
        l.compact(); // empty lower maps go
        assert_eq!(l.lower_maps(), 1);
        l.clear(a);
        assert_eq!((l.lower_maps(), l.engine_blocks(), l.ehash_bytes()), (0, 0, 0));
        assert_eq!(l.len(), 2); // a CLEAR keeps the worker
        check(&l);
    }

    #[test]
    fn emptied_keeps_workers_in_order() {
        let mut l = Live::default();
        for name in ["b", "a", "c"] {
            let w = l.worker(name);
            l.store(w, 1, [(i(1), 2)]);
        }
        let e = l.emptied();
        assert_eq!(e.names().collect::<Vec<_>>(), vec!["b", "a", "c"]);
        assert_eq!((e.engine_blocks(), e.lower_maps(), e.find("c")), (0, 0, Some(2)));
    }

    #[test]
    fn live_blocks_counts_distinct_gpu_hashes() {
        let mut l = Live::default();
        let (a, b) = (l.worker("a"), l.worker("b"));
        l.store(a, 0, [(i(1), 7), (i(2), 7), (i(3), 8)]);
        l.store(a, 1, [(i(4), 9)]);
        l.store(b, 0, [(i(1), 7)]);
        assert_eq!(l.live_blocks(), 3);
    }

    #[test]
    fn snapshot_bytes() {
        let mut l = Live::default();
        let w = l.worker("e");
        l.worker("e#dp1");
        l.store(w, 0, [(i(5), 5), (i(6), 200)]);
        l.store(w, 2, [(Key::Bytes(b"x"), 1)]);
        let raw = l.snapshot(&[("e", 7), ("e#dp2", -1)]).expect("encodable");
        let mut want = vec![0x93];
        // e: CLEAR, identity STORE, STORE with engine hashes, STORE on disk
        want.extend([0x93, 0xa1, b'e', 7, 0x94]);
        want.extend(CLEAR_OP);
        want.extend([0x94, 0, 0x91, 5, 0x90, 0]);
        want.extend([0x94, 0, 0x91, 0xcc, 200, 0x91, 6, 0]);
        want.extend([0x94, 0, 0x91, 1, 0x91, 0xc4, 1, b'x', 2]);
        // e#dp1: a map, no blocks; e#dp2: no map
        for name in [b"e#dp1", b"e#dp2"] {
            want.extend([0x93, 0xa5]);
            want.extend(name);
            want.extend([0xff, 0x91]);
            want.extend(CLEAR_OP);
        }
        assert_eq!(raw, want);
        l.store(w, 0, [(i(1 << 64), 1)]);
        assert!(l.snapshot(&[]).is_err());
    }

    #[test]
    fn msgpack_ints_and_lengths() {
        let enc = |v: i128| {
            let mut o = Vec::new();
            int(&mut o, v).map(|_| o)
        };
        assert_eq!(enc(127), Ok(vec![0x7f]));
        assert_eq!(enc(65536), Ok(vec![0xce, 0, 1, 0, 0]));
        assert_eq!(enc(-33), Ok(vec![0xd0, 0xdf]));
        assert_eq!(enc(-32769), Ok(vec![0xd2, 0xff, 0xff, 0x7f, 0xff]));
        assert_eq!(enc(-(1 << 63)), Ok(vec![0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]));
        assert!(enc(-(1 << 63) - 1).is_err());
        let mut o = Vec::new();
        bin_item(&mut o, &[]);
        str_item(&mut o, &"s".repeat(32));
        assert_eq!(o[..4], [0xc4, 0, 0xd9, 32]);
        let mut o = Vec::new();
        array_len(&mut o, 65536);
        assert_eq!(o, vec![0xdd, 0, 1, 0, 0]);
    }

    #[test]
    fn applies_a_decoded_entry() {
        // ["e", 1, [[0, [10, 11], [1, b"\x07"]], [1, [], [1], 0], [0, [3], [], 1]]]
        let first: &[u8] = &[
            0x93, 0xa1, b'e', 1, 0x93, // delta e
            0x93, 0, 0x92, 10, 11, 0x92, 1, 0xc4, 1, 7, // STORE with engine hashes
            0x94, 1, 0x90, 0x91, 1, 0, // REMOVE engine hash 1
            0x94, 0, 0x91, 3, 0x90, 1, // identity STORE on the host
        ];
        // ["e#dp1", 2, [[0, [4]]]], ["e", 3, [[2, []]]]
        let rest: &[u8] = &[
            0x93, 0xa5, b'e', b'#', b'd', b'p', b'1', 2, 0x91, 0x92, 0, 0x91, 4, // e#dp1
            0x93, 0xa1, b'e', 3, 0x91, 0x92, 2, 0x90, // CLEAR e
        ];
        let apply = |l: &mut Live, raw: &[u8]| {
            let e = crate::entry::decode(raw, "e", &|_| false).expect("valid");
            l.apply_entry(&e, raw);
        };
        let mut l = Live::default();
        apply(&mut l, &[0x90]);
        assert!(l.is_empty()); // an empty entry changes nothing
        apply(&mut l, &[&[0x91], first].concat());
        assert_eq!(sorted_pairs(&l, 0), vec![(EHash::Bytes(Box::new([7])), 11, 0), (EHash::Int(3), 3, 1)]);
        assert_eq!((l.engine_blocks(), l.ehash_bytes(), l.lower_maps()), (2, 3, 1));
        apply(&mut l, &[&[0x92], rest].concat());
        assert_eq!(l.names().collect::<Vec<_>>(), vec!["e", "e#dp1"]);
        assert_eq!((l.engine_blocks(), l.ehash_bytes(), l.lower_maps()), (1, 0, 0)); // e cleared
        check(&l);
    }

    /// Random ops against a plain model (ordered maps), counters rechecked.
    #[test]
    fn random_ops_match_a_model() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let keys: Vec<EHash> = (0..6)
            .map(EHash::Int)
            .chain([
                EHash::Int(-3),
                EHash::Int(1 << 70),
                EHash::Bytes(Box::new([1])),
                EHash::Bytes(Box::new([])),
            ])
            .collect();
        let mut l = Live::default();
        let mut model: Vec<[BTreeMap<String, u64>; N_TIERS]> = Vec::new();
        let mut made = Vec::new();
        for _ in 0..20_000 {
            let w = l.worker(["a", "b"][rnd(2) as usize]);
            if model.len() <= w {
                model.push(Default::default());
                made.push([true, false, false, false]);
            }
            let t = rnd(N_TIERS as u64) as usize;
            let n = rnd(4) as usize;
            let ks: Vec<&EHash> = (0..n).map(|_| &keys[rnd(keys.len() as u64) as usize]).collect();
            match rnd(10) {
                0..=5 => {
                    let rhs: Vec<u64> = (0..n).map(|_| rnd(6)).collect();
                    l.store(w, t, ks.iter().map(|k| key_of(k)).zip(rhs.iter().copied()));
                    for (k, rh) in ks.iter().zip(rhs) {
                        model[w][t].insert(format!("{k:?}"), rh);
                    }
                    made[w][t] = true;
                }
                6..=8 => {
                    l.remove(w, t, ks.iter().map(|k| key_of(k)));
                    for k in ks {
                        model[w][t].remove(&format!("{k:?}"));
                    }
                    made[w][t] = true;
                }
                _ if rnd(3) == 0 => {
                    l.compact();
                    for (m, f) in model.iter().zip(made.iter_mut()) {
                        for t in 1..N_TIERS {
                            f[t] &= !m[t].is_empty();
                        }
                    }
                }
                _ => {
                    l.clear(w);
                    model[w] = Default::default();
                    made[w] = [true, false, false, false];
                }
            }
            check(&l);
            let n_model: usize = model.iter().flatten().map(BTreeMap::len).sum();
            assert_eq!(l.engine_blocks(), n_model);
            let lower: usize = made.iter().map(|f| f[1..].iter().filter(|&&x| x).count()).sum();
            assert_eq!(l.lower_maps(), lower);
            for (wi, m) in model.iter().enumerate() {
                for (t, want) in m.iter().enumerate() {
                    let got: BTreeMap<String, u64> = l.workers[wi]
                        .tier(t)
                        .map(|tm| tm.iter().map(|(k, rh)| (format!("{:?}", k.owned()), rh)).collect())
                        .unwrap_or_default();
                    assert_eq!(&got, want);
                }
            }
        }
    }
}
