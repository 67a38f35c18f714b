"""What a router could at best reach: prefix-cache hit rates of ideal caches
over the requests a run actually sent (pure).

Every ideal sees the same sequence: ``(prompt, output)`` pairs in the order
they were sent (a failed request has no output, and still counts: its prompt
tokens are in the denominator of every hit rate). A request hits the longest
prefix of its full blocks that the cache holds, at most ``(len - 1) //
block_size`` blocks (the last prompt token is always computed, as in vLLM);
then every full block of prompt + output is cached (engines cache generated
blocks too).

- :func:`infinite_hit_rate`: one cache that never forgets. No router of a
  fleet with bounded caches can reach it once the fleet's caches hold less
  than the working set.
- :func:`pooled_lru_hit_rate`: ONE LRU cache with the fleet's total blocks, as
  if the engines' memory were pooled and every request could reuse any
  engine's blocks. A request's blocks are released tail first, as the
  engines (and vLLM) release them, so a prefix outlives its suffixes.
- :func:`belady_hit_rate`: the offline optimum of that pooled cache (Belady):
  when a block must go, the one whose next use is farthest goes first (a
  block never used again before one that is; a deeper block before its
  prefix, whose next use can only be as soon or sooner). A router that
  spreads load cannot pool memory, so neither pooled figure is a promise;
  they say how much of the loss is the fleet's memory and how much routing.
- :func:`working_set_blocks`: the most blocks that must be held at once so
  that no reuse is lost (the capacity at which Belady reaches the infinite
  ideal): at each request, the blocks already seen that some later request
  will hit. :func:`lru_working_set_blocks` is the same for an LRU cache: the
  smallest pooled LRU cache within ``tolerance`` of the infinite cache's hit
  rate (an LRU cache keeps blocks nobody will ask for again, so it needs
  more; the engines' caches are LRU).

Blocks are keyed by the router's chained hash (``blocks.hashing``), so two
prompts share a block exactly when they share the whole prefix up to it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from blocks.hashing import DEFAULT_BLOCK_SIZE, block_hashes

__all__ = [
    "Ideals",
    "RequestBlocks",
    "belady_hit_rate",
    "ideals",
    "infinite_hit_rate",
    "lru_working_set_blocks",
    "pooled_lru_hit_rate",
    "request_blocks",
    "working_set_blocks",
]

# (prompt token ids, output token ids) of one request, in the order sent.
Request = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True, slots=True)
class RequestBlocks:
    """One request as the caches see it."""

    prompt_tokens: int
    blocks: list[int]  # chained hashes of every full block of prompt + output
    usable: int  # how many leading blocks a hit may cover: (prompt_tokens - 1) // block_size


def request_blocks(requests: Sequence[Request], block_size: int = DEFAULT_BLOCK_SIZE) -> list[RequestBlocks]:
    """Hash every request once (the ideals share the result)."""
    out = []
    for prompt, output in requests:
        if not prompt:
            continue
        hs = block_hashes(list(prompt) + list(output), block_size, 0)
        out.append(RequestBlocks(len(prompt), hs, min(len(hs), (len(prompt) - 1) // block_size)))
    return out


def _rate(hit_blocks: int, reqs: list[RequestBlocks], block_size: int) -> float:
    total = sum(r.prompt_tokens for r in reqs)
    return hit_blocks * block_size / total if total else 0.0


def infinite_hit_rate(reqs: list[RequestBlocks], block_size: int = DEFAULT_BLOCK_SIZE) -> float:
    """Hit rate of one cache that never evicts."""
    seen: set[int] = set()
    hit = 0
    for r in reqs:
        n = 0
        for h in r.blocks[: r.usable]:
            if h not in seen:
                break
            n += 1
        hit += n
        seen.update(r.blocks)
    return _rate(hit, reqs, block_size)


def pooled_lru_hit_rate(
    reqs: list[RequestBlocks], capacity_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> float:
    """Hit rate of one LRU cache of ``capacity_blocks`` blocks."""
    if capacity_blocks <= 0:
        return 0.0
    lru: OrderedDict[int, None] = OrderedDict()
    hit = 0
    for r in reqs:
        n = 0
        for h in r.blocks[: r.usable]:
            if h not in lru:
                break
            n += 1
        hit += n
        # Released tail first: the deepest block is the least recent of the request.
        for h in reversed(r.blocks):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return _rate(hit, reqs, block_size)


_NEVER = 1 << 62  # "next use" of a block no later request hits


def _next_uses(reqs: list[RequestBlocks]) -> list[list[int]]:
    """For request i and each of its blocks, the index of the next request
    that hits it (within that request's usable prefix), or _NEVER."""
    nxt: dict[int, int] = {}
    out: list[list[int]] = [[] for _ in reqs]
    for i in range(len(reqs) - 1, -1, -1):
        r = reqs[i]
        out[i] = [nxt.get(h, _NEVER) for h in r.blocks]
        for h in r.blocks[: r.usable]:
            nxt[h] = i
    return out


def belady_hit_rate(
    reqs: list[RequestBlocks], capacity_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> float:
    """Hit rate of the offline optimum (farthest next use evicted first) of a
    cache of ``capacity_blocks`` blocks."""
    if capacity_blocks <= 0:
        return 0.0
    nxt = _next_uses(reqs)
    held: dict[int, int] = {}  # block -> its next use (the heap's valid entry)
    heap: list[tuple[int, int, int]] = []  # (-next use, -depth, block), stale entries skipped
    hit = 0
    for i, r in enumerate(reqs):
        n = 0
        for h in r.blocks[: r.usable]:
            if h not in held:
                break
            n += 1
        hit += n
        for depth, (h, use) in enumerate(zip(r.blocks, nxt[i])):
            held[h] = use
            heapq.heappush(heap, (-use, -depth, h))
        while len(held) > capacity_blocks:
            neg_use, _, h = heapq.heappop(heap)
            if held.get(h) == -neg_use:
                del held[h]
    return _rate(hit, reqs, block_size)


def working_set_blocks(reqs: list[RequestBlocks]) -> int:
    """The most blocks that some later request will hit, held at once."""
    nxt = _next_uses(reqs)
    live: dict[int, int] = {}  # block -> the request that will next hit it
    peak = 0
    for i, r in enumerate(reqs):
        for h in r.blocks[: r.usable]:
            if live.get(h) == i:
                del live[h]
        for h, use in zip(r.blocks, nxt[i]):
            if use != _NEVER:
                live[h] = use
        peak = max(peak, len(live))
    return peak


def lru_working_set_blocks(
    reqs: list[RequestBlocks], tolerance: float = 0.01, block_size: int = DEFAULT_BLOCK_SIZE
) -> int:
    """The smallest capacity at which :func:`pooled_lru_hit_rate` is at least
    ``(1 - tolerance)`` x the infinite cache's (bisection: the LRU hit rate
    never falls as the cache grows)."""
    want = (1.0 - tolerance) * infinite_hit_rate(reqs, block_size)
    lo, hi = 0, max(1, len({h for r in reqs for h in r.blocks}))
    while lo < hi:
        mid = (lo + hi) // 2
        if pooled_lru_hit_rate(reqs, mid, block_size) >= want:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True, slots=True)
class Ideals:
    """Every ideal of one request sequence; pooled ones at ``capacity_blocks``."""

    infinite: float
    pooled_lru: float
    belady: float
    capacity_blocks: int
    working_set_blocks: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "ideal_hit_rate": self.infinite,
            "pooled_lru_hit_rate": self.pooled_lru,
            "belady_hit_rate": self.belady,
            "capacity_blocks": self.capacity_blocks,
            "working_set_blocks": self.working_set_blocks,
        }


def ideals(requests: Sequence[Request], capacity_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> Ideals:
    """Every ideal of ``requests`` for a fleet of ``capacity_blocks`` blocks in all."""
    reqs = request_blocks(requests, block_size)
    return Ideals(
        infinite=infinite_hit_rate(reqs, block_size),
        pooled_lru=pooled_lru_hit_rate(reqs, capacity_blocks, block_size),
        belady=belady_hit_rate(reqs, capacity_blocks, block_size),
        capacity_blocks=capacity_blocks,
        working_set_blocks=working_set_blocks(reqs),
    )
