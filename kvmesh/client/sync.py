"""The blocking client: :class:`Client`.

Thread-safe: one client serves any number of threads (gRPC channels are;
the choice of channel is taken under a lock). Streams are generators: the
call starts at the first ``next()``, and leaving the loop early cancels it
on the node (which stops the engine's work).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Generator
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

__all__ = ["Client"]


class _Conn:
    """A channel, its stubs, and its connectivity as gRPC last reported it."""

    __slots__ = ("admin", "channel", "router", "state")

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.router = pb_grpc.RouterStub(channel)
        self.admin = pb_grpc.AdminStub(channel)
        self.state: Any = None
        channel.subscribe(self.on_state, try_to_connect=True)

    def on_state(self, state: Any) -> None:
        self.state = state

    def ready(self) -> bool:
        return bool(self.state == grpc.ChannelConnectivity.READY)

    def close(self) -> None:
        self.channel.unsubscribe(self.on_state)
        self.channel.close()


class Client:
    """A kvmesh client (blocking). See :mod:`kvmesh.client` for how it dials.

    ``target``: ``HOST:PORT`` (a DNS name in front of the nodes) or a gRPC
    target URI. ``tls``: True (the system's CAs), False (plaintext, for nodes
    that serve without TLS: run ``--insecure``, or with ``--auth-token-file``
    and no certificate) or a :class:`TlsConfig`. ``token``: a bearer token
    (admin calls need an admin token). ``timeout``: each call's deadline in
    seconds unless the call says (default ``config.timeout``).
    """

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
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        """The gRPC target URI dialed."""
        return self._dialer.uri

    @property
    def dials(self) -> int:
        """Channels dialed so far (one at first, one more per re-resolution)."""
        return self._redial.dials

    # --- channels --------------------------------------------------------------------------

    def _lease(self) -> _Conn:
        with self._lock:
            conn, closing = self._redial.lease(
                time.monotonic(), lambda: _Conn(self._dialer.sync_channel()), _Conn.ready
            )
        for c in closing:
            c.close()
        return conn

    def _release(self, conn: _Conn) -> None:
        with self._lock:
            closing = self._redial.release(conn)
        for c in closing:
            c.close()

    def _timeout(self, timeout: float | None) -> float | None:
        """The call's deadline for gRPC (None: none); checked before any I/O."""
        t = self.config.timeout if timeout is None else timeout
        if not t > 0:  # NaN too: gRPC would end the call at once, DEADLINE_EXCEEDED
            raise invalid_request(f"timeout must be positive seconds (math.inf: no deadline), got {t}")
        return None if math.isinf(t) else t

    def _unary(self, stub: str, method: str, request: Any, timeout: float | None) -> Any:
        deadline = self._timeout(timeout)
        conn = self._lease()
        try:
            call = getattr(getattr(conn, stub), method)
            return call(request, timeout=deadline, metadata=self._dialer.metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            self._release(conn)

    # --- Router ----------------------------------------------------------------------------

    def generate(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> Generator[Event, None, None]:
        """Stream a completion: :class:`Routed` (per attempt), :class:`Chunk` s, then
        the :class:`Result`. Raises :class:`KvmeshError` if the call fails
        (mid-stream too: ``started`` is then true), and at once, before any
        I/O, for an option out of range (INVALID_ARGUMENT ``invalid_request``)."""
        return self._stream(generate_request(prompt, **options), self._timeout(timeout))

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Generator[Event, None, None]:
        conn = self._lease()
        fold = GenerateFold()
        call = None
        try:
            call = conn.router.Generate(request, timeout=timeout, metadata=self._dialer.metadata)
            for msg in call:
                event = fold.feed(msg)
                if event is not None:
                    yield event
        except grpc.RpcError as e:
            raise fold.error(e) from None
        finally:
            if call is not None:
                call.cancel()  # a no-op once the call has ended; stops the node's work if not
            self._release(conn)
        yield fold.result()

    def complete(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> Result:
        """:meth:`generate` to the end: its :class:`Result`."""
        for event in self.generate(prompt, timeout=timeout, **options):
            if isinstance(event, Result):
                return event
        raise KvmeshError(grpc.StatusCode.INTERNAL, "the stream ended without a result")

    def route(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Unpack[RouteOptions]
    ) -> RouteResult:
        """Which engine a node would send the prompt to, and why."""
        return route_result(self._unary("router", "Route", route_request(prompt, **options), timeout))

    # --- Admin (the node the call lands on; a node's own address targets one node) ----------

    def list_engines(self, *, timeout: float | None = None) -> list[pb.EngineStatus]:
        return list(self._unary("admin", "ListEngines", pb.ListEnginesRequest(), timeout).engines)

    def list_members(self, *, timeout: float | None = None) -> list[pb.Member]:
        return list(self._unary("admin", "ListMembers", pb.ListMembersRequest(), timeout).members)

    def stats(self, *, timeout: float | None = None) -> pb.GetStatsResponse:
        resp: pb.GetStatsResponse = self._unary("admin", "GetStats", pb.GetStatsRequest(), timeout)
        return resp

    def index_digest(self, engine_id: str, *, timeout: float | None = None) -> list[pb.WorkerDigest]:
        req = pb.GetIndexDigestRequest(engine_id=engine_id)
        return list(self._unary("admin", "GetIndexDigest", req, timeout).workers)

    def register_engine(self, spec: pb.EngineSpec, *, timeout: float | None = None) -> pb.EngineStatus:
        """Register an engine mesh-wide (never retried: see :mod:`kvmesh.client.service_config`)."""
        req = pb.RegisterEngineRequest(spec=spec)
        status: pb.EngineStatus = self._unary("admin", "RegisterEngine", req, timeout).status
        return status

    def deregister_engine(self, engine_id: str, *, timeout: float | None = None) -> bool:
        """Remove an engine mesh-wide; an unknown one raises NOT_FOUND (``unknown_engine``)."""
        req = pb.DeregisterEngineRequest(engine_id=engine_id)
        return bool(self._unary("admin", "DeregisterEngine", req, timeout).removed)

    def drain(self, *, timeout: float | None = None) -> pb.DrainResponse:
        """Drain the node the call lands on (dial one node's own address for this)."""
        resp: pb.DrainResponse = self._unary("admin", "Drain", pb.DrainRequest(), timeout)
        return resp

    def set_log_level(self, level: str, *, timeout: float | None = None) -> str:
        """Set the log level of the node the call lands on (debug, info, warning,
        error); returns the level before. Never retried."""
        req = pb.SetLogLevelRequest(level=level)
        return str(self._unary("admin", "SetLogLevel", req, timeout).previous)

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Close every channel; calls still in flight are cancelled."""
        with self._lock:
            closing = self._redial.close_all()
        for c in closing:
            c.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
