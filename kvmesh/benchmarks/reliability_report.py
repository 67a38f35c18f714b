"""The reliability page (docs/reliability.md) and the figures behind its rows.

Pure: each scenario of :mod:`kvmesh.benchmarks.reliability` hands its raw
observations (the client's calls, times, counters) to one of the
``*_figures`` functions here, which computes the row's figures and whether
kvmesh behaved as promised; :func:`render_markdown` turns the results into
the page. Nothing here starts a process or opens a socket, so the verdicts
and the page are tested on made-up results (tests/unit/test_reliability_bench.py).

Each row's fixed part is a :class:`Claim`: the fault, the behaviour kvmesh
promises for it (in the words of README.md and docs/architecture.md) and
the tests that hold it (checked to exist, :func:`missing_tests`).
"""

from __future__ import annotations

import ast
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CLAIMS",
    "DESCRIBE",
    "Call",
    "Claim",
    "bad_inputs_figures",
    "engine_kill_figures",
    "fuzz_examples",
    "lost_batch_figures",
    "missing_tests",
    "outcome",
    "render_markdown",
    "router_kill_figures",
    "soak_figures",
    "tally_outcomes",
]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
FUZZ_TESTS = "tests/integration/test_fuzz.py"
# A call may end with these; UNKNOWN or INTERNAL would say nothing about why.
CLEAR_STATUSES = frozenset(
    {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND"}
)
# The soak counts as flat while the trend of the node's RSS (a least-squares
# line through its samples) rises by at most this fraction of the starting
# RSS per minute: allocator arenas and gRPC buffers move a steady process by
# a few percent either way, while memory held per request keeps rising. A
# trend, not the end over the start, so a short run cannot pass by luck.
SOAK_RSS_SLOPE_PER_MIN = 0.05


@dataclass(frozen=True)
class Claim:
    """One row's fixed part: the fault, what kvmesh promises, the tests that hold it."""

    key: str
    fault: str
    promise: str
    tests: tuple[str, ...]  # "path::test_name", relative to the repository


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "engine_kill",
        "An engine SIGKILLed under steady load through a 3-node mesh",
        "A request whose engine fails before its first token is retried on another engine; only "
        "streams that already had tokens from it end UNAVAILABLE `engine_failed`.",
        (
            "tests/integration/test_router_e2e.py::test_killing_the_chosen_engine_fails_over",
            "tests/integration/test_hardening.py::"
            "test_an_engine_that_stalls_or_dies_mid_stream_ends_the_call_with_a_status",
        ),
    ),
    Claim(
        "router_kill",
        "A router node SIGKILLed under steady load",
        "Only calls on its connections fail; the other nodes keep serving, declare it dead (SWIM) and "
        "resume its engines' event streams from the last sequence in the log: nothing lost.",
        (
            "tests/integration/test_mesh_e2e.py::"
            "test_owner_killed_while_engine_emits_events_hands_over_without_loss",
            "tests/sim/test_membership_sim.py::test_crash_detection_and_join_latency_n10",
        ),
    ),
    Claim(
        "engine_restart",
        "An engine killed and started again on the same ports (batches numbered from 0 again)",
        "The sequence going back marks a new process: its worker is reset and every node's index "
        "drops the old process' blocks and follows the new cache.",
        ("tests/integration/test_event_adapter.py::test_engine_restart_resets_the_worker",),
    ),
    Claim(
        "lost_batch",
        "An engine's last KV-event batch lost on PUB, then no more events",
        "The owner asks a quiet engine's replay socket for anything newer (`--replay-probe-after`): "
        "the lost batch is applied within about that time.",
        (
            "tests/integration/test_replay_probe.py::test_a_lost_last_batch_is_applied_by_a_probe",
            "tests/integration/test_event_gap_e2e.py::test_lost_last_batches_of_a_quiet_engine_are_probed_in",
        ),
    ),
    Claim(
        "bad_inputs",
        "Random malformed Generate, Route and Admin calls; random bytes on the mesh port",
        "Every call ends with a status that says why (never UNKNOWN or INTERNAL), bad input changes "
        "no state, and the node keeps serving.",
        (
            f"{FUZZ_TESTS}::test_random_router_calls_end_with_a_clear_status_and_change_nothing",
            f"{FUZZ_TESTS}::test_random_admin_calls_are_refused_cleanly_or_applied_exactly",
            f"{FUZZ_TESTS}::test_random_bytes_on_the_mesh_port_are_rejected",
            f"{FUZZ_TESTS}::test_random_mesh_messages_never_crash_the_core_and_bad_ones_change_nothing",
        ),
    ),
    Claim(
        "soak",
        "Endless cache churn: distinct prompts through one node to an engine with a small cache",
        "The engine's log is compacted from a snapshot, so the node's memory and index stay bounded "
        "by the engines' caches, not by the events seen.",
        ("tests/unit/test_bounded_state.py::test_churn_keeps_encoded_size_and_memory_within_2x_of_live_set",),
    ),
)


# -- outcomes and verdicts ----------------------------------------------------------


@dataclass(slots=True)
class Call:
    """What the client saw of one Generate call (times in seconds since the scenario's start)."""

    node: int  # index of the router node it was sent to
    t_send: float
    status: str = "OK"  # gRPC status code name
    reason: str = ""  # the node's kvmesh-reason ("" when none was sent)
    engine: str = ""  # engine of its last attempt ("" if never routed)
    attempts: int = 0
    t_done: float = 0.0
    tokens: int = 0
    conversation: int = -1  # which shared prefix its prompt continues


def outcome(call: Call) -> str:
    """``OK``, or ``STATUS:reason`` (``-`` when no node sent a reason: the connection failed)."""
    return "OK" if call.status == "OK" else f"{call.status}:{call.reason or '-'}"


def tally_outcomes(calls: Iterable[Call]) -> dict[str, int]:
    """Calls per outcome: OK first, then the rest by count (most first) and name."""
    counts = Counter(outcome(c) for c in calls)
    order = sorted(counts, key=lambda k: (k != "OK", -counts[k], k))
    return {k: counts[k] for k in order}


def broken_stream(call: Call, engine: str) -> bool:
    """The one failure an engine's death may cause: a stream that had tokens from it."""
    return (
        call.status == "UNAVAILABLE"
        and call.reason == "engine_failed"
        and call.engine == engine
        and call.tokens > 0
    )


def engine_kill_figures(calls: Sequence[Call], engine: str, t_kill: float) -> dict[str, Any]:
    """The engine-kill scenario's figures from the client's calls."""
    failed = [c for c in calls if c.status != "OK"]
    otherwise = [c for c in failed if not broken_stream(c, engine)]
    return {
        "calls": len(calls),
        "outcomes": tally_outcomes(calls),
        "failed": len(failed),
        "failed_as_promised": len(failed) - len(otherwise),
        "failed_otherwise": len(otherwise),
        "failed_otherwise_outcomes": tally_outcomes(otherwise),
        "failed_sent_after_kill": sum(c.t_send >= t_kill for c in failed),
        "retried_ok": sum(c.status == "OK" and c.attempts > 1 for c in calls),
        "last_failure_end_s": max((c.t_done - t_kill for c in failed), default=None),
        "as_promised": not otherwise,
    }


def router_kill_figures(calls: Sequence[Call], node: int, t_kill: float) -> dict[str, Any]:
    """The router-kill scenario's client figures: the killed node's calls that
    were running at the kill or sent after it, and the survivors' calls."""
    hit = [c for c in calls if c.node == node and c.t_done >= t_kill]
    survivors = [c for c in calls if c.node != node]
    return {
        "calls": len(calls),
        "killed_node_calls": len(hit),
        "killed_node_outcomes": tally_outcomes(hit),
        "killed_node_sent_after_kill": sum(c.t_send >= t_kill for c in hit),
        "survivor_calls": len(survivors),
        "survivor_outcomes": tally_outcomes(survivors),
        "survivors_failed": sum(c.status != "OK" for c in survivors),
    }


def lost_batch_figures(
    took: Sequence[float | None], lost: Sequence[int], probed: Sequence[int], bound: float
) -> dict[str, Any]:
    """Per repeat: seconds until every node matched (None: never), batches
    lost, batches the owner's probes found; as promised when every repeat
    lost exactly one batch and matched within ``bound``."""
    done = [t for t in took if t is not None]
    return {
        "repeats": len(took),
        "took_s": list(took),
        "lost_batches": list(lost),
        "probe_batches": list(probed),
        "median_s": statistics.median(done) if done else None,
        "max_s": max(done) if done else None,
        "bound_s": bound,
        "as_promised": bool(took) and len(done) == len(took) and max(done) <= bound and set(lost) == {1},
    }


def soak_figures(
    rss_kb: Sequence[int],
    times_s: Sequence[float],
    entries: tuple[int, int],
    cache_blocks: int,
    max_slope: float = SOAK_RSS_SLOPE_PER_MIN,
) -> dict[str, Any]:
    """The soak's figures from the node's RSS samples (kB, taken at
    ``times_s``, start first) and its index entries (start, end). Flat when
    the RSS trend rises by at most ``max_slope`` of the start per minute and
    the index holds no more entries than the engine's cache has blocks."""
    start, end = rss_kb[0], rss_kb[-1]
    slope_kb_s = statistics.linear_regression(times_s, rss_kb).slope if len(rss_kb) > 1 else 0.0
    per_min = 60.0 * slope_kb_s / start if start else 0.0
    return {
        "rss_start_mb": start / 1024.0,
        "rss_end_mb": end / 1024.0,
        "rss_peak_mb": max(rss_kb) / 1024.0,
        "rss_growth": (end - start) / start if start else 0.0,
        "rss_trend_mb_per_min": 60.0 * slope_kb_s / 1024.0,
        "rss_trend_per_min": per_min,
        "rss_trend_max_per_min": max_slope,
        "index_entries_start": entries[0],
        "index_entries_end": entries[1],
        "cache_blocks": cache_blocks,
        "rss_samples_mb": [r / 1024.0 for r in rss_kb],
        "rss_sample_times_s": list(times_s),
        "as_promised": per_min <= max_slope and entries[1] <= cache_blocks,
    }


def bad_inputs_figures(
    api: Mapping[str, int],
    mesh: Mapping[str, int],
    after: Mapping[str, Any],
    engines_unchanged: bool,
    fuzz: Mapping[str, int],
) -> dict[str, Any]:
    """The bad-input row: the statuses the API and the mesh port answered
    (``STATUS`` or ``STATUS:reason``, possibly with a note after a space),
    the node's state afterwards (``alive``, ``health``, ``good_request``,
    ``in_flight``, ``node_unclear_outcomes``) and the fuzz tests' examples.
    As promised when every API answer is a clear status (a non-OK one with
    its reason), every mesh answer is OK or INVALID_ARGUMENT, the node is
    alive, serving and idle, counted no UNKNOWN or INTERNAL outcome, and its
    engines did not change."""
    unclear = [k for k in api if not _clear(k)]
    mesh_unclear = [k for k in mesh if k.split(" ")[0] not in {"OK", "INVALID_ARGUMENT"}]
    return {
        **after,
        "api_calls": sum(api.values()),
        "api_statuses": dict(api),
        "api_unclear": unclear,
        "mesh_calls": sum(mesh.values()),
        "mesh_statuses": dict(mesh),
        "mesh_unclear": mesh_unclear,
        "engines_unchanged": engines_unchanged,
        "fuzz_examples": dict(fuzz),
        "as_promised": not unclear
        and not mesh_unclear
        and bool(after["alive"])
        and after["health"] == "SERVING"
        and after["good_request"] == "OK"
        and after["in_flight"] == 0
        and not after["node_unclear_outcomes"]
        and engines_unchanged,
    }


def _clear(outcome: str) -> bool:
    """``STATUS`` or ``STATUS:reason`` (a note may follow a space): OK, or a
    status that says why with the node's reason."""
    status, _, reason = outcome.split(" ")[0].partition(":")
    return status == "OK" or (status in CLEAR_STATUSES and reason not in ("", "-"))


def fuzz_examples(source: str) -> dict[str, int]:
    """Hypothesis examples per test of a test module's source: each test's
    ``@settings(max_examples=N)``, given inline or through a module-level
    name (``FUZZ = settings(...)`` then ``@FUZZ``)."""
    tree = ast.parse(source)

    def max_examples(node: ast.expr) -> int | None:
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "settings":
            for kw in node.keywords:
                if kw.arg == "max_examples" and isinstance(kw.value, ast.Constant):
                    value = kw.value.value
                    return value if isinstance(value, int) else None
        return None

    named: dict[str, int] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and (n := max_examples(stmt.value)) is not None:
            named.update({t.id: n for t in stmt.targets if isinstance(t, ast.Name)})
    out: dict[str, int] = {}
    for stmt in tree.body:
        if not isinstance(stmt, ast.FunctionDef) or not stmt.name.startswith("test_"):
            continue
        for dec in stmt.decorator_list:
            n = named.get(dec.id) if isinstance(dec, ast.Name) else max_examples(dec)
            if n is not None:
                out[stmt.name] = n
    return out


def missing_tests(refs: Iterable[str], root: Path = REPO_ROOT) -> list[str]:
    """The ``path::test`` references whose file or test function does not exist."""
    found: dict[str, set[str]] = {}
    missing = []
    for ref in refs:
        path, _, name = ref.partition("::")
        if path not in found:
            f = root / path
            tree = ast.parse(f.read_text()) if f.is_file() else ast.Module(body=[], type_ignores=[])
            found[path] = {s.name for s in tree.body if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef)}
        if name not in found[path]:
            missing.append(ref)
    return missing


# -- the page -------------------------------------------------------


def _fmt_outcomes(t: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in t.items()) or "none"


def _s(x: float | None, digits: int = 1) -> str:
    return "never" if x is None else f"{x:.{digits}f} s"


def _describe_engine_kill(f: Mapping[str, Any]) -> str:
    return (
        f"{f['calls']} calls at {f['load_rps']:g}/s, engine `{f['engine']}` killed after "
        f"{f['before_s']:g} s of {f['window_s']:g}: {_fmt_outcomes(f['outcomes'])}. "
        f"Failed {f['failed']}: {f['failed_as_promised']} streams that had tokens from the killed engine, "
        f"{f['failed_otherwise']} otherwise"
        + (f" ({_fmt_outcomes(f['failed_otherwise_outcomes'])})" if f["failed_otherwise"] else "")
        + f"; {f['failed_sent_after_kill']} of the failed were sent after the kill. "
        f"{f['retried_ok']} calls OK after a retry. Last failure ended {_s(f['last_failure_end_s'], 2)} "
        "after the kill."
    )


def _describe_router_kill(f: Mapping[str, Any]) -> str:
    return (
        f"`{f['victim']}` (owner of {', '.join(f['victim_engines']) or 'no engine'}) killed after "
        f"{f['before_s']:g} s at {f['load_rps']:g}/s. Its calls running at the kill or sent after: "
        f"{_fmt_outcomes(f['killed_node_outcomes'])}. Survivors' calls: "
        f"{_fmt_outcomes(f['survivor_outcomes'])}. After the kill: suspect on every survivor "
        f"{_s(f['suspect_s'])}, dead {_s(f['dead_s'])}, its engines owned by survivors "
        f"{_s(f['takeover_s'])}, every survivor's index = every engine's cache {_s(f['match_s'])}."
    )


def _describe_engine_restart(f: Mapping[str, Any]) -> str:
    return (
        f"`{f['engine']}` started again {f['down_s']:.1f} s after its kill; the nodes then held "
        f"{f['stale_blocks']} blocks of the old process (new cache: {f['engine_blocks_at_restart']}). "
        f"Every node's index = the new cache {_s(f['match_s'])} after the restart, after "
        f"{f['requests']} requests through the mesh one at a time ({f['served_by_engine']} served by it, "
        f"the first {_s(f['first_served_s'])} after the restart); the owner counted "
        f"{f['resets']} reset(s) of its worker."
    )


def _describe_lost_batch(f: Mapping[str, Any]) -> str:
    took = ", ".join("never" if t is None else f"{t:.2f}" for t in f["took_s"])
    return (
        f"{f['repeats']} repeats on `{f['engine']}`; batches lost {f['lost_batches']}. Every node's index "
        f"= the engine's cache after {took} s (median {_s(f['median_s'], 2)}, max {_s(f['max_s'], 2)}; "
        f"probe after {f['probe_after_s']:g} s, bound {f['bound_s']:g} s); batches found by the owner's "
        f"probes {f['probe_batches']}."
    )


def _describe_bad_inputs(f: Mapping[str, Any]) -> str:
    fuzz = f["fuzz_examples"]
    return (
        f"{f['api_calls']} random bad API calls: {_fmt_outcomes(f['api_statuses'])} (OK: a fault a request "
        "may carry, such as an odd request id, salt or stop string). "
        f"{f['mesh_calls']} random byte strings on the mesh port: {_fmt_outcomes(f['mesh_statuses'])} "
        "(INVALID_ARGUMENT: bytes that are not a batch). "
        f"Afterwards: process {'alive' if f['alive'] else 'GONE'}, health {f['health']}, "
        f"a good request {f['good_request']}, in flight {f['in_flight']}, engines unchanged: "
        f"{'yes' if f['engines_unchanged'] else 'no'}, UNKNOWN/INTERNAL outcomes counted by the node: "
        f"{_fmt_outcomes(f['node_unclear_outcomes'])}. "
        f"The fuzz tests try {sum(fuzz.values())} examples a run "
        f"({', '.join(f'{n} x {k}' for k, n in fuzz.items())})."
    )


def _describe_soak(f: Mapping[str, Any]) -> str:
    return (
        f"{f['seconds']:g} s after a {f['warmup_s']:.0f} s warm-up: {f['requests']} requests "
        f"({f['failed']} failed), {f['evictions']} blocks evicted by a {f['cache_blocks']}-block cache. "
        f"Router RSS {f['rss_start_mb']:.1f} -> {f['rss_end_mb']:.1f} MB ({f['rss_growth']:+.1%}, peak "
        f"{f['rss_peak_mb']:.1f} MB; every 10 s: {_every(f['rss_samples_mb'], 10)} MB), trend "
        f"{f['rss_trend_mb_per_min']:+.1f} MB/min ({f['rss_trend_per_min']:+.1%} of the start a minute; "
        f"flat: at most {f['rss_trend_max_per_min']:.0%}); index entries "
        f"{f['index_entries_start']} -> {f['index_entries_end']}."
    )


def _every(samples: Sequence[float], step: int) -> str:
    """Every ``step``-th sample and the last, rounded: the trend of a series in a few numbers."""
    picked = list(samples[::step])
    if (len(samples) - 1) % step:
        picked.append(samples[-1])
    return ", ".join(f"{x:.0f}" for x in picked)


DESCRIBE: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "engine_kill": _describe_engine_kill,
    "router_kill": _describe_router_kill,
    "engine_restart": _describe_engine_restart,
    "lost_batch": _describe_lost_batch,
    "bad_inputs": _describe_bad_inputs,
    "soak": _describe_soak,
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_row(claim: Claim, figures: Mapping[str, Any] | None, missing: Sequence[str] = ()) -> str:
    """One table row: the claim, the tests (flagged when missing), the measured outcome, the verdict."""
    tests = "<br>".join(f"`{t}`" + (" (missing)" if t in missing else "") for t in claim.tests)
    if figures is None:
        measured, verdict = "not run", "n/a"
    elif "error" in figures:
        measured, verdict = f"did not run: {figures['error']}", "n/a"
    else:
        measured = DESCRIBE[claim.key](figures)
        verdict = "yes" if figures["as_promised"] else "**no**"
    cells = (claim.fault, claim.promise, tests, measured, verdict)
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def render_markdown(res: Mapping[str, Any]) -> str:
    """docs/reliability.md for the results ``res`` (meta, scenarios, missing_tests, config)."""
    meta = res.get("meta", {})
    scenarios = res.get("scenarios", {})
    missing = res.get("missing_tests", ())
    lines = [
        "# kvmesh reliability",
        "",
        "Each row is a fault or a bad input caused on purpose against real processes on this machine "
        "(simulated engines and router nodes on loopback, started with `--insecure`, default timings), "
        "what kvmesh promises for it, the tests that hold that promise, and what this run measured. "
        "Calls are counted by outcome, `STATUS:reason`: the reason is the node's `kvmesh-reason` "
        "trailing metadata, `-` when no node sent one (the connection to the node failed). "
        "How each scenario runs: `kvmesh/benchmarks/reliability.py`.",
        "",
        "Regenerate: `kvmesh bench reliability` (`kvmesh bench reliability --quick` is a shorter run "
        "of the same code; `kvmesh bench all` runs it too; the command of this run is below).",
        "",
        "| fault or input | promised behaviour | held by | measured (this run) | as promised |",
        "| --- | --- | --- | --- | --- |",
        *(render_row(c, scenarios.get(c.key), missing) for c in CLAIMS),
        "",
        "## Machine and run",
        "",
    ]
    for k in ("command", "started", "duration_s", "quick", "machine", "cpus", "python"):
        if k in meta:
            v = meta[k]
            lines.append(f"- {k}: {v:.0f} s" if k == "duration_s" else f"- {k}: {v}")
    if res.get("config"):
        cfg = ", ".join(f"{k}={v}" for k, v in res["config"].items())
        lines += ["", "## Settings", "", cfg]
    return "\n".join(lines) + "\n"
