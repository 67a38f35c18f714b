"""The simulated engine's core (pure): scheduler + prefix cache + sampling.

The shell's step loop (``step_loop.py``) drives it::

    plan = core.schedule(now)            # admits requests, reserves KV blocks
    sleep(plan.duration)                 # the timing model's step duration
    outputs = core.complete(plan, now)   # one sampled token per due request
    publish(core.drain_events())         # KV events of this step, in order

Output tokens are deterministic: each request samples from its own
``random.Random(seed)``. EOS is sampled with probability ``eos_prob`` per
token unless the request asked for ``ignore_eos``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine_adapters.completion_request import Tenancy
from engine_adapters.kv_events import AllBlocksCleared, KVEvent
from engine_adapters.sim_engine.cache import NotEnoughBlocks, PrefixCache
from engine_adapters.sim_engine.config import DEFAULTS
from engine_adapters.sim_engine.timing import RunningRequest, StepPlan, StepScheduler, TimingConfig
from engine_adapters.tokenizer import EOS_ID, NUM_RESERVED, VOCAB_SIZE

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_ABORT = "abort"


@dataclass(slots=True)
class SimRequest:
    request_id: str
    prompt: list[int]
    max_tokens: int
    seed: int
    ignore_eos: bool = False
    # whose cached blocks it may use: its LoRA adapter and cache salt
    tenancy: Tenancy = field(default_factory=Tenancy)


@dataclass(slots=True)
class _Live:
    req: SimRequest
    running: RunningRequest
    rng: random.Random
    output: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # prompt + output, for the cache


@dataclass(slots=True)
class TokenOut:
    """One sampled token of one request (``finish_reason`` set on its last)."""

    request_id: str
    token_id: int
    finish_reason: str | None
    running: RunningRequest


class EngineCore:
    def __init__(
        self,
        cache: PrefixCache,
        timing: TimingConfig,
        *,
        eos_prob: float = DEFAULTS.eos_prob,
        output_vocab: Sequence[int] | None = None,
        eos_token_id: int = EOS_ID,
        max_model_len: int = DEFAULTS.max_model_len,
    ) -> None:
        if not 0.0 <= eos_prob <= 1.0:
            raise ValueError("eos_prob must be in [0, 1]")
        self.cache = cache
        self.scheduler = StepScheduler(timing)
        self.eos_prob = eos_prob
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len
        self._vocab = list(output_vocab) if output_vocab else list(range(NUM_RESERVED, VOCAB_SIZE))
        self._live: dict[str, _Live] = {}
        # Token counters since start, like vLLM's prefix_cache_{queries,hits}
        # (GPU) and external_prefix_cache_hits (here: the host tier).
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.host_hit_tokens = 0

    # --- requests ----------------------------------------------------------------

    def check(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request can never run here, or None if it can."""
        if prompt_len < 1:
            return "prompt must contain at least one token"
        if max_tokens < 1:
            return "max_tokens must be at least 1"
        if prompt_len + max_tokens > self.max_model_len:
            return (
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"the request asks for {prompt_len} prompt + {max_tokens} output tokens"
            )
        need = self.cache.blocks_needed(prompt_len + max_tokens)
        if need > self.cache.num_gpu_blocks:
            return f"request needs {need} KV blocks but the engine has only {self.cache.num_gpu_blocks}"
        return None

    def add(self, req: SimRequest, now: float) -> RunningRequest:
        err = self.check(len(req.prompt), req.max_tokens)
        if err is not None:
            raise ValueError(err)
        if req.request_id in self._live:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        running = RunningRequest(req.request_id, len(req.prompt), req.max_tokens, arrival=now)
        self.scheduler.add(running)
        self._live[req.request_id] = _Live(req, running, random.Random(req.seed), tokens=list(req.prompt))
        return running

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and release its blocks."""
        live = self._live.pop(request_id, None)
        if live is None:
            return False
        self.scheduler.remove(request_id)
        self.cache.release(request_id)
        return True

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # --- steps ----------------------------------------------------------------------

    def _admit(self, running: RunningRequest) -> bool:
        live = self._live[running.request_id]
        try:
            hit_blocks, _ = self.cache.allocate(
                running.request_id,
                live.req.prompt,
                reserve_tokens=live.req.max_tokens,
                tenancy=live.req.tenancy,
            )
        except NotEnoughBlocks:
            return False
        bs = self.cache.block_size
        running.num_loaded = self.cache.host_hit_blocks(running.request_id) * bs
        running.num_cached = hit_blocks * bs + running.num_loaded
        running.num_computed = running.num_cached
        self.prefix_query_tokens += running.prompt_len
        self.prefix_hit_tokens += hit_blocks * bs
        self.host_hit_tokens += running.num_loaded
        return True

    def schedule(self, now: float) -> StepPlan | None:
        return self.scheduler.schedule(now, self._admit)

    def complete(self, plan: StepPlan, now: float) -> list[TokenOut]:
        outs: list[TokenOut] = []
        for p in self.scheduler.complete(plan, now):
            r = p.running
            live = self._live.get(r.request_id)
            if live is None:
                continue
            finish: str | None = FINISH_LENGTH if p.finished else None
            if p.sampled:
                tok = self._sample(live)
                live.output.append(tok)
                live.tokens.append(tok)
                if tok == self.eos_token_id and not live.req.ignore_eos and finish is None:
                    finish = FINISH_STOP
                    self.scheduler.remove(r.request_id)
                    r.finished = True
                outs.append(TokenOut(r.request_id, tok, finish, r))
            self.cache.commit_full_blocks(r.request_id, live.tokens, num_tokens=r.num_kv_tokens)
            if finish is not None:
                del self._live[r.request_id]
                self.cache.release(r.request_id)
        return outs

    def _sample(self, live: _Live) -> int:
        rng = live.rng
        if not live.req.ignore_eos and self.eos_prob > 0 and rng.random() < self.eos_prob:
            return self.eos_token_id
        return self._vocab[rng.randrange(len(self._vocab))]

    # --- cache admin ------------------------------------------------------------------

    def clear_cache(self) -> AllBlocksCleared:
        return self.cache.clear()

    def drain_events(self) -> list[KVEvent]:
        return self.cache.drain_events()
