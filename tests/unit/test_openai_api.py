"""The OpenAI API's wire shapes (router/openai_api.py): bodies in, checked
field by field; models and adapters resolved; responses and server-sent
events out, parsed back by the official openai client's own types; every
RouterError to its HTTP status."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from router.errors import (
    ContextTooLong,
    DeadlineExceeded,
    Draining,
    EnginesBusy,
    NoEngineAvailable,
    Overloaded,
    RequestError,
    RequestRejected,
    RouterError,
    StreamFailed,
)
from router.openai_api import (
    DONE,
    EventStream,
    InvalidParam,
    ModelCatalog,
    ModelNotFound,
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
from router.request_path import Finished


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _chat(**fields: Any) -> bytes:
    return _body(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


def _refused(parse: Any, body: bytes) -> InvalidParam:
    with pytest.raises(InvalidParam) as e:
        parse(body)
    return e.value


FINISHED = Finished(
    finish_reason="length",
    prompt_tokens=40,
    cached_prompt_tokens=32,
    completion_tokens=3,
    engine_id="e0",
    ttft_ms=1.0,
    attempts=1,
)


# --- requests in --------------------------------------------------------------------------------


def test_completion_prompts_text_ids_and_a_batch_of_one() -> None:
    req = parse_completions(_body(model="m", prompt="hello", max_tokens=5, stop="\n", seed=3))
    assert (req.kind, req.model, req.prompt_text, req.prompt_ids) == ("completion", "m", "hello", None)
    assert (req.max_tokens, req.stop, req.seed, req.stream) == (5, ["\n"], 3, False)
    assert parse_completions(_body(prompt=[5, 6, 7])).prompt_ids == [5, 6, 7]
    assert parse_completions(_body(prompt=["one"])).prompt_text == "one"
    assert parse_completions(_body(prompt=[[1, 2]])).prompt_ids == [1, 2]
    assert _refused(parse_completions, _body(prompt=["a", "b"])).param == "prompt"
    for bad in ([], [1, -2], [1.5], None, 7, [True]):
        assert _refused(parse_completions, _body(prompt=bad)).param == "prompt"


def test_extensions_and_stream_options() -> None:
    req = parse_chat(
        _chat(
            stream=True,
            stream_options={"include_usage": True},
            cache_salt="tenant-a",
            lora_name="sql",
            session_key="s1",
            policy="least_load",
            ignore_eos=True,
            chat_template_kwargs={"enable_thinking": False},
            add_generation_prompt=False,
            max_completion_tokens=9,
            max_tokens=4,
            user="u-1",
        )
    )
    assert (req.stream, req.include_usage, req.cache_salt, req.lora_name) == (True, True, "tenant-a", "sql")
    assert (req.session_key, req.policy, req.ignore_eos, req.add_generation_prompt) == (
        "s1",
        "least_load",
        True,
        False,
    )
    assert req.template_kwargs == {"enable_thinking": False}
    assert req.max_tokens == 9  # max_completion_tokens wins, as OpenAI's newer name
    assert _refused(parse_chat, _chat(stream_options={"include_usage": True})).param == "stream_options"
    assert _refused(parse_chat, _chat(stream=True, stream_options={"x": 1})).param == "stream_options"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop": ["", "x"]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"cache_salt": 7}, "cache_salt"),
        ({"chat_template_kwargs": []}, "chat_template_kwargs"),
        ({"top_k": 5}, "top_k"),  # unknown: refused by name, never dropped
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_what_kvmesh_cannot_honour_is_refused_by_name(fields: dict[str, Any], param: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    assert _refused(parse_chat, json.dumps(body).encode()).param == param


def test_no_op_values_of_unsupported_fields_pass() -> None:
    req = parse_chat(
        _chat(n=1, logprobs=False, presence_penalty=0, frequency_penalty=0.0, tools=[], tool_choice="none")
    )
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert parse_completions(_body(prompt="x", echo=False, best_of=1, suffix=None)).prompt_text == "x"
    assert _refused(parse_completions, _body(prompt="x", echo=True)).param == "echo"


def test_messages_keep_what_templates_read() -> None:
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}], "name": "bob"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "f"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]
    assert parse_chat(_body(model="m", messages=msgs)).messages == msgs


def test_bodies_that_are_not_json_objects() -> None:
    assert "not valid JSON" in str(_refused(parse_chat, b"{"))
    assert "JSON object" in str(_refused(parse_completions, b"[1]"))


def test_request_ids() -> None:
    assert request_id_from(None) is None and request_id_from("") is None
    assert request_id_from("req-1") == "req-1"
    with pytest.raises(InvalidParam):
        request_id_from("x" * 300)
    with pytest.raises(InvalidParam):
        request_id_from("a\nb")
    # gRPC metadata and the engine's header carry ASCII only
    with pytest.raises(InvalidParam, match="printable ASCII"):
        request_id_from("r\u00e9q")


# --- sampling and the node's request ------------------------------------------------------------


def test_sampling_takes_openai_defaults() -> None:
    comp = parse_completions(_body(prompt="x"))
    p = sampling_params(comp, default_max_tokens=16, room=1000)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (16, 1.0, 1.0, None)
    chat = parse_chat(_chat(temperature=0, top_p=0.5))
    p = sampling_params(chat, 16, room=1000)
    assert (p.max_tokens, p.temperature, p.top_p) == (1000, 0.0, 0.5)  # chat: the rest of the window
    assert sampling_params(chat, 16, room=None).max_tokens == 16  # window unknown
    assert sampling_params(chat, 16, room=-5).max_tokens == 16  # validation then says context_length
    assert sampling_params(parse_chat(_chat(max_tokens=7)), 16, 1000).max_tokens == 7


def test_client_request_carries_tenancy_and_the_rendered_prompt() -> None:
    chat = parse_chat(_chat(cache_salt="t", session_key="s", policy="random"))
    cr = client_request(chat, "rid", "base", "lora-a", "<rendered>")
    assert (cr.request_id, cr.model, cr.text, cr.token_ids) == ("rid", "base", "<rendered>", None)
    assert (cr.lora_name, cr.cache_salt, cr.session_key, cr.policy) == ("lora-a", "t", "s", "random")
    comp = parse_completions(_body(prompt=[1, 2, 3]))
    cr = client_request(comp, "rid", "base", "", None)
    assert (cr.text, cr.token_ids) == (None, [1, 2, 3])


# --- models -------------------------------------------------------------------------------------


def test_catalog_resolves_models_and_adapters() -> None:
    cat = ModelCatalog(refresh_interval=10)
    assert cat.stale(0.0)
    cat.learn({"sql-lora": "base"}, now=100.0)
    assert not cat.stale(105.0) and cat.stale(110.0)
    served = {"base"}
    assert cat.resolve("base", served, "") == ("base", "")
    assert cat.resolve("base", served, "sql-lora") == ("base", "sql-lora")  # the explicit extension
    assert cat.resolve("sql-lora", served, "") == ("base", "sql-lora")
    assert cat.resolve("", served, "") == ("", "")  # the node picks its only model
    with pytest.raises(ModelNotFound, match=r"`nope` does not exist; served: base, sql-lora\.$"):
        cat.resolve("nope", served, "")  # says what a client may ask for instead
    with pytest.raises(ModelNotFound):
        cat.resolve("sql-lora", {"other"}, "")  # the adapter's base model is not served
    with pytest.raises(InvalidParam, match="names another"):
        cat.resolve("sql-lora", served, "other-lora")


def test_adapters_from_an_engines_model_list() -> None:
    body = json.dumps(
        {
            "object": "list",
            "data": [
                {"id": "base", "parent": None, "root": "/models/base"},
                {"id": "sql-lora", "parent": "base", "root": "/adapters/sql"},
                {"id": "x-lora", "parent": "another-base"},
            ],
        }
    ).encode()
    assert adapters_from_models(body, "base") == {"sql-lora": "base"}
    assert adapters_from_models(b"<html>", "base") == {}
    assert adapters_from_models(b'{"data": 5}', "base") == {}


def test_model_cards() -> None:
    cards = model_cards({"base": 4096, "other": None}, {"sql-lora": "base", "gone": "nowhere"}, 7)
    assert [(c["id"], c["parent"], c["max_model_len"]) for c in cards] == [
        ("base", None, 4096),
        ("other", None, None),
        ("sql-lora", "base", 4096),
    ]
    assert all(c["object"] == "model" and c["created"] == 7 for c in cards)


# --- responses out ------------------------------------------------------------------------------


def _events(data: bytes) -> list[Any]:
    out = []
    for event in data.decode().split("\n\n"):
        if event:
            assert event.startswith("data: ")
            payload = event[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_whole_responses_parse_as_the_openai_client_types() -> None:
    chat = ChatCompletion.model_validate_json(
        completion_body(Shape.of("chat", "r1", "m", 5), "Hi!", FINISHED)
    )
    assert (chat.id, chat.object, chat.model, chat.created) == ("chatcmpl-r1", "chat.completion", "m", 5)
    assert chat.choices[0].message.content == "Hi!" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.total_tokens == 43
    assert chat.usage.prompt_tokens_details is not None
    assert chat.usage.prompt_tokens_details.cached_tokens == 32
    comp = Completion.model_validate_json(
        completion_body(Shape.of("completion", "r2", "m", 5), "text", FINISHED)
    )
    assert (comp.id, comp.object, comp.choices[0].text) == ("cmpl-r2", "text_completion", "text")


def test_chat_stream_role_deltas_finish_usage_done() -> None:
    s = EventStream(Shape.of("chat", "r1", "m", 5), include_usage=True)
    data = s.head() + s.delta("Hel") + s.delta("lo") + s.end(FINISHED)
    events = _events(data)
    assert events[-1] == "[DONE]" and data.endswith(DONE)
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert all("usage" in e and e["usage"] is None for e in events[:-2])  # as OpenAI, when asked for
    quiet = EventStream(Shape.of("chat", "r1", "m", 5), include_usage=False)
    assert [e for e in _events(quiet.end(FINISHED)) if e != "[DONE]"][-1]["choices"]  # no usage chunk


def test_completion_stream_and_a_failure_mid_stream() -> None:
    s = EventStream(Shape.of("completion", "r1", "m", 5), include_usage=False)
    assert s.head() == b""
    events = _events(s.delta("ab") + s.end(FINISHED))
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["ab", ""]
    assert events[-2]["choices"][0]["finish_reason"] == "length" and "usage" not in events[0]
    err = _events(s.error(StreamFailed("engine e0 failed mid-stream: reset")))
    assert err[0]["error"]["code"] == "engine_failed" and err[-1] == "[DONE]"


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, status, kind",
    [
        (RequestError("bad"), 400, "invalid_request_error"),
        (InvalidParam("bad n", "n"), 400, "invalid_request_error"),
        (RequestRejected("engine said no"), 400, "invalid_request_error"),
        (ContextTooLong("too long"), 400, "invalid_request_error"),
        (Unauthenticated("no", reason="no_token"), 401, "authentication_error"),
        (ModelNotFound("no such model"), 404, "not_found_error"),
        (RequestTooLarge("big"), 413, "invalid_request_error"),
        (RequestError("GET", reason="method_not_allowed"), 405, "invalid_request_error"),
        (Overloaded("shed"), 429, "rate_limit_error"),
        (EnginesBusy("full"), 429, "rate_limit_error"),
        (RouterError("bug"), 500, "server_error"),
        (StreamFailed("broke"), 502, "server_error"),
        (NoEngineAvailable("none"), 503, "service_unavailable_error"),
        (Draining("bye"), 503, "service_unavailable_error"),
        (Draining("not yet", reason="joining"), 503, "service_unavailable_error"),
        (DeadlineExceeded("late"), 504, "timeout_error"),
        (DeadlineExceeded("quiet", reason="stream_stalled"), 504, "timeout_error"),
    ],
)
def test_every_error_has_its_status_and_openai_body(error: RouterError, status: int, kind: str) -> None:
    assert http_status(error) == status
    body = json.loads(error_body(error))["error"]
    assert body == {
        "message": str(error),
        "type": kind,
        "param": getattr(error, "param", None),
        "code": error.reason,
    }


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b'{"prompt": [4294967296, 1]}', "prompt", "token ids must be in [0, 4294967296)"),
        (b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}", "temperature", "finite number"),
        (b'{"prompt": "x", "top_p": -1' + b"0" * 400 + b"}", "top_p", "finite number"),
        (b'{"prompt": "x", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "too deeply"),
        (b'{"prompt": "x", "n": true}', "n", "not supported"),
        (b'{"prompt": "x", "best_of": true}', "best_of", "not supported"),
        (b'{"prompt": "x", "logprobs": 0}', "logprobs", "not supported"),  # vLLM: the sampled token's
        (b'{"prompt": "x", "echo": 0}', "echo", "not supported"),
    ],
)
def test_odd_values_are_the_clients_mistake_never_a_crash(body: bytes, param: str | None, words: str) -> None:
    e = _refused(parse_completions, body)
    assert e.param == param and words in str(e)


def test_a_role_that_is_not_a_string_is_refused() -> None:
    e = _refused(parse_chat, _body(model="m", messages=[{"role": ["user"], "content": "hi"}]))
    assert e.param == "messages[0].role"


def test_no_op_values_of_unsupported_fields_pass_as_numbers_or_booleans() -> None:
    body = _body(prompt="x", n=1.0, logprobs=False, presence_penalty=0.0, frequency_penalty=0, echo=False)
    assert parse_completions(body).prompt_text == "x"
