"""Text <-> token ids, for the router and the simulated engine.

Two implementations of one small protocol:

- :class:`BuiltinTokenizer` needs no files and is deterministic across
  processes and machines (no PYTHONHASHSEED dependence): text is split into
  GPT-style pieces (a word with its leading whitespace, a punctuation mark,
  or a run of whitespace) and each piece maps to an id by a stable xxh3 hash
  into a 32,000-id vocabulary. Ids 0-255 are reserved for special tokens
  (0 ``<pad>``, 1 ``<s>``, 2 ``</s>`` = EOS), so hashed ids are in 256..31999.
  Different pieces can collide on one id: the builtin tokenizer is a
  simulation aid, not a language model's vocabulary.
  ``decode`` uses a bounded reverse map of the pieces this process has
  encoded (most recent wins on a collision); an id it has never seen decodes
  to the placeholder ``<t123>``. So ``decode(encode(s)) == s`` for text encoded
  in this process (barring collisions), but not across processes. ``encode``
  may run on several threads at once (a router tokenizes long prompts off
  its event loop): the reverse map is updated under a lock, a few thousand
  pieces at a time.
- :class:`HFTokenizer` wraps a Hugging Face ``tokenizers`` tokenizer loaded
  from a local ``tokenizer.json``. Nothing is ever downloaded.

``get_tokenizer(spec)`` picks one: ``"builtin"``, a path to ``tokenizer.json``,
or a model's directory holding one (where its chat template lives too:
engine_adapters/chat_template.py).
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from typing import Protocol, runtime_checkable

import xxhash

BUILTIN = "builtin"
VOCAB_SIZE = 32_000
NUM_RESERVED = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIAL = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>"}

# A word with its leading whitespace, one punctuation/symbol char, or whitespace.
_PIECE_RE = re.compile(r"\s?\w+|[^\w\s]|\s+", re.UNICODE)
_SEED = 0x6B766D657368  # "kvmesh": fixed so ids are the same everywhere
_REMEMBER_CHUNK = 4096  # pieces added to the reverse map per hold of its lock


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be loaded (missing or invalid file)."""


@runtime_checkable
class Tokenizer(Protocol):
    @property
    def name(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class BuiltinTokenizer:
    """Deterministic hash tokenizer; see the module docstring."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, reverse_map_size: int = 200_000) -> None:
        if vocab_size <= NUM_RESERVED:
            raise ValueError(f"vocab_size must exceed {NUM_RESERVED}, got {vocab_size}")
        self.vocab_size = vocab_size
        self._span = vocab_size - NUM_RESERVED
        self._reverse: OrderedDict[int, str] = OrderedDict()
        self._reverse_max = reverse_map_size
        self._lock = threading.Lock()  # the reverse map's

    @property
    def name(self) -> str:
        return BUILTIN

    def _id(self, piece: str) -> int:
        return NUM_RESERVED + xxhash.xxh3_64_intdigest(piece.encode("utf-8"), _SEED) % self._span

    def piece_id(self, piece: str) -> int:
        """The id of one piece; also remembers it for :meth:`decode`."""
        tid = self._id(piece)
        self._remember([piece], [tid])
        return tid

    def encode(self, text: str) -> list[int]:
        pieces = _PIECE_RE.findall(text)
        ids = [self._id(p) for p in pieces]
        self._remember(pieces, ids)
        return ids

    def _remember(self, pieces: list[str], ids: list[int]) -> None:
        rev, most = self._reverse, self._reverse_max
        for at in range(0, len(ids), _REMEMBER_CHUNK):
            with self._lock:
                for tid, piece in zip(ids[at : at + _REMEMBER_CHUNK], pieces[at : at + _REMEMBER_CHUNK]):
                    rev[tid] = piece
                    rev.move_to_end(tid)
                while len(rev) > most:
                    rev.popitem(last=False)

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        for tid in ids:
            piece = _SPECIAL.get(tid)
            if piece is None:
                piece = self._reverse.get(tid)
            out.append(piece if piece is not None else f"<t{tid}>")
        return "".join(out)


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer from a local tokenizer.json."""

    def __init__(self, path: str) -> None:
        import tokenizers  # imported here: only a tokenizer.json needs the library

        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file not found: {path!r}")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"invalid tokenizer file {path!r}: {e}") from None
        self._path = path

    @property
    def name(self) -> str:
        return self._path

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        # No special tokens: the caller decides about BOS, as vLLM's
        # token-id prompts carry exactly the ids that were sent.
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))


def get_tokenizer(spec: str = BUILTIN, tokenizer_json: str | None = None) -> Tokenizer:
    """``"builtin"`` -> :class:`BuiltinTokenizer`; a path (a tokenizer.json, or
    a directory holding one) -> :class:`HFTokenizer`.

    ``tokenizer_json``, when given, wins over ``spec`` (so callers can pass a
    model name as ``spec`` and the file separately). Raises
    :class:`TokenizerError` if the file is missing or not a valid tokenizer.
    """
    if tokenizer_json:
        return HFTokenizer(tokenizer_json)
    if spec == BUILTIN:
        return BuiltinTokenizer()
    if not spec:
        raise TokenizerError("empty tokenizer spec: use 'builtin' or a path to tokenizer.json")
    if os.path.isdir(spec):  # a model's directory, as Hugging Face lays it out
        return HFTokenizer(os.path.join(spec, "tokenizer.json"))
    return HFTokenizer(spec)
