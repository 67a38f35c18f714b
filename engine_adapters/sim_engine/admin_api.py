"""Operational and test endpoints of the simulated engine.

- ``GET /health`` (200 while serving), ``GET /metrics`` (Prometheus, vLLM
  metric names; ``metrics.py``).
- ``GET /admin/cache``: the cached blocks ``[{hash, parent, tokens}]``, what
  a correct router index must reflect; ``?tier=host``: the host tier's.
- ``GET /admin/stats``: pool, cache, host tier and queue figures, the
  prompt tokens looked up and found (``prefix_query_tokens``,
  ``prefix_hit_tokens`` on the GPU, ``host_hit_tokens`` loaded from the host
  tier), the sequence number of the next KV-event batch, and ``served``:
  admitted requests by the model or LoRA adapter that served them.
- ``POST /admin/drop_events {"count": n}``: fault injection, the next n event
  batches are lost on PUB but stay replayable (``publisher.py``).
- ``POST /admin/clear``: reset the prefix cache (vLLM's reset_prefix_cache),
  published as ``AllBlocksCleared``.
"""

from __future__ import annotations

import json

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engine_adapters.sim_engine.engine import SimEngine
from engine_adapters.sim_engine.requests import is_int
from engine_adapters.sim_engine.responses import error_response

log = structlog.get_logger(__name__)


class AdminApi:
    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/admin/cache", self.cache)
        app.router.add_get("/admin/stats", self.stats)
        app.router.add_post("/admin/drop_events", self.drop_events)
        app.router.add_post("/admin/clear", self.clear)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        m = self.engine.metrics
        m.sample(self.engine.core)
        return web.Response(body=m.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def cache(self, request: web.Request) -> web.Response:
        tier = request.query.get("tier", "gpu")
        cache = self.engine.core.cache
        if tier == "gpu":
            return web.json_response(cache.snapshot())
        if tier == "host":
            return web.json_response(cache.host_snapshot())
        return error_response(400, f"tier must be gpu or host, not {tier!r}", "tier")

    async def stats(self, request: web.Request) -> web.Response:
        core = self.engine.core
        pub = self.engine.publisher
        st = core.cache.stats()
        return web.json_response(
            {
                "block_size": core.cache.block_size,
                "num_gpu_blocks": st.num_blocks,
                "pinned_blocks": st.pinned,
                "cached_blocks": st.cached,
                "evictions": st.evictions,
                "num_host_blocks": st.host_blocks,
                "host_cached_blocks": st.host_cached,
                "host_evictions": st.host_evictions,
                "prefix_query_tokens": core.prefix_query_tokens,
                "prefix_hit_tokens": core.prefix_hit_tokens,
                "host_hit_tokens": core.host_hit_tokens,
                "running": core.num_running,
                "waiting": core.num_waiting,
                "next_seq": pub.next_seq if pub else None,
                "served": dict(self.engine.served),
            }
        )

    async def drop_events(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            count = body.get("count") if isinstance(body, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, 'body must be JSON {"count": n}')
        if not is_int(count) or count < 0:
            return error_response(400, "count must be an integer >= 0", "count")
        pub = self.engine.publisher
        if pub is None:
            return error_response(400, "KV events are disabled on this engine")
        pub.drop_next(count)
        log.info("sim.event_loss_injected", count=count)
        return web.json_response({"dropping": count})

    async def clear(self, request: web.Request) -> web.Response:
        self.engine.core.clear_cache()
        self.engine.steps.wake()  # the step loop publishes it, in order, even when idle
        log.info("sim.cache_cleared")
        return web.json_response({"cleared": True})
