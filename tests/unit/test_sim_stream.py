"""The simulated engine in process: the streaming path (tokens the step loop
queued while the stream handler was busy come out as one batch, one SSE
chunk, as vLLM's output collector merges them; stop strings still cut) and
the admission path both APIs share."""

from __future__ import annotations

import asyncio

import pytest

from engine_adapters.sim_engine.config import SimEngineConfig
from engine_adapters.sim_engine.core import SimRequest, TokenOut
from engine_adapters.sim_engine.engine import Parse, Rejected, SimEngine
from engine_adapters.sim_engine.requests import (
    OPENAI_DEFAULT_MAX_TOKENS,
    SGLANG_DEFAULT_MAX_NEW_TOKENS,
    BadRequest,
    parse_completion,
    parse_generate,
)
from engine_adapters.sim_engine.token_stream import PendingRequest
from engine_adapters.tokenizer import BuiltinTokenizer


def _engine() -> SimEngine:
    return SimEngine(SimEngineConfig(kv_events_endpoint="", kv_replay_endpoint=""))


def _pending(eng: SimEngine, rid: str, body: dict) -> PendingRequest:
    req = parse_completion(body, eng.tokenizer)
    running = eng.core.add(SimRequest(rid, req.prompt, req.max_tokens, 0, True), 0.0)
    return PendingRequest(rid, rid, req, running)


async def test_queued_tokens_come_out_as_one_batch() -> None:
    eng = _engine()
    pend = _pending(eng, "r", {"prompt": [5, 6, 7], "max_tokens": 4})
    words = eng.vocab.ids
    toks = [words[0], words[1], words[2], words[3]]
    batches = eng.streamer.batches(pend)
    pend.queue.put_nowait(TokenOut("r", toks[0], None, pend.running))
    first = await anext(batches)
    assert [t for t, *_ in first] == toks[:1]
    # The handler was busy: three tokens wait, the last one finishing.
    for t, fin in ((toks[1], None), (toks[2], None), (toks[3], "length")):
        pend.queue.put_nowait(TokenOut("r", t, fin, pend.running))
    second = await anext(batches)
    assert [t for t, *_ in second] == toks[1:]
    assert [f for _, _, f, _ in second] == [None, None, "length"]
    assert "".join(text for _, text, _, _ in first + second) == "".join(eng.vocab.text(t) for t in toks)
    assert pend.done


async def test_stop_string_inside_a_batch_drops_what_follows() -> None:
    eng = _engine()
    words = eng.vocab.ids
    stop = eng.vocab.text(words[1])
    pend = _pending(eng, "s", {"prompt": [5, 6, 7], "max_tokens": 8, "stop": [stop]})
    for t in words[:4]:
        pend.queue.put_nowait(TokenOut("s", t, None, pend.running))
    out = [b async for b in eng.streamer.batches(pend)]
    assert len(out) == 1
    assert [(t, f, s) for t, _, f, s in out[0]] == [(words[0], None, None), (words[1], "stop", stop)]
    assert "".join(text for _, text, _, _ in out[0]) == eng.vocab.text(words[0])  # the stop string is cut


async def test_take_waits_for_the_first_token() -> None:
    eng = _engine()
    pend = _pending(eng, "w", {"prompt": [5], "max_tokens": 1})
    task = asyncio.ensure_future(pend.queue.take())
    await asyncio.sleep(0)
    assert not task.done()
    out = TokenOut("w", eng.vocab.ids[0], "length", pend.running)
    pend.queue.put_nowait(out)
    assert await task == [out]


# --- the one admission path (OpenAI and SGLang share it) ---------------------------


def _rejection(eng: SimEngine, body: object, parse: Parse = parse_completion) -> tuple[int, str]:
    with pytest.raises(Rejected) as e:
        eng.admit(body, parse, "cmpl", None)
    return e.value.status, e.value.reason


async def test_admission_refusals_in_order() -> None:
    eng = _engine()
    assert _rejection(eng, {"prompt": []}) == (400, "bad_request")
    assert _rejection(eng, {"prompt": [1], "model": "other"}) == (404, "unknown_model")
    too_long = {"prompt": [1], "max_tokens": SimEngineConfig().max_model_len}
    assert _rejection(eng, too_long) == (400, "bad_request")
    assert _rejection(eng, {"input_ids": [1], "sampling_params": 3}, parse_generate) == (400, "bad_request")
    failing = SimEngine(SimEngineConfig(kv_events_endpoint="", fail_rate=1.0))
    assert _rejection(failing, {"prompt": [1], "max_tokens": 0}) == (400, "bad_request")  # validation first
    assert _rejection(failing, {"prompt": [1]}) == (503, "injected_failure")
    sglang = failing.admit({"input_ids": [1]}, parse_generate, "gen", None, inject_failures=False)
    failing.release(sglang)  # --fail-rate is for the OpenAI API only
    assert not eng.pending and eng.core.num_waiting == 0


async def test_admission_ids_and_release() -> None:
    eng = _engine()
    a = eng.admit({"prompt": [1, 2, 3]}, parse_completion, "cmpl", "abc")
    assert (a.request_id, a.client_id) == ("cmpl-abc", "abc")
    b = eng.admit({"prompt": [1, 2, 3]}, parse_completion, "cmpl", "abc")
    assert b.request_id.startswith("cmpl-abc-") and b.client_id == "abc"  # unique among pending
    g = eng.admit({"input_ids": [4, 5], "rid": "r1"}, parse_generate, "gen", "ignored")
    assert (g.request_id, g.client_id) == ("gen-r1", "r1")
    assert g.request.max_tokens == SGLANG_DEFAULT_MAX_NEW_TOKENS
    assert set(eng.pending) == {a.request_id, b.request_id, g.request_id}
    assert eng.core.num_waiting == 3
    for pend in (a, b, g):  # none finished: released means aborted
        eng.release(pend)
    assert not eng.pending and eng.core.num_waiting == 0
    aborted = eng.metrics.registry.get_sample_value(
        "kvmesh_sim_requests_aborted_total", {"model_name": "sim-model"}
    )
    assert aborted == 3


def test_generate_body_maps_onto_a_completion_request() -> None:
    tok = BuiltinTokenizer()
    body = {
        "text": "a b",
        "sampling_params": {"max_new_tokens": 3, "ignore_eos": True, "stop": "x", "sampling_seed": 7},
        "stream": 1,
        "rid": "",
    }
    r = parse_generate(body, tok)
    assert (r.prompt, r.max_tokens, r.ignore_eos, r.stop, r.seed) == (tok.encode("a b"), 3, True, ["x"], 7)
    assert r.stream is True and r.client_request_id is None and r.model is None
    with pytest.raises(BadRequest) as e:
        parse_generate({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, tok)
    assert e.value.param == "max_tokens"
    assert parse_completion({"prompt": [1]}, tok).max_tokens == OPENAI_DEFAULT_MAX_TOKENS


def test_config_refuses_invalid_values() -> None:
    for bad in ({"block_size": 0}, {"fail_rate": 1.5}, {"eos_prob": -0.1}, {"data_parallel_rank": -1},
                {"kv_event_format": "json"}):  # fmt: skip
        with pytest.raises(ValueError):
            SimEngineConfig(**bad)
