"""Tracing through a real router process: a client's W3C traceparent, sent as
gRPC metadata and as an HTTP header (the official openai client), reaches
the engine (an engine on loopback that records its requests' headers) in
the same trace; with ``--otlp-endpoint`` the node exports its spans over
OTLP/gRPC to a collector on loopback (this test's), and the engine's parent
span is the node's proxy span."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import openai
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from kvmesh import procs
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from router.tracing import parse_traceparent
from tests.recording_engine import MODEL, RecordingEngine

pytestmark = pytest.mark.slow

GRPC_TRACE = "0af7651916cd43dd8448eb211c80319c"
HTTP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "b7ad6b7169203331"


def _traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-{CLIENT_SPAN}-01"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent, with its resource."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []  # (resource attributes, span)

    async def Export(self, request: Any, context: Any) -> Any:
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                self.spans += [(resource, s) for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> dict[str, Any]:
        out = {}
        for _, s in self.spans:
            if s.trace_id.hex() == trace_id:
                assert s.name not in out, f"two {s.name} spans in one trace"
                out[s.name] = s
        return out


@pytest.fixture
async def engine() -> AsyncIterator[RecordingEngine]:
    e = await RecordingEngine().start()
    yield e
    await e.stop()


async def _router(name: str, engine: RecordingEngine, extra: list[str]) -> procs.Proc:
    # Started off the event loop: the engine serves on it (the router probes its health meanwhile).
    return await asyncio.to_thread(
        procs.start_router,
        name,
        [f"id=e0,url={engine.url},model={MODEL},block_size=16"],
        ["--http-listen", "127.0.0.1:0", "--health-interval", "0.2", *extra],
    )


async def _stop(router: procs.Proc) -> None:
    assert await asyncio.to_thread(router.stop, 30.0) == 0, router.tail()


async def _send(router: procs.Proc) -> None:
    """A gRPC Generate and a streamed OpenAI chat, each with its client's
    traceparent, then a chat without one."""
    async with grpc.aio.insecure_channel(router.info["grpc"]) as ch:
        req = pb.GenerateRequest(
            prompt=pb.Prompt(token_ids=pb.TokenIds(ids=list(range(300, 364)))),
            sampling=pb.SamplingParams(max_tokens=3),
        )
        meta = (("traceparent", _traceparent(GRPC_TRACE)), ("tracestate", "client=grpc"))
        out = [r async for r in pb_grpc.RouterStub(ch).Generate(req, metadata=meta, timeout=30)]
        assert out[-1].HasField("finished")
    client = openai.AsyncOpenAI(base_url=f"http://{router.info['http']}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Where does this request go?"}]
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=3,
        stream=True,
        extra_headers={"traceparent": _traceparent(HTTP_TRACE)},
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    plain = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert plain.usage is not None and plain.usage.completion_tokens == 3
    await client.close()


async def test_without_an_exporter_the_clients_traceparent_reaches_the_engine(
    engine: RecordingEngine,
) -> None:
    router = await _router("trace-off", engine, [])
    try:
        await _send(router)
        # An invalid traceparent is the client's problem, never a reason to refuse its request.
        client = openai.AsyncOpenAI(base_url=f"http://{router.info['http']}/v1", api_key="unused")
        comp = await client.completions.create(
            model=MODEL, prompt="x y z", max_tokens=3, extra_headers={"traceparent": "00-not-a-trace-01"}
        )
        assert comp.usage is not None and comp.usage.completion_tokens == 3
        await client.close()
    finally:
        await _stop(router)
    # Tracing off: the node is no participant, and passes the client's context on unchanged.
    assert engine.traceparents() == [_traceparent(GRPC_TRACE), _traceparent(HTTP_TRACE), None, None]
    assert engine.requests[0]["tracestate"] == "client=grpc"


async def test_with_an_otlp_endpoint_spans_reach_the_collector_in_the_clients_trace(
    engine: RecordingEngine,
) -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        router = await _router("trace-on", engine, ["--otlp-endpoint", f"http://127.0.0.1:{port}"])
        try:
            await _send(router)
        finally:
            await _stop(router)  # the node flushes its batched spans as it stops
    finally:
        await server.stop(None)

    sent = [parse_traceparent(tp) for tp in engine.traceparents()]
    assert all(ctx is not None for ctx in sent), engine.traceparents()
    assert [ctx.trace_id for ctx in sent[:2]] == [GRPC_TRACE, HTTP_TRACE]
    assert engine.requests[0]["tracestate"] == "client=grpc"
    for trace_id, ctx in zip((GRPC_TRACE, HTTP_TRACE, sent[2].trace_id), sent):
        spans = collector.of_trace(trace_id)
        assert set(spans) == {"kvmesh.request", "kvmesh.route", "kvmesh.proxy"}, trace_id
        request, route, proxy = spans["kvmesh.request"], spans["kvmesh.route"], spans["kvmesh.proxy"]
        # The client's span (none for the third request: the node began the trace) > request > route, proxy.
        client_span = bytes.fromhex(CLIENT_SPAN) if trace_id != sent[2].trace_id else b""
        assert request.parent_span_id == client_span
        assert route.parent_span_id == proxy.parent_span_id == request.span_id
        # The engine's parent is the proxy span.
        assert ctx is not None and ctx.span_id == proxy.span_id.hex()
    assert {(r["service.name"], r["service.instance.id"]) for r, _ in collector.spans} == {
        ("kvmesh-router", "trace-on")
    }
