"""The one percentile convention (kvmesh/stats.py): nearest rank, never interpolated."""

from __future__ import annotations

import pytest

from kvmesh.stats import percentile


def test_nearest_rank_on_unsorted_values():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(xs, q) for q in (0, 25, 50, 75, 100)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(xs, 99) == 5.0  # round(0.99 * 4) = 4


def test_index_rounds_half_to_even_like_numpy_nearest():
    xs = [10.0, 20.0]
    assert percentile(xs, 50) == 10.0  # round(0.5) = 0
    assert percentile(list(range(4)), 50) == 2  # round(1.5) = 2


def test_empty_is_zero_and_q_is_checked():
    assert percentile([], 99) == 0.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)
