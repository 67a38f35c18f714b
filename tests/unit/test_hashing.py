import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks.hashing import block_hashes, chain_hash, root_seed

MASK64 = (1 << 64) - 1
tokens_st = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200)


def test_golden_values_pin_the_scheme():
    # Changing these means every node and every replicated log disagrees with
    # older versions: only on purpose, with a new root tag.
    s = root_seed("m")
    assert s == 3399714286315605889
    assert block_hashes(list(range(40)), 16, s) == [9326931495915538338, 11079259748958996521]
    assert root_seed("m", "l", "s") == 12832346759185970017


def test_same_across_processes_and_hash_seeds():
    code = (
        "from blocks.hashing import root_seed, block_hashes;"
        "print(block_hashes(list(range(64)), 16, root_seed('mdl', 'lora', 'salt')))"
    )
    outs = set()
    for hs in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hs}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outs.add(r.stdout.strip())
    assert outs == {str(block_hashes(list(range(64)), 16, root_seed("mdl", "lora", "salt")))}


def test_root_seed_separates_model_lora_salt():
    seeds = [
        root_seed("a"),
        root_seed("b"),
        root_seed("a", "l"),
        root_seed("a", ""),
        root_seed("a", None, "s"),
        root_seed("a", None, ""),
        root_seed("a", "s"),  # same string as salt above, different field
        root_seed("a", "l", "s"),
        root_seed("ab"),
        root_seed("a", "b"),
    ]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s <= MASK64 for s in seeds)
    assert root_seed("a", "l", "s") == root_seed("a", "l", "s")


@given(tokens=tokens_st, bs=st.integers(min_value=1, max_value=20), seed=st.integers(0, MASK64))
@settings(max_examples=150, deadline=None)
def test_block_hashes_is_the_chain_of_chain_hash(tokens, bs, seed):
    hs = block_hashes(tokens, bs, seed)
    assert len(hs) == len(tokens) // bs  # the partial tail is not hashed
    parent = seed
    for i, h in enumerate(hs):
        parent = chain_hash(parent, tokens[i * bs : (i + 1) * bs])
        assert h == parent
        assert 0 <= h <= MASK64


@given(tokens=tokens_st, extra=tokens_st, bs=st.integers(1, 16))
@settings(max_examples=100, deadline=None)
def test_prefix_of_prompt_gives_prefix_of_hashes(tokens, extra, bs):
    full = block_hashes(tokens + extra, bs, 7)
    assert block_hashes(tokens, bs, 7) == full[: len(tokens) // bs]


def test_changing_one_token_changes_that_block_and_all_later_only():
    toks = list(range(16 * 6))
    base = block_hashes(toks, 16, 1)
    changed = list(toks)
    changed[16 * 3 + 5] += 1
    after = block_hashes(changed, 16, 1)
    assert after[:3] == base[:3]
    assert all(a != b for a, b in zip(after[3:], base[3:]))
    assert block_hashes(toks, 16, 2)[0] != base[0]  # the seed matters


def test_tail_tokens_do_not_matter():
    toks = list(range(35))
    assert block_hashes(toks, 16, 0) == block_hashes(toks[:32] + [999, 998, 997], 16, 0)
    assert block_hashes(list(range(15)), 16, 0) == []


@pytest.mark.parametrize("bad", [[-1], [2**32], ["x"], [1.5]])
def test_bad_tokens_raise_value_error(bad):
    with pytest.raises(ValueError):
        block_hashes([1] * 16 + bad, 16, 0)
    with pytest.raises(ValueError):
        chain_hash(0, bad)


def test_bad_arguments():
    with pytest.raises(ValueError):
        block_hashes([1] * 32, 0, 0)
    with pytest.raises(ValueError):
        block_hashes([1] * 32, 16, -1)
    with pytest.raises(ValueError):
        block_hashes([1] * 32, 16, 1 << 64)
    with pytest.raises(ValueError):
        chain_hash(-5, [1])
    with pytest.raises(TypeError):
        root_seed(None)  # type: ignore[arg-type]  # bad input on purpose
