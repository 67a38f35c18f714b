//! `kvmesh_native`: the owner's per-frame routine in Rust (decode a KV-event
//! frame, hash its blocks, map engine hashes to router hashes), exposed to
//! Python through PyO3. `engine_adapters/native.py` is the only caller: it
//! chooses this module or the pure-Python path and turns the plain tuples
//! returned here into kvmesh's types.
//!
//! Bad input is an error, never a crash: every entry point catches a panic
//! and raises it as a Python exception (ValueError from the decoder, so the
//! frame counts as undecodable; RuntimeError from the mapper).

pub mod entry;
pub mod entry_enc;
pub mod events;
pub mod hashing;
pub mod index;
pub mod live;
pub mod mapper;
pub mod msgpack;
pub mod pyindex;

use events::{AnyCheck, Detail, EHash, Event, ExtraKeys, Frame, Removed, Stored, Tokens};
use mapper::{Mapper, Note, Op};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PySet, PyString, PyTuple};
use std::panic::{catch_unwind, AssertUnwindSafe};

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning a panic into `err(message)`.
fn guarded<T>(err: fn(String) -> PyErr, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(err(format!("kvmesh_native: {}", panic_message(p)))))
}

fn value_error(m: String) -> PyErr {
    PyValueError::new_err(m)
}

fn runtime_error(m: String) -> PyErr {
    PyRuntimeError::new_err(m)
}

/// `extra_keys` values only the reference decoder can judge go to a Python
/// callable (raising = refused).
struct PyCheck<'py>(Bound<'py, PyAny>);

impl AnyCheck for PyCheck<'_> {
    fn check(&self, raw: &[u8]) -> Result<(), String> {
        let py = self.0.py();
        self.0.call1((PyBytes::new(py, raw),)).map(|_| ()).map_err(|e| e.value(py).to_string())
    }
}

// --- Rust -> Python --------------------------------------------------------------

fn int_py<'py>(py: Python<'py>, v: i128) -> PyResult<Bound<'py, PyAny>> {
    Ok(if let Ok(u) = u64::try_from(v) {
        u.into_pyobject(py)?.into_any()
    } else if let Ok(i) = i64::try_from(v) {
        i.into_pyobject(py)?.into_any()
    } else {
        v.into_pyobject(py)?.into_any()
    })
}

fn ehash_py<'py>(py: Python<'py>, eh: &EHash) -> PyResult<Bound<'py, PyAny>> {
    match eh {
        EHash::Int(v) => int_py(py, *v),
        EHash::Bytes(b) => Ok(PyBytes::new(py, b).into_any()),
    }
}

fn ehashes_py<'py>(py: Python<'py>, ehs: &[EHash]) -> PyResult<Bound<'py, PyList>> {
    let items = ehs.iter().map(|e| ehash_py(py, e)).collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

fn opt_int_py<'py>(py: Python<'py>, v: Option<i128>) -> PyResult<Bound<'py, PyAny>> {
    match v {
        Some(v) => int_py(py, v),
        None => Ok(py.None().into_bound(py)),
    }
}

fn tokens_py<'py>(py: Python<'py>, t: &Tokens) -> PyResult<Bound<'py, PyList>> {
    match t {
        Tokens::Narrow(v) => PyList::new(py, v),
        Tokens::Wide(v) => PyList::new(py, v.iter().map(|&x| int_py(py, x)).collect::<PyResult<Vec<_>>>()?),
        Tokens::Opaque(_) => Err(PyTypeError::new_err("opaque tokens have no values")),
    }
}

fn repr(py: Python<'_>, s: &Option<String>) -> PyResult<String> {
    match s {
        Some(s) => Ok(PyString::new(py, s).repr()?.to_string()),
        None => Ok("None".into()),
    }
}

fn detail_py(py: Python<'_>, d: &Detail) -> PyResult<String> {
    Ok(match d {
        Detail::Text(t) => t.clone(),
        Detail::UnknownMedium(kind, m) => {
            format!("{kind} on medium {}, not a known cache tier", repr(py, m)?)
        }
        Detail::MapperMedium(m) => format!("medium {}", repr(py, m)?),
    })
}

/// One decoded event as a tuple (`engine_adapters/native.py` makes the struct):
/// ("S", block_hashes, parent, token_ids, block_size, lora_id, medium,
/// lora_name, extra_keys raw msgpack or None, group_idx, cache_salt,
/// locality, ownership, lookahead_token_ids), ("R", block_hashes, medium,
/// group_idx, locality, ownership), ("C",), ("K", index, reason, detail).
fn event_py<'py>(py: Python<'py>, ev: &Event, payload: &[u8]) -> PyResult<Bound<'py, PyTuple>> {
    let opt_str = |s: &Option<String>| s.as_deref().into_pyobject(py).map(|o| o.into_any());
    match ev {
        Event::Stored(s) => {
            let extra: Bound<'py, PyAny> = match &s.extra_keys {
                ExtraKeys::Span(a, b) => PyBytes::new(py, &payload[*a..*b]).into_any(),
                _ => py.None().into_bound(py),
            };
            let lookahead: Bound<'py, PyAny> = match &s.lookahead {
                Some(l) => PyList::new(
                    py,
                    l.iter()
                        .map(|inner| {
                            PyList::new(
                                py,
                                inner.iter().map(|&x| int_py(py, x)).collect::<PyResult<Vec<_>>>()?,
                            )
                        })
                        .collect::<PyResult<Vec<_>>>()?,
                )?
                .into_any(),
                None => py.None().into_bound(py),
            };
            let parent = match &s.parent {
                Some(p) => ehash_py(py, p)?,
                None => py.None().into_bound(py),
            };
            PyTuple::new(
                py,
                [
                    "S".into_pyobject(py)?.into_any(),
                    ehashes_py(py, &s.block_hashes)?.into_any(),
                    parent,
                    tokens_py(py, &s.tokens)?.into_any(),
                    int_py(py, s.block_size)?,
                    opt_int_py(py, s.lora_id)?,
                    opt_str(&s.medium)?,
                    opt_str(&s.lora_name)?,
                    extra,
                    opt_int_py(py, s.group_idx)?,
                    opt_str(&s.cache_salt)?,
                    opt_str(&s.locality)?,
                    opt_str(&s.ownership)?,
                    lookahead,
                ],
            )
        }
        Event::Removed(rm) => PyTuple::new(
            py,
            [
                "R".into_pyobject(py)?.into_any(),
                ehashes_py(py, &rm.block_hashes)?.into_any(),
                opt_str(&rm.medium)?,
                opt_int_py(py, rm.group_idx)?,
                opt_str(&rm.locality)?,
                opt_str(&rm.ownership)?,
            ],
        ),
        Event::Cleared => PyTuple::new(py, ["C"]),
        Event::Ignored => PyTuple::new(py, ["X"]),
        Event::Skipped { index, reason, detail } => PyTuple::new(
            py,
            [
                "K".into_pyobject(py)?.into_any(),
                index.into_pyobject(py)?.into_any(),
                reason.into_pyobject(py)?.into_any(),
                detail_py(py, detail)?.into_pyobject(py)?.into_any(),
            ],
        ),
    }
}

/// Notes as ("skipped", index, reason, detail), ("unknown_parent", blocks, "", ""),
/// ("invalid_tokens", 0, "", error) tuples.
fn notes_py<'py>(py: Python<'py>, notes: &[Note]) -> PyResult<Bound<'py, PyList>> {
    let items = notes
        .iter()
        .map(|n| {
            let t = match n {
                Note::Skipped { index, reason, detail } => {
                    ("skipped", *index, (*reason).to_owned(), detail_py(py, detail)?)
                }
                Note::UnknownParent { blocks } => ("unknown_parent", *blocks, String::new(), String::new()),
                Note::InvalidTokens { error } => ("invalid_tokens", 0, String::new(), error.clone()),
            };
            Ok(t.into_pyobject(py)?.into_any())
        })
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

// --- Python -> Rust --------------------------------------------------------------

fn ehash_rs(o: &Bound<'_, PyAny>) -> PyResult<EHash> {
    if let Ok(b) = o.cast::<PyBytes>() {
        return Ok(EHash::Bytes(b.as_bytes().into()));
    }
    o.extract::<i128>().map(EHash::Int).map_err(|_| {
        PyTypeError::new_err(format!(
            "engine block hashes must be ints or bytes, got {}",
            o.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    })
}

fn ehashes_rs(o: &Bound<'_, PyAny>) -> PyResult<Vec<EHash>> {
    o.try_iter()?.map(|x| ehash_rs(&x?)).collect()
}

fn tokens_rs(o: &Bound<'_, PyAny>) -> PyResult<Tokens> {
    if let Ok(v) = o.extract::<Vec<u32>>() {
        return Ok(Tokens::Narrow(v));
    }
    // Not all u32: the Python path refuses them when it hashes (if it does).
    Ok(Tokens::Opaque(o.len()?))
}

fn opt_string(o: Bound<'_, PyAny>) -> PyResult<Option<String>> {
    o.extract()
}

/// An event's `group_idx`; one past i128 (or not an int) stands as a value
/// no group has, so the mapper refuses it as the Python path does.
fn opt_group(o: Bound<'_, PyAny>) -> Option<i128> {
    if o.is_none() {
        return None;
    }
    Some(o.extract().unwrap_or(i128::MAX))
}

/// An event tuple from `engine_adapters/native.py` (see `event_py`; a store
/// is ("S", block_hashes, parent, token_ids, block_size, medium, locality,
/// lora_name, salt, group_idx), its tenancy already read; a removal ("R",
/// block_hashes, medium, locality, group_idx)).
fn event_rs(t: &Bound<'_, PyTuple>) -> PyResult<Event> {
    let tag: String = t.get_item(0)?.extract()?;
    Ok(match tag.as_str() {
        "S" => {
            let parent = t.get_item(2)?;
            Event::Stored(Box::new(Stored {
                block_hashes: ehashes_rs(&t.get_item(1)?)?,
                parent: if parent.is_none() { None } else { Some(ehash_rs(&parent)?) },
                tokens: tokens_rs(&t.get_item(3)?)?,
                block_size: t.get_item(4)?.extract()?,
                lora_id: None,
                medium: opt_string(t.get_item(5)?)?,
                locality: opt_string(t.get_item(6)?)?,
                lora_name: opt_string(t.get_item(7)?)?,
                extra_keys: ExtraKeys::Salt(opt_string(t.get_item(8)?)?),
                group_idx: opt_group(t.get_item(9)?),
                cache_salt: None,
                ownership: None,
                lookahead: None,
            }))
        }
        "R" => Event::Removed(Removed {
            block_hashes: ehashes_rs(&t.get_item(1)?)?,
            medium: opt_string(t.get_item(2)?)?,
            locality: opt_string(t.get_item(3)?)?,
            group_idx: opt_group(t.get_item(4)?),
            ownership: None,
        }),
        "C" => Event::Cleared,
        "X" => Event::Ignored,
        "K" => {
            let reason: String = t.get_item(2)?.extract()?;
            Event::Skipped {
                index: t.get_item(1)?.extract()?,
                reason: intern(reason),
                detail: Detail::Text(t.get_item(3)?.extract()?),
            }
        }
        other => return Err(PyValueError::new_err(format!("unknown event tag {other:?}"))),
    })
}

/// A skip reason as a static str: kvmesh's reasons are a fixed set, and a
/// caller's own reason is kept once, however often it is seen.
fn intern(reason: String) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    const KNOWN: [&str; 7] = [
        events::SKIP_UNDECODABLE,
        events::SKIP_NO_TOKEN_IDS,
        events::SKIP_BAD_BLOCK_SIZE,
        events::SKIP_TOKEN_COUNT,
        events::SKIP_BIGRAM_NOT_CHAINED,
        events::SKIP_UNKNOWN_MEDIUM,
        events::SKIP_BLOCK_SIZE_MISMATCH,
    ];
    if let Some(k) = KNOWN.iter().find(|k| **k == reason) {
        return k;
    }
    static OTHERS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut set = OTHERS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = set.get(reason.as_str()) {
        return k;
    }
    let k: &'static str = Box::leak(reason.into_boxed_str());
    set.insert(k);
    k
}

// --- the module ------------------------------------------------------------------

/// `decode_batch` of kv_events.py: (ts, data_parallel_rank, attn_dp_rank,
/// event tuples); ValueError for an unreadable envelope.
#[pyfunction]
fn decode_frame<'py>(
    py: Python<'py>,
    payload: &[u8],
    check: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyTuple>> {
    let frame = guarded(value_error, || {
        events::decode_frame(payload, &PyCheck(check)).map_err(|e| value_error(e.0))
    })?;
    let evs = frame.events.iter().map(|e| event_py(py, e, payload)).collect::<PyResult<Vec<_>>>()?;
    (frame.ts, frame.data_parallel_rank, frame.attn_dp_rank, PyList::new(py, evs)?).into_pyobject(py)
}

/// Router hashes of every full block of `tokens` (blocks/hashing.py).
#[pyfunction]
fn block_hashes(tokens: Vec<i128>, block_size: i128, seed: u64) -> PyResult<Vec<u64>> {
    hashing::block_hashes(&tokens, block_size, seed).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The parent hash of a prompt's first block (blocks/hashing.py).
#[pyfunction]
#[pyo3(signature = (model, lora_name=None, cache_salt=None))]
fn root_seed(model: &str, lora_name: Option<&str>, cache_salt: Option<&str>) -> u64 {
    hashing::root_seed(model, lora_name, cache_salt)
}

/// One worker's engine hash -> router hash mapping (block_mapper.py's state).
/// `types`: the Python classes its results are made of, (Frame, KvDelta,
/// KvOp), so a frame costs no Python-level call besides this one. Sendable:
/// a node built on a thread of its own may be collected on another.
#[pyclass(module = "kvmesh_native")]
struct NativeMapper {
    inner: Mapper,
    frame_cls: Py<PyAny>,
    delta_cls: Py<PyAny>,
    op_cls: Py<PyAny>,
}

impl NativeMapper {
    /// `KvDelta(worker, seq, [KvOp(kind, hashes, ehashes, tier), ...])`.
    fn delta<'py>(
        &self,
        py: Python<'py>,
        worker: &Bound<'py, PyAny>,
        seq: &Bound<'py, PyAny>,
        ops: &[Op],
    ) -> PyResult<Bound<'py, PyAny>> {
        let op_cls = self.op_cls.bind(py);
        let items = ops
            .iter()
            .map(|op| {
                op_cls.call1((op.kind, PyList::new(py, &op.hashes)?, ehashes_py(py, &op.ehashes)?, op.tier))
            })
            .collect::<PyResult<Vec<_>>>()?;
        self.delta_cls.bind(py).call1((worker, seq, PyList::new(py, items)?))
    }

    /// A frame decoded and mapped: (Frame(ts, events, rank), ops, notes);
    /// ValueError for an unreadable envelope (then nothing is applied).
    fn decode_and_map<'py>(
        &mut self,
        py: Python<'py>,
        payload: &[u8],
        check: Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyAny>, Vec<Op>, Vec<Note>)> {
        let frame: Frame = guarded(value_error, || {
            events::decode_frame(payload, &PyCheck(check)).map_err(|e| value_error(e.0))
        })?;
        let inner = &mut self.inner;
        let (ops, notes) = guarded(runtime_error, || Ok(inner.map_events(&frame.events, payload)))?;
        let rank = frame.data_parallel_rank.or(frame.attn_dp_rank).unwrap_or(0);
        let info = self.frame_cls.bind(py).call1((frame.ts, frame.events.len(), int_py(py, rank)?))?;
        Ok((info, ops, notes))
    }

    fn notes<'py>(py: Python<'py>, notes: &[Note]) -> PyResult<Bound<'py, PyAny>> {
        if notes.is_empty() {
            Ok(py.None().into_bound(py))
        } else {
            Ok(notes_py(py, notes)?.into_any())
        }
    }
}

#[pymethods]
impl NativeMapper {
    #[new]
    #[pyo3(signature = (model, block_size, types))]
    fn new(model: String, block_size: Option<i128>, types: (Py<PyAny>, Py<PyAny>, Py<PyAny>)) -> Self {
        let (frame_cls, delta_cls, op_cls) = types;
        NativeMapper { inner: Mapper::new(model, block_size), frame_cls, delta_cls, op_cls }
    }

    #[getter]
    fn get_block_size(&self) -> Option<i128> {
        self.inner.block_size
    }

    #[setter]
    fn set_block_size(&mut self, v: Option<i128>) {
        self.inner.block_size = v;
    }

    /// Decode a frame and map it: (Frame(ts, events, rank), KvDelta, note
    /// tuples or None); ValueError for an unreadable envelope (then nothing
    /// is applied).
    fn map_frame<'py>(
        &mut self,
        py: Python<'py>,
        payload: &[u8],
        worker: Bound<'py, PyAny>,
        seq: Bound<'py, PyAny>,
        check: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let (info, ops, notes) = self.decode_and_map(py, payload, check)?;
        (info, self.delta(py, &worker, &seq, &ops)?, Self::notes(py, &notes)?).into_pyobject(py)
    }

    /// `map_frame` with its delta as the log entry that holds it: (Frame,
    /// `PackedEntry` of `KvDelta(worker, seq, ops)`, note tuples or None);
    /// the entry's `raw` is `encode_entry([delta])` byte for byte, built
    /// with it (`entry_enc`). ValueError for an unreadable envelope;
    /// TypeError or OverflowError for a worker or seq no entry holds
    /// (worker not a str, seq not an int in [-1, 2**64)); each before
    /// anything is applied.
    fn map_frame_packed<'py>(
        &mut self,
        py: Python<'py>,
        payload: &[u8],
        worker: Bound<'py, PyString>,
        seq: Bound<'py, PyAny>,
        check: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let seq = entry_enc::seq_of(&seq)?;
        if let Err(e) = worker.to_str() {
            return Err(PyTypeError::new_err(format!("worker is no str a log entry holds: {e}")));
        }
        let (info, ops, notes) = self.decode_and_map(py, payload, check)?;
        // An error here is a bug (a decoded frame's engine hashes fit msgpack,
        // the mapper's ops are valid): RuntimeError, the mapper has changed.
        let entry = guarded(runtime_error, || entry_enc::packed_delta(py, &worker, seq, &ops))?;
        (info, Bound::new(py, entry)?, Self::notes(py, &notes)?).into_pyobject(py)
    }

    /// Map event tuples (see `event_rs`): (KvDelta, note tuples or None).
    fn map_events<'py>(
        &mut self,
        py: Python<'py>,
        events: Bound<'py, PyList>,
        worker: Bound<'py, PyAny>,
        seq: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let evs = events.iter().map(|t| event_rs(t.cast::<PyTuple>()?)).collect::<PyResult<Vec<Event>>>()?;
        let inner = &mut self.inner;
        let (ops, notes) = guarded(runtime_error, || Ok(inner.map_events(&evs, &[])))?;
        (self.delta(py, &worker, &seq, &ops)?, Self::notes(py, &notes)?).into_pyobject(py)
    }

    /// The router hash of an engine block live on any tier, or None.
    fn router_hash(&self, eh: Bound<'_, PyAny>) -> PyResult<Option<u64>> {
        Ok(ehash_rs(&eh).ok().and_then(|e| self.inner.router_hash(&e)))
    }

    /// The live router hashes on the GPU.
    fn live<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PySet>> {
        PySet::new(py, self.inner.gpu().live())
    }

    /// Tier -> its live router hashes, for every tier with live blocks.
    fn live_by_tier<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (t, m) in self.inner.tiers() {
            d.set_item(t, PySet::new(py, m.live())?)?;
        }
        Ok(d)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn clear(&mut self) {
        self.inner.clear();
    }

    /// Every live block: (engine hash, router hash) on the GPU, then
    /// (engine hash, router hash, tier) on the other tiers in tier order.
    fn export<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .inner
            .export()
            .iter()
            .map(|(eh, rh, t)| {
                let eh = ehash_py(py, eh)?;
                Ok(if *t == events::TIER_GPU {
                    (eh, *rh).into_pyobject(py)?.into_any()
                } else {
                    (eh, *rh, *t).into_pyobject(py)?.into_any()
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// Replace the mapping with `pairs` (2- or 3-tuples, as `export` gives).
    fn restore(&mut self, pairs: Bound<'_, PyAny>) -> PyResult<()> {
        let mut out = Vec::new();
        for p in pairs.try_iter()? {
            let p = p?;
            let n = p.len()?;
            let tier: u8 = if n == 3 { p.get_item(2)?.extract()? } else { events::TIER_GPU };
            if !(n == 2 || n == 3) || tier >= events::N_TIERS {
                return Err(PyValueError::new_err(format!("not a mapped block: {}", p.repr()?)));
            }
            out.push((ehash_rs(&p.get_item(0)?)?, p.get_item(1)?.extract::<u64>()?, tier));
        }
        self.inner.restore(out);
        Ok(())
    }

    /// (stored, removed, cleared, unknown_parent, unknown_removed,
    /// invalid_tokens, placeholder_blocks, skipped_events,
    /// skipped_by_reason, block_size_mismatch), MapperStats' fields.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let s = &self.inner.stats;
        let by_reason = PyDict::new(py);
        for (r, n) in &s.skipped_by_reason {
            by_reason.set_item(*r, *n)?;
        }
        (
            s.stored,
            s.removed,
            s.cleared,
            s.unknown_parent,
            s.unknown_removed,
            s.invalid_tokens,
            s.placeholder_blocks,
            s.skipped_events,
            by_reason,
            s.block_size_mismatch,
        )
            .into_pyobject(py)
    }
}

#[pymodule]
fn kvmesh_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_frame, m)?)?;
    m.add_function(wrap_pyfunction!(block_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(root_seed, m)?)?;
    m.add_class::<NativeMapper>()?;
    m.add_class::<pyindex::NativeIndex>()?;
    m.add_function(wrap_pyfunction!(entry::decode_entry, m)?)?;
    m.add_class::<entry::PackedEntry>()?;
    m.add_class::<live::LiveMaps>()?;
    m.add_function(wrap_pyfunction!(entry_enc::join_entries, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
