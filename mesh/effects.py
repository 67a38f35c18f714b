"""What the mesh core asks its shell to do (drained with ``MeshCore.take_effects``).

The core decides; the shell (a router node) carries out: start or stop the
KV-event adapter of an engine this node gained or lost, add or remove an
engine from its routing table, report a member change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh.engine_log.epoch import Epoch
from mesh.state import Takeover
from mesh.swim_messages import MemberEvent

__all__ = ["Effect", "EngineAdded", "EngineRemoved", "MemberChanged", "StartOwning", "StopOwning"]


@dataclass(frozen=True, slots=True)
class StartOwning:
    """Start this engine's KV-event adapter at ``takeover.resume`` (per worker,
    first sequence number to fetch); restore its block mappers from
    ``takeover.mappings`` when the log carries them."""

    engine_id: str
    spec: dict[str, Any]
    takeover: Takeover
    base_epoch: Epoch | None = None  # the epoch whose view the new term starts from


@dataclass(frozen=True, slots=True)
class StopOwning:
    engine_id: str


@dataclass(frozen=True, slots=True)
class EngineAdded:
    engine_id: str
    spec: dict[str, Any]  # also sent when an engine's spec changed


@dataclass(frozen=True, slots=True)
class EngineRemoved:
    engine_id: str


@dataclass(frozen=True, slots=True)
class MemberChanged:
    event: MemberEvent


Effect = StartOwning | StopOwning | EngineAdded | EngineRemoved | MemberChanged
