"""How late the node's event loop runs what is due: the loop's lag.

Everything a node does (gRPC calls, engine streams, engine events, gossip,
admission's answers) runs on one asyncio event loop, so a callback that holds
the loop delays every other: a shed request answered late, a first token
forwarded late, a gossip probe answered late enough to be suspected. Nothing
else a node reports shows that; this does.

A timer is set every ``interval`` seconds; how late it fires is the loop's
lag at that moment (:func:`watch_loop`, the shell). :class:`LoopLag` (pure)
keeps the samples: a histogram (``kvmesh_event_loop_lag_seconds``), the
largest lag seen, and the stalls (a sample later than ``stall`` seconds,
``kvmesh_event_loop_stalls_total``), logged as ``router.loop_stalled`` at
most once per ``log_every`` seconds with the count of those not logged. A
callback that holds the loop for ``d`` seconds makes the next sample late by
between ``d - interval`` and ``d`` (the probe may have been due at any moment
of the hold), so a hold a little past ``stall`` may not count: the interval
is short for that, and a timer costs one wake-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.metrics import Histogram

__all__ = ["LOOP_LAG_BUCKETS", "LoopLag", "LoopLagConfig", "Stall", "watch_loop"]

# Seconds: a healthy loop is late by well under a millisecond; the upper
# buckets are the stalls that delay answers and gossip.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class LoopLagConfig:
    interval: float = 0.05  # seconds between samples
    stall: float = 0.1  # --loop-stall: a sample later than this is a stall (counted, logged)
    log_every: float = 10.0  # --loop-stall-log-every: seconds between two router.loop_stalled logs at most

    def __post_init__(self) -> None:
        for name, said in (("interval", "loop_lag.interval"), ("stall", "--loop-stall"),
                           ("log_every", "--loop-stall-log-every")):  # fmt: skip
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"{said} must be > 0 seconds, got {v}")


@dataclass(frozen=True, slots=True)
class Stall:
    """A stall to log: its lag, and the stalls since the last one logged."""

    lag: float
    not_logged: int


class LoopLag:
    """The loop's lag samples. Pure: the caller gives each sample and the time."""

    def __init__(self, config: LoopLagConfig | None = None) -> None:
        self.config = config or LoopLagConfig()
        self.histogram = Histogram(LOOP_LAG_BUCKETS)
        self.histogram.touch(())  # exported (all zero) before the first sample
        self.stalls_total = 0
        self.max_lag = 0.0
        self._last_logged: float | None = None
        self._not_logged = 0

    def observe(self, lag: float, now: float) -> Stall | None:
        """One sample, ``lag`` seconds late at ``now``: the stall to log, if any."""
        lag = max(0.0, lag)
        self.histogram.observe((), lag)
        self.max_lag = max(self.max_lag, lag)
        if lag <= self.config.stall:
            return None
        self.stalls_total += 1
        if self._last_logged is not None and now - self._last_logged < self.config.log_every:
            self._not_logged += 1
            return None
        stall = Stall(lag, self._not_logged)
        self._last_logged, self._not_logged = now, 0
        return stall


async def watch_loop(lag: LoopLag, on_stall: Callable[[Stall], Any]) -> None:
    """Sample the running loop's lag into ``lag`` until cancelled; ``on_stall``
    gets each stall to log."""
    loop = asyncio.get_running_loop()
    interval = lag.config.interval
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        now = loop.time()
        stall = lag.observe(now - due, now)
        if stall is not None:
            on_stall(stall)
