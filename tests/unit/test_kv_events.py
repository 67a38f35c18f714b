"""Wire format of KV events: byte-exact frames written by hand from vLLM's and
SGLang's struct definitions, malformed input (an unreadable envelope fails
the batch, an unusable event is skipped alone), and round trips. The frames
the engines' own code made are checked in test_golden_frames.py."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks.tiers import TIER_DISK, TIER_EXTERNAL, TIER_GPU, TIER_HOST
from engine_adapters import native
from engine_adapters.kv_endpoints import connect_endpoint, endpoint_problem, offset_endpoint_port, should_bind
from engine_adapters.kv_events import (
    END_SEQ,
    MAX_SEQ,
    SKIP_BAD_BLOCK_SIZE,
    SKIP_BIGRAM_NOT_CHAINED,
    SKIP_TOKEN_COUNT,
    SKIP_UNDECODABLE,
    SKIP_UNKNOWN_MEDIUM,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    EventFormat,
    KVEventBatch,
    SkippedEvent,
    decode_batch,
    decode_seq,
    encode_batch,
    encode_seq,
    parse_live_frames,
    parse_replay_frames,
    tier_of,
)

_plain = msgspec.msgpack.encode  # generic msgpack of plain lists/dicts (no kvmesh structs)


# Every test here runs against both implementations: the pure-Python
# reference and the native one (engine_adapters/native.py), skipped loudly
# only when the native module is not built.
@pytest.fixture(scope="module", autouse=True, params=["python", "native"])
def implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    global decode_batch
    if request.param == "native" and not native.NATIVE_BUILT:
        pytest.skip(f"NATIVE PATH NOT TESTED: {native.NOT_BUILT_REASON}")
    saved = decode_batch
    if request.param == "native":
        decode_batch = native.decode_batch_native
    yield request.param
    decode_batch = saved


def _s(text: str) -> str:
    """msgpack fixstr as hex."""
    raw = text.encode()
    assert len(raw) < 32
    return f"{0xA0 + len(raw):02x}" + raw.hex()


# vLLM >= 0.24: KVEventBatch(ts=1.5, events=[BlockStored(block_hashes=[1],
# parent_block_hash=None, token_ids=[1, 2], block_size=2, lora_id=None,
# medium="GPU", lora_name=None)], data_parallel_rank=0), byte by byte:
# array_like batch, tagged-map event, fields in declaration order, the three
# default-less optional fields present as nil.
GOLDEN_MAP = bytes.fromhex(
    "93"  # [ts, events, data_parallel_rank]
    "cb3ff8000000000000"  # 1.5 as float64
    "91"  # one event
    "88"  # map of 8
    + _s("type")
    + _s("BlockStored")
    + _s("block_hashes")
    + "9101"
    + _s("parent_block_hash")
    + "c0"
    + _s("token_ids")
    + "920102"
    + _s("block_size")
    + "02"
    + _s("lora_id")
    + "c0"
    + _s("medium")
    + _s("GPU")
    + _s("lora_name")
    + "c0"
    + "00"  # data_parallel_rank 0
)

# vLLM <= 0.23: the same batch with a positional event, tag first.
GOLDEN_ARRAY = bytes.fromhex(
    "93"
    "cb3ff8000000000000"
    "91"
    "98" + _s("BlockStored") + "9101" + "c0" + "920102" + "02" + "c0" + _s("GPU") + "c0" + "00"  # array of 8
)

EXPECTED = KVEventBatch(
    ts=1.5,
    events=[BlockStored([1], None, [1, 2], 2, medium="GPU")],
    data_parallel_rank=0,
)


@pytest.mark.parametrize("golden,fmt", [(GOLDEN_MAP, "map"), (GOLDEN_ARRAY, "array")])
def test_golden_frames_decode_and_encode_byte_exact(golden: bytes, fmt: EventFormat) -> None:
    assert decode_batch(golden) == EXPECTED
    assert encode_batch(EXPECTED, fmt) == golden


BIG = 2**64 - 1  # vLLM hashes are unsigned 64-bit: values >= 2**63 occur
SHA = bytes(range(32))  # vLLM with sha256 block hashing sends bytes


def test_map_events_with_big_and_bytes_hashes_and_every_event_kind() -> None:
    payload = _plain(
        [
            2.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [BIG, SHA],
                    "parent_block_hash": 2**63,
                    "token_ids": list(range(8)),
                    "block_size": 4,
                    "lora_id": 7,
                    "medium": "GPU",
                    "lora_name": "adapter-a",
                },
                {"type": "BlockRemoved", "block_hashes": [BIG], "medium": "GPU"},
                {"type": "AllBlocksCleared"},
            ],
            1,
        ]
    )
    b = decode_batch(payload)
    stored, removed, cleared = b.events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [BIG, SHA]
    assert stored.parent_block_hash == 2**63
    assert stored.lora_name == "adapter-a" and stored.lora_id == 7
    assert removed == BlockRemoved([BIG], medium="GPU")
    assert cleared == AllBlocksCleared()
    assert b.rank == 1


def test_array_events_with_big_and_bytes_hashes() -> None:
    payload = _plain(
        [
            2.0,
            [
                ["BlockStored", [BIG, SHA], SHA, list(range(8)), 4, None, "GPU", None],
                ["BlockRemoved", [SHA], "GPU"],
                ["AllBlocksCleared"],
            ],
        ]
    )
    b = decode_batch(payload)
    assert b.events[0] == BlockStored([BIG, SHA], SHA, list(range(8)), 4, medium="GPU")
    assert b.events[1] == BlockRemoved([SHA], medium="GPU")
    assert b.events[2] == AllBlocksCleared()
    assert b.rank == 0 and b.data_parallel_rank is None


def test_sglang_batch_attn_dp_rank_and_negative_int64_hashes() -> None:
    # SGLang: EventBatch array_like [ts, events, attn_dp_rank]; tagged-map
    # events; SHA-256 chain hashes as signed int64; cache_salt field.
    payload = _plain(
        [
            3.25,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [-(2**63), -5],
                    "parent_block_hash": -1,
                    "token_ids": [9] * 32,
                    "block_size": 16,
                    "lora_id": None,
                    "medium": "GPU",
                    "cache_salt": "tenant-1",
                },
                {"type": "BlockRemoved", "block_hashes": [-5]},
            ],
            3,
        ]
    )
    b = decode_batch(payload)
    assert b.rank == 3
    stored = b.events[0]
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [-(2**63), -5]
    assert stored.parent_block_hash == -1
    assert stored.cache_salt == "tenant-1"
    assert b.events[1] == BlockRemoved([-5])


def test_map_envelope_with_attn_dp_rank() -> None:
    payload = _plain({"ts": 1.0, "events": [{"type": "AllBlocksCleared"}], "attn_dp_rank": 2})
    b = decode_batch(payload)
    assert b.rank == 2 and b.events == [AllBlocksCleared()]


def test_unknown_extra_fields_are_ignored_in_every_shape() -> None:
    newer_map_event = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [5, 6],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "event_version": 1,
        "extra_keys": [[{"type": "cache_salt", "salt": "s"}]],
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
        "kv_cache_spec_sliding_window": None,
        "locality": "LOCAL",
        "ownership": None,
        "some_future_field": {"nested": [1, 2]},
    }
    newer_array_event = ["BlockRemoved", [1], "GPU", 0, "LOCAL", None, "future"]
    payload = _plain([1.0, [newer_map_event, newer_array_event], 0, "future batch field"])
    b = decode_batch(payload)
    stored = b.events[0]
    assert isinstance(stored, BlockStored)
    assert stored.token_ids == [5, 6]
    assert stored.extra_keys == [[{"type": "cache_salt", "salt": "s"}]]
    # a positional removal's later fields are read in vLLM's order
    assert b.events[1] == BlockRemoved([1], medium="GPU", group_idx=0, locality="LOCAL")


def test_positional_events_read_vllms_later_fields_in_its_order() -> None:
    # A build that keeps positional events with the newer fields: the cache
    # salt is in extra_keys ($[8]) (without it a salted tenant's blocks would
    # be indexed under the unsalted root), the KV-cache group in group_idx ($[9]).
    stored = ["BlockStored", [11, 12], None, [1, 2, 3, 4], 2, None, "GPU", None, [["tenant-1"], None], 1,
              "sliding_window", 128, "LOCAL", None, "session-7", [[5], [6]], "future"]  # fmt: skip
    removed = ["BlockRemoved", [12], "GPU", 1, "LOCAL", None]
    b = decode_batch(_plain([1.0, [stored, removed], 0]))
    ev = b.events[0]
    assert isinstance(ev, BlockStored)
    assert (ev.extra_keys, ev.group_idx, ev.locality, ev.lookahead_token_ids) == (
        [["tenant-1"], None],
        1,
        "LOCAL",
        [[5], [6]],
    )
    assert b.events[1] == BlockRemoved([12], medium="GPU", group_idx=1, locality="LOCAL")
    # a later field of the wrong type makes the event unusable, as in a map
    bad = decode_batch(_plain([1.0, [[*stored[:9], "one"]], 0]))
    assert isinstance(bad.events[0], SkippedEvent) and bad.events[0].reason == SKIP_UNDECODABLE


_GOOD_EVENT = {
    "type": "BlockStored",
    "block_hashes": [1],
    "parent_block_hash": None,
    "token_ids": [1, 2],
    "block_size": 2,
}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(GOLDEN_MAP[:-5], id="truncated-map"),
        pytest.param(GOLDEN_ARRAY[:10], id="truncated-array"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(_plain(42), id="not-a-batch"),
        pytest.param(_plain(["soon", []]), id="ts-is-str"),
        pytest.param(_plain([1.0, "events"]), id="events-not-list"),
        pytest.param(_plain({"ts": 1.0}), id="map-envelope-without-events"),
    ],
)
def test_unreadable_envelopes_raise_event_decode_error_only(payload: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_batch(payload)


@pytest.mark.parametrize(
    "bad,reason",
    [
        pytest.param(7, SKIP_UNDECODABLE, id="event-is-int"),
        pytest.param({"type": "BlockExploded"}, SKIP_UNDECODABLE, id="unknown-tag"),
        pytest.param(["BlockExploded", 1], SKIP_UNDECODABLE, id="unknown-array-tag"),
        pytest.param({**_GOOD_EVENT, "block_hashes": "abc"}, SKIP_UNDECODABLE, id="hashes-str"),
        pytest.param({**_GOOD_EVENT, "block_hashes": [1.5]}, SKIP_UNDECODABLE, id="hash-float"),
        pytest.param({**_GOOD_EVENT, "token_ids": [1, "x"]}, SKIP_UNDECODABLE, id="token-str"),
        pytest.param({**_GOOD_EVENT, "block_hashes": [{"h": 1}]}, SKIP_UNDECODABLE, id="hash-map"),
        pytest.param({**_GOOD_EVENT, "token_ids": [[1, 2, 3]]}, SKIP_UNDECODABLE, id="token-triple"),
        pytest.param({**_GOOD_EVENT, "token_ids": [1, 2, 3]}, SKIP_TOKEN_COUNT, id="token-count"),
        pytest.param({**_GOOD_EVENT, "medium": "NVRAM"}, SKIP_UNKNOWN_MEDIUM, id="unknown-medium"),
        pytest.param(
            {"type": "BlockRemoved", "block_hashes": [1], "medium": "TAPE"},
            SKIP_UNKNOWN_MEDIUM,
            id="rm-medium",
        ),
        pytest.param({**_GOOD_EVENT, "block_size": 0}, SKIP_BAD_BLOCK_SIZE, id="bs-0-with-tokens"),
        pytest.param(
            ["BlockStored", [1, 2], None, [1, 2, 3], 2, None, None, None],
            SKIP_TOKEN_COUNT,
            id="token-count-array",
        ),
        pytest.param({"block_hashes": [1]}, SKIP_UNDECODABLE, id="missing-tag"),
        pytest.param({"type": "BlockRemoved"}, SKIP_UNDECODABLE, id="missing-field"),
        pytest.param({"type": 5}, SKIP_UNDECODABLE, id="tag-not-a-string"),
        pytest.param(
            {**_GOOD_EVENT, "token_ids": [[1, 2], [3, 4]]}, SKIP_BIGRAM_NOT_CHAINED, id="pairs-not-chained"
        ),
    ],
)
def test_an_event_that_cannot_be_used_is_skipped_alone_with_its_reason(bad: object, reason: str) -> None:
    removed = {"type": "BlockRemoved", "block_hashes": [9]}
    b = decode_batch(_plain([1.0, [_GOOD_EVENT, bad, removed], 1]))
    good, skipped, rm = b.events
    assert good == BlockStored([1], None, [1, 2], 2)
    assert isinstance(skipped, SkippedEvent) and skipped.index == 1 and skipped.reason == reason
    assert skipped.detail
    assert rm == BlockRemoved([9])
    assert b.skipped == [skipped] and b.rank == 1


def test_bigram_token_pairs_become_the_prompt_tokens_with_their_lookahead() -> None:
    # SGLang with EAGLE: pairs (token, next token); two pages of two.
    pairs = [[10, 11], [11, 12], [12, 13], [13, 14]]
    b = decode_batch(_plain([1.0, [{**_GOOD_EVENT, "block_hashes": [1, 2], "token_ids": pairs}], 0]))
    (stored,) = b.events
    assert isinstance(stored, BlockStored)
    assert stored.token_ids == [10, 11, 12, 13]
    assert stored.lookahead_token_ids == [[12], [14]]
    # A pair page that does not fill its blocks is skipped like any other.
    b = decode_batch(_plain([1.0, [{**_GOOD_EVENT, "token_ids": [[10, 11]]}], 0]))
    assert [e.reason for e in b.skipped] == [SKIP_TOKEN_COUNT]


def test_a_batch_with_token_pairs_decodes_each_event_by_its_own_shape() -> None:
    # The fast whole-batch decoder fails on the pairs; every other event of
    # the batch still decodes, and only the event that is no prompt is skipped.
    pairs = [[10, 11], [11, 12]]
    events = [
        {**_GOOD_EVENT, "block_hashes": [5], "token_ids": pairs},
        _GOOD_EVENT,
        {**_GOOD_EVENT, "block_hashes": [6], "token_ids": [[1, 2], [5, 6]]},  # not chained
        {"type": "BlockRemoved", "block_hashes": [9], "medium": "CPU_PINNED"},
    ]
    b = decode_batch(_plain([1.0, events, 0]))
    bigram, plain, bad, removed = b.events
    assert isinstance(bigram, BlockStored) and bigram.token_ids == [10, 11]
    assert plain == BlockStored([1], None, [1, 2], 2)
    assert isinstance(bad, SkippedEvent) and bad.reason == SKIP_BIGRAM_NOT_CHAINED
    assert removed == BlockRemoved([9], medium="CPU_PINNED")


def test_a_store_without_token_ids_decodes_as_a_placeholder() -> None:
    # vLLM's offloading placeholder: the block mapper decides (it knows the hashes or not).
    event = {**_GOOD_EVENT, "block_size": 0, "token_ids": [], "medium": "CPU", "locality": "LOCAL"}
    (stored,) = decode_batch(_plain([1.0, [event], 0])).events
    assert isinstance(stored, BlockStored) and stored.token_ids == [] and stored.block_size == 0


@pytest.mark.parametrize(
    "medium,locality,tier",
    [
        (None, None, TIER_GPU),
        ("GPU", None, TIER_GPU),
        ("CPU", "LOCAL", TIER_HOST),  # vLLM's CPU offloading
        ("CPU_PINNED", None, TIER_HOST),  # SGLang's host tier
        ("cpu_pinned", None, TIER_HOST),
        ("STORAGE", None, TIER_DISK),  # vLLM
        ("DISK", None, TIER_DISK),  # SGLang
        ("EXTERNAL", None, TIER_EXTERNAL),  # SGLang
        ("CPU", "REMOTE", TIER_EXTERNAL),  # vLLM: a copy away from the publisher
        ("STORAGE", "REMOTE", TIER_EXTERNAL),
        ("NVRAM", None, None),
    ],
)
def test_every_medium_the_engines_send_has_its_tier(
    medium: str | None, locality: str | None, tier: int
) -> None:
    assert tier_of(medium, locality) == tier


def test_sequence_frames() -> None:
    assert encode_seq(0) == b"\x00" * 8
    assert encode_seq(258) == b"\x00" * 6 + b"\x01\x02"
    assert decode_seq(encode_seq(2**62)) == 2**62
    assert decode_seq(END_SEQ) == -1
    for bad in (b"", b"\x00" * 7, b"\x00" * 9):
        with pytest.raises(EventDecodeError):
            decode_seq(bad)
    # The largest taken still has a successor a replay request can ask for.
    assert decode_seq(encode_seq(MAX_SEQ)) == MAX_SEQ and encode_seq(MAX_SEQ + 1)
    with pytest.raises(EventDecodeError, match="out of range"):
        decode_seq(encode_seq(2**63 - 1))
    with pytest.raises(EventDecodeError, match="out of range"):
        parse_live_frames([b"kv", encode_seq(2**63 - 1), b"p"])


def test_live_frame_parsing() -> None:
    assert parse_live_frames([b"kv", encode_seq(5), b"p"]) == (5, b"p")
    with pytest.raises(EventDecodeError):
        parse_live_frames([b"kv", encode_seq(5)])
    with pytest.raises(EventDecodeError):
        parse_live_frames([b"kv", b"\x01\x02", b"p"])
    with pytest.raises(EventDecodeError):
        parse_live_frames([b"kv", END_SEQ, b"p"])


def test_replay_reply_parsing_both_generations() -> None:
    # vLLM after 0.24 and SGLang 0.5.23 (topic included), as a DEALER receives it
    assert parse_replay_frames([b"", b"kv", encode_seq(3), b"p"]) == (3, b"p")
    assert parse_replay_frames([b"", b"", encode_seq(3), b"p"]) == (3, b"p")  # empty topic
    assert parse_replay_frames([b"", b"", END_SEQ, b""]) is None  # the end marker
    # vLLM <= 0.24
    assert parse_replay_frames([b"", encode_seq(4), b"p"]) == (4, b"p")
    assert parse_replay_frames([b"", END_SEQ, b""]) is None
    # as a REQ socket receives them (delimiter stripped)
    assert parse_replay_frames([b"kv", encode_seq(6), b"p"]) == (6, b"p")
    assert parse_replay_frames([END_SEQ, b""]) is None
    for bad in ([b""], [b"", b"x", b"y", b"z", b"w"], [b"", b"kv", b"\x00", b"p"]):
        with pytest.raises(EventDecodeError):
            parse_replay_frames(bad)


def test_endpoint_rules_follow_vllm() -> None:
    assert offset_endpoint_port("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint_port("tcp://*:5557", 3) == "tcp://*:5560"
    assert offset_endpoint_port("tcp://[::1]:5557", 1) == "tcp://[::1]:5558"
    assert offset_endpoint_port("inproc://kv", 2) == "inproc://kv_dp2"
    assert offset_endpoint_port(None, 2) is None
    with pytest.raises(ValueError):
        offset_endpoint_port("udp://x:1", 1)
    assert should_bind("tcp://*:5557") and should_bind("tcp://[::]:5557")
    assert should_bind("tcp://127.0.0.1:0")
    assert not should_bind("tcp://127.0.0.1:5557")
    assert connect_endpoint("tcp://*:5557", 2) == "tcp://127.0.0.1:5559"
    assert connect_endpoint("tcp://engine-a:5557", 1) == "tcp://engine-a:5558"


def test_an_endpoint_zmq_could_not_connect_to_is_named_at_once() -> None:
    for ok in ("tcp://127.0.0.1:5557", "tcp://*:5557", "tcp://[::1]:5557", "tcp://engine-a:65535"):
        assert endpoint_problem(ok) is None, ok
    assert endpoint_problem("tcp://h:65534", ranks=2) is None
    for bad, words in (
        ("tcp://127.0.0.1:abc", "port must be"),
        ("tcp://", "tcp://HOST:PORT"),
        ("tcp://:5557", "tcp://HOST:PORT"),
        ("tcp://h:99999", "port must be"),
        ("tcp://h:0", "port must be"),
        ("tcp://h:\u0665", "port must be"),  # a digit, but not ASCII
        ("udp://h:1", "tcp://HOST:PORT"),
    ):
        assert words in str(endpoint_problem(bad)), bad
    assert "pass 65535" in str(endpoint_problem("tcp://h:65535", ranks=2))


# --- round trips ---------------------------------------------------------------

_hashes = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.binary(min_size=1, max_size=32),
)
_opt_str = st.one_of(st.none(), st.text(max_size=8))


@st.composite
def _stored(draw: st.DrawFn) -> BlockStored:
    n = draw(st.integers(0, 4))
    bs = draw(st.integers(1, 8))
    return BlockStored(
        block_hashes=draw(st.lists(_hashes, min_size=n, max_size=n)),
        parent_block_hash=draw(st.one_of(st.none(), _hashes)),
        token_ids=draw(st.lists(st.integers(0, 2**31), min_size=n * bs, max_size=n * bs)),
        block_size=bs,
        lora_id=draw(st.one_of(st.none(), st.integers(0, 100))),
        medium=draw(st.sampled_from([None, "GPU", "CPU"])),
        lora_name=draw(_opt_str),
    )


_events = st.lists(
    st.one_of(
        _stored(),
        st.builds(BlockRemoved, st.lists(_hashes, max_size=4), st.sampled_from([None, "GPU"])),
        st.just(AllBlocksCleared()),
    ),
    max_size=6,
)
_batches = st.builds(
    KVEventBatch,
    ts=st.floats(allow_nan=False, allow_infinity=False),
    events=_events,
    data_parallel_rank=st.one_of(st.none(), st.integers(0, 64)),
)


@settings(max_examples=150, deadline=None)
@given(batch=_batches, fmt=st.sampled_from(["map", "array"]))
def test_round_trip_both_formats(batch: KVEventBatch, fmt: EventFormat) -> None:
    assert decode_batch(encode_batch(batch, fmt)) == batch


@settings(max_examples=100, deadline=None)
@given(batch=_batches)
def test_map_and_array_formats_decode_to_the_same_batch(batch: KVEventBatch) -> None:
    assert decode_batch(encode_batch(batch, "map")) == decode_batch(encode_batch(batch, "array"))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_never_raise_anything_but_event_decode_error(data: bytes) -> None:
    try:
        decode_batch(data)
    except EventDecodeError:
        pass


@settings(max_examples=100, deadline=None)
@given(batch=_batches, cut=st.integers(1, 10_000))
def test_any_truncation_of_a_valid_payload_is_rejected(batch: KVEventBatch, cut: int) -> None:
    payload = encode_batch(batch, "map")
    cut = min(cut, len(payload) - 1)
    with pytest.raises(EventDecodeError):
        decode_batch(payload[: len(payload) - cut])


def test_a_frame_nested_too_deeply_is_undecodable_not_a_crash() -> None:
    # msgspec decodes nested values recursively: a hostile frame must end as
    # EventDecodeError (the adapter skips it), never as RecursionError.
    depth = 100_000
    ts = b"\xcb" + b"\x00" * 8  # 0.0
    payload = b"\x93" + ts + b"\x91" + b"\x91" * depth + b"\xc0" + b"\xc0"  # [0.0, [[[...nil...]]], nil]
    with pytest.raises(EventDecodeError):
        decode_batch(payload)
