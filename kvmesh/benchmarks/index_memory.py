"""Memory per indexed block: the native index, the pure-Python one and
Dynamo's RadixTree, each built in a fresh process so its resident-memory
growth is the index's alone.

The population is the micro benchmark's shape (``micro.build_population``),
made as it is stored so no list of it is held: a few hundred shared roots,
conversations of their own blocks extending one, each cached on one or two
engines, stored in batches of at most 128 chained blocks. kvmesh's indexes
get ``store(worker, router_hashes)`` (the hashes made as Python ints at each
call, as a router receives them); Dynamo's tree gets the same blocks as JSON
``stored`` events through ``apply_event``, its queue drained every
``DYNAMO_SYNC_EVERY`` events so queued events are not counted as the tree.

    python -m kvmesh.benchmarks.index_memory --impl native --blocks 1000000 --engines 1000

prints one JSON object; :func:`memory_table` runs it per implementation and
size, each under a time limit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import xxhash

__all__ = ["IMPLS", "bench_memory", "memory_table", "population_batches"]

IMPLS = ("native", "python", "dynamo")
MAX_BATCH = 128  # blocks per stored event (one chunked prefill step)
DYNAMO_SYNC_EVERY = 1000  # events queued to the tree's thread before waiting for it
_SENTINEL = 0xFFFF_FFFF_FFFF_0001
# Seconds one size of one implementation may take: the pure-Python index is
# measured as far as it gets in about two minutes (the shared machines these
# runs share); the others are given long enough for 10M blocks.
TIMEOUT_S = {"native": 900.0, "python": 150.0, "dynamo": 900.0}


def _h(b: int, seed: int) -> int:
    return xxhash.xxh3_64_intdigest(b.to_bytes(8, "little"), seed)


def population_batches(
    n_blocks: int, n_engines: int, seed: int, counts: dict[str, int] | None = None
) -> Iterator[tuple[int, int | None, list[int]]]:
    """(engine, parent block or None, block ids) batches until ``n_blocks``
    distinct blocks are stored; the shape of ``micro.build_population``.
    ``counts["distinct"]`` is kept up to date."""
    counts = {} if counts is None else counts
    rng = random.Random(seed)
    n_roots = max(1, min(256, n_blocks // 4000))
    roots: list[list[int]] = []
    next_b = 0
    for _ in range(n_roots):
        k = rng.randint(8, 32)
        roots.append(list(range(next_b, next_b + k)))
        next_b += k
    used = [False] * n_roots
    distinct = 0
    has_root: set[tuple[int, int]] = set()
    while distinct < n_blocks:
        ri = rng.randrange(n_roots)
        own = rng.randint(64, 256)
        root = roots[ri]
        if not used[ri]:
            used[ri] = True
            distinct += len(root)
        distinct += own
        counts["distinct"] = distinct
        first_own = next_b
        next_b += own
        for e in rng.sample(range(n_engines), 1 if rng.random() < 0.7 else 2):
            start = 0 if (e, ri) not in has_root else len(root)
            has_root.add((e, ri))
            chain_len = len(root) + own
            i = start
            while i < chain_len:
                j = min(chain_len, i + MAX_BATCH)
                ids = [root[x] if x < len(root) else first_own + x - len(root) for x in range(i, j)]
                parent = (
                    None if i == 0 else (root[i - 1] if i - 1 < len(root) else first_own + i - 1 - len(root))
                )
                yield e, parent, ids
                i = j


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _ours(impl: str, n_blocks: int, n_engines: int, seed: int) -> dict[str, float]:
    from router.native_index import index_of

    workers = [f"e{i}" for i in range(n_engines)]
    gc.collect()
    idx = index_of(impl)
    for w in workers:
        idx.add_worker(w)
    before = rss_bytes()
    pairs = 0
    for e, _parent, ids in population_batches(n_blocks, n_engines, seed):
        idx.store(workers[e], [_h(b, 1) for b in ids])
        pairs += len(ids)
    gc.collect()
    grown = rss_bytes() - before
    return {
        "blocks": len(idx),
        "pairs": pairs,
        "bytes_per_block": grown / len(idx),
        "bytes_per_pair": grown / pairs,
    }


def _dynamo_event(
    event_id: int, parent: int | None, ids: list[int], raw: list[tuple[int, int]] | None = None
) -> bytes:
    """Dynamo's JSON ``stored`` event of blocks ``ids`` (or of ``raw`` (block, tokens) hash pairs)."""
    pairs = raw if raw is not None else [(_h(b, 1), _h(b, 2)) for b in ids]
    blocks = [{"block_hash": bh, "tokens_hash": th} for bh, th in pairs]
    ev = {"event_id": event_id, "data": {"stored": {"parent_hash": None if parent is None else _h(parent, 1),
                                                    "blocks": blocks}}, "dp_rank": 0}  # fmt: skip
    return json.dumps(ev).encode()


def _dynamo(n_blocks: int, n_engines: int, seed: int) -> dict[str, float]:
    from dynamo.llm import RadixTree

    def sync(tree: Any, k: int) -> None:
        # apply_event only queues to the tree's thread: wait until it applied a marker sent last.
        marker = _SENTINEL + k
        tree.apply_event(n_engines, _dynamo_event(k, None, [], [(marker, marker)]))
        deadline = time.monotonic() + 120
        while not tree.find_matches([marker]).scores and time.monotonic() < deadline:
            time.sleep(0.0005)

    gc.collect()
    tree = RadixTree()
    before = rss_bytes()
    pairs = 0
    syncs = 0
    counts: dict[str, int] = {}
    for n, (e, parent, ids) in enumerate(population_batches(n_blocks, n_engines, seed, counts)):
        tree.apply_event(e, _dynamo_event(n, parent, ids))
        pairs += len(ids)
        if n % DYNAMO_SYNC_EVERY == DYNAMO_SYNC_EVERY - 1:
            syncs += 1
            sync(tree, syncs)
    sync(tree, syncs + 1)
    gc.collect()
    grown = rss_bytes() - before
    blocks = counts["distinct"]  # the markers are a few blocks more, not counted
    return {
        "blocks": blocks,
        "pairs": pairs,
        "bytes_per_block": grown / blocks,
        "bytes_per_pair": grown / pairs,
    }


def bench_memory(impl: str, n_blocks: int, n_engines: int, seed: int = 0) -> dict[str, float]:
    """RSS growth per distinct block and per engine-block pair of one index
    built in THIS process (call it in a fresh one: see :func:`memory_table`)."""
    if impl == "dynamo":
        return _dynamo(n_blocks, n_engines, seed)
    return _ours(impl, n_blocks, n_engines, seed)


def measure_in_child(impl: str, n_blocks: int, n_engines: int, seed: int, timeout_s: float) -> dict[str, Any]:
    """:func:`bench_memory` in a fresh interpreter; ``{"skipped": why}`` when it
    fails or takes longer than ``timeout_s``."""
    cmd = [sys.executable, "-m", "kvmesh.benchmarks.index_memory", "--impl", impl, "--blocks", str(n_blocks),
           "--engines", str(n_engines), "--seed", str(seed)]  # fmt: skip
    t0 = time.monotonic()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"not measured: over the {timeout_s:.0f} s limit"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"failed: {last}"}
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.monotonic() - t0
    return res


def memory_table(
    sizes: list[int],
    n_engines: int,
    impls: dict[str, str | None],
    seed: int = 0,
    timeout_s: dict[str, float] | None = None,
    note: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Memory per indexed block for each implementation at each size; ``impls``
    maps an implementation to why it cannot run here (None: it can);
    ``timeout_s`` an implementation to its limit per size (default
    :data:`TIMEOUT_S`). A size past the limit is not measured, nor larger ones."""
    limits = {**TIMEOUT_S, **(timeout_s or {})}
    rows: dict[str, dict[str, Any]] = {}
    for impl, why in impls.items():
        rows[impl] = {}
        for n in sizes:
            if why:
                rows[impl][str(n)] = {"skipped": why}
                continue
            note(f"memory: {impl} at {n:,} blocks over {n_engines:,} engines (fresh process)")
            r = measure_in_child(impl, n, n_engines, seed, limits[impl])
            rows[impl][str(n)] = r
            if "skipped" in r:
                note(f"memory: {impl} at {n:,}: {r['skipped']}")
                why = f"not measured: the {n:,}-block run did not finish"  # larger sizes would not either
            else:
                note(f"memory: {impl} at {n:,}: {r['bytes_per_block']:.0f} B per block")
    return {"sizes": sizes, "n_engines": n_engines, "timeout_s": limits, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--impl", choices=IMPLS, required=True)
    p.add_argument("--blocks", type=int, default=1_000_000)
    p.add_argument("--engines", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(bench_memory(a.impl, a.blocks, a.engines, a.seed)))


if __name__ == "__main__":
    main()
