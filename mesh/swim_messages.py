"""The SWIM membership protocol's wire types: member states, gossiped updates, messages, events.

Plain frozen dataclasses with no behaviour: :class:`~mesh.membership.Membership`
consumes and produces them, ``mesh/swim_checks.py`` validates what arrives and
``mesh/wire.py`` maps them one to one onto ``proto/kvmesh/mesh/v1/mesh.proto``
(same field names on both sides).

Member states
    ``alive``, ``suspect``, ``dead``, ``left``. Alive and suspect members are
    *live*: they are probed, counted in the cluster size and gossiped to.

Updates (no addressing: they ride inside messages)
    :class:`Alive`, :class:`Suspect`, :class:`Dead`, :class:`Leave`, each
    about one member at one incarnation. Suspect and Dead name their
    *accuser*, so that confirmations of a suspicion can be told apart.

Messages (every one has ``src`` and ``dst`` addresses)
    * :class:`Ping` / :class:`Ack`: a direct probe and its answer. Both carry
      piggybacked updates; the Ack also carries the responder's incarnation.
    * :class:`PingReq` / :class:`Nack`: an indirect probe, asking another
      member to ping the target for us; the helper forwards the target's Ack,
      or answers Nack when the target stayed silent.
    * :class:`Gossip`: queued updates, sent on the gossip timer.
    * :class:`Join` / :class:`JoinReply` / :class:`PushPull`: full member
      lists (:class:`MemberRecord`) exchanged to join and for anti-entropy.

Events
    :class:`MemberEvent` reports a membership change to the state machine's
    owner (``joined``, ``suspect``, ``alive`` (suspicion refuted), ``dead``,
    ``left``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ALIVE",
    "DEAD",
    "LEFT",
    "LIVE_STATES",
    "STATES",
    "SUSPECT",
    "Ack",
    "Alive",
    "Dead",
    "Gossip",
    "Join",
    "JoinReply",
    "Leave",
    "MemberEvent",
    "MemberRecord",
    "Nack",
    "Ping",
    "PingReq",
    "PushPull",
    "Suspect",
    "SwimMessage",
    "Update",
    "encoded_size",
]

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
LEFT = "left"
STATES = (ALIVE, SUSPECT, DEAD, LEFT)
LIVE_STATES = (ALIVE, SUSPECT)


# --- gossiped updates --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alive:
    node: str
    addr: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class Suspect:
    node: str
    incarnation: int
    accuser: str  # node id of whoever suspects it; confirmations must be independent


@dataclass(frozen=True, slots=True)
class Dead:
    node: str
    incarnation: int
    accuser: str


@dataclass(frozen=True, slots=True)
class Leave:
    node: str
    incarnation: int


Update = Alive | Suspect | Dead | Leave


def encoded_size(u: Update) -> int:
    """Rough encoded size of ``u`` in bytes: the unit of the piggyback budget.

    Strings plus a few varints and framing: an estimate is enough for a budget
    that only bounds how much gossip rides on one message.
    """
    if isinstance(u, Alive):
        return 12 + len(u.node) + len(u.addr)
    if isinstance(u, Leave):
        return 10 + len(u.node)
    return 12 + len(u.node) + len(u.accuser)


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One member as seen by one node (push-pull payload and snapshot item)."""

    node: str
    addr: str
    incarnation: int
    state: str


# --- messages ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    src: str
    dst: str
    seq: int
    target: str  # node id expected at dst; a different node there ignores the ping
    source: str  # node id of the sender
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    src: str
    dst: str
    seq: int
    responder: str  # node id that answered the ping (forwarded unchanged by relays)
    incarnation: int  # the responder's own incarnation: first-hand, so it counts as Alive
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    src: str
    dst: str
    seq: int
    target: str
    target_addr: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    src: str
    dst: str
    seq: int


@dataclass(frozen=True, slots=True)
class Gossip:
    src: str
    dst: str
    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class Join:
    src: str
    dst: str
    node: str
    members: tuple[MemberRecord, ...]


@dataclass(frozen=True, slots=True)
class JoinReply:
    src: str
    dst: str
    node: str
    members: tuple[MemberRecord, ...]


@dataclass(frozen=True, slots=True)
class PushPull:
    src: str
    dst: str
    node: str
    members: tuple[MemberRecord, ...]
    reply: bool = False


SwimMessage = Ping | Ack | PingReq | Nack | Gossip | Join | JoinReply | PushPull


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberEvent:
    kind: str  # joined | suspect | alive | dead | left | id_conflict (node: ours, addr: the other's)
    node: str
    addr: str
    incarnation: int
    at: float
