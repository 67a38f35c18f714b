"""Where an engine's KV events are published: the ZMQ endpoint conventions.

vLLM and SGLang publish one event stream per data-parallel rank, rank ``r``
on port ``base + r`` of both the PUB and the replay socket. The publisher
binds and the subscriber connects; which side an endpoint is for is decided
by its shape (:func:`should_bind`), and a subscriber turns a wildcard bind
address into one it can connect to (:func:`connect_endpoint`).
"""

from __future__ import annotations

from typing import overload

__all__ = ["connect_endpoint", "endpoint_problem", "offset_endpoint_port", "should_bind"]

MAX_PORT = 65535


def endpoint_problem(endpoint: str, ranks: int = 1) -> str | None:
    """Why a subscriber could not connect to ``tcp://HOST:PORT`` for each of
    ``ranks`` ranks (ports ``PORT`` .. ``PORT + ranks - 1``), or None. ZMQ
    refuses such an address only when the socket connects, long after the
    engine was registered."""
    if not endpoint.startswith("tcp://"):
        return "must be tcp://HOST:PORT"
    host, sep, port = endpoint[len("tcp://") :].rpartition(":")
    if not sep or not host or any(c.isspace() for c in host):
        return "must be tcp://HOST:PORT"
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) <= MAX_PORT:
        return f"port must be in 1..{MAX_PORT}"
    if int(port) + ranks - 1 > MAX_PORT:
        return f"ports {port}..{int(port) + ranks - 1} (one per data-parallel rank) pass {MAX_PORT}"
    return None


@overload
def offset_endpoint_port(endpoint: str, data_parallel_rank: int) -> str: ...
@overload
def offset_endpoint_port(endpoint: str | None, data_parallel_rank: int) -> str | None: ...
def offset_endpoint_port(endpoint: str | None, data_parallel_rank: int) -> str | None:
    """vLLM's rule: rank r publishes on port base + r (inproc/ipc get a suffix)."""
    if not endpoint or data_parallel_rank == 0:
        return endpoint
    if endpoint.startswith(("inproc://", "ipc://")):
        return f"{endpoint}_dp{data_parallel_rank}"
    if endpoint.startswith("tcp://"):
        base, sep, port = endpoint.rpartition(":")
        if sep and port.isdigit():
            if int(port) == 0:  # ephemeral: every rank gets its own anyway
                return endpoint
            return f"{base}:{int(port) + data_parallel_rank}"
        return endpoint
    raise ValueError(f"invalid endpoint {endpoint!r}: want tcp://, ipc:// or inproc://")


def should_bind(endpoint: str) -> bool:
    """vLLM's heuristic (wildcards, ipc, inproc bind), plus: port 0 binds."""
    if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
        return True
    return endpoint.startswith("tcp://") and endpoint.rpartition(":")[2] == "0"


def connect_endpoint(endpoint: str, data_parallel_rank: int = 0) -> str:
    """The address a subscriber connects to for ``data_parallel_rank``: port +
    rank, and a wildcard host (the engine's bind address) becomes loopback."""
    ep = offset_endpoint_port(endpoint, data_parallel_rank)
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if ep.startswith(wildcard):
            return "tcp://127.0.0.1:" + ep[len(wildcard) :]
    return ep
