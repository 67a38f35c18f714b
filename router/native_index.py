"""Native or pure Python: the prefix index.

:class:`NativeIndex` is :class:`router.index.PrefixIndex` in Rust
(``native/src/index.rs``, built by ``make install`` where ``cargo`` is):
the same methods, results (keys in the same order) and errors, with each
block's holders an interned holder-set id instead of a bitmask, so a
thousand engines cost a block no more than two.
``tests/unit/test_native_index_parity.py`` feeds both the same random
operations and compares every answer.

One difference: block hashes are unsigned 64-bit ints (router hashes are);
``store`` refuses any other value, where ``PrefixIndex`` would keep it.
A bound (``max_blocks``) drops the same blocks in both.

:func:`new_index` makes the index of the chosen implementation: native when
the module is built and ``KVMESH_PURE_PYTHON=1`` is not set (read at
import), else :class:`PrefixIndex`.
"""

from __future__ import annotations

from typing import Any

import structlog

from blocks.delta import KvDelta
from blocks.native import pure_python_forced
from router.index import PrefixIndex

__all__ = ["NATIVE_INDEX", "NATIVE_INDEX_BUILT", "NativeIndex", "apply_change", "new_index"]

log = structlog.get_logger(__name__)

# Typed as Any: the module's stub types it where it is built, and the
# fallback must type-check where it is not.
_Core: Any
try:
    from kvmesh_native import NativeIndex as _Core  # optional: built only where cargo is
except ImportError:
    _Core = None

NATIVE_INDEX_BUILT: bool = _Core is not None
# Whether new_index makes a NativeIndex.
NATIVE_INDEX: bool = NATIVE_INDEX_BUILT and not pure_python_forced()

if _Core is not None:

    class NativeIndex(_Core):
        """:class:`router.index.PrefixIndex`, natively (see the module docstring)."""

        def apply(self, delta: Any) -> None:
            """Apply one engine batch (``KvDelta``), ops in order; every op is
            checked before any is applied, so a malformed delta raises
            ``ValueError`` and leaves the index untouched."""
            for n in self._apply(delta):
                log.debug("router.worker_cleared", worker=delta.worker, seq=delta.seq, blocks=n)

        def apply_packed(self, entry: Any) -> None:
            """Apply a log entry decoded natively (``mesh.engine_log.packed``):
            each of its deltas, in order, as :meth:`apply` does, in one call
            that makes no Python object per block."""
            for i, n in self._apply_packed(entry):
                worker, seq = entry.heads[i]
                log.debug("router.worker_cleared", worker=worker, seq=seq, blocks=n)

else:
    NativeIndex = None  # type: ignore[misc,assignment]  # not built: new_index serves PrefixIndex


def new_index(max_blocks: int = 0) -> PrefixIndex | NativeIndex:
    """A prefix index of the chosen implementation (see the module docstring),
    bounded to ``max_blocks`` distinct GPU blocks (and as many lower-tier
    blocks; 0: no bound), least recently used dropped first."""
    if NATIVE_INDEX and NativeIndex is not None:
        return NativeIndex(max_blocks)
    return PrefixIndex(max_blocks)


def index_of(impl: str, max_blocks: int = 0) -> PrefixIndex | NativeIndex:
    """The index of ``impl`` ("native" or "python"), whatever
    ``KVMESH_PURE_PYTHON`` says (benchmarks and tests compare the two);
    RuntimeError for "native" when the module is not built."""
    if impl == "python":
        return PrefixIndex(max_blocks)
    if impl != "native":
        raise ValueError(f"no index implementation {impl!r} (native, python)")
    if NativeIndex is None:
        raise RuntimeError("the native module is not built (make native)")
    return NativeIndex(max_blocks)


def apply_change(index: PrefixIndex | NativeIndex, change: Any) -> None:
    """Apply one index change of the mesh (``mesh.engine_log.packed.IndexChange``:
    a ``KvDelta``, or a packed log entry) to either index. ValueError for a
    change the index refuses (nothing of that delta applied)."""
    if isinstance(change, KvDelta):
        index.apply(change)
    else:
        index.apply_packed(change)
