"""Request bodies in, one parsed :class:`CompletionRequest` out (pure).

Two wire shapes are accepted:

- OpenAI ``POST /v1/completions`` (:func:`parse_completion`): ``prompt`` as
  token ids or a string (tokenized by the builtin tokenizer; a batch of
  exactly one prompt is accepted), ``max_tokens``, ``n`` (1 only), ``stream``,
  ``stream_options.include_usage``, ``return_token_ids``, ``ignore_eos``,
  ``seed``, ``stop``, ``model`` (the model or a LoRA adapter's name, as
  vLLM), ``cache_salt`` (checked as vLLM 0.33 does: non-empty, at most 128
  characters, none of ``@``, ``/``, backslash or NUL), and SGLang's ``lora_path`` (an
  adapter's name); ``temperature``/``top_p`` are checked and ignored, since
  output is deterministic from the seed.
- SGLang ``POST /generate`` (:func:`parse_generate`): ``input_ids`` (or
  ``text``), ``sampling_params`` (``max_new_tokens``, ``ignore_eos``,
  ``stop``, ``sampling_seed``), ``stream``, ``rid``, ``lora_path``,
  ``cache_salt``. It is translated field by field into the OpenAI shape and
  parsed by the same rules, so both APIs accept and refuse the same things.

Anything invalid raises :class:`BadRequest` (HTTP 400) naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, TypeGuard

import msgspec

from engine_adapters.tokenizer import BuiltinTokenizer

# The APIs' own defaults when the body has no output length: vLLM's
# /v1/completions default and SGLang's SamplingParams default.
OPENAI_DEFAULT_MAX_TOKENS = 16
SGLANG_DEFAULT_MAX_NEW_TOKENS = 128

_MAX_TOKEN_ID = 2**32 - 1
_MAX_CACHE_SALT_LEN = 128  # vLLM's limit, and the characters it refuses in a salt
_CACHE_SALT_FORBIDDEN = frozenset("@/\\\x00")
# Token ids as the request may carry them: JSON integers (not bools, not
# floats) in [0, 2**32). msgspec checks a long prompt in C.
_TOKEN_IDS = list[Annotated[int, msgspec.Meta(ge=0, le=_MAX_TOKEN_ID)]]


class BadRequest(ValueError):
    """A request the engine refuses with HTTP 400; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class CompletionRequest:
    """A validated completion request, whichever API it came from."""

    prompt: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    return_token_ids: bool
    ignore_eos: bool
    seed: int | None
    stop: list[str]
    model: str | None
    # SGLang's caller-chosen ``rid``; None for OpenAI requests, whose id comes
    # from the X-Request-Id header instead.
    client_request_id: str | None = None
    cache_salt: str | None = None
    lora_path: str | None = None  # SGLang's name for the adapter (vLLM's is ``model``)


def is_int(v: Any) -> TypeGuard[int]:
    """A JSON integer: Python's ``bool`` is an ``int`` but not one here."""
    return isinstance(v, int) and not isinstance(v, bool)


def parse_completion(body: Any, tokenizer: BuiltinTokenizer) -> CompletionRequest:
    """Validate an OpenAI completions body; raises :class:`BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    prompt = _parse_prompt(body.get("prompt"), tokenizer)
    max_tokens = body.get("max_tokens", OPENAI_DEFAULT_MAX_TOKENS)
    if max_tokens is None:
        max_tokens = OPENAI_DEFAULT_MAX_TOKENS
    if not is_int(max_tokens) or max_tokens < 1:
        raise BadRequest("max_tokens must be an integer >= 1", "max_tokens")
    if body.get("n", 1) not in (1, None):
        raise BadRequest("only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    seed = body.get("seed")
    if seed is not None and not is_int(seed):
        raise BadRequest("seed must be an integer", "seed")
    stop = _parse_stop(body.get("stop"))
    _check_sampling(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    lora_path = body.get("lora_path")
    if lora_path is not None and (not isinstance(lora_path, str) or not lora_path):
        raise BadRequest("lora_path must be an adapter's name", "lora_path")
    return CompletionRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(opts.get("include_usage", False)),
        return_token_ids=bool(body.get("return_token_ids", False)),
        ignore_eos=bool(body.get("ignore_eos", False)),
        seed=seed,
        stop=stop,
        model=model,
        cache_salt=_parse_cache_salt(body.get("cache_salt")),
        lora_path=lora_path,
    )


def parse_generate(body: Any, tokenizer: BuiltinTokenizer) -> CompletionRequest:
    """Validate an SGLang ``/generate`` body; raises :class:`BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    sp = body.get("sampling_params") or {}
    if not isinstance(sp, dict):
        raise BadRequest("sampling_params must be an object", "sampling_params")
    prompt = body.get("input_ids") if body.get("input_ids") is not None else body.get("text")
    as_openai = {
        "prompt": prompt,
        "max_tokens": sp.get("max_new_tokens", SGLANG_DEFAULT_MAX_NEW_TOKENS),
        # SGLang reads stream as a truth value, not strictly a boolean.
        "stream": bool(body.get("stream", False)),
        "ignore_eos": sp.get("ignore_eos", False),
        "stop": sp.get("stop"),
        "seed": sp.get("sampling_seed"),
        "cache_salt": body.get("cache_salt"),
        "lora_path": body.get("lora_path"),
    }
    req = parse_completion(as_openai, tokenizer)
    rid = body.get("rid")
    req.client_request_id = rid if isinstance(rid, str) and rid else None
    return req


def _parse_prompt(prompt: Any, tokenizer: BuiltinTokenizer) -> list[int]:
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
    return ids


def _parse_cache_salt(salt: Any) -> str | None:
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        raise BadRequest("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    if len(salt) > _MAX_CACHE_SALT_LEN or not _CACHE_SALT_FORBIDDEN.isdisjoint(salt):
        raise BadRequest(
            "Parameter 'cache_salt' must be at most 128 characters and must not contain "
            "'@', '/', '\\', or NUL.",
            "cache_salt",
        )
    return salt


def _parse_stop(stop: Any) -> list[str]:
    stop = stop or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a string or a list of non-empty strings", "stop")
    return stop


def _check_sampling(body: dict[str, Any]) -> None:
    for key in ("temperature", "top_p"):
        v = body.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
            raise BadRequest(f"{key} must be a non-negative number", key)
