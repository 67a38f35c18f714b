"""The simulated engine as a real process: HTTP, prefix caching, ZMQ KV events."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq

from engine_adapters.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    decode_seq,
    encode_seq,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
BS = 16
READY_RE = re.compile(r"READY http=(\S+) kv=(\S+) replay=(\S+)")


@dataclass
class Engine:
    proc: subprocess.Popen[str]
    http: str
    kv: str
    replay: str
    stderr: list[str]


def start_engine(*extra: str, timeout: float = 30.0) -> Engine:
    cmd = [
        sys.executable, "-m", "kvmesh.cli", "sim-engine",
        "--port", "0",
        "--kv-events-endpoint", "tcp://127.0.0.1:0",
        "--kv-replay-endpoint", "tcp://127.0.0.1:0",
        "--time-scale", "0.05",
        "--num-gpu-blocks", "400",
        "--hash-seed", "11",
        *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]  # stderr=PIPE: not None
    found: list[re.Match[str]] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]  # stdout=PIPE: not None
            m = READY_RE.search(line)
            if m:
                found.append(m)
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if not found:
        proc.kill()
        proc.wait(5)
        raise AssertionError(f"engine not ready in {timeout}s; stderr:\n{''.join(err)[-3000:]}")
    m = found[0]
    return Engine(proc, m.group(1), m.group(2), m.group(3), err)


def stop_engine(e: Engine) -> int:
    e.proc.send_signal(signal.SIGTERM)
    try:
        return e.proc.wait(10)
    except subprocess.TimeoutExpired:
        e.proc.kill()
        e.proc.wait(5)
        raise


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = start_engine()
    yield e
    assert stop_engine(e) == 0, "".join(e.stderr)[-3000:]


@pytest.fixture
def sub(engine: Engine) -> Iterator[zmq.Socket]:
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.setsockopt(zmq.LINGER, 0)
    s.connect(engine.kv)
    time.sleep(0.3)  # ZMQ slow joiner: let the subscription reach the publisher
    yield s
    s.close()
    ctx.term()


def recv_batches(s: zmq.Socket, until: Any, timeout: float = 5.0) -> list[tuple[int, KVEventBatch]]:
    """Receive (seq, batch) until ``until(batches)`` is true or the timeout."""
    got: list[tuple[int, KVEventBatch]] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        if left <= 0 or not s.poll(int(left * 1000)):
            break
        _topic, seq, payload = s.recv_multipart()
        got.append((decode_seq(seq), decode_batch(payload)))
    return got


def apply(hashes: set[int], batches: list[tuple[int, KVEventBatch]]) -> set[int]:
    for _, b in batches:
        for e in b.events:
            if isinstance(e, BlockStored):
                assert len(e.token_ids) == BS * len(e.block_hashes) and e.block_size == BS
                hashes.update(e.block_hashes)  # type: ignore[arg-type]  # ints here; the wire type admits bytes
            elif isinstance(e, BlockRemoved):
                hashes.difference_update(e.block_hashes)
            elif isinstance(e, AllBlocksCleared):
                hashes.clear()
    return hashes


async def complete(http: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(f"{http}/v1/completions", json=body) as r:
        return r.status, await r.json(content_type=None)


async def stream(http: str, body: dict[str, Any], path: str = "/v1/completions") -> list[Any]:
    chunks: list[Any] = []
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{http}{path}", json={**body, "stream": True}) as r,
    ):
        assert r.status == 200
        async for line in r.content:
            line = line.strip()
            if line.startswith(b"data: "):
                data = line[6:]
                chunks.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return chunks


async def get_json(http: str, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"{http}{path}") as r:
        assert r.status == 200
        return await r.json()


def prompt_with(prefix_seed: int, n_blocks: int, tail: list[int]) -> list[int]:
    return [1000 + (prefix_seed * 7919 + i * 31) % 20000 for i in range(n_blocks * BS)] + tail


async def test_shared_prefix_is_cached_and_events_match_cache(engine: Engine, sub: zmq.Socket) -> None:
    a_prompt = prompt_with(1, 40, [5, 6, 7])
    b_prompt = prompt_with(1, 40, [8, 9, 10, 11])
    status, a = await complete(engine.http, {"prompt": a_prompt, "max_tokens": 8})
    assert status == 200, a
    chunks = await stream(
        engine.http,
        {"prompt": b_prompt, "max_tokens": 8, "stream_options": {"include_usage": True}},
    )
    assert chunks[-1] == "[DONE]"
    b = chunks[-2]
    assert b["choices"] == []
    assert a["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == 40 * BS and cached % BS == 0
    assert b["usage"]["prompt_tokens"] == len(b_prompt) and b["usage"]["completion_tokens"] == 8
    # the engine's own clock: prefill of B covered only the uncached tail
    assert b["kvmesh_sim"]["prefill_s"] < a["kvmesh_sim"]["prefill_s"] / 5
    assert b["kvmesh_sim"]["prefill_tokens"] == len(b_prompt) - cached

    snapshot = await get_json(engine.http, "/admin/cache")
    cache_hashes = {d["hash"] for d in snapshot}
    assert len(cache_hashes) >= 40
    assert all(0 <= h < 2**64 for h in cache_hashes)
    batches = recv_batches(sub, lambda got: apply(set(), got) >= cache_hashes)
    assert apply(set(), batches) == cache_hashes
    seqs = [s for s, _ in batches]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # consecutive, one per step
    # each block's parent/tokens as the engine reports them
    by_hash = {d["hash"]: d for d in snapshot}
    for _, bt in batches:
        for e in bt.events:
            if isinstance(e, BlockStored):
                parent = e.parent_block_hash
                for i, h in enumerate(e.block_hashes):
                    assert by_hash[h]["parent"] == parent
                    assert by_hash[h]["tokens"] == e.token_ids[i * BS : (i + 1) * BS]
                    parent = h


async def test_streaming_matches_non_streaming_and_token_ids(engine: Engine) -> None:
    body = {"prompt": "the same words every time " * 4, "max_tokens": 6, "seed": 77,
            "return_token_ids": True}  # fmt: skip
    status, full = await complete(engine.http, body)
    assert status == 200
    ids = full["choices"][0]["token_ids"]
    assert len(ids) == 6 and full["choices"][0]["finish_reason"] == "length"
    chunks = await stream(engine.http, body)
    assert chunks[-1] == "[DONE]"
    toks = [c["choices"][0] for c in chunks[:-1]]
    # One chunk per step, or several tokens in one when the reader fell behind.
    assert all(t["token_ids"] for t in toks)
    assert [i for t in toks for i in t["token_ids"]] == ids
    assert "prompt_token_ids" in toks[0] and all("prompt_token_ids" not in t for t in toks[1:])
    assert [t["finish_reason"] for t in toks] == [None] * (len(toks) - 1) + ["length"]
    assert "".join(t["text"] for t in toks) == full["choices"][0]["text"]


async def test_bad_requests_get_400_and_engine_keeps_serving(engine: Engine) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{engine.http}/v1/completions", data=b"{not json") as r,
    ):
        assert r.status == 400
        assert "error" in await r.json()
    bad_bodies = [
        {"max_tokens": 4},
        {"prompt": [1, -2, 3]},
        {"prompt": [1, 2, "x"]},
        {"prompt": []},
        {"prompt": [1, 2, 3], "max_tokens": 0},
        {"prompt": [1, 2, 3], "stream": "yes"},
        {"prompt": list(range(400 * BS)), "max_tokens": 10},  # more than the KV pool
        [1, 2, 3],
    ]
    for body in bad_bodies:
        status, resp = await complete(engine.http, body)  # type: ignore[arg-type]  # some bodies are not objects, on purpose
        assert status == 400, (body, resp)
        assert resp["error"]["code"] == 400 and resp["error"]["message"]
    status, resp = await complete(engine.http, {"prompt": [1, 2], "model": "nope"})
    assert status == 404
    status, ok = await complete(engine.http, {"prompt": [1, 2, 3], "max_tokens": 2, "model": "sim-model"})
    assert status == 200 and ok["usage"]["completion_tokens"] == 2
    async with aiohttp.ClientSession() as s, s.get(f"{engine.http}/health") as r:
        assert r.status == 200
    models = await get_json(engine.http, "/v1/models")
    assert models["data"][0]["id"] == "sim-model"


async def test_metrics(engine: Engine) -> None:
    p = prompt_with(3, 4, [1])
    for _ in range(2):
        assert (await complete(engine.http, {"prompt": p, "max_tokens": 2}))[0] == 200
    async with aiohttp.ClientSession() as s, s.get(f"{engine.http}/metrics") as r:
        assert r.status == 200
        text = await r.text()

    def value(name: str) -> float:
        m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
        assert m, name
        return float(m.group(1))

    assert value("vllm:prefix_cache_hits_total") >= 4 * BS
    assert value("vllm:prefix_cache_queries_total") >= value("vllm:prefix_cache_hits_total")
    assert value("vllm:time_to_first_token_seconds_count") >= 2
    assert value("vllm:num_requests_running") == 0
    assert 0 <= value("vllm:kv_cache_usage_perc") <= 1


async def test_clear_and_dropped_batches_are_replayable(engine: Engine, sub: zmq.Socket) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{engine.http}/admin/clear") as r:
            assert r.status == 200
        got = recv_batches(
            sub, lambda g: any(isinstance(e, AllBlocksCleared) for _, b in g for e in b.events)
        )
        assert got and isinstance(got[-1][1].events[-1], AllBlocksCleared)
        assert await get_json(engine.http, "/admin/cache") == []
        cleared_seq = got[-1][0]

        async with s.post(f"{engine.http}/admin/drop_events", json={"count": 1}) as r:
            assert r.status == 200
        async with s.post(f"{engine.http}/admin/drop_events", json={"count": "x"}) as r:
            assert r.status == 400
    # one step whose batch is lost on PUB, then one that is not
    assert (await complete(engine.http, {"prompt": prompt_with(5, 2, [1]), "max_tokens": 1}))[0] == 200
    assert (await complete(engine.http, {"prompt": prompt_with(6, 2, [1]), "max_tokens": 1}))[0] == 200
    got = recv_batches(sub, lambda g: len(g) >= 1)
    assert got and got[0][0] == cleared_seq + 2  # seq cleared+1 never arrived on PUB

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(engine.replay)
    try:
        dealer.send_multipart([b"", encode_seq(cleared_seq + 1)])
        replayed: list[int] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and dealer.poll(500):
            frames = dealer.recv_multipart()
            if frames[-2] == END_SEQ:
                break
            replayed.append(decode_seq(frames[-2]))
            b = decode_batch(frames[-1])
            assert any(isinstance(e, BlockStored) for e in b.events)
        assert replayed[:2] == [cleared_seq + 1, cleared_seq + 2]
    finally:
        dealer.close()
        ctx.term()


async def test_client_disconnect_aborts_request(engine: Engine) -> None:
    body = {"prompt": prompt_with(9, 3, [1]), "max_tokens": 5000, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{engine.http}/v1/completions", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # first token arrived: it is running
        stats = await get_json(engine.http, "/admin/stats")
        assert stats["running"] <= 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = await get_json(engine.http, "/admin/stats")
        if stats["running"] == 0 and stats["pinned_blocks"] == 0:
            break
        time.sleep(0.05)
    assert stats["running"] == 0 and stats["pinned_blocks"] == 0, stats


async def test_a_stopped_engine_cuts_its_open_streams_at_once() -> None:
    """SIGTERM during a long stream: the stream ends cut within seconds (its
    client can go elsewhere), and the process exits."""
    e = start_engine("--kv-events-endpoint", "")
    body = {"prompt": prompt_with(9, 3, [2]), "max_tokens": 5000, "stream": True, "ignore_eos": True}
    try:
        async with aiohttp.ClientSession() as s, s.post(f"{e.http}/v1/completions", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # first token arrived: it is running
            e.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(10):
                    while await r.content.readline():
                        pass
                    raise AssertionError("the stream ended as if complete")
            assert time.monotonic() - t0 < 5
        assert e.proc.wait(10) == 0, "".join(e.stderr)[-3000:]
    finally:
        if e.proc.poll() is None:
            e.proc.kill()
            e.proc.wait(5)


async def test_fail_rate_gives_503_before_first_token() -> None:
    e = start_engine("--fail-rate", "1.0", "--kv-events-endpoint", "")
    try:
        assert e.kv == "-"
        status, resp = await complete(e.http, {"prompt": [1, 2, 3], "max_tokens": 2})
        assert status == 503 and resp["error"]["code"] == 503
        status, _ = await complete(e.http, {"prompt": [1, 2, 3], "max_tokens": 0})
        assert status == 400  # validation still comes first
    finally:
        assert stop_engine(e) == 0


async def test_stop_string_ends_with_stop(engine: Engine) -> None:
    body = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 8, "seed": 3, "return_token_ids": True}
    status, full = await complete(engine.http, body)
    assert status == 200
    ids = full["choices"][0]["token_ids"]
    words = [
        (await complete(engine.http, {**body, "max_tokens": i + 1}))[1]["choices"][0]["text"]
        for i in range(3)
    ]
    third = words[2][len(words[1]) :]  # the text of the third token, e.g. " river"
    assert third and full["choices"][0]["text"].startswith(words[2])
    status, stopped = await complete(engine.http, {**body, "stop": [third]})
    assert status == 200
    c = stopped["choices"][0]
    full_text = full["choices"][0]["text"]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == third
    assert c["text"] == full_text[: full_text.find(third)]  # the stop string is not returned
    n = stopped["usage"]["completion_tokens"]
    assert 1 <= n <= 3 and c["token_ids"] == ids[:n]


async def test_sglang_generate_and_discovery(engine: Engine) -> None:
    body = {"input_ids": prompt_with(12, 2, [1, 2]), "sampling_params": {"max_new_tokens": 4}, "rid": "g1"}
    async with aiohttp.ClientSession() as s, s.post(f"{engine.http}/generate", json=body) as r:
        assert r.status == 200
        full = await r.json()
    meta = full["meta_info"]
    assert meta["id"] == "g1" and meta["prompt_tokens"] == 2 * BS + 2 and meta["completion_tokens"] == 4
    assert meta["finish_reason"] == {"type": "length", "length": 4} and "kvmesh_sim" in meta
    assert len(full["output_ids"]) == 4 and full["text"]
    chunks = await stream(engine.http, body, "/generate")
    assert chunks[-1] == "[DONE]"
    # cumulative, like SGLang's default; the prefix cached by the first call is a hit
    assert [len(c["output_ids"]) for c in chunks[:-1]] == [1, 2, 3, 4]
    assert chunks[-2]["output_ids"] == full["output_ids"] and chunks[-2]["text"] == full["text"]
    assert chunks[-2]["meta_info"]["cached_tokens"] == 2 * BS
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{engine.http}/generate", json={"input_ids": [1], "sampling_params": 3}) as r,
    ):
        assert r.status == 400
    info = await get_json(engine.http, "/get_server_info")
    assert info["page_size"] == BS and info["max_total_num_tokens"] == 400 * BS
    assert (await get_json(engine.http, "/model_info"))["model_path"] == "sim-model"


def test_flag_defaults_are_the_config_defaults() -> None:
    import argparse

    from engine_adapters.sim_engine.config import SimEngineConfig
    from kvmesh.cli.sim_engine import config_from_args, configure_parser, run

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert config_from_args(parser.parse_args([])) == SimEngineConfig()
    assert run(parser.parse_args(["--fail-rate", "2"])) == 2  # refused before anything starts
    cfg = config_from_args(
        parser.parse_args(["--lora-modules", "a=/p/a", "b", "--lora", "c", "--max-waiting", "3"])
    )
    assert cfg.lora_modules == ("a", "b", "c") and cfg.max_waiting == 3
    for bad in (["--max-waiting", "-1"], ["--lora", "sim-model"], ["--lora", "a", "a"]):
        assert run(parser.parse_args(bad)) == 2, bad


def test_json_logs_as_the_image_asks_for_them() -> None:
    """The image sets KVMESH_LOG_FORMAT=json (--log-format's default): the
    engine's lines (all but READY, which is for whoever started it) are then
    JSON objects."""
    import json

    from kvmesh import procs

    e = procs.start_sim_engine("sim-json", ["--log-format", "json"])
    try:
        deadline = time.monotonic() + 10
        while not any("sim.engine_ready" in line for line in e.output) and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [line for line in list(e.output) if line.strip() and not line.startswith("READY")]
        events = [json.loads(line) for line in lines]  # every one parses
        ready = [x for x in events if x["event"] == "sim.engine_ready"]
        assert ready and ready[0]["level"] == "info" and "timestamp" in ready[0]
    finally:
        e.stop()


# --- tenancy (LoRA adapters, cache salts) and the bounded waiting queue ---------------------


async def test_salts_and_adapters_keep_cached_blocks_apart() -> None:
    e = start_engine("--lora-modules", "sql-lora=/adapters/sql", "chat-lora")
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    try:
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(e.kv)
        time.sleep(0.3)
        p = prompt_with(3, 6, [1, 2])

        async def cached(**tenancy: str) -> tuple[int, dict[str, Any]]:
            status, r = await complete(e.http, {"prompt": p, "max_tokens": 2, **tenancy})
            assert status == 200, r
            return r["usage"]["prompt_tokens_details"]["cached_tokens"], r

        assert (await cached(cache_salt="tenant-a"))[0] == 0
        assert (await cached(cache_salt="tenant-a"))[0] == 6 * BS  # A's own blocks
        assert (await cached(cache_salt="tenant-b"))[0] == 0  # never A's
        assert (await cached())[0] == 0  # nor the unsalted base model
        assert (await cached())[0] == 6 * BS
        hit, lora = await cached(model="sql-lora")
        assert hit == 0 and lora["model"] == "sql-lora"  # an adapter never gets the base model's blocks
        assert lora["kvmesh_sim"]["served_model"] == "sql-lora"
        assert (await cached(model="sql-lora"))[0] == 6 * BS
        assert (await cached(lora_path="chat-lora"))[0] == 0  # SGLang's field for the adapter
        for bad in ({"model": "nope"}, {"lora_path": "nope"}):
            status, r = await complete(e.http, {"prompt": p, "max_tokens": 2, **bad})
            assert status == 404, r
        status, r = await complete(e.http, {"prompt": p, "max_tokens": 2, "cache_salt": "a/b"})
        assert status == 400 and r["error"]["param"] == "cache_salt"

        models = await get_json(e.http, "/v1/models")
        assert [(m["id"], m["parent"]) for m in models["data"]] == [
            ("sim-model", None), ("sql-lora", "sim-model"), ("chat-lora", "sim-model"),
        ]  # fmt: skip
        stats = await get_json(e.http, "/admin/stats")
        assert stats["served"] == {"sim-model": 5, "sql-lora": 2, "chat-lora": 1}

        # the events say whose blocks they are, as vLLM 0.33 does
        got = recv_batches(s, lambda g: sum(isinstance(x, BlockStored) for _, b in g for x in b.events) >= 5)
        firsts = [
            x for _, b in got for x in b.events if isinstance(x, BlockStored) and x.parent_block_hash is None
        ]
        keys = {(x.lora_name, x.lora_id, repr(x.extra_keys)) for x in firsts}
        assert (None, None, repr([["tenant-a"]] + [None] * 5)) in keys
        assert ("sql-lora", 1, repr([["sql-lora"]] * 6)) in keys
        assert ("chat-lora", 2, repr([["chat-lora"]] * 6)) in keys
    finally:
        s.close(linger=0)
        ctx.term()
        assert stop_engine(e) == 0, "".join(e.stderr)[-3000:]


async def test_a_full_waiting_queue_answers_429() -> None:
    # One running request at a time, slow steps: the others wait.
    e = start_engine("--max-waiting", "1", "--max-num-seqs", "1", "--time-scale", "1")
    try:
        body = {"prompt": prompt_with(4, 2, []), "max_tokens": 150, "ignore_eos": True}

        async def until(running: int, waiting: int) -> None:
            deadline = time.monotonic() + 10
            while True:
                stats = await get_json(e.http, "/admin/stats")
                if (stats["running"], stats["waiting"]) == (running, waiting):
                    return
                assert time.monotonic() < deadline, stats
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(complete(e.http, body))]
        await until(1, 0)  # the first runs
        tasks.append(asyncio.create_task(complete(e.http, body)))
        await until(1, 1)  # the second waits
        status, r = await complete(e.http, body)
        assert status == 429, r
        assert r["error"]["type"] == "RateLimitError" and "queue full" in r["error"]["message"]
        assert [st for st, _ in await asyncio.gather(*tasks)] == [200, 200]
        async with aiohttp.ClientSession() as http, http.get(f"{e.http}/metrics") as m:
            text = await m.text()
        assert 'kvmesh_sim_requests_rejected_total{model_name="sim-model",reason="queue_full"} 1.0' in text
    finally:
        assert stop_engine(e) == 0, "".join(e.stderr)[-3000:]


@pytest.mark.parametrize("taken", ["http", "kv"])
def test_a_port_already_taken_is_one_clear_line(taken: str) -> None:
    import socket

    from kvmesh import procs

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        free = [procs.free_port() for _ in range(3)]
        http, kv = (port, free[0]) if taken == "http" else (free[0], port)
        args = [
            "--port", str(http),
            "--kv-events-endpoint", f"tcp://127.0.0.1:{kv}",
            "--kv-replay-endpoint", f"tcp://127.0.0.1:{free[1]}",
        ]  # fmt: skip
        cmd = [sys.executable, "-m", "kvmesh.cli", "sim-engine", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "kvmesh sim-engine: cannot listen:" in r.stderr and "in use" in r.stderr
