import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.approx_tree import ApproxTree

A = [1, 2, 3, 4]
B = [1, 2, 30, 40, 50]  # shares blocks 1,2 with A
C = [7, 8]


def test_insert_and_match_longest_routed_prefix():
    t = ApproxTree()
    t.insert("e1", A, now=0.0)
    t.insert("e2", B[:3], now=1.0)
    assert t.match(B) == {"e1": 2, "e2": 3}
    assert t.match(A, ["e1", "e2", "e3"]) == {"e1": 4, "e2": 2, "e3": 0}
    assert t.match(C) == {"e1": 0, "e2": 0}
    assert t.blocks_of("e1") == 4 and len(t) == 5


def test_size_bound_evicts_least_recent_leaves_first():
    t = ApproxTree(max_blocks_per_worker=5)
    t.insert("e", A, now=0.0)
    assert t.insert("e", B, now=1.0) == 2  # 4 + 3 new blocks -> 2 over
    # A's tail (3, 4) was least recent; the shared prefix 1, 2 was just touched by B
    assert t.worker_hashes("e") == {1, 2, 30, 40, 50}
    assert t.match(A) == {"e": 2}
    assert t.match(B) == {"e": 5}
    # routing A again makes it the freshest; B's leaves go first, prefix survives
    t.insert("e", A, now=2.0)
    assert t.match(A) == {"e": 4}
    assert t.match(B) == {"e": 3}
    assert t.blocks_of("e") == 5


def test_bound_is_per_worker():
    t = ApproxTree(max_blocks_per_worker=3)
    t.insert("a", A, now=0.0)
    t.insert("b", C, now=0.0)
    assert t.blocks_of("a") == 3 and t.blocks_of("b") == 2
    assert t.match(A) == {"a": 3, "b": 0}
    assert t.evict(1) == 3  # a: 3 -> 1, b: 2 -> 1
    assert t.match(A)["a"] == 1 and t.match(C)["b"] == 1


def test_ttl_expiry():
    t = ApproxTree(ttl=10.0)
    t.insert("e", A, now=0.0)
    t.insert("e", C, now=5.0)
    assert t.match(A, now=9.0) == {"e": 4}
    assert t.match(A, now=10.5) == {"e": 0}  # A routed at 0 is older than 10 s
    assert t.match(C, now=10.5) == {"e": 2}
    assert t.expire(16.0) == 2
    assert len(t) == 0


def test_remove_worker():
    t = ApproxTree()
    t.insert("a", A, now=0)
    t.insert("b", A, now=0)
    t.remove_worker("a")
    assert t.match(A) == {"b": 4}
    assert t.workers() == ["b"]


def test_bad_construction():
    with pytest.raises(ValueError):
        ApproxTree(max_blocks_per_worker=0)
    with pytest.raises(ValueError):
        ApproxTree(ttl=0)
    with pytest.raises(ValueError):
        ApproxTree().insert("", A, 0)


chains = st.sampled_from([A, B, C, [1, 2, 3, 9, 10, 11], [7, 8, 99]])


@given(
    ops=st.lists(st.tuples(st.sampled_from(["a", "b"]), chains, st.integers(1, 6)), max_size=30),
    limit=st.integers(1, 8),
)
@settings(max_examples=200, deadline=None)
def test_bounded_and_prefix_closed(ops, limit):
    """Each worker stays within its bound, and what is kept of a routed chain is
    always a prefix of it (leaves go first), so match equals the kept count."""
    t = ApproxTree(max_blocks_per_worker=limit)
    now = 0.0
    routed: dict[str, list[list[int]]] = {"a": [], "b": []}
    for w, chain, k in ops:
        now += 1
        t.insert(w, chain[:k], now)
        routed[w].append(chain[:k])
        assert t.blocks_of(w) <= limit
        held = t.worker_hashes(w)
        assert held == set(t._lru[w])
        # the most recent insert survives whole if it fits
        if len(chain[:k]) <= limit:
            assert t.match(chain[:k])[w] == len(chain[:k])
        for c in routed[w]:
            kept = [h in held for h in c]
            assert kept == sorted(kept, reverse=True), (c, held)
            assert t.match(c)[w] == sum(kept)
