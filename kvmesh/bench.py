"""`kvmesh bench ...`: benchmarks an operator can rerun.

Speed targets are checked here, never by timed unit tests: each run measures
in one process, on this machine, and reports the figures it got.
"""

from __future__ import annotations

import argparse
import json


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    ix = sub.add_parser("index", help="prefix index: store throughput and match latency at ~1M blocks")
    ix.add_argument("--blocks", type=int, default=1_000_000, help="distinct blocks in the index")
    ix.add_argument("--workers", type=int, default=64, help="engines (workers) holding them")
    ix.add_argument("--prompt-blocks", type=int, default=128, help="blocks per matched prompt")
    ix.add_argument("--queries", type=int, default=5_000, help="match calls timed")
    ix.add_argument("--seed", type=int, default=0)
    ix.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    if args.bench == "index":
        from router.bench_index import bench_index

        res = bench_index(n_blocks=args.blocks, n_workers=args.workers,
                          prompt_blocks=args.prompt_blocks, n_queries=args.queries, seed=args.seed)
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            for k, v in res.items():
                print(f"{k:>32}: {v:,.2f}" if isinstance(v, float) else f"{k:>32}: {v}")
        return 0
    raise SystemExit(f"unknown benchmark {args.bench!r}")
