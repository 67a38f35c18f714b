"""The routing benchmark's plan from its flags (systems, replicas, ladder),
system names, and caches sized to a workload's working set (pressure)."""

from __future__ import annotations

import argparse

import pytest

from kvmesh.bench import build_workloads, configure_parser, routing_plan
from kvmesh.benchmarks.routing import QUICK, RoutingPlan, cache_sizing
from kvmesh.benchmarks.systems import FleetConfig, SystemSpec
from kvmesh.workloads import chat_workload


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    configure_parser(p)
    return p.parse_args(["routing", *argv])


def test_system_names():
    assert SystemSpec.parse("precise") == SystemSpec("precise", 1)
    assert SystemSpec.parse("sglang_cache_aware@5").key == "sglang_cache_aware@5"
    assert SystemSpec.parse("precise_mesh3") == SystemSpec("precise", 3)
    for bad in ("nope", "precise@x", "precise@0"):
        with pytest.raises(ValueError):
            SystemSpec.parse(bad)


def test_default_plan_runs_every_replica_count_of_every_family_once():
    specs = [s.key for s in RoutingPlan().specs()]
    assert len(specs) == len(set(specs))
    for fam in ("precise", "cache_aware_approx", "sglang_cache_aware", "round_robin"):
        assert {fam, f"{fam}@3", f"{fam}@5"} <= set(specs)
    ladder = {s.key for s in RoutingPlan().ladder_specs()}
    assert ladder == {f + sfx for f in ("precise", "sglang_cache_aware", "round_robin") for sfx in ("", "@3")}
    assert ladder <= set(specs)  # a ladder starts from the system's nominal run


def test_flags_shape_the_plan():
    plan = routing_plan(_args("--systems", "precise,round_robin", "--replicas", "1,3", "--slo-ms", "500"))
    assert plan.replicas == (1, 3) and plan.slo_ms == 500.0
    # Given systems narrow the replicas table and the goodput search to their families.
    assert plan.replica_families == ("precise", "round_robin")
    assert plan.ladder_families == ("precise", "round_robin")
    assert [s.key for s in plan.specs()] == ["precise", "round_robin", "precise@3", "round_robin@3"]
    plan = routing_plan(_args("--quick", "--ladder-systems", "round_robin", "--ladder-steps", "1"))
    assert plan.replicas == QUICK.replicas and plan.ladder_families == ("round_robin",)
    assert plan.ladder_steps == 1
    with pytest.raises(SystemExit, match="unknown system"):
        routing_plan(_args("--systems", "precise,nope"))


def test_missing_trace_is_a_clear_error(tmp_path):
    args = _args("--workload", "trace", "--mooncake", str(tmp_path / "none.jsonl"))
    with pytest.raises(SystemExit, match="Mooncake trace not found"):
        build_workloads(args, 1000.0)


def test_caches_hold_the_pressure_share_of_the_working_set():
    w = chat_workload(n_sessions=48, rate=12.0, seed=1, turns=(3, 6))
    s = cache_sizing(w, FleetConfig(engines=8, pressure=0.5))
    assert s["fleet_blocks"] == 8 * s["blocks_per_engine"]
    assert s["blocks_per_engine"] >= s["longest_request_blocks"]  # the longest request fits
    assert 0.5 <= s["fleet_share_of_working_set"] < 0.6
    # Under pressure an LRU pool loses hits an infinite cache keeps; the offline optimum loses fewer.
    p = s["planned"]
    assert p["pooled_lru_hit_rate"] < p["belady_hit_rate"] < p["ideal_hit_rate"]
    # Pressure 0: every engine gets --num-gpu-blocks whatever the workload.
    assert cache_sizing(w, FleetConfig(pressure=0.0, num_gpu_blocks=123))["blocks_per_engine"] == 123
