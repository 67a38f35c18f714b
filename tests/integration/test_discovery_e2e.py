"""Engine discovery on loopback: two real ``RouterNode``s served over gRPC,
real simulated engines (processes publishing KV events over ZMQ) on
127.0.0.2 .. 127.0.0.5, all on the same ports, as pods behind a headless
Service are.

The DNS name is answered by a resolver the test controls, one per node
(handed to ``RouterNode(dns_resolver=...)``): loopback has no name that
resolves to several addresses, and per-node answers let the test give one
node a stale or partial answer. Everything else is the real path: the
discovery shell's rounds, mesh-wide registration, ownership, health,
routing. The real ``getaddrinfo`` path is exercised by
tests/containers/test_discovery_containers.py.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from kvmesh import procs
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh.loadgen import generate_once
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from mesh.core import MeshConfig
from mesh.membership import MembershipConfig
from router.config import RouterConfig
from router.discovery import DiscoveryConfig
from router.engine_registry import EngineSpec
from router.node import RouterNode
from router.service import serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
NAME = "engines.test"
HOSTS = [f"127.0.0.{i}" for i in range(2, 6)]
INTERVAL = 0.2
GRACE = 1.5


def _eid(host: str) -> str:
    return "engines-" + host.replace(".", "-")


def _start_engines() -> tuple[list[procs.Proc], int, str]:
    """A sim engine on each of HOSTS, all on one set of ports; returns them,
    their HTTP port and the template that describes them."""
    for _ in range(5):  # a port free on 127.0.0.1 may be taken on another address
        http, kv, replay = procs.free_port(), procs.free_port(), procs.free_port()
        started: list[procs.Proc] = []
        try:
            for i, h in enumerate(HOSTS):
                started.append(
                    procs.start(
                        f"disc-{h}",
                        ["sim-engine", "--host", h, "--port", str(http),
                         "--kv-events-endpoint", f"tcp://{h}:{kv}", "--kv-replay-endpoint", f"tcp://{h}:{replay}",
                         "--num-gpu-blocks", "800", "--seed", str(i)],
                    )
                )  # fmt: skip
        except RuntimeError:
            for p in started:
                p.kill()
            continue
        template = f"url=http://{{host}}:{http},kv=tcp://{{host}}:{kv},replay=tcp://{{host}}:{replay}"
        return started, http, template
    raise AssertionError("no set of ports free on every loopback address")


async def _eventually(pred: Callable[[], Awaitable[bool] | bool], timeout: float, what: str) -> float:
    """Seconds until ``pred()`` holds; fails after ``timeout``."""
    t0 = time.monotonic()
    while True:
        got = pred()
        if not isinstance(got, bool):
            got = await got
        if got:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _listed(addr: str) -> dict[str, pb.EngineSpec]:
    async with aio_channel(addr, tls=False, config=ONE_NODE) as ch:
        resp = await pb_grpc.AdminStub(ch).ListEngines(pb.ListEnginesRequest(), timeout=5)
    return {e.spec.engine_id: e.spec for e in resp.engines}


async def _routed_to(addr: str, n: int, seed: int) -> set[str]:
    """Engines ``n`` round-robin Generate requests through ``addr`` went to (all must succeed)."""
    out = set()
    async with aio_channel(addr, tls=False, config=ONE_NODE) as ch:
        stub = pb_grpc.RouterStub(ch)
        for i in range(n):
            ids = [256 + (seed * 1000 + i * 37 + k) % 30000 for k in range(40)]
            rec, _ = await generate_once(stub, ids, 4, policy="round_robin", timeout=20)
            assert rec.ok, rec.error
            out.add(rec.engine_id)
    return out


async def test_engines_of_a_name_come_and_go_on_every_node() -> None:
    engines, http_port, template = _start_engines()
    hand_proc = procs.start_sim_engine("disc-hand", ["--num-gpu-blocks", "800"])
    hand = EngineSpec.parse(procs.engine_flag("by-hand", hand_proc))
    mesh = MeshConfig(
        membership=MembershipConfig(probe_interval=0.5, probe_timeout=0.25, gossip_interval=0.1)
    )
    addrs = [f"127.0.0.1:{procs.free_port()}" for _ in range(2)]
    views: dict[str, list[str] | BaseException] = {"n0": HOSTS[:2], "n1": HOSTS[:2]}
    asked: dict[str, int] = {"n0": 0, "n1": 0}

    def resolver(node: str) -> Callable[[str], Awaitable[list[str]]]:
        async def resolve(name: str) -> list[str]:
            assert name == NAME
            asked[node] += 1
            view = views[node]
            if isinstance(view, BaseException):
                raise view
            return list(view)

        return resolve

    nodes = [
        RouterNode(
            RouterConfig(
                listen=a, advertise=a, node_id=f"n{i}", engines=[hand] if i == 0 else [], mesh=mesh,
                health_interval=0.3,
                discovery=DiscoveryConfig(names=[NAME], template=template, interval=INTERVAL, grace=GRACE),
            ),
            dns_resolver=resolver(f"n{i}"),
        )
        for i, a in enumerate(addrs)
    ]  # fmt: skip
    stops = [asyncio.Event() for _ in nodes]
    tasks = [asyncio.create_task(serve(nodes[0], stops[0]))]
    await _eventually(lambda: nodes[0].ready, 10, "n0 serving")
    tasks.append(asyncio.create_task(serve(nodes[1], stops[1], join=[addrs[0]])))

    async def everywhere(want: set[str]) -> bool:
        return all([set(await _listed(a)) == want for a in addrs])

    try:
        # Two addresses: both nodes list them (and the engine given by hand).
        first = {_eid(h) for h in HOSTS[:2]} | {"by-hand"}
        await _eventually(lambda: everywhere(first), 10, f"{sorted(first)} on both nodes")
        specs = await _listed(addrs[1])
        assert {e: s.source for e, s in specs.items()} == {
            **{_eid(h): f"dns:{NAME}" for h in HOSTS[:2]}, "by-hand": "",
        }  # fmt: skip
        assert specs[_eid(HOSTS[0])].endpoint == f"http://{HOSTS[0]}:{http_port}"

        # Scale up to four.
        views["n0"] = views["n1"] = list(HOSTS)
        t0 = time.monotonic()
        every = {_eid(h) for h in HOSTS} | {"by-hand"}
        await _eventually(lambda: everywhere(every), 10, "four discovered engines on both nodes")
        t_listed = time.monotonic() - t0
        for a in addrs:
            assert await _routed_to(a, 10, seed=len(a)) == every  # round robin reaches the new ones
        t_routed = time.monotonic() - t0

        # One node's answers lose an engine it does not own, for far longer than
        # the grace: nothing is removed anywhere (its owner still sees it).
        e5 = _eid(HOSTS[3])
        owner = nodes[0].core.owner_of(e5)
        other = "n1" if owner == "n0" else "n0"
        views[other] = HOSTS[:3]
        await asyncio.sleep(3 * GRACE)
        for a in addrs:
            assert set(await _listed(a)) == every

        # DNS fails on both nodes while two engines are "gone": a failure is no answer.
        failing = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        views["n0"] = views["n1"] = failing
        await asyncio.sleep(3 * GRACE)
        for a in addrs:
            assert set(await _listed(a)) == every
        assert all(n.discovery is not None and n.discovery.stats[NAME].failures >= 5 for n in nodes)

        # Scale down to two: the last two stop and leave the answers.
        views["n0"] = views["n1"] = HOSTS[:2]
        for p in engines[2:]:
            p.stop()
        t1 = time.monotonic()
        left = {_eid(h) for h in HOSTS[:2]} | {"by-hand"}
        gone_at = {}
        for i, a in enumerate(addrs):
            await _eventually(functools.partial(_only, a, left), 10, f"removal on n{i}")
            gone_at[f"n{i}"] = time.monotonic() - t1
        assert min(gone_at.values()) >= GRACE, gone_at  # not before the grace
        for a in addrs:
            assert await _routed_to(a, 9, seed=7) == left  # never to a removed engine
        # Removed by their owners only.
        removed_by = {n.node_id for n in nodes if n.discovery and n.discovery.stats[NAME].removed}
        assert removed_by == {nodes[0].core.owner_of(_eid(h)) for h in HOSTS[2:]}
        print(
            f"discovery on loopback (interval {INTERVAL} s, grace {GRACE} s): 2 new engines listed on both "
            f"nodes in {t_listed:.2f} s, routed to from both in {t_routed:.2f} s; 2 stopped engines removed "
            f"on n0 after {gone_at['n0']:.2f} s, on n1 after {gone_at['n1']:.2f} s; resolutions per node "
            f"{asked}"
        )
    finally:
        for s in stops:
            s.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in [*engines, hand_proc]:
            p.kill()


async def _only(addr: str, want: set[str]) -> bool:
    return set(await _listed(addr)) == want
