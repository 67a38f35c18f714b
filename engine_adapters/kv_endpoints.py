"""Where an engine's KV events are published: the ZMQ endpoint conventions.

vLLM and SGLang publish one event stream per data-parallel rank, rank ``r``
on port ``base + r`` of both the PUB and the replay socket; the publisher
binds and the subscriber connects, decided by the endpoint's shape.
"""

from __future__ import annotations

__all__ = ["offset_endpoint_port", "should_bind"]


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
