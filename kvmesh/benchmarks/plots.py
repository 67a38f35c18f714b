"""PNG plots of benchmark results (docs/img/*.png): hit rate and TTFT p90 per
system and workload, gossip convergence against mesh size, goodput and shed
rate against offered load. matplotlib is imported only when plots are written
(the ``bench`` extra); the helpers take ``pyplot`` as an argument for that
reason."""

from __future__ import annotations

import os
from typing import Any

from kvmesh.benchmarks.report import SYSTEM_LABELS

__all__ = ["write_plots"]


def _save(plt: Any, fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _system_plot(plt: Any, routing: dict, metric: str, ylabel: str, path: str) -> str:
    """Bars of ``metric`` per system, one colour per workload."""
    sysd = routing["systems"]
    wls = list(routing["workloads"])
    names = [n for n in sysd if any(w in sysd[n] for w in wls)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(wls)
    for j, w in enumerate(wls):
        vals = [sysd[n].get(w, {}).get(metric, 0.0) for n in names]
        ax.bar([i + j * width for i in range(len(names))], vals, width, label=w)
        if metric == "hit_rate":
            ideal = (sysd.get("precise", {}).get(w) or {}).get("ideal_hit_rate")
            if ideal:
                ax.hlines(ideal, -0.4, len(names), colors=f"C{j}", linestyles="dashed", linewidth=1)
    ax.set_xticks([i + width * (len(wls) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels([SYSTEM_LABELS.get(n, n) for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if metric == "ttft_p90_ms":
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1)
    ax.set_title(ylabel + (" (dashed: ideal, one infinite cache)" if metric == "hit_rate" else ""))
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _convergence_plot(plt: Any, conv: dict, path: str) -> str:
    """p50 and p99 against mesh size, real processes and simulation."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, mark in (("real", "o"), ("sim", "s")):
        rs = sorted(conv.get(kind, []), key=lambda r: r["n"])
        if rs:
            ax.plot([r["n"] for r in rs], [r["p50"] * 1000 for r in rs], marker=mark, label=f"{kind} p50")
            ax.plot(
                [r["n"] for r in rs],
                [r["p99"] * 1000 for r in rs],
                marker=mark,
                linestyle="--",
                label=f"{kind} p99",
            )
    ax.set_xscale("log")
    ax.set_xlabel("mesh size (nodes)")
    ax.set_ylabel("event -> every node's index (ms)")
    ax.set_title("Gossip convergence vs mesh size")
    ax.legend(fontsize=8)
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
    conv = res.get("convergence") or {}
    if conv.get("real") or conv.get("sim"):
        paths.append(_convergence_plot(plt, conv, os.path.join(outdir, "convergence.png")))
    ov = res.get("overload") or {}
    if any(sc.get("levels") for sc in ov.get("scenarios", {}).values()):
        paths.append(_overload_plot(plt, ov, os.path.join(outdir, "overload.png")))
    return paths
