"""One entry of an engine log: the msgpack bytes of a list of ``KvDelta``.

An entry holds everything one ``EngineLogOwner.append`` call was given (one
event batch of the engine, usually). The owner validates before it writes
(:func:`checked_entry`), so a replica that cannot decode an entry is looking
at corruption or a foreign writer: it skips that entry and keeps the rest of
the log usable (:func:`decode_or_skip`).

Every op names its cache tier (``KvOp.tier``, last in the op's array and
the GPU when absent), so entries written before tiers decode unchanged and
a node that predates tiers reads this log's ops as GPU ops (see
``blocks.delta``).
"""

from __future__ import annotations

import msgspec
import structlog

from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, KvDelta, KvOp
from blocks.tiers import TIERS
from blocks.workers import engine_of
from mesh.engine_log.epoch import Epoch

__all__ = [
    "LogError",
    "NotOwnerError",
    "checked_entry",
    "decode_entry",
    "decode_or_skip",
    "encode_entry",
    "validate_delta",
]

log = structlog.get_logger(__name__)

_entry_enc = msgspec.msgpack.Encoder()
_entry_dec = msgspec.msgpack.Decoder(list[KvDelta])


class LogError(ValueError):
    """A log update or delta that cannot be applied; nothing of it was applied."""


class NotOwnerError(RuntimeError):
    """This node does not (or no longer) own the engine's log."""


def encode_entry(deltas: list[KvDelta]) -> bytes:
    return _entry_enc.encode(deltas)


def decode_entry(raw: bytes | bytearray) -> list[KvDelta]:
    return _entry_dec.decode(raw)


def validate_delta(engine_id: str, d: KvDelta) -> None:
    """Raise :class:`LogError` unless ``d`` is a well-formed delta of ``engine_id``.

    Field types are assumed checked (deltas decoded by the typed msgspec
    decoder, see :func:`checked_entry`); this checks meaning and ranges.
    """
    if engine_of(d.worker) != engine_id:
        raise LogError(f"worker {d.worker!r} is not a worker of engine {engine_id!r}")
    if d.seq < -1:
        raise LogError(f"bad seq {d.seq!r} for worker {d.worker!r}")
    for op in d.ops:
        if op.kind not in (OP_STORE, OP_REMOVE, OP_CLEAR):
            raise LogError(f"unknown op kind {op.kind!r} for worker {d.worker!r}")
        if op.tier not in TIERS:
            raise LogError(f"unknown cache tier {op.tier!r} for worker {d.worker!r}")
        if op.ehashes:
            if op.kind == OP_CLEAR:
                raise LogError(f"CLEAR with engine hashes for worker {d.worker!r}")
            if op.kind == OP_STORE and len(op.ehashes) != len(op.hashes):
                raise LogError(
                    f"STORE of {len(op.hashes)} router and {len(op.ehashes)} engine "
                    f"hashes for worker {d.worker!r}"
                )
        # Decoded msgpack ints are below 2**64, so only negatives (int64 on the
        # wire) can be out of range; min runs in C.
        if op.hashes and min(op.hashes) < 0:
            raise LogError(f"block hash out of unsigned 64-bit range for worker {d.worker!r}")


def _plain(deltas: list[KvDelta]) -> bool:
    """True if every field already has the exact type the typed decoder
    gives back (str, int, lists of int / int or bytes): such deltas equal
    their decoded copy, so they can be validated as they are."""
    for d in deltas:
        if d.__class__ is not KvDelta or d.worker.__class__ is not str or d.seq.__class__ is not int:
            return False
        if d.ops.__class__ is not list:
            return False
        for op in d.ops:
            if op.__class__ is not KvOp or op.kind.__class__ is not int or op.tier.__class__ is not int:
                return False
            hs, ehs = op.hashes, op.ehashes
            if hs.__class__ is not list or ehs.__class__ is not list:
                return False
            # One C pass per list (bool and float are not int here).
            if hs and list(map(type, hs)).count(int) != len(hs):
                return False
            if ehs:
                types = list(map(type, ehs))
                if types.count(int) + types.count(bytes) != len(ehs):
                    return False
    return True


def checked_entry(engine_id: str, deltas: list[KvDelta]) -> bytes:
    """Encode ``deltas`` as one entry, refusing anything a replica could not decode."""
    try:
        entry = encode_entry(deltas)
        # Encoding already refuses ints outside msgpack's range. Deltas of
        # exact types (the mapper's) are checked as they are; anything else
        # goes through the typed decode, which checks every field's type in C
        # (a bool or float where an int belongs, say).
        for d in deltas if _plain(deltas) else decode_entry(entry):
            validate_delta(engine_id, d)
    except (msgspec.EncodeError, msgspec.DecodeError, TypeError, OverflowError) as e:
        raise LogError(f"invalid delta for engine {engine_id!r}: {e}") from None
    return entry


def decode_or_skip(engine_id: str, epoch: Epoch, raw: bytes | bytearray) -> list[KvDelta]:
    try:
        deltas = decode_entry(raw)
        for d in deltas:
            validate_delta(engine_id, d)
        return deltas
    except (msgspec.DecodeError, LogError, TypeError) as e:
        # The single writer validates before writing, so this is corruption or a
        # foreign writer; skipping keeps the rest of the log usable.
        log.error("engine_log.entry_skipped", engine=engine_id, epoch=epoch, error=str(e))
        return []
