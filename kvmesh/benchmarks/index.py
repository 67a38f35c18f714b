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

from blocks.hashing import block_hashes, root_seed
from router.index import PrefixIndex

__all__ = ["bench_index"]


def _pct(sorted_vals: list[float], q: float) -> float:
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def bench_index(
    n_blocks: int = 1_000_000,
    n_workers: int = 64,
    prompt_blocks: int = 128,
    n_queries: int = 5_000,
    seed: int = 0,
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
        if q % 4 == 0:
            hit = min(len(chain), prompt_blocks)  # as long a hit as the population allows
        else:
            hit = rng.randint(0, min(len(chain), prompt_blocks))
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
    lat.sort()
    full.sort()

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
        "match_p50_us": _pct(lat, 0.50) * us,
        "match_p90_us": _pct(lat, 0.90) * us,
        "match_p99_us": _pct(lat, 0.99) * us,
        "match_max_us": lat[-1] * us,
        "full_hit_queries": len(full),
        "match_full_hit_p50_us": _pct(full, 0.50) * us if full else 0.0,
        "match_full_hit_p99_us": _pct(full, 0.99) * us if full else 0.0,
        "clear_worker_blocks": victim_blocks,
        "clear_worker_ms": clear_s * 1e3,
        "hash_blocks_per_s": n_hashed / hash_s,
    }


if __name__ == "__main__":  # python -m kvmesh.benchmarks.index
    import json

    print(json.dumps(bench_index(), indent=2))
