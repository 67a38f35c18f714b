"""The KV-event adapters of the engines a node owns, started and stopped as
the mesh hands engines over.

Commands (the mesh's :class:`StartOwning` / :class:`StopOwning`) are carried
out one at a time, in the order given: an engine lost and regained in quick
succession must not end up with two adapters, or with none. An adapter
starts where the engine's replicated log ends: each worker resumes its
stream from the log's last applied sequence number (``takeover.resume``),
with the block mapper rebuilt from the log's hash pairs
(``takeover.mappings``), so nothing is applied twice or lost.

An engine registered again with another events source (:func:`events_source`
differs: a new process, ports, ranks, model or block size) is a new cache:
its adapter is stopped, each of its former workers cleared through the
engine's log (a CLEAR after everything the old adapter produced, so every
node's index drops the old blocks), and a fresh adapter started on the new
spec, with nothing resumed or restored from the old one's history.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from blocks.delta import OP_CLEAR, KvDelta, KvOp, PackedEntry
from blocks.workers import split_worker_id
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.event_adapter import EventAdapter, EventAdapterConfig
from engine_adapters.native import new_mapper
from mesh.effects import StartOwning, StopOwning
from mesh.state import Takeover
from router.engine_registry import EngineSpec

__all__ = ["AdapterLifecycle", "Respecify", "events_source", "mappers_from", "start_seqs_from"]


def events_source(spec: EngineSpec) -> tuple[object, ...]:
    """What an engine's KV events and their blocks depend on: a change of any
    of these makes the blocks indexed so far another cache's."""
    return (
        spec.endpoint,
        spec.kv_events_endpoint,
        spec.replay_endpoint,
        spec.topic,
        spec.data_parallel_size,
        spec.model,
        spec.block_size,
    )


@dataclass(frozen=True, slots=True)
class Respecify:
    """An owned engine registered again with another events source: clear
    ``old_workers`` and start afresh on ``spec``."""

    engine_id: str
    spec: EngineSpec
    old_workers: tuple[str, ...]


def start_seqs_from(takeover: Takeover) -> dict[int, int]:
    """Per rank, the last applied sequence number (what the adapter resumes after)."""
    return {split_worker_id(worker).rank: first - 1 for worker, first in takeover.resume.items()}


def mappers_from(takeover: Takeover, model: str) -> dict[int, BlockMapper]:
    """Per rank, the block mapper restored from the log's (engine hash, router hash) pairs."""
    mappers: dict[int, BlockMapper] = {}
    for worker, pairs in takeover.mappings.items():
        mapper = new_mapper(model, worker)
        mapper.restore(pairs)
        mappers[split_worker_id(worker).rank] = mapper
    return mappers


class AdapterLifecycle:
    def __init__(
        self,
        owns: Callable[[str], bool],
        sink: Callable[[str, KvDelta | PackedEntry], None],
        log: structlog.typing.FilteringBoundLogger,
        config: EventAdapterConfig | None = None,
        node_id: str = "",
    ) -> None:
        """``owns(engine_id)``: whether this node still owns the engine when
        its start command comes up; ``sink(engine_id, delta)`` takes every
        delta an adapter produces."""
        self._owns = owns
        self._sink = sink
        self._log = log
        self._node_id = node_id  # bound on each adapter's log lines
        self._config = config or EventAdapterConfig()
        self._running: dict[str, EventAdapter] = {}
        self._commands: asyncio.Queue[StartOwning | StopOwning | Respecify] = asyncio.Queue()

    def start(self, command: StartOwning) -> None:
        self._commands.put_nowait(command)

    def stop(self, engine_id: str) -> None:
        self._commands.put_nowait(StopOwning(engine_id))

    def respecify(self, engine_id: str, spec: EngineSpec, old_workers: tuple[str, ...]) -> None:
        """The owned ``engine_id`` has a new events source (see :class:`Respecify`)."""
        self._commands.put_nowait(Respecify(engine_id, spec, old_workers))

    def get(self, engine_id: str) -> EventAdapter | None:
        """The running adapter of ``engine_id``, if this node owns it."""
        return self._running.get(engine_id)

    async def run(self) -> None:
        while True:
            command = await self._commands.get()
            try:
                old = self._running.pop(command.engine_id, None)
                if old is not None:
                    await old.stop()
                if isinstance(command, StartOwning):
                    await self._start(command)
                elif isinstance(command, Respecify):
                    await self._respecify(command, was_running=old is not None)
            except Exception:
                # One engine's bad endpoint must not stop the others' handovers.
                self._log.exception(
                    "router.adapter_command_failed",
                    engine=command.engine_id,
                    command=type(command).__name__,
                )

    async def _start(self, command: StartOwning) -> None:
        spec = EngineSpec(**command.spec).validate()
        engine_id = command.engine_id
        if not spec.kv_events_endpoint or not self._owns(engine_id):
            return
        takeover = command.takeover
        await self._run_adapter(spec, start_seqs_from(takeover), mappers_from(takeover, spec.model))
        self._log.info(
            "router.adapter_started",
            engine=engine_id,
            resume=dict(takeover.resume),
            mapped_blocks=sum(len(v) for v in takeover.mappings.values()),
        )

    async def _respecify(self, command: Respecify, was_running: bool) -> None:
        engine_id, spec = command.engine_id, command.spec
        if not self._owns(engine_id):
            return  # the next owner starts from the log, on the registry's spec
        # After everything the old adapter produced (it is stopped): the old
        # blocks leave every node's index through the engine's log.
        for worker in command.old_workers:
            self._sink(engine_id, KvDelta(worker, -1, [KvOp(OP_CLEAR, [])]))
        self._log.warning(
            "router.adapter_respecified",
            engine=engine_id,
            kv_events=spec.kv_events_endpoint,
            endpoint=spec.endpoint,
            cleared_workers=list(command.old_workers),
            was_running=was_running,
        )
        if spec.kv_events_endpoint:
            await self._run_adapter(spec, {}, {})

    async def _run_adapter(
        self, spec: EngineSpec, start_seqs: dict[int, int], mappers: dict[int, BlockMapper]
    ) -> None:
        engine_id = spec.engine_id
        adapter = EventAdapter(
            engine_id=engine_id,
            model=spec.model,
            kv_endpoint=spec.kv_events_endpoint,
            replay_endpoint=spec.replay_endpoint or None,
            topic=spec.topic,
            data_parallel_size=spec.data_parallel_size,
            sink=lambda delta: self._sink(engine_id, delta),
            start_seqs=start_seqs,
            mappers=mappers,
            config=self._config,
            block_size=spec.block_size,
            node_id=self._node_id,
        )
        self._running[engine_id] = adapter
        await adapter.start()

    async def close(self) -> None:
        for adapter in list(self._running.values()):
            await adapter.stop()
        self._running.clear()
