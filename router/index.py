"""The prefix index: router block hash -> bitmask of the workers that hold it.

A plain dict of int -> int is the whole query structure. Because block hashes
are chained (a hash names its whole prefix), the longest cached prefix of a
prompt on a worker is the number of leading hashes whose mask has the worker's
bit, and a walk can stop at the first hash that no remaining candidate holds.
No tree is needed; a dict is faster in CPython than any tree we could build.

Workers (``engine_id`` or ``engine_id#dp<r>``) are mapped to small int slots;
a freed slot is reused (lowest first) so masks stay small. Each worker also
keeps the set of its hashes, so clearing one worker touches only its own
entries instead of scanning the whole dict.
"""

from __future__ import annotations

import heapq
from itertools import compress
from collections.abc import Iterable, Sequence

import structlog

from engine_adapters.kv_delta import OP_CLEAR, OP_REMOVE, OP_STORE, KvDelta

__all__ = ["PrefixIndex"]

log = structlog.get_logger(__name__)

_VALID_OPS = (OP_STORE, OP_REMOVE, OP_CLEAR)


class PrefixIndex:
    __slots__ = ("_map", "_slot_of", "_worker_at", "_held", "_free", "_all_mask", "_wcache")

    def __init__(self) -> None:
        self._map: dict[int, int] = {}  # block hash -> bitmask of slots
        self._slot_of: dict[str, int] = {}
        self._worker_at: list[str | None] = []  # slot -> worker
        self._held: list[set[int]] = []  # slot -> hashes of that worker
        self._free: list[int] = []  # min-heap of freed slots
        self._all_mask = 0  # bits of every registered slot
        # worker list -> (names, mask, slots); reset whenever slots change
        self._wcache: dict[tuple[str, ...] | None, tuple[tuple[str, ...], int, list[int]]] = {}

    # -- workers -----------------------------------------------------------

    def _slot(self, worker: str) -> int:
        slot = self._slot_of.get(worker)
        if slot is not None:
            return slot
        if not isinstance(worker, str) or not worker:
            raise ValueError(f"worker must be a non-empty str, got {worker!r}")
        if self._free:
            slot = heapq.heappop(self._free)
            self._worker_at[slot] = worker
        else:
            slot = len(self._worker_at)
            self._worker_at.append(worker)
            self._held.append(set())
        self._slot_of[worker] = slot
        self._all_mask |= 1 << slot
        self._wcache.clear()
        return slot

    def add_worker(self, worker: str) -> None:
        """Register a worker with no blocks (it then shows up in ``match``)."""
        self._slot(worker)

    def workers(self) -> list[str]:
        return list(self._slot_of)

    def __contains__(self, worker: object) -> bool:
        return worker in self._slot_of

    def blocks_of(self, worker: str) -> int:
        slot = self._slot_of.get(worker)
        return 0 if slot is None else len(self._held[slot])

    def worker_hashes(self, worker: str) -> set[int]:
        """A copy of the hashes the index believes ``worker`` holds."""
        slot = self._slot_of.get(worker)
        return set() if slot is None else set(self._held[slot])

    def __len__(self) -> int:
        """Number of distinct block hashes held by any worker."""
        return len(self._map)

    # -- updates -----------------------------------------------------------

    def store(self, worker: str, hashes: Iterable[int]) -> None:
        slot = self._slot(worker)
        bit = 1 << slot
        m = self._map
        get = m.get
        held = self._held[slot]
        if not isinstance(hashes, (list, tuple)):
            hashes = list(hashes)
        for h in hashes:
            old = get(h)
            # Blocks held by one worker share that worker's `bit` object: less
            # memory and fewer cache misses when match reads the mask.
            m[h] = bit if old is None else old | bit
        held.update(hashes)

    def remove(self, worker: str, hashes: Iterable[int]) -> None:
        """Drop ``hashes`` from ``worker``; hashes it does not hold are ignored."""
        slot = self._slot_of.get(worker)
        if slot is None:
            return
        keep = ~(1 << slot)
        m = self._map
        held = self._held[slot]
        for h in hashes:
            if h in held:
                held.discard(h)
                rest = m[h] & keep
                if rest:
                    m[h] = rest
                else:
                    del m[h]

    def clear_worker(self, worker: str) -> int:
        """Drop every block of ``worker`` (engine restart / AllBlocksCleared).

        The worker stays registered. Returns the number of blocks dropped.
        """
        slot = self._slot_of.get(worker)
        if slot is None:
            return 0
        keep = ~(1 << slot)
        m = self._map
        held = self._held[slot]
        n = len(held)
        for h in held:
            rest = m[h] & keep
            if rest:
                m[h] = rest
            else:
                del m[h]
        held.clear()
        return n

    def remove_worker(self, worker: str) -> int:
        """Forget ``worker`` entirely and free its slot. Returns blocks dropped."""
        slot = self._slot_of.get(worker)
        if slot is None:
            return 0
        n = self.clear_worker(worker)
        del self._slot_of[worker]
        self._worker_at[slot] = None
        self._all_mask &= ~(1 << slot)
        self._wcache.clear()
        heapq.heappush(self._free, slot)
        return n

    def apply(self, delta: KvDelta) -> None:
        """Apply one engine batch, ops in order.

        Every op is checked before any is applied, so a malformed delta raises
        ``ValueError`` and leaves the index untouched.
        """
        for op in delta.ops:
            if op.kind not in _VALID_OPS:
                raise ValueError(f"unknown KvOp kind {op.kind!r} in delta for worker {delta.worker!r}")
        if not isinstance(delta.worker, str) or not delta.worker:
            raise ValueError(f"delta worker must be a non-empty str, got {delta.worker!r}")
        for op in delta.ops:
            if op.kind == OP_STORE:
                self.store(delta.worker, op.hashes)
            elif op.kind == OP_REMOVE:
                self.remove(delta.worker, op.hashes)
            else:
                n = self.clear_worker(delta.worker)
                log.debug("index.worker_cleared", worker=delta.worker, seq=delta.seq, blocks=n)

    # -- queries -----------------------------------------------------------

    def _candidates(self, workers: Iterable[str] | None) -> tuple[tuple[str, ...], int, list[int]]:
        """(worker ids, their mask, each one's bit; 0 if unknown), cached per worker list.

        Policies pass the same candidate list request after request, so the
        slot lookups are done once, not on every match.
        """
        key = None if workers is None else tuple(workers)
        ent = self._wcache.get(key)
        if ent is None:
            names = tuple(self._slot_of) if key is None else key
            bits = [0 if (s := self._slot_of.get(w)) is None else 1 << s for w in names]
            mask = 0
            for b in bits:
                mask |= b
            if len(self._wcache) >= 64:
                self._wcache.clear()
            ent = self._wcache[key] = (names, mask, bits)
        return ent

    def match(self, hashes: Sequence[int], workers: Iterable[str] | None = None) -> dict[str, int]:
        """For each worker, how many leading blocks of ``hashes`` it holds.

        ``workers=None`` means every registered worker; unknown workers get 0.
        """
        names, active, bits = self._candidates(workers)
        out = dict.fromkeys(names, 0)
        get = self._map.get
        i = 0
        for h in hashes:
            m = get(h, 0) & active
            if m != active:
                if i:  # workers dropping out at block 0 keep their 0
                    gone = active ^ m
                    # C-level scatter of depth i to the workers in `gone`.
                    out.update(dict.fromkeys(compress(names, map(gone.__and__, bits)), i))
                active = m
                if not active:
                    break
            i += 1
        else:
            if active and i:
                out.update(dict.fromkeys(compress(names, map(active.__and__, bits)), i))
        return out

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._map), "workers": len(self._slot_of)}
