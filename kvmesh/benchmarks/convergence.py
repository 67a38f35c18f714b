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

Larger meshes (10-200 nodes) use the deterministic simulation
(``kvmesh.simulation.mesh_world.measure_convergence``): the same MeshCore,
state and index code, on a simulated network (1-10 ms delays).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import aiohttp
import grpc

from kvmesh import procs
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


async def _measure_real(addrs: list[str], url: str, events: int, seed: int) -> dict:
    chans = [grpc.aio.insecure_channel(a) for a in addrs]
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
                prompt = [rng.randrange(256, 32000) for _ in range(16 * rng.randint(4, 40) + 3)]
                body = {"model": procs.SIM_MODEL, "prompt": prompt, "max_tokens": 1}
                async with http.post(f"{url}/v1/completions", json=body) as r:
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
    }


def converge_real(n: int, events: int = 30, seed: int = 0) -> dict:
    engine = procs.start_sim_engine("conv-engine", ["--num-gpu-blocks", "4000", "--log-level", "warning"])
    nodes: list[procs.Proc] = []
    try:
        flag = procs.engine_flag(ENGINE, engine)
        nodes.append(procs.start_router("conv-n0", [flag], ["--log-level", "warning"]))
        seed_addr = nodes[0].info["grpc"]
        for i in range(1, n):
            nodes.append(
                procs.start_router(f"conv-n{i}", [], ["--log-level", "warning", "--join", seed_addr])
            )
        return asyncio.run(_measure_real([p.info["grpc"] for p in nodes], engine.info["url"], events, seed))
    finally:
        for p in nodes:
            p.stop()
        engine.stop()


def converge_sim(n: int, events: int = 40, seed: int = 1) -> dict:
    from kvmesh.simulation.mesh_world import measure_convergence

    return measure_convergence(n, seed=seed, events=events)


def run_convergence(
    real_sizes: list[int], sim_sizes: list[int], events: int, note: Callable[[str], None] = print
) -> dict:
    out: dict = {"real": [], "sim": []}
    for n in real_sizes:
        r = converge_real(n, events)
        note(
            f"convergence real n={n}: p50 {r['p50'] * 1000:.0f} ms p99 {r['p99'] * 1000:.0f} ms, "
            f"{r['bytes_per_event']:.0f} B/event"
        )
        out["real"].append(r)
    for n in sim_sizes:
        r = converge_sim(n, max(20, events))
        note(f"convergence sim n={n}: p50 {r['p50'] * 1000:.0f} ms p99 {r['p99'] * 1000:.0f} ms")
        out["sim"].append(r)
    return out
