"""What one engine event batch changed, in router block hashes.

This is the unit that leaves ``engine_adapters/``: the event adapter turns each
vLLM/SGLang ``KVEventBatch`` of a worker into one :class:`KvDelta`. A single
router node applies it straight to its prefix index; in the mesh the engine's
owner appends it to that engine's replicated log and every node's index is
materialised from the log. Ops keep the order of the engine's events, since a
batch may remove and store the same block.
"""

from __future__ import annotations

import msgspec

OP_STORE = 0
OP_REMOVE = 1
OP_CLEAR = 2  # all blocks of the worker dropped; hashes is empty


class KvOp(msgspec.Struct, array_like=True, gc=False, frozen=True):
    kind: int
    hashes: list[int]  # router block hashes (unsigned 64-bit)


class KvDelta(msgspec.Struct, array_like=True, gc=False):
    worker: str  # engine_id, or "engine_id#dp<rank>" for data-parallel rank > 0
    seq: int  # the engine's sequence number of the batch; -1 for a synthetic reset
    ops: list[KvOp]


def worker_id(engine_id: str, dp_rank: int) -> str:
    """The cache a block lives in: each data-parallel rank has its own."""
    return engine_id if dp_rank == 0 else f"{engine_id}#dp{dp_rank}"


def split_worker_id(worker: str) -> tuple[str, int]:
    engine_id, sep, rank = worker.rpartition("#dp")
    if sep and rank.isdigit():
        return engine_id, int(rank)
    return worker, 0


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(KvDelta)


def encode_delta(d: KvDelta) -> bytes:
    return _enc.encode(d)


def decode_delta(b: bytes) -> KvDelta:
    return _dec.decode(b)
