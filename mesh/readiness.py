"""Readiness: when a node may write engine logs and serve.

A node that joins an existing mesh owns nothing until it has applied the full
state of a ready peer, so it never starts an engine log's new term from an
empty view. ``start`` with no seed (or only its own address) begins a new
mesh: ready at once.

Joining, the node asks a live peer for its full state every
``full_state_retry`` seconds until a *ready* peer answers; every other attempt
goes to the live member with the smallest id, which is the one that becomes
ready first in a cold start. A cold start -- every node started at once with
the others as seeds, behind one DNS name -- has nobody ready to ask: after
``bootstrap_wait`` seconds joined without hearing from a ready peer (but
having heard from one that is not), the live node with the smallest id
becomes ready on its own, and the others get their full state from it.

Pure: time and randomness come in as arguments.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import structlog

__all__ = ["AskFullState", "BecomeReady", "JoinStep", "Readiness"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class BecomeReady:
    why: str


@dataclass(frozen=True, slots=True)
class AskFullState:
    addr: str  # the peer to ask


JoinStep = BecomeReady | AskFullState | None


class Readiness:
    """Joining -> ready -> leaving, for one node (see the module docstring)."""

    def __init__(self, node_id: str, full_state_retry: float, bootstrap_wait: float) -> None:
        self.node_id = node_id
        self.full_state_retry = full_state_retry
        self.bootstrap_wait = bootstrap_wait
        self.started = False
        self.joining = False
        self.ready = False
        self.leaving = False
        self.attempts = 0  # full-state requests sent
        self._joined_at: float | None = None  # when membership's join completed
        self._next_ask = math.inf
        self._heard_not_ready = False

    @property
    def next_deadline(self) -> float:
        return self._next_ask if self.joining else math.inf

    def start(self, alone: bool, now: float) -> None:
        """Joining starts; ``alone``: this node starts a new mesh (ready at once)."""
        if self.started:
            raise RuntimeError(f"{self.node_id} already joined")
        self.started = True
        if alone:
            self.become_ready("first node", now)
        else:
            self.joining = True
            self._next_ask = now

    def membership_joined(self, now: float) -> None:
        """Membership's join completed (a seed answered); starts the bootstrap clock."""
        if self.joining and self._joined_at is None:
            self._joined_at = now

    def step(
        self, now: float, live_ids: list[str], peer_addrs: dict[str, str], rng: random.Random
    ) -> JoinStep:
        """While joining: become ready, or ask a peer for its full state (or wait).

        ``live_ids`` are the live members in id order (this node included);
        ``peer_addrs`` maps the other live members to their addresses.
        """
        if not self.joining or self._joined_at is None or now < self._next_ask:
            return None
        if not peer_addrs:
            return BecomeReady("alone")
        if (
            now - self._joined_at >= self.bootstrap_wait
            and self._heard_not_ready
            and live_ids[0] == self.node_id
        ):
            return BecomeReady("bootstrap")
        self.attempts += 1
        first = live_ids[0]
        if self.attempts % 2 == 0 and first != self.node_id:
            target = peer_addrs[first]
        else:
            target = rng.choice(list(peer_addrs.values()))
        self._next_ask = now + self.full_state_retry
        return AskFullState(target)

    def full_state_from(self, sender: str, sender_ready: bool, now: float) -> bool:
        """A peer's full state was applied; True if this made the node ready."""
        if not self.joining:
            return False
        if sender_ready:
            return self.become_ready(f"full state from {sender}", now)
        self._heard_not_ready = True
        return False

    def become_ready(self, why: str, now: float) -> bool:
        if self.ready or self.leaving:
            return False
        self.ready = True
        self.joining = False
        self._next_ask = math.inf
        log.info("mesh.ready", node=self.node_id, why=why, attempts=self.attempts, now=now)
        return True

    def leave(self) -> None:
        self.leaving = True
        self.ready = False
        self.joining = False
