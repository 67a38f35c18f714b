import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from blocks.tiers import TIER_DISK, TIER_HOST
from router.approx_tree import ApproxTree
from router.errors import NoEngineAvailable
from router.index import PrefixIndex
from router.policies import (
    POLICY_NAMES,
    Candidate,
    RouteRequest,
    candidates_from,
    is_imbalanced,
    make_policy,
)

PROMPT = list(range(1000, 1016))  # 16 chained block hashes
WORKERS = [f"e{i}" for i in range(6)]


def req(hashes=PROMPT, session=None, rid="r1", bs=16):
    return RouteRequest(
        rid, list(hashes), prompt_tokens=len(hashes) * bs + 3, session_key=session, block_size=bs
    )


def policy(name, index=None, **opts):
    return make_policy(name, index=index if index is not None else PrefixIndex(), **opts)


# -- candidates ----------------------------------------------------------------------


def test_candidates_from_loads_tokens_and_health():
    cands = candidates_from(["a", "b", "c"], {"a": 1, "b": 4}, unhealthy={"c"}, tokens={"a": 100.0})
    assert [(c.worker, c.load, c.healthy, c.load_tokens) for c in cands] == [
        ("a", 1.0, True, 100.0),
        ("b", 4.0, True, 0.0),
        ("c", 0.0, False, 0.0),
    ]
    assert candidates_from(["a"], {"a": 7})[0].load_tokens is None  # tokens not tracked


# -- registry and errors -----------------------------------------------------------


def test_registry_names_and_unknown_policy():
    assert set(POLICY_NAMES) == {
        "round_robin",
        "random",
        "consistent_hash",
        "least_load",
        "power_of_two",
        "cache_aware_approx",
        "precise",
    }
    for name in POLICY_NAMES:
        assert make_policy(name, index=PrefixIndex()).name == name
    with pytest.raises(ValueError) as e:
        make_policy("fastest")
    assert "round_robin" in str(e.value) and "precise" in str(e.value)
    with pytest.raises(ValueError):
        make_policy("precise")  # needs an index
    with pytest.raises(ValueError):
        make_policy("least_load", bogus=1)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_no_candidates_or_none_healthy(name):
    p = policy(name)
    rng = random.Random(0)
    with pytest.raises(NoEngineAvailable):
        p.choose(req(), [], 0.0, rng)
    with pytest.raises(NoEngineAvailable):
        p.choose(req(), [Candidate("a", healthy=False), Candidate("b", healthy=False)], 0.0, rng)
    with pytest.raises(ValueError):
        p.choose(req(), [Candidate("a"), Candidate("a")], 0.0, rng)


# -- properties common to every policy ---------------------------------------------

cand_st = st.lists(
    st.tuples(st.sampled_from(WORKERS), st.integers(0, 80), st.booleans(), st.integers(0, 16)),
    min_size=1,
    max_size=6,
    unique_by=lambda t: t[0],
)


@given(
    name=st.sampled_from(POLICY_NAMES),
    cands=cand_st,
    seed=st.integers(0, 2**32),
    session=st.none() | st.text(max_size=5),
)
@settings(max_examples=300, deadline=None)
def test_chosen_is_healthy_and_explain_lists_every_candidate(name, cands, seed, session):
    assume(any(h for _, _, h, _ in cands))
    idx = PrefixIndex()
    for w, _, _, cached in cands:
        idx.store(w, PROMPT[:cached])
    p = make_policy(name, index=idx)
    if name == "cache_aware_approx":
        for w, _, _, cached in cands:
            p.tree.insert(w, PROMPT[:cached], 0.0)
    candidates = [Candidate(w, load=float(load), healthy=h) for w, load, h, _ in cands]
    d = p.choose(req(session=session), candidates, 1.0, random.Random(seed))
    healthy = {w for w, _, h, _ in cands if h}
    assert d.worker in healthy and d.policy == name
    assert [c.worker for c in d.candidates] == [w for w, *_ in cands]
    assert [c.chosen for c in d.candidates].count(True) == 1
    # every policy reports the true cached overlap (the index, or for approx the tree)
    assert {c.worker: c.overlap_blocks for c in d.candidates} == {w: cached for w, _, _, cached in cands}
    text = d.explain()
    for w, _, _, cached in cands:
        assert f"{w}: overlap {cached}/16 blocks" in text
    assert d.reason and d.reason in text


# -- precise ---------------------------------------------------------------------


@given(
    overlaps=st.lists(st.integers(0, 16), min_size=2, max_size=6),
    load=st.integers(0, 30),
    seed=st.integers(0, 2**32),
    tokens=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_precise_picks_strictly_longest_overlap_when_loads_equal(overlaps, load, seed, tokens):
    best = max(overlaps)
    assume(overlaps.count(best) == 1)
    idx = PrefixIndex()
    ws = [f"w{i}" for i in range(len(overlaps))]
    for w, k in zip(ws, overlaps):
        idx.store(w, PROMPT[:k])
    cands = [Candidate(w, load=float(load), load_tokens=load * 100.0 if tokens else None) for w in ws]
    d = make_policy("precise", index=idx).choose(req(), cands, 0.0, random.Random(seed))
    assert d.worker == ws[overlaps.index(best)]


def test_precise_weighs_overlap_against_load():
    idx = PrefixIndex()
    idx.store("hot", PROMPT)  # full 16-block hit
    p = make_policy("precise", index=idx, overlap_weight=1.0, delay_weight=0.0)  # Dynamo's rule
    r = req()  # 259 tokens: 16.19 blocks
    # hot has 10 blocks of queued work, cold none: 16.19 uncached vs 10 busy -> hot wins
    d = p.choose(
        r, [Candidate("hot", 1, load_tokens=160), Candidate("cold", 0, load_tokens=0)], 0, random.Random(0)
    )
    assert d.worker == "hot"
    assert "overlap 16/16" in d.reason
    # 20 blocks of queued work outweighs 16.19 blocks of saved prefill
    d = p.choose(
        r, [Candidate("hot", 2, load_tokens=320), Candidate("cold", 0, load_tokens=0)], 0, random.Random(0)
    )
    assert d.worker == "cold"
    scores = {c.worker: c.score for c in d.candidates}
    assert scores["hot"] == pytest.approx(0.1875 + 20) and scores["cold"] == pytest.approx(259 / 16)
    # a larger overlap weight favours the cache again
    p2 = make_policy("precise", index=idx, overlap_weight=2.0, delay_weight=0.0)
    d = p2.choose(
        r, [Candidate("hot", 2, load_tokens=320), Candidate("cold", 0, load_tokens=0)], 0, random.Random(0)
    )
    assert d.worker == "hot"


def test_precise_delay_weight_charges_recompute_by_the_requests_it_stalls():
    idx = PrefixIndex()
    idx.store("hot", PROMPT)
    r = req()  # 259 tokens: 16.19 blocks, all cached on hot
    # A busy fleet: hot has 24 blocks queued, cold 4; both run 6 requests.
    cands = [Candidate("hot", 6, load_tokens=24 * 16), Candidate("cold", 6, load_tokens=4 * 16)]
    dyn = make_policy("precise", index=idx, overlap_weight=1.0, delay_weight=0.0)
    assert dyn.choose(r, cands, 0, random.Random(0)).worker == "cold"  # 16.19 + 4 < 0.19 + 24
    d = make_policy("precise", index=idx, overlap_weight=1.0, delay_weight=0.5).choose(
        r, cands, 0, random.Random(0)
    )
    assert (
        d.worker == "hot"
    )  # recomputing 16 blocks on cold stalls its 6 requests: 16.19 x 4 + 4 > 0.19 x 4 + 24
    scores = {c.worker: c.score for c in d.candidates}
    assert scores["cold"] == pytest.approx(259 / 16 * 4 + 4) and scores["hot"] == pytest.approx(
        0.1875 * 4 + 24
    )
    assert "in-flight requests" in d.explain()
    # On an idle fleet the factor is 1: the same rule as Dynamo's.
    idle = [Candidate("hot", 0, load_tokens=24 * 16), Candidate("cold", 0, load_tokens=4 * 16)]
    assert (
        make_policy("precise", index=idx, overlap_weight=1.0, delay_weight=0.5)
        .choose(r, idle, 0, random.Random(0))
        .worker
        == "cold"
    )
    with pytest.raises(ValueError, match="delay_weight"):
        make_policy("precise", index=idx, delay_weight=-1)


def test_precise_ties_are_broken_randomly_not_by_position():
    p = make_policy("precise", index=PrefixIndex())
    cands = [Candidate("a", 1), Candidate("b", 1), Candidate("c", 1)]
    picks = {p.choose(req(), cands, 0, random.Random(s)).worker for s in range(60)}
    assert picks == {"a", "b", "c"}
    # same seed -> same pick (reproducible)
    assert (
        p.choose(req(), cands, 0, random.Random(5)).worker
        == p.choose(req(), cands, 0, random.Random(5)).worker
    )
    # equal cost: lower request count wins before the coin toss
    cands = [Candidate("a", 3, load_tokens=0), Candidate("b", 1, load_tokens=0)]
    assert {p.choose(req(), cands, 0, random.Random(s)).worker for s in range(20)} == {"b"}


@given(
    loads=st.lists(st.integers(0, 120), min_size=1, max_size=6),
    cached=st.integers(0, 16),
    name=st.sampled_from(["precise", "cache_aware_approx"]),
    seed=st.integers(0, 1000),
)
@settings(max_examples=300, deadline=None)
def test_balance_guard_triggers_exactly_per_rule(loads, cached, name, seed):
    ws = [f"w{i}" for i in range(len(loads))]
    idx = PrefixIndex()
    p = make_policy(name, index=idx, abs_threshold=32, rel_threshold=1.5)
    # the most loaded worker holds the whole prompt: the cache pulls towards it
    hot = ws[loads.index(max(loads))]
    idx.store(hot, PROMPT[:cached])
    if name == "cache_aware_approx":
        p.tree.insert(hot, PROMPT[:cached], 0.0)
    d = p.choose(req(), [Candidate(w, float(load)) for w, load in zip(ws, loads)], 0.0, random.Random(seed))
    expected = max(loads) - min(loads) > 32 and max(loads) > 1.5 * min(loads)
    assert d.imbalanced == expected
    assert is_imbalanced(loads, 32, 1.5)[0] == expected
    if expected:
        assert loads[ws.index(d.worker)] == min(loads)
        assert d.reason.startswith(f"imbalanced: max {max(loads)} min {min(loads)}")


def test_guard_ignores_unhealthy_loads():
    p = policy("precise")
    cands = [Candidate("a", 100, healthy=False), Candidate("b", 10), Candidate("c", 12)]
    d = p.choose(req(), cands, 0, random.Random(0))
    assert not d.imbalanced and d.worker == "b"


def test_precise_route_hints_keep_a_burst_together_until_events_arrive():
    idx = PrefixIndex()
    idx.store("b", PROMPT[:4])
    hinted: dict[str, int] = {}
    asked = []

    def hint_overlap(hashes, now):
        asked.append((list(hashes), now))
        return dict(hinted)

    p = make_policy("precise", index=idx, hint_overlap=hint_overlap)
    r = req()
    cands = [Candidate("a", 1, load_tokens=100), Candidate("b", 1, load_tokens=100)]
    assert p.choose(r, cands, 0.0, random.Random(0)).worker == "b"  # the index alone: 4 blocks on b
    assert asked == [(PROMPT, 0.0)]
    # Another node just routed the whole prompt to a: counted as cached there.
    hinted.update(a=16, ghost=16)
    for s in range(20):
        d = p.choose(r, cands, 1.0, random.Random(s))
        assert d.worker == "a" and "overlap 16/16" in d.reason
        assert {c.worker for c in d.candidates} == {"a", "b"}  # a hint for a non-candidate is ignored
    # A hint shorter than what the index knows does not lower the overlap.
    hinted.clear()
    hinted.update(b=1)
    d = p.choose(r, cands, 2.0, random.Random(0))
    assert {c.worker: c.overlap_blocks for c in d.candidates} == {"a": 0, "b": 4}
    # make_policy gives the hints to precise only.
    assert make_policy("least_load", index=idx, hint_overlap=hint_overlap) is not None
    assert len(asked) == 22


# -- cache_aware_approx --------------------------------------------------------------


def test_approx_routes_repeat_prefix_back_and_falls_back_to_least_load():
    p = make_policy("cache_aware_approx")
    rng = random.Random(0)
    cands = [Candidate("a", 2), Candidate("b", 0), Candidate("c", 5)]
    r1 = req()
    d1 = p.choose(r1, cands, 0.0, rng)
    assert d1.worker == "b" and "least load" in d1.reason  # nothing routed yet
    p.on_routed(r1, "b", 0.0)
    # same conversation, one more turn: b is now the busiest but holds 100%
    r2 = req(PROMPT + [5000, 5001])
    cands = [Candidate("a", 2), Candidate("b", 9), Candidate("c", 5)]
    d2 = p.choose(r2, cands, 1.0, rng)
    assert d2.worker == "b" and d2.reason.startswith("best match 16/18 blocks")
    # a prompt sharing only 4 of 16 blocks (25% <= 30%) goes to the least loaded
    r3 = req(PROMPT[:4] + list(range(9000, 9012)))
    d3 = p.choose(r3, cands, 2.0, rng)
    assert d3.worker == "a" and "<= 30%" in d3.reason
    assert {c.worker: c.overlap_blocks for c in d3.candidates} == {"a": 0, "b": 4, "c": 0}


def test_approx_threshold_is_configurable():
    tree = ApproxTree()
    tree.insert("b", PROMPT[:6], 0.0)  # 6/16 = 37.5%
    cands = [Candidate("a", 0), Candidate("b", 3)]
    assert (
        make_policy("cache_aware_approx", approx_tree=tree).choose(req(), cands, 0, random.Random(0)).worker
        == "b"
    )
    p = make_policy("cache_aware_approx", approx_tree=tree, cache_threshold=0.5)
    assert p.choose(req(), cands, 0, random.Random(0)).worker == "a"


# -- load-only policies ---------------------------------------------------------------


def test_round_robin_cycles_over_healthy_workers():
    p = make_policy("round_robin")
    cands = [Candidate("c"), Candidate("a"), Candidate("x", healthy=False), Candidate("b")]
    rng = random.Random(0)
    picks = [p.choose(req(), cands, 0, rng).worker for _ in range(9)]
    assert picks == ["a", "b", "c"] * 3


@given(loads=st.lists(st.integers(0, 50), min_size=1, max_size=6), seed=st.integers(0, 10_000))
@settings(max_examples=200, deadline=None)
def test_least_load_and_power_of_two(loads, seed):
    ws = [f"w{i}" for i in range(len(loads))]
    cands = [Candidate(w, float(load)) for w, load in zip(ws, loads)]
    d = make_policy("least_load").choose(req(), cands, 0, random.Random(seed))
    assert loads[ws.index(d.worker)] == min(loads)
    d = make_policy("power_of_two").choose(req(), cands, 0, random.Random(seed))
    if len(loads) == 2:
        assert loads[ws.index(d.worker)] == min(loads)
    elif loads.count(max(loads)) == 1 and len(loads) > 1:
        assert loads[ws.index(d.worker)] < max(loads)  # the single busiest never wins a pair


def test_random_policy_spreads():
    p = make_policy("random")
    cands = [Candidate(w) for w in WORKERS]
    rng = random.Random(3)
    seen = [p.choose(req(), cands, 0, rng).worker for _ in range(300)]
    assert set(seen) == set(WORKERS)


# -- consistent_hash ----------------------------------------------------------------


def test_consistent_hash_stable_and_order_independent():
    p = make_policy("consistent_hash")
    cands = [Candidate(w, load=float(i)) for i, w in enumerate(WORKERS)]
    for key in ("user-1", "user-2", "x"):
        a = p.choose(req(session=key), cands, 0, random.Random(1)).worker
        b = p.choose(req(session=key), list(reversed(cands)), 5, random.Random(2)).worker
        assert a == b
    # without a session key, prompts with the same first blocks land together
    r1 = req(PROMPT)
    r2 = req(PROMPT[:4] + [77, 78])
    assert p.choose(r1, cands, 0, random.Random(0)).worker == p.choose(r2, cands, 0, random.Random(9)).worker


def test_consistent_hash_moves_only_keys_of_removed_worker():
    p = make_policy("consistent_hash")
    cands = [Candidate(w) for w in WORKERS]
    keys = [f"session-{i}" for i in range(600)]
    before = {k: p.choose(req(session=k), cands, 0, random.Random(0)).worker for k in keys}
    assert len(set(before.values())) == len(WORKERS)  # spread over everyone
    removed = "e3"
    # removed outright, or present but unhealthy: same result
    for after_cands in (
        [c for c in cands if c.worker != removed],
        [Candidate(c.worker, healthy=c.worker != removed) for c in cands],
    ):
        after = {k: p.choose(req(session=k), after_cands, 0, random.Random(0)).worker for k in keys}
        for k in keys:
            if before[k] != removed:
                assert after[k] == before[k]
            else:
                assert after[k] != removed
        moved = sum(before[k] != after[k] for k in keys)
        assert moved == sum(v == removed for v in before.values())


# -- cache tiers ------------------------------------------------------------------------


def test_precise_credits_each_tier_by_its_weight():
    idx = PrefixIndex()
    idx.store("gpu", PROMPT[:8])
    idx.store("host", PROMPT[:4])
    idx.store("host", PROMPT[4:16], tier=TIER_HOST)  # evicted from its GPU, kept in host memory
    p = make_policy("precise", index=idx, overlap_weight=1.0, delay_weight=0.0, host_tier_weight=0.9)
    r = req()  # 259 tokens: 16.19 blocks
    cands = [Candidate("gpu", 0, load_tokens=0), Candidate("host", 0, load_tokens=0)]
    d = p.choose(r, cands, 0, random.Random(0))
    # gpu: 16.19 - 8 = 8.19 uncached; host: 16.19 - 4 - 0.9 x 12 = 1.39
    scores = {c.worker: c.score for c in d.candidates}
    assert scores == pytest.approx({"gpu": 259 / 16 - 8, "host": 259 / 16 - 4 - 0.9 * 12})
    assert d.worker == "host" and "overlap 4/16 blocks (+12 host)" in d.reason
    row = next(c for c in d.candidates if c.worker == "host")
    assert (row.overlap_blocks, row.host_blocks, row.cached_blocks) == (4, 12, 16)
    assert "x host" in d.score_meaning and "(+12 host)" in d.explain()
    # Worth nothing: the host copies are as good as recomputing.
    p0 = make_policy("precise", index=idx, overlap_weight=1.0, delay_weight=0.0, host_tier_weight=0.0)
    assert p0.choose(r, cands, 0, random.Random(0)).worker == "gpu"


def test_precise_tier_weight_defaults_and_bounds():
    p = make_policy("precise", index=PrefixIndex())
    assert p.tier_weights == (1.0, 0.9, 0.5, 0.5)  # gpu, host, disk, external
    for opt in ("host_tier_weight", "disk_tier_weight", "external_tier_weight"):
        with pytest.raises(ValueError, match=opt):
            make_policy("precise", index=PrefixIndex(), **{opt: 1.5})


def test_a_route_hint_moves_the_lower_tier_blocks_it_covers_to_the_gpu():
    idx = PrefixIndex()
    idx.store("a", PROMPT[:2])
    idx.store("a", PROMPT[2:10], tier=TIER_HOST)
    idx.store("a", PROMPT[10:12], tier=TIER_DISK)
    p = make_policy("precise", index=idx, hint_overlap=lambda hashes, now: {"a": 6})
    d = p.choose(req(), [Candidate("a", 0, load_tokens=0)], 0, random.Random(0))
    (row,) = d.candidates
    # 12 cached in all; the hint puts the first 6 on the GPU, the host tier keeps 4
    assert (row.overlap_blocks, row.host_blocks, row.disk_blocks) == (6, 4, 2)
    d = make_policy("precise", index=idx, hint_overlap=lambda hashes, now: {"a": 14}).choose(
        req(), [Candidate("a", 0, load_tokens=0)], 0, random.Random(0)
    )
    (row,) = d.candidates
    assert (row.overlap_blocks, row.host_blocks, row.disk_blocks) == (14, 0, 0)


def test_load_only_policies_report_the_tiers_too():
    idx = PrefixIndex()
    idx.store("a", PROMPT[:3])
    idx.store("a", PROMPT[3:5], tier=TIER_HOST)
    d = make_policy("round_robin", index=idx).choose(req(), [Candidate("a")], 0, random.Random(0))
    assert (d.candidates[0].overlap_blocks, d.candidates[0].host_blocks) == (3, 2)
