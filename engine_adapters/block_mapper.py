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

An event the decoder could not use (a ``SkippedEvent``: unknown shape, a
store without token ids, ...) is counted by reason in :class:`MapperStats`
and logged as ``adapter.event_skipped``; the rest of its batch applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from blocks.block_map import BlockMap
from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, EngineHash, KvDelta, KvOp
from blocks.hashing import block_hashes, root_seed
from engine_adapters.kv_events import (
    AllBlocksCleared,
    BatchEvent,
    BlockRemoved,
    BlockStored,
    SkippedEvent,
)

log = structlog.get_logger(__name__)


@dataclass
class MapperStats:
    stored: int = 0  # engine blocks mapped
    removed: int = 0  # engine blocks forgotten
    cleared: int = 0  # AllBlocksCleared seen
    unknown_parent: int = 0  # blocks skipped: parent never seen (or already evicted)
    unknown_removed: int = 0  # removals of hashes never mapped (ignored)
    invalid_tokens: int = 0  # blocks skipped: token ids the router cannot hash
    skipped_events: int = 0  # events the decoder could not use (SkippedEvent)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)


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

    The ops carry the engine hashes too (``KvOp.ehashes``), so replaying a
    mapper's deltas onto an empty :class:`BlockMap` gives exactly its mapping:
    that is how the mesh hands a worker to a new owner (:meth:`from_pairs`).
    """

    def __init__(self, model: str, worker: str = "") -> None:
        self.model = model
        self.worker = worker
        self.block_map = BlockMap()
        self._roots: dict[tuple[str | None, str | None], int] = {}
        self.stats = MapperStats()
        self._skips_logged: set[str] = set()  # reasons already logged at warning level

    @classmethod
    def from_pairs(cls, model: str, worker: str, pairs: Iterable[tuple[EngineHash, int]]) -> BlockMapper:
        """A mapper that resumes a worker from its (engine hash, router hash)
        pairs, e.g. ``Takeover.mappings[worker]`` after a mesh handover."""
        m = cls(model, worker)
        m.restore(pairs)
        return m

    def __len__(self) -> int:
        return len(self.block_map)

    def router_hash(self, engine_hash: EngineHash) -> int | None:
        return self.block_map.to_router.get(engine_hash)

    def live_router_hashes(self) -> set[int]:
        return self.block_map.live()

    def _root(self, lora_name: str | None, salt: str | None) -> int:
        key = (lora_name, salt)
        seed = self._roots.get(key)
        if seed is None:
            seed = self._roots[key] = root_seed(self.model, lora_name, salt)
        return seed

    # --- applying events -------------------------------------------------------

    def map_batch(self, events: Iterable[BatchEvent], seq: int) -> KvDelta:
        """One ``KvDelta`` for one engine batch; ops keep the events' order
        (adjacent ops of the same kind are merged). Skipped events are
        counted and leave the others untouched."""
        ops: list[KvOp] = []
        kind = -1
        hs: list[int] = []
        ehs: list[EngineHash] = []
        owned = False  # hs/ehs are our own lists (else the caller's: copy before extending)

        def emit(k: int, hashes: list[int], ehashes: list[EngineHash]) -> None:
            nonlocal kind, hs, ehs, owned
            if k == kind and k != OP_CLEAR:
                if not owned:
                    hs, ehs, owned = list(hs), list(ehs), True
                hs.extend(hashes)
                ehs.extend(ehashes)
                return
            if kind != -1:
                ops.append(KvOp(kind, hs, ehs))
            kind, hs, ehs, owned = k, hashes, ehashes, False

        for ev in events:
            if isinstance(ev, BlockStored):
                self._store(ev, seq, emit)
            elif isinstance(ev, BlockRemoved):
                gone, egone = self._remove(ev.block_hashes)
                if egone:
                    emit(OP_REMOVE, gone, egone)
            elif isinstance(ev, AllBlocksCleared):
                self.clear()
                self.stats.cleared += 1
                emit(OP_CLEAR, [], [])
            elif isinstance(ev, SkippedEvent):
                self._skipped(ev, seq)
        if kind != -1:
            ops.append(KvOp(kind, hs, ehs))
        return KvDelta(worker=self.worker, seq=seq, ops=ops)

    def _store(
        self,
        ev: BlockStored,
        seq: int,
        emit: Callable[[int, list[int], list[EngineHash]], None],
    ) -> None:
        """Emit STORE of every new binding, in block order; an engine hash
        reused for other content is emitted as its REMOVE then its STORE."""
        m = self.block_map
        to_router = m.to_router
        if ev.parent_block_hash is None:
            parent: int | None = self._root(*tenancy(ev))
        else:
            parent = to_router.get(ev.parent_block_hash)
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
        if len(hashes) == n and m.bind_new(ehashes, hashes):
            if n:
                emit(OP_STORE, hashes, ehashes)
            return
        bind, unbind = m.bind, m.unbind
        hs: list[int] = []
        ehs: list[EngineHash] = []
        for eh, rh in zip(ehashes, hashes):
            old = to_router.get(eh)
            if old == rh:
                continue  # stored again: already live
            if old is not None:  # same engine hash, other content: engine reused it
                if hs:
                    emit(OP_STORE, hs, ehs)
                    hs, ehs = [], []
                _, dropped = unbind(eh)
                emit(OP_REMOVE, [old] if dropped else [], [eh])
            bind(eh, rh)
            hs.append(rh)
            ehs.append(eh)
        if hs:
            emit(OP_STORE, hs, ehs)

    def _skipped(self, ev: SkippedEvent, seq: int) -> None:
        st = self.stats
        st.skipped_events += 1
        st.skipped_by_reason[ev.reason] = st.skipped_by_reason.get(ev.reason, 0) + 1
        # The first skip of each reason is a warning; an engine that keeps
        # sending the same shape is then only counted (and logged at debug).
        first = ev.reason not in self._skips_logged
        self._skips_logged.add(ev.reason)
        (log.warning if first else log.debug)(
            "adapter.event_skipped",
            worker=self.worker,
            seq=seq,
            index=ev.index,
            reason=ev.reason,
            detail=ev.detail,
        )

    def _remove(self, engine_hashes: Iterable[EngineHash]) -> tuple[list[int], list[EngineHash]]:
        """(router hashes no longer live, engine hashes forgotten)."""
        out: list[int] = []
        eout: list[EngineHash] = []
        unbind = self.block_map.unbind
        for eh in engine_hashes:
            rh, dropped = unbind(eh)
            if rh is None:
                self.stats.unknown_removed += 1
                continue
            self.stats.removed += 1
            eout.append(eh)
            if dropped:
                out.append(rh)
        return out, eout

    def clear(self) -> None:
        """Forget every block (engine cleared its cache, or the worker is reset)."""
        self.block_map.clear()

    # --- handover --------------------------------------------------------------

    def export(self) -> list[tuple[EngineHash, int]]:
        """The live mapping as (engine hash, router hash) pairs, for handing a
        worker to another node (the new owner cannot rebuild it from events)."""
        return self.block_map.pairs()

    def restore(self, pairs: Iterable[tuple[EngineHash, int]]) -> None:
        """Replace the mapping with ``pairs`` (any order; a repeated engine
        hash keeps its last router hash)."""
        self.block_map = BlockMap.from_pairs(pairs)
