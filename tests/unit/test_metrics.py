"""The node's metrics: the histograms, the collector against the declared
families, routing quality (predicted against engine-reported cached tokens),
the convergence lag of the mesh, and the README's table of the families."""

from __future__ import annotations

from pathlib import Path

import pycrdt
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from blocks.delta import OP_STORE, KvDelta, KvOp
from engine_adapters.proxy import Usage
from engine_adapters.tokenizer import get_tokenizer
from mesh.counters import ConvergenceLag, decode_state_vector
from mesh.engine_log.epoch import Epoch, EpochDoc
from mesh.state_messages import SyncRequest
from router.config import RouterConfig
from router.engine_registry import EngineSpec, EngineTable
from router.load import LoadTracker
from router.metrics import FAMILIES, Histogram, MetricsRecorder, markdown_table, node_registry, split_listen
from router.node import RouterNode
from router.policies import CandidateScore, Decision
from router.request_path import (
    Accounting,
    ClientRequest,
    NodeStats,
    predicted_cached_tokens,
    prepare,
    routed_to,
)
from tests.unit.test_mesh_core import SPEC, mesh

REPO = Path(__file__).resolve().parents[2]


def _scrape(node: RouterNode) -> dict[str, object]:
    text = generate_latest(node_registry(node)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


# --- histograms ------------------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_a_bound_is_inclusive() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(("a",), v)
    fam = h.export("kvmesh_routing_decision_duration_seconds")
    got = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert got[("kvmesh_routing_decision_duration_seconds_bucket", "0.1")] == 2  # 0.05 and 0.1
    assert got[("kvmesh_routing_decision_duration_seconds_bucket", "1.0")] == 4
    assert got[("kvmesh_routing_decision_duration_seconds_bucket", "+Inf")] == 5
    assert got[("kvmesh_routing_decision_duration_seconds_count", None)] == 5
    assert got[("kvmesh_routing_decision_duration_seconds_sum", None)] == pytest.approx(8.65)
    assert h.count(("a",)) == 5 and h.count(("b",)) == 0


def test_recorder_times_a_call_and_its_first_token_by_outcome() -> None:
    rec = MetricsRecorder()
    ok = rec.request("Generate", 10.0)
    ok.policy = "precise"
    ok.token(10.2)
    ok.token(10.5)  # only the first token sets the TTFT
    rec.ended(ok, "OK", 11.0)
    refused = rec.request("Generate", 20.0)  # refused before a policy was chosen, no token
    rec.ended(refused, "INVALID_ARGUMENT", 20.001)
    assert rec.request_duration.series[("Generate", "precise", "OK")].sum == pytest.approx(1.0)
    assert rec.ttft.series[("precise", "OK")].sum == pytest.approx(0.2)
    assert rec.request_duration.count(("Generate", "none", "INVALID_ARGUMENT")) == 1
    assert ("none", "INVALID_ARGUMENT") not in rec.ttft.series  # no token, no TTFT


# --- the collector ---------------------------------------------------------------------------------


def _node_with_engine() -> RouterNode:
    node = RouterNode(RouterConfig(node_id="m1", insecure=True))
    node.engines.put(EngineSpec("e1", "http://e1:80", model="m", block_size=4).validate())
    return node


def test_every_declared_family_is_scraped_with_its_type_and_labels() -> None:
    node = _node_with_engine()
    node.outcomes.record("OK", "", 0.0)
    node.outcomes.record("RESOURCE_EXHAUSTED", "overloaded", 0.0)
    node.outcomes.record("RESOURCE_EXHAUSTED", "overloaded", 0.1)
    node.admission.admission.offer("r1", 0.0)
    timer = node.metrics.request("Route", 0.0)
    node.metrics.ended(timer, "OK", 0.01)
    node.stats.prompt_tokens_by_policy["precise"] += 64
    fams = _scrape(node)
    declared = {f.name.removesuffix("_total") if f.kind == "counter" else f.name: f for f in FAMILIES}
    assert set(fams) == set(declared)  # nothing undeclared, nothing missing
    for name, fam in fams.items():
        spec = declared[name]
        assert fam.type == spec.kind, name
        for s in fam.samples:
            assert set(s.labels) - {"le"} == set(spec.labels), (name, s.labels)
    ended = {(s.labels["code"], s.labels["reason"]): s.value for s in fams["kvmesh_requests_ended"].samples}
    assert ended == {("OK", ""): 1, ("RESOURCE_EXHAUSTED", "overloaded"): 2}
    assert fams["kvmesh_admission_in_flight"].samples[0].value == 1
    states = {s.labels["state"]: s.value for s in fams["kvmesh_engine_breaker_state"].samples}
    assert states == {"closed": 1, "open": 0, "half_open": 0}
    members = {s.labels["state"]: s.value for s in fams["kvmesh_mesh_members"].samples}
    assert members == {"alive": 1, "suspect": 0, "dead": 0, "left": 0}
    # A policy that finished a request has a sample in every quality family: the
    # misprediction rate is defined (0 of 0 predictions here), not a missing series.
    assert [s.value for s in fams["kvmesh_route_mispredictions"].samples] == [0]


def test_two_nodes_in_one_process_have_registries_of_their_own() -> None:
    a, b = _node_with_engine(), _node_with_engine()
    a.outcomes.record("OK", "", 0.0)
    assert [s.value for s in _scrape(a)["kvmesh_requests_ended"].samples] == [1]
    assert _scrape(b)["kvmesh_requests_ended"].samples == []


def test_adapter_counters_never_go_back_across_a_handover() -> None:
    node = _node_with_engine()
    registry = node_registry(node)

    class FakeAdapter:  # what the collector reads: EventAdapter.stats()
        block_size_mismatch = 0

        def __init__(self, gaps: int) -> None:
            self.gaps = gaps

        def stats(self) -> dict[str, object]:
            return {"events": 10, "gaps": self.gaps, "replayed_batches": 1, "resets": 0, "event_lag": 0.25}

    def gaps() -> float:
        fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
        return fams["kvmesh_engine_event_gaps"].samples[0].value

    first = FakeAdapter(3)
    node.adapters._running["e1"] = first  # the node owns e1
    assert gaps() == 3
    node.adapters._running.pop("e1")  # handed over: the node's total stays
    assert gaps() == 3
    node.adapters._running["e1"] = FakeAdapter(2)  # owned again: a fresh adapter counts from 0
    assert gaps() == 5


# --- routing quality -------------------------------------------------------------------------------


def test_predicted_tokens_are_whole_blocks_short_of_the_last_token() -> None:
    assert predicted_cached_tokens(4, 16, 70) == 64
    assert predicted_cached_tokens(4, 16, 64) == 48  # a prompt cached whole: its last block is computed
    assert predicted_cached_tokens(0, 16, 70) == 0
    assert predicted_cached_tokens(3, 16, 0) == 0


def _finish(stats: NodeStats, predicted_blocks: int, cached: int, unreported: bool = False) -> None:
    engines = EngineTable()
    engines.put(EngineSpec("e1", "http://e1:80", model="m", block_size=4).validate())
    prep = prepare(ClientRequest(token_ids=list(range(40))), engines, get_tokenizer, "precise", lambda: "r")
    decision = Decision("precise", "e1", "test", [CandidateScore("e1", predicted_blocks, 0.0, 0.0, True)])
    acct = Accounting(prep, stats, LoadTracker(), 0.0)
    routed = routed_to(prep, decision, 1, engines)
    acct.attempt(routed, engines["e1"], 0.0)
    acct.sent()
    acct.finished(
        Usage(prompt_tokens=40, completion_tokens=1, cached_tokens=cached, cached_unreported=unreported), 1.0
    )
    acct.attempt_over()


def test_a_route_is_mispredicted_when_the_engine_held_less_than_predicted() -> None:
    stats = NodeStats()
    _finish(stats, predicted_blocks=6, cached=24)  # as predicted
    _finish(stats, predicted_blocks=6, cached=28)  # more than predicted: not a misprediction
    _finish(stats, predicted_blocks=6, cached=8)  # less: mispredicted
    _finish(stats, predicted_blocks=0, cached=8)  # no prediction: not counted either way
    assert stats.predictions_by_policy == {"precise": 3}
    assert stats.mispredictions_by_policy == {"precise": 1}
    assert stats.predicted_tokens_by_policy["precise"] == 3 * 24
    assert stats.cached_tokens_by_policy["precise"] == 24 + 28 + 8 + 8
    assert stats.prompt_tokens_by_engine == {"e1": 160}
    assert stats.cached_tokens_by_engine == {"e1": 68}


def test_an_engine_that_reports_no_cached_tokens_is_left_out_of_hit_rates_and_mispredictions() -> None:
    stats = NodeStats()
    for _ in range(3):  # usage without prompt_tokens_details: not a miss, not a misprediction
        _finish(stats, predicted_blocks=6, cached=0, unreported=True)
    assert stats.predictions_by_policy == {} and stats.mispredictions_by_policy == {}
    assert stats.prompt_tokens_by_engine == {} and stats.cached_tokens_by_engine == {}
    assert (stats.prompt_tokens_total, stats.cached_prompt_tokens_total) == (0, 0)
    assert stats.cached_unreported_by_engine == {"e1": 3} and stats.requests_by_engine == {"e1": 3}


def test_once_an_engine_has_reported_cached_tokens_its_silence_is_none_cached() -> None:
    # vLLM with --enable-prompt-tokens-details says nothing of a request without a hit
    stats = NodeStats()
    _finish(stats, predicted_blocks=6, cached=0, unreported=True)  # before any report: left out
    _finish(stats, predicted_blocks=6, cached=24)
    _finish(stats, predicted_blocks=6, cached=0, unreported=True)  # a miss: mispredicted
    assert stats.predictions_by_policy == {"precise": 2} and stats.mispredictions_by_policy == {"precise": 1}
    assert stats.prompt_tokens_by_engine == {"e1": 80} and stats.cached_unreported_by_engine == {"e1": 1}


# --- convergence lag -------------------------------------------------------------------------------


def _varuint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _sv(pairs: dict[int, int]) -> bytes:
    return _varuint(len(pairs)) + b"".join(_varuint(c) + _varuint(k) for c, k in pairs.items())


def test_state_vectors_decode_as_yrs_writes_them() -> None:
    ed = EpochDoc.create("e1", Epoch(1, "a", 0, 123456789012345), b"snapshot")
    for i in range(300):
        ed.append(b"entry", i + 1)
    assert decode_state_vector(ed.state_vector()) == {123456789012345: 5 + 301}  # meta + entries
    doc: pycrdt.Doc = pycrdt.Doc(client_id=7)
    assert decode_state_vector(doc.get_state()) == {}
    for bad in (b"\x01\x80", b"\x01\x07", b"\x00\x00"):
        with pytest.raises(ValueError):
            decode_state_vector(bad)


def test_lag_is_the_age_of_the_oldest_write_the_peer_lacks() -> None:
    ep = Epoch(1, "a", 0, 42)
    lag = ConvergenceLag(resolution=0.01)
    assert lag.observe("b", [], lambda e: 0, 0.0) is None  # writes no log: nothing to measure
    lag.started("e1", ep, now=1.0)  # items 0..5 (meta + snapshot)
    clock = {"e1": 6}
    for t in (2.0, 3.0, 4.0):  # one entry each: items 6, 7, 8
        lag.appending("e1", lambda: clock["e1"], t)
        clock["e1"] += 1
    current = clock.__getitem__
    assert lag.observe("b", [("e1", ep, _sv({42: 9}))], current, 10.0) == 0.0  # holds all
    assert lag.observe("b", [("e1", ep, _sv({42: 8}))], current, 10.0) == 6.0  # lacks item 8 (t=4)
    assert lag.observe("b", [("e1", ep, _sv({42: 6}))], current, 10.0) == 8.0  # lacks items 6.. (t=2)
    assert lag.observe("b", [("e1", ep, _sv({42: 3}))], current, 10.0) == 9.0  # lacks the snapshot
    assert lag.observe("b", [("e1", Epoch(0, "z", 0, 1), b"\x00")], current, 10.0) == 9.0  # older epoch
    assert lag.observe("b", [], current, 10.0) == 9.0  # never heard of the log
    assert lag.observe("b", [("e1", ep, b"\x05garbage")], current, 10.0) == 0.0  # measures nothing
    assert lag.observe("b", [("e1", Epoch(2, "c", 0, 9), b"\x00")], current, 10.0) == 0.0  # we are fenced
    assert lag.by_peer == {"b": (0.0, 10.0)}
    lag.forget("b")
    assert lag.by_peer == {}
    lag.started("e2", Epoch(1, "a", 0, 43), now=11.0)
    assert lag.observe("c", [], current, 12.0) == 11.0  # lacks e1 from t=1
    lag.stopped("e1")
    assert lag.by_peer == {"c": (11.0, 12.0)}  # still writes e2's log
    lag.stopped("e2")  # writes none: the last lags measured would be shown forever
    assert not lag and lag.by_peer == {}


def test_marks_closer_than_the_resolution_are_one() -> None:
    lag = ConvergenceLag(resolution=1.0, keep=2)
    lag.started("e1", Epoch(1, "a", 0, 1), 0.0)
    asked = []
    for t in (0.0, 0.5, 0.9, 1.0, 2.0, 3.0, 4.0, 5.0):
        lag.appending("e1", lambda t=t: asked.append(t) or len(asked), t)
    assert asked == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the clock is read once per resolution
    assert len(lag._logs["e1"].clocks) <= 4  # bounded by 2 x keep


def test_a_mesh_measures_its_peers_lag_through_anti_entropy() -> None:
    net = mesh(3)
    a = net.nodes["a"]
    a.register_engine("e1", SPEC, net.now)
    net.run(3.0)
    (owner,) = net.owner("e1")
    core = net.nodes[owner]
    seq = 0

    def write() -> None:
        nonlocal seq
        assert core.engine_deltas("e1", [KvDelta("e1", seq, [KvOp(OP_STORE, [1000 + seq])])], net.now)
        seq += 1

    for _ in range(5):
        write()
        net.run(1.0)
    net.run(4.0)  # every peer summarised its state at least once
    peers = {n for n in net.nodes if n != owner}
    assert set(core.lag.by_peer) == peers
    assert all(lag == 0.0 for lag, _ in core.lag.by_peer.values())  # gossip kept them current
    # A peer that hears nothing for a while: its next summary shows how long.
    behind = sorted(peers)[0]
    written_at = net.now
    write()
    for msg in core.take_sends():  # the push to it is lost
        if msg.dst != behind:
            net.nodes[msg.dst].handle(msg, net.now)
    net.now += 1.5
    summary = net.nodes[behind].anti_entropy.full_state_request(core.addr).summary
    core.handle(SyncRequest(behind, core.addr, summary), net.now)
    assert core.lag.by_peer[behind][0] == pytest.approx(net.now - written_at)


# --- the README ------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_the_docs_list_exactly_the_families(doc: str) -> None:
    text = (REPO / doc).read_text()
    begin, end = "<!-- metrics-table:begin -->", "<!-- metrics-table:end -->"
    assert begin in text and end in text, f"{doc} needs the metrics table markers"
    table = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert table == markdown_table(), "paste router.metrics.markdown_table() between the markers"


def test_listen_addresses() -> None:
    assert split_listen("0.0.0.0:9090") == ("0.0.0.0", 9090)
    assert split_listen("[::1]:0") == ("::1", 0)
    for bad in ("9090", "host:", ":9090", "h:99999"):
        with pytest.raises(ValueError):
            split_listen(bad)
    with pytest.raises(ValueError, match="metrics-listen"):
        RouterConfig(metrics_listen="nope", insecure=True)
