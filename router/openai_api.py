"""The OpenAI API's wire shapes, mapped to a node's request path (pure).

router/http_front.py serves ``POST /v1/completions``, ``POST
/v1/chat/completions``, ``GET /v1/models`` and ``GET /health``; this module
is everything it does that is not I/O:

- **requests in** (:func:`parse_completions`, :func:`parse_chat` ->
  :class:`OpenAIRequest`): the JSON body checked field by field. A field
  kvmesh cannot honour (``n`` > 1, ``logprobs``, penalties, ``tools``, an
  image part, an unknown parameter) is refused with HTTP 400 naming it, as
  OpenAI refuses unknown parameters: nothing a client asked for is silently
  dropped. Extensions, as vLLM names them: ``cache_salt`` (the tenant),
  ``ignore_eos``, ``chat_template_kwargs``, ``add_generation_prompt``; and
  kvmesh's own, as the gRPC API names them: ``lora_name``, ``session_key``,
  ``policy``. The openai client sends them with ``extra_body``.
- **models** (:class:`ModelCatalog`): a request's ``model`` is a model the
  engines serve, or one of their LoRA adapters (learned from the engines'
  own ``GET /v1/models``, where vLLM lists an adapter with its base model as
  ``parent``); the request then goes to the base model's engines with the
  adapter as its ``lora_name``, exactly as a gRPC request naming both.
  Anything else is 404 ``model_not_found``.
- **sampling** (:func:`sampling_params`): OpenAI's defaults, not proto3's:
  ``temperature`` 1; ``max_tokens`` the node's default for completions
  (OpenAI's 16), and for chat what is left of the context window (vLLM's
  rule; the node's default when the engines did not report their window).
- **responses out**: a whole response (:func:`completion_body`), or
  server-sent events (:class:`EventStream`): ``data: {json}`` chunks, a
  usage chunk when ``stream_options.include_usage``, ``data: [DONE]``. Usage
  carries ``prompt_tokens_details.cached_tokens``, the engine's own count.
- **errors** (:func:`http_status`, :func:`error_body`): every
  :class:`router.errors.RouterError` becomes an HTTP status and OpenAI's
  ``{"error": {"message", "type", "param", "code"}}``, with the kvmesh
  reason as ``code`` (and in the ``x-kvmesh-reason`` header):

  ====================================  ======  ============================
  reason                                status  the client
  ====================================  ======  ============================
  invalid_request, engine_rejected,     400     fixes the request
  context_length
  no_token, bad_token                   401     sends a valid token
  not_admin                             403     (gRPC Admin calls only)
  model_not_found, unknown_route        404     names a served model, a real path
  method_not_allowed                    405     uses the path's method
  request_too_large                     413     sends less
  overloaded, engines_busy              429     backs off (``retry-after``)
  internal                              500     reports a bug
  engine_failed                         502     retries (tokens were lost)
  no_engine, draining, joining          503     retries, on another node
  deadline, stream_stalled              504     gives it more time
  ====================================  ======  ============================

  The openai client retries 429 and 5xx by itself (``max_retries``). Once
  a stream has started, the status is already 200: an error then is one
  last ``data: {"error": ...}`` event (which the openai client raises).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from engine_adapters.completion_request import SamplingParams
from router.errors import RequestError, RequestTooLarge, RouterError
from router.request_path import ClientRequest, Finished, request_id_problem

__all__ = [
    "DONE",
    "EventStream",
    "InvalidParam",
    "ModelCatalog",
    "ModelNotFound",
    "OpenAIRequest",
    "RequestTooLarge",
    "Shape",
    "Unauthenticated",
    "adapters_from_models",
    "client_request",
    "completion_body",
    "error_body",
    "http_status",
    "model_cards",
    "parse_chat",
    "parse_completions",
    "request_id_from",
    "sampling_params",
    "usage_of",
]

Kind = Literal["completion", "chat"]
DONE = b"data: [DONE]\n\n"
OPENAI_DEFAULT_TEMPERATURE = 1.0
TOKEN_ID_LIMIT = 2**32  # token ids are uint32 on the gRPC API and in block hashing
_ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "function"))


class InvalidParam(RequestError):
    """A request field kvmesh refuses; ``param`` names it (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(RequestError):
    """No engine serves the model, nor an adapter of that name."""

    grpc_code = "NOT_FOUND"
    reason = "model_not_found"


class Unauthenticated(RouterError):
    """No bearer token (reason ``no_token``), or one the node does not know (``bad_token``)."""

    grpc_code = "UNAUTHENTICATED"


# --- requests in --------------------------------------------------------------------------------


@dataclass(slots=True)
class OpenAIRequest:
    """A checked completions or chat request (absent fields: None or empty)."""

    kind: Kind
    model: str = ""
    stream: bool = False
    include_usage: bool = False
    prompt_text: str | None = None  # completions
    prompt_ids: list[int] | None = None  # completions, as token ids
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    cache_salt: str = ""
    lora_name: str = ""
    session_key: str = ""
    policy: str = ""
    add_generation_prompt: bool = True
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def _decode(body: bytes) -> dict[str, Any]:
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise InvalidParam(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidParam("the body nests JSON arrays or objects too deeply") from None
    if not isinstance(data, dict):
        raise InvalidParam("the body must be a JSON object")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str(data: Mapping[str, Any], name: str) -> str:
    v = data.get(name)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise InvalidParam(f"{name} must be a string", name)
    return v


def _bool(data: Mapping[str, Any], name: str, default: bool = False) -> bool:
    v = data.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidParam(f"{name} must be a boolean", name)
    return v


def _int(data: Mapping[str, Any], name: str, low: int | None = None) -> int | None:
    v = data.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise InvalidParam(f"{name} must be an integer", name)
    if low is not None and v < low:
        raise InvalidParam(f"{name} must be >= {low}, got {v}", name)
    return int(v)


def _number(data: Mapping[str, Any], name: str) -> float | None:
    v = data.get(name)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise InvalidParam(f"{name} must be a number", name)
    try:
        f = float(v)  # an int literal past a double's range does not fit
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise InvalidParam(f"{name} must be a finite number", name)
    return f


def _stop(data: Mapping[str, Any]) -> list[str]:
    v = data.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise InvalidParam("stop must be a non-empty string or a list of them", "stop")
    return list(v)


def _unsupported(data: Mapping[str, Any], name: str, allowed: Collection[Any], what: str) -> None:
    """Refuse a field kvmesh cannot honour unless it has one of its no-op
    values, of the same JSON type (``true`` is not ``1``, nor ``0`` ``false``:
    vLLM reads ``logprobs: 0`` as a request for the sampled token's)."""
    if name not in data:
        return
    v = data[name]
    if not any(_json_type(v) == _json_type(a) and v == a for a in allowed):
        raise InvalidParam(f"{name} is not supported: {what}", name)


def _json_type(v: Any) -> str:
    """A decoded JSON value's type, ints and floats alike (both are numbers)."""
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    return type(v).__name__


# Fields both endpoints accept, and those each adds. ``user`` is informational.
_COMMON_FIELDS = frozenset(
    (
        "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed", "n",
        "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "ignore_eos",
        "cache_salt", "lora_name", "session_key", "policy",
    )
)  # fmt: skip
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "response_format", "chat_template_kwargs", "add_generation_prompt",
}  # fmt: skip


def _common(data: dict[str, Any], kind: Kind, known: frozenset[str]) -> OpenAIRequest:
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidParam(f"unrecognized request argument: {unknown[0]}", unknown[0])
    stream = _bool(data, "stream")
    include_usage = False
    opts = data.get("stream_options")
    if opts is not None:
        if not stream:
            raise InvalidParam("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise InvalidParam("stream_options takes include_usage only", "stream_options")
        include_usage = _bool(opts, "include_usage")
    _unsupported(data, "n", (None, 1), "one choice per request")
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(data, name, (None, 0, 0.0), "the engines are sent no penalties")
    _unsupported(data, "logit_bias", (None, {}), "the engines are sent no logit bias")
    _unsupported(data, "logprobs", (None, False), "no log probabilities are returned")
    return OpenAIRequest(
        kind=kind,
        model=_str(data, "model"),
        stream=stream,
        include_usage=include_usage,
        max_tokens=_int(data, "max_tokens", 1),
        temperature=_number(data, "temperature"),
        top_p=_number(data, "top_p"),
        stop=_stop(data),
        seed=_int(data, "seed"),
        ignore_eos=_bool(data, "ignore_eos"),
        cache_salt=_str(data, "cache_salt"),
        lora_name=_str(data, "lora_name"),
        session_key=_str(data, "session_key"),
        policy=_str(data, "policy"),
    )


def parse_completions(body: bytes) -> OpenAIRequest:
    """A ``POST /v1/completions`` body; raises :class:`InvalidParam`."""
    data = _decode(body)
    req = _common(data, "completion", _COMPLETION_FIELDS)
    _unsupported(data, "echo", (None, False), "the prompt is not echoed")
    _unsupported(data, "best_of", (None, 1), "one candidate per request")
    _unsupported(data, "suffix", (None, ""), "no insertion")
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.prompt_text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t < TOKEN_ID_LIMIT for t in prompt):
        req.prompt_ids = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        raise InvalidParam(f"token ids must be in [0, {TOKEN_ID_LIMIT})", "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise InvalidParam("a batch of prompts is not supported: send one request per prompt", "prompt")
    else:
        raise InvalidParam("prompt must be a string or a non-empty list of token ids", "prompt")
    return req


def parse_chat(body: bytes) -> OpenAIRequest:
    """A ``POST /v1/chat/completions`` body; raises :class:`InvalidParam`."""
    data = _decode(body)
    req = _common(data, "chat", _CHAT_FIELDS)
    req.max_tokens = _int(data, "max_completion_tokens", 1) or req.max_tokens
    _unsupported(data, "top_logprobs", (None, 0), "no log probabilities are returned")
    _unsupported(data, "tools", (None, []), "tool calls are not parsed from the output")
    _unsupported(data, "tool_choice", (None, "none", "auto"), "tool calls are not parsed from the output")
    _bool(data, "parallel_tool_calls")  # meaningless without tools: checked, then ignored
    _unsupported(data, "response_format", (None, {"type": "text"}), "the engines are sent no output format")
    req.add_generation_prompt = _bool(data, "add_generation_prompt", True)
    kwargs = data.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InvalidParam("chat_template_kwargs must be an object", "chat_template_kwargs")
    req.template_kwargs = dict(kwargs or {})
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParam("messages must be a non-empty list", "messages")
    req.messages = [_message(m, i) for i, m in enumerate(messages)]
    return req


def _message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise InvalidParam(f"{where} must be an object", where)
    role = m.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidParam(f"{where}.role must be one of {', '.join(sorted(_ROLES))}", f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise InvalidParam(
                    f"{where}.content[{j}]: only text parts are supported", f"{where}.content[{j}]"
                )
    elif content is None:
        if role != "assistant":
            raise InvalidParam(f"{where}.content is required for role {role}", f"{where}.content")
    elif not isinstance(content, str):
        raise InvalidParam(f"{where}.content must be a string or a list of text parts", f"{where}.content")
    return dict(m)


def request_id_from(header: str | None) -> str | None:
    """The client's ``x-request-id``, if it gave a usable one (None: make one)."""
    if not header:
        return None
    problem = request_id_problem(header)
    if problem is not None:
        raise InvalidParam(f"x-request-id {problem}", "x-request-id")
    return header


def sampling_params(req: OpenAIRequest, default_max_tokens: int, room: int | None) -> SamplingParams:
    """The engine's sampling parameters. ``room``: tokens left in the context
    window after the prompt, when known (a chat's default length)."""
    max_tokens = req.max_tokens
    if max_tokens is None:
        max_tokens = room if req.kind == "chat" and room is not None and room > 0 else default_max_tokens
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        stop=req.stop,
        ignore_eos=req.ignore_eos,
        seed=req.seed,
        **({"top_p": req.top_p} if req.top_p is not None else {}),
    )


def client_request(
    req: OpenAIRequest, request_id: str, model: str, lora_name: str, prompt_text: str | None
) -> ClientRequest:
    """What the node's request path takes; ``prompt_text`` is the chat's
    rendered prompt (None: the completion's own prompt)."""
    return ClientRequest(
        request_id=request_id,
        model=model,
        text=prompt_text if prompt_text is not None else req.prompt_text,
        token_ids=req.prompt_ids if prompt_text is None else None,
        session_key=req.session_key,
        policy=req.policy,
        lora_name=lora_name,
        cache_salt=req.cache_salt,
    )


# --- models -------------------------------------------------------------------------------------


@dataclass(slots=True)
class ModelCatalog:
    """The LoRA adapters the engines serve, by name, with their base model,
    as last learned from the engines' ``/v1/models``."""

    refresh_interval: float = 10.0  # seconds before the engines are asked again
    adapters: dict[str, str] = field(default_factory=dict)  # adapter -> base model
    refreshed_at: float | None = None

    def stale(self, now: float) -> bool:
        return self.refreshed_at is None or now - self.refreshed_at >= self.refresh_interval

    def learn(self, adapters: Mapping[str, str], now: float) -> None:
        self.adapters = dict(adapters)
        self.refreshed_at = now

    def resolve(self, requested: str, served: Collection[str], lora_name: str) -> tuple[str, str]:
        """``(model, lora_name)`` for a request naming ``requested`` (and
        perhaps an explicit ``lora_name``); raises :class:`ModelNotFound`."""
        if not requested or requested in served:
            return requested, lora_name
        base = self.adapters.get(requested)
        if base is None or base not in served:
            names = sorted({*served, *(a for a, b in self.adapters.items() if b in served)})
            said = ", ".join(names) or "none"
            raise ModelNotFound(f"The model `{requested}` does not exist; served: {said}.")
        if lora_name and lora_name != requested:
            raise InvalidParam(
                f"model {requested!r} is a LoRA adapter; lora_name {lora_name!r} names another", "lora_name"
            )
        return base, requested


class _Card(msgspec.Struct):
    id: str
    parent: str | None = None


class _Models(msgspec.Struct):
    data: list[_Card]


def adapters_from_models(body: bytes, base_model: str) -> dict[str, str]:
    """The adapters of ``base_model`` in an engine's ``/v1/models`` answer
    (cards whose ``parent`` is the base model); empty if it lists none or
    cannot be read."""
    try:
        cards = msgspec.json.decode(body, type=_Models).data
    except (msgspec.DecodeError, msgspec.ValidationError):
        return {}
    return {c.id: base_model for c in cards if c.parent == base_model and c.id != base_model}


def model_cards(
    served: Mapping[str, int | None], adapters: Mapping[str, str], created: int
) -> list[dict[str, Any]]:
    """``GET /v1/models``: each served model (with its context window, when
    the engines reported it) and each adapter (``parent``: its base model)."""

    def card(name: str, parent: str | None, max_model_len: int | None) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "kvmesh",
            "root": name,
            "parent": parent,
            "max_model_len": max_model_len,
        }

    cards = [card(m, None, served[m]) for m in sorted(served)]
    cards += [card(a, base, served.get(base)) for a, base in sorted(adapters.items()) if base in served]
    return cards


# --- responses out ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """What every chunk of one response repeats."""

    kind: Kind
    id: str  # cmpl-<request id> or chatcmpl-<request id>
    model: str  # as the client named it (an adapter's name for an adapter)
    created: int  # Unix seconds

    @classmethod
    def of(cls, kind: Kind, request_id: str, model: str, created: int) -> Shape:
        return cls(kind, ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id, model, created)

    def envelope(self, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
        obj = {"completion": "text_completion", "chat": "chat.completion"}[self.kind]
        if stream and self.kind == "chat":
            obj += ".chunk"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


def usage_of(f: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_prompt_tokens},
    }


def _finish_reason(f: Finished) -> str:
    return f.finish_reason or "stop"


def completion_body(shape: Shape, text: str, finished: Finished) -> bytes:
    """The whole (non-streamed) response."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _finish_reason(finished)}
    if shape.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    body = shape.envelope([choice], stream=False)
    body["usage"] = usage_of(finished)
    return msgspec.json.encode(body)


def _sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class EventStream:
    """The server-sent events of one streamed response, in order:
    :meth:`head`, :meth:`delta` per chunk of text, then :meth:`end` (or
    :meth:`error` if the request fails mid-stream)."""

    __slots__ = ("include_usage", "shape")

    def __init__(self, shape: Shape, include_usage: bool) -> None:
        self.shape = shape
        self.include_usage = include_usage

    def _chunk(self, content: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}
        body = self.shape.envelope([choice], stream=True)
        if self.include_usage:
            body["usage"] = None  # as OpenAI: every chunk but the usage chunk says so
        return _sse(body)

    def _content(self, text: str) -> dict[str, Any]:
        return {"delta": {"content": text}} if self.shape.kind == "chat" else {"text": text}

    def head(self) -> bytes:
        """The chat's first chunk names the role; completions have none."""
        if self.shape.kind != "chat":
            return b""
        return self._chunk({"delta": {"role": "assistant", "content": ""}}, None)

    def delta(self, text: str) -> bytes:
        return self._chunk(self._content(text), None)

    def end(self, finished: Finished) -> bytes:
        """The finish reason, the usage chunk (if asked for) and ``[DONE]``."""
        empty: dict[str, Any] = {"delta": {}} if self.shape.kind == "chat" else {"text": ""}
        out = self._chunk(empty, _finish_reason(finished))
        if self.include_usage:
            body = self.shape.envelope([], stream=True)
            body["usage"] = usage_of(finished)
            out += _sse(body)
        return out + DONE

    def error(self, e: RouterError) -> bytes:
        """A failure after the stream started: an error event, then ``[DONE]``."""
        return b"data: " + error_body(e) + b"\n\n" + DONE


# --- errors -------------------------------------------------------------------------------------

_STATUS_OF_CODE = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
_STATUS_OF_REASON = {
    "context_length": 400,
    "engine_failed": 502,
    "request_too_large": 413,
    "method_not_allowed": 405,
}
_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def http_status(e: RouterError) -> int:
    """The HTTP status of a request that ended with ``e`` (module docstring)."""
    return _STATUS_OF_REASON.get(e.reason) or _STATUS_OF_CODE.get(e.grpc_code, 500)


def error_body(e: RouterError) -> bytes:
    """OpenAI's error object; ``code`` is the kvmesh reason."""
    status = http_status(e)
    return msgspec.json.encode(
        {
            "error": {
                "message": str(e),
                "type": _TYPE_OF_STATUS.get(status, "server_error"),
                "param": getattr(e, "param", None),
                "code": e.reason,
            }
        }
    )
