"""Suspicion timer (mesh/suspicion.py): timeouts and their decay with confirmations."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.suspicion import Suspicion, confirmations_wanted, suspicion_timeouts


def test_timeouts_scale_with_log_of_cluster_size() -> None:
    assert suspicion_timeouts(4, 6, 1, 1.0) == (4.0, 24.0)
    assert suspicion_timeouts(4, 6, 10, 1.0) == (4.0, 24.0)
    lo, hi = suspicion_timeouts(4, 6, 100, 1.0)
    assert (lo, hi) == pytest.approx((8.0, 48.0))
    assert suspicion_timeouts(4, 6, 0, 0.5) == (2.0, 12.0)  # floor: never below mult * interval
    with pytest.raises(ValueError):
        suspicion_timeouts(4, 6, 10, 0.0)


def test_confirmations_wanted() -> None:
    assert confirmations_wanted(4, 10) == 2
    assert confirmations_wanted(4, 4) == 2
    assert confirmations_wanted(4, 3) == 0  # only one possible confirmer
    assert confirmations_wanted(2, 10) == 0


def test_starts_at_max_and_reaches_min_after_k_confirmations() -> None:
    s = Suspicion("a", k=3, min_timeout=2.0, max_timeout=12.0, start=100.0)
    assert s.deadline == 112.0 and not s.expired(111.9) and s.expired(112.0)
    assert not s.confirm("a")  # the accuser is not a confirmation
    assert s.confirm("b")
    d1 = s.deadline
    assert 102.0 < d1 < 112.0
    assert math.isclose(d1, 100 + 12 - 10 * math.log(2) / math.log(4))
    assert not s.confirm("b")  # duplicates do not count
    assert s.deadline == d1
    assert s.confirm("c") and s.confirm("d")
    assert s.deadline == 102.0 and s.confirmations == 3
    assert not s.confirm("e")  # already at the minimum


def test_k_zero_uses_min_timeout() -> None:
    s = Suspicion("a", k=0, min_timeout=4.0, max_timeout=24.0, start=0.0)
    assert s.deadline == 4.0
    assert not s.confirm("b")


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Suspicion("a", k=1, min_timeout=5.0, max_timeout=4.0, start=0.0)
    with pytest.raises(ValueError):
        Suspicion("a", k=-1, min_timeout=1.0, max_timeout=4.0, start=0.0)


@given(
    k=st.integers(0, 10),
    lo=st.floats(0.1, 50.0),
    mult=st.floats(1.0, 10.0),
    start=st.floats(0.0, 1e6),
    accusers=st.lists(st.sampled_from([f"n{i}" for i in range(15)]), max_size=40),
)
def test_deadline_monotone_and_bounded(
    k: int, lo: float, mult: float, start: float, accusers: list[str]
) -> None:
    hi = lo * mult
    s = Suspicion("n0", k, lo, hi, start)
    prev = s.deadline
    seen = {"n0"}
    for a in accusers:
        new = s.confirm(a)
        assert new == (a not in seen and len(seen) - 1 < k)
        if new:
            seen.add(a)
        # Never later than before, never outside [start + min, start + max].
        assert s.deadline <= prev + 1e-9
        assert start + lo - 1e-6 <= s.deadline <= start + hi + 1e-6
        prev = s.deadline
    assert s.confirmations == min(k, len(seen) - 1)
    if k >= 1 and s.confirmations == k:
        assert math.isclose(s.deadline, start + lo, rel_tol=1e-9, abs_tol=1e-6)
