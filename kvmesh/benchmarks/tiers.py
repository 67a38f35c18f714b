"""``kvmesh bench tiers``: what an engine's host tier is worth, and what the
router adds by crediting it.

The same chat workload runs three times in front of fresh simulated engines
whose GPU caches hold only part of its working set (cache pressure), behind
one router node with the ``precise`` policy:

1. ``no host tier``: an evicted block is gone; a later turn recomputes it.
2. ``host tier, tier-blind router``: each engine keeps evicted blocks in a
   host tier (``--num-host-blocks``) and loads them back instead of
   recomputing (their copy charged in its timing model); the router indexes
   them but credits them nothing (``precise.host_tier_weight=0``), so it
   routes on GPU blocks alone.
3. ``host tier``: the same engines, the router crediting host blocks with
   the policy's default weight.

Per setup it reports the prompt tokens found on each tier as the engines
counted them (``/admin/stats``: GPU hits, host-tier loads, over prompt
tokens looked up), client-side TTFT, and the blocks the router's index held
per tier at the end (``ListEngines``). Figures go to a section of
docs/benchmarks.md between the markers :data:`BEGIN` and :data:`END` (the
section is replaced, the rest of the page kept) and to docs/img/tiers.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from blocks.hashing import DEFAULT_BLOCK_SIZE

__all__ = [
    "BEGIN",
    "END",
    "SETUPS",
    "Setup",
    "TiersConfig",
    "configure_parser",
    "quick",
    "render_markdown",
    "replace_section",
    "run",
    "run_tiers",
    "sizing",
    "tier_rates",
]

BEGIN = "<!-- tiers:begin -->"
END = "<!-- tiers:end -->"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    host_tier: bool  # engines keep evicted blocks in a host tier
    router_args: tuple[str, ...] = ()


SETUPS: tuple[Setup, ...] = (
    Setup("no host tier", False),
    Setup("host tier, tier-blind router", True, ("--policy-opt", "precise.host_tier_weight=0")),
    Setup("host tier", True),
)


@dataclass(frozen=True)
class TiersConfig:
    """The fleet and workload of ``kvmesh bench tiers``."""

    engines: int = 3
    sessions: int = 96
    session_rate: float = 2.0  # chat sessions starting per second (Poisson)
    # Between a session's turns: long enough for many sessions to be open at
    # once, so the working set is several times the longest request.
    think_s: float = 8.0
    turns: tuple[int, int] = (4, 8)
    user_tokens: tuple[int, int] = (100, 300)
    max_tokens: int = 32
    # The fleet's GPU caches hold this share of the workload's working set
    # (never under its longest request per engine) ...
    gpu_share: float = 0.25
    # ... and its host tiers this share, so GPU and host together hold it all.
    host_share: float = 1.0
    time_scale: float = 1.0
    seed: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE

    def workload(self) -> Any:
        from kvmesh.workloads import chat_workload

        return chat_workload(
            n_sessions=self.sessions,
            rate=self.session_rate,
            think_s=self.think_s,
            max_tokens=self.max_tokens,
            seed=self.seed,
            turns=self.turns,
            user_tokens=self.user_tokens,
        )


def quick(cfg: TiersConfig) -> TiersConfig:
    """A short smoke run of the same code."""
    return replace(cfg, engines=2, sessions=24, think_s=2.0)


def sizing(cfg: TiersConfig, workload: Any) -> dict[str, int]:
    """Each engine's GPU and host blocks for ``workload`` (see :class:`TiersConfig`)."""
    from kvmesh.benchmarks.ideals import lru_working_set_blocks, request_blocks

    reqs = request_blocks(workload.planned_requests(0.5), cfg.block_size)
    ws = lru_working_set_blocks(reqs, block_size=cfg.block_size)
    longest = max((len(r.blocks) for r in reqs), default=1)
    answer = math.ceil(cfg.max_tokens / cfg.block_size) + 1
    gpu = max(math.ceil(cfg.gpu_share * ws / cfg.engines), longest + answer)
    host = max(math.ceil(cfg.host_share * ws / cfg.engines), 1)
    return {
        "working_set_blocks": ws,
        "longest_request_blocks": longest,
        "gpu_blocks": gpu,
        "host_blocks": host,
    }


def tier_rates(engine_stats: list[dict[str, Any]]) -> dict[str, float]:
    """Prompt tokens found on the GPU and loaded from the host tier, over
    those looked up, summed over the engines' ``/admin/stats``."""
    queried = sum(int(s["prefix_query_tokens"]) for s in engine_stats)
    gpu = sum(int(s["prefix_hit_tokens"]) for s in engine_stats)
    host = sum(int(s.get("host_hit_tokens", 0)) for s in engine_stats)
    if not queried:
        return {"gpu": 0.0, "host": 0.0, "total": 0.0}
    return {"gpu": gpu / queried, "host": host / queried, "total": (gpu + host) / queried}


# --- one setup (I/O) ---------------------------------------------------------------------------


async def _index_by_tier(addr: str) -> dict[str, int]:
    """Blocks the node's index holds per tier, all engines (ListEngines)."""
    from kvmesh.client import ONE_NODE, aio_channel
    from kvmesh_pb.v1 import router_pb2 as pb
    from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

    async with aio_channel(addr, tls=False, config=ONE_NODE) as ch:
        resp = await pb_grpc.AdminStub(ch).ListEngines(pb.ListEnginesRequest())
    out: dict[str, int] = {}
    for e in resp.engines:
        for tier, n in e.cached_blocks_by_tier.items():
            out[tier] = out.get(tier, 0) + n
    return out


def _run_setup(setup: Setup, cfg: TiersConfig, size: dict[str, int], workload: Any) -> dict[str, Any]:
    from kvmesh import procs
    from kvmesh.benchmarks.driver import GrpcTarget, run_workload, ttft_p90_all
    from kvmesh.stats import percentile

    host = size["host_blocks"] if setup.host_tier else 0
    args = [
        "--num-gpu-blocks", str(size["gpu_blocks"]),
        "--num-host-blocks", str(host),
        "--time-scale", str(cfg.time_scale),
        "--seed", str(cfg.seed),
        "--block-size", str(cfg.block_size),
        "--kv-buffer-steps", "2000",
        "--log-level", "warning",
    ]  # fmt: skip
    engines: list[procs.Proc] = []
    router = None
    try:
        engines += [procs.start_sim_engine(f"tiers-e{i}", args) for i in range(cfg.engines)]
        flags = [procs.engine_flag(f"e{i}", p, block_size=cfg.block_size) for i, p in enumerate(engines)]
        extra = ["--policy", "precise", "--log-level", "warning", "--seed", str(cfg.seed), *setup.router_args]
        router = procs.start_router("tiers-router", flags, extra)
        addr = router.info["grpc"]
        urls = [p.info["url"] for p in engines]
        records, wall, sampler = asyncio.run(run_workload(GrpcTarget([addr]), workload, urls))
        stats = asyncio.run(_gather_stats(urls))
        indexed = asyncio.run(_index_by_tier(addr))
    finally:
        if router is not None:
            router.stop()
        for p in engines:
            p.stop()
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_ms for r in ok]
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "setup": setup.name,
        "router_args": list(setup.router_args),
        "gpu_blocks_per_engine": size["gpu_blocks"],
        "host_blocks_per_engine": host,
        "requests": len(records),
        "failed": len(records) - len(ok),
        "hit_rate": tier_rates(stats),
        "client_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p90_ms": percentile(ttft, 90),
        "ttft_p90_all_ms": ttft_p90_all(records),
        "gpu_evictions": sum(int(s["evictions"]) for s in stats),
        "host_evictions": sum(int(s.get("host_evictions", 0)) for s in stats),
        "index_blocks_by_tier": indexed,
        "imbalance_inflight": sampler.imbalance(),
        "errors": sorted({r.error for r in records if not r.ok})[:5],
        "wall_s": wall,
    }


async def _gather_stats(urls: list[str]) -> list[dict[str, Any]]:
    """Every engine's ``/admin/stats``."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def one(url: str) -> dict[str, Any]:
            async with http.get(f"{url}/admin/stats") as r:
                r.raise_for_status()
                got: dict[str, Any] = await r.json()
                return got

        return list(await asyncio.gather(*(one(u) for u in urls)))


def run_tiers(cfg: TiersConfig, note: Callable[[str], None] = print) -> dict[str, Any]:
    """Every setup of :data:`SETUPS` on ``cfg``; the figures as a dict."""
    workload = cfg.workload()
    size = sizing(cfg, workload)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    results = []
    for setup in SETUPS:
        note(f"tiers: {setup.name} ({workload.requests} requests) ...")
        results.append(_run_setup(setup, cfg, size, workload))
    return {
        "config": asdict(cfg),
        "workload": {"name": workload.name, "requests": workload.requests, **workload.params},
        "sizing": size,
        "setups": results,
        "started": started,
        "duration_s": time.perf_counter() - t0,
    }


# --- report ----------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def render_markdown(res: dict[str, Any], command: str) -> str:
    """The section of docs/benchmarks.md, markers included."""
    cfg, size, wl = res["config"], res["sizing"], res["workload"]
    lines = [
        BEGIN,
        "## Cache tiers: an engine's host tier, and the router crediting it",
        "",
        f"`{command}`, started {res['started']}, {res['duration_s']:.0f} s. "
        f"{cfg['engines']} simulated engines (`time_scale` {cfg['time_scale']:g}) behind one router node "
        f"(`precise`); workload `chat`: {wl['requests']} requests in {wl['sessions']} sessions "
        f"arriving at {wl['session_rate_per_s']:g}/s, {wl['think_s']:g} s between turns, seed {cfg['seed']}. "
        f"Cache pressure: the workload's LRU working set is {size['working_set_blocks']:,} blocks; each "
        f"engine's GPU cache holds {size['gpu_blocks']:,} (the fleet: "
        f"{cfg['engines'] * size['gpu_blocks'] / size['working_set_blocks']:.0%} of it) and, where it has "
        f"one, its host tier {size['host_blocks']:,} more. Each setup starts from fresh engines.",
        "",
        "Hit rates are the engines' own counts (`/admin/stats`): prompt tokens found on the GPU, and "
        "loaded from the host tier instead of recomputed, over prompt tokens looked up. TTFT is "
        "client-side (send to first token). `index host` is the blocks the router's index held on "
        "the host tier at the end (`ListEngines`).",
        "",
        "| setup | GPU hit rate | host hit rate | total hit rate | TTFT p50 ms | TTFT p90 ms "
        "| GPU evictions | host evictions | index host | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in res["setups"]:
        hr = s["hit_rate"]
        host_idx = s["index_blocks_by_tier"].get("host", 0)
        lines.append(
            f"| {s['setup']} | {_pct(hr['gpu'])} | {_pct(hr['host'])} | {_pct(hr['total'])} "
            f"| {_ms(s['ttft_p50_ms'])} | {_ms(s['ttft_p90_ms'])} | {s['gpu_evictions']:,} "
            f"| {s['host_evictions']:,} | {host_idx:,} | {s['failed']} |"
        )
    for s in res["setups"]:
        if s["failed"]:
            first = s["errors"][0] if s["errors"] else "?"
            lines += ["", f"`{s['setup']}`: {s['failed']} requests failed, the first with `{first}`."]
    by = {s["setup"]: s for s in res["setups"]}
    base, blind, full = (by.get(x.name) for x in SETUPS)
    if base and full and base["ttft_p90_ms"] and full["ttft_p90_ms"]:
        lines += [
            "",
            f"With the host tier, TTFT p90 is {full['ttft_p90_ms'] / base['ttft_p90_ms']:.2f}x that "
            f"without one; the tier-blind router gets "
            f"{(blind['ttft_p90_ms'] / base['ttft_p90_ms']) if blind and blind['ttft_p90_ms'] else 0:.2f}x "
            "(ratios of one run on one machine).",
        ]
    lines += ["", "![hit rate by tier and TTFT p90](img/tiers.png)", END]
    return "\n".join(lines) + "\n"


def replace_section(page: str, section: str) -> str:
    """``page`` with its tiers section (between :data:`BEGIN` and :data:`END`)
    replaced by ``section``, or ``section`` appended when it has none."""
    start, end = page.find(BEGIN), page.find(END)
    if start >= 0 and end > start:
        return page[:start] + section.rstrip("\n") + page[end + len(END) :]
    return page.rstrip("\n") + "\n\n" + section


def write_plot(res: dict[str, Any], path: Path) -> None:
    """Hit rate stacked by tier, and TTFT p50/p90, per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = res["setups"]
    names = [s["setup"].replace(", ", ",\n") for s in setups]
    xs = range(len(setups))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    gpu = [s["hit_rate"]["gpu"] for s in setups]
    host = [s["hit_rate"]["host"] for s in setups]
    ax.bar(xs, gpu, label="GPU")
    ax.bar(xs, host, bottom=gpu, label="host tier")
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("prompt tokens cached")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Hit rate by tier")
    w = 0.38
    bx.bar([x - w / 2 for x in xs], [s["ttft_p50_ms"] or 0 for s in setups], w, label="p50")
    bx.bar([x + w / 2 for x in xs], [s["ttft_p90_ms"] or 0 for s in setups], w, label="p90")
    bx.set_xticks(list(xs), names, fontsize=8)
    bx.set_ylabel("TTFT (ms)")
    bx.legend(fontsize=8)
    bx.set_title("TTFT")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line ------------------------------------------------------------------------------


def configure_parser(p: argparse.ArgumentParser) -> None:
    """``kvmesh bench tiers``'s flags; it runs itself (``run``)."""
    d = TiersConfig()
    p.add_argument("--quick", action="store_true", help="short smoke run (fewer engines and sessions)")
    p.add_argument("--seed", type=int, default=d.seed, help="workload seed (same seed, same requests)")
    p.add_argument("--engines", type=int, default=d.engines, help=f"simulated engines (default {d.engines})")
    p.add_argument("--sessions", type=int, default=d.sessions, help=f"chat sessions (default {d.sessions})")
    p.add_argument(
        "--gpu-share",
        type=float,
        default=d.gpu_share,
        help=f"the fleet's GPU caches as a share of the working set (default {d.gpu_share:g})",
    )
    p.add_argument(
        "--host-share",
        type=float,
        default=d.host_share,
        help=f"the fleet's host tiers as a share of the working set (default {d.host_share:g})",
    )
    p.add_argument(
        "--docs",
        default=str(REPO_ROOT / "docs"),
        help="write the section of DOCS/benchmarks.md and DOCS/img/tiers.png here ('' : print only)",
    )
    p.add_argument("--json", dest="json_out", default="", metavar="PATH", help="also save the figures here")
    p.set_defaults(_run=run)


def run(args: argparse.Namespace) -> int:
    cfg = TiersConfig(
        engines=args.engines,
        sessions=args.sessions,
        gpu_share=args.gpu_share,
        host_share=args.host_share,
        seed=args.seed,
    )
    if args.quick:
        cfg = quick(cfg)
    res = run_tiers(cfg, note=lambda m: print(m, file=sys.stderr, flush=True))
    command = "kvmesh " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("kvmesh") else "kvmesh bench tiers"
    section = render_markdown(res, command)
    print(section)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1, default=str))
    if args.docs:
        docs = Path(args.docs)
        page = docs / "benchmarks.md"
        page.write_text(replace_section(page.read_text() if page.exists() else "", section))
        write_plot(res, docs / "img" / "tiers.png")
        print(f"wrote {page} (section {BEGIN}) and {docs / 'img' / 'tiers.png'}", file=sys.stderr)
    return 0
