"""Which live node owns which engine: rendezvous (highest random weight) hashing.

Every node computes the owner of an engine from the same inputs -- the engine
id and the set of live member ids -- so all nodes that agree on membership
agree on the owner without exchanging a message.

Rendezvous hashing scores every (engine, member) pair with a 64-bit hash and
picks the member with the highest score. When a member leaves, only the
engines it owned move (each to the member with the next-highest score); when
one joins, it takes exactly the engines for which it now scores highest. No
ring, no virtual nodes, no state.

The hash is xxh3-64 over a length-prefixed encoding of both ids, so it is the
same in every process and on every platform (no dependence on
``PYTHONHASHSEED``), and two different pairs cannot encode to the same bytes.
Ties (astronomically rare) go to the larger member id, so the result never
depends on iteration order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

__all__ = ["OwnershipAction", "OwnershipTracker", "owner_of", "owners", "score"]

_xxh3 = xxhash.xxh3_64_intdigest
_TAG = b"kvmesh.owner.v1"


def _enc(s: str) -> bytes:
    raw = s.encode("utf-8")
    return len(raw).to_bytes(4, "little") + raw


def score(engine_id: str, member_id: str) -> int:
    """The rendezvous weight of ``member_id`` for ``engine_id`` (unsigned 64-bit)."""
    return _xxh3(_TAG + _enc(engine_id) + _enc(member_id))


def owner_of(engine_id: str, live_ids: Iterable[str]) -> str | None:
    """The live member that owns ``engine_id``; None when nobody is live."""
    best: tuple[int, str] | None = None
    for m in live_ids:
        key = (score(engine_id, m), m)
        if best is None or key > best:
            best = key
    return None if best is None else best[1]


def owners(engine_ids: Iterable[str], live_ids: Iterable[str]) -> dict[str, str | None]:
    """``owner_of`` for many engines against one member set."""
    live = sorted(set(live_ids))
    return {e: owner_of(e, live) for e in sorted(set(engine_ids))}


class OwnershipTracker:
    """The engines this node owns, and when it may take one back.

    Ownership follows rendezvous hashing over the live members, checked when
    membership, the registry or readiness changes (and periodically). A node
    fenced out of an engine's log (a higher epoch appeared: another node took
    it) gives it up at once; if rendezvous still names it, it re-takes the
    engine only after ``retake_backoff`` seconds, so two nodes with different
    views of membership do not hand an engine back and forth at gossip speed.
    """

    def __init__(self, me: str, retake_backoff: float) -> None:
        self.me = me
        self.retake_backoff = retake_backoff
        self.owned: set[str] = set()
        self._retake_after: dict[str, float] = {}

    def plan(self, engines: Iterable[str], live: Iterable[str], now: float) -> list[OwnershipAction]:
        """What to take and release, in engine order, so that this node owns
        exactly its share (then the release of engines no longer registered)."""
        registered = sorted(set(engines))
        actions: list[OwnershipAction] = []
        for e, owner in owners(registered, live).items():
            if owner == self.me and e not in self.owned:
                if now >= self._retake_after.get(e, -math.inf):
                    actions.append(OwnershipAction(e, take=True))  # else: retried by the periodic check
            elif owner != self.me and e in self.owned:
                actions.append(OwnershipAction(e, take=False, why="rendezvous moved it"))
        gone = sorted(self.owned - set(registered))
        actions += [OwnershipAction(e, take=False, why="not registered") for e in gone]
        return actions

    def taken(self, engine_id: str) -> None:
        self.owned.add(engine_id)
        self._retake_after.pop(engine_id, None)

    def released(self, engine_id: str) -> None:
        self.owned.discard(engine_id)

    def fenced(self, engine_id: str, now: float) -> bool:
        """Another node took ``engine_id``: stop owning it, re-take no sooner
        than ``retake_backoff`` from now. False if it was not ours."""
        if engine_id not in self.owned:
            return False
        self.owned.discard(engine_id)
        self._retake_after[engine_id] = now + self.retake_backoff
        return True

    def expire(self, now: float) -> None:
        if self._retake_after:
            self._retake_after = {e: t for e, t in self._retake_after.items() if t > now}


@dataclass(frozen=True, slots=True)
class OwnershipAction:
    engine_id: str
    take: bool  # False: release
    why: str = ""
