"""vLLM's KV-cache event wire format, declared once as msgspec structs.

Matched against ``vllm/distributed/kv_events.py`` of vLLM 0.24 (tagged maps,
``{"type": "BlockStored", ...}``) and of vLLM <= 0.23 (``array_like`` structs:
positional arrays, the tag first). SGLang publishes the same frames; its batch
field is ``attn_dp_rank`` instead of ``data_parallel_rank`` and its block hashes
are signed int64 (a SHA-256 chain), which are opaque ids here like vLLM's.

A ZMQ message is three frames: topic, an 8-byte big-endian sequence number
(per publisher, starting at 0) and the msgpack payload of a ``KVEventBatch``.

Decoding never raises anything but :class:`EventDecodeError`, so a malformed
frame is reported clearly and nothing of it is applied.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec

# Block hashes are opaque: unsigned 64-bit ints (values >= 2**63 occur),
# signed int64 (SGLang) or bytes (newer vLLM with sha256 hashing).
BlockHash = Union[int, bytes]

END_SEQ = b"\xff" * 8  # replay end marker: seq -1 as 8 big-endian bytes
MEDIUM_GPU = "GPU"

EventFormat = Literal["map", "array"]


class EventDecodeError(ValueError):
    """A frame or payload that is not a valid KV-event batch."""


# --- vLLM >= 0.24: tagged maps ------------------------------------------------


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    pass


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


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


class _ArrBlockStored(
    msgspec.Struct, tag="BlockStored", array_like=True, omit_defaults=True, gc=False
):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


class _ArrBlockRemoved(
    msgspec.Struct, tag="BlockRemoved", array_like=True, omit_defaults=True, gc=False
):
    block_hashes: list[BlockHash]
    medium: str | None = None


class _ArrAllBlocksCleared(
    msgspec.Struct, tag="AllBlocksCleared", array_like=True, omit_defaults=True, gc=False
):
    pass


class _ArrKVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Union[_ArrBlockStored, _ArrBlockRemoved, _ArrAllBlocksCleared]]
    data_parallel_rank: int | None = None


_map_decoder = msgspec.msgpack.Decoder(KVEventBatch)
_arr_decoder = msgspec.msgpack.Decoder(_ArrKVEventBatch)
_encoder = msgspec.msgpack.Encoder()


def _from_array(b: _ArrKVEventBatch) -> KVEventBatch:
    events: list[KVEvent] = []
    for e in b.events:
        if isinstance(e, _ArrBlockStored):
            events.append(
                BlockStored(
                    block_hashes=e.block_hashes,
                    parent_block_hash=e.parent_block_hash,
                    token_ids=e.token_ids,
                    block_size=e.block_size,
                    lora_id=e.lora_id,
                    medium=e.medium,
                    lora_name=e.lora_name,
                )
            )
        elif isinstance(e, _ArrBlockRemoved):
            events.append(BlockRemoved(block_hashes=e.block_hashes, medium=e.medium))
        else:
            events.append(AllBlocksCleared())
    return KVEventBatch(ts=b.ts, events=events, data_parallel_rank=b.data_parallel_rank)


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
    """Decode one msgpack ``KVEventBatch`` payload in either vLLM format.

    Raises :class:`EventDecodeError` on anything malformed; on success every
    event is well-formed (a ``BlockStored`` carries exactly ``block_size``
    token ids per block hash).
    """
    if not payload:
        raise EventDecodeError("empty payload")
    first = payload[0]
    is_array = 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)
    try:
        if is_array:
            return _validate(_from_array(_arr_decoder.decode(payload)))
        return _validate(_map_decoder.decode(payload))
    except msgspec.DecodeError as e:
        raise EventDecodeError(f"malformed KV event batch: {e}") from None


def encode_batch(batch: KVEventBatch, fmt: EventFormat = "map") -> bytes:
    """Encode a batch as vLLM would: ``map`` (vLLM >= 0.24) or ``array`` (<= 0.23)."""
    if fmt == "map":
        return _encoder.encode(batch)
    arr_events: list[Any] = []
    for e in batch.events:
        if isinstance(e, BlockStored):
            arr_events.append(
                _ArrBlockStored(
                    e.block_hashes, e.parent_block_hash, e.token_ids, e.block_size,
                    e.lora_id, e.medium, e.lora_name,
                )
            )
        elif isinstance(e, BlockRemoved):
            arr_events.append(_ArrBlockRemoved(e.block_hashes, e.medium))
        else:
            arr_events.append(_ArrAllBlocksCleared())
    return _encoder.encode(_ArrKVEventBatch(batch.ts, arr_events, batch.data_parallel_rank))


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def decode_seq(frame: bytes) -> int:
    """Sequence frame -> int; -1 is the replay end marker."""
    if len(frame) != 8:
        raise EventDecodeError(f"sequence frame of {len(frame)} bytes, want 8")
    return int.from_bytes(frame, "big", signed=True)
