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

:func:`new_index` makes the index of the chosen implementation: native when
the module is built and ``KVMESH_PURE_PYTHON=1`` is not set (read at
import), else :class:`PrefixIndex`.
"""

from __future__ import annotations

import os
from typing import Any

import structlog

from engine_adapters.native import ENV_PURE_PYTHON
from router.index import PrefixIndex

__all__ = ["NATIVE_INDEX", "NATIVE_INDEX_BUILT", "NativeIndex", "new_index"]

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
NATIVE_INDEX: bool = NATIVE_INDEX_BUILT and os.environ.get(ENV_PURE_PYTHON, "") != "1"

if _Core is not None:

    class NativeIndex(_Core):
        """:class:`router.index.PrefixIndex`, natively (see the module docstring)."""

        def apply(self, delta: Any) -> None:
            """Apply one engine batch (``KvDelta``), ops in order; every op is
            checked before any is applied, so a malformed delta raises
            ``ValueError`` and leaves the index untouched."""
            for n in self._apply(delta):
                log.debug("router.worker_cleared", worker=delta.worker, seq=delta.seq, blocks=n)

else:
    NativeIndex = None  # type: ignore[misc,assignment]  # not built: new_index serves PrefixIndex


def new_index() -> PrefixIndex | NativeIndex:
    """A prefix index of the chosen implementation (see the module docstring)."""
    if NATIVE_INDEX and NativeIndex is not None:
        return NativeIndex()
    return PrefixIndex()
