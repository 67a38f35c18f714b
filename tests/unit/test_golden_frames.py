"""Golden frames: KV events made by the released engines' own structs,
encoders and publishers (tests/fixtures/golden/, written by
scripts/golden_frames.py; see its docstring). Each one decodes; mapped onto
an empty worker it leaves exactly the router hashes of the prompts it stored,
hashed under their model, LoRA adapter and cache salt; an event kvmesh cannot
map is skipped alone, with its reason; both replay framings and the live
framing parse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from blocks.hashing import block_hashes, root_seed
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.kv_events import (
    BlockStored,
    SkippedEvent,
    decode_batch,
    parse_live_frames,
    parse_replay_frames,
)

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
MODEL = MANIFEST["model"]
FRAMES: list[dict[str, Any]] = MANIFEST["frames"]
PAYLOADS = [f for f in FRAMES if f["kind"] == "payload"]


def _id(f: dict[str, Any]) -> str:
    return f"{f['engine']}-{f['version']}-{f['name']}"


def _data(f: dict[str, Any]) -> bytes:
    return (GOLDEN / f["file"]).read_bytes()


def _frame(engine: str, version: str, name: str) -> dict[str, Any]:
    return next(f for f in FRAMES if (f["engine"], f["version"], f["name"]) == (engine, version, name))


def _router_hashes(prompt: dict[str, Any], block_size: int) -> list[int]:
    seed = root_seed(MODEL, prompt["lora_name"], prompt["cache_salt"])
    return block_hashes(prompt["tokens"], block_size, seed)


def _mapped(f: dict[str, Any]) -> BlockMapper:
    m = BlockMapper(MODEL, "w")
    m.map_batch(decode_batch(_data(f)).events, seq=0)
    return m


def test_the_manifest_covers_what_the_engines_send() -> None:
    names = {(f["engine"], f["version"], f["name"]) for f in FRAMES}
    for name in ("plain", "salted", "salted_lora", "lora", "removed", "cleared", "tiers", "dp_rank"):
        assert ("vllm", "0.33.0", name) in names
    for name in ("plain", "salted", "salted_lora", "lora", "bigram", "page1", "cpu_pinned", "attn_dp_rank"):
        assert ("sglang", "0.5.23", name) in names
    assert ("vllm", "0.24.0", "replay_seq_payload") in names
    assert ("vllm", "0.33.0", "replay_topic_seq_payload") in names
    for f in FRAMES:
        assert (GOLDEN / f["file"]).is_file(), f["file"]
        assert f["exercises"], f["name"]


@pytest.mark.parametrize("frame", PAYLOADS, ids=_id)
def test_every_payload_decodes_and_maps_to_its_prompts_router_hashes(frame: dict[str, Any]) -> None:
    batch = decode_batch(_data(frame))
    assert batch.rank == frame["rank"]
    assert [(s.index, s.reason) for s in batch.skipped] == [
        (s["index"], s["reason"]) for s in frame["skipped"]
    ]
    skipped_at = {s["index"] for s in frame["skipped"]}
    mediums = [getattr(e, "medium", None) for i, e in enumerate(batch.events) if i not in skipped_at]
    assert mediums == [m for i, m in enumerate(frame["mediums"]) if i not in skipped_at]

    m = BlockMapper(MODEL, "w")
    m.map_batch(batch.events, seq=0)
    want: set[int] = set()
    for p in frame["prompts"]:
        want |= set(_router_hashes(p, frame["block_size"])[: p["live_blocks"]])
    assert m.live_router_hashes() == want
    assert m.stats.skipped_events == len(frame["skipped"])
    assert m.stats.unknown_parent == 0 and m.stats.invalid_tokens == 0


@pytest.mark.parametrize(
    "engine,version,name",
    [
        ("vllm", "0.33.0", "salted"),
        ("vllm", "0.33.0", "salted_lora"),
        ("vllm", "0.33.0", "mm_salted"),
        ("vllm", "0.33.0", "bytes_hashes"),
        ("sglang", "0.5.23", "salted"),
        ("sglang", "0.5.23", "salted_lora"),
    ],
)
def test_tenant_b_is_never_predicted_tenant_a_salted_blocks(engine: str, version: str, name: str) -> None:
    frame = _frame(engine, version, name)
    live = _mapped(frame).live_router_hashes()
    (a,) = frame["prompts"]
    assert a["cache_salt"] == "tenant-1"
    bs = frame["block_size"]
    assert set(_router_hashes(a, bs)[: a["live_blocks"]]) == live  # tenant A hits its own blocks
    for other in ("tenant-2", None):
        b = {**a, "cache_salt": other}
        assert live.isdisjoint(_router_hashes(b, bs)), other


@pytest.mark.parametrize("engine,version", [("vllm", "0.33.0"), ("sglang", "0.5.23")])
def test_an_adapters_blocks_never_serve_the_base_model(engine: str, version: str) -> None:
    frame = _frame(engine, version, "lora")
    live = _mapped(frame).live_router_hashes()
    (p,) = frame["prompts"]
    assert p["lora_name"] == "sql-lora"
    assert live.isdisjoint(_router_hashes({**p, "lora_name": None}, frame["block_size"]))
    base = _mapped(_frame(engine, version, "plain")).live_router_hashes()
    assert live.isdisjoint(base)


def test_vllm_and_sglang_salted_blocks_of_one_prompt_get_the_same_router_hashes() -> None:
    vllm = _mapped(_frame("vllm", "0.33.0", "salted")).live_router_hashes()
    sglang = _mapped(_frame("sglang", "0.5.23", "salted")).live_router_hashes()
    assert vllm == sglang


def test_sglang_bigram_pages_are_the_prompt_tokens_with_their_next_token() -> None:
    frame = _frame("sglang", "0.5.23", "bigram")
    raw = msgspec.msgpack.decode(_data(frame))
    assert isinstance(raw[1][0]["token_ids"][0], list)  # on the wire: pairs
    (stored,) = decode_batch(_data(frame)).events
    assert isinstance(stored, BlockStored)
    tokens = frame["prompts"][0]["tokens"]
    assert stored.token_ids == tokens
    firsts_of_next_block = [[t] for t in tokens[4::4]]
    assert stored.lookahead_token_ids == [*firsts_of_next_block, [raw[1][0]["token_ids"][-1][1]]]


def test_the_vllm_offloading_placeholder_is_skipped_alone() -> None:
    frame = _frame("vllm", "0.33.0", "tiers")
    batch = decode_batch(_data(frame))
    (skipped,) = batch.skipped
    assert isinstance(batch.events[skipped.index], SkippedEvent)
    assert sum(not isinstance(e, SkippedEvent) for e in batch.events) == len(batch.events) - 1


@pytest.mark.parametrize("frame", [f for f in FRAMES if f["kind"] == "replay"], ids=_id)
def test_replay_replies_parse_in_both_framings(frame: dict[str, Any]) -> None:
    replies: list[list[bytes]] = msgspec.msgpack.decode(_data(frame))
    *batches, end = replies
    assert parse_replay_frames(end) is None
    seqs = []
    for msg in batches:
        parsed = parse_replay_frames(msg)
        assert parsed is not None
        seq, payload = parsed
        seqs.append(seq)
        assert decode_batch(payload).events
    assert seqs == list(range(len(batches)))
    topic_framing = frame["name"] == "replay_topic_seq_payload"
    assert all(len(msg) == (4 if topic_framing else 3) for msg in replies)


@pytest.mark.parametrize("frame", [f for f in FRAMES if f["kind"] == "live"], ids=_id)
def test_live_messages_parse(frame: dict[str, Any]) -> None:
    (msg,) = msgspec.msgpack.decode(_data(frame))
    seq, payload = parse_live_frames(msg)
    assert seq == 0 and msg[0] == b"kv-golden"
    assert decode_batch(payload).events
