"""The whole-mesh simulation world: MeshCore nodes + vLLM-like engines on SimNet (pure).

Each node (:class:`MeshNode`) is a real :class:`mesh.core.MeshCore` with its
own prefix index (``World.index_factory``: :class:`router.index.PrefixIndex`
unless the scenario picks the native index for some or all nodes, see
:func:`index_factory`); the engines it owns (per the core's
``StartOwning``/``StopOwning`` effects) are consumed by a :class:`Consumer`
(real Sequencer + BlockMapper restored from the takeover's mapping pairs) and
fed to ``core.engine_deltas``. Engines (:class:`ModelledEngine`, the real
PrefixCache) publish batches on a schedule; a batch reaches the consumers
that exist when it is published, in order (like a ZMQ SUB), unless the
scenario drops it (the consumer then replays the gap).

Two behaviours of a node's shells are modelled too, each off unless the
scenario sets it, so scenarios written before them keep their figures:

* ``World.probe_after``: an owner whose engine has sent no live batch for
  that long asks its replay buffer for anything newer, as
  ``EventAdapter`` does with ``replay_probe_after`` (``World.drop_next``
  loses an engine's next live batches, e.g. its last ones);
* ``World.dns``: what the seed name resolves to for a node at a time; nodes
  resolve it again every ``SEED_RETRY`` seconds while they have no peer and
  every ``SEED_REFRESH`` after, and hand it to ``MeshCore.add_seeds``, as
  ``router.mesh_shell.MeshShell.refresh_seeds`` does.

Used by ``tests/sim/test_mesh_sim.py``, ``tests/sim/test_mesh_merge_sim.py``,
``kvmesh bench convergence`` (faults, convergence property over many seeds)
and :func:`measure_convergence` (event -> every node's index latency).
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import structlog

from blocks.delta import KvDelta
from kvmesh.simulation.engine_model import MODEL, Consumer, ModelledEngine
from kvmesh.simulation.simnet import NetConfig, NodeFactory, SimNet
from kvmesh.stats import percentile
from mesh.core import MeshConfig, MeshCore
from mesh.effects import StartOwning, StopOwning
from mesh.engine_log.epoch import Epoch
from mesh.engine_log.packed import heads_of
from mesh.membership import MembershipConfig
from router.config import RouterConfig
from router.index import PrefixIndex
from router.native_index import NativeIndex, apply_change

LIVE_DELAY = 0.002  # engine -> owner; constant so batches arrive in order (ZMQ is ordered)
SEED_RETRY = RouterConfig().seed_resolve_retry  # a node's, while it has no peer
SEED_REFRESH = RouterConfig().seed_refresh_interval  # and once it has

# (node address, now) -> the addresses the seed name resolves to for it then
SeedView = Callable[[str, float], list[str]]
# node address -> a new prefix index for that node
IndexFactory = Callable[[str], "PrefixIndex | NativeIndex"]
INDEX_KINDS = ("python", "native", "mixed")


def _python_index(_addr: str) -> PrefixIndex | NativeIndex:
    return PrefixIndex()


def _native_index(_addr: str) -> PrefixIndex | NativeIndex:
    if NativeIndex is None:
        raise RuntimeError("the native module is not built (make native)")
    return NativeIndex()


def _mixed_index(addr: str) -> PrefixIndex | NativeIndex:
    # By the address's number (n0, n2, ... native; n1, n3, ... Python), so a
    # scenario's nodes split in halves whatever order they start in.
    digits = "".join(c for c in addr if c.isdigit())
    even = int(digits) % 2 == 0 if digits else len(addr) % 2 == 0
    return _native_index(addr) if even else _python_index(addr)


def index_factory(kind: str) -> IndexFactory:
    """The nodes' prefix index: ``python`` (``PrefixIndex``), ``native``
    (``NativeIndex``, RuntimeError at the first node when the module is not
    built) or ``mixed`` (native on even-numbered nodes, Python on the others:
    one mesh of both, as the wire allows)."""
    factories = {"python": _python_index, "native": _native_index, "mixed": _mixed_index}
    if kind not in factories:
        raise ValueError(f"unknown index kind {kind!r}; one of {', '.join(INDEX_KINDS)}")
    return factories[kind]


def quiet_logs() -> None:
    """The sim runs thousands of nodes' worth of events: log only errors."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


@dataclass
class Stint:
    """One node's ownership of one engine, from StartOwning to StopOwning."""

    node: str
    incarnation: int  # the sim's restart count of that node
    engine_id: str
    epoch: Epoch
    base: Epoch | None
    resume: int | None
    consumer: Consumer
    started: float
    others_len: dict[int, int] = field(default_factory=dict)  # id(other stint) -> its log length then
    stopped: float | None = None


class World:
    def __init__(self, seed: int, config: MeshConfig) -> None:
        self.seed = seed
        self.config = config
        self.rng = random.Random(f"world/{seed}")
        self.engines: dict[str, ModelledEngine] = {}
        self.stints: dict[str, list[Stint]] = {}
        self.left: set[str] = set()
        self.live_loss = 0.0
        self.sim: SimNet[MeshNode] | None = None
        self.restarts: dict[str, int] = {}
        self.recorder: Any = None  # (addr, worker, seq, now) for convergence timing
        self.probe_after: float | None = None  # owners probe quiet engines (None: never)
        self.drop_next: dict[str, int] = {}  # engine -> live batches still to lose on the wire
        self.dns: SeedView | None = None  # the seed name, resolved again by every node (None: never)
        self.index_factory: IndexFactory = _python_index  # each node's index, made when it starts

    # -- engines ----------------------------------------------------------------------
    def publish(self, eid: str, kind: str = "step") -> None:
        sim = self.sim
        assert sim is not None
        eng = self.engines[eid]
        now = sim.now
        out = eng.clear(now) if kind == "clear" else eng.step(now)
        if out is None:
            return
        seq, payload = out
        if self.drop_next.get(eid):
            self.drop_next[eid] -= 1
            return  # lost on PUB for every subscriber; still in the replay buffer
        for addr in sorted(sim.up_nodes()):
            node = sim.node(addr)
            if node is None or eid not in node.consumers:
                continue
            if self.live_loss and self.rng.random() < self.live_loss:
                continue
            sim.call_node(addr, now + LIVE_DELAY, partial(_on_live, eid=eid, seq=seq, payload=payload))

    def schedule_engine(
        self, eid: str, start: float, end: float, period: tuple[float, float], clear_prob: float = 0.0
    ) -> None:
        sim = self.sim
        assert sim is not None
        t = start
        while t < end:
            kind = "clear" if self.rng.random() < clear_prob else "step"
            sim.at(t, partial(self._publish_at, eid=eid, kind=kind))
            t += self.rng.uniform(*period)

    def _publish_at(self, _sim: SimNet[MeshNode], eid: str, kind: str) -> None:
        self.publish(eid, kind)

    def active_stints(self, eid: str) -> list[Stint]:
        return [s for s in self.stints.get(eid, []) if s.stopped is None]


class MeshNode:
    """SimNet node: a MeshCore, its prefix index and its engine consumers."""

    def __init__(self, addr: str, now: float, rng: random.Random, world: World, seeds: list[str]) -> None:
        self.addr = addr
        self.world = world
        self.incarnation = world.restarts.get(addr, 0)
        world.restarts[addr] = self.incarnation + 1
        self.index = world.index_factory(addr)
        # As a router node: replicated entries reach a native index packed.
        native = NativeIndex is not None and isinstance(self.index, NativeIndex)
        self.core = MeshCore(addr, addr, now, rng, replace(world.config, packed_entries=native))
        self.consumers: dict[str, Consumer] = {}
        self.stints: dict[str, Stint] = {}
        self.last_batch: dict[str, float] = {}  # engine -> when its consumer last got a live batch
        self.next_resolve = now + SEED_RETRY
        self.core.join(seeds, now)

    # -- SimNode --------------------------------------------------------------------
    def tick(self, now: float) -> list[Any]:
        dns = self.world.dns
        if dns is not None and now >= self.next_resolve:
            self.core.add_seeds([a for a in dns(self.addr, now) if a != self.addr], now)
            self.next_resolve = now + (SEED_REFRESH if self.core.has_peers() else SEED_RETRY)
        self.core.tick(now)
        if self.world.probe_after is not None:
            self._probe_quiet(now, self.world.probe_after)
        return self.pump(now)

    def _probe_quiet(self, now: float, after: float) -> None:
        for eid, c in sorted(self.consumers.items()):
            if now - self.last_batch.get(eid, now) >= after:
                self.last_batch[eid] = now
                self._feed(eid, c.probe(self.world.engines[eid]), now)

    def handle(self, msg: Any, now: float) -> list[Any]:
        try:
            self.core.handle(msg, now)
        finally:
            out = self.pump(now)
        return out

    # -- scripted inputs ------------------------------------------------------------
    def on_live(self, eid: str, seq: int, payload: bytes, now: float) -> list[Any]:
        c = self.consumers.get(eid)
        if c is not None:
            self.last_batch[eid] = now
            self._feed(eid, c.on_live(seq, payload, self.world.engines[eid]), now)
        return self.pump(now)

    def register(self, eid: str, now: float) -> list[Any]:
        self.core.register_engine(eid, {"endpoint": f"tcp://{eid}:5557", "model": MODEL}, now)
        return self.pump(now)

    def leave(self, now: float) -> list[Any]:
        self.core.leave(now)
        return self.pump(now)

    # -- plumbing -------------------------------------------------------------------
    def _feed(self, eid: str, deltas: list[KvDelta], now: float) -> None:
        if deltas and not self.core.engine_deltas(eid, deltas, now):
            self._stop(eid, now)

    def _stop(self, eid: str, now: float) -> None:
        self.consumers.pop(eid, None)
        st = self.stints.pop(eid, None)
        if st is not None:
            st.stopped = now

    def _start(self, ef: StartOwning, now: float) -> None:
        eid = ef.engine_id
        to = ef.takeover
        pairs = getattr(to, "mappings", {}).get(eid)
        c = Consumer(eid, to.resume.get(eid), pairs)
        others = {id(s): len(s.consumer.log) for s in self.world.active_stints(eid)}
        st = Stint(
            self.addr, self.incarnation, eid, to.epoch, ef.base_epoch, to.resume.get(eid), c, now, others
        )
        self.world.stints.setdefault(eid, []).append(st)
        self.consumers[eid] = c
        self.stints[eid] = st
        self.last_batch[eid] = now
        self._feed(eid, c.catch_up(self.world.engines[eid]), now)

    def pump(self, now: float) -> list[Any]:
        for _ in range(1000):
            effects = self.core.take_effects()
            if not effects:
                break
            for ef in effects:
                if isinstance(ef, StartOwning):
                    self._start(ef, now)
                elif isinstance(ef, StopOwning):
                    self._stop(ef.engine_id, now)
        rec = self.world.recorder
        for ch in self.core.take_index_changes():
            apply_change(self.index, ch)
            if rec is not None:
                for worker, seq in heads_of(ch):
                    if seq >= 0:
                        rec(self.addr, worker, seq, now)
        return self.core.take_sends()

    def crash_cleanup(self, now: float) -> None:
        for eid in list(self.stints):
            self._stop(eid, now)


def _on_live(node: MeshNode, now: float, eid: str, seq: int, payload: bytes) -> list[Any]:
    return node.on_live(eid, seq, payload, now)


def _register(node: MeshNode, now: float, eid: str) -> list[Any]:
    return node.register(eid, now)


def node_factory(world: World, seeds_of: Callable[[str], list[str]]) -> NodeFactory[MeshNode]:
    def factory(addr: str, now: float, rng: random.Random) -> tuple[MeshNode, list[Any]]:
        node = MeshNode(addr, now, rng, world, seeds_of(addr))
        return node, node.pump(now)

    return factory


# --- convergence measurement -------------------------------------------------------------


def measure_convergence(
    n: int,
    seed: int = 1,
    events: int = 40,
    engines: int = 2,
    loss: float = 0.0,
    config: MeshConfig | None = None,
    process_cost: float = 0.0,
    background: bool = True,
) -> dict[str, float]:
    """Event published on an engine -> applied in every node's index: p50/p99 seconds.

    N nodes join (three random earlier seeds each), ``engines`` engines are
    registered; after a warm-up, one batch per engine every 0.5 s. ``loss``:
    the share of messages the network drops; ``process_cost``: the seconds of
    CPU a node spends on each message it handles (``NetConfig.process_cost``).
    Returns the latency percentiles, the state-gossip bytes (pushes +
    anti-entropy, summed over all nodes) per event, net of the background
    traffic of an idle window as long (measured only with ``background``;
    otherwise bytes per event include it), and the wall time.
    """
    quiet_logs()
    cfg = config or MeshConfig()
    world = World(seed, cfg)
    net = NetConfig(delay_min=0.001, delay_max=0.01, loss_prob=loss, process_cost=process_cost)
    sim: SimNet[MeshNode] = SimNet(seed, net)
    world.sim = sim
    r = random.Random(f"conv/{seed}")
    addrs = [f"n{i}" for i in range(n)]
    seeds = {a: (r.sample(addrs[:i], min(3, i)) if i else []) for i, a in enumerate(addrs)}
    fac = node_factory(world, lambda a: seeds[a])
    for i, a in enumerate(addrs):
        sim.add_node(a, fac, at=0.0 if i == 0 else r.uniform(0.0, 3.0))
    eids = [f"e{j}" for j in range(engines)]
    for j, eid in enumerate(eids):
        world.engines[eid] = ModelledEngine(eid, random.Random(f"{seed}/{eid}"), num_blocks=200)
        sim.call_node("n0", 1.0 + j * 0.1, partial(_register, eid=eid))
    warm = 15.0 + n * 0.05
    span = events * 0.5 + 15.0
    sim.run_until(warm)
    idle = 0
    if background:
        # Background traffic (anti-entropy, load slots) over an idle window as long as the test.
        b0 = _state_bytes(sim)
        sim.run_until(warm + span)
        idle = _state_bytes(sim) - b0
    seen: dict[tuple[str, int], dict[str, float]] = {}

    def rec(addr: str, worker: str, seq: int, now: float) -> None:
        seen.setdefault((worker, seq), {}).setdefault(addr, now)

    world.recorder = rec
    published: list[tuple[str, int, float]] = []
    t = start = sim.now
    for _ in range(events):
        for eid in eids:

            def pub(s: SimNet[MeshNode], eid: str = eid) -> None:
                before = world.engines[eid].next_seq
                world.publish(eid)
                if world.engines[eid].next_seq > before:
                    published.append((eid, before, s.now))

            sim.at(t, pub)
        t += 0.5
    b1 = _state_bytes(sim)
    m1 = sim.stats.delivered
    t0 = time.perf_counter()
    sim.run_until(start + span)
    wall = time.perf_counter() - t0
    total = _state_bytes(sim) - b1
    lat = []
    missing = 0
    up = set(sim.up_nodes())
    for eid, seq, at in published:
        got = seen.get((eid, seq), {})
        if set(got) >= up:
            lat.append(max(got[a] for a in up) - at)
        else:
            missing += 1
    out = {
        "n": n,
        "events": len(published),
        "missing": missing,
        "p50": percentile(lat, 50) if lat else float("inf"),
        "p99": percentile(lat, 99) if lat else float("inf"),
        "max": max(lat) if lat else float("inf"),
        "mean": statistics.fmean(lat) if lat else float("inf"),
        "bytes_per_event": (total - idle) / max(1, len(published)),
        "loss": loss,
        "process_cost_s": process_cost,
        "messages_per_node_per_s": (sim.stats.delivered - m1) / span / max(1, len(up)),
        "queued_messages": sim.stats.queued,
        "max_backlog_s": sim.stats.max_backlog_s,
        "wall_s": wall,
    }
    if background:
        out["background_bytes_per_s"] = idle / span
    return out


def _state_bytes(sim: SimNet[MeshNode]) -> int:
    total = 0
    for node in sim.up_nodes().values():
        for k, v in node.core.stats().items():
            if k.startswith("sent.") and k.endswith(".bytes"):
                total += v
    return total


def default_sim_config(fast: bool = True) -> MeshConfig:
    """MeshConfig for the fault simulation: memberlist timings, or 2x faster probes."""
    if not fast:
        return MeshConfig()
    return MeshConfig(
        membership=MembershipConfig(
            probe_interval=0.5, probe_timeout=0.25, reconnect_interval=5.0, push_pull_interval=15.0
        )
    )
