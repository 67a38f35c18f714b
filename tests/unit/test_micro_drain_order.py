"""kvmesh bench micro's ingest order (kvmesh.benchmarks.micro.drain_order):
the order a saturated owner node takes frames in. Every batch once, each
engine's in its order, a burst of one engine, ending once it holds the
entry bound (so no burst but an engine's last is below it)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvmesh.benchmarks.micro import build_population, drain_order

batches_st = st.lists(
    st.tuples(st.integers(0, 4), st.none(), st.lists(st.integers(0, 9), min_size=1, max_size=6)), max_size=40
)


@given(batches=batches_st, bound=st.integers(1, 12))
def test_bursts_keep_each_engines_order_and_the_bound(batches, bound) -> None:
    bursts = drain_order(batches, bound)
    flat = [i for b in bursts for i in b]
    assert sorted(flat) == list(range(len(batches)))  # every batch once
    for e in {b[0] for b in batches}:
        mine = [i for i in flat if batches[i][0] == e]
        assert mine == sorted(mine)  # the engine's own order
    last_of = {batches[b[-1]][0]: n for n, b in enumerate(bursts)}
    for n, burst in enumerate(bursts):
        assert len({batches[i][0] for i in burst}) == 1  # one engine a burst
        blocks = [len(batches[i][2]) for i in burst]
        assert sum(blocks[:-1]) < bound  # it ended once it held the bound
        if last_of[batches[burst[0]][0]] != n:
            assert sum(blocks) >= bound  # only an engine's last burst falls short


def test_the_benchmark_population_drains_in_bursts() -> None:
    batches, _ = build_population(20_000, 8, seed=1)
    bursts = drain_order(batches, 4096)
    assert len(bursts) < len(batches) / 10  # many frames a burst at the default bound
    assert sum(len(b) for b in bursts) == len(batches)


def test_a_small_micro_ingest_pairs_each_of_our_runs_with_a_dynamo_run() -> None:
    """The ingest ratio is the median of paired runs' ratios when Dynamo's
    tree is installed (make bench installs it), and absent when it is not."""
    import statistics

    from kvmesh.benchmarks.micro import INGEST_RUNS, bench_ingest_and_match, dynamo_available

    res = bench_ingest_and_match(4000, 4, 16, 20, note=lambda _: None, nonowner_blocks=2000)
    ours = res["kvmesh"]
    assert len(ours["runs_blocks_per_s"]) == INGEST_RUNS
    if dynamo_available():  # not installed: nothing to pair with
        assert "ingest_ratio" not in res and "skipped" in res["dynamo"]
        return
    dyn = res["dynamo"]["runs_blocks_per_s"]
    pairs = [o / d for o, d in zip(ours["runs_blocks_per_s"], dyn, strict=True)]
    assert res["ingest_ratio_runs"] == pairs
    assert res["ingest_ratio"] == statistics.median(pairs)


def test_matches_are_timed_side_by_side_in_blocks_the_first_matcher_rotating() -> None:
    """Each matcher in turn is asked a block of queries back to back (as a
    router asks its index), the one going first rotating from block to
    block, so no matcher is always first (or last) and a busy moment of the
    machine falls on all of them alike."""
    import pytest

    from kvmesh.benchmarks.micro import match_side_by_side

    calls: list[tuple[str, int]] = []

    def asker(name: str):
        return lambda q: calls.append((name, q))

    names = ["a", "b", "c"]
    lat = match_side_by_side({n: (asker(n), list(range(7))) for n in names}, block=3)
    turns = [(calls[i][0], [q for _, q in calls[i : i + 3]]) for i in (0, 3, 6, 9, 12, 15)]
    assert turns == [
        ("a", [0, 1, 2]),
        ("b", [0, 1, 2]),
        ("c", [0, 1, 2]),
        ("b", [3, 4, 5]),
        ("c", [3, 4, 5]),
        ("a", [3, 4, 5]),
    ]
    assert calls[18:] == [("c", 6), ("a", 6), ("b", 6)]  # the last, short block; c's turn to go first
    assert len(calls) == 21  # every matcher, every query, once
    assert {n: len(v) for n, v in lat.items()} == {n: 7 for n in names}
    assert all(t >= 0 for v in lat.values() for t in v)
    with pytest.raises(ValueError):
        match_side_by_side({"a": (asker("a"), [1, 2]), "b": (asker("b"), [1])})
    with pytest.raises(ValueError):
        match_side_by_side({"a": (asker("a"), [1])}, block=0)


def test_a_small_micro_run_times_every_index_match() -> None:
    from kvmesh.benchmarks.micro import bench_ingest_and_match, dynamo_available, native_missing

    res = bench_ingest_and_match(4000, 4, 16, 20, note=lambda _: None, nonowner_blocks=2000)
    impls = ["python"] + ([] if native_missing() else ["native"])
    for impl in impls:
        assert 0 < res[impl]["match_p50_us"] <= res[impl]["match_p99_us"]
    if not native_missing():
        assert res["answers_equal"] is True
    for impl in impls:  # each stage of the owner path took some of the time, and they add up
        share = res[impl]["stage_share"]
        assert set(share) == {"map", "log", "index"} and all(v > 0 for v in share.values())
        assert abs(sum(share.values()) - 1) < 1e-9
    if not dynamo_available():
        d = res["dynamo"]
        assert 0 < d["match_p50_us"] <= d["match_p99_us"]
        assert res["match_p99_ratio"] == res["kvmesh"]["match_p99_us"] / d["match_p99_us"]
        assert d["best_overlap_agrees_with_kvmesh"] == "20/20"  # as many as were asked, all agreeing
