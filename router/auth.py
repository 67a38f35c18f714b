"""Who may call a node's public API: TLS and bearer tokens.

A router fronts every request of a fleet, and its Admin service can
deregister every engine mesh-wide: the public port is authenticated unless
the operator says otherwise (``--insecure``). Two means, usable together:

* TLS (``--tls-cert``/``--tls-key``), optionally requiring client
  certificates of a CA (``--tls-client-ca``);
* bearer tokens (``--auth-token-file``): one token a line, optionally
  followed by its role, ``client`` (the default: Router calls) or ``admin``
  (Router and Admin calls). A call carries ``authorization: Bearer TOKEN``.

Health checks (``grpc.health.v1.Health``) need no token: orchestrators probe
them. The mesh's own RPC, on the same port when no separate mesh port is
set, is authenticated by the mesh (``mesh/auth.py``), not by tokens.
A refused call ends UNAUTHENTICATED (no token, unknown token) or
PERMISSION_DENIED (a client token on Admin), is counted and logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from router.errors import REASON_KEY, REQUEST_ID_KEY

__all__ = [
    "ADMIN",
    "CLIENT",
    "MIN_TOKEN_CHARS",
    "ApiAuthConfig",
    "AuthError",
    "TokenInterceptor",
    "TokenTable",
]

CLIENT = "client"
ADMIN = "admin"
_ROLES = (CLIENT, ADMIN)
MIN_TOKEN_CHARS = 16  # a token short enough to guess is refused
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/kvmesh.mesh.v1.Mesh/")
_ADMIN_PREFIX = "/kvmesh.v1.Admin/"


class AuthError(ValueError):
    """An authentication setting that cannot be used."""


@dataclass(frozen=True, slots=True)
class ApiAuthConfig:
    tls_cert: str = ""  # the node's certificate (PEM) for the public port
    tls_key: str = ""
    tls_client_ca: str = ""  # when set, clients must present a certificate of this CA
    token_file: str = ""  # bearer tokens, one a line: TOKEN [client|admin]

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_key)

    @property
    def authenticated(self) -> bool:
        return self.tls or bool(self.token_file)

    def check(self) -> None:
        if self.tls and not (self.tls_cert and self.tls_key):
            raise AuthError("TLS needs both a certificate and its key")
        if self.tls_client_ca and not self.tls:
            raise AuthError("client certificates need TLS (a certificate and key for the node)")

    def server_credentials(self) -> grpc.ServerCredentials:
        root = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes())],
            root_certificates=root,
            require_client_auth=root is not None,
        )


class TokenTable:
    """The bearer tokens a node accepts, each with its role. Pure."""

    def __init__(self, tokens: dict[str, str]) -> None:
        for role in tokens.values():
            if role not in _ROLES:
                raise AuthError(f"unknown role {role!r}; one of {', '.join(_ROLES)}")
        self._tokens = dict(tokens)

    @classmethod
    def parse(cls, text: str) -> TokenTable:
        tokens: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) > 2:
                raise AuthError(f"line {n}: want TOKEN [client|admin]")
            if len(words[0]) < MIN_TOKEN_CHARS:
                raise AuthError(f"line {n}: a token must be at least {MIN_TOKEN_CHARS} characters")
            tokens[words[0]] = words[1] if len(words) == 2 else CLIENT
        if not tokens:
            raise AuthError("the token file holds no token")
        return cls(tokens)

    @classmethod
    def from_file(cls, path: str) -> TokenTable:
        try:
            return cls.parse(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise AuthError(f"cannot read the token file {path!r}: {e}") from None
        except UnicodeDecodeError as e:
            raise AuthError(f"the token file {path!r} is not UTF-8 text (byte {e.start})") from None

    def role_of(self, authorization: str | None) -> str | None:
        """The role of the token in an ``authorization`` header, or None."""
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":  # an auth scheme is case-insensitive (RFC 9110)
            return None
        # As bytes: compare_digest refuses a str that is not ASCII, which an
        # HTTP header may hold.
        given_b = given.strip().encode("utf-8", "surrogateescape")
        for token, role in self._tokens.items():
            if hmac.compare_digest(given_b, token.encode()):
                return role
        return None

    def verdict(self, method: str, authorization: str | None) -> tuple[str, str] | None:
        """None if the call may go ahead, else (status code name, reason)."""
        if method.startswith(_OPEN_PREFIXES):
            return None
        role = self.role_of(authorization)
        if role is None:
            return ("UNAUTHENTICATED", "bad_token" if authorization else "no_token")
        if method.startswith(_ADMIN_PREFIX) and role != ADMIN:
            return ("PERMISSION_DENIED", "not_admin")
        return None


class Refused(Protocol):
    """Counts and logs a call refused for its credentials; returns the id the
    refusal names the request by: the client's ``request_id`` if it gave a
    usable one, else one the node makes (README: every call that ends badly
    is named in ``x-request-id``)."""

    def __call__(
        self, status: str, reason: str, method: str, request_id: str = "", peer: str = ""
    ) -> str: ...


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose bearer token does not allow the method."""

    def __init__(self, table: TokenTable, on_refused: Refused) -> None:
        self.table = table
        self.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        meta = dict(details.invocation_metadata or ())
        verdict = self.table.verdict(details.method, meta.get("authorization"))
        handler = await continuation(details)
        if verdict is None or handler is None:
            return handler
        code, reason = verdict
        need = "an admin token" if reason == "not_admin" else "a valid token"
        message = f"{reason}: this call needs {need}"
        return _refusal(handler, (code, reason, details.method), message, self.on_refused)


def _refusal(
    handler: grpc.RpcMethodHandler, what: tuple[str, str, str], message: str, on_refused: Refused
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only refuses (``what``:
    status, reason, method), counted and logged with the request's id (from
    the request message, where the call has one) and the caller's address."""
    code, reason, method = what

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        client_id = getattr(request, "request_id", "")
        client_id = client_id if isinstance(client_id, str) else ""
        rid = on_refused(code, reason, method, client_id, context.peer())
        context.set_trailing_metadata(((REASON_KEY, reason), (REQUEST_ID_KEY, rid)))
        await context.abort(getattr(grpc.StatusCode, code), message)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(request, context)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(request, context)
        yield  # pragma: no cover - makes this an async generator

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(stream, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)
