"""Authentication on loopback, with real router processes: bearer tokens and
TLS on the public port, a shared secret or mutual TLS between nodes. An
intruder without credentials can neither call, nor join, nor write state."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh import procs
from kvmesh.client import ONE_NODE, TlsConfig, aio_channel
from kvmesh_pb.mesh.v1 import mesh_pb2 as mpb
from kvmesh_pb.mesh.v1 import mesh_pb2_grpc as mpb_grpc
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from mesh.state import MeshState
from mesh.state_messages import StatePush, encode_payload
from mesh.wire import to_envelope

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLIENT_TOKEN = "client-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
FAST_MESH = ["--probe-interval", "0.3", "--gossip-interval", "0.05"]


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("secrets")
    (d / "tokens").write_text(f"# role per token\n{CLIENT_TOKEN}\n{ADMIN_TOKEN} admin\n")
    (d / "mesh-secret").write_text("a-shared-mesh-secret-of-32-bytes!\n")
    (d / "other-secret").write_text("another-mesh-secret-of-32-bytes!!\n")
    subprocess.run(
        ["bash", str(REPO / "deploy" / "make-certs.sh"), str(d / "pki")], check=True, capture_output=True
    )
    return d


@pytest.fixture(scope="module")
def engine():
    p = procs.start_sim_engine("auth-e0")
    yield p
    p.stop()


def _tok(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _generate_req() -> pb.GenerateRequest:
    ids = [random.Random(1).randrange(256, 30000) for _ in range(40)]
    return pb.GenerateRequest(
        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids)), sampling=pb.SamplingParams(max_tokens=4)
    )


async def _generate(stub: pb_grpc.RouterStub, meta: tuple = ()) -> str:
    try:
        async for _ in stub.Generate(_generate_req(), metadata=meta, timeout=20):
            pass
        return "OK"
    except grpc.aio.AioRpcError as e:
        return e.code().name


async def _code(call) -> str:
    try:
        await call
        return "OK"
    except grpc.aio.AioRpcError as e:
        return e.code().name


def _router(name: str, engines: list[str], flags: list[str]) -> procs.Proc:
    return procs.start_router(name, engines, [*FAST_MESH, *flags], insecure=False)


async def test_tokens_guard_the_api_and_admin_needs_an_admin_token(secrets: Path, engine) -> None:
    (secrets / "tokens").chmod(0o600)
    (secrets / "mesh-secret").chmod(0o644)  # others on the host may read it: said at start
    flags = ["--auth-token-file", str(secrets / "tokens"), "--mesh-secret-file", str(secrets / "mesh-secret")]
    router = _router("tok-a", [procs.engine_flag("e0", engine)], flags)
    try:
        readable = [line for line in router.tail(200).splitlines() if "router.secret_file_readable" in line]
        assert len(readable) == 1 and "--mesh-secret-file" in readable[0] and "chmod 600" in readable[0]
        async with aio_channel(router.info["grpc"], tls=False, config=ONE_NODE) as ch:
            stub, admin = pb_grpc.RouterStub(ch), pb_grpc.AdminStub(ch)
            assert await _generate(stub) == "UNAUTHENTICATED"
            assert await _generate(stub, _tok("not-a-token-at-all-xxxx")) == "UNAUTHENTICATED"
            assert await _generate(stub, _tok(CLIENT_TOKEN)) == "OK"
            dereg = pb.DeregisterEngineRequest(engine_id="e0")
            assert (
                await _code(admin.DeregisterEngine(dereg, metadata=_tok(CLIENT_TOKEN))) == "PERMISSION_DENIED"
            )
            listed = await admin.ListEngines(pb.ListEnginesRequest(), metadata=_tok(ADMIN_TOKEN))
            assert [e.spec.engine_id for e in listed.engines] == ["e0"]  # still registered
            health = health_pb2_grpc.HealthStub(ch)  # probes need no token
            resp = await health.Check(health_pb2.HealthCheckRequest(service="kvmesh.v1.Router"))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            # A refusal names the request: the client's id, or the node's when it gave none.
            named = _generate_req()
            named.request_id = "mine-42"
            ids = []
            for req in (named, _generate_req()):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.Generate(req, metadata=_tok("not-a-token-at-all-yyyy"), timeout=20):
                        pass
                ids.append(dict(e.value.trailing_metadata() or ()).get("x-request-id", ""))
            assert ids[0] == "mine-42" and len(ids[1]) == 32, ids
            stats = await admin.GetStats(pb.GetStatsRequest(), metadata=_tok(ADMIN_TOKEN))
            assert stats.outcomes["UNAUTHENTICATED:no_token"] == 1
            assert stats.outcomes["UNAUTHENTICATED:bad_token"] == 3
            assert stats.outcomes["PERMISSION_DENIED:not_admin"] == 1
    finally:
        router.stop()
    refused = [line for line in router.output if "router.call_refused" in line and "mine-42" in line]
    assert refused and "peer=" in refused[0] and "127.0.0.1" in refused[0], refused  # who was refused


async def test_without_credentials_the_node_refuses_to_start() -> None:
    port = procs.free_port()
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "kvmesh"), "router", "--listen", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "without authentication" in out.stderr and "--insecure" in out.stderr


async def test_an_intruder_without_the_mesh_secret_can_neither_join_nor_write(secrets: Path, engine) -> None:
    tokens = ["--auth-token-file", str(secrets / "tokens")]
    secret = ["--mesh-secret-file", str(secrets / "mesh-secret"), *tokens]
    a = _router("sec-a", [procs.engine_flag("e0", engine)], secret)
    b = _router("sec-b", [], [*secret, "--join", a.info["mesh"]])
    # A node with another secret tries to join through a: it never gets in,
    # so it never reports ready (it is not waited for).
    wrong_secret = ["--mesh-secret-file", str(secrets / "other-secret"), *tokens]
    cmd = [str(REPO / ".venv" / "bin" / "kvmesh"), "router", "--listen", f"127.0.0.1:{procs.free_port()}"]
    cmd += ["--node-id", "sec-wrong", *FAST_MESH, *wrong_secret, "--join", a.info["mesh"]]
    wrong_log = secrets / "wrong.log"
    with wrong_log.open("w") as out:
        wrong = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        async with aio_channel(a.info["grpc"], tls=False, config=ONE_NODE) as ch:
            admin = pb_grpc.AdminStub(ch)
            deadline = time.monotonic() + 10
            names: set[str] = set()
            while time.monotonic() < deadline:
                members = await admin.ListMembers(pb.ListMembersRequest(), metadata=_tok(ADMIN_TOKEN))
                names = {m.node_id for m in members.members}
                if "sec-b" in names:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # time for the intruder to try
            members = await admin.ListMembers(pb.ListMembersRequest(), metadata=_tok(ADMIN_TOKEN))
            names = {m.node_id for m in members.members}
            assert names == {"sec-a", "sec-b"}
            # A forged state push: register an engine mesh-wide, with no proof.
            forged = MeshState("intruder", 0.0, random.Random(9), hint_ttl=2.0)
            delta = forged.register_engine("evil", {"endpoint": "http://evil:80"})
            push = StatePush("intruder:1", a.info["mesh"], encode_payload(delta))
            async with grpc.aio.insecure_channel(a.info["mesh"]) as mch:
                deliver = mpb_grpc.MeshStub(mch).Deliver(mpb.Batch(messages=[to_envelope(push)]), timeout=5)
                assert await _code(deliver) == "UNAUTHENTICATED"
            await asyncio.sleep(0.3)
            listed = await admin.ListEngines(pb.ListEnginesRequest(), metadata=_tok(ADMIN_TOKEN))
            assert [e.spec.engine_id for e in listed.engines] == ["e0"]
        # The refused node says why in its own log (not only the seed in its).
        refused: list[str] = []
        deadline = time.monotonic() + 30  # it may still be starting on a busy machine
        while not refused and time.monotonic() < deadline and wrong.poll() is None:
            await asyncio.sleep(0.2)
            refused = [ln for ln in wrong_log.read_text().splitlines() if "transport.refused_by_peer" in ln]
        assert refused and "UNAUTHENTICATED" in refused[0], wrong_log.read_text()[-2000:]
    finally:
        wrong.kill()
        wrong.wait(10)
        for p in (b, a):
            p.stop()


async def test_mutual_tls_between_nodes_and_tls_for_clients(secrets: Path, engine) -> None:
    pki = secrets / "pki"

    def flags(name: str) -> list[str]:
        return [
            "--mesh-listen", f"127.0.0.1:{procs.free_port()}",
            "--mesh-tls-cert", str(pki / "mesh.pem"), "--mesh-tls-key", str(pki / "mesh.key"),
            "--mesh-tls-ca", str(pki / "ca.pem"),
            "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        ]  # fmt: skip

    a = _router("tls-a", [procs.engine_flag("e0", engine)], flags("tls-a"))
    b = _router("tls-b", [], [*flags("tls-b"), "--join", a.info["mesh"]])
    try:
        tls = TlsConfig(ca_file=str(pki / "ca.pem"))
        public = b.info["grpc"].replace("127.0.0.1", "localhost")  # the name in the certificate
        async with aio_channel(public, tls=tls, config=ONE_NODE) as ch:
            admin = pb_grpc.AdminStub(ch)
            deadline = time.monotonic() + 10
            engines: list[str] = []
            while time.monotonic() < deadline and not engines:
                engines = [
                    e.spec.engine_id for e in (await admin.ListEngines(pb.ListEnginesRequest())).engines
                ]
                await asyncio.sleep(0.1)
            assert engines == ["e0"]  # the registry crossed the mutual-TLS mesh
            assert await _generate(pb_grpc.RouterStub(ch)) == "OK"
        async with aio_channel(b.info["grpc"], tls=False, config=ONE_NODE) as plain:  # no TLS: refused
            assert (
                await _code(pb_grpc.AdminStub(plain).GetStats(pb.GetStatsRequest(), timeout=3))
                == "UNAVAILABLE"
            )
        async with grpc.aio.insecure_channel(a.info["mesh"]) as intruder:  # no client certificate
            deliver = mpb_grpc.MeshStub(intruder).Deliver(mpb.Batch(), timeout=3)
            assert await _code(deliver) == "UNAVAILABLE"
        # The CA signs the API's client certificate too: it is not a member's.
        ca, key, cert = ((pki / f).read_bytes() for f in ("ca.pem", "client.key", "client.pem"))
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        name = (("grpc.ssl_target_name_override", "kvmesh-mesh"),)
        async with grpc.aio.secure_channel(a.info["mesh"], creds, options=name) as client_cert:
            deliver = mpb_grpc.MeshStub(client_cert).Deliver(mpb.Batch(), timeout=3)
            assert await _code(deliver) == "UNAUTHENTICATED"
    finally:
        b.stop()
        a.stop()
