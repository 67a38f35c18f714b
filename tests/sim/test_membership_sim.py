"""Membership under random faults, over many seeds, in the deterministic simulator.

Each seed builds a scenario: 4-10 nodes joining through DNS-like seed lists,
loss up to 20%, duplication, reordering, random delay, one partition that
heals, crashes with and without restart, sometimes a graceful leave and a
late joiner. After the fault window the network goes quiet; then every live
node's view of the live members must equal the set of nodes that are actually
up (and did not leave), with every one of them ``alive``.

Rerun one seed with its timeline::

    KVMESH_SIM_SEED=1234 .venv/bin/python -m pytest -q tests/sim/test_membership_sim.py -k seed

Number of seeds: ``KVMESH_SIM_SEEDS`` (default 300), first seed ``KVMESH_SIM_SEED_BASE``.
Detection/join latency at N=10/50/100 (optionally with random loss)::

    .venv/bin/python -m tests.sim.test_membership_sim measure [10 50 100] [--loss 0.05]
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import pytest
import structlog

from kvmesh.simulation.simnet import NetConfig, SimNet
from kvmesh.stats import percentile
from mesh.membership import Membership, MembershipConfig
from mesh.swim_messages import ALIVE

FAULT_END = 60.0  # faults happen in [0, FAULT_END)
QUIET = 60.0  # then a quiet network for this long before the check
N_SEEDS = int(os.environ.get("KVMESH_SIM_SEEDS", "300"))
SEED_BASE = int(os.environ.get("KVMESH_SIM_SEED_BASE", "0"))
CHUNKS = 10

_QUIET_LOG = structlog.wrap_logger(
    structlog.PrintLogger(), wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL)
)
CFG = MembershipConfig()


def rerun_cmd(seed: int) -> str:
    return f"KVMESH_SIM_SEED={seed} .venv/bin/python -m pytest -q tests/sim/test_membership_sim.py -k seed"


def make_factory(all_addrs: list[str], cfg: MembershipConfig | None = None):
    def factory(addr: str, now: float, rng: random.Random):
        m = Membership(addr, addr, cfg or CFG, now, rng, logger=_QUIET_LOG)
        return m, m.join([a for a in all_addrs if a != addr], now)

    return factory


@dataclass
class Scenario:
    seed: int
    addrs: list[str]
    script: list[str] = field(default_factory=list)  # human-readable fault plan
    left: set[str] = field(default_factory=set)


def build(seed: int) -> tuple[SimNet[Membership], Scenario]:
    r = random.Random(f"scenario/{seed}")
    n = r.randint(4, 10)
    addrs = [f"n{i}" for i in range(n)]
    late = r.random() < 0.5
    if late:
        addrs.append(f"n{n}")
    sc = Scenario(seed, addrs)
    net = NetConfig(
        delay_min=0.001,
        delay_max=r.uniform(0.005, 0.1),
        loss_prob=r.uniform(0.0, 0.2),
        dup_prob=r.uniform(0.0, 0.05),
        reorder_prob=r.uniform(0.0, 0.2),
        reorder_extra=0.2,
    )
    sc.script.append(
        f"n={n} loss={net.loss_prob:.3f} dup={net.dup_prob:.3f} reorder={net.reorder_prob:.3f} "
        f"delay<={net.delay_max:.3f}"
    )
    sim: SimNet[Membership] = SimNet(seed, net)
    factory = make_factory(addrs)
    for i, a in enumerate(addrs[:n]):
        sim.add_node(a, factory, at=0.0 if i == 0 else r.uniform(0.0, 3.0))
    if late:
        t = r.uniform(10.0, 50.0)
        sim.add_node(addrs[n], factory, at=t)
        sc.script.append(f"{addrs[n]} joins late at {t:.2f}")

    # One partition into two non-empty sides, healed before the quiet period.
    side_a = [a for a in addrs if r.random() < 0.5] or [addrs[0]]
    side_b = [a for a in addrs if a not in side_a] or [addrs[-1]]
    side_a = [a for a in side_a if a not in side_b]
    p_start = r.uniform(5.0, 35.0)
    p_end = p_start + r.uniform(2.0, 20.0)
    sim.partition([side_a, side_b], p_start, p_end)
    sc.script.append(f"partition {side_a} | {side_b} from {p_start:.2f} to {p_end:.2f}")

    # Crashes (some restart), keeping at least two original nodes untouched.
    victims = r.sample(addrs[:n], r.randint(1, min(3, n - 2)))
    for v in victims:
        t = r.uniform(5.0, 50.0)
        sim.crash(v, t)
        if r.random() < 0.5:
            back = min(t + r.uniform(1.0, 15.0), FAULT_END - 1.0)
            sim.restart(v, back)
            sc.script.append(f"{v} crashes at {t:.2f}, restarts at {back:.2f}")
        else:
            sc.script.append(f"{v} crashes at {t:.2f}")

    # Sometimes a graceful leave: the node gossips Leave, then stops 2 s later.
    others = [a for a in addrs[:n] if a not in victims]
    if len(others) > 2 and r.random() < 0.3:
        lv = r.choice(others)
        t = r.uniform(10.0, 50.0)
        sim.call_node(lv, t, lambda node, now: node.leave(now))
        sim.crash(lv, t + 2.0)
        sc.left.add(lv)
        sc.script.append(f"{lv} leaves at {t:.2f}")

    def quiet(s: SimNet[Membership]) -> None:
        c = s.config
        c.loss_prob = c.dup_prob = c.reorder_prob = 0.0
        c.delay_max = 0.01

    sim.at(FAULT_END, quiet)
    return sim, sc


def check(sim: SimNet[Membership], sc: Scenario) -> list[str]:
    """Violations of the convergence property (empty when it holds)."""
    up = sim.up_nodes()
    expected = {a for a in up if a not in sc.left}
    problems = []
    for a in sorted(expected):
        node = up[a]
        view = {m.node for m in node.live_members()}
        if view != expected:
            problems.append(f"{a} sees live {sorted(view)}, actually live {sorted(expected)}")
        for b in sorted(expected):
            rec = node.member(b)
            if rec is None or rec.state != ALIVE:
                problems.append(f"{a} has live {b} as {rec.state if rec else 'unknown'}")
    if sim.stats.handler_errors:
        problems.append(f"{sim.stats.handler_errors} handler errors, last: {sim.last_error!r}")
    return problems


def run_seed(seed: int) -> tuple[list[str], Scenario, SimNet[Membership]]:
    sim, sc = build(seed)
    sim.run_until(FAULT_END + QUIET)
    return check(sim, sc), sc, sim


def _describe(seed: int, problems: list[str], sc: Scenario) -> str:
    lines = [f"seed {seed} failed: rerun with: {rerun_cmd(seed)}"]
    lines += ["  plan: " + s for s in sc.script]
    lines += ["  " + p for p in problems[:10]]
    return "\n".join(lines)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_membership_converges_after_faults(chunk: int) -> None:
    if os.environ.get("KVMESH_SIM_SEED"):
        pytest.skip("single-seed rerun requested (see test_single_seed)")
    seeds = [SEED_BASE + s for s in range(N_SEEDS) if s % CHUNKS == chunk]
    failures = []
    for seed in seeds:
        problems, sc, _ = run_seed(seed)
        if problems:
            failures.append(_describe(seed, problems, sc))
    assert not failures, "\n".join(failures)


def test_single_seed() -> None:
    """``KVMESH_SIM_SEED=n`` reruns one seed with its plan, final views and events."""
    raw = os.environ.get("KVMESH_SIM_SEED")
    if not raw:
        pytest.skip("set KVMESH_SIM_SEED to rerun one seed")
    seed = int(raw)
    problems, sc, sim = run_seed(seed)
    print(f"seed {seed}:")
    for s in sc.script:
        print("  plan:", s)
    print("  stats:", sim.stats)
    for a, node in sorted(sim.up_nodes().items()):
        print(
            f"  {a} inc={node.incarnation} awareness={node.awareness} members="
            + ", ".join(f"{m.node}:{m.state}@{m.incarnation}" for m in node.members())
        )
        for e in node.events():
            print(f"    {e.at:8.3f} {e.kind:8s} {e.node}@{e.incarnation}")
    assert not problems, _describe(seed, problems, sc)


def test_simulation_is_deterministic() -> None:
    def fingerprint(seed: int) -> tuple:
        sim, _ = build(seed)
        sim.run_until(40.0)
        views = tuple(
            (a, tuple((m.node, m.state, m.incarnation) for m in n.members()))
            for a, n in sorted(sim.up_nodes().items())
        )
        return views, sim.stats.sent, sim.stats.delivered

    assert fingerprint(7) == fingerprint(7)
    assert fingerprint(7) != fingerprint(8)


def test_ten_nodes_sixty_seconds_is_fast() -> None:
    t0 = time.perf_counter()
    sim, _ = build(3)
    sim.run_until(60.0)
    assert time.perf_counter() - t0 < 2.0  # generous: the simulator must stay cheap enough for CI
    assert sim.stats.delivered > 1000


# --- latency measurements -------------------------------------------------------------------


def _stable_cluster(n: int, seed: int, loss: float) -> tuple[SimNet[Membership], list[str]]:
    addrs = [f"n{i}" for i in range(n)]
    sim: SimNet[Membership] = SimNet(seed, NetConfig(delay_min=0.001, delay_max=0.01, loss_prob=loss))
    r = random.Random(f"measure/{seed}")
    for i, a in enumerate(addrs):
        # DNS-like seed list: three random earlier nodes (the first node seeds nobody).
        seeds = r.sample(addrs[:i], min(3, i)) if i else []

        def factory(addr: str, now: float, rng: random.Random, seeds: list[str] = seeds):
            m = Membership(addr, addr, CFG, now, rng, logger=_QUIET_LOG)
            return m, m.join(seeds, now)

        sim.add_node(a, factory, at=r.uniform(0.0, 2.0) if i else 0.0)
    return sim, addrs


def crash_detection_time(n: int, seed: int, loss: float = 0.0) -> float:
    """Seconds from a crash until every other node has declared the victim dead."""
    sim, addrs = _stable_cluster(n, seed, loss)
    r = random.Random(f"crash/{seed}")
    victim = r.choice(addrs)
    t_crash = 20.0 + r.random()
    sim.crash(victim, t_crash)
    sim.run_until(t_crash + 120.0)
    worst = 0.0
    for node in sim.up_nodes().values():
        ts = [e.at for e in node.events() if e.node == victim and e.kind == "dead" and e.at >= t_crash]
        if not ts:
            return float("inf")
        worst = max(worst, ts[0] - t_crash)
    return worst


def join_time(n: int, seed: int, loss: float = 0.0) -> float:
    """Seconds from a joiner's start until every node knows it."""
    sim, addrs = _stable_cluster(n, seed, loss)
    r = random.Random(f"join/{seed}")
    t_join = 20.0 + r.random()
    seeds = r.sample(addrs, 3)

    def factory(addr: str, now: float, rng: random.Random):
        m = Membership(addr, addr, CFG, now, rng, logger=_QUIET_LOG)
        return m, m.join(seeds, now)

    sim.add_node("joiner", factory, at=t_join)
    sim.run_until(t_join + 60.0)
    worst = 0.0
    for a, node in sim.up_nodes().items():
        if a == "joiner":
            continue
        ts = [e.at for e in node.events() if e.node == "joiner" and e.kind == "joined"]
        if not ts:
            return float("inf")
        worst = max(worst, ts[0] - t_join)
    return worst


def test_crash_detection_and_join_latency_n10() -> None:
    det = [crash_detection_time(10, s) for s in range(20)]
    joins = [join_time(10, s) for s in range(20)]
    # Suspicion at n=10: min 4 s, max 24 s; a probe cycle is <= 10 s.
    assert max(det) < 40.0, det
    assert statistics.median(det) < 20.0, det
    assert max(joins) < 5.0, joins


def measure(
    sizes: tuple[int, ...] = (10, 50, 100), loss: float = 0.0, seeds_for: dict[int, int] | None = None
) -> None:
    seeds_for = seeds_for or {10: 200, 50: 100, 100: 50}
    for n in sizes:
        k = seeds_for.get(n, 20)
        t0 = time.perf_counter()
        det = [crash_detection_time(n, s, loss) for s in range(k)]
        joins = [join_time(n, s, loss) for s in range(k)]
        wall = time.perf_counter() - t0
        print(
            f"N={n:3d} loss={loss:.2f} seeds={k:3d}  crash detected by all: p50={percentile(det, 50):6.2f}s "
            f"p99={percentile(det, 99):6.2f}s max={max(det):6.2f}s | joiner known by all: "
            f"p50={percentile(joins, 50):5.2f}s p99={percentile(joins, 99):5.2f}s max={max(joins):5.2f}s "
            f"(wall {wall:.1f}s)",
            flush=True,
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        args = sys.argv[2:]
        loss = 0.0
        if "--loss" in args:
            i = args.index("--loss")
            loss = float(args[i + 1])
            del args[i : i + 2]
        measure(tuple(int(x) for x in args) or (10, 50, 100), loss)
    else:
        print(__doc__)
