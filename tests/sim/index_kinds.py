"""The prefix index the simulated nodes run: the pure-Python reference, the
native one, or both in one mesh (``kvmesh.simulation.mesh_world.index_factory``).

The seeded scenarios run on each; the native kinds skip loudly when the
native module is not built (``make install`` builds it where cargo is).
"""

from __future__ import annotations

from typing import Any

import pytest

from kvmesh.simulation.mesh_world import World, index_factory
from router.index import PrefixIndex
from router.native_index import NATIVE_INDEX_BUILT, NativeIndex

NOT_BUILT = "NATIVE PATH NOT TESTED: the native module is not built (`make install` builds it where cargo is)"


def kinds(*names: str) -> list[Any]:
    """pytest params of these index kinds, the native ones skipped when not built."""
    return [
        pytest.param(
            k, id=k, marks=pytest.mark.skipif(k != "python" and not NATIVE_INDEX_BUILT, reason=NOT_BUILT)
        )
        for k in names
    ]


def use(world: World, kind: str) -> None:
    """Make every node of ``world`` started from now on run a ``kind`` index."""
    world.index_factory = index_factory(kind)


def implementation(index: object) -> str:
    """``python`` or ``native``: which index a node runs."""
    if isinstance(index, PrefixIndex):
        return "python"
    assert NativeIndex is not None and isinstance(index, NativeIndex), type(index)
    return "native"
