"""A running router node scraped over HTTP: every declared family with its
type and labels, values that moved with real requests (OK and refused), the
Grafana dashboard's expressions against the scrape, and the metrics port's
authentication (bearer token, TLS)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmesh import procs
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from router.cert_validity import read_dates
from router.metrics import FAMILIES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOKEN = "metrics-token-0123456789abcdef"
OK_REQUESTS = 12
PREFIXES = 3  # requests share prefixes: routes predict cached blocks


def _family_key(name: str, kind: str) -> str:
    """The family name prometheus_client's parser reports (counters without _total)."""
    return name.removesuffix("_total") if kind == "counter" else name


def _parse(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


async def _scrape(url: str, **kw) -> dict:
    async with aiohttp.ClientSession() as http, http.get(url, **kw) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        return _parse(await r.text())


def _value(fams: dict, family: str, sample: str, **labels: str) -> float:
    hits = [
        s.value
        for s in fams[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(hits) == 1, (family, sample, labels, fams[family].samples)
    return hits[0]


@pytest.fixture(scope="module")
def node():
    engine = procs.start_sim_engine("metrics-e1", ["--seed", "1"])
    router = procs.start_router(
        "metrics-r1",
        [procs.engine_flag("e1", engine)],
        # Every loop stall logged: the stall test below finds its own.
        ["--metrics-listen", "127.0.0.1:0", "--health-interval", "0.5", "--loop-stall-log-every", "0.001"],
    )
    yield router
    router.stop()
    engine.stop()


async def _traffic(addr: str) -> None:
    rng = random.Random(7)
    prefixes = [[rng.randrange(256, 30000) for _ in range(64)] for _ in range(PREFIXES)]
    async with aio_channel(addr, tls=False, config=ONE_NODE) as ch:
        router = pb_grpc.RouterStub(ch)
        for i in range(OK_REQUESTS):
            ids = prefixes[i % PREFIXES] + [rng.randrange(256, 30000) for _ in range(8)]
            req = pb.GenerateRequest(
                prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids)), sampling=pb.SamplingParams(max_tokens=3)
            )
            async for _ in router.Generate(req, timeout=30):
                pass
            await asyncio.sleep(0.1)  # the engine's KV events reach the index before the next
        bad = router.Generate(pb.GenerateRequest(prompt=pb.Prompt(text="")), timeout=10)  # empty prompt
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in bad:
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_scrape_has_every_family_and_the_values_moved(node) -> None:
    url = f"http://{node.info['metrics']}/metrics"
    await _traffic(node.info["grpc"])
    deadline = time.monotonic() + 10
    while True:  # the owner applies the engine's events asynchronously
        fams = await _scrape(url)
        if _value(fams, "kvmesh_engine_events", "kvmesh_engine_events_total", engine="e1") > 0:
            break
        assert time.monotonic() < deadline, "no KV event applied"
        await asyncio.sleep(0.2)

    for f in FAMILIES:
        key = _family_key(f.name, f.kind)
        assert key in fams, f"{f.name} missing from the scrape"
        assert fams[key].type == f.kind, f.name
        for s in fams[key].samples:
            assert set(s.labels) - {"le"} == set(f.labels), (f.name, s.labels)
    declared = {_family_key(f.name, f.kind) for f in FAMILIES}
    assert {k for k in fams if k.startswith("kvmesh_")} == declared

    ok = dict(rpc="Generate", policy="precise", code="OK")
    assert _value(fams, "kvmesh_requests_ended", "kvmesh_requests_ended_total", code="OK", reason="") == (
        OK_REQUESTS
    )
    assert (
        _value(
            fams,
            "kvmesh_requests_ended",
            "kvmesh_requests_ended_total",
            code="INVALID_ARGUMENT",
            reason="invalid_request",
        )
        == 1
    )
    dur = "kvmesh_request_duration_seconds"
    assert _value(fams, dur, f"{dur}_count", **ok) == OK_REQUESTS
    assert _value(fams, dur, f"{dur}_bucket", le="+Inf", **ok) == OK_REQUESTS
    assert _value(fams, dur, f"{dur}_sum", **ok) > 0
    refused = dict(rpc="Generate", policy="none", code="INVALID_ARGUMENT")
    assert _value(fams, dur, f"{dur}_count", **refused) == 1
    ttft = "kvmesh_time_to_first_token_seconds"
    assert _value(fams, ttft, f"{ttft}_count", policy="precise", code="OK") == OK_REQUESTS
    assert not [s for s in fams[ttft].samples if s.labels.get("code") == "INVALID_ARGUMENT"]
    assert _value(fams, ttft, f"{ttft}_sum", policy="precise", code="OK") < _value(
        fams, dur, f"{dur}_sum", **ok
    )
    dec = "kvmesh_routing_decision_duration_seconds"
    assert _value(fams, dec, f"{dec}_count", policy="precise") == OK_REQUESTS

    # Routing quality: the requests of each prefix after its first were predicted cached.
    prompt = _value(fams, "kvmesh_prompt_tokens", "kvmesh_prompt_tokens_total", policy="precise")
    assert prompt == OK_REQUESTS * 72
    predictions = _value(fams, "kvmesh_route_predictions", "kvmesh_route_predictions_total", policy="precise")
    misses = _value(
        fams, "kvmesh_route_mispredictions", "kvmesh_route_mispredictions_total", policy="precise"
    )
    assert predictions >= OK_REQUESTS - PREFIXES  # the rate misses / predictions is defined
    assert 0 <= misses <= predictions
    predicted = _value(
        fams,
        "kvmesh_predicted_cached_prompt_tokens",
        "kvmesh_predicted_cached_prompt_tokens_total",
        policy="precise",
    )
    cached = _value(
        fams, "kvmesh_cached_prompt_tokens", "kvmesh_cached_prompt_tokens_total", policy="precise"
    )
    assert predicted > 0 and cached > 0
    engine_cached = _value(
        fams, "kvmesh_engine_cached_prompt_tokens", "kvmesh_engine_cached_prompt_tokens_total", engine="e1"
    )
    assert engine_cached == cached  # one engine: its hit rate is the node's

    assert _value(fams, "kvmesh_engine_attempts", "kvmesh_engine_attempts_total", engine="e1") == OK_REQUESTS
    assert _value(fams, "kvmesh_engine_healthy", "kvmesh_engine_healthy", engine="e1") == 1
    assert (
        _value(
            fams, "kvmesh_engine_breaker_state", "kvmesh_engine_breaker_state", engine="e1", state="closed"
        )
        == 1
    )
    assert _value(fams, "kvmesh_engine_cached_blocks", "kvmesh_engine_cached_blocks", engine="e1") > 0
    assert _value(fams, "kvmesh_engine_event_seq", "kvmesh_engine_event_seq", engine="e1", worker="e1") >= 0
    lag = _value(fams, "kvmesh_engine_event_lag_seconds", "kvmesh_engine_event_lag_seconds", engine="e1")
    assert 0 <= lag < 5  # one host: no clock skew
    assert _value(fams, "kvmesh_mesh_members", "kvmesh_mesh_members", state="alive") == 1
    assert _value(fams, "kvmesh_mesh_owned_engines", "kvmesh_mesh_owned_engines") == 1
    taken = _value(
        fams, "kvmesh_mesh_ownership_changes", "kvmesh_mesh_ownership_changes_total", change="taken"
    )
    assert taken == 1
    assert _value(fams, "kvmesh_mesh_log_entries", "kvmesh_mesh_log_entries", engine="e1") >= 2
    assert _value(fams, "kvmesh_mesh_state_bytes", "kvmesh_mesh_state_bytes") > 0
    assert _value(fams, "kvmesh_node_ready", "kvmesh_node_ready") == 1
    assert _value(fams, "kvmesh_index_entries", "kvmesh_index_entries") > 0


async def test_the_dashboard_uses_only_names_the_node_exports(node) -> None:
    fams = await _scrape(f"http://{node.info['metrics']}/metrics")
    exported = set()
    for f in fams.values():
        if f.type == "counter":
            exported.add(f"{f.name}_total")
        elif f.type == "histogram":
            exported.update(f"{f.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        else:
            exported.add(f.name)
    dashboard = json.loads((REPO / "deploy" / "grafana" / "kvmesh.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(exprs) > 30
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\bkvmesh_[a-z0-9_]+\b", expr))
        assert names, expr
        assert names <= exported, f"{expr}: {sorted(names - exported)} not exported"
        used |= names
    # Every family is on the dashboard.
    assert {_family_key(f.name, f.kind) for f in FAMILIES} <= {
        re.sub(r"(_total|_bucket|_count|_sum)$", "", n) for n in used
    }


async def test_the_metrics_port_takes_the_api_token_and_tls(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    subprocess.run(
        ["bash", str(REPO / "deploy" / "make-certs.sh"), str(pki)], check=True, capture_output=True
    )
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    (tmp_path / "mesh-secret").write_text("a-shared-mesh-secret-of-32-bytes!\n")
    router = procs.start_router(
        "metrics-auth",
        [],
        [
            "--metrics-listen", "127.0.0.1:0",
            "--auth-token-file", str(tmp_path / "tokens"),
            "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
            "--mesh-secret-file", str(tmp_path / "mesh-secret"),
        ],
        insecure=False,
    )  # fmt: skip
    try:
        port = router.info["metrics"].rpartition(":")[2]
        url = f"https://localhost:{port}/metrics"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        async with aiohttp.ClientSession() as http:
            async with http.get(url, ssl=ctx) as r:
                assert r.status == 401 and "no_token" in await r.text()
            async with http.get(
                url, ssl=ctx, headers={"Authorization": "Bearer wrong-token-0123456789"}
            ) as r:
                assert r.status == 401 and "bad_token" in await r.text()
                rid = r.headers.get("x-request-id", "")  # the id the node's log line names it by
                assert len(rid) == 32, dict(r.headers)
            with pytest.raises(aiohttp.ClientError):  # plaintext is not served
                async with http.get(f"http://localhost:{port}/metrics") as r:
                    await r.read()
        fams = await _scrape(url, ssl=ctx, headers={"Authorization": f"Bearer {TOKEN}"})
        refused = {
            (s.labels["code"], s.labels["reason"]): s.value for s in fams["kvmesh_requests_ended"].samples
        }
        assert refused[("UNAUTHENTICATED", "no_token")] == 1
        assert refused[("UNAUTHENTICATED", "bad_token")] == 1
        # When the served certificate ends, for an alert before it does (no mesh TLS: no mesh sample).
        expiry = {s.labels["cert"]: s.value for s in fams["kvmesh_tls_cert_expiry_timestamp_seconds"].samples}
        assert expiry == {"api": read_dates(str(pki / "server.pem"))[0].not_after}
        assert expiry["api"] > time.time() + 365 * 86400  # make-certs.sh's 825 days
    finally:
        router.stop()
    assert any("router.call_refused" in line and rid in line for line in router.output)


def _stalls_logged(node: procs.Proc, at_least: float) -> bool:
    """A router.loop_stalled line in the node's output with a lag of ``at_least`` seconds."""
    lags = re.findall(r"router\.loop_stalled\b.*?\blag_ms=([0-9.]+)", node.tail(400))
    return any(float(ms) >= at_least * 1e3 for ms in lags)


async def test_a_held_event_loop_is_seen_as_a_stall(node) -> None:
    """The node's process stopped (SIGSTOP) for 0.5 s, as a callback that
    holds the loop would: its lag probe fires late, and the stall shows in
    the scrape, in GetStats and in the log."""
    url = f"http://{node.info['metrics']}/metrics"
    before = await _scrape(url)
    stalls_before = _value(before, "kvmesh_event_loop_stalls", "kvmesh_event_loop_stalls_total")
    samples_before = _value(before, "kvmesh_event_loop_lag_seconds", "kvmesh_event_loop_lag_seconds_count")
    node.popen.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.5)
    finally:
        node.popen.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while not _stalls_logged(node, 0.4) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _stalls_logged(node, 0.4), node.tail(20)
    after = await _scrape(url)
    assert _value(after, "kvmesh_event_loop_stalls", "kvmesh_event_loop_stalls_total") >= stalls_before + 1
    slow = _value(after, "kvmesh_event_loop_lag_seconds", "kvmesh_event_loop_lag_seconds_bucket", le="0.25")
    total = _value(after, "kvmesh_event_loop_lag_seconds", "kvmesh_event_loop_lag_seconds_count")
    assert total - slow >= 1 and total > samples_before  # a sample later than 0.25 s
    async with aio_channel(node.info["grpc"], tls=False, config=ONE_NODE) as ch:
        st = await pb_grpc.AdminStub(ch).GetStats(pb.GetStatsRequest(), timeout=10)
    assert st.event_loop_stalls_total >= stalls_before + 1
    assert st.event_loop_lag_max_seconds >= 0.4
