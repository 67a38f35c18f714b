"""gRPC shell of a router node: the public ``kvmesh.v1`` Router and Admin
services, gRPC health checking and server reflection (so ``grpcurl`` works).

Only translation between protobuf messages and :class:`router.node.RouterNode`
lives here; every decision is made by the node.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from blocks.hashing import xor_digest
from engine_adapters.completion_request import SamplingParams
from engine_adapters.proxy import Chunk
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from router.auth import TokenInterceptor, TokenTable
from router.config import RouterConfig
from router.engine_registry import EngineRecord, EngineSpec, EngineSpecError
from router.errors import REASON_KEY, Draining, RequestError, RouterError
from router.metrics import start_metrics_server
from router.node import RouterNode
from router.policies import Decision
from router.request_path import ClientRequest, Finished, Routed

_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(EngineSpec))
_READY_POLL = 0.02  # seconds between checks that the node has joined the mesh
_DRAIN_POLL = 0.05  # seconds between checks that the requests in flight have finished


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, reason: str | None = None
) -> NoReturn:
    """``context.abort`` raises; this says so to the type checker."""
    if reason is not None:
        context.set_trailing_metadata(((REASON_KEY, reason),))
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


class RouterService(pb_grpc.RouterServicer):
    def __init__(self, node: RouterNode) -> None:
        self.node = node
        self.outcomes = node.outcomes

    def _client_request(self, request: pb.GenerateRequest | pb.RouteRequest) -> ClientRequest:
        if not self.node.ready:
            raise Draining("this node is still joining the mesh", reason="joining")
        kind = request.prompt.WhichOneof("kind")
        text = request.prompt.text if kind == "text" else None
        # A slice copies the repeated field in C, cheaper than list() on the hot path.
        ids = request.prompt.token_ids.ids[:] if kind == "token_ids" else None
        limit = self.node.config.max_prompt_tokens
        if ids is not None and len(ids) > limit:
            raise RequestError(f"prompt of {len(ids)} tokens exceeds {limit}")
        return ClientRequest(
            request_id=request.request_id,
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
        try:
            prep = self.node.prepare(self._client_request(request))
            params = sampling_from_pb(request.sampling, self.node.config.default_max_tokens)
            async for item in self.node.generate(prep, params, self._deadline(context)):
                if isinstance(item, Chunk):
                    yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=item.token_ids, text=item.text))
                elif isinstance(item, Routed):
                    yield pb.GenerateResponse(routed=_routed_pb(item))
                else:
                    yield pb.GenerateResponse(finished=_finished_pb(item))
        except RouterError as e:
            await self._fail(context, e, request.request_id)
        except asyncio.CancelledError:
            self._ended("CANCELLED", "client", request.request_id, "")
            raise
        except Exception as e:
            await self._crashed(context, e, request.request_id)
        else:
            self._ended("OK", "", request.request_id, "")

    async def Route(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.RouteRequest, context: grpc.aio.ServicerContext
    ) -> pb.RouteResponse:
        try:
            prep = self.node.prepare(self._client_request(request))
            routed = self.node.route_only(prep, dry_run=request.dry_run)
        except RouterError as e:
            await self._fail(context, e, request.request_id)
        except Exception as e:
            await self._crashed(context, e, request.request_id)
        self._ended("OK", "", request.request_id, "")
        return pb.RouteResponse(
            request_id=routed.request_id,
            engine_id=routed.engine_id,
            endpoint=routed.endpoint,
            predicted_cached_blocks=routed.predicted_cached_blocks,
            prompt_blocks=len(prep.hashes),
            decision=decision_to_pb(routed.decision),
        )

    def _ended(self, status: str, reason: str, request_id: str, message: str) -> None:
        log_it, suppressed = self.outcomes.record(status, reason, self.node.clock())
        if log_it:
            self.node.log.warning(
                "router.request_ended",
                status=status,
                reason=reason,
                request_id=request_id,
                error=message,
                suppressed_before=suppressed,
            )

    async def _fail(self, context: grpc.aio.ServicerContext, e: RouterError, request_id: str) -> NoReturn:
        self._ended(e.grpc_code, e.reason, request_id, str(e))
        await _abort(context, getattr(grpc.StatusCode, e.grpc_code), str(e), e.reason)

    async def _crashed(self, context: grpc.aio.ServicerContext, e: Exception, request_id: str) -> NoReturn:
        # A bug of this node: say so (INTERNAL), never a bare UNKNOWN.
        self.node.log.exception("router.request_crashed", request_id=request_id)
        self._ended("INTERNAL", "internal", request_id, repr(e))
        message = f"internal error on node {self.node.node_id}: {e!r}"
        await _abort(context, grpc.StatusCode.INTERNAL, message, "internal")


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, node: RouterNode, request_stop: Callable[[], None] = lambda: None) -> None:
        self.node = node
        self._request_stop = request_stop

    def _status(self, rec: EngineRecord) -> pb.EngineStatus:
        node, spec = self.node, rec.spec
        adapter = node.adapters.get(spec.engine_id)
        st = adapter.stats() if adapter is not None else {}
        last = (st.get("last_seq") or {}).get(0)
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
            worker_seqs={w: s - 1 for w, s in node.core.resume_seqs(spec.engine_id).items()},
        )

    async def RegisterEngine(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.RegisterEngineRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterEngineResponse:
        try:
            rec = await self.node.register_engine(spec_from_pb(request.spec))
        except EngineSpecError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), "invalid_request")
        return pb.RegisterEngineResponse(status=self._status(rec))

    async def DeregisterEngine(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.DeregisterEngineRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterEngineResponse:
        if not await self.node.deregister_engine(request.engine_id):
            await _abort(
                context, grpc.StatusCode.NOT_FOUND, f"unknown engine {request.engine_id!r}", "unknown_engine"
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
        )

    async def Drain(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.DrainRequest, context: grpc.aio.ServicerContext
    ) -> pb.DrainResponse:
        self.node.log.warning("router.drain_requested", by="Admin.Drain", in_flight=self.node.in_flight())
        self.node.draining = True
        self._request_stop()
        return pb.DrainResponse(draining=True, in_flight=self.node.in_flight())

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
    full state. When ``stop`` is set (SIGTERM, Admin.Drain) the node drains:
    see :func:`drain`.
    """
    cfg = node.config
    interceptors = []
    if cfg.api_auth.token_file:
        interceptors.append(TokenInterceptor(TokenTable.from_file(cfg.api_auth.token_file), _refused(node)))
    server = grpc.aio.server(options=server_options(cfg, mesh=False), interceptors=interceptors)
    pb_grpc.add_RouterServicer_to_server(RouterService(node), server)
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
    try:
        if join:
            node.log.info("router.joining", seeds=join)
        while not node.ready and not stop.is_set():
            await asyncio.sleep(_READY_POLL)
        for spec in cfg.engines:
            await node.register_engine(spec)
        if cfg.metrics_port:
            start_metrics_server(node, cfg.metrics_port, cfg.metrics_addr)
        await _set_health(health_servicer, served, serving=True)
        node.log.info(
            "router.serving",
            grpc=node.api_addr,
            mesh=node.addr,
            policy=cfg.policy,
            engines=sorted(node.engines),
            members=len(node.core.live_members()),
        )
        print(f"READY grpc={node.api_addr} mesh={node.addr} node={node.node_id}", flush=True)
        if ready is not None and not ready.done():
            ready.set_result(node.api_addr)
        await stop.wait()
    finally:
        await _set_health(health_servicer, served, serving=False)
        await drain(node)
        await server.stop(grace=cfg.stop_grace)
        if mesh_server is not None:
            await mesh_server.stop(grace=cfg.stop_grace)
        await node.stop()
        node.log.info("router.stopped")


def _bind(server: grpc.aio.Server, addr: str, creds: grpc.ServerCredentials | None) -> None:
    port = server.add_secure_port(addr, creds) if creds is not None else server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot listen on {addr}")


def _refused(node: RouterNode) -> Callable[[str, str, str], None]:
    """Counts and logs (a few a second) calls refused for their credentials."""

    def refused(code: str, reason: str, method: str) -> None:
        log_it, suppressed = node.outcomes.record(code, reason, node.clock())
        if log_it:
            node.log.warning(
                "router.call_refused", status=code, reason=reason, method=method, suppressed_before=suppressed
            )

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
    while node.in_flight() and node.clock() < deadline:
        await asyncio.sleep(_DRAIN_POLL)
    node.log.info(
        "router.drained",
        waited=round(node.clock() - t0, 3),
        unfinished=node.in_flight(),
    )
    if node.ready:
        await node.leave()


async def _set_health(servicer: health.aio.HealthServicer, names: tuple[str, ...], *, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in names:
        await servicer.set(name, status)
