"""How a request ends when it does not end well: one error per cause.

Every request a node gives up on ends in one of a few outcomes, each with a
gRPC status a client can act on and a machine-readable ``reason`` (sent as
the ``kvmesh-reason`` trailing metadata, counted in metrics, logged):

==================  ======================  =========================================
status              what the client does    reasons
==================  ======================  =========================================
INVALID_ARGUMENT    fix the request         ``invalid_request``, ``engine_rejected``
RESOURCE_EXHAUSTED  back off, or shorten    ``overloaded``, ``engines_busy``,
                                            ``context_length``, ``request_too_large``
UNAVAILABLE         retry (elsewhere)       ``no_engine``, ``engine_failed``,
                                            ``draining``, ``joining``
DEADLINE_EXCEEDED   give it more time       ``deadline``, ``stream_stalled``
UNAUTHENTICATED     send a valid token      ``no_token``, ``bad_token``
PERMISSION_DENIED   use an admin token      ``not_admin``
NOT_FOUND           check the engine id     ``unknown_engine`` (Admin calls)
==================  ======================  =========================================

Only the client cancels: CANCELLED never comes from a node. A client's own
mistake (a bad field, a prompt longer than the model's context) never counts
against an engine; only transport errors, 5xx answers and timeouts do.
Pure: no gRPC here (``router/service.py`` maps ``grpc_code`` to a status).
"""

from __future__ import annotations

REASON_KEY = "kvmesh-reason"  # trailing metadata: why a call ended with its status
# Trailing metadata of a failed Generate or Route: the request's id (the
# client's, or the node's when it sent none), to quote in a report.
REQUEST_ID_KEY = "x-request-id"

__all__ = [
    "REASON_KEY",
    "REQUEST_ID_KEY",
    "ContextTooLong",
    "DeadlineExceeded",
    "Draining",
    "EnginesBusy",
    "NoEngineAvailable",
    "Overloaded",
    "RequestError",
    "RequestRejected",
    "RequestTooLarge",
    "RouterError",
    "StreamFailed",
]


class RouterError(Exception):
    """A request this node gives up on; ``grpc_code`` is a ``grpc.StatusCode`` name."""

    grpc_code = "UNKNOWN"
    reason = "internal"

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        if reason:
            self.reason = reason


class RequestError(RouterError, ValueError):
    """The request cannot be served as asked: the client's mistake."""

    grpc_code = "INVALID_ARGUMENT"
    reason = "invalid_request"


class RequestRejected(RequestError):
    """The engine refused the request itself (an HTTP 4xx): the client's mistake."""

    reason = "engine_rejected"


class RequestTooLarge(RequestError):
    """The request is larger than the node takes (``--max-request-bytes``)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "request_too_large"


class ContextTooLong(RouterError):
    """Prompt plus ``max_tokens`` exceed the model's context window."""

    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "context_length"


class Overloaded(RouterError):
    """This node shed the request before any engine work (it would wait too long)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "overloaded"


class EnginesBusy(RouterError):
    """Every engine that could take the request answered that its queue is full."""

    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "engines_busy"


class NoEngineAvailable(RouterError):
    """No engine could take the request; the message gives each one's reason."""

    grpc_code = "UNAVAILABLE"
    reason = "no_engine"


class Draining(RouterError):
    """This node is shutting down (or still joining): ask another node."""

    grpc_code = "UNAVAILABLE"
    reason = "draining"


class StreamFailed(RouterError):
    """The engine failed after tokens were sent: the request cannot be retried."""

    grpc_code = "UNAVAILABLE"
    reason = "engine_failed"


class DeadlineExceeded(RouterError):
    """The client's deadline passed, or the engine stopped sending for too long."""

    grpc_code = "DEADLINE_EXCEEDED"
    reason = "deadline"
