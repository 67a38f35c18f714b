"""The prefix index, native vs pure Python, on the same blocks: store
throughput, 128-block match latency, memory per indexed block.

    .venv/bin/python native/bench_index.py [--blocks 1000000] [--engines 1000]
        [--memory-blocks 1000000,10000000] [--python-memory-max 1000000]

The population is ``kvmesh bench index``'s shape: a few hundred shared
"system prompt" prefixes, each extended by conversations of their own
blocks, each conversation stored on one to three engines (some only a
leading part of it), until ``--blocks`` distinct blocks are stored. Store:
every store call into a fresh index, the best of three runs as stored
blocks per second of this process's CPU time (the machines it runs on are
shared); again into an index bounded to half the distinct blocks (evicting
all along). Match: ``match(prompt, engines)`` of
128-block prompts against every engine (a quarter of them hit as deep as
the population allows, the rest at a random depth), the answers of the two
checked equal. Memory (at each of ``--memory-blocks``; the Python index
only up to ``--python-memory-max``): ``kvmesh.benchmarks.index_memory``,
which ``kvmesh bench micro`` runs too, in a fresh process per
implementation and size: the growth of resident memory while the index is
built, divided by the distinct blocks indexed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmesh.benchmarks.index_memory import measure_in_child
from router import native_index
from router.index import PrefixIndex

PROMPT_BLOCKS = 128
IMPLS: dict[str, Callable[[], Any]] = {"python": PrefixIndex}
if native_index.NativeIndex is not None:
    IMPLS["native"] = native_index.NativeIndex


def population(
    n_blocks: int, n_engines: int, seed: int
) -> tuple[list[str], list[tuple[int, array]], list[array]]:
    """Engines, stores (engine index, hashes) and conversations (for queries)."""
    rng = random.Random(seed)
    rand64 = rng.getrandbits
    engines = [f"engine-{i}" for i in range(n_engines)]
    n_roots = max(1, min(256, n_blocks // 1000))
    roots = [[rand64(64) for _ in range(rng.randint(8, 32))] for _ in range(n_roots)]
    convs: list[array] = []
    stores: list[tuple[int, array]] = []
    # Distinct blocks stored so far, counted without a set of them (its
    # memory, freed, would be reused by the index and hide its growth): a
    # conversation's own blocks are random 64-bit values, distinct from all.
    root_covered = [0] * n_roots
    distinct = 0
    while distinct < n_blocks:
        r = rng.randrange(n_roots)
        own = rng.randint(PROMPT_BLOCKS // 2, 2 * PROMPT_BLOCKS)
        chain = array("Q", roots[r] + [rand64(64) for _ in range(own)])
        convs.append(chain)
        deepest = 0
        for e in rng.sample(range(n_engines), min(n_engines, rng.randint(1, 3))):
            cut = len(chain) if rng.random() < 0.7 else rng.randint(1, len(chain))
            stores.append((e, chain[:cut]))
            deepest = max(deepest, cut)
        covered = min(deepest, len(roots[r]))
        distinct += max(0, covered - root_covered[r]) + max(0, deepest - len(roots[r]))
        root_covered[r] = max(root_covered[r], covered)
    rng.shuffle(stores)
    return engines, stores, convs


def store_rate(
    make: Callable[[], Any], engines: list[str], stores: list[tuple[str, list[int]]]
) -> tuple[float, Any]:
    """Stored blocks per CPU second, best of three fresh indexes; the last index."""
    n = sum(len(hs) for _, hs in stores)
    best = 0.0
    idx = None
    for _ in range(3):
        idx = make()
        for w in engines:
            idx.add_worker(w)
        gc.collect()
        t0 = time.process_time()
        for w, hs in stores:
            idx.store(w, hs)
        best = max(best, n / (time.process_time() - t0))
    return best, idx


def match_latencies(
    idx: Any, queries: list[list[int]], engines: list[str]
) -> tuple[list[float], list[dict[str, int]]]:
    match = idx.match
    perf = time.perf_counter
    lat: list[float] = []
    answers: list[dict[str, int]] = []
    gc.collect()
    gc.freeze()
    for q in queries:
        t = perf()
        r = match(q, engines)
        lat.append(perf() - t)
        answers.append(r)
    gc.unfreeze()
    return lat, answers


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--blocks", type=int, default=1_000_000)
    p.add_argument("--engines", type=int, default=1000)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-blocks", default="1000000,10000000", help="sizes of the memory figures")
    p.add_argument("--python-memory-max", type=int, default=1_000_000, help="largest Python memory figure")
    a = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if "native" not in IMPLS:
        sys.exit("the native module is not built (make native)")

    engines, raw, convs = population(a.blocks, a.engines, a.seed)
    stores = [(engines[e], hs.tolist()) for e, hs in raw]
    rng = random.Random(a.seed + 1)
    queries: list[list[int]] = []
    for i in range(a.queries):
        chain = rng.choice(convs).tolist()
        cap = min(len(chain), PROMPT_BLOCKS)
        hit = cap if i % 4 == 0 else rng.randint(0, cap)
        queries.append(chain[:hit] + [rng.getrandbits(64) for _ in range(PROMPT_BLOCKS - hit)])

    res: dict[str, dict[str, float]] = {}
    answers: dict[str, list[dict[str, int]]] = {}
    bound = max(1, a.blocks // 2)
    for impl, make in IMPLS.items():
        res.setdefault(impl, {})["store_bounded"], _ = store_rate(lambda m=make: m(bound), engines, stores)
        rate, idx = store_rate(make, engines, stores)
        lat, answers[impl] = match_latencies(idx, queries, engines)
        res[impl].update(store=rate, p50=pct(lat, 50) * 1e6, p99=pct(lat, 99) * 1e6, blocks=len(idx))
        del idx
        gc.collect()
    assert answers["python"] == answers["native"], "the implementations disagree"
    mem: dict[tuple[str, int], dict[str, float]] = {}
    for size in (int(x) for x in a.memory_blocks.split(",") if x):
        for impl in IMPLS:
            if impl == "native" or size <= a.python_memory_max:
                m = measure_in_child(impl, size, a.engines, a.seed, timeout_s=3600)
                if "skipped" in m:
                    sys.exit(f"memory of {impl} at {size:,} blocks: {m['skipped']}")
                mem[impl, size] = m

    py, nat = res["python"], res["native"]
    print(f"{int(py['blocks']):,} distinct blocks over {a.engines:,} engines, {a.queries:,} matches of "
          f"{PROMPT_BLOCKS} blocks against every engine; answers equal")  # fmt: skip
    print("| | Python (`PrefixIndex`) | native (`NativeIndex`) |")
    print("| --- | --- | --- |")
    x = nat["store"] / py["store"]
    print(f"| store | {py['store']:,.0f} blocks/s | {nat['store']:,.0f} blocks/s ({x:.1f}x) |")
    x = nat["store_bounded"] / py["store_bounded"]
    print(f"| store, bound of half the blocks (--max-index-blocks) | {py['store_bounded']:,.0f} blocks/s | "
          f"{nat['store_bounded']:,.0f} blocks/s ({x:.1f}x) |")  # fmt: skip
    for k in ("p50", "p99"):
        print(f"| match {k} | {py[k]:.1f} µs | {nat[k]:.1f} µs ({nat[k] / py[k]:.2f}x) |")
    for (impl, _), m in sorted(mem.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        per_block, per_pair = m["bytes_per_block"], m["bytes_per_pair"]
        print(f"memory, {impl}, {int(m['blocks']):,} distinct blocks ({int(m['pairs']):,} engine-block "
              f"pairs): {per_block:.1f} B per block, {per_pair:.1f} B per pair")  # fmt: skip


if __name__ == "__main__":
    main()
