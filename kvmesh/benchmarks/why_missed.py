"""Why a missed target was missed and what would fix it: the "Missed targets"
section of docs/benchmarks.md (pure).

Each explanation is reasoning about the design, with every figure it quotes
taken from the run's own results (``res``), so the page never carries a
number that this run did not measure. Keyed by target-name prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["why_missed"]


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _wl(t: dict) -> str:
    """The workload named in a target's parenthesis: "... (chat, N=3)" -> chat."""
    inside = t["name"].rsplit("(", 1)[-1].rstrip(")")
    return inside.split(",")[0].strip()


def _n(t: dict) -> int:
    name = t["name"]
    if "N=" in name:
        return int(name.rsplit("N=", 1)[1].rstrip(")"))
    return 1


def _ideal(res: dict, t: dict) -> str:
    p = _get(res, "routing", "systems", "precise", _wl(t)) or {}
    cache = _get(res, "routing", "workloads", _wl(t), "cache") or {}
    figures = ""
    if p:
        figures = (
            f" In this run the fleet held {cache.get('fleet_blocks', 0):,} blocks against a working set of "
            f"{cache.get('lru_working_set_blocks', 0):,}; one pooled LRU cache of that size would hit "
            f"{p['pooled_lru_hit_rate']:.3f}, its offline optimum {p['belady_hit_rate']:.3f}, an infinite "
            f"cache {p['ideal_hit_rate']:.3f}, and precise failed {p['failed']} of {p['requests']} requests "
            "(each counted as a miss)."
        )
    return (
        "The pooled ideal lets every request reuse any engine's blocks and evicts the fleet's least "
        "recently used block; the engines cannot lend each other memory, so a prefix that needs two "
        "engines (for load) is stored twice, and each engine evicts on its own. precise also weighs a "
        "hit against the queue in front of it (router/policies.py)." + figures + " Fix: fewer "
        "duplicate prefixes (raise precise.overlap_weight with --policy-opt) at some cost in TTFT; more "
        "memory per engine."
    )


def _vs_sglang_hits(res: dict, t: dict) -> str:
    d = _get(res, "routing", "sglang_cache_aware_defaults") or {}
    thr = d.get("cache_threshold")
    rule = (
        f"sends a request to its best match whenever more than {thr:.0%} of the prompt was routed there and "
        f"ignores load until the fleet is imbalanced by {d.get('balance_abs_threshold', 0):g} requests"
        if thr is not None
        else "sends a request to its best match and ignores load until the fleet is badly imbalanced"
    )
    return (
        f"sglang-router's rule {rule}; precise weighs the saving against each engine's queue, so it "
        "gives up hits where the wait would cost more (compare the TTFT and imbalance columns), and a "
        "request it refuses under overload counts as a miss. Fix if hits matter more than TTFT: raise "
        "precise.overlap_weight / delay_weight with --policy-opt (trade-offs: "
        "docs/evidence/precise_weights.md)."
    )


def _replicas(res: dict, t: dict) -> str:
    return (
        "Each node routes its share of the requests and learns the others' decisions through the "
        "mesh: route hints and load are pushed right after a routing decision (MeshConfig."
        "hint_push_delay), engine events through the engine's owner. Requests for one prefix that "
        "reach two nodes before either hears of the other can still split. Fix: session-affine entry "
        "into the mesh (the load balancer hashing on a session key), or a synchronous hint exchange for "
        "long prompts. Under cache pressure one run's hit rate also moves by several points from one run "
        "of the same configuration to the next, and the table compares one run of each: repeated runs "
        "and their spread in docs/evidence/mesh_hit_rate_spread.md."
    )


def _goodput(res: dict, t: dict) -> str:
    wl, n = _wl(t), _n(t)
    suffix = "" if n == 1 else f"@{n}"
    peer = "sglang_cache_aware" if "sglang" in t["name"] else "round_robin"
    mine = _get(res, "routing", "systems", "precise" + suffix, wl) or {}
    other = _get(res, "routing", "systems", peer + suffix, wl) or {}
    figures = ""
    if mine and other:
        um, uo = 1 - mine["hit_rate"], 1 - other["hit_rate"]
        figures = (
            f" At the nominal load precise left {um:.0%} of the prompt tokens to compute and {peer} "
            f"{uo:.0%} (imbalance {mine['imbalance_inflight']:.2f} vs {other['imbalance_inflight']:.2f}); "
            f"where prefill bounds the rate, fewer recomputed tokens lift goodput by at most "
            f"{uo / um:.2f}x."
            if um > 0
            else ""
        )
        if mine.get("failed"):
            figures += (
                f" precise's nodes refused {mine['failed']} of {mine['requests']} requests at the nominal "
                "load (admission: the estimated wait for the fleet exceeded --max-queue-wait); each counts "
                "against its SLO."
            )
    return (
        "Goodput at a TTFT SLO is set by how much prefill the fleet must do per request (the uncached "
        "prompt), by how evenly it queues and, with caches this small, by how many requests' blocks an "
        "engine can hold at once." + figures + " On this machine the client, the routers and the engines "
        "also share the CPU, so at high loads every system slows together (see the steps of the search). "
        "A longer search (`--ladder-steps`) narrows a bracket the ratio could not be read from."
    )


def _proxy(res: dict, t: dict) -> str:
    px = _get(res, "proxy") or {}
    echo, kv = px.get("echo", {}), px.get("kvmesh", {})
    figures = ""
    if echo.get("server_cpu_ms_per_request") and kv.get("server_cpu_ms_per_request"):
        figures = (
            f" This run: the router spent {kv['server_cpu_ms_per_request']:.2f} ms of CPU per request "
            f"against the echo server's {echo['server_cpu_ms_per_request']:.2f}, with "
            f"{kv.get('tokens_per_chunk', 0):.2f} tokens per streamed message; the client and engines' "
            f"CPU used {kv.get('cpu', {}).get('client', 0) + kv.get('cpu', {}).get('engines', 0):.2f} cores."
        )
    return (
        "A node does what the echo server does (a gRPC stream) plus routing (hashing the prompt, the "
        "index and the mesh's route hints) and an HTTP stream from the engine (aiohttp, SSE parsing), "
        "all in one Python event loop." + figures + " Fix: a native HTTP client for the engine stream; "
        "more router nodes (the mesh scales the proxy out); `Route` (pick only) for clients that proxy "
        "themselves."
    )


def _ingest(res: dict, t: dict) -> str:
    ix = _get(res, "micro", "index") or {}
    k, d = ix.get("kvmesh", {}), ix.get("dynamo", {})
    figures = ""
    if k.get("runs_blocks_per_s") and d.get("runs_blocks_per_s"):
        ours, theirs = k["runs_blocks_per_s"], d["runs_blocks_per_s"]
        figures = (
            f" This run's ingests from empty: kvmesh {min(ours):,.0f}-{max(ours):,.0f} blocks/s, Dynamo "
            f"{min(theirs):,.0f}-{max(theirs):,.0f}"
            + (
                f"; each of ours over the Dynamo run right after it: "
                f"{', '.join(f'{r:.2f}x' for r in ix['ingest_ratio_runs'])}."
                if ix.get("ingest_ratio_runs")
                else " (medians compared)."
            )
        )
    share = k.get("stage_share")
    if share:
        figures += (
            f" Where our time went in this run: decoding, hashing and mapping the frames {share['map']:.0%}, "
            f"the log entry and the owner's live maps {share['log']:.0%}, the index {share['index']:.0%}."
        )
    return (
        "kvmesh's owner ingest is end to end (decoding the engine's frames and their token ids, chained "
        "hashing, mapping engine hashes to router hashes, the replicated log's entry and append, the "
        "owner's live state, the index) while Dynamo's tree is handed pre-hashed events and applies them "
        "on its own thread. The native path keeps no Python object per block; what is left per block is "
        "the token ids' decoding and hashing and four hash tables (the mapper's engine -> router and "
        "router -> refcount, the owner's live map, the index), memory traffic more than instructions. "
        "The ratio therefore moves with the machine (see the CPU and caches the run names): "
        "random lookups in large tables on one side, JSON parsing and a hand-off between two threads "
        "on the other."
        + figures
        + " Fix: refcounts only for router hashes that several engine blocks name, the live map read "
        "from the mapper's table instead of a copy, and a native event path from the socket to the log "
        "and the index with no Python call per frame; a mapping thread beside the event loop gained in "
        "this benchmark and not in a node (what was tried and measured without being kept: "
        "docs/evidence/owner_ingest.md)."
    )


def _suite(res: dict, t: dict) -> str:
    parts = _get(res, "meta", "section_s") or {}
    order = sorted(parts.items(), key=lambda kv: -kv[1])
    text = "Where the time went in this run: " + ", ".join(f"{n} {s:.0f} s" for n, s in order) + "."
    return text + (
        f" The machine: {_get(res, 'meta', 'machine')}, {_get(res, 'meta', 'cpus')} cores. Fix: shorter "
        "levels or fewer repeats in the longest sections, at the cost of noisier figures there."
    )


WHY_MISSED: dict[str, str | Callable[[dict, dict], str]] = {
    "precise hit rate vs pooled-LRU ideal": _ideal,
    "hit rate vs sglang-router cache_aware": _vs_sglang_hits,
    "mesh hit-rate loss": _replicas,
    "goodput vs": _goodput,
    "index ingest vs Dynamo": _ingest,
    "non-owner apply": (
        "A non-owner merges each pycrdt update of the owner's log and applies the entries it carries; "
        "the table's path column says which route the entries took (packed: decoded and applied in "
        "Rust; else `KvDelta` objects). What remains per update is pycrdt's merge and the diff kept "
        "for forwarding, per update rather than per block. Fix: larger entries (more blocks per "
        "update), or the merge itself in native code."
    ),
    "engines one node keeps up with": (
        "The figure is the non-owner apply rate over a busy engine's block events per second: every "
        "node applies every engine's events, so it rises only with that rate (see the non-owner target)."
    ),
    "memory per indexed block": (
        "Resident memory per block is the native index's hash-table entry (hash, holder-set id, "
        "recency) at the table's load factor, which moves between doublings of the table; the "
        "pure-Python index keeps a dict entry and a Python int per hash and a set per engine of its "
        "blocks. Fix: a smaller native entry (native/README.md's plan); the pure-Python index is the "
        "fallback where Rust is not."
    ),
    "prefix match p99 vs Dynamo": (
        "kvmesh's match is one hash-table probe per block of the prompt and a look at the block's "
        "holders (router/index.py in Python, NativeIndex natively), then a dict of every candidate "
        "engine's overlap; its slowest queries are long full hits, and on a shared machine the p99 "
        "moves from run to run around the goal (compare the p50s). Fix: the native index (when the "
        "figure is the Python one), or fewer candidates per match."
    ),
    "convergence p99, 5 real nodes": (
        "Events reach the nodes that do not own the engine through epidemic gossip rounds "
        "(MembershipConfig.gossip_interval); the p99 is a few rounds plus the nodes' event loops on a "
        "shared CPU. Fix: push owner deltas to every member at once (small meshes), or a shorter "
        "gossip interval."
    ),
    "convergence p99, 9 real nodes": (
        "As for 5 nodes, with more processes sharing the machine's cores: every node's event loop "
        "handles more gossip per round. Fix: push owner deltas to every member at once (small meshes), "
        "or a shorter gossip interval."
    ),
    "convergence p99, 100 simulated nodes": (
        "Epidemic spreading needs about log_fanout(N) rounds, plus anti-entropy repair for lost pushes. "
        "Fix: a larger fanout for state deltas, or deltas piggy-backed on every probe."
    ),
    "convergence p99, 200 simulated nodes": (
        "Epidemic spreading needs about log_fanout(N) rounds; a lost push waits for the next round or "
        "for anti-entropy, and every message costs its receiver CPU (the per-message cost measured on "
        "the real nodes), so a busy node delays what it forwards. Fix: a larger fanout for state "
        "deltas, or deltas piggy-backed on every probe."
    ),
    "Generate proxy vs bare grpcio": _proxy,
    "suite length": _suite,
    "overload: CANCELLED or UNKNOWN": (
        "A node never answers CANCELLED itself (router/errors.py): a client gets it when gRPC's core "
        "drops a call before the application has taken it (past `grpc.server.max_pending_requests`, "
        "which router/service.py `server_options` raises) or when the client cancels. UNKNOWN is an "
        "exception that escaped a handler. The nodes' own outcome counts (GetStats `outcomes`) tell them "
        "apart: a CANCELLED the node did not count never reached its handler."
    ),
    "overload: goodput at": (
        "Goodput at the top of the ladder falls below the fleet's when the engines run short of work: "
        "the node's CPU goes to taking in and refusing the excess and its event loop falls behind the "
        "streams it proxies, or admission sheds requests the engines could have started in time. The "
        "CPU columns show which process ran out; the client, the router and the engines share this "
        "machine's cores with whatever else runs on it (the `other` column)."
    ),
    "overload: shed requests answered": lambda res, t: _shed_answers(res),
    "overload: router memory flat": (
        "RSS follows the number of calls the node holds at once: the admitted requests waiting for a "
        "first token (up to `--max-queue-wait` x the fleet's start rate, each with its engine stream "
        "open) and those being refused; CPython keeps freed memory for reuse rather than return it to "
        "the system, so a level ends near its peak. The index holds as many entries at every level "
        "(its column), so the growth is not routing state; RSS that kept rising over repeated levels at "
        "the same load would be a leak. A shorter `--max-queue-wait` holds fewer calls at once."
    ),
    "overload: mesh membership stable": (
        "SWIM probes and their acks share each node's event loop and CPU with the requests: an ack "
        "later than `probe_timeout` (and the indirect probes' acks too) makes the prober suspect a "
        "member that is only busy, which then refutes by raising its incarnation. Fix: answer "
        "membership messages off the request path (their own thread or port), or longer probe timeouts."
    ),
}


def worst_reject(ov: dict) -> tuple[str, dict] | None:
    """The overload level with the slowest p99 refusal, and its scenario:
    the figure of the target and of its explanation."""
    levels = [
        (name, lv)
        for name, sc in (_get(ov, "scenarios") or {}).items()
        for lv in sc.get("levels", [])
        if lv.get("reject_p99_ms") is not None
    ]
    return max(levels, key=lambda x: x[1]["reject_p99_ms"]) if levels else None


def _shed_answers(res: dict) -> str:
    text = (
        "Shedding costs the node little, but the answer waits for the node's event loop, behind the "
        "tokens it is streaming for the admitted requests and the other calls arriving, for the "
        "client's event loop, which sends every call and reads every answer, and for a CPU: the "
        "routers, the client and the engine processes share the machine's cores with whatever else "
        "runs on it (the `other` CPU column)."
    )
    worst = worst_reject(_get(res, "overload") or {})
    nodes = worst[1].get("nodes", []) if worst else []
    if worst and nodes and all("loop_stalls" in n for n in nodes):
        name, lv = worst
        lag_ms = max(n["loop_lag_max_s_after"] for n in nodes) * 1e3
        text += (
            f" This run, at {name} {lv['k']:g}x (refusals p99 {lv['reject_p99_ms']:.0f} ms): the routers' "
            f"event loops fell behind their stall threshold {sum(n['loop_stalls'] for n in nodes)} times "
            f"during the level, and none was more than {lag_ms:.0f} ms late from its start to the end of "
            "the level"
        )
        late = lv.get("client_loop_late") or {}
        if late.get("max_ms") is not None:
            text += (
                f"; the client's loop was late by up to {late['max_ms']:.0f} ms (p99 {late['p99_ms']:.0f} ms)"
            )
        cpu, cpus = lv.get("cpu_cores"), _get(res, "meta", "cpus")
        if cpu and cpus:
            text += f"; the processes used {sum(cpu.values()):.2f} of the machine's {cpus} cores"
        text += "."
    return text + (
        " Fix: router nodes on cores of their own (more nodes behind the name only help when they do "
        "not share the same cores), and clients that are not starved of CPU by them."
    )


def why_missed(res: dict, t: dict) -> str | None:
    """The explanation of the missed target ``t`` (an item of ``targets(res)``), if there is one."""
    for prefix, why in WHY_MISSED.items():
        if t["name"].startswith(prefix):
            return why if isinstance(why, str) else why(res, t)
    return None
