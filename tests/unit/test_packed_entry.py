"""Packed log entries (native/src/entry.rs, mesh/engine_log/packed.py) against
the reference: random entries, valid and not (mangled, truncated, wrong types,
bools where ints belong, out-of-range hashes, foreign workers, bad kinds and
tiers), are accepted and refused alike by ``kvmesh_native.decode_entry`` and by
msgspec's typed decode + ``validate_delta``, and decode to equal deltas; a
``NativeIndex`` fed ``apply_packed`` equals a ``PrefixIndex`` fed the deltas;
a non-owner in packed mode and one in Python mode, fed the same updates
(epoch switches, compaction and a corrupt entry included), reach equal
indexes and bookkeeping."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, KvDelta, KvOp
from blocks.tiers import TIERS
from blocks.workers import engine_of
from mesh.core import MeshConfig, MeshCore
from mesh.engine_log.entry import LogError, decode_entry, validate_delta
from mesh.engine_log.owner import CompactionPolicy
from mesh.engine_log.packed import PACKED_BUILT, IndexChange, heads_of
from mesh.state import MeshState
from mesh.state_messages import Delta, StatePush, encode_payload
from router.index import PrefixIndex
from router.native_index import NativeIndex, apply_change

pytestmark = pytest.mark.skipif(
    not PACKED_BUILT or NativeIndex is None,
    reason="NATIVE PATH NOT TESTED: the native module is not built (`make install` builds it where cargo is)",
)

if PACKED_BUILT:
    from kvmesh_native import decode_entry as native_decode

enc = msgspec.msgpack.encode
ENGINE = "e"
SPEC = {"endpoint": "tcp://127.0.0.1:5557", "model": "m"}

# --- random entries -------------------------------------------------------------------

WORKERS = ["e", "e", "e#dp1", "e#dp12", "f", "e#dpx", "e#dp", "e#dp²", "e#dp١", "ef", "é", ""]
HASH = st.sampled_from([0, 1, 2, 3, 5, 7, 2**63, 2**64 - 1])
BAD_INT: st.SearchStrategy[Any] = st.sampled_from(
    [True, False, 1.0, None, "1", b"\x01", -1, -(2**63), [1], {}]
)
EHASH = st.one_of(HASH, st.sampled_from([b"", b"\x01" * 16, -5, 2**64 - 1, -(2**63)]))
BAD_EHASH: st.SearchStrategy[Any] = st.sampled_from(["x", None, True, 1.5, [], {}])
EXTRA = st.sampled_from([None, 0, "x", b"y", [1, [2]], {"k": 1}, 1.5, msgspec.msgpack.Ext(3, b"z")])


def sometimes(
    good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], p: int = 12
) -> st.SearchStrategy[Any]:
    """Mostly ``good``, one draw in ``p`` from ``bad``."""
    return st.integers(0, p - 1).flatmap(lambda i: bad if i == 0 else good)


@st.composite
def op(draw: st.DrawFn) -> Any:
    kind = draw(
        sometimes(
            st.sampled_from([OP_STORE, OP_STORE, OP_REMOVE, OP_CLEAR]),
            st.sampled_from([3, -1, 2**64 - 1, True, 0.0]),
        )
    )
    hashes = draw(
        sometimes(st.lists(sometimes(HASH, BAD_INT, 40), max_size=6), st.sampled_from([None, 5, {}]))
    )
    if kind == OP_CLEAR and draw(st.integers(0, 3)):
        hashes = []
    fields: list[Any] = [kind, hashes]
    n = draw(st.sampled_from([2, 3, 3, 4, 4, 4, 5, 1]))
    if n >= 3:
        if isinstance(hashes, list) and draw(st.booleans()):
            ehs: Any = [draw(sometimes(EHASH, BAD_EHASH, 40)) for _ in hashes]
        else:
            ehs = draw(sometimes(st.lists(EHASH, max_size=4), st.sampled_from([None, 3, "x"])))
        if kind == OP_CLEAR and draw(st.integers(0, 3)):
            ehs = []
        fields.append(ehs)
    if n >= 4:
        fields.append(
            draw(sometimes(st.sampled_from(TIERS), st.sampled_from([4, -1, True, None, 2**64 - 1])))
        )
    fields += [draw(EXTRA) for _ in range(n - 4)]
    return fields[:n]


@st.composite
def delta(draw: st.DrawFn) -> Any:
    worker = draw(sometimes(st.sampled_from(WORKERS), st.sampled_from([b"e", 1, None]), 20))
    seq = draw(
        sometimes(
            st.sampled_from([-1, 0, 1, 7, 2**63, 2**64 - 1]), st.sampled_from([-2, -(2**63), True, 1.0, None])
        )
    )
    ops = draw(sometimes(st.lists(op(), max_size=4), st.sampled_from([None, {}, 3]), 30))
    fields: list[Any] = [worker, seq, ops]
    n = draw(st.sampled_from([3, 3, 3, 3, 4, 2]))
    fields += [draw(EXTRA) for _ in range(n - 3)]
    if draw(st.integers(0, 40)) == 0:
        return {"worker": worker, "seq": seq, "ops": ops}
    return fields[:n]


@st.composite
def raw_entry(draw: st.DrawFn) -> bytes:
    value: Any = draw(sometimes(st.lists(delta(), max_size=3), st.sampled_from([None, 1, {}, "x", [1]]), 30))
    raw = enc(value)
    mangle = draw(st.integers(0, 9))
    if mangle == 0 and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif mangle == 1 and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    elif mangle == 2:
        raw += bytes([draw(st.integers(0, 255))])
    return raw


def reference(engine: str, raw: bytes) -> list[KvDelta] | None:
    """What decode_or_skip keeps (None: skipped)."""
    try:
        deltas = decode_entry(raw)
        for d in deltas:
            validate_delta(engine, d)
    except (msgspec.DecodeError, LogError, TypeError):
        return None
    return deltas


def native(engine: str, raw: bytes) -> Any:
    try:
        return native_decode(engine, raw)
    except ValueError:
        return None


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=raw_entry(), engine=st.sampled_from([ENGINE, ENGINE, ENGINE, "e#dp", "é", "f"]))
def test_native_decode_accepts_and_refuses_as_the_reference(raw: bytes, engine: str) -> None:
    want = reference(engine, raw)
    got = native(engine, raw)
    assert (got is None) == (want is None), (raw, want)
    if want is not None:
        assert got.to_deltas() == want
        assert got.heads == tuple((d.worker, d.seq) for d in want)
        assert got.blocks == sum(len(op.hashes) for d in want for op in d.ops)
        assert len(got) == len(want)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=40))
def test_arbitrary_bytes_refused_alike(raw: bytes) -> None:
    assert (native(ENGINE, raw) is None) == (reference(ENGINE, raw) is None)


def test_edges() -> None:
    ok = enc([["e#dp١", 2**64 - 1, [[OP_STORE, [2**64 - 1, 0], [b"\x00", -(2**63)], 3, "extra"]], "x"]])
    pe = native_decode("e", ok)
    assert pe.heads == (("e#dp١", 2**64 - 1),) and pe.blocks == 2
    assert pe.to_deltas() == reference("e", ok)
    assert native_decode("e", bytearray(ok)).to_deltas() == pe.to_deltas()
    assert native_decode("e", enc([])).heads == ()
    with pytest.raises(ValueError):
        native_decode("", enc([]))  # no engine: its worker would be empty
    with pytest.raises(TypeError):
        native_decode("e", "not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a worker of engine"):
        native_decode("e", enc([["e#dp٣x", 0, []]]))
    # A digit that is no decimal (int() refuses it) is no rank.
    assert engine_of("e#dp²") == "e#dp²" and engine_of("e#dp١") == "e"
    assert reference("e", enc([["e#dp²", 0, []]])) is None and native("e", enc([["e#dp²", 0, []]])) is None


# --- the index --------------------------------------------------------------------------

POOL = [1, 2, 3, 4, 5, 6, 7, 8, 2**64 - 1]


@st.composite
def valid_entry(draw: st.DrawFn) -> bytes:
    deltas = []
    for _ in range(draw(st.integers(0, 3))):
        ops = []
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(st.sampled_from([OP_STORE, OP_STORE, OP_REMOVE, OP_REMOVE, OP_CLEAR]))
            tier = draw(st.sampled_from([0, 0, 0, 1, 2, 3]))
            hs = [] if kind == OP_CLEAR else draw(st.lists(st.sampled_from(POOL), max_size=6))
            ops.append(KvOp(kind, hs, [], tier))
        deltas.append(KvDelta(draw(st.sampled_from(["e", "e#dp1", "e#dp2"])), draw(st.integers(-1, 9)), ops))
    return enc(deltas)


def prefixes() -> list[list[int]]:
    return [POOL[:n] for n in range(len(POOL) + 1)] + [[2, 3, 4], [8, 2**64 - 1], [9, 1]]


def assert_same(a: Any, b: Any, workers: list[str]) -> None:
    assert a.stats() == b.stats()
    assert len(a) == len(b)
    for w in workers:
        assert a.tier_blocks(w) == b.tier_blocks(w)
        for t in TIERS:
            assert a.blocks_of(w, t) == b.blocks_of(w, t)
            assert a.worker_hashes(w, t) == b.worker_hashes(w, t)
    for p in prefixes():
        assert a.match(p) == b.match(p)
        assert a.match_tiers(p) == b.match_tiers(p)


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(valid_entry(), max_size=12))
def test_apply_packed_equals_applying_the_deltas(entries: list[bytes]) -> None:
    assert NativeIndex is not None
    ref, nat, py_packed = PrefixIndex(), NativeIndex(), PrefixIndex()
    for raw in entries:
        pe = native_decode(ENGINE, raw)
        for d in decode_entry(raw):
            ref.apply(d)
        nat.apply_packed(pe)
        py_packed.apply_packed(pe)
    workers = ["e", "e#dp1", "e#dp2"]
    assert_same(nat, ref, workers)
    assert_same(py_packed, ref, workers)


def test_apply_packed_reports_clears(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NativeIndex is not None
    idx = NativeIndex()
    raw = enc([KvDelta("e", 4, [KvOp(OP_STORE, [1, 2], [], 1), KvOp(OP_STORE, [3])]),
               KvDelta("e#dp1", 5, [KvOp(OP_CLEAR, [])]), KvDelta("e", 6, [KvOp(OP_CLEAR, [])])])  # fmt: skip
    assert idx._apply_packed(native_decode(ENGINE, raw)) == [(1, 0), (2, 3)]
    assert len(idx) == 0 and idx.workers() == ["e"]
    with pytest.raises(TypeError):
        idx._apply_packed(KvDelta("e", 0, []))


# --- a non-owner, packed and not ---------------------------------------------------------


def _mk(name: str, seed: int, packed: bool = False) -> MeshState:
    return MeshState(
        name, 0.0, random.Random(seed), hint_ttl=2.0, compaction=CompactionPolicy(1.5, 8), packed=packed
    )


def _history(seed: int) -> list[Delta]:
    """Everything two successive owners of engines e and g gossip: stores,
    removes and clears on every tier, a data-parallel rank, compactions,
    a corrupt entry from a foreign writer, a takeover (epoch switch)."""
    rng = random.Random(seed)
    a, b = _mk("owner-a", seed), _mk("owner-b", seed + 1)
    out: list[Delta] = [a.register_engine("e", SPEC), a.register_engine("g", SPEC)]
    out += [a.take_ownership(e, 0.0).message for e in ("e", "g")]
    live: dict[str, list[int]] = {}

    def batch(owner: MeshState, engine: str, seq: int) -> None:
        worker = rng.choice([engine, f"{engine}#dp1"])
        ops = []
        for _ in range(rng.randint(1, 3)):
            r = rng.random()
            held = live.setdefault(worker, [])
            if r < 0.55:
                hs = [rng.getrandbits(64) for _ in range(rng.randint(1, 6))]
                held += hs
                ops.append(KvOp(OP_STORE, hs, [h ^ 1 for h in hs], rng.choice([0, 0, 1, 2])))
            elif r < 0.9 and held:
                gone = held[: rng.randint(1, len(held))]
                del held[: len(gone)]
                ops.append(KvOp(OP_REMOVE, gone, [h ^ 1 for h in gone], rng.choice([0, 0, 1])))
            elif r >= 0.97:
                held.clear()
                ops.append(KvOp(OP_CLEAR, []))
        out.append(owner.local_deltas(engine, [KvDelta(worker, seq, ops)]))

    for seq in range(40):
        batch(a, rng.choice(["e", "g"]), seq)
    # A foreign writer's entry: skipped (and logged) by both kinds of replica.
    own = a.owners["e"]
    ed = own.replica.current
    assert ed is not None
    ed.append(enc([["e", 1, [[OP_STORE, [True]]]]]), own._length)
    own._length += 1
    out.append(Delta(sender="owner-a", logs=[out[-1].logs[0].__class__("e", own.epoch, own._updates.pop())]))
    for d in out:
        b.apply_remote(d, 0.0)
    # Written by a but never seen by b: b's snapshot lacks the worker, so the
    # epoch switch clears it on every replica (a synthetic KvDelta).
    out.append(a.local_deltas("e", [KvDelta("e#dp3", 99, [KvOp(OP_STORE, [11, 12], [], 0)])]))
    out.append(b.take_ownership("e", 1.0).message)  # term 2: an epoch switch on every replica
    for seq in range(40, 70):
        engine = rng.choice(["e", "g"])
        batch(b if engine == "e" else a, engine, seq)
    out.append(a.deregister_engine("g") or Delta(sender="owner-a"))
    return out


def _apply(index: Any, changes: list[IndexChange]) -> None:
    for ch in changes:
        apply_change(index, ch)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_packed_non_owner_reaches_the_same_state(seed: int) -> None:
    assert NativeIndex is not None
    history = _history(seed)
    py_state, packed_state = _mk("py", 90), _mk("packed", 91, packed=True)
    py_index, packed_index, packed_py_index = PrefixIndex(), NativeIndex(), PrefixIndex()
    kinds: set[type] = set()
    for i, d in enumerate(history):
        py_changes = py_state.apply_remote(d, 0.0).index_changes
        changes = packed_state.apply_remote(d, 0.0).index_changes
        kinds |= {type(c) for c in changes}
        assert [h for c in changes for h in heads_of(c)] == [h for c in py_changes for h in heads_of(c)], i
        _apply(py_index, py_changes)
        _apply(packed_index, changes)
        _apply(packed_py_index, changes)
    assert KvDelta in kinds and len(kinds) == 2  # epoch switch CLEARs and packed entries
    workers = sorted(
        {w for rep in py_state.logs.values() for w in rep.workers} | {"e", "e#dp1", "g", "g#dp1"}
    )
    for e, rep in py_state.logs.items():
        other = packed_state.logs[e]
        assert (rep.epoch, rep.workers, rep.last_seq) == (other.epoch, other.workers, other.last_seq)
        assert rep.materialise_tiers() == other.materialise_tiers()
    assert_same(packed_index, py_index, workers)
    assert_same(packed_py_index, py_index, workers)
    assert py_index.stats()["entries"] > 0


def test_mesh_cores_packed_and_not_clear_the_same_workers() -> None:
    """MeshCore's worker bookkeeping reads a packed entry's heads: when the
    engine is deregistered, both cores clear the same workers."""
    assert NativeIndex is not None
    history = _history(7)
    cores = {
        p: MeshCore(f"n-{p}", f"n-{p}", 0.0, random.Random(5), MeshConfig(packed_entries=p))
        for p in (False, True)
    }
    indexes: dict[bool, Any] = {False: PrefixIndex(), True: NativeIndex()}
    for d in history:
        for p, core in cores.items():
            core.handle(StatePush("src", core.addr, encode_payload(d)), 0.0)
            _apply(indexes[p], core.take_index_changes())
    assert cores[True]._workers == cores[False]._workers
    assert set(cores[True]._workers) == {"e"}  # g was deregistered: its workers cleared
    workers = ["e", "e#dp1", "e#dp3", "g", "g#dp1"]
    assert indexes[True].blocks_of("g") == indexes[True].blocks_of("g#dp1") == 0
    assert_same(indexes[True], indexes[False], workers)


def test_packed_mode_needs_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh.engine_log import replica

    monkeypatch.setattr(replica, "PACKED_BUILT", False)
    with pytest.raises(ValueError, match="native module"):
        replica.EngineLogReplica("e", packed=True)
