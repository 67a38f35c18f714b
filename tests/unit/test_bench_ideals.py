"""The ideals a routing run is held to: one infinite cache, one pooled LRU
cache of the fleet's blocks, its offline optimum (Belady), and the working
sets, on hand-made request sequences whose answers are worked out below."""

from __future__ import annotations

import random

import pytest

from kvmesh.benchmarks.ideals import (
    belady_hit_rate,
    ideals,
    infinite_hit_rate,
    lru_working_set_blocks,
    pooled_lru_hit_rate,
    request_blocks,
    working_set_blocks,
)

BS = 4


def _blocks(*ids: int) -> list[int]:
    """Full blocks of tokens: one block of BS copies of each id."""
    return [i for i in ids for _ in range(BS)]


A, B, C, D = _blocks(1), _blocks(2), _blocks(3), _blocks(4)
TAIL = [9]  # one more token: the blocks before it may all hit


def test_infinite_hits_the_longest_seen_prefix():
    a = list(range(1, 9))  # 2 blocks
    reqs = request_blocks([(a, []), (a + [9], []), (a, []), ([0, 0, 0, 0, *a[4:], 9], [])], BS)
    # cold; both blocks; at most (8 - 1) // 4 = 1 block; first block differs: nothing.
    assert infinite_hit_rate(reqs, BS) == pytest.approx((0 + 8 + 4 + 0) / (8 + 9 + 8 + 9))


def test_a_failed_request_counts_in_every_denominator():
    ok = [(A + B + TAIL, []), (A + B + TAIL, [])]
    failed = [(A + B + TAIL, []), (C + D + TAIL, []), (A + B + TAIL, [])]
    assert infinite_hit_rate(request_blocks(ok, BS), BS) == pytest.approx(8 / 18)
    # The failed request's prompt is still there: more tokens, and one the cache could not help.
    assert infinite_hit_rate(request_blocks(failed, BS), BS) == pytest.approx(8 / 27)


def test_pooled_lru_forgets_what_did_not_fit():
    reqs = request_blocks([(A + B + TAIL, []), (C + D + TAIL, []), (A + B + TAIL, [])], BS)
    # Capacity 4 holds both prompts: the third hits A and B.
    assert pooled_lru_hit_rate(reqs, 4, BS) == pytest.approx(8 / 27)
    # Capacity 2: C and D pushed A and B out.
    assert pooled_lru_hit_rate(reqs, 2, BS) == 0.0
    assert pooled_lru_hit_rate(reqs, 0, BS) == 0.0


def test_pooled_lru_releases_a_request_tail_first():
    # Capacity 3: after A B, then C (a new root), the LRU victim is B, the tail
    # of the least recent request, never its prefix A.
    reqs = request_blocks([(A + B + TAIL, []), (C + TAIL, []), (A + TAIL, [])], BS)
    assert pooled_lru_hit_rate(reqs, 2, BS) == pytest.approx(4 / (9 + 5 + 5))


def test_belady_keeps_what_comes_back_soonest():
    # A B used again at the end, C D never: capacity 2 keeps A B under Belady, not under LRU.
    reqs = request_blocks([(A + B + TAIL, []), (C + D + TAIL, []), (A + B + TAIL, [])], BS)
    assert belady_hit_rate(reqs, 2, BS) == pytest.approx(8 / 27)
    assert pooled_lru_hit_rate(reqs, 2, BS) == 0.0


def test_belady_evicts_a_suffix_before_its_prefix():
    # Capacity 1: A B, then A again: keeping A (the prefix) is the only useful choice.
    reqs = request_blocks([(A + B + TAIL, []), (A + TAIL, [])], BS)
    assert belady_hit_rate(reqs, 1, BS) == pytest.approx(4 / 14)


def test_working_sets_against_the_caches_they_size():
    reqs = request_blocks([(A + B + TAIL, []), (C + D + TAIL, []), (A + B + TAIL, [])], BS)
    # Held across request 2: A and B (C and D are never asked for again).
    assert working_set_blocks(reqs) == 2
    assert belady_hit_rate(reqs, 2, BS) == infinite_hit_rate(reqs, BS)
    assert belady_hit_rate(reqs, 1, BS) < infinite_hit_rate(reqs, BS)
    # LRU needs room for the blocks nobody asks for again too.
    assert lru_working_set_blocks(reqs, 0.0, BS) == 4


def test_ideals_order_on_random_sessions():
    rng = random.Random(3)
    prefixes = [[rng.randrange(100, 999) for _ in range(BS * rng.randint(2, 6))] for _ in range(5)]
    seq = []
    for _ in range(60):
        p = rng.choice(prefixes)
        seq.append((p + [rng.randrange(100, 999) for _ in range(rng.randint(1, 9))], []))
    reqs = request_blocks(seq, BS)
    ws = working_set_blocks(reqs)
    lru_ws = lru_working_set_blocks(reqs, 0.01, BS)
    inf = infinite_hit_rate(reqs, BS)
    for cap in (1, 3, ws // 2, ws, 2 * ws):
        lru, opt = pooled_lru_hit_rate(reqs, cap, BS), belady_hit_rate(reqs, cap, BS)
        assert lru <= opt + 1e-12 <= inf + 2e-12
    assert belady_hit_rate(reqs, ws, BS) == pytest.approx(inf)
    assert pooled_lru_hit_rate(reqs, lru_ws, BS) >= 0.99 * inf > pooled_lru_hit_rate(reqs, lru_ws - 1, BS)
    got = ideals(seq, ws, BS).as_dict()
    assert got["ideal_hit_rate"] == pytest.approx(inf) and got["working_set_blocks"] == ws


def test_no_reuse_no_working_set():
    reqs = request_blocks([(_blocks(i, i + 1) + TAIL, []) for i in range(0, 20, 2)], BS)
    assert working_set_blocks(reqs) == 0 and lru_working_set_blocks(reqs, 0.01, BS) == 0
    assert infinite_hit_rate(reqs, BS) == 0.0
