"""Render benchmark results as docs/benchmarks.md: one function per section
of the page, in page order, each a pure function of (part of) the results
dict; :func:`render_markdown` joins them. :func:`read_evidence` reads the
hand-written evidence pages (docs/evidence/*.md) appended at the end, and
:func:`machine_info` describes the host for the page's header."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

from kvmesh.benchmarks.driver import LoadSampler
from kvmesh.benchmarks.goodput import ratio_bounds
from kvmesh.benchmarks.targets import analysis, fmt_goodput, fmt_ratio, targets

FAMILY_LABELS = {
    "round_robin": "kvmesh round_robin",
    "random": "kvmesh random",
    "consistent_hash": "kvmesh consistent_hash",
    "least_load": "kvmesh least_load",
    "power_of_two": "kvmesh power_of_two",
    "cache_aware_approx": "kvmesh cache_aware_approx (SGLang's rule)",
    "precise": "kvmesh precise",
    "sglang_cache_aware": "sglang-router cache_aware",
    "sglang_round_robin": "sglang-router round_robin",
}


def system_label(key: str) -> str:
    """``precise@3`` -> "kvmesh precise, 3-node mesh"; ``sglang_cache_aware@3`` -> "..., 3 instances"."""
    family, _, n = key.partition("@")
    label = FAMILY_LABELS.get(family, family)
    if not n or n == "1":
        return label
    if family.startswith("sglang_"):
        return f"{label}, {n} instances"
    return f"{label}, {n}-node mesh"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows)]


def _header() -> list[str]:
    return [
        "# kvmesh benchmarks",
        "",
        "Regenerate everything on this page (tables, `docs/benchmarks.json`, `docs/img/*.png`) with "
        "`kvmesh bench all` (`make bench`); `kvmesh bench all --quick` (`make bench-quick`) is a short "
        "smoke run of the same code.",
        "",
    ]


def _machine_section(meta: dict) -> list[str]:
    if not meta:
        return []
    lines = ["## Machine and run", ""]
    for k in ("command", "started", "duration_s", "quick", "machine", "cpus", "python", "versions"):
        if k in meta:
            v = meta[k]
            if k == "duration_s":
                v = f"{v:.0f} s"
                parts = meta.get("section_s") or {}
                if parts:
                    v += " (" + ", ".join(f"{name} {s:.0f} s" for name, s in parts.items()) + ")"
            lines.append(f"- {k}: {v}")
    lines.append("")
    return lines


def _verdict(t: dict) -> str:
    if t["met"] is None:
        return "undetermined" if t.get("undetermined") else "not measured"
    return "**met**" if t["met"] else "**missed**"


def _targets_section(res: dict) -> list[str]:
    tg = targets(res)
    if not tg:
        return []
    lines = ["## Targets", "", "Every target of the issue, met or missed, with the measured figure.", ""]
    lines += _table(
        ["target", "goal", "measured", "verdict"],
        [[t["name"], t["target"], t["measured"], _verdict(t)] for t in tg],
    )
    lines.append("")
    return lines


def _pct(a: float | None, b: float | None) -> str:
    return f"{a / b:.0%}" if a is not None and b else "-"


def _routing_intro(routing: dict) -> list[str]:
    fl = routing.get("fleet", {})
    split = routing.get("split") or {}
    sgl = routing.get("sglang_cache_aware_defaults") or {}
    from engine_adapters.sim_engine.timing import TimingConfig

    tm = TimingConfig()
    lines = [
        "## Routing: every system in front of the same engines",
        "",
        f"{fl.get('engines')} simulated engines (`kvmesh sim-engine`, time scale {fl.get('time_scale')}: "
        f"an A100-class timing model, prefill {tm.prefill_ms_per_token:g} ms per uncached token, decode "
        f"step {tm.decode_base_ms:g} ms + {tm.decode_per_seq_ms:g} ms per sequence, "
        f"{tm.max_num_batched_tokens}-token chunked prefill), each with a bounded KV cache of "
        f"{fl.get('block_size')}-token blocks (LRU eviction) sized to each workload (below). Fleet "
        "prefill capacity "
        f"{fl.get('prefill_tokens_per_s', 0):,.0f} tokens/s. Every run starts cold: once the engines are "
        "idle their caches are cleared, the system is a fresh router process (or N of them) whose index "
        "is seen empty before the first request, and it is stopped after the run. TTFT and "
        "latency are measured by the client; hit rate = engine-reported cached prompt tokens / prompt "
        "tokens of every request sent (a failed request is a miss). Imbalance = max / mean over engines "
        "of the time-averaged in-flight requests (engines' `/admin/stats`, sampled every "
        f"{LoadSampler.PERIOD_S * 1000:g} ms).",
        "",
    ]
    if split:
        from kvmesh.workloads import SPLITS

        tuning = SPLITS["tuning"]
        where = (
            "these figures are on the tuning split itself, not held out"
            if split.get("name") == tuning.name
            else "the figures on this page are on another seed and another slice of the trace"
        )
        lines += [
            f"Split: `{split.get('name')}` (workload seed {split.get('seed')}, trace from record "
            f"{split.get('trace_offset')}). Policy defaults (precise's weights, "
            f"docs/evidence/precise_weights.md) were chosen on the `{tuning.name}` split (seed "
            f"{tuning.seed}, the trace from record {tuning.trace_offset}); {where} "
            f"(`--split {tuning.name}` reruns the tuning split).",
            "",
        ]
    if sgl:
        lines += [
            "`kvmesh cache_aware_approx` is SGLang's rule in kvmesh and runs with sglang-router's own "
            f"cache_aware defaults: cache_threshold {sgl.get('cache_threshold'):g}, balance thresholds "
            f"{sgl.get('balance_abs_threshold'):g} requests / {sgl.get('balance_rel_threshold'):g}x "
            "(`--policy-opt cache_aware_approx.*`); it differs in one point: below the threshold it picks "
            "the least loaded engine where sglang-router picks the one with the smallest tree.",
            "",
        ]
    if routing.get("skipped"):
        lines += ["Not measured (peer not installed): "]
        lines += [f"- {system_label(k)}: {v}" for k, v in routing["skipped"].items()]
        lines.append("")
    return lines


def _workloads_section(routing: dict) -> list[str]:
    fl = routing.get("fleet", {})
    pressure, floor = fl.get("pressure", 0.0), fl.get("min_longest_requests", 1)
    sizing = (
        f"Each engine gets its share of `pressure` ({pressure:g}) x the working set, but never fewer "
        f"blocks than {floor} x the workload's longest request (prompt and answer), which must fit."
        if pressure
        else f"Every engine gets {fl.get('num_gpu_blocks')} blocks (`--pressure 0`)."
    )
    lines = [
        "### Workloads, working sets and cache sizes",
        "",
        "All workloads are open loop: sessions arrive at their own times (Poisson, or the trace's "
        "timestamps) whatever the fleet's state, so an overloaded system queues, as in production. "
        "`chat`: each session starts with one of `system_prompts` shared system prompts, each turn's "
        "prompt is the whole history (earlier prompts and the engine's answers) plus a new user message, "
        "`think_s` between turns. `agent`: a long shared tool prefix per agent, short outputs, each step "
        "appends a tool call and its result. `nosharing`: unique prompts (control). `trace`: a slice of "
        "the Mooncake conversation trace; every 512-token trace block (hash id) becomes "
        "`tokens_per_trace_block` synthetic token ids drawn from a generator seeded by the hash id "
        "(equal ids give equal tokens), so every length scales by `length_scale` (outputs too, capped "
        "at `max_output`); timestamps are divided by `time_factor`, chosen so the slice offers "
        "`offered_prompt_tokens_per_s` (= `--trace-load` x the fleet's prefill capacity).",
        "",
        "Working set: the smallest single LRU cache that keeps all but 1% of an infinite cache's hits, "
        "over the requests planned before the run (answers of the requested length, turns spaced by "
        f"their think time); the offline optimum (Belady) needs fewer. {sizing} The last column is what "
        "the fleet's caches hold of the working set: under 100%, no router can keep every reuse.",
        "",
    ]
    rows = []
    for wl, w in routing.get("workloads", {}).items():
        c = w.get("cache") or {}
        share = c.get("fleet_share_of_working_set")
        rows.append(
            [
                f"`{wl}`",
                str(w["requests"]),
                f"{c.get('lru_working_set_blocks', 0):,}",
                f"{c.get('working_set_blocks', 0):,}",
                f"{c.get('longest_request_blocks', 0):,}",
                f"{c.get('blocks_per_engine', 0):,}",
                f"{c.get('fleet_blocks', 0):,}",
                f"{share:.0%}" if share else "-",
            ]
        )
    lines += _table(
        [
            "workload",
            "requests",
            "working set (LRU), blocks",
            "offline optimum needs",
            "longest request",
            "cache per engine",
            "fleet cache",
            "fleet / working set",
        ],
        rows,
    )
    lines.append("")
    lines += [f"- `{wl}`: {w['params']}" for wl, w in routing.get("workloads", {}).items()]
    lines.append("")
    return lines


def _system_row(key: str, s: dict) -> list[str]:
    return [
        system_label(key),
        f"{s['hit_rate']:.3f}",
        _pct(s["hit_rate"], s.get("pooled_lru_hit_rate")),
        _pct(s["hit_rate"], s.get("belady_hit_rate")),
        _pct(s["hit_rate"], s.get("ideal_hit_rate")),
        f"{s['ttft_p50_ms']:.0f}",
        f"{s['ttft_p90_ms']:.0f}",
        f"{s['ttft_p99_ms']:.0f}",
        f"{s['latency_p50_ms']:.0f}",
        f"{s['throughput_rps']:.1f}",
        f"{s['output_tps']:.0f}",
        f"{s['imbalance_inflight']:.2f}",
        str(s["failed"]),
    ]


_SYSTEM_HEAD = [
    "system",
    "hit rate",
    "% of pooled LRU",
    "% of Belady",
    "% of infinite",
    "TTFT p50 ms",
    "TTFT p90 ms",
    "TTFT p99 ms",
    "e2e p50 ms",
    "req/s",
    "out tok/s",
    "imbalance",
    "failed",
]


def _ideals_line(s: dict) -> str:
    return (
        f"Ideals over the requests precise's run sent (each row's % is against its own run's): one "
        f"infinite cache **{s['ideal_hit_rate']:.3f}**; one LRU cache of the fleet's "
        f"{s.get('capacity_blocks', 0):,} blocks **{s.get('pooled_lru_hit_rate', 0):.3f}**; its offline "
        f"optimum (Belady) **{s.get('belady_hit_rate', 0):.3f}**."
    )


def routing_tables(routing: dict) -> list[str]:
    """One table per workload: every single-instance system at the nominal load."""
    lines: list[str] = []
    sysd = routing.get("systems", {})
    for wl, winfo in routing.get("workloads", {}).items():
        rows = [
            _system_row(k, per[wl])
            for k, per in sysd.items()
            if "@" not in k and "hit_rate" in per.get(wl, {})
        ]
        if not rows:
            continue
        lines += [f"#### Workload `{wl}` ({winfo['requests']} requests), nominal load", ""]
        ref = (sysd.get("precise") or {}).get(wl) or next(
            per[wl] for k, per in sysd.items() if "hit_rate" in per.get(wl, {})
        )
        lines += [_ideals_line(ref), ""]
        lines += _table(_SYSTEM_HEAD, rows)
        lines.append("")
    return lines


def _replicas_section(routing: dict) -> list[str]:
    plan = routing.get("plan") or {}
    ns = [n for n in plan.get("replicas", ()) if n >= 1]
    fams = plan.get("replica_families", ())
    sysd = routing.get("systems", {})
    if len(ns) < 2 or not fams:
        return []
    lines = [
        "### Router replicas",
        "",
        "N routers behind a per-request spread (each request to the next replica in turn, as a DNS or "
        "L4 load balancer does): kvmesh precise as an N-node mesh (one converged index), kvmesh "
        "cache_aware_approx on N nodes of a mesh (its routed-prefix tree is per node), sglang-router "
        "cache_aware as N independent instances, and round-robin. Same engines, caches and workload "
        "as above; Δ hit = hit-rate points against the same system at N=1.",
        "",
    ]
    for wl in routing.get("workloads", {}):
        rows = []
        for f in fams:
            one = (sysd.get(f) or {}).get(wl)
            for n in ns:
                s = (sysd.get(f if n == 1 else f"{f}@{n}") or {}).get(wl)
                if not s or "hit_rate" not in s:
                    why = routing.get("skipped", {}).get(f if n == 1 else f"{f}@{n}") or (s or {}).get(
                        "error"
                    )
                    rows.append([FAMILY_LABELS.get(f, f), str(n), "not measured", *["-"] * 7, why or "-"])
                    continue
                d = (s["hit_rate"] - one["hit_rate"]) * 100 if one and "hit_rate" in one else None
                rows.append(
                    [
                        FAMILY_LABELS.get(f, f),
                        str(n),
                        f"{s['hit_rate']:.3f}",
                        "-" if d is None or n == 1 else f"{d:+.1f}",
                        f"{s['ttft_p50_ms']:.0f}",
                        f"{s['ttft_p90_ms']:.0f}",
                        f"{s['ttft_p99_ms']:.0f}",
                        f"{s['throughput_rps']:.1f}",
                        f"{s['imbalance_inflight']:.2f}",
                        str(s["failed"]),
                        "",
                    ]
                )
        if not rows:
            continue
        lines += [f"#### `{wl}`", ""]
        lines += _table(
            [
                "system",
                "N",
                "hit rate",
                "Δ hit (points)",
                "TTFT p50 ms",
                "TTFT p90 ms",
                "TTFT p99 ms",
                "req/s",
                "imbalance",
                "failed",
                "note",
            ],
            rows,
        )
        lines.append("")
    lines += ["![hit rate and TTFT p90 against router replicas](img/replicas.png)", ""]
    return lines


def _nominal(routing: dict, wl: str) -> tuple[float, str] | None:
    """A workload's nominal load in its own unit: (value, unit)."""
    p = (routing.get("workloads", {}).get(wl) or {}).get("params", {})
    if "session_rate_per_s" in p:
        return float(p["session_rate_per_s"]), "sessions/s"
    if p.get("offered_prompt_tokens_per_s"):
        return float(p["offered_prompt_tokens_per_s"]), "prompt tokens/s"
    return None


def _absolute(routing: dict, wl: str, g: dict | None) -> str:
    nominal = _nominal(routing, wl)
    if not g or nominal is None:
        return "-"
    v, unit = nominal

    def num(x: float) -> str:
        return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"

    if g["below"]:
        return f"< {num(g['hi'] * v)} {unit}"
    return f"{'>= ' if g['at_least'] else ''}{num(g['load'] * v)} {unit}"


def _goodput_cell(g: dict | None) -> str:
    if not g:
        return "not measured"
    if g["below"] or g["at_least"]:
        return fmt_goodput(g).removesuffix("x")
    return f"{g['load']:.2f} ({g['lo']:.2g}-{g['hi']:.2g})"


def _ratio_cell(g: dict | None, peer: dict | None) -> str:
    if not (g and peer):
        return "-"
    r = ratio_bounds(g, peer)
    return "-" if r is None else fmt_ratio(r)


def _goodput_section(routing: dict) -> list[str]:
    gp = routing.get("goodput") or {}
    ladder = routing.get("ladder") or {}
    if not gp:
        return []
    slo = (routing.get("plan") or {}).get("slo_ms", 0.0)
    lines = [
        "### Goodput at the TTFT SLO",
        "",
        f"SLO: TTFT p90 <= {slo:g} ms over every request sent, a failed or refused request counting as "
        f"slower than any answer (`--slo-ms`): a load passes when at least 90% of its requests had a first "
        "token within the SLO. A load of xk runs the workload's timeline (arrivals and the think time "
        "between turns) k times as fast. Each curve starts at the nominal load (x1, the load of the tables "
        "above), doubles or halves it until the SLO is crossed, then halves the bracket (geometrically) "
        "while runs remain. Goodput is where the share of requests within the SLO crosses 90%, on a straight "
        "line in log(load) between the highest passing and the lowest failing load (the bracket in "
        "parentheses); `>=`: it passed every load tried; `<`: it failed every load tried. A ratio of two "
        "such bounds is a bound too (`>=`, `<=`, or a range).",
        "",
    ]
    rows = []
    for wl, per in gp.items():
        for key, g in per.items():
            fam, _, n = key.partition("@")
            sfx = f"@{n}" if n else ""
            rows.append(
                [
                    f"`{wl}`",
                    system_label(key),
                    _goodput_cell(g),
                    _absolute(routing, wl, g),
                    _ratio_cell(g, per.get("sglang_cache_aware" + sfx))
                    if fam != "sglang_cache_aware"
                    else "-",
                    _ratio_cell(g, per.get("round_robin" + sfx)) if fam != "round_robin" else "-",
                ]
            )
    lines += _table(
        [
            "workload",
            "system",
            "goodput (x nominal)",
            "goodput",
            "vs sglang-router cache_aware (same N)",
            "vs round_robin (same N)",
        ],
        rows,
    )
    lines += [
        "",
        "Every step of the search: load, TTFT p90 over every request (`-`: failures reach the p90), share "
        "within the SLO, hit rate, failed requests:",
        "",
    ]
    steps = []
    for wl, per in ladder.items():
        for key, pts in per.items():
            cells = []
            for p in pts:
                v = p.get("ttft_p90_all_ms")
                p90 = "-" if v is None else f"{v:.0f} ms"
                share = p.get("within_slo")
                cells.append(
                    f"x{p['load']:.2g}: {p90}"
                    + (f", {share:.0%}" if share is not None else "")
                    + f", hit {p.get('hit_rate') or 0:.3f}"
                    + (f", {p['failed']} failed" if p.get("failed") else "")
                    + (f", {p['error']}" if p.get("error") else "")
                )
            steps.append([f"`{wl}`", system_label(key), "; ".join(cells)])
    lines += _table(["workload", "system", "steps"], steps)
    lines += ["", "![TTFT p90 against offered load](img/goodput.png)", ""]
    return lines


def _routing_notes(routing: dict) -> list[str]:
    notes = []
    for n, per in routing.get("systems", {}).items():
        label = system_label(n)
        if per.get("error"):
            notes.append(f"- {label}: run aborted: {per['error']}")
        for wl in routing.get("workloads", {}):
            s = per.get(wl) or {}
            notes += [f"- {label}, `{wl}`: {w}" for w in s.get("warnings", [])]
            if s.get("error"):
                notes.append(f"- {label}, `{wl}`: {s['error']}")
            if s.get("errors"):
                notes.append(f"- {label}, `{wl}`: failed requests: {s['errors']}")
    if not notes:
        return []
    return ["Warnings and errors seen during the runs:", "", *notes, ""]


def _ms_or_dash(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _overhead_prose(routing: dict) -> list[str]:
    """What the quick-ACK column says, from this run's figures."""
    out = []
    for n, p in routing.get("systems", {}).items():
        o = p.get("overhead") or {}
        q = o.get("overhead_quickack_ms")
        if q is None:
            continue
        out.append(
            f"{system_label(n)}: {o.get('overhead_ms', 0):.1f} ms on a kept-alive connection, {q:.1f} ms "
            "when this client acknowledges every segment at once (TCP_QUICKACK)."
        )
    if not out:
        return []
    return [
        "Reading the HTTP rows: "
        + " ".join(out)
        + " Where the two differ, the difference is the client's delayed ACK meeting Nagle's algorithm "
        "on the router's socket (analysis, not measured here): the router's first chunk after the response "
        "head waits for the ACK of the head, which a client sends at once only with quick-ACK. Only a first "
        "token sooner than the delayed-ACK timer (this idle probe's 32-token prompt) ever waits for it; the "
        "workloads' first tokens come later, which is why their TTFT columns do not show it.",
        "",
    ]


def _overhead_section(routing: dict) -> list[str]:
    rows = [
        [
            system_label(n),
            f"{p['overhead'].get('direct_ttft_p50_ms', 0):.1f}",
            f"{p['overhead'].get('via_ttft_p50_ms', 0):.1f}",
            f"{p['overhead'].get('overhead_ms', 0):.1f}",
            _ms_or_dash(p["overhead"].get("overhead_quickack_ms"), ".1f"),
            _ms_or_dash(p["overhead"].get("route_rpc_p50_ms"), ".2f"),
            _ms_or_dash(p["overhead"].get("route_rpc_p99_ms"), ".2f"),
        ]
        for n, p in routing.get("systems", {}).items()
        if "overhead" in p
    ]
    if not rows:
        return []
    lines = [
        "### Router overhead per request (idle fleet)",
        "",
        "Median TTFT of a 32-token, 1-token request through the system minus the same sent straight to an "
        "engine, on an idle fleet, read by the same client (after the system's first run).",
        "",
    ]
    lines += _table(
        [
            "system",
            "direct TTFT p50 ms",
            "via system TTFT p50 ms",
            "overhead ms",
            "overhead ms, client quick-ACK",
            "Route RPC p50 ms (2048 tokens)",
            "Route RPC p99 ms",
        ],
        rows,
    )
    lines.append("")
    return lines + _overhead_prose(routing)


def _routing_section(routing: dict | None) -> list[str]:
    if not routing:
        return []
    return [
        *_routing_intro(routing),
        *_workloads_section(routing),
        *routing_tables(routing),
        *["![hit rate](img/hit_rate.png)", "", "![TTFT p90](img/ttft_p90.png)", ""],
        *_replicas_section(routing),
        *_goodput_section(routing),
        *_routing_notes(routing),
        *_overhead_section(routing),
    ]


_IMPL_LABELS = {"native": "kvmesh native (Rust)", "python": "kvmesh pure Python"}


def _n(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _index_rows(ix: dict, d: dict) -> list[list[str]]:
    dyn_rate, dyn_p99 = d.get("blocks_per_s"), d.get("match_p99_us")
    rows = []
    # Runs before the native path was measured have one "kvmesh" row (the Python path).
    impls = [i for i in _IMPL_LABELS if i in ix] or ["kvmesh"]
    for impl in impls:
        k = ix["kvmesh"] if impl == "kvmesh" else ix[impl]
        label = _IMPL_LABELS.get(impl, "kvmesh")
        if "skipped" in k:
            rows.append([label, f"not measured: {k['skipped']}", "-", "-", "-", "-", "-"])
            continue
        per_frame = k.get("entry_per_frame_blocks_per_s")
        # The implementation a node runs was paired run by run with Dynamo:
        # its ratio is the median of the pairs' (the target's figure).
        paired = ix.get("ingest_ratio_runs") and impl == ix["kvmesh"].get("implementation")
        rows.append(
            [
                label,
                f"{k['blocks_per_s']:,.0f}",
                f"{ix['ingest_ratio']:.2f}x (paired)" if paired else _x(k["blocks_per_s"], dyn_rate),
                "-" if per_frame is None else f"{per_frame:,.0f} ({_x(per_frame, dyn_rate)})",
                f"{k['match_p50_us']:.0f}",
                f"{k['match_p99_us']:.0f}",
                _x(k["match_p99_us"], dyn_p99),
            ]
        )
    if "blocks_per_s" in d:
        rows.append(
            [
                "Dynamo RadixTree (Rust)",
                f"{d['blocks_per_s']:,.0f}",
                "1x",
                "-",
                f"{d['match_p50_us']:.0f}",
                f"{d['match_p99_us']:.0f}",
                "1x",
            ]
        )
    elif d:
        rows.append(["Dynamo RadixTree", d.get("skipped", "-"), "-", "-", "-", "-", "-"])
    return rows


# What each path of the non-owner benchmark covers (kvmesh/benchmarks/nonowner.py).
_NONOWNER_PATHS = {
    "python": "pure Python: entries decoded by msgspec and validated, `PrefixIndex.apply`",
    "python_decode_native_index": "the same decode, `NativeIndex.apply`",
    "native": "native: `decode_entry` + `NativeIndex.apply_packed` (no Python object per block)",
    "native_decode_only": "native `decode_entry` alone",
    "mesh_python": "end to end, pure Python: `MeshState.apply_remote` of the gossip (pycrdt) + index",
    "mesh_python_decode_native_index": "end to end, Python decode + `NativeIndex`",
    "mesh_native": "end to end, native (what a router node runs): packed entries + `NativeIndex`",
}


def _nonowner_section(ix: dict) -> list[str]:
    no = ix.get("nonowner")
    if not no or not no.get("paths"):
        return []
    per = no.get("busy_engine_events_per_s", 3000)
    rows = [
        [_NONOWNER_PATHS.get(name, name), f"{r['blocks_per_s']:,.0f}", f"{r['blocks_per_s'] / per:,.0f}"]
        for name, r in no["paths"].items()
        if r.get("blocks_per_s")
    ]
    lines = [
        f"Non-owner apply: {no['blocks']:,} blocks in {no['entries']:,} replicated entries of "
        f"{no['entry_blocks']} blocks over {no['engines']:,} engines (each keeps a window of entries live, "
        "then alternates evictions and stores), as another node receives them; end to end, "
        f"{no['entries_per_update']} entries of an engine per gossiped update. Blocks per second of CPU "
        f"time; engines one node keeps up with = that rate / {per:,} block events per second per engine. "
        "Every path's index is checked equal to the pure-Python one.",
        "",
    ]
    lines += _table(["path", "blocks/s", f"engines at {per:,} events/s"], rows)
    lines.append("")
    return lines


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000:,}k"


def _memory_section(mem: dict | None) -> list[str]:
    if not mem or not mem.get("rows"):
        return []
    labels = {**_IMPL_LABELS, "dynamo": "Dynamo RadixTree (Rust)"}
    sizes = [str(n) for n in mem["sizes"]]
    rows = []
    for impl, by_size in mem["rows"].items():
        cells = [labels.get(impl, impl)]
        for n in sizes:
            r = by_size.get(n, {})
            if "bytes_per_block" in r:
                cells.append(
                    f"{r['bytes_per_block']:.0f} B ({r['bytes_per_pair']:.0f} B per engine-block pair)"
                )
            else:
                cells.append(r.get("skipped", "-"))
        rows.append(cells)
    limits = mem.get("timeout_s") or {}
    limit = (
        f" (each run limited to {limits['python']:.0f} s for the pure-Python index)"
        if "python" in limits
        else ""
    )
    lines = [
        f"Memory per indexed block: resident memory grown while one index is built in a fresh process, "
        f"divided by the distinct blocks it holds, over {mem['n_engines']:,} engines (each conversation "
        f"cached on one or two){limit}.",
        "",
    ]
    lines += _table(["index", *(f"{_size(int(n))} blocks" for n in sizes)], rows)
    lines.append("")
    return lines


def _stages_text(ix: dict) -> str:
    """Where each implementation's owner ingest spent its time (runs that timed it)."""
    parts = [
        f"{_IMPL_LABELS[impl]}: map {sh['map']:.0%}, log and live maps {sh['log']:.0%}, "
        f"index {sh['index']:.0%}"
        for impl in _IMPL_LABELS
        if (sh := ix.get(impl, {}).get("stage_share"))
    ]
    if not parts:
        return ""
    return (
        " Owner ingest time by stage (decoding, hashing and mapping the frames; the burst's log entry "
        "with the owner's live maps; the index), over every run: " + "; ".join(parts) + "."
    )


def _index_section(ix: dict | None, mem: dict | None = None) -> list[str]:
    if not ix:
        return []
    d = ix.get("dynamo", {})
    lines = [
        f"Index at {ix['stored_blocks']:,} stored blocks over {ix['n_engines']} engines "
        f"({ix['batches']:,} event batches of up to 128 blocks), {ix['prompt_blocks']}-block prompts, "
        f"{ix['queries']:,} queries (a quarter full hits, the rest random depths), every implementation "
        "in one run on the same frames and prompts. kvmesh's owner ingest is end to end: vLLM msgpack "
        "frames decoded, mapped to router hashes, appended to the replicated pycrdt log as the owner, "
        "applied to the index (native: `NativeBlockMapper.map_frame_packed`, the owner's native live "
        "maps and `NativeIndex.apply_packed`; pure Python: `decode_batch`, `BlockMapper`, the reference "
        "live maps and `PrefixIndex`). Dynamo: `RadixTree.apply_event` on its JSON events (serialised "
        "beforehand). Both take the frames in the order a saturated owner node does (each engine's "
        f"queue drained in bursts, engines in turn: {_n(ix.get('bursts'))} bursts), kvmesh writing "
        f"a burst as one log entry of up to {_n(ix.get('max_entry_blocks'))} blocks as a node does; "
        '"one entry per frame" is the same with an entry per frame (a node that is not saturated). '
        'Ingest rates are medians of runs from empty (every run in benchmarks.json); "paired": the '
        "median over runs of ours over the Dynamo run right after it, else the ratio of the medians. "
        "Matches are timed side by side: blocks of prompts are asked of every index in turn, back to "
        "back within a block (the first index rotating from block to block), so a busy moment of the "
        "machine lands on every index's tail alike.",
        "",
    ]
    lines += _table(
        [
            "index",
            "owner ingest blocks/s",
            "vs Dynamo",
            "one entry per frame",
            "match p50 µs",
            "match p99 µs",
            "p99 vs Dynamo",
        ],
        _index_rows(ix, d),
    )
    k = ix["kvmesh"]
    agreement = d.get("best_overlap_agrees_with_kvmesh", "-")
    equal = ix.get("answers_equal")
    lines += [
        "",
        f"Hashing a 128-block prompt (chained xxh3): {k['hash_128_blocks_us']:.0f} µs. "
        f"Best overlap agreement with Dynamo (queries agreeing / checked): {agreement}."
        + ("" if equal is None else f" Native and Python match answers equal: {'yes' if equal else 'NO'}.")
        + _stages_text(ix),
        "",
    ]
    lines += _nonowner_section(ix)
    lines += _memory_section(mem)
    return lines


def _decisions_section(dec: dict | None) -> list[str]:
    if not dec:
        return []
    lines = [
        "Decision latency per policy (in process: `choose` + `on_routed`, 8 engines, 128-block prompt):",
        "",
    ]
    lines += _table(
        ["policy", "p50 µs", "p99 µs"],
        [[n, f"{v['p50_us']:.0f}", f"{v['p99_us']:.0f}"] for n, v in dec.items()],
    )
    lines.append("")
    return lines


def _micro_section(micro: dict | None) -> list[str]:
    if not micro:
        return []
    # A micro run merged into a page of an earlier full run says when it ran.
    when = []
    if micro.get("started"):
        on = f" on {micro['machine']}" if micro.get("machine") else ""
        when = [f"Measured {micro['started']} (`{micro.get('command', 'kvmesh bench micro')}`){on}.", ""]
    return [
        "## Microbenchmarks",
        "",
        *when,
        *_index_section(micro.get("index"), micro.get("memory")),
        *_decisions_section(micro.get("decisions")),
    ]


def _conv_rows(conv: dict) -> list[list[str]]:
    rows = []
    for kind in ("real", "sim"):
        for r in conv.get(kind, []):
            cost = r.get("cpu_per_message_s") if kind == "real" else r.get("process_cost_s")
            rows.append(
                [
                    kind,
                    str(r["n"]),
                    f"{r.get('loss', 0.0):.0%}",
                    f"{cost * 1e6:.0f}" if cost else "-",
                    f"{r['p50'] * 1000:.0f}",
                    f"{r['p99'] * 1000:.0f}",
                    f"{r['bytes_per_event']:,.0f}",
                    str(r.get("missing", 0)),
                ]
            )
    return rows


def _convergence_section(conv: dict | None) -> list[str]:
    if not conv:
        return []
    from mesh.membership import MembershipConfig

    m = MembershipConfig()
    cost = conv.get("sim_process_cost_s")
    charged = (
        f"Lossy simulated runs charge every node {cost * 1e6:.0f} µs of CPU per message it handles, one "
        "message at a time (the highest CPU per mesh message measured on the real meshes above: every node's "
        "CPU over a window of events without polling, divided by the mesh messages sent in it; all of a "
        "node's work is charged to its messages, so this is an upper bound)."
        if cost
        else "No real mesh was measured in this run, so no simulated node is charged CPU per message."
    )
    lines = [
        "## Gossip convergence",
        "",
        "Event published by an engine -> every node's index equal to the engine's cache. Real: router "
        f"processes on loopback with the default mesh timings (gossip {m.gossip_interval:g} s, probe "
        f"{m.probe_interval:g} s), digests polled every ~5 ms. Simulated: the deterministic mesh "
        "simulation (same MeshCore/state/index code, 1-10 ms network delays), lossless, or dropping the "
        f"given share of all messages. {charged} For lossy runs, bytes per event include the background "
        "traffic.",
        "",
    ]
    lines += _table(
        [
            "kind",
            "nodes",
            "packet loss",
            "CPU µs per message",
            "p50 ms",
            "p99 ms",
            "gossip bytes/event (all nodes)",
            "missing",
        ],
        _conv_rows(conv),
    )
    lines += ["", "![convergence](img/convergence.png)", ""]
    return lines


def _proxy_row(name: str, r: dict) -> list[str]:
    return [
        name,
        f"{r['requests_per_s']:.0f}",
        f"{r['messages_per_s']:.0f}",
        f"{r.get('tokens_per_chunk', 1.0):.2f}",
        f"{r['server_cpu_ms_per_request']:.2f}" if r.get("server_cpu_ms_per_request") else "-",
    ]


def _proxy_section(px: dict | None) -> list[str]:
    if not px:
        return []
    sh = px["shape"]
    if sh.get("engine", "sim") == "echo":
        engines = (
            f"{sh['engines']} echo engines (`kvmesh.benchmarks.echo_engine`: vLLM's completions stream and "
            f"nothing else, one token event every {sh.get('engine_token_interval_s', 0) * 1000:g} ms, so the "
            "engines cost the client's CPU next to nothing)"
        )
    else:
        engines = f"{sh['engines']} simulated engines at time scale {sh.get('engine_time_scale')}"
    pinned = (
        f"The server under test (echo or router) is pinned to CPU {sh.get('server_cpus')} in both runs, "
        f"the client and the engines to CPU {sh.get('client_cpus')}."
        if sh.get("pinned")
        else "Client, router and engines share the machine's cores (pinning was not possible)."
    )
    lines = [
        "## Generate proxy throughput",
        "",
        f"{sh['concurrency']} concurrent client streams, {sh['prompt_tokens']}-token prompts, "
        f"{sh['max_tokens']} streamed tokens, {sh['seconds']} s each; kvmesh router (precise) in front of "
        f"{engines}, vs a bare grpcio aio server. Echo sends {sh.get('echo_sends', 'the same messages')}; "
        "kvmesh sends "
        f"{sh.get('kvmesh_sends', 'the engine tokens')}. {pinned} Server CPU is the server process's "
        "CPU time per request; cpu ratio = echo / router.",
        "",
    ]
    lines += _table(
        ["server", "req/s", "streamed msgs/s", "tokens per msg", "server CPU ms/req"],
        [_proxy_row("bare grpcio (echo)", px["echo"]), _proxy_row("kvmesh router", px["kvmesh"])],
    )
    if px.get("cpu_ratio"):
        lines += ["", f"Throughput ratio {px['ratio']:.0%}; server CPU ratio {px['cpu_ratio']:.0%}."]
    lines.append("")
    return lines


def _scenario_label(name: str, sc: dict) -> str:
    n = sc.get("nodes", 1)
    return "one router node" if n == 1 else f"{n}-node mesh, requests round-robin over the nodes ({name})"


def _ms(v: float | None) -> str:
    return _ms_or_dash(v, ".0f" if v is not None and v >= 100 else ".1f")


def _overload_intro(ov: dict) -> list[str]:
    c = ov.get("config", {})
    cap = ov.get("capacity") or {}
    who = f"Router nodes run with `{c['router_python']}`. " if c.get("router_python") else ""
    if c.get("router_args"):
        who += f"Extra router flags: `{' '.join(c['router_args'])}`. "
    lo, hi = c.get("suffix_tokens", (0, 0)), c.get("max_tokens", (0, 0))
    when = f"Measured {ov['started']} ({ov.get('duration_s', 0):.0f} s). " if ov.get("started") else ""
    return [
        "## Overload: more requests than the fleet can serve",
        "",
        f"{when}"
        f"{c.get('engines')} simulated engines with {c.get('max_num_seqs')} batch slots each "
        f"(`--max-num-seqs`, time scale {c.get('time_scale')}) and a KV cache of "
        f"{c.get('num_gpu_blocks')} blocks each (full after the capacity run, so the index holds as many "
        f"blocks at every level), policy `{c.get('policy')}`. Prompts: "
        f"a shared {c.get('prefix_tokens')}-token prefix and {lo[0]}-{lo[1]} random tokens; "
        f"{hi[0]}-{hi[1]} output tokens (`ignore_eos`). Capacity (OK completions/s of a closed loop of "
        f"{cap.get('clients', '?')} clients, after a {c.get('warmup_seconds')} s warm-up, over "
        f"{c.get('capacity_seconds')} s): **{cap.get('rps', 0):.1f} req/s**. Each level then sends an "
        f"open-loop Poisson stream at k x capacity for {c.get('level_seconds')} s, client deadline "
        f"{c.get('deadline_seconds')} s per call; the fleet goes idle between levels. {who}",
        "",
        "Goodput: OK calls ended within the sending window, per second of it (a backlog served after "
        "the last arrival does not count). Shed rate: share answered RESOURCE_EXHAUSTED. TTFT: OK calls, "
        "send -> first token, at the client. Reject: send -> RESOURCE_EXHAUSTED status, at the client. "
        "RSS: each router process' VmRSS at the level's start and end (peak sampled every "
        f"{c.get('rss_period_seconds')} s). Router loop stalls: per node, how many times during the "
        "level its event loop ran its lag probe later than the stall threshold (`LoopLagConfig.stall`, "
        "`kvmesh_event_loop_stalls_total`), each a moment every call of the node waited. CPU: cores "
        "used during the level by the routers, the client, the engines and the rest of the machine "
        "(other processes: noise). Client late: how late the "
        "client's event loop woke a 10 ms timer (p99), the client's share of a slow answer.",
        "",
    ]


def _outcome_rows(levels: list[dict], statuses: list[str]) -> list[list[str]]:
    return [
        [
            f"{lv['k']:g}x",
            f"{lv['offered_rps']:.0f}",
            f"{lv['sent']:,}",
            *(f"{lv['statuses'].get(s, 0):,}" for s in statuses),
        ]
        for lv in levels
    ]


def _rss(lv: dict) -> str:
    r = lv["rss"]
    return ", ".join(
        f"{s:.0f} -> {e:.0f} ({p:.0f})" for s, e, p in zip(r["start_mb"], r["end_mb"], r["peak_mb"])
    )


def _perf_rows(levels: list[dict]) -> list[list[str]]:
    rows = []
    for lv in levels:
        cpu = lv.get("cpu_cores", {})
        rows.append(
            [
                f"{lv['k']:g}x",
                f"{lv['goodput_rps']:.1f}",
                f"{lv['shed_rate']:.0%}",
                _ms(lv["ttft_p50_ms"]),
                _ms(lv["ttft_p99_ms"]),
                _ms(lv["reject_p50_ms"]),
                _ms(lv["reject_p99_ms"]),
                _rss(lv),
                ", ".join(str(n.get("index_entries_after", "-")) for n in lv["nodes"]),
                ", ".join(str(n.get("loop_stalls", "-")) for n in lv["nodes"]),
                " / ".join(f"{cpu.get(k, 0):.2f}" for k in ("routers", "client", "engines", "other")),
                _ms((lv.get("client_loop_late") or {}).get("p99_ms")),
            ]
        )
    return rows


def _mesh_rows(levels: list[dict]) -> list[list[str]]:
    rows = []
    for lv in levels:
        nodes = lv["nodes"]
        by_engine: dict[str, int] = {}
        for n in nodes:
            for e, c in n["requests_by_engine"].items():
                by_engine[e] = by_engine.get(e, 0) + c
        rows.append(
            [
                f"{lv['k']:g}x",
                ", ".join(f"{sum(n['outcomes'].values()):,} ({n['outcomes'].get('OK', 0):,})" for n in nodes),
                ", ".join(f"{e} {c}" for e, c in sorted(by_engine.items())),
                str(sum(n["member_events"].get("suspect", 0) for n in nodes)),
                str(sum(n["member_events"].get("dead", 0) for n in nodes)),
                str(sum(n["incarnation_bumps"] for n in nodes)),
                ", ".join(sorted({x for n in nodes for x in n["not_alive_after"]})) or "none",
            ]
        )
    return rows


def _overload_scenario(name: str, sc: dict) -> list[str]:
    label = _scenario_label(name, sc)
    lines = [f"### {label[0].upper()}{label[1:]}", ""]
    levels = sc.get("levels", [])
    if sc.get("error"):
        lines += [f"{'Stopped' if levels else 'Did not run'}: {sc['error']}", ""]
    if not levels:
        return lines
    busy = [f"{lv['k']:g}x" for lv in levels if lv.get("idle_before") is False]
    if busy:
        lines += [f"The engines were still busy when these levels started: {', '.join(busy)}.", ""]
    statuses = list(levels[0]["statuses"])  # every status column, in the benchmark's order
    lines += ["Outcomes by status (calls):", ""]
    lines += _table(["offered", "req/s", "sent", *statuses], _outcome_rows(levels, statuses))
    lines += [""]
    lines += _table(
        [
            "offered",
            "goodput req/s",
            "shed",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "reject p50 ms",
            "reject p99 ms",
            "router RSS MB start -> end (peak)",
            "index entries after",
            "router loop stalls",
            "CPU cores router / client / engines / other",
            "client late p99 ms",
        ],
        _perf_rows(levels),
    )
    lines.append("")
    if sc.get("nodes", 1) > 1:
        lines += [
            "Per node: calls it ended (OK); engines: requests routed to each (all nodes); membership "
            "events the nodes counted during the level, refutations (a member raising its incarnation "
            "to answer a suspicion of itself) and members not alive at its end:",
            "",
        ]
        lines += _table(
            [
                "offered",
                "calls per node (OK)",
                "requests per engine",
                "suspect",
                "dead",
                "refutations",
                "not alive after",
            ],
            _mesh_rows(levels),
        )
        lines.append("")
    reasons = {r: c for lv in levels for r, c in lv.get("reasons", {}).items()}
    if reasons:
        lines += [f"Reasons seen (`kvmesh-reason`, `-` = none sent): {', '.join(sorted(reasons))}.", ""]
    return lines


def _overload_section(ov: dict | None) -> list[str]:
    if not ov:
        return []
    lines = _overload_intro(ov)
    for name, sc in ov.get("scenarios", {}).items():
        lines += _overload_scenario(name, sc)
    return [*lines, "![goodput and shed rate vs offered load](img/overload.png)", ""]


def _failures_section(res: dict) -> list[str]:
    broken = [f"- `{k.removesuffix('_error')}`: {v}" for k, v in res.items() if k.endswith("_error")]
    if not broken:
        return []
    return ["## Parts that failed to run", "", *broken, ""]


def _missed_section(res: dict) -> list[str]:
    why = analysis(res)
    if not why:
        return []
    return ["## Missed targets: what limits them, what would fix them", "", why, ""]


def _commands_section(commands: str) -> list[str]:
    if not commands:
        return []
    return ["## Commands", "", "```", commands, "```", ""]


_HEADING = re.compile(r"^(#{1,6})(?=\s|$)")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")


def _nest_headings(text: str, top: int = 3) -> str:
    """``text`` with its ATX headings shifted so that the shallowest is level
    ``top`` (never past 6), fenced code left alone: a page written to stand
    alone ("# Title") nests under this page's "##" section."""
    lines = text.strip("\n").splitlines()
    fenced = False
    heads: list[tuple[int, int]] = []  # (line index, level)
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := _HEADING.match(line)):
            heads.append((i, len(m.group(1))))
    if heads:
        shift = top - min(level for _, level in heads)
        for i, level in heads:
            lines[i] = "#" * min(6, level + shift) + lines[i][level:]
    return "\n".join(lines)


def _evidence_section(evidence: Sequence[str]) -> list[str]:
    if not evidence:
        return []
    lines = [
        "## Evidence for defaults",
        "",
        "Hand-written notes from `docs/evidence/*.md` (in file-name order): the measurements behind "
        "defaults that a single benchmark run does not show.",
        "",
    ]
    for page in evidence:
        lines += [_nest_headings(page), ""]
    return lines


def read_evidence(docs: Path | str) -> list[str]:
    """The text of every ``evidence/*.md`` under ``docs``, sorted by file name
    (none when the folder does not exist)."""
    return [p.read_text(encoding="utf-8") for p in sorted(Path(docs).glob("evidence/*.md"))]


def render_markdown(res: dict, commands: str = "", evidence: Sequence[str] = ()) -> str:
    """docs/benchmarks.md for the results ``res``: every section the results
    have, then ``commands`` (a code block) and the ``evidence`` pages."""
    sections = [
        _header(),
        _machine_section(res.get("meta", {})),
        _targets_section(res),
        _routing_section(res.get("routing")),
        _micro_section(res.get("micro")),
        _convergence_section(res.get("convergence")),
        _proxy_section(res.get("proxy")),
        _overload_section(res.get("overload")),
        _failures_section(res),
        _missed_section(res),
        _commands_section(commands),
        _evidence_section(evidence),
    ]
    return "\n".join(line for section in sections for line in section)


def _cpu_model() -> str:
    """The CPU's name with its family and model numbers and its caches: a
    virtual machine's CPU is often named only "Intel(R) Xeon(R) Processor",
    and runs on different hosts differ most in caches, which the index's
    random lookups and Dynamo's tree feel unequally."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("model name", "cpu family", "model") and k not in fields:
                    fields[k] = v.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        return ""
    model = fields.get("model name", "")
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']} model {fields['model']})"
    caches = []
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((d / n).read_text().strip() for n in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            caches.append(f"L{level}{'d' if kind == 'Data' else ''} {size}")
    return model + (f", caches {' '.join(caches)}" if caches else "")


def machine_info() -> dict:
    model = _cpu_model()
    versions = {}
    from importlib import metadata

    for pkg in ("grpcio", "pycrdt", "sglang-router", "ai-dynamo-runtime"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "machine": f"{platform.system()} {platform.machine()}, {model}",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }
