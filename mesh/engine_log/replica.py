"""``EngineLogReplica``: one node's view of one engine's log.

Every node keeps one per registered engine (the owner's is the same object
its :class:`~mesh.engine_log.owner.EngineLogOwner` writes through). It
materialises incrementally: it observes the log Array of its current document
and returns every newly visible ``KvDelta``, in log order. A single writer
appending only means the visible array on any replica is always a prefix of
the owner's (yrs keeps out-of-order updates pending until the gap is filled,
and ignores duplicates).

When a higher epoch becomes usable (its snapshot entry is visible), the
replica switches to it and emits ``KvDelta(worker, -1, [CLEAR])`` for every
worker it knew that the snapshot does not mention, followed by the snapshot's
own deltas (which start with CLEAR). So the index consumer only ever sees
``KvDelta``s and never a transient empty state: a higher epoch whose snapshot
has not arrived yet is held *pending* (and already fences the lower one)
while the index keeps the old contents.

Packed mode (``packed=True``, :mod:`mesh.engine_log.packed`): each newly
visible entry is emitted as one ``PackedEntry`` instead of its deltas
(decoded, validated and kept in Rust up to the index); the CLEARs of an
epoch switch stay ``KvDelta``s. Either way the consumer gets the same
changes in the same order.

Sequence resume point: the last applied engine sequence of a worker is the
``seq`` of its last delta in log order with ``seq >= 0`` (snapshots carry it).
Log order, not max: an engine restart starts its sequence at 0 again.
"""

from __future__ import annotations

from collections.abc import Sequence

import pycrdt
import structlog

from blocks.delta import OP_CLEAR, KvDelta, KvOp
from mesh.engine_log.entry import LogError, decode_or_skip
from mesh.engine_log.epoch import Epoch, EpochDoc
from mesh.engine_log.live import LiveState, new_live_state
from mesh.engine_log.packed import PACKED_BUILT, IndexChange, decode_packed, heads_of

__all__ = ["EngineLogReplica"]

log = structlog.get_logger(__name__)


class EngineLogReplica:
    """A node's view of one engine's log; the materialised-state source.

    ``apply(epoch, update)`` applies a remote update with epoch fencing and
    returns every newly visible delta (and the reset CLEARs of an epoch
    switch), in log order; with ``packed``, one ``PackedEntry`` per entry
    instead of its deltas.
    """

    def __init__(self, engine_id: str, *, packed: bool = False, node_id: str = "") -> None:
        if packed and not PACKED_BUILT:
            raise ValueError("packed entries need the native module (native/, `make install`)")
        self.engine_id = engine_id
        self._log = log.bind(node=node_id) if node_id else log  # which node's copy a line is about
        self.packed = packed
        self.current: EpochDoc | None = None
        self.pending: EpochDoc | None = None  # higher epoch, snapshot not yet visible
        self.last_seq: dict[str, int] = {}
        self.workers: set[str] = set()
        self._sub: pycrdt.Subscription | None = None
        self._inbox: list[bytes] = []
        self._local = False  # current doc written by this node: no Array observer

    # -- epochs ---------------------------------------------------------------
    @property
    def epoch(self) -> Epoch | None:
        return self.current.epoch if self.current else None

    @property
    def known_epoch(self) -> Epoch | None:
        """The highest epoch this node has heard of (fences everything lower)."""
        if self.pending is not None:
            return self.pending.epoch
        return self.epoch

    @property
    def written_here(self) -> bool:
        """True while the current document is written by this node (its owner)."""
        return self._local

    def doc_for(self, epoch: Epoch) -> EpochDoc | None:
        for ed in (self.current, self.pending):
            if ed is not None and ed.epoch == epoch:
                return ed
        return None

    # -- replica side ---------------------------------------------------------
    def apply(self, epoch: Epoch, update: bytes) -> list[IndexChange]:
        """Apply one (possibly merged) update of ``epoch``.

        Returns the deltas (or packed entries) newly visible, in order. Updates of an epoch lower
        than :attr:`known_epoch` are ignored (fenced). Raises :class:`LogError`
        for a malformed update (nothing applied).
        """
        out: list[IndexChange] = []
        known = self.known_epoch
        if known is not None and epoch < known:
            self._log.debug("engine_log.update_fenced", engine=self.engine_id, epoch=epoch, known=known)
            return out
        if self.current is not None and epoch == self.current.epoch:
            if self.pending is not None:  # superseded, already fenced
                return out
            self._apply_current(update, out)
            return out
        if self.pending is None or epoch > self.pending.epoch:
            self.pending = EpochDoc(self.engine_id, epoch, writer=False)
        try:
            self.pending.doc.apply_update(update)
        except ValueError as e:
            raise LogError(f"bad update for {self.engine_id} {epoch}: {e}") from None
        self._maybe_promote(out)
        return out

    def _apply_current(self, update: bytes, out: list[IndexChange]) -> None:
        assert self.current is not None
        if self._local:
            # Our own epoch: only we write it; an update from elsewhere can only be
            # an echo of what we already have.
            return
        try:
            self.current.doc.apply_update(update)
        except ValueError as e:
            self._inbox.clear()
            raise LogError(f"bad update for {self.engine_id} {self.current.epoch}: {e}") from None
        self._drain_inbox(out)

    def _maybe_promote(self, out: list[IndexChange]) -> None:
        p = self.pending
        if p is None or len(p) == 0:
            return
        if not p.meta_matches():
            self._log.error("engine_log.epoch_meta_mismatch", engine=self.engine_id, epoch=p.epoch)
            self.pending = None
            return
        self.pending = None
        self._install(p, out, local=False)

    def install_written_here(self, ed: EpochDoc) -> None:
        """Owner only: make ``ed``, a document this node writes, current.

        Drops any pending epoch (the owner's new epoch is the newest it knows)
        and emits nothing: the owner applies its own deltas to its index.
        """
        self.pending = None
        self._install(ed, None, local=True)

    def _install(self, ed: EpochDoc, out: list[IndexChange] | None, *, local: bool) -> None:
        """Make ``ed`` current: reset per-worker bookkeeping, replay its entries.

        With ``out``, the deltas that move the index from the old epoch's
        contents to the new one's are appended to it.
        """
        if self._sub is not None and self.current is not None:
            self.current.log.unobserve(self._sub)
        self._sub = None
        entries = ed.entries()
        # Decode entry by entry (not all at once): bounds the transient memory.
        snap = self._decode(ed.epoch, entries[0]) if entries else []
        snap_workers = {w for ch in snap for w, _ in heads_of(ch)}
        old_workers = self.workers
        self.current = ed
        self.workers = set()
        self.last_seq = {}
        self._local = local
        if out is not None:
            out.extend(KvDelta(w, -1, [KvOp(OP_CLEAR, [])]) for w in sorted(old_workers - snap_workers))
        for i, raw in enumerate(entries):
            changes = snap if i == 0 else self._decode(ed.epoch, raw)
            self.note_changes(changes)
            if out is not None:
                out.extend(changes)
            if i == 0:
                snap = []
        if not local:
            self._sub = ed.log.observe(self._on_log_event)
        self._log.info(
            "engine_log.epoch_installed",
            engine=self.engine_id,
            epoch=ed.epoch,
            entries=len(entries),
            local=local,
        )

    def _on_log_event(self, event: pycrdt.ArrayEvent) -> None:
        # Called inside the transaction: only collect, decode afterwards.
        for part in event.delta:  # type: ignore[attr-defined]  # pycrdt declares it in __slots__ only
            ins = part.get("insert")
            if ins:
                self._inbox.extend(ins)

    def _drain_inbox(self, out: list[IndexChange]) -> None:
        assert self.current is not None
        inbox, self._inbox = self._inbox, []
        epoch = self.current.epoch
        for raw in inbox:
            changes = self._decode(epoch, raw)
            self.note_changes(changes)
            out.extend(changes)

    def _decode(self, epoch: Epoch, raw: bytes) -> list[IndexChange]:
        """One entry's index changes (nothing for an entry that is skipped)."""
        if self.packed:
            entry = decode_packed(self.engine_id, epoch, raw)
            return [entry] if entry is not None and len(entry) else []
        return list(decode_or_skip(self.engine_id, epoch, raw))

    def note_changes(self, changes: Sequence[IndexChange]) -> None:
        """Record the worker and sequence number of every delta of
        ``changes``: those applied here, and those the owner appends (it
        does not observe its own document)."""
        workers, last = self.workers, self.last_seq
        for ch in changes:
            for worker, seq in heads_of(ch):
                workers.add(worker)
                if seq >= 0:
                    last[worker] = seq

    # -- reading --------------------------------------------------------------
    def materialise_live(self) -> LiveState:
        """The live mapping per worker, replayed from the current document
        (natively in packed mode)."""
        live = new_live_state(self.packed)
        cur = self.current
        if cur is None:
            return live
        for raw in cur.entries():
            if self.packed:
                entry = decode_packed(self.engine_id, cur.epoch, raw)
                if entry is not None:
                    live.apply_packed(entry)
            else:
                for d in decode_or_skip(self.engine_id, cur.epoch, raw):
                    live.apply(d)
        return live

    def materialise(self) -> dict[str, set[int]]:
        """The live router hashes per worker: what this log says the engine
        holds on its GPUs."""
        return self.materialise_live().live_sets()

    def materialise_tiers(self) -> dict[str, dict[int, set[int]]]:
        """Per worker, tier -> the live router hashes this log says it holds there."""
        return self.materialise_live().live_sets_by_tier()

    def resume_seqs(self) -> dict[str, int]:
        """Per worker, the first engine sequence number not yet in the log."""
        return {w: s + 1 for w, s in self.last_seq.items()}

    def state_vector(self) -> bytes:
        ed = self.pending or self.current
        return ed.state_vector() if ed is not None else b"\x00"

    def encoded_size(self) -> int:
        return sum(len(ed.update_since()) for ed in (self.current, self.pending) if ed)
