"""The reliability benchmark's pure parts: outcome tallies, each row's
figures and verdict, the fuzz-settings reader, the test references, the bad
requests, and the page rendered from made-up results (no process is started
here)."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

from kvmesh.benchmarks.reliability import QUICK, ReliabilityConfig, bad_generate_request, quick
from kvmesh.benchmarks.reliability_report import (
    CLAIMS,
    Call,
    bad_inputs_figures,
    engine_kill_figures,
    fuzz_examples,
    lost_batch_figures,
    missing_tests,
    outcome,
    render_markdown,
    router_kill_figures,
    soak_figures,
    tally_outcomes,
)

ROOT = Path(__file__).resolve().parent.parent.parent


def _ok(node: int, t: float, engine: str = "e0", attempts: int = 1) -> Call:
    return Call(node, t, engine=engine, attempts=attempts, t_done=t + 0.5, tokens=20)


def test_outcome_keys_and_tally_order():
    calls = [
        _ok(0, 0.0),
        Call(1, 0.1, "UNAVAILABLE", "engine_failed", t_done=0.2),
        Call(2, 0.2, "UNAVAILABLE", t_done=0.3),  # no reason: the connection failed
        Call(0, 0.3, "UNAVAILABLE", t_done=0.4),
        _ok(1, 0.4),
    ]
    assert [outcome(c) for c in calls[:3]] == ["OK", "UNAVAILABLE:engine_failed", "UNAVAILABLE:-"]
    assert list(tally_outcomes(calls).items()) == [
        ("OK", 2),
        ("UNAVAILABLE:-", 2),
        ("UNAVAILABLE:engine_failed", 1),
    ]
    assert tally_outcomes([]) == {}


def _engine_kill_calls() -> list[Call]:
    broken = Call(0, 2.5, "UNAVAILABLE", "engine_failed", "e2", 1, 3.02, tokens=12)
    return [
        _ok(0, 1.0),
        _ok(1, 2.9, engine="e1", attempts=2),  # its first engine died before its first token
        broken,
        _ok(2, 3.5),
    ]


def test_engine_kill_failures_only_on_streams_that_had_tokens_from_the_killed_engine():
    f = engine_kill_figures(_engine_kill_calls(), "e2", t_kill=3.0)
    assert (f["calls"], f["failed"], f["failed_as_promised"], f["failed_otherwise"]) == (4, 1, 1, 0)
    assert f["retried_ok"] == 1 and f["failed_sent_after_kill"] == 0
    assert abs(f["last_failure_end_s"] - 0.02) < 1e-9
    assert f["as_promised"]


def test_engine_kill_any_other_failure_breaks_the_promise():
    for bad in (
        Call(1, 3.1, "UNAVAILABLE", "no_engine", t_done=3.2),  # not retried elsewhere
        Call(1, 2.8, "UNAVAILABLE", "engine_failed", "e2", 1, 3.1, tokens=0),  # before a token
        Call(1, 2.8, "UNAVAILABLE", "engine_failed", "e1", 1, 3.1, tokens=5),  # another engine
        Call(1, 2.8, "DEADLINE_EXCEEDED", "deadline", "e2", 1, 3.1, tokens=5),
    ):
        f = engine_kill_figures([*_engine_kill_calls(), bad], "e2", t_kill=3.0)
        assert f["failed_otherwise"] == 1 and not f["as_promised"], bad
        assert sum(f["failed_otherwise_outcomes"].values()) == 1
    assert engine_kill_figures([_ok(0, 0.0)], "e2", 1.0)["last_failure_end_s"] is None


def test_router_kill_counts_the_killed_nodes_calls_apart():
    calls = [
        _ok(1, 0.0),  # on the victim, over before the kill: not counted against it
        Call(1, 2.8, "UNAVAILABLE", t_done=3.0),  # running at the kill
        Call(1, 3.1, "UNAVAILABLE", t_done=3.1),  # sent before the client left it out
        _ok(0, 3.2),
        _ok(2, 3.3),
    ]
    f = router_kill_figures(calls, node=1, t_kill=3.0)
    assert f["killed_node_calls"] == 2 and f["killed_node_outcomes"] == {"UNAVAILABLE:-": 2}
    assert f["killed_node_sent_after_kill"] == 1
    assert (f["survivor_calls"], f["survivors_failed"]) == (2, 0)
    f = router_kill_figures([*calls, Call(0, 3.4, "UNAVAILABLE", "no_engine", t_done=3.5)], 1, 3.0)
    assert f["survivors_failed"] == 1 and f["survivor_outcomes"]["UNAVAILABLE:no_engine"] == 1


def test_lost_batch_verdict_needs_every_repeat_matched_in_time_with_one_batch_lost():
    f = lost_batch_figures([0.5, 1.9, 2.1], [1, 1, 1], [1, 1, 1], bound=4.0)
    assert f["as_promised"] and f["median_s"] == 1.9 and f["max_s"] == 2.1
    assert not lost_batch_figures([0.5, None], [1, 1], [1, 0], 4.0)["as_promised"]
    assert not lost_batch_figures([0.5, 4.5], [1, 1], [1, 1], 4.0)["as_promised"]
    assert not lost_batch_figures([0.5, 0.6], [1, 2], [1, 1], 4.0)["as_promised"]  # a later batch followed
    f = lost_batch_figures([], [], [], 4.0)
    assert not f["as_promised"] and f["median_s"] is None


def test_soak_is_flat_when_its_rss_trend_is_and_the_index_fits_the_cache():
    noisy = [100_000, 103_000, 99_000, 102_000, 100_500, 101_000]  # no trend: allocator noise
    times = [float(i) for i in range(len(noisy))]
    f = soak_figures(noisy, times, (399, 398), 400, max_slope=0.05)
    assert f["as_promised"] and abs(f["rss_growth"] - 0.01) < 1e-9
    assert f["rss_peak_mb"] == 103_000 / 1024 and len(f["rss_samples_mb"]) == len(noisy)
    # +1 % of the start a second: +60 % a minute, though it ends only +5 % above its start.
    rising = [100_000 + 1000 * i for i in range(6)]
    f = soak_figures(rising, times, (399, 398), 400, max_slope=0.05)
    assert not f["as_promised"] and abs(f["rss_trend_per_min"] - 0.6) < 1e-9
    assert abs(f["rss_trend_mb_per_min"] - 60_000 / 1024) < 1e-9
    assert not soak_figures(noisy, times, (399, 900), 400)["as_promised"]  # more than the cache
    assert soak_figures([100_000], [0.0], (1, 1), 400)["rss_trend_per_min"] == 0.0


def _after(**kw) -> dict:
    base = {
        "alive": True,
        "health": "SERVING",
        "good_request": "OK",
        "in_flight": 0,
        "node_unclear_outcomes": {},
    }
    return base | kw


def test_bad_inputs_judge_the_api_the_mesh_port_and_the_node():
    api = {
        "INVALID_ARGUMENT:invalid_request": 5,
        "OK (registered, then removed)": 1,
        "NOT_FOUND:unknown_engine": 2,
    }
    fuzz = {"test_a": 150, "test_b": 400}
    f = bad_inputs_figures(api, {"INVALID_ARGUMENT": 10, "OK (3 rejected)": 2}, _after(), True, fuzz)
    assert f["as_promised"] and f["api_calls"] == 8 and f["mesh_calls"] == 12 and f["api_unclear"] == []
    assert "counted by the node: none" in render_markdown({"scenarios": {"bad_inputs": f}})
    assert not bad_inputs_figures({**api, "UNKNOWN": 1}, {}, _after(), True, fuzz)["as_promised"]
    assert not bad_inputs_figures({**api, "NOT_FOUND": 1}, {}, _after(), True, fuzz)[
        "as_promised"
    ]  # no reason
    assert not bad_inputs_figures(api, {"UNKNOWN": 1}, _after(), True, fuzz)["as_promised"]
    assert not bad_inputs_figures({**api, "INTERNAL:internal": 1}, {}, _after(), True, fuzz)["as_promised"]
    for after in (
        _after(alive=False),
        _after(health="NOT_SERVING"),
        _after(good_request="UNAVAILABLE:no_engine"),
        _after(in_flight=1),
        _after(node_unclear_outcomes={"INTERNAL:internal": 1}),
    ):
        assert not bad_inputs_figures(api, {}, after, True, fuzz)["as_promised"], after
    assert not bad_inputs_figures(api, {}, _after(), False, fuzz)["as_promised"]


def test_fuzz_examples_reads_named_and_inline_settings():
    src = (
        "from hypothesis import given, settings\n"
        "FUZZ = settings(max_examples=150, deadline=None)\n"
        "@FUZZ\n@given(x=1)\ndef test_a(x): pass\n"
        "@settings(max_examples=400, deadline=None)\n@given(1)\ndef test_b(x): pass\n"
        "def test_plain(): pass\n"
        "@FUZZ\ndef helper(): pass\n"
    )
    assert fuzz_examples(src) == {"test_a": 150, "test_b": 400}
    real = fuzz_examples((ROOT / "tests/integration/test_fuzz.py").read_text())
    assert len(real) >= 4 and all(n > 0 for n in real.values()), real


def test_every_claimed_test_exists_and_a_wrong_one_is_reported():
    refs = [t for c in CLAIMS for t in c.tests]
    assert missing_tests(refs, ROOT) == []
    wrong = ["tests/unit/test_reliability_bench.py::test_nothing", "tests/no_such_file.py::test_x"]
    assert missing_tests([*refs, *wrong], ROOT) == wrong
    assert [c.key for c in CLAIMS] == [
        "engine_kill",
        "router_kill",
        "engine_restart",
        "lost_batch",
        "bad_inputs",
        "soak",
    ]


def test_bad_requests_are_seeded_and_serialize():
    a = [bad_generate_request(random.Random(7)) for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(1)
    reqs = [bad_generate_request(rng) for _ in range(300)]
    assert len({r.SerializeToString() for r in reqs}) > 250  # varied
    clean_sampling = (4, True)
    assert all(r.ByteSize() > 0 for r in reqs)
    assert any((r.sampling.max_tokens, r.sampling.ignore_eos) != clean_sampling for r in reqs)
    assert any(not r.HasField("prompt") for r in reqs)


def test_quick_changes_only_its_fields():
    full, q = asdict(ReliabilityConfig()), asdict(quick(ReliabilityConfig()))
    assert {k for k in full if full[k] != q[k]} == set(QUICK)
    assert q["soak_seconds"] < full["soak_seconds"]


def _results() -> dict:
    calls = _engine_kill_calls()
    ek = engine_kill_figures(calls, "e2", 3.0) | {
        "engine": "e2",
        "load_rps": 10.0,
        "before_s": 3.0,
        "window_s": 7.0,
    }
    rk = router_kill_figures(calls, 1, 3.0) | {
        "victim": "rel-node-b",
        "victim_engines": ["e1"],
        "load_rps": 10.0,
        "before_s": 3.0,
        "suspect_s": 1.7,
        "dead_s": 5.7,
        "takeover_s": 5.7,
        "match_s": None,
        "as_promised": False,
    }
    lb = lost_batch_figures([0.5, 1.9], [1, 1], [1, 1], 4.0) | {"engine": "e0", "probe_after_s": 2.0}
    fuzz = {"test_a": 150}
    bad = bad_inputs_figures({"INVALID_ARGUMENT:a|b": 3}, {"INVALID_ARGUMENT": 1}, _after(), True, fuzz)
    return {
        "meta": {"command": "kvmesh bench reliability", "duration_s": 61.4, "cpus": 2},
        "config": {"load_rps": 10.0},
        "scenarios": {
            "engine_kill": ek,
            "router_kill": rk,
            "engine_restart": {"error": "RuntimeError: no engine was killed"},
            "lost_batch": lb,
            "bad_inputs": bad,
        },
        "missing_tests": [CLAIMS[0].tests[0]],
    }


def test_the_page_has_one_row_per_claim_in_order_with_its_verdict():
    md = render_markdown(_results())
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(CLAIMS)
    for row, claim in zip(rows, CLAIMS):
        assert row.startswith(f"| {claim.fault} |")
        assert row.count(" | ") == 4  # five cells: escaped pipes inside a cell do not split it
    verdicts = [row.rsplit("|", 2)[-2].strip() for row in rows]
    assert verdicts == ["yes", "**no**", "n/a", "yes", "yes", "n/a"]
    assert "did not run: RuntimeError: no engine was killed" in rows[2]
    assert rows[5].endswith("| not run | n/a |")
    assert f"`{CLAIMS[0].tests[0]}` (missing)" in rows[0]
    assert "UNAVAILABLE:engine_failed 1" in rows[0] and "never" in rows[1]
    assert "INVALID_ARGUMENT:a\\|b 3" in rows[4]
    assert "- duration_s: 61 s" in md and "- command: kvmesh bench reliability" in md
    assert "load_rps=10.0" in md


def test_the_soak_and_restart_rows_render_from_their_figures():
    soak = soak_figures(
        [80_000 + 300 * i for i in range(61)], [float(i) for i in range(61)], (399, 398), 400
    ) | {
        "seconds": 60.0,
        "warmup_s": 5.0,
        "requests": 12_000,
        "failed": 0,
        "evictions": 300_000,
    }
    restart = {
        "engine": "e2",
        "down_s": 5.0,
        "stale_blocks": 258,
        "engine_blocks_at_restart": 0,
        "match_s": 2.0,
        "requests": 2,
        "served_by_engine": 1,
        "first_served_s": 1.8,
        "resets": 1,
        "as_promised": True,
    }
    md = render_markdown({"scenarios": {"soak": soak, "engine_restart": restart}})
    assert "every 10 s: 78, 81, 84, 87, 90, 93, 96 MB), trend +17.6 MB/min (+22.5% of the start" in md
    assert "258 blocks of the old process" in md and "2.0 s after the restart" in md
