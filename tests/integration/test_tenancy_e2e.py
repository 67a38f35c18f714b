"""Tenants and LoRA adapters end to end: a real router process in front of a
real simulated engine (which keys its prefix cache by adapter and salt and
publishes them as vLLM 0.33 does). Tenant B is never predicted nor served
tenant A's salted blocks, A gets its own back, and a LoRA request is served
by the adapter, apart from the base model's blocks."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import pytest

from kvmesh import procs
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

PROMPT_BLOCKS = 50
BS = 16
ADAPTER = "sql-lora"


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256, 32000) for _ in range(n)]


async def _generate(stub: pb_grpc.RouterStub, ids: list[int], **tenancy: str) -> pb.Finished:
    req = pb.GenerateRequest(
        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids)),
        sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True),
        **tenancy,
    )
    fin = None
    async for msg in stub.Generate(req, timeout=60):
        if msg.WhichOneof("event") == "finished":
            fin = msg.finished
    assert fin is not None and fin.finish_reason == "length", fin
    return fin


async def _predicted(stub: pb_grpc.RouterStub, ids: list[int], **tenancy: str) -> int:
    route = await stub.Route(
        pb.RouteRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids)), dry_run=True, **tenancy)
    )
    overlaps = {c.overlap_blocks for c in route.decision.candidates}
    assert overlaps == {route.predicted_cached_blocks}, route  # one engine: its overlap is the prediction
    return route.predicted_cached_blocks


async def _wait_index(admin: pb_grpc.AdminStub, entries: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (await admin.GetStats(pb.GetStatsRequest())).index_entries < entries:
        assert time.monotonic() < deadline, f"router index never reached {entries} entries"
        await asyncio.sleep(0.05)


async def _engine_stats(engine: procs.Proc) -> Any:
    async with aiohttp.ClientSession() as http, http.get(f"{engine.info['url']}/admin/stats") as r:
        assert r.status == 200
        return await r.json()


async def test_tenants_and_adapters_never_share_cached_blocks() -> None:
    engine = procs.start_sim_engine(
        "tenancy-e0", ["--num-gpu-blocks", "2000", "--lora-modules", ADAPTER, "--time-scale", "0.05"]
    )
    router = procs.start_router(
        "tenancy-router",
        [procs.engine_flag("e0", engine)],
        ["--policy", "precise", "--health-interval", "0.5"],
    )
    try:
        prefix = _tokens(1, PROMPT_BLOCKS * BS)
        prompt = prefix + _tokens(2, 10)
        full = PROMPT_BLOCKS * BS
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub, admin = pb_grpc.RouterStub(ch), pb_grpc.AdminStub(ch)

            first = await _generate(stub, prompt, cache_salt="tenant-a")
            assert first.cached_prompt_tokens == 0
            await _wait_index(admin, PROMPT_BLOCKS)
            assert await _predicted(stub, prompt, cache_salt="tenant-a") >= PROMPT_BLOCKS

            # Tenant B, an unsalted request and the adapter: nothing of A's is predicted...
            assert await _predicted(stub, prompt, cache_salt="tenant-b") == 0
            assert await _predicted(stub, prompt) == 0
            assert await _predicted(stub, prompt, lora_name=ADAPTER) == 0
            assert await _predicted(stub, prompt, lora_name=ADAPTER, cache_salt="tenant-a") == 0
            # ... nor served: the engine computes their whole prompt.
            assert (await _generate(stub, prompt, cache_salt="tenant-b")).cached_prompt_tokens == 0
            assert (await _generate(stub, prompt)).cached_prompt_tokens == 0

            # A's second request gets its own cached prefix back.
            again = await _generate(stub, prefix + _tokens(3, 20), cache_salt="tenant-a")
            assert again.cached_prompt_tokens >= full

            # A LoRA request is served by the adapter, apart from the base model's blocks.
            lora = await _generate(stub, prompt, lora_name=ADAPTER)
            assert lora.cached_prompt_tokens == 0
            await _wait_index(admin, 4 * PROMPT_BLOCKS)  # A's, B's, the base model's, the adapter's
            assert await _predicted(stub, prompt, lora_name=ADAPTER) >= PROMPT_BLOCKS
            lora_again = await _generate(stub, prefix + _tokens(4, 20), lora_name=ADAPTER)
            assert lora_again.cached_prompt_tokens >= full
            stats = await _engine_stats(engine)
            assert stats["served"] == {"sim-model": 4, ADAPTER: 2}
    finally:
        router.stop()
        engine.stop()
