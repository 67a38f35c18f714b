"""The engines' KV-cache event wire format: payload structs (msgspec) and the
ZMQ framing of the live stream and of replay replies.

Matched against ``vllm/distributed/kv_events.py``: every release sends the
batch as a positional array ``[ts, events, data_parallel_rank]``; up to vLLM
0.23 each event is a positional array with the tag first, from vLLM 0.24
(vllm-project/vllm#42892) a tagged map ``{"type": "BlockStored", ...}``.
SGLang publishes the 0.24 shape; its third batch field is called
``attn_dp_rank`` and its block hashes are signed int64 (a SHA-256 chain),
opaque ids here like vLLM's. A map-encoded batch envelope is accepted too.
Later versions add optional fields; unknown fields are ignored.

Live stream (PUB -> SUB): three frames, topic, an 8-byte big-endian sequence
number (per publisher and rank, starting at 0) and the msgpack payload of a
``KVEventBatch``.

Replay (ROUTER, one per rank): a DEALER sends ``[b"", start_seq]`` and gets
every buffered batch with ``seq >= start_seq`` in order, then an end marker
whose sequence is -1 (:data:`END_SEQ`). vLLM after 0.24 and SGLang 0.5.23
frame a reply as ``[b"", topic, seq, payload]`` (end ``[b"", b"", END_SEQ,
b""]``); vLLM up to 0.24 as ``[b"", seq, payload]`` (end ``[b"", END_SEQ,
b""]``). :func:`parse_replay_frames` reads both.

Decoding never raises anything but :class:`EventDecodeError`, so a malformed
frame is reported clearly and nothing of it is applied.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

import msgspec

from blocks.delta import EngineHash

# Block hashes on the wire are the engine's opaque ids (EngineHash): unsigned
# 64-bit ints (values >= 2**63 occur), signed int64 (SGLang) or bytes (vLLM
# with sha256 hashing).
END_SEQ = b"\xff" * 8  # replay end marker: seq -1 as 8 big-endian bytes
MEDIUM_GPU = "GPU"

EventFormat = Literal["map", "array"]


class EventDecodeError(ValueError):
    """A frame or payload that is not a valid KV-event batch."""


# --- vLLM >= 0.24: tagged maps ------------------------------------------------


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    cache_salt: str | None = None  # SGLang only; vLLM puts it in extra_keys


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    pass


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, omit_defaults=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None
    # SGLang's name for the same field.
    attn_dp_rank: int | None = None

    @property
    def rank(self) -> int:
        if self.data_parallel_rank is not None:
            return self.data_parallel_rank
        return self.attn_dp_rank or 0


# --- vLLM <= 0.23: positional arrays, tag first --------------------------------


class _ArrBlockStored(msgspec.Struct, tag="BlockStored", array_like=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


class _ArrBlockRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None = None


class _ArrAllBlocksCleared(
    msgspec.Struct, tag="AllBlocksCleared", array_like=True, omit_defaults=True, gc=False
):
    pass


class _ArrBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The batch envelope of every released engine: ``[ts, events, rank]``.

    vLLM <= 0.23 puts positional events in it, vLLM >= 0.24 and SGLang tagged
    maps (SGLang calls the third field ``attn_dp_rank``; positionally the same).
    Events stay raw here and are decoded one by one by their own shape.
    """

    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class _FastBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The array envelope with tagged-map events (vLLM >= 0.24, SGLang), the
    common case, decoded in one call; anything else falls back to
    :class:`_ArrBatch` and decoding event by event."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


class _MapBatch(msgspec.Struct, omit_defaults=True, gc=False):
    """A map-encoded envelope (seen on vLLM main between releases); accepted too."""

    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None
    attn_dp_rank: int | None = None


# Encoder-side copies of vLLM's event structs: vLLM declares lora_id, medium
# and lora_name without defaults, so they are always on the wire (as nil when
# unset); the decoder-side structs above default them for SGLang, which omits.
class _OutBlockStored(msgspec.Struct, tag="BlockStored", omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class _OutBlockRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None
    group_idx: int | None = None


class _OutAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True, gc=False):
    pass


class _OutBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The envelope every engine sends, ``[ts, events, rank]``, for encoding:
    the events are already in their struct of the chosen format."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


def _to_out_event(e: KVEvent) -> Any:
    if isinstance(e, BlockStored):
        return _OutBlockStored(
            e.block_hashes,
            e.parent_block_hash,
            e.token_ids,
            e.block_size,
            e.lora_id,
            e.medium,
            e.lora_name,
            e.extra_keys,
            e.group_idx,
        )
    if isinstance(e, BlockRemoved):
        return _OutBlockRemoved(e.block_hashes, e.medium, e.group_idx)
    return _OutAllBlocksCleared()


_fast_batch_decoder = msgspec.msgpack.Decoder(_FastBatch)
_arr_batch_decoder = msgspec.msgpack.Decoder(_ArrBatch)
_map_batch_decoder = msgspec.msgpack.Decoder(_MapBatch)
_map_event_decoder = msgspec.msgpack.Decoder(KVEvent)
_arr_event_decoder = msgspec.msgpack.Decoder(_ArrBlockStored | _ArrBlockRemoved | _ArrAllBlocksCleared)
_encoder = msgspec.msgpack.Encoder()


def _is_array(b: bytes | memoryview) -> bool:
    first = b[0]
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def _is_map(b: bytes | memoryview) -> bool:
    first = b[0]
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


def _from_array_event(e: Any) -> KVEvent:
    if isinstance(e, _ArrBlockStored):
        return BlockStored(
            block_hashes=e.block_hashes,
            parent_block_hash=e.parent_block_hash,
            token_ids=e.token_ids,
            block_size=e.block_size,
            lora_id=e.lora_id,
            medium=e.medium,
            lora_name=e.lora_name,
        )
    if isinstance(e, _ArrBlockRemoved):
        return BlockRemoved(block_hashes=e.block_hashes, medium=e.medium)
    return AllBlocksCleared()


def _decode_event(raw: msgspec.Raw, index: int) -> KVEvent:
    b = memoryview(raw)
    if len(b) and _is_map(b):
        return _map_event_decoder.decode(b)
    if len(b) and _is_array(b):
        return _from_array_event(_arr_event_decoder.decode(b))
    raise EventDecodeError(f"event {index} is neither a tagged map nor a tagged array")


def _validate(batch: KVEventBatch) -> KVEventBatch:
    for e in batch.events:
        if isinstance(e, BlockStored):
            if e.block_size <= 0:
                raise EventDecodeError(f"BlockStored with block_size {e.block_size}")
            if len(e.token_ids) != len(e.block_hashes) * e.block_size:
                raise EventDecodeError(
                    f"BlockStored carries {len(e.token_ids)} token ids for "
                    f"{len(e.block_hashes)} blocks of {e.block_size}"
                )
    return batch


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one msgpack ``KVEventBatch`` payload in any engine's format.

    Accepts the array envelope with positional events (vLLM <= 0.23) or with
    tagged-map events (vLLM >= 0.24, SGLang), and a map envelope. Unknown
    extra fields are ignored. Raises :class:`EventDecodeError` on anything
    malformed; on success every ``BlockStored`` carries exactly
    ``block_size`` token ids per block hash.
    """
    if not payload:
        raise EventDecodeError("empty payload")
    if _is_array(payload):
        try:
            fast = _fast_batch_decoder.decode(payload)
        except msgspec.DecodeError:
            pass  # positional events, or malformed: the general path tells which
        else:
            return _validate(
                KVEventBatch(ts=fast.ts, events=fast.events, data_parallel_rank=fast.data_parallel_rank)
            )
    try:
        if _is_array(payload):
            env: _ArrBatch | _MapBatch = _arr_batch_decoder.decode(payload)
            dp_rank, attn_rank = env.data_parallel_rank, None
        elif _is_map(payload):
            env = _map_batch_decoder.decode(payload)
            dp_rank, attn_rank = env.data_parallel_rank, env.attn_dp_rank
        else:
            raise EventDecodeError("payload is neither a msgpack array nor a map")
        events = [_decode_event(raw, i) for i, raw in enumerate(env.events)]
    except msgspec.DecodeError as e:
        raise EventDecodeError(f"malformed KV event batch: {e}") from None
    batch = KVEventBatch(ts=env.ts, events=events, data_parallel_rank=dp_rank, attn_dp_rank=attn_rank)
    return _validate(batch)


def encode_batch(batch: KVEventBatch, fmt: EventFormat = "map") -> bytes:
    """Encode a batch as vLLM would: ``[ts, events, rank]`` with tagged-map
    events (``map``, vLLM >= 0.24) or positional events (``array``, <= 0.23)."""
    rank = batch.data_parallel_rank
    if rank is None:
        rank = batch.attn_dp_rank
    if fmt == "map":
        return _encoder.encode(_OutBatch(batch.ts, [_to_out_event(e) for e in batch.events], rank))
    if fmt != "array":
        raise ValueError(f"unknown event format {fmt!r}")
    arr_events: list[Any] = []
    for e in batch.events:
        if isinstance(e, BlockStored):
            arr_events.append(
                _ArrBlockStored(
                    e.block_hashes,
                    e.parent_block_hash,
                    e.token_ids,
                    e.block_size,
                    e.lora_id,
                    e.medium,
                    e.lora_name,
                )
            )
        elif isinstance(e, BlockRemoved):
            arr_events.append(_ArrBlockRemoved(e.block_hashes, e.medium))
        else:
            arr_events.append(_ArrAllBlocksCleared())
    return _encoder.encode(_OutBatch(batch.ts, arr_events, rank))


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def decode_seq(frame: bytes) -> int:
    """Sequence frame -> int; -1 is the replay end marker."""
    if len(frame) != 8:
        raise EventDecodeError(f"sequence frame of {len(frame)} bytes, want 8")
    return int.from_bytes(frame, "big", signed=True)


def parse_live_frames(frames: list[bytes]) -> tuple[int, bytes]:
    """``[topic, seq, payload]`` -> (seq, payload); EventDecodeError otherwise."""
    if len(frames) != 3:
        raise EventDecodeError(f"live message of {len(frames)} frames, want 3")
    seq = decode_seq(frames[1])
    if seq < 0:
        raise EventDecodeError(f"negative sequence number {seq} on the live stream")
    return seq, frames[2]


def parse_replay_frames(frames: list[bytes]) -> tuple[int, bytes] | None:
    """One replay reply -> (seq, payload), or None for the end marker.

    Either framing of the module docstring, as a DEALER receives it or
    without the empty delimiter (as a REQ socket does); the topic is ignored.
    """
    if len(frames) >= 3 and frames[0] == b"":
        frames = frames[1:]
    if len(frames) == 3:
        seq_frame, payload = frames[1], frames[2]
    elif len(frames) == 2:
        seq_frame, payload = frames[0], frames[1]
    else:
        raise EventDecodeError(f"replay reply of {len(frames)} frames")
    seq = decode_seq(seq_frame)
    if seq == -1:
        return None
    if seq < 0:
        raise EventDecodeError(f"negative sequence number {seq} in a replay reply")
    return seq, payload
