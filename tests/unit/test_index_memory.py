"""The memory benchmark's population and its runner (kvmesh/benchmarks/index_memory.py):
the blocks it claims to store are the ones it stores, each engine's chains are
whole (Dynamo's tree refuses a store whose parent the engine does not hold),
and an implementation that cannot run or runs too long is reported, not fatal."""

from __future__ import annotations

from kvmesh.benchmarks.index_memory import MAX_BATCH, measure_in_child, memory_table, population_batches


def test_population_counts_its_distinct_blocks_and_chains_per_engine():
    counts: dict[str, int] = {}
    seen: set[int] = set()
    held: dict[int, set[int]] = {}
    batches = 0
    for e, parent, ids in population_batches(20_000, 50, seed=3, counts=counts):
        batches += 1
        assert 0 < len(ids) <= MAX_BATCH and 0 <= e < 50
        mine = held.setdefault(e, set())
        assert parent is None or parent in mine, (e, parent)
        mine.update(ids)
        seen.update(ids)
    assert counts["distinct"] == len(seen) >= 20_000
    assert batches > 100 and sum(len(h) for h in held.values()) > len(seen)  # some blocks on two engines


def test_python_index_memory_is_measured_per_distinct_block():
    # In a fresh interpreter, as the benchmark runs it: in this one, memory
    # freed by earlier tests would be reused and hide the index's growth.
    r = measure_in_child("python", 20_000, 20, seed=1, timeout_s=120)
    assert r["blocks"] >= 5_000 and r["pairs"] >= r["blocks"]
    assert r["bytes_per_block"] > 0 and r["bytes_per_pair"] <= r["bytes_per_block"]


def test_memory_table_reports_what_did_not_run():
    notes: list[str] = []
    res = memory_table(
        [1_000, 2_000],
        10,
        {"native": "not built here", "python": None},
        timeout_s={"python": 0.001},  # no interpreter starts that fast
        note=notes.append,
    )
    assert res["rows"]["native"] == {
        "1000": {"skipped": "not built here"},
        "2000": {"skipped": "not built here"},
    }
    assert "over the 0 s limit" in res["rows"]["python"]["1000"]["skipped"]
    assert "did not finish" in res["rows"]["python"]["2000"]["skipped"]  # larger sizes not tried
    assert any("python at 1,000" in n for n in notes)
