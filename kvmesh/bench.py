"""`kvmesh bench ...`: benchmarks an operator can rerun.

``kvmesh bench all`` runs the whole suite and writes docs/benchmarks.md,
docs/benchmarks.json and docs/img/*.png; the other subcommands run one part
and print its tables (``--json PATH`` saves its figures). ``--quick`` is a
short smoke run of the same code (fewer requests, systems and sizes).
``kvmesh bench report`` measures nothing: it rewrites docs/benchmarks.md from
docs/benchmarks.json, e.g. after a hand-written page in docs/evidence/ changed.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kvmesh.workloads import DEFAULT_SPLIT, SPLITS, Workload

if TYPE_CHECKING:
    from kvmesh.benchmarks.routing import RoutingPlan

REPO_ROOT = Path(__file__).resolve().parent.parent
# The Mooncake trace is an input the user downloads; by default it is looked
# for in a data folder next to the repository's own folder.
DEFAULT_MOONCAKE = REPO_ROOT.parent / "shared" / "data" / "mooncake" / "conversation_trace.jsonl"
MOONCAKE_SOURCE = "https://github.com/kvcache-ai/Mooncake (FAST25-release/traces/conversation_trace.jsonl)"
WORKLOADS = ("chat", "agent", "trace", "nosharing")
DEFAULT_WORKLOADS = "chat,trace"


# Gossip convergence: real meshes of these sizes, then simulated (nodes, packet loss).
CONVERGENCE_REAL, QUICK_CONVERGENCE_REAL = [5, 9], [5]
CONVERGENCE_SIM = [(10, 0.0), (50, 0.0), (100, 0.0), (100, 0.01), (100, 0.05), (200, 0.01), (200, 0.05)]
QUICK_CONVERGENCE_SIM = [(100, 0.01)]
SIM_EVENTS, QUICK_SIM_EVENTS = 20, 10


@dataclass(frozen=True)
class WorkloadSizes:
    """How big each workload of ``kvmesh bench routing`` is."""

    # Sessions arrive over a longer time than one lasts, so a faster timeline
    # (the goodput ladder) means more sessions at once, not only sooner ones.
    chat_sessions: int = 64
    chat_turns: tuple[int, int] = (2, 5)
    # A user's pause between turns: the history waits in the caches meanwhile.
    chat_think_s: float = 2.0
    # More shared prompts than engines: the fleet cannot keep each on every engine.
    chat_system_prompts: int = 16
    agent_sessions: int = 40
    nosharing_requests: int = 100
    trace_records: int = 800


QUICK_SIZES = WorkloadSizes(
    chat_sessions=40,
    chat_turns=(2, 4),
    chat_think_s=1.5,
    agent_sessions=16,
    nosharing_requests=60,
    trace_records=400,
)


def _index_flags(ix: argparse.ArgumentParser) -> None:
    from kvmesh.benchmarks.index import IndexBenchShape

    d = IndexBenchShape()
    ix.add_argument("--blocks", type=int, default=d.n_blocks, help="distinct blocks in the index")
    ix.add_argument("--workers", type=int, default=d.n_workers, help="engines (workers) holding them")
    ix.add_argument("--prompt-blocks", type=int, default=d.prompt_blocks, help="blocks per matched prompt")
    ix.add_argument("--queries", type=int, default=d.n_queries, help="match calls timed")
    ix.add_argument("--seed", type=int, default=d.seed)
    ix.add_argument("--json", action="store_true", help="print the figures as JSON")


def _overload_flags(o: argparse.ArgumentParser) -> None:
    from kvmesh.benchmarks.overload import OverloadConfig

    d = OverloadConfig()
    o.add_argument(
        "--router-python",
        default=d.router_python,
        metavar="PATH",
        help="run the router nodes with this Python (e.g. an older checkout's virtualenv) while the "
        "engines and the client stay these (default: this one)",
    )
    o.add_argument(
        "--router-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for every router node, repeatable; use the = form: --router-arg=--max-queue-wait=2",
    )
    o.add_argument(
        "--mesh",
        action=argparse.BooleanOptionalAction,
        default=d.mesh_nodes > 1,
        help=f"also run the ladder through a {d.mesh_nodes}-node mesh (default: %(default)s)",
    )


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _routing_flags(sp: argparse.ArgumentParser) -> None:
    from kvmesh.benchmarks.routing import QUICK, SYSTEMS, FleetConfig, RoutingPlan

    fleet, plan = FleetConfig(), RoutingPlan()

    def join(xs: tuple[object, ...]) -> str:
        return ",".join(str(x) for x in xs) or "none"

    sp.add_argument(
        "--workload",
        default=DEFAULT_WORKLOADS,
        help=f"comma-separated workloads: {', '.join(WORKLOADS)} (default: %(default)s)",
    )
    sp.add_argument(
        "--systems",
        default="",
        help="comma-separated systems at the nominal load, FAMILY or FAMILY@N for N replicas, beside "
        f"the replicas table's (default: {join(tuple(plan.systems))}; "
        f"--quick: {join(tuple(QUICK.systems))}); "
        "given, the replicas table and the goodput search keep only these families unless "
        "--replica-systems / --ladder-systems say otherwise; families: " + ", ".join(SYSTEMS),
    )
    sp.add_argument(
        "--replicas",
        type=_ints,
        default=None,
        help=f"router replica counts of the replicas table (default {join(plan.replicas)}; "
        f"--quick: {join(QUICK.replicas)})",
    )
    sp.add_argument(
        "--replica-systems",
        default="",
        help=f"families of the replicas table (default {join(plan.replica_families)}; "
        f"--quick: {join(QUICK.replica_families)})",
    )
    sp.add_argument(
        "--ladder-systems",
        default="",
        help=f"families whose goodput is searched (default {join(plan.ladder_families)}; "
        f"--quick: {join(QUICK.ladder_families)})",
    )
    sp.add_argument(
        "--ladder-replicas",
        type=_ints,
        default=None,
        help=f"replica counts of the goodput search (default {join(plan.ladder_replicas)}; "
        f"--quick: {join(QUICK.ladder_replicas)})",
    )
    sp.add_argument(
        "--ladder-steps",
        type=int,
        default=None,
        help=f"runs per goodput curve, the nominal load's included; 1: none beyond it "
        f"(default {plan.ladder_steps}; --quick: {QUICK.ladder_steps})",
    )
    sp.add_argument(
        "--slo-ms",
        type=float,
        default=plan.slo_ms,
        help="TTFT p90 (every request sent, failures as misses of it) a goodput run must stay under "
        "(default %(default)s)",
    )
    sp.add_argument(
        "--pressure",
        type=float,
        default=fleet.pressure,
        help="the fleet's KV caches hold this share of each workload's working set (0: every engine "
        "gets --num-gpu-blocks) (default %(default)s)",
    )
    sp.add_argument(
        "--split",
        choices=sorted(SPLITS),
        default=DEFAULT_SPLIT,
        help="workload seed and trace slice (policy defaults are chosen on `tuning`, reported on "
        "`heldout`): "
        + "; ".join(f"{k}: seed {v.seed}, trace from record {v.trace_offset}" for k, v in SPLITS.items())
        + " (default %(default)s)",
    )
    sp.add_argument(
        "--mooncake",
        default=str(DEFAULT_MOONCAKE),
        metavar="PATH",
        help="the Mooncake conversation trace for the `trace` workload: an input you provide, "
        f"downloaded from {MOONCAKE_SOURCE} (default: %(default)s)",
    )
    sp.add_argument(
        "--engines", type=int, default=fleet.engines, help="simulated engines (default %(default)s)"
    )
    sp.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=fleet.num_gpu_blocks,
        help=f"KV cache of each engine with --pressure 0, in {fleet.block_size}-token blocks "
        "(default %(default)s)",
    )
    sp.add_argument(
        "--trace-load",
        type=float,
        default=0.75,
        help="trace replay speed: offered prompt tokens/s as a multiple of the fleet's prefill "
        "capacity (default %(default)s)",
    )
    sp.add_argument(
        "--chat-rate",
        type=float,
        default=5.0,
        help="chat sessions arriving per second at the nominal load (default %(default)s)",
    )
    sp.add_argument(
        "--router-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for every kvmesh router, repeatable; use the = form: "
        "--router-arg=--policy-opt=precise.overlap_weight=2",
    )


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    _index_flags(
        sub.add_parser("index", help="prefix index alone: store throughput and match latency at ~1M blocks")
    )

    def common(sp: argparse.ArgumentParser, seed_help: str = "seed (same seed, same run)") -> None:
        sp.add_argument("--quick", action="store_true", help="short smoke run (under 4 minutes for `all`)")
        sp.add_argument("--seed", type=int, default=0, help=seed_help)

    a = sub.add_parser("all", help="the whole suite; writes docs/benchmarks.md, .json and docs/img/*.png")
    common(a, "seed of the micro, overload and reliability parts (routing: --split)")
    _routing_flags(a)
    a.add_argument(
        "--docs", default=str(REPO_ROOT / "docs"), help="output folder (default: the repo's docs/)"
    )
    r = sub.add_parser(
        "routing",
        help="hit rate, TTFT, throughput of every system on the workloads under cache pressure; router "
        "replicas; goodput at an SLO",
    )
    r.add_argument("--quick", action="store_true", help="short smoke run")
    _routing_flags(r)
    for name, text in (
        (
            "micro",
            "owner ingest, non-owner apply, match and memory per block, native and pure Python vs "
            "Dynamo's RadixTree; decision latency per policy",
        ),
        ("convergence", "gossip convergence vs mesh size (real processes and simulation)"),
        ("proxy", "Generate proxy throughput vs a bare grpcio server"),
    ):
        sp = sub.add_parser(name, help=text)
        common(sp)
    o = sub.add_parser(
        "overload",
        help="offered load at 1x-16x the fleet's capacity: outcomes by status, goodput, shedding, memory",
    )
    common(o)
    _overload_flags(o)
    rel = sub.add_parser(
        "reliability",
        help="faults caused on purpose (engine and router kills, a restart, a lost batch, bad input, "
        "churn): writes DOCS/reliability.md and DOCS/reliability.json",
    )
    common(rel)
    rel.add_argument(
        "--docs", default=str(REPO_ROOT / "docs"), help="output folder (default: the repo's docs/)"
    )
    for sp in (r, *[sub.choices[n] for n in ("micro", "convergence", "proxy", "overload", "reliability")]):
        sp.add_argument(
            "--json", dest="json_out", default="", metavar="PATH", help="also save the figures here"
        )
    from kvmesh.benchmarks.tiers import configure_parser as tiers_parser  # it runs itself (_run)

    tiers_parser(
        sub.add_parser(
            "tiers",
            help="hit rate by cache tier and TTFT with and without the engines' host tier, under cache "
            "pressure: writes its section of DOCS/benchmarks.md and DOCS/img/tiers.png",
        )
    )
    report = sub.add_parser(
        "report",
        help="measure nothing: rewrite DOCS/benchmarks.md from DOCS/benchmarks.json and DOCS/evidence/*.md",
    )
    report.add_argument(
        "--docs", default=str(REPO_ROOT / "docs"), help="docs folder (default: the repo's docs/)"
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


def check_trace(args: argparse.Namespace) -> None:
    """A clear error, before anything runs, when the `trace` workload's input is missing."""
    if "trace" in _csv(args.workload) and not os.path.isfile(args.mooncake):
        raise SystemExit(
            f"Mooncake trace not found at {args.mooncake}; download it from {MOONCAKE_SOURCE} "
            "and pass --mooncake PATH (or leave `trace` out of --workload)"
        )


def build_workloads(args: argparse.Namespace, capacity_tokens_per_s: float) -> list[Workload]:
    """The workloads of ``args.workload``, sized for --quick or not, on the --split's seed and slice."""
    from kvmesh import workloads

    names = _csv(args.workload)
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        raise SystemExit(f"unknown workload(s) {bad}; known: {', '.join(WORKLOADS)}")
    size = QUICK_SIZES if args.quick else WorkloadSizes()
    split = SPLITS[args.split]
    seed = split.seed
    out = []
    for n in names:
        if n == "chat":
            out.append(
                workloads.chat_workload(
                    n_sessions=size.chat_sessions,
                    rate=args.chat_rate,
                    seed=seed,
                    turns=size.chat_turns,
                    think_s=size.chat_think_s,
                    n_system_prompts=size.chat_system_prompts,
                )
            )
        elif n == "agent":
            out.append(workloads.agent_workload(n_sessions=size.agent_sessions, rate=4.0, seed=seed))
        elif n == "nosharing":
            out.append(
                workloads.no_sharing_workload(n_requests=size.nosharing_requests, rate=12.0, seed=seed)
            )
        elif n == "trace":
            check_trace(args)
            recs = workloads.load_mooncake(args.mooncake, limit=size.trace_records, offset=split.trace_offset)
            out.append(
                workloads.mooncake_workload(
                    recs,
                    tokens_per_block=32,
                    target_tokens_per_s=args.trace_load * capacity_tokens_per_s,
                    seed=seed,
                    first_record=split.trace_offset,
                )
            )
    return out


def routing_plan(args: argparse.Namespace) -> RoutingPlan:
    """The runs of ``kvmesh bench routing`` (and ``all``'s routing part) from its flags."""
    from kvmesh.benchmarks.routing import QUICK, RoutingPlan, SystemSpec

    base = QUICK if args.quick else RoutingPlan()
    given = _csv(args.systems)
    for name in (*given, *_csv(args.replica_systems), *_csv(args.ladder_systems)):
        try:
            SystemSpec.parse(name)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    families = {SystemSpec.parse(x).family for x in given}

    def only_given(default: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f for f in default if f in families) if given else default

    return replace(
        base,
        systems=given or base.systems,
        replicas=args.replicas or base.replicas,
        replica_families=tuple(_csv(args.replica_systems)) or only_given(base.replica_families),
        ladder_families=tuple(_csv(args.ladder_systems)) or only_given(base.ladder_families),
        ladder_replicas=args.ladder_replicas or base.ladder_replicas,
        ladder_steps=base.ladder_steps if args.ladder_steps is None else args.ladder_steps,
        slo_ms=args.slo_ms,
    )


def run_routing_cmd(args: argparse.Namespace) -> dict:
    from kvmesh.benchmarks.routing import FleetConfig, run_routing

    cfg = FleetConfig(
        engines=args.engines,
        num_gpu_blocks=args.num_gpu_blocks,
        pressure=args.pressure,
        router_args=tuple(getattr(args, "router_arg", ())),
    )
    wls = build_workloads(args, cfg.prefill_tokens_per_s)
    split = SPLITS[args.split]
    return run_routing(
        wls,
        routing_plan(args),
        cfg,
        progress=_Bar,
        note=_note,
        split={"name": split.name, "seed": split.seed, "trace_offset": split.trace_offset},
    )


# Memory per indexed block: distinct blocks over MEMORY_ENGINES engines, each size in a fresh process.
MEMORY_SIZES, QUICK_MEMORY_SIZES = [1_000_000, 10_000_000], [100_000]
MEMORY_ENGINES = 1000


def run_micro_cmd(args: argparse.Namespace) -> dict:
    from kvmesh.benchmarks.index_memory import memory_table
    from kvmesh.benchmarks.micro import (
        bench_decisions,
        bench_ingest_and_match,
        dynamo_available,
        native_missing,
    )
    from kvmesh.benchmarks.report import machine_info

    n = 200_000 if args.quick else 1_000_000
    return {
        # When and how, for a micro run merged into an earlier full run's page.
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "kvmesh bench micro" + (" --quick" if args.quick else ""),
        "machine": machine_info()["machine"],
        "index": bench_ingest_and_match(
            n, 64, 128, 1000 if args.quick else 5000, args.seed, note=_note, nonowner_blocks=n
        ),
        "memory": memory_table(
            QUICK_MEMORY_SIZES if args.quick else MEMORY_SIZES,
            MEMORY_ENGINES,
            {"native": native_missing(), "python": None, "dynamo": dynamo_available()},
            seed=args.seed,
            note=_note,
        ),
        "decisions": bench_decisions(n=1000 if args.quick else 5000, seed=args.seed),
    }


def run_convergence_cmd(args: argparse.Namespace) -> dict:
    from kvmesh.benchmarks.convergence import run_convergence

    return run_convergence(
        QUICK_CONVERGENCE_REAL if args.quick else CONVERGENCE_REAL,
        QUICK_CONVERGENCE_SIM if args.quick else CONVERGENCE_SIM,
        8 if args.quick else 30,
        note=_note,
        sim_events=QUICK_SIM_EVENTS if args.quick else SIM_EVENTS,
    )


def run_proxy_cmd(args: argparse.Namespace) -> dict:
    from kvmesh.benchmarks.proxy import run_proxy

    return run_proxy(seconds=3.0 if args.quick else 8.0)


def run_overload_cmd(args: argparse.Namespace) -> dict:
    from dataclasses import replace

    from kvmesh.benchmarks.overload import OverloadConfig, quick, run_overload

    cfg = OverloadConfig(
        seed=args.seed,
        router_python=getattr(args, "router_python", ""),
        router_args=tuple(getattr(args, "router_arg", ())),
    )
    if not getattr(args, "mesh", cfg.mesh_nodes > 1):  # `bench all` has no --mesh flag
        cfg = replace(cfg, mesh_nodes=0)
    return run_overload(quick(cfg) if args.quick else cfg, note=_note)


def _command(args: argparse.Namespace) -> str:
    """The command line that produced a run, for the pages it writes."""
    if sys.argv[0].endswith("kvmesh"):
        return "kvmesh " + " ".join(sys.argv[1:])
    return f"kvmesh bench {args.bench}" + (" --quick" if args.quick else "")


def run_reliability_cmd(args: argparse.Namespace) -> dict:
    """The reliability scenarios' results (``kvmesh bench reliability``, and a step of ``all``)."""
    from kvmesh.benchmarks.reliability import ReliabilityConfig, quick, run_reliability

    cfg = ReliabilityConfig(seed=args.seed)
    return run_reliability(quick(cfg) if args.quick else cfg, note=_note)


def write_reliability(res: dict, args: argparse.Namespace, docs: Path) -> Path:
    """DOCS/reliability.md and DOCS/reliability.json from a reliability run's results."""
    from kvmesh.benchmarks.reliability_report import render_markdown
    from kvmesh.benchmarks.report import machine_info

    res["meta"] = {
        "command": _command(args),
        "started": res.get("started", ""),
        "duration_s": res.get("duration_s", 0.0),
        "quick": args.quick,
        **machine_info(),
    }
    docs.mkdir(parents=True, exist_ok=True)
    path = docs / "reliability.md"
    path.write_text(render_markdown(res))
    (docs / "reliability.json").write_text(json.dumps(res, indent=1, default=str))
    return path


def _run_reliability(args: argparse.Namespace) -> int:
    res = run_reliability_cmd(args)
    path = write_reliability(res, args, Path(args.docs))
    print(path.read_text())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {path}, {path.with_suffix('.json')} in {res['duration_s']:.0f}s")
    return 0


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
    if args.bench == "report":
        return rewrite_report(Path(args.docs))
    if args.bench == "reliability":
        return _run_reliability(args)
    part = {
        "routing": run_routing_cmd,
        "micro": run_micro_cmd,
        "convergence": run_convergence_cmd,
        "proxy": run_proxy_cmd,
        "overload": run_overload_cmd,
    }[args.bench]
    res = {args.bench: part(args)}
    _print_md(res)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1, default=str))
    return 0


# The Commands section of docs/benchmarks.md.
DOC_COMMANDS = (
    "kvmesh bench all            # this page, docs/benchmarks.json, docs/img/*.png\n"
    "kvmesh bench all --quick    # smoke run\n"
    "kvmesh bench routing --workload chat,trace --systems precise,round_robin\n"
    "kvmesh bench overload --json /tmp/overload.json   # add --router-python PATH for another checkout\n"
    "kvmesh bench reliability    # docs/reliability.md and .json: faults caused on purpose\n"
    "kvmesh bench micro | convergence | proxy | index"
)


def _write_markdown(res: dict, docs: Path) -> Path:
    """docs/benchmarks.md: the results, then the pages of docs/evidence/. The
    section ``kvmesh bench tiers`` writes (between its markers) is its own
    run's: it is kept as it was."""
    from kvmesh.benchmarks.report import read_evidence, render_markdown
    from kvmesh.benchmarks.tiers import BEGIN, END

    path = docs / "benchmarks.md"
    text = render_markdown(res, DOC_COMMANDS, read_evidence(docs))
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old and BEGIN not in text:
        section = BEGIN + old.split(BEGIN, 1)[1].split(END, 1)[0] + END
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    return path


def write_docs(res: dict, docs: Path) -> None:
    """benchmarks.md, benchmarks.json and img/*.png from a results dict."""
    from kvmesh.benchmarks.plots import write_plots
    from kvmesh.benchmarks.targets import targets

    res["targets"] = targets(res)
    docs.mkdir(parents=True, exist_ok=True)
    write_plots(res, str(docs / "img"))
    _write_markdown(res, docs)
    (docs / "benchmarks.json").write_text(json.dumps(res, indent=1, default=str))


def rewrite_report(docs: Path) -> int:
    """``kvmesh bench report``: benchmarks.md again from benchmarks.json, measuring nothing."""
    src = docs / "benchmarks.json"
    if not src.is_file():
        raise SystemExit(f"{src} not found: run `kvmesh bench all --docs {docs}` first")
    print(f"wrote {_write_markdown(json.loads(src.read_text()), docs)}")
    return 0


def run_all(args: argparse.Namespace) -> int:
    from kvmesh.benchmarks.report import machine_info

    check_trace(args)
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
    sections: dict[str, float] = {}  # seconds each section took (the report shows them)
    res["meta"]["section_s"] = sections
    for name, fn in (
        ("micro", run_micro_cmd),
        ("convergence", run_convergence_cmd),
        ("proxy", run_proxy_cmd),
        ("routing", run_routing_cmd),
        ("overload", run_overload_cmd),
    ):
        _note(f"== {name} ==")
        t = time.time()
        try:
            res[name] = fn(args)
        except Exception as e:
            res[name + "_error"] = f"{type(e).__name__}: {e}"
            _note(f"== {name} FAILED: {res[name + '_error']} ==")
        sections[name] = time.time() - t
        _note(f"== {name} done in {sections[name]:.0f}s ==")
    docs = Path(args.docs)
    # Its own page (docs/reliability.md, .json): pass/fail rows, not figures to plot or target.
    _note("== reliability ==")
    t = time.time()
    try:
        rel_page = write_reliability(run_reliability_cmd(args), args, docs)
    except Exception as e:
        res["reliability_error"] = f"{type(e).__name__}: {e}"
        _note(f"== reliability FAILED: {res['reliability_error']} ==")
    sections["reliability"] = time.time() - t
    _note(f"== reliability done in {sections['reliability']:.0f}s ==")
    res["meta"]["duration_s"] = time.time() - t0
    write_docs(res, docs)
    for t in res["targets"]:
        verdict = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        print(f"{verdict:>6}  {t['name']}: {t['measured']} (goal {t['target']})")
    outputs = f"{docs / 'benchmarks.md'}, {docs / 'benchmarks.json'}, {docs / 'img'}"
    if "reliability_error" not in res:
        outputs += f", {rel_page}, {rel_page.with_suffix('.json')}"
    print(f"wrote {outputs} in {time.time() - t0:.0f}s")
    return 0
