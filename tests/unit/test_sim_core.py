"""The simulated engine's pure core: cache + scheduler + deterministic sampling."""

from __future__ import annotations

from typing import Any

import pytest

from engine_adapters.kv_events import BlockRemoved, BlockStored
from engine_adapters.sim_engine.cache import PrefixCache
from engine_adapters.sim_engine.core import EngineCore, SimRequest, TokenOut
from engine_adapters.sim_engine.timing import TimingConfig

BS = 16


def make(num_blocks: int = 64, **kw: Any) -> EngineCore:
    return EngineCore(PrefixCache(num_blocks, BS, hash_seed=3), TimingConfig(), **kw)


def drive(core: EngineCore, t: float = 0.0, max_steps: int = 10_000) -> tuple[list[TokenOut], float]:
    outs: list[TokenOut] = []
    for _ in range(max_steps):
        plan = core.schedule(t)
        if plan is None:
            return outs, t
        t += plan.duration
        outs += core.complete(plan, t)
    raise AssertionError("did not drain")


def test_outputs_deterministic_from_seed() -> None:
    prompt = list(range(1000, 1040))
    runs = []
    for _ in range(2):
        core = make()
        core.add(SimRequest("a", prompt, 12, seed=42), 0)
        outs, _ = drive(core)
        runs.append([o.token_id for o in outs])
        assert outs[-1].finish_reason == "length" and len(outs) == 12
    assert runs[0] == runs[1]
    core = make()
    core.add(SimRequest("a", prompt, 12, seed=43), 0)
    assert [o.token_id for o in drive(core)[0]] != runs[0]


def test_second_request_hits_prefix_and_prefills_less() -> None:
    core = make(num_blocks=256)
    shared = list(range(5000, 5000 + 40 * BS))
    a = core.add(SimRequest("a", shared + [1, 2, 3], 4, seed=1), 0)
    drive(core)
    b = core.add(SimRequest("b", shared + [7, 8, 9], 4, seed=1), 10)
    drive(core, 10)
    assert a.num_cached == 0 and b.num_cached == 40 * BS
    assert b.prefill_seconds < a.prefill_seconds / 5
    assert a.first_token_at is not None and b.first_token_at is not None
    assert b.first_token_at - b.arrival < a.first_token_at - a.arrival
    assert core.prefix_hit_tokens == 40 * BS
    assert core.prefix_query_tokens == 2 * (40 * BS + 3)


def test_generated_blocks_are_cached_and_events_chain() -> None:
    core = make()
    prompt = list(range(300, 300 + 20))
    core.add(SimRequest("a", prompt, 30, seed=5), 0)
    drive(core)
    events = core.drain_events()
    stored = [e for e in events if isinstance(e, BlockStored)]
    hashes = [h for e in stored for h in e.block_hashes]
    # 20 prompt + 30 output = 50 tokens; KV exists for 49 -> 3 full blocks
    assert len(hashes) == 3 and set(hashes) == core.cache.cached_hashes()
    for e in stored:
        assert len(e.token_ids) == BS * len(e.block_hashes)
    assert stored[0].parent_block_hash is None
    assert all(e.parent_block_hash in hashes for e in stored[1:])
    assert core.cache.num_pinned() == 0


def test_eos_stops_unless_ignored() -> None:
    prompt = list(range(100, 120))
    core = make(eos_prob=0.5)
    core.add(SimRequest("a", prompt, 50, seed=9), 0)
    outs, _ = drive(core)
    assert outs[-1].finish_reason == "stop" and outs[-1].token_id == core.eos_token_id
    assert len(outs) < 50
    core = make(eos_prob=0.5)
    core.add(SimRequest("a", prompt, 50, seed=9, ignore_eos=True), 0)
    outs, _ = drive(core)
    assert len(outs) == 50 and core.eos_token_id not in [o.token_id for o in outs]


def test_waits_for_blocks_then_runs() -> None:
    core = make(num_blocks=4)
    core.add(SimRequest("a", list(range(40)), 20, seed=1), 0)  # 60 tokens: 4 blocks
    core.add(SimRequest("b", list(range(100, 140)), 20, seed=1), 0)
    plan = core.schedule(0)
    assert plan is not None and [s.request_id for s in plan.admitted] == ["a"]
    assert core.num_waiting == 1
    outs, _ = drive(core)
    assert {o.request_id for o in outs if o.finish_reason} == {"a", "b"}
    assert any(isinstance(e, BlockRemoved) for e in core.drain_events())


def test_abort_releases_blocks() -> None:
    core = make(num_blocks=8)
    core.add(SimRequest("a", list(range(40)), 40, seed=1), 0)
    plan = core.schedule(0)
    assert plan is not None and core.cache.num_pinned() == 5
    assert core.abort("a")
    assert core.cache.num_pinned() == 0 and core.num_running == 0
    assert core.complete(plan, 1.0) == []
    assert not core.abort("a")


def test_check_rejects_impossible_requests() -> None:
    core = make(num_blocks=4, max_model_len=100)
    assert core.check(0, 5) is not None
    assert core.check(10, 0) is not None
    assert "context length" in (core.check(90, 20) or "")
    assert "KV blocks" in (core.check(60, 10) or "")
    assert core.check(40, 20) is None
    with pytest.raises(ValueError):
        core.add(SimRequest("x", list(range(70)), 10, seed=0), 0)


def test_host_tier_hits_are_loaded_not_recomputed_and_cost_their_copy() -> None:
    def ttft(host_blocks: int) -> tuple[float, EngineCore, Any]:
        core = EngineCore(PrefixCache(48, BS, hash_seed=3, num_host_blocks=host_blocks), TimingConfig())
        shared = list(range(5000, 5000 + 40 * BS))
        core.add(SimRequest("a", shared + [1], 1, seed=1), 0)
        _, t = drive(core)
        core.add(SimRequest("evict", list(range(90000, 90000 + 40 * BS)), 1, seed=1), t)  # pushes a out
        _, t = drive(core, t)
        b = core.add(SimRequest("b", shared + [2], 1, seed=1), t)
        drive(core, t)
        assert b.first_token_at is not None
        return b.first_token_at - b.arrival, core, b

    cold, core0, b0 = ttft(0)
    warm, core, b = ttft(64)
    assert b0.num_cached < 10 * BS and core0.host_hit_tokens == 0  # evicted: recomputed
    assert b.num_loaded >= 30 * BS and b.num_cached >= b.num_loaded  # loaded from the host tier
    assert core.host_hit_tokens == b.num_loaded
    assert core.prefix_hit_tokens == b.num_cached - b.num_loaded
    # the copy costs host_load_ms_per_token a token, far below a recompute
    assert warm < cold / 3
    assert warm > TimingConfig().host_load_ms_per_token * b.num_loaded / 1000
