"""Lifeguard's local health score ("awareness"): is it *us* who is slow?

Plain SWIM assumes the prober is healthy. A node that is overloaded, or whose
network is bad, misses acks that were sent in time and then accuses healthy
members. Lifeguard (and hashicorp/memberlist's awareness.go) lets a node
notice this from its own evidence:

* a probe that fails although helpers were asked: each helper that did not
  even answer with a ``Nack`` counts against *us* (+1 each; +1 when there were
  no helpers to ask),
* having to refute a suspicion about ourselves (+1),
* a probe answered in time (-1).

The score stays in ``[0, max_multiplier - 1]``, and the state machine
stretches its probe timeout and probe interval by ``score + 1``: a slow node
probes more patiently and accuses less, until its probes succeed again.

Pure: no clock, no randomness.
"""

from __future__ import annotations

__all__ = ["Awareness"]


class Awareness:
    """One node's local health score: 0 is healthy."""

    __slots__ = ("max_multiplier", "score")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError(f"max_multiplier must be >= 1, got {max_multiplier}")
        self.max_multiplier = max_multiplier
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        """Move the score by ``delta``, clamped to ``[0, max_multiplier - 1]``."""
        self.score = min(max(self.score + delta, 0), self.max_multiplier - 1)

    def scale(self, timeout: float) -> float:
        """``timeout`` stretched by the current score (``timeout * (score + 1)``)."""
        return timeout * (self.score + 1)
