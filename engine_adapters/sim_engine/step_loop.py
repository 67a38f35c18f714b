"""The simulated engine's step loop: the clock that drives the pure core.

One iteration is one engine step::

    plan = core.schedule(now)            # admit waiting requests, reserve KV blocks
    sleep until the step's deadline      # the timing model's duration
    outputs = core.complete(plan, now)   # one sampled token per due request
    publish(core.drain_events())         # the step's KV events as ONE KVEventBatch
    hand each token to its request's queue

With nothing to run the loop still publishes (an ``AllBlocksCleared`` from
``POST /admin/clear`` goes out in order, while idle) and sleeps until
:meth:`StepLoop.wake`.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from engine_adapters.kv_events import KVEventBatch
from engine_adapters.sim_engine.core import EngineCore
from engine_adapters.sim_engine.metrics import EngineMetrics
from engine_adapters.sim_engine.publisher import ZmqEventPublisher
from engine_adapters.sim_engine.token_stream import PendingRequest

log = structlog.get_logger(__name__)

# How far behind the wall clock the loop may fall and still catch up by
# shortening later steps; beyond it the lost time is forgotten, so a long
# stall does not turn into a burst of zero-length steps.
_MAX_CATCHUP_S = 0.005


class StepLoop:
    def __init__(
        self,
        core: EngineCore,
        metrics: EngineMetrics,
        pending: dict[str, PendingRequest],
        publisher: ZmqEventPublisher | None,
        data_parallel_rank: int,
    ) -> None:
        self._core = core
        self._metrics = metrics
        self._pending = pending
        self._publisher = publisher
        self._rank = data_parallel_rank
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New work (a request, an abort, a cache clear): stop idling."""
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        core, metrics = self._core, self._metrics
        deadline = loop.time()
        while True:
            now = loop.time()
            plan = core.schedule(now)
            if plan is None:
                self._publish()  # e.g. an AllBlocksCleared while idle
                metrics.sample(core)
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
                continue
            for req in plan.admitted:
                metrics.admitted(req)
            # Deadline-based: timer overshoot and per-step overhead are made up
            # by the next steps (up to _MAX_CATCHUP_S), so simulated time keeps
            # pace with the wall clock. Always yield, so HTTP is served.
            deadline = max(deadline, now - _MAX_CATCHUP_S) + plan.duration
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            now = loop.time()
            outs = core.complete(plan, now)
            self._publish()
            for out in outs:
                running = out.running
                if running.generated == 1 and running.first_token_at is not None:
                    metrics.ttft.observe(running.first_token_at - running.arrival)
                metrics.generation_tokens.inc()
                pend = self._pending.get(out.request_id)
                if pend is not None:
                    pend.queue.put_nowait(out)
            metrics.sample(core)

    def _publish(self) -> None:
        events = self._core.drain_events()
        if not events or self._publisher is None:
            return
        seq = self._publisher.publish(
            KVEventBatch(ts=time.time(), events=events, data_parallel_rank=self._rank)
        )
        self._metrics.event_batches.inc()
        log.debug("sim.kv_events_published", seq=seq, events=len(events))
