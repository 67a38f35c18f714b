"""Anti-entropy: periodic summary exchange that repairs whatever gossip lost.

Every ``interval`` (scaled up beyond 32 live members) one random live peer
gets a ``SyncRequest`` with this node's summary (state vectors). It answers
with what the requester lacks and its own summary (``SyncReply``), and the
requester pushes back what the replier lacks. That repairs lost messages and
healed partitions. A joiner sends the same request with ``want_full`` and
gets the peer's full state (route hints included).

Pure: time and randomness come in as arguments.
"""

from __future__ import annotations

import math
import random

from mesh.state import MeshState
from mesh.state_messages import (
    Delta,
    StatePush,
    Summary,
    SyncReply,
    SyncRequest,
    decode_delta,
    decode_summary,
    encode_payload,
)

__all__ = ["AntiEntropy", "exchange_scale"]


def exchange_scale(n_live: int) -> float:
    """As memberlist's push-pull: beyond 32 nodes, full exchanges get rarer
    (x2 at 64, x3 at 128, ...) so their total cost grows ~ n log n, not n^2."""
    return 1.0 if n_live <= 32 else math.ceil(math.log2(n_live) - 5) + 1.0


class AntiEntropy:
    """One node's side of the summary exchange (see the module docstring)."""

    def __init__(self, addr: str, state: MeshState, interval: float, now: float, rng: random.Random) -> None:
        self.addr = addr
        self.state = state
        self.interval = interval
        self.next_at = now + rng.uniform(0.5, 1.0) * interval  # random phase

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def request(self, now: float, peers: list[str], n_live: int, rng: random.Random) -> SyncRequest | None:
        """The periodic request (to a random peer); schedules the next one."""
        self.next_at = now + self.interval * exchange_scale(n_live)
        if not peers:
            return None
        return SyncRequest(self.addr, rng.choice(peers), encode_payload(self.state.summary()))

    def full_state_request(self, dst: str) -> SyncRequest:
        """A joiner's request for everything ``dst`` has."""
        return SyncRequest(self.addr, dst, encode_payload(self.state.summary()), want_full=True)

    def reply(self, msg: SyncRequest, now: float, ready: bool) -> SyncReply:
        """Answer a request: what the requester lacks, and our summary."""
        remote = decode_summary(msg.summary)
        deltas = [self.state.full_state(now)] if msg.want_full else self.state.diff(remote)
        return SyncReply(
            self.addr,
            msg.src,
            tuple(encode_payload(d) for d in deltas),
            encode_payload(self.state.summary()),
            full=msg.want_full,
            ready=ready,
        )

    @staticmethod
    def decode_reply(msg: SyncReply) -> tuple[list[Delta], Summary]:
        """The deltas of a reply and the replier's summary (all or nothing:
        raises ``MessageError`` if any part is malformed)."""
        deltas = [decode_delta(p) for p in msg.payloads]
        return deltas, decode_summary(msg.summary)

    def push_back(self, msg: SyncReply, remote: Summary) -> list[StatePush]:
        """After applying a reply: what the replier lacks, pushed to it."""
        return [StatePush(self.addr, msg.src, encode_payload(d)) for d in self.state.diff(remote)]
