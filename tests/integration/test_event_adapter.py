"""Publisher + EventAdapter over real ZMQ on loopback: wire format, gap
replay, resets, data parallel, malformed input, resume, restart."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Callable

import pytest
import structlog
import zmq

from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, EngineHash, KvDelta
from blocks.hashing import block_hashes, root_seed
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.event_adapter import EventAdapter, EventAdapterConfig
from engine_adapters.kv_events import (
    END_SEQ,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    decode_seq,
    encode_batch,
    encode_seq,
)
from engine_adapters.sim_engine.publisher import ZmqEventPublisher
from mesh.state import MeshState
from mesh.state_messages import decode_delta, encode_payload
from router.index import PrefixIndex

pytestmark = pytest.mark.timeout(60)

MODEL = "toy-model"
BS = 4
LOOP = "tcp://127.0.0.1:0"


class ToyEngine:
    """A prefix cache that emits vLLM-style events with opaque engine hashes
    (unsigned >= 2**63 and bytes) and knows the router hashes to expect."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.live: dict[EngineHash, int] = {}  # engine hash -> router hash
        self.by_prefix: dict[tuple[int, ...], EngineHash] = {}

    def _new_hash(self) -> EngineHash:
        if self.rng.random() < 0.5:
            return self.rng.getrandbits(63) | (1 << 63)
        return self.rng.randbytes(32)

    def store(self, tokens: list[int]) -> BlockStored | None:
        n = len(tokens) // BS
        routers = block_hashes(tokens, BS, root_seed(MODEL))
        parent = None
        new_h: list[EngineHash] = []
        new_t: list[int] = []
        first_parent = None
        for i in range(n):
            prefix = tuple(tokens[: (i + 1) * BS])
            eh = self.by_prefix.get(prefix)
            if eh is not None and eh in self.live and not new_h:
                parent = eh
                continue
            if not new_h:
                first_parent = parent
            eh = self._new_hash()
            self.by_prefix[prefix] = eh
            self.live[eh] = routers[i]
            new_h.append(eh)
            new_t.extend(prefix[-BS:])
        if not new_h:
            return None
        return BlockStored(new_h, first_parent, new_t, BS, medium="GPU")

    def prompt(self, length_blocks: int = 3) -> list[int]:
        return [self.rng.randrange(50_000) for _ in range(length_blocks * BS)]

    def evict(self, k: int) -> BlockRemoved:
        gone = self.rng.sample(sorted(self.live, key=repr), k=min(k, len(self.live)))
        for eh in gone:
            del self.live[eh]
        return BlockRemoved(gone, medium="GPU")

    def expected(self) -> set[int]:
        return set(self.live.values())


def fresh(ev: BlockStored | None) -> BlockStored:
    """``ToyEngine.store`` of a prompt that cannot be cached yet."""
    assert ev is not None
    return ev


def batch(*events) -> KVEventBatch:
    return KVEventBatch(ts=time.time(), events=[e for e in events if e is not None])


class DictSink:
    """worker -> set of router hashes, as a single node's index would hold."""

    def __init__(self) -> None:
        self.state: dict[str, set[int]] = {}
        self.deltas: list[KvDelta] = []

    def __call__(self, d: KvDelta) -> None:
        self.deltas.append(d)
        s = self.state.setdefault(d.worker, set())
        for op in d.ops:
            if op.kind == OP_STORE:
                s.update(op.hashes)
            elif op.kind == OP_REMOVE:
                s.difference_update(op.hashes)
            elif op.kind == OP_CLEAR:
                s.clear()


async def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.01)


def applied_up_to(ad: EventAdapter, seq: int) -> Callable[[], bool]:
    return lambda: ad.last_seqs()[0] == seq


def free_consecutive_ports(n: int) -> int:
    """A base port with n free consecutive ports on loopback."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free consecutive ports")


def make_adapter(pub: ZmqEventPublisher, sink, **kw) -> EventAdapter:
    kw.setdefault("config", EventAdapterConfig(replay_timeout=0.5, replay_retries=2))
    kw.setdefault("block_size", BS)
    return EventAdapter("eng-a", MODEL, pub.endpoint, pub.replay_endpoint, topic="kv", sink=sink, **kw)


def on_fixed_ports(
    engine_id: str, config: EventAdapterConfig
) -> tuple[str, str, ZmqEventPublisher, DictSink, EventAdapter]:
    """An engine on ports of its own (so another process, or a stand-in, can
    take them after it) and an adapter reading it: (event endpoint, replay
    endpoint, publisher, sink, adapter), the adapter not yet started."""
    base, rbase = free_consecutive_ports(1), free_consecutive_ports(1)
    ep, rep = f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{rbase}"
    sink = DictSink()
    pub = ZmqEventPublisher(ep, rep, topic="kv", bind=True)
    ad = EventAdapter(engine_id, MODEL, ep, rep, topic="kv", sink=sink, config=config, block_size=BS)
    return ep, rep, pub, sink, ad


# --- publisher wire ---------------------------------------------------------------


def test_publisher_frames_and_replay_match_vllm() -> None:
    ctx = zmq.Context()
    with ZmqEventPublisher(LOOP, LOOP, topic="kv", buffer_steps=4) as pub:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        sub.connect(pub.endpoint)
        # wait for the subscription: publish probes until one arrives
        deadline = time.monotonic() + 5
        while not sub.poll(20):
            assert time.monotonic() < deadline
            pub.publish(batch())
        while sub.poll(50):
            sub.recv_multipart()
        first = pub.next_seq
        ev = BlockStored([2**64 - 1], None, [1, 2, 3, 4], BS, medium="GPU")
        seqs = [pub.publish(batch(ev)) for _ in range(6)]
        assert seqs == list(range(first, first + 6))
        got = [sub.recv_multipart() for _ in range(6)]
        for (topic, seq_frame, payload), want in zip(got, seqs):
            assert topic == b"kv"
            assert seq_frame == want.to_bytes(8, "big")
            b = decode_batch(payload)
            assert b.events == [ev] and b.data_parallel_rank == 0
            assert payload == encode_batch(b, "map")

        assert pub.replay_endpoint is not None
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart([b"", encode_seq(0)])  # older than the buffer
        replies = []
        while True:
            assert dealer.poll(2000)
            f = dealer.recv_multipart()
            replies.append(f)
            if f[2] == END_SEQ:
                break
        assert replies[-1] == [b"", b"", END_SEQ, b""]
        assert [decode_seq(f[2]) for f in replies[:-1]] == seqs[-4:]  # bounded buffer
        assert all(f[0] == b"" and f[1] == b"kv" for f in replies[:-1])
        assert [f[3] for f in replies[:-1]] == [g[2] for g in got[-4:]]

        dealer.send_multipart([b"", b"\x01\x02"])  # malformed start: only the end marker
        assert dealer.poll(2000)
        assert dealer.recv_multipart() == [b"", b"", END_SEQ, b""]
    ctx.destroy(linger=0)


def test_publish_is_thread_safe_and_wire_order_follows_seq() -> None:
    ctx = zmq.Context()
    with ZmqEventPublisher(LOOP, None, buffer_steps=10_000) as pub:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.connect(pub.endpoint)
        deadline = time.monotonic() + 5
        while not sub.poll(20):
            assert time.monotonic() < deadline
            pub.publish(batch())
        start = pub.next_seq

        def worker() -> None:
            for _ in range(250):
                pub.publish(batch(BlockRemoved([1])))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seen: list[int] = []
        while len(seen) < 1000 and sub.poll(2000):
            seq = decode_seq(sub.recv_multipart()[1])
            if seq >= start:
                seen.append(seq)
        assert seen == list(range(start, start + 1000))
    ctx.destroy(linger=0)


# --- adapter ----------------------------------------------------------------------


async def test_stopping_an_adapter_does_not_hold_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ending the ZMQ context waits for its I/O thread, which may be inside a
    slow name lookup for the engine (a partitioned node): the loop goes on."""
    import zmq.asyncio

    real_term = zmq.asyncio.Context.term

    def slow_term(self) -> None:
        time.sleep(1.0)  # the I/O thread in a resolver timeout
        real_term(self)

    monkeypatch.setattr(zmq.asyncio.Context, "term", slow_term)
    with ZmqEventPublisher(LOOP, LOOP, topic="kv", fmt="array") as pub:
        ad = make_adapter(pub, PrefixIndex().apply)
        await ad.start()
        await ad.wait_ready(5)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.get_running_loop().create_task(tick())
        try:
            await ad.stop()
        finally:
            ticker.cancel()
        assert ticks >= 10, ticks  # the loop ran all through the second the context took to end


async def test_history_then_live_then_dropped_batches_are_replayed() -> None:
    eng = ToyEngine(1)
    index = PrefixIndex()
    with ZmqEventPublisher(LOOP, LOOP, topic="kv", fmt="array") as pub:
        for _ in range(5):  # before the adapter exists: learned through catch-up
            pub.publish(batch(eng.store(eng.prompt())))
        ad = make_adapter(pub, index.apply)
        await ad.start()
        try:
            await ad.wait_ready(5)
            assert ad.last_seqs() == {0: 4}
            assert index.worker_hashes("eng-a") == eng.expected()

            dropping = 0
            for i in range(30):
                if i % 7 == 3:
                    pub.drop_next(3)
                    dropping = 3
                p = eng.prompt()
                # shared prefixes: the second store chains to the first
                events: list[BlockStored | BlockRemoved | None] = [eng.store(p), eng.store(p + eng.prompt(1))]
                if i % 4 == 0:
                    events.append(eng.evict(2))
                seq = pub.publish(batch(*events))
                if dropping:
                    dropping -= 1
                else:  # sent: let the adapter see it (and fill any gap) first
                    await wait_until(applied_up_to(ad, seq))
            last = pub.next_seq - 1
            await wait_until(lambda: ad.last_seqs()[0] == last, what="catch up")
            assert index.worker_hashes("eng-a") == eng.expected()
            s = ad.stats()
            assert s["gaps"] == s["gaps_replayed"] == 4  # i = 3, 10, 17, 24
            assert s["resets"] == 0 and s["decode_errors"] == 0
            assert s["batches"] == last + 1  # every batch applied exactly once
            assert ad.mapper().stats.unknown_parent == 0
        finally:
            await ad.stop()


async def test_replay_buffer_too_small_resets_the_worker() -> None:
    eng = ToyEngine(2)
    sink = DictSink()
    with ZmqEventPublisher(LOOP, LOOP, topic="kv", buffer_steps=3) as pub:
        ad = make_adapter(pub, sink)
        await ad.start()
        try:
            await ad.wait_ready(5)
            for _ in range(3):
                pub.publish(batch(eng.store(eng.prompt())))
            await wait_until(lambda: ad.last_seqs()[0] == pub.next_seq - 1)
            assert sink.state["eng-a"] == eng.expected()

            pub.drop_next(8)  # lost on the wire; the buffer keeps only the last 3
            kept: set[int] = set()
            for i in range(8):
                ev = fresh(eng.store(eng.prompt()))
                if i >= 6:  # with the next one, the 3 the buffer still has
                    kept.update(block_hashes(ev.token_ids, BS, root_seed(MODEL)))
                pub.publish(batch(ev))
            ev = fresh(eng.store(eng.prompt()))
            kept.update(block_hashes(ev.token_ids, BS, root_seed(MODEL)))
            pub.publish(batch(ev))
            await wait_until(lambda: ad.last_seqs()[0] == pub.next_seq - 1)

            s = ad.stats()
            assert s["resets"] == 1
            # No snapshot over the wire: what survives is what was published
            # after the reset point (replayed remainder + live).
            assert sink.state["eng-a"] == kept
            clears = [d for d in sink.deltas if d.ops and d.ops[0].kind == OP_CLEAR]
            assert len(clears) == 1 and clears[0].seq == -1
        finally:
            await ad.stop()


async def test_data_parallel_ranks_are_separate_workers() -> None:
    base, rbase = free_consecutive_ports(2), free_consecutive_ports(2)
    engines = [ToyEngine(10), ToyEngine(11)]
    pubs = [
        ZmqEventPublisher(
            f"tcp://127.0.0.1:{base}",
            f"tcp://127.0.0.1:{rbase}",
            topic="kv",
            data_parallel_rank=r,
            bind=True,
        )
        for r in range(2)
    ]
    assert pubs[1].endpoint == f"tcp://127.0.0.1:{base + 1}"
    assert pubs[1].replay_endpoint == f"tcp://127.0.0.1:{rbase + 1}"
    sink = DictSink()
    ad = EventAdapter(
        "eng-dp",
        MODEL,
        f"tcp://127.0.0.1:{base}",
        f"tcp://127.0.0.1:{rbase}",
        topic="kv",
        data_parallel_size=2,
        sink=sink,
        config=EventAdapterConfig(replay_timeout=0.5),
        block_size=BS,
    )
    await ad.start()
    try:
        await ad.wait_ready(5)
        pubs[1].drop_next(2)
        for i in range(10):
            for r in (0, 1):
                if i < 10 - 3 * r:  # rank 1 publishes fewer: its own sequence
                    pubs[r].publish(batch(engines[r].store(engines[r].prompt())))
        await wait_until(lambda: ad.last_seqs() == {0: 9, 1: 6})
        assert sink.state["eng-dp"] == engines[0].expected()
        assert sink.state["eng-dp#dp1"] == engines[1].expected()
        s = ad.stats()
        # Rank 1's two lost batches came from its own replay socket (as a gap,
        # or by the start-up catch-up when that ran late); rank 0 lost none.
        assert s["ranks"][1]["replayed_batches"] >= 2 and s["ranks"][1]["resets"] == 0
        assert s["ranks"][0]["gaps"] == 0 and s["ranks"][0]["resets"] == 0
    finally:
        await ad.stop()
        for p in pubs:
            p.close()


async def test_malformed_input_is_counted_and_the_adapter_keeps_going() -> None:
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)  # a raw engine that sees the subscription arrive
    xpub.bind(LOOP)
    ep = xpub.getsockopt_string(zmq.LAST_ENDPOINT)
    eng = ToyEngine(3)
    sink = DictSink()
    ad = EventAdapter("raw", MODEL, ep, None, topic="kv", sink=sink, block_size=BS)
    await ad.start()
    try:
        await ad.wait_ready(5)
        deadline = time.monotonic() + 5
        while not xpub.poll(20):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert xpub.recv() == b"\x01kv"

        good0 = encode_batch(batch(eng.store(eng.prompt())))
        xpub.send_multipart([b"kv", encode_seq(0), good0])
        xpub.send_multipart([b"kv", encode_seq(1), good0[:-3]])  # truncated msgpack
        xpub.send_multipart([b"kv", b"\x00\x01", good0])  # bad seq frame
        xpub.send_multipart([b"kv", encode_seq(2), b"\x93\xa1x\x90\x00"])  # ts is a str
        good3 = encode_batch(batch(eng.store(eng.prompt())))
        xpub.send_multipart([b"kv", encode_seq(3), good3])
        await wait_until(lambda: ad.last_seqs()[0] == 3)
        s = ad.stats()
        assert s["decode_errors"] == 3
        assert s["batches"] == 2 and s["resets"] == 0
        assert sink.state["raw"] == eng.expected()  # nothing of the bad ones applied
        assert [d.seq for d in sink.deltas] == [0, 1, 2, 3]  # 1, 2 consumed empty
        assert sink.deltas[1].ops == [] and sink.deltas[2].ops == []

        # seq 4 arrives broken (its seq frame is lost with it) and there is no
        # replay socket: the gap is a counted reset, and the adapter goes on
        xpub.send_multipart([b"kv", encode_seq(4)])  # two frames
        ev5 = fresh(eng.store(eng.prompt()))
        xpub.send_multipart([b"kv", encode_seq(5), encode_batch(batch(ev5))])
        await wait_until(lambda: ad.last_seqs()[0] == 5)
        s = ad.stats()
        assert s["decode_errors"] == 4 and s["resets"] == 1
        assert sink.state["raw"] == set(block_hashes(ev5.token_ids, BS, root_seed(MODEL)))

        # a sequence number whose successor no frame holds (a replay request
        # asks for the next one): refused, and the reader goes on
        xpub.send_multipart([b"kv", encode_seq(2**63 - 1), encode_batch(batch(ev5))])
        xpub.send_multipart([b"kv", encode_seq(6), encode_batch(batch(eng.store(eng.prompt())))])
        await wait_until(lambda: ad.last_seqs()[0] == 6)
        s = ad.stats()
        assert s["decode_errors"] == 5 and s["reader_failures"] == 0
    finally:
        await ad.stop()
        ctx.destroy(linger=0)


async def test_a_reader_that_fails_is_said_so_and_started_again() -> None:
    # An endpoint ZMQ refuses when the socket connects (the node checks a
    # registration's, but a reader may fail for any reason): logged, counted,
    # in events_refused, and tried again after a pause, never silently gone.
    with structlog.testing.capture_logs() as logs:
        ad = EventAdapter(
            "bad", MODEL, "tcp://127.0.0.1:abc", None, topic="kv", sink=DictSink(), block_size=BS
        )
        await ad.start()
        try:
            await ad.wait_ready(5)
            await wait_until(lambda: ad.stats()["reader_failures"] >= 2, timeout=5)
            assert ad.events_refused.startswith("event reader of bad failed (ZMQError")
        finally:
            await ad.stop()
    failed = [e for e in logs if e["event"] == "adapter.reader_failed"]
    assert len(failed) >= 2 and failed[0]["worker"] == "bad" and failed[0]["retry_in"] == 1.0


async def test_resume_from_start_seq_replays_only_what_follows() -> None:
    eng = ToyEngine(4)
    with ZmqEventPublisher(LOOP, LOOP, topic="kv") as pub:
        published = [batch(eng.store(eng.prompt())) for _ in range(6)]
        for b in published:
            pub.publish(b)
        # The previous owner applied seq 0..3; the mesh hands over its last
        # seq and its engine->router mapping (BlockMapper.export/restore).
        old = BlockMapper(MODEL, "eng-a")
        sink = DictSink()
        for seq, b in enumerate(published[:4]):
            sink(old.map_batch(b.events, seq))
        m = BlockMapper(MODEL)
        m.restore(old.export())
        handed = len(sink.deltas)

        ad = make_adapter(pub, sink, start_seqs={0: 3}, mappers={0: m})
        await ad.start()
        try:
            await ad.wait_ready(5)  # catch-up needs no live message
            assert [d.seq for d in sink.deltas[handed:]] == [4, 5]
            assert sink.state["eng-a"] == eng.expected()
            pub.publish(batch(eng.evict(3), eng.store(eng.prompt())))
            await wait_until(lambda: ad.last_seqs()[0] == 6)
            assert sink.state["eng-a"] == eng.expected()
            assert ad.stats()["resets"] == 0 and ad.mapper().stats.unknown_removed == 0
        finally:
            await ad.stop()


async def test_a_new_owner_finds_a_restart_the_log_does_not_show() -> None:
    # The previous owner applied the old process' batches 0..7 and died; the
    # engine was restarted meanwhile and its new process published 3 batches
    # (0..2) that never reached the log. Resuming after seq 7 would skip
    # them, and a quiet engine would leave its new cache unknown for good.
    old_eng = ToyEngine(9)
    prev = BlockMapper(MODEL, "eng-a")
    sink = DictSink()
    for seq in range(8):
        sink(prev.map_batch(batch(old_eng.store(old_eng.prompt())).events, seq))
    m = BlockMapper(MODEL)
    m.restore(prev.export())
    new_eng = ToyEngine(10)
    with ZmqEventPublisher(LOOP, LOOP, topic="kv") as pub:  # the new process, counting from 0
        for _ in range(3):
            pub.publish(batch(new_eng.store(new_eng.prompt())))
        ad = make_adapter(pub, sink, start_seqs={0: 7}, mappers={0: m})
        await ad.start()
        try:
            await ad.wait_ready(5)
            assert ad.stats()["restarts"] == 1 and ad.last_seqs()[0] == 2
            assert sink.state["eng-a"] == new_eng.expected()  # the old cache cleared, the new one known
        finally:
            await ad.stop()


async def test_a_probe_finds_a_restart_whose_batches_were_missed_live() -> None:
    # The new owner resumed after the old process' seq 7 while the new one
    # had published nothing; its first batches then never arrive live (here:
    # on a topic the adapter does not subscribe to, as batches published in
    # ZMQ's slow-joiner window are lost) and the engine goes quiet. A probe
    # asking for what follows seq 7 gets nothing; asking for seq 7 itself
    # shows the engine's numbering started over.
    with ZmqEventPublisher(LOOP, LOOP, topic="elsewhere") as pub:
        sink = DictSink()
        cfg = EventAdapterConfig(replay_timeout=0.3, replay_probe_after=0.3)
        ad = make_adapter(pub, sink, start_seqs={0: 7}, config=cfg)
        await ad.start()
        try:
            await ad.wait_ready(5)
            assert ad.stats()["restarts"] == 0  # nothing published yet: nothing to tell
            new_eng = ToyEngine(11)
            for _ in range(2):
                pub.publish(batch(new_eng.store(new_eng.prompt())))
            await wait_until(lambda: ad.stats()["restarts"] == 1, what="restart found by a probe")
            await wait_until(lambda: ad.last_seqs()[0] == 1)
            assert sink.state["eng-a"] == new_eng.expected()
        finally:
            await ad.stop()


async def test_engine_restart_resets_the_worker() -> None:
    old = ToyEngine(5)
    ep, rep, pub, sink, ad = on_fixed_ports("eng-r", EventAdapterConfig(replay_timeout=0.5))
    await ad.start()
    try:
        await ad.wait_ready(5)
        for _ in range(5):
            pub.publish(batch(old.store(old.prompt())))
        await wait_until(lambda: ad.last_seqs()[0] == 4)
        assert sink.state["eng-r"] == old.expected()
        pub.close()

        new = ToyEngine(6)  # a new process: empty cache, count from 0
        pub = ZmqEventPublisher(ep, rep, topic="kv", bind=True)
        deadline = time.monotonic() + 10
        while ad.stats()["restarts"] == 0:
            assert time.monotonic() < deadline, "restart not detected"
            pub.publish(batch(new.store(new.prompt())))
            await asyncio.sleep(0.05)
        await wait_until(lambda: ad.last_seqs()[0] == pub.next_seq - 1)
        assert sink.state["eng-r"] == new.expected()
        assert ad.stats()["restarts"] == 1
    finally:
        await ad.stop()
        pub.close()


async def test_an_engine_restarted_quiet_is_found_by_its_probe() -> None:
    # A new process on the same ports that has published nothing yet: the
    # first probe answered after the outage finds that it does not hold the
    # last batch applied, and the worker is cleared at once (not at the new
    # process' first batch, meanwhile routing to blocks it no longer holds).
    old = ToyEngine(7)
    cfg = EventAdapterConfig(replay_timeout=0.3, replay_probe_after=0.3)
    ep, rep, pub, sink, ad = on_fixed_ports("eng-q", cfg)
    await ad.start()
    try:
        await ad.wait_ready(5)
        for _ in range(3):
            pub.publish(batch(old.store(old.prompt())))
        await wait_until(lambda: ad.last_seqs()[0] == 2)
        # Probes that went unanswered, the same process answering again: it
        # still holds the last batch, so nothing is reset.
        ad._ranks[0].probe_failing = True
        probes = ad.stats()["probes"]
        await wait_until(lambda: ad.stats()["probes"] >= probes + 2 and not ad._ranks[0].probe_failing)
        assert ad.stats()["restarts"] == 0 and sink.state["eng-q"] == old.expected()
        pub.close()
        failing = ad.stats()["replay_failures"]
        await wait_until(lambda: ad.stats()["replay_failures"] > failing)  # the engine is gone
        pub = ZmqEventPublisher(ep, rep, topic="kv", bind=True)  # back, as a new process, quiet
        await wait_until(lambda: ad.stats()["restarts"] == 1, timeout=10)
        assert not sink.state.get("eng-q")  # cleared before any batch of the new process
        assert pub.next_seq == 0
        new = ToyEngine(8)
        pub.publish(batch(new.store(new.prompt())))
        await wait_until(lambda: ad.last_seqs()[0] == 0)
        assert sink.state["eng-q"] == new.expected() and ad.stats()["restarts"] == 1
    finally:
        await ad.stop()
        pub.close()


async def test_a_probe_of_an_engine_that_does_not_answer_asks_once() -> None:
    # An engine that is down leaves its replay socket unanswered: the probe's
    # restart check waits one timeout, and the probe ends there rather than
    # asking for a replay and waiting as long again.
    import zmq.asyncio

    eng = ToyEngine(9)
    _, rep, pub, sink, ad = on_fixed_ports(
        "eng-d", EventAdapterConfig(replay_timeout=0.2, replay_probe_after=0.2)
    )
    await ad.start()
    silent = None
    try:
        await ad.wait_ready(5)
        for _ in range(3):
            pub.publish(batch(eng.store(eng.prompt())))
        await wait_until(lambda: ad.last_seqs()[0] == 2)
        pub.close()
        ctx = zmq.asyncio.Context.instance()
        silent = ctx.socket(zmq.ROUTER)  # takes requests on the replay port, never answers
        silent.bind(rep)
        asked = 0

        async def count() -> None:
            nonlocal asked
            while True:
                await silent.recv_multipart()
                asked += 1

        counter = asyncio.create_task(count())
        await wait_until(lambda: asked >= 1, what="a probe's request")
        probes = ad.stats()["probes"]
        await wait_until(lambda: ad.stats()["probes"] >= probes + 4, timeout=10)
        done = ad.stats()["probes"] - probes
        counter.cancel()
        assert asked <= done + 2, (asked, done)  # one request a probe (two were asked before)
        assert ad.stats()["replay_failures"] >= done and ad._ranks[0].probe_failing
        assert sink.state["eng-d"] == eng.expected()  # an engine that is down keeps its index
    finally:
        await ad.stop()
        if silent is not None:
            silent.close(linger=0)


def test_replay_larger_than_the_default_zmq_hwm_arrives_whole() -> None:
    # A ROUTER drops messages past its send HWM (default 1000) silently; our
    # publisher lifts it so a replay of thousands of batches arrives whole.
    ctx = zmq.Context()
    with ZmqEventPublisher(LOOP, LOOP, topic="kv", buffer_steps=10_000) as pub:
        for _ in range(3000):
            pub.publish(batch(BlockRemoved([1])))
        assert pub.replay_endpoint is not None
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.RCVHWM, 0)
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart([b"", encode_seq(0)])
        seqs = []
        while dealer.poll(2000):
            f = dealer.recv_multipart()
            if f[2] == END_SEQ:
                break
            seqs.append(decode_seq(f[2]))
        assert seqs == list(range(3000))
    ctx.destroy(linger=0)


async def test_adapter_recovers_a_replay_truncated_by_a_vllm_like_router_hwm() -> None:
    eng = ToyEngine(7)
    sink = DictSink()
    # replay_hwm=1000: the ROUTER drops replies like a stock vLLM engine does
    with ZmqEventPublisher(LOOP, LOOP, topic="kv", buffer_steps=10_000, replay_hwm=1000) as pub:
        ad = make_adapter(pub, sink)
        await ad.start()
        try:
            await ad.wait_ready(5)
            pub.drop_next(3000)
            for _ in range(3001):
                pub.publish(batch(eng.store(eng.prompt(1))))
            await wait_until(lambda: ad.last_seqs()[0] == 3000, timeout=30)
            s = ad.stats()
            assert s["gaps_replayed"] == 1 and s["resets"] == 0
            assert s["replayed_batches"] == 3001 and s["batches"] == 3001
            assert sink.state["eng-a"] == eng.expected()
        finally:
            await ad.stop()


async def test_mesh_handover_gives_the_new_owner_the_mapping() -> None:
    """Owner A's adapter writes the engine's deltas to the mesh log; B takes
    over from the log alone (resume point + engine->router mapping), replays
    what A missed from the engine and goes on live: removals of, and stores
    chained to, blocks A saw stored are mapped exactly."""
    eng = ToyEngine(9)
    a = MeshState("n-a", 0.0, random.Random(1), hint_ttl=2.0)
    b = MeshState("n-b", 0.0, random.Random(2), hint_ttl=2.0)
    b.apply_remote(a.take_ownership("eng-a", 0.0).message, 0.0)

    def sink_a(d: KvDelta) -> None:
        b.apply_remote(decode_delta(encode_payload(a.local_deltas("eng-a", [d]))), 0.0)

    def sink_b(d: KvDelta) -> None:
        b.local_deltas("eng-a", [d])

    with ZmqEventPublisher(LOOP, LOOP, topic="kv") as pub:
        prompts = [eng.prompt(3) for _ in range(6)]
        for p in prompts:
            pub.publish(batch(eng.store(p)))
        ad = make_adapter(pub, sink_a)
        await ad.start()
        try:
            await wait_until(lambda: ad.last_seqs()[0] == 5, what="A caught up")
        finally:
            await ad.stop()
        before = set(ad.mapper().block_map.to_router)
        # while nobody owns the engine: evictions and prompts extending cached ones
        pub.publish(batch(eng.evict(4), eng.store(prompts[0] + eng.prompt(2))))
        pub.publish(batch(eng.store(prompts[1] + eng.prompt(1)), eng.evict(2)))

        t = b.take_ownership("eng-a", 1.0)
        assert t.resume == {"eng-a": 6}
        mapper = BlockMapper.from_pairs(MODEL, "eng-a", t.mappings["eng-a"])
        assert mapper.block_map == ad.mapper().block_map
        ad_b = make_adapter(pub, sink_b, start_seqs={0: t.resume["eng-a"] - 1}, mappers={0: mapper})
        await ad_b.start()
        try:
            await wait_until(lambda: ad_b.last_seqs()[0] == 7, what="B replayed")
            assert b.logs["eng-a"].materialise()["eng-a"] == eng.expected()
            removed_old = before - set(eng.live)
            pub.publish(batch(eng.evict(5), eng.store(prompts[2] + eng.prompt(1))))
            await wait_until(lambda: ad_b.last_seqs()[0] == 8, what="B live")
            assert b.logs["eng-a"].materialise()["eng-a"] == eng.expected()
            assert removed_old  # the scenario removes blocks A mapped
            st = ad_b.mapper().stats
            assert st.unknown_removed == 0 and st.unknown_parent == 0
            assert ad_b.stats()["resets"] == 0
        finally:
            await ad_b.stop()


# --- block size and cache tiers --------------------------------------------------


async def test_a_block_size_mismatch_is_refused_logged_once_and_reported() -> None:
    eng = ToyEngine(11)
    with structlog.testing.capture_logs() as logs, ZmqEventPublisher(LOOP, LOOP, topic="kv") as pub:
        sink = DictSink()
        ad = make_adapter(pub, sink, block_size=16)  # the engine sends blocks of BS = 4
        await ad.start()
        try:
            await ad.wait_ready(5)
            for _ in range(3):
                pub.publish(batch(eng.store(eng.prompt())))
            await wait_until(applied_up_to(ad, 2))
            assert sink.state.get("eng-a", set()) == set()  # never silent zeros: nothing indexed ...
            st = ad.stats()
            assert st["block_size_mismatch"] == BS and st["skipped_by_reason"] == {"block_size_mismatch": 3}
            assert st["events_refused"] == (
                "block size mismatch: the engine's KV events carry blocks of 4 tokens, "
                "it is registered with block_size 16"
            )
        finally:
            await ad.stop()
    mismatch = [e for e in logs if e["event"] == "adapter.block_size_mismatch"]
    assert len(mismatch) == 1  # ... and said once, with the fix
    (line,) = mismatch
    assert line["log_level"] == "warning" and line["engine"] == "eng-a"
    assert line["registered_block_size"] == 16 and line["event_block_size"] == BS
    assert "--page-size 16" in line["fix"] and "--block-size 16" in line["fix"]
    assert not [e for e in logs if e["event"] == "adapter.event_skipped" and e["log_level"] == "warning"]


async def test_the_host_tier_of_a_simulated_engine_is_indexed_tier_by_tier() -> None:
    from blocks.tiers import TIER_GPU, TIER_HOST
    from engine_adapters.completion_request import Tenancy
    from engine_adapters.sim_engine.cache import PrefixCache, snapshot_router_hashes

    cache = PrefixCache(6, BS, num_host_blocks=8)
    index = PrefixIndex()
    rng = random.Random(4)
    with ZmqEventPublisher(LOOP, LOOP, topic="kv") as pub:
        ad = make_adapter(pub, index.apply)
        await ad.start()
        try:
            await ad.wait_ready(5)
            for i in range(12):
                prompt = [rng.randrange(3) for _ in range(3 * BS)] + [9]  # a tiny alphabet: shared prefixes
                cache.allocate(f"r{i}", prompt, tenancy=Tenancy())
                cache.commit_full_blocks(f"r{i}", prompt)
                cache.release(f"r{i}")
                pub.publish(batch(*cache.drain_events()))
            await wait_until(applied_up_to(ad, 11))
        finally:
            await ad.stop()
    gpu_rows = cache.snapshot()
    rows = gpu_rows + [r for r in cache.host_snapshot() if r["hash"] not in cache.cached_hashes()]
    assert cache.host_hashes(), "the pool never evicted: the test proves nothing"
    assert index.worker_hashes("eng-a", TIER_GPU) == snapshot_router_hashes(gpu_rows, MODEL)
    host = snapshot_router_hashes(rows, MODEL, of=cache.host_hashes())
    assert index.worker_hashes("eng-a", TIER_HOST) == host
