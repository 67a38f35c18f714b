"""Routing benchmark: every system in front of the SAME simulated engines.

For each workload the engines' caches are sized to it (``FleetConfig.pressure``
x its working set: engines near full memory, where forgetting evictions
costs), then every run starts cold: the engines' caches are cleared
(``POST /admin/clear``), a FRESH router process (or N of them) is started and,
for kvmesh, its index is seen empty; the system is stopped after the run, so
no routing memory (an index, a routed-prefix tree) is carried from one run to
the next. Engines run at ``--time-scale 1`` (a real A100's timing, see
``engine_adapters/sim_engine/timing.py``) with the same ``--seed``, so an
engine's answer depends only on the prompt: every system sees the same
conversations.

Three questions, one set of runs (a run answers every question it belongs to):

1. every system at the nominal load (``RoutingPlan.systems``);
2. router replicas (``replica_families`` x ``replicas``): N kvmesh nodes of
   one mesh, or N independent sglang-router instances, requests spread over
   them one by one;
3. goodput at an SLO (``ladder_families`` x ``ladder_replicas``): the same
   workload at a few offered loads, searched as :mod:`.goodput` says.

Every figure of a run comes from :func:`driver.summarize`; the ideals of a run
are computed over the requests it actually sent (:mod:`.ideals`).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import aiohttp

from kvmesh import procs
from kvmesh.benchmarks.driver import GrpcTarget, Rec, SglangTarget, run_workload, summarize
from kvmesh.benchmarks.goodput import Step, goodput, next_load
from kvmesh.benchmarks.ideals import ideals, lru_working_set_blocks, request_blocks
from kvmesh.benchmarks.systems import (
    FAMILIES,
    FleetConfig,
    System,
    SystemSpec,
    sglang_available,
    sglang_cache_aware_defaults,
    start_engines,
    start_system,
)
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh.stats import percentile
from kvmesh.workloads import Workload
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

__all__ = [
    "QUICK",
    "SYSTEMS",
    "FleetConfig",
    "RoutingPlan",
    "SystemSpec",
    "cache_sizing",
    "clear_caches",
    "overhead_probe",
    "run_routing",
]

SYSTEMS = FAMILIES  # what --systems accepts (each with an optional @N)


@dataclass
class RoutingPlan:
    """Which runs ``kvmesh bench routing`` makes (its flags start here)."""

    # At the nominal load, beside the replicas' N=1 (any of FAMILIES, with @N).
    systems: list[str] = field(default_factory=list)
    replicas: tuple[int, ...] = (1, 3, 5)
    replica_families: tuple[str, ...] = ("precise", "cache_aware_approx", "sglang_cache_aware", "round_robin")
    ladder_replicas: tuple[int, ...] = (1, 3)
    ladder_families: tuple[str, ...] = ("precise", "sglang_cache_aware", "round_robin")
    ladder_steps: int = 2  # runs per goodput curve, the nominal load's included
    ladder_factor: float = 2.0  # first move away from the nominal load
    ladder_precision: float = 1.25  # a bracket this narrow (hi / lo) ends the search
    slo_ms: float = 1000.0  # TTFT p90 a goodput run must stay under
    probes: int = 20  # idle requests of the overhead probe

    def specs(self) -> list[SystemSpec]:
        """Every system run at the nominal load, in order, once each."""
        out: list[SystemSpec] = []
        wanted = [SystemSpec(f, n) for n in self.replicas for f in self.replica_families]
        wanted += [SystemSpec.parse(s) for s in self.systems]
        wanted += self.ladder_specs()
        for s in wanted:
            if s not in out:
                out.append(s)
        return out

    def ladder_specs(self) -> list[SystemSpec]:
        return [SystemSpec(f, n) for n in self.ladder_replicas for f in self.ladder_families]


# --quick: fewer systems, replicas and ladder steps (the same code).
QUICK = RoutingPlan(
    systems=[],
    replicas=(1, 3),
    replica_families=("precise", "sglang_cache_aware"),
    ladder_replicas=(1,),
    ladder_families=("precise",),
    ladder_steps=2,
    probes=8,
)


# --- cache sizing ----------------------------------------------------------------------------


def cache_sizing(w: Workload, cfg: FleetConfig) -> dict:
    """Each engine's cache for ``w``: ``cfg.pressure`` x the working set of the
    requests planned (an LRU working set: the smallest pooled LRU cache that
    loses under 1% of the infinite cache's hits), split over the engines,
    never under ``cfg.min_longest_requests`` of the longest request; with
    pressure 0, ``cfg.num_gpu_blocks``. The planned ideals are reported too."""
    planned = w.planned_requests(cfg.planned_latency_s)
    reqs = request_blocks(planned, cfg.block_size)
    ws = lru_working_set_blocks(reqs, block_size=cfg.block_size)
    # What an engine reserves for a request: every block of prompt + answer, the last one partial.
    longest = max((math.ceil((len(p) + len(a)) / cfg.block_size) for p, a in planned), default=0)
    floor = cfg.min_longest_requests * longest
    if cfg.pressure > 0:
        per_engine = max(math.ceil(cfg.pressure * ws / cfg.engines), floor, 1)
    else:
        per_engine = cfg.num_gpu_blocks
    fleet = per_engine * cfg.engines
    best = ideals(planned, fleet, cfg.block_size)
    return {
        "pressure": cfg.pressure,
        "lru_working_set_blocks": ws,
        "working_set_blocks": best.working_set_blocks,
        "longest_request_blocks": longest,
        "blocks_per_engine": per_engine,
        "fleet_blocks": fleet,
        "fleet_share_of_working_set": fleet / ws if ws else None,
        "planned": best.as_dict(),
    }


# --- runs ------------------------------------------------------------------------------------


async def _engines_idle(http: aiohttp.ClientSession, engine_urls: list[str], timeout: float) -> list[str]:
    """Wait until no engine runs or queues a request (a run must not start
    behind the last one's leftovers); the engines still busy at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        for u in engine_urls:
            async with http.get(f"{u}/admin/stats") as r:
                st = await r.json()
            if st["running"] or st["waiting"]:
                busy.append(f"{u} ({st['running']} running, {st['waiting']} waiting)")
        if not busy or time.monotonic() > deadline:
            return busy
        await asyncio.sleep(0.1)


async def clear_caches(engine_urls: list[str], grpc_addrs: list[str], timeout: float = 20.0) -> list[str]:
    """Once the engines are idle, clear every engine's cache; wait until every
    router node's index is empty.

    Returns a warning per engine still busy and per node whose index still
    held entries at the deadline (the run goes on: that is a finding to
    report, not a reason to lose the other systems' results)."""
    warnings: list[str] = []
    async with aiohttp.ClientSession() as http:
        busy = await _engines_idle(http, engine_urls, timeout)
        warnings += [f"engine {b} still busy {timeout:.0f} s after the last run" for b in busy]
        for u in engine_urls:
            async with http.post(f"{u}/admin/clear") as r:
                r.raise_for_status()
    deadline = time.monotonic() + timeout
    for a in grpc_addrs:
        async with aio_channel(a, tls=False, config=ONE_NODE) as ch:
            admin = pb_grpc.AdminStub(ch)
            while True:
                st = await admin.GetStats(pb.GetStatsRequest())
                if st.index_entries == 0:
                    break
                if time.monotonic() > deadline:
                    warnings.append(
                        f"router node {st.node_id or a}: index still held {st.index_entries} entries "
                        f"{timeout:.0f} s after every engine cleared its cache"
                    )
                    break
                await asyncio.sleep(0.05)
    return warnings


async def _idle_ttft(target: GrpcTarget | SglangTarget, prompts: list[list[int]], tag: str) -> list[float]:
    out: list[float] = []
    await target.open()
    try:
        for i, p in enumerate(prompts):
            r = await target.generate(p, 1, "probe", f"probe-{tag}-{i}-{uuid.uuid4().hex[:6]}")
            if r.ok:
                out.append(r.ttft_ms)
    finally:
        await target.close()
    return out


async def overhead_probe(system: System, engine_urls: list[str], n: int = 20) -> dict[str, float | None]:
    """Idle fleet: TTFT of a 32-token, 1-token-output request through the
    system minus the same request sent straight to an engine (both read by
    this client on a kept-alive connection), plus the Route RPC latency for
    kvmesh. For an HTTP system, the same again with this client
    acknowledging every segment at once (TCP_QUICKACK): a router that leaves
    Nagle's algorithm on holds its first chunk until the client's delayed
    ACK of the response head, which only a first token sooner than that
    timer (an idle fleet, a tiny prompt) ever waits for."""
    import random

    rng = random.Random(0)

    def prompts() -> list[list[int]]:
        return [[rng.randrange(256, 32000) for _ in range(32)] for _ in range(n)]

    med = statistics.median
    direct = await _idle_ttft(SglangTarget(engine_urls[0]), prompts(), "d")
    via = await _idle_ttft(system.target(), prompts(), "v")
    out: dict[str, float | None] = {
        "direct_ttft_p50_ms": med(direct) if direct else 0.0,
        "via_ttft_p50_ms": med(via) if via else 0.0,
        "overhead_ms": (med(via) - med(direct)) if direct and via else 0.0,
        "overhead_quickack_ms": None,
        "route_rpc_p50_ms": None,
        "route_rpc_p99_ms": None,
    }
    if system.http_urls:
        d_q = await _idle_ttft(SglangTarget(engine_urls[0], quickack=True), prompts(), "dq")
        v_q = await _idle_ttft(system.target(quickack=True), prompts(), "vq")
        out["overhead_quickack_ms"] = (med(v_q) - med(d_q)) if d_q and v_q else None
    if system.grpc_addrs:
        route: list[float] = []
        async with aio_channel(system.grpc_addrs[0], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            toks = [rng.randrange(256, 32000) for _ in range(2048)]
            for _ in range(n * 5):
                t = time.perf_counter()
                await stub.Route(
                    pb.RouteRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=toks)), dry_run=True)
                )
                route.append((time.perf_counter() - t) * 1000.0)
        out["route_rpc_p50_ms"] = med(route)
        out["route_rpc_p99_ms"] = percentile(route, 99)
    return out


class Progress(Protocol):
    """A progress display fed one finished request at a time."""

    def __call__(self, rec: Rec, /) -> None: ...

    def close(self) -> None: ...


@dataclass
class _Bench:
    """What every run of one ``run_routing`` shares."""

    cfg: FleetConfig
    plan: RoutingPlan
    progress: Callable[[str, int], Progress] | None
    note: Callable[[str], None]
    results: dict
    engines: list[procs.Proc] = field(default_factory=list)
    blocks_per_engine: int = 0
    probed: set[str] = field(default_factory=set)

    @property
    def urls(self) -> list[str]:
        return [p.info["url"] for p in self.engines]

    def engines_for(self, blocks: int) -> None:
        """Engines of ``blocks`` blocks each (restarted when the size changes)."""
        if self.engines and blocks == self.blocks_per_engine:
            return
        self.stop_engines()
        self.engines = start_engines(self.cfg, blocks)
        self.blocks_per_engine = blocks

    def stop_engines(self) -> None:
        for p in self.engines:
            p.stop()
        self.engines = []

    def run(self, spec: SystemSpec, w: Workload, load: float) -> dict:
        """One cold run of ``w`` at ``load`` through a fresh ``spec``: its summary,
        or ``{"error": ...}``."""
        label = f"{w.name} {spec.key}" + (f" x{load:g}" if load != 1.0 else "")
        t0 = time.monotonic()
        try:
            system = start_system(spec, self.engines, self.cfg)
        except Exception as e:
            self.note(f"{label}: did not start: {e}")
            return {"error": f"did not start: {e}"}
        t_up = time.monotonic()
        try:
            warnings = asyncio.run(clear_caches(self.urls, system.grpc_addrs))
            for x in warnings:
                self.note(f"{label}: WARNING {x}")
            started, cleared = t_up - t0, time.monotonic() - t_up
            ww = w.scaled(load) if load != 1.0 else w
            bar = self.progress(label, ww.requests) if self.progress else None
            try:
                recs, wall, sampler = asyncio.run(run_workload(system.target(), ww, self.urls, on_done=bar))
            finally:
                if bar is not None:
                    bar.close()
            s = summarize(
                recs,
                wall,
                sampler,
                self.cfg.block_size,
                self.blocks_per_engine * len(self.engines),
                self.plan.slo_ms,
            )
            s["warnings"] = warnings
            s["start_s"], s["clear_s"] = started, cleared
            if spec.key not in self.probed:  # once per system, after a run (each run starts cold)
                self.probed.add(spec.key)
                sysd = self.results["systems"].setdefault(spec.key, {})
                sysd["overhead"] = asyncio.run(overhead_probe(system, self.urls, self.plan.probes))
        except Exception as e:
            self.note(f"{label}: FAILED: {type(e).__name__}: {e}")
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            system.stop()
        p90 = s["ttft_p90_all_ms"]
        self.note(
            f"{label}: hit {s['hit_rate']:.3f} (pooled LRU {s['pooled_lru_hit_rate']:.3f}, "
            f"infinite {s['ideal_hit_rate']:.3f}) TTFT p90 "
            + (f"{p90:.0f} ms" if p90 is not None else "over (failures)")
            + f" ({s['within_slo']:.0%} within {self.plan.slo_ms:g} ms)"
            + f", {s['throughput_rps']:.1f} req/s, failed {s['failed']}, {wall:.1f} s"
            + f" (start {s['start_s']:.1f} s, idle and clear {s['clear_s']:.1f} s, "
            f"{time.monotonic() - t0:.1f} s in all)" + (f" errors: {s['errors']}" if s["errors"] else "")
        )
        return s


_LADDER_FIELDS = (
    "hit_rate",
    "pooled_lru_hit_rate",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "ttft_p90_all_ms",
    "within_slo",
    "failed",
    "requests",
    "throughput_rps",
    "wall_s",
)


def _ladder_point(load: float, s: dict) -> dict:
    return {
        "load": load,
        **{k: s.get(k) for k in _LADDER_FIELDS},
        **({"error": s["error"]} if "error" in s else {}),
    }


def _ladder(b: _Bench, spec: SystemSpec, w: Workload, nominal: dict) -> tuple[list[dict], dict | None]:
    """The goodput search of ``spec`` on ``w``, from its nominal run."""
    plan = b.plan
    points = [_ladder_point(1.0, nominal)]
    steps = [Step(1.0, nominal.get("within_slo", 0.0))]
    while (
        load := next_load(steps, plan.ladder_factor, plan.ladder_steps, precision=plan.ladder_precision)
    ) is not None:
        s = b.run(spec, w, load)
        points.append(_ladder_point(load, s))
        steps.append(Step(load, s.get("within_slo", 0.0)))
    g = goodput(steps)
    points.sort(key=lambda p: p["load"])
    return points, (g.as_dict() if g is not None else None)


def _skip(b: _Bench, spec: SystemSpec) -> bool:
    if spec.is_sglang and (why := sglang_available()):
        if spec.key not in b.results["skipped"]:
            b.results["skipped"][spec.key] = why
            b.note(f"skip {spec.key}: {why}")
        return True
    return False


def _workload(b: _Bench, w: Workload) -> None:
    sizing = cache_sizing(w, b.cfg)
    b.results["workloads"][w.name] = {"params": w.params, "requests": w.requests, "cache": sizing}
    b.note(
        f"{w.name}: working set {sizing['lru_working_set_blocks']:,} blocks (LRU), "
        f"{sizing['working_set_blocks']:,} (offline optimum); caches {sizing['blocks_per_engine']:,} "
        f"blocks per engine, {sizing['fleet_blocks']:,} in all"
    )
    b.engines_for(sizing["blocks_per_engine"])
    nominal: dict[str, dict] = {}
    for spec in b.plan.specs():
        if _skip(b, spec):
            continue
        s = b.run(spec, w, 1.0)
        nominal[spec.key] = s
        b.results["systems"].setdefault(spec.key, {})[w.name] = s
    for spec in b.plan.ladder_specs():
        if spec.key not in nominal or "error" in nominal[spec.key]:
            continue
        points, g = _ladder(b, spec, w, nominal[spec.key])
        b.results["ladder"].setdefault(w.name, {})[spec.key] = points
        b.results["goodput"].setdefault(w.name, {})[spec.key] = g


def run_routing(
    workloads: list[Workload],
    plan: RoutingPlan,
    cfg: FleetConfig,
    progress: Callable[[str, int], Progress] | None = None,
    note: Callable[[str], None] = print,
    split: dict | None = None,
) -> dict:
    """Every run of ``plan`` over every workload; returns the results dict."""
    results: dict = {
        "fleet": asdict(cfg) | {"prefill_tokens_per_s": cfg.prefill_tokens_per_s},
        "plan": asdict(plan),
        "split": split or {},
        "sglang_cache_aware_defaults": sglang_cache_aware_defaults(),
        "workloads": {},
        "systems": {},
        "ladder": {},
        "goodput": {},
        "skipped": {},
    }
    b = _Bench(cfg, plan, progress, note, results)
    try:
        for w in workloads:
            _workload(b, w)
    finally:
        b.stop_engines()
    return results
