"""router/logs.py: the level is a processor, so loggers bound before a change follow it."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from router import logs


@pytest.fixture
def captured():
    buf = io.StringIO()
    logs.configure_logging("warning", "json")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buf))
    yield buf
    logs.configure_logging("info", "console")


def test_a_logger_bound_before_a_level_change_follows_it(captured: io.StringIO) -> None:
    log = structlog.get_logger("t").bind(node="n1")
    log.info("t.before")
    assert logs.set_log_level("debug") == "warning"
    log.debug("t.after", engine="e1")
    lines = [json.loads(x) for x in captured.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["t.after"]
    assert lines[0] | {"timestamp": None} == {
        "event": "t.after", "node": "n1", "engine": "e1", "level": "debug", "timestamp": None,
    }  # fmt: skip


def test_toggle_returns_to_the_configured_level_and_bad_levels_are_refused(captured: io.StringIO) -> None:
    assert logs.toggle_debug() == "debug"
    assert logs.toggle_debug() == "warning"
    logs.set_log_level("error")
    assert logs.toggle_debug() == "debug" and logs.toggle_debug() == "warning"
    with pytest.raises(ValueError, match="unknown log level"):
        logs.set_log_level("loud")
    assert logs.get_log_level() == "warning"
    log = structlog.get_logger("t")
    log.warning("t.kept")
    log.exception("t.error_kept")
    logs.set_log_level("error")
    log.warning("t.dropped")
    assert [json.loads(x)["event"] for x in captured.getvalue().splitlines()] == ["t.kept", "t.error_kept"]


def test_an_event_below_the_level_reaches_no_processor(captured: io.StringIO) -> None:
    seen: list[str] = []

    def record(_logger: object, method: str, event: dict) -> dict:
        seen.append(method)
        return event

    structlog.configure(processors=[record, *structlog.get_config()["processors"]])
    log = structlog.get_logger("t").bind(node="n1")
    log.debug("t.debug")
    log.info("t.info")
    log.warning("t.warning")
    logs.set_log_level("error")
    log.warning("t.dropped")
    log.error("t.error")
    assert seen == ["warning", "error"]
    assert [json.loads(x)["event"] for x in captured.getvalue().splitlines()] == ["t.warning", "t.error"]


def test_a_json_line_carries_the_traceback_of_log_exception(captured: io.StringIO) -> None:
    log = structlog.get_logger("t").bind(node="n1")
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.exception("t.crashed")
    (line,) = [json.loads(x) for x in captured.getvalue().splitlines()]
    assert line["event"] == "t.crashed" and line["level"] == "error" and line["node"] == "n1"
    assert "Traceback" in line["exception"] and "ZeroDivisionError: boom" in line["exception"]
