"""PNG plots of benchmark results (docs/img/*.png): hit rate and TTFT p90 per
system and workload, gossip convergence against mesh size. matplotlib is
imported only when plots are written (the ``bench`` extra); the helpers take
``pyplot`` as an argument for that reason."""

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
    return paths
