"""The native prefix index (native/src/index.rs, router/native_index.py)
against the pure-Python reference (router/index.py): hypothesis feeds both
the same random operations (stores, removes and clears on every tier, many
workers, deltas good and bad, workers added and removed) and every answer
must be equal: matches and tier matches of random prefixes (result order
included), each worker's blocks per tier, errors, statistics."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, KvDelta, KvOp
from blocks.tiers import TIERS
from router import native_index
from router.index import PrefixIndex

pytestmark = pytest.mark.skipif(
    not native_index.NATIVE_INDEX_BUILT,
    reason="NATIVE PATH NOT TESTED: the native module is not built (`make install` builds it where cargo is)",
)

# Chains sharing prefixes, so that blocks have many different holder sets;
# values at both ends of the u64 range occur on the wire.
POOL = [0, 1, 2, 3, 4, 5, 6, 7, 8, 2**63, 2**63 + 1, 2**64 - 1]
CHAINS = [[0, 1, 2, 3, 4], [0, 1, 2, 5, 6], [0, 1, 7, 8], [2**63, 2**63 + 1, 2**64 - 1], [3, 4, 0]]
# More than 128 workers: holder sets span several 64-bit words.
WORKERS = [f"e{i}" for i in range(140)] + ["e1#dp1", "e1#dp2"]

# Mostly a few workers (their blocks overlap), sometimes any of them.
worker_st = st.integers(0, 9).flatmap(lambda r: st.sampled_from(WORKERS[:3] if r < 8 else WORKERS))
tier_st = st.sampled_from(TIERS).flatmap(lambda t: st.just(t) if t else st.sampled_from([0, 0, 0, t]))
hashes_st = st.one_of(
    st.lists(st.sampled_from(POOL), max_size=8),
    st.sampled_from(CHAINS).flatmap(lambda c: st.integers(0, len(c)).map(lambda k: c[:k])),
)
query_st = st.one_of(
    st.sampled_from(CHAINS).flatmap(lambda c: st.integers(0, len(c)).map(lambda k: c[:k])),
    st.lists(st.sampled_from(POOL), max_size=6),
    # values no router hash has: a block no worker holds, in both
    st.lists(st.sampled_from([*POOL, -1, 2**64, 2**70]), max_size=6),
)
workers_arg_st = st.one_of(
    st.none(),
    st.lists(st.sampled_from([*WORKERS[:8], "nobody"]), max_size=6),
    st.lists(st.sampled_from([*WORKERS[:8], "nobody"]), max_size=6).map(tuple),
)
kvop_st = st.builds(
    KvOp,
    kind=st.sampled_from([OP_STORE, OP_STORE, OP_REMOVE, OP_REMOVE, OP_CLEAR]),
    hashes=hashes_st,
    tier=tier_st,
)
bad_kvop_st = st.one_of(
    st.builds(KvOp, kind=st.sampled_from([3, -1, 9]), hashes=hashes_st),
    st.builds(KvOp, kind=st.just(OP_STORE), hashes=hashes_st, tier=st.sampled_from([4, -1, 7])),
)
op_st = st.one_of(
    st.tuples(st.just("store"), worker_st, hashes_st, tier_st),
    st.tuples(st.just("remove"), worker_st, hashes_st, tier_st),
    st.tuples(st.just("clear_worker"), worker_st),
    st.tuples(st.just("remove_worker"), worker_st),
    st.tuples(st.just("add_worker"), worker_st),
    st.tuples(st.just("apply"), worker_st, st.lists(kvop_st, max_size=4)),
    # a bad op anywhere in a delta: refused whole, nothing applied
    st.tuples(
        st.just("apply"),
        st.sampled_from([*WORKERS[:4], ""]),
        st.lists(kvop_st, max_size=3).flatmap(lambda ops: bad_kvop_st.map(lambda b: [*ops, b])),
    ),
    st.tuples(st.just("apply"), st.just(""), st.lists(kvop_st, max_size=2)),
    st.tuples(st.just("store"), st.sampled_from(["", *WORKERS[:2]]), hashes_st, st.sampled_from([5, -1])),
    st.tuples(st.just("match"), query_st, workers_arg_st),
    st.tuples(st.just("match_tiers"), query_st, workers_arg_st),
)


def call(index: Any, op: tuple[Any, ...]) -> Any:
    """Runs one operation: its result, or the error it raised (type, message)."""
    name, *args = op
    try:
        if name == "apply":
            worker, ops = args
            return index.apply(KvDelta(worker=worker, seq=1, ops=ops))
        return getattr(index, name)(*args)
    except ValueError as e:
        return ("ValueError", str(e))


def observed(index: Any) -> dict[str, Any]:
    """Everything one can read of an index."""
    workers = index.workers()
    return {
        "workers": workers,
        "len": len(index),
        "lower_blocks": index.lower_blocks,
        "stats": index.stats(),
        "contains": [w in index for w in WORKERS[:8]],
        "blocks": {w: index.tier_blocks(w) for w in [*workers, "nobody"]},
        "hashes": {(w, t): index.worker_hashes(w, t) for w in workers for t in (*TIERS, 9)},
        "blocks_of": {(w, t): index.blocks_of(w, t) for w in workers[:3] for t in (*TIERS, 9)},
        "chains": [index.match(c) for c in CHAINS],
        "chain_tiers": [index.match_tiers(c) for c in CHAINS],
    }


def check_same(py: PrefixIndex, nat: Any) -> None:
    """Both indexes agree on everything, result order included."""
    a, b = observed(py), observed(nat)
    assert a == b
    for key in ("chains", "chain_tiers"):
        assert [list(d) for d in a[key]] == [list(d) for d in b[key]]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, min_size=5, max_size=40))
def test_random_operations_agree(ops: list[tuple[Any, ...]]) -> None:
    py, nat = PrefixIndex(), native_index.NativeIndex()
    for op in ops:
        got_py, got_nat = call(py, op), call(nat, op)
        assert got_py == got_nat, op
        if isinstance(got_py, dict):
            assert list(got_py) == list(got_nat), op  # same order of workers
    check_same(py, nat)


@settings(max_examples=150, deadline=None)
@given(st.lists(op_st, min_size=3, max_size=25), st.lists(query_st, min_size=1, max_size=5))
def test_matches_after_every_operation(ops: list[tuple[Any, ...]], queries: list[list[int]]) -> None:
    """Intermediate states too: match and match_tiers after each operation."""
    py, nat = PrefixIndex(), native_index.NativeIndex()
    for op in ops:
        call(py, op)
        call(nat, op)
        for q in queries:
            for workers in (None, WORKERS[:5], ["nobody", *WORKERS[2:4], WORKERS[2]]):
                want, got = py.match(q, workers), nat.match(q, workers)
                assert want == got and list(want) == list(got), (op, q)
                assert py.match_tiers(q, workers) == nat.match_tiers(q, workers), (op, q)


def test_a_thousand_engines() -> None:
    """1,100 workers sharing prefixes in many combinations (holder sets of
    up to all of them), then removals, clears and workers gone: the same
    matches throughout, and holder sets freed with their last block."""
    rng = random.Random(12)
    workers = [f"engine-{i}" for i in range(1100)]
    chains = [[rng.getrandbits(64) for _ in range(64)] for _ in range(12)]
    py, nat = PrefixIndex(), native_index.NativeIndex()

    def same() -> None:
        for c in chains:
            for k in (1, 17, 64):
                q = c[:k] + [rng.getrandbits(64)]
                for ws in (None, workers[::7], workers[500:520]):
                    want, got = py.match(q, ws), nat.match(q, ws)
                    assert want == got and list(want) == list(got)
                assert py.match_tiers(q) == nat.match_tiers(q)
        assert len(py) == len(nat) and py.stats() == nat.stats()

    for w in workers:
        c = rng.choice(chains)
        hs, tier = c[: rng.randint(1, 64)], rng.choice([0, 0, 0, 1, 2, 3])
        py.store(w, hs, tier)
        nat.store(w, hs, tier)
    same()
    assert 1 < nat.holder_sets() <= len(nat)
    for w in rng.sample(workers, 400):
        c = rng.choice(chains)
        hs = rng.sample(c, 10)
        py.remove(w, hs)
        nat.remove(w, hs)
    for w in rng.sample(workers, 200):
        assert py.clear_worker(w) == nat.clear_worker(w)
    for w in rng.sample(workers, 200):
        assert py.remove_worker(w) == nat.remove_worker(w)
    same()
    for w in list(py.workers()):
        assert py.remove_worker(w) == nat.remove_worker(w)
    assert len(nat) == 0 and nat.lower_blocks == 0 and nat.holder_sets() == 0
    assert nat.workers() == [] and nat.match(chains[0]) == {}


def test_store_refuses_hashes_outside_u64() -> None:
    """The one difference: router hashes are u64, and store says so."""
    nat = native_index.NativeIndex()
    for bad in (-1, 2**64, "a", None):
        with pytest.raises(ValueError, match="block hash must be an int"):
            nat.store("e0", [1, bad])
        with pytest.raises(ValueError, match="block hash must be an int"):
            nat.apply(KvDelta("e0", 1, [KvOp(OP_STORE, [2]), KvOp(OP_STORE, [bad])]))
    assert len(nat) == 0 and nat.blocks_of("e0") == 0
    nat.remove("e0", [-1, 2**64])  # held by no worker: ignored, as PrefixIndex does


def test_new_index_honors_pure_python() -> None:
    assert isinstance(native_index.new_index(), native_index.NativeIndex) == native_index.NATIVE_INDEX
    code = "from router.native_index import new_index; print(type(new_index()).__name__)"
    for env, want in (("1", "PrefixIndex"), ("", "NativeIndex")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "KVMESH_PURE_PYTHON": env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.strip() == want


# --- the bound (--max-index-blocks) ----------------------------------------------------------------

# Fresh chains of random hashes besides the pool: stores past a small bound,
# so both indexes evict often; matches in between decide what is recent.
fresh_st = st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=12)
bounded_op_st = st.one_of(
    op_st,
    st.tuples(st.just("store"), worker_st, fresh_st, tier_st),
    st.tuples(st.just("store"), worker_st, st.sampled_from(CHAINS), st.just(0)),
    st.tuples(st.just("match"), st.sampled_from(CHAINS), workers_arg_st),
    st.tuples(st.just("match_tiers"), st.sampled_from(CHAINS), workers_arg_st),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 14), st.lists(bounded_op_st, min_size=5, max_size=50))
def test_bounded_indexes_evict_the_same_blocks(bound: int, ops: list[tuple[Any, ...]]) -> None:
    """Random small bounds, matches interleaved with stores: after every
    operation both hold the same blocks (so they evicted the same ones), the
    same answers, and neither is past its bound."""
    py, nat = PrefixIndex(bound), native_index.NativeIndex(bound)
    for op in ops:
        got_py, got_nat = call(py, op), call(nat, op)
        assert got_py == got_nat, op
        for ix in (py, nat):
            assert len(ix) <= bound and ix.lower_blocks <= bound, op
        assert {(w, t): py.worker_hashes(w, t) for w in py.workers() for t in TIERS} == {
            (w, t): nat.worker_hashes(w, t) for w in nat.workers() for t in TIERS
        }, op
        assert py.stats() == nat.stats(), op
    check_same(py, nat)  # its matches count as uses in both, alike


def test_bounded_indexes_agree_at_scale() -> None:
    """1,000 workers, long chains, a bound of 3,000: tens of bulk evictions,
    the same blocks kept by both, holder sets freed with their blocks."""
    rng = random.Random(5)
    workers = [f"engine-{i}" for i in range(1000)]
    roots = [[rng.getrandbits(64) for _ in range(16)] for _ in range(20)]
    py, nat = PrefixIndex(3000), native_index.NativeIndex(3000)
    convs: list[list[int]] = []
    for step in range(1500):
        conv = rng.choice(roots) + [rng.getrandbits(64) for _ in range(rng.randint(8, 64))]
        convs.append(conv)
        for w in rng.sample(workers, rng.randint(1, 3)):
            tier = rng.choice([0, 0, 0, 0, 1, 2])
            py.store(w, conv, tier)
            nat.store(w, conv, tier)
        q = rng.choice(convs[-200:])
        want, got = py.match(q), nat.match(q)
        assert want == got, step
        assert py.match_tiers(q, workers[:50]) == nat.match_tiers(q, workers[:50]), step
        if step % 100 == 0:
            w = rng.choice(workers)
            assert py.clear_worker(w) == nat.clear_worker(w)
    assert py.stats() == nat.stats() and py.stats()["evicted_blocks"] > 20_000
    assert {w: py.tier_blocks(w) for w in workers} == {w: nat.tier_blocks(w) for w in workers}
    for w in workers[:100]:
        assert py.worker_hashes(w) == nat.worker_hashes(w)
    for w in workers:
        assert py.remove_worker(w) == nat.remove_worker(w)
    assert len(nat) == 0 and nat.holder_sets() == 0 and nat.lower_blocks == 0
