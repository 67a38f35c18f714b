"""RouterNode.generate and route_only, the thin loops around the request
path's core, against a scripted engine client (no network, no mesh peers)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine_adapters.completion_request import SamplingParams
from engine_adapters.proxy import Chunk, EngineStreamError, EngineUnavailable, Usage
from router.config import RouterConfig
from router.engine_registry import EngineSpec
from router.node import RouterNode
from router.policies import NoEngineAvailable
from router.request_path import ClientRequest, Finished, Routed


class ScriptedClient:
    """Per endpoint: "ok", "refuse" (before any token) or "break" (after one)."""

    def __init__(self, script: dict[str, str]) -> None:
        self.script = script
        self.calls: list[tuple[str, dict[str, str]]] = []

    async def stream_completion(
        self, endpoint, model, token_ids, params, request_id, headers=None, tenancy=None
    ):
        self.calls.append((endpoint, dict(headers or {})))
        what = self.script[endpoint]
        if what == "refuse":
            raise EngineUnavailable(f"{endpoint} refused")
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
    assert node.engines["e1"].failures == 1 and node.engines["e2"].attempts == 1
    assert node.load.local.slot() == {}


async def test_every_worker_refusing_spends_the_attempt_budget_then_fails():
    node, client = _node({"e1": "refuse", "e2": "refuse", "e3": "refuse"}, max_attempts=2)
    with pytest.raises(NoEngineAvailable, match=r"no engine could serve the request: .* refused"):
        await _run(node)
    assert len(client.calls) == 2 and len({c[0] for c in client.calls}) == 2
    assert (node.stats.retries_total, node.stats.requests_failed) == (2, 1)
    assert node.load.local.slot() == {}


async def test_running_out_of_workers_fails_before_the_budget():
    node, client = _node({"e1": "refuse"}, max_attempts=3)
    with pytest.raises(NoEngineAvailable, match="none of 1 candidates is healthy"):
        await _run(node)
    assert len(client.calls) == 1


async def test_a_stream_broken_after_the_first_token_is_not_retried():
    node, client = _node({"e1": "break", "e2": "ok"})
    out = await _run(node)
    assert [type(x) for x in out] == [Routed, Chunk, Finished]
    assert out[-1].finish_reason == "error" and "cut" in out[-1].error
    assert len(client.calls) == 1 and node.stats.requests_failed == 1


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
