"""`make demo`: simulated engines and a mesh of router nodes on this machine,
one chat workload run once per policy, the same engines and the same
sessions: round_robin and precise through one node, then precise with the
requests spread over every node of the mesh (what a DNS load balancer does).

Between runs every engine's cache is cleared (``AllBlocksCleared`` reaches the
router as a KV event, so the index empties too), so each policy starts cold.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter

import aiohttp

from engine_adapters.sim_engine.timing import TimingConfig
from kvmesh import procs
from kvmesh.client import AsyncClient
from kvmesh.loadgen import RequestRecord, RunResult, run_sessions
from kvmesh.workloads import CHAT_TURNS, Session, chat, total_requests


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=int, default=4, help="simulated engines to start (default: %(default)s)")
    p.add_argument(
        "--policies",
        default="round_robin,precise",
        help="comma-separated policies to compare, through node 0 (default: %(default)s)",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=3,
        help="router nodes in the mesh; >1 adds a precise run spread over all (default: %(default)s)",
    )
    p.add_argument(
        "--sessions",
        type=int,
        default=64,
        help=f"chat sessions, {CHAT_TURNS[0]}-{CHAT_TURNS[1]} turns each (default: %(default)s)",
    )
    p.add_argument(
        "--concurrency", type=int, default=24, help="sessions in flight at once (default: %(default)s)"
    )
    p.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=1200,
        help="KV cache size of each engine, in 16-token blocks (default: %(default)s)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=TimingConfig().time_scale,
        help="simulated engine time scale, 1 = real GPU speed (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=7, help="workload and engine seed (default: %(default)s)")


async def _clear_engines(urls: list[str], routers: list[str]) -> None:
    async with aiohttp.ClientSession() as http:
        for u in urls:
            async with http.post(f"{u}/admin/clear") as r:
                r.raise_for_status()
    for router in routers:  # the clear reaches every node's index through the mesh
        async with AsyncClient(router, tls=False) as node:
            deadline = time.monotonic() + 10.0
            while (await node.stats()).index_entries:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"index of {router} did not empty after the engines cleared their caches"
                    )
                await asyncio.sleep(0.05)


def _print_table(results: list[tuple[int, RunResult]]) -> None:
    cols = [
        "requests",
        "failed",
        "hit_rate",
        "ttft_p50_ms",
        "ttft_p90_ms",
        "latency_p50_ms",
        "throughput_rps",
        "output_tps",
        "imbalance",
    ]
    print("  ".join(f"{c:>14}" for c in ["policy", "nodes", *cols]))
    for nodes, r in results:
        s = r.summary()
        row = [r.policy, str(nodes)] + [f"{s[c]:.3f}" if isinstance(s[c], float) else str(s[c]) for c in cols]
        print("  ".join(f"{v:>14}" for v in row))
    print()
    print(_LEGEND)


_LEGEND = """\
nodes: router nodes the requests were spread over. hit_rate: prompt tokens the
engines found in their KV cache / prompt tokens sent. ttft: time to first token,
at the client. latency: send to last token. throughput_rps / output_tps:
answered requests / generated tokens per second of the run. imbalance: requests
of the busiest engine / the mean over the engines that served (1 = even)."""


def conclusion(results: list[tuple[int, dict[str, float], str]]) -> list[str]:
    """What the runs show, from their own figures: ``(nodes, summary, policy)``
    per run. Each policy through one node against round_robin, then precise
    spread over the mesh against precise through one node. A run with a
    failed request is compared with none: its FAILED lines say why."""
    usable = [(n, s, p) for n, s, p in results if not s.get("failed") and s["ttft_p90_ms"] > 0]
    one = {policy: s for nodes, s, policy in usable if nodes == 1}
    lines = []
    base = one.get("round_robin")
    for policy, s in one.items():
        if base is None or policy == "round_robin":
            continue
        ratio = base["ttft_p90_ms"] / s["ttft_p90_ms"]
        lines.append(
            f"{policy} vs round_robin through one node: hit rate {s['hit_rate']:.3f} vs "
            f"{base['hit_rate']:.3f}, TTFT p90 {s['ttft_p90_ms']:.0f} vs {base['ttft_p90_ms']:.0f} ms "
            + (f"({ratio:.1f}x lower)" if ratio >= 1 else f"({1 / ratio:.1f}x higher)")
        )
    single = one.get("precise")
    for nodes, s, policy in usable:
        if nodes > 1 and policy == "precise" and single is not None:
            lines.append(
                f"precise spread over {nodes} nodes vs one node: hit rate {s['hit_rate']:.3f} vs "
                f"{single['hit_rate']:.3f} ({100 * (s['hit_rate'] - single['hit_rate']):+.1f} points); "
                "every node routes from the same replicated index"
            )
    return lines


def _start_fleet(args: argparse.Namespace, engines: list[procs.Proc], routers: list[procs.Proc]) -> None:
    """Start the engines and the router nodes into the given lists (the caller stops them)."""
    t0 = time.monotonic()
    for i in range(args.engines):
        engines.append(
            procs.start_sim_engine(
                f"engine-{i}",
                [
                    "--num-gpu-blocks",
                    str(args.num_gpu_blocks),
                    "--time-scale",
                    str(args.time_scale),
                    "--seed",
                    str(args.seed + i),
                ],
            )
        )
    routers.append(
        procs.start_router(
            "router-0",
            [procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)],
            ["--policy", "precise", "--log-level", "warning"],
        )
    )
    for n in range(1, args.nodes):
        routers.append(
            procs.start_router(
                f"router-{n}", [], ["--join", routers[0].info["grpc"], "--log-level", "warning"]
            )
        )
    addrs = [r.info["grpc"] for r in routers]
    print(
        f"started {args.engines} engines and {len(routers)} router nodes ({', '.join(addrs)}) "
        f"in {time.monotonic() - t0:.1f}s",
        flush=True,
    )


class _Progress:
    """Prints a line every 100 finished requests."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.done = 0

    def __call__(self, _rec: RequestRecord) -> None:
        self.done += 1
        if self.done % 100 == 0:
            print(f"  {self.label}: {self.done} requests", flush=True)


def _run_policy(
    policy: str,
    targets: list[str],
    routers: list[str],
    engines: list[procs.Proc],
    sessions: list[Session],
    concurrency: int,
) -> RunResult:
    """One run from cold caches: clear every engine (and see every router's
    index empty), then every session through ``targets``."""
    asyncio.run(_clear_engines([p.info["url"] for p in engines], routers))
    label = f"{policy} via {len(targets)} node{'s' if len(targets) > 1 else ''}"
    res = asyncio.run(
        run_sessions(targets, sessions, policy=policy, concurrency=concurrency, on_request=_Progress(label))
    )
    s = res.summary()
    print(
        f"{label}: {s['requests']} requests in {s['wall_s']:.1f}s, hit rate {s['hit_rate']:.3f}, "
        f"TTFT p90 {s['ttft_p90_ms']:.1f} ms",
        flush=True,
    )
    return res


def _print_results(results: list[tuple[int, RunResult]]) -> bool:
    """The table and one RESULT line per run; True if any request failed."""
    print()
    _print_table(results)
    print()
    failed = False
    for nodes, r in results:
        s = r.summary()
        failed |= s["failed"] > 0
        why = Counter(rec.error for rec in r.records if not rec.ok)
        for error, n in why.most_common(5):  # what an operator needs to act on
            print(f"FAILED policy={r.policy} nodes={nodes} count={n} error={error}", flush=True)
        print(
            f"RESULT policy={r.policy} nodes={nodes} hit_rate={s['hit_rate']:.4f} "
            f"ttft_p50_ms={s['ttft_p50_ms']:.1f} ttft_p90_ms={s['ttft_p90_ms']:.1f} "
            f"throughput_rps={s['throughput_rps']:.2f} output_tps={s['output_tps']:.1f} "
            f"requests={s['requests']} failed={s['failed']}",
            flush=True,
        )
    for line in conclusion([(nodes, r.summary(), r.policy) for nodes, r in results]):
        print(f"CONCLUSION {line}", flush=True)
    return failed


def run(args: argparse.Namespace) -> int:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    sessions = chat(n_sessions=args.sessions, seed=args.seed)
    print(
        f"kvmesh demo: {args.engines} simulated engines ({args.num_gpu_blocks} blocks of 16 tokens each), "
        f"{args.nodes} router nodes, {len(sessions)} chat sessions / {total_requests(sessions)} requests "
        f"per policy, {args.concurrency} concurrent sessions",
        flush=True,
    )
    engines: list[procs.Proc] = []
    routers: list[procs.Proc] = []
    results: list[tuple[int, RunResult]] = []
    try:
        _start_fleet(args, engines, routers)
        addrs = [r.info["grpc"] for r in routers]
        runs = [(p, addrs[:1]) for p in policies]
        if len(addrs) > 1:
            runs.append(("precise", addrs))
        for policy, targets in runs:
            res = _run_policy(policy, targets, addrs, engines, sessions, args.concurrency)
            results.append((len(targets), res))
    finally:
        for p in routers + engines:
            p.stop()
    return 1 if _print_results(results) else 0


if __name__ == "__main__":  # pragma: no cover
    _parser = argparse.ArgumentParser(prog="python -m kvmesh.demo")
    configure_parser(_parser)
    sys.exit(run(_parser.parse_args()))
