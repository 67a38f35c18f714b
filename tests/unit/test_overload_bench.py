"""The overload benchmark's pure parts: the arrival schedule, the outcome
tallies and per-level figures, the nodes' counters, the target verdicts, and
the report section and plot rendered from the results alone (no process is
started here)."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from kvmesh.benchmarks.overload import (
    OTHER,
    STATUS_COLUMNS,
    Call,
    counter_delta,
    goodput_window,
    node_deltas,
    poisson_arrivals,
    summarize_level,
    tally_statuses,
)
from kvmesh.benchmarks.plots import write_plots
from kvmesh.benchmarks.report import render_markdown
from kvmesh.benchmarks.targets import analysis, overload_targets, targets
from kvmesh.stats import percentile


def test_poisson_arrivals_are_seeded_sorted_and_at_the_rate():
    a = poisson_arrivals(100.0, 100.0, seed=3)
    assert a == poisson_arrivals(100.0, 100.0, seed=3)
    assert a != poisson_arrivals(100.0, 100.0, seed=4)
    assert a == sorted(a) and a[0] > 0 and a[-1] < 100.0
    assert abs(len(a) - 10_000) < 400  # 4 standard deviations of a Poisson count of 10,000
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert abs(sum(gaps) / len(gaps) - 0.01) < 0.0005  # exponential gaps of mean 1 / rate


def test_poisson_arrivals_reject_a_bad_rate_or_duration():
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, 10.0, 0)
    with pytest.raises(ValueError):
        poisson_arrivals(10.0, 0.0, 0)


def _calls() -> list[Call]:
    return [
        Call(0, 0.1, "OK", 900.0, ttft_ms=100.0, tokens=40),
        Call(1, 0.2, "OK", 1500.0, ttft_ms=300.0, tokens=40),
        Call(0, 1.8, "OK", 400.0, ttft_ms=200.0, tokens=40),  # ends at 2.2 s: after a 2 s window
        Call(1, 0.5, "RESOURCE_EXHAUSTED", 4.0, reason="overloaded", detail="node overloaded: x"),
        Call(0, 0.6, "RESOURCE_EXHAUSTED", 60.0, reason="overloaded", detail="node overloaded: x"),
        Call(1, 0.7, "CANCELLED", 10.0),
        Call(0, 0.8, "INTERNAL", 3.0, reason="internal"),
        Call(1, 0.9, "DEADLINE_EXCEEDED", 60_000.0),
    ]


def test_tally_has_every_column_and_counts_the_rest_as_other():
    t = tally_statuses(_calls())
    assert list(t) == [*STATUS_COLUMNS, OTHER]
    assert t["OK"] == 3 and t["RESOURCE_EXHAUSTED"] == 2 and t["CANCELLED"] == 1
    assert t["DEADLINE_EXCEEDED"] == 1 and t[OTHER] == 1 and t["UNKNOWN"] == 0
    assert sum(t.values()) == len(_calls())


def test_goodput_counts_ok_calls_ended_within_the_window():
    assert goodput_window(_calls(), 2.0) == 2 / 2.0
    assert goodput_window(_calls(), 4.0) == 3 / 4.0


def test_level_summary():
    calls = _calls()
    s = summarize_level(calls, 16.0, 400.0, 2.0)
    assert s["sent"] == 8 and s["ok_total"] == 3 and s["goodput_rps"] == 1.0
    assert s["shed_rate"] == 2 / 8
    assert s["ttft_p50_ms"] == percentile([100.0, 300.0, 200.0], 50) == 200.0
    assert s["ttft_p99_ms"] == 300.0
    assert s["reject_p50_ms"] == percentile([4.0, 60.0], 50) and s["reject_p99_ms"] == 60.0
    assert s["reasons"] == {
        "RESOURCE_EXHAUSTED:overloaded": 2,
        "CANCELLED:-": 1,
        "INTERNAL:internal": 1,
        "DEADLINE_EXCEEDED:-": 1,
    }
    assert s["other_statuses"] == {"INTERNAL": 1}
    assert s["sent_by_node"] == {"0": 4, "1": 4} and s["ok_by_node"] == {"0": 2, "1": 1}
    assert s["details"]["RESOURCE_EXHAUSTED"] == ["node overloaded: x"]  # distinct messages only
    json.dumps(s)  # plain data: it goes to benchmarks.json


def test_level_without_sheds_has_no_reject_latency():
    s = summarize_level([Call(0, 0.1, "OK", 500.0, ttft_ms=50.0)], 1.0, 20.0, 1.0)
    assert s["reject_p99_ms"] is None and s["shed_rate"] == 0.0 and s["reasons"] == {}


def test_counter_delta_keeps_the_keys_that_changed():
    assert counter_delta({"OK": 5, "a": 1}, {"OK": 9, "a": 1, "b": 2}) == {"OK": 4, "b": 2}
    assert counter_delta({}, {}) == {}


def _view(
    total: int, outcomes: dict, events: dict, inc: dict, stalls: int = 0, lag_max: float = 0.01
) -> dict:
    return {
        "node_id": "n1",
        "requests_total": total,
        "outcomes": outcomes,
        "member_events": events,
        "requests_by_engine": {"e0": total},
        "in_flight": 0,
        "index_entries": 4000,
        "loop_stalls": stalls,
        "loop_lag_max_s": lag_max,
        "not_alive": [],
        "incarnations": inc,
    }


def test_node_deltas_count_the_level_and_refutations():
    before = _view(10, {"OK": 10}, {"suspect": 1}, {"n1": 0, "n2": 3})
    after = _view(
        25, {"OK": 20, "RESOURCE_EXHAUSTED:overloaded": 40}, {"suspect": 1}, {"n1": 2, "n2": 3}, 3, 0.25
    )
    before["loop_stalls"] = 1
    (d,) = node_deltas([before], [after])
    assert d["loop_stalls"] == 2 and d["loop_lag_max_s_after"] == 0.25
    assert d["requests"] == 15 and d["requests_by_engine"] == {"e0": 15}
    assert d["outcomes"] == {"OK": 10, "RESOURCE_EXHAUSTED:overloaded": 40}
    assert d["member_events"] == {} and d["incarnation_bumps"] == 2


def _level(
    k: float, goodput: float, reject_p99: float | None, rss: tuple, bad: int = 0, nodes: int = 1
) -> dict:
    statuses = dict.fromkeys((*STATUS_COLUMNS, OTHER), 0)
    statuses.update(OK=100, RESOURCE_EXHAUSTED=50, CANCELLED=bad)
    node = {
        "node_id": "a",
        "requests": 100,
        "outcomes": {"OK": 100},
        "member_events": {},
        "requests_by_engine": {"e0": 60, "e1": 40},
        "in_flight_after": 0,
        "index_entries_after": 4000,
        "not_alive_after": [],
        "incarnation_bumps": 0,
    }
    return {
        "k": k,
        "offered_rps": 25.0 * k,
        "sent": 150 + bad,
        "statuses": statuses,
        "reasons": {"RESOURCE_EXHAUSTED:overloaded": 50},
        "goodput_rps": goodput,
        "shed_rate": 50 / (150 + bad),
        "ttft_p50_ms": 80.0,
        "ttft_p99_ms": 900.0,
        "reject_p50_ms": None if reject_p99 is None else 2.0,
        "reject_p99_ms": reject_p99,
        "rss": {"start_mb": [rss[0]] * nodes, "end_mb": [rss[1]] * nodes, "peak_mb": [rss[1]] * nodes},
        "cpu_cores": {"routers": 0.3, "client": 0.2, "engines": 0.1, "other": 0.0},
        "client_loop_late": {"p99_ms": 1.0, "max_ms": 3.0},
        "nodes": [dict(node, node_id=f"n{i}") for i in range(nodes)],
    }


def _overload(mesh_suspects: int = 0) -> dict:
    single = [
        _level(1, 24.0, None, (80.0, 81.0)),
        _level(2, 24.5, 5.0, (81.0, 83.0)),
        _level(16, 23.0, 30.0, (83.0, 86.0)),
    ]
    mesh = [_level(1, 23.0, None, (80.0, 80.0), nodes=3), _level(16, 22.0, 70.0, (80.0, 85.0), nodes=3)]
    mesh[1]["nodes"][2]["member_events"] = {"suspect": mesh_suspects} if mesh_suspects else {}
    return {
        "config": {"engines": 4, "max_num_seqs": 4, "level_seconds": 20.0, "router_args": ["--max-queue=9"]},
        "capacity": {"rps": 25.0, "clients": 32},
        "scenarios": {"node1": {"nodes": 1, "levels": single}, "mesh3": {"nodes": 3, "levels": mesh}},
    }


def test_overload_targets():
    t = {x["name"]: x for x in overload_targets(_overload())}
    assert t["overload: CANCELLED or UNKNOWN calls"]["met"] is True
    assert t["overload: CANCELLED or UNKNOWN calls"]["value"] == 0
    good = t["overload: goodput at 16x vs 1x (1 node)"]
    assert good["met"] is True and good["value"] == 23.0 / 24.0
    shed = t["overload: shed requests answered, p99"]  # the worst level of every scenario
    assert shed["met"] is False and shed["value"] == 70.0 and "mesh3, 16x" in shed["measured"]
    mem = t["overload: router memory flat (1 node)"]  # 80 MB at the start of 1x, 86 MB at most after
    assert mem["met"] is True and abs(mem["value"] - (86.0 / 80.0 - 1)) < 1e-12
    assert t["overload: mesh membership stable (mesh3)"]["met"] is True


def test_overload_targets_missed():
    ov = _overload(mesh_suspects=2)
    ov["scenarios"]["node1"]["levels"][-1].update(goodput_rps=20.0)
    ov["scenarios"]["node1"]["levels"][-1]["rss"]["end_mb"] = [120.0]
    ov["scenarios"]["mesh3"]["levels"][0]["statuses"]["UNKNOWN"] = 3
    t = {x["name"]: x for x in overload_targets(ov)}
    assert t["overload: CANCELLED or UNKNOWN calls"]["met"] is False
    assert t["overload: CANCELLED or UNKNOWN calls"]["value"] == 3
    assert t["overload: goodput at 16x vs 1x (1 node)"]["met"] is False  # 20 / 24 < 90%
    assert t["overload: router memory flat (1 node)"]["met"] is False  # 120 / 80: +50%
    assert t["overload: mesh membership stable (mesh3)"]["value"] == 2
    missed = analysis({"overload": ov})
    assert "overload: goodput" in missed and "overload: mesh membership" in missed


def test_a_slow_refusal_is_explained_from_the_run_s_own_loop_figures():
    ov = _overload()
    missed = analysis({"overload": ov})  # no loop figures (an older run): the general text only
    assert "overload: shed requests answered" in missed and "This run" not in missed
    worst = ov["scenarios"]["mesh3"]["levels"][1]
    for i, n in enumerate(worst["nodes"]):
        n.update(loop_stalls=i, loop_lag_max_s_after=0.01 * (i + 1))
    worst["client_loop_late"] = {"p99_ms": 12.0, "max_ms": 95.0}
    missed = analysis({"overload": ov, "meta": {"cpus": 2}})
    assert (
        "This run, at mesh3 16x (refusals p99 70 ms): the routers' event loops fell behind their stall "
        "threshold 3 times during the level, and none was more than 30 ms late from its start to the end "
        "of the level; the client's loop was late by up to 95 ms (p99 12 ms); the processes used 0.60 of "
        "the machine's 2 cores."
    ) in missed
    del worst["client_loop_late"]
    missed = analysis({"overload": ov})  # what was not measured is not said
    assert "to the end of the level. Fix:" in missed and "client's loop was late" not in missed


def test_overload_targets_absent_or_partial():
    assert overload_targets({}) == []
    ov = _overload()
    ov["scenarios"]["mesh3"] = {"nodes": 3, "error": "RuntimeError: did not start"}
    names = {x["name"] for x in overload_targets(ov)}
    assert not any("mesh" in n for n in names) and "overload: router memory flat (1 node)" in names
    assert any(x["name"].startswith("overload:") for x in targets({"overload": _overload()}))


def test_overload_section_and_plot_from_the_json_alone(tmp_path):
    res = json.loads(json.dumps({"overload": _overload(mesh_suspects=1)}))
    md = render_markdown(res)
    body = md[md.index("## Overload") :]
    assert "**25.0 req/s**" in body and "`--max-queue=9`" in body
    assert "| offered | req/s | sent | OK | RESOURCE_EXHAUSTED |" in body
    assert "| 16x | 400 | 150 | 100 | 50 |" in body
    assert "| 16x | 23.0 | 33% | 80.0 | 900 | 2.0 | 30.0 | 83 -> 86 (86) | 4000 |" in body
    assert "| 16x | 100 (100), 100 (100), 100 (100) | e0 180, e1 120 | 1 | 0 | 0 | none |" in body
    assert "![goodput and shed rate vs offered load](img/overload.png)" in body
    paths = write_plots(res, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["overload.png"]
    assert os.path.getsize(paths[0]) > 5000


def test_a_scenario_that_failed_is_said_so():
    ov = _overload()
    ov["scenarios"]["mesh3"] = {"nodes": 3, "error": "RuntimeError: did not start"}
    md = render_markdown({"overload": ov})
    assert "Did not run: RuntimeError: did not start" in md


def test_bench_overload_flags_reach_the_config(monkeypatch):
    import argparse

    from kvmesh import bench
    from kvmesh.benchmarks import overload

    seen: list[overload.OverloadConfig] = []

    def fake_run(cfg: overload.OverloadConfig, note: object) -> dict:
        seen.append(cfg)
        return {}

    monkeypatch.setattr(overload, "run_overload", fake_run)
    p = argparse.ArgumentParser()
    bench.configure_parser(p)
    args = p.parse_args(
        ["overload", "--quick", "--no-mesh", "--router-python", "/x/python", "--router-arg=--max-queue=3"]
    )
    assert bench.run_overload_cmd(args) == {}
    (cfg,) = seen
    assert cfg.mesh_nodes == 0 and cfg.router_python == "/x/python" and cfg.router_args == ("--max-queue=3",)
    assert cfg.level_seconds == overload.QUICK["level_seconds"]
    args = p.parse_args(["overload"])
    bench.run_overload_cmd(args)
    assert seen[-1] == overload.OverloadConfig()  # the defaults are the config's own
    bench.run_overload_cmd(p.parse_args(["all", "--router-arg=--max-queue-wait=2"]))  # `bench all`'s part
    assert seen[-1] == overload.OverloadConfig(router_args=("--max-queue-wait=2",))


def test_prompts_share_a_seeded_prefix_and_vary_after_it():
    from kvmesh.benchmarks.overload import OverloadConfig, _Prompts

    cfg = OverloadConfig()
    a, b = _Prompts(cfg, 1), _Prompts(cfg, 2)
    ra, rb = a.next("x"), b.next("y")
    pa, pb_ = list(ra.prompt.token_ids.ids), list(rb.prompt.token_ids.ids)
    assert pa[: cfg.prefix_tokens] == pb_[: cfg.prefix_tokens] and len(set(pa[: cfg.prefix_tokens])) > 100
    lo, hi = cfg.suffix_tokens
    assert lo <= len(pa) - cfg.prefix_tokens <= hi and pa[cfg.prefix_tokens :] != pb_[cfg.prefix_tokens :]
    assert cfg.max_tokens[0] <= ra.sampling.max_tokens <= cfg.max_tokens[1] and ra.sampling.ignore_eos
    assert ra.request_id == "x-1" and a.next("x").request_id == "x-2"
