"""The kvmesh image in real containers: CLI, sim engines on a network, a router in front.

Images come from the session fixture ``kvmesh_image`` (built from the local
Debian base, no registry). Each test makes its own network and containers and
removes them at the end (``docker_scope``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Any

import pytest

from tests.containers.conftest import BASE_IMAGE, REPO, SESSION_ID, DockerScope

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

MODEL = "sim-model"
BLOCK = 16


def sim_engine_cmd(seed: int) -> list[str]:
    return [
        "sim-engine", "--host", "0.0.0.0", "--port", "8000",
        "--kv-events-endpoint", "tcp://*:5557", "--kv-replay-endpoint", "tcp://*:5558",
        "--model", MODEL, "--block-size", str(BLOCK), "--seed", str(seed),
    ]  # fmt: skip


def test_image_cli_lists_router_and_sim_engine(kvmesh_image: str, docker_scope: DockerScope) -> None:
    c = docker_scope.run(kvmesh_image, ["--help"], name="help")
    code, out, err = docker_scope.wait_exit(c)
    assert code == 0, err
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()}
    assert {"router", "sim-engine"} <= listed, out
    # The flags deploy/docker-compose.yml and the tests below rely on.
    for sub, flags in {
        "router": ["--listen", "--node-id", "--policy", "--engine"],
        "sim-engine": ["--host", "--port", "--kv-events-endpoint", "--kv-replay-endpoint", "--model"],
    }.items():
        c = docker_scope.run(kvmesh_image, [sub, "--help"], name=f"help-{sub}")
        code, out, err = docker_scope.wait_exit(c)
        assert code == 0, err
        missing = [f for f in flags if f not in out]
        assert not missing, f"`kvmesh {sub} --help` lacks {missing}:\n{out}"


def test_image_is_lean_and_runs_unprivileged(kvmesh_image: str, docker_client: Any) -> None:
    app = docker_client.images.get(kvmesh_image).attrs
    base = docker_client.images.get(BASE_IMAGE).attrs
    assert app["Config"]["Entrypoint"] == ["kvmesh"]
    assert app["Config"]["User"] not in ("", "root", "0")
    assert base["Size"] < 400e6, f"base image grew to {base['Size'] / 1e6:.0f} MB"
    # The app layer on top of the base holds only kvmesh itself.
    assert app["Size"] - base["Size"] < 20e6
    # Docs are gone, but every package's copyright file stays (its licence asks for it).
    out = docker_client.containers.run(
        kvmesh_image,
        ["-c", "import glob; d = glob.glob('/usr/share/doc/*/*'); "
               "print(len(d), sum(p.endswith('/copyright') for p in d))"],
        entrypoint=["python"],
        remove=True,
    )  # fmt: skip
    files, copyrights = map(int, out.split())
    assert copyrights >= 50 and files == copyrights, (files, copyrights)


# Runs inside a third container on the test network: one streamed completion per
# engine URL (and a repeat on the first), printed as JSON.
CLIENT = r"""
import asyncio, json, sys
import aiohttp

PROMPT = list(range(1000, 1064))  # 4 full blocks of 16

async def complete(session, url):
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 8, "stream": True,
            "return_token_ids": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    res = {"url": url, "token_ids": [], "text": "", "finish_reason": None, "usage": None, "done": False}
    async with session.post(url + "/v1/completions", json=body) as r:
        res["status"] = r.status
        async for raw in r.content:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                res["done"] = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                for ch in chunk["choices"]:
                    res["token_ids"] += ch.get("token_ids") or []
                    res["text"] += ch.get("text") or ""
                    res["finish_reason"] = ch.get("finish_reason") or res["finish_reason"]
                res["usage"] = chunk.get("usage") or res["usage"]
    return res

async def main():
    urls = sys.argv[1:]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        out = [await complete(s, u) for u in urls + urls[:1]]
    print(json.dumps(out))

asyncio.run(main())
"""


def test_sim_engines_answer_by_container_name(kvmesh_image: str, docker_scope: DockerScope) -> None:
    net = docker_scope.network()
    engines = [
        docker_scope.run(kvmesh_image, sim_engine_cmd(seed=i), name=f"e{i}", network=net) for i in (1, 2)
    ]
    for e in engines:
        docker_scope.wait_ready(e)
    urls = [f"http://{e.name}:8000" for e in engines]
    client = docker_scope.run(
        kvmesh_image, ["-c", CLIENT, *urls], name="client", network=net, entrypoint=["python"]
    )
    code, out, err = docker_scope.wait_exit(client)
    assert code == 0, f"client failed:\n{err}"
    results = json.loads(out.strip().splitlines()[-1])
    assert [r["url"] for r in results] == urls + urls[:1]
    for r in results:
        assert r["status"] == 200, r
        assert r["done"], r
        assert len(r["token_ids"]) == 8, r
        assert r["finish_reason"] == "length", r
        assert r["usage"]["prompt_tokens"] == 64 and r["usage"]["completion_tokens"] == 8, r
    first, repeat = results[0], results[2]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, first
    # The same prompt again on the same engine hits its prefix cache.
    cached = repeat["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 3 * BLOCK and cached % BLOCK == 0, repeat


def _engine_spec(engine_id: str, host: str) -> str:
    return (
        f"id={engine_id},url=http://{host}:8000,kv=tcp://{host}:5557,"
        f"replay=tcp://{host}:5558,model={MODEL},block_size={BLOCK}"
    )


def test_router_container_routes_generate_from_host(kvmesh_image: str, docker_scope: DockerScope) -> None:
    import grpc

    from kvmesh.client import ONE_NODE
    from kvmesh.client import channel as client_channel
    from kvmesh_pb.v1 import router_pb2 as pb
    from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

    net = docker_scope.network()
    engines = {
        f"e{i}": docker_scope.run(kvmesh_image, sim_engine_cmd(seed=i), name=f"e{i}", network=net)
        for i in (1, 2)
    }
    for e in engines.values():
        docker_scope.wait_ready(e)
    router_cmd = [
        "router",
        "--listen",
        "0.0.0.0:50051",
        "--node-id",
        "r1",
        "--policy",
        "precise",
        "--insecure",
    ]
    for eid, c in engines.items():
        router_cmd += ["--engine", _engine_spec(eid, c.name)]
    router = docker_scope.run(
        kvmesh_image, router_cmd, name="r1", network=net, ports={"50051/tcp": ("127.0.0.1", None)}
    )
    assert docker_scope.wait_ready(router, "READY grpc=").startswith("READY grpc=")
    port = docker_scope.host_port(router, "50051/tcp")

    prompt = pb.Prompt(token_ids=pb.TokenIds(ids=list(range(2000, 2064))))  # 4 full blocks
    with client_channel(f"127.0.0.1:{port}", tls=False, config=ONE_NODE) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        router_stub = pb_grpc.RouterStub(channel)
        admin = pb_grpc.AdminStub(channel)

        listed = admin.ListEngines(pb.ListEnginesRequest(), timeout=10)
        assert sorted(s.spec.engine_id for s in listed.engines) == ["e1", "e2"]

        def generate() -> tuple[Any, list[int], Any]:
            req = pb.GenerateRequest(
                model=MODEL, prompt=prompt, sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True)
            )
            msgs = list(router_stub.Generate(req, timeout=30))
            kinds = [m.WhichOneof("event") for m in msgs]
            assert kinds[0] == "routed" and kinds[-1] == "finished", kinds
            tokens = [t for m in msgs if m.HasField("chunk") for t in m.chunk.token_ids]
            return msgs[0].routed, tokens, msgs[-1].finished

        routed, tokens, fin = generate()
        assert routed.engine_id in engines
        assert len(tokens) == 8 and fin.completion_tokens == 8
        assert fin.finish_reason == "length" and fin.prompt_tokens == 64

        # The engine's KV events cross the container network (ZMQ) to the router:
        # the precise policy soon sees the prompt's blocks on that engine.
        deadline = time.monotonic() + 15
        seen = 0
        while time.monotonic() < deadline:
            pick = router_stub.Route(pb.RouteRequest(model=MODEL, prompt=prompt, dry_run=True), timeout=10)
            seen = pick.predicted_cached_blocks if pick.engine_id == routed.engine_id else 0
            if seen >= 3:
                break
            time.sleep(0.2)
        assert seen >= 3, f"router never saw the cached prefix on {routed.engine_id}"

        again, tokens2, fin2 = generate()
        assert again.engine_id == routed.engine_id
        assert again.predicted_cached_blocks >= 3
        assert len(tokens2) == 8 and fin2.cached_prompt_tokens >= 3 * BLOCK


def _compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if probe.returncode == 0:
        return ["docker", "compose"]
    pytest.fail(
        "neither docker-compose nor `docker compose` is installed: the compose deployment cannot be tested"
    )


def test_compose_deployment_every_router_sees_every_engine_cache(
    kvmesh_image: str, docker_client: Any
) -> None:
    """deploy/docker-compose.yml as shipped: 3 routers that form one mesh through a
    shared DNS name (one scaled service), 4 engines registered by the same flags on
    each; any router serves any client."""

    from kvmesh.client import ONE_NODE
    from kvmesh.client import channel as client_channel
    from kvmesh_pb.v1 import router_pb2 as pb
    from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

    project = f"kvmesht{SESSION_ID}"
    env = {k: v for k, v in os.environ.items() if k != "KVMESH_ROUTER_PORTS"}  # ports Docker picks
    compose = [*_compose_cmd(), "-p", project, "-f", str(REPO / "deploy" / "docker-compose.yml")]

    def sh(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=timeout_s)

    try:
        up = sh("up", "-d", "--no-build")
        assert up.returncode == 0, up.stdout + up.stderr
        found = docker_client.containers.list(
            filters={"label": [f"com.docker.compose.project={project}", "com.docker.compose.service=router"]}
        )
        assert len(found) == 3, f"router: {found}"
        routers = sorted(found, key=lambda c: int(c.labels["com.docker.compose.container-number"]))
        ports: list[int] = []
        engines = [
            c
            for c in docker_client.containers.list(filters={"label": f"com.docker.compose.project={project}"})
            if c.labels.get("com.docker.compose.service", "").startswith("engine-")
        ]
        assert len(engines) == 4
        # Only the routers publish ports, and only on loopback.
        for c in engines:
            c.reload()
            assert not any(c.ports.values()), c.ports
        for c in routers:
            DockerScope.wait_ready_static(c, "READY grpc=", timeout_s=90)
            c.reload()
            [published] = c.ports["50051/tcp"]
            assert published["HostIp"] == "127.0.0.1", c.ports
            ports.append(int(published["HostPort"]))
            # One DNS name for all: every router joins through the alias, each names the engines.
            args = c.attrs["Args"]
            assert "kvmesh-routers:50051" in args and "--engine" in args, args
        addrs = {
            f"{c.attrs['NetworkSettings']['Networks'][n]['IPAddress']}:50051"
            for c in routers
            for n in c.attrs["NetworkSettings"]["Networks"]
        }
        node_ids = addrs  # with no --node-id, a node is known by its advertised address

        prompt = pb.Prompt(token_ids=pb.TokenIds(ids=list(range(3000, 3064))))
        channels = [client_channel(f"127.0.0.1:{p}", tls=False, config=ONE_NODE) for p in ports]
        try:
            stubs = [pb_grpc.RouterStub(ch) for ch in channels]
            admins = [pb_grpc.AdminStub(ch) for ch in channels]

            def mesh_view(admin: Any) -> tuple[dict[str, str], dict[str, str]] | None:
                members = admin.ListMembers(pb.ListMembersRequest(), timeout=10).members
                engines = admin.ListEngines(pb.ListEnginesRequest(), timeout=10).engines
                alive = {m.node_id: m.addr for m in members if m.state == "alive"}
                owners = {e.spec.engine_id: e.owner_node for e in engines}
                return (alive, owners) if set(alive) == node_ids and len(owners) == 4 else None

            # One mesh: every router sees the 3 alive and computes the same owner per engine.
            deadline = time.monotonic() + 30
            views = [mesh_view(a) for a in admins]
            while not (views[0] is not None and all(v == views[0] for v in views)):
                assert time.monotonic() < deadline, (
                    f"the routers never agreed on 3 members and 4 engines: {views}"
                )
                time.sleep(0.3)
                views = [mesh_view(a) for a in admins]
            alive, owners = views[0]
            assert set(alive.values()) == addrs, (alive, addrs)  # each advertises its container address
            assert set(owners) == {"e1", "e2", "e3", "e4"} and set(owners.values()) <= node_ids, owners
            req = pb.GenerateRequest(
                model=MODEL, prompt=prompt, sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True)
            )
            msgs = list(stubs[0].Generate(req, timeout=30))
            first_engine = msgs[0].routed.engine_id
            assert first_engine in {"e1", "e2", "e3", "e4"}
            assert msgs[-1].finished.completion_tokens == 4
            # Routers 2 and 3 never saw that request, but the engine's owner spreads
            # its KV events through the mesh: they soon send the same prompt to the same engine.
            # (Polled through ListEngines, not Route: a Route, even a dry run, leaves
            # a route hint for the engine it picks while the index is still empty.)
            for admin, stub in zip(admins[1:], stubs[1:]):
                deadline = time.monotonic() + 15
                held: dict[str, Any] = {}
                while time.monotonic() < deadline:
                    held = {
                        e.spec.engine_id: e
                        for e in admin.ListEngines(pb.ListEnginesRequest(), timeout=10).engines
                    }
                    if held[first_engine].cached_blocks >= 4 and all(e.in_flight == 0 for e in held.values()):
                        break
                    time.sleep(0.2)
                assert held[first_engine].cached_blocks >= 4, held[first_engine]
                pick = stub.Route(pb.RouteRequest(model=MODEL, prompt=prompt, dry_run=True), timeout=10)
                assert pick.engine_id == first_engine and pick.predicted_cached_blocks >= 3, pick
                out = list(stub.Generate(req, timeout=30))
                assert out[0].routed.engine_id == first_engine, out[0]
                assert out[-1].finished.cached_prompt_tokens >= 3 * BLOCK, out[-1]
        finally:
            for ch in channels:
                ch.close()
    finally:
        logs = sh("logs", "--no-color", "--tail", "20", timeout_s=60)
        print(logs.stdout[-20000:])  # shown when the test fails
        down = sh("down", "-t", "2", "--remove-orphans", timeout_s=120)
        if down.returncode != 0:  # fall back to removing by compose's labels
            label = f"com.docker.compose.project={project}"
            for c in docker_client.containers.list(all=True, filters={"label": label}):
                c.remove(force=True)
            for n in docker_client.networks.list(filters={"label": label}):
                n.remove()
