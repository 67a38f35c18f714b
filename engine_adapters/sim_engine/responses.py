"""What every simulated-engine API answer shares: OpenAI-style error
bodies, Server-Sent Events framing (``data: <json>\\n\\n`` ... ``data:
[DONE]``), and the non-standard ``kvmesh_sim`` object (the engine's own
timing of a request, so tests can see its view).

A client that goes away mid-stream is not an error: writes report it and the
handler returns, and the admission path aborts the request.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from aiohttp import web

from engine_adapters.sim_engine.timing import RunningRequest

log = structlog.get_logger(__name__)

encode_json = msgspec.json.Encoder().encode

_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    """The OpenAI error body (``{"error": {message, type, param, code}}``)."""
    body = {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }
    return web.json_response(body, status=status)


def sse(obj: dict[str, Any]) -> bytes:
    """One SSE event carrying ``obj`` as JSON."""
    return b"data: " + encode_json(obj) + b"\n\n"


async def open_event_stream(request: web.Request) -> web.StreamResponse:
    """A prepared ``200 text/event-stream`` response."""
    resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
    await resp.prepare(request)
    return resp


async def write_event(resp: web.StreamResponse, request_id: str, data: bytes) -> bool:
    """Write encoded events; False if the client is gone (the caller returns)."""
    try:
        await resp.write(data)
    except ConnectionResetError:
        log.info("sim.client_disconnected", request_id=request_id)
        return False
    return True


async def end_event_stream(resp: web.StreamResponse, before: bytes = b"") -> web.StreamResponse:
    """Close the stream the OpenAI way (``data: [DONE]``), after ``before``
    (already encoded events), in one write."""
    try:
        await resp.write_eof(before + _DONE)
    except ConnectionResetError:
        pass
    return resp


def sim_info(r: RunningRequest, served_model: str | None = None) -> dict[str, Any]:
    """The ``kvmesh_sim`` object: simulated queue, prefill and TTFT seconds,
    and the model or LoRA adapter that served the request."""
    return {
        "served_model": served_model,
        "queue_s": (r.admitted_at - r.arrival) if r.admitted_at is not None else None,
        "prefill_s": r.prefill_seconds,
        "ttft_s": (r.first_token_at - r.arrival) if r.first_token_at is not None else None,
        "cached_tokens": r.num_cached,
        "prefill_tokens": r.prompt_len - r.num_cached,
    }
