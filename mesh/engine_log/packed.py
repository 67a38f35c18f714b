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

from collections.abc import Iterable
from typing import Any, Protocol, TypeAlias

import structlog

from blocks.delta import KvDelta
from blocks.native import pure_python_forced
from mesh.engine_log.epoch import Epoch

__all__ = ["PACKED", "PACKED_BUILT", "IndexChange", "PackedEntry", "decode_packed", "heads_of"]

log = structlog.get_logger(__name__)

# Typed as Any: the module's stub types it where it is built, and the
# fallback must type-check where it is not.
_decode: Any
try:
    from kvmesh_native import decode_entry as _decode  # optional: built only where cargo is
except ImportError:
    _decode = None

PACKED_BUILT: bool = _decode is not None
# The default of MeshConfig.packed_entries.
PACKED: bool = PACKED_BUILT and not pure_python_forced()


class PackedEntry(Protocol):
    """``kvmesh_native.PackedEntry``: one decoded, validated entry (immutable)."""

    @property
    def heads(self) -> tuple[tuple[str, int], ...]:
        """``(worker, seq)`` of each delta, in order."""
        ...

    @property
    def blocks(self) -> int:
        """Router hashes in all its ops."""
        ...

    def __len__(self) -> int: ...

    def to_deltas(self) -> list[KvDelta]:
        """The entry as the reference decoder gives it."""
        ...


IndexChange: TypeAlias = KvDelta | PackedEntry


def decode_packed(engine_id: str, epoch: Epoch, raw: bytes | bytearray) -> PackedEntry | None:
    """:func:`mesh.engine_log.entry.decode_or_skip`, packed: None (logged) for
    an entry the reference would skip."""
    if _decode is None:
        raise RuntimeError("packed entries need the native module (native/, `make install`)")
    try:
        entry: PackedEntry = _decode(engine_id, raw)
    except (ValueError, TypeError) as e:
        # The single writer validates before writing, so this is corruption or a
        # foreign writer; skipping keeps the rest of the log usable.
        log.error("engine_log.entry_skipped", engine=engine_id, epoch=epoch, error=str(e))
        return None
    return entry


def heads_of(change: IndexChange) -> Iterable[tuple[str, int]]:
    """``(worker, seq)`` of each delta of ``change``."""
    if isinstance(change, KvDelta):
        return ((change.worker, change.seq),)
    return change.heads
