"""`kvmesh bench ...`: benchmarks an operator can rerun.

``kvmesh bench all`` runs the whole suite and writes docs/benchmarks.md,
docs/benchmarks.json and docs/img/*.png; the other subcommands run one part
and print its tables (``--json PATH`` saves its figures). ``--quick`` is a
short smoke run of the same code (fewer requests, systems and sizes).

Speed targets are checked here, never by timed unit tests: each run measures
in one process, on this machine, and reports the figures it got.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MOONCAKE = REPO_ROOT.parent / "shared" / "data" / "mooncake" / "conversation_trace.jsonl"
WORKLOADS = ("chat", "agent", "trace", "nosharing")
QUICK_SYSTEMS = "round_robin,cache_aware_approx,precise,precise_mesh3,sglang_cache_aware"


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    ix = sub.add_parser("index", help="prefix index alone: store throughput and match latency at ~1M blocks")
    ix.add_argument("--blocks", type=int, default=1_000_000, help="distinct blocks in the index")
    ix.add_argument("--workers", type=int, default=64, help="engines (workers) holding them")
    ix.add_argument("--prompt-blocks", type=int, default=128, help="blocks per matched prompt")
    ix.add_argument("--queries", type=int, default=5_000, help="match calls timed")
    ix.add_argument("--seed", type=int, default=0)
    ix.add_argument("--json", action="store_true", help="print the figures as JSON")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--quick", action="store_true", help="short smoke run (under 3 minutes for `all`)")
        sp.add_argument("--seed", type=int, default=0, help="workload seed (same seed, same workload)")

    def routing_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--workload",
            default=",".join(WORKLOADS),
            help=f"comma-separated workloads: {', '.join(WORKLOADS)} (default: all; --quick: chat,trace)",
        )
        sp.add_argument(
            "--systems",
            default="",
            help="comma-separated systems (default: all; --quick: " + QUICK_SYSTEMS + "); known: "
            "round_robin, random, consistent_hash, least_load, power_of_two, cache_aware_approx, "
            "precise, precise_mesh3, sglang_cache_aware, sglang_round_robin",
        )
        sp.add_argument(
            "--mooncake",
            default=str(DEFAULT_MOONCAKE),
            help="path of the Mooncake conversation_trace.jsonl (default: ../shared/data/mooncake/ "
            "relative to the repository)",
        )
        sp.add_argument("--engines", type=int, default=8, help="simulated engines (default 8)")
        sp.add_argument(
            "--num-gpu-blocks",
            type=int,
            default=4000,
            help="KV cache of each engine, in 16-token blocks (default 4000)",
        )
        sp.add_argument(
            "--trace-load",
            type=float,
            default=1.0,
            help="trace replay speed: offered prompt tokens/s as a multiple of the fleet's prefill "
            "capacity (default 1.0)",
        )
        sp.add_argument("--chat-rate", type=float, default=12.0, help="chat sessions arriving per second")
        sp.add_argument(
            "--router-arg",
            action="append",
            default=[],
            metavar="ARG",
            help="extra flag for every kvmesh router, repeatable; use the = form: "
            "--router-arg=--policy-opt=precise.overlap_weight=2",
        )

    a = sub.add_parser("all", help="the whole suite; writes docs/benchmarks.md, .json and docs/img/*.png")
    common(a)
    routing_flags(a)
    a.add_argument(
        "--docs", default=str(REPO_ROOT / "docs"), help="output folder (default: the repo's docs/)"
    )
    r = sub.add_parser("routing", help="hit rate, TTFT, throughput of every system on the workloads")
    common(r)
    routing_flags(r)
    for name, text in (
        ("micro", "index ingest and match vs Dynamo's RadixTree; decision latency per policy"),
        ("convergence", "gossip convergence vs mesh size (real processes and simulation)"),
        ("proxy", "Generate proxy throughput vs a bare grpcio server"),
    ):
        sp = sub.add_parser(name, help=text)
        common(sp)
    for sp in (r, *[sub.choices[n] for n in ("micro", "convergence", "proxy")]):
        sp.add_argument(
            "--json", dest="json_out", default="", metavar="PATH", help="also save the figures here"
        )


def _note(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:
        print(msg, file=sys.stderr, flush=True)


class _Bar:
    """A tqdm bar fed one finished request at a time."""

    def __init__(self, label: str, total: int) -> None:
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="req", leave=False, file=sys.stderr)
        except ImportError:
            self._bar = None

    def __call__(self, _rec: object) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def build_workloads(args: argparse.Namespace, capacity_tokens_per_s: float) -> list:
    from kvmesh import workloads as W

    names = [w.strip() for w in args.workload.split(",") if w.strip()]
    if args.quick and args.workload == ",".join(WORKLOADS):
        names = ["chat", "trace"]
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        raise SystemExit(f"unknown workload(s) {bad}; known: {', '.join(WORKLOADS)}")
    q = args.quick
    out = []
    for n in names:
        if n == "chat":
            out.append(
                W.chat_workload(
                    n_sessions=40 if q else 96,
                    rate=args.chat_rate,
                    seed=args.seed,
                    turns=(3, 6) if q else (4, 10),
                )
            )
        elif n == "agent":
            out.append(W.agent_workload(n_sessions=16 if q else 40, rate=4.0, seed=args.seed))
        elif n == "nosharing":
            out.append(W.no_sharing_workload(n_requests=60 if q else 100, rate=12.0, seed=args.seed))
        elif n == "trace":
            path = args.mooncake
            if not os.path.isfile(path):
                raise SystemExit(f"Mooncake trace not found at {path}; pass --mooncake PATH")
            recs = W.load_mooncake(path, limit=250 if q else 800)
            out.append(
                W.mooncake_workload(
                    recs,
                    tokens_per_block=32,
                    target_tokens_per_s=args.trace_load * capacity_tokens_per_s,
                    seed=args.seed,
                )
            )
    return out


def run_routing_cmd(args: argparse.Namespace) -> dict:
    from kvmesh.benchmarks.routing import SYSTEMS, FleetConfig, run_routing

    systems = [
        s.strip()
        for s in (args.systems or (QUICK_SYSTEMS if args.quick else ",".join(SYSTEMS))).split(",")
        if s.strip()
    ]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise SystemExit(f"unknown system(s) {bad}; known: {', '.join(SYSTEMS)}")
    cfg = FleetConfig(
        engines=args.engines,
        num_gpu_blocks=args.num_gpu_blocks,
        router_args=tuple(getattr(args, "router_arg", ())),
    )
    wls = build_workloads(args, cfg.prefill_tokens_per_s)
    return run_routing(wls, systems, cfg, progress=_Bar, note=_note, probes=8 if args.quick else 20)


def run_micro_cmd(args: argparse.Namespace) -> dict:
    from kvmesh.benchmarks.micro import bench_decisions, bench_ingest_and_match

    n = 200_000 if args.quick else 1_000_000
    return {
        "index": bench_ingest_and_match(n, 64, 128, 1000 if args.quick else 5000, args.seed, note=_note),
        "decisions": bench_decisions(n=1000 if args.quick else 5000, seed=args.seed),
    }


def run_convergence_cmd(args: argparse.Namespace) -> dict:
    from kvmesh.benchmarks.convergence import run_convergence

    sim = [10, 50, 100] if args.quick else [10, 25, 50, 100, 200]
    return run_convergence([3, 5], sim, 8 if args.quick else 30, note=_note)


def run_proxy_cmd(args: argparse.Namespace) -> dict:
    from kvmesh.benchmarks.proxy import run_proxy

    return run_proxy(seconds=3.0 if args.quick else 8.0)


def _print_md(res: dict) -> None:
    from kvmesh.benchmarks.report import render_markdown

    print(render_markdown(res))


def run(args: argparse.Namespace) -> int:
    if args.bench == "index":
        from kvmesh.benchmarks.index import bench_index

        res = bench_index(
            n_blocks=args.blocks,
            n_workers=args.workers,
            prompt_blocks=args.prompt_blocks,
            n_queries=args.queries,
            seed=args.seed,
        )
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            for k, v in res.items():
                print(f"{k:>32}: {v:,.2f}" if isinstance(v, float) else f"{k:>32}: {v}")
        return 0
    if args.bench == "all":
        return run_all(args)
    part = {
        "routing": run_routing_cmd,
        "micro": run_micro_cmd,
        "convergence": run_convergence_cmd,
        "proxy": run_proxy_cmd,
    }[args.bench]
    res = {args.bench: part(args)}
    _print_md(res)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1, default=str))
    return 0


def write_docs(res: dict, docs: Path) -> None:
    """benchmarks.md, benchmarks.json and img/*.png from a results dict."""
    from kvmesh.benchmarks.report import render_markdown, targets, write_plots

    res["targets"] = targets(res)
    docs.mkdir(parents=True, exist_ok=True)
    write_plots(res, str(docs / "img"))
    commands = (
        "kvmesh bench all            # this page, docs/benchmarks.json, docs/img/*.png\n"
        "kvmesh bench all --quick    # smoke run\n"
        "kvmesh bench routing --workload chat,trace --systems precise,round_robin\n"
        "kvmesh bench micro | convergence | proxy | index"
    )
    (docs / "benchmarks.md").write_text(render_markdown(res, commands))
    (docs / "benchmarks.json").write_text(json.dumps(res, indent=1, default=str))


def run_all(args: argparse.Namespace) -> int:
    from kvmesh.benchmarks.report import machine_info

    t0 = time.time()
    res: dict = {
        "meta": {
            "command": "kvmesh " + " ".join(sys.argv[1:])
            if sys.argv[0].endswith("kvmesh")
            else "kvmesh bench all" + (" --quick" if args.quick else ""),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            **machine_info(),
        }
    }
    for name, fn in (
        ("micro", run_micro_cmd),
        ("convergence", run_convergence_cmd),
        ("proxy", run_proxy_cmd),
        ("routing", run_routing_cmd),
    ):
        _note(f"== {name} ==")
        t = time.time()
        try:
            res[name] = fn(args)
        except Exception as e:
            res[name + "_error"] = f"{type(e).__name__}: {e}"
            _note(f"== {name} FAILED: {res[name + '_error']} ==")
        _note(f"== {name} done in {time.time() - t:.0f}s ==")
    res["meta"]["duration_s"] = time.time() - t0
    docs = Path(args.docs)
    write_docs(res, docs)
    for t in res["targets"]:
        verdict = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        print(f"{verdict:>6}  {t['name']}: {t['measured']} (goal {t['target']})")
    print(
        f"wrote {docs / 'benchmarks.md'}, {docs / 'benchmarks.json'}, {docs / 'img'} in {time.time() - t0:.0f}s"
    )
    return 0
