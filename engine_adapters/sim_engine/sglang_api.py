"""SGLang's native API, so SGLang's own router (sglang-router) can front the
simulator: worker discovery and ``/generate``.

- ``POST /generate`` (body: ``requests.py``): responses carry ``text``,
  ``output_ids`` and ``meta_info`` (``id``, ``prompt_tokens``,
  ``completion_tokens``, ``cached_tokens``, ``finish_reason``, and
  ``kvmesh_sim`` on the last) as SGLang's do; streamed chunks are cumulative,
  like SGLang's default, one per batch of tokens (as the OpenAI stream's),
  followed by ``data: [DONE]``. The request id is
  ``gen-<rid>`` (or ``gen-<X-Request-Id>``); ``meta_info.id`` is the bare id.
- ``GET /server_info`` (``/get_server_info``) and ``GET /model_info``
  (``/get_model_info``): what the router reads at discovery.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from engine_adapters.sim_engine.engine import SimEngine
from engine_adapters.sim_engine.requests import parse_generate
from engine_adapters.sim_engine.responses import (
    end_event_stream,
    open_event_stream,
    sim_info,
    sse,
    write_event,
)
from engine_adapters.sim_engine.token_stream import PendingRequest


class SGLangApi:
    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine

    def add_routes(self, app: web.Application) -> None:
        for path in ("/server_info", "/get_server_info"):
            app.router.add_get(path, self.server_info)
        for path in ("/model_info", "/get_model_info"):
            app.router.add_get(path, self.model_info)
        app.router.add_post("/generate", self.generate)

    async def server_info(self, request: web.Request) -> web.Response:
        cfg = self.engine.config
        cache = self.engine.core.cache
        return web.json_response(
            {
                "model_path": cfg.model_path or cfg.model,
                "served_model_name": cfg.model,
                "tokenizer_path": cfg.model_path,
                "page_size": cache.block_size,
                "max_total_num_tokens": cache.stats().num_blocks * cache.block_size,
                "context_length": self.engine.core.max_model_len,
                "max_running_requests": cfg.timing.max_num_seqs,
                "dp_size": 1,
                "tp_size": 1,
                "version": "kvmesh-sim",
            }
        )

    async def model_info(self, request: web.Request) -> web.Response:
        # A local model_path lets SGLang's router load a tokenizer from disk
        # instead of asking the Hugging Face hub for "sim-model".
        cfg = self.engine.config
        return web.json_response(
            {
                "model_path": cfg.model_path or cfg.model,
                "tokenizer_path": cfg.model_path,
                "is_generation": True,
            }
        )

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self.engine.serve_request(
            request, parse_generate, "gen", self._respond, inject_failures=False
        )

    async def _respond(self, request: web.Request, pend: PendingRequest) -> web.StreamResponse:
        resp = await open_event_stream(request) if pend.request.stream else None
        ids: list[int] = []
        texts: list[str] = []
        obj: dict[str, Any] = {}
        # One event per batch of tokens, as the OpenAI stream writes chunks:
        # several tokens per event only when this handler fell behind the step
        # loop (SGLang merges a slow reader's outputs the same way), so a
        # router in front of this API pays no more per token than one in
        # front of /v1/completions.
        async for batch in self.engine.streamer.batches(pend):
            for tok, text, _finish, _stop in batch:
                ids.append(tok)
                texts.append(text)
            finish = batch[-1][2]
            meta: dict[str, Any] = {
                "id": pend.client_id,
                "prompt_tokens": len(pend.request.prompt),
                "completion_tokens": len(ids),
                "cached_tokens": pend.running.num_cached,
                "finish_reason": None if finish is None else {"type": finish, "length": len(ids)},
            }
            obj = {"text": "".join(texts), "output_ids": list(ids), "meta_info": meta}
            if finish is not None:
                meta["kvmesh_sim"] = sim_info(pend.running, pend.served_model)
                if resp is not None:
                    # The last event and [DONE] are ready together: one write.
                    return await end_event_stream(resp, sse(obj))
            elif resp is not None and not await write_event(resp, pend.request_id, sse(obj)):
                return resp
        if resp is None:
            return web.json_response(obj)
        return await end_event_stream(resp)
