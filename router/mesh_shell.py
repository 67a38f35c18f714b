"""The mesh shell of a node: runs the pure :class:`mesh.core.MeshCore`.

The core decides and only returns outputs; this shell carries them out after
every input (a message from a peer, a tick, a registration, a batch of KV
deltas from an adapter this node owns): messages go to the transport, index
changes to this node's :class:`router.index.PrefixIndex`, effects (engines
added and removed, adapters to start and stop) to the node. Its loop ticks
the core at the core's next deadline and publishes this node's load slot
whenever it changed.

It also resolves the seed names (``--join``) again, every
``seed_resolve_retry`` seconds while the node has no peer and every
``seed_refresh_interval`` after, and hands the addresses to the core
(:meth:`mesh.core.MeshCore.add_seeds`): nodes started together behind one
DNS name may each have found only themselves at first, and then form
separate meshes that this merges. The timing lives here, not in the core,
because only the shell knows when a resolution finished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from mesh.core import MeshConfig, MeshCore
from mesh.effects import Effect, MemberChanged
from mesh.engine_log.packed import heads_of
from mesh.transport import MeshTransport, TransportConfig
from router.addresses import resolve_seeds_now
from router.index import PrefixIndex
from router.load import MeshLoad
from router.native_index import NativeIndex, apply_change

__all__ = ["MeshShell"]

# Bounds of the loop's sleep: the core's deadlines are honoured to within a
# couple of milliseconds, and the loop wakes at least this often to publish
# load changes that did not wake it.
_MIN_SLEEP = 0.002
_MAX_SLEEP = 0.05
_LEAVE_POLL = 0.05  # seconds between checks that the leave was sent

# seed names, this node's address -> the addresses they resolve to now
SeedResolver = Callable[[list[str], str], Awaitable[list[str]]]


class MeshShell:
    def __init__(
        self,
        node_id: str,
        addr: str,
        config: MeshConfig,
        clock: Callable[[], float],
        index: PrefixIndex,
        load: MeshLoad,
        on_effect: Callable[[Effect], None],
        log: structlog.typing.FilteringBoundLogger,
        transport: TransportConfig | None = None,
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        # Replicated entries reach a native index packed (decoded in Rust,
        # mesh/engine_log/packed.py), a Python index as KvDeltas.
        native = NativeIndex is not None and isinstance(index, NativeIndex)
        config = dataclasses.replace(config, packed_entries=native)
        # Never seeded from --seed: the mesh draws pycrdt client ids from this,
        # and two nodes (or one node before and after a restart) sharing a
        # client id would corrupt the replicated documents.
        self.core = MeshCore(node_id, addr, clock(), random.SystemRandom(), config)
        self.transport = MeshTransport(addr, self._deliver, transport)
        self._index = index
        self._load = load
        self._on_effect = on_effect
        self._log = log
        self._wake = asyncio.Event()
        self._closing = False
        self.member_events: Counter[str] = Counter()  # kinds of membership change seen

    def _deliver(self, msg: Any) -> None:
        self.core.handle(msg, self.clock())
        self.flush()

    def flush(self) -> None:
        """Carry out everything the core asked for since the last flush."""
        sends = self.core.take_sends()
        if sends:
            self.transport.send(sends)
        index = self._index
        for change in self.core.take_index_changes():
            try:
                apply_change(index, change)
            except ValueError as e:
                worker, seq = next(iter(heads_of(change)), ("", -1))
                self._log.error("router.bad_delta", worker=worker, seq=seq, error=str(e))
        for eff in self.core.take_effects():
            if isinstance(eff, MemberChanged):
                ev = eff.event
                self.member_events[ev.kind] += 1
                self._log.info(
                    "router.member_changed",
                    member=ev.node,
                    kind=ev.kind,
                    member_addr=ev.addr,
                    incarnation=ev.incarnation,
                )
            else:
                self._on_effect(eff)

    def wake(self) -> None:
        """Run a round now (a route hint or new deltas are waiting to go out)."""
        self._wake.set()

    async def run(self) -> None:
        while not self._closing:
            now = self.clock()
            try:
                slot = self._load.slot_to_publish()
                if slot is not None:
                    self.core.set_local_load(slot, now)
                self.core.tick(now)
                self.flush()
            except Exception:
                # A bug in one round must not stop gossip and failure detection
                # for good: log it loudly and run the next round.
                self._log.exception("router.mesh_round_failed")
            delay = min(max(self.core.next_deadline() - self.clock(), _MIN_SLEEP), _MAX_SLEEP)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def refresh_seeds(
        self,
        names: list[str],
        retry: float,
        interval: float,
        resolve: SeedResolver = resolve_seeds_now,
    ) -> None:
        """Resolve ``names`` again every ``retry`` seconds while this node has
        no peer and every ``interval`` once it has; the core push-pulls with
        the addresses outside its mesh. Returns at once without names."""
        if not names:
            return
        last: list[str] = []
        while not self._closing:
            await asyncio.sleep(interval if self.core.has_peers() else retry)
            try:
                addrs = await resolve(names, self.core.addr)
            except Exception:  # a resolver bug must not end the refreshes for good
                self._log.exception("router.seed_refresh_failed", seeds=names)
                continue
            if sorted(addrs) != last:
                last = sorted(addrs)
                self._log.info("router.seeds_resolved", seeds=names, addrs=last)
            if addrs:
                self.core.add_seeds(addrs, self.clock())
                self.flush()

    async def leave(self, timeout: float) -> None:
        """Graceful leave: hand engines over and tell the mesh, waiting up to
        ``timeout`` for the news to be sent."""
        self.core.leave(self.clock())
        self.flush()
        if not [m for m in self.core.live_members() if m.node != self.node_id]:
            return  # nobody to tell
        deadline = self.clock() + timeout
        while self.clock() < deadline and not self.core.leave_done():
            await asyncio.sleep(_LEAVE_POLL)
            self.core.tick(self.clock())
            self.flush()

    async def close(self) -> None:
        self._closing = True
        await self.transport.close()
