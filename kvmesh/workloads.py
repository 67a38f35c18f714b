"""Seeded, reproducible workloads of token-id prompts.

A workload is a list of sessions. A session is a shared system prompt plus
turns; turn k's prompt is the system prompt, every earlier user message and
the engine's earlier answers, then user message k (what a chat client sends).
Sessions sharing a system prompt share that prefix; a session's next turn
shares its whole previous prompt and answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

VOCAB_LO, VOCAB_HI = 256, 32000  # ids below 256 are the built-in tokenizer's reserved ids


@dataclass(slots=True)
class Session:
    session_id: str
    system: list[int]
    user_turns: list[list[int]]
    max_tokens: int


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n)]


def chat(
    n_sessions: int = 48,
    turns: tuple[int, int] = (4, 10),
    n_system_prompts: int = 8,
    system_tokens: tuple[int, int] = (400, 1000),
    user_tokens: tuple[int, int] = (100, 300),
    max_tokens: int = 48,
    seed: int = 0,
) -> list[Session]:
    """Multi-turn chat: a few shared system prompts, sessions growing turn by turn."""
    rng = random.Random(seed)
    systems = [_tokens(rng, rng.randint(*system_tokens)) for _ in range(n_system_prompts)]
    sessions = []
    for i in range(n_sessions):
        sessions.append(
            Session(
                session_id=f"s{i}",
                system=systems[rng.randrange(n_system_prompts)],
                user_turns=[_tokens(rng, rng.randint(*user_tokens)) for _ in range(rng.randint(*turns))],
                max_tokens=max_tokens,
            )
        )
    return sessions


def total_requests(sessions: list[Session]) -> int:
    return sum(len(s.user_turns) for s in sessions)
