//! `NativeIndex`: `router/index.py`'s `PrefixIndex` over the core of
//! `index.rs`, with the same methods, results and errors
//! (`router/native_index.py` adds the one log line `apply` writes).
//!
//! Workers are names here and slots in the core; a freed slot is reused,
//! lowest first. Results list workers in registration order (`match` with
//! no candidates) or in the caller's order, as `PrefixIndex` does. Block
//! hashes are unsigned 64-bit ints (router hashes): `store` refuses any
//! other value; elsewhere a value that is not one is a block no worker
//! holds, which is what `PrefixIndex` makes of it.

use crate::entry::{self, PackedEntry};
use crate::index::{Index, N_TIERS, TIER_GPU};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PySet, PyString, PyTuple};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

const OP_STORE: i64 = 0;
const OP_REMOVE: i64 = 1;
const OP_CLEAR: i64 = 2;
// Candidate lists kept ready (see `cand`).
const CAND_MAX: usize = 64;

/// A candidate list ready for `match`: the result with every worker at 0,
/// and the registered slots among them (sorted, distinct).
struct Cand {
    zeros: Py<PyDict>,
    slots: Vec<u32>,
}

#[pyclass(subclass, module = "kvmesh_native")]
pub struct NativeIndex {
    core: Index,
    slot_of: HashMap<String, u32>,
    names: Vec<Option<Py<PyString>>>, // slot -> worker
    order: Vec<u32>,                  // registered slots, in registration order
    free: BinaryHeap<Reverse<u32>>,
    // candidate list (None or a tuple of names) -> index in `cands`; reset
    // whenever slots change
    wcache: Py<PyDict>,
    cands: Vec<Cand>,
}

fn panicked(p: Box<dyn std::any::Any + Send>) -> PyErr {
    let m = p
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    PyRuntimeError::new_err(format!("kvmesh_native: {m}"))
}

/// Runs `f`, turning a panic into a RuntimeError.
fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panicked(p)))
}

/// The leading items of `hashes` that are u64 (the walk of a match stops
/// at the first other value: no worker holds it).
fn query_hashes(hashes: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    let mut out = Vec::new();
    if let Ok(l) = hashes.cast::<PyList>() {
        out.reserve(l.len());
        for h in l.iter() {
            match h.extract::<u64>() {
                Ok(v) => out.push(v),
                Err(_) => break,
            }
        }
        return Ok(out);
    }
    for h in hashes.try_iter()? {
        match h?.extract::<u64>() {
            Ok(v) => out.push(v),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// Every item of `hashes` as u64, or a ValueError naming the first that is not.
fn store_hashes(hashes: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    let mut out = Vec::new();
    for h in hashes.try_iter()? {
        let h = h?;
        match h.extract::<u64>() {
            Ok(v) => out.push(v),
            Err(_) => {
                return Err(PyValueError::new_err(format!(
                    "block hash must be an int in [0, 2**64), got {}",
                    h.repr()?
                )))
            }
        }
    }
    Ok(out)
}

/// The items of `hashes` that are u64 (others are blocks no worker holds).
fn remove_hashes(hashes: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    let mut out = Vec::new();
    for h in hashes.try_iter()? {
        if let Ok(v) = h?.extract::<u64>() {
            out.push(v);
        }
    }
    Ok(out)
}

/// `tier` as an index of a tier, None for a value that is no tier.
fn tier_of(tier: &Bound<'_, PyAny>) -> Option<usize> {
    tier.extract::<usize>().ok().filter(|&t| t < N_TIERS)
}

fn unknown_tier(tier: &Bound<'_, PyAny>) -> PyResult<PyErr> {
    Ok(PyValueError::new_err(format!("unknown cache tier {}", tier.repr()?)))
}

impl NativeIndex {
    fn lookup(&self, worker: &Bound<'_, PyAny>) -> Option<u32> {
        let s = worker.cast::<PyString>().ok()?;
        self.slot_of.get(s.to_str().ok()?).copied()
    }

    fn slot(&mut self, worker: &Bound<'_, PyAny>) -> PyResult<u32> {
        if let Some(slot) = self.lookup(worker) {
            return Ok(slot);
        }
        let name = match worker.cast::<PyString>() {
            Ok(s) if !s.to_str()?.is_empty() => s.clone(),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "worker must be a non-empty str, got {}",
                    worker.repr()?
                )))
            }
        };
        let slot = match self.free.pop() {
            Some(Reverse(s)) => s,
            None => u32::try_from(self.names.len()).map_err(|_| PyValueError::new_err("too many workers"))?,
        };
        self.core.add_slot(slot);
        if self.names.len() <= slot as usize {
            self.names.resize_with(slot as usize + 1, || None);
        }
        self.slot_of.insert(name.to_str()?.to_owned(), slot);
        self.names[slot as usize] = Some(name.unbind());
        self.order.push(slot);
        self.forget_cands(worker.py())?;
        Ok(slot)
    }

    fn forget_cands(&mut self, py: Python<'_>) -> PyResult<()> {
        self.wcache.bind(py).clear();
        self.cands.clear();
        Ok(())
    }

    fn name<'py>(&self, py: Python<'py>, slot: u32) -> &Bound<'py, PyString> {
        self.names[slot as usize].as_ref().expect("a registered slot has a name").bind(py)
    }

    /// The candidate list's index in `cands`, made on first use.
    fn cand(&mut self, py: Python<'_>, workers: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
        let key: Bound<'_, PyAny> = match workers {
            None => py.None().into_bound(py),
            Some(w) => match w.cast::<PyTuple>() {
                Ok(t) => t.clone().into_any(),
                // a list (what policies pass) becomes a tuple in one C call
                Err(_) => match w.cast::<PyList>() {
                    Ok(l) => l.to_tuple().into_any(),
                    Err(_) => PyTuple::new(py, w.try_iter()?.collect::<PyResult<Vec<_>>>()?)?.into_any(),
                },
            },
        };
        let cache = self.wcache.bind(py).clone();
        if let Some(i) = cache.get_item(&key)? {
            return i.extract();
        }
        let zeros = PyDict::new(py);
        let mut slots = Vec::new();
        if key.is_none() {
            for &s in &self.order {
                zeros.set_item(self.name(py, s), 0)?;
                slots.push(s);
            }
        } else {
            for w in key.cast::<PyTuple>()?.iter() {
                zeros.set_item(&w, 0)?;
                if let Some(s) = self.lookup(&w) {
                    slots.push(s);
                }
            }
        }
        slots.sort_unstable();
        slots.dedup();
        if self.cands.len() >= CAND_MAX {
            self.forget_cands(py)?;
        }
        let i = self.cands.len();
        self.cands.push(Cand { zeros: zeros.unbind(), slots });
        self.wcache.bind(py).set_item(key, i)?;
        Ok(i)
    }

    fn match_impl<'py>(
        &mut self,
        py: Python<'py>,
        hashes: &[u64],
        workers: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let c = self.cand(py, workers)?;
        let cand = &self.cands[c];
        let out = cand.zeros.bind(py).copy()?;
        let mut depths = Vec::new();
        self.core.match_depths(hashes, &cand.slots, &mut depths);
        let mut hit = 0;
        for &(s, d) in &depths {
            out.set_item(self.name(py, s), d)?;
            hit = hit.max(d);
        }
        // the blocks some candidate held count as used (bounded indexes)
        self.core.touch(&hashes[..hit]);
        Ok(out)
    }

    fn do_store(
        &mut self,
        worker: &Bound<'_, PyAny>,
        hashes: &Bound<'_, PyAny>,
        tier: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let slot = self.slot(worker)?;
        let Some(t) = tier_of(tier) else {
            return Err(unknown_tier(tier)?);
        };
        let hs = store_hashes(hashes)?;
        self.core.store(slot, &hs, t);
        Ok(())
    }

    fn do_remove(
        &mut self,
        worker: &Bound<'_, PyAny>,
        hashes: &Bound<'_, PyAny>,
        tier: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let Some(slot) = self.lookup(worker) else {
            return Ok(());
        };
        let Some(t) = tier_of(tier) else {
            return Ok(()); // a tier that is no tier holds nothing
        };
        let hs = remove_hashes(hashes)?;
        self.core.remove(slot, &hs, t);
        Ok(())
    }

    fn do_clear(&mut self, worker: &Bound<'_, PyAny>) -> usize {
        match self.lookup(worker) {
            Some(slot) => self.core.clear(slot),
            None => 0,
        }
    }
}

#[pymethods]
impl NativeIndex {
    /// `max_blocks`: the bound of `--max-index-blocks` (0: none; see
    /// `index.rs`); ValueError if negative.
    #[new]
    #[pyo3(signature = (max_blocks = 0))]
    fn new(py: Python<'_>, max_blocks: i64) -> PyResult<Self> {
        let max_blocks = usize::try_from(max_blocks)
            .map_err(|_| PyValueError::new_err(format!("max_blocks must be >= 0, got {max_blocks}")))?;
        Ok(NativeIndex {
            core: Index::new(max_blocks),
            slot_of: HashMap::new(),
            names: Vec::new(),
            order: Vec::new(),
            free: BinaryHeap::new(),
            wcache: PyDict::new(py).unbind(),
            cands: Vec::new(),
        })
    }

    /// The bound on distinct GPU blocks (and on lower-tier blocks); 0: none.
    #[getter]
    fn max_blocks(&self) -> usize {
        self.core.max_blocks()
    }

    /// Register a worker with no blocks (it then shows up in `match`).
    fn add_worker(&mut self, worker: &Bound<'_, PyAny>) -> PyResult<()> {
        guarded(|| self.slot(worker).map(|_| ()))
    }

    fn workers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.order.iter().map(|&s| self.name(py, s)))
    }

    fn __contains__(&self, worker: &Bound<'_, PyAny>) -> bool {
        self.lookup(worker).is_some()
    }

    fn __len__(&self) -> usize {
        self.core.len()
    }

    /// Blocks the index believes `worker` holds on `tier`.
    #[pyo3(signature = (worker, tier = None))]
    fn blocks_of(&self, worker: &Bound<'_, PyAny>, tier: Option<&Bound<'_, PyAny>>) -> usize {
        let t = tier.map_or(Some(TIER_GPU), tier_of);
        match (self.lookup(worker), t) {
            (Some(slot), Some(t)) => self.core.count(slot, t),
            _ => 0,
        }
    }

    /// Blocks of `worker` on each tier, in `blocks.tiers` order.
    fn tier_blocks<'py>(&self, py: Python<'py>, worker: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
        let counts: Vec<usize> = match self.lookup(worker) {
            Some(s) => (0..N_TIERS).map(|t| self.core.count(s, t)).collect(),
            None => vec![0; N_TIERS],
        };
        PyTuple::new(py, counts)
    }

    /// A copy of the hashes the index believes `worker` holds on `tier`.
    #[pyo3(signature = (worker, tier = None))]
    fn worker_hashes<'py>(
        &self,
        py: Python<'py>,
        worker: &Bound<'py, PyAny>,
        tier: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PySet>> {
        let t = tier.map_or(Some(TIER_GPU), tier_of);
        match (self.lookup(worker), t) {
            (Some(s), Some(t)) => PySet::new(py, self.core.hashes(s, t)),
            _ => PySet::empty(py),
        }
    }

    /// Blocks held on tiers other than the GPU, all workers.
    #[getter]
    fn lower_blocks(&self) -> usize {
        self.core.lower_blocks()
    }

    /// `worker` holds `hashes` on `tier` (registered first, as PrefixIndex does).
    #[pyo3(signature = (worker, hashes, tier = None))]
    fn store(
        &mut self,
        py: Python<'_>,
        worker: &Bound<'_, PyAny>,
        hashes: &Bound<'_, PyAny>,
        tier: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let gpu = TIER_GPU.into_pyobject(py)?.into_any();
        guarded(|| self.do_store(worker, hashes, tier.unwrap_or(&gpu)))
    }

    /// Drop `hashes` from `worker` on `tier` only; hashes it does not hold
    /// there are ignored.
    #[pyo3(signature = (worker, hashes, tier = None))]
    fn remove(
        &mut self,
        py: Python<'_>,
        worker: &Bound<'_, PyAny>,
        hashes: &Bound<'_, PyAny>,
        tier: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let gpu = TIER_GPU.into_pyobject(py)?.into_any();
        guarded(|| self.do_remove(worker, hashes, tier.unwrap_or(&gpu)))
    }

    /// Drop every block of `worker`, every tier; it stays registered.
    /// Returns the number of blocks dropped.
    fn clear_worker(&mut self, worker: &Bound<'_, PyAny>) -> PyResult<usize> {
        guarded(|| Ok(self.do_clear(worker)))
    }

    /// Forget `worker` entirely and free its slot. Returns blocks dropped.
    fn remove_worker(&mut self, py: Python<'_>, worker: &Bound<'_, PyAny>) -> PyResult<usize> {
        guarded(|| {
            let Some(slot) = self.lookup(worker) else {
                return Ok(0);
            };
            let n = self.core.clear(slot);
            let name = self.names[slot as usize].take().expect("a registered slot has a name");
            self.slot_of.remove(name.bind(py).to_str()?);
            self.order.retain(|&s| s != slot);
            self.free.push(Reverse(slot));
            self.forget_cands(py)?;
            Ok(n)
        })
    }

    /// Apply one engine batch (`KvDelta`), ops in order; every op is checked
    /// before any is applied (ValueError, index untouched). Returns the blocks
    /// each CLEAR dropped.
    fn _apply(&mut self, delta: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
        guarded(|| {
            let worker = delta.getattr("worker")?;
            let ops = delta.getattr("ops")?;
            let mut parsed: Vec<(i64, usize, Bound<'_, PyAny>)> = Vec::new();
            for op in ops.try_iter()? {
                let op = op?;
                let kind = op.getattr("kind")?;
                let k = kind.extract::<i64>().ok().filter(|k| (OP_STORE..=OP_CLEAR).contains(k));
                let Some(k) = k else {
                    return Err(PyValueError::new_err(format!(
                        "unknown KvOp kind {} in delta for worker {}",
                        kind.repr()?,
                        worker.repr()?
                    )));
                };
                let tier = op.getattr("tier")?;
                let Some(t) = tier_of(&tier) else {
                    return Err(PyValueError::new_err(format!(
                        "unknown cache tier {} in delta for worker {}",
                        tier.repr()?,
                        worker.repr()?
                    )));
                };
                parsed.push((k, t, op));
            }
            match worker.cast::<PyString>() {
                Ok(s) if !s.to_str()?.is_empty() => {}
                _ => {
                    return Err(PyValueError::new_err(format!(
                        "delta worker must be a non-empty str, got {}",
                        worker.repr()?
                    )))
                }
            }
            // Hashes are read (and a STORE's checked) before anything is applied.
            let mut ops = Vec::with_capacity(parsed.len());
            for (k, t, op) in parsed {
                let hs = match k {
                    OP_STORE => store_hashes(&op.getattr("hashes")?)?,
                    OP_REMOVE => remove_hashes(&op.getattr("hashes")?)?,
                    _ => Vec::new(),
                };
                ops.push((k, t, hs));
            }
            let mut cleared = Vec::new();
            for (k, t, hs) in ops {
                match k {
                    OP_STORE => {
                        let slot = self.slot(&worker)?;
                        self.core.store(slot, &hs, t);
                    }
                    OP_REMOVE => {
                        if let Some(slot) = self.lookup(&worker) {
                            self.core.remove(slot, &hs, t);
                        }
                    }
                    _ => cleared.push(self.do_clear(&worker)),
                }
            }
            Ok(cleared)
        })
    }

    /// Apply every delta of a `PackedEntry` (decoded and validated by
    /// `decode_entry`), in order, each as `_apply` applies a `KvDelta`.
    /// Returns (the delta's position, blocks dropped) for each CLEAR.
    fn _apply_packed(&mut self, entry: &Bound<'_, PackedEntry>) -> PyResult<Vec<(usize, usize)>> {
        guarded(|| {
            let (py, e) = (entry.py(), entry.get());
            let mut cleared = Vec::new();
            for i in 0..e.len() {
                let worker = e.worker(py, i);
                for (kind, tier, hs) in e.ops(i) {
                    match kind {
                        entry::OP_STORE => {
                            let slot = self.slot(worker)?;
                            self.core.store(slot, hs, tier);
                        }
                        entry::OP_REMOVE => {
                            if let Some(slot) = self.lookup(worker) {
                                self.core.remove(slot, hs, tier);
                            }
                        }
                        _ => cleared.push((i, self.do_clear(worker))),
                    }
                }
            }
            Ok(cleared)
        })
    }

    /// For each worker (every registered one when `workers` is None; unknown
    /// ones get 0), how many leading blocks of `hashes` it holds on a GPU.
    #[pyo3(signature = (hashes, workers = None))]
    fn r#match<'py>(
        &mut self,
        py: Python<'py>,
        hashes: &Bound<'py, PyAny>,
        workers: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        guarded(|| {
            let hs = query_hashes(hashes)?;
            self.match_impl(py, &hs, workers)
        })
    }

    /// For each worker, the blocks of the longest prefix of `hashes` it holds
    /// on any tier, credited to the fastest tier holding each:
    /// `(gpu, host, disk, external)`.
    #[pyo3(signature = (hashes, workers = None))]
    fn match_tiers<'py>(
        &mut self,
        py: Python<'py>,
        hashes: &Bound<'py, PyAny>,
        workers: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        guarded(|| {
            let hs = query_hashes(hashes)?;
            let gpu = self.match_impl(py, &hs, workers)?;
            let out = PyDict::new(py);
            let base = self.core.begin_walk(hs.len());
            for (w, g) in gpu.iter() {
                let g: usize = g.extract()?;
                let counts = match self.lookup(&w) {
                    Some(s) => self.core.walk_tiers(&hs, g, s, base),
                    None => [g, 0, 0, 0],
                };
                out.set_item(w, PyTuple::new(py, counts)?)?;
            }
            Ok(out)
        })
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("entries", self.core.len())?;
        d.set_item("workers", self.order.len())?;
        d.set_item("lower_blocks", self.core.lower_blocks())?;
        d.set_item("evicted_blocks", self.core.evicted())?;
        Ok(d)
    }

    /// Distinct holder sets in use (interned: blocks held by the same
    /// workers share one).
    fn holder_sets(&self) -> usize {
        self.core.holder_sets()
    }
}
