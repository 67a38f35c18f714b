"""Cache tiers and block sizes through a real router process in front of
real simulated engines: blocks an engine moved to its host tier show in
``Route``'s decision and ``ListEngines`` per tier, and the engine really
loads what the route predicted from there; an engine whose events carry
another block size than it is registered with is refused, and says so in
``ListEngines`` and in the metrics."""

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
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

BS = 16
HINT_TTL_S = 2.0  # mesh.core.MeshConfig.hint_ttl: a route hint counts as GPU blocks this long


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256, 32000) for _ in range(n)]


def _route_request(prompt: list[int]) -> pb.RouteRequest:
    return pb.RouteRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prompt)), dry_run=True)


async def _engine_stats(url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/admin/stats") as r:
        assert r.status == 200
        return await r.json()


async def _until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


async def test_host_tier_blocks_show_in_route_and_list_engines_and_the_engine_loads_them() -> None:
    # A GPU pool of 40 blocks, a host tier of 400: a 20-block prompt is
    # evicted to the host tier by the three prompts after it.
    engine = procs.start_sim_engine("tiers-e0", ["--num-gpu-blocks", "40", "--num-host-blocks", "400"])
    router = procs.start_router("tiers-r", [procs.engine_flag("e0", engine)], ["--policy", "precise"])
    try:
        a = _tokens(1, 20 * BS)
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub, admin = pb_grpc.RouterStub(ch), pb_grpc.AdminStub(ch)
            first, _ = await generate_once(stub, a, 4)
            assert first.ok, first.error
            t_a = time.monotonic()
            for seed in (2, 3, 4):
                rec, _ = await generate_once(stub, _tokens(seed, 20 * BS), 4)
                assert rec.ok, rec.error
            stats = await _engine_stats(engine.info["url"])
            assert stats["host_cached_blocks"] >= 20, stats  # the engine did offload

            async def tiers() -> dict[str, int]:
                (e,) = (await admin.ListEngines(pb.ListEnginesRequest())).engines
                return dict(e.cached_blocks_by_tier) if e.cached_blocks_by_tier["host"] >= 20 else {}

            by_tier = await _until(tiers)
            assert by_tier and set(by_tier) == {"gpu", "host", "disk", "external"}, by_tier
            await asyncio.sleep(max(0.0, HINT_TTL_S + 0.2 - (time.monotonic() - t_a)))

            route = await stub.Route(_route_request(a))
            (c,) = route.decision.candidates
            assert c.chosen and c.host_blocks > 0, route
            assert c.overlap_blocks + c.host_blocks == 20 == route.prompt_blocks
            assert route.predicted_cached_blocks == 20  # every tier's blocks, the engine loads them
            assert "host" in route.decision.reason
            cli = subprocess.run(
                [sys.executable, "-m", "kvmesh.cli", "route", "--target", router.info["grpc"], "--insecure",
                 "--tokens", *map(str, a)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr
            assert f"+{c.host_blocks} host" in cli.stdout  # `kvmesh route` shows the tiers too

            before = await _engine_stats(engine.info["url"])
            again, _ = await generate_once(stub, a + _tokens(5, 8), 4)
            assert again.ok, again.error
            after = await _engine_stats(engine.info["url"])
            loaded = after["host_hit_tokens"] - before["host_hit_tokens"]
            assert loaded == c.host_blocks * BS  # what the route predicted from the host tier ...
            assert again.cached_tokens == 20 * BS  # ... and the whole prefix cached, GPU and host
    finally:
        router.stop()
        engine.stop()


async def test_an_engine_of_another_block_size_is_refused_and_reported() -> None:
    engine = procs.start_sim_engine("bs4-e0", ["--block-size", "4"])  # the router hashes 16-token blocks
    router = procs.start_router(
        "bs-r", [procs.engine_flag("e4", engine, block_size=BS)], ["--metrics-listen", "127.0.0.1:0"]
    )
    try:
        prompt = _tokens(7, 10 * BS)
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub, admin = pb_grpc.RouterStub(ch), pb_grpc.AdminStub(ch)
            rec, _ = await generate_once(stub, prompt, 4)
            assert rec.ok, rec.error

            async def refused() -> pb.EngineStatus | None:
                (e,) = (await admin.ListEngines(pb.ListEnginesRequest())).engines
                return e if e.event_block_size_mismatch else None

            e = await _until(refused)
            assert e is not None, "the mismatch never showed in ListEngines"
            assert e.event_block_size_mismatch == 4 and e.cached_blocks == 0
            assert e.events_refused == (
                "block size mismatch: the engine's KV events carry blocks of 4 tokens, "
                "it is registered with block_size 16"
            )
            assert e.skipped_events >= 1
        async with aiohttp.ClientSession() as http, http.get(f"http://{router.info['metrics']}/metrics") as r:
            text = await r.text()
        assert 'kvmesh_engine_block_size_mismatch{engine="e4"} 4.0' in text
        assert "adapter.block_size_mismatch" in router.tail(200)
        status = subprocess.run(
            [sys.executable, "-m", "kvmesh.cli", "status", "--target", router.info["grpc"], "--insecure"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "! e4: block size mismatch: the engine's KV events carry blocks of 4 tokens" in status.stdout
    finally:
        router.stop()
        engine.stop()
