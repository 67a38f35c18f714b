"""The discovery shell (router/discovery_shell.py) with a resolver and a
registry the test controls: failures change nothing and are logged without
flooding, plans are carried out, refusals are reported once."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from router.discovery import DiscoveryConfig
from router.discovery_shell import FAIL_LOG_PERIOD, EngineDiscovery, resolve_ipv4
from router.engine_registry import EngineSpec, EngineSpecError

TEMPLATE = "url=http://{host}:8000,model=m"


class Log:
    """A logger that records (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **kw: self.lines.append((level, event, kw))

    def events(self, name: str) -> list[dict]:
        return [kw for _, ev, kw in self.lines if ev == name]


class Harness:
    def __init__(self, owner: bool = True, grace: float = 10.0, refuse: set[str] | None = None) -> None:
        self.now = 0.0
        self.answer: list[str] | BaseException = []
        self.registry: dict[str, dict] = {}
        self.refuse = refuse or set()
        self.log = Log()
        self.ready = False
        self.discovery = EngineDiscovery(
            DiscoveryConfig(names=["engines"], template=TEMPLATE, interval=0.5, grace=grace),
            self.register,
            self.deregister,
            lambda: self.registry,
            lambda engine_id: owner,
            lambda: self.ready,
            self.log,  # records instead of printing
            self.resolve,
            lambda: self.now,
        )
        self.core = self.discovery.cores[0]

    async def resolve(self, name: str) -> list[str]:
        assert name == "engines"
        if isinstance(self.answer, BaseException):
            raise self.answer
        return list(self.answer)

    async def register(self, spec: EngineSpec) -> None:
        if spec.engine_id in self.refuse:
            raise EngineSpecError(f"engine {spec.engine_id}: block_size differs")
        self.registry[spec.engine_id] = dataclasses.asdict(spec)

    async def deregister(self, engine_id: str) -> bool:
        return self.registry.pop(engine_id, None) is not None

    async def round(self, at: float):
        self.now = at
        return await self.discovery.round(self.core)


async def test_addresses_are_registered_and_removed_through_the_node():
    h = Harness(grace=2.0)
    h.answer = ["10.0.0.1", "10.0.0.2"]
    await h.round(0.0)
    assert set(h.registry) == {"engines-10-0-0-1", "engines-10-0-0-2"}
    assert h.registry["engines-10-0-0-1"]["source"] == "dns:engines"
    assert [e["engine"] for e in h.log.events("router.engine_discovered")] == [
        "engines-10-0-0-1",
        "engines-10-0-0-2",
    ]
    assert h.log.events("router.discovery_resolved")[0]["addrs"] == ["10.0.0.1", "10.0.0.2"]
    h.answer = ["10.0.0.1"]
    await h.round(1.0)
    await h.round(2.0)
    assert "engines-10-0-0-2" in h.registry
    await h.round(3.0)
    assert set(h.registry) == {"engines-10-0-0-1"}
    assert h.log.events("router.engine_gone") == [
        {"name": "engines", "engine": "engines-10-0-0-2", "addr": "10.0.0.2", "absent_for": 2.0}
    ]
    st = h.discovery.stats["engines"]
    assert (st.resolutions, st.failures, st.addresses, st.registered, st.removed) == (4, 0, 1, 2, 1)


async def test_an_empty_first_answer_is_a_warning_and_each_change_is_logged():
    h = Harness()
    await h.round(0.0)  # a mistyped name: nothing at all, and the operator is told
    await h.round(1.0)  # unchanged: not logged again
    h.answer = ["10.0.0.9"]
    await h.round(2.0)
    resolved = [(level, kw["addrs"]) for level, ev, kw in h.log.lines if ev == "router.discovery_resolved"]
    assert resolved == [("warning", []), ("info", ["10.0.0.9"])]


async def test_a_failing_resolver_changes_nothing_and_is_logged_without_flooding():
    h = Harness(grace=1.0)
    h.answer = ["10.0.0.1"]
    await h.round(0.0)
    h.answer = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    for i in range(1, 31):  # 30 failures, one a second, far past the grace
        assert await h.round(float(i)) is None
    assert set(h.registry) == {"engines-10-0-0-1"}
    failed = h.log.events("router.discovery_failed")
    assert len(failed) == 1 and failed[0]["failures_in_a_row"] == 1
    assert "Temporary failure" in failed[0]["error"]
    await h.round(FAIL_LOG_PERIOD + 1)  # a minute on: one more line, with what it left out
    failed = h.log.events("router.discovery_failed")
    assert len(failed) == 2 and failed[1]["suppressed_before"] == 29
    assert h.discovery.stats["engines"].failures == 31
    h.answer = ["10.0.0.1"]
    await h.round(FAIL_LOG_PERIOD + 2)
    assert h.log.events("router.discovery_recovered") == [{"name": "engines", "failures_in_a_row": 31}]
    # A new streak is logged at once again.
    h.answer = OSError("no route")
    await h.round(FAIL_LOG_PERIOD + 3)
    assert len(h.log.events("router.discovery_failed")) == 3


async def test_a_resolver_slower_than_the_interval_has_failed():
    h = Harness()

    async def slow(name: str) -> list[str]:
        await asyncio.sleep(5)
        return ["10.0.0.1"]

    h.discovery._resolve = slow
    assert await h.round(0.0) is None
    assert h.registry == {} and h.discovery.stats["engines"].failures == 1


async def test_refusals_and_conflicts_are_reported_once_until_they_change():
    h = Harness(refuse={"engines-10-0-0-2"})
    h.registry["engines-10-0-0-3"] = dataclasses.asdict(
        EngineSpec.parse("id=engines-10-0-0-3,url=http://x:1")
    )
    h.answer = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    for t in range(5):
        await h.round(float(t))
    assert set(h.registry) == {"engines-10-0-0-1", "engines-10-0-0-3"}
    assert h.registry["engines-10-0-0-3"]["source"] == ""  # by hand: left alone
    refused = h.log.events("router.discovery_refused")
    assert (
        len(refused) == 1
        and refused[0]["engine"] == "engines-10-0-0-2"
        and "block_size" in refused[0]["error"]
    )
    assert [c["engine"] for c in h.log.events("router.discovery_conflict")] == ["engines-10-0-0-3"]
    h.refuse.clear()  # the cause went away: registered on the next round
    await h.round(5.0)
    assert "engines-10-0-0-2" in h.registry


async def test_run_waits_until_the_node_is_ready():
    h = Harness()
    h.answer = ["10.0.0.1"]
    task = asyncio.create_task(h.discovery.run())
    await asyncio.sleep(0.3)
    assert h.registry == {} and h.discovery.stats["engines"].resolutions == 0
    h.ready = True
    for _ in range(50):
        if h.registry:
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert set(h.registry) == {"engines-10-0-0-1"}


async def test_resolve_ipv4_reads_the_system_resolver(monkeypatch):
    assert await resolve_ipv4("localhost") == ["127.0.0.1"]
    assert await resolve_ipv4("127.0.0.9") == ["127.0.0.9"]
    loop = asyncio.get_running_loop()

    code = [0]

    async def fails(*args, **kwargs):
        raise socket.gaierror(code[0], "x")

    monkeypatch.setattr(loop, "getaddrinfo", fails)
    for code[0] in (socket.EAI_NONAME, socket.EAI_NODATA):  # NXDOMAIN, no address: an empty answer
        assert await resolve_ipv4("engines") == []
    code[0] = socket.EAI_AGAIN  # a server failure: no answer at all
    with pytest.raises(socket.gaierror):
        await resolve_ipv4("engines")


async def test_a_node_runs_discovery_and_exports_it_per_name():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from router.config import RouterConfig
    from router.metrics import node_registry
    from router.node import RouterNode

    answers: list[list[str] | BaseException] = [["10.0.0.1", "10.0.0.2"], OSError("timed out")]

    async def resolve(name: str) -> list[str]:
        got = answers.pop(0)
        if isinstance(got, BaseException):
            raise got
        return got

    cfg = RouterConfig(
        node_id="d1", insecure=True, discovery=DiscoveryConfig(names=["engines"], template=TEMPLATE)
    )
    node = RouterNode(cfg, dns_resolver=resolve)
    assert node.discovery is not None and RouterNode(RouterConfig(insecure=True)).discovery is None
    core = node.discovery.cores[0]
    await node.discovery.round(core)
    await node.discovery.round(core)
    # Registered in the mesh registry (source kept), hence in the node's table.
    assert node.core.engines()["engines-10-0-0-1"]["source"] == "dns:engines"
    assert set(node.engines) == {"engines-10-0-0-1", "engines-10-0-0-2"}
    text = generate_latest(node_registry(node)).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for name in ("kvmesh_discovery_failures", "kvmesh_discovery_addresses", "kvmesh_discovery_changes")
        for s in fams[name].samples
        if not s.name.endswith("_created")
    }
    assert samples == {
        ("kvmesh_discovery_failures_total", (("name", "engines"),)): 1,
        ("kvmesh_discovery_addresses", (("name", "engines"),)): 2,
        ("kvmesh_discovery_changes_total", (("change", "registered"), ("name", "engines"))): 2,
        ("kvmesh_discovery_changes_total", (("change", "removed"), ("name", "engines"))): 0,
    }
    await node.stop()
