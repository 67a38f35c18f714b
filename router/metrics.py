"""Prometheus metrics of a router node, read from the node's own counters at
scrape time (a custom collector: nothing to keep in sync on the hot path)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from router.node import RouterNode


class NodeCollector:
    def __init__(self, node: RouterNode) -> None:
        self.node = node

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
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
        for rec in n.engines.values():
            eid = rec.spec.engine_id
            inflight.add_metric([eid], sum(n.load.in_flight(w) for w in rec.spec.workers))
            blocks.add_metric([eid], sum(n.index.blocks_of(w) for w in rec.spec.workers))
            up.add_metric([eid], 1.0 if rec.healthy and rec.breaker.state == "closed" else 0.0)
        yield inflight
        yield blocks
        yield up


def start_metrics_server(node: RouterNode, port: int, addr: str = "127.0.0.1") -> None:
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    start_http_server(port, addr=addr, registry=registry)
