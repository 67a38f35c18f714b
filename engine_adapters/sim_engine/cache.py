"""The simulated engine's paged prefix cache (pure: no I/O, no clock).

Modelled on vLLM's v1 ``KVCacheManager``/``BlockPool``:

- A fixed pool of ``num_gpu_blocks`` blocks of ``block_size`` tokens.
- A full block is identified by a chained hash of (parent hash, its tokens).
  The function is deliberately NOT the router's xxh3 chain: blake2b-64 with an
  engine seed, read as an UNSIGNED 64-bit int (so values >= 2**63 occur, as
  with vLLM). The router must treat these as opaque ids and map them through
  the ``BlockStored`` token ids and parent hash, exactly as with a real vLLM.
- A request pins (refcounts) its cached prefix blocks and takes fresh blocks
  for the rest. Unpinned cached blocks stay cached in LRU order and are
  evicted only when a fresh block is needed and no uncached free block is left
  (each eviction is a ``BlockRemoved``). Like vLLM, a finished request's
  blocks are released tail first, so a prefix outlives its suffixes.
- Blocks become cached when they are full, for prompt and generated tokens
  alike (vLLM caches generated blocks too); consecutive newly cached blocks of
  one request become one ``BlockStored`` with the parent of the first block.
- If a block with the same hash is already cached (two requests computed the
  same prefix at once), the request switches to the cached copy and frees its
  own, so each hash lives in at most one block and the event stream has set
  semantics: replaying every event in order onto an empty set gives exactly
  the set of cached hashes.
- Blocks are shared only within one tenancy (LoRA adapter and cache salt), as
  in vLLM, where the adapter is an extra key of every block hash and the salt
  one of the first block's: here each tenancy has its own root hash. Events
  of an adapter's or a salted request's blocks carry ``lora_name``/``lora_id``
  and vLLM 0.33's untagged ``extra_keys`` (one entry per block: the adapter
  name, then the salt on the request's first block; ``None`` when empty).
  Events of the base model without a salt carry no ``extra_keys`` at all
  (vLLM sends ``[None, ...]``; a reader treats both the same, and the
  simulator's events stay as small as they were).

Host tier (optional, ``num_host_blocks``; vLLM's KV offloading to CPU
memory, SGLang's hierarchical cache): a GPU block evicted from the pool is
copied to a bounded LRU of host blocks first, published as a
``BlockStored`` with ``medium="CPU"`` before its GPU ``BlockRemoved``; a
full host tier drops its least recently used block
(``BlockRemoved(medium="CPU")``). At admission the blocks right past the GPU
prefix that the host tier holds are loaded back (each into a fresh GPU
block, published as a GPU ``BlockStored``; the host copy stays): they are
not recomputed, and the timing model charges their copy instead
(``TimingConfig.host_load_ms_per_token``). The host tier keeps set
semantics like the pool: each hash at most once.

Every event is appended to an outbox in the order things happened;
:meth:`PrefixCache.drain_events` hands them to the shell, which publishes them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from blocks.delta import EngineHash
from engine_adapters.completion_request import Tenancy
from engine_adapters.kv_events import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from engine_adapters.sim_engine.config import DEFAULTS

_U32_MAX = 2**32 - 1


class NotEnoughBlocks(Exception):
    """Not enough free or evictable blocks now; the scheduler should wait."""


def engine_block_hash(parent: int, tokens: Sequence[int]) -> int:
    """blake2b-64 of the parent hash and the block's token ids, unsigned."""
    h = hashlib.blake2b(parent.to_bytes(8, "big"), digest_size=8, person=b"kvmesh-sim")
    h.update(array("I", tokens).tobytes())
    return int.from_bytes(h.digest(), "big")


def root_hash(seed: int) -> int:
    """The parent of a prompt's first block (like vLLM's NONE_HASH)."""
    return engine_block_hash(seed & 0xFFFFFFFFFFFFFFFF, ())


_BASE = Tenancy()


def tenancy_root(root: int, tenancy: Tenancy) -> int:
    """The root hash of a tenancy's blocks: ``root`` for the base model
    without a salt, a hash of it, the adapter and the salt otherwise."""
    if tenancy == _BASE:
        return root
    h = hashlib.blake2b(root.to_bytes(8, "big"), digest_size=8, person=b"kvmesh-sim-ns")
    for part in (tenancy.lora_name, tenancy.cache_salt):
        raw = part.encode("utf-8")
        h.update(len(raw).to_bytes(4, "little") + raw)
    return int.from_bytes(h.digest(), "big")


def event_extra_keys(tenancy: Tenancy, first_block: int, n: int) -> list[tuple[str, ...] | None] | None:
    """vLLM 0.33's untagged ``extra_keys`` of ``n`` blocks starting at block
    ``first_block`` of a request: the adapter on every block, the salt on
    block 0 (``to_event_extra_keys`` of ``generate_block_hash_extra_keys``)."""
    if tenancy == _BASE:
        return None
    lora, salt = tenancy.lora_name, tenancy.cache_salt
    out: list[tuple[str, ...] | None] = []
    for i in range(first_block, first_block + n):
        keys = tuple(k for k in (lora, salt if i == 0 else "") if k)
        out.append(keys or None)
    return out


@dataclass(slots=True)
class _Block:
    block_id: int
    ref: int = 0
    hash: int | None = None
    parent: int | None = None  # engine hash of the previous block; None for the first
    tokens: tuple[int, ...] = ()
    tenancy: Tenancy = _BASE  # of the request that cached it


@dataclass(slots=True)
class _HostBlock:
    """A block's copy on the host tier: what loading it back needs."""

    parent: int | None
    tokens: tuple[int, ...]
    tenancy: Tenancy


@dataclass(slots=True)
class _Req:
    blocks: list[int]  # block ids, in token order
    chain: list[int]  # engine hashes of the request's full blocks, computed so far
    committed: int  # leading blocks already cached (or deliberately left private)
    caching: bool = True  # False after clear(): nothing of it is cached any more
    hit_blocks: int = 0  # cached on the GPU at admission
    host_blocks: int = 0  # loaded from the host tier at admission, right after those
    tenancy: Tenancy = _BASE


@dataclass(slots=True)
class CacheStats:
    num_blocks: int
    pinned: int
    cached: int
    free_uncached: int
    evictable: int
    evictions: int = field(default=0)
    host_blocks: int = 0  # the host tier's size (0: no host tier)
    host_cached: int = 0
    host_evictions: int = 0  # blocks the full host tier dropped


class PrefixCache:
    """``lora_ids``: the engine's adapters and their ids (vLLM numbers them
    from 1), published as ``BlockStored.lora_id``; ``num_host_blocks``: the
    host tier's size (0: none, see the module docstring)."""

    def __init__(
        self,
        num_gpu_blocks: int,
        block_size: int = DEFAULTS.block_size,
        hash_seed: int = 0,
        lora_ids: Mapping[str, int] | None = None,
        num_host_blocks: int = DEFAULTS.num_host_blocks,
    ) -> None:
        if num_gpu_blocks <= 0 or block_size <= 0:
            raise ValueError("num_gpu_blocks and block_size must be positive")
        if num_host_blocks < 0:
            raise ValueError("num_host_blocks must be >= 0 (0: no host tier)")
        self.num_host_blocks = num_host_blocks
        self._host: OrderedDict[int, _HostBlock] = OrderedDict()  # engine hash -> copy; oldest first
        self._host_evictions = 0
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self._root = root_hash(hash_seed)
        self._roots: dict[Tenancy, int] = {_BASE: self._root}
        self._lora_ids = dict(lora_ids or {})
        self._blocks = [_Block(i) for i in range(num_gpu_blocks)]
        self._free: list[int] = list(range(num_gpu_blocks - 1, -1, -1))  # uncached, ref 0
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, ref 0; oldest first
        self._by_hash: dict[int, int] = {}
        self._reqs: dict[str, _Req] = {}
        self._events: list[KVEvent] = []
        self._evictions = 0

    # --- queries ---------------------------------------------------------------

    def _root_of(self, tenancy: Tenancy) -> int:
        root = self._roots.get(tenancy)
        if root is None:
            root = self._roots[tenancy] = tenancy_root(self._root, tenancy)
        return root

    def chain_hashes(
        self, tokens: Sequence[int], max_blocks: int | None = None, tenancy: Tenancy = _BASE
    ) -> list[int]:
        """Engine hashes of the full blocks of ``tokens`` (of ``tenancy``)."""
        bs = self.block_size
        n = len(tokens) // bs
        if max_blocks is not None:
            n = min(n, max_blocks)
        out: list[int] = []
        parent = self._root_of(tenancy)
        for i in range(n):
            parent = engine_block_hash(parent, tokens[i * bs : (i + 1) * bs])
            out.append(parent)
        return out

    def lookup(self, tokens: Sequence[int], tenancy: Tenancy = _BASE) -> list[int]:
        """Hashes of the longest cached prefix of full blocks (read-only)."""
        bs = self.block_size
        out: list[int] = []
        parent = self._root_of(tenancy)
        for i in range(len(tokens) // bs):
            parent = engine_block_hash(parent, tokens[i * bs : (i + 1) * bs])
            if parent not in self._by_hash:
                break
            out.append(parent)
        return out

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def usage(self) -> float:
        """Fraction of blocks pinned by running requests (vLLM's kv_cache_usage)."""
        return self.num_pinned() / self.num_gpu_blocks

    def num_pinned(self) -> int:
        return self.num_gpu_blocks - len(self._free) - len(self._lru)

    def num_cached(self) -> int:
        return len(self._by_hash)

    def cached_hashes(self) -> set[int]:
        """Engine hashes of the blocks cached on the GPU."""
        return set(self._by_hash)

    def host_hashes(self) -> set[int]:
        """Engine hashes of the blocks on the host tier."""
        return set(self._host)

    def host_hit_blocks(self, request_id: str) -> int:
        """Blocks of the request loaded from the host tier at admission."""
        return self._reqs[request_id].host_blocks

    def request_blocks(self, request_id: str) -> list[int]:
        return list(self._reqs[request_id].blocks)

    def stats(self) -> CacheStats:
        return CacheStats(
            num_blocks=self.num_gpu_blocks,
            pinned=self.num_pinned(),
            cached=len(self._by_hash),
            free_uncached=len(self._free),
            evictable=len(self._lru),
            evictions=self._evictions,
            host_blocks=self.num_host_blocks,
            host_cached=len(self._host),
            host_evictions=self._host_evictions,
        )

    def snapshot(self) -> list[dict[str, object]]:
        """Every cached block: ``{"hash", "parent", "tokens", "lora_name",
        "cache_salt"}`` (the last two None for the base model, no salt)."""
        out: list[dict[str, object]] = []
        for h, bid in self._by_hash.items():
            b = self._blocks[bid]
            out.append(
                {
                    "hash": h,
                    "parent": b.parent,
                    "tokens": list(b.tokens),
                    "lora_name": b.tenancy.lora_name or None,
                    "cache_salt": b.tenancy.cache_salt or None,
                }
            )
        return out

    def host_snapshot(self) -> list[dict[str, object]]:
        """Every block of the host tier, in :meth:`snapshot`'s shape."""
        return [
            {
                "hash": h,
                "parent": c.parent,
                "tokens": list(c.tokens),
                "lora_name": c.tenancy.lora_name or None,
                "cache_salt": c.tenancy.cache_salt or None,
            }
            for h, c in self._host.items()
        ]

    # --- mutations -------------------------------------------------------------

    def allocate(
        self, request_id: str, tokens: Sequence[int], reserve_tokens: int = 0, tenancy: Tenancy = _BASE
    ) -> tuple[int, int]:
        """Pin the cached prefix of ``tokens`` (among ``tenancy``'s blocks)
        and take blocks for the rest.

        Room is taken for ``len(tokens) + reserve_tokens`` tokens (the shell
        reserves the request's output up front, so there is no preemption).
        As in vLLM, at most ``len(tokens) - 1`` prompt tokens count as a hit:
        the last prompt token is always computed to produce the first output.
        The blocks right past the GPU prefix that the host tier holds are
        loaded into fresh blocks (:meth:`host_hit_blocks` says how many).
        Returns ``(hit_blocks, new_blocks)``: GPU hits, and fresh blocks
        (loaded ones included). Raises :class:`NotEnoughBlocks` (changing
        nothing) if the pool cannot supply the fresh blocks now.
        """
        if request_id in self._reqs:
            raise ValueError(f"request {request_id!r} already holds blocks")
        if not tokens:
            raise ValueError("empty prompt")
        bs = self.block_size
        chain = self.chain_hashes(tokens, tenancy=tenancy)
        max_hit = (len(tokens) - 1) // bs
        hits: list[int] = []
        for h in chain[:max_hit]:
            bid = self._by_hash.get(h)
            if bid is None:
                break
            hits.append(bid)
        # Copies read before any block is taken: taking one may evict to the
        # host tier and push one of these out of it.
        loads: list[tuple[int, _HostBlock]] = []
        for h in chain[len(hits) : max_hit]:
            copy = self._host.get(h)
            if copy is None or h in self._by_hash:
                break
            loads.append((h, copy))
        total = self.blocks_needed(len(tokens) + max(0, reserve_tokens))
        need = total - len(hits)
        hits_evictable = sum(1 for bid in hits if self._blocks[bid].ref == 0)
        if need > len(self._free) + len(self._lru) - hits_evictable:
            raise NotEnoughBlocks(
                f"need {need} blocks, {len(self._free)} free and {len(self._lru) - hits_evictable} evictable"
            )
        for bid in hits:
            self._pin(bid)
        new_ids = [self._take_block() for _ in range(need)]
        self._load(loads, new_ids, len(hits), tenancy)
        self._reqs[request_id] = _Req(
            blocks=hits + new_ids,
            chain=chain,
            committed=len(hits) + len(loads),
            hit_blocks=len(hits),
            host_blocks=len(loads),
            tenancy=tenancy,
        )
        return len(hits), need

    def _load(
        self, loads: list[tuple[int, _HostBlock]], bids: list[int], first: int, tenancy: Tenancy
    ) -> None:
        """Fill ``bids`` with the host copies ``loads`` (the request's blocks
        ``first``, ``first + 1``, ...): cached on the GPU again, one event."""
        if not loads:
            return
        tokens: list[int] = []
        for (h, copy), bid in zip(loads, bids):
            b = self._blocks[bid]
            b.hash, b.parent, b.tokens, b.tenancy = h, copy.parent, copy.tokens, copy.tenancy
            self._by_hash[h] = bid
            tokens.extend(copy.tokens)
            if h in self._host:
                self._host.move_to_end(h)
        hashes: list[EngineHash] = [h for h, _ in loads]
        self._events.append(self._stored(hashes, loads[0][1].parent, tokens, tenancy, first))

    def commit_full_blocks(
        self, request_id: str, tokens_so_far: Sequence[int], num_tokens: int | None = None
    ) -> list[BlockStored]:
        """Cache the request's blocks that ``tokens_so_far`` (prompt + output
        whose KV is computed) has filled since the last call.

        ``num_tokens`` limits it to a prefix of ``tokens_so_far`` without the
        caller copying it (the common call fills no new block: O(1)).
        """
        req = self._reqs[request_id]
        bs = self.block_size
        n = len(tokens_so_far) if num_tokens is None else min(num_tokens, len(tokens_so_far))
        n_full = min(n // bs, len(req.blocks))
        if n_full <= req.committed:
            return []
        if not req.caching:
            req.committed = n_full
            return []
        # extend the hash chain over the newly full blocks
        parent = req.chain[-1] if req.chain else self._root_of(req.tenancy)
        for i in range(len(req.chain), n_full):
            parent = engine_block_hash(parent, tokens_so_far[i * bs : (i + 1) * bs])
            req.chain.append(parent)
        stored: list[BlockStored] = []
        run_hashes: list[EngineHash] = []  # always ints here; the event type also admits bytes
        run_tokens: list[int] = []
        run_parent: int | None = None
        run_first = 0  # the request's block index of the run's first block
        for i in range(req.committed, n_full):
            h = req.chain[i]
            parent_h = req.chain[i - 1] if i > 0 else None
            block_tokens = tuple(tokens_so_far[i * bs : (i + 1) * bs])
            existing = self._by_hash.get(h)
            if existing is not None:
                # Someone cached the same block meanwhile: share theirs, free ours.
                own = req.blocks[i]
                if existing != own:
                    self._pin(existing)
                    req.blocks[i] = existing
                    self._unpin(own)
                if run_hashes:
                    stored.append(self._stored(run_hashes, run_parent, run_tokens, req.tenancy, run_first))
                    run_hashes, run_tokens = [], []
                continue
            b = self._blocks[req.blocks[i]]
            b.hash, b.parent, b.tokens, b.tenancy = h, parent_h, block_tokens, req.tenancy
            self._by_hash[h] = b.block_id
            if not run_hashes:
                run_parent, run_first = parent_h, i
            run_hashes.append(h)
            run_tokens.extend(block_tokens)
        if run_hashes:
            stored.append(self._stored(run_hashes, run_parent, run_tokens, req.tenancy, run_first))
        req.committed = n_full
        self._events.extend(stored)
        return stored

    def release(self, request_id: str) -> None:
        """Unpin a finished or aborted request's blocks (cached ones stay, LRU)."""
        req = self._reqs.pop(request_id, None)
        if req is None:
            return
        # Tail first, so the tail is evicted before the shared prefix.
        for bid in reversed(req.blocks):
            self._unpin(bid)

    def clear(self) -> AllBlocksCleared:
        """Drop every cached block (vLLM's reset_prefix_cache).

        Blocks still pinned by running requests keep their data but stop being
        cached; those requests cache nothing more, so no later ``BlockStored``
        can name a parent the receiver was told to forget.
        """
        for bid in self._by_hash.values():
            b = self._blocks[bid]
            b.hash, b.parent, b.tokens, b.tenancy = None, None, (), _BASE
        self._by_hash.clear()
        self._host.clear()
        self._free.extend(reversed(self._lru))
        self._lru.clear()
        for req in self._reqs.values():
            req.caching = False
        ev = AllBlocksCleared()
        self._events.append(ev)
        return ev

    def drain_events(self) -> list[KVEvent]:
        """All events since the last call, in the order they happened."""
        ev, self._events = self._events, []
        return ev

    # --- internals ---------------------------------------------------------------

    def _stored(
        self,
        hashes: list[EngineHash],
        parent: int | None,
        tokens: list[int],
        tenancy: Tenancy,
        first: int,
        medium: str = MEDIUM_GPU,
    ) -> BlockStored:
        lora = tenancy.lora_name or None
        return BlockStored(
            block_hashes=hashes,
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=self.block_size,
            lora_id=self._lora_ids.get(lora) if lora else None,
            medium=medium,
            lora_name=lora,
            extra_keys=event_extra_keys(tenancy, first, len(hashes)),
        )

    def _offload(self, b: _Block) -> None:
        """Copy an evicted GPU block to the host tier (dropping the tier's
        least recently used block when it is full)."""
        h = b.hash
        assert h is not None
        if h in self._host:
            self._host.move_to_end(h)
            return
        if len(self._host) >= self.num_host_blocks:
            old, _ = self._host.popitem(last=False)
            self._host_evictions += 1
            self._events.append(BlockRemoved(block_hashes=[old], medium=MEDIUM_CPU))
        self._host[h] = _HostBlock(b.parent, b.tokens, b.tenancy)
        # A first block (no parent) carries the tenancy's salt in its extra keys.
        first = 0 if b.parent is None else 1
        self._events.append(self._stored([h], b.parent, list(b.tokens), b.tenancy, first, MEDIUM_CPU))

    def _pin(self, bid: int) -> None:
        b = self._blocks[bid]
        if b.ref == 0 and b.hash is not None:
            del self._lru[bid]
        b.ref += 1

    def _unpin(self, bid: int) -> None:
        b = self._blocks[bid]
        b.ref -= 1
        if b.ref > 0:
            return
        if b.hash is not None:
            self._lru[bid] = None  # most recently used end
        else:
            self._free.append(bid)

    def _take_block(self) -> int:
        if self._free:
            bid = self._free.pop()
        else:
            bid, _ = self._lru.popitem(last=False)
            b = self._blocks[bid]
            assert b.hash is not None
            del self._by_hash[b.hash]
            if self.num_host_blocks:
                self._offload(b)
            self._events.append(BlockRemoved(block_hashes=[b.hash], medium=MEDIUM_GPU))
            self._evictions += 1
            b.hash, b.parent, b.tokens, b.tenancy = None, None, (), _BASE
        self._blocks[bid].ref = 1
        return bid


def snapshot_router_hashes(
    snapshot: list[dict[str, object]],
    model: str,
    lora_name: str | None = None,
    of: Collection[object] | None = None,
) -> set[int]:
    """Router block hashes of the blocks in a :meth:`PrefixCache.snapshot` (or
    the engine's ``GET /admin/cache``): what a correct router index holds for
    this engine. Each block is chained through its parent, as the router does;
    a first block is seeded by its row's adapter and salt (``lora_name`` for
    rows without them). ``of``: only these engine hashes' (the host tier's,
    say, out of a snapshot of both tiers: a parent can be on either)."""
    from blocks.hashing import chain_hash, root_seed

    by_hash = {b["hash"]: b for b in snapshot}

    def seed(row: dict[str, object]) -> int:
        lora = row.get("lora_name", lora_name)
        salt = row.get("cache_salt")
        return root_seed(
            model, lora if isinstance(lora, str) else None, salt if isinstance(salt, str) else None
        )

    memo: dict[object, int] = {}
    for start in by_hash:
        path = []  # walk up to a known ancestor, then hash down (no recursion)
        h: object = start
        while h not in memo:
            path.append(h)
            parent = by_hash[h]["parent"]
            if parent is None:
                break
            h = parent
        for h in reversed(path):
            parent = by_hash[h]["parent"]
            row = by_hash[h]
            memo[h] = chain_hash(seed(row) if parent is None else memo[parent], row["tokens"])  # type: ignore[arg-type]  # snapshot rows are JSON-shaped dicts
    if of is not None:
        return {memo[h] for h in of}
    return set(memo.values())
