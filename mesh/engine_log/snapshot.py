"""The state an engine log describes, and the snapshot that starts each epoch.

Per worker, the state is a :class:`blocks.block_map.BlockMap`: engine block
hash -> router block hash (several engine blocks may name one router block).
The ops carry both hashes (``KvOp.ehashes``), so the router's live set is the
map's values, and a new owner gets the exact mapping its ``BlockMapper``
needs to keep translating the engine's events: without it, removals of
blocks stored before a handover would leave stale index entries and stores
chained to them would be skipped.

Entry 0 of every epoch is a snapshot: per worker ``KvDelta(worker, last_seq,
[CLEAR, STORE(all live pairs)...])``, a STORE per cache tier with live
blocks. The maps kept for snapshots have no refcounts (a log's state is the
mapping alone).
"""

from __future__ import annotations

from blocks.block_map import BlockMap
from blocks.delta import OP_CLEAR, KvDelta, KvOp

__all__ = [
    "HASH_BYTES",
    "SNAPSHOT_TIER_BYTES",
    "SNAPSHOT_WORKER_BYTES",
    "LiveMaps",
    "apply_delta",
    "live_sets",
    "live_sets_by_tier",
    "snapshot_deltas",
]

# Upper bound of a 64-bit hash in msgpack (uint64: tag + 8 bytes), of the
# per-worker framing of a snapshot delta (worker id, seq, three ops), and of
# the two ops of each further cache tier it holds blocks on.
HASH_BYTES = 9
SNAPSHOT_WORKER_BYTES = 48
SNAPSHOT_TIER_BYTES = 24

LiveMaps = dict[str, BlockMap]  # worker -> its live mapping


def apply_delta(live: LiveMaps, d: KvDelta) -> BlockMap:
    """Apply ``d`` (validated) to its worker's map; returns that map.

    The maps keep no refcounts: a log's state is the mapping alone.
    """
    m = live.get(d.worker)
    if m is None:
        m = live[d.worker] = BlockMap(refs=False)
    for op in d.ops:
        m.apply(op)
    return m


def live_sets(live: LiveMaps) -> dict[str, set[int]]:
    """The router's view: per worker, the live router hashes on the GPU."""
    return {w: m.live() for w, m in live.items()}


def live_sets_by_tier(live: LiveMaps) -> dict[str, dict[int, set[int]]]:
    """Per worker, tier -> its live router hashes (tiers with live blocks)."""
    return {w: m.live_by_tier() for w, m in live.items()}


def snapshot_deltas(live: LiveMaps, seqs: dict[str, int]) -> list[KvDelta]:
    """Per worker ``[CLEAR, STORE(pairs)]`` carrying its last applied seq."""
    out = []
    for worker in sorted(set(live) | set(seqs)):
        m = live.get(worker)
        ops = m.snapshot_ops() if m is not None else [KvOp(OP_CLEAR, [])]
        out.append(KvDelta(worker, seqs.get(worker, -1), ops))
    return out
