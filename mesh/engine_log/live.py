"""The live state an engine log describes: per worker, engine hash -> router hash.

The owner of a log keeps it as it appends (for the size a snapshot would
have, which triggers compaction, for the snapshot itself, and for the
mapping a new adapter takes over); a node taking ownership replays its
replica's document into one. Two implementations of one protocol,
:class:`LiveState`:

* :class:`PyLiveState`, the reference: a :class:`blocks.block_map.BlockMap`
  without refcounts per worker (``LiveMaps``), and the counters the owner
  reads on every append kept up to date as it changes;
* ``kvmesh_native.LiveMaps`` (``native/src/live.rs``), the same state in
  Rust, which also applies a :class:`mesh.engine_log.packed.PackedEntry`
  with no Python object per block. A node in packed mode
  (``MeshConfig.packed_entries``) uses it (:func:`new_live_state`).

Pair order inside a snapshot's STORE may differ between the two; what a
snapshot rebuilds does not.
"""

from __future__ import annotations

from typing import Protocol

from blocks.block_map import BlockMap, MappedBlock
from blocks.delta import KvDelta
from mesh.engine_log.entry import encode_entry
from mesh.engine_log.packed import PackedEntry, native_live_maps
from mesh.engine_log.snapshot import LiveMaps, apply_delta, live_sets, live_sets_by_tier, snapshot_deltas

__all__ = ["LiveState", "PyLiveState", "new_live_state"]


class LiveState(Protocol):
    """Every worker's live mapping of one engine log (see the module docstring)."""

    @property
    def engine_blocks(self) -> int:
        """Mapped engine blocks, every worker and tier."""
        ...

    @property
    def ehash_bytes(self) -> int:
        """Encoded size of the non-identity engine hashes, every worker and tier."""
        ...

    @property
    def lower_maps(self) -> int:
        """Maps of tiers other than the GPU held, every worker."""
        ...

    def __len__(self) -> int:
        """Workers."""
        ...

    def workers(self) -> list[str]: ...

    def apply(self, d: KvDelta) -> None:
        """Apply one validated delta (its worker gets a map even without ops)."""
        ...

    def apply_packed(self, entry: PackedEntry) -> None:
        """Apply every delta of a decoded, validated entry in order."""
        ...

    def pairs(self, worker: str) -> list[MappedBlock]:
        """``worker``'s mapped blocks, every tier (``BlockMap.pairs``)."""
        ...

    def snapshot_entry(self, seqs: dict[str, int]) -> bytes:
        """The encoded snapshot entry: per worker ``[CLEAR, STORE...]`` with its seq."""
        ...

    def live_sets(self) -> dict[str, set[int]]: ...

    def live_sets_by_tier(self) -> dict[str, dict[int, set[int]]]: ...

    def live_blocks(self) -> int:
        """Live router hashes on the GPU, every worker (O(live))."""
        ...

    def compact(self) -> None:
        """Let go of what churn left behind (called when a new epoch starts)."""
        ...

    def emptied(self) -> LiveState:
        """The same workers, no blocks."""
        ...


class PyLiveState:
    """:class:`LiveState` over ``BlockMap(refs=False)`` per worker (the reference)."""

    __slots__ = ("_ebytes", "_n", "maps")

    def __init__(self, maps: LiveMaps | None = None) -> None:
        self.maps: LiveMaps = maps if maps is not None else {}
        self._n = sum(len(m) for m in self.maps.values())
        self._ebytes = sum(m.ebytes for m in self.maps.values())

    @property
    def engine_blocks(self) -> int:
        return self._n

    @property
    def ehash_bytes(self) -> int:
        return self._ebytes

    @property
    def lower_maps(self) -> int:
        return sum(len(m.lower) for m in self.maps.values() if m.lower)

    def __len__(self) -> int:
        return len(self.maps)

    def workers(self) -> list[str]:
        return list(self.maps)

    def apply(self, d: KvDelta) -> None:
        m = self.maps.get(d.worker)
        n, eb = (len(m), m.ebytes) if m is not None else (0, 0)
        m = apply_delta(self.maps, d)
        self._n += len(m) - n
        self._ebytes += m.ebytes - eb

    def apply_packed(self, entry: PackedEntry) -> None:
        for d in entry.to_deltas():
            self.apply(d)

    def pairs(self, worker: str) -> list[MappedBlock]:
        m = self.maps.get(worker)
        return m.pairs() if m is not None else []

    def snapshot_entry(self, seqs: dict[str, int]) -> bytes:
        return encode_entry(snapshot_deltas(self.maps, seqs))

    def live_sets(self) -> dict[str, set[int]]:
        return live_sets(self.maps)

    def live_sets_by_tier(self) -> dict[str, dict[int, set[int]]]:
        return live_sets_by_tier(self.maps)

    def live_blocks(self) -> int:
        return sum(len(m.live()) for m in self.maps.values())

    def compact(self) -> None:
        for m in self.maps.values():
            m.compact()

    def emptied(self) -> PyLiveState:
        return PyLiveState({w: BlockMap(refs=False) for w in self.maps})


def new_live_state(packed: bool) -> LiveState:
    """An empty live state: native in packed mode (it applies packed entries
    without Python objects per block), else the reference."""
    if packed:
        state: LiveState = native_live_maps()
        return state
    return PyLiveState()
