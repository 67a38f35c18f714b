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
from dataclasses import dataclass, field, fields
from typing import cast

import structlog

from blocks.hashing import block_hashes, root_seed
from blocks.workers import split_worker_id
from engine_adapters.completion_request import EngineKind, SamplingParams, Tenancy
from engine_adapters.proxy import Usage
from engine_adapters.tokenizer import Tokenizer
from router.engine_registry import EngineRecord, EngineTable
from router.errors import ContextTooLong, NoEngineAvailable, RequestError
from router.load import LoadTracker, WorkerLoads
from router.policies import POLICY_NAMES, Candidate, Decision, RouteRequest, candidates_from

log = structlog.get_logger(__name__)

# Requests an engine finishes without ever reporting cached tokens before
# router.cached_tokens_unreported is logged: vLLM reports none for a request
# without a hit, so the first few of an engine started with the flag say
# nothing either.
UNREPORTED_WARN_AFTER = 20

__all__ = [
    "DP_RANK_HEADER",
    "Accounting",
    "Attempts",
    "ClientRequest",
    "Finished",
    "NodeStats",
    "Prepared",
    "RetryPolicy",
    "Routed",
    "candidates",
    "predicted_cached_tokens",
    "prepare",
    "request_id_problem",
    "resolve_model",
    "routed_to",
    "validate",
    "work_tokens",
]

# The header vLLM reads to pin a request to one data-parallel rank (its KV cache).
DP_RANK_HEADER = "X-data-parallel-rank"


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
    # This node's own id of the request: clients may reuse request ids, the
    # load tracker and admission may not.
    key: int = 0

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


# A client's request id goes to the engine as a header (X-Request-Id) and
# back to the client in gRPC metadata and HTTP headers: printable ASCII only
# (what both carry as is), and short.
MAX_REQUEST_ID_CHARS = 256


def request_id_problem(request_id: str) -> str | None:
    """Why a client's (non-empty) request id cannot be used, or None."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        return f"must be at most {MAX_REQUEST_ID_CHARS} characters (got {len(request_id)})"
    if not (request_id.isascii() and request_id.isprintable()):
        return "must be printable ASCII characters (space to ~)"
    return None


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
    key: int = 0,
    max_prompt_tokens: int | None = None,
) -> Prepared:
    """Check a request against the registered engines and hash its prompt.
    ``tokenizer(model)`` gives the tokenizer for a text prompt;
    ``new_request_id()`` an id for a request that has none; a prompt of
    more than ``max_prompt_tokens`` tokens is refused before it is hashed."""
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
    if max_prompt_tokens is not None and len(token_ids) > max_prompt_tokens:
        raise RequestError(f"prompt of {len(token_ids)} tokens exceeds {max_prompt_tokens}")
    block_size = engines.block_size(model)
    seed = root_seed(model, request.lora_name or None, request.cache_salt or None)
    return Prepared(
        request_id=request.request_id or new_request_id(),
        model=model,
        # A list of the client's (the gRPC shell slices one fresh per request) is not copied again.
        token_ids=token_ids if token_ids.__class__ is list else list(token_ids),
        block_size=block_size,
        hashes=block_hashes(token_ids, block_size, seed),
        session_key=request.session_key or None,
        policy=policy,
        tenancy=Tenancy(request.lora_name, request.cache_salt),
        key=key,
    )


def validate(
    prep: Prepared, params: SamplingParams, max_model_len: int | None, vocab_size: int | None
) -> None:
    """What can be checked before any engine sees the request: the sampling
    ranges, the context window (``max_model_len`` of the model's engines, when
    they reported it) and the token ids (when the model's vocabulary is known).
    Raises :class:`RequestError` or :class:`ContextTooLong`."""
    if params.max_tokens < 1:
        raise RequestError(f"max_tokens must be >= 1, got {params.max_tokens}")
    if not (params.temperature >= 0 and params.temperature == params.temperature) or params.temperature > 1e6:
        raise RequestError(f"temperature must be a number >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {params.top_p}")
    if any(not s for s in params.stop):
        raise RequestError("stop strings must not be empty")
    salt = prep.tenancy.cache_salt
    if len(salt) > MAX_SALT_CHARS or any(c in _SALT_FORBIDDEN or not c.isprintable() for c in salt):
        raise RequestError(
            f"cache_salt must be at most {MAX_SALT_CHARS} printable characters, without @ / or \\"
        )
    n = len(prep.token_ids)
    if max_model_len is not None and n + params.max_tokens > max_model_len:
        raise ContextTooLong(
            f"prompt of {n} tokens + max_tokens {params.max_tokens} exceeds the context window of "
            f"model {prep.model!r} ({max_model_len} tokens)"
        )
    if vocab_size is not None:
        top = max(prep.token_ids)
        if top >= vocab_size:
            raise RequestError(
                f"token id {top} is out of the vocabulary of {prep.model!r} ({vocab_size} ids)"
            )


# vLLM refuses longer salts and these characters (it builds keys from them).
MAX_SALT_CHARS = 128
_SALT_FORBIDDEN = frozenset("@/\\\0")


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
    engine_kind: EngineKind = "vllm"  # which request fields the engine reads


def routed_to(prep: Prepared, decision: Decision, attempt: int, engines: EngineTable) -> Routed:
    """The engine, endpoint and headers of the worker ``decision`` chose."""
    engine_id, rank = split_worker_id(decision.worker)
    spec = engines[engine_id].spec
    # Every tier's blocks: the engine loads the lower tiers' instead of computing them.
    overlap = next((c.cached_blocks for c in decision.candidates if c.chosen), 0)
    return Routed(
        request_id=prep.request_id,
        engine_id=engine_id,
        worker=decision.worker,
        endpoint=spec.endpoint,
        predicted_cached_blocks=overlap,
        attempt=attempt,
        decision=decision,
        headers={DP_RANK_HEADER: str(rank)} if spec.data_parallel_size > 1 else {},
        engine_kind=cast(EngineKind, spec.kind),  # EngineSpec.validate() checked it
    )


# --- 3. attempt ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how soon a request is tried again on another engine."""

    max_attempts: int = 3  # engines tried per request before it fails
    backoff: float = 0.02  # seconds before the second attempt; doubles each time after
    backoff_max: float = 0.5


class Attempts:
    """The retry state machine of one request: which attempt it is on, which
    workers the next choice must exclude, how long to wait before it, and
    when to give up (the budget is spent, or no worker is left to choose).

    A worker that failed the request (its fault) and one whose queue was
    full (nobody's fault) are both excluded from the next choice; when every
    attempt found a full queue, the request ends as "engines busy" rather
    than as a failure."""

    __slots__ = ("_over", "attempt", "busy", "errors", "excluded", "failed", "policy")

    def __init__(self, policy: RetryPolicy | int) -> None:
        self.policy = policy if isinstance(policy, RetryPolicy) else RetryPolicy(max_attempts=policy)
        self.attempt = 0
        self.busy = 0  # attempts that found the engine's queue full
        self.failed = 0  # attempts that ended before a first token (busy ones included)
        self.excluded: set[str] = set()
        self.errors: list[str] = []  # one line per failed attempt: worker and cause
        self._over = False

    @property
    def budget(self) -> int:
        return max(1, self.policy.max_attempts)

    @property
    def last_error(self) -> str:
        return self.errors[-1] if self.errors else ""

    def next(self) -> bool:
        """Start the next attempt; False once the request has to give up."""
        if self._over or self.attempt >= self.budget:
            return False
        self.attempt += 1
        return True

    def delay(self, rng: Callable[[], float]) -> float:
        """Seconds to wait before the current attempt (0 for the first):
        exponential, with jitter from ``rng()`` in [0, 1) so that retries
        of a burst spread out."""
        if self.attempt <= 1:
            return 0.0
        base: float = min(self.policy.backoff * 2.0 ** (self.attempt - 2), self.policy.backoff_max)
        return base * (0.5 + rng())

    def no_candidate(self, error: str) -> None:
        """The policy found no worker to choose: give up now."""
        self.errors.append(error)
        self._over = True

    def failed_before_first_token(self, worker: str, error: str) -> None:
        """Retryable: the next attempt avoids ``worker``."""
        self.excluded.add(worker)
        self.failed += 1
        self.errors.append(f"{worker}: {error}")

    def engine_busy(self, worker: str, error: str) -> None:
        """The worker's queue was full: try another, without holding it against this one."""
        self.busy += 1
        self.failed_before_first_token(worker, error)

    @property
    def all_busy(self) -> bool:
        return self.busy > 0 and self.busy == self.failed

    def give_up_message(self) -> str:
        return "no engine could serve the request: " + "; ".join(self.errors)


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
    # Routing quality of the requests an engine finished (its usage says how
    # much of the prompt it had cached), per policy and per engine:
    prompt_tokens_by_policy: Counter[str] = field(default_factory=Counter)
    cached_tokens_by_policy: Counter[str] = field(default_factory=Counter)  # engine-reported
    # what the route predicted cached (see predicted_cached_tokens)
    predicted_tokens_by_policy: Counter[str] = field(default_factory=Counter)
    predictions_by_policy: Counter[str] = field(default_factory=Counter)  # requests predicted > 0
    mispredictions_by_policy: Counter[str] = field(default_factory=Counter)  # engine reported fewer
    prompt_tokens_by_engine: Counter[str] = field(default_factory=Counter)
    cached_tokens_by_engine: Counter[str] = field(default_factory=Counter)
    # Attempts sent to each engine and those it failed: here, by engine id, as
    # the counts above, so that an engine registered again keeps counting
    # them all alike (its EngineRecord is made afresh).
    attempts_by_engine: Counter[str] = field(default_factory=Counter)
    failures_by_engine: Counter[str] = field(default_factory=Counter)
    # Requests finished by an engine that has never said how much of the
    # prompt it had cached: left out of every count above (a hit rate of 0
    # and every route a misprediction would be the engine's silence, not the
    # router's). Once it has said so, its silence is none cached (vLLM says
    # nothing of a request without a hit).
    cached_unreported_by_engine: Counter[str] = field(default_factory=Counter)
    cached_reporting_engines: set[str] = field(default_factory=set)

    def per_engine_counts(self) -> list[Counter[str]]:
        """Every count kept by engine id: the ``*_by_engine`` fields, so a
        count added to them is forgotten with the others."""
        return [getattr(self, f.name) for f in fields(self) if f.name.endswith("_by_engine")]

    def forget_engine(self, engine_id: str) -> None:
        """Drop every count kept for ``engine_id`` (the node's totals keep
        what it added to them)."""
        for counts in self.per_engine_counts():
            counts.pop(engine_id, None)
        self.cached_reporting_engines.discard(engine_id)


def predicted_cached_tokens(predicted_blocks: int, block_size: int, prompt_tokens: int) -> int:
    """The prompt tokens a route predicted cached, as an engine can report
    them: whole blocks, never the prompt's last token (vLLM and SGLang always
    compute it, so a prompt cached whole is reported one block short)."""
    return min(predicted_blocks, max(prompt_tokens - 1, 0) // block_size) * block_size


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

    __slots__ = (
        "_load",
        "_prep",
        "_record",
        "_resolved",
        "_routed",
        "_stats",
        "started",
        "streamed",
        "ttft_ms",
    )

    def __init__(self, prep: Prepared, stats: NodeStats, load: LoadTracker, now: float) -> None:
        self._prep = prep
        self._stats = stats
        self._load = load
        self._record: EngineRecord | None = None
        self._routed: Routed | None = None
        self._resolved = False  # the attempt's outcome reached the engine's breaker
        self.started = now
        self.ttft_ms = -1.0  # of the current attempt, from the start of the request
        self.streamed = 0  # tokens of the current attempt sent to the client
        stats.requests_total += 1
        stats.requests_by_policy[prep.policy] += 1

    def _current(self) -> tuple[Routed, EngineRecord]:
        if self._routed is None or self._record is None:
            raise RuntimeError("no attempt in progress")
        return self._routed, self._record

    def attempt(self, routed: Routed, record: EngineRecord, now: float) -> None:
        self._routed, self._record = routed, record
        self.ttft_ms = -1.0
        self.streamed = 0
        self._resolved = False
        record.breaker.on_attempt(now)
        self._stats.attempts_by_engine[record.spec.engine_id] += 1
        if routed.attempt > 1:  # tried elsewhere after a failure: a retry (the last failure is none)
            self._stats.retries_total += 1

    def sent(self) -> None:
        routed, _ = self._current()
        self._load.start(
            routed.worker, self._prep.key, work_tokens(self._prep, routed.predicted_cached_blocks)
        )

    def token(self, now: float, count: int = 1) -> None:
        """A chunk of ``count`` tokens arrived; the first one ends the prefill."""
        self.streamed += count
        if self.ttft_ms < 0:
            self.ttft_ms = (now - self.started) * 1000.0
            self._load.set_tokens(self._prep.key, self._prep.block_size)

    def finished(self, usage: Usage, now: float) -> Finished:
        routed, _ = self._current()
        self._engine_answered(now)
        stats = self._stats
        stats.requests_by_engine[routed.engine_id] += 1
        engine = routed.engine_id
        if not usage.cached_unreported:
            stats.cached_reporting_engines.add(engine)
        if usage.cached_unreported and engine not in stats.cached_reporting_engines:
            self._unreported(engine)
        else:
            stats.prompt_tokens_total += usage.prompt_tokens
            stats.cached_prompt_tokens_total += usage.cached_tokens
            self._quality(routed, usage)
        return Finished(
            finish_reason=usage.finish_reason,
            prompt_tokens=usage.prompt_tokens,
            cached_prompt_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            engine_id=routed.engine_id,
            ttft_ms=max(self.ttft_ms, 0.0),
            attempts=routed.attempt,
        )

    def _quality(self, routed: Routed, usage: Usage) -> None:
        """Predicted against engine-reported cached tokens. A route is
        mispredicted when the engine held less of the prompt than predicted."""
        stats, policy, engine = self._stats, self._prep.policy, routed.engine_id
        predicted = predicted_cached_tokens(
            routed.predicted_cached_blocks, self._prep.block_size, usage.prompt_tokens
        )
        stats.prompt_tokens_by_policy[policy] += usage.prompt_tokens
        stats.cached_tokens_by_policy[policy] += usage.cached_tokens
        stats.prompt_tokens_by_engine[engine] += usage.prompt_tokens
        stats.cached_tokens_by_engine[engine] += usage.cached_tokens
        if predicted:
            stats.predicted_tokens_by_policy[policy] += predicted
            stats.predictions_by_policy[policy] += 1
            if usage.cached_tokens < predicted:
                stats.mispredictions_by_policy[policy] += 1

    def _unreported(self, engine: str) -> None:
        unreported = self._stats.cached_unreported_by_engine
        unreported[engine] += 1
        # not at once: a reporting engine's cold requests say nothing either
        if unreported[engine] == UNREPORTED_WARN_AFTER:
            log.warning(
                "router.cached_tokens_unreported",
                engine=engine,
                hint="the engine does not report cached prompt tokens, so hit rates and mispredictions "
                "leave it out: start vLLM with --enable-prompt-tokens-details, SGLang with "
                "--enable-cache-report",
                requests=UNREPORTED_WARN_AFTER,
            )

    def _engine_answered(self, now: float) -> None:
        """The engine did its part (whatever became of the request)."""
        _, record = self._current()
        record.breaker.on_success(now)
        self._resolved = True

    def _engine_failed(self, now: float) -> None:
        _, record = self._current()
        self._stats.failures_by_engine[record.spec.engine_id] += 1
        record.breaker.on_failure(now)
        self._resolved = True

    def unavailable(self, now: float) -> None:
        """The engine failed before the first token; the request may be retried."""
        self._engine_failed(now)

    def busy(self, now: float) -> None:
        """The engine's queue was full; another engine may be tried."""
        self._engine_answered(now)

    def rejected(self, now: float) -> None:
        """The engine refused the request itself: the client's mistake, not the engine's."""
        self._engine_answered(now)

    def broken(self, error: str, now: float) -> Finished:
        """The stream broke after the first token: the request ends in error."""
        routed, _ = self._current()
        self._engine_failed(now)
        self._stats.requests_failed += 1
        return Finished(
            finish_reason="error",
            prompt_tokens=len(self._prep.token_ids),
            cached_prompt_tokens=0,
            completion_tokens=self.streamed,  # what the client got before the stream broke
            engine_id=routed.engine_id,
            ttft_ms=max(self.ttft_ms, 0.0),
            attempts=routed.attempt,
            error=error,
        )

    def stalled(self, error: str, now: float) -> Finished:
        """The engine sent nothing for too long after the first token."""
        return self.broken(error, now)

    def attempt_over(self) -> None:
        self._load.finish(self._prep.key)
        if self._record is not None and not self._resolved:
            # Cut short (the client went away): no verdict on the engine, but
            # a half-open breaker must not wait for this probe forever.
            self._record.breaker.on_abandoned()
            self._resolved = True

    def gave_up(self) -> None:
        self._stats.requests_failed += 1
