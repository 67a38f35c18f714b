"""Client for an engine's OpenAI-compatible ``/v1/completions`` stream.

vLLM and SGLang both serve it; kvmesh always sends token ids (the router has
already tokenized and hashed them, so the engine must cache exactly those ids)
and asks for ``return_token_ids`` (vLLM >= 0.10.2) so generated ids stream back.
The usage block of the last chunk carries ``prompt_tokens_details.cached_tokens``:
the engine's own word on how much of the prompt it found cached.

Errors are split by what the caller can still do: :class:`EngineUnavailable`
before the first token (safe to retry on another engine), :class:`EngineStreamError`
after it (tokens were already sent to the client).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp


class EngineUnavailable(Exception):
    """The engine refused or failed before producing any token: retryable."""


class EngineStreamError(Exception):
    """The stream broke after tokens were produced: not retryable."""


@dataclass(slots=True)
class CompletionParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None


@dataclass(slots=True)
class Chunk:
    token_ids: list[int]
    text: str


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = ""


class EngineClient:
    """One pooled HTTP session shared by all requests to all engines."""

    def __init__(
        self,
        connect_timeout: float = 2.0,
        first_token_timeout: float = 120.0,
        pool_size: int = 512,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._first_token_timeout = first_token_timeout
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._connect_timeout, sock_read=None
                ),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def health(self, endpoint: str, timeout: float = 1.0) -> bool:
        try:
            async with self._get_session().get(
                f"{endpoint}/health", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def stream_completion(
        self,
        endpoint: str,
        model: str,
        prompt_token_ids: list[int],
        params: CompletionParams,
        request_id: str,
        headers: dict[str, str] | None = None,
    ) -> AsyncIterator[Chunk | Usage]:
        """Yield :class:`Chunk` per streamed piece, then one :class:`Usage`."""
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt_token_ids,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        if params.stop:
            body["stop"] = params.stop
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.seed is not None:
            body["seed"] = params.seed
        hdrs = {"X-Request-Id": request_id, **(headers or {})}
        usage = Usage()
        produced = False
        try:
            async with self._get_session().post(
                f"{endpoint}/v1/completions", json=body, headers=hdrs
            ) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    raise EngineUnavailable(f"HTTP {resp.status} from {endpoint}: {detail}")
                async for data in _sse_events(resp.content, self._first_token_timeout):
                    if data == "[DONE]":
                        break
                    try:
                        obj = json.loads(data)
                    except json.JSONDecodeError as e:
                        raise _broken(produced, f"bad JSON chunk from {endpoint}: {e}") from None
                    if "error" in obj and not obj.get("choices"):
                        raise _broken(produced, f"engine error from {endpoint}: {obj['error']}")
                    for choice in obj.get("choices") or ():
                        ids = choice.get("token_ids") or []
                        text = choice.get("text") or ""
                        if ids or text:
                            produced = True
                            yield Chunk(token_ids=list(ids), text=text)
                        if choice.get("finish_reason"):
                            usage.finish_reason = choice["finish_reason"]
                    u = obj.get("usage")
                    if u:
                        usage.prompt_tokens = int(u.get("prompt_tokens") or 0)
                        usage.completion_tokens = int(u.get("completion_tokens") or 0)
                        details = u.get("prompt_tokens_details") or {}
                        usage.cached_tokens = int(details.get("cached_tokens") or 0)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise _broken(produced, f"{type(e).__name__} talking to {endpoint}: {e}") from None
        if not usage.finish_reason:
            raise _broken(produced, f"stream from {endpoint} ended without a finish reason")
        yield usage


def _broken(produced: bool, msg: str) -> Exception:
    return EngineStreamError(msg) if produced else EngineUnavailable(msg)


async def _sse_events(content: aiohttp.StreamReader, first_timeout: float) -> AsyncIterator[str]:
    """The ``data:`` payloads of a server-sent-events stream."""
    buf: list[str] = []
    first = True
    while True:
        if first:
            line_b = await asyncio.wait_for(content.readline(), first_timeout)
        else:
            line_b = await content.readline()
        if not line_b:
            if buf:
                yield "\n".join(buf)
            return
        line = line_b.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if buf:
                first = False
                yield "\n".join(buf)
                buf = []
            continue
        if line.startswith("data:"):
            buf.append(line[5:].lstrip())
