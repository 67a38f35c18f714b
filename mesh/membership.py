"""SWIM membership as a pure state machine: who is in the mesh, and who is alive.

Every router node runs one :class:`Membership`. It does no I/O and reads no
clock: the caller feeds it time (``now``, seconds) and messages, and sends the
messages it returns, each addressed by ``dst``. The same object therefore runs
behind the gRPC transport and inside the deterministic simulator
(``kvmesh/simulation/simnet.py``). This follows SWIM (Das et al., 2002) with the suspicion and
Lifeguard refinements of hashicorp/memberlist; defaults are memberlist's LAN
values. The pieces live apart, as in memberlist:

* ``mesh/swim_messages.py``: member states, gossiped updates, messages, events;
* ``mesh/swim_checks.py``: validation of received messages (:class:`MembershipError`);
* ``mesh/swim_probes.py``: probe order, the probe in flight, relayed pings;
* ``mesh/suspicion.py``: the suspicion timer;
* ``mesh/awareness.py``: Lifeguard's local health score;
* ``mesh/broadcast.py``: the transmit-limited gossip queue;
* this module: the state machine that ties them together, and its config.

Members, states and incarnations
    Each member has a state (``alive``, ``suspect``, ``dead``, ``left``) and an
    *incarnation* number that only the member itself increases. Updates about
    a member are ordered by incarnation; at equal incarnation the more severe
    state wins (``alive`` < ``suspect`` < ``dead``/``left``)::

        Alive(i)   overrides alive/suspect/dead/left with incarnation < i
        Suspect(i) overrides alive with incarnation <= i
        Dead(i)    overrides alive/suspect with incarnation <= i
        Leave(i)   overrides alive/suspect/dead with incarnation <= i

    Because only the member raises its incarnation, the member itself is the
    only one who can clear a suspicion: *refutation*. A node that hears itself
    suspected, declared dead or declared left (at an incarnation >= its own)
    while it is running raises its incarnation above the accusation and gossips
    ``Alive``. A node that restarted and lost its incarnation learns its old one
    from the first member list it receives (``JoinReply``/``PushPull``) and
    refutes the same way, so a restart with the same id always rejoins.

Failure detection (one probe per ``probe_interval``)
    1. ``Ping`` the next member of the probe ring (:class:`~mesh.swim_probes.ProbeRing`:
       shuffled round-robin, so every member is probed within one cycle).
    2. No ``Ack`` within ``probe_timeout``: ask ``indirect_checks`` random
       members to probe it for us (``PingReq``). They ``Ping`` the target and
       forward its ``Ack``, or answer ``Nack`` when they got nothing. An
       indirect ack saves a member whose link to *us* is bad.
    3. No ack by the end of the probe interval: gossip ``Suspect``. Every node
       hearing it starts a :class:`~mesh.suspicion.Suspicion` timer; when the
       timer fires without a refutation, that node declares the member
       ``Dead`` and gossips it. A ping to a suspect carries the suspicion
       (Lifeguard's "buddy system") and every ``Ack`` carries the responder's
       incarnation, so a refutation also travels back on the probe itself
       instead of relying on gossip alone.
    Probe timeouts and intervals stretch with our own local health score
    (:class:`~mesh.awareness.Awareness`): when the evidence says that *we* are
    the slow one, we probe more patiently instead of accusing healthy members.

Dissemination
    Accepted updates go into a :class:`~mesh.broadcast.BroadcastQueue` and ride
    on every ``Ping``/``Ack``/``PingReq`` we send; every ``gossip_interval`` up
    to ``gossip_nodes`` random members (plus members dead for less than
    ``gossip_to_dead_time``, so a wrongly declared member hears of it and
    refutes) get a ``Gossip`` message with whatever is queued.

Anti-entropy
    Every ``push_pull_interval`` (scaled up beyond 32 members) we exchange the
    full member list with one random live member (``PushPull``). Merging treats
    a remote ``dead`` as ``suspect``: we verify deaths ourselves. Every
    ``reconnect_interval`` we also push-pull with the member we believe dead
    that we tried least recently. That merges the two halves of a healed
    network partition, which declared each other dead and would otherwise
    never talk again. And when our views visibly differ (a member we do not
    know or believe dead probes us, or gossip accuses a member we never heard
    of) we push-pull with that sender at once, rate-limited per address.

Join and leave
    ``join(seeds)`` sends ``Join`` (carrying our member list) to up to
    ``join_fanout`` seeds and retries every ``join_retry_interval`` until a
    ``JoinReply`` (the seed's full member list, i.e. a push-pull) arrives; a
    few seconds later it push-pulls once more with a random member, to learn
    about members that joined at the same time as it did.
    Seed names are resolved by the shell, which resolves them again until
    the node has peers and periodically after (DNS behind a headless service
    may list a node late) and hands the addresses to ``add_seeds``: while
    joining they become seeds too; once joined, every address that is not a
    live member's gets a push-pull. Two meshes that formed apart behind one
    name (each node resolved only itself) merge that way: each side merges
    the other's member list, as the two halves of a healed partition do.
    ``leave()`` raises our incarnation and gossips ``Leave``, which others
    record as ``left`` (never mistaken for a failure). Dead and left members
    are forgotten ``dead_reclaim_time`` after their last state change.

Node ids
    A record of our own id at another address above our incarnation is a
    *claim* (one at our incarnation is refuted again: members keep the first
    of equal incarnations, a stale record of our previous life maybe). The
    first claim from an address is taken for our previous
    life (a restart on a new address: a rescheduled pod) and refuted, so the
    mesh learns where we are now. A second claim from the same address means
    a live member there refuted us in turn: two running nodes have one id,
    and each would take the other's engines for as long as both run. The one
    that found the other in the member list its join got back came second:
    it stops refuting (``yielded``; the shell stops the node without a
    ``Leave``, which would be the other's) and the event ``id_conflict`` is
    queued; the other keeps refuting. A member that probes us from an
    address other than the one we know for it gets a push-pull at once (a
    differing view), so a node that took a live member's id learns of the
    owner within one of its probe cycles. Two nodes started with one id at
    the same moment, neither in the other's join reply, both keep refuting
    and both log the conflict.

Outputs
    ``tick``/``handle``/``join``/``leave`` return messages to send. Membership
    changes are queued as :class:`~mesh.swim_messages.MemberEvent` (``joined``,
    ``suspect``, ``alive`` (suspicion refuted), ``dead``, ``left``,
    ``id_conflict``: our own id, the other member's address) and drained
    with :meth:`Membership.events`.

:class:`MembershipError` is defined with the checks that raise it and is part
of this module's interface: the config and the state machine raise it too.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog

from mesh.awareness import Awareness
from mesh.broadcast import BroadcastQueue
from mesh.suspicion import Suspicion, confirmations_wanted, suspicion_timeouts
from mesh.swim_checks import MembershipError, check_message, check_number, check_text
from mesh.swim_messages import (
    ALIVE,
    DEAD,
    LEFT,
    LIVE_STATES,
    SUSPECT,
    Ack,
    Alive,
    Dead,
    Gossip,
    Join,
    JoinReply,
    Leave,
    MemberEvent,
    MemberRecord,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    SwimMessage,
    Update,
    encoded_size,
)
from mesh.swim_probes import Probe, ProbeRing, Relay

__all__ = ["Membership", "MembershipConfig", "MembershipError"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """Timing in seconds. Defaults are hashicorp/memberlist's DefaultLANConfig."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    retransmit_mult: int = 4
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    gossip_to_dead_time: float = 30.0
    push_pull_interval: float = 30.0
    # Not in memberlist (serf does this): push-pull with a dead member to heal partitions.
    reconnect_interval: float = 10.0
    # Not in memberlist: push-pull with a prober we do not know, at most once per this.
    push_pull_backoff: float = 5.0
    dead_reclaim_time: float = 300.0
    join_retry_interval: float = 2.0
    join_fanout: int = 3
    awareness_max_multiplier: int = 8
    max_message_bytes: int = 1400  # memberlist's UDP buffer: piggyback budget per message
    max_queued_broadcasts: int = 4096
    max_pending_events: int = 10_000

    def __post_init__(self) -> None:
        positive = (
            "probe_interval",
            "probe_timeout",
            "gossip_interval",
            "push_pull_interval",
            "reconnect_interval",
            "push_pull_backoff",
            "join_retry_interval",
            "max_message_bytes",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise MembershipError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.probe_timeout > self.probe_interval:
            raise MembershipError("probe_timeout must not exceed probe_interval")
        for name in ("indirect_checks", "gossip_nodes", "gossip_to_dead_time", "dead_reclaim_time"):
            if getattr(self, name) < 0:
                raise MembershipError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "suspicion_mult",
            "suspicion_max_timeout_mult",
            "retransmit_mult",
            "join_fanout",
            "awareness_max_multiplier",
            "max_queued_broadcasts",
            "max_pending_events",
        ):
            if getattr(self, name) < 1:
                raise MembershipError(f"{name} must be >= 1, got {getattr(self, name)}")


class _Member:
    """One entry of the member table (mutable; :meth:`record` is its wire form)."""

    __slots__ = ("addr", "incarnation", "node", "state", "state_change")

    def __init__(self, node: str, addr: str, incarnation: int, state: str, now: float) -> None:
        self.node = node
        self.addr = addr
        self.incarnation = incarnation
        self.state = state
        self.state_change = now

    def record(self) -> MemberRecord:
        return MemberRecord(self.node, self.addr, self.incarnation, self.state)


_Handler = Callable[["Membership", Any, float, list[SwimMessage]], None]


class Membership:
    """One node's SWIM membership state machine (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        addr: str,
        config: MembershipConfig,
        now: float,
        rng: random.Random,
        incarnation: int = 0,
        logger: Any = None,
    ) -> None:
        check_text(node_id, "node_id")
        check_text(addr, "addr")
        check_number(incarnation, "incarnation")
        self.node_id = node_id
        self.addr = addr
        self.config = config
        self._rng = rng
        self._log = (logger if logger is not None else log).bind(node=node_id)
        self._self = _Member(node_id, addr, incarnation, ALIVE, now)
        self._members: dict[str, _Member] = {node_id: self._self}
        self._n_live = 1  # alive + suspect members, ourselves included
        self._queue: BroadcastQueue[Update] = BroadcastQueue(config.retransmit_mult)
        self._events: deque[MemberEvent] = deque(maxlen=config.max_pending_events)
        self._suspicions: dict[str, Suspicion] = {}
        self._seq = 0
        self._probe: Probe | None = None
        self._ring = ProbeRing()
        self._relays: dict[int, Relay] = {}  # our ping's seq -> the PingReq it answers
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._leaving = False
        self._seeds: list[str] = []
        self._join_pending = False
        # Random phase so that nodes started together do not probe in lockstep.
        self._next_probe = now + rng.uniform(0, config.probe_interval)
        self._next_gossip = now + rng.uniform(0, config.gossip_interval)
        self._next_push_pull = now + rng.uniform(0.5, 1.0) * config.push_pull_interval
        self._next_reconnect = now + rng.uniform(0.5, 1.0) * config.reconnect_interval
        self._next_join = math.inf
        self._reconnect_tried: dict[str, float] = {}  # dead node id -> last reconnect push-pull
        self._differing_push_pull: dict[str, float] = {}  # addr -> last push-pull on differing views
        self._claims: dict[str, int] = {}  # another address -> times it claimed our id above us
        # addresses a live record of our id had in the member list our join got back
        self._taken_at_join: set[str] = set()
        self.id_conflict = ""  # the address of a live member that uses our node id too
        self.yielded = False  # we came second: we stopped answering for our id (the node must stop)

    # --- queries ---------------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._self.incarnation

    @property
    def awareness(self) -> int:
        """Lifeguard local-health score: 0 is healthy; timeouts scale by score + 1."""
        return self._awareness.score

    @property
    def leaving(self) -> bool:
        return self._leaving

    @property
    def joined(self) -> bool:
        """False while a join is still waiting for its first JoinReply."""
        return not self._join_pending

    def leave_done(self) -> bool:
        """True once our Leave update has been sent its full retransmit count."""
        return self._leaving and self.node_id not in self._queue

    def members(self) -> list[MemberRecord]:
        """Every known member (ourselves included), sorted by node id."""
        return [self._members[k].record() for k in sorted(self._members)]

    def live_members(self) -> list[MemberRecord]:
        """Alive and suspect members (ourselves included unless we left), sorted."""
        return [m.record() for k, m in sorted(self._members.items()) if m.state in LIVE_STATES]

    def member(self, node_id: str) -> MemberRecord | None:
        m = self._members.get(node_id)
        return None if m is None else m.record()

    def pending_broadcasts(self) -> int:
        return len(self._queue)

    def events(self) -> list[MemberEvent]:
        """Drain the membership change events recorded since the last call."""
        out = list(self._events)
        self._events.clear()
        return out

    def next_deadline(self) -> float:
        """Earliest time at which :meth:`tick` has work (for shells that sleep)."""
        t = min(self._next_gossip, self._next_join)
        if not self._leaving:
            t = min(t, self._next_probe, self._next_push_pull, self._next_reconnect)
        if self._probe is not None:
            t = min(t, self._probe.next_due())
        for r in self._relays.values():
            t = min(t, r.nack_at)
        for s in self._suspicions.values():
            t = min(t, s.deadline)
        return t

    # --- inputs ----------------------------------------------------------------------------

    def join(self, seed_addrs: list[str], now: float) -> list[SwimMessage]:
        """Start joining through any of ``seed_addrs`` (our own address is skipped)."""
        for a in seed_addrs:
            check_text(a, "seed address")
        self._seeds = [a for a in dict.fromkeys(seed_addrs) if a != self.addr]
        if not self._seeds or self._leaving:
            self._join_pending = False
            self._next_join = math.inf
            return []
        self._join_pending = True
        out: list[SwimMessage] = []
        self._send_joins(now, out)
        return out

    def add_seeds(self, seed_addrs: list[str], now: float) -> list[SwimMessage]:
        """Addresses the seed names resolve to now (see "Join and leave").

        Joining: new ones become seeds. Joined: every one that is not the
        address of a live member gets our member list (``PushPull``), at most
        once per ``push_pull_backoff`` per address, so a seed that does not
        answer costs little however often the names are resolved.
        """
        for a in seed_addrs:
            check_text(a, "seed address")
        out: list[SwimMessage] = []
        fresh = [a for a in dict.fromkeys(seed_addrs) if a != self.addr]
        if self._leaving or not fresh:
            return out
        if self._join_pending:
            self._seeds += [a for a in fresh if a not in self._seeds]
            return out
        live_addrs = {m.addr for m in self._members.values() if m.state in LIVE_STATES}
        for a in fresh:
            if a not in live_addrs:
                self._push_pull_with_differing_view(a, now, out)
        return out

    def leave(self, now: float) -> list[SwimMessage]:
        """Leave gracefully: gossip ``Leave`` with a raised incarnation.

        Keep calling :meth:`tick` (it only gossips once leaving) until
        :meth:`leave_done` or a grace period passes, then stop the node.
        """
        if self._leaving:
            return []
        self._leaving = True
        self._join_pending = False
        self._next_join = math.inf
        self._probe = None
        me = self._self
        me.incarnation += 1
        self._set_state(me, LEFT, now)
        self._broadcast(Leave(self.node_id, me.incarnation))
        self._log.info("membership.leave", incarnation=me.incarnation)
        out: list[SwimMessage] = []
        self._gossip_round(now, out)
        return out

    def tick(self, now: float) -> list[SwimMessage]:
        """Run every timer that is due at ``now``."""
        out: list[SwimMessage] = []
        self._expire_relays(now, out)
        if self._probe is not None:
            self._advance_probe(self._probe, now, out)
        self._expire_suspicions(now)
        if not self._leaving:
            self._run_periodic(now, out)
        if now >= self._next_gossip:
            self._next_gossip = now + self.config.gossip_interval
            if self._queue:
                self._gossip_round(now, out)
        return out

    def handle(self, msg: SwimMessage, now: float) -> list[SwimMessage]:
        """Process one received message; raises :class:`MembershipError` on bad input."""
        check_message(msg)
        out: list[SwimMessage] = []
        self._HANDLERS[type(msg)](self, msg, now, out)
        return out

    # --- timers ----------------------------------------------------------------------------

    def _expire_relays(self, now: float, out: list[SwimMessage]) -> None:
        if not self._relays:
            return
        for seq in [s for s, r in self._relays.items() if now >= r.nack_at]:
            r = self._relays.pop(seq)
            out.append(Nack(self.addr, r.requester_addr, r.requester_seq))

    def _advance_probe(self, probe: Probe, now: float, out: list[SwimMessage]) -> None:
        if not probe.indirect_sent and now >= probe.indirect_at:
            self._send_indirect(probe, out)
        if now >= probe.deadline:
            self._probe_failed(probe, now)

    def _expire_suspicions(self, now: float) -> None:
        if not self._suspicions:
            return
        for node in [n for n, s in self._suspicions.items() if now >= s.deadline]:
            m = self._members[node]
            self._on_dead(Dead(node, m.incarnation, self.node_id), now)

    def _run_periodic(self, now: float, out: list[SwimMessage]) -> None:
        """The timers of a running member: probe, push-pull, reconnect, join retry."""
        cfg = self.config
        if now >= self._next_probe:
            self._next_probe = now + self._awareness.scale(cfg.probe_interval)
            self._reap(now)
            self._start_probe(now, out)
        if now >= self._next_push_pull:
            self._next_push_pull = now + cfg.push_pull_interval * self._push_pull_scale()
            self._push_pull_with_random_member(out)
        if now >= self._next_reconnect:
            self._next_reconnect = now + cfg.reconnect_interval
            self._push_pull_with_dead_member(now, out)
        if now >= self._next_join:
            self._send_joins(now, out)

    # --- received messages (one handler per message type, see _HANDLERS) -------------------

    def _apply_piggyback(
        self, msg: Ping | Ack | PingReq | Gossip, now: float, out: list[SwimMessage]
    ) -> None:
        # Before the message itself, so that a refutation rides on our reply.
        missed = False
        for u in msg.updates:
            missed |= self._apply(u, now)
        if missed:
            # The sender knows a member we never heard of: we missed its Alive.
            self._push_pull_with_differing_view(msg.src, now, out)

    def _handle_ping(self, msg: Ping, now: float, out: list[SwimMessage]) -> None:
        self._apply_piggyback(msg, now, out)
        if msg.target != self.node_id:
            return  # meant for a node that had this address before us
        out.append(Ack(self.addr, msg.src, msg.seq, self.node_id, self._self.incarnation, self._piggyback()))
        self._check_prober(msg, now, out)

    def _handle_ack(self, msg: Ack, now: float, out: list[SwimMessage]) -> None:
        self._apply_piggyback(msg, now, out)
        m = self._members.get(msg.responder)
        if m is not None and msg.incarnation > m.incarnation:
            self._on_alive(Alive(m.node, m.addr, msg.incarnation), now)
        probe = self._probe
        if probe is not None and msg.seq == probe.seq and msg.responder == probe.target:
            self._probe = None
            self._awareness.apply_delta(-1)
            return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            out.append(
                Ack(self.addr, relay.requester_addr, relay.requester_seq, msg.responder, msg.incarnation)
            )

    def _handle_ping_req(self, msg: PingReq, now: float, out: list[SwimMessage]) -> None:
        self._apply_piggyback(msg, now, out)
        if msg.target == self.node_id or self._leaving:
            return
        seq = self._next_seq()
        self._relays[seq] = Relay(msg.src, msg.seq, now + self.config.probe_timeout)
        out.append(Ping(self.addr, msg.target_addr, seq, msg.target, self.node_id, self._piggyback()))

    def _handle_nack(self, msg: Nack, now: float, out: list[SwimMessage]) -> None:
        if self._probe is not None and msg.seq == self._probe.seq:
            self._probe.nacks += 1

    def _handle_gossip(self, msg: Gossip, now: float, out: list[SwimMessage]) -> None:
        self._apply_piggyback(msg, now, out)

    def _handle_join(self, msg: Join, now: float, out: list[SwimMessage]) -> None:
        if msg.node == self.node_id:
            return  # a seed address that is ours under another name (advertised by DNS name)
        self._merge(msg.members, msg.node, now)
        out.append(JoinReply(self.addr, msg.src, self.node_id, self._records()))

    def _handle_join_reply(self, msg: JoinReply, now: float, out: list[SwimMessage]) -> None:
        if self._join_pending:  # our id already had a live holder when we came ("Node ids")
            me, here = self.node_id, self.addr
            self._taken_at_join.update(
                r.addr for r in msg.members if r.node == me and r.addr != here and r.state == ALIVE
            )
        self._merge(msg.members, msg.node, now)
        if not self._join_pending or msg.node == self.node_id:
            return
        self._join_pending = False
        self._next_join = math.inf
        # The seed may not yet know members that are joining at the same
        # time; one early push-pull with a random member catches them.
        early = now + self._rng.uniform(1.0, 3.0) * self.config.probe_interval
        self._next_push_pull = min(self._next_push_pull, early)
        self._log.info("membership.joined", member=msg.node, addr=msg.src, members=self._n_live)

    def _handle_push_pull(self, msg: PushPull, now: float, out: list[SwimMessage]) -> None:
        self._merge(msg.members, msg.node, now)
        if not msg.reply:
            out.append(PushPull(self.addr, msg.src, self.node_id, self._records(), reply=True))

    _HANDLERS: ClassVar[dict[type, _Handler]] = {
        Ping: _handle_ping,
        Ack: _handle_ack,
        PingReq: _handle_ping_req,
        Nack: _handle_nack,
        Gossip: _handle_gossip,
        Join: _handle_join,
        JoinReply: _handle_join_reply,
        PushPull: _handle_push_pull,
    }

    # --- probing ---------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _start_probe(self, now: float, out: list[SwimMessage]) -> None:
        target = self._ring.next_target(self._members, self.node_id, self._rng)
        if target is None:
            return
        seq = self._next_seq()
        self._probe = Probe(
            seq,
            target.node,
            indirect_at=now + self._awareness.scale(self.config.probe_timeout),
            deadline=now + self._awareness.scale(self.config.probe_interval),
        )
        updates = self._piggyback()
        if target.state == SUSPECT:
            # Lifeguard's buddy system: tell a suspect it is suspected so it can refute
            # at once; its Ack then carries the new incarnation and clears the suspicion.
            updates = (Suspect(target.node, target.incarnation, self.node_id),) + updates
        out.append(Ping(self.addr, target.addr, seq, target.node, self.node_id, updates))

    def _send_indirect(self, probe: Probe, out: list[SwimMessage]) -> None:
        probe.indirect_sent = True
        target = self._members.get(probe.target)
        if target is None or target.state not in LIVE_STATES:
            return
        helpers = [
            m
            for k, m in self._members.items()
            if m.state == ALIVE and k != self.node_id and k != probe.target
        ]
        k = min(self.config.indirect_checks, len(helpers))
        chosen = self._rng.sample(helpers, k) if k else []
        probe.expected_nacks = len(chosen)
        for h in chosen:
            out.append(PingReq(self.addr, h.addr, probe.seq, target.node, target.addr, self._piggyback()))

    def _probe_failed(self, probe: Probe, now: float) -> None:
        self._probe = None
        # Lifeguard: helpers that did not even nack suggest our own links are bad.
        if probe.expected_nacks > 0:
            self._awareness.apply_delta(probe.expected_nacks - probe.nacks)
        else:
            self._awareness.apply_delta(1)
        m = self._members.get(probe.target)
        if m is not None and m.state in LIVE_STATES:
            self._on_suspect(Suspect(m.node, m.incarnation, self.node_id), now)

    # --- gossip, push-pull, join -----------------------------------------------------------

    def _broadcast(self, u: Update) -> None:
        self._queue.push(u.node, u, encoded_size(u))
        if len(self._queue) > self.config.max_queued_broadcasts:
            self._queue.prune(self.config.max_queued_broadcasts)

    def _piggyback(self) -> tuple[Update, ...]:
        if not self._queue:
            return ()
        return tuple(self._queue.take(self._n_live, self.config.max_message_bytes, overhead=2))

    def _gossip_round(self, now: float, out: list[SwimMessage]) -> None:
        dead_cut = now - self.config.gossip_to_dead_time
        cands = [
            m
            for k, m in self._members.items()
            if k != self.node_id
            and (m.state in LIVE_STATES or (m.state == DEAD and m.state_change >= dead_cut))
        ]
        k = min(self.config.gossip_nodes, len(cands))
        for m in self._rng.sample(cands, k) if k else ():
            ups = self._queue.take(self._n_live, self.config.max_message_bytes, overhead=2)
            if not ups:
                break
            out.append(Gossip(self.addr, m.addr, tuple(ups)))

    def _push_pull_scale(self) -> float:
        # memberlist: beyond 32 members, exchange full state proportionally less often.
        n = self._n_live
        return 1.0 if n <= 32 else math.ceil(math.log2(n) - math.log2(32)) + 1.0

    def _push_pull_with_random_member(self, out: list[SwimMessage]) -> None:
        """Periodic anti-entropy with one random alive member."""
        cands = [m for k, m in self._members.items() if m.state == ALIVE and k != self.node_id]
        if cands:
            m = self._rng.choice(cands)
            out.append(PushPull(self.addr, m.addr, self.node_id, self._records()))

    def _push_pull_with_dead_member(self, now: float, out: list[SwimMessage]) -> None:
        """Reconnect: push-pull with the dead member we tried least recently.

        With d dead members each one is retried every d reconnect intervals;
        a dead member that is in fact alive behind a healed partition gets
        our view and refutes.
        """
        tried = self._reconnect_tried
        dead_members = [m for m in self._members.values() if m.state == DEAD]
        for k in [k for k in tried if k not in self._members or self._members[k].state != DEAD]:
            del tried[k]
        if dead_members:
            m = min(dead_members, key=lambda d: (tried.get(d.node, -math.inf), self._rng.random()))
            tried[m.node] = now
            out.append(PushPull(self.addr, m.addr, self.node_id, self._records()))

    def _check_prober(self, ping: Ping, now: float, out: list[SwimMessage]) -> None:
        """A member that probes us but that we do not know (or think dead) has a
        view that differs from ours: push-pull with it right away instead of
        waiting for periodic anti-entropy. This repairs a joiner that missed
        the gossip about the rest of the cluster, and a node that missed its
        own death certificate, within one probe cycle. A member that probes
        us from another address than the one we know has a differing view
        too: the member list it gets back tells a node that took a live
        member's id (its probes come from its own address) that the id's
        owner is elsewhere, within one of its probe cycles."""
        m = self._members.get(ping.source)
        if ping.source == self.node_id:
            return
        if m is None or m.state == DEAD or m.addr != ping.src:
            self._push_pull_with_differing_view(ping.src, now, out)

    def _push_pull_with_differing_view(self, addr: str, now: float, out: list[SwimMessage]) -> None:
        """Targeted anti-entropy with ``addr``, at most once per ``push_pull_backoff``."""
        last = self._differing_push_pull.get(addr)
        if self._leaving or addr == self.addr:
            return
        if last is not None and now - last < self.config.push_pull_backoff:
            return
        self._differing_push_pull[addr] = now
        out.append(PushPull(self.addr, addr, self.node_id, self._records()))

    def _records(self) -> tuple[MemberRecord, ...]:
        return tuple(m.record() for m in self._members.values())

    def _send_joins(self, now: float, out: list[SwimMessage]) -> None:
        self._next_join = now + self.config.join_retry_interval
        k = min(self.config.join_fanout, len(self._seeds))
        records = self._records()
        for seed in self._rng.sample(self._seeds, k):
            out.append(Join(self.addr, seed, self.node_id, records))

    def _merge(self, records: tuple[MemberRecord, ...], sender: str, now: float) -> None:
        for r in records:
            if r.state == ALIVE:
                self._on_alive(Alive(r.node, r.addr, r.incarnation), now)
            elif r.state == LEFT:
                self._on_leave(Leave(r.node, r.incarnation), now)
            else:
                # A remote "dead" only makes us suspect: we verify deaths ourselves.
                m = self._members.get(r.node)
                if r.node == self.node_id or (m is not None and m.state != r.state):
                    self._on_suspect(Suspect(r.node, r.incarnation, sender), now)

    # --- state transitions -----------------------------------------------------------------

    def _apply(self, u: Update, now: float) -> bool:
        """Apply one gossiped update.

        Returns True when it accuses (Suspect, Dead) a member we never heard
        of: we missed that member's Alive. Alive adds an unknown member, and a
        Leave of one needs no repair, so those return False.
        """
        if isinstance(u, Alive):
            self._on_alive(u, now)
            return False
        if isinstance(u, Suspect):
            return self._on_suspect(u, now)
        if isinstance(u, Dead):
            return self._on_dead(u, now)
        self._on_leave(u, now)
        return False

    def _set_state(self, m: _Member, state: str, now: float) -> None:
        was_live = m.state in LIVE_STATES
        is_live = state in LIVE_STATES
        if was_live != is_live:
            self._n_live += 1 if is_live else -1
        if state != m.state:
            m.state = state
            m.state_change = now
        if state != SUSPECT:
            self._suspicions.pop(m.node, None)

    def _event(self, kind: str, m: _Member, now: float) -> None:
        self._events.append(MemberEvent(kind, m.node, m.addr, m.incarnation, now))

    def _refute(self, accused_incarnation: int) -> None:
        me = self._self
        me.incarnation = max(me.incarnation, accused_incarnation) + 1
        self._broadcast(Alive(self.node_id, self.addr, me.incarnation))
        self._log.info("membership.refute", incarnation=me.incarnation)

    def _on_alive(self, a: Alive, now: float) -> None:
        if a.node == self.node_id:
            if self._leaving or self.yielded:
                return
            if a.addr != self.addr and a.incarnation >= self._self.incarnation:
                # Equal: our refutation has not replaced a stale record there
                # yet (members keep the first of equal incarnations): again,
                # above it. Above: a claim.
                if a.incarnation == self._self.incarnation or self._claimed(a.addr, now):
                    self._refute(a.incarnation)
            elif a.incarnation > self._self.incarnation:
                # Someone knows a newer incarnation of us: we restarted and lost it.
                self._refute(a.incarnation)
            return
        m = self._members.get(a.node)
        if m is None:
            self._add_member(a, now)
            return
        if a.incarnation <= m.incarnation:
            return
        prev = m.state
        m.incarnation = a.incarnation
        m.addr = a.addr
        self._set_state(m, ALIVE, now)
        if prev in (DEAD, LEFT):
            self._event("joined", m, now)
            self._log.info("membership.member_rejoined", member=a.node, incarnation=a.incarnation)
        elif prev == SUSPECT:
            self._event("alive", m, now)
        self._broadcast(a)

    def _claimed(self, addr: str, now: float) -> bool:
        """Another address claims our node id: whether to refute.

        The first claim from an address is our own previous life (a restart
        on another address): refuted, the mesh learns our address. A second
        one means it refuted us in turn: a live member uses our id. Of the
        two, the one that found the other in the member list its join got
        back came second and yields: it stops refuting, and the node stops
        (without a Leave, which would be taken as the other's). The other
        keeps refuting."""
        n = self._claims[addr] = self._claims.get(addr, 0) + 1
        second = addr in self._taken_at_join
        if n == 1:
            self._log.warning("membership.node_id_claimed", other_addr=addr, came_second=second)
            return True
        if not self.id_conflict:
            self.id_conflict = addr
            self._log.error(
                "membership.node_id_conflict",
                other_addr=addr,
                yielding=second,
                hint="two running nodes have this --node-id; give each its own",
            )
            self._events.append(MemberEvent("id_conflict", self.node_id, addr, self._self.incarnation, now))
        if second:
            self.yielded = True
            return False
        return True

    def _add_member(self, a: Alive, now: float) -> None:
        m = _Member(a.node, a.addr, a.incarnation, DEAD, now)  # DEAD, so that _set_state counts it live
        self._members[a.node] = m
        self._set_state(m, ALIVE, now)
        self._ring.insert(a.node, self._rng)
        self._event("joined", m, now)
        self._log.info("membership.member_joined", member=a.node, addr=a.addr, incarnation=a.incarnation)
        self._broadcast(a)

    def _on_suspect(self, s: Suspect, now: float) -> bool:
        """Apply a suspicion; True when it names a member we do not know."""
        if s.node == self.node_id:
            if s.incarnation >= self._self.incarnation and not self._leaving and not self.yielded:
                self._refute(s.incarnation)
                self._awareness.apply_delta(1)  # Lifeguard: being suspected hints that we are slow
            return False
        m = self._members.get(s.node)
        if m is None:
            return True
        if s.incarnation < m.incarnation:
            return False
        susp = self._suspicions.get(s.node)
        if susp is not None:
            m.incarnation = s.incarnation
            if susp.confirm(s.accuser):
                self._broadcast(s)  # pass the confirmation on so others speed up too
            return False
        if m.state != ALIVE:
            return False
        m.incarnation = s.incarnation
        self._set_state(m, SUSPECT, now)
        cfg = self.config
        n = self._n_live
        lo, hi = suspicion_timeouts(cfg.suspicion_mult, cfg.suspicion_max_timeout_mult, n, cfg.probe_interval)
        k = confirmations_wanted(cfg.suspicion_mult, n)
        self._suspicions[s.node] = Suspicion(s.accuser, k, lo, hi, now)
        self._event("suspect", m, now)
        self._broadcast(s)
        return False

    def _on_dead(self, d: Dead, now: float) -> bool:
        """Apply a death; True when it names a member we do not know."""
        if d.node == self.node_id:
            if d.incarnation >= self._self.incarnation and not self._leaving and not self.yielded:
                self._refute(d.incarnation)
            return False
        m = self._members.get(d.node)
        if m is None:
            return True
        if d.incarnation < m.incarnation or m.state in (DEAD, LEFT):
            return False
        m.incarnation = d.incarnation
        self._set_state(m, DEAD, now)
        self._event("dead", m, now)
        self._log.info("membership.member_dead", member=d.node, incarnation=d.incarnation, accuser=d.accuser)
        self._broadcast(d)
        return False

    def _on_leave(self, lv: Leave, now: float) -> None:
        if lv.node == self.node_id:
            if lv.incarnation >= self._self.incarnation and not self._leaving and not self.yielded:
                self._refute(lv.incarnation)
            return
        m = self._members.get(lv.node)
        if m is None or lv.incarnation < m.incarnation or m.state == LEFT:
            return
        m.incarnation = lv.incarnation
        self._set_state(m, LEFT, now)
        self._event("left", m, now)
        self._log.info("membership.member_left", member=lv.node, incarnation=lv.incarnation)
        self._broadcast(lv)

    def _reap(self, now: float) -> None:
        if self._differing_push_pull:
            old = now - self.config.push_pull_backoff
            self._differing_push_pull = {a: t for a, t in self._differing_push_pull.items() if t > old}
        cut = now - self.config.dead_reclaim_time
        gone = [
            k
            for k, m in self._members.items()
            if m.state in (DEAD, LEFT) and m.state_change <= cut and k != self.node_id
        ]
        for k in gone:
            del self._members[k]
