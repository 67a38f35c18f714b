"""The deterministic network simulator (kvmesh/simulation/simnet.py) with a tiny counting node."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

import pytest

from kvmesh.simulation.simnet import NetConfig, SimNet


@dataclass(frozen=True)
class Msg:
    src: str
    dst: str
    n: int


class Pinger:
    """Sends one numbered message to each peer per tick; records what it receives."""

    def __init__(self, addr: str, peers: list[str], now: float) -> None:
        self.addr, self.peers, self.started = addr, peers, now
        self.sent = 0
        self.got: list[tuple[float, Msg]] = []
        self.ticks: list[float] = []

    def tick(self, now: float) -> list[Msg]:
        self.ticks.append(now)
        out = [Msg(self.addr, p, self.sent + i) for i, p in enumerate(self.peers)]
        self.sent += len(out)
        return out

    def handle(self, msg: Msg, now: float) -> list[Msg]:
        if msg.n < 0:
            raise ValueError("bad message")
        self.got.append((now, msg))
        return []


def build(seed: int = 1, **net: Any) -> SimNet[Pinger]:
    sim: SimNet[Pinger] = SimNet(seed, NetConfig(**net))
    addrs = ["a", "b", "c"]
    for a in addrs:
        sim.add_node(a, lambda addr, now, rng: (Pinger(addr, [p for p in addrs if p != addr], now), []))
    return sim


def up_node(sim: SimNet[Pinger], addr: str) -> Pinger:
    n = sim.node(addr)
    assert n is not None, f"{addr} is down"
    return n


def test_same_seed_same_run_and_virtual_time() -> None:
    def trace(seed: int) -> list:
        sim = build(seed, loss_prob=0.3, dup_prob=0.1, reorder_prob=0.3)
        sim.run_until(10.0)
        assert sim.now == 10.0
        return [(t, m.src, m.n) for t, m in up_node(sim, "a").got]

    assert trace(5) == trace(5) and trace(5) != trace(6)


def test_ticks_at_interval_with_jitter() -> None:
    sim = build(tick_interval=0.1, tick_jitter=0.2)
    sim.run_until(10.0)
    ts = up_node(sim, "a").ticks
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    assert 90 <= len(ts) <= 115
    assert min(gaps) >= 0.08 - 1e-9 and max(gaps) <= 0.12 + 1e-9 and len({round(g, 6) for g in gaps}) > 10


def test_delay_loss_and_duplication() -> None:
    sim = build(delay_min=0.02, delay_max=0.05, loss_prob=0.25, dup_prob=0.1)
    sim.run_until(20.0)
    got = up_node(sim, "a").got
    sent_to_a = up_node(sim, "b").sent // 2 + up_node(sim, "c").sent // 2
    assert 0.6 * sent_to_a < len(got) < 0.9 * sent_to_a
    assert sim.stats.lost > 0 and sim.stats.duplicated > 0
    ns = [(m.src, m.n) for _, m in got]
    assert len(ns) > len(set(ns))  # duplicates delivered


def test_reordering() -> None:
    sim = build(delay_min=0.001, delay_max=0.002, reorder_prob=0.5, reorder_extra=0.5)
    sim.run_until(5.0)
    from_b = [m.n for _, m in up_node(sim, "a").got if m.src == "b"]
    assert from_b != sorted(from_b)


def test_partition_blocks_only_across_groups_and_heals() -> None:
    sim = build()
    sim.partition([["a"], ["b", "c"]], start=2.0, heal=4.0)
    sim.run_until(6.0)
    a_got = [(t, m.src) for t, m in up_node(sim, "a").got]
    assert not any(2.0 + 0.02 < t < 4.0 for t, _ in a_got)
    assert any(t > 4.05 for t, _ in a_got)
    b_got = [(t, m.src) for t, m in up_node(sim, "b").got]
    assert any(2.1 < t < 3.9 and s == "c" for t, s in b_got)
    assert not any(2.1 < t < 3.9 and s == "a" for t, s in b_got)
    assert sim.stats.partitioned > 0


def test_crash_drops_node_and_restart_brings_a_fresh_one() -> None:
    sim = build()
    sim.crash("b", 1.0)
    sim.restart("b", 3.0)
    sim.run_until(2.0)
    assert not sim.is_up("b") and sim.stats.to_down_node > 0
    old_ticks = len(sim.up_nodes()["a"].ticks)
    sim.run_until(5.0)
    b = sim.node("b")
    assert b is not None and b.started == pytest.approx(3.0)
    assert b.ticks and min(b.ticks) >= 3.0
    assert len(up_node(sim, "a").ticks) > old_ticks


def test_link_loss_is_directional() -> None:
    sim = build()
    sim.set_link_loss("b", "a", 1.0)
    sim.run_until(3.0)
    assert not any(m.src == "b" for _, m in up_node(sim, "a").got)
    assert any(m.src == "a" for _, m in up_node(sim, "b").got)


def test_handler_errors_are_counted_not_fatal() -> None:
    sim = build()
    sim.call_node("a", 1.0, lambda node, now: [Msg("a", "b", -1)])
    sim.run_until(2.0)
    assert sim.stats.handler_errors == 1 and isinstance(sim.last_error, ValueError)
    assert up_node(sim, "b").got  # b kept working


def test_bad_config_rejected() -> None:
    with pytest.raises(ValueError):
        SimNet(1, NetConfig(loss_prob=1.5))
    with pytest.raises(ValueError):
        SimNet(1, NetConfig(delay_min=0.2, delay_max=0.1))
    sim = build()
    with pytest.raises(KeyError):
        sim.crash("zz", 1.0)
    with pytest.raises(ValueError):
        sim.add_node("a", lambda addr, now, rng: (Pinger(addr, [], now), []))


def test_node_rngs_are_derived_from_seed_addr_and_restart() -> None:
    seen: list[float] = []

    def factory(addr: str, now: float, rng: random.Random):
        seen.append(rng.random())
        return Pinger(addr, [], now), []

    for _ in range(2):
        sim: SimNet[Pinger] = SimNet(9)
        sim.add_node("x", factory)
        sim.restart("x", 1.0)
        sim.run_until(2.0)
    assert seen[:2] == seen[2:] and seen[0] != seen[1]
