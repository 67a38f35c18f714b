"""Proof that a mesh message comes from a member: the mesh's shared secret.

Without it, anyone who reaches a node's mesh port can join the mesh or write
its state (register and deregister engines mesh-wide, fence an engine's log,
claim load). Nodes either authenticate each other with mutual TLS (the
transport's credentials, ``mesh/transport.py``) or, where TLS is not set up,
prove every batch they send with a secret all members share: an HMAC-SHA256
over the send time and the batch's bytes as sent, carried as gRPC
metadata. A receiver refuses a batch whose proof is missing or wrong, or
whose time is more than ``max_skew`` seconds from its own clock (a recorded
batch cannot be replayed later; replays within the window are harmless:
every mesh protocol tolerates duplicates).

Pure: the caller passes the bytes and the time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

__all__ = ["MAC_KEY", "TIME_KEY", "MeshAuthError", "MeshSecret", "readable_by_others"]

TIME_KEY = "kvmesh-mesh-time"  # metadata: the sender's clock (seconds since the epoch)
MAC_KEY = "kvmesh-mesh-mac"  # metadata: hex HMAC-SHA256(secret, time + batch)
MIN_SECRET_BYTES = 16


def readable_by_others(path: str) -> str | None:
    """The mode of a secret file (a key, tokens, the mesh secret) that users
    other than its owner and group may read, as ``ls`` shows it; None if they
    may not (or it cannot be read: its reader says so). A group may be meant
    to read it (a Kubernetes secret volume with ``defaultMode: 0440``)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return stat.filemode(mode) if mode & 0o004 else None


class MeshAuthError(ValueError):
    """A mesh secret that cannot be used (missing, too short)."""


class MeshSecret:
    """The mesh's shared secret: signs outgoing batches, checks incoming ones."""

    __slots__ = ("_key", "max_skew")

    def __init__(self, key: bytes, max_skew: float = 60.0) -> None:
        if len(key) < MIN_SECRET_BYTES:
            raise MeshAuthError(f"the mesh secret must be at least {MIN_SECRET_BYTES} bytes, got {len(key)}")
        self._key = key
        self.max_skew = max_skew

    @classmethod
    def from_file(cls, path: str, max_skew: float = 60.0) -> MeshSecret:
        try:
            key = Path(path).read_bytes().strip()
        except OSError as e:
            raise MeshAuthError(f"cannot read the mesh secret file {path!r}: {e}") from None
        return cls(key, max_skew)

    def _mac(self, body: bytes, stamp: str) -> str:
        return hmac.new(self._key, stamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()

    def sign(self, body: bytes, now: float) -> tuple[tuple[str, str], tuple[str, str]]:
        """The metadata that proves ``body`` (sent at ``now``)."""
        stamp = f"{now:.3f}"
        return (TIME_KEY, stamp), (MAC_KEY, self._mac(body, stamp))

    def check(self, body: bytes, metadata: dict[str, str], now: float) -> str | None:
        """Why ``body`` with ``metadata`` is refused, or None if its proof holds."""
        stamp = metadata.get(TIME_KEY)
        mac = metadata.get(MAC_KEY)
        if stamp is None or mac is None:
            return "no mesh proof (send with the mesh secret)"
        try:
            sent = float(stamp)
        except ValueError:
            return "malformed mesh proof"
        if abs(now - sent) > self.max_skew:
            return f"mesh proof {now - sent:+.0f} s off this node's clock (max {self.max_skew:g} s)"
        if not hmac.compare_digest(mac, self._mac(body, stamp)):
            return "wrong mesh proof (a different secret)"
        return None
