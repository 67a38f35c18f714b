"""gRPC shell of a router node: the public ``kvmesh.v1`` Router and Admin
services, gRPC health checking and server reflection (so ``grpcurl`` works).

Only translation between protobuf messages and :class:`router.node.RouterNode`
lives here; every decision is made by the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from blocks.hashing import xor_digest
from blocks.tiers import TIERS, tier_name
from engine_adapters.completion_request import SamplingParams
from engine_adapters.native import IMPLEMENTATION as DECODE_IMPLEMENTATION
from engine_adapters.proxy import Chunk
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from mesh.auth import readable_by_others
from router.auth import Refused, TokenInterceptor, TokenTable
from router.config import RouterConfig
from router.engine_registry import EngineRecord, EngineSpec, EngineSpecError
from router.errors import REASON_KEY, REQUEST_ID_KEY, Draining, RequestError, RequestTooLarge, RouterError
from router.http_front import HttpFront
from router.index import PrefixIndex
from router.logs import set_log_level
from router.metrics import MetricsServer, RequestTimer, node_registry, server_ssl_context
from router.node import RouterNode
from router.policies import Decision
from router.request_path import ClientRequest, Finished, Routed, request_id_problem
from router.tracing import trace_from_metadata

_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(EngineSpec))
_READY_POLL = 0.02  # seconds between checks that the node has joined the mesh
_DRAIN_POLL = 0.05  # seconds between checks that the requests in flight have finished
_ID_CONFLICT_POLL = 0.25  # seconds between checks that another live node has taken this node's id


async def _abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: str | None = None,
    request_id: str = "",
) -> NoReturn:
    """``context.abort`` raises; this says so to the type checker."""
    trailing: list[tuple[str, str]] = []
    if reason is not None:
        trailing.append((REASON_KEY, reason))
    if request_id:
        trailing.append((REQUEST_ID_KEY, request_id))
    if trailing:
        context.set_trailing_metadata(tuple(trailing))
    await context.abort(code, message)
    raise AssertionError("context.abort returned")


def decision_to_pb(d: Decision) -> pb.Decision:
    return pb.Decision(
        policy=d.policy,
        reason=d.reason,
        candidates=[
            pb.CandidateScore(
                engine_id=c.worker,
                overlap_blocks=c.overlap_blocks,
                load=c.load,
                score=c.score,
                chosen=c.chosen,
                host_blocks=c.host_blocks,
                disk_blocks=c.disk_blocks,
                external_blocks=c.external_blocks,
            )
            for c in d.candidates
        ],
    )


def _routed_pb(r: Routed) -> pb.RoutedTo:
    return pb.RoutedTo(
        request_id=r.request_id,
        engine_id=r.engine_id,
        endpoint=r.endpoint,
        predicted_cached_blocks=r.predicted_cached_blocks,
        attempt=r.attempt,
        decision=decision_to_pb(r.decision),
    )


def _finished_pb(f: Finished) -> pb.Finished:
    return pb.Finished(
        finish_reason=f.finish_reason,
        prompt_tokens=f.prompt_tokens,
        cached_prompt_tokens=f.cached_prompt_tokens,
        completion_tokens=f.completion_tokens,
        engine_id=f.engine_id,
        ttft_ms=f.ttft_ms,
        attempts=f.attempts,
        error=f.error,
    )


def spec_from_pb(s: pb.EngineSpec) -> EngineSpec:
    """proto3 has no "unset" for scalars: a zero or empty field takes EngineSpec's default."""
    given: dict[str, Any] = {name: getattr(s, name) for name in _SPEC_FIELDS if getattr(s, name)}
    given.setdefault("engine_id", "")
    given.setdefault("endpoint", "")
    return EngineSpec(**given).validate()


def spec_pb(s: EngineSpec) -> pb.EngineSpec:
    return pb.EngineSpec(**dataclasses.asdict(s))


def sampling_from_pb(s: pb.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """As :func:`spec_from_pb`, zero means unset, except where zero is a
    value: temperature 0 is greedy, and the seed has presence."""
    return SamplingParams(
        max_tokens=s.max_tokens or default_max_tokens,
        temperature=s.temperature,
        stop=list(s.stop),
        ignore_eos=s.ignore_eos,
        seed=s.seed if s.HasField("seed") else None,
        **({"top_p": s.top_p} if s.top_p else {}),
    )


# A cancel this close to the call's deadline is the deadline (see Generate).
_DEADLINE_SLACK_S = 0.25


class RouterService(pb_grpc.RouterServicer):
    def __init__(self, node: RouterNode) -> None:
        self.node = node
        self.outcomes = node.outcomes
        self._streams: set[asyncio.Task[object]] = set()  # Generate calls running
        self._cut = False  # the drain timeout passed: running streams are being ended

    async def cut_streams(self, timeout: float) -> int:
        """End the Generate calls still running after the drain timeout, each
        with UNAVAILABLE ``draining`` (the client may retry elsewhere), rather
        than leave them to the server's stop, which cancels them with no
        reason. A stream ends at its next message; one whose engine sends
        nothing is cancelled after half of ``timeout``. Returns how many."""
        self._cut = True
        tasks = list(self._streams)
        if tasks:
            _, idle = await asyncio.wait(tasks, timeout=timeout / 2)
            for task in idle:
                task.cancel()
            if idle:
                await asyncio.wait(idle, timeout=timeout / 2)
        return len(tasks)

    def _request_id(self, request: pb.GenerateRequest | pb.RouteRequest) -> str:
        """The client's id if it is usable, else a new one: every line logged
        about the call, and the trailing metadata of a refusal, name an id."""
        rid = request.request_id
        return rid if rid and request_id_problem(rid) is None else self.node.new_request_id()

    def _client_request(self, request: pb.GenerateRequest | pb.RouteRequest, rid: str) -> ClientRequest:
        if not self.node.ready:
            raise Draining("this node is still joining the mesh", reason="joining")
        if request.request_id and rid != request.request_id:
            problem = request_id_problem(request.request_id)
            raise RequestError(f"request_id {problem}")
        # gRPC bounds a message by the port's limit, which is the mesh's
        # (larger) when the mesh shares the public port: the client's bound
        # is then checked here.
        bound = self.node.config.max_request_bytes
        if not self.node.config.mesh_listen and request.ByteSize() > bound:
            raise RequestTooLarge(f"the request is larger than max_request_bytes ({bound} bytes)")
        kind = request.prompt.WhichOneof("kind")
        text = request.prompt.text if kind == "text" else None
        # A slice copies the repeated field in C, cheaper than list() on the hot path.
        ids = request.prompt.token_ids.ids[:] if kind == "token_ids" else None
        limit = self.node.config.max_prompt_tokens
        if ids is not None and len(ids) > limit:
            raise RequestError(f"prompt of {len(ids)} tokens exceeds {limit}")
        return ClientRequest(
            request_id=rid,
            model=request.model,
            text=text,
            token_ids=ids,
            session_key=request.session_key,
            policy=request.policy,
            lora_name=request.lora_name,
            cache_salt=request.cache_salt,
        )

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else self.node.clock() + remaining

    async def Generate(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        timer = self.node.metrics.request("Generate", self.node.clock())
        rid = self._request_id(request)
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        try:
            prep = await self.node.prepare_async(self._client_request(request, rid))
            timer.policy = prep.policy
            params = sampling_from_pb(request.sampling, self.node.config.default_max_tokens)
            trace = trace_from_metadata(context.invocation_metadata())  # the client's W3C traceparent
            stream = self.node.generate(prep, params, self._deadline(context), trace)
            async with contextlib.aclosing(stream):  # its engine request ends with this call
                async for item in stream:
                    if self._cut:
                        raise self._cut_error()
                    yield self._response(item, timer)
        except RouterError as e:
            await self._fail(context, e, rid, timer)
        except asyncio.CancelledError:
            await self._cancelled(context, rid, timer)
            raise
        except Exception as e:
            await self._crashed(context, e, rid, timer)
        else:
            self._ended("OK", "", rid, "", timer)
        finally:
            if task is not None:
                self._streams.discard(task)

    async def Route(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.RouteRequest, context: grpc.aio.ServicerContext
    ) -> pb.RouteResponse:
        timer = self.node.metrics.request("Route", self.node.clock())
        rid = self._request_id(request)
        try:
            prep = await self.node.prepare_async(self._client_request(request, rid))
            timer.policy = prep.policy
            routed = self.node.route_only(
                prep, dry_run=request.dry_run, trace=trace_from_metadata(context.invocation_metadata())
            )
        except RouterError as e:
            await self._fail(context, e, rid, timer)
        except asyncio.CancelledError:  # while its prompt waited to be tokenized
            await self._cancelled(context, rid, timer)
            raise
        except Exception as e:
            await self._crashed(context, e, rid, timer)
        self._ended("OK", "", rid, "", timer)
        return pb.RouteResponse(
            request_id=routed.request_id,
            engine_id=routed.engine_id,
            endpoint=routed.endpoint,
            predicted_cached_blocks=routed.predicted_cached_blocks,
            prompt_blocks=len(prep.hashes),
            decision=decision_to_pb(routed.decision),
        )

    def _response(self, item: Routed | Chunk | Finished, timer: RequestTimer) -> pb.GenerateResponse:
        if isinstance(item, Chunk):
            if timer.first_token < 0:
                timer.token(self.node.clock())
            return pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=item.token_ids, text=item.text))
        if isinstance(item, Routed):
            return pb.GenerateResponse(routed=_routed_pb(item))
        return pb.GenerateResponse(finished=_finished_pb(item))

    def _cut_error(self) -> Draining:
        if self.node.drain_cut_short:
            why = "its operator cut the drain short"
        else:
            why = f"drain timeout {self.node.config.drain_timeout:g} s"
        return Draining(
            f"node {self.node.node_id} stopped before this stream ended ({why}); "
            "send the request to another node"
        )

    async def _cancelled(self, context: grpc.aio.ServicerContext, rid: str, timer: RequestTimer) -> None:
        """A Generate handler was cancelled: by :meth:`cut_streams` (then the
        client gets UNAVAILABLE ``draining``: this raises), by the client, or
        by gRPC when the client's deadline passed (counted as such)."""
        if self._cut:
            await self._fail(context, self._cut_error(), rid, timer)
        # The client's own deadline often fires first: its cancel reaches the
        # node a little before the node's copy of the deadline (which started
        # when the call arrived), hence the slack.
        remaining = context.time_remaining()
        if remaining is not None and remaining <= _DEADLINE_SLACK_S:
            self._ended("DEADLINE_EXCEEDED", "deadline", rid, "the client's deadline passed", timer)
        else:
            self._ended("CANCELLED", "client", rid, "", timer)

    def _ended(
        self, status: str, reason: str, request_id: str, message: str, timer: RequestTimer | None = None
    ) -> None:
        self.node.request_ended(status, reason, request_id, message, timer)

    async def _fail(
        self, context: grpc.aio.ServicerContext, e: RouterError, request_id: str, timer: RequestTimer
    ) -> NoReturn:
        self._ended(e.grpc_code, e.reason, request_id, str(e), timer)
        await _abort(context, getattr(grpc.StatusCode, e.grpc_code), str(e), e.reason, request_id)

    async def _crashed(
        self, context: grpc.aio.ServicerContext, e: Exception, request_id: str, timer: RequestTimer
    ) -> NoReturn:
        # A bug of this node: say so (INTERNAL), never a bare UNKNOWN.
        self.node.log.exception("router.request_crashed", request_id=request_id)
        self._ended("INTERNAL", "internal", request_id, repr(e), timer)
        message = f"internal error on node {self.node.node_id}: {e!r}"
        await _abort(context, grpc.StatusCode.INTERNAL, message, "internal", request_id)


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, node: RouterNode, request_stop: Callable[[], None] = lambda: None) -> None:
        self.node = node
        self._request_stop = request_stop

    def _status(self, rec: EngineRecord) -> pb.EngineStatus:
        node, spec = self.node, rec.spec
        adapter = node.adapters.get(spec.engine_id)
        st = adapter.stats() if adapter is not None else {}
        seqs = node.core.resume_seqs(spec.engine_id)
        last = (st.get("last_seq") or {}).get(0)
        if last is None and spec.workers and spec.workers[0] in seqs:  # not the owner: the log's
            last = seqs[spec.workers[0]] - 1
        loads = node.loads()
        return pb.EngineStatus(
            spec=spec_pb(spec),
            healthy=rec.healthy,
            circuit=rec.breaker.state,
            in_flight=sum(loads.of(w)[0] for w in spec.workers),
            cached_blocks=sum(node.index.blocks_of(w) for w in spec.workers),
            last_seq=-1 if last is None else last,
            events_applied=int(st.get("events", 0)),
            gaps_replayed=int(st.get("gaps_replayed", 0)),
            resets=int(st.get("resets", 0)),
            probes=int(st.get("probes", 0)),
            probe_batches=int(st.get("probe_batches", 0)),
            skipped_events=int(st.get("skipped_events", 0)),
            owner_node=node.core.owner_of(spec.engine_id) or "",
            worker_seqs={w: s - 1 for w, s in seqs.items()},
            prompt_tokens=node.stats.prompt_tokens_by_engine[spec.engine_id],
            cached_prompt_tokens=node.stats.cached_tokens_by_engine[spec.engine_id],
            event_lag_seconds=-1.0 if st.get("event_lag") is None else st["event_lag"],
            event_block_size_mismatch=int(st.get("block_size_mismatch", 0)),
            events_refused=str(st.get("events_refused", "")),
            cached_blocks_by_tier={
                tier_name(t): sum(node.index.blocks_of(w, t) for w in spec.workers) for t in TIERS
            },
        )

    async def RegisterEngine(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.RegisterEngineRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterEngineResponse:
        try:
            rec = await self.node.register_engine(spec_from_pb(request.spec))
        except EngineSpecError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), "invalid_request")
        # Every node logs the change; the one asked says who asked.
        self.node.log.info(
            "router.engine_register_requested",
            by="Admin.RegisterEngine",
            peer=context.peer(),
            engine=rec.spec.engine_id,
            endpoint=rec.spec.endpoint,
        )
        return pb.RegisterEngineResponse(status=self._status(rec))

    async def DeregisterEngine(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.DeregisterEngineRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterEngineResponse:
        if not await self.node.deregister_engine(request.engine_id):
            await _abort(
                context, grpc.StatusCode.NOT_FOUND, f"unknown engine {request.engine_id!r}", "unknown_engine"
            )
        self.node.log.warning(
            "router.engine_deregister_requested",
            by="Admin.DeregisterEngine",
            peer=context.peer(),
            engine=request.engine_id,
        )
        return pb.DeregisterEngineResponse(removed=True)

    async def ListEngines(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.ListEnginesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEnginesResponse:
        return pb.ListEnginesResponse(engines=[self._status(r) for r in self.node.engines.values()])

    async def GetStats(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        node, s = self.node, self.node.stats
        transport = node.mesh.transport.stats
        return pb.GetStatsResponse(
            node_id=node.node_id,
            default_policy=node.config.policy,
            requests_total=s.requests_total,
            requests_failed=s.requests_failed,
            retries_total=s.retries_total,
            prompt_tokens_total=s.prompt_tokens_total,
            cached_prompt_tokens_total=s.cached_prompt_tokens_total,
            index_blocks=sum(node.index.blocks_of(w) for w in node.index.workers()),
            index_entries=len(node.index),
            requests_by_engine=dict(s.requests_by_engine),
            requests_by_policy=dict(s.requests_by_policy),
            ready=node.ready,
            live_members=len(node.core.live_members()),
            mesh_bytes_sent=transport.bytes_sent,
            mesh_messages_sent=transport.messages_sent,
            outcomes=dict(node.outcomes.counts),
            in_flight=node.in_flight(),
            draining=node.draining,
            member_events=dict(node.mesh.member_events),
            predicted_cached_prompt_tokens_total=sum(s.predicted_tokens_by_policy.values()),
            route_predictions_total=sum(s.predictions_by_policy.values()),
            route_mispredictions_total=sum(s.mispredictions_by_policy.values()),
            mesh_bytes_received=transport.bytes_received,
            mesh_messages_received=transport.messages_received,
            convergence_lag_seconds={peer: lag for peer, (lag, _) in node.core.lag.by_peer.items()},
            event_loop_stalls_total=node.loop_lag.stalls_total,
            event_loop_lag_max_seconds=node.loop_lag.max_lag,
        )

    async def Drain(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.DrainRequest, context: grpc.aio.ServicerContext
    ) -> pb.DrainResponse:
        self.node.log.warning("router.drain_requested", by="Admin.Drain", in_flight=self.node.in_flight())
        self.node.draining = True
        self._request_stop()
        return pb.DrainResponse(draining=True, in_flight=self.node.in_flight())

    async def SetLogLevel(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.SetLogLevelRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetLogLevelResponse:
        try:
            previous = set_log_level(request.level)
        except ValueError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), "invalid_request")
        self.node.log.warning(
            "router.log_level_changed", log_level=request.level, previous=previous, by="Admin"
        )
        return pb.SetLogLevelResponse(previous=previous)

    async def GetIndexDigest(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.GetIndexDigestRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetIndexDigestResponse:
        rec = self.node.engines.get(request.engine_id)
        if rec is None:
            await _abort(
                context, grpc.StatusCode.NOT_FOUND, f"unknown engine {request.engine_id!r}", "unknown_engine"
            )
        out = []
        for w in rec.spec.workers:
            n, x = xor_digest(self.node.index.worker_hashes(w))
            out.append(pb.WorkerDigest(worker=w, blocks=n, xor_hashes=x))
        return pb.GetIndexDigestResponse(workers=out)

    async def ListMembers(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.ListMembersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMembersResponse:
        core = self.node.core
        owned: dict[str, list[str]] = {}
        for engine_id in sorted(core.engines()):
            owner = core.owner_of(engine_id)
            if owner:
                owned.setdefault(owner, []).append(engine_id)
        return pb.ListMembersResponse(
            members=[
                pb.Member(
                    node_id=m.node,
                    addr=m.addr,
                    state=m.state,
                    incarnation=m.incarnation,
                    is_self=m.node == self.node.node_id,
                    owned_engines=owned.get(m.node, []),
                )
                for m in sorted(core.members(), key=lambda m: m.node)
            ]
        )


async def serve(
    node: RouterNode,
    stop: asyncio.Event,
    join: list[str] | None = None,
    ready: asyncio.Future[str] | None = None,
) -> None:
    """Run the node's gRPC server (public API + mesh) on ``node.config.listen``
    until ``stop`` is set, registering ``node.config.engines`` once ready.

    Health reports NOT_SERVING and the READY line is withheld until the node
    has joined the mesh (through the seeds ``join``) and applied a seed's
    full state (a node stopped before that never prints it). When ``stop``
    is set (SIGTERM, Admin.Drain) the node drains: see :func:`drain`. With
    ``http_listen``, the OpenAI-compatible front (router/http_front.py)
    serves beside gRPC, and drains with it.
    """
    cfg = node.config
    node.load_tokenizers()  # a bad --tokenizer stops us before any port is bound
    _warn_readable_secrets(node)
    interceptors = []
    tokens = TokenTable.from_file(cfg.api_auth.token_file) if cfg.api_auth.token_file else None
    if tokens is not None:
        interceptors.append(TokenInterceptor(tokens, _refused(node)))
    # The OpenAI-compatible front: same node, same tokens and TLS; a broken chat template stops us here.
    front = HttpFront(node, tokens, _refused(node)) if cfg.http_listen else None
    # Read-only, with the API's TLS and tokens (router/metrics.py); off without --metrics-listen.
    metrics = MetricsServer(node_registry(node), tokens, server_ssl_context(cfg.api_auth), _refused(node))
    server = grpc.aio.server(options=server_options(cfg, mesh=False), interceptors=interceptors)
    service = RouterService(node)
    pb_grpc.add_RouterServicer_to_server(service, server)
    pb_grpc.add_AdminServicer_to_server(AdminService(node, stop.set), server)
    mesh_server = None
    if cfg.mesh_listen:  # the mesh on a port of its own
        mesh_server = grpc.aio.server(options=server_options(cfg, mesh=True))
        node.mesh.transport.add_to_server(mesh_server)
        creds = cfg.transport.server_credentials() if cfg.transport.tls else None
        _bind(mesh_server, cfg.mesh_listen, creds)
    else:
        node.mesh.transport.add_to_server(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        pb.DESCRIPTOR.services_by_name["Router"].full_name,
        pb.DESCRIPTOR.services_by_name["Admin"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
        *(() if mesh_server is not None else ("kvmesh.mesh.v1.Mesh",)),
    )
    reflection.enable_server_reflection(names, server)
    _bind(server, cfg.listen, cfg.api_auth.server_credentials() if cfg.api_auth.tls else None)
    served = (*names[:2], "")
    await _set_health(health_servicer, served, serving=False)
    await server.start()
    if mesh_server is not None:
        await mesh_server.start()
    await node.start(join or [])
    watch = asyncio.create_task(_watch_node_id(node, stop), name="node_id")
    try:
        if front is not None:
            await front.start(cfg.http_listen)  # /health says 503 until the node serves
        await metrics.start(cfg.metrics_listen)  # from the start: a joining node is worth watching too
        if join:
            node.log.info("router.joining", seeds=join)
        await _wait_ready(node, stop, join or [])
        if not node.ready:
            return  # stopped while joining: it never served, so no READY line
        for spec in cfg.engines:
            await node.register_engine(spec)
        await _set_health(health_servicer, served, serving=True)
        node.log.info(
            "router.serving",
            grpc=node.api_addr,
            mesh=node.addr,
            policy=cfg.policy,
            engines=sorted(node.engines),
            members=len(node.core.live_members()),
        )
        http = f" http={front.addr}" if front is not None else ""
        http += f" metrics={metrics.address}" if metrics.address else ""
        # Which hot path serves (native, or the pure-Python fallback), for whoever started the node.
        http += f" index={'python' if isinstance(node.index, PrefixIndex) else 'native'}"
        http += f" decode={DECODE_IMPLEMENTATION}"
        print(f"READY grpc={node.api_addr} mesh={node.addr} node={node.node_id}{http}", flush=True)
        if ready is not None and not ready.done():
            ready.set_result(node.api_addr)
        await stop.wait()
    finally:
        watch.cancel()
        await _set_health(health_servicer, served, serving=False)
        await drain(node)
        cut = await service.cut_streams(cfg.stop_grace)
        if cut:
            node.log.warning(
                "router.streams_cut",
                streams=cut,
                drain_timeout=cfg.drain_timeout,
                cut_short=node.drain_cut_short,
            )
        if front is not None:
            await front.stop()
        await server.stop(grace=cfg.stop_grace)
        if mesh_server is not None:
            await mesh_server.stop(grace=cfg.stop_grace)
        await metrics.close()
        await node.stop()
        node.log.info("router.stopped")


def _warn_readable_secrets(node: RouterNode) -> None:
    """A secret file others on the host may read is logged once, with the fix
    (the node still starts: a container's mounted secret may be shared by
    design)."""
    cfg = node.config
    files = (
        ("--auth-token-file", cfg.api_auth.token_file),
        ("--tls-key", cfg.api_auth.tls_key),
        ("--mesh-secret-file", cfg.transport.secret_file),
        ("--mesh-tls-key", cfg.transport.tls_key),
    )
    for flag, path in files:
        if path and (mode := readable_by_others(path)) is not None:
            node.log.warning(
                "router.secret_file_readable", flag=flag, path=path, mode=mode, hint=f"chmod 600 {path}"
            )


async def _watch_node_id(node: RouterNode, stop: asyncio.Event) -> None:
    """Stop the node when another live member has its node id and this one
    came second (mesh/membership.py): the two would take each other's
    engines for as long as both run."""
    membership = node.core.membership
    while not membership.yielded:
        await asyncio.sleep(_ID_CONFLICT_POLL)
    node.stopped_for = (
        f"node id {node.node_id!r} is in use by a live member at {membership.id_conflict}: "
        "give this node another --node-id"
    )
    node.log.error("router.node_id_in_use", other_addr=membership.id_conflict, hint=node.stopped_for)
    stop.set()


async def _wait_ready(node: RouterNode, stop: asyncio.Event, seeds: list[str]) -> None:
    """Wait until the node is ready or ``stop`` is set. A node no seed lets
    in would wait for ever with nothing in its log: it warns once its first
    Join has gone unanswered, then every ``join_warn_interval``."""
    t0 = node.clock()
    warn_at = t0 + node.config.mesh.membership.join_retry_interval
    while not node.ready and not stop.is_set():
        await asyncio.sleep(_READY_POLL)
        now = node.clock()
        if now >= warn_at and not node.ready and not stop.is_set():
            node.log.warning(
                "router.join_waiting",
                seeds=seeds,
                waited=round(now - t0, 1),
                hint="joined; a peer's full state has not arrived yet"
                if node.core.has_peers()
                else "no seed has answered: is one running, reachable at that mesh address, "
                "with this node's mesh credentials?",
            )
            warn_at = now + node.config.join_warn_interval


def _bind(server: grpc.aio.Server, addr: str, creds: grpc.ServerCredentials | None) -> None:
    try:
        port = server.add_secure_port(addr, creds) if creds is not None else server.add_insecure_port(addr)
    except RuntimeError:  # grpcio's words do not say why ("Failed to bind to address ...")
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {addr}: {_why_not_bound(addr)}")


def _why_not_bound(addr: str) -> str:
    """Why ``addr`` cannot be bound, from the system's own error for a plain
    socket bound to it (``Address already in use``, ...)."""
    host, _, port = addr.rpartition(":")
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, proto) as s:
            s.bind(sockaddr)
    except (OSError, ValueError) as e:
        return getattr(e, "strerror", None) or str(e)
    return "gRPC refused the address"


def _refused(node: RouterNode) -> Refused:
    """Counts and logs (a few a second) calls refused for their credentials,
    with the request's id (the client's, else the node's) and the caller."""

    def refused(status: str, reason: str, method: str, request_id: str = "", peer: str = "") -> str:
        rid = request_id if request_id and request_id_problem(request_id) is None else node.new_request_id()
        log_it, suppressed = node.outcomes.record(status, reason, node.clock())
        if log_it:
            node.log.warning(
                "router.call_refused",
                status=status,
                reason=reason,
                method=method,
                request_id=rid,
                peer=peer or None,
                suppressed_before=suppressed,
            )
        return rid

    return refused


def server_options(cfg: RouterConfig, *, mesh: bool) -> list[tuple[str, int]]:
    """The options of the public server, or (``mesh``) of the mesh's own.

    Messages: a client request is bounded by ``max_request_bytes``; mesh
    messages (a full state for a joiner) by the transport's bound, which the
    public port then also has when it carries the mesh.

    gRPC's core cancels calls that arrive faster than the application takes
    them (past ``max_pending_requests``, 1000 by default): a client would see
    CANCELLED for a call nobody cancelled. The node's own admission
    (router/admission.py) bounds its work and answers what it cannot take
    with RESOURCE_EXHAUSTED, so the core's queue is made deep enough never to
    decide for it."""
    shared = not cfg.mesh_listen
    receive = cfg.transport.max_message_bytes if mesh else cfg.max_request_bytes
    if not mesh and shared:
        receive = max(receive, cfg.transport.max_message_bytes)
    pending = max(100_000, 4 * (cfg.admission.max_in_flight + cfg.admission.max_queue))
    return [
        ("grpc.max_receive_message_length", receive),
        ("grpc.max_send_message_length", cfg.transport.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", pending),
    ]


async def drain(node: RouterNode) -> None:
    """Stop taking requests, let those in flight finish (up to the drain
    timeout), then hand this node's engines over and leave the mesh."""
    node.draining = True
    t0 = node.clock()
    deadline = t0 + node.config.drain_timeout
    left = node.in_flight()
    if left:
        node.log.info("router.draining", in_flight=left, timeout=node.config.drain_timeout)
    while node.in_flight() and node.clock() < deadline and not node.drain_cut_short:
        await asyncio.sleep(_DRAIN_POLL)
    node.log.info(
        "router.drained",
        waited=round(node.clock() - t0, 3),
        unfinished=node.in_flight(),
        cut_short=node.drain_cut_short,
    )
    if node.ready and not node.stopped_for:  # a Leave under a taken id would be the other node's
        await node.leave()


async def _set_health(servicer: health.aio.HealthServicer, names: tuple[str, ...], *, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in names:
        await servicer.set(name, status)
