"""Multi-process on loopback: a real router process in front of real simulated
engine processes, talking gRPC, HTTP and ZMQ exactly as in production."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmesh import procs
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh.loadgen import generate_once
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from mesh.core import MeshConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engines():
    ps = [procs.start_sim_engine(f"e{i}", ["--num-gpu-blocks", "2000", "--seed", str(i)]) for i in range(2)]
    yield ps
    for p in ps:
        p.stop()


def _router(engines, policy: str, extra: list[str] | None = None) -> procs.Proc:
    flags = [procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)]
    return procs.start_router(
        f"router-{policy}", flags, ["--policy", policy, "--health-interval", "0.5", *(extra or [])]
    )


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256, 32000) for _ in range(n)]


async def _wait_index(addr: str, min_entries: int, timeout: float = 5.0) -> None:
    async with aio_channel(addr, tls=False, config=ONE_NODE) as ch:
        admin = pb_grpc.AdminStub(ch)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (await admin.GetStats(pb.GetStatsRequest())).index_entries >= min_entries:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"router index never reached {min_entries} entries")


async def _clear(engines) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for p in engines:
            async with http.post(f"{p.info['url']}/admin/clear") as r:
                assert r.status == 200


async def test_shared_prefix_lands_on_same_engine_with_cached_tokens(engines):
    await _clear(engines)
    router = _router(engines, "precise")
    try:
        addr = router.info["grpc"]
        prefix = _tokens(1, 800)  # 50 blocks
        async with aio_channel(addr, tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            first, answer = await generate_once(stub, prefix + _tokens(2, 40), 8)
            assert first.ok, first.error
            await _wait_index(addr, 50)
            second, _ = await generate_once(stub, prefix + _tokens(2, 40) + answer + _tokens(3, 30), 8)
            assert second.ok, second.error
            assert second.engine_id == first.engine_id
            assert second.cached_tokens >= 800, second
            # The Route RPC agrees and explains itself.
            route = await stub.Route(
                pb.RouteRequest(
                    prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prefix + _tokens(9, 20))), dry_run=True
                )
            )
            assert route.engine_id == first.engine_id
            assert route.predicted_cached_blocks >= 50
            assert route.decision.policy == "precise"
            assert {c.engine_id for c in route.decision.candidates} == {"e0", "e1"}
            assert sum(c.chosen for c in route.decision.candidates) == 1
    finally:
        router.stop()


async def test_round_robin_alternates(engines):
    await _clear(engines)
    router = _router(engines, "round_robin")
    try:
        prefix = _tokens(5, 640)
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            seen = []
            for i in range(4):
                rec, _ = await generate_once(stub, prefix + _tokens(100 + i, 20), 4)
                assert rec.ok, rec.error
                seen.append(rec.engine_id)
        assert seen[0] != seen[1] and seen[0] == seen[2] and seen[1] == seen[3], seen
    finally:
        router.stop()


async def test_text_prompt_health_reflection_admin_and_bad_input(engines):
    router = _router(engines, "precise")
    try:
        addr = router.info["grpc"]
        async with aio_channel(addr, tls=False, config=ONE_NODE) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            resp = await health.Check(health_pb2.HealthCheckRequest(service="kvmesh.v1.Router"))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            names = set()
            async for r in refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                names |= {s.name for s in r.list_services_response.service}
            assert {"kvmesh.v1.Router", "kvmesh.v1.Admin", "grpc.health.v1.Health"} <= names

            stub = pb_grpc.RouterStub(ch)
            chunks, fin = [], None
            async for m in stub.Generate(
                pb.GenerateRequest(
                    prompt=pb.Prompt(text="Hello there, how are you today?"),
                    sampling=pb.SamplingParams(max_tokens=5),
                )
            ):
                if m.WhichOneof("event") == "chunk":
                    chunks.extend(m.chunk.token_ids)
                elif m.WhichOneof("event") == "finished":
                    fin = m.finished
            assert fin is not None and fin.finish_reason == "length" and len(chunks) == 5
            assert fin.prompt_tokens > 0

            # Bad input: clear errors, and the node keeps serving.
            for bad in (
                pb.GenerateRequest(),  # no prompt
                pb.GenerateRequest(prompt=pb.Prompt(text="x"), policy="nope"),
                pb.GenerateRequest(prompt=pb.Prompt(text="x"), model="unknown-model"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    async for _ in stub.Generate(bad):
                        pass
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
            admin = pb_grpc.AdminStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await admin.RegisterEngine(
                    pb.RegisterEngineRequest(spec=pb.EngineSpec(engine_id="x", endpoint="nope"))
                )
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await admin.DeregisterEngine(pb.DeregisterEngineRequest(engine_id="ghost"))
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND

            # Deregister and re-register through the admin API.
            listed = await admin.ListEngines(pb.ListEnginesRequest())
            e1 = next(e for e in listed.engines if e.spec.engine_id == "e1")
            assert (await admin.DeregisterEngine(pb.DeregisterEngineRequest(engine_id="e1"))).removed
            ids = {e.spec.engine_id for e in (await admin.ListEngines(pb.ListEnginesRequest())).engines}
            assert ids == {"e0"}
            rec, _ = await generate_once(stub, _tokens(11, 100), 3)
            assert rec.ok and rec.engine_id == "e0"
            status = (await admin.RegisterEngine(pb.RegisterEngineRequest(spec=e1.spec))).status
            assert status.spec.engine_id == "e1" and status.healthy
            ids = {e.spec.engine_id for e in (await admin.ListEngines(pb.ListEnginesRequest())).engines}
            assert ids == {"e0", "e1"}
            assert router.popen.poll() is None
    finally:
        router.stop()


async def test_killing_the_chosen_engine_fails_over():
    ps = [procs.start_sim_engine(f"k{i}", ["--seed", str(i)]) for i in range(2)]
    router = _router(ps, "precise", ["--max-attempts", "3"])
    try:
        prefix = _tokens(21, 480)
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            first, _ = await generate_once(stub, prefix + _tokens(22, 10), 4)
            assert first.ok
            victim = int(first.engine_id[1])
            ps[victim].kill()
            survivor = f"e{1 - victim}"
            for i in range(6):
                rec, _ = await generate_once(stub, prefix + _tokens(30 + i, 10), 4)
                assert rec.ok, rec.error
                assert rec.engine_id == survivor
            admin = pb_grpc.AdminStub(ch)
            stats = await admin.GetStats(pb.GetStatsRequest())
            assert stats.retries_total >= 1
            assert stats.requests_failed == 0
    finally:
        router.stop()
        for p in ps:
            p.stop()


async def _cached_blocks(admin: pb_grpc.AdminStub, engine_id: str) -> int:
    listed = await admin.ListEngines(pb.ListEnginesRequest())
    return next(e.cached_blocks for e in listed.engines if e.spec.engine_id == engine_id)


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_an_engine_removed_and_registered_again_is_read_again():
    """Deregistered, e1's blocks leave the index; registered again unchanged,
    its cache (still there) is learned again from its replay buffer: resumed
    after the last batch read, the blocks it holds would stay unknown."""
    eng = procs.start_sim_engine("again", ["--seed", "5"])
    router = procs.start_router("router-again", [procs.engine_flag("e1", eng)], ["--policy", "precise"])
    try:
        prefix = _tokens(51, 800)  # 50 blocks
        route = pb.RouteRequest(
            prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prefix + _tokens(9, 20))), dry_run=True
        )
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub, admin = pb_grpc.RouterStub(ch), pb_grpc.AdminStub(ch)
            first, _ = await generate_once(stub, prefix + _tokens(52, 40), 4)
            assert first.ok, first.error
            await _wait_index(router.info["grpc"], 50)
            spec = next(e.spec for e in (await admin.ListEngines(pb.ListEnginesRequest())).engines)
            await admin.DeregisterEngine(pb.DeregisterEngineRequest(engine_id="e1"))
            await admin.RegisterEngine(pb.RegisterEngineRequest(spec=spec))

            async def indexed() -> bool:
                return await _cached_blocks(admin, "e1") >= 50

            await _until(indexed)
            await asyncio.sleep(MeshConfig().hint_ttl)  # what is predicted is the index's, not a hint's
            assert (await stub.Route(route)).predicted_cached_blocks >= 50
    finally:
        router.stop()
        eng.stop()


async def test_an_engine_registered_again_elsewhere_is_a_new_cache():
    """e1 moves to another engine process (new URL and KV-event ports): the
    old process' blocks leave the index, and the new one's events come in."""
    old, new = (procs.start_sim_engine(f"moved-{i}", ["--seed", str(i)]) for i in range(2))
    router = procs.start_router("router-moved", [procs.engine_flag("e1", old)], ["--policy", "precise"])
    try:
        prefix = _tokens(41, 800)  # 50 blocks
        route = pb.RouteRequest(
            prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prefix + _tokens(9, 20))), dry_run=True
        )
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub, admin = pb_grpc.RouterStub(ch), pb_grpc.AdminStub(ch)
            first, _ = await generate_once(stub, prefix + _tokens(42, 40), 4)
            assert first.ok, first.error
            await _wait_index(router.info["grpc"], 50)
            assert (await stub.Route(route)).predicted_cached_blocks >= 50

            moved = procs.engine_flag("e1", new)
            spec = pb.EngineSpec(
                engine_id="e1",
                endpoint=new.info["url"],
                kv_events_endpoint=new.info["kv_endpoint"],
                replay_endpoint=new.info["replay_endpoint"],
                model=moved.split("model=")[1].split(",")[0],
                block_size=16,
            )
            await admin.RegisterEngine(pb.RegisterEngineRequest(spec=spec))

            async def cleared() -> bool:
                return await _cached_blocks(admin, "e1") == 0

            await _until(cleared)  # the old process' blocks are gone ...
            # ... and once the first request's route hint has expired, nothing is promised.
            await asyncio.sleep(MeshConfig().hint_ttl)
            assert (await stub.Route(route)).predicted_cached_blocks == 0

            second, _ = await generate_once(stub, prefix + _tokens(43, 40), 4)
            assert second.ok and second.cached_tokens == 0  # served by the new, cold process

            async def indexed() -> bool:
                return await _cached_blocks(admin, "e1") >= 50

            await _until(indexed)  # the new process' KV events reach the index
            third, _ = await generate_once(stub, prefix + _tokens(44, 40), 4)
            assert third.ok and third.cached_tokens >= 800
            assert (await stub.Route(route)).predicted_cached_blocks >= 50
        assert "router.adapter_respecified" in router.tail(400)
    finally:
        router.stop()
        old.stop()
        new.stop()
