"""The simulated engine's timing model and continuous-batching scheduler."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from engine_adapters.sim_engine.timing import RunningRequest, StepScheduler, TimingConfig


def run_until_first_token(
    sched: StepScheduler, rid: str, admit: Callable[[RunningRequest], bool] = lambda r: True
) -> float:
    """Simulated seconds from now until ``rid`` gets its first token."""
    t = 0.0
    for _ in range(10_000):
        plan = sched.schedule(t, admit)
        assert plan is not None
        t += plan.duration
        for p in sched.complete(plan, t):
            if p.running.request_id == rid and p.sampled and p.running.generated == 1:
                return t
    raise AssertionError("no first token")


def test_step_formula_and_time_scale() -> None:
    c = TimingConfig(decode_base_ms=10, decode_per_seq_ms=0.5, prefill_ms_per_token=0.1)
    assert c.step_seconds(4, 1000) == pytest.approx((10 + 2 + 100) / 1000)
    fast = TimingConfig(decode_base_ms=10, decode_per_seq_ms=0.5, prefill_ms_per_token=0.1, time_scale=0.1)
    assert fast.step_seconds(4, 1000) == pytest.approx(c.step_seconds(4, 1000) * 0.1)
    with pytest.raises(ValueError):
        TimingConfig(time_scale=0)


def test_defaults_look_like_an_a100_serving_llama3_8b() -> None:
    c = TimingConfig()
    prefill_tok_per_s = 1000 / c.prefill_ms_per_token
    assert 8_000 <= prefill_tok_per_s <= 15_000
    assert 10e-3 <= c.step_seconds(1, 0) <= 15e-3  # decode step at batch 1
    assert c.step_seconds(64, 0) < 2.5 * c.step_seconds(1, 0)  # grows slowly with batch


def test_chunked_prefill_respects_token_budget() -> None:
    c = TimingConfig(max_num_batched_tokens=512)
    s = StepScheduler(c)
    s.add(RunningRequest("a", prompt_len=1200, max_tokens=2, arrival=0))
    chunks = []
    for _ in range(3):
        plan = s.schedule(0, lambda req: True)
        assert plan is not None
        chunks.append(plan.prefill_tokens)
        prog = s.complete(plan, 0)
    assert chunks == [512, 512, 176]
    assert prog[0].sampled and prog[0].running.generated == 1  # first token with the last chunk


def test_prefill_time_proportional_to_uncached_tokens() -> None:
    c = TimingConfig()

    def ttft(cached: int) -> float:
        s = StepScheduler(c)
        s.add(RunningRequest("a", prompt_len=4096, max_tokens=4, arrival=0))

        def admit(req: RunningRequest) -> bool:
            req.num_cached = req.num_computed = cached
            return True

        return run_until_first_token(s, "a", admit)

    cold, warm = ttft(0), ttft(4096 - 16)
    assert warm < cold / 10
    # the difference is the prefill cost of the cached tokens
    assert cold - warm == pytest.approx((4096 - 16) * c.prefill_ms_per_token / 1000, rel=0.05)


def test_max_num_seqs_and_fifo() -> None:
    s = StepScheduler(TimingConfig(max_num_seqs=2))
    for i in range(4):
        s.add(RunningRequest(f"r{i}", prompt_len=8, max_tokens=3, arrival=0))
    plan = s.schedule(0, lambda req: True)
    assert plan is not None and [q.request_id for q in plan.admitted] == ["r0", "r1"]
    assert [q.request_id for q in s.waiting] == ["r2", "r3"]
    t = 0.0
    order: list[str] = []
    while len(s):
        plan = s.schedule(t, lambda req: True)
        assert plan is not None and len(s.running) <= 2
        order += [q.request_id for q in plan.admitted]
        t += plan.duration
        s.complete(plan, t)
    assert order == ["r2", "r3"]


def test_admission_refusal_blocks_the_queue_head() -> None:
    s = StepScheduler(TimingConfig())
    s.add(RunningRequest("big", prompt_len=100, max_tokens=1, arrival=0))
    s.add(RunningRequest("small", prompt_len=4, max_tokens=1, arrival=0))
    assert s.schedule(0, lambda req: False) is None  # nothing runs, FIFO kept
    assert [q.request_id for q in s.waiting] == ["big", "small"]


def test_decode_step_grows_with_batch_and_tokens_are_one_per_step() -> None:
    c = TimingConfig(prefill_ms_per_token=0.0)
    s = StepScheduler(c)
    for i in range(8):
        s.add(RunningRequest(f"r{i}", prompt_len=4, max_tokens=5, arrival=0))
    durations = []
    done: dict[str, int] = {}
    t = 0.0
    while len(s):
        plan = s.schedule(t, lambda req: True)
        assert plan is not None
        durations.append(plan.duration)
        t += plan.duration
        for p in s.complete(plan, t):
            if p.finished:
                done[p.running.request_id] = p.running.generated
    assert done == {f"r{i}": 5 for i in range(8)}
    assert len(durations) == 5  # prefill step samples token 1, then 4 decode steps
    assert durations[1] == pytest.approx(c.step_seconds(8, 0))
    assert c.step_seconds(8, 0) > c.step_seconds(1, 0)


def test_removed_request_is_skipped() -> None:
    s = StepScheduler(TimingConfig())
    s.add(RunningRequest("a", prompt_len=4, max_tokens=5, arrival=0))
    s.add(RunningRequest("b", prompt_len=4, max_tokens=5, arrival=0))
    plan = s.schedule(0, lambda req: True)
    assert plan is not None
    assert s.remove("a") is not None
    assert [p.running.request_id for p in s.complete(plan, 1)] == ["b"]
    assert s.remove("zzz") is None


def test_loaded_tokens_cost_their_copy_in_the_admitting_step() -> None:
    cfg = TimingConfig()
    assert cfg.step_seconds(1, 0, loaded_tokens=1000) == pytest.approx(
        (cfg.decode_base_ms + cfg.decode_per_seq_ms + cfg.host_load_ms_per_token * 1000) / 1000
    )
    sched = StepScheduler(cfg)
    req = RunningRequest("r", prompt_len=2000, max_tokens=1, arrival=0.0)
    sched.add(req)

    def admit(r: RunningRequest) -> bool:
        r.num_loaded = r.num_cached = r.num_computed = 1600  # 100 blocks from the host tier
        return True

    plan = sched.schedule(0.0, admit)
    assert plan is not None and plan.loaded_tokens == 1600 and plan.prefill_tokens == 400
    assert plan.duration == pytest.approx(cfg.step_seconds(1, 400, 1600))
    with pytest.raises(ValueError):
        TimingConfig(host_load_ms_per_token=-1)
