import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, KvDelta, KvOp
from blocks.tiers import TIER_GPU, TIER_HOST, TIERS
from router.index import PrefixIndex
from router.native_index import NATIVE_INDEX_BUILT, NativeIndex

# Two chains that share a 3-block prefix, plus values >= 2**63 (they occur on the wire).
POOL = [11, 12, 13, 21, 22, 23, 24, 31, 32, 2**64 - 1, 2**63 + 5, 2**63]
CHAINS = [[11, 12, 13, 21, 22, 23, 24], [11, 12, 13, 31, 32], [2**63, 2**63 + 5, 2**64 - 1]]
WORKERS = ["e0", "e1", "e1#dp1", "e2"]


@pytest.fixture(scope="module", params=["python", "native"])
def make_index(request):
    """Every test here runs against both implementations (the native one is
    ``NativeIndex``, which ``new_index()`` serves where the module is built)."""
    if request.param == "native":
        if not NATIVE_INDEX_BUILT:
            pytest.skip("NATIVE PATH NOT TESTED: the native module is not built (`make install` builds it)")
        return NativeIndex
    return PrefixIndex


worker_st = st.sampled_from(WORKERS)
hashes_st = st.lists(st.sampled_from(POOL), max_size=8)
op_st = st.one_of(
    st.tuples(st.just("store"), worker_st, hashes_st),
    st.tuples(st.just("remove"), worker_st, hashes_st),
    st.tuples(st.just("clear"), worker_st, st.just([])),
    st.tuples(st.just("remove_worker"), worker_st, st.just([])),
    st.tuples(
        st.just("apply"),
        worker_st,
        st.lists(st.tuples(st.sampled_from([OP_STORE, OP_REMOVE, OP_CLEAR]), hashes_st), max_size=4),
    ),
)
query_st = st.one_of(
    st.sampled_from(CHAINS).flatmap(lambda c: st.integers(0, len(c)).map(lambda k: c[:k])),
    hashes_st,
)


def naive_match(model: dict[str, set[int]], hashes, workers):
    out = {}
    for w in workers:
        held = model.get(w, set())
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        out[w] = n
    return out


def apply_model(model, kind, worker, arg):
    if kind == "store":
        model.setdefault(worker, set()).update(arg)
    elif kind == "remove":
        if worker in model:
            model[worker].difference_update(arg)
    elif kind == "clear":
        if worker in model:
            model[worker].clear()
    elif kind == "remove_worker":
        model.pop(worker, None)
    elif kind == "apply":
        for k, hs in arg:
            apply_model(model, {OP_STORE: "store", OP_REMOVE: "remove", OP_CLEAR: "clear"}[k], worker, hs)


@given(ops=st.lists(op_st, max_size=25), queries=st.lists(query_st, min_size=1, max_size=5))
@settings(max_examples=300, deadline=None)
def test_index_matches_reference_model(make_index, ops, queries):
    idx = make_index()
    model: dict[str, set[int]] = {}
    for kind, w, arg in ops:
        if kind == "store":
            idx.store(w, arg)
        elif kind == "remove":
            idx.remove(w, arg)
        elif kind == "clear":
            idx.clear_worker(w)
        elif kind == "remove_worker":
            idx.remove_worker(w)
        else:
            delta = msgspec.msgpack.decode(
                msgspec.msgpack.encode(KvDelta(w, 1, [KvOp(k, hs) for k, hs in arg])), type=KvDelta
            )
            idx.apply(delta)
        apply_model(model, kind, w, arg)
    assert sorted(idx.workers()) == sorted(model)
    for w in WORKERS:
        assert idx.worker_hashes(w) == model.get(w, set())
        assert idx.blocks_of(w) == len(model.get(w, set()))
    assert len(idx) == len(set().union(*model.values()))
    for q in queries:
        assert idx.match(q) == naive_match(model, q, model)
        assert idx.match(q, WORKERS) == naive_match(model, q, WORKERS)
        assert idx.match(q, ["e2", "nope"]) == naive_match(model, q, ["e2", "nope"])


def test_match_stops_at_first_missing_block(make_index):
    idx = make_index()
    idx.store("a", [1, 2, 4, 5])  # holds 1,2 then a hole at 3
    idx.store("b", [1, 2, 3, 4, 5])
    idx.store("c", [2, 3])  # no first block: nothing usable
    assert idx.match([1, 2, 3, 4, 5]) == {"a": 2, "b": 5, "c": 0}
    assert idx.match([1, 2, 3, 4, 5], ["b", "zzz"]) == {"b": 5, "zzz": 0}
    assert idx.match([]) == {"a": 0, "b": 0, "c": 0}
    assert idx.match([9, 1]) == {"a": 0, "b": 0, "c": 0}


def test_clear_worker_leaves_others_and_keeps_registration(make_index):
    idx = make_index()
    idx.store("a", [1, 2, 3])
    idx.store("b", [1, 2])
    assert idx.clear_worker("a") == 3
    assert idx.match([1, 2, 3]) == {"a": 0, "b": 2}
    assert len(idx) == 2
    assert "a" in idx
    assert idx.clear_worker("unknown") == 0


def test_remove_worker_frees_slot_for_reuse_and_new_worker_starts_empty(make_index):
    idx = make_index()
    for i in range(5):
        idx.store(f"w{i}", [100 + i, 7])
    idx.remove_worker("w1")
    idx.remove_worker("w3")
    idx.store("new1", [55])
    idx.store("new2", [56])
    idx.store("new3", [57])
    if isinstance(idx, PrefixIndex):  # slots are internal: the native index keeps its own
        # freed slots 1 and 3 were reused before growing
        assert sorted(idx._slot_of.values()) == [0, 1, 2, 3, 4, 5]
    assert idx.worker_hashes("new1") == {55}
    assert idx.match([7]) == {"w0": 1, "w2": 1, "w4": 1, "new1": 0, "new2": 0, "new3": 0}
    assert 101 not in idx.worker_hashes("new1") and len(idx) == 7


def test_match_cache_follows_worker_changes(make_index):
    idx = make_index()
    idx.store("a", [1, 2])
    assert idx.match([1, 2], ["a", "b"]) == {"a": 2, "b": 0}
    idx.store("b", [1])  # b gets a slot after the candidate list was cached
    assert idx.match([1, 2], ["a", "b"]) == {"a": 2, "b": 1}
    idx.remove_worker("a")
    idx.store("c", [1, 2])  # c takes a's old slot
    assert idx.match([1, 2], ["a", "b"]) == {"a": 0, "b": 1}
    assert idx.match([1, 2]) == {"b": 1, "c": 2}


def test_apply_keeps_op_order(make_index):
    idx = make_index()
    idx.apply(KvDelta("e", 0, [KvOp(OP_STORE, [1, 2]), KvOp(OP_REMOVE, [2]), KvOp(OP_STORE, [3])]))
    assert idx.worker_hashes("e") == {1, 3}
    idx.apply(KvDelta("e", 1, [KvOp(OP_CLEAR, []), KvOp(OP_STORE, [9])]))
    assert idx.worker_hashes("e") == {9}
    idx.apply(KvDelta("e", 2, [KvOp(OP_STORE, [4]), KvOp(OP_CLEAR, [])]))
    assert idx.worker_hashes("e") == set()


def test_bad_delta_is_rejected_whole(make_index):
    idx = make_index()
    idx.store("e", [1])
    with pytest.raises(ValueError, match="unknown KvOp kind"):
        idx.apply(KvDelta("e", 3, [KvOp(OP_STORE, [2]), KvOp(7, [3])]))
    assert idx.worker_hashes("e") == {1}
    with pytest.raises(ValueError):
        idx.store("", [1])
    assert idx.workers() == ["e"]


def test_remove_of_hashes_not_held_is_noop(make_index):
    idx = make_index()
    idx.store("a", [1])
    idx.store("b", [2])
    idx.remove("a", [2, 3])
    idx.remove("ghost", [1])
    assert idx.worker_hashes("a") == {1} and idx.worker_hashes("b") == {2}
    assert "ghost" not in idx


def test_many_workers_beyond_64_bits(make_index):
    idx = make_index()
    ws = [f"w{i}" for i in range(130)]
    for i, w in enumerate(ws):
        idx.store(w, [1, 2, 3][: 1 + i % 3])
    got = idx.match([1, 2, 3], ws)
    assert got == {w: 1 + i % 3 for i, w in enumerate(ws)}


def test_match_with_many_workers_dropping_at_many_depths(make_index):
    # Exercises both ways match hands depths out (few and many workers
    # leaving at once), holes, slots freed and reused, and unknown workers.
    import random

    rng = random.Random(5)
    chain = list(range(1000, 1040))
    idx = make_index()
    model: dict[str, set[int]] = {}
    ws = [f"w{i}" for i in range(150)]
    for w in ws:
        held = set(chain[: rng.randint(0, 40)]) | set(rng.sample(chain, 3))
        idx.store(w, rng.sample(sorted(held), len(held)))
        model[w] = held
    for w in rng.sample(ws, 20):
        idx.remove_worker(w)
        del model[w]
    for i in range(10):  # reuse the freed slots
        w = f"n{i}"
        held = set(chain[: rng.randint(0, 40)])
        idx.store(w, sorted(held))
        model[w] = held
    for q in (chain, chain[:7], [1000, 5, 1001], chain[::-1]):
        cand = rng.sample(sorted(model), 90) + ["ghost", ws[0]]
        assert idx.match(q, cand) == naive_match(model, q, cand)
        assert idx.match(q) == naive_match(model, q, model)


def test_match_accepts_any_iterable_of_hashes(make_index):
    idx = make_index()
    idx.store("a", [1, 2, 3])
    idx.store("b", [1, 2])
    assert idx.match(iter([1, 2, 3, 4])) == {"a": 3, "b": 2}
    assert idx.match((h for h in [1, 2, 3]), ["a"]) == {"a": 3}


# --- cache tiers ------------------------------------------------------------------


def naive_match_tiers(model: dict[tuple[str, int], set[int]], hashes, workers):
    """Per worker: its GPU prefix, then each further block credited to the
    fastest tier holding it, until a block no tier holds."""
    out = {}
    for w in workers:
        counts = [0, 0, 0, 0]
        for h in hashes:
            tier = next((t for t in TIERS if h in model.get((w, t), set())), None)
            if tier is None:
                break
            counts[tier] += 1
        out[w] = tuple(counts)
    return out


tier_op_st = st.one_of(
    st.tuples(st.just("store"), worker_st, hashes_st, st.sampled_from(TIERS)),
    st.tuples(st.just("remove"), worker_st, hashes_st, st.sampled_from(TIERS)),
    st.tuples(st.just("clear"), worker_st, st.just([]), st.just(TIER_GPU)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(tier_op_st, max_size=40), st.lists(query_st, max_size=6))
def test_tiers_match_reference_model(make_index, ops, queries):
    idx = make_index()
    model: dict[tuple[str, int], set[int]] = {}
    for kind, w, hs, tier in ops:
        if kind == "store":
            idx.apply(KvDelta(w, 0, [KvOp(OP_STORE, hs, [], tier)]))
            model.setdefault((w, tier), set()).update(hs)
        elif kind == "remove":
            idx.apply(KvDelta(w, 0, [KvOp(OP_REMOVE, hs, [], tier)]))
            model.get((w, tier), set()).difference_update(hs)
        else:
            idx.apply(KvDelta(w, 0, [KvOp(OP_CLEAR, [])]))
            for t in TIERS:
                model.pop((w, t), None)
    for w in WORKERS:
        for t in TIERS:
            assert idx.worker_hashes(w, t) == model.get((w, t), set())
        assert idx.tier_blocks(w) == tuple(len(model.get((w, t), ())) for t in TIERS)
    assert idx.lower_blocks == sum(len(v) for (w, t), v in model.items() if t != TIER_GPU)
    for q in queries:
        got = idx.match_tiers(q, WORKERS)
        want = naive_match_tiers(model, q, WORKERS)
        assert got == want, (q, got, want)
        gpu = idx.match(q, WORKERS)
        assert all(got[w][TIER_GPU] >= gpu[w] for w in WORKERS)


def test_a_removal_acts_on_its_own_tier_only(make_index):
    idx = make_index()
    chain = CHAINS[0]
    idx.apply(KvDelta("e0", 0, [KvOp(OP_STORE, chain), KvOp(OP_STORE, chain, [], TIER_HOST)]))
    idx.apply(KvDelta("e0", 1, [KvOp(OP_REMOVE, chain[4:])]))  # the GPU evicts the tail
    assert idx.match(chain, ["e0"]) == {"e0": 4}
    assert idx.match_tiers(chain, ["e0"]) == {"e0": (4, 3, 0, 0)}
    idx.apply(KvDelta("e0", 2, [KvOp(OP_REMOVE, chain[5:], [], TIER_HOST)]))
    assert idx.match_tiers(chain, ["e0"]) == {"e0": (4, 1, 0, 0)}
    assert idx.clear_worker("e0") == 4 + 5 and idx.match_tiers(chain, ["e0"]) == {"e0": (0, 0, 0, 0)}


def test_without_lower_tier_blocks_match_tiers_is_match(make_index):
    idx = make_index()
    idx.store("a", CHAINS[0])
    idx.store("b", CHAINS[1][:2])
    assert idx.lower_blocks == 0
    assert idx.match_tiers(CHAINS[0], ["a", "b", "c"]) == {
        "a": (7, 0, 0, 0),
        "b": (2, 0, 0, 0),
        "c": (0, 0, 0, 0),
    }


def test_a_delta_with_an_unknown_tier_is_rejected_whole(make_index):
    idx = make_index()
    with pytest.raises(ValueError, match="tier"):
        idx.apply(KvDelta("e0", 0, [KvOp(OP_STORE, [1]), KvOp(OP_STORE, [2], [], 9)]))
    assert idx.workers() == [] and len(idx) == 0
    with pytest.raises(ValueError, match="tier"):
        idx.store("e0", [1], tier=7)
