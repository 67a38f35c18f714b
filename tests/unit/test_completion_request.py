"""The engine request body: a request's adapter and salt in each engine's fields."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine_adapters.completion_request import ENGINE_KINDS, SamplingParams, Tenancy, completion_body

PARAMS = SamplingParams(max_tokens=8)


def _body(tenancy: Tenancy | None = None, **kw: Any) -> dict:
    return json.loads(completion_body("base-model", [1, 2, 3], PARAMS, tenancy, **kw))


def test_vllm_takes_the_adapter_as_model_and_the_salt_as_cache_salt() -> None:
    b = _body(Tenancy(lora_name="sql-lora", cache_salt="tenant-1"))
    assert b["model"] == "sql-lora" and b["cache_salt"] == "tenant-1"
    assert "lora_path" not in b
    assert b["prompt"] == [1, 2, 3] and b["stream"] is True and b["return_token_ids"] is True
    assert b["stream_options"] == {"include_usage": True}


def test_sglang_keeps_the_model_and_names_the_adapter_in_lora_path() -> None:
    b = _body(Tenancy(lora_name="sql-lora", cache_salt="tenant-1"), engine_kind="sglang")
    assert b["model"] == "base-model" and b["lora_path"] == "sql-lora" and b["cache_salt"] == "tenant-1"
    assert "extra_key" not in b  # SGLang's KV events do not carry it


@pytest.mark.parametrize("kind", ENGINE_KINDS)
def test_no_tenancy_sends_neither_field(kind: str) -> None:
    for t in (None, Tenancy()):
        b = _body(t, engine_kind=kind)
        assert b["model"] == "base-model"
        assert "cache_salt" not in b and "lora_path" not in b


def test_an_unknown_engine_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown engine kind"):
        _body(engine_kind="tgi")
