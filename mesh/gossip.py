"""Epidemic push of replicated state: what to send to whom each round.

State changes are pushed, not pulled. Every gossip interval the node merges
the deltas it made itself and the state it received and had not seen
(``merge_deltas``: one pycrdt update per document) into one ``StatePush`` to
``fanout`` random live peers. Each queued delta is sent to at most
``retransmit_limit(retransmit_mult, n_live)`` peers in total (the
:class:`~mesh.broadcast.BroadcastQueue` rule), so every update spreads in
O(log n) rounds and then stops. What counts as "not seen" is decided by
``MeshState.apply_remote`` (exactly the new part of each document), so
duplicates and echoes are never forwarded.

A push holds up to ``max_push_bytes``, oldest deltas first (deltas of one
writer build on each other); the first always goes, however big. Route hints
travel with their remaining TTL, also when they are forwarded later. The
queue is bounded: past ``max_queued`` deltas or ``max_queued_bytes``, the
most-sent and oldest are dropped (anti-entropy still repairs whatever they
carried). A node with no live peer keeps nothing queued: a node that joins
later takes the full state, and a healed partition is repaired by
anti-entropy, so deltas held for nobody would only grow memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mesh.broadcast import BroadcastQueue
from mesh.hints import Hint
from mesh.state_messages import Delta, encode_payload, merge_deltas

__all__ = ["PushRound", "StateGossip", "delta_size"]


def delta_size(d: Delta) -> int:
    """Close to the encoded size of ``d``, without encoding it."""
    n = 16 + len(d.sender)
    for lu in d.logs:
        n += 24 + len(lu.engine_id) + len(lu.epoch.owner) + len(lu.update)
    if d.registry:
        n += len(d.registry)
    for s in d.slots:
        n += 16 + len(s.node_id) + 24 * len(s.loads)
    for h in d.hints:
        n += 24 + len(h.origin) + len(h.worker) + 9 * len(h.hashes)
    return n


@dataclass(frozen=True, slots=True)
class _Queued:
    delta: Delta
    born: float  # when it was queued: hints age from here


@dataclass(frozen=True, slots=True)
class PushRound:
    payload: bytes  # one encoded Delta
    peers: list[str]  # addresses to send it to


class StateGossip:
    """The forward queue of one node's state push (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        fanout: int,
        retransmit_mult: int,
        max_push_bytes: int,
        max_queued: int,
        max_queued_bytes: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.fanout = fanout
        self.max_push_bytes = max_push_bytes
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self._queue: BroadcastQueue[_Queued] = BroadcastQueue(retransmit_mult, oldest_first=True)
        self._next_key = 0
        self.dropped = 0  # deltas pruned from a full queue or held for no peer

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queue.queued_bytes

    def enqueue(self, delta: Delta, now: float) -> None:
        self._next_key += 1
        self._queue.push(self._next_key, _Queued(delta, now), delta_size(delta))
        cap_bytes = self.max_queued_bytes
        if len(self._queue) > self.max_queued or (cap_bytes is not None and self.queued_bytes > cap_bytes):
            self.dropped += self._queue.prune(self.max_queued, cap_bytes)

    def round(self, now: float, peers: list[str], n_live: int, rng: random.Random) -> PushRound | None:
        """The push of this round to ``fanout`` of ``peers`` (None: nothing to send)."""
        if not peers:
            self.dropped += self._queue.clear()
            return None
        if not self._queue:
            return None
        k = min(self.fanout, len(peers))
        chosen = self._queue.take(n_live, self.max_push_bytes, recipients=k, at_least_one=True)
        payload = encode_payload(merge_deltas(self.node_id, [_aged(q, now) for q in chosen]))
        dsts = rng.sample(peers, k)
        self._queue.drop_spent(n_live)
        return PushRound(payload, dsts)


def _aged(q: _Queued, now: float) -> Delta:
    """Hints travel with their remaining TTL, also when forwarded later."""
    d = q.delta
    if not d.hints or now <= q.born:
        return d
    age = now - q.born
    hints = [Hint(h.origin, h.hid, h.worker, h.hashes, h.ttl - age) for h in d.hints if h.ttl > age]
    return Delta(sender=d.sender, logs=d.logs, registry=d.registry, slots=d.slots, hints=hints)
