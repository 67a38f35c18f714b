"""A router process under the faults an operator meets: a client's mistakes,
an engine that stalls or dies mid-stream, SIGTERM during a long stream, more
requests than the node takes on. Each ends with a status that says why."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time

import aiohttp
import grpc
import pytest
from aiohttp import web

from kvmesh import procs
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 4096


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256, 32000) for _ in range(n)]


def _req(ids: list[int], max_tokens: int = 8, **sampling: float) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids)),
        sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling),
    )


async def _call(stub: pb_grpc.RouterStub, req: pb.GenerateRequest, timeout: float = 30.0) -> tuple:
    """(status code name, reason, details, responses) of one Generate."""
    return (await _call_ids(stub, req, timeout))[:4]


async def _call_ids(stub: pb_grpc.RouterStub, req: pb.GenerateRequest, timeout: float = 30.0) -> tuple:
    """As :func:`_call`, and the refusal's ``x-request-id`` ("" if none)."""
    out: list[pb.GenerateResponse] = []
    call = stub.Generate(req, timeout=timeout)
    try:
        async for r in call:
            out.append(r)
        return "OK", "", "", out, ""
    except grpc.aio.AioRpcError as e:
        trailing = dict(e.trailing_metadata() or ())
        reason = trailing.get("kvmesh-reason", "")
        return e.code().name, reason, e.details(), out, trailing.get("x-request-id", "")


def _tokens_of(out: list[pb.GenerateResponse]) -> int:
    return sum(len(r.chunk.token_ids) for r in out if r.WhichOneof("event") == "chunk")


@pytest.fixture(scope="module")
def engines():
    ps = [
        procs.start_sim_engine(f"e{i}", ["--max-model-len", str(MAX_MODEL_LEN), "--seed", str(i)])
        for i in range(2)
    ]
    yield ps
    for p in ps:
        p.stop()


def _router(engine_flags: list[str], extra: list[str] | None = None) -> procs.Proc:
    return procs.start_router(
        "router", engine_flags, ["--policy", "round_robin", "--health-interval", "0.3", *(extra or [])]
    )


async def test_client_mistakes_get_their_status_and_never_open_a_breaker(engines):
    router = _router([procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)])
    try:
        await asyncio.sleep(1.0)  # a health round: the router learns max_model_len
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            for _ in range(4):  # more than the breaker's threshold, on both engines
                code, reason, details, _ = await _call(stub, _req(_tokens(1, 100), max_tokens=10_000_000))
                assert (code, reason) == ("RESOURCE_EXHAUSTED", "context_length"), details
                assert str(MAX_MODEL_LEN) in details
            code, reason, details, _ = await _call(stub, _req(_tokens(2, 200_000)))
            assert (code, reason) == ("RESOURCE_EXHAUSTED", "context_length"), details
            code, reason, _, _ = await _call(stub, _req(_tokens(3, 50), temperature=-1.0))
            assert (code, reason) == ("INVALID_ARGUMENT", "invalid_request")
            # A request id the engine's header could not carry is the client's
            # mistake, refused before any engine sees it (not an engine's 400,
            # not a crash of the node); the refusal names the node's own id.
            refused_ids = []
            for bad in ("x" * 20_000, "a\x01b"):
                req = _req(_tokens(4, 50))
                req.request_id = bad
                code, reason, details, _, rid = await _call_ids(stub, req)
                assert (code, reason) == ("INVALID_ARGUMENT", "invalid_request"), details
                assert details.startswith("request_id must be") and re.fullmatch("[0-9a-f]{32}", rid)
                refused_ids.append(rid)
            # Every refusal names its id, the client's when it gave one.
            req = _req(_tokens(5, 50), temperature=-1.0)
            req.request_id = "mine-1"
            assert (await _call_ids(stub, req))[4] == "mine-1"
            for i in range(4):  # the fleet still serves
                code, _, details, out = await _call(stub, _req(_tokens(10 + i, 64)))
                assert code == "OK", details
                assert out[-1].finished.finish_reason == "length"
            admin = pb_grpc.AdminStub(ch)
            engines_now = (await admin.ListEngines(pb.ListEnginesRequest())).engines
            assert {e.circuit for e in engines_now} == {"closed"}
            stats = await admin.GetStats(pb.GetStatsRequest())
            assert stats.outcomes["RESOURCE_EXHAUSTED:context_length"] == 5
            assert stats.outcomes["INVALID_ARGUMENT:invalid_request"] == 4
            assert stats.outcomes["OK"] == 4
            assert not [k for k in stats.outcomes if "engine_rejected" in k or "INTERNAL" in k]
    finally:
        router.stop()
    ended = [line for line in router.output if "router.request_ended" in line]
    for rid in refused_ids:
        assert any(f"request_id={rid}" in line for line in ended), (rid, ended)


class _FakeEngine:
    """An OpenAI-style engine that streams a few tokens, then does what it is told."""

    def __init__(self, then: str) -> None:
        self.then = then  # "stall" or "die"
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_get("/health", self._health)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)  # a stalled handler is not waited for
        await self.runner.setup()
        port = procs.free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(b'data: {"choices":[{"text":" a","token_ids":[%d]}]}\n\n' % (100 + i))
        if self.then == "stall":
            await asyncio.sleep(60)
        else:  # die: the connection goes away mid-stream
            assert request.transport is not None
            request.transport.close()
        return resp

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.mark.parametrize(
    ("then", "code", "reason", "words"),
    [
        ("stall", "DEADLINE_EXCEEDED", "stream_stalled", "no token"),
        ("die", "UNAVAILABLE", "engine_failed", "failed mid-stream"),
    ],
)
async def test_an_engine_that_stalls_or_dies_mid_stream_ends_the_call_with_a_status(
    then, code, reason, words
):
    fake = _FakeEngine(then)
    await fake.start()
    router = _router([f"id=fake,url={fake.url}"], ["--stream-idle-timeout", "1"])
    try:
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            t0 = time.monotonic()
            got = await _call(stub, _req(_tokens(1, 40), max_tokens=50), timeout=20)
            assert got[:2] == (code, reason), got[2]
            assert "fake" in got[2] and words in got[2]
            assert time.monotonic() - t0 < 10
            out = got[3]
            assert _tokens_of(out) == 3
            finished = out[-1].finished
            assert finished.finish_reason == "error" and finished.error
            assert finished.completion_tokens == 3  # what the client got before the end
            stats = await pb_grpc.AdminStub(ch).GetStats(pb.GetStatsRequest())
            assert stats.in_flight == 0
    finally:
        router.stop()
        await fake.stop()


async def test_a_client_deadline_is_counted_as_a_deadline_with_the_request_id():
    # gRPC cancels the handler when the client's deadline passes, as when the
    # client cancels: the node must count (and log) the first as
    # DEADLINE_EXCEEDED, never as the client's cancellation.
    fake = _FakeEngine("stall")
    await fake.start()
    router = _router([f"id=fake,url={fake.url}"], ["--stream-idle-timeout", "30"])
    try:
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            got = await _call(stub, _req(_tokens(2, 40), max_tokens=50), timeout=1.5)
            assert got[0] == "DEADLINE_EXCEEDED"
            stats = None
            for _ in range(50):  # the handler's cancellation lands just after the client's deadline
                stats = await pb_grpc.AdminStub(ch).GetStats(pb.GetStatsRequest())
                if stats.outcomes.get("DEADLINE_EXCEEDED:deadline"):
                    break
                await asyncio.sleep(0.1)
            assert stats is not None
            assert dict(stats.outcomes).get("DEADLINE_EXCEEDED:deadline") == 1, dict(stats.outcomes)
            assert "CANCELLED:client" not in stats.outcomes
    finally:
        router.stop()
        await fake.stop()
    # The ended line names the node's request id (the client sent none).
    ended = [line for line in router.output if "router.request_ended" in line]
    assert ended and re.search(r"request_id=[0-9a-f]{32}\b", ended[-1]), ended


async def test_a_client_that_goes_away_is_counted_and_logged_with_its_request_id():
    # A client that cancels its gRPC call, or closes its HTTP stream, ends
    # the engine's request at once, and the node says so: CANCELLED:client
    # counted, one info line naming the request.
    fake = _FakeEngine("stall")
    await fake.start()
    router = _router(
        [f"id=fake,url={fake.url}"], ["--stream-idle-timeout", "30", "--http-listen", "127.0.0.1:0"]
    )
    try:
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            # at debug, where each request went is logged too
            await pb_grpc.AdminStub(ch).SetLogLevel(pb.SetLogLevelRequest(level="debug"))
            req = _req(_tokens(6, 40), max_tokens=50)
            req.request_id = "grpc-gone-1"
            call = stub.Generate(req, timeout=20)
            got = [await call.read() for _ in range(2)]  # routed, then a chunk
            assert got[1].WhichOneof("event") == "chunk"
            call.cancel()
            body = {"model": "", "prompt": [100, 101, 102], "max_tokens": 50, "stream": True}
            async with aiohttp.ClientSession() as http:
                resp = await http.post(
                    f"http://{router.info['http']}/v1/completions",
                    json=body,
                    headers={"x-request-id": "http-gone-1"},
                )
                assert resp.status == 200
                await resp.content.readline()  # the first event
                resp.close()  # the client goes away mid-stream
            admin = pb_grpc.AdminStub(ch)
            stats = None
            for _ in range(50):  # each handler learns of its client's leaving soon after
                stats = await admin.GetStats(pb.GetStatsRequest())
                if stats.outcomes.get("CANCELLED:client", 0) >= 2 and stats.in_flight == 0:
                    break
                await asyncio.sleep(0.1)
            assert stats is not None and stats.outcomes.get("CANCELLED:client") == 2, dict(stats.outcomes)
            assert stats.in_flight == 0
    finally:
        router.stop()
        await fake.stop()
    ended = [line for line in router.output if "router.request_ended" in line and "CANCELLED" in line]
    for rid in ("grpc-gone-1", "http-gone-1"):
        assert any(f"request_id={rid}" in line and "[info" in line for line in ended), (rid, ended)
        routed = [
            line for line in router.output if "router.request_routed" in line and f"request_id={rid}" in line
        ]
        assert routed and "engine=fake" in routed[0] and "[debug" in routed[0], routed


async def test_sigterm_drains_a_long_stream_to_its_last_token(engines):
    router = _router([procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)])
    stopped = False
    try:
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            long = asyncio.create_task(_call(stub, _req(_tokens(5, 100), max_tokens=400), timeout=60))
            await asyncio.sleep(1.0)  # streaming by now (400 tokens take seconds)
            assert not long.done()
            t0 = time.monotonic()
            router.popen.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            code, reason, _, _ = await _call(stub, _req(_tokens(6, 40)), timeout=5)
            assert (code, reason) == ("UNAVAILABLE", "draining")
            code, _, details, out = await long
            assert code == "OK", details
            assert _tokens_of(out) == 400 and out[-1].finished.finish_reason == "length"
            router.popen.wait(30)
            stopped = True
            assert router.popen.returncode == 0
            assert time.monotonic() - t0 < 30
    finally:
        if not stopped:
            router.stop()


async def test_a_stream_longer_than_the_drain_timeout_ends_with_a_reason(engines):
    router = _router([procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)], ["--drain-timeout", "1"])
    try:
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            long = asyncio.create_task(_call(stub, _req(_tokens(7, 100), max_tokens=2000), timeout=60))
            await asyncio.sleep(1.0)  # streaming by now; 2000 tokens take far longer than the drain
            assert not long.done()
            router.popen.send_signal(signal.SIGTERM)
            code, reason, details, out = await long
            assert (code, reason) == ("UNAVAILABLE", "draining"), details
            assert "stopped before this stream ended" in details
            assert 0 < _tokens_of(out) < 2000
            router.popen.wait(30)
            assert router.popen.returncode == 0
    finally:
        router.stop()


async def test_a_second_stop_signal_cuts_the_drain_short(engines):
    flags = [procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)]
    router = _router(flags, ["--drain-timeout", "60"])
    try:
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            long = asyncio.create_task(_call(stub, _req(_tokens(8, 100), max_tokens=2000), timeout=60))
            await asyncio.sleep(1.0)  # streaming by now; 2000 tokens take far longer than this test
            assert not long.done()
            router.popen.send_signal(signal.SIGINT)  # Ctrl-C: drains
            await asyncio.sleep(1.0)
            assert not long.done()  # the drain waits for it
            t0 = time.monotonic()
            router.popen.send_signal(signal.SIGINT)  # again: stop waiting
            code, reason, details, out = await long
            assert (code, reason) == ("UNAVAILABLE", "draining"), details
            assert "cut the drain short" in details
            assert 0 < _tokens_of(out) < 2000
            router.popen.wait(30)
            assert router.popen.returncode == 0
            assert time.monotonic() - t0 < 15  # not the 60 s drain timeout
    finally:
        router.stop()
    assert any("router.drain_cut_short" in line and "signal=SIGINT" in line for line in router.output)
    assert any("router.drained" in line and "cut_short=True" in line for line in router.output)


async def test_requests_on_a_hung_engine_move_to_another_once_it_is_marked_down():
    # A hung engine (SIGSTOP: it takes connections and answers nothing). A
    # trickle of requests, some routed to it before the health checks mark it
    # down: those are then tried on the other engine, and nothing is shed as
    # overload while the other engine is idle.
    own = [procs.start_sim_engine(f"h{i}", ["--seed", str(i)]) for i in range(2)]
    router = _router([procs.engine_flag(f"h{i}", p) for i, p in enumerate(own)])
    try:
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            assert (await _call(stub, _req(_tokens(40, 32))))[0] == "OK"
            own[1].popen.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            calls = []
            for i in range(8):  # round robin: about half go to the hung engine first
                calls.append(asyncio.create_task(_call(stub, _req(_tokens(41 + i, 32)), timeout=30)))
                await asyncio.sleep(0.4)
            results = await asyncio.gather(*calls)
            elapsed = time.monotonic() - t0
            assert [r[0] for r in results] == ["OK"] * 8, [(r[0], r[1], r[2]) for r in results]
            assert elapsed < 20, elapsed  # moved once marked down, not after the 120 s first-token timeout
            own[1].popen.send_signal(signal.SIGCONT)
            await asyncio.sleep(1.0)  # it reads the requests the router has given up on
    finally:
        own[1].popen.send_signal(signal.SIGCONT)
        router.stop()
        for p in own:
            p.stop()
    moved = [line for line in router.output if "router.engine_down_requests_moved" in line]
    assert moved and "engine=h1" in moved[0], list(router.output)[-30:]
    # Answering a request whose client has left is no error of the engine's.
    assert not [line for line in own[1].output if "Traceback" in line], list(own[1].output)[-40:]
    assert any("sim.client_disconnected" in line for line in own[1].output), list(own[1].output)[-40:]


async def test_past_its_bound_a_node_sheds_at_once(engines):
    router = _router(
        [procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)],
        ["--max-in-flight", "2", "--max-queue", "0"],
    )
    try:
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            busy = [
                asyncio.create_task(_call(stub, _req(_tokens(20 + i, 50), max_tokens=300))) for i in range(2)
            ]
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            code, reason, details, out = await _call(stub, _req(_tokens(30, 50)))
            elapsed = time.monotonic() - t0
            assert (code, reason) == ("RESOURCE_EXHAUSTED", "overloaded"), details
            assert out == [] and elapsed < 0.2
            assert [c[0] for c in await asyncio.gather(*busy)] == ["OK", "OK"]
    finally:
        router.stop()


@pytest.mark.parametrize("mesh_port", ["own", "shared"])
async def test_an_oversized_request_is_refused_by_the_public_port(engines, mesh_port):
    # On its own port the mesh's (larger) message bound is not the public
    # port's; sharing the port, the node checks the client's bound itself.
    mesh = f"127.0.0.1:{procs.free_port()}" if mesh_port == "own" else ""
    flags = ["--mesh-listen", mesh] if mesh else []
    router = _router([procs.engine_flag("e0", engines[0])], [*flags, "--max-request-bytes", "100000"])
    try:
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub = pb_grpc.RouterStub(ch)
            code, _, details, _ = await _call(stub, _req(_tokens(40, 60_000)))
            assert code == "RESOURCE_EXHAUSTED" and "larger than max" in details, details
            code, _, details, _ = await _call(stub, _req(_tokens(41, 64)))
            assert code == "OK", details
        assert router.info["mesh"] == (mesh or router.info["grpc"])
    finally:
        router.stop()
