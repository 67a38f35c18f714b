"""Prometheus metrics of a router node, read from the node's own counters at
scrape time (a custom collector: nothing to keep in sync on the hot path)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from router.circuit_breaker import CLOSED
from router.node import RouterNode


class NodeCollector:
    def __init__(self, node: RouterNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        n, s = self.node, self.node.stats
        yield CounterMetricFamily("kvmesh_requests", "Generate requests received", value=s.requests_total)
        yield CounterMetricFamily(
            "kvmesh_requests_failed", "Generate requests failed", value=s.requests_failed
        )
        yield CounterMetricFamily(
            "kvmesh_retries", "engine attempts retried elsewhere", value=s.retries_total
        )
        yield CounterMetricFamily(
            "kvmesh_prompt_tokens", "prompt tokens proxied", value=s.prompt_tokens_total
        )
        yield CounterMetricFamily(
            "kvmesh_cached_prompt_tokens",
            "prompt tokens the engines reported cached",
            value=s.cached_prompt_tokens_total,
        )
        yield GaugeMetricFamily(
            "kvmesh_index_entries", "distinct block hashes in the index", value=len(n.index)
        )
        inflight = GaugeMetricFamily("kvmesh_engine_in_flight", "in-flight requests", labels=["engine"])
        blocks = GaugeMetricFamily("kvmesh_engine_cached_blocks", "blocks indexed", labels=["engine"])
        up = GaugeMetricFamily("kvmesh_engine_up", "1 if healthy and circuit closed", labels=["engine"])
        attempts = CounterMetricFamily(
            "kvmesh_engine_attempts", "requests sent to the engine (each attempt)", labels=["engine"]
        )
        failures = CounterMetricFamily(
            "kvmesh_engine_failures",
            "attempts the engine failed (before or after the first token)",
            labels=["engine"],
        )
        for rec in n.engines.values():
            eid = rec.spec.engine_id
            # This node's own requests, not the mesh's: each node exports what it sent.
            inflight.add_metric([eid], sum(n.load.local.in_flight(w) for w in rec.spec.workers))
            blocks.add_metric([eid], sum(n.index.blocks_of(w) for w in rec.spec.workers))
            up.add_metric([eid], 1.0 if rec.healthy and rec.breaker.state == CLOSED else 0.0)
            attempts.add_metric([eid], rec.attempts)
            failures.add_metric([eid], rec.failures)
        yield from (inflight, blocks, up, attempts, failures)
        yield from self._outcomes()

    def _outcomes(self) -> Iterator[Metric]:
        n = self.node
        ended = CounterMetricFamily(
            "kvmesh_requests_ended",
            "Generate and Route calls by how they ended (code OK, or a gRPC status and its reason)",
            labels=["code", "reason"],
        )
        for key, count in sorted(n.outcomes.counts.items()):
            code, _, reason = key.partition(":")
            ended.add_metric([code, reason], count)
        yield ended
        adm = n.admission.admission
        now = n.admission.now()
        yield GaugeMetricFamily(
            "kvmesh_admission_in_flight", "requests this node has on engines", value=adm.in_flight
        )
        yield GaugeMetricFamily(
            "kvmesh_admission_queued", "requests waiting here for a slot", value=adm.queued
        )
        yield CounterMetricFamily(
            "kvmesh_admission_shed", "requests shed before any engine work", value=adm.shed_total
        )
        yield GaugeMetricFamily(
            "kvmesh_admission_estimated_wait_seconds",
            "estimated time until the fleet would start one more request",
            value=adm.estimated_wait(now),
        )


def start_metrics_server(node: RouterNode, port: int, addr: str) -> None:
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    start_http_server(port, addr=addr, registry=registry)
