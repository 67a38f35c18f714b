"""How requests ended: counted by status and reason, and logged without flooding.

Every Generate and Route call ends in one outcome ("OK", or a gRPC status
with a :mod:`router.errors` reason). Each is counted (``GetStats.outcomes``,
metrics), and each one but OK and CANCELLED (the node logs a Generate
that finished, and any call cancelled, a line each at info) is logged
with its request id, at most
``burst`` times per ``(status, reason)`` every ``period`` seconds: under
overload thousands of requests a second end the same way, and one line a
second that says how many were not printed tells the operator as much.
That count goes with the next line of the same kind or, when none follows,
to :meth:`Outcomes.unlogged` once the window is over (the node asks every
window), so a burst that does not recur still says how big it was.
Pure: time is an argument.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Outcomes"]


@dataclass(slots=True)
class _Window:
    start: float
    status: str
    reason: str
    logged: int = 0
    suppressed: int = 0  # not logged, and not yet said so


@dataclass
class Outcomes:
    period: float = 1.0  # seconds of one logging window
    burst: int = 5  # lines per (status, reason) per window
    counts: Counter[str] = field(default_factory=Counter)  # "STATUS:reason" (or "OK") -> requests
    _windows: dict[str, _Window] = field(default_factory=dict)

    def record(self, status: str, reason: str, now: float) -> tuple[bool, int]:
        """Count one outcome; returns (log this one?, lines suppressed before
        it in the window that just ended)."""
        key = status if status == "OK" else f"{status}:{reason}"
        self.counts[key] += 1
        if status in ("OK", "CANCELLED"):
            return False, 0
        w = self._windows.get(key)
        suppressed = 0
        if w is None or now - w.start >= self.period:
            suppressed = w.suppressed if w is not None else 0
            w = self._windows[key] = _Window(now, status, reason)
        if w.logged < self.burst:
            w.logged += 1
            return True, suppressed
        w.suppressed += 1
        return False, 0

    def unlogged(self, now: float) -> list[tuple[str, str, int]]:
        """(status, reason, lines) of every window over by ``now`` whose
        suppressed lines no later line has reported yet; reported once."""
        out = []
        for key, w in list(self._windows.items()):
            if now - w.start >= self.period:
                if w.suppressed:
                    out.append((w.status, w.reason, w.suppressed))
                del self._windows[key]  # the next outcome of its kind opens a new window
        return out

    def forget_reason(self, reason: str) -> None:
        """Drop every count and window of ``reason`` (an engine gone for good,
        where the reason is its id)."""
        for key in [k for k in self.counts if k.partition(":")[2] == reason]:
            del self.counts[key]
        for key in [k for k, w in self._windows.items() if w.reason == reason]:
            del self._windows[key]
