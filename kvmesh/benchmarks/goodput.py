"""Goodput at a latency SLO: the highest offered load at which a system's TTFT
p90 stays under the SLO, found with a short ladder of runs (pure).

A load is a multiple of the workload's nominal load: its timeline (arrivals,
and the think time between a session's turns) run that many times as fast,
see ``Workload.scaled``. A step passes when at least 90% of EVERY request sent
was answered with a first token within the SLO (``within_slo``): the same as
"the TTFT p90, a failed request counting as slower than any answer, is at
most the SLO" (``driver.ttft_p90_all``, nearest rank), and defined for a
system that sheds requests as well as for one that queues them.

The ladder is searched, not swept, to keep each curve to a few runs:
:func:`next_load` starts at the nominal load, moves by ``factor`` in the
direction that finds the other side of the SLO, and once a passing and a
failing load bracket it, halves the bracket (geometrically) until it is
narrower than ``precision`` or the runs are spent. :func:`goodput` then reads
the estimate off the steps: inside the bracket (the highest passing load
below the lowest failing one), where the share of requests within the SLO
crosses 90% on a straight line in log(load).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["QUANTILE", "Goodput", "Step", "goodput", "next_load", "ratio_bounds"]

QUANTILE = 0.9  # the SLO is on the p90: this share of requests within it


@dataclass(frozen=True, slots=True)
class Step:
    load: float
    within_slo: float  # share of the requests sent answered OK with TTFT <= SLO

    def passes(self) -> bool:
        return self.within_slo >= QUANTILE


def _bracket(steps: Sequence[Step]) -> tuple[Step | None, Step | None]:
    """(highest passing step below the lowest failing one, lowest failing step)."""
    fails = [s for s in steps if not s.passes()]
    hi = min(fails, key=lambda s: s.load) if fails else None
    passes = [s for s in steps if s.passes() and (hi is None or s.load < hi.load)]
    lo = max(passes, key=lambda s: s.load) if passes else None
    return lo, hi


def next_load(
    steps: Sequence[Step],
    factor: float = 2.0,
    max_steps: int = 3,
    start: float = 1.0,
    precision: float = 1.25,
) -> float | None:
    """The load to run next, or None when the ladder is done: ``max_steps``
    runs made, or a bracket no wider than ``precision`` (hi / lo) found."""
    if not steps:
        return start
    if len(steps) >= max_steps:
        return None
    lo, hi = _bracket(steps)
    if hi is None:  # everything passed so far: go higher
        return max(s.load for s in steps) * factor
    if lo is None:  # everything failed so far: go lower
        return min(s.load for s in steps) / factor
    if hi.load / lo.load <= precision:
        return None
    return math.sqrt(lo.load * hi.load)


@dataclass(frozen=True, slots=True)
class Goodput:
    """What a ladder found. ``load`` is the estimate (x nominal); ``at_least``
    when no step failed (the true goodput is at least ``load``, the highest
    load tried), ``below`` when none passed (it is lower than ``hi``, and
    ``load`` is 0)."""

    load: float
    lo: float | None  # highest passing load under the lowest failing one
    hi: float | None  # lowest failing load
    at_least: bool
    below: bool

    def as_dict(self) -> dict[str, float | bool | None]:
        return {
            "load": self.load,
            "lo": self.lo,
            "hi": self.hi,
            "at_least": self.at_least,
            "below": self.below,
        }


def goodput(steps: Sequence[Step]) -> Goodput | None:
    """The goodput estimate of a ladder's steps; None without steps."""
    if not steps:
        return None
    lo, hi = _bracket(steps)
    if hi is None:
        top = max(s.load for s in steps)
        return Goodput(top, top, None, at_least=True, below=False)
    if lo is None:
        return Goodput(0.0, None, hi.load, at_least=False, below=True)
    frac = 0.0
    if lo.within_slo > hi.within_slo:
        frac = min(1.0, max(0.0, (lo.within_slo - QUANTILE) / (lo.within_slo - hi.within_slo)))
    est = lo.load * (hi.load / lo.load) ** frac
    return Goodput(est, lo.load, hi.load, at_least=False, below=False)


def _bounds(g: dict) -> tuple[float, float]:
    """(lowest, highest) goodput a ladder's result allows; an estimate is taken as it is."""
    if g["below"]:
        return 0.0, float(g["hi"])
    if g["at_least"]:
        return float(g["load"]), math.inf
    return float(g["load"]), float(g["load"])


def ratio_bounds(mine: dict, peer: dict) -> tuple[float, float] | None:
    """The (lowest, highest) ratio of two goodputs (``Goodput.as_dict()``)
    that their ladders allow: equal bounds when both were bracketed; an
    infinite upper bound when ``mine`` passed every load tried or ``peer``
    failed every one. None when nothing is known (0 / 0)."""
    m_lo, m_hi = _bounds(mine)
    p_lo, p_hi = _bounds(peer)
    if p_lo == 0 and m_lo == 0:
        return None
    low = m_lo / p_hi if p_hi > 0 else math.inf
    high = m_hi / p_lo if p_lo > 0 else math.inf
    return low, high
