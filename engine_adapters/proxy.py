"""Client for an engine's OpenAI-compatible ``/v1/completions`` stream.

vLLM and SGLang both serve it. What is sent is built by
:mod:`engine_adapters.completion_request`; the usage block of the last chunk
carries ``prompt_tokens_details.cached_tokens``: the engine's own word on how
much of the prompt it found cached.

This is the router's hot path, so it is lean: the request body is encoded and
the SSE events decoded with msgspec (typed: only the fields kvmesh reads are
built), the stream is read in whatever pieces arrived (not line by line) and
split into events at once, and the tokens of every event already received
come out as ONE :class:`Chunk`. Nothing ever waits to batch: when the router
keeps up a chunk is one event; when it falls behind, fewer and larger messages
go out, which is exactly when per-message costs matter.

Errors are split by what the caller can still do and by whose fault they
are:

- :class:`EngineRejected`: the engine refused the request itself (HTTP 4xx
  other than 429: a bad field, a prompt over the model's context). The
  client's mistake: not retried, not held against the engine.
- :class:`EngineBusy`: the engine's queue is full (HTTP 429). Another engine
  may take it; not held against this one.
- :class:`EngineUnavailable`: the engine failed before the first token
  (transport error, 5xx, no first token in time). Safe to retry elsewhere;
  counts against the engine.
- :class:`EngineStreamError`: the stream broke after tokens were sent; not
  retryable. :class:`EngineStalled` is the case where the engine sent nothing
  for ``stream_idle_timeout`` seconds.
- :class:`DeadlineReached`: the caller's own deadline passed.

In every case the HTTP request is closed, which makes the engine abort it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from engine_adapters.completion_request import EngineKind, SamplingParams, Tenancy, completion_body


class EngineUnavailable(Exception):
    """The engine failed before producing any token: retryable elsewhere."""


class EngineBusy(Exception):
    """The engine's queue is full (HTTP 429): retryable elsewhere, not a failure."""


class EngineRejected(Exception):
    """The engine refused the request itself (an HTTP 4xx): the client's mistake."""

    def __init__(self, status: int, message: str, *, context_length: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.context_length = context_length  # the prompt and max_tokens exceed the context window


class EngineStreamError(Exception):
    """The stream broke after tokens were produced: not retryable."""


class EngineStalled(EngineStreamError):
    """No token for ``stream_idle_timeout`` seconds after the first."""


class DeadlineReached(Exception):
    """The caller's deadline passed before the stream ended."""


@dataclass(frozen=True, slots=True)
class EngineClientConfig:
    """How the router talks to engines over HTTP."""

    connect_timeout: float = 2.0  # seconds to open a connection
    # Seconds from sending a request to its first token (connect, queueing and
    # prefill included); past it the attempt is retryable elsewhere.
    first_token_timeout: float = 120.0
    # Seconds without a token once streaming: past it the request is aborted.
    stream_idle_timeout: float = 30.0
    health_timeout: float = 1.0  # seconds for one GET /health
    pool_size: int = 512  # open connections over all engines


@dataclass(slots=True)
class Chunk:
    """Tokens streamed by the engine since the previous chunk (one or more SSE events)."""

    token_ids: list[int]
    text: str


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = ""
    # The engine's usage did not say how much of the prompt it had cached:
    # vLLM says it only with --enable-prompt-tokens-details and a hit (with
    # none cached it says nothing either), SGLang only with --enable-cache-report.
    cached_unreported: bool = False


class EngineClient:
    """One pooled HTTP session shared by all requests to all engines."""

    def __init__(self, config: EngineClientConfig | None = None) -> None:
        self.config = config or EngineClientConfig()
        self._session: aiohttp.ClientSession | None = None
        # endpoint -> the streams to it still waiting for their first event
        self._waiting: dict[str, set[_Clock]] = {}

    def abort_waiting(self, endpoint: str, why: str) -> int:
        """End every stream to ``endpoint`` that has had no event yet as its
        first-token timeout would, with :class:`EngineUnavailable` (retried
        elsewhere: nothing was produced). For an engine this node's health
        checks marked down: requests stuck on a hung engine would otherwise
        wait out ``first_token_timeout``. Returns how many."""
        return sum(clock.abort(why) for clock in list(self._waiting.get(endpoint, ())))

    def _stopped_waiting(self, endpoint: str, clock: _Clock) -> None:
        clock.started()
        if not self._waiting.get(endpoint, True):
            del self._waiting[endpoint]

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            cfg = self.config
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=cfg.pool_size, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout, sock_read=None),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def health(self, endpoint: str) -> bool:
        try:
            async with self._get_session().get(
                f"{endpoint}/health", timeout=aiohttp.ClientTimeout(total=self.config.health_timeout)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def served_models(self, endpoint: str) -> dict[str, int | None] | None:
        """The models the engine serves (its ``GET /v1/models``), each with its
        ``max_model_len`` (vLLM and SGLang report it; None where the engine
        does not); None if the engine gave no usable answer."""
        try:
            async with self._get_session().get(
                f"{endpoint}/v1/models", timeout=aiohttp.ClientTimeout(total=self.config.health_timeout)
            ) as resp:
                if resp.status != 200:
                    return None
                cards = _MODELS(await resp.read()).data
        except (aiohttp.ClientError, TimeoutError, OSError, msgspec.DecodeError):
            return None
        return {card.id: card.max_model_len or None for card in cards if card.id}

    async def stream_completion(
        self,
        endpoint: str,
        model: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        headers: dict[str, str] | None = None,
        tenancy: Tenancy | None = None,
        deadline: float | None = None,
        engine_kind: EngineKind = "vllm",
    ) -> AsyncIterator[Chunk | Usage]:
        """Yield a :class:`Chunk` per batch of streamed events, then one :class:`Usage`.

        ``deadline`` (event-loop time) is the caller's: no wait goes past it.
        """
        body = completion_body(model, prompt_token_ids, params, tenancy, engine_kind=engine_kind)
        hdrs = {
            "Content-Type": "application/json",
            "X-Request-Id": _header_value(request_id),
            **(headers or {}),
        }
        events = _EventStream(endpoint)
        clock = _Clock(self.config, deadline, self._waiting.setdefault(endpoint, set()), events)
        try:
            # One deadline for everything up to the first event: connect, send,
            # response head, first token.
            async with clock.first_token():
                resp = await self._get_session().post(f"{endpoint}/v1/completions", data=body, headers=hdrs)
            async with resp:
                if resp.status != 200:
                    raise await _refusal(endpoint, resp)
                content = resp.content
                while not events.done:
                    # Everything buffered, in one piece (not line by line).
                    cut: aiohttp.ClientPayloadError | None = None
                    async with clock.next_read(events.started):
                        try:
                            data = await content.readany()
                        except aiohttp.ClientPayloadError as e:
                            # A body cut short: aiohttp raises before handing
                            # over the bytes that arrived with the cut, and
                            # those tokens are the client's.
                            data, cut = _buffered(content), e
                    chunk, error = events.feed(data) if data or cut is None else (None, "")
                    # Tokens that arrived before an error still go out first:
                    # the error is then a stream error, as it would be one by one.
                    if chunk is not None:
                        yield chunk
                    if cut is not None and not events.done:  # cut after [DONE]: nothing was lost
                        raise cut
                    if error:
                        raise _broken(events.produced, error)
                    if not data:
                        break
        except aiohttp.ConnectionTimeoutError as e:
            # aiohttp's connect timeout: a TimeoutError too, but the engine's
            # failure, to try elsewhere, never the caller's deadline nor the
            # first token's.
            raise _broken(
                events.produced, f"no connection to {endpoint} in {self.config.connect_timeout:g} s ({e})"
            ) from None
        except TimeoutError:
            raise clock.expired(events, endpoint) from None
        except (aiohttp.ClientError, OSError) as e:
            raise _broken(events.produced, f"{type(e).__name__} talking to {endpoint}: {e}") from None
        finally:
            self._stopped_waiting(endpoint, clock)
        if not events.usage.finish_reason:
            raise _broken(events.produced, f"stream from {endpoint} ended without a finish reason")
        yield events.usage


class _Clock:
    """The timeouts of one stream: the first token's, then the idle gap
    between tokens, never past the caller's deadline; :meth:`abort` ends the
    wait for the first token at once (its engine was marked down)."""

    __slots__ = ("_aborted", "_cfg", "_deadline", "_events", "_first", "_timeout", "_waiting", "_which")

    def __init__(
        self, cfg: EngineClientConfig, deadline: float | None, waiting: set[_Clock], events: _EventStream
    ) -> None:
        now = asyncio.get_running_loop().time()
        self._cfg = cfg
        self._deadline = deadline
        self._first = now + cfg.first_token_timeout
        self._which = ""  # what the running wait is bounded by
        self._timeout: asyncio.Timeout | None = None
        self._aborted = ""  # why the first token's wait was ended
        # The streams to this engine still waiting for a first event (the
        # engine client's), which this one is in until its first event.
        self._waiting: set[_Clock] | None = waiting
        waiting.add(self)
        self._events = events

    def started(self) -> None:
        """The first event came (or the stream ended): no longer a first token's wait."""
        if self._waiting is not None:
            self._waiting.discard(self)
            self._waiting = None

    def _at(self, own: float, which: str) -> asyncio.Timeout:
        if self._deadline is not None and self._deadline <= own:
            self._which = "deadline"
            self._timeout = asyncio.timeout_at(self._deadline)
        else:
            self._which = which
            self._timeout = asyncio.timeout_at(own)
        return self._timeout

    def abort(self, why: str) -> bool:
        """End the wait for the first token now; False if it had come."""
        if self._events.started:
            self.started()
            return False
        self._aborted = why
        self._first = asyncio.get_running_loop().time()  # a wait not yet begun ends at once too
        if self._timeout is not None and self._which in ("first_token", "deadline"):
            try:
                self._timeout.reschedule(self._first)
            except RuntimeError:
                pass  # between two waits: the next one starts already expired
        return True

    def first_token(self) -> asyncio.Timeout:
        return self._at(self._first, "first_token")

    def next_read(self, started: bool) -> asyncio.Timeout:
        if not started:
            return self.first_token()
        self.started()
        return self._at(asyncio.get_running_loop().time() + self._cfg.stream_idle_timeout, "idle")

    def expired(self, events: _EventStream, endpoint: str) -> Exception:
        if self._aborted and not events.started:
            return EngineUnavailable(f"{endpoint} before its first token: {self._aborted}")
        if self._which == "deadline":
            return DeadlineReached(f"the request's deadline passed waiting for {endpoint}")
        if self._which == "idle":
            gap = self._cfg.stream_idle_timeout
            return EngineStalled(f"no token from {endpoint} for {gap:g} s")
        return _broken(
            events.produced, f"no first token from {endpoint} in {self._cfg.first_token_timeout:g} s"
        )


# The engine's words for a prompt that does not fit the context window
# (vLLM: "This model's maximum context length is N tokens"; SGLang and the
# simulator say the same).
_CONTEXT_LENGTH = re.compile(r"context length|context_length|max_model_len|too long", re.IGNORECASE)


async def _refusal(endpoint: str, resp: aiohttp.ClientResponse) -> Exception:
    """The exception for a non-200 answer, classified by whose fault it is."""
    try:
        text = (await resp.text())[:2000]
    except (aiohttp.ClientError, UnicodeDecodeError):
        text = ""
    message = _error_message(text) or resp.reason or ""
    status = resp.status
    if status == 429:
        return EngineBusy(f"engine {endpoint} is busy (HTTP 429): {message}")
    if 400 <= status < 500 and status != 408:
        return EngineRejected(status, message, context_length=bool(_CONTEXT_LENGTH.search(message)))
    return EngineUnavailable(f"HTTP {status} from {endpoint}: {message}")


def _error_message(text: str) -> str:
    """The message of an OpenAI-style error body, or the text itself."""
    try:
        body = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text.strip()[:300]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
        if isinstance(err, str):
            return err
    return text.strip()[:300]


class _EventStream:
    """The body of one completion stream, fed as it is read: SSE events ->
    token chunks, the finish reason and the usage. Pure: no I/O."""

    __slots__ = ("_sse", "done", "endpoint", "produced", "started", "usage")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._sse = SSEDecoder()
        self.usage = Usage()
        self.started = False  # an event has arrived (the first-token deadline no longer applies)
        self.produced = False  # a token went to the caller (errors are no longer retryable)
        self.done = False  # [DONE] seen

    def feed(self, data: bytes) -> tuple[Chunk | None, str]:
        """One read (b"": the end of the body) -> the tokens it completed and
        an error message ("" if none)."""
        try:
            payloads = self._sse.feed(data) if data else self._sse.flush()
        except ValueError as e:
            return None, f"bad event stream from {self.endpoint}: {e}"
        if payloads:
            self.started = True
        ids: list[int] = []
        texts: list[str] = []
        error = ""
        for payload in payloads:
            if payload == b"[DONE]":
                self.done = True
                break
            error = self._event(payload, ids, texts)
            if error:
                break
        if not (ids or texts):
            return None, error
        self.produced = True
        return Chunk(token_ids=ids, text="".join(texts)), error

    def _event(self, payload: bytes, ids: list[int], texts: list[str]) -> str:
        try:
            ev = _DECODE(payload)
        except msgspec.DecodeError as e:
            return f"bad JSON chunk from {self.endpoint}: {e}"
        if ev.error is not None and not ev.choices:
            return f"engine error from {self.endpoint}: {ev.error}"
        for choice in ev.choices or ():
            if choice.token_ids:
                ids += choice.token_ids
            if choice.text:
                texts.append(choice.text)
            if choice.finish_reason:
                self.usage.finish_reason = choice.finish_reason
        u = ev.usage
        if u is not None:
            usage = self.usage
            usage.prompt_tokens = u.prompt_tokens or 0
            usage.completion_tokens = u.completion_tokens or 0
            d = u.prompt_tokens_details
            usage.cached_unreported = d is None or d.cached_tokens is None
            usage.cached_tokens = (d.cached_tokens or 0) if d is not None else 0
        return ""


def _buffered(content: aiohttp.StreamReader) -> bytes:
    """What a body that raised still holds: aiohttp's reader raises its error
    before its buffer, and has no public call that returns the buffer then."""
    read = getattr(content, "_read_nowait", None)
    try:
        return read(-1) if read is not None else b""
    except Exception:  # a private call: whatever it raises, nothing is salvaged
        return b""


def _broken(produced: bool, msg: str) -> Exception:
    return EngineStreamError(msg) if produced else EngineUnavailable(msg)


def _header_value(value: str) -> str:
    """A client-chosen value (the request id) that cannot end the header."""
    if "\r" in value or "\n" in value or "\0" in value:
        value = value.replace("\r", " ").replace("\n", " ").replace("\0", " ")
    return value


# --- SSE ------------------------------------------------------------------------------


class SSEDecoder:
    """Splits a server-sent-events byte stream, fed in arbitrary pieces, into
    the ``data`` payloads of its complete events (several ``data:`` lines of
    one event are joined with a newline; other fields and comments are
    ignored). Pure: no I/O."""

    __slots__ = ("_cr", "_pending", "max_event_bytes")

    def __init__(self, max_event_bytes: int = 16 << 20) -> None:
        # A broken engine that never ends an event must not grow the buffer forever.
        self.max_event_bytes = max_event_bytes
        self._pending = b""
        self._cr = False  # the previous piece ended with a bare CR

    def feed(self, data: bytes) -> list[bytes]:
        if b"\r" in data or self._cr:
            # CRLF or CR line ends: normalise to LF. A CR that ends the piece
            # may be the first half of a CRLF split across two reads.
            if self._cr and data.startswith(b"\n"):
                data = data[1:]
            self._cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._pending + data if self._pending else data
        if b"\n\n" not in buf:
            if len(buf) > self.max_event_bytes:
                raise ValueError(f"SSE event longer than {self.max_event_bytes} bytes")
            self._pending = buf
            return []
        events = buf.split(b"\n\n")
        self._pending = events.pop()
        return [p for p in map(_data_of, events) if p is not None]

    def flush(self) -> list[bytes]:
        """The last event when the stream ends without its blank line."""
        rest, self._pending = self._pending, b""
        p = _data_of(rest)
        return [] if p is None else [p]


def _data_of(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:  # the usual one-line event
        return event[6:]
    data = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


# --- wire types: only the fields kvmesh reads are declared; msgspec skips the rest
# (e.g. the prompt's ``prompt_token_ids`` echoed in the first chunk) without
# building Python objects for them.


class _Choice(msgspec.Struct):
    text: str | None = None
    token_ids: list[int] | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _UsageWire(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _UsageWire | None = None
    error: Any = None


_DECODE = msgspec.json.Decoder(_Event).decode


class _ModelCard(msgspec.Struct):
    id: str = ""
    max_model_len: int | None = None


class _ModelList(msgspec.Struct):
    data: list[_ModelCard] = []


_MODELS = msgspec.json.Decoder(_ModelList).decode
