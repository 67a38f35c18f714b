"""Deterministic discrete-event network simulator for pure protocol state machines.

The mesh protocols are sans-I/O (``tick(now)`` / ``handle(msg, now)`` return
messages addressed by ``dst``), so a whole cluster can run inside one Python
process against a *virtual* clock. :class:`SimNet` keeps a heap of timed events
(message deliveries, node ticks, crashes, restarts, scripted calls) and
processes them in time order; ties are broken by insertion order. Every random
choice comes from one seeded ``random.Random``, and each node gets its own RNG
derived from the seed, its address and its restart count, so a run is fully
reproducible from its seed: rerun a failing seed and you get the same trace.

Faults it models, all switchable while running (e.g. a quiet period at the end):

* **Delay**: each message takes ``delay(rng)`` seconds (default uniform
  ``[delay_min, delay_max]``); independent delays reorder messages naturally,
  and ``reorder_prob`` adds ``reorder_extra`` seconds to some messages to
  reorder harder.
* **Loss** (``loss_prob``) globally and per directed link (:meth:`set_link_loss`),
  **duplication** (``dup_prob``: a second copy with its own delay).
* **Partitions**: groups of addresses that cannot reach each other between a
  start and a heal time (checked when a message is sent and when it arrives,
  so messages in flight across a new partition are lost too).
* **Crash** (the state machine is dropped; messages to it are lost) and
  **restart** (a fresh state machine from the node's factory, same address).

And the receiver's own time: with ``process_cost`` > 0 a node takes that many
seconds of CPU to handle each message, one at a time, as a real node's event
loop does. A message that arrives while its node is busy waits its turn
(first come, first served), and what the node sends in reply leaves when it
has finished handling it. Ticks are not charged (a real node's timers cost
CPU too; a cost measured as CPU per message on a real node includes them).

Nodes are generic: anything with ``tick(now)`` and ``handle(msg, now)`` that
return iterables of messages with a ``dst`` attribute (:class:`SimNode`). A
node factory builds a node and returns the messages it sends at start (e.g. a
membership join). ``handle`` may raise; the simulator counts the error and
keeps going, as a real node would.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["NetConfig", "NodeFactory", "SimNet", "SimNode", "SimStats"]


class SimNode(Protocol):
    def tick(self, now: float) -> Iterable[Any]: ...

    def handle(self, msg: Any, now: float) -> Iterable[Any]: ...


N = TypeVar("N", bound=SimNode)

# factory(addr, now, rng) -> (node, messages to send at start)
NodeFactory = Callable[[str, float, random.Random], "tuple[N, Iterable[Any]]"]


@dataclass(slots=True)
class NetConfig:
    delay_min: float = 0.001
    delay_max: float = 0.010
    delay: Callable[[random.Random], float] | None = None  # overrides the uniform delay
    loss_prob: float = 0.0
    dup_prob: float = 0.0
    reorder_prob: float = 0.0
    reorder_extra: float = 0.05
    tick_interval: float = 0.1
    tick_jitter: float = 0.1  # each tick interval is scaled by 1 + U(-jitter, jitter)
    process_cost: float = 0.0  # receiver CPU seconds per message handled (0: instant)

    def validate(self) -> None:
        for name in ("loss_prob", "dup_prob", "reorder_prob", "tick_jitter"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0 <= self.delay_min <= self.delay_max:
            raise ValueError(f"need 0 <= delay_min <= delay_max, got {self.delay_min}, {self.delay_max}")
        if self.tick_interval <= 0 or self.reorder_extra < 0:
            raise ValueError("tick_interval must be > 0 and reorder_extra >= 0")
        if self.process_cost < 0:
            raise ValueError(f"process_cost must be >= 0, got {self.process_cost}")


@dataclass(slots=True)
class SimStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0  # random loss and per-link loss
    partitioned: int = 0
    to_down_node: int = 0
    duplicated: int = 0
    ticks: int = 0
    handler_errors: int = 0
    queued: int = 0  # messages that waited for their node to finish an earlier one
    max_backlog_s: float = 0.0  # the longest such wait


# Event kinds (small ints keep heap tuples cheap to compare).
_DELIVER, _TICK, _START, _CRASH, _CALL, _HANDLED = range(6)


class SimNet(Generic[N]):
    """A seeded, virtual-time network hosting pure node state machines."""

    def __init__(self, seed: int, config: NetConfig | None = None) -> None:
        self.seed = seed
        self.config = config or NetConfig()
        self.config.validate()
        self.rng = random.Random(seed)
        self.now = 0.0
        self.stats = SimStats()
        self.last_error: BaseException | None = None
        self._heap: list[tuple[float, int, int, Any, Any]] = []
        self._counter = 0
        self._nodes: dict[str, N] = {}
        self._factories: dict[str, NodeFactory[N]] = {}
        self._epoch: dict[str, int] = {}  # bumped on crash/restart; stale ticks are skipped
        self._link_loss: dict[tuple[str, str], float] = {}
        self._partitions: list[tuple[float, float, dict[str, int]]] = []
        self._busy_until: dict[str, float] = {}  # with process_cost: when each node is free again

    # --- setup and scripting ---------------------------------------------------------------

    def _push(self, t: float, kind: int, a: Any, b: Any = None) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (t, self._counter, kind, a, b))

    def add_node(self, addr: str, factory: NodeFactory[N], at: float = 0.0) -> None:
        """Register ``addr`` and start it at time ``at`` (restart uses the same factory)."""
        if addr in self._factories:
            raise ValueError(f"node {addr!r} already added")
        self._factories[addr] = factory
        self._epoch[addr] = 0
        self._push(max(at, self.now), _START, addr)

    def crash(self, addr: str, at: float) -> None:
        self._known(addr)
        self._push(max(at, self.now), _CRASH, addr)

    def restart(self, addr: str, at: float) -> None:
        """Start a fresh state machine at ``addr`` (a crash first if it is up)."""
        self._known(addr)
        self._push(max(at, self.now), _START, addr)

    def at(self, t: float, fn: Callable[[SimNet[N]], None]) -> None:
        """Run ``fn(sim)`` at virtual time ``t`` (scenario scripting, checks)."""
        self._push(max(t, self.now), _CALL, None, fn)

    def call_node(self, addr: str, t: float, fn: Callable[[N, float], Iterable[Any]]) -> None:
        """At time ``t``, run ``fn(node, now)`` on ``addr`` if it is up and send its messages."""
        self._known(addr)

        def run(sim: SimNet[N]) -> None:
            node = sim._nodes.get(addr)
            if node is not None:
                sim._send_all(addr, fn(node, sim.now))

        self.at(t, run)

    def partition(self, groups: Iterable[Iterable[str]], start: float, heal: float) -> None:
        """Between ``start`` and ``heal``, nodes in different groups cannot talk.

        Addresses in no group can reach everybody.
        """
        if heal < start:
            raise ValueError(f"heal ({heal}) before start ({start})")
        side: dict[str, int] = {}
        for i, g in enumerate(groups):
            for a in g:
                side[a] = i
        self._partitions.append((start, heal, side))

    def set_link_loss(self, src: str, dst: str, prob: float) -> None:
        """Extra loss on the directed link ``src -> dst`` (0 removes it)."""
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"loss probability must be in [0, 1], got {prob}")
        if prob == 0.0:
            self._link_loss.pop((src, dst), None)
        else:
            self._link_loss[(src, dst)] = prob

    def _known(self, addr: str) -> None:
        if addr not in self._factories:
            raise KeyError(f"unknown node {addr!r}")

    # --- queries ---------------------------------------------------------------------------

    def node(self, addr: str) -> N | None:
        return self._nodes.get(addr)

    def is_up(self, addr: str) -> bool:
        return addr in self._nodes

    def up_nodes(self) -> dict[str, N]:
        return dict(self._nodes)

    def addrs(self) -> list[str]:
        return list(self._factories)

    def can_reach(self, src: str, dst: str, t: float | None = None) -> bool:
        t = self.now if t is None else t
        for start, heal, side in self._partitions:
            if start <= t < heal:
                a, b = side.get(src), side.get(dst)
                if a is not None and b is not None and a != b:
                    return False
        return True

    # --- running ---------------------------------------------------------------------------

    def run_until(self, t_end: float) -> None:
        """Process every event with time <= ``t_end``; the clock ends at ``t_end``."""
        heap = self._heap
        pop = heapq.heappop
        while heap and heap[0][0] <= t_end:
            t, _, kind, a, b = pop(heap)
            self.now = t
            if kind == _DELIVER:
                self._deliver(a, b[0], b[1], t)
            elif kind == _TICK:
                self._tick(a, b, t)
            elif kind == _CALL:
                b(self)
            elif kind == _HANDLED:
                self._handle(a, b[0], b[1], b[2], t)
            elif kind == _START:
                self._start(a)
            elif kind == _CRASH and self._nodes.pop(a, None) is not None:
                self._epoch[a] += 1
                self._busy_until.pop(a, None)
        self.now = max(self.now, t_end)

    def _deliver(self, dst: str, src: str, msg: Any, t: float) -> None:
        stats = self.stats
        node = self._nodes.get(dst)
        if node is None:
            stats.to_down_node += 1
            return
        if self._partitions and not self.can_reach(src, dst, t):
            stats.partitioned += 1
            return
        cost = self.config.process_cost
        if cost > 0:
            # The node's event loop takes messages one at a time, in arrival order.
            start = max(t, self._busy_until.get(dst, t))
            if start > t:
                stats.queued += 1
                stats.max_backlog_s = max(stats.max_backlog_s, start - t)
            self._busy_until[dst] = start + cost
            self._push(start + cost, _HANDLED, dst, (src, msg, self._epoch[dst]))
            return
        self._handle(dst, src, msg, self._epoch[dst], t)

    def _handle(self, dst: str, src: str, msg: Any, epoch: int, t: float) -> None:
        """``dst`` handles ``msg`` at ``t`` (if it is still the life it arrived at)."""
        node = self._nodes.get(dst)
        if node is None or self._epoch[dst] != epoch:
            self.stats.to_down_node += 1
            return
        self.stats.delivered += 1
        try:
            out = node.handle(msg, t)
        except Exception as exc:  # a real node logs bad input and keeps running
            self.stats.handler_errors += 1
            self.last_error = exc
            return
        if out:
            self._send_all(dst, out)

    def _tick(self, addr: str, epoch: int, t: float) -> None:
        node = self._nodes.get(addr)
        if node is None or self._epoch[addr] != epoch:
            return  # scheduled for an earlier life of the node (crashed or restarted since)
        self.stats.ticks += 1
        out = node.tick(t)
        if out:
            self._send_all(addr, out)
        self._schedule_tick(addr, epoch)

    def _start(self, addr: str) -> None:
        self._nodes.pop(addr, None)
        self._busy_until.pop(addr, None)
        self._epoch[addr] += 1
        epoch = self._epoch[addr]
        node_rng = random.Random(f"{self.seed}/{addr}/{epoch}")
        node, initial = self._factories[addr](addr, self.now, node_rng)
        self._nodes[addr] = node
        self._send_all(addr, initial)
        # First tick at a random phase so nodes do not tick in lockstep.
        self._push(self.now + self.rng.random() * self.config.tick_interval, _TICK, addr, epoch)

    def _schedule_tick(self, addr: str, epoch: int) -> None:
        cfg = self.config
        jitter = cfg.tick_jitter
        dt = cfg.tick_interval
        if jitter:
            dt *= 1.0 + (self.rng.random() * 2.0 - 1.0) * jitter
        self._push(self.now + dt, _TICK, addr, epoch)

    def _send_all(self, src: str, msgs: Iterable[Any]) -> None:
        cfg = self.config
        rng = self.rng
        stats = self.stats
        now = self.now
        for msg in msgs:
            stats.sent += 1
            dst = msg.dst
            if self._partitions and not self.can_reach(src, dst, now):
                stats.partitioned += 1
                continue
            if cfg.loss_prob and rng.random() < cfg.loss_prob:
                stats.lost += 1
                continue
            if self._link_loss:
                p = self._link_loss.get((src, dst))
                if p and rng.random() < p:
                    stats.lost += 1
                    continue
            copies = 1
            if cfg.dup_prob and rng.random() < cfg.dup_prob:
                copies = 2
                stats.duplicated += 1
            for _ in range(copies):
                if cfg.delay is not None:
                    d = cfg.delay(rng)
                else:
                    d = cfg.delay_min + (cfg.delay_max - cfg.delay_min) * rng.random()
                if cfg.reorder_prob and rng.random() < cfg.reorder_prob:
                    d += cfg.reorder_extra * rng.random()
                self._counter += 1
                heapq.heappush(self._heap, (now + d, self._counter, _DELIVER, dst, (src, msg)))
