"""The simulated engine's streaming path, in process: tokens the scheduler
queued while the stream handler was busy come out as one batch (one SSE
chunk), as vLLM's output collector merges them; stop strings still cut."""

from __future__ import annotations

import argparse
import asyncio

from engine_adapters.sim_engine.core import SimRequest, TokenOut
from engine_adapters.sim_engine.server import SimEngine, _Pending, configure_parser, parse_completion


def _engine() -> SimEngine:
    p = argparse.ArgumentParser()
    configure_parser(p)
    return SimEngine(p.parse_args(["--kv-events-endpoint", "", "--kv-replay-endpoint", ""]))


def _pending(eng: SimEngine, rid: str, body: dict) -> _Pending:
    params = parse_completion(body, eng.tokenizer)
    seq = eng.core.add(SimRequest(rid, params.prompt, params.max_tokens, 0, True), 0.0)
    return _Pending(params, seq)


async def test_queued_tokens_come_out_as_one_batch() -> None:
    eng = _engine()
    pend = _pending(eng, "r", {"prompt": [5, 6, 7], "max_tokens": 4})
    words = sorted(eng._out_text)
    toks = [words[0], words[1], words[2], words[3]]
    batches = eng._batches("r", pend)
    pend.queue.put_nowait(TokenOut("r", toks[0], None, pend.seq))
    first = await anext(batches)
    assert [t for t, *_ in first] == toks[:1]
    # The handler was busy: three tokens wait, the last one finishing.
    for t, fin in ((toks[1], None), (toks[2], None), (toks[3], "length")):
        pend.queue.put_nowait(TokenOut("r", t, fin, pend.seq))
    second = await anext(batches)
    assert [t for t, *_ in second] == toks[1:]
    assert [f for _, _, f, _ in second] == [None, None, "length"]
    assert "".join(text for _, text, _, _ in first + second) == "".join(eng._out_text[t] for t in toks)
    assert pend.done


async def test_stop_string_inside_a_batch_drops_what_follows() -> None:
    eng = _engine()
    words = sorted(eng._out_text)
    stop = eng._out_text[words[1]]
    pend = _pending(eng, "s", {"prompt": [5, 6, 7], "max_tokens": 8, "stop": [stop]})
    for t in words[:4]:
        pend.queue.put_nowait(TokenOut("s", t, None, pend.seq))
    out = [b async for b in eng._batches("s", pend)]
    assert len(out) == 1
    assert [(t, f, s) for t, _, f, s in out[0]] == [(words[0], None, None), (words[1], "stop", stop)]
    assert "".join(text for _, text, _, _ in out[0]) == eng._out_text[words[0]]  # the stop string is cut


async def test_take_waits_for_the_first_token() -> None:
    eng = _engine()
    pend = _pending(eng, "w", {"prompt": [5], "max_tokens": 1})
    task = asyncio.ensure_future(pend.queue.take())
    await asyncio.sleep(0)
    assert not task.done()
    out = TokenOut("w", sorted(eng._out_text)[0], "length", pend.seq)
    pend.queue.put_nowait(out)
    assert await task == [out]
