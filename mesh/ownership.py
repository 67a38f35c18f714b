"""Which live node owns which engine: rendezvous (highest random weight) hashing.

Every node computes the owner of an engine from the same inputs -- the engine
id and the set of live member ids -- so all nodes that agree on membership
agree on the owner without exchanging a message (design.md decision 2).

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

from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

__all__ = ["OwnershipChange", "owner_of", "owners", "ownership_change", "score"]

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


@dataclass(frozen=True, slots=True)
class OwnershipChange:
    gained: tuple[str, ...]  # engines ``me`` owns after but not before (sorted)
    lost: tuple[str, ...]  # engines ``me`` owned before but not after (sorted)


def ownership_change(
    me: str,
    engine_ids: Iterable[str],
    live_before: Iterable[str],
    live_after: Iterable[str],
) -> OwnershipChange:
    """Which of ``engine_ids`` node ``me`` gains and loses when the live set changes."""
    engines = sorted(set(engine_ids))
    before = sorted(set(live_before))
    after = sorted(set(live_after))
    gained, lost = [], []
    for e in engines:
        was = owner_of(e, before) == me
        now = owner_of(e, after) == me
        if now and not was:
            gained.append(e)
        elif was and not now:
            lost.append(e)
    return OwnershipChange(tuple(gained), tuple(lost))
