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

from router.engine_registry import EngineRecord, EngineTable

__all__ = ["HealthPoller"]


class HealthPoller:
    def __init__(
        self,
        engines: EngineTable,
        probe: Callable[[str], Awaitable[bool]],
        interval: float,
        log: structlog.typing.FilteringBoundLogger,
        served_models: Callable[[str], Awaitable[dict[str, int | None] | None]] | None = None,
        down_after: int = 2,
        on_down: Callable[[EngineRecord], None] | None = None,
    ) -> None:
        """``probe(endpoint)`` answers whether the engine at ``endpoint`` is
        healthy; ``served_models(endpoint)`` the models it serves, each with
        its ``max_model_len`` (asked of a healthy engine until its context
        window is known); ``on_down(record)`` is called when an engine is
        marked down."""
        self._engines = engines
        self._probe = probe
        self._served_models = served_models
        self.interval = interval
        self.down_after = max(1, down_after)
        self._log = log
        self._on_down = on_down

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
        went_down = []
        for rec, ok in zip(records, results):
            rec.failed_probes = 0 if ok is True else rec.failed_probes + 1
            healthy = rec.failed_probes < self.down_after
            if healthy != rec.healthy:
                self._log.warning("router.engine_health_changed", engine=rec.spec.engine_id, healthy=healthy)
                if not healthy:
                    went_down.append(rec)
            rec.healthy = healthy
        if self._on_down is not None:
            for rec in went_down:  # once every engine's health is this poll's
                self._on_down(rec)
        await self._learn_context_windows()

    async def _learn_context_windows(self) -> None:
        """Each engine's context window, and a warning for an engine that
        does not serve the model it was registered with (``model=`` left out
        or misspelt): vLLM answers a request for another model with a 404."""
        if self._served_models is None:
            return
        todo = [r for r in self._engines.values() if r.healthy and r.max_model_len is None]
        answers = await asyncio.gather(
            *(self._served_models(r.spec.endpoint) for r in todo), return_exceptions=True
        )
        for rec, served in zip(todo, answers):
            if not isinstance(served, dict) or not served:
                continue  # no answer, or an engine that lists nothing: nothing to judge
            model = rec.spec.model
            if model not in served:
                if not rec.model_missing:
                    rec.model_missing = True
                    self._log.warning(
                        "router.engine_model_not_served",
                        engine=rec.spec.engine_id,
                        model=model,
                        served=sorted(served),
                    )
                continue
            if rec.model_missing:
                rec.model_missing = False
                self._log.info("router.engine_model_served", engine=rec.spec.engine_id, model=model)
            n = served[model]
            if n is not None and n > 0:
                rec.max_model_len = n
                self._log.info("router.engine_context_window", engine=rec.spec.engine_id, max_model_len=n)
