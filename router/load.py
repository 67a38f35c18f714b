"""Load accounting: in-flight requests and prompt tokens per worker.

:class:`LoadTracker` counts what *this* node has sent and not yet seen finish.
:class:`LoadView` is what policies read: this node's tracker plus one slot per
remote node (filled by the mesh from gossip), summed per worker. A node that
leaves has its slot dropped, so its requests stop counting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

__all__ = ["LoadTracker", "LoadView"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _InFlight:
    worker: str
    prompt_tokens: int
    started: float


class LoadTracker:
    """In-flight requests of this node, per worker. Pure: time is passed in."""

    __slots__ = ("_count", "_reqs", "_tokens")

    def __init__(self) -> None:
        self._reqs: dict[str, _InFlight] = {}
        self._count: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def start(self, worker: str, request_id: str, prompt_tokens: int, now: float) -> None:
        if not isinstance(worker, str) or not worker:
            raise ValueError(f"worker must be a non-empty str, got {worker!r}")
        if not isinstance(prompt_tokens, int) or prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be a non-negative int, got {prompt_tokens!r}")
        if request_id in self._reqs:
            raise ValueError(
                f"request {request_id!r} is already in flight on {self._reqs[request_id].worker!r}"
            )
        self._reqs[request_id] = _InFlight(worker, prompt_tokens, now)
        self._count[worker] = self._count.get(worker, 0) + 1
        self._tokens[worker] = self._tokens.get(worker, 0) + prompt_tokens

    def finish(self, request_id: str) -> bool:
        """Mark a request done. Idempotent: returns False if it was not in flight."""
        r = self._reqs.pop(request_id, None)
        if r is None:
            return False
        self._release(r)
        return True

    def set_tokens(self, request_id: str, tokens: int) -> bool:
        """Change a request's token weight (e.g. its prefill is done and only
        decode work is left). Returns False if it is not in flight."""
        r = self._reqs.get(request_id)
        if r is None:
            return False
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
        self._tokens[r.worker] += tokens - r.prompt_tokens
        r.prompt_tokens = tokens
        return True

    def _release(self, r: _InFlight) -> None:
        c = self._count[r.worker] - 1
        if c:
            self._count[r.worker] = c
            self._tokens[r.worker] -= r.prompt_tokens
        else:  # keep snapshots small: idle workers are simply absent
            del self._count[r.worker]
            del self._tokens[r.worker]

    def worker_of(self, request_id: str) -> str | None:
        r = self._reqs.get(request_id)
        return None if r is None else r.worker

    def in_flight(self, worker: str) -> int:
        return self._count.get(worker, 0)

    def in_flight_tokens(self, worker: str) -> int:
        return self._tokens.get(worker, 0)

    def total(self) -> int:
        return len(self._reqs)

    def snapshot(self) -> dict[str, float]:
        """In-flight requests per worker (workers with none are absent)."""
        return {w: float(c) for w, c in self._count.items()}

    def snapshot_tokens(self) -> dict[str, float]:
        """In-flight prompt tokens per worker (workers with none are absent)."""
        return {w: float(t) for w, t in self._tokens.items()}

    def drop_worker(self, worker: str) -> list[str]:
        """Forget every in-flight request on ``worker`` (engine removed)."""
        gone = [rid for rid, r in self._reqs.items() if r.worker == worker]
        for rid in gone:
            self._release(self._reqs.pop(rid))
        return gone

    def expire(self, now: float, max_age: float) -> list[str]:
        """Drop requests started more than ``max_age`` ago: a leak guard for
        requests whose finish was never reported. Returns their ids."""
        cutoff = now - max_age
        old = [rid for rid, r in self._reqs.items() if r.started < cutoff]
        for rid in old:
            r = self._reqs.pop(rid)
            self._release(r)
            log.warning("load.request_expired", request_id=rid, worker=r.worker, age=now - r.started)
        return old


def _check_counts(node_id: str, counts: Mapping[str, float], what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for w, v in counts.items():
        if not isinstance(w, str):
            raise ValueError(f"slot {node_id!r}: {what} key must be a worker str, got {w!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"slot {node_id!r}: {what} for {w!r} must be a finite number >= 0, got {v!r}")
        if v:
            out[w] = float(v)
    return out


class LoadView:
    """The load policies see: local tracker + remote nodes' slots, summed."""

    __slots__ = ("_remote", "_remote_tokens", "local")

    def __init__(self, local: LoadTracker | None = None) -> None:
        self.local = local if local is not None else LoadTracker()
        self._remote: dict[str, dict[str, float]] = {}
        self._remote_tokens: dict[str, dict[str, float]] = {}

    def set_remote_slot(
        self, node_id: str, counts: Mapping[str, float], tokens: Mapping[str, float] | None = None
    ) -> None:
        """Replace a remote node's slot. Validated first, so bad input changes nothing."""
        c = _check_counts(node_id, counts, "request count")
        t = _check_counts(node_id, tokens, "token count") if tokens is not None else {}
        self._remote[node_id] = c
        self._remote_tokens[node_id] = t

    def drop_remote_slot(self, node_id: str) -> bool:
        self._remote_tokens.pop(node_id, None)
        return self._remote.pop(node_id, None) is not None

    def remote_nodes(self) -> list[str]:
        return list(self._remote)

    def load(self, worker: str) -> float:
        """In-flight requests on ``worker`` counted by every live node."""
        v = float(self.local.in_flight(worker))
        for slot in self._remote.values():
            v += slot.get(worker, 0.0)
        return v

    def tokens(self, worker: str) -> float:
        v = float(self.local.in_flight_tokens(worker))
        for slot in self._remote_tokens.values():
            v += slot.get(worker, 0.0)
        return v

    def snapshot(self) -> dict[str, float]:
        out = self.local.snapshot()
        for slot in self._remote.values():
            for w, v in slot.items():
                out[w] = out.get(w, 0.0) + v
        return out

    def snapshot_tokens(self) -> dict[str, float]:
        out = self.local.snapshot_tokens()
        for slot in self._remote_tokens.values():
            for w, v in slot.items():
                out[w] = out.get(w, 0.0) + v
        return out
