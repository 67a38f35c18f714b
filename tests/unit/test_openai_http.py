"""The HTTP shell (router/http_front.py) in process: a real RouterNode, a
scripted engine client, the official async openai client. What the
multi-process tests cannot provoke on demand: an engine that fails before
its first token (retried, status still to come) or after it (an error
event in a stream already 200), a node still joining, a body too large."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from engine_adapters.proxy import Chunk, EngineStreamError, EngineUnavailable, Usage
from router.auth import TokenTable
from router.config import RouterConfig
from router.engine_registry import EngineSpec
from router.http_front import HttpFront
from router.node import RouterNode

TOKEN = "client-token-0123456789abcdef"
MODEL = "m"


class ScriptedClient:
    """Per endpoint: "ok", "refuse" (before any token) or "break" (after two chunks)."""

    def __init__(self, script: dict[str, str]) -> None:
        self.script = script
        self.calls: list[tuple[str, list[int], str]] = []

    async def stream_completion(
        self,
        endpoint,
        model,
        token_ids,
        params,
        request_id,
        headers=None,
        tenancy=None,
        deadline=None,
        kind="",
    ) -> AsyncIterator[Any]:
        self.calls.append((endpoint, list(token_ids), request_id))
        what = self.script[endpoint]
        if what == "refuse":
            raise EngineUnavailable(f"{endpoint} refused")
        yield Chunk([7], " Hello")
        yield Chunk([8], " there")
        if what == "break":
            raise EngineStreamError("connection reset by the engine")
        yield Usage(len(token_ids), 2, 16, "stop")

    async def health(self, endpoint: str) -> bool:
        return True

    async def close(self) -> None:
        pass


class Front:
    def __init__(self, script: dict[str, str], tokens: TokenTable | None = None, **cfg: Any) -> None:
        self.node = RouterNode(RouterConfig(node_id="n1", policy="round_robin", **cfg))
        for eid in script:
            self.node.engines.put(EngineSpec(eid, f"http://{eid}:80", model=MODEL, block_size=4).validate())
        self.client = ScriptedClient({f"http://{eid}:80": what for eid, what in script.items()})
        self.node.client = self.client  # duck-typed: the methods the node calls
        self.refused: list[tuple[str, ...]] = []

        def refused(*a: str) -> str:
            self.refused.append(a)
            return a[3]  # the front's request id

        self.front = HttpFront(self.node, tokens, refused)
        self.server = TestServer(self.front.app())

    async def __aenter__(self) -> Front:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()
        await self.front.stop()

    def ready(self) -> Front:
        self.node.core.join([], self.node.clock())  # the first node of a mesh: ready at once
        return self

    def openai(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=str(self.server.make_url("/v1")), api_key=api_key, max_retries=0)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


MSGS = [{"role": "user", "content": "Hi"}]


async def test_a_refusal_before_the_first_token_is_retried_before_any_status() -> None:
    async with Front({"e1": "refuse", "e2": "ok"}) as f:
        f.ready()
        raw = await f.openai().chat.completions.with_raw_response.create(
            model=MODEL, messages=MSGS, stream=True, extra_headers={"x-request-id": "r-7"}
        )
        assert raw.http_response.status_code == 200 and raw.headers["x-kvmesh-engine"] == "e2"
        chunks = [c async for c in raw.parse()]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == " Hello there"
        assert chunks[-1].choices[0].finish_reason == "stop"
        # Both attempts carried the ChatML rendering of the builtin tokenizer, and the request id.
        (e1, ids1, rid1), (e2, ids2, rid2) = f.client.calls
        assert (e1, e2, rid1, rid2) == ("http://e1:80", "http://e2:80", "r-7", "r-7")
        assert (
            ids1
            == ids2
            == f.node.tokenizer(MODEL).encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        )
        assert f.node.outcomes.counts["OK"] == 1


async def test_a_stream_broken_after_its_first_tokens_ends_with_an_error_event() -> None:
    async with Front({"e1": "break"}) as f:
        f.ready()
        stream = await f.openai().chat.completions.create(model=MODEL, messages=MSGS, stream=True)
        got: list[str] = []
        with pytest.raises(openai.APIError) as e:
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
        assert "".join(got) == " Hello there"  # what had been sent stays sent
        assert e.value.code == "engine_failed" and "mid-stream" in e.value.message
        assert f.node.outcomes.counts["UNAVAILABLE:engine_failed"] == 1
        # Not streamed: the same failure is a status (502), nothing partial.
        with pytest.raises(openai.APIStatusError) as e2:
            await f.openai().chat.completions.create(model=MODEL, messages=MSGS)
        assert e2.value.status_code == 502 and e2.value.code == "engine_failed"


async def test_no_engine_left_is_503_with_retry_after() -> None:
    async with Front({"e1": "refuse"}) as f:
        f.ready()
        with pytest.raises(openai.InternalServerError) as e:
            await f.openai().completions.create(model=MODEL, prompt="hi", stream=True)
        assert e.value.status_code == 503 and e.value.code == "no_engine"
        assert e.value.response.headers["retry-after"] == "1"


async def test_a_joining_node_refuses_and_says_so_on_health() -> None:
    async with Front({"e1": "ok"}) as f, aiohttp.ClientSession() as http:
        async with http.get(f.url("/health")) as r:
            assert r.status == 503 and await r.json() == {"status": "joining"}
        with pytest.raises(openai.APIStatusError) as e:
            await f.openai().completions.create(model=MODEL, prompt="hi")
        assert e.value.status_code == 503 and e.value.code == "joining"
        f.ready()
        async with http.get(f.url("/health")) as r:
            assert r.status == 200
        f.node.draining = True
        with pytest.raises(openai.APIStatusError) as e:
            await f.openai().completions.create(model=MODEL, prompt="hi")
        assert e.value.code == "draining"
        assert f.client.calls == []


async def test_a_body_over_the_bound_is_413() -> None:
    async with Front({"e1": "ok"}, max_request_bytes=2000) as f, aiohttp.ClientSession() as http:
        f.ready()
        body = {"model": MODEL, "prompt": "x" * 5000}
        async with http.post(f.url("/v1/completions"), json=body) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"
        assert f.client.calls == []


async def test_tokens_are_checked_and_refusals_reported() -> None:
    async with Front({"e1": "ok"}, TokenTable({TOKEN: "client"})) as f, aiohttp.ClientSession() as http:
        f.ready()
        ok = await f.openai(TOKEN).completions.create(model=MODEL, prompt="hi")
        assert ok.choices[0].text == " Hello there"
        with pytest.raises(openai.AuthenticationError) as e:
            await f.openai("wrong-token-xxxxxxxxxxxx").models.list()
        assert e.value.code == "bad_token"
        async with http.get(f.url("/v1/models")) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "no_token"
        async with http.get(f.url("/health")) as r:
            assert r.status == 200
        bad_id = {"x-request-id": "x" * 300}  # the token is checked first: no 400 for a caller without one
        async with http.get(f.url("/v1/models"), headers=bad_id) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "no_token"
        async with http.get(f.url("/v1/models"), headers={**bad_id, "authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 400 and "x-request-id" in (await r.json())["error"]["message"]
        assert [(code, reason) for code, reason, *_ in f.refused] == [
            ("UNAUTHENTICATED", "bad_token"),
            ("UNAUTHENTICATED", "no_token"),
            ("UNAUTHENTICATED", "no_token"),
        ]
        assert all(
            len(a[3]) == 32 and a[4] == "127.0.0.1" for a in f.refused
        )  # the request's id and its caller


async def test_a_model_without_a_chat_template_refuses_chat_but_serves_completions(tmp_path) -> None:
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = tokenizers.Tokenizer(WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    async with Front({"e1": "ok"}, tokenizers={MODEL: str(tmp_path)}) as f:
        f.ready()
        with pytest.raises(openai.BadRequestError) as e:
            await f.openai().chat.completions.create(model=MODEL, messages=MSGS)
        assert e.value.param == "messages" and "no chat template" in e.value.message
        ok = await f.openai().completions.create(model=MODEL, prompt="hi hi")
        assert ok.usage.prompt_tokens == 2 and f.client.calls[-1][1] == [1, 1]


def test_the_flags_reach_the_config_and_a_bad_address_is_refused_at_start() -> None:
    import argparse

    from kvmesh.cli.router import config_from_args, configure_parser

    p = argparse.ArgumentParser()
    configure_parser(p)
    cfg = config_from_args(
        p.parse_args(
            ["--http-listen", "0.0.0.0:8080", "--chat-template", "m=/t/chat.jinja", "--tokenizer", "m=/t"]
        )
    )
    assert (cfg.http_listen, cfg.chat_templates, cfg.tokenizers) == (
        "0.0.0.0:8080",
        {"m": "/t/chat.jinja"},
        {"m": "/t"},
    )
    assert config_from_args(p.parse_args([])).http_listen == RouterConfig().http_listen == ""  # off
    for bad in ("bogus", "host:", ":80", "h:99999"):
        with pytest.raises(ValueError, match="--http-listen"):
            config_from_args(p.parse_args(["--http-listen", bad]))
    with pytest.raises(ValueError, match="--chat-template 'x': want MODEL=FILE"):
        config_from_args(p.parse_args(["--chat-template", "x"]))
