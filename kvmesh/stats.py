"""Summary statistics shared by the load generator, the benchmarks and the
whole-mesh simulation.

One percentile convention for every figure kvmesh reports, so a "p99" means
the same thing in ``kvmesh demo``, in docs/benchmarks.md and in the
simulation tests: nearest rank, never interpolated, so every percentile is a
value that was actually measured.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["percentile"]


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile of ``values``, ``q`` in [0, 100] (50 is the median).

    Nearest rank: the sorted values' element at index ``round(q / 100 * (n - 1))``
    (Python's round, half to even), the same as ``numpy.percentile(values, q,
    method="nearest")``. ``values`` need not be sorted. An empty sample gives
    0.0 (a run where nothing succeeded reports its failures elsewhere); a
    caller that must tell "no sample" from 0 checks for emptiness first.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, round(q / 100.0 * (len(xs) - 1)))]
