"""Event-gap test against a real simulated engine process: published batches
are dropped on the wire, the adapter replays them, and the router's index ends
up equal to the engine's real cache (read from the engine's /admin/cache)."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest

from engine_adapters.event_adapter import EventAdapter
from engine_adapters.sim_engine.cache import snapshot_router_hashes
from kvmesh import procs
from router.index import PrefixIndex

pytestmark = pytest.mark.slow
MODEL = "sim-model"


async def _complete(http: aiohttp.ClientSession, url: str, prompt: list[int]) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 20, "ignore_eos": True}
    async with http.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()


async def _converged(
    index: PrefixIndex, http: aiohttp.ClientSession, url: str, timeout: float = 10.0
) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(f"{url}/admin/cache") as r:
            expected = snapshot_router_hashes(await r.json(), MODEL)
        if index.worker_hashes("e0") == expected or time.monotonic() > deadline:
            return expected
        await asyncio.sleep(0.1)


async def test_dropped_batches_are_replayed_and_index_matches_engine_cache():
    # A small cache so evictions (BlockRemoved) are part of what gets dropped.
    eng = procs.start_sim_engine("gap-engine", ["--num-gpu-blocks", "120", "--seed", "3"])
    index = PrefixIndex()
    adapter = EventAdapter(
        "e0", MODEL, eng.info["kv_endpoint"], eng.info["replay_endpoint"], sink=index.apply
    )
    rng = random.Random(5)
    shared = [rng.randrange(256, 32000) for _ in range(320)]
    try:
        await adapter.start()
        await adapter.wait_ready(10)
        async with aiohttp.ClientSession() as http:
            url = eng.info["url"]
            for _ in range(6):
                await _complete(http, url, shared + [rng.randrange(256, 32000) for _ in range(64)])
            expected = await _converged(index, http, url)
            assert expected and index.worker_hashes("e0") == expected

            # Lose the next batches on the wire (they stay in the replay buffer).
            async with http.post(f"{url}/admin/drop_events", json={"count": 5}) as r:
                assert r.status == 200
            for _ in range(12):
                await _complete(http, url, [rng.randrange(256, 32000) for _ in range(200)])
            expected = await _converged(index, http, url)
            stats = adapter.stats()
            assert stats["gaps"] >= 1 and stats["gaps_replayed"] >= 1, stats
            assert stats["resets"] == 0, stats
            assert index.worker_hashes("e0") == expected
            assert len(expected) > 50
    finally:
        await adapter.stop()
        eng.stop()
