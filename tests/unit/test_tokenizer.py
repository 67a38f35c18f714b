"""Tokenizers: the deterministic builtin one and local tokenizer.json files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine_adapters.tokenizer import (
    EOS_ID,
    NUM_RESERVED,
    VOCAB_SIZE,
    BuiltinTokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    get_tokenizer,
)

TEXT = "The quick brown fox, again: the quick brown fox!\n  Done."


def test_builtin_is_deterministic_across_processes() -> None:
    ids = BuiltinTokenizer().encode(TEXT)
    code = (
        "import json; from engine_adapters.tokenizer import BuiltinTokenizer;"
        f"print(json.dumps(BuiltinTokenizer().encode({TEXT!r})))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    ).stdout
    assert json.loads(out) == ids


def test_builtin_ids_in_range_and_roundtrip() -> None:
    tok = BuiltinTokenizer()
    ids = tok.encode(TEXT)
    assert all(NUM_RESERVED <= i < VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == TEXT
    # same piece -> same id; pieces keep their leading space
    assert ids[1] == tok.encode(" quick")[0] and ids[1] != tok.encode("quick")[0]
    assert tok.encode("") == []
    assert tok.name == "builtin"
    assert isinstance(tok, Tokenizer)


def test_builtin_unknown_and_special_ids() -> None:
    tok = BuiltinTokenizer()
    assert tok.decode([EOS_ID]) == "</s>"
    assert tok.decode([31999]) == "<t31999>"  # never encoded here


def test_builtin_reverse_map_is_bounded() -> None:
    tok = BuiltinTokenizer(reverse_map_size=10)
    first = tok.encode("alpha")[0]
    tok.encode(" ".join(f"w{i}" for i in range(50)))
    assert tok.decode([first]) == f"<t{first}>"
    assert len(tok._reverse) <= 10


@pytest.fixture
def tokenizer_json(tmp_path: Path) -> Path:
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "kv": 3, "cache": 4}
    t = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = Whitespace()
    path = tmp_path / "tokenizer.json"
    t.save(str(path))
    return path


def test_hf_tokenizer_from_local_file(tokenizer_json: Path) -> None:
    tok = get_tokenizer(str(tokenizer_json))
    assert isinstance(tok, HFTokenizer) and tok.name == str(tokenizer_json)
    assert tok.encode("hello kv cache world") == [1, 3, 4, 2]
    assert tok.encode("hello mars") == [1, 0]
    assert tok.decode([1, 2]) == "hello world"
    assert tok.vocab_size == 5
    # a model name plus an explicit file
    assert get_tokenizer("some-model", tokenizer_json=str(tokenizer_json)).encode("kv") == [3]


def test_get_tokenizer_errors(tmp_path: Path) -> None:
    assert isinstance(get_tokenizer("builtin"), BuiltinTokenizer)
    with pytest.raises(TokenizerError, match="not found"):
        get_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not a tokenizer")
    with pytest.raises(TokenizerError, match="invalid"):
        get_tokenizer(str(bad))
    with pytest.raises(TokenizerError):
        get_tokenizer("")


def test_builtin_encodes_on_several_threads_at_once() -> None:
    # A router tokenizes long prompts on a worker thread while its loop
    # tokenizes short ones: the reverse map must stay whole.
    import threading

    # Pieces shared by the threads, more than the map holds: keys set again
    # while another thread evicts them.
    tok = BuiltinTokenizer(reverse_map_size=5_000)
    texts = [" ".join(f"w{(7 * i + 13 * t) % 6_000}" for i in range(20_000)) for t in range(4)]
    out: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            out[t] = tok.encode(texts[t])
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors
    assert all(out[t] == BuiltinTokenizer().encode(texts[t]) for t in range(4))
    assert len(tok._reverse) <= 5_000
    last = texts[3].split(" ")[-1]
    assert tok.decode(tok.encode(" " + last)) == " " + last
