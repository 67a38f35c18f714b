"""Seed names resolved again while a node runs (router/addresses.py,
``MeshShell.refresh_seeds``) and the flags of the two knobs of issue 9
(``--seed-refresh-interval``, ``--replay-probe-after``)."""

from __future__ import annotations

import argparse
import asyncio
import time

import pytest
import structlog

from engine_adapters.event_adapter import EventAdapterConfig
from kvmesh.cli.router import config_from_args, configure_parser
from mesh.core import MeshConfig
from router.addresses import resolve_seeds, resolve_seeds_now
from router.config import RouterConfig
from router.index import PrefixIndex
from router.load import MeshLoad
from router.mesh_shell import MeshShell


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    configure_parser(p)
    return p.parse_args(list(argv))


def test_flags_default_to_the_config_and_set_their_fields() -> None:
    cfg = config_from_args(_args())
    assert cfg.seed_refresh_interval == RouterConfig().seed_refresh_interval
    assert cfg.event_adapter == EventAdapterConfig()
    cfg = config_from_args(_args("--seed-refresh-interval=5", "--replay-probe-after=0.5"))
    assert cfg.seed_refresh_interval == 5.0
    assert cfg.event_adapter.replay_probe_after == 0.5
    assert config_from_args(_args("--replay-probe-after=0")).event_adapter.replay_probe_after == 0
    with pytest.raises(ValueError, match="replay_probe_after"):
        config_from_args(_args("--replay-probe-after=-1"))
    with pytest.raises(ValueError, match="--seed-refresh-interval must be > 0"):
        config_from_args(_args("--seed-refresh-interval=0"))


async def test_resolving_now_skips_names_that_fail_and_this_node_by_any_name() -> None:
    got = await resolve_seeds_now(["no-such-host.invalid:1", "127.0.0.1:7000", "127.0.0.1:7001"], "x:1")
    assert got == ["127.0.0.1:7000", "127.0.0.1:7001"]
    # A node advertised by DNS name finds itself among the seeds by address.
    assert await resolve_seeds_now(["127.0.0.1:7000", "127.0.0.1:7001"], "localhost:7000") == [
        "127.0.0.1:7001"
    ]
    assert await resolve_seeds(["127.0.0.1:7000"], "localhost:7000", 1.0, 0.1) == []


def _shell() -> MeshShell:
    return MeshShell(
        "n1",
        "127.0.0.1:1",
        MeshConfig(),
        time.monotonic,
        PrefixIndex(),
        MeshLoad(),
        lambda effect: None,
        structlog.get_logger(),
    )


async def test_refresh_asks_every_retry_while_alone_and_hands_the_addresses_to_the_core() -> None:
    shell = _shell()
    shell.core.join([], time.monotonic())
    calls: list[tuple[list[str], str]] = []

    async def resolve(names: list[str], me: str) -> list[str]:
        calls.append((names, me))
        if len(calls) == 2:
            raise RuntimeError("a resolver bug")  # logged; the refreshes go on
        return ["127.0.0.1:2"] if len(calls) > 2 else []

    task = asyncio.create_task(shell.refresh_seeds(["seeds:1"], 0.02, 60.0, resolve))
    try:
        deadline = time.monotonic() + 5
        while len(calls) < 4:
            assert time.monotonic() < deadline, calls
            await asyncio.sleep(0.01)
        assert calls[0] == (["seeds:1"], "127.0.0.1:1")
        # The new address got this node's member list (a push-pull), once per backoff.
        assert shell.core.stats()["sent.PushPull.msgs"] == 1
        assert shell.transport.stats.messages_sent >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await shell.close()


async def test_no_names_no_refresh() -> None:
    shell = _shell()

    async def resolve(names: list[str], me: str) -> list[str]:
        raise AssertionError("never asked")

    await asyncio.wait_for(shell.refresh_seeds([], 0.01, 0.01, resolve), 1.0)
    await shell.close()
