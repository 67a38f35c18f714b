"""Packed entries: a replicated log entry decoded natively, for the index.

A non-owner applies every entry of every engine's log to its prefix index.
The reference path decodes an entry into ``KvDelta`` objects (two Python
ints per block) and validates them (:func:`mesh.engine_log.entry.decode_or_skip`).
In *packed* mode the native module (``native/src/entry.rs``) decodes and
validates the entry in one call, accepting and refusing exactly what the
reference does, and keeps its blocks in Rust: a :class:`PackedEntry`, which
``NativeIndex.apply_packed`` applies in one call (``PrefixIndex.apply_packed``
applies its ``to_deltas()``). Only ``(worker, seq)`` per delta (``heads``)
becomes Python objects, for the replica's and the core's bookkeeping.

Packed mode is a choice per node (``MeshConfig.packed_entries``; a router
node takes it exactly when its index is native): nothing on the wire
changes, so a mixed mesh converges. It is available when the module is
built; :data:`PACKED` (the default) also needs ``KVMESH_PURE_PYTHON=1``
unset, read at import.

What the index receives is an :data:`IndexChange`: a ``KvDelta`` (the
reference path, and the CLEARs of an epoch switch in either mode) or a
:class:`PackedEntry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import structlog

from blocks.delta import KvDelta, PackedEntry
from blocks.native import pure_python_forced
from mesh.engine_log.epoch import Epoch

__all__ = [
    "PACKED",
    "PACKED_BUILT",
    "IndexChange",
    "PackedEntry",
    "change_blocks",
    "decode_packed",
    "heads_of",
    "join_packed",
    "native_live_maps",
]

log = structlog.get_logger(__name__)

# Typed as Any: the module's stub types it where it is built, and the
# fallback must type-check where it is not.
_native: Any
try:
    import kvmesh_native as _native  # optional: built only where cargo is
except ImportError:
    _native = None

PACKED_BUILT: bool = _native is not None
# The default of MeshConfig.packed_entries.
PACKED: bool = PACKED_BUILT and not pure_python_forced()


IndexChange: TypeAlias = KvDelta | PackedEntry


def decode_packed(engine_id: str, epoch: Epoch, raw: bytes | bytearray) -> PackedEntry | None:
    """:func:`mesh.engine_log.entry.decode_or_skip`, packed: None (logged) for
    an entry the reference would skip."""
    decode = _need_native("packed entries").decode_entry
    try:
        entry: PackedEntry = decode(engine_id, raw)
    except (ValueError, TypeError) as e:
        # The single writer validates before writing, so this is corruption or a
        # foreign writer; skipping keeps the rest of the log usable.
        log.error("engine_log.entry_skipped", engine=engine_id, epoch=epoch, error=str(e))
        return None
    return entry


def change_blocks(change: IndexChange) -> int:
    """Router hashes in all ops of ``change``."""
    if isinstance(change, KvDelta):
        return sum(len(op.hashes) for op in change.ops)
    return change.blocks


def heads_of(change: IndexChange) -> Iterable[tuple[str, int]]:
    """``(worker, seq)`` of each delta of ``change``."""
    if isinstance(change, KvDelta):
        return ((change.worker, change.seq),)
    return change.heads


def workers_of(change: IndexChange) -> set[str]:
    """The workers ``change`` has deltas of (a burst's entry: one or a few)."""
    if isinstance(change, KvDelta):
        return {change.worker}
    return {w for w, _ in change.heads}


def as_one_entry(changes: Sequence[IndexChange]) -> Sequence[IndexChange]:
    """Several packed entries as the one entry appending them writes (the
    index then applies it in one call); anything else as it is."""
    packed = [c for c in changes if not isinstance(c, KvDelta)] if len(changes) > 1 else []
    if len(packed) == len(changes) > 1:
        return [join_packed(packed)]
    return changes


def _need_native(what: str) -> Any:
    if _native is None:
        raise RuntimeError(f"{what} need the native module (native/, `make install`)")
    return _native


def join_packed(entries: list[PackedEntry]) -> PackedEntry:
    """One entry holding the deltas of ``entries`` in order (what appending
    them as one entry writes; one entry is itself)."""
    joined: PackedEntry = _need_native("joined entries").join_entries(entries)
    return joined


def native_live_maps() -> Any:
    """An empty ``kvmesh_native.LiveMaps`` (:mod:`mesh.engine_log.live`)."""
    return _need_native("native live maps").LiveMaps()
