"""Golden frames: KV events made by the released engines' own structs,
encoders and publishers (tests/fixtures/golden/, written by
scripts/golden_frames.py; see its docstring). Each one decodes; mapped onto
an empty worker it leaves exactly the router hashes of the prompts it stored,
hashed under their model, LoRA adapter and cache salt, on the cache tier
each was stored on (a removal acts on its own tier); an event kvmesh cannot
map is skipped alone, with its reason; a block size other than the
registered one is refused, never indexed; both replay framings and the live
framing parse."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from blocks.delta import OP_STORE
from blocks.hashing import block_hashes, root_seed
from blocks.tiers import TIER_GPU, TIER_HOST, TIER_NAMES
from engine_adapters import native
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.kv_events import (
    SKIP_BLOCK_SIZE_MISMATCH,
    BlockStored,
    decode_batch,
    parse_live_frames,
    parse_replay_frames,
)

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
MODEL = MANIFEST["model"]
FRAMES: list[dict[str, Any]] = MANIFEST["frames"]
PAYLOADS = [f for f in FRAMES if f["kind"] == "payload"]


# Every test here runs against both implementations: the pure-Python
# reference and the native one (engine_adapters/native.py), skipped loudly
# only when the native module is not built.
@pytest.fixture(scope="module", autouse=True, params=["python", "native"])
def implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    global BlockMapper, decode_batch
    if request.param == "native" and not native.NATIVE_BUILT:
        pytest.skip(f"NATIVE PATH NOT TESTED: {native.NOT_BUILT_REASON}")
    saved = BlockMapper, decode_batch
    if request.param == "native":
        BlockMapper, decode_batch = native.NativeBlockMapper, native.decode_batch_native
    yield request.param
    BlockMapper, decode_batch = saved


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


def _want_by_tier(frame: dict[str, Any]) -> dict[int, set[int]]:
    """Tier -> the router hashes a correct reader holds there after ``frame``."""
    want: dict[int, set[int]] = {}
    for p in frame["prompts"]:
        tier = TIER_NAMES.index(p["tier"])
        want.setdefault(tier, set()).update(_router_hashes(p, frame["block_size"])[: p["live_blocks"]])
    return {t: hs for t, hs in want.items() if hs}


def test_the_manifest_covers_what_the_engines_send() -> None:
    names = {(f["engine"], f["version"], f["name"]) for f in FRAMES}
    for name in (
        "plain", "salted", "salted_lora", "lora", "removed", "cleared", "tiers", "tier_removal",
        "storage_remote", "placeholder_unknown", "dp_rank",
    ):  # fmt: skip
        assert ("vllm", "0.33.0", name) in names
    for name in (
        "plain", "salted", "salted_lora", "lora", "bigram", "bigram_mixed", "page1", "cpu_pinned",
        "hicache_evicted", "disk_external", "attn_dp_rank",
    ):  # fmt: skip
        assert ("sglang", "0.5.23", name) in names
    tiers = {p["tier"] for f in PAYLOADS for p in f["prompts"]}
    assert tiers == set(TIER_NAMES)  # every tier is exercised by some engine's frame
    assert ("vllm", "0.24.0", "replay_seq_payload") in names
    assert ("vllm", "0.33.0", "replay_topic_seq_payload") in names
    for f in FRAMES:
        assert (GOLDEN / f["file"]).is_file(), f["file"]
        assert f["exercises"], f["name"]


@pytest.mark.parametrize("frame", PAYLOADS, ids=_id)
def test_every_payload_decodes_and_maps_to_its_prompts_router_hashes(frame: dict[str, Any]) -> None:
    batch = decode_batch(_data(frame))
    assert batch.rank == frame["rank"]
    skipped = {s["index"]: s["reason"] for s in frame["skipped"]}
    # The decoder's skips are a part of the frame's (the block mapper makes the others).
    assert all(skipped.get(s.index) == s.reason for s in batch.skipped)
    mediums = [getattr(e, "medium", None) for i, e in enumerate(batch.events) if i not in skipped]
    assert mediums == [m for i, m in enumerate(frame["mediums"]) if i not in skipped]

    # Registered with the frame's own block size: nothing refused for its size.
    m = BlockMapper(MODEL, "w", block_size=frame["block_size"])
    m.map_batch(batch.events, seq=0)
    assert m.live_by_tier() == _want_by_tier(frame)
    assert m.stats.skipped_by_reason == Counter(skipped.values())
    assert m.stats.unknown_parent == 0 and m.stats.invalid_tokens == 0
    assert m.stats.block_size_mismatch == 0


@pytest.mark.parametrize("frame", [f for f in PAYLOADS if f["prompts"]], ids=_id)
def test_a_frame_of_another_block_size_is_refused_never_indexed(frame: dict[str, Any]) -> None:
    registered = 16 if frame["block_size"] != 16 else 32
    batch = decode_batch(_data(frame))
    m = BlockMapper(MODEL, "w", block_size=registered)
    delta = m.map_batch(batch.events, seq=0)
    stores = [e for e in batch.events if isinstance(e, BlockStored) and e.token_ids]
    assert [op for op in delta.ops if op.kind == OP_STORE] == []
    assert m.live_by_tier() == {}
    assert m.stats.skipped_by_reason[SKIP_BLOCK_SIZE_MISMATCH] == len(stores)
    assert m.stats.block_size_mismatch == frame["block_size"]


def test_sglang_page_size_1_is_refused_by_a_router_at_16_with_the_size_it_saw() -> None:
    frame = _frame("sglang", "0.5.23", "page1")
    m = BlockMapper(MODEL, "w", block_size=16)
    m.map_batch(decode_batch(_data(frame)).events, seq=0)
    assert m.stats.block_size_mismatch == 1 and m.live_router_hashes() == set()
    # The same engine restarted with --page-size 16 maps again and clears the mismatch.
    plain = _frame("sglang", "0.5.23", "plain")  # its pages are 4 tokens: registered at 4 here
    m.block_size = 4
    m.map_batch(decode_batch(_data(plain)).events, seq=1)
    assert m.stats.block_size_mismatch == 0 and m.live_router_hashes()


@pytest.mark.parametrize(
    "engine,version,name",
    [("vllm", "0.33.0", "tier_removal"), ("sglang", "0.5.23", "hicache_evicted")],
)
def test_a_gpu_eviction_leaves_the_host_copy_indexed(engine: str, version: str, name: str) -> None:
    frame = _frame(engine, version, name)
    live = _mapped(frame).live_by_tier()
    (gpu,) = [p for p in frame["prompts"] if p["tier"] == "gpu"]
    (host,) = [p for p in frame["prompts"] if p["tier"] == "host"]
    evicted = _router_hashes(gpu, frame["block_size"])[gpu["live_blocks"]]
    assert evicted not in live[TIER_GPU] and evicted in live[TIER_HOST]
    assert host["live_blocks"] > gpu["live_blocks"]


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


def test_the_vllm_offloading_placeholder_maps_through_a_known_hash_else_is_skipped_alone() -> None:
    known = _frame("vllm", "0.33.0", "tiers")
    m = _mapped(known)
    assert m.stats.placeholder_blocks == 1 and m.stats.skipped_events == 0
    unknown = _frame("vllm", "0.33.0", "placeholder_unknown")
    batch = decode_batch(_data(unknown))
    assert not batch.skipped  # a placeholder decodes: only the mapper can tell
    m = _mapped(unknown)
    assert m.stats.skipped_by_reason == {"no_token_ids": 1}
    assert m.live_by_tier() == _want_by_tier(unknown)  # the store after it applied


def test_a_batch_with_bigram_pages_decodes_whole() -> None:
    frame = _frame("sglang", "0.5.23", "bigram_mixed")
    raw = msgspec.msgpack.decode(_data(frame))
    assert isinstance(raw[1][0]["token_ids"][0], list) and isinstance(raw[1][1]["token_ids"][0], int)
    batch = decode_batch(_data(frame))
    assert not batch.skipped and all(isinstance(e, BlockStored) for e in batch.events)
    assert _mapped(frame).live_by_tier() == _want_by_tier(frame)


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
