"""gRPC shell of a router node: the public ``kvmesh.v1`` Router and Admin
services, gRPC health checking and server reflection (so ``grpcurl`` works).

Only translation between protobuf messages and :class:`router.node.RouterNode`
lives here; every decision is made by the node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from blocks.hashing import xor_digest
from engine_adapters.proxy import Chunk, CompletionParams
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from router.engine_registry import EngineRecord, EngineSpec, EngineSpecError
from router.node import Finished, Prepared, RequestError, Routed, RouterNode
from router.policies import Decision, NoEngineAvailable

DEFAULT_MAX_TOKENS = 16
MAX_PROMPT_TOKENS = 1 << 20


def decision_pb(d: Decision) -> pb.Decision:
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
        decision=decision_pb(r.decision),
    )


def spec_from_pb(s: pb.EngineSpec) -> EngineSpec:
    return EngineSpec(
        engine_id=s.engine_id,
        endpoint=s.endpoint,
        model=s.model or "sim-model",
        block_size=s.block_size or 16,
        kv_events_endpoint=s.kv_events_endpoint,
        replay_endpoint=s.replay_endpoint,
        data_parallel_size=s.data_parallel_size or 1,
        topic=s.topic,
        capacity_blocks=s.capacity_blocks,
    ).validate()


def spec_pb(s: EngineSpec) -> pb.EngineSpec:
    return pb.EngineSpec(
        engine_id=s.engine_id,
        endpoint=s.endpoint,
        model=s.model,
        block_size=s.block_size,
        kv_events_endpoint=s.kv_events_endpoint,
        replay_endpoint=s.replay_endpoint,
        data_parallel_size=s.data_parallel_size,
        topic=s.topic,
        capacity_blocks=s.capacity_blocks,
    )


class RouterService(pb_grpc.RouterServicer):
    def __init__(self, node: RouterNode) -> None:
        self.node = node

    def _prepare(self, request: pb.GenerateRequest | pb.RouteRequest, context) -> Prepared:  # noqa: ANN001
        if not self.node.ready:
            raise NoEngineAvailable("this node is still joining the mesh")
        kind = request.prompt.WhichOneof("kind")
        text = request.prompt.text if kind == "text" else None
        # A slice copies the repeated field in C: a third cheaper than list().
        ids = request.prompt.token_ids.ids[:] if kind == "token_ids" else None
        if ids is not None and len(ids) > MAX_PROMPT_TOKENS:
            raise RequestError(f"prompt of {len(ids)} tokens exceeds {MAX_PROMPT_TOKENS}")
        return self.node.prepare(
            request_id=request.request_id,
            model=request.model,
            text=text,
            token_ids=ids,
            session_key=request.session_key,
            policy=request.policy,
            lora_name=request.lora_name,
            cache_salt=request.cache_salt,
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            prep = self._prepare(request, context)
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NoEngineAvailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        s = request.sampling
        params = CompletionParams(
            max_tokens=s.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=s.temperature,
            top_p=s.top_p or 1.0,
            stop=list(s.stop),
            ignore_eos=s.ignore_eos,
            seed=s.seed if s.HasField("seed") else None,
        )
        try:
            async for item in self.node.generate(prep, params):
                if isinstance(item, Chunk):
                    yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=item.token_ids, text=item.text))
                elif isinstance(item, Routed):
                    yield pb.GenerateResponse(routed=_routed_pb(item))
                elif isinstance(item, Finished):
                    yield pb.GenerateResponse(
                        finished=pb.Finished(
                            finish_reason=item.finish_reason,
                            prompt_tokens=item.prompt_tokens,
                            cached_prompt_tokens=item.cached_prompt_tokens,
                            completion_tokens=item.completion_tokens,
                            engine_id=item.engine_id,
                            ttft_ms=item.ttft_ms,
                            attempts=item.attempts,
                        )
                    )
        except NoEngineAvailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:  # noqa: N802
        try:
            prep = self._prepare(request, context)
            routed = self.node.route_only(prep, dry_run=request.dry_run)
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NoEngineAvailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.RouteResponse(
            request_id=routed.request_id,
            engine_id=routed.engine_id,
            endpoint=routed.endpoint,
            predicted_cached_blocks=routed.predicted_cached_blocks,
            prompt_blocks=len(prep.hashes),
            decision=decision_pb(routed.decision),
        )


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, node: RouterNode) -> None:
        self.node = node

    def _status(self, rec: EngineRecord) -> pb.EngineStatus:
        spec = rec.spec
        adapter = self.node.adapters.get(spec.engine_id)
        st = adapter.stats() if adapter is not None else {}
        last = (st.get("last_seq") or {}).get(0)
        return pb.EngineStatus(
            spec=spec_pb(spec),
            healthy=rec.healthy,
            circuit=rec.breaker.state,
            in_flight=sum(self.node.worker_load(w)[0] for w in spec.workers),
            cached_blocks=sum(self.node.index.blocks_of(w) for w in spec.workers),
            last_seq=-1 if last is None else last,
            events_applied=int(st.get("events", 0)),
            gaps_replayed=int(st.get("gaps_replayed", 0)),
            resets=int(st.get("resets", 0)),
            owner_node=self.node.core.owner_of(spec.engine_id) or "",
            worker_seqs={w: s - 1 for w, s in self.node.core.state.resume_seqs(spec.engine_id).items()},
        )

    async def RegisterEngine(self, request, context):  # noqa: ANN001, ANN201, N802
        try:
            spec = spec_from_pb(request.spec)
            rec = await self.node.register_engine(spec)
        except EngineSpecError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.RegisterEngineResponse(status=self._status(rec))

    async def DeregisterEngine(self, request, context):  # noqa: ANN001, ANN201, N802
        removed = await self.node.deregister_engine(request.engine_id)
        if not removed:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown engine {request.engine_id!r}")
        return pb.DeregisterEngineResponse(removed=True)

    async def ListEngines(self, request, context):  # noqa: ANN001, ANN201, N802
        return pb.ListEnginesResponse(engines=[self._status(r) for r in self.node.engines.values()])

    async def GetStats(self, request, context):  # noqa: ANN001, ANN201, N802
        s = self.node.stats
        return pb.GetStatsResponse(
            node_id=self.node.node_id,
            default_policy=self.node.default_policy,
            requests_total=s.requests_total,
            requests_failed=s.requests_failed,
            retries_total=s.retries_total,
            prompt_tokens_total=s.prompt_tokens_total,
            cached_prompt_tokens_total=s.cached_prompt_tokens_total,
            index_blocks=sum(self.node.index.blocks_of(w) for w in self.node.index.workers()),
            index_entries=len(self.node.index),
            requests_by_engine=dict(s.requests_by_engine),
            requests_by_policy=dict(s.requests_by_policy),
            ready=self.node.ready,
            live_members=len(self.node.core.live_members()),
            mesh_bytes_sent=self.node.transport.stats.bytes_sent,
            mesh_messages_sent=self.node.transport.stats.messages_sent,
        )

    async def GetIndexDigest(self, request, context):  # noqa: ANN001, ANN201, N802
        rec = self.node.engines.get(request.engine_id)
        if rec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown engine {request.engine_id!r}")
        out = []
        for w in rec.spec.workers:
            n, x = xor_digest(self.node.index.worker_hashes(w))
            out.append(pb.WorkerDigest(worker=w, blocks=n, xor_hashes=x))
        return pb.GetIndexDigestResponse(workers=out)

    async def ListMembers(self, request, context):  # noqa: ANN001, ANN201, N802
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
    listen: str,
    engines: list[EngineSpec],
    stop: asyncio.Event,
    join: list[str] | None = None,
    metrics_port: int = 0,
    ready: asyncio.Future[str] | None = None,
) -> None:
    """Run the node's gRPC server (public API + mesh) until ``stop`` is set.

    Health reports NOT_SERVING and the READY line is withheld until the node
    has joined the mesh and applied a seed's full state.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_RouterServicer_to_server(RouterService(node), server)
    pb_grpc.add_AdminServicer_to_server(AdminService(node), server)
    node.transport.add_to_server(server)
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
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    served = names[:2] + ("",)
    for name in served:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    await node.start(join or [])
    try:
        if join:
            node.log.info("joining the mesh", seeds=join)
        while not node.ready and not stop.is_set():
            await asyncio.sleep(0.02)
        for spec in engines:
            await node.register_engine(spec)
        if metrics_port:
            from router.metrics import start_metrics_server

            start_metrics_server(node, metrics_port)
        for name in served:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        node.log.info(
            "router serving",
            grpc=node.addr,
            policy=node.default_policy,
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
        await server.stop(grace=2.0)
        await node.stop()
        node.log.info("router stopped")
