"""The demo's closing lines say what its runs show, from their own figures."""

from __future__ import annotations

from kvmesh.demo import conclusion


def _s(hit: float, p90: float) -> dict[str, float]:
    return {"hit_rate": hit, "ttft_p90_ms": p90}


def test_each_policy_is_compared_with_round_robin_and_the_mesh_with_one_node() -> None:
    lines = conclusion(
        [
            (1, _s(0.585, 276.0), "round_robin"),
            (1, _s(0.866, 160.0), "precise"),
            (3, _s(0.861, 170.0), "precise"),
        ]
    )
    assert lines == [
        "precise vs round_robin through one node: hit rate 0.866 vs 0.585, "
        "TTFT p90 160 vs 276 ms (1.7x lower)",
        "precise spread over 3 nodes vs one node: hit rate 0.861 vs 0.866 (-0.5 points); "
        "every node routes from the same replicated index",
    ]


def test_a_slower_policy_is_called_slower_and_missing_runs_are_not_compared() -> None:
    (line,) = conclusion([(1, _s(0.5, 100.0), "round_robin"), (1, _s(0.6, 200.0), "least_load")])
    assert line.endswith("TTFT p90 200 vs 100 ms (2.0x higher)")
    assert conclusion([(1, _s(0.8, 100.0), "precise"), (3, _s(0.8, 100.0), "round_robin")]) == []


def test_a_run_with_failed_requests_is_compared_with_none() -> None:
    """Every round_robin request failed: no TTFT (p90 0), and no ratio drawn from it."""
    failed = {"hit_rate": 0.0, "ttft_p90_ms": 0.0, "failed": 168}
    assert conclusion([(1, failed, "round_robin"), (1, _s(0.8, 150.0), "precise")]) == []
    partly = {**_s(0.8, 150.0), "failed": 3}
    assert conclusion([(1, _s(0.5, 300.0), "round_robin"), (1, partly, "precise")]) == []
