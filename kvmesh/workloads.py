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
CHAT_TURNS = (4, 10)  # turns per chat session (inclusive range)


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
    turns: tuple[int, int] = CHAT_TURNS,
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


# --- benchmark workloads (``kvmesh bench routing --workload ...``) ---------------------
#
# Open loop, like real traffic: each session starts at its own arrival time
# (Poisson arrivals, or the trace's timestamps), whatever the fleet's state;
# the turns of one session run in order, ``think_s`` apart.


@dataclass(slots=True)
class BenchSession:
    """A session of the benchmark driver.

    ``append_answers``: the next turn's prompt is the previous prompt, the
    engine's answer and the next user message (chat, agents). False for a
    trace replay: every turn's prompt is ``system + user_turns[k]`` as given.
    """

    session_id: str
    system: list[int]
    user_turns: list[list[int]]
    max_tokens: list[int]  # per turn
    start_s: float = 0.0
    think_s: float = 0.0
    append_answers: bool = True


@dataclass(slots=True)
class Workload:
    name: str
    sessions: list[BenchSession]
    params: dict[str, object]  # how it was made, for the report

    @property
    def requests(self) -> int:
        return sum(len(s.user_turns) for s in self.sessions)

    @property
    def duration_s(self) -> float:
        return max((s.start_s for s in self.sessions), default=0.0)

    def scaled(self, load: float) -> Workload:
        """The same sessions on a timeline ``load`` times as fast: start times
        and the think time between turns divided by ``load``, so the offered
        request rate is ``load`` x (chat sessions arriving at ``load`` x the
        rate, their users answering ``load`` x as fast; a trace replayed
        ``load`` x as fast). Scaling the arrivals alone would not scale a
        workload whose sessions all overlap: as many would run at once."""
        if not load > 0:
            raise ValueError(f"load must be > 0, got {load}")
        sessions = [
            BenchSession(
                s.session_id,
                s.system,
                s.user_turns,
                s.max_tokens,
                s.start_s / load,
                s.think_s / load,
                s.append_answers,
            )
            for s in self.sessions
        ]
        return Workload(
            self.name, sessions, {**self.params, "load": load * float(str(self.params.get("load", 1.0)))}
        )

    def planned_requests(self, latency_s: float) -> list[tuple[list[int], list[int]]]:
        """The requests a run will send, before it runs, in the order planned:
        answers stand in as ``max_tokens`` tokens drawn from a generator seeded
        by the session and turn (the engines' own answers differ, but take as
        many blocks, and are as unique), and a session's turn k leaves
        ``k x (latency_s + think_s)`` after its start. For sizing caches to a
        workload's working set before a run; a run's ideals use what it sent."""
        timed: list[tuple[float, int, list[int], list[int]]] = []
        for i, s in enumerate(self.sessions):
            rng = random.Random(f"plan/{s.session_id}")
            history = list(s.system)
            t = s.start_s
            for k, user in enumerate(s.user_turns):
                prompt = history + user if s.append_answers else s.system + user
                answer = _tokens(rng, s.max_tokens[k])
                timed.append((t, i, prompt, answer))
                history = prompt + answer
                t += latency_s + s.think_s
        timed.sort(key=lambda x: (x[0], x[1]))
        return [(p, a) for _, _, p, a in timed]

    def prompt_tokens(self) -> int:
        """Prompt tokens excluding the engine's answers (known before a run)."""
        total = 0
        for s in self.sessions:
            hist = len(s.system)
            for u in s.user_turns:
                hist = hist + len(u) if s.append_answers else len(s.system) + len(u)
                total += hist
        return total


def _poisson_starts(rng: random.Random, n: int, rate: float) -> list[float]:
    if rate <= 0:
        raise ValueError("rate must be > 0 sessions/s")
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def chat_workload(
    n_sessions: int = 96,
    rate: float = 4.0,
    think_s: float = 1.0,
    max_tokens: int = 48,
    seed: int = 0,
    n_system_prompts: int = 8,
    system_tokens: tuple[int, int] = (1000, 3000),
    user_tokens: tuple[int, int] = (200, 600),
    turns: tuple[int, int] = CHAT_TURNS,
) -> Workload:
    """Multi-turn chat (:func:`chat`'s sessions), sessions arriving at ``rate``/s."""
    base = chat(
        n_sessions=n_sessions,
        max_tokens=max_tokens,
        seed=seed,
        n_system_prompts=n_system_prompts,
        system_tokens=system_tokens,
        user_tokens=user_tokens,
        turns=turns,
    )
    starts = _poisson_starts(random.Random(f"chat-arrivals/{seed}"), n_sessions, rate)
    sessions = [
        BenchSession(s.session_id, s.system, s.user_turns, [s.max_tokens] * len(s.user_turns), t, think_s)
        for s, t in zip(base, starts)
    ]
    return Workload(
        "chat",
        sessions,
        {
            "sessions": n_sessions,
            "session_rate_per_s": rate,
            "think_s": think_s,
            "max_tokens": max_tokens,
            "system_prompts": n_system_prompts,
            "system_tokens": list(system_tokens),
            "user_tokens": list(user_tokens),
            "turns": list(turns),
            "seed": seed,
        },
    )


def agent_workload(
    n_sessions: int = 48,
    rate: float = 3.0,
    n_agents: int = 4,
    tools_tokens: tuple[int, int] = (2000, 4000),
    steps: tuple[int, int] = (4, 12),
    result_tokens: tuple[int, int] = (30, 300),
    max_tokens: int = 16,
    think_s: float = 0.2,
    seed: int = 0,
) -> Workload:
    """Agent/tool loops: a long shared prefix per agent (instructions + tool
    schemas), then steps that each append the model's short tool call and the
    tool's result; short outputs, short pauses (tool execution)."""
    rng = random.Random(f"agent/{seed}")
    prefixes = [_tokens(rng, rng.randint(*tools_tokens)) for _ in range(n_agents)]
    starts = _poisson_starts(random.Random(f"agent-arrivals/{seed}"), n_sessions, rate)
    sessions = []
    for i, t in enumerate(starts):
        n = rng.randint(*steps)
        turns = [_tokens(rng, rng.randint(*result_tokens)) for _ in range(n)]
        sessions.append(
            BenchSession(f"a{i}", prefixes[rng.randrange(n_agents)], turns, [max_tokens] * n, t, think_s)
        )
    return Workload(
        "agent",
        sessions,
        {
            "sessions": n_sessions,
            "session_rate_per_s": rate,
            "agents": n_agents,
            "prefix_tokens": list(tools_tokens),
            "steps": list(steps),
            "result_tokens": list(result_tokens),
            "max_tokens": max_tokens,
            "think_s": think_s,
            "seed": seed,
        },
    )


def no_sharing_workload(
    n_requests: int = 120,
    rate: float = 8.0,
    prompt_tokens: tuple[int, int] = (300, 1500),
    max_tokens: int = 32,
    seed: int = 0,
) -> Workload:
    """Control: single-turn requests with unique random prompts (nothing to reuse)."""
    rng = random.Random(f"nosharing/{seed}")
    starts = _poisson_starts(random.Random(f"nosharing-arrivals/{seed}"), n_requests, rate)
    sessions = [
        BenchSession(f"u{i}", [], [_tokens(rng, rng.randint(*prompt_tokens))], [max_tokens], t, 0.0, False)
        for i, t in enumerate(starts)
    ]
    return Workload(
        "nosharing",
        sessions,
        {
            "requests": n_requests,
            "rate_per_s": rate,
            "prompt_tokens": list(prompt_tokens),
            "max_tokens": max_tokens,
            "seed": seed,
        },
    )


# --- tuning and held-out splits ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Split:
    """Which seed the synthetic workloads use and which slice of the trace is
    replayed. Policy defaults are chosen on the ``tuning`` split; the
    benchmark reports the ``heldout`` one, so its figures are not the ones
    the defaults were fitted to."""

    name: str
    seed: int  # of chat, agent and nosharing (prompts and arrivals)
    trace_offset: int  # records of the Mooncake trace skipped before the slice


SPLITS: dict[str, Split] = {
    "tuning": Split("tuning", seed=0, trace_offset=0),
    "heldout": Split("heldout", seed=1, trace_offset=2000),
}
DEFAULT_SPLIT = "heldout"


# --- the Mooncake conversation trace -----------------------------------------------------

MOONCAKE_BLOCK = 512  # tokens per hash id in the published trace


@dataclass(slots=True, frozen=True)
class TraceRecord:
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_mooncake(path: str, limit: int | None = None, offset: int = 0) -> list[TraceRecord]:
    """Parse the trace's JSONL (``timestamp``, ``input_length``, ``output_length``,
    ``hash_ids``); raises ``ValueError`` naming the line of a bad record."""
    import json

    out: list[TraceRecord] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno <= offset or not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            try:
                o = json.loads(line)
                rec = TraceRecord(
                    int(o["timestamp"]),
                    int(o["input_length"]),
                    int(o["output_length"]),
                    tuple(int(h) for h in o["hash_ids"]),
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: bad trace record: {e}") from None
            if rec.input_length < 1 or not rec.hash_ids or rec.output_length < 0:
                raise ValueError(f"{path}:{lineno}: bad trace record: empty prompt or negative length")
            out.append(rec)
    return out


def _block_tokens(hash_id: int, n: int, salt: int) -> list[int]:
    """The synthetic content of one trace block: equal ids give equal tokens."""
    return _tokens(random.Random(hash_id * 1_000_003 + salt), n)


def mooncake_workload(
    records: list[TraceRecord],
    tokens_per_block: int = 64,
    target_tokens_per_s: float | None = None,
    time_factor: float = 1.0,
    max_output: int = 256,
    seed: int = 0,
    first_record: int = 0,
) -> Workload:
    """Replay trace records as single-turn requests with fixed prompts.

    Scaling (written into ``params``): every 512-token trace block becomes
    ``tokens_per_block`` synthetic token ids (a deterministic function of its
    hash id), so lengths scale by ``k = tokens_per_block / 512``: a request's
    prompt is its full blocks plus ``ceil(k * partial)`` tokens of its last
    block, its output ``max(1, round(k * output_length))`` tokens (capped at
    ``max_output``). Timestamps (relative to the first record) are divided by
    a factor: ``time_factor``, or, given ``target_tokens_per_s``, the factor
    at which the slice offers that many prompt tokens per second.
    ``first_record`` (the slice's first line in the trace, from 0) is only
    written into ``params``.
    """
    if not records:
        raise ValueError("no trace records")
    if tokens_per_block < 1:
        raise ValueError("tokens_per_block must be >= 1")
    k = tokens_per_block / MOONCAKE_BLOCK
    salt = seed * 7919
    prompts: list[list[int]] = []
    outs: list[int] = []
    for r in records:
        n_full = len(r.hash_ids) - 1
        last = r.input_length - MOONCAKE_BLOCK * n_full
        last_tokens = min(tokens_per_block, max(1, -(-last * tokens_per_block // MOONCAKE_BLOCK)))
        p: list[int] = []
        for h in r.hash_ids[:-1]:
            p += _block_tokens(h, tokens_per_block, salt)
        p += _block_tokens(r.hash_ids[-1], tokens_per_block, salt)[:last_tokens]
        prompts.append(p)
        outs.append(min(max_output, max(1, round(k * r.output_length))))
    t0 = records[0].timestamp_ms
    span = (records[-1].timestamp_ms - t0) / 1000.0
    total = sum(len(p) for p in prompts)
    if target_tokens_per_s is not None:
        if target_tokens_per_s <= 0:
            raise ValueError("target_tokens_per_s must be > 0")
        time_factor = span / (total / target_tokens_per_s) if span > 0 else 1.0
    if time_factor <= 0:
        raise ValueError("time_factor must be > 0")
    sessions = [
        BenchSession(f"m{i}", [], [p], [o], (r.timestamp_ms - t0) / 1000.0 / time_factor, 0.0, False)
        for i, (r, p, o) in enumerate(zip(records, prompts, outs))
    ]
    return Workload(
        "trace",
        sessions,
        {
            "source": "Mooncake conversation_trace.jsonl",
            "first_record": first_record,
            "records": len(records),
            "tokens_per_trace_block": tokens_per_block,
            "length_scale": k,
            "max_output": max_output,
            "trace_span_s": span,
            "time_factor": time_factor,
            "replay_span_s": span / time_factor,
            "prompt_tokens": total,
            "offered_prompt_tokens_per_s": total / (span / time_factor) if span else None,
        },
    )
