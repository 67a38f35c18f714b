"""The owner's live maps in Rust (``kvmesh_native.LiveMaps``, native/src/live.rs)
against the reference (``mesh.engine_log.live.PyLiveState``): random deltas over
three workers, every tier, small hash pools (so stores replace, removes hit and
miss, engine hashes equal router hashes and then do not), int engine hashes of
every width msgpack holds (and wider, through ``apply``) and bytes ones, CLEARs;
applied to the reference, to one ``LiveMaps`` with ``apply`` and to another
with ``apply_packed`` of the encoded and natively decoded entry. After every
step the counters, workers, pairs and live sets agree; at the end the snapshot
entries decode to the same deltas, before and after ``compact()``, and
``emptied()`` keeps the workers. A bad delta raises and changes nothing."""

from __future__ import annotations

import importlib
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocks.block_map import MappedBlock, ehash_bytes
from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, EngineHash, KvDelta, KvOp
from blocks.tiers import TIERS
from mesh.engine_log.entry import decode_entry, encode_entry
from mesh.engine_log.live import PyLiveState

native: Any
try:
    native = importlib.import_module("kvmesh_native")
except ImportError:
    native = None

pytestmark = pytest.mark.skipif(
    native is None or not hasattr(native, "LiveMaps"),
    reason="NATIVE PATH NOT TESTED: the native module is not built (`make install` builds it where cargo is)",
)

ENGINE = "e"
WORKERS = ["e", "e#dp1", "e#dp2"]
ROUTER = st.sampled_from([0, 1, 2, 3, 4, 2**63, 2**64 - 1])
# Engine hashes msgpack holds (what a log entry can carry), overlapping the
# router hashes so identity pairs come and go.
PACKABLE_INT = st.sampled_from([0, 1, 2, 3, 4, 5, -1, -33, -(2**63), 2**63, 2**64 - 1])
WIDE_INT = st.sampled_from([2**64, 2**100, -(2**63) - 1, -(2**127), 2**127 - 1])
BYTES = st.sampled_from([b"", b"\x01", b"\x00\x01", b"k" * 255, b"k" * 256, b"m" * 65536])


def ops_strategy(ehash: st.SearchStrategy[EngineHash]) -> st.SearchStrategy[KvOp]:
    tier = st.sampled_from(TIERS)

    @st.composite
    def op(draw: st.DrawFn) -> KvOp:
        kind = draw(st.sampled_from([OP_STORE, OP_STORE, OP_STORE, OP_REMOVE, OP_REMOVE, OP_CLEAR]))
        t = draw(tier)
        if kind == OP_CLEAR:
            return KvOp(OP_CLEAR, [], [], t)
        hashes = draw(st.lists(ROUTER, max_size=5))
        if draw(st.integers(0, 3)) == 0:  # no engine hashes: identity pairs
            return KvOp(kind, hashes, [], t)
        n = len(hashes) if kind == OP_STORE else draw(st.integers(0, 5))
        return KvOp(kind, hashes, draw(st.lists(ehash, min_size=n, max_size=n)), t)

    return op()


def deltas_strategy(ehash: st.SearchStrategy[EngineHash]) -> st.SearchStrategy[KvDelta]:
    return st.builds(
        KvDelta,
        st.sampled_from(WORKERS),
        st.integers(-1, 2**40),
        st.lists(ops_strategy(ehash), max_size=4),
    )


PACKABLE = st.one_of(PACKABLE_INT, PACKABLE_INT, BYTES)
WIDE = st.one_of(PACKABLE_INT, WIDE_INT, BYTES)
# A step: deltas applied in order, and whether the packed side gets them as one entry.
STEPS = st.lists(
    st.tuples(st.lists(deltas_strategy(PACKABLE), min_size=1, max_size=3), st.booleans()), max_size=14
)
SEQS = st.dictionaries(st.sampled_from([*WORKERS, "e#dp3"]), st.integers(-1, 2**64 - 1), max_size=4)


def pairs_key(p: MappedBlock) -> str:
    return repr(p)


def true_ehash_bytes(ref: PyLiveState) -> int:
    """The definition: the msgpack size of every non-identity pair's engine hash."""
    return sum(ehash_bytes(p[0]) for w in ref.workers() for p in ref.pairs(w) if p[0] != p[1])


def assert_same(ref: PyLiveState, nat: Any) -> None:
    assert nat.workers() == ref.workers()
    assert len(nat) == len(ref)
    assert nat.engine_blocks == ref.engine_blocks
    assert nat.lower_maps == ref.lower_maps
    # Both counters, and their definition over the reference's pairs.
    assert nat.ehash_bytes == ref.ehash_bytes == true_ehash_bytes(ref)
    for w in [*ref.workers(), "unknown"]:
        got = nat.pairs(w)
        assert sorted(got, key=pairs_key) == sorted(ref.pairs(w), key=pairs_key)
        tiers = [p[2] if len(p) == 3 else 0 for p in got]
        assert tiers == sorted(tiers)  # GPU first, then tier order
    assert nat.live_sets() == ref.live_sets()
    assert nat.live_sets_by_tier() == ref.live_sets_by_tier()
    assert nat.live_blocks() == ref.live_blocks()


def canonical(raw: bytes) -> list[tuple[str, int, list[tuple[int, int, list[Any]]]]]:
    """The snapshot's deltas, pairs inside each op sorted."""
    out = []
    for d in decode_entry(raw):
        ops = []
        for op in d.ops:
            items = (
                sorted(zip(op.hashes, op.ehashes, strict=True), key=repr) if op.ehashes else sorted(op.hashes)
            )
            ops.append((op.kind, op.tier, list(items)))
        out.append((d.worker, d.seq, ops))
    return out


def assert_same_snapshot(ref: PyLiveState, nat: Any, seqs: dict[str, int]) -> None:
    want = ref.snapshot_entry(seqs)
    got = nat.snapshot_entry(seqs)
    assert canonical(got) == canonical(want)
    assert len(got) == len(want)
    assert len(native.decode_entry(ENGINE, got)) == len(set(ref.workers()) | set(seqs))


def state(nat: Any) -> tuple[Any, ...]:
    return (
        nat.workers(),
        nat.engine_blocks,
        nat.ehash_bytes,
        nat.lower_maps,
        {w: sorted(nat.pairs(w), key=pairs_key) for w in nat.workers()},
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS, seqs=SEQS)
def test_parity_with_the_reference(steps: list[tuple[list[KvDelta], bool]], seqs: dict[str, int]) -> None:
    ref, nat, packed = PyLiveState(), native.LiveMaps(), native.LiveMaps()
    for batch, one_entry in steps:
        for d in batch:
            ref.apply(d)
            nat.apply(d)
        entries = [batch] if one_entry else [[d] for d in batch]
        for e in entries:
            packed.apply_packed(native.decode_entry(ENGINE, encode_entry(e)))
        assert_same(ref, nat)
        assert_same(ref, packed)
    for live in (nat, packed):
        assert_same_snapshot(ref, live, seqs)
    ref.compact()
    for live in (nat, packed):
        live.compact()
        assert_same(ref, live)
        assert_same_snapshot(ref, live, seqs)
    ref_empty = ref.emptied()
    for live in (nat, packed):
        empty = live.emptied()
        assert_same(ref_empty, empty)
        assert (empty.engine_blocks, empty.ehash_bytes, empty.lower_maps) == (0, 0, 0)
        assert_same_snapshot(ref_empty, empty, seqs)
        assert live.workers() == ref.workers()  # the original is untouched


@settings(max_examples=150, deadline=None)
@given(deltas=st.lists(deltas_strategy(WIDE), max_size=20))
def test_ints_msgpack_cannot_hold(deltas: list[KvDelta]) -> None:
    """Engine hashes past msgpack's ints (``apply`` only: no entry can carry
    them) are kept; a snapshot of them fails as msgspec fails."""
    ref, nat = PyLiveState(), native.LiveMaps()
    for d in deltas:
        ref.apply(d)
        nat.apply(d)
        assert_same(ref, nat)
    try:
        want = ref.snapshot_entry({})
    except OverflowError:
        with pytest.raises(OverflowError):
            nat.snapshot_entry({})
    else:
        assert canonical(nat.snapshot_entry({})) == canonical(want)


def test_churn_at_scale() -> None:
    """Tables grow, shrink and compact under churn of many blocks; a seeded run."""
    rng = random.Random(7)
    ref, nat, packed = PyLiveState(), native.LiveMaps(), native.LiveMaps()
    pool = [rng.getrandbits(64) for _ in range(30_000)]
    for step in range(300):
        worker = WORKERS[step % 3]
        ehs: list[EngineHash] = list(rng.sample(pool, rng.randrange(1, 400)))
        tier = rng.choice(TIERS)
        if step % 97 == 96:
            op = KvOp(OP_CLEAR, [])
        elif rng.random() < 0.6:
            op = KvOp(OP_STORE, [h >> 1 for h in ehs if isinstance(h, int)], ehs, tier)
        else:
            op = KvOp(OP_REMOVE, [], ehs, tier)
        d = KvDelta(worker, step, [op])
        ref.apply(d)
        nat.apply(d)
        packed.apply_packed(native.decode_entry(ENGINE, encode_entry([d])))
        if step % 50 == 0:
            for live in (ref, nat, packed):
                live.compact()
    for live in (nat, packed):
        assert_same(ref, live)
        assert_same_snapshot(ref, live, {"e": 299})
    assert nat.engine_blocks > 1000


def good_state() -> tuple[PyLiveState, Any]:
    ref, nat = PyLiveState(), native.LiveMaps()
    for d in [
        KvDelta("e", 0, [KvOp(OP_STORE, [1, 2], [10, b"x"]), KvOp(OP_STORE, [3], [], 2)]),
        KvDelta("e#dp1", 1, [KvOp(OP_STORE, [4], [40], 1)]),
    ]:
        ref.apply(d)
        nat.apply(d)
    return ref, nat


GOOD_OPS = [KvOp(OP_STORE, [5], [50], 1), KvOp(OP_REMOVE, [], [10]), KvOp(OP_CLEAR, [])]
# Made through Any: the values are what the type checker would refuse.
_op: Any = KvOp
_delta: Any = KvDelta
BAD_OPS: list[tuple[Any, type[Exception]]] = [
    (_op(OP_STORE, [True], []), TypeError),  # bool router hash
    (_op(OP_STORE, [1], [False]), TypeError),  # bool engine hash
    (_op(OP_STORE, [1], [1], "1"), TypeError),  # str tier
    (_op(OP_STORE, [1], [1], True), TypeError),  # bool tier
    (_op(OP_STORE, [1], [1], 4), ValueError),  # no such tier
    (_op(3, [1]), ValueError),  # no such kind
    (_op(1.0, [1]), TypeError),  # float kind
    (_op(OP_STORE, [1.0]), TypeError),  # float router hash
    (_op(OP_STORE, [-1]), ValueError),  # router hash out of range
    (_op(OP_STORE, [2**64]), ValueError),
    (_op(OP_STORE, [1], ["x"]), TypeError),  # str engine hash
    (_op(OP_STORE, [1], [bytearray(b"x")]), TypeError),
    (_op(OP_STORE, [1], [2**127]), ValueError),  # engine hash past i128
    (_op(OP_STORE, [1, 2], [1]), ValueError),  # STORE lengths
    (_op(OP_CLEAR, [], [1]), ValueError),  # CLEAR with engine hashes
    (_op(OP_STORE, None), TypeError),
    (None, AttributeError),  # not an op
]


@pytest.mark.parametrize(("bad", "error"), BAD_OPS)
@pytest.mark.parametrize("worker", ["e", "e#dp2"])
def test_bad_delta_changes_nothing(bad: Any, error: type[Exception], worker: str) -> None:
    """Good ops (a STORE, a REMOVE, a CLEAR) before a bad one: nothing of the
    delta is applied, and a new worker is not made."""
    ref, nat = good_state()
    before = state(nat)
    with pytest.raises(error):
        nat.apply(KvDelta(worker, 2, [*GOOD_OPS, bad]))
    assert state(nat) == before
    assert_same(ref, nat)


@pytest.mark.parametrize("delta", [_delta(7, 0, []), _delta("e", 0, None), object()])
def test_bad_delta_shape(delta: Any) -> None:
    _, nat = good_state()
    before = state(nat)
    with pytest.raises((TypeError, AttributeError)):
        nat.apply(delta)
    assert state(nat) == before


def test_bad_arguments() -> None:
    ref, nat = good_state()
    with pytest.raises(TypeError):
        nat.apply_packed([KvDelta("e", 0, [])])
    with pytest.raises(TypeError):
        nat.snapshot_entry({"e": True})
    with pytest.raises(TypeError):
        nat.snapshot_entry({1: 2})
    with pytest.raises(OverflowError):
        nat.snapshot_entry({"e": 2**64})
    with pytest.raises(OverflowError):
        ref.snapshot_entry({"e": 2**64})
    assert nat.pairs(1) == nat.pairs(b"e") == nat.pairs("nobody") == []


def test_a_delta_without_ops_makes_the_worker() -> None:
    ref, nat, packed = PyLiveState(), native.LiveMaps(), native.LiveMaps()
    d = KvDelta("e#dp2", 3, [])
    ref.apply(d)
    nat.apply(d)
    packed.apply_packed(native.decode_entry(ENGINE, encode_entry([d])))
    for live in (nat, packed):
        assert_same(ref, live)
        assert live.workers() == ["e#dp2"]
        assert live.live_sets() == {"e#dp2": set()}
        assert_same_snapshot(ref, live, {})


def test_lower_maps_follow_the_reference() -> None:
    """A lower-tier map exists from any op on its tier (a REMOVE of nothing
    too) to a CLEAR, or to a compaction that finds it empty."""
    ref, nat = PyLiveState(), native.LiveMaps()
    for d, lower in [
        (KvDelta("e", 0, [KvOp(OP_REMOVE, [], [], 1)]), 1),
        (KvDelta("e", 1, [KvOp(OP_STORE, [1], [], 3)]), 2),
        (KvDelta("e#dp1", 2, [KvOp(OP_STORE, [], [], 2)]), 3),
        (KvDelta("e", 3, [KvOp(OP_CLEAR, [], [], 2)]), 1),
    ]:
        ref.apply(d)
        nat.apply(d)
        assert nat.lower_maps == ref.lower_maps == lower
    ref.compact()
    nat.compact()
    assert nat.lower_maps == ref.lower_maps == 0


def test_ehash_bytes_follow_rebinding() -> None:
    """An engine hash rebound between an identity pair and another changes
    the snapshot's size; removing it afterwards leaves nothing counted."""
    nat = native.LiveMaps()
    for op, want in [
        (KvOp(OP_STORE, [5]), 0),
        (KvOp(OP_STORE, [7], [5]), 9),
        (KvOp(OP_STORE, [5], [5]), 0),
        (KvOp(OP_STORE, [7], [5]), 9),
        (KvOp(OP_REMOVE, [], [5]), 0),
    ]:
        nat.apply(KvDelta("e", 0, [op]))
        assert nat.ehash_bytes == want


def test_reference_ehash_bytes_follow_rebinding() -> None:
    ref = PyLiveState()
    ref.apply(KvDelta("e", 0, [KvOp(OP_STORE, [5])]))
    ref.apply(KvDelta("e", 1, [KvOp(OP_STORE, [7], [5])]))
    assert ref.ehash_bytes == true_ehash_bytes(ref) == 9
    ref.apply(KvDelta("e", 2, [KvOp(OP_REMOVE, [], [5])]))
    assert ref.ehash_bytes == 0
