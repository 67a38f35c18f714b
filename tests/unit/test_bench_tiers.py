"""The pure parts of ``kvmesh bench tiers``: hit rates by tier from the
engines' counters, cache sizing under pressure, and its section of
docs/benchmarks.md replaced in place, the rest of the page kept."""

from __future__ import annotations

import pytest

from kvmesh.benchmarks.tiers import (
    BEGIN,
    END,
    SETUPS,
    TiersConfig,
    quick,
    render_markdown,
    replace_section,
    sizing,
    tier_rates,
)


def test_tier_rates_sum_the_engines_counters() -> None:
    stats = [
        {"prefix_query_tokens": 1000, "prefix_hit_tokens": 300, "host_hit_tokens": 200},
        {"prefix_query_tokens": 1000, "prefix_hit_tokens": 100, "host_hit_tokens": 0},
    ]
    assert tier_rates(stats) == pytest.approx({"gpu": 0.2, "host": 0.1, "total": 0.3})
    assert tier_rates([{"prefix_query_tokens": 0, "prefix_hit_tokens": 0}]) == {
        "gpu": 0.0,
        "host": 0.0,
        "total": 0.0,
    }


def test_sizing_puts_the_gpu_under_the_working_set_but_fits_the_longest_request() -> None:
    cfg = quick(TiersConfig())
    size = sizing(cfg, cfg.workload())
    assert size["gpu_blocks"] > size["longest_request_blocks"]  # any request can run
    assert size["gpu_blocks"] * cfg.engines < size["working_set_blocks"]  # under pressure
    assert (size["gpu_blocks"] + size["host_blocks"]) * cfg.engines >= size["working_set_blocks"]


def _result(name: str, gpu: float, host: float, p90: float) -> dict:
    return {
        "setup": name,
        "hit_rate": {"gpu": gpu, "host": host, "total": gpu + host},
        "ttft_p50_ms": p90 / 2,
        "ttft_p90_ms": p90,
        "gpu_evictions": 10,
        "host_evictions": 0,
        "index_blocks_by_tier": {"gpu": 5, "host": 7} if host else {"gpu": 5},
        "failed": 0,
        "errors": [],
    }


RES = {
    "config": {"engines": 3, "time_scale": 1.0, "seed": 0},
    "workload": {"requests": 9, "sessions": 3, "session_rate_per_s": 2.0, "think_s": 8.0},
    "sizing": {"working_set_blocks": 1000, "gpu_blocks": 100, "host_blocks": 400},
    "setups": [
        _result(SETUPS[0].name, 0.3, 0.0, 2000.0),
        _result(SETUPS[1].name, 0.3, 0.4, 800.0),
        _result(SETUPS[2].name, 0.3, 0.5, 500.0),
    ],
    "started": "2026-01-01T00:00:00Z",
    "duration_s": 60.0,
}


def test_the_section_has_a_row_per_setup_with_its_tiers_and_ttft() -> None:
    md = render_markdown(RES, "kvmesh bench tiers")
    assert md.startswith(BEGIN) and md.rstrip().endswith(END)
    assert "| no host tier | 30.0% | 0.0% | 30.0% | 1,000 | 2,000 |" in md
    assert "| host tier | 30.0% | 50.0% | 80.0% | 250 | 500 |" in md
    assert "0.25x" in md and "0.40x" in md  # p90 against the run without a host tier


def test_the_section_is_replaced_in_place_or_appended() -> None:
    section = render_markdown(RES, "kvmesh bench tiers")
    page = "# kvmesh benchmarks\n\nbefore\n"
    once = replace_section(page, section)
    assert once.startswith(page.rstrip("\n")) and once.count(BEGIN) == 1
    again = replace_section(once + "\n## after\n", section.replace("2,000", "3,000"))
    assert again.count(BEGIN) == 1 and "3,000" in again and "2,000 |" not in again
    assert again.startswith(page.rstrip("\n")) and again.rstrip().endswith("## after")
