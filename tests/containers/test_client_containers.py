"""kvmesh.client across real hosts: three router containers behind one DNS
name (a Docker network alias, like a headless service), two simulated
engines, and a client container that runs ``kvmesh.client.AsyncClient``
with its default settings under steady load, dialing ``kvmesh-routers:50051``.

What must hold, measured on the nodes themselves (each one's GetStats):

* the client spreads requests over all three nodes (``round_robin`` over
  every address of the name), each within a factor of 2 of the mean;
* a node SIGKILLed mid-run costs no request that had not started
  streaming (gRPC retries those on another node); the only failures are
  streams already running on the killed node (cut with no reason from any
  node, finished by none, by the nodes' own logs, while every request that
  ended well was finished by exactly one node), counted by kind and printed;
* a fourth node added behind the name gets requests once the client has
  dialed the name again (``ClientConfig.reresolve_interval``, 30 s by
  default), and none before: gRPC itself asks DNS again only when a
  connection fails.

Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

from kvmesh.client import ONE_NODE, Client, ClientConfig
from tests.containers import load_client
from tests.containers.conftest import DockerScope
from tests.containers.load_client import LOAD, load_args
from tests.containers.test_mesh_containers import ALIAS, FAST_MESH, GRPC, MODEL, ROUTER, Mesh, start_mesh

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

WORKERS = 6  # concurrent streams of the client
MAX_TOKENS = 48


class Nodes:
    """Each router's own view, through its published port, with kvmesh.client."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.clients: dict[str, Client] = {}

    def client(self, name: str) -> Client:
        if name not in self.clients:
            port = self.mesh.host_port(self.mesh.routers[name], GRPC)
            self.clients[name] = Client(f"127.0.0.1:{port}", tls=False, timeout=5, config=ONE_NODE)
        return self.clients[name]

    def requests(self, names: list[str]) -> dict[str, int]:
        return {n: int(self.client(n).stats().requests_total) for n in names}

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


def _dial_times(container: Any) -> list[float]:
    """When the client dialed the name (its ``DIAL n t`` lines)."""
    out = container.logs(stdout=True, stderr=False).decode(errors="replace")
    return [float(line.split()[2]) for line in out.splitlines() if line.startswith("DIAL ")]


def _done_ids(container: Any) -> dict[str, float]:
    """The request ids a router logged as finished (``router.request_done``), with when."""
    ids = {}
    for line in container.logs(stdout=True, stderr=True).decode(errors="replace").splitlines():
        if '"router.request_done"' in line and line.startswith("{"):
            rec = json.loads(line)
            ids[rec["request_id"]] = datetime.fromisoformat(rec["timestamp"]).timestamp()  # UTC, "Z"
    return ids


def _spread_ok(counts: dict[str, int]) -> bool:
    mean = sum(counts.values()) / len(counts)
    return all(mean / 2 <= c <= 2 * mean for c in counts.values())


def _kind(rec: dict[str, Any]) -> str:
    stage = "before any answer" if not rec.get("started") else (
        "after routed, before a token" if rec["chunks"] == 0 else "mid-stream (after tokens)"
    )  # fmt: skip
    return f"{rec.get('status')}({rec.get('reason') or '-'}) {stage}"


def test_client_spreads_over_the_name_survives_a_kill_and_finds_a_new_node(
    kvmesh_image: str, docker_scope: DockerScope
) -> None:
    mesh = start_mesh(docker_scope, kvmesh_image, flags=FAST_MESH)
    nodes = Nodes(mesh)
    names = ["r1", "r2", "r3"]
    try:
        mesh.wait_all_alive(names, 30)
        mesh.eventually(lambda: all(len(nodes.client(n).list_engines()) == 2 for n in names), 20, "engines")
        base = nodes.requests(names)

        load = docker_scope.run(
            kvmesh_image, load_args(f"{ALIAS}:50051", WORKERS, MAX_TOKENS, MODEL),
            name="client", network=mesh.net, entrypoint=["python", "-c", LOAD],
        )  # fmt: skip
        print(docker_scope.wait_ready(load, "READY client", timeout_s=60))
        t_start = time.time()

        # (1) Steady load: every node takes its share.
        def served() -> dict[str, int]:
            now = nodes.requests(names)
            return {n: now[n] - base[n] for n in names}

        phase_a = mesh.eventually(
            lambda: (s := served()) and sum(s.values()) >= 150 and s, 90, "150 requests"
        )
        print(f"per-node requests (each node's GetStats), 3 nodes behind {ALIAS}: {phase_a}")
        assert all(phase_a.values()) and _spread_ok(phase_a), phase_a

        # (2) SIGKILL one node mid-run.
        victim = "r2"
        in_flight = int(nodes.client(victim).stats().in_flight)
        before_kill = nodes.requests(names)
        t_kill = time.time()
        mesh.routers[victim].kill()  # the SIGKILL lands somewhere in [t_kill, t_killed]
        t_killed = time.time()
        survivors = [n for n in names if n != victim]
        start = sum(nodes.requests(survivors).values())
        mesh.eventually(
            lambda: sum(nodes.requests(survivors).values()) - start >= 100, 60, "load after the kill"
        )

        # (3) A fourth node behind the name, added just after one of the client's
        # dials whose channel no longer had r2 in it (so nothing of the kill makes
        # gRPC ask DNS again): only the client's next dial can find r4.
        reresolve = ClientConfig().reresolve_interval
        mesh.eventually(
            lambda: [t for t in _dial_times(load) if t > t_killed + 1], 2 * reresolve + 30,
            "a dial of the name after the kill",
        )  # fmt: skip
        time.sleep(1.0)  # the dial's DNS answer is in
        t_r4_added = time.time()
        r4_cmd = [*ROUTER, "--join", f"{ALIAS}:50051", "--node-id", "r4", *FAST_MESH]
        mesh.routers["r4"] = docker_scope.run(
            kvmesh_image, r4_cmd, name="r4", network=mesh.net, ports={GRPC: ("127.0.0.1", None)},
            aliases=[ALIAS],
        )  # fmt: skip
        docker_scope.wait_ready(mesh.routers["r4"], "READY grpc=", timeout_s=60)
        t_r4 = time.time()
        samples: list[tuple[float, int]] = []  # (time, r4's requests), read from r4 itself

        def r4_served() -> bool:
            samples.append((time.time(), nodes.requests(["r4"])["r4"]))
            return samples[-1][1] > 0

        mesh.eventually(r4_served, reresolve + 30, "r4 to get requests after the client's next dial")
        t_r4_first = time.time()
        after = nodes.requests([*survivors, "r4"])
        time.sleep(5.0)
        final = nodes.requests([*survivors, "r4"])
        phase_c = {n: final[n] - after[n] for n in final}

        load.exec_run(["python", "-c", "open('/tmp/stop', 'w').close()"])
        code, out, err = docker_scope.wait_exit(load, timeout_s=60)
        assert code == 0, err[-3000:]
        done = [line for line in out.splitlines() if line.startswith("DONE")]
        records = load_client.records(load)
        dial_times = _dial_times(load)
        finished_on = {n: _done_ids(mesh.routers[n]) for n in [*names, "r4"]}
    finally:
        nodes.close()

    failed = [r for r in records if not r["ok"]]
    kinds = Counter(_kind(r) for r in failed)
    ok = len(records) - len(failed)
    print(
        f"killed {victim} ({t_killed - t_kill:.2f} s for docker kill) with {in_flight} requests in flight on "
        f"it (its GetStats just before); "
        f"requests served before the kill: {before_kill}"
    )
    print(f"client: {len(records)} requests, {ok} ok, {len(failed)} failed; failures by kind: {dict(kinds)}")
    for r in failed:
        when = f"started {r['t0'] - t_kill:+.2f} s, ended {r['t1'] - t_kill:+.2f} s from the kill"
        print(f"  failed {r['id']}: {when}, {r['chunks']} chunks: {_kind(r)}: {r.get('message')}")
    redial = min((t for t in dial_times if t > t_r4_added), default=float("inf"))
    idle = [t for t, n in samples if n == 0]
    print(
        f"client dials at {[round(t - t_start, 1) for t in dial_times]} s into the run; r4 added at "
        f"{t_r4_added - t_start:.1f} s, READY at {t_r4 - t_start:.1f} s, no request on it for "
        f"{(max(idle) - t_r4) if idle else 0:.1f} s while READY; the client's next dial at "
        f"{redial - t_start:.1f} s; r4 seen serving at {t_r4_first - t_start:.1f} s; "
        f"per-node requests over the next 5 s: {phase_c}; {done}"
    )

    # Each request the client saw end well was served by exactly one node (none ran
    # twice); each that failed was finished by no survivor: it died with the node it
    # ran on. The victim may have logged one as done at the instant of the kill: its
    # handler had handed the last tokens to gRPC, whose send buffer died with it.
    where = Counter(n for ids in finished_on.values() for n in ids)
    assert all(where[r["id"]] == 1 for r in records if r["ok"]), "a request served twice, or by no node"
    for r in failed:
        finished_by = [n for n, ids in finished_on.items() if r["id"] in ids]
        assert finished_by in ([], [victim]), (r, finished_by, "a failed request was finished by a survivor")
        if finished_by:
            at = finished_on[victim][r["id"]]
            assert t_kill - 1.0 < at < t_killed + 0.5, (r, at - t_kill, "logged done long before the kill")
    print(f"requests finished per node (their logs): { {n: len(ids) for n, ids in finished_on.items()} }")

    # No request that had not started streaming failed.
    assert not [r for r in failed if not r.get("started")], kinds
    # The failures are streams that were running on the killed node when it died:
    # started before the kill, cut by it (no node said why: the connection died).
    for r in failed:
        assert r["status"] == "UNAVAILABLE" and not r.get("reason"), r
        assert r["t0"] < t_killed and t_kill < r["t1"] < t_killed + 5, r
    assert len(failed) <= WORKERS
    # r4 got calls once the client had dialed the name again, and none before
    # (gRPC alone does not ask DNS again while its connections are fine).
    assert t_r4_added < redial < t_r4_first, (t_r4_added, dial_times, t_r4_first)
    assert all(n == 0 for t, n in samples if t < redial - 0.5), (samples, redial)
    # The new node takes a share of the load, the others keep theirs.
    assert all(phase_c.values()), phase_c
    assert ok >= 300
