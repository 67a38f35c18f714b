"""The replicated-state protocol between nodes: push, and anti-entropy sync.

Flat frozen dataclasses (str/bool/bytes/tuples of bytes), so the transport
maps each to protobuf one to one (``proto/kvmesh/mesh/v1/mesh.proto``). Their
payloads are msgspec-encoded :mod:`mesh.state` messages (``Delta``,
``Summary``), whose CRDT parts are pycrdt updates: opaque at this level.

* :class:`StatePush`: state the receiver has probably not seen (epidemic push).
* :class:`SyncRequest` / :class:`SyncReply`: anti-entropy. The request carries
  the sender's summary (state vectors); the reply carries what the requester
  lacks and the replier's own summary, so the requester can push back what
  the replier lacks. A joiner asks for everything (``want_full``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StateMessage", "StatePush", "SyncReply", "SyncRequest"]


@dataclass(frozen=True, slots=True)
class StatePush:
    src: str
    dst: str
    payload: bytes  # msgspec-encoded mesh.state.Delta


@dataclass(frozen=True, slots=True)
class SyncRequest:
    src: str
    dst: str
    summary: bytes  # msgspec-encoded mesh.state.Summary of the sender
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
