"""Failure-detector bookkeeping: whom to probe next, the probe in flight, pings relayed for others.

SWIM probes one member per probe interval (see ``mesh/membership.py`` for the
whole protocol). Three pieces of state support it:

* :class:`ProbeRing`: the order of probe targets. A shuffled round-robin list
  of the live members, reshuffled each cycle, so every member is probed once
  per cycle and the time to detect a failure is bounded (a random target each
  time could leave one member unprobed for a long while). A member that joins
  mid-cycle is inserted at a random position in the rest of the cycle, so it
  is probed within the current cycle too.
* :class:`Probe`: our one probe in flight: when to fall back to indirect
  probes, when to give up, and how many helpers answered ``Nack``.
* :class:`Relay`: a ``Ping`` we send on behalf of another member's
  ``PingReq``; its ``Ack`` is forwarded to the requester, and a ``Nack`` is
  sent when the target stays silent.

Pure: the caller passes the RNG and the time.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from mesh.swim_messages import LIVE_STATES

__all__ = ["Probe", "ProbeRing", "Relay"]


class _HasState(Protocol):
    @property
    def state(self) -> str: ...


M = TypeVar("M", bound=_HasState)


class ProbeRing:
    """Probe targets (node ids) in shuffled round-robin order."""

    __slots__ = ("_next", "_order")

    def __init__(self) -> None:
        self._order: list[str] = []
        self._next = 0  # index in _order of the next target

    def next_target(self, members: Mapping[str, M], self_id: str, rng: random.Random) -> M | None:
        """The next live member to probe (never ``self_id``), or None when there is none.

        Members that died or were removed since the cycle was shuffled are
        skipped; when the cycle is used up, a new one is shuffled.
        """
        for _ in range(len(self._order) + 2):
            if self._next >= len(self._order):
                self._order = [k for k, m in members.items() if m.state in LIVE_STATES and k != self_id]
                rng.shuffle(self._order)
                self._next = 0
                if not self._order:
                    return None
            node = self._order[self._next]
            self._next += 1
            m = members.get(node)
            if m is not None and m.state in LIVE_STATES and node != self_id:
                return m
        return None

    def insert(self, node: str, rng: random.Random) -> None:
        """Add a new member at a random position of the rest of this cycle."""
        pos = rng.randint(self._next, len(self._order))
        self._order.insert(pos, node)


@dataclass(slots=True)
class Probe:
    """Our probe in flight (one at a time)."""

    seq: int
    target: str  # node id
    indirect_at: float  # no Ack by then: ask helpers (PingReq)
    deadline: float  # no Ack by then: the probe failed, suspect the target
    indirect_sent: bool = False
    expected_nacks: int = 0  # helpers asked
    nacks: int = 0  # helpers that answered Nack

    def next_due(self) -> float:
        """When this probe next needs attention from ``tick``."""
        return self.deadline if self.indirect_sent else self.indirect_at


@dataclass(frozen=True, slots=True)
class Relay:
    """A ping we send on behalf of another member's PingReq."""

    requester_addr: str
    requester_seq: int  # the requester's probe seq, echoed in the forwarded Ack or the Nack
    nack_at: float  # no Ack from the target by then: answer Nack
