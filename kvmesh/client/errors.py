"""The one exception a kvmesh client raises for a call that did not end well.

A node ends every failed call with a gRPC status and, in the trailing
metadata ``kvmesh-reason``, one word saying which case it is (README.md,
"How a call ends"). :class:`KvmeshError` carries both, the node's message,
and whether the call had started answering: a call that failed before any
answer was already retried by gRPC where that is safe
(:mod:`kvmesh.client.service_config`); one that failed after it may have
done work (tokens generated) and was not. An empty ``reason`` means no node
said why: the status came from gRPC on the client's side (its deadline, a
connection that broke, no node reachable).

A request that could not even be sent (a field out of the range its wire
type holds, such as a negative ``max_tokens``) raises the same error the
node gives a bad field, INVALID_ARGUMENT ``invalid_request``, before any
I/O (:func:`invalid_request`). A node that also names its reason at the
head of its message (``bad_token: this call needs a valid token``) is
rendered with the reason once.

A connection whose TLS handshake failed says, in ``hint`` and in the
error's text, which argument of the client is the likely cause (the CLI
words its own hints in its flags).
"""

from __future__ import annotations

from typing import Any

import grpc

from kvmesh.client.results import Result
from router.errors import REASON_KEY, REQUEST_ID_KEY, RequestError

__all__ = ["KvmeshError", "from_rpc_error", "invalid_request", "tls_failure"]


class KvmeshError(Exception):
    """A call that ended with a non-OK status.

    ``code``: the ``grpc.StatusCode``; ``status``: its name (``"UNAVAILABLE"``);
    ``reason``: the node's ``kvmesh-reason`` ("" if none); ``message``: the
    status details; ``started``: the call had received an answer (a stream its
    first message) before it failed; ``request_id``: the request's id when
    the node had said it (in its first answer, or the trailing metadata
    ``x-request-id`` of a refusal); ``result``: for a stream that had finished with
    ``finish_reason == "error"``, what it had produced.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        *,
        started: bool = False,
        request_id: str = "",
        result: Result | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.started = started
        self.request_id = request_id
        self.result = result
        self.hint = _tls_hint(message) if code == grpc.StatusCode.UNAVAILABLE else ""
        super().__init__(str(self))

    @property
    def status(self) -> str:
        return str(self.code.name)

    def __str__(self) -> str:
        hint = f" ({self.hint})" if self.hint else ""
        return f"{self.without_hint()}{hint}"

    def without_hint(self) -> str:
        """The status, the node's reason and its message."""
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.status}{why}: {self.message}"


# gRPC's words for each way a TLS connection fails, first match wins:
# (kind, any of these in the lowercased details).
_TLS_FAILURES = (
    ("name", ("hostname verification", "no match found for server name")),
    ("expired", ("expired", "not yet valid")),
    ("ca", ("certificate verify failed", "certificate_verify_failed")),
    ("plaintext", ("wrong_version_number", "wrong version number")),
    ("handshake", ("handshake",)),
)

# What the library's caller changes for each (the CLI words them in its flags).
_TLS_HINTS = {
    "name": "the node's certificate does not carry the name dialled: TlsConfig(server_name=...)",
    "expired": "a certificate has expired or is not yet valid: the node's (it needs a new one), "
    "or this client's TlsConfig(cert_file=...)",
    "ca": "the node's certificate is not signed by a CA this client trusts: TlsConfig(ca_file=...)",
    "plaintext": "the node answered the TLS handshake in plaintext: a node run with --insecure, or with "
    "tokens and no --tls-cert, takes tls=False",
}


def tls_failure(message: str) -> str:
    """How a connection's TLS failed, from gRPC's words: "name", "expired",
    "ca", "plaintext", "handshake" (another handshake failure), or ""."""
    m = message.lower()
    return next((kind for kind, words in _TLS_FAILURES if any(w in m for w in words)), "")


def _tls_hint(message: str) -> str:
    """Which client argument a failed TLS handshake likely points at ("" when
    gRPC's words say nothing of it)."""
    return _TLS_HINTS.get(tls_failure(message), "")


def invalid_request(message: str) -> KvmeshError:
    """What a node answers a request with a bad field (INVALID_ARGUMENT
    ``invalid_request``), raised by the client for one it cannot send."""
    return KvmeshError(grpc.StatusCode.INVALID_ARGUMENT, message, RequestError.reason)


def _without_reason(details: str, reason: str) -> str:
    """``details`` without a leading ``reason: `` (the node's auth refusals
    say their reason there too), so the error says it once."""
    head = f"{reason}: "
    return details[len(head) :] if reason and details.startswith(head) else details


def from_rpc_error(
    e: Any, *, started: bool = False, request_id: str = "", result: Result | None = None
) -> KvmeshError:
    """The :class:`KvmeshError` for a ``grpc.RpcError`` (sync or ``grpc.aio``)."""
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    trailing = e.trailing_metadata() if callable(getattr(e, "trailing_metadata", None)) else None
    reason = next((str(v) for k, v in (trailing or ()) if k == REASON_KEY), "")
    request_id = request_id or next((str(v) for k, v in (trailing or ()) if k == REQUEST_ID_KEY), "")
    return KvmeshError(
        code if code is not None else grpc.StatusCode.UNKNOWN,
        _without_reason(details or "", reason),
        reason,
        started=started,
        request_id=request_id,
        result=result,
    )
