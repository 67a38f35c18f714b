"""Engine discovery across real containers: the engines are found through
Docker's DNS, as through a Kubernetes headless Service.

Two router containers start with ``--engines-from-dns engines`` and no
``--engine``; simulated engines are containers with the network alias
``engines``, so the name resolves (the real ``getaddrinfo`` path, through
Docker's embedded resolver) to one address per running engine. The test
scales the engines from 2 to 4 (every node lists the new ones and routes to
them within a bound) and back to 2 (``docker stop``: after the grace the two
are removed on every node, and no request is routed to them after that).
The test process talks gRPC to each router through ports published on
127.0.0.1; the timings are printed.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import grpc
import pytest

from kvmesh.client import ONE_NODE, channel
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from tests.containers.conftest import DockerScope
from tests.containers.test_images import BLOCK, MODEL, sim_engine_cmd

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

GRPC = "50051/tcp"
ROUTERS = "kvmesh-routers"
ENGINES = "engines"  # the network alias every engine container carries
INTERVAL = 1.0  # --discovery-interval
GRACE = 5.0  # --discovery-grace
LIST_BOUND = 10.0  # seconds for a new engine to be listed by every node (a few intervals and gossip)
REMOVE_BOUND = GRACE + 10.0  # seconds from the stop to the removal on every node
# Deadline of the scale-down traffic's requests. One in flight on an engine when
# its container stops never hears back (the container's connections vanish
# without a reset): it ends at this deadline.
REQUEST_DEADLINE = 8.0
TEMPLATE = (
    "url=http://{host}:8000,kv=tcp://{host}:5557,replay=tcp://{host}:5558,"
    f"model={MODEL},block_size={BLOCK}"
)
ROUTER = [
    "router", "--listen", "0.0.0.0:50051", "--insecure", "--join", f"{ROUTERS}:50051",
    "--probe-interval", "0.5", "--gossip-interval", "0.1", "--health-interval", "0.5",
    "--engines-from-dns", ENGINES, "--engine-template", TEMPLATE,
    "--discovery-interval", str(INTERVAL), "--discovery-grace", str(GRACE),
]  # fmt: skip


def _engine_id(ip: str) -> str:
    return f"{ENGINES}-{ip.replace('.', '-')}"


class Fleet:
    def __init__(self, scope: DockerScope, image: str) -> None:
        self.scope = scope
        self.image = image
        self.net = scope.network()
        self.engines: dict[str, Any] = {}  # engine id -> container
        self.routers: dict[str, Any] = {}
        self._channels: dict[str, Any] = {}

    def run_engines(self, names: list[str]) -> dict[str, Any]:
        """Start engine containers (in the name's answers from now on); engine id -> container."""
        out = {}
        for name in names:
            cmd = [*sim_engine_cmd(seed=int(name[1:])), "--num-gpu-blocks", "1500", "--time-scale", "0.2"]
            c = self.scope.run(self.image, cmd, name=name, network=self.net, aliases=[ENGINES])
            c.reload()
            out[_engine_id(c.attrs["NetworkSettings"]["Networks"][self.net.name]["IPAddress"])] = c
        self.engines.update(out)
        return out

    def start_routers(self, n: int) -> None:
        for i in range(1, n + 1):
            name = f"r{i}"
            self.routers[name] = self.scope.run(
                self.image, [*ROUTER, "--node-id", name], name=name, network=self.net,
                ports={GRPC: ("127.0.0.1", None)}, aliases=[ROUTERS], start=False,
            )  # fmt: skip
        for c in self.routers.values():
            c.start()
        for c in self.routers.values():
            self.scope.wait_ready(c, "READY grpc=", timeout_s=60)

    def channel(self, name: str) -> Any:
        if name not in self._channels:
            port = DockerScope.host_port(self.routers[name], GRPC)
            self._channels[name] = channel(f"127.0.0.1:{port}", tls=False, config=ONE_NODE)
        return self._channels[name]

    def listed(self, name: str) -> dict[str, Any]:
        resp = pb_grpc.AdminStub(self.channel(name)).ListEngines(pb.ListEnginesRequest(), timeout=5)
        return {e.spec.engine_id: e.spec for e in resp.engines}

    def generate(self, name: str, rng: random.Random, timeout: float = 30.0) -> list[str]:
        """One round-robin Generate through ``name``: the engines it was routed to, in order
        (more than one when an attempt failed and was retried elsewhere)."""
        req = pb.GenerateRequest(
            model=MODEL, policy="round_robin",
            prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[rng.randrange(256, 32000) for _ in range(48)])),
            sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True),
        )  # fmt: skip
        msgs = list(pb_grpc.RouterStub(self.channel(name)).Generate(req, timeout=timeout))
        assert msgs[-1].WhichOneof("event") == "finished", msgs[-1]
        return [m.routed.engine_id for m in msgs if m.WhichOneof("event") == "routed"]

    def logs_tail(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- {c.name} ---\n{DockerScope.logs(c, lines)}"
            for c in [*self.routers.values(), *self.engines.values()]
        )

    def wait(self, pred: Any, timeout_s: float, what: str) -> float:
        """Seconds until ``pred()`` holds; fails after ``timeout_s`` with the containers' logs."""
        t0 = time.monotonic()
        last: object = None
        while True:
            try:
                last = pred()
                if last:
                    return time.monotonic() - t0
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            if time.monotonic() - t0 > timeout_s:
                pytest.fail(
                    f"timed out after {timeout_s} s waiting for {what}; last: {last}\n{self.logs_tail()}"
                )
            time.sleep(0.1)

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()


class Requests:
    """Round-robin Generate requests through every router, in a thread: when
    each was sent, which engines it was routed to, and how it failed if it did."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.sent: list[tuple[float, str, list[str]]] = []  # (start time, router, routed engines)
        self.errors: list[tuple[float, str]] = []  # (start time, what failed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(5)
        while not self._stop.is_set():
            for name in self.fleet.routers:
                t = time.monotonic()
                try:
                    self.sent.append((t, name, self.fleet.generate(name, rng, timeout=REQUEST_DEADLINE)))
                except grpc.RpcError as e:
                    self.errors.append((t, f"{name}: {e.code().name}: {e.details()}"))
                except AssertionError as e:
                    self.errors.append((t, f"{name}: {e}"))
            time.sleep(0.05)

    def __enter__(self) -> Requests:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_engines_found_through_dns_scale_up_and_down(kvmesh_image: str, docker_scope: DockerScope) -> None:
    fleet = Fleet(docker_scope, kvmesh_image)
    try:
        first = fleet.run_engines(["e1", "e2"])
        for c in first.values():
            docker_scope.wait_ready(c)
        fleet.start_routers(2)
        names = list(fleet.routers)
        for n in names:
            fleet.wait(lambda n=n: set(fleet.listed(n)) == set(first), LIST_BOUND + 20, f"2 engines on {n}")
        spec = fleet.listed("r1")[next(iter(first))]
        assert spec.source == f"dns:{ENGINES}" and spec.model == MODEL and spec.kv_events_endpoint, spec

        # Scale up: two more engines behind the name (timed from `docker run`).
        t0 = time.monotonic()
        added = fleet.run_engines(["e3", "e4"])
        every = set(first) | set(added)
        listed_after = {}
        for n in names:
            fleet.wait(lambda n=n: set(fleet.listed(n)) == every, LIST_BOUND, f"4 engines on {n}")
            listed_after[n] = time.monotonic() - t0
        for c in added.values():
            docker_scope.wait_ready(c)
        t_ready = time.monotonic() - t0
        reached: dict[str, set[str]] = {n: set() for n in names}
        rng = random.Random(1)

        def reached_new() -> bool:
            for n in names:
                reached[n].update(fleet.generate(n, rng))
            return all(set(added) <= r for r in reached.values())

        fleet.wait(reached_new, LIST_BOUND, "requests through every node to reach the new engines")
        routed_after = time.monotonic() - t0

        # Scale down: stop the two new ones (their addresses leave the name).
        removed_at: dict[str, float] = {}
        with Requests(fleet) as traffic:
            fleet.wait(lambda: len(traffic.sent) >= 4, 30, "traffic to get going")
            t_stop = time.monotonic()
            for c in added.values():
                c.stop(timeout=5)
            stopped = time.monotonic() - t_stop
            for n in names:
                fleet.wait(lambda n=n: set(fleet.listed(n)) == set(first), REMOVE_BOUND, f"removal on {n}")
                removed_at[n] = time.monotonic() - t_stop
            t_removed = time.monotonic()
            # Requests keep going for a while after the removal.
            fleet.wait(
                lambda: sum(1 for t, _, _ in traffic.sent if t > t_removed) >= 20, 60, "requests after"
            )
        # A request in flight on an engine when its container stops fails at its
        # deadline (the engine's shutdown, not discovery's): failures are allowed
        # only for requests sent before the removal.
        failed_before = [e for t, e in traffic.errors if t <= t_removed]
        failed_after = [e for t, e in traffic.errors if t > t_removed]
        assert not failed_after, failed_after[:5]
        for n in names:
            # Not before the grace: each node's owner needs the address missing for GRACE.
            assert removed_at[n] >= GRACE, removed_at
            assert set(fleet.listed(n)) == set(first)
        late = [(n, e) for t, n, es in traffic.sent if t > t_removed for e in es if e in added]
        assert not late, f"requests routed to removed engines: {late[:5]}"
        after = {e for t, _, es in traffic.sent if t > t_removed for e in es}
        assert after == set(first), after
        print(
            f"engine discovery (interval {INTERVAL} s, grace {GRACE} s), 2 routers: scale 2 -> 4 engines, "
            "from `docker run`: listed on "
            + ", ".join(f"{n} after {s:.2f} s" for n, s in listed_after.items())
            + f", engines serving after {t_ready:.2f} s, requests through both nodes reached both new "
            f"engines after {routed_after:.2f} s; scale 4 -> 2 (docker stop took "
            f"{stopped:.1f} s): removed on "
            + ", ".join(f"{n} after {s:.2f} s" for n, s in removed_at.items())
            + f" from the stop; {len(traffic.sent) + len(traffic.errors)} requests during the scale-down, "
            f"{len(failed_before)} sent before the removal failed (in flight on a stopping engine: "
            f"deadline {REQUEST_DEADLINE} s), "
            f"{sum(1 for t, _, _ in traffic.sent if t > t_removed)} after it, none failed or routed to a "
            f"removed engine; failures: {failed_before[:3]}"
        )
    finally:
        fleet.close()
