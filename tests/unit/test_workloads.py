"""Benchmark workloads: seeded determinism, shape, Mooncake parsing and
scaling, load scaling, the requests planned before a run, and the splits."""

from __future__ import annotations

import itertools
import json

import pytest

from kvmesh.benchmarks.ideals import infinite_hit_rate, request_blocks
from kvmesh.workloads import (
    SPLITS,
    agent_workload,
    chat,
    chat_workload,
    load_mooncake,
    mooncake_workload,
    no_sharing_workload,
)


def ideal_hit_rate(reqs: list[tuple[list[int], list[int]]], block_size: int = 16) -> float:
    return infinite_hit_rate(request_blocks(reqs, block_size), block_size)


def test_chat_is_unchanged_and_seeded():
    a, b = chat(n_sessions=6, seed=3), chat(n_sessions=6, seed=3)
    assert [s.user_turns for s in a] == [s.user_turns for s in b]
    assert chat(n_sessions=6, seed=4)[0].user_turns != a[0].user_turns
    # chat_workload keeps chat()'s sessions (the demo relies on chat()).
    w = chat_workload(n_sessions=6, seed=3, system_tokens=(400, 1000), user_tokens=(100, 300), max_tokens=48)
    assert [s.user_turns for s in w.sessions] == [s.user_turns for s in a]


def test_chat_workload_shape_and_arrivals():
    w = chat_workload(n_sessions=40, rate=8.0, seed=1)
    starts = [s.start_s for s in w.sessions]
    assert starts == sorted(starts) and starts[0] == 0.0
    assert 40 / 8.0 * 0.4 < w.duration_s < 40 / 8.0 * 2.0  # Poisson arrivals at ~8/s
    systems = {tuple(s.system) for s in w.sessions}
    assert 1 < len(systems) <= 8  # shared system prompts
    assert all(4 <= len(s.user_turns) <= 10 and s.append_answers for s in w.sessions)
    assert w.requests == sum(len(s.user_turns) for s in w.sessions)
    assert chat_workload(n_sessions=40, rate=8.0, seed=1).sessions[5].start_s == w.sessions[5].start_s


def test_agent_workload_long_shared_prefix_short_outputs():
    w = agent_workload(n_sessions=12, n_agents=2, seed=2)
    prefixes = {tuple(s.system) for s in w.sessions}
    assert len(prefixes) == 2
    assert all(2000 <= len(p) <= 4000 for p in prefixes)
    assert all(m <= 32 for s in w.sessions for m in s.max_tokens)
    assert (
        agent_workload(n_sessions=12, n_agents=2, seed=2).sessions[3].user_turns == w.sessions[3].user_turns
    )


def test_no_sharing_prompts_share_nothing():
    w = no_sharing_workload(n_requests=30, seed=5)
    reqs: list[tuple[list[int], list[int]]] = [(s.system + s.user_turns[0], []) for s in w.sessions]
    assert all(not s.append_answers and len(s.user_turns) == 1 for s in w.sessions)
    assert ideal_hit_rate(reqs) == 0.0


def _trace(tmp_path, rows):
    p = tmp_path / "trace.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(p)


def test_mooncake_parsing_and_scaling(tmp_path):
    path = _trace(
        tmp_path,
        [
            {"timestamp": 0, "input_length": 1100, "output_length": 512, "hash_ids": [0, 1, 2]},
            {"timestamp": 2000, "input_length": 600, "output_length": 8, "hash_ids": [0, 3]},
            {"timestamp": 4000, "input_length": 1024, "output_length": 100, "hash_ids": [0, 1]},
        ],
    )
    recs = load_mooncake(path)
    assert [r.hash_ids for r in recs] == [(0, 1, 2), (0, 3), (0, 1)]
    w = mooncake_workload(recs, tokens_per_block=64)
    p0, p1, p2 = (s.user_turns[0] for s in w.sessions)
    # 1100 tokens = 2 full blocks + 76 -> 2 * 64 + ceil(76 / 8) tokens.
    assert len(p0) == 128 + 10 and len(p1) == 64 + 11 and len(p2) == 128
    assert p0[:64] == p1[:64] == p2[:64]  # equal hash ids -> equal tokens
    assert p0[:128] == p2 and p1[64:] != p0[64:75]
    assert [s.max_tokens[0] for s in w.sessions] == [64, 1, 12]  # outputs scaled by 64/512
    assert [s.start_s for s in w.sessions] == [0.0, 2.0, 4.0]
    # Scaled to offer a target token rate: (138 + 75 + 128) tokens over 4 s / factor.
    fast = mooncake_workload(recs, tokens_per_block=64, target_tokens_per_s=341.0)
    assert fast.sessions[2].start_s == pytest.approx(1.0)
    assert fast.params["time_factor"] == pytest.approx(4.0)
    assert mooncake_workload(recs, tokens_per_block=64).sessions[1].user_turns == w.sessions[1].user_turns


def test_mooncake_bad_record_names_the_line(tmp_path):
    path = _trace(
        tmp_path,
        [
            {"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]},
            {"timestamp": 1, "input_length": 10},
        ],
    )
    with pytest.raises(ValueError, match=":2:"):
        load_mooncake(path)
    assert len(load_mooncake(path, limit=1)) == 1


def test_scaled_divides_arrivals_and_think_time_and_keeps_sessions():
    w = chat_workload(n_sessions=10, rate=4.0, seed=2)
    fast = w.scaled(2.0)
    assert [s.start_s for s in fast.sessions] == pytest.approx([s.start_s / 2 for s in w.sessions])
    assert [s.user_turns for s in fast.sessions] == [s.user_turns for s in w.sessions]
    assert [s.think_s for s in fast.sessions] == pytest.approx([s.think_s / 2 for s in w.sessions])
    assert fast.params["load"] == 2.0 and fast.scaled(1.5).params["load"] == 3.0
    assert w.sessions[3].start_s == chat_workload(n_sessions=10, rate=4.0, seed=2).sessions[3].start_s
    with pytest.raises(ValueError):
        w.scaled(0)


def test_planned_requests_follow_each_session_in_order():
    w = chat_workload(n_sessions=3, rate=100.0, seed=4, turns=(2, 3), max_tokens=5)
    plan = w.planned_requests(latency_s=0.5)
    assert len(plan) == w.requests
    by_session: dict[int, list[tuple[list[int], list[int]]]] = {}
    for prompt, answer in plan:
        first = [s.system + s.user_turns[0] for s in w.sessions]  # every turn starts with its session's first
        sid = next(i for i, f in enumerate(first) if prompt[: len(f)] == f)
        by_session.setdefault(sid, []).append((prompt, answer))
    for turns in by_session.values():
        for (p0, a0), (p1, _) in itertools.pairwise(turns):
            assert p1[: len(p0) + len(a0)] == p0 + a0  # the next turn carries the planned answer
        assert all(len(a) == 5 for _, a in turns)
    assert plan == w.planned_requests(latency_s=0.5)  # seeded


def test_splits_keep_tuning_apart_from_what_is_reported():
    tuning, held = SPLITS["tuning"], SPLITS["heldout"]
    assert tuning.seed != held.seed and tuning.trace_offset != held.trace_offset


def test_ideal_hit_rate_on_a_hand_made_trace():
    bs = 4
    a = [1, 2, 3, 4, 5, 6, 7, 8]  # 2 blocks
    # 1st: cold. 2nd: same 2 blocks + 1 token -> hits both (8 tokens).
    # 3rd: exactly a again: at most (8 - 1) // 4 = 1 block counts (last token always computed).
    # 4th: first block differs -> nothing, even though the 2nd block's tokens were seen.
    reqs: list[tuple[list[int], list[int]]] = [
        (a, []),
        (a + [9], []),
        (a, []),
        ([0, 0, 0, 0] + a[4:] + [9], []),
    ]
    want = (0 + 8 + 4 + 0) / (8 + 9 + 8 + 9)
    assert ideal_hit_rate(reqs, bs) == pytest.approx(want)


def test_ideal_hit_rate_counts_cached_outputs():
    bs = 4
    p1, out = [1, 2, 3, 4], [5, 6, 7, 8]
    # The answer's block is cached by the engine; the next turn carries it.
    reqs = [(p1, out), (p1 + out + [9, 9], [])]
    assert ideal_hit_rate(reqs, bs) == pytest.approx(8 / (4 + 10))
    assert ideal_hit_rate([(p1, []), (p1 + out + [9, 9], [])], bs) == pytest.approx(4 / 14)
