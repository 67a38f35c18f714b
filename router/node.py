"""One router node: engine registry, KV-event adapters, index, policies, proxy.

The node is the shell around the pure core. It owns the I/O (event adapters,
the HTTP proxy, the health poller) and keeps the pure parts (index, load,
policies) fed. gRPC lives in ``router/service.py``; this module also holds the
``kvmesh router`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog

from engine_adapters.event_adapter import EventAdapter
from engine_adapters.kv_delta import KvDelta, split_worker_id
from engine_adapters.proxy import (
    Chunk,
    CompletionParams,
    EngineClient,
    EngineStreamError,
    EngineUnavailable,
    Usage,
)
from engine_adapters.tokenizer import Tokenizer, get_tokenizer
from router.circuit_breaker import BreakerConfig
from router.engine_registry import EngineRecord, EngineSpec, EngineSpecError
from router.hashing import block_hashes, root_seed
from router.index import PrefixIndex
from router.load import LoadTracker
from router.policies import (
    POLICY_NAMES,
    Candidate,
    Decision,
    NoEngineAvailable,
    RouteRequest,
    make_policy,
)
from router.approx_tree import ApproxTree

log = structlog.get_logger(__name__)


class RequestError(ValueError):
    """A request the node cannot serve as asked (maps to INVALID_ARGUMENT)."""


class UnknownEngine(KeyError):
    pass


@dataclass(slots=True)
class Prepared:
    """A request's prompt, tokenized and hashed once, before any routing."""

    request_id: str
    model: str
    token_ids: list[int]
    block_size: int
    hashes: list[int]
    session_key: str | None
    policy: str


@dataclass(slots=True)
class Routed:
    request_id: str
    engine_id: str
    worker: str
    endpoint: str
    predicted_cached_blocks: int
    attempt: int
    decision: Decision


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


class RouterNode:
    def __init__(
        self,
        node_id: str,
        default_policy: str = "precise",
        tokenizers: dict[str, str] | None = None,
        max_attempts: int = 3,
        breaker: BreakerConfig | None = None,
        health_interval_s: float = 2.0,
        route_hint_ttl_s: float = 2.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if default_policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {default_policy!r}; one of {', '.join(POLICY_NAMES)}")
        self.node_id = node_id
        self.default_policy = default_policy
        self.max_attempts = max(1, max_attempts)
        self.health_interval_s = health_interval_s
        self.route_hint_ttl_s = route_hint_ttl_s
        self.clock = clock
        self.rng = random.Random(seed)
        self.index = PrefixIndex()
        self.load = LoadTracker()
        self.approx_tree = ApproxTree()
        self.engines: dict[str, EngineRecord] = {}
        self.adapters: dict[str, EventAdapter] = {}
        self.stats = NodeStats()
        self.client = EngineClient()
        self._breaker_cfg = breaker
        self._tokenizer_specs = dict(tokenizers or {})
        self._tokenizers: dict[str, Tokenizer] = {}
        self._policies: dict[str, object] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.log = log.bind(node=node_id)

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        for model, spec in self._tokenizer_specs.items():
            self._tokenizers[model] = get_tokenizer(spec)  # fail fast on a bad path
        self._tasks.append(asyncio.create_task(self._health_loop(), name="health"))

    async def stop(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for adapter in list(self.adapters.values()):
            await adapter.stop()
        self.adapters.clear()
        await self.client.close()

    # --- engines ---------------------------------------------------------------

    async def register_engine(self, spec: EngineSpec) -> EngineRecord:
        spec.validate()
        for other in self.engines.values():
            if (
                other.spec.model == spec.model
                and other.spec.block_size != spec.block_size
                and other.spec.engine_id != spec.engine_id
            ):
                raise EngineSpecError(
                    f"engine {spec.engine_id}: block_size {spec.block_size} differs from "
                    f"{other.spec.engine_id}'s {other.spec.block_size} for model {spec.model}; "
                    "engines of one model must share a block size"
                )
        if spec.engine_id in self.engines:
            await self.deregister_engine(spec.engine_id)
        record = EngineRecord.new(spec, self._breaker_cfg)
        self.engines[spec.engine_id] = record
        if spec.kv_events_endpoint:
            adapter = EventAdapter(
                engine_id=spec.engine_id,
                model=spec.model,
                kv_endpoint=spec.kv_events_endpoint,
                replay_endpoint=spec.replay_endpoint or None,
                topic=spec.topic,
                data_parallel_size=spec.data_parallel_size,
                sink=self._apply_delta,
            )
            self.adapters[spec.engine_id] = adapter
            await adapter.start()
        self.log.info("engine registered", engine=spec.engine_id, endpoint=spec.endpoint,
                      model=spec.model, kv=spec.kv_events_endpoint or None)
        return record

    async def deregister_engine(self, engine_id: str) -> bool:
        record = self.engines.pop(engine_id, None)
        if record is None:
            return False
        adapter = self.adapters.pop(engine_id, None)
        if adapter is not None:
            await adapter.stop()
        for w in record.spec.workers:
            self.index.remove_worker(w)
            self.approx_tree.remove_worker(w)
        self.log.info("engine deregistered", engine=engine_id)
        return True

    def _apply_delta(self, delta: KvDelta) -> None:
        engine_id, _ = split_worker_id(delta.worker)
        if engine_id not in self.engines:
            return  # deregistered while a batch was in flight
        self.index.apply(delta)

    # --- preparing and routing -------------------------------------------------

    def tokenizer(self, model: str) -> Tokenizer:
        tok = self._tokenizers.get(model)
        if tok is None:
            tok = self._tokenizers[model] = get_tokenizer(self._tokenizer_specs.get(model, "builtin"))
        return tok

    def resolve_model(self, model: str) -> str:
        models = {r.spec.model for r in self.engines.values()}
        if model:
            if model not in models:
                raise RequestError(f"no engine serves model {model!r}; served: {sorted(models)}")
            return model
        if len(models) == 1:
            return next(iter(models))
        if not models:
            raise NoEngineAvailable("no engines registered")
        raise RequestError(f"model is required: this node serves {sorted(models)}")

    def prepare(
        self,
        *,
        request_id: str = "",
        model: str = "",
        text: str | None = None,
        token_ids: list[int] | None = None,
        session_key: str = "",
        policy: str = "",
        lora_name: str = "",
        cache_salt: str = "",
    ) -> Prepared:
        policy = policy or self.default_policy
        if policy not in POLICY_NAMES:
            raise RequestError(f"unknown policy {policy!r}; one of {', '.join(POLICY_NAMES)}")
        model = self.resolve_model(model)
        if token_ids is None:
            if text is None:
                raise RequestError("prompt is required (text or token_ids)")
            token_ids = self.tokenizer(model).encode(text)
        if not token_ids:
            raise RequestError("prompt is empty")
        block_size = next(r.spec.block_size for r in self.engines.values() if r.spec.model == model)
        seed = root_seed(model, lora_name or None, cache_salt or None)
        return Prepared(
            request_id=request_id or uuid.uuid4().hex,
            model=model,
            token_ids=list(token_ids),
            block_size=block_size,
            hashes=block_hashes(token_ids, block_size, seed),
            session_key=session_key or None,
            policy=policy,
        )

    def _policy(self, name: str):  # noqa: ANN202 - returns a policy object
        p = self._policies.get(name)
        if p is None:
            opts = {"hints_ttl": self.route_hint_ttl_s} if name == "precise" else {}
            p = self._policies[name] = make_policy(
                name, index=self.index, approx_tree=self.approx_tree, **opts
            )
        return p

    def candidates(self, model: str, exclude: set[str], now: float) -> list[Candidate]:
        out: list[Candidate] = []
        for rec in self.engines.values():
            if rec.spec.model != model:
                continue
            usable = rec.healthy and rec.breaker.allows(now)
            for w in rec.spec.workers:
                out.append(
                    Candidate(
                        worker=w,
                        load=self.load.in_flight(w),
                        healthy=usable and w not in exclude,
                        load_tokens=self.load.in_flight_tokens(w),
                    )
                )
        return out

    def route(self, prep: Prepared, exclude: set[str] | None = None) -> Decision:
        now = self.clock()
        cands = self.candidates(prep.model, exclude or set(), now)
        req = RouteRequest(
            request_id=prep.request_id,
            block_hashes=prep.hashes,
            prompt_tokens=len(prep.token_ids),
            session_key=prep.session_key,
            block_size=prep.block_size,
        )
        policy = self._policy(prep.policy)
        decision = policy.choose(req, cands, now, self.rng)
        on_routed = getattr(policy, "on_routed", None)
        if on_routed is not None:
            on_routed(req, decision.chosen, now)
        return decision

    def route_only(self, prep: Prepared, dry_run: bool) -> Routed:
        decision = self.route(prep)
        routed = self._routed(prep, decision, attempt=1)
        if not dry_run:
            # Count the pick as load for a while: the caller sends it itself.
            self.load.start(routed.worker, prep.request_id, len(prep.token_ids), self.clock())
            asyncio.get_running_loop().call_later(
                self.route_hint_ttl_s, self.load.finish, prep.request_id
            )
        return routed

    def _routed(self, prep: Prepared, decision: Decision, attempt: int) -> Routed:
        engine_id, _ = split_worker_id(decision.chosen)
        overlap = next((c.overlap_blocks for c in decision.candidates if c.chosen), 0)
        return Routed(
            request_id=prep.request_id,
            engine_id=engine_id,
            worker=decision.chosen,
            endpoint=self.engines[engine_id].spec.endpoint,
            predicted_cached_blocks=overlap,
            attempt=attempt,
            decision=decision,
        )

    # --- generate --------------------------------------------------------------

    async def generate(
        self, prep: Prepared, params: CompletionParams
    ) -> AsyncIterator[Routed | Chunk | Finished]:
        """Route, proxy and stream; retry on another engine before the first token."""
        t0 = self.clock()
        rlog = self.log.bind(request=prep.request_id)
        self.stats.requests_total += 1
        self.stats.requests_by_policy[prep.policy] += 1
        excluded: set[str] = set()
        last_error = ""
        for attempt in range(1, self.max_attempts + 1):
            try:
                decision = self.route(prep, excluded)
            except NoEngineAvailable as e:
                last_error = str(e)
                break
            routed = self._routed(prep, decision, attempt)
            record = self.engines[routed.engine_id]
            now = self.clock()
            record.breaker.on_attempt(now)
            record.requests += 1
            yield routed
            # Load in tokens of work: the prefill this engine still has to do
            # (uncached prompt) until the first token, then one block of decode.
            uncached = max(len(prep.token_ids) - routed.predicted_cached_blocks * prep.block_size, 0)
            self.load.start(routed.worker, prep.request_id, uncached + prep.block_size, now)
            ttft_ms = -1.0
            headers = {}
            _, rank = split_worker_id(routed.worker)
            if record.spec.data_parallel_size > 1:
                headers["X-data-parallel-rank"] = str(rank)
            try:
                async for item in self.client.stream_completion(
                    routed.endpoint, prep.model, prep.token_ids, params, prep.request_id, headers
                ):
                    if isinstance(item, Chunk):
                        if ttft_ms < 0:
                            ttft_ms = (self.clock() - t0) * 1000.0
                            self.load.set_tokens(prep.request_id, prep.block_size)
                        yield item
                    elif isinstance(item, Usage):
                        record.breaker.on_success(self.clock())
                        self.stats.prompt_tokens_total += item.prompt_tokens
                        self.stats.cached_prompt_tokens_total += item.cached_tokens
                        self.stats.requests_by_engine[routed.engine_id] += 1
                        rlog.info("request done", engine=routed.engine_id, attempt=attempt,
                                  cached=item.cached_tokens, prompt=item.prompt_tokens,
                                  predicted_blocks=routed.predicted_cached_blocks)
                        yield Finished(
                            finish_reason=item.finish_reason,
                            prompt_tokens=item.prompt_tokens,
                            cached_prompt_tokens=item.cached_tokens,
                            completion_tokens=item.completion_tokens,
                            engine_id=routed.engine_id,
                            ttft_ms=max(ttft_ms, 0.0),
                            attempts=attempt,
                        )
                        return
            except EngineUnavailable as e:
                record.failures += 1
                record.breaker.on_failure(self.clock())
                excluded.add(routed.worker)
                self.stats.retries_total += 1
                last_error = str(e)
                rlog.warning("engine failed before first token; retrying", engine=routed.engine_id,
                             attempt=attempt, error=last_error)
                continue
            except EngineStreamError as e:
                record.failures += 1
                record.breaker.on_failure(self.clock())
                self.stats.requests_failed += 1
                rlog.error("stream broke after first token", engine=routed.engine_id, error=str(e))
                yield Finished("error", len(prep.token_ids), 0, 0, routed.engine_id,
                               max(ttft_ms, 0.0), attempt, error=str(e))
                return
            finally:
                self.load.finish(prep.request_id)
        self.stats.requests_failed += 1
        rlog.error("request failed on every engine", error=last_error)
        raise NoEngineAvailable(f"no engine could serve the request: {last_error}")

    # --- health ----------------------------------------------------------------

    async def _health_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.health_interval_s)
            records = list(self.engines.values())
            results = await asyncio.gather(
                *(self.client.health(r.spec.endpoint) for r in records), return_exceptions=True
            )
            for rec, ok in zip(records, results):
                healthy = ok is True
                if healthy != rec.healthy:
                    self.log.warning("engine health changed", engine=rec.spec.engine_id, healthy=healthy)
                rec.healthy = healthy


# --- the `kvmesh router` command ----------------------------------------------


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:50051", help="gRPC address HOST:PORT (port 0: any free port)")
    p.add_argument("--node-id", default="", help="node name in logs and stats (default: the listen address)")
    p.add_argument("--policy", default="precise", choices=POLICY_NAMES, help="default routing policy")
    p.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="SPEC",
        help="engine to route to, repeatable: id=e1,url=http://HOST:PORT[,kv=tcp://HOST:5557]"
        "[,replay=tcp://HOST:5558][,model=NAME][,block_size=16][,dp=1][,topic=T]",
    )
    p.add_argument(
        "--tokenizer",
        action="append",
        default=[],
        metavar="MODEL=SPEC",
        help="tokenizer for text prompts of MODEL: path to a local tokenizer.json, or 'builtin' "
        "(the simulated engine's; the default for every model)",
    )
    p.add_argument("--max-attempts", type=int, default=3, help="engines tried per request before failing")
    p.add_argument("--health-interval", type=float, default=2.0, help="seconds between engine health probes")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="console", choices=["console", "json"])
    p.add_argument("--seed", type=int, default=None, help="seed for random policy choices")


def run(args: argparse.Namespace) -> int:
    from router.logs import configure_logging
    from router.service import serve

    configure_logging(args.log_level, args.log_format)
    try:
        specs = [EngineSpec.parse(e) for e in args.engine]
        tokenizers = {}
        for t in args.tokenizer:
            model, sep, spec = t.partition("=")
            if not sep:
                raise EngineSpecError(f"--tokenizer {t!r}: want MODEL=PATH or MODEL=builtin")
            tokenizers[model] = spec
    except EngineSpecError as e:
        print(f"kvmesh router: {e}")
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass

    async def main() -> None:
        node = RouterNode(
            node_id=args.node_id or args.listen,
            default_policy=args.policy,
            tokenizers=tokenizers,
            max_attempts=args.max_attempts,
            health_interval_s=args.health_interval,
            seed=args.seed,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(node, args.listen, specs, stop, metrics_port=args.metrics_port)

    asyncio.run(main())
    return 0
