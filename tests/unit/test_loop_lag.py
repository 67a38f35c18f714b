"""The event loop's lag (router/loop_lag.py): samples, stalls, their logs,
and the sampler against a real loop that is held."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.loop_lag import LOOP_LAG_BUCKETS, LoopLag, LoopLagConfig, Stall, watch_loop


def test_samples_go_to_the_histogram_and_the_largest_is_kept() -> None:
    lag = LoopLag(LoopLagConfig(stall=0.1))
    fresh = lag.histogram.export("kvmesh_event_loop_lag_seconds")  # scraped before the first sample
    assert [s.value for s in fresh.samples if s.name.endswith("_count")] == [0.0]
    for i, late in enumerate((0.0004, 0.003, 0.02, -0.001)):  # a timer early by a hair counts as 0
        assert lag.observe(late, float(i)) is None
    assert lag.histogram.count(()) == 4 and lag.stalls_total == 0
    assert lag.max_lag == pytest.approx(0.02)
    (series,) = lag.histogram.series.values()
    assert sum(series.counts) == 4
    assert series.counts[0] == 2  # 0.0004 and the clamped 0 are under the first bound
    assert series.sum == pytest.approx(0.0234)
    fam = lag.histogram.export("kvmesh_event_loop_lag_seconds")
    assert [s.value for s in fam.samples if s.name.endswith("_count")] == [4.0]
    assert len(LOOP_LAG_BUCKETS) == len(series.counts) - 1


def test_a_stall_is_counted_every_time_and_logged_a_few_times() -> None:
    lag = LoopLag(LoopLagConfig(stall=0.1, log_every=10.0))
    assert lag.observe(0.1, 0.0) is None  # at the threshold: not a stall
    assert lag.observe(0.35, 1.0) == Stall(0.35, 0)
    assert lag.observe(0.2, 2.0) is None  # within log_every of the last log
    assert lag.observe(0.5, 10.9) is None
    assert lag.observe(0.15, 11.0) == Stall(0.15, 2)  # says how many it did not log
    assert lag.observe(0.15, 12.0) is None
    assert lag.stalls_total == 5
    assert lag.max_lag == 0.5


@pytest.mark.parametrize(
    ("field", "said"),
    [("interval", "loop_lag.interval"), ("stall", "--loop-stall"), ("log_every", "--loop-stall-log-every")],
)
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_the_config_refuses_what_cannot_be_timed(field: str, said: str, bad: float) -> None:
    with pytest.raises(ValueError, match=f"^{said} must be > 0 seconds"):
        LoopLagConfig(**{field: bad})


async def test_the_sampler_sees_a_held_loop() -> None:
    lag = LoopLag(LoopLagConfig(interval=0.01, stall=0.1, log_every=1e-6))  # every stall logged
    stalls: list[Stall] = []
    task = asyncio.create_task(watch_loop(lag, stalls.append))
    try:
        await asyncio.sleep(0.1)  # a few samples of an idle loop
        assert lag.histogram.count(()) >= 2
        time.sleep(0.3)  # hold the loop, as a slow callback does
        deadline = time.monotonic() + 5
        while not any(s.lag >= 0.2 for s in stalls) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert any(s.lag >= 0.2 for s in stalls)
    assert lag.stalls_total == len(stalls) and lag.max_lag >= 0.2
