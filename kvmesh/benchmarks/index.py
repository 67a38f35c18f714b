"""Micro-benchmark of the prefix index (``kvmesh bench index``).

Builds a realistic population: a few hundred shared "system prompt" prefixes,
each extended by many conversations with their own blocks, each conversation
cached on one to three of ``n_workers`` workers (hashes form real chains: a
conversation repeats its root's hashes). Then measures store throughput, the
latency of matching ``prompt_blocks``-block prompts against every worker (hits
of every depth, including full hits), clearing one worker, and block hashing.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass

from blocks.hashing import block_hashes, root_seed
from kvmesh.stats import percentile
from router.index import PrefixIndex

__all__ = ["IndexBenchShape", "bench_index"]


@dataclass(frozen=True, slots=True)
class IndexBenchShape:
    """What ``kvmesh bench index`` measures by default (its flags start here)."""

    n_blocks: int = 1_000_000  # distinct blocks in the index
    n_workers: int = 64  # engines (workers) holding them
    prompt_blocks: int = 128  # blocks per matched prompt
    n_queries: int = 5_000  # match calls timed
    seed: int = 0


_DEFAULT = IndexBenchShape()


def bench_index(
    n_blocks: int = _DEFAULT.n_blocks,
    n_workers: int = _DEFAULT.n_workers,
    prompt_blocks: int = _DEFAULT.prompt_blocks,
    n_queries: int = _DEFAULT.n_queries,
    seed: int = _DEFAULT.seed,
) -> dict:
    """Run the benchmark; returns a flat dict of numbers (rates in /s, latencies in µs)."""
    if n_blocks < 1 or n_workers < 1 or prompt_blocks < 1 or n_queries < 1:
        raise ValueError("n_blocks, n_workers, prompt_blocks and n_queries must be >= 1")
    rng = random.Random(seed)
    rand64 = rng.getrandbits
    workers = [f"engine-{i}" if i % 4 else f"engine-{i // 4}#dp1" for i in range(n_workers)]
    workers = list(dict.fromkeys(workers))
    while len(workers) < n_workers:  # keep the count exact whatever the naming
        workers.append(f"engine-x{len(workers)}")

    # -- population (not timed) ----------------------------------------------
    n_roots = max(1, min(256, n_blocks // 1000))
    roots = [[rand64(64) for _ in range(rng.randint(8, 32))] for _ in range(n_roots)]
    convs: list[list[int]] = []
    stores: list[tuple[str, list[int]]] = []
    distinct = sum(len(r) for r in roots)
    while distinct < n_blocks:
        root = rng.choice(roots)
        own = rng.randint(prompt_blocks // 2, 2 * prompt_blocks)
        own = min(own, n_blocks - distinct) or 1
        chain = root + [rand64(64) for _ in range(own)]
        distinct += own
        convs.append(chain)
        for w in rng.sample(workers, min(len(workers), rng.randint(1, 3))):
            # Some workers hold only part of it (evicted tail / shorter turn).
            cut = len(chain) if rng.random() < 0.7 else rng.randint(1, len(chain))
            stores.append((w, chain[:cut]))
    rng.shuffle(stores)
    stored_blocks = sum(len(c) for _, c in stores)

    # -- store throughput ------------------------------------------------------
    idx = PrefixIndex()
    gc.collect()
    t0 = time.perf_counter()
    for w, chain in stores:
        idx.store(w, chain)
    store_s = time.perf_counter() - t0
    entries = len(idx)

    # -- match latency -----------------------------------------------------------
    queries: list[list[int]] = []
    for q in range(n_queries):
        chain = rng.choice(convs)
        # A quarter as long a hit as the population allows, the rest of random depth.
        hit = min(len(chain), prompt_blocks) if q % 4 == 0 else rng.randint(0, min(len(chain), prompt_blocks))
        qh = chain[:hit] + [rand64(64) for _ in range(prompt_blocks - hit)]
        queries.append(qh)
    lat: list[float] = []
    match = idx.match
    matched_blocks = 0
    # Keep the harness's own lists (population, queries) out of gc scans: in a
    # router the index is a handful of containers and gc passes stay cheap.
    gc.collect()
    gc.freeze()
    perf = time.perf_counter
    full: list[float] = []  # queries some worker holds entirely: the longest walks
    for qh in queries:
        t = perf()
        r = match(qh, workers)
        dt = perf() - t
        lat.append(dt)
        best = max(r.values())
        matched_blocks += best
        if best == prompt_blocks:
            full.append(dt)
    gc.unfreeze()

    # -- clearing one worker ---------------------------------------------------
    victim = max(workers, key=idx.blocks_of)
    victim_blocks = idx.blocks_of(victim)
    t0 = time.perf_counter()
    idx.clear_worker(victim)
    clear_s = time.perf_counter() - t0

    # -- hashing ---------------------------------------------------------------
    tokens = [rng.randrange(150_000) for _ in range(16 * 20_000)]
    s = root_seed("bench-model")
    t0 = time.perf_counter()
    n_hashed = len(block_hashes(tokens, 16, s))
    hash_s = time.perf_counter() - t0

    us = 1e6
    return {
        "n_workers": n_workers,
        "prompt_blocks": prompt_blocks,
        "entries": entries,
        "entries_after_clear": len(idx),
        "stored_blocks": stored_blocks,
        "store_blocks_per_s": stored_blocks / store_s,
        "n_queries": n_queries,
        "mean_best_overlap_blocks": matched_blocks / n_queries,
        "match_p50_us": percentile(lat, 50) * us,
        "match_p90_us": percentile(lat, 90) * us,
        "match_p99_us": percentile(lat, 99) * us,
        "match_max_us": max(lat) * us,
        "full_hit_queries": len(full),
        "match_full_hit_p50_us": percentile(full, 50) * us,
        "match_full_hit_p99_us": percentile(full, 99) * us,
        "clear_worker_blocks": victim_blocks,
        "clear_worker_ms": clear_s * 1e3,
        "hash_blocks_per_s": n_hashed / hash_s,
    }


if __name__ == "__main__":  # python -m kvmesh.benchmarks.index
    import json

    print(json.dumps(bench_index(), indent=2))
