"""Speculative route hints: "node N just routed blocks H to worker W".

Between a routing decision and the engine's KV events for that prompt there
are hundreds of milliseconds in which other nodes would not know where the
prefix is going. A hint fills that gap: it is gossiped at once, merged by
union (keyed by origin node and a per-origin counter, so duplicates are
harmless) and expires after a short TTL (``MeshConfig.hint_ttl``) -- by then
the engine's own events are in the log.

Hints travel with their *remaining* TTL, not an absolute expiry time: each
receiver computes ``expires = now + ttl`` on its own clock, so clock skew
between nodes cannot make a hint live forever or die at once (only the
network delay is added). Expiry is driven by the injected ``now``.

Memory is bounded by ``max_hints`` (oldest dropped first) besides the TTL.
"""

from __future__ import annotations

import heapq

import msgspec
import structlog

log = structlog.get_logger(__name__)


class Hint(msgspec.Struct, array_like=True, gc=False):
    origin: str  # node that routed
    hid: int  # per-origin counter
    worker: str
    hashes: list[int]  # router block hashes of the routed prompt, in order
    ttl: float  # seconds left when sent


class HintStore:
    def __init__(self, node_id: str, ttl: float, max_hints: int = 100_000) -> None:
        if ttl <= 0:
            raise ValueError(f"hint ttl must be > 0, got {ttl}")
        self.node_id = node_id
        self.ttl = ttl
        self.max_hints = max_hints
        self._next = 0
        # (origin, hid) -> (expires, worker, hashes)
        self._hints: dict[tuple[str, int], tuple[float, str, list[int]]] = {}
        self._heap: list[tuple[float, str, int]] = []  # (expires, origin, hid)
        # block hash -> worker -> latest expiry among live hints
        self._by_hash: dict[int, dict[str, float]] = {}

    def __len__(self) -> int:
        return len(self._hints)

    def add_local(self, worker: str, hashes: list[int], now: float) -> Hint:
        self._next += 1
        h = Hint(self.node_id, self._next, worker, list(hashes), self.ttl)
        self._insert(h, now)
        return h

    def merge(self, hints: list[Hint], now: float) -> list[Hint]:
        """Union with remote hints; returns those that were new here.

        A hint this node already holds (its own, or one heard before) is a
        duplicate; a hint whose TTL is out of range is refused.
        """
        self.expire(now)
        fresh = []
        for h in hints:
            if not (0 < h.ttl <= 10 * self.ttl):
                log.warning("mesh.hint_bad_ttl", node=self.node_id, member=h.origin, ttl=h.ttl)
                continue
            if (h.origin, h.hid) in self._hints:
                continue
            self._insert(h, now)
            fresh.append(h)
        return fresh

    def _insert(self, h: Hint, now: float) -> None:
        exp = now + h.ttl
        key = (h.origin, h.hid)
        self._hints[key] = (exp, h.worker, h.hashes)
        heapq.heappush(self._heap, (exp, h.origin, h.hid))
        for bh in h.hashes:
            ws = self._by_hash.setdefault(bh, {})
            if ws.get(h.worker, 0.0) < exp:
                ws[h.worker] = exp
        while len(self._hints) > self.max_hints:
            self._pop()

    def _pop(self) -> None:
        exp, origin, hid = heapq.heappop(self._heap)
        item = self._hints.pop((origin, hid), None)
        if item is None:
            return
        _, worker, hashes = item
        for bh in hashes:
            ws = self._by_hash.get(bh)
            # Only the hint that set the latest expiry removes the entry.
            # (Two hints may set the same expiry: the first pop removes the entry.)
            if ws is not None and worker in ws and ws[worker] <= exp:
                del ws[worker]
                if not ws:
                    del self._by_hash[bh]

    def expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            self._pop()

    def live(self, now: float) -> list[Hint]:
        """Unexpired hints with their remaining TTL (to gossip or hand to a joiner)."""
        self.expire(now)
        return [Hint(o, i, w, hs, exp - now) for (o, i), (exp, w, hs) in self._hints.items()]

    def overlap(self, hashes: list[int], now: float) -> dict[str, int]:
        """Per worker, how many leading blocks of ``hashes`` are hinted to it."""
        self.expire(now)
        by_hash = self._by_hash
        ws = by_hash.get(hashes[0]) if hashes else None
        if not ws:
            return {}
        # The workers still hinted at every block so far. It changes rarely
        # along a prompt (a hint covers a whole prefix), so a block costs one
        # subset test in C, and a worker's depth is written once, where it
        # drops out.
        alive = set(ws)
        out: dict[str, int] = {}
        depth = len(hashes)
        for i in range(1, depth):
            ws = by_hash.get(hashes[i])
            if not ws:
                depth = i
                break
            if alive <= ws.keys():
                continue
            kept = alive & ws.keys()
            for w in alive - kept:
                out[w] = i
            alive = kept
            if not alive:
                return out
        for w in alive:
            out[w] = depth
        return out
