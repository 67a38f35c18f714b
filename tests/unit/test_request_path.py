"""The request path's pure core (router/request_path.py): prepare, candidates,
the retry state machine and the per-attempt accounting."""

from __future__ import annotations

import random
from typing import Any

import pytest

from blocks.hashing import block_hashes, root_seed
from engine_adapters.proxy import Usage
from engine_adapters.tokenizer import get_tokenizer
from router.circuit_breaker import OPEN, BreakerConfig
from router.engine_registry import EngineSpec, EngineTable
from router.errors import NoEngineAvailable, RequestError
from router.load import LoadTracker, MeshLoad, WorkerLoads
from router.policies import make_policy
from router.request_path import (
    DP_RANK_HEADER,
    Accounting,
    Attempts,
    ClientRequest,
    NodeStats,
    candidates,
    prepare,
    routed_to,
    work_tokens,
)

BS = 4
NO_LOAD = WorkerLoads({}, {})


def table(*specs: EngineSpec, breaker: BreakerConfig | None = None) -> EngineTable:
    t = EngineTable(breaker)
    for s in specs:
        assert t.put(s.validate())
    return t


def spec(engine_id: str, model: str = "m", dp: int = 1, block_size: int = BS) -> EngineSpec:
    return EngineSpec(
        engine_id, f"http://{engine_id}:80", model=model, block_size=block_size, data_parallel_size=dp
    )


def prep_of(engines: EngineTable, ids: list[int], **kw: Any):
    return prepare(
        ClientRequest(token_ids=ids, **kw),
        engines,
        get_tokenizer,
        default_policy="precise",
        new_request_id=lambda: "generated",
    )


# --- prepare ----------------------------------------------------------------------------


def test_prepare_hashes_full_blocks_with_the_models_seed_and_block_size():
    engines = table(spec("e1"), spec("e2"))
    ids = list(range(100, 111))  # two full blocks of 4, three tokens left over
    p = prep_of(engines, ids, lora_name="l", cache_salt="s", session_key="k")
    assert p.request_id == "generated" and p.model == "m" and p.policy == "precise"
    assert p.block_size == BS and p.session_key == "k"
    assert p.hashes == block_hashes(ids, BS, root_seed("m", "l", "s"))
    assert len(p.hashes) == 2
    assert p.hashes != prep_of(engines, ids).hashes  # LoRA and salt are part of the identity
    r = p.route_request()
    assert (r.block_hashes, r.prompt_tokens, r.block_size, r.session_key) == (p.hashes, 11, BS, "k")
    assert prep_of(engines, ids, request_id="mine", policy="round_robin").request_id == "mine"


def test_prepare_text_prompts_go_through_the_models_tokenizer():
    engines = table(spec("e1"))
    asked = []

    def tokenizer(model: str):
        asked.append(model)
        return get_tokenizer("builtin")

    p = prepare(ClientRequest(text="hello there"), engines, tokenizer, "least_load", lambda: "x")
    assert asked == ["m"] and p.token_ids == get_tokenizer("builtin").encode("hello there")
    assert p.policy == "least_load"


@pytest.mark.parametrize(
    "request_, error, words",
    [
        (ClientRequest(token_ids=[1], policy="nope"), RequestError, "unknown policy 'nope'"),
        (ClientRequest(token_ids=[1], model="other"), RequestError, "no engine serves model 'other'"),
        (ClientRequest(), RequestError, "prompt is required"),
        (ClientRequest(token_ids=[]), RequestError, "prompt is empty"),
    ],
)
def test_prepare_refuses_bad_requests(request_, error, words):
    with pytest.raises(error, match=words):
        prepare(request_, table(spec("e1")), get_tokenizer, "precise", lambda: "x")


def test_prepare_needs_a_model_when_several_are_served_and_an_engine_at_all():
    two = table(spec("e1", model="a"), spec("e2", model="b"))
    with pytest.raises(RequestError, match="model is required"):
        prepare(ClientRequest(token_ids=[1]), two, get_tokenizer, "precise", lambda: "x")
    assert (
        prepare(ClientRequest(token_ids=[1], model="b"), two, get_tokenizer, "precise", lambda: "x").model
        == "b"
    )
    with pytest.raises(NoEngineAvailable):
        prepare(ClientRequest(token_ids=[1]), table(), get_tokenizer, "precise", lambda: "x")


# --- choose -----------------------------------------------------------------------------


def test_candidates_list_the_models_workers_with_load_health_and_exclusion():
    engines = table(spec("e1", dp=2), spec("x", model="other"), spec("e2"), spec("e3"))
    engines["e3"].healthy = False
    loads = WorkerLoads({"e1#dp1": 2.0, "e2": 1.0}, {"e1#dp1": 40.0, "e2": 4.0})
    cands = candidates(engines, "m", {"e2"}, loads, now=0.0)
    assert [(c.worker, c.load, c.load_tokens, c.healthy) for c in cands] == [
        ("e1", 0.0, 0.0, True),
        ("e1#dp1", 2.0, 40.0, True),
        ("e2", 1.0, 4.0, False),  # excluded: failed this request already
        ("e3", 0.0, 0.0, False),  # last health probe failed
    ]


def test_candidates_respect_the_breaker_and_only_ask_it_for_healthy_engines():
    engines = table(spec("e1"), spec("e2"), breaker=BreakerConfig(failure_threshold=1, cooldown_s=5.0))
    for eid in ("e1", "e2"):
        engines[eid].breaker.on_failure(0.0)
    engines["e2"].healthy = False
    assert [c.healthy for c in candidates(engines, "m", (), NO_LOAD, now=1.0)] == [False, False]
    # After the cooldown e1's breaker lets one probe through (half-open); e2
    # is unhealthy, so its breaker is not asked and stays open.
    assert [c.healthy for c in candidates(engines, "m", (), NO_LOAD, now=6.0)] == [True, False]
    assert engines["e2"].breaker.state == OPEN


def test_routed_to_names_the_engine_and_pins_data_parallel_ranks():
    engines = table(spec("e1", dp=2), spec("e2"))
    p = prep_of(engines, list(range(16)))
    idx_policy = make_policy("least_load")
    loads = WorkerLoads({"e1": 5.0, "e2": 6.0}, {})
    d = idx_policy.choose(p.route_request(), candidates(engines, "m", (), loads, 0.0), 0.0, random.Random(0))
    r = routed_to(p, d, 2, engines)
    assert (r.engine_id, r.worker, r.endpoint, r.attempt) == ("e1", "e1#dp1", "http://e1:80", 2)
    assert r.headers == {DP_RANK_HEADER: "1"}
    d2 = make_policy("least_load").choose(
        p.route_request(), candidates(engines, "m", {"e1#dp1"}, loads, 0.0), 0.0, random.Random(0)
    )
    assert d2.worker == "e1" and routed_to(p, d2, 1, engines).headers == {DP_RANK_HEADER: "0"}
    d3 = make_policy("least_load").choose(
        p.route_request(),
        candidates(engines, "m", {"e1", "e1#dp1"}, loads, 0.0),
        0.0,
        random.Random(0),
    )
    assert routed_to(p, d3, 1, engines).headers == {}  # no data parallelism: no header


# --- attempt ----------------------------------------------------------------------------


def test_attempts_retry_elsewhere_until_the_budget_is_spent():
    a = Attempts(3)
    assert a.next() and a.attempt == 1
    a.failed_before_first_token("e1", "refused")
    assert a.next() and a.attempt == 2 and a.excluded == {"e1"}
    a.failed_before_first_token("e2", "HTTP 503")
    assert a.next() and a.attempt == 3 and a.excluded == {"e1", "e2"}
    a.failed_before_first_token("e3", "timeout")
    assert not a.next() and a.attempt == 3
    assert a.give_up_message() == (
        "no engine could serve the request: e1: refused; e2: HTTP 503; e3: timeout"
    )


def test_attempts_give_up_at_once_when_no_worker_is_left():
    a = Attempts(5)
    assert a.next()
    a.failed_before_first_token("e1", "refused")
    assert a.next()
    a.no_candidate("precise: none of 1 candidates is healthy (e1)")
    assert not a.next() and a.attempt == 2
    assert "none of 1 candidates" in a.give_up_message()
    b = Attempts(0)  # a budget below one still makes one attempt
    assert b.next() and not b.next()


def test_retry_order_with_a_real_policy_never_repeats_a_failed_worker():
    """The loop RouterNode.generate runs, on the pure core: every worker
    refuses, so each attempt goes to a new one, by load, until the budget."""
    engines = table(spec("e1"), spec("e2"), spec("e3"), spec("e4"))
    p = prep_of(engines, list(range(16)))
    loads = WorkerLoads({"e1": 0.0, "e2": 1.0, "e3": 2.0, "e4": 3.0}, {})
    policy = make_policy("least_load")
    tries, order = Attempts(3), []
    while tries.next():
        d = policy.choose(
            p.route_request(), candidates(engines, "m", tries.excluded, loads, 0.0), 0.0, random.Random(0)
        )
        order.append(routed_to(p, d, tries.attempt, engines).worker)
        tries.failed_before_first_token(order[-1], f"{order[-1]} refused")
    assert order == ["e1", "e2", "e3"]
    assert tries.give_up_message().endswith("e3 refused")


# --- account ----------------------------------------------------------------------------


def _one_attempt(engines: EngineTable, worker_load: float = 0.0):
    p = prep_of(engines, list(range(40)))  # 40 tokens: 10 blocks of 4
    loads = WorkerLoads({"e1": worker_load}, {})
    d = make_policy("least_load").choose(
        p.route_request(), candidates(engines, "m", (), loads, 0.0), 0.0, random.Random(0)
    )
    return p, d


def test_accounting_of_a_request_that_succeeds():
    engines = table(spec("e1"))
    stats, load = NodeStats(), LoadTracker()
    p, d = _one_attempt(engines)
    acct = Accounting(p, stats, load, now=10.0)
    assert (stats.requests_total, stats.requests_by_policy["precise"]) == (1, 1)
    routed = routed_to(p, d, 1, engines)
    routed.predicted_cached_blocks = 6  # 6 of 10 blocks cached: 16 tokens to prefill
    acct.attempt(routed, engines["e1"], now=10.0)
    assert stats.attempts_by_engine["e1"] == 1
    acct.sent()
    assert load.slot() == {"e1": (1, 16 + BS)} == {"e1": (1, work_tokens(p, 6))}
    acct.token(now=10.25)
    assert acct.ttft_ms == 250.0  # from the request's start
    assert load.slot() == {"e1": (1, BS)}  # prefill done: one block of decode left
    acct.token(now=11.0)
    assert acct.ttft_ms == 250.0  # only the first token counts
    fin = acct.finished(Usage(40, 5, 24, "length"), now=11.5)
    acct.attempt_over()
    assert load.slot() == {}
    assert (fin.finish_reason, fin.prompt_tokens, fin.cached_prompt_tokens, fin.completion_tokens) == (
        "length",
        40,
        24,
        5,
    )
    assert (fin.engine_id, fin.ttft_ms, fin.attempts, fin.error) == ("e1", 250.0, 1, "")
    assert (stats.prompt_tokens_total, stats.cached_prompt_tokens_total) == (40, 24)
    assert stats.requests_by_engine == {"e1": 1}
    assert (stats.requests_failed, stats.retries_total) == (0, 0)


def test_accounting_of_failures_feeds_the_breaker_and_the_counters():
    engines = table(spec("e1"), breaker=BreakerConfig(failure_threshold=2, cooldown_s=1.0))
    stats, load = NodeStats(), LoadTracker()
    p, d = _one_attempt(engines)
    acct = Accounting(p, stats, load, now=0.0)
    for attempt in (1, 2):
        acct.attempt(routed_to(p, d, attempt, engines), engines["e1"], now=0.0)
        acct.sent()
        acct.unavailable(now=0.0)
        acct.attempt_over()
    assert stats.failures_by_engine["e1"] == 2 and engines["e1"].breaker.state == OPEN
    assert stats.retries_total == 1 and load.slot() == {}  # the second attempt; the last failure is no retry
    acct.gave_up()
    assert stats.requests_failed == 1


def test_accounting_of_a_stream_broken_after_the_first_token():
    engines = table(spec("e1"))
    stats, load = NodeStats(), LoadTracker()
    p, d = _one_attempt(engines)
    acct = Accounting(p, stats, load, now=0.0)
    acct.attempt(routed_to(p, d, 2, engines), engines["e1"], now=0.0)
    acct.sent()
    acct.token(now=0.1)
    fin = acct.broken("connection reset", now=0.2)
    acct.attempt_over()
    assert (fin.finish_reason, fin.error, fin.prompt_tokens, fin.attempts) == (
        "error",
        "connection reset",
        40,
        2,
    )
    assert fin.ttft_ms == pytest.approx(100.0)
    assert stats.requests_failed == 1 and stats.retries_total == 1  # its attempt 2 was a retry
    assert stats.failures_by_engine["e1"] == 1
    assert load.slot() == {} and stats.requests_by_engine == {}


def test_accounting_resets_ttft_per_attempt_and_refuses_calls_out_of_order():
    engines = table(spec("e1"))
    p, d = _one_attempt(engines)
    acct = Accounting(p, NodeStats(), MeshLoad().local, now=0.0)
    with pytest.raises(RuntimeError):
        acct.sent()
    acct.attempt(routed_to(p, d, 1, engines), engines["e1"], now=0.0)
    acct.token(now=0.5)
    acct.attempt(routed_to(p, d, 2, engines), engines["e1"], now=1.0)
    assert acct.ttft_ms == -1.0
    acct.token(now=2.0)
    assert acct.ttft_ms == 2000.0


def test_a_request_id_is_short_printable_ascii() -> None:
    from router.request_path import MAX_REQUEST_ID_CHARS, request_id_problem

    assert request_id_problem("req-1 of 2 ~") is None
    assert request_id_problem("x" * MAX_REQUEST_ID_CHARS) is None
    assert "at most 256" in str(request_id_problem("x" * (MAX_REQUEST_ID_CHARS + 1)))
    for bad in ("a\x01b", "a\nb", "a\x7fb", "r\u00e9q", "\u200b"):
        assert "printable ASCII" in str(request_id_problem(bad)), repr(bad)
