"""``MeshState``: the replicated state of one node, without I/O.

Holds the engine registry, every engine's log (the owner side for engines this
node owns, the replica side for all), the load slots and the route hints.
Everything that leaves or enters is a payload of :mod:`mesh.state_messages`
(:class:`Delta`, :class:`Summary`).

* ``local_deltas(engine_id, deltas)`` (owner only) appends one log entry and
  returns the :class:`Delta` to gossip (with a compaction epoch if one was
  due). The caller applies the same deltas to its own index.
* ``apply_remote(delta, now)`` merges anything received and says what it
  changed (:class:`Applied`): the ``KvDelta``s the local index must apply, in
  order (an epoch switch arrives as CLEARs plus the new snapshot, see
  :mod:`mesh.engine_log.replica`; with ``packed``, one ``PackedEntry`` per
  log entry, :mod:`mesh.engine_log.packed`), and the part of the input that was new
  here, measured exactly (the pycrdt diff of each document before and after),
  which is what a node forwards: duplicates and echoes never are, and an
  out-of-order update is forwarded once it becomes integrable. The registry
  is the exception: when it changed, all of it is forwarded (see
  ``_apply_registry``).
* Anti-entropy: ``summary()`` (per engine epoch + pycrdt state vector, registry
  state vector, slot versions); ``diff(remote_summary)`` returns what the
  remote lacks. Two nodes that exchange summaries and apply each other's diffs
  converge; ``full_state(now)`` is the diff against nothing, for a joiner.
* Ownership: ``take_ownership(engine_id, now)`` starts term + 1 from this
  node's materialised view and returns the resume sequence and the engine
  hash -> router hash mapping per worker (``Takeover``); a node that learns
  of a higher epoch of an engine it owns stops owning it
  (``take_lost_ownership()`` tells the caller to stop that engine's adapter).
* ``drop_node(node_id, now)`` removes a dead or departed node's load slot.

What the caller must do (ownership is decided outside, by rendezvous hashing
over live members): apply the seed's ``full_state`` before taking ownership
of anything (a node that knows no epoch starts at term 1 and is fenced at
once); on ``take_lost_ownership()`` stop that engine's adapter and, if
membership still says this node owns it, ``take_ownership`` again (two nodes
handed the same engine before hearing of each other pick the same term; the
higher node id wins the tie and the other re-takes at term + 1); after
``take_ownership`` start the adapter at the returned resume points, with one
``BlockMapper`` per worker restored from ``takeover.mappings[worker]`` (a
mapper started empty could not map removals of, or stores chained to, blocks
stored before the handover).

Route hints are pushed only (``add_hint`` -> Delta) and handed to joiners; they
are not part of the summary: they live for less time than an anti-entropy
round is worth.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from blocks.block_map import MappedBlock
from blocks.workers import DP_SEPARATOR
from mesh.engine_log.entry import LogError, NotOwnerError
from mesh.engine_log.epoch import CLIENT_ID_BITS, Epoch, EpochDoc, empty_update
from mesh.engine_log.owner import CompactionPolicy, EngineLogOwner
from mesh.engine_log.packed import IndexChange
from mesh.engine_log.replica import EngineLogReplica
from mesh.hints import HintStore
from mesh.load_slots import LoadSlots
from mesh.registry import Registry, RegistryError
from mesh.state_messages import Delta, EngineSummary, LogUpdate, Summary, merge_deltas

__all__ = ["Applied", "MeshState", "Takeover"]

log = structlog.get_logger(__name__)


class Takeover(msgspec.Struct, gc=False):
    """What a new owner of an engine starts from (``MeshState.take_ownership``)."""

    epoch: Epoch
    resume: dict[str, int]  # worker -> first engine sequence number to fetch
    message: Delta
    # worker -> its live (engine hash, router hash[, tier]) blocks, to restore its BlockMapper
    mappings: dict[str, list[MappedBlock]] = {}


@dataclass
class Applied:
    """What one received Delta changed on this node."""

    index_changes: list[IndexChange] = field(default_factory=list)  # for the index, in order
    new: Delta | None = None  # the parts that were new here (what to forward); None: nothing


class MeshState:
    """The replicated state of node ``node_id`` (see module docstring)."""

    def __init__(
        self,
        node_id: str,
        now: float,
        rng: random.Random,
        *,
        hint_ttl: float,
        compaction: CompactionPolicy | None = None,
        packed: bool = False,  # the caller's choice: MeshConfig.packed_entries
    ) -> None:
        if not node_id:
            raise ValueError("node_id must be non-empty")
        self.node_id = node_id
        self.packed = packed
        self.rng = rng
        self.policy = compaction or CompactionPolicy()
        self.registry = Registry(self._client_id(), node_id)
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
            r = self.logs[engine_id] = EngineLogReplica(engine_id, packed=self.packed, node_id=self.node_id)
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
        fencing stale gossip of the old epochs. The log also forgets how far
        it had read the engine's stream: registered again, the engine is read
        from the start of its replay buffer, as a new one (resuming after its
        last batch would leave the blocks it still holds unknown for good).
        """
        owner = self.owners.pop(engine_id, None)
        if owner is None or not owner.owns():
            return None
        old = owner.epoch
        epoch = Epoch(old.term, self.node_id, old.gen + 1, owner.new_doc_id())
        update = owner.start_epoch(epoch, owner.live.emptied(), {})
        log.info("engine_log.retired", engine=engine_id, node=self.node_id, epoch=epoch)
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
        live = rep.materialise_live()
        seqs = dict(rep.last_seq)
        owner = EngineLogOwner(rep, self.node_id, self.rng, self.policy)
        epoch = Epoch(term, self.node_id, 0, owner.new_doc_id())
        update = owner.start_epoch(epoch, live, seqs)
        self.owners[engine_id] = owner
        if engine_id in self._lost:
            self._lost.remove(engine_id)
        log.info(
            "engine_log.ownership_taken",
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
        """Engines whose log this node writes (and has not been fenced from)."""
        return [e for e, o in self.owners.items() if o.owns()]

    def local_deltas(self, engine_id: str, deltas: Iterable[IndexChange]) -> Delta:
        """Append the deltas (or packed entries) of an owned engine as one
        entry; returns what to gossip.

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
            # A higher epoch fenced us: a node that rejoined or took over
            # before our release reached it; its adapter replays from the engine.
            log.info(
                "engine_log.ownership_lost",
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
        """Deltas produced while applying remote state, to gossip (drains)."""
        out, self._outbox = self._outbox, []
        return out

    # -- engine logs: reading ----------------------------------------------------------
    def resume_seqs(self, engine_id: str) -> dict[str, int]:
        rep = self.logs.get(engine_id)
        return rep.resume_seqs() if rep else {}

    def epoch(self, engine_id: str) -> Epoch | None:
        rep = self.logs.get(engine_id)
        return rep.epoch if rep else None

    # -- load and hints -------------------------------------------------------------------
    def drop_node(self, node_id: str, now: float) -> bool:
        """A node left or died: its load no longer counts."""
        dropped = self.slots.drop(node_id, now)
        if dropped:
            log.info("mesh.slot_dropped", node=self.node_id, member=node_id)
        return dropped

    def add_hint(self, worker: str, hashes: list[int], now: float) -> Delta:
        return Delta(sender=self.node_id, hints=[self.hints.add_local(worker, hashes, now)])

    def hint_overlap(self, hashes: list[int], now: float) -> dict[str, int]:
        return self.hints.overlap(hashes, now)

    def expire(self, now: float) -> None:
        self.hints.expire(now)
        self.slots.expire(now)

    # -- receiving ----------------------------------------------------------------------
    def apply_remote(self, message: Delta, now: float) -> Applied:
        """Merge a received Delta; say what changed (index changes, what was new).

        A bad part (malformed update, bad engine id) is logged and skipped;
        the other parts still apply.
        """
        out = Applied()
        new = Delta(sender=self.node_id)
        for lu in message.logs:
            fresh = self._apply_log(lu, out.index_changes, message.sender)
            if fresh is not None:
                new.logs.append(fresh)
        if message.registry:
            new.registry = self._apply_registry(message.registry, message.sender)
        new.slots = [s for s in message.slots if self.slots.merge(s)]
        if message.hints:
            new.hints = self.hints.merge(message.hints, now)
        if not new.is_empty():
            out.new = new
        return out

    def _apply_log(self, lu: LogUpdate, changes: list[IndexChange], sender: str) -> LogUpdate | None:
        """Apply one log update; returns the part of it that was new here."""
        if not lu.engine_id or DP_SEPARATOR in lu.engine_id:
            log.warning("mesh.log_update_bad_engine", node=self.node_id, engine=lu.engine_id, member=sender)
            return None
        rep = self._replica(lu.engine_id)
        before = rep.doc_for(lu.epoch)
        sv = before.state_vector() if before is not None else None
        try:
            changes.extend(rep.apply(lu.epoch, lu.update))
        except LogError as e:
            log.warning(
                "mesh.log_update_rejected",
                node=self.node_id,
                engine=lu.engine_id,
                member=sender,
                error=str(e),
            )
        owner = self.owners.get(lu.engine_id)
        if owner is not None and not owner.owns():
            self._note_lost(lu.engine_id)
        after = rep.doc_for(lu.epoch)
        if after is None:
            return None  # fenced or rejected
        if sv is None:
            return lu  # a document new to this node: all of it was new
        return _new_since(lu, after, sv)

    def _apply_registry(self, update: bytes, sender: str) -> bytes | None:
        """Apply a registry update; returns what to forward: the whole
        registry when the update changed it, else None.

        Not just the new part: when two nodes register the same engine
        concurrently, the losing value is deleted where both meet, and a
        new part would carry that delete without the winning value, which
        the forwarder already had. The loser's node would then see the
        engine deregistered for a while and retire its log (an empty epoch:
        the engine's index gone on every node). Meshes formed apart that
        merge both registered their engines; so may routers started with
        the same ``--engine`` flags. The registry is a handful of engines
        and changes rarely: sending it whole costs little.
        """
        sv = self.registry.state_vector()
        try:
            changed, removed = self.registry.apply(update)
        except RegistryError as e:
            log.warning("mesh.registry_update_rejected", node=self.node_id, member=sender, error=str(e))
            return None
        for engine_id in removed:
            retired = self._retire(engine_id)
            if retired is not None:
                self._outbox.append(retired)
        # New here: new items, or engines it added or removed (a delete does
        # not move the state vector, and a relay must forward it too).
        if self.registry.state_vector() == sv and not changed and not removed:
            return None
        return self.registry.update_since()

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
            registry_digest=self.registry.digest(),
            slots=self.slots.versions(),
        )

    def diff(self, remote: Summary) -> list[Delta]:
        """What the node that sent ``remote`` lacks: one Delta per engine, one for the rest."""
        out: list[Delta] = []
        theirs = {es.engine_id: es for es in remote.engines}
        for e, rep in sorted(self.logs.items()):
            logs = _log_diff(e, rep, theirs.get(e))
            if logs:
                out.append(Delta(sender=self.node_id, logs=logs))
        rest = Delta(sender=self.node_id, slots=self.slots.newer_than(remote.slots))
        if remote.registry_sv != self.registry.state_vector():
            try:
                upd = self.registry.update_since(remote.registry_sv)
            except ValueError:  # their state vector is garbage: send it all
                upd = self.registry.update_since()
            if not empty_update(upd):
                rest.registry = upd
        elif remote.registry_digest and remote.registry_digest != self.registry.digest():
            # Same items, other content: one of us missed a deregistration
            # (deletes travel in the whole update, not in a state-vector diff
            # of equal vectors). Ours whole; theirs whole comes back if we are the one.
            rest.registry = self.registry.update_since()
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


def _new_since(lu: LogUpdate, doc: EpochDoc, sv: bytes) -> LogUpdate | None:
    """The part of ``doc`` added since state vector ``sv`` (None if nothing)."""
    upd = doc.changes_since(sv)
    return None if upd is None else LogUpdate(lu.engine_id, lu.epoch, upd)


def _log_diff(engine_id: str, rep: EngineLogReplica, theirs: EngineSummary | None) -> list[LogUpdate]:
    """The updates of ``rep``'s documents that a node summarised by ``theirs`` lacks."""
    logs = []
    for ed in (rep.current, rep.pending):
        if ed is None or (theirs is not None and ed.epoch < theirs.epoch):
            continue
        sv = theirs.state_vector if theirs is not None and theirs.epoch == ed.epoch else None
        if sv is not None and sv == ed.state_vector():
            continue
        try:
            upd = ed.update_since(sv)
        except ValueError:  # their state vector is garbage: send it all
            upd = ed.update_since()
        if not empty_update(upd):
            logs.append(LogUpdate(engine_id, ed.epoch, upd))
    return logs
