"""gRPC shell of the mesh: delivers addressed messages between nodes.

Outgoing messages are grouped by destination and sent as one ``Deliver``
batch per peer, fire-and-forget with a short deadline: the protocols above
(SWIM, epidemic push, anti-entropy) treat every message as a datagram that
may be lost, so a failed call is counted and dropped, never retried here.
In-flight calls per peer are capped so a dead peer cannot pile up tasks.

``Deliver`` carries the batch's encoded bytes untouched both ways (no gRPC
(de)serializer): the receiver checks the mesh secret's proof over exactly
the bytes that arrived before parsing anything, and bytes that do not parse
get INVALID_ARGUMENT rather than grpcio's bare UNKNOWN.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError

from kvmesh_pb.mesh.v1 import mesh_pb2 as pb
from mesh.auth import MeshSecret
from mesh.wire import WireError, from_envelope, to_envelope

log = structlog.get_logger(__name__)

_REFUSALS_LOGGED = 20  # then one line per thousand: an intruder must not flood the log
# Seconds between two log lines of the same peer refusing this node's credentials.
REFUSAL_LOG_INTERVAL_S = 30.0
_SERVICE = "kvmesh.mesh.v1.Mesh"
_DELIVER = f"/{_SERVICE}/Deliver"


@dataclass(frozen=True)
class TransportConfig:
    """The gRPC shell's settings (the node's server uses the same message bound)."""

    rpc_timeout_s: float = 2.0  # one Deliver call; a lost call is a lost datagram
    max_inflight_per_peer: int = 8  # calls to one peer at once: a dead peer cannot pile up tasks
    max_message_bytes: int = 256 << 20  # full states of large indexes are big
    keepalive_ms: int = 10_000
    reconnect_backoff_ms: tuple[int, int] = (200, 2_000)  # initial, max
    # Authentication between nodes (mesh/auth.py): mutual TLS, a shared
    # secret, or both. Without either the mesh is open to anyone who reaches
    # its port, which the node allows only when told (--insecure).
    secret_file: str = ""  # the shared secret every batch proves
    tls_cert: str = ""  # this node's certificate (PEM), signed by tls_ca
    tls_key: str = ""
    tls_ca: str = ""  # the CA every member's certificate is signed by
    tls_server_name: str = "kvmesh-mesh"  # the name in every member's certificate

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_key or self.tls_ca)

    @property
    def authenticated(self) -> bool:
        return bool(self.secret_file) or self.tls

    def check(self) -> None:
        """Fail early on an unusable combination (ValueError)."""
        if self.tls and not (self.tls_cert and self.tls_key and self.tls_ca):
            raise ValueError("mesh TLS needs a certificate, its key and the CA (all three)")

    def channel_options(self) -> list[tuple[str, int | str]]:
        opts: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_ms),
            ("grpc.initial_reconnect_backoff_ms", self.reconnect_backoff_ms[0]),
            ("grpc.max_reconnect_backoff_ms", self.reconnect_backoff_ms[1]),
        ]
        if self.tls:
            # Members are dialled by address; who they are is their CA-signed
            # certificate, which carries one name for the whole mesh.
            opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return opts

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: the server asks every caller for a certificate of the mesh's CA."""
        return grpc.ssl_server_credentials(
            [(_read(self.tls_key), _read(self.tls_cert))],
            root_certificates=_read(self.tls_ca),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_key),
            certificate_chain=_read(self.tls_cert),
        )


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass
class TransportStats:
    batches_sent: int = 0
    messages_sent: int = 0
    bytes_sent: int = 0
    send_failures: int = 0
    dropped_backpressure: int = 0
    batches_received: int = 0
    bytes_received: int = 0  # batch bytes as they arrived (before any check)
    messages_received: int = 0
    rejected: int = 0
    refused: int = 0  # batches without a valid proof of membership, or that do not parse


def _not_a_member(auth: dict[str, list[bytes]] | None, name: str) -> str | None:
    """Why a caller's certificate is not a member's, or None. The mesh's CA
    may sign other certificates too (make-certs.sh signs the API's server and
    client ones with it): a member's carries the mesh's name, as the callers
    check of the servers they dial (``ssl_target_name_override``)."""
    auth = auth or {}
    names = [v.decode(errors="replace") for k in ("x509_subject_alternative_name", "x509_common_name")
             for v in auth.get(k, ())]  # fmt: skip
    if any(_name_matches(n, name) for n in names):
        return None
    shown = ", ".join(names) or "none"
    return f"the caller's certificate does not name the mesh ({name!r}; it names: {shown})"


def _name_matches(pattern: str, name: str) -> bool:
    """A certificate name against the mesh's, as hostname verification takes
    it: exactly, or a wildcard for the whole first label (``*.mesh.example``)."""
    if pattern.lower() == name.lower():
        return True
    head, dot, rest = name.partition(".")
    return pattern.startswith("*.") and bool(dot and head) and pattern[2:].lower() == rest.lower()


class _Servicer:
    def __init__(self, transport: MeshTransport) -> None:
        self.t = transport

    def _refused(self, context: grpc.aio.ServicerContext, why: str) -> None:
        self.t.stats.refused += 1
        if self.t.stats.refused <= _REFUSALS_LOGGED or self.t.stats.refused % 1000 == 0:
            log.warning(
                "transport.batch_refused", addr=self.t.addr, peer=context.peer(), why=why,
                refused=self.t.stats.refused,
            )  # fmt: skip

    async def deliver(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.t.stats.batches_received += 1
        self.t.stats.bytes_received += len(body)
        if self.t.config.tls:
            why = _not_a_member(context.auth_context(), self.t.config.tls_server_name)
            if why is not None:
                self._refused(context, why)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        secret = self.t.secret
        if secret is not None:
            meta = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            why = secret.check(body, meta, time.time())
            if why is not None:
                self._refused(context, why)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        try:
            batch = pb.Batch.FromString(body)
        except DecodeError as e:
            self._refused(context, f"undecodable batch: {e}")
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"undecodable mesh batch ({len(body)} bytes)"
            )
        accepted = rejected = 0
        heard: set[str] = set()
        for env in batch.messages:
            try:
                msg = from_envelope(env)
            except WireError as e:
                rejected += 1
                log.warning("transport.message_rejected", addr=self.t.addr, error=str(e))
                continue
            accepted += 1
            if msg.src not in heard:
                heard.add(msg.src)
                self.t.heard_from(msg.src)
            try:
                self.t.deliver(msg)
            except Exception:  # a bug in the core must not kill the server
                rejected += 1
                log.exception("transport.handling_failed", addr=self.t.addr, kind=type(msg).__name__)
        self.t.stats.messages_received += accepted
        self.t.stats.rejected += rejected
        return pb.DeliverReply(accepted=accepted, rejected=rejected).SerializeToString()


class MeshTransport:
    def __init__(
        self,
        addr: str,
        deliver: Callable[[Any], None],
        config: TransportConfig | None = None,
    ) -> None:
        self.addr = addr
        self.deliver = deliver
        self.config = config = config or TransportConfig()
        config.check()
        self.secret = MeshSecret.from_file(config.secret_file) if config.secret_file else None
        self._creds = config.channel_credentials() if config.tls else None
        self.stats = TransportStats()
        self.bytes_by_kind: dict[str, int] = defaultdict(int)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._inflight: dict[str, int] = defaultdict(int)
        self._refusal_logged: dict[str, float] = {}  # peer -> when its refusal was last logged
        self._renewed: dict[str, float] = {}  # peer -> when heard_from last renewed its channel
        self._tasks: set[asyncio.Task[None]] = set()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        # Raw bytes in and out: see the module docstring.
        handler = grpc.unary_unary_rpc_method_handler(_Servicer(self).deliver)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, {"Deliver": handler}),)
        )

    def _deliver_call(self, dst: str) -> grpc.aio.UnaryUnaryMultiCallable:
        call = self._calls.get(dst)
        if call is None:
            opts = self.config.channel_options()
            if self._creds is not None:
                ch = grpc.aio.secure_channel(dst, self._creds, options=opts)
            else:
                ch = grpc.aio.insecure_channel(dst, options=opts)
            self._channels[dst] = ch
            call = self._calls[dst] = ch.unary_unary(
                _DELIVER, response_deserializer=pb.DeliverReply.FromString
            )
        return call

    def send(self, msgs: list[Any]) -> None:
        """Queue messages for delivery; returns at once."""
        by_dst: dict[str, list[pb.Envelope]] = defaultdict(list)
        for m in msgs:
            try:
                env = to_envelope(m)
            except WireError:
                log.exception("transport.encode_failed", addr=self.addr, kind=type(m).__name__)
                continue
            by_dst[m.dst].append(env)
        for dst, envs in by_dst.items():
            if self._inflight[dst] >= self.config.max_inflight_per_peer:
                self.stats.dropped_backpressure += len(envs)
                continue
            batch = pb.Batch(messages=envs)
            size = batch.ByteSize()
            for e in envs:
                self.bytes_by_kind[e.WhichOneof("body")] += e.ByteSize()
            self.stats.batches_sent += 1
            self.stats.messages_sent += len(envs)
            self.stats.bytes_sent += size
            self._inflight[dst] += 1
            task = asyncio.get_running_loop().create_task(self._call(dst, batch.SerializeToString()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, dst: str, body: bytes) -> None:
        meta = None
        if self.secret is not None:
            meta = self.secret.sign(body, time.time())
        try:
            await self._deliver_call(dst)(body, timeout=self.config.rpc_timeout_s, metadata=meta)
        except grpc.aio.AioRpcError as e:
            self.stats.send_failures += 1
            code = e.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                self._refused(dst, code.name, e.details() or "")
            else:
                log.debug("transport.send_failed", addr=self.addr, peer_addr=dst, code=code.name)
        except Exception:
            self.stats.send_failures += 1
            log.exception("transport.send_crashed", addr=self.addr, peer_addr=dst)
        finally:
            self._inflight[dst] -= 1

    def _refused(self, dst: str, code: str, details: str) -> None:
        """A peer refused our credentials: this node can never join through
        it, and only the peer's log would say why. Said here too, at most
        every ``REFUSAL_LOG_INTERVAL_S`` per peer."""
        now = time.monotonic()
        last = self._refusal_logged.get(dst)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL_S:
            return
        self._refusal_logged[dst] = now
        log.warning(
            "transport.refused_by_peer",
            addr=self.addr,
            peer_addr=dst,
            code=code,
            why=details,
            hint="the peer does not accept this node's mesh credentials (--mesh-secret-file, --mesh-tls-*)",
        )

    def heard_from(self, src: str) -> None:
        """A peer's batch just arrived, so it is up. A channel to it that is
        still waiting out its reconnect backoff (the peer was down: a node
        restarted at the same address) would fail every reply until the
        backoff ends, a restarted node's Join answer among them: start it
        afresh, as a channel to a new peer would."""
        ch = self._channels.get(src)
        if ch is None or ch.get_state() != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return
        # At most once per longest backoff: a peer that reaches this node but
        # that this node cannot reach (its address NAT-ed, a one-way firewall)
        # must not turn the backoff into a dial per batch it sends.
        now = time.monotonic()
        if now - self._renewed.get(src, -math.inf) < self.config.reconnect_backoff_ms[1] / 1000:
            return
        self._renewed[src] = now
        log.debug("transport.channel_renewed", addr=self.addr, peer_addr=src)
        self.forget(src)

    def forget(self, dst: str) -> None:
        """Close the channel to a peer that left for good."""
        ch = self._channels.pop(dst, None)
        self._calls.pop(dst, None)
        if ch is not None:
            task = asyncio.get_running_loop().create_task(ch.close())
            self._tasks.add(task)  # held until done: a task only the loop refers to may be collected
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._calls.clear()
