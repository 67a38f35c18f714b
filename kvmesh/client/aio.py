"""The asyncio client: :class:`AsyncClient`, the same calls as
:class:`kvmesh.client.Client`, awaited.

Use it from one event loop. Streams are async generators: leaving the
``async for`` early cancels the call on the node. :func:`stream_events`
turns any ``Generate`` call of a ``grpc.aio`` stub into the same events.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import AsyncGenerator
from typing import Any, Unpack

import grpc

from kvmesh.client.channel import Dialer
from kvmesh.client.config import ClientConfig, TlsConfig
from kvmesh.client.errors import KvmeshError, from_rpc_error, invalid_request
from kvmesh.client.messages import (
    Event,
    GenerateFold,
    GenerateOptions,
    Prompt,
    Result,
    RouteOptions,
    RouteResult,
    generate_request,
    route_request,
    route_result,
)
from kvmesh.client.redial import Redial
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "stream_events"]


async def stream_events(call: Any) -> AsyncGenerator[Event, None]:
    """The events of a ``grpc.aio`` Generate call (``stub.Generate(request, ...)``);
    raises :class:`KvmeshError` when it fails. Cancels the call if left early."""
    fold = GenerateFold()
    try:
        async for msg in call:
            event = fold.feed(msg)
            if event is not None:
                yield event
    except grpc.aio.AioRpcError as e:
        raise fold.error(e) from None
    finally:
        call.cancel()  # a no-op once the call has ended; stops the node's work if not
    yield fold.result()


class _Conn:
    __slots__ = ("admin", "channel", "router")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.router = pb_grpc.RouterStub(channel)
        self.admin = pb_grpc.AdminStub(channel)
        channel.get_state(try_to_connect=True)  # connect now, not at the first call

    def ready(self) -> bool:
        return bool(self.channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY)


class AsyncClient:
    """A kvmesh client for asyncio; arguments as :class:`kvmesh.client.Client`."""

    def __init__(
        self,
        target: str,
        *,
        tls: bool | TlsConfig = True,
        token: str = "",
        timeout: float | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        cfg = config or ClientConfig()
        self.config = cfg if timeout is None else dataclasses.replace(cfg, timeout=timeout)
        self._dialer = Dialer.make(target, tls, token, self.config)
        self._redial: Redial[_Conn] = Redial(self.config.reresolve_interval)

    @property
    def target(self) -> str:
        return self._dialer.uri

    @property
    def dials(self) -> int:
        return self._redial.dials

    # --- channels --------------------------------------------------------------------------

    async def _lease(self) -> _Conn:
        conn, closing = self._redial.lease(
            time.monotonic(), lambda: _Conn(self._dialer.aio_channel()), _Conn.ready
        )
        for c in closing:
            await c.channel.close()
        return conn

    async def _release(self, conn: _Conn) -> None:
        for c in self._redial.release(conn):
            await c.channel.close()

    def _timeout(self, timeout: float | None) -> float | None:
        """The call's deadline for gRPC (None: none); checked before any I/O."""
        t = self.config.timeout if timeout is None else timeout
        if not t > 0:  # NaN too: gRPC would end the call at once, DEADLINE_EXCEEDED
            raise invalid_request(f"timeout must be positive seconds (math.inf: no deadline), got {t}")
        return None if math.isinf(t) else t

    async def _unary(self, stub: str, method: str, request: Any, timeout: float | None) -> Any:
        deadline = self._timeout(timeout)
        conn = await self._lease()
        try:
            call = getattr(getattr(conn, stub), method)
            return await call(request, timeout=deadline, metadata=self._dialer.metadata)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        finally:
            await self._release(conn)

    # --- Router ----------------------------------------------------------------------------

    def generate(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncGenerator[Event, None]:
        """As :meth:`kvmesh.client.Client.generate`, with ``async for``."""
        return self._stream(generate_request(prompt, **options), self._timeout(timeout))

    async def _stream(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncGenerator[Event, None]:
        conn = await self._lease()
        try:
            call = conn.router.Generate(request, timeout=timeout, metadata=self._dialer.metadata)
            async for event in stream_events(call):
                yield event
        finally:
            await self._release(conn)

    async def complete(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> Result:
        async for event in self.generate(prompt, timeout=timeout, **options):
            if isinstance(event, Result):
                return event
        raise KvmeshError(grpc.StatusCode.INTERNAL, "the stream ended without a result")

    async def route(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[RouteOptions]
    ) -> RouteResult:
        return route_result(await self._unary("router", "Route", route_request(prompt, **options), timeout))

    # --- Admin -----------------------------------------------------------------------------

    async def list_engines(self, *, timeout: float | None = None) -> list[pb.EngineStatus]:
        return list((await self._unary("admin", "ListEngines", pb.ListEnginesRequest(), timeout)).engines)

    async def list_members(self, *, timeout: float | None = None) -> list[pb.Member]:
        return list((await self._unary("admin", "ListMembers", pb.ListMembersRequest(), timeout)).members)

    async def stats(self, *, timeout: float | None = None) -> pb.GetStatsResponse:
        resp: pb.GetStatsResponse = await self._unary("admin", "GetStats", pb.GetStatsRequest(), timeout)
        return resp

    async def index_digest(self, engine_id: str, *, timeout: float | None = None) -> list[pb.WorkerDigest]:
        req = pb.GetIndexDigestRequest(engine_id=engine_id)
        return list((await self._unary("admin", "GetIndexDigest", req, timeout)).workers)

    async def register_engine(self, spec: pb.EngineSpec, *, timeout: float | None = None) -> pb.EngineStatus:
        req = pb.RegisterEngineRequest(spec=spec)
        status: pb.EngineStatus = (await self._unary("admin", "RegisterEngine", req, timeout)).status
        return status

    async def deregister_engine(self, engine_id: str, *, timeout: float | None = None) -> bool:
        req = pb.DeregisterEngineRequest(engine_id=engine_id)
        return bool((await self._unary("admin", "DeregisterEngine", req, timeout)).removed)

    async def drain(self, *, timeout: float | None = None) -> pb.DrainResponse:
        resp: pb.DrainResponse = await self._unary("admin", "Drain", pb.DrainRequest(), timeout)
        return resp

    async def set_log_level(self, level: str, *, timeout: float | None = None) -> str:
        req = pb.SetLogLevelRequest(level=level)
        return str((await self._unary("admin", "SetLogLevel", req, timeout)).previous)

    # --- lifetime --------------------------------------------------------------------------

    async def close(self) -> None:
        for c in self._redial.close_all():
            await c.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
