"""One router node: engine registry, KV-event adapters, index, policies, proxy.

The node is the shell around the pure core. It owns the I/O (event adapters,
the HTTP proxy, the health poller) and keeps the pure parts (index, load,
policies) fed. gRPC lives in ``router/service.py``; this module also holds the
``kvmesh router`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog

from blocks.delta import KvDelta
from blocks.hashing import block_hashes, root_seed
from blocks.workers import split_worker_id
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.event_adapter import EventAdapter
from engine_adapters.proxy import (
    Chunk,
    CompletionParams,
    EngineClient,
    EngineStreamError,
    EngineUnavailable,
    Usage,
)
from engine_adapters.tokenizer import Tokenizer, get_tokenizer
from mesh.effects import EngineAdded, EngineRemoved, MemberChanged, StartOwning, StopOwning
from mesh.core import MeshConfig, MeshCore
from mesh.membership import MembershipConfig
from mesh.transport import MeshTransport
from router.approx_tree import ApproxTree
from router.circuit_breaker import BreakerConfig
from router.engine_registry import EngineRecord, EngineSpec, EngineSpecError
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
    """A router node. Every node is a mesh node: alone it is a mesh of one.

    Engine registrations, the per-engine KV logs and load go through the
    pure :class:`mesh.core.MeshCore`; this class runs its effects: event
    adapters for the engines this node owns, index updates, peer sends.
    """

    def __init__(
        self,
        node_id: str,
        addr: str = "",
        default_policy: str = "precise",
        tokenizers: dict[str, str] | None = None,
        max_attempts: int = 3,
        breaker: BreakerConfig | None = None,
        health_interval_s: float = 2.0,
        route_hint_ttl_s: float = 2.0,
        mesh_config: MeshConfig | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        policy_opts: dict[str, dict[str, float]] | None = None,
    ) -> None:
        if default_policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {default_policy!r}; one of {', '.join(POLICY_NAMES)}")
        self.policy_opts = {k: dict(v) for k, v in (policy_opts or {}).items()}
        for name, opts in self.policy_opts.items():  # fail at start, not on the first request
            make_policy(name, index=PrefixIndex(), approx_tree=ApproxTree(), **dict(opts))
        self.node_id = node_id
        self.addr = addr or node_id
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
        # Never seeded from --seed: the mesh draws pycrdt client ids from this,
        # and two nodes (or one node before and after a restart) sharing a
        # client id would corrupt the replicated documents.
        self.core = MeshCore(node_id, self.addr, clock(), random.SystemRandom(), mesh_config)
        self.transport = MeshTransport(self.addr, self._deliver)
        self._published_load: dict[str, tuple[int, int]] = {}
        self._breaker_cfg = breaker
        self._tokenizer_specs = dict(tokenizers or {})
        self._tokenizers: dict[str, Tokenizer] = {}
        self._policies: dict[str, object] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._adapter_cmds: asyncio.Queue[tuple[str, str, object]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._closing = False
        self.log = log.bind(node=node_id)

    # --- lifecycle -------------------------------------------------------------

    async def start(self, join: list[str] | None = None) -> None:
        """Start the node's loops and join the mesh through ``join`` (seed
        addresses; none: the first node of a new mesh)."""
        for model, spec in self._tokenizer_specs.items():
            self._tokenizers[model] = get_tokenizer(spec)  # fail fast on a bad path
        self.core.join(list(join or []), self.clock())
        self._tasks += [
            asyncio.create_task(self._mesh_loop(), name="mesh"),
            asyncio.create_task(self._adapter_worker(), name="adapters"),
            asyncio.create_task(self._health_loop(), name="health"),
        ]
        self._flush()

    @property
    def ready(self) -> bool:
        return self.core.ready

    async def wait_ready(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else self.clock() + timeout
        while not self.core.ready:
            if deadline is not None and self.clock() > deadline:
                raise TimeoutError("did not receive the mesh state in time")
            await asyncio.sleep(0.02)

    async def leave(self, timeout: float = 3.0) -> None:
        """Graceful leave: hand engines over and tell the mesh, then stop sending."""
        self.core.leave(self.clock())
        self._flush()
        if not [m for m in self.core.live_members() if m.node != self.node_id]:
            return  # nobody to tell
        deadline = self.clock() + timeout
        while self.clock() < deadline and not self.core.membership.leave_done():
            await asyncio.sleep(0.05)
            self.core.tick(self.clock())
            self._flush()

    async def stop(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for adapter in list(self.adapters.values()):
            await adapter.stop()
        self.adapters.clear()
        await self.client.close()
        await self.transport.close()

    # --- the mesh ----------------------------------------------------------------

    def _deliver(self, msg: object) -> None:
        self.core.handle(msg, self.clock())
        self._flush()

    def _flush(self) -> None:
        """Carry out everything the mesh core asked for since the last flush."""
        sends = self.core.take_sends()
        if sends:
            self.transport.send(sends)
        for delta in self.core.take_index_changes():
            try:
                self.index.apply(delta)
            except ValueError as e:
                self.log.error("bad delta from the mesh; not applied", worker=delta.worker, error=str(e))
        for eff in self.core.take_effects():
            self._effect(eff)

    def _effect(self, eff: object) -> None:
        if isinstance(eff, EngineAdded):
            spec = EngineSpec(**eff.spec)
            old = self.engines.get(eff.engine_id)
            if old is None or old.spec != spec:
                self.engines[eff.engine_id] = EngineRecord.new(spec, self._breaker_cfg)
                self.log.info("engine added", engine=eff.engine_id, endpoint=spec.endpoint, model=spec.model)
        elif isinstance(eff, EngineRemoved):
            rec = self.engines.pop(eff.engine_id, None)
            if rec is not None:
                for w in rec.spec.workers:
                    self.index.remove_worker(w)
                    self.approx_tree.remove_worker(w)
                    self.load.drop_worker(w)
                self.log.info("engine removed", engine=eff.engine_id)
            self._adapter_cmds.put_nowait(("stop", eff.engine_id, None))
        elif isinstance(eff, StartOwning):
            self._adapter_cmds.put_nowait(("start", eff.engine_id, eff))
        elif isinstance(eff, StopOwning):
            self._adapter_cmds.put_nowait(("stop", eff.engine_id, None))
        elif isinstance(eff, MemberChanged):
            ev = eff.event
            self.log.info(
                "member " + ev.kind, member=ev.node, member_addr=ev.addr, incarnation=ev.incarnation
            )

    async def _mesh_loop(self) -> None:
        while not self._closing:
            now = self.clock()
            try:
                local = {
                    w: (self.load.in_flight(w), self.load.in_flight_tokens(w)) for w in self.load.snapshot()
                }
                if local != self._published_load:
                    self.core.set_local_load(local, now)
                    self._published_load = local
                self.core.tick(now)
                self._flush()
            except Exception:
                # A bug in one round must not stop gossip and failure detection
                # for good: log it loudly and run the next round.
                self.log.exception("mesh round failed")
            delay = min(max(self.core.next_deadline() - self.clock(), 0.002), 0.05)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _adapter_worker(self) -> None:
        """Start and stop event adapters one at a time, in the order asked."""
        while True:
            cmd, engine_id, eff = await self._adapter_cmds.get()
            try:
                old = self.adapters.pop(engine_id, None)
                if old is not None:
                    await old.stop()
                if cmd == "start":
                    await self._start_adapter(eff)  # type: ignore[arg-type]
            except Exception:
                self.log.exception("adapter command failed", engine=engine_id, cmd=cmd)

    async def _start_adapter(self, eff: StartOwning) -> None:
        spec = EngineSpec(**eff.spec)
        if not spec.kv_events_endpoint or eff.engine_id not in self.core.owned():
            return
        start_seqs: dict[int, int] = {}
        mappers: dict[int, BlockMapper] = {}
        pairs = getattr(eff.takeover, "mappings", None) or {}
        for worker, first in eff.takeover.resume.items():
            _, rank = split_worker_id(worker)
            start_seqs[rank] = first - 1  # the adapter takes the last applied seq
        for worker, wp in pairs.items():
            _, rank = split_worker_id(worker)
            m = BlockMapper(spec.model, worker)
            m.restore(wp)
            mappers[rank] = m
        engine_id = eff.engine_id
        adapter = EventAdapter(
            engine_id=engine_id,
            model=spec.model,
            kv_endpoint=spec.kv_events_endpoint,
            replay_endpoint=spec.replay_endpoint or None,
            topic=spec.topic,
            data_parallel_size=spec.data_parallel_size,
            sink=lambda delta: self._owner_delta(engine_id, delta),
            start_seqs=start_seqs,
            mappers=mappers,
        )
        self.adapters[engine_id] = adapter
        await adapter.start()
        self.log.info(
            "owning engine",
            engine=engine_id,
            resume=dict(eff.takeover.resume),
            mapped_blocks=sum(len(v) for v in pairs.values()),
        )

    def _owner_delta(self, engine_id: str, delta: KvDelta) -> None:
        if not self.core.engine_deltas(engine_id, [delta], self.clock()):
            self.log.warning("no longer the owner; stopping the adapter", engine=engine_id)
            self._adapter_cmds.put_nowait(("stop", engine_id, None))
        self._flush()
        self._wake.set()

    # --- engines ---------------------------------------------------------------

    async def register_engine(self, spec: EngineSpec) -> EngineRecord:
        """Register (or update) an engine on the whole mesh."""
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
        self.core.register_engine(spec.engine_id, dataclasses.asdict(spec), self.clock())
        self._flush()
        return self.engines[spec.engine_id]

    async def deregister_engine(self, engine_id: str) -> bool:
        if engine_id not in self.core.engines():
            return False
        self.core.deregister_engine(engine_id, self.clock())
        self._flush()
        return True

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
            opts: dict[str, object] = dict(self.policy_opts.get(name, {}))
            if name == "precise":
                opts["hint_overlap"] = self.core.hint_overlap
            p = self._policies[name] = make_policy(
                name, index=self.index, approx_tree=self.approx_tree, **opts
            )
        return p

    def _remote_load(self) -> dict[str, tuple[float, float]]:
        """Other nodes' in-flight (requests, tokens) per worker: the mesh sum
        minus the slot this node last published (its own load is read live)."""
        out: dict[str, tuple[float, float]] = {}
        for w, (r, t) in self.core.worker_load().items():
            own_r, own_t = self._published_load.get(w, (0, 0))
            if r - own_r > 0 or t - own_t > 0:
                out[w] = (max(r - own_r, 0.0), max(t - own_t, 0.0))
        return out

    def worker_load(self, worker: str) -> tuple[float, float]:
        """Mesh-wide in-flight (requests, tokens) of a worker."""
        rr, rt = self._remote_load().get(worker, (0.0, 0.0))
        return self.load.in_flight(worker) + rr, self.load.in_flight_tokens(worker) + rt

    def candidates(self, model: str, exclude: set[str], now: float) -> list[Candidate]:
        remote = self._remote_load()
        out: list[Candidate] = []
        for rec in self.engines.values():
            if rec.spec.model != model:
                continue
            usable = rec.healthy and rec.breaker.allows(now)
            for w in rec.spec.workers:
                rr, rt = remote.get(w, (0.0, 0.0))
                out.append(
                    Candidate(
                        worker=w,
                        load=self.load.in_flight(w) + rr,
                        healthy=usable and w not in exclude,
                        load_tokens=self.load.in_flight_tokens(w) + rt,
                    )
                )
        return out

    def route(self, prep: Prepared, exclude: set[str] | None = None, record: bool = True) -> Decision:
        """Pick a worker. With ``record`` (a real routing), policies that learn
        from routing and the mesh-wide hints remember the pick."""
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
        if not record:
            return decision
        on_routed = getattr(policy, "on_routed", None)
        if on_routed is not None:
            on_routed(req, decision.chosen, now)
        if req.block_hashes:
            # Tell the mesh too: a burst of this prefix on other nodes lands here.
            self.core.add_hint(decision.chosen, req.block_hashes, now)
            self._wake.set()  # the mesh loop sends it (and our load) in hint_push_delay
        return decision

    def route_only(self, prep: Prepared, dry_run: bool) -> Routed:
        decision = self.route(prep, record=not dry_run)
        routed = self._routed(prep, decision, attempt=1)
        if not dry_run:
            # Count the pick as load for a while: the caller sends it itself.
            self.load.start(routed.worker, prep.request_id, self._work_tokens(prep, routed), self.clock())
            asyncio.get_running_loop().call_later(self.route_hint_ttl_s, self.load.finish, prep.request_id)
        return routed

    @staticmethod
    def _work_tokens(prep: Prepared, routed: Routed) -> int:
        """Load of a request in tokens of work: the prefill the engine still has
        to do (uncached prompt) plus one block of decode. After the first token
        only the decode block is left (see ``generate``)."""
        uncached = max(len(prep.token_ids) - routed.predicted_cached_blocks * prep.block_size, 0)
        return uncached + prep.block_size

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
            self.load.start(routed.worker, prep.request_id, self._work_tokens(prep, routed), now)
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
                        rlog.info(
                            "request done",
                            engine=routed.engine_id,
                            attempt=attempt,
                            cached=item.cached_tokens,
                            prompt=item.prompt_tokens,
                            predicted_blocks=routed.predicted_cached_blocks,
                        )
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
                rlog.warning(
                    "engine failed before first token; retrying",
                    engine=routed.engine_id,
                    attempt=attempt,
                    error=last_error,
                )
                continue
            except EngineStreamError as e:
                record.failures += 1
                record.breaker.on_failure(self.clock())
                self.stats.requests_failed += 1
                rlog.error("stream broke after first token", engine=routed.engine_id, error=str(e))
                yield Finished(
                    "error",
                    len(prep.token_ids),
                    0,
                    0,
                    routed.engine_id,
                    max(ttft_ms, 0.0),
                    attempt,
                    error=str(e),
                )
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


def parse_policy_opts(items: list[str]) -> dict[str, dict[str, float]]:
    """``["precise.overlap_weight=2", ...]`` -> ``{"precise": {"overlap_weight": 2.0}}``."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        policy, dot, opt = key.partition(".")
        if not sep or not dot or not opt:
            raise ValueError(f"--policy-opt {item!r}: want POLICY.KEY=VALUE")
        if policy not in POLICY_NAMES:
            raise ValueError(
                f"--policy-opt {item!r}: unknown policy {policy!r}; one of {', '.join(POLICY_NAMES)}"
            )
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"--policy-opt {item!r}: value must be a number") from None
        out.setdefault(policy, {})[opt] = int(v) if v.is_integer() and "." not in value else v
    for policy, opts in out.items():  # unknown or out-of-range options fail here, with the policy's words
        make_policy(policy, index=PrefixIndex(), approx_tree=ApproxTree(), **dict(opts))
    return out


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--listen", default="127.0.0.1:50051", help="gRPC address HOST:PORT (port 0: any free port)"
    )
    p.add_argument(
        "--advertise",
        default="",
        help="HOST:PORT other nodes reach this one at (default: the "
        "listen address; with 0.0.0.0, this host's address)",
    )
    p.add_argument(
        "--node-id", default="", help="unique node name in the mesh (default: the advertised address)"
    )
    p.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="SEED",
        help="join the mesh through a live node, repeatable: HOST:PORT, or a DNS name:PORT that "
        "resolves to several nodes (each address is tried). Without it, this node starts a new mesh",
    )
    p.add_argument("--probe-interval", type=float, default=1.0, help="SWIM probe interval, seconds")
    p.add_argument(
        "--gossip-interval", type=float, default=0.2, help="state/membership gossip interval, seconds"
    )
    p.add_argument("--policy", default="precise", choices=POLICY_NAMES, help="default routing policy")
    p.add_argument(
        "--policy-opt",
        action="append",
        default=[],
        metavar="POLICY.KEY=VALUE",
        help="tune a policy, repeatable, e.g. precise.overlap_weight=2, "
        "cache_aware_approx.cache_threshold=0.5 (options: see docs/architecture.md)",
    )
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
        policy_opts = parse_policy_opts(args.policy_opt)
    except (EngineSpecError, ValueError) as e:
        print(f"kvmesh router: {e}")
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass

    listen = resolve_listen(args.listen)
    advertise = args.advertise or advertised_address(listen)

    async def main() -> None:
        seeds = await resolve_seeds(args.join, advertise)
        mesh_config = MeshConfig(
            membership=MembershipConfig(
                probe_interval=args.probe_interval,
                probe_timeout=min(0.5, args.probe_interval / 2),
                gossip_interval=args.gossip_interval,
            ),
        )
        node = RouterNode(
            node_id=args.node_id or advertise,
            addr=advertise,
            mesh_config=mesh_config,
            default_policy=args.policy,
            tokenizers=tokenizers,
            max_attempts=args.max_attempts,
            health_interval_s=args.health_interval,
            seed=args.seed,
            policy_opts=policy_opts,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(node, listen, specs, stop, join=seeds, metrics_port=args.metrics_port)

    asyncio.run(main())
    return 0


def resolve_listen(listen: str) -> str:
    """HOST:PORT with a concrete port (0 -> a free one), so the node can
    advertise its address before the server starts."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"kvmesh router: --listen {listen!r}: want HOST:PORT")
    if port == "0":
        with socket.socket() as s:
            s.bind((host if host not in ("0.0.0.0", "[::]") else "", 0))
            port = str(s.getsockname()[1])
    return f"{host}:{port}"


def advertised_address(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        host = socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"


async def resolve_seeds(seeds: list[str], me: str, timeout: float = 30.0) -> list[str]:
    """Expand each seed HOST:PORT into every address its name resolves to
    (a DNS name in front of several nodes), retrying while DNS is not ready."""
    loop = asyncio.get_running_loop()
    out: list[str] = []
    for seed in seeds:
        host, _, port = seed.rpartition(":")
        if not host or not port.isdigit():
            raise SystemExit(f"kvmesh router: --join {seed!r}: want HOST:PORT")
        deadline = time.monotonic() + timeout
        while True:
            try:
                infos = await loop.getaddrinfo(
                    host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM
                )
                break
            except socket.gaierror as e:
                if time.monotonic() > deadline:
                    raise SystemExit(f"kvmesh router: cannot resolve seed {seed!r}: {e}") from None
                log.warning("seed not resolvable yet; retrying", seed=seed, error=str(e))
                await asyncio.sleep(1.0)
        for info in infos:
            addr = f"{info[4][0]}:{port}"
            if addr != me and addr not in out:
                out.append(addr)
    return out
