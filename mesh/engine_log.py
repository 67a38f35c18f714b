"""Per-engine replicated KV log: one single-writer pycrdt document per epoch.

The unit of KV state is :class:`blocks.delta.KvDelta` (one engine
event batch, in router block hashes). Each engine's deltas are written by one
node, the engine's current *owner*, and read by every node.

Layout of one epoch document (a ``pycrdt.Doc`` whose client id is the epoch's
``doc`` field, so only the owner ever writes it):

* ``meta`` (Map): ``engine_id``, ``term``, ``owner``, ``gen``, ``doc``; written
  once, in the same transaction as the snapshot, never overwritten (no
  tombstones).
* ``log`` (Array): append-only entries, each the msgpack bytes of a list of
  ``KvDelta`` (everything one ``append`` call was given). Entry 0 is always a
  *snapshot*: per worker ``KvDelta(worker, last_seq, [CLEAR, STORE(all live
  blocks)])``. Nothing is ever deleted from the Array, so a document carries no
  tombstones; history is bounded by replacing the whole document (below).

The state a log describes is, per worker, a ``blocks.block_map.BlockMap``: engine
block hash -> router block hash (several engine blocks may name one router
block). The ops carry both hashes (``KvOp.ehashes``), so the router's live
set is the map's values and a
new owner gets the exact mapping its ``BlockMapper`` needs to keep
translating the engine's events (``MeshState.take_ownership`` hands it over);
without it, removals of blocks stored before a handover would leave stale
index entries and stores chained to them would be skipped. The snapshot
carries the pairs (``STORE(hashes, ehashes)``). The owner keeps that map
(without refcounts: one dict per worker) and rebuilds its dicts on every
snapshot, since a dict under churn holds ~2x the memory of a fresh one.

Why batch entries and not one CRDT key per block (design.md decision 3): a Map
key per block costs ~300 B and leaves a tombstone per delete forever. An
append-only Array of batches costs a few bytes of CRDT overhead per batch on
the wire (measured ~2 % for 16-block batches) and yrs squashes consecutive
entries of one client into one item, so memory is close to the payload.

Epochs and fencing. An epoch is ``Epoch(term, owner, gen, doc)`` ordered
lexicographically; a higher epoch supersedes a lower one on every node, and
updates of a lower epoch than the highest one a node knows are ignored.

* ``term`` grows on every *ownership change* (``take_ownership``).
* ``gen`` grows on every *compaction* by the same owner.
* ``doc`` is the writer's random pycrdt client id.

This deviates from a plain ``(epoch_number, owner)`` pair on purpose: with a
single counter, a stale owner that compacts (n -> n+1) concurrently with a
takeover by a new owner (n -> n+1) would win whenever its node id sorts
higher, and the fenced writer would be the legitimate one. With the term
first, any takeover beats any number of compactions of the previous term. The
``doc`` component keeps two documents that would otherwise carry the same
(term, owner, gen) -- e.g. a node restarted without memory of its old
epochs -- from ever being merged into one (garbage) log: they are simply two
distinct, ordered epochs.

Compaction. The owner tracks the bytes of the entries in the current document
and the live mapping. When the log outgrows ``K x`` the size a snapshot of the
live mapping would have (K = ``CompactionPolicy.factor``, default 2; never below
``min_ops`` blocks' worth), it starts ``gen + 1`` whose entry 0 is that
snapshot. Old documents are dropped whole, so memory and encoded size stay
within about K x the live set. The trigger counts *bytes*, not block-ops: an
op inside a 16-block churn batch costs ~10-11 B on the wire (entry and delta
framing, two op lists) against 9 B in a snapshot, so "2 x the live set in
block-ops" measured 1.99-2.0x the live-set bytes, while bytes bound exactly
what we care about (measured: tests/unit/test_bounded_state.py). With engine
hashes carried, a block costs ~18 B instead of ~9 B in a snapshot and in a
churn entry alike, so the ratio is unchanged.

Replicas materialise incrementally: ``EngineLogReplica`` observes the log
Array of its current document and hands every newly visible ``KvDelta`` to a
sink, in log order. A single writer appending only means the visible array on
any replica is always a prefix of the owner's (yrs keeps out-of-order updates
pending until the gap is filled, and ignores duplicates). When a higher epoch
becomes usable (its snapshot entry is visible), the replica switches to it and
emits ``KvDelta(worker, -1, [CLEAR])`` for every worker it knew that the
snapshot does not mention, followed by the snapshot's own deltas (which start
with CLEAR). So the index consumer only ever sees ``KvDelta``s and never a
transient empty state: a higher epoch whose snapshot has not arrived yet is
held *pending* (and already fences the lower one) while the index keeps the
old contents.

Sequence resume point: the last applied engine sequence of a worker is the
``seq`` of its last delta in log order with ``seq >= 0`` (snapshots carry it).
Log order, not max: an engine restart starts its sequence at 0 again.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec
import pycrdt
import structlog

from blocks.block_map import BlockMap
from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, EngineHash, KvDelta, KvOp
from blocks.workers import split_worker_id

log = structlog.get_logger(__name__)

# yrs/JS-safe client ids: below 2**53.
CLIENT_ID_BITS = 53

_entry_enc = msgspec.msgpack.Encoder()
_entry_dec = msgspec.msgpack.Decoder(list[KvDelta])

DeltaSink = Callable[[KvDelta], None]


class Epoch(msgspec.Struct, array_like=True, frozen=True, order=True, gc=False):
    """Identity of one epoch document; compared lexicographically."""

    term: int  # grows on each ownership change
    owner: str  # node id of the single writer
    gen: int  # grows on each compaction within a term
    doc: int  # the writer's pycrdt client id (random)


class LogError(ValueError):
    """A log update or delta that cannot be applied; nothing of it was applied."""


class NotOwnerError(RuntimeError):
    """This node does not (or no longer) own the engine's log."""


def encode_entry(deltas: list[KvDelta]) -> bytes:
    return _entry_enc.encode(deltas)


def decode_entry(raw: bytes | bytearray) -> list[KvDelta]:
    return _entry_dec.decode(raw)


def validate_delta(engine_id: str, d: KvDelta) -> None:
    """Raise :class:`LogError` unless ``d`` is a well-formed delta of ``engine_id``.

    Field types are assumed checked (deltas decoded by the typed msgspec
    decoder, see :func:`checked_entry`); this checks meaning and ranges.
    """
    if split_worker_id(d.worker)[0] != engine_id:
        raise LogError(f"worker {d.worker!r} is not a worker of engine {engine_id!r}")
    if d.seq < -1:
        raise LogError(f"bad seq {d.seq!r} for worker {d.worker!r}")
    for op in d.ops:
        if op.kind not in (OP_STORE, OP_REMOVE, OP_CLEAR):
            raise LogError(f"unknown op kind {op.kind!r} for worker {d.worker!r}")
        if op.ehashes:
            if op.kind == OP_CLEAR:
                raise LogError(f"CLEAR with engine hashes for worker {d.worker!r}")
            if op.kind == OP_STORE and len(op.ehashes) != len(op.hashes):
                raise LogError(
                    f"STORE of {len(op.hashes)} router and {len(op.ehashes)} engine "
                    f"hashes for worker {d.worker!r}"
                )
        # Decoded msgpack ints are below 2**64, so only negatives (int64 on the
        # wire) can be out of range; min runs in C.
        if op.hashes and min(op.hashes) < 0:
            raise LogError(f"block hash out of unsigned 64-bit range for worker {d.worker!r}")


def _plain(deltas: list[KvDelta]) -> bool:
    """True if every field already has the exact type the typed decoder
    gives back (str, int, lists of int / int or bytes): such deltas equal
    their decoded copy, so they can be validated as they are."""
    for d in deltas:
        if d.__class__ is not KvDelta or d.worker.__class__ is not str or d.seq.__class__ is not int:
            return False
        if d.ops.__class__ is not list:
            return False
        for op in d.ops:
            if op.__class__ is not KvOp or op.kind.__class__ is not int:
                return False
            hs, ehs = op.hashes, op.ehashes
            if hs.__class__ is not list or ehs.__class__ is not list:
                return False
            # One C pass per list (bool and float are not int here).
            if hs and list(map(type, hs)).count(int) != len(hs):
                return False
            if ehs:
                types = list(map(type, ehs))
                if types.count(int) + types.count(bytes) != len(ehs):
                    return False
    return True


def checked_entry(engine_id: str, deltas: list[KvDelta]) -> bytes:
    """Encode ``deltas`` as one entry, refusing anything a replica could not decode."""
    try:
        entry = encode_entry(deltas)
        # Encoding already refuses ints outside msgpack's range. Deltas of
        # exact types (the mapper's) are checked as they are; anything else
        # goes through the typed decode, which checks every field's type in C
        # (a bool or float where an int belongs, say).
        for d in deltas if _plain(deltas) else decode_entry(entry):
            validate_delta(engine_id, d)
    except (msgspec.EncodeError, msgspec.DecodeError, TypeError, OverflowError) as e:
        raise LogError(f"invalid delta for engine {engine_id!r}: {e}") from None
    return entry


# Upper bound of a 64-bit hash in msgpack (uint64: tag + 8 bytes), and of the
# per-worker framing of a snapshot delta (worker id, seq, three ops).
HASH_BYTES = 9
SNAPSHOT_WORKER_BYTES = 48

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
    """The router's view: per worker, the live router hashes."""
    return {w: m.live() for w, m in live.items()}


def snapshot_deltas(live: LiveMaps, seqs: dict[str, int]) -> list[KvDelta]:
    """Per worker ``[CLEAR, STORE(pairs)]`` carrying its last applied seq."""
    out = []
    for worker in sorted(set(live) | set(seqs)):
        m = live.get(worker)
        ops = m.snapshot_ops() if m is not None else [KvOp(OP_CLEAR, [])]
        out.append(KvDelta(worker, seqs.get(worker, -1), ops))
    return out


class EpochDoc:
    """One epoch of one engine's log: a pycrdt Doc with ``meta`` and ``log``."""

    __slots__ = ("doc", "engine_id", "epoch", "log", "meta")

    def __init__(self, engine_id: str, epoch: Epoch, *, writer: bool) -> None:
        self.engine_id = engine_id
        self.epoch = epoch
        # Replicas never write, so their client id is irrelevant; the writer's is
        # the epoch's doc id (a second writer would show up as a foreign client).
        self.doc = pycrdt.Doc(client_id=epoch.doc if writer else None)
        self.log: pycrdt.Array = self.doc.get("log", type=pycrdt.Array)
        self.meta: pycrdt.Map = self.doc.get("meta", type=pycrdt.Map)

    @classmethod
    def create(cls, engine_id: str, epoch: Epoch, snapshot_entry: bytes) -> EpochDoc:
        """A new writer document whose entry 0 is ``snapshot_entry`` (encoded deltas)."""
        ed = cls(engine_id, epoch, writer=True)
        with ed.doc.transaction():
            # meta first: it precedes the snapshot in the writer's clock order, so
            # a replica that sees entry 0 has seen the meta too.
            ed.meta["engine_id"] = engine_id
            ed.meta["term"] = epoch.term
            ed.meta["owner"] = epoch.owner
            ed.meta["gen"] = epoch.gen
            ed.meta["doc"] = str(epoch.doc)  # str: JSON numbers are floats
            ed.log.append(snapshot_entry)
        return ed

    def meta_matches(self) -> bool:
        m = self.meta
        try:
            return (
                m["engine_id"] == self.engine_id
                and int(m["term"]) == self.epoch.term
                and m["owner"] == self.epoch.owner
                and int(m["gen"]) == self.epoch.gen
                and m["doc"] == str(self.epoch.doc)
            )
        except (KeyError, TypeError, ValueError):
            return False

    def __len__(self) -> int:
        return len(self.log)

    def append(self, entry: bytes, index: int) -> None:
        """Writer only: append ``entry`` at ``index`` (== current length).

        Uses pycrdt's integrated array directly: ``Array.append`` goes through
        slice assignment and two ``len`` calls in Python, 3x slower (measured
        46k vs 135k appends/s). Falls back to the public API if the internals
        change (pycrdt is pinned < 0.15).
        """
        try:
            with self.doc.transaction() as txn:
                self.log.integrated.insert(txn._txn, index, entry)
        except AttributeError:
            self.log.append(entry)

    def entries(self) -> list[bytes]:
        return [bytes(e) for e in self.log.to_py() or ()]

    def state_vector(self) -> bytes:
        return self.doc.get_state()

    def update_since(self, state_vector: bytes | None = None) -> bytes:
        return self.doc.get_update(state_vector)


def _decode_or_skip(engine_id: str, epoch: Epoch, raw: bytes | bytearray) -> list[KvDelta]:
    try:
        deltas = decode_entry(raw)
        for d in deltas:
            validate_delta(engine_id, d)
        return deltas
    except (msgspec.DecodeError, LogError, TypeError) as e:
        # The single writer validates before writing, so this is corruption or a
        # foreign writer; skipping keeps the rest of the log usable.
        log.error("log_entry_skipped", engine=engine_id, epoch=epoch, error=str(e))
        return []


def empty_update(update: bytes) -> bool:
    """True if a v1 update carries no structs and no deletions."""
    return update in (b"\x00\x00", b"")


class EngineLogReplica:
    """A node's view of one engine's log; the materialised-state source.

    ``apply(epoch, update)`` applies a remote update with epoch fencing and
    hands every newly visible delta (and the reset CLEARs of an epoch switch)
    to ``sink`` in log order; it also returns them.
    """

    def __init__(self, engine_id: str, sink: DeltaSink | None = None) -> None:
        self.engine_id = engine_id
        self.sink = sink
        self.current: EpochDoc | None = None
        self.pending: EpochDoc | None = None  # higher epoch, snapshot not yet visible
        self.last_seq: dict[str, int] = {}
        self.workers: set[str] = set()
        self._sub = None
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

    def doc_for(self, epoch: Epoch) -> EpochDoc | None:
        for ed in (self.current, self.pending):
            if ed is not None and ed.epoch == epoch:
                return ed
        return None

    # -- replica side ---------------------------------------------------------
    def apply(self, epoch: Epoch, update: bytes) -> list[KvDelta]:
        """Apply one (possibly merged) update of ``epoch``.

        Returns the deltas newly visible, in order. Updates of an epoch lower
        than :attr:`known_epoch` are ignored (fenced). Raises :class:`LogError`
        for a malformed update (nothing applied).
        """
        out: list[KvDelta] = []
        known = self.known_epoch
        if known is not None and epoch < known:
            log.debug("log_update_fenced", engine=self.engine_id, epoch=epoch, known=known)
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

    def _apply_current(self, update: bytes, out: list[KvDelta]) -> None:
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

    def _maybe_promote(self, out: list[KvDelta]) -> None:
        p = self.pending
        if p is None or len(p) == 0:
            return
        if not p.meta_matches():
            log.error("epoch_doc_meta_mismatch", engine=self.engine_id, epoch=p.epoch)
            self.pending = None
            return
        self.pending = None
        self._install(p, out, notify=True, local=False)

    def _install(self, ed: EpochDoc, out: list[KvDelta] | None, *, notify: bool, local: bool) -> None:
        """Make ``ed`` current: reset per-worker bookkeeping, replay its entries."""
        if self._sub is not None and self.current is not None:
            self.current.log.unobserve(self._sub)
        self._sub = None
        entries = ed.entries()
        # Decode entry by entry (not all at once): bounds the transient memory.
        snap = _decode_or_skip(self.engine_id, ed.epoch, entries[0]) if entries else []
        snap_workers = {d.worker for d in snap}
        old_workers = self.workers
        self.current = ed
        self.workers = set()
        self.last_seq = {}
        self._local = local
        if notify and out is not None:
            for w in sorted(old_workers - snap_workers):
                self._emit(KvDelta(w, -1, [KvOp(OP_CLEAR, [])]), out)
        for i, raw in enumerate(entries):
            for d in snap if i == 0 else _decode_or_skip(self.engine_id, ed.epoch, raw):
                self._note(d)
                if notify and out is not None:
                    self._emit(d, out)
            if i == 0:
                snap = []
        if not local:
            self._sub = ed.log.observe(self._on_log_event)
        log.info(
            "epoch_installed",
            engine=self.engine_id,
            epoch=ed.epoch,
            entries=len(entries),
            local=local,
        )

    def _on_log_event(self, event: pycrdt.ArrayEvent) -> None:
        # Called inside the transaction: only collect, decode afterwards.
        for part in event.delta:
            ins = part.get("insert")
            if ins:
                self._inbox.extend(ins)

    def _drain_inbox(self, out: list[KvDelta]) -> None:
        assert self.current is not None
        inbox, self._inbox = self._inbox, []
        for raw in inbox:
            for d in _decode_or_skip(self.engine_id, self.current.epoch, raw):
                self._note(d)
                self._emit(d, out)

    def _note(self, d: KvDelta) -> None:
        self.workers.add(d.worker)
        if d.seq >= 0:
            self.last_seq[d.worker] = d.seq

    def _emit(self, d: KvDelta, out: list[KvDelta]) -> None:
        out.append(d)
        if self.sink is not None:
            self.sink(d)

    # -- reading --------------------------------------------------------------
    def materialise_maps(self) -> LiveMaps:
        """The live mapping per worker, replayed from the current document."""
        live: LiveMaps = {}
        if self.current is None:
            return live
        for raw in self.current.entries():
            for d in _decode_or_skip(self.engine_id, self.current.epoch, raw):
                apply_delta(live, d)
        return live

    def materialise(self) -> dict[str, set[int]]:
        """The live router hashes per worker, replayed from the current document."""
        return live_sets(self.materialise_maps())

    def resume_seqs(self) -> dict[str, int]:
        """Per worker, the first engine sequence number not yet in the log."""
        return {w: s + 1 for w, s in self.last_seq.items()}

    def state_vector(self) -> bytes:
        ed = self.pending or self.current
        return ed.state_vector() if ed is not None else b"\x00"

    def encoded_size(self) -> int:
        return sum(len(ed.update_since()) for ed in (self.current, self.pending) if ed)


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
    """The single writer of one engine's log on its owner node.

    Keeps the live mapping per worker (needed for snapshots and handed to the
    adapter on takeover) and the entry bytes of the current document. Writes
    through the replica's current document, so the node's own view is the
    same object.
    """

    replica: EngineLogReplica
    node_id: str
    rng: random.Random
    policy: CompactionPolicy = field(default_factory=CompactionPolicy)
    live: LiveMaps = field(default_factory=dict)
    log_bytes: int = 0
    _length: int = 0  # entries in the current document
    _updates: list[bytes] = field(default_factory=list)
    _sub: object = None

    @property
    def engine_id(self) -> str:
        return self.replica.engine_id

    @property
    def epoch(self) -> Epoch:
        assert self.replica.current is not None
        return self.replica.current.epoch

    engine_blocks: int = 0  # mapped engine blocks (snapshot pairs), all workers
    ehash_bytes: int = 0  # encoded size of their non-identity engine hashes

    @property
    def live_blocks(self) -> int:
        """Live router hashes, all workers (O(live): for logs and tests)."""
        return sum(len(m.live()) for m in self.live.values())

    def snapshot_bytes(self) -> int:
        """What a snapshot of the live mapping would take (upper bound for
        64-bit router hashes)."""
        return HASH_BYTES * self.engine_blocks + self.ehash_bytes + SNAPSHOT_WORKER_BYTES * len(self.live)

    def mappings(self) -> dict[str, list[tuple[EngineHash, int]]]:
        """Per worker, the (engine hash, router hash) pairs (``BlockMapper.restore``)."""
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
        self.replica.pending = None
        self.replica._install(ed, None, notify=False, local=True)
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
        cur = self.replica.current
        return (
            cur is not None
            and self.replica.pending is None
            and self.replica._local
            and cur.epoch.owner == self.node_id
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
            n_eng, n_eb = len(m.to_router), m.ebytes
            for op in d.ops:
                m.apply(op)
            self.engine_blocks += len(m.to_router) - n_eng
            self.ehash_bytes += m.ebytes - n_eb
            self.replica._note(d)
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
            "log_compacted",
            engine=self.engine_id,
            epoch=new,
            bytes_before=before,
            bytes_after=self.log_bytes,
            live=self.live_blocks,
            update_bytes=len(update),
        )
        return new, update
