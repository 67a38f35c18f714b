"""The native hot path (native/, engine_adapters/native.py) against the
pure-Python reference: random event batches of every shape the decoder
accepts (and many it refuses) go through both, which must agree on every
decoded batch, delta, statistic, skip reason and mapping; arbitrary and
corrupted bytes are refused by both alike, never with another exception."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocks import hashing
from engine_adapters import native
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.kv_events import (
    SKIP_UNDECODABLE,
    EventDecodeError,
    KVEventBatch,
    SkippedEvent,
    decode_batch,
)

pytestmark = pytest.mark.skipif(
    not native.NATIVE_BUILT,
    reason=f"NATIVE PATH NOT TESTED: {native.NOT_BUILT_REASON}",
)

MODEL = "parity-model"
enc = msgspec.msgpack.encode

# Small pools, so that stores chain to earlier blocks, share router hashes,
# reuse engine hashes and remove what is live.
HASHES: list[Any] = [1, 2, 3, 2**64 - 1, 2**63, -1, -(2**63), 0, b"\x01" * 32, b"", b"ab"]
MEDIUMS = [None, "GPU", "CPU", "CPU_PINNED", "STORAGE", "DISK", "EXTERNAL", "gpu", "cpu", "NVRAM", "dıSK", ""]
LOCALITIES = [None, "LOCAL", "REMOTE"]
LORAS = [None, "", "a", "sql"]
SALTS = [None, "", "s", "t"]

ehash = st.sampled_from(HASHES)
# KV-cache groups of a hybrid model; -1 and 64 are not groups (refused)
GROUPS = st.one_of(st.none(), st.integers(0, 3), st.sampled_from([0, 1, -1, 64]))
token = st.integers(0, 60).flatmap(
    lambda r: st.integers(0, 3) if r < 58 else st.sampled_from([-1, 2**32, 2**32 - 1, 2**64 - 1])
)
block_size = st.sampled_from([2, 2, 2, 1, 4, 0, -1])
extra_key_item = st.one_of(
    st.sampled_from(["s", "t", "a", "sql", ""]),
    st.just(["cache_salt", "t"]),
    st.just(["cache_salt", 5]),
    st.just(["lora", "a", "/p"]),
    st.just(["img-0", 1]),
    st.just({"type": "cache_salt", "salt": "m"}),
    st.just({"type": "cache_salt", "salt": 3}),
    st.just({"type": "other"}),
    st.just(b"\x01\x02"),
    st.just(msgspec.msgpack.Ext(5, b"x")),
    st.integers(-3, 3),
    st.none(),
)
extra_keys = st.one_of(
    st.none(),
    st.just([]),
    st.lists(st.one_of(st.none(), st.lists(extra_key_item, max_size=3)), min_size=1, max_size=3),
)


@st.composite
def stored_map(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.sampled_from([1, 2, 3, 0]))
    bs = draw(block_size)
    n_tokens = n * bs if bs > 0 and draw(st.integers(0, 9)) < 8 else draw(st.integers(0, 7))
    ev: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": draw(st.lists(ehash, min_size=n, max_size=n)),
        "parent_block_hash": draw(st.one_of(st.none(), ehash)),
        "token_ids": draw(st.lists(token, min_size=n_tokens, max_size=n_tokens)),
        "block_size": bs,
    }
    if draw(st.integers(0, 5)) == 5:  # placeholders of vLLM's offloading
        ev["token_ids"], ev["block_size"] = [], draw(st.sampled_from([0, bs]))
    for field, values in (
        ("medium", st.sampled_from(MEDIUMS)),
        ("locality", st.sampled_from(LOCALITIES)),
        ("lora_name", st.sampled_from(LORAS)),
        ("cache_salt", st.sampled_from(SALTS)),
        ("extra_keys", extra_keys),
        ("lora_id", st.one_of(st.none(), st.integers(0, 3))),
        ("group_idx", GROUPS),
        ("ownership", st.sampled_from([None, "PRIMARY"])),
        ("lookahead_token_ids", st.one_of(st.none(), st.lists(st.lists(token, max_size=2), max_size=2))),
        ("future_field", st.sampled_from([1, "x", [1, {"a": None}]])),
    ):
        if draw(st.integers(0, 2)) == 0:
            ev[field] = draw(values)
    return ev


@st.composite
def bigram_map(draw: st.DrawFn) -> dict[str, Any]:
    """SGLang's EAGLE pages: token pairs, usually chained."""
    ev = draw(stored_map())
    tokens = [t for t in ev["token_ids"]] or [1]
    pairs = [[a, b] for a, b in zip(tokens, tokens[1:] + [draw(token)])]
    if pairs and draw(st.integers(0, 4)) == 0:
        pairs[-1][0] = 9  # not chained
    if draw(st.integers(0, 6)) == 0:
        pairs.append([1, 2, 3])
    ev["token_ids"] = pairs
    return ev


@st.composite
def removed_map(draw: st.DrawFn) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": draw(st.lists(ehash, max_size=4))}
    for field, values in (
        ("medium", st.sampled_from(MEDIUMS)),
        ("locality", st.sampled_from(LOCALITIES)),
        ("group_idx", GROUPS),
    ):
        if draw(st.booleans()):
            ev[field] = draw(values)
    return ev


# vLLM's field order, which positional events follow (vLLM <= 0.23 sent the
# first seven; builds that kept the shape append the later ones in order).
_STORED_FIELDS = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
    "lookahead_token_ids",
]
_REMOVED_FIELDS = ["block_hashes", "medium", "group_idx", "locality", "ownership"]


def _as_array(ev: dict[str, Any], extra: list[Any], cut: int) -> list[Any]:
    """The positional form of a map event: its first ``cut`` fields (at
    least the required ones; all of them, then ``extra`` values past vLLM's
    last field, when ``cut`` is larger)."""
    if ev["type"] == "BlockStored":
        n = min(max(cut, 4), len(_STORED_FIELDS))
        spec = {"kv_cache_spec_kind": "mamba", "kv_cache_spec_sliding_window": 128, "session_id": "s"}
        tail = extra if cut > n else []
        return [ev["type"], *[ev.get(f, spec.get(f)) for f in _STORED_FIELDS[:n]], *tail]
    if ev["type"] == "BlockRemoved":
        n = min(max(cut, 1), len(_REMOVED_FIELDS))
        tail = extra if cut > n else []
        return [ev["type"], *[ev.get(f) for f in _REMOVED_FIELDS[:n]], *tail]
    return [ev["type"], *extra]


junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
              st.text(max_size=4), st.binary(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6,
)  # fmt: skip


@st.composite
def mangled(draw: st.DrawFn) -> Any:
    """A good event with one field of a wrong type, one required field
    gone, a wrong tag, or just any value."""
    ev = dict(draw(st.one_of(stored_map(), removed_map())))
    r = draw(st.integers(0, 3))
    if r == 0:
        ev[draw(st.sampled_from(sorted(ev)))] = draw(junk)
    elif r == 1:
        ev.pop(draw(st.sampled_from(sorted(ev))))
    elif r == 2:
        ev["type"] = draw(st.sampled_from(["BlockExploded", "AllBlocksCleared", 5, b"BlockStored"]))
    else:
        return draw(junk)
    return ev


@st.composite
def event(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 9))
    if kind <= 2:
        ev = draw(stored_map())
    elif kind == 3:
        ev = draw(removed_map())
    elif kind == 4:
        ev = {"type": "AllBlocksCleared"} if draw(st.integers(0, 3)) else {"type": "AllBlocksCleared", "x": 1}
    elif kind == 5:
        ev = draw(bigram_map())
    elif kind == 6:
        return draw(mangled())
    else:
        ev = draw(st.one_of(stored_map(), removed_map()))
    if kind >= 8:  # the positional form
        return _as_array(ev, draw(st.lists(junk, max_size=3)), draw(st.integers(0, 16)))
    return ev


@st.composite
def payload(draw: st.DrawFn) -> bytes:
    events = draw(st.lists(event(), max_size=5))
    ts = draw(st.one_of(st.floats(allow_nan=False), st.integers(0, 2**64 - 1)))
    rank = draw(st.one_of(st.none(), st.integers(-2, 3)))
    shape = draw(st.integers(0, 9))
    if shape <= 6:
        env: Any = [ts, events] + ([rank] + draw(st.lists(junk, max_size=1)) if shape < 6 else [])
    elif shape == 7:
        env = {
            "ts": ts,
            "events": events,
            draw(st.sampled_from(["data_parallel_rank", "attn_dp_rank"])): rank,
        }
    elif shape == 8:
        env = {"ts": ts, "events": events, "data_parallel_rank": rank, "attn_dp_rank": 2, "x": [1]}
    else:  # an envelope the decoders must refuse (or not) alike
        env = draw(st.sampled_from([["soon", events], [ts, "events"], [ts], {"ts": ts}, {"events": events},
                                    [ts, events, True], {"ts": ts, "events": events, 5: 1}]))  # fmt: skip
    data = enc(env)
    cut = draw(st.integers(0, 30))  # hypothesis favours small draws: corrupt at the top
    if cut == 30:
        data = data[: draw(st.integers(0, len(data)))]
    elif cut == 29:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    return data


def _norm(batch: KVEventBatch) -> tuple[Any, ...]:
    """A batch to compare: an undecodable skip's detail is msgspec's wording."""
    events = [
        (e.index, e.reason) if isinstance(e, SkippedEvent) and e.reason == SKIP_UNDECODABLE else e
        for e in batch.events
    ]
    return batch.ts, batch.data_parallel_rank, batch.attn_dp_rank, events


def _decode_both(data: bytes) -> tuple[Any, Any]:
    out = []
    for decode in (decode_batch, native.decode_batch_native):
        try:
            out.append(_norm(decode(data)))
        except EventDecodeError:
            out.append(EventDecodeError)
    return out[0], out[1]


def _state(m: BlockMapper) -> tuple[Any, ...]:
    return (
        m.stats,
        sorted(m.export(), key=repr),
        m.live_by_tier(),
        m.live_router_hashes(),
        len(m),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=payload())
def test_both_decoders_agree_on_every_shape(data: bytes) -> None:
    py, nat = _decode_both(data)
    assert nat == py


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(payload(), min_size=1, max_size=8), registered=st.sampled_from([None, 2]))
def test_both_mappers_agree_on_random_event_streams(frames: list[bytes], registered: int | None) -> None:
    """Python (decode_batch + map_batch), native map_frame, and native
    map_batch of the Python-decoded events: the same deltas and state."""
    py = BlockMapper(MODEL, "w", registered)
    by_frame = native.NativeBlockMapper(MODEL, "w", registered)
    by_events = native.NativeBlockMapper(MODEL, "w", registered)
    for seq, data in enumerate(frames):
        try:
            batch = decode_batch(data)
        except EventDecodeError:
            with pytest.raises(EventDecodeError):
                by_frame.map_frame(data, seq)
            continue
        want = py.map_batch(batch.events, seq)
        frame, got = by_frame.map_frame(data, seq)
        assert frame == native.Frame(batch.ts, len(batch.events), batch.rank)
        assert got == want
        assert by_events.map_batch(batch.events, seq) == want
        assert _state(by_frame) == _state(py) == _state(by_events)
    assert by_frame.block_map == py.block_map
    assert by_frame.block_map.refs == py.block_map.refs


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_are_refused_alike_and_never_crash(data: bytes) -> None:
    py, nat = _decode_both(data)
    assert nat == py


@settings(max_examples=100, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=40),
    bs=st.integers(1, 9),
    seed=st.integers(0, 2**64 - 1),
)
def test_native_hashing_is_blocks_hashing(tokens: list[int], bs: int, seed: int) -> None:
    kn = native._module()
    assert kn.block_hashes(tokens, bs, seed) == hashing.block_hashes(tokens, bs, seed)


@pytest.mark.parametrize(
    "lora,salt", [(None, None), ("a", None), (None, "s"), ("", ""), ("sql", "tenant-1"), ("é", "\x00")]
)
def test_native_root_seed_is_blocks_root_seed(lora: str | None, salt: str | None) -> None:
    assert native._module().root_seed(MODEL, lora, salt) == hashing.root_seed(MODEL, lora, salt)


def test_nesting_past_the_bound_is_a_decode_error_not_a_crash() -> None:
    deep = b"\x91" * 5000 + b"\x01"
    data = b"\x93\x01\x91" + deep + b"\x00"
    with pytest.raises(EventDecodeError, match="deeper"):
        native.decode_batch_native(data)
    with pytest.raises(EventDecodeError):
        native.NativeBlockMapper(MODEL).map_frame(data, 0)


def test_exotic_extra_keys_are_judged_by_msgspec() -> None:
    good = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [1, 2],
            "block_size": 2}  # fmt: skip
    bad_timestamp = enc({**good, "extra_keys": [None]})[:-1] + b"\xd5\xff\x01\x02"
    ext = enc({**good, "extra_keys": [[msgspec.msgpack.Ext(5, b"x"), "s"]]})
    for ev in (bad_timestamp, ext):
        data = b"\x93\x01\x91" + ev + b"\x00"
        assert _decode_both(data)[0] == _decode_both(data)[1]
    (skipped,) = native.decode_batch_native(b"\x93\x01\x91" + bad_timestamp + b"\x00").events
    assert isinstance(skipped, SkippedEvent) and skipped.reason == SKIP_UNDECODABLE


GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"


def test_map_frame_of_every_golden_payload_is_decode_then_map() -> None:
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    payloads = [f for f in manifest["frames"] if f["kind"] == "payload"]
    assert payloads
    for f in payloads:
        data = (GOLDEN / f["file"]).read_bytes()
        py = BlockMapper(manifest["model"], "w", f["block_size"])
        nat = native.NativeBlockMapper(manifest["model"], "w", f["block_size"])
        for m in (py, nat):
            frame, delta = native.map_frame(m, data, 3)
            assert frame.rank == f["rank"] and delta.seq == 3
        assert _state(nat) == _state(py), f["file"]
