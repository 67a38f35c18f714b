"""When a client dials its target again, and which channel a new call takes.

gRPC asks DNS again only when a connection fails: a channel to a healthy
fleet never learns of a node added behind the name. So every ``interval``
seconds the client dials a *candidate* channel (a fresh resolution of the
name, connections to every address). New calls keep the current channel
until the candidate is connected, then move to it; the old channel is
retired and closed once its last call has ended, so no call is cut. A
candidate that does not connect within an interval (the name does not
resolve right now) is dropped and dialed again; the current channel keeps
serving meanwhile, unless it is not connected either.

Pure: the clock, the dialer and the channels' readiness are passed in;
what to close is returned for the caller to close (sync or asyncio).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Redial"]

C = TypeVar("C")


class Redial(Generic[C]):
    """Lease a channel per call (:meth:`lease`), give it back when the call ends (:meth:`release`)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval  # 0: dial once
        self._current: C | None = None
        self._born = 0.0
        self._candidate: C | None = None
        self._candidate_born = 0.0
        self._calls: dict[int, int] = {}  # id(channel) -> calls in flight on it
        self._retired: dict[int, C] = {}  # retired channels with calls still in flight
        self.dials = 0  # channels dialed so far (for tests and logs)

    def _dial(self, dial: Callable[[], C]) -> C:
        ch = dial()
        self.dials += 1
        self._calls[id(ch)] = 0
        return ch

    def _retire(self, ch: C, closing: list[C]) -> None:
        if self._calls.get(id(ch), 0) == 0:
            self._calls.pop(id(ch), None)
            closing.append(ch)
        else:
            self._retired[id(ch)] = ch

    def lease(self, now: float, dial: Callable[[], C], ready: Callable[[C], bool]) -> tuple[C, list[C]]:
        """The channel for a new call, and channels to close now."""
        closing: list[C] = []
        if self._current is None:
            self._current, self._born = self._dial(dial), now
        elif self.interval > 0 and now - self._born >= self.interval:
            if self._candidate is None:
                self._candidate, self._candidate_born = self._dial(dial), now
            elif ready(self._candidate) or not ready(self._current):
                self._retire(self._current, closing)
                self._current, self._born = self._candidate, now
                self._candidate = None
            elif now - self._candidate_born >= self.interval:
                self._retire(self._candidate, closing)
                self._candidate = None
        ch = self._current
        self._calls[id(ch)] = self._calls.get(id(ch), 0) + 1
        return ch, closing

    def release(self, ch: C) -> list[C]:
        """A call on ``ch`` ended: channels to close now."""
        key = id(ch)
        left = self._calls.get(key, 0) - 1
        if key in self._calls:
            self._calls[key] = max(left, 0)
        if left <= 0 and key in self._retired:
            del self._retired[key]
            self._calls.pop(key, None)
            return [ch]
        return []

    def close_all(self) -> list[C]:
        """Every channel, for the client's close (calls still in flight are cancelled)."""
        out = [c for c in (self._current, self._candidate) if c is not None]
        out += list(self._retired.values())
        self._current = self._candidate = None
        self._retired.clear()
        self._calls.clear()
        return out
