"""Rolling restart and scaling of the router mesh under steady load, in containers.

A client container runs ``kvmesh.client.AsyncClient`` (its ``dns:///`` target,
``round_robin`` over every address of the routers' one DNS name, retry of
UNAVAILABLE before any answer) in a few concurrent loops of Generate for the
whole test, and prints one line per request. Each router's own GetStats says
how many requests it served (finished on an engine).

* Rolling restart: three routers behind one network alias, two simulated
  engines; every router in turn is stopped with ``docker stop`` (SIGTERM:
  the node drains, then leaves; SIGKILL only after a bound far above the
  drain) while a long stream runs on it (it must finish whole), started
  again, and waited for until every node sees it alive and it has served
  requests again. Not one request may fail.
* Scale: ``deploy/docker-compose.yml`` as shipped (3 routers, 4 engines),
  ``up --scale router=5`` (the mesh has 5 members and the new ones serve),
  then ``--scale router=3`` (the two removed drain a long stream each and
  leave, the rest keep every engine). Not one request may fail.

Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from kvmesh.client import Chunk, Client, KvmeshError, Result
from tests.containers import load_client
from tests.containers.conftest import REPO, SESSION_ID, DockerScope
from tests.containers.load_client import LOAD, load_args
from tests.containers.test_images import MODEL, _compose_cmd
from tests.containers.test_mesh_containers import ALIAS, FAST_MESH, GRPC, Mesh, start_mesh

pytestmark = [pytest.mark.docker, pytest.mark.timeout(420)]

WORKERS = 4  # concurrent streams of the client
MAX_TOKENS = 32
# docker stop's SIGKILL bound: far above the drain here (a few seconds: the long
# stream below), so a node that does not drain shows as a kill (exit 137).
STOP_TIMEOUT = 40
SERVE_BOUND = 60.0  # seconds for a (re)started node to serve requests again
# Output tokens of the stream kept in flight on a node across its SIGTERM: seconds
# of decoding on an engine run with --time-scale 0.2 (start_mesh).
LONG_TOKENS = 1500
COMPOSE_LONG_TOKENS = 300  # the same for the compose file's engines (real time)
T = TypeVar("T")


def _eventually(pred: Callable[[], T], timeout_s: float, what: Callable[[], str] | str) -> T:
    """``pred()`` once truthy, polled; fails after ``timeout_s`` with the last value or error."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except (KvmeshError, KeyError, IndexError) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what() if callable(what) else what}; "
                        f"last: {last}")  # fmt: skip
        time.sleep(0.25)


class Nodes:
    """Each router's own view through its published loopback port, with kvmesh.client
    (a client per port: a restarted container is published on another one)."""

    def __init__(self) -> None:
        self._clients: dict[int, Client] = {}

    def client(self, container: Any) -> Client:
        port = DockerScope.host_port(container, GRPC)
        if port not in self._clients:
            self._clients[port] = Client(f"127.0.0.1:{port}", tls=False, timeout=5)
        return self._clients[port]

    def served(self, container: Any) -> int:
        """Requests this node's process finished on an engine (its GetStats)."""
        return sum(self.client(container).stats().requests_by_engine.values())

    def states(self, container: Any) -> dict[str, str]:
        return {m.node_id: m.state for m in self.client(container).list_members()}

    def owners(self, container: Any) -> dict[str, str]:
        return {e.spec.engine_id: e.owner_node for e in self.client(container).list_engines()}

    def close(self) -> None:
        for c in self._clients.values():
            c.close()


class Load:
    """The client container: steady Generate load through the routers' DNS name."""

    def __init__(self, scope: DockerScope, image: str, net: Any, reresolve: float | None = None) -> None:
        # A short pause between requests: a steady load, not a flood.
        args = load_args(f"{ALIAS}:50051", WORKERS, MAX_TOKENS, MODEL, reresolve, pause=0.02)
        self.scope = scope
        self.container = scope.run(image, args, name="client", network=net, entrypoint=["python", "-c", LOAD])
        print(scope.wait_ready(self.container, "READY client", timeout_s=60))

    def records(self) -> list[dict[str, Any]]:
        return load_client.records(self.container)

    def stop(self) -> tuple[list[dict[str, Any]], str]:
        """Let every loop finish its request, then every request's record and the DONE line."""
        self.container.exec_run(["python", "-c", "open('/tmp/stop', 'w').close()"])
        code, out, err = self.scope.wait_exit(self.container, timeout_s=60)
        assert code == 0, err[-3000:]
        done = next((line for line in out.splitlines() if line.startswith("DONE")), "")
        return self.records(), done

    def remove(self) -> None:
        """Removed now (not at the test's end): a container on the compose network keeps `down` from
        removing it."""
        try:
            self.container.remove(force=True)
        finally:
            self.scope.containers.remove(self.container)


def _failures(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter[str]]:
    failed = [r for r in records if not r["ok"]]
    kinds = Counter(
        f"{r.get('status')}({r.get('reason') or '-'}) "
        + ("before any answer" if not r.get("started") else f"after {r['chunks']} chunks")
        for r in failed
    )
    return failed, kinds


def _report_failures(failed: list[dict[str, Any]], t_ref: float) -> None:
    for r in failed[:20]:
        print(f"  failed {r['id']}: started {r['t0'] - t_ref:+.2f} s, ended {r['t1'] - t_ref:+.2f} s "
              f"(from the test's start), {r['chunks']} chunks: {r.get('status')} "
              f"{r.get('reason')}: {r.get('message')}")  # fmt: skip


def _log_lines(container: Any) -> list[str]:
    return container.logs(stdout=True, stderr=True).decode(errors="replace").splitlines()


def _drained(lines: list[str]) -> list[dict[str, Any]]:
    """The node's ``router.drained`` events (JSON logs)."""
    out = []
    for line in lines:
        if '"router.drained"' in line:
            try:
                out.append(json.loads(line[line.index("{") :]))
            except ValueError:
                continue
    return out


class LongStream:
    """One long Generate straight to one node (its published port), in a thread:
    started before that node's SIGTERM, it must finish whole (the drain waits for it)."""

    def __init__(self, client: Client, max_tokens: int) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.first_chunk = threading.Event()
        self.completion_tokens = -1
        self.error = ""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        prompt = list(range(5000, 5064))
        try:
            events = self.client.generate(
                prompt, model=MODEL, max_tokens=self.max_tokens, ignore_eos=True, timeout=120
            )
            for ev in events:
                if isinstance(ev, Chunk):
                    self.first_chunk.set()
                elif isinstance(ev, Result):
                    self.completion_tokens = ev.completion_tokens
        except KvmeshError as e:
            self.error = f"{e.status}({e.reason}) started={e.started}: {e.message[:200]}"
        finally:
            self.first_chunk.set()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout=timeout_s)

    def whole(self) -> bool:
        return self.completion_tokens == self.max_tokens and not self.error


def _restart(mesh: Mesh, nodes: Nodes, names: list[str], name: str) -> dict[str, Any]:
    """Stop router ``name`` with docker stop while a long stream runs on it (it must
    drain: the stream finishes, the process exits 0, the others see it leave), start
    it again, wait until every node sees all alive and it serves again."""
    c = mesh.routers[name]
    others = [n for n in names if n != name]
    long = LongStream(nodes.client(c), LONG_TOKENS)
    assert long.first_chunk.wait(30) and not long.error, long.error
    t0 = time.monotonic()
    c.stop(timeout=STOP_TIMEOUT)  # SIGTERM: drain, leave; SIGKILL only after STOP_TIMEOUT
    t_stop = time.monotonic() - t0
    long.join(30)
    c.reload()
    exit_code = c.attrs["State"]["ExitCode"]
    drained = _drained(_log_lines(c))
    assert exit_code == 0 and drained, (
        f"{name} did not drain and exit (exit {exit_code}, {t_stop:.1f} s):\n{DockerScope.logs(c)}"
    )
    # The stream in flight at the SIGTERM ran to its end: the drain waited for it.
    assert long.whole(), (long.completion_tokens, long.error)
    assert drained[-1]["waited"] > 0 and drained[-1]["unfinished"] == 0, drained[-1]
    # The others saw it leave (gracefully), not die.
    _eventually(
        lambda: all(nodes.states(mesh.routers[o]).get(name) == "left" for o in others), 15,
        f"{others} to see {name} left",
    )  # fmt: skip
    c.start()
    t_start = time.monotonic()
    mesh.forget_port(c)
    mesh.eventually(lambda: c.logs(stdout=True, stderr=False).decode().count("READY grpc=") >= 2, 60,
                    f"{name} to be READY again")  # fmt: skip
    mesh.wait_all_alive(names, 30)
    t_alive = time.monotonic() - t_start
    # A fresh process: its counters start at 0, so any count is a request served since.
    _eventually(lambda: nodes.served(c) >= 5, SERVE_BOUND, f"{name} to serve again after its restart")
    return {
        "long_stream": f"{long.completion_tokens}/{LONG_TOKENS} tokens",
        "docker_stop_s": round(t_stop, 1),
        "drained": {k: drained[-1].get(k) for k in ("waited", "unfinished")},
        "all_alive_s": round(t_alive, 1),
        "serving_s": round(time.monotonic() - t_start, 1),
    }


def test_rolling_restart_of_every_router_loses_no_request(
    kvmesh_image: str, docker_scope: DockerScope
) -> None:
    t_test = time.time()
    mesh = start_mesh(docker_scope, kvmesh_image, flags=[*FAST_MESH, "--log-format", "json"])
    names = ["r1", "r2", "r3"]
    nodes = Nodes()
    load: Load | None = None
    restarts: dict[str, dict[str, Any]] = {}
    try:
        mesh.wait_all_alive(names, 30)
        mesh.eventually(
            lambda: all(len(mesh.engine_status(n)) == 2 for n in names), 20, "2 engines everywhere"
        )
        load = Load(docker_scope, kvmesh_image, mesh.net)  # every client setting: the defaults
        before = _eventually(
            lambda: (s := {n: nodes.served(mesh.routers[n]) for n in names}) and min(s.values()) >= 10 and s,
            60, "every node to serve 10 requests",
        )  # fmt: skip
        print(f"before the restarts, served per node: {before}")

        for name in names:
            restarts[name] = _restart(mesh, nodes, names, name)
            print(f"restarted {name}: {restarts[name]}")

        time.sleep(3.0)  # load on the fully restarted mesh
        after = {n: nodes.served(mesh.routers[n]) for n in names}
        records, done = load.stop()
    finally:
        nodes.close()
        mesh.close()

    failed, kinds = _failures(records)
    print(f"rolling restart: {len(records)} requests sent, {len(failed)} failed {dict(kinds)}; "
          f"served per node since its restart: {after}; client {done}; "
          f"{time.time() - t_test:.0f} s")  # fmt: skip
    _report_failures(failed, t_test)
    assert not failed, kinds
    assert all(v > 0 for v in after.values()), after
    assert len(records) >= 100, len(records)


class Compose:
    """deploy/docker-compose.yml under a project name of this session."""

    def __init__(self, docker_client: Any) -> None:
        self.client = docker_client
        self.project = f"kvmeshroll{SESSION_ID}"
        self.cmd = [*_compose_cmd(), "-p", self.project, "-f", str(REPO / "deploy" / "docker-compose.yml")]
        self.env = {k: v for k, v in os.environ.items() if k != "KVMESH_ROUTER_PORTS"}  # ports Docker picks

    def sh(self, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.cmd, *args], env=self.env, capture_output=True, text=True, timeout=timeout_s
        )

    def up(self, *args: str) -> float:
        t0 = time.monotonic()
        r = self.sh("up", "-d", "--no-build", *args)
        assert r.returncode == 0, r.stdout + r.stderr
        return time.monotonic() - t0

    def routers(self) -> dict[int, Any]:
        """Running router containers by compose's container number."""
        found = self.client.containers.list(
            filters={
                "label": [f"com.docker.compose.project={self.project}", "com.docker.compose.service=router"]
            }
        )
        return {int(c.labels["com.docker.compose.container-number"]): c for c in found}

    def node_id(self, container: Any) -> str:
        line = DockerScope.wait_ready_static(container, "READY grpc=", timeout_s=90)
        return dict(f.split("=", 1) for f in line.split()[1:])["node"]

    def network(self) -> Any:
        return self.client.networks.get(f"{self.project}_kvmesh")

    def down(self, *, show_logs: bool) -> None:
        if show_logs:
            print(self.sh("logs", "--no-color", "--tail", "15", timeout_s=60).stdout[-8000:])
        down = self.sh("down", "-v", "-t", "10", "--remove-orphans", timeout_s=180)
        if down.returncode != 0:  # fall back to removing by compose's labels
            print(down.stdout + down.stderr)
            label = f"com.docker.compose.project={self.project}"
            for c in self.client.containers.list(all=True, filters={"label": label}):
                c.remove(force=True)
            for n in self.client.networks.list(filters={"label": label}):
                n.remove()


def _follow(container: Any, into: list[str]) -> threading.Thread:
    """Collect a container's log lines until it stops (compose removes it right after)."""

    def run() -> None:
        try:
            for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
                into.extend(chunk.decode(errors="replace").splitlines())
        except Exception as e:  # removed under us: what came so far is what we have
            into.append(f"<log stream ended: {e}>")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_compose_scale_router_to_5_and_back_to_3_loses_no_request(
    kvmesh_image: str, docker_client: Any, docker_scope: DockerScope
) -> None:
    t_test = time.time()
    compose = Compose(docker_client)
    nodes = Nodes()
    load: Load | None = None
    passed = False
    try:
        compose.up()
        routers = compose.routers()
        assert sorted(routers) == [1, 2, 3], routers
        ids = {k: compose.node_id(c) for k, c in routers.items()}

        def alive_everywhere(want: set[str], on: dict[int, Any]) -> bool:
            return all({n for n, s in nodes.states(c).items() if s == "alive"} == want for c in on.values())

        _eventually(lambda: alive_everywhere(set(ids.values()), routers), 30, "3 alive on every node")
        _eventually(lambda: all(len(nodes.owners(c)) == 4 for c in routers.values()), 20, "4 engines")

        # Dialing the name again every 5 s (instead of 30) keeps the wait for the new nodes short.
        load = Load(docker_scope, kvmesh_image, compose.network(), reresolve=5.0)
        _eventually(lambda: all(nodes.served(c) >= 10 for c in routers.values()), 60, "3 nodes serving")

        # Up to 5.
        t_up = compose.up("--scale", "router=5")
        routers = compose.routers()
        assert sorted(routers) == [1, 2, 3, 4, 5], routers
        ids = {k: ids.get(k) or compose.node_id(c) for k, c in routers.items()}
        _eventually(lambda: alive_everywhere(set(ids.values()), routers), 30, "5 alive on every node")
        new = {k: routers[k] for k in (4, 5)}
        _eventually(
            lambda: all(nodes.served(c) >= 5 for c in new.values()), SERVE_BOUND, "the new nodes to serve"
        )
        time.sleep(3.0)
        at_5 = {f"router_{k}": nodes.served(c) for k, c in routers.items()}
        print(f"scaled to 5 ({t_up:.1f} s for compose up): members {sorted(ids.values())}; "
              f"served per node: {at_5}")  # fmt: skip

        # Back to 3: compose stops (SIGTERM: drain) and removes the two it drops.
        logs: dict[int, list[str]] = {k: [] for k in routers}
        followers = {k: _follow(c, logs[k]) for k, c in routers.items()}
        before_down = {k: nodes.served(c) for k, c in routers.items()}
        # A long stream on each node compose will drop (the highest numbers) across its SIGTERM.
        longs = {k: LongStream(nodes.client(routers[k]), COMPOSE_LONG_TOKENS) for k in (4, 5)}
        for k, s in longs.items():
            assert s.first_chunk.wait(30) and not s.error, (k, s.error)
        t_down = compose.up("--scale", "router=3")
        kept = compose.routers()
        assert len(kept) == 3, kept
        removed = sorted(set(routers) - set(kept))
        assert removed == sorted(longs), removed
        for s in longs.values():
            s.join(30)
        assert all(s.whole() for s in longs.values()), {
            k: (s.completion_tokens, s.error) for k, s in longs.items()
        }
        kept_ids = {ids[k] for k in kept}
        _eventually(lambda: alive_everywhere(kept_ids, kept), 30, "3 alive on every remaining node")
        # The removed nodes left gracefully (after their drain), they did not die.
        states = {k: nodes.states(c) for k, c in kept.items()}
        for k in removed:
            assert all(s.get(ids[k]) == "left" for s in states.values()), (ids[k], states)
        for k in removed:
            followers[k].join(timeout=10)  # the stream ends with the container
            drained = _drained(logs[k])
            assert drained and drained[-1]["waited"] > 0 and drained[-1]["unfinished"] == 0, (
                k,
                logs[k][-20:],
            )
        # Nothing lost: every engine still registered, owned by a remaining node, the same on all.
        owners = _eventually(
            lambda: (o := [nodes.owners(c) for c in kept.values()]) and all(x == o[0] for x in o)
            and len(o[0]) == 4 and set(o[0].values()) <= kept_ids and o[0],
            20, "the 3 remaining to agree on owners of the 4 engines",
        )  # fmt: skip
        start = {k: nodes.served(c) for k, c in kept.items()}
        _eventually(
            lambda: all(nodes.served(c) - start[k] >= 5 for k, c in kept.items()), 30, "3 nodes serving"
        )
        final = {f"router_{k}": nodes.served(c) for k, c in kept.items()}
        records, done = load.stop()
        load.remove()
        load = None
        passed = True
    finally:
        nodes.close()
        if load is not None:
            load.remove()
        compose.down(show_logs=not passed)

    failed, kinds = _failures(records)
    drained_removed = {f"router_{k}": _drained(logs[k])[-1] for k in removed}
    print(f"scaled back to 3 ({t_down:.1f} s for compose up): removed {[f'router_{k}' for k in removed]} "
          f"(a stream in flight on each at the SIGTERM finished: "
          f"{[f'{s.completion_tokens}/{s.max_tokens}' for s in longs.values()]} tokens), "
          f"served by them before: {[before_down[k] for k in removed]}; their drains: "
          f"{ {k: {f: v.get(f) for f in ('waited', 'unfinished')} for k, v in drained_removed.items()} }; "
          f"owners now {owners}")  # fmt: skip
    print(f"scale 3 -> 5 -> 3: {len(records)} requests sent, {len(failed)} failed {dict(kinds)}; "
          f"served per node at the end: {final}; client {done}; {time.time() - t_test:.0f} s")  # fmt: skip
    _report_failures(failed, t_test)
    assert not failed, kinds
    assert len(records) >= 100, len(records)
