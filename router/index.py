"""The prefix index: router block hash -> bitmask of the workers that hold it.

A plain dict of int -> int is the whole query structure. Because block hashes
are chained (a hash names its whole prefix), the longest cached prefix of a
prompt on a worker is the number of leading hashes whose mask has the worker's
bit, and a walk can stop at the first hash that no remaining candidate holds.
No tree is needed; a dict is faster in CPython than any tree we could build.

Workers (``engine_id`` or ``engine_id#dp<r>``) are mapped to small int slots;
a freed slot is reused (lowest first) so masks stay small. Each worker also
keeps the set of its hashes, so clearing one worker touches only its own
entries instead of scanning the whole dict, and a match walks that set (in C)
once a single candidate is left, past the prefix it shares with others.

Cache tiers (:mod:`blocks.tiers`). The map above is the GPU tier's, the one
every match walks. Blocks on the other tiers (host memory, disk, an external
pool) are kept per worker and tier as plain sets, touched only by ops of
their tier and by :meth:`PrefixIndex.match_tiers`: it takes each worker's
GPU prefix from :meth:`PrefixIndex.match` and walks on from there, crediting
each further block to the fastest tier that holds it, until a block no tier
holds. An engine loads its GPU prefix and the lower-tier blocks that extend
it (vLLM's offloading connector, SGLang's hierarchical cache), so that is the
prefix it will not recompute. While no worker has a lower-tier block the walk
is skipped, so an index without offloading pays nothing for tiers.

The bound (``max_blocks``, ``--max-index-blocks``; 0: none). Distinct GPU
blocks count against it, and so, separately, do lower-tier blocks (one per
worker, tier and block, as :attr:`PrefixIndex.lower_blocks` counts them):
an operation that stores past the bound ends by dropping the least recently
used blocks of that kind down to a low-water mark (:func:`_low_water`), so
the cost is amortised over the stores that filled the gap. A GPU block is
used when it is stored or when a match walks over it as a hit (some
candidate holds it); a lower-tier block when it is stored or
:meth:`PrefixIndex.match_tiers` credits it. A dropped block leaves every
holder; hashes are chained, so a match stops there: routing degrades to
cold, never wrong. Recency is a generation per entry from a clock advanced
once per block an operation uses; within one operation a prompt's first
block gets the newest, so a chain loses its tail before its head. Ties are
broken by hash (then slot, then tier): ``native/src/index.rs`` chooses the
same victims. Without a bound no generation is kept.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import compress, repeat
from typing import TYPE_CHECKING

import structlog

from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, KvDelta
from blocks.tiers import LOWER_TIERS, TIER_GPU, TIERS, tier_name

if TYPE_CHECKING:
    from mesh.engine_log.packed import PackedEntry

__all__ = ["PrefixIndex", "TierBlocks"]

# Blocks per tier, in blocks.tiers order (gpu, host, disk, external).
TierBlocks = tuple[int, ...]

log = structlog.get_logger(__name__)

_VALID_OPS = (OP_STORE, OP_REMOVE, OP_CLEAR)
# At most this many candidates left: match counts each one's blocks in its
# own set instead of walking the shared map. One set probe is cheaper than a
# map probe (smaller table, no mask), but two workers already cost two probes
# per block against one, so one is the break-even.
_FEW = 1
# Runs an iterator to its end in C, keeping nothing.
_consume: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend
# Bound of PrefixIndex._canon (distinct holder sets kept canonical).
_CANON_MAX = 1 << 16


def _low_water(max_blocks: int) -> int:
    """Past the bound, blocks are dropped down to this many."""
    return max_blocks - max_blocks // 10


class PrefixIndex:
    __slots__ = (
        "_all_mask",
        "_bits",
        "_canon",
        "_clock",
        "_evicted",
        "_free",
        "_gen",
        "_held",
        "_lower",
        "_lower_blocks",
        "_map",
        "_max",
        "_slot_of",
        "_wcache",
        "_worker_at",
    )

    def __init__(self, max_blocks: int = 0) -> None:
        """``max_blocks``: the bound (see the module docstring); 0: none."""
        if not isinstance(max_blocks, int) or max_blocks < 0:
            raise ValueError(f"max_blocks must be >= 0, got {max_blocks}")
        self._max = max_blocks
        self._clock = 0  # next generation
        self._gen: dict[int, int] = {}  # bounded: block hash -> last use (the keys of _map)
        self._evicted = 0  # blocks dropped to keep the bound, every tier
        self._map: dict[int, int] = {}  # block hash -> bitmask of slots
        self._slot_of: dict[str, int] = {}
        self._worker_at: list[str | None] = []  # slot -> worker
        self._held: list[set[int]] = []  # slot -> hashes of that worker
        # slot -> 1 << slot, one int object per slot: every block held by that
        # worker alone shares it (less memory, fewer cache misses in match)
        self._bits: list[int] = []
        # mask value -> the one int object the map uses for it. Blocks held by
        # the same workers share one object, so match can skip a block with an
        # identity test (`is`) instead of an AND and a compare of big ints.
        self._canon: dict[int, int] = {}
        self._free: list[int] = []  # min-heap of freed slots
        self._all_mask = 0  # bits of every registered slot
        # worker list -> _Cand; reset whenever slots change
        self._wcache: dict[tuple[str, ...] | None, _Cand] = {}
        # slot -> tier -> hashes of that worker on that tier (tiers other than
        # the GPU) -> last use (bounded indexes; else 0)
        self._lower: dict[int, dict[int, dict[int, int]]] = {}
        self._lower_blocks = 0  # blocks in all of _lower: 0 skips the tier walk

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
            self._bits.append(self._canon_setdefault()(1 << slot, 1 << slot))
        self._slot_of[worker] = slot
        self._all_mask |= 1 << slot
        self._wcache.clear()
        return slot

    def _canon_setdefault(self) -> Callable[[int, int], int]:
        """``setdefault`` of the canonical masks (``intern(m, m)`` is m's
        object), bounded: past _CANON_MAX distinct holder sets it starts over
        (only identity tests in match lose, never correctness)."""
        canon = self._canon
        if len(canon) >= _CANON_MAX:
            canon.clear()
            canon.update((b, b) for b in self._bits)
        return canon.setdefault

    def add_worker(self, worker: str) -> None:
        """Register a worker with no blocks (it then shows up in ``match``)."""
        self._slot(worker)

    def workers(self) -> list[str]:
        return list(self._slot_of)

    def __contains__(self, worker: object) -> bool:
        return worker in self._slot_of

    @property
    def max_blocks(self) -> int:
        """The bound on distinct GPU blocks (and on lower-tier blocks); 0: none."""
        return self._max

    def _tier_set(self, worker: str, tier: int) -> set[int] | dict[int, int] | None:
        slot = self._slot_of.get(worker)
        if slot is None:
            return None
        if tier == TIER_GPU:
            return self._held[slot]
        return self._lower.get(slot, {}).get(tier)

    def blocks_of(self, worker: str, tier: int = TIER_GPU) -> int:
        """Blocks the index believes ``worker`` holds on ``tier``."""
        held = self._tier_set(worker, tier)
        return 0 if held is None else len(held)

    def tier_blocks(self, worker: str) -> TierBlocks:
        """Blocks of ``worker`` on each tier, in ``blocks.tiers`` order."""
        return tuple(self.blocks_of(worker, t) for t in TIERS)

    def worker_hashes(self, worker: str, tier: int = TIER_GPU) -> set[int]:
        """A copy of the hashes the index believes ``worker`` holds on ``tier``."""
        held = self._tier_set(worker, tier)
        return set() if held is None else set(held)

    @property
    def lower_blocks(self) -> int:
        """Blocks held on tiers other than the GPU, all workers."""
        return self._lower_blocks

    def __len__(self) -> int:
        """Number of distinct block hashes held by any worker on a GPU."""
        return len(self._map)

    # -- updates -----------------------------------------------------------

    def store(self, worker: str, hashes: Iterable[int], tier: int = TIER_GPU) -> None:
        """``worker`` holds ``hashes`` on ``tier``."""
        if tier != TIER_GPU:
            self._store_lower(self._slot(worker), hashes, tier)
            return
        slot = self._slot(worker)
        bit = self._bits[slot]
        m = self._map
        if not isinstance(hashes, (list, tuple)):
            hashes = list(hashes)
        # Blocks no worker holds yet (a fresh prefill, the usual case) are
        # inserted by one C-level pass.
        if not hashes or hashes[0] not in m:
            n0 = len(m)
            _consume(map(m.setdefault, hashes, repeat(bit)))
            done = len(m) - n0 == len(hashes)
        else:  # starts with a shared block: likely all shared, skip that pass
            done = False
        if not done:
            # Blocks other workers hold: their masks are canonical objects, so
            # a batch has few distinct ones; OR the bit into each distinct
            # mask once, then rewrite the blocks in C.
            olds = list(map(m.get, hashes))
            intern = self._canon_setdefault()
            new_of: dict[int | None, int] = {}
            for old in dict.fromkeys(olds):
                if old is None:
                    new_of[old] = bit
                else:
                    new = old | bit
                    new_of[old] = intern(new, new)
            m.update(zip(hashes, map(new_of.__getitem__, olds)))
        self._held[slot].update(hashes)
        if self._max and hashes:
            c = self._clock
            self._gen.update(zip(reversed(hashes), range(c, c + len(hashes))))
            self._clock = c + len(hashes)
            if len(m) > self._max:
                self._evict()

    def _store_lower(self, slot: int, hashes: Iterable[int], tier: int) -> None:
        tier_name(tier)  # raises for an unknown tier
        tiers = self._lower.get(slot)
        if tiers is None:
            tiers = self._lower[slot] = {}
        held = tiers.get(tier)
        if held is None:
            held = tiers[tier] = {}
        n0 = len(held)
        if self._max:
            hs = hashes if isinstance(hashes, (list, tuple)) else list(hashes)
            c = self._clock
            held.update(zip(reversed(hs), range(c, c + len(hs))))
            self._clock = c + len(hs)
        else:
            held.update(dict.fromkeys(hashes, 0))
        self._lower_blocks += len(held) - n0
        if self._max and self._lower_blocks > self._max:
            self._evict_lower()

    def _evict(self) -> None:
        """Drops the least recently used GPU blocks down to the low-water
        mark: by generation, ties by hash (native/src/index.rs's order)."""
        m, gen = self._map, self._gen
        k = len(m) - _low_water(self._max)
        cut = sorted(gen.values())[k - 1]
        victims = [h for h, g in gen.items() if g < cut]
        if len(victims) < k:
            victims += sorted(h for h, g in gen.items() if g == cut)[: k - len(victims)]
        by_mask: dict[int, list[int]] = {}
        for h in victims:
            del gen[h]
            by_mask.setdefault(m.pop(h), []).append(h)
        held = self._held
        for mask, hs in by_mask.items():
            while mask:
                low = mask & -mask
                held[low.bit_length() - 1].difference_update(hs)
                mask ^= low
        self._evicted += k

    def _evict_lower(self) -> None:
        """Drops the least recently used lower-tier blocks down to the
        low-water mark, oldest first by (generation, hash, slot, tier)."""
        k = self._lower_blocks - _low_water(self._max)
        lower = self._lower
        entries = [
            (g, h, slot, t)
            for slot, tiers in lower.items()
            for t, held in tiers.items()
            for h, g in held.items()
        ]
        for _, h, slot, t in heapq.nsmallest(k, entries):
            del lower[slot][t][h]
        self._lower_blocks -= k
        self._evicted += k

    def remove(self, worker: str, hashes: Iterable[int], tier: int = TIER_GPU) -> None:
        """Drop ``hashes`` from ``worker`` on ``tier`` only; hashes it does
        not hold there are ignored."""
        slot = self._slot_of.get(worker)
        if slot is None:
            return
        if tier != TIER_GPU:
            held_there = self._lower.get(slot, {}).get(tier)
            if held_there:
                n0 = len(held_there)
                for h in hashes:
                    held_there.pop(h, None)
                self._lower_blocks -= n0 - len(held_there)
            return
        keep = ~(1 << slot)
        m, gen = self._map, self._gen
        held = self._held[slot]
        intern = self._canon_setdefault()
        for h in hashes:
            if h in held:
                held.discard(h)
                rest = m[h] & keep
                if rest:
                    m[h] = intern(rest, rest)
                else:
                    del m[h]
                    gen.pop(h, None)

    def clear_worker(self, worker: str) -> int:
        """Drop every block of ``worker``, every tier (engine restart /
        AllBlocksCleared).

        The worker stays registered. Returns the number of blocks dropped.
        """
        slot = self._slot_of.get(worker)
        if slot is None:
            return 0
        lower = self._lower.pop(slot, None)
        dropped = sum(len(h) for h in lower.values()) if lower else 0
        self._lower_blocks -= dropped
        keep = ~(1 << slot)
        m, gen = self._map, self._gen
        held = self._held[slot]
        n = len(held) + dropped
        intern = self._canon_setdefault()
        for h in held:
            rest = m[h] & keep
            if rest:
                m[h] = intern(rest, rest)
            else:
                del m[h]
                gen.pop(h, None)
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
            if op.tier not in TIERS:
                raise ValueError(f"unknown cache tier {op.tier!r} in delta for worker {delta.worker!r}")
        if not isinstance(delta.worker, str) or not delta.worker:
            raise ValueError(f"delta worker must be a non-empty str, got {delta.worker!r}")
        for op in delta.ops:
            if op.kind == OP_STORE:
                self.store(delta.worker, op.hashes, op.tier)
            elif op.kind == OP_REMOVE:
                self.remove(delta.worker, op.hashes, op.tier)
            else:
                n = self.clear_worker(delta.worker)
                log.debug("router.worker_cleared", worker=delta.worker, seq=delta.seq, blocks=n)

    def apply_packed(self, entry: PackedEntry) -> None:
        """Apply a log entry decoded natively (:mod:`mesh.engine_log.packed`):
        each of its deltas, in order, as :meth:`apply` does."""
        for d in entry.to_deltas():
            self.apply(d)

    # -- queries -----------------------------------------------------------

    def _candidates(self, workers: Iterable[str] | None) -> _Cand:
        """The candidate list's precomputed match state, cached per worker list.

        Policies pass the same candidate list request after request, so the
        slot lookups are done once, not on every match.
        """
        key = None if workers is None else workers if workers.__class__ is tuple else tuple(workers)
        ent = self._wcache.get(key)
        if ent is None:
            names = tuple(self._slot_of) if key is None else key
            slot_of = self._slot_of
            bits = [0 if (s := slot_of.get(w)) is None else 1 << s for w in names]
            if len(self._wcache) >= 64:
                self._wcache.clear()
            ent = self._wcache[key] = _Cand(names, bits)
        return ent

    def match(self, hashes: Sequence[int], workers: Iterable[str] | None = None) -> dict[str, int]:
        """For each worker, how many leading blocks of ``hashes`` it holds.

        ``workers=None`` means every registered worker; unknown workers get 0.
        With a bound, the blocks some candidate held count as used.
        """
        if hashes.__class__ is not list and hashes.__class__ is not tuple:
            hashes = list(hashes)  # walked twice (see _count_each)
        out = self._match(hashes, workers)
        if self._max:
            d = max(out.values(), default=0)
            if d:
                c = self._clock
                self._gen.update(zip(reversed(hashes[:d]), range(c, c + d)))
                self._clock = c + d
        return out

    def _match(self, hashes: Sequence[int], workers: Iterable[str] | None) -> dict[str, int]:
        c = self._candidates(workers)
        out = c.zeros.copy()
        active = c.mask
        if active.bit_count() <= _FEW:
            self._count_each(out, c, active, hashes, 0)
            return out
        get = self._map.get
        canon = self._canon.get
        i = 0
        # One dict probe per block while many candidates are left; the
        # workers that drop out at block i get depth i (those at block 0 keep
        # 0). `active` is kept as the canonical object of its value, so a
        # block held by exactly the active workers passes the `is` test.
        for h in hashes:
            v = get(h, 0)
            if v is not active:
                m = v & active
                if m != active:
                    if i:
                        c.scatter(out, active ^ m, i)
                    if not m:
                        return out
                    active = canon(m, m)
                    if active.bit_count() <= _FEW:  # past the shared prefix
                        self._count_each(out, c, active, hashes, i + 1)
                        return out
            i += 1
        if i:
            c.scatter(out, active, i)
        return out

    def match_tiers(
        self, hashes: Sequence[int], workers: Iterable[str] | None = None
    ) -> dict[str, TierBlocks]:
        """For each worker, the blocks of the longest prefix of ``hashes`` it
        holds on any tier, credited to the fastest tier holding each (see the
        module docstring): ``(gpu, host, disk, external)`` block counts.

        The GPU count starts with :meth:`match`'s leading GPU blocks; the sum
        is the prefix the worker would not recompute.
        """
        if hashes.__class__ is not list and hashes.__class__ is not tuple:
            hashes = list(hashes)
        gpu = self.match(hashes, workers)
        if not self._lower_blocks:
            return {w: (g, 0, 0, 0) for w, g in gpu.items()}
        slot_of, lower, held = self._slot_of, self._lower, self._held
        n = len(hashes)
        base = self._clock  # with a bound: the walk's credited blocks count as used
        if self._max:
            self._clock += n
        out: dict[str, TierBlocks] = {}
        for w, g in gpu.items():
            slot = slot_of.get(w)
            tiers = lower.get(slot) if slot is not None and g < n else None
            if tiers and slot is not None:
                if self._max:
                    out[w] = _walk_using(hashes, g, held[slot], tiers, self._gen, base)
                else:
                    out[w] = _walk(hashes, g, held[slot], tiers)
            else:
                out[w] = (g, 0, 0, 0)
        return out

    def _count_each(
        self, out: dict[str, int], c: _Cand, active: int, hashes: Sequence[int], start: int
    ) -> None:
        """``out[w] = start + leading blocks of hashes[start:] that w holds``
        for the few workers ``w`` in ``active`` (each holds hashes[:start]).

        Checked against each worker's own set, a table far smaller (so more
        often cached) than the map, by ``issuperset`` over list slices: a C
        loop with no Python call per block. A full hit is one pass; otherwise
        a binary search finds the first missing block, checking each block
        about twice.
        """
        held, name_of = self._held, c.name_of
        n = len(hashes)
        while active:
            low = active & -active
            mine = held[low.bit_length() - 1]
            lo, hi = start, n
            if not mine.issuperset(hashes[lo:hi]):
                while hi - lo > 1:  # the first block `mine` lacks is in [lo, hi)
                    mid = (lo + hi) // 2
                    if mine.issuperset(hashes[lo:mid]):
                        lo = mid
                    else:
                        hi = mid
                hi = lo
            out[name_of[low]] = hi
            active ^= low

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._map),
            "workers": len(self._slot_of),
            "lower_blocks": self._lower_blocks,
            "evicted_blocks": self._evicted,
        }


def _walk(hashes: Sequence[int], start: int, gpu: set[int], tiers: dict[int, dict[int, int]]) -> TierBlocks:
    """Blocks per tier of the prefix from ``hashes[start]`` on (the GPU
    prefix before it counted as GPU blocks), each block credited to the
    fastest tier holding it, until one no tier holds."""
    counts = [start, 0, 0, 0]
    order = [(t, tiers[t]) for t in LOWER_TIERS if tiers.get(t)]
    for h in hashes[start:]:
        if h in gpu:
            counts[TIER_GPU] += 1
            continue
        for t, held in order:
            if h in held:
                counts[t] += 1
                break
        else:
            break
    return tuple(counts)


def _walk_using(
    hashes: Sequence[int],
    start: int,
    gpu: set[int],
    tiers: dict[int, dict[int, int]],
    gen: dict[int, int],
    base: int,
) -> TierBlocks:
    """:func:`_walk` of a bounded index: each credited block counts as used,
    block i at generation ``base + len(hashes) - 1 - i`` (the first newest)."""
    counts = [start, 0, 0, 0]
    order = [(t, tiers[t]) for t in LOWER_TIERS if tiers.get(t)]
    last = base + len(hashes) - 1
    for i in range(start, len(hashes)):
        h, g = hashes[i], last - i
        if h in gpu:
            counts[TIER_GPU] += 1
            if gen[h] < g:
                gen[h] = g
            continue
        for t, held in order:
            if h in held:
                counts[t] += 1
                if held[h] < g:
                    held[h] = g
                break
        else:
            break
    return tuple(counts)


class _Cand:
    """One candidate list, ready for ``match``: its workers' names, the mask
    of their bits, a zero result to copy, and what ``scatter`` needs."""

    __slots__ = ("by_pos", "fmt", "mask", "name_of", "names", "zeros")

    def __init__(self, names: tuple[str, ...], bits: list[int]) -> None:
        self.names = names
        mask = 0
        for b in bits:
            mask |= b
        self.mask = mask
        self.zeros = dict.fromkeys(names, 0)
        self.name_of = {b: w for w, b in zip(names, bits) if b}  # bit -> name
        # Position p of format(mask, fmt) (most significant bit first) -> the
        # name of that slot ("" for slots not among the candidates: their bit
        # is never in a mask scatter is given, so "" is never selected).
        width = max(1, mask.bit_length())
        self.fmt = f"0{width}b"
        self.by_pos = tuple(self.name_of.get(1 << (width - 1 - p), "") for p in range(width))

    def scatter(self, out: dict[str, int], mask: int, depth: int) -> None:
        """``out[w] = depth`` for every candidate ``w`` whose bit is in ``mask``."""
        if mask.bit_count() <= 3:
            # Few workers (the usual case past a shared prefix): walk the bits.
            name_of = self.name_of
            while mask:
                low = mask & -mask
                out[name_of[low]] = depth
                mask ^= low
        else:
            # Many (the end of a prefix shared by many workers): the mask as
            # one 0/1 byte per slot selects the names, all in C.
            sel = format(mask, self.fmt).encode().translate(_BIT_BYTES)
            out.update(dict.fromkeys(compress(self.by_pos, sel), depth))


# b"0" -> 0, b"1" -> 1: a binary string as selectors for itertools.compress.
_BIT_BYTES = bytes.maketrans(b"01", b"\x00\x01")
