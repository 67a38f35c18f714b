"""When this node publishes its load slot.

The node's slot (its in-flight requests and tokens per worker,
:mod:`mesh.load_slots`) goes out every ``interval`` when it changed, and is
re-stamped and sent every ``refresh_interval`` anyway, and at once when the
node's membership incarnation rises: a raised incarnation means the node was
suspected or declared dead, so others may have dropped (and fenced) its slot.
A routing decision asks for the slot to go out sooner (``publish_by``): the
routed request is load too.

Pure: time and randomness come in as arguments.
"""

from __future__ import annotations

import random

from mesh.load_slots import LoadSlots, Slot

__all__ = ["LoadPublisher"]


class LoadPublisher:
    def __init__(
        self, interval: float, refresh_interval: float, now: float, rng: random.Random, incarnation: int
    ) -> None:
        self.interval = interval
        self.refresh_interval = refresh_interval
        self.next_at = now + rng.uniform(0, interval)  # random phase
        self._next_refresh = now + refresh_interval
        self._incarnation = incarnation
        self._dirty = False

    def changed(self) -> None:
        """The local slot changed: publish it at the next tick."""
        self._dirty = True

    def publish_by(self, at: float) -> None:
        self.next_at = min(self.next_at, at)

    def tick(self, now: float, slots: LoadSlots, incarnation: int) -> Slot | None:
        """The local slot, if it is due to go out now."""
        if now < self.next_at:
            return None
        self.next_at = now + self.interval
        if now >= self._next_refresh or incarnation != self._incarnation:
            self._incarnation = incarnation
            self._next_refresh = now + self.refresh_interval
            slots.refresh(now)
            self._dirty = True
        if not self._dirty:
            return None
        self._dirty = False
        return slots.local
