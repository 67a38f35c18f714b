"""The engines' KV-cache event wire format: payload structs (msgspec) and the
ZMQ framing of the live stream and of replay replies.

Matched against ``vllm/distributed/kv_events.py``: every release sends the
batch as a positional array ``[ts, events, data_parallel_rank]``; up to vLLM
0.23 each event is a positional array with the tag first, from vLLM 0.24
(vllm-project/vllm#42892) a tagged map ``{"type": "BlockStored", ...}``.
Builds that kept positional events while adding fields append them in
vLLM's field order (``extra_keys``, ``group_idx``, ...), read here in that
order.
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

Decoding never raises anything but :class:`EventDecodeError`, and only for
a payload without a readable batch envelope: then nothing of it is applied.
One event the reader cannot use (an unknown tag or shape, wrong field types,
token ids that do not fill the blocks it names) is replaced in the batch by
a :class:`SkippedEvent` carrying the reason; the other events of the batch
still apply, and the block mapper counts and logs the skip.

Shapes the released engines send, each proven by a golden frame the engines'
own code made (``tests/fixtures/golden/``, ``scripts/golden_frames.py``):

- vLLM 0.33 ``BlockStored.extra_keys``: one entry per block, untagged
  (``("tenant-1",)``, ``("sql-lora", "tenant-1")``, ``None``); the block
  mapper reads the cache salt from it. ``group_idx``: the KV-cache group of
  a hybrid model (sliding-window and full-attention layers, say) whose
  blocks the event stores or removes; every group publishes under the same
  engine hashes, and the block mapper keeps a block while any group holds
  it. Other optional fields (``locality``, ``ownership``,
  ``lookahead_token_ids``, ``kv_cache_spec_kind``, ...) are kept where
  kvmesh has a use for them and ignored otherwise.
- Cache tiers: ``medium`` is ``GPU``, ``CPU`` or ``STORAGE`` (vLLM's KV
  offloading), ``GPU``, ``CPU_PINNED``, ``DISK`` or ``EXTERNAL`` (SGLang's
  hierarchical cache); vLLM's ``locality`` ``REMOTE`` marks a copy held
  away from the publisher. :func:`tier_of` names the router's tier of each
  (:mod:`blocks.tiers`); an event with a medium it does not know is skipped
  (``unknown_medium``) rather than guessed onto a tier. vLLM's CPU
  offloading also stores placeholders without token ids (``block_size`` 0,
  one hash per offloaded chunk): they pass decoding, and the block mapper
  maps them when it knows their engine hashes from an earlier store with
  tokens (the same block on another tier), else skips them
  (``no_token_ids``).
- SGLang with EAGLE speculative decoding keys its radix tree by bigrams: each
  "token id" of a page is a pair ``(token, next token)``, the page's KV being
  that of the first elements. The decoder turns a page of pairs into the
  first elements, which is what the router hashes for the prompt it sees,
  and keeps each block's last second element as its ``lookahead_token_ids``
  (vLLM's name for the tokens past a block that its hash also covers). Pairs
  that do not chain (``p[k][1] != p[k+1][0]``) are not a prompt: skipped.
  The router's block hash does not cover that next token, so for a prompt
  that diverges right after a block (or ends with it) the router predicts
  that block and the engine does not reuse it: one block at most per prompt,
  as with vLLM's lookahead hashing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import msgspec

from blocks.delta import EngineHash
from blocks.tiers import TIER_DISK, TIER_EXTERNAL, TIER_GPU, TIER_HOST

# Block hashes on the wire are the engine's opaque ids (EngineHash): unsigned
# 64-bit ints (values >= 2**63 occur), signed int64 (SGLang) or bytes (vLLM
# with sha256 hashing).
END_SEQ = b"\xff" * 8  # replay end marker: seq -1 as 8 big-endian bytes
MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"  # vLLM's CPU offloading tier
MEDIUM_CPU_PINNED = "CPU_PINNED"  # SGLang's host tier (HiCache L2)
MEDIUM_STORAGE = "STORAGE"  # vLLM's offloading to storage
MEDIUM_DISK = "DISK"  # SGLang's L3
MEDIUM_EXTERNAL = "EXTERNAL"  # SGLang's L4: a shared or remote pool (Mooncake, ...)
LOCALITY_REMOTE = "REMOTE"  # vLLM: the copy is held away from the publisher

# Every medium the engines publish, and the router's tier of it; an event
# without one is the GPU's (vLLM <= 0.23 and SGLang's plain radix cache).
_TIER_OF_MEDIUM: dict[str | None, int] = {
    None: TIER_GPU,
    MEDIUM_GPU: TIER_GPU,
    MEDIUM_CPU: TIER_HOST,
    MEDIUM_CPU_PINNED: TIER_HOST,
    MEDIUM_STORAGE: TIER_DISK,
    MEDIUM_DISK: TIER_DISK,
    MEDIUM_EXTERNAL: TIER_EXTERNAL,
}


def tier_of(medium: str | None, locality: str | None = None) -> int | None:
    """The router's cache tier (``blocks.tiers``) of an event's ``medium``
    and ``locality``; None for a medium no engine is known to send. A copy
    the publisher marks ``REMOTE`` is on the external tier, whatever its
    medium: it has to come over the network first."""
    tier = _TIER_OF_MEDIUM.get(medium)
    if tier is None and medium is not None:
        tier = _TIER_OF_MEDIUM.get(medium.upper())
    if tier is not None and locality == LOCALITY_REMOTE:
        return TIER_EXTERNAL
    return tier


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
    extra_keys: list[Any] | None = None  # vLLM: per block, untagged (module docstring)
    group_idx: int | None = None
    cache_salt: str | None = None  # SGLang only; vLLM puts it in extra_keys
    locality: str | None = None  # vLLM tiers: LOCAL or REMOTE to the publisher
    ownership: str | None = None  # vLLM tiers: the secondary offloading tier
    # Per block, the tokens past it that its engine hash also covers (vLLM
    # lookahead hashing; SGLang bigram pages, see the module docstring).
    lookahead_token_ids: list[list[int]] | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    pass


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared

# Why an event was skipped (the counter's label).
SKIP_UNDECODABLE = "undecodable"  # unknown tag or shape, wrong field types
SKIP_NO_TOKEN_IDS = "no_token_ids"  # a store without tokens whose blocks were never seen with them
SKIP_BAD_BLOCK_SIZE = "bad_block_size"
SKIP_TOKEN_COUNT = "token_count_mismatch"  # token ids do not fill the blocks named
SKIP_BIGRAM_NOT_CHAINED = "bigram_not_chained"  # token pairs that are not a prompt's bigrams
SKIP_UNKNOWN_MEDIUM = "unknown_medium"  # a cache tier no engine is known to send
# The block mapper's: a store whose block size is not the one the engine is
# registered with (its blocks would never match a prompt hashed at that size).
SKIP_BLOCK_SIZE_MISMATCH = "block_size_mismatch"


@dataclass(frozen=True, slots=True)
class SkippedEvent:
    """Stands in a decoded batch for an event that cannot be used: the
    batch keeps its order and its other events; the block mapper counts it."""

    index: int  # position in the batch
    reason: str  # one of the SKIP_* labels
    detail: str


BatchEvent: TypeAlias = KVEvent | SkippedEvent


class KVEventBatch(msgspec.Struct, omit_defaults=True, gc=False):
    ts: float
    events: Sequence[BatchEvent]
    data_parallel_rank: int | None = None
    # SGLang's name for the same field.
    attn_dp_rank: int | None = None

    @property
    def rank(self) -> int:
        if self.data_parallel_rank is not None:
            return self.data_parallel_rank
        return self.attn_dp_rank or 0

    @property
    def skipped(self) -> list[SkippedEvent]:
        return [e for e in self.events if isinstance(e, SkippedEvent)]


# --- vLLM <= 0.23: positional arrays, tag first --------------------------------


class _ArrBlockStored(msgspec.Struct, tag="BlockStored", array_like=True, omit_defaults=True, gc=False):
    # vLLM's field order: builds that keep positional events with the newer
    # fields put them after lora_name in this order (the cache salt is in
    # extra_keys, the hybrid model's KV-cache group in group_idx).
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: Any = None  # not used: every group's blocks are indexed (block_mapper)
    kv_cache_spec_sliding_window: Any = None
    locality: str | None = None
    ownership: str | None = None
    session_id: Any = None
    lookahead_token_ids: list[list[int]] | None = None


class _ArrBlockRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


# Encoder-side: the positional shape vLLM <= 0.23 sends (the later fields
# of the decoder-side structs above are never on its wire).
class _OutArrBlockStored(msgspec.Struct, tag="BlockStored", array_like=True, gc=False):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class _OutArrBlockRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None


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
    locality: str | None = None
    ownership: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class _OutBlockRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class _OutAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True, gc=False):
    pass


class _OutBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The envelope every engine sends, ``[ts, events, rank]``, for encoding:
    the events are already in their struct of the chosen format."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class _PairBlockStored(msgspec.Struct, tag="BlockStored", omit_defaults=True, gc=False):
    """A store whose token ids are pairs: SGLang's EAGLE bigram pages."""

    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[tuple[int, int]]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    cache_salt: str | None = None


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
            e.locality,
            e.ownership,
            e.lookahead_token_ids,
        )
    if isinstance(e, BlockRemoved):
        return _OutBlockRemoved(e.block_hashes, e.medium, e.group_idx, e.locality, e.ownership)
    return _OutAllBlocksCleared()


_fast_batch_decoder = msgspec.msgpack.Decoder(_FastBatch)
_arr_batch_decoder = msgspec.msgpack.Decoder(_ArrBatch)
_map_batch_decoder = msgspec.msgpack.Decoder(_MapBatch)
_map_event_decoder = msgspec.msgpack.Decoder(KVEvent)
_pair_event_decoder = msgspec.msgpack.Decoder(_PairBlockStored)
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
            extra_keys=e.extra_keys,
            group_idx=e.group_idx,
            locality=e.locality,
            ownership=e.ownership,
            lookahead_token_ids=e.lookahead_token_ids,
        )
    if isinstance(e, _ArrBlockRemoved):
        return BlockRemoved(
            block_hashes=e.block_hashes,
            medium=e.medium,
            group_idx=e.group_idx,
            locality=e.locality,
            ownership=e.ownership,
        )
    return AllBlocksCleared()


def _from_bigrams(e: _PairBlockStored, index: int) -> BatchEvent:
    """A page of bigrams as the prompt tokens it caches (module docstring)."""
    pairs = e.token_ids
    for k in range(len(pairs) - 1):
        if pairs[k][1] != pairs[k + 1][0]:
            return SkippedEvent(
                index,
                SKIP_BIGRAM_NOT_CHAINED,
                f"token pair {k} ends with {pairs[k][1]}, pair {k + 1} starts with {pairs[k + 1][0]}",
            )
    bs = e.block_size
    lookahead = [[pairs[end - 1][1]] for end in range(bs, len(pairs) + 1, bs)] if bs > 0 else None
    return BlockStored(
        block_hashes=e.block_hashes,
        parent_block_hash=e.parent_block_hash,
        token_ids=[p[0] for p in pairs],
        block_size=bs,
        lora_id=e.lora_id,
        medium=e.medium,
        lora_name=e.lora_name,
        cache_salt=e.cache_salt,
        lookahead_token_ids=lookahead,
    )


def _decode_event(raw: msgspec.Raw, index: int) -> BatchEvent:
    """One event by its own shape; a :class:`SkippedEvent` if it has none we know."""
    b = memoryview(raw)
    try:
        if len(b) and _is_map(b):
            try:
                return _map_event_decoder.decode(b)
            except msgspec.DecodeError as e:
                try:
                    return _from_bigrams(_pair_event_decoder.decode(b), index)
                except msgspec.DecodeError:
                    raise e from None
        if len(b) and _is_array(b):
            return _from_array_event(_arr_event_decoder.decode(b))
    except msgspec.DecodeError as e:
        return SkippedEvent(index, SKIP_UNDECODABLE, str(e))
    return SkippedEvent(index, SKIP_UNDECODABLE, "neither a tagged map nor a tagged array")


def _medium_problem(e: BlockStored | BlockRemoved) -> tuple[str, str] | None:
    """Why an event's cache tier cannot be told, or None."""
    if e.medium in _TIER_OF_MEDIUM or tier_of(e.medium) is not None:
        return None
    return SKIP_UNKNOWN_MEDIUM, f"{type(e).__name__} on medium {e.medium!r}, not a known cache tier"


def _store_problem(e: BlockStored) -> tuple[str, str] | None:
    """Why a decoded store cannot be mapped, or None: its token ids must fill
    exactly the blocks it names, or be absent (a placeholder, see the module
    docstring: the block mapper maps it if it knows its hashes)."""
    n_tokens, n_blocks = len(e.token_ids), len(e.block_hashes)
    if (n_tokens == n_blocks * e.block_size and e.block_size > 0) or not n_tokens:
        return _medium_problem(e)
    if e.block_size <= 0:
        return SKIP_BAD_BLOCK_SIZE, f"BlockStored with block_size {e.block_size}"
    return SKIP_TOKEN_COUNT, (
        f"BlockStored carries {n_tokens} token ids for {n_blocks} blocks of {e.block_size}"
    )


def _checked(events: Sequence[BatchEvent]) -> Sequence[BatchEvent]:
    """``events`` with every event that cannot be mapped replaced by a
    :class:`SkippedEvent` (the same list when all are fine: the common case)."""
    out: list[BatchEvent] | None = None
    for i, e in enumerate(events):
        if isinstance(e, BlockStored):
            why = _store_problem(e)
        elif isinstance(e, BlockRemoved):
            why = _medium_problem(e)
        else:
            continue
        if why is not None:
            if out is None:
                out = list(events)
            out[i] = SkippedEvent(i, *why)
    return events if out is None else out


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one msgpack ``KVEventBatch`` payload in any engine's format.

    Accepts the array envelope with positional events (vLLM <= 0.23) or with
    tagged-map events (vLLM >= 0.24, SGLang), and a map envelope. Unknown
    extra fields are ignored. Raises :class:`EventDecodeError` only when the
    envelope is unreadable; an event that cannot be used is a
    :class:`SkippedEvent` in its place. Every ``BlockStored`` carries exactly
    ``block_size`` token ids per block hash, or none (a placeholder), and
    every event's medium has a tier (:func:`tier_of`).
    """
    try:
        return _decode_batch(payload)
    except RecursionError:  # msgspec decodes nested values recursively: a hostile frame nests deep
        raise EventDecodeError("malformed KV event batch: nested too deeply") from None


def _decode_batch(payload: bytes) -> KVEventBatch:
    if not payload:
        raise EventDecodeError("empty payload")
    if _is_array(payload):
        try:
            fast = _fast_batch_decoder.decode(payload)
        except msgspec.DecodeError:
            pass  # positional or unusual events, or malformed: the general path tells which
        else:
            return KVEventBatch(
                ts=fast.ts, events=_checked(fast.events), data_parallel_rank=fast.data_parallel_rank
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
    except msgspec.DecodeError as e:
        raise EventDecodeError(f"malformed KV event batch: {e}") from None
    events = _checked([_decode_event(raw, i) for i, raw in enumerate(env.events)])
    return KVEventBatch(ts=env.ts, events=events, data_parallel_rank=dp_rank, attn_dp_rank=attn_rank)


def encode_batch(batch: KVEventBatch, fmt: EventFormat = "map") -> bytes:
    """Encode a batch as vLLM would: ``[ts, events, rank]`` with tagged-map
    events (``map``, vLLM >= 0.24) or positional events (``array``, <= 0.23).
    Skipped events are not wire events and are left out."""
    rank = batch.data_parallel_rank
    if rank is None:
        rank = batch.attn_dp_rank
    events = [e for e in batch.events if not isinstance(e, SkippedEvent)]
    if fmt == "map":
        return _encoder.encode(_OutBatch(batch.ts, [_to_out_event(e) for e in events], rank))
    if fmt != "array":
        raise ValueError(f"unknown event format {fmt!r}")
    arr_events: list[Any] = []
    for e in events:
        if isinstance(e, BlockStored):
            arr_events.append(
                _OutArrBlockStored(
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
            arr_events.append(_OutArrBlockRemoved(e.block_hashes, e.medium))
        else:
            arr_events.append(_ArrAllBlocksCleared())
    return _encoder.encode(_OutBatch(batch.ts, arr_events, rank))


# The largest sequence number taken: the next one (what a replay request
# asks for) must still fit the signed 8-byte frame.
MAX_SEQ = 2**63 - 2


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def decode_seq(frame: bytes) -> int:
    """Sequence frame -> int; -1 is the replay end marker."""
    if len(frame) != 8:
        raise EventDecodeError(f"sequence frame of {len(frame)} bytes, want 8")
    seq = int.from_bytes(frame, "big", signed=True)
    if seq > MAX_SEQ:
        raise EventDecodeError(f"sequence number {seq} is out of range (at most {MAX_SEQ})")
    return seq


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
