"""Transmit-limited broadcast queue (mesh/broadcast.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.broadcast import BroadcastQueue, retransmit_limit


def test_retransmit_limit() -> None:
    assert retransmit_limit(4, 1) == 4
    assert retransmit_limit(4, 9) == 4
    assert retransmit_limit(4, 10) == 8
    assert retransmit_limit(4, 100) == 12
    assert retransmit_limit(3, 1000) == 12


def test_each_item_sent_exactly_limit_times_then_dropped() -> None:
    q: BroadcastQueue[str] = BroadcastQueue(retransmit_mult=2)
    q.push("a", "A", 10)
    sent = []
    for _ in range(10):
        sent += q.take(n_nodes=5, max_bytes=100)
    assert sent == ["A"] * retransmit_limit(2, 5)
    assert len(q) == 0


def test_newer_update_about_same_key_invalidates_older() -> None:
    q: BroadcastQueue[str] = BroadcastQueue(4)
    q.push("n1", "suspect n1@0", 10)
    q.take(5, 100)
    assert q.transmits("n1") == 1
    q.push("n1", "alive n1@1", 10)
    assert len(q) == 1 and q.get("n1") == "alive n1@1" and q.transmits("n1") == 0
    assert q.take(5, 100) == ["alive n1@1"]


def test_prefers_least_transmitted_then_larger_then_newer() -> None:
    q: BroadcastQueue[str] = BroadcastQueue(10)
    q.push("old", "old", 10)
    q.take(5, 100)  # old: 1 transmit
    q.push("small", "small", 5)
    q.push("big", "big", 20)
    q.push("small2", "small2", 5)
    assert q.take(5, 1000) == ["big", "small2", "small", "old"]


def test_budget_in_bytes_count_and_overhead() -> None:
    q: BroadcastQueue[str] = BroadcastQueue(10)
    for i, size in enumerate([50, 40, 30, 3]):
        q.push(i, f"x{i}", size)
    # Budget 90: 50+2 fits (38 left), 40+2 does not, 30+2 fits (6 left), 3+2 fits.
    assert q.take(5, 90, overhead=2) == ["x0", "x2", "x3"]
    assert q.take(5, 1000, max_count=1) == ["x1"]  # untransmitted first
    assert q.take(5, 0) == [] and q.take(5, 100, max_count=0) == []


def test_prune_keeps_freshest() -> None:
    q: BroadcastQueue[int] = BroadcastQueue(10)
    for i in range(5):
        q.push(i, i, 1)
    q.take(5, 100, max_count=2)  # 0 and 1 (sizes equal: newest first -> 4, 3)
    q.prune(3)
    assert len(q) == 3 and all(q.transmits(k) == 0 for k in (0, 1, 2))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        BroadcastQueue(0)
    with pytest.raises(ValueError):
        BroadcastQueue(1).push("k", "v", -1)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 7), st.integers(0, 60)),
        st.tuples(st.just("take"), st.integers(1, 200), st.integers(0, 5)),
    ),
    max_size=80,
)


@given(ops=ops, mult=st.integers(1, 4), n=st.integers(1, 200))
def test_queue_invariants(ops: list[tuple[str, int, int]], mult: int, n: int) -> None:
    """Model check: budgets hold, each version is sent at most limit times, only the
    newest version per key is sent, and nothing left out would still have fitted."""
    q: BroadcastQueue[tuple[int, int]] = BroadcastQueue(mult)
    limit = retransmit_limit(mult, n)
    version = 0
    live: dict[int, list[int]] = {}  # key -> [version, size, transmits]
    sends: dict[tuple[int, int], int] = {}
    for op in ops:
        if op[0] == "push":
            _, key, size = op
            version += 1
            q.push(key, (key, version), size)
            live[key] = [version, size, 0]
            continue
        _, budget, count = op
        cap = count or None
        out = q.take(n, budget, max_count=cap, overhead=1)
        used = sum(live[k][1] + 1 for k, _ in out)
        assert used <= budget
        assert cap is None or len(out) <= cap
        assert len({k for k, _ in out}) == len(out)
        picked = {k for k, _ in out}
        if cap is None or len(out) < cap:
            for k, (_, size, _) in live.items():
                if k not in picked:
                    assert size + 1 > budget - used, "a queued update that fits was left out"
        if out:
            # Freshest first: a left-out update with fewer transmits than something we sent
            # was considered earlier, so it cannot have fitted.
            most = max(live[k][2] for k in picked)
            for k, (_, size, t) in live.items():
                if k not in picked and t < most:
                    assert size + 1 > budget - used
        for k, v in out:
            assert live[k][0] == v  # only the newest payload per key is ever sent
            sends[(k, v)] = sends.get((k, v), 0) + 1
            live[k][2] += 1
            if live[k][2] >= limit:
                del live[k]
        assert len(q) == len(live)
    assert all(c <= limit for c in sends.values())
