"""Per-engine circuit breaker (pure: time is passed in).

closed --N consecutive failures--> open --cooldown--> half_open
half_open lets one probe request through: success closes, failure reopens
with a doubled cooldown (capped), so a dead engine costs one failed attempt
per cooldown instead of one per request.

Each node keeps its own breaker per engine, from its own attempts: an
engine open on one node may be closed on another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass(slots=True)
class BreakerConfig:
    failure_threshold: int = 3
    cooldown_s: float = 2.0
    max_cooldown_s: float = 30.0


class CircuitBreaker:
    def __init__(
        self, config: BreakerConfig | None = None, on_change: Callable[[str, str, int], None] | None = None
    ) -> None:
        """``on_change(old, new, failures)`` is told of every change of state
        (the node logs them: an open breaker takes the engine out of this
        node's rotation)."""
        self.config = config or BreakerConfig()
        self.state = CLOSED
        self._on_change = on_change
        self.failures = 0
        self._cooldown = self.config.cooldown_s
        self._opened_at = 0.0
        self._probe_in_flight = False

    def allows(self, now: float) -> bool:
        """May a request be sent now? (Does not reserve the half-open probe.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and now - self._opened_at >= self._cooldown:
            self._probe_in_flight = False
            self._set(HALF_OPEN)
        return self.state == HALF_OPEN and not self._probe_in_flight

    def on_attempt(self, now: float) -> None:
        if self.state == HALF_OPEN:
            self._probe_in_flight = True

    def on_abandoned(self) -> None:
        """An attempt ended without a verdict (its client went away): free the probe."""
        self._probe_in_flight = False

    def on_success(self, now: float) -> None:
        self.failures = 0
        self._cooldown = self.config.cooldown_s
        self._probe_in_flight = False
        self._set(CLOSED)

    def on_failure(self, now: float) -> None:
        self.failures += 1
        if self.state == HALF_OPEN:
            self._cooldown = min(self._cooldown * 2, self.config.max_cooldown_s)
            self._open(now)
        elif self.state == CLOSED and self.failures >= self.config.failure_threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._probe_in_flight = False
        self._set(OPEN)

    def detach(self) -> None:
        """Tell nothing more: the breaker was replaced (its engine registered
        again); attempts still in flight may go on changing it unheard."""
        self._on_change = None

    def _set(self, state: str) -> None:
        """The last step of every change (the breaker is whole when it is told)."""
        old, self.state = self.state, state
        if old != state and self._on_change is not None:
            try:
                self._on_change(old, state, self.failures)
            except Exception:  # telling (a log line) must never fail the request that changed it
                pass
