"""The words the simulated engine writes: its output vocabulary (pure).

Sampled ids are drawn from these words (each with a leading space), so a
generated completion decodes to readable text with the builtin tokenizer
and stop strings can match whole words. The list is fixed: changing it
changes every seeded output.
"""

from __future__ import annotations

from engine_adapters.tokenizer import BuiltinTokenizer

_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "it", "for", "on", "with", "as", "was", "be",
    "by", "at", "this", "are", "from", "or", "an", "have", "not", "they", "which", "one", "you",
    "were", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will",
    "would", "who", "so", "no", "out", "up", "into", "time", "model", "cache", "token", "block",
    "engine", "router", "prefix", "request", "fast", "memory", "batch", "layer", "value", "key",
    "query", "stream", "mesh", "node", "data", "result", "simple", "state", "event", "order",
    "light", "river", "stone", "cloud", "green", "quiet", "bright", "north", "garden", "window",
    "paper", "music", "story", "answer", "number", "system", "signal",
)  # fmt: skip


class OutputVocab:
    """Token id <-> text of the words the engine samples."""

    __slots__ = ("_text", "_tokenizer", "ids")

    def __init__(self, tokenizer: BuiltinTokenizer) -> None:
        self._tokenizer = tokenizer
        self._text = {tokenizer.piece_id(" " + w): " " + w for w in _WORDS}
        self.ids = sorted(self._text)  # the core samples from these, in this order

    def text(self, token_id: int) -> str:
        """The text of a sampled id (any other id decodes through the tokenizer)."""
        t = self._text.get(token_id)
        return t if t is not None else self._tokenizer.decode([token_id])
