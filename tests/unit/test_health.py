"""The engine health poller: down after failed probes in a row, up at the
first good one; each engine's context window learned once."""

from __future__ import annotations

import structlog

from router.engine_registry import EngineSpec, EngineTable
from router.health import HealthPoller


async def test_one_late_answer_does_not_take_an_engine_out() -> None:
    table = EngineTable()
    table.put(EngineSpec("e1", "http://e1:80").validate())
    answers: list[bool] = []
    asked: list[str] = []

    async def probe(endpoint: str) -> bool:
        return answers.pop(0)

    async def window(endpoint: str, model: str) -> int | None:
        asked.append(endpoint)
        return 8192

    poller = HealthPoller(table, probe, 1.0, structlog.get_logger(), window, down_after=2)
    seen = []
    for ok in (True, False, True, False, False, False, True):
        answers.append(ok)
        await poller.poll()
        seen.append(table["e1"].healthy)
    assert seen == [True, True, True, True, False, False, True]
    assert table["e1"].max_model_len == 8192 and asked == ["http://e1:80"]  # asked once
