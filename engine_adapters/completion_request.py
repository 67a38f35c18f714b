"""The body of one ``POST /v1/completions`` to an engine (pure: bytes out).

kvmesh always sends token ids (the router has already tokenized and hashed
them, so the engine must cache exactly those ids), streams, asks for the
usage block (``prompt_tokens_details.cached_tokens``: the engine's own word
on the cached prefix) and for ``return_token_ids`` (vLLM >= 0.10.2) so that
generated ids stream back.

A request's tenant and adapter reach the engine too, or the engine would
share one tenant's cache with another and serve a LoRA request with the base
model. The engines name them differently (``engine_kind``):

- vLLM (``vllm/entrypoints/openai/completion/protocol.py``, 0.33.0): a LoRA
  adapter is served under its own name, sent as ``model``; ``cache_salt``
  salts the first block's hash. Both come back in ``BlockStored``
  (``lora_name``, and the salt in ``extra_keys``).
- SGLang (``sglang/srt/entrypoints/openai/protocol.py`` ``CompletionRequest``
  and ``serving_base.py`` ``_resolve_lora_path``, 0.5.23): ``model`` stays
  the served model; the adapter is ``lora_path`` (its name; ``model:
  "base:adapter"`` is the other spelling, and wins when both are given);
  ``cache_salt`` namespaces the radix tree. Both come back in ``BlockStored``
  (``lora_name``, ``cache_salt``). SGLang's ``extra_key`` namespaces the tree
  too, but its KV events do not carry it, so a router could not tell those
  blocks apart: kvmesh never sends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import msgspec

__all__ = ["ENGINE_KINDS", "EngineKind", "SamplingParams", "Tenancy", "completion_body"]

EngineKind = Literal["vllm", "sglang"]
ENGINE_KINDS: tuple[EngineKind, ...] = get_args(EngineKind)


@dataclass(slots=True)
class SamplingParams:
    """The sampling parameters sent to the engine with a prompt."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Tenancy:
    """Whose cache a request may use: its LoRA adapter and cache salt ("": none)."""

    lora_name: str = ""
    cache_salt: str = ""


class _StreamOptions(msgspec.Struct):
    include_usage: bool


_STREAM_OPTIONS = _StreamOptions(include_usage=True)


class _CompletionRequest(msgspec.Struct, omit_defaults=True):
    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    stream_options: _StreamOptions
    return_token_ids: bool
    stop: list[str] = []
    ignore_eos: bool = False
    seed: int | None = None
    cache_salt: str | None = None
    lora_path: str | None = None  # SGLang's adapter field; vLLM takes the adapter as model


_ENCODE = msgspec.json.Encoder().encode


def completion_body(
    model: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    tenancy: Tenancy | None = None,
    *,
    engine_kind: EngineKind = "vllm",
) -> bytes:
    """The JSON body of a streamed completion of ``prompt_token_ids`` for an
    engine of ``engine_kind`` (the adapter's field differs, module docstring)."""
    t = tenancy or _NO_TENANCY
    if engine_kind == "vllm":
        served, lora_path = t.lora_name or model, None
    elif engine_kind == "sglang":
        served, lora_path = model, t.lora_name or None
    else:
        raise ValueError(f"unknown engine kind {engine_kind!r}; one of {', '.join(ENGINE_KINDS)}")
    return _ENCODE(
        _CompletionRequest(
            model=served,
            prompt=prompt_token_ids,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stream=True,
            stream_options=_STREAM_OPTIONS,
            return_token_ids=True,
            stop=params.stop,
            ignore_eos=params.ignore_eos,
            seed=params.seed,
            cache_salt=t.cache_salt or None,
            lora_path=lora_path,
        )
    )


_NO_TENANCY = Tenancy()
