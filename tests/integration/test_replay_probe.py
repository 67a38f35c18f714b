"""Quiet workers are probed (EventAdapterConfig.replay_probe_after), over real
ZMQ on loopback: a batch lost on PUB with no later batch to reveal the gap is
fetched from the replay socket; busy workers are not probed; a probe never
overlaps a gap replay of the same worker."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest
import zmq

from engine_adapters.event_adapter import EventAdapter, EventAdapterConfig
from engine_adapters.kv_events import END_SEQ, AllBlocksCleared, encode_seq
from engine_adapters.sim_engine.publisher import ZmqEventPublisher
from router.index import PrefixIndex
from tests.integration.test_event_adapter import BS, LOOP, MODEL, ToyEngine, batch, wait_until

pytestmark = pytest.mark.timeout(60)

PROBE_AFTER = 0.3
CFG = EventAdapterConfig(replay_timeout=0.5, replay_retries=2, replay_probe_after=PROBE_AFTER)


def adapter(kv: str, replay: str | None, index: PrefixIndex, cfg: EventAdapterConfig = CFG) -> EventAdapter:
    return EventAdapter("eng-a", MODEL, kv, replay, topic="kv", sink=index.apply, config=cfg, block_size=BS)


async def _warm(pub: ZmqEventPublisher, ad: EventAdapter, eng: ToyEngine, n: int = 5) -> None:
    """A few batches through the live stream, all applied."""
    await ad.start()
    await ad.wait_ready(5)
    for _ in range(n):
        pub.publish(batch(eng.store(eng.prompt())))
    await wait_until(lambda: ad.last_seqs()[0] == pub.next_seq - 1, what="warm-up batches")


async def test_a_lost_last_batch_is_applied_by_a_probe() -> None:
    eng = ToyEngine(21)
    index = PrefixIndex()
    with ZmqEventPublisher(LOOP, LOOP, topic="kv") as pub:
        ad = adapter(pub.endpoint, pub.replay_endpoint, index)
        try:
            await _warm(pub, ad, eng)
            assert index.worker_hashes("eng-a") == eng.expected()
            pub.drop_next(1)
            t0 = time.monotonic()
            last = pub.publish(batch(eng.store(eng.prompt()), eng.evict(3)))  # lost; the engine goes quiet
            await wait_until(lambda: ad.last_seqs()[0] == last, 5 * PROBE_AFTER + 2, "the probe")
            took = time.monotonic() - t0
            assert index.worker_hashes("eng-a") == eng.expected()
            s = ad.stats()
            assert s["probes"] >= 1 and s["probe_batches"] == 1, s
            assert s["gaps"] == 0 and s["resets"] == 0 and s["batches"] == last + 1, s
            # Found within a probe period (plus the poll that noticed the quiet).
            assert took < 2 * PROBE_AFTER + 1.0, took
            print(f"lost last batch applied after {took * 1000:.0f} ms (probe after {PROBE_AFTER} s)")
        finally:
            await ad.stop()


async def test_a_lost_final_all_blocks_cleared_leaves_no_ghost_blocks() -> None:
    eng = ToyEngine(22)
    index = PrefixIndex()
    with ZmqEventPublisher(LOOP, LOOP, topic="kv") as pub:
        ad = adapter(pub.endpoint, pub.replay_endpoint, index)
        try:
            await _warm(pub, ad, eng, n=8)
            assert len(index.worker_hashes("eng-a")) >= 8
            pub.drop_next(1)
            pub.publish(batch(AllBlocksCleared()))  # vLLM's reset_prefix_cache, lost on the wire
            await wait_until(lambda: not index.worker_hashes("eng-a"), 5 * PROBE_AFTER + 2, "the clear")
            assert ad.stats()["probe_batches"] == 1
        finally:
            await ad.stop()


async def test_a_busy_worker_is_not_probed_and_an_empty_probe_is_harmless() -> None:
    eng = ToyEngine(23)
    index = PrefixIndex()
    with ZmqEventPublisher(LOOP, LOOP, topic="kv") as pub:
        # A batch every tenth of the probe period: a stalled loop on a busy
        # machine still leaves each gap far below it.
        after = 1.0
        cfg = EventAdapterConfig(replay_timeout=0.5, replay_retries=2, replay_probe_after=after)
        ad = adapter(pub.endpoint, pub.replay_endpoint, index, cfg)
        try:
            await _warm(pub, ad, eng, n=1)
            probes = ad.stats()["probes"]
            for _ in range(20):
                pub.publish(batch(eng.store(eng.prompt())))
                await asyncio.sleep(after / 10)
            assert ad.stats()["probes"] == probes
            await asyncio.sleep(2.5 * after)  # quiet now: probed, nothing to find
            s = ad.stats()
            assert s["probes"] > probes and s["probe_batches"] == 0, s
            assert s["replay_failures"] == 0 and s["resets"] == 0 and s["gaps"] == 0, s
            assert index.worker_hashes("eng-a") == eng.expected()
        finally:
            await ad.stop()


async def test_no_replay_socket_no_probe_and_zero_switches_probes_off() -> None:
    eng = ToyEngine(24)
    with ZmqEventPublisher(LOOP, LOOP, topic="kv") as pub:
        for replay, cfg in ((None, CFG), (pub.replay_endpoint, EventAdapterConfig(replay_probe_after=0))):
            ad = adapter(pub.endpoint, replay, PrefixIndex(), cfg)
            try:
                await ad.start()
                await ad.wait_ready(5)
                # Without replay the first batches may fall in the ZMQ slow-joiner
                # window for good: publish until one is applied.
                deadline = time.monotonic() + 5
                while ad.last_seqs()[0] != pub.next_seq - 1:
                    assert time.monotonic() < deadline
                    pub.publish(batch(eng.store(eng.prompt())))
                    await asyncio.sleep(0.05)
                await asyncio.sleep(3 * PROBE_AFTER)
                assert ad.stats()["probes"] == 0
            finally:
                await ad.stop()
    with pytest.raises(ValueError, match="replay_probe_after"):
        EventAdapterConfig(replay_probe_after=-1)


class SlowReplay:
    """A replay ROUTER that takes every request in at once, answers each from
    a publisher's buffer ``delay`` seconds after it arrived, and records
    (arrived, answered) per request: overlapping requests show as one that
    arrived before the previous one was answered."""

    def __init__(self, pub: ZmqEventPublisher, delay: float) -> None:
        self.pub = pub
        self.delay = delay
        self.served: list[tuple[float, float]] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(LOOP)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        pending: list[tuple[float, bytes, int]] = []
        while not self._stop.is_set():
            while self._sock.poll(5):
                ident, _, start_frame = self._sock.recv_multipart()
                pending.append((time.monotonic(), ident, int.from_bytes(start_frame, "big")))
            now = time.monotonic()
            for item in [p for p in pending if now >= p[0] + self.delay]:
                pending.remove(item)
                arrived, ident, start = item
                for seq, payload in self.pub._buffered_from(start):
                    self._sock.send_multipart([ident, b"", b"kv", encode_seq(seq), payload])
                self._sock.send_multipart([ident, b"", b"", END_SEQ, b""])
                self.served.append((arrived, time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)
        self._ctx.term()


async def test_a_probe_never_overlaps_a_gap_replay_of_the_same_worker() -> None:
    eng = ToyEngine(25)
    index = PrefixIndex()
    # The replay takes several probe periods: were probes and gap fills
    # independent, a probe would ask while the gap's replay is being served.
    cfg = EventAdapterConfig(replay_timeout=3.0, replay_retries=1, replay_probe_after=0.1)
    with ZmqEventPublisher(LOOP, None, topic="kv") as pub:
        slow = SlowReplay(pub, delay=0.5)
        ad = adapter(pub.endpoint, slow.endpoint, index, cfg)
        try:
            await _warm(pub, ad, eng, n=2)
            pub.drop_next(2)
            for _ in range(3):  # two lost, the third reveals the gap
                pub.publish(batch(eng.store(eng.prompt())))
            await wait_until(lambda: ad.last_seqs()[0] == pub.next_seq - 1, 10, "the gap fill")
            await asyncio.sleep(1.2)  # quiet: a probe or two, one at a time
            s = ad.stats()
            assert s["gaps"] == 1 and s["gaps_replayed"] == 1 and s["probes"] >= 1, s
            assert index.worker_hashes("eng-a") == eng.expected()
            served = sorted(slow.served)
            assert len(served) >= 3, served  # catch-up, the gap fill, probes
            for (_, answered), (arrived, _) in itertools.pairwise(served):
                assert arrived >= answered, served  # each request after the previous answer
        finally:
            await ad.stop()
            slow.close()
