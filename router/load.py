"""Load: the requests in flight on each worker, counted over the whole mesh.

:class:`LoadTracker` counts what *this* node has sent and not yet seen
finish, with each request's weight in tokens of work (see
``router.request_path.work_tokens``). Each node publishes its tracker as its
load slot in the mesh (``MeshCore.set_local_load``); the mesh sums the live
nodes' slots per worker (``MeshCore.worker_load``).

:class:`MeshLoad` is what routing reads: this node's tracker, read live (its
own requests count the moment they are sent), plus the mesh sum minus the
slot this node last published (so its own requests are not counted twice,
and the other nodes' are as fresh as gossip makes them). A node that leaves
or dies drops out of the mesh sum, and its requests with it.

Pure: the mesh figures are passed in, never fetched.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

__all__ = ["LoadTracker", "MeshLoad", "WorkerLoads"]


@dataclass(slots=True)
class _InFlight:
    worker: str
    tokens: int


class LoadTracker:
    """In-flight requests of this node, per worker, each with a token weight."""

    __slots__ = ("_count", "_reqs", "_tokens")

    def __init__(self) -> None:
        self._reqs: dict[Hashable, _InFlight] = {}
        self._count: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def start(self, worker: str, key: Hashable, tokens: int) -> None:
        if not isinstance(worker, str) or not worker:
            raise ValueError(f"worker must be a non-empty str, got {worker!r}")
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
        if key in self._reqs:
            raise ValueError(f"request {key!r} is already in flight on {self._reqs[key].worker!r}")
        self._reqs[key] = _InFlight(worker, tokens)
        self._count[worker] = self._count.get(worker, 0) + 1
        self._tokens[worker] = self._tokens.get(worker, 0) + tokens

    def finish(self, key: Hashable) -> bool:
        """Mark a request done. Idempotent: returns False if it was not in flight."""
        r = self._reqs.pop(key, None)
        if r is None:
            return False
        self._release(r)
        return True

    def set_tokens(self, key: Hashable, tokens: int) -> bool:
        """Change a request's token weight (its prefill is done and only
        decode work is left). Returns False if it is not in flight."""
        r = self._reqs.get(key)
        if r is None:
            return False
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
        self._tokens[r.worker] += tokens - r.tokens
        r.tokens = tokens
        return True

    def _release(self, r: _InFlight) -> None:
        c = self._count[r.worker] - 1
        if c:
            self._count[r.worker] = c
            self._tokens[r.worker] -= r.tokens
        else:  # keep slots small: idle workers are simply absent
            del self._count[r.worker]
            del self._tokens[r.worker]

    def in_flight(self, worker: str) -> int:
        return self._count.get(worker, 0)

    def in_flight_tokens(self, worker: str) -> int:
        return self._tokens.get(worker, 0)

    def slot(self) -> dict[str, tuple[int, int]]:
        """(requests, tokens) per busy worker: what this node publishes."""
        return {w: (c, self._tokens[w]) for w, c in self._count.items()}

    def drop_worker(self, worker: str) -> list[Hashable]:
        """Forget every in-flight request on ``worker`` (engine removed)."""
        gone = [rid for rid, r in self._reqs.items() if r.worker == worker]
        for rid in gone:
            self._release(self._reqs.pop(rid))
        return gone


@dataclass(frozen=True, slots=True)
class WorkerLoads:
    """Mesh-wide in-flight requests and tokens per worker (busy workers only)."""

    requests: dict[str, float]
    tokens: dict[str, float]

    def of(self, worker: str) -> tuple[float, float]:
        return self.requests.get(worker, 0.0), self.tokens.get(worker, 0.0)


class MeshLoad:
    """This node's :class:`LoadTracker` plus the other nodes' load slots."""

    __slots__ = ("_published", "local")

    def __init__(self, local: LoadTracker | None = None) -> None:
        self.local = local if local is not None else LoadTracker()
        self._published: dict[str, tuple[int, int]] = {}

    def slot_to_publish(self) -> dict[str, tuple[int, int]] | None:
        """This node's slot if it changed since the last call (which then
        counts as published), else None."""
        slot = self.local.slot()
        if slot == self._published:
            return None
        self._published = slot
        return slot

    def view(self, mesh_sum: Mapping[str, tuple[float, float]]) -> WorkerLoads:
        """Loads per worker, given the mesh's sum over live nodes' published
        slots (``MeshCore.worker_load()``)."""
        requests: dict[str, float] = {}
        tokens: dict[str, float] = {}
        published = self._published
        for w, (r, t) in mesh_sum.items():
            own_r, own_t = published.get(w, (0, 0))
            if r - own_r > 0 or t - own_t > 0:
                requests[w] = max(r - own_r, 0.0)
                tokens[w] = max(t - own_t, 0.0)
        for w, (r, t) in self.local.slot().items():
            requests[w] = r + requests.get(w, 0.0)
            tokens[w] = t + tokens.get(w, 0.0)
        return WorkerLoads(requests, tokens)
