"""Goodput at an SLO: the ladder's search, its estimate, ratios of bounds, and
a run's figures with failed requests counted against the system (SLO share,
TTFT p90 over every request, hit rate and ideals)."""

from __future__ import annotations

import math

import pytest

from kvmesh.benchmarks.driver import Rec, summarize, ttft_p90_all, within_slo
from kvmesh.benchmarks.goodput import Step, goodput, next_load, ratio_bounds


def _ladder(share_at: dict[float, float], max_steps: int = 6) -> list[Step]:
    """Run the search against a system whose share within the SLO at each load is given."""
    steps: list[Step] = []
    while (load := next_load(steps, 2.0, max_steps)) is not None:
        steps.append(Step(load, share_at[load]))
    return steps


def test_search_goes_up_until_it_fails_then_halves_the_bracket():
    # Passes at 1 and 2, fails at 4: then sqrt(2 * 4).
    shares = {1.0: 0.99, 2.0: 0.95, 4.0: 0.5, math.sqrt(8.0): 0.85}
    steps = _ladder(shares, max_steps=4)
    assert [s.load for s in steps] == [1.0, 2.0, 4.0, pytest.approx(math.sqrt(8.0))]
    g = goodput(steps)
    assert g is not None and not g.at_least and not g.below
    assert g.lo == 2.0 and g.hi == pytest.approx(math.sqrt(8.0))
    # 0.95 at 2, 0.85 at 2.83: 90% is half way in log(load).
    assert g.load == pytest.approx(2.0 * (math.sqrt(8.0) / 2.0) ** 0.5)


def test_search_goes_down_when_the_nominal_load_fails():
    steps = _ladder({1.0: 0.4, 0.5: 0.9, math.sqrt(0.5): 0.7}, max_steps=3)
    assert [s.load for s in steps] == [1.0, 0.5, pytest.approx(math.sqrt(0.5))]
    g = goodput(steps)
    assert g is not None and g.lo == 0.5 and g.load == pytest.approx(0.5)  # exactly 90% at 0.5


def test_search_stops_at_a_narrow_bracket_or_out_of_runs():
    assert next_load([Step(1.0, 0.95), Step(1.2, 0.5)], 2.0, 10, precision=1.25) is None
    assert next_load([Step(1.0, 0.95), Step(2.0, 0.5)], 2.0, 2) is None
    assert next_load([], 2.0, 3) == 1.0


def test_goodput_of_a_ladder_that_never_crossed_the_slo_is_a_bound():
    up = goodput([Step(1.0, 0.99), Step(2.0, 0.92)])
    assert up is not None and up.at_least and up.load == 2.0
    down = goodput([Step(1.0, 0.5), Step(0.5, 0.89)])
    assert down is not None and down.below and down.hi == 0.5 and down.load == 0.0
    assert goodput([]) is None


def test_a_passing_load_above_a_failing_one_does_not_count():
    # Noise: 4 passes although 2 failed; the goodput is under the lowest failing load.
    g = goodput([Step(1.0, 0.95), Step(2.0, 0.85), Step(4.0, 0.91)])
    assert g is not None and g.lo == 1.0 and g.hi == 2.0 and 1.0 <= g.load < 2.0


def _gp(load: float, lo: float | None, hi: float | None, at_least: bool = False, below: bool = False) -> dict:
    return {"load": load, "lo": lo, "hi": hi, "at_least": at_least, "below": below}


def test_ratio_bounds():
    assert ratio_bounds(_gp(3.0, 2.0, 4.0), _gp(1.5, 1.0, 2.0)) == (2.0, 2.0)
    # Peer failed every load tried (below 0.5): at least 3 / 0.5.
    assert ratio_bounds(_gp(3.0, 2.0, 4.0), _gp(0.0, None, 0.5, below=True)) == (6.0, math.inf)
    # Mine passed every load tried (at least 2): at least 2 / 1.5.
    low, high = ratio_bounds(_gp(2.0, 2.0, None, at_least=True), _gp(1.5, 1.0, 2.0))
    assert low == pytest.approx(2.0 / 1.5) and high == math.inf
    # Peer passed every load up to 2: mine's 1.5 is at most 0.75 of it.
    assert ratio_bounds(_gp(1.5, 1.0, 2.0), _gp(2.0, 2.0, None, at_least=True)) == (0.0, 0.75)
    assert ratio_bounds(_gp(0.0, None, 1.0, below=True), _gp(0.0, None, 1.0, below=True)) is None


def _rec(ok: bool, ttft: float, prompt: list[int], cached: int = 0, output: list[int] | None = None) -> Rec:
    out = output if output is not None else ([7] * 4 if ok else [])
    return Rec(
        "s", 0, 0.0, 1.0, ok, "e0" if ok else "", len(prompt), cached, len(out), ttft, 500.0,
        "" if ok else "RESOURCE_EXHAUSTED: shed", prompt, out,
    )  # fmt: skip


def test_failed_requests_count_against_the_slo_and_the_hit_rate():
    prefix = list(range(1000, 1064))  # 4 blocks of 16
    recs = [_rec(True, 100.0 + i, prefix + [i], cached=64 if i else 0) for i in range(8)]
    recs += [_rec(False, 0.0, prefix + [99]), _rec(False, 0.0, prefix + [98])]
    # 8 of 10 answered within any SLO: 80% < 90%, and the p90 falls on a failure.
    assert within_slo(recs, 1000.0) == pytest.approx(0.8)
    assert ttft_p90_all(recs) is None
    s = summarize(recs, 2.0, None, 16, 1000, slo_ms=1000.0)
    assert s["failed"] == 2 and s["within_slo"] == pytest.approx(0.8)
    # 7 x 64 cached prompt tokens over all 10 prompts (65 tokens each): the failed ones are misses.
    assert s["hit_rate"] == pytest.approx(7 * 64 / (10 * 65))
    # The ideals see the failed requests too: each could have hit the 4 shared blocks.
    assert s["ideal_hit_rate"] == pytest.approx(9 * 64 / (10 * 65))
    # Only the answered requests have a TTFT: the plain p90 would flatter the system.
    assert s["ttft_p90_ms"] < 1000.0


def test_ttft_p90_all_agrees_with_the_slo_share():
    recs = [_rec(True, float(t), [1, 2, 3]) for t in range(1, 10)] + [_rec(False, 0.0, [1, 2, 3])]
    p90 = ttft_p90_all(recs)
    assert p90 == 9.0  # 9 of 10 answered: the 9th fastest
    assert within_slo(recs, p90) >= 0.9 > within_slo(recs, p90 - 0.5)
