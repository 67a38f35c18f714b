"""What one engine event batch changed, in router block hashes.

This is the unit that leaves ``engine_adapters/``: the event adapter turns each
vLLM/SGLang ``KVEventBatch`` of a worker into one :class:`KvDelta`. A single
router node applies it straight to its prefix index; in the mesh the engine's
owner appends it to that engine's replicated log and every node's index is
materialised from the log. Ops keep the order of the engine's events, since a
batch may remove and store the same block.

Each op also carries the *engine* block hashes it is about (``ehashes``), so
the log holds the engine hash -> router hash mapping and a new owner of the
engine can keep translating the engine's events (``BlockMapper`` cannot
rebuild the mapping from events it never saw). The index reads ``hashes``
only; :class:`blocks.block_map.BlockMap` is the state the ops describe,
mapping included:

* ``STORE``: ``ehashes[i]`` is the engine block whose router hash is
  ``hashes[i]``; every binding is listed, also when the router hash was
  already live through another engine block (router hashes are refcounted).
* ``REMOVE``: ``ehashes`` are the engine blocks gone, ``hashes`` the router
  hashes whose last engine block went (the lists can differ in length).
* ``CLEAR``: both empty; it drops every block of the worker, on every tier.

Each op acts on one cache tier (``tier``, :mod:`blocks.tiers`): a STORE
on the host tier makes the blocks live there, and a REMOVE from the GPU
leaves the host copies live. The field comes last and defaults to the GPU,
so entries written before tiers existed decode as GPU ops, and a reader
that predates tiers reads the ops of every tier as GPU ops (msgpack arrays
with a trailing element it does not know) instead of failing.

An op without ``ehashes`` (from a producer without engine hashes) names each
block by its router hash: the pair is ``(h, h)``; its ``ehashes`` is an
empty list on the wire (one byte).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from blocks.tiers import TIER_GPU

OP_STORE = 0
OP_REMOVE = 1
OP_CLEAR = 2  # all blocks of the worker dropped; hashes is empty

EngineHash = int | bytes  # opaque engine block id, as the engine sent it


class KvOp(msgspec.Struct, array_like=True, gc=False, frozen=True):
    kind: int
    hashes: list[int]  # router block hashes (unsigned 64-bit)
    ehashes: list[EngineHash] = []  # engine block hashes (see module docstring)
    tier: int = TIER_GPU  # the cache tier the op acts on (blocks.tiers); CLEAR ignores it


class KvDelta(msgspec.Struct, array_like=True, gc=False):
    worker: str  # engine_id, or "engine_id#dp<rank>" for data-parallel rank > 0
    seq: int  # the engine's sequence number of the batch; -1 for a synthetic reset
    ops: list[KvOp]


class PackedEntry(Protocol):
    """``kvmesh_native.PackedEntry``: a list of ``KvDelta`` as one engine log
    entry held in Rust (immutable), made by the native mapper on an engine's
    owner or decoded from a replicated log (``mesh/engine_log/packed.py``);
    a native index and owner take it without a Python object per block."""

    @property
    def heads(self) -> tuple[tuple[str, int], ...]:
        """``(worker, seq)`` of each delta, in order."""
        ...

    @property
    def blocks(self) -> int:
        """Router hashes in all its ops."""
        ...

    @property
    def raw(self) -> bytes:
        """The entry's bytes (what the log holds: the msgpack of its deltas)."""
        ...

    def __len__(self) -> int: ...

    def to_deltas(self) -> list[KvDelta]:
        """The entry as the reference decoder gives it."""
        ...
