"""`make demo`: simulated engines and a router on this machine, one chat
workload run once per policy, the same engines and the same sessions.

Between runs every engine's cache is cleared (``AllBlocksCleared`` reaches the
router as a KV event, so the index empties too), so each policy starts cold.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp
import grpc

from kvmesh import procs
from kvmesh.loadgen import RunResult, run_sessions
from kvmesh.v1 import router_pb2 as pb
from kvmesh.v1 import router_pb2_grpc as pb_grpc
from kvmesh.workloads import chat, total_requests


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=int, default=4, help="simulated engines to start")
    p.add_argument("--policies", default="round_robin,precise", help="comma-separated policies to compare")
    p.add_argument("--sessions", type=int, default=64, help="chat sessions (4-10 turns each)")
    p.add_argument("--concurrency", type=int, default=24, help="sessions in flight at once")
    p.add_argument("--num-gpu-blocks", type=int, default=1200, help="KV cache size of each engine, in 16-token blocks")
    p.add_argument("--time-scale", type=float, default=1.0, help="simulated engine time scale (1 = real GPU speed)")
    p.add_argument("--seed", type=int, default=7)


async def _clear_engines(urls: list[str], router: str) -> None:
    async with aiohttp.ClientSession() as http:
        for u in urls:
            async with http.post(f"{u}/admin/clear") as r:
                r.raise_for_status()
    async with grpc.aio.insecure_channel(router) as ch:
        admin = pb_grpc.AdminStub(ch)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            stats = await admin.GetStats(pb.GetStatsRequest())
            if stats.index_entries == 0:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("router index did not empty after the engines cleared their caches")


def _print_table(results: list[RunResult]) -> None:
    cols = ["policy", "requests", "failed", "hit_rate", "ttft_p50_ms", "ttft_p90_ms", "latency_p50_ms",
            "throughput_rps", "output_tps", "imbalance"]
    print("  ".join(f"{c:>14}" for c in cols))
    for r in results:
        s = r.summary()
        row = [r.policy] + [f"{s[c]:.3f}" if isinstance(s[c], float) else str(s[c]) for c in cols[1:]]
        print("  ".join(f"{v:>14}" for v in row))


def run(args: argparse.Namespace) -> int:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    sessions = chat(n_sessions=args.sessions, seed=args.seed)
    print(f"kvmesh demo: {args.engines} simulated engines ({args.num_gpu_blocks} blocks of 16 tokens each), "
          f"1 router, {len(sessions)} chat sessions / {total_requests(sessions)} requests per policy, "
          f"{args.concurrency} concurrent sessions", flush=True)
    engines: list[procs.Proc] = []
    router = None
    results: list[RunResult] = []
    try:
        t0 = time.monotonic()
        for i in range(args.engines):
            engines.append(procs.start_sim_engine(
                f"engine-{i}",
                ["--num-gpu-blocks", str(args.num_gpu_blocks), "--time-scale", str(args.time_scale),
                 "--seed", str(args.seed + i)],
            ))
        router = procs.start_router(
            "router-0", [procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)],
            ["--policy", "precise", "--log-level", "warning"],
        )
        addr = router.info["grpc"]
        print(f"started {args.engines} engines and a router at {addr} in {time.monotonic() - t0:.1f}s", flush=True)
        for policy in policies:
            asyncio.run(_clear_engines([p.info["url"] for p in engines], addr))
            done = 0

            def progress(_rec) -> None:  # noqa: ANN001
                nonlocal done
                done += 1
                if done % 50 == 0:
                    print(f"  {policy}: {done} requests", flush=True)

            res = asyncio.run(run_sessions([addr], sessions, policy=policy,
                                           concurrency=args.concurrency, on_request=progress))
            s = res.summary()
            print(f"{policy}: {s['requests']} requests in {s['wall_s']:.1f}s, hit rate {s['hit_rate']:.3f}, "
                  f"TTFT p90 {s['ttft_p90_ms']:.1f} ms", flush=True)
            results.append(res)
    finally:
        if router is not None:
            router.stop()
        for p in engines:
            p.stop()
    print()
    _print_table(results)
    print()
    failed = False
    for r in results:
        s = r.summary()
        failed |= s["failed"] > 0
        print(f"RESULT policy={r.policy} hit_rate={s['hit_rate']:.4f} ttft_p50_ms={s['ttft_p50_ms']:.1f} "
              f"ttft_p90_ms={s['ttft_p90_ms']:.1f} throughput_rps={s['throughput_rps']:.2f} "
              f"output_tps={s['output_tps']:.1f} requests={s['requests']} failed={s['failed']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(argparse.ArgumentParser().parse_args()))
