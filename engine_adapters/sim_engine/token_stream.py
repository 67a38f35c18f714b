"""From sampled tokens to the text a handler writes (one request at a time).

The step loop (``step_loop.py``) puts each sampled token (a ``TokenOut``) on
its request's :class:`TokenQueue`; the request's HTTP handler takes them with
:meth:`TokenStreamer.batches`, which turns them into *pieces*
``(token_id, text, finish_reason, stop_reason)``:

- A batch holds every token produced since the handler last asked: one per
  step while the reader keeps up, several when it falls behind, as vLLM's
  output collector merges a slow reader's outputs. The OpenAI stream writes
  one SSE chunk per batch.
- Stop strings are matched in the output text across token boundaries. The
  piece that completes one is cut before it and ends the request with
  ``stop``; text already handed out is not taken back, and tokens queued
  after it are dropped. The core is told to stop early (its cached blocks
  stay cached).
- EOS has no text.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine_adapters.sim_engine.core import FINISH_STOP, EngineCore, TokenOut
from engine_adapters.sim_engine.metrics import EngineMetrics
from engine_adapters.sim_engine.output_vocab import OutputVocab
from engine_adapters.sim_engine.requests import CompletionRequest
from engine_adapters.sim_engine.timing import RunningRequest

# (token_id, text, finish_reason, stop_reason): a tuple, as the stream path
# makes one per token.
Piece = tuple[int, str, str | None, str | None]


class TokenQueue:
    """Step loop -> handler handoff of one request's tokens: ``put_nowait``
    per token, :meth:`take` everything produced since the last call. A deque
    and one waiter, lighter than an ``asyncio.Queue`` on a path taken once per
    token."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[TokenOut] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: TokenOut) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take(self) -> list[TokenOut]:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items


@dataclass(slots=True)
class PendingRequest:
    """An admitted request as its handler and the step loop share it."""

    request_id: str  # the engine's id (``cmpl-...``/``gen-...``), the core's key
    client_id: str  # the id the client gave (or a fresh one), without the prefix
    request: CompletionRequest
    running: RunningRequest
    queue: TokenQueue = field(default_factory=TokenQueue)
    done: bool = False  # finished normally; otherwise the handler's exit aborts it
    served_model: str = ""  # the model or LoRA adapter serving it (responses name it)


class TokenStreamer:
    """Reads pending requests' queues as pieces; one per engine."""

    def __init__(self, core: EngineCore, vocab: OutputVocab, metrics: EngineMetrics) -> None:
        self._core = core
        self._vocab = vocab
        self._metrics = metrics

    async def batches(self, pend: PendingRequest) -> AsyncIterator[list[Piece]]:
        """Every piece produced since the previous batch; the last batch ends
        with the finish reason (see the module docstring)."""
        stops = pend.request.stop
        q = pend.queue
        eos = self._core.eos_token_id
        text_of = self._vocab.text
        text_so_far = ""
        while True:
            outs = await q.take()
            batch: list[Piece] = []
            finish: str | None = None
            for out in outs:
                tok, finish = out.token_id, out.finish_reason
                text = "" if tok == eos else text_of(tok)
                stop_reason: str | None = None
                if stops and finish != FINISH_STOP:
                    cut = _cut_at_stop(text_so_far, text, stops)
                    if cut is not None:
                        text, stop_reason = cut
                        finish = FINISH_STOP
                        self._core.abort(pend.request_id)  # stop early; its cached blocks stay cached
                text_so_far += text
                batch.append((tok, text, finish, stop_reason))
                if finish is not None:
                    pend.done = True
                    now = asyncio.get_running_loop().time()
                    self._metrics.finished(finish, now - pend.running.arrival)
                    break  # anything queued after a stop string is dropped
            yield batch
            if finish is not None:
                return

    async def pieces(self, pend: PendingRequest) -> AsyncIterator[Piece]:
        """The pieces of :meth:`batches`, one at a time."""
        async for batch in self.batches(pend):
            for piece in batch:
                yield piece


def _cut_at_stop(text_so_far: str, text: str, stops: list[str]) -> tuple[str, str] | None:
    """``(text before the stop string, the stop string)`` if ``text``
    completes one of ``stops`` after ``text_so_far``; None otherwise."""
    combined = text_so_far + text
    for s in stops:
        i = combined.find(s, max(0, len(text_so_far) - len(s) + 1))
        if i >= 0:
            return (combined[len(text_so_far) : i] if i > len(text_so_far) else ""), s
    return None
