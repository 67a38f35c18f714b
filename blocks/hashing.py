"""Router-side block identity: chained 64-bit xxh3 over full blocks of token ids.

Block ``i``'s hash is ``xxh3_64(tokens of block i, seed=hash of block i-1)``;
block 0 is seeded by :func:`root_seed` (model + LoRA adapter + cache salt). A
hash therefore names the whole prefix up to and including its block, so the
index can stop walking a prompt at the first miss. The partial tail block is
never hashed: engines only share full blocks.

Tokens are packed as little-endian uint32 so every node (and every platform)
computes the same hashes; nothing here depends on PYTHONHASHSEED or on the
engine's own hash function.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence

import xxhash

__all__ = ["DEFAULT_BLOCK_SIZE", "block_hashes", "chain_hash", "root_seed"]

DEFAULT_BLOCK_SIZE = 16
_MASK64 = (1 << 64) - 1
_NEEDS_SWAP = sys.byteorder != "little"
_xxh3 = xxhash.xxh3_64_intdigest

# Versioned domain tag: changing the hashing scheme must change every hash.
_ROOT_TAG = b"kvmesh.block.v1"


def _field(value: str | None) -> bytes:
    # None and "" must differ, and field boundaries must be unambiguous.
    if value is None:
        return b"\x00"
    raw = value.encode("utf-8")
    return b"\x01" + len(raw).to_bytes(4, "little") + raw


def root_seed(model: str, lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """The parent hash of a prompt's first block.

    Prompts only share cache when model, LoRA adapter and cache salt all match.
    """
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, got {type(model).__name__}")
    for label, v in (("lora_name", lora_name), ("cache_salt", cache_salt)):
        if v is not None and not isinstance(v, str):
            raise TypeError(f"{label} must be a str or None, got {type(v).__name__}")
    return _xxh3(_ROOT_TAG + _field(model) + _field(lora_name) + _field(cache_salt))


def _pack(tokens: Sequence[int]) -> bytes:
    try:
        if tokens.__class__ is list:
            # fromlist copies a list in C without the per-item iterator protocol
            arr = array("I")
            arr.fromlist(tokens)
        else:
            arr = array("I", tokens)
    except (OverflowError, TypeError) as e:
        raise ValueError(f"token ids must be ints in [0, 2**32): {e}") from None
    if arr.itemsize != 4:  # pragma: no cover - 'I' is 4 bytes on every supported platform
        arr = array("L", tokens)
    if _NEEDS_SWAP:  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def _check_seed(seed: int, label: str) -> None:
    if not isinstance(seed, int) or not 0 <= seed <= _MASK64:
        raise ValueError(f"{label} must be an unsigned 64-bit int, got {seed!r}")


def chain_hash(parent: int, block_tokens: Sequence[int]) -> int:
    """Hash of one block given its parent's hash (the root seed for block 0)."""
    _check_seed(parent, "parent")
    return _xxh3(_pack(block_tokens), parent)


# Blocks hashed per struct unpack: bounds the cached formats (one per count
# and block size) while keeping one C call per chunk of a long prompt.
_CHUNK = 256
_splitters: dict[tuple[int, int], struct.Struct] = {}


def _splitter(count: int, step: int) -> struct.Struct:
    """A Struct that cuts ``count`` consecutive ``step``-byte blocks out of a
    buffer in one C call (cheaper than a slice per block)."""
    s = _splitters.get((count, step))
    if s is None:
        if len(_splitters) >= 2 * _CHUNK:  # several block sizes: start over
            _splitters.clear()
        s = _splitters[(count, step)] = struct.Struct(f"{step}s" * count)
    return s


def block_hashes(tokens: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, seed: int = 0) -> list[int]:
    """Chained hashes of every full block of ``tokens`` (the partial tail is skipped)."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    _check_seed(seed, "seed")
    n_full = len(tokens) // block_size
    if n_full == 0:
        return []
    # Pack once, cut the blocks out with one struct call per chunk, then one
    # xxh3 call per block chained through `h`: no per-block slicing or
    # appending in Python.
    buf = _pack(tokens)  # the tail is packed (and validated) but not hashed
    step = block_size * 4
    h = seed
    f = _xxh3
    out: list[int] = []
    off = 0
    while n_full:
        k = min(n_full, _CHUNK)
        out += [h := f(b, h) for b in _splitter(k, step).unpack_from(buf, off)]
        off += k * step
        n_full -= k
    return out


def xor_digest(hashes: Iterable[int]) -> tuple[int, int]:
    """(count, XOR) of a set of block hashes: an order-free fingerprint for
    comparing one node's index with another's or with an engine's cache."""
    n = x = 0
    for h in hashes:
        n += 1
        x ^= h
    return n, x
