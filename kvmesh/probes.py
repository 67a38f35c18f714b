"""Probes of a running fleet, shared by the benchmarks and the multi-process
tests: what a simulated engine's KV cache holds, what a router node's
index holds for that engine, and whether a mesh has formed.

Both sides are reduced to the same digest, ``(blocks, XOR of router hashes)``
(:func:`blocks.hashing.xor_digest`): equal digests mean the node's index holds
exactly the engine's cache (up to an XOR collision), so "the mesh converged"
is "every node's digest equals the engine's". The engine side needs
``GET /admin/cache``, which only the simulated engine (``kvmesh sim-engine``)
serves; the node side is ``Admin.GetIndexDigest``.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from blocks.hashing import xor_digest
from engine_adapters.sim_engine.cache import snapshot_router_hashes
from kvmesh.client import ONE_NODE, AsyncClient
from kvmesh.procs import SIM_MODEL
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

__all__ = ["Digest", "engine_digest", "index_digest", "read_engine_digest", "wait_mesh"]

Digest = tuple[int, int]  # (blocks, XOR of their router hashes)


def engine_digest(snapshot: list[dict[str, object]], model: str = SIM_MODEL) -> Digest:
    """Digest of an engine's cache snapshot (the JSON of its ``GET /admin/cache``)."""
    return xor_digest(snapshot_router_hashes(snapshot, model))


async def read_engine_digest(http: aiohttp.ClientSession, url: str, model: str = SIM_MODEL) -> Digest:
    """Digest of what the simulated engine at ``url`` (``http://host:port``) caches."""
    async with http.get(f"{url}/admin/cache") as r:
        return engine_digest(await r.json(), model)


async def index_digest(admin: pb_grpc.AdminStub, engine_id: str) -> Digest | None:
    """Digest of what a router node's index holds for ``engine_id`` (its first
    data-parallel worker); None while the node does not know the engine."""
    d = await admin.GetIndexDigest(pb.GetIndexDigestRequest(engine_id=engine_id))
    if not d.workers:
        return None
    w = d.workers[0]
    return w.blocks, w.xor_hashes


async def wait_mesh(addrs: list[str], n_engines: int, timeout: float = 30.0) -> None:
    """Every node sees every member alive and every engine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        good = 0
        for a in addrs:
            async with AsyncClient(a, tls=False, config=ONE_NODE) as node:
                m = await node.list_members()
                e = await node.list_engines()
            if sum(x.state == "alive" for x in m) == len(addrs) and len(e) == n_engines:
                good += 1
        if good == len(addrs):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the 3-node mesh did not converge on members and engines")
