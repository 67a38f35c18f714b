"""Subscribes to one engine's KV events (all data-parallel ranks) and hands a
``KvDelta`` per batch, in router block hashes, to a sink (I/O shell); with
``EventAdapterConfig.packed``, the native mapper's ``PackedEntry`` instead
(the same delta as a log entry, held in Rust).

Per rank: one SUB socket on ``kv_endpoint`` port + rank (connects; the engine
binds), a ``Sequencer`` that says apply / duplicate / gap / restart, and a
``BlockMapper`` that turns engine hashes into router hashes. Gaps are filled
from the engine's replay socket (a fresh DEALER per request, bounded wait,
bounded retries). While a replay runs the SUB socket is simply not read, so
ZMQ queues the live batches and they are applied in order afterwards; the
sequencer drops the live copies of batches the replay already delivered.

If the replay buffer no longer holds the missing batches (or there is no
replay socket, or it does not answer), the worker's state is unknown: the
adapter emits ``KvDelta(worker, -1, [OP_CLEAR])``, forgets the mapping, counts
a reset and continues from the oldest batch it can get. vLLM offers no full
snapshot over the wire, so blocks cached before that point stay unknown until
the engine stores or evicts them again.

On start each rank first replays from its start sequence + 1 (resume after a
handover) or from 0 (learn the recent history), then reads live messages. The
ZMQ slow-joiner window (batches published before the subscription took
effect) shows up as a gap on the first live message and is replayed.

Quiet workers are probed. vLLM sends no heartbeat, so a batch lost on PUB is
only noticed when the next one arrives, and an engine that goes quiet right
after a loss (a lost final ``AllBlocksCleared`` is the costly case: every block
it cleared stays indexed) would leave the index wrong for as long as it stays
quiet. After ``replay_probe_after`` seconds without a live batch a rank asks
the replay socket first for its last applied batch (is the engine still the
process that sent it?) and then for everything after it; the usual answers
are that batch and the end marker, two round trips (one, ending the probe,
when the first goes unanswered: an engine that is down). The probe runs in the
rank's own task, like gap fills, so it can never overlap a replay of the
same rank, and a rank that keeps receiving batches is never probed.

Restarts. An engine restarted on the same ports is a new process: an empty
cache, batches numbered from 0 again. The sequencer sees it on the first
live batch numbered at or below the last applied one; a probe or a new
owner's catch-up sees it sooner, or when that batch was lost
(:meth:`EventAdapter._restart_seen`). A new owner does not have the digest
of the last batch the log holds, so a restarted engine whose numbering has
already passed that batch's is found only by its next live batch.

Block size. Every node hashes an engine's prompts in blocks of the size the
engine is registered with, so events of any other size could never match a
prompt. Each rank's mapper refuses such stores (skip reason
``block_size_mismatch``); the adapter logs ``adapter.block_size_mismatch``
once per engine and size, with the fix, and reports the mismatch in
:meth:`EventAdapter.stats` (``block_size_mismatch``, ``events_refused``),
which ``ListEngines`` and the node's metrics show. The typical cause is
SGLang's default page size of 1 on GPUs: start it with ``--page-size`` equal
to the registered ``block_size``, as vLLM with ``--block-size``.

The wire framing (live and replay) is in ``kv_events``, the endpoint rules in
``kv_endpoints``; the decisions are the pure ``Sequencer``'s. What stays here
is the I/O around them. The replay client is part of it, not a module of its
own: each reply is judged by the sequencer and applied before the next one is
read, and a hole in the middle of a reply decides whether the round is asked
again, so the DEALER loop and gap handling are one piece of logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import structlog
import zmq
import zmq.asyncio

from blocks.delta import OP_CLEAR, KvDelta, KvOp, PackedEntry
from blocks.workers import worker_id
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.kv_endpoints import connect_endpoint
from engine_adapters.kv_events import (
    EventDecodeError,
    encode_seq,
    parse_live_frames,
    parse_replay_frames,
)
from engine_adapters.native import NATIVE, map_frame, map_frame_packed, new_mapper
from engine_adapters.sequencer import Sequencer, Verdict

log = structlog.get_logger(__name__)

# vLLM's ROUTER drops replies past its send high-water mark (1,000 messages by
# default), so a replay of its default 10,000-batch buffer arrives in about ten
# rounds; the cap bounds a replay that gains a little every round yet never
# arrives whole.
_MAX_REPLAY_ROUNDS = 64
_DRAIN_MAX = 512  # live batches handled per wake-up before yielding to the loop
# A rank's reader that fails is started again after a pause that doubles
# from the first to the last (and starts over once a reader ran this long).
_RESTART_FIRST_S = 1.0
_RESTART_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class EventAdapterConfig:
    """Tunables of an :class:`EventAdapter` (the same for every rank)."""

    replay_timeout: float = 1.0  # seconds to wait for the next replay reply
    replay_retries: int = 3  # replay rounds without progress before a gap is given up
    replay_deadline: float = 30.0  # seconds one replay round may take in all
    max_gap_rounds: int = 4  # gap fills tried for one live batch before the history behind it is given up
    rcvhwm: int = 100_000  # SUB receive queue; it holds the live batches while a replay runs
    # Seconds without a live batch before a rank asks the replay socket for
    # anything newer (a lost last batch is applied within about this); 0: never.
    replay_probe_after: float = 2.0
    # Emit each frame as the native mapper's packed log entry instead of a
    # KvDelta (no Python object per block): a router node whose mesh is
    # packed (a native index) sets it; needs the native module.
    packed: bool = False

    def __post_init__(self) -> None:
        if self.replay_probe_after < 0:
            raise ValueError(f"replay_probe_after must be >= 0, got {self.replay_probe_after}")
        if self.packed and not NATIVE:
            raise ValueError("packed event adapters need the native module (native/, `make install`)")


@dataclass
class RankStats:
    last_seq: int | None = None
    batches: int = 0  # batches applied (live + replayed)
    events: int = 0  # engine events in those batches
    replayed_batches: int = 0  # of which obtained through replay
    duplicates: int = 0  # live copies of replayed batches, dropped
    gaps: int = 0  # gaps detected
    gaps_replayed: int = 0  # gaps fully filled from the replay socket
    replay_failures: int = 0  # replay requests unanswered within the timeout
    probes: int = 0  # replay requests sent because the worker was quiet
    probe_batches: int = 0  # batches those probes found (lost on PUB, no later batch to reveal it)
    resets: int = 0  # worker state cleared because history was lost
    restarts: int = 0  # publisher restarted (sequence went back)
    history_truncated: int = 0  # first sync could not reach back to seq 0
    decode_errors: int = 0  # malformed frames or payloads (nothing applied)
    sink_errors: int = 0
    reader_failures: int = 0  # the rank's reader stopped on an error and was started again
    # Seconds from the engine stamping the last batch applied live (its
    # ``ts``) to its apply here: wall clocks of two hosts, so their skew is
    # part of it. A replayed batch is old by design and says nothing of it.
    event_lag: float | None = None


class _RankState:
    """What the adapter keeps for one data-parallel rank (one worker)."""

    def __init__(self, rank: int, worker: str, model: str, start: int | None, block_size: int) -> None:
        self.rank = rank
        self.worker = worker
        self.sequencer = Sequencer(last_applied=start)
        self.mapper = new_mapper(model, worker, block_size)  # native when built (engine_adapters/native.py)
        self.stats = RankStats(last_seq=start)
        self.ready = asyncio.Event()  # set after the first catch-up attempt
        self.probe_failing = False  # the last probe went unanswered (log the next ones quietly)
        self.reader_error = ""  # why the reader last failed, until it reads again
        self.last_digest: int | None = None  # of the last batch applied (is the engine the same process?)


class EventAdapter:
    """One engine's KV-event subscriber; ``await start()``, ``await stop()``.

    ``start_seqs`` (rank -> last applied seq) and ``mappers`` (rank -> mapper)
    resume ranks another node was consuming (a mesh handover).
    ``block_size``: the size the engine is registered with, which its
    events must carry (see the module docstring); required, never assumed.
    """

    def __init__(
        self,
        engine_id: str,
        model: str,
        kv_endpoint: str,
        replay_endpoint: str | None,
        topic: str = "",
        data_parallel_size: int = 1,
        sink: Callable[[KvDelta | PackedEntry], None] | None = None,
        start_seqs: dict[int, int] | None = None,
        *,
        block_size: int,
        config: EventAdapterConfig | None = None,
        mappers: dict[int, BlockMapper] | None = None,
        node_id: str = "",
    ) -> None:
        if sink is None:
            raise TypeError("EventAdapter needs a sink: Callable[[KvDelta | PackedEntry], None]")
        if data_parallel_size < 1:
            raise ValueError("data_parallel_size must be >= 1")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        cfg = config or EventAdapterConfig()
        self.engine_id = engine_id
        self.model = model
        self.block_size = block_size
        self._kv_endpoint = kv_endpoint
        self._replay_endpoint = replay_endpoint
        self._topic = topic.encode("utf-8")
        self._sink = sink
        self._replay_timeout_ms = max(1, int(cfg.replay_timeout * 1000))
        self._replay_retries = max(1, cfg.replay_retries)
        self._replay_deadline = cfg.replay_deadline
        self._packed = cfg.packed
        self._max_gap_rounds = max(1, cfg.max_gap_rounds)
        self._rcvhwm = cfg.rcvhwm
        self._probe_after_ms = int(cfg.replay_probe_after * 1000) if replay_endpoint else 0
        start_seqs = start_seqs or {}
        self._ranks = [
            _RankState(r, worker_id(engine_id, r), model, start_seqs.get(r), block_size)
            for r in range(data_parallel_size)
        ]
        for r, m in (mappers or {}).items():
            m.worker = self._ranks[r].worker
            m.block_size = block_size
            self._ranks[r].mapper = m
        self._mismatches_logged: set[int] = set()  # block sizes already logged as mismatches
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # The node's id on every line: aggregated, the logs of several nodes
        # must say which one lost an engine's events or reset its blocks.
        self._log = log.bind(engine=engine_id, node=node_id) if node_id else log.bind(engine=engine_id)

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        self._ctx = zmq.asyncio.Context()
        for st in self._ranks:
            self._tasks.append(asyncio.create_task(self._supervise(st), name=f"kv-events-{st.worker}"))
        self._log.info("adapter.started", endpoint=self._kv_endpoint, ranks=len(self._ranks))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            # The tasks closed their sockets. Ending the context waits for
            # ZMQ's I/O thread, which resolves an engine's host name inline
            # (getaddrinfo) while it reconnects: with that name unreachable
            # (a partitioned node) the wait lasts a resolver timeout, which on
            # the event loop would stall every call and probe of the node.
            await asyncio.to_thread(ctx.term)
        self._log.info("adapter.stopped")

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until every rank has made its first catch-up attempt (or its
        reader has failed before it: see ``_supervise``)."""
        await asyncio.wait_for(asyncio.gather(*(st.ready.wait() for st in self._ranks)), timeout)

    # --- introspection -----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters summed over ranks, plus ``last_seq`` and ``ranks`` per rank."""
        per_rank = {st.rank: asdict(st.stats) for st in self._ranks}
        total: dict[str, Any] = {"engine_id": self.engine_id}
        for key in RankStats.__dataclass_fields__:
            if key in ("last_seq", "event_lag"):
                continue
            total[key] = sum(int(r[key]) for r in per_rank.values())
        total["last_seq"] = {r: s["last_seq"] for r, s in per_rank.items()}
        lags = [s["event_lag"] for s in per_rank.values() if s["event_lag"] is not None]
        total["event_lag"] = max(lags) if lags else None  # the rank furthest behind
        total["ranks"] = per_rank
        total["skipped_events"] = sum(st.mapper.stats.skipped_events for st in self._ranks)
        by_reason: dict[str, int] = {}
        for st in self._ranks:
            for reason, n in st.mapper.stats.skipped_by_reason.items():
                by_reason[reason] = by_reason.get(reason, 0) + n
        total["skipped_by_reason"] = by_reason
        total["block_size_mismatch"] = self.block_size_mismatch
        total["events_refused"] = self.events_refused
        return total

    @property
    def block_size_mismatch(self) -> int:
        """The block size of the stores refused right now for not being the
        registered one (the first rank's that has one), 0 if none is."""
        return next((m for st in self._ranks if (m := st.mapper.stats.block_size_mismatch)), 0)

    @property
    def events_refused(self) -> str:
        """Why this engine's stores are refused, or its events not read ("" while they apply)."""
        failed = next((st for st in self._ranks if st.reader_error), None)
        if failed is not None:
            return f"event reader of {failed.worker} failed ({failed.reader_error}); starting it again"
        seen = self.block_size_mismatch
        if not seen:
            return ""
        return (
            f"block size mismatch: the engine's KV events carry blocks of {seen} "
            f"token{'s' if seen != 1 else ''}, "
            f"it is registered with block_size {self.block_size}"
        )

    def last_seqs(self) -> dict[int, int | None]:
        return {st.rank: st.sequencer.last for st in self._ranks}

    def mapper(self, rank: int = 0) -> BlockMapper:
        return self._ranks[rank].mapper

    # --- live stream -----------------------------------------------------------------

    async def _supervise(self, st: _RankState) -> None:
        """The rank's reader, started again whenever it fails: a bug, or an
        endpoint ZMQ refuses, must not stop the engine's events for good
        without a word. Each failure is logged and counted, and the engine's
        ``events_refused`` says so until a batch applies again."""
        pause = _RESTART_FIRST_S
        while True:
            started = time.monotonic()
            try:
                await self._run_rank(st)
                return
            except Exception as e:
                if time.monotonic() - started >= _RESTART_MAX_S:
                    pause = _RESTART_FIRST_S  # it had been running: not a failing streak
                st.stats.reader_failures += 1
                st.reader_error = f"{type(e).__name__}: {e}"
                self._log.exception("adapter.reader_failed", worker=st.worker, retry_in=pause)
                st.ready.set()  # nobody waits on a catch-up that will not come
            await asyncio.sleep(pause)
            pause = min(2 * pause, _RESTART_MAX_S)

    async def _run_rank(self, st: _RankState) -> None:
        assert self._ctx is not None
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        try:
            sub.connect(connect_endpoint(self._kv_endpoint, st.rank))
            try:
                await self._catch_up(st)
            except Exception:
                self._log.exception("adapter.catch_up_failed", worker=st.worker)
            finally:
                st.ready.set()
            st.reader_error = ""  # connected and reading again
            # Drain what is already queued through a plain (sync) view of the
            # same socket: one await per burst instead of one per batch.
            raw: zmq.Socket[bytes] = zmq.Socket.shadow(sub.underlying)
            while True:
                if self._probe_after_ms and not await sub.poll(self._probe_after_ms):
                    await self._probe(st)
                    continue
                frames: list[bytes] | None = await sub.recv_multipart()
                handled = 0
                while frames is not None:
                    try:
                        await self._on_live(st, frames)
                    except Exception:  # keep consuming whatever one batch did
                        self._log.exception("adapter.live_batch_failed", worker=st.worker)
                    handled += 1
                    if handled >= _DRAIN_MAX:
                        await asyncio.sleep(0)  # let other tasks run under load
                        break
                    try:
                        frames = raw.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        frames = None
        finally:
            sub.close(linger=0)

    async def _on_live(self, st: _RankState, frames: list[bytes]) -> None:
        try:
            seq, payload = parse_live_frames(frames)
        except EventDecodeError as e:
            st.stats.decode_errors += 1
            self._log.error("adapter.bad_live_frame", worker=st.worker, error=str(e))
            return
        digest = hash(payload)
        sequencer = st.sequencer
        for round_ in range(self._max_gap_rounds + 1):
            d = sequencer.check_live(seq, digest)
            if d.verdict is Verdict.APPLY:
                self._apply(st, seq, payload, digest, replayed=False)
                return
            if d.verdict is Verdict.DUPLICATE:
                st.stats.duplicates += 1
                return
            if round_ == self._max_gap_rounds:
                break
            if d.verdict is Verdict.RESTART:
                self._restarted(st, "a live batch numbered as a new process numbers its first", seq=seq)
                continue
            st.stats.gaps += 1
            self._log.info("adapter.gap", worker=st.worker, seq=seq, gap_from=d.gap_from, gap_to=d.gap_to)
            await self._fill(st, d.gap_from, d.gap_to)
        # Could not get the stream contiguous: give up on the history before it.
        self._history_lost(st, seq - 1, "gap_not_converging")
        self._apply(st, seq, payload, digest, replayed=False)

    # --- replay ----------------------------------------------------------------------

    async def _catch_up(self, st: _RankState) -> None:
        if self._replay_endpoint is None:
            return
        # Resuming a log another node wrote: the engine may have restarted
        # since, under that node (which died before the new process' batches
        # reached the log) or while nobody read it.
        answered, why = await self._restart_seen(st, after_outage=False)
        if not answered:
            return  # not answering: anything missed shows up as a gap, or to a probe, later
        if why:
            self._restarted(st, why)
        self._log.info("adapter.catch_up", worker=st.worker, from_seq=st.sequencer.expected or 0)
        # One attempt: an engine that is not up yet must not delay live reads;
        # anything missed shows up as a gap later.
        await self._replay_rounds(st, 0, retries=1)

    async def _probe(self, st: _RankState) -> None:
        """The worker has been quiet: apply whatever the replay buffer holds
        after its last applied batch (usually nothing).

        The engine may meanwhile be a new process on the same ports
        (restarted: an empty cache, batches numbered from 0 again), which
        says so only with its next batch, and not at all if that batch is
        lost (the ZMQ slow-joiner window of a socket just connected): until
        then every node would route to blocks it no longer holds. So the
        probe first asks whether the engine still holds the last batch
        applied, as the same process does (:meth:`_restart_seen`); a new
        one is a restart, found before its first batch or after it."""
        st.stats.probes += 1
        answered, why = await self._restart_seen(st, after_outage=st.probe_failing)
        if why:
            self._restarted(st, why)
            st.probe_failing = False
            await self._catch_up(st)
            return
        if not answered:
            # The replay socket did not answer the restart check: asking it for
            # a replay now would wait as long again for nothing.
            self._replay_unanswered(st, st.sequencer.last, probe=True)
            st.probe_failing = True
            return
        before = st.stats.replayed_batches
        answered = await self._replay_rounds(st, 0, retries=1, probe=True)
        found = st.stats.replayed_batches - before  # counted in probe_batches as applied
        if found:
            self._log.info("adapter.probe_recovered", worker=st.worker, batches=found, seq=st.sequencer.last)
        if answered and st.probe_failing:
            self._log.info("adapter.probe_answered", worker=st.worker)
        st.probe_failing = not answered

    def _restarted(self, st: _RankState, why: str, seq: int | None = None) -> None:
        """The engine is a new process: forget its old cache, start its numbering over
        (``seq``: the live batch that showed it, if one did)."""
        st.stats.restarts += 1
        self._log.warning(
            "adapter.publisher_restarted", worker=st.worker, seq=seq, last_seq=st.sequencer.last, why=why
        )
        self._reset_worker(st, "restart")
        st.sequencer.reset(None)

    async def _restart_seen(self, st: _RankState, after_outage: bool) -> tuple[bool, str | None]:
        """Whether the engine answers its replay socket, and why it is a new
        process since the last batch applied (None: the same, or unknown).

        The same process still holds that batch: its buffer drops a batch
        only for newer ones, which it would then send instead. So a new
        process is one that sends another batch under that number (its
        digest differs), or holds nothing from that number on but earlier
        batches (its numbering started over). Holding nothing at all says a
        new process only ``after_outage`` (the engine was unreachable
        meanwhile): a new process that has published nothing yet; an engine
        whose buffer is empty always would be reset each time."""
        last = st.sequencer.last
        if self._replay_endpoint is None or last is None or last < 0:
            return True, None
        held = await self._first_held(st, last)
        if held is None:
            return False, None
        seq, digest = held
        if seq == last:
            if st.last_digest is not None and digest != st.last_digest:
                return True, "the engine sends another batch under the last applied number"
            return True, None
        if seq != -1:
            return True, None  # only newer batches: the same process, a gap for the replay to fill
        if after_outage and st.last_digest is not None:
            return True, "back after its outage, the engine no longer holds the last batch applied"
        first = await self._first_held(st, 0)
        if first is not None and first[0] != -1:
            return True, "the engine holds earlier batches but none from the last applied on: numbered anew"
        return True, None

    async def _first_held(self, st: _RankState, seq: int) -> tuple[int, int] | None:
        """The first batch the engine's replay buffer holds from ``seq`` on,
        as (its sequence number, the digest of its payload); (-1, 0) if it
        holds none (the end marker comes first), None if it does not answer."""
        try:
            with self._replay_dealer(st) as dealer:
                await dealer.send_multipart([b"", encode_seq(seq)])
                if not await dealer.poll(self._replay_timeout_ms):
                    return None
                item = parse_replay_frames(await dealer.recv_multipart())
        except EventDecodeError:
            return None
        return (-1, 0) if item is None else (item[0], hash(item[1]))

    @contextlib.contextmanager
    def _replay_dealer(self, st: _RankState, rcvhwm: int | None = None) -> Iterator[zmq.asyncio.Socket]:
        """A fresh DEALER connected to the rank's replay socket (``rcvhwm``:
        its receive queue, set before it connects, when ZMQ applies it),
        closed on the way out (also when the endpoint cannot be connected to)."""
        assert self._ctx is not None and self._replay_endpoint is not None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        if rcvhwm is not None:
            dealer.setsockopt(zmq.RCVHWM, rcvhwm)
        try:
            dealer.connect(connect_endpoint(self._replay_endpoint, st.rank))
            yield dealer
        finally:
            dealer.close(linger=0)

    async def _fill(self, st: _RankState, gap_from: int, gap_to: int) -> None:
        if self._replay_endpoint is not None:
            await self._replay_rounds(st, gap_from, retries=self._replay_retries)
        last = st.sequencer.last
        if last is not None and last >= gap_to:
            st.stats.gaps_replayed += 1
        else:
            self._history_lost(st, gap_to, "replay_unavailable")

    async def _replay_rounds(
        self, st: _RankState, start_if_unknown: int, retries: int, probe: bool = False
    ) -> bool:
        """Replay until an answer arrives whole; each round resumes after the
        last applied batch. Rounds that make progress do not count as retries:
        vLLM's ROUTER drops replies past its send HWM, so a long replay arrives
        in pieces. True once a replay ended without holes."""
        failures = 0
        for _ in range(_MAX_REPLAY_ROUNDS):
            before = st.sequencer.last
            expected = st.sequencer.expected
            start = expected if expected is not None else start_if_unknown
            if await self._replay_once(st, start, probe):
                return True
            if st.sequencer.last == before:
                failures += 1
                if failures >= retries:
                    return False
        return False

    async def _replay_once(self, st: _RankState, start: int, probe: bool = False) -> bool:
        """Ask for every buffered batch >= start and apply them in order.

        True if the end marker came and nothing was missing in between (an
        unanswered one: :meth:`_replay_unanswered`).
        """
        first, holes = True, False
        with self._replay_dealer(st, rcvhwm=0) as dealer:  # a replay may be the whole buffer
            await dealer.send_multipart([b"", encode_seq(start)])
            deadline = time.monotonic() + self._replay_deadline
            while time.monotonic() < deadline:  # bounded even if replies trickle
                if not await dealer.poll(self._replay_timeout_ms):
                    break
                try:
                    item = parse_replay_frames(await dealer.recv_multipart())
                except EventDecodeError as e:
                    st.stats.decode_errors += 1
                    self._log.error("adapter.bad_replay_frame", worker=st.worker, error=str(e))
                    holes = True
                    continue
                if item is None:  # the end marker
                    return not holes
                seq, payload = item
                was_first, first = first, False
                if holes:
                    continue  # never apply past a hole; the next round resumes
                d = st.sequencer.check_replayed(seq)
                if d.verdict is Verdict.DUPLICATE:
                    continue
                if d.verdict is Verdict.GAP:
                    if not was_first:
                        # Missing in the middle: dropped in transit, ask again.
                        holes = True
                        continue
                    # The buffer starts after what we need: that history is gone.
                    self._history_lost(st, seq - 1, "replay_buffer_exceeded")
                self._apply(st, seq, payload, hash(payload), replayed=True)
                st.stats.replayed_batches += 1
                if probe:
                    # With the batch, not after the replay's end marker: the
                    # stats never lag what the index already shows.
                    st.stats.probe_batches += 1
            self._replay_unanswered(st, start, probe)
            return False

    def _replay_unanswered(self, st: _RankState, from_seq: int | None, probe: bool) -> None:
        """The replay socket did not answer: counted; logged at warning once
        per streak of unanswered probes (an engine that is down stays so every
        ``replay_probe_after`` seconds, and its health probe says so already)."""
        st.stats.replay_failures += 1
        if probe and st.probe_failing:
            self._log.debug("adapter.replay_timeout", worker=st.worker, from_seq=from_seq, probe=True)
        else:
            self._log.warning("adapter.replay_timeout", worker=st.worker, from_seq=from_seq, probe=probe)

    # --- applying --------------------------------------------------------------------

    def _apply(self, st: _RankState, seq: int, payload: bytes, digest: int, replayed: bool) -> None:
        try:
            frame, delta = (map_frame_packed if self._packed else map_frame)(st.mapper, payload, seq)
        except EventDecodeError as e:
            st.stats.decode_errors += 1
            self._log.error("adapter.batch_undecodable", worker=st.worker, seq=seq, error=str(e))
            # Consumed: replaying it would give the same bytes. Nothing applied.
            st.sequencer.applied(seq, digest, replayed)
            st.last_digest = digest
            st.stats.last_seq = seq
            self._emit(st, KvDelta(st.worker, seq, []))
            return
        seen = st.mapper.stats.block_size_mismatch
        if seen and seen not in self._mismatches_logged:
            self._mismatch(st, seen)
        st.sequencer.applied(seq, digest, replayed)
        st.last_digest, st.reader_error = digest, ""
        st.stats.batches += 1
        st.stats.events += frame.events
        st.stats.last_seq = seq
        if frame.ts > 0 and not replayed:  # a batch without a time says nothing about lag
            st.stats.event_lag = time.time() - frame.ts
        self._emit(st, delta)

    def _mismatch(self, st: _RankState, seen: int) -> None:
        """Say once per engine and size that its stores are refused, and how to fix it."""
        self._mismatches_logged.add(seen)
        self._log.warning(
            "adapter.block_size_mismatch",
            worker=st.worker,
            registered_block_size=self.block_size,
            event_block_size=seen,
            action="stores refused (nothing of them is indexed) until they carry the registered size",
            fix=(
                f"start the engine with blocks of {self.block_size} tokens (vLLM --block-size "
                f"{self.block_size}, SGLang --page-size {self.block_size}), or register it and every "
                f"engine of its model with block_size={seen}"
            ),
        )

    def _history_lost(self, st: _RankState, upto: int, reason: str) -> None:
        """History up to ``upto`` cannot be had: reset the worker if it had any."""
        if st.sequencer.last is None:
            st.stats.history_truncated += 1
            self._log.info("adapter.history_truncated", worker=st.worker, upto=upto)
        else:
            self._reset_worker(st, reason)
        st.sequencer.skip_to(upto)

    def _reset_worker(self, st: _RankState, reason: str) -> None:
        """Clear the worker everywhere: its mapping here, its blocks in the index."""
        st.stats.resets += 1
        self._log.warning("adapter.worker_reset", worker=st.worker, reason=reason, last_seq=st.sequencer.last)
        st.mapper.clear()
        self._emit(st, KvDelta(st.worker, -1, [KvOp(OP_CLEAR, [])]))

    def _emit(self, st: _RankState, delta: KvDelta | PackedEntry) -> None:
        try:
            self._sink(delta)
        except Exception:
            st.stats.sink_errors += 1
            self._log.exception("adapter.sink_failed", worker=st.worker, seq=st.stats.last_seq)
