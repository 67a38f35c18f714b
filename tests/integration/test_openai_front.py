"""The OpenAI-compatible front (router/http_front.py) with the official
``openai`` client, sync and async, streaming and not, against real router
processes in front of a real simulated engine.

The model's tokenizer and chat template are a Qwen2.5-style model's
(tests/fixtures/chat_models/qwen2.5: its real chat template): a chat is
rendered and tokenized by the router, which predicts the engine's cache from
its own hashes of those tokens; the engine reports what it found cached. The
two agree only if the router hashed exactly the tokens the engine cached.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine_adapters.chat_template import load_chat_template
from engine_adapters.tokenizer import get_tokenizer
from kvmesh import procs
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
QWEN = REPO / "tests" / "fixtures" / "chat_models" / "qwen2.5"
MODEL = procs.SIM_MODEL
ADAPTER = "sql-lora"
MAX_MODEL_LEN = 4096
BS = 16
CLIENT_TOKEN = "client-token-0123456789abcdef"
WORDS = ["cache", "block", "prefix", "route", "engine", "token", "mesh", "gossip", "shard", "tenant"]


def _text(seed: int, words: int = 120) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _chat(seed: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You answer questions about KV caches. " + _text(seed, 60)},
        {"role": "user", "content": _text(seed + 1)},
    ]


@pytest.fixture(scope="module")
def engine():
    p = procs.start_sim_engine(
        "oai-e0",
        ["--lora-modules", ADAPTER, "--max-model-len", str(MAX_MODEL_LEN), "--time-scale", "0.05"],
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def slow_engine():
    """Real-time steps (10 ms a token): a long stream lasts seconds, so what
    happens during it is not a race with its end."""
    p = procs.start_sim_engine("oai-slow", ["--max-model-len", str(MAX_MODEL_LEN)])
    yield p
    p.stop()


def _router(name: str, engine: procs.Proc, extra: list[str] | None = None, **kw: Any) -> procs.Proc:
    flags = ["--http-listen", "127.0.0.1:0", "--tokenizer", f"{MODEL}={QWEN}", "--health-interval", "0.2"]
    return procs.start_router(name, [procs.engine_flag("e0", engine)], flags + (extra or []), **kw)


@pytest.fixture(scope="module")
def router(engine):
    r = _router("oai-router", engine, ["--metrics-listen", "127.0.0.1:0"])
    yield r
    r.stop()


def _client(router: procs.Proc, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{router.info['http']}/v1", api_key="unused", max_retries=0, **kw)


def _aclient(router: procs.Proc) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{router.info['http']}/v1", api_key="unused", max_retries=0)


async def _index_entries(router: procs.Proc) -> int:
    async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
        return (await pb_grpc.AdminStub(ch).GetStats(pb.GetStatsRequest())).index_entries


async def _wait_index_growth(router: procs.Proc, above: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while await _index_entries(router) <= above:
        assert time.monotonic() < deadline, "the engine's KV events never reached the router's index"
        await asyncio.sleep(0.05)


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200
        return await r.text()


async def _engine_get(engine: procs.Proc, path: str) -> Any:
    text = await _get(f"{engine.info['url']}{path}")
    return json.loads(text) if path.startswith("/admin") else text


def _cached(usage: Any) -> int:
    return usage.prompt_tokens_details.cached_tokens


# --- the API, sync and async, streaming and not -------------------------------------------------


def test_models_list_the_served_model_and_its_adapter(router) -> None:
    cards = {m.id: m for m in _client(router).models.list().data}
    assert set(cards) == {MODEL, ADAPTER}
    assert cards[ADAPTER].model_extra["parent"] == MODEL
    deadline = time.monotonic() + 10
    while _client(router).models.retrieve(MODEL).model_extra["max_model_len"] != MAX_MODEL_LEN:
        assert time.monotonic() < deadline, "the router never learned the engine's context window"
        time.sleep(0.1)


def test_sync_chat_and_completion_whole_and_streamed(router) -> None:
    client = _client(router)
    messages = _chat(10)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=6, extra_headers={"x-request-id": "req-chat-1"}
    )
    chat = raw.parse()
    assert raw.headers["x-request-id"] == "req-chat-1" and chat.id == "chatcmpl-req-chat-1"
    assert raw.headers["x-kvmesh-engine"] == "e0"
    assert chat.object == "chat.completion" and chat.model == MODEL
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 6
    # The engine was sent the template's rendering, tokenized by the model's tokenizer.
    template = load_chat_template(str(QWEN))
    assert template is not None
    expected = get_tokenizer(str(QWEN)).encode(template.render(messages))
    assert chat.usage.prompt_tokens == len(expected)

    stream = client.chat.completions.create(
        model=MODEL,
        messages=_chat(11),
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    comp = client.completions.create(model=MODEL, prompt=_text(12), max_tokens=5)
    assert comp.object == "text_completion" and comp.choices[0].text and comp.usage.completion_tokens == 5
    ids = client.completions.create(model=MODEL, prompt=list(range(40, 140)), max_tokens=3)
    assert ids.usage.prompt_tokens == 100  # token ids go to the engine as they are
    pieces = list(client.completions.create(model=MODEL, prompt=_text(13), max_tokens=7, stream=True))
    assert pieces[-1].choices[0].finish_reason == "length" and "".join(p.choices[0].text for p in pieces)


async def test_async_client_streams_concurrently(router) -> None:
    client = _aclient(router)

    async def one(seed: int) -> tuple[str, Any]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=_chat(seed),
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage

    results = await asyncio.gather(*(one(100 + i) for i in range(6)))
    assert all(text and usage.completion_tokens == 10 for text, usage in results)
    whole = await client.chat.completions.create(model=MODEL, messages=_chat(120), max_tokens=3)
    assert whole.usage.completion_tokens == 3
    await client.close()


# --- the cache: hashes that match the engine's, tenants kept apart ------------------------------


async def test_a_repeated_chat_is_predicted_and_found_cached(router) -> None:
    client = _aclient(router)

    async def send(messages: list[dict[str, str]]) -> tuple[int, Any]:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=4
        )
        usage = raw.parse().usage
        predicted = int(raw.headers["x-kvmesh-predicted-cached-tokens"])
        # The router's prediction (its hashes of its rendering) is exactly what the engine found.
        assert _cached(usage) == predicted, (predicted, usage)
        return predicted, usage

    messages = _chat(200)
    before = await _index_entries(router)
    predicted, usage = await send(messages)
    full = usage.prompt_tokens // BS * BS
    assert predicted < full - BS  # at most the system prompt's start, which other chats share
    await _wait_index_growth(router, before)
    # The same chat, then the next turn of it (whose rendering starts with the first's).
    assert (await send(messages))[0] >= full - BS
    follow_up = [*messages, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    assert (await send(follow_up))[0] >= full - BS
    await client.close()


async def test_cache_salt_keeps_tenants_apart(router) -> None:
    client = _aclient(router)
    messages = _chat(300)

    async def send(**extra: Any) -> tuple[int, int]:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=2, extra_body=extra or None
        )
        return int(raw.headers["x-kvmesh-predicted-cached-tokens"]), _cached(raw.parse().usage)

    before = await _index_entries(router)
    assert await send(cache_salt="tenant-a") == (0, 0)  # a salted first block: nothing shared
    await _wait_index_growth(router, before)
    predicted, cached = await send(cache_salt="tenant-a")
    assert predicted > 0 and cached == predicted
    assert await send(cache_salt="tenant-b") == (0, 0)  # neither predicted nor served A's blocks
    unsalted = await send()
    assert unsalted[0] == unsalted[1] < predicted  # at most the shared system prompt start
    await client.close()


async def test_an_adapter_named_as_model_is_served_by_the_adapter(router, engine) -> None:
    client = _aclient(router)
    served_before = (await _engine_get(engine, "/admin/stats"))["served"]
    prompt = _text(400)
    comp = await client.completions.create(model=ADAPTER, prompt=prompt, max_tokens=3)
    assert comp.model == ADAPTER
    explicit = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, extra_body={"lora_name": ADAPTER}
    )
    assert _cached(explicit.usage) > 0  # the adapter's own blocks, from the first request
    base = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=3)
    assert _cached(base.usage) == 0  # never the adapter's blocks
    served = (await _engine_get(engine, "/admin/stats"))["served"]
    assert served.get(ADAPTER, 0) - served_before.get(ADAPTER, 0) == 2
    assert served.get(MODEL, 0) - served_before.get(MODEL, 0) == 1
    with pytest.raises(openai.BadRequestError) as e:  # an adapter the engine does not have
        await client.completions.create(
            model=MODEL, prompt="x", max_tokens=1, extra_body={"lora_name": "nope"}
        )
    assert e.value.code == "engine_rejected"
    await client.close()


# --- errors, auth, overload, drain --------------------------------------------------------------


def test_bad_requests_get_openai_errors_and_the_node_carries_on(router) -> None:
    client = _client(router)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=msgs, n=2)
    assert (e.value.code, e.value.param, e.value.type) == ("invalid_request", "n", "invalid_request_error")
    assert e.value.response.headers["x-kvmesh-reason"] == "invalid_request"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=msgs, extra_body={"top_k": 3})
    assert e.value.param == "top_k"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}] * 0)
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens past the engine's window
        client.completions.create(model=MODEL, prompt=list(range(300, 400)), max_tokens=MAX_MODEL_LEN)
    assert e.value.code == "context_length"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=msgs)
    assert e.value.code == "model_not_found" and "no-such-model" in e.value.message
    # Bodies the openai client would never send.
    with openai.DefaultHttpxClient(base_url=f"http://{router.info['http']}") as http:
        r = http.post("/v1/chat/completions", content=b"{not json", headers={"x-request-id": "bad-1"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "bad-1"
        assert r.json()["error"]["code"] == "invalid_request" and "JSON" in r.json()["error"]["message"]
        r = http.get("/v1/embeddings")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_route"
        r = http.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert http.get("/health").json() == {"status": "ok"}
    ok = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_http_requests_are_counted_as_grpc_calls_are(router) -> None:
    client = _client(router)
    client.chat.completions.create(model=MODEL, messages=_chat(800), max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    text = asyncio.run(_get(f"http://{router.info['metrics']}/metrics"))
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    chat_ok = [
        s
        for s in samples
        if s.name == "kvmesh_request_duration_seconds_count"
        and s.labels.get("rpc") == "/v1/chat/completions"
        and s.labels.get("code") == "OK"
    ]
    assert chat_ok and chat_ok[0].value >= 1 and chat_ok[0].labels["policy"] == "precise"
    assert any(
        s.labels.get("reason") == "model_not_found" and s.labels.get("code") == "NOT_FOUND" and s.value >= 1
        for s in samples
    ), "the refused request is not counted by its reason"


def test_unreadable_http_is_the_clients_mistake_counted_without_a_traceback(router) -> None:
    # aiohttp answers a request it cannot parse 400 itself; the node counts
    # and logs it as any refusal, not as an aiohttp traceback.
    import socket

    async def outcomes() -> dict[str, int]:
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            return dict((await pb_grpc.AdminStub(ch).GetStats(pb.GetStatsRequest())).outcomes)

    before = asyncio.run(outcomes()).get("INVALID_ARGUMENT:bad_http", 0)
    host, port = router.info["http"].rsplit(":", 1)
    for raw in (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\ntracestate: a=b,\x01\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(raw)
            assert sock.recv(64).startswith(b"HTTP/1.0 400")
    deadline = time.monotonic() + 10
    while asyncio.run(outcomes()).get("INVALID_ARGUMENT:bad_http", 0) < before + 2:
        assert time.monotonic() < deadline, "the unreadable requests were not counted"
        time.sleep(0.05)
    lines = list(router.output)
    assert not any("Traceback" in line or "Error handling request" in line for line in lines)
    assert any("reason=bad_http" in line and "unreadable HTTP request" in line for line in lines)


def test_a_request_names_its_policy_as_on_grpc(router) -> None:
    client = _client(router)
    comp = client.completions.create(
        model=MODEL, prompt=_text(900), max_tokens=2, extra_body={"policy": "round_robin"}
    )
    assert comp.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"policy": "nope"})
    assert e.value.code == "invalid_request" and "unknown policy 'nope'" in e.value.message
    text = asyncio.run(_get(f"http://{router.info['metrics']}/metrics"))
    counted = [
        s
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "kvmesh_request_duration_seconds_count"
        and s.labels.get("rpc") == "/v1/completions"
        and s.labels.get("policy") == "round_robin"
        and s.labels.get("code") == "OK"
    ]
    assert counted and counted[0].value >= 1


def test_a_client_that_goes_away_aborts_its_engine_request(slow_engine) -> None:
    def aborted() -> float:
        text = asyncio.run(_engine_get(slow_engine, "/metrics"))
        lines = [line for line in text.splitlines() if line.startswith("kvmesh_sim_requests_aborted")]
        return sum(float(line.split()[-1]) for line in lines)

    router = _router("oai-leave", slow_engine)
    try:
        before = aborted()
        stream = _client(router).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me everything."}],
            max_tokens=2000,  # 20 s of tokens
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline = time.monotonic() + 10
        while aborted() <= before:
            assert time.monotonic() < deadline, "the engine kept generating for a client that left"
            time.sleep(0.1)
    finally:
        router.stop()


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("oai-secrets")
    (d / "tokens").write_text(f"{CLIENT_TOKEN}\n")
    (d / "mesh-secret").write_text("a-shared-mesh-secret-of-32-bytes!\n")
    subprocess.run(
        ["bash", str(REPO / "deploy" / "make-certs.sh"), str(d / "pki")], check=True, capture_output=True
    )
    return d


def test_tokens_and_tls_are_the_public_ports(engine, secrets: Path) -> None:
    pki = secrets / "pki"
    flags = [
        "--auth-token-file", str(secrets / "tokens"),
        "--mesh-secret-file", str(secrets / "mesh-secret"),
        "--tls-cert", str(pki / "server.pem"),
        "--tls-key", str(pki / "server.key"),
    ]  # fmt: skip
    r = _router("oai-auth", engine, flags, insecure=False)
    try:
        base = f"https://{r.info['http']}/v1"
        trusted = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(pki / "ca.pem")))
        msgs = [{"role": "user", "content": "hi"}]
        good = openai.OpenAI(base_url=base, api_key=CLIENT_TOKEN, max_retries=0, http_client=trusted)
        assert (
            good.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2).usage.completion_tokens
            == 2
        )
        wrong = openai.OpenAI(
            base_url=base, api_key="not-a-token-at-all-xxxx", max_retries=0, http_client=trusted
        )
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.models.list()
        assert e.value.code == "bad_token" and e.value.response.headers["www-authenticate"] == "Bearer"
        r2 = trusted.post(f"{base}/completions", json={"model": MODEL, "prompt": "x"})
        assert r2.status_code == 401 and r2.json()["error"]["code"] == "no_token"
        assert trusted.get(f"https://{r.info['http']}/health").status_code == 200  # probes need no token
        with pytest.raises((OSError, http.client.HTTPException)):  # plaintext to the TLS port
            urllib.request.urlopen(f"http://{r.info['http']}/health", timeout=5)
        with pytest.raises(openai.APIConnectionError):  # a certificate nobody vouched for
            openai.OpenAI(base_url=base, api_key=CLIENT_TOKEN, max_retries=0).models.list()
    finally:
        r.stop()


def test_without_credentials_the_http_front_does_not_start() -> None:
    out = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "kvmesh"), "router",
            "--listen", f"127.0.0.1:{procs.free_port()}",
            "--http-listen", f"127.0.0.1:{procs.free_port()}",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "without authentication" in out.stderr


async def test_past_its_bound_a_node_answers_429(slow_engine) -> None:
    r = _router("oai-shed", slow_engine, ["--max-in-flight", "1", "--max-queue", "0"])
    try:
        client = _aclient(r)
        long = await client.chat.completions.create(
            model=MODEL, messages=_chat(600), max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        first = await long.__anext__()  # the long one holds the node's only slot
        assert first.choices[0].delta.role == "assistant"
        with pytest.raises(openai.RateLimitError) as e:
            await client.chat.completions.create(model=MODEL, messages=_chat(601), max_tokens=2)
        assert e.value.code == "overloaded" and e.value.response.headers["retry-after"] == "1"
        rest = [c async for c in long]
        assert rest[-1].choices[0].finish_reason == "length"
        await client.close()
    finally:
        r.stop()


async def test_sigterm_drains_streams_and_refuses_new_requests(slow_engine) -> None:
    r = _router("oai-drain", slow_engine)
    stopped = False
    try:
        client = _aclient(r)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=_chat(700),
            max_tokens=300,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        await stream.__anext__()
        r.popen.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(model=MODEL, messages=_chat(701), max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "draining"
        async with aiohttp.ClientSession() as http, http.get(f"http://{r.info['http']}/health") as h:
            assert h.status == 503 and (await h.json()) == {"status": "draining"}
        chunks = [c async for c in stream]
        assert chunks[-1].usage.completion_tokens == 300  # the stream ran to its last token
        await client.close()
        assert r.popen.wait(30) == 0
        stopped = True
    finally:
        if not stopped:
            r.stop()
