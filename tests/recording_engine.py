"""An OpenAI-compatible engine on loopback that records the headers of every
completion request: the tracing tests read the ``traceparent`` the router
sent. It streams a few tokens as vLLM does (``token_ids`` per chunk, a
finish reason, a usage chunk, ``[DONE]``), or answers 503 when told to
refuse, before any token (a retryable failure)."""

from __future__ import annotations

import json

from aiohttp import web

from kvmesh import procs

MODEL = procs.SIM_MODEL
TOKENS = 3


class RecordingEngine:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.requests: list[dict[str, str]] = []  # the headers of each POST /v1/completions, lowercase
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> RecordingEngine:
        app = web.Application()
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def traceparents(self) -> list[str | None]:
        return [h.get("traceparent") for h in self.requests]

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "max_model_len": 4096}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({k.lower(): v for k, v in request.headers.items()})
        body = await request.json()
        if self.refuse:
            return web.json_response({"error": {"message": "not now"}}, status=503)
        prompt = body["prompt"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(TOKENS):
            last = i == TOKENS - 1
            choice = {
                "index": 0,
                "text": " t",
                "token_ids": [100 + i],
                "finish_reason": "length" if last else None,
            }
            await resp.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": TOKENS,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
