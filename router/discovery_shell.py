"""The engine discovery shell: resolves every ``--engines-from-dns`` name once
per ``--discovery-interval`` and carries out what
:class:`router.discovery.DiscoveryCore` decides (the rules, and why, are in
:mod:`router.discovery`), through the node's mesh-wide
``register_engine`` / ``deregister_engine``.

Resolution is the system resolver (``loop.getaddrinfo``, IPv4, so search
domains and ``/etc/hosts`` apply: a bare Service name works inside its
namespace). NXDOMAIN and "no address" (``EAI_NONAME``, ``EAI_NODATA``) are an
empty answer. Anything else (``EAI_AGAIN``, a server failure, no answer
within the interval) is a failed resolution: nothing changes, it is counted
(``NameStats.failures``, exported as ``kvmesh_discovery_failures_total``) and
logged (``router.discovery_failed``) at the first failure of a streak, then
at most once per :data:`FAIL_LOG_PERIOD` with the count since;
``router.discovery_recovered`` ends the streak.

The first resolution waits until the node is ready (joined the mesh and
applied a peer's state): before that the registry is not the mesh's, and the
node would register again what others already did.

Log events (``name`` is the DNS name): ``router.discovery_resolved`` at a
name's first answer and whenever it changes (a warning when it is empty);
``router.engine_discovered`` (``engine``, ``addr``) when this node
registered an engine for a new address; ``router.engine_spec_updated`` when
it rewrote one (the owner, after a template change); ``router.engine_gone``
(``engine``, ``addr``, ``absent_for``) when it removed one (the owner, after
the grace); ``router.discovery_conflict`` when an engine id is held by
another source, ``router.discovery_refused`` when an address or its spec
could not be registered (each once until it changes).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from router.discovery import DiscoveryConfig, DiscoveryCore, Plan
from router.engine_registry import EngineSpec

__all__ = ["FAIL_LOG_PERIOD", "EngineDiscovery", "NameStats", "Resolver", "resolve_ipv4"]

FAIL_LOG_PERIOD = 60.0  # seconds between repeated lines of one failure streak
_READY_POLL = 0.1  # seconds between checks that the node is ready
_NO_ADDRESS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}

# name -> its IPv4 addresses ([] when it has none); OSError when resolution failed
Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve_ipv4(name: str) -> list[str]:
    """Every IPv4 address of ``name``; [] if it does not exist or has none."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            name, None, family=socket.AF_INET, type=socket.SOCK_STREAM
        )
    except socket.gaierror as e:
        if e.errno in _NO_ADDRESS:
            return []
        raise
    return sorted({str(info[4][0]) for info in infos})


@dataclass(slots=True)
class NameStats:
    """One name's discovery, as this node saw it (for metrics)."""

    resolutions: int = 0  # successful ones
    failures: int = 0
    addresses: int = 0  # in the last successful answer
    registered: int = 0  # engines this node registered or updated
    removed: int = 0  # engines this node removed


@dataclass(slots=True)
class _Streak:
    failures: int = 0
    logged_at: float = 0.0
    unlogged: int = 0


class EngineDiscovery:
    def __init__(
        self,
        config: DiscoveryConfig,
        register: Callable[[EngineSpec], Awaitable[object]],
        deregister: Callable[[str], Awaitable[bool]],
        registered: Callable[[], Mapping[str, Mapping[str, Any]]],
        decides: Callable[[str], bool],
        ready: Callable[[], bool],
        log: structlog.typing.FilteringBoundLogger,
        resolver: Resolver = resolve_ipv4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``registered``: the mesh registry (engine id -> spec fields);
        ``decides(engine_id)``: whether this node owns that engine."""
        self.config = config
        self.cores = [DiscoveryCore(s, config.grace) for s in config.sources()]
        self.stats = {c.source.name: NameStats() for c in self.cores}
        self._register = register
        self._deregister = deregister
        self._registered = registered
        self._decides = decides
        self._ready = ready
        self._log = log
        self._resolve = resolver
        self._clock = clock
        self._streaks = {c.source.name: _Streak() for c in self.cores}
        self._reported: dict[str, set[str]] = {c.source.name: set() for c in self.cores}

    async def run(self) -> None:
        while not self._ready():
            await asyncio.sleep(_READY_POLL)
        while True:
            for core in self.cores:
                try:
                    await self.round(core)
                except Exception:  # a bug in one round must not end discovery for good
                    self._log.exception("router.discovery_round_failed", name=core.source.name)
            await asyncio.sleep(self.config.interval)

    async def round(self, core: DiscoveryCore) -> Plan | None:
        """Resolve one name and act on the answer; None if resolution failed."""
        name = core.source.name
        st = self.stats[name]
        try:
            addrs = await asyncio.wait_for(self._resolve(name), self.config.interval)
        except (OSError, TimeoutError) as e:
            st.failures += 1
            self._failed(name, e)
            return None
        st.resolutions += 1
        st.addresses = len(set(addrs))
        self._recovered(name)
        answer = sorted(set(addrs))
        if answer != core.addresses or st.resolutions == 1:
            # An empty answer is worth a warning: a mistyped name resolves to nothing.
            say = self._log.info if answer else self._log.warning
            say("router.discovery_resolved", name=name, addrs=answer)
        plan = core.observe(addrs, self._specs(), self._decides, self._clock())
        await self._carry_out(core, plan)
        return plan

    def _specs(self) -> dict[str, EngineSpec]:
        out = {}
        for eid, fields in self._registered().items():
            try:
                out[eid] = EngineSpec(**fields)
            except TypeError:  # fields this version does not know: not a spec of ours
                continue
        return out

    async def _carry_out(self, core: DiscoveryCore, plan: Plan) -> None:
        name = core.source.name
        st = self.stats[name]
        before, now_reported = self._reported[name], set[str]()

        def once(key: str) -> bool:
            """Whether to log ``key``: not if it was reported in the round before."""
            now_reported.add(key)
            return key not in before

        for r in plan.register:
            eid = r.spec.engine_id
            try:
                await self._register(r.spec)
            except ValueError as e:  # EngineSpecError: e.g. a block size other engines of the model lack
                if once(f"spec:{r.spec}"):
                    self._log.error(
                        "router.discovery_refused", name=name, engine=eid, addr=r.addr, error=str(e)
                    )
                continue
            st.registered += 1
            event = "router.engine_spec_updated" if r.update else "router.engine_discovered"
            self._log.info(event, name=name, engine=eid, addr=r.addr, endpoint=r.spec.endpoint)
        for g in plan.remove:
            if await self._deregister(g.engine_id):
                st.removed += 1
                gone_for = round(g.absent_for, 3)
                self._log.info(
                    "router.engine_gone", name=name, engine=g.engine_id, addr=g.addr, absent_for=gone_for
                )
        for eid in plan.conflicts:
            if once(f"conflict:{eid}"):
                self._log.warning(
                    "router.discovery_conflict", name=name, engine=eid, held_by="another source"
                )
        for addr in plan.refused:
            if once(f"addr:{addr}"):
                self._log.error("router.discovery_refused", name=name, addr=addr, error="no usable spec")
        self._reported[name] = now_reported

    def _failed(self, name: str, e: BaseException) -> None:
        s = self._streaks[name]
        s.failures += 1
        now = self._clock()
        if s.failures == 1 or now - s.logged_at >= FAIL_LOG_PERIOD:
            self._log.warning(
                "router.discovery_failed",
                name=name,
                error=str(e) or type(e).__name__,
                failures_in_a_row=s.failures,
                suppressed_before=s.unlogged,
            )
            s.logged_at, s.unlogged = now, 0
        else:
            s.unlogged += 1

    def _recovered(self, name: str) -> None:
        s = self._streaks[name]
        if s.failures:
            self._log.info("router.discovery_recovered", name=name, failures_in_a_row=s.failures)
            self._streaks[name] = _Streak()
