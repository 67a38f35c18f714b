"""The prefix index's bound (``--max-index-blocks``), in each implementation
(``router/index.py``'s ``PrefixIndex``, the native ``NativeIndex``): the
index never holds more than the bound, the most recently matched prefix
survives, dropped blocks are gone from every holder (removing or clearing
them later is harmless), and memory stays flat under an endless stream of
stores. ``test_native_index_parity.py`` checks that both drop the same blocks.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blocks.tiers import TIER_HOST, TIERS
from router.config import RouterConfig
from router.index import PrefixIndex
from router.native_index import NATIVE_INDEX_BUILT, NativeIndex, new_index
from router.node import RouterNode

REPO = Path(__file__).resolve().parents[2]
NOT_BUILT = "NATIVE PATH NOT TESTED: the native module is not built (`make install` builds it where cargo is)"
IMPLS = [
    pytest.param("python", id="python"),
    pytest.param("native", id="native", marks=pytest.mark.skipif(not NATIVE_INDEX_BUILT, reason=NOT_BUILT)),
]


def make(impl: str, max_blocks: int) -> Any:
    return PrefixIndex(max_blocks) if impl == "python" else NativeIndex(max_blocks)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_bound_holds_and_the_hot_prefix_survives(impl: str) -> None:
    rng = random.Random(3)
    bound = 500
    ix = make(impl, bound)
    assert ix.max_blocks == bound
    hot = [rng.getrandbits(64) for _ in range(40)]
    ix.store("e0", hot)
    ix.store("e1", hot[:25])
    cold_stored: list[int] = []
    for step in range(400):
        w = f"e{rng.randrange(2, 12)}"
        chain = [rng.getrandbits(64) for _ in range(rng.randint(1, 60))]
        ix.store(w, chain, rng.choice([0, 0, 0, TIER_HOST]))
        cold_stored += chain
        assert len(ix) <= bound and ix.lower_blocks <= bound, step
        # the prefix matched after every store is never dropped
        assert ix.match(hot, ["e0", "e1", w]) == {"e0": 40, "e1": 25, w: 0}, step
        # a GPU block is counted once however many workers hold it
        assert sum(ix.blocks_of(f"e{i}") for i in range(12)) >= len(ix)
    evicted = ix.stats()["evicted_blocks"]
    assert evicted > 10 * bound
    # dropped blocks left every holder: no worker's count names a block the index lacks
    for i in range(12):
        held = ix.worker_hashes(f"e{i}")
        assert len(held) == ix.blocks_of(f"e{i}")
        for h in list(held)[:5]:
            assert ix.match([h], [f"e{i}"]) == {f"e{i}": 1}
    # removing and clearing dropped blocks later is harmless (the first
    # stores are long gone: removing them changes nothing)
    before = {f"e{i}": ix.tier_blocks(f"e{i}") for i in range(12)}
    for i in range(2, 12):
        ix.remove(f"e{i}", cold_stored[:1000])
        ix.remove(f"e{i}", cold_stored[:1000], TIER_HOST)
    assert before == {f"e{i}": ix.tier_blocks(f"e{i}") for i in range(12)}
    for i in range(12):
        ix.clear_worker(f"e{i}")
    assert len(ix) == 0 and ix.lower_blocks == 0
    assert ix.stats()["evicted_blocks"] == evicted


@pytest.mark.parametrize("impl", IMPLS)
def test_a_chain_past_the_bound_keeps_its_head(impl: str) -> None:
    """Blocks used by one operation: the first is the most recent, so a
    prompt stored past the bound keeps its leading blocks (a match needs
    them), down to the low-water mark (90% of the bound)."""
    ix = make(impl, 100)
    chain = list(range(1000, 1250))
    ix.store("e0", chain)
    assert len(ix) == 90 and ix.match(chain) == {"e0": 90}
    assert ix.stats()["evicted_blocks"] == 160
    ix.store("e0", chain[:120])  # stored again: used, and past the bound again
    assert len(ix) == 90 and ix.match(chain) == {"e0": 90}


@pytest.mark.parametrize("impl", IMPLS)
def test_no_bound_and_bad_bounds(impl: str) -> None:
    ix = make(impl, 0)
    ix.store("e0", list(range(5000)))
    assert len(ix) == 5000 and ix.stats()["evicted_blocks"] == 0 and ix.max_blocks == 0
    with pytest.raises(ValueError, match="max_blocks must be >= 0"):
        make(impl, -1)


def test_the_node_config_reaches_the_index() -> None:
    assert RouterConfig().max_index_blocks == 0  # default: no bound
    assert new_index(1234).max_blocks == 1234
    assert RouterNode(RouterConfig(max_index_blocks=777, insecure=True)).index.max_blocks == 777
    with pytest.raises(ValueError, match="max-index-blocks must be >= 0"):
        RouterConfig(max_index_blocks=-5, insecure=True)


# A child process: RSS of an index under an endless stream of distinct
# blocks, bounded (after a warm-up that fills it and cycles its tables)
# against unbounded, per block stored.
_CHILD = r"""
import gc, json, os, random, sys
from router.index import PrefixIndex
from router.native_index import NativeIndex
impl, bound, warm, n, n_unbounded = sys.argv[1], *map(int, sys.argv[2:])
make = PrefixIndex if impl == "python" else NativeIndex

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

bits = random.Random(1).getrandbits

def stream(ix, blocks):
    for i in range(blocks // 64):
        ix.store(f"e{i % 8}", [bits(64) for _ in range(64)])

ix = make(bound)
stream(ix, warm)
gc.collect()
r0 = rss()
stream(ix, n)
gc.collect()
r1 = rss()
assert len(ix) <= bound
del ix
free = make(0)
gc.collect()
u0 = rss()
stream(free, n_unbounded)
gc.collect()
u1 = rss()
print(json.dumps({"bounded": (r1 - r0) / n, "unbounded": (u1 - u0) / n_unbounded, "len": len(free)}))
"""


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_stays_flat_under_an_endless_store_stream(impl: str) -> None:
    bound, warm, n, n_unbounded = 50_000, 500_000, 2_048_000, 320_000
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, impl, str(bound), str(warm), str(n), str(n_unbounded)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    r = json.loads(out.stdout)
    assert r["len"] == n_unbounded  # the unbounded index kept every block...
    assert r["unbounded"] > 20  # ...and grew with them (bytes per block)
    # the bounded one, fed 6x as many blocks after its warm-up, did not grow
    assert r["bounded"] < 0.05 * r["unbounded"], r


def test_lower_tiers_count_against_their_own_bound() -> None:
    """Lower-tier blocks are bounded separately (per worker, tier and block)."""
    for ix in (PrefixIndex(30), *([NativeIndex(30)] if NATIVE_INDEX_BUILT else [])):
        for i in range(40):
            ix.store(f"e{i % 3}", [i * 10 + k for k in range(4)], TIERS[1 + i % 3])
            assert ix.lower_blocks <= 30
        assert len(ix) == 0
        newest = [390, 391, 392, 393]
        assert ix.worker_hashes("e0", TIERS[1]) >= set(newest)
