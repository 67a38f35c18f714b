"""A mixed mesh on loopback: router nodes on the native hot path (decoder,
mapper and index in Rust) and on the pure-Python fallback
(``KVMESH_PURE_PYTHON=1``) in one mesh, with simulated engines publishing KV
events. Nothing on the wire depends on the implementation (the replicated log's
entries, gossip, gRPC), so every node must hold the same index, equal to each
engine's cache, and route a prompt to the engine holding its prefix, whichever
kind of node owns the engine and whichever kind answers."""

from __future__ import annotations

import random
from collections.abc import Awaitable
from typing import Any

import aiohttp
import pytest

from kvmesh import procs
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh.probes import engine_digest
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from mesh.ownership import owner_of
from router.native_index import NATIVE_INDEX_BUILT
from tests.eventually import eventually

pytestmark = pytest.mark.slow
MODEL = "sim-model"
FAST_MESH = ["--probe-interval", "0.5", "--gossip-interval", "0.1", "--health-interval", "0.5", "--seed", "7"]
# Node id -> whether it runs the pure-Python fallback.
NODES = {"node-a": False, "node-b": True, "node-c": False}
PREFIX_BLOCKS = 60  # of 16 tokens
PROMPTS_PER_ENGINE = 8  # more than its cache holds: the engines evict (remove events) too


def _engine_ids() -> list[str]:
    """Two engine ids, one owned by a Python node and one by a native node
    (rendezvous over the three node ids), so both kinds own and replicate."""
    nodes = sorted(NODES)
    by_kind: dict[bool, str] = {}
    for i in range(1000):
        eid = f"e{i}"
        by_kind.setdefault(NODES[owner_of(eid, nodes)], eid)
        if len(by_kind) == 2:
            return [by_kind[True], by_kind[False]]
    raise AssertionError("no engine id found for each kind of node")


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256, 32000) for _ in range(n)]


async def _admin(addr: str, call: str, req: Any) -> Any:
    async with aio_channel(addr, tls=False, config=ONE_NODE) as ch:
        return await getattr(pb_grpc.AdminStub(ch), call)(req)


async def _digest(addr: str, engine_id: str) -> tuple[int, int]:
    d = await _admin(addr, "GetIndexDigest", pb.GetIndexDigestRequest(engine_id=engine_id))
    return d.workers[0].blocks, d.workers[0].xor_hashes


async def _engine_digest(url: str) -> tuple[int, int]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/admin/cache") as r:
        return engine_digest(await r.json())


@pytest.fixture
def mixed_mesh():
    if not NATIVE_INDEX_BUILT:
        pytest.skip(
            "NATIVE PATH NOT TESTED: the native module is not built (`make install` builds it where cargo is)"
        )
    eids = _engine_ids()
    started: list[procs.Proc] = []
    try:
        engines = {}
        for i, eid in enumerate(eids):
            engines[eid] = procs.start_sim_engine(f"mx-{eid}", ["--num-gpu-blocks", "300", "--seed", str(i)])
            started.append(engines[eid])
        flags = [procs.engine_flag(eid, p) for eid, p in engines.items()]
        nodes: dict[str, procs.Proc] = {}
        for name, pure in NODES.items():
            args = ["router", "--listen", f"127.0.0.1:{procs.free_port()}", "--node-id", name, "--insecure"]
            if not nodes:
                args += [a for f in flags for a in ("--engine", f)]
            else:
                args += ["--join", next(iter(nodes.values())).info["grpc"]]
            nodes[name] = procs.start(
                name, args + FAST_MESH, env={"KVMESH_PURE_PYTHON": "1" if pure else "0"}
            )
            started.append(nodes[name])
        yield engines, nodes
    finally:
        for p in started:
            p.kill()


async def test_native_and_python_nodes_converge_and_route_alike(mixed_mesh):
    engines, nodes = mixed_mesh
    # Each node runs the implementation it was started with (its READY line says which).
    for name, p in nodes.items():
        want = "python" if NODES[name] else "native"
        assert (p.info.get("index"), p.info.get("decode")) == (want, want), (name, p.info)

    async def alive(addr: str) -> bool:
        resp = await _admin(addr, "ListMembers", pb.ListMembersRequest())
        return sum(m.state == "alive" for m in resp.members) == len(NODES)

    async def owners(addr: str) -> dict[str, str]:
        resp = await _admin(addr, "ListEngines", pb.ListEnginesRequest())
        return {e.spec.engine_id: e.owner_node for e in resp.engines}

    want_owner = {eid: owner_of(eid, sorted(NODES)) for eid in engines}
    for p in nodes.values():
        await eventually(lambda p=p: alive(p.info["grpc"]), 15, f"{p.name}: 3 live members")
        await eventually(
            lambda p=p: _is(owners(p.info["grpc"]), want_owner), 15, f"{p.name}: the rendezvous owners"
        )
    # Both kinds own an engine: native entries reach a Python index and the reverse.
    assert {NODES[o] for o in want_owner.values()} == {True, False}

    # Engines publish stores (and, past their 300 blocks, evictions).
    last_prompt: dict[str, list[int]] = {}
    async with aiohttp.ClientSession() as http:
        for k in range(PROMPTS_PER_ENGINE):
            for j, (eid, eng) in enumerate(engines.items()):
                prompt = _tokens(1000 * j + k, PREFIX_BLOCKS * 16)
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
                async with http.post(f"{eng.info['url']}/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                last_prompt[eid] = prompt

    # Converged: every node's index of every engine equals the engine's cache.
    for eid, eng in engines.items():
        url = eng.info["url"]
        truth = await _engine_digest(url)
        assert truth[0] >= PREFIX_BLOCKS, truth
        for p in nodes.values():

            async def same(addr: str = p.info["grpc"], eid: str = eid, url: str = url) -> bool:
                return await _digest(addr, eid) == await _engine_digest(url)

            await eventually(same, 15, f"{p.name}'s index of {eid} to equal the engine's cache")
    stats = [await _admin(p.info["grpc"], "GetStats", pb.GetStatsRequest()) for p in nodes.values()]
    assert len({(s.index_entries, s.index_blocks) for s in stats}) == 1, [
        (s.node_id, s.index_entries, s.index_blocks) for s in stats
    ]

    # Every node, native or Python, routes each engine's last prompt (plus a new tail) to that engine.
    for eid, prompt in last_prompt.items():
        for p in nodes.values():
            async with aio_channel(p.info["grpc"], tls=False, config=ONE_NODE) as ch:
                route = await pb_grpc.RouterStub(ch).Route(
                    pb.RouteRequest(
                        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prompt + _tokens(7, 40))), dry_run=True
                    )
                )
            assert route.engine_id == eid, (p.name, eid, route)
            assert route.predicted_cached_blocks >= PREFIX_BLOCKS, (p.name, eid, route)


async def _is(got: Awaitable[Any], want: Any) -> bool:
    return bool(await got == want)
