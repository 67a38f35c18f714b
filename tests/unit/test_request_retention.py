"""What a node keeps does not grow with the requests it has answered.

Under overload a node answers hundreds of requests a second, most of them
shed. Every structure a request passes through (admission, the load tracker,
the mesh's route hints and its gossip queue, the outcome counters) may hold
what is in flight or recent, never an entry per request ever answered: after
the requests of a round have ended and their hints have expired, a node holds
what it held after the first round, however many rounds it served.

A lone node is the case that matters most: with no peer to send them to, the
deltas its route hints and load make would otherwise pile up in its gossip
queue.
"""

from __future__ import annotations

import asyncio
from typing import Any

from engine_adapters.completion_request import SamplingParams
from engine_adapters.proxy import Chunk, EngineUnavailable, Usage
from router.admission import AdmissionConfig
from router.config import RouterConfig
from router.engine_registry import EngineSpec
from router.errors import NoEngineAvailable, Overloaded
from router.node import RouterNode
from router.request_path import ClientRequest

ROUNDS = 5
PER_ROUND = 60  # requests sent at once: a few admitted, most shed
BLOCK = 4


class Clock:
    """The node's clock, moved by the test (hint TTLs, gossip rounds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowEngines:
    """An engine client whose streams take a few event-loop turns (so requests
    overlap and admission sheds); ``e2`` refuses every request before a token."""

    async def stream_completion(
        self, endpoint: str, model: str, token_ids: list[int], params: SamplingParams, *a: Any, **k: Any
    ) -> Any:
        await asyncio.sleep(0)
        if endpoint == "http://e2:80":
            raise EngineUnavailable("e2 refused")
        for _ in range(3):
            await asyncio.sleep(0)
            yield Chunk([7], " a")
        yield Usage(len(token_ids), params.max_tokens, 0, "length")

    async def health(self, endpoint: str) -> bool:
        return True

    async def close(self) -> None:
        pass


def _node(clock: Clock) -> RouterNode:
    cfg = RouterConfig(
        node_id="n1",
        policy="precise",  # records a route hint per routed request
        admission=AdmissionConfig(max_in_flight=4, max_queue=2, max_queue_wait=0.05),
        route_load_ttl=0.001,
    )
    node = RouterNode(cfg, clock=clock)
    for eid in ("e1", "e2"):
        node.engines.put(EngineSpec(eid, f"http://{eid}:80", block_size=BLOCK).validate())
    node.client = SlowEngines()  # type: ignore[assignment]  # duck-typed: the methods the node calls
    node.core.join([], clock())  # a mesh of one, as RouterNode.start makes it
    return node


async def _one(node: RouterNode, clock: Clock, i: int) -> str:
    # Distinct prompts: every routed one leaves a hint of its own.
    ids = [i * 1000 + t for t in range(5 * BLOCK)]
    prep = node.prepare(ClientRequest(request_id=f"r{i}", token_ids=ids))
    try:
        async for _ in node.generate(prep, SamplingParams(max_tokens=3)):
            pass
    except Overloaded as e:
        node.outcomes.record("RESOURCE_EXHAUSTED", e.reason, clock())
        return "shed"
    except NoEngineAvailable as e:
        node.outcomes.record("UNAVAILABLE", e.reason, clock())
        return "failed"
    node.outcomes.record("OK", "", clock())
    return "ok"


async def _round(node: RouterNode, clock: Clock, r: int) -> list[str]:
    out = await asyncio.gather(*(_one(node, clock, r * PER_ROUND + i) for i in range(PER_ROUND)))
    for i in range(5):  # the Route RPC: picks that count as load for route_load_ttl
        ids = [r * 7919 + i * 31 + t for t in range(5 * BLOCK)]
        node.route_only(node.prepare(ClientRequest(token_ids=ids)), dry_run=False)
    await asyncio.sleep(0.01)  # the Route picks' load expires
    # Past the hints' TTL: the mesh runs its rounds (gossip push, expiry).
    clock.now += 2 * node.config.mesh.hint_ttl + 1.0
    node.core.tick(clock())
    node.mesh.flush()
    return out


def _held(node: RouterNode) -> dict[str, int]:
    adm = node.admission
    mesh = node.core.stats()
    return {
        "admission.in_flight": adm.admission.in_flight,
        "admission.unstarted": adm.admission.unstarted,
        "admission.queued": adm.admission.queued,
        "admission.waiting": adm.waiting,
        "load.busy_workers": len(node.load.local.slot()),
        "mesh.hints": len(node.core.state.hints),
        "gossip.queued_items": mesh["queued_items"],
        "gossip.queued_bytes": mesh["queued_bytes"],
        "outcome.keys": len(node.outcomes.counts),
    }


async def test_a_node_holds_the_same_after_many_rounds_of_served_and_shed_requests() -> None:
    clock = Clock()
    node = _node(clock)
    held = []
    ended: dict[str, int] = {}
    for r in range(ROUNDS):
        for what in await _round(node, clock, r):
            ended[what] = ended.get(what, 0) + 1
        held.append(_held(node))
    # Every kind of ending happened, many times over.
    assert ended["ok"] >= ROUNDS and ended["shed"] >= ROUNDS * PER_ROUND // 2
    assert node.stats.retries_total > 0  # e2's refusals were retried on e1
    # Nothing in flight, no hint alive, nothing queued for a peer that does not exist...
    idle = {k: v for k, v in held[-1].items() if k != "outcome.keys"}
    assert idle == dict.fromkeys(idle, 0)
    # ...and the same after the last round as after the first.
    assert held[-1] == held[0], held
