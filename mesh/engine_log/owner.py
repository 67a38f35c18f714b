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

from blocks.block_map import MappedBlock
from blocks.delta import KvDelta
from blocks.workers import engine_of
from mesh.engine_log.entry import LogError, NotOwnerError, checked_entry
from mesh.engine_log.epoch import CLIENT_ID_BITS, Epoch, EpochDoc
from mesh.engine_log.live import LiveState, PyLiveState
from mesh.engine_log.packed import IndexChange, PackedEntry, join_packed, workers_of
from mesh.engine_log.replica import EngineLogReplica
from mesh.engine_log.snapshot import HASH_BYTES, SNAPSHOT_TIER_BYTES, SNAPSHOT_WORKER_BYTES

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
    live: LiveState = field(default_factory=PyLiveState)
    log_bytes: int = 0
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
        return self.live.live_blocks()

    def snapshot_bytes(self) -> int:
        """What a snapshot of the live mapping would take (upper bound for
        64-bit router hashes)."""
        live = self.live
        return (
            HASH_BYTES * live.engine_blocks
            + live.ehash_bytes
            + SNAPSHOT_WORKER_BYTES * len(live)
            + SNAPSHOT_TIER_BYTES * live.lower_maps
        )

    def mappings(self) -> dict[str, list[MappedBlock]]:
        """Per worker, its mapped blocks, every tier (``BlockMap.pairs``, for
        ``BlockMapper.restore``)."""
        live = self.live
        return {w: live.pairs(w) for w in live.workers()}

    def start_epoch(self, epoch: Epoch, live: LiveState, seqs: dict[str, int]) -> bytes:
        """Begin ``epoch`` with a snapshot of ``live``/``seqs``; returns its full update.

        Takes ``live`` over (no copy: a copy would double the peak memory).
        """
        entry = live.snapshot_entry(seqs)
        ed = EpochDoc.create(self.engine_id, epoch, entry)
        snap_bytes = len(entry)
        del entry
        old = self.replica.current
        if self._sub is not None and old is not None:
            old.doc.unobserve(self._sub)
        self.replica.install_written_here(ed)
        live.compact()  # as the log: drop what churn left behind
        self.live = live
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

    def append(self, changes: Iterable[IndexChange]) -> bytes:
        """Append one entry holding ``changes``; returns the pycrdt update.

        Validates everything first: on error nothing is written. Packed
        entries (the native mapper's, or decoded ones) are valid by
        construction; only their workers are checked to be this engine's.
        A mix of packed entries and deltas is written as deltas.
        """
        if not self.owns():
            raise NotOwnerError(f"{self.node_id} does not own engine {self.engine_id}")
        batch = list(changes)
        if not batch:
            raise LogError("append of no deltas")
        if all(not isinstance(c, KvDelta) for c in batch):
            packed: list[PackedEntry] = batch  # type: ignore[assignment]  # no KvDelta among them
            return self._append_packed(join_packed(packed))
        deltas = [d for c in batch for d in ((c,) if isinstance(c, KvDelta) else c.to_deltas())]
        entry = checked_entry(self.engine_id, deltas)
        self._write(entry)
        live = self.live
        for d in deltas:
            live.apply(d)
        self.replica.note_changes(deltas)
        return self._take_update()

    def _append_packed(self, entry: PackedEntry) -> bytes:
        for w in workers_of(entry):
            if engine_of(w) != self.engine_id:
                raise LogError(f"worker {w!r} is not a worker of engine {self.engine_id!r}")
        self._write(entry.raw)
        self.live.apply_packed(entry)
        self.replica.note_changes([entry])
        return self._take_update()

    def _write(self, entry: bytes) -> None:
        ed = self.replica.current
        assert ed is not None
        ed.append(entry, self._length)
        self._length += 1
        self.log_bytes += len(entry)

    def _take_update(self) -> bytes:
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
