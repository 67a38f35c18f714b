"""Admission: which Generate requests a node takes on, and which it sheds at once.

A node that takes on every request it is sent lets queues grow without
bound: in its own event loop, in gRPC's pending-call queue, in the engines'
waiting queues. Every request then waits longer than its client will, and
the fleet spends its time on requests that are abandoned. Admission keeps
the wait of the requests a node takes bounded, and answers the rest with
RESOURCE_EXHAUSTED within milliseconds, before any engine work.

The bound is on the time until the fleet *starts* a request (its first
token), estimated from what this node sees:

    wait = (requests not yet started + 1) / start rate

where "not yet started" counts this node's requests on engines without a
first token and those queued here, and the start rate is the first tokens
per second over the last ``rate_window`` seconds (over the time since the
oldest of them, while the window is not yet full). While fewer than
``min_starts`` requests started in the window (an idle fleet, one warming
up, or one that is stuck), a rate says little: the wait is then the age of
the oldest request not yet started, and it sheds only with ``min_starts``
or more requests waiting (a fleet that is stuck; not one request stuck on a
hung engine while the others start at once). A request whose estimated wait exceeds
``max_queue_wait`` is shed, once the fleet is seen falling behind: the
oldest request not yet started has waited ``backlog_age`` or more.
Otherwise it goes to an engine if this node has fewer than
``max_in_flight`` requests there, or waits here in FIFO order (at most
``max_queue`` of them, each for at most ``max_queue_wait``).

The estimate needs no knowledge of the engines' capacity: when the engines
fall behind, requests pile up unstarted while the start rate stays at what
the fleet can do, so the estimate rises until shedding holds it at the
bound. But a start rate measured while the fleet kept up is the rate of
demand, not of capacity: a burst after a quiet spell would look like
overload. Hence the second condition (as CoDel drops on a standing queue,
never on a burst): requests that the fleet starts within ``backlog_age``
prove it is keeping up, whatever the rate says.

That grace alone would take a whole burst: at k times the fleet's capacity,
``backlog_age`` x the arrival rate requests arrive before the oldest has
waited long enough, and the last of them waits that many requests' worth of
starts, many times ``max_queue_wait``. So the node also keeps the fleet's
*capacity*: its start rate over the latest backlog. A backlog is a queue
(``min_starts`` or more requests waiting, not one slow prompt) seen by offers
no more than ``backlog_age`` apart, with the oldest behind or half a bound's
worth waiting at the capacity so far; its rate is taken once it has lasted
``max_queue_wait`` (or ``rate_window``, if shorter) with ``min_starts``
starts, then over each next ``rate_window``. While a queue stands the fleet
starts requests as fast as it can, so that rate is its capacity, not the
demand; the first starts after an idle spell (free batch slots filling)
come before the queue and do not count. With a queue of ``min_starts`` or
more, a request that would wait past ``max_queue_wait`` even at that
capacity is shed at once, grace or not. The capacity only bounds a surge:

- before the first backlog, and ``capacity_ttl`` after the last, there is
  none, and the grace decides alone;
- a fleet that starts more than it (over the last ``max_queue_wait``: a
  capacity measured low, a fleet that grew, requests that got shorter)
  lifts it to that rate at once;
- a fleet that shrank keeps the old figure until its next backlog measures
  it again: this rule then sheds later than it could, never earlier.

:class:`Admission` is pure (time is an argument); :class:`AdmissionGate` runs
it for asyncio callers.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass

from router.errors import Overloaded

__all__ = ["ADMIT", "QUEUE", "Admission", "AdmissionConfig", "AdmissionGate", "Shed", "Verdict"]


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    max_in_flight: int = 1024  # requests this node has on engines at once
    max_queue: int = 4096  # requests waiting on this node for a slot
    # Seconds: the longest estimated wait until the fleet starts a request,
    # which every accepted request adds to its TTFT under overload. A longer
    # bound serves no more (the fleet starts requests at its own rate), it
    # only makes each wait longer; clients that prefer waiting to retrying
    # (batch jobs) raise it.
    max_queue_wait: float = 2.0
    rate_window: float = 5.0  # seconds over which the start rate is measured
    min_starts: int = 10  # first tokens in the window before the rate is trusted
    # Seconds the oldest request not yet started must have waited before a
    # rate estimate may shed: below it the fleet is keeping up (a burst, not
    # overload). Above the prefill time of a long prompt, well below
    # max_queue_wait (under overload the oldest waits about max_queue_wait;
    # a shorter max_queue_wait caps it).
    backlog_age: float = 0.5
    # Seconds the fleet's capacity (measured over a backlog) still bounds a
    # surge after the last backlog: long enough to span the quiet between
    # waves of load, short enough that a fleet whose requests got shorter
    # (more of them a second) is not held to an old figure.
    capacity_ttl: float = 30.0

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.max_queue < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queue >= 0")
        if not self.max_queue_wait > 0 or not self.rate_window > 0 or self.min_starts < 1:
            raise ValueError("max_queue_wait and rate_window must be > 0, min_starts >= 1")
        if not self.backlog_age >= 0 or not self.capacity_ttl >= 0:
            raise ValueError("backlog_age and capacity_ttl must be >= 0")


ADMIT = "admit"
QUEUE = "queue"


@dataclass(frozen=True, slots=True)
class Shed:
    why: str


Verdict = str | Shed  # ADMIT, QUEUE or Shed


class Admission:
    """The admission state of one node (see the module docstring)."""

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        self.in_flight = 0
        self._unstarted: OrderedDict[Hashable, float] = OrderedDict()  # on engines, no first token
        self._queued: OrderedDict[Hashable, float] = OrderedDict()  # waiting here
        self._starts: deque[float] = deque()  # first-token times within the window
        self.shed_total = 0
        # First tokens per second the fleet managed over the latest backlog
        # (0: none, or none within capacity_ttl); see the module docstring.
        self.capacity = 0.0
        self._capacity_seen = 0.0  # when a backlog last stood
        self._started_total = 0
        self._backlog: tuple[float, int] | None = None  # (since, starts before it)
        self._last_offer = -math.inf

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def unstarted(self) -> int:
        """Admitted requests without a first token yet."""
        return len(self._unstarted)

    def start_rate(self, now: float) -> float:
        """First tokens per second over the last ``rate_window`` seconds (0
        until ``min_starts`` of them)."""
        cut = now - self.config.rate_window
        starts = self._starts
        while starts and starts[0] <= cut:
            starts.popleft()
        if len(starts) < self.config.min_starts:
            return 0.0
        span = max(now - starts[0], 1e-3)
        return len(starts) / span

    def estimated_wait(self, now: float) -> float:
        """Seconds until the fleet would start one more request."""
        waiting = len(self._unstarted) + len(self._queued)
        rate = self.start_rate(now)
        if rate > 0:
            return (waiting + 1) / rate
        return self.oldest_age(now)

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest request not yet started has waited (0: none)."""
        oldest = [t for t in (_first(self._unstarted), _first(self._queued)) if t is not None]
        return now - min(oldest) if oldest else 0.0

    def offer(self, key: Hashable, now: float) -> Verdict:
        """A new request: admit it, queue it (under ``key``), or shed it."""
        cfg = self.config
        waiting = len(self._unstarted) + len(self._queued)
        behind = self.oldest_age(now) >= min(cfg.backlog_age, cfg.max_queue_wait)
        # A queue, not one slow request: only then do starts pace the fleet.
        queue = waiting >= cfg.min_starts
        cap = self.capacity = self.capacity_at(now)
        # Half a bound's worth waiting keeps the fleet busy: still a backlog.
        busy = cap > 0 and (waiting + 1) / cap > cfg.max_queue_wait / 2
        self._measure(now, queue and (behind or busy))
        wait = self.estimated_wait(now)
        # Without a start rate the estimate is the oldest request's age, which
        # says the fleet is stuck only when a queue waits behind it: a few
        # requests stuck on one hung engine are not the fleet falling behind.
        trusted = queue or self.start_rate(now) > 0
        if wait > cfg.max_queue_wait and behind and trusted:
            return self._shed(
                f"estimated wait {wait:.1f} s for the fleet to start it > {cfg.max_queue_wait:g} s"
            )
        if queue and self._past_capacity(waiting, now):
            return self._shed(
                f"{waiting} requests not yet started; at the {self.capacity:.1f}/s the fleet "
                f"starts them when behind, one more would wait > {cfg.max_queue_wait:g} s"
            )
        if self.in_flight < cfg.max_in_flight and not self._queued:
            self._admit(key, now)
            return ADMIT
        if len(self._queued) >= cfg.max_queue:
            return self._shed(f"{self.in_flight} requests in flight and {len(self._queued)} queued here")
        self._queued[key] = now
        return QUEUE

    def _past_capacity(self, waiting: int, now: float) -> bool:
        """One more request would wait past the bound even at the fleet's
        capacity, or at the rate it started requests over the last
        ``max_queue_wait`` if that is higher (a capacity measured low, or
        before the fleet grew, is corrected by what the fleet does)."""
        cap = self.capacity
        bound = self.config.max_queue_wait
        if not cap or (waiting + 1) / cap <= bound:
            return False
        span = min(bound, self.config.rate_window)
        recent = (len(self._starts) - bisect.bisect_left(self._starts, now - span)) / span
        if recent > cap:
            self.capacity = cap = recent
        return (waiting + 1) / cap > bound

    def capacity_at(self, now: float) -> float:
        """The fleet's start rate over the latest backlog, if one stood within
        ``capacity_ttl`` (else 0: forgotten). Reads only (a metrics scrape
        calls it from another thread)."""
        if now - self._capacity_seen > self.config.capacity_ttl:
            return 0.0
        return self.capacity

    def _measure(self, now: float, backlog: bool) -> None:
        """Follow the backlog (a queue of requests waiting their turn), and
        take the fleet's start rate over it as its capacity once it is long
        enough. Only offers see the queue: one that comes more than
        ``backlog_age`` after the last cannot tell whether the queue stood in
        between, so the stretch starts afresh."""
        cfg = self.config
        last, self._last_offer = self._last_offer, now
        if not backlog:
            self._backlog = None
            return
        self._capacity_seen = now
        if self._backlog is None or now - last > cfg.backlog_age:
            self._backlog = (now, self._started_total)
            return
        since, before = self._backlog
        span = now - since
        n = self._started_total - before
        if span >= min(cfg.max_queue_wait, cfg.rate_window) and n >= cfg.min_starts:
            self.capacity = n / span
        if span >= cfg.rate_window:  # measure the next stretch afresh
            self._backlog = (now, self._started_total)

    def _shed(self, why: str) -> Shed:
        self.shed_total += 1
        return Shed(why)

    def _admit(self, key: Hashable, now: float) -> None:
        self.in_flight += 1
        self._unstarted[key] = now

    def started(self, key: Hashable, now: float) -> None:
        """The request's first token arrived."""
        if self._unstarted.pop(key, None) is not None:
            self._starts.append(now)
            self._started_total += 1

    def leave_queue(self, key: Hashable) -> bool:
        """A queued request gave up (its wait or its client's deadline ran out)."""
        return self._queued.pop(key, None) is not None

    def finished(self, key: Hashable, now: float) -> Hashable | None:
        """An admitted request is over (whatever its outcome); returns the
        queued request admitted in its place, if any."""
        self._unstarted.pop(key, None)
        self.in_flight = max(0, self.in_flight - 1)
        if self._queued and self.in_flight < self.config.max_in_flight:
            nxt, _ = self._queued.popitem(last=False)
            self._admit(nxt, now)
            return nxt
        return None


def _first(d: OrderedDict[Hashable, float]) -> float | None:
    return next(iter(d.values())) if d else None


class AdmissionGate:
    """:class:`Admission` for asyncio callers: ``await enter(key)`` returns once
    the request may go to an engine, or raises :class:`Overloaded`; call
    ``started`` at its first token and ``leave`` when it is over."""

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.admission = Admission(config)
        self._waiters: dict[Hashable, asyncio.Future[None]] = {}

    async def enter(self, key: Hashable) -> None:
        loop = asyncio.get_running_loop()
        verdict = self.admission.offer(key, loop.time())
        if verdict == ADMIT:
            return
        if isinstance(verdict, Shed):
            raise Overloaded(f"node overloaded: {verdict.why}")
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters[key] = fut
        try:
            await asyncio.wait_for(fut, self.admission.config.max_queue_wait)
        except TimeoutError:
            if self.admission.leave_queue(key):
                self.admission.shed_total += 1
                wait = self.admission.config.max_queue_wait
                raise Overloaded(f"node overloaded: no engine slot within {wait:g} s") from None
            return  # admitted as the wait ran out: go ahead
        except asyncio.CancelledError:
            if not self.admission.leave_queue(key) and fut.done():
                self.leave(key)  # admitted just as the client gave up: give the slot back
            raise
        finally:
            self._waiters.pop(key, None)

    @property
    def waiting(self) -> int:
        """Callers waiting in ``enter`` for a slot."""
        return len(self._waiters)

    def now(self) -> float:
        """The clock admission runs on (the event loop's)."""
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # read from another thread (a metrics scrape): the same clock
            return time.monotonic()

    def started(self, key: Hashable) -> None:
        self.admission.started(key, asyncio.get_running_loop().time())

    def leave(self, key: Hashable) -> None:
        nxt = self.admission.finished(key, asyncio.get_running_loop().time())
        if nxt is not None:
            fut = self._waiters.get(nxt)
            if fut is not None and not fut.done():
                fut.set_result(None)
            elif fut is None:  # its waiter is gone: free the slot again
                self.leave(nxt)
