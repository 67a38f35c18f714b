"""PNG plots of benchmark results (docs/img/*.png): hit rate and TTFT p90 per
system and workload, hit rate and TTFT p90 against router replicas, TTFT p90
against offered load (the goodput search), gossip convergence against mesh
size, goodput and shed rate against offered load (overload). matplotlib is
imported only when plots are written (the ``bench`` extra); the helpers take
``pyplot`` as an argument for that reason."""

from __future__ import annotations

import os
from typing import Any

from kvmesh.benchmarks.report import FAMILY_LABELS, system_label

__all__ = ["write_plots"]


def _colour(key: str) -> str:
    """One colour per system family in every plot (a replica count changes the line style)."""
    family = key.partition("@")[0]
    names = list(FAMILY_LABELS)
    return f"C{names.index(family) % 10}" if family in names else "C9"


def _save(plt: Any, fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _system_plot(plt: Any, routing: dict, metric: str, ylabel: str, path: str) -> str:
    """Bars of ``metric`` per single-instance system, one colour per workload."""
    sysd = routing["systems"]
    wls = list(routing["workloads"])
    names = [n for n in sysd if "@" not in n and any(metric in (sysd[n].get(w) or {}) for w in wls)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(wls)
    for j, w in enumerate(wls):
        vals = [(sysd[n].get(w) or {}).get(metric, 0.0) for n in names]
        ax.bar([i + j * width for i in range(len(names))], vals, width, label=w)
        if metric == "hit_rate":
            ref = (sysd.get("precise") or {}).get(w) or {}
            for key, style in (("pooled_lru_hit_rate", "dashed"), ("ideal_hit_rate", "dotted")):
                if ref.get(key):
                    ax.hlines(ref[key], -0.4, len(names), colors=f"C{j}", linestyles=style, linewidth=1)
    ax.set_xticks([i + width * (len(wls) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels([system_label(n) for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if metric == "ttft_p90_ms":
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1)
    extra = " (dashed: one pooled LRU cache; dotted: one infinite cache)" if metric == "hit_rate" else ""
    ax.set_title(ylabel + extra, fontsize=10)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _plain_log(ax: Any, axis: str = "y") -> None:
    """A log axis labelled with plain numbers (100, 1000), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _pos: f"{v:g}")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(fmt)
    target.set_minor_formatter(FuncFormatter(lambda _v, _pos: ""))


def _replicas_plot(plt: Any, routing: dict, path: str) -> str:
    """Per workload: hit rate and TTFT p90 against the number of router replicas."""
    plan = routing.get("plan") or {}
    ns = list(plan.get("replicas", ()))
    wls = list(routing["workloads"])
    sysd = routing["systems"]
    fig, axes = plt.subplots(2, len(wls), figsize=(5.5 * len(wls), 7), squeeze=False)
    for j, w in enumerate(wls):
        top = 0.0
        for f in plan.get("replica_families", ()):
            pts = [
                (n, s)
                for n in ns
                if (s := (sysd.get(f if n == 1 else f"{f}@{n}") or {}).get(w)) and "hit_rate" in s
            ]
            if not pts:
                continue
            x = [n for n, _ in pts]
            label = FAMILY_LABELS.get(f, f)
            hits = [s["hit_rate"] for _, s in pts]
            top = max(top, *hits)
            axes[0][j].plot(x, hits, marker="o", color=_colour(f), label=label)
            axes[1][j].plot(x, [s["ttft_p90_ms"] for _, s in pts], marker="o", color=_colour(f), label=label)
        ref = (sysd.get("precise") or {}).get(w) or {}
        if ref.get("pooled_lru_hit_rate"):
            top = max(top, ref["pooled_lru_hit_rate"])
            axes[0][j].axhline(
                ref["pooled_lru_hit_rate"],
                color="grey",
                linestyle="--",
                linewidth=1,
                label="pooled LRU ideal",
            )
        axes[0][j].set_ylim(0, top * 1.15 or 1.0)
        axes[0][j].set_title(f"{w}: hit rate", fontsize=10)
        axes[1][j].set_title(f"{w}: TTFT p90 (ms, log)", fontsize=10)
        axes[1][j].set_yscale("log")
        _plain_log(axes[1][j])
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks(ns)
            ax.set_xlabel("router replicas (N)")
        axes[0][j].legend(fontsize=7)
    return _save(plt, fig, path)


def _goodput_plot(plt: Any, routing: dict, path: str) -> str:
    """Per workload: TTFT p90 (every request) and the share within the SLO
    against offered load; the SLO and 90% as lines."""
    from matplotlib.ticker import FuncFormatter

    ladder = routing.get("ladder") or {}
    slo = (routing.get("plan") or {}).get("slo_ms")
    wls = list(ladder)
    fig, axes = plt.subplots(2, len(wls), figsize=(6 * len(wls), 7.5), squeeze=False)
    for j, w in enumerate(wls):
        ax, share_ax = axes[0][j], axes[1][j]
        loads = sorted({p["load"] for pts in ladder[w].values() for p in pts})
        over = [p["ttft_p90_all_ms"] for pts in ladder[w].values() for p in pts if p.get("ttft_p90_all_ms")]
        ceiling = max([*over, slo or 0.0]) * 1.5 or 1.0
        for key, pts in ladder[w].items():
            style = "-" if "@" not in key else "--"
            c = _colour(key)
            pts = sorted(pts, key=lambda p: p["load"])
            xs = [p["load"] for p in pts]
            # Failures reaching the p90: drawn at the top as open markers.
            ys = [p.get("ttft_p90_all_ms") or ceiling for p in pts]
            ax.plot(xs, ys, style, color=c, label=system_label(key))
            ax.scatter(
                xs,
                ys,
                edgecolors=c,
                facecolors=[c if p.get("ttft_p90_all_ms") else "none" for p in pts],
                zorder=3,
            )
            share_ax.plot(xs, [100 * (p.get("within_slo") or 0.0) for p in pts], style, marker="o", color=c)
        if slo:
            ax.axhline(slo, color="grey", linestyle=":", linewidth=1, label=f"SLO {slo:g} ms")
        share_ax.axhline(90, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        _plain_log(ax)
        ax.set_ylabel("TTFT p90, every request (ms)")
        ax.set_title(f"{w}: TTFT p90 vs load (open marker: failures reach the p90)", fontsize=9)
        ax.legend(fontsize=7)
        share_ax.set_ylim(0, 101)
        share_ax.set_ylabel("% of requests within the SLO")
        share_ax.set_title(f"{w}: share within the SLO (goodput where it crosses 90%)", fontsize=9)
        for a in (ax, share_ax):
            a.set_xscale("log", base=2)
            a.set_xticks(loads)
            a.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"x{v:.2g}"))
            a.xaxis.set_minor_formatter(FuncFormatter(lambda _v, _pos: ""))
            a.set_xlabel("offered load (x nominal)")
    return _save(plt, fig, path)


def _convergence_plot(plt: Any, conv: dict, path: str) -> str:
    """p50 and p99 against mesh size: real processes, and the simulation per packet loss."""
    fig, ax = plt.subplots(figsize=(7, 4))
    series: list[tuple[str, str, list[dict]]] = [("real", "o", conv.get("real", []))]
    for loss in sorted({r.get("loss", 0.0) for r in conv.get("sim", [])}):
        rows = [r for r in conv.get("sim", []) if r.get("loss", 0.0) == loss]
        series.append((f"sim, {loss:.0%} loss", "s", rows))
    for j, (label, mark, rows) in enumerate(series):
        rs = sorted(rows, key=lambda r: r["n"])
        if not rs:
            continue
        x = [r["n"] for r in rs]
        ax.plot(x, [r["p50"] * 1000 for r in rs], marker=mark, color=f"C{j}", label=f"{label} p50")
        ax.plot(
            x, [r["p99"] * 1000 for r in rs], marker=mark, color=f"C{j}", linestyle="--", label=f"{label} p99"
        )
    ax.set_xscale("log")
    _plain_log(ax, "x")
    ax.set_xlabel("mesh size (nodes)")
    ax.set_ylabel("event -> every node's index (ms)")
    ax.set_title("Gossip convergence vs mesh size")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _overload_plot(plt: Any, ov: dict, path: str) -> str:
    """Goodput (left axis) and shed rate (right axis) against offered load, per scenario."""
    fig, ax = plt.subplots(figsize=(7, 4))
    shed_ax = ax.twinx()
    cap = (ov.get("capacity") or {}).get("rps") or 0.0
    ks: set[float] = set()
    top = cap
    for j, sc in enumerate(ov.get("scenarios", {}).values()):
        levels = sc.get("levels") or []
        if not levels:
            continue
        label = "1 node" if sc.get("nodes", 1) == 1 else f"{sc['nodes']}-node mesh"
        x = [lv["k"] for lv in levels]
        ks.update(x)
        good = [lv["goodput_rps"] for lv in levels]
        top = max(top, *good)
        ax.plot(x, good, marker="o", color=f"C{j}", label=f"goodput, {label}")
        shed = [lv["shed_rate"] * 100 for lv in levels]
        shed_ax.plot(x, shed, marker="s", linestyle="--", color=f"C{j}", label=f"shed, {label}")
    if cap:
        ax.axhline(cap, color="grey", linestyle=":", linewidth=1, label="capacity (closed loop)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ks), [f"{k:g}x" for k in sorted(ks)])
    ax.set_xlabel("offered load (x capacity)")
    ax.set_ylabel("goodput (OK req/s)")
    ax.set_ylim(0, top * 1.2 or 1.0)
    shed_ax.set_ylabel("shed (% of calls, dashed)")
    shed_ax.set_ylim(0, 100)
    lines, labels = ax.get_legend_handles_labels()
    shed_lines, shed_labels = shed_ax.get_legend_handles_labels()
    ax.legend(lines + shed_lines, labels + shed_labels, fontsize=7, loc="center left")
    ax.set_title("Overload: goodput and shed rate vs offered load")
    return _save(plt, fig, path)


def write_plots(res: dict, outdir: str) -> list[str]:
    """Every plot the results have, as PNG files in ``outdir``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    paths: list[str] = []
    routing = res.get("routing") or {}
    if routing.get("systems") and routing.get("workloads"):
        for metric, fname, ylabel in (
            ("hit_rate", "hit_rate.png", "prefix hit rate"),
            ("ttft_p90_ms", "ttft_p90.png", "TTFT p90 (ms, log)"),
        ):
            paths.append(_system_plot(plt, routing, metric, ylabel, os.path.join(outdir, fname)))
        if len((routing.get("plan") or {}).get("replicas", ())) > 1:
            paths.append(_replicas_plot(plt, routing, os.path.join(outdir, "replicas.png")))
    if (routing.get("ladder") or {}) and any(routing["ladder"].values()):
        paths.append(_goodput_plot(plt, routing, os.path.join(outdir, "goodput.png")))
    conv = res.get("convergence") or {}
    if conv.get("real") or conv.get("sim"):
        paths.append(_convergence_plot(plt, conv, os.path.join(outdir, "convergence.png")))
    ov = res.get("overload") or {}
    if any(sc.get("levels") for sc in ov.get("scenarios", {}).values()):
        paths.append(_overload_plot(plt, ov, os.path.join(outdir, "overload.png")))
    return paths
