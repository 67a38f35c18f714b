"""gRPC shell of a router node: the public ``kvmesh.v1`` Router and Admin
services, gRPC health checking and server reflection (so ``grpcurl`` works).

Only translation between protobuf messages and :class:`router.node.RouterNode`
lives here; every decision is made by the node.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from blocks.hashing import xor_digest
from engine_adapters.completion_request import SamplingParams
from engine_adapters.proxy import Chunk
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from router.engine_registry import EngineRecord, EngineSpec, EngineSpecError
from router.metrics import start_metrics_server
from router.node import RouterNode
from router.policies import Decision, NoEngineAvailable
from router.request_path import ClientRequest, Finished, RequestError, Routed

_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(EngineSpec))
_READY_POLL = 0.02  # seconds between checks that the node has joined the mesh


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """``context.abort`` raises; this says so to the type checker."""
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

    def _client_request(self, request: pb.GenerateRequest | pb.RouteRequest) -> ClientRequest:
        if not self.node.ready:
            raise NoEngineAvailable("this node is still joining the mesh")
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

    async def Generate(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            prep = self.node.prepare(self._client_request(request))
        except RequestError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NoEngineAvailable as e:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        params = sampling_from_pb(request.sampling, self.node.config.default_max_tokens)
        try:
            async for item in self.node.generate(prep, params):
                if isinstance(item, Chunk):
                    yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=item.token_ids, text=item.text))
                elif isinstance(item, Routed):
                    yield pb.GenerateResponse(routed=_routed_pb(item))
                else:
                    yield pb.GenerateResponse(finished=_finished_pb(item))
        except NoEngineAvailable as e:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(e))

    async def Route(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.RouteRequest, context: grpc.aio.ServicerContext
    ) -> pb.RouteResponse:
        try:
            prep = self.node.prepare(self._client_request(request))
            routed = self.node.route_only(prep, dry_run=request.dry_run)
        except RequestError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NoEngineAvailable as e:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.RouteResponse(
            request_id=routed.request_id,
            engine_id=routed.engine_id,
            endpoint=routed.endpoint,
            predicted_cached_blocks=routed.predicted_cached_blocks,
            prompt_blocks=len(prep.hashes),
            decision=decision_to_pb(routed.decision),
        )


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, node: RouterNode) -> None:
        self.node = node

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
            owner_node=node.core.owner_of(spec.engine_id) or "",
            worker_seqs={w: s - 1 for w, s in node.core.resume_seqs(spec.engine_id).items()},
        )

    async def RegisterEngine(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.RegisterEngineRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterEngineResponse:
        try:
            rec = await self.node.register_engine(spec_from_pb(request.spec))
        except EngineSpecError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.RegisterEngineResponse(status=self._status(rec))

    async def DeregisterEngine(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.DeregisterEngineRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterEngineResponse:
        if not await self.node.deregister_engine(request.engine_id):
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"unknown engine {request.engine_id!r}")
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
        )

    async def GetIndexDigest(  # noqa: N802 - gRPC method names are the proto's
        self, request: pb.GetIndexDigestRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetIndexDigestResponse:
        rec = self.node.engines.get(request.engine_id)
        if rec is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"unknown engine {request.engine_id!r}")
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
    full state.
    """
    cfg = node.config
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", cfg.transport.max_message_bytes),
            ("grpc.max_send_message_length", cfg.transport.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_RouterServicer_to_server(RouterService(node), server)
    pb_grpc.add_AdminServicer_to_server(AdminService(node), server)
    node.mesh.transport.add_to_server(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        pb.DESCRIPTOR.services_by_name["Router"].full_name,
        pb.DESCRIPTOR.services_by_name["Admin"].full_name,
        "kvmesh.mesh.v1.Mesh",
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    if server.add_insecure_port(cfg.listen) == 0:
        raise OSError(f"cannot listen on {cfg.listen}")
    served = (*names[:2], "")
    for name in served:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
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
        for name in served:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        node.log.info(
            "router.serving",
            grpc=node.addr,
            policy=cfg.policy,
            engines=sorted(node.engines),
            members=len(node.core.live_members()),
        )
        print(f"READY grpc={node.addr} node={node.node_id}", flush=True)
        if ready is not None and not ready.done():
            ready.set_result(node.addr)
        await stop.wait()
    finally:
        for name in served:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if node.ready:
            await node.leave()
        await server.stop(grace=cfg.stop_grace)
        await node.stop()
        node.log.info("router.stopped")
