"""``MeshCore``: one router node's mesh logic, sans I/O.

Glues membership (``mesh/membership.py``, SWIM), the replicated state
(``mesh/state.py``, pycrdt logs, registry, load slots, hints) and engine
ownership (``mesh/ownership.py``, rendezvous hashing) into one state machine
that the gRPC shell drives and the simulator (``kvmesh/simulation/simnet.py``) runs by the
hundred. It reads no clock and no global randomness: time comes in as ``now``
and randomness from the ``random.Random`` it is given; everything it does is
a function of those and of the messages it is handed.

Inputs: ``join``/``leave``, ``tick(now)`` (call at ``next_deadline()`` or
sooner), ``handle(msg, now)`` for every received message, and the local
calls ``register_engine``/``deregister_engine``, ``engine_deltas`` (from this
node's KV-event adapters), ``set_local_load``, ``add_hint``.
Outputs (drain them after every input): ``take_sends()`` (messages, each
addressed by ``dst``), ``take_index_changes()`` (``KvDelta``s for this node's
``PrefixIndex``, in order) and ``take_effects()`` (start/stop an engine
adapter, engine added/removed, member changed).

Readiness. A node that joins an existing mesh owns nothing until it has
applied the full state of a ready peer (so it never writes an engine log
from an empty view). ``join([])`` starts a new mesh: ready at once. If every
node starts at once with the others as seeds (a cold start behind one DNS
name) nobody is ready yet; then, after ``bootstrap_wait`` seconds joined
without hearing from a ready peer, the live node with the smallest id
becomes ready on its own and the others get their full state from it.

Ownership. When the live set (alive + suspect: a suspect is not moved, to
avoid flapping), the registry or readiness changes, and every
``ownership_check_interval`` anyway, the node recomputes the rendezvous owner
of every registered engine. Gained -> ``MeshState.take_ownership`` and a
:class:`StartOwning` effect (resume points, mapper pairs when the log
carries them); lost -> release and :class:`StopOwning`. If a higher epoch
fences one of our engines (another node took it), :class:`StopOwning`; if
rendezvous still says us, we re-take it (after ``retake_backoff``, so two
nodes with different views do not ping-pong at gossip speed).

Dissemination. State changes are pushed, not pulled: every
``gossip_interval`` the node merges its new local deltas and the state it
received and had not seen (``merge_deltas``) into one :class:`StatePush` to
``gossip_fanout`` random live peers. Each queued item is sent to at most
``retransmit_limit(retransmit_mult, n_live)`` peers in total
(``retransmit_mult * ceil(log10(n + 1))``), so every update spreads
epidemically in O(log n) rounds and then stops. What counts as "not seen" is
measured exactly: for a log update, the pycrdt diff between the document
before and after applying it (so duplicates and echoes are never forwarded,
and an out-of-order update is forwarded once it becomes integrable). Every
``anti_entropy_interval`` one random live peer gets a :class:`SyncRequest`
with our summary (state vectors); it answers with what we lack and its own
summary (:class:`SyncReply`) and we push back what it lacks. That repairs
lost messages and healed partitions.

Load: the local slot is published every ``load_interval`` when it changed
and re-stamped every ``load_refresh_interval`` (so a node that was wrongly
declared dead gets its slot back); dead and departed nodes' slots are
dropped, and ``worker_load`` only sums slots of live members.

Messages of this module are flat frozen dataclasses (str/bool/bytes/tuples of
bytes) so the transport can map them to protobuf one to one; their payloads
are msgspec-encoded ``mesh.state`` messages (``Delta``, ``Summary``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from blocks.delta import OP_CLEAR, KvDelta, KvOp
from blocks.workers import split_worker_id
from mesh.broadcast import retransmit_limit
from mesh.effects import Effect, EngineAdded, EngineRemoved, MemberChanged, StartOwning, StopOwning
from mesh.engine_log import CompactionPolicy, NotOwnerError
from mesh.hints import Hint
from mesh.load_slots import EngineLoad
from mesh.membership import (
    Ack,
    Gossip,
    Join,
    JoinReply,
    Membership,
    MembershipConfig,
    Nack,
    Ping,
    PingReq,
    PushPull,
)
from mesh.ownership import owner_of as rendezvous_owner
from mesh.state import (
    Delta,
    LogUpdate,
    MeshState,
    MessageError,
    Summary,
    decode,
    encode,
    merge_deltas,
)
from mesh.state_messages import StateMessage, StatePush, SyncReply, SyncRequest

log = structlog.get_logger(__name__)

__all__ = ["MeshConfig", "MeshCore"]

_MEMBERSHIP_TYPES = (Ping, Ack, PingReq, Nack, Gossip, Join, JoinReply, PushPull)


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshConfig:
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    gossip_fanout: int = 3
    anti_entropy_interval: float = 2.0
    load_interval: float = 0.2
    load_refresh_interval: float = 30.0  # and whenever our incarnation rises
    # Soft cap of one push (the freshest item always goes, however big).
    max_push_bytes: int = 1 << 20
    max_queued_items: int = 4096  # forward queue bound (oldest, most-sent dropped first)
    full_state_retry: float = 1.0  # joiner: ask another peer after this long
    bootstrap_wait: float = 4.0  # cold start: see the module docstring
    retake_backoff: float = 0.5
    ownership_check_interval: float = 1.0
    hint_ttl: float = 2.0
    # A new route hint (and this node's load) goes out this soon, not at the
    # next round: requests for one prefix that reach two nodes within a gossip
    # interval would otherwise split across engines (measured: 2.8 hit-rate
    # points lost on the Mooncake trace with 3 nodes at 0.2 s).
    hint_push_delay: float = 0.01
    compaction: CompactionPolicy | None = None

    def __post_init__(self) -> None:
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
        for name in ("gossip_fanout", "max_push_bytes", "max_queued_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bootstrap_wait < 0 or self.retake_backoff < 0 or self.hint_push_delay < 0:
            raise ValueError("bootstrap_wait, retake_backoff and hint_push_delay must be >= 0")


# --- the forward queue ---------------------------------------------------------------------


class _Item:
    __slots__ = ("born", "delta", "iid", "sent", "size")

    def __init__(self, iid: int, delta: Delta, size: int, born: float) -> None:
        self.iid = iid
        self.delta = delta
        self.size = size
        self.sent = 0
        self.born = born


def _delta_size(d: Delta) -> int:
    # Close to the encoded size without encoding twice.
    n = 16 + len(d.sender)
    for lu in d.logs:
        n += 24 + len(lu.engine_id) + len(lu.epoch.owner) + len(lu.update)
    if d.registry:
        n += len(d.registry)
    for s in d.slots:
        n += 16 + len(s.node_id) + 24 * len(s.loads)
    for h in d.hints:
        n += 24 + len(h.origin) + len(h.worker) + 9 * len(h.hashes)
    return n


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
        )
        self._sends: list[Any] = []
        self._effects: list[Effect] = []
        self._index: list[KvDelta] = []
        self._local_out: list[Delta] = []
        self._queue: list[_Item] = []
        self._next_iid = 0
        self._owned: set[str] = set()
        self._engines: dict[str, dict[str, Any]] = {}
        self._reg_version = -1
        self._workers: dict[str, set[str]] = {}  # engine -> workers seen in index changes
        self._retake_after: dict[str, float] = {}
        self._seen_hints: dict[tuple[str, int], float] = {}
        self._live: list[str] = [node_id]
        self._live_addr: dict[str, str] = {node_id: addr}
        self._members_dirty = True
        self._owners_dirty = True
        # lifecycle
        self._started = False
        self._joining = False
        self._ready = False
        self._leaving = False
        self._joined_at: float | None = None
        self._next_full = math.inf
        self._full_attempts = 0
        self._heard_not_ready = False
        # timers (random phase: nodes started together do not gossip in lockstep)
        self._next_gossip = now + rng.uniform(0, cfg.membership.gossip_interval)
        self._next_ae = now + rng.uniform(0.5, 1.0) * cfg.anti_entropy_interval
        self._next_load = now + rng.uniform(0, cfg.load_interval)
        self._next_refresh = now + cfg.load_refresh_interval
        self._next_reconcile = now + cfg.ownership_check_interval
        self._load_dirty = False
        self._incarnation = self.membership.incarnation
        self._stats: dict[str, int] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    def join(self, seed_addrs: list[str], now: float) -> None:
        """Join through any of ``seed_addrs``; ``[]`` (or only our own address)
        starts a new mesh and the node is ready at once."""
        if self._started:
            raise RuntimeError(f"{self.node_id} already joined")
        self._started = True
        self._msends(self.membership.join(seed_addrs, now))
        if self.membership.joined:
            self._become_ready(now, "first node")
        else:
            self._joining = True
            self._next_full = now
        self._after(now)

    def leave(self, now: float) -> None:
        """Leave gracefully: hand every engine over, flush, gossip ``Leave``.

        Keep calling ``tick`` until ``membership.leave_done()`` (or a grace
        period) so the Leave and the last deltas spread, then stop the node.
        """
        if self._leaving:
            return
        for e in sorted(self._owned):
            self._release(e, "leaving")
        self._leaving = True
        self._ready = False
        self._joining = False
        self._gossip_round(now)  # push our last deltas before anyone takes over
        self._next_gossip = now + self.config.membership.gossip_interval
        self._msends(self.membership.leave(now))
        self._after(now)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def leaving(self) -> bool:
        return self._leaving

    def _become_ready(self, now: float, why: str) -> None:
        if self._ready or self._leaving:
            return
        self._ready = True
        self._joining = False
        self._next_full = math.inf
        self._owners_dirty = True
        self._log.info("mesh.ready", why=why, attempts=self._full_attempts, now=now)

    # --- time ---------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        cfg = self.config
        self._msends(self.membership.tick(now))
        self._after(now)
        if self._joining:
            self._join_step(now)
        if now >= self._next_load:
            self._next_load = now + cfg.load_interval
            inc = self.membership.incarnation
            if now >= self._next_refresh or inc != self._incarnation:
                # A raised incarnation means we were suspected or declared dead:
                # others may have dropped (and fenced) our slot, so re-stamp it now.
                self._incarnation = inc
                self._next_refresh = now + cfg.load_refresh_interval
                self.state.slots.refresh(now)
                self._load_dirty = True
            if self._load_dirty:
                self._load_dirty = False
                self._local_out.append(Delta(sender=self.node_id, slots=[self.state.slots.local]))
        if now >= self._next_gossip:
            self._next_gossip = now + cfg.membership.gossip_interval
            self._gossip_round(now)
        if now >= self._next_ae:
            self._next_ae = now + cfg.anti_entropy_interval * self._ae_scale()
            self._anti_entropy(now)
        if now >= self._next_reconcile:
            self._next_reconcile = now + cfg.ownership_check_interval
            self.state.expire(now)
            self._expire_seen(now)
            self._owners_dirty = True
            self._after(now)

    def next_deadline(self) -> float:
        t = min(
            self.membership.next_deadline(),
            self._next_gossip,
            self._next_ae,
            self._next_load,
            self._next_reconcile,
        )
        if self._joining:
            t = min(t, self._next_full)
        return t

    # --- receiving ----------------------------------------------------------------------------

    def handle(self, msg: Any, now: float) -> None:
        """Process one received message (membership or state).

        Raises ``MembershipError``/``MessageError`` (both ``ValueError``) for a
        malformed message; nothing of it was applied.
        """
        if isinstance(msg, _MEMBERSHIP_TYPES):
            self._count("recv", type(msg).__name__, 0)
            self._msends(self.membership.handle(msg, now))
        elif isinstance(msg, StatePush):
            self._count("recv", "StatePush", len(msg.payload))
            self._ingest(self._decode_delta(msg.payload), now, forward=True)
        elif isinstance(msg, SyncRequest):
            self._count("recv", "SyncRequest", len(msg.summary))
            self._on_sync_request(msg, now)
        elif isinstance(msg, SyncReply):
            self._count("recv", "SyncReply", len(msg.summary) + sum(map(len, msg.payloads)))
            self._on_sync_reply(msg, now)
        else:
            raise MessageError(f"not a mesh message: {type(msg).__name__}")
        self._after(now)

    @staticmethod
    def _decode_delta(raw: bytes) -> Delta:
        m = decode(raw)
        if not isinstance(m, Delta):
            raise MessageError(f"expected a Delta, got {type(m).__name__}")
        return m

    @staticmethod
    def _decode_summary(raw: bytes) -> Summary:
        m = decode(raw)
        if not isinstance(m, Summary):
            raise MessageError(f"expected a Summary, got {type(m).__name__}")
        return m

    def _on_sync_request(self, msg: SyncRequest, now: float) -> None:
        remote = self._decode_summary(msg.summary)
        if msg.want_full:
            deltas = [self.state.full_state(now)]
        else:
            deltas = self.state.diff(remote, now)
        payloads = tuple(encode(d) for d in deltas)
        self._send(
            SyncReply(
                self.addr,
                msg.src,
                payloads,
                encode(self.state.summary()),
                full=msg.want_full,
                ready=self._ready,
            )
        )

    def _on_sync_reply(self, msg: SyncReply, now: float) -> None:
        deltas = [self._decode_delta(p) for p in msg.payloads]  # all or nothing
        remote = self._decode_summary(msg.summary)
        # A joiner's full state is new only to itself: do not forward it.
        for d in deltas:
            self._ingest(d, now, forward=not msg.full)
        if msg.full and self._joining:
            if msg.ready:
                self._become_ready(now, f"full state from {remote.sender}")
            else:
                self._heard_not_ready = True
        for d in self.state.diff(remote, now):
            self._send(StatePush(self.addr, msg.src, encode(d)))

    def _ingest(self, delta: Delta, now: float, forward: bool) -> None:
        """Apply a remote Delta; queue for forwarding exactly what was new here."""
        st = self.state
        new = Delta(sender=self.node_id)
        for lu in delta.logs:
            rep = st.logs.get(lu.engine_id)
            before = rep.doc_for(lu.epoch) if rep is not None else None
            sv = before.state_vector() if before is not None else None
            self._index_extend(st.apply_remote(Delta(sender=delta.sender, logs=[lu]), now))
            rep = st.logs.get(lu.engine_id)
            after = rep.doc_for(lu.epoch) if rep is not None else None
            if after is None:
                continue  # fenced or rejected
            if before is None:
                new.logs.append(lu)
            elif sv is not None:
                sv2 = after.state_vector()
                if sv2 != sv:
                    new.logs.append(LogUpdate(lu.engine_id, lu.epoch, after.update_since(sv)))
        if delta.registry:
            sv = st.registry.state_vector()
            self._index_extend(st.apply_remote(Delta(sender=delta.sender, registry=delta.registry), now))
            if st.registry.state_vector() != sv:
                new.registry = st.registry.update_since(sv)
        for s in delta.slots:
            if st.slots.merge(s):
                new.slots.append(s)
        if delta.hints:
            fresh = []
            for h in delta.hints:
                key = (h.origin, h.hid)
                if key not in self._seen_hints and h.ttl > 0:
                    self._seen_hints[key] = now + h.ttl
                    fresh.append(h)
            if fresh:
                st.hints.merge(fresh, now)
                new.hints = fresh
        if forward and not new.is_empty():
            self._enqueue(new, now)

    # --- local inputs -------------------------------------------------------------------------

    def register_engine(self, engine_id: str, spec: dict[str, Any], now: float) -> None:
        """Add (or update) an engine in the replicated registry; RegistryError if invalid."""
        self._local_out.append(self.state.register_engine(engine_id, spec))
        self._owners_dirty = True
        self._after(now)

    def deregister_engine(self, engine_id: str, now: float) -> None:
        d = self.state.deregister_engine(engine_id)
        if d is not None:
            self._local_out.append(d)
        self._after(now)

    def engine_deltas(self, engine_id: str, deltas: list[KvDelta], now: float) -> bool:
        """Append an owned engine's deltas to its log (one entry) and to our index.

        False if this node does not (or no longer) own the engine: nothing was
        written and the shell should stop that adapter. Raises ``LogError`` (a
        ``ValueError``) for invalid deltas; nothing was written.
        """
        if not deltas:
            return engine_id in self._owned
        if engine_id not in self._owned:
            return False
        try:
            d = self.state.local_deltas(engine_id, deltas)
        except NotOwnerError:
            self._after(now)  # turns the loss into StopOwning (+ maybe a re-take later)
            return False
        self._local_out.append(d)
        self._index_extend(deltas)
        self._bump("local.deltas", len(deltas))
        return True

    def set_local_load(self, per_worker: dict[str, tuple[int, int]], now: float) -> None:
        """This node's in-flight (requests, prompt tokens) per worker (absolute values)."""
        slots = self.state.slots
        cur = slots.local.loads
        for w in sorted(set(cur) | set(per_worker)):
            r, t = per_worker.get(w, (0, 0))
            if r < 0 or t < 0:
                raise ValueError(f"negative load for {w!r}: {(r, t)}")
            old = cur.get(w) or EngineLoad()
            if (old.requests, old.tokens) != (r, t):
                slots.add_local(w, r - old.requests, t - old.tokens, now)
                cur = slots.local.loads
                self._load_dirty = True

    def add_hint(self, worker: str, hashes: list[int], now: float) -> None:
        d = self.state.add_hint(worker, hashes, now)
        for h in d.hints:
            self._seen_hints[(h.origin, h.hid)] = now + h.ttl
        self._local_out.append(d)
        soon = now + self.config.hint_push_delay
        self._next_gossip = min(self._next_gossip, soon)
        self._next_load = min(self._next_load, soon)  # the routed request is load too

    # --- outputs ------------------------------------------------------------------------------

    def take_sends(self) -> list[Any]:
        out, self._sends = self._sends, []
        return out

    def take_index_changes(self) -> list[KvDelta]:
        out, self._index = self._index, []
        return out

    def take_effects(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    # --- queries ------------------------------------------------------------------------------

    def engines(self) -> dict[str, dict[str, Any]]:
        return dict(self._engines)

    def owner_of(self, engine_id: str) -> str | None:
        return rendezvous_owner(engine_id, self._live_ids())

    def owned(self) -> set[str]:
        return set(self._owned)

    def members(self):  # noqa: ANN201 - list[MemberRecord]
        return self.membership.members()

    def live_members(self):  # noqa: ANN201 - list[MemberRecord]
        return self.membership.live_members()

    def worker_load(self) -> dict[str, tuple[float, float]]:
        live = set(self._live_ids())
        out: dict[str, list[float]] = {}
        for node in sorted(self.state.slots.slots):
            if node not in live:
                continue
            for w, el in self.state.slots.slots[node].loads.items():
                acc = out.setdefault(w, [0.0, 0.0])
                acc[0] += el.requests
                acc[1] += el.tokens
        return {w: (v[0], v[1]) for w, v in sorted(out.items())}

    def hint_overlap(self, hashes: list[int], now: float) -> dict[str, int]:
        return self.state.hint_overlap(hashes, now)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(sorted(self._stats.items()))
        out.update(
            ready=self._ready,
            leaving=self._leaving,
            owned=len(self._owned),
            engines=len(self._engines),
            live_members=len(self._live_ids()),
            queued_items=len(self._queue),
            queued_bytes=sum(it.size for it in self._queue),
        )
        return out

    # --- internals: bookkeeping after every input -----------------------------------------------

    def _after(self, now: float) -> None:
        events = self.membership.events()
        for ev in events:
            self._effects.append(MemberChanged(ev))
            if ev.kind in ("dead", "left"):
                self.state.drop_node(ev.node, now)
            if ev.kind in ("joined", "dead", "left"):
                self._members_dirty = True
                self._owners_dirty = True
        if self._joining and self._joined_at is None and self.membership.joined:
            self._joined_at = now
        if self.state.registry.version != self._reg_version:
            self._sync_registry(now)
        for e in sorted(self.state.take_lost_ownership()):
            if e in self._owned:
                self._owned.discard(e)
                self._effects.append(StopOwning(e))
                self._retake_after[e] = now + self.config.retake_backoff
                self._bump("ownership.fenced")
                self._log.info("mesh.ownership_fenced", engine=e, epoch=self.state.epoch(e))
            self._owners_dirty = True
        if self._owners_dirty:
            self._reconcile(now)

    def _sync_registry(self, now: float) -> None:
        self._reg_version = self.state.registry.version
        engines = self.state.engines()
        for e in sorted(engines):
            if self._engines.get(e) != engines[e]:
                self._effects.append(EngineAdded(e, engines[e]))
        for e in sorted(set(self._engines) - set(engines)):
            if e in self._owned:
                # Our log of it was retired by MeshState (new empty epoch).
                self._release(e, "deregistered")
            # Our own index does not see our retirement epoch: clear it here.
            for w in sorted(self._workers.pop(e, ())):
                self._index.append(KvDelta(w, -1, [KvOp(OP_CLEAR, [])]))
            self._effects.append(EngineRemoved(e))
        self._engines = engines
        self._owners_dirty = True

    def _live_ids(self) -> list[str]:
        if self._members_dirty:
            self._members_dirty = False
            recs = self.membership.live_members()
            self._live = [m.node for m in recs]
            self._live_addr = {m.node: m.addr for m in recs}
        return self._live

    def _peers(self) -> list[str]:
        """Addresses of live members other than us, in node id order."""
        ids = self._live_ids()
        return [self._live_addr[n] for n in ids if n != self.node_id]

    def _reconcile(self, now: float) -> None:
        self._owners_dirty = False
        if not self._ready or self._leaving:
            return
        live = self._live_ids()
        for e in sorted(self._engines):
            mine = rendezvous_owner(e, live) == self.node_id
            if mine and e not in self._owned:
                if now < self._retake_after.get(e, -math.inf):
                    continue  # retried by the periodic check
                self._take(e, now)
            elif not mine and e in self._owned:
                self._release(e, "rendezvous moved it")
        for e in sorted(self._owned - set(self._engines)):
            self._release(e, "not registered")

    def _take(self, engine_id: str, now: float) -> None:
        base = self.state.epoch(engine_id)
        to = self.state.take_ownership(engine_id, now)
        self._owned.add(engine_id)
        self._retake_after.pop(engine_id, None)
        self._local_out.append(to.message)
        self._effects.append(StartOwning(engine_id, self._engines.get(engine_id, {}), to, base))
        self._bump("ownership.taken")
        self._log.info("mesh.ownership_taken", engine=engine_id, epoch=to.epoch, base=base, resume=to.resume)

    def _release(self, engine_id: str, why: str) -> None:
        self.state.release_ownership(engine_id)
        self._owned.discard(engine_id)
        self._effects.append(StopOwning(engine_id))
        self._bump("ownership.released")
        self._log.info("mesh.ownership_released", engine=engine_id, why=why)

    def _index_extend(self, deltas: Iterable[KvDelta]) -> None:
        workers = self._workers
        for d in deltas:
            e = split_worker_id(d.worker)[0]
            ws = workers.get(e)
            if ws is None:
                ws = workers[e] = set()
            ws.add(d.worker)
            self._index.append(d)

    def _expire_seen(self, now: float) -> None:
        if self._seen_hints:
            self._seen_hints = {k: t for k, t in self._seen_hints.items() if t > now}
        if self._retake_after:
            self._retake_after = {e: t for e, t in self._retake_after.items() if t > now}

    # --- internals: joining, gossip, anti-entropy -------------------------------------------

    def _join_step(self, now: float) -> None:
        if not self.membership.joined or now < self._next_full:
            return
        peers = self._peers()
        if not peers:
            self._become_ready(now, "alone")
            return
        ids = self._live_ids()
        if (
            self._joined_at is not None
            and now - self._joined_at >= self.config.bootstrap_wait
            and self._heard_not_ready
            and ids[0] == self.node_id
        ):
            # Cold start: nobody answered ready; the smallest live id starts the mesh.
            self._become_ready(now, "bootstrap")
            return
        self._full_attempts += 1
        # Every other attempt goes to the smallest live id: in a cold start it
        # is the one that becomes ready first.
        target = (
            self._live_addr[ids[0]]
            if (self._full_attempts % 2 == 0 and ids[0] != self.node_id)
            else self._rng.choice(peers)
        )
        self._next_full = now + self.config.full_state_retry
        self._send(SyncRequest(self.addr, target, encode(self.state.summary()), want_full=True))

    def _enqueue(self, delta: Delta, now: float) -> None:
        self._next_iid += 1
        self._queue.append(_Item(self._next_iid, delta, _delta_size(delta), now))
        if len(self._queue) > self.config.max_queued_items:
            # Drop the most-sent, oldest items: anti-entropy still repairs them.
            self._queue.sort(key=lambda it: (it.sent, -it.iid))
            dropped = len(self._queue) - self.config.max_queued_items
            del self._queue[self.config.max_queued_items :]
            self._queue.sort(key=lambda it: it.iid)
            self._bump("queue.dropped", dropped)

    def _gossip_round(self, now: float) -> None:
        local = self._local_out + self.state.take_outgoing()
        self._local_out = []
        if local:
            self._enqueue(merge_deltas(self.node_id, local), now)
        if not self._queue:
            return
        peers = self._peers()
        if not peers:
            return
        k = min(self.config.gossip_fanout, len(peers))
        limit = retransmit_limit(self.config.membership.retransmit_mult, len(self._live_ids()))
        order = sorted(self._queue, key=lambda it: (it.sent, it.iid))
        budget = self.config.max_push_bytes
        chosen: list[_Item] = []
        for it in order:
            if chosen and it.size > budget:
                continue
            chosen.append(it)
            budget -= it.size
        parts = [self._aged(it, now) for it in chosen]
        payload = encode(merge_deltas(self.node_id, parts))
        for dst in self._rng.sample(peers, k):
            self._send(StatePush(self.addr, dst, payload))
        for it in chosen:
            it.sent += k
        self._queue = [it for it in self._queue if it.sent < limit]

    @staticmethod
    def _aged(it: _Item, now: float) -> Delta:
        """Hints travel with their remaining TTL, also when forwarded later."""
        d = it.delta
        if not d.hints or now <= it.born:
            return d
        age = now - it.born
        hints = [Hint(h.origin, h.hid, h.worker, h.hashes, h.ttl - age) for h in d.hints if h.ttl > age]
        return Delta(sender=d.sender, logs=d.logs, registry=d.registry, slots=d.slots, hints=hints)

    def _ae_scale(self) -> float:
        # As memberlist's push-pull: beyond 32 nodes, full exchanges get rarer
        # (x2 at 64, x3 at 128, ...) so their total cost grows ~ n log n, not n^2.
        n = len(self._live_ids())
        return 1.0 if n <= 32 else math.ceil(math.log2(n) - 5) + 1.0

    def _anti_entropy(self, now: float) -> None:
        peers = self._peers()
        if not peers or self._joining or self._leaving:
            return
        dst = self._rng.choice(peers)
        self._send(SyncRequest(self.addr, dst, encode(self.state.summary())))

    def _send(self, msg: StateMessage) -> None:
        if isinstance(msg, StatePush):
            n = len(msg.payload)
        elif isinstance(msg, SyncRequest):
            n = len(msg.summary)
        else:
            n = len(msg.summary) + sum(map(len, msg.payloads))
        self._count("sent", type(msg).__name__, n)
        self._sends.append(msg)

    def _msends(self, msgs: list[Any]) -> None:
        for m in msgs:
            self._count("sent", type(m).__name__, 0)
        self._sends.extend(msgs)

    def _bump(self, key: str, n: int = 1) -> None:
        self._stats[key] = self._stats.get(key, 0) + n

    def _count(self, direction: str, kind: str, nbytes: int) -> None:
        st = self._stats
        k = f"{direction}.{kind}"
        st[k + ".msgs"] = st.get(k + ".msgs", 0) + 1
        if nbytes:
            st[k + ".bytes"] = st.get(k + ".bytes", 0) + nbytes
