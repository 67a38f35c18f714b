"""``MeshCore``: one router node's mesh logic, sans I/O.

Composes the pieces of the mesh into the one state machine that the gRPC
shell drives and the seeded simulation (``kvmesh/simulation/``) runs by the
hundred:

* membership (:mod:`mesh.membership`, SWIM): who is alive;
* the replicated state (:mod:`mesh.state`): engine logs, registry, load
  slots, route hints;
* readiness (:mod:`mesh.readiness`): a joiner applies a ready peer's full
  state before it owns anything;
* ownership (:mod:`mesh.ownership`): rendezvous hashing over the live
  members (alive + suspect: a suspect is not moved, to avoid flapping)
  decides which node consumes each engine's events;
* dissemination: the epidemic push (:mod:`mesh.gossip`) and the periodic
  summary exchange (:mod:`mesh.anti_entropy`);
* the load slot's publication (:mod:`mesh.load_publisher`).

It reads no clock and no global randomness: time comes in as ``now`` and
randomness from the ``random.Random`` it is given; everything it does is a
function of those and of the messages it is handed.

Inputs: ``join``/``add_seeds``/``leave``, ``tick(now)`` (call at ``next_deadline()`` or
sooner), ``handle(msg, now)`` for every received message, and the local
calls ``register_engine``/``deregister_engine``, ``engine_deltas`` (from this
node's KV-event adapters), ``set_local_load``, ``add_hint``.
Outputs (drain them after every input): ``take_sends()`` (messages, each
addressed by ``dst``), ``take_index_changes()`` (``KvDelta``s, or packed
log entries, :mod:`mesh.engine_log.packed`, for this node's prefix index, in
order) and ``take_effects()`` (:mod:`mesh.effects`: start or
stop an engine adapter, engine added or removed, member changed).

After every input the core *settles* (:meth:`MeshCore._settle`): any input can
change membership (a piggybacked update), the registry (a state push) or an
engine's epoch (another node took it), and each of those can change what
this node owns. Settling turns membership events into effects, the registry
into engine effects, fenced engines into ``StopOwning``, and, when any of
them changed (or every ``ownership_check_interval``), re-plans ownership.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog

from blocks.delta import OP_CLEAR, KvDelta, KvOp
from blocks.workers import engine_of
from mesh.anti_entropy import AntiEntropy
from mesh.counters import ConvergenceLag, Counters, decode_state_vector
from mesh.effects import Effect, EngineAdded, EngineRemoved, MemberChanged, StartOwning, StopOwning
from mesh.engine_log.entry import NotOwnerError
from mesh.engine_log.owner import CompactionPolicy
from mesh.engine_log.packed import PACKED, PACKED_BUILT, IndexChange, as_one_entry, workers_of
from mesh.gossip import StateGossip
from mesh.load_publisher import LoadPublisher
from mesh.membership import Membership, MembershipConfig
from mesh.ownership import OwnershipTracker, owner_of
from mesh.readiness import AskFullState, BecomeReady, Readiness
from mesh.state import MeshState
from mesh.state_messages import (
    Delta,
    MessageError,
    StateMessage,
    StatePush,
    Summary,
    SyncReply,
    SyncRequest,
    decode_delta,
    decode_summary,
    merge_deltas,
)
from mesh.swim_messages import MemberRecord, SwimMessage

__all__ = ["MeshConfig", "MeshCore"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class MeshConfig:
    """Timing and bounds of one node's mesh logic (seconds, counts, bytes).

    Membership's own settings (probes, suspicion, gossip interval and
    retransmit multiplier, shared by the state push) are in ``membership``.
    """

    membership: MembershipConfig = field(default_factory=MembershipConfig)
    gossip_fanout: int = 3  # peers per state push
    anti_entropy_interval: float = 2.0
    load_interval: float = 0.2
    load_refresh_interval: float = 30.0  # and whenever our incarnation rises
    # Soft cap of one push (the oldest delta always goes, however big).
    max_push_bytes: int = 1 << 20
    max_queued_items: int = 4096  # forward queue bound (most-sent, oldest dropped first)
    max_queued_bytes: int = 64 << 20  # and its bound in bytes
    full_state_retry: float = 1.0  # joiner: ask another peer after this long
    bootstrap_wait: float = 4.0  # cold start: see mesh/readiness.py
    retake_backoff: float = 0.5  # see mesh/ownership.py
    ownership_check_interval: float = 1.0
    hint_ttl: float = 2.0  # how long a route hint counts as cached blocks
    # A new route hint (and this node's load) goes out this soon rather than
    # at the next round: requests for one prefix that reach two nodes within a
    # gossip interval would otherwise split across engines.
    hint_push_delay: float = 0.01
    compaction: CompactionPolicy | None = None
    # Hand the index each replicated entry as one PackedEntry, decoded in Rust
    # (mesh/engine_log/packed.py): when the native module is built and
    # KVMESH_PURE_PYTHON=1 is not set. A router node sets it exactly when its
    # index is native.
    packed_entries: bool = PACKED
    # An owner writes the frames an engine's adapter drained in one burst as
    # one log entry, up to about this many blocks (one write and one gossip
    # item instead of one per frame; bounded so an entry stays far below
    # max_push_bytes).
    max_entry_blocks: int = 4096

    def __post_init__(self) -> None:
        if self.max_entry_blocks < 1:
            raise ValueError(f"max_entry_blocks must be >= 1, got {self.max_entry_blocks}")
        if self.packed_entries and not PACKED_BUILT:
            raise ValueError("packed_entries needs the native module (native/, `make install`)")
        for name in (
            "anti_entropy_interval",
            "load_interval",
            "load_refresh_interval",
            "full_state_retry",
            "ownership_check_interval",
            "hint_ttl",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("gossip_fanout", "max_push_bytes", "max_queued_items", "max_queued_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bootstrap_wait < 0 or self.retake_backoff < 0 or self.hint_push_delay < 0:
            raise ValueError("bootstrap_wait, retake_backoff and hint_push_delay must be >= 0")


MeshMessage = SwimMessage | StateMessage
_SWIM_TYPES = frozenset(SwimMessage.__args__)


class MeshCore:
    """One node of the mesh (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        addr: str,
        now: float,
        rng: random.Random,
        config: MeshConfig | None = None,
    ) -> None:
        self.config = cfg = config or MeshConfig()
        self.node_id = node_id
        self.addr = addr
        self._rng = rng
        self._log = log.bind(node=node_id)
        self.membership = Membership(node_id, addr, cfg.membership, now, rng, logger=self._log)
        # A child RNG for the CRDT ids: its draws do not shift membership's.
        self.state = MeshState(
            node_id,
            now,
            random.Random(rng.getrandbits(64)),
            compaction=cfg.compaction,
            hint_ttl=cfg.hint_ttl,
            packed=cfg.packed_entries,
        )
        self.readiness = Readiness(node_id, cfg.full_state_retry, cfg.bootstrap_wait)
        self.ownership = OwnershipTracker(node_id, cfg.retake_backoff)
        self.gossip = StateGossip(
            node_id,
            cfg.gossip_fanout,
            cfg.membership.retransmit_mult,
            cfg.max_push_bytes,
            cfg.max_queued_items,
            cfg.max_queued_bytes,
        )
        self.counters = Counters()
        self.lag = ConvergenceLag()  # how far behind the peers' copies of our logs are (metrics)
        # Timers, each with a random phase: nodes started together do not
        # gossip in lockstep. The order of these draws is part of the seeded
        # simulations' reproducibility.
        self._next_gossip = now + rng.uniform(0, cfg.membership.gossip_interval)
        self.anti_entropy = AntiEntropy(addr, self.state, cfg.anti_entropy_interval, now, rng)
        self.load_publisher = LoadPublisher(
            cfg.load_interval, cfg.load_refresh_interval, now, rng, self.membership.incarnation
        )
        self._next_reconcile = now + cfg.ownership_check_interval
        # Outputs, drained by the shell.
        self._sends: list[MeshMessage] = []
        self._effects: list[Effect] = []
        self._index: list[IndexChange] = []
        self._local_out: list[Delta] = []  # this node's own deltas, pushed next round
        # Views kept in step with the inputs.
        self._engines: dict[str, dict[str, Any]] = {}
        self._reg_version = -1
        self._workers: dict[str, set[str]] = {}  # engine -> workers seen in index changes
        self._live: list[str] = [node_id]
        self._live_addr: dict[str, str] = {node_id: addr}
        self._members_dirty = True
        self._owners_dirty = True

    # --- lifecycle ---------------------------------------------------------------------------

    def join(self, seed_addrs: list[str], now: float) -> None:
        """Join through any of ``seed_addrs``; ``[]`` (or only our own address)
        starts a new mesh and the node is ready at once."""
        if self.readiness.started:
            raise RuntimeError(f"{self.node_id} already joined")
        self._membership_sends(self.membership.join(seed_addrs, now))
        self.readiness.start(alone=self.membership.joined, now=now)
        self._owners_dirty = True
        self._settle(now)

    def add_seeds(self, seed_addrs: list[str], now: float) -> None:
        """Addresses the seed names resolve to now; the shell resolves them
        again until the node has peers and periodically after. Addresses of
        nodes outside this mesh get a push-pull (:meth:`Membership.add_seeds`):
        two meshes that formed apart merge their members, then their state
        through anti-entropy, where epoch order settles each engine's log."""
        self._membership_sends(self.membership.add_seeds(seed_addrs, now))
        self._settle(now)

    def has_peers(self) -> bool:
        """Whether any other node is live in this node's view."""
        return len(self._live_ids()) > 1

    def leave(self, now: float) -> None:
        """Leave gracefully: hand every engine over, flush, gossip ``Leave``.

        Keep calling ``tick`` until :meth:`leave_done` (or a grace period) so
        the Leave and the last deltas spread, then stop the node.
        """
        if self.readiness.leaving:
            return
        for e in sorted(self.ownership.owned):
            self._release(e, "leaving")
        self.readiness.leave()
        self._push_round(now)  # our last deltas go before anyone takes over
        self._next_gossip = now + self.config.membership.gossip_interval
        self._membership_sends(self.membership.leave(now))
        self._settle(now)

    def leave_done(self) -> bool:
        """True once the Leave has been gossiped its full retransmit count."""
        return self.membership.leave_done()

    @property
    def ready(self) -> bool:
        return self.readiness.ready

    @property
    def leaving(self) -> bool:
        return self.readiness.leaving

    # --- time ---------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        cfg = self.config
        self._membership_sends(self.membership.tick(now))
        self._settle(now)
        self._join_step(now)
        slot = self.load_publisher.tick(now, self.state.slots, self.membership.incarnation)
        if slot is not None:
            self._local_out.append(Delta(sender=self.node_id, slots=[slot]))
        if now >= self._next_gossip:
            self._next_gossip = now + cfg.membership.gossip_interval
            self._push_round(now)
        if self.anti_entropy.due(now):
            idle = self.readiness.joining or self.readiness.leaving
            req = self.anti_entropy.request(
                now, [] if idle else self._peers(), len(self._live_ids()), self._rng
            )
            if req is not None:
                self._send(req)
        if now >= self._next_reconcile:
            self._next_reconcile = now + cfg.ownership_check_interval
            self.state.expire(now)
            self.ownership.expire(now)
            self._owners_dirty = True
            self._settle(now)

    def next_deadline(self) -> float:
        return min(
            self.membership.next_deadline(),
            self._next_gossip,
            self.anti_entropy.next_at,
            self.load_publisher.next_at,
            self._next_reconcile,
            self.readiness.next_deadline,
        )

    # --- receiving ----------------------------------------------------------------------------

    def handle(self, msg: MeshMessage, now: float) -> None:
        """Process one received message (membership or state).

        Raises ``MembershipError``/``MessageError`` (both ``ValueError``) for a
        malformed message; nothing of it was applied.
        """
        handler = self._handlers.get(type(msg))
        if handler is not None:
            handler(self, msg, now)
        elif type(msg) in _SWIM_TYPES:
            self.counters.message("recv", type(msg).__name__, 0)
            self._membership_sends(self.membership.handle(msg, now))  # type: ignore[arg-type]  # checked above
        else:
            raise MessageError(f"not a mesh message: {type(msg).__name__}")
        self._settle(now)

    def _on_push(self, msg: StatePush, now: float) -> None:
        self.counters.message("recv", "StatePush", len(msg.payload))
        self._ingest(decode_delta(msg.payload), now, forward=True)

    def _on_sync_request(self, msg: SyncRequest, now: float) -> None:
        self.counters.message("recv", "SyncRequest", len(msg.summary))
        self._send(self.anti_entropy.reply(msg, now, self.readiness.ready))
        if self.lag and not msg.want_full:  # a joiner's summary says nothing about gossip
            self._observe_lag(decode_summary(msg.summary), now)

    def _on_sync_reply(self, msg: SyncReply, now: float) -> None:
        self.counters.message("recv", "SyncReply", len(msg.summary) + sum(map(len, msg.payloads)))
        deltas, remote = self.anti_entropy.decode_reply(msg)  # all or nothing
        # A joiner's full state is new only to itself: do not forward it.
        for d in deltas:
            self._ingest(d, now, forward=not msg.full)
        if msg.full and self.readiness.full_state_from(remote.sender, msg.ready, now):
            self._owners_dirty = True
        for push in self.anti_entropy.push_back(msg, remote):
            self._send(push)
        if self.lag:
            self._observe_lag(remote, now)

    def _observe_lag(self, remote: Summary, now: float) -> None:
        engines = ((es.engine_id, es.epoch, es.state_vector) for es in remote.engines)
        self.lag.observe(remote.sender, engines, self._doc_clock, now)

    def _doc_clock(self, engine_id: str) -> int:
        """Items written to this node's current document of ``engine_id``'s log."""
        rep = self.state.logs.get(engine_id)
        ed = rep.current if rep is not None else None
        if ed is None:
            return 0
        return decode_state_vector(ed.state_vector()).get(ed.epoch.doc, 0)

    _handlers: ClassVar[dict[type, Callable[[MeshCore, Any, float], None]]] = {
        StatePush: _on_push,
        SyncRequest: _on_sync_request,
        SyncReply: _on_sync_reply,
    }

    def _ingest(self, delta: Delta, now: float, forward: bool) -> None:
        """Apply a remote Delta; queue for forwarding exactly what was new here."""
        applied = self.state.apply_remote(delta, now)
        self._index_extend(applied.index_changes)
        if forward and applied.new is not None:
            self.gossip.enqueue(applied.new, now)

    # --- local inputs -------------------------------------------------------------------------

    def register_engine(self, engine_id: str, spec: dict[str, Any], now: float) -> None:
        """Add (or update) an engine in the replicated registry; RegistryError if invalid."""
        self._local_out.append(self.state.register_engine(engine_id, spec))
        self._owners_dirty = True
        self._settle(now)

    def deregister_engine(self, engine_id: str, now: float) -> None:
        d = self.state.deregister_engine(engine_id)
        if d is not None:
            self._local_out.append(d)
        self._settle(now)

    def engine_deltas(self, engine_id: str, deltas: Sequence[IndexChange], now: float) -> bool:
        """Append an owned engine's deltas (or packed entries) to its log (one
        entry) and to our index.

        False if this node does not (or no longer) own the engine: nothing was
        written and the shell should stop that adapter. Raises ``LogError`` (a
        ``ValueError``) for invalid deltas; nothing was written.
        """
        owned = engine_id in self.ownership.owned
        if not deltas or not owned:
            return owned
        n = len(deltas)
        deltas = as_one_entry(deltas)  # made once: the log writes it, the index applies it
        self.lag.appending(engine_id, lambda: self._doc_clock(engine_id), now)
        epoch = self.state.epoch(engine_id)
        try:
            d = self.state.local_deltas(engine_id, deltas)
        except NotOwnerError:
            self._settle(now)  # turns the loss into StopOwning (+ maybe a re-take later)
            return False
        compacted = self.state.epoch(engine_id)
        if compacted != epoch and compacted is not None:
            self.counters.bump("log.compactions")
            self.lag.started(engine_id, compacted, now)
        self._local_out.append(d)
        self._index_extend(deltas)
        self.counters.bump("local.deltas", n)
        return True

    def set_local_load(self, per_worker: dict[str, tuple[int, int]], now: float) -> None:
        """This node's in-flight (requests, tokens of work) per worker (absolute values)."""
        if self.state.slots.set_local(per_worker, now):
            self.load_publisher.changed()

    def add_hint(self, worker: str, hashes: list[int], now: float) -> None:
        """This node just routed a prompt with ``hashes`` to ``worker``: tell the mesh soon."""
        self._local_out.append(self.state.add_hint(worker, hashes, now))
        soon = now + self.config.hint_push_delay
        self._next_gossip = min(self._next_gossip, soon)
        self.load_publisher.publish_by(soon)  # the routed request is load too

    # --- outputs ------------------------------------------------------------------------------

    def take_sends(self) -> list[MeshMessage]:
        out, self._sends = self._sends, []
        return out

    def take_index_changes(self) -> list[IndexChange]:
        out, self._index = self._index, []
        return out

    def take_effects(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    # --- queries ------------------------------------------------------------------------------

    def engines(self) -> dict[str, dict[str, Any]]:
        return dict(self._engines)

    def owner_of(self, engine_id: str) -> str | None:
        return owner_of(engine_id, self._live_ids())

    def owned(self) -> set[str]:
        return set(self.ownership.owned)

    def members(self) -> list[MemberRecord]:
        return self.membership.members()

    def live_members(self) -> list[MemberRecord]:
        return self.membership.live_members()

    def worker_load(self) -> dict[str, tuple[float, float]]:
        """Mesh-wide in-flight (requests, tokens) per worker: live nodes' slots summed."""
        totals = self.state.slots.totals(set(self._live_ids()))
        return {w: (float(el.requests), float(el.tokens)) for w, el in totals.items()}

    def hint_overlap(self, hashes: list[int], now: float) -> dict[str, int]:
        return self.state.hint_overlap(hashes, now)

    def resume_seqs(self, engine_id: str) -> dict[str, int]:
        """Per worker of ``engine_id``, the first engine sequence number not yet in its log."""
        return self.state.resume_seqs(engine_id)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self.counters.snapshot()
        out.update(
            ready=self.readiness.ready,
            leaving=self.readiness.leaving,
            owned=len(self.ownership.owned),
            engines=len(self._engines),
            live_members=len(self._live_ids()),
            queued_items=len(self.gossip),
            queued_bytes=self.gossip.queued_bytes,
        )
        if self.gossip.dropped:
            out["queue.dropped"] = self.gossip.dropped
        return out

    # --- settling after every input -----------------------------------------------------------

    def _settle(self, now: float) -> None:
        self._membership_events(now)
        if self.state.registry.version != self._reg_version:
            self._registry_changed()
        self._fenced_engines(now)
        if self._owners_dirty:
            self._reconcile(now)

    def _membership_events(self, now: float) -> None:
        for ev in self.membership.events():
            self._effects.append(MemberChanged(ev))
            if ev.kind in ("dead", "left"):
                self.state.drop_node(ev.node, now)
                self.lag.forget(ev.node)
            if ev.kind in ("joined", "dead", "left"):
                self._members_dirty = True
                self._owners_dirty = True
        if self.membership.joined:
            self.readiness.membership_joined(now)

    def _registry_changed(self) -> None:
        self._reg_version = self.state.registry.version
        engines = self.state.engines()
        for e in sorted(engines):
            if self._engines.get(e) != engines[e]:
                self._effects.append(EngineAdded(e, engines[e]))
        for e in sorted(set(self._engines) - set(engines)):
            if e in self.ownership.owned:
                # Our log of it was retired by MeshState (new empty epoch).
                self._release(e, "deregistered")
            # Our own index does not see our retirement epoch: clear it here.
            for w in sorted(self._workers.pop(e, ())):
                self._index.append(KvDelta(w, -1, [KvOp(OP_CLEAR, [])]))
            self._effects.append(EngineRemoved(e))
        self._engines = engines
        self._owners_dirty = True

    def _fenced_engines(self, now: float) -> None:
        for e in sorted(self.state.take_lost_ownership()):
            self.lag.stopped(e)
            if self.ownership.fenced(e, now):
                self._effects.append(StopOwning(e))
                self.counters.bump("ownership.fenced")
                self._log.info("mesh.ownership_fenced", engine=e, epoch=self.state.epoch(e))
            self._owners_dirty = True

    def _reconcile(self, now: float) -> None:
        self._owners_dirty = False
        if not self.readiness.ready or self.readiness.leaving:
            return
        for action in self.ownership.plan(self._engines, self._live_ids(), now):
            if action.take:
                self._take(action.engine_id, now)
            else:
                self._release(action.engine_id, action.why)

    def _take(self, engine_id: str, now: float) -> None:
        base = self.state.epoch(engine_id)
        to = self.state.take_ownership(engine_id, now)
        self.ownership.taken(engine_id)
        self._local_out.append(to.message)
        self._effects.append(StartOwning(engine_id, self._engines.get(engine_id, {}), to, base))
        self.counters.bump("ownership.taken")
        self.lag.started(engine_id, to.epoch, now)
        self._log.info("mesh.ownership_taken", engine=engine_id, epoch=to.epoch, base=base, resume=to.resume)

    def _release(self, engine_id: str, why: str) -> None:
        self.state.release_ownership(engine_id)
        self.ownership.released(engine_id)
        self._effects.append(StopOwning(engine_id))
        self.counters.bump("ownership.released")
        self.lag.stopped(engine_id)
        self._log.info("mesh.ownership_released", engine=engine_id, why=why)

    # --- internals ----------------------------------------------------------------------------

    def _index_extend(self, changes: Iterable[IndexChange]) -> None:
        workers = self._workers
        for ch in changes:
            for w in workers_of(ch):
                e = engine_of(w)
                ws = workers.get(e)
                if ws is None:
                    ws = workers[e] = set()
                ws.add(w)
            self._index.append(ch)

    def _live_ids(self) -> list[str]:
        if self._members_dirty:
            self._members_dirty = False
            recs = self.membership.live_members()
            self._live = [m.node for m in recs]
            self._live_addr = {m.node: m.addr for m in recs}
        return self._live

    def _peer_addrs(self) -> dict[str, str]:
        """Live members other than us -> their addresses, in node id order."""
        return {n: self._live_addr[n] for n in self._live_ids() if n != self.node_id}

    def _peers(self) -> list[str]:
        return list(self._peer_addrs().values())

    def _join_step(self, now: float) -> None:
        step = self.readiness.step(now, self._live_ids(), self._peer_addrs(), self._rng)
        if isinstance(step, BecomeReady):
            if self.readiness.become_ready(step.why, now):
                self._owners_dirty = True
        elif isinstance(step, AskFullState):
            self._send(self.anti_entropy.full_state_request(step.addr))

    def _push_round(self, now: float) -> None:
        local = self._local_out + self.state.take_outgoing()
        self._local_out = []
        if local:
            self.gossip.enqueue(merge_deltas(self.node_id, local), now)
        push = self.gossip.round(now, self._peers(), len(self._live_ids()), self._rng)
        if push is not None:
            for dst in push.peers:
                self._send(StatePush(self.addr, dst, push.payload))

    def _send(self, msg: StateMessage) -> None:
        if isinstance(msg, StatePush):
            n = len(msg.payload)
        elif isinstance(msg, SyncRequest):
            n = len(msg.summary)
        else:
            n = len(msg.summary) + sum(map(len, msg.payloads))
        self.counters.message("sent", type(msg).__name__, n)
        self._sends.append(msg)

    def _membership_sends(self, msgs: list[SwimMessage]) -> None:
        for m in msgs:
            self.counters.message("sent", type(m).__name__, 0)
        self._sends.extend(msgs)
