"""``kvmesh sim-engine``: the simulated vLLM-like engine process (I/O shell).

HTTP (aiohttp), vLLM-compatible where it matters to kvmesh:

- ``POST /v1/completions``: ``prompt`` as token ids or a string (tokenized by
  the builtin tokenizer), ``max_tokens`` (default 16), ``stream`` with SSE
  chunks and ``data: [DONE]`` (a chunk carries every token produced since the
  previous one was written: one per step while the reader keeps up, several
  when it falls behind, as vLLM's output collector merges them),
  ``stream_options.include_usage``, ``return_token_ids`` (vLLM >= 0.10.2:
  ``token_ids`` per chunk, ``prompt_token_ids`` in the first), ``ignore_eos``,
  ``seed``, ``stop`` (strings matched in the output text; text already
  streamed is not taken back), ``X-Request-Id``. Usage carries
  ``prompt_tokens_details.cached_tokens`` (the cached prefix at admission, a
  multiple of the block size). The last
  chunk (or the response) also carries a non-standard ``kvmesh_sim`` object
  with the simulated queue/prefill/TTFT seconds, so tests can see the engine's
  own view. ``temperature``/``top_p`` are accepted and ignored: output is
  deterministic from ``seed`` (or a hash of the prompt).
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus, vLLM
  metric names).
- Test/admin hooks: ``GET /admin/cache`` (list of cached blocks
  ``{hash, parent, tokens}``), ``GET /admin/stats``, ``POST /admin/drop_events
  {"count": n}`` (the next n event batches are lost on PUB but replayable),
  ``POST /admin/clear`` (reset the prefix cache -> ``AllBlocksCleared``).
- SGLang-native, for SGLang's router: ``POST /generate`` (``input_ids`` or
  ``text``, ``sampling_params``, ``stream``; ``meta_info.cached_tokens``),
  ``GET /server_info`` / ``/get_server_info``, ``/model_info`` / ``/get_model_info``.

A scheduler task runs the pure core (``core.py``): plan a step, sleep for its
simulated duration, sample one token per due request, then publish the step's
KV events as ONE ``KVEventBatch`` on ZMQ in vLLM's format.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import structlog
import xxhash
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from engine_adapters.kv_events import KVEventBatch
from engine_adapters.sim_engine.cache import PrefixCache
from engine_adapters.sim_engine.core import (
    FINISH_STOP,
    EngineCore,
    SimRequest,
    TokenOut,
)
from engine_adapters.sim_engine.timing import Seq, TimingConfig
from engine_adapters.tokenizer import BuiltinTokenizer

log = structlog.get_logger(__name__)

_MAX_TOKEN_ID = 2**32 - 1
# Token ids as the request may carry them: JSON integers (not bools, not
# floats) in [0, 2**32). msgspec checks a 2000-token prompt in C.
_TOKEN_IDS = list[Annotated[int, msgspec.Meta(ge=0, le=_MAX_TOKEN_ID)]]
_encode_json = msgspec.json.Encoder().encode
_MAX_CATCHUP_S = 0.005
# Output "words": generated ids decode to readable text with the builtin tokenizer.
_OUTPUT_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "was",
    "be",
    "by",
    "at",
    "this",
    "are",
    "from",
    "or",
    "an",
    "have",
    "not",
    "they",
    "which",
    "one",
    "you",
    "were",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "out",
    "up",
    "into",
    "time",
    "model",
    "cache",
    "token",
    "block",
    "engine",
    "router",
    "prefix",
    "request",
    "fast",
    "memory",
    "batch",
    "layer",
    "value",
    "key",
    "query",
    "stream",
    "mesh",
    "node",
    "data",
    "result",
    "simple",
    "state",
    "event",
    "order",
    "light",
    "river",
    "stone",
    "cloud",
    "green",
    "quiet",
    "bright",
    "north",
    "garden",
    "window",
    "paper",
    "music",
    "story",
    "answer",
    "number",
    "system",
    "signal",
]
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
)  # fmt: skip


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


async def _end_stream(resp: web.StreamResponse, before: bytes = b"") -> web.StreamResponse:
    """Close an SSE stream the OpenAI way (``data: [DONE]``), after ``before``
    (already encoded events), in one write; a client that already went away is
    not an error."""
    try:
        await resp.write_eof(before + b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass
    return resp


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _encode_json(obj) + b"\n\n"


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    kind = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}
    body = {
        "error": {
            "message": message,
            "type": kind.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }
    return web.json_response(body, status=status)


@dataclass(slots=True)
class CompletionParams:
    prompt: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    return_token_ids: bool
    ignore_eos: bool
    seed: int | None
    stop: list[str]
    model: str | None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_completion(body: Any, tokenizer: BuiltinTokenizer) -> CompletionParams:
    """Validate an OpenAI completions body; raises :class:`BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    prompt = body.get("prompt")
    # A batch of exactly one prompt is accepted, as OpenAI clients often send that.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list):
        try:
            ids = msgspec.convert(prompt, _TOKEN_IDS)
        except msgspec.ValidationError:
            raise BadRequest("prompt token ids must be integers in [0, 2**32)", "prompt") from None
    elif prompt is None:
        raise BadRequest("'prompt' is required", "prompt")
    else:
        raise BadRequest("'prompt' must be a string or a list of token ids", "prompt")
    if not ids:
        raise BadRequest("prompt is empty", "prompt")

    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if not _is_int(max_tokens) or max_tokens < 1:
        raise BadRequest("max_tokens must be an integer >= 1", "max_tokens")
    n = body.get("n", 1)
    if n not in (1, None):
        raise BadRequest("only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise BadRequest("seed must be an integer", "seed")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a string or a list of non-empty strings", "stop")
    for key in ("temperature", "top_p"):
        v = body.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
            raise BadRequest(f"{key} must be a non-negative number", key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    return CompletionParams(
        prompt=ids,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(opts.get("include_usage", False)),
        return_token_ids=bool(body.get("return_token_ids", False)),
        ignore_eos=bool(body.get("ignore_eos", False)),
        seed=seed,
        stop=stop,
        model=model,
    )


class _Metrics:
    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        r, lbl = self.registry, ["model_name"]
        self.running = Gauge(
            "vllm:num_requests_running", "Requests in the running batch", lbl, registry=r
        ).labels(model)
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be admitted", lbl, registry=r
        ).labels(model)
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = 100%)", lbl, registry=r
        ).labels(model)
        self.cached_blocks = Gauge(
            "kvmesh_sim_cached_blocks", "Blocks in the prefix cache", lbl, registry=r
        ).labels(model)
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", lbl, registry=r
        ).labels(model)
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", lbl, registry=r
        ).labels(model)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", lbl, registry=r).labels(
            model
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated", lbl, registry=r
        ).labels(model)
        self.success = Counter(
            "vllm:request_success", "Finished requests", lbl + ["finished_reason"], registry=r
        )
        self.model = model
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token", lbl, buckets=_TTFT_BUCKETS, registry=r
        ).labels(model)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency",
            lbl,
            buckets=_E2E_BUCKETS,
            registry=r,
        ).labels(model)
        self.rejected = Counter(
            "kvmesh_sim_requests_rejected", "Requests refused before admission", lbl + ["reason"], registry=r
        )
        self.aborted = Counter(
            "kvmesh_sim_requests_aborted", "Requests aborted (client went away)", lbl, registry=r
        ).labels(model)
        self.event_batches = Counter(
            "kvmesh_sim_kv_event_batches", "KV event batches published", lbl, registry=r
        ).labels(model)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model, reason).inc()


class _TokenQueue:
    """Scheduler -> stream handoff of one request's tokens: ``put_nowait`` per
    token, :meth:`take` everything produced since the last call. A deque and
    one waiter, lighter than an ``asyncio.Queue`` (one per token on the hot path)."""

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
class _Pending:
    params: CompletionParams
    seq: Seq
    queue: _TokenQueue = field(default_factory=_TokenQueue)
    done: bool = False


class SimEngine:
    """Owns the core, the publisher and the HTTP app; one per process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model: str = args.model
        self.tokenizer = BuiltinTokenizer()
        self._out_text = {self.tokenizer.piece_id(" " + w): " " + w for w in _OUTPUT_WORDS}
        hash_seed = args.hash_seed if args.hash_seed is not None else int.from_bytes(os.urandom(8))
        timing = TimingConfig(
            decode_base_ms=args.decode_base_ms,
            decode_per_seq_ms=args.decode_per_seq_ms,
            prefill_ms_per_token=args.prefill_ms_per_token,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            time_scale=args.time_scale,
        )
        self.core = EngineCore(
            PrefixCache(args.num_gpu_blocks, args.block_size, hash_seed=hash_seed),
            timing,
            eos_prob=args.eos_prob,
            output_vocab=sorted(self._out_text),
            max_model_len=args.max_model_len,
        )
        self.metrics = _Metrics(self.model)
        self._fail_rng = random.Random(args.seed)
        self._seed = args.seed
        self._pending: dict[str, _Pending] = {}
        self._wake = asyncio.Event()
        self._created = int(time.time())
        self.publisher: Any = None
        if args.kv_events_endpoint:
            from engine_adapters.sim_engine.publisher import ZmqEventPublisher

            self.publisher = ZmqEventPublisher(
                args.kv_events_endpoint,
                args.kv_replay_endpoint or None,
                topic=args.kv_topic,
                buffer_steps=args.kv_buffer_steps,
                fmt=args.kv_event_format,
                data_parallel_rank=args.data_parallel_rank,
                bind=True,  # the simulator always binds (loopback) its sockets
            )

    # --- HTTP -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/admin/cache", self.admin_cache)
        app.router.add_get("/admin/stats", self.admin_stats)
        app.router.add_post("/admin/drop_events", self.admin_drop_events)
        app.router.add_post("/admin/clear", self.admin_clear)
        # SGLang-native endpoints, so SGLang's own router (sglang-router) can
        # front the simulator: worker discovery and /generate.
        for path in ("/server_info", "/get_server_info"):
            app.router.add_get(path, self.sglang_server_info)
        for path in ("/model_info", "/get_model_info"):
            app.router.add_get(path, self.sglang_model_info)
        app.router.add_post("/generate", self.sglang_generate)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model,
            "object": "model",
            "created": self._created,
            "owned_by": "kvmesh-sim",
            "root": self.model,
            "parent": None,
            "max_model_len": self.core.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        self._update_gauges()
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def admin_cache(self, request: web.Request) -> web.Response:
        return web.json_response(self.core.cache.snapshot())

    async def admin_stats(self, request: web.Request) -> web.Response:
        st = self.core.cache.stats()
        return web.json_response(
            {
                "block_size": self.core.cache.block_size,
                "num_gpu_blocks": st.num_blocks,
                "pinned_blocks": st.pinned,
                "cached_blocks": st.cached,
                "evictions": st.evictions,
                "running": self.core.num_running,
                "waiting": self.core.num_waiting,
                "next_seq": self.publisher.next_seq if self.publisher else None,
            }
        )

    async def admin_drop_events(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            count = body.get("count") if isinstance(body, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, 'body must be JSON {"count": n}')
        if not _is_int(count) or count < 0:
            return _error(400, "count must be an integer >= 0", "count")
        if self.publisher is None:
            return _error(400, "KV events are disabled on this engine")
        self.publisher.drop_next(count)
        log.info("sim_drop_events", count=count)
        return web.json_response({"dropping": count})

    async def admin_clear(self, request: web.Request) -> web.Response:
        self.core.clear_cache()
        self._wake.set()  # the scheduler loop publishes it, in order, even when idle
        log.info("sim_cache_cleared")
        return web.json_response({"cleared": True})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = msgspec.json.decode(await request.read())
        except msgspec.DecodeError as e:
            self.metrics.reject("bad_request")
            return _error(400, f"request body is not valid JSON: {e}")
        try:
            p = parse_completion(body, self.tokenizer)
        except BadRequest as e:
            self.metrics.reject("bad_request")
            return _error(400, str(e), e.param)
        if p.model is not None and p.model != self.model:
            self.metrics.reject("unknown_model")
            return _error(404, f"The model `{p.model}` does not exist.", "model")
        why = self.core.check(len(p.prompt), p.max_tokens)
        if why is not None:
            self.metrics.reject("bad_request")
            return _error(400, why)
        if self.args.fail_rate > 0 and self._fail_rng.random() < self.args.fail_rate:
            self.metrics.reject("injected_failure")
            return _error(503, "injected failure (--fail-rate)")

        ext_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        rid = f"cmpl-{ext_id}"
        if rid in self._pending:
            rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        seed = p.seed if p.seed is not None else self._prompt_seed(p.prompt)
        loop = asyncio.get_running_loop()
        seq = self.core.add(SimRequest(rid, p.prompt, p.max_tokens, seed, p.ignore_eos), loop.time())
        pend = _Pending(p, seq)
        self._pending[rid] = pend
        self._wake.set()
        log.debug("sim_request_added", request_id=rid, prompt_tokens=len(p.prompt))
        try:
            if p.stream:
                return await self._stream(request, rid, pend)
            return await self._collect(rid, pend)
        finally:
            self._pending.pop(rid, None)
            if not pend.done:
                # Client went away (or we failed): free its seat and its blocks.
                if self.core.abort(rid):
                    self.metrics.aborted.inc()
                    log.info("sim_request_aborted", request_id=rid)
                self._wake.set()

    # --- SGLang-native API (for sglang-router) ------------------------------------

    async def sglang_server_info(self, request: web.Request) -> web.Response:
        st = self.core.cache.stats()
        return web.json_response(
            {
                "model_path": self.args.model_path or self.model,
                "served_model_name": self.model,
                "tokenizer_path": self.args.model_path,
                "page_size": self.core.cache.block_size,
                "max_total_num_tokens": st.num_blocks * self.core.cache.block_size,
                "context_length": self.core.max_model_len,
                "max_running_requests": self.args.max_num_seqs,
                "dp_size": 1,
                "tp_size": 1,
                "version": "kvmesh-sim",
            }
        )

    async def sglang_model_info(self, request: web.Request) -> web.Response:
        # A local --model-path lets SGLang's router load a tokenizer from disk
        # instead of asking the Hugging Face hub for "sim-model".
        path = self.args.model_path
        return web.json_response(
            {"model_path": path or self.model, "tokenizer_path": path, "is_generation": True}
        )

    async def sglang_generate(self, request: web.Request) -> web.StreamResponse:
        """SGLang's ``POST /generate``: ``input_ids`` (or ``text``), ``sampling_params``
        (``max_new_tokens``, ``ignore_eos``, ``stop``), ``stream``, ``rid``.

        Responses carry ``text``, ``output_ids`` and ``meta_info`` (``id``,
        ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``,
        ``finish_reason``) as SGLang's do; streamed chunks are cumulative, like
        SGLang's default, followed by ``data: [DONE]``.
        """
        try:
            body = msgspec.json.decode(await request.read())
        except msgspec.DecodeError as e:
            self.metrics.reject("bad_request")
            return _error(400, f"request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        sp = body.get("sampling_params") or {}
        if not isinstance(sp, dict):
            return _error(400, "sampling_params must be an object", "sampling_params")
        prompt = body.get("input_ids") if body.get("input_ids") is not None else body.get("text")
        oa = {
            "prompt": prompt,
            "max_tokens": sp.get("max_new_tokens", 128),
            "stream": bool(body.get("stream", False)),
            "ignore_eos": sp.get("ignore_eos", False),
            "stop": sp.get("stop"),
            "seed": sp.get("sampling_seed"),
        }
        try:
            p = parse_completion(oa, self.tokenizer)
        except BadRequest as e:
            self.metrics.reject("bad_request")
            return _error(400, str(e), e.param)
        why = self.core.check(len(p.prompt), p.max_tokens)
        if why is not None:
            self.metrics.reject("bad_request")
            return _error(400, why)
        rid_in = body.get("rid")
        ext_id = (
            rid_in
            if isinstance(rid_in, str) and rid_in
            else (request.headers.get("X-Request-Id") or uuid.uuid4().hex)
        )
        rid = f"gen-{ext_id}"
        if rid in self._pending:
            rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        seed = p.seed if p.seed is not None else self._prompt_seed(p.prompt)
        seq = self.core.add(
            SimRequest(rid, p.prompt, p.max_tokens, seed, p.ignore_eos), asyncio.get_running_loop().time()
        )
        pend = _Pending(p, seq)
        self._pending[rid] = pend
        self._wake.set()
        try:
            resp: web.StreamResponse | None = None
            if p.stream:
                resp = web.StreamResponse(
                    status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await resp.prepare(request)
            ids: list[int] = []
            texts: list[str] = []
            obj: dict[str, Any] = {}
            async for tok, text, finish, _stop in self._tokens(rid, pend):
                ids.append(tok)
                texts.append(text)
                meta = {
                    "id": ext_id,
                    "prompt_tokens": len(p.prompt),
                    "completion_tokens": len(ids),
                    "cached_tokens": seq.num_cached,
                    "finish_reason": None if finish is None else {"type": finish, "length": len(ids)},
                }
                obj = {"text": "".join(texts), "output_ids": list(ids), "meta_info": meta}
                if finish is not None:
                    meta["kvmesh_sim"] = self._sim_info(pend)
                if resp is not None and not await self._write(resp, rid, obj):
                    return resp
            if resp is None:
                return web.json_response(obj)
            return await _end_stream(resp)
        finally:
            self._pending.pop(rid, None)
            if not pend.done:
                if self.core.abort(rid):
                    self.metrics.aborted.inc()
                self._wake.set()

    def _prompt_seed(self, prompt: list[int]) -> int:
        return xxhash.xxh3_64_intdigest(array("I", prompt).tobytes(), self._seed & (2**64 - 1))

    async def _batches(self, rid: str, pend: _Pending):  # type: ignore[no-untyped-def]
        """Yield lists of ``(token_id, text, finish_reason, stop_reason)``: every
        token produced since the previous list (one per step when the reader
        keeps up). vLLM's output collector merges a slow reader's outputs the
        same way; the last list ends with the finish reason."""
        p = pend.params
        q = pend.queue
        text_so_far = ""
        while True:
            outs = await q.take()
            batch: list[tuple[int, str, str | None, str | None]] = []
            finish: str | None = None
            for out in outs:
                tok, finish = out.token_id, out.finish_reason
                text = "" if tok == self.core.eos_token_id else self._token_text(tok)
                stop_reason: str | None = None
                if p.stop and finish != FINISH_STOP:
                    combined = text_so_far + text
                    for s in p.stop:
                        i = combined.find(s, max(0, len(text_so_far) - len(s) + 1))
                        if i >= 0:
                            text = combined[len(text_so_far) : i] if i > len(text_so_far) else ""
                            finish, stop_reason = FINISH_STOP, s
                            self.core.abort(rid)  # stop early; its cached blocks stay cached
                            break
                text_so_far += text
                batch.append((tok, text, finish, stop_reason))
                if finish is not None:
                    pend.done = True
                    self._finished(pend, finish)
                    break  # anything queued after a stop string is dropped
            yield batch
            if finish is not None:
                return

    async def _tokens(self, rid: str, pend: _Pending):  # type: ignore[no-untyped-def]
        """Yield ``(token_id, text, finish_reason, stop_reason)`` as produced."""
        async for batch in self._batches(rid, pend):
            for item in batch:
                yield item

    def _token_text(self, tok: int) -> str:
        t = self._out_text.get(tok)
        return t if t is not None else self.tokenizer.decode([tok])

    def _finished(self, pend: _Pending, finish: str) -> None:
        seq = pend.seq
        now = asyncio.get_running_loop().time()
        self.metrics.success.labels(self.model, finish).inc()
        self.metrics.e2e.observe(now - seq.arrival)

    def _usage(self, pend: _Pending, completion_tokens: int) -> dict[str, Any]:
        n = len(pend.params.prompt)
        return {
            "prompt_tokens": n,
            "total_tokens": n + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": {"cached_tokens": pend.seq.num_cached},
        }

    def _sim_info(self, pend: _Pending) -> dict[str, Any]:
        s = pend.seq
        return {
            "queue_s": (s.admitted_at - s.arrival) if s.admitted_at is not None else None,
            "prefill_s": s.prefill_seconds,
            "ttft_s": (s.first_token_at - s.arrival) if s.first_token_at is not None else None,
            "cached_tokens": s.num_cached,
            "prefill_tokens": s.prompt_len - s.num_cached,
        }

    async def _collect(self, rid: str, pend: _Pending) -> web.Response:
        ids: list[int] = []
        texts: list[str] = []
        finish: str | None = None
        stop_reason: str | None = None
        async for tok, text, finish, stop_reason in self._tokens(rid, pend):
            ids.append(tok)
            texts.append(text)
        choice: dict[str, Any] = {
            "index": 0,
            "text": "".join(texts),
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": stop_reason,
        }
        if pend.params.return_token_ids:
            choice["prompt_token_ids"] = pend.params.prompt
            choice["token_ids"] = ids
        return web.json_response(
            {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [choice],
                "usage": self._usage(pend, len(ids)),
                "kvmesh_sim": self._sim_info(pend),
            }
        )

    async def _stream(self, request: web.Request, rid: str, pend: _Pending) -> web.StreamResponse:
        p = pend.params
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await resp.prepare(request)
        created = int(time.time())
        n_out = 0
        first = True
        # Every chunk is {"id", "object", "created", "model", "choices": [one
        # choice][, "usage": null]}: encode the envelope once per stream.
        head = (
            b'data: {"id":'
            + _encode_json(rid)
            + b',"object":"text_completion","created":'
            + str(created).encode()
            + b',"model":'
            + _encode_json(self.model)
            + b',"choices":['
        )
        tail = b'],"usage":null}\n\n' if p.include_usage else b"]}\n\n"
        # One chunk per batch of tokens (see _batches): several tokens per
        # chunk only when this handler fell behind the scheduler.
        async for batch in self._batches(rid, pend):
            n_out += len(batch)
            _, _, finish, stop_reason = batch[-1]
            choice: dict[str, Any] = {
                "index": 0,
                "text": batch[0][1] if len(batch) == 1 else "".join(b[1] for b in batch),
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": stop_reason,
            }
            if p.return_token_ids:
                if first:
                    choice["prompt_token_ids"] = p.prompt
                choice["token_ids"] = [b[0] for b in batch]
            first = False
            data = head + _encode_json(choice) + tail
            if finish is not None:
                # The last tokens, the usage chunk and [DONE] are ready at the
                # same moment: one write (and one TCP segment), not three.
                if p.include_usage:
                    data += _sse(
                        {
                            "id": rid,
                            "object": "text_completion",
                            "created": created,
                            "model": self.model,
                            "choices": [],
                            "usage": self._usage(pend, n_out),
                            "kvmesh_sim": self._sim_info(pend),
                        }
                    )
                return await _end_stream(resp, data)
            if not await self._write_raw(resp, rid, data):
                return resp
        return await _end_stream(resp)

    async def _write(self, resp: web.StreamResponse, rid: str, obj: dict[str, Any]) -> bool:
        """One SSE chunk; False if the client is gone (the caller then aborts)."""
        return await self._write_raw(resp, rid, _sse(obj))

    async def _write_raw(self, resp: web.StreamResponse, rid: str, data: bytes) -> bool:
        try:
            await resp.write(data)
        except ConnectionResetError:
            log.info("sim_client_disconnected", request_id=rid)
            return False
        return True

    # --- scheduler ----------------------------------------------------------------

    async def run_scheduler(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            now = loop.time()
            plan = self.core.schedule(now)
            if plan is None:
                self._publish()  # e.g. an AllBlocksCleared while idle
                self._update_gauges()
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
                continue
            for seq in plan.admitted:
                self.metrics.prefix_queries.inc(seq.prompt_len)
                self.metrics.prefix_hits.inc(seq.num_cached)
                self.metrics.prompt_tokens.inc(seq.prompt_len)
            # Deadline-based: timer overshoot and per-step overhead are made up
            # by the next steps (up to _MAX_CATCHUP_S), so simulated time keeps
            # pace with the wall clock. Always yield, so HTTP is served.
            deadline = max(deadline, now - _MAX_CATCHUP_S) + plan.duration
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            now = loop.time()
            outs = self.core.complete(plan, now)
            self._publish()
            for out in outs:
                pend = self._pending.get(out.request_id)
                if out.seq.generated == 1 and out.seq.first_token_at is not None:
                    self.metrics.ttft.observe(out.seq.first_token_at - out.seq.arrival)
                self.metrics.generation_tokens.inc()
                if pend is not None:
                    pend.queue.put_nowait(out)
            self._update_gauges()

    def _publish(self) -> None:
        events = self.core.drain_events()
        if not events or self.publisher is None:
            return
        seq = self.publisher.publish(
            KVEventBatch(ts=time.time(), events=events, data_parallel_rank=self.args.data_parallel_rank)
        )
        self.metrics.event_batches.inc()
        log.debug("sim_kv_events_published", seq=seq, events=len(events))

    def _update_gauges(self) -> None:
        m = self.metrics
        m.running.set(self.core.num_running)
        m.waiting.set(self.core.num_waiting)
        m.kv_usage.set(self.core.cache.usage())
        m.cached_blocks.set(self.core.cache.num_cached())

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()


# --- CLI -----------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    d = TimingConfig()
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    a("--port", type=int, default=8000, help="HTTP port; 0 picks a free one (default 8000)")
    a("--model", default="sim-model", help="served model name (default sim-model)")
    a(
        "--model-path",
        default=None,
        help="local directory with a tokenizer.json, reported to SGLang's router as the model path",
    )
    a("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    # Llama-3-8B on an A100-80GB at 90% memory: ~52 GB of KV at 2 MiB per 16-token block.
    a("--num-gpu-blocks", type=int, default=26_000, help="KV blocks in the pool (default 26000)")
    a("--max-num-seqs", type=int, default=d.max_num_seqs, help="max running sequences")
    a("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
      help="token budget of one step (chunked prefill)")  # fmt: skip
    a("--max-model-len", type=int, default=131_072, help="max prompt + output tokens")
    a("--decode-base-ms", type=float, default=d.decode_base_ms, help="fixed cost of a step")
    a("--decode-per-seq-ms", type=float, default=d.decode_per_seq_ms,
      help="added step cost per scheduled sequence")  # fmt: skip
    a("--prefill-ms-per-token", type=float, default=d.prefill_ms_per_token,
      help="added step cost per uncached prompt token")  # fmt: skip
    a("--time-scale", type=float, default=1.0,
      help="multiply every simulated duration (0.1 = ten times faster than real)")  # fmt: skip
    a("--eos-prob", type=float, default=0.0,
      help="probability that a sampled token is EOS (unless ignore_eos); default 0")  # fmt: skip
    a("--kv-events-endpoint", default="tcp://127.0.0.1:5557",
      help="ZMQ PUB endpoint for KV events (bound); '' disables events")  # fmt: skip
    a("--kv-replay-endpoint", default="tcp://127.0.0.1:5558",
      help="ZMQ ROUTER replay endpoint; '' disables replay")  # fmt: skip
    a("--kv-topic", default="", help="ZMQ topic frame (default empty, like vLLM)")
    a("--kv-event-format", choices=("map", "array"), default="map",
      help="map = vLLM >= 0.24 tagged maps, array = vLLM <= 0.23 positional")  # fmt: skip
    a("--kv-buffer-steps", type=int, default=10_000, help="replay buffer, in batches")
    a("--data-parallel-rank", type=int, default=0,
      help="DP rank stamped on batches; the ZMQ ports are offset by it")  # fmt: skip
    a("--seed", type=int, default=0, help="seed for outputs without a request seed and faults")
    a("--hash-seed", type=int, default=None,
      help="seed of the engine's block hashes (default: random per process, like vLLM)")  # fmt: skip
    a("--fail-rate", type=float, default=0.0,
      help="probability that a request gets HTTP 503 before its first token")  # fmt: skip
    a("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def _check_args(args: argparse.Namespace) -> str | None:
    if args.block_size < 1 or args.num_gpu_blocks < 1:
        return "--block-size and --num-gpu-blocks must be >= 1"
    if not 0.0 <= args.fail_rate <= 1.0:
        return "--fail-rate must be in [0, 1]"
    if not 0.0 <= args.eos_prob <= 1.0:
        return "--eos-prob must be in [0, 1]"
    if args.time_scale <= 0:
        return "--time-scale must be > 0"
    if args.data_parallel_rank < 0:
        return "--data-parallel-rank must be >= 0"
    return None


def _configure_logging(level: str) -> None:
    import logging

    if not structlog.is_configured():
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),  # stdout is for READY
        )


async def _serve(args: argparse.Namespace) -> int:
    engine = SimEngine(args)
    runner = web.AppRunner(engine.app(), handler_cancellation=True, access_log=None)
    sched: asyncio.Task[None] | None = None
    try:
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        sched = asyncio.create_task(engine.run_scheduler(), name="sim-scheduler")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        pub = engine.publisher
        print(
            f"READY http=http://{args.host}:{port} "
            f"kv={pub.endpoint if pub else '-'} replay={(pub.replay_endpoint if pub else None) or '-'}",
            flush=True,
        )
        log.info("sim_engine_ready", port=port, model=args.model, blocks=args.num_gpu_blocks)
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({waiter, sched}, return_when=asyncio.FIRST_COMPLETED)
        if sched in done and sched.exception() is not None:
            log.error("sim_scheduler_crashed", error=repr(sched.exception()))
            return 1
        waiter.cancel()
        log.info("sim_engine_stopping")
        return 0
    finally:
        if sched is not None:
            sched.cancel()
        await runner.cleanup()
        engine.close()


def run(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    err = _check_args(args)
    if err is not None:
        print(f"kvmesh sim-engine: {err}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_serve(args))
    return uvloop.run(_serve(args))


def main(argv: list[str] | None = None) -> int:
    """``python -m engine_adapters.sim_engine.server``: the same as ``kvmesh sim-engine``."""
    parser = argparse.ArgumentParser(prog="kvmesh sim-engine", description=__doc__.splitlines()[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
