"""Distributed tracing of a router node: W3C Trace Context in and on to the
engine, and (with ``--otlp-endpoint``) OpenTelemetry spans of the routing
and the proxying.

- **In**: a client's ``traceparent`` (and ``tracestate``), as gRPC
  metadata or HTTP headers (:func:`trace_from_metadata`,
  :func:`parse_traceparent`). An invalid one is ignored, as the W3C
  specification asks: it is the client's tracing, never a reason to refuse
  its request.
- **On to the engine**: every engine request carries a ``traceparent``
  (:meth:`Span.engine_headers`): the proxy span's when tracing is on, so the
  engine's own spans (vLLM's ``--otlp-traces-endpoint``) hang under it; the
  client's, unchanged, when tracing is off (the node then takes no part in
  the trace and passes it on, as the specification asks); none when there
  is neither. ``tracestate`` travels with it, unchanged.
- **Spans**, only with ``--otlp-endpoint``: ``kvmesh.request`` (server
  kind: one Generate call or OpenAI request on this node, a child of the
  client's span), and for each attempt ``kvmesh.route`` (the policy's
  choice) and ``kvmesh.proxy`` (client kind: the engine request, whose span
  id the engine receives as its parent). The Route RPC has a
  ``kvmesh.route`` span of its own. Sampling is the SDK's default (parent
  based; a new trace is sampled), which the ``OTEL_TRACES_SAMPLER`` and
  ``OTEL_TRACES_SAMPLER_ARG`` environment variables change.

Tracing is off by default and costs nothing then: :class:`Tracer` hands out
spans that record nothing. ``opentelemetry-sdk`` and the OTLP/gRPC exporter
(the ``tracing`` extra: ``pip install 'kvmesh[tracing]'``) are imported only
when an endpoint is configured, so a node runs without them. Spans are
batched and exported by the SDK's own thread, off the event loop; stopping
the node flushes them.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the tracing extra's types; imported at run time only when tracing is on
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span as OtelSpan

__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "OtelTracer",
    "Span",
    "TraceContext",
    "Tracer",
    "TracingConfig",
    "make_tracer",
    "parse_traceparent",
    "trace_from_metadata",
]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
EXTRA = "pip install 'kvmesh[tracing]'"
# What a propagated tracestate may be (the specification's 512-character
# floor; printable ASCII, so that it cannot end the engine request's header).
MAX_TRACESTATE_CHARS = 512
_TRACESTATE = re.compile(r"[\x20-\x7e]*")
# version-traceid-parentid-flags, lowercase hex; a later version may append "-..." fields.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter")

SpanKind = Literal["server", "client", "internal"]
Attribute = str | int | float | bool


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Span export (off by default)."""

    # The OTLP/gRPC collector: http://HOST:PORT (plaintext) or https://HOST:PORT; "": no spans.
    otlp_endpoint: str = ""
    service_name: str = "kvmesh-router"  # the spans' service.name
    export_timeout: float = 5.0  # seconds one export to the collector may take

    def check(self) -> None:
        """ValueError (naming the flag) for an endpoint that cannot be used,
        or when the tracing extra is not installed."""
        if not self.otlp_endpoint:
            return
        scheme, _, rest = self.otlp_endpoint.partition("://")
        if scheme not in ("http", "https") or not rest.strip("/"):
            raise ValueError(
                f"--otlp-endpoint {self.otlp_endpoint!r}: want http://HOST:PORT (plaintext) or "
                "https://HOST:PORT (an OTLP/gRPC collector, port 4317 by convention)"
            )
        if not self.export_timeout > 0:
            raise ValueError(f"export_timeout must be > 0, got {self.export_timeout}")
        for module in _MODULES:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                raise ValueError(f"--otlp-endpoint needs the tracing extra ({module} is missing): {EXTRA}")


# --- W3C Trace Context ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A position in a trace: the trace, the span to hang children under,
    its flags (bit 0: sampled) and the vendors' ``tracestate``."""

    trace_id: str  # 32 lowercase hex digits
    span_id: str  # 16 lowercase hex digits
    flags: int = 1
    tracestate: str = ""

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    def headers(self) -> dict[str, str]:
        """The HTTP headers that carry this context to the next hop."""
        out = {TRACEPARENT: self.traceparent}
        if self.tracestate:
            out[TRACESTATE] = self.tracestate
        return out


def parse_traceparent(traceparent: str | None, tracestate: str | None = None) -> TraceContext | None:
    """The client's context, or None when it sent none or an invalid one
    (W3C Trace Context level 1: lowercase hex, no all-zero ids, version
    ``ff`` invalid, a later version read by its first four fields). A
    ``tracestate`` that could not be passed on safely is dropped."""
    if not traceparent:
        return None
    m = _TRACEPARENT.fullmatch(traceparent.strip(" \t"))
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    state = (tracestate or "").strip(" \t")
    if len(state) > MAX_TRACESTATE_CHARS or not _TRACESTATE.fullmatch(state):
        state = ""
    return TraceContext(trace_id, span_id, int(flags, 16), state)


def trace_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> TraceContext | None:
    """The context in a gRPC call's metadata (keys arrive lowercase)."""
    parent: str | None = None
    states: list[str] = []
    for key, value in metadata or ():
        if key == TRACEPARENT and parent is None and isinstance(value, str):
            parent = value
        elif key == TRACESTATE and isinstance(value, str):
            states.append(value)
    return parse_traceparent(parent, ",".join(states))


# --- spans ------------------------------------------------------------------------------------------


class Span:
    """A span that records nothing (tracing off). It carries the context it
    was started under, so the engine request still carries the client's
    ``traceparent``."""

    __slots__ = ("context",)
    recording = False

    def __init__(self, context: TraceContext | None) -> None:
        self.context = context

    def set(self, **attributes: Attribute) -> None:
        """Attributes (``kvmesh.`` is prefixed to each name)."""

    def fail(self, code: str, reason: str, message: str = "") -> None:
        """The operation ended with the gRPC status ``code`` and kvmesh ``reason``."""

    def end(self) -> None:
        pass

    def engine_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` with this span's context added (``headers`` itself
        when there is no context: nothing is copied)."""
        if self.context is None:
            return headers
        return {**headers, **self.context.headers()}


_NO_SPAN = Span(None)


class Tracer:
    """Tracing off: spans record nothing, and pass the client's context on."""

    on = False

    def start(
        self,
        name: str,
        parent: Span | TraceContext | None,
        kind: SpanKind = "internal",
        **attributes: Attribute,
    ) -> Span:
        """A span ``name`` under ``parent`` (a span of this node, or the client's context)."""
        if isinstance(parent, Span):
            return parent  # records nothing: its child is itself
        return _NO_SPAN if parent is None else Span(parent)

    def shutdown(self) -> None:
        """Flush what is still to be exported (blocks: call it off the event loop)."""


def _attrs(attributes: Mapping[str, Attribute]) -> dict[str, Attribute]:
    return {f"kvmesh.{k}": v for k, v in attributes.items()}


class _OtelSpan(Span):
    __slots__ = ("_span",)
    recording = True

    def __init__(self, span: OtelSpan, tracestate: str) -> None:
        sc = span.get_span_context()
        super().__init__(
            TraceContext(f"{sc.trace_id:032x}", f"{sc.span_id:016x}", int(sc.trace_flags), tracestate)
        )
        self._span = span

    def set(self, **attributes: Attribute) -> None:
        self._span.set_attributes(_attrs(attributes))

    def fail(self, code: str, reason: str, message: str = "") -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attributes({"kvmesh.status": code, "kvmesh.reason": reason})
        self._span.set_status(Status(StatusCode.ERROR, f"{code} {reason}: {message}" if message else code))

    def end(self) -> None:
        self._span.end()


class OtelTracer(Tracer):
    """Spans of an OpenTelemetry SDK ``TracerProvider`` (tests give one with
    an in-memory exporter; :func:`make_tracer` one that exports over OTLP)."""

    on = True

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace import SpanKind as Kind

        self._provider = provider
        self._tracer = provider.get_tracer("kvmesh.router")
        self._kinds = {"server": Kind.SERVER, "client": Kind.CLIENT, "internal": Kind.INTERNAL}

    def start(
        self,
        name: str,
        parent: Span | TraceContext | None,
        kind: SpanKind = "internal",
        **attributes: Attribute,
    ) -> Span:
        from opentelemetry.trace import set_span_in_context

        ctx: Context | None = None
        if isinstance(parent, _OtelSpan):
            ctx = set_span_in_context(parent._span)
            tracestate = parent.context.tracestate if parent.context is not None else ""
        else:
            remote = parent.context if isinstance(parent, Span) else parent
            tracestate = ""
            if remote is not None:
                ctx = set_span_in_context(_remote(remote))
                tracestate = remote.tracestate
        span = self._tracer.start_span(
            name, context=ctx, kind=self._kinds[kind], attributes=_attrs(attributes)
        )
        return _OtelSpan(span, tracestate)

    def shutdown(self) -> None:
        self._provider.shutdown()


def _remote(c: TraceContext) -> OtelSpan:
    """The client's span, as the parent of this node's first."""
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    state = TraceState.from_header([c.tracestate]) if c.tracestate else None
    sc = SpanContext(
        int(c.trace_id, 16),
        int(c.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(c.flags),
        trace_state=state,
    )
    return NonRecordingSpan(sc)


def make_tracer(cfg: TracingConfig, node_id: str) -> Tracer:
    """Spans exported to ``cfg.otlp_endpoint`` in batches, or none (no endpoint)."""
    if not cfg.otlp_endpoint:
        return Tracer()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise ValueError(f"--otlp-endpoint needs the tracing extra ({e}): {EXTRA}") from None
    resource = Resource.create({"service.name": cfg.service_name, "service.instance.id": node_id})
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint, timeout=cfg.export_timeout)
    provider.add_span_processor(BatchSpanProcessor(exporter, export_timeout_millis=cfg.export_timeout * 1000))
    return OtelTracer(provider)
