"""What one node's mesh core measures about itself (read by ``stats()`` and
the node's metrics): event and traffic counters, and the convergence lag of
the peers' copies of the engine logs this node writes.

Two small measurement classes share the file: both only record what the core
tells them and are read by the same consumers; neither decides anything.

Convergence lag, concretely: the owner of an engine is the only writer of
its log document, and yrs numbers every item a writer integrates (the
document's *clock*). Before appending, the owner notes ``(clock, now)`` (at
most one mark per ``resolution`` seconds). Every anti-entropy summary a peer
sends (``SyncRequest``, ``SyncReply``) carries, per engine, the epoch and the
state vector of its copy, so the owner learns the peer's clock for its
document: the peer holds every item up to it. The peer's lag for that engine
is ``now - (time of the first write the peer lacks)``, 0 when it holds
everything; a peer still on an older epoch (a compaction or takeover has not
reached it) lags since the epoch began, and a peer without the log at all
since the owner started writing it. The value per peer is the largest lag
over this node's engines in its last summary. One clock (the owner's) takes
both readings, so no clock synchronisation between nodes is needed; the
summary's transit time is included (it is an upper bound, finer than the
mark resolution otherwise). No wire change: the state vectors are already in
the summaries. Pure: time is an argument.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mesh.engine_log.epoch import Epoch

__all__ = ["ConvergenceLag", "Counters", "decode_state_vector"]


class Counters:
    """Named integer counters; message counts and bytes by direction and kind."""

    def __init__(self) -> None:
        self._c: dict[str, int] = {}

    def bump(self, key: str, n: int = 1) -> None:
        self._c[key] = self._c.get(key, 0) + n

    def message(self, direction: str, kind: str, nbytes: int) -> None:
        """One message ``sent`` or ``recv`` of ``kind``; bytes when known (> 0)."""
        k = f"{direction}.{kind}"
        self.bump(k + ".msgs")
        if nbytes:
            self.bump(k + ".bytes", nbytes)

    def get(self, key: str) -> int:
        return self._c.get(key, 0)

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self._c.items()))


def decode_state_vector(sv: bytes) -> dict[int, int]:
    """A yrs (Yjs) v1 state vector: a varuint count, then that many
    ``(client id, clock)`` varuint pairs. ValueError if malformed."""
    pos = 0

    def varuint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(sv) or shift > 63:
                raise ValueError("truncated or oversized varuint in a state vector")
            b = sv[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    out: dict[int, int] = {}
    for _ in range(varuint()):
        client = varuint()
        out[client] = varuint()
    if pos != len(sv):
        raise ValueError("trailing bytes after a state vector")
    return out


@dataclass
class _OwnedLog:
    epoch: Epoch
    started: float  # when this node started writing the epoch
    clocks: list[int] = field(default_factory=list)  # document clock before a write, increasing
    times: list[float] = field(default_factory=list)  # when that write happened
    trimmed: bool = False  # marks older than the first were dropped


class ConvergenceLag:
    """Per peer, how far behind its copies of this node's engine logs were
    at its last summary, in seconds (see the module docstring)."""

    def __init__(self, resolution: float = 0.01, keep: int = 4096) -> None:
        self.resolution = resolution
        self.keep = keep  # marks per engine (older ones are dropped; the lag is then a lower bound)
        self._logs: dict[str, _OwnedLog] = {}
        self.by_peer: dict[str, tuple[float, float]] = {}  # peer -> (lag seconds, measured at)

    def __bool__(self) -> bool:
        return bool(self._logs)

    def started(self, engine_id: str, epoch: Epoch, now: float) -> None:
        """This node began writing ``epoch`` of ``engine_id`` (takeover or compaction)."""
        self._logs[engine_id] = _OwnedLog(epoch, now)

    def stopped(self, engine_id: str) -> None:
        """This node no longer writes ``engine_id``'s log. Writing none, it
        has no lag to report: the last one measured would stay on show."""
        self._logs.pop(engine_id, None)
        if not self._logs:
            self.by_peer.clear()

    def appending(self, engine_id: str, clock: Callable[[], int], now: float) -> None:
        """A write to ``engine_id``'s log is about to happen; ``clock()``
        reads the document's clock (asked at most once per resolution)."""
        log = self._logs.get(engine_id)
        if log is None or (log.times and now - log.times[-1] < self.resolution):
            return
        log.clocks.append(clock())
        log.times.append(now)
        if len(log.clocks) > 2 * self.keep:
            del log.clocks[: self.keep], log.times[: self.keep]
            log.trimmed = True

    def observe(
        self,
        peer: str,
        engines: Iterable[tuple[str, Epoch, bytes]],
        current_clock: Callable[[str], int],
        now: float,
    ) -> float | None:
        """A summary from ``peer``: ``(engine id, epoch, state vector)`` per
        engine it knows; ``current_clock(engine_id)`` is this node's
        document clock now. Returns (and keeps) the peer's largest lag, or
        None when this node writes no log."""
        if not self._logs:
            return None
        seen: dict[str, tuple[Epoch, bytes]] = {}
        for engine_id, epoch, sv in engines:
            if engine_id in self._logs:
                seen[engine_id] = (epoch, sv)
        worst = 0.0
        for engine_id, log in self._logs.items():
            worst = max(worst, self._lag(engine_id, log, seen.get(engine_id), current_clock, now))
        self.by_peer[peer] = (worst, now)
        return worst

    @staticmethod
    def _lag(
        engine_id: str,
        log: _OwnedLog,
        theirs: tuple[Epoch, bytes] | None,
        current_clock: Callable[[str], int],
        now: float,
    ) -> float:
        if theirs is None or theirs[0] < log.epoch:
            return now - log.started
        epoch, sv = theirs
        if epoch > log.epoch:
            return 0.0  # they know a newer writer: this node is fenced, not ahead
        try:
            held = decode_state_vector(sv).get(epoch.doc, 0)
        except ValueError:
            return 0.0  # a garbled summary measures nothing
        if held >= current_clock(engine_id):
            return 0.0
        i = bisect_right(log.clocks, held) - 1
        if i < 0:
            return now - (log.times[0] if log.trimmed and log.times else log.started)
        return now - log.times[i]

    def forget(self, peer: str) -> None:
        """``peer`` left or died."""
        self.by_peer.pop(peer, None)
