"""Benchmark report: targets (met / missed, measured ratios), markdown and
plots rendered from a small results dict, and the hand-written evidence
pages (docs/evidence/*.md) at the end of the page."""

from __future__ import annotations

import os

from kvmesh.bench import rewrite_report, write_docs
from kvmesh.benchmarks.plots import write_plots
from kvmesh.benchmarks.report import read_evidence, render_markdown
from kvmesh.benchmarks.targets import targets


def _sys(hit: float, pooled: float, p90: float, failed: int = 0) -> dict:
    return {
        "requests": 10,
        "failed": failed,
        "hit_rate": hit,
        "ideal_hit_rate": 0.95,
        "pooled_lru_hit_rate": pooled,
        "belady_hit_rate": 0.92,
        "capacity_blocks": 800,
        "working_set_blocks": 1200,
        "ttft_p50_ms": p90 / 2,
        "ttft_p90_ms": p90,
        "ttft_p99_ms": p90 * 2,
        "ttft_p90_all_ms": p90,
        "within_slo": 0.95,
        "latency_p50_ms": 100.0,
        "latency_p90_ms": 200.0,
        "latency_p99_ms": 300.0,
        "throughput_rps": 5.0,
        "output_tps": 100.0,
        "imbalance_inflight": 1.2,
        "peak_inflight": 3,
        "requests_by_engine": {},
        "wall_s": 2.0,
        "errors": [],
    }


def _gp(load: float, lo: float | None, hi: float | None, at_least: bool = False, below: bool = False) -> dict:
    return {"load": load, "lo": lo, "hi": hi, "at_least": at_least, "below": below}


def _step(load: float, p90: float | None, share: float) -> dict:
    return {"load": load, "ttft_p90_all_ms": p90, "within_slo": share, "hit_rate": 0.8, "failed": 0}


def _results() -> dict:
    ov = {
        "direct_ttft_p50_ms": 15.0,
        "via_ttft_p50_ms": 18.0,
        "overhead_ms": 3.0,
        "overhead_quickack_ms": None,
        "route_rpc_p50_ms": 1.5,
        "route_rpc_p99_ms": 4.0,
    }
    return {
        "meta": {"command": "kvmesh bench all", "cpus": 2},
        "routing": {
            "fleet": {
                "engines": 8,
                "num_gpu_blocks": 4000,
                "pressure": 0.5,
                "min_longest_requests": 1,
                "time_scale": 1.0,
                "block_size": 16,
                "prefill_tokens_per_s": 80000.0,
            },
            "plan": {
                "replicas": [1, 3],
                "replica_families": ["precise", "sglang_cache_aware"],
                "ladder_replicas": [1],
                "ladder_families": ["precise", "sglang_cache_aware", "round_robin"],
                "slo_ms": 1000.0,
            },
            "split": {"name": "heldout", "seed": 1, "trace_offset": 2000},
            "workloads": {
                "chat": {
                    "params": {"sessions": 4, "session_rate_per_s": 12.0},
                    "requests": 10,
                    "cache": {
                        "pressure": 0.5,
                        "lru_working_set_blocks": 1600,
                        "working_set_blocks": 1200,
                        "longest_request_blocks": 90,
                        "blocks_per_engine": 100,
                        "fleet_blocks": 800,
                        "fleet_share_of_working_set": 0.5,
                    },
                }
            },
            "systems": {
                "round_robin": {"overhead": ov, "chat": _sys(0.5, 0.9, 2000.0)},
                "precise": {"overhead": ov, "chat": _sys(0.85, 0.9, 100.0)},
                "precise@3": {"overhead": ov, "chat": _sys(0.82, 0.9, 110.0)},
                "sglang_cache_aware": {
                    "overhead": {**ov, "route_rpc_p50_ms": None, "overhead_quickack_ms": 0.5},
                    "chat": _sys(0.86, 0.9, 300.0),
                },
                "sglang_cache_aware@3": {"chat": _sys(0.60, 0.9, 900.0, failed=2)},
            },
            "ladder": {
                "chat": {
                    "precise": [_step(1.0, 100.0, 0.99), _step(2.0, 400.0, 0.95), _step(4.0, None, 0.5)],
                    "sglang_cache_aware": [_step(1.0, 300.0, 0.97), _step(2.0, 2500.0, 0.6)],
                    "round_robin": [_step(0.5, 2000.0, 0.8), _step(1.0, None, 0.3)],
                }
            },
            "goodput": {
                "chat": {
                    # precise: 2.0 passes, 4.0 fails; sglang: 1.0 passes, 2.0 fails; round_robin failed both.
                    "precise": _gp(3.0, 2.0, 4.0),
                    "sglang_cache_aware": _gp(1.2, 1.0, 2.0),
                    "round_robin": _gp(0.0, None, 0.5, below=True),
                }
            },
            "skipped": {},
        },
        "micro": {
            "index": {
                "n_engines": 64,
                "stored_blocks": 1000,
                "batches": 10,
                "prompt_blocks": 128,
                "queries": 100,
                "kvmesh": {
                    "blocks_per_s": 400_000.0,
                    "match_p50_us": 30.0,
                    "match_p99_us": 60.0,
                    "hash_128_blocks_us": 35.0,
                },
                "dynamo": {
                    "blocks_per_s": 800_000.0,
                    "match_p50_us": 70.0,
                    "match_p99_us": 200.0,
                    "best_overlap_agrees_with_kvmesh": "200/200",
                },
                "ingest_ratio": 0.5,
                "match_p99_ratio": 0.3,
            },
            "decisions": {"precise": {"p50_us": 30.0, "p99_us": 60.0}},
        },
        "convergence": {
            "real": [{"n": 5, "p50": 0.1, "p99": 0.3, "bytes_per_event": 5000.0, "missing": 0}],
            "sim": [
                {"n": 100, "loss": 0.01, "p50": 0.9, "p99": 2.5, "bytes_per_event": 9e4, "missing": 0},
                {
                    "n": 200,
                    "loss": 0.01,
                    "p50": 0.9,
                    "p99": 1.5,
                    "bytes_per_event": 9e4,
                    "missing": 2,
                    "events": 20,
                },
            ],
        },
        "proxy": {
            "echo": {"requests_per_s": 400.0, "messages_per_s": 7200.0, "server_cpu_ms_per_request": 0.7},
            "kvmesh": {"requests_per_s": 300.0, "messages_per_s": 5400.0, "server_cpu_ms_per_request": 2.1},
            "ratio": 0.75,
            "shape": {
                "prompt_tokens": 2000,
                "max_tokens": 16,
                "concurrency": 32,
                "seconds": 8,
                "engines": 2,
                "engine_time_scale": 0.01,
            },
        },
    }


def _targets(res: dict) -> dict[str, dict]:
    return {x["name"]: x for x in targets(res)}


def test_targets_verdicts_and_ratios():
    t = _targets(_results())
    ideal = t["precise hit rate vs pooled-LRU ideal (chat)"]
    assert ideal["met"] is True  # 0.85 / 0.90 = 94% >= 90%
    assert abs(ideal["value"] - 0.85 / 0.9) < 1e-9
    assert "Belady 0.920" in ideal["measured"] and "infinite 0.950" in ideal["measured"]
    # precise's goodput 3.0x against sglang's 1.2x: 2.5x >= 1.5x.
    vs_sglang = t["goodput vs sglang-router cache_aware (chat, N=1)"]
    assert vs_sglang["met"] is True and abs(vs_sglang["value"] - 2.5) < 1e-9
    # round_robin failed every load tried (< 0.5x): precise's ratio is at least 3.0 / 0.5 = 6x.
    vs_rr = t["goodput vs round_robin (chat, N=1)"]
    assert vs_rr["met"] is True and vs_rr["value"] == 6.0 and ">= 6.00x" in vs_rr["measured"]


def test_targets_all_kinds():
    t = _targets(_results())
    assert t["hit rate vs sglang-router cache_aware (chat)"]["met"] is False  # 0.85 < 0.86
    loss = t["mesh hit-rate loss, 3 nodes vs 1 (chat)"]
    assert loss["met"] is False and abs(loss["value"] - 3.0) < 1e-9  # 0.85 -> 0.82: 3 points > 1
    assert "precise 0.850 -> 0.820 (-3.0 points)" in loss["measured"]
    assert "sglang_cache_aware x3: -26.0 points" in loss["measured"]
    assert t["index ingest vs Dynamo RadixTree"]["met"] is False
    assert "0.50x" in t["index ingest vs Dynamo RadixTree"]["measured"]
    assert t["prefix match p99 vs Dynamo RadixTree"]["met"] is True
    assert t["convergence p99, 5 real nodes"]["met"] is True
    assert t["convergence p99, 100 simulated nodes, 1% loss"]["met"] is False  # 2.5 s > 2 s
    # Events that never converged are slower than any goal, whatever the p99 of the others.
    lost = t["convergence p99, 200 simulated nodes, 1% loss"]
    assert lost["met"] is False and "2 of 20 events never converged" in lost["measured"]
    proxy = t["Generate proxy vs bare grpcio"]
    assert proxy["met"] is True and "router CPU 2.10 ms per request" in proxy["measured"]


def test_goodput_ratio_of_bounds_is_a_bound():
    res = _results()
    gp = res["routing"]["goodput"]["chat"]
    # Both passed every load tried: nothing is known of their ratio.
    gp["precise"], gp["sglang_cache_aware"] = _gp(2.0, 2.0, None, at_least=True), _gp(2.0, 2.0, None, True)
    t = _targets(res)["goodput vs sglang-router cache_aware (chat, N=1)"]
    assert t["met"] is None and t.get("undetermined") and "= unknown" in t["measured"]
    assert render_markdown(res).count("undetermined") >= 1
    # precise bracketed at 1.1x, sglang passed every load up to 2x: at most 0.55x, a miss whatever sglang's.
    gp["precise"] = _gp(1.1, 1.0, 1.2)
    t = _targets(res)["goodput vs sglang-router cache_aware (chat, N=1)"]
    assert t["met"] is False and "<= 0.55x" in t["measured"]


def test_a_target_whose_peer_is_not_installed_shows_not_measured():
    res = _results()
    routing = res["routing"]
    for key in [k for k in routing["systems"] if k.startswith("sglang_")]:
        del routing["systems"][key]
        routing["skipped"][key] = "sglang-router not installed (No module named 'sglang_router')"
    del routing["goodput"]["chat"]["sglang_cache_aware"], routing["ladder"]["chat"]["sglang_cache_aware"]
    res["micro"]["index"]["dynamo"] = {"skipped": "ai-dynamo-runtime not installed"}
    del res["micro"]["index"]["ingest_ratio"], res["micro"]["index"]["match_p99_ratio"]
    t = _targets(res)
    for name in (
        "hit rate vs sglang-router cache_aware (chat)",
        "goodput vs sglang-router cache_aware (chat, N=1)",
        "index ingest vs Dynamo RadixTree",
        "prefix match p99 vs Dynamo RadixTree",
    ):
        assert t[name]["met"] is None and t[name]["measured"].startswith("not measured: "), name
    assert "sglang-router not installed" in t["hit rate vs sglang-router cache_aware (chat)"]["measured"]
    assert "ai-dynamo-runtime not installed" in t["index ingest vs Dynamo RadixTree"]["measured"]
    # The targets table still lists them, and the systems' tables say why they are missing.
    md = render_markdown(res)
    targets_table = md[md.index("## Targets") : md.index("## Routing")]
    assert "| hit rate vs sglang-router cache_aware (chat) | higher | not measured: sglang-router" in md
    assert targets_table.count("| not measured |") >= 4
    # Targets of the full plan outside this run's (N=5, workload trace) are listed as not measured too.
    assert t["mesh hit-rate loss, 5 nodes vs 1 (chat)"]["met"] is None
    assert "workload trace not run" in t["precise hit rate vs pooled-LRU ideal (trace)"]["measured"]


def test_parts_that_did_not_run_have_no_targets_and_failed_ones_do():
    res = _results()
    del res["proxy"], res["routing"]
    names = {x["name"] for x in targets(res)}
    assert not any("sglang" in n or "goodput" in n for n in names)
    assert "Generate proxy vs bare grpcio" not in names
    res["proxy_error"] = "RuntimeError: echo server did not start"
    t = _targets(res)["Generate proxy vs bare grpcio"]
    assert t["met"] is None and "echo server did not start" in t["measured"]


def test_markdown_has_tables_and_verdicts():
    md = render_markdown(_results(), "kvmesh bench all")
    # hit rate, then % of the pooled LRU, Belady and infinite ideals.
    assert "| kvmesh precise | 0.850 | 94% | 92% | 89% |" in md
    assert "| sglang-router cache_aware | 0.860 |" in md
    assert "**missed**" in md and "**met**" in md
    assert "| real | 5 | 0% |" in md and "| sim | 200 | 1% |" in md
    assert "![convergence](img/convergence.png)" in md
    assert "kvmesh bench all" in md
    # The cache pressure: working set and cache sizes.
    assert "| `chat` | 10 | 1,600 | 1,200 | 90 | 100 | 800 | 50% |" in md
    # Replicas: Δ hit against N=1, for the mesh and for the independent instances.
    assert "| kvmesh precise | 3 | 0.820 | -3.0 |" in md
    assert "| sglang-router cache_aware | 3 | 0.600 | -26.0 |" in md
    # Goodput: estimate and bracket, absolute rate, ratios (a lower bound against a system that failed all).
    assert "| `chat` | kvmesh precise | 3.00 (2-4) | 36 sessions/s | 2.50x | >= 6.00x |" in md
    assert "| `chat` | kvmesh round_robin | < 0.5 | < 6 sessions/s |" in md
    assert "x4: -, 50%" in md


def test_plots_are_written(tmp_path):
    paths = write_plots(_results(), str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == [
        "convergence.png",
        "goodput.png",
        "hit_rate.png",
        "replicas.png",
        "ttft_p90.png",
    ]
    assert all(os.path.getsize(p) > 5000 for p in paths)


def _evidence_docs(tmp_path):
    ev = tmp_path / "evidence"
    ev.mkdir()
    (ev / "b_weights.md").write_text("# Precise weights\n\nWhy 2.0.\n\n## Sweep\n\n```\n# a comment\n```\n")
    (ev / "a_timings.md").write_text("## Gossip interval\n\nWhy 0.2 s.\n")
    (ev / "notes.txt").write_text("not a page")
    return tmp_path


def test_evidence_pages_close_the_page_in_file_name_order(tmp_path):
    pages = read_evidence(_evidence_docs(tmp_path))
    md = render_markdown(_results(), "kvmesh bench all", pages)
    end = md[md.index("## Commands") :]
    assert "## Evidence for defaults" in end
    evidence = end[end.index("## Evidence for defaults") :]
    # Each page's top heading nests under the section; fenced code is left alone.
    assert evidence.index("### Gossip interval") < evidence.index("### Precise weights")
    assert "#### Sweep" in evidence and "\n# a comment\n" in evidence
    assert "Why 2.0." in evidence and "not a page" not in evidence
    assert md.endswith("```\n")


def test_no_evidence_pages_no_heading(tmp_path):
    assert read_evidence(tmp_path) == []
    md = render_markdown(_results(), "kvmesh bench all", read_evidence(tmp_path))
    assert "Evidence for defaults" not in md
    assert md == render_markdown(_results(), "kvmesh bench all")


def test_bench_docs_end_with_the_evidence_pages(tmp_path):
    docs = _evidence_docs(tmp_path)
    write_docs(_results(), docs)
    md = (docs / "benchmarks.md").read_text()
    assert md.rstrip().endswith("```\n# a comment\n```")
    assert md.index("## Commands") < md.index("## Evidence for defaults") < md.index("### Gossip interval")
    (docs / "benchmarks.md").unlink()
    assert rewrite_report(docs) == 0
    assert (docs / "benchmarks.md").read_text() == md


def _micro_both() -> dict:
    """A micro run of both implementations (native first), non-owner apply and memory."""
    res = _results()
    ix = res["micro"]["index"]
    native = {
        "blocks_per_s": 2_400_000.0,
        "entry_per_frame_blocks_per_s": 1_600_000.0,
        "match_p50_us": 20.0,
        "match_p99_us": 50.0,
    }
    python = {"blocks_per_s": 400_000.0, "match_p50_us": 30.0, "match_p99_us": 60.0}
    ix.update(
        native=native,
        python=python,
        kvmesh={**native, "implementation": "native", "hash_128_blocks_us": 35.0},
        ingest_ratio=3.0,
        ingest_ratio_python=0.5,
        match_p99_ratio=0.25,
        match_p99_ratio_python=0.3,
        answers_equal=True,
        events_per_engine_s=3000,
        nonowner={
            "blocks": 1_000_000,
            "entries": 7_813,
            "engines": 1000,
            "entry_blocks": 128,
            "entries_per_update": 4,
            "busy_engine_events_per_s": 3000,
            "paths": {
                "python": {"blocks_per_s": 1_200_000},
                "native": {"blocks_per_s": 9_000_000},
                "mesh_python": {"blocks_per_s": 900_000},
                "mesh_native": {"blocks_per_s": 6_000_000},
            },
        },
    )
    cell = {"bytes_per_block": 38.0, "bytes_per_pair": 26.0}
    res["micro"]["memory"] = {
        "sizes": [1_000_000, 10_000_000],
        "n_engines": 1000,
        "timeout_s": {"native": 900.0, "python": 150.0, "dynamo": 900.0},
        "rows": {
            "native": {"1000000": cell, "10000000": {**cell, "bytes_per_block": 45.0}},
            "python": {
                "1000000": {"bytes_per_block": 210.0, "bytes_per_pair": 140.0},
                "10000000": {"skipped": "not measured: over the 150 s limit"},
            },
            "dynamo": {"1000000": {"bytes_per_block": 110.0, "bytes_per_pair": 75.0}, "10000000": cell},
        },
    }
    return res


def test_micro_targets_native_with_python_beside():
    t = _targets(_micro_both())
    ingest = t["index ingest vs Dynamo RadixTree"]
    assert ingest["met"] is True and ingest["value"] == 3.0
    assert "native 2,400,000 / 800,000 blocks/s = 3.00x" in ingest["measured"]
    assert "pure Python 400,000 blocks/s = 0.50x" in ingest["measured"]
    match = t["prefix match p99 vs Dynamo RadixTree"]
    assert match["met"] is True and "pure Python 60 µs = 0.30x" in match["measured"]
    apply = t["non-owner apply of replicated entries"]
    assert apply["met"] is True and apply["value"] == 9_000_000
    assert "(end to end through the mesh state: 6,000,000)" in apply["measured"]
    assert "pure Python 1,200,000" in apply["measured"]
    engines = t["engines one node keeps up with (3,000 block events/s each, from the non-owner rate)"]
    assert engines["met"] is True and engines["value"] == 2000  # from the end-to-end rate
    assert "pure Python 300" in engines["measured"]
    one = t["memory per indexed block, 1M blocks over 1,000 engines"]
    assert one["met"] is True and "pure Python 210 B" in one["measured"] and "Dynamo 110 B" in one["measured"]
    ten = t["memory per indexed block, 10M blocks over 1,000 engines"]
    assert ten["met"] is False and "pure Python not measured: over the 150 s limit" in ten["measured"]


def test_the_ingest_target_is_the_median_of_paired_runs_not_the_ratio_of_medians():
    res = _micro_both()
    ix = res["micro"]["index"]
    # Medians 2.4M / 0.8M would say 3.00x; the runs side by side say otherwise.
    ix["ingest_ratio_runs"] = [2.5, 2.9, 3.4]
    ix["ingest_ratio"] = 2.9
    ingest = _targets(res)["index ingest vs Dynamo RadixTree"]
    assert ingest["met"] is False and ingest["value"] == 2.9
    assert "runs side by side 2.50x, 2.90x, 3.40x: median = 2.90x" in ingest["measured"]
    md = render_markdown(res)
    assert "| kvmesh native (Rust) | 2,400,000 | 2.90x (paired) |" in md
    assert "| kvmesh pure Python | 400,000 | 0.50x |" in md  # not paired: the medians' ratio


def test_a_missed_ingest_says_where_the_runs_time_went():
    res = _micro_both()
    ix = res["micro"]["index"]
    ix["ingest_ratio_runs"], ix["ingest_ratio"] = [2.5, 2.9, 3.4], 2.9
    ix["kvmesh"]["stage_share"] = {"map": 0.571, "log": 0.22, "index": 0.209}
    md = render_markdown(res)
    assert (
        "Where our time went in this run: decoding, hashing and mapping the frames 57%, "
        "the log entry and the owner's live maps 22%, the index 21%." in md
    )
    ix["native"]["stage_share"] = ix["kvmesh"]["stage_share"]
    assert (
        "over every run: kvmesh native (Rust): map 57%, log and live maps 22%, index 21%."
        in render_markdown(res)
    )
    del ix["kvmesh"]["stage_share"], ix["native"]["stage_share"]  # a run without the stage timings
    md = render_markdown(res)
    assert "Where our time went" not in md and "time by stage" not in md


def test_micro_targets_without_the_native_module_or_the_big_sizes():
    res = _micro_both()
    ix = res["micro"]["index"]
    ix["native"] = {"skipped": "the native module is not built"}
    for path in ("native", "mesh_native"):
        del ix["nonowner"]["paths"][path]
    ix["kvmesh"] = {**ix["python"], "implementation": "python", "hash_128_blocks_us": 35.0}
    ix["ingest_ratio"], ix["match_p99_ratio"] = 0.5, 0.3
    res["micro"]["memory"] = {"sizes": [100_000], "n_engines": 1000, "rows": {"python": {"100000": {}}}}
    t = _targets(res)
    ingest = t["index ingest vs Dynamo RadixTree"]
    assert ingest["met"] is False and ingest["measured"].startswith("python 400,000")
    apply = t["non-owner apply of replicated entries"]
    assert (
        apply["met"] is False and "native not measured (the native module is not built)" in apply["measured"]
    )
    mem = t["memory per indexed block, 1M blocks over 1,000 engines"]
    assert mem["met"] is None and "1,000,000 blocks not in this run's plan" in mem["measured"]


def test_micro_section_shows_every_implementation_side_by_side():
    md = render_markdown(_micro_both())
    assert "| kvmesh native (Rust) | 2,400,000 | 3.00x | 1,600,000 (2.00x) | 20 | 50 | 0.25x |" in md
    assert "| kvmesh pure Python | 400,000 | 0.50x | - | 30 | 60 | 0.30x |" in md  # a run before the column
    assert "| Dynamo RadixTree (Rust) | 800,000 | 1x | - | 70 | 200 | 1x |" in md
    assert (
        "| end to end, native (what a router node runs): packed entries + `NativeIndex` | 6,000,000 | 2,000 |"
        in md
    )
    assert (
        "| kvmesh pure Python | 210 B (140 B per engine-block pair) | not measured: over the 150 s limit |"
        in md
    )
    assert "Native and Python match answers equal: yes." in md
    # A run from before the native path (one "kvmesh" row) still renders.
    assert "| kvmesh | 400,000 | 0.50x | - | 30 | 60 | 0.30x |" in render_markdown(_results())


def test_a_merged_micro_run_says_when_and_on_which_machine_it_ran():
    from kvmesh.benchmarks.report import machine_info

    res = _micro_both()
    res["micro"].update(started="2026-11-30T17:00:00+00:00", machine=machine_info()["machine"])
    md = render_markdown(res)
    assert f"Measured 2026-11-30T17:00:00+00:00 (`kvmesh bench micro`) on {machine_info()['machine']}." in md
    if os.path.exists("/sys/devices/system/cpu/cpu0/cache"):
        assert " caches L" in machine_info()["machine"]


def test_the_suite_length_is_a_target_of_bench_all_with_where_its_time_went():
    res = _results()
    assert not any(n.startswith("suite length") for n in _targets(res))  # one section alone: no target
    res["meta"] = {"duration_s": 1600.0, "quick": False, "machine": "m", "cpus": 2}
    res["meta"]["section_s"] = {"micro": 200.0, "routing": 1100.0, "reliability": 300.0}
    t = _targets(res)["suite length, kvmesh bench all"]
    assert (t["met"], t["target"], t["measured"]) == (False, "under 25 minutes", "1600 s")
    md = render_markdown(res, "kvmesh bench all")
    assert "Where the time went in this run: routing 1100 s, reliability 300 s, micro 200 s." in md
    assert "- duration_s: 1600 s (micro 200 s, routing 1100 s, reliability 300 s)" in md
    res["meta"].update(duration_s=230.0, quick=True)
    t = _targets(res)["suite length, kvmesh bench all --quick"]
    assert (t["met"], t["target"]) == (True, "under 4 minutes")
    res["overload_error"] = "RuntimeError: a router did not start"  # ended early: says nothing
    t = _targets(res)["suite length, kvmesh bench all --quick"]
    assert t["met"] is None and "overload failed" in t["measured"]
