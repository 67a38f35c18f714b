"""Microbenchmarks of the routing core, kvmesh's native hot path and its
pure-Python fallback side by side with NVIDIA Dynamo's Rust RadixTree
(``ai-dynamo-runtime``, ``from dynamo.llm import RadixTree``), in one run.

Owner ingest, END TO END on our side: vLLM-format ``KVEventBatch`` frames
(msgpack, as the engines publish them) are decoded and mapped to router
hashes, appended to the replicated state as the engine's owner
(``mesh.state.MeshState.local_deltas``: the pycrdt log that is gossiped) and
applied to the index. The frames go in the order a saturated owner node
takes them (:func:`drain_order`: each engine's queue drained in bursts,
engines in turn), each burst one log entry of up to
``MeshConfig.max_entry_blocks`` blocks as ``RouterNode._owner_delta``
writes it; beside it, the same frames with one entry per frame (a node
that is not saturated). Both implementations are constructed explicitly (the
``KVMESH_PURE_PYTHON`` switch plays no part), as a router node runs them:
native is ``engine_adapters.native.NativeBlockMapper.map_frame_packed``
(decode + hash + map into the log entry's bytes and a ``PackedEntry`` in
one call), the owner in packed mode (``kvmesh_native.LiveMaps``) and
``router.native_index.NativeIndex.apply_packed``; pure Python is
``engine_adapters.kv_events.decode_batch``, ``BlockMapper.map_batch``, the
owner's reference live maps and ``router.index.PrefixIndex``. Dynamo's
side is timed on ``RadixTree.apply_event(worker_id, json_bytes)`` alone,
with its JSON ``KvCacheEvent``s (``{"event_id", "data": {"stored":
{"parent_hash", "blocks": [{"block_hash", "tokens_hash"}]}}, "dp_rank"}``,
lib/llm/src/kv_router/protocols.rs) serialised beforehand: the work a Dynamo
router does per event it receives. Both ingest the same blocks, in the same
batches, in the same order (:func:`drain_order`'s), each from empty
``INGEST_RUNS`` times (the median is reported, every run kept), the
garbage collector's view of the benchmark's own data frozen. Each of
Dynamo's runs follows one of ours (the default implementation's) at once,
and the ingest ratio is the median of those pairs' ratios: the machine is
shared, and a busy moment then slows both runs of a pair alike;
``apply_event`` only queues to the tree's worker thread, so Dynamo's clock
stops when a sentinel event sent last is visible to ``find_matches``.

Non-owner apply: what every other node does with the owners' replicated
entries (:func:`kvmesh.benchmarks.nonowner.bench_non_owner`: the entries
decoded and applied, and end to end through ``MeshState.apply_remote``).
Prefix match: a 128-block prompt against
every engine, ours on router hashes (``match`` of each index), Dynamo's on
its local block hashes (``RadixTree.find_matches``); the same prompts, hits
of every depth, timed side by side (:func:`match_side_by_side`: blocks of
``MATCH_BLOCK`` prompts asked of every index in turn, back to back within a
block, the first index rotating from block to block), so that a busy moment
of the shared machine falls on every index's tail alike while each index is
asked as a router asks it, one query after another. Memory per indexed
block: :mod:`kvmesh.benchmarks.index_memory`.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
import xxhash

from blocks.hashing import DEFAULT_BLOCK_SIZE, block_hashes, root_seed
from engine_adapters import native
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.kv_events import BlockStored, KVEventBatch, decode_batch, encode_batch
from engine_adapters.sim_engine.config import DEFAULTS as SIM_DEFAULTS
from kvmesh.benchmarks.nonowner import BUSY_ENGINE_EVENTS, bench_non_owner
from kvmesh.stats import percentile
from mesh.core import MeshConfig
from mesh.engine_log.packed import as_one_entry
from mesh.state import MeshState
from router.index import PrefixIndex
from router.native_index import NativeIndex, index_of

MODEL = SIM_DEFAULTS.model  # seeds the router hashes; any name would do in process
BS = DEFAULT_BLOCK_SIZE  # tokens per block
AGREEMENT_QUERIES = 200  # queries whose best overlap is compared with Dynamo's
IMPLS = ("native", "python")  # kvmesh's two implementations, the native one first
# Each ingest runs this many times from empty and reports its median (the
# machine is shared: one run can land on a busy moment, for either side).
INGEST_RUNS = 5
# A busy engine's block events per second (stores plus evictions): how many
# engines one node keeps up with is its non-owner apply rate over this.
NONOWNER_ENGINES = 1000  # engines of the non-owner stream
# The owner ingest's stages, timed in each run (``stage_seconds``): the
# engine's frames decoded, hashed and mapped to router hashes; the burst's
# log entry appended with the owner's live maps; the index's update.
INGEST_STAGES = ("map", "log", "index")
# Prompts asked of one index back to back before the next index's turn: few
# enough that every index's turns spread over the whole run, enough that
# Dynamo's tree keeps its worker thread awake as under a stream of requests
# (asked one prompt at a time between other work, each query would wake it).
MATCH_BLOCK = 100


def _block_tokens(b: int) -> list[int]:
    """Unique content per block id (cheap to make, distinct hashes)."""
    base = 256 + (b * BS) % (2**31)
    return list(range(base, base + BS))


def _ehash(engine: int, b: int) -> int:
    """The engine's (opaque, unsigned 64-bit) hash of block b. Equal on every
    engine, as with vLLM's sha256 block hashing: Dynamo's RadixTree expects
    that (with per-engine hashes it rejects a store chained to a block that
    another worker also holds). kvmesh maps either kind."""
    return xxhash.xxh3_64_intdigest(b.to_bytes(8, "little"), 1)


def build_population(n_blocks: int, n_engines: int, seed: int = 0, max_batch: int = 128):
    """Conversations (shared roots + own blocks) cached on 1-2 engines each,
    as per-engine event batches of at most ``max_batch`` blocks (one chunked
    prefill step). Returns (batches [(engine, parent_block or None,
    [block ids])], conversations [[block ids]])."""
    rng = random.Random(seed)
    n_roots = max(1, min(256, n_blocks // 4000))
    next_b = 0
    roots = []
    for _ in range(n_roots):
        k = rng.randint(8, 32)
        roots.append(list(range(next_b, next_b + k)))
        next_b += k
    convs: list[list[int]] = []
    batches: list[tuple[int, int | None, list[int]]] = []
    has_root: set[tuple[int, int]] = set()
    stored = 0
    while stored < n_blocks:
        ri = rng.randrange(n_roots)
        own = rng.randint(64, 256)
        chain = roots[ri] + list(range(next_b, next_b + own))
        next_b += own
        convs.append(chain)
        for e in rng.sample(range(n_engines), 1 if rng.random() < 0.7 else 2):
            start = 0 if (e, ri) not in has_root else len(roots[ri])
            has_root.add((e, ri))
            i = start
            while i < len(chain):
                seg = chain[i : i + max_batch]
                batches.append((e, chain[i - 1] if i else None, seg))
                stored += len(seg)
                i += len(seg)
    # Interleave engines as a live fleet would, keeping each engine's order.
    per: dict[int, list] = {}
    for b in batches:
        per.setdefault(b[0], []).append(b)
    out = []
    queues = [list(reversed(v)) for v in per.values()]
    while queues:
        q = queues[rng.randrange(len(queues))]
        out.append(q.pop())
        if not q:
            queues.remove(q)
    return out, convs


def _vllm_frames(batches) -> list[tuple[int, bytes]]:
    frames = []
    for e, parent, seg in batches:
        ev = BlockStored(
            block_hashes=[_ehash(e, b) for b in seg],
            parent_block_hash=None if parent is None else _ehash(e, parent),
            token_ids=[t for b in seg for t in _block_tokens(b)],
            block_size=BS,
            lora_id=None,
        )
        frames.append((e, encode_batch(KVEventBatch(ts=0.0, events=[ev], data_parallel_rank=0), "map")))
    return frames


def _local_hash(b: int) -> int:
    """Dynamo's tokens_hash of a block (its content, unchained)."""
    return xxhash.xxh3_64_intdigest(b"".join(t.to_bytes(4, "little") for t in _block_tokens(b)))


def _dynamo_events(batches) -> list[tuple[int, bytes]]:
    out = []
    for i, (e, parent, seg) in enumerate(batches):
        ev = {
            "event_id": i,
            "data": {
                "stored": {
                    "parent_hash": None if parent is None else _ehash(e, parent),
                    "blocks": [{"block_hash": _ehash(e, b), "tokens_hash": _local_hash(b)} for b in seg],
                }
            },
            "dp_rank": 0,
        }
        out.append((e, json.dumps(ev).encode()))
    return out


def _quiet() -> None:
    """Per-engine ownership logs would drown the progress output."""
    import logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def dynamo_available() -> str | None:
    """None if Dynamo's RadixTree is importable, else why not."""
    try:
        from dynamo.llm import RadixTree  # noqa: F401  # imported only to see whether it is installed
    except ImportError as e:
        return f"ai-dynamo-runtime not installed ({e}); pip install -e '.[peers]'"
    return None


def native_missing() -> str | None:
    """None if the native module is built, else why not."""
    if not native.NATIVE_BUILT or NativeIndex is None:
        return native.NOT_BUILT_REASON
    return None


def _owner_state(workers: list[str], seed: int, packed: bool) -> MeshState:
    state = MeshState("bench-node", 0.0, random.Random(seed), hint_ttl=MeshConfig().hint_ttl, packed=packed)
    for w in workers:
        state.register_engine(w, {"endpoint": f"http://127.0.0.1:1/{w}", "model": MODEL, "block_size": BS})
        state.take_ownership(w, 0.0)
    return state


def drain_order(batches: list[tuple[int, int | None, list[int]]], max_entry_blocks: int) -> list[list[int]]:
    """The batches as a saturated owner node takes them: each engine's
    queue drained in bursts, engines in turn, a burst ending once it holds
    ``max_entry_blocks`` blocks (``MeshConfig.max_entry_blocks``, where
    ``RouterNode._owner_delta`` ends an entry). Bursts of batch indices; each
    engine's batches keep their order."""
    queues: dict[int, list[int]] = {}
    for i, (e, _, _) in enumerate(batches):
        queues.setdefault(e, []).append(i)
    pos = dict.fromkeys(queues, 0)
    bursts: list[list[int]] = []
    while pos:
        for e in list(pos):
            q, i, n = queues[e], pos[e], 0
            burst = []
            while i < len(q) and n < max_entry_blocks:
                burst.append(q[i])
                n += len(batches[q[i]][2])
                i += 1
            bursts.append(burst)
            if i == len(q):
                del pos[e]
            else:
                pos[e] = i
    return bursts


def _ingest_ours(
    impl: str,
    frames: list[tuple[int, bytes]],
    bursts: list[list[int]],
    workers: list[str],
    stored_blocks: int,
    seed: int,
    entry_per_frame: bool = False,
) -> tuple[dict[str, Any], Any]:
    """Every frame end to end (decode, map, replicated log, index) on the
    ``impl`` path, in ``bursts`` (frame ``i`` has seq ``i``), each burst one
    log entry as a node writes it, or one entry per frame: (figures, index)."""
    _quiet()
    state = _owner_state(workers, seed, packed=impl == "native")
    index = index_of(impl)
    for w in workers:
        index.add_worker(w)
    sent = [0, 0]  # what the owner gossips: entries, update bytes (reported)

    def local_deltas(worker: str, changes: Sequence[Any]) -> None:
        out = state.local_deltas(worker, changes)
        sent[0] += 1
        sent[1] += sum(len(lu.update) for lu in out.logs)

    # One frame mapped by the engine's mapper: the native owner's packed
    # entry, or the reference's KvDelta; the index applies what it gets.
    apply: Callable[[Any], None]
    if impl == "native":
        nmappers = [native.NativeBlockMapper(MODEL, w) for w in workers]
        apply = index.apply_packed

        def map_frame(e: int, i: int) -> Any:
            return nmappers[e].map_frame_packed(frames[i][1], i)[1]

    else:
        mappers = [BlockMapper(MODEL, w) for w in workers]
        apply = index.apply

        def map_frame(e: int, i: int) -> Any:
            return mappers[e].map_batch(decode_batch(frames[i][1]).events, i)

    # The benchmark's own data (frames, batches) is no router's heap: frozen,
    # so the collector's full passes do not walk it (as for the matches).
    gc.collect()
    gc.freeze()
    perf = time.perf_counter
    # Seconds in each stage, read per burst rather than per frame so that
    # the clock's own cost stays out of the figures: what the report says
    # limits the ingest.
    stages = dict.fromkeys(INGEST_STAGES, 0.0)
    t0 = perf()
    for burst in bursts:
        e = frames[burst[0]][0]
        a = perf()
        changes = [map_frame(e, i) for i in burst]
        b = perf()
        if entry_per_frame:
            for ch in changes:
                local_deltas(workers[e], [ch])
                apply(ch)
            stages["map"] += b - a
            continue
        one: Sequence[Any] = as_one_entry(changes)  # as MeshCore.engine_deltas: log and index
        local_deltas(workers[e], one)
        c = perf()
        for ch in one:
            apply(ch)
        stages["map"] += b - a
        stages["log"] += c - b
        stages["index"] += perf() - c
    ours_s = perf() - t0
    gc.unfreeze()
    ours: dict[str, Any] = {
        "blocks_per_s": stored_blocks / ours_s,
        "seconds": ours_s,
        "stage_seconds": stages,
        "entries": len(index),
        "log_entries": sent[0],
        "crdt_update_bytes": sent[1],
    }
    return ours, index


def _queries(convs: list[list[int]], prompt_blocks: int, n_queries: int, seed: int) -> list[list[int]]:
    """Prompts as block ids: a quarter full hits, the rest hits of random depth."""
    rng = random.Random(seed + 1)
    queries: list[list[int]] = []
    fresh = 10**9
    for q in range(n_queries):
        chain = rng.choice(convs)
        hit = min(len(chain), prompt_blocks) if q % 4 == 0 else rng.randint(0, min(len(chain), prompt_blocks))
        ids = chain[:hit]
        while len(ids) < prompt_blocks:
            ids.append(fresh)
            fresh += 1
        queries.append(ids)
    return queries


def match_side_by_side(
    asks: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]], block: int = MATCH_BLOCK
) -> dict[str, list[float]]:
    """Seconds per query of each matcher, ``{name: (ask, queries)}``, all
    with as many queries, the garbage collector's view frozen.

    The queries go in blocks of ``block``: each matcher in turn is asked a
    block's queries back to back before the next matcher's turn, and the
    matcher going first rotates from block to block. A busy moment of the
    shared machine then lands on every matcher's tail alike, none is always
    first (cold caches) or last, and each is timed as a router calls it, one
    query right after another."""
    names = list(asks)
    n = len(asks[names[0]][1])
    if any(len(q) != n for _, q in asks.values()):
        raise ValueError("every matcher needs as many queries")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    lat: dict[str, list[float]] = {name: [] for name in names}
    perf = time.perf_counter
    gc.collect()
    gc.freeze()
    try:
        for turn, first in enumerate(range(0, n, block)):
            for k in range(len(names)):
                name = names[(turn + k) % len(names)]
                ask, queries = asks[name]
                out = lat[name]
                for q in queries[first : first + block]:
                    t = perf()
                    ask(q)
                    out.append(perf() - t)
    finally:
        gc.unfreeze()
    return lat


def _sentinel_event(event_id: int, block: int) -> bytes:
    return json.dumps(
        {
            "event_id": event_id,
            "dp_rank": 0,
            "data": {
                "stored": {"parent_hash": None, "blocks": [{"block_hash": block, "tokens_hash": block}]}
            },
        }
    ).encode()


def _ingest_dynamo(tree: Any, events: list[tuple[int, bytes]], stored_blocks: int, n_engines: int) -> dict:
    gc.collect()
    gc.freeze()  # as for ours
    t0 = time.perf_counter()
    apply = tree.apply_event
    for e, raw in events:
        apply(e, raw)
    # apply_event only queues to the tree's worker thread: the clock stops when
    # a sentinel event, applied after all the others, is visible.
    sentinel = 0xFFFF_FFFF_FFFF_0001
    apply(n_engines, _sentinel_event(len(events), sentinel))
    deadline = time.perf_counter() + 120
    while not tree.find_matches([sentinel]).scores and time.perf_counter() < deadline:
        time.sleep(0.0005)
    dyn_s = time.perf_counter() - t0
    gc.unfreeze()
    return {"blocks_per_s": stored_blocks / dyn_s, "seconds": dyn_s}


def _new_tree() -> Any:
    from dynamo.llm import RadixTree

    return RadixTree()


def _time_matches(
    indexes: dict[str, Any],
    tree: Any,
    q_router: list[list[int]],
    q_local: list[list[int]],
    workers: list[str],
) -> dict[str, list[float]]:
    """Each index's (and Dynamo's ``tree``'s, if any) match latencies, timed side by side."""
    asks: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]] = {
        impl: (_asker(ix.match, workers), q_router) for impl, ix in indexes.items()
    }
    if tree is not None:
        asks["dynamo"] = (tree.find_matches, q_local)
    return match_side_by_side(asks)


def _asker(match: Callable[[Any, list[str]], Any], workers: list[str]) -> Callable[[Any], Any]:
    """``match`` with the workers bound, called positionally as the policies call it."""
    return lambda hs: match(hs, workers)


def _stage_share(stage_runs: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's share of the time the stages took, over all runs."""
    total = {k: sum(r[k] for r in stage_runs) for k in INGEST_STAGES}
    whole = sum(total.values())
    return {k: v / whole if whole else 0.0 for k, v in total.items()}


def _match_figures(lat: list[float]) -> dict[str, float]:
    return {"match_p50_us": percentile(lat, 50) * 1e6, "match_p99_us": percentile(lat, 99) * 1e6}


def _dynamo_figures(runs: list[float], match_lat: list[float]) -> dict[str, Any]:
    """Dynamo's figures: its ingest ``runs`` (blocks/s, each right after one
    of ours) and its matches' latencies (timed beside ours)."""
    return {"blocks_per_s": statistics.median(runs), "runs_blocks_per_s": runs, **_match_figures(match_lat)}


def _match_answers(index: Any, q_router: list[list[int]], workers: list[str]) -> list[dict[str, int]]:
    return [index.match(hs, workers) for hs in q_router]


def bench_ingest_and_match(
    n_blocks: int = 1_000_000,
    n_engines: int = 64,
    prompt_blocks: int = 128,
    n_queries: int = 3000,
    seed: int = 0,
    note: Callable[[str], None] = print,
    nonowner_blocks: int = 1_000_000,
) -> dict:
    """Owner ingest, non-owner apply and match of both implementations and
    Dynamo's tree, on the same blocks and prompts. ``res[impl]`` per
    implementation (``{"skipped": why}`` for native when it is not built);
    ``res["kvmesh"]`` is the implementation a node runs by default (native
    when built), which the ratios to Dynamo are of (``*_python``: the fallback's)."""
    batches, convs = build_population(n_blocks, n_engines, seed)
    stored_blocks = sum(len(s) for _, _, s in batches)
    note(
        f"index: {stored_blocks:,} blocks in {len(batches):,} batches over {n_engines} engines; "
        "encoding frames"
    )
    frames = _vllm_frames(batches)
    bursts = drain_order(batches, MeshConfig().max_entry_blocks)
    order = [i for b in bursts for i in b]
    workers = [f"e{i}" for i in range(n_engines)]
    queries = _queries(convs, prompt_blocks, n_queries, seed)
    root = root_seed(MODEL)
    q_router = [block_hashes([t for b in ids for t in _block_tokens(b)], BS, root) for ids in queries]
    res: dict = {
        "n_engines": n_engines,
        "stored_blocks": stored_blocks,
        "batches": len(batches),
        "prompt_blocks": prompt_blocks,
        "queries": n_queries,
        "events_per_engine_s": BUSY_ENGINE_EVENTS,
        "bursts": len(bursts),
        "max_entry_blocks": MeshConfig().max_entry_blocks,
    }
    missing = native_missing()
    default = "python" if missing else "native"
    why = dynamo_available()
    dyn_events: list[tuple[int, bytes]] = []
    if not why:
        note("index: serialising Dynamo JSON events")
        dyn_events = _dynamo_events([batches[i] for i in order])
    dyn_runs: list[float] = []
    tree: Any = None
    indexes: dict[str, Any] = {}
    answers: dict[str, list[dict[str, int]]] = {}
    for impl in IMPLS:
        if impl == "native" and missing:
            res[impl] = {"skipped": missing}
            note(f"index: skip native: {missing}")
            continue
        per_frame = [
            _ingest_ours(impl, frames, bursts, workers, stored_blocks, seed, entry_per_frame=True)[0]
            for _ in range(INGEST_RUNS)
        ]
        runs = []
        stage_runs: list[dict[str, float]] = []
        for _ in range(INGEST_RUNS):
            if impl == default:
                tree = None  # only the last run's tree is kept (for the matches): none lives beside ours
            figures, index = _ingest_ours(impl, frames, bursts, workers, stored_blocks, seed)
            runs.append(figures["blocks_per_s"])
            stage_runs.append(figures.pop("stage_seconds"))
            if impl == default and dyn_events:
                # Dynamo's run right after ours: a busy moment of the shared
                # machine weighs on both runs of a pair alike.
                tree = _new_tree()
                dyn_runs.append(_ingest_dynamo(tree, dyn_events, stored_blocks, n_engines)["blocks_per_s"])
        figures["blocks_per_s"] = statistics.median(runs)
        figures["seconds"] = stored_blocks / figures["blocks_per_s"]
        figures["runs_blocks_per_s"] = runs
        figures["stage_share"] = _stage_share(stage_runs)
        figures["entry_per_frame_blocks_per_s"] = statistics.median(r["blocks_per_s"] for r in per_frame)
        note(
            f"index: {impl} {figures['blocks_per_s']:,.0f} blocks/s owner ingest end to end "
            f"({figures['entry_per_frame_blocks_per_s']:,.0f} with one log entry per frame; "
            f"medians of {INGEST_RUNS})"
        )
        answers[impl] = _match_answers(index, q_router[:AGREEMENT_QUERIES], workers)
        res[impl] = figures
        indexes[impl] = index
    del frames, dyn_events
    q_local = [[_local_hash(b) for b in ids] for ids in queries]
    lat = _time_matches(indexes, tree, q_router, q_local, workers)
    for impl in indexes:
        res[impl].update(_match_figures(lat[impl]))
    if len(answers) == 2:
        res["answers_equal"] = answers["native"] == answers["python"]
    # Non-owner apply: its own stream over 1,000 engines (kvmesh.benchmarks.nonowner).
    no = bench_non_owner(nonowner_blocks, NONOWNER_ENGINES, seed)
    res["nonowner"] = no
    for name, r in no["paths"].items():
        note(f"index: non-owner {name} {r['blocks_per_s']:,} blocks/s")

    ours = res["kvmesh"] = {**res[default], "implementation": default}
    # Hashing a 2048-token prompt (done once per request before the match).
    toks = [t for b in queries[0] for t in _block_tokens(b)]
    t = time.perf_counter()
    for _ in range(200):
        block_hashes(toks, BS, root)
    ours["hash_128_blocks_us"] = (time.perf_counter() - t) / 200 * 1e6

    if why:
        res["dynamo"] = {"skipped": why}
        note(f"index: skip Dynamo: {why}")
        return res

    dyn = _dynamo_figures(dyn_runs, lat["dynamo"])
    note(f"index: Dynamo {dyn['blocks_per_s']:,.0f} blocks/s")
    ours_first = answers[default]  # our answers to the first AGREEMENT_QUERIES prompts, made above
    agree = sum(
        max(tree.find_matches(q).scores.values(), default=0) == max(a.values())
        for q, a in zip(q_local, ours_first)
    )
    dyn["best_overlap_agrees_with_kvmesh"] = f"{agree}/{len(ours_first)}"
    res["dynamo"] = dyn
    # Each of our runs over the Dynamo run right after it; the median of those.
    pairs = [o / d for o, d in zip(ours["runs_blocks_per_s"], dyn_runs, strict=True)]
    res["ingest_ratio_runs"] = pairs
    res["ingest_ratio"] = statistics.median(pairs)
    res["match_p99_ratio"] = ours["match_p99_us"] / dyn["match_p99_us"]
    res["ingest_ratio_python"] = res["python"]["blocks_per_s"] / dyn["blocks_per_s"]
    res["match_p99_ratio_python"] = res["python"]["match_p99_us"] / dyn["match_p99_us"]
    return res


def bench_decisions(n_engines: int = 8, prompt_blocks: int = 128, n: int = 3000, seed: int = 0) -> dict:
    """In-process decision latency (choose + on_routed) per policy, 8
    engines, 128-block prompts, an index holding prompts of every depth."""
    from router.approx_tree import ApproxTree
    from router.policies import POLICY_NAMES, RouteRequest, candidates_from, make_policy

    rng = random.Random(seed)
    workers = [f"e{i}" for i in range(n_engines)]
    index = PrefixIndex()
    prompts = []
    for i in range(400):
        hs = [rng.getrandbits(64) for _ in range(prompt_blocks)]
        index.store(workers[i % n_engines], hs[: rng.randint(0, prompt_blocks)])
        prompts.append(hs)
    out: dict = {}
    for name in POLICY_NAMES:
        pol = make_policy(name, index=index, approx_tree=ApproxTree())
        load = {w: float(rng.randint(0, 8)) for w in workers}
        cands = candidates_from(workers, load)
        prng = random.Random(seed)
        lat = []
        for i in range(n):
            req = RouteRequest(f"r{i}", prompts[i % len(prompts)], prompt_blocks * BS, f"s{i % 50}")
            t = time.perf_counter()
            d = pol.choose(req, cands, float(i), prng)
            pol.on_routed(req, d.worker, float(i))
            lat.append(time.perf_counter() - t)
        out[name] = {"p50_us": percentile(lat, 50) * 1e6, "p99_us": percentile(lat, 99) * 1e6}
    return out
