"""Waiting in async tests for a condition that other tasks or processes make true."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def eventually(
    pred: Callable[[], Any | Awaitable[Any]], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """The first truthy value of ``pred()`` (sync or async), polled every
    ``interval`` s; AssertionError naming ``what`` and the last value after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")
