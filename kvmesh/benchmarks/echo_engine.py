"""An engine that costs next to nothing: vLLM's ``/v1/completions`` stream,
answered at once, for the proxy benchmark.

The proxy benchmark measures what a router node costs between a client and
its engines; with two cores, the engines run on the client's core, and the
simulated engine (``kvmesh sim-engine``: scheduler, paged cache, block
hashes, KV events) would then bound the load before the router does. This
one does nothing but the protocol: per request it streams ``max_tokens``
token events (one SSE event per token, ``--token-interval`` seconds apart,
as an engine's decode steps arrive, only far faster than a real engine's)
with ids taken from the prompt, the last with ``finish_reason`` ``length``,
then the usage and ``[DONE]``. No cache, no KV events: every prompt is a
miss.

HTTP/1.1 on a bare asyncio protocol (keep-alive, chunked responses, no
pipelining): ``POST /v1/completions`` (streamed), ``GET /health``, ``GET
/v1/models``. ``python -m kvmesh.benchmarks.echo_engine --port 0`` prints
``READY url=http://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket

import msgspec

from engine_adapters.sim_engine.config import DEFAULTS

MODEL = DEFAULTS.model  # what the router is told an engine serves (kvmesh.procs.engine_flag)
MAX_MODEL_LEN = 1 << 20
TOKEN_INTERVAL_S = 0.001  # between two token events of one stream
_MAX_HEAD = 64 << 10
_MAX_BODY = 64 << 20


class _Body(msgspec.Struct):
    prompt: list[int] | str = ""
    max_tokens: int = 16


_decode = msgspec.json.Decoder(_Body).decode
_encode = msgspec.json.Encoder().encode


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _response(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\nContent-Type: "
        + ctype
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_MODELS = _response(
    "200 OK", _encode({"object": "list", "data": [{"id": MODEL, "max_model_len": MAX_MODEL_LEN}]})
)


class _Conn(asyncio.Protocol):
    def __init__(self, interval: float = TOKEN_INTERVAL_S) -> None:
        self._interval = interval
        self._t: asyncio.WriteTransport | None = None
        self._buf = b""
        self._busy = False  # a response is being streamed: the next request waits in _buf

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = transport  # type: ignore[assignment]  # a TCP server's transports write (uvloop's are not asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._t = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._next()

    def _next(self) -> None:
        t = self._t
        if t is None:
            return
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                t.close()
            return
        head = self._buf[:end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip() or 0)
        if length > _MAX_BODY:
            t.close()
            return
        if len(self._buf) < end + 4 + length:
            return
        body = self._buf[end + 4 : end + 4 + length]
        self._buf = self._buf[end + 4 + length :]
        method, path = (head[0].split(" ") + ["", ""])[:2]
        if method == "POST" and path == "/v1/completions":
            self._stream(body)
            return
        if path == "/health":
            t.write(_response("200 OK", b""))
        elif path == "/v1/models":
            t.write(_MODELS)
        else:
            t.write(_response("404 Not Found", b'{"error":"not found"}'))
        self._next()

    def _stream(self, body: bytes) -> None:
        t = self._t
        assert t is not None
        try:
            req = _decode(body)
        except msgspec.DecodeError as e:
            t.write(_response("400 Bad Request", _encode({"error": {"message": str(e)}})))
            self._next()
            return
        ids = req.prompt if isinstance(req.prompt, list) else [0]
        n = max(1, req.max_tokens)
        self._busy = True
        t.write(_STREAM_HEAD)
        loop = asyncio.get_running_loop()

        def token(i: int) -> None:
            if self._t is None:
                return
            last = i == n - 1
            tok = ids[i % len(ids)] if ids else i
            ev = {
                "choices": [
                    {
                        "index": 0,
                        "text": " t",
                        "token_ids": [tok],
                        "finish_reason": "length" if last else None,
                    }
                ]
            }
            data = b"data: " + _encode(ev) + b"\n\n"
            if last:
                usage = {
                    "choices": [],
                    "usage": {
                        "prompt_tokens": len(ids),
                        "completion_tokens": n,
                        "prompt_tokens_details": {"cached_tokens": 0},
                    },
                }
                data += b"data: " + _encode(usage) + b"\n\ndata: [DONE]\n\n"
                self._t.write(_chunk(data) + b"0\r\n\r\n")
                self._busy = False
                self._next()
            else:
                self._t.write(_chunk(data))
                loop.call_later(self._interval, token, i + 1)

        loop.call_later(self._interval, token, 0)


async def serve(host: str, port: int, interval: float = TOKEN_INTERVAL_S) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Conn(interval), host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY url=http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument(
        "--token-interval",
        type=float,
        default=TOKEN_INTERVAL_S,
        help="seconds between two token events of one stream (default %(default)s)",
    )
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.run(serve(a.host, a.port, a.token_interval))
    except ImportError:
        asyncio.run(serve(a.host, a.port, a.token_interval))


if __name__ == "__main__":
    main()
