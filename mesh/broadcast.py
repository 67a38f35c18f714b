"""Transmit-limited broadcast queue: what to piggyback on the next gossip message.

Gossip dissemination (SWIM's "infection style") does not send an update to
everybody. Each node keeps a queue of recent updates and attaches a few of
them to every message it sends anyway (probes, acks, gossip rounds). An update
reaches all ``n`` members with high probability after O(log n) rounds, so each
queued update is sent at most::

    retransmit_limit(n) = retransmit_mult * ceil(log10(n + 1))

times and then dropped. Three rules keep the queue small and useful:

* **Invalidation.** Updates carry a key (for membership: the member's id). A
  newer update with the same key replaces the queued one, because the older
  one is now stale (``Alive`` at incarnation 5 supersedes ``Suspect`` at 4).
* **Freshest first.** A message is filled with the least-transmitted updates
  first, so new information spreads fast and old updates use leftover space.
  Among equally transmitted ones the larger go first (they are harder to fit
  later), then the newer -- or, with ``oldest_first``, the older: updates that
  build on each other (the state deltas of one CRDT writer, which a receiver
  can only integrate in order) go in the order they were made.
* **Budget.** A message holds at most ``max_bytes`` (each update costs its size
  plus a per-item ``overhead``) and at most ``max_count`` updates. Items that do
  not fit are skipped, smaller ones may still fit. With ``at_least_one`` the
  first item goes even if it alone is over the budget (a large update must
  still travel).

One message may go to several peers at once (the state push sends one merged
message to ``fanout`` peers): ``take(..., recipients=k)`` counts k
transmissions for every update in it.

Membership (``mesh/membership.py``) and the state push (``mesh/gossip.py``)
both keep one queue. Pure and single-threaded: no clock, no randomness.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["BroadcastQueue", "retransmit_limit"]

T = TypeVar("T")


def retransmit_limit(retransmit_mult: int, n_nodes: int) -> int:
    """How many times one update is transmitted in a cluster of ``n_nodes``."""
    return retransmit_mult * math.ceil(math.log10(max(0, n_nodes) + 1))


class _Item(Generic[T]):
    __slots__ = ("id", "key", "payload", "size", "transmits")

    def __init__(self, key: Hashable, payload: T, size: int, item_id: int) -> None:
        self.key = key
        self.payload = payload
        self.size = size
        self.transmits = 0
        self.id = item_id


class BroadcastQueue(Generic[T]):
    """Updates waiting to be gossiped, each with its own transmit count."""

    __slots__ = ("_bytes", "_items", "_next_id", "oldest_first", "retransmit_mult")

    def __init__(self, retransmit_mult: int, *, oldest_first: bool = False) -> None:
        if retransmit_mult < 1:
            raise ValueError(f"retransmit_mult must be >= 1, got {retransmit_mult}")
        self.retransmit_mult = retransmit_mult
        self.oldest_first = oldest_first
        self._items: dict[Hashable, _Item[T]] = {}
        self._next_id = 0
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    @property
    def queued_bytes(self) -> int:
        """The summed size of the queued updates."""
        return self._bytes

    def push(self, key: Hashable, payload: T, size: int) -> None:
        """Queue ``payload``; it replaces any queued update with the same key."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self._next_id += 1
        self._remove(key)  # re-insert so dict order stays oldest-first
        self._items[key] = _Item(key, payload, size, self._next_id)
        self._bytes += size

    def _remove(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item.size

    def get(self, key: Hashable) -> T | None:
        item = self._items.get(key)
        return None if item is None else item.payload

    def transmits(self, key: Hashable) -> int | None:
        """How often the update queued under ``key`` has been sent (None: not queued)."""
        item = self._items.get(key)
        return None if item is None else item.transmits

    def _order(self) -> list[_Item[T]]:
        if self.oldest_first:
            return sorted(self._items.values(), key=lambda it: (it.transmits, it.id))
        return sorted(self._items.values(), key=lambda it: (it.transmits, -it.size, -it.id))

    def take(
        self,
        n_nodes: int,
        max_bytes: int,
        max_count: int | None = None,
        overhead: int = 0,
        *,
        recipients: int = 1,
        at_least_one: bool = False,
    ) -> list[T]:
        """Pick updates for one outgoing message and count them as transmitted
        ``recipients`` times (the peers that message goes to).

        Updates that reach the transmit limit for ``n_nodes`` leave the queue.
        """
        if not self._items or max_bytes <= 0 or max_count == 0:
            return []
        limit = retransmit_limit(self.retransmit_mult, n_nodes)
        order = self._order()
        free = max_bytes
        cap = len(order) if max_count is None else max_count
        out: list[T] = []
        for item in order:
            cost = item.size + overhead
            if cost > free and not (at_least_one and not out):
                continue
            free -= cost
            out.append(item.payload)
            item.transmits += recipients
            if item.transmits >= limit:
                self._remove(item.key)
            if len(out) >= cap:
                break
        return out

    def drop_spent(self, n_nodes: int) -> None:
        """Drop every update already sent its limit for ``n_nodes`` (the limit
        falls when the cluster shrinks, also for updates not taken lately)."""
        limit = retransmit_limit(self.retransmit_mult, n_nodes)
        for item in [it for it in self._items.values() if it.transmits >= limit]:
            self._remove(item.key)

    def prune(self, max_retain: int, max_bytes: int | None = None) -> int:
        """Keep only the ``max_retain`` freshest updates, and no more than
        ``max_bytes`` of them (bounds memory under churn); returns how many
        were dropped. Most-sent go first, then the oldest."""
        over_count = len(self._items) > max_retain
        over_bytes = max_bytes is not None and self._bytes > max_bytes
        if not over_count and not over_bytes:
            return 0
        order = sorted(self._items.values(), key=lambda it: (it.transmits, -it.id))
        dropped = 0
        for item in reversed(order):
            fits_count = len(self._items) <= max_retain
            if fits_count and (max_bytes is None or self._bytes <= max_bytes):
                break
            self._remove(item.key)
            dropped += 1
        return dropped

    def clear(self) -> int:
        """Drop every queued update; returns how many there were."""
        n = len(self._items)
        self._items.clear()
        self._bytes = 0
        return n
