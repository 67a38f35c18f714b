"""What this router sent where: the routed-prefix structure of ``cache_aware_approx``.

In the spirit of SGLang's approximate radix tree, but built on the same chained
block hashes as the precise index: because a block hash names its whole
prefix, a map hash -> workers *is* the prefix tree (a hash's parent is the
previous hash of the same prompt). The map is a :class:`PrefixIndex`; on top of
it each worker keeps an LRU of its hashes with the last time it was routed, so
the structure is bounded (``max_blocks_per_worker``) and can age out entries
(``ttl``) without any engine events.

Eviction order is leaf-first: an insert touches a prompt's hashes from the last
block back to the first, so a prefix is always at least as recent as any of its
extensions and is evicted after them, as in a tree.

Times must be non-decreasing across calls (pass a monotonic clock).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from router.index import PrefixIndex

__all__ = ["DEFAULT_MAX_BLOCKS_PER_WORKER", "ApproxTree"]

DEFAULT_MAX_BLOCKS_PER_WORKER = 100_000


class ApproxTree:
    __slots__ = ("_index", "_lru", "max_blocks_per_worker", "ttl")

    def __init__(
        self, max_blocks_per_worker: int = DEFAULT_MAX_BLOCKS_PER_WORKER, ttl: float | None = None
    ) -> None:
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be > 0 or None, got {ttl!r}")
        self.max_blocks_per_worker = 0
        self.bound(max_blocks_per_worker)
        self.ttl = ttl
        self._index = PrefixIndex()
        self._lru: dict[str, OrderedDict[int, float]] = {}  # worker -> hash -> last routed

    def bound(self, max_blocks_per_worker: int) -> None:
        """Keep at most this many blocks per worker (the least recently routed go first)."""
        if not isinstance(max_blocks_per_worker, int) or max_blocks_per_worker < 1:
            raise ValueError(f"max_blocks_per_worker must be a positive int, got {max_blocks_per_worker!r}")
        self.max_blocks_per_worker = max_blocks_per_worker

    def insert(self, worker: str, hashes: Sequence[int], now: float) -> int:
        """Record that a prompt with these block hashes was routed to ``worker``.

        Returns how many blocks of ``worker`` were evicted to stay in bounds.
        """
        lru = self._lru.get(worker)
        if lru is None:
            self._index.add_worker(worker)  # validates the id
            lru = self._lru[worker] = OrderedDict()
        fresh = [h for h in hashes if h not in lru]
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            lru[h] = now
        if fresh:
            self._index.store(worker, fresh)
        return self._evict_worker(worker, lru, self.max_blocks_per_worker)

    def _evict_worker(self, worker: str, lru: OrderedDict[int, float], limit: int) -> int:
        over = len(lru) - limit
        if over <= 0:
            return 0
        popitem = lru.popitem
        gone = [popitem(last=False)[0] for _ in range(over)]
        self._index.remove(worker, gone)
        return over

    def evict(self, max_blocks_per_worker: int | None = None) -> int:
        """Trim every worker to ``max_blocks_per_worker`` (default: the bound
        given at construction), least recently routed first."""
        limit = self.max_blocks_per_worker if max_blocks_per_worker is None else max_blocks_per_worker
        if limit < 0:
            raise ValueError(f"max_blocks_per_worker must be >= 0, got {limit!r}")
        return sum(self._evict_worker(w, lru, limit) for w, lru in self._lru.items())

    def expire(self, now: float) -> int:
        """Drop entries not routed for ``ttl`` seconds (no-op without a ttl)."""
        if self.ttl is None:
            return 0
        cutoff = now - self.ttl
        total = 0
        for worker, lru in self._lru.items():
            gone = []
            for h, t in lru.items():
                if t >= cutoff:
                    break
                gone.append(h)
            if gone:
                for h in gone:
                    del lru[h]
                self._index.remove(worker, gone)
                total += len(gone)
        return total

    def match(
        self, hashes: Sequence[int], workers: Iterable[str] | None = None, now: float | None = None
    ) -> dict[str, int]:
        """Leading blocks of ``hashes`` routed to each worker (expired entries
        are dropped first when a ``ttl`` is set and ``now`` is given)."""
        if self.ttl is not None and now is not None:
            self.expire(now)
        return self._index.match(hashes, workers)

    def remove_worker(self, worker: str) -> int:
        self._lru.pop(worker, None)
        return self._index.remove_worker(worker)

    def blocks_of(self, worker: str) -> int:
        lru = self._lru.get(worker)
        return 0 if lru is None else len(lru)

    def worker_hashes(self, worker: str) -> set[int]:
        return self._index.worker_hashes(worker)

    def workers(self) -> list[str]:
        return list(self._lru)

    def __len__(self) -> int:
        return len(self._index)
