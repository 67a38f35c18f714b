"""The request path's pure core: everything a request goes through on a node
except the I/O (the gRPC call, the engine's HTTP stream), which
:meth:`router.node.RouterNode.generate` does around it.

1. **prepare**: pick the model and the policy, tokenize the prompt once and
   hash its full blocks (:func:`prepare` -> :class:`Prepared`).
2. **choose**: list the model's workers with their mesh-wide load and
   whether they may take a request now (:func:`candidates`); the policy
   picks one (a :class:`router.policies.Decision`), which names the engine to
   send to (:func:`routed_to` -> :class:`Routed`).
3. **attempt**: a request that fails before its first token is safe to
   send elsewhere, so it is retried on another worker, never one that
   already failed it, up to the attempt budget (:class:`Attempts`). After
   the first token it cannot be retried: tokens already reached the client.
4. **account**: the node's counters, per attempt (:class:`Accounting`): the
   request's load on its worker (its uncached prompt until the first token,
   then one block of decode: see :func:`work_tokens`), the time to first
   token, the engine's circuit breaker and the node's statistics.

Time is an argument everywhere; nothing here sleeps, reads a clock or
does I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from blocks.hashing import block_hashes, root_seed
from blocks.workers import split_worker_id
from engine_adapters.completion_request import Tenancy
from engine_adapters.proxy import Usage
from engine_adapters.tokenizer import Tokenizer
from router.engine_registry import EngineRecord, EngineTable
from router.load import LoadTracker, WorkerLoads
from router.policies import (
    POLICY_NAMES,
    Candidate,
    Decision,
    NoEngineAvailable,
    RouteRequest,
    candidates_from,
)

__all__ = [
    "DP_RANK_HEADER",
    "Accounting",
    "Attempts",
    "ClientRequest",
    "Finished",
    "NodeStats",
    "Prepared",
    "RequestError",
    "Routed",
    "candidates",
    "prepare",
    "resolve_model",
    "routed_to",
    "work_tokens",
]

# The header vLLM reads to pin a request to one data-parallel rank (its KV cache).
DP_RANK_HEADER = "X-data-parallel-rank"


class RequestError(ValueError):
    """A request the node cannot serve as asked (maps to INVALID_ARGUMENT)."""


# --- 1. prepare ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Prepared:
    """A request's prompt, tokenized and hashed once, before any routing."""

    request_id: str
    model: str
    token_ids: list[int]
    block_size: int
    hashes: list[int]  # router block hashes of the prompt's full blocks
    session_key: str | None
    policy: str
    tenancy: Tenancy = field(default_factory=Tenancy)  # whose cache: sent to the engine too

    def route_request(self) -> RouteRequest:
        return RouteRequest(
            request_id=self.request_id,
            block_hashes=self.hashes,
            prompt_tokens=len(self.token_ids),
            session_key=self.session_key,
            block_size=self.block_size,
        )


def resolve_model(served: Collection[str], model: str) -> str:
    """The model a request is for: the one it names, or the only one served."""
    if model:
        if model not in served:
            raise RequestError(f"no engine serves model {model!r}; served: {sorted(served)}")
        return model
    if len(served) == 1:
        return next(iter(served))
    if not served:
        raise NoEngineAvailable("no engines registered")
    raise RequestError(f"model is required: this node serves {sorted(served)}")


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """What a client asked for, as received (empty: not given)."""

    request_id: str = ""
    model: str = ""
    text: str | None = None
    token_ids: list[int] | None = None
    session_key: str = ""
    policy: str = ""
    lora_name: str = ""
    cache_salt: str = ""


def prepare(
    request: ClientRequest,
    engines: EngineTable,
    tokenizer: Callable[[str], Tokenizer],
    default_policy: str,
    new_request_id: Callable[[], str],
) -> Prepared:
    """Check a request against the registered engines and hash its prompt.
    ``tokenizer(model)`` gives the tokenizer for a text prompt;
    ``new_request_id()`` an id for a request that has none."""
    policy = request.policy or default_policy
    if policy not in POLICY_NAMES:
        raise RequestError(f"unknown policy {policy!r}; one of {', '.join(POLICY_NAMES)}")
    model = resolve_model(engines.models(), request.model)
    token_ids = request.token_ids
    if token_ids is None:
        if request.text is None:
            raise RequestError("prompt is required (text or token_ids)")
        token_ids = tokenizer(model).encode(request.text)
    if not token_ids:
        raise RequestError("prompt is empty")
    block_size = engines.block_size(model)
    seed = root_seed(model, request.lora_name or None, request.cache_salt or None)
    return Prepared(
        request_id=request.request_id or new_request_id(),
        model=model,
        token_ids=list(token_ids),
        block_size=block_size,
        hashes=block_hashes(token_ids, block_size, seed),
        session_key=request.session_key or None,
        policy=policy,
        tenancy=Tenancy(request.lora_name, request.cache_salt),
    )


# --- 2. choose ----------------------------------------------------------------------------------


def candidates(
    engines: EngineTable, model: str, exclude: Collection[str], loads: WorkerLoads, now: float
) -> list[Candidate]:
    """Every worker of ``model``'s engines, in registration order. A worker
    may take the request if its engine passed its last health probe, its
    circuit breaker lets a request through, and it is not in ``exclude``."""
    workers: list[str] = []
    unusable = set(exclude)
    for rec in engines.of_model(model):
        workers += rec.spec.workers
        # Short-circuit: the breaker is asked (which may move it to half-open)
        # only for a healthy engine.
        if not (rec.healthy and rec.breaker.allows(now)):
            unusable.update(rec.spec.workers)
    return candidates_from(workers, loads.requests, unusable, loads.tokens)


@dataclass(slots=True)
class Routed:
    """Where one attempt of a request goes, and why."""

    request_id: str
    engine_id: str
    worker: str
    endpoint: str
    predicted_cached_blocks: int
    attempt: int
    decision: Decision
    headers: dict[str, str] = field(default_factory=dict)  # HTTP headers for the engine


def routed_to(prep: Prepared, decision: Decision, attempt: int, engines: EngineTable) -> Routed:
    """The engine, endpoint and headers of the worker ``decision`` chose."""
    engine_id, rank = split_worker_id(decision.worker)
    spec = engines[engine_id].spec
    overlap = next((c.overlap_blocks for c in decision.candidates if c.chosen), 0)
    return Routed(
        request_id=prep.request_id,
        engine_id=engine_id,
        worker=decision.worker,
        endpoint=spec.endpoint,
        predicted_cached_blocks=overlap,
        attempt=attempt,
        decision=decision,
        headers={DP_RANK_HEADER: str(rank)} if spec.data_parallel_size > 1 else {},
    )


# --- 3. attempt ---------------------------------------------------------------------------------


class Attempts:
    """The retry state machine of one request: which attempt it is on, which
    workers the next choice must exclude, and when to give up (the budget is
    spent, or no worker is left to choose)."""

    __slots__ = ("_over", "attempt", "budget", "excluded", "last_error")

    def __init__(self, budget: int) -> None:
        self.budget = max(1, budget)
        self.attempt = 0
        self.excluded: set[str] = set()
        self.last_error = ""
        self._over = False

    def next(self) -> bool:
        """Start the next attempt; False once the request has to give up."""
        if self._over or self.attempt >= self.budget:
            return False
        self.attempt += 1
        return True

    def no_candidate(self, error: str) -> None:
        """The policy found no worker to choose: give up now."""
        self.last_error = error
        self._over = True

    def failed_before_first_token(self, worker: str, error: str) -> None:
        """Retryable: the next attempt avoids ``worker``."""
        self.excluded.add(worker)
        self.last_error = error

    def give_up_message(self) -> str:
        return f"no engine could serve the request: {self.last_error}"


# --- 4. account ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Finished:
    finish_reason: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    engine_id: str
    ttft_ms: float
    attempts: int
    error: str = ""


@dataclass
class NodeStats:
    requests_total: int = 0
    requests_failed: int = 0
    retries_total: int = 0
    prompt_tokens_total: int = 0
    cached_prompt_tokens_total: int = 0
    requests_by_engine: Counter[str] = field(default_factory=Counter)
    requests_by_policy: Counter[str] = field(default_factory=Counter)


def work_tokens(prep: Prepared, predicted_cached_blocks: int) -> int:
    """Load of a request in tokens of work: the prefill the engine still has
    to do (uncached prompt) plus one block of decode. After the first token
    only the decode block is left (:meth:`Accounting.token`)."""
    uncached = max(len(prep.token_ids) - predicted_cached_blocks * prep.block_size, 0)
    return uncached + prep.block_size


class Accounting:
    """What one Generate request counts, attempt by attempt, in the node's
    load tracker, statistics and the chosen engine's record and breaker.

    Per attempt: :meth:`attempt` (the engine is chosen), :meth:`sent` (the
    request leaves), :meth:`token` per chunk, then one of :meth:`finished`,
    :meth:`unavailable` (retryable) or :meth:`broken`, and always
    :meth:`attempt_over`. :meth:`gave_up` if no attempt succeeded.
    """

    __slots__ = ("_load", "_prep", "_record", "_routed", "_stats", "started", "ttft_ms")

    def __init__(self, prep: Prepared, stats: NodeStats, load: LoadTracker, now: float) -> None:
        self._prep = prep
        self._stats = stats
        self._load = load
        self._record: EngineRecord | None = None
        self._routed: Routed | None = None
        self.started = now
        self.ttft_ms = -1.0  # of the current attempt, from the start of the request
        stats.requests_total += 1
        stats.requests_by_policy[prep.policy] += 1

    def _current(self) -> tuple[Routed, EngineRecord]:
        if self._routed is None or self._record is None:
            raise RuntimeError("no attempt in progress")
        return self._routed, self._record

    def attempt(self, routed: Routed, record: EngineRecord, now: float) -> None:
        self._routed, self._record = routed, record
        self.ttft_ms = -1.0
        record.breaker.on_attempt(now)
        record.attempts += 1

    def sent(self) -> None:
        routed, _ = self._current()
        self._load.start(
            routed.worker, self._prep.request_id, work_tokens(self._prep, routed.predicted_cached_blocks)
        )

    def token(self, now: float) -> None:
        """A chunk of tokens arrived; the first one ends the prefill."""
        if self.ttft_ms < 0:
            self.ttft_ms = (now - self.started) * 1000.0
            self._load.set_tokens(self._prep.request_id, self._prep.block_size)

    def finished(self, usage: Usage, now: float) -> Finished:
        routed, record = self._current()
        record.breaker.on_success(now)
        stats = self._stats
        stats.prompt_tokens_total += usage.prompt_tokens
        stats.cached_prompt_tokens_total += usage.cached_tokens
        stats.requests_by_engine[routed.engine_id] += 1
        return Finished(
            finish_reason=usage.finish_reason,
            prompt_tokens=usage.prompt_tokens,
            cached_prompt_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            engine_id=routed.engine_id,
            ttft_ms=max(self.ttft_ms, 0.0),
            attempts=routed.attempt,
        )

    def unavailable(self, now: float) -> None:
        """The engine failed before the first token; the request will be retried."""
        _, record = self._current()
        record.failures += 1
        record.breaker.on_failure(now)
        self._stats.retries_total += 1

    def broken(self, error: str, now: float) -> Finished:
        """The stream broke after the first token: the request ends in error."""
        routed, record = self._current()
        record.failures += 1
        record.breaker.on_failure(now)
        self._stats.requests_failed += 1
        return Finished(
            finish_reason="error",
            prompt_tokens=len(self._prep.token_ids),
            cached_prompt_tokens=0,
            completion_tokens=0,
            engine_id=routed.engine_id,
            ttft_ms=max(self.ttft_ms, 0.0),
            attempts=routed.attempt,
            error=error,
        )

    def attempt_over(self) -> None:
        self._load.finish(self._prep.request_id)

    def gave_up(self) -> None:
        self._stats.requests_failed += 1
