"""One router node: the parts of a node, composed.

- :mod:`router.mesh_shell`: the mesh core and its transport (every node is a
  mesh node; alone it is a mesh of one). Effects come back here.
- :mod:`router.adapters`: the KV-event adapters of the engines this node owns.
- :mod:`router.health`: the engine health poller.
- :mod:`router.discovery_shell`: engines of DNS names (``--engines-from-dns``).
- :class:`router.engine_registry.EngineTable`: the registered engines.
- :mod:`router.request_path`: the pure core of a request (prepare, choose,
  attempt, account); :meth:`RouterNode.generate` streams around it.
- index, load and policies: the pure parts routing reads.

gRPC lives in ``router/service.py`` (which imports this module, never the
reverse); the ``kvmesh router`` command in ``kvmesh/cli/router.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection
from typing import Any

import structlog

from engine_adapters.completion_request import SamplingParams
from engine_adapters.proxy import (
    Chunk,
    DeadlineReached,
    EngineBusy,
    EngineClient,
    EngineRejected,
    EngineStalled,
    EngineStreamError,
    EngineUnavailable,
)
from engine_adapters.tokenizer import Tokenizer, get_tokenizer
from mesh.effects import Effect, EngineAdded, EngineRemoved, StartOwning, StopOwning
from mesh.engine_log.packed import IndexChange, change_blocks, heads_of
from router import cert_validity
from router.adapters import AdapterLifecycle, events_source
from router.admission import AdmissionGate
from router.approx_tree import ApproxTree
from router.circuit_breaker import CLOSED, OPEN
from router.config import RouterConfig
from router.discovery_shell import EngineDiscovery, Resolver, resolve_ipv4
from router.engine_registry import EngineRecord, EngineSpec, EngineSpecError, EngineTable
from router.errors import (
    ContextTooLong,
    DeadlineExceeded,
    Draining,
    EnginesBusy,
    NoEngineAvailable,
    Overloaded,
    RequestRejected,
    RouterError,
    StreamFailed,
)
from router.health import HealthPoller
from router.load import MeshLoad, WorkerLoads
from router.loop_lag import LoopLag, Stall, watch_loop
from router.mesh_shell import MeshShell
from router.metrics import MetricsRecorder, RequestTimer
from router.native_index import new_index
from router.outcomes import Outcomes
from router.policies import Decision, Policy, make_policy
from router.request_path import (
    Accounting,
    Attempts,
    ClientRequest,
    Finished,
    NodeStats,
    Prepared,
    Routed,
    candidates,
    prepare,
    resolve_model,
    routed_to,
    validate,
    work_tokens,
)
from router.tracing import Span, TraceContext, make_tracer

__all__ = ["RouterNode"]

log = structlog.get_logger(__name__)

# What a Route call's prompt is checked with: the least a Generate asks.
_ROUTE_ONLY_PARAMS = SamplingParams(max_tokens=1)
# How long a removed engine's counters (attempts, failures, tokens) are kept
# for it to be registered again: an engine restarted or briefly gone from
# DNS keeps counting; one gone for good is forgotten.
ENGINE_COUNTERS_KEPT_S = 3600.0


def _hint_known(decision: Decision, prompt_blocks: int) -> bool:
    """The mesh already places the whole prompt on the chosen worker: precise
    read every block there from the mesh-wide index or a live route hint, so
    another hint would tell no node anything (and cost each of them a walk
    over its blocks). Other policies' overlaps are their own (a per-node
    tree), never a reason to keep quiet."""
    if decision.policy != "precise":
        return False
    chosen = next((c for c in decision.candidates if c.chosen), None)
    return chosen is not None and chosen.overlap_blocks >= prompt_blocks


def cert_expiry(cfg: RouterConfig) -> dict[str, float]:
    """When each certificate file of ``cfg`` ends, by its metric label (a
    served certificate's leaf; a CA file's last authority). The files were
    checked before the node was made (``check_files``): one that cannot be
    read now has no sample rather than stopping the node."""
    out = {}
    for f in cfg.certificates():
        try:
            certs = cert_validity.read_dates(f.path)
        except (OSError, ValueError):
            continue
        if certs:
            out[f.label] = max(c.not_after for c in certs) if f.ca else certs[0].not_after
    return out


class RouterNode:
    def __init__(
        self,
        config: RouterConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        dns_resolver: Resolver = resolve_ipv4,  # engine discovery's (tests give their own)
    ) -> None:
        cfg = self.config = config or RouterConfig()
        self.api_addr = cfg.advertise or cfg.listen  # what clients dial
        self.addr = cfg.mesh_addr  # what the other nodes dial
        self.node_id = cfg.node_id or self.api_addr
        self.clock = clock
        self.rng = random.Random(cfg.seed)
        self.log = log.bind(node=self.node_id)
        self.index = new_index(cfg.max_index_blocks)  # native when built (router/native_index.py)
        self.approx_tree = ApproxTree()
        self.load = MeshLoad()
        self.engines = EngineTable(cfg.breaker, self._breaker_changed)
        self.stats = NodeStats()
        self._removed_at: dict[str, float] = {}  # engine id -> when it was removed (self.clock)
        self.cert_expiry = cert_expiry(cfg)
        self.client = EngineClient(cfg.engine_client)
        self.mesh = MeshShell(
            self.node_id,
            self.addr,
            cfg.mesh,
            clock,
            self.index,
            self.load,
            self._effect,
            self.log,
            cfg.transport,
        )
        self.core = self.mesh.core
        # An owned engine's frames reach its log as the native mapper's packed
        # entries when the mesh is packed (a native index), else as KvDeltas;
        # the frames of one burst are written as one entry (_flush_owned).
        self._owned_pending: dict[str, list[IndexChange]] = {}
        self._owned_blocks = 0
        self._owned_flush: asyncio.Handle | None = None
        self.adapters = AdapterLifecycle(
            lambda e: e in self.core.owned(),
            self._owner_delta,
            self.log,
            dataclasses.replace(cfg.event_adapter, packed=self.core.config.packed_entries),
            self.node_id,
        )
        self.health = HealthPoller(
            self.engines,
            self.client.health,
            cfg.health_interval,
            self.log,
            self.client.served_models,
            cfg.health_down_after,
            self._engine_went_down,
        )
        self.admission = AdmissionGate(cfg.admission)
        self.outcomes = Outcomes()
        # Per-attempt lines (an engine's failure or full queue), a few a second
        # per event and engine: under overload every attempt would log one.
        self._attempt_logs = Outcomes()
        self._attempt_levels: dict[str, Any] = {}  # event -> the log method its lines go to
        self.metrics = MetricsRecorder()  # histograms observed on the request path (router/metrics.py)
        self.loop_lag = LoopLag(cfg.loop_lag)  # how late the event loop runs what is due (router/loop_lag.py)
        self.tracer = make_tracer(cfg.tracing, self.node_id)  # spans only with --otlp-endpoint
        self.draining = False
        # A second stop signal while draining: stop waiting for the requests in flight.
        self.drain_cut_short = False
        self.stopped_for = ""  # why the node stopped on its own (its node id is another live member's)
        self._keys = itertools.count(1)
        self._tokenizers: dict[str, Tokenizer] = {}
        self._tokenize_slot = asyncio.Semaphore(1)  # long prompts tokenized off the loop, one at a time
        self._tokenize_waiting = 0  # long prompts waiting for the slot (bounded as the admission queue)
        self._policies: dict[str, Policy] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # --engines-from-dns: engines of DNS names, registered and removed mesh-wide.
        self.discovery: EngineDiscovery | None = None
        if cfg.discovery.names:
            self.discovery = EngineDiscovery(
                cfg.discovery,
                self.register_engine,
                self.deregister_engine,
                self.core.engines,
                lambda engine_id: self.core.owner_of(engine_id) == self.node_id,
                lambda: self.ready,
                self.log,
                dns_resolver,
                clock,
            )

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self, join: list[str] | None = None) -> None:
        """Start the node's loops and join the mesh through ``join`` (seed
        addresses; none: the first node of a new mesh)."""
        self.load_tokenizers()
        self.core.join(list(join or []), self.clock())
        self._tasks += [
            asyncio.create_task(self.mesh.run(), name="mesh"),
            asyncio.create_task(self.adapters.run(), name="adapters"),
            asyncio.create_task(self.health.run(), name="health"),
            asyncio.create_task(watch_loop(self.loop_lag, self._loop_stalled), name="loop_lag"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
            asyncio.create_task(
                self.mesh.refresh_seeds(
                    self.config.join, self.config.seed_resolve_retry, self.config.seed_refresh_interval
                ),
                name="seeds",
            ),
        ]
        if self.discovery is not None:
            self._tasks.append(asyncio.create_task(self.discovery.run(), name="discovery"))
        self.mesh.flush()

    def _loop_stalled(self, stall: Stall) -> None:
        self.log.warning(
            "router.loop_stalled",
            lag_ms=round(stall.lag * 1e3, 1),
            stalls_not_logged=stall.not_logged,
            stall_ms=self.config.loop_lag.stall * 1e3,
        )

    def load_tokenizers(self) -> None:
        """Load every configured tokenizer not loaded yet: a bad path raises
        :class:`TokenizerError` here, before the node serves anything
        (``serve`` calls this before it binds a port)."""
        for model in self.config.tokenizers:
            self.tokenizer(model)

    @property
    def ready(self) -> bool:
        """Joined the mesh and applied a peer's full state (or alone)."""
        return self.core.ready

    async def leave(self) -> None:
        """Graceful leave: hand engines over and tell the mesh, then stop sending."""
        self._flush_owned()  # what the adapters already consumed goes in before the handover
        await self.mesh.leave(self.config.leave_timeout)

    async def stop(self) -> None:
        if self._owned_flush is not None:
            self._owned_flush.cancel()  # a next owner replays what was not written from the engine
            self._owned_flush = None
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.adapters.close()
        await self.client.close()
        await self.mesh.close()
        if self.tracer.on:
            await asyncio.to_thread(self.tracer.shutdown)  # exports the spans still batched

    # --- what the mesh asks for ------------------------------------------------------------------

    def _respecified(self, old: EngineSpec, spec: EngineSpec) -> None:
        """An engine registered again with another events source: its old
        blocks are another cache's. The owner clears them through the log
        and restarts its adapter (router/adapters.py); every node forgets the
        workers the new spec no longer has."""
        gone = set(old.workers) - set(spec.workers)
        for w in sorted(gone):
            self.index.remove_worker(w)
            self.approx_tree.remove_worker(w)
            self.load.local.drop_worker(w)
        if spec.engine_id in self.core.owned():
            self.adapters.respecify(spec.engine_id, spec, tuple(old.workers))

    def _log_attempt(self, say: Any, event: str, where: dict[str, Any], error: str) -> None:
        """One attempt's failure, a few lines a second per event and engine at
        most, the next one saying how many were not printed."""
        self._attempt_levels[event] = say  # a few kinds: what their unlogged count is said at
        log_it, suppressed = self._attempt_logs.record(event, where["engine"], self.clock())
        if log_it:
            say(event, **where, error=error, suppressed_before=suppressed)

    async def _housekeeping(self) -> None:
        """Every logging window: :meth:`say_unlogged`, and the counters of
        engines removed long enough ago forgotten (:meth:`_forget_removed`)."""
        period = min(self.outcomes.period, self._attempt_logs.period)
        while True:
            await asyncio.sleep(period)
            now = self.clock()
            self.say_unlogged(now)
            self._forget_removed(now)

    def say_unlogged(self, now: float) -> None:
        """How many lines of each kind the windows over by ``now`` left out
        and no later line of that kind said (a burst of failed calls or
        attempts that does not recur: router/outcomes.py), at the level
        its own lines have."""
        for status, reason, lines in self.outcomes.unlogged(now):
            self.log.warning("router.calls_unlogged", status=status, reason=reason, lines=lines)
        for event, engine, lines in self._attempt_logs.unlogged(now):
            say = self._attempt_levels.get(event, self.log.warning)
            say("router.attempts_unlogged", kind=event, engine=engine, lines=lines)

    def _engine_went_down(self, rec: EngineRecord) -> None:
        """This node's health checks marked an engine down: its requests that
        have had no token yet (queued, or stuck on a hung engine) are ended as
        unavailable there and tried on another engine, rather than waiting
        out the first-token timeout (nothing was produced: safe to retry).
        Only where another healthy engine serves the model: with none (one
        engine a model; every probe late because this node's own loop
        stalled) they would only fail sooner, and may yet be served."""
        others = [r for r in self.engines.of_model(rec.spec.model) if r is not rec and r.healthy]
        if not others:
            return
        moved = self.client.abort_waiting(rec.spec.endpoint, "marked down by this node's health checks")
        if moved:
            self.log.warning("router.engine_down_requests_moved", engine=rec.spec.engine_id, requests=moved)

    def _breaker_changed(self, engine_id: str, old: str, new: str, failures: int) -> None:
        """An engine's breaker on this node changed state: open takes it out
        of this node's rotation (other nodes keep breakers of their own)."""
        if new == OPEN:
            self.log.warning(
                "router.engine_breaker_opened",
                engine=engine_id,
                was=old,
                failures=failures,
                hint="this node sends it no request until a probe after the cooldown succeeds",
            )
        elif new == CLOSED:
            self.log.info("router.engine_breaker_closed", engine=engine_id, was=old)
        else:
            self.log.info("router.engine_breaker_half_open", engine=engine_id, was=old)

    def _effect(self, eff: Effect) -> None:
        if isinstance(eff, EngineAdded | EngineRemoved):
            self._forget_removed(self.clock())  # first: one back after the time starts from zero
        self._engine_effect(eff)
        if isinstance(eff, EngineRemoved):
            self._removed_at[eff.engine_id] = self.clock()
        elif isinstance(eff, EngineAdded) and self.engines.get(eff.engine_id) is not None:
            self._removed_at.pop(eff.engine_id, None)  # back in time (a refused spec is not back)

    def _forget_removed(self, now: float) -> None:
        """Drop the per-engine counters of engines removed at least
        ``ENGINE_COUNTERS_KEPT_S`` ago and not registered since: with DNS
        discovery every address an engine ever had is an engine id, and
        their counters would grow for as long as the node runs. Within that
        time, an engine registered again keeps counting where it stopped.
        Run on every engine change and every second (``_housekeeping``)."""
        for engine_id, at in list(self._removed_at.items()):
            if now - at >= ENGINE_COUNTERS_KEPT_S:
                del self._removed_at[engine_id]
                if self.engines.get(engine_id) is None:
                    self.stats.forget_engine(engine_id)
                    self._attempt_logs.forget_reason(engine_id)

    def engines_remembered(self) -> set[str]:
        """Engines whose counters this node keeps: those registered, and those
        removed less than ``ENGINE_COUNTERS_KEPT_S`` ago."""
        return set(self.engines) | set(self._removed_at)

    def _engine_effect(self, eff: Effect) -> None:
        if isinstance(eff, EngineAdded):
            try:
                spec = EngineSpec(**eff.spec).validate()
            except (TypeError, EngineSpecError) as e:  # from another node: never trusted blindly
                self.log.error("router.engine_spec_refused", engine=eff.engine_id, error=str(e))
                return
            old = self.engines.get(eff.engine_id)
            if self.engines.put(spec):
                self.log.info(
                    "router.engine_added",
                    engine=eff.engine_id,
                    endpoint=spec.endpoint,
                    model=spec.model,
                    kv_events=spec.kv_events_endpoint or None,
                )
                if not spec.kv_events_endpoint:
                    # Allowed (an engine that publishes no KV events is routed by load),
                    # but precise routing cannot see its cache: a warning where it is the
                    # node's policy, else a note.
                    say = self.log.warning if self.config.policy == "precise" else self.log.info
                    say(
                        "router.engine_without_kv_events",
                        engine=eff.engine_id,
                        hint="give it kv=tcp://HOST:PORT (and replay=) for precise routing",
                    )
            if old is not None and events_source(old.spec) != events_source(spec):
                self._respecified(old.spec, spec)
        elif isinstance(eff, EngineRemoved):
            rec = self.engines.pop(eff.engine_id)
            if rec is not None:
                for w in rec.spec.workers:
                    self.index.remove_worker(w)
                    self.approx_tree.remove_worker(w)
                    self.load.local.drop_worker(w)
                self.log.info("router.engine_removed", engine=eff.engine_id)
            self.adapters.stop(eff.engine_id)
        elif isinstance(eff, StartOwning):
            self.adapters.start(eff)
        elif isinstance(eff, StopOwning):
            self.adapters.stop(eff.engine_id)

    def _owner_delta(self, engine_id: str, change: IndexChange) -> None:
        """An owned engine's adapter mapped a frame: into the engine's log.

        The adapter drains a burst of queued frames without yielding, so
        the changes wait for the end of the burst (or for
        ``MeshConfig.max_entry_blocks``) and go in as one entry per engine:
        one log write, one gossip item.
        """
        pend = self._owned_pending.get(engine_id)
        if pend is None:
            self._owned_pending[engine_id] = [change]
        else:
            pend.append(change)
        self._owned_blocks += change_blocks(change)
        if self._owned_blocks >= self.config.mesh.max_entry_blocks:
            self._flush_owned()
        elif self._owned_flush is None:
            self._owned_flush = asyncio.get_running_loop().call_soon(self._flush_owned)

    def _flush_owned(self) -> None:
        if self._owned_flush is not None:
            self._owned_flush.cancel()
            self._owned_flush = None
        pending, self._owned_pending = self._owned_pending, {}
        self._owned_blocks = 0
        now = self.clock()
        for engine_id, changes in pending.items():
            try:
                owned = self.core.engine_deltas(engine_id, changes, now)
            except ValueError:  # LogError: nothing of the burst was written
                owned = self._append_one_by_one(engine_id, changes, now)
            if not owned:
                worker, seq = next(iter(heads_of(changes[0])))
                self.log.warning("router.ownership_lost", engine=engine_id, worker=worker, seq=seq)
                self.adapters.stop(engine_id)
        self.mesh.flush()
        self.mesh.wake()

    def _append_one_by_one(self, engine_id: str, changes: list[IndexChange], now: float) -> bool:
        """A burst the log refused: each frame on its own, so only the bad
        ones are lost (logged)."""
        for ch in changes:
            try:
                if not self.core.engine_deltas(engine_id, [ch], now):
                    return False
            except ValueError as e:
                worker, seq = next(iter(heads_of(ch)))
                self.log.error(
                    "router.owner_append_failed", engine=engine_id, worker=worker, seq=seq, error=str(e)
                )
        return True

    # --- engines ---------------------------------------------------------------------------------

    async def register_engine(self, spec: EngineSpec) -> EngineRecord:
        """Register (or update) an engine on the whole mesh."""
        spec.validate()
        self.engines.check_compatible(spec)
        fields = dataclasses.asdict(spec)
        if not spec.source:  # registered by hand: the registry entry of nodes that predate sources
            del fields["source"]
        self.core.register_engine(spec.engine_id, fields, self.clock())
        self.mesh.flush()
        return self.engines[spec.engine_id]

    async def deregister_engine(self, engine_id: str) -> bool:
        if engine_id not in self.core.engines():
            return False
        self.core.deregister_engine(engine_id, self.clock())
        self.mesh.flush()
        return True

    def loads(self) -> WorkerLoads:
        """Mesh-wide in-flight requests and tokens per worker."""
        return self.load.view(self.core.worker_load())

    # --- routing ---------------------------------------------------------------------------------

    def tokenizer(self, model: str) -> Tokenizer:
        tok = self._tokenizers.get(model)
        if tok is None:
            spec = self.config.tokenizers.get(model, self.config.default_tokenizer)
            tok = self._tokenizers[model] = get_tokenizer(spec)
        return tok

    def prepare(self, request: ClientRequest) -> Prepared:
        """Check and hash a request (see :func:`router.request_path.prepare`)."""
        if self.draining:
            raise Draining("this node is draining: send the request to another node")
        return prepare(
            request,
            self.engines,
            self.tokenizer,
            self.config.policy,
            self.new_request_id,
            key=next(self._keys),
            max_prompt_tokens=self.config.max_prompt_tokens,
        )

    async def prepare_async(self, request: ClientRequest) -> Prepared:
        """:meth:`prepare`, with a text prompt longer than
        ``config.thread_tokenize_chars`` tokenized on a worker thread, one
        such prompt at a time: a long one takes long enough to stall the
        event loop (other calls, KV events, the mesh's probes). Those waiting
        their turn are not yet admitted (admission needs the prompt's
        blocks), so they are bounded as its queue is (``--max-queue``)."""
        text = request.text
        if text is None or request.token_ids is not None or len(text) <= self.config.thread_tokenize_chars:
            return self.prepare(request)
        if self.draining:
            raise Draining("this node is draining: send the request to another node")
        tok = self.tokenizer(resolve_model(self.engines.models(), request.model))
        if self._tokenize_waiting >= max(self.config.admission.max_queue, 1):
            raise Overloaded(
                f"{self._tokenize_waiting} long prompts already wait to be tokenized on node {self.node_id}"
            )
        self._tokenize_waiting += 1
        try:
            await self._tokenize_slot.acquire()
        finally:
            self._tokenize_waiting -= 1
        try:
            work = asyncio.get_running_loop().run_in_executor(None, tok.encode, text)
        except BaseException:
            self._tokenize_slot.release()
            raise
        # The slot is the thread's: a client that goes away does not stop it.
        work.add_done_callback(lambda _: self._tokenize_slot.release())
        ids = await asyncio.shield(work)
        return self.prepare(dataclasses.replace(request, text=None, token_ids=ids))

    def new_request_id(self) -> str:
        """An id for a request whose client gave none (or one it cannot use)."""
        return uuid.uuid4().hex

    def validate(self, prep: Prepared, params: SamplingParams) -> None:
        """What can be checked before routing (see :func:`router.request_path.validate`)."""
        vocab = None
        if prep.model in self.config.tokenizers:  # a real tokenizer: its vocabulary is the model's
            vocab = getattr(self.tokenizer(prep.model), "vocab_size", None)
        validate(prep, params, self.engines.max_model_len(prep.model), vocab)

    def request_ended(
        self,
        status: str,
        reason: str,
        request_id: str,
        message: str,
        timer: RequestTimer | None,
        **where: str,
    ) -> None:
        """Count how a request ended (by status and reason, in the outcomes
        and the metrics) and log it, a few a second (router/outcomes.py);
        ``where`` adds context to the log line (the API it came by)."""
        now = self.clock()
        log_it, suppressed = self.outcomes.record(status, reason, now)
        if timer is not None:
            self.metrics.ended(timer, status, now)
        if log_it:
            self.log.warning(
                "router.request_ended",
                status=status,
                reason=reason,
                request_id=request_id,
                error=message,
                suppressed_before=suppressed,
                **where,
            )
        elif status == "CANCELLED":
            # The client's own doing, not a warning: a line per request, as
            # a finished one has (router.request_done).
            self.log.info(
                "router.request_ended", status=status, reason=reason, request_id=request_id, **where
            )

    def in_flight(self) -> int:
        """Generate requests this node has on engines or queued for them."""
        return self.admission.admission.in_flight + self.admission.admission.queued

    def _policy(self, name: str) -> Policy:
        p = self._policies.get(name)
        if p is None:
            opts: dict[str, Any] = dict(self.config.policy_opts.get(name, {}))  # checked by RouterConfig
            p = self._policies[name] = make_policy(
                name, self.index, self.approx_tree, self.core.hint_overlap, **opts
            )
        return p

    def route(self, prep: Prepared, exclude: Collection[str] = (), record: bool = True) -> Decision:
        """Pick a worker. With ``record`` (a real routing), policies that learn
        from routing and the mesh's route hints remember the pick."""
        now = self.clock()
        cands = candidates(self.engines, prep.model, exclude, self.loads(), now)
        req = prep.route_request()
        policy = self._policy(prep.policy)
        decision = policy.choose(req, cands, now, self.rng)
        self.metrics.decided(prep.policy, self.clock() - now)
        if record:
            policy.on_routed(req, decision.worker, now)
            if req.block_hashes:
                if not _hint_known(decision, len(req.block_hashes)):
                    # Tell the mesh too: a burst of this prefix on other nodes lands here.
                    self.core.add_hint(decision.worker, req.block_hashes, now)
                self.mesh.wake()  # the mesh loop sends it (and our load) in hint_push_delay
        return decision

    def route_only(self, prep: Prepared, dry_run: bool, trace: TraceContext | None = None) -> Routed:
        """The Route RPC: choose without sending. A real pick counts as load
        for ``route_load_ttl``: the caller sends the request itself. The
        prompt is checked as Generate checks it (with one token to generate):
        a pick for a request no engine would take is no answer."""
        span = self.tracer.start("kvmesh.route", trace, "server", request_id=prep.request_id, dry_run=dry_run)
        try:
            self.validate(prep, _ROUTE_ONLY_PARAMS)
            routed = routed_to(prep, self.route(prep, record=not dry_run), 1, self.engines)
        except RouterError as e:
            span.fail(e.grpc_code, e.reason, str(e))
            raise
        finally:
            span.end()
        if not dry_run:
            local = self.load.local
            # Keyed by this node's own request key: clients may reuse request ids.
            local.start(routed.worker, prep.key, work_tokens(prep, routed.predicted_cached_blocks))
            asyncio.get_running_loop().call_later(self.config.route_load_ttl, local.finish, prep.key)
        return routed

    async def generate(
        self,
        prep: Prepared,
        params: SamplingParams,
        deadline: float | None = None,
        trace: TraceContext | None = None,
    ) -> AsyncGenerator[Routed | Chunk | Finished, None]:
        """Admit, route, proxy and stream; retry on another worker before the
        first token. ``deadline`` (``clock()`` time) is the client's,
        ``trace`` its W3C trace context (router/tracing.py).

        Ends normally after a :class:`Finished`, or raises a
        :class:`router.errors.RouterError` that says why (after a
        ``Finished`` naming the error, when tokens were already sent)."""
        span = self.tracer.start(
            "kvmesh.request",
            trace,
            "server",
            request_id=prep.request_id,
            model=prep.model,
            policy=prep.policy,
            prompt_tokens=len(prep.token_ids),
            node=self.node_id,
        )
        try:
            self.validate(prep, params)
            await self.admission.enter(prep.key)
            try:
                async for item in self._attempts(prep, params, deadline, span):
                    yield item
            finally:
                self.admission.leave(prep.key)
        except RouterError as e:
            span.fail(e.grpc_code, e.reason, str(e))
            raise
        except (asyncio.CancelledError, GeneratorExit):
            span.fail("CANCELLED", "client")
            raise
        finally:
            span.end()

    async def _attempts(
        self, prep: Prepared, params: SamplingParams, deadline: float | None, span: Span
    ) -> AsyncIterator[Routed | Chunk | Finished]:
        acct = Accounting(prep, self.stats, self.load.local, self.clock())
        tries = Attempts(self.config.retry)
        while tries.next():
            pause = tries.delay(self.rng.random)
            if pause:
                if deadline is not None and self.clock() + pause >= deadline:
                    break
                await asyncio.sleep(pause)
            route_span = self.tracer.start("kvmesh.route", span, attempt=tries.attempt)
            try:
                decision = self.route(prep, tries.excluded)
            except NoEngineAvailable as e:
                route_span.fail(e.grpc_code, e.reason, str(e))
                route_span.end()
                tries.no_candidate(str(e))
                break
            routed = routed_to(prep, decision, tries.attempt, self.engines)
            self.log.debug(
                "router.request_routed",
                request_id=prep.request_id,
                engine=routed.engine_id,
                worker=routed.worker,
                attempt=routed.attempt,
                policy=prep.policy,
                reason=decision.reason,
                predicted_blocks=routed.predicted_cached_blocks,
            )
            route_span.set(
                engine=routed.engine_id,
                worker=routed.worker,
                reason=decision.reason,
                candidates=len(decision.candidates),
                predicted_cached_tokens=routed.predicted_cached_blocks * prep.block_size,
            )
            route_span.end()
            acct.attempt(routed, self.engines[routed.engine_id], self.clock())
            yield routed
            finished = False
            async for item in self._attempt(prep, params, routed, acct, tries, deadline, span):
                finished = isinstance(item, Finished)
                yield item
            if finished:
                return
        acct.gave_up()
        if deadline is not None and self.clock() >= deadline:
            raise DeadlineExceeded("the request's deadline passed before an engine could take it")
        if tries.all_busy:
            raise EnginesBusy("every engine tried has a full queue: " + "; ".join(tries.errors))
        raise NoEngineAvailable(tries.give_up_message())

    async def _attempt(
        self,
        prep: Prepared,
        params: SamplingParams,
        routed: Routed,
        acct: Accounting,
        tries: Attempts,
        deadline: float | None,
        span: Span,
    ) -> AsyncIterator[Chunk | Finished]:
        """One engine's try: its tokens and a Finished, or nothing (then the
        request may be tried again elsewhere), or a RouterError."""
        acct.sent()
        # The engine request carries the proxy span's traceparent (the client's when tracing is off).
        proxy = self.tracer.start(
            "kvmesh.proxy",
            span,
            "client",
            engine=routed.engine_id,
            endpoint=routed.endpoint,
            attempt=routed.attempt,
        )
        # Log context, passed per event: binding a logger per attempt costs
        # even when the events below it are filtered out.
        where = {
            "request_id": prep.request_id,
            "engine": routed.engine_id,
            "worker": routed.worker,
            "attempt": routed.attempt,
        }
        # The engine client waits on the event loop's clock.
        loop_deadline = (
            None if deadline is None else asyncio.get_running_loop().time() + (deadline - self.clock())
        )
        try:
            async for item in self.client.stream_completion(
                routed.endpoint,
                prep.model,
                prep.token_ids,
                params,
                prep.request_id,
                proxy.engine_headers(routed.headers),
                prep.tenancy,
                loop_deadline,
                routed.engine_kind,
            ):
                if isinstance(item, Chunk):
                    if acct.ttft_ms < 0:
                        self.admission.started(prep.key)
                    acct.token(self.clock(), len(item.token_ids))
                    yield item
                else:
                    done = acct.finished(item, self.clock())
                    proxy.set(
                        prompt_tokens=done.prompt_tokens,
                        cached_tokens=done.cached_prompt_tokens,
                        completion_tokens=done.completion_tokens,
                        ttft_ms=done.ttft_ms,
                    )
                    self.log.info(
                        "router.request_done",
                        **where,
                        cached=done.cached_prompt_tokens,
                        prompt=done.prompt_tokens,
                        predicted_blocks=routed.predicted_cached_blocks,
                    )
                    yield done
        except EngineUnavailable as e:
            proxy.fail("UNAVAILABLE", "engine_unavailable", str(e))
            acct.unavailable(self.clock())
            tries.failed_before_first_token(routed.worker, str(e))
            self._log_attempt(self.log.warning, "router.attempt_failed", where, str(e))
        except EngineBusy as e:
            proxy.fail("RESOURCE_EXHAUSTED", "engines_busy", str(e))
            acct.busy(self.clock())
            tries.engine_busy(routed.worker, str(e))
            self._log_attempt(self.log.info, "router.engine_busy", where, str(e))
        except EngineRejected as e:
            acct.rejected(self.clock())
            cls = ContextTooLong if e.context_length else RequestRejected
            proxy.fail(cls.grpc_code, cls.reason, str(e))
            raise cls(f"engine {routed.engine_id} refused the request (HTTP {e.status}): {e}") from None
        except EngineStalled as e:
            proxy.fail("DEADLINE_EXCEEDED", "stream_stalled", str(e))
            yield acct.stalled(str(e), self.clock())
            raise DeadlineExceeded(f"engine {routed.engine_id}: {e}", reason="stream_stalled") from None
        except EngineStreamError as e:
            proxy.fail(StreamFailed.grpc_code, StreamFailed.reason, str(e))
            yield acct.broken(str(e), self.clock())
            raise StreamFailed(f"engine {routed.engine_id} failed mid-stream: {e}") from None
        except DeadlineReached as e:
            proxy.fail(DeadlineExceeded.grpc_code, DeadlineExceeded.reason, str(e))
            raise DeadlineExceeded(str(e)) from None
        except (asyncio.CancelledError, GeneratorExit):
            proxy.fail("CANCELLED", "client")
            raise
        finally:
            acct.attempt_over()
            proxy.end()
