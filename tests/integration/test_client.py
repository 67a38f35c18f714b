"""kvmesh.client against real router processes and simulated engines on
loopback: every call of the API, retries onto another node behind one
target, no retry once a stream has answered (a node SIGKILLed mid-stream),
the node's reason in the exception, tokens and TLS, deadlines."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kvmesh import procs
from kvmesh.client import (
    AsyncClient,
    Chunk,
    Client,
    KvmeshError,
    Result,
    Routed,
    TlsConfig,
    static_target,
)
from kvmesh_pb.v1 import router_pb2 as pb
from tests.unit.test_client_grpc import FakeNode

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FAST_MESH = ["--probe-interval", "0.3", "--gossip-interval", "0.05", "--health-interval", "0.5"]
CLIENT_TOKEN = "client-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
T = TypeVar("T")


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256, 32000) for _ in range(n)]


def _eventually(pred: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


@pytest.fixture(scope="module")
def engine():
    p = procs.start_sim_engine("cl-e0", ["--num-gpu-blocks", "2000"])
    yield p
    p.stop()


@pytest.fixture(scope="module")
def slow_engine():
    p = procs.start_sim_engine("cl-slow", ["--time-scale", "5"])  # 50 ms a token
    yield p
    p.stop()


@pytest.fixture(scope="module")
def node(engine):
    p = procs.start_router("cl-a", [procs.engine_flag("e0", engine)], FAST_MESH)
    yield p
    p.stop()


def test_every_call_against_a_real_node(node, engine) -> None:
    prompt = _tokens(1, 320)  # 20 blocks
    with Client(node.info["grpc"], tls=False) as client:
        events = list(client.generate(prompt, max_tokens=6, ignore_eos=True, request_id="cl-1"))
        routed, result = events[0], events[-1]
        assert isinstance(routed, Routed) and routed.engine_id == "e0" and routed.request_id == "cl-1"
        assert isinstance(result, Result) and all(isinstance(e, Chunk) for e in events[1:-1])
        assert (result.finish_reason, result.completion_tokens, result.prompt_tokens) == ("length", 6, 320)
        assert len(result.token_ids) == 6 and result.routed == routed
        cont = prompt + list(result.token_ids) + _tokens(2, 40)
        route = _eventually(
            lambda: (r := client.route(cont, dry_run=True)).predicted_cached_blocks >= 20 and r,
            5,
            "the index",
        )
        assert route.engine_id == "e0" and route.prompt_blocks == len(cont) // 16
        assert [c.engine_id for c in route.decision.candidates if c.chosen] == ["e0"]
        again = client.complete(cont, max_tokens=2, ignore_eos=True)
        assert again.cached_prompt_tokens >= 320  # the engine said so
        stats = client.stats()
        assert stats.node_id == "cl-a" and stats.requests_total >= 2
        assert [e.spec.engine_id for e in client.list_engines()] == ["e0"]
        assert [m.node_id for m in client.list_members()] == ["cl-a"]
        assert client.index_digest("e0")[0].blocks >= 20
        spec = pb.EngineSpec(engine_id="e-extra", endpoint=engine.info["url"], model=procs.SIM_MODEL)
        assert client.register_engine(spec).spec.engine_id == "e-extra"
        assert client.deregister_engine("e-extra") is True
        with pytest.raises(KvmeshError) as e:
            client.deregister_engine("e-extra")
        assert (e.value.status, e.value.reason) == ("NOT_FOUND", "unknown_engine")

        # The node asked says who asked for the mesh-wide change, and which node it is.
        def admin_lines() -> list[str] | None:
            kinds = ("router.engine_register_requested", "router.engine_deregister_requested")
            lines = [line for line in node.output if any(k in line for k in kinds)]
            return lines if len(lines) >= 2 else None

        said = _eventually(admin_lines, 5, "the admin calls' log lines")
        assert len(said) == 2 and all("engine=e-extra" in line and "node=cl-a" in line for line in said)
        assert all("peer=ipv4:127.0.0.1:" in line for line in said), said
        previous = client.set_log_level("debug")
        assert client.set_log_level(previous) == "debug"
        with pytest.raises(KvmeshError) as e:
            client.set_log_level("loud")
        assert (e.value.status, e.value.reason) == ("INVALID_ARGUMENT", "invalid_request")
        with pytest.raises(KvmeshError) as e:
            client.complete("hello", model="no-such-model")
        assert (e.value.status, e.value.reason, e.value.started) == (
            "INVALID_ARGUMENT",
            "invalid_request",
            False,
        )
        assert "no-such-model" in e.value.message


async def test_the_async_client_against_a_real_node(node) -> None:
    async with AsyncClient(node.info["grpc"], tls=False) as client:
        chunks = [
            e async for e in client.generate("Hello there, kvmesh", max_tokens=4) if isinstance(e, Chunk)
        ]
        assert sum(len(c.token_ids) for c in chunks) == 4 and "".join(c.text for c in chunks)
        route = await client.route("Hello there, kvmesh")
        assert route.engine_id == "e0"
        assert (await client.stats()).node_id == "cl-a"
        previous = await client.set_log_level("warning")
        assert await client.set_log_level(previous) == "warning"
        with pytest.raises(KvmeshError) as e:
            await client.complete([1] * 2_000_000)  # over the node's prompt bound
        assert (e.value.status, e.value.reason) == ("INVALID_ARGUMENT", "invalid_request")


def test_a_refusal_or_a_closed_port_behind_the_target_costs_no_request(node) -> None:
    refuser = FakeNode("refuse")  # answers UNAVAILABLE "draining", as a node shutting down
    closed = f"127.0.0.1:{procs.free_port()}"
    try:
        with Client(node.info["grpc"], tls=False) as direct:
            before = direct.stats().requests_total
        target = static_target([refuser.addr, closed, node.info["grpc"]])
        with Client(target, tls=False) as client:
            results = [client.complete(_tokens(10 + i, 40), max_tokens=2, ignore_eos=True) for i in range(30)]
            assert all(r.finish_reason == "length" for r in results)
        with Client(node.info["grpc"], tls=False) as direct:
            assert direct.stats().requests_total - before == 30  # each once: none lost, none twice
        assert refuser.count("Generate") >= 5
    finally:
        refuser.stop()


def test_a_stream_cut_after_its_first_token_is_not_sent_again(slow_engine) -> None:
    a = procs.start_router("cut-a", [procs.engine_flag("slow", slow_engine)], FAST_MESH)
    b = procs.start_router("cut-b", [], [*FAST_MESH, "--join", a.info["grpc"]])
    nodes = {"cut-a": a, "cut-b": b}
    try:
        admins = {n: Client(p.info["grpc"], tls=False) for n, p in nodes.items()}
        _eventually(
            lambda: all(len(c.list_engines()) == 1 for c in admins.values()), 10, "the engine on both"
        )
        with Client(static_target([a.info["grpc"], b.info["grpc"]]), tls=False) as client:
            stream = client.generate(_tokens(3, 64), max_tokens=200, ignore_eos=True)
            seen: list[Any] = []
            with pytest.raises(KvmeshError) as e:
                for event in stream:
                    seen.append(event)
                    if isinstance(event, Chunk) and len(seen) == 2:
                        serving = next(n for n, c in admins.items() if c.stats().in_flight == 1)
                        other = next(n for n in nodes if n != serving)
                        before = admins[other].stats().requests_total
                        nodes[serving].kill()  # SIGKILL mid-stream
            assert (e.value.status, e.value.started) == ("UNAVAILABLE", True)
            assert e.value.reason == ""  # no node said why: the connection died
            assert isinstance(seen[0], Routed) and e.value.request_id == seen[0].request_id
            time.sleep(1.0)  # time a retry would have had
            assert admins[other].stats().requests_total == before  # never sent to the survivor
            # The client carries on with the survivor.
            assert client.complete(_tokens(4, 20), max_tokens=1).finish_reason == "length"
            assert admins[other].stats().requests_total == before + 1
        for c in admins.values():
            c.close()
    finally:
        for p in nodes.values():
            p.kill()


def test_the_deadline_stops_the_engines_work(slow_engine) -> None:
    a = procs.start_router("dl-a", [procs.engine_flag("slow", slow_engine)], FAST_MESH)
    try:
        with Client(a.info["grpc"], tls=False, timeout=0.5) as client:
            t0 = time.monotonic()
            with pytest.raises(KvmeshError) as e:
                client.complete(_tokens(5, 32), max_tokens=400, ignore_eos=True)  # 20 s of decoding
            assert e.value.status == "DEADLINE_EXCEEDED" and time.monotonic() - t0 < 10
            # The node gave up on the engine request too.
            _eventually(lambda: client.stats(timeout=5).in_flight == 0, 5, "the node to drop the request")
    finally:
        a.stop()


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("client-secrets")
    (d / "tokens").write_text(f"{CLIENT_TOKEN}\n{ADMIN_TOKEN} admin\n")
    (d / "mesh-secret").write_text("a-shared-mesh-secret-of-32-bytes!\n")
    subprocess.run(
        ["bash", str(REPO / "deploy" / "make-certs.sh"), str(d / "pki")], check=True, capture_output=True
    )
    return d


def test_tokens_and_tls(secrets: Path, engine) -> None:
    pki = secrets / "pki"
    flags = [
        "--auth-token-file", str(secrets / "tokens"), "--mesh-secret-file", str(secrets / "mesh-secret"),
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"), *FAST_MESH,
    ]  # fmt: skip
    a = procs.start_router("tls-a", [procs.engine_flag("e0", engine)], flags, insecure=False)
    addr = a.info["grpc"]
    tls = TlsConfig(ca_file=str(pki / "ca.pem"))
    try:
        with Client(addr, tls=tls) as anonymous:
            with pytest.raises(KvmeshError) as e:
                anonymous.complete("hello", max_tokens=1)
            assert (e.value.status, e.value.reason) == ("UNAUTHENTICATED", "no_token")
        with Client(addr, tls=tls, token=CLIENT_TOKEN) as client:
            assert client.complete("hello", max_tokens=1).completion_tokens == 1
            with pytest.raises(KvmeshError) as e:
                client.list_engines()
            assert (e.value.status, e.value.reason) == ("PERMISSION_DENIED", "not_admin")
        with Client(addr, tls=tls, token=ADMIN_TOKEN) as admin:
            assert [x.spec.engine_id for x in admin.list_engines()] == ["e0"]
        for wrong in (False, True):  # plaintext to a TLS port; TLS trusting only the system's CAs
            with (
                Client(addr, tls=wrong, token=ADMIN_TOKEN, timeout=5) as client,
                pytest.raises(KvmeshError) as e,
            ):
                client.stats()
            assert e.value.status == "UNAVAILABLE" and e.value.reason == ""
    finally:
        a.stop()
