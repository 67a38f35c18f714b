"""The router mesh across real container networks.

Three router containers share one network alias and are all started with
``--join <alias>:50051``: they find each other through Docker's DNS, like a
headless service. Two simulated engines publish KV events over ZMQ on the same
network. The tests then do to the network what loopback tests cannot: SIGKILL
a container (``docker kill``), cut one router off (``docker network
disconnect``) and bring it back, SIGTERM one (``docker stop``). The test
process talks gRPC to every router and HTTP to every engine through ports
published on 127.0.0.1 only. Every network and container is the test's own
(``docker_scope``) and is removed when the test ends.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import pytest
import requests

from kvmesh.client import ONE_NODE, channel

# The engine-side digest: XOR of the router block hashes of an engine's real cache.
from kvmesh.probes import engine_digest
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from tests.containers.conftest import DockerScope
from tests.containers.split_dns import DnsServer, fqdn
from tests.containers.test_images import BLOCK, MODEL, _engine_spec, sim_engine_cmd

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

ALIAS = "kvmesh-routers"
GRPC = "50051/tcp"
HTTP = "8000/tcp"
# Every router command starts so: the test networks are the tests' own, so no
# TLS, tokens or mesh secret (a router refuses to serve without them unless told).
ROUTER = ["router", "--listen", "0.0.0.0:50051", "--insecure"]
# Fast failure detection so the tests stay short; the partition test probes faster still.
FAST_MESH = ["--probe-interval", "0.5", "--gossip-interval", "0.1", "--health-interval", "0.5"]
T = TypeVar("T")


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256, 32000) for _ in range(n)]


class Mesh:
    """Engines and routers of one test, reached from the host."""

    def __init__(self, scope: DockerScope, net: Any) -> None:
        self.scope = scope
        self.net = net
        self.engines: dict[str, Any] = {}  # engine id -> container
        self.routers: dict[str, Any] = {}  # short name (r1..) -> container
        self.ips: dict[str, str] = {}  # router name -> address on the mesh network
        self.node_ids: dict[str, str] = {}  # router name -> mesh node id (from READY)
        self.engine_ips: dict[str, dict[str, str]] = {}  # engine id -> network name -> address
        self._channels: dict[str, tuple[int, Any]] = {}
        self._ports: dict[str, int] = {}  # container name -> published host port

    def host_port(self, container: Any, port: str) -> int:
        if container.name not in self._ports:
            self._ports[container.name] = DockerScope.host_port(container, port)
        return self._ports[container.name]

    def forget_port(self, container: Any) -> None:
        """After a reconnect Docker publishes the port again, on another host port."""
        self._ports.pop(container.name, None)

    # --- host access ---------------------------------------------------------------

    def channel(self, name: str) -> Any:
        """gRPC channel to router ``name`` (re-made when its published port changed)."""
        port = self.host_port(self.routers[name], GRPC)
        cached = self._channels.get(name)
        if cached is None or cached[0] != port:
            if cached is not None:
                cached[1].close()
            self._channels[name] = (port, channel(f"127.0.0.1:{port}", tls=False, config=ONE_NODE))
        return self._channels[name][1]

    def admin(self, name: str) -> Any:
        return pb_grpc.AdminStub(self.channel(name))

    def router(self, name: str) -> Any:
        return pb_grpc.RouterStub(self.channel(name))

    def members(self, name: str) -> dict[str, Any]:
        resp = self.admin(name).ListMembers(pb.ListMembersRequest(), timeout=5)
        return {m.node_id: m for m in resp.members}

    def states(self, name: str) -> dict[str, str]:
        return {n: m.state for n, m in self.members(name).items()}

    def engine_status(self, name: str) -> dict[str, Any]:
        resp = self.admin(name).ListEngines(pb.ListEnginesRequest(), timeout=5)
        return {e.spec.engine_id: e for e in resp.engines}

    def owners(self, name: str) -> dict[str, str]:
        return {e: s.owner_node for e, s in self.engine_status(name).items()}

    def index_digest(self, name: str, engine_id: str) -> dict[str, tuple[int, int]]:
        d = self.admin(name).GetIndexDigest(pb.GetIndexDigestRequest(engine_id=engine_id), timeout=5)
        return {w.worker: (w.blocks, w.xor_hashes) for w in d.workers}

    def engine_url(self, engine_id: str) -> str:
        return f"http://127.0.0.1:{self.host_port(self.engines[engine_id], HTTP)}"

    def engine_cache_digest(self, engine_id: str) -> dict[str, tuple[int, int]]:
        r = requests.get(f"{self.engine_url(engine_id)}/admin/cache", timeout=10)
        r.raise_for_status()
        return {engine_id: engine_digest(r.json())}  # one worker per engine (dp = 1)

    def engine_last_seq(self, engine_id: str) -> int:
        r = requests.get(f"{self.engine_url(engine_id)}/admin/stats", timeout=10)
        r.raise_for_status()
        return int(r.json()["next_seq"]) - 1

    def name_of(self, node_id: str) -> str:
        return next(n for n, i in self.node_ids.items() if i == node_id)

    # --- waiting ---------------------------------------------------------------------

    def logs_tail(self, lines: int = 40) -> str:
        parts = []
        for c in [*self.routers.values(), *self.engines.values()]:
            parts.append(f"--- {c.name} (last {lines} lines) ---\n{DockerScope.logs(c, lines)}")
        return "\n".join(parts)

    def eventually(self, pred: Callable[[], T], timeout_s: float, what: str | Callable[[], str]) -> T:
        """``pred()`` once it is truthy; fails after ``timeout_s`` with its last
        value (or error), ``what`` (called if callable) and every container's log tail."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while True:
            try:
                last = pred()
                if last:
                    return last
            except (grpc.RpcError, requests.RequestException, KeyError, IndexError, TypeError) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                what = what() if callable(what) else what
                pytest.fail(
                    f"timed out after {timeout_s} s waiting for {what}; last: {last}\n{self.logs_tail()}"
                )
            time.sleep(0.2)

    def wait_all_alive(self, names: list[str], timeout_s: float) -> None:
        """Every node in ``names`` sees exactly ``names`` alive (and nobody else)."""
        want = {self.node_ids[n] for n in names}
        views: dict[str, Any] = {}

        def ok() -> bool:
            views.clear()
            views.update({n: self.states(n) for n in names})
            return all({k for k, s in v.items() if s == "alive"} == want for v in views.values())

        self.eventually(
            ok, timeout_s, lambda: f"{sorted(want)} alive on every one of {names} (views: {views})"
        )

    def agreed_owners(self, names: list[str]) -> dict[str, str] | None:
        """The engine -> owner map if every node in ``names`` computes the same one."""
        views = [self.owners(n) for n in names]
        first = views[0]
        if all(v == first for v in views) and first and all(first.values()):
            return first
        return None

    def convergence_gaps(self, names: list[str], engine_ids: list[str]) -> list[str]:
        """Where a node's index differs from an engine's real cache, or its log
        position from the engine's last published seq (empty: converged)."""
        gaps = []
        for e in engine_ids:
            want = self.engine_cache_digest(e)
            last = self.engine_last_seq(e)
            for n in names:
                got = self.index_digest(n, e)
                if got != want:
                    gaps.append(f"{n}: index of {e} {got} != engine cache {want}")
                seqs = dict(self.engine_status(n)[e].worker_seqs)
                if seqs != {e: last} and not (last < 0 and not seqs):  # no event yet: no position
                    gaps.append(f"{n}: worker_seqs of {e} {seqs} != engine's last seq {last}")
        return gaps

    def wait_converged(self, names: list[str], engine_ids: list[str], timeout_s: float, what: str) -> None:
        gaps: list[str] = []

        def check() -> bool:
            gaps[:] = self.convergence_gaps(names, engine_ids)
            return not gaps

        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                owners = {n: self.owners(n) for n in names}
                pytest.fail(
                    f"{what}: not converged after {timeout_s} s: {gaps}; owners: {owners}\n{self.logs_tail()}"
                )
            time.sleep(0.3)

    def close(self) -> None:
        for _, ch in self._channels.values():
            ch.close()


def start_mesh(
    scope: DockerScope,
    image: str,
    *,
    flags: list[str],
    named: bool = True,
    static_ips: bool = False,
    n_routers: int = 3,
    n_engines: int = 2,
) -> Mesh:
    """``n_engines`` sim engines and ``n_routers`` routers that all join through
    one DNS alias; only r1 is given the engines (the mesh spreads them)."""
    net = scope.network(static_ips=static_ips)
    mesh = Mesh(scope, net)
    for i in range(1, n_engines + 1):
        mesh.engines[f"e{i}"] = scope.run(
            image, [*sim_engine_cmd(seed=i), "--num-gpu-blocks", "1500", "--time-scale", "0.2"],
            name=f"e{i}", network=net, ports={HTTP: ("127.0.0.1", None)},
        )  # fmt: skip
    for c in mesh.engines.values():
        scope.wait_ready(c)
    for i in range(1, n_routers + 1):
        name = f"r{i}"
        cmd = [*ROUTER, "--join", f"{ALIAS}:50051", *flags]
        if named:
            cmd += ["--node-id", name]
        if i == 1:
            cmd += [arg for eid, c in mesh.engines.items() for arg in ("--engine", _engine_spec(eid, c.name))]
        ip = DockerScope.subnet_ip(net, 200 + i) if static_ips else None
        # Created first, started together: a cold start behind one DNS name.
        mesh.routers[name] = scope.run(
            image, cmd, name=name, network=net, ports={GRPC: ("127.0.0.1", None)},
            aliases=[ALIAS], ip=ip, start=False,
        )  # fmt: skip
    for c in mesh.routers.values():
        c.start()
    for name, c in mesh.routers.items():
        line = scope.wait_ready(c, "READY grpc=", timeout_s=60)
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        mesh.node_ids[name] = fields["node"]
        c.reload()
        mesh.ips[name] = c.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
        # The advertised address is the container's own one, not 0.0.0.0.
        assert fields["grpc"] == f"{mesh.ips[name]}:50051", (line, mesh.ips[name])
    return mesh


@pytest.fixture
def mesh_scope(docker_scope: DockerScope) -> Any:
    meshes: list[Mesh] = []
    yield docker_scope, meshes
    for m in meshes:
        m.close()


def generate(mesh: Mesh, name: str, ids: list[int], max_tokens: int = 8) -> tuple[str, list[int], Any]:
    """One Generate through router ``name``: (engine id, generated tokens, Finished)."""
    req = pb.GenerateRequest(
        model=MODEL, prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids)),
        sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )  # fmt: skip
    try:
        msgs = list(mesh.router(name).Generate(req, timeout=30))
    except grpc.RpcError as e:
        pytest.fail(f"Generate via {name} failed: {e.code().name}: {e.details()}\n{mesh.logs_tail()}")
    kinds = [m.WhichOneof("event") for m in msgs]
    assert kinds[0] == "routed" and kinds[-1] == "finished", kinds
    fin = msgs[-1].finished
    assert fin.finish_reason == "length", fin
    tokens = [t for m in msgs if m.HasField("chunk") for t in m.chunk.token_ids]
    return msgs[0].routed.engine_id, tokens, fin


def continuation_lands_on_same_engine(mesh: Mesh, first: str, second: str, seed: int, blocks: int) -> str:
    """A request via ``first`` and its continuation via ``second``: the second
    goes to the same engine and reuses its cache. Returns the engine id."""
    prompt = _tokens(seed, blocks * BLOCK) + _tokens(seed + 1, 7)
    eid, answer, fin = generate(mesh, first, prompt)
    assert fin.completion_tokens == 8
    # The owner's events reach `second` through the mesh; its index equals the engine's cache.
    mesh.eventually(
        lambda: mesh.index_digest(second, eid) == mesh.engine_cache_digest(eid), 15,
        f"{second}'s index of {eid} to equal the engine's cache",
    )  # fmt: skip
    mesh.eventually(
        lambda: all(s.in_flight == 0 for s in mesh.engine_status(second).values()), 10,
        f"{second} to see {first}'s request finished",
    )  # fmt: skip
    cont = prompt + answer + _tokens(seed + 2, 20)
    route = mesh.router(second).Route(
        pb.RouteRequest(model=MODEL, prompt=pb.Prompt(token_ids=pb.TokenIds(ids=cont)), dry_run=True),
        timeout=10,
    )
    assert route.engine_id == eid and route.predicted_cached_blocks >= blocks, route
    eid2, _, fin2 = generate(mesh, second, cont)
    assert eid2 == eid, (eid, eid2)
    assert fin2.cached_prompt_tokens >= blocks * BLOCK, fin2
    return eid


class Traffic:
    """Requests straight to one engine in background threads (it emits KV events)."""

    def __init__(self, url: str, seed: int, threads: int = 2, max_requests: int = 2000) -> None:
        self.url = url
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(seed * 1000 + k, max_requests), daemon=True)
            for k in range(threads)
        ]

    def _run(self, seed: int, max_requests: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as http:
            for _ in range(max_requests):
                if self.stop.is_set():
                    return
                # A shared stem (hits) plus a fresh tail (stores; evictions once the pool is full).
                body = {"model": MODEL, "prompt": _tokens(rng.randrange(8), 64) + _tokens(rng.random(), 96),
                        "max_tokens": 4, "ignore_eos": True}  # fmt: skip
                try:
                    r = http.post(f"{self.url}/v1/completions", json=body, timeout=30)
                    ok = r.status_code == 200
                    err = "" if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except requests.RequestException as e:
                    ok, err = False, str(e)
                with self._lock:
                    if ok:
                        self.done += 1
                    else:
                        self.errors.append(err)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=35)


# --- (a) join through a DNS name ------------------------------------------------------


def test_routers_find_each_other_through_one_dns_name(kvmesh_image: str, mesh_scope: Any) -> None:
    scope, meshes = mesh_scope
    # Default node ids: the advertised address, i.e. the container's own IP.
    mesh = start_mesh(scope, kvmesh_image, flags=FAST_MESH, named=False)
    meshes.append(mesh)
    names = list(mesh.routers)
    for n in names:
        assert mesh.node_ids[n] == f"{mesh.ips[n]}:50051"
    mesh.wait_all_alive(names, 20)
    for n in names:
        members = mesh.members(n)
        assert {m.addr for m in members.values()} == {f"{ip}:50051" for ip in mesh.ips.values()}
        assert [m.node_id for m in members.values() if m.is_self] == [mesh.node_ids[n]]
        # Engines given to r1 only are known everywhere, each with one agreed owner.
        mesh.eventually(lambda n=n: set(mesh.engine_status(n)) == set(mesh.engines), 10, f"engines on {n}")
    owners = mesh.eventually(lambda: mesh.agreed_owners(names), 10, "one agreed owner per engine")
    assert set(owners.values()) <= set(mesh.node_ids.values())
    owned = [e for m in mesh.members("r2").values() for e in m.owned_engines]
    assert sorted(owned) == sorted(mesh.engines)
    for n in names:
        st = mesh.admin(n).GetStats(pb.GetStatsRequest(), timeout=5)
        assert st.ready and st.live_members == 3 and st.mesh_bytes_sent > 0, st

    continuation_lands_on_same_engine(mesh, "r1", "r3", seed=1, blocks=40)


# --- (b) SIGKILL of an engine's owner under load ----------------------------------------


def test_killed_owner_hands_over_without_losing_events(kvmesh_image: str, mesh_scope: Any) -> None:
    scope, meshes = mesh_scope
    mesh = start_mesh(scope, kvmesh_image, flags=FAST_MESH)
    meshes.append(mesh)
    names = list(mesh.routers)
    mesh.wait_all_alive(names, 20)
    owners = mesh.eventually(lambda: mesh.agreed_owners(names), 10, "one agreed owner per engine")
    victim = mesh.name_of(owners["e1"])
    survivors = [n for n in names if n != victim]

    with Traffic(mesh.engine_url("e1"), seed=2) as traffic:
        mesh.eventually(lambda: traffic.done >= 10, 20, "traffic to e1 to get going")
        mesh.routers[victim].kill()  # SIGKILL: no hand-over, no goodbye
        t_kill = time.monotonic()
        seq_at_kill = mesh.engine_last_seq("e1")
        time.sleep(2.0)  # the engine keeps emitting while nobody owns it
    assert not traffic.errors, traffic.errors[:5]

    dead_after = {}
    for s in survivors:
        mesh.eventually(lambda s=s: mesh.states(s).get(victim) == "dead", 15, f"{s} to see {victim} dead")
        dead_after[s] = time.monotonic() - t_kill
    new = mesh.eventually(lambda: mesh.agreed_owners(survivors), 10, "the survivors to agree on owners")
    assert new["e1"] in {mesh.node_ids[s] for s in survivors}, new
    # Every survivor's index is the engine's cache, and the log resumes at its
    # last published batch: nothing emitted around the kill was skipped.
    mesh.wait_converged(survivors, ["e1", "e2"], 20, "survivors vs the engines")
    assert mesh.engine_last_seq("e1") > seq_at_kill  # events after the kill were consumed too

    # What `restart: unless-stopped` does next: the same container (same node id,
    # maybe another address) starts again, rejoins through the alias and catches up.
    victim_c = mesh.routers[victim]
    victim_c.start()
    t_restart = time.monotonic()
    mesh.forget_port(victim_c)
    mesh.eventually(lambda: victim_c.logs(stdout=True, stderr=False).decode().count("READY grpc=") >= 2, 30,
                    f"{victim} to be READY again after its restart")  # fmt: skip
    mesh.wait_all_alive(names, 30)
    t_back = time.monotonic() - t_restart
    victim_c.reload()
    new_ip = victim_c.attrs["NetworkSettings"]["Networks"][mesh.net.name]["IPAddress"]
    for n in names:  # everyone reaches it at its current address
        assert mesh.members(n)[victim].addr == f"{new_ip}:50051", (n, mesh.members(n)[victim])
    mesh.eventually(lambda: mesh.agreed_owners(names), 15, "all three to agree on owners again")
    mesh.wait_converged(names, ["e1", "e2"], 20, "every node after the restart")
    print(
        f"kill -> dead on survivors: {dead_after}; requests during the test: {traffic.done}; "
        f"restart -> 3 alive everywhere: {t_back:.1f} s (address {mesh.ips[victim]} -> {new_ip})"
    )


# --- (c) network partition and heal ------------------------------------------------------


def test_partitioned_router_is_replaced_and_the_mesh_heals(kvmesh_image: str, mesh_scope: Any) -> None:
    scope, meshes = mesh_scope
    flags = ["--probe-interval", "0.3", "--gossip-interval", "0.1", "--health-interval", "0.5"]
    # Fixed addresses: a reconnected router keeps the address the others know it by.
    mesh = start_mesh(scope, kvmesh_image, flags=flags, static_ips=True)
    meshes.append(mesh)
    names = list(mesh.routers)
    mesh.wait_all_alive(names, 20)
    owners = mesh.eventually(lambda: mesh.agreed_owners(names), 10, "one agreed owner per engine")
    cut = mesh.name_of(owners["e1"])
    majority = [n for n in names if n != cut]
    engines = list(mesh.engines)

    mesh.net.disconnect(mesh.routers[cut])
    t_cut = time.monotonic()
    for n in majority:
        mesh.eventually(
            lambda n=n: mesh.states(n).get(mesh.node_ids[cut]) == "dead", 20, f"{n} to see {cut} dead"
        )
    t_dead = time.monotonic() - t_cut
    new = mesh.eventually(lambda: mesh.agreed_owners(majority), 10, "the majority to agree on owners")
    assert set(new.values()) <= {mesh.node_ids[n] for n in majority}, new
    owned = [e for m in mesh.members(majority[0]).values() for e in m.owned_engines]
    assert sorted(owned) == sorted(engines)
    # The majority keeps routing, cache-aware, across its nodes.
    continuation_lands_on_same_engine(mesh, majority[0], majority[1], seed=3, blocks=24)
    with Traffic(mesh.engine_url("e1"), seed=4, threads=1) as traffic:
        mesh.eventually(lambda: traffic.done >= 10, 20, "traffic to e1")
    assert not traffic.errors, traffic.errors[:5]
    mesh.wait_converged(majority, engines, 20, "the majority during the partition")

    mesh.net.connect(mesh.routers[cut], aliases=[ALIAS], ipv4_address=mesh.ips[cut])
    mesh.forget_port(mesh.routers[cut])
    t_heal = time.monotonic()
    mesh.wait_all_alive(names, 45)
    t_healed = time.monotonic() - t_heal
    healed_owners = mesh.eventually(
        lambda: mesh.agreed_owners(names), 15, "all three to agree on owners again"
    )
    assert set(healed_owners) == set(engines)
    # Events keep flowing after the heal, and every node ends with the engines' caches.
    with Traffic(mesh.engine_url("e2"), seed=5, threads=1) as traffic:
        mesh.eventually(lambda: traffic.done >= 10, 20, "traffic to e2")
    assert not traffic.errors, traffic.errors[:5]
    mesh.wait_converged(names, engines, 30, "every node after the heal")
    for n in names:
        st = mesh.admin(n).GetStats(pb.GetStatsRequest(), timeout=5)
        assert st.ready and st.live_members == 3, (n, st)
    print(f"partition -> dead on majority: {t_dead:.1f} s; reconnect -> 3 alive everywhere: {t_healed:.1f} s")


# --- (d) graceful leave ----------------------------------------------------------------------


def test_stopped_router_leaves_gracefully_and_its_engines_move(kvmesh_image: str, mesh_scope: Any) -> None:
    scope, meshes = mesh_scope
    mesh = start_mesh(scope, kvmesh_image, flags=FAST_MESH)
    meshes.append(mesh)
    names = list(mesh.routers)
    mesh.wait_all_alive(names, 20)
    owners = mesh.eventually(lambda: mesh.agreed_owners(names), 10, "one agreed owner per engine")
    leaver = mesh.name_of(owners["e1"])
    leaver_id = mesh.node_ids[leaver]
    rest = [n for n in names if n != leaver]

    t0 = time.monotonic()
    mesh.routers[leaver].stop(timeout=10)  # SIGTERM, SIGKILL after 10 s
    t_stop = time.monotonic() - t0
    code, _, _ = scope.wait_exit(mesh.routers[leaver], timeout_s=5)
    assert code == 0, f"{leaver} exit code {code} after SIGTERM\n{mesh.logs_tail()}"
    assert t_stop < 6, f"{leaver} took {t_stop:.1f} s to stop\n{mesh.logs_tail()}"

    seen: dict[str, set[str]] = {n: set() for n in rest}

    def left_everywhere() -> bool:
        for n in rest:
            seen[n].add(mesh.states(n).get(leaver_id, "?"))
        return all(mesh.states(n).get(leaver_id) == "left" for n in rest)

    mesh.eventually(left_everywhere, 3, f"{rest} to see {leaver} as left")
    t_left = time.monotonic() - t0
    assert all("dead" not in s for s in seen.values()), seen  # a departure, not a failure
    new = mesh.eventually(lambda: mesh.agreed_owners(rest), 5, "the others to agree on owners")
    assert set(new.values()) <= {mesh.node_ids[n] for n in rest}, new
    # The new owner consumes e1's events: the rest route cache-aware and converge.
    continuation_lands_on_same_engine(mesh, rest[0], rest[1], seed=6, blocks=24)
    with Traffic(mesh.engine_url("e1"), seed=7, threads=1) as traffic:
        mesh.eventually(lambda: traffic.done >= 10, 20, "traffic to e1")
    assert not traffic.errors, traffic.errors[:5]
    mesh.wait_converged(rest, list(mesh.engines), 20, "the rest after the leave")
    print(f"docker stop: {t_stop:.1f} s; SIGTERM -> left on the others: {t_left:.1f} s")


# --- (e) a router comes back at another address -------------------------------------------


def test_router_restarted_at_a_new_address_rejoins_under_its_node_id(
    kvmesh_image: str, mesh_scope: Any
) -> None:
    """A restarted pod/container often gets a new IP but keeps its name (StatefulSet,
    compose with explicit --node-id): the mesh must take it back at the new address."""
    scope, meshes = mesh_scope
    mesh = start_mesh(scope, kvmesh_image, flags=FAST_MESH, static_ips=True)
    meshes.append(mesh)
    names = list(mesh.routers)
    mesh.wait_all_alive(names, 20)
    owners = mesh.eventually(lambda: mesh.agreed_owners(names), 10, "one agreed owner per engine")
    victim = mesh.name_of(owners["e1"])
    others = [n for n in names if n != victim]
    c = mesh.routers[victim]
    c.kill()
    for n in others:
        mesh.eventually(lambda n=n: mesh.states(n).get(victim) == "dead", 15, f"{n} to see {victim} dead")
    new_ip = DockerScope.subnet_ip(mesh.net, 210)
    mesh.net.disconnect(c)
    mesh.net.connect(c, aliases=[ALIAS], ipv4_address=new_ip)
    c.start()
    mesh.forget_port(c)
    t0 = time.monotonic()
    mesh.eventually(lambda: c.logs(stdout=True, stderr=False).decode().count("READY grpc=") >= 2, 30,
                    f"{victim} to be READY again at {new_ip}")  # fmt: skip
    mesh.wait_all_alive(names, 30)
    for n in names:
        assert mesh.members(n)[victim].addr == f"{new_ip}:50051", (n, mesh.members(n)[victim])
    mesh.eventually(lambda: mesh.agreed_owners(names), 15, "all three to agree on owners again")
    with Traffic(mesh.engine_url("e1"), seed=8, threads=1) as traffic:
        mesh.eventually(lambda: traffic.done >= 10, 20, "traffic to e1")
    assert not traffic.errors, traffic.errors[:5]
    mesh.wait_converged(names, list(mesh.engines), 20, "every node after the move")
    print(f"restart at a new address -> 3 alive everywhere: {time.monotonic() - t0:.1f} s")


# --- a dry run is not a routing decision ------------------------------------------------------


def test_dry_run_route_leaves_no_trace_on_any_node(kvmesh_image: str, mesh_scope: Any) -> None:
    scope, meshes = mesh_scope
    mesh = start_mesh(scope, kvmesh_image, flags=FAST_MESH, n_routers=2, n_engines=1)
    meshes.append(mesh)
    names = list(mesh.routers)
    mesh.wait_all_alive(names, 20)
    mesh.eventually(lambda: set(mesh.engine_status("r2")) == {"e1"}, 10, "e1 known on r2")
    prompt = pb.Prompt(token_ids=pb.TokenIds(ids=_tokens(42, 8 * BLOCK)))  # never sent to any engine
    first = mesh.router("r1").Route(pb.RouteRequest(model=MODEL, prompt=prompt, dry_run=True), timeout=10)
    assert first.engine_id == "e1" and first.predicted_cached_blocks == 0, first
    # For longer than gossip takes but less than a hint's TTL (2 s): no node may
    # believe any block of this prompt is cached anywhere.
    seen = {n: 0 for n in names}
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        for n in names:
            pick = mesh.router(n).Route(pb.RouteRequest(model=MODEL, prompt=prompt, dry_run=True), timeout=10)
            seen[n] = max(seen[n], pick.predicted_cached_blocks)
        time.sleep(0.1)
    assert seen == {n: 0 for n in names}, f"predicted cached blocks after dry runs only: {seen}"


# --- (f) two meshes that formed apart merge --------------------------------------------------


def test_routers_started_together_that_found_only_themselves_merge(
    kvmesh_image: str, mesh_scope: Any
) -> None:
    """Two routers start at the same instant behind one DNS name, but each
    one's resolver has only its own record yet (split_dns): each starts a
    mesh of its own, registers both engines, owns them and writes their logs.
    Once the name resolves to both, the routers' seed refresh finds the
    other: one member list, one owner per engine, every index equal to the
    engine's cache, every log at the engine's last batch."""
    scope, meshes = mesh_scope
    net = scope.network(static_ips=True)
    mesh = Mesh(scope, net)
    meshes.append(mesh)
    engines = _start_engines(mesh, kvmesh_image, {"e1": [net], "e2": [net]})
    names = ["r1", "r2"]
    ips = {n: DockerScope.subnet_ip(net, 200 + i) for i, n in enumerate(names, 1)}
    seeds = fqdn("routers")
    dns = {
        n: DnsServer(
            scope, kvmesh_image, net, DockerScope.subnet_ip(net, 220 + i), f"dns{i}", {seeds: [ips[n]]}
        )
        for i, n in enumerate(names, 1)
    }
    for n in names:
        cmd = [*ROUTER, "--join", f"{seeds}:50051", "--node-id", n, *FAST_MESH]
        cmd += [arg for eid, c in mesh.engines.items() for arg in ("--engine", _engine_spec(eid, c.name))]
        mesh.routers[n] = scope.run(
            kvmesh_image, cmd, name=n, network=net, ports={GRPC: ("127.0.0.1", None)}, ip=ips[n],
            start=False, dns=[dns[n].ip],
        )  # fmt: skip
    for c in mesh.routers.values():  # the same instant
        c.start()
    for n, c in mesh.routers.items():
        scope.wait_ready(c, "READY grpc=", timeout_s=60)
        mesh.node_ids[n] = n
        mesh.ips[n] = ips[n]
    # Two meshes of one, each owning both engines, both consuming their events.
    for n in names:
        assert set(mesh.members(n)) == {n}, mesh.members(n)
        mesh.eventually(lambda n=n: mesh.owners(n) == {e: n for e in engines}, 15, f"{n} to own both engines")
    with (
        Traffic(mesh.engine_url("e1"), seed=11, threads=1) as t1,
        Traffic(mesh.engine_url("e2"), seed=12, threads=1) as t2,
    ):
        mesh.eventually(lambda: t1.done >= 10 and t2.done >= 10, 30, "traffic to both engines")
    assert not t1.errors and not t2.errors, (t1.errors[:3], t2.errors[:3])
    for n in names:
        mesh.wait_converged([n], engines, 20, f"{n}'s mesh of one")

    t0 = time.monotonic()
    for d in dns.values():
        d.set_view({seeds: list(ips.values())})
    with Traffic(mesh.engine_url("e1"), seed=13, threads=1) as traffic:  # events keep coming
        mesh.wait_all_alive(names, 20)
        t_members = time.monotonic() - t0
        owners = mesh.eventually(lambda: mesh.agreed_owners(names), 20, "one agreed owner per engine")
        t_owners = time.monotonic() - t0
    assert not traffic.errors, traffic.errors[:3]
    owned = [e for m in mesh.members("r1").values() for e in m.owned_engines]
    assert sorted(owned) == sorted(engines), owned  # one owner each, no more
    mesh.wait_converged(names, engines, 30, "both routers after the merge")
    t_state = time.monotonic() - t0
    print(
        f"name resolves to both -> one member list on each: {t_members:.1f} s; one owner per engine: "
        f"{t_owners:.1f} s ({owners}); every index = the engines' caches: {t_state:.1f} s"
    )


# --- (g) five routers split 3+2 under event load ---------------------------------------------


def test_five_routers_split_three_two_under_event_load_heal(kvmesh_image: str, mesh_scope: Any) -> None:
    """Five routers, two engines with requests streaming into both. The
    network splits 3+2 for at least 5 s: each side keeps working as a mesh of
    its own (the two minority routers reach each other and the engines over
    a network of their side, by split-horizon DNS), so both sides own and
    consume every engine meanwhile. After the heal: one member list, one
    owner per engine, and every router's index equals the engines' caches
    with its log at each engine's last batch: nothing lost, nothing twice."""
    scope, meshes = mesh_scope
    flags = ["--probe-interval", "0.3", "--gossip-interval", "0.1", "--health-interval", "0.5"]
    net_x = scope.network(static_ips=True)  # everybody
    net_b = scope.network(static_ips=True)  # the minority's side: its routers and the engines
    mesh = Mesh(scope, net_x)
    meshes.append(mesh)
    engines = _start_engines(mesh, kvmesh_image, {"e1": [net_x, net_b], "e2": [net_x, net_b]})
    names = [f"r{i}" for i in range(1, 6)]
    majority, minority = names[:3], names[3:]
    ip_x = {n: DockerScope.subnet_ip(net_x, 200 + i) for i, n in enumerate(names, 1)}
    ip_b = {n: DockerScope.subnet_ip(net_b, 200 + i) for i, n in enumerate(names, 1) if n in minority}
    eng_x = {e: mesh.engine_ips[e][net_x.name] for e in engines}
    eng_b = {e: mesh.engine_ips[e][net_b.name] for e in engines}
    seeds = fqdn("routers")
    view_a = {fqdn(n): [ip_x[n]] for n in names} | {fqdn(e): [eng_x[e]] for e in engines}
    view_a[seeds] = [ip_x[n] for n in names]
    view_b = {fqdn(n): [ip_b.get(n, ip_x[n])] for n in names} | {fqdn(e): [eng_b[e]] for e in engines}
    view_b[seeds] = [ip_x[n] for n in majority]
    dns_a = DnsServer(scope, kvmesh_image, net_x, DockerScope.subnet_ip(net_x, 230), "dns-a", view_a)
    dns_b = DnsServer(scope, kvmesh_image, net_b, DockerScope.subnet_ip(net_b, 230), "dns-b", view_b)
    for n in names:
        cmd = [*ROUTER, "--advertise", f"{fqdn(n)}:50051", "--node-id", n,
               "--join", f"{seeds}:50051", *flags]  # fmt: skip
        if n == "r1":
            cmd += [arg for e in engines for arg in ("--engine", _engine_spec(e, fqdn(e)))]
        side_dns = dns_b if n in minority else dns_a
        mesh.routers[n] = c = scope.run(
            kvmesh_image, cmd, name=n, network=net_x, ports={GRPC: ("127.0.0.1", None)}, ip=ip_x[n],
            start=False, dns=[side_dns.ip],
        )  # fmt: skip
        if n in minority:
            net_b.connect(c, ipv4_address=ip_b[n])
        mesh.node_ids[n] = n
        mesh.ips[n] = ip_x[n]
    for c in mesh.routers.values():
        c.start()
    for n, c in mesh.routers.items():
        line = scope.wait_ready(c, "READY grpc=", timeout_s=60)
        assert f"grpc={fqdn(n)}:50051" in line, line
    mesh.wait_all_alive(names, 30)
    mesh.eventually(lambda: mesh.agreed_owners(names), 15, "one agreed owner per engine")

    def sides_apart() -> bool:
        """Each side sees itself alive and the other side dead."""
        for side, far in ((majority, minority), (minority, majority)):
            for n in side:
                states = mesh.states(n)
                if any(states.get(k) != "alive" for k in side) or any(states.get(k) != "dead" for k in far):
                    return False
        return True

    def owners_within(side: list[str]) -> dict[str, str] | None:
        """The side's agreed engine owners, if every one is on the side."""
        owners = mesh.agreed_owners(side)
        return owners if owners and set(owners.values()) <= set(side) else None

    with (
        Traffic(mesh.engine_url("e1"), seed=21, threads=1) as t1,
        Traffic(mesh.engine_url("e2"), seed=22, threads=1) as t2,
    ):
        mesh.eventually(lambda: t1.done >= 10 and t2.done >= 10, 30, "traffic to both engines")
        for n in minority:
            net_x.disconnect(mesh.routers[n])
            mesh.forget_port(mesh.routers[n])
        t_cut = time.monotonic()
        mesh.eventually(sides_apart, 30, "each side to see the other dead")
        t_apart = time.monotonic() - t_cut
        # Each side owns every engine meanwhile and writes its log in its own epoch.
        split_owners = [
            mesh.eventually(lambda side=side: owners_within(side), 15, f"{side} to own every engine")
            for side in (majority, minority)
        ]
        time.sleep(max(2.0, 5.0 - (time.monotonic() - t_cut)))  # at least 5 s apart, under load
        seqs_split = {e: mesh.engine_last_seq(e) for e in engines}
        for n in minority:
            net_x.connect(mesh.routers[n], ipv4_address=ip_x[n])
            mesh.forget_port(mesh.routers[n])
        t_heal = time.monotonic()
        split_s = t_heal - t_cut
        mesh.wait_all_alive(names, 45)
        t_members = time.monotonic() - t_heal
        time.sleep(2.0)  # events keep coming after the heal too
    assert not t1.errors and not t2.errors, (t1.errors[:3], t2.errors[:3])
    assert all(mesh.engine_last_seq(e) > seqs_split[e] for e in engines)  # events after the heal too
    owners = mesh.eventually(
        lambda: mesh.agreed_owners(names), 20, "one agreed owner per engine after the heal"
    )
    t_owners = time.monotonic() - t_heal
    owned = [e for m in mesh.members("r1").values() for e in m.owned_engines]
    assert sorted(owned) == sorted(engines), owned
    mesh.wait_converged(names, engines, 45, "every router after the heal")
    t_state = time.monotonic() - t_heal
    print(
        f"3+2 split for {split_s:.1f} s (each side saw the other dead after {t_apart:.1f} s; owners "
        f"meanwhile: {split_owners}); heal -> 5 alive everywhere: {t_members:.1f} s; one owner per engine: "
        f"{t_owners:.1f} s ({owners}); every index = the engines' caches and every log at the engines' "
        f"last batch: {t_state:.1f} s; requests: e1 {t1.done}, e2 {t2.done}"
    )


def _start_engines(mesh: Mesh, image: str, networks: dict[str, list[Any]]) -> list[str]:
    """Sim engines on the given networks (the first is the one they are created on),
    at fixed addresses .100+ on each, recorded in ``mesh.engine_ips``."""
    for i, (eid, nets) in enumerate(networks.items(), 1):
        c = mesh.scope.run(
            image, [*sim_engine_cmd(seed=i), "--num-gpu-blocks", "1500", "--time-scale", "0.2"],
            name=eid, network=nets[0], ports={HTTP: ("127.0.0.1", None)},
            ip=DockerScope.subnet_ip(nets[0], 100 + i), start=False,
        )  # fmt: skip
        for other in nets[1:]:
            other.connect(c, ipv4_address=DockerScope.subnet_ip(other, 100 + i))
        mesh.engines[eid] = c
        mesh.engine_ips[eid] = {n.name: DockerScope.subnet_ip(n, 100 + i) for n in nets}
    for c in mesh.engines.values():
        c.start()
    for c in mesh.engines.values():
        mesh.scope.wait_ready(c)
    return list(networks)
