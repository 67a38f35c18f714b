"""What a kvmesh call answers, as plain frozen dataclasses: the routing
decision, the chunks of a stream and its result. They hold no gRPC type, so
a caller can keep them, compare them and print them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Candidate", "Chunk", "Decision", "Event", "Prompt", "Result", "RouteResult", "Routed"]


Prompt = str | Sequence[int]  # text (tokenized by the node) or token ids (used as they are)


@dataclass(frozen=True, slots=True)
class Candidate:
    engine_id: str
    overlap_blocks: int  # prompt blocks the engine holds
    load: float
    score: float  # the policy's; for cost-based policies lower is better
    chosen: bool
    # Prompt blocks past those that it holds on its other cache tiers.
    host_blocks: int = 0
    disk_blocks: int = 0
    external_blocks: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    policy: str
    reason: str
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True, slots=True)
class Routed:
    """Where the node sent the request (first message of each attempt)."""

    request_id: str
    engine_id: str
    endpoint: str
    predicted_cached_blocks: int
    attempt: int
    decision: Decision


@dataclass(frozen=True, slots=True)
class Chunk:
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True, slots=True)
class Result:
    """How the request finished, with everything it generated."""

    request_id: str
    engine_id: str
    finish_reason: str  # "stop", "length", "error"
    prompt_tokens: int
    cached_prompt_tokens: int  # as the engine reported them
    completion_tokens: int
    ttft_ms: float  # on the node: request received -> first token
    attempts: int
    error: str  # why, when finish_reason is "error"
    token_ids: tuple[int, ...]
    text: str
    routed: Routed | None  # the last attempt's


@dataclass(frozen=True, slots=True)
class RouteResult:
    request_id: str
    engine_id: str
    endpoint: str
    predicted_cached_blocks: int
    prompt_blocks: int
    decision: Decision


Event = Routed | Chunk | Result
