"""Two router nodes that each found only themselves behind the seed name form
two meshes; once the name resolves to both, they merge (membership and state).

In one process on loopback: two real ``RouterNode``s served over gRPC
(``router.service.serve``), both given the same simulated engine (a real
process publishing KV events over ZMQ), so each mesh registers it, takes
ownership and writes the engine's log in its own epoch. The seed name is
resolved by a resolver the test controls, handed to the node's real seed
refresher (``MeshShell.refresh_seeds``): "only yourself" first, then both.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from engine_adapters.sim_engine.cache import snapshot_router_hashes
from kvmesh import procs
from mesh.core import MeshConfig
from mesh.membership import MembershipConfig
from router.config import RouterConfig
from router.engine_registry import EngineSpec
from router.node import RouterNode
from router.service import serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
MODEL = "sim-model"
SEED_NAME = "routers.test:1"
RETRY = 0.2  # seed_resolve_retry while a node has no peer


async def _eventually(pred: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Seconds until ``pred()`` holds; fails after ``timeout``."""
    t0 = time.monotonic()
    while not await pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def _traffic(http: aiohttp.ClientSession, url: str, rng: random.Random, n: int) -> None:
    for _ in range(n):
        body = {"model": MODEL, "prompt": [rng.randrange(256, 32000) for _ in range(96)], "max_tokens": 4}
        async with http.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()


async def test_two_nodes_that_started_alone_merge_membership_and_state() -> None:
    eng = procs.start_sim_engine("merge-engine", ["--num-gpu-blocks", "600", "--seed", "8"])
    spec = EngineSpec.parse(procs.engine_flag("e0", eng))
    mesh = MeshConfig(
        membership=MembershipConfig(probe_interval=0.5, probe_timeout=0.25, gossip_interval=0.1)
    )
    addrs = [f"127.0.0.1:{procs.free_port()}" for _ in range(2)]
    nodes = [
        RouterNode(
            RouterConfig(
                listen=a, advertise=a, node_id=f"n{i}", engines=[spec], mesh=mesh, health_interval=0.5
            )
        )
        for i, a in enumerate(addrs)
    ]
    name_has_both = False

    async def resolve(names: list[str], me: str) -> list[str]:
        assert names == [SEED_NAME]
        return [a for a in addrs if a != me] if name_has_both else []

    stops = [asyncio.Event() for _ in nodes]
    tasks = [asyncio.create_task(serve(n, s)) for n, s in zip(nodes, stops)]
    tasks += [asyncio.create_task(n.mesh.refresh_seeds([SEED_NAME], RETRY, 30.0, resolve)) for n in nodes]
    url = eng.info["url"]
    rng = random.Random(3)

    async def cache() -> set[int]:
        async with http.get(f"{url}/admin/cache") as r:
            return snapshot_router_hashes(await r.json(), MODEL)

    async def next_seq() -> int:
        async with http.get(f"{url}/admin/stats") as r:
            return int((await r.json())["next_seq"])

    async def converged(group: list[RouterNode]) -> bool:
        want, seq = await cache(), await next_seq()
        return all(
            n.index.worker_hashes("e0") == want and n.core.resume_seqs("e0") == {"e0": seq} for n in group
        )

    async def ready() -> bool:
        return all(n.ready and "e0" in n.core.engines() for n in nodes)

    async def one_member_list() -> bool:
        return all(len(n.core.live_members()) == 2 for n in nodes)

    async def one_owner() -> bool:
        owners = [n for n in nodes if "e0" in n.core.owned()]
        epochs = {n.core.state.epoch("e0") for n in nodes}
        return len(owners) == 1 and len(epochs) == 1

    try:
        async with aiohttp.ClientSession() as http:
            await _eventually(ready, 15, "both nodes ready")
            # Two meshes of one, each owning the engine and writing its log.
            for n in nodes:
                assert [m.node for m in n.core.live_members()] == [n.node_id]
            await _traffic(http, url, rng, 8)
            for n in nodes:
                await _eventually(lambda n=n: converged([n]), 10, f"{n.node_id} alone to follow e0")
                assert n.core.owned() == {"e0"}
            epochs = {n.core.state.epoch("e0") for n in nodes}
            assert len(epochs) == 2, epochs

            name_has_both = True
            t0 = time.monotonic()
            await _eventually(one_member_list, 10, "one member list")
            t_members = time.monotonic() - t0
            load = asyncio.create_task(_traffic(http, url, rng, 12))  # events keep coming meanwhile
            await _eventually(one_owner, 15, "one owner and one epoch of e0")
            t_owner = time.monotonic() - t0
            await load
            await _eventually(lambda: converged(nodes), 15, "both indexes equal to the engine's cache")
            t_state = time.monotonic() - t0
            winner = nodes[0].core.owner_of("e0")
            assert [n.node_id for n in nodes if "e0" in n.core.owned()] == [winner]
            print(
                f"merge after the name resolved to both: one member list {t_members:.2f} s, one owner "
                f"and epoch {t_owner:.2f} s, every index equal to the engine's cache {t_state:.2f} s "
                "(with events flowing in between)"
            )
    finally:
        for s in stops:
            s.set()
        for t in tasks[len(nodes) :]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        eng.stop()
