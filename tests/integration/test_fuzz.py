"""Bad input everywhere, within a bounded time: random gRPC requests against a
live node (its own event loop in a thread, as in production) and random mesh
messages against the mesh core. Nothing crashes, every call ends with a
status that says why (never UNKNOWN or INTERNAL), and bad input changes no
state."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh import procs
from kvmesh.client import ONE_NODE, channel
from kvmesh_pb.mesh.v1 import mesh_pb2 as mpb
from kvmesh_pb.mesh.v1 import mesh_pb2_grpc as mpb_grpc
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from mesh.core import MeshCore
from mesh.state_messages import MessageError, encode_payload
from mesh.swim_checks import MembershipError
from mesh.wire import WireError, from_envelope
from router.config import RouterConfig
from router.engine_registry import EngineSpec
from router.errors import REASON_KEY
from router.node import RouterNode
from router.service import serve

pytestmark = pytest.mark.slow

# What a call may end with: a status that says why. Never UNKNOWN/INTERNAL.
FINE = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND"}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def live() -> Iterator[str]:
    """A node serving gRPC from its own thread; one registered engine that
    nobody answers at (every routed request fails over, then UNAVAILABLE)."""
    addr = f"127.0.0.1:{procs.free_port()}"
    dead = f"http://127.0.0.1:{procs.free_port()}"
    cfg = RouterConfig(
        listen=addr, node_id="fuzz", insecure=True, engines=[EngineSpec("e0", dead).validate()]
    )
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[str] = loop.create_future()
    stop = asyncio.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve(RouterNode(cfg), stop, ready=ready))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(ready), 30), loop).result(40)
    yield addr
    loop.call_soon_threadsafe(stop.set)
    t.join(30)


def _code(fn, *a, **kw) -> str:
    try:
        out = fn(*a, **kw)
        if hasattr(out, "__iter__") and not isinstance(out, (bytes, str)):
            for _ in out:
                pass
        return "OK"
    except grpc.RpcError as e:
        reason = dict(e.trailing_metadata() or ()).get(REASON_KEY)
        assert reason, f"{e.code().name} without a {REASON_KEY}: {e.details()}"
        return e.code().name


ids = st.lists(st.integers(0, 2**32 - 1), max_size=300)
text = st.text(max_size=40)
prompts = st.one_of(
    st.builds(pb.Prompt, text=text),
    st.builds(pb.Prompt, token_ids=st.builds(pb.TokenIds, ids=ids)),
    st.just(pb.Prompt()),
)
sampling = st.builds(
    pb.SamplingParams,
    max_tokens=st.integers(0, 2**32 - 1),
    temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
    top_p=st.floats(allow_nan=True, allow_infinity=True, width=32),
    stop=st.lists(text, max_size=3),
    ignore_eos=st.booleans(),
)
generate_requests = st.builds(
    pb.GenerateRequest,
    request_id=text,
    model=st.one_of(st.just(""), text),
    prompt=prompts,
    sampling=sampling,
    session_key=text,
    policy=st.one_of(st.just(""), text, st.sampled_from(["precise", "round_robin", "random"])),
    lora_name=text,
    cache_salt=text,
)


@FUZZ
@given(req=generate_requests, dry_run=st.booleans())
def test_random_router_calls_end_with_a_clear_status_and_change_nothing(live: str, req, dry_run) -> None:
    with channel(live, tls=False, config=ONE_NODE) as ch:
        stub, admin = pb_grpc.RouterStub(ch), pb_grpc.AdminStub(ch)
        before = [e.spec for e in admin.ListEngines(pb.ListEnginesRequest()).engines]
        assert _code(stub.Generate, req, timeout=10) in FINE
        route = pb.RouteRequest(
            request_id=req.request_id, model=req.model, prompt=req.prompt, policy=req.policy, dry_run=dry_run
        )
        assert _code(stub.Route, route, timeout=10) in FINE
        stats = admin.GetStats(pb.GetStatsRequest())
        assert stats.in_flight == 0
        assert not any(k.startswith(("UNKNOWN", "INTERNAL")) for k in stats.outcomes)
        assert [e.spec for e in admin.ListEngines(pb.ListEnginesRequest()).engines] == before


specs = st.builds(
    pb.EngineSpec,
    engine_id=text,
    endpoint=st.one_of(text, st.builds(lambda h: f"http://{h}:1", st.text("abc.", min_size=1, max_size=8))),
    model=text,
    block_size=st.integers(0, 2**32 - 1),
    kv_events_endpoint=st.one_of(st.just(""), text),
    replay_endpoint=st.one_of(st.just(""), text),
    data_parallel_size=st.integers(0, 2**32 - 1),
)


@FUZZ
@given(spec=specs, victim=text)
def test_random_admin_calls_are_refused_cleanly_or_applied_exactly(live: str, spec, victim) -> None:
    with channel(live, tls=False, config=ONE_NODE) as ch:
        admin = pb_grpc.AdminStub(ch)
        before = {e.spec.engine_id for e in admin.ListEngines(pb.ListEnginesRequest()).engines}
        code = _code(admin.RegisterEngine, pb.RegisterEngineRequest(spec=spec), timeout=10)
        assert code in FINE
        after = {e.spec.engine_id for e in admin.ListEngines(pb.ListEnginesRequest()).engines}
        if code == "OK":
            assert after == before | {spec.engine_id}
            if spec.engine_id not in before:
                admin.DeregisterEngine(pb.DeregisterEngineRequest(engine_id=spec.engine_id))
        else:
            assert after == before
        if victim not in before:
            dereg = pb.DeregisterEngineRequest(engine_id=victim)
            assert _code(admin.DeregisterEngine, dereg, timeout=10) == "NOT_FOUND"
        assert {e.spec.engine_id for e in admin.ListEngines(pb.ListEnginesRequest()).engines} == before


@FUZZ
@given(raw=st.binary(max_size=2048))
def test_random_bytes_on_the_mesh_port_are_rejected(live: str, raw: bytes) -> None:
    with channel(live, tls=False, config=ONE_NODE) as ch:
        deliver = ch.unary_unary("/kvmesh.mesh.v1.Mesh/Deliver", request_serializer=lambda b: b,
                                 response_deserializer=mpb.DeliverReply.FromString)  # fmt: skip
        try:
            reply = deliver(raw, timeout=10)
            assert reply.accepted + reply.rejected >= 0
        except grpc.RpcError as e:
            # Bytes that do not parse as a batch: the node says so.
            assert e.code().name == "INVALID_ARGUMENT", e
        admin = pb_grpc.AdminStub(ch)
        members = admin.ListMembers(pb.ListMembersRequest()).members
        assert {m.node_id for m in members} == {"fuzz"}  # nobody joined through garbage


# --- the mesh core, directly: random envelopes ------------------------------------------------

strings = st.text(max_size=8)
envelopes = st.one_of(
    st.builds(mpb.Envelope, src=strings, dst=strings),
    st.builds(
        mpb.Envelope, src=strings, dst=strings,
        ping=st.builds(mpb.Ping, seq=st.integers(0, 2**64 - 1), target=strings, source=strings),
    ),
    st.builds(
        mpb.Envelope, src=strings, dst=strings,
        state_push=st.builds(mpb.StatePush, payload=st.binary(max_size=200)),
    ),
    st.builds(
        mpb.Envelope, src=strings, dst=strings,
        sync_request=st.builds(mpb.SyncRequest, summary=st.binary(max_size=200), want_full=st.booleans()),
    ),
    st.builds(
        mpb.Envelope, src=strings, dst=strings,
        join=st.builds(mpb.Join, node=strings, members=st.lists(st.builds(
            mpb.MemberRecord, node=strings, addr=strings, incarnation=st.integers(0, 2**64 - 1),
            state=st.sampled_from(["alive", "suspect", "dead", "left", "", "bogus"])), max_size=3)),
    ),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(envelopes, max_size=6))
def test_random_mesh_messages_never_crash_the_core_and_bad_ones_change_nothing(envs) -> None:
    core = MeshCore("n0", "n0:1", 0.0, random.Random(0))
    core.join([], 0.0)
    core.register_engine("e0", {"endpoint": "http://e0:1"}, 0.0)
    for env in envs:
        summary, members = encode_payload(core.state.summary()), core.members()
        try:
            msg = from_envelope(env)
        except WireError:
            continue
        try:
            core.handle(msg, 1.0)
        except (MembershipError, MessageError):
            assert encode_payload(core.state.summary()) == summary and core.members() == members
        core.take_sends()
        core.take_effects()
        core.take_index_changes()
    assert "e0" in core.engines()


def test_mesh_envelopes_round_trip_through_the_real_service(live: str) -> None:
    """The fuzzed bytes above reach Deliver: a well-formed empty batch is accepted."""
    with channel(live, tls=False, config=ONE_NODE) as ch:
        reply = mpb_grpc.MeshStub(ch).Deliver(mpb.Batch(), timeout=10)
        assert (reply.accepted, reply.rejected) == (0, 0)
