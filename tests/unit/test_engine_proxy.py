"""The router's engine client (engine_adapters/proxy.py): SSE splitting and
stream_completion against scripted loopback HTTP servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import msgspec
import pytest

from engine_adapters.completion_request import SamplingParams
from engine_adapters.proxy import (
    Chunk,
    DeadlineReached,
    EngineBusy,
    EngineClient,
    EngineClientConfig,
    EngineRejected,
    EngineStalled,
    EngineStreamError,
    EngineUnavailable,
    SSEDecoder,
    Usage,
)

# --- SSE ------------------------------------------------------------------------------


def _feed_all(pieces: list[bytes]) -> list[bytes]:
    d = SSEDecoder()
    out: list[bytes] = []
    for p in pieces:
        out += d.feed(p)
    return out + d.flush()


STREAM = (
    b'data: {"a":1}\n\n: a comment\n\ndata: {"b":2}\n\nevent: x\ndata: line1\ndata:line2\n\ndata: [DONE]\n\n'
)
EVENTS = [b'{"a":1}', b'{"b":2}', b"line1\nline2", b"[DONE]"]


def test_sse_events_whatever_the_pieces() -> None:
    assert _feed_all([STREAM]) == EVENTS
    assert _feed_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == EVENTS
    for cut in range(len(STREAM)):
        assert _feed_all([STREAM[:cut], STREAM[cut:]]) == EVENTS


def test_sse_crlf_and_cr_line_ends_even_split_between_reads() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    for cut in range(len(crlf)):
        assert _feed_all([crlf[:cut], crlf[cut:]]) == EVENTS
    assert _feed_all([STREAM.replace(b"\n", b"\r")]) == EVENTS


def test_sse_last_event_without_blank_line_comes_out_on_flush() -> None:
    d = SSEDecoder()
    assert d.feed(b'data: {"x":1}\n\ndata: {"y":2}') == [b'{"x":1}']
    assert d.flush() == [b'{"y":2}']
    assert d.flush() == []


# --- stream_completion against scripted engines ---------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict], Awaitable[None]]


class Engine:
    """A loopback HTTP server; ``handler(reader, writer, request)`` answers
    each request (``request`` has ``headers`` and the decoded ``body``)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[dict] = []
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = json.loads(await reader.readexactly(int(headers["content-length"])))
                req = {"line": lines[0], "headers": headers, "body": body}
                self.requests.append(req)
                await self.handler(reader, writer, req)
                if writer.is_closing():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def event(obj: object) -> bytes:
    return chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
END = chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def tok(ids: list[int], text: str, finish: str | None = None) -> dict:
    return {
        "id": "x",
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}],
        "usage": None,
    }


USAGE = {
    "id": "x",
    "choices": [],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}},
}


async def collect(client: EngineClient, url: str, rid: str = "r1") -> list[Chunk | Usage]:
    return [
        x
        async for x in client.stream_completion(
            url, "m", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3), rid, {"X-data-parallel-rank": "1"}
        )
    ]


async def test_stream_tokens_usage_request_body_and_coalescing() -> None:
    async def handler(reader, writer, req) -> None:
        writer.write(
            SSE_HEAD
            + event(
                {
                    **tok([7], " a"),
                    "choices": [{**tok([7], " a")["choices"][0], "prompt_token_ids": [1, 2, 3, 4, 5]}],
                }
            )
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        # Two events already buffered together: one Chunk with both.
        writer.write(event(tok([8], " b")) + event(tok([9], " c", "length")) + event(USAGE) + END)
        await writer.drain()

    eng = Engine(handler)
    client = EngineClient()
    try:
        async with eng as url:
            out = await collect(client, url, "req\r\nX-Evil: 1")
            out2 = await collect(client, url)
    finally:
        await client.close()
    assert out == [Chunk([7], " a"), Chunk([8, 9], " b c"), Usage(5, 3, 4, "length")]
    assert out2 == out
    assert eng.connections == 1  # kept alive and reused
    req = eng.requests[0]
    assert req["line"] == "POST /v1/completions HTTP/1.1"
    assert req["headers"]["x-request-id"] == "req  X-Evil: 1"  # a header value cannot end the header
    assert "x-evil" not in req["headers"] and req["headers"]["x-data-parallel-rank"] == "1"
    assert req["body"] == {
        "model": "m",
        "prompt": [1, 2, 3, 4, 5],
        "max_tokens": 3,
        "temperature": 0.0,
        "top_p": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }


async def test_usage_without_cached_tokens_is_marked_unreported() -> None:
    # vLLM without --enable-prompt-tokens-details (SGLang without
    # --enable-cache-report) leaves prompt_tokens_details out of the usage.
    bare = {**USAGE, "usage": {"prompt_tokens": 5, "completion_tokens": 3}}

    async def handler(reader, writer, req) -> None:
        writer.write(SSE_HEAD + event(tok([7], " a", "length")) + event(bare) + END)
        await writer.drain()

    client = EngineClient()
    try:
        async with Engine(handler) as url:
            out = await collect(client, url)
    finally:
        await client.close()
    assert out[-1] == Usage(5, 3, 0, "length", cached_unreported=True)


async def _fails_with(handler: Handler, exc: type[Exception], match: str, **kw: float) -> list[Chunk | Usage]:
    got: list[Chunk | Usage] = []
    client = EngineClient(EngineClientConfig(**kw))
    try:
        async with Engine(handler) as url:
            with pytest.raises(exc, match=match):
                async for x in client.stream_completion(url, "m", [1], SamplingParams(max_tokens=16), "r"):
                    got.append(x)
    finally:
        await client.close()
    return got


async def test_errors_before_the_first_token_are_retryable() -> None:
    async def http_503(reader, writer, req) -> None:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")

    async def reset(reader, writer, req) -> None:
        writer.close()

    async def bad_json(reader, writer, req) -> None:
        writer.write(SSE_HEAD + chunk(b"data: {nope\n\n") + END)

    async def error_event(reader, writer, req) -> None:
        writer.write(SSE_HEAD + event({"error": {"message": "boom"}}) + END)

    async def silent(reader, writer, req) -> None:
        writer.write(SSE_HEAD)
        await asyncio.sleep(5)

    assert await _fails_with(http_503, EngineUnavailable, "HTTP 503.*busy") == []
    assert await _fails_with(reset, EngineUnavailable, "talking to") == []
    assert await _fails_with(bad_json, EngineUnavailable, "bad JSON") == []
    assert await _fails_with(error_event, EngineUnavailable, "engine error.*boom") == []
    assert await _fails_with(silent, EngineUnavailable, "no first token", first_token_timeout=0.2) == []
    refused = EngineClient()
    with pytest.raises(EngineUnavailable):
        async for _ in refused.stream_completion(
            "http://127.0.0.1:1", "m", [1], SamplingParams(max_tokens=16), "r"
        ):
            pass
    await refused.close()


async def test_a_connection_that_is_never_accepted_is_the_engines_failure() -> None:
    """A SYN never answered (here: a listener whose accept queue is full)
    ends in aiohttp's connect timeout, a TimeoutError: it is the engine's
    failure, retried elsewhere, not the caller's deadline (which it was
    whenever that deadline came before the first token's)."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fill = []
    for _ in range(4):  # fill the accept queue: later SYNs are dropped
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fill.append(s)
    await asyncio.sleep(0.2)
    c = EngineClient(EngineClientConfig(connect_timeout=0.3))
    loop = asyncio.get_running_loop()
    try:
        for deadline_in in (None, 60.0):  # 60 s: before the first token's 120 s
            t0 = loop.time()
            deadline = None if deadline_in is None else t0 + deadline_in
            with pytest.raises(EngineUnavailable, match=r"no connection to .* in 0\.3 s"):
                async for _ in c.stream_completion(
                    f"http://127.0.0.1:{port}", "m", [1], SamplingParams(max_tokens=2), "r", deadline=deadline
                ):
                    pass
            assert loop.time() - t0 < 5.0
    finally:
        await c.close()
        for s in fill:
            s.close()
        srv.close()


def _http(status: str, body: dict) -> bytes:
    raw = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )


async def test_refusals_are_classified_by_whose_fault_they_are() -> None:
    async def bad_request(reader, writer, req) -> None:
        writer.write(_http("400 Bad Request", {"error": {"message": "max_tokens must be at least 1"}}))

    async def too_long(reader, writer, req) -> None:
        msg = "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens."
        writer.write(_http("400 Bad Request", {"object": "error", "message": msg}))

    async def unknown_model(reader, writer, req) -> None:
        writer.write(_http("404 Not Found", {"error": {"message": "The model `x` does not exist."}}))

    async def queue_full(reader, writer, req) -> None:
        writer.write(_http("429 Too Many Requests", {"error": {"message": "queue full"}}))

    client = EngineClient()
    try:
        for handler, exc, status, ctx in (
            (bad_request, EngineRejected, 400, False),
            (too_long, EngineRejected, 400, True),
            (unknown_model, EngineRejected, 404, False),
        ):
            async with Engine(handler) as url:
                with pytest.raises(exc) as e:
                    async for _ in client.stream_completion(
                        url, "m", [1], SamplingParams(max_tokens=16), "r"
                    ):
                        pass
                assert (e.value.status, e.value.context_length) == (status, ctx)
                assert (
                    "must be at least 1" in str(e.value)
                    or "context length" in str(e.value)
                    or "x" in str(e.value)
                )
        assert await _fails_with(queue_full, EngineBusy, "429.*queue full") == []
    finally:
        await client.close()


async def test_a_stall_after_the_first_token_and_the_callers_deadline_end_the_stream() -> None:
    async def stall(reader, writer, req) -> None:
        writer.write(SSE_HEAD + event(tok([7], " a")))
        await writer.drain()
        await asyncio.sleep(5)

    got = await _fails_with(stall, EngineStalled, "no token .* for 0.2 s", stream_idle_timeout=0.2)
    assert [c.token_ids for c in got if isinstance(c, Chunk)] == [[7]]
    client = EngineClient(EngineClientConfig(stream_idle_timeout=10.0))
    try:
        async with Engine(stall) as url:
            deadline = asyncio.get_running_loop().time() + 0.3
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(DeadlineReached):
                async for _ in client.stream_completion(
                    url, "m", [1], SamplingParams(max_tokens=16), "r", deadline=deadline
                ):
                    pass
            assert asyncio.get_running_loop().time() - t0 < 2.0
    finally:
        await client.close()


async def test_errors_after_a_token_are_stream_errors_and_the_token_is_delivered() -> None:
    async def error_after(reader, writer, req) -> None:
        # The token and the error arrive in the same read.
        writer.write(SSE_HEAD + event(tok([7], " a")) + event({"error": "oom"}) + END)

    async def cut_after(reader, writer, req) -> None:
        writer.write(SSE_HEAD + event(tok([7], " a")))
        await writer.drain()
        writer.close()

    async def no_finish(reader, writer, req) -> None:
        writer.write(SSE_HEAD + event(tok([7], " a")) + END)

    assert await _fails_with(error_after, EngineStreamError, "oom") == [Chunk([7], " a")]
    assert await _fails_with(cut_after, EngineStreamError, "talking to") == [Chunk([7], " a")]
    assert await _fails_with(no_finish, EngineStreamError, "without a finish reason") == [Chunk([7], " a")]


async def _read_slowly(tail: bytes) -> tuple[list[Chunk | Usage], Exception | None]:
    """A caller busy with the first token (a slow client) while the engine
    sends ``tail`` and dies mid-body: aiohttp then holds both the bytes and
    the error, and raises the error first. What the caller got, and how the
    stream ended (None: normally)."""
    sent = asyncio.Event()

    async def tail_then_die(reader, writer, req) -> None:
        writer.write(SSE_HEAD + event(tok([7], " a")))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(tail)
        await writer.drain()
        writer.transport.abort()
        sent.set()

    got: list[Chunk | Usage] = []
    ended: Exception | None = None
    client = EngineClient()
    try:
        async with Engine(tail_then_die) as url:
            try:
                async for x in client.stream_completion(url, "m", [1], SamplingParams(max_tokens=16), "r"):
                    got.append(x)
                    if len(got) == 1:
                        await asyncio.wait_for(sent.wait(), 5.0)
                        await asyncio.sleep(0.1)  # the rest and the cut reach the reader meanwhile
            except EngineStreamError as e:
                ended = e
    finally:
        await client.close()
    return got, ended


async def test_tokens_that_arrive_with_a_cut_reach_a_slow_reader() -> None:
    got, ended = await _read_slowly(event(tok([8], " b")) + event(tok([9], " c")) + b"ff\r\npartial")
    assert ended is not None and "talking to" in str(ended)
    assert [c.token_ids for c in got if isinstance(c, Chunk)] in ([[7], [8, 9]], [[7], [8], [9]])


async def test_a_cut_after_done_loses_nothing_even_for_a_slow_reader() -> None:
    # Every token, the finish reason, the usage and [DONE] came; only the
    # chunked body's terminator was lost.
    got, ended = await _read_slowly(
        event(tok([8], " b", "length")) + event(USAGE) + chunk(b"data: [DONE]\n\n") + b"0\r"
    )
    assert ended is None
    assert got == [Chunk([7], " a"), Chunk([8], " b"), Usage(5, 3, 4, "length")]


async def test_idle_connection_closed_by_the_engine_is_replaced() -> None:
    async def once_then_close(reader, writer, req) -> None:
        writer.write(SSE_HEAD + event(tok([7], " a", "stop")) + END)
        await writer.drain()
        writer.close()  # an idle-timeout close after the response

    eng = Engine(once_then_close)
    client = EngineClient()
    try:
        async with eng as url:
            for _ in range(3):
                out = await collect(client, url)
                assert out[-1] == Usage(finish_reason="stop")
                await asyncio.sleep(0.05)
    finally:
        await client.close()
    assert eng.connections == 3


async def test_abandoned_stream_closes_its_connection() -> None:
    async def endless(reader, writer, req) -> None:
        writer.write(SSE_HEAD)
        while True:
            writer.write(event(tok([7], " a")))
            await writer.drain()
            await asyncio.sleep(0.01)

    eng = Engine(endless)
    client = EngineClient()
    try:
        async with eng as url:
            gen = client.stream_completion(url, "m", [1], SamplingParams(max_tokens=16), "r")
            assert isinstance(await anext(gen), Chunk)
            await gen.aclose()
            await asyncio.wait_for(eng.closed.wait(), 2.0)  # the engine sees the client go
    finally:
        await client.close()


def test_request_body_omits_unset_options() -> None:
    from engine_adapters.completion_request import _STREAM_OPTIONS, _CompletionRequest

    def body(**kw: object) -> dict:
        return msgspec.json.decode(
            msgspec.json.encode(
                _CompletionRequest(
                    model="m",
                    prompt=[1],
                    max_tokens=1,
                    temperature=0.0,
                    top_p=1.0,
                    stream=True,
                    stream_options=_STREAM_OPTIONS,
                    return_token_ids=True,
                    **kw,
                )
            )
        )

    assert {"stop", "ignore_eos", "seed"}.isdisjoint(body())
    full = body(stop=["\n"], ignore_eos=True, seed=0)
    assert (full["stop"], full["ignore_eos"], full["seed"]) == (["\n"], True, 0)


def test_sse_event_that_never_ends_is_refused_not_buffered_forever() -> None:
    d = SSEDecoder(max_event_bytes=64)
    assert d.feed(b"data: " + b"x" * 40) == []
    with pytest.raises(ValueError, match="longer than 64"):
        d.feed(b"y" * 40)


async def test_streams_waiting_for_a_first_token_end_when_their_engine_is_marked_down() -> None:
    # A hung engine: one request has no answer at all, one has the response
    # head and no event; a third (to another engine) streams. Marking the
    # hung engine down ends the first two at once as unavailable (retried
    # elsewhere by the node), and leaves the other engine's stream alone.
    async def hung_head(reader, writer, req) -> None:
        if req["headers"]["x-request-id"] == "head":
            writer.write(SSE_HEAD)
        await asyncio.sleep(30)

    async def slow_tokens(reader, writer, req) -> None:
        writer.write(SSE_HEAD + event(tok([7], " a")))
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.write(event(tok([8], " b", "length")) + event(USAGE) + END)

    async def run(url: str, rid: str) -> list[Chunk | Usage]:
        return [x async for x in client.stream_completion(url, "m", [1], SamplingParams(max_tokens=2), rid)]

    client = EngineClient(EngineClientConfig(first_token_timeout=60))
    try:
        async with Engine(hung_head) as hung, Engine(slow_tokens) as fine:
            tasks = [asyncio.create_task(run(hung, rid)) for rid in ("none", "head")]
            other = asyncio.create_task(run(fine, "other"))
            await asyncio.sleep(0.3)  # both sent, the head arrived; the other stream has its first token
            assert client.abort_waiting(fine, "x") == 0  # started: not a first token's wait
            t0 = asyncio.get_running_loop().time()
            assert client.abort_waiting(hung, "marked down") == 2
            for t in tasks:
                with pytest.raises(EngineUnavailable, match="before its first token: marked down"):
                    await t
            assert asyncio.get_running_loop().time() - t0 < 1.0  # not the 60 s first-token timeout
            out = await other
            assert [x.token_ids for x in out if isinstance(x, Chunk)] == [[7], [8]]
            assert client.abort_waiting(hung, "again") == 0 and not client._waiting  # nothing left behind
    finally:
        await client.close()
