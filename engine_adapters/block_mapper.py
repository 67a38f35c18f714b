"""Engine block hash -> router block hash, for one worker (pure, no I/O).

Engines name blocks with their own hash function (vLLM: sha256/xxhash of
Python objects, SGLang: a signed SHA-256 chain). The router names a block by
the chained xxh3 of its token ids (``blocks.hashing``), so every node computes
the same id for a prompt without asking the engine. ``BlockStored`` carries
the token ids and the parent's engine hash, which is enough to translate: the
router hash of block i is ``chain_hash(router hash of block i-1, tokens of i)``
and the parent of the first block is the mapping of ``parent_block_hash`` (or
the model/LoRA/salt root seed when it is ``None``).

The block map (``blocks.block_map.BlockMap``) holds one entry per live block
(removals forget it), so memory stays proportional to the engine's cache, not
to its history. Several engine blocks can name the same router block (vLLM
hashes multimodal inputs and extra keys that the router does not see), so the
router hash is reference-counted: it is removed from the index only when its
last engine block goes. Every op lists the engine hashes it binds or forgets,
so the mapping itself travels with the deltas (see ``blocks.delta``).

Tenancy: blocks are shared only within one model, LoRA adapter and cache
salt, so the root seed of a first block (``parent_block_hash`` None) is
``root_seed(model, lora_name, cache_salt)`` of the request that stored it,
read from the event in every form the engines send (:func:`tenancy`):

- SGLang: the ``lora_name`` and ``cache_salt`` fields.
- vLLM 0.33: ``lora_name``, and ``extra_keys``, one entry per block,
  untagged: the first block's entry holds, in order, the LoRA name (when
  ``lora_name`` is set), ``(mm_identifier, offset)`` pairs, the cache salt
  and prompt-embeds digests (bytes); e.g. ``("tenant-1",)``,
  ``("sql-lora", "tenant-1")``, ``("sql-lora",)`` or ``None``. The salt is
  the one string that is not the LoRA name.
- Tagged keys, as vLLM hashes them internally (``("cache_salt", salt)``,
  ``("lora", name, path)``, ``("mm", id, offset)``) and as a map
  ``{"type": "cache_salt", "salt": ...}``: vLLM 0.24 and 0.33 publish neither,
  both are read so that a connector passing its keys through unconverted
  is not mistaken for an unsalted tenant.

Cache tiers: each event names its medium, and its blocks are bound,
forgotten and announced on that tier's map (``BlockMap.tier``): a host copy
of a block still on the GPU is a second binding of the same engine hash, and
a GPU removal leaves the host copy live (the ops carry the tier, see
``blocks.delta``). A store's parent may be on any tier (an engine hash names
content, so its router hash is the same on every tier). Repeated stores of a
block on a tier other than the GPU are counted, and it goes with the last
matching removal: vLLM's offloading announces a block once per chunk that
holds it and expects consumers to count (the counts are this node's; a new
owner starts from the log's mapping, one per block). vLLM's offloading
placeholders (a store without token ids) are mapped through the engine
hashes the mapper already knows on another tier.

KV-cache groups: a hybrid model (sliding-window and full-attention layers,
or attention and Mamba layers) has one KV-cache group per kind of layer, and
vLLM publishes each group's stores and removals with its ``group_idx``
under the same engine hashes (the group is not part of the published hash).
A group with a sliding window frees the blocks that fall out of its window
long before the full-attention group evicts them, so a block is live while
any group that stored it on the GPU still holds it: the mapper keeps each
GPU block's set of groups (a bit per group, only for blocks some group
other than 0 stored), and a removal forgets the block when its last group
removes it. A store or removal without ``group_idx`` (engines without
groups) acts on the block as a whole. The sets are the owner's: a new owner
starts from the log's mapping without them, and a block it restored goes
with the first removal by any group (a block another group still holds is
then routed as cold, never predicted where the engine no longer has it).

Block size: the mapper is given the size the engine is registered with (the
size every node hashes that engine's prompts at) and refuses a store of any
other size, as a skip with reason ``block_size_mismatch``: its blocks could
never match a prompt, and indexing them would only hide that. The size last
refused is kept in :attr:`MapperStats.block_size_mismatch` until a store of
the registered size maps again; the event adapter logs it and reports it.

An event the decoder could not use (a ``SkippedEvent``: unknown shape, a
medium no engine sends, ...) or the mapper cannot (a placeholder of blocks
it never saw, a block-size mismatch) is counted by reason in
:class:`MapperStats` and logged as ``adapter.event_skipped``; the rest of its
batch applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from blocks.block_map import BlockMap, MappedBlock
from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, EngineHash, KvDelta, KvOp
from blocks.hashing import block_hashes, root_seed
from blocks.tiers import TIER_GPU
from engine_adapters.kv_events import (
    SKIP_BLOCK_SIZE_MISMATCH,
    SKIP_NO_TOKEN_IDS,
    SKIP_UNDECODABLE,
    SKIP_UNKNOWN_MEDIUM,
    AllBlocksCleared,
    BatchEvent,
    BlockRemoved,
    BlockStored,
    SkippedEvent,
    tier_of,
)

log = structlog.get_logger(__name__)

# emit(kind, tier, router hashes, engine hashes): one op of a delta
_Emit = Callable[[int, int, list[int], list[EngineHash]], None]

MAX_GROUP = 63  # KV-cache groups 0..63: a block's groups are a 64-bit set
_GROUP_0 = 1  # the set of a GPU block no other group stored (the default)


@dataclass
class MapperStats:
    stored: int = 0  # engine blocks mapped (every tier)
    removed: int = 0  # engine blocks forgotten
    cleared: int = 0  # AllBlocksCleared seen
    unknown_parent: int = 0  # blocks skipped: parent never seen (or already evicted)
    unknown_removed: int = 0  # removals of hashes never mapped (ignored)
    invalid_tokens: int = 0  # blocks skipped: token ids the router cannot hash
    placeholder_blocks: int = 0  # of the stored: blocks of stores without token ids, mapped by hash
    skipped_events: int = 0  # events that could not be used (the decoder's and the mapper's skips)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    # The block size of the last store refused for not being the registered
    # one; 0 when none was, or once a store of the registered size mapped.
    block_size_mismatch: int = 0


def tenancy(event: BlockStored) -> tuple[str | None, str | None]:
    """``(lora_name, cache_salt)`` of the request that stored ``event``'s
    blocks, in every form the engines publish (module docstring)."""
    lora = event.lora_name or None
    if event.cache_salt is not None:  # SGLang
        return lora, event.cache_salt or None
    keys = event.extra_keys
    if not keys:
        return lora, None
    return lora, _salt_in(keys[0], lora)


def _salt_in(entry: Any, lora: str | None) -> str | None:
    """The cache salt in one block's vLLM extra keys, or None."""
    if not isinstance(entry, (list, tuple)):
        return None
    lora_seen = lora is None
    for key in entry:
        if isinstance(key, str):
            if not lora_seen and key == lora:
                lora_seen = True  # untagged: the LoRA name comes first
                continue
            return key or None
        if isinstance(key, (list, tuple)):
            # tagged ("cache_salt", salt); anything else is a tagged LoRA or
            # multimodal key or an untagged (mm_identifier, offset) pair
            if len(key) == 2 and key[0] == "cache_salt" and isinstance(key[1], str):
                return key[1] or None
        elif isinstance(key, dict) and key.get("type") == "cache_salt":
            salt = key.get("salt")
            return salt if isinstance(salt, str) and salt else None
    return None


class BlockMapper:
    """Translates one worker's engine events into router-hash ops.

    The ops carry the engine hashes and the tier too (``KvOp.ehashes``,
    ``KvOp.tier``), so replaying a mapper's deltas onto an empty
    :class:`BlockMap` gives exactly its mapping: that is how the mesh hands
    a worker to a new owner (:meth:`from_pairs`). ``block_size``: the size
    the engine is registered with (None: take any, for producers whose size
    is checked elsewhere).
    """

    def __init__(self, model: str, worker: str = "", block_size: int | None = None) -> None:
        self.model = model
        self.worker = worker
        self.block_size = block_size
        self.block_map = BlockMap()
        self._roots: dict[tuple[str | None, str | None], int] = {}
        # (tier, engine hash) -> announcements beyond the first, tiers other than the GPU
        self._repeats: dict[tuple[int, EngineHash], int] = {}
        # GPU engine hash -> the KV-cache groups holding it (a bit each), for
        # the blocks held by a group other than 0 (module docstring)
        self._groups: dict[EngineHash, int] = {}
        self._restored = False  # the mapping came from a handover: its blocks' groups are unknown
        self.stats = MapperStats()
        self._skips_logged: set[str] = set()  # reasons already logged at warning level

    @classmethod
    def from_pairs(
        cls, model: str, worker: str, pairs: Iterable[MappedBlock], block_size: int | None = None
    ) -> BlockMapper:
        """A mapper that resumes a worker from its mapped blocks (``BlockMap.pairs``),
        e.g. ``Takeover.mappings[worker]`` after a mesh handover."""
        m = cls(model, worker, block_size)
        m.restore(pairs)
        return m

    def __len__(self) -> int:
        return len(self.block_map)

    def router_hash(self, engine_hash: EngineHash) -> int | None:
        """The router hash of an engine block live on any tier, or None."""
        return self.block_map.router_hash(engine_hash)

    def live_router_hashes(self) -> set[int]:
        """The live router hashes on the GPU."""
        return self.block_map.live()

    def live_by_tier(self) -> dict[int, set[int]]:
        """Tier -> its live router hashes, for every tier with live blocks."""
        return self.block_map.live_by_tier()

    def _root(self, lora_name: str | None, salt: str | None) -> int:
        key = (lora_name, salt)
        seed = self._roots.get(key)
        if seed is None:
            seed = self._roots[key] = root_seed(self.model, lora_name, salt)
        return seed

    # --- applying events -------------------------------------------------------

    def map_batch(self, events: Iterable[BatchEvent], seq: int) -> KvDelta:
        """One ``KvDelta`` for one engine batch; ops keep the events' order
        (adjacent ops of the same kind and tier are merged). Skipped events
        are counted and leave the others untouched."""
        ops: list[KvOp] = []
        kind = -1
        tier = TIER_GPU
        hs: list[int] = []
        ehs: list[EngineHash] = []
        owned = False  # hs/ehs are our own lists (else the caller's: copy before extending)

        def emit(k: int, t: int, hashes: list[int], ehashes: list[EngineHash]) -> None:
            nonlocal kind, tier, hs, ehs, owned
            if k == kind and t == tier and k != OP_CLEAR:
                if not owned:
                    hs, ehs, owned = list(hs), list(ehs), True
                hs.extend(hashes)
                ehs.extend(ehashes)
                return
            if kind != -1:
                ops.append(KvOp(kind, hs, ehs, tier))
            kind, tier, hs, ehs, owned = k, t, hashes, ehashes, False

        for i, ev in enumerate(events):
            if isinstance(ev, BlockStored):
                self._on_stored(ev, i, seq, emit)
            elif isinstance(ev, BlockRemoved):
                self._on_removed(ev, i, seq, emit)
            elif isinstance(ev, AllBlocksCleared):
                self.clear()
                self.stats.cleared += 1
                emit(OP_CLEAR, TIER_GPU, [], [])
            elif isinstance(ev, SkippedEvent):
                self._skip(ev, seq)
        if kind != -1:
            ops.append(KvOp(kind, hs, ehs, tier))
        return KvDelta(worker=self.worker, seq=seq, ops=ops)

    def _on_stored(self, ev: BlockStored, index: int, seq: int, emit: _Emit) -> None:
        t = tier_of(ev.medium, ev.locality)
        if t is None:  # the decoder skips these; a hand-built event may not be
            self._skip(SkippedEvent(index, SKIP_UNKNOWN_MEDIUM, f"medium {ev.medium!r}"), seq)
        elif (bad := _bad_group(ev.group_idx)) is not None:
            self._skip(SkippedEvent(index, SKIP_UNDECODABLE, bad), seq)
        elif not ev.token_ids:
            if ev.block_hashes:
                self._placeholder(ev, t, index, seq, emit)
        elif self.block_size is not None and ev.block_size != self.block_size:
            self.stats.block_size_mismatch = ev.block_size
            detail = (
                f"BlockStored of {len(ev.block_hashes)} blocks of {ev.block_size} tokens; "
                f"the engine is registered with block_size {self.block_size}"
            )
            self._skip(SkippedEvent(index, SKIP_BLOCK_SIZE_MISMATCH, detail), seq)
        else:
            self.stats.block_size_mismatch = 0
            self._store(ev, t, seq, emit)

    def _on_removed(self, ev: BlockRemoved, index: int, seq: int, emit: _Emit) -> None:
        t = tier_of(ev.medium, ev.locality)
        if t is None:
            self._skip(SkippedEvent(index, SKIP_UNKNOWN_MEDIUM, f"medium {ev.medium!r}"), seq)
            return
        if (bad := _bad_group(ev.group_idx)) is not None:
            self._skip(SkippedEvent(index, SKIP_UNDECODABLE, bad), seq)
            return
        gone, egone = self._remove(ev.block_hashes, t, ev.group_idx)
        if egone:
            emit(OP_REMOVE, t, gone, egone)

    def _store(self, ev: BlockStored, t: int, seq: int, emit: _Emit) -> None:
        """Emit STORE of every new binding on tier ``t``, in block order; an
        engine hash reused for other content is emitted as its REMOVE then
        its STORE."""
        m = self.block_map if t == TIER_GPU else self.block_map.tier(t)
        to_router = m.to_router
        if ev.parent_block_hash is None:
            parent: int | None = self._root(*tenancy(ev))
        else:
            parent = to_router.get(ev.parent_block_hash)
            if parent is None:
                parent = self.block_map.router_hash(ev.parent_block_hash)
        ehashes = ev.block_hashes
        n = len(ehashes)
        if parent is None:
            self.stats.unknown_parent += n
            log.debug("adapter.unknown_parent", worker=self.worker, seq=seq, blocks=n)
            return
        try:
            hashes = block_hashes(ev.token_ids, ev.block_size, parent)
        except ValueError as e:
            self.stats.invalid_tokens += n
            log.warning("adapter.invalid_token_ids", worker=self.worker, seq=seq, error=str(e))
            return
        self.stats.stored += n
        # Fast path, a fresh prefill: every engine hash is new, bound in bulk,
        # and the op shares the event's list (emit copies before extending).
        g = ev.group_idx if t == TIER_GPU else None
        if len(hashes) == n and m.bind_new(ehashes, hashes):
            if g:
                self._groups.update(dict.fromkeys(ehashes, 1 << g))
            if n:
                emit(OP_STORE, t, hashes, ehashes)
            return
        self._bind_each(m, t, ehashes, hashes, emit, g)

    def _bind_each(
        self,
        m: BlockMap,
        t: int,
        ehashes: Iterable[EngineHash],
        hashes: Iterable[int],
        emit: _Emit,
        group: int | None = None,
    ) -> None:
        """Bind each pair on tier ``t``'s map ``m``, emitting what changed;
        ``group``: the KV-cache group storing them (GPU only)."""
        to_router = m.to_router
        bind, unbind = m.bind, m.unbind
        groups = self._groups
        bit = 1 << group if group is not None else 0
        hs: list[int] = []
        ehs: list[EngineHash] = []
        for eh, rh in zip(ehashes, hashes):
            old = to_router.get(eh)
            if old == rh:
                if t != TIER_GPU:  # announced again (see the module docstring)
                    key = (t, eh)
                    self._repeats[key] = self._repeats.get(key, 0) + 1
                elif bit > _GROUP_0 or (bit and groups):  # another group holds it too
                    held = groups.get(eh, _GROUP_0) | bit
                    if held != _GROUP_0:
                        groups[eh] = held
                continue  # stored again: already live
            if old is not None:  # same engine hash, other content: engine reused it
                if hs:
                    emit(OP_STORE, t, hs, ehs)
                    hs, ehs = [], []
                _, dropped = unbind(eh)
                self._repeats.pop((t, eh), None)
                if t == TIER_GPU:
                    groups.pop(eh, None)
                emit(OP_REMOVE, t, [old] if dropped else [], [eh])
            bind(eh, rh)
            if bit > _GROUP_0:
                groups[eh] = bit
            hs.append(rh)
            ehs.append(eh)
        if hs:
            emit(OP_STORE, t, hs, ehs)

    def _placeholder(self, ev: BlockStored, t: int, index: int, seq: int, emit: _Emit) -> None:
        """A store without token ids: mapped if every block is known (by its
        engine hash, on some tier), else skipped."""
        find = self.block_map.router_hash
        found = [find(eh) for eh in ev.block_hashes]
        hashes = [h for h in found if h is not None]
        unknown = len(found) - len(hashes)
        if unknown:
            detail = (
                f"BlockStored of {len(hashes)} blocks on {ev.medium} carries no token ids, "
                f"and {unknown} of its engine hashes were never stored with them"
            )
            self._skip(SkippedEvent(index, SKIP_NO_TOKEN_IDS, detail), seq)
            return
        self.stats.stored += len(hashes)
        self.stats.placeholder_blocks += len(hashes)
        m = self.block_map if t == TIER_GPU else self.block_map.tier(t)
        self._bind_each(m, t, ev.block_hashes, hashes, emit, ev.group_idx if t == TIER_GPU else None)

    def _skip(self, ev: SkippedEvent, seq: int) -> None:
        st = self.stats
        st.skipped_events += 1
        st.skipped_by_reason[ev.reason] = st.skipped_by_reason.get(ev.reason, 0) + 1
        # The first skip of each reason is a warning; an engine that keeps
        # sending the same shape is then only counted (and logged at debug).
        # A block-size mismatch has its own warning, once per engine, from
        # the event adapter (adapter.block_size_mismatch).
        first = ev.reason not in self._skips_logged and ev.reason != SKIP_BLOCK_SIZE_MISMATCH
        self._skips_logged.add(ev.reason)
        (log.warning if first else log.debug)(
            "adapter.event_skipped",
            worker=self.worker,
            seq=seq,
            index=ev.index,
            reason=ev.reason,
            detail=ev.detail,
        )

    def _remove(
        self, engine_hashes: Iterable[EngineHash], t: int, group: int | None = None
    ) -> tuple[list[int], list[EngineHash]]:
        """Forget blocks on tier ``t``: (router hashes no longer live there,
        engine hashes forgotten). ``group``: the KV-cache group removing
        them; on the GPU a block another group holds stays."""
        if t == TIER_GPU:
            m: BlockMap | None = self.block_map
        else:
            m = (self.block_map.lower or {}).get(t)
        out: list[int] = []
        eout: list[EngineHash] = []
        if m is None:
            self.stats.unknown_removed += sum(1 for _ in engine_hashes)
            return out, eout
        unbind = m.unbind
        repeats = self._repeats
        groups = self._groups if t == TIER_GPU else None
        for eh in engine_hashes:
            if groups is not None and (groups or group) and self._held_by_another(eh, group):
                continue
            if repeats and t != TIER_GPU:
                left = repeats.get((t, eh), 0)
                if left:  # still announced by another holder of it on this tier
                    if left == 1:
                        del repeats[(t, eh)]
                    else:
                        repeats[(t, eh)] = left - 1
                    continue
            rh, dropped = unbind(eh)
            if rh is None:
                self.stats.unknown_removed += 1
                continue
            self.stats.removed += 1
            eout.append(eh)
            if dropped:
                out.append(rh)
        return out, eout

    def _held_by_another(self, eh: EngineHash, group: int | None) -> bool:
        """``group`` removes GPU block ``eh``: whether another group still holds
        it (its set loses ``group``), else it goes (its set with it)."""
        groups = self._groups
        known = groups.pop(eh, None)
        if known is None:  # group 0's alone, or unknown since a handover: this group's
            known = 1 << group if self._restored and group is not None else _GROUP_0
        left = known & ~(1 << group) if group is not None else 0
        if left and left != _GROUP_0:
            groups[eh] = left
        return bool(left)

    def clear(self) -> None:
        """Forget every block, every tier (engine cleared its cache, or the worker is reset)."""
        self.block_map.clear()
        self._repeats.clear()
        self._groups.clear()
        self._restored = False

    # --- handover --------------------------------------------------------------

    def export(self) -> list[MappedBlock]:
        """The live mapping (``BlockMap.pairs``: GPU pairs, other tiers'
        triples), for handing a worker to another node (the new owner cannot
        rebuild it from events)."""
        return self.block_map.pairs()

    def restore(self, pairs: Iterable[MappedBlock]) -> None:
        """Replace the mapping with ``pairs`` (any order; a repeated engine
        hash keeps its last router hash on its tier)."""
        self.block_map = BlockMap.from_pairs(pairs)
        self._repeats.clear()
        self._groups.clear()
        self._restored = True


def _bad_group(group: int | None) -> str | None:
    """Why an event's ``group_idx`` cannot be a KV-cache group, or None."""
    if group is None or 0 <= group <= MAX_GROUP:
        return None
    return f"group_idx {group} is not a KV-cache group (0..{MAX_GROUP})"
