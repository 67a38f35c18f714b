"""Per-worker sequence tracking for a KV-event stream (pure, no I/O).

An engine's publisher numbers its batches 0, 1, 2, ... (per process, per
data-parallel rank). The subscriber must apply each exactly once, in order.
What can happen on the wire, and what the sequencer says:

- ``seq == last + 1``: the next batch -> ``APPLY``.
- ``seq > last + 1``: batches were lost (PUB drops past its high-water mark,
  the SUB joined late, a reconnect) -> ``GAP(last + 1, seq - 1)``: fetch them
  from the replay socket, then look at this batch again.
- first message with no known position (``last is None``): ``seq == 0`` is the
  start of the stream, anything else is a ``GAP`` from 0 (the ZMQ slow-joiner
  window, or an engine that was already running).
- replayed batch with ``seq <= last``: the replay overlaps what was already
  applied -> ``DUPLICATE``. A replayed batch above ``last + 1`` means the
  replay buffer no longer holds the missing ones -> ``GAP`` (the caller cannot
  fill it and must reset the worker).
- live batch with ``seq <= last``: SUB never redelivers, so this is either the
  live copy of a batch we just got through replay (same payload -> it is in
  the replayed set with the same digest -> ``DUPLICATE``) or a new publisher
  process whose count restarted (``RESTART``: reset the worker, start over).
  Comparing payload digests instead of guessing from how far the number
  dropped also catches a restart of an engine that had published only a few
  batches.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass


class Verdict(enum.Enum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    GAP = "gap"
    RESTART = "restart"


@dataclass(frozen=True, slots=True)
class SeqCheck:
    verdict: Verdict
    gap_from: int = -1  # first missing seq (GAP only)
    gap_to: int = -1  # last missing seq (GAP only)


_APPLY = SeqCheck(Verdict.APPLY)
_DUPLICATE = SeqCheck(Verdict.DUPLICATE)
_RESTART = SeqCheck(Verdict.RESTART)


class Sequencer:
    """Tracks the last applied sequence number of one worker's stream."""

    def __init__(self, last_applied: int | None = None, max_tracked: int = 20_000) -> None:
        if last_applied is not None and last_applied < -1:
            raise ValueError(f"last_applied must be >= -1 or None, got {last_applied}")
        # -1 is "nothing applied yet, next is 0" (a known position); None is unknown.
        self.last: int | None = last_applied
        self._max_tracked = max_tracked
        # Digests of batches obtained through replay that live copies may still
        # follow; emptied as soon as the live stream passes them.
        self._replayed: OrderedDict[int, int] = OrderedDict()
        self._replayed_high = -1

    @property
    def expected(self) -> int | None:
        """The next sequence number to apply, or None before the first message."""
        return None if self.last is None else self.last + 1

    def check_live(self, seq: int, digest: int) -> SeqCheck:
        """What to do with a batch received on the SUB socket."""
        last = self.last
        if last is None:
            return _APPLY if seq == 0 else SeqCheck(Verdict.GAP, 0, seq - 1)
        if seq == last + 1:
            return _APPLY
        if seq > last + 1:
            return SeqCheck(Verdict.GAP, last + 1, seq - 1)
        if self._replayed.get(seq) == digest:
            return _DUPLICATE
        return _RESTART

    def check_replayed(self, seq: int) -> SeqCheck:
        """What to do with a batch received from the replay socket."""
        last = self.last
        if last is None:
            # Catching up with no known position: take whatever the buffer
            # starts with (the caller decides whether that lost history).
            return _APPLY if seq == 0 else SeqCheck(Verdict.GAP, 0, seq - 1)
        if seq <= last:
            return _DUPLICATE
        if seq == last + 1:
            return _APPLY
        return SeqCheck(Verdict.GAP, last + 1, seq - 1)

    def applied(self, seq: int, digest: int | None = None, replayed: bool = False) -> None:
        """Record that ``seq`` was applied (or consumed, e.g. undecodable)."""
        self.last = seq
        if replayed:
            if digest is not None:
                self._replayed[seq] = digest
                if len(self._replayed) > self._max_tracked:
                    self._replayed.popitem(last=False)
            self._replayed_high = max(self._replayed_high, seq)
        elif seq > self._replayed_high and self._replayed:
            # SUB delivers in order: no live copy of a replayed batch can follow.
            self._replayed.clear()

    def skip_to(self, last: int) -> None:
        """Jump past batches that cannot be had (after a reset of the worker)."""
        self.last = last

    def reset(self, last_applied: int | None = None) -> None:
        """Start over (a new publisher process, or an explicit resync)."""
        self.last = last_applied
        self._replayed.clear()
        self._replayed_high = -1
