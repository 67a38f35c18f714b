"""A vLLM-compatible KV-event publisher: ZMQ PUB plus a ROUTER replay socket.

Wire behaviour follows ``ZmqEventPublisher`` in ``vllm/distributed/kv_events.py``
(vLLM main after 0.24, read 2026; replies carry the topic):

- PUB, three frames per batch: ``[topic, seq (8 bytes big-endian), payload]``;
  ``seq`` starts at 0 per publisher.
- Replay: a ROUTER socket. A client (DEALER with an empty delimiter frame, or
  REQ) sends the 8-byte start sequence; the publisher answers with every
  buffered batch whose seq >= start as ``[b"", topic, seq, payload]`` and then
  the end marker ``[b"", b"", END_SEQ, b""]`` (a REQ client sees the same
  without the leading empty frame), as vLLM 0.33 and SGLang 0.5.23 do
  (tests/fixtures/golden/, made by their own publishers). vLLM up to 0.24
  sends ``[seq, payload]`` / ``[END_SEQ, b""]`` instead; the kvmesh adapter
  reads both.
- Data parallel: rank ``r`` uses port ``base + r`` on both sockets. Endpoints
  containing ``*`` or ``::`` (and ipc/inproc) bind, others connect ("bind
  stable, connect volatile"). kvmesh addition: port 0 always binds (an
  ephemeral port cannot be connected to), and ``.endpoint`` /
  ``.replay_endpoint`` report the address actually bound.

Unlike vLLM, ``publish`` sends synchronously (no queue thread): a send on PUB
never blocks (messages past the high-water mark are dropped, and the replay
buffer still has them), so the caller's event loop is held only for the
encode and the send. The replay socket is served by a daemon thread.

Fault injection (the simulator's, not vLLM's): :meth:`ZmqEventPublisher.drop_next`
loses the next n batches on PUB while they still get their sequence numbers
and stay in the replay buffer, which is what a subscriber sees when the
network drops messages (``POST /admin/drop_events``; the event adapter's
tests use it on a bare publisher). It lives in its own section of the class
rather than in a wrapper because the loss has to happen between buffering
and sending, under the lock that orders the two; a wrapper around
``publish`` could only drop a batch before it is numbered and buffered.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque

import msgspec
import structlog
import zmq

from engine_adapters.kv_endpoints import offset_endpoint_port, should_bind
from engine_adapters.kv_events import END_SEQ, KVEventBatch, encode_batch, encode_seq
from engine_adapters.sim_engine.config import DEFAULTS, EVENT_FORMATS, EventFormat

log = structlog.get_logger(__name__)

_POLL_MS = 50  # replay thread wakes this often to notice close()


class ZmqEventPublisher:
    """Publishes ``KVEventBatch``es like a vLLM engine; thread-safe."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str = DEFAULTS.kv_topic,
        buffer_steps: int = DEFAULTS.kv_buffer_steps,
        fmt: EventFormat = DEFAULTS.kv_event_format,
        data_parallel_rank: int = DEFAULTS.data_parallel_rank,
        *,
        hwm: int = 100_000,
        replay_hwm: int = 0,
        bind: bool | None = None,
    ) -> None:
        if buffer_steps <= 0:
            raise ValueError("buffer_steps must be positive")
        if fmt not in EVENT_FORMATS:
            raise ValueError(f"fmt must be one of {EVENT_FORMATS}, not {fmt!r}")
        self._fmt: EventFormat = fmt
        self._rank = data_parallel_rank
        self._topic = topic.encode("utf-8")
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = itertools.count()
        self._next_seq = 0
        self._drop = 0  # fault injection: batches still to lose on PUB
        self._lock = threading.Lock()  # guards PUB socket, seq, buffer, drop count
        self._closed = False

        self._ctx = zmq.Context()  # own context: close() can terminate it safely
        ep = offset_endpoint_port(endpoint, data_parallel_rank)
        assert ep is not None
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if bind if bind is not None else should_bind(ep):
            self._pub.bind(ep)
            self._endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._pub.connect(ep)
            self._endpoint = ep

        self._replay: zmq.Socket[bytes] | None = None
        self._replay_endpoint: str | None = None
        self._thread: threading.Thread | None = None
        rep = offset_endpoint_port(replay_endpoint, data_parallel_rank)
        if rep is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            # A replay answers up to buffer_steps messages at once; with the
            # default HWM of 1000 (what vLLM uses) a ROUTER silently drops the
            # rest. 0 = unlimited; tests set 1000 to behave like vLLM.
            self._replay.setsockopt(zmq.SNDHWM, replay_hwm)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(rep)  # vLLM always binds the replay socket
            self._replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
            self._thread = threading.Thread(
                target=self._serve_replay, name=f"kv-replay-dp{data_parallel_rank}", daemon=True
            )
            self._thread.start()
        log.info(
            "sim.kv_publisher_started",
            endpoint=self._endpoint,
            replay_endpoint=self._replay_endpoint,
            dp_rank=data_parallel_rank,
            fmt=fmt,
        )

    # --- public API -----------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def replay_endpoint(self) -> str | None:
        return self._replay_endpoint

    @property
    def data_parallel_rank(self) -> int:
        return self._rank

    @property
    def next_seq(self) -> int:
        """The sequence number the next published batch will get."""
        return self._next_seq

    def publish(self, batch: KVEventBatch) -> int:
        """Encode, send on PUB and buffer for replay; returns the batch's seq."""
        if batch.data_parallel_rank is None and batch.attn_dp_rank is None:
            batch = msgspec.structs.replace(batch, data_parallel_rank=self._rank)
        payload = encode_batch(batch, self._fmt)
        with self._lock:
            if self._closed:
                raise RuntimeError("publisher is closed")
            seq = next(self._seq)
            self._next_seq = seq + 1
            self._buffer.append((seq, payload))
            if self._lose_this_batch():
                return seq
            try:
                self._pub.send_multipart((self._topic, encode_seq(seq), payload), flags=zmq.NOBLOCK)
            except zmq.Again:
                # Past the HWM: the subscriber sees a gap and replays.
                log.warning("sim.kv_send_dropped", seq=seq, endpoint=self._endpoint)
        return seq

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()
        log.info("sim.kv_publisher_closed", endpoint=self._endpoint)

    def __enter__(self) -> ZmqEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- fault injection (the simulator's; vLLM's publisher has none) ---------

    def drop_next(self, n: int) -> None:
        """Lose the next ``n`` batches on PUB; they stay numbered and replayable."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._drop += n

    def _lose_this_batch(self) -> bool:
        """Whether the batch being published is one to lose (lock held)."""
        if self._drop > 0:
            self._drop -= 1
            return True
        return False

    # --- replay ---------------------------------------------------------------

    def _buffered_from(self, start: int) -> list[tuple[int, bytes]]:
        with self._lock:
            if not self._buffer:
                return []
            # Sequence numbers in the buffer are consecutive: index directly.
            first = self._buffer[0][0]
            skip = max(0, start - first)
            return list(itertools.islice(self._buffer, skip, None))

    def _serve_replay(self) -> None:
        sock = self._replay
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self._closed:
            try:
                if not poller.poll(_POLL_MS):
                    continue
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                if self._closed:
                    return
                log.exception("sim.kv_replay_recv_failed", endpoint=self._replay_endpoint)
                continue
            try:
                self._answer(sock, frames)
            except zmq.ZMQError:
                if self._closed:
                    return
                log.exception("sim.kv_replay_send_failed", endpoint=self._replay_endpoint)

    def _answer(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        # [identity, b"", start] from DEALER/REQ (vLLM's shape); also accept a
        # bare [identity, start] and answer it in the same shape.
        if len(frames) == 3 and frames[1] == b"":
            head = [frames[0], b""]
            start_frame = frames[2]
        elif len(frames) == 2:
            head = [frames[0]]
            start_frame = frames[1]
        else:
            log.warning("sim.kv_replay_bad_request", frames=len(frames))
            return
        if len(start_frame) != 8:
            log.warning("sim.kv_replay_bad_start_seq", size=len(start_frame))
            sock.send_multipart([*head, b"", END_SEQ, b""])
            return
        start = int.from_bytes(start_frame, "big")
        batches = self._buffered_from(start)
        for seq, payload in batches:
            sock.send_multipart([*head, self._topic, encode_seq(seq), payload])
        sock.send_multipart([*head, b"", END_SEQ, b""])
        log.debug("sim.kv_replay_served", start=start, count=len(batches), dp_rank=self._rank)
