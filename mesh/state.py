"""``MeshState``: the replicated state of one node, without I/O.

Holds the engine registry, every engine's log (the owner side for engines this
node owns, the replica side for all), the load slots and the route hints.
Everything that leaves or enters is a msgspec struct (:class:`Delta`,
:class:`Summary`); the gRPC shell wraps their bytes (``encode``/``decode``).

* ``local_deltas(engine_id, deltas)`` (owner only) appends one log entry and
  returns the :class:`Delta` to gossip (with a compaction epoch if one was
  due). The caller applies the same deltas to its own index.
* ``apply_remote(delta, now)`` merges anything received and returns, in order,
  the ``KvDelta``s the local index must apply (an epoch switch arrives as
  CLEARs plus the new snapshot, see ``mesh/engine_log.py``).
* Anti-entropy: ``summary()`` (per engine epoch + pycrdt state vector, registry
  state vector, slot versions); ``diff(remote_summary, now)`` returns what the
  remote lacks. Two nodes that exchange summaries and apply each other's diffs
  converge; ``full_state(now)`` is the diff against nothing, for a joiner.
* Ownership: ``take_ownership(engine_id, now)`` starts term + 1 from this
  node's materialised view and returns the resume sequence and the engine
  hash -> router hash mapping per worker (``Takeover``); a
  node that learns of a higher epoch of an engine it owns stops owning it
  (``take_lost_ownership()`` tells the shell to stop that engine's adapter).
* ``drop_node(node_id, now)`` removes a dead or departed node's load slot.

What the shell must do (ownership is decided outside, by rendezvous hashing
over live members): apply the seed's ``full_state`` before taking ownership
of anything (a node that knows no epoch starts at term 1 and is fenced at
once); on ``take_lost_ownership()`` stop that engine's adapter and, if
membership still says this node owns it, ``take_ownership`` again (two nodes
handed the same engine before hearing of each other pick the same term; the
higher node id wins the tie and the other re-takes at term + 1); after
``take_ownership`` start the adapter at the returned resume points, with one
``BlockMapper.from_pairs(model, worker, takeover.mappings[worker])`` per worker
(a mapper started empty could not map removals of, or stores chained to,
blocks stored before the handover).

Route hints are pushed only (``add_hint`` -> Delta) and handed to joiners; they
are not part of the summary: they live ~2 s, less than an anti-entropy round
is worth.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, Union

import msgspec
import pycrdt
import structlog

from blocks.block_map import BlockMap
from blocks.delta import KvDelta
from mesh.engine_log import (
    CLIENT_ID_BITS,
    CompactionPolicy,
    EngineLogOwner,
    EngineLogReplica,
    Epoch,
    LogError,
    NotOwnerError,
    empty_update,
)
from mesh.hints import Hint, HintStore
from mesh.load_slots import EngineLoad, LoadSlots, Slot
from mesh.registry import Registry, RegistryError

log = structlog.get_logger(__name__)

__all__ = [
    "Delta",
    "EngineSummary",
    "LogUpdate",
    "MeshState",
    "MessageError",
    "NotOwnerError",
    "Summary",
    "Takeover",
    "decode",
    "encode",
    "merge_deltas",
]


class LogUpdate(msgspec.Struct, array_like=True, gc=False):
    engine_id: str
    epoch: Epoch
    update: bytes  # pycrdt v1 update of that epoch's document


class Delta(msgspec.Struct, tag="delta", kw_only=True, gc=False):
    """Anything a node gossips: log updates, registry update, slots, hints."""

    sender: str
    logs: list[LogUpdate] = []
    registry: bytes | None = None
    slots: list[Slot] = []
    hints: list[Hint] = []

    def is_empty(self) -> bool:
        return not (self.logs or self.registry or self.slots or self.hints)


class EngineSummary(msgspec.Struct, array_like=True, gc=False):
    engine_id: str
    epoch: Epoch
    state_vector: bytes


class Summary(msgspec.Struct, tag="summary", kw_only=True, gc=False):
    sender: str
    engines: list[EngineSummary] = []
    registry_sv: bytes = b"\x00"
    slots: dict[str, int] = {}


class Takeover(msgspec.Struct, gc=False):
    epoch: Epoch
    resume: dict[str, int]  # worker -> first engine sequence number to fetch
    message: Delta
    # worker -> its live (engine hash, router hash) pairs: BlockMapper.from_pairs
    mappings: dict[str, list[tuple[int | bytes, int]]] = {}


Message = Union[Delta, Summary]

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Message)


class MessageError(ValueError):
    """Bytes that are not a mesh message."""


def encode(msg: Message) -> bytes:
    return _enc.encode(msg)


def decode(raw: bytes) -> Message:
    try:
        return _dec.decode(raw)
    except msgspec.DecodeError as e:
        raise MessageError(f"malformed mesh message: {e}") from None


def merge_deltas(sender: str, deltas: Iterable[Delta]) -> Delta:
    """Coalesce several outgoing Deltas: one merged pycrdt update per epoch doc."""
    by_doc: dict[tuple[str, Epoch], list[bytes]] = {}
    regs: list[bytes] = []
    slots: dict[str, Slot] = {}
    hints: dict[tuple[str, int], Hint] = {}
    for d in deltas:
        for lu in d.logs:
            by_doc.setdefault((lu.engine_id, lu.epoch), []).append(lu.update)
        if d.registry:
            regs.append(d.registry)
        for s in d.slots:
            if s.node_id not in slots or slots[s.node_id].version < s.version:
                slots[s.node_id] = s
        for h in d.hints:
            hints[(h.origin, h.hid)] = h
    logs = [
        LogUpdate(e, ep, ups[0] if len(ups) == 1 else pycrdt.merge_updates(*ups))
        for (e, ep), ups in by_doc.items()
    ]
    reg = None
    if regs:
        reg = regs[0] if len(regs) == 1 else pycrdt.merge_updates(*regs)
    return Delta(
        sender=sender,
        logs=logs,
        registry=reg,
        slots=list(slots.values()),
        hints=list(hints.values()),
    )


class MeshState:
    """The replicated state of node ``node_id`` (see module docstring)."""

    def __init__(
        self,
        node_id: str,
        now: float,
        rng: random.Random | None = None,
        *,
        compaction: CompactionPolicy | None = None,
        hint_ttl: float = 2.0,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must be non-empty")
        self.node_id = node_id
        self.rng = rng or random.Random()
        self.policy = compaction or CompactionPolicy()
        self.registry = Registry(self._client_id())
        self.logs: dict[str, EngineLogReplica] = {}
        self.owners: dict[str, EngineLogOwner] = {}
        self.slots = LoadSlots(node_id, now)
        self.hints = HintStore(node_id, ttl=hint_ttl)
        self._lost: list[str] = []
        self._outbox: list[Delta] = []

    def _client_id(self) -> int:
        return self.rng.getrandbits(CLIENT_ID_BITS) or 1

    def _replica(self, engine_id: str) -> EngineLogReplica:
        r = self.logs.get(engine_id)
        if r is None:
            r = self.logs[engine_id] = EngineLogReplica(engine_id)
        return r

    # -- registry -----------------------------------------------------------------
    def register_engine(self, engine_id: str, spec: dict[str, Any]) -> Delta:
        return Delta(sender=self.node_id, registry=self.registry.register(engine_id, spec))

    def deregister_engine(self, engine_id: str) -> Delta | None:
        """Remove an engine; if this node owns it, its log is also retired."""
        upd = self.registry.deregister(engine_id)
        if upd is None:
            return None
        out = Delta(sender=self.node_id, registry=upd)
        retired = self._retire(engine_id)
        if retired is not None:
            out = merge_deltas(self.node_id, [out, retired])
        return out

    def engines(self) -> dict[str, dict[str, Any]]:
        return self.registry.engines()

    def _retire(self, engine_id: str) -> Delta | None:
        """Owner of a deregistered engine: empty its log in a new epoch, stop owning.

        Every index drops the engine's blocks; the small remaining document keeps
        fencing stale gossip of the old epochs.
        """
        owner = self.owners.pop(engine_id, None)
        if owner is None or not owner.owns():
            return None
        old = owner.epoch
        epoch = Epoch(old.term, self.node_id, old.gen + 1, owner.new_doc_id())
        empty = {w: BlockMap(refs=False) for w in owner.live}
        update = owner.start_epoch(epoch, empty, dict(owner.replica.last_seq))
        log.info("engine_log_retired", engine=engine_id, epoch=epoch)
        return Delta(sender=self.node_id, logs=[LogUpdate(engine_id, epoch, update)])

    # -- engine logs: owner side ----------------------------------------------------
    def take_ownership(self, engine_id: str, now: float) -> Takeover:
        """Become the single writer of ``engine_id``'s log (term + 1).

        The new epoch starts from this node's materialised view; events that the
        previous owner wrote but this node has not seen are not lost: the
        returned resume points make the adapter replay them from the engine,
        and the returned mappings are exactly the state a mapper has after
        the events before those points.
        """
        rep = self._replica(engine_id)
        known = rep.known_epoch
        term = known.term + 1 if known is not None else 1
        live = rep.materialise_maps()
        seqs = dict(rep.last_seq)
        owner = EngineLogOwner(rep, self.node_id, self.rng, self.policy)
        epoch = Epoch(term, self.node_id, 0, owner.new_doc_id())
        update = owner.start_epoch(epoch, live, seqs)
        self.owners[engine_id] = owner
        if engine_id in self._lost:
            self._lost.remove(engine_id)
        log.info(
            "engine_ownership_taken",
            engine=engine_id,
            node=self.node_id,
            epoch=epoch,
            previous=known,
            live=owner.live_blocks,
            now=now,
        )
        return Takeover(
            epoch=epoch,
            resume=rep.resume_seqs(),
            message=Delta(sender=self.node_id, logs=[LogUpdate(engine_id, epoch, update)]),
            mappings=owner.mappings(),
        )

    def release_ownership(self, engine_id: str) -> None:
        """Stop writing (graceful handover): the next owner takes over from the log."""
        self.owners.pop(engine_id, None)

    def owned_engines(self) -> list[str]:
        return [e for e, o in self.owners.items() if o.owns()]

    def is_owner(self, engine_id: str) -> bool:
        o = self.owners.get(engine_id)
        return o is not None and o.owns()

    def local_deltas(self, engine_id: str, deltas: Iterable[KvDelta]) -> Delta:
        """Append the deltas of an owned engine as one entry; returns what to gossip.

        Raises :class:`NotOwnerError` if this node does not (or no longer) own
        the engine and :class:`LogError` for an invalid delta; either way
        nothing was written.
        """
        owner = self.owners.get(engine_id)
        if owner is None or not owner.owns():
            self._note_lost(engine_id)
            raise NotOwnerError(f"{self.node_id} does not own engine {engine_id}")
        update = owner.append(deltas)
        logs = [LogUpdate(engine_id, owner.epoch, update)]
        compacted = owner.maybe_compact()
        if compacted is not None:
            # The new epoch supersedes the entry above everywhere; sending both is
            # harmless and lets a replica still on the old epoch stay current.
            logs.append(LogUpdate(engine_id, compacted[0], compacted[1]))
        return Delta(sender=self.node_id, logs=logs)

    def _note_lost(self, engine_id: str) -> None:
        if engine_id in self.owners:
            del self.owners[engine_id]
            self._lost.append(engine_id)
            rep = self.logs.get(engine_id)
            log.warning(
                "engine_ownership_lost",
                engine=engine_id,
                node=self.node_id,
                epoch=rep.known_epoch if rep else None,
            )

    def take_lost_ownership(self) -> list[str]:
        """Engines this node owned until a higher epoch fenced it (drains)."""
        for e in [e for e, o in self.owners.items() if not o.owns()]:
            self._note_lost(e)
        lost, self._lost = self._lost, []
        return lost

    def take_outgoing(self) -> list[Delta]:
        """Messages produced while applying remote state (drains)."""
        out, self._outbox = self._outbox, []
        return out

    # -- engine logs: reading ----------------------------------------------------------
    def materialise(self, engine_id: str) -> dict[str, set[int]]:
        rep = self.logs.get(engine_id)
        return rep.materialise() if rep else {}

    def resume_seqs(self, engine_id: str) -> dict[str, int]:
        rep = self.logs.get(engine_id)
        return rep.resume_seqs() if rep else {}

    def epoch(self, engine_id: str) -> Epoch | None:
        rep = self.logs.get(engine_id)
        return rep.epoch if rep else None

    # -- load and hints -------------------------------------------------------------------
    def add_load(self, engine_id: str, requests: int, tokens: int, now: float) -> Delta:
        slot = self.slots.add_local(engine_id, requests, tokens, now)
        return Delta(sender=self.node_id, slots=[slot])

    def engine_load(self, engine_id: str) -> EngineLoad:
        return self.slots.load(engine_id)

    def drop_node(self, node_id: str, now: float) -> bool:
        """A node left or died: its load no longer counts."""
        dropped = self.slots.drop(node_id, now)
        if dropped:
            log.info("node_slot_dropped", node=node_id, by=self.node_id)
        return dropped

    def add_hint(self, worker: str, hashes: list[int], now: float) -> Delta:
        return Delta(sender=self.node_id, hints=[self.hints.add_local(worker, hashes, now)])

    def hint_overlap(self, hashes: list[int], now: float) -> dict[str, int]:
        return self.hints.overlap(hashes, now)

    def expire(self, now: float) -> None:
        self.hints.expire(now)
        self.slots.expire(now)

    # -- receiving ----------------------------------------------------------------------
    def apply_remote(self, message: Delta | bytes, now: float) -> list[KvDelta]:
        """Merge a received Delta; returns the index changes, in order.

        A bad part (malformed update, unknown message) is logged and skipped;
        the other parts still apply.
        """
        if isinstance(message, (bytes, bytearray, memoryview)):
            message = decode(bytes(message))  # MessageError for garbage
        if not isinstance(message, Delta):
            raise MessageError(f"expected a Delta, got {type(message).__name__}")
        changes: list[KvDelta] = []
        for lu in message.logs:
            self._apply_log(lu, changes, message.sender)
        if message.registry:
            try:
                _, removed = self.registry.apply(message.registry)
            except RegistryError as e:
                log.warning("registry_update_rejected", sender=message.sender, error=str(e))
            else:
                for engine_id in removed:
                    retired = self._retire(engine_id)
                    if retired is not None:
                        self._outbox.append(retired)
        for s in message.slots:
            self.slots.merge(s)
        if message.hints:
            self.hints.merge(message.hints, now)
        return changes

    def _apply_log(self, lu: LogUpdate, changes: list[KvDelta], sender: str) -> None:
        if not lu.engine_id or "#dp" in lu.engine_id:
            log.warning("log_update_bad_engine", engine=lu.engine_id, sender=sender)
            return
        rep = self._replica(lu.engine_id)
        try:
            changes.extend(rep.apply(lu.epoch, lu.update))
        except LogError as e:
            log.warning("log_update_rejected", engine=lu.engine_id, sender=sender, error=str(e))
        owner = self.owners.get(lu.engine_id)
        if owner is not None and not owner.owns():
            self._note_lost(lu.engine_id)

    # -- anti-entropy --------------------------------------------------------------------
    def summary(self) -> Summary:
        engines = []
        for e, rep in sorted(self.logs.items()):
            ep = rep.known_epoch
            if ep is not None:
                engines.append(EngineSummary(e, ep, rep.state_vector()))
        return Summary(
            sender=self.node_id,
            engines=engines,
            registry_sv=self.registry.state_vector(),
            slots=self.slots.versions(),
        )

    def diff(self, remote: Summary, now: float) -> list[Delta]:
        """What the node that sent ``remote`` lacks: one Delta per engine, one for the rest."""
        out: list[Delta] = []
        theirs = {es.engine_id: es for es in remote.engines}
        for e, rep in sorted(self.logs.items()):
            logs = []
            es = theirs.get(e)
            for ed in (rep.current, rep.pending):
                if ed is None or (es is not None and ed.epoch < es.epoch):
                    continue
                sv = es.state_vector if es is not None and es.epoch == ed.epoch else None
                if sv is not None and sv == ed.state_vector():
                    continue
                try:
                    upd = ed.update_since(sv)
                except ValueError:  # their state vector is garbage: send it all
                    upd = ed.update_since()
                if not empty_update(upd):
                    logs.append(LogUpdate(e, ed.epoch, upd))
            if logs:
                out.append(Delta(sender=self.node_id, logs=logs))
        rest = Delta(sender=self.node_id, slots=self.slots.newer_than(remote.slots))
        if remote.registry_sv != self.registry.state_vector():
            try:
                upd = self.registry.update_since(remote.registry_sv)
            except ValueError:
                upd = self.registry.update_since()
            if not empty_update(upd):
                rest.registry = upd
        if not rest.is_empty():
            out.append(rest)
        return out

    def full_state(self, now: float) -> Delta:
        """Everything, for a joining node (including live hints)."""
        logs = []
        for e, rep in sorted(self.logs.items()):
            for ed in (rep.current, rep.pending):
                if ed is not None:
                    logs.append(LogUpdate(e, ed.epoch, ed.update_since()))
        return Delta(
            sender=self.node_id,
            logs=logs,
            registry=self.registry.update_since(),
            slots=list(self.slots.slots.values()),
            hints=self.hints.live(now),
        )

    def encoded_size(self) -> int:
        """Bytes of the full-state updates of all CRDT documents."""
        return sum(r.encoded_size() for r in self.logs.values()) + len(self.registry.update_since())
