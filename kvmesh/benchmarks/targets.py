"""The targets kvmesh is held to: each one's verdict (met, missed or not
measured) from a results dict, with the measured figure as shown in the
report, and, for a missed target, what limits it and what would fix it.
Pure functions of the results dict."""

from __future__ import annotations

import math
from typing import Any

from kvmesh.benchmarks.goodput import ratio_bounds
from kvmesh.benchmarks.why_missed import why_missed, worst_reject

__all__ = [
    "analysis",
    "fmt_goodput",
    "fmt_ratio",
    "overload_targets",
    "replica_loss",
    "routing_targets",
    "targets",
]


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _t(
    name: str,
    target: str,
    value: float | None,
    want: float,
    higher_is_better: bool,
    shown: str,
    why: str = "",
) -> dict:
    """A target's row; ``value`` None (or NaN): not measured, ``why`` says why."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = shown or ("not measured" + (f": {why}" if why else ""))
        return {"name": name, "target": target, "measured": text, "value": None, "met": None}
    met = value >= want if higher_is_better else value <= want
    return {"name": name, "target": target, "measured": shown, "value": value, "met": met}


# Goals of the routing benchmark (issue: router replicas, cache pressure, goodput at an SLO).
# Every one is listed whenever the routing benchmark ran, "not measured" (and
# why) when its systems did not run: a peer not installed, a run that failed,
# a workload or replica count outside this run's plan (``--quick``).
IDEAL_SHARE = 0.90  # precise's hit rate as a share of the pooled-LRU ideal
REPLICA_LOSS_POINTS = 1.0  # hit-rate points the mesh may lose at N nodes against one
REPLICA_TARGET_NS = (3, 5)
GOODPUT_VS_SGLANG = 1.5
GOODPUT_VS_ROUND_ROBIN = 2.5
GOODPUT_TARGET_NS = (1, 3)
TARGET_WORKLOADS = ("chat", "trace")
CONVERGENCE_REAL_S = 1.0  # p99, real processes on this machine
CONVERGENCE_SIM_S = 2.0  # p99, simulated mesh with 1% packet loss
PROXY_SHARE = 0.70  # Generate through a node, as a share of bare grpcio streaming


def _key(family: str, n: int) -> str:
    return family if n == 1 else f"{family}@{n}"


def _hit(res: dict, key: str, wl: str) -> dict | None:
    s = _get(res, "routing", "systems", key, wl)
    return s if isinstance(s, dict) and "hit_rate" in s else None


def _why_missing(res: dict, key: str, wl: str) -> str:
    """Why ``key`` has no figures on ``wl`` in this run."""
    routing = _get(res, "routing") or {}
    if "routing_error" in res and not routing:
        return f"the routing benchmark failed ({res['routing_error']})"
    if wl not in (routing.get("workloads") or {}):
        return f"workload {wl} not run"
    skipped = (routing.get("skipped") or {}).get(key)
    if skipped:
        return skipped
    s = _get(routing, "systems", key, wl)
    if isinstance(s, dict) and s.get("error"):
        return f"{key}: {s['error']}"
    return f"{key} not in this run's plan"


def _ideal_target(res: dict, wl: str) -> dict:
    p = _hit(res, "precise", wl)
    name = f"precise hit rate vs pooled-LRU ideal ({wl})"
    goal = f">= {IDEAL_SHARE:.0%} of one LRU cache of the fleet's blocks"
    if not p or not p.get("pooled_lru_hit_rate"):
        return _t(name, goal, None, IDEAL_SHARE, True, "", _why_missing(res, "precise", wl))
    r = p["hit_rate"] / p["pooled_lru_hit_rate"]
    shown = (
        f"{p['hit_rate']:.3f} / {p['pooled_lru_hit_rate']:.3f} = {r:.0%} "
        f"(Belady {p['belady_hit_rate']:.3f}, infinite {p['ideal_hit_rate']:.3f})"
    )
    return _t(name, goal, r, IDEAL_SHARE, True, shown)


def _vs_sglang_hits(res: dict, wl: str) -> dict:
    p, sg = _hit(res, "precise", wl), _hit(res, "sglang_cache_aware", wl)
    name = f"hit rate vs sglang-router cache_aware ({wl})"
    if not (p and sg):
        why = _why_missing(res, "precise" if not p else "sglang_cache_aware", wl)
        return _t(name, "higher", None, 1e-9, True, "", why)
    dh = p["hit_rate"] - sg["hit_rate"]
    shown = f"{p['hit_rate']:.3f} vs {sg['hit_rate']:.3f} ({dh * 100:+.1f} points)"
    return _t(name, "higher", dh, 1e-9, True, shown)


def replica_loss(res: dict, family: str, n: int, wl: str) -> float | None:
    """Hit-rate points ``family`` loses at ``n`` replicas against one (None: not measured)."""
    one, many = _hit(res, family, wl), _hit(res, _key(family, n), wl)
    if not (one and many):
        return None
    return (one["hit_rate"] - many["hit_rate"]) * 100


def _replica_target(res: dict, n: int, wl: str, peers: list[str]) -> dict:
    name = f"mesh hit-rate loss, {n} nodes vs 1 ({wl})"
    goal = f"<= {REPLICA_LOSS_POINTS:g} point"
    loss = replica_loss(res, "precise", n, wl)
    if loss is None:
        missing = "precise" if _hit(res, "precise", wl) is None else _key("precise", n)
        return _t(name, goal, None, REPLICA_LOSS_POINTS, False, "", _why_missing(res, missing, wl))
    one, many = _hit(res, "precise", wl) or {}, _hit(res, _key("precise", n), wl) or {}
    shown = f"precise {one['hit_rate']:.3f} -> {many['hit_rate']:.3f} ({-loss:+.1f} points)"
    for f in peers:
        other = replica_loss(res, f, n, wl)
        shown += f"; {f} x{n}: " + ("not measured" if other is None else f"{-other:+.1f} points")
    return _t(name, goal, loss, REPLICA_LOSS_POINTS, False, shown)


def _gp(res: dict, wl: str, key: str) -> dict | None:
    g = _get(res, "routing", "goodput", wl, key)
    return g if isinstance(g, dict) else None


def fmt_goodput(g: dict) -> str:
    """A ladder's goodput in x nominal: "1.52x", ">= 2.00x" or "< 0.5x"."""
    if g["below"]:
        return f"< {g['hi']:.2g}x"
    return f"{'>= ' if g['at_least'] else ''}{g['load']:.2f}x"


def fmt_ratio(bounds: tuple[float, float]) -> str:
    low, high = bounds
    if low == high:
        return f"{low:.2f}x"
    if low == 0 and math.isinf(high):
        return "unknown"
    if math.isinf(high):
        return f">= {low:.2f}x"
    if low == 0:
        return f"<= {high:.2f}x"
    return f"{low:.2f}x-{high:.2f}x"


def _goodput_target(res: dict, wl: str, n: int, peer: str, want: float) -> dict:
    label = "sglang-router cache_aware" if peer == "sglang_cache_aware" else peer
    name = f"goodput vs {label} ({wl}, N={n})"
    goal = f">= {want:g}x"
    mine, other = _gp(res, wl, _key("precise", n)), _gp(res, wl, _key(peer, n))
    if not (mine and other):
        why = _why_missing(res, _key("precise" if not mine else peer, n), wl)
        return _t(name, goal, None, want, True, "", why)
    shown = f"{fmt_goodput(mine)} / {fmt_goodput(other)} of nominal"
    bounds = ratio_bounds(mine, other)
    if bounds is None:
        return _t(name, goal, None, want, True, shown + ": neither passed a load tried")
    low, high = bounds
    shown += f" = {fmt_ratio(bounds)}"
    if low >= want:
        return _t(name, goal, low, want, True, shown)
    if high < want:
        return _t(name, goal, high, want, True, shown)
    # The ladders bracket neither side of the goal: a longer search would tell.
    row = _t(name, goal, None, want, True, shown + " (undetermined: the ladders did not bracket it)")
    return {**row, "undetermined": True}


def routing_targets(res: dict) -> list[dict]:
    """The routing benchmark's goals: every one whenever it ran (or failed),
    those whose systems did not run (a peer not installed, a run that
    failed, outside this run's plan) as not measured, with the reason."""
    if "routing" not in res and "routing_error" not in res:
        return []
    plan = _get(res, "routing", "plan") or {}
    peers = [f for f in plan.get("replica_families", ()) if f != "precise"]
    out: list[dict] = []
    for wl in TARGET_WORKLOADS:
        out += [_ideal_target(res, wl), _vs_sglang_hits(res, wl)]
        out += [_replica_target(res, n, wl, peers) for n in REPLICA_TARGET_NS]
        for n in GOODPUT_TARGET_NS:
            out.append(_goodput_target(res, wl, n, "sglang_cache_aware", GOODPUT_VS_SGLANG))
            out.append(_goodput_target(res, wl, n, "round_robin", GOODPUT_VS_ROUND_ROBIN))
    return out


NONOWNER_BLOCKS_S = 5_000_000  # non-owner apply of replicated entries, blocks per second
ENGINES_KEPT_UP = 1000  # engines one node keeps up with at the events rate below
MEMORY_BYTES_PER_BLOCK = 40.0
MEMORY_TARGET_SIZES = (1_000_000, 10_000_000)


def _beside(ix: dict, impl: str, key: str, fmt: str) -> str:
    """``; pure Python <figure>`` (or native), when that implementation ran."""
    r = ix.get(impl) or {}
    label = "pure Python" if impl == "python" else "native"
    if key in r:
        return f"; {label} {fmt.format(r[key])}"
    return f"; {label} not measured" + (f" ({r['skipped']})" if "skipped" in r else "")


def _which(ix: dict) -> str:
    """The implementation the headline figure is of."""
    return str((ix.get("kvmesh") or {}).get("implementation", "python"))


def _ingest_match_targets(res: dict, ix: dict) -> list[dict]:
    ingest, match = "index ingest vs Dynamo RadixTree", "prefix match p99 vs Dynamo RadixTree"
    if "ingest_ratio" not in ix:
        why = _get(ix, "dynamo", "skipped") or res.get("micro_error") or "Dynamo's RadixTree not run"
        return [
            _t(ingest, ">= 3x", None, 3.0, True, "", why),
            _t(match, "<= 0.5x", None, 0.5, False, "", why),
        ]
    k, d, impl = ix["kvmesh"], ix["dynamo"], _which(ix)
    ingest_shown = f"{impl} {k['blocks_per_s']:,.0f} / {d['blocks_per_s']:,.0f} blocks/s"
    pairs = ix.get("ingest_ratio_runs")
    if pairs:  # the target is the median of paired runs' ratios, not the medians' ratio
        ingest_shown += f" (medians); runs side by side {', '.join(f'{r:.2f}x' for r in pairs)}: median"
    ingest_shown += f" = {ix['ingest_ratio']:.2f}x"
    match_shown = (
        f"{impl} {k['match_p99_us']:.0f} µs / {d['match_p99_us']:.0f} µs = {ix['match_p99_ratio']:.2f}x"
    )
    if impl == "native":
        ingest_shown += _beside(ix, "python", "blocks_per_s", "{:,.0f} blocks/s")
        if "ingest_ratio_python" in ix:
            ingest_shown += f" = {ix['ingest_ratio_python']:.2f}x"
        match_shown += _beside(ix, "python", "match_p99_us", "{:.0f} µs")
        if "match_p99_ratio_python" in ix:
            match_shown += f" = {ix['match_p99_ratio_python']:.2f}x"
    return [
        _t(ingest, ">= 3x", ix["ingest_ratio"], 3.0, True, ingest_shown),
        _t(match, "<= 0.5x", ix["match_p99_ratio"], 0.5, False, match_shown),
    ]


def _nonowner_targets(res: dict, ix: dict) -> list[dict]:
    """Apply: the entries decoded and applied to the index (``native``, else
    ``python``). Engines kept up: from the end-to-end rate through the mesh
    state (pycrdt included), the lower and honest one."""
    apply_name = "non-owner apply of replicated entries"
    engines_name = "engines one node keeps up with (3,000 block events/s each, from the non-owner rate)"
    no = ix.get("nonowner") or {}
    paths = no.get("paths") or {}
    apply_goal = f">= {NONOWNER_BLOCKS_S / 1e6:g}M blocks/s"
    engines_goal = f">= {ENGINES_KEPT_UP:,}"
    if "python" not in paths:
        why = res.get("micro_error") or "not in this run"
        return [
            _t(apply_name, apply_goal, None, NONOWNER_BLOCKS_S, True, "", why),
            _t(engines_name, engines_goal, None, ENGINES_KEPT_UP, True, "", why),
        ]
    per = no.get("busy_engine_events_per_s", 3000)
    impl = "native" if "native" in paths else "python"
    e2e = "mesh_native" if "mesh_native" in paths else "mesh_python"

    def rate(name: str) -> float | None:
        r = paths.get(name) or {}
        return r.get("blocks_per_s")

    apply_rate, e2e_rate = rate(impl), rate(e2e)
    shown = f"{impl} {apply_rate:,.0f} blocks/s (end to end through the mesh state: "
    shown += f"{e2e_rate:,.0f})" if e2e_rate else "not measured)"
    if impl == "native":
        shown += f"; pure Python {rate('python'):,.0f}"
    else:
        shown += f"; native not measured ({ix.get('native', {}).get('skipped', 'not built')})"
    engines = f"{e2e_rate / per:,.0f} end to end" if e2e_rate else ""
    if e2e == "mesh_native" and rate("mesh_python"):
        engines += f"; pure Python {rate('mesh_python') / per:,.0f}"
    return [
        _t(apply_name, apply_goal, apply_rate, NONOWNER_BLOCKS_S, True, shown),
        _t(
            engines_name,
            engines_goal,
            e2e_rate / per if e2e_rate else None,
            ENGINES_KEPT_UP,
            True,
            engines,
            "" if e2e_rate else "the end-to-end path was not measured",
        ),
    ]


def _memory_targets(res: dict) -> list[dict]:
    mem = _get(res, "micro", "memory") or {}
    rows = mem.get("rows") or {}
    out = []
    for n in MEMORY_TARGET_SIZES:
        name = f"memory per indexed block, {n // 1_000_000}M blocks over 1,000 engines"
        goal = f"<= {MEMORY_BYTES_PER_BLOCK:g} B"
        cells = {impl: (rows.get(impl) or {}).get(str(n)) or {} for impl in ("native", "python", "dynamo")}
        head = "native" if "bytes_per_block" in cells["native"] else "python"
        r = cells[head]
        if "bytes_per_block" not in r or mem.get("n_engines") != 1000:
            why = r.get("skipped") or res.get("micro_error") or f"{n:,} blocks not in this run's plan"
            out.append(_t(name, goal, None, MEMORY_BYTES_PER_BLOCK, False, "", why))
            continue
        parts = [f"{head} {r['bytes_per_block']:.0f} B"]
        for other, label in (("python", "pure Python"), ("native", "native"), ("dynamo", "Dynamo")):
            if other == head:
                continue
            c = cells[other]
            parts.append(
                f"{label} {c['bytes_per_block']:.0f} B"
                if "bytes_per_block" in c
                else f"{label} {c.get('skipped', 'not measured')}"
            )
        out.append(_t(name, goal, r["bytes_per_block"], MEMORY_BYTES_PER_BLOCK, False, "; ".join(parts)))
    return out


def _micro_targets(res: dict) -> list[dict]:
    if "micro" not in res and "micro_error" not in res:
        return []
    ix = _get(res, "micro", "index") or {}
    return [*_ingest_match_targets(res, ix), *_nonowner_targets(res, ix), *_memory_targets(res)]


def _conv_row(rows: list[dict], n: int, loss: float = 0.0) -> dict | None:
    return next((r for r in rows if r["n"] == n and r.get("loss", 0.0) == loss), None)


def _p99_target(name: str, goal_s: float, row: dict | None, why: str) -> dict:
    if row is None:
        return _t(name, f"<= {goal_s:g} s", None, goal_s, False, "", why)
    v = row["p99"]
    shown = f"{v * 1000:.0f} ms" + (
        f" ({row['missing']} of {row['events']} events never converged)" if row.get("missing") else ""
    )
    if row.get("missing"):
        v = math.inf  # an event that never converged is slower than any goal
    return _t(name, f"<= {goal_s:g} s", v, goal_s, False, shown)


def _convergence_targets(res: dict) -> list[dict]:
    if "convergence" not in res and "convergence_error" not in res:
        return []
    conv = _get(res, "convergence") or {}
    real, sim = conv.get("real", []), conv.get("sim", [])
    why = res.get("convergence_error") or "not in this run's plan"
    return [
        _p99_target("convergence p99, 5 real nodes", CONVERGENCE_REAL_S, _conv_row(real, 5), why),
        _p99_target("convergence p99, 9 real nodes", CONVERGENCE_REAL_S, _conv_row(real, 9), why),
        _p99_target(
            "convergence p99, 100 simulated nodes, 1% loss", CONVERGENCE_SIM_S, _conv_row(sim, 100, 0.01), why
        ),
        _p99_target(
            "convergence p99, 200 simulated nodes, 1% loss", CONVERGENCE_SIM_S, _conv_row(sim, 200, 0.01), why
        ),
    ]


def _proxy_targets(res: dict) -> list[dict]:
    if "proxy" not in res and "proxy_error" not in res:
        return []
    px = _get(res, "proxy") or {}
    name, goal = "Generate proxy vs bare grpcio", f">= {PROXY_SHARE:.0%}"
    if "ratio" not in px:
        return [_t(name, goal, None, PROXY_SHARE, True, "", res.get("proxy_error", ""))]
    shown = (
        f"{px['kvmesh']['requests_per_s']:.0f} / {px['echo']['requests_per_s']:.0f} req/s = {px['ratio']:.0%}"
    )
    cpu = px["kvmesh"].get("server_cpu_ms_per_request")
    if cpu:
        shown += f"; router CPU {cpu:.2f} ms per request"
    return [_t(name, goal, px["ratio"], PROXY_SHARE, True, shown)]


# ``kvmesh bench all`` itself: its default suite, and ``--quick``.
SUITE_SECONDS = 25 * 60
QUICK_SUITE_SECONDS = 4 * 60


def _suite_targets(res: dict) -> list[dict]:
    """How long the suite took, when the run was ``kvmesh bench all`` (its
    meta says so: one section alone has no ``section_s``)."""
    meta = _get(res, "meta") or {}
    if "section_s" not in meta or "duration_s" not in meta:
        return []
    quick = bool(meta.get("quick"))
    limit = QUICK_SUITE_SECONDS if quick else SUITE_SECONDS
    name = "suite length, kvmesh bench all" + (" --quick" if quick else "")
    took = float(meta["duration_s"])
    failed = sorted(k.removesuffix("_error") for k in res if k.endswith("_error"))
    if failed:  # a section that failed ended early: the length says nothing
        return [
            _t(name, f"under {limit // 60} minutes", None, limit, False, "", f"{', '.join(failed)} failed")
        ]
    return [_t(name, f"under {limit // 60} minutes", took, limit, False, f"{took:.0f} s")]


def targets(res: dict) -> list[dict]:
    """Every target with its measured value and verdict (``met`` None: not measured)."""
    return [
        *routing_targets(res),
        *_micro_targets(res),
        *_convergence_targets(res),
        *overload_targets(_get(res, "overload") or {}),
        *_proxy_targets(res),
        *_suite_targets(res),
    ]


OVERLOAD_MEMORY_SLACK = 0.10  # "memory flat": every level ends within this of the ladder's start
OVERLOAD_GOODPUT_FLOOR = 0.90  # goodput at the top of the ladder, as a share of goodput at 1x
OVERLOAD_REJECT_MS = 50.0  # p99 of the time to tell a client its request was shed


def _levels(ov: dict, scenario: str) -> list[dict]:
    return _get(ov, "scenarios", scenario, "levels") or []


def _scenarios(ov: dict, mesh: bool) -> list[str]:
    """The names of the one-node scenario (``mesh`` False) or of the mesh ones."""
    return [n for n, sc in (_get(ov, "scenarios") or {}).items() if (sc.get("nodes", 1) > 1) == mesh]


def _all_levels(ov: dict) -> list[tuple[str, dict]]:
    return [(name, lv) for name in (_get(ov, "scenarios") or {}) for lv in _levels(ov, name)]


def _no_cancelled(ov: dict) -> dict:
    per: dict[str, list[int]] = {}
    for name, lv in _all_levels(ov):
        bad, sent = per.setdefault(name, [0, 0])
        per[name] = [bad + lv["statuses"]["CANCELLED"] + lv["statuses"]["UNKNOWN"], sent + lv["sent"]]
    shown = "; ".join(f"{name}: {b:,} of {n:,} calls" for name, (b, n) in per.items())
    total = sum(b for b, _ in per.values()) if per else None
    return _t("overload: CANCELLED or UNKNOWN calls", "none, at every level", total, 0, False, shown)


def _goodput_kept(single: list[dict]) -> dict | None:
    if len(single) < 2 or single[0]["k"] != 1 or not single[0]["goodput_rps"]:
        return None
    lo, hi = single[0], single[-1]
    r = hi["goodput_rps"] / lo["goodput_rps"]
    return _t(
        f"overload: goodput at {hi['k']:g}x vs 1x (1 node)",
        f">= {OVERLOAD_GOODPUT_FLOOR:.0%} of 1x",
        r,
        OVERLOAD_GOODPUT_FLOOR,
        True,
        f"{hi['goodput_rps']:.1f} / {lo['goodput_rps']:.1f} req/s = {r:.0%}",
    )


def _reject_p99(ov: dict) -> dict | None:
    found = worst_reject(ov)
    if found is None:
        return None
    name, worst = found
    v = worst["reject_p99_ms"]
    return _t(
        "overload: shed requests answered, p99",
        f"< {OVERLOAD_REJECT_MS:g} ms at every level",
        v,
        OVERLOAD_REJECT_MS,
        False,
        f"worst {v:.1f} ms ({name}, {worst['k']:g}x)",
    )


def _memory_flat(single: list[dict]) -> dict | None:
    if not single:
        return None
    start = single[0]["rss"]["start_mb"][0]
    worst = max(single, key=lambda lv: lv["rss"]["end_mb"][0])
    end = worst["rss"]["end_mb"][0]
    growth = end / start - 1 if start else None
    return _t(
        "overload: router memory flat (1 node)",
        f"every level ends within {OVERLOAD_MEMORY_SLACK:.0%} of the RSS at the start of 1x",
        growth,
        OVERLOAD_MEMORY_SLACK,
        False,
        f"{start:.0f} MB -> {end:.0f} MB after {worst['k']:g}x ({growth:+.0%})" if growth is not None else "",
    )


def _mesh_stable(ov: dict) -> dict | None:
    mesh = _scenarios(ov, mesh=True)
    levels = [lv for name in mesh for lv in _levels(ov, name)]
    if not levels:
        return None
    nodes = [n for lv in levels for n in lv["nodes"]]
    suspect = sum(n["member_events"].get("suspect", 0) for n in nodes)
    dead = sum(n["member_events"].get("dead", 0) for n in nodes)
    refuted = sum(n["incarnation_bumps"] for n in nodes)
    return _t(
        f"overload: mesh membership stable ({mesh[0]})",
        "no suspect or dead member, no refutation",
        suspect + dead + refuted,
        0,
        False,
        f"{suspect} suspect, {dead} dead, {refuted} refutations over {len(levels)} levels",
    )


def overload_targets(ov: dict) -> list[dict]:
    """The overload benchmark's goals (``res["overload"]``)."""
    if not ov:
        return []
    single = next((_levels(ov, n) for n in _scenarios(ov, mesh=False)), [])
    found = [
        _no_cancelled(ov),
        _goodput_kept(single),
        _reject_p99(ov),
        _memory_flat(single),
        _mesh_stable(ov),
    ]
    return [t for t in found if t is not None]


def analysis(res: dict) -> str:
    """Why each missed target was missed and what would fix it."""
    out = []
    for t in targets(res):
        if t["met"] is not False:
            continue
        why = why_missed(res, t)
        if why:
            out.append(f"- **{t['name']}** ({t['measured']}; goal {t['target']}): {why}")
    return "\n".join(out)
