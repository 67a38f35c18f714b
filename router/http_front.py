"""The OpenAI-compatible HTTP API of a router node (``--http-listen``).

A thin aiohttp shell beside the gRPC one (router/service.py): a request goes
through the very same node entry points (:meth:`RouterNode.prepare`, then
:meth:`RouterNode.generate`: admission, policy, retries, accounting), so
policies, tenants, LoRA adapters, errors and drain behave as they do on
gRPC. Parsing, responses and the status of each error are
router/openai_api.py's.

- ``POST /v1/completions``: a text prompt is tokenized by the model's
  tokenizer (``--tokenizer``) without special tokens, as on gRPC; a prompt
  of token ids is sent as it is.
- ``POST /v1/chat/completions``: the messages are rendered with the
  model's own chat template (engine_adapters/chat_template.py), tokenized,
  hashed and sent to the engine as a *completion of those token ids*, not as
  a chat request. The engine therefore caches exactly the tokens the router
  hashed, whatever its own chat rendering (template version, special-token
  handling) would have produced; and any OpenAI-compatible engine serves it,
  the simulated one included, with nothing chat-specific to implement.
- ``GET /v1/models`` (and ``/v1/models/{id}``): the models the engines
  serve, and the LoRA adapters they list in their own ``/v1/models``.
- ``GET /health``: 200 while the node serves, 503 while it joins the mesh
  or drains; needs no token (orchestrators probe it).

Authentication is the public port's (router/auth.py): the same TLS
certificate (and client CA), the same bearer tokens (``Authorization:
Bearer TOKEN``, which the openai client sends as its ``api_key``); without
either the node does not start unless ``--insecure``.

Every response carries ``x-request-id`` (the client's, or a new one; it is
also the engine request's id); a routed one ``x-kvmesh-engine`` and
``x-kvmesh-predicted-cached-tokens`` (what the router expected the engine
to hold, beside the engine's own count in ``usage``); an error
``x-kvmesh-reason``. A streamed response starts (status 200, headers) with
its first tokens: until then it can still fail with a proper status, and be
retried on another engine. A W3C ``traceparent`` header (and ``tracestate``)
goes on to the engine, as gRPC metadata does (router/tracing.py). A client
that goes away cancels its engine
request, as a cancelled gRPC call does. While the node drains, new requests
get 503 and streams in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from engine_adapters.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from engine_adapters.proxy import Chunk
from router.auth import Refused, TokenTable
from router.errors import REASON_KEY, Draining, RequestError, RouterError
from router.metrics import RequestTimer, server_ssl_context
from router.node import RouterNode
from router.openai_api import (
    EventStream,
    InvalidParam,
    ModelCatalog,
    ModelNotFound,
    OpenAIRequest,
    RequestTooLarge,
    Shape,
    Unauthenticated,
    adapters_from_models,
    client_request,
    completion_body,
    error_body,
    http_status,
    model_cards,
    parse_chat,
    parse_completions,
    request_id_from,
    sampling_params,
)
from router.request_path import Finished, Prepared, Routed, resolve_model
from router.tracing import TRACEPARENT, TRACESTATE, parse_traceparent

__all__ = ["REASON_HEADER", "HttpFront"]

Items = AsyncGenerator[Routed | Chunk | Finished, None]  # what RouterNode.generate yields
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPEN_PATHS = frozenset(("/health",))
_RETRY_AFTER = "1"  # seconds, on 429 and 503: the openai client waits this long before its retry
_REQUEST_ID = web.RequestKey("request_id", str)
_TIMER = web.RequestKey("timer", RequestTimer)  # the request's duration and TTFT (router/metrics.py)
REASON_HEADER = "x-" + REASON_KEY  # gRPC's trailing metadata key, as an HTTP header


class UnknownRoute(RequestError):
    """No such endpoint (reason ``method_not_allowed``: not with this method)."""

    grpc_code = "NOT_FOUND"
    reason = "unknown_route"


class _ServerLog(logging.Handler):
    """What aiohttp's server logs, for one node. A request it could not
    parse (a bad header or request line, a line too long, a body shorter
    than its length), which aiohttp answers 400 itself, is the client's
    mistake: counted and logged as the node's other refusals
    (``INVALID_ARGUMENT`` ``bad_http``, one line, no traceback). Anything
    else it logs is kept, as a structured line with its traceback."""

    def __init__(self, node: RouterNode) -> None:
        super().__init__()
        self.node = node

    def emit(self, record: logging.LogRecord) -> None:
        node = self.node
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.WARNING:
            return  # aiohttp's debug lines (a first request that is not HTTP at all: a port scan)
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            why = f"unreadable HTTP request (answered {exc.code}): {exc.message}"
            node.request_ended("INVALID_ARGUMENT", "bad_http", node.new_request_id(), why, None, api="openai")
        else:
            node.log.error("router.http_server_error", error=record.getMessage(), exc_info=record.exc_info)


class HttpFront:
    """The aiohttp application of one node (module docstring)."""

    def __init__(
        self,
        node: RouterNode,
        tokens: TokenTable | None,
        on_refused: Refused,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """Loads the chat templates of the configured models now: a broken
        one stops the node at start, not on the first request."""
        self.node = node
        self.tokens = tokens
        self._on_refused = on_refused
        self._wall = wall_clock
        self._started = int(wall_clock())
        self.catalog = ModelCatalog()
        self._refresh = asyncio.Lock()
        self._templates: dict[str, ChatTemplate | None] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.addr = ""  # HOST:PORT once started
        cfg = node.config
        for model in {*cfg.tokenizers, *cfg.chat_templates}:
            self._template(model)

    # --- lifecycle -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.node.config.max_request_bytes, middlewares=[self._guard])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/health", self.health)
        return app

    async def start(self, listen: str) -> str:
        """Serve on ``listen`` (HOST:PORT, port 0: any free one); returns the
        address bound."""
        cfg = self.node.config
        host, _, port = listen.rpartition(":")
        # A client that goes away cancels its handler, which closes the engine request.
        runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=cfg.stop_grace,
            logger=self._server_logger(),
        )
        await runner.setup()
        self._runner = runner
        tls = server_ssl_context(cfg.api_auth)
        try:
            site = web.TCPSite(runner, host.strip("[]") or None, int(port), ssl_context=tls)
            await site.start()
        except (OSError, ValueError) as e:
            await runner.cleanup()
            raise OSError(f"cannot listen on {listen} (--http-listen): {e}") from None
        bound = runner.addresses[0]
        self.addr = f"{host}:{bound[1]}" if host else f"{bound[0]}:{bound[1]}"
        self.node.log.info(
            "router.http_serving", http=self.addr, tls=tls is not None, tokens=self.tokens is not None
        )
        return self.addr

    def _server_logger(self) -> logging.Logger:
        """The logger aiohttp's server is given: this front's own, outside
        logging's registry (no parent to pass records to, none kept after the
        front), every record going to :class:`_ServerLog`, which decides."""
        logger = logging.Logger(f"{__name__}.server")
        logger.addHandler(_ServerLog(self.node))
        return logger

    async def stop(self) -> None:
        """Close the port; streams still open get ``stop_grace`` to end.
        The node drains first (router/service.py), so normally none is."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # --- the guard around every handler ----------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = self.node.new_request_id()
        try:
            # The token first: a caller without one learns nothing of how its
            # request would be read (a bad x-request-id is a 400 after it).
            try:
                given, bad_id = request_id_from(request.headers.get("x-request-id")), None
            except RouterError as e:
                given, bad_id = None, e
            rid = given or rid
            request[_REQUEST_ID] = rid
            refused = self._authenticate(request)
            if refused is not None:
                return self._error(refused, rid, {"www-authenticate": "Bearer"})
            if bad_id is not None:
                raise bad_id
            resp = await handler(request)
        except RouterError as e:
            self._ended(e.grpc_code, e.reason, rid, str(e), request.get(_TIMER))
            return self._error(e, rid)
        except web.HTTPException as e:  # aiohttp's router: no such path or method
            why = "method_not_allowed" if e.status == 405 else ""
            err = UnknownRoute(f"no route for {request.method} {request.path}: {e.reason}", why)
            self._ended(err.grpc_code, err.reason, rid, str(err), None)
            return self._error(err, rid)
        except asyncio.CancelledError:
            self._ended("CANCELLED", "client", rid, "", request.get(_TIMER))
            raise
        except Exception as e:
            # A bug of this node: say so (500), never a bare disconnect.
            self.node.log.exception("router.request_crashed", request_id=rid, api="openai")
            self._ended("INTERNAL", "internal", rid, repr(e), request.get(_TIMER))
            return self._error(RouterError(f"internal error on node {self.node.node_id}: {e!r}"), rid)
        if not resp.prepared:
            resp.headers["x-request-id"] = rid
        return resp

    def _authenticate(self, request: web.Request) -> Unauthenticated | None:
        if self.tokens is None or request.path in _OPEN_PATHS:
            return None
        given = request.headers.get("authorization")
        if self.tokens.role_of(given) is not None:
            return None
        reason = "bad_token" if given else "no_token"
        where = f"{request.method} {request.path}"
        self._on_refused("UNAUTHENTICATED", reason, where, request[_REQUEST_ID], request.remote or "")
        return Unauthenticated(f"{reason}: this call needs a valid token", reason=reason)

    def _error(self, e: RouterError, rid: str, extra: dict[str, str] | None = None) -> web.Response:
        status = http_status(e)
        headers = {"x-request-id": rid, REASON_HEADER: e.reason, **(extra or {})}
        if status in (429, 503):
            headers["retry-after"] = _RETRY_AFTER
        return web.Response(
            status=status, body=error_body(e), content_type="application/json", headers=headers
        )

    def _ended(
        self, status: str, reason: str, request_id: str, message: str, timer: RequestTimer | None
    ) -> None:
        self.node.request_ended(status, reason, request_id, message, timer, api="openai")

    # --- handlers --------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        node = self.node
        state = "draining" if node.draining else "ok" if node.ready else "joining"
        return web.json_response({"status": state}, status=200 if state == "ok" else 503)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": await self._cards()})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        cards = await self._cards()
        for card in cards:
            if card["id"] == name:
                return web.json_response(card)
        served = ", ".join(sorted(card["id"] for card in cards)) or "none"
        raise ModelNotFound(f"The model `{name}` does not exist; served: {served}.")

    async def _cards(self) -> list[dict[str, Any]]:
        await self._learn_adapters()
        engines = self.node.engines
        served = {m: engines.max_model_len(m) for m in engines.models()}
        return model_cards(served, self.catalog.adapters, self._started)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        request[_TIMER] = self.node.metrics.request(request.path, self.node.clock())
        return await self._serve(request, parse_completions(await self._body(request)))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        request[_TIMER] = self.node.metrics.request(request.path, self.node.clock())
        return await self._serve(request, parse_chat(await self._body(request)))

    async def _body(self, request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = self.node.config.max_request_bytes
            raise RequestTooLarge(f"the request body is larger than {limit} bytes") from None

    # --- one generation --------------------------------------------------------------------------

    async def _serve(self, request: web.Request, req: OpenAIRequest) -> web.StreamResponse:
        node = self.node
        if not node.ready:
            raise Draining("this node is still joining the mesh", reason="joining")
        rid = request[_REQUEST_ID]
        model, lora_name = await self._resolve(req)
        text = self._render(model, req) if req.kind == "chat" else None
        limit = node.config.max_prompt_tokens
        if req.prompt_ids is not None and len(req.prompt_ids) > limit:
            raise InvalidParam(f"prompt of {len(req.prompt_ids)} tokens exceeds {limit}", "prompt")
        prep = await node.prepare_async(client_request(req, rid, model, lora_name, text))
        timer = request[_TIMER]
        timer.policy = prep.policy
        window = node.engines.max_model_len(prep.model)
        room = None if window is None else window - len(prep.token_ids)
        params = sampling_params(req, node.config.default_max_tokens, room)
        shape = Shape.of(req.kind, rid, req.model or prep.model, int(self._wall()))
        # The client's W3C trace context goes on to the engine (router/tracing.py).
        trace = parse_traceparent(
            request.headers.get(TRACEPARENT), ",".join(request.headers.getall(TRACESTATE, ()))
        )
        # node.generate is an async generator: closing it ends the engine request at once.
        items: Items = node.generate(prep, params, trace=trace)
        if req.stream:
            return await self._stream(request, prep, items, EventStream(shape, req.include_usage), timer)
        return await self._whole(prep, items, shape, timer)

    async def _whole(self, prep: Prepared, items: Items, shape: Shape, timer: RequestTimer) -> web.Response:
        texts: list[str] = []
        routed: Routed | None = None
        finished: Finished | None = None
        async with contextlib.aclosing(items) as it:
            async for item in it:
                if isinstance(item, Chunk):
                    timer.token(self.node.clock())
                    texts.append(item.text)
                elif isinstance(item, Routed):
                    routed = item
                else:
                    finished = item
        if finished is None:  # the node always ends with a Finished or raises
            raise RuntimeError("the request ended without a Finished")
        self._ended("OK", "", prep.request_id, "", timer)
        return web.Response(
            body=completion_body(shape, "".join(texts), finished),
            content_type="application/json",
            headers=_routed_headers(prep, routed),
        )

    async def _stream(
        self,
        request: web.Request,
        prep: Prepared,
        items: Items,
        events: EventStream,
        timer: RequestTimer,
    ) -> web.StreamResponse:
        resp: web.StreamResponse | None = None
        routed: Routed | None = None
        finished: Finished | None = None
        async with contextlib.aclosing(items) as it:
            try:
                async for item in it:
                    if isinstance(item, Routed):
                        routed = item
                        continue
                    if resp is None:  # the first tokens: from now on the status is 200
                        resp = await _open_stream(request, prep, routed)
                        await _write(resp, events.head())
                    if isinstance(item, Chunk):
                        timer.token(self.node.clock())
                        await _write(resp, events.delta(item.text) if item.text else b"")
                    else:
                        finished = item  # a failed one is followed by the RouterError
                if resp is None or finished is None:
                    raise RuntimeError("the request ended without a Finished")
                await resp.write(events.end(finished))
                await resp.write_eof()
            except RouterError as e:
                if resp is None:
                    raise  # nothing sent yet: an error status (the guard)
                self._ended(e.grpc_code, e.reason, prep.request_id, str(e), timer)
                with contextlib.suppress(ConnectionResetError):
                    await resp.write(events.error(e))
                    await resp.write_eof()
                return resp
            except ConnectionResetError:  # the client went away mid-stream
                self._ended("CANCELLED", "client", prep.request_id, "", timer)
                return resp if resp is not None else web.StreamResponse()
        self._ended("OK", "", prep.request_id, "", timer)
        return resp

    # --- models and templates --------------------------------------------------------------------

    async def _resolve(self, req: OpenAIRequest) -> tuple[str, str]:
        """The base model and adapter of a request (see ModelCatalog.resolve)."""
        served = self.node.engines.models()
        try:
            model, lora_name = self.catalog.resolve(req.model, served, req.lora_name)
        except ModelNotFound:
            if not self.catalog.stale(self.node.clock()):
                raise
            await self._learn_adapters()
            model, lora_name = self.catalog.resolve(req.model, served, req.lora_name)
        return model or resolve_model(served, ""), lora_name

    async def _learn_adapters(self) -> None:
        """Ask every healthy engine its ``/v1/models`` (at most every
        ``refresh_interval`` seconds, one asker at a time)."""
        async with self._refresh:
            if not self.catalog.stale(self.node.clock()):
                return
            records = [r for r in self.node.engines.values() if r.healthy]
            answers = await asyncio.gather(*(self._engine_models(r.spec.endpoint) for r in records))
            adapters: dict[str, str] = {}
            for rec, body in zip(records, answers):
                if body is not None:
                    adapters.update(adapters_from_models(body, rec.spec.model))
            self.catalog.learn(adapters, self.node.clock())

    async def _engine_models(self, endpoint: str) -> bytes | None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.node.config.engine_client.health_timeout)
        try:
            async with self._session.get(f"{endpoint}/v1/models", timeout=timeout) as resp:
                return await resp.read() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    def _template(self, model: str) -> ChatTemplate | None:
        if model not in self._templates:
            cfg = self.node.config
            spec = cfg.tokenizers.get(model, cfg.default_tokenizer)
            self._templates[model] = load_chat_template(spec, cfg.chat_templates.get(model, ""))
        return self._templates[model]

    def _render(self, model: str, req: OpenAIRequest) -> str:
        try:
            template = self._template(model)
            if template is None:
                raise InvalidParam(
                    f"model {model!r} has no chat template: give its tokenizer directory (with "
                    "tokenizer_config.json or chat_template.jinja) or --chat-template to the router",
                    "messages",
                )
            return template.render(req.messages, req.add_generation_prompt, req.template_kwargs)
        except ChatTemplateError as e:
            raise InvalidParam(str(e), "messages") from None


def _routed_headers(prep: Prepared, routed: Routed | None) -> dict[str, str]:
    headers = {"x-request-id": prep.request_id}
    if routed is not None:
        headers["x-kvmesh-engine"] = routed.engine_id
        headers["x-kvmesh-predicted-cached-tokens"] = str(routed.predicted_cached_blocks * prep.block_size)
    return headers


async def _open_stream(request: web.Request, prep: Prepared, routed: Routed | None) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            **_routed_headers(prep, routed),
        }
    )
    await resp.prepare(request)
    return resp


async def _write(resp: web.StreamResponse, data: bytes) -> None:
    if data:
        await resp.write(data)
