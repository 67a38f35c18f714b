"""Benchmark report: targets (met / missed, measured ratios), markdown and
plots rendered from a small results dict, and the hand-written evidence
pages (docs/evidence/*.md) at the end of the page."""

from __future__ import annotations

import os

from kvmesh.bench import rewrite_report, write_docs
from kvmesh.benchmarks.plots import write_plots
from kvmesh.benchmarks.report import read_evidence, render_markdown
from kvmesh.benchmarks.targets import targets


def _sys(hit: float, ideal: float, p90: float) -> dict:
    return {
        "requests": 10,
        "failed": 0,
        "hit_rate": hit,
        "ideal_hit_rate": ideal,
        "ttft_p50_ms": p90 / 2,
        "ttft_p90_ms": p90,
        "ttft_p99_ms": p90 * 2,
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


def _results() -> dict:
    ov = {
        "direct_ttft_p50_ms": 15.0,
        "via_ttft_p50_ms": 18.0,
        "overhead_ms": 3.0,
        "route_rpc_p50_ms": 1.5,
        "route_rpc_p99_ms": 4.0,
    }
    return {
        "meta": {"command": "kvmesh bench all", "cpus": 2},
        "routing": {
            "fleet": {
                "engines": 8,
                "num_gpu_blocks": 4000,
                "time_scale": 1.0,
                "block_size": 16,
                "prefill_tokens_per_s": 80000.0,
            },
            "workloads": {"chat": {"params": {"sessions": 4}, "requests": 10}},
            "systems": {
                "round_robin": {"overhead": ov, "chat": _sys(0.5, 0.9, 2000.0)},
                "precise": {"overhead": ov, "chat": _sys(0.85, 0.9, 100.0)},
                "precise_mesh3": {"overhead": ov, "chat": _sys(0.82, 0.9, 110.0)},
                "sglang_cache_aware": {
                    "overhead": {**ov, "route_rpc_p50_ms": None},
                    "chat": _sys(0.86, 0.9, 300.0),
                },
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
            "sim": [{"n": 100, "p50": 0.9, "p99": 2.5, "bytes_per_event": 9e4, "missing": 0}],
        },
        "proxy": {
            "echo": {"requests_per_s": 400.0, "messages_per_s": 7200.0},
            "kvmesh": {"requests_per_s": 300.0, "messages_per_s": 5400.0},
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


def test_targets_verdicts_and_ratios():
    t = {x["name"]: x for x in targets(_results())}
    assert t["precise hit rate vs ideal (chat)"]["met"] is True  # 0.85 / 0.9 = 94% >= 90%
    assert abs(t["precise hit rate vs ideal (chat)"]["value"] - 0.85 / 0.9) < 1e-9


def test_targets_all_kinds():
    t = {x["name"]: x for x in targets(_results())}
    assert t["TTFT p90 vs round_robin (chat)"]["value"] == 20.0 and t["TTFT p90 vs round_robin (chat)"]["met"]
    assert t["hit rate vs sglang-router cache_aware (chat)"]["met"] is False  # 0.85 < 0.86
    assert t["TTFT p90 vs sglang-router cache_aware (chat)"]["met"] is True  # 300 / 100 = 3x
    assert t["3-node mesh hit-rate loss vs 1 node (chat)"]["met"] is False  # 3 points > 2
    assert t["index ingest vs Dynamo RadixTree"]["met"] is False
    assert t["prefix match p99 vs Dynamo RadixTree"]["met"] is True
    assert t["convergence p99, 5 real nodes"]["met"] is True
    assert t["convergence p99, 100 simulated nodes"]["met"] is False
    assert t["Generate proxy vs bare grpcio"]["met"] is True
    assert "0.50x" in t["index ingest vs Dynamo RadixTree"]["measured"]


def test_missing_sections_are_not_targets():
    res = _results()
    del res["routing"]["systems"]["sglang_cache_aware"], res["proxy"]
    names = {x["name"] for x in targets(res)}
    assert not any("sglang" in n for n in names) and "Generate proxy vs bare grpcio" not in names


def test_markdown_has_tables_and_verdicts():
    md = render_markdown(_results(), "kvmesh bench all")
    assert "| kvmesh precise (1 node) | 0.850 | 94% |" in md
    assert "| sglang-router cache_aware | 0.860 |" in md
    assert "**missed**" in md and "**met**" in md
    assert "| real | 5 | 100 | 300 |" in md
    assert "![convergence](img/convergence.png)" in md
    assert "kvmesh bench all" in md


def test_plots_are_written(tmp_path):
    paths = write_plots(_results(), str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["convergence.png", "hit_rate.png", "ttft_p90.png"]
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
