"""kvmesh.client's pure parts: targets, the service config, the settings'
checks, the re-dial core, and the folding of a Generate stream."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from kvmesh import procs
from kvmesh.client import (
    ONE_NODE,
    SERVICE_CONFIG_JSON,
    AsyncClient,
    Client,
    ClientConfig,
    ClientConfigError,
    KvmeshError,
    RetryConfig,
    TargetError,
    TlsConfig,
    channel_target,
    service_config,
    static_target,
)
from kvmesh.client.channel import Dialer
from kvmesh.client.config import DEFAULT_TARGET
from kvmesh.client.errors import from_rpc_error
from kvmesh.client.messages import Chunk, GenerateFold, Routed, generate_request, route_request
from kvmesh.client.redial import Redial
from kvmesh.client.service_config import channel_options
from kvmesh_pb.v1 import router_pb2 as pb
from router.config import RouterConfig
from router.errors import REASON_KEY, REQUEST_ID_KEY

ROOT = Path(__file__).resolve().parents[2]

# --- targets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("routers.example:50051", "dns:///routers.example:50051"),
        (" localhost:50051 ", "dns:///localhost:50051"),
        ("10.0.0.1:50051", "dns:///10.0.0.1:50051"),
        ("[::1]:50051", "dns:///[::1]:50051"),
        ("dns:///routers:50051", "dns:///routers:50051"),
        ("dns://8.8.8.8/routers:50051", "dns://8.8.8.8/routers:50051"),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1"),
        ("unix:/run/kvmesh.sock", "unix:/run/kvmesh.sock"),
    ],
)
def test_a_host_and_port_is_dialed_through_the_dns_resolver(given: str, want: str) -> None:
    assert channel_target(given) == want


@pytest.mark.parametrize("bad", ["", "routers", "routers:", "routers:http", ":50051", "::1:50051", "h:70000"])
def test_a_target_without_a_usable_port_is_refused_with_a_clear_error(bad: str) -> None:
    with pytest.raises(TargetError, match=r"HOST:PORT|IPv6|empty"):
        channel_target(bad)


def test_a_list_of_addresses_becomes_a_static_target() -> None:
    assert static_target(["127.0.0.1:1", "10.0.0.2:2"]) == "ipv4:127.0.0.1:1,10.0.0.2:2"
    assert static_target(["[::1]:1", "[fe80::1]:2"]) == "ipv6:[::1]:1,[fe80::1]:2"
    with pytest.raises(TargetError, match="IP literals"):
        static_target(["routers:1"])
    with pytest.raises(TargetError, match="all IPv4 or all IPv6"):
        static_target(["127.0.0.1:1", "[::1]:1"])
    with pytest.raises(TargetError, match="no address"):
        static_target([])


def test_the_default_target_is_where_a_node_listens_by_default() -> None:
    assert DEFAULT_TARGET.rpartition(":")[2] == RouterConfig().listen.rpartition(":")[2]


# --- the service config -------------------------------------------------------------------------


def test_the_default_service_config_balances_retries_unavailable_and_watches_health() -> None:
    doc = json.loads(SERVICE_CONFIG_JSON)
    assert doc == service_config(ClientConfig())
    assert doc["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = doc["methodConfig"]
    names = {(n["service"], n.get("method", "*")) for n in method["name"]}
    assert ("kvmesh.v1.Router", "*") in names
    assert {m for s, m in names if s == "kvmesh.v1.Admin"} == {
        "ListEngines",
        "GetStats",
        "ListMembers",
        "GetIndexDigest",
    }  # writes and Drain are never retried
    policy = method["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy["maxAttempts"] == RetryConfig().max_attempts
    assert policy["initialBackoff"] == "0.1s" and policy["maxBackoff"] == "1s"
    assert doc["retryThrottling"] == {"maxTokens": 100, "tokenRatio": 0.1}
    assert doc["healthCheckConfig"] == {"serviceName": "kvmesh.v1.Router"}


def test_every_knob_reaches_the_service_config_or_the_channel() -> None:
    cfg = ClientConfig(
        load_balancing="pick_first",
        retry=RetryConfig(max_attempts=5, initial_backoff=0.025, max_backoff=2.5, throttle_max_tokens=7),
        health_check_service="",
        dns_min_resolution_interval=0.25,
        retry_buffer_bytes=1234,
        channel_options=(("grpc.keepalive_time_ms", 20000),),
    )
    doc = service_config(cfg)
    assert doc["loadBalancingConfig"] == [{"pick_first": {}}]
    policy = doc["methodConfig"][0]["retryPolicy"]
    assert (policy["maxAttempts"], policy["initialBackoff"], policy["maxBackoff"]) == (5, "0.025s", "2.5s")
    assert doc["retryThrottling"]["maxTokens"] == 7
    assert "healthCheckConfig" not in doc
    opts = dict(channel_options(cfg))
    assert json.loads(str(opts["grpc.service_config"])) == doc
    assert opts["grpc.dns_min_time_between_resolutions_ms"] == 250
    assert opts["grpc.per_rpc_retry_buffer_size"] == 1234
    assert opts["grpc.enable_retries"] == 1
    assert opts["grpc.keepalive_time_ms"] == 20000


def test_one_attempt_turns_retries_off_entirely() -> None:
    cfg = ClientConfig(retry=RetryConfig(max_attempts=1))
    doc = service_config(cfg)
    assert "methodConfig" not in doc and "retryThrottling" not in doc
    assert dict(channel_options(cfg))["grpc.enable_retries"] == 0


def test_readme_shows_the_service_config_the_client_uses() -> None:
    assert SERVICE_CONFIG_JSON in (ROOT / "README.md").read_text()


def test_readme_lists_every_knob_with_its_default() -> None:
    section = (ROOT / "README.md").read_text().split("## Clients", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", section, re.MULTILINE))
    cfg = ClientConfig()
    knobs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "retry"}
    knobs |= {f"retry.{f.name}": getattr(cfg.retry, f.name) for f in dataclasses.fields(cfg.retry)}
    assert set(rows) == set(knobs)
    for name, value in knobs.items():
        assert ast.literal_eval(rows[name]) == value, name


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        (ClientConfig(timeout=0), "timeout"),
        (ClientConfig(load_balancing="least_request"), "round_robin or pick_first"),
        (ClientConfig(reresolve_interval=-1), "negative"),
        (ClientConfig(retry=RetryConfig(max_attempts=6)), "1..5"),
        (ClientConfig(retry=RetryConfig(max_attempts=0)), "1..5"),
        (ClientConfig(retry=RetryConfig(initial_backoff=2.0, max_backoff=1.0)), "backoff"),
        (ClientConfig(retry=RetryConfig(retryable_codes=())), "max_attempts=1"),
        (ClientConfig(retry=RetryConfig(throttle_max_tokens=1001)), "1..1000"),
        (ClientConfig(retry=RetryConfig(throttle_token_ratio=0)), "throttle_token_ratio"),
    ],
)
def test_a_setting_that_cannot_work_is_refused_when_the_client_is_made(cfg: ClientConfig, words: str) -> None:
    with pytest.raises(ClientConfigError, match=words):
        Dialer.make("localhost:1", False, "", cfg)


def test_tls_is_on_by_default_and_files_are_read_when_the_client_is_made(tmp_path: Path) -> None:
    assert Dialer.make("localhost:1", True, "", ClientConfig()).credentials is not None
    assert Dialer.make("localhost:1", False, "", ClientConfig()).credentials is None
    with pytest.raises(ClientConfigError, match="cannot read the CA file"):
        Dialer.make("localhost:1", TlsConfig(ca_file=str(tmp_path / "nope.pem")), "", ClientConfig())
    with pytest.raises(ClientConfigError, match="both"):
        Dialer.make("localhost:1", TlsConfig(cert_file="c.pem"), "", ClientConfig())
    named = Dialer.make("localhost:1", TlsConfig(server_name="routers.example"), "", ClientConfig())
    assert ("grpc.ssl_target_name_override", "routers.example") in named.options


def test_a_token_travels_as_bearer_metadata() -> None:
    assert Dialer.make("h:1", False, " tok-123 ", ClientConfig()).metadata == (
        ("authorization", "Bearer tok-123"),
    )
    assert Dialer.make("h:1", False, "", ClientConfig()).metadata == ()
    with pytest.raises(ClientConfigError, match="whitespace"):
        Dialer.make("h:1", False, "two words", ClientConfig())


# --- the re-dial core ---------------------------------------------------------------------------


class Chan:
    def __init__(self, n: int) -> None:
        self.n = n
        self.ready = False

    def __repr__(self) -> str:
        return f"Chan({self.n})"


class Dials:
    def __init__(self) -> None:
        self.made: list[Chan] = []

    def __call__(self) -> Chan:
        self.made.append(Chan(len(self.made)))
        return self.made[-1]


def _ready(c: Chan) -> bool:
    return c.ready


def test_new_calls_move_to_a_fresh_dial_once_it_is_connected_and_the_old_one_closes_when_idle() -> None:
    dial, r = Dials(), Redial[Chan](interval=10.0)
    first, closing = r.lease(0.0, dial, _ready)
    first.ready = True
    assert (first.n, closing) == (0, [])
    long_call, _ = r.lease(1.0, dial, _ready)  # a stream still open at the switch
    r.release(first)
    same, _ = r.lease(10.0, dial, _ready)  # due: a candidate is dialed, the call stays
    assert same is first and len(dial.made) == 2
    r.release(same)
    same, _ = r.lease(10.5, dial, _ready)  # the candidate is not connected yet
    assert same is first
    r.release(same)
    dial.made[1].ready = True
    new, closing = r.lease(11.0, dial, _ready)
    assert new is dial.made[1] and closing == []  # the long call still runs on the old one
    assert r.release(long_call) == [first]  # its end closes the old channel
    assert r.release(new) == []
    assert r.dials == 2


def test_a_candidate_that_never_connects_is_dropped_and_dialed_again() -> None:
    dial, r = Dials(), Redial[Chan](interval=5.0)
    cur, _ = r.lease(0.0, dial, _ready)
    cur.ready = True
    r.release(cur)
    r.release(r.lease(5.0, dial, _ready)[0])  # candidate 1
    ch, closing = r.lease(10.0, dial, _ready)
    assert ch is cur and closing == [dial.made[1]]
    r.release(ch)
    r.release(r.lease(10.1, dial, _ready)[0])  # candidate 2
    assert len(dial.made) == 3


def test_a_disconnected_current_channel_gives_way_to_the_candidate_at_once() -> None:
    dial, r = Dials(), Redial[Chan](interval=5.0)
    cur, _ = r.lease(0.0, dial, _ready)
    r.release(cur)
    r.release(r.lease(6.0, dial, _ready)[0])
    ch, closing = r.lease(6.1, dial, _ready)  # neither is connected: take the fresh one
    assert ch is dial.made[1] and closing == [cur]


def test_interval_zero_dials_once_and_close_all_returns_every_channel() -> None:
    dial, r = Dials(), Redial[Chan](interval=0.0)
    for t in range(100):
        r.release(r.lease(float(t * 1000), dial, _ready)[0])
    assert len(dial.made) == 1
    r.lease(0.0, dial, _ready)
    assert r.close_all() == dial.made


# --- requests and the stream fold ---------------------------------------------------------------


def test_requests_carry_every_option_and_zero_means_the_node_default() -> None:
    req = generate_request(
        [5, 6, 7],
        model="m",
        max_tokens=9,
        temperature=0.5,
        top_p=0.9,
        stop=["\n"],
        ignore_eos=True,
        seed=3,
        request_id="r",
        session_key="s",
        policy="precise",
        lora_name="l",
        cache_salt="c",
    )
    assert list(req.prompt.token_ids.ids) == [5, 6, 7] and req.model == "m"
    s = req.sampling
    assert (s.max_tokens, list(s.stop), s.ignore_eos, s.seed) == (9, ["\n"], True, 3)
    assert s.top_p == pytest.approx(0.9)
    assert (req.request_id, req.session_key, req.policy) == ("r", "s", "precise")
    assert (req.lora_name, req.cache_salt) == ("l", "c")
    plain = generate_request("hello")
    assert plain.prompt.text == "hello" and plain.sampling.max_tokens == 0
    assert not plain.sampling.HasField("seed")
    route = route_request("hi", dry_run=True, session_key="s")
    assert route.prompt.text == "hi" and route.dry_run and route.session_key == "s"


def _routed(attempt: int = 1) -> pb.GenerateResponse:
    cand = pb.CandidateScore(engine_id="e1", overlap_blocks=3, load=1.5, score=2.0, chosen=True)
    decision = pb.Decision(policy="precise", reason="why", candidates=[cand])
    return pb.GenerateResponse(
        routed=pb.RoutedTo(request_id="r1", engine_id="e1", endpoint="http://e1", predicted_cached_blocks=3,
                           attempt=attempt, decision=decision)
    )  # fmt: skip


def test_a_stream_folds_into_routed_chunks_and_one_result() -> None:
    fold = GenerateFold()
    assert not fold.started
    routed = fold.feed(_routed())
    assert isinstance(routed, Routed) and routed.decision.candidates[0].overlap_blocks == 3 and fold.started
    first = fold.feed(pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[1, 2], text="ab")))
    assert first == Chunk((1, 2), "ab")
    assert fold.feed(pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[3], text="c"))) == Chunk((3,), "c")
    fin = pb.Finished(finish_reason="length", prompt_tokens=40, cached_prompt_tokens=32, completion_tokens=3,
                      engine_id="e1", ttft_ms=12.5, attempts=1)  # fmt: skip
    assert fold.feed(pb.GenerateResponse(finished=fin)) is None
    result = fold.result()
    assert (result.token_ids, result.text, result.request_id) == ((1, 2, 3), "abc", "r1")
    assert (result.cached_prompt_tokens, result.prompt_tokens, result.finish_reason) == (32, 40, "length")
    assert result.routed == routed


def test_a_stream_that_ends_without_finishing_is_an_error_not_a_result() -> None:
    fold = GenerateFold()
    fold.feed(_routed())
    with pytest.raises(KvmeshError, match="without a finished message") as e:
        fold.result()
    assert e.value.started and e.value.request_id == "r1"


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


def test_a_failed_stream_says_its_status_reason_and_whether_it_had_started() -> None:
    fold = GenerateFold()
    fold.feed(_routed())
    fold.feed(pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[1], text="a")))
    fold.feed(pb.GenerateResponse(finished=pb.Finished(finish_reason="error", error="cut", engine_id="e1")))
    trailing = ((REASON_KEY, "engine_failed"),)
    err = fold.error(_RpcError(grpc.StatusCode.UNAVAILABLE, "engine e1 failed", trailing))
    assert (err.code, err.status, err.reason, err.message) == (
        grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", "engine_failed", "engine e1 failed",
    )  # fmt: skip
    assert err.started and err.request_id == "r1"
    assert err.result is not None and err.result.error == "cut" and err.result.token_ids == (1,)
    assert str(err) == "UNAVAILABLE (engine_failed): engine e1 failed"
    before = GenerateFold().error(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", ()))
    assert not before.started and before.reason == "" and before.result is None
    assert str(before) == "DEADLINE_EXCEEDED: Deadline Exceeded"


def test_a_reason_the_node_also_put_at_the_head_of_its_message_is_said_once() -> None:
    trailing = ((REASON_KEY, "bad_token"),)
    err = from_rpc_error(
        _RpcError(grpc.StatusCode.UNAUTHENTICATED, "bad_token: this call needs a valid token", trailing)
    )
    assert (err.reason, err.message) == ("bad_token", "this call needs a valid token")
    assert str(err) == "UNAUTHENTICATED (bad_token): this call needs a valid token"
    # Only the reason the node named is taken off; other messages stay whole.
    other = ((REASON_KEY, "no_engine"),)
    kept = from_rpc_error(_RpcError(grpc.StatusCode.UNAVAILABLE, "e1: breaker open", other))
    assert kept.message == "e1: breaker open"
    bare = from_rpc_error(_RpcError(grpc.StatusCode.UNAVAILABLE, "not_admin: x", ()))
    assert (bare.reason, bare.message) == ("", "not_admin: x")


def test_a_refusal_names_the_request_id_the_node_gave_it() -> None:
    trailing = ((REASON_KEY, "draining"), (REQUEST_ID_KEY, "abc123"))
    err = from_rpc_error(_RpcError(grpc.StatusCode.UNAVAILABLE, "this node is draining", trailing))
    assert err.request_id == "abc123"
    # the id of the stream's first answer, when there was one, is kept
    said = from_rpc_error(_RpcError(grpc.StatusCode.UNAVAILABLE, "x", trailing), request_id="r1")
    assert said.request_id == "r1"


# --- arguments a request cannot carry -----------------------------------------------------------


U32, U64 = 2**32 - 1, 2**64 - 1


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_tokens": -1}, "max_tokens must be >= 1, got -1"),
        ({"max_tokens": U32 + 1}, f"max_tokens must be at most {U32}"),
        ({"temperature": -0.5}, "temperature must be a number >= 0, got -0.5"),
        ({"temperature": math.nan}, "temperature must be a number >= 0, got nan"),
        ({"temperature": math.inf}, "temperature must be a number >= 0, got inf"),
        ({"temperature": 1e39}, "temperature must be a number >= 0"),  # inf as a float32
        ({"top_p": -0.1}, "top_p must be in (0, 1], got -0.1"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": math.nan}, "top_p must be in (0, 1]"),
        ({"seed": -1}, f"seed must be in 0..{U64}, got -1"),
        ({"seed": U64 + 1}, "seed must be in"),
    ],
)
def test_a_sampling_value_out_of_range_is_the_nodes_invalid_request_not_a_bare_value_error(
    options: dict, words: str
) -> None:
    with pytest.raises(KvmeshError) as e:
        generate_request("hi", **options)
    assert (e.value.status, e.value.reason, e.value.started) == ("INVALID_ARGUMENT", "invalid_request", False)
    assert e.value.message.startswith(words), e.value.message


@pytest.mark.parametrize("ids", [[5, -5, 6], [1, U32 + 1], [-(2**70)]])
def test_a_token_id_out_of_range_is_refused_in_both_requests(ids: list[int]) -> None:
    bad = min(ids) if min(ids) < 0 else max(ids)
    for build in (generate_request, route_request):
        with pytest.raises(KvmeshError, match=re.escape(f"token id {bad} is out of range (0..{U32})")) as e:
            build(ids)
        assert (e.value.status, e.value.reason) == ("INVALID_ARGUMENT", "invalid_request")


@pytest.mark.parametrize("ids", [[1, 1.5], [1, "7"], [None]])
def test_a_token_id_that_is_no_integer_is_refused_in_both_requests(ids: list) -> None:
    for build in (generate_request, route_request):
        with pytest.raises(KvmeshError, match="token ids must be integers") as e:
            build(ids)
        assert (e.value.status, e.value.reason) == ("INVALID_ARGUMENT", "invalid_request")


def test_integer_like_token_ids_are_sent_as_ints() -> None:
    class Id:  # what numpy's integers are to Python: __index__, not int
        def __index__(self) -> int:
            return 42

    assert list(generate_request([Id(), 7]).prompt.token_ids.ids) == [42, 7]


def test_the_edges_of_every_range_are_sent_as_given() -> None:
    req = generate_request([0, U32], max_tokens=U32, temperature=0.0, top_p=1.0, seed=U64)
    assert list(req.prompt.token_ids.ids) == [0, U32]
    assert (req.sampling.max_tokens, req.sampling.top_p, req.sampling.seed) == (U32, 1.0, U64)
    zero = generate_request([], max_tokens=0, top_p=0.0, seed=0)  # 0: the node's defaults; [] the node's word
    assert zero.sampling.max_tokens == 0 and zero.sampling.HasField("seed")


def test_a_client_refuses_bad_arguments_and_timeouts_before_it_dials_anything() -> None:
    client = Client(f"127.0.0.1:{procs.free_port()}", tls=False, config=ONE_NODE)
    with client:
        with pytest.raises(KvmeshError, match="max_tokens must be >= 1"):
            client.generate("hi", max_tokens=-1)  # at the call, not at the stream's first next()
        with pytest.raises(KvmeshError, match="token id -5"):
            client.route([1, -5])
        for bad in (0.0, -1.0, math.nan):
            with pytest.raises(KvmeshError, match="timeout must be positive") as e:
                client.route("hi", timeout=bad)
            assert e.value.reason == "invalid_request"
            with pytest.raises(KvmeshError, match="timeout must be positive"):
                client.stats(timeout=bad)
            with pytest.raises(KvmeshError, match="timeout must be positive"):
                client.generate("hi", timeout=bad)
        assert client.dials == 0


async def test_the_async_client_refuses_them_before_it_dials_anything_too() -> None:
    client = AsyncClient(f"127.0.0.1:{procs.free_port()}", tls=False, config=ONE_NODE)
    async with client:
        with pytest.raises(KvmeshError, match="seed must be in"):
            client.generate("hi", seed=-1)
        with pytest.raises(KvmeshError, match="token id 4294967296"):
            await client.route([2**32])
        with pytest.raises(KvmeshError, match="timeout must be positive"):
            await client.list_engines(timeout=math.nan)
        assert client.dials == 0


def test_a_timeout_that_is_not_a_number_is_refused_when_the_client_is_made() -> None:
    with pytest.raises(ClientConfigError, match="timeout must be positive"):
        Client("127.0.0.1:1", tls=False, config=ClientConfig(timeout=math.nan))


# --- what an application pulls in ---------------------------------------------------------------


def test_importing_the_client_loads_no_node_code() -> None:
    code = (
        "import sys, kvmesh.client; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('router', 'mesh', 'engine_adapters', 'blocks') or m.startswith('kvmesh.') and "
        "not m.startswith(('kvmesh.client', 'kvmesh_pb'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['router', 'router.errors']"
