"""The replicated-state protocol between nodes: push, and anti-entropy sync.

Messages are flat frozen dataclasses (str/bool/bytes/tuples of bytes), so the
transport maps each to protobuf one to one (``proto/kvmesh/mesh/v1/mesh.proto``).
Their payloads are msgspec structs, msgpack on the wire: a :class:`Delta` is
anything a node gossips (engine log updates, a registry update, load slots,
route hints); a :class:`Summary` is what a node has (per engine epoch and
pycrdt state vector, the registry's state vector, slot versions), for
anti-entropy. The CRDT parts are pycrdt updates, opaque at this level.

* :class:`StatePush`: state the receiver has probably not seen (epidemic push).
* :class:`SyncRequest` / :class:`SyncReply`: anti-entropy. The request carries
  the sender's summary (state vectors); the reply carries what the requester
  lacks and the replier's own summary, so the requester can push back what
  the replier lacks. A joiner asks for everything (``want_full``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import msgspec
import pycrdt

from mesh.engine_log.epoch import Epoch
from mesh.hints import Hint
from mesh.load_slots import Slot

__all__ = [
    "Delta",
    "EngineSummary",
    "LogUpdate",
    "MessageError",
    "StateMessage",
    "StatePayload",
    "StatePush",
    "Summary",
    "SyncReply",
    "SyncRequest",
    "decode_delta",
    "decode_payload",
    "decode_summary",
    "encode_payload",
    "merge_deltas",
]

# --- payloads ----------------------------------------------------------------------


class LogUpdate(msgspec.Struct, array_like=True, gc=False):
    engine_id: str
    epoch: Epoch
    update: bytes  # pycrdt v1 update of that epoch's document


class Delta(msgspec.Struct, tag="delta", kw_only=True, gc=False):
    """Anything a node gossips: log updates, registry update, slots, hints."""

    sender: str
    logs: list[LogUpdate] = []
    registry: bytes | None = None
    slots: list[Slot] = []
    hints: list[Hint] = []

    def is_empty(self) -> bool:
        return not (self.logs or self.registry or self.slots or self.hints)


class EngineSummary(msgspec.Struct, array_like=True, gc=False):
    engine_id: str
    epoch: Epoch
    state_vector: bytes


class Summary(msgspec.Struct, tag="summary", kw_only=True, gc=False):
    sender: str
    engines: list[EngineSummary] = []
    registry_sv: bytes = b"\x00"
    # Registry.digest(); empty from a node that does not send one (compared only when both do).
    registry_digest: bytes = b""
    slots: dict[str, int] = {}


StatePayload = Delta | Summary

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(StatePayload)


class MessageError(ValueError):
    """Bytes that are not a state payload."""


def encode_payload(msg: StatePayload) -> bytes:
    return _enc.encode(msg)


def decode_payload(raw: bytes) -> StatePayload:
    try:
        return _dec.decode(raw)
    except msgspec.DecodeError as e:
        raise MessageError(f"malformed state payload: {e}") from None


def decode_delta(raw: bytes) -> Delta:
    m = decode_payload(raw)
    if not isinstance(m, Delta):
        raise MessageError(f"expected a Delta, got {type(m).__name__}")
    return m


def decode_summary(raw: bytes) -> Summary:
    m = decode_payload(raw)
    if not isinstance(m, Summary):
        raise MessageError(f"expected a Summary, got {type(m).__name__}")
    return m


def merge_deltas(sender: str, deltas: Iterable[Delta]) -> Delta:
    """Coalesce several outgoing Deltas: one merged pycrdt update per epoch doc."""
    by_doc: dict[tuple[str, Epoch], list[bytes]] = {}
    regs: list[bytes] = []
    slots: dict[str, Slot] = {}
    hints: dict[tuple[str, int], Hint] = {}
    for d in deltas:
        for lu in d.logs:
            by_doc.setdefault((lu.engine_id, lu.epoch), []).append(lu.update)
        if d.registry:
            regs.append(d.registry)
        for s in d.slots:
            if s.node_id not in slots or slots[s.node_id].version < s.version:
                slots[s.node_id] = s
        for h in d.hints:
            hints[(h.origin, h.hid)] = h
    logs = [
        LogUpdate(e, ep, ups[0] if len(ups) == 1 else pycrdt.merge_updates(*ups))
        for (e, ep), ups in by_doc.items()
    ]
    reg = None
    if regs:
        reg = regs[0] if len(regs) == 1 else pycrdt.merge_updates(*regs)
    return Delta(
        sender=sender,
        logs=logs,
        registry=reg,
        slots=list(slots.values()),
        hints=list(hints.values()),
    )


# --- messages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatePush:
    src: str
    dst: str
    payload: bytes  # an encoded Delta


@dataclass(frozen=True, slots=True)
class SyncRequest:
    src: str
    dst: str
    summary: bytes  # the encoded Summary of the sender
    want_full: bool = False  # joiner: send everything (incl. live hints)


@dataclass(frozen=True, slots=True)
class SyncReply:
    src: str
    dst: str
    payloads: tuple[bytes, ...]  # encoded Deltas: what the requester lacks
    summary: bytes  # the replier's Summary, so the requester can push back
    full: bool = False  # payloads are the replier's full state
    ready: bool = False  # the replier itself was ready (its full state is complete)


StateMessage = StatePush | SyncRequest | SyncReply
