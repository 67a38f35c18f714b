"""Tracing (router/tracing.py): W3C traceparent parsing, the context passed
on to the engine with tracing off, and with tracing on (an SDK provider with
an in-memory exporter) the spans of a request, its routing and its proxying,
against an engine on loopback that records what it was sent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from engine_adapters.completion_request import SamplingParams
from kvmesh.cli import router as router_cli
from router import tracing
from router.config import RouterConfig
from router.engine_registry import EngineSpec
from router.errors import ContextTooLong
from router.node import RouterNode
from router.request_path import ClientRequest, Finished
from router.tracing import (
    OtelTracer,
    Span,
    TraceContext,
    Tracer,
    TracingConfig,
    parse_traceparent,
    trace_from_metadata,
)
from tests.recording_engine import MODEL, RecordingEngine

REPO = Path(__file__).resolve().parents[2]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


# --- W3C Trace Context ----------------------------------------------------------------------------


def test_a_valid_traceparent_and_its_tracestate() -> None:
    ctx = parse_traceparent(TRACEPARENT, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    assert ctx == TraceContext(TRACE, PARENT, 1, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    assert ctx.sampled and ctx.traceparent == TRACEPARENT
    assert ctx.headers() == {
        "traceparent": TRACEPARENT,
        "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    }
    unsampled = parse_traceparent(f"00-{TRACE}-{PARENT}-00")
    assert (
        unsampled is not None
        and not unsampled.sampled
        and unsampled.headers() == {"traceparent": f"00-{TRACE}-{PARENT}-00"}
    )
    # A later version is read by its first four fields, and passed on as version 00.
    later = parse_traceparent(f"01-{TRACE}-{PARENT}-01-what-comes-next")
    assert later is not None and later.traceparent == TRACEPARENT


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"00-{TRACE.upper()}-{PARENT}-01",  # uppercase hex
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{PARENT}-01",  # the forbidden version
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}-{PARENT}-01",  # short trace id
        f"00-{TRACE}-{PARENT}-1",  # short flags
        f"01-{TRACE}-{PARENT}-01x",  # a later version's fifth field starts with '-'
    ],
)
def test_an_invalid_traceparent_is_ignored(header: str) -> None:
    assert parse_traceparent(header, "a=b") is None


def test_a_tracestate_that_cannot_travel_safely_is_dropped() -> None:
    assert parse_traceparent(TRACEPARENT, "a=b\r\nx-injected: 1") == TraceContext(TRACE, PARENT, 1, "")
    assert parse_traceparent(TRACEPARENT, "a=" + "b" * 600).tracestate == ""


def test_grpc_metadata() -> None:
    md = [("user-agent", "grpc"), ("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("tracestate", "b=2")]
    assert trace_from_metadata(md) == TraceContext(TRACE, PARENT, 1, "a=1,b=2")
    assert trace_from_metadata([("x-bin", b"\x00")]) is None
    assert trace_from_metadata(None) is None


def test_tracing_off_passes_the_clients_context_on_unchanged() -> None:
    off = Tracer()
    ctx = parse_traceparent(TRACEPARENT, "a=1")
    request = off.start("kvmesh.request", ctx, "server", request_id="r")
    proxy = off.start("kvmesh.proxy", request, "client")
    assert not proxy.recording
    assert proxy.engine_headers({"X-data-parallel-rank": "1"}) == {
        "X-data-parallel-rank": "1",
        "traceparent": TRACEPARENT,
        "tracestate": "a=1",
    }
    none = off.start("kvmesh.proxy", off.start("kvmesh.request", None), "client")
    headers = {"X-data-parallel-rank": "1"}
    assert none.engine_headers(headers) is headers  # no context: nothing added, nothing copied


# --- configuration ----------------------------------------------------------------------------------


def test_the_endpoint_flag_reaches_the_config_and_is_checked() -> None:
    p = router_cli.argparse.ArgumentParser()
    router_cli.configure_parser(p)
    assert router_cli.config_from_args(p.parse_args([])).tracing == TracingConfig()  # off by default
    cfg = router_cli.config_from_args(p.parse_args(["--otlp-endpoint", "http://127.0.0.1:4317"]))
    assert cfg.tracing.otlp_endpoint == "http://127.0.0.1:4317"
    node = RouterNode(cfg)
    assert node.tracer.on and isinstance(node.tracer, OtelTracer)
    node.tracer.shutdown()
    assert not RouterNode(RouterConfig()).tracer.on
    for bad in ("127.0.0.1:4317", "grpc://collector:4317", "http://"):
        with pytest.raises(ValueError, match="--otlp-endpoint"):
            RouterConfig(tracing=TracingConfig(otlp_endpoint=bad))


def test_without_the_extra_the_flag_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"kvmesh\[tracing\]"):
        RouterConfig(tracing=TracingConfig(otlp_endpoint="http://collector:4317"))
    RouterConfig()  # tracing off: the extra is not needed


def test_a_node_without_an_endpoint_never_imports_opentelemetry() -> None:
    code = (
        "import sys, router.service, kvmesh.cli.router\n"
        "from router.node import RouterNode\n"
        "RouterNode()\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# --- spans of a request, against an engine on loopback ----------------------------------------------


class Traced:
    """A node with an in-memory span exporter (or tracing off) and recording engines."""

    def __init__(self, engines: list[RecordingEngine], on: bool = True) -> None:
        self.exporter = InMemorySpanExporter()
        self.node = RouterNode(RouterConfig(node_id="n1", policy="round_robin"))
        if on:
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(self.exporter))
            self.node.tracer = OtelTracer(provider)
        for i, e in enumerate(engines):
            self.node.engines.put(EngineSpec(f"e{i}", e.url, model=MODEL, block_size=4).validate())

    async def generate(self, trace: TraceContext | None, max_tokens: int = 3) -> list[object]:
        prep = self.node.prepare(ClientRequest(request_id="req-1", token_ids=list(range(300, 340))))
        return [
            item
            async for item in self.node.generate(prep, SamplingParams(max_tokens=max_tokens), trace=trace)
        ]

    def spans(self) -> dict[str, list[ReadableSpan]]:
        out: dict[str, list[ReadableSpan]] = {}
        for s in self.exporter.get_finished_spans():
            out.setdefault(s.name, []).append(s)
        return out

    async def close(self) -> None:
        await self.node.stop()


def _ids(s: ReadableSpan) -> tuple[str, str]:
    assert s.context is not None
    return f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}"


def _parent(s: ReadableSpan) -> str:
    assert s.parent is not None
    return f"{s.parent.span_id:016x}"


async def test_spans_of_a_request_and_the_traceparent_the_engine_gets() -> None:
    engine = await RecordingEngine().start()
    t = Traced([engine])
    try:
        items = await t.generate(parse_traceparent(TRACEPARENT, "vendor=x"))
        assert isinstance(items[-1], Finished)
        spans = t.spans()
        assert sorted(spans) == ["kvmesh.proxy", "kvmesh.request", "kvmesh.route"]
        (request,), (route,), (proxy,) = spans["kvmesh.request"], spans["kvmesh.route"], spans["kvmesh.proxy"]
        # One trace, the client's; the request hangs under the client's span, the rest under the request.
        assert {_ids(s)[0] for s in (request, route, proxy)} == {TRACE}
        assert _parent(request) == PARENT and request.parent is not None and request.parent.is_remote
        assert _parent(route) == _parent(proxy) == _ids(request)[1]
        assert (request.kind, route.kind, proxy.kind) == (SpanKind.SERVER, SpanKind.INTERNAL, SpanKind.CLIENT)
        assert request.attributes is not None and request.attributes["kvmesh.request_id"] == "req-1"
        assert request.attributes["kvmesh.prompt_tokens"] == 40
        assert route.attributes is not None and route.attributes["kvmesh.engine"] == "e0"
        assert route.attributes["kvmesh.candidates"] == 1
        assert proxy.attributes is not None and proxy.attributes["kvmesh.endpoint"] == engine.url
        assert proxy.attributes["kvmesh.completion_tokens"] == 3
        assert request.status.status_code == proxy.status.status_code == StatusCode.UNSET
        # The engine was sent the proxy span as its parent, in the client's trace, with its tracestate.
        (sent,) = engine.requests
        assert sent["traceparent"] == f"00-{TRACE}-{_ids(proxy)[1]}-01"
        assert sent["tracestate"] == "vendor=x"
        # Without a client context the node starts the trace, and the engine is in it too.
        t.exporter.clear()
        await t.generate(None)
        spans = t.spans()
        (request,), (proxy,) = spans["kvmesh.request"], spans["kvmesh.proxy"]
        assert request.parent is None
        assert proxy.context is not None and proxy.context.trace_flags.sampled
        flags = f"{int(proxy.context.trace_flags):02x}"  # the SDK's: sampled, and "random" (W3C level 2)
        assert engine.requests[-1]["traceparent"] == f"00-{_ids(proxy)[0]}-{_ids(proxy)[1]}-{flags}"
        assert "tracestate" not in engine.requests[-1]
    finally:
        await t.close()
        await engine.stop()


async def test_a_retried_request_has_a_route_and_a_proxy_span_per_attempt() -> None:
    refusing, serving = await RecordingEngine(refuse=True).start(), await RecordingEngine().start()
    t = Traced([refusing, serving])
    try:
        await t.generate(parse_traceparent(TRACEPARENT))
        spans = t.spans()
        assert len(spans["kvmesh.route"]) == len(spans["kvmesh.proxy"]) == 2
        first, second = sorted(spans["kvmesh.proxy"], key=lambda s: s.attributes["kvmesh.attempt"])
        assert first.status.status_code == StatusCode.ERROR and first.attributes is not None
        assert first.attributes["kvmesh.reason"] == "engine_unavailable"
        assert second.status.status_code == StatusCode.UNSET
        # Each engine got its own attempt's span as parent, in the client's trace.
        assert refusing.traceparents() == [f"00-{TRACE}-{_ids(first)[1]}-01"]
        assert serving.traceparents() == [f"00-{TRACE}-{_ids(second)[1]}-01"]
    finally:
        await t.close()
        await refusing.stop()
        await serving.stop()


async def test_a_refused_request_has_an_error_span() -> None:
    engine = await RecordingEngine().start()
    t = Traced([engine])
    t.node.engines["e0"].max_model_len = 50  # as a health probe learns it
    try:
        with pytest.raises(ContextTooLong):
            await t.generate(parse_traceparent(TRACEPARENT), max_tokens=100)
        (request,) = t.spans()["kvmesh.request"]
        assert request.status.status_code == StatusCode.ERROR and request.attributes is not None
        assert (request.attributes["kvmesh.status"], request.attributes["kvmesh.reason"]) == (
            "RESOURCE_EXHAUSTED",
            "context_length",
        )
        assert engine.requests == []
    finally:
        await t.close()
        await engine.stop()


async def test_with_tracing_off_the_engine_gets_the_clients_traceparent() -> None:
    engine = await RecordingEngine().start()
    t = Traced([engine], on=False)
    try:
        await t.generate(parse_traceparent(TRACEPARENT, "a=1"))
        await t.generate(None)
        assert engine.traceparents() == [TRACEPARENT, None]
        assert engine.requests[0]["tracestate"] == "a=1"
        assert t.exporter.get_finished_spans() == ()
        assert isinstance(t.node.tracer.start("x", None), Span)
    finally:
        await t.close()
        await engine.stop()
