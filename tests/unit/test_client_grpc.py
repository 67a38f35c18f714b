"""kvmesh.client over real gRPC, against in-process servers that play nodes
behaving in the ways that matter to a client: one that refuses before any
answer (draining), one whose stream breaks after a token, one that sheds,
one that never answers, one whose port is closed. Several stand behind one
target (gRPC's static ``ipv4:`` list, as a DNS name with several addresses).
Against real nodes: tests/integration/test_client.py."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvmesh import procs
from kvmesh.client import (
    ONE_NODE,
    AsyncClient,
    Chunk,
    Client,
    ClientConfig,
    KvmeshError,
    Result,
    Routed,
    aio_channel,
    channel,
    static_target,
)
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from router.errors import REASON_KEY

TOKEN = "t0k3n-0123456789abcdef"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _abort(context: Any, code: grpc.StatusCode, reason: str, message: str) -> None:
    context.set_trailing_metadata(((REASON_KEY, reason),))
    context.abort(code, message)


class FakeNode(pb_grpc.RouterServicer, pb_grpc.AdminServicer):
    """A gRPC server with kvmesh's API whose Generate answers per ``mode``:
    ok, refuse (UNAVAILABLE draining, nothing sent), break (a token, then
    UNAVAILABLE engine_failed), shed (RESOURCE_EXHAUSTED overloaded), hang
    (never answers), slow (twenty chunks, 50 ms apart)."""

    def __init__(self, mode: str = "ok", status: int = SERVING) -> None:
        self.mode = mode
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.authorization: list[str | None] = []
        self.time_remaining: list[float | None] = []
        self.cancelled = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(16))
        pb_grpc.add_RouterServicer_to_server(self, self.server)
        pb_grpc.add_AdminServicer_to_server(self, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.set_health(status)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_health(self, status: int) -> None:
        self.health.set("kvmesh.v1.Router", status)

    def count(self, method: str) -> int:
        with self.lock:
            return self.calls.get(method, 0)

    def _seen(self, method: str, context: Any) -> None:
        with self.lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            self.authorization.append(dict(context.invocation_metadata()).get("authorization"))
            self.time_remaining.append(context.time_remaining())

    def Generate(self, request: pb.GenerateRequest, context: Any) -> Any:
        self._seen("Generate", context)
        if self.mode == "refuse":
            _abort(context, grpc.StatusCode.UNAVAILABLE, "draining", "this node is draining")
        if self.mode == "shed":
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", "would wait 9.0 s > 2.0 s")
        if self.mode == "hang":
            end = time.monotonic() + 30
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.01)
            return
        done = threading.Event()
        # Runs when the call ends, however it ends: before the last message only if cancelled.
        context.add_callback(lambda: None if done.is_set() else self.cancelled.set())
        yield pb.GenerateResponse(
            routed=pb.RoutedTo(request_id="r-" + str(self.port), engine_id="e1", attempt=1)
        )
        yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[7], text="x"))
        if self.mode == "break":
            done.set()
            _abort(context, grpc.StatusCode.UNAVAILABLE, "engine_failed", "engine e1 failed mid-stream")
        if self.mode == "slow":
            for _ in range(19):
                time.sleep(0.05)
                yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[8], text="y"))
        fin = pb.Finished(finish_reason="length", engine_id="e1", completion_tokens=1, attempts=1)
        done.set()
        yield pb.GenerateResponse(finished=fin)

    def Route(self, request: pb.RouteRequest, context: Any) -> pb.RouteResponse:
        self._seen("Route", context)
        return pb.RouteResponse(engine_id="e1", prompt_blocks=2)

    def _admin(self, method: str, context: Any, answer: Any) -> Any:
        self._seen(method, context)
        if self.mode == "refuse":
            _abort(context, grpc.StatusCode.UNAVAILABLE, "draining", "this node is draining")
        return answer

    def ListEngines(self, request: Any, context: Any) -> pb.ListEnginesResponse:
        return self._admin("ListEngines", context, pb.ListEnginesResponse())

    def GetStats(self, request: Any, context: Any) -> pb.GetStatsResponse:
        return self._admin("GetStats", context, pb.GetStatsResponse(node_id=str(self.port)))

    def RegisterEngine(self, request: Any, context: Any) -> Any:
        return self._admin("RegisterEngine", context, pb.RegisterEngineResponse())

    def Drain(self, request: Any, context: Any) -> pb.DrainResponse:
        return self._admin("Drain", context, pb.DrainResponse(draining=True))

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def nodes():
    made: list[FakeNode] = []

    def make(mode: str = "ok", status: int = SERVING) -> FakeNode:
        made.append(FakeNode(mode, status))
        return made[-1]

    yield make
    for n in made:
        n.stop()


def _client(*addrs: str, **kw: Any) -> Client:
    return Client(static_target(list(addrs)), tls=False, **kw)


def _run(client: Client, n: int) -> list[KvmeshError | Result]:
    """``n`` Generate calls one after another: each one's Result or error."""
    out: list[KvmeshError | Result] = []
    for _ in range(n):
        try:
            out.append(client.complete([1, 2, 3], max_tokens=1))
        except KvmeshError as e:
            out.append(e)
    return out


def test_a_call_refused_before_any_answer_is_retried_on_another_node(nodes) -> None:
    refuser, good = nodes("refuse"), nodes("ok")
    with _client(refuser.addr, good.addr) as client:
        results = _run(client, 20)
    assert all(isinstance(r, Result) for r in results), results
    assert good.count("Generate") == 20
    assert refuser.count("Generate") >= 5  # it was picked, refused, and the call went on


def test_a_closed_port_behind_the_name_fails_no_call(nodes) -> None:
    good = nodes("ok")
    with _client(f"127.0.0.1:{procs.free_port()}", good.addr) as client:
        results = _run(client, 20)
    assert all(isinstance(r, Result) for r in results), results
    assert good.count("Generate") == 20


def test_a_stream_that_has_answered_is_never_retried(nodes) -> None:
    breaker, good = nodes("break"), nodes("ok")
    with _client(breaker.addr, good.addr) as client:
        results = _run(client, 20)
    failed = [r for r in results if isinstance(r, KvmeshError)]
    assert failed and len(failed) == breaker.count("Generate")  # each break ended its call there
    assert good.count("Generate") == 20 - len(failed)  # and was not sent again
    for e in failed:
        assert (e.status, e.reason, e.started) == ("UNAVAILABLE", "engine_failed", True), e
        assert e.message == "engine e1 failed mid-stream" and e.request_id == f"r-{breaker.port}"


def test_the_status_reason_and_message_reach_the_exception(nodes) -> None:
    shedder = nodes("shed")
    with _client(shedder.addr) as client, pytest.raises(KvmeshError) as e:
        client.complete("hello")
    assert (e.value.code, e.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")
    assert e.value.message == "would wait 9.0 s > 2.0 s" and not e.value.started
    assert str(e.value) == "RESOURCE_EXHAUSTED (overloaded): would wait 9.0 s > 2.0 s"
    assert shedder.count("Generate") == 1  # only UNAVAILABLE is retried


def test_the_token_goes_with_every_call(nodes) -> None:
    node = nodes("ok")
    with _client(node.addr, token=TOKEN) as client:
        client.complete("hello")
        client.route("hello")
        client.stats()
    assert node.authorization == [f"Bearer {TOKEN}"] * 3
    with _client(node.addr) as client:
        client.stats()
    assert node.authorization[-1] is None


def test_the_deadline_reaches_the_node_and_ends_the_call(nodes) -> None:
    hang = nodes("hang")
    with _client(hang.addr, timeout=0.5) as client:
        t0 = time.monotonic()
        with pytest.raises(KvmeshError) as e:
            client.complete("hello")
        waited = time.monotonic() - t0
        assert (e.value.status, e.value.reason, e.value.started) == ("DEADLINE_EXCEEDED", "", False)
        assert waited < 10  # the node would have held it for 30 s
        with pytest.raises(KvmeshError, match="DEADLINE_EXCEEDED"):
            client.complete("hello", timeout=0.2)  # a call's own deadline wins
    # gRPC rounds the deadline on the wire (a few ms up at most).
    assert 0.2 < hang.time_remaining[0] <= 0.5 + 0.02
    assert 0 < hang.time_remaining[1] <= 0.2 + 0.02


def test_reads_are_retried_writes_and_drain_never(nodes) -> None:
    refuser = nodes("refuse")
    with _client(refuser.addr) as client:
        for call in (client.list_engines, client.drain):
            with pytest.raises(KvmeshError, match="draining"):
                call()
        with pytest.raises(KvmeshError, match="UNAVAILABLE"):
            client.register_engine(pb.EngineSpec(engine_id="e9", endpoint="http://e9:8000"))
    assert refuser.count("ListEngines") == ClientConfig().retry.max_attempts
    assert refuser.count("Drain") == 1
    assert refuser.count("RegisterEngine") == 1


def test_a_node_that_is_not_serving_gets_no_call_until_it_is(nodes) -> None:
    joining, good = nodes("ok", NOT_SERVING), nodes("ok")
    with _client(joining.addr, good.addr) as client:
        _run(client, 10)
        assert (joining.count("Generate"), good.count("Generate")) == (0, 10)
        joining.set_health(SERVING)
        deadline = time.monotonic() + 10
        while joining.count("Generate") == 0 and time.monotonic() < deadline:
            _run(client, 1)
    assert joining.count("Generate") > 0


def test_leaving_a_stream_early_cancels_it_on_the_node(nodes) -> None:
    slow = nodes("slow")
    with _client(slow.addr) as client:
        for event in client.generate("hello"):
            if isinstance(event, Chunk):
                break
        assert slow.cancelled.wait(5)


def test_calls_in_flight_outlive_a_redial_and_old_channels_close(nodes) -> None:
    slow = nodes("slow")
    cfg = ClientConfig(reresolve_interval=0.2)
    with _client(slow.addr, config=cfg) as client:
        streamed: list[Any] = []
        t = threading.Thread(target=lambda: streamed.extend(client.generate("hello")))
        t.start()
        end = time.monotonic() + 1.5
        while time.monotonic() < end:  # new calls over several intervals: the client re-dials
            client.stats()
            time.sleep(0.05)
        t.join(10)
        assert client.dials >= 3
        assert isinstance(streamed[0], Routed) and isinstance(streamed[-1], Result)
        assert len([e for e in streamed if isinstance(e, Chunk)]) == 20  # not cut by the re-dials
        assert not client._redial._retired  # every retired channel was closed


def test_a_channel_for_the_stubs_dials_as_the_client_and_one_node_sees_the_raw_status(nodes) -> None:
    refuser, good = nodes("refuse"), nodes("ok")
    two = static_target([refuser.addr, good.addr])
    with channel(two, tls=False) as ch:  # the client's service config: refusals go on to another node
        stub = pb_grpc.RouterStub(ch)
        for _ in range(10):
            msgs = list(stub.Generate(pb.GenerateRequest(), timeout=5))
            assert msgs[-1].HasField("finished")
    assert good.count("Generate") == 10 and refuser.count("Generate") >= 2
    before = refuser.count("Generate")
    # What that node said, once.
    with channel(refuser.addr, tls=False, config=ONE_NODE) as ch, pytest.raises(grpc.RpcError) as e:
        list(pb_grpc.RouterStub(ch).Generate(pb.GenerateRequest(), timeout=5))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (REASON_KEY, "draining") in tuple(e.value.trailing_metadata())
    assert refuser.count("Generate") == before + 1


# --- asyncio ------------------------------------------------------------------------------------


async def test_the_async_client_retries_before_an_answer_and_never_after(nodes) -> None:
    refuser, good, breaker = nodes("refuse"), nodes("ok"), nodes("break")
    async with AsyncClient(static_target([refuser.addr, good.addr]), tls=False, token=TOKEN) as client:
        results = [await client.complete([1, 2], max_tokens=1) for _ in range(10)]
        assert [r.finish_reason for r in results] == ["length"] * 10
        assert good.count("Generate") == 10 and refuser.count("Generate") >= 2
        assert (await client.stats()).node_id == str(good.port)
    assert set(good.authorization) == {f"Bearer {TOKEN}"}
    async with AsyncClient(breaker.addr, tls=False) as client:
        events: list[Any] = []
        with pytest.raises(KvmeshError) as e:
            async for event in client.generate("hello"):
                events.append(event)
        assert [type(ev) for ev in events] == [Routed, Chunk]
        assert (e.value.status, e.value.reason, e.value.started) == ("UNAVAILABLE", "engine_failed", True)
        assert breaker.count("Generate") == 1


async def test_the_async_client_honours_deadlines_and_cancels_streams_left_early(nodes) -> None:
    hang, slow = nodes("hang"), nodes("slow")
    async with AsyncClient(hang.addr, tls=False, timeout=0.3) as client:
        with pytest.raises(KvmeshError) as e:
            await client.complete("hello")
        assert (e.value.status, e.value.started) == ("DEADLINE_EXCEEDED", False)
    assert 0 < hang.time_remaining[0] <= 0.3 + 0.02
    async with AsyncClient(slow.addr, tls=False) as client:
        stream = client.generate("hello")
        async for event in stream:
            if isinstance(event, Chunk):
                break
        await stream.aclose()  # what `break` leaves to the garbage collector
        assert await asyncio.to_thread(slow.cancelled.wait, 5)


async def test_an_aio_channel_for_one_node_sees_its_status_once(nodes) -> None:
    refuser = nodes("refuse")
    async with aio_channel(refuser.addr, tls=False, config=ONE_NODE) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.AdminStub(ch).ListEngines(pb.ListEnginesRequest(), timeout=5)
    assert (e.value.code(), refuser.count("ListEngines")) == (grpc.StatusCode.UNAVAILABLE, 1)
