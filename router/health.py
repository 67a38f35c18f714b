"""Engine health: every node probes every registered engine's ``/health``
itself (health is not gossiped: what matters is whether *this* node can
reach the engine), and routes only to engines that answer.

An engine is marked down after ``down_after`` probes in a row fail, and up
again at the first that passes: a node whose own event loop is saturated
answers its probes late, and one late answer must not take a working engine
out of the fleet (which would only move the load onto the others).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from router.engine_registry import EngineTable

__all__ = ["HealthPoller"]


class HealthPoller:
    def __init__(
        self,
        engines: EngineTable,
        probe: Callable[[str], Awaitable[bool]],
        interval: float,
        log: structlog.typing.FilteringBoundLogger,
        context_window: Callable[[str, str], Awaitable[int | None]] | None = None,
        down_after: int = 2,
    ) -> None:
        """``probe(endpoint)`` answers whether the engine at ``endpoint`` is
        healthy; ``context_window(endpoint, model)`` its ``max_model_len``
        (asked once per engine, when it is healthy)."""
        self._engines = engines
        self._probe = probe
        self._context_window = context_window
        self.interval = interval
        self.down_after = max(1, down_after)
        self._log = log

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.poll()

    async def poll(self) -> None:
        """Probe every engine at once and record the answers."""
        records = self._engines.values()
        results = await asyncio.gather(
            *(self._probe(r.spec.endpoint) for r in records), return_exceptions=True
        )
        for rec, ok in zip(records, results):
            rec.failed_probes = 0 if ok is True else rec.failed_probes + 1
            healthy = rec.failed_probes < self.down_after
            if healthy != rec.healthy:
                self._log.warning("router.engine_health_changed", engine=rec.spec.engine_id, healthy=healthy)
            rec.healthy = healthy
        await self._learn_context_windows()

    async def _learn_context_windows(self) -> None:
        if self._context_window is None:
            return
        todo = [r for r in self._engines.values() if r.healthy and r.max_model_len is None]
        answers = await asyncio.gather(
            *(self._context_window(r.spec.endpoint, r.spec.model) for r in todo), return_exceptions=True
        )
        for rec, n in zip(todo, answers):
            if isinstance(n, int) and n > 0:
                rec.max_model_len = n
                self._log.info("router.engine_context_window", engine=rec.spec.engine_id, max_model_len=n)
