"""A vLLM-like engine and a KV-event consumer for the whole-mesh simulation (pure).

``ModelledEngine`` is the engine as the seeded simulation models it, in
process and in virtual time; it is not the simulated engine *process*
(``engine_adapters.sim_engine``, ``kvmesh sim-engine``), though it wraps the
same :class:`PrefixCache`. Each ``step`` runs one request (shared prefixes,
so blocks are reused and evicted) and publishes what the cache reported as
one ``KVEventBatch`` in vLLM's wire format, numbered 0, 1, 2, ... and kept in
a bounded replay buffer. A restart empties the cache, the buffer and the
numbering, like a new vLLM process.

``Consumer`` is what an owner node runs for one engine: the same decisions as
``engine_adapters/event_adapter.py`` (Sequencer: apply / duplicate / gap ->
replay / restart -> reset; replay buffer exceeded -> reset and go on), with
the same real ``BlockMapper``, minus the ZMQ sockets: replay is a call.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import xxhash

from blocks.delta import OP_CLEAR, KvDelta, KvOp
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.kv_events import EventFormat, KVEventBatch, decode_batch, encode_batch
from engine_adapters.sequencer import Sequencer, Verdict
from engine_adapters.sim_engine.cache import NotEnoughBlocks, PrefixCache, snapshot_router_hashes
from engine_adapters.sim_engine.config import DEFAULTS as SIM_DEFAULTS

MODEL = SIM_DEFAULTS.model  # the model every simulated engine serves (seeds its router hashes)


class ModelledEngine:
    """One engine of the simulation: a real prefix cache fed seeded requests."""

    def __init__(
        self,
        engine_id: str,
        rng: random.Random,
        *,
        num_blocks: int = 40,
        block_size: int = 4,
        buffer_steps: int = 10_000,
        n_prefixes: int = 5,
        fmt: EventFormat = "map",
    ) -> None:
        self.engine_id = engine_id
        self.rng = rng
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.buffer_steps = buffer_steps
        self.fmt = fmt
        # Shared "system prompts": requests reuse them, so prefixes are cached and evicted.
        self.prefixes = [
            [rng.randrange(1, 5000) for _ in range(block_size * rng.randint(1, 4))] for _ in range(n_prefixes)
        ]
        self.restarts = 0
        self.clears = 0
        self._start()

    def _start(self) -> None:
        self.cache = PrefixCache(self.num_blocks, self.block_size, hash_seed=7)
        self.next_seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=self.buffer_steps)
        self._req = 0

    def restart(self) -> None:
        """A new engine process: empty cache, sequence back to 0, empty replay buffer."""
        self.restarts += 1
        self._start()

    def _publish(self, events: list[Any], now: float) -> tuple[int, bytes]:
        payload = encode_batch(KVEventBatch(ts=now, events=events, data_parallel_rank=0), self.fmt)
        seq = self.next_seq
        self.next_seq += 1
        self.buffer.append((seq, payload))
        return seq, payload

    def step(self, now: float) -> tuple[int, bytes] | None:
        """Run one request; the batch it published (None if the cache said nothing)."""
        r = self.rng
        self._req += 1
        rid = f"r{self._req}"
        tokens = list(r.choice(self.prefixes))
        tokens += [r.randrange(1, 5000) for _ in range(r.randint(0, 3 * self.block_size))]
        out = [r.randrange(1, 5000) for _ in range(r.randint(1, 2 * self.block_size))]
        try:
            self.cache.allocate(rid, tokens, reserve_tokens=len(out))
        except NotEnoughBlocks:
            return None
        self.cache.commit_full_blocks(rid, tokens)
        self.cache.commit_full_blocks(rid, tokens + out)
        self.cache.release(rid)
        events = self.cache.drain_events()
        return self._publish(events, now) if events else None

    def clear(self, now: float) -> tuple[int, bytes]:
        """vLLM's reset_prefix_cache: one AllBlocksCleared batch."""
        self.clears += 1
        self.cache.clear()
        return self._publish(self.cache.drain_events(), now)

    def replay(self, start: int) -> list[tuple[int, bytes]]:
        """What the replay socket answers: every buffered batch with seq >= start."""
        return [(s, p) for s, p in self.buffer if s >= start]

    def router_hashes(self) -> set[int]:
        """The router hashes of what the cache really holds (ground truth)."""
        return snapshot_router_hashes(self.cache.snapshot(), MODEL)


def digest(payload: bytes) -> int:
    return xxhash.xxh3_64_intdigest(payload)


@dataclass
class Consumer:
    """One owner's consumption of one engine (single data-parallel rank)."""

    engine_id: str
    start: int | None  # first seq to fetch (from the takeover), None: unknown
    pairs: list[tuple[Any, int]] | None = None
    max_gap_rounds: int = 4
    seq: Sequencer = field(init=False)
    mapper: BlockMapper = field(init=False)
    log: list[Any] = field(default_factory=list)  # applied seqs and ("reset", reason) markers
    resets: dict[str, int] = field(default_factory=dict)
    probes: int = 0  # replays asked because the engine was quiet
    probe_batches: int = 0  # batches those found

    def __post_init__(self) -> None:
        self.seq = Sequencer(last_applied=None if self.start is None else self.start - 1)
        self.mapper = BlockMapper(MODEL, self.engine_id)
        if self.pairs:
            self.mapper.restore(self.pairs)

    # -- as event_adapter.EventAdapter, without sockets --------------------------------
    def catch_up(self, engine: ModelledEngine) -> list[KvDelta]:
        out: list[KvDelta] = []
        self._replay(engine, 0, out)
        return out

    def probe(self, engine: ModelledEngine) -> list[KvDelta]:
        """The engine has been quiet: anything in its buffer after the last applied batch."""
        self.probes += 1
        out = self.catch_up(engine)
        self.probe_batches += sum(1 for d in out if d.seq >= 0)
        return out

    def on_live(self, seq: int, payload: bytes, engine: ModelledEngine) -> list[KvDelta]:
        out: list[KvDelta] = []
        dg = digest(payload)
        for round_ in range(self.max_gap_rounds + 1):
            d = self.seq.check_live(seq, dg)
            if d.verdict is Verdict.APPLY:
                self._apply(seq, payload, dg, False, out)
                return out
            if d.verdict is Verdict.DUPLICATE:
                return out
            if round_ == self.max_gap_rounds:
                break
            if d.verdict is Verdict.RESTART:
                self._reset("restart", out)
                self.seq.reset(None)
                continue
            self._replay(engine, d.gap_from, out)
            if self.seq.last is None or self.seq.last < d.gap_to:
                self._lost(d.gap_to, "replay_unavailable", out)
        self._lost(seq - 1, "gap_not_converging", out)
        self._apply(seq, payload, dg, False, out)
        return out

    def _replay(self, engine: ModelledEngine, start_if_unknown: int, out: list[KvDelta]) -> None:
        expected = self.seq.expected  # None before the first batch
        start = expected if expected is not None else start_if_unknown
        first = True
        for s, p in engine.replay(start):
            was_first, first = first, False
            d = self.seq.check_replayed(s)
            if d.verdict is Verdict.DUPLICATE:
                continue
            if d.verdict is Verdict.GAP:
                assert was_first, "the sim replay has no holes"
                self._lost(s - 1, "replay_buffer_exceeded", out)
            self._apply(s, p, digest(p), True, out)

    def _apply(self, seq: int, payload: bytes, dg: int, replayed: bool, out: list[KvDelta]) -> None:
        batch = decode_batch(payload)
        out.append(self.mapper.map_batch(batch.events, seq))
        self.seq.applied(seq, dg, replayed)
        self.log.append(seq)

    def _lost(self, upto: int, reason: str, out: list[KvDelta]) -> None:
        if self.seq.last is not None:
            self._reset(reason, out)
        else:
            self.log.append(("truncated", upto))
        self.seq.skip_to(upto)

    def _reset(self, reason: str, out: list[KvDelta]) -> None:
        self.resets[reason] = self.resets.get(reason, 0) + 1
        self.log.append(("reset", reason))
        self.mapper.clear()
        out.append(KvDelta(self.engine_id, -1, [KvOp(OP_CLEAR, [])]))
