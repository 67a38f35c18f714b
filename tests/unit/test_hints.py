"""Route hints: union merge, relative TTL expiry, prefix overlap, bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hints import Hint, HintStore


def test_union_merge_and_duplicates() -> None:
    a, b = HintStore("a", ttl=2.0), HintStore("b", ttl=2.0)
    h1 = a.add_local("w1", [1, 2, 3], 0.0)
    h2 = a.add_local("w2", [1, 2], 0.0)
    assert b.merge([h1, h2, h1], 0.0) == [h1, h2]
    assert b.merge([h2], 0.1) == []
    assert b.overlap([1, 2, 3, 4], 0.1) == {"w1": 3, "w2": 2}


def test_expiry_uses_receiver_clock_and_remaining_ttl() -> None:
    a = HintStore("a", ttl=2.0)
    b = HintStore("b", ttl=2.0)
    a.add_local("w", [7, 8], 1000.0)  # a's clock is far ahead of b's
    sent = a.live(1001.5)  # 0.5 s left
    assert sent[0].ttl == pytest.approx(0.5)
    b.merge(sent, 5.0)
    assert b.overlap([7, 8], 5.4) == {"w": 2}
    assert b.overlap([7, 8], 5.6) == {}
    assert len(b) == 0
    assert a.overlap([7], 1001.9) == {"w": 1}
    assert a.overlap([7], 1002.0) == {}


def test_overlap_is_a_consecutive_prefix_per_worker() -> None:
    s = HintStore("a", ttl=2.0)
    s.add_local("w1", [1, 2], 0.0)
    s.add_local("w2", [1, 9, 3], 0.0)
    assert s.overlap([1, 2, 3], 0.1) == {"w1": 2, "w2": 1}
    assert s.overlap([5, 1], 0.1) == {}


def test_overlapping_hints_keep_the_later_expiry() -> None:
    s = HintStore("a", ttl=1.0)
    s.add_local("w", [1, 2], 0.0)
    s.add_local("w", [1], 0.5)
    assert s.overlap([1, 2], 1.2) == {"w": 1}  # first hint gone, second still covers 1
    assert s.overlap([1], 1.6) == {}


def test_bounded_and_bad_ttl_rejected() -> None:
    s = HintStore("a", ttl=2.0, max_hints=10)
    for i in range(50):
        s.add_local("w", [i], 0.0)
    assert len(s) == 10
    assert s.overlap([0], 0.1) == {} and s.overlap([49], 0.1) == {"w": 1}
    assert s.merge([Hint("x", 1, "w", [1], -1.0), Hint("x", 2, "w", [1], 1e9)], 0.0) == []
    with pytest.raises(ValueError):
        HintStore("a", ttl=0)


def test_two_hints_with_the_same_expiry_expire_cleanly() -> None:
    # Regression: the second pop of an entry already removed by an equal-expiry
    # hint raised KeyError(worker), which surfaced as failed Generate calls.
    s = HintStore("n1", ttl=2.0)
    s.add_local("e1", [1, 2, 3], now=10.0)
    s.add_local("e1", [1, 2, 3], now=10.0)  # same worker, same expiry
    s.merge([Hint("n2", 1, "e2", [1, 2], 5.0)], now=10.0)  # another worker outlives them
    assert s.overlap([1, 2, 3], now=11.0) == {"e1": 3, "e2": 2}
    assert s.overlap([1, 2, 3], now=12.5) == {"e2": 2}
    assert s.overlap([1, 2, 3], now=15.5) == {}


_hint_st = st.tuples(
    st.sampled_from(["w0", "w1", "w2", "w3"]),
    st.lists(st.integers(0, 7), max_size=8),
    st.floats(0.0, 2.0),
)


@given(
    hints=st.lists(_hint_st, max_size=12),
    query=st.lists(st.integers(0, 7), max_size=10),
    now=st.floats(0.0, 3.0),
)
@settings(max_examples=400, deadline=None)
def test_overlap_equals_the_naive_definition(
    hints: list[tuple[str, list[int], float]], query: list[int], now: float
) -> None:
    store = HintStore("n", ttl=1.0)
    live: list[tuple[float, str, set[int]]] = []
    for worker, hashes, at in sorted(hints, key=lambda h: h[2]):
        store.add_local(worker, hashes, at)
        live.append((at + 1.0, worker, set(hashes)))
    held: dict[str, set[int]] = {}
    for exp, worker, hashes in live:
        if exp > now:
            held.setdefault(worker, set()).update(hashes)
    want = {}
    for worker, hs in held.items():
        n = 0
        while n < len(query) and query[n] in hs:
            n += 1
        if n:
            want[worker] = n
    assert store.overlap(query, now) == want
