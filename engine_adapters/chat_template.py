"""A model's chat template: chat messages -> the prompt text the engine sees.

An engine serving ``/v1/chat/completions`` renders the messages with the
model's own Jinja template and tokenizes the result; a router that hashed
anything else would predict cache hits the engine never has. So the router
renders the template itself, exactly as Hugging Face ``transformers``
(``apply_chat_template``) and vLLM do, and sends the engine the token ids
(engine_adapters/completion_request.py): the engine then caches precisely
what was hashed, whatever its own chat rendering would have done.

Where the template comes from (:func:`load_chat_template`), for a model
whose tokenizer is ``--tokenizer MODEL=PATH`` (a ``tokenizer.json``, or the
model's directory holding one):

1. an explicit template file (``--chat-template MODEL=FILE``: a ``.jinja``
   file, or a JSON file with a ``chat_template`` key), as vLLM's
   ``--chat-template``: give both the same file;
2. else ``chat_template.jinja`` beside the tokenizer (where ``transformers``
   saves it; it wins over the next one, as there);
3. else the ``chat_template`` of ``tokenizer_config.json`` beside it (a
   string, or a list of named templates: the one named ``default``);
4. the builtin tokenizer (the simulated engine's) has :data:`DEFAULT_TEMPLATE`,
   ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then
   ``<|im_start|>assistant\\n``).

A model with a tokenizer.json and none of these has no template: chat
requests for it are refused, as vLLM refuses them.

Rendering (:meth:`ChatTemplate.render`) is ``transformers``' own: a sandboxed
Jinja environment (``ImmutableSandboxedEnvironment``, ``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, the ``{% generation %}`` tag), the
globals ``raise_exception`` and ``strftime_now``, a ``tojson`` filter that
keeps non-ASCII characters, and the variables ``messages``,
``add_generation_prompt``, ``tools`` and ``documents`` (None), the special
tokens of ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ...) and
the request's extra template arguments (``chat_template_kwargs``, e.g.
``enable_thinking``). Message contents take the shape the template reads,
as vLLM decides it (its "content format"): a template that loops over a
message's ``content`` gets a list of ``{"type": "text", "text": ...}``
parts; any other gets a string, the text parts joined by newlines. A missing
content is empty either way.

Loading reads files; rendering is pure but for ``strftime_now``, whose clock
is an argument.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine_adapters.tokenizer import BUILTIN

__all__ = [
    "DEFAULT_TEMPLATE",
    "RESERVED_VARIABLES",
    "ChatTemplate",
    "ChatTemplateError",
    "load_chat_template",
]

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)
# What a request's own template arguments may not replace.
RESERVED_VARIABLES = frozenset(("messages", "add_generation_prompt", "tools", "documents", *_SPECIAL_TOKENS))


class ChatTemplateError(ValueError):
    """A template that cannot be loaded, or messages it refuses to render
    (its ``raise_exception``, or an error inside the template)."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks the
    assistant's tokens with it (for training masks); rendering keeps the body."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension declares it as a class attribute

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile(source: str, now: Callable[[], datetime]) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from None


class ChatTemplate:
    """One model's compiled template and its special tokens (``bos_token``
    etc., as strings); ``origin`` says where it was read, for messages;
    ``content_parts``: whether it reads contents as lists of parts."""

    __slots__ = ("_template", "content_parts", "origin", "source", "special_tokens")

    def __init__(
        self,
        source: str,
        special_tokens: Mapping[str, Any] | None = None,
        origin: str = "the builtin tokenizer",
        now: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.origin = origin
        self._template = _compile(source, now)
        self.content_parts = _loops_over_content(self._template.environment.parse(source))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text of ``messages`` (dicts with ``role`` and
        ``content``: a string, None, or a list of ``{"type": "text"}`` parts).
        ``extra`` are the request's own template arguments."""
        given = dict(extra or {})
        clash = RESERVED_VARIABLES.intersection(given)
        if clash:
            raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(sorted(clash))}")
        try:
            return self._template.render(
                messages=[_shaped(m, self.content_parts) for m in messages],
                # Defined, as transformers passes them: "tools is not none" must be false.
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
                **given,
            )
        except jinja2.TemplateError as e:  # raise_exception, undefined names, sandbox refusals
            raise ChatTemplateError(f"the chat template of {self.origin} refused the messages: {e}") from None
        except (TypeError, ValueError, LookupError, ArithmeticError) as e:
            # A template written for other messages (a None content in "+"...).
            raise ChatTemplateError(f"the chat template of {self.origin} failed: {e}") from None


def _shaped(message: Mapping[str, Any], parts: bool) -> dict[str, Any]:
    """``message`` with its content as the template reads it: a list of text
    parts (``parts``), or a string (parts joined by newlines); None is empty."""
    out = dict(message)
    content = out.get("content")
    if parts:
        if content is None:
            out["content"] = []
        elif isinstance(content, str):
            out["content"] = [{"type": "text", "text": content}]
    elif content is None:
        out["content"] = ""
    elif isinstance(content, list):
        out["content"] = "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return out


def _reads(node: jinja2.nodes.Node, names: Collection[str], key: str | None = None) -> bool:
    """Whether ``node`` reads one of ``names`` (``name[key]`` or ``name.key``
    with a key), through filters, tests and slices."""
    while isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test) or (
        isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice)
    ):
        if node.node is None:
            return False
        node = node.node
    if key is None:
        return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name in names
    if isinstance(node, jinja2.nodes.Getitem):
        item = isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key
        return item and _reads(node.node, names)
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == key and _reads(node.node, names)
    return False


def _loops_over_content(ast: jinja2.nodes.Template) -> bool:
    """vLLM's content-format detection: does the template loop over
    ``message['content']``, for a ``message`` it loops over in ``messages``
    (or in a variable set from it)? Scopes are not followed, as in vLLM."""
    lists = {"messages"}
    grew = True
    while grew:  # variables set from messages, or from those
        found = {
            a.target.name
            for a in ast.find_all(jinja2.nodes.Assign)
            if isinstance(a.target, jinja2.nodes.Name) and _reads(a.node, lists)
        }
        grew = not found <= lists
        lists |= found
    loops = list(ast.find_all(jinja2.nodes.For))
    items = {
        f.target.name for f in loops if isinstance(f.target, jinja2.nodes.Name) and _reads(f.iter, lists)
    }
    return any(_reads(f.iter, items, "content") for f in loops)


def _token_text(value: Any) -> Any:
    """A special token as tokenizer_config.json writes it: a string, null, or an AddedToken object."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_text(v) for v in value]
    return value


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"cannot read {path!r}: {e}") from None
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path!r} is not a JSON object")
    return data


def _template_of(config: Mapping[str, Any], path: str) -> str | None:
    """The ``chat_template`` of a tokenizer_config.json: a string, or the one named ``default``."""
    t = config.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        default = named.get("default")
        if isinstance(default, str):
            return default
        raise ChatTemplateError(f"{path!r}: named chat templates {sorted(map(str, named))} have no 'default'")
    raise ChatTemplateError(f"{path!r}: chat_template must be a string or a list of named templates")


def _read_template_file(path: str) -> str:
    if path.endswith(".json"):
        t = _template_of(_read_json(path), path)
        if t is None:
            raise ChatTemplateError(f"{path!r} has no chat_template")
        return t
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ChatTemplateError(f"cannot read the chat template {path!r}: {e}") from None


def load_chat_template(
    tokenizer_spec: str, template_file: str = "", now: Callable[[], datetime] = datetime.now
) -> ChatTemplate | None:
    """The chat template of a model whose tokenizer is ``tokenizer_spec``
    (``"builtin"``, a tokenizer.json, or a directory holding one), or of
    ``template_file`` when given; None if there is none (module docstring).
    Raises :class:`ChatTemplateError` for a file that exists but cannot be used."""
    if tokenizer_spec == BUILTIN or not tokenizer_spec:
        source = _read_template_file(template_file) if template_file else DEFAULT_TEMPLATE
        return ChatTemplate(source, origin=template_file or "the builtin tokenizer", now=now)
    folder = tokenizer_spec if os.path.isdir(tokenizer_spec) else os.path.dirname(tokenizer_spec)
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    # As transformers' special_tokens_map: only the tokens that are set.
    specials = {k: _token_text(config[k]) for k in _SPECIAL_TOKENS if config.get(k) is not None}
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if template_file:
        source, origin = _read_template_file(template_file), template_file
    elif os.path.isfile(jinja_path):
        source, origin = _read_template_file(jinja_path), jinja_path
    else:
        found = _template_of(config, config_path)
        if found is None:
            return None
        source, origin = found, config_path
    return ChatTemplate(source, specials, origin, now)
