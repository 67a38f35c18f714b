"""The node's Prometheus collector: outcomes by code and reason, admission gauges."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from router.config import RouterConfig
from router.metrics import NodeCollector
from router.node import RouterNode


def test_outcomes_and_admission_are_exported() -> None:
    node = RouterNode(RouterConfig(node_id="m1", insecure=True))
    node.outcomes.record("OK", "", 0.0)
    node.outcomes.record("RESOURCE_EXHAUSTED", "overloaded", 0.0)
    node.outcomes.record("RESOURCE_EXHAUSTED", "overloaded", 0.1)
    node.admission.admission.offer("r1", 0.0)
    reg = CollectorRegistry()
    reg.register(NodeCollector(node))
    text = generate_latest(reg).decode()
    assert 'kvmesh_requests_ended_total{code="RESOURCE_EXHAUSTED",reason="overloaded"} 2.0' in text
    assert 'kvmesh_requests_ended_total{code="OK",reason=""} 1.0' in text
    assert "kvmesh_admission_in_flight 1.0" in text
    assert "kvmesh_admission_estimated_wait_seconds" in text
