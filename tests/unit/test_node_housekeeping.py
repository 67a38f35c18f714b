"""What a node keeps about engines and failures over time: a removed
engine's per-engine counters are kept for ``ENGINE_COUNTERS_KEPT_S``
(registered again within it, the engine keeps counting), then forgotten, so
that DNS discovery's every old address is not kept for the node's life; and
the lines its log rate limits leave out are counted in the log even when no
later line of their kind would say so."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

from blocks.hashing import DEFAULT_BLOCK_SIZE
from mesh.effects import EngineAdded, EngineRemoved
from router.config import RouterConfig
from router.engine_registry import EngineSpec
from router.node import ENGINE_COUNTERS_KEPT_S, RouterNode


def _spec(eid: str) -> dict:
    return dataclasses.asdict(EngineSpec(eid, f"http://{eid}:80", block_size=DEFAULT_BLOCK_SIZE).validate())


def _per_engine(node: RouterNode) -> list[Counter[str]]:
    counts = node.stats.per_engine_counts()
    assert len(counts) == 6  # requests, prompt and cached tokens, attempts, failures, unreported
    return counts


def _count(node: RouterNode, eid: str) -> None:
    s = node.stats
    for counts in _per_engine(node):
        counts[eid] += 3
    s.cached_reporting_engines.add(eid)
    s.requests_total += 3


def _kept(node: RouterNode, eid: str) -> bool:
    held = [eid in c for c in _per_engine(node)]
    held.append(eid in node.stats.cached_reporting_engines)
    assert all(held) or not any(held), held  # all of an engine's counts go together
    return all(held)


def test_a_removed_engines_counters_go_after_the_retention_and_not_before() -> None:
    now = [1000.0]
    node = RouterNode(RouterConfig(node_id="n1", insecure=True), clock=lambda: now[0])
    for eid in ("gone", "back", "stays"):
        node._effect(EngineAdded(eid, _spec(eid)))
        _count(node, eid)
    node._effect(EngineRemoved("gone"))
    node._effect(EngineRemoved("back"))
    now[0] += ENGINE_COUNTERS_KEPT_S / 2
    node._effect(EngineAdded("back", _spec("back")))  # registered again within the time: keeps counting
    assert _kept(node, "gone") and _kept(node, "back")
    now[0] += ENGINE_COUNTERS_KEPT_S / 2
    node._effect(EngineAdded("new", _spec("new")))  # any engine change sweeps
    assert not _kept(node, "gone")
    assert _kept(node, "back") and node.stats.attempts_by_engine["back"] == 3
    assert _kept(node, "stays")
    assert node.stats.requests_total == 9  # the node's totals keep what the engines added
    assert node._removed_at == {}


def test_a_burst_of_failed_calls_that_does_not_recur_is_counted_in_the_log() -> None:
    """The node says how many lines a window left out even when no later
    line of that kind would (router.calls_unlogged, router.attempts_unlogged,
    the latter at the level of the attempts' own lines)."""
    from structlog.testing import capture_logs

    now = [500.0]
    node = RouterNode(RouterConfig(node_id="n1", insecure=True), clock=lambda: now[0])
    with capture_logs() as logs:
        for i in range(20):
            node.request_ended("UNAVAILABLE", "no_engine", f"r{i}", "no engine serves it", None)
            node._log_attempt(node.log.warning, "router.attempt_failed", {"engine": "e1"}, "refused")
            node._log_attempt(node.log.info, "router.engine_busy", {"engine": "e1"}, "queue full")
        node.say_unlogged(500.5)  # the window is not over
        node.say_unlogged(501.0)
        node.say_unlogged(509.0)  # said once
    ended = [e for e in logs if e["event"] == "router.request_ended"]
    calls = [e for e in logs if e["event"] == "router.calls_unlogged"]
    attempts = [e for e in logs if e["event"] == "router.attempts_unlogged"]
    assert len(ended) == node.outcomes.burst
    assert [(c["status"], c["reason"], c["lines"], c["log_level"]) for c in calls] == [
        ("UNAVAILABLE", "no_engine", 20 - node.outcomes.burst, "warning")
    ]
    left = 20 - node._attempt_logs.burst
    assert sorted((a["kind"], a["engine"], a["lines"], a["log_level"]) for a in attempts) == [
        ("router.attempt_failed", "e1", left, "warning"),
        ("router.engine_busy", "e1", left, "info"),
    ]


async def test_counters_are_forgotten_on_time_without_any_engine_change() -> None:
    """The sweep runs every second too: a removed engine's counters go an
    hour later though no other engine changes, and the engine, back after
    that, starts from zero; a spec refused on its way back does not keep
    them forever."""
    now = [0.0]
    node = RouterNode(RouterConfig(node_id="n1", insecure=True), clock=lambda: now[0])
    for eid in ("a", "b"):
        node._effect(EngineAdded(eid, _spec(eid)))
        _count(node, eid)
    node._effect(EngineRemoved("a"))
    node._effect(EngineRemoved("b"))
    node._effect(EngineAdded("b", {"engine_id": "b", "endpoint": "not a url"}))  # refused: not back
    assert node.engines.get("b") is None and node.engines_remembered() == {"a", "b"}
    now[0] = ENGINE_COUNTERS_KEPT_S
    task = asyncio.create_task(node._housekeeping())  # every second
    try:
        for _ in range(300):
            await asyncio.sleep(0.01)
            if not node.engines_remembered():
                break
    finally:
        task.cancel()
    assert not _kept(node, "a") and not _kept(node, "b")
    assert node.engines_remembered() == set()
    node._effect(EngineAdded("a", _spec("a")))
    assert node.stats.attempts_by_engine["a"] == 0


def test_the_metrics_forget_the_adapter_totals_of_engines_the_node_forgot() -> None:
    from router.metrics import _AdapterTotals

    totals = _AdapterTotals()
    for eid in ("a", "b"):
        totals.totals(eid, None)
    totals.keep_only({"b"})
    assert set(totals._base) == {"b"}
