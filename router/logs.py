"""structlog set-up shared by every kvmesh process.

One event per line: ``area.event`` names with the ids that say where
(``node``, ``engine``, ``worker``, ``request_id``), as key-value text or as
JSON (``--log-format json``, the image's default: one object per line for a
log pipeline).

The level can change while the process runs (``Admin.SetLogLevel``, or
SIGHUP, which toggles debug on and off). Loggers are bound once and kept by
the objects that log (a node binds its id into its logger), so the level is
not baked into them: the loggers' ``debug``, ``info`` and ``warning``
methods compare the event's level with the current one before any
processor runs (an event of the request path that the level drops costs a
comparison), and a processor at the head of the chain drops what those
methods do not see (``log()``, the async methods).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

__all__ = [
    "LOG_LEVELS",
    "configure_logging",
    "get_log_level",
    "line_processors",
    "set_log_level",
    "toggle_debug",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
_NUMERIC = {name: getattr(logging, name.upper()) for name in LOG_LEVELS}
# structlog method names -> numeric level (``exception`` logs at error).
_METHOD_LEVEL = {
    **_NUMERIC,
    "warn": logging.WARNING,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _Level:
    """The process's current level, and the one it was started with (what
    a second SIGHUP returns to)."""

    current = logging.INFO
    configured = logging.INFO


def _drop_below_level(_logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _METHOD_LEVEL.get(method, logging.INFO) < _Level.current:
        raise structlog.DropEvent
    return event


# Every method of structlog's own filtering logger; the subclass below puts
# the current level in front of those a hot path may call.
_UNFILTERED = structlog.make_filtering_bound_logger(logging.NOTSET)


def _below_level_returns(name: str) -> Callable[..., Any]:
    level, emit = _METHOD_LEVEL[name], getattr(_UNFILTERED, name)

    def meth(self: Any, event: str, *args: Any, **kw: Any) -> Any:
        if level < _Level.current:
            return None
        return emit(self, event, *args, **kw)

    meth.__name__ = name
    return meth


_LevelFilteringLogger: type[structlog.typing.FilteringBoundLogger] = type(
    "_LevelFilteringLogger",
    (_UNFILTERED,),
    {name: _below_level_returns(name) for name in ("debug", "info", "warning", "warn")},
)


def _check(level: str) -> int:
    if level not in _NUMERIC:
        raise ValueError(f"unknown log level {level!r}; known: {', '.join(LOG_LEVELS)}")
    return _NUMERIC[level]


def get_log_level() -> str:
    return logging.getLevelName(_Level.current).lower()


def set_log_level(level: str) -> str:
    """Log at ``level`` from now on; returns the level before (ValueError if unknown)."""
    before = get_log_level()
    _Level.current = _check(level)
    return before


def toggle_debug() -> str:
    """Debug if not at debug, else back to the configured level; returns the new level."""
    _Level.current = _Level.configured if _Level.current == logging.DEBUG else logging.DEBUG
    return get_log_level()


def line_processors(fmt: str) -> list[structlog.typing.Processor]:
    """What makes an event one line of ``fmt`` (console or json): the
    context, the level, a UTC timestamp, the renderer. Every kvmesh process
    writes its lines with these (the router, the simulated engine)."""
    renderer: list[structlog.typing.Processor]
    if fmt == "json":
        # The traceback of log.exception as a string field: JSON has no exc_info.
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=False)]
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *renderer,
    ]


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    _Level.current = _Level.configured = _check(level)
    structlog.configure(
        processors=[_drop_below_level, *line_processors(fmt)],
        wrapper_class=_LevelFilteringLogger,
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
