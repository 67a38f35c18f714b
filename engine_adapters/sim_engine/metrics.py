"""The simulated engine's Prometheus metrics (``GET /metrics``).

Names, help and buckets follow vLLM's (``vllm:*``, labelled ``model_name``),
so dashboards and scrapers written for vLLM read the simulator unchanged;
``kvmesh_sim_*`` are the simulator's own. Each process has its own registry
so several engines can live in one test process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine_adapters.sim_engine.core import EngineCore
from engine_adapters.sim_engine.timing import RunningRequest

# vLLM's buckets for these two histograms.
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
)  # fmt: skip


class EngineMetrics:
    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        r, lbl = self.registry, ["model_name"]
        self.running = Gauge(
            "vllm:num_requests_running", "Requests in the running batch", lbl, registry=r
        ).labels(model)
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be admitted", lbl, registry=r
        ).labels(model)
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = 100%)", lbl, registry=r
        ).labels(model)
        self.cached_blocks = Gauge(
            "kvmesh_sim_cached_blocks", "Blocks in the prefix cache", lbl, registry=r
        ).labels(model)
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", lbl, registry=r
        ).labels(model)
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", lbl, registry=r
        ).labels(model)
        # vLLM counts the hits of its KV connectors (CPU offloading among them) apart.
        self.external_hits = Counter(
            "vllm:external_prefix_cache_hits",
            "Prompt tokens loaded from the host tier instead of recomputed",
            lbl,
            registry=r,
        ).labels(model)
        self.host_cached_blocks = Gauge(
            "kvmesh_sim_host_cached_blocks", "Blocks on the host tier", lbl, registry=r
        ).labels(model)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", lbl, registry=r).labels(
            model
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated", lbl, registry=r
        ).labels(model)
        self.success = Counter(
            "vllm:request_success", "Finished requests", lbl + ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token", lbl, buckets=_TTFT_BUCKETS, registry=r
        ).labels(model)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency",
            lbl,
            buckets=_E2E_BUCKETS,
            registry=r,
        ).labels(model)
        self.rejected = Counter(
            "kvmesh_sim_requests_rejected", "Requests refused before admission", lbl + ["reason"], registry=r
        )
        self.aborted = Counter(
            "kvmesh_sim_requests_aborted", "Requests aborted (client went away)", lbl, registry=r
        ).labels(model)
        self.event_batches = Counter(
            "kvmesh_sim_kv_event_batches", "KV event batches published", lbl, registry=r
        ).labels(model)
        self.admitted_by_model = Counter(
            "kvmesh_sim_requests_admitted",
            "Requests admitted, by the model or LoRA adapter serving them",
            lbl + ["served_model"],
            registry=r,
        )

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model, reason).inc()

    def served(self, served_model: str) -> None:
        """A request was accepted for ``served_model`` (the model or one of its adapters)."""
        self.admitted_by_model.labels(self.model, served_model).inc()

    def admitted(self, req: RunningRequest) -> None:
        """A request got its KV blocks: count its prompt and its cache hit."""
        self.prefix_queries.inc(req.prompt_len)
        self.prefix_hits.inc(req.num_cached - req.num_loaded)
        self.external_hits.inc(req.num_loaded)
        self.prompt_tokens.inc(req.prompt_len)

    def finished(self, reason: str, e2e_seconds: float) -> None:
        self.success.labels(self.model, reason).inc()
        self.e2e.observe(e2e_seconds)

    def sample(self, core: EngineCore) -> None:
        """Set the gauges from the core's current state."""
        self.running.set(core.num_running)
        self.waiting.set(core.num_waiting)
        self.kv_usage.set(core.cache.usage())
        self.cached_blocks.set(core.cache.num_cached())
        self.host_cached_blocks.set(core.cache.stats().host_cached)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
