"""``EngineLogOwner``: the single writer of one engine's log, on its owner node.

The owner appends one entry per call (one event batch of the engine), keeps
the live mapping per worker (needed for snapshots and handed to a new
adapter on takeover), and writes through its replica's current document, so
the node's own view is the same object.

Compaction. The owner tracks the bytes of the entries in the current
document and the size a snapshot of the live mapping would have. When the
log outgrows ``factor x`` that snapshot (``CompactionPolicy``; never below
``min_ops`` blocks' worth, so tiny live sets do not compact on every batch),
it starts ``gen + 1`` whose entry 0 is that snapshot; the old document is
dropped whole, so memory and encoded size stay within about ``factor x`` the
live set under endless churn. The trigger counts bytes, not block-ops: an op
inside a churn batch costs a little more on the wire than in a snapshot (the
entry and delta framing, two op lists), so bytes bound exactly what matters.
tests/unit/test_bounded_state.py holds the log to that bound under endless churn.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import pycrdt
import structlog

from blocks.block_map import BlockMap, MappedBlock
from blocks.delta import KvDelta
from mesh.engine_log.entry import LogError, NotOwnerError, checked_entry, encode_entry
from mesh.engine_log.epoch import CLIENT_ID_BITS, Epoch, EpochDoc
from mesh.engine_log.replica import EngineLogReplica
from mesh.engine_log.snapshot import (
    HASH_BYTES,
    SNAPSHOT_TIER_BYTES,
    SNAPSHOT_WORKER_BYTES,
    LiveMaps,
    snapshot_deltas,
)

__all__ = ["CompactionPolicy", "EngineLogOwner"]

log = structlog.get_logger(__name__)


@dataclass
class CompactionPolicy:
    factor: float = 2.0  # compact when log bytes > factor x snapshot bytes of the live set
    min_ops: int = 4096  # ... but never below this many blocks' worth (tiny live sets)

    def __post_init__(self) -> None:
        if self.factor <= 1.0:
            raise ValueError(f"compaction factor must be > 1, got {self.factor}")
        if self.min_ops < 1:
            raise ValueError(f"min_ops must be >= 1, got {self.min_ops}")


@dataclass
class EngineLogOwner:
    """The single writer of one engine's log (see the module docstring)."""

    replica: EngineLogReplica
    node_id: str
    rng: random.Random
    policy: CompactionPolicy = field(default_factory=CompactionPolicy)
    live: LiveMaps = field(default_factory=dict)
    log_bytes: int = 0
    engine_blocks: int = 0  # mapped engine blocks (snapshot pairs), all workers and tiers
    ehash_bytes: int = 0  # encoded size of their non-identity engine hashes
    _length: int = 0  # entries in the current document
    _updates: list[bytes] = field(default_factory=list)
    _sub: pycrdt.Subscription | None = None

    @property
    def engine_id(self) -> str:
        return self.replica.engine_id

    @property
    def epoch(self) -> Epoch:
        assert self.replica.current is not None
        return self.replica.current.epoch

    @property
    def live_blocks(self) -> int:
        """Live router hashes, all workers (O(live): for logs and tests)."""
        return sum(len(m.live()) for m in self.live.values())

    def snapshot_bytes(self) -> int:
        """What a snapshot of the live mapping would take (upper bound for
        64-bit router hashes)."""
        lower = sum(len(m.lower) for m in self.live.values() if m.lower)
        return (
            HASH_BYTES * self.engine_blocks
            + self.ehash_bytes
            + SNAPSHOT_WORKER_BYTES * len(self.live)
            + SNAPSHOT_TIER_BYTES * lower
        )

    def mappings(self) -> dict[str, list[MappedBlock]]:
        """Per worker, its mapped blocks, every tier (``BlockMap.pairs``, for
        ``BlockMapper.restore``)."""
        return {w: m.pairs() for w, m in self.live.items()}

    def start_epoch(self, epoch: Epoch, live: LiveMaps, seqs: dict[str, int]) -> bytes:
        """Begin ``epoch`` with a snapshot of ``live``/``seqs``; returns its full update.

        Takes ``live`` over (no copy: a copy would double the peak memory).
        """
        entry = encode_entry(snapshot_deltas(live, seqs))
        ed = EpochDoc.create(self.engine_id, epoch, entry)
        snap_bytes = len(entry)
        del entry
        old = self.replica.current
        if self._sub is not None and old is not None:
            old.doc.unobserve(self._sub)
        self.replica.install_written_here(ed)
        for m in live.values():
            m.compact()  # as the log: drop what churn left behind
        self.live = live
        self.engine_blocks = sum(len(m) for m in live.values())
        self.ehash_bytes = sum(m.ebytes for m in live.values())
        self.log_bytes = snap_bytes
        self._length = 1
        self._sub = ed.doc.observe(self._on_txn)
        return ed.update_since()

    def _on_txn(self, event: pycrdt.TransactionEvent) -> None:
        self._updates.append(event.update)

    def owns(self) -> bool:
        """False once a higher epoch is known (we were fenced)."""
        rep = self.replica
        cur = rep.current
        return (
            cur is not None and rep.pending is None and rep.written_here and cur.epoch.owner == self.node_id
        )

    def append(self, deltas: Iterable[KvDelta]) -> bytes:
        """Append one entry holding ``deltas``; returns the pycrdt update.

        Validates everything first: on error nothing is written.
        """
        if not self.owns():
            raise NotOwnerError(f"{self.node_id} does not own engine {self.engine_id}")
        batch = list(deltas)
        if not batch:
            raise LogError("append of no deltas")
        entry = checked_entry(self.engine_id, batch)
        ed = self.replica.current
        assert ed is not None
        ed.append(entry, self._length)
        self._length += 1
        self.log_bytes += len(entry)
        live = self.live
        for d in batch:
            m = live.get(d.worker)
            if m is None:
                m = live[d.worker] = BlockMap(refs=False)
            n_eng, n_eb = len(m), m.ebytes
            for op in d.ops:
                m.apply(op)
            self.engine_blocks += len(m) - n_eng
            self.ehash_bytes += m.ebytes - n_eb
            self.replica.note(d)
        upd = self._updates
        self._updates = []
        return upd[0] if len(upd) == 1 else pycrdt.merge_updates(*upd)

    def needs_compaction(self) -> bool:
        floor = HASH_BYTES * self.policy.min_ops
        return self.log_bytes > self.policy.factor * max(self.snapshot_bytes(), floor)

    def new_doc_id(self) -> int:
        return self.rng.getrandbits(CLIENT_ID_BITS) or 1

    def maybe_compact(self) -> tuple[Epoch, bytes] | None:
        """Start ``gen + 1`` with a snapshot if the log outgrew the live set."""
        if not self.owns() or not self.needs_compaction():
            return None
        old = self.epoch
        before = self.log_bytes
        new = Epoch(old.term, self.node_id, old.gen + 1, self.new_doc_id())
        update = self.start_epoch(new, self.live, dict(self.replica.last_seq))
        log.info(
            "engine_log.compacted",
            engine=self.engine_id,
            node=self.node_id,
            epoch=new,
            bytes_before=before,
            bytes_after=self.log_bytes,
            live=self.live_blocks,
            update_bytes=len(update),
        )
        return new, update
