"""Event-gap tests against a real simulated engine process: published batches
are dropped on the wire, the adapter replays them (a gap revealed by the next
batch, or a probe of a quiet engine), and the router's index ends up equal to
the engine's real cache (read from the engine's /admin/cache)."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest

from engine_adapters.event_adapter import EventAdapter, EventAdapterConfig
from engine_adapters.sim_engine.cache import snapshot_router_hashes
from engine_adapters.sim_engine.config import DEFAULTS
from kvmesh import procs
from router.index import PrefixIndex

pytestmark = pytest.mark.slow
MODEL = "sim-model"
BS = DEFAULTS.block_size  # the engines are started with their default block size


async def _complete(http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int = 20) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    async with http.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()


async def _next_seq(http: aiohttp.ClientSession, url: str) -> int:
    """The sequence number the engine's next KV-event batch will get."""
    async with http.get(f"{url}/admin/stats") as r:
        return int((await r.json())["next_seq"])


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
        "e0", MODEL, eng.info["kv_endpoint"], eng.info["replay_endpoint"], sink=index.apply, block_size=BS
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


async def _index_equals_engine(
    index: PrefixIndex, http: aiohttp.ClientSession, url: str, timeout: float
) -> float | None:
    """Seconds until the index equals the engine's cache (None: not within ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        async with http.get(f"{url}/admin/cache") as r:
            expected = snapshot_router_hashes(await r.json(), MODEL)
        if index.worker_hashes("e0") == expected:
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    return None


async def test_lost_last_batches_of_a_quiet_engine_are_probed_in() -> None:
    """vLLM sends no heartbeat: a batch lost right before the engine goes quiet
    is found only by a probe of the replay socket (``replay_probe_after``,
    default config). The costly case: a lost final AllBlocksCleared, which
    would leave every cleared block indexed."""
    eng = procs.start_sim_engine("probe-engine", ["--num-gpu-blocks", "400", "--seed", "4"])
    index = PrefixIndex()
    cfg = EventAdapterConfig()
    adapter = EventAdapter(
        "e0",
        MODEL,
        eng.info["kv_endpoint"],
        eng.info["replay_endpoint"],
        sink=index.apply,
        config=cfg,
        block_size=BS,
    )
    rng = random.Random(6)
    bound = cfg.replay_probe_after + cfg.replay_timeout + 1.0
    try:
        await adapter.start()
        await adapter.wait_ready(10)
        async with aiohttp.ClientSession() as http:
            url = eng.info["url"]
            for _ in range(4):
                await _complete(http, url, [rng.randrange(256, 32000) for _ in range(160)])
            await _converged(index, http, url)
            assert len(index.worker_hashes("e0")) > 20

            # Every batch of the last completion is lost; nothing follows them.
            before = adapter.stats()
            drop = 3
            first = await _next_seq(http, url)
            async with http.post(f"{url}/admin/drop_events", json={"count": drop}) as r:
                assert r.status == 200
            await _complete(http, url, [rng.randrange(256, 32000) for _ in range(160)], max_tokens=1)
            lost = await _next_seq(http, url) - first
            assert 1 <= lost <= drop, lost
            took_store = await _index_equals_engine(index, http, url, bound + 2)
            assert took_store is not None, "a lost last store batch was never applied"

            # A lost final reset_prefix_cache: no block may stay indexed.
            if lost == drop:
                async with http.post(f"{url}/admin/drop_events", json={"count": 1}) as r:
                    assert r.status == 200
            async with http.post(f"{url}/admin/clear") as r:
                assert r.status == 200
            took_clear = await _index_equals_engine(index, http, url, bound + 2)
            assert took_clear is not None, "ghost blocks after a lost AllBlocksCleared"
            assert not index.worker_hashes("e0")
            stats = adapter.stats()
            assert stats["probe_batches"] - before["probe_batches"] == lost + 1, stats
            assert stats["resets"] == 0, stats
            assert stats["gaps"] == before["gaps"], stats  # no later batch revealed them: the probes did
            assert max(took_store, took_clear) < bound, (took_store, took_clear)
            print(
                f"lost last batch applied after {took_store:.2f} s, lost AllBlocksCleared after "
                f"{took_clear:.2f} s (replay_probe_after={cfg.replay_probe_after} s); probes: "
                f"{stats['probes']}, batches found: {stats['probe_batches']}"
            )
    finally:
        await adapter.stop()
        eng.stop()
