"""Engine block hash -> router block hash, for one worker (pure, no I/O).

Engines name blocks with their own hash function (vLLM: sha256/xxhash of
Python objects, SGLang: a signed SHA-256 chain). The router names a block by
the chained xxh3 of its token ids (``router.hashing``), so every node computes
the same id for a prompt without asking the engine. ``BlockStored`` carries
the token ids and the parent's engine hash, which is enough to translate: the
router hash of block i is ``chain_hash(router hash of block i-1, tokens of i)``
and the parent of the first block is the mapping of ``parent_block_hash`` (or
the model/LoRA/salt root seed when it is ``None``).

The map holds one entry per live block (removals forget it), so memory stays
proportional to the engine's cache, not to its history. Several engine blocks
can name the same router block (vLLM hashes multimodal inputs and extra keys
that the router does not see), so the router hash is reference-counted: it is
removed from the index only when its last engine block goes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from engine_adapters.kv_delta import OP_CLEAR, OP_REMOVE, OP_STORE, KvDelta, KvOp
from engine_adapters.kv_events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from router.hashing import block_hashes, root_seed

log = structlog.get_logger(__name__)


@dataclass
class MapperStats:
    stored: int = 0  # engine blocks mapped
    removed: int = 0  # engine blocks forgotten
    cleared: int = 0  # AllBlocksCleared seen
    unknown_parent: int = 0  # blocks skipped: parent never seen (or already evicted)
    unknown_removed: int = 0  # removals of hashes never mapped (ignored)
    invalid_tokens: int = 0  # blocks skipped: token ids the router cannot hash


def _cache_salt(event: BlockStored) -> str | None:
    """vLLM >= 0.24 puts ``cache_salt`` in the first block's typed extra keys
    (``{"type": "cache_salt", "salt": ...}``); SGLang has a field for it."""
    if event.cache_salt is not None:
        return event.cache_salt
    if not event.extra_keys:
        return None
    first = event.extra_keys[0]
    if isinstance(first, (list, tuple)):
        for key in first:
            if isinstance(key, dict) and key.get("type") == "cache_salt":
                value = key.get("salt")
                return value if isinstance(value, str) else None
    return None


class BlockMapper:
    """Translates one worker's engine events into router-hash ops."""

    def __init__(self, model: str, worker: str = "") -> None:
        self.model = model
        self.worker = worker
        self._to_router: dict[BlockHash, int] = {}
        self._refs: dict[int, int] = {}  # router hash -> live engine blocks naming it
        self._roots: dict[tuple[str | None, str | None], int] = {}
        self.stats = MapperStats()

    def __len__(self) -> int:
        return len(self._to_router)

    def router_hash(self, engine_hash: BlockHash) -> int | None:
        return self._to_router.get(engine_hash)

    def live_router_hashes(self) -> set[int]:
        return set(self._refs)

    def _root(self, lora_name: str | None, salt: str | None) -> int:
        key = (lora_name, salt)
        seed = self._roots.get(key)
        if seed is None:
            seed = self._roots[key] = root_seed(self.model, lora_name, salt)
        return seed

    # --- applying events -------------------------------------------------------

    def map_batch(self, events: Iterable[KVEvent], seq: int) -> KvDelta:
        """One ``KvDelta`` for one engine batch; ops keep the events' order
        (adjacent ops of the same kind are merged)."""
        ops: list[KvOp] = []
        kind = -1
        cur: list[int] = []

        def emit(k: int, hashes: list[int]) -> None:
            nonlocal kind, cur
            if k == kind and k != OP_CLEAR:
                cur.extend(hashes)
                return
            if kind != -1 and (cur or kind == OP_CLEAR):
                ops.append(KvOp(kind, cur))
            kind, cur = k, list(hashes)

        for ev in events:
            if isinstance(ev, BlockStored):
                replaced, stored = self._store(ev, seq)
                if replaced:
                    emit(OP_REMOVE, replaced)
                if stored:
                    emit(OP_STORE, stored)
            elif isinstance(ev, BlockRemoved):
                gone = self._remove(ev.block_hashes)
                if gone:
                    emit(OP_REMOVE, gone)
            elif isinstance(ev, AllBlocksCleared):
                self.clear()
                self.stats.cleared += 1
                emit(OP_CLEAR, [])
        if kind != -1 and (cur or kind == OP_CLEAR):
            ops.append(KvOp(kind, cur))
        return KvDelta(worker=self.worker, seq=seq, ops=ops)

    def _store(self, ev: BlockStored, seq: int) -> tuple[list[int], list[int]]:
        """(router hashes no longer live, router hashes newly live)."""
        if ev.parent_block_hash is None:
            parent: int | None = self._root(ev.lora_name, _cache_salt(ev))
        else:
            parent = self._to_router.get(ev.parent_block_hash)
        n = len(ev.block_hashes)
        if parent is None:
            self.stats.unknown_parent += n
            log.debug("kv_unknown_parent", worker=self.worker, seq=seq, blocks=n)
            return [], []
        try:
            hashes = block_hashes(ev.token_ids, ev.block_size, parent)
        except ValueError as e:
            self.stats.invalid_tokens += n
            log.warning("kv_invalid_token_ids", worker=self.worker, seq=seq, error=str(e))
            return [], []
        out: list[int] = []
        replaced: list[int] = []
        to_router, refs = self._to_router, self._refs
        for eh, rh in zip(ev.block_hashes, hashes):
            old = to_router.get(eh)
            if old == rh:
                continue  # stored again: already live
            if old is not None and self._unref(old):
                replaced.append(old)  # same engine hash, other content: engine reused it
            to_router[eh] = rh
            n_refs = refs.get(rh, 0) + 1
            refs[rh] = n_refs
            if n_refs == 1:  # newly live for the router
                out.append(rh)
        self.stats.stored += n
        return replaced, out

    def _unref(self, rh: int) -> bool:
        left = self._refs[rh] - 1
        if left:
            self._refs[rh] = left
            return False
        del self._refs[rh]
        return True

    def _remove(self, engine_hashes: Iterable[BlockHash]) -> list[int]:
        out: list[int] = []
        for eh in engine_hashes:
            rh = self._to_router.pop(eh, None)
            if rh is None:
                self.stats.unknown_removed += 1
                continue
            self.stats.removed += 1
            if self._unref(rh):
                out.append(rh)
        return out

    def clear(self) -> None:
        """Forget every block (engine cleared its cache, or the worker is reset)."""
        self._to_router.clear()
        self._refs.clear()

    # --- handover --------------------------------------------------------------

    def export(self) -> list[tuple[Any, int]]:
        """The live mapping as (engine hash, router hash) pairs, for handing a
        worker to another node (the new owner cannot rebuild it from events)."""
        return list(self._to_router.items())

    def restore(self, pairs: Iterable[tuple[Any, int]]) -> None:
        self.clear()
        for eh, rh in pairs:
            self._to_router[eh] = rh
            self._refs[rh] = self._refs.get(rh, 0) + 1
