"""Gossip convergence: an engine's KV event -> every node's index.

Real processes for small meshes: N router nodes on loopback (default mesh
timings: gossip every 0.2 s, probes every 1 s), one simulated engine owned by
one of them. Each event is a request sent straight to the engine (a fresh
prompt, so it stores new blocks); from the moment its response is complete
(the step's ``KVEventBatch`` is published before the last token leaves the
engine), every node's ``Admin.GetIndexDigest`` is polled until it equals the
digest of the engine's real cache (``/admin/cache``). Gossip bytes per event:
``Admin.GetStats.mesh_bytes_sent`` summed over the nodes, before/after,
minus the background traffic of an idle window as long.

What a mesh message costs a real node: after the latency measurement, events
go on at the same pace for a while without the digest polls, and the nodes'
CPU seconds (``/proc``) over that window are divided by the mesh messages
they sent in it (``GetStats.mesh_messages_sent``). Everything a node does
(timers, health checks, the owner's event ingest) is charged to its
messages, so the figure is an upper bound.

Larger meshes (10-200 nodes) use the deterministic simulation
(``kvmesh.simulation.mesh_world.measure_convergence``): the same MeshCore,
state and index code, on a simulated network (1-10 ms delays), with packet
loss and, when a real mesh was measured in the same run, the real nodes'
CPU per message charged to every simulated node for every message it
handles (one at a time: a busy node's messages wait).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from functools import partial

import aiohttp
import grpc

from kvmesh import procs
from kvmesh.benchmarks.cpu import cpu_s
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh.probes import Digest, index_digest, read_engine_digest
from kvmesh.stats import percentile
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

ENGINE = "e0"  # the one engine of the real-process mesh


async def _mesh_bytes(stubs: list[pb_grpc.AdminStub]) -> int:
    tot = 0
    for s in stubs:
        tot += (await s.GetStats(pb.GetStatsRequest())).mesh_bytes_sent
    return tot


async def _wait_engine_known(stubs: list[pb_grpc.AdminStub], timeout: float = 30.0) -> None:
    """Until every node knows the engine (its index digest lists the worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ds = [await s.GetIndexDigest(pb.GetIndexDigestRequest(engine_id=ENGINE)) for s in stubs]
            if all(d.workers for d in ds):
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)


async def _time_to_converge(stubs: list[pb_grpc.AdminStub], want: Digest, t0: float) -> float | None:
    """Seconds from ``t0`` until every node's digest equals ``want``; None after 10 s."""
    pending = set(range(len(stubs)))
    while pending and time.perf_counter() - t0 < 10.0:
        for i in list(pending):
            if await index_digest(stubs[i], ENGINE) == want:
                pending.discard(i)
        if not pending:
            return time.perf_counter() - t0
        await asyncio.sleep(0.005)
    return None


async def _mesh_messages(stubs: list[pb_grpc.AdminStub]) -> int:
    tot = 0
    for s in stubs:
        tot += (await s.GetStats(pb.GetStatsRequest())).mesh_messages_sent
    return tot


def _event_body(rng: random.Random) -> dict:
    prompt = [rng.randrange(256, 32000) for _ in range(16 * rng.randint(4, 40) + 3)]
    return {"model": procs.SIM_MODEL, "prompt": prompt, "max_tokens": 1}


async def _cost_window(
    stubs: list[pb_grpc.AdminStub], pids: list[int], url: str, rng: random.Random, seconds: float
) -> dict:
    """Events at the latency run's pace, nobody polling: the nodes' CPU per mesh message."""
    async with aiohttp.ClientSession() as http:
        m0, c0 = await _mesh_messages(stubs), sum(map(cpu_s, pids))
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            async with http.post(f"{url}/v1/completions", json=_event_body(rng)) as r:
                await r.read()
            n += 1
            await asyncio.sleep(rng.uniform(0.05, 0.3))
        await asyncio.sleep(1.0)  # the last events' gossip
        m1, c1 = await _mesh_messages(stubs), sum(map(cpu_s, pids))
    msgs = m1 - m0
    return {
        "cost_window_s": seconds,
        "cost_events": n,
        "mesh_messages": msgs,
        "node_cpu_s": c1 - c0,
        "cpu_per_message_s": (c1 - c0) / msgs if msgs else None,
    }


async def _measure_real(addrs: list[str], url: str, events: int, seed: int, pids: list[int]) -> dict:
    chans = [aio_channel(a, tls=False, config=ONE_NODE) for a in addrs]
    stubs = [pb_grpc.AdminStub(c) for c in chans]
    rng = random.Random(seed)
    lat: list[float] = []
    missing = 0
    try:
        async with aiohttp.ClientSession() as http:
            # Everyone knows the engine and agrees on its (empty or warm) cache first.
            await _wait_engine_known(stubs)
            idle_window = 3.0
            b0 = await _mesh_bytes(stubs)
            await asyncio.sleep(idle_window)
            background_per_s = (await _mesh_bytes(stubs) - b0) / idle_window
            b_start = await _mesh_bytes(stubs)
            t_start = time.monotonic()
            for _ in range(events):
                async with http.post(f"{url}/v1/completions", json=_event_body(rng)) as r:
                    await r.read()
                t0 = time.perf_counter()
                took = await _time_to_converge(stubs, await read_engine_digest(http, url), t0)
                if took is None:
                    missing += 1
                else:
                    lat.append(took)
                await asyncio.sleep(rng.uniform(0.05, 0.3))  # events land at random gossip phases
            span = time.monotonic() - t_start
            total = await _mesh_bytes(stubs) - b_start
        cost = await _cost_window(stubs, pids, url, rng, min(span, 6.0))
    finally:
        for c in chans:
            await c.close()
    return {
        "n": len(addrs),
        "events": events,
        "missing": missing,
        "p50": percentile(lat, 50) if lat else float("nan"),
        "p99": percentile(lat, 99) if lat else float("nan"),
        "max": max(lat) if lat else float("nan"),
        "bytes_per_event": max(0.0, (total - background_per_s * span) / max(1, events)),
        "background_bytes_per_s": background_per_s,
        **cost,
    }


def converge_real(n: int, events: int = 30, seed: int = 0) -> dict:
    engine = procs.start_sim_engine("conv-engine", ["--num-gpu-blocks", "4000", "--log-level", "warning"])
    nodes: list[procs.Proc] = []
    try:
        flag = procs.engine_flag(ENGINE, engine)
        nodes.append(procs.start_router("conv-n0", [flag], ["--log-level", "warning"]))
        join = ["--log-level", "warning", "--join", nodes[0].info["grpc"]]
        nodes += procs.start_all([partial(procs.start_router, f"conv-n{i}", [], join) for i in range(1, n)])
        return asyncio.run(
            _measure_real(
                [p.info["grpc"] for p in nodes],
                engine.info["url"],
                events,
                seed,
                [p.popen.pid for p in nodes],
            )
        )
    finally:
        for p in nodes:
            p.stop()
        engine.stop()


def converge_sim(
    n: int, events: int = 40, seed: int = 1, loss: float = 0.0, process_cost: float = 0.0
) -> dict:
    from kvmesh.simulation.mesh_world import measure_convergence

    return measure_convergence(
        n, seed=seed, events=events, loss=loss, process_cost=process_cost, background=loss == 0.0
    )


def process_cost(real: list[dict]) -> float:
    """The per-message CPU the simulation charges: the highest measured on a real mesh (0 without one)."""
    costs = [r["cpu_per_message_s"] for r in real if r.get("cpu_per_message_s")]
    return max(costs, default=0.0)


def run_convergence(
    real_sizes: list[int],
    sim_runs: list[tuple[int, float]],
    events: int,
    note: Callable[[str], None] = print,
    sim_events: int = 20,
) -> dict:
    """Real meshes of ``real_sizes`` nodes, then the simulated ``(nodes, loss)``
    runs: lossless ones as the simulation is (no CPU cost), lossy ones with the
    real nodes' CPU per message."""
    out: dict = {"real": [], "sim": []}
    for n in real_sizes:
        r = converge_real(n, events)
        cpm = r.get("cpu_per_message_s")
        note(
            f"convergence real n={n}: p50 {r['p50'] * 1000:.0f} ms p99 {r['p99'] * 1000:.0f} ms, "
            f"{r['bytes_per_event']:.0f} B/event"
            + (f", {cpm * 1e6:.0f} µs CPU per mesh message" if cpm else "")
        )
        out["real"].append(r)
    cost = process_cost(out["real"])
    out["sim_process_cost_s"] = cost
    for n, loss in sim_runs:
        r = converge_sim(n, sim_events, loss=loss, process_cost=cost if loss else 0.0)
        note(
            f"convergence sim n={n} loss {loss:.0%}: p50 {r['p50'] * 1000:.0f} ms "
            f"p99 {r['p99'] * 1000:.0f} ms, missing {r['missing']}"
        )
        out["sim"].append(r)
    return out
