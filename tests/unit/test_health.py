"""The engine health poller: down after failed probes in a row, up at the
first good one; each engine's context window learned once; an engine that
does not serve its registered model is warned of once."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs

from router.engine_registry import EngineSpec, EngineTable
from router.health import HealthPoller


async def test_one_late_answer_does_not_take_an_engine_out() -> None:
    table = EngineTable()
    table.put(EngineSpec("e1", "http://e1:80").validate())
    answers: list[bool] = []
    asked: list[str] = []

    async def probe(endpoint: str) -> bool:
        return answers.pop(0)

    async def window(endpoint: str) -> dict[str, int | None]:
        asked.append(endpoint)
        return {"sim-model": 8192}

    poller = HealthPoller(table, probe, 1.0, structlog.get_logger(), window, down_after=2)
    seen = []
    for ok in (True, False, True, False, False, False, True):
        answers.append(ok)
        await poller.poll()
        seen.append(table["e1"].healthy)
    assert seen == [True, True, True, True, False, False, True]
    assert table["e1"].max_model_len == 8192 and asked == ["http://e1:80"]  # asked once


async def test_an_engine_that_does_not_serve_its_model_is_warned_of_once() -> None:
    table = EngineTable()
    table.put(EngineSpec("e1", "http://e1:80", model="llama").validate())
    served: list[dict[str, int | None]] = [{"qwen": 4096}, {"qwen": 4096}, {"llama": None}, {"llama": 2048}]

    async def probe(endpoint: str) -> bool:
        return True

    async def models(endpoint: str) -> dict[str, int | None]:
        return served.pop(0)

    poller = HealthPoller(table, probe, 1.0, structlog.get_logger(), models)
    with capture_logs() as logs:
        for _ in range(4):
            await poller.poll()
    missing = [e for e in logs if e["event"] == "router.engine_model_not_served"]
    assert len(missing) == 1, logs  # once, not every poll
    assert (missing[0]["engine"], missing[0]["model"], missing[0]["served"]) == ("e1", "llama", ["qwen"])
    assert len([e for e in logs if e["event"] == "router.engine_model_served"]) == 1  # once it serves it
    # served without a context window, then with one: learned then, and not asked again
    assert table["e1"].max_model_len == 2048 and not table["e1"].model_missing
    await poller.poll()  # would pop an empty list if it asked again


async def test_requests_move_off_an_engine_marked_down_only_to_a_healthy_one() -> None:
    from router.config import RouterConfig
    from router.node import RouterNode

    node = RouterNode(RouterConfig(node_id="n1", insecure=True))
    for eid in ("a", "b", "solo"):
        model = "solo-model" if eid == "solo" else "m"
        node.engines.put(EngineSpec(eid, f"http://{eid}:80", model=model).validate())
    aborted: list[str] = []

    def abort_waiting(endpoint: str, why: str) -> int:
        aborted.append(endpoint)
        return 1

    node.client.abort_waiting = abort_waiting  # type: ignore[method-assign]
    up = {"http://a:80": True, "http://b:80": True, "http://solo:80": True}

    async def probe(endpoint: str) -> bool:
        return up[endpoint]

    poller = HealthPoller(
        node.engines, probe, 1.0, structlog.get_logger(), down_after=1, on_down=node._engine_went_down
    )
    up["http://a:80"] = up["http://solo:80"] = False
    await poller.poll()
    assert aborted == ["http://a:80"]  # b serves its model; nothing else serves solo's: its requests wait
    up["http://b:80"] = False
    await poller.poll()
    assert aborted == ["http://a:80"]  # b went down with no healthy engine left for m
