"""Native or pure Python: the owner's per-frame routine (decode a KV-event
frame, hash its blocks, map engine hashes to router hashes) in Rust when
the ``kvmesh_native`` module is built (``native/``, ``make install`` builds
it when ``cargo`` is present), else in Python.

The pure-Python path (:func:`engine_adapters.kv_events.decode_batch`,
:class:`engine_adapters.block_mapper.BlockMapper`) is the reference: the
native one returns the same batches, deltas, statistics and skips with
their reasons (tests/unit/test_native_parity.py feeds both the same random
frames). The one difference is the wording of an ``undecodable`` skip's
detail and of an envelope's error, which the Python path takes from msgspec.
Nesting deeper than 1,024 levels is an :class:`EventDecodeError` here; the
Python path raises RecursionError near Python's recursion limit.

``KVMESH_PURE_PYTHON=1`` in the environment (read at import) makes
:func:`decode_batch`, :func:`new_mapper` and :func:`map_frame` take the
Python path although the module is built; :class:`NativeBlockMapper` and
:func:`decode_batch_native` stay usable (the tests compare the two).

:func:`map_frame_packed` (native only) gives a frame's delta as the log
entry that holds it, a :class:`PackedEntry` whose ``raw`` is what
``mesh.engine_log.entry.encode_entry([delta])`` writes, byte for byte, so
the owner appends and applies it with no Python object per block.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any, NamedTuple

import msgspec
import structlog

from blocks.block_map import BlockMap, MappedBlock
from blocks.delta import EngineHash, KvDelta, KvOp, PackedEntry
from blocks.native import pure_python_forced
from engine_adapters import kv_events
from engine_adapters.block_mapper import BlockMapper, MapperStats, tenancy
from engine_adapters.kv_events import (
    SKIP_BLOCK_SIZE_MISMATCH,
    AllBlocksCleared,
    BatchEvent,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    KVEventBatch,
    SkippedEvent,
)

__all__ = [
    "IMPLEMENTATION",
    "NATIVE",
    "NATIVE_BUILT",
    "Frame",
    "NativeBlockMapper",
    "PackedEntry",
    "decode_batch",
    "decode_batch_native",
    "map_frame",
    "map_frame_packed",
    "new_mapper",
]

log = structlog.get_logger(__name__)


def _load() -> tuple[ModuleType | None, str]:
    try:
        import kvmesh_native  # optional: built only where cargo is
    except ImportError as e:
        return None, f"the native module is not built ({e}); `make install` builds it where cargo is"
    return kvmesh_native, "built"


_native, NOT_BUILT_REASON = _load()
NATIVE_BUILT: bool = _native is not None
# Whether decode_batch / new_mapper / map_frame take the native path.
NATIVE: bool = NATIVE_BUILT and not pure_python_forced()
IMPLEMENTATION = "native" if NATIVE else "python"


class Frame(NamedTuple):
    """What a caller needs of a decoded batch besides its delta."""

    ts: float
    events: int  # events in the batch, skipped ones included
    rank: int


def _any_check(raw: bytes) -> None:
    """Values of ``extra_keys`` the native reader leaves to msgspec (ext
    values, container map keys): refused when msgspec refuses them."""
    msgspec.msgpack.decode(raw)


def _module() -> Any:
    if _native is None:
        raise RuntimeError(NOT_BUILT_REASON)
    return _native


# --- decoding --------------------------------------------------------------------


def _event(t: tuple[Any, ...]) -> BatchEvent:
    tag = t[0]
    if tag == "S":
        return BlockStored(
            block_hashes=t[1],
            parent_block_hash=t[2],
            token_ids=t[3],
            block_size=t[4],
            lora_id=t[5],
            medium=t[6],
            lora_name=t[7],
            extra_keys=None if t[8] is None else msgspec.msgpack.decode(t[8]),
            group_idx=t[9],
            cache_salt=t[10],
            locality=t[11],
            ownership=t[12],
            lookahead_token_ids=t[13],
        )
    if tag == "R":
        return BlockRemoved(block_hashes=t[1], medium=t[2], group_idx=t[3], locality=t[4], ownership=t[5])
    if tag == "C":
        return AllBlocksCleared()
    return SkippedEvent(t[1], t[2], t[3])


def decode_batch_native(payload: bytes) -> KVEventBatch:
    """:func:`engine_adapters.kv_events.decode_batch`, decoded in Rust."""
    try:
        ts, dp_rank, attn_rank, events = _module().decode_frame(payload, _any_check)
    except ValueError as e:
        raise EventDecodeError(str(e)) from None
    return KVEventBatch(
        ts=ts, events=[_event(t) for t in events], data_parallel_rank=dp_rank, attn_dp_rank=attn_rank
    )


# --- mapping ---------------------------------------------------------------------


def _event_tuple(ev: object) -> tuple[Any, ...]:
    """An event as the native mapper takes it; a store's tenancy is read
    here (by block_mapper's own :func:`tenancy`), and only for a first block."""
    if isinstance(ev, BlockStored):
        lora, salt = tenancy(ev) if ev.parent_block_hash is None else (None, None)
        return ("S", ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size, ev.medium,
                ev.locality, lora, salt, ev.group_idx)  # fmt: skip
    if isinstance(ev, BlockRemoved):
        return ("R", ev.block_hashes, ev.medium, ev.locality, ev.group_idx)
    if isinstance(ev, AllBlocksCleared):
        return ("C",)
    if isinstance(ev, SkippedEvent):
        return ("K", ev.index, ev.reason, ev.detail)
    return ("X",)  # not an event: ignored, as map_batch ignores it


class NativeBlockMapper(BlockMapper):
    """:class:`BlockMapper` with its state and its ``map_batch`` in Rust,
    and :meth:`map_frame`, which decodes and maps a frame in one call
    without making an event object. ``block_map`` and ``stats`` are
    snapshots made when read (the state lives in Rust)."""

    def __init__(self, model: str, worker: str = "", block_size: int | None = None) -> None:
        # BlockMapper.__init__ is not called: its state would be unused.
        self.model = model
        self.worker = worker
        self._core = _module().NativeMapper(model, block_size, (Frame, KvDelta, KvOp))
        self._skips_logged: set[str] = set()
        self._stats: MapperStats | None = None  # made when read, dropped when the state changes

    # The mapper's state is in Rust: these properties read and write it there.
    @property
    def block_size(self) -> int | None:
        size: int | None = self._core.block_size
        return size

    @block_size.setter
    def block_size(self, value: int | None) -> None:
        self._core.block_size = value

    @property
    def stats(self) -> MapperStats:
        if self._stats is not None:
            return self._stats
        (stored, removed, cleared, unknown_parent, unknown_removed, invalid_tokens, placeholder_blocks,
         skipped_events, by_reason, mismatch) = self._core.stats()  # fmt: skip
        self._stats = MapperStats(
            stored=stored,
            removed=removed,
            cleared=cleared,
            unknown_parent=unknown_parent,
            unknown_removed=unknown_removed,
            invalid_tokens=invalid_tokens,
            placeholder_blocks=placeholder_blocks,
            skipped_events=skipped_events,
            skipped_by_reason=by_reason,
            block_size_mismatch=mismatch,
        )
        return self._stats

    @stats.setter
    def stats(self, value: MapperStats) -> None:
        raise AttributeError("the native mapper's statistics are read-only")

    @property
    def block_map(self) -> BlockMap:
        return BlockMap.from_pairs(self._core.export())

    @block_map.setter
    def block_map(self, value: BlockMap) -> None:
        self._core.restore(value.pairs())

    def __len__(self) -> int:
        n: int = len(self._core)
        return n

    def router_hash(self, engine_hash: EngineHash) -> int | None:
        rh: int | None = self._core.router_hash(engine_hash)
        return rh

    def live_router_hashes(self) -> set[int]:
        live: set[int] = self._core.live()
        return live

    def live_by_tier(self) -> dict[int, set[int]]:
        by_tier: dict[int, set[int]] = self._core.live_by_tier()
        return by_tier

    def clear(self) -> None:
        self._core.clear()
        self._stats = None

    def export(self) -> list[MappedBlock]:
        pairs: list[MappedBlock] = self._core.export()
        return pairs

    def restore(self, pairs: Iterable[MappedBlock]) -> None:
        self._core.restore(pairs)
        self._stats = None

    def map_batch(self, events: Iterable[BatchEvent], seq: int) -> KvDelta:
        self._stats = None
        delta, notes = self._core.map_events([_event_tuple(ev) for ev in events], self.worker, seq)
        if notes:
            self._log(notes, seq)
        return delta

    def map_frame(self, payload: bytes, seq: int) -> tuple[Frame, KvDelta]:
        """Decode ``payload`` and map its events: ``decode_batch`` then
        ``map_batch`` in one native call. EventDecodeError as decode_batch."""
        frame, delta = self._mapped(self._core.map_frame, payload, seq)
        return frame, delta

    def map_frame_packed(self, payload: bytes, seq: int) -> tuple[Frame, PackedEntry]:
        """:meth:`map_frame` with the delta as one log entry: a
        :class:`PackedEntry` holding ``KvDelta(self.worker, seq, ops)``, its
        ``raw`` equal to ``encode_entry`` of that delta. EventDecodeError as
        decode_batch; TypeError or OverflowError for a seq no entry holds
        (not an int in [-1, 2**64)); then nothing is applied."""
        frame, entry = self._mapped(self._core.map_frame_packed, payload, seq)
        return frame, entry

    def _mapped(self, call: Any, payload: bytes, seq: int) -> tuple[Frame, Any]:
        """One of the core's frame calls: (Frame, what it mapped to), its notes logged."""
        self._stats = None
        try:
            frame, out, notes = call(payload, self.worker, seq, _any_check)
        except ValueError as e:
            raise EventDecodeError(str(e)) from None
        if notes:
            self._log(notes, seq)
        return frame, out

    def _log(self, notes: list[tuple[str, int, str, str]], seq: int) -> None:
        """What BlockMapper logs while mapping, from the native mapper's notes."""
        for what, n, reason, detail in notes:
            if what == "skipped":
                # As BlockMapper._skip: the first skip of each reason is a warning.
                first = reason not in self._skips_logged and reason != SKIP_BLOCK_SIZE_MISMATCH
                self._skips_logged.add(reason)
                (log.warning if first else log.debug)(
                    "adapter.event_skipped",
                    worker=self.worker,
                    seq=seq,
                    index=n,
                    reason=reason,
                    detail=detail,
                )
            elif what == "unknown_parent":
                log.debug("adapter.unknown_parent", worker=self.worker, seq=seq, blocks=n)
            else:
                log.warning("adapter.invalid_token_ids", worker=self.worker, seq=seq, error=detail)


# --- the choice ------------------------------------------------------------------


def decode_batch(payload: bytes) -> KVEventBatch:
    """``decode_batch`` of the chosen implementation."""
    if NATIVE:
        return decode_batch_native(payload)
    return kv_events.decode_batch(payload)


def new_mapper(model: str, worker: str = "", block_size: int | None = None) -> BlockMapper:
    """A block mapper of the chosen implementation."""
    if NATIVE:
        return NativeBlockMapper(model, worker, block_size)
    return BlockMapper(model, worker, block_size)


def map_frame(mapper: BlockMapper, payload: bytes, seq: int) -> tuple[Frame, KvDelta]:
    """Decode one engine frame and map it with ``mapper`` (natively in one
    call when it is a :class:`NativeBlockMapper`). EventDecodeError when
    the envelope is unreadable; then nothing is applied."""
    if isinstance(mapper, NativeBlockMapper):
        return mapper.map_frame(payload, seq)
    batch = kv_events.decode_batch(payload)
    return Frame(batch.ts, len(batch.events), batch.rank), mapper.map_batch(batch.events, seq)


def map_frame_packed(mapper: BlockMapper, payload: bytes, seq: int) -> tuple[Frame, PackedEntry]:
    """:func:`map_frame` giving the delta as one log entry (see
    :meth:`NativeBlockMapper.map_frame_packed`). Native only: TypeError for
    any other mapper."""
    if not isinstance(mapper, NativeBlockMapper):
        raise TypeError(f"packed entries need a NativeBlockMapper, got {type(mapper).__name__}")
    return mapper.map_frame_packed(payload, seq)
