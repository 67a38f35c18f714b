"""The body of one ``POST /v1/completions`` to an engine (pure: bytes out).

kvmesh always sends token ids (the router has already tokenized and hashed
them, so the engine must cache exactly those ids), streams, asks for the
usage block (``prompt_tokens_details.cached_tokens``: the engine's own word
on the cached prefix) and for ``return_token_ids`` (vLLM >= 0.10.2) so that
generated ids stream back.

A request's tenant and adapter reach the engine too, or the engine would
share one tenant's cache with another and serve a LoRA request with the base
model: vLLM reads ``cache_salt`` (it salts the first block's hash) and takes
a LoRA adapter's name as ``model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

__all__ = ["SamplingParams", "Tenancy", "completion_body"]


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


_ENCODE = msgspec.json.Encoder().encode


def completion_body(
    model: str, prompt_token_ids: list[int], params: SamplingParams, tenancy: Tenancy | None = None
) -> bytes:
    """The JSON body of a streamed completion of ``prompt_token_ids``."""
    t = tenancy or _NO_TENANCY
    return _ENCODE(
        _CompletionRequest(
            model=t.lora_name or model,
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
        )
    )


_NO_TENANCY = Tenancy()
