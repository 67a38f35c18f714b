"""Global load: one last-writer-wins slot per node, summed per engine.

Each node owns a slot with its own in-flight requests and prompt tokens per
engine; an engine's load is the sum over the slots of live nodes. A node that
leaves or dies has its slot dropped (``drop``).

Why not a pycrdt Map: load changes on every request start and end. Each
overwrite of a Map key leaves a tombstone, so a Map written thousands of
times a second grows without bound. Here a slot is a state-based LWW
register: ``node_id -> (version, loads)``, only its node writes it, merge
keeps the higher version. State is O(nodes x engines), whatever the traffic.

Versions are ``max(previous + 1, int(now * 1e6))``: strictly increasing while
the node runs and, after a restart, ahead of whatever its previous
incarnation gossiped (clocks only need to be roughly right, not in sync: a
version is compared only with versions of the same node).

A dropped node leaves a *fence* (its last version) so that stale gossip cannot
resurrect the slot; a slot with a higher version (the node is back, or was
falsely suspected and writes again, see ``refresh``) replaces the fence.
Fences are forgotten after ``fence_ttl`` seconds.
"""

from __future__ import annotations

import msgspec
import structlog

log = structlog.get_logger(__name__)


class EngineLoad(msgspec.Struct, array_like=True, gc=False):
    requests: int = 0  # in flight
    tokens: int = 0  # prompt tokens in flight


class Slot(msgspec.Struct, array_like=True, gc=False):
    node_id: str
    version: int
    loads: dict[str, EngineLoad]


class LoadSlots:
    """The load slots known to one node, its own included."""

    def __init__(self, node_id: str, now: float, fence_ttl: float = 300.0) -> None:
        self.node_id = node_id
        self.fence_ttl = fence_ttl
        self.slots: dict[str, Slot] = {node_id: Slot(node_id, self._stamp(0, now), {})}
        self._fences: dict[str, tuple[int, float]] = {}  # node -> (version, dropped at)

    @staticmethod
    def _stamp(prev: int, now: float) -> int:
        return max(prev + 1, int(now * 1_000_000))

    @property
    def local(self) -> Slot:
        return self.slots[self.node_id]

    def add_local(self, engine_id: str, requests: int, tokens: int, now: float) -> Slot:
        """Change this node's in-flight counts (deltas may be negative); never below 0."""
        s = self.local
        cur = s.loads.get(engine_id) or EngineLoad()
        new = EngineLoad(max(0, cur.requests + requests), max(0, cur.tokens + tokens))
        loads = dict(s.loads)
        if new.requests == 0 and new.tokens == 0:
            loads.pop(engine_id, None)
        else:
            loads[engine_id] = new
        self.slots[self.node_id] = Slot(self.node_id, self._stamp(s.version, now), loads)
        return self.local

    def refresh(self, now: float) -> Slot:
        """Re-stamp the local slot (e.g. after being wrongly declared dead)."""
        s = self.local
        self.slots[self.node_id] = Slot(self.node_id, self._stamp(s.version, now), s.loads)
        return self.local

    def merge(self, slot: Slot) -> bool:
        """Merge a remote slot (higher version wins); True if it changed anything."""
        if slot.node_id == self.node_id:
            return False  # only we write our slot
        if not isinstance(slot.version, int) or slot.version < 0:
            log.warning("slot_bad_version", node=slot.node_id, version=slot.version)
            return False
        fence = self._fences.get(slot.node_id)
        if fence is not None:
            if slot.version <= fence[0]:
                return False
            del self._fences[slot.node_id]
        cur = self.slots.get(slot.node_id)
        if cur is not None and cur.version >= slot.version:
            return False
        self.slots[slot.node_id] = slot
        return True

    def drop(self, node_id: str, now: float) -> bool:
        """Forget a dead or departed node's slot; fence its versions."""
        if node_id == self.node_id:
            return False
        s = self.slots.pop(node_id, None)
        prev = self._fences.get(node_id, (0, now))[0]
        self._fences[node_id] = (max(prev, s.version if s else 0), now)
        return s is not None

    def expire(self, now: float) -> None:
        for n, (_, at) in list(self._fences.items()):
            if now - at > self.fence_ttl:
                del self._fences[n]

    def load(self, engine_id: str) -> EngineLoad:
        total = EngineLoad()
        for s in self.slots.values():
            el = s.loads.get(engine_id)
            if el is not None:
                total.requests += el.requests
                total.tokens += el.tokens
        return total

    def loads(self) -> dict[str, EngineLoad]:
        out: dict[str, EngineLoad] = {}
        for s in self.slots.values():
            for e, el in s.loads.items():
                t = out.setdefault(e, EngineLoad())
                t.requests += el.requests
                t.tokens += el.tokens
        return out

    def versions(self) -> dict[str, int]:
        return {n: s.version for n, s in self.slots.items()}

    def newer_than(self, versions: dict[str, int]) -> list[Slot]:
        """Slots the holder of ``versions`` lacks or has an older version of."""
        return [s for n, s in self.slots.items() if versions.get(n, -1) < s.version]
