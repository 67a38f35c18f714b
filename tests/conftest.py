"""Fixtures for every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _structlog_config_restored() -> Iterator[None]:
    """Each test gets structlog as the test before found it: code under test
    that quiets logging (the simulation, the benchmarks) must not hide the
    warnings a later test captures."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
