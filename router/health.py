"""Engine health: every node probes every registered engine's ``/health``
itself (health is not gossiped: what matters is whether *this* node can
reach the engine), and routes only to engines whose last probe passed.
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
    ) -> None:
        """``probe(endpoint)`` answers whether the engine at ``endpoint`` is healthy."""
        self._engines = engines
        self._probe = probe
        self.interval = interval
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
            healthy = ok is True
            if healthy != rec.healthy:
                self._log.warning("router.engine_health_changed", engine=rec.spec.engine_id, healthy=healthy)
            rec.healthy = healthy
