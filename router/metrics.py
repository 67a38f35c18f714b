"""Prometheus metrics of a router node.

Four parts, in one file so that a metric's name is written once, beside the
code that fills it:

* :data:`FAMILIES`: every family's name, type, labels and meaning. The
  README's table is generated from it, and the tests check the scrape, the
  README and the Grafana dashboard (``deploy/grafana/kvmesh.json``) against it.
* :class:`MetricsRecorder`: what is observed when it happens (a request ends,
  a routing decision is made): histograms, one bisect and two additions per
  observation, no lock (everything runs on the node's event loop).
* :class:`NodeCollector`: everything else, read from the node's own counters
  at scrape time: nothing to keep in sync on the request path.
* :class:`MetricsServer`: ``GET /metrics`` over HTTP on ``--metrics-listen``.

Scrapes are served on the node's event loop (aiohttp), not in a thread: the
collector reads dicts the loop mutates and pycrdt documents that belong to
the loop's thread, so it must run there; a scrape holds the loop for the
time it takes to format the families (the replicated state's size, the one
costly reading, is computed at most every ``_STATE_BYTES_MAX_AGE`` seconds).

Each node has its own :class:`prometheus_client.CollectorRegistry`, so several
nodes in one process never share a metric.

Authentication follows the public API's (``router/auth.py``): with
``--auth-token-file`` a scrape must carry ``Authorization: Bearer TOKEN`` (any
role: the endpoint is read-only), with ``--tls-cert``/``--tls-key`` it is
served over HTTPS with the same certificate (and client certificates of
``--tls-client-ca`` when set). A node whose API is unauthenticated runs only
with ``--insecure``, and its metrics are then open too.
"""

from __future__ import annotations

import ssl
import time
import weakref
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from blocks.tiers import TIERS, tier_name
from router.auth import ApiAuthConfig, Refused, TokenTable
from router.circuit_breaker import CLOSED, HALF_OPEN, OPEN

__all__ = [
    "FAMILIES",
    "NO_POLICY",
    "Family",
    "Histogram",
    "MetricsRecorder",
    "MetricsServer",
    "NodeCollector",
    "RequestTimer",
    "markdown_table",
    "node_registry",
    "split_listen",
]


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # as exposed: counters end in _total
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str


_R = ("rpc", "policy", "code")
FAMILIES: tuple[Family, ...] = (
    # --- requests ---------------------------------------------------------------------------------
    Family("kvmesh_request_duration_seconds", "histogram", _R,
           "Generate and Route calls and OpenAI API requests (rpc: the HTTP path), from received to "
           "ended, by RPC, policy (none: refused before one was chosen) and gRPC status code"),
    Family("kvmesh_time_to_first_token_seconds", "histogram", ("policy", "code"),
           "Generate calls (gRPC or OpenAI API) that streamed a token: received to first token, by how "
           "the call ended"),
    Family("kvmesh_routing_decision_duration_seconds", "histogram", ("policy",),
           "one routing decision (candidates, their load, the policy's choice), each attempt"),
    Family("kvmesh_requests_ended_total", "counter", ("code", "reason"),
           "calls by how they ended: OK, or a gRPC status and its kvmesh-reason (refused "
           "credentials included)"),
    Family("kvmesh_request_retries_total", "counter", (),
           "engine attempts that failed before the first token and were tried elsewhere"),
    Family("kvmesh_admission_in_flight", "gauge", (), "Generate requests this node has on engines"),
    Family("kvmesh_admission_queued", "gauge", (), "Generate requests waiting here for a slot"),
    Family("kvmesh_admission_shed_total", "counter", (),
           "requests shed (RESOURCE_EXHAUSTED) before any engine work"),
    Family("kvmesh_admission_estimated_wait_seconds", "gauge", (),
           "estimated time until the fleet would start one more request of this node"),
    Family("kvmesh_admission_capacity_per_second", "gauge", (),
           "first tokens per second the fleet gave this node's waiting requests in its last backlog"),
    Family("kvmesh_event_loop_lag_seconds", "histogram", (),
           "how late the node's event loop ran its lag probe, a timer due every LoopLagConfig.interval "
           "(router/loop_lag.py): while the loop is late, every call, stream and mesh message waits"),
    Family("kvmesh_event_loop_stalls_total", "counter", (),
           "lag samples later than --loop-stall (logged as router.loop_stalled, at most one log per "
           "--loop-stall-log-every)"),
    # --- routing quality --------------------------------------------------------------------------
    Family("kvmesh_prompt_tokens_total", "counter", ("policy",),
           "prompt tokens of requests the engine finished (engine-reported)"),
    Family("kvmesh_cached_prompt_tokens_total", "counter", ("policy",),
           "of those, the tokens the engine reported cached"),
    Family("kvmesh_predicted_cached_prompt_tokens_total", "counter", ("policy",),
           "of those, the tokens the route predicted cached (whole blocks, never the last token: "
           "what an engine can report)"),
    Family("kvmesh_route_predictions_total", "counter", ("policy",),
           "finished requests whose route predicted cached tokens"),
    Family("kvmesh_route_mispredictions_total", "counter", ("policy",),
           "of those, the requests whose engine reported fewer cached tokens than predicted"),
    Family("kvmesh_index_entries", "gauge", (), "distinct block hashes in this node's prefix index"),
    Family("kvmesh_index_evicted_blocks_total", "counter", (),
           "blocks the prefix index dropped to stay within --max-index-blocks, least recently matched "
           "first (GPU blocks and lower-tier blocks; routed as cold from then on)"),
    # --- engines ----------------------------------------------------------------------------------
    Family("kvmesh_engine_healthy", "gauge", ("engine",),
           "0 once its health probes failed RouterConfig.health_down_after times in a row, 1 "
           "otherwise (a newly registered engine counts as healthy until probed)"),
    Family("kvmesh_engine_breaker_state", "gauge", ("engine", "state"),
           "this node's circuit breaker for the engine (each node keeps its own, from its own attempts): "
           "1 for its state (closed, open, half_open), 0 for the others"),
    Family("kvmesh_engine_in_flight", "gauge", ("engine",),
           "this node's requests on the engine (sum over nodes: the mesh's)"),
    Family("kvmesh_engine_cached_blocks", "gauge", ("engine",), "blocks this node's index holds for it"),
    Family("kvmesh_engine_attempts_total", "counter", ("engine",),
           "requests this node sent to it (attempts)"),
    Family("kvmesh_engine_failures_total", "counter", ("engine",),
           "attempts the engine failed (before or after the first token)"),
    Family("kvmesh_engine_prompt_tokens_total", "counter", ("engine",),
           "prompt tokens of this node's requests the engine finished"),
    Family("kvmesh_engine_cached_prompt_tokens_total", "counter", ("engine",),
           "of those, the tokens it reported cached (its hit rate is the ratio)"),
    Family("kvmesh_engine_cached_tokens_unreported_total", "counter", ("engine",),
           "requests this node's engine finished before it ever reported cached prompt tokens, left out "
           "of the hit rates and mispredictions (vLLM: --enable-prompt-tokens-details, SGLang: "
           "--enable-cache-report)"),
    Family("kvmesh_engine_event_seq", "gauge", ("engine", "worker"),
           "last KV-event sequence number in this node's copy of the engine's log, per worker"),
    Family("kvmesh_engine_events_total", "counter", ("engine",),
           "KV events this node received from the engine while it owned it, applied or skipped (see "
           "kvmesh_engine_events_skipped_total)"),
    Family("kvmesh_engine_event_gaps_total", "counter", ("engine",),
           "gaps in the engine's KV-event sequence seen by this node as owner"),
    Family("kvmesh_engine_event_replayed_batches_total", "counter", ("engine",),
           "KV-event batches this node fetched from the engine's replay socket"),
    Family("kvmesh_engine_event_resets_total", "counter", ("engine",),
           "times this node cleared a worker of the engine because its event history was lost"),
    Family("kvmesh_engine_event_lag_seconds", "gauge", ("engine",),
           "owner only: wall time from the engine stamping its last batch received live to its "
           "apply here (includes the clock skew between the two hosts; replayed batches are old "
           "by design and do not count)"),
    Family("kvmesh_engine_events_skipped_total", "counter", ("engine",),
           "KV events this node could not map while it owned the engine, each skipped alone "
           "(logged as adapter.event_skipped with its reason; stores of another block size once per "
           "size as adapter.block_size_mismatch)"),
    Family("kvmesh_engine_event_decode_errors_total", "counter", ("engine",),
           "malformed KV-event frames or batches this node received while it owned the engine "
           "(nothing of them applied; logged as adapter.bad_live_frame and the like)"),
    Family("kvmesh_engine_event_reader_failures_total", "counter", ("engine",),
           "times the engine's KV-event reader on this node stopped on an error and was started "
           "again (logged as adapter.reader_failed; ListEngines events_refused says why)"),
    Family("kvmesh_engine_block_size_mismatch", "gauge", ("engine",),
           "owner only: the block size of the engine's KV-event stores while they are refused for "
           "not being its registered block_size (0: they apply; see adapter.block_size_mismatch)"),
    Family("kvmesh_engine_cached_blocks_by_tier", "gauge", ("engine", "tier"),
           "blocks this node's index holds for it per cache tier (gpu, host, disk, external)"),
    # --- mesh -------------------------------------------------------------------------------------
    Family("kvmesh_node_ready", "gauge", (), "1 once the node joined the mesh and holds its full state"),
    Family("kvmesh_node_draining", "gauge", (), "1 while the node refuses new requests and drains"),
    Family("kvmesh_mesh_members", "gauge", ("state",),
           "members this node knows, by state (alive, suspect, dead, left)"),
    Family("kvmesh_mesh_member_events_total", "counter", ("kind",),
           "membership changes this node saw, by kind"),
    Family("kvmesh_mesh_messages_total", "counter", ("direction", "kind"),
           "mesh messages (SWIM and state) handled, by direction (in, out) and kind"),
    Family("kvmesh_mesh_payload_bytes_total", "counter", ("direction", "kind"),
           "bytes of replicated-state payloads (push gossip, anti-entropy), by direction and kind"),
    Family("kvmesh_mesh_bytes_total", "counter", ("direction",),
           "bytes of mesh batches on the wire, by direction (in, out)"),
    Family("kvmesh_mesh_transport_errors_total", "counter", ("kind",),
           "mesh batches lost: send_failed, dropped (peer backlog), refused (bad proof or bytes), "
           "rejected (malformed messages)"),
    Family("kvmesh_mesh_convergence_lag_seconds", "gauge", ("member",),
           "per peer, at its last anti-entropy summary: how long ago this node wrote the oldest "
           "entry of its engine logs that the peer did not hold yet (0: up to date)"),
    Family("kvmesh_mesh_state_bytes", "gauge", (),
           "encoded size of this node's copy of the replicated state (engine logs, registry)"),
    Family("kvmesh_mesh_log_entries", "gauge", ("engine",),
           "entries in the current epoch of the engine's log (this node's copy)"),
    Family("kvmesh_mesh_log_compactions_total", "counter", (),
           "engine logs this node compacted as their owner (a new epoch from a snapshot)"),
    Family("kvmesh_mesh_ownership_changes_total", "counter", ("change",),
           "engines this node took, released or was fenced from (fenced: another node began a newer "
           "epoch of the engine's log, as a member that joins or comes back may: the new owner "
           "resumes the engine's events)"),
    Family("kvmesh_mesh_owned_engines", "gauge", (), "engines whose KV events this node consumes"),
    Family("kvmesh_mesh_gossip_queue_bytes", "gauge", (),
           "state deltas waiting to be forwarded by push gossip, in bytes"),
    Family("kvmesh_tls_cert_expiry_timestamp_seconds", "gauge", ("cert",),
           "when a certificate file this node loaded at start ends (Unix seconds), by file: api "
           "(--tls-cert), api_client_ca, mesh (--mesh-tls-cert), mesh_ca; a CA file's last authority "
           "to end. Files are read only at start: a renewed file takes a restart"),
    # --- engine discovery (--engines-from-dns) -----------------------------------------------------
    Family("kvmesh_discovery_failures_total", "counter", ("name",),
           "resolutions of the DNS name that failed (nothing was changed)"),
    Family("kvmesh_discovery_addresses", "gauge", ("name",), "addresses in the name's last answer"),
    Family("kvmesh_discovery_changes_total", "counter", ("name", "change"),
           "engines of the name this node registered (or updated) and removed, by change"),
)  # fmt: skip
_BY_NAME = {f.name: f for f in FAMILIES}

NO_POLICY = "none"  # a call refused before a policy was chosen

# Bucket upper bounds, seconds. Requests: LLM calls run from milliseconds to minutes.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# vLLM's own time-to-first-token buckets, so the two compare panel to panel.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)  # fmt: skip
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)

_MEMBER_STATES = ("alive", "suspect", "dead", "left")
_BREAKER_STATES = (CLOSED, OPEN, HALF_OPEN)
_OWNERSHIP = {"taken": "ownership.taken", "released": "ownership.released", "fenced": "ownership.fenced"}
_DIRECTION = {"sent": "out", "recv": "in"}
# Adapter counters exported per engine (adapter key -> family).
_ADAPTER_COUNTERS = {
    "events": "kvmesh_engine_events_total",
    "gaps": "kvmesh_engine_event_gaps_total",
    "replayed_batches": "kvmesh_engine_event_replayed_batches_total",
    "resets": "kvmesh_engine_event_resets_total",
    "skipped_events": "kvmesh_engine_events_skipped_total",
    "decode_errors": "kvmesh_engine_event_decode_errors_total",
    "reader_failures": "kvmesh_engine_event_reader_failures_total",
}
_STATE_BYTES_MAX_AGE = 10.0  # seconds: the replicated state's encoded size is O(state) to compute


def family(name: str) -> CounterMetricFamily | GaugeMetricFamily:
    """An empty counter or gauge family ``name`` as declared in :data:`FAMILIES`."""
    f = _BY_NAME[name]
    if f.kind == "counter":
        return CounterMetricFamily(name.removesuffix("_total"), f.help, labels=list(f.labels))
    if f.kind == "gauge":
        return GaugeMetricFamily(name, f.help, labels=list(f.labels))
    raise ValueError(f"{name} is a {f.kind}")


def histogram_family(name: str) -> HistogramMetricFamily:
    f = _BY_NAME[name]
    if f.kind != "histogram":
        raise ValueError(f"{name} is a {f.kind}")
    return HistogramMetricFamily(name, f.help, labels=list(f.labels))


def markdown_table() -> str:
    """The README's table of the families (tests/unit/test_metrics.py keeps it in step)."""
    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    for f in FAMILIES:
        labels = ", ".join(f"`{label}`" for label in f.labels) or "-"
        rows.append(f"| `{f.name}` | {f.kind} | {labels} | {f.help} |")
    return "\n".join(rows)


# --- observations at the moment of the event ------------------------------------------------------


class _Series:
    __slots__ = ("counts", "sum")

    def __init__(self, n: int) -> None:
        self.counts = [0] * (n + 1)  # the last one: above every bound
        self.sum = 0.0


class Histogram:
    """Bucket counts per label values. Pure; not thread-safe (one event loop)."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.series: dict[tuple[str, ...], _Series] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = _Series(len(self.bounds))
        s.counts[bisect_left(self.bounds, value)] += 1
        s.sum += value

    def touch(self, labels: tuple[str, ...]) -> None:
        """A series for ``labels`` with nothing observed yet (exported with zero counts)."""
        if labels not in self.series:
            self.series[labels] = _Series(len(self.bounds))

    def count(self, labels: tuple[str, ...]) -> int:
        s = self.series.get(labels)
        return sum(s.counts) if s is not None else 0

    def export(self, name: str) -> Metric:
        fam = histogram_family(name)
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for labels, s in sorted(self.series.items()):
            total, buckets = 0, []
            for le, n in zip(les, s.counts):
                total += n
                buckets.append((le, float(total)))
            fam.add_metric(list(labels), buckets, s.sum)
        return fam


class RequestTimer:
    """One call's times, from received to ended (``clock()`` seconds)."""

    __slots__ = ("first_token", "policy", "rpc", "started")

    def __init__(self, rpc: str, started: float) -> None:
        self.rpc = rpc
        self.started = started
        self.policy = NO_POLICY  # set once the request is prepared
        self.first_token = -1.0

    def token(self, now: float) -> None:
        """A chunk of tokens went to the client; the first one sets the TTFT."""
        if self.first_token < 0:
            self.first_token = now


class MetricsRecorder:
    """The histograms of one node, observed by the request path."""

    def __init__(self) -> None:
        self.request_duration = Histogram(REQUEST_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.decision = Histogram(DECISION_BUCKETS)

    @staticmethod
    def request(rpc: str, now: float) -> RequestTimer:
        return RequestTimer(rpc, now)

    def ended(self, timer: RequestTimer, code: str, now: float) -> None:
        """The call ended with gRPC status ``code`` ("OK" when it did well)."""
        self.request_duration.observe((timer.rpc, timer.policy, code), now - timer.started)
        if timer.first_token >= 0:
            self.ttft.observe((timer.policy, code), timer.first_token - timer.started)

    def decided(self, policy: str, seconds: float) -> None:
        self.decision.observe((policy,), seconds)

    def histograms(self) -> Iterator[Metric]:
        yield self.request_duration.export("kvmesh_request_duration_seconds")
        yield self.ttft.export("kvmesh_time_to_first_token_seconds")
        yield self.decision.export("kvmesh_routing_decision_duration_seconds")


# --- read at scrape time ---------------------------------------------------------------------------


def _labelled(name: str, values: Iterable[tuple[tuple[str, ...], float]]) -> Metric:
    fam = family(name)
    for labels, value in values:
        fam.add_metric(list(labels), value)
    return fam


def _single(name: str, value: float) -> Metric:
    return _labelled(name, [((), value)])


class _AdapterTotals:
    """Per engine, an adapter's counters summed over its lifetimes on this
    node: a handover replaces the adapter, and a counter must not go back.
    Counts between the last scrape and an adapter's stop are not seen."""

    def __init__(self) -> None:
        self._base: dict[str, Counter[str]] = {}
        self._last: dict[str, tuple[weakref.ref[Any], dict[str, int]]] = {}

    def keep_only(self, engine_ids: set[str]) -> None:
        """Forget the engines not in ``engine_ids`` (the node forgot them)."""
        for d in (self._base, self._last):
            for eid in [e for e in d if e not in engine_ids]:
                del d[eid]

    def totals(self, engine_id: str, adapter: Any | None) -> Counter[str]:
        base = self._base.setdefault(engine_id, Counter())
        last = self._last.get(engine_id)
        if last is not None and (adapter is None or last[0]() is not adapter):
            base.update(last[1])
            del self._last[engine_id]
        out = Counter(base)
        if adapter is not None:
            st = adapter.stats()
            now = {k: int(st.get(k, 0)) for k in _ADAPTER_COUNTERS}
            self._last[engine_id] = (weakref.ref(adapter), now)
            out.update(now)
        return out


class NodeCollector:
    """Reads a router node at scrape time (``node``: a
    :class:`router.node.RouterNode`; that module imports this one, so the
    type is not imported here: the import graph stays acyclic)."""

    def __init__(self, node: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self._clock = clock
        self._adapters = _AdapterTotals()
        self._state_bytes = (0, -_STATE_BYTES_MAX_AGE)  # (bytes, computed at)

    def collect(self) -> Iterator[Metric]:
        yield from self.node.metrics.histograms()
        yield from self._requests()
        yield from self._quality()
        yield from self._engines()
        yield from self._adapter_families()
        yield from self._mesh()
        yield from self._transport()
        yield from self._discovery()

    def _requests(self) -> Iterator[Metric]:
        n = self.node
        ended = []
        for key, count in sorted(n.outcomes.counts.items()):
            code, _, reason = key.partition(":")
            ended.append(((code, reason), count))
        yield _labelled("kvmesh_requests_ended_total", ended)
        yield _single("kvmesh_request_retries_total", n.stats.retries_total)
        adm = n.admission.admission
        yield _single("kvmesh_admission_in_flight", adm.in_flight)
        yield _single("kvmesh_admission_queued", adm.queued)
        yield _single("kvmesh_admission_shed_total", adm.shed_total)
        yield _single("kvmesh_admission_estimated_wait_seconds", adm.estimated_wait(n.admission.now()))
        yield _single("kvmesh_admission_capacity_per_second", adm.capacity_at(n.admission.now()))
        yield n.loop_lag.histogram.export("kvmesh_event_loop_lag_seconds")
        yield _single("kvmesh_event_loop_stalls_total", n.loop_lag.stalls_total)
        yield _single("kvmesh_index_entries", len(n.index))
        yield _single("kvmesh_index_evicted_blocks_total", n.index.stats()["evicted_blocks"])

    def _quality(self) -> Iterator[Metric]:
        s = self.node.stats
        for name, counts in (
            ("kvmesh_prompt_tokens_total", s.prompt_tokens_by_policy),
            ("kvmesh_cached_prompt_tokens_total", s.cached_tokens_by_policy),
            ("kvmesh_predicted_cached_prompt_tokens_total", s.predicted_tokens_by_policy),
            ("kvmesh_route_predictions_total", s.predictions_by_policy),
            ("kvmesh_route_mispredictions_total", s.mispredictions_by_policy),
        ):
            # Every policy that finished a request has a sample in each family,
            # so ratios are defined (0 mispredictions, not a missing series).
            yield _labelled(name, (((p,), counts[p]) for p in sorted(s.prompt_tokens_by_policy)))

    def _engines(self) -> Iterator[Metric]:
        n = self.node
        names = (
            "kvmesh_engine_healthy",
            "kvmesh_engine_breaker_state",
            "kvmesh_engine_in_flight",
            "kvmesh_engine_cached_blocks",
            "kvmesh_engine_attempts_total",
            "kvmesh_engine_failures_total",
            "kvmesh_engine_prompt_tokens_total",
            "kvmesh_engine_cached_prompt_tokens_total",
            "kvmesh_engine_cached_tokens_unreported_total",
            "kvmesh_engine_event_seq",
            "kvmesh_engine_cached_blocks_by_tier",
        )
        fams = {name: family(name) for name in names}
        for rec in n.engines.values():
            eid, workers = rec.spec.engine_id, rec.spec.workers
            fams["kvmesh_engine_healthy"].add_metric([eid], 1.0 if rec.healthy else 0.0)
            for state in _BREAKER_STATES:
                value = 1.0 if rec.breaker.state == state else 0.0
                fams["kvmesh_engine_breaker_state"].add_metric([eid, state], value)
            fams["kvmesh_engine_in_flight"].add_metric([eid], sum(n.load.local.in_flight(w) for w in workers))
            fams["kvmesh_engine_cached_blocks"].add_metric([eid], sum(n.index.blocks_of(w) for w in workers))
            for tier in TIERS:
                fams["kvmesh_engine_cached_blocks_by_tier"].add_metric(
                    [eid, tier_name(tier)], sum(n.index.blocks_of(w, tier) for w in workers)
                )
            fams["kvmesh_engine_attempts_total"].add_metric([eid], n.stats.attempts_by_engine[eid])
            fams["kvmesh_engine_failures_total"].add_metric([eid], n.stats.failures_by_engine[eid])
            fams["kvmesh_engine_prompt_tokens_total"].add_metric([eid], n.stats.prompt_tokens_by_engine[eid])
            fams["kvmesh_engine_cached_prompt_tokens_total"].add_metric(
                [eid], n.stats.cached_tokens_by_engine[eid]
            )
            fams["kvmesh_engine_cached_tokens_unreported_total"].add_metric(
                [eid], n.stats.cached_unreported_by_engine[eid]
            )
            for worker, first in sorted(n.core.resume_seqs(eid).items()):
                fams["kvmesh_engine_event_seq"].add_metric([eid, worker], first - 1)
        yield from fams.values()

    def _adapter_families(self) -> Iterator[Metric]:
        """The KV-event adapters' counters: on the owner (and the nodes that owned before)."""
        n = self.node
        fams = {name: family(name) for name in _ADAPTER_COUNTERS.values()}
        lag = family("kvmesh_engine_event_lag_seconds")
        mismatch = family("kvmesh_engine_block_size_mismatch")
        self._adapters.keep_only(n.engines_remembered())
        for eid in sorted(n.engines):
            adapter = n.adapters.get(eid)
            totals = self._adapters.totals(eid, adapter)
            if adapter is None and not totals:
                continue
            for key, name in _ADAPTER_COUNTERS.items():
                fams[name].add_metric([eid], totals[key])
            if adapter is not None:
                event_lag = adapter.stats().get("event_lag")
                if event_lag is not None:
                    lag.add_metric([eid], event_lag)
                mismatch.add_metric([eid], adapter.block_size_mismatch)
        yield from fams.values()
        yield lag
        yield mismatch

    def _mesh(self) -> Iterator[Metric]:
        n = self.node
        core = n.core
        yield _single("kvmesh_node_ready", 1.0 if n.ready else 0.0)
        yield _single("kvmesh_node_draining", 1.0 if n.draining else 0.0)
        states = Counter(m.state for m in core.members())
        yield _labelled("kvmesh_mesh_members", (((s,), states[s]) for s in _MEMBER_STATES))
        yield _labelled(
            "kvmesh_mesh_member_events_total", (((k,), v) for k, v in sorted(n.mesh.member_events.items()))
        )
        counters = core.counters
        msgs, payload = family("kvmesh_mesh_messages_total"), family("kvmesh_mesh_payload_bytes_total")
        for key, value in counters.snapshot().items():
            direction, _, rest = key.partition(".")
            kind, _, what = rest.rpartition(".")
            if direction in _DIRECTION and what in ("msgs", "bytes"):
                (msgs if what == "msgs" else payload).add_metric([_DIRECTION[direction], kind], value)
        yield msgs
        yield payload
        lags = sorted(core.lag.by_peer.items())
        yield _labelled("kvmesh_mesh_convergence_lag_seconds", (((peer,), lag) for peer, (lag, _) in lags))
        yield _single("kvmesh_mesh_state_bytes", self._replicated_bytes())
        entries = []
        for eid in sorted(n.engines):
            rep = core.state.logs.get(eid)
            if rep is not None and rep.current is not None:
                entries.append(((eid,), len(rep.current)))
        yield _labelled("kvmesh_mesh_log_entries", entries)
        yield _single("kvmesh_mesh_log_compactions_total", counters.get("log.compactions"))
        yield _labelled(
            "kvmesh_mesh_ownership_changes_total",
            (((change,), counters.get(key)) for change, key in _OWNERSHIP.items()),
        )
        yield _single("kvmesh_mesh_owned_engines", len(core.owned()))
        yield _single("kvmesh_mesh_gossip_queue_bytes", core.gossip.queued_bytes)
        yield _labelled(
            "kvmesh_tls_cert_expiry_timestamp_seconds", (((k,), v) for k, v in sorted(n.cert_expiry.items()))
        )

    def _replicated_bytes(self) -> int:
        size, at = self._state_bytes
        now = self._clock()
        if now - at >= _STATE_BYTES_MAX_AGE:
            size = self.node.core.state.encoded_size()
            self._state_bytes = (size, now)
        return size

    def _discovery(self) -> Iterator[Metric]:
        """Engine discovery, per DNS name (families without samples when it is off)."""
        d = self.node.discovery
        stats = sorted(d.stats.items()) if d is not None else []
        yield _labelled("kvmesh_discovery_failures_total", (((name,), st.failures) for name, st in stats))
        yield _labelled("kvmesh_discovery_addresses", (((name,), st.addresses) for name, st in stats))
        changes = family("kvmesh_discovery_changes_total")
        for name, st in stats:
            changes.add_metric([name, "registered"], st.registered)
            changes.add_metric([name, "removed"], st.removed)
        yield changes

    def _transport(self) -> Iterator[Metric]:
        t = self.node.mesh.transport.stats
        yield _labelled("kvmesh_mesh_bytes_total", [(("in",), t.bytes_received), (("out",), t.bytes_sent)])
        yield _labelled(
            "kvmesh_mesh_transport_errors_total",
            [
                (("send_failed",), t.send_failures),
                (("dropped",), t.dropped_backpressure),
                (("refused",), t.refused),
                (("rejected",), t.rejected),
            ],
        )


def node_registry(node: Any) -> CollectorRegistry:
    """A registry of its own for ``node`` (a RouterNode)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry


# --- the HTTP endpoint -----------------------------------------------------------------------------


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ValueError otherwise."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--metrics-listen {listen!r}: want HOST:PORT")
    return host.strip("[]"), int(port)


def server_ssl_context(auth: ApiAuthConfig) -> ssl.SSLContext | None:
    """HTTPS with the public API's certificate (and its client CA), or None."""
    if not auth.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(auth.tls_cert, auth.tls_key)
    if auth.tls_client_ca:
        ctx.load_verify_locations(auth.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class MetricsServer:
    """``GET /metrics`` (Prometheus text format) on the running event loop."""

    def __init__(
        self,
        registry: CollectorRegistry,
        tokens: TokenTable | None = None,
        ssl_context: ssl.SSLContext | None = None,
        on_refused: Refused | None = None,
    ) -> None:
        self.registry = registry
        self.tokens = tokens
        self.ssl_context = ssl_context
        self.on_refused = on_refused
        self.address = ""  # HOST:PORT once started
        self._runner: web.AppRunner | None = None

    async def start(self, listen: str) -> str:
        """Listen on ``listen`` (port 0: a free one); returns HOST:PORT
        ("" for no address: metrics off). OSError if it cannot be bound."""
        if not listen:
            return ""
        host, port = split_listen(listen)
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise OSError(f"cannot serve metrics on {listen}: {e}") from None
        self._runner = runner
        bound = runner.addresses[0][1] if runner.addresses else port
        self.address = f"{host}:{bound}"
        return self.address

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if self.tokens is not None:
            auth = request.headers.get("Authorization")
            if self.tokens.role_of(auth) is None:
                reason = "bad_token" if auth else "no_token"
                named: dict[str, str] = {}
                if self.on_refused is not None:
                    peer = request.remote or ""
                    rid = self.on_refused("UNAUTHENTICATED", reason, "GET /metrics", peer=peer)
                    named = {"x-request-id": rid}  # as the node's log line names it
                return web.Response(
                    status=401,
                    text=f"{reason}: /metrics needs 'Authorization: Bearer TOKEN'\n",
                    headers={"WWW-Authenticate": 'Bearer realm="kvmesh"', **named},
                )
        body = generate_latest(self.registry)
        resp = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            resp.enable_compression()
        return resp

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
