"""The OpenAI-compatible API of the simulated engine (vLLM's flavour).

- ``POST /v1/completions`` (body: ``requests.py``). The response, or with
  ``stream`` SSE chunks ending in ``data: [DONE]``: one chunk per batch of
  tokens (``token_stream.py``), ``token_ids`` per chunk and
  ``prompt_token_ids`` in the first when ``return_token_ids`` (vLLM >=
  0.10.2), a usage chunk when ``stream_options.include_usage``. Usage carries
  ``prompt_tokens_details.cached_tokens`` (the cached prefix at admission, a
  multiple of the block size); the response or the usage chunk carries
  ``kvmesh_sim``. ``model`` is the model or LoRA adapter that served it. The
  request id is ``cmpl-<X-Request-Id>``.
- ``GET /v1/models``: the served model and its LoRA adapters (``parent``: the
  model), as vLLM lists them.

The stream path is on the benchmarks' hot path, hence the pre-encoded chunk
envelope and the single write of the last chunk, the usage and ``[DONE]``.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from engine_adapters.sim_engine.engine import SimEngine
from engine_adapters.sim_engine.requests import parse_completion
from engine_adapters.sim_engine.responses import (
    encode_json,
    end_event_stream,
    open_event_stream,
    sim_info,
    sse,
    write_event,
)
from engine_adapters.sim_engine.token_stream import PendingRequest


class OpenAIApi:
    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.model = engine.model
        self._created = int(time.time())

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)

    async def models(self, request: web.Request) -> web.Response:
        def card(name: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": self._created,
                "owned_by": "kvmesh-sim",
                "root": name,
                "parent": parent,
                "max_model_len": self.engine.core.max_model_len,
            }

        cards = [card(self.model, None)] + [card(a, self.model) for a in self.engine.config.lora_modules]
        return web.json_response({"object": "list", "data": cards})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.engine.serve_request(request, parse_completion, "cmpl", self._respond)

    async def _respond(self, request: web.Request, pend: PendingRequest) -> web.StreamResponse:
        if pend.request.stream:
            return await self._stream(request, pend)
        return await self._collect(pend)

    def _usage(self, pend: PendingRequest, completion_tokens: int) -> dict[str, Any]:
        n = len(pend.request.prompt)
        return {
            "prompt_tokens": n,
            "total_tokens": n + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": {"cached_tokens": pend.running.num_cached},
        }

    async def _collect(self, pend: PendingRequest) -> web.Response:
        ids: list[int] = []
        texts: list[str] = []
        finish: str | None = None
        stop_reason: str | None = None
        async for tok, text, fin, stop in self.engine.streamer.pieces(pend):
            ids.append(tok)
            texts.append(text)
            finish, stop_reason = fin, stop
        choice: dict[str, Any] = {
            "index": 0,
            "text": "".join(texts),
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": stop_reason,
        }
        p = pend.request
        if p.return_token_ids:
            choice["prompt_token_ids"] = p.prompt
            choice["token_ids"] = ids
        return web.json_response(
            {
                "id": pend.request_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": pend.served_model,
                "choices": [choice],
                "usage": self._usage(pend, len(ids)),
                "kvmesh_sim": sim_info(pend.running, pend.served_model),
            }
        )

    async def _stream(self, request: web.Request, pend: PendingRequest) -> web.StreamResponse:
        p = pend.request
        rid = pend.request_id
        resp = await open_event_stream(request)
        created = int(time.time())
        n_out = 0
        first = True
        # Every chunk is {"id", "object", "created", "model", "choices": [one
        # choice][, "usage": null]}: encode the envelope once per stream.
        head = (
            b'data: {"id":'
            + encode_json(rid)
            + b',"object":"text_completion","created":'
            + str(created).encode()
            + b',"model":'
            + encode_json(pend.served_model)
            + b',"choices":['
        )
        tail = b'],"usage":null}\n\n' if p.include_usage else b"]}\n\n"
        # One chunk per batch of tokens: several tokens per chunk only when
        # this handler fell behind the step loop.
        async for batch in self.engine.streamer.batches(pend):
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
            data = head + encode_json(choice) + tail
            if finish is not None:
                # The last tokens, the usage chunk and [DONE] are ready at the
                # same moment: one write (and one TCP segment), not three.
                if p.include_usage:
                    data += sse(
                        {
                            "id": rid,
                            "object": "text_completion",
                            "created": created,
                            "model": pend.served_model,
                            "choices": [],
                            "usage": self._usage(pend, n_out),
                            "kvmesh_sim": sim_info(pend.running, pend.served_model),
                        }
                    )
                return await end_event_stream(resp, data)
            if not await write_event(resp, rid, data):
                return resp
        return await end_event_stream(resp)
