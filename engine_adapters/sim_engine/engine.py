"""``SimEngine``: one simulated engine's parts, and its one admission path.

The engine owns the pure core (scheduler + prefix cache + sampling), the
metrics, the KV-event publisher, the step loop and the table of pending
requests. The OpenAI (``/v1/completions``) and SGLang (``/generate``)
handlers both go through :meth:`SimEngine.serve_request`:

1. decode the JSON body and parse it into a ``CompletionRequest``
   (``requests.py``; 400 on anything invalid);
2. resolve the model: the served model, or one of its LoRA adapters named as
   ``model`` (vLLM) or ``lora_path`` (SGLang); anything else is a 404. The
   adapter and the ``cache_salt`` are the request's tenancy: it shares cached
   blocks only with requests of the same adapter and salt;
3. check that the request can ever fit (400);
4. a full waiting queue (``max_waiting``, 429 "queue full");
5. injected failure (``fail_rate``, 503);
6. pick the request id: the client's (``X-Request-Id`` or SGLang's ``rid``)
   behind the API's prefix, made unique among pending requests;
7. add it to the core and to the pending table, and wake the step loop;
8. let the API write the response; on the way out, a request that did not
   finish (the client went away, or the handler failed) is aborted, which
   frees its seat and its KV blocks.

Every refusal is counted in ``kvmesh_sim_requests_rejected`` by reason, every
admitted request in ``kvmesh_sim_requests_admitted`` by the model or adapter
serving it (also in ``GET /admin/stats`` as ``served``).
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
import xxhash
from aiohttp import web

from engine_adapters.completion_request import Tenancy
from engine_adapters.sim_engine.cache import PrefixCache
from engine_adapters.sim_engine.config import SimEngineConfig
from engine_adapters.sim_engine.core import EngineCore, SimRequest
from engine_adapters.sim_engine.metrics import EngineMetrics
from engine_adapters.sim_engine.output_vocab import OutputVocab
from engine_adapters.sim_engine.publisher import ZmqEventPublisher
from engine_adapters.sim_engine.requests import BadRequest, CompletionRequest
from engine_adapters.sim_engine.responses import error_response
from engine_adapters.sim_engine.step_loop import StepLoop
from engine_adapters.sim_engine.token_stream import PendingRequest, TokenStreamer
from engine_adapters.tokenizer import BuiltinTokenizer

log = structlog.get_logger(__name__)

Parse = Callable[[Any, BuiltinTokenizer], CompletionRequest]
Respond = Callable[[web.Request, PendingRequest], Awaitable[web.StreamResponse]]


class Rejected(Exception):
    """A request refused before admission: HTTP status, message, parameter,
    and the ``reason`` label of the rejection counter."""

    def __init__(self, status: int, message: str, reason: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.param = param


class SimEngine:
    """Owns the core, the publisher and the step loop; one per process."""

    def __init__(self, config: SimEngineConfig) -> None:
        self.config = config
        self.model = config.model
        self.tokenizer = BuiltinTokenizer()
        self.vocab = OutputVocab(self.tokenizer)
        hash_seed = config.hash_seed if config.hash_seed is not None else int.from_bytes(os.urandom(8))
        self.core = EngineCore(
            PrefixCache(
                config.num_gpu_blocks,
                config.block_size,
                hash_seed=hash_seed,
                # vLLM numbers its adapters from 1, in the order they are given
                lora_ids={name: i for i, name in enumerate(config.lora_modules, 1)},
                num_host_blocks=config.num_host_blocks,
            ),
            config.timing,
            eos_prob=config.eos_prob,
            output_vocab=self.vocab.ids,
            max_model_len=config.max_model_len,
        )
        self.metrics = EngineMetrics(self.model)
        self.publisher: ZmqEventPublisher | None = None
        if config.kv_events_endpoint:
            self.publisher = ZmqEventPublisher(
                config.kv_events_endpoint,
                config.kv_replay_endpoint or None,
                topic=config.kv_topic,
                buffer_steps=config.kv_buffer_steps,
                fmt=config.kv_event_format,
                data_parallel_rank=config.data_parallel_rank,
                bind=True,  # the simulator always binds (loopback) its sockets
            )
        self.pending: dict[str, PendingRequest] = {}
        self.served: Counter[str] = Counter()  # admitted requests by serving model or adapter
        self.steps = StepLoop(
            self.core, self.metrics, self.pending, self.publisher, config.data_parallel_rank
        )
        self.streamer = TokenStreamer(self.core, self.vocab, self.metrics)
        self._fail_rng = random.Random(config.seed)

    # --- admission --------------------------------------------------------------

    async def serve_request(
        self,
        request: web.Request,
        parse: Parse,
        id_prefix: str,
        respond: Respond,
        *,
        inject_failures: bool = True,
    ) -> web.StreamResponse:
        """Admit the request in ``request``'s body (see the module docstring),
        answer it with ``respond`` and release it afterwards. ``--fail-rate``
        applies only where ``inject_failures`` (the OpenAI API, which kvmesh
        routes to)."""
        try:
            body = msgspec.json.decode(await request.read())
            header_id = request.headers.get("X-Request-Id")
            pend = self.admit(body, parse, id_prefix, header_id, inject_failures=inject_failures)
        except msgspec.DecodeError as e:
            self.metrics.reject("bad_request")
            return error_response(400, f"request body is not valid JSON: {e}")
        except Rejected as e:
            self.metrics.reject(e.reason)
            return error_response(e.status, str(e), e.param)
        try:
            return await respond(request, pend)
        except ConnectionResetError:
            # The client left before the answer could start (a router that gave
            # up on this engine while it hung): nothing to answer, no traceback.
            log.info("sim.client_disconnected", request_id=pend.request_id)
            return web.Response(status=499)
        finally:
            self.release(pend)

    def admit(
        self,
        body: Any,
        parse: Parse,
        id_prefix: str,
        header_id: str | None,
        *,
        inject_failures: bool = True,
    ) -> PendingRequest:
        """Steps 1-7 of the admission path; raises :class:`Rejected`."""
        try:
            p = parse(body, self.tokenizer)
        except BadRequest as e:
            raise Rejected(400, str(e), "bad_request", e.param) from None
        served = self._served_model(p)
        why = self.core.check(len(p.prompt), p.max_tokens)
        if why is not None:
            raise Rejected(400, why, "bad_request")
        limit = self.config.max_waiting
        if limit and self.core.num_waiting >= limit:
            raise Rejected(429, f"queue full: {limit} requests are waiting (--max-waiting)", "queue_full")
        rate = self.config.fail_rate
        if inject_failures and rate > 0 and self._fail_rng.random() < rate:
            raise Rejected(503, "injected failure (--fail-rate)", "injected_failure")
        client_id = p.client_request_id or header_id or uuid.uuid4().hex
        rid = f"{id_prefix}-{client_id}"
        if rid in self.pending:
            rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        seed = p.seed if p.seed is not None else self._prompt_seed(p.prompt)
        tenancy = Tenancy(lora_name="" if served == self.model else served, cache_salt=p.cache_salt or "")
        running = self.core.add(
            SimRequest(rid, p.prompt, p.max_tokens, seed, p.ignore_eos, tenancy),
            asyncio.get_running_loop().time(),
        )
        pend = PendingRequest(rid, client_id, p, running, served_model=served)
        self.pending[rid] = pend
        self.served[served] += 1
        self.metrics.served(served)
        self.steps.wake()
        log.debug("sim.request_added", request_id=rid, prompt_tokens=len(p.prompt))
        return pend

    def _served_model(self, p: CompletionRequest) -> str:
        """The model or adapter that serves ``p`` (step 2); 404 if unknown."""
        adapters = self.config.lora_modules
        if p.model is not None and p.model != self.model:
            if p.model not in adapters:
                raise Rejected(404, f"The model `{p.model}` does not exist.", "unknown_model", "model")
            return p.model
        if p.lora_path is not None:
            if p.lora_path not in adapters:
                raise Rejected(
                    404, f"The LoRA adapter `{p.lora_path}` is not loaded.", "unknown_model", "lora_path"
                )
            return p.lora_path
        return self.model

    def release(self, pend: PendingRequest) -> None:
        """Step 6: forget the request; abort it if it did not finish."""
        rid = pend.request_id
        self.pending.pop(rid, None)
        if pend.done:
            return
        # Client went away (or we failed): free its seat and its blocks.
        if self.core.abort(rid):
            self.metrics.aborted.inc()
            log.info("sim.request_aborted", request_id=rid)
        self.steps.wake()

    def _prompt_seed(self, prompt: list[int]) -> int:
        """The output seed of a request without one: same prompt, same output."""
        return xxhash.xxh3_64_intdigest(array("I", prompt).tobytes(), self.config.seed & (2**64 - 1))

    # --- lifecycle --------------------------------------------------------------

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
