"""Chat templates (engine_adapters/chat_template.py): found where Hugging Face
puts them, rendered as transformers renders them, against the real templates
of Qwen2.5, Llama 3 and Mistral (tests/fixtures/chat_models/)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from engine_adapters.chat_template import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    ChatTemplateError,
    load_chat_template,
)
from engine_adapters.tokenizer import get_tokenizer

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "chat_models"
QWEN, LLAMA3, MISTRAL = MODELS / "qwen2.5", MODELS / "llama-3", MODELS / "mistral-7b-instruct-v0.2"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
)


def test_qwen_template_renders_chatml_with_its_default_system_prompt() -> None:
    t = load_chat_template(str(QWEN))
    assert t is not None and t.origin == str(QWEN / "tokenizer_config.json")
    assert t.render(CHAT) == CHATML
    no_system = t.render(CHAT[1:], add_generation_prompt=False)
    assert no_system == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
    )


def test_qwen_template_renders_tool_calls_with_tojson_keeping_unicode() -> None:
    t = load_chat_template(str(QWEN / "tokenizer.json"))  # the file names its directory
    assert t is not None
    calls = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}}}]
    out = t.render(
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "content": "12°C"},
        ]
    )
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in out
    assert "<|im_start|>user\n<tool_response>\n12°C\n</tool_response><|im_end|>\n" in out


def test_llama3_template_starts_with_bos_from_tokenizer_config_and_trims() -> None:
    t = load_chat_template(str(LLAMA3))
    assert t is not None and t.special_tokens["bos_token"] == "<|begin_of_text|>"
    out = t.render([{"role": "user", "content": "  Hi there \n"}])
    assert out == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_rendered_special_tokens_encode_to_single_ids() -> None:
    # The router hashes these ids: a special token must be one id, as in the engine.
    tok = get_tokenizer(str(QWEN))
    t = load_chat_template(str(QWEN))
    assert t is not None
    ids = tok.encode(t.render(CHAT[1:]))
    vocab = tok.vocab_size  # type: ignore[attr-defined]  # HFTokenizer's, not the protocol's
    start, end = vocab - 2, vocab - 1  # <|im_start|>, <|im_end|> were added last
    assert ids[0] == start and ids.count(start) == 3 and ids.count(end) == 2
    assert tok.decode(ids) == t.render(CHAT[1:])


def test_mistral_raise_exception_and_added_token_objects() -> None:
    t = load_chat_template(str(MISTRAL))
    assert (
        t is not None and t.special_tokens["bos_token"] == "<s>" and t.special_tokens["eos_token"] == "</s>"
    )
    assert "pad_token" not in t.special_tokens  # null: absent, as in transformers' special_tokens_map
    assert t.render([{"role": "user", "content": "Hi"}]) == "<s>[INST] Hi [/INST]"
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        t.render(CHAT)


def test_builtin_tokenizer_gets_the_documented_default() -> None:
    t = load_chat_template("builtin")
    assert t is not None and t.source == DEFAULT_TEMPLATE
    assert t.render(CHAT) == CHATML


def test_text_parts_are_joined_and_a_missing_content_is_empty() -> None:
    t = ChatTemplate(DEFAULT_TEMPLATE)
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    out = t.render([{"role": "user", "content": parts}, {"role": "assistant", "content": None}], False)
    assert out == "<|im_start|>user\none\ntwo<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"


def test_where_the_template_is_found(tmp_path: Path) -> None:
    # tokenizer.json alone: no template (chat is refused for that model)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert load_chat_template(str(tmp_path / "tokenizer.json")) is None
    # tokenizer_config.json beside it; named templates pick "default"
    config = {
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ messages[0].content }}{{ eos_token }}"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = load_chat_template(str(tmp_path))
    assert t is not None and t.render([{"role": "user", "content": "a"}]) == "a</s>"
    # chat_template.jinja wins over tokenizer_config.json, as in transformers
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    t = load_chat_template(str(tmp_path))
    assert t is not None and t.render(CHAT) == "J2"
    # an explicit file wins over both, a JSON one included
    explicit = tmp_path / "other.json"
    explicit.write_text(json.dumps({"chat_template": "E{{ bos_token }}"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<b>"}))
    t = load_chat_template(str(tmp_path), str(explicit))
    assert t is not None and t.render(CHAT) == "E<b>" and t.origin == str(explicit)


def test_broken_templates_fail_at_load_not_at_the_first_request(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        load_chat_template("builtin", str(bad))
    with pytest.raises(ChatTemplateError, match="cannot read"):
        load_chat_template("builtin", str(tmp_path / "missing.jinja"))
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ChatTemplateError, match="cannot read"):
        load_chat_template(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "x", "template": ""}]})
    )
    with pytest.raises(ChatTemplateError, match="no 'default'"):
        load_chat_template(str(tmp_path))


def test_the_sandbox_and_the_extensions() -> None:
    # No way out of the sandbox from a template.
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}").render(CHAT)
    # strftime_now reads the clock it is given; {% generation %} keeps its body; loop controls work.
    t = ChatTemplate(
        "{{ strftime_now('%d %b %Y') }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m.role }}{% endgeneration %}{% endfor %}",
        now=lambda: datetime(2024, 7, 23),
    )
    assert t.render(CHAT) == "23 Jul 2024|system"


def test_request_template_arguments_reach_the_template_but_cannot_replace_its_inputs() -> None:
    t = ChatTemplate("{% if enable_thinking %}<think>{% endif %}{{ messages[0].content }}")
    assert t.render(CHAT, extra={"enable_thinking": True}) == "<think>Be brief."
    assert t.render(CHAT) == "Be brief."  # an undefined variable is false, as in transformers
    with pytest.raises(ChatTemplateError, match="may not set messages"):
        t.render(CHAT, extra={"messages": []})
    with pytest.raises(ChatTemplateError, match="failed"):
        ChatTemplate("{{ messages[0].content + 1 }}").render(CHAT)


def test_templates_that_loop_over_content_parts_get_parts() -> None:
    # As vLLM's content-format detection: a loop over message['content'] (here
    # through a variable set from a slice of messages, and a filter) means parts.
    parts_only = (
        "{% set conversation = messages[1:] %}{% for m in conversation %}"
        "{% for part in m.content | list %}[{{ part['type'] }}:{{ part['text'] }}]{% endfor %}{% endfor %}"
    )
    t = ChatTemplate(parts_only)
    assert t.content_parts
    two_parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    msgs = [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]
    assert t.render(msgs) == "[text:hi]"
    assert t.render([msgs[0], {"role": "user", "content": two_parts}]) == "[text:a][text:b]"
    assert t.render([msgs[0], {"role": "assistant", "content": None}]) == ""
    # Llama 3.2 Vision's way: strings as they are, parts one by one.
    vision = (
        "{%- for message in messages %}{{- message['role'] + ': ' }}{%- if message['content'] is string %}"
        "{{- message['content'] }}{%- else %}{%- for content in message['content'] %}"
        "{%- if content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
        "{{- '\\n' }}{%- endfor %}"
    )
    assert ChatTemplate(vision).content_parts
    assert ChatTemplate(vision).render(msgs) == "system: x\nuser: hi\n"
    # String templates (every fixture) get strings.
    for model in (QWEN, LLAMA3, MISTRAL):
        t2 = load_chat_template(str(model))
        assert t2 is not None and not t2.content_parts
    assert not ChatTemplate(DEFAULT_TEMPLATE).content_parts


def test_tools_and_documents_are_defined_as_none_as_in_transformers() -> None:
    t = ChatTemplate("{% if tools is not none %}T{% endif %}{% if documents is none %}D{% endif %}")
    assert t.render(CHAT) == "D"
