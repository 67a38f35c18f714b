"""Overload benchmark: more requests than the fleet can serve, and what every one of them got.

An operator's test of a router is to send it more than the fleet behind it
can serve and look at what the clients get back. This benchmark does that in
a way that can be repeated and compared:

1. **Capacity.** Simulated engines with few batch slots (``max_num_seqs``)
   and real timing (``time_scale`` 1) are the bottleneck, at a rate this
   machine can offer many times over. A closed loop (twice as many clients
   as the fleet has slots, each sending its next request when the last one
   ends) keeps every slot busy; the OK completions per second after a
   warm-up are the fleet's capacity.
2. **Ladder.** For each level ``k`` (1x, 2x, 4x, 16x capacity), an open-loop
   Poisson process sends requests at ``k`` x capacity for a fixed time,
   whatever the answers; every call has the same client deadline. Between
   levels the fleet is left to go idle.
3. **Per call**, the client records the gRPC status, the node's reason (the
   ``kvmesh-reason`` trailing metadata), the time to the first message and to
   the first token, and the latency (for a RESOURCE_EXHAUSTED call: the time
   it took to be told no). Per level, each router process' RSS (VmRSS) is
   sampled at its start, at its end and every half second in between, the
   CPU used by the routers, the client, the engines and the rest of the
   machine is measured, and each node's ``GetStats`` and ``ListMembers``
   are read before and after (outcomes, membership events, requests, the
   node's event loop stalls and its largest lag since it started).

Two scenarios run on the same engines, each with fresh router nodes and
cold engine caches: one router node (its capacity run sets the rates of both
ladders, so both see the same offered load), and a mesh of ``mesh_nodes``
nodes behind one name (requests spread round-robin over the nodes, as a DNS
load balancer would). Prompts share a prefix (every engine caches it once)
and end in a random suffix, so each request costs prefill and its
``max_tokens`` decode steps (``ignore_eos``). The engines' caches are small enough to be full
by the end of the capacity run: from then on each new block evicts an old
one, so the index stays the same size and the router's memory follows the
load alone.

*Goodput* is the OK calls that ended within the level's sending window,
per second of that window: a backlog finished after the last arrival does
not count, so queueing cannot make a level look better than its steady
state. *Shed rate* is the share of calls answered RESOURCE_EXHAUSTED.

``router_python`` runs the router processes with another interpreter (an
older checkout installed in its own virtualenv) while the engines and the
client stay the same, so one harness measures both sides of a change (the
router runs from ``/`` so the other interpreter does not import this
checkout from the working directory).
"""

from __future__ import annotations

import asyncio
import datetime
import random
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import aiohttp
import grpc

from kvmesh import procs
from kvmesh.benchmarks.cpu import cpu_s, machine_busy_s, self_cpu_s
from kvmesh.benchmarks.routing import clear_caches
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh.probes import wait_mesh
from kvmesh.stats import percentile
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from router.errors import REASON_KEY

__all__ = [
    "OTHER",
    "QUICK",
    "STATUS_COLUMNS",
    "Call",
    "OverloadConfig",
    "counter_delta",
    "goodput_window",
    "poisson_arrivals",
    "run_overload",
    "summarize_level",
    "tally_statuses",
]

# The statuses the report has a column for; any other one is counted as OTHER.
STATUS_COLUMNS = (
    "OK",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
    "INVALID_ARGUMENT",
    "CANCELLED",
    "UNKNOWN",
)
OTHER = "other"
SINGLE = "node1"  # the one-node scenario's key in the results


@dataclass(frozen=True)
class OverloadConfig:
    """The fleet, the workload and the ladder (``kvmesh bench overload``'s flags start here)."""

    engines: int = 4
    max_num_seqs: int = 4  # batch slots per engine: few, so the engines are the bottleneck
    # KV cache per engine, in blocks: small enough to fill during the capacity run, so the
    # index holds as many blocks at every level and RSS follows the load, not a growing index.
    num_gpu_blocks: int = 1024
    time_scale: float = 1.0
    prefix_tokens: int = 1024  # shared by every prompt
    suffix_tokens: tuple[int, int] = (50, 400)  # random tokens after the prefix (inclusive range)
    max_tokens: tuple[int, int] = (32, 64)  # output tokens (inclusive range), ignore_eos
    levels: tuple[float, ...] = (1.0, 2.0, 4.0, 16.0)  # offered load, in multiples of capacity
    level_seconds: float = 15.0  # sending window of each level
    capacity_seconds: float = 8.0  # closed-loop measurement, after the warm-up
    warmup_seconds: float = 2.0
    deadline_seconds: float = 60.0  # client deadline of every call
    mesh_nodes: int = 3  # 0: no mesh scenario
    mesh_levels: tuple[float, ...] = (1.0, 2.0, 4.0, 16.0)
    policy: str = "precise"
    seed: int = 0
    router_python: str = ""  # another interpreter for the router processes ("" = this one)
    router_args: tuple[str, ...] = ()  # extra flags for every router
    idle_timeout_seconds: float = 120.0  # how long to wait for the fleet to go idle between levels
    rss_period_seconds: float = 0.5


# What ``--quick`` changes: shorter windows, and the mesh at the ends of the ladder only.
QUICK: dict[str, Any] = {
    "level_seconds": 4.0,
    "capacity_seconds": 4.0,
    "warmup_seconds": 1.0,
    "levels": (1.0, 16.0),
    "mesh_levels": (16.0,),
}


# -- pure parts ----------------------------------------------------------------


def poisson_arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process of
    ``rate`` per second over ``[0, seconds)``; the same seed, the same times."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be > 0")
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass(slots=True)
class Call:
    """What the client saw of one Generate call."""

    node: int  # index of the router node it was sent to
    t_send: float  # seconds since the level's start
    status: str  # gRPC status code name ("OK", "RESOURCE_EXHAUSTED", ...)
    latency_ms: float  # send -> status
    reason: str = ""  # the node's kvmesh-reason ("" when it sent none)
    first_msg_ms: float | None = None
    ttft_ms: float | None = None  # send -> first token
    tokens: int = 0
    lag_ms: float = 0.0  # how late it was sent against its scheduled arrival
    detail: str = ""  # the status message of a failed call

    @property
    def t_done(self) -> float:
        return self.t_send + self.latency_ms / 1000.0


def status_column(status: str) -> str:
    return status if status in STATUS_COLUMNS else OTHER


def tally_statuses(calls: Iterable[Call]) -> dict[str, int]:
    """Calls per status column (every column present, OTHER last)."""
    out = dict.fromkeys((*STATUS_COLUMNS, OTHER), 0)
    for c in calls:
        out[status_column(c.status)] += 1
    return out


def goodput_window(calls: Iterable[Call], seconds: float) -> float:
    """OK calls ended within ``[0, seconds]``, per second."""
    return sum(1 for c in calls if c.status == "OK" and c.t_done <= seconds) / seconds


def _pct(values: Sequence[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def _details(calls: Iterable[Call], per_status: int = 2) -> dict[str, list[str]]:
    """A few distinct status messages per failed status (what the client was told)."""
    out: dict[str, list[str]] = {}
    for c in calls:
        if c.status != "OK" and c.detail:
            seen = out.setdefault(c.status, [])
            if len(seen) < per_status and c.detail[:160] not in seen:
                seen.append(c.detail[:160])
    return out


def summarize_level(calls: Sequence[Call], k: float, offered_rps: float, seconds: float) -> dict:
    """The client's figures of one level (pure; node-side figures are added by the caller)."""
    ok = [c for c in calls if c.status == "OK"]
    shed = [c.latency_ms for c in calls if c.status == "RESOURCE_EXHAUSTED"]
    ttft = [c.ttft_ms for c in ok if c.ttft_ms is not None]
    lat = [c.latency_ms for c in ok]
    n = len(calls)
    return {
        "k": k,
        "offered_rps": offered_rps,
        "seconds": seconds,
        "sent": n,
        "sent_rps": n / seconds,
        "statuses": tally_statuses(calls),
        "other_statuses": dict(Counter(c.status for c in calls if status_column(c.status) == OTHER)),
        "reasons": dict(Counter(f"{c.status}:{c.reason or '-'}" for c in calls if c.status != "OK")),
        "goodput_rps": goodput_window(calls, seconds),
        "ok_total": len(ok),
        "shed_rate": len(shed) / n if n else 0.0,
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p99_ms": _pct(ttft, 99),
        "latency_p50_ms": _pct(lat, 50),
        "latency_p99_ms": _pct(lat, 99),
        "reject_p50_ms": _pct(shed, 50),
        "reject_p99_ms": _pct(shed, 99),
        "send_lag_p99_ms": _pct([c.lag_ms for c in calls], 99),
        "sent_by_node": dict(sorted(Counter(str(c.node) for c in calls).items())),
        "ok_by_node": dict(sorted(Counter(str(c.node) for c in ok).items())),
        "details": _details(calls),
    }


def counter_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """``after - before`` per key, the keys that changed only."""
    keys = sorted(set(before) | set(after))
    return {k: d for k in keys if (d := after.get(k, 0) - before.get(k, 0))}


# -- processes -----------------------------------------------------------------


def _start_engines(cfg: OverloadConfig) -> list[procs.Proc]:
    extra = ["--max-num-seqs", str(cfg.max_num_seqs), "--time-scale", str(cfg.time_scale)]
    extra += ["--num-gpu-blocks", str(cfg.num_gpu_blocks)]
    extra += ["--seed", str(cfg.seed), "--log-level", "warning"]
    return procs.start_all(
        [partial(procs.start_sim_engine, f"overload-engine-{i}", extra) for i in range(cfg.engines)]
    )


def _insecure_flag(cfg: OverloadConfig) -> list[str]:
    """``--insecure`` (no authentication, loopback only) if the router knows
    the flag: an older checkout's router may predate it, and serves without
    authentication anyway."""
    if not cfg.router_python:
        return ["--insecure"]
    out = subprocess.run(
        [cfg.router_python, "-m", "kvmesh.cli", "router", "--help"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        check=False,
    )
    return ["--insecure"] if "--insecure" in out.stdout else []


def _start_router(cfg: OverloadConfig, name: str, engine_flags: list[str], extra: list[str]) -> procs.Proc:
    args = ["router", "--listen", f"127.0.0.1:{procs.free_port()}", "--node-id", name, *extra]
    for f in engine_flags:
        args += ["--engine", f]
    args += ["--policy", cfg.policy, "--log-level", "warning", "--seed", str(cfg.seed), *cfg.router_args]
    if not cfg.router_python:
        return procs.start(name, args)
    return procs.start(name, args, python=cfg.router_python, cwd="/")


def _start_routers(cfg: OverloadConfig, engines: list[procs.Proc], n: int) -> list[procs.Proc]:
    """``n`` router nodes: the first is given the engines, the others join it."""
    flags = [procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)]
    insecure = _insecure_flag(cfg)
    first = _start_router(cfg, "overload-a", flags, insecure)
    nodes = [first]
    try:
        join = [*insecure, "--join", first.info["grpc"]]
        nodes += procs.start_all(
            [partial(_start_router, cfg, f"overload-{chr(97 + j)}", [], join) for j in range(1, n)]
        )
        asyncio.run(wait_mesh([p.info["grpc"] for p in nodes], len(engines)))
    except Exception:
        for p in nodes:
            p.stop()
        raise
    return nodes


def rss_kb(pid: int) -> int:
    """Resident set size of a process (VmRSS), in kB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class _RssSampler:
    """Each router's RSS at the start, the end and the peak of a level."""

    def __init__(self, pids: list[int], period: float) -> None:
        self.pids = pids
        self.period = period
        self.start = [rss_kb(p) for p in pids]
        self.peak = list(self.start)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            for i, p in enumerate(self.pids):
                self.peak[i] = max(self.peak[i], rss_kb(p))
            try:
                await asyncio.wait_for(self._stop.wait(), self.period)
            except TimeoutError:
                pass

    def stop(self) -> dict[str, list[float]]:
        self._stop.set()
        end = [rss_kb(p) for p in self.pids]
        mb = 1024.0
        return {
            "start_mb": [s / mb for s in self.start],
            "end_mb": [e / mb for e in end],
            "peak_mb": [max(p, e) / mb for p, e in zip(self.peak, end)],
        }


class _CpuMeter:
    """Cores used by the routers, the client (this process), the engines and the rest."""

    def __init__(self, routers: list[int], engines: list[int]) -> None:
        self.routers, self.engines = routers, engines
        self.t0 = time.perf_counter()
        self.c0 = self._read()

    def _read(self) -> dict[str, float]:
        return {
            "routers": sum(map(cpu_s, self.routers)),
            "client": self_cpu_s(),
            "engines": sum(map(cpu_s, self.engines)),
            "machine": machine_busy_s(),
        }

    def stop(self) -> dict[str, float]:
        c1 = self._read()
        wall = max(time.perf_counter() - self.t0, 1e-9)
        cores = {k: (c1[k] - self.c0[k]) / wall for k in c1}
        cores["other"] = max(0.0, cores.pop("machine") - sum(cores.values()))
        return cores


class _LoopStalls:
    """How late this process' event loop wakes a task that sleeps ``period``
    at a time: the client's share of a slow answer (a stall here delays
    every call it is reading)."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.late_ms: list[float] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(self.period)
            self.late_ms.append(max(0.0, (time.perf_counter() - t - self.period) * 1000.0))

    def stop(self) -> dict[str, float | None]:
        self._stop.set()
        return {"p99_ms": _pct(self.late_ms, 99), "max_ms": max(self.late_ms, default=None)}


# -- the client ----------------------------------------------------------------


def _reason(e: grpc.aio.AioRpcError) -> str:
    for key, value in e.trailing_metadata() or ():
        if key == REASON_KEY:
            return str(value)
    return ""


async def _one_call(
    stub: pb_grpc.RouterStub, node: int, req: pb.GenerateRequest, t0: float, deadline: float
) -> Call:
    """One Generate call, recorded (``t0``: the level's start, perf_counter)."""
    start = time.perf_counter()
    call = Call(node, start - t0, "OK", 0.0)
    try:
        async for msg in stub.Generate(req, timeout=deadline):
            now_ms = (time.perf_counter() - start) * 1000.0
            if call.first_msg_ms is None:
                call.first_msg_ms = now_ms
            if msg.WhichOneof("event") == "chunk" and msg.chunk.token_ids:
                if call.ttft_ms is None:
                    call.ttft_ms = now_ms
                call.tokens += len(msg.chunk.token_ids)
    except grpc.aio.AioRpcError as e:
        call.status, call.reason, call.detail = e.code().name, _reason(e), e.details() or ""
    call.latency_ms = (time.perf_counter() - start) * 1000.0
    return call


class _Prompts:
    """Requests of the workload: the shared prefix, a random suffix, a random output length."""

    def __init__(self, cfg: OverloadConfig, seed: int) -> None:
        self.cfg = cfg
        shared = random.Random(cfg.seed)  # the same prefix for every level and scenario
        self.prefix = [shared.randrange(256, 32000) for _ in range(cfg.prefix_tokens)]
        self.rng = random.Random(seed)
        self.n = 0

    def next(self, tag: str) -> pb.GenerateRequest:
        rng, cfg = self.rng, self.cfg
        suffix = [rng.randrange(256, 32000) for _ in range(rng.randint(*cfg.suffix_tokens))]
        self.n += 1
        return pb.GenerateRequest(
            request_id=f"{tag}-{self.n}",
            prompt=pb.Prompt(token_ids=pb.TokenIds(ids=self.prefix + suffix)),
            sampling=pb.SamplingParams(max_tokens=rng.randint(*cfg.max_tokens), ignore_eos=True),
        )


async def _open_loop(
    stubs: list[pb_grpc.RouterStub], prompts: _Prompts, arrivals: list[float], tag: str, deadline: float
) -> list[Call]:
    """Send one request at each arrival time (round-robin over the nodes) whatever the answers."""
    tasks: list[asyncio.Task[Call]] = []
    t0 = time.perf_counter()
    for i, t in enumerate(arrivals):
        delay = t - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        node = i % len(stubs)
        tasks.append(asyncio.create_task(_one_call(stubs[node], node, prompts.next(tag), t0, deadline)))
    calls = list(await asyncio.gather(*tasks))
    for c, t in zip(calls, arrivals):
        c.lag_ms = max(0.0, (c.t_send - t) * 1000.0)
    return calls


async def _closed_loop(
    stubs: list[pb_grpc.RouterStub], prompts: _Prompts, clients: int, seconds: float, deadline: float
) -> list[Call]:
    """``clients`` loops, each sending its next request as its last one ends, for ``seconds``."""
    t0 = time.perf_counter()
    calls: list[Call] = []

    async def client(j: int) -> None:
        node = j % len(stubs)
        while time.perf_counter() - t0 < seconds:
            calls.append(await _one_call(stubs[node], node, prompts.next("capacity"), t0, deadline))

    await asyncio.gather(*(client(j) for j in range(clients)))
    return calls


# -- the nodes' side -----------------------------------------------------------


async def _node_views(admins: list[pb_grpc.AdminStub]) -> list[dict]:
    """Each node's counters and membership view, as plain data."""
    out = []
    for a in admins:
        st = await a.GetStats(pb.GetStatsRequest(), timeout=10.0)
        mem = await a.ListMembers(pb.ListMembersRequest(), timeout=10.0)
        out.append(
            {
                "node_id": st.node_id,
                "requests_total": st.requests_total,
                "outcomes": dict(st.outcomes),
                "member_events": dict(st.member_events),
                "requests_by_engine": dict(st.requests_by_engine),
                "in_flight": st.in_flight,
                "index_entries": st.index_entries,
                "loop_stalls": st.event_loop_stalls_total,
                "loop_lag_max_s": st.event_loop_lag_max_seconds,
                "not_alive": sorted(f"{m.node_id}:{m.state}" for m in mem.members if m.state != "alive"),
                "incarnations": {m.node_id: m.incarnation for m in mem.members},
            }
        )
    return out


def node_deltas(before: list[dict], after: list[dict]) -> list[dict]:
    """What each node counted during a level (pure)."""
    out = []
    for b, a in zip(before, after):
        bumps = sum(max(0, v - b["incarnations"].get(k, v)) for k, v in a["incarnations"].items())
        out.append(
            {
                "node_id": a["node_id"],
                "requests": a["requests_total"] - b["requests_total"],
                "outcomes": counter_delta(b["outcomes"], a["outcomes"]),
                "member_events": counter_delta(b["member_events"], a["member_events"]),
                "requests_by_engine": counter_delta(b["requests_by_engine"], a["requests_by_engine"]),
                "in_flight_after": a["in_flight"],
                "index_entries_after": a["index_entries"],
                # The node's event loop late by more than its stall threshold (router/loop_lag.py).
                "loop_stalls": a["loop_stalls"] - b["loop_stalls"],
                "loop_lag_max_s_after": a["loop_lag_max_s"],  # since the node started
                "not_alive_after": a["not_alive"],
                "incarnation_bumps": bumps,  # refutations: a member answered a suspicion of itself
            }
        )
    return out


async def _wait_idle(urls: list[str], timeout: float) -> bool:
    """Every engine has nothing running or waiting (True), or the timeout passed."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            busy = 0
            for u in urls:
                async with http.get(f"{u}/admin/stats") as r:
                    st = await r.json()
                busy += int(st["running"]) + int(st["waiting"])
            if not busy:
                return True
            await asyncio.sleep(0.2)
    return False


@dataclass
class _Scenario:
    """One set of router nodes in front of the engines, and the client's channels to them."""

    cfg: OverloadConfig
    name: str
    routers: list[procs.Proc]
    engines: list[procs.Proc]
    note: Callable[[str], None]
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    stubs: list[pb_grpc.RouterStub] = field(default_factory=list)
    admins: list[pb_grpc.AdminStub] = field(default_factory=list)

    def open(self) -> None:
        self.channels = [aio_channel(p.info["grpc"], tls=False, config=ONE_NODE) for p in self.routers]
        self.stubs = [pb_grpc.RouterStub(c) for c in self.channels]
        self.admins = [pb_grpc.AdminStub(c) for c in self.channels]

    async def close(self) -> None:
        for c in self.channels:
            await c.close()

    async def capacity(self) -> dict:
        cfg = self.cfg
        clients = 2 * cfg.engines * cfg.max_num_seqs
        span = cfg.warmup_seconds + cfg.capacity_seconds
        calls = await _closed_loop(
            self.stubs, _Prompts(cfg, cfg.seed + 1), clients, span, cfg.deadline_seconds
        )
        done = [c for c in calls if c.status == "OK" and cfg.warmup_seconds <= c.t_done <= span]
        ttft = [c.ttft_ms for c in calls if c.ttft_ms is not None]
        return {
            "rps": len(done) / cfg.capacity_seconds,
            "clients": clients,
            "seconds": cfg.capacity_seconds,
            "warmup_seconds": cfg.warmup_seconds,
            "statuses": tally_statuses(calls),
            "ttft_p50_ms": _pct(ttft, 50),
        }

    async def level(self, k: float, capacity_rps: float, index: int) -> dict:
        cfg = self.cfg
        idle = await _wait_idle([p.info["url"] for p in self.engines], cfg.idle_timeout_seconds)
        rate = k * capacity_rps
        arrivals = poisson_arrivals(rate, cfg.level_seconds, cfg.seed * 1000 + index)
        prompts = _Prompts(cfg, cfg.seed * 1000 + 500 + index)
        before = await _node_views(self.admins)
        rss = _RssSampler([p.popen.pid for p in self.routers], cfg.rss_period_seconds)
        cpu = _CpuMeter([p.popen.pid for p in self.routers], [p.popen.pid for p in self.engines])
        stalls = _LoopStalls()
        samplers = [asyncio.create_task(rss.run()), asyncio.create_task(stalls.run())]
        try:
            calls = await _open_loop(
                self.stubs, prompts, arrivals, f"{self.name}-{k:g}x", cfg.deadline_seconds
            )
        finally:
            memory = rss.stop()
            client_stalls = stalls.stop()
            await asyncio.gather(*samplers)
        out = summarize_level(calls, k, rate, cfg.level_seconds)
        out["client_loop_late"] = client_stalls
        out["cpu_cores"] = cpu.stop()
        out["rss"] = memory
        out["nodes"] = node_deltas(before, await _node_views(self.admins))
        out["idle_before"] = idle
        return out


def _level_note(name: str, lv: dict) -> str:
    st = lv["statuses"]
    rej = lv["reject_p99_ms"]
    return (
        f"{name} {lv['k']:g}x ({lv['offered_rps']:.0f} req/s): OK {st['OK']}, "
        f"RESOURCE_EXHAUSTED {st['RESOURCE_EXHAUSTED']}, CANCELLED {st['CANCELLED']}, "
        f"UNKNOWN {st['UNKNOWN']}, other failures "
        f"{lv['sent'] - st['OK'] - st['RESOURCE_EXHAUSTED'] - st['CANCELLED'] - st['UNKNOWN']}; "
        f"goodput {lv['goodput_rps']:.1f}/s, TTFT p99 {lv['ttft_p99_ms'] or 0:.0f} ms, "
        f"reject p99 {'-' if rej is None else f'{rej:.1f}'} ms, "
        f"RSS {lv['rss']['start_mb'][0]:.0f}->{lv['rss']['end_mb'][0]:.0f} MB"
    )


async def _run_ladder(sc: _Scenario, levels: Sequence[float], capacity: dict | None) -> dict:
    sc.open()
    try:
        out: dict = {"nodes": len(sc.routers), "node_ids": [p.name for p in sc.routers], "levels": []}
        if capacity is None:
            capacity = await sc.capacity()
            sc.note(f"{sc.name}: capacity {capacity['rps']:.1f} req/s ({capacity['statuses']})")
        out["capacity_rps"] = capacity["rps"]
        for i, k in enumerate(levels):
            try:
                lv = await sc.level(k, capacity["rps"], i)
            except (grpc.aio.AioRpcError, aiohttp.ClientError, OSError, RuntimeError) as e:
                # The levels measured so far stand; the report says where it stopped and why.
                out["error"] = f"at {k:g}x: {type(e).__name__}: {e}"
                sc.note(f"{sc.name}: FAILED {out['error']}")
                break
            sc.note(_level_note(sc.name, lv))
            out["levels"].append(lv)
        return out | {"capacity": capacity}
    finally:
        await sc.close()


def _scenario(
    cfg: OverloadConfig,
    engines: list[procs.Proc],
    name: str,
    nodes: int,
    levels: Sequence[float],
    capacity: dict | None,
    note: Callable[[str], None],
) -> dict:
    """Fresh router nodes, cold engine caches, the ladder; the nodes are stopped after."""
    routers = _start_routers(cfg, engines, nodes)
    try:
        asyncio.run(clear_caches([p.info["url"] for p in engines], [p.info["grpc"] for p in routers]))
        return asyncio.run(_run_ladder(_Scenario(cfg, name, routers, engines, note), levels, capacity))
    finally:
        for p in routers:
            p.stop(15.0)


def run_overload(cfg: OverloadConfig, note: Callable[[str], None] = print) -> dict:
    """Capacity, then the ladder on one node and (``mesh_nodes`` > 1) on a mesh; the results dict."""
    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    res: dict = {"config": asdict(cfg), "started": started, "scenarios": {}}
    engines = _start_engines(cfg)
    try:
        plan = [(SINGLE, 1, cfg.levels)]
        if cfg.mesh_nodes > 1:
            plan.append((f"mesh{cfg.mesh_nodes}", cfg.mesh_nodes, cfg.mesh_levels))
        capacity = None
        for name, nodes, levels in plan:
            try:
                res["scenarios"][name] = out = _scenario(cfg, engines, name, nodes, levels, capacity, note)
                capacity = out["capacity"]
            except Exception as e:
                res["scenarios"][name] = {"nodes": nodes, "error": f"{type(e).__name__}: {e}"}
                note(f"{name}: FAILED: {res['scenarios'][name]['error']}")
        res["capacity"] = capacity
    finally:
        for p in engines:
            p.stop()
    res["duration_s"] = time.monotonic() - t0
    return res


def quick(cfg: OverloadConfig) -> OverloadConfig:
    """``cfg`` with ``--quick``'s shorter windows."""
    return replace(cfg, **QUICK)
