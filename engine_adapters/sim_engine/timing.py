"""Timing model and continuous-batching scheduler of the simulated engine (pure).

One engine step runs every scheduled request once and lasts

    decode_base_ms + decode_per_seq_ms * requests_in_step + prefill_ms_per_token * prefill_tokens
    + host_load_ms_per_token * loaded_tokens

(times ``time_scale``). ``loaded_tokens`` are the prompt tokens of the
requests admitted in the step that come from the host tier (the cache's
optional offloading tier): copied to the GPU, not recomputed. Their copy is
charged to the step, as a load the step waits for. A request being scheduled is a :class:`RunningRequest`
(vLLM calls it a sequence, hence the ``*_seq*`` knob names, which follow
vLLM's flags). Scheduling follows vLLM v1: running requests first
(one decode token each, or the next chunk of an unfinished prefill), then
waiting requests in FIFO order while the step's token budget
(``max_num_batched_tokens``, chunked prefill) and ``max_num_seqs`` allow and
the admission callback (the KV cache) accepts them. A request is admitted with
its cached prefix already computed, so prefill time is proportional to the
UNCACHED prompt tokens. The step that completes a prompt also samples the
first output token (TTFT); each later step samples one more.

The defaults imitate Llama-3-8B (bf16) served by vLLM on one A100-80GB;
their derivation from the model's and the GPU's figures is in
docs/benchmarks.md (evidence: the simulated engine's timing). The host
copy: 128 KiB of KV per token over PCIe 4.0 x16 at ~25 GB/s from pinned
memory is ~5 us a token, a twentieth of its recompute.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TimingConfig:
    decode_base_ms: float = 10.0
    decode_per_seq_ms: float = 0.15
    prefill_ms_per_token: float = 0.1
    host_load_ms_per_token: float = 0.005  # copying a token's KV from the host tier
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    time_scale: float = 1.0  # 0.1 -> every duration x0.1 (ten times faster than real)

    def __post_init__(self) -> None:
        if (
            min(
                self.decode_base_ms,
                self.decode_per_seq_ms,
                self.prefill_ms_per_token,
                self.host_load_ms_per_token,
            )
            < 0
        ):
            raise ValueError("timing figures must be >= 0")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")

    def step_seconds(self, requests_in_step: int, prefill_tokens: int, loaded_tokens: int = 0) -> float:
        """Duration of one engine step, in (scaled) seconds."""
        ms = (
            self.decode_base_ms
            + self.decode_per_seq_ms * requests_in_step
            + self.prefill_ms_per_token * prefill_tokens
            + self.host_load_ms_per_token * loaded_tokens
        )
        return ms * self.time_scale / 1000.0


@dataclass(slots=True)
class RunningRequest:
    """Scheduling state of one request, from arrival until it finishes."""

    request_id: str
    prompt_len: int
    max_tokens: int
    arrival: float
    num_computed: int = 0  # prompt tokens whose KV exists (cached ones included)
    num_cached: int = 0  # prompt tokens found in the prefix cache at admission (host tier included)
    num_loaded: int = 0  # of those, the tokens loaded from the host tier
    generated: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    prefill_seconds: float = 0.0  # sum of the durations of steps that prefilled it
    finished: bool = False

    @property
    def prefill_remaining(self) -> int:
        return self.prompt_len - self.num_computed

    @property
    def num_kv_tokens(self) -> int:
        """Tokens whose KV is computed: the newest sampled token's is not yet."""
        return self.num_computed + max(0, self.generated - 1)


@dataclass(slots=True)
class StepPlan:
    """What one step runs: ``work`` pairs each scheduled request with the
    number of tokens computed for it in this step."""

    duration: float
    work: list[tuple[RunningRequest, int]] = field(default_factory=list)
    admitted: list[RunningRequest] = field(default_factory=list)
    prefill_tokens: int = 0
    loaded_tokens: int = 0  # host-tier tokens of the admitted requests, copied in this step


@dataclass(slots=True)
class Progress:
    running: RunningRequest
    sampled: bool  # a new output token was sampled for it in this step
    finished: bool  # reached max_tokens


class StepScheduler:
    """FIFO waiting queue + running set; vLLM-v1-style token-budget steps."""

    def __init__(self, config: TimingConfig) -> None:
        self.config = config
        self.waiting: deque[RunningRequest] = deque()
        self.running: dict[str, RunningRequest] = {}

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, req: RunningRequest) -> None:
        if req.prompt_len < 1 or req.max_tokens < 1:
            raise ValueError("prompt_len and max_tokens must be >= 1")
        self.waiting.append(req)

    def remove(self, request_id: str) -> RunningRequest | None:
        """Take a request out (abort or stop); returns it if it was known."""
        req = self.running.pop(request_id, None)
        if req is not None:
            return req
        for r in self.waiting:
            if r.request_id == request_id:
                self.waiting.remove(r)
                return r
        return None

    def schedule(self, now: float, admit: Callable[[RunningRequest], bool]) -> StepPlan | None:
        """Plan the next step; None when there is nothing to run.

        ``admit(req)`` reserves the request's KV blocks and sets
        ``req.num_cached``/``num_computed`` to its cached prefix, or returns
        False to keep it (and everything behind it) waiting.
        """
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        plan = StepPlan(duration=0.0)
        for req in self.running.values():
            if budget <= 0:
                break
            n = min(req.prefill_remaining, budget) if req.prefill_remaining > 0 else 1
            plan.work.append((req, n))
            if req.prefill_remaining > 0:
                plan.prefill_tokens += n
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            if not admit(req):
                break
            self.waiting.popleft()
            req.admitted_at = now
            self.running[req.request_id] = req
            plan.admitted.append(req)
            plan.loaded_tokens += req.num_loaded
            n = min(req.prefill_remaining, budget)
            plan.work.append((req, n))
            plan.prefill_tokens += n
            budget -= n
        if not plan.work:
            return None
        plan.duration = cfg.step_seconds(len(plan.work), plan.prefill_tokens, plan.loaded_tokens)
        return plan

    def complete(self, plan: StepPlan, now: float) -> list[Progress]:
        """Apply a finished step: advance prefills, sample one token where due.

        Requests removed while the step ran are skipped. Requests reaching
        ``max_tokens`` leave the running set.
        """
        out: list[Progress] = []
        for req, n in plan.work:
            if self.running.get(req.request_id) is not req:
                continue
            sampled = False
            if req.prefill_remaining > 0:
                req.num_computed += n
                req.prefill_seconds += plan.duration
                if req.prefill_remaining == 0:
                    sampled = True
            else:
                sampled = True
            if sampled:
                req.generated += 1
                if req.first_token_at is None:
                    req.first_token_at = now
            finished = req.generated >= req.max_tokens
            if finished:
                req.finished = True
                del self.running[req.request_id]
            out.append(Progress(req, sampled, finished))
        return out
