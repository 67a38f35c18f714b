"""RouterNode.generate and route_only, the thin loops around the request
path's core, against a scripted engine client (no network, no mesh peers)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine_adapters.completion_request import SamplingParams
from engine_adapters.proxy import (
    Chunk,
    EngineBusy,
    EngineRejected,
    EngineStalled,
    EngineStreamError,
    EngineUnavailable,
    Usage,
)
from router.admission import AdmissionConfig
from router.config import RouterConfig
from router.engine_registry import EngineSpec
from router.errors import (
    ContextTooLong,
    DeadlineExceeded,
    Draining,
    EnginesBusy,
    NoEngineAvailable,
    Overloaded,
    RequestError,
    RequestRejected,
    StreamFailed,
)
from router.node import RouterNode
from router.request_path import ClientRequest, Finished, RetryPolicy, Routed


class ScriptedClient:
    """Per endpoint: "ok", "refuse" (before any token), "busy" (a full queue) or "break" (after one)."""

    def __init__(self, script: dict[str, str]) -> None:
        self.script = script
        self.calls: list[tuple[str, dict[str, str]]] = []

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
        engine_kind="vllm",
    ):
        self.calls.append((endpoint, dict(headers or {})))
        what = self.script[endpoint]
        if what == "refuse":
            raise EngineUnavailable(f"{endpoint} refused")
        if what == "busy":
            raise EngineBusy(f"{endpoint} is busy (HTTP 429)")
        yield Chunk([7], " a")
        if what == "break":
            raise EngineStreamError(f"{endpoint} cut")
        yield Usage(len(token_ids), params.max_tokens, 0, "length")

    async def health(self, endpoint: str) -> bool:
        return True

    async def close(self) -> None:
        pass


def _node(script: dict[str, str], **cfg: Any) -> tuple[RouterNode, ScriptedClient]:
    node = RouterNode(RouterConfig(node_id="n1", policy="round_robin", **cfg))
    for eid in script:
        node.engines.put(EngineSpec(eid, f"http://{eid}:80", block_size=4).validate())
    client = ScriptedClient({f"http://{eid}:80": what for eid, what in script.items()})
    node.client = client  # duck-typed: the two methods the node calls
    return node, client


async def _run(node: RouterNode, ids: list[int] | None = None) -> list[object]:
    prep = node.prepare(ClientRequest(request_id="r1", token_ids=ids or list(range(20))))
    return [x async for x in node.generate(prep, SamplingParams(max_tokens=3))]


async def test_a_refusal_is_retried_on_the_next_worker_and_counted():
    node, client = _node({"e1": "refuse", "e2": "ok"})
    out = await _run(node)
    assert [type(x) for x in out] == [Routed, Routed, Chunk, Finished]
    assert [(r.engine_id, r.attempt) for r in out[:2]] == [("e1", 1), ("e2", 2)]
    fin = out[-1]
    assert (fin.engine_id, fin.attempts, fin.completion_tokens) == ("e2", 2, 3)
    assert [c[0] for c in client.calls] == ["http://e1:80", "http://e2:80"]
    s = node.stats
    assert (s.requests_total, s.retries_total, s.requests_failed) == (1, 1, 0)
    assert node.stats.failures_by_engine["e1"] == 1 and node.stats.attempts_by_engine["e2"] == 1
    assert node.load.local.slot() == {}


async def test_every_worker_refusing_spends_the_attempt_budget_then_fails():
    node, client = _node({"e1": "refuse", "e2": "refuse", "e3": "refuse"}, retry=RetryPolicy(max_attempts=2))
    with pytest.raises(NoEngineAvailable, match=r"no engine could serve the request: .* refused"):
        await _run(node)
    assert len(client.calls) == 2 and len({c[0] for c in client.calls}) == 2
    assert (node.stats.retries_total, node.stats.requests_failed) == (1, 1)  # 2 attempts: 1 retry
    assert node.load.local.slot() == {}


async def test_running_out_of_workers_fails_before_the_budget():
    node, client = _node({"e1": "refuse"}, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(NoEngineAvailable, match="none of 1 candidates is healthy"):
        await _run(node)
    assert len(client.calls) == 1


async def test_a_stream_broken_after_the_first_token_is_not_retried_and_ends_unavailable():
    node, client = _node({"e1": "break", "e2": "ok"})
    prep = node.prepare(ClientRequest(request_id="r1", token_ids=list(range(20))))
    out: list[object] = []
    with pytest.raises(StreamFailed, match=r"e1 failed mid-stream: .*cut") as e:
        async for x in node.generate(prep, SamplingParams(max_tokens=3)):
            out.append(x)
    assert e.value.grpc_code == "UNAVAILABLE"
    assert [type(x) for x in out] == [Routed, Chunk, Finished]
    assert out[-1].finish_reason == "error" and "cut" in out[-1].error
    assert len(client.calls) == 1 and node.stats.requests_failed == 1
    assert node.in_flight() == 0


async def test_data_parallel_workers_get_their_rank_header():
    node, client = _node({})
    node.engines.put(EngineSpec("dp", "http://dp:80", block_size=4, data_parallel_size=2).validate())
    client.script["http://dp:80"] = "ok"
    await _run(node)
    await _run(node, list(range(30)))  # round robin: the other rank
    assert sorted(h["X-data-parallel-rank"] for _, h in client.calls) == ["0", "1"]


async def test_a_route_pick_counts_as_load_for_route_load_ttl():
    node, _ = _node({"e1": "ok"}, route_load_ttl=0.05)
    prep = node.prepare(ClientRequest(request_id="r1", token_ids=list(range(20))))
    assert node.route_only(prep, dry_run=True).engine_id == "e1"
    assert node.load.local.slot() == {}
    node.route_only(prep, dry_run=False)
    assert node.load.local.slot() == {"e1": (1, 20 + 4)}
    await asyncio.sleep(0.1)
    assert node.load.local.slot() == {}


class RefusingClient(ScriptedClient):
    """Per endpoint an exception to raise before any token."""

    def __init__(self, errors: dict[str, Exception]) -> None:
        super().__init__({e: "ok" for e in errors})
        self.errors = errors

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
        engine_kind="vllm",
    ):
        self.calls.append((endpoint, dict(headers or {})))
        err = self.errors.get(endpoint)
        if err is not None:
            raise err
        yield Chunk([7], " a")
        yield Usage(len(token_ids), params.max_tokens, 0, "length")


def _refusing(errors: dict[str, Exception], **cfg: Any) -> tuple[RouterNode, RefusingClient]:
    node, _ = _node({eid: "ok" for eid in errors}, **cfg)
    client = RefusingClient({f"http://{eid}:80": e for eid, e in errors.items() if e is not None})
    client.errors.update({f"http://{eid}:80": None for eid, e in errors.items() if e is None})
    node.client = client
    return node, client


async def test_a_client_mistake_is_not_an_engine_failure_and_is_not_retried():
    bad = EngineRejected(400, "max_tokens is too large")
    node, client = _refusing({"e1": bad, "e2": bad})
    for _ in range(5):  # more than the breaker's threshold
        with pytest.raises(RequestRejected, match=r"HTTP 400.*max_tokens is too large") as e:
            await _run(node)
        assert e.value.grpc_code == "INVALID_ARGUMENT"
    assert len(client.calls) == 5  # one engine per request: no retry
    assert (
        all(r.breaker.state == "closed" for r in node.engines.values()) and not +node.stats.failures_by_engine
    )
    too_long = EngineRejected(400, "maximum context length is 100 tokens", context_length=True)
    node, _ = _refusing({"e1": too_long})
    with pytest.raises(ContextTooLong) as e2:
        await _run(node)
    assert e2.value.grpc_code == "RESOURCE_EXHAUSTED" and e2.value.reason == "context_length"


async def test_full_engine_queues_are_tried_elsewhere_then_reported_busy():
    busy = EngineBusy("queue full")
    node, client = _refusing({"e1": busy, "e2": None})
    out = await _run(node)
    assert isinstance(out[-1], Finished) and out[-1].engine_id == "e2"
    assert node.stats.failures_by_engine["e1"] == 0 and node.engines["e1"].breaker.state == "closed"
    node, client = _refusing({"e1": busy, "e2": busy})
    with pytest.raises(EnginesBusy) as e:
        await _run(node)
    assert e.value.grpc_code == "RESOURCE_EXHAUSTED" and len(client.calls) == 2


async def test_validation_happens_before_routing():
    node, client = _node({"e1": "ok"})
    node.engines["e1"].max_model_len = 30
    prep = node.prepare(ClientRequest(token_ids=list(range(20))))
    with pytest.raises(ContextTooLong, match=r"20 tokens \+ max_tokens 16 exceeds .* \(30 tokens\)"):
        async for _ in node.generate(prep, SamplingParams(max_tokens=16)):
            pass
    for params in (SamplingParams(max_tokens=0), SamplingParams(max_tokens=1, temperature=-1.0),
                   SamplingParams(max_tokens=1, top_p=1.5)):  # fmt: skip
        with pytest.raises(RequestError):
            async for _ in node.generate(node.prepare(ClientRequest(token_ids=[1])), params):
                pass
    for salt in ("a/b", "x" * 129, "tab\tsalt"):
        bad = node.prepare(ClientRequest(token_ids=[1], cache_salt=salt))
        with pytest.raises(RequestError, match="cache_salt"):
            async for _ in node.generate(bad, SamplingParams(max_tokens=1)):
                pass
    assert client.calls == [] and node.in_flight() == 0


async def test_an_overloaded_node_sheds_at_once_and_a_draining_one_refuses():
    node, _ = _node({"e1": "ok"}, admission=AdmissionConfig(max_in_flight=1, max_queue=0))
    await node.admission.enter("someone else's request")
    prep = node.prepare(ClientRequest(token_ids=list(range(20))))
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(Overloaded) as e:
        async for _ in node.generate(prep, SamplingParams(max_tokens=3)):
            pass
    assert asyncio.get_running_loop().time() - t0 < 0.05
    assert (e.value.grpc_code, e.value.reason) == ("RESOURCE_EXHAUSTED", "overloaded")
    node.draining = True
    with pytest.raises(Draining) as d:
        node.prepare(ClientRequest(token_ids=[1]))
    assert d.value.grpc_code == "UNAVAILABLE"


async def test_a_stall_after_the_first_token_ends_deadline_exceeded():
    class Stalling(ScriptedClient):
        async def stream_completion(self, *a, **kw):
            yield Chunk([7], " a")
            raise EngineStalled("no token for 30 s")

    node, _ = _node({"e1": "ok"})
    node.client = Stalling({})
    out: list[object] = []
    with pytest.raises(DeadlineExceeded) as e:
        async for x in node.generate(
            node.prepare(ClientRequest(token_ids=list(range(20)))), SamplingParams(3)
        ):
            out.append(x)
    assert e.value.reason == "stream_stalled" and isinstance(out[-1], Finished) and out[-1].error
    assert node.in_flight() == 0 and node.load.local.slot() == {}


async def test_a_half_open_breaker_is_not_stuck_when_its_probe_is_abandoned():
    node, _ = _node({"e1": "ok"})
    b = node.engines["e1"].breaker
    for _ in range(3):
        b.on_failure(0.0)
    assert b.allows(10.0) and b.state == "half_open"

    class Hanging(ScriptedClient):
        async def stream_completion(self, *a, **kw):
            await asyncio.sleep(10)
            yield Chunk([1], "")

    node.client = Hanging({})
    task = asyncio.create_task(
        _collect(node.generate(node.prepare(ClientRequest(token_ids=list(range(20)))), SamplingParams(3)))
    )
    await asyncio.sleep(0.05)
    assert not b.allows(node.clock())  # the probe is out
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.allows(node.clock())  # the client went away: another probe may go
    assert node.in_flight() == 0


async def _collect(gen):
    return [x async for x in gen]


class _SlowTokenizer:
    """Encodes one id per character, after its test lets it go; counts the
    encodes running at once."""

    name = "slow"

    def __init__(self) -> None:
        import threading

        self.go = threading.Event()
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.go.wait(10)
        with self._lock:
            self.running -= 1
        return [300 + ord(c) % 100 for c in text]

    def decode(self, ids: list[int]) -> str:
        return ""


async def test_a_long_text_prompt_is_tokenized_off_the_event_loop_one_at_a_time():
    node, _ = _node({"e1": "ok"}, thread_tokenize_chars=8, max_prompt_tokens=30)
    tok = _SlowTokenizer()
    node._tokenizers[node.engines["e1"].spec.model] = tok
    first = asyncio.create_task(node.prepare_async(ClientRequest(request_id="a", text="x" * 20)))
    second = asyncio.create_task(node.prepare_async(ClientRequest(request_id="b", text="y" * 20)))
    for _ in range(20):  # the loop runs on while the first encode waits on its thread
        await asyncio.sleep(0.01)
    assert tok.running == 1 and not first.done() and not second.done()
    tok.go.set()
    a, b = await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert (a.request_id, len(a.token_ids), b.token_ids[0]) == ("a", 20, 300 + ord("y") % 100)
    assert tok.most == 1  # never two long prompts tokenized at once
    # short texts stay inline; a long one past the token bound is the client's mistake
    assert len((await node.prepare_async(ClientRequest(text="short"))).token_ids) == 5
    with pytest.raises(RequestError, match="prompt of 40 tokens exceeds 30"):
        await node.prepare_async(ClientRequest(text="z" * 40))


async def test_route_checks_the_prompt_as_generate_does():
    node, _ = _node({"e1": "ok"})
    node.engines["e1"].max_model_len = 16  # as its /v1/models says
    salted = node.prepare(ClientRequest(token_ids=list(range(8)), cache_salt="a/b"))
    with pytest.raises(RequestError, match="cache_salt"):
        node.route_only(salted, dry_run=False)
    too_long = node.prepare(ClientRequest(token_ids=list(range(16))))  # no room for one token
    with pytest.raises(ContextTooLong, match="context window"):
        node.route_only(too_long, dry_run=False)
    assert node.load.local.slot() == {}  # a refused pick is no load
    assert (
        node.route_only(node.prepare(ClientRequest(token_ids=list(range(15)))), dry_run=True).engine_id
        == "e1"
    )


async def test_long_prompts_waiting_to_be_tokenized_are_bounded_as_the_queue_is():
    node, _ = _node({"e1": "ok"}, thread_tokenize_chars=8, admission=AdmissionConfig(max_queue=1))
    tok = _SlowTokenizer()
    node._tokenizers[node.engines["e1"].spec.model] = tok
    running = asyncio.create_task(node.prepare_async(ClientRequest(text="x" * 20)))
    waiting = asyncio.create_task(node.prepare_async(ClientRequest(text="y" * 20)))
    for _ in range(20):
        await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match="already wait to be tokenized"):
        await node.prepare_async(ClientRequest(text="z" * 20))
    tok.go.set()
    assert len((await asyncio.wait_for(waiting, 10)).token_ids) == 20
    await asyncio.wait_for(running, 10)


def test_an_engine_added_without_kv_events_is_warned_of() -> None:
    from structlog.testing import capture_logs

    from mesh.effects import EngineAdded

    node = RouterNode(RouterConfig(node_id="n1", insecure=True))
    with capture_logs() as logs:
        node._effect(EngineAdded("quiet", {"engine_id": "quiet", "endpoint": "http://q:80"}))
        node._effect(
            EngineAdded(
                "loud", {"engine_id": "loud", "endpoint": "http://l:80", "kv_events_endpoint": "tcp://l:5557"}
            )
        )
    warned = [e["engine"] for e in logs if e["event"] == "router.engine_without_kv_events"]
    assert warned == ["quiet"], logs  # precise routing cannot see its cache; the other publishes events
    assert {e["engine"] for e in logs if e["event"] == "router.engine_added"} == {"quiet", "loud"}
    assert [e["log_level"] for e in logs if e["event"] == "router.engine_without_kv_events"] == ["warning"]
    node = RouterNode(RouterConfig(node_id="n2", insecure=True, policy="round_robin"))  # never reads events
    with capture_logs() as logs:
        node._effect(EngineAdded("quiet", {"engine_id": "quiet", "endpoint": "http://q:80"}))
    assert [e["log_level"] for e in logs if e["event"] == "router.engine_without_kv_events"] == ["info"]


async def test_attempt_failures_are_logged_a_few_a_second_not_one_each() -> None:
    from structlog.testing import capture_logs

    # A full queue opens no breaker: e1 is tried each time; no backoff, so the
    # 40 requests run well within one second's window of log lines.
    node, client = _node({"e1": "busy", "e2": "ok"}, retry=RetryPolicy(backoff=0.0))
    with capture_logs() as logs:
        for i in range(40):
            prep = node.prepare(ClientRequest(request_id=f"r{i}", token_ids=list(range(20))))
            out = [x async for x in node.generate(prep, SamplingParams(max_tokens=3))]
            assert isinstance(out[-1], Finished) and out[-1].engine_id == "e2"
    busy = [e for e in logs if e["event"] == "router.engine_busy"]
    refused = sum(1 for c in client.calls if c[0] == "http://e1:80")
    assert refused >= 10 and node.stats.retries_total == refused  # every refusal was retried on e2
    assert 1 <= len(busy) <= 5 < refused, (len(busy), refused)  # a few lines, not one a refusal
