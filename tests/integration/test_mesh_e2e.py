"""Multi-process mesh on loopback: real router nodes gossiping over gRPC, real
simulated engines publishing KV events over ZMQ."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time

import aiohttp
import pytest

from kvmesh import procs
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh.loadgen import generate_once
from kvmesh.probes import engine_digest
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from tests.eventually import eventually

pytestmark = pytest.mark.slow
MODEL = "sim-model"
# Every node gets the same --seed on purpose: it seeds policy choices only and
# must never make two nodes share pycrdt client ids.
FAST_MESH = ["--probe-interval", "0.5", "--gossip-interval", "0.1", "--health-interval", "0.5", "--seed", "7"]


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256, 32000) for _ in range(n)]


async def _digest(addr: str, engine_id: str) -> tuple[int, int]:
    async with aio_channel(addr, tls=False, config=ONE_NODE) as ch:
        d = await pb_grpc.AdminStub(ch).GetIndexDigest(pb.GetIndexDigestRequest(engine_id=engine_id))
    w = d.workers[0]
    return w.blocks, w.xor_hashes


async def _engine_digest(url: str) -> tuple[int, int]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/admin/cache") as r:
        return engine_digest(await r.json())


async def _engines(addr: str) -> dict[str, pb.EngineStatus]:
    async with aio_channel(addr, tls=False, config=ONE_NODE) as ch:
        resp = await pb_grpc.AdminStub(ch).ListEngines(pb.ListEnginesRequest())
    return {e.spec.engine_id: e for e in resp.engines}


@pytest.fixture
def cluster():
    engines = [
        procs.start_sim_engine(f"me{i}", ["--num-gpu-blocks", "3000", "--seed", str(i)]) for i in range(4)
    ]
    flags = [procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)]
    nodes = [procs.start_router("node-a", flags, FAST_MESH)]
    seed = nodes[0].info["grpc"]
    for name in ("node-b", "node-c"):
        nodes.append(procs.start_router(name, [], [*FAST_MESH, "--join", seed]))
    yield engines, nodes
    for p in nodes + engines:
        p.kill()


async def _all_alive(addr: str, n: int = 3) -> bool:
    async with aio_channel(addr, tls=False, config=ONE_NODE) as ch:
        resp = await pb_grpc.AdminStub(ch).ListMembers(pb.ListMembersRequest())
    return sum(m.state == "alive" for m in resp.members) == n


async def test_continuation_on_another_node_lands_on_the_same_engine(cluster):
    engines, nodes = cluster
    a, c = nodes[0].info["grpc"], nodes[2].info["grpc"]
    # Every node learned the engines registered on node A.
    for n in nodes:
        engs = await eventually(lambda n=n: _engines(n.info["grpc"]), 5, "engine registry")
        assert set(engs) == {"e0", "e1", "e2", "e3"}
        await eventually(lambda n=n: _all_alive(n.info["grpc"]), 10, "3 live members")
    prefix = _tokens(1, 1600)  # 100 blocks
    async with (
        aio_channel(a, tls=False, config=ONE_NODE) as ch_a,
        aio_channel(c, tls=False, config=ONE_NODE) as ch_c,
    ):
        first, answer = await generate_once(pb_grpc.RouterStub(ch_a), prefix + _tokens(2, 40), 8)
        assert first.ok, first.error
        eid = first.engine_id
        url = engines[int(eid[1])].info["url"]
        want = await _engine_digest(url)
        assert want[0] >= 100
        # Converged: node C's index holds exactly the engine's cache.
        await eventually(lambda: _match(c, eid, url), 5, "node C's index")
        # ... and its view of the fleet's load: A's request is over.
        await eventually(lambda: _idle(c), 5, "node C to see no request in flight")
        cont = prefix + _tokens(2, 40) + answer + _tokens(3, 30)
        route = await pb_grpc.RouterStub(ch_c).Route(
            pb.RouteRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=cont)), dry_run=True)
        )
        assert route.engine_id == eid and route.predicted_cached_blocks >= 100, route
        second, _ = await generate_once(pb_grpc.RouterStub(ch_c), cont, 8)
        assert second.ok, second.error
        assert second.engine_id == eid
        assert second.cached_tokens >= 1600


async def _idle(addr: str) -> bool:
    return all(e.in_flight == 0 for e in (await _engines(addr)).values())


async def _match(addr: str, engine_id: str, url: str) -> bool:
    return await _digest(addr, engine_id) == await _engine_digest(url)


async def test_owner_killed_while_engine_emits_events_hands_over_without_loss(cluster):
    engines, nodes = cluster
    by_id = {p.info["node"]: p for p in nodes}
    a = nodes[0].info["grpc"]
    await eventually(lambda: _all_alive(a), 10, "3 live members")
    status = await eventually(lambda: _engines(a), 5, "engines")
    owner = status["e1"].owner_node
    assert owner in by_id, (owner, list(by_id))
    url = engines[1].info["url"]
    survivors = [p.info["grpc"] for nid, p in by_id.items() if nid != owner]
    stop = asyncio.Event()

    async def traffic() -> None:
        async with aiohttp.ClientSession() as http:
            i = 0
            while not stop.is_set() and i < 400:
                body = {"model": MODEL, "prompt": _tokens(100 + i, 160), "max_tokens": 4}
                async with http.post(f"{url}/v1/completions", json=body) as r:
                    assert r.status == 200
                i += 1

    load = asyncio.create_task(traffic())
    await asyncio.sleep(1.0)
    by_id[owner].kill()  # SIGKILL: no graceful hand-over
    await asyncio.sleep(1.5)
    stop.set()
    await load
    # A survivor owns e1 now, and every survivor's index equals the engine's cache.
    new_owner = await eventually(lambda: _new_owner(survivors[0], owner), 15, "a new owner for e1")
    assert new_owner in by_id and new_owner != owner
    for s in survivors:
        await eventually(lambda s=s: _match(s, "e1", url), 10, f"index of {s} to equal the engine cache")
    async with aiohttp.ClientSession() as http, http.get(f"{url}/admin/stats") as r:
        next_seq = (await r.json())["next_seq"]
    for s in survivors:
        st = (await _engines(s))["e1"]
        # Resume point = the engine's last published batch: nothing skipped.
        assert st.worker_seqs["e1"] == next_seq - 1, (s, dict(st.worker_seqs), next_seq)


async def _new_owner(addr: str, old: str) -> str | None:
    st = (await _engines(addr))["e1"]
    return st.owner_node if st.owner_node and st.owner_node != old else None


async def test_a_joining_node_routes_correctly_once_ready(cluster):
    engines, nodes = cluster
    a = nodes[0].info["grpc"]
    prefix = _tokens(7, 960)
    async with aio_channel(a, tls=False, config=ONE_NODE) as ch:
        first, _ = await generate_once(pb_grpc.RouterStub(ch), prefix + _tokens(8, 20), 4)
    assert first.ok
    url = engines[int(first.engine_id[1])].info["url"]
    await eventually(lambda: _match(a, first.engine_id, url), 5, "node A converged")
    d = procs.start_router("node-d", [], [*FAST_MESH, "--join", nodes[1].info["grpc"]])
    try:
        # READY is printed only after the full state arrived: route at once.
        async with aio_channel(d.info["grpc"], tls=False, config=ONE_NODE) as ch:
            route = await pb_grpc.RouterStub(ch).Route(
                pb.RouteRequest(
                    prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prefix + _tokens(9, 30))), dry_run=True
                )
            )
        assert route.engine_id == first.engine_id
        assert route.predicted_cached_blocks >= 60
    finally:
        d.kill()


async def test_a_second_node_with_a_taken_node_id_stops_and_the_mesh_keeps_the_first(cluster):
    _, nodes = cluster
    a, b = nodes[0].info["grpc"], nodes[1].info["grpc"]
    await eventually(lambda: _all_alive(a), 10, "the mesh formed")
    args = ["router", "--insecure", "--listen", f"127.0.0.1:{procs.free_port()}", "--node-id", "node-b",
            "--join", a, *FAST_MESH]  # fmt: skip
    t0 = time.monotonic()
    dup = subprocess.run(
        [sys.executable, "-m", "kvmesh.cli", *args], capture_output=True, text=True, timeout=60
    )
    # it stops within a few of its probe cycles (it may have served meanwhile)
    assert dup.returncode != 0 and time.monotonic() - t0 < 30
    assert "node id 'node-b' is in use by a live member at" in dup.stderr

    # node-b is node-b again, at its own address, for every node
    async def b_is_b() -> bool:
        async with aio_channel(a, tls=False, config=ONE_NODE) as ch:
            resp = await pb_grpc.AdminStub(ch).ListMembers(pb.ListMembersRequest())
        return any(m.node_id == "node-b" and m.addr == b and m.state == "alive" for m in resp.members)

    await eventually(b_is_b, 10, "node-b back at its address")
    assert await _all_alive(a) and await _all_alive(b)
