"""Global load: one last-writer-wins slot per node, summed per worker.

Each node owns a slot with its own in-flight requests and tokens of work per
worker; a worker's load is the sum over the slots of live nodes. A node that
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


class WorkerLoad(msgspec.Struct, array_like=True, gc=False):
    requests: int = 0  # in flight
    tokens: int = 0  # tokens of work in flight


class Slot(msgspec.Struct, array_like=True, gc=False):
    node_id: str
    version: int
    loads: dict[str, WorkerLoad]  # worker -> its load from this node


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

    def set_local(self, loads: dict[str, tuple[int, int]], now: float) -> bool:
        """Set this node's in-flight (requests, tokens of work) per worker.

        Absolute values; workers with nothing in flight are left out, so the
        slot stays small. Returns True (and re-stamps the slot) if anything
        changed.
        """
        new: dict[str, WorkerLoad] = {}
        for w, (r, t) in loads.items():
            if r < 0 or t < 0:
                raise ValueError(f"negative load for {w!r}: {(r, t)}")
            if r or t:
                new[w] = WorkerLoad(r, t)
        s = self.local
        if new == s.loads:
            return False
        self.slots[self.node_id] = Slot(self.node_id, self._stamp(s.version, now), new)
        return True

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
            log.warning("mesh.slot_bad_version", node=self.node_id, member=slot.node_id, version=slot.version)
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

    def totals(self, nodes: set[str] | None = None) -> dict[str, WorkerLoad]:
        """Per worker, the in-flight load summed over the slots of ``nodes``
        (all known slots when None), in worker order."""
        out: dict[str, WorkerLoad] = {}
        for n in sorted(self.slots):
            if nodes is not None and n not in nodes:
                continue
            for w, el in self.slots[n].loads.items():
                t = out.get(w)
                if t is None:
                    t = out[w] = WorkerLoad()
                t.requests += el.requests
                t.tokens += el.tokens
        return dict(sorted(out.items()))

    def versions(self) -> dict[str, int]:
        return {n: s.version for n, s in self.slots.items()}

    def newer_than(self, versions: dict[str, int]) -> list[Slot]:
        """Slots the holder of ``versions`` lacks or has an older version of."""
        return [s for n, s in self.slots.items() if versions.get(n, -1) < s.version]
